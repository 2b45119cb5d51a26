//! One device's MQTT session: login, open-loop publishing, PUBACK tracking, reconnects.
//!
//! Each device task runs two futures side by side on one rumqttc `EventLoop`, sharing a
//! [`Tracker`] behind an uncontended mutex (never held across an await):
//!
//! - the **driver** polls the event loop, and is never cancelled mid-poll while the session is
//!   live; it logs in with a fresh token before every connection attempt, pairs
//!   `Outgoing::Publish(pkid)` with the next submitted seq and `PubAck(pkid)` with that seq,
//!   and handles connection errors;
//! - the **feeder** hands readings to the client when they are due (re-sends first), as long as
//!   the device is connected and has fewer than `max_inflight` readings outstanding.
//!
//! Invariants:
//!
//! - Every seq not yet acknowledged is in exactly one place: not yet due, in `resend`, in
//!   `submitted` (given to rumqttc, not yet written), or in `in_flight` (written, keyed by pkid).
//! - Readings go out in seq order on each connection: re-sends (sorted) before any new reading.
//!   This matters because the server refuses a seq below its highest stored seq unless it is an
//!   exact re-send of a stored reading.
//! - Sessions are clean (`clean_session = true`) and this module re-sends on its own: rumqttc
//!   0.25 drops its pending list when the server reports no stored session, and a server is
//!   free not to keep one. On every connection error the driver first handles the events the
//!   dead connection left buffered (a PUBACK that arrived before the error still counts), then
//!   moves everything submitted or in flight back to `resend`, clears rumqttc's pending list
//!   and starts the next connection with a fresh `MqttState`.
//! - `outstanding() <= max_inflight`, and the request channel holds more than that, so handing
//!   a reading to the client never blocks.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use ed25519_dalek::SigningKey;
use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, MqttState,
    NetworkOptions, Outgoing, Packet, QoS,
};
use tokio::sync::Notify;
use tokio::time::sleep_until;

use crate::corpus::{DeviceSchedule, PresignedReadings};
use crate::fleet::DRAIN_TIMEOUT;
use crate::report::FleetStats;

const KEEP_ALIVE: Duration = Duration::from_secs(30);
const MAX_PACKET_BYTES: usize = 16 * 1024;
/// How long a finished device waits for its DISCONNECT to be written.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MIN_MS: u64 = 100;
const BACKOFF_MAX_MS: u64 = 500;
/// Cap of the backoff after repeated failed connection attempts.
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Connection settings shared by every device of a run.
#[derive(Debug)]
pub(crate) struct SessionSettings {
    pub(crate) mqtt_host: String,
    pub(crate) mqtt_port: u16,
    pub(crate) token_lifetime_s: u64,
    pub(crate) max_inflight: u16,
}

/// What one device task needs.
#[derive(Debug)]
pub(crate) struct DeviceRun {
    pub(crate) device_id: String,
    pub(crate) signing_key: SigningKey,
    pub(crate) readings: PresignedReadings,
    pub(crate) schedule: DeviceSchedule,
    pub(crate) run_start: Instant,
}

impl DeviceRun {
    fn due(&self, seq: u64) -> Instant {
        self.run_start + self.schedule.offset_of(seq)
    }
}

/// What one device achieved.
#[derive(Debug)]
pub(crate) struct DeviceOutcome {
    pub(crate) device_id: String,
    pub(crate) highest_acked_seq: u64,
    /// Every acknowledged seq, in the order the PUBACKs came.
    pub(crate) acked_seqs: Vec<u64>,
}

/// Drives one device from its connect slot until every reading is acknowledged or the drain
/// deadline passes.
pub(crate) async fn run_device(
    run: DeviceRun,
    settings: Arc<SessionSettings>,
    stats: Arc<FleetStats>,
) -> DeviceOutcome {
    sleep_until((run.run_start + run.schedule.connect_offset).into()).await;

    let mut options = MqttOptions::new(&run.device_id, &settings.mqtt_host, settings.mqtt_port);
    options
        .set_keep_alive(KEEP_ALIVE)
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
        .set_inflight(settings.max_inflight);
    let channel_capacity = usize::from(settings.max_inflight) + 4;
    let (client, mut eventloop) = AsyncClient::new(options, channel_capacity);
    let mut network = NetworkOptions::new();
    // PUBACK latency is the measurement: no Nagle delay on small publishes.
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);

    let session = Session {
        run: &run,
        settings: &settings,
        stats: &stats,
        topic: vigil_proto::readings_topic(&run.device_id),
        tracker: Mutex::new(Tracker::new(run.readings.len(), settings.max_inflight)),
        wake: Notify::new(),
        deadline: run.run_start + run.schedule.last_offset() + DRAIN_TIMEOUT,
    };
    tokio::select! {
        () = session.drive(&mut eventloop) => {}
        () = session.feed(&client) => {}
    }
    session.disconnect(&client, &mut eventloop).await;

    let mut tracker = session.tracker();
    DeviceOutcome {
        device_id: run.device_id.clone(),
        highest_acked_seq: tracker.highest_acked,
        acked_seqs: std::mem::take(&mut tracker.acked_seqs),
    }
}

