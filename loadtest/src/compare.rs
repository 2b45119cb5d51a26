//! `vigil-loadtest compare`: vigil, Mosquitto and rumqttd side by side, back to back on this
//! machine, each fed the same signed corpus by the same simulated fleet.
//!
//! For each fleet size the corpus is signed once (or read from the cache); then each server is
//! started fresh, measured, and stopped before the next one starts. vigil verifies, stores and
//! watches every reading and is checked by SQL afterwards: `lost` counts acknowledged readings
//! it does not have, `duplicated` extra stored copies. The brokers store nothing that could be
//! checked, so for them both come from the PUBACKs the devices got: `lost` counts readings
//! never acknowledged, `duplicated` readings published again after a reconnect (QoS 1 delivers
//! those at least once more).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::fleet::{FleetConfig, generate_fleet};
use crate::measure::{VerifyOnly, measure_run, signed_corpus, verify_only};
use crate::sql::SqlClient;
use crate::targets::{RunningTarget, TargetKind, enroll};

/// Most signatures the verification-only figure checks.
const VERIFY_ONLY_LIMIT: usize = 100_000;
/// How long SQL may take to show every acknowledged reading.
const SQL_SETTLE: Duration = Duration::from_secs(10);

/// What to compare.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// Fleet sizes, one round of all targets each.
    pub device_counts: Vec<usize>,
    /// How long each device sends.
    pub duration: Duration,
    /// Readings per device per second.
    pub rate_hz: f64,
    /// Seed of the fleet's keys and patients.
    pub seed: u64,
    /// The vigil release binary.
    pub vigil_bin: PathBuf,
    /// Mosquitto, when installed.
    pub mosquitto_bin: Option<PathBuf>,
    /// The rumqttd peer, when built.
    pub rumqttd_bin: Option<PathBuf>,
    /// Where signed corpora are kept between runs.
    pub corpus_dir: Option<PathBuf>,
    /// Print a progress line per second.
    pub progress: bool,
}

/// One target at one fleet size.
#[derive(Debug, Clone, Serialize)]
pub struct TargetResult {
    /// `vigil`, `mosquitto` or `rumqttd`.
    pub name: String,
    /// Devices in the fleet.
    pub devices: usize,
    /// Distinct readings acknowledged per second of the run.
    pub acked_per_s: f64,
    /// PUBACK latency from send, median, ms.
    pub puback_p50_ms: f64,
    /// PUBACK latency from send, 99th percentile, ms.
    pub puback_p99_ms: f64,
    /// Server CPU time per acknowledged reading, µs.
    pub server_cpu_us_per_msg: f64,
    /// See the module documentation: by SQL for vigil, by PUBACK for the brokers.
    pub lost: u64,
    /// See the module documentation: by SQL for vigil, by PUBACK for the brokers.
    pub duplicated: u64,
    /// Readings offered by the fleet.
    pub offered: u64,
    /// Readings never acknowledged.
    pub not_acked: u64,
    /// Highest resident memory of the server, KiB.
    pub server_peak_rss_kib: u64,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    /// Signatures per second that batch verification alone reaches on all cores.
    pub verify_only_per_s: f64,
    /// CPU time per signature of batch verification alone, µs on one core.
    pub verify_us_per_sig: f64,
    /// One entry per target and fleet size, in the order they ran.
    pub targets: Vec<TargetResult>,
    /// Targets left out and why.
    pub skipped: Vec<String>,
}

