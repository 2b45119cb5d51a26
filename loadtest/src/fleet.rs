//! A simulated fleet: device identities, their enrollment file, and a timed run against an MQTT
//! server that speaks the `v1` device contract.
//!
//! A run goes in three steps:
//!
//! 1. **Plan.** Each device gets a schedule: `n = rate × duration` readings, seq 1 to `n`, the
//!    first one at the device's connect slot (spread over `connect_spread`) plus a phase offset
//!    within one interval, so that devices do not all send in the same instant.
//! 2. **Pre-sign.** Every reading of the run is generated, encoded and signed before the first
//!    connect, on all cores, with `sampled_at_ms` set to the reading's planned send time. The run
//!    start is chosen far enough ahead that signing finishes first, so signing never limits the
//!    send rate during the run.
//! 3. **Send.** One tokio task per device drives its own MQTT session (see [`crate::session`])
//!    on an open-loop schedule: reading `k` is published when it is due, whether or not earlier
//!    ones have been acknowledged, up to `max_inflight_per_device` unacknowledged readings.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;

use crate::corpus::{DeviceSchedule, PresignedReadings, presign_fleet};
use crate::profiles::DeviceClass;
use crate::report::{FleetReport, FleetStats, finish_progress, report_progress};
use crate::session::{DeviceRun, SessionSettings, run_device};

/// How long a device keeps waiting for PUBACKs after its last reading was due.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// One simulated device: its identity, what it measures, and its private key.
#[derive(Debug, Clone)]
pub struct SimDevice {
    /// The device id, e.g. `sim-hrm-00042`; also the MQTT client id and username.
    pub device_id: String,
    /// What the device measures.
    pub class: DeviceClass,
    /// The device's Ed25519 key; the server is enrolled with its public half.
    pub signing_key: SigningKey,
}

impl SimDevice {
    /// Seed of the simulated patient behind this device, derived from its id and public key so
    /// that the same fleet always produces the same readings.
    pub fn patient_seed(&self) -> u64 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let public_key = self.signing_key.verifying_key();
        for byte in self
            .device_id
            .bytes()
            .chain(public_key.as_bytes().iter().copied())
        {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash
    }
}

/// `count` devices with ids `sim-<class>-<index>` and keys drawn from `seed`; classes take
/// turns, so every class is represented once the fleet has six devices.
pub fn generate_fleet(count: usize, seed: u64) -> Vec<SimDevice> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|index| {
            let class = DeviceClass::ALL[index % DeviceClass::ALL.len()];
            let secret: [u8; 32] = rng.r#gen();
            SimDevice {
                device_id: format!("sim-{}-{index:05}", class.short_name()),
                class,
                signing_key: SigningKey::from_bytes(&secret),
            }
        })
        .collect()
}

/// The enrollment file for `vigil devices import`: a `device_id,public_key_hex,class` header,
/// then one line per device.
pub fn enrollment_csv(devices: &[SimDevice]) -> String {
    let mut csv = String::from("device_id,public_key_hex,class\n");
    for device in devices {
        let public_key = hex::encode(device.signing_key.verifying_key().as_bytes());
        // Writing to a String cannot fail.
        let _ = writeln!(
            csv,
            "{},{public_key},{}",
            device.device_id,
            device.class.name()
        );
    }
    csv
}

/// Settings of one fleet run.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Host name or address of the MQTT listener.
    pub mqtt_host: String,
    /// TCP port of the MQTT listener (plain MQTT 3.1.1, no TLS).
    pub mqtt_port: u16,
    /// Readings each device sends per second; may be below 1 (0.2 is one every 5 s).
    pub readings_per_device_per_s: f64,
    /// How long each device sends, from its first reading; the device count times
    /// `readings_per_device_per_s` times this is the number of readings offered.
    pub duration: Duration,
    /// Lifetime of each login token, seconds; must not exceed the server's maximum.
    pub token_lifetime_s: u64,
    /// Unacknowledged readings a device may have at once; further due readings wait.
    pub max_inflight_per_device: u16,
    /// Print a progress line per second to stderr.
    pub progress: bool,
    /// Devices connect evenly spread over this window instead of all at once.
    pub connect_spread: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            mqtt_host: "127.0.0.1".to_owned(),
            mqtt_port: 1883,
            readings_per_device_per_s: 1.0,
            duration: Duration::from_secs(10),
            token_lifetime_s: 300,
            max_inflight_per_device: 10,
            progress: false,
            connect_spread: Duration::from_secs(1),
        }
    }
}

impl FleetConfig {
    /// Readings each device sends: `rate × duration`, rounded, at least one.
    pub fn readings_per_device(&self) -> u64 {
        let planned = (self.readings_per_device_per_s * self.duration.as_secs_f64()).round();
        (planned as u64).max(1)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let rate = self.readings_per_device_per_s;
        if !(rate.is_finite() && rate > 0.0 && rate <= 1_000.0) {
            bail!("readings_per_device_per_s must be above 0 and at most 1000, got {rate}");
        }
        if self.max_inflight_per_device == 0 {
            bail!("max_inflight_per_device must be at least 1");
        }
        if self.token_lifetime_s == 0 {
            bail!("token_lifetime_s must be at least 1");
        }
        Ok(())
    }
}

