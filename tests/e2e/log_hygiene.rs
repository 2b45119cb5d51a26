//! What reaches the server's log: no bearer token, login token or private key, however a client
//! tries; and attacker text (device ids, topics) only escaped, never as raw control characters
//! that could forge log lines or drive an operator's terminal. The same text lands in
//! `rejections` as data, truncated.

use std::time::Duration;

use arrow::array::{Array, StringArray};
use rumqttc::{ConnectionError, MqttOptions, QoS};

use crate::support::{SelfSignedCert, Server, TestDevice, V3Device, wait_for};

/// Device ids and topic segments an attacker could send: ANSI escapes (7-bit and 8-bit CSI), a
/// newline followed by a forged log line, a carriage return, a bell, DEL, and a long string.
fn attacker_texts() -> Vec<String> {
    vec![
        "evil\u{1b}[31mred\u{1b}[0m\u{1b}[2J".to_owned(),
        "line\n2026-01-01T00:00:00Z  INFO vigil: forged entry".to_owned(),
        "cr\rbell\u{7}del\u{7f}csi\u{9b}31m".to_owned(),
        format!("long-{}", "A\u{1b}".repeat(2_000)),
    ]
}

/// The strings of column `column` in every batch of `query`'s answer.
async fn strings(server: &Server, query: &str, column: usize) -> Vec<String> {
    let mut values = Vec::new();
    for batch in server.sql(query).await {
        let array = batch
            .column(column)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .clone();
        values.extend((0..array.len()).map(|row| array.value(row).to_owned()));
    }
    values
}

