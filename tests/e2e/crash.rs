//! Crash safety under load: a fleet of devices publishes with QoS 1 while the server is killed
//! with SIGKILL at random moments and restarted on the same data directory and ports, several
//! times. At the end, SQL over Flight SQL shows that every reading whose PUBACK a device
//! received is stored exactly once (none missing, none twice), that no stored reading was
//! never sent, that no reading of the fleet was refused, and that an operator's quarantine and
//! the alerts table survived every restart (the quarantined device is still refused, listed
//! quarantined, and the alert count never shrank).
//!
//! Each device follows the device contract: it keeps its unacknowledged readings (a bounded
//! backlog; when full, it samples nothing new until PUBACKs free room), logs in with a fresh
//! token on every connection, and after a reconnect re-sends every unacknowledged reading in
//! seq order, byte for byte, before any new one. It keeps its own list of the seqs whose PUBACK
//! it received; that list is what the final check compares against the `readings` table.
//!
//! The server runs with a short flush interval and small WAL segments, so that kills also land
//! in the middle of Parquet flushes, segment rolls and segment deletion.
//!
//! The normal `cargo test` runs a short form (3 kill cycles, 50 devices). Environment variables
//! set a longer run, e.g.
//! `VIGIL_CRASH_CYCLES=40 VIGIL_CRASH_DEVICES=200 cargo test --workspace --test e2e crash -- --nocapture`:
//!
//! - `VIGIL_CRASH_CYCLES`: kill/restart cycles (default 3);
//! - `VIGIL_CRASH_DEVICES`: simulated devices (default 50);
//! - `VIGIL_CRASH_RATE_HZ`: readings per device per second (default 10);
//! - `VIGIL_CRASH_SEED`: the seed of device keys and kill delays (default random; printed at the
//!   start, so that a failing run's kill schedule and fleet can be replayed);
//! - `VIGIL_CRASH_KEEP`: when set, the data directory and server log are kept for inspection.
//!
//! The run ends with one summary line on stderr: cycles, acknowledged readings checked, re-sends.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use arrow::array::{Array, Int64Array, StringArray, UInt64Array};
use arrow::datatypes::DataType;
use ed25519_dalek::SigningKey;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, Outgoing, Packet, QoS,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::support::{Server, TestDevice, V3Device, wait_for};

/// Unacknowledged readings a device may have written to its connection at once.
const WINDOW: usize = 8;
/// Readings a device keeps while they wait for a PUBACK; beyond it, it samples nothing new.
const MAX_BACKLOG: usize = 256;
/// Measurements per reading, so rows per reading in `readings`.
pub(crate) const MEASUREMENTS: i64 = 2;
/// Share of the fleet that must be connected again before the next kill is scheduled.
const RECONNECTED_SHARE: f64 = 0.9;
/// Guard (never an assertion on speed): how long the devices may take to drain at the end.
pub(crate) const DRAIN_LIMIT: Duration = Duration::from_secs(60);

struct CrashSettings {
    cycles: usize,
    devices: usize,
    rate_hz: f64,
    seed: u64,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} does not parse")),
        Err(_) => default,
    }
}

impl CrashSettings {
    fn from_env() -> Self {
        Self {
            cycles: env_or("VIGIL_CRASH_CYCLES", 3),
            devices: env_or("VIGIL_CRASH_DEVICES", 50),
            rate_hz: env_or("VIGIL_CRASH_RATE_HZ", 10.0),
            seed: env_or("VIGIL_CRASH_SEED", rand::random()),
        }
    }
}

/// What the whole fleet shares with the test driver.
#[derive(Default)]
pub(crate) struct FleetState {
    pub(crate) stopping: AtomicBool,
    pub(crate) connected: AtomicUsize,
    pub(crate) drain_deadline: Mutex<Option<Instant>>,
}

impl FleetState {
    fn deadline(&self) -> Instant {
        let deadline = *self.drain_deadline.lock();
        deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(24 * 3600))
    }
}

