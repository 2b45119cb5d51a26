//! Attack scenarios against a vigil server, each with its ground truth: which device is
//! attacked, when the attack's first message went out, and whether a cut-off is the right
//! answer.
//!
//! The attackers speak MQTT 3.1.1 through a small client of their own ([`RawMqtt`]) that binds
//! its socket to a chosen local address (`127.0.0.2` by default). On loopback every simulated
//! device shares `127.0.0.1`; a distinct source address lets the server throttle an attacker
//! without throttling the healthy fleet, as it would on a real network.
//!
//! What each scenario does (the attacker "holds the key" where the scenario says so; the
//! detector must tell the device's real behaviour from the attacker's):
//!
//! - `stolen_key_second_client`: the key is used from a second client while the real device
//!   keeps sending; the attacker jumps the seq ahead so the real device's readings look stale.
//! - `forged_signatures`: a session opened with the device's token sends readings signed with
//!   another key.
//! - `replayed_readings`: old seqs re-sent with altered values.
//! - `spoofed_vitals`: the stolen key sends well-signed, plausible but synthetic values in the
//!   device's place (uniform noise around a normal level).
//! - `slow_drift`: the stolen key continues the patient's own signal with a slowly growing
//!   offset (a few percent per ten seconds).
//! - `message_flood`: the stolen key sends hundreds of readings per second.
//! - `topic_probing`: the device's session subscribes to wildcards and publishes on another
//!   device's topic.
//! - `credential_stuffing`: someone without any key tries many logins under real device ids.
//!   The right answer is an alert and a throttled source, never a cut-off of those devices.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use ed25519_dalek::SigningKey;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use vigil_proto::v1::{Measurement, Reading};
use vigil_proto::{fresh_login_token, notices_topic, readings_topic, sign_reading};

use crate::fleet::SimDevice;
use crate::profiles::Patient;

/// The attack scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scenario {
    StolenKeySecondClient,
    ForgedSignatures,
    ReplayedReadings,
    SpoofedVitals,
    SlowDrift,
    MessageFlood,
    TopicProbing,
    CredentialStuffing,
}

impl Scenario {
    pub const ALL: [Scenario; 8] = [
        Scenario::StolenKeySecondClient,
        Scenario::ForgedSignatures,
        Scenario::ReplayedReadings,
        Scenario::SpoofedVitals,
        Scenario::SlowDrift,
        Scenario::MessageFlood,
        Scenario::TopicProbing,
        Scenario::CredentialStuffing,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::StolenKeySecondClient => "stolen_key_second_client",
            Scenario::ForgedSignatures => "forged_signatures",
            Scenario::ReplayedReadings => "replayed_readings",
            Scenario::SpoofedVitals => "spoofed_vitals",
            Scenario::SlowDrift => "slow_drift",
            Scenario::MessageFlood => "message_flood",
            Scenario::TopicProbing => "topic_probing",
            Scenario::CredentialStuffing => "credential_stuffing",
        }
    }

    /// Whether cutting the device off is the right answer. Credential stuffing needs no key:
    /// cutting off its targets would hand the attacker a way to silence monitors.
    pub fn cut_off_expected(self) -> bool {
        self != Scenario::CredentialStuffing
    }

    /// Whether the real device keeps sending during the attack (otherwise the attacker has
    /// taken its place and the device's own run ends when the attack starts).
    pub fn device_keeps_sending(self) -> bool {
        matches!(
            self,
            Scenario::StolenKeySecondClient | Scenario::CredentialStuffing
        )
    }
}

/// What an attack needs to know.
#[derive(Debug, Clone)]
pub struct AttackPlan {
    pub scenario: Scenario,
    /// The attacked device, with its key where the scenario steals it.
    pub victim: SimDevice,
    /// Other real device ids (for probing and stuffing).
    pub bystanders: Vec<String>,
    /// The server's MQTT listener.
    pub server: SocketAddr,
    /// Local address the attacker's sockets bind to.
    pub source: IpAddr,
    /// The highest seq the real device sent before the attack (0 if unknown).
    pub last_seq: u64,
    /// The real device's readings per second.
    pub device_rate_hz: f64,
    /// How long the attack goes on, at most.
    pub duration: Duration,
}

/// What an attack did: the ground truth of the detection report.
#[derive(Debug, Clone, PartialEq)]
pub struct AttackRecord {
    pub scenario: Scenario,
    pub device_id: String,
    /// Unix milliseconds of the attack's first message.
    pub started_at_ms: i64,
    pub messages_sent: u64,
    /// Logins the server refused.
    pub logins_refused: u64,
    /// Times the server closed the attacker's connection.
    pub disconnects: u64,
}

