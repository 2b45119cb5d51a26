//! Wiring of the cluster's worker processes: `--role store` (readings from Kafka into the
//! shared Parquet tables) and `--role detect` (detectors fed from Kafka, the SOC's alerts).
//! The gateway role is a one-process server whose durable log is Kafka (see `server`).
//!
//! Every worker also serves SQL over Flight on its gRPC port, reading the shared tables, and
//! its metrics over HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vigil_cluster::detect_feed::DetectFeed;
use vigil_cluster::metrics::ClusterMetrics;
use vigil_cluster::registry::{RegistryReplication, StatusTarget};
use vigil_cluster::store_worker::StoreWorker;
use vigil_config::Role;
use vigil_detect::events::Observation;
use vigil_detect::service::SocService;
use vigil_detect::{Detector, ObservationSender, Responder, observation_queue};
use vigil_ingest::registry::{DeviceRegistry, DeviceStatus};
use vigil_proto::v1::soc_server::SocServer;
use vigil_store::Store;

use crate::auth::{AuthLayer, Authenticator};
use crate::config::{ServerConfig as _, VigilConfig};
use crate::metrics::AccessMetrics;
use crate::server::{
    alerts_batch, devices_batch, retrain_fleet_model, spawn_http, start_detector, wait_for_stop,
};
use crate::tokens::TokenStore;

/// A running store or detect worker.
#[derive(Debug)]
pub(crate) struct RunningWorker {
    pub(crate) grpc_address: SocketAddr,
    pub(crate) http_address: SocketAddr,
    store: Store,
    store_worker: Option<StoreWorker>,
    feed: Option<DetectFeed>,
    replication: Option<RegistryReplication>,
    /// Held so that the detector's thread lives as long as the worker.
    _detector: Option<Arc<Detector>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningWorker {
    pub(crate) async fn start(config: &VigilConfig) -> anyhow::Result<Self> {
        let role = config.cluster.role;
        let access_metrics = Arc::new(AccessMetrics::new());
        let tokens = Arc::new(TokenStore::open(&config.data_dir)?);
        let auth = Arc::new(Authenticator::load_or_create(
            &config.data_dir,
            tokens,
            access_metrics.clone(),
        )?);
        let store_config = config.store_config();
        let (store, _) = tokio::task::spawn_blocking(move || Store::open(store_config))
            .await?
            .context("cannot open the store")?;
        let cluster_metrics = ClusterMetrics::default();
        let mut metrics = Registry::default();
        store.register_metrics(&mut metrics);
        cluster_metrics.register(&mut metrics);
        access_metrics.register(&mut metrics);

        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut worker = Self {
            grpc_address: config.grpc_listen,
            http_address: config.http_listen,
            store: store.clone(),
            store_worker: None,
            feed: None,
            replication: None,
            _detector: None,
            stop,
            tasks: Vec::new(),
        };
        let mut soc = None;
        match role {
            Role::Store => {
                worker.store_worker = Some(
                    StoreWorker::start(&config.cluster, cluster_metrics)
                        .context("cannot start the store worker")?,
                );
            }
            Role::Detect => {
                let registry = Arc::new(DeviceRegistry::open(&config.data_dir)?);
                let (observations, observed) = observation_queue(config.detect.queue_capacity);
                worker.replication = Some(
                    RegistryReplication::start(
                        &config.cluster,
                        "detect",
                        Arc::new(DetectStatusTarget {
                            registry: registry.clone(),
                            observations: observations.clone(),
                        }),
                        cluster_metrics.clone(),
                    )
                    .context("cannot follow the cluster's device registry")?,
                );
                let responder = Arc::new(RegistryResponder {
                    registry: registry.clone(),
                });
                let (alerts, detector) = start_detector(config, observed, responder)?;
                detector.metrics.register(&mut metrics);
                worker.feed = Some(
                    DetectFeed::start(
                        &config.cluster,
                        registry.clone(),
                        observations,
                        cluster_metrics,
                    )
                    .context("cannot start the detect feed")?,
                );
                let risks = detector.clone();
                store.set_devices_source(Arc::new(move || devices_batch(&registry, &risks)));
                let alert_log = alerts.clone();
                store.set_alerts_source(Arc::new(move || alerts_batch(&alert_log)));
                tasks.push(tokio::spawn(retrain_fleet_model(
                    store.clone(),
                    detector.clone(),
                    config.detect.fleet.clone(),
                    wait_for_stop(stopped.clone()),
                )));
                soc = Some(SocService::new(alerts));
                worker._detector = Some(detector);
            }
            Role::All | Role::Gateway => {
                anyhow::bail!("role {} is not a worker role", role.as_str())
            }
        }

        let grpc_listener = TcpListener::bind(config.grpc_listen)
            .await
            .with_context(|| format!("cannot listen for gRPC on {}", config.grpc_listen))?;
        let http_listener = TcpListener::bind(config.http_listen)
            .await
            .with_context(|| format!("cannot listen for HTTP on {}", config.http_listen))?;
        worker.grpc_address = grpc_listener.local_addr()?;
        worker.http_address = http_listener.local_addr()?;

        let grpc_tls = config.grpc_tls()?;
        let router = tonic::transport::Server::builder()
            .layer(AuthLayer::new(auth.clone()))
            .add_optional_service(soc.map(SocServer::new))
            .add_service(vigil_store::flight_sql_service(store.clone()));
        let shutdown = wait_for_stop(stopped.clone());
        tasks.push(match grpc_tls {
            Some(tls) => {
                let incoming = crate::grpc_tls::incoming(grpc_listener, tls, access_metrics);
                tokio::spawn(async move {
                    if let Err(error) = router
                        .serve_with_incoming_shutdown(incoming, shutdown)
                        .await
                    {
                        tracing::error!(%error, "grpc listener failed");
                    }
                })
            }
            None => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
                tokio::spawn(async move {
                    if let Err(error) = router
                        .serve_with_incoming_shutdown(incoming, shutdown)
                        .await
                    {
                        tracing::error!(%error, "grpc listener failed");
                    }
                })
            }
        });
        let metrics_authenticator = config.metrics_require_token.then(|| auth.clone());
        tasks.push(spawn_http(
            http_listener,
            metrics,
            metrics_authenticator,
            stopped,
        ));
        worker.tasks = tasks;
        Ok(worker)
    }

