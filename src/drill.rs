//! `vigil drill`: a detection exercise. A server on loopback, a healthy simulated fleet, and
//! a few attacked devices per scenario (`--victims`); at the end, a detection report checked
//! against the attacks' ground truth, with the median and worst times per scenario.
//!
//! Timeline: the whole fleet publishes for `--warmup-s` (baselines learn, the fleet model is
//! trained from stored history); then the devices that an attacker replaces stop, every
//! attack starts at once, and the healthy fleet goes on for `--attack-s` more. Alerts are read
//! the way the SOC reads them, from the gRPC alert stream.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use parking_lot::Mutex;
use serde::Serialize;
use vigil_loadtest::attacks::{AttackPlan, AttackRecord, Scenario, run_attack};
use vigil_loadtest::{
    DeviceClass, FleetConfig, SimDevice, enrollment_csv, generate_fleet, run_fleet,
};
use vigil_proto::v1::Alert;

use crate::client::{Client, parse_enrollment_csv};
use crate::config::VigilConfig;
use crate::server::RunningServer;

#[derive(Debug, clap::Args)]
pub(crate) struct DrillArgs {
    /// Healthy simulated devices beside the attacked ones.
    #[arg(long, default_value_t = 300)]
    devices: usize,
    /// Readings per device per second.
    #[arg(long, default_value_t = 2.0)]
    rate_hz: f64,
    /// Seconds of normal traffic before the attacks.
    #[arg(long, default_value_t = 45)]
    warmup_s: u64,
    /// Seconds the attacks (and the healthy fleet) go on.
    #[arg(long, default_value_t = 30)]
    attack_s: u64,
    /// Attacked devices per scenario, each attacked on its own.
    #[arg(long, default_value_t = 3)]
    victims: usize,
    /// Write the report as JSON to this file too.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The result for one scenario.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScenarioResult {
    pub(crate) scenario: &'static str,
    pub(crate) device_id: String,
    pub(crate) cut_off_expected: bool,
    pub(crate) detected: bool,
    pub(crate) cut_off: bool,
    /// Milliseconds from the attack's first message to the first alert on the device.
    pub(crate) time_to_alert_ms: Option<i64>,
    /// ... and to the alert that reports the cut-off.
    pub(crate) time_to_cut_off_ms: Option<i64>,
    pub(crate) detectors: Vec<String>,
    pub(crate) attack_messages: u64,
}

/// One scenario over all its victims.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScenarioSummary {
    pub(crate) scenario: &'static str,
    pub(crate) cut_off_expected: bool,
    pub(crate) victims: usize,
    pub(crate) detected: usize,
    pub(crate) cut_off: usize,
    pub(crate) median_alert_ms: Option<i64>,
    pub(crate) worst_alert_ms: Option<i64>,
    pub(crate) median_cut_off_ms: Option<i64>,
    pub(crate) worst_cut_off_ms: Option<i64>,
}

/// The whole detection report.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DrillReport {
    pub(crate) healthy_devices: usize,
    pub(crate) summary: Vec<ScenarioSummary>,
    pub(crate) scenarios: Vec<ScenarioResult>,
    /// Alerts (not `info`) on devices nobody attacked.
    pub(crate) false_alerts: usize,
    pub(crate) false_alert_devices: usize,
    /// Healthy devices cut off.
    pub(crate) false_cut_offs: usize,
    /// Each wrongly cut-off device with the detectors of its alerts, in order.
    pub(crate) false_cut_off_devices: BTreeMap<String, Vec<String>>,
    pub(crate) false_alert_detectors: BTreeMap<String, usize>,
    pub(crate) healthy_readings_acked: u64,
    pub(crate) total_alerts: usize,
}

