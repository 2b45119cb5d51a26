//! Prometheus metrics of the store (`vigil_store_*`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Handles to every store metric; clones share the same values.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    pub(crate) wal_fsync_seconds: Histogram,
    pub(crate) wal_group_entries: Histogram,
    pub(crate) queue_depth: Gauge,
    pub(crate) readings_stored: Counter,
    pub(crate) rejections_stored: Counter,
    pub(crate) parquet_files_written: Counter,
    pub(crate) hot_rows: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            // 50 µs .. ~1.6 s
            wal_fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            // 1 .. 4096 entries
            wal_group_entries: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            queue_depth: Gauge::default(),
            readings_stored: Counter::default(),
            rejections_stored: Counter::default(),
            parquet_files_written: Counter::default(),
            hot_rows: Gauge::default(),
        }
    }
}

impl Metrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "vigil_store_wal_fsync_seconds",
            "Time of one WAL group write + fsync",
            self.wal_fsync_seconds.clone(),
        );
        registry.register(
            "vigil_store_wal_group_entries",
            "Entries per WAL group commit",
            self.wal_group_entries.clone(),
        );
        registry.register(
            "vigil_store_queue_depth",
            "Entries waiting for the WAL writer",
            self.queue_depth.clone(),
        );
        // prometheus-client appends `_total` to counter names.
        registry.register(
            "vigil_store_readings_stored",
            "Readings made durable in the WAL",
            self.readings_stored.clone(),
        );
        registry.register(
            "vigil_store_rejections_stored",
            "Rejections made durable in the WAL",
            self.rejections_stored.clone(),
        );
        registry.register(
            "vigil_store_parquet_files_written",
            "Parquet files written by flushes",
            self.parquet_files_written.clone(),
        );
        registry.register(
            "vigil_store_hot_rows",
            "Rows held in the in-memory hot tier",
            self.hot_rows.clone(),
        );
    }
}
