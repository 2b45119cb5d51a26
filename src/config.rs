//! The server's configuration: a TOML file (documented in `deploy/vigil.toml`) with command-line
//! flags taking precedence.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::Deserialize;
use vigil_detect::DetectConfig;
use vigil_ingest::IngestConfig;
use vigil_store::StoreConfig;

/// Everything `vigil run` needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct VigilConfig {
    /// Directory of the registry, write-ahead log, Parquet tables and admin token.
    pub(crate) data_dir: PathBuf,
    /// Address of the gRPC listener: device administration and Flight SQL.
    pub(crate) grpc_listen: SocketAddr,
    /// PEM certificate chain for TLS on the gRPC port; with `grpc_tls_key_path`, the port
    /// speaks only TLS and clients connect with `https://`.
    pub(crate) grpc_tls_cert_path: Option<PathBuf>,
    /// PEM private key of the gRPC certificate.
    pub(crate) grpc_tls_key_path: Option<PathBuf>,
    /// Accept plaintext gRPC on a non-loopback address. Off by default: bearer tokens and query
    /// results would cross the network in the clear.
    pub(crate) grpc_allow_plaintext: bool,
    /// Address of the HTTP listener: `/metrics` and `/healthz`.
    pub(crate) http_listen: SocketAddr,
    /// Ask for `Authorization: Bearer <token>` of a `metrics` or `admin` token on `/metrics`;
    /// `/healthz` stays open.
    pub(crate) metrics_require_token: bool,
    /// Log format: `text` or `json`.
    pub(crate) log_format: String,
    /// The MQTT gateway and verifier.
    pub(crate) ingest: IngestConfig,
    /// The write-ahead log, hot tier and Parquet files.
    pub(crate) store: StoreSettings,
    /// Detection, risk, response policy per device class, and the fleet model.
    pub(crate) detect: DetectConfig,
}

/// Storage settings as written in the file; the data directory comes from the top level.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct StoreSettings {
    /// Roll to a new write-ahead log segment past this size, in bytes.
    pub(crate) wal_segment_bytes: u64,
    /// Most entries in one group commit (one fsync).
    pub(crate) wal_max_group_entries: usize,
    /// Entries queued for the write-ahead log before devices are slowed down.
    pub(crate) queue_capacity: usize,
    /// Flush recent readings to Parquet when the oldest is this old, in milliseconds.
    pub(crate) flush_interval_ms: u64,
    /// ... or when this many rows are held in memory.
    pub(crate) flush_max_rows: usize,
}

impl Default for StoreSettings {
    fn default() -> Self {
        let defaults = StoreConfig::default();
        Self {
            wal_segment_bytes: defaults.wal_segment_bytes,
            wal_max_group_entries: defaults.wal_max_group_entries,
            queue_capacity: defaults.queue_capacity,
            flush_interval_ms: defaults.flush_interval_ms,
            flush_max_rows: defaults.flush_max_rows,
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
        }
    }
}

