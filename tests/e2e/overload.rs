//! Storage trouble: a full disk. The server refuses readings it cannot make durable with a
//! reason (MQTT v5 PUBACK 0x97, counted), keeps serving (though its own log cannot be written),
//! keeps every reading it acknowledged, and takes readings again once space is freed.
//!
//! The disk is a small tmpfs mounted for the test, which needs root (as in CI here); where
//! mounting is not permitted the test says so on stderr and does nothing else.

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
