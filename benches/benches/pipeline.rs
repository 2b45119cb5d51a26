//! Readings per second through the server's pipeline without MQTT: payload checks, batch
//! signature verification on the verifier threads, the replay guard, the write-ahead log's
//! group commits and the hot tier, until every reading's durability completion has fired
//! (the moment the gateway would send its PUBACK). Each round starts a fresh store in a
//! temporary directory, so seqs start at 1 again; start-up is not measured.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use tokio::sync::oneshot;
use vigil_ingest::metrics::IngestMetrics;
use vigil_ingest::payload::check_payload;
use vigil_ingest::registry::{DeviceEntry, DeviceRegistry, Enrollment};
use vigil_ingest::verifier::{Verdict, VerifierPool, VerifierSettings, VerifyJob};
use vigil_store::{Store, StoreConfig};

const DEVICES: usize = 512;
const READINGS_PER_DEVICE: u64 = 16;

struct Corpus {
    devices: Vec<Arc<DeviceEntry>>,
    /// Payloads in arrival order: seq 1 of every device, then seq 2, ...
    payloads: Vec<(usize, Vec<u8>)>,
    _registry_dir: tempfile::TempDir,
}

fn corpus() -> Corpus {
    let registry_dir = tempfile::tempdir().unwrap();
    let registry = DeviceRegistry::open(registry_dir.path()).unwrap();
    let fleet = vigil_benches::signed_fleet(DEVICES);
    let enrollments: Vec<Enrollment> = fleet
        .iter()
        .map(|(device_id, key, _)| Enrollment {
            device_id: device_id.clone(),
            public_key_hex: hex::encode(key.verifying_key().as_bytes()),
            class: None,
        })
        .collect();
    registry.enroll(&enrollments).unwrap();
    let devices = fleet
        .iter()
        .map(|(device_id, _, _)| registry.get(device_id).unwrap())
        .collect();

    let mut payloads = Vec::new();
    for seq in 1..=READINGS_PER_DEVICE {
        for (index, (device_id, key, _)) in fleet.iter().enumerate() {
            let reading = vigil_benches::reading(device_id, seq);
            let signed = vigil_proto::sign_reading(key, &reading);
            payloads.push((index, signed.encode_to_vec()));
        }
    }
    Corpus {
        devices,
        payloads,
        _registry_dir: registry_dir,
    }
}

/// Pushes the whole corpus through a fresh store and verifier pool; returns the time from the
/// first submission to the last durability completion.
async fn one_round(corpus: &Corpus) -> Duration {
    let data_dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        data_dir: data_dir.path().to_owned(),
        ..StoreConfig::default()
    };
    let (store, recovered) = Store::open(config).unwrap();
    let settings = VerifierSettings {
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        max_batch: 512,
        queue_capacity: 8192,
        max_seq_jump: 1_000_000,
    };
    // Detection is outside this measurement: its queue has no reader and skips what it gets.
    let (observations, _) = vigil_detect::observation_queue(1);
    let pool = VerifierPool::start(
        &settings,
        recovered,
        store.wal_sender(),
        Arc::new(IngestMetrics::default()),
        observations,
    )
    .unwrap();

    let started = Instant::now();
    let mut outcomes = Vec::with_capacity(corpus.payloads.len());
    for (device, payload) in &corpus.payloads {
        let device = &corpus.devices[*device];
        let now_ms = vigil_benches::now_ms();
        let checked = check_payload(payload, &device.id, now_ms, 300_000).unwrap();
        let (verdict, verdict_receiver) = oneshot::channel();
        let (durable, durable_receiver) = oneshot::channel();
        let job = VerifyJob {
            device: device.clone(),
            payload: checked,
            received_at_ms: now_ms,
            peer: Arc::from("127.0.0.1:1"),
            verdict,
            durable,
        };
        pool.submit(job).await.unwrap();
        outcomes.push((verdict_receiver, durable_receiver));
    }
    for (verdict, durable) in outcomes {
        assert_eq!(verdict.await.unwrap(), Verdict::Stored);
        durable.await.unwrap().unwrap();
    }
    let elapsed = started.elapsed();

    drop(pool);
    store.shutdown();
    elapsed
}

fn pipeline(c: &mut Criterion) {
    let corpus = corpus();
    let runtime = tokio::runtime::Runtime::new().unwrap();

    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(corpus.payloads.len() as u64));
    group.bench_function("verify_wal_hot_tier", |b| {
        b.iter_custom(|rounds| {
            (0..rounds)
                .map(|_| runtime.block_on(one_round(&corpus)))
                .sum()
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = vigil_benches::short_criterion();
    targets = pipeline
}
criterion_main!(benches);