/// The schedule of every device: connect slots spread evenly over `connect_spread`, each with a
/// phase within one send interval drawn from the device's patient seed.
pub fn plan_schedules(devices: &[SimDevice], config: &FleetConfig) -> Vec<DeviceSchedule> {
    let interval = Duration::from_secs_f64(1.0 / config.readings_per_device_per_s);
    let count = config.readings_per_device();
    let spread_step = config.connect_spread.div_f64(devices.len().max(1) as f64);

    devices
        .iter()
        .enumerate()
        .map(|(index, device)| {
            let phase_fraction = (device.patient_seed() >> 11) as f64 / (1u64 << 53) as f64;
            let connect_offset = spread_step.mul_f64(index as f64);
            DeviceSchedule {
                connect_offset,
                first_offset: connect_offset + interval.mul_f64(phase_fraction),
                interval,
                count,
            }
        })
        .collect()
}

/// Runs the fleet against the MQTT server in `config` and reports what was acknowledged.
///
/// # Errors
///
/// A setting is out of range, pre-signing fails, or a device task panics. Connection trouble is
/// not an error: it is counted in the report.
pub async fn run_fleet(devices: &[SimDevice], config: &FleetConfig) -> anyhow::Result<FleetReport> {
    config.validate()?;
    let schedules = plan_schedules(devices, config);

    // Pick a start that signing will have reached, so `sampled_at_ms` matches the send time.
    let total_readings = config
        .readings_per_device()
        .saturating_mul(devices.len() as u64);
    let signing_budget = estimate_signing_time(devices.first(), total_readings);
    let planned_start = Instant::now() + signing_budget;
    let start_unix_ms = unix_ms(SystemTime::now() + signing_budget);

    let signing_started = Instant::now();
    let presigned = presign_in_background(devices, &schedules, start_unix_ms).await?;
    let presign_s = signing_started.elapsed().as_secs_f64();

    let run_start = wait_for_start(planned_start).await;
    run_presigned(devices, config, presigned, run_start, presign_s).await
}

/// [`presign_fleet`] on the blocking thread pool, so that the runtime keeps serving.
///
/// # Errors
///
/// As [`presign_fleet`], or the signing task panicked.
pub async fn presign_in_background(
    devices: &[SimDevice],
    schedules: &[DeviceSchedule],
    start_unix_ms: i64,
) -> anyhow::Result<Vec<PresignedReadings>> {
    let devices = devices.to_vec();
    let schedules = schedules.to_vec();
    tokio::task::spawn_blocking(move || presign_fleet(&devices, &schedules, start_unix_ms))
        .await
        .context("pre-signing task failed")?
}

/// Runs the fleet with readings signed beforehand for the schedules of [`plan_schedules`]
/// (`presigned[i]` belongs to `devices[i]`), starting at `run_start`.
///
/// # Errors
///
/// A setting is out of range, the corpus does not fit the fleet, or a device task panics.
pub async fn run_presigned(
    devices: &[SimDevice],
    config: &FleetConfig,
    presigned: Vec<PresignedReadings>,
    run_start: Instant,
    presign_s: f64,
) -> anyhow::Result<FleetReport> {
    config.validate()?;
    let schedules = plan_schedules(devices, config);
    let fits = presigned.len() == devices.len()
        && presigned
            .iter()
            .zip(&schedules)
            .all(|(readings, schedule)| readings.len() == schedule.count);
    if !fits {
        bail!("the signed corpus was made for another fleet or schedule; sign it again");
    }
    let total_readings = schedules.iter().map(|schedule| schedule.count).sum();

    let stats = Arc::new(FleetStats::new()?);
    let progress = config
        .progress
        .then(|| tokio::spawn(report_progress(Arc::clone(&stats), run_start)));

    let settings = Arc::new(SessionSettings {
        mqtt_host: config.mqtt_host.clone(),
        mqtt_port: config.mqtt_port,
        token_lifetime_s: config.token_lifetime_s,
        max_inflight: config.max_inflight_per_device,
    });
    let mut tasks = JoinSet::new();
    for ((device, readings), schedule) in devices.iter().zip(presigned).zip(schedules) {
        let run = DeviceRun {
            device_id: device.device_id.clone(),
            signing_key: device.signing_key.clone(),
            readings,
            schedule,
            run_start,
        };
        tasks.spawn(run_device(run, Arc::clone(&settings), Arc::clone(&stats)));
    }

    let mut per_device_last_acked_seq = BTreeMap::new();
    let mut acked_seqs = BTreeMap::new();
    while let Some(outcome) = tasks.join_next().await {
        let outcome = outcome.context("a device task panicked")?;
        per_device_last_acked_seq.insert(outcome.device_id.clone(), outcome.highest_acked_seq);
        acked_seqs.insert(outcome.device_id, outcome.acked_seqs);
    }
    let duration_s = run_start.elapsed().as_secs_f64();
    if let Some(progress) = progress {
        progress.abort();
        finish_progress();
    }

    Ok(stats.report(
        devices.len(),
        total_readings,
        duration_s,
        presign_s,
        per_device_last_acked_seq,
        acked_seqs,
    ))
}

