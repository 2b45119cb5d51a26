//! Rules for what is never legitimate, and the weight each kind of evidence carries.
//!
//! A rule fires on one observation, at once: a forged signature inside an authenticated
//! session, a replayed seq with other content, a publish or subscription outside the device's
//! own topics, a value no human body produces. The weights are probabilities that the device
//! is compromised given the evidence; the risk stage combines them.

use crate::events::EventKind;

/// The weight of one security event, and the detector name it is reported under.
pub fn event_weight(kind: EventKind) -> Option<(&'static str, f64)> {
    let weighed = match kind {
        // Only the key holder can open a session; inside one, these are never legitimate.
        EventKind::BadSignature => ("rule.bad_signature", 0.9),
        EventKind::Replay => ("rule.replay", 0.9),
        EventKind::DeviceMismatch => ("rule.device_mismatch", 0.9),
        EventKind::SeqJumpTooFar => ("rule.seq_jump", 0.9),
        EventKind::TopicNotAllowed => ("rule.topic_probe", 0.9),
        EventKind::SubscribeRefused => ("rule.topic_probe", 0.6),
        // Buggy firmware can send these too: they count, but one alone is not a cut-off.
        EventKind::Malformed | EventKind::Oversized | EventKind::NoMeasurement => {
            ("rule.malformed", 0.3)
        }
        EventKind::ImplausibleTime => ("rule.implausible_time", 0.2),
        // Counted by the flood detectors, not weighed one by one.
        EventKind::LoginAccepted
        | EventKind::LoginRefused
        | EventKind::SessionReplaced
        | EventKind::QuarantinedPublish
        | EventKind::Overloaded => return None,
    };
    Some(weighed)
}

/// Weight of a value outside what a human body (or the device) can produce.
pub const IMPOSSIBLE_VALUE_WEIGHT: f64 = 0.5;

/// The range a metric's value can take on a living patient, `(min, max)`, or `None` for a
/// metric without a known range. Deliberately wide: these catch forgeries, not illness.
pub fn physiological_range(metric: &str) -> Option<(f64, f64)> {
    let range = match metric {
        "heart_rate_bpm" => (20.0, 300.0),
        "spo2_pct" => (40.0, 100.0),
        "glucose_mg_dl" => (10.0, 1_500.0),
        "systolic_mmhg" => (40.0, 300.0),
        "diastolic_mmhg" => (15.0, 200.0),
        "temperature_c" => (25.0, 45.0),
        "respiratory_rate_bpm" => (2.0, 80.0),
        "infusion_rate_ml_h" => (0.0, 1_200.0),
        _ => return None,
    };
    Some(range)
}

/// The first measurement outside its physiological range: `(metric, value, min, max)`.
pub fn impossible_value(measurements: &[(String, f64)]) -> Option<(&str, f64, f64, f64)> {
    measurements.iter().find_map(|(metric, value)| {
        let (min, max) = physiological_range(metric)?;
        (!value.is_finite() || *value < min || *value > max).then_some((
            metric.as_str(),
            *value,
            min,
            max,
        ))
    })
}

/// Counts events in a sliding window of fixed length with a fixed number of buckets.
#[derive(Debug, Clone, Default)]
pub struct WindowCounter {
    buckets: [u32; 6],
    bucket_start_ms: i64,
}

impl WindowCounter {
    /// Length of one bucket; the window is six buckets (one minute).
    const BUCKET_MS: i64 = 10_000;

    /// Counts one event at `at_ms` and returns the total over the last minute.
    pub fn add(&mut self, at_ms: i64) -> u32 {
        self.advance(at_ms);
        self.buckets[0] = self.buckets[0].saturating_add(1);
        self.total()
    }

    fn advance(&mut self, at_ms: i64) {
        let start = at_ms - at_ms.rem_euclid(Self::BUCKET_MS);
        let steps = (start - self.bucket_start_ms) / Self::BUCKET_MS;
        if steps <= 0 {
            return;
        }
        let steps = steps.min(self.buckets.len() as i64) as usize;
        self.buckets.rotate_right(steps);
        self.buckets[..steps].fill(0);
        self.bucket_start_ms = start;
    }

    fn total(&self) -> u32 {
        self.buckets.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_outside_a_human_body_are_found() {
        let normal = vec![
            ("heart_rate_bpm".to_owned(), 72.0),
            ("spo2_pct".to_owned(), 97.0),
        ];
        assert!(impossible_value(&normal).is_none());
        let forged = vec![
            ("spo2_pct".to_owned(), 97.0),
            ("heart_rate_bpm".to_owned(), 900.0),
        ];
        assert_eq!(
            impossible_value(&forged),
            Some(("heart_rate_bpm", 900.0, 20.0, 300.0))
        );
        let unknown = vec![("lux".to_owned(), 1e9)];
        assert!(impossible_value(&unknown).is_none());
    }

    #[test]
    fn the_window_forgets_events_older_than_a_minute() {
        let mut counter = WindowCounter::default();
        for i in 0..10 {
            counter.add(1_000_000 + i * 1_000);
        }
        assert_eq!(counter.add(1_010_000), 11);
        assert_eq!(counter.add(1_080_000), 1);
    }

    #[test]
    fn key_free_events_carry_no_weight_of_their_own() {
        assert!(event_weight(EventKind::LoginRefused).is_none());
        assert!(!EventKind::LoginRefused.is_keyed());
        assert!(event_weight(EventKind::BadSignature).is_some_and(|(_, w)| w >= 0.8));
    }
}