/// One device's readings waiting for a PUBACK, shared by its sampler and its session.
pub(crate) struct Backlog {
    pub(crate) unacked: Mutex<BTreeMap<u64, Vec<u8>>>,
    pub(crate) wake: Notify,
}

/// What one device saw.
#[derive(Debug, Default)]
pub(crate) struct DeviceLog {
    pub(crate) device_id: String,
    /// Seqs whose PUBACK arrived, in arrival order.
    pub(crate) acked: Vec<u64>,
    /// Highest seq sampled (so the highest that can possibly be stored).
    pub(crate) highest_sampled: u64,
    /// Readings handed to a connection again after a reconnect.
    resent: u64,
    /// Readings still unacknowledged when the device stopped.
    pub(crate) left_unacked: usize,
}

/// Samples a reading every period into the backlog until the fleet stops.
pub(crate) async fn sample(
    device: Arc<TestDevice>,
    backlog: Arc<Backlog>,
    fleet: Arc<FleetState>,
    period: Duration,
    phase: Duration,
) -> u64 {
    let mut ticker = tokio::time::interval_at(Instant::now() + phase, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_seq = 1;
    loop {
        ticker.tick().await;
        if fleet.stopping.load(Ordering::SeqCst) {
            return next_seq - 1;
        }
        let mut unacked = backlog.unacked.lock();
        if unacked.len() >= MAX_BACKLOG {
            continue;
        }
        unacked.insert(next_seq, device.payload(next_seq));
        drop(unacked);
        next_seq += 1;
        backlog.wake.notify_one();
    }
}

enum SessionEnd {
    /// The connection failed or was lost.
    Lost,
    /// Every reading is acknowledged and the fleet is stopping, or the drain deadline passed.
    Finished,
}

/// Connects, re-sends, publishes and counts PUBACKs until the backlog is drained at the end.
pub(crate) async fn run_device(
    device: Arc<TestDevice>,
    mqtt: std::net::SocketAddr,
    backlog: Arc<Backlog>,
    fleet: Arc<FleetState>,
) -> DeviceLog {
    let mut log = DeviceLog {
        device_id: device.id.clone(),
        ..DeviceLog::default()
    };
    let mut highest_handed = 0u64;
    loop {
        if finished(&backlog, &fleet) {
            break;
        }
        // A new client per connection: a fresh login token, no state left from the last one.
        let (client, events) = AsyncClient::new(device.options(mqtt), WINDOW + 4);
        let end = session(
            &device,
            &client,
            events,
            &backlog,
            &fleet,
            &mut log,
            &mut highest_handed,
        )
        .await;
        if let SessionEnd::Finished = end {
            break;
        }
        let backoff = Duration::from_millis(rand::thread_rng().gen_range(50..=250));
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = tokio::time::sleep_until(fleet.deadline()) => {}
        }
    }
    log.left_unacked = backlog.unacked.lock().len();
    log
}

fn finished(backlog: &Backlog, fleet: &FleetState) -> bool {
    let drained = fleet.stopping.load(Ordering::SeqCst) && backlog.unacked.lock().is_empty();
    drained || Instant::now() >= fleet.deadline()
}