impl std::fmt::Display for DrillReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<i64>| v.map_or("-".to_owned(), |v| v.to_string());
        writeln!(
            f,
            "{:<26} {:>8} {:>8} {:>9} {:>9} {:>10} {:>10}",
            "scenario", "detected", "cut off", "alert p50", "alert max", "cut p50 ms", "cut max ms"
        )?;
        for s in &self.summary {
            let cut = if s.cut_off_expected {
                format!("{}/{}", s.cut_off, s.victims)
            } else {
                format!("{}/0 ok", s.cut_off)
            };
            writeln!(
                f,
                "{:<26} {:>8} {:>8} {:>9} {:>9} {:>10} {:>10}",
                s.scenario,
                format!("{}/{}", s.detected, s.victims),
                cut,
                ms(s.median_alert_ms),
                ms(s.worst_alert_ms),
                ms(s.median_cut_off_ms),
                ms(s.worst_cut_off_ms)
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "{:<26} {:<14} {:<9} {:<8} {:>10} {:>12}  detectors",
            "scenario", "device", "detected", "cut off", "alert ms", "cut-off ms"
        )?;
        for s in &self.scenarios {
            let cut = match (s.cut_off_expected, s.cut_off) {
                (true, true) => "yes",
                (true, false) => "MISSED",
                (false, false) => "no (ok)",
                (false, true) => "WRONG",
            };
            writeln!(
                f,
                "{:<26} {:<14} {:<9} {:<8} {:>10} {:>12}  {}",
                s.scenario,
                s.device_id,
                if s.detected { "yes" } else { "NO" },
                cut,
                ms(s.time_to_alert_ms),
                ms(s.time_to_cut_off_ms),
                s.detectors.join(",")
            )?;
        }
        writeln!(
            f,
            "healthy devices: {}; false alerts: {} on {} devices {:?}; false cut-offs: {}",
            self.healthy_devices,
            self.false_alerts,
            self.false_alert_devices,
            self.false_alert_detectors,
            self.false_cut_offs
        )?;
        for (device, alerts) in &self.false_cut_off_devices {
            writeln!(f, "  wrongly cut off: {device}")?;
            for alert in alerts {
                writeln!(f, "    {alert}")?;
            }
        }
        Ok(())
    }
}