/// Runs one attack to its end and reports what it did.
pub async fn run_attack(plan: &AttackPlan) -> anyhow::Result<AttackRecord> {
    let mut record = AttackRecord {
        scenario: plan.scenario,
        device_id: plan.victim.device_id.clone(),
        started_at_ms: unix_ms(),
        messages_sent: 0,
        logins_refused: 0,
        disconnects: 0,
    };
    match plan.scenario {
        Scenario::StolenKeySecondClient => second_client(plan, &mut record).await?,
        Scenario::ForgedSignatures => {
            let forger = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
            let mut values = synthetic_values(plan, Values::Patient);
            publish_stream(
                plan,
                &mut record,
                plan.device_rate_hz,
                Some(&forger),
                &mut values,
            )
            .await?;
        }
        Scenario::ReplayedReadings => replayed(plan, &mut record).await?,
        Scenario::SpoofedVitals => {
            let mut values = synthetic_values(plan, Values::Noise);
            publish_stream(plan, &mut record, plan.device_rate_hz, None, &mut values).await?;
        }
        Scenario::SlowDrift => {
            let mut values = synthetic_values(plan, Values::Drift);
            publish_stream(plan, &mut record, plan.device_rate_hz, None, &mut values).await?;
        }
        Scenario::MessageFlood => {
            let mut values = synthetic_values(plan, Values::Patient);
            publish_stream(plan, &mut record, 300.0, None, &mut values).await?;
        }
        Scenario::TopicProbing => probing(plan, &mut record).await?,
        Scenario::CredentialStuffing => stuffing(plan, &mut record).await?,
    }
    Ok(record)
}

/// What an attacker's values look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Values {
    /// The patient's own signal, as the device would send it.
    Patient,
    /// The patient's signal with an offset growing by 3 % every ten seconds.
    Drift,
    /// Uniform noise of ±10 % around the patient's level: plausible numbers, no physiology.
    Noise,
}

/// A generator of the attacker's measurements at a time, `elapsed_s` into the attack.
fn synthetic_values(
    plan: &AttackPlan,
    style: Values,
) -> impl FnMut(i64, f64) -> Vec<Measurement> + use<> {
    let mut patient = Patient::new(plan.victim.class, plan.victim.patient_seed());
    let mut rng = StdRng::seed_from_u64(plan.victim.patient_seed() ^ 0x5eed);
    move |at_ms: i64, elapsed_s: f64| {
        let mut measurements = patient.sample(at_ms);
        for measurement in &mut measurements {
            match style {
                Values::Patient => {}
                Values::Drift => {
                    measurement.value *= 1.0 + 0.003 * elapsed_s;
                    measurement.value = (measurement.value * 10.0).round() / 10.0;
                }
                Values::Noise => {
                    measurement.value = (measurement.value * rng.gen_range(0.9..1.1)).round();
                }
            }
        }
        measurements
    }
}

/// A reading in the victim's name, sampled now.
fn victim_reading(
    plan: &AttackPlan,
    seq: u64,
    now_ms: i64,
    measurements: Vec<Measurement>,
) -> Reading {
    Reading {
        device_id: plan.victim.device_id.clone(),
        seq,
        sampled_at_ms: now_ms,
        measurements,
    }
}

/// Signs a reading of the victim with `key` and publishes it on `topic`; counts the message,
/// or the disconnect when the server no longer takes the session. Returns whether it went out.
async fn send_reading(
    mqtt: &mut RawMqtt,
    record: &mut AttackRecord,
    key: &SigningKey,
    topic: &str,
    reading: &Reading,
) -> bool {
    let payload = sign_reading(key, reading).encode_to_vec();
    if mqtt.publish(topic, &payload).await.is_err() {
        record.disconnects += 1;
        return false;
    }
    record.messages_sent += 1;
    true
}

/// Publishes readings at `rate_hz` from seq `last_seq + 2` on, signed with the device's key
/// or `forger`, until the plan's duration ends or the server stops accepting the session.
async fn publish_stream(
    plan: &AttackPlan,
    record: &mut AttackRecord,
    rate_hz: f64,
    forger: Option<&SigningKey>,
    values: &mut impl FnMut(i64, f64) -> Vec<Measurement>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut mqtt = match RawMqtt::login(plan, &plan.victim.device_id, true).await? {
        Some(mqtt) => mqtt,
        None => {
            record.logins_refused += 1;
            return Ok(());
        }
    };
    let interval = Duration::from_secs_f64(1.0 / rate_hz.max(0.1));
    let topic = readings_topic(&plan.victim.device_id);
    let mut seq = plan.last_seq + 2;
    let mut next = Instant::now();
    while started.elapsed() < plan.duration {
        let now_ms = unix_ms();
        let elapsed_s = started.elapsed().as_secs_f64();
        let reading = victim_reading(plan, seq, now_ms, values(now_ms, elapsed_s));
        let key = forger.unwrap_or(&plan.victim.signing_key);
        if !send_reading(&mut mqtt, record, key, &topic, &reading).await {
            break;
        }
        seq += 1;
        next += interval;
        tokio::time::sleep_until(next.into()).await;
    }
    Ok(())
}

