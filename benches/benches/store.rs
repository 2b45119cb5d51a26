//! The store's per-reading work: a write-ahead log group commit (N readings encoded, one write,
//! one fsync, in a temporary directory), building the hot tier's Arrow rows, and encoding them
//! as Parquet the way a flush does.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use parquet::arrow::ArrowWriter;
use vigil_store::wal::{SegmentWriter, encode_entry};
use vigil_store::{AcceptedReading, WalEntry, parquet_properties, readings_batch};

fn accepted_readings(count: usize) -> Vec<AcceptedReading> {
    let received_at_ms = vigil_benches::now_ms();
    (0..count)
        .map(|index| {
            let device_id = format!("bench-{:05}", index % 1000);
            let reading = vigil_benches::reading(&device_id, index as u64 + 1);
            AcceptedReading {
                device_id: Arc::from(device_id.as_str()),
                seq: reading.seq,
                sampled_at_ms: reading.sampled_at_ms,
                received_at_ms,
                measurements: reading
                    .measurements
                    .into_iter()
                    .map(|m| (m.metric, m.value))
                    .collect(),
                signature_digest: [index as u8; 16],
            }
        })
        .collect()
}

fn wal_group_commit(c: &mut Criterion) {
    let mut buffer = Vec::new();
    let mut group = c.benchmark_group("wal_group_commit");
    for size in [1usize, 16, 128, 1024, 4096] {
        // A segment of its own per size, removed with its directory afterwards.
        let dir = tempfile::tempdir().unwrap();
        let mut segment = SegmentWriter::create(dir.path(), 1).unwrap();
        let entries: Vec<WalEntry> = accepted_readings(size)
            .into_iter()
            .map(WalEntry::Reading)
            .collect();
        group.throughput(Throughput::Elements(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.iter(|| {
                buffer.clear();
                for entry in &entries {
                    encode_entry(&mut buffer, entry);
                }
                segment.append_durably(&buffer).unwrap();
            })
        });
    }
    group.finish();
}

fn arrow_and_parquet(c: &mut Criterion) {
    const READINGS: usize = 4096;
    let readings = accepted_readings(READINGS);
    let batch = readings_batch(&readings).unwrap();

    let mut group = c.benchmark_group("columnar");
    group.throughput(Throughput::Elements(READINGS as u64));
    group.bench_function("arrow_rows", |b| {
        b.iter(|| readings_batch(&readings).unwrap())
    });
    group.bench_function("parquet_encode", |b| {
        b.iter(|| {
            let mut bytes = Vec::with_capacity(64 * 1024);
            let mut writer =
                ArrowWriter::try_new(&mut bytes, batch.schema(), Some(parquet_properties()))
                    .unwrap();
            writer.write(&batch).unwrap();
            writer.close().unwrap();
            bytes
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = vigil_benches::short_criterion();
    targets = wal_group_commit, arrow_and_parquet
}
criterion_main!(benches);