pub(crate) async fn run(args: DrillArgs) -> anyhow::Result<DrillReport> {
    let scratch = tempfile::Builder::new().prefix("vigil-drill-").tempdir()?;
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config = VigilConfig {
        data_dir: scratch.path().to_owned(),
        ..VigilConfig::default()
    };
    config.ingest.mqtt_listen = loopback;
    config.grpc_listen = loopback;
    config.http_listen = loopback;
    config.store.flush_interval_ms = 15_000;
    // Train the fleet model once most of the warm-up is stored.
    config.detect.fleet.retrain_interval_s = (args.warmup_s * 2 / 3).max(5);
    config.detect.fleet.training_history_min = 10;

    let server = RunningServer::start(&config).await?;
    let token = std::fs::read_to_string(scratch.path().join("admin.token"))
        .context("the server did not create its admin token")?;
    let client = Client::connect(&format!("http://{}", server.grpc_address), token, None).await?;

    let per_scenario = args.victims.max(1);
    let mut fleet = generate_fleet(
        args.devices + (per_scenario + 1) * Scenario::ALL.len(),
        2026,
    );
    let victims = pick_victims(&mut fleet, per_scenario);
    let all: Vec<SimDevice> = fleet
        .iter()
        .chain(victims.iter().map(|(_, device)| device))
        .cloned()
        .collect();
    client
        .add_devices(parse_enrollment_csv(&enrollment_csv(&all))?)
        .await?;
    println!(
        "vigil drill: {} healthy devices and {} attacked ones at {} Hz; attacks after {} s",
        fleet.len(),
        victims.len(),
        args.rate_hz,
        args.warmup_s
    );

    let alerts = Arc::new(Mutex::new(Vec::<Alert>::new()));
    let collector = tokio::spawn(collect_alerts(client.clone(), alerts.clone()));

    let fleet_config = |duration_s: u64| FleetConfig {
        mqtt_host: server.mqtt_address.ip().to_string(),
        mqtt_port: server.mqtt_address.port(),
        readings_per_device_per_s: args.rate_hz,
        duration: Duration::from_secs(duration_s),
        token_lifetime_s: 300,
        max_inflight_per_device: 8,
        progress: false,
        connect_spread: Duration::from_secs(2),
    };
    let mut running: Vec<SimDevice> = fleet.clone();
    let mut replaced: Vec<SimDevice> = Vec::new();
    for (scenario, device) in &victims {
        if scenario.device_keeps_sending() {
            running.push(device.clone());
        } else {
            replaced.push(device.clone());
        }
    }
    let healthy_run = {
        let config = fleet_config(args.warmup_s + args.attack_s);
        tokio::spawn(async move { run_fleet(&running, &config).await })
    };
    let replaced_report = run_fleet(&replaced, &fleet_config(args.warmup_s)).await?;

    let bystanders: Vec<String> = fleet.iter().take(5).map(|d| d.device_id.clone()).collect();
    let mut attacks = tokio::task::JoinSet::new();
    for (scenario, device) in &victims {
        let last_seq = replaced_report
            .per_device_last_acked_seq
            .get(&device.device_id)
            .copied()
            .unwrap_or((args.rate_hz * args.warmup_s as f64) as u64);
        let plan = AttackPlan {
            scenario: *scenario,
            victim: device.clone(),
            bystanders: bystanders.clone(),
            server: server.mqtt_address,
            source: IpAddr::V4(if *scenario == Scenario::CredentialStuffing {
                STUFFING_SOURCE
            } else {
                Ipv4Addr::new(127, 0, 0, 2)
            }),
            last_seq,
            device_rate_hz: args.rate_hz,
            duration: Duration::from_secs(args.attack_s),
        };
        attacks.spawn(async move { run_attack(&plan).await });
    }
    let mut records: Vec<AttackRecord> = Vec::new();
    while let Some(outcome) = attacks.join_next().await {
        match outcome.context("an attack task panicked")? {
            Ok(record) => records.push(record),
            Err(error) => eprintln!("an attack failed to run: {error:#}"),
        }
    }
    let healthy_report = healthy_run.await.context("the fleet task panicked")??;

    // Let the last alerts reach the stream.
    tokio::time::sleep(Duration::from_secs(2)).await;
    collector.abort();
    let alerts = alerts.lock().clone();
    server.stop().await;

    let report = judge(
        &records,
        &victims,
        &alerts,
        fleet.len(),
        healthy_report.acked,
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(report)
}

/// Takes `per_scenario` attacked devices per scenario out of the fleet; physiological attacks
/// go to heart-rate monitors so their values are easy to read in the report.
fn pick_victims(fleet: &mut Vec<SimDevice>, per_scenario: usize) -> Vec<(Scenario, SimDevice)> {
    let mut victims = Vec::new();
    for _round in 0..per_scenario {
        for scenario in Scenario::ALL {
            if scenario == Scenario::CredentialStuffing {
                continue;
            }
            let wanted = |d: &SimDevice| {
                !matches!(scenario, Scenario::SpoofedVitals | Scenario::SlowDrift)
                    || d.class == DeviceClass::HeartRateMonitor
            };
            if let Some(index) = fleet.iter().rposition(wanted) {
                victims.push((scenario, fleet.remove(index)));
            }
        }
        // Credential stuffing targets a device that stays healthy: nobody holds its key.
        if let Some(device) = fleet.pop() {
            victims.push((Scenario::CredentialStuffing, device));
        }
    }
    victims
}

/// The median (upper, for an even count) and the largest of some times.
fn median_and_worst(mut times: Vec<i64>) -> (Option<i64>, Option<i64>) {
    times.sort_unstable();
    (times.get(times.len() / 2).copied(), times.last().copied())
}

fn summarise(results: &[ScenarioResult]) -> Vec<ScenarioSummary> {
    Scenario::ALL
        .iter()
        .filter_map(|scenario| {
            let of: Vec<&ScenarioResult> = results
                .iter()
                .filter(|r| r.scenario == scenario.name())
                .collect();
            if of.is_empty() {
                return None;
            }
            let (median_alert_ms, worst_alert_ms) =
                median_and_worst(of.iter().filter_map(|r| r.time_to_alert_ms).collect());
            let (median_cut_off_ms, worst_cut_off_ms) =
                median_and_worst(of.iter().filter_map(|r| r.time_to_cut_off_ms).collect());
            Some(ScenarioSummary {
                scenario: scenario.name(),
                cut_off_expected: scenario.cut_off_expected(),
                victims: of.len(),
                detected: of.iter().filter(|r| r.detected).count(),
                cut_off: of.iter().filter(|r| r.cut_off).count(),
                median_alert_ms,
                worst_alert_ms,
                median_cut_off_ms,
                worst_cut_off_ms,
            })
        })
        .collect()
}

/// Follows the alert stream like a SOC client, resuming after the last alert on errors.
async fn collect_alerts(client: Client, alerts: Arc<Mutex<Vec<Alert>>>) {
    let mut last = 0;
    loop {
        if let Ok(mut stream) = client.stream_alerts(last).await {
            while let Ok(Some(alert)) = stream.message().await {
                last = alert.alert_id;
                alerts.lock().push(alert);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Detectors that need no key: their alerts are about a source address, and name whichever
/// device id its failed logins used last.
const KEYLESS_DETECTORS: [&str; 2] = ["rule.credential_stuffing", "rule.login_flood"];

/// Source address of the credential-stuffing attacker; every other attacker uses `127.0.0.2`.
const STUFFING_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// Whether `alert` answers `scenario` on `device_id`. The stuffing scenario is answered by a
/// source throttled for its failed logins (the alert names the address and whichever device id
/// tipped it) or a login flood under its victim's id; every other scenario by the keyed
/// alerts of its device.
fn belongs_to(alert: &Alert, scenario: Scenario, device_id: &str) -> bool {
    let keyless = KEYLESS_DETECTORS.contains(&alert.detector.as_str());
    if scenario != Scenario::CredentialStuffing {
        return !keyless && alert.device_id == device_id;
    }
    match alert.detector.as_str() {
        "rule.credential_stuffing" => alert.summary.contains(&STUFFING_SOURCE.to_string()),
        "rule.login_flood" => alert.device_id == device_id,
        _ => false,
    }
}

fn judge(
    records: &[AttackRecord],
    victims: &[(Scenario, SimDevice)],
    alerts: &[Alert],
    healthy_devices: usize,
    healthy_readings_acked: u64,
) -> DrillReport {
    let mut scenarios = Vec::new();
    for (scenario, device) in victims {
        let record = records.iter().find(|r| r.device_id == device.device_id);
        let started = record.map_or(i64::MAX, |r| r.started_at_ms);
        let on_device: Vec<&Alert> = alerts
            .iter()
            .filter(|a| a.raised_at_ms >= started - 500 && a.severity != "info")
            .filter(|a| belongs_to(a, *scenario, &device.device_id))
            .collect();
        let cut = on_device.iter().find(|a| a.action == "quarantined");
        let mut detectors: Vec<String> = on_device.iter().map(|a| a.detector.clone()).collect();
        detectors.dedup();
        scenarios.push(ScenarioResult {
            scenario: scenario.name(),
            device_id: device.device_id.clone(),
            cut_off_expected: scenario.cut_off_expected(),
            detected: !on_device.is_empty(),
            cut_off: cut.is_some(),
            time_to_alert_ms: on_device.first().map(|a| a.raised_at_ms - started),
            time_to_cut_off_ms: cut.map(|a| a.raised_at_ms - started),
            detectors,
            attack_messages: record.map_or(0, |r| r.messages_sent),
        });
    }

    let attacked: Vec<&str> = victims.iter().map(|(_, d)| d.device_id.as_str()).collect();
    // Credential stuffing also names bystanders: alerts about failed logins under their ids
    // are right, not false.
    let false_alerts: Vec<&Alert> = alerts
        .iter()
        .filter(|a| !a.device_id.is_empty() && !attacked.contains(&a.device_id.as_str()))
        .filter(|a| a.severity != "info" && !KEYLESS_DETECTORS.contains(&a.detector.as_str()))
        .collect();
    let mut false_alert_detectors = BTreeMap::new();
    for alert in &false_alerts {
        *false_alert_detectors
            .entry(alert.detector.clone())
            .or_insert(0) += 1;
    }
    let mut devices: Vec<&str> = false_alerts.iter().map(|a| a.device_id.as_str()).collect();
    devices.sort_unstable();
    devices.dedup();
    let mut cut: Vec<&str> = alerts
        .iter()
        .filter(|a| a.action == "quarantined" && !attacked.contains(&a.device_id.as_str()))
        .map(|a| a.device_id.as_str())
        .collect();
    cut.extend(
        alerts
            .iter()
            .filter(|a| {
                a.action == "quarantined"
                    && victims
                        .iter()
                        .any(|(s, d)| !s.cut_off_expected() && d.device_id == a.device_id)
            })
            .map(|a| a.device_id.as_str()),
    );
    cut.sort_unstable();
    cut.dedup();
    let false_cut_off_devices = cut
        .iter()
        .map(|device| {
            let detectors = alerts
                .iter()
                .filter(|a| a.device_id == *device && a.severity != "info")
                .map(|a| format!("{}: {}", a.detector, a.summary))
                .collect();
            (device.to_string(), detectors)
        })
        .collect();

    DrillReport {
        healthy_devices,
        summary: summarise(&scenarios),
        scenarios,
        false_alerts: false_alerts.len(),
        false_alert_devices: devices.len(),
        false_cut_offs: cut.len(),
        false_cut_off_devices,
        false_alert_detectors,
        healthy_readings_acked,
        total_alerts: alerts.len(),
    }
}
