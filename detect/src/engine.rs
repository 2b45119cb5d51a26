//! The detector thread: per-device state, the three layers of detection, risk, response and
//! alerts.
//!
//! Step order per observation: find (or create) the device's state; run the rules and the
//! streaming statistics; add each finding to the risk; carry out a change of standing at once
//! (a cut-off through the [`Responder`] before the alert is written, so the device is cut off
//! within the same millisecond); queue the alert. After each drained batch of observations
//! the queued alerts are appended to the alert log (one fsync) and only then become visible.
//!
//! State is bounded: devices that are not enrolled get no state (a flood of logins under
//! random ids costs nothing), peers are tracked up to a fixed number, and feature windows
//! have a fixed length. A restart rebuilds the statistics from zero; quarantines live in the
//! registry and survive it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;
use parking_lot::RwLock;
use serde::Deserialize;

use crate::alerts::{Action, AlertLog, Evidence, NewAlert, Severity};
use crate::baseline::{
    BaselineConfig, Finding, MetricBaseline, OffsetTracker, RateTracker, RoughnessTracker,
};
use crate::events::{
    EventKind, Observation, ObservationReceiver, ReadingObservation, SecurityEvent,
};
use crate::fleet::{CopyTable, FEATURE_NAMES, FleetConfig, FleetModel, window_features};
use crate::metrics::DetectMetrics;
use crate::risk::{Basis, Policy, RiskConfig, RiskState, Standing};
use crate::rules::{IMPOSSIBLE_VALUE_WEIGHT, WindowCounter, event_weight, impossible_value};
use crate::{Error, Result};

/// Settings of detection and response.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectConfig {
    /// Observations queued for the detector; beyond it they are skipped and counted.
    pub queue_capacity: usize,
    /// What happens when a device's keyed risk crosses the quarantine threshold, unless its
    /// class says otherwise: `cut_off` or `alert_and_confirm`.
    pub default_policy: Policy,
    /// Policy per device class, e.g. `infusion_pump = "alert_and_confirm"`.
    pub class_policy: HashMap<String, Policy>,
    /// Seconds between two alerts of the same detector on the same device, unless the
    /// device's standing changes.
    pub alert_cooldown_s: u64,
    /// Failed logins per minute under one device id (or from one peer) that raise an alert.
    pub login_failures_per_minute: u32,
    /// Seconds a peer that failed too many logins is refused without checking its tokens.
    pub peer_throttle_s: u64,
    /// Successful logins per minute of one device that count as reconnect churn.
    pub logins_per_minute: u32,
    /// Session take-overs per minute of one device that mean two clients share its key.
    pub takeovers_per_minute: u32,
    /// Peers tracked for failed logins; beyond it the oldest are forgotten.
    pub max_tracked_peers: usize,
    /// Alerts kept in memory for the stream and SQL (all are in the log file).
    pub max_alerts_in_memory: usize,
    pub risk: RiskConfig,
    pub fleet: FleetConfig,
    #[serde(skip)]
    pub baseline: BaselineConfig,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 65_536,
            default_policy: Policy::CutOff,
            class_policy: HashMap::new(),
            alert_cooldown_s: 60,
            login_failures_per_minute: 10,
            peer_throttle_s: 60,
            logins_per_minute: 10,
            takeovers_per_minute: 3,
            max_tracked_peers: 100_000,
            max_alerts_in_memory: 100_000,
            risk: RiskConfig::default(),
            fleet: FleetConfig::default(),
            baseline: BaselineConfig::default(),
        }
    }
}

impl DetectConfig {
    pub fn policy_of(&self, class: &str) -> Policy {
        self.class_policy
            .get(class)
            .copied()
            .unwrap_or(self.default_policy)
    }
}

/// What the detector may do to the rest of the server; implemented by the binary over the
/// gateway and the registry.
pub trait Responder: Send + Sync + 'static {
    /// The class of an enrolled device, `None` for an unknown id.
    fn device_class(&self, device_id: &str) -> Option<Arc<str>>;
    /// Whether the registry has the device quarantined.
    fn is_quarantined(&self, device_id: &str) -> bool;
    /// Cuts a device off: durable quarantine, a notice, its session closed. Returns whether
    /// the quarantine was recorded.
    fn quarantine(&self, device_id: &str, reason: &str) -> bool;
    /// Marks a device suspect (or active again) in the registry.
    fn set_suspect(&self, device_id: &str, suspect: bool);
    /// Refuses logins from `peer` (an IP address) for `duration` without checking them.
    fn throttle_peer(&self, peer: &str, duration: Duration);
}

