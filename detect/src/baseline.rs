//! Streaming statistics per device: a baseline per metric that adapts to the patient, and the
//! device's message rate and clock offset.
//!
//! Every structure here has a fixed size (a few dozen bytes per metric), so the detector can
//! keep one per device and metric for a whole fleet. Nothing here decides anything: each
//! update returns the findings it made, and the risk stage weighs them.
//!
//! - **Baseline** per metric: a robust mean and spread (updates are clipped at a few standard
//!   deviations, so one wild value barely moves them) that learn slowly, so a patient's own
//!   normal is learnt but an attacker's slow drift is not absorbed before it shows. A
//!   two-sided CUSUM over the clipped z-scores finds sustained shifts and slow drifts; a
//!   single z-score far beyond the spread is an outlier.
//! - **Roughness** per metric: the mean absolute change between successive values, learnt per
//!   device, against a fast average of recent changes. A body changes smoothly at the pace of
//!   its own noise; synthetic values that merely stay in a plausible range (a stolen key
//!   sending made-up vitals) jump about far more than the patient's own signal did.
//! - **Rate**: readings per one-second bucket of sampling time against the device's own learnt
//!   rate. Sampling time, not arrival: a device that uploads its backlog after a network outage
//!   sends fast but samples at its usual pace, and is not a flood; an attacker who spaces out
//!   fake sampling times runs into the server's clock-skew bound within seconds.
//! - **Clock offset**: server receive time minus device sampling time. A device's offset is
//!   stable (network delay plus its clock error); a jump means another clock signs readings.

/// Tuning of the streaming statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct BaselineConfig {
    /// Readings a metric needs before its baseline is trusted.
    pub warmup_readings: u32,
    /// Weight of one reading in the slow baseline once warmed up (about 1 / memory length).
    pub learning_rate: f64,
    /// Largest z-score fed into the baseline and the CUSUM; keeps single outliers from
    /// dominating either.
    pub clip_z: f64,
    /// Slack of the CUSUM, in standard deviations: shifts smaller than this never accumulate.
    pub cusum_slack: f64,
    /// CUSUM level that reports a sustained shift or drift.
    pub cusum_threshold: f64,
    /// |z| beyond which a single value is an outlier.
    pub outlier_z: f64,
    /// Smallest spread assumed, as a fraction of the mean's magnitude; quantised or very
    /// steady signals must not make every small change look huge.
    pub min_relative_spread: f64,
    /// Readings per second above `rate_factor` times the device's own rate (and above
    /// `rate_floor_per_s`) are a flood.
    pub rate_factor: f64,
    /// Rate never reported as a flood, in readings per second.
    pub rate_floor_per_s: f64,
    /// Change of the clock offset, in milliseconds, that is reported (when it also exceeds
    /// `offset_jump_spreads` times the offset's usual wobble).
    pub offset_jump_ms: f64,
    /// See `offset_jump_ms`.
    pub offset_jump_spreads: f64,
    /// Consecutive readings with a jumped offset before it is reported.
    pub offset_jump_readings: u32,
    /// Recent roughness (mean absolute change between successive values) above this many
    /// times the device's usual roughness is reported ...
    pub roughness_factor: f64,
    /// ... once it has stayed above for this many readings in a row.
    pub roughness_readings: u32,
    /// Weight of one change in the recent roughness (about 1 / its memory in readings).
    pub roughness_fast_rate: f64,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        Self {
            warmup_readings: 30,
            learning_rate: 0.01,
            clip_z: 4.0,
            cusum_slack: 1.0,
            cusum_threshold: 25.0,
            outlier_z: 10.0,
            min_relative_spread: 0.005,
            rate_factor: 5.0,
            rate_floor_per_s: 10.0,
            offset_jump_ms: 1_500.0,
            offset_jump_spreads: 8.0,
            offset_jump_readings: 3,
            roughness_factor: 2.0,
            roughness_readings: 3,
            roughness_fast_rate: 0.1,
        }
    }
}

/// What one update found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Finding {
    /// One value far outside the baseline.
    Outlier {
        z: f64,
        observed: f64,
        expected: f64,
    },
    /// A sustained shift or slow drift; `z` is the recent mean's distance in spreads.
    Shift {
        z: f64,
        observed: f64,
        expected: f64,
    },
}

