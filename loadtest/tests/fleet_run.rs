//! Runs small fleets against an in-process stand-in for the server: a minimal MQTT 3.1.1
//! broker that checks login tokens and reading signatures the way the device contract says,
//! stores readings with the contract's re-send rule, and drops connections on purpose.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use ed25519_dalek::{Signature, VerifyingKey};
use prost::Message;
use rumqttc::{ConnAck, ConnectReturnCode, Packet, PubAck};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vigil_loadtest::{FleetConfig, SimDevice, generate_fleet, run_fleet};
use vigil_proto::v1::{Reading, SignedReading};

const MAX_PACKET: usize = 64 * 1024;

#[derive(Default)]
struct Ledger {
    nonces: HashSet<[u8; 16]>,
    reused_nonces: u64,
    connections: HashMap<String, u32>,
    /// Stored readings per device, in arrival order: (seq, signature).
    stored: HashMap<String, Vec<(u64, Vec<u8>)>>,
    replays: u64,
    bad_signatures: u64,
}

struct TestBroker {
    keys: HashMap<String, VerifyingKey>,
    /// On a device's first connection, the connection is cut after storing this many readings
    /// and before acknowledging the last of them.
    cut_first_connection_after: Option<usize>,
    ledger: Mutex<Ledger>,
}

impl TestBroker {
    async fn start(
        enrolled: &[SimDevice],
        cut_first_connection_after: Option<usize>,
    ) -> (Arc<Self>, u16) {
        let keys = enrolled
            .iter()
            .map(|device| (device.device_id.clone(), device.signing_key.verifying_key()))
            .collect();
        let broker = Arc::new(Self {
            keys,
            cut_first_connection_after,
            ledger: Mutex::default(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepting = Arc::clone(&broker);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(Arc::clone(&accepting).serve(socket));
            }
        });
        (broker, port)
    }

    async fn serve(self: Arc<Self>, mut socket: TcpStream) {
        let mut buffer = BytesMut::new();
        let Some(Packet::Connect(connect)) = read_packet(&mut socket, &mut buffer).await else {
            return;
        };
        let device_id = connect.client_id.clone();
        let Some(connection) = self.login(&connect) else {
            let refusal = ConnAck::new(ConnectReturnCode::NotAuthorized, false);
            write_packet(&mut socket, Packet::ConnAck(refusal)).await;
            return;
        };
        write_packet(
            &mut socket,
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
        )
        .await;

        let mut stored_here = 0;
        while let Some(packet) = read_packet(&mut socket, &mut buffer).await {
            match packet {
                Packet::Publish(publish) => {
                    assert_eq!(publish.topic, vigil_proto::readings_topic(&device_id));
                    self.store(&device_id, &publish.payload);
                    stored_here += 1;
                    if connection == 1 && Some(stored_here) == self.cut_first_connection_after {
                        return;
                    }
                    write_packet(&mut socket, Packet::PubAck(PubAck::new(publish.pkid))).await;
                }
                Packet::PingReq => write_packet(&mut socket, Packet::PingResp).await,
                Packet::Disconnect => return,
                other => panic!("unexpected packet {other:?}"),
            }
        }
    }

    /// Checks the login token; returns which connection of the device this is.
    fn login(&self, connect: &rumqttc::Connect) -> Option<u32> {
        let login = connect.login.as_ref()?;
        assert_eq!(login.username, connect.client_id);
        let key = self.keys.get(&connect.client_id)?;
        let token = vigil_proto::LoginToken::parse(&login.password).unwrap();
        token.verify(&connect.client_id, key).unwrap();

        let mut ledger = self.ledger.lock().unwrap();
        if !ledger.nonces.insert(token.nonce) {
            ledger.reused_nonces += 1;
            return None;
        }
        let count = ledger
            .connections
            .entry(connect.client_id.clone())
            .or_default();
        *count += 1;
        Some(*count)
    }

    /// Stores a reading unless it is an exact re-send or a replay, as the contract says.
    fn store(&self, device_id: &str, payload: &[u8]) {
        let signed = SignedReading::decode(payload).unwrap();
        let reading = Reading::decode(signed.reading.as_slice()).unwrap();
        assert_eq!(reading.device_id, device_id);
        let message = vigil_proto::reading_signing_message(&signed.reading);
        let signature = Signature::from_slice(&signed.signature).unwrap();

        let mut ledger = self.ledger.lock().unwrap();
        if self.keys[device_id]
            .verify_strict(&message, &signature)
            .is_err()
        {
            ledger.bad_signatures += 1;
            return;
        }
        let stored = ledger.stored.entry(device_id.to_owned()).or_default();
        let highest = stored.last().map_or(0, |(seq, _)| *seq);
        if reading.seq > highest {
            stored.push((reading.seq, signed.signature));
        } else if !stored.contains(&(reading.seq, signed.signature)) {
            ledger.replays += 1;
        }
    }
}

