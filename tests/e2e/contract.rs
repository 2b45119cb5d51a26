//! The published contract vectors, byte for byte, are accepted by the running server.

use ed25519_dalek::SigningKey;
use serde_json::Value;

use crate::support::{Server, TestDevice, V3Device};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_vector_payload_is_accepted() {
    let vectors: Value =
        serde_json::from_str(include_str!("../../proto/tests/contract-vectors.json")).unwrap();
    let seed = hex::decode(vectors["secret_key_seed_hex"].as_str().unwrap()).unwrap();
    let device = TestDevice {
        id: vectors["device_id"].as_str().unwrap().to_owned(),
        key: SigningKey::from_bytes(&seed.try_into().unwrap()),
    };

    // The vector was sampled on 2026-01-01 and its login token has expired since, so this
    // server accepts a wide clock skew; the token format itself is checked against the vector
    // in the proto and login tests, and here a fresh token from the same key logs in.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vigil.toml");
    std::fs::write(&config, "[ingest]\nmax_clock_skew_ms = 100000000000\n").unwrap();
    let server = Server::start_with(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    server.cli(&[
        "devices",
        "add",
        &device.id,
        "--public-key",
        vectors["public_key_hex"].as_str().unwrap(),
        "--class",
        "pulse_oximeter",
    ]);

    let payload = hex::decode(
        vectors["reading"]["signed_reading_payload_hex"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let topic = vectors["reading"]["topic"].as_str().unwrap();
    let mut connection = V3Device::connect(&device, server.mqtt).await.unwrap();
    connection.publish_all(topic, vec![payload]).await.unwrap();

    let rows = server
        .sql(&format!(
            "SELECT metric, value FROM readings WHERE device_id = '{}' AND seq = 42 ORDER BY metric",
            device.id
        ))
        .await;
    let text = arrow::util::pretty::pretty_format_batches(&rows)
        .unwrap()
        .to_string();
    assert!(text.contains("heart_rate_bpm | 72.0"), "{text}");
    assert!(text.contains("spo2_pct       | 97.5"), "{text}");
}
