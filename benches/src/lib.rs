//! criterion benchmarks of vigil's hot paths; the benchmarks live in `benches/`, one file per
//! stage (`crypto`, `ingest`, `store`, `detect`) and `pipeline` for verify, write-ahead log and
//! hot tier together without MQTT. This library holds what they share: signed readings of a
//! simulated fleet and a short criterion configuration.
//!
//! Run them all with `cargo bench --workspace` (a few minutes), or one with
//! `cargo bench --workspace --bench store`.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use criterion::Criterion;
use ed25519_dalek::SigningKey;
use vigil_proto::v1::{Measurement, Reading, SignedReading};

/// Short runs: a few seconds per benchmark, so that the whole suite finishes in minutes.
pub fn short_criterion() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10)
}

/// One signed reading per device of `devices` devices, each with its key.
pub fn signed_fleet(devices: usize) -> Vec<(String, SigningKey, SignedReading)> {
    (0..devices)
        .map(|index| {
            let key = SigningKey::from_bytes(&seed(index));
            let device_id = format!("bench-{index:05}");
            let signed = vigil_proto::sign_reading(&key, &reading(&device_id, 1));
            (device_id, key, signed)
        })
        .collect()
}

/// A pulse oximeter's reading at the current time: SpO2 and heart rate.
pub fn reading(device_id: &str, seq: u64) -> Reading {
    Reading {
        device_id: device_id.to_owned(),
        seq,
        sampled_at_ms: now_ms(),
        measurements: vec![
            Measurement {
                metric: "spo2_pct".into(),
                value: 97.0 + (seq % 3) as f64 * 0.5,
            },
            Measurement {
                metric: "heart_rate_bpm".into(),
                value: 70.0 + (seq % 7) as f64,
            },
        ],
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64)
}

fn seed(index: usize) -> [u8; 32] {
    let mut secret = [0x5a; 32];
    secret[..8].copy_from_slice(&(index as u64).to_le_bytes());
    secret
}
