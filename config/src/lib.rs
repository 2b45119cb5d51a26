//! The shape of vigil's configuration file (documented in `deploy/vigil.toml`): every section
//! with its defaults, parsed from TOML with unknown fields refused. The crates that act on a
//! section check what only they can check (files, addresses, sizes against each other) when
//! they start.
//!
//! A crate of its own, free of the SQL engine, so that the whole file's parser can be fuzzed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
pub use vigil_detect::DetectConfig;

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

/// Everything `vigil run` needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VigilConfig {
    /// Directory of the registry, write-ahead log, Parquet tables and admin token.
    pub data_dir: PathBuf,
    /// Address of the gRPC listener: device administration and Flight SQL.
    pub grpc_listen: SocketAddr,
    /// PEM certificate chain for TLS on the gRPC port; with `grpc_tls_key_path`, the port
    /// speaks only TLS and clients connect with `https://`.
    pub grpc_tls_cert_path: Option<PathBuf>,
    /// PEM private key of the gRPC certificate.
    pub grpc_tls_key_path: Option<PathBuf>,
    /// Accept plaintext gRPC on a non-loopback address. Off by default: bearer tokens and query
    /// results would cross the network in the clear.
    pub grpc_allow_plaintext: bool,
    /// Address of the HTTP listener: `/metrics` and `/healthz`.
    pub http_listen: SocketAddr,
    /// Ask for `Authorization: Bearer <token>` of a `metrics` or `admin` token on `/metrics`;
    /// `/healthz` stays open.
    pub metrics_require_token: bool,
    /// Log format: `text` or `json`.
    pub log_format: String,
    /// The MQTT gateway and verifier.
    pub ingest: IngestConfig,
    /// The write-ahead log, hot tier and Parquet files.
    pub store: StoreSettings,
    /// Detection, risk, response policy per device class, and the fleet model.
    pub detect: DetectConfig,
    /// Which stages this process runs, and the Kafka cluster that joins them.
    pub cluster: ClusterConfig,
}

/// The stages a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every stage in one process, joined by in-process queues; no Kafka.
    #[default]
    All,
    /// MQTT, logins, ACL and verification; accepted readings and security events go to Kafka.
    Gateway,
    /// Consumes readings from Kafka into Parquet files in the shared tables directory.
    Store,
    /// Consumes readings and security events from Kafka into the detectors.
    Detect,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Gateway => "gateway",
            Role::Store => "store",
            Role::Detect => "detect",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "all" => Ok(Role::All),
            "gateway" => Ok(Role::Gateway),
            "store" => Ok(Role::Store),
            "detect" => Ok(Role::Detect),
            other => Err(format!(
                "unknown role `{other}`: expected all, gateway, store or detect"
            )),
        }
    }
}

/// How the processes of a cluster find each other. Unused by `role = "all"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    pub role: Role,
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Prefix of the topic names (`<prefix>readings`, `<prefix>events`, `<prefix>devices`)
    /// and of the consumer group names.
    pub topic_prefix: String,
    /// Partitions of the readings and events topics when vigil creates them: the most store
    /// or detect workers that can share the work.
    pub partitions: i32,
    /// Replication factor of the topics vigil creates.
    pub replication_factor: i32,
    /// The tables directory shared by every node (a shared file system mount): store workers
    /// write Parquet files into it, and every node's SQL reads it.
    pub shared_dir: PathBuf,
    /// A store worker writes its buffered readings to a Parquet file when the oldest is this
    /// old, in milliseconds: how long until a reading is visible to SQL.
    pub flush_interval_ms: u64,
    /// ... or when it buffers this many readings.
    pub flush_max_readings: usize,
    /// How often local changes of the device registry (enrollments, quarantines) are
    /// published to the devices topic, in milliseconds.
    pub registry_publish_ms: u64,
    /// Longest a gateway waits for Kafka to take a reading before it gives up on it (the
    /// device gets no PUBACK and sends it again), in milliseconds.
    pub produce_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            role: Role::All,
            brokers: "127.0.0.1:9092".to_owned(),
            topic_prefix: "vigil.".to_owned(),
            partitions: 12,
            replication_factor: 1,
            shared_dir: PathBuf::from("./vigil-shared"),
            flush_interval_ms: 1_000,
            flush_max_readings: 100_000,
            registry_publish_ms: 100,
            produce_timeout_ms: 30_000,
        }
    }
}

