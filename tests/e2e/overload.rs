//! Storage trouble.
//!
//! - A full disk: the server refuses readings it cannot make durable with a reason (MQTT v5
//!   PUBACK 0x97, counted), keeps serving (though its own log cannot be written), keeps every
//!   reading it acknowledged, and takes readings again once space is freed.
//! - A stalled disk: PUBACKs wait for durability, so devices are held back by their in-flight
//!   windows; the server's memory stays flat; once the disk is fast again, every reading is
//!   stored exactly once.
//! - A long stall under more load than the memory bound allows: once readings find no room
//!   within `overload_wait_ms`, the server sheds them (v5 PUBACK 0x97, counted, never stored),
//!   refuses new logins as "server unavailable" (v3.1.1 and v5), keeps the bytes it holds for
//!   readings in flight under `max_pending_bytes`, and takes devices back once the disk is fast.
//!
//! The full disk is a small tmpfs; the stalled one an ext4 file system on a loop device whose
//! writes a cgroup (v1 blkio) throttles. Both need root, as CI here has; where a step is not
//! permitted the test says so on stderr and does nothing else.

use std::path::{Path, PathBuf};
use std::process::Command;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet as V5Packet, PubAckReason};
use rumqttc::v5::{
    AsyncClient as V5Client, ConnectionError as V5ConnectionError, Event as V5Event,
    EventLoop as V5EventLoop, MqttOptions as V5Options,
};

use crate::support::{Server, TestDevice, V3Device, V5Device, http_get};

