//! Wiring of one vigil process: store, ingest, detection, gRPC (administration, SOC and Flight
//! SQL) and HTTP.
//!
//! Start order: the store first (it replays the write-ahead log and hands back the replay-guard
//! state), then ingest with that state and the detector's queue, then the detector (which acts
//! on ingest through [`GatewayResponder`]), then the listeners. Stop order is the reverse: no
//! new readings, then the store drains its queue and syncs. Alerts are fsynced as they are
//! raised, so the detector needs no stop step.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray,
    TimestampMillisecondArray, UInt64Array,
};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vigil_cluster::metrics::ClusterMetrics;
use vigil_cluster::publisher::{EventForwarder, ReadingPublisher};
use vigil_cluster::registry::{RegistryReplication, StatusTarget};
use vigil_config::Role;
use vigil_detect::alerts::AlertLog;
use vigil_detect::fleet::FleetModel;
use vigil_detect::service::SocService;
use vigil_detect::{Detector, Responder, observation_queue};
use vigil_ingest::Ingest;
use vigil_ingest::registry::{DeviceRegistry, DeviceStatus};
use vigil_proto::v1::device_admin_server::DeviceAdminServer;
use vigil_proto::v1::soc_server::SocServer;
use vigil_store::Store;

use crate::admin::AdminService;
use crate::auth::{AuthLayer, Authenticator};
use crate::config::{ServerConfig as _, VigilConfig};
use crate::metrics::AccessMetrics;
use crate::tokens::TokenStore;

/// Largest gRPC message accepted, in bytes (a bulk enrollment of many devices).
const MAX_GRPC_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A running server and the addresses it listens on.
#[derive(Debug)]
pub(crate) struct RunningServer {
    pub(crate) store: Store,
    pub(crate) ingest: Arc<Ingest>,
    /// Held so that the detector's threads live as long as the server.
    _detector: Arc<Detector>,
    pub(crate) mqtt_address: SocketAddr,
    pub(crate) grpc_address: SocketAddr,
    pub(crate) http_address: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    cluster: ClusterParts,
}

/// What a cluster gateway runs besides the stages of one process.
#[derive(Debug, Default)]
struct ClusterParts {
    publisher: Option<ReadingPublisher>,
    forwarder: Option<EventForwarder>,
    replication: Option<RegistryReplication>,
}

impl ClusterParts {
    /// After the gateway has stopped taking readings: what is queued goes to Kafka first.
    fn stop(self) {
        if let Some(publisher) = self.publisher {
            publisher.stop();
        }
        if let Some(forwarder) = self.forwarder {
            forwarder.stop();
        }
        if let Some(replication) = self.replication {
            replication.stop();
        }
    }
}