impl VigilConfig {
    /// Reads a TOML file; missing fields take their defaults, unknown fields are refused.
    pub(crate) fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// The TLS configuration of the gRPC port, from its PEM files; `None` for plaintext, which
    /// is refused on a non-loopback address unless `grpc_allow_plaintext` is set.
    pub(crate) fn grpc_tls(&self) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
        match (&self.grpc_tls_cert_path, &self.grpc_tls_key_path) {
            (Some(cert), Some(key)) => crate::grpc_tls::server_config(cert, key).map(Some),
            (None, None) if !self.grpc_listen.ip().is_loopback() && !self.grpc_allow_plaintext => {
                bail!(
                    "gRPC listener {} is not loopback and no TLS certificate is configured \
                     (grpc_tls_cert_path, grpc_tls_key_path); set `grpc_allow_plaintext = true` \
                     to send bearer tokens over the network in the clear",
                    self.grpc_listen
                )
            }
            (None, None) => Ok(None),
            _ => bail!("grpc_tls_cert_path and grpc_tls_key_path go together"),
        }
    }

    /// The store's configuration, with the data directory filled in.
    pub(crate) fn store_config(&self) -> StoreConfig {
        StoreConfig {
            data_dir: self.data_dir.clone(),
            wal_segment_bytes: self.store.wal_segment_bytes,
            wal_max_group_entries: self.store.wal_max_group_entries,
            queue_capacity: self.store.queue_capacity,
            flush_interval_ms: self.store.flush_interval_ms,
            flush_max_rows: self.store.flush_max_rows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/vigil.toml");
        let config = VigilConfig::load(&path).unwrap();
        assert_eq!(config.ingest.mqtt_listen.port(), 1883);
        assert_eq!(config.grpc_listen.port(), 50051);
    }

    /// What the container image and the Kubernetes node need of their config: the default
    /// ports, the network on every listener but plaintext MQTT (which the gateway refuses on
    /// the network), TLS for the devices, and an absolute data directory (the volume).
    fn assert_serves_a_container(config: &VigilConfig, origin: &str) {
        let defaults = VigilConfig::default();
        let ingest = &config.ingest;
        for (what, deployed, default) in [
            ("grpc_listen", config.grpc_listen, defaults.grpc_listen),
            ("http_listen", config.http_listen, defaults.http_listen),
            (
                "mqtt_listen",
                ingest.mqtt_listen,
                defaults.ingest.mqtt_listen,
            ),
            (
                "mqtt_tls_listen",
                ingest.mqtt_tls_listen,
                defaults.ingest.mqtt_tls_listen,
            ),
        ] {
            assert_eq!(deployed.port(), default.port(), "{origin}: {what}");
            if what != "mqtt_listen" {
                assert!(
                    deployed.ip().is_unspecified(),
                    "{origin}: {what} = {deployed}"
                );
            }
        }
        assert!(
            ingest.mqtt_listen.ip().is_loopback() && !ingest.allow_plaintext,
            "{origin}"
        );
        assert!(
            ingest.tls_cert_path.is_some() && ingest.tls_key_path.is_some(),
            "{origin}: devices need MQTT over TLS"
        );
        assert!(config.data_dir.is_absolute(), "{origin}: data_dir");
        assert_eq!(config.log_format, "json", "{origin}: log_format");
    }

    #[test]
    fn the_container_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/container/vigil.toml");
        let config = VigilConfig::load(&path).unwrap();
        assert_serves_a_container(&config, "deploy/container/vigil.toml");
    }

    #[test]
    fn the_kubernetes_config_map_loads() {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s/configmap.yaml");
        let manifest: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
        let embedded = manifest["data"]["vigil.toml"].as_str().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vigil.toml");
        std::fs::write(&path, embedded).unwrap();
        let config = VigilConfig::load(&path).unwrap();
        assert_serves_a_container(&config, "deploy/k8s/configmap.yaml");
    }

    #[test]
    fn grpc_tls_settings_are_checked() {
        let config = |text: &str| toml::from_str::<VigilConfig>(text).unwrap();

        assert!(config("").grpc_tls().unwrap().is_none());
        let open = config("grpc_listen = \"0.0.0.0:50051\"").grpc_tls();
        assert!(
            open.unwrap_err()
                .to_string()
                .contains("grpc_allow_plaintext")
        );
        let allowed = "grpc_listen = \"0.0.0.0:50051\"\ngrpc_allow_plaintext = true";
        assert!(config(allowed).grpc_tls().unwrap().is_none());

        let half = config("grpc_tls_cert_path = \"/nonexistent/cert.pem\"").grpc_tls();
        assert!(half.unwrap_err().to_string().contains("go together"));
        let missing = "grpc_tls_cert_path = \"/nonexistent/cert.pem\"\n\
                       grpc_tls_key_path = \"/nonexistent/key.pem\"";
        let error = format!("{:#}", config(missing).grpc_tls().unwrap_err());
        assert!(error.contains("/nonexistent/cert.pem"), "{error}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(toml::from_str::<VigilConfig>("mqtt_port = 1").is_err());
        assert!(toml::from_str::<VigilConfig>("[ingest]\nmax_payload = 1").is_err());
    }
}