/// A tmpfs mounted for the life of the value.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(path).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output();
        match mounted {
            Ok(output) if output.status.success() => Some(Self {
                path: path.to_owned(),
            }),
            Ok(output) => {
                eprintln!(
                    "full-disk test not run: cannot mount a tmpfs here: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                None
            }
            Err(error) => {
                eprintln!("full-disk test not run: cannot run mount: {error}");
                None
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy, so that a server still holding files open does not keep the mount.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Writes a ballast file until the disk refuses more; returns its path.
fn fill(disk: &Path) -> PathBuf {
    use std::io::Write as _;
    let ballast = disk.join("ballast");
    let mut file = std::fs::File::create(&ballast).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while file.write_all(&chunk).is_ok() {}
    // Single bytes, to the last one.
    while file.write_all(&[0]).is_ok() {}
    let _ = file.sync_all();
    ballast
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_readings_with_a_reason_and_recovers_when_space_frees() {
    let dir = tempfile::tempdir().unwrap();
    // The server log shares the disk with the data, as it often does: a log that cannot be
    // written must not stop the server either.
    let Some(disk) = SmallDisk::mount(&dir.path().join("disk"), "32m") else {
        return;
    };
    let config = dir.path().join("small-disk.toml");
    std::fs::write(
        &config,
        "[store]\nwal_segment_bytes = 262144\nflush_interval_ms = 300\n",
    )
    .unwrap();
    let server = Server::start_with(
        &disk.path.join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let device = TestDevice::new("disk-0");
    server.enroll(&[&device]);
    let topic = device.topic();
    let mut connection = V5Device::connect(&device, &server).await;

    let mut acknowledged = Vec::new();
    for seq in 1..=10 {
        let reason = connection.publish(&topic, device.payload(seq)).await;
        assert_eq!(
            reason,
            PubAckReason::Success,
            "seq {seq} before the disk fills"
        );
        acknowledged.push(seq);
    }

    let ballast = fill(&disk.path);
    let mut refused = None;
    for seq in 11..=200 {
        let payload = device.payload(seq);
        match connection.publish(&topic, payload.clone()).await {
            PubAckReason::Success => acknowledged.push(seq),
            PubAckReason::QuotaExceeded => {
                refused = Some((seq, payload));
                break;
            }
            other => panic!("seq {seq} on a full disk: unexpected PUBACK {other:?}"),
        }
    }
    let (refused, refused_payload) =
        refused.expect("a reading refused with 0x97 once the disk is full");
    assert!(
        http_get(server.http, "/healthz").is_some(),
        "the server keeps serving on a full disk"
    );
    assert!(
        server.metric("vigil_ingest_readings_refused_total{reason=\"overloaded\"}") >= 1.0,
        "the refusal is counted"
    );

    // An exact re-send while the disk is still full is refused the same way.
    assert_eq!(
        connection.publish(&topic, refused_payload.clone()).await,
        PubAckReason::QuotaExceeded,
        "re-send of seq {refused} on a full disk"
    );

    // Space comes back: the refused reading is taken on an exact re-send (it was never
    // stored, so it is neither a replay nor a duplicate), and so are new ones.
    std::fs::remove_file(&ballast).unwrap();
    let mut resent = PubAckReason::QuotaExceeded;
    for _attempt in 0..50 {
        resent = connection.publish(&topic, refused_payload.clone()).await;
        if resent == PubAckReason::Success {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(resent, PubAckReason::Success, "re-send of seq {refused}");
    acknowledged.push(refused);
    for seq in refused + 1..=refused + 10 {
        let reason = connection.publish(&topic, device.payload(seq)).await;
        assert_eq!(reason, PubAckReason::Success, "seq {seq} after space freed");
        acknowledged.push(seq);
    }

    let query = format!(
        "SELECT seq, count(*) FROM readings WHERE device_id = '{}' GROUP BY seq ORDER BY seq",
        device.id
    );
    let stored: Vec<(u64, i64)> = server
        .sql(&query)
        .await
        .iter()
        .flat_map(|batch| {
            let seqs = arrow::array::cast::as_primitive_array::<arrow::datatypes::UInt64Type>(
                batch.column(0),
            );
            let counts = arrow::array::cast::as_primitive_array::<arrow::datatypes::Int64Type>(
                batch.column(1),
            );
            (0..batch.num_rows())
                .map(|row| (seqs.value(row), counts.value(row)))
                .collect::<Vec<_>>()
        })
        .collect();
    let expected: Vec<(u64, i64)> = acknowledged.iter().map(|seq| (*seq, 2)).collect();
    assert_eq!(
        stored, expected,
        "every acknowledged reading stored once (two measurements each), nothing refused stored"
    );
}

/// An ext4 file system on a loop device whose writes a blkio cgroup can slow down: a real
/// slow disk, from the server's point of view.
struct SlowDisk {
    mount: PathBuf,
    device: String,
    major_minor: String,
    cgroup: PathBuf,
}

impl SlowDisk {
    fn create(dir: &Path) -> Option<Self> {
        let run = |program: &str, args: &[&str]| -> Option<String> {
            let output = Command::new(program).args(args).output().ok()?;
            if output.status.success() {
                Some(String::from_utf8_lossy(&output.stdout).trim().to_owned())
            } else {
                eprintln!(
                    "stalled-disk test not run: {program} {args:?} failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                None
            }
        };
        let cgroup_root = Path::new("/sys/fs/cgroup/blkio");
        if !cgroup_root
            .join("blkio.throttle.write_iops_device")
            .exists()
        {
            eprintln!("stalled-disk test not run: no cgroup v1 blkio controller here");
            return None;
        }
        let image = dir.join("slow.img");
        std::fs::File::create(&image)
            .and_then(|file| file.set_len(256 << 20))
            .ok()?;
        let image = image.to_str()?.to_owned();
        let device = run("losetup", &["-f", "--show", &image])?;
        let disk = Self {
            mount: dir.join("slow"),
            major_minor: run("lsblk", &["-dno", "MAJ:MIN", &device])?,
            device,
            cgroup: cgroup_root.join(format!("vigil-e2e-{}", std::process::id())),
        };
        run("mkfs.ext4", &["-q", &disk.device])?;
        std::fs::create_dir_all(&disk.mount).ok()?;
        run("mount", &[&disk.device, disk.mount.to_str()?])?;
        std::fs::create_dir_all(&disk.cgroup).ok()?;
        Some(disk)
    }

    /// Puts the process in the cgroup and limits its writes to the disk to `iops` per second.
    fn throttle(&self, pid: u32, iops: u32) {
        std::fs::write(self.cgroup.join("cgroup.procs"), pid.to_string()).unwrap();
        std::fs::write(
            self.cgroup.join("blkio.throttle.write_iops_device"),
            format!("{} {iops}", self.major_minor),
        )
        .unwrap();
    }

    fn unthrottle(&self) {
        std::fs::write(
            self.cgroup.join("blkio.throttle.write_iops_device"),
            format!("{} 0", self.major_minor),
        )
        .unwrap();
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.mount)
            .status()
            .is_ok_and(|status| status.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A device connected with an in-flight window of 32.
async fn connect_device(
    device: &TestDevice,
    mqtt: std::net::SocketAddr,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let mut options = device.options(mqtt);
    options.set_inflight(32);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 8);
    loop {
        match events.poll().await {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return (client, events),
            Ok(_) => {}
            Err(error) => panic!("{}: cannot connect: {error}", device.id),
        }
    }
}

/// Publishes `readings` readings as fast as the in-flight window lets the device, then waits
/// for the last PUBACK; returns how many were acknowledged.
async fn push_readings(
    device: TestDevice,
    (client, mut events): (rumqttc::AsyncClient, rumqttc::EventLoop),
    readings: u64,
) -> u64 {
    let topic = device.topic();
    let payloads: Vec<Vec<u8>> = (1..=readings).map(|seq| device.payload(seq)).collect();
    let publisher = tokio::spawn(async move {
        for payload in payloads {
            if client
                .publish(&topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                break;
            }
        }
        client
    });
    let mut acknowledged = 0;
    while acknowledged < readings {
        match events.poll().await {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => acknowledged += 1,
            Ok(_) => {}
            Err(error) => panic!(
                "{}: connection failed under a stalled disk: {error}",
                device.id
            ),
        }
    }
    drop(publisher.await);
    acknowledged
}

/// A disk that takes a handful of writes per second: PUBACKs wait for durability, devices are
/// held back by their in-flight windows, the server's memory stays flat, and once the disk is
/// fast again every reading is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_holds_devices_back_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SlowDisk::create(dir.path()) else {
        return;
    };
    // Devices publish in bursts here, which the detector would rightly call a flood; and the
    // stall is held short of the shedding deadline: this test is about holding back.
    let config = dir.path().join("patient.toml");
    std::fs::write(
        &config,
        "[ingest]\noverload_wait_ms = 600000\n[detect]\ndefault_policy = \"alert_and_confirm\"\n",
    )
    .unwrap();
    let server = Server::start_with(
        &disk.mount.join("data"),
        &["--config", config.to_str().unwrap()],
    );
    const DEVICES: usize = 100;
    const READINGS: u64 = 200;
    let devices: Vec<TestDevice> = (0..DEVICES)
        .map(|index| TestDevice::new(&format!("stall-{index:03}")))
        .collect();
    server.enroll(&devices.iter().collect::<Vec<_>>());

    // Logins record their nonce durably, so the fleet logs in before the disk slows down.
    let mut connected = Vec::new();
    for device in devices {
        let connection = connect_device(&device, server.mqtt).await;
        connected.push((device, connection));
    }
    let pid = server.pid();
    let before_kib = resident_kib(pid);
    disk.throttle(pid, 2);

    let fleet: Vec<_> = connected
        .into_iter()
        .map(|(device, connection)| tokio::spawn(push_readings(device, connection, READINGS)))
        .collect();

    // Stalled for a while: sample the server's memory.
    let mut peak_kib = before_kib;
    let stall_until = std::time::Instant::now() + std::time::Duration::from_secs(8);
    while std::time::Instant::now() < stall_until {
        peak_kib = peak_kib.max(resident_kib(pid));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let acknowledged_while_stalled = server.metric("vigil_store_wal_group_entries_count");
    disk.unthrottle();

    let mut acknowledged = 0;
    for device in fleet {
        acknowledged += device.await.unwrap();
    }
    peak_kib = peak_kib.max(resident_kib(pid));
    eprintln!(
        "stalled disk: {DEVICES} devices, server resident memory {} MiB before, peak {} MiB \
         (+{} MiB), {acknowledged_while_stalled} group commits while stalled",
        before_kib / 1024,
        peak_kib / 1024,
        peak_kib.saturating_sub(before_kib) / 1024
    );
    assert_eq!(acknowledged, DEVICES as u64 * READINGS);
    // Readings in flight are bounded by devices x in-flight window (32 here): a few MiB.
    assert!(
        peak_kib.saturating_sub(before_kib) < 256 * 1024,
        "memory grew by {} MiB under a stalled disk",
        peak_kib.saturating_sub(before_kib) / 1024
    );
    let total = "SELECT count(*) FROM (SELECT DISTINCT device_id, seq FROM readings)";
    assert_eq!(
        server.sql_count(total).await,
        (DEVICES as u64 * READINGS) as i64
    );
    let rows = "SELECT count(*) FROM readings";
    assert_eq!(
        server.sql_count(rows).await,
        (DEVICES as u64 * READINGS * 2) as i64
    );
}

/// What one v5 device saw: readings acknowledged with success, and readings shed (0x97).
#[derive(Debug, Default)]
struct V5Outcome {
    acknowledged: BTreeSet<u64>,
    shed: BTreeSet<u64>,
    /// Told DISCONNECT 0x97 after its shed readings.
    disconnected: bool,
}

fn v5_options(device: &TestDevice, server: &Server) -> V5Options {
    let mut options = V5Options::new(&device.id, server.mqtt.ip().to_string(), server.mqtt.port());
    options.set_credentials(&device.id, device.token());
    options
}

async fn connect_v5(device: &TestDevice, server: &Server) -> (V5Client, V5EventLoop) {
    let (client, mut events) = V5Client::new(v5_options(device, server), 16);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(V5Event::Incoming(V5Packet::ConnAck(_)))) => return (client, events),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => panic!("{}: cannot connect: {error}", device.id),
            Err(_) => panic!("{}: no CONNACK within 10 s", device.id),
        }
    }
}

/// Publishes seq 1..=`readings` in order with the server's in-flight window, until every one
/// is answered or the server closes the connection; maps each PUBACK back to its seq.
async fn push_v5(
    device: TestDevice,
    (client, mut events): (V5Client, V5EventLoop),
    readings: u64,
) -> V5Outcome {
    let topic = device.topic();
    let payloads: Vec<Vec<u8>> = (1..=readings).map(|seq| device.payload(seq)).collect();
    let publisher = tokio::spawn(async move {
        for payload in payloads {
            let sent = client
                .publish(
                    &topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await;
            if sent.is_err() {
                break;
            }
        }
    });
    let mut outcome = V5Outcome::default();
    let mut in_flight: HashMap<u16, u64> = HashMap::new();
    let mut next_seq = 1;
    // Until every reading is answered and, once some were shed, the server has closed.
    while ((outcome.acknowledged.len() + outcome.shed.len()) as u64) < readings
        || !outcome.shed.is_empty()
    {
        let Ok(event) = tokio::time::timeout(Duration::from_secs(30), events.poll()).await else {
            panic!("{}: nothing from the server for 30 s", device.id);
        };
        match event {
            Ok(V5Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                in_flight.insert(pkid, next_seq);
                next_seq += 1;
            }
            Ok(V5Event::Incoming(V5Packet::PubAck(ack))) => {
                let seq = in_flight
                    .remove(&ack.pkid)
                    .expect("a PUBACK for a publish in flight");
                match ack.reason {
                    PubAckReason::Success => outcome.acknowledged.insert(seq),
                    PubAckReason::QuotaExceeded => outcome.shed.insert(seq),
                    other => panic!("{} seq {seq}: unexpected PUBACK {other:?}", device.id),
                };
            }
            // rumqttc reports the server's DISCONNECT as an error carrying its reason.
            Err(V5ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
                reason_code,
                ..
            })) => {
                assert_eq!(
                    reason_code,
                    rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::QuotaExceeded,
                    "{}: the server's reason for closing",
                    device.id
                );
                outcome.disconnected = true;
                break;
            }
            Ok(_) => {}
            // Closed by the server after shed readings: what is still unanswered is the
            // device's to send again.
            Err(_) => break,
        }
    }
    publisher.abort();
    outcome
}

/// A v5 login attempt's CONNACK code, or `Success`.
async fn v5_login(device: &TestDevice, server: &Server) -> ConnectReturnCode {
    let (_client, mut events) = V5Client::new(v5_options(device, server), 4);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(V5Event::Incoming(V5Packet::ConnAck(ack)))) => return ack.code,
            Ok(Ok(_)) => {}
            Ok(Err(V5ConnectionError::ConnectionRefused(code))) => return code,
            Ok(Err(error)) => panic!("{}: login failed: {error}", device.id),
            Err(_) => panic!("{}: no CONNACK within 10 s", device.id),
        }
    }
}

/// More devices than the memory bound can hold readings for, against a disk that takes one
/// write a second: the server holds them back, then sheds with a reason, refuses new logins,
/// stays within its bound, and recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stall_sheds_load_with_a_reason_within_the_memory_bound_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SlowDisk::create(dir.path()) else {
        return;
    };
    const LIMIT_BYTES: u64 = 1 << 20;
    let config = dir.path().join("bounded.toml");
    std::fs::write(
        &config,
        format!(
            "[ingest]\nmax_pending_bytes = {LIMIT_BYTES}\noverload_wait_ms = 1500\n\
             [detect]\ndefault_policy = \"alert_and_confirm\"\n"
        ),
    )
    .unwrap();
    let server = Server::start_with(
        &disk.mount.join("data"),
        &["--config", config.to_str().unwrap()],
    );
    const DEVICES: usize = 100;
    const READINGS: u64 = 200;
    let devices: Vec<TestDevice> = (0..DEVICES)
        .map(|index| TestDevice::new(&format!("shed-{index:03}")))
        .collect();
    let latecomer_v5 = TestDevice::new("late-v5");
    let latecomer_v3 = TestDevice::new("late-v3");
    let mut everyone: Vec<&TestDevice> = devices.iter().collect();
    everyone.extend([&latecomer_v5, &latecomer_v3]);
    server.enroll(&everyone);

    let mut connected = Vec::new();
    for device in &devices {
        connected.push((device.clone(), connect_v5(device, &server).await));
    }
    let pid = server.pid();
    let before_kib = resident_kib(pid);
    disk.throttle(pid, 1);
    let fleet: Vec<_> = connected
        .into_iter()
        .map(|(device, connection)| tokio::spawn(push_v5(device, connection, READINGS)))
        .collect();

    // Wait for the first shed reading, sampling memory on the way.
    let mut peak_kib = before_kib;
    let mut peak_pending = 0.0f64;
    let overloaded = "vigil_ingest_readings_refused_total{reason=\"overloaded\"}";
    let give_up = Instant::now() + Duration::from_secs(60);
    while server.metric(overloaded) < 1.0 {
        assert!(
            Instant::now() < give_up,
            "nothing shed within 60 s of stall"
        );
        peak_kib = peak_kib.max(resident_kib(pid));
        peak_pending = peak_pending.max(server.metric("vigil_ingest_pending_bytes"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // While shedding, new logins are refused with a reason, whatever the protocol version.
    assert_eq!(
        v5_login(&latecomer_v5, &server).await,
        ConnectReturnCode::ServerUnavailable,
        "a v5 login while the server sheds load"
    );
    match V3Device::connect_with(latecomer_v3.options(server.mqtt)).await {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => assert_eq!(
            code,
            rumqttc::ConnectReturnCode::ServiceUnavailable,
            "a v3.1.1 login while the server sheds load"
        ),
        Err(error) => panic!("v3.1.1 login while shedding: {error}"),
        Ok(_) => panic!("a v3.1.1 login was admitted while the server sheds load"),
    }
    assert!(
        server.metric("vigil_ingest_logins_refused_total{reason=\"login_server_overloaded\"}")
            >= 2.0,
        "the refused logins are counted"
    );

    // Stalled some more; then the disk is fast again.
    let stall_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < stall_until {
        peak_kib = peak_kib.max(resident_kib(pid));
        peak_pending = peak_pending.max(server.metric("vigil_ingest_pending_bytes"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    disk.unthrottle();
    let mut acknowledged = BTreeSet::new();
    let mut shed = BTreeSet::new();
    let mut disconnected = 0;
    for (device, outcome) in devices.iter().zip(fleet) {
        let outcome = outcome.await.unwrap();
        if !outcome.shed.is_empty() {
            // Nothing acknowledged after the first shed reading of a connection.
            let first_shed = outcome.shed.first().unwrap();
            assert!(
                outcome.acknowledged.range(first_shed..).next().is_none(),
                "{}: acknowledged after shed seq {first_shed}",
                device.id
            );
            disconnected += usize::from(outcome.disconnected);
        }
        acknowledged.extend(
            outcome
                .acknowledged
                .iter()
                .map(|seq| (device.id.clone(), *seq)),
        );
        shed.extend(outcome.shed.iter().map(|seq| (device.id.clone(), *seq)));
    }
    peak_kib = peak_kib.max(resident_kib(pid));
    eprintln!(
        "long stall: {DEVICES} devices, {} readings acknowledged, {} shed with 0x97, \
         {disconnected} devices told DISCONNECT 0x97; \
         max_pending_bytes {LIMIT_BYTES}, peak pending {peak_pending} bytes; server resident \
         memory {} MiB before, peak {} MiB (+{} MiB)",
        acknowledged.len(),
        shed.len(),
        before_kib / 1024,
        peak_kib / 1024,
        peak_kib.saturating_sub(before_kib) / 1024
    );
    assert!(!shed.is_empty(), "readings were shed with PUBACK 0x97");
    assert!(
        disconnected > 0,
        "devices whose readings were shed were told DISCONNECT 0x97"
    );
    assert!(
        peak_pending <= LIMIT_BYTES as f64,
        "held {peak_pending} bytes for readings in flight, over the bound"
    );
    assert!(
        peak_kib.saturating_sub(before_kib) < 128 * 1024,
        "memory grew by {} MiB under a long stall",
        peak_kib.saturating_sub(before_kib) / 1024
    );

    // Recovered: logins are admitted and readings taken again, once the shedding window ends.
    let mut code = ConnectReturnCode::ServerUnavailable;
    for _attempt in 0..50 {
        code = v5_login(&latecomer_v5, &server).await;
        if code == ConnectReturnCode::Success {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(code, ConnectReturnCode::Success, "a login after the stall");
    let mut late = V5Device::connect(&latecomer_v5, &server).await;
    assert_eq!(
        late.publish(&latecomer_v5.topic(), latecomer_v5.payload(1))
            .await,
        PubAckReason::Success,
        "a reading after the stall"
    );

    // Every acknowledged reading is stored once; no shed reading is stored.
    let stored: BTreeSet<(String, u64)> = server
        .sql("SELECT DISTINCT device_id, seq FROM readings WHERE device_id LIKE 'shed-%'")
        .await
        .iter()
        .flat_map(|batch| {
            let ids = arrow::array::cast::as_string_array(batch.column(0));
            let seqs = arrow::array::cast::as_primitive_array::<arrow::datatypes::UInt64Type>(
                batch.column(1),
            );
            (0..batch.num_rows())
                .map(|row| (ids.value(row).to_owned(), seqs.value(row)))
                .collect::<Vec<_>>()
        })
        .collect();
    let missing: Vec<_> = acknowledged.difference(&stored).take(5).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not stored: {missing:?}"
    );
    let stored_shed: Vec<_> = shed.intersection(&stored).take(5).collect();
    assert!(stored_shed.is_empty(), "shed but stored: {stored_shed:?}");
    let rows = server
        .sql_count("SELECT count(*) FROM readings WHERE device_id LIKE 'shed-%'")
        .await;
    assert_eq!(rows, stored.len() as i64 * 2, "no reading stored twice");
}