/// The adaptive baseline of one metric of one device.
#[derive(Debug, Clone, Default)]
pub struct MetricBaseline {
    seen: u32,
    mean: f64,
    variance: f64,
    cusum_high: f64,
    cusum_low: f64,
    /// Fast average of recent values, reported as the observed level of a shift.
    recent: f64,
}

impl MetricBaseline {
    /// Feeds one value; returns what it reveals, if anything.
    pub fn update(&mut self, value: f64, config: &BaselineConfig) -> Option<Finding> {
        if !value.is_finite() {
            return None;
        }
        if self.seen < config.warmup_readings {
            self.learn_plainly(value);
            return None;
        }

        let spread = self.spread(config);
        let z = (value - self.mean) / spread;
        let clipped = z.clamp(-config.clip_z, config.clip_z);
        self.recent += 0.2 * (value - self.recent);

        self.cusum_high = (self.cusum_high + clipped - config.cusum_slack).max(0.0);
        self.cusum_low = (self.cusum_low - clipped - config.cusum_slack).max(0.0);
        let finding = if z.abs() >= config.outlier_z {
            Some(Finding::Outlier {
                z,
                observed: value,
                expected: self.mean,
            })
        } else if self.cusum_high >= config.cusum_threshold
            || self.cusum_low >= config.cusum_threshold
        {
            self.cusum_high = 0.0;
            self.cusum_low = 0.0;
            Some(Finding::Shift {
                z: (self.recent - self.mean) / spread,
                observed: self.recent,
                expected: self.mean,
            })
        } else {
            None
        };

        // Learn from the clipped value only, so outliers and attacks move the baseline slowly.
        let rate = config.learning_rate;
        let step = clipped * spread;
        self.mean += rate * step;
        self.variance += rate * (step * step - self.variance);
        finding
    }

    /// Welford's running mean and variance during warm-up.
    fn learn_plainly(&mut self, value: f64) {
        self.seen += 1;
        let n = f64::from(self.seen);
        let delta = value - self.mean;
        self.mean += delta / n;
        let m2 = self.variance * (n - 1.0) + delta * (value - self.mean);
        self.variance = m2 / n;
        self.recent = self.mean;
    }

    fn spread(&self, config: &BaselineConfig) -> f64 {
        let floor = (config.min_relative_spread * self.mean.abs()).max(1e-6);
        self.variance.sqrt().max(floor)
    }

    /// The learnt mean, once warmed up.
    pub fn mean(&self, config: &BaselineConfig) -> Option<f64> {
        (self.seen >= config.warmup_readings).then_some(self.mean)
    }
}

/// Squared changes beyond this many times the usual one are learnt as this many times.
const ROUGHNESS_LEARN_CLIP: f64 = 12.0;

/// How much a metric's value changes from one reading to the next (the root mean square of the
/// change), against the device's own usual change.
#[derive(Debug, Clone, Default)]
pub struct RoughnessTracker {
    last: Option<f64>,
    seen: u32,
    /// Slow mean of the squared change: this patient's usual roughness, squared.
    usual: f64,
    /// Fast mean of the squared change.
    recent: f64,
    above_in_a_row: u32,
}

