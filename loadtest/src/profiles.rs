//! Device classes and the vital signs each one measures, generated per simulated patient.
//!
//! Every metric follows the same model, with parameters per metric:
//!
//! ```text
//! value(t) = baseline + circadian(t) + deviation(t) + noise
//! ```
//!
//! - `baseline` is drawn once per patient from a population distribution, so two patients of the
//!   same class differ the way two people do.
//! - `circadian(t)` is a 24-hour sine wave with the metric's amplitude, peaking at the metric's
//!   peak hour (UTC, shifted by up to an hour per patient).
//! - `deviation(t)` is a slow mean-reverting random walk (Ornstein-Uhlenbeck) with a stationary
//!   spread and a reversion time of minutes to hours: it drifts, but comes back to the baseline.
//! - `noise` is independent per sample: the measurement error of the sensor.
//!
//! The result is clamped to the metric's plausible range and rounded to the sensor's resolution.
//! Blood pressure couples the two pressures (the diastolic walk follows part of the systolic
//! walk) and keeps a pulse pressure of at least 20 mmHg. Everything is deterministic for a given
//! seed and sequence of sample times.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vigil_proto::v1::Measurement;

/// The kinds of device the simulator models; each measures a fixed set of metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceClass {
    /// Continuous ECG-derived heart rate (`heart_rate_bpm`).
    HeartRateMonitor,
    /// Finger-clip oximeter (`spo2_pct`, `heart_rate_bpm`).
    PulseOximeter,
    /// Continuous glucose monitor (`glucose_mg_dl`).
    GlucoseSensor,
    /// Automated cuff (`systolic_mmhg`, `diastolic_mmhg`).
    BloodPressureMonitor,
    /// Continuous body temperature patch (`temperature_c`).
    Thermometer,
    /// Volumetric infusion pump reporting its delivered rate (`infusion_rate_ml_h`).
    InfusionPump,
}

impl DeviceClass {
    /// Every class, in the order [`crate::generate_fleet`] cycles through them.
    pub const ALL: [DeviceClass; 6] = [
        DeviceClass::HeartRateMonitor,
        DeviceClass::PulseOximeter,
        DeviceClass::GlucoseSensor,
        DeviceClass::BloodPressureMonitor,
        DeviceClass::Thermometer,
        DeviceClass::InfusionPump,
    ];

    /// The class name as enrolled (`devices.class`), e.g. `heart_rate_monitor`.
    pub fn name(self) -> &'static str {
        match self {
            DeviceClass::HeartRateMonitor => "heart_rate_monitor",
            DeviceClass::PulseOximeter => "pulse_oximeter",
            DeviceClass::GlucoseSensor => "glucose_sensor",
            DeviceClass::BloodPressureMonitor => "blood_pressure_monitor",
            DeviceClass::Thermometer => "thermometer",
            DeviceClass::InfusionPump => "infusion_pump",
        }
    }

    /// The short form used in simulated device ids, e.g. `hrm` in `sim-hrm-00042`.
    pub fn short_name(self) -> &'static str {
        match self {
            DeviceClass::HeartRateMonitor => "hrm",
            DeviceClass::PulseOximeter => "spo2",
            DeviceClass::GlucoseSensor => "cgm",
            DeviceClass::BloodPressureMonitor => "bp",
            DeviceClass::Thermometer => "temp",
            DeviceClass::InfusionPump => "pump",
        }
    }

    /// The class with this [`name`](Self::name), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|class| class.name() == name)
    }

    /// The metrics every reading of this class carries, in reading order.
    pub fn metrics(self) -> &'static [&'static str] {
        match self {
            DeviceClass::HeartRateMonitor => &["heart_rate_bpm"],
            DeviceClass::PulseOximeter => &["spo2_pct", "heart_rate_bpm"],
            DeviceClass::GlucoseSensor => &["glucose_mg_dl"],
            DeviceClass::BloodPressureMonitor => &["systolic_mmhg", "diastolic_mmhg"],
            DeviceClass::Thermometer => &["temperature_c"],
            DeviceClass::InfusionPump => &["infusion_rate_ml_h"],
        }
    }

    fn models(self) -> &'static [&'static MetricModel] {
        match self {
            DeviceClass::HeartRateMonitor => &[&HEART_RATE],
            DeviceClass::PulseOximeter => &[&SPO2, &HEART_RATE],
            DeviceClass::GlucoseSensor => &[&GLUCOSE],
            DeviceClass::BloodPressureMonitor => &[&SYSTOLIC, &DIASTOLIC],
            DeviceClass::Thermometer => &[&TEMPERATURE],
            DeviceClass::InfusionPump => &[&INFUSION_RATE],
        }
    }
}

