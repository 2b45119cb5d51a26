//! Streaming anomaly detectors: one value at a time, bounded memory, no look-ahead.
//!
//! Every detector allocates its buffers when built and never afterwards, and each update
//! costs O(window), so one instance can run per device and metric.

/// A detector that turns a stream of values into anomaly scores in [0, 1].
pub trait StreamingDetector {
    /// Consumes the next value and returns its anomaly score in [0, 1].
    fn update(&mut self, value: f64) -> f64;
}

/// A fixed-capacity FIFO of the most recent values.
#[derive(Debug, Clone)]
struct Ring {
    values: Vec<f64>,
    next: usize,
    capacity: usize,
}

impl Ring {
    fn new(capacity: usize) -> Self {
        Self {
            values: Vec::with_capacity(capacity),
            next: 0,
            capacity: capacity.max(1),
        }
    }

    fn len(&self) -> usize {
        self.values.len()
    }

    fn is_full(&self) -> bool {
        self.values.len() == self.capacity
    }

    /// Stores `value`, returning the value it evicts once full.
    fn push(&mut self, value: f64) -> Option<f64> {
        if !self.is_full() {
            self.values.push(value);
            return None;
        }

        let evicted = std::mem::replace(&mut self.values[self.next], value);
        self.next = (self.next + 1) % self.capacity;
        Some(evicted)
    }

    /// The values, in no particular order.
    fn as_slice(&self) -> &[f64] {
        &self.values
    }
}

/// The reference rolling z-score of the NAB test corpus README, kept to check the scorer.
///
/// For each value: the previous `window` values (at least `min_history`, else z = 0) give a
/// mean and a sample standard deviation; z = |value - mean| / (std + 1e-9) and the score is
/// z / (1 + z).
#[derive(Debug, Clone)]
pub struct RollingZScore {
    history: Ring,
    min_history: usize,
}

impl RollingZScore {
    /// A rolling z-score over the previous `window` values, silent below `min_history`.
    pub fn new(window: usize, min_history: usize) -> Self {
        Self {
            history: Ring::new(window),
            min_history,
        }
    }
}

impl Default for RollingZScore {
    /// The README's definition: 500 previous values, at least 20.
    fn default() -> Self {
        Self::new(500, 20)
    }
}

impl StreamingDetector for RollingZScore {
    fn update(&mut self, value: f64) -> f64 {
        let z = if self.history.len() >= self.min_history {
            let (mean, std) = mean_and_sample_std(self.history.as_slice());
            (value - mean).abs() / (std + 1e-9)
        } else {
            0.0
        };

        self.history.push(value);
        z / (1.0 + z)
    }
}

/// Two-pass mean and sample standard deviation, exact enough to reproduce reference scores.
fn mean_and_sample_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let squares: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();

    (mean, (squares / (n - 1.0)).sqrt())
}

/// Tuning of the [`Vigil`] detector. The defaults are generic, not fitted per series.
#[derive(Debug, Clone, PartialEq)]
pub struct VigilConfig {
    /// Values in the sliding baselines of levels, steps and cycle differences.
    pub window: usize,
    /// Values in the second, slower level baseline, which still sees a change that the
    /// `window` baseline has started to absorb.
    pub slow_window: usize,
    /// Values seen before any score is emitted, and surprises each record detector watches
    /// before it reports, so the baselines and past maxima are meaningful.
    pub warmup: usize,
    /// Longest cycle, in values, that the detector looks for.
    pub max_period: usize,
    /// Autocorrelation a cycle needs before values are compared with earlier cycles.
    pub min_period_strength: f64,
    /// Updates per autocorrelation lag computed, to spread the period search thinly.
    pub period_stride: usize,
    /// Exponent of the cycle's autocorrelation in the weight of the cycle detectors: the
    /// weaker the cycle, the more clearly it must break to alarm (0 trusts every cycle).
    pub cycle_trust: f64,
    /// Past surprises whose maximum a new surprise is compared with.
    pub record_window: usize,
    /// Surprises averaged by the sustained-change detectors.
    pub short_window: usize,
    /// Smallest past maximum trusted, so a calm stream's first wobble is not a huge record.
    pub min_surprise: f64,
    /// Most that one surprise raises the bar of its record detector, as a multiple of the
    /// past maximum, so one huge anomaly does not hide the next, smaller one.
    pub record_cap: f64,
    /// Updates during which a score must beat every earlier one to count fully.
    pub suppression: usize,
    /// Factor applied to scores that do not beat the recent maximum.
    pub damping: f64,
}