/// Signs a few readings to measure the cost, then allows for the whole corpus on every core
/// with a margin.
fn estimate_signing_time(sample_device: Option<&SimDevice>, total_readings: u64) -> Duration {
    const SAMPLE: u64 = 64;
    let Some(device) = sample_device else {
        return Duration::ZERO;
    };
    let sample_schedule = DeviceSchedule {
        connect_offset: Duration::ZERO,
        first_offset: Duration::ZERO,
        interval: Duration::from_secs(1),
        count: SAMPLE,
    };
    let started = Instant::now();
    let _sample = PresignedReadings::sign(device, &sample_schedule, 0);
    let per_reading = started.elapsed().div_f64(SAMPLE as f64);

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    per_reading.mul_f64(total_readings as f64 * 1.5 / cores) + Duration::from_millis(200)
}

/// Sleeps until the planned start; when signing overran it, starts now and says so.
pub(crate) async fn wait_for_start(planned_start: Instant) -> Instant {
    let now = Instant::now();
    if now <= planned_start {
        tokio::time::sleep_until(planned_start.into()).await;
        return planned_start;
    }
    let late_ms = (now - planned_start).as_millis() as u64;
    tracing::warn!(
        late_ms,
        "pre-signing overran its estimate; sampled_at_ms lags the send time"
    );
    now
}

pub(crate) fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleets_are_deterministic_and_mixed() {
        let first = generate_fleet(50, 9);
        let again = generate_fleet(50, 9);
        let other = generate_fleet(50, 10);

        for (a, b) in first.iter().zip(&again) {
            assert_eq!(a.device_id, b.device_id);
            assert_eq!(a.signing_key.to_bytes(), b.signing_key.to_bytes());
        }
        assert_ne!(
            first[0].signing_key.to_bytes(),
            other[0].signing_key.to_bytes()
        );
        assert_eq!(first[0].device_id, "sim-hrm-00000");
        assert_eq!(first[42].device_id, "sim-hrm-00042");
        assert_eq!(first[45].device_id, "sim-bp-00045");
        for class in DeviceClass::ALL {
            assert!(first.iter().any(|device| device.class == class));
        }
        for device in &first {
            assert!(vigil_proto::contract::is_valid_device_id(&device.device_id));
        }
    }

    #[test]
    fn keys_sign_and_verify() {
        for device in generate_fleet(12, 3) {
            let public_hex = hex::encode(device.signing_key.verifying_key().as_bytes());
            let public = vigil_proto::strong_public_key(&public_hex).unwrap();
            let token = vigil_proto::make_login_token(
                &device.signing_key,
                &device.device_id,
                1_900_000_000,
                [7; 16],
            );
            let parsed = vigil_proto::LoginToken::parse(&token).unwrap();
            assert!(parsed.verify(&device.device_id, &public).is_ok());
        }
    }

    #[test]
    fn enrollment_csv_has_header_and_one_line_per_device() {
        let devices = generate_fleet(7, 1);
        let csv = enrollment_csv(&devices);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "device_id,public_key_hex,class");
        assert_eq!(lines.len(), 8);
        assert!(csv.ends_with('\n'));
        for (line, device) in lines[1..].iter().zip(&devices) {
            let fields: Vec<&str> = line.split(',').collect();
            assert_eq!(fields.len(), 3);
            assert_eq!(fields[0], device.device_id);
            assert_eq!(fields[1].len(), 64);
            assert!(vigil_proto::strong_public_key(fields[1]).is_ok());
            assert_eq!(DeviceClass::from_name(fields[2]), Some(device.class));
        }
    }

    #[test]
    fn schedules_spread_connects_and_phases() {
        let devices = generate_fleet(100, 2);
        let config = FleetConfig {
            readings_per_device_per_s: 2.0,
            duration: Duration::from_secs(3),
            connect_spread: Duration::from_secs(10),
            ..FleetConfig::default()
        };
        let schedules = plan_schedules(&devices, &config);
        assert!(schedules.iter().all(|s| s.count == 6));
        assert_eq!(schedules[0].connect_offset, Duration::ZERO);
        assert!(schedules[99].connect_offset > Duration::from_millis(9_800));
        for schedule in &schedules {
            let phase = schedule.first_offset - schedule.connect_offset;
            assert!(phase < Duration::from_millis(500));
            assert_eq!(
                schedule.offset_of(3) - schedule.offset_of(2),
                Duration::from_millis(500)
            );
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        let zero_rate = FleetConfig {
            readings_per_device_per_s: 0.0,
            ..FleetConfig::default()
        };
        assert!(zero_rate.validate().is_err());
        let no_inflight = FleetConfig {
            max_inflight_per_device: 0,
            ..FleetConfig::default()
        };
        assert!(no_inflight.validate().is_err());
        assert!(FleetConfig::default().validate().is_ok());
    }
}