impl RoughnessTracker {
    /// Feeds one value; `floor` is the smallest usual change assumed (quantised, steady signals
    /// must not make every small change look huge). Returns `(recent, usual)` root mean square
    /// changes when the recent one has stayed above `roughness_factor` times the usual one for
    /// `roughness_readings` readings; the count then starts over, so a lasting change is
    /// reported again every `roughness_readings` readings, each report fresh evidence.
    pub fn update(
        &mut self,
        value: f64,
        floor: f64,
        config: &BaselineConfig,
    ) -> Option<(f64, f64)> {
        if !value.is_finite() {
            return None;
        }
        let last = self.last.replace(value)?;
        let squared = (value - last).powi(2);
        if self.seen < config.warmup_readings {
            self.seen += 1;
            self.usual += (squared - self.usual) / f64::from(self.seen);
            self.recent = self.usual;
            return None;
        }

        let usual = self.usual.max(floor * floor);
        let limit = config.roughness_factor.powi(2) * usual;
        self.recent += config.roughness_fast_rate * (squared - self.recent);
        // Learn slowly, from clipped changes only, and ten times slower while the recent level
        // is out of bounds, so an attacker's noise is not absorbed before it shows. The clip is
        // far out: a squared change has a long tail, and cutting it short would bias the usual
        // level low.
        let clip = ROUGHNESS_LEARN_CLIP * usual;
        let rate = if self.recent > limit {
            config.learning_rate / 10.0
        } else {
            config.learning_rate
        };
        self.usual += rate * (squared.min(clip) - self.usual);

        if self.recent > limit {
            self.above_in_a_row += 1;
            if self.above_in_a_row >= config.roughness_readings {
                self.above_in_a_row = 0;
                return Some((self.recent.sqrt(), usual.sqrt()));
            }
        } else {
            self.above_in_a_row = 0;
        }
        None
    }
}

/// Readings per second of one device against its own learnt rate.
#[derive(Debug, Clone, Default)]
pub struct RateTracker {
    bucket_second: i64,
    in_bucket: u32,
    /// Smoothed readings per second over completed buckets with traffic.
    usual_per_s: f64,
    buckets_seen: u32,
}

impl RateTracker {
    /// Counts one reading received at `at_ms`; returns `(rate, usual)` when this second's
    /// count has just crossed the flood limit (once per second).
    pub fn update(&mut self, at_ms: i64, config: &BaselineConfig) -> Option<(f64, f64)> {
        let second = at_ms.div_euclid(1000);
        if second != self.bucket_second {
            if self.in_bucket > 0 {
                let count = f64::from(self.in_bucket);
                self.usual_per_s = if self.buckets_seen == 0 {
                    count
                } else {
                    // Floods are learnt only slowly: the limit must not follow the attacker.
                    let weight = if count > self.limit(config) {
                        0.01
                    } else {
                        0.1
                    };
                    self.usual_per_s + weight * (count - self.usual_per_s)
                };
                self.buckets_seen = self.buckets_seen.saturating_add(1);
            }
            self.bucket_second = second;
            self.in_bucket = 0;
        }

        self.in_bucket += 1;
        let limit = self.limit(config);
        (f64::from(self.in_bucket) > limit && f64::from(self.in_bucket - 1) <= limit)
            .then_some((f64::from(self.in_bucket), self.usual_per_s))
    }

    fn limit(&self, config: &BaselineConfig) -> f64 {
        (self.usual_per_s * config.rate_factor).max(config.rate_floor_per_s)
    }
}

/// The device's clock offset (receive time minus sampling time) and its usual wobble.
#[derive(Debug, Clone, Default)]
pub struct OffsetTracker {
    seen: u32,
    offset_ms: f64,
    wobble_ms: f64,
    jumped_in_a_row: u32,
}

