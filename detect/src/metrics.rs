//! Detection metrics, named `vigil_detect_<what>_<unit>`; counters end in `_total`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::alerts::Severity;
use crate::events::EventKind;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectorLabel {
    pub detector: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SeverityLabel {
    pub severity: &'static str,
}

/// Every detection counter and gauge.
#[derive(Debug, Default)]
pub struct DetectMetrics {
    pub observations: Counter,
    pub skipped: Counter,
    pub security_events: Family<KindLabel, Counter>,
    pub findings: Family<DetectorLabel, Counter>,
    pub alerts: Family<SeverityLabel, Counter>,
    pub alerts_lost: Counter,
    pub quarantines: Counter,
    pub peers_throttled: Counter,
    pub queue_depth: Gauge,
    pub fleet_models: Gauge,
}

impl DetectMetrics {
    pub fn security_event(&self, kind: EventKind) {
        self.security_events
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }

    pub fn finding(&self, detector: &'static str) {
        self.findings
            .get_or_create(&DetectorLabel { detector })
            .inc();
    }

    pub fn alert(&self, severity: Severity) {
        self.alerts
            .get_or_create(&SeverityLabel {
                severity: severity.as_str(),
            })
            .inc();
    }

    pub fn register(&self, registry: &mut Registry) {
        let detect = registry.sub_registry_with_prefix("vigil_detect");
        detect.register(
            "observations",
            "Readings and security events the detector processed",
            self.observations.clone(),
        );
        detect.register(
            "skipped_observations",
            "Observations skipped because the detector's queue was full",
            self.skipped.clone(),
        );
        detect.register(
            "security_events",
            "Security events received, by kind",
            self.security_events.clone(),
        );
        detect.register(
            "findings",
            "Evidence found, by detector",
            self.findings.clone(),
        );
        detect.register("alerts", "Alerts raised, by severity", self.alerts.clone());
        detect.register(
            "alerts_lost",
            "Alerts that could not be written to the alert log",
            self.alerts_lost.clone(),
        );
        detect.register(
            "quarantines",
            "Devices cut off by the detector",
            self.quarantines.clone(),
        );
        detect.register(
            "peers_throttled",
            "Peers whose logins were refused for a while after failed logins",
            self.peers_throttled.clone(),
        );
        detect.register(
            "queue_depth",
            "Observations waiting for the detector",
            self.queue_depth.clone(),
        );
        detect.register(
            "fleet_models",
            "Trained (class, metric) fleet models",
            self.fleet_models.clone(),
        );
    }
}
