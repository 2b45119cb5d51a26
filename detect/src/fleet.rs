//! The fleet model: how each metric of a device class usually behaves, learnt from stored
//! history with linfa, and a check for readings copied from elsewhere.
//!
//! A device's readings of one metric are cut into windows of `window_readings` values; each
//! window becomes a few shape features that do not depend on the patient's own level (spread,
//! smoothness, roughness, repeats). For every (class, metric), k-means (linfa) clusters the
//! standardised features of the stored windows of `active` devices; a live window whose
//! distance to the nearest centre is beyond the training windows' own high quantile is unlike
//! the class. That catches a stolen key sending well-signed, plausible-looking but synthetic
//! values: a constant, uniform noise, a replayed loop.
//!
//! The copy check hashes each window's exact values. Real sensors with noise practically
//! never produce the same window twice; a repeat (on another device or the same one) means
//! the readings were copied. Windows with few distinct values carry too little information
//! and are not hashed. The table of recent hashes has a fixed size.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use linfa::DatasetBase;
use linfa::traits::Fit;
use linfa_clustering::KMeans;
use ndarray::Array2;
use serde::Deserialize;

/// Number of shape features per window.
pub const FEATURES: usize = 4;
/// Names of the features, in order, as they appear in alerts.
pub const FEATURE_NAMES: [&str; FEATURES] =
    ["log_spread", "lag1_autocorr", "log_roughness", "repeats"];

/// Tuning of the fleet model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// Values per feature window.
    pub window_readings: usize,
    /// Clusters per (class, metric) model, at most.
    pub clusters: usize,
    /// Windows a (class, metric) needs before a model is trained for it.
    pub min_training_windows: usize,
    /// Quantile of the training windows' distances used as the limit.
    pub limit_quantile: f64,
    /// Factor on that quantile: a live window must be this much further out to count.
    pub limit_factor: f64,
    /// Distinct values a window needs before its hash is compared (the copy check).
    pub min_distinct_for_copy: usize,
    /// Recent window hashes kept for the copy check.
    pub copy_table_size: usize,
    /// Seconds between retrainings from stored history.
    pub retrain_interval_s: u64,
    /// Minutes of stored history used for training.
    pub training_history_min: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            window_readings: 32,
            clusters: 3,
            min_training_windows: 20,
            limit_quantile: 0.995,
            limit_factor: 1.5,
            min_distinct_for_copy: 8,
            copy_table_size: 200_000,
            retrain_interval_s: 300,
            training_history_min: 60,
        }
    }
}

/// The shape features of one window of values.
pub fn window_features(values: &[f64]) -> Option<[f64; FEATURES]> {
    let n = values.len();
    if n < 4 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
    let scale = mean.abs().max(1e-9);
    let spread = variance.sqrt();

    let mut lagged = 0.0;
    let mut differences = 0.0;
    let mut repeats = 0usize;
    for pair in values.windows(2) {
        lagged += (pair[0] - mean) * (pair[1] - mean);
        differences += (pair[1] - pair[0]).powi(2);
        if pair[1] == pair[0] {
            repeats += 1;
        }
    }
    let autocorrelation = if variance > 0.0 {
        lagged / (n as f64 - 1.0) / variance
    } else {
        1.0
    };
    let roughness = (differences / (n as f64 - 1.0)).sqrt();

    Some([
        (spread / scale + 1e-4).ln(),
        autocorrelation,
        (roughness / scale + 1e-4).ln(),
        repeats as f64 / (n as f64 - 1.0),
    ])
}

/// A trained model of one (class, metric).
#[derive(Debug, Clone)]
pub struct MetricModel {
    mean: [f64; FEATURES],
    scale: [f64; FEATURES],
    centroids: Vec<[f64; FEATURES]>,
    limit: f64,
    pub trained_windows: usize,
}

/// What the model says of one window.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetVerdict {
    pub distance: f64,
    pub limit: f64,
    /// Per feature: observed, the nearest centre's value, and the distance in spreads.
    pub features: [(f64, f64, f64); FEATURES],
}