/// Storage settings as written in the file; the data directory comes from the top level.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// Roll to a new write-ahead log segment past this size, in bytes.
    pub wal_segment_bytes: u64,
    /// Most entries in one group commit (one fsync).
    pub wal_max_group_entries: usize,
    /// Entries queued for the write-ahead log before devices are slowed down.
    pub queue_capacity: usize,
    /// Flush recent readings to Parquet when the oldest is this old, in milliseconds.
    pub flush_interval_ms: u64,
    /// ... or when this many rows are held in memory.
    pub flush_max_rows: usize,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            wal_segment_bytes: 64 * 1024 * 1024,
            wal_max_group_entries: 4096,
            queue_capacity: 16384,
            flush_interval_ms: 60_000,
            flush_max_rows: 500_000,
        }
    }
}

impl Default for VigilConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./vigil-data"),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            grpc_tls_cert_path: None,
            grpc_tls_key_path: None,
            grpc_allow_plaintext: false,
            http_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            metrics_require_token: false,
            log_format: "text".to_owned(),
            ingest: IngestConfig::default(),
            store: StoreSettings::default(),
            detect: DetectConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

/// Settings of the MQTT gateway and the verifier.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Address of the MQTT listener (v3.1.1 and v5 on one port).
    pub mqtt_listen: SocketAddr,
    /// PEM certificate chain for MQTT over TLS; with `tls_key_path`, enables `mqtt_tls_listen`.
    pub tls_cert_path: Option<PathBuf>,
    /// PEM private key of the certificate.
    pub tls_key_path: Option<PathBuf>,
    /// Address of the MQTT over TLS listener, used when a certificate is configured.
    pub mqtt_tls_listen: SocketAddr,
    /// Accept plaintext MQTT on a non-loopback address. Off by default: login tokens and
    /// readings would cross the network in the clear.
    pub allow_plaintext: bool,
    /// Largest accepted reading payload, in bytes; larger ones are refused as `oversized`.
    pub max_payload_bytes: usize,
    /// Seconds a new connection has to send its CONNECT before it is dropped.
    pub connect_timeout_s: u16,
    /// Longest keep-alive granted to a device, in seconds.
    pub max_keep_alive_s: u16,
    /// Unacknowledged QoS 1 publishes allowed per connection (the MQTT receive maximum).
    pub max_inflight_per_device: u16,
    /// Longest lifetime a login token may claim, in seconds from now.
    pub max_token_lifetime_s: u64,
    /// Largest allowed distance between a reading's sampling time and the server clock, in ms.
    pub max_clock_skew_ms: i64,
    /// Largest allowed jump of `seq` above the highest stored one.
    pub max_seq_jump: u64,
    /// Verifier threads; 0 means one per CPU core.
    pub verifier_threads: usize,
    /// Most signatures verified in one batch.
    pub verifier_max_batch: usize,
    /// Readings queued per verifier thread before devices are slowed down.
    pub verifier_queue_capacity: usize,
    /// MQTT worker threads; 0 means one per CPU core.
    pub mqtt_workers: usize,
    /// Most bytes held for readings whose PUBACK is not decided yet (payload plus a fixed
    /// overhead each), across all devices: the server's memory bound for readings in flight.
    pub max_pending_bytes: usize,
    /// Longest a reading waits for room (its share of `max_pending_bytes`, a verifier queue
    /// slot) before it is shed as `overloaded`; new logins are refused as "server unavailable"
    /// for as long again after the last shed reading.
    pub overload_wait_ms: u64,
    /// Most concurrent MQTT connections (plain and TLS together); beyond it, new connections
    /// wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            mqtt_listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            tls_cert_path: None,
            tls_key_path: None,
            mqtt_tls_listen: SocketAddr::from(([127, 0, 0, 1], 8883)),
            allow_plaintext: false,
            max_payload_bytes: 4096,
            connect_timeout_s: 5,
            max_keep_alive_s: 300,
            max_inflight_per_device: 32,
            max_token_lifetime_s: 900,
            max_clock_skew_ms: 300_000,
            max_seq_jump: 1_000_000,
            verifier_threads: 0,
            verifier_max_batch: 512,
            verifier_queue_capacity: 8192,
            mqtt_workers: 0,
            max_pending_bytes: 64 << 20,
            overload_wait_ms: 5_000,
            max_connections: 20_000,
        }
    }
}

impl VigilConfig {
    /// Parses a configuration from TOML text; missing fields take their defaults, unknown
    /// fields are refused.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused() {
        assert!(VigilConfig::parse("mqtt_port = 1").is_err());
        assert!(VigilConfig::parse("[ingest]\nmax_payload = 1").is_err());
        assert!(VigilConfig::parse("[store]\nqueue = 1").is_err());
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        let parsed = VigilConfig::parse("").unwrap();
        let defaults = VigilConfig::default();
        assert_eq!(parsed.ingest.mqtt_listen, defaults.ingest.mqtt_listen);
        assert_eq!(parsed.store.queue_capacity, defaults.store.queue_capacity);
        assert_eq!(parsed.data_dir, defaults.data_dir);
    }
}
