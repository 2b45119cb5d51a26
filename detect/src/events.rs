//! What the other stages tell the detector: accepted readings and security events.
//!
//! The sender never blocks the stage that calls it: detection must not hold up a PUBACK. When
//! the detector's queue is full, the observation is skipped and counted, and the detector
//! raises an alert about itself on its next tick.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::{Receiver, Sender, TrySendError};

/// A security event's kind, as seen by the stage that refused or noticed something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A login that passed every check.
    LoginAccepted,
    /// A login refused: bad, expired, reused or unsigned token, unknown or quarantined device.
    LoginRefused,
    /// A login replaced the device's live session (possibly from another client).
    SessionReplaced,
    /// A reading whose signature does not verify, inside an authenticated session.
    BadSignature,
    /// A reading whose seq is not above the highest stored one, with other content.
    Replay,
    /// A seq jump larger than the configured bound.
    SeqJumpTooFar,
    /// A publish outside the device's own readings topic.
    TopicNotAllowed,
    /// A subscription to anything but the device's own notices topic.
    SubscribeRefused,
    /// A payload that is not a well-formed reading.
    Malformed,
    /// A payload larger than the limit.
    Oversized,
    /// A reading that carries no measurement.
    NoMeasurement,
    /// A reading that names another device than its session.
    DeviceMismatch,
    /// A reading sampled implausibly far from the server clock.
    ImplausibleTime,
    /// A publish from a device already quarantined.
    QuarantinedPublish,
    /// A publish refused because the server sheds load.
    Overloaded,
}

impl EventKind {
    /// The name used in alerts and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::LoginAccepted => "login_accepted",
            EventKind::LoginRefused => "login_refused",
            EventKind::SessionReplaced => "session_replaced",
            EventKind::BadSignature => "bad_signature",
            EventKind::Replay => "replay",
            EventKind::SeqJumpTooFar => "seq_jump_too_far",
            EventKind::TopicNotAllowed => "topic_not_allowed",
            EventKind::SubscribeRefused => "subscribe_refused",
            EventKind::Malformed => "malformed",
            EventKind::Oversized => "oversized",
            EventKind::NoMeasurement => "no_measurement",
            EventKind::DeviceMismatch => "device_mismatch",
            EventKind::ImplausibleTime => "implausible_time",
            EventKind::QuarantinedPublish => "quarantined_publish",
            EventKind::Overloaded => "overloaded",
        }
    }

    /// Every kind, for parsing names back.
    pub const ALL: [EventKind; 15] = [
        EventKind::LoginAccepted,
        EventKind::LoginRefused,
        EventKind::SessionReplaced,
        EventKind::BadSignature,
        EventKind::Replay,
        EventKind::SeqJumpTooFar,
        EventKind::TopicNotAllowed,
        EventKind::SubscribeRefused,
        EventKind::Malformed,
        EventKind::Oversized,
        EventKind::NoMeasurement,
        EventKind::DeviceMismatch,
        EventKind::ImplausibleTime,
        EventKind::QuarantinedPublish,
        EventKind::Overloaded,
    ];

    /// The kind named `name` (as [`EventKind::as_str`] writes it).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// Whether the event can only come from inside the device's authenticated session, that
    /// is, from someone holding the device's key. Only such evidence may cut a device off:
    /// anyone can fail a login under a device's id.
    pub fn is_keyed(self) -> bool {
        !matches!(self, EventKind::LoginRefused | EventKind::Overloaded)
    }
}

/// One security event.
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityEvent {
    /// The device id the event is about (claimed, for a refused login: untrusted).
    pub device_id: Arc<str>,
    pub kind: EventKind,
    /// Server clock, Unix milliseconds.
    pub at_ms: i64,
    /// Network peer of the connection.
    pub peer: Arc<str>,
}

/// One accepted (verified, durable or about to be) reading.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingObservation {
    pub device_id: Arc<str>,
    pub class: Arc<str>,
    pub seq: u64,
    /// Device clock, Unix milliseconds.
    pub sampled_at_ms: i64,
    /// Server clock, Unix milliseconds.
    pub received_at_ms: i64,
    pub measurements: Arc<[(String, f64)]>,
}

/// What flows into the detector.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    Reading(ReadingObservation),
    Security(SecurityEvent),
    /// An operator changed a device's status (quarantine or release by hand).
    StatusChanged {
        device_id: Arc<str>,
        quarantined: bool,
        reason: String,
    },
}

/// The sending half given to the gateway and the verifier; cheap to clone.
#[derive(Debug, Clone)]
pub struct ObservationSender {
    queue: Sender<Observation>,
    skipped: Arc<AtomicU64>,
}

impl ObservationSender {
    /// Queues an observation without waiting; a full queue skips it and counts the skip.
    pub fn send(&self, observation: Observation) {
        match self.queue.try_send(observation) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
            }
            // The detector has stopped (the server is shutting down): nothing left to tell.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Queues an operator's decision, waiting up to a second for room: unlike readings, these
    /// must not be skipped. Returns whether it was queued.
    pub fn send_decision(&self, observation: Observation) -> bool {
        self.queue
            .send_timeout(observation, std::time::Duration::from_secs(1))
            .is_ok()
    }

    /// Queues an observation, waiting for room as long as it takes: for a feeder that can
    /// itself wait (a Kafka consumer), so that nothing is skipped. Returns whether it was
    /// queued (`false` once the detector has stopped).
    pub fn send_blocking(&self, observation: Observation) -> bool {
        self.queue.send(observation).is_ok()
    }

    /// A security event, stamped with the current time.
    pub fn security(&self, device_id: &str, kind: EventKind, peer: &Arc<str>) {
        self.send(Observation::Security(SecurityEvent {
            device_id: Arc::from(device_id),
            kind,
            at_ms: crate::now_ms(),
            peer: peer.clone(),
        }));
    }

    /// A sender whose observations go nowhere, for stages run without a detector.
    pub fn disconnected() -> Self {
        let (queue, _) = crossbeam_channel::bounded(1);
        Self {
            queue,
            skipped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Observations waiting for the detector.
    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }
}

/// The detector's end of the queue.
#[derive(Debug)]
pub struct ObservationReceiver {
    pub(crate) queue: Receiver<Observation>,
    pub(crate) skipped: Arc<AtomicU64>,
}

impl ObservationReceiver {
    /// The next observation, waiting up to `timeout`; `None` when none came or every sender
    /// is gone. For a process that passes observations on instead of detecting (a cluster
    /// gateway).
    pub fn recv_timeout(&self, timeout: std::time::Duration) -> Option<Observation> {
        self.queue.recv_timeout(timeout).ok()
    }

    /// Observations skipped because the queue was full, since start.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

/// A bounded queue of observations with room for `capacity` of them.
pub fn observation_queue(capacity: usize) -> (ObservationSender, ObservationReceiver) {
    let (queue, receiver) = crossbeam_channel::bounded(capacity.max(1));
    let skipped = Arc::new(AtomicU64::new(0));
    (
        ObservationSender {
            queue,
            skipped: skipped.clone(),
        },
        ObservationReceiver {
            queue: receiver,
            skipped,
        },
    )
}
