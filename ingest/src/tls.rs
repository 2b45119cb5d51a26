//! MQTT over TLS (rustls with the ring provider) from PEM certificate and key files.

use std::path::Path;
use std::sync::Arc;

use ntex::service::{ServiceFactory, chain_factory};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::gateway::GatewayError;
use crate::{Error, Result};

/// Loads the certificate chain and key into a server configuration.
pub fn server_config(cert_path: &Path, key_path: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let corrupt = |path: &Path, detail: String| Error::Corrupt {
        path: path.to_owned(),
        detail,
    };

    let chain = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|error| corrupt(cert_path, error.to_string()))?;
    if chain.is_empty() {
        return Err(corrupt(cert_path, "no certificate in the file".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|error| corrupt(key_path, error.to_string()))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| corrupt(cert_path, error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| corrupt(cert_path, error.to_string()))?;
    Ok(Arc::new(config))
}

/// The TLS handshake as the first step of a connection; a failed handshake ends it.
pub(crate) fn acceptor<F: ntex::io::Filter>(
    config: Arc<rustls::ServerConfig>,
) -> impl ServiceFactory<
    ntex::io::Io<F>,
    ntex::service::cfg::SharedCfg,
    Response = ntex::io::Io<ntex::io::Layer<ntex::tls::rustls::TlsServerFilter, F>>,
    Error = ntex_mqtt::MqttError<GatewayError>,
    InitError = (),
> {
    chain_factory(ntex::tls::rustls::TlsAcceptor::new(config))
        .map_err(|_handshake_failed| ntex_mqtt::MqttError::Service(GatewayError::TlsHandshake))
}
