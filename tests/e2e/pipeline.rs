//! The main path: enrolled devices publish signed readings; every one is acknowledged and then
//! returned by SQL, over Flight SQL and through `vigil sql`.

use std::process::Command;

use crate::support::{Server, TestDevice, V3Device};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_readings_are_acknowledged_then_queryable() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    let devices: Vec<TestDevice> = (0..3)
        .map(|i| TestDevice::new(&format!("icu-bed-{i:02}.spo2")))
        .collect();
    server.enroll(&devices.iter().collect::<Vec<_>>());

    let listed = server.cli(&["devices", "list"]);
    for device in &devices {
        assert!(
            listed.contains(&device.id),
            "{} missing from:\n{listed}",
            device.id
        );
    }

    const READINGS: u64 = 200;
    for device in &devices {
        let mut connection = V3Device::connect(device, server.mqtt).await.unwrap();
        let payloads = (1..=READINGS).map(|seq| device.payload(seq)).collect();
        let acked = connection
            .publish_all(&device.topic(), payloads)
            .await
            .unwrap();
        assert_eq!(acked, READINGS as usize);
    }

    // Each reading has two measurements, one row each.
    for device in &devices {
        let query = format!(
            "SELECT count(*) FROM readings WHERE device_id = '{}' AND seq BETWEEN 1 AND {READINGS}",
            device.id
        );
        assert_eq!(server.sql_count(&query).await, 2 * READINGS as i64);
    }
    let distinct = "SELECT count(*) FROM (SELECT DISTINCT device_id, seq, metric FROM readings)";
    assert_eq!(server.sql_count(distinct).await, 3 * 2 * READINGS as i64);
    assert_eq!(
        server.metric("vigil_ingest_readings_accepted_total"),
        3.0 * READINGS as f64
    );

    let json = server.cli(&[
        "sql",
        "SELECT device_id, count(*) AS n FROM readings GROUP BY device_id ORDER BY device_id",
        "--format",
        "json",
    ]);
    let rows: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 3);
    assert_eq!(rows[0]["device_id"], devices[0].id.as_str());
    assert_eq!(rows[0]["n"], 2 * READINGS);

    let devices_table = server.cli(&[
        "sql",
        "SELECT device_id, class, status FROM devices",
        "--format",
        "csv",
    ]);
    // Two hundred readings in a second is far above a monitor's usual rate: the detector may
    // have marked the devices suspect, but never quarantined (a burst needs no key to fake).
    for device in &devices {
        let row = format!("{},pulse_oximeter,", device.id);
        let status = devices_table
            .lines()
            .find_map(|line| line.strip_prefix(&row))
            .unwrap_or_else(|| panic!("{row} missing from:\n{devices_table}"));
        assert!(["active", "suspect"].contains(&status), "{devices_table}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_reading_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    let device = TestDevice::new("infusion-pump-3");
    server.enroll(&[&device]);

    let payload_file = dir.path().join("reading.bin");
    std::fs::write(&payload_file, device.payload(1)).unwrap();
    let status = Command::new("mosquitto_pub")
        .args([
            "-h",
            &server.mqtt.ip().to_string(),
            "-p",
            &server.mqtt.port().to_string(),
        ])
        .args(["-V", "mqttv311", "-q", "1"])
        .args(["-i", &device.id, "-u", &device.id, "-P", &device.token()])
        .args(["-t", &device.topic()])
        .arg("-f")
        .arg(&payload_file)
        .status()
        .expect("mosquitto_pub runs (scripts/install-test-deps.sh installs it)");
    assert!(status.success(), "mosquitto_pub failed: {status}");

    let query = format!(
        "SELECT count(*) FROM readings WHERE device_id = '{}' AND seq = 1",
        device.id
    );
    assert_eq!(server.sql_count(&query).await, 2);
}
