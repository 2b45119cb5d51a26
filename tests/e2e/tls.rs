//! MQTT over TLS: with a certificate configured, a device logs in and publishes over TLS.

use std::net::TcpListener;
use std::process::Command;

use crate::support::{Server, TestDevice};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_published_over_tls_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let generated = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );

    let tls_address = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = dir.path().join("vigil.toml");
    std::fs::write(
        &config,
        format!(
            "[ingest]\ntls_cert_path = {:?}\ntls_key_path = {:?}\nmqtt_tls_listen = \"{tls_address}\"\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    )
    .unwrap();
    let server = Server::start_with(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
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