/// One connection: CONNACK, then re-sends in seq order before new readings, up to [`WINDOW`]
/// written and unacknowledged at once.
async fn session(
    device: &TestDevice,
    client: &AsyncClient,
    mut events: EventLoop,
    backlog: &Backlog,
    fleet: &FleetState,
    log: &mut DeviceLog,
    highest_handed: &mut u64,
) -> SessionEnd {
    let connack = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(error) => return Err(error),
            }
        }
    });
    match connack.await {
        Ok(Ok(())) => {}
        Ok(Err(ConnectionError::ConnectionRefused(code))) => {
            panic!("{}: login refused with {code:?}", device.id)
        }
        // The server is away (killed, or still starting): try again.
        Ok(Err(_)) | Err(_) => return SessionEnd::Lost,
    }
    fleet.connected.fetch_add(1, Ordering::SeqCst);

    // `EventLoop::poll` is not cancel-safe: dropping it mid-way (as a `select!` does) can lose
    // a request taken from the client's channel, so that later readings overtake it and the
    // server rightly refuses it as a replay. One task polls without interruption and forwards
    // the events; the channel's `recv` is cancel-safe.
    let (forward, mut pumped) = tokio::sync::mpsc::channel::<Event>(64);
    let pump = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(event) => {
                    if forward.send(event).await.is_err() {
                        return;
                    }
                }
                Err(_) => {
                    // PUBACKs read before the connection broke still count.
                    while let Some(event) = events.state.events.pop_front() {
                        if forward.send(event).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
            }
        }
    });

    let topic = device.topic();
    // Every reading above this seq is handed to this connection in order: re-sends first,
    // because the backlog is sorted and new readings have higher seqs.
    let mut last_handed = 0u64;
    let mut submitted: VecDeque<u64> = VecDeque::new();
    let mut in_flight: HashMap<u16, u64> = HashMap::new();
    let end = loop {
        while submitted.len() + in_flight.len() < WINDOW {
            let next = backlog
                .unacked
                .lock()
                .range(last_handed + 1..)
                .next()
                .map(|(seq, payload)| (*seq, payload.clone()));
            let Some((seq, payload)) = next else { break };
            // A full request channel means the event loop is not taking requests (its
            // connection is stalling); hand the reading out later, in the same order.
            if client
                .try_publish(&topic, QoS::AtLeastOnce, false, payload)
                .is_err()
            {
                break;
            }
            last_handed = seq;
            submitted.push_back(seq);
            if seq <= *highest_handed {
                log.resent += 1;
            }
            *highest_handed = (*highest_handed).max(seq);
        }
        if finished(backlog, fleet) {
            break SessionEnd::Finished;
        }

        let polled = tokio::select! {
            polled = pumped.recv() => polled,
            () = backlog.wake.notified() => continue,
            () = tokio::time::sleep_until(fleet.deadline()) => continue,
        };
        match polled {
            Some(event) => on_event(event, backlog, log, &mut submitted, &mut in_flight),
            None => break SessionEnd::Lost,
        }
    };
    pump.abort();
    fleet.connected.fetch_sub(1, Ordering::SeqCst);
    end
}

fn on_event(
    event: Event,
    backlog: &Backlog,
    log: &mut DeviceLog,
    submitted: &mut VecDeque<u64>,
    in_flight: &mut HashMap<u16, u64>,
) {
    match event {
        // rumqttc writes publishes in the order they were requested.
        Event::Outgoing(Outgoing::Publish(pkid)) => {
            if let Some(seq) = submitted.pop_front() {
                in_flight.insert(pkid, seq);
            }
        }
        Event::Incoming(Packet::PubAck(ack)) => {
            if let Some(seq) = in_flight.remove(&ack.pkid) {
                backlog.unacked.lock().remove(&seq);
                log.acked.push(seq);
            }
        }
        _ => {}
    }
}

/// `true` when the server refuses the device's login as not authorized.
pub(crate) async fn login_refused(device: &TestDevice, server: &Server) -> bool {
    matches!(
        V3Device::connect(device, server.mqtt).await,
        Err(ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized
        ))
    )
}

/// One string column of a query's answer, as owned strings.
fn strings(column: &dyn Array) -> Vec<String> {
    let column = arrow::compute::cast(column, &DataType::Utf8).unwrap();
    let column = column.as_any().downcast_ref::<StringArray>().unwrap();
    (0..column.len())
        .map(|row| column.value(row).to_owned())
        .collect()
}

