//! Wiring of one vigil process: store, ingest, gRPC (administration and Flight SQL) and HTTP.
//!
//! Start order: the store first (it replays the write-ahead log and hands back the replay-guard
//! state), then ingest with that state, then the listeners. Stop order is the reverse: no new
//! readings, then the store drains its queue and syncs.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use vigil_ingest::Ingest;
use vigil_ingest::registry::DeviceRegistry;
use vigil_proto::v1::device_admin_server::DeviceAdminServer;
use vigil_store::Store;

use crate::admin::AdminService;
use crate::auth::BearerAuth;
use crate::config::VigilConfig;

/// Largest gRPC message accepted, in bytes (a bulk enrollment of many devices).
const MAX_GRPC_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A running server and the addresses it listens on.
#[derive(Debug)]
pub(crate) struct RunningServer {
    pub(crate) store: Store,
    pub(crate) ingest: Arc<Ingest>,
    pub(crate) mqtt_address: SocketAddr,
    pub(crate) grpc_address: SocketAddr,
    pub(crate) http_address: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// Starts every stage of one process.
    pub(crate) async fn start(config: &VigilConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!("cannot create data directory {}", config.data_dir.display())
        })?;
        let auth = BearerAuth::load_or_create(&config.data_dir)?;

        let store_config = config.store_config();
        let (store, recovered) = tokio::task::spawn_blocking(move || Store::open(store_config))
            .await?
            .context("cannot open the store")?;
        tracing::info!(
            devices = recovered.devices.len(),
            replayed_readings = recovered.replayed_readings,
            "store opened"
        );

        let ingest = Arc::new(
            Ingest::start(
                &config.ingest,
                &config.data_dir,
                recovered,
                store.wal_sender(),
            )
            .context("cannot start the MQTT gateway")?,
        );
        let registry = ingest.registry.clone();
        store.set_devices_source(Arc::new(move || devices_batch(&registry)));

        let mut metrics = Registry::default();
        ingest.metrics.register(&mut metrics);
        store.register_metrics(&mut metrics);

        let (stop, stopped) = watch::channel(false);
        let grpc_listener = TcpListener::bind(config.grpc_listen)
            .await
            .with_context(|| format!("cannot listen for gRPC on {}", config.grpc_listen))?;
        let http_listener = TcpListener::bind(config.http_listen)
            .await
            .with_context(|| format!("cannot listen for HTTP on {}", config.http_listen))?;
        let grpc_address = grpc_listener.local_addr()?;
        let http_address = http_listener.local_addr()?;

        let grpc = tokio::spawn(serve_grpc(
            grpc_listener,
            auth,
            ingest.clone(),
            store.clone(),
            wait_for_stop(stopped.clone()),
        ));
        let http = tokio::spawn(async move {
            let served =
                crate::http::serve(http_listener, Arc::new(metrics), wait_for_stop(stopped)).await;
            if let Err(error) = served {
                tracing::error!(%error, "http listener failed");
            }
        });
        tracing::info!(%grpc_address, %http_address, "grpc and http listeners started");

        Ok(Self {
            mqtt_address: ingest.mqtt_address(),
            store,
            ingest,
            grpc_address,
            http_address,
            stop,
            tasks: vec![grpc, http],
        })
    }

    /// Stops accepting work, then lets the store drain and sync.
    pub(crate) async fn stop(self) {
        self.ingest.stop().await;
        // Nobody listening means the listeners are gone already.
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.shutdown()).await;
        tracing::info!("server stopped");
    }
}

async fn wait_for_stop(mut stopped: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = stopped.wait_for(|stop| *stop).await;
}

async fn serve_grpc(
    listener: TcpListener,
    auth: BearerAuth,
    ingest: Arc<Ingest>,
    store: Store,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let admin_auth = auth.clone();
    let admin = DeviceAdminServer::new(AdminService::new(ingest))
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let admin = InterceptedService::new(admin, move |request| admin_auth.check(request));
    let flight = InterceptedService::new(vigil_store::flight_sql_service(store), move |request| {
        auth.check(request)
    });

    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let served = tonic::transport::Server::builder()
        .add_service(admin)
        .add_service(flight)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    if let Err(error) = served {
        tracing::error!(%error, "grpc listener failed");
    }
}

/// The `devices` table, built from the registry at query time.
fn devices_batch(registry: &DeviceRegistry) -> RecordBatch {
    let devices = registry.list();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            devices.iter().map(|d| d.id.to_string()),
        )),
        Arc::new(StringArray::from_iter_values(
            devices.iter().map(|d| d.class.clone()),
        )),
        Arc::new(StringArray::from_iter_values(
            devices.iter().map(|d| d.status().as_str()),
        )),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(devices.iter().map(|d| d.enrolled_at_ms))
                .with_timezone("UTC"),
        ),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(
                devices.iter().map(|d| d.status_changed_at_ms()),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(Float64Array::from_iter_values(devices.iter().map(|_| 0.0))),
    ];
    RecordBatch::try_new(Store::devices_schema(), columns)
        .unwrap_or_else(|_| RecordBatch::new_empty(Store::devices_schema()))
}
