//! Ingest metrics, named `vigil_ingest_<what>_<unit>`; counters end in `_total`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::login::LoginRefusal;
use crate::reasons::RefusalReason;

/// The `reason` label of refusal counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Every ingest counter, gauge and histogram.
#[derive(Debug)]
pub struct IngestMetrics {
    pub readings_accepted: Counter,
    pub readings_resent: Counter,
    pub readings_refused: Family<ReasonLabel, Counter>,
    pub seq_gaps: Counter,
    pub logins_accepted: Counter,
    pub logins_refused: Family<ReasonLabel, Counter>,
    pub sessions_replaced: Counter,
    pub subscriptions_refused: Counter,
    pub connected_devices: Gauge,
    pub verify_batch_size: Histogram,
    pub verifier_queue_depth: Gauge,
    pub puback_latency_seconds: Histogram,
    pub rejections_dropped: Counter,
    pub pending_bytes: Gauge,
    pub pending_bytes_limit: Gauge,
}

impl IngestMetrics {
    pub fn new() -> Self {
        let metrics = Self {
            readings_accepted: Counter::default(),
            readings_resent: Counter::default(),
            readings_refused: Family::default(),
            seq_gaps: Counter::default(),
            logins_accepted: Counter::default(),
            logins_refused: Family::default(),
            sessions_replaced: Counter::default(),
            subscriptions_refused: Counter::default(),
            connected_devices: Gauge::default(),
            verify_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            verifier_queue_depth: Gauge::default(),
            puback_latency_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            rejections_dropped: Counter::default(),
            pending_bytes: Gauge::default(),
            pending_bytes_limit: Gauge::default(),
        };

        // Every label is present from the start, so dashboards and tests see zeros, not gaps.
        for reason in RefusalReason::ALL {
            drop(metrics.readings_refused.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            }));
        }
        for reason in LoginRefusal::ALL {
            drop(metrics.logins_refused.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            }));
        }
        metrics
    }

    pub fn refused(&self, reason: RefusalReason) {
        self.readings_refused
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn login_refused(&self, reason: LoginRefusal) {
        self.logins_refused
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn register(&self, registry: &mut Registry) {
        let ingest = registry.sub_registry_with_prefix("vigil_ingest");
        ingest.register(
            "readings_accepted",
            "Readings verified and stored",
            self.readings_accepted.clone(),
        );
        ingest.register(
            "readings_resent",
            "Exact re-sends acknowledged again, stored once",
            self.readings_resent.clone(),
        );
        ingest.register(
            "readings_refused",
            "Published messages refused, by reason",
            self.readings_refused.clone(),
        );
        ingest.register(
            "seq_gaps",
            "Sequence numbers skipped by devices",
            self.seq_gaps.clone(),
        );
        ingest.register(
            "logins_accepted",
            "Logins admitted",
            self.logins_accepted.clone(),
        );
        ingest.register(
            "logins_refused",
            "Logins refused, by reason",
            self.logins_refused.clone(),
        );
        ingest.register(
            "sessions_replaced",
            "Live sessions replaced by a new login of the same device",
            self.sessions_replaced.clone(),
        );
        ingest.register(
            "subscriptions_refused",
            "Subscriptions outside the device's notices topic",
            self.subscriptions_refused.clone(),
        );
        ingest.register(
            "connected_devices",
            "Devices with a live MQTT session",
            self.connected_devices.clone(),
        );
        ingest.register(
            "verify_batch_size",
            "Readings per signature verification batch",
            self.verify_batch_size.clone(),
        );
        ingest.register(
            "verifier_queue_depth",
            "Readings waiting for a verifier thread",
            self.verifier_queue_depth.clone(),
        );
        ingest.register(
            "puback_latency_seconds",
            "From a publish's arrival to its PUBACK",
            self.puback_latency_seconds.clone(),
        );
        ingest.register(
            "rejections_dropped",
            "Refusal records not stored because the queue was full",
            self.rejections_dropped.clone(),
        );
        ingest.register(
            "pending_bytes",
            "Bytes held for readings whose PUBACK is not decided yet",
            self.pending_bytes.clone(),
        );
        ingest.register(
            "pending_bytes_limit",
            "The configured bound on pending_bytes (max_pending_bytes)",
            self.pending_bytes_limit.clone(),
        );
    }
}

impl Default for IngestMetrics {
    fn default() -> Self {
        Self::new()
    }
}