/// Rows stored per (device_id, seq).
pub(crate) async fn stored_rows(server: &Server) -> HashMap<(String, u64), i64> {
    let query = "SELECT device_id, seq, count(*) AS n FROM readings GROUP BY device_id, seq";
    let mut rows = HashMap::new();
    for batch in server.sql(query).await {
        let device_ids = strings(batch.column(0));
        let seqs = arrow::compute::cast(batch.column(1), &DataType::UInt64).unwrap();
        let seqs = seqs.as_any().downcast_ref::<UInt64Array>().unwrap();
        let counts = arrow::compute::cast(batch.column(2), &DataType::Int64).unwrap();
        let counts = counts.as_any().downcast_ref::<Int64Array>().unwrap();
        for (row, device_id) in device_ids.into_iter().enumerate() {
            rows.insert((device_id, seqs.value(row)), counts.value(row));
        }
    }
    rows
}

async fn alert_count(server: &Server) -> i64 {
    server.sql_count("SELECT count(*) FROM alerts").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_readings_survive_repeated_kill_9_under_load() {
    let settings = CrashSettings::from_env();
    eprintln!(
        "crash test: seed {} (replay with VIGIL_CRASH_SEED={}), {} cycles, {} devices at {} Hz",
        settings.seed, settings.seed, settings.cycles, settings.devices, settings.rate_hz
    );
    let mut rng = StdRng::seed_from_u64(settings.seed);

    let dir = tempfile::Builder::new()
        .prefix("vigil-crash-")
        .tempdir()
        .unwrap();
    // Kept for a post-mortem when asked: the data directory, the config and the server log.
    let dir_path = if std::env::var_os("VIGIL_CRASH_KEEP").is_some() {
        let kept = dir.keep();
        eprintln!("crash test: keeping {}", kept.display());
        kept
    } else {
        dir.path().to_owned()
    };
    let config = dir_path.join("crash.toml");
    // Cut-off needs confirmation, so that reconnect churn cannot quarantine a fleet device;
    // frequent flushes and small segments put kills inside flushes, rolls and deletions.
    std::fs::write(
        &config,
        "[detect]\ndefault_policy = \"alert_and_confirm\"\n\n\
         [store]\nflush_interval_ms = 500\nwal_segment_bytes = 65536\n",
    )
    .unwrap();
    let mut server = Server::start_with(
        &dir_path.join("data"),
        &["--config", config.to_str().unwrap()],
    );

    let mut device = |id: String| TestDevice {
        id,
        key: SigningKey::from_bytes(&rng.r#gen()),
    };
    let fleet_devices: Vec<Arc<TestDevice>> = (0..settings.devices)
        .map(|index| Arc::new(device(format!("crash-{index:04}"))))
        .collect();
    let isolated = device("crash-quarantined".to_owned());
    let mut enrolled: Vec<&TestDevice> = fleet_devices.iter().map(|d| d.as_ref()).collect();
    enrolled.push(&isolated);
    server.enroll(&enrolled);

    // The device to quarantine stores a few readings first: they must be kept.
    let mut connection = V3Device::connect(&isolated, server.mqtt).await.unwrap();
    let isolated_readings = 5u64;
    let payloads = (1..=isolated_readings)
        .map(|seq| isolated.payload(seq))
        .collect();
    connection
        .publish_all(&isolated.topic(), payloads)
        .await
        .unwrap();
    let listed = server.cli(&["devices", "quarantine", &isolated.id]);
    assert!(listed.contains("quarantined"), "{listed}");
    assert!(login_refused(&isolated, &server).await);
    let quarantine_alerts = format!(
        "SELECT count(*) FROM alerts WHERE device_id = '{}' AND detector = 'operator.quarantine'",
        isolated.id
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.sql_count(&quarantine_alerts).await < 1 {
        assert!(Instant::now() < deadline, "no quarantine alert within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The fleet.
    let fleet = Arc::new(FleetState::default());
    let period = Duration::from_secs_f64(1.0 / settings.rate_hz);
    let mut samplers = Vec::new();
    let mut sessions = Vec::new();
    for device in &fleet_devices {
        let backlog = Arc::new(Backlog {
            unacked: Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
        });
        let phase = period.mul_f64(rng.r#gen::<f64>());
        samplers.push(tokio::spawn(sample(
            device.clone(),
            backlog.clone(),
            fleet.clone(),
            period,
            phase,
        )));
        sessions.push((
            backlog.clone(),
            tokio::spawn(run_device(
                device.clone(),
                server.mqtt,
                backlog,
                fleet.clone(),
            )),
        ));
    }

    // Kill, restart, repeat: each kill comes a random time after most devices are back.
    let mut alerts_seen = alert_count(&server).await;
    let reconnected = (settings.devices as f64 * RECONNECTED_SHARE).ceil() as usize;
    for cycle in 0..settings.cycles {
        wait_for_connected(&fleet, reconnected).await;
        let delay = Duration::from_millis(rng.gen_range(100..2000));
        tokio::time::sleep(delay).await;

        alerts_seen = alerts_seen.max(alert_count(&server).await);
        server.kill_9();
        // Sometimes the server stays away a little, so that devices fail to connect.
        if rng.gen_bool(0.5) {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..800))).await;
        }
        server.restart();

        let alerts = alert_count(&server).await;
        assert!(
            alerts >= alerts_seen,
            "cycle {cycle}: alerts shrank from {alerts_seen} to {alerts} across a restart"
        );
        alerts_seen = alerts;
        assert!(
            login_refused(&isolated, &server).await,
            "cycle {cycle}: the quarantined device could log in after a restart"
        );
        eprintln!("crash test: cycle {cycle} killed after {delay:?}, restarted");
    }

    // Let the fleet run on the last server, then stop sampling and drain every backlog.
    wait_for_connected(&fleet, reconnected).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    *fleet.drain_deadline.lock() = Some(Instant::now() + DRAIN_LIMIT);
    fleet.stopping.store(true, Ordering::SeqCst);
    let mut highest_sampled = Vec::new();
    for sampler in samplers {
        highest_sampled.push(sampler.await.unwrap());
    }
    let mut logs = Vec::new();
    for ((backlog, session), highest) in sessions.into_iter().zip(highest_sampled) {
        backlog.wake.notify_one();
        let mut log = session.await.unwrap();
        log.highest_sampled = highest;
        logs.push(log);
    }

    check_stored(&server, &logs, &isolated.id).await;
    let acknowledged: usize = logs.iter().map(|log| log.acked.len()).sum();
    let resent: u64 = logs.iter().map(|log| log.resent).sum();
    let undrained: Vec<(&str, usize)> = logs
        .iter()
        .filter(|log| log.left_unacked > 0)
        .map(|log| (log.device_id.as_str(), log.left_unacked))
        .collect();
    assert!(
        undrained.is_empty(),
        "devices with readings never acknowledged: {undrained:?}"
    );
    assert!(
        resent > 0,
        "no reading was in flight at any kill: the test did not exercise re-sends"
    );

    // Quarantine and alerts survived.
    assert!(login_refused(&isolated, &server).await);
    let status = server
        .sql(&format!(
            "SELECT status FROM devices WHERE device_id = '{}'",
            isolated.id
        ))
        .await;
    let status: Vec<String> = status.iter().flat_map(|b| strings(b.column(0))).collect();
    assert_eq!(status, vec!["quarantined".to_owned()]);
    let listed = server.cli(&["devices", "list"]);
    let line = listed
        .lines()
        .find(|line| line.starts_with(&isolated.id))
        .unwrap_or_else(|| panic!("{} not listed:\n{listed}", isolated.id));
    assert!(line.contains("quarantined"), "{line}");
    let isolated_rows = format!(
        "SELECT count(*) FROM readings WHERE device_id = '{}'",
        isolated.id
    );
    assert_eq!(
        server.sql_count(&isolated_rows).await,
        isolated_readings as i64 * MEASUREMENTS,
        "the quarantined device's readings from before its quarantine are kept, once"
    );
    assert!(server.sql_count(&quarantine_alerts).await >= 1);
    assert!(alert_count(&server).await >= alerts_seen);

    eprintln!(
        "crash test: seed {}: {} kill/restart cycles, {} devices, {acknowledged} acknowledged \
         readings checked (each stored exactly once), {resent} re-sent after reconnects",
        settings.seed, settings.cycles, settings.devices
    );
}

/// Waits (20 s at most, then fails) until `count` devices are connected.
async fn wait_for_connected(fleet: &FleetState, count: usize) {
    wait_for(
        || fleet.connected.load(Ordering::SeqCst) >= count,
        "the fleet to reconnect",
    )
    .await;
}

/// Every acknowledged reading stored exactly once; nothing stored that was never sampled;
/// nothing of the fleet refused.
async fn check_stored(server: &Server, logs: &[DeviceLog], isolated_id: &str) {
    let stored = stored_rows(server).await;

    let mut missing = Vec::new();
    let mut bad_counts = Vec::new();
    let mut acked_twice = Vec::new();
    for log in logs {
        let mut acked = log.acked.clone();
        acked.sort_unstable();
        let before = acked.len();
        acked.dedup();
        if acked.len() != before {
            acked_twice.push(log.device_id.clone());
        }
        for seq in acked {
            match stored.get(&(log.device_id.clone(), seq)) {
                None => missing.push((log.device_id.clone(), seq)),
                Some(&rows) if rows != MEASUREMENTS => {
                    bad_counts.push((log.device_id.clone(), seq, rows))
                }
                Some(_) => {}
            }
        }
    }
    let highest: HashMap<&str, u64> = logs
        .iter()
        .map(|log| (log.device_id.as_str(), log.highest_sampled))
        .collect();
    let mut never_sampled = Vec::new();
    for ((device_id, seq), rows) in &stored {
        if *rows != MEASUREMENTS {
            bad_counts.push((device_id.clone(), *seq, *rows));
        }
        if highest
            .get(device_id.as_str())
            .is_some_and(|highest| seq > highest)
        {
            never_sampled.push((device_id.clone(), *seq));
        }
    }
    bad_counts.sort();
    bad_counts.dedup();

    let refused = server
        .sql(&format!(
            "SELECT device_id, concat(reason, ': ', detail) FROM rejections \
             WHERE device_id <> '{isolated_id}'"
        ))
        .await;
    let refused: Vec<(String, String)> = refused
        .iter()
        .flat_map(|batch| {
            strings(batch.column(0))
                .into_iter()
                .zip(strings(batch.column(1)))
        })
        .collect();

    // A v3.1.1 refusal is acknowledged too, so the refusals are part of the diagnosis, and so
    // are the server's errors and warnings over all its runs.
    let server_log =
        std::fs::read_to_string(server.data_dir.with_extension("log")).unwrap_or_default();
    let troubles: Vec<&str> = server_log
        .lines()
        .filter(|line| line.contains("ERROR") || line.contains("WARN"))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged readings missing, e.g. {:?}; fleet refusals: {:?}; server errors and \
         warnings: {troubles:#?}",
        missing.len(),
        &missing[..missing.len().min(10)],
        &refused[..refused.len().min(20)]
    );
    assert!(
        bad_counts.is_empty(),
        "{} readings stored other than once ({MEASUREMENTS} rows), e.g. (device, seq, rows) {:?}",
        bad_counts.len(),
        &bad_counts[..bad_counts.len().min(10)]
    );
    assert!(acked_twice.is_empty(), "PUBACK twice: {acked_twice:?}");
    assert!(
        never_sampled.is_empty(),
        "stored, never sent: {never_sampled:?}"
    );
    assert!(refused.is_empty(), "fleet readings refused: {refused:?}");
    assert!(
        logs.iter().all(|log| !log.acked.is_empty()),
        "a device never got a PUBACK"
    );
}
