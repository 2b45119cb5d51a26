//! A reading payload as a device publishes it: decoding and the keyless checks must refuse
//! anything off-contract with a defect and never panic; what they accept must hold up.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_proto::payload::{MAX_MEASUREMENTS, MAX_METRIC_LEN, check_payload};

const DEVICE_ID: &str = "icu-bed-07-spo2";
const NOW_MS: i64 = 1_800_000_000_000;
const MAX_CLOCK_SKEW_MS: i64 = 300_000;

fuzz_target!(|payload: &[u8]| {
    let Ok(checked) = check_payload(payload, DEVICE_ID, NOW_MS, MAX_CLOCK_SKEW_MS) else {
        return;
    };
    assert!(checked.seq >= 1);
    assert!((1..=MAX_MEASUREMENTS).contains(&checked.measurements.len()));
    for (metric, value) in &checked.measurements {
        assert!(!metric.is_empty() && metric.len() <= MAX_METRIC_LEN);
        assert!(value.is_finite());
    }
    assert!(checked.sampled_at_ms.abs_diff(NOW_MS) <= MAX_CLOCK_SKEW_MS as u64);
    assert_eq!(checked.signature_digest(), checked.signature[..16]);
});