impl Default for VigilConfig {
    fn default() -> Self {
        Self {
            window: 200,
            slow_window: 400,
            warmup: 150,
            max_period: 400,
            min_period_strength: 0.3,
            period_stride: 2,
            cycle_trust: 0.2,
            record_window: 2000,
            short_window: 30,
            min_surprise: 0.05,
            record_cap: 3.0,
            suppression: 150,
            damping: 0.5,
        }
    }
}

/// Vigil's streaming detector.
///
/// Three predictors each give a surprise, a z-score of the new value against recent history:
///
/// - level: distance to the median of the last `window` values, in robust standard deviations
///   (1.4826 × MAD), so the spikes of a heavy-tailed stream do not inflate its own baseline;
///   the larger of this and the same distance over the last `slow_window` values, so a change
///   still counts once the short baseline has begun to absorb it;
/// - step: the change from the previous value against the mean and deviation of recent steps;
/// - cycle: once the autocorrelation shows a cycle, the difference from the mean of the values
///   one and two cycles back, against recent such differences.
///
/// Five record detectors watch these surprises (see [`RECORDS`]): the single level and cycle
/// surprises (spikes, broken cycles) and the means of the last `short_window` surprises of all
/// three (sustained changes such as a level shift, a flattened cycle or a noisier stream). A
/// record detector reports the ratio of the surprise to the largest surprise of its last
/// `record_window` updates, so a heavy-tailed stream must beat its own worst bursts to alarm;
/// an alarm raises that bar at most `record_cap` times, so the next anomaly is still seen.
/// A record detector is silent for its first `warmup` surprises (the cycle detectors start
/// late, when a cycle is found), and the cycle detectors' ratios are weighted by the cycle's
/// autocorrelation to the power `cycle_trust`, as a weak cycle predicts less.
/// The score is r / (1 + r) for the largest ratio r (r > 1 is a new record), damped while it
/// does not beat the scores of the last `suppression` updates, so an event alarms once.
///
/// Each update is O(`window` + `slow_window` + `max_period` + `suppression` +
/// `short_window`) and allocation-free.
#[derive(Debug, Clone)]
pub struct Vigil {
    config: VigilConfig,
    history: History,
    periodicity: Periodicity,
    levels: RobustStats,
    slow_levels: RobustStats,
    steps: RunningStats,
    cycles: RunningStats,
    /// The record detectors of [`RECORDS`], in order.
    records: [Record; RECORDS.len()],
    recent_scores: Ring,
    seen: usize,
}

/// Baselines need this many values before their deviation is trusted.
const MIN_BASELINE: usize = 20;

/// Where each record detector looks: the surprise it watches and whether it averages the last
/// `short_window` surprises (`true`) or takes each one alone. A single step is not watched:
/// a spike already shows as a level surprise, and lone steps of noisy streams only added
/// false alarms.
const RECORDS: [(Surprise, bool); 5] = [
    (Surprise::Level, false),
    (Surprise::Level, true),
    (Surprise::Step, true),
    (Surprise::Cycle, false),
    (Surprise::Cycle, true),
];

/// The predictors whose surprises the record detectors watch.
#[derive(Debug, Clone, Copy)]
enum Surprise {
    Level,
    Step,
    Cycle,
}

impl Vigil {
    /// A detector with the given tuning.
    pub fn new(config: VigilConfig) -> Self {
        let max_period = config.max_period.max(2);
        Self {
            history: History::new((3 * max_period + 1).max(2 * max_period + MIN_BASELINE)),
            periodicity: Periodicity::new(max_period),
            levels: RobustStats::new(config.window),
            slow_levels: RobustStats::new(config.slow_window),
            steps: RunningStats::new(config.window),
            cycles: RunningStats::new(config.window),
            records: RECORDS.map(|(_, sustained)| {
                let averaged = if sustained { config.short_window } else { 1 };
                Record::new(config.record_window, averaged, &config)
            }),
            recent_scores: Ring::new(config.suppression),
            seen: 0,
            config,
        }
    }
}

impl Default for Vigil {
    fn default() -> Self {
        Self::new(VigilConfig::default())
    }
}