    /// Stores what is buffered (store role), stops following Kafka, then the listeners.
    pub(crate) async fn stop(self) {
        let (store_worker, feed, replication) = (self.store_worker, self.feed, self.replication);
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(worker) = store_worker {
                worker.stop();
            }
            if let Some(feed) = feed {
                feed.stop();
            }
            if let Some(replication) = replication {
                replication.stop();
            }
        })
        .await;
        let _ = self.stop.send(true);
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.shutdown()).await;
        tracing::info!("worker stopped");
    }
}

/// A detect worker takes on statuses decided elsewhere (an operator's release through a
/// gateway, another worker's quarantine) in its registry copy, and tells its detector of a
/// release, as an operator's release is told in one process.
struct DetectStatusTarget {
    registry: Arc<DeviceRegistry>,
    observations: ObservationSender,
}

impl StatusTarget for DetectStatusTarget {
    fn registry(&self) -> &DeviceRegistry {
        &self.registry
    }

    fn apply_status(&self, device_id: &str, status: DeviceStatus) {
        // Suspicion never lifts a quarantine, as in one process.
        let recorded = self.registry.set_status_if(device_id, status, |current| {
            status != DeviceStatus::Suspect || current != DeviceStatus::Quarantined
        });
        if let Err(error) = recorded {
            tracing::error!(device_id, %error, "cannot record a device's status");
            return;
        }
        // A release resets the device's risk; a quarantine needs no telling, the detector
        // reads it from the registry.
        if status == DeviceStatus::Active {
            self.observations.send_decision(Observation::StatusChanged {
                device_id: Arc::from(device_id),
                quarantined: false,
                reason: "released in the cluster".to_owned(),
            });
        }
    }
}

/// A detect worker's hands: the registry copy it shares with the cluster. A quarantine
/// recorded here is published to the devices topic, and every gateway cuts the device off.
struct RegistryResponder {
    registry: Arc<DeviceRegistry>,
}

impl Responder for RegistryResponder {
    fn device_class(&self, device_id: &str) -> Option<Arc<str>> {
        self.registry
            .get(device_id)
            .map(|entry| entry.class.clone())
    }

    fn is_quarantined(&self, device_id: &str) -> bool {
        self.registry
            .get(device_id)
            .is_some_and(|entry| entry.is_quarantined())
    }

    fn quarantine(&self, device_id: &str, reason: &str) -> bool {
        match self
            .registry
            .set_status(device_id, DeviceStatus::Quarantined)
        {
            Ok(entry) => {
                tracing::info!(device_id, reason, "device quarantined for the cluster");
                entry.is_some()
            }
            Err(error) => {
                tracing::error!(device_id, %error, "cannot record a quarantine");
                false
            }
        }
    }

    fn set_suspect(&self, device_id: &str, suspect: bool) {
        let next = if suspect {
            DeviceStatus::Suspect
        } else {
            DeviceStatus::Active
        };
        let result = self.registry.set_status_if(device_id, next, |current| {
            current != DeviceStatus::Quarantined
        });
        if let Err(error) = result {
            tracing::error!(device_id, %error, "cannot record a device's suspicion");
        }
    }

    fn throttle_peer(&self, peer: &str, duration: Duration) {
        // Throttling acts on a gateway's listener; a detect worker has none.
        tracing::info!(
            peer,
            seconds = duration.as_secs(),
            "a peer to throttle (gateways throttle on their own evidence)"
        );
    }
}
