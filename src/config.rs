//! The server's configuration: a TOML file (documented in `deploy/vigil.toml`, its shape in
//! `vigil-config`) with command-line flags taking precedence.

use std::sync::Arc;

use anyhow::bail;
use vigil_store::StoreConfig;

pub(crate) use vigil_config::VigilConfig;

/// What the server needs of its configuration beyond its shape.
pub(crate) trait ServerConfig {
    /// The TLS configuration of the gRPC port, from its PEM files; `None` for plaintext, which
    /// is refused on a non-loopback address unless `grpc_allow_plaintext` is set.
    fn grpc_tls(&self) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>>;

    /// The store's configuration, with the data directory filled in.
    fn store_config(&self) -> StoreConfig;
}

impl ServerConfig for VigilConfig {
    fn grpc_tls(&self) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
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

    fn store_config(&self) -> StoreConfig {
        StoreConfig {
            data_dir: self.data_dir.clone(),
            wal_segment_bytes: self.store.wal_segment_bytes,
            wal_max_group_entries: self.store.wal_max_group_entries,
            queue_capacity: self.store.queue_capacity,
            flush_interval_ms: self.store.flush_interval_ms,
            flush_max_rows: self.store.flush_max_rows,
            shared_dir: (self.cluster.role != vigil_config::Role::All)
                .then(|| self.cluster.shared_dir.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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
        let config = |text: &str| VigilConfig::parse(text).unwrap();

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
    fn the_file_defaults_are_the_stores_defaults() {
        let config = VigilConfig::default();
        let from_file = config.store_config();
        let store = StoreConfig::default();
        assert_eq!(from_file.wal_segment_bytes, store.wal_segment_bytes);
        assert_eq!(from_file.wal_max_group_entries, store.wal_max_group_entries);
        assert_eq!(from_file.queue_capacity, store.queue_capacity);
        assert_eq!(from_file.flush_interval_ms, store.flush_interval_ms);
        assert_eq!(from_file.flush_max_rows, store.flush_max_rows);
    }
}
