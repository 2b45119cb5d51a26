//! Pieces shared by the `run` and `compare` commands: the signed corpus kept on disk between
//! runs, one measured fleet run against a server process, the SQL visibility probe, and the
//! verification-only figure.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use prost::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;
use vigil_proto::v1::{Reading, SignedReading};

use crate::corpus::{PresignedReadings, load_corpus, save_corpus};
use crate::fleet::{
    FleetConfig, SimDevice, plan_schedules, presign_in_background, run_presigned, unix_ms,
};
use crate::profiles::{DeviceClass, Patient};
use crate::report::{FleetReport, LatencySummary};
use crate::sql::SqlClient;
use crate::usage::ProcessUsage;

/// Readings signed for one fleet and schedule, possibly by an earlier run.
#[derive(Debug)]
pub struct SignedCorpus {
    /// Each device's readings, in fleet order.
    pub readings: Vec<PresignedReadings>,
    /// Seconds spent signing now (0 when the corpus came from disk).
    pub presign_s: f64,
    /// Whether the corpus came from disk.
    pub reused: bool,
}

/// The corpus for `devices` under `config`: read from `cache_dir` when a file for the same
/// seed, fleet size, rate, duration and connect spread is there and younger than `max_age`,
/// otherwise signed now on all cores and written there.
///
/// # Errors
///
/// Signing fails, or the cache directory cannot be written.
pub async fn signed_corpus(
    devices: &[SimDevice],
    seed: u64,
    config: &FleetConfig,
    cache_dir: Option<&Path>,
    max_age: Duration,
) -> anyhow::Result<SignedCorpus> {
    let schedules = plan_schedules(devices, config);
    let path = cache_dir.map(|dir| {
        dir.join(format!(
            "fleet-seed{seed}-devices{}-rate{}hz-{}ms-spread{}ms.corpus",
            devices.len(),
            config.readings_per_device_per_s,
            config.duration.as_millis(),
            config.connect_spread.as_millis()
        ))
    });

    if let Some(path) = path.as_deref().filter(|path| path.exists()) {
        match load_corpus(path) {
            Ok((start_unix_ms, readings)) => {
                let age_ms = unix_ms(SystemTime::now()).saturating_sub(start_unix_ms);
                let fits = readings.len() == devices.len()
                    && readings
                        .iter()
                        .zip(&schedules)
                        .all(|(readings, schedule)| readings.len() == schedule.count);
                if fits && u128::try_from(age_ms).unwrap_or(0) <= max_age.as_millis() {
                    return Ok(SignedCorpus {
                        readings,
                        presign_s: 0.0,
                        reused: true,
                    });
                }
            }
            Err(error) => tracing::warn!(%error, "signing the corpus again"),
        }
    }

    let started = Instant::now();
    let start_unix_ms = unix_ms(SystemTime::now());
    let readings = presign_in_background(devices, &schedules, start_unix_ms).await?;
    let presign_s = started.elapsed().as_secs_f64();
    if let Some(path) = &path {
        save_corpus(path, start_unix_ms, &readings)?;
    }
    Ok(SignedCorpus {
        readings,
        presign_s,
        reused: false,
    })
}

/// The default corpus cache: `target/loadtest-corpus/` beside the build directory of this
/// executable.
pub fn default_corpus_dir() -> Option<PathBuf> {
    let build_dir = crate::targets::build_dir()?;
    Some(build_dir.parent()?.join("loadtest-corpus"))
}

/// Raises this process's open-file limit to its hard limit: every simulated device holds one
/// socket. Returns the limit now in force.
///
/// # Errors
///
/// The limit cannot be read or set.
pub fn raise_open_file_limit() -> anyhow::Result<u64> {
    let (_, hard) = rlimit::Resource::NOFILE.get()?;
    rlimit::Resource::NOFILE
        .set(hard, hard)
        .context("cannot raise the open-file limit")?;
    Ok(hard)
}