impl std::fmt::Display for DeviceClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The range a metric's simulated values stay in, `(min, max)`, or `None` for an unknown
/// metric. Every generated value lies within it.
pub fn plausible_range(metric: &str) -> Option<(f64, f64)> {
    ALL_MODELS
        .iter()
        .find(|model| model.metric == metric)
        .map(|model| (model.plausible_min, model.plausible_max))
}

/// Parameters of one metric. Units are the metric's own unless the name says otherwise.
#[derive(Debug)]
struct MetricModel {
    metric: &'static str,
    /// Population distribution of patient baselines, clamped to `baseline_min..=baseline_max`.
    population_mean: f64,
    population_sd: f64,
    baseline_min: f64,
    baseline_max: f64,
    /// Spread of the slow random walk around the baseline once it has settled.
    walk_sd: f64,
    /// How long the walk takes to forget a deviation (Ornstein-Uhlenbeck time constant).
    reversion_time_s: f64,
    /// Per-sample measurement noise.
    noise_sd: f64,
    /// Half the peak-to-trough swing over a day, and the UTC hour of the peak.
    circadian_amplitude: f64,
    circadian_peak_hour: f64,
    plausible_min: f64,
    plausible_max: f64,
    /// The sensor reports multiples of this.
    resolution: f64,
}

const HEART_RATE: MetricModel = MetricModel {
    metric: "heart_rate_bpm",
    population_mean: 76.0,
    population_sd: 10.0,
    baseline_min: 52.0,
    baseline_max: 105.0,
    walk_sd: 6.0,
    reversion_time_s: 900.0,
    noise_sd: 1.5,
    circadian_amplitude: 6.0,
    circadian_peak_hour: 16.0,
    plausible_min: 35.0,
    plausible_max: 180.0,
    resolution: 1.0,
};

const SPO2: MetricModel = MetricModel {
    metric: "spo2_pct",
    population_mean: 97.0,
    population_sd: 1.2,
    baseline_min: 93.0,
    baseline_max: 99.0,
    walk_sd: 0.8,
    reversion_time_s: 600.0,
    noise_sd: 0.6,
    circadian_amplitude: 0.5,
    circadian_peak_hour: 14.0,
    plausible_min: 85.0,
    plausible_max: 100.0,
    resolution: 1.0,
};

const GLUCOSE: MetricModel = MetricModel {
    metric: "glucose_mg_dl",
    population_mean: 115.0,
    population_sd: 22.0,
    baseline_min: 80.0,
    baseline_max: 190.0,
    walk_sd: 18.0,
    reversion_time_s: 2_400.0,
    noise_sd: 3.0,
    circadian_amplitude: 12.0,
    circadian_peak_hour: 7.0,
    plausible_min: 40.0,
    plausible_max: 400.0,
    resolution: 1.0,
};

const SYSTOLIC: MetricModel = MetricModel {
    metric: "systolic_mmhg",
    population_mean: 124.0,
    population_sd: 13.0,
    baseline_min: 95.0,
    baseline_max: 165.0,
    walk_sd: 7.0,
    reversion_time_s: 1_800.0,
    noise_sd: 3.0,
    circadian_amplitude: 8.0,
    circadian_peak_hour: 10.0,
    plausible_min: 70.0,
    plausible_max: 220.0,
    resolution: 1.0,
};

const DIASTOLIC: MetricModel = MetricModel {
    metric: "diastolic_mmhg",
    population_mean: 78.0,
    population_sd: 8.0,
    baseline_min: 58.0,
    baseline_max: 100.0,
    walk_sd: 3.0,
    reversion_time_s: 1_800.0,
    noise_sd: 2.0,
    circadian_amplitude: 5.0,
    circadian_peak_hour: 10.0,
    plausible_min: 40.0,
    plausible_max: 130.0,
    resolution: 1.0,
};

