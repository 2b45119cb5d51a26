//! Decoding and the keyless checks of a `SignedReading` payload, before any cryptography: the
//! protobuf layers, the signature's length, the device named in the reading, the measurements
//! (at least one, at most [`MAX_MEASUREMENTS`], metric names lowercase, values finite) and the
//! sampling time against the server's clock.
//!
//! The payload comes from the network as it is: every defect is a [`PayloadDefect`] with a
//! detail that quotes none of the payload's text, and no input makes this code panic (the
//! `reading_payload` fuzz target checks both).

use prost::Message;

use crate::v1::{Reading, SignedReading};

/// What is wrong with a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayloadDefect {
    /// Not a `SignedReading`/`Reading`, bad signature length, seq 0, too many measurements,
    /// bad metric name or value.
    Malformed,
    /// The reading carries no measurement.
    NoMeasurement,
    /// The reading names another device than its topic.
    DeviceMismatch,
    /// Sampled too far from the server's clock.
    ImplausibleTime,
}

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
) -> Result<CheckedPayload, (PayloadDefect, String)> {
    let signed = SignedReading::decode(payload).map_err(|error| {
        (
            PayloadDefect::Malformed,
            format!("not a SignedReading: {error}"),
        )
    })?;
    let signature: [u8; 64] = signed.signature.as_slice().try_into().map_err(|_| {
        (
            PayloadDefect::Malformed,
            format!("signature is {} bytes, not 64", signed.signature.len()),
        )
    })?;
    let reading = Reading::decode(signed.reading.as_slice())
        .map_err(|error| (PayloadDefect::Malformed, format!("not a Reading: {error}")))?;

    if reading.device_id != topic_device_id {
        return Err((
            PayloadDefect::DeviceMismatch,
            "reading names another device".to_owned(),
        ));
    }
    if reading.seq == 0 {
        return Err((PayloadDefect::Malformed, "seq starts at 1".to_owned()));
    }
    if reading.measurements.is_empty() {
        return Err((
            PayloadDefect::NoMeasurement,
            "reading carries no measurement".to_owned(),
        ));
    }
    if reading.measurements.len() > MAX_MEASUREMENTS {
        return Err((
            PayloadDefect::Malformed,
            format!("more than {MAX_MEASUREMENTS} measurements"),
        ));
    }
    for measurement in &reading.measurements {
        if !is_valid_metric(&measurement.metric) {
            return Err((
                PayloadDefect::Malformed,
                "metric name is not lowercase a-z 0-9 _".to_owned(),
            ));
        }
        if !measurement.value.is_finite() {
            return Err((
                PayloadDefect::Malformed,
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
            PayloadDefect::ImplausibleTime,
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

    use crate::sign_reading;
    use crate::v1::Measurement;

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

    fn reason(result: Result<CheckedPayload, (PayloadDefect, String)>) -> PayloadDefect {
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
            PayloadDefect::Malformed
        );
        assert_eq!(
            reason(check(&payload(&reading("x", 1.0)), "e")),
            PayloadDefect::DeviceMismatch
        );
        assert_eq!(
            reason(check(&payload(&reading("X", 1.0)), "d")),
            PayloadDefect::Malformed
        );
        assert_eq!(
            reason(check(&payload(&reading("x", f64::NAN)), "d")),
            PayloadDefect::Malformed
        );

        let mut empty = reading("x", 1.0);
        empty.measurements.clear();
        assert_eq!(
            reason(check(&payload(&empty), "d")),
            PayloadDefect::NoMeasurement
        );

        let mut late = reading("x", 1.0);
        late.sampled_at_ms = 1_000_000;
        assert_eq!(
            reason(check(&payload(&late), "d")),
            PayloadDefect::ImplausibleTime
        );

        let short_signature = SignedReading {
            reading: vec![],
            signature: vec![1; 10],
        };
        assert_eq!(
            reason(check(&short_signature.encode_to_vec(), "d")),
            PayloadDefect::Malformed
        );
    }
}
