//! Decoding and plausibility checks of a `SignedReading` payload, before any cryptography.

use prost::Message;
use vigil_proto::v1::{Reading, SignedReading};

use crate::reasons::RefusalReason;

/// Most measurements one reading may carry.
pub const MAX_MEASUREMENTS: usize = 64;
/// Longest metric name.
pub const MAX_METRIC_LEN: usize = 64;

/// A payload that decoded and passed the checks that need no key.
#[derive(Debug, Clone)]
pub struct CheckedPayload {
    /// The encoded `Reading`, exactly as signed.
    pub reading_bytes: Vec<u8>,
    pub signature: [u8; 64],
    pub seq: u64,
    pub sampled_at_ms: i64,
    pub measurements: Vec<(String, f64)>,
}

impl CheckedPayload {
    /// Identifies the exact signed bytes; an exact re-send carries the same digest.
    pub fn signature_digest(&self) -> [u8; 16] {
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&self.signature[..16]);
        digest
    }
}

/// Decodes a payload published on `topic_device_id`'s topic and checks what needs no key.
pub fn check_payload(
    payload: &[u8],
    topic_device_id: &str,
    now_ms: i64,
    max_clock_skew_ms: i64,
) -> Result<CheckedPayload, (RefusalReason, String)> {
    let signed = SignedReading::decode(payload).map_err(|error| {
        (
            RefusalReason::Malformed,
            format!("not a SignedReading: {error}"),
        )
    })?;
    let signature: [u8; 64] = signed.signature.as_slice().try_into().map_err(|_| {
        (
            RefusalReason::Malformed,
            format!("signature is {} bytes, not 64", signed.signature.len()),
        )
    })?;
    let reading = Reading::decode(signed.reading.as_slice())
        .map_err(|error| (RefusalReason::Malformed, format!("not a Reading: {error}")))?;

    if reading.device_id != topic_device_id {
        return Err((
            RefusalReason::DeviceMismatch,
            "reading names another device".to_owned(),
        ));
    }
    if reading.seq == 0 {
        return Err((RefusalReason::Malformed, "seq starts at 1".to_owned()));
    }
    if reading.measurements.is_empty() {
        return Err((
            RefusalReason::NoMeasurement,
            "reading carries no measurement".to_owned(),
        ));
    }
    if reading.measurements.len() > MAX_MEASUREMENTS {
        return Err((
            RefusalReason::Malformed,
            format!("more than {MAX_MEASUREMENTS} measurements"),
        ));
    }
    for measurement in &reading.measurements {
        if !is_valid_metric(&measurement.metric) {
            return Err((
                RefusalReason::Malformed,
                "metric name is not lowercase a-z 0-9 _".to_owned(),
            ));
        }
        if !measurement.value.is_finite() {
            return Err((
                RefusalReason::Malformed,
                "value is not a finite number".to_owned(),
            ));
        }
    }
    let skew = reading
        .sampled_at_ms
        .saturating_sub(now_ms)
        .saturating_abs();
    if skew > max_clock_skew_ms {
        return Err((
            RefusalReason::ImplausibleTime,
            format!("sampled_at is {skew} ms away from the server clock"),
        ));
    }

    Ok(CheckedPayload {
        reading_bytes: signed.reading,
        signature,
        seq: reading.seq,
        sampled_at_ms: reading.sampled_at_ms,
        measurements: reading
            .measurements
            .into_iter()
            .map(|m| (m.metric, m.value))
            .collect(),
    })
}

fn is_valid_metric(metric: &str) -> bool {
    !metric.is_empty()
        && metric.len() <= MAX_METRIC_LEN
        && metric
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use vigil_proto::sign_reading;
    use vigil_proto::v1::Measurement;

    fn payload(reading: &Reading) -> Vec<u8> {
        sign_reading(&SigningKey::from_bytes(&[1; 32]), reading).encode_to_vec()
    }

    fn reading(metric: &str, value: f64) -> Reading {
        Reading {
            device_id: "d".into(),
            seq: 1,
            sampled_at_ms: 1_000,
            measurements: vec![Measurement {
                metric: metric.into(),
                value,
            }],
        }
    }

    fn reason(result: Result<CheckedPayload, (RefusalReason, String)>) -> RefusalReason {
        result.unwrap_err().0
    }

    #[test]
    fn a_good_payload_passes() {
        let checked = check_payload(&payload(&reading("spo2_pct", 97.0)), "d", 1_000, 10).unwrap();
        assert_eq!(checked.seq, 1);
        assert_eq!(checked.measurements, vec![("spo2_pct".to_owned(), 97.0)]);
    }

    #[test]
    fn each_defect_is_named() {
        let check = |bytes: &[u8], topic: &str| check_payload(bytes, topic, 1_000, 10);
        assert_eq!(
            reason(check(b"\xff\xff\xff", "d")),
            RefusalReason::Malformed
        );
        assert_eq!(
            reason(check(&payload(&reading("x", 1.0)), "e")),
            RefusalReason::DeviceMismatch
        );
        assert_eq!(
            reason(check(&payload(&reading("X", 1.0)), "d")),
            RefusalReason::Malformed
        );
        assert_eq!(
            reason(check(&payload(&reading("x", f64::NAN)), "d")),
            RefusalReason::Malformed
        );

        let mut empty = reading("x", 1.0);
        empty.measurements.clear();
        assert_eq!(
            reason(check(&payload(&empty), "d")),
            RefusalReason::NoMeasurement
        );

        let mut late = reading("x", 1.0);
        late.sampled_at_ms = 1_000_000;
        assert_eq!(
            reason(check(&payload(&late), "d")),
            RefusalReason::ImplausibleTime
        );

        let short_signature = SignedReading {
            reading: vec![],
            signature: vec![1; 10],
        };
        assert_eq!(
            reason(check(&short_signature.encode_to_vec(), "d")),
            RefusalReason::Malformed
        );
    }
}