struct Session<'a> {
    run: &'a DeviceRun,
    settings: &'a SessionSettings,
    stats: &'a FleetStats,
    topic: String,
    tracker: Mutex<Tracker>,
    /// Wakes the feeder: connected, a reading acknowledged, or re-sends queued.
    wake: Notify,
    deadline: Instant,
}

impl Session<'_> {
    fn tracker(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Polls the event loop until every reading is acknowledged or the deadline passes.
    async fn drive(&self, eventloop: &mut EventLoop) {
        let mut failed_attempts: u32 = 0;
        loop {
            if self.tracker().all_acked() {
                return;
            }
            if eventloop.network.is_none() {
                self.prepare_connection(eventloop);
            }

            let polled = tokio::select! {
                polled = eventloop.poll() => polled,
                () = sleep_until(self.deadline.into()) => return,
            };
            match polled {
                Ok(event) => {
                    if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                        failed_attempts = 0;
                    }
                    self.handle_event(event);
                }
                Err(error) => {
                    let was_connected = self.connection_lost(eventloop);
                    if was_connected {
                        self.stats.count_reconnect();
                        tracing::debug!(device_id = %self.run.device_id, %error, "connection lost");
                    } else {
                        failed_attempts = failed_attempts.saturating_add(1);
                        self.stats.count_connect_failure(is_login_refusal(&error));
                        tracing::debug!(device_id = %self.run.device_id, %error, "connect failed");
                    }

                    let backoff = backoff(failed_attempts);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = sleep_until(self.deadline.into()) => return,
                    }
                }
            }
        }
    }

    /// A fresh login token (nonces are single-use) and clean client state for the next attempt.
    fn prepare_connection(&self, eventloop: &mut EventLoop) {
        let now_unix_s = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let token = vigil_proto::fresh_login_token(
            &self.run.signing_key,
            &self.run.device_id,
            now_unix_s,
            self.settings.token_lifetime_s,
        );
        eventloop
            .mqtt_options
            .set_credentials(self.run.device_id.as_str(), token);
        eventloop.state = MqttState::new(self.settings.max_inflight, false);
        eventloop.pending.clear();
    }

    /// Settles the tracker after a connection error; returns whether the device was connected.
    fn connection_lost(&self, eventloop: &mut EventLoop) -> bool {
        // Events buffered before the error happened on the old connection and still count.
        while let Some(event) = eventloop.state.events.pop_front() {
            self.handle_event(event);
        }
        // This module re-sends by itself, in seq order.
        eventloop.pending.clear();

        let mut tracker = self.tracker();
        let was_connected = tracker.connected;
        tracker.connected = false;
        tracker.requeue_unacknowledged();
        if was_connected {
            self.stats.device_disconnected();
        }
        was_connected
    }

    fn handle_event(&self, event: Event) {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                self.tracker().connected = true;
                self.stats.device_connected();
                self.wake.notify_one();
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let sent = self.tracker().on_sent(pkid, Instant::now());
                match sent {
                    Some(Sent::First) => self.stats.count_published(),
                    Some(Sent::Again) => self.stats.count_resent(),
                    None => {}
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let now = Instant::now();
                let acked = self.tracker().on_ack(ack.pkid);
                if let Some(InFlight { seq, sent_at }) = acked {
                    let from_send = now.saturating_duration_since(sent_at);
                    let from_schedule = now.saturating_duration_since(self.run.due(seq));
                    self.stats.record_ack(from_send, from_schedule);
                    self.wake.notify_one();
                }
            }
            _ => {}
        }
    }

    /// Hands readings to the client as they fall due; never returns while the client is alive.
    async fn feed(&self, client: &AsyncClient) {
        loop {
            let next = {
                let mut tracker = self.tracker();
                tracker.next(Instant::now(), |seq| self.run.due(seq))
            };
            match next {
                Next::Publish(seq) => {
                    let Some(payload) = self.run.readings.payload(seq) else {
                        // Cannot happen: seqs come from the corpus length.
                        continue;
                    };
                    let sent = client
                        .publish_bytes(self.topic.as_str(), QoS::AtLeastOnce, false, payload)
                        .await;
                    if sent.is_err() {
                        // The event loop is gone; the driver has finished.
                        return;
                    }
                }
                Next::WaitUntil(due) => {
                    tokio::select! {
                        () = sleep_until(due.into()) => {}
                        () = self.wake.notified() => {}
                    }
                }
                Next::Wait => self.wake.notified().await,
            }
        }
    }

    /// Sends DISCONNECT if still connected, waiting briefly for it to be written.
    async fn disconnect(&self, client: &AsyncClient, eventloop: &mut EventLoop) {
        let connected = {
            let mut tracker = self.tracker();
            std::mem::replace(&mut tracker.connected, false)
        };
        if !connected {
            return;
        }
        self.stats.device_disconnected();
        if client.try_disconnect().is_err() {
            return;
        }

        let written = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {}
                    Ok(event) => self.handle_event(event),
                }
            }
        })
        .await;
        if written.is_err() {
            // A full inflight window keeps rumqttc from taking the DISCONNECT; dropping the
            // event loop closes the socket instead.
            tracing::debug!(device_id = %self.run.device_id, "disconnect not written in time");
        }
    }
}

