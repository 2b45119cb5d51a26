//! The per-device statistics against the simulator's patients (the physiology the load test and
//! `vigil drill` send): quiet on healthy patients of every device class, quick on a stolen key
//! sending made-up values. Deterministic: every patient and attack is seeded.

use vigil_detect::baseline::{BaselineConfig, MetricBaseline, RoughnessTracker};
use vigil_loadtest::{DeviceClass, Patient};

const START_MS: i64 = 1_780_000_000_000;
/// 2 Hz, as in `vigil drill`.
const STEP_MS: i64 = 500;

/// One metric's statistics, fed the way the detector feeds them.
#[derive(Default)]
struct Tracked {
    baseline: MetricBaseline,
    roughness: RoughnessTracker,
}

impl Tracked {
    fn update(&mut self, value: f64, config: &BaselineConfig) -> bool {
        self.baseline.update(value, config);
        let floor = config.min_relative_spread * self.baseline.mean(config).unwrap_or(0.0).abs();
        self.roughness.update(value, floor, config).is_some()
    }
}

#[test]
fn roughness_stays_quiet_on_healthy_patients_of_every_class() {
    let config = BaselineConfig::default();
    let mut reports = Vec::new();
    let mut metric_hours = 0.0;
    for class in DeviceClass::ALL {
        for seed in 0..100u64 {
            let mut patient = Patient::new(class, seed);
            let mut tracked: Vec<Tracked> = Vec::new();
            // One hour per patient.
            for step in 0..7_200i64 {
                let measurements = patient.sample(START_MS + step * STEP_MS);
                tracked.resize_with(measurements.len(), Default::default);
                for (metric, measurement) in tracked.iter_mut().zip(&measurements) {
                    if metric.update(measurement.value, &config) {
                        reports.push((class, seed, step, measurement.metric.clone()));
                    }
                }
            }
            metric_hours += tracked.len() as f64;
        }
    }
    eprintln!(
        "{} roughness reports over {metric_hours} healthy metric-hours: {reports:?}",
        reports.len()
    );
    // One report makes a device `suspect` (an alert), never a cut-off on its own; a handful
    // over hundreds of patient-hours is the false-alert rate this detector costs.
    assert!(
        reports.len() <= 8,
        "{} reports on healthy patients",
        reports.len()
    );
}

#[test]
fn made_up_values_from_a_stolen_key_are_reported_within_seconds() {
    let config = BaselineConfig::default();
    let mut third_report_after = Vec::new();
    for seed in 0..50u64 {
        let mut patient = Patient::new(DeviceClass::HeartRateMonitor, seed);
        let mut tracked = Tracked::default();
        let mut level = 0.0;
        for step in 0..600i64 {
            level = patient.sample(START_MS + step * STEP_MS)[0].value;
            tracked.update(level, &config);
        }
        // The attacker's values: uniform noise of +-10 % around the patient's level, as the
        // simulator's `spoofed_vitals` scenario sends them.
        let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let mut reports = 0;
        let found = (0..120).position(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let uniform = (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            if tracked.update((level * (1.0 + 0.2 * uniform)).round(), &config) {
                reports += 1;
            }
            reports == 3
        });
        third_report_after.push(found);
    }
    let caught: Vec<usize> = third_report_after.iter().flatten().copied().collect();
    let within_20_s = caught.iter().filter(|after| **after <= 40).count();
    eprintln!(
        "three roughness reports within 20 s for {within_20_s} of 50 spoofed patients; after \
         readings: {third_report_after:?}"
    );
    // Noise of +-10 % is about twice a patient's own at a high heart rate and barely above it
    // at a low one: the detector catches the former within seconds, and the latter is left to
    // the fleet model.
    assert!(
        within_20_s >= 34,
        "only {within_20_s} of 50 spoofed patients reported three times within 20 s"
    );
}