/// A fleet run measured against one server process.
#[derive(Debug)]
pub struct MeasuredRun {
    /// What the devices saw.
    pub fleet: FleetReport,
    /// Server CPU time during the run, microseconds (user plus system).
    pub server_cpu_us: Option<u64>,
    /// Highest resident memory of the server since it started, KiB.
    pub server_peak_rss_kib: Option<u64>,
}

impl MeasuredRun {
    /// Server CPU time per acknowledged reading, microseconds.
    pub fn cpu_us_per_reading(&self) -> Option<f64> {
        let acked = self.fleet.acked.max(1) as f64;
        self.server_cpu_us.map(|cpu_us| cpu_us as f64 / acked)
    }
}

/// Runs the fleet with its signed corpus and reads the server's CPU time before and after.
///
/// # Errors
///
/// The fleet run fails (see [`run_presigned`]).
pub async fn measure_run(
    devices: &[SimDevice],
    config: &FleetConfig,
    corpus: Vec<PresignedReadings>,
    presign_s: f64,
    server_pid: Option<u32>,
) -> anyhow::Result<MeasuredRun> {
    let usage = || server_pid.and_then(|pid| ProcessUsage::read(pid).ok());
    let before = usage();
    let run_start = Instant::now() + Duration::from_millis(200);
    let fleet = run_presigned(devices, config, corpus, run_start, presign_s).await?;
    let after = usage();

    Ok(MeasuredRun {
        fleet,
        server_cpu_us: before
            .zip(after)
            .map(|(before, after)| after.cpu_us.saturating_sub(before.cpu_us)),
        server_peak_rss_kib: after.map(|after| after.peak_rss_kib),
    })
}

/// One device, not part of the fleet, whose readings are published one at a time while the
/// fleet runs and looked for with SQL right after their PUBACK.
#[derive(Debug, Clone)]
pub struct MarkerDevice {
    /// The simulated device (enroll it with the fleet).
    pub device: SimDevice,
}

impl MarkerDevice {
    /// A marker with an id of its own for each run, so that its seqs start at 1 on a server
    /// that has seen earlier runs.
    pub fn new(seed: u64) -> Self {
        let run_id = unix_ms(SystemTime::now());
        let mut secret = [0u8; 32];
        secret[..8].copy_from_slice(&seed.to_le_bytes());
        secret[8..16].copy_from_slice(&run_id.to_le_bytes());
        Self {
            device: SimDevice {
                device_id: format!("loadtest-marker-{run_id}"),
                class: DeviceClass::ALL[0],
                signing_key: SigningKey::from_bytes(&secret),
            },
        }
    }

    /// Publishes a marker reading every `interval` until `until`, each time measuring from the
    /// publish until SQL shows it. Returns the delays; a marker not visible within 10 s, or
    /// a connection failure, ends the probe with what it has.
    pub async fn probe(
        &self,
        mqtt_host: &str,
        mqtt_port: u16,
        sql: &SqlClient,
        interval: Duration,
        until: Instant,
    ) -> Vec<Duration> {
        const VISIBLE_WITHIN: Duration = Duration::from_secs(10);
        let device = &self.device;
        let mut options = MqttOptions::new(&device.device_id, mqtt_host, mqtt_port);
        let now_s = unix_ms(SystemTime::now()) as u64 / 1000;
        let token =
            vigil_proto::fresh_login_token(&device.signing_key, &device.device_id, now_s, 300);
        options
            .set_credentials(device.device_id.as_str(), token)
            .set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 4);
        let topic = vigil_proto::readings_topic(&device.device_id);
        let mut patient = Patient::new(device.class, 7);
        let mut delays = Vec::new();