/// Runs the comparison.
///
/// # Errors
///
/// The vigil binary is missing, a server does not start, a fleet run fails, or a SQL check
/// fails.
pub async fn compare(config: &CompareConfig) -> anyhow::Result<CompareReport> {
    if !config.vigil_bin.is_file() {
        bail!(
            "vigil binary not found at {}; build it with `cargo build --release --workspace` \
             or pass --vigil-bin",
            config.vigil_bin.display()
        );
    }
    let mut skipped = Vec::new();
    let mosquitto = usable(
        config.mosquitto_bin.as_ref(),
        &mut skipped,
        "mosquitto",
        || "install Debian's mosquitto package (scripts/install-test-deps.sh)".to_owned(),
    );
    let rumqttd = usable(config.rumqttd_bin.as_ref(), &mut skipped, "rumqttd", || {
        "build it with `cargo build --release --manifest-path \
         loadtest/peers/rumqttd-peer/Cargo.toml --target-dir target/rumqttd-peer`"
            .to_owned()
    });

    let mut targets = Vec::new();
    let mut verify = None;
    let largest = config.device_counts.iter().copied().max().unwrap_or(0);
    for &device_count in &config.device_counts {
        let devices = generate_fleet(device_count, config.seed);
        let fleet_config = FleetConfig {
            readings_per_device_per_s: config.rate_hz,
            duration: config.duration,
            max_inflight_per_device: 16,
            progress: config.progress,
            connect_spread: connect_spread(device_count),
            ..FleetConfig::default()
        };
        let corpus = signed_corpus(
            &devices,
            config.seed,
            &fleet_config,
            config.corpus_dir.as_deref(),
            Duration::from_secs(6 * 24 * 3600),
        )
        .await?;
        if verify.is_none() && device_count == largest {
            let (devices, readings) = (devices.clone(), corpus.readings.clone());
            verify = Some(
                tokio::task::spawn_blocking(move || {
                    verify_only(&devices, &readings, VERIFY_ONLY_LIMIT)
                })
                .await
                .context("verification task failed")??,
            );
        }

        let mut kinds = vec![(TargetKind::Vigil, config.vigil_bin.clone())];
        kinds.extend(mosquitto.clone().map(|bin| (TargetKind::Mosquitto, bin)));
        kinds.extend(rumqttd.clone().map(|bin| (TargetKind::Rumqttd, bin)));
        for (kind, binary) in kinds {
            eprintln!("compare: {} with {device_count} devices", kind.name());
            let target = match kind {
                TargetKind::Vigil => RunningTarget::start_vigil(&binary)?,
                TargetKind::Mosquitto => RunningTarget::start_mosquitto(&binary)?,
                TargetKind::Rumqttd => RunningTarget::start_rumqttd(&binary, device_count + 100)?,
            };
            let sql = match (&target.server_url, &target.token) {
                (Some(url), Some(token)) => {
                    enroll(&config.vigil_bin, url, token, &devices)?;
                    Some(SqlClient::connect(url, token).await?)
                }
                _ => None,
            };
            let run_config = FleetConfig {
                mqtt_host: target.mqtt.ip().to_string(),
                mqtt_port: target.mqtt.port(),
                ..fleet_config.clone()
            };
            let run = measure_run(
                &devices,
                &run_config,
                corpus.readings.clone(),
                corpus.presign_s,
                Some(target.pid()),
            )
            .await?;

            let (lost, duplicated) = match &sql {
                Some(sql) => {
                    let stored = sql
                        .check_stored(&devices, &run.fleet.acked_seqs, SQL_SETTLE)
                        .await?;
                    (stored.lost, stored.duplicated)
                }
                None => (run.fleet.not_acked, run.fleet.resent),
            };
            targets.push(TargetResult {
                name: kind.name().to_owned(),
                devices: device_count,
                acked_per_s: run.fleet.acked_per_s,
                puback_p50_ms: run.fleet.latency_from_send_ms.p50,
                puback_p99_ms: run.fleet.latency_from_send_ms.p99,
                server_cpu_us_per_msg: run.cpu_us_per_reading().unwrap_or(0.0),
                lost,
                duplicated,
                offered: run.fleet.offered,
                not_acked: run.fleet.not_acked,
                server_peak_rss_kib: run.server_peak_rss_kib.unwrap_or(0),
            });
        }
    }

    let VerifyOnly {
        per_s, us_per_sig, ..
    } = verify.context("no fleet size given")?;
    Ok(CompareReport {
        verify_only_per_s: per_s,
        verify_us_per_sig: us_per_sig,
        targets,
        skipped,
    })
}

/// Devices connect over at least a second, and no faster than 1000 per second.
pub fn connect_spread(devices: usize) -> Duration {
    Duration::from_millis((devices as u64).max(1000))
}

fn usable(
    binary: Option<&PathBuf>,
    skipped: &mut Vec<String>,
    name: &str,
    how: impl FnOnce() -> String,
) -> Option<PathBuf> {
    match binary {
        Some(binary) if binary.is_file() => Some(binary.clone()),
        Some(binary) => {
            skipped.push(format!("{name}: {} not found; {}", binary.display(), how()));
            None
        }
        None => {
            skipped.push(format!("{name}: no binary given; {}", how()));
            None
        }
    }
}

impl fmt::Display for CompareReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "batch verification alone: {:.0} signatures/s on all cores, {:.1} µs per signature",
            self.verify_only_per_s, self.verify_us_per_sig
        )?;
        writeln!(
            f,
            "{:<10} {:>7} {:>10} {:>10} {:>10} {:>10} {:>8} {:>6} {:>6} {:>10}",
            "target",
            "devices",
            "acked/s",
            "p50 ms",
            "p99 ms",
            "cpu µs/msg",
            "peak MiB",
            "lost",
            "dup",
            "not acked"
        )?;
        for row in &self.targets {
            writeln!(
                f,
                "{:<10} {:>7} {:>10.0} {:>10.2} {:>10.2} {:>10.1} {:>8.0} {:>6} {:>6} {:>10}",
                row.name,
                row.devices,
                row.acked_per_s,
                row.puback_p50_ms,
                row.puback_p99_ms,
                row.server_cpu_us_per_msg,
                row.server_peak_rss_kib as f64 / 1024.0,
                row.lost,
                row.duplicated,
                row.not_acked
            )?;
        }

        let ratio = |vigil: f64, peer: f64| if peer > 0.0 { vigil / peer } else { 0.0 };
        for vigil in self.targets.iter().filter(|row| row.name == "vigil") {
            for peer in self
                .targets
                .iter()
                .filter(|row| row.devices == vigil.devices && row.name != "vigil")
            {
                writeln!(
                    f,
                    "vigil/{} at {} devices: acked/s ×{:.2}, p50 ×{:.1}, p99 ×{:.1}, \
                     cpu per msg ×{:.1}",
                    peer.name,
                    vigil.devices,
                    ratio(vigil.acked_per_s, peer.acked_per_s),
                    ratio(vigil.puback_p50_ms, peer.puback_p50_ms),
                    ratio(vigil.puback_p99_ms, peer.puback_p99_ms),
                    ratio(vigil.server_cpu_us_per_msg, peer.server_cpu_us_per_msg),
                )?;
            }
        }
        writeln!(
            f,
            "lost/dup: vigil checked by SQL (acknowledged but not stored / stored twice); \
             brokers store nothing, so from PUBACKs (never acknowledged / re-sent after a \
             reconnect)"
        )?;
        for note in &self.skipped {
            writeln!(f, "skipped {note}")?;
        }
        Ok(())
    }
}