fn is_login_refusal(error: &ConnectionError) -> bool {
    matches!(
        error,
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword
        )
    )
}

/// 100 to 500 ms with jitter, doubling with each further failed attempt up to a cap.
fn backoff(failed_attempts: u32) -> Duration {
    let jitter_ms = rand::thread_rng().gen_range(BACKOFF_MIN_MS..=BACKOFF_MAX_MS);
    let factor = 1u64 << failed_attempts.saturating_sub(1).min(5);
    Duration::from_millis(jitter_ms.saturating_mul(factor)).min(BACKOFF_CAP)
}

/// A reading written to the connection and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    seq: u64,
    sent_at: Instant,
}

#[derive(Debug, PartialEq, Eq)]
enum Next {
    Publish(u64),
    WaitUntil(Instant),
    Wait,
}

#[derive(Debug, PartialEq, Eq)]
enum Sent {
    First,
    Again,
}

/// Where each of one device's readings stands.
#[derive(Debug)]
struct Tracker {
    count: u64,
    max_inflight: usize,
    connected: bool,
    /// The lowest seq never handed to the client.
    next_new: u64,
    /// Seqs to send again after a reconnect, ascending.
    resend: VecDeque<u64>,
    /// Seqs handed to the client whose `Outgoing::Publish` has not been seen yet, in order.
    submitted: VecDeque<u64>,
    /// Written readings by packet id (rumqttc uses ids 1 to `max_inflight`).
    in_flight: Vec<Option<InFlight>>,
    in_flight_len: usize,
    highest_published: u64,
    highest_acked: u64,
    acked: u64,
    acked_seqs: Vec<u64>,
}

impl Tracker {
    fn new(count: u64, max_inflight: u16) -> Self {
        Self {
            count,
            max_inflight: usize::from(max_inflight),
            connected: false,
            next_new: 1,
            resend: VecDeque::new(),
            submitted: VecDeque::new(),
            in_flight: vec![None; usize::from(max_inflight) + 1],
            in_flight_len: 0,
            highest_published: 0,
            highest_acked: 0,
            acked: 0,
            acked_seqs: Vec::new(),
        }
    }

    fn all_acked(&self) -> bool {
        self.acked >= self.count
    }

    fn outstanding(&self) -> usize {
        self.submitted.len() + self.in_flight_len
    }

    /// The next reading to hand to the client, or how long to wait for one.
    fn next(&mut self, now: Instant, due: impl Fn(u64) -> Instant) -> Next {
        if !self.connected || self.outstanding() >= self.max_inflight {
            return Next::Wait;
        }
        if let Some(seq) = self.resend.pop_front() {
            self.submitted.push_back(seq);
            return Next::Publish(seq);
        }
        if self.next_new > self.count {
            return Next::Wait;
        }

        let due_at = due(self.next_new);
        if due_at > now {
            return Next::WaitUntil(due_at);
        }
        let seq = self.next_new;
        self.next_new += 1;
        self.submitted.push_back(seq);
        Next::Publish(seq)
    }

