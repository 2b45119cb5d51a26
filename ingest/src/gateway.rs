//! The MQTT endpoint (v3.1.1 and v5 on one port) on ntex-mqtt.
//!
//! Per connection, in order: the CONNECT is checked against the registry and the nonce cache
//! (refused with "not authorized"); the session is registered, replacing any live session of
//! the same device; each PUBLISH is checked against the topic ACL, decoded and checked without
//! a key, queued on the device's verifier shard, and acknowledged only once the write-ahead log
//! has the reading or its refusal. A full verifier queue stops this connection's handler, and
//! with it the reading of further packets: back-pressure reaches the device. A reading that
//! finds no room within `overload_wait_ms` is shed (see [`crate::overload`]), and so is every
//! later one of its connection: v5 devices get PUBACK 0x97 for each and then DISCONNECT 0x97,
//! v3.1.1 devices lose the connection without a PUBACK; either re-sends after reconnecting, in
//! order. New logins are refused as "server unavailable" for a while.
//!
//! Connections run on ntex worker threads (their sinks are not `Send`); everything shared
//! across connections lives in [`GatewayContext`].

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use ntex::service::cfg::SharedCfg;
use ntex::service::{chain_factory, fn_factory_with_config, fn_service};
use ntex::time::{Millis, Seconds};
use ntex::util::{ByteString, Bytes, Ready};
use ntex_mqtt::{Control, MqttServer, MqttServiceConfig, QoS, v3, v5};
use prost::Message;
use tokio::sync::oneshot;
use vigil_detect::{EventKind, ObservationSender};
use vigil_proto::contract::MAX_DEVICE_ID_LEN;
use vigil_proto::v1::Notice;
use vigil_proto::{notices_topic, readings_topic};
use vigil_store::Rejection;

use crate::arrival::{ArrivalHandle, ArrivalOrder, ArrivalScanner, Ticket};
use crate::login::{LoginChecker, LoginRefusal};
use crate::metrics::IngestMetrics;
use crate::overload::PendingBudget;
use crate::payload::check_payload;
use crate::reasons::RefusalReason;
use crate::recorder::RejectionRecorder;
use crate::registry::DeviceEntry;
use crate::sessions::{CloseOrder, SessionTable};
use crate::throttle::PeerThrottle;
use crate::verifier::{Verdict, VerifierPool, VerifyJob};
use crate::{now_ms, now_unix_s};

/// Limits of the MQTT endpoint.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub max_payload_bytes: usize,
    pub connect_timeout_s: u16,
    pub max_keep_alive_s: u16,
    pub max_inflight_per_device: u16,
    pub max_clock_skew_ms: i64,
}

/// What every connection shares.
#[derive(Debug)]
pub struct GatewayContext {
    pub settings: GatewaySettings,
    pub logins: LoginChecker,
    pub verifier: VerifierPool,
    pub sessions: Arc<SessionTable>,
    pub recorder: RejectionRecorder,
    pub metrics: Arc<IngestMetrics>,
    /// Security events for the detector; never blocks.
    pub observations: ObservationSender,
    pub throttle: Arc<PeerThrottle>,
    /// The bound on bytes held for readings in flight, and whether new work is refused.
    pub pending: PendingBudget,
}

/// Error that ends a connection; v3.1.1 has no other way to refuse a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayError {
    /// Published outside the device's own topic.
    TopicNotAllowed,
    /// The reading could not be made durable; the device re-sends after reconnecting.
    StorageUnavailable,
    /// The payload could not be read from the connection.
    PayloadRead,
    /// A TLS client failed its handshake.
    TlsHandshake,
    /// The server sheds load: this connection's readings are not taken; the device re-sends
    /// after reconnecting.
    Overloaded,
}

impl From<()> for GatewayError {
    fn from(_: ()) -> Self {
        GatewayError::PayloadRead
    }
}

impl TryFrom<GatewayError> for v5::PublishAck {
    type Error = GatewayError;

    fn try_from(error: GatewayError) -> Result<Self, Self::Error> {
        Err(error)
    }
}

/// The state of one authenticated connection.
#[derive(Debug, Clone)]
struct DeviceSession {
    device: Arc<DeviceEntry>,
    peer: Arc<str>,
    readings_topic: Arc<str>,
    notices_topic: Arc<str>,
    order: Rc<ArrivalOrder>,
    /// Set once a reading of this connection was shed: every later one is shed too, so that
    /// nothing published after a shed reading is stored before it is sent again.
    shed: Rc<Cell<bool>>,
    registration: Rc<Registration>,
}

