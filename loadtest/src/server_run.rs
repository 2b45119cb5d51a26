//! `vigil-loadtest run`: a fleet against a vigil server that is already running.
//!
//! Steps: enroll the fleet and a marker device (with `vigil devices import`), sign the corpus
//! or read it from the cache, run the fleet open-loop while the marker measures how soon a
//! reading is visible to SQL, then check by SQL what the server stored of every acknowledged
//! reading. With `closed_loop`, the run repeats with a fresh fleet at a rising rate until the
//! server stops keeping up, and reports the highest rate it sustained.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::compare::connect_spread;
use crate::fleet::{FleetConfig, SimDevice, generate_fleet};
use crate::measure::{MarkerDevice, measure_run, signed_corpus, summarize_delays};
use crate::report::{FleetReport, LatencySummary};
use crate::sql::{SqlClient, StoredCheck};
use crate::targets::enroll;

/// How often the marker device publishes.
const MARKER_INTERVAL: Duration = Duration::from_secs(1);
/// Each closed-loop step offers this much more than the previous one.
const RAMP_FACTOR: f64 = 1.5;
/// Most closed-loop steps.
const MAX_STEPS: u32 = 12;
/// A step is sustained when this share of what was offered is acknowledged ...
const SUSTAINED_SHARE: f64 = 0.97;
/// ... and the PUBACK p99 (from schedule) stays under this.
const SUSTAINED_P99_MS: f64 = 1_000.0;

/// Settings of `run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// MQTT listener, `host:port`.
    pub mqtt_host: String,
    /// MQTT port.
    pub mqtt_port: u16,
    /// gRPC address of the server, `http://host:port`.
    pub server_url: String,
    /// Admin token.
    pub token: String,
    /// vigil binary, for `vigil devices import`.
    pub vigil_bin: PathBuf,
    /// Devices in the fleet.
    pub devices: usize,
    /// Readings per device per second (the first step's, in closed loop).
    pub rate_hz: f64,
    /// How long each device sends (per step, in closed loop).
    pub duration: Duration,
    /// Seed of the fleet.
    pub seed: u64,
    /// Ramp the rate until the server stops keeping up.
    pub closed_loop: bool,
    /// Process id of the server, for CPU time and memory.
    pub server_pid: Option<u32>,
    /// Where signed corpora are kept between runs.
    pub corpus_dir: Option<PathBuf>,
    /// Oldest cached corpus to use, so that its readings stay within the server's clock skew
    /// bound (`max_clock_skew_ms`).
    pub max_corpus_age: Duration,
    /// Print a progress line per second.
    pub progress: bool,
}

/// What one fleet run at one rate achieved.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Devices in the fleet.
    pub devices: usize,
    /// Readings per device per second.
    pub rate_hz: f64,
    /// Readings offered per second: devices × rate.
    pub offered_per_s: f64,
    /// Distinct readings acknowledged per second of the run (drain included).
    pub acked_per_s: f64,
    /// PUBACK latency from send, ms.
    pub puback_ms: LatencySummary,
    /// Delay from publishing a marker reading until SQL shows it, ms.
    pub sql_visible_ms: LatencySummary,
    /// Acknowledged readings the server does not have, by SQL.
    pub lost: u64,
    /// Extra stored copies of readings, by SQL.
    pub duplicated: u64,
    /// Server CPU time during the run, seconds (absent without a server pid).
    pub server_cpu_s: Option<f64>,
    /// Server CPU time per acknowledged reading, µs.
    pub server_cpu_us_per_msg: Option<f64>,
    /// Highest resident memory of the server, MiB.
    pub server_peak_rss_mib: Option<f64>,
    /// Whether the corpus came from the cache.
    pub corpus_reused: bool,
    /// The fleet's full report.
    pub fleet: FleetReport,
}

/// The whole `run`.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// One step in open loop; the ramp in closed loop.
    pub steps: Vec<StepReport>,
    /// Closed loop: the highest offered rate the server sustained, readings per second.
    pub max_sustained_per_s: Option<f64>,
}

/// Runs the fleet (once, or ramping in closed loop).
///
/// # Errors
///
/// Enrollment, signing, the fleet run or a SQL check fails.
pub async fn run(config: &RunConfig) -> anyhow::Result<RunReport> {
    let sql = SqlClient::connect(&config.server_url, &config.token).await?;
    let mut steps = Vec::new();
    let mut max_sustained_per_s = None;
    let mut rate_hz = config.rate_hz;

    let step_count = if config.closed_loop { MAX_STEPS } else { 1 };
    for step in 0..u64::from(step_count) {
        // Each step has a fleet of its own: seqs start at 1 again on the same server.
        let seed = config.seed.wrapping_add(step);
        let report = run_step(config, &sql, seed, rate_hz).await?;
        let sustained = report.acked_per_s >= report.offered_per_s * SUSTAINED_SHARE
            && report.fleet.latency_from_schedule_ms.p99 < SUSTAINED_P99_MS
            && report.lost == 0;
        eprintln!(
            "step {}: offered {:.0}/s, acked {:.0}/s, p99 {:.1} ms: {}",
            step + 1,
            report.offered_per_s,
            report.acked_per_s,
            report.puback_ms.p99,
            if sustained {
                "sustained"
            } else {
                "not sustained"
            }
        );
        if sustained {
            max_sustained_per_s = Some(report.offered_per_s);
        }
        steps.push(report);
        if !sustained {
            break;
        }
        rate_hz *= RAMP_FACTOR;
    }

    Ok(RunReport {
        steps,
        max_sustained_per_s: max_sustained_per_s.filter(|_| config.closed_loop),
    })
}

