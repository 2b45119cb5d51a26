//! Detection and response end to end: a forged signature cuts a device off (notice, closed
//! session, refused logins), the SOC sees the alert on its gRPC stream and in SQL, resumes
//! the stream after a restart, and releases the device; failed logins under a device's id
//! throttle their source but never cut the device off.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use prost::Message;
use rumqttc::{ConnectReturnCode, ConnectionError, Event, Packet, QoS};
use vigil_loadtest::attacks::{AttackPlan, RawMqtt, Scenario};
use vigil_loadtest::{DeviceClass, SimDevice};
use vigil_proto::sign_reading;
use vigil_proto::v1::Notice;

use crate::support::{Server, TestDevice, V3Device, wait_for};

fn alerts_json(server: &Server, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["alerts", "tail", "--format", "json"];
    all.extend_from_slice(args);
    server
        .cli(&all)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_signature_cuts_the_device_off_and_the_soc_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"));
    let device = TestDevice::new("icu-3-spo2");
    let bystander = TestDevice::new("icu-4-spo2");
    server.enroll(&[&device, &bystander]);

    let mut session = V3Device::connect(&device, server.mqtt).await.unwrap();
    session
        .client
        .subscribe(vigil_proto::notices_topic(&device.id), QoS::AtMostOnce)
        .await
        .unwrap();
    session
        .publish_all(&device.topic(), vec![device.payload(1)])
        .await
        .unwrap();

    // A reading signed with another key, inside the device's own session.
    let forged = sign_reading(&SigningKey::from_bytes(&[7; 32]), &device.reading(2));
    session
        .client
        .publish(
            &device.topic(),
            QoS::AtLeastOnce,
            false,
            forged.encode_to_vec(),
        )
        .await
        .unwrap();

    // The notice arrives first, then the session is closed.
    let mut notice = None;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match session.events.poll().await {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    notice = Some(Notice::decode(publish.payload.as_ref()).unwrap());
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the session was not closed");
    let notice = notice.expect("a quarantine notice before the close");
    assert_eq!(notice.kind, "quarantined");
    assert!(notice.reason.contains("rule.bad_signature"), "{notice:?}");

    // Every later login is refused.
    match V3Device::connect(&device, server.mqtt).await {
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, ConnectReturnCode::NotAuthorized)
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a quarantined device logged in"),
    }
    assert!(V3Device::connect(&bystander, server.mqtt).await.is_ok());

    // The SOC's stream and SQL both have the alert with its evidence and action.
    let alerts = alerts_json(&server, &["--limit", "1"]);
    assert_eq!(alerts[0]["device_id"], device.id.as_str());
    assert_eq!(alerts[0]["detector"], "rule.bad_signature");
    assert_eq!(alerts[0]["action"], "quarantined");
    assert_eq!(alerts[0]["severity"], "critical");
    assert_eq!(alerts[0]["evidence"][0]["feature"], "bad_signature");
    let alert_id = alerts[0]["alert_id"].as_u64().unwrap();
    let in_sql = server
        .sql_count(&format!(
            "SELECT count(*) FROM alerts WHERE device_id = '{}' AND detector = \
             'rule.bad_signature' AND action = 'quarantined'",
            device.id
        ))
        .await;
    assert_eq!(in_sql, 1);
    let status = server
        .sql_count(&format!(
            "SELECT count(*) FROM devices WHERE device_id = '{}' AND status = 'quarantined' \
             AND risk >= 0.8",
            device.id
        ))
        .await;
    assert_eq!(status, 1);
    assert!(server.metric("vigil_detect_quarantines_total") >= 1.0);

    // The reading stored before the cut-off is kept, and flagged with the alert.
    let flagged = server
        .sql_count(&format!(
            "SELECT count(*) FROM flagged_readings WHERE device_id = '{}' AND seq = 1 \
             AND alert_id = {alert_id}",
            device.id
        ))
        .await;
    assert_eq!(flagged, 2, "both measurements of reading 1");
    let bystander_flagged = server
        .sql_count(&format!(
            "SELECT count(*) FROM flagged_readings WHERE device_id = '{}'",
            bystander.id
        ))
        .await;
    assert_eq!(bystander_flagged, 0);

    // Quarantine and alerts survive a crash; the stream resumes after the last id seen.
    server.restart();
    assert!(V3Device::connect(&device, server.mqtt).await.is_err());
    server.cli(&["devices", "release", &device.id]);
    let resumed = alerts_json(&server, &["--since", &alert_id.to_string(), "--limit", "1"]);
    assert_eq!(resumed[0]["alert_id"].as_u64().unwrap(), alert_id + 1);
    assert_eq!(resumed[0]["action"], "released");

    let acked = server.cli(&[
        "alerts",
        "ack",
        &alert_id.to_string(),
        "--note",
        "key rotated",
    ]);
    assert!(acked.contains(&format!("#{alert_id}")), "{acked}");
    let acknowledged = server
        .sql_count(&format!(
            "SELECT count(*) FROM alerts WHERE alert_id = {alert_id} AND acknowledged"
        ))
        .await;
    assert_eq!(acknowledged, 1);

    // Released: the device logs in and its readings are stored again.
    let mut session = V3Device::connect(&device, server.mqtt).await.unwrap();
    session
        .publish_all(&device.topic(), vec![device.payload(3)])
        .await
        .unwrap();
    wait_for(
        || server.metric("vigil_ingest_readings_accepted_total") >= 1.0,
        "the released device's reading",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_throttle_their_source_but_never_cut_the_device_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    let device = TestDevice::new("pump-9");
    server.enroll(&[&device]);

    // Made-up tokens from another address; the key is only used at the end, to show that
    // the throttle does not even look at a token.
    let plan = AttackPlan {
        scenario: Scenario::CredentialStuffing,
        victim: SimDevice {
            device_id: device.id.clone(),
            class: DeviceClass::InfusionPump,
            signing_key: device.key.clone(),
        },
        bystanders: Vec::new(),
        server: server.mqtt,
        source: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        last_seq: 0,
        device_rate_hz: 1.0,
        duration: Duration::from_secs(5),
    };
    for _ in 0..30 {
        // Refused, or closed unchecked once the source is throttled.
        if let Ok(session) = RawMqtt::login(&plan, &device.id, false).await {
            assert!(session.is_none(), "a made-up token was accepted");
        }
    }
    wait_for(
        || server.metric("vigil_detect_peers_throttled_total") >= 1.0,
        "the source to be throttled",
    )
    .await;
    assert!(
        server.metric("vigil_ingest_logins_refused_total{reason=\"login_peer_throttled\"}") >= 1.0
    );

    // Even the right key is refused from the throttled source ...
    assert!(
        RawMqtt::login(&plan, &device.id, true)
            .await
            .unwrap()
            .is_none()
    );
    // ... but the device itself, from its own address, is not cut off.
    let mut session = V3Device::connect(&device, server.mqtt).await.unwrap();
    session
        .publish_all(&device.topic(), vec![device.payload(1)])
        .await
        .unwrap();
    let alerts = alerts_json(&server, &["--limit", "1"]);
    assert_eq!(alerts[0]["detector"], "rule.credential_stuffing");
    assert_eq!(alerts[0]["action"], "throttled");
    let quarantined = server
        .sql_count("SELECT count(*) FROM devices WHERE status = 'quarantined'")
        .await;
    assert_eq!(quarantined, 0);
}