/// The running detector.
#[derive(Debug)]
pub struct Detector {
    pub alerts: AlertLog,
    pub metrics: Arc<DetectMetrics>,
    risks: Arc<RwLock<HashMap<Arc<str>, f64>>>,
    fleet: Arc<RwLock<Arc<FleetModel>>>,
    thread: Option<JoinHandle<()>>,
}

impl Detector {
    /// Starts the detector thread over `observations`.
    pub fn start(
        config: DetectConfig,
        alerts: AlertLog,
        observations: ObservationReceiver,
        responder: Arc<dyn Responder>,
    ) -> Result<Self> {
        let metrics = Arc::new(DetectMetrics::default());
        let risks = Arc::new(RwLock::new(HashMap::new()));
        let fleet = Arc::new(RwLock::new(Arc::new(FleetModel::default())));
        let worker = Worker {
            copies: CopyTable::new(config.fleet.copy_table_size),
            config,
            observations,
            responder,
            alerts: alerts.clone(),
            metrics: metrics.clone(),
            risks: risks.clone(),
            fleet: fleet.clone(),
            devices: HashMap::new(),
            peers: HashMap::new(),
            watched: HashSet::new(),
            pending: Vec::new(),
            skipped_reported: 0,
        };
        let thread = thread::Builder::new()
            .name("vigil-detect".into())
            .spawn(move || worker.run())
            .map_err(|source| Error::Thread {
                name: "detector",
                source,
            })?;
        Ok(Self {
            alerts,
            metrics,
            risks,
            fleet,
            thread: Some(thread),
        })
    }

    /// A device's current risk in [0, 1] (0 for a device without evidence).
    pub fn risk_of(&self, device_id: &str) -> f64 {
        self.risks.read().get(device_id).copied().unwrap_or(0.0)
    }

    /// Replaces the fleet model (after retraining from stored history).
    pub fn set_fleet_model(&self, model: FleetModel) {
        self.metrics.fleet_models.set(model.len() as i64);
        *self.fleet.write() = Arc::new(model);
    }

    /// Waits for the detector thread to end; it ends once every sender is dropped.
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            // A panic in the detector thread has been logged by the panic hook already.
            let _ = thread.join();
        }
    }
}

