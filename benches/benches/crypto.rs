//! Login token checks and reading signature verification, one by one and in batches.
#![allow(clippy::unwrap_used, missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use vigil_proto::contract::READING_CONTEXT;
use vigil_proto::v1::{Measurement, Reading};
use vigil_proto::{LoginToken, make_login_token, sign_reading};

fn signed_readings(count: usize) -> (Vec<Vec<u8>>, Vec<Signature>, Vec<VerifyingKey>) {
    let mut messages = Vec::with_capacity(count);
    let mut signatures = Vec::with_capacity(count);
    let mut keys = Vec::with_capacity(count);
    for index in 0..count {
        let key = SigningKey::from_bytes(&rand::random());
        let reading = Reading {
            device_id: format!("bench-{index:05}"),
            seq: index as u64 + 1,
            sampled_at_ms: 1_767_225_600_000 + index as i64,
            measurements: vec![
                Measurement {
                    metric: "spo2_pct".into(),
                    value: 97.5,
                },
                Measurement {
                    metric: "heart_rate_bpm".into(),
                    value: 72.0,
                },
            ],
        };
        let signed = sign_reading(&key, &reading);
        let mut message = READING_CONTEXT.to_vec();
        message.extend_from_slice(&signed.reading);
        messages.push(message);
        signatures.push(Signature::from_slice(&signed.signature).unwrap());
        keys.push(key.verifying_key());
    }
    (messages, signatures, keys)
}

fn verification(c: &mut Criterion) {
    let mut group = c.benchmark_group("verify_readings");
    for size in [1usize, 4, 16, 64, 256, 1024] {
        let (messages, signatures, keys) = signed_readings(size);
        let slices: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        group.throughput(Throughput::Elements(size as u64));

        group.bench_with_input(BenchmarkId::new("one_by_one", size), &size, |b, _| {
            b.iter(|| {
                for ((message, signature), key) in slices.iter().zip(&signatures).zip(&keys) {
                    key.verify_strict(message, signature).unwrap();
                }
            })
        });
        group.bench_with_input(BenchmarkId::new("batch", size), &size, |b, _| {
            b.iter(|| ed25519_dalek::verify_batch(&slices, &signatures, &keys).unwrap())
        });
    }
    group.finish();
}

fn login_token(c: &mut Criterion) {
    let key = SigningKey::from_bytes(&[7; 32]);
    let public = key.verifying_key();
    let token = make_login_token(&key, "icu-bed-07-spo2", 1_800_000_000, [3; 16]);

    c.bench_function("login_token_parse_and_verify", |b| {
        b.iter(|| {
            let parsed = LoginToken::parse(&token).unwrap();
            parsed.verify("icu-bed-07-spo2", &public).unwrap();
        })
    });
}

criterion_group! {
    name = benches;
    config = vigil_benches::short_criterion();
    targets = verification, login_token
}
criterion_main!(benches);
