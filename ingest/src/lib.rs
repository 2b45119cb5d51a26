//! The device-facing half of vigil: the MQTT gateway, the device registry and login tokens,
//! the topic ACL, batch signature verification, the replay guard and the cut-off of devices.
//!
//! In: MQTT connections from devices. Out: verified readings and refusal records, handed to
//! the store's write-ahead log; a PUBACK goes back to the device once the log has them.

pub mod arrival;
pub mod gateway;
pub mod guard;
pub mod login;
pub mod metrics;
pub mod nonces;
pub mod overload;
pub mod payload;
pub mod reasons;
pub mod recorder;
pub mod registry;
pub mod sessions;
pub mod throttle;
pub mod tls;
pub mod verifier;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use vigil_detect::ObservationSender;
use vigil_store::{RecoveredState, WalSender};

use crate::gateway::{GatewayContext, GatewaySettings};
use crate::login::LoginChecker;
use crate::metrics::IngestMetrics;
use crate::nonces::NonceCache;
use crate::overload::PendingBudget;
use crate::recorder::RejectionRecorder;
use crate::registry::{DeviceEntry, DeviceRegistry, DeviceStatus};
use crate::sessions::{CloseOrder, SessionTable};
use crate::throttle::PeerThrottle;
use crate::verifier::{VerifierPool, VerifierSettings};