async fn read_packet(socket: &mut TcpStream, buffer: &mut BytesMut) -> Option<Packet> {
    loop {
        match Packet::read(buffer, MAX_PACKET) {
            Ok(packet) => return Some(packet),
            Err(rumqttc::Error::InsufficientBytes(_)) => {}
            Err(error) => panic!("malformed packet: {error:?}"),
        }
        if socket.read_buf(buffer).await.ok()? == 0 {
            return None;
        }
    }
}

async fn write_packet(socket: &mut TcpStream, packet: Packet) {
    let mut out = BytesMut::new();
    packet.write(&mut out, MAX_PACKET).unwrap();
    // The client may already have gone; the broker does not care.
    let _ = socket.write_all(&out).await;
}

fn config(port: u16) -> FleetConfig {
    FleetConfig {
        mqtt_host: "127.0.0.1".to_owned(),
        mqtt_port: port,
        readings_per_device_per_s: 20.0,
        duration: Duration::from_secs(1),
        token_lifetime_s: 60,
        max_inflight_per_device: 4,
        progress: false,
        connect_spread: Duration::from_millis(200),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_is_stored_once_across_cut_connections() {
    let devices = generate_fleet(12, 21);
    let (broker, port) = TestBroker::start(&devices, Some(3)).await;

    let report = run_fleet(&devices, &config(port)).await.unwrap();

    assert_eq!(report.devices, 12);
    assert_eq!(report.offered, 12 * 20);
    assert_eq!(report.acked, report.offered, "{report}");
    assert_eq!(report.not_acked, 0);
    assert_eq!(report.published, report.offered);
    assert_eq!(
        report.reconnects, 12,
        "each device's first connection is cut once"
    );
    assert!(report.resent >= 12, "{report}");
    assert_eq!(report.connect_failures, 0);
    assert_eq!(report.latency_from_send_ms.count, report.acked);
    assert!(report.latency_from_schedule_ms.p50 >= report.latency_from_send_ms.p50);
    assert!(
        report
            .per_device_last_acked_seq
            .values()
            .all(|&seq| seq == 20)
    );

    let ledger = broker.ledger.lock().unwrap();
    assert_eq!(ledger.reused_nonces, 0);
    assert_eq!(ledger.replays, 0);
    assert_eq!(ledger.bad_signatures, 0);
    for device in &devices {
        let seqs: Vec<u64> = ledger.stored[&device.device_id]
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>(), "{}", device.device_id);
        assert_eq!(ledger.connections[&device.device_id], 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_logins_are_counted_and_retried_with_fresh_tokens() {
    let devices = generate_fleet(3, 22);
    // Only the first device is enrolled.
    let (broker, port) = TestBroker::start(&devices[..1], None).await;
    let config = FleetConfig {
        duration: Duration::from_millis(100),
        ..config(port)
    };

    let report = run_fleet(&devices, &config).await.unwrap();

    assert_eq!(report.offered, 3 * 2);
    assert_eq!(report.acked, 2, "{report}");
    assert_eq!(report.not_acked, 4);
    assert!(report.login_refusals >= 4, "{report}");
    assert_eq!(report.login_refusals, report.connect_failures);
    assert_eq!(report.per_device_last_acked_seq[&devices[0].device_id], 2);
    assert_eq!(report.per_device_last_acked_seq[&devices[1].device_id], 0);
    assert_eq!(broker.ledger.lock().unwrap().reused_nonces, 0);
}

/// A scale check, not run by default: `cargo test -p vigil-loadtest -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes a few seconds of both cores"]
async fn two_thousand_devices_in_one_process() {
    let devices = generate_fleet(2_000, 23);
    let (_broker, port) = TestBroker::start(&devices, None).await;
    let config = FleetConfig {
        readings_per_device_per_s: 2.0,
        duration: Duration::from_secs(3),
        max_inflight_per_device: 10,
        connect_spread: Duration::from_secs(1),
        progress: true,
        ..config(port)
    };

    let report = run_fleet(&devices, &config).await.unwrap();
    eprintln!("{report}");

    assert_eq!(report.offered, 12_000);
    assert_eq!(report.acked, report.offered, "{report}");
    assert_eq!(report.connected, 2_000);
}
