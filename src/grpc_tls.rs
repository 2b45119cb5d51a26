//! TLS on the gRPC port: rustls from the PEM files of `grpc_tls_cert_path` and
//! `grpc_tls_key_path`, loaded as the MQTT listener loads its own.
//!
//! Each accepted connection gets its handshake in a task of its own, bounded by
//! [`HANDSHAKE_TIMEOUT`], so a client that stalls mid-handshake holds up nobody else. A
//! handshake that fails (a plaintext client, a client that does not trust the certificate, a
//! port scanner) or times out closes the connection, is counted in
//! `vigil_grpc_tls_handshake_failures_total` and logged at debug with the peer; only finished
//! handshakes reach tonic.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::metrics::AccessMetrics;

/// Longest a client may take over its TLS handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Finished handshakes waiting for tonic to take them.
const READY_CONNECTIONS: usize = 64;

/// The server's TLS configuration for gRPC: the certificate chain and key, and HTTP/2 by ALPN.
pub(crate) fn server_config(
    cert_path: &Path,
    key_path: &Path,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let config = vigil_ingest::tls::server_config(cert_path, key_path)
        .context("invalid gRPC certificate or key")?;
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The connections of `listener` once their TLS handshake is done. Accepting stops when tonic
/// drops the stream (the server stops).
pub(crate) fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    metrics: Arc<AccessMetrics>,
) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> {
    let (ready, connections) = mpsc::channel(READY_CONNECTIONS);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = ready.closed() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    tokio::spawn(handshake(
                        acceptor.clone(),
                        tcp,
                        peer,
                        ready.clone(),
                        metrics.clone(),
                    ));
                }
                // A failed accept (e.g. out of file descriptors) concerns that connection
                // only; tonic's own accept loop treats it the same way.
                Err(error) => tracing::warn!(%error, "grpc accept failed"),
            }
        }
    });
    ReceiverStream::new(connections)
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    ready: mpsc::Sender<std::io::Result<TlsStream<TcpStream>>>,
    metrics: Arc<AccessMetrics>,
) {
    let error = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            // A closed channel means the server is stopping: the connection just closes.
            let _ = ready.send(Ok(stream)).await;
            return;
        }
        Ok(Err(error)) => error.to_string(),
        Err(_) => "handshake timed out".to_owned(),
    };
    metrics.grpc_tls_handshake_failure();
    tracing::debug!(%peer, error = ?error, "grpc tls handshake failed");
}