impl StreamingDetector for Vigil {
    fn update(&mut self, value: f64) -> f64 {
        // A missing or corrupt reading carries no evidence and must not poison the baselines.
        if !value.is_finite() {
            return 0.0;
        }

        let step = self.history.get(0).map(|p| value - p);
        let cycle = self
            .periodicity
            .period
            .and_then(|p| self.cycle_residual(value, p));
        let ratio = self.record_ratio(value, step, cycle);

        self.levels.push(value);
        self.slow_levels.push(value);
        if let Some(step) = step {
            self.steps.push(step);
        }
        if let Some(cycle) = cycle {
            self.cycles.push(cycle);
        }
        self.history.push(value);
        if self.seen.is_multiple_of(self.config.period_stride.max(1)) {
            self.periodicity
                .step(self.history.window(), self.config.min_period_strength);
        }
        self.seen += 1;

        self.suppress(ratio / (1.0 + ratio))
    }
}

impl Vigil {
    /// The difference between `value` and the mean of the values one and two periods back.
    fn cycle_residual(&self, value: f64, period: usize) -> Option<f64> {
        let one = self.history.get(period - 1)?;
        let expected = match self.history.get(2 * period - 1) {
            Some(two) => (one + two) / 2.0,
            None => one,
        };
        Some(value - expected)
    }

    /// The largest record ratio of the detectors (0 during warm-up, though the records keep
    /// learning).
    fn record_ratio(&mut self, value: f64, step: Option<f64>, cycle: Option<f64>) -> f64 {
        let level = Some(
            self.levels
                .z_score(value)
                .max(self.slow_levels.z_score(value)),
        );
        let step = step.map(|s| self.steps.z_score(s));
        let cycle = cycle.map(|c| self.cycles.z_score(c));
        let cycle_weight = self
            .periodicity
            .strength
            .clamp(0.0, 1.0)
            .powf(self.config.cycle_trust);

        let mut ratio: f64 = 0.0;
        for (record, (source, _)) in self.records.iter_mut().zip(RECORDS) {
            let (surprise, weight) = match source {
                Surprise::Level => (level, 1.0),
                Surprise::Step => (step, 1.0),
                Surprise::Cycle => (cycle, cycle_weight),
            };
            if let Some(surprise) = surprise {
                ratio = ratio.max(weight * record.update(surprise));
            }
        }

        if self.seen < self.config.warmup {
            return 0.0;
        }
        ratio
    }

    /// A score counts fully only if it beats every score of the last `suppression` updates:
    /// NAB rewards the first detection of an anomaly and charges every extra alarm, and an
    /// operator wants one alert per event, not one per reading.
    fn suppress(&mut self, score: f64) -> f64 {
        let peak = self
            .recent_scores
            .as_slice()
            .iter()
            .copied()
            .fold(0.0, f64::max);
        self.recent_scores.push(score);

        if score > peak {
            score
        } else {
            score * self.config.damping
        }
    }
}

/// Surprise relative to the largest surprise of the recent past: a scale-free measure, so a
/// heavy-tailed stream, whose past already holds large surprises, alarms only on a clear
/// record, and a level shift alarms once rather than for as long as it lasts.
#[derive(Debug, Clone)]
struct Record {
    maxima: SlidingMax,
    recent: Ring,
    min_surprise: f64,
    cap: f64,
    /// Surprises to watch before reporting, and how many were watched (up to that).
    warmup: usize,
    watched: usize,
}

impl Record {
    /// Compares the mean of the last `averaged` surprises with their maximum over `window`.
    fn new(window: usize, averaged: usize, config: &VigilConfig) -> Self {
        Self {
            maxima: SlidingMax::new(window),
            recent: Ring::new(averaged),
            min_surprise: config.min_surprise,
            cap: config.record_cap,
            warmup: config.warmup,
            watched: 0,
        }
    }

    /// Records `surprise` and returns the ratio of the recent mean to its past maximum, or 0
    /// while the past is still too short to hold a representative maximum.
    fn update(&mut self, surprise: f64) -> f64 {
        self.recent.push(surprise);
        let recent = self.recent.as_slice();
        let value = recent.iter().sum::<f64>() / recent.len() as f64;

        let Some(past) = self.maxima.max() else {
            self.maxima.push(value);
            return 0.0;
        };
        let past = past.max(self.min_surprise);
        self.maxima.push(value.min(past * self.cap));

        self.watched = (self.watched + 1).min(self.warmup);
        if self.watched < self.warmup {
            return 0.0;
        }
        value / past
    }
}

/// Maximum of the last `capacity` values: a monotonic queue, O(1) amortised per update.
#[derive(Debug, Clone)]
struct SlidingMax {
    times: Vec<usize>,
    values: Vec<f64>,
    head: usize,
    len: usize,
    now: usize,
}