impl OffsetTracker {
    /// Feeds one reading's offset; returns `(observed, usual)` when the offset has jumped for
    /// `offset_jump_readings` readings in a row.
    pub fn update(&mut self, offset_ms: i64, config: &BaselineConfig) -> Option<(f64, f64)> {
        let offset = offset_ms as f64;
        if self.seen < config.warmup_readings {
            self.seen += 1;
            let n = f64::from(self.seen);
            let delta = offset - self.offset_ms;
            self.offset_ms += delta / n;
            self.wobble_ms += (delta.abs() - self.wobble_ms) / n;
            return None;
        }

        let distance = (offset - self.offset_ms).abs();
        let jumped = distance > config.offset_jump_ms
            && distance > config.offset_jump_spreads * self.wobble_ms.max(1.0);
        if jumped {
            self.jumped_in_a_row += 1;
            if self.jumped_in_a_row == config.offset_jump_readings {
                return Some((offset, self.offset_ms));
            }
            return None;
        }

        self.jumped_in_a_row = 0;
        self.offset_ms += 0.05 * (offset - self.offset_ms);
        self.wobble_ms += 0.05 * (distance - self.wobble_ms);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic noisy signal: a patient's level plus bounded pseudo-random noise.
    fn noisy(level: f64, spread: f64, i: u64) -> f64 {
        let x = (i.wrapping_mul(2_654_435_761) % 1000) as f64 / 1000.0 - 0.5;
        level + 2.0 * spread * x
    }

    #[test]
    fn a_steady_patient_raises_nothing() {
        let config = BaselineConfig::default();
        let mut baseline = MetricBaseline::default();
        let findings = (0..20_000)
            .filter_map(|i| baseline.update(noisy(72.0, 3.0, i), &config))
            .count();
        assert_eq!(findings, 0);
    }

    #[test]
    fn a_slow_drift_is_found_before_it_is_learnt() {
        let config = BaselineConfig::default();
        let mut baseline = MetricBaseline::default();
        for i in 0..500 {
            assert!(baseline.update(noisy(72.0, 3.0, i), &config).is_none());
        }

        // +0.2 bpm per reading: 12 bpm after a minute at one reading per second.
        let found_after = (0..600)
            .position(|i| {
                let value = noisy(72.0 + 0.2 * i as f64, 3.0, 500 + i);
                matches!(baseline.update(value, &config), Some(Finding::Shift { .. }))
            })
            .expect("the drift is found");
        assert!(found_after < 90, "found after {found_after} readings");
    }

    #[test]
    fn one_wild_value_is_an_outlier_and_barely_moves_the_baseline() {
        let config = BaselineConfig::default();
        let mut baseline = MetricBaseline::default();
        for i in 0..200 {
            baseline.update(noisy(98.0, 1.0, i), &config);
        }
        let before = baseline.mean(&config).unwrap();

        let finding = baseline.update(160.0, &config);
        assert!(
            matches!(finding, Some(Finding::Outlier { .. })),
            "{finding:?}"
        );
        let after = baseline.mean(&config).unwrap();
        assert!((after - before).abs() < 0.1, "{before} -> {after}");
    }

    /// A patient's own signal: Gaussian-like noise (a sum of uniform draws) around a level,
    /// rounded to whole units, as the simulated monitors send it.
    fn physiological(level: f64, sd: f64, i: u64) -> f64 {
        let sum: f64 = (0..4).map(|k| noisy(0.0, 1.0, i * 4 + k)).sum();
        (level + sd * sum * 0.87).round()
    }

    #[test]
    fn a_patients_own_noise_is_not_rough_but_made_up_values_are() {
        let config = BaselineConfig::default();
        let mut roughness = RoughnessTracker::default();
        let floor = config.min_relative_spread * 76.0;
        let healthy = (0..20_000)
            .filter(|i| {
                roughness
                    .update(physiological(76.0, 1.5, *i), floor, &config)
                    .is_some()
            })
            .count();
        assert_eq!(healthy, 0, "reports on the patient's own signal");

        // Uniform noise of +-10 % around the same level, as a stolen key might send.
        let found_after = (0..200u64)
            .position(|i| {
                let spoofed = (76.0 + 7.6 * 2.0 * (noisy(0.0, 1.0, 99_991 * i + 7))).round();
                roughness.update(spoofed, floor, &config).is_some()
            })
            .expect("made-up values are found");
        assert!(found_after < 20, "found after {found_after} readings");
    }

    #[test]
    fn a_flood_is_reported_once_per_second() {
        let config = BaselineConfig::default();
        let mut rate = RateTracker::default();
        for second in 0..60 {
            assert!(rate.update(second * 1000, &config).is_none());
        }
        let reports = (0..200)
            .filter(|i| rate.update(60_000 + i * 5, &config).is_some())
            .count();
        assert_eq!(reports, 1);
    }

    #[test]
    fn a_clock_offset_jump_is_reported_but_not_network_jitter() {
        let config = BaselineConfig::default();
        let mut offset = OffsetTracker::default();
        for i in 0..200 {
            assert!(offset.update(40 + (i % 7) * 10, &config).is_none());
        }
        assert!(
            offset.update(400, &config).is_none(),
            "one slow packet is jitter"
        );
        let reports: Vec<_> = (0..5)
            .filter_map(|_| offset.update(7_000, &config))
            .collect();
        assert_eq!(reports.len(), 1);
    }
}