impl RunningServer {
    /// Starts every stage of one process.
    pub(crate) async fn start(config: &VigilConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!("cannot create data directory {}", config.data_dir.display())
        })?;
        // SQL reads Parquet files by absolute location: a relative data directory (the
        // default is one) is resolved once, so that later changes of directory cannot move it.
        let data_dir = std::fs::canonicalize(&config.data_dir).with_context(|| {
            format!(
                "cannot resolve data directory {}",
                config.data_dir.display()
            )
        })?;
        let config = &VigilConfig {
            data_dir,
            ..config.clone()
        };
        let access_metrics = Arc::new(AccessMetrics::new());
        let tokens = Arc::new(TokenStore::open(&config.data_dir)?);
        let auth = Arc::new(Authenticator::load_or_create(
            &config.data_dir,
            tokens.clone(),
            access_metrics.clone(),
        )?);

        let store_config = config.store_config();
        let (store, recovered) = tokio::task::spawn_blocking(move || Store::open(store_config))
            .await?
            .context("cannot open the store")?;
        tracing::info!(
            devices = recovered.devices.len(),
            replayed_readings = recovered.replayed_readings,
            "store opened"
        );

        // A cluster gateway hands accepted readings to Kafka instead of the local WAL, and
        // security events to the events topic instead of a local detector.
        let gateway = config.cluster.role == Role::Gateway;
        let cluster_metrics = ClusterMetrics::default();
        let mut cluster = ClusterParts::default();
        let (wal, recovered) = if gateway {
            let (wal, log) = vigil_store::shared::external_log(config.store.queue_capacity);
            cluster.publisher = Some(
                ReadingPublisher::start(&config.cluster, log, cluster_metrics.clone())
                    .context("cannot start the Kafka publisher")?,
            );
            let recovered = vigil_store::RecoveredState {
                partial: true,
                ..vigil_store::RecoveredState::default()
            };
            (wal, recovered)
        } else {
            (store.wal_sender(), recovered)
        };
        let (observations, observed) = observation_queue(config.detect.queue_capacity);
        let observed = if gateway {
            cluster.forwarder = Some(
                EventForwarder::start(&config.cluster, observed, cluster_metrics.clone())
                    .context("cannot start the Kafka events forwarder")?,
            );
            // The gateway's detector sees nothing: detect workers do the detecting.
            observation_queue(1).1
        } else {
            observed
        };
        let ingest = Arc::new(
            Ingest::start(
                &config.ingest,
                &config.data_dir,
                recovered,
                wal,
                observations.clone(),
            )
            .context("cannot start the MQTT gateway")?,
        );
        if gateway {
            let target = Arc::new(GatewayResponder {
                ingest: ingest.clone(),
            });
            cluster.replication = Some(
                RegistryReplication::start(
                    &config.cluster,
                    "gateway",
                    target,
                    cluster_metrics.clone(),
                )
                .context("cannot follow the cluster's device registry")?,
            );
        }
        let responder = Arc::new(GatewayResponder {
            ingest: ingest.clone(),
        });
        let (alerts, detector) = start_detector(config, observed, responder)?;

        let (registry, risks) = (ingest.registry.clone(), detector.clone());
        store.set_devices_source(Arc::new(move || devices_batch(&registry, &risks)));
        let alert_log = alerts.clone();
        store.set_alerts_source(Arc::new(move || alerts_batch(&alert_log)));

        let mut metrics = Registry::default();
        ingest.metrics.register(&mut metrics);
        store.register_metrics(&mut metrics);
        detector.metrics.register(&mut metrics);
        access_metrics.register(&mut metrics);
        if gateway {
            cluster_metrics.register(&mut metrics);
        }

        let grpc_tls = config.grpc_tls()?;
        let (stop, stopped) = watch::channel(false);
        let grpc_listener = TcpListener::bind(config.grpc_listen)
            .await
            .with_context(|| format!("cannot listen for gRPC on {}", config.grpc_listen))?;
        let http_listener = TcpListener::bind(config.http_listen)
            .await
            .with_context(|| format!("cannot listen for HTTP on {}", config.http_listen))?;
        let grpc_address = grpc_listener.local_addr()?;
        let http_address = http_listener.local_addr()?;

        let metrics_authenticator = config.metrics_require_token.then(|| auth.clone());
        let grpc_services = GrpcServices {
            auth,
            admin: AdminService::new(ingest.clone(), detector.clone(), observations, tokens),
            soc: SocService::new(alerts),
            store: store.clone(),
        };
        let grpc = match grpc_tls {
            Some(tls) => {
                let incoming = crate::grpc_tls::incoming(grpc_listener, tls, access_metrics);
                tokio::spawn(grpc_services.serve(incoming, wait_for_stop(stopped.clone())))
            }
            None => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
                tokio::spawn(grpc_services.serve(incoming, wait_for_stop(stopped.clone())))
            }
        };
        let mut tasks = vec![grpc];
        // A gateway's detector sees nothing, so it has no model to train.
        if !gateway {
            tasks.push(tokio::spawn(retrain_fleet_model(
                store.clone(),
                detector.clone(),
                config.detect.fleet.clone(),
                wait_for_stop(stopped.clone()),
            )));
        }
        tasks.push(spawn_http(
            http_listener,
            metrics,
            metrics_authenticator,
            stopped,
        ));
        tracing::info!(
            %grpc_address,
            grpc_tls = config.grpc_tls_cert_path.is_some(),
            %http_address,
            "grpc and http listeners started"
        );

        Ok(Self {
            mqtt_address: ingest.mqtt_address(),
            store,
            ingest,
            _detector: detector,
            grpc_address,
            http_address,
            stop,
            tasks,
            cluster,
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
        let cluster = self.cluster;
        let _ = tokio::task::spawn_blocking(move || cluster.stop()).await;
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.shutdown()).await;
        tracing::info!("server stopped");
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `stopped` says stop.
pub(crate) fn spawn_http(
    listener: TcpListener,
    metrics: Registry,
    authenticator: Option<Arc<Authenticator>>,
    stopped: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let served = crate::http::serve(
            listener,
            Arc::new(metrics),
            authenticator,
            wait_for_stop(stopped),
        )
        .await;
        if let Err(error) = served {
            tracing::error!(%error, "http listener failed");
        }
    })
}