impl MetricModel {
    /// Trains on feature rows; `None` when there are too few or k-means fails.
    pub fn train(rows: &[[f64; FEATURES]], config: &FleetConfig) -> Option<Self> {
        if rows.len() < config.min_training_windows.max(2) {
            return None;
        }
        let n = rows.len() as f64;
        let mut mean = [0.0; FEATURES];
        let mut scale = [0.0; FEATURES];
        for row in rows {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v / n;
            }
        }
        for row in rows {
            for ((s, v), m) in scale.iter_mut().zip(row).zip(&mean) {
                *s += (v - m).powi(2) / n;
            }
        }
        for s in &mut scale {
            *s = s.sqrt().max(0.05);
        }

        let standardised: Vec<f64> = rows
            .iter()
            .flat_map(|row| standardise(row, &mean, &scale))
            .collect();
        let records = Array2::from_shape_vec((rows.len(), FEATURES), standardised).ok()?;
        let clusters = config.clusters.clamp(1, rows.len() / 10 + 1);
        let dataset = DatasetBase::from(records.clone());
        let fitted = KMeans::params(clusters)
            .max_n_iterations(100)
            .tolerance(1e-4)
            .fit(&dataset)
            .ok()?;
        let centroids: Vec<[f64; FEATURES]> = fitted
            .centroids()
            .rows()
            .into_iter()
            .map(|row| std::array::from_fn(|i| row[i]))
            .collect();

        let mut distances: Vec<f64> = records
            .rows()
            .into_iter()
            .map(|row| {
                let point: [f64; FEATURES] = std::array::from_fn(|i| row[i]);
                nearest(&centroids, &point).1
            })
            .collect();
        distances.sort_by(f64::total_cmp);
        let index = ((distances.len() - 1) as f64 * config.limit_quantile).round() as usize;
        let limit = distances[index.min(distances.len() - 1)].max(0.5) * config.limit_factor;

        Some(Self {
            mean,
            scale,
            centroids,
            limit,
            trained_windows: rows.len(),
        })
    }

    /// Scores one window's features; `Some` when the window is unlike the class.
    pub fn judge(&self, features: &[f64; FEATURES]) -> Option<FleetVerdict> {
        let point = standardise(features, &self.mean, &self.scale);
        let (index, distance) = nearest(&self.centroids, &point);
        if distance <= self.limit {
            return None;
        }
        let centre = self.centroids[index];
        Some(FleetVerdict {
            distance,
            limit: self.limit,
            features: std::array::from_fn(|i| {
                let expected = centre[i] * self.scale[i] + self.mean[i];
                (features[i], expected, point[i] - centre[i])
            }),
        })
    }
}

fn standardise(
    row: &[f64; FEATURES],
    mean: &[f64; FEATURES],
    scale: &[f64; FEATURES],
) -> [f64; FEATURES] {
    std::array::from_fn(|i| (row[i] - mean[i]) / scale[i])
}

