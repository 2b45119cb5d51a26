//! Storage trouble.
//!
//! - A full disk: the server refuses readings it cannot make durable with a reason (MQTT v5
//!   PUBACK 0x97, counted), keeps serving (though its own log cannot be written), keeps every
//!   reading it acknowledged, and takes readings again once space is freed.
//! - A stalled disk: PUBACKs wait for durability, so devices are held back by their in-flight
//!   windows; the server's memory stays flat; once the disk is fast again, every reading is
//!   stored exactly once.
//!
//! The full disk is a small tmpfs; the stalled one an ext4 file system on a loop device whose
//! writes a cgroup (v1 blkio) throttles. Both need root, as CI here has; where a step is not
//! permitted the test says so on stderr and does nothing else.

use std::path::{Path, PathBuf};
use std::process::Command;

use rumqttc::v5::mqttbytes::v5::PubAckReason;

use crate::support::{Server, TestDevice, V5Device, http_get};

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
    let server = Server::start_with(&disk.mount.join("data"), &[]);
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