const TEMPERATURE: MetricModel = MetricModel {
    metric: "temperature_c",
    population_mean: 36.8,
    population_sd: 0.25,
    baseline_min: 36.2,
    baseline_max: 37.4,
    walk_sd: 0.2,
    reversion_time_s: 3_600.0,
    noise_sd: 0.05,
    circadian_amplitude: 0.3,
    circadian_peak_hour: 18.0,
    plausible_min: 34.5,
    plausible_max: 41.0,
    resolution: 0.1,
};

const INFUSION_RATE: MetricModel = MetricModel {
    metric: "infusion_rate_ml_h",
    population_mean: 60.0,
    population_sd: 35.0,
    baseline_min: 5.0,
    baseline_max: 150.0,
    walk_sd: 2.0,
    reversion_time_s: 3_600.0,
    noise_sd: 0.3,
    circadian_amplitude: 0.0,
    circadian_peak_hour: 0.0,
    plausible_min: 0.1,
    plausible_max: 999.0,
    resolution: 0.1,
};

const ALL_MODELS: [&MetricModel; 7] = [
    &HEART_RATE,
    &SPO2,
    &GLUCOSE,
    &SYSTOLIC,
    &DIASTOLIC,
    &TEMPERATURE,
    &INFUSION_RATE,
];

/// Share of the systolic walk that the diastolic pressure follows.
const DIASTOLIC_COUPLING: f64 = 0.5;
/// Smallest difference between systolic and diastolic pressure the generator produces.
const MIN_PULSE_PRESSURE_MMHG: f64 = 20.0;
const DAY_MS: f64 = 86_400_000.0;

/// One simulated patient wearing one device: the state of every vital sign the device measures.
#[derive(Debug, Clone)]
pub struct Patient {
    class: DeviceClass,
    signals: Vec<Signal>,
    rng: StdRng,
    last_sample_ms: Option<i64>,
}

#[derive(Debug, Clone)]
struct Signal {
    model: &'static MetricModel,
    baseline: f64,
    deviation: f64,
    peak_hour: f64,
}

impl Patient {
    /// A patient with baselines drawn from `seed`; the same class and seed give the same values.
    pub fn new(class: DeviceClass, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let signals = class
            .models()
            .iter()
            .map(|&model| {
                let drawn = model.population_mean + model.population_sd * standard_normal(&mut rng);
                Signal {
                    model,
                    baseline: drawn.clamp(model.baseline_min, model.baseline_max),
                    // Start from the walk's settled distribution, not exactly at the baseline.
                    deviation: model.walk_sd * standard_normal(&mut rng),
                    peak_hour: model.circadian_peak_hour + rng.gen_range(-1.0..1.0),
                }
            })
            .collect();
        Self {
            class,
            signals,
            rng,
            last_sample_ms: None,
        }
    }

    /// The device class this patient is monitored with.
    pub fn class(&self) -> DeviceClass {
        self.class
    }

    /// Advances the patient to `at_unix_ms` and returns one measurement per metric of the class.
    ///
    /// Sample times should not go backwards; a time earlier than the previous one is treated as
    /// no time passing.
    pub fn sample(&mut self, at_unix_ms: i64) -> Vec<Measurement> {
        let elapsed_s = match self.last_sample_ms {
            Some(previous) => (at_unix_ms.saturating_sub(previous)).max(0) as f64 / 1000.0,
            None => 0.0,
        };
        self.last_sample_ms = Some(at_unix_ms);

        for signal in &mut self.signals {
            signal.deviation = walk_step(signal.deviation, signal.model, elapsed_s, &mut self.rng);
        }

        let hour_of_day = (at_unix_ms as f64).rem_euclid(DAY_MS) / 3_600_000.0;
        let mut values: Vec<f64> = self
            .signals
            .iter()
            .map(|signal| {
                let model = signal.model;
                let circadian = model.circadian_amplitude
                    * (std::f64::consts::TAU * (hour_of_day - signal.peak_hour) / 24.0).cos();
                let noise = model.noise_sd * standard_normal(&mut self.rng);
                signal.baseline + circadian + signal.deviation + noise
            })
            .collect();

        if self.class == DeviceClass::BloodPressureMonitor && values.len() == 2 {
            values[1] += DIASTOLIC_COUPLING * self.signals[0].deviation;
        }
        for (value, signal) in values.iter_mut().zip(&self.signals) {
            let model = signal.model;
            *value = quantize(value.clamp(model.plausible_min, model.plausible_max), model);
        }
        if self.class == DeviceClass::BloodPressureMonitor && values.len() == 2 {
            values[1] = values[1]
                .min(values[0] - MIN_PULSE_PRESSURE_MMHG)
                .max(DIASTOLIC.plausible_min);
        }

        self.signals
            .iter()
            .zip(values)
            .map(|(signal, value)| Measurement {
                metric: signal.model.metric.to_owned(),
                value,
            })
            .collect()
    }
}