pub(crate) async fn wait_for_stop(mut stopped: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Opens the alert log of the data directory and starts the detector over `observed`.
pub(crate) fn start_detector(
    config: &VigilConfig,
    observed: vigil_detect::events::ObservationReceiver,
    responder: Arc<dyn Responder>,
) -> anyhow::Result<(AlertLog, Arc<Detector>)> {
    let alerts = AlertLog::open(&config.data_dir, config.detect.max_alerts_in_memory)
        .context("cannot open the alert log")?;
    let detector = Detector::start(config.detect.clone(), alerts.clone(), observed, responder)
        .context("cannot start the detector")?;
    Ok((alerts, Arc::new(detector)))
}

/// The services of the gRPC port.
struct GrpcServices {
    auth: Arc<Authenticator>,
    admin: AdminService,
    soc: SocService,
    store: Store,
}

impl GrpcServices {
    /// Serves the connections of `incoming` (plain TCP, or TLS after its handshake) until
    /// `shutdown` resolves.
    async fn serve<S, IO, E>(
        self,
        incoming: S,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) where
        S: futures::Stream<Item = Result<IO, E>> + Send + 'static,
        IO: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + tonic::transport::server::Connected
            + Unpin
            + Send
            + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let admin =
            DeviceAdminServer::new(self.admin).max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES);

        // One layer in front of every service: each call's token and role are checked by its
        // gRPC path before any service sees it.
        let served = tonic::transport::Server::builder()
            .layer(AuthLayer::new(self.auth))
            .add_service(admin)
            .add_service(SocServer::new(self.soc))
            .add_service(vigil_store::flight_sql_service(self.store))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "grpc listener failed");
        }
    }
}

/// The detector's hands on the gateway and the registry.
struct GatewayResponder {
    ingest: Arc<Ingest>,
}

impl Responder for GatewayResponder {
    fn device_class(&self, device_id: &str) -> Option<Arc<str>> {
        self.ingest
            .registry
            .get(device_id)
            .map(|entry| entry.class.clone())
    }

    fn is_quarantined(&self, device_id: &str) -> bool {
        self.ingest
            .registry
            .get(device_id)
            .is_some_and(|entry| entry.status() == DeviceStatus::Quarantined)
    }

    fn quarantine(&self, device_id: &str, reason: &str) -> bool {
        match self.ingest.quarantine(device_id, reason) {
            Ok(entry) => entry.is_some(),
            Err(error) => {
                tracing::error!(device_id, %error, "cannot record a quarantine");
                false
            }
        }
    }

    fn set_suspect(&self, device_id: &str, suspect: bool) {
        if let Err(error) = self.ingest.set_suspect(device_id, suspect) {
            tracing::error!(device_id, %error, "cannot record a device's suspicion");
        }
    }

    fn throttle_peer(&self, peer: &str, duration: Duration) {
        self.ingest.throttle.throttle(peer, duration);
    }
}

/// A gateway takes on statuses decided elsewhere in the cluster as an operator's would be:
/// a quarantine closes the device's session.
impl StatusTarget for GatewayResponder {
    fn registry(&self) -> &DeviceRegistry {
        &self.ingest.registry
    }

    fn apply_status(&self, device_id: &str, status: DeviceStatus) {
        let applied = match status {
            DeviceStatus::Quarantined => self
                .ingest
                .quarantine(device_id, "quarantined by the cluster")
                .map(drop),
            DeviceStatus::Active => self.ingest.release(device_id).map(drop),
            DeviceStatus::Suspect => self.ingest.set_suspect(device_id, true),
        };
        if let Err(error) = applied {
            tracing::error!(device_id, %error, "cannot take on a device status from the cluster");
        }
    }
}