/// The first `max` characters of `text`, as the server stores attacker text.
fn truncated(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_the_log_and_attacker_text_is_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let tls = SelfSignedCert::generate(dir.path());
    let config = dir.path().join("vigil.toml");
    std::fs::write(
        &config,
        format!(
            "[ingest]\ntls_cert_path = {:?}\ntls_key_path = {:?}\n\
             mqtt_tls_listen = \"127.0.0.1:0\"\n\
             [detect]\ndefault_policy = \"alert_and_confirm\"\n",
            tls.cert.display().to_string(),
            tls.key.display().to_string()
        ),
    )
    .unwrap();
    // Debug level for vigil's own crates: what an operator turns on to investigate.
    let filter = "info,vigil=debug,vigil_ingest=debug,vigil_detect=debug,vigil_store=debug";
    let server = Server::start_logging(
        &dir.path().join("data"),
        filter,
        &["--config", config.to_str().unwrap()],
    );
    let admin = server.token.trim().to_owned();
    let mut secrets = vec![admin.clone()];

    // API tokens: one made and used, and guesses that are refused.
    let analyst = server.cli(&["tokens", "create", "--role", "analyst", "--name", "grafana"]);
    let analyst = analyst.trim().to_owned();
    server.cli_as(&analyst, &["sql", "SELECT count(*) FROM devices"]);
    secrets.push(analyst);
    for guess in [hex::encode(rand::random::<[u8; 32]>()), format!("{admin}x")] {
        let stderr = server.cli_fails_as(&guess, &["devices", "list"]);
        assert!(stderr.contains("unknown bearer token"), "{stderr}");
        secrets.push(guess);
    }
    let stderr = server.cli_fails_as(
        &admin,
        &[
            "tokens",
            "create",
            "--role",
            "analyst",
            "--name",
            "a\u{1b}[2Jb",
        ],
    );
    assert!(stderr.contains("control characters"), "{stderr}");

    // Device logins: a good token, a forged one and a replayed one.
    let device = TestDevice::new("icu-bed-07-spo2");
    server.enroll(&[&device]);
    let good_token = device.token();
    let mut options = device.options(server.mqtt);
    options.set_credentials(&device.id, good_token.clone());
    let mut connection = V3Device::connect_with(options.clone()).await.unwrap();
    connection
        .publish_all(&device.topic(), vec![device.payload(1)])
        .await
        .unwrap();
    drop(connection);
    assert!(
        V3Device::connect_with(options).await.is_err(),
        "a replayed token"
    );
    let thief = TestDevice::new(&device.id);
    let forged_token = thief.token();
    let mut forged = device.options(server.mqtt);
    forged.set_credentials(&device.id, forged_token.clone());
    assert!(
        V3Device::connect_with(forged).await.is_err(),
        "a forged token"
    );
    secrets.extend([good_token, forged_token]);

    // Attacker text as client id and username, as a topic, and as a device id on gRPC.
    let texts = attacker_texts();
    for text in &texts {
        let mut options = MqttOptions::new(text, server.mqtt.ip().to_string(), server.mqtt.port());
        options.set_credentials(text, format!("v1.0.{text}.x"));
        options.set_max_packet_size(64 * 1024, 64 * 1024);
        match V3Device::connect_with(options).await {
            Err(ConnectionError::ConnectionRefused(_)) => {}
            Err(other) => panic!("expected a CONNACK refusal, got {other}"),
            Ok(_) => panic!("a login with attacker text was accepted"),
        }

        let mut session = V3Device::connect(&device, server.mqtt).await.unwrap();
        let topic = format!("vigil/v1/devices/{text}/readings");
        session
            .client
            .publish(&topic, QoS::AtLeastOnce, false, device.payload(2))
            .await
            .unwrap();
        assert!(session.closed_within(Duration::from_secs(10)).await);

        let stderr = server.cli_fails_as(&admin, &["devices", "quarantine", text]);
        assert!(!stderr.is_empty());
    }
    let refused_logins = texts.len() as f64 + 2.0;
    wait_for(
        || {
            let metrics = server.metrics();
            let refused: f64 = metrics
                .lines()
                .filter(|line| line.starts_with("vigil_ingest_logins_refused_total{"))
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            refused >= refused_logins
        },
        "every refused login counted",
    )
    .await;

    // `rejections` holds the attacker's text as data: truncated, byte for byte otherwise.
    let mut stored_ids = Vec::new();
    let mut stored_topics = Vec::new();
    for _ in 0..100 {
        stored_ids = strings(
            &server,
            "SELECT device_id FROM rejections WHERE reason LIKE 'login%'",
            0,
        )
        .await;
        stored_topics = strings(
            &server,
            "SELECT detail FROM rejections WHERE reason = 'topic_not_allowed'",
            0,
        )
        .await;
        if stored_ids.len() >= texts.len() && stored_topics.len() >= texts.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for text in &texts {
        let id = truncated(text, 64);
        assert!(stored_ids.contains(&id), "{id:?} not in {stored_ids:?}");
        let topic = format!(
            "topic {}",
            truncated(&format!("vigil/v1/devices/{text}/readings"), 200)
        );
        assert!(
            stored_topics.contains(&topic),
            "{topic:?} not in {stored_topics:?}"
        );
    }
    assert!(stored_ids.iter().all(|id| id.chars().count() <= 64));

    // The log: no secret, no key material, no raw control character but the line ends.
    let log = server.log();
    assert!(log.contains("login refused"), "debug logging is on");
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "a secret is in the log");
    }
    let key_pem = std::fs::read_to_string(&tls.key).unwrap();
    for line in key_pem.lines().filter(|line| !line.starts_with("-----")) {
        assert!(!log.contains(line), "private key material is in the log");
    }
    let raw: Vec<(usize, char)> = log
        .lines()
        .enumerate()
        .flat_map(|(number, line)| {
            line.chars()
                .filter(|c| c.is_control())
                .map(move |c| (number + 1, c))
        })
        .collect();
    assert!(
        raw.is_empty(),
        "raw control characters in the log at (line, char): {raw:?}"
    );
    assert!(
        !log.lines()
            .any(|line| line.starts_with("2026-01-01T00:00:00Z")),
        "a forged log line"
    );
}