/// Per-device detection state.
#[derive(Debug)]
struct DeviceState {
    class: Arc<str>,
    risk: RiskState,
    metrics: Vec<MetricState>,
    rate: RateTracker,
    offset: OffsetTracker,
    failed_logins: WindowCounter,
    logins: WindowCounter,
    takeovers: WindowCounter,
    last_peer_ip: Option<Arc<str>>,
    /// When each detector last raised an alert on this device.
    last_alert_ms: Vec<(&'static str, i64)>,
}

#[derive(Debug)]
struct MetricState {
    metric: String,
    baseline: MetricBaseline,
    roughness: RoughnessTracker,
    window: Vec<f64>,
}

#[derive(Debug, Default)]
struct PeerState {
    failed_logins: WindowCounter,
    throttled_until_ms: i64,
    last_seen_ms: i64,
}

/// One finding, ready to be weighed.
struct Weighed {
    detector: &'static str,
    weight: f64,
    basis: Basis,
    summary: String,
    evidence: Vec<Evidence>,
}

struct Worker {
    config: DetectConfig,
    observations: ObservationReceiver,
    responder: Arc<dyn Responder>,
    alerts: AlertLog,
    metrics: Arc<DetectMetrics>,
    risks: Arc<RwLock<HashMap<Arc<str>, f64>>>,
    fleet: Arc<RwLock<Arc<FleetModel>>>,
    copies: CopyTable,
    devices: HashMap<Arc<str>, DeviceState>,
    peers: HashMap<Arc<str>, PeerState>,
    /// Devices whose risk is fading (suspect or awaiting confirmation), checked every tick.
    watched: HashSet<Arc<str>>,
    pending: Vec<NewAlert>,
    skipped_reported: u64,
}

const TICK: Duration = Duration::from_millis(250);
const MAX_DRAIN: usize = 4096;

impl Worker {
    fn run(mut self) {
        let mut last_tick = Instant::now();
        loop {
            match self.observations.queue.recv_timeout(TICK) {
                Ok(first) => {
                    self.observe(first);
                    for _ in 0..MAX_DRAIN {
                        match self.observations.queue.try_recv() {
                            Ok(next) => self.observe(next),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if last_tick.elapsed() >= TICK {
                self.tick();
                last_tick = Instant::now();
            }
            self.flush_alerts();
        }
        self.flush_alerts();
        tracing::debug!("detector stops: every sender is gone");
    }

    fn observe(&mut self, observation: Observation) {
        self.metrics.observations.inc();
        self.metrics
            .queue_depth
            .set(self.observations.queue.len() as i64);
        match observation {
            Observation::Reading(reading) => self.reading(reading),
            Observation::Security(event) => self.security(event),
            Observation::StatusChanged {
                device_id,
                quarantined,
                reason,
            } => self.status_changed(device_id, quarantined, reason),
        }
    }

    fn reading(&mut self, reading: ReadingObservation) {
        let fleet = self.fleet.read().clone();
        let config = &self.config;
        let Some(state) = observed_state(&mut self.devices, &*self.responder, &reading.device_id)
        else {
            return;
        };
        let mut findings = Vec::new();

        if let Some((metric, value, min, max)) = impossible_value(&reading.measurements) {
            findings.push(Weighed {
                detector: "rule.impossible_value",
                weight: IMPOSSIBLE_VALUE_WEIGHT,
                basis: Basis::Keyed,
                summary: format!(
                    "{metric} = {value} is outside what a human body produces ({min}..{max})"
                ),
                evidence: vec![evidence(
                    metric,
                    value,
                    (min + max) / 2.0,
                    value - max.min(value).max(min),
                )],
            });
        }
        if let Some((rate, usual)) = state.rate.update(reading.sampled_at_ms, &config.baseline) {
            findings.push(Weighed {
                detector: "stats.rate",
                weight: 0.5,
                basis: Basis::Keyed,
                summary: format!("{rate:.0} readings sampled in one second, usually {usual:.1}"),
                evidence: vec![evidence(
                    "readings_per_s",
                    rate,
                    usual,
                    rate / usual.max(0.1),
                )],
            });
        }
        let offset = reading.received_at_ms - reading.sampled_at_ms;
        if let Some((observed, usual)) = state.offset.update(offset, &config.baseline) {
            findings.push(Weighed {
                detector: "stats.clock_offset",
                weight: 0.3,
                basis: Basis::Keyed,
                summary: format!(
                    "clock offset jumped from {usual:.0} ms to {observed:.0} ms: another clock signs \
                     readings"
                ),
                evidence: vec![evidence("clock_offset_ms", observed, usual, observed - usual)],
            });
        }

        for (metric, value) in reading.measurements.iter() {
            let index = match state.metrics.iter().position(|m| &m.metric == metric) {
                Some(index) => index,
                None => {
                    state.metrics.push(MetricState {
                        metric: metric.clone(),
                        baseline: MetricBaseline::default(),
                        roughness: RoughnessTracker::default(),
                        window: Vec::with_capacity(config.fleet.window_readings),
                    });
                    state.metrics.len() - 1
                }
            };
            let metric_state = &mut state.metrics[index];
            match metric_state.baseline.update(*value, &config.baseline) {
                Some(Finding::Outlier {
                    z,
                    observed,
                    expected,
                }) => findings.push(Weighed {
                    detector: "stats.outlier",
                    weight: 0.15,
                    basis: Basis::Keyed,
                    summary: format!(
                        "{metric} = {observed} is {z:.1} spreads from this patient's {expected:.1}"
                    ),
                    evidence: vec![evidence(&format!("{metric}.z"), observed, expected, z)],
                }),
                Some(Finding::Shift {
                    z,
                    observed,
                    expected,
                }) => findings.push(Weighed {
                    detector: "stats.drift",
                    weight: 0.45,
                    basis: Basis::Keyed,
                    summary: format!(
                        "{metric} moved to {observed:.1} from this patient's usual {expected:.1} \
                         ({z:.1} spreads)"
                    ),
                    evidence: vec![evidence(
                        &format!("{metric}.shift_z"),
                        observed,
                        expected,
                        z,
                    )],
                }),
                None => {}
            }

            let floor = config.baseline.min_relative_spread
                * metric_state
                    .baseline
                    .mean(&config.baseline)
                    .unwrap_or(0.0)
                    .abs();
            if let Some((recent, usual)) =
                metric_state
                    .roughness
                    .update(*value, floor, &config.baseline)
            {
                findings.push(Weighed {
                    detector: "stats.roughness",
                    weight: 0.45,
                    basis: Basis::Keyed,
                    summary: format!(
                        "{metric} jumps by {recent:.2} between readings, this patient's usually \
                         by {usual:.2}: values unlike the patient's own signal"
                    ),
                    evidence: vec![evidence(
                        &format!("{metric}.roughness"),
                        recent,
                        usual,
                        recent / usual,
                    )],
                });
            }

            metric_state.window.push(*value);
            if metric_state.window.len() >= config.fleet.window_readings.max(4) {
                let window = std::mem::take(&mut metric_state.window);
                if let Some(owner) = self.copies.check(
                    &reading.device_id,
                    metric,
                    &window,
                    config.fleet.min_distinct_for_copy,
                ) {
                    let source = if owner == reading.device_id {
                        "this device's own earlier readings".to_owned()
                    } else {
                        format!("device {}", owner.escape_default())
                    };
                    findings.push(Weighed {
                        detector: "fleet.copied",
                        weight: 0.6,
                        basis: Basis::Keyed,
                        summary: format!(
                            "{} values of {metric} repeat {source} exactly",
                            window.len()
                        ),
                        evidence: vec![evidence(
                            &format!("{metric}.identical_window"),
                            window.len() as f64,
                            0.0,
                            window.len() as f64,
                        )],
                    });
                }
                if let (Some(model), Some(features)) =
                    (fleet.get(&state.class, metric), window_features(&window))
                    && let Some(verdict) = model.judge(&features)
                {
                    findings.push(Weighed {
                        detector: "fleet.model",
                        weight: fleet_model_weight(verdict.distance, verdict.limit),
                        basis: Basis::Population,
                        summary: format!(
                            "{metric} behaves unlike the {} fleet (distance {:.1}, limit {:.1})",
                            state.class, verdict.distance, verdict.limit
                        ),
                        evidence: FEATURE_NAMES
                            .iter()
                            .zip(verdict.features)
                            .map(|(name, (observed, expected, deviation))| {
                                evidence(&format!("{metric}.{name}"), observed, expected, deviation)
                            })
                            .collect(),
                    });
                }
                let mut window = window;
                window.clear();
                state.metrics[index].window = window;
            }
        }

        for finding in findings {
            self.weigh(&reading.device_id, reading.received_at_ms, finding);
        }
    }

    fn security(&mut self, event: SecurityEvent) {
        self.metrics.security_event(event.kind);
        let peer_ip: Arc<str> = Arc::from(peer_ip(&event.peer));
        if event.kind == EventKind::LoginRefused {
            self.login_refused_by_peer(&event, &peer_ip);
        }

        let config = &self.config;
        let Some(state) = observed_state(&mut self.devices, &*self.responder, &event.device_id)
        else {
            return;
        };

        let mut findings = Vec::new();
        if let Some((detector, weight)) = event_weight(event.kind) {
            findings.push(Weighed {
                detector,
                weight,
                basis: Basis::Keyed,
                summary: format!(
                    "{} inside the device's authenticated session",
                    event.kind.as_str().replace('_', " ")
                ),
                evidence: vec![evidence(event.kind.as_str(), 1.0, 0.0, 1.0)],
            });
        }
        match event.kind {
            EventKind::LoginRefused => {
                let failures = state.failed_logins.add(event.at_ms);
                if failures == config.login_failures_per_minute {
                    findings.push(Weighed {
                        detector: "rule.login_flood",
                        weight: 0.5,
                        basis: Basis::Unkeyed,
                        summary: format!(
                            "{failures} failed logins in a minute under this device's id"
                        ),
                        evidence: vec![evidence(
                            "failed_logins_per_min",
                            f64::from(failures),
                            0.0,
                            f64::from(failures) / f64::from(config.login_failures_per_minute),
                        )],
                    });
                }
            }
            EventKind::LoginAccepted => {
                let logins = state.logins.add(event.at_ms);
                if logins == config.logins_per_minute {
                    findings.push(Weighed {
                        detector: "rule.reconnect_churn",
                        weight: 0.4,
                        basis: Basis::Keyed,
                        summary: format!("{logins} successful logins in a minute"),
                        evidence: vec![evidence(
                            "logins_per_min",
                            f64::from(logins),
                            1.0,
                            f64::from(logins) / f64::from(config.logins_per_minute),
                        )],
                    });
                }
                state.last_peer_ip = Some(peer_ip.clone());
            }
            EventKind::SessionReplaced => {
                let takeovers = state.takeovers.add(event.at_ms);
                let other_address = state
                    .last_peer_ip
                    .as_ref()
                    .is_some_and(|last| *last != peer_ip);
                let weight = if other_address { 0.35 } else { 0.2 };
                let mut summary = format!("session taken over ({takeovers} in a minute)");
                if other_address {
                    summary.push_str(" from another address");
                }
                if takeovers >= config.takeovers_per_minute {
                    summary.push_str(": two clients hold this device's key");
                }
                let weight = if takeovers >= config.takeovers_per_minute {
                    0.6
                } else {
                    weight
                };
                findings.push(Weighed {
                    detector: "rule.session_takeover",
                    weight,
                    basis: Basis::Keyed,
                    summary,
                    evidence: vec![evidence(
                        "takeovers_per_min",
                        f64::from(takeovers),
                        0.0,
                        f64::from(takeovers) / f64::from(config.takeovers_per_minute),
                    )],
                });
            }
            _ => {}
        }
        for finding in findings {
            self.weigh(&event.device_id, event.at_ms, finding);
        }
    }

    /// Failed logins per peer: past the limit the peer is throttled and an alert raised.
    fn login_refused_by_peer(&mut self, event: &SecurityEvent, peer_ip: &Arc<str>) {
        if self.peers.len() >= self.config.max_tracked_peers && !self.peers.contains_key(peer_ip) {
            let horizon = event.at_ms - 120_000;
            self.peers.retain(|_, peer| peer.last_seen_ms >= horizon);
            if self.peers.len() >= self.config.max_tracked_peers {
                // Under a flood from more peers than the bound: forget them all rather than
                // grow; the throttles already ordered stay in force in the gateway.
                self.peers.clear();
            }
        }
        let limit = self.config.login_failures_per_minute;
        let peer = self.peers.entry(peer_ip.clone()).or_default();
        peer.last_seen_ms = event.at_ms;
        let failures = peer.failed_logins.add(event.at_ms);
        if failures < limit || peer.throttled_until_ms > event.at_ms {
            return;
        }

        let throttle = Duration::from_secs(self.config.peer_throttle_s);
        peer.throttled_until_ms = event.at_ms + throttle.as_millis() as i64;
        self.responder.throttle_peer(peer_ip, throttle);
        self.metrics.peers_throttled.inc();
        tracing::info!(peer = %peer_ip, failures, "peer throttled after failed logins");
        self.pending.push(NewAlert {
            device_id: event.device_id.to_string(),
            device_class: String::new(),
            raised_at_ms: event.at_ms,
            detector: "rule.credential_stuffing".to_owned(),
            severity: Severity::Medium,
            score: 0.0,
            summary: format!(
                "{failures} failed logins in a minute from {peer_ip}; its logins are refused for \
                 {} s",
                throttle.as_secs()
            ),
            evidence: vec![evidence(
                "failed_logins_per_min",
                f64::from(failures),
                0.0,
                f64::from(failures) / f64::from(limit),
            )],
            action: Action::Throttled,
        });
    }

    fn status_changed(&mut self, device_id: Arc<str>, quarantined: bool, reason: String) {
        let now = crate::now_ms();
        let Some(state) = device_state(&mut self.devices, &*self.responder, &device_id) else {
            return;
        };
        let class = state.class.to_string();
        let (action, detector) = if quarantined {
            state.risk.set_quarantined();
            (Action::Quarantined, "operator.quarantine")
        } else {
            state.risk.release(now);
            for metric in &mut state.metrics {
                metric.window.clear();
            }
            (Action::Released, "operator.release")
        };
        self.watched.remove(&device_id);
        self.risks.write().remove(&device_id);
        self.pending.push(NewAlert {
            device_id: device_id.to_string(),
            device_class: class,
            raised_at_ms: now,
            detector: detector.to_owned(),
            severity: Severity::Info,
            score: 0.0,
            summary: reason,
            evidence: Vec::new(),
            action,
        });
    }

    /// Adds a finding to the device's risk, acts on a change of standing, queues the alert.
    fn weigh(&mut self, device_id: &Arc<str>, at_ms: i64, finding: Weighed) {
        self.metrics.finding(finding.detector);
        let policy_config = &self.config;
        let cooldown_ms = policy_config.alert_cooldown_s as i64 * 1000;
        let Some(state) = self.devices.get_mut(device_id) else {
            return;
        };
        let policy = policy_config.policy_of(&state.class);
        let changed = state.risk.add(
            finding.weight,
            finding.basis,
            at_ms,
            policy,
            &policy_config.risk,
        );
        let risk = state.risk.risk(at_ms, &policy_config.risk);
        self.risks.write().insert(device_id.clone(), risk);

        let last = state
            .last_alert_ms
            .iter_mut()
            .find(|(detector, _)| *detector == finding.detector);
        let cooled_down = match &last {
            Some((_, last_ms)) => at_ms - *last_ms >= cooldown_ms,
            None => true,
        };
        if changed.is_none() && !cooled_down {
            return;
        }
        match last {
            Some((_, last_ms)) => *last_ms = at_ms,
            None => state.last_alert_ms.push((finding.detector, at_ms)),
        }
        let class = state.class.to_string();

        let (action, severity) = match changed {
            Some(Standing::Quarantined) => {
                let reason = format!("{}: {}", finding.detector, finding.summary);
                if self.responder.quarantine(device_id, &reason) {
                    self.metrics.quarantines.inc();
                    tracing::info!(device_id = %device_id, detector = finding.detector, risk, "device cut off");
                    (Action::Quarantined, Severity::Critical)
                } else {
                    tracing::error!(device_id = %device_id, "quarantine could not be recorded");
                    (Action::AwaitingConfirmation, Severity::Critical)
                }
            }
            Some(Standing::AwaitingConfirmation) => {
                self.watched.insert(device_id.clone());
                tracing::info!(device_id = %device_id, risk, "cut-off proposed to the SOC");
                (Action::AwaitingConfirmation, Severity::Critical)
            }
            Some(Standing::Suspect) => {
                self.watched.insert(device_id.clone());
                self.responder.set_suspect(device_id, true);
                tracing::info!(device_id = %device_id, detector = finding.detector, risk, "device suspect");
                (Action::Suspect, Severity::High)
            }
            Some(Standing::Active) => {
                self.responder.set_suspect(device_id, false);
                (Action::Cleared, Severity::Info)
            }
            None => {
                let severity = if finding.weight >= 0.8 {
                    Severity::High
                } else if finding.weight >= 0.4 {
                    Severity::Medium
                } else {
                    Severity::Low
                };
                (Action::None, severity)
            }
        };
        self.pending.push(NewAlert {
            device_id: device_id.to_string(),
            device_class: class,
            raised_at_ms: at_ms,
            detector: finding.detector.to_owned(),
            severity,
            score: risk,
            summary: finding.summary,
            evidence: finding.evidence,
            action,
        });
    }

    /// Lets suspicion fade, and reports observations the queue had to skip.
    fn tick(&mut self) {
        let now = crate::now_ms();
        let watched: Vec<Arc<str>> = self.watched.iter().cloned().collect();
        for device_id in watched {
            let Some(state) = self.devices.get_mut(&device_id) else {
                self.watched.remove(&device_id);
                continue;
            };
            let policy = self.config.policy_of(&state.class);
            let changed = state.risk.reassess(now, policy, &self.config.risk);
            let risk = state.risk.risk(now, &self.config.risk);
            self.risks.write().insert(device_id.clone(), risk);
            if changed == Some(Standing::Active) {
                self.watched.remove(&device_id);
                self.responder.set_suspect(&device_id, false);
                tracing::info!(device_id = %device_id, risk, "suspicion cleared");
                self.pending.push(NewAlert {
                    device_id: device_id.to_string(),
                    device_class: state.class.to_string(),
                    raised_at_ms: now,
                    detector: "risk.cleared".to_owned(),
                    severity: Severity::Info,
                    score: risk,
                    summary: format!("risk fell to {risk:.2}: device active again"),
                    evidence: Vec::new(),
                    action: Action::Cleared,
                });
            }
        }

        let skipped = self.observations.skipped.load(Ordering::Relaxed);
        if skipped > self.skipped_reported {
            let newly = skipped - self.skipped_reported;
            self.skipped_reported = skipped;
            self.metrics.skipped.inc_by(newly);
            tracing::warn!(
                skipped = newly,
                "detector fell behind and skipped observations"
            );
            self.pending.push(NewAlert {
                device_id: String::new(),
                device_class: String::new(),
                raised_at_ms: now,
                detector: "detect.backlog".to_owned(),
                severity: Severity::High,
                score: 0.0,
                summary: format!(
                    "the detector fell behind and skipped {newly} observations; devices were \
                     not watched in full"
                ),
                evidence: vec![evidence(
                    "skipped_observations",
                    newly as f64,
                    0.0,
                    newly as f64,
                )],
                action: Action::None,
            });
        }
    }

    fn flush_alerts(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let alerts = std::mem::take(&mut self.pending);
        let count = alerts.len();
        match self.alerts.append(alerts) {
            Ok(raised) => {
                for alert in &raised {
                    self.metrics.alert(alert.severity);
                }
            }
            Err(error) => {
                self.metrics.alerts_lost.inc_by(count as u64);
                tracing::error!(%error, count, "alerts could not be written");
            }
        }
    }
}

/// Whether the device is quarantined; a release the detector missed (its queue was full)
/// is picked up from the registry here.
fn still_quarantined(state: &mut DeviceState, responder: &dyn Responder, device_id: &str) -> bool {
    if state.risk.standing() != Standing::Quarantined {
        return false;
    }
    if responder.is_quarantined(device_id) {
        return true;
    }
    state.risk.release(crate::now_ms());
    false
}

/// The state of an enrolled device whose readings and events still count: none while it is
/// quarantined.
fn observed_state<'a>(
    devices: &'a mut HashMap<Arc<str>, DeviceState>,
    responder: &dyn Responder,
    device_id: &Arc<str>,
) -> Option<&'a mut DeviceState> {
    let state = device_state(devices, responder, device_id)?;
    (!still_quarantined(state, responder, device_id)).then_some(state)
}

/// The device's state, created for enrolled devices only.
fn device_state<'a>(
    devices: &'a mut HashMap<Arc<str>, DeviceState>,
    responder: &dyn Responder,
    device_id: &Arc<str>,
) -> Option<&'a mut DeviceState> {
    if !devices.contains_key(device_id) {
        let class = responder.device_class(device_id)?;
        let risk = if responder.is_quarantined(device_id) {
            RiskState::quarantined()
        } else {
            RiskState::default()
        };
        devices.insert(
            device_id.clone(),
            DeviceState {
                class,
                risk,
                metrics: Vec::new(),
                rate: RateTracker::default(),
                offset: OffsetTracker::default(),
                failed_logins: WindowCounter::default(),
                logins: WindowCounter::default(),
                takeovers: WindowCounter::default(),
                last_peer_ip: None,
                last_alert_ms: Vec::new(),
            },
        );
    }
    devices.get_mut(device_id)
}

fn evidence(feature: &str, observed: f64, expected: f64, deviation: f64) -> Evidence {
    Evidence {
        feature: feature.to_owned(),
        observed,
        expected,
        deviation,
    }
}

/// The IP address part of `ip:port` (or `[v6]:port`).
fn peer_ip(peer: &str) -> &str {
    match peer.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => {
            host.trim_start_matches('[').trim_end_matches(']')
        }
        _ => peer,
    }
}