impl SlidingMax {
    fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            times: vec![0; capacity],
            values: vec![0.0; capacity],
            head: 0,
            len: 0,
            now: 0,
        }
    }

    fn max(&self) -> Option<f64> {
        (self.len > 0).then(|| self.values[self.head])
    }

    fn push(&mut self, value: f64) {
        let capacity = self.values.len();

        // Older values no larger than the new one can never be the maximum again.
        while self.len > 0 {
            let back = (self.head + self.len - 1) % capacity;
            if self.values[back] > value {
                break;
            }
            self.len -= 1;
        }
        let slot = (self.head + self.len) % capacity;
        self.times[slot] = self.now;
        self.values[slot] = value;
        self.len += 1;
        self.now += 1;

        // The oldest candidate leaves once it is `capacity` updates old.
        if self.now - self.times[self.head] > capacity {
            self.head = (self.head + 1) % capacity;
            self.len -= 1;
        }
    }
}

/// The most recent values in arrival order, stored twice so the window is one contiguous
/// slice (no modular indexing in the autocorrelation loop).
#[derive(Debug, Clone)]
struct History {
    values: Vec<f64>,
    capacity: usize,
    newest: usize,
    len: usize,
}

impl History {
    fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            values: vec![0.0; 2 * capacity],
            capacity,
            newest: capacity - 1,
            len: 0,
        }
    }

    fn push(&mut self, value: f64) {
        self.newest = (self.newest + 1) % self.capacity;
        self.values[self.newest] = value;
        self.values[self.newest + self.capacity] = value;
        self.len = (self.len + 1).min(self.capacity);
    }

    /// The value `lag` updates ago (0 is the newest).
    fn get(&self, lag: usize) -> Option<f64> {
        (lag < self.len).then(|| self.values[self.newest + self.capacity - lag])
    }

    /// The stored values, oldest first.
    fn window(&self) -> &[f64] {
        let end = self.newest + self.capacity + 1;
        &self.values[end - self.len..end]
    }
}

/// Finds the dominant cycle from the autocorrelation of the recent values, one lag per call
/// so each update stays O(history).
#[derive(Debug, Clone)]
struct Periodicity {
    acf: Vec<f64>,
    next_lag: usize,
    period: Option<usize>,
    /// The autocorrelation at `period` when it was elected (0 without a period).
    strength: f64,
}

impl Periodicity {
    fn new(max_period: usize) -> Self {
        Self {
            acf: vec![0.0; max_period + 1],
            next_lag: 1,
            period: None,
            strength: 0.0,
        }
    }

    /// Computes the autocorrelation at the next lag; after the last lag, re-elects the period.
    /// While the window is too short for the next lag, waits: the first election then comes
    /// as soon as every lag can be measured.
    fn step(&mut self, window: &[f64], min_strength: f64) {
        let lag = self.next_lag;
        if window.len() < 2 * lag + MIN_BASELINE {
            return;
        }
        self.acf[lag] = autocorrelation(window, lag);

        self.next_lag += 1;
        if self.next_lag == self.acf.len() {
            self.next_lag = 1;
            self.period = self.elect(min_strength);
            self.strength = self.period.map_or(0.0, |p| self.acf[p]);
        }
    }

    /// The highest autocorrelation peak after the first zero crossing, if strong enough:
    /// before the crossing, high values only say that neighbours are alike.
    fn elect(&self, min_strength: f64) -> Option<usize> {
        let crossing = self.acf.iter().skip(1).position(|&r| r <= 0.0)? + 1;

        let (lag, strength) = self.acf.iter().copied().enumerate().skip(crossing).fold(
            (0, f64::NEG_INFINITY),
            |best, (lag, r)| {
                if r > best.1 { (lag, r) } else { best }
            },
        );
        (strength >= min_strength).then_some(lag)
    }
}

/// Sample autocorrelation of `values` at `lag`; 0 when fewer than two cycles are available.
fn autocorrelation(values: &[f64], lag: usize) -> f64 {
    let n = values.len();
    if n < 2 * lag + MIN_BASELINE {
        return 0.0;
    }

    let mean = values.iter().sum::<f64>() / n as f64;
    let variance: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
    if variance <= 0.0 {
        return 0.0;
    }

    let covariance: f64 = values[lag..]
        .iter()
        .zip(values)
        .map(|(a, b)| (a - mean) * (b - mean))
        .sum();
    covariance / variance
}

