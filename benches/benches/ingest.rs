//! The gateway's per-message work before the verifier: the login check at CONNECT (token,
//! registry, nonce cache) and the decoding and plausibility checks of a reading's payload.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use vigil_ingest::login::LoginChecker;
use vigil_ingest::nonces::NonceCache;
use vigil_ingest::payload::check_payload;
use vigil_ingest::registry::{DeviceRegistry, Enrollment};
use vigil_proto::make_login_token;

const TOKEN_LIFETIME_S: u64 = 300;

fn login_check(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (device_id, key, _) = vigil_benches::signed_fleet(1).remove(0);
    let registry = Arc::new(DeviceRegistry::open(dir.path()).unwrap());
    let enrollment = Enrollment {
        device_id: device_id.clone(),
        public_key_hex: hex::encode(key.verifying_key().as_bytes()),
        class: None,
    };
    registry.enroll(&[enrollment]).unwrap();
    let now_s = vigil_benches::now_ms() as u64 / 1000;
    let nonces = NonceCache::open(dir.path(), now_s).unwrap();
    let checker = LoginChecker::new(registry, nonces, TOKEN_LIFETIME_S);

    // Every login needs a fresh nonce: tokens are made outside the measured time.
    let mut counter: u128 = 0;
    c.bench_function("login_check", |b| {
        b.iter_batched(
            || {
                counter += 1;
                let nonce = counter.to_le_bytes();
                make_login_token(&key, &device_id, now_s + TOKEN_LIFETIME_S / 2, nonce)
            },
            |token| {
                checker
                    .check(&device_id, Some(&device_id), Some(token.as_bytes()), now_s)
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
}

fn payload_decode(c: &mut Criterion) {
    let (device_id, _, signed) = vigil_benches::signed_fleet(1).remove(0);
    let payload = signed.encode_to_vec();
    let now_ms = vigil_benches::now_ms();

    let mut group = c.benchmark_group("payload");
    group.throughput(Throughput::Bytes(payload.len() as u64));
    group.bench_function("decode_and_check", |b| {
        b.iter(|| check_payload(&payload, &device_id, now_ms, 300_000).unwrap())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = vigil_benches::short_criterion();
    targets = login_check, payload_decode
}
criterion_main!(benches);