        for seq in 1.. {
            if Instant::now() + interval > until {
                break;
            }
            tokio::time::sleep(interval).await;
            let sampled_at_ms = unix_ms(SystemTime::now());
            let reading = Reading {
                device_id: device.device_id.clone(),
                seq,
                sampled_at_ms,
                measurements: patient.sample(sampled_at_ms),
            };
            let payload = vigil_proto::sign_reading(&device.signing_key, &reading).encode_to_vec();
            let published = Instant::now();
            if client
                .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                break;
            }
            let acked = loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => break true,
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "marker device lost its connection");
                        break false;
                    }
                }
            };
            if !acked {
                break;
            }
            let visible = tokio::time::timeout(VISIBLE_WITHIN, async {
                while !sql
                    .has_reading(&device.device_id, seq)
                    .await
                    .unwrap_or(false)
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
            if visible.is_err() {
                tracing::warn!(seq, "marker reading not visible to SQL within 10 s");
                break;
            }
            delays.push(published.elapsed());
        }
        delays
    }
}

/// Percentiles of SQL visibility delays.
pub fn summarize_delays(delays: &[Duration]) -> LatencySummary {
    let mut ms: Vec<f64> = delays
        .iter()
        .map(|delay| delay.as_secs_f64() * 1e3)
        .collect();
    ms.sort_by(f64::total_cmp);
    let at = |quantile: f64| {
        let index = ((ms.len() as f64 - 1.0) * quantile).round() as usize;
        ms.get(index).copied().unwrap_or(0.0)
    };
    LatencySummary {
        count: ms.len() as u64,
        p50: at(0.5),
        p99: at(0.99),
        p999: at(0.999),
        max: ms.last().copied().unwrap_or(0.0),
    }
}

/// Batch verification alone, on every core, of the corpus's signatures.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct VerifyOnly {
    /// Signatures verified per second with all cores busy.
    pub per_s: f64,
    /// CPU time per signature on one core, microseconds.
    pub us_per_sig: f64,
    /// Signatures verified.
    pub signatures: u64,
}

/// Verifies up to `limit` signatures of the corpus the way the server does: decompressed keys
/// cached per device, batches of up to 512, one thread per core, nothing else running.
///
/// # Errors
///
/// A payload does not decode, or a batch does not verify.
pub fn verify_only(
    devices: &[SimDevice],
    corpus: &[PresignedReadings],
    limit: usize,
) -> anyhow::Result<VerifyOnly> {
    const BATCH: usize = 512;
    let mut items: Vec<(Vec<u8>, Signature, VerifyingKey)> = Vec::new();
    'devices: for round in 1.. {
        let mut any = false;
        for (device, readings) in devices.iter().zip(corpus) {
            let Some(payload) = readings.payload(round) else {
                continue;
            };
            any = true;
            let signed = SignedReading::decode(payload).context("corpus payload")?;
            let signature = Signature::from_slice(&signed.signature)?;
            let message = vigil_proto::reading_signing_message(&signed.reading);
            items.push((message, signature, device.signing_key.verifying_key()));
            if items.len() >= limit {
                break 'devices;
            }
        }
        if !any {
            break;
        }
    }
    anyhow::ensure!(!items.is_empty(), "the corpus holds no readings to verify");

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = items.len().div_ceil(threads);
    let items = Arc::new(items);
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = items
            .chunks(share)
            .map(|mine| {
                scope.spawn(move || -> anyhow::Result<()> {
                    for batch in mine.chunks(BATCH) {
                        let messages: Vec<&[u8]> = batch.iter().map(|item| &item.0[..]).collect();
                        let signatures: Vec<Signature> = batch.iter().map(|item| item.1).collect();
                        let keys: Vec<VerifyingKey> = batch.iter().map(|item| item.2).collect();
                        ed25519_dalek::verify_batch(&messages, &signatures, &keys)
                            .context("a corpus batch did not verify")?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a verification thread panicked"))??;
        }
        Ok(())
    })?;
    let elapsed_s = started.elapsed().as_secs_f64();

    let signatures = items.len() as u64;
    Ok(VerifyOnly {
        per_s: signatures as f64 / elapsed_s,
        us_per_sig: elapsed_s * threads as f64 * 1e6 / signatures as f64,
        signatures,
    })
}