/// Removes the session from the table when the connection's state is dropped, however the
/// connection ended.
#[derive(Debug)]
struct Registration {
    context: Arc<GatewayContext>,
    device_id: Arc<str>,
    generation: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.context
            .sessions
            .closed(&self.device_id, self.generation);
        self.context.metrics.connected_devices.dec();
    }
}

/// How a publish ended, before it is mapped to a PUBACK.
enum Outcome {
    Accepted,
    Refused(RefusalReason),
    Failed,
    /// Shed for overload.
    Shed,
}

/// Either version's sink, to send a notice and close a session from its own thread.
enum SessionSink {
    V3(v3::MqttSink),
    V5(v5::MqttSink),
}

impl GatewayContext {
    /// Checks a CONNECT; counts and records a refusal.
    fn admit(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
        peer: &Arc<str>,
    ) -> Result<Arc<DeviceEntry>, LoginRefusal> {
        let checked = if self.throttle.is_throttled(peer) {
            Err(LoginRefusal::Throttled)
        } else if self.pending.shedding() {
            Err(LoginRefusal::Overloaded)
        } else {
            self.logins
                .check(client_id, username, password, now_unix_s())
        };
        match checked {
            Ok(device) => {
                self.metrics.logins_accepted.inc();
                self.observations
                    .security(&device.id, EventKind::LoginAccepted, peer);
                Ok(device)
            }
            Err(refusal) => {
                self.metrics.login_refused(refusal);
                tracing::debug!(reason = refusal.as_str(), %peer, "login refused");
                // A throttled peer was counted already; telling the detector again would
                // only let a flood cost it work. A login refused for overload says nothing
                // about the device.
                // The client id is the attacker's text: kept as data, cut to a device id's
                // longest length, with the length it had when that cut something off.
                let claimed_id = truncate_chars(client_id, MAX_DEVICE_ID_LEN);
                let detail = if claimed_id.len() < client_id.len() {
                    format!("client id of {} bytes, truncated", client_id.len())
                } else {
                    String::new()
                };
                if !matches!(refusal, LoginRefusal::Throttled | LoginRefusal::Overloaded) {
                    self.observations
                        .security(&claimed_id, EventKind::LoginRefused, peer);
                }
                self.recorder.record(
                    Rejection {
                        device_id: claimed_id,
                        received_at_ms: now_ms(),
                        reason: refusal.as_str().to_owned(),
                        detail,
                        peer: peer.to_string(),
                    },
                    None,
                );
                Err(refusal)
            }
        }
    }

    /// Registers the session and starts the task that closes it on order.
    fn open_session(
        self: &Arc<Self>,
        device: Arc<DeviceEntry>,
        peer: Arc<str>,
        sink: SessionSink,
        order: Rc<ArrivalOrder>,
    ) -> DeviceSession {
        let (generation, close_order, replaced) = self.sessions.open(&device.id);
        self.metrics.connected_devices.inc();
        if replaced {
            self.metrics.sessions_replaced.inc();
            self.observations
                .security(&device.id, EventKind::SessionReplaced, &peer);
            tracing::info!(device_id = %device.id, %peer, "new login replaced a live session");
        }

        let notices: Arc<str> = Arc::from(notices_topic(&device.id));
        ntex::rt::spawn(close_on_order(close_order, sink, notices.clone()));

        DeviceSession {
            readings_topic: Arc::from(readings_topic(&device.id)),
            notices_topic: notices,
            order,
            shed: Rc::default(),
            registration: Rc::new(Registration {
                context: self.clone(),
                device_id: device.id.clone(),
                generation,
            }),
            device,
            peer,
        }
    }

    /// Refuses a publish that never reached the verifier, recording why.
    async fn refuse(
        &self,
        session: &DeviceSession,
        reason: RefusalReason,
        detail: String,
    ) -> Outcome {
        self.metrics.refused(reason);
        self.observations
            .security(&session.device.id, reason.event_kind(), &session.peer);
        let (durable, stored) = oneshot::channel();
        let rejection = Rejection {
            device_id: session.device.id.to_string(),
            received_at_ms: now_ms(),
            reason: reason.as_str().to_owned(),
            detail,
            peer: session.peer.to_string(),
        };
        if self.recorder.record(rejection, Some(durable)) {
            // The refusal is acknowledged once recorded, so that the record is visible to
            // whoever reacts to the acknowledgement; a storage failure does not change it.
            let _ = stored.await;
        }
        Outcome::Refused(reason)
    }

