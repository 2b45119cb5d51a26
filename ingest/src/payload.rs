//! The keyless checks of a reading payload (in `vigil_proto::payload`), with each defect as the
//! refusal reason of the gateway.

pub use vigil_proto::payload::{CheckedPayload, MAX_MEASUREMENTS, MAX_METRIC_LEN, PayloadDefect};

use crate::reasons::RefusalReason;

/// Decodes a payload published on `topic_device_id`'s topic and checks what needs no key.
pub fn check_payload(
    payload: &[u8],
    topic_device_id: &str,
    now_ms: i64,
    max_clock_skew_ms: i64,
) -> Result<CheckedPayload, (RefusalReason, String)> {
    vigil_proto::payload::check_payload(payload, topic_device_id, now_ms, max_clock_skew_ms)
        .map_err(|(defect, detail)| (RefusalReason::from(defect), detail))
}

impl From<PayloadDefect> for RefusalReason {
    fn from(defect: PayloadDefect) -> Self {
        match defect {
            PayloadDefect::Malformed => RefusalReason::Malformed,
            PayloadDefect::NoMeasurement => RefusalReason::NoMeasurement,
            PayloadDefect::DeviceMismatch => RefusalReason::DeviceMismatch,
            PayloadDefect::ImplausibleTime => RefusalReason::ImplausibleTime,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_defect_is_refused_with_its_reason() {
        let refused = check_payload(b"\xff\xff\xff", "d", 1_000, 10).unwrap_err();
        assert_eq!(refused.0, RefusalReason::Malformed);
        assert!(
            refused.1.starts_with("not a SignedReading"),
            "{}",
            refused.1
        );
    }
}