/// Errors of the ingest side; each names what an operator needs to act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("device {device_id} cannot be enrolled: {reason}")]
    InvalidEnrollment { device_id: String, reason: String },
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("cannot listen for MQTT on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "MQTT listener {address} is not loopback and no TLS certificate is configured; \
         set `allow_plaintext = true` to accept plaintext logins from the network"
    )]
    PlaintextRefused { address: SocketAddr },
    #[error("invalid setting `{setting}`: {reason}")]
    Config {
        setting: &'static str,
        reason: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub use vigil_config::IngestConfig;

/// The running ingest side.
#[derive(Debug)]
pub struct Ingest {
    pub registry: Arc<DeviceRegistry>,
    pub sessions: Arc<SessionTable>,
    pub metrics: Arc<IngestMetrics>,
    /// Peers whose logins are refused unchecked for a while.
    pub throttle: Arc<PeerThrottle>,
    mqtt_address: SocketAddr,
    mqtt_tls_address: Option<SocketAddr>,
    /// The ntex server handle is not `Sync`; the lock makes `Ingest` shareable.
    mqtt_server: parking_lot::Mutex<ntex::server::Server>,
}

impl Ingest {
    /// Opens the registry and nonce cache under `data_dir`, starts the verifier threads with
    /// the recovered replay-guard state, and starts the MQTT listener. Accepted readings and
    /// security events go to `observations`.
    pub fn start(
        config: &IngestConfig,
        data_dir: &Path,
        recovered: RecoveredState,
        wal: WalSender,
        observations: ObservationSender,
    ) -> Result<Self> {
        let cores = thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let metrics = Arc::new(IngestMetrics::new());
        let registry = Arc::new(DeviceRegistry::open(data_dir)?);
        let nonces = NonceCache::open(data_dir, now_unix_s())?;
        let sessions = Arc::new(SessionTable::default());
        let throttle = Arc::new(PeerThrottle::default());

        let verifier = VerifierPool::start(
            &VerifierSettings {
                threads: if config.verifier_threads == 0 {
                    cores
                } else {
                    config.verifier_threads
                },
                max_batch: config.verifier_max_batch,
                queue_capacity: config.verifier_queue_capacity,
                max_seq_jump: config.max_seq_jump,
            },
            recovered,
            wal.clone(),
            metrics.clone(),
            observations.clone(),
        )?;
        let recorder = RejectionRecorder::start(wal, 16_384, metrics.clone())?;
        if config.max_pending_bytes < config.max_payload_bytes + overload::READING_OVERHEAD_BYTES
            || config.max_pending_bytes > PendingBudget::MAX_LIMIT_BYTES
        {
            return Err(Error::Config {
                setting: "max_pending_bytes",
                reason: format!(
                    "must hold at least one largest reading ({} bytes) and at most {} bytes",
                    config.max_payload_bytes + overload::READING_OVERHEAD_BYTES,
                    PendingBudget::MAX_LIMIT_BYTES
                ),
            });
        }
        if config.max_connections == 0 {
            return Err(Error::Config {
                setting: "max_connections",
                reason: "must be at least 1".to_owned(),
            });
        }
        metrics
            .pending_bytes_limit
            .set(config.max_pending_bytes as i64);
        let pending = PendingBudget::new(
            config.max_pending_bytes,
            std::time::Duration::from_millis(config.overload_wait_ms),
            metrics.pending_bytes.clone(),
        );

        let settings = GatewaySettings {
            max_payload_bytes: config.max_payload_bytes,
            connect_timeout_s: config.connect_timeout_s.max(1),
            max_keep_alive_s: config.max_keep_alive_s.max(1),
            max_inflight_per_device: config.max_inflight_per_device.max(1),
            max_clock_skew_ms: config.max_clock_skew_ms,
        };
        let context = Arc::new(GatewayContext {
            settings,
            logins: LoginChecker::new(registry.clone(), nonces, config.max_token_lifetime_s),
            verifier,
            sessions: sessions.clone(),
            recorder,
            metrics: metrics.clone(),
            observations,
            throttle: throttle.clone(),
            pending,
        });

        if !config.mqtt_listen.ip().is_loopback() && !config.allow_plaintext {
            return Err(Error::PlaintextRefused {
                address: config.mqtt_listen,
            });
        }
        let listener = TcpListener::bind(config.mqtt_listen).map_err(|source| Error::Listen {
            address: config.mqtt_listen,
            source,
        })?;
        let mqtt_address = listener.local_addr().map_err(|source| Error::Listen {
            address: config.mqtt_listen,
            source,
        })?;
        let tls = match (&config.tls_cert_path, &config.tls_key_path) {
            (Some(cert), Some(key)) => {
                let tls_config = tls::server_config(cert, key)?;
                let tls_listener =
                    TcpListener::bind(config.mqtt_tls_listen).map_err(|source| Error::Listen {
                        address: config.mqtt_tls_listen,
                        source,
                    })?;
                Some((tls_listener, tls_config))
            }
            (None, None) => None,
            _ => {
                return Err(Error::Config {
                    setting: "tls_cert_path",
                    reason: "tls_cert_path and tls_key_path go together".to_owned(),
                });
            }
        };
        let mqtt_tls_address = match &tls {
            Some((tls_listener, _)) => {
                Some(tls_listener.local_addr().map_err(|source| Error::Listen {
                    address: config.mqtt_tls_listen,
                    source,
                })?)
            }
            None => None,
        };
        let workers = if config.mqtt_workers == 0 {
            cores
        } else {
            config.mqtt_workers
        };
        let max_connections_per_worker = config.max_connections.div_ceil(workers).max(1);
        let mqtt_server = start_mqtt(listener, tls, workers, max_connections_per_worker, context)?;
        tracing::info!(
            address = %mqtt_address,
            tls_address = ?mqtt_tls_address,
            workers,
            "mqtt listeners started"
        );

        let mqtt_server = parking_lot::Mutex::new(mqtt_server);
        Ok(Self {
            registry,
            sessions,
            metrics,
            throttle,
            mqtt_address,
            mqtt_tls_address,
            mqtt_server,
        })
    }

    /// The address the MQTT listener is bound to.
    pub fn mqtt_address(&self) -> SocketAddr {
        self.mqtt_address
    }

    /// The address of the MQTT over TLS listener, when a certificate is configured.
    pub fn mqtt_tls_address(&self) -> Option<SocketAddr> {
        self.mqtt_tls_address
    }

    /// Quarantines a device: durable status first, then its live session is closed after a
    /// notice. Returns `None` for an unknown device.
    pub fn quarantine(&self, device_id: &str, reason: &str) -> Result<Option<Arc<DeviceEntry>>> {
        let entry = self
            .registry
            .set_status(device_id, DeviceStatus::Quarantined)?;
        if entry.is_some() {
            let closed = self.sessions.close(
                device_id,
                CloseOrder::Quarantined {
                    reason: reason.to_owned(),
                },
            );
            tracing::info!(
                device_id,
                reason,
                session_closed = closed,
                "device quarantined"
            );
        }
        Ok(entry)
    }

    /// Marks a device suspect, or active again; a quarantined device stays quarantined.
    pub fn set_suspect(&self, device_id: &str, suspect: bool) -> Result<()> {
        let next = if suspect {
            DeviceStatus::Suspect
        } else {
            DeviceStatus::Active
        };
        self.registry.set_status_if(device_id, next, |current| {
            current != DeviceStatus::Quarantined
        })?;
        Ok(())
    }

    /// Restores a device's logins.
    pub fn release(&self, device_id: &str) -> Result<Option<Arc<DeviceEntry>>> {
        let entry = self.registry.set_status(device_id, DeviceStatus::Active)?;
        if entry.is_some() {
            tracing::info!(device_id, "device released");
        }
        Ok(entry)
    }

    /// Stops accepting connections and closes the live ones.
    pub async fn stop(&self) {
        let server = self.mqtt_server.lock().clone();
        server.stop(false).await;
    }
}

/// Runs the ntex MQTT server on its own threads and returns its control handle.
fn start_mqtt(
    listener: TcpListener,
    tls: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    workers: usize,
    max_connections_per_worker: usize,
    context: Arc<GatewayContext>,
) -> Result<ntex::server::Server> {
    let (started, server) = std::sync::mpsc::channel();
    let config = gateway::mqtt_config(&context.settings).build();

    thread::Builder::new()
        .name("vigil-mqtt".into())
        .spawn(move || {
            let system = ntex::rt::System::new("vigil-mqtt", ntex::rt::DefaultRuntime);
            system.block_on(async move {
                let plain_context = context.clone();
                let mut built = ntex::server::build()
                    .workers(workers)
                    .maxconn(max_connections_per_worker)
                    .disable_signals()
                    .listen("mqtt", listener, async move |_| {
                        gateway::mqtt_service(plain_context.clone())
                    })
                    .map(|builder| builder.config("mqtt", config.clone()));
                if let (Ok(builder), Some((tls_listener, tls_config))) = (&mut built, tls) {
                    let with_tls = std::mem::replace(builder, ntex::server::build())
                        .listen("mqtts", tls_listener, async move |_| {
                            ntex::service::chain_factory(tls::acceptor(tls_config.clone()))
                                .and_then(gateway::mqtt_service(context.clone()))
                        })
                        .map(|builder| builder.config("mqtts", config));
                    match with_tls {
                        Ok(with_tls) => *builder = with_tls,
                        Err(error) => built = Err(error),
                    }
                }
                let built = built.map(|builder| builder.run());
                match built {
                    Ok(server) => {
                        // The receiver only goes away if start-up was abandoned.
                        let _ = started.send(Ok(server.clone()));
                        let _ = server.await;
                    }
                    Err(error) => {
                        let _ = started.send(Err(error));
                    }
                }
            });
        })
        .map_err(|source| Error::Thread {
            name: "mqtt",
            source,
        })?;

    match server.recv() {
        Ok(Ok(server)) => Ok(server),
        Ok(Err(source)) => Err(Error::Thread {
            name: "mqtt",
            source,
        }),
        Err(_) => Err(Error::Thread {
            name: "mqtt",
            source: std::io::Error::other("mqtt thread ended during start-up"),
        }),
    }
}

/// Milliseconds since the Unix epoch, by the server's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch, by the server's clock.
pub fn now_unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
