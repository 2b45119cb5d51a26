//! Prometheus metrics of the cluster stages (`vigil_cluster_*`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Handles to every cluster metric; clones share the same values.
#[derive(Debug, Clone, Default)]
pub struct ClusterMetrics {
    /// Readings and refusals Kafka acknowledged (gateway).
    pub published: Counter,
    /// Readings and refusals Kafka did not take in time (gateway).
    pub publish_failures: Counter,
    /// Entries handed to the producer and not acknowledged yet (gateway).
    pub publish_in_flight: Gauge,
    /// Security events passed on to the events topic (gateway).
    pub events_published: Counter,
    /// Readings written to Parquet by this store worker.
    pub readings_stored: Counter,
    /// Refusals written to Parquet by this store worker.
    pub rejections_stored: Counter,
    /// Readings dropped by a store worker because their device's seq was already stored
    /// (a device's re-send through another gateway).
    pub duplicates_dropped: Counter,
    /// Kafka records that did not decode (a store or detect worker skips and counts them).
    pub undecodable_records: Counter,
    /// Parquet files written by this store worker.
    pub files_written: Counter,
    /// Partitions this worker owns now (store or detect).
    pub partitions_owned: Gauge,
    /// Registry records published to the devices topic.
    pub registry_published: Counter,
    /// Registry records from other nodes applied here.
    pub registry_applied: Counter,
    /// Observations fed to the detector from Kafka (detect worker).
    pub observations_fed: Counter,
}

impl ClusterMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let counters = [
            (
                "vigil_cluster_published",
                "Readings and refusals Kafka acknowledged",
                &self.published,
            ),
            (
                "vigil_cluster_publish_failures",
                "Readings and refusals Kafka did not take in time",
                &self.publish_failures,
            ),
            (
                "vigil_cluster_events_published",
                "Security events passed on to the events topic",
                &self.events_published,
            ),
            (
                "vigil_cluster_readings_stored",
                "Readings written to Parquet by this store worker",
                &self.readings_stored,
            ),
            (
                "vigil_cluster_rejections_stored",
                "Refusals written to Parquet by this store worker",
                &self.rejections_stored,
            ),
            (
                "vigil_cluster_duplicates_dropped",
                "Readings whose device seq was already stored",
                &self.duplicates_dropped,
            ),
            (
                "vigil_cluster_undecodable_records",
                "Kafka records that did not decode",
                &self.undecodable_records,
            ),
            (
                "vigil_cluster_files_written",
                "Parquet files written by this store worker",
                &self.files_written,
            ),
            (
                "vigil_cluster_registry_published",
                "Registry records published to the devices topic",
                &self.registry_published,
            ),
            (
                "vigil_cluster_registry_applied",
                "Registry records from other nodes applied here",
                &self.registry_applied,
            ),
            (
                "vigil_cluster_observations_fed",
                "Observations fed to the detector from Kafka",
                &self.observations_fed,
            ),
        ];
        // prometheus-client appends `_total` to counter names.
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "vigil_cluster_publish_in_flight",
            "Entries handed to the Kafka producer and not acknowledged yet",
            self.publish_in_flight.clone(),
        );
        registry.register(
            "vigil_cluster_partitions_owned",
            "Partitions this worker owns",
            self.partitions_owned.clone(),
        );
    }
}