/// Retrains the fleet model from stored history on a schedule, from the readings of devices
/// that are `active`. The first training waits for enough history (one interval).
pub(crate) async fn retrain_fleet_model(
    store: Store,
    detector: Arc<Detector>,
    config: vigil_detect::fleet::FleetConfig,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let interval = Duration::from_secs(config.retrain_interval_s.max(1));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match train_fleet_model(&store, &config).await {
            Ok(model) => {
                tracing::info!(models = model.len(), "fleet model retrained");
                detector.set_fleet_model(model);
            }
            Err(error) => tracing::warn!(%error, "fleet model not retrained"),
        }
    }
}

/// Queries the training history and fits one model per (class, metric).
pub(crate) async fn train_fleet_model(
    store: &Store,
    config: &vigil_detect::fleet::FleetConfig,
) -> anyhow::Result<FleetModel> {
    let query = format!(
        "SELECT r.device_id, d.class, r.metric, r.value FROM readings r \
         JOIN devices d ON r.device_id = d.device_id \
         WHERE d.status = 'active' AND r.received_at > now() - INTERVAL '{} minutes' \
         ORDER BY r.device_id, r.metric, r.seq",
        config.training_history_min.max(1)
    );
    let batches = store.sql(&query).await?;

    let mut series: HashMap<(String, String), Vec<Vec<f64>>> = HashMap::new();
    let mut current: Option<(String, String, String)> = None;
    for batch in &batches {
        let column = |index: usize| batch.column(index).as_any();
        let (Some(devices), Some(classes), Some(metrics), Some(values)) = (
            column(0).downcast_ref::<StringArray>(),
            column(1).downcast_ref::<StringArray>(),
            column(2).downcast_ref::<StringArray>(),
            column(3).downcast_ref::<Float64Array>(),
        ) else {
            anyhow::bail!("unexpected column types in the training query");
        };
        for row in 0..batch.num_rows() {
            let key = (devices.value(row), classes.value(row), metrics.value(row));
            let same = current
                .as_ref()
                .is_some_and(|(d, c, m)| (d.as_str(), c.as_str(), m.as_str()) == key);
            let per_device = series
                .entry((key.1.to_owned(), key.2.to_owned()))
                .or_default();
            if !same {
                per_device.push(Vec::new());
                current = Some((key.0.to_owned(), key.1.to_owned(), key.2.to_owned()));
            }
            if let Some(values_of_device) = per_device.last_mut() {
                values_of_device.push(values.value(row));
            }
        }
    }
    let config = config.clone();
    Ok(tokio::task::spawn_blocking(move || FleetModel::train(&series, &config)).await?)
}

/// The `alerts` table, built from the alert log at query time.
pub(crate) fn alerts_batch(log: &AlertLog) -> RecordBatch {
    let alerts = log.all();
    let text = |f: &dyn Fn(&vigil_detect::alerts::Alert) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(alerts.iter().map(f)))
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(
            alerts.iter().map(|a| a.alert_id),
        )),
        text(&|a| a.device_id.clone()),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(alerts.iter().map(|a| a.raised_at_ms))
                .with_timezone("UTC"),
        ),
        text(&|a| a.detector.clone()),
        text(&|a| a.severity.as_str().to_owned()),
        Arc::new(Float64Array::from_iter_values(
            alerts.iter().map(|a| a.score),
        )),
        text(&|a| a.summary.clone()),
        text(&|a| a.action.as_str().to_owned()),
        text(&|a| serde_json::to_string(&a.evidence).unwrap_or_default()),
        Arc::new(BooleanArray::from(
            alerts.iter().map(|a| a.acknowledged).collect::<Vec<_>>(),
        )),
        text(&|a| a.device_class.clone()),
    ];
    RecordBatch::try_new(Store::alerts_schema(), columns)
        .unwrap_or_else(|_| RecordBatch::new_empty(Store::alerts_schema()))
}

/// The `devices` table, built from the registry at query time.
pub(crate) fn devices_batch(registry: &DeviceRegistry, detector: &Detector) -> RecordBatch {
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
        Arc::new(Float64Array::from_iter_values(
            devices.iter().map(|d| detector.risk_of(&d.id)),
        )),
    ];
    RecordBatch::try_new(Store::devices_schema(), columns)
        .unwrap_or_else(|_| RecordBatch::new_empty(Store::devices_schema()))
}
