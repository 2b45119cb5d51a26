//! TLS: MQTT over TLS for devices, and TLS on the gRPC port for client commands.

use std::process::Command;

use crate::support::{SelfSignedCert, Server, TestDevice, publish_over_tls, tls_server, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_published_over_tls_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (server, tls_address, cert) = tls_server(dir.path());
    let device = TestDevice::new("tls-monitor-1");
    server.enroll(&[&device]);

    let published = publish_over_tls(dir.path(), tls_address, &cert, &device, device.payload(1));
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

/// With a certificate on the gRPC port, client commands reach the server over `https://` when
/// they trust its certificate, and nothing reaches it in plaintext or without that trust; the
/// failed handshakes are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_reach_a_grpc_port_with_tls() {
    let dir = tempfile::tempdir().unwrap();
    let tls = SelfSignedCert::generate(dir.path());
    let server = Server::start_with_grpc_tls(&dir.path().join("data"), &tls);
    assert!(server.grpc_url().starts_with("https://"));

    // Enrollment (DeviceAdmin) and a query (Flight SQL) both go over TLS.
    let device = TestDevice::new("tls-pump-1");
    server.enroll(&[&device]);
    let answer = server.cli(&["sql", "SELECT device_id FROM devices", "--format", "csv"]);
    assert!(answer.contains("tls-pump-1"), "{answer}");
    let listed = server.cli(&["devices", "list"]);
    assert!(listed.contains("tls-pump-1"), "{listed}");

    let token = server.token.trim();
    let sql = |server_url: &str, ca_cert: Option<&std::path::Path>| {
        let mut command = Command::new(crate::support::BIN);
        command
            .args([
                "sql",
                "SELECT count(*) AS n FROM devices",
                "--format",
                "csv",
            ])
            .args(["--server", server_url])
            .env("VIGIL_TOKEN", token)
            .env_remove("VIGIL_CA_CERT");
        if let Some(ca) = ca_cert {
            command.arg("--ca-cert").arg(ca);
        }
        command.output().unwrap()
    };

    // A plaintext client gets no answer from a TLS port.
    let plaintext = sql(&format!("http://{}", server.grpc), None);
    assert!(
        !plaintext.status.success(),
        "plaintext gRPC was answered: {}",
        String::from_utf8_lossy(&plaintext.stdout)
    );

    // Without trusting the self-signed certificate, the client refuses the server.
    let untrusted = sql(&server.grpc_url(), None);
    assert!(
        !untrusted.status.success(),
        "an untrusted certificate was accepted"
    );
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert!(stderr.contains("cannot reach"), "{stderr}");

    // Both failed handshakes are counted.
    wait_for(
        || server.metric("vigil_grpc_tls_handshake_failures_total") >= 2.0,
        "two failed TLS handshakes counted",
    )
    .await;

    // A CA certificate with a plaintext URL is a mistake the client names.
    let mixed = sql(&format!("http://{}", server.grpc), Some(&tls.cert));
    assert!(!mixed.status.success());
    let stderr = String::from_utf8_lossy(&mixed.stderr);
    assert!(stderr.contains("not https://"), "{stderr}");

    // The same query with the certificate trusted works.
    let trusted = sql(&server.grpc_url(), Some(&tls.cert));
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&trusted.stdout).trim(), "n\n1");
}