    /// rumqttc wrote the oldest submitted reading under `pkid`.
    fn on_sent(&mut self, pkid: u16, now: Instant) -> Option<Sent> {
        let seq = self.submitted.pop_front()?;
        let slot = self.in_flight.get_mut(usize::from(pkid))?;
        if slot.replace(InFlight { seq, sent_at: now }).is_none() {
            self.in_flight_len += 1;
        }

        if seq > self.highest_published {
            self.highest_published = seq;
            Some(Sent::First)
        } else {
            Some(Sent::Again)
        }
    }

    fn on_ack(&mut self, pkid: u16) -> Option<InFlight> {
        let acked = self.in_flight.get_mut(usize::from(pkid))?.take()?;
        self.in_flight_len -= 1;
        self.acked += 1;
        self.highest_acked = self.highest_acked.max(acked.seq);
        self.acked_seqs.push(acked.seq);
        Some(acked)
    }

    /// Moves every submitted or written but unacknowledged reading to the re-send queue.
    fn requeue_unacknowledged(&mut self) {
        let mut pending: Vec<u64> = self.resend.drain(..).collect();
        pending.extend(self.submitted.drain(..));
        for slot in &mut self.in_flight {
            if let Some(in_flight) = slot.take() {
                pending.push(in_flight.seq);
            }
        }
        self.in_flight_len = 0;
        pending.sort_unstable();
        pending.dedup();
        self.resend = pending.into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due_every_10ms(start: Instant) -> impl Fn(u64) -> Instant {
        move |seq| start + Duration::from_millis(10 * seq)
    }

    #[test]
    fn readings_wait_for_a_connection_their_time_and_a_free_slot() {
        let start = Instant::now();
        let due = due_every_10ms(start);
        let mut tracker = Tracker::new(5, 2);
        assert_eq!(tracker.next(start, &due), Next::Wait);

        tracker.connected = true;
        assert_eq!(tracker.next(start, &due), Next::WaitUntil(due(1)));
        let later = start + Duration::from_millis(100);
        assert_eq!(tracker.next(later, &due), Next::Publish(1));
        assert_eq!(tracker.next(later, &due), Next::Publish(2));
        assert_eq!(tracker.next(later, &due), Next::Wait);

        assert_eq!(tracker.on_sent(1, later), Some(Sent::First));
        assert_eq!(tracker.on_sent(2, later), Some(Sent::First));
        assert_eq!(tracker.on_ack(1).map(|f| f.seq), Some(1));
        assert!(tracker.on_ack(1).is_none());
        assert_eq!(tracker.next(later, &due), Next::Publish(3));
    }

    #[test]
    fn a_lost_connection_requeues_in_seq_order_before_new_readings() {
        let start = Instant::now();
        let due = due_every_10ms(start);
        let later = start + Duration::from_secs(1);
        let mut tracker = Tracker::new(10, 4);
        tracker.connected = true;
        for seq in 1..=4 {
            assert_eq!(tracker.next(later, &due), Next::Publish(seq));
        }
        // 1 and 2 written, 3 and 4 still in the client's queue; 2 acknowledged.
        tracker.on_sent(1, later);
        tracker.on_sent(2, later);
        tracker.on_ack(2);

        tracker.connected = false;
        tracker.requeue_unacknowledged();
        assert_eq!(tracker.outstanding(), 0);
        assert_eq!(tracker.next(later, &due), Next::Wait);

        tracker.connected = true;
        let order: Vec<Next> = (0..4).map(|_| tracker.next(later, &due)).collect();
        assert_eq!(
            order,
            vec![
                Next::Publish(1),
                Next::Publish(3),
                Next::Publish(4),
                Next::Publish(5)
            ]
        );
        assert_eq!(tracker.on_sent(1, later), Some(Sent::Again));
        // 3 and 4 never reached the connection before: their first publish is now.
        assert_eq!(tracker.on_sent(2, later), Some(Sent::First));
        assert_eq!(tracker.on_sent(3, later), Some(Sent::First));
        assert_eq!(tracker.on_sent(4, later), Some(Sent::First));
        assert_eq!(tracker.acked, 1);
        assert_eq!(tracker.highest_acked, 2);
    }

    #[test]
    fn backoff_stays_within_bounds() {
        for attempts in 0..10 {
            let wait = backoff(attempts);
            assert!(wait >= Duration::from_millis(BACKOFF_MIN_MS) && wait <= BACKOFF_CAP);
        }
        assert!(backoff(1) <= Duration::from_millis(BACKOFF_MAX_MS));
    }
}
