//! Why a published message was refused, with its metric label and MQTT v5 reason code.

use vigil_detect::EventKind;

/// A refusal of one published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// Not a `SignedReading`/`Reading`, bad signature length, bad metric name or value.
    Malformed,
    /// Larger than the configured maximum payload.
    Oversized,
    NoMeasurement,
    /// The reading names another device than its topic.
    DeviceMismatch,
    /// Published outside the device's own readings topic.
    TopicNotAllowed,
    /// Sampled too far from the server's clock.
    ImplausibleTime,
    BadSignature,
    Replay,
    SeqJumpTooFar,
    Quarantined,
    /// The server sheds load or storage failed; the device should retry later.
    Overloaded,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 11] = [
        RefusalReason::Malformed,
        RefusalReason::Oversized,
        RefusalReason::NoMeasurement,
        RefusalReason::DeviceMismatch,
        RefusalReason::TopicNotAllowed,
        RefusalReason::ImplausibleTime,
        RefusalReason::BadSignature,
        RefusalReason::Replay,
        RefusalReason::SeqJumpTooFar,
        RefusalReason::Quarantined,
        RefusalReason::Overloaded,
    ];

    /// The `reason` label in metrics and in the `rejections` table.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Malformed => "malformed",
            RefusalReason::Oversized => "oversized",
            RefusalReason::NoMeasurement => "no_measurement",
            RefusalReason::DeviceMismatch => "device_mismatch",
            RefusalReason::TopicNotAllowed => "topic_not_allowed",
            RefusalReason::ImplausibleTime => "implausible_time",
            RefusalReason::BadSignature => "bad_signature",
            RefusalReason::Replay => "replay",
            RefusalReason::SeqJumpTooFar => "seq_jump_too_far",
            RefusalReason::Quarantined => "quarantined",
            RefusalReason::Overloaded => "overloaded",
        }
    }

    /// The MQTT v5 PUBACK reason code of the contract.
    pub fn v5_code(self) -> u8 {
        match self {
            RefusalReason::BadSignature
            | RefusalReason::Replay
            | RefusalReason::Quarantined
            | RefusalReason::DeviceMismatch
            | RefusalReason::TopicNotAllowed
            | RefusalReason::SeqJumpTooFar => 0x87,
            RefusalReason::Malformed
            | RefusalReason::Oversized
            | RefusalReason::NoMeasurement
            | RefusalReason::ImplausibleTime => 0x99,
            RefusalReason::Overloaded => 0x97,
        }
    }

    /// The security event the detector is told of.
    pub fn event_kind(self) -> EventKind {
        match self {
            RefusalReason::Malformed => EventKind::Malformed,
            RefusalReason::Oversized => EventKind::Oversized,
            RefusalReason::NoMeasurement => EventKind::NoMeasurement,
            RefusalReason::DeviceMismatch => EventKind::DeviceMismatch,
            RefusalReason::TopicNotAllowed => EventKind::TopicNotAllowed,
            RefusalReason::ImplausibleTime => EventKind::ImplausibleTime,
            RefusalReason::BadSignature => EventKind::BadSignature,
            RefusalReason::Replay => EventKind::Replay,
            RefusalReason::SeqJumpTooFar => EventKind::SeqJumpTooFar,
            RefusalReason::Quarantined => EventKind::QuarantinedPublish,
            RefusalReason::Overloaded => EventKind::Overloaded,
        }
    }
}