/// One exact Ornstein-Uhlenbeck step of `elapsed_s` seconds.
fn walk_step(deviation: f64, model: &MetricModel, elapsed_s: f64, rng: &mut StdRng) -> f64 {
    if elapsed_s <= 0.0 {
        return deviation;
    }
    let decay = (-elapsed_s / model.reversion_time_s).exp();
    let step_sd = model.walk_sd * (1.0 - decay * decay).sqrt();
    deviation * decay + step_sd * standard_normal(rng)
}

fn quantize(value: f64, model: &MetricModel) -> f64 {
    let steps = (value / model.resolution).round();
    // Rounding may step just outside the range; stay inside it.
    (steps * model.resolution).clamp(model.plausible_min, model.plausible_max)
}

/// A standard normal variate (Box-Muller), to avoid a dependency for one distribution.
fn standard_normal(rng: &mut StdRng) -> f64 {
    let uniform: f64 = rng.gen_range(f64::EPSILON..1.0);
    let angle: f64 = rng.gen_range(0.0..std::f64::consts::TAU);
    (-2.0 * uniform.ln()).sqrt() * angle.cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEPS: i64 = 10_000;

    fn run(class: DeviceClass, seed: u64, interval_ms: i64) -> Vec<Vec<Measurement>> {
        let mut patient = Patient::new(class, seed);
        let start_ms = 1_800_000_000_000;
        (0..STEPS)
            .map(|step| patient.sample(start_ms + step * interval_ms))
            .collect()
    }

    #[test]
    fn every_class_stays_plausible_over_ten_thousand_steps() {
        for class in DeviceClass::ALL {
            for seed in 0..5 {
                // One-second and one-minute sampling: the second covers a week of circadian drift.
                for interval_ms in [1_000, 60_000] {
                    for reading in run(class, seed, interval_ms) {
                        let metrics: Vec<&str> =
                            reading.iter().map(|m| m.metric.as_str()).collect();
                        assert_eq!(metrics, class.metrics());
                        for measurement in &reading {
                            let (min, max) = plausible_range(&measurement.metric).unwrap();
                            assert!(
                                measurement.value.is_finite()
                                    && (min..=max).contains(&measurement.value),
                                "{class} {}={} outside {min}..={max}",
                                measurement.metric,
                                measurement.value
                            );
                        }
                        if class == DeviceClass::BloodPressureMonitor {
                            assert!(reading[0].value - reading[1].value >= 20.0 - 1e-9);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn values_look_like_vital_signs() {
        // Averages over a day of one-minute samples sit near the population norms.
        let mean = |class: DeviceClass, index: usize| {
            let readings = run(class, 7, 60_000);
            readings.iter().map(|r| r[index].value).sum::<f64>() / readings.len() as f64
        };
        assert!((50.0..110.0).contains(&mean(DeviceClass::HeartRateMonitor, 0)));
        assert!((92.0..100.0).contains(&mean(DeviceClass::PulseOximeter, 0)));
        assert!((70.0..200.0).contains(&mean(DeviceClass::GlucoseSensor, 0)));
        assert!((90.0..170.0).contains(&mean(DeviceClass::BloodPressureMonitor, 0)));
        assert!((35.8..37.8).contains(&mean(DeviceClass::Thermometer, 0)));
    }

    #[test]
    fn patients_differ_and_repeat() {
        let first = run(DeviceClass::PulseOximeter, 1, 1_000);
        assert_eq!(first, run(DeviceClass::PulseOximeter, 1, 1_000));
        assert_ne!(first, run(DeviceClass::PulseOximeter, 2, 1_000));

        // The walk moves: consecutive values are not all equal.
        let distinct: std::collections::BTreeSet<i64> =
            first.iter().map(|r| r[1].value as i64).collect();
        assert!(distinct.len() > 5);
    }

    #[test]
    fn class_names_round_trip() {
        for class in DeviceClass::ALL {
            assert_eq!(DeviceClass::from_name(class.name()), Some(class));
        }
        assert_eq!(DeviceClass::from_name("toaster"), None);
    }
}
