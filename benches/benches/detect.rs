//! The detector's work per accepted reading: features, streaming statistics, rules and risk,
//! on the real detector thread fed through its bounded observation queue, for a fleet of
//! devices sending one reading per second each.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vigil_detect::alerts::AlertLog;
use vigil_detect::events::ReadingObservation;
use vigil_detect::{DetectConfig, Detector, Observation, Responder, observation_queue};

const DEVICES: usize = 1000;

/// A registry where every device is a healthy pulse oximeter and no action has effect.
#[derive(Debug)]
struct QuietFleet {
    class: Arc<str>,
}

impl Responder for QuietFleet {
    fn device_class(&self, _device_id: &str) -> Option<Arc<str>> {
        Some(self.class.clone())
    }
    fn is_quarantined(&self, _device_id: &str) -> bool {
        false
    }
    fn quarantine(&self, _device_id: &str, _reason: &str) -> bool {
        true
    }
    fn set_suspect(&self, _device_id: &str, _suspect: bool) {}
    fn throttle_peer(&self, _peer: &str, _duration: Duration) {}
}

fn detector_per_reading(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let alerts = AlertLog::open(dir.path(), 10_000).unwrap();
    let (sender, receiver) = observation_queue(8192);
    let responder = Arc::new(QuietFleet {
        class: Arc::from("pulse_oximeter"),
    });
    let detector = Detector::start(DetectConfig::default(), alerts, receiver, responder).unwrap();
    let device_ids: Vec<Arc<str>> = (0..DEVICES)
        .map(|index| Arc::from(format!("bench-{index:05}").as_str()))
        .collect();
    let class: Arc<str> = Arc::from("pulse_oximeter");
    let start_ms = vigil_benches::now_ms();
    let mut sent: u64 = 0;

    let mut group = c.benchmark_group("detector");
    group.throughput(Throughput::Elements(1));
    group.bench_function("observe_reading", |b| {
        b.iter_custom(|iterations| {
            let observed_before = detector.metrics.observations.get();
            let started = Instant::now();
            for _ in 0..iterations {
                let device = (sent % DEVICES as u64) as usize;
                let seq = sent / DEVICES as u64 + 1;
                let at_ms = start_ms + seq as i64 * 1000;
                let reading = vigil_benches::reading(&device_ids[device], seq);
                let observation = Observation::Reading(ReadingObservation {
                    device_id: device_ids[device].clone(),
                    class: class.clone(),
                    seq,
                    sampled_at_ms: at_ms,
                    received_at_ms: at_ms + 40,
                    measurements: reading
                        .measurements
                        .into_iter()
                        .map(|m| (m.metric, m.value))
                        .collect(),
                });
                assert!(sender.send_decision(observation), "detector stopped");
                sent += 1;
            }
            // Done when the detector has taken every observation of this round.
            while detector.metrics.observations.get() < observed_before + iterations {
                std::thread::yield_now();
            }
            started.elapsed()
        })
    });
    group.finish();

    drop(sender);
    detector.join();
}

criterion_group! {
    name = benches;
    config = vigil_benches::short_criterion();
    targets = detector_per_reading
}
criterion_main!(benches);