    /// Checks, verifies and stores one published payload.
    async fn process(
        &self,
        session: &DeviceSession,
        ticket: Ticket,
        topic: &str,
        payload: &[u8],
    ) -> Outcome {
        ticket.turn().await;
        let deadline = Instant::now() + self.pending.wait();
        if session.shed.get() {
            self.metrics.refused(RefusalReason::Overloaded);
            return Outcome::Shed;
        }
        if topic != &*session.readings_topic {
            drop(ticket);
            let detail = format!("topic {}", truncate_chars(topic, 200));
            return self
                .refuse(session, RefusalReason::TopicNotAllowed, detail)
                .await;
        }
        if payload.len() > self.settings.max_payload_bytes {
            drop(ticket);
            let detail = format!("{} bytes", payload.len());
            return self.refuse(session, RefusalReason::Oversized, detail).await;
        }

        let received_at_ms = now_ms();
        let checked = match check_payload(
            payload,
            &session.device.id,
            received_at_ms,
            self.settings.max_clock_skew_ms,
        ) {
            Ok(checked) => checked,
            Err((reason, detail)) => {
                drop(ticket);
                return self.refuse(session, reason, detail).await;
            }
        };

        // Held until the PUBACK is decided.
        let Some(_held) = self.pending.hold(payload.len(), deadline).await else {
            return self.shed(session);
        };
        let (verdict_sender, verdict) = oneshot::channel();
        let (durable_sender, durable) = oneshot::channel();
        let job = VerifyJob {
            device: session.device.clone(),
            payload: checked,
            received_at_ms,
            peer: session.peer.clone(),
            verdict: verdict_sender,
            durable: durable_sender,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let queued = ntex::time::timeout(left, self.verifier.submit(job)).await;
        drop(ticket);
        match queued {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return self.not_durable(),
            // Not queued: the job was dropped with the timed-out send.
            Err(_) => {
                self.pending.shed();
                return self.shed(session);
            }
        }

        let Ok(verdict) = verdict.await else {
            return self.not_durable();
        };
        match (verdict, durable.await) {
            (Verdict::Stored | Verdict::Resent, Ok(Ok(()))) => Outcome::Accepted,
            (Verdict::Refused(reason), _) => Outcome::Refused(reason),
            (_, _) => self.not_durable(),
        }
    }

    /// A reading the server could not make durable (the log cannot be written, say on a full
    /// disk, or the server is stopping): counted as refused for overload, and not stored.
    /// Nothing is recorded in `rejections`, which lives in the same log.
    fn not_durable(&self) -> Outcome {
        self.metrics.refused(RefusalReason::Overloaded);
        Outcome::Failed
    }

    /// A reading that found no room in time: counted as refused for overload, not stored, and
    /// every later reading of the connection is shed too, so that none is stored before this
    /// one is sent again; the session is closed shortly after, once the refusals are out.
    /// Nothing is recorded in `rejections`: the log is what cannot keep up.
    fn shed(&self, session: &DeviceSession) -> Outcome {
        self.metrics.refused(RefusalReason::Overloaded);
        if !session.shed.replace(true) {
            tracing::debug!(device_id = %session.device.id, "readings shed for overload");
            let sessions = self.sessions.clone();
            let device_id = session.device.id.clone();
            let generation = session.registration.generation;
            ntex::rt::spawn(async move {
                ntex::time::sleep(SHED_CLOSE_DELAY).await;
                sessions.close_generation(&device_id, generation, CloseOrder::Overloaded);
            });
        }
        Outcome::Shed
    }
}

/// Time between a connection's first shed reading and its close: its later readings in flight
/// are answered meanwhile (they are shed at once), and the answers leave before the close.
const SHED_CLOSE_DELAY: Millis = Millis(250);

/// Longest wait for a device to acknowledge its quarantine notice before the close.
const NOTICE_ACK_WAIT: Millis = Millis(250);

async fn close_on_order(
    order: oneshot::Receiver<CloseOrder>,
    sink: SessionSink,
    notices: Arc<str>,
) {
    // An error means the session ended on its own: nothing to close.
    let Ok(order) = order.await else {
        return;
    };

    if let CloseOrder::Quarantined { reason } = &order {
        let notice = Notice {
            kind: "quarantined".into(),
            reason: reason.clone(),
            at_ms: now_ms(),
        };
        let payload = Bytes::from(notice.encode_to_vec());
        let topic = ByteString::from(&*notices);
        // QoS 1, so that the close waits until the device has the notice (closing right
        // after a QoS 0 publish can drop it from the write buffer). A device that does not
        // acknowledge holds the close up for at most `NOTICE_ACK_WAIT`; its readings are
        // refused meanwhile. Best effort: the session is closed either way.
        let acknowledged = match &sink {
            SessionSink::V3(sink) => {
                let sent = sink.publish(topic).send_at_least_once(payload);
                matches!(ntex::time::timeout(NOTICE_ACK_WAIT, sent).await, Ok(Ok(())))
            }
            SessionSink::V5(sink) => {
                let sent = sink.publish(topic).send_at_least_once(payload);
                matches!(ntex::time::timeout(NOTICE_ACK_WAIT, sent).await, Ok(Ok(_)))
            }
        };
        tracing::debug!(acknowledged, "quarantine notice sent");
    }

    match (sink, order) {
        (SessionSink::V5(sink), CloseOrder::Overloaded) => {
            sink.close_with_reason(v5::codec::Disconnect {
                reason_code: v5::codec::DisconnectReasonCode::QuotaExceeded,
                ..v5::codec::Disconnect::default()
            });
        }
        (SessionSink::V3(sink), _) => sink.close(),
        (SessionSink::V5(sink), _) => sink.close(),
    }
}

/// The connection's arrival order, fed by its [`ArrivalScanner`]; without one (never the case
/// for a connection built by [`mqtt_service`]) an order whose tickets do not wait.
fn arrival_order(io: &ntex::io::IoBoxed) -> Rc<ArrivalOrder> {
    match io.query::<ArrivalHandle>().as_ref() {
        Some(handle) => handle.0.clone(),
        None => Rc::default(),
    }
}

fn peer_of(io: &ntex::io::IoBoxed) -> Arc<str> {
    match io.query::<ntex::io::types::PeerAddr>().get() {
        Some(peer) => Arc::from(peer.0.to_string()),
        None => Arc::from("unknown"),
    }
}

fn keep_alive(settings: &GatewaySettings, requested_s: u16) -> Seconds {
    let requested = if requested_s == 0 {
        settings.max_keep_alive_s
    } else {
        requested_s
    };
    let bounded = requested.min(settings.max_keep_alive_s);
    // MQTT allows one and a half keep-alive intervals of silence.
    Seconds(bounded.saturating_add(bounded / 2))
}

fn truncate_chars(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

async fn handshake_v3(
    context: Arc<GatewayContext>,
    handshake: v3::Handshake,
) -> Result<v3::HandshakeAck<DeviceSession>, GatewayError> {
    let peer = peer_of(handshake.io());
    let packet = handshake.packet();
    let keep = keep_alive(&context.settings, packet.keep_alive);
    let admitted = context.admit(
        &packet.client_id,
        packet.username.as_deref(),
        packet.password.as_deref(),
        &peer,
    );

    match admitted {
        Ok(device) => {
            let sink = SessionSink::V3(handshake.sink());
            let order = arrival_order(handshake.io());
            let session = context.open_session(device, peer, sink, order);
            Ok(handshake.ack(session, false).idle_timeout(keep))
        }
        Err(LoginRefusal::Overloaded) => Ok(handshake.service_unavailable()),
        Err(_) => Ok(handshake.not_authorized()),
    }
}

async fn handshake_v5(
    context: Arc<GatewayContext>,
    handshake: v5::Handshake,
) -> Result<v5::HandshakeAck<DeviceSession>, GatewayError> {
    let peer = peer_of(handshake.io());
    let packet = handshake.packet();
    let keep = keep_alive(&context.settings, packet.keep_alive);
    let admitted = context.admit(
        &packet.client_id,
        packet.username.as_deref(),
        packet.password.as_deref(),
        &peer,
    );

    match admitted {
        Ok(device) => {
            let sink = SessionSink::V5(handshake.sink());
            let order = arrival_order(handshake.io());
            let session = context.open_session(device, peer, sink, order);
            let max_packet = max_frame_bytes(&context.settings);
            let inflight = context.settings.max_inflight_per_device;
            Ok(handshake.ack(session).keep_alive(keep.0).with(|ack| {
                ack.receive_max = std::num::NonZeroU16::new(inflight).unwrap_or(ack.receive_max);
                ack.max_packet_size = Some(max_packet);
            }))
        }
        Err(LoginRefusal::Overloaded) => {
            Ok(handshake.failed(v5::codec::ConnectAckReason::ServerUnavailable))
        }
        Err(_) => Ok(handshake.failed(v5::codec::ConnectAckReason::NotAuthorized)),
    }
}

async fn publish_v3(
    context: Arc<GatewayContext>,
    session: v3::Session<DeviceSession>,
    publish: v3::Publish,
) -> Result<(), GatewayError> {
    let started = Instant::now();
    let ticket = session.order.claim(publish.id());
    let payload = publish
        .read_all()
        .await
        .map_err(|_| GatewayError::PayloadRead)?;

    let outcome = context
        .process(&session, ticket, publish.publish_topic(), &payload)
        .await;
    context
        .metrics
        .puback_latency_seconds
        .observe(started.elapsed().as_secs_f64());
    match outcome {
        Outcome::Accepted => Ok(()),
        // v3.1.1 has no negative PUBACK: a publish outside the device's own topic closes
        // the session; any other refusal is acknowledged and recorded in `rejections`.
        Outcome::Refused(RefusalReason::TopicNotAllowed) => Err(GatewayError::TopicNotAllowed),
        Outcome::Refused(_) => Ok(()),
        // Not durable: no PUBACK; the device re-sends after reconnecting.
        Outcome::Failed => Err(GatewayError::StorageUnavailable),
        // Shed: no PUBACK either (an acknowledgement would tell a v3.1.1 device that the
        // reading was delivered); the device re-sends after reconnecting.
        Outcome::Shed => Err(GatewayError::Overloaded),
    }
}

async fn publish_v5(
    context: Arc<GatewayContext>,
    session: v5::Session<DeviceSession>,
    publish: v5::Publish,
) -> Result<v5::PublishAck, GatewayError> {
    let started = Instant::now();
    let ticket = session.order.claim(publish.id());
    let payload = publish
        .read_all()
        .await
        .map_err(|_| GatewayError::PayloadRead)?;
    let topic = publish.publish_topic().to_owned();

    let outcome = context.process(&session, ticket, &topic, &payload).await;
    context
        .metrics
        .puback_latency_seconds
        .observe(started.elapsed().as_secs_f64());
    let code = match outcome {
        Outcome::Accepted => return Ok(publish.ack()),
        Outcome::Refused(reason) => reason.v5_code(),
        Outcome::Failed | Outcome::Shed => RefusalReason::Overloaded.v5_code(),
    };
    let reason = v5::codec::PublishAckReason::try_from(code)
        .unwrap_or(v5::codec::PublishAckReason::UnspecifiedError);
    Ok(publish.ack().reason_code(reason))
}

fn subscribe_allowed(session: &DeviceSession, topic: &str) -> bool {
    topic == &*session.notices_topic
}

/// Builds the ntex-mqtt service for both protocol versions.
pub(crate) fn mqtt_service<F: ntex::io::Filter>(
    context: Arc<GatewayContext>,
) -> impl ntex::service::ServiceFactory<
    ntex::io::Io<F>,
    SharedCfg,
    Response = (),
    Error = ntex_mqtt::MqttError<GatewayError>,
    InitError = (),
> + 'static {
    let v3_server = {
        let handshake_context = context.clone();
        let publish_context = context.clone();
        let protocol_context = context.clone();
        v3::MqttServer::new(move |handshake| handshake_v3(handshake_context.clone(), handshake))
            .protocol(fn_factory_with_config(
                move |session: v3::Session<DeviceSession>| {
                    let context = protocol_context.clone();
                    Ready::Ok::<_, GatewayError>(fn_service(move |message| {
                        Ready::Ok::<_, GatewayError>(protocol_v3(&context, &session, message))
                    }))
                },
            ))
            .control(fn_service(|_control: Control<GatewayError>| {
                Ready::Ok::<_, GatewayError>(None)
            }))
            .publish(fn_factory_with_config(
                move |session: v3::Session<DeviceSession>| {
                    let context = publish_context.clone();
                    Ready::Ok::<_, GatewayError>(fn_service(move |publish| {
                        publish_v3(context.clone(), session.clone(), publish)
                    }))
                },
            ))
    };

    let v5_server = {
        let handshake_context = context.clone();
        let publish_context = context.clone();
        let protocol_context = context;
        v5::MqttServer::new(move |handshake| handshake_v5(handshake_context.clone(), handshake))
            .protocol(fn_factory_with_config(
                move |session: v5::Session<DeviceSession>| {
                    let context = protocol_context.clone();
                    Ready::Ok::<_, GatewayError>(fn_service(move |message| {
                        Ready::Ok::<_, GatewayError>(protocol_v5(&context, &session, message))
                    }))
                },
            ))
            .control(fn_service(|_control: Control<GatewayError>| {
                Ready::Ok::<_, GatewayError>(None)
            }))
            .publish(fn_factory_with_config(
                move |session: v5::Session<DeviceSession>| {
                    let context = publish_context.clone();
                    Ready::Ok::<_, GatewayError>(fn_service(move |publish| {
                        publish_v5(context.clone(), session.clone(), publish)
                    }))
                },
            ))
    };

    // The arrival scanner sits below the MQTT codec (and above TLS) to number publishes.
    chain_factory(fn_service(async |io: ntex::io::Io<F>| {
        Ok::<_, ntex_mqtt::MqttError<GatewayError>>(io.add_filter(ArrivalScanner::default()))
    }))
    .and_then(MqttServer::new().v3(v3_server).v5(v5_server))
}

/// Notices go out with QoS 1 (see [`close_on_order`]); a subscription gets at most that.
fn granted_qos(requested: QoS) -> QoS {
    match requested {
        QoS::AtMostOnce => QoS::AtMostOnce,
        QoS::AtLeastOnce | QoS::ExactlyOnce => QoS::AtLeastOnce,
    }
}

fn protocol_v3(
    context: &GatewayContext,
    session: &DeviceSession,
    message: v3::ProtocolMessage,
) -> v3::ProtocolMessageAck {
    match message {
        v3::ProtocolMessage::Subscribe(mut subscribe) => {
            for mut subscription in subscribe.iter_mut() {
                if subscribe_allowed(session, subscription.topic()) {
                    subscription.confirm(granted_qos(subscription.qos()));
                } else {
                    context.metrics.subscriptions_refused.inc();
                    context.observations.security(
                        &session.device.id,
                        EventKind::SubscribeRefused,
                        &session.peer,
                    );
                    subscription.fail();
                }
            }
            subscribe.ack()
        }
        v3::ProtocolMessage::Unsubscribe(unsubscribe) => unsubscribe.ack(),
        other => other.ack(),
    }
}

fn protocol_v5(
    context: &GatewayContext,
    session: &DeviceSession,
    message: v5::ProtocolMessage,
) -> v5::ProtocolMessageAck {
    match message {
        v5::ProtocolMessage::Subscribe(mut subscribe) => {
            for mut subscription in subscribe.iter_mut() {
                if subscribe_allowed(session, subscription.topic()) {
                    subscription.confirm(granted_qos(subscription.options().qos));
                } else {
                    context.metrics.subscriptions_refused.inc();
                    context.observations.security(
                        &session.device.id,
                        EventKind::SubscribeRefused,
                        &session.peer,
                    );
                    subscription.fail(v5::codec::SubscribeAckReason::NotAuthorized);
                }
            }
            subscribe.ack()
        }
        v5::ProtocolMessage::Unsubscribe(unsubscribe) => unsubscribe.ack(),
        v5::ProtocolMessage::Auth(auth) => auth.ack(v5::codec::Auth::default()),
        other => other.ack(),
    }
}

fn max_frame_bytes(settings: &GatewaySettings) -> u32 {
    (settings.max_payload_bytes as u32)
        .saturating_mul(4)
        .saturating_add(4096)
}

/// The shared MQTT configuration: frame size, connect timeout, in-flight window.
pub(crate) fn mqtt_config(settings: &GatewaySettings) -> ntex::service::cfg::SharedCfgBuilder {
    // The frame limit leaves room above the payload limit, so that an oversized payload is
    // read, refused with its reason and recorded; larger frames end the connection.
    let max_frame = max_frame_bytes(settings);
    SharedCfg::new("MQTT").add(
        MqttServiceConfig::new()
            .set_max_qos(QoS::AtLeastOnce)
            .set_max_size(max_frame)
            .set_max_receive(settings.max_inflight_per_device)
            .set_connect_timeout(Seconds(settings.connect_timeout_s))
            .set_handshake_timeout(Seconds(settings.connect_timeout_s))
            .protocol_version_timeout(Seconds(settings.connect_timeout_s)),
    )
}