fn nearest(centroids: &[[f64; FEATURES]], point: &[f64; FEATURES]) -> (usize, f64) {
    centroids
        .iter()
        .enumerate()
        .map(|(index, centre)| {
            let squared: f64 = centre.iter().zip(point).map(|(c, p)| (c - p).powi(2)).sum();
            (index, squared.sqrt())
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((0, f64::INFINITY))
}

/// The models of every (class, metric), replaced as a whole on retraining.
#[derive(Debug, Clone, Default)]
pub struct FleetModel {
    models: HashMap<(String, String), MetricModel>,
}

impl FleetModel {
    /// Trains one model per (class, metric) from windows of stored values.
    ///
    /// `series` gives, per (class, metric), the values of each device in seq order.
    pub fn train(series: &HashMap<(String, String), Vec<Vec<f64>>>, config: &FleetConfig) -> Self {
        let window = config.window_readings.max(4);
        let models = series
            .iter()
            .filter_map(|(key, devices)| {
                let rows: Vec<[f64; FEATURES]> = devices
                    .iter()
                    .flat_map(|values| values.chunks_exact(window))
                    .filter_map(window_features)
                    .collect();
                MetricModel::train(&rows, config).map(|model| (key.clone(), model))
            })
            .collect();
        Self { models }
    }

    pub fn get(&self, class: &str, metric: &str) -> Option<&MetricModel> {
        self.models.get(&(class.to_owned(), metric.to_owned()))
    }

    /// Number of (class, metric) models.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

/// Recent window hashes, to find readings copied from another device or from the past.
#[derive(Debug)]
pub struct CopyTable {
    owners: HashMap<u64, Arc<str>>,
    order: std::collections::VecDeque<u64>,
    capacity: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl CopyTable {
    pub fn new(capacity: usize) -> Self {
        Self {
            owners: HashMap::new(),
            order: std::collections::VecDeque::new(),
            capacity: capacity.max(1),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Records the window of `metric` from `device`; returns the device that sent the same
    /// values before (possibly `device` itself), if any.
    pub fn check(
        &mut self,
        device: &Arc<str>,
        metric: &str,
        values: &[f64],
        min_distinct: usize,
    ) -> Option<Arc<str>> {
        if distinct_values(values) < min_distinct {
            return None;
        }
        let mut hasher = self.hasher.build_hasher();
        hasher.write(metric.as_bytes());
        for value in values {
            hasher.write_u64(value.to_bits());
        }
        let hash = hasher.finish();

        if let Some(owner) = self.owners.get(&hash) {
            return Some(owner.clone());
        }
        self.owners.insert(hash, device.clone());
        self.order.push_back(hash);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.owners.remove(&old);
            }
        }
        None
    }
}

fn distinct_values(values: &[f64]) -> usize {
    let mut bits: Vec<u64> = values.iter().map(|v| v.to_bits()).collect();
    bits.sort_unstable();
    bits.dedup();
    bits.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth, noisy, quantised vital sign like a real sensor's.
    fn realistic(seed: u64, n: usize) -> Vec<f64> {
        let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let mut walk = 0.0;
        (0..n)
            .map(|_| {
                walk = 0.95 * walk + 1.5 * next();
                (70.0 + 3.0 * walk + next()).round()
            })
            .collect()
    }

    fn trained() -> (MetricModel, FleetConfig) {
        let config = FleetConfig::default();
        let rows: Vec<_> = (0..200)
            .map(|seed| window_features(&realistic(seed, 32)).unwrap())
            .collect();
        (MetricModel::train(&rows, &config).unwrap(), config)
    }

    #[test]
    fn healthy_windows_pass_and_synthetic_ones_do_not() {
        let (model, _) = trained();
        let passed = (1_000..1_200)
            .filter(|&seed| {
                let features = window_features(&realistic(seed, 32)).unwrap();
                model.judge(&features).is_none()
            })
            .count();
        assert!(passed >= 198, "{passed} of 200 healthy windows passed");

        let constant = vec![72.0; 32];
        assert!(model.judge(&window_features(&constant).unwrap()).is_some());
        let jumpy: Vec<f64> = (0..32)
            .map(|i| if i % 2 == 0 { 60.0 } else { 90.0 })
            .collect();
        assert!(model.judge(&window_features(&jumpy).unwrap()).is_some());
    }

    #[test]
    fn copied_windows_are_found() {
        let mut table = CopyTable::new(1_000);
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        let values = realistic(7, 32);
        assert_eq!(table.check(&a, "heart_rate_bpm", &values, 8), None);
        assert_eq!(
            table.check(&b, "heart_rate_bpm", &realistic(8, 32), 8),
            None
        );
        assert_eq!(table.check(&b, "heart_rate_bpm", &values, 8), Some(a));
        let flat = vec![98.0; 32];
        assert_eq!(table.check(&b, "spo2_pct", &flat, 8), None);
        assert_eq!(table.check(&b, "spo2_pct", &flat, 8), None);
    }
}
