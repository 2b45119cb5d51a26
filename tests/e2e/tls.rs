//! MQTT over TLS: with a certificate configured, a device logs in and publishes over TLS.

use std::process::Command;

use crate::support::{TestDevice, tls_server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_published_over_tls_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (server, tls_address, cert) = tls_server(dir.path());
    let device = TestDevice::new("tls-monitor-1");
    server.enroll(&[&device]);

    let payload_file = dir.path().join("reading.bin");
    std::fs::write(&payload_file, device.payload(1)).unwrap();
    let published = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &tls_address.port().to_string()])
        .arg("--cafile")
        .arg(&cert)
        .arg("--insecure")
        .args(["-V", "mqttv311", "-q", "1"])
        .args(["-i", &device.id, "-u", &device.id, "-P", &device.token()])
        .args(["-t", &device.topic()])
        .arg("-f")
        .arg(&payload_file)
        .output()
        .unwrap();
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );

    let query = format!(
        "SELECT count(*) FROM readings WHERE device_id = '{}'",
        device.id
    );
    assert_eq!(server.sql_count(&query).await, 2);
}