/// Mean and standard deviation of the last `capacity` values, from running sums.
///
/// The sums are taken relative to a shift near the mean, and rebuilt from the window once per
/// `capacity` updates, so cancellation and drift stay bounded on endless streams.
#[derive(Debug, Clone)]
struct RunningStats {
    ring: Ring,
    shift: f64,
    sum: f64,
    sum_squares: f64,
    since_rebuild: usize,
}

impl RunningStats {
    fn new(capacity: usize) -> Self {
        Self {
            ring: Ring::new(capacity),
            shift: 0.0,
            sum: 0.0,
            sum_squares: 0.0,
            since_rebuild: 0,
        }
    }

    fn push(&mut self, value: f64) {
        if self.ring.len() == 0 {
            self.shift = value;
        }

        if let Some(old) = self.ring.push(value) {
            let d = old - self.shift;
            self.sum -= d;
            self.sum_squares -= d * d;
        }
        let d = value - self.shift;
        self.sum += d;
        self.sum_squares += d * d;

        self.since_rebuild += 1;
        if self.since_rebuild >= self.ring.capacity {
            self.rebuild();
        }
    }

    /// Recomputes the sums around the current mean.
    fn rebuild(&mut self) {
        let values = self.ring.as_slice();
        self.shift = values.iter().sum::<f64>() / values.len() as f64;
        self.sum = values.iter().map(|v| v - self.shift).sum();
        self.sum_squares = values
            .iter()
            .map(|v| (v - self.shift) * (v - self.shift))
            .sum();
        self.since_rebuild = 0;
    }

    /// |value - mean| / (sample std + tiny floor), 0 until the baseline is long enough.
    fn z_score(&self, value: f64) -> f64 {
        let n = self.ring.len();
        if n < MIN_BASELINE {
            return 0.0;
        }

        let n = n as f64;
        let mean_offset = self.sum / n;
        let variance = ((self.sum_squares - n * mean_offset * mean_offset) / (n - 1.0)).max(0.0);
        let mean = self.shift + mean_offset;

        // The floor keeps constant streams finite while any real change still scores high.
        let floor = 1e-12 * (mean.abs() + 1.0);
        (value - mean).abs() / (variance.sqrt() + floor)
    }
}

/// Median and median absolute deviation (MAD) of the last `capacity` values.
///
/// Each z-score selects in a scratch copy of the window: O(capacity), no allocation.
#[derive(Debug, Clone)]
struct RobustStats {
    ring: Ring,
    scratch: Vec<f64>,
}

/// MAD × this estimates the standard deviation of normal data.
const MAD_TO_STD: f64 = 1.4826;

impl RobustStats {
    fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            ring: Ring::new(capacity),
            scratch: Vec::with_capacity(capacity),
        }
    }

    fn push(&mut self, value: f64) {
        self.ring.push(value);
    }

    /// |value - median| / (1.4826 MAD + tiny floor), 0 until the baseline is long enough.
    fn z_score(&mut self, value: f64) -> f64 {
        let n = self.ring.len();
        if n < MIN_BASELINE {
            return 0.0;
        }

        self.scratch.clear();
        self.scratch.extend_from_slice(self.ring.as_slice());
        let median = upper_median(&mut self.scratch);
        for v in &mut self.scratch {
            *v = (*v - median).abs();
        }
        let mad = upper_median(&mut self.scratch);

        // As for the mean baseline, the floor keeps constant streams finite.
        let floor = 1e-12 * (median.abs() + 1.0);
        (value - median).abs() / (MAD_TO_STD * mad + floor)
    }
}