/// The key used from a second client: logs in (taking the session over), sends readings far
/// ahead of the device's seq, and logs in again whenever the real device takes it back.
async fn second_client(plan: &AttackPlan, record: &mut AttackRecord) -> anyhow::Result<()> {
    let topic = readings_topic(&plan.victim.device_id);
    let started = Instant::now();
    let mut values = synthetic_values(plan, Values::Patient);
    let mut seq = plan.last_seq + 1_000;
    let interval = Duration::from_secs_f64(1.0 / plan.device_rate_hz.max(0.1));
    while started.elapsed() < plan.duration {
        let Some(mut mqtt) = RawMqtt::login(plan, &plan.victim.device_id, true).await? else {
            record.logins_refused += 1;
            if record.logins_refused >= 3 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        while started.elapsed() < plan.duration {
            let now_ms = unix_ms();
            let reading = victim_reading(plan, seq, now_ms, values(now_ms, 0.0));
            let key = &plan.victim.signing_key;
            if !send_reading(&mut mqtt, record, key, &topic, &reading).await {
                break;
            }
            seq += 1;
            tokio::time::sleep(interval).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Old seqs sent again with altered values.
async fn replayed(plan: &AttackPlan, record: &mut AttackRecord) -> anyhow::Result<()> {
    let topic = readings_topic(&plan.victim.device_id);
    let Some(mut mqtt) = RawMqtt::login(plan, &plan.victim.device_id, true).await? else {
        record.logins_refused += 1;
        return Ok(());
    };
    let mut values = synthetic_values(plan, Values::Noise);
    for seq in 1..=plan.last_seq.clamp(1, 20) {
        let now_ms = unix_ms();
        let reading = victim_reading(plan, seq, now_ms, values(now_ms, 0.0));
        let key = &plan.victim.signing_key;
        if !send_reading(&mut mqtt, record, key, &topic, &reading).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Wildcard subscriptions and a publish on another device's topic.
async fn probing(plan: &AttackPlan, record: &mut AttackRecord) -> anyhow::Result<()> {
    let Some(mut mqtt) = RawMqtt::login(plan, &plan.victim.device_id, true).await? else {
        record.logins_refused += 1;
        return Ok(());
    };
    let other = plan
        .bystanders
        .first()
        .cloned()
        .unwrap_or_else(|| "sim-other".to_owned());
    for filter in ["#", "vigil/v1/devices/+/readings", &notices_topic(&other)] {
        if mqtt.subscribe(filter).await.is_err() {
            record.disconnects += 1;
            return Ok(());
        }
        record.messages_sent += 1;
    }
    let reading = Reading {
        device_id: other.clone(),
        seq: 1,
        sampled_at_ms: unix_ms(),
        measurements: vec![Measurement {
            metric: "heart_rate_bpm".to_owned(),
            value: 70.0,
        }],
    };
    let topic = readings_topic(&other);
    send_reading(
        &mut mqtt,
        record,
        &plan.victim.signing_key,
        &topic,
        &reading,
    )
    .await;
    Ok(())
}

/// Many logins with made-up tokens under real device ids, from one source address.
async fn stuffing(plan: &AttackPlan, record: &mut AttackRecord) -> anyhow::Result<()> {
    let started = Instant::now();
    let targets: Vec<&str> = std::iter::once(plan.victim.device_id.as_str())
        .chain(plan.bystanders.iter().map(String::as_str))
        .take(5)
        .collect();
    let mut attempt = 0usize;
    while started.elapsed() < plan.duration.min(Duration::from_secs(10)) {
        let target = targets[attempt % targets.len()];
        attempt += 1;
        record.messages_sent += 1;
        match RawMqtt::login(plan, target, false).await {
            Ok(Some(_)) => bail!("a made-up token was accepted for {target}"),
            Ok(None) => record.logins_refused += 1,
            // A throttled source may see its connection closed before the CONNACK.
            Err(_) => record.disconnects += 1,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A minimal MQTT 3.1.1 client bound to a chosen source address: CONNECT, SUBSCRIBE and QoS 1
/// PUBLISH, one packet in flight at a time.
#[derive(Debug)]
pub struct RawMqtt {
    stream: TcpStream,
    next_packet_id: u16,
}

const IO_TIMEOUT: Duration = Duration::from_secs(5);

impl RawMqtt {
    /// Connects and logs in as `device_id`, with a fresh token signed by the victim's key
    /// (`real_token`) or a made-up one. `None` when the server refuses the login.
    pub async fn login(
        plan: &AttackPlan,
        device_id: &str,
        real_token: bool,
    ) -> anyhow::Result<Option<Self>> {
        let socket = match plan.source {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket
            .bind(SocketAddr::new(plan.source, 0))
            .with_context(|| format!("cannot bind to {}", plan.source))?;
        let stream = tokio::time::timeout(IO_TIMEOUT, socket.connect(plan.server))
            .await
            .context("connect timed out")??;
        let mut mqtt = Self {
            stream,
            next_packet_id: 1,
        };

        let token = if real_token {
            let now_s = (unix_ms() / 1000) as u64;
            fresh_login_token(&plan.victim.signing_key, device_id, now_s, 120)
        } else {
            let nonce: [u8; 8] = rand::random();
            format!(
                "v1.{}.{}.{}",
                unix_ms() / 1000 + 60,
                hex::encode(nonce),
                "A".repeat(86)
            )
        };
        let mut body = Vec::new();
        put_str(&mut body, "MQTT");
        body.extend_from_slice(&[4, 0b1100_0010, 0, 30]);
        put_str(&mut body, device_id);
        put_str(&mut body, device_id);
        put_str(&mut body, &token);
        mqtt.send(0x10, &body).await?;

        let (kind, payload) = mqtt.receive().await?;
        if kind != 0x20 || payload.len() < 2 {
            bail!("expected CONNACK, got packet type {kind:#x}");
        }
        Ok((payload[1] == 0).then_some(mqtt))
    }

    /// Publishes with QoS 1 and waits for the PUBACK.
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) -> anyhow::Result<()> {
        let packet_id = self.packet_id();
        let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
        put_str(&mut body, topic);
        body.extend_from_slice(&packet_id.to_be_bytes());
        body.extend_from_slice(payload);
        self.send(0x32, &body).await?;
        self.await_ack(0x40, packet_id).await
    }

    /// Subscribes with QoS 0 and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str) -> anyhow::Result<()> {
        let packet_id = self.packet_id();
        let mut body = Vec::new();
        body.extend_from_slice(&packet_id.to_be_bytes());
        put_str(&mut body, filter);
        body.push(0);
        self.send(0x82, &body).await?;
        self.await_ack(0x90, packet_id).await
    }

    fn packet_id(&mut self) -> u16 {
        let id = self.next_packet_id;
        self.next_packet_id = self.next_packet_id.wrapping_add(1).max(1);
        id
    }

    async fn await_ack(&mut self, expected: u8, packet_id: u16) -> anyhow::Result<()> {
        loop {
            let (kind, payload) = self.receive().await?;
            if kind == expected && payload.get(..2) == Some(&packet_id.to_be_bytes()[..]) {
                return Ok(());
            }
        }
    }

    async fn send(&mut self, header: u8, body: &[u8]) -> anyhow::Result<()> {
        let mut packet = Vec::with_capacity(body.len() + 5);
        packet.push(header);
        let mut length = body.len();
        loop {
            let mut byte = (length % 128) as u8;
            length /= 128;
            if length > 0 {
                byte |= 0x80;
            }
            packet.push(byte);
            if length == 0 {
                break;
            }
        }
        packet.extend_from_slice(body);
        tokio::time::timeout(IO_TIMEOUT, self.stream.write_all(&packet))
            .await
            .context("write timed out")??;
        Ok(())
    }

    /// The next packet's type (upper nibble of the first byte, as `0xN0`) and body.
    async fn receive(&mut self) -> anyhow::Result<(u8, Vec<u8>)> {
        let read = async {
            let first = self.stream.read_u8().await?;
            let mut length = 0usize;
            let mut shift = 0;
            loop {
                let byte = self.stream.read_u8().await?;
                length |= usize::from(byte & 0x7f) << shift;
                if byte & 0x80 == 0 {
                    break;
                }
                shift += 7;
                if shift > 21 {
                    bail!("malformed remaining length");
                }
            }
            let mut body = vec![0; length];
            self.stream.read_exact(&mut body).await?;
            Ok((first & 0xf0, body))
        };
        tokio::time::timeout(IO_TIMEOUT, read)
            .await
            .context("read timed out")?
    }
}

fn put_str(buffer: &mut Vec<u8>, text: &str) {
    buffer.extend_from_slice(&(text.len() as u16).to_be_bytes());
    buffer.extend_from_slice(text.as_bytes());
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
