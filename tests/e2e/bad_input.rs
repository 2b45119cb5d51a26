//! Hostile and broken input against the running server: every class is refused with its
//! reason, counted in `/metrics`, recorded in `rejections`, and the server keeps serving.

use std::time::Duration;

use ed25519_dalek::SigningKey;
use prost::Message;
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use rumqttc::{ConnectReturnCode, ConnectionError, Event, Packet, QoS, SubscribeReasonCode};
use vigil_proto::v1::SignedReading;
use vigil_proto::{make_login_token, sign_reading};

use crate::support::{Server, TestDevice, V3Device, V5Device, now_s, wait_for};

fn refused(error: ConnectionError) -> ConnectReturnCode {
    match error {
        ConnectionError::ConnectionRefused(code) => code,
        other => panic!("expected a CONNACK refusal, got {other}"),
    }
}

async fn rejection_count(server: &Server, reason: &str) -> i64 {
    server
        .sql_count(&format!(
            "SELECT count(*) FROM rejections WHERE reason = '{reason}'"
        ))
        .await
}

fn refused_metric(server: &Server, reason: &str) -> f64 {
    server.metric(&format!(
        "vigil_ingest_readings_refused_total{{reason=\"{reason}\"}}"
    ))
}

fn login_refused_metric(server: &Server, reason: &str) -> f64 {
    server.metric(&format!(
        "vigil_ingest_logins_refused_total{{reason=\"{reason}\"}}"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_logins_get_not_authorized_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_without_cut_off(&dir.path().join("data"));
    let device = TestDevice::new("glucose-7");
    server.enroll(&[&device]);

    let stranger = TestDevice::new("not-enrolled");
    let error = V3Device::connect(&stranger, server.mqtt)
        .await
        .err()
        .unwrap();
    assert_eq!(refused(error), ConnectReturnCode::NotAuthorized);

    let mut expired = device.options(server.mqtt);
    expired.set_credentials(
        &device.id,
        make_login_token(&device.key, &device.id, now_s() - 5, rand::random()),
    );
    let error = V3Device::connect_with(expired).await.err().unwrap();
    assert_eq!(refused(error), ConnectReturnCode::NotAuthorized);

    let mut forged = device.options(server.mqtt);
    let thief = SigningKey::from_bytes(&[7; 32]);
    forged.set_credentials(
        &device.id,
        make_login_token(&thief, &device.id, now_s() + 60, rand::random()),
    );
    let error = V3Device::connect_with(forged).await.err().unwrap();
    assert_eq!(refused(error), ConnectReturnCode::NotAuthorized);

    let reused = device.options(server.mqtt);
    let first = V3Device::connect_with(reused.clone()).await.unwrap();
    drop(first);
    let error = V3Device::connect_with(reused).await.err().unwrap();
    assert_eq!(refused(error), ConnectReturnCode::NotAuthorized);

    for reason in [
        "login_unknown_device",
        "login_token_expired",
        "login_bad_signature",
        "login_nonce_reused",
    ] {
        wait_for(|| login_refused_metric(&server, reason) == 1.0, reason).await;
    }
    wait_for(
        || server.metric("vigil_ingest_logins_accepted_total") == 1.0,
        "one login",
    )
    .await;
    // Login refusals are recorded off the connection thread; give the log a moment.
    for reason in [
        "login_unknown_device",
        "login_token_expired",
        "login_bad_signature",
        "login_nonce_reused",
    ] {
        let mut stored = 0;
        for _ in 0..100 {
            stored = rejection_count(&server, reason).await;
            if stored == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(stored, 1, "rejections row for {reason}");
    }

    // The server keeps serving.
    let mut connection = V3Device::connect(&device, server.mqtt).await.unwrap();
    connection
        .publish_all(&device.topic(), vec![device.payload(1)])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_readings_are_refused_with_v5_reason_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_without_cut_off(&dir.path().join("data"));
    let device = TestDevice::new("spo2-12");
    let neighbour = TestDevice::new("spo2-13");
    server.enroll(&[&device, &neighbour]);
    let mut session = V5Device::connect(&device, &server).await;
    let topic = device.topic();

    assert_eq!(
        session.publish(&topic, device.payload(1)).await,
        PubAckReason::Success
    );

    let forged =
        sign_reading(&SigningKey::from_bytes(&[9; 32]), &device.reading(2)).encode_to_vec();
    assert_eq!(
        session.publish(&topic, forged).await,
        PubAckReason::NotAuthorized
    );

    let replay = device.payload(1);
    assert_eq!(
        session.publish(&topic, replay).await,
        PubAckReason::NotAuthorized
    );

    assert_eq!(
        session.publish(&neighbour.topic(), device.payload(2)).await,
        PubAckReason::NotAuthorized,
        "publishing on another device's topic"
    );

    let mut impostor = neighbour.reading(2);
    impostor.device_id = neighbour.id.clone();
    let impostor = sign_reading(&device.key, &impostor).encode_to_vec();
    assert_eq!(
        session.publish(&topic, impostor).await,
        PubAckReason::NotAuthorized
    );

    assert_eq!(
        session
            .publish(&topic, b"\x0a\xff\xff garbage".to_vec())
            .await,
        PubAckReason::PayloadFormatInvalid
    );
    assert_eq!(
        session.publish(&topic, vec![0x0a; 6000]).await,
        PubAckReason::PayloadFormatInvalid
    );

    let mut empty = device.reading(3);
    empty.measurements.clear();
    let empty = sign_reading(&device.key, &empty).encode_to_vec();
    assert_eq!(
        session.publish(&topic, empty).await,
        PubAckReason::PayloadFormatInvalid
    );

    let mut stale = device.reading(3);
    stale.sampled_at_ms -= 24 * 3600 * 1000;
    let stale = sign_reading(&device.key, &stale).encode_to_vec();
    assert_eq!(
        session.publish(&topic, stale).await,
        PubAckReason::PayloadFormatInvalid
    );

    let far = device.payload(10_000_000);
    assert_eq!(
        session.publish(&topic, far).await,
        PubAckReason::NotAuthorized
    );

    let small_order_r = {
        let signed = SignedReading::decode(device.payload(3).as_slice()).unwrap();
        let mut signature = signed.signature.clone();
        // y = 1 encodes the identity, a point of small order.
        signature[0] = 1;
        signature[1..32].fill(0);
        SignedReading {
            reading: signed.reading,
            signature,
        }
        .encode_to_vec()
    };
    assert_eq!(
        session.publish(&topic, small_order_r).await,
        PubAckReason::NotAuthorized
    );

    let mut not_a_number = device.reading(3);
    not_a_number.measurements[0].value = f64::NAN;
    let not_a_number = sign_reading(&device.key, &not_a_number).encode_to_vec();
    assert_eq!(
        session.publish(&topic, not_a_number).await,
        PubAckReason::PayloadFormatInvalid,
        "a NaN value"
    );
    let mut shouting = device.reading(3);
    shouting.measurements[0].metric = "Heart_Rate<script>".to_owned();
    let shouting = sign_reading(&device.key, &shouting).encode_to_vec();
    assert_eq!(
        session.publish(&topic, shouting).await,
        PubAckReason::PayloadFormatInvalid,
        "a metric name outside lowercase a-z 0-9 _"
    );

    // Nothing of any refused message was stored: only reading 1 so far.
    let stored = format!(
        "SELECT count(*) FROM readings WHERE device_id = '{}'",
        device.id
    );
    assert_eq!(
        server.sql_count(&stored).await,
        2,
        "reading 1 (two measurements) and nothing refused"
    );

    // Still serving: the next good reading is stored.
    assert_eq!(
        session.publish(&topic, device.payload(3)).await,
        PubAckReason::Success
    );

    let expected = [
        ("bad_signature", 2),
        ("replay", 1),
        ("topic_not_allowed", 1),
        ("device_mismatch", 1),
        ("malformed", 3),
        ("oversized", 1),
        ("no_measurement", 1),
        ("implausible_time", 1),
        ("seq_jump_too_far", 1),
    ];
    for (reason, count) in expected {
        assert_eq!(
            refused_metric(&server, reason),
            count as f64,
            "metric for {reason}"
        );
        assert_eq!(
            rejection_count(&server, reason).await,
            count,
            "rejections for {reason}"
        );
    }
    assert_eq!(
        server.sql_count(&stored).await,
        4,
        "readings 1 and 3, two measurements each"
    );
    let neighbour_rows = format!(
        "SELECT count(*) FROM readings WHERE device_id = '{}'",
        neighbour.id
    );
    assert_eq!(server.sql_count(&neighbour_rows).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_acl_violations_close_the_session_or_fail_the_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_without_cut_off(&dir.path().join("data"));
    let device = TestDevice::new("bp-cuff-1");
    let neighbour = TestDevice::new("bp-cuff-2");
    server.enroll(&[&device, &neighbour]);

    let mut connection = V3Device::connect(&device, server.mqtt).await.unwrap();
    connection
        .client
        .subscribe("#", QoS::AtLeastOnce)
        .await
        .unwrap();
    connection
        .client
        .subscribe(vigil_proto::notices_topic(&device.id), QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut results = Vec::new();
    while results.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), connection.events.poll())
            .await
            .unwrap()
        {
            Ok(Event::Incoming(Packet::SubAck(ack))) => results.extend(ack.return_codes),
            Ok(_) => {}
            Err(error) => panic!("connection failed: {error}"),
        }
    }
    assert_eq!(
        results[0],
        SubscribeReasonCode::Failure,
        "wildcard subscription refused"
    );
    assert!(
        matches!(results[1], SubscribeReasonCode::Success(_)),
        "own notices allowed"
    );
    assert_eq!(
        server.metric("vigil_ingest_subscriptions_refused_total"),
        1.0
    );

    connection
        .client
        .publish(
            neighbour.topic(),
            QoS::AtLeastOnce,
            false,
            device.payload(1),
        )
        .await
        .unwrap();
    assert!(
        connection.closed_within(Duration::from_secs(10)).await,
        "session closed"
    );
    assert_eq!(refused_metric(&server, "topic_not_allowed"), 1.0);
    assert_eq!(rejection_count(&server, "topic_not_allowed").await, 1);

    let rows = format!(
        "SELECT count(*) FROM readings WHERE device_id = '{}'",
        neighbour.id
    );
    assert_eq!(server.sql_count(&rows).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_and_never_delays_others() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_without_cut_off(&dir.path().join("data"));
    let device = TestDevice::new("thermo-1");
    server.enroll(&[&device]);

    let silent: Vec<std::net::TcpStream> = (0..50)
        .map(|_| std::net::TcpStream::connect(server.mqtt).unwrap())
        .collect();

    let mut connection = V3Device::connect(&device, server.mqtt).await.unwrap();
    connection
        .publish_all(&device.topic(), vec![device.payload(1)])
        .await
        .unwrap();

    // The connect timeout (5 s by default) closes every silent socket.
    let mut buffer = [0u8; 1];
    for mut socket in silent {
        use std::io::Read;
        socket
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        match socket.read(&mut buffer) {
            Ok(0) => {}
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("silent connection still open: {other:?}"),
        }
    }
}