async fn run_step(
    config: &RunConfig,
    sql: &SqlClient,
    seed: u64,
    rate_hz: f64,
) -> anyhow::Result<StepReport> {
    let devices = generate_fleet(config.devices, seed);
    let marker = MarkerDevice::new(seed);
    let mut enrolled: Vec<SimDevice> = devices.clone();
    enrolled.push(marker.device.clone());
    enroll(
        &config.vigil_bin,
        &config.server_url,
        &config.token,
        &enrolled,
    )
    .context("enrolling the fleet (a fleet already enrolled needs another --seed)")?;

    let fleet_config = FleetConfig {
        mqtt_host: config.mqtt_host.clone(),
        mqtt_port: config.mqtt_port,
        readings_per_device_per_s: rate_hz,
        duration: config.duration,
        max_inflight_per_device: 16,
        progress: config.progress,
        connect_spread: connect_spread(config.devices),
        ..FleetConfig::default()
    };
    let corpus = signed_corpus(
        &devices,
        seed,
        &fleet_config,
        config.corpus_dir.as_deref(),
        config.max_corpus_age,
    )
    .await?;

    let probe_until = Instant::now() + fleet_config.connect_spread + config.duration;
    let probe = {
        let (marker, sql, host) = (marker.clone(), sql.clone(), config.mqtt_host.clone());
        let port = config.mqtt_port;
        tokio::spawn(async move {
            marker
                .probe(&host, port, &sql, MARKER_INTERVAL, probe_until)
                .await
        })
    };
    let run = measure_run(
        &devices,
        &fleet_config,
        corpus.readings,
        corpus.presign_s,
        config.server_pid,
    )
    .await?;
    let delays = probe.await.context("the marker task panicked")?;
    let StoredCheck { lost, duplicated } = sql
        .check_stored(&devices, &run.fleet.acked_seqs, Duration::from_secs(10))
        .await?;

    Ok(StepReport {
        devices: config.devices,
        rate_hz,
        offered_per_s: config.devices as f64 * rate_hz,
        acked_per_s: run.fleet.acked_per_s,
        puback_ms: run.fleet.latency_from_send_ms,
        sql_visible_ms: summarize_delays(&delays),
        lost,
        duplicated,
        server_cpu_s: run.server_cpu_us.map(|us| us as f64 / 1e6),
        server_cpu_us_per_msg: run.cpu_us_per_reading(),
        server_peak_rss_mib: run.server_peak_rss_kib.map(|kib| kib as f64 / 1024.0),
        corpus_reused: corpus.reused,
        fleet: run.fleet,
    })
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (index, step) in self.steps.iter().enumerate() {
            if self.steps.len() > 1 {
                writeln!(
                    f,
                    "--- step {} ({:.2} readings/s per device)",
                    index + 1,
                    step.rate_hz
                )?;
            }
            write!(f, "{}", step.fleet)?;
            writeln!(
                f,
                "offered {:.0} readings/s, acknowledged {:.0}/s; PUBACK p50 {:.2} ms, p99 {:.2} ms, \
                 p99.9 {:.2} ms",
                step.offered_per_s,
                step.acked_per_s,
                step.puback_ms.p50,
                step.puback_ms.p99,
                step.puback_ms.p999
            )?;
            writeln!(
                f,
                "visible to SQL after publish: p50 {:.1} ms, max {:.1} ms ({} marker readings)",
                step.sql_visible_ms.p50, step.sql_visible_ms.max, step.sql_visible_ms.count
            )?;
            writeln!(
                f,
                "checked by SQL: {} acknowledged readings lost, {} duplicated",
                step.lost, step.duplicated
            )?;
            match (
                step.server_cpu_s,
                step.server_cpu_us_per_msg,
                step.server_peak_rss_mib,
            ) {
                (Some(cpu_s), Some(per_msg), Some(peak)) => writeln!(
                    f,
                    "server: {cpu_s:.2} s CPU, {per_msg:.1} µs per reading, peak memory {peak:.0} MiB"
                )?,
                _ => writeln!(f, "server: CPU and memory not measured (no --server-pid)")?,
            }
        }
        if let Some(rate) = self.max_sustained_per_s {
            writeln!(f, "highest sustained rate: {rate:.0} readings/s")?;
        }
        Ok(())
    }
}