/// The element of rank n / 2 of a non-empty slice, which it partially reorders: O(n).
fn upper_median(values: &mut [f64]) -> f64 {
    let mid = values.len() / 2;
    *values.select_nth_unstable_by(mid, f64::total_cmp).1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_z_score_needs_twenty_values() {
        let mut detector = RollingZScore::default();
        for i in 0..20 {
            assert_eq!(detector.update(f64::from(i % 2)), 0.0);
        }

        let score = detector.update(10.0);
        assert!(score > 0.9 && score < 1.0);
    }

    #[test]
    fn running_stats_match_two_pass_after_eviction_and_rebuild() {
        let mut stats = RunningStats::new(50);
        let values: Vec<f64> = (0..237).map(|i| 1e6 + f64::from(i % 17) * 0.25).collect();
        for &v in &values {
            stats.push(v);
        }

        let (mean, std) = mean_and_sample_std(&values[values.len() - 50..]);
        let expected = (1e6 + 3.0 - mean).abs() / std;
        assert!((stats.z_score(1e6 + 3.0) - expected).abs() < 1e-5 * expected);
    }

    #[test]
    fn robust_stats_ignore_outliers_in_their_window() {
        let mut stats = RobustStats::new(50);
        for i in 0..120 {
            // Median 2, MAD 1 (values 1, 2, 3 in equal shares), plus a few huge outliers.
            let value = if i % 40 == 0 {
                1e6
            } else {
                f64::from(1 + i % 3)
            };
            stats.push(value);
        }

        assert!((stats.z_score(2.0 + MAD_TO_STD * 4.0) - 4.0).abs() < 1e-9);
    }

    #[test]
    fn sliding_max_forgets_values_older_than_its_window() {
        let mut maxima = SlidingMax::new(3);
        assert_eq!(maxima.max(), None);

        for (value, expected) in [(5.0, 5.0), (1.0, 5.0), (2.0, 5.0), (0.5, 2.0), (0.1, 2.0)] {
            maxima.push(value);
            assert_eq!(maxima.max(), Some(expected));
        }
        maxima.push(0.2);
        assert_eq!(maxima.max(), Some(0.5));
    }

    #[test]
    fn history_reads_lags_and_keeps_arrival_order() {
        let mut history = History::new(4);
        for i in 0..6 {
            history.push(f64::from(i));
        }

        assert_eq!(history.window(), &[2.0, 3.0, 4.0, 5.0]);
        assert_eq!(history.get(0), Some(5.0));
        assert_eq!(history.get(3), Some(2.0));
        assert_eq!(history.get(4), None);
    }

    #[test]
    fn periodicity_finds_the_cycle_of_a_noisy_wave() {
        let mut history = History::new(3 * 60 + 1);
        let mut periodicity = Periodicity::new(60);
        for i in 0..2000 {
            let phase = f64::from(i % 24) / 24.0 * std::f64::consts::TAU;
            history.push(phase.sin() + 0.1 * f64::from((i * 7919) % 13) / 13.0);
            periodicity.step(history.window(), 0.3);
        }

        assert_eq!(periodicity.period, Some(24));
    }

    #[test]
    fn periodicity_elects_once_every_lag_can_be_measured() {
        let mut history = History::new(3 * 60 + 1);
        let mut periodicity = Periodicity::new(60);
        for i in 0..2 * 60 + MIN_BASELINE {
            let phase = (i % 24) as f64 / 24.0 * std::f64::consts::TAU;
            history.push(phase.sin());
            periodicity.step(history.window(), 0.3);
        }

        assert_eq!(periodicity.period, Some(24));
        assert!(periodicity.strength > 0.3);
    }

    #[test]
    fn vigil_flags_a_broken_cycle() {
        let mut detector = Vigil::default();
        let wave = |i: u32| if i % 48 < 24 { 10.0 } else { 0.0 };
        let regular: Vec<f64> = (0..2000).map(|i| detector.update(wave(i))).collect();
        let flat: Vec<f64> = (2000..2048).map(|_| detector.update(5.0)).collect();

        let regular_peak = regular[1000..].iter().copied().fold(0.0, f64::max);
        let flat_peak = flat.iter().copied().fold(0.0, f64::max);
        assert!(flat_peak > 0.6, "flattened cycle scored {flat_peak}");
        assert!(regular_peak < 0.5, "regular cycle scored {regular_peak}");
    }

    #[test]
    fn vigil_alarms_once_on_a_level_shift() {
        let mut detector = Vigil::default();
        let quiet: Vec<f64> = (0..400)
            .map(|i| detector.update(10.0 + f64::from(i % 7) * 0.1))
            .collect();
        let shifted: Vec<f64> = (0..50)
            .map(|i| detector.update(20.0 + f64::from(i % 7) * 0.1))
            .collect();

        let quiet_peak = quiet.iter().copied().fold(0.0, f64::max);
        assert!(quiet_peak < 0.9, "quiet stream scored {quiet_peak}");
        assert!(shifted[0] > 0.95, "shift scored {}", shifted[0]);

        // Later readings of the new level do not beat the first alarm, so they are damped.
        assert!(shifted[1..].iter().all(|&s| s < shifted[0]));
    }

    #[test]
    fn vigil_scores_stay_in_unit_interval() {
        let mut detector = Vigil::default();
        for i in 0..2000 {
            let value = match i {
                500 => f64::NAN,
                900..=950 => 1e12,
                _ => 5.0,
            };
            let score = detector.update(value);
            assert!((0.0..=1.0).contains(&score), "score {score} at {i}");
        }
    }
}