/// Weight of a window unlike its class: 0.4 up to one and a half times the limit, then growing
/// with the distance to 0.7 at three times the limit. Two far-off windows (a stolen key feeding
/// made-up vitals) are enough to cut a device off; a healthy patient's unusual windows, which
/// stay near the limit, need several in a row.
fn fleet_model_weight(distance: f64, limit: f64) -> f64 {
    if limit <= 0.0 || !distance.is_finite() {
        return 0.4;
    }
    0.4 + 0.3 * ((distance / limit - 1.5) / 1.5).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::observation_queue;
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Recorder {
        quarantined: Mutex<Vec<String>>,
        throttled: Mutex<Vec<String>>,
    }

    impl Responder for Recorder {
        fn device_class(&self, device_id: &str) -> Option<Arc<str>> {
            device_id
                .starts_with("dev")
                .then(|| Arc::from("pulse_oximeter"))
        }
        fn is_quarantined(&self, device_id: &str) -> bool {
            self.quarantined.lock().iter().any(|d| d == device_id)
        }
        fn quarantine(&self, device_id: &str, _reason: &str) -> bool {
            self.quarantined.lock().push(device_id.to_owned());
            true
        }
        fn set_suspect(&self, _device_id: &str, _suspect: bool) {}
        fn throttle_peer(&self, peer: &str, _duration: Duration) {
            self.throttled.lock().push(peer.to_owned());
        }
    }

    fn run(observations: Vec<Observation>) -> (Arc<Recorder>, Vec<crate::alerts::Alert>) {
        let dir = tempfile::tempdir().unwrap();
        let alerts = AlertLog::open(dir.path(), 1000).unwrap();
        let (sender, receiver) = observation_queue(100_000);
        let recorder = Arc::new(Recorder::default());
        let detector = Detector::start(
            DetectConfig::default(),
            alerts.clone(),
            receiver,
            recorder.clone(),
        )
        .unwrap();
        for observation in observations {
            sender.send(observation);
        }
        drop(sender);
        detector.join();
        (recorder, alerts.all())
    }

    fn event(device: &str, kind: EventKind, at_ms: i64, peer: &str) -> Observation {
        Observation::Security(SecurityEvent {
            device_id: Arc::from(device),
            kind,
            at_ms,
            peer: Arc::from(peer),
        })
    }

    #[test]
    fn a_forged_signature_cuts_the_device_off_with_one_alert() {
        let (recorder, alerts) = run(vec![event(
            "dev-1",
            EventKind::BadSignature,
            1_000,
            "10.0.0.1:5000",
        )]);
        assert_eq!(*recorder.quarantined.lock(), vec!["dev-1".to_owned()]);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].action, Action::Quarantined);
        assert_eq!(alerts[0].detector, "rule.bad_signature");
        assert_eq!(alerts[0].severity, Severity::Critical);
    }

    #[test]
    fn credential_stuffing_throttles_the_peer_and_cuts_nobody_off() {
        let observations = (0..200)
            .map(|i| {
                event(
                    "dev-1",
                    EventKind::LoginRefused,
                    1_000 + i * 10,
                    "10.0.0.9:4000",
                )
            })
            .collect();
        let (recorder, alerts) = run(observations);
        assert!(recorder.quarantined.lock().is_empty());
        assert_eq!(*recorder.throttled.lock(), vec!["10.0.0.9".to_owned()]);
        assert!(
            alerts
                .iter()
                .any(|a| a.detector == "rule.credential_stuffing")
        );
        assert!(alerts.iter().all(|a| a.action != Action::Quarantined));
    }

    #[test]
    fn unknown_devices_get_no_state() {
        let observations = (0..1000)
            .map(|i| {
                event(
                    &format!("x{i}"),
                    EventKind::BadSignature,
                    1_000,
                    "10.0.0.2:1",
                )
            })
            .collect();
        let (recorder, alerts) = run(observations);
        assert!(recorder.quarantined.lock().is_empty());
        assert!(alerts.is_empty());
    }

    #[test]
    fn peer_addresses_lose_their_port() {
        assert_eq!(peer_ip("10.1.2.3:1883"), "10.1.2.3");
        assert_eq!(peer_ip("[::1]:1883"), "::1");
        assert_eq!(peer_ip("unknown"), "unknown");
    }

    #[test]
    fn far_off_windows_weigh_more_than_borderline_ones() {
        assert_eq!(fleet_model_weight(10.0, 10.0), 0.4);
        assert_eq!(fleet_model_weight(15.0, 10.0), 0.4);
        assert!((fleet_model_weight(22.5, 10.0) - 0.55).abs() < 1e-9);
        assert_eq!(fleet_model_weight(50.0, 10.0), 0.7);
        assert_eq!(fleet_model_weight(f64::INFINITY, 10.0), 0.4);
        // Two far-off windows reach the default quarantine threshold (0.8); two borderline
        // ones do not.
        let combined = |w: f64| 1.0 - (1.0 - w) * (1.0 - w);
        assert!(combined(fleet_model_weight(30.0, 10.0)) >= 0.8);
        assert!(combined(fleet_model_weight(15.0, 10.0)) < 0.8);
    }
}
