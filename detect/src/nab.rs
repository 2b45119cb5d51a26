//! The Numenta Anomaly Benchmark (NAB v1.1): corpus loading, result files and scoring.
//!
//! The scoring follows NAB's `sweeper.py`, `optimizer.py` and `runner.py` rule for rule:
//! the first 15 % of each series (at most 750 rows) is a probationary period whose detections
//! are ignored, the earliest detection in a window earns a scaled sigmoid of its position,
//! every detection outside a window costs a sigmoid of its distance from the preceding window,
//! one threshold per profile is optimised over the whole corpus, and the total is normalised
//! between the null detector (a constant 0.5) and a perfect one (one true positive per label).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::streaming::{RollingZScore, StreamingDetector, Vigil, VigilConfig};

/// Share of each series that is scored as probationary (NAB's `probationaryPercent`).
const PROBATIONARY_PERCENT: f64 = 0.15;

/// NAB caps the probationary period at 15 % of 5000 rows.
const PROBATIONARY_CAP_ROWS: f64 = 5000.0;

/// NAB starts its sweep above every valid score, so "detect nothing" is always a candidate.
const NO_DETECTION_THRESHOLD: f64 = 1.1;

/// The null detector's constant score; its optimised total is the normalisation baseline.
const NULL_DETECTOR_SCORE: f64 = 0.5;

/// Relative positions further than this past a window score as a plain -1 (NAB's cut-off).
const FAR_PAST_WINDOW: f64 = 3.0;

/// Errors while loading a NAB corpus, running detectors or writing results.
#[derive(Debug, thiserror::Error)]
pub enum NabError {
    /// A file or directory could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (labels or profiles) is malformed.
    #[error("invalid JSON in {path}: {source}")]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// The underlying parse error.
        #[source]
        source: serde_json::Error,
    },

    /// A line of a data file could not be parsed.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The data file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with the line.
        message: String,
    },

    /// The corpus is inconsistent (missing labels, unknown window timestamps, no series...).
    #[error("invalid NAB corpus: {0}")]
    Corpus(String),

    /// A detector produced a score outside [0, 1].
    #[error("detector {detector} gave score {score} at row {row} of {series}")]
    InvalidScore {
        /// The detector's name.
        detector: String,
        /// The series being scored.
        series: String,
        /// The 0-based data row.
        row: usize,
        /// The offending score.
        score: f64,
    },
}

/// Result alias for the NAB benchmark.
pub type Result<T, E = NabError> = std::result::Result<T, E>;

/// The detectors the benchmark can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectorKind {
    /// The reference rolling z-score defined in the test corpus README (a scorer check).
    RollingZScore,
    /// Vigil's streaming detector with its default configuration.
    Vigil,
}

impl DetectorKind {
    /// The detector's name in result file names (NAB forbids `_` in it).
    pub fn name(self) -> &'static str {
        match self {
            Self::RollingZScore => "rollingZScore",
            Self::Vigil => "vigil",
        }
    }

    /// A fresh detector for one series.
    pub fn build(self) -> Box<dyn StreamingDetector> {
        match self {
            Self::RollingZScore => Box::new(RollingZScore::default()),
            Self::Vigil => Box::new(Vigil::new(VigilConfig::default())),
        }
    }
}

/// The cost weights of one NAB application profile.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    /// Profile name, e.g. `standard`.
    pub name: String,
    /// Reward for the earliest detection of a window (scaled so the window start earns it).
    pub tp_weight: f64,
    /// Cost of a missed window.
    pub fn_weight: f64,
    /// Cost of a detection outside any window.
    pub fp_weight: f64,
}

/// One data series with its anomaly windows.
#[derive(Debug, Clone)]
pub struct Series {
    /// Path relative to `data/`, e.g. `realTraffic/speed_6005.csv` (the label key).
    pub name: String,
    /// Timestamps as microseconds since the Unix epoch.
    pub timestamps: Vec<i64>,
    /// Timestamps as written in the data file, echoed into result files.
    pub raw_timestamps: Vec<String>,
    /// The values.
    pub values: Vec<f64>,
    /// Values as written in the data file, echoed into result files.
    pub raw_values: Vec<String>,
    /// Anomaly windows as inclusive `[start, end]` timestamps (microseconds), in time order.
    pub windows: Vec<(i64, i64)>,
}

impl Series {
    /// Rows at the start of the series whose detections NAB ignores.
    pub fn probationary_len(&self) -> usize {
        let rows = self.values.len() as f64;
        let len = (PROBATIONARY_PERCENT * rows)
            .floor()
            .min(PROBATIONARY_PERCENT * PROBATIONARY_CAP_ROWS);

        len.ceil() as usize
    }

    /// NAB's label column: 1 for rows inside a window, else 0.
    pub fn labels(&self) -> Vec<u8> {
        self.timestamps
            .iter()
            .map(|&t| u8::from(self.windows.iter().any(|&(s, e)| s <= t && t <= e)))
            .collect()
    }

    /// The category folder and the file name of the series.
    fn split_name(&self) -> (&str, &str) {
        self.name.rsplit_once('/').unwrap_or(("", &self.name))
    }
}

/// A NAB-layout directory loaded in memory.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// All series, sorted by name.
    pub series: Vec<Series>,
    /// The scoring profiles, `standard` first.
    pub profiles: Vec<Profile>,
}

#[derive(Deserialize)]
struct ProfileFile {
    #[serde(rename = "CostMatrix")]
    cost_matrix: CostMatrix,
}

#[derive(Deserialize)]
struct CostMatrix {
    #[serde(rename = "tpWeight")]
    tp: f64,
    #[serde(rename = "fnWeight")]
    fn_: f64,
    #[serde(rename = "fpWeight")]
    fp: f64,
}

impl Corpus {
    /// Loads `data/<category>/<name>.csv`, `labels/combined_windows.json` and
    /// `config/profiles.json` under `dir` (the point labels are not needed for scoring).
    pub fn load(dir: &Path) -> Result<Self> {
        let windows: BTreeMap<String, Vec<[String; 2]>> =
            read_json(&dir.join("labels/combined_windows.json"))?;
        let profiles = load_profiles(&dir.join("config/profiles.json"))?;

        let mut series = Vec::new();
        for path in data_files(&dir.join("data"))? {
            series.push(load_series(dir, &path, &windows)?);
        }
        if series.is_empty() {
            return Err(NabError::Corpus(format!(
                "no series under {}",
                dir.display()
            )));
        }

        Ok(Self { series, profiles })
    }
}

impl Corpus {
    /// Number of anomaly windows: NAB's perfect detector earns one true positive per window
    /// (its runner counts the entries of the windows file, not of the point labels).
    pub fn window_count(&self) -> usize {
        self.series.iter().map(|s| s.windows.len()).sum()
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(|source| io_error(path, source))?;

    serde_json::from_str(&text).map_err(|source| NabError::Json {
        path: path.into(),
        source,
    })
}

fn io_error(path: &Path, source: std::io::Error) -> NabError {
    NabError::Io {
        path: path.into(),
        source,
    }
}

fn load_profiles(path: &Path) -> Result<Vec<Profile>> {
    let file: BTreeMap<String, ProfileFile> = read_json(path)?;

    let mut profiles: Vec<Profile> = file
        .into_iter()
        .map(|(name, p)| Profile {
            name,
            tp_weight: p.cost_matrix.tp,
            fn_weight: p.cost_matrix.fn_,
            fp_weight: p.cost_matrix.fp,
        })
        .collect();

    // `standard` is the headline profile, so it leads reports; the rest stay alphabetical.
    profiles.sort_by_key(|p| p.name != "standard");
    Ok(profiles)
}

/// Every `data/<category>/<name>.csv`, sorted, so runs are reproducible.
fn data_files(data_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();

    for category in sorted_entries(data_dir)? {
        if category.is_dir() {
            let csvs = sorted_entries(&category)?;
            files.extend(
                csvs.into_iter()
                    .filter(|p| p.extension().is_some_and(|e| e == "csv")),
            );
        }
    }

    Ok(files)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = Vec::new();

    for entry in fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        entries.push(entry.map_err(|e| io_error(dir, e))?.path());
    }

    entries.sort();
    Ok(entries)
}

fn load_series(
    root: &Path,
    path: &Path,
    windows: &BTreeMap<String, Vec<[String; 2]>>,
) -> Result<Series> {
    let name = relative_name(&root.join("data"), path)?;
    let text = fs::read_to_string(path).map_err(|e| io_error(path, e))?;
    let mut series = parse_csv(path, &name, &text)?;

    let limits = windows
        .get(&name)
        .ok_or_else(|| NabError::Corpus(format!("no windows entry for {name}")))?;
    for [start, end] in limits {
        let start = window_timestamp(&series, start)?;
        let end = window_timestamp(&series, end)?;
        series.windows.push((start, end));
    }

    Ok(series)
}

fn relative_name(data_dir: &Path, path: &Path) -> Result<String> {
    let relative = path
        .strip_prefix(data_dir)
        .map_err(|_| NabError::Corpus(format!("{} is outside data/", path.display())))?;

    let parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    Ok(parts.join("/"))
}

/// NAB rejects window limits that are not timestamps of the series.
fn window_timestamp(series: &Series, text: &str) -> Result<i64> {
    let t = parse_timestamp(text).ok_or_else(|| {
        NabError::Corpus(format!("bad window timestamp {text:?} for {}", series.name))
    })?;

    if series.timestamps.contains(&t) {
        Ok(t)
    } else {
        Err(NabError::Corpus(format!(
            "window timestamp {text} is not a row of {}",
            series.name
        )))
    }
}

fn parse_csv(path: &Path, name: &str, text: &str) -> Result<Series> {
    let parse_err = |line: usize, message: String| NabError::Parse {
        path: path.into(),
        line,
        message,
    };
    let mut lines = text.lines().enumerate();

    let header = lines.next().map(|(_, h)| h.trim()).unwrap_or_default();
    let columns: Vec<&str> = header.split(',').map(str::trim).collect();
    let ts_col = columns.iter().position(|&c| c == "timestamp");
    let value_col = columns.iter().position(|&c| c == "value");
    let (Some(ts_col), Some(value_col)) = (ts_col, value_col) else {
        return Err(parse_err(
            1,
            "header lacks timestamp and value columns".into(),
        ));
    };

    let mut series = Series {
        name: name.into(),
        timestamps: Vec::new(),
        raw_timestamps: Vec::new(),
        values: Vec::new(),
        raw_values: Vec::new(),
        windows: Vec::new(),
    };
    for (index, line) in lines {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }

        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let (Some(&ts), Some(&value)) = (fields.get(ts_col), fields.get(value_col)) else {
            return Err(parse_err(index + 1, "missing field".into()));
        };
        let t = parse_timestamp(ts)
            .ok_or_else(|| parse_err(index + 1, format!("bad timestamp {ts:?}")))?;
        let v: f64 = value
            .parse()
            .map_err(|_| parse_err(index + 1, format!("bad value {value:?}")))?;

        series.timestamps.push(t);
        series.raw_timestamps.push(ts.into());
        series.values.push(v);
        series.raw_values.push(value.into());
    }

    Ok(series)
}

/// Parses `YYYY-MM-DD HH:MM:SS[.ffffff]` (or with a `T`) into microseconds since the epoch.
pub fn parse_timestamp(text: &str) -> Option<i64> {
    let (date, time) = text.trim().split_once([' ', 'T'])?;
    let mut date_parts = date.split('-');
    let year: i64 = date_parts.next()?.parse().ok()?;
    let month: i64 = date_parts.next()?.parse().ok()?;
    let day: i64 = date_parts.next()?.parse().ok()?;

    let (hms, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut time_parts = hms.split(':');
    let hour: i64 = time_parts.next()?.parse().ok()?;
    let minute: i64 = time_parts.next()?.parse().ok()?;
    let second: i64 = time_parts.next().map_or(Some(0), |s| s.parse().ok())?;
    let micros = parse_fraction_micros(fraction)?;

    let valid = (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && (0..24).contains(&hour)
        && (0..60).contains(&minute)
        && (0..61).contains(&second);
    if !valid || date_parts.next().is_some() || time_parts.next().is_some() {
        return None;
    }

    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    Some(seconds * 1_000_000 + micros)
}

/// Digits after the decimal point as microseconds (extra digits are truncated).
fn parse_fraction_micros(fraction: &str) -> Option<i64> {
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }

    let mut micros = 0;
    for position in 0..6 {
        let digit = fraction
            .as_bytes()
            .get(position)
            .map_or(0, |b| i64::from(b - b'0'));
        micros = micros * 10 + digit;
    }
    Some(micros)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let shifted_month = (month + 9) % 12;
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;

    era * 146_097 + day_of_era - 719_468
}

/// NAB's scaled sigmoid: 2 / (1 + e^(5x)) - 1, and -1 beyond three window lengths.
pub fn scaled_sigmoid(relative_position: f64) -> f64 {
    if relative_position > FAR_PAST_WINDOW {
        return -1.0;
    }

    2.0 / (1.0 + (5.0 * relative_position).exp()) - 1.0
}

/// A scorable (non-probationary) row: its anomaly score and what detecting it would earn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SweepPoint {
    /// The detector's anomaly score.
    pub anomaly_score: f64,
    /// Unweighted sigmoid reward: in a window, divided by its value at the window start.
    pub reward: f64,
    /// Corpus-wide id of the enclosing window, `None` outside windows.
    pub window: Option<usize>,
}

impl SweepPoint {
    fn weighted(&self, profile: &Profile) -> f64 {
        match self.window {
            Some(_) => self.reward * profile.tp_weight,
            None => self.reward * profile.fp_weight,
        }
    }
}

/// NAB's `calcSweepScore` for one series: the scorable rows, windows numbered from `first_id`.
///
/// This mirrors NAB's state machine, including its quirks: a window's position is measured
/// as `-(right - i + 1) / width`, and rows after a window are measured against its width
/// minus one.
pub fn sweep_points(series: &Series, scores: &[f64], first_id: usize) -> Vec<SweepPoint> {
    let max_tp = scaled_sigmoid(-1.0);
    let probation = series.probationary_len();
    let index_of = |t: i64| series.timestamps.iter().position(|&x| x == t).unwrap_or(0);

    let mut pending = series.windows.iter().copied().enumerate().peekable();
    let mut current: Option<(usize, i64, usize, f64)> = None;
    let mut previous: Option<(usize, f64)> = None;
    let mut points = Vec::with_capacity(series.values.len().saturating_sub(probation));

    for (i, (&t, &score)) in series.timestamps.iter().zip(scores).enumerate() {
        if let Some(&(id, (start, end))) = pending.peek()
            && t == start
        {
            pending.next();
            let right = index_of(end);
            let width = (right as f64) - (index_of(start) as f64) + 1.0;
            current = Some((first_id + id, end, right, width));
        }

        let (reward, window) = match (current, previous) {
            (Some((id, _, right, width)), _) => {
                let position = -((right as f64) - (i as f64) + 1.0) / width;
                (scaled_sigmoid(position) / max_tp, Some(id))
            }
            (None, None) => (-1.0, None),
            (None, Some((right, width))) => {
                let position = (right as f64 - i as f64).abs() / (width - 1.0);
                (scaled_sigmoid(position), None)
            }
        };

        if i >= probation {
            points.push(SweepPoint {
                anomaly_score: score,
                reward,
                window,
            });
        }

        if let Some((_, end, _, width)) = current
            && t == end
        {
            previous = Some((i, width));
            current = None;
        }
    }

    points
}

/// The corpus score for every candidate threshold, in NAB's sweep order (descending).
#[derive(Debug, Clone, Copy, PartialEq)]
struct ThresholdScore {
    threshold: f64,
    score: f64,
}

/// NAB's `calcScoreByThreshold`: sweeps the thresholds from above 1 down through every
/// distinct anomaly score; a row is detected when its score is at or above the threshold.
fn scores_by_threshold(points: &[SweepPoint], profile: &Profile) -> Vec<ThresholdScore> {
    let mut order: Vec<&SweepPoint> = points.iter().collect();
    order.sort_by(|a, b| b.anomaly_score.total_cmp(&a.anomaly_score));

    // NAB sums its score parts in dictionary order: false positives, then windows in order of
    // first appearance in the sorted list; keeping that order keeps ties identical.
    let mut window_slot: BTreeMap<usize, usize> = BTreeMap::new();
    for point in &order {
        if let Some(id) = point.window {
            let next = window_slot.len();
            window_slot.entry(id).or_insert(next);
        }
    }
    let mut window_best = vec![-profile.fn_weight; window_slot.len()];
    let mut fp_sum = 0.0;
    let total = |fp: f64, best: &[f64]| best.iter().fold(fp, |acc, b| acc + b);

    let mut threshold = NO_DETECTION_THRESHOLD;
    let mut sweep = Vec::new();
    for point in order {
        if point.anomaly_score != threshold {
            sweep.push(ThresholdScore {
                threshold,
                score: total(fp_sum, &window_best),
            });
            threshold = point.anomaly_score;
        }

        let weighted = point.weighted(profile);
        match point.window.and_then(|id| window_slot.get(&id)) {
            Some(&slot) => window_best[slot] = window_best[slot].max(weighted),
            None => fp_sum += weighted,
        }
    }
    sweep.push(ThresholdScore {
        threshold,
        score: total(fp_sum, &window_best),
    });

    sweep
}

/// NAB's optimiser: the threshold with the highest corpus score (the highest such threshold
/// on ties, as NAB's stable sort keeps the sweep order).
fn optimise_threshold(points: &[SweepPoint], profile: &Profile) -> ThresholdScore {
    let sweep = scores_by_threshold(points, profile);

    let mut best = ThresholdScore {
        threshold: NO_DETECTION_THRESHOLD,
        score: f64::NEG_INFINITY,
    };
    for candidate in sweep {
        if candidate.score > best.score {
            best = candidate;
        }
    }
    best
}

/// The outcome of one series at a fixed threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesReport {
    /// Series name, e.g. `realTraffic/speed_6005.csv`.
    pub series: String,
    /// NAB raw score of the series.
    pub raw_score: f64,
    /// Windows detected (at least one detection inside, after the probationary period).
    pub true_positives: usize,
    /// Detections outside every window, after the probationary period.
    pub false_positives: usize,
    /// Scorable windows without a detection.
    pub false_negatives: usize,
}

/// NAB's per-file scoring at a threshold: a row is detected when its score is >= threshold.
fn score_series(name: &str, points: &[SweepPoint], threshold: f64, p: &Profile) -> SeriesReport {
    let mut window_best: BTreeMap<usize, Option<f64>> = BTreeMap::new();
    let mut fp_sum = 0.0;
    let mut false_positives = 0;

    for point in points {
        let detected = point.anomaly_score >= threshold;
        match point.window {
            Some(id) => {
                let best = window_best.entry(id).or_insert(None);
                if detected {
                    *best = Some(best.map_or(point.weighted(p), |b| b.max(point.weighted(p))));
                }
            }
            None if detected => {
                fp_sum += point.weighted(p);
                false_positives += 1;
            }
            None => {}
        }
    }

    let true_positives = window_best.values().filter(|b| b.is_some()).count();
    let raw_score = window_best
        .values()
        .fold(fp_sum, |acc, best| acc + best.unwrap_or(-p.fn_weight));
    SeriesReport {
        series: name.into(),
        raw_score,
        true_positives,
        false_positives,
        false_negatives: window_best.len() - true_positives,
    }
}

/// The benchmark result of one detector under one profile.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProfileReport {
    /// Profile name.
    pub profile: String,
    /// The corpus-optimised threshold (1.1 means "never detect").
    pub threshold: f64,
    /// Sum of the per-series raw scores at that threshold.
    pub raw_score: f64,
    /// Raw score of the null detector (the 0 of the normalised scale).
    pub null_score: f64,
    /// Raw score of a perfect detector (the 100 of the normalised scale).
    pub perfect_score: f64,
    /// `100 * (raw - null) / (perfect - null)`.
    pub normalized_score: f64,
    /// Per-series outcomes at the threshold.
    pub series: Vec<SeriesReport>,
}

impl ProfileReport {
    fn totals(&self) -> (usize, usize, usize) {
        self.series.iter().fold((0, 0, 0), |(tp, fp, fn_), s| {
            (
                tp + s.true_positives,
                fp + s.false_positives,
                fn_ + s.false_negatives,
            )
        })
    }
}

/// The benchmark result of one detector under every profile.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NabReport {
    /// Detector name.
    pub detector: String,
    /// Number of series scored.
    pub series_count: usize,
    /// Number of anomaly windows in the corpus.
    pub window_count: usize,
    /// One report per profile, `standard` first.
    pub profiles: Vec<ProfileReport>,
}

impl NabReport {
    /// The report of a profile by name.
    pub fn profile(&self, name: &str) -> Option<&ProfileReport> {
        self.profiles.iter().find(|p| p.profile == name)
    }
}

impl fmt::Display for NabReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "NAB v1.1, detector {}: {} series, {} windows",
            self.detector, self.series_count, self.window_count
        )?;
        writeln!(
            f,
            "{:<20} {:>10} {:>10} {:>10} {:>5} {:>5} {:>5}",
            "profile", "threshold", "raw", "score", "TP", "FP", "FN"
        )?;

        for p in &self.profiles {
            let (tp, fp, fn_) = p.totals();
            writeln!(
                f,
                "{:<20} {:>10.6} {:>10.3} {:>10.2} {:>5} {:>5} {:>5}",
                p.profile, p.threshold, p.raw_score, p.normalized_score, tp, fp, fn_
            )?;
        }
        Ok(())
    }
}

/// Runs `detector` over every series of the NAB-layout `data_dir`, optionally writes NAB
/// result files under `out_dir`, and scores the results with every profile.
pub fn run_benchmark(
    data_dir: &Path,
    out_dir: Option<&Path>,
    detector: DetectorKind,
) -> Result<NabReport> {
    let corpus = Corpus::load(data_dir)?;

    evaluate(&corpus, detector.name(), out_dir, || detector.build())
}

/// Runs detectors made by `make` (one per series) over a loaded corpus and scores them.
pub fn evaluate<D, F>(
    corpus: &Corpus,
    name: &str,
    out_dir: Option<&Path>,
    make: F,
) -> Result<NabReport>
where
    D: StreamingDetector + ?Sized,
    F: Fn() -> Box<D>,
{
    let mut all_scores = Vec::with_capacity(corpus.series.len());
    for series in &corpus.series {
        let scores = run_detector(name, series, make().as_mut())?;
        if let Some(out) = out_dir {
            write_results(out, name, series, &scores)?;
        }
        all_scores.push(scores);
    }

    Ok(score_corpus(corpus, name, &all_scores))
}

/// Scores per-series anomaly scores (in `corpus.series` order) with every profile.
pub fn score_corpus(corpus: &Corpus, name: &str, scores: &[Vec<f64>]) -> NabReport {
    let null_scores: Vec<Vec<f64>> = corpus
        .series
        .iter()
        .map(|s| vec![NULL_DETECTOR_SCORE; s.values.len()])
        .collect();
    let points = corpus_points(corpus, scores);
    let null_points = corpus_points(corpus, &null_scores);

    let profiles = corpus
        .profiles
        .iter()
        .map(|profile| {
            let null_score = total_at_optimum(corpus, &null_points, profile).0;
            let (raw_score, threshold, series) = total_at_optimum(corpus, &points, profile);
            let perfect_score = corpus.window_count() as f64 * profile.tp_weight;

            ProfileReport {
                profile: profile.name.clone(),
                threshold,
                raw_score,
                null_score,
                perfect_score,
                normalized_score: 100.0 * (raw_score - null_score) / (perfect_score - null_score),
                series,
            }
        })
        .collect();

    NabReport {
        detector: name.into(),
        series_count: corpus.series.len(),
        window_count: corpus.window_count(),
        profiles,
    }
}

/// Per-series sweep points, with corpus-wide window ids.
fn corpus_points(corpus: &Corpus, scores: &[Vec<f64>]) -> Vec<Vec<SweepPoint>> {
    let mut first_id = 0;

    corpus
        .series
        .iter()
        .zip(scores)
        .map(|(series, scores)| {
            let points = sweep_points(series, scores, first_id);
            first_id += series.windows.len();
            points
        })
        .collect()
}

/// Like NAB: optimise one threshold over the corpus, then total the per-series scores at it.
fn total_at_optimum(
    corpus: &Corpus,
    points: &[Vec<SweepPoint>],
    profile: &Profile,
) -> (f64, f64, Vec<SeriesReport>) {
    let flat: Vec<SweepPoint> = points.iter().flatten().copied().collect();
    let threshold = optimise_threshold(&flat, profile).threshold;

    let series: Vec<SeriesReport> = corpus
        .series
        .iter()
        .zip(points)
        .map(|(s, pts)| score_series(&s.name, pts, threshold, profile))
        .collect();
    let total = series.iter().map(|s| s.raw_score).sum();

    (total, threshold, series)
}

fn run_detector<D>(name: &str, series: &Series, detector: &mut D) -> Result<Vec<f64>>
where
    D: StreamingDetector + ?Sized,
{
    let mut scores = Vec::with_capacity(series.values.len());

    for (row, &value) in series.values.iter().enumerate() {
        let score = detector.update(value);
        if !(0.0..=1.0).contains(&score) {
            return Err(NabError::InvalidScore {
                detector: name.into(),
                series: series.name.clone(),
                row,
                score,
            });
        }
        scores.push(score);
    }

    Ok(scores)
}

/// Writes `<out>/<category>/<detector>_<name>.csv` in NAB's results format.
fn write_results(out: &Path, detector: &str, series: &Series, scores: &[f64]) -> Result<()> {
    let (category, file) = series.split_name();
    let dir = out.join(category);
    fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;

    let path = dir.join(format!("{detector}_{file}"));
    let handle = fs::File::create(&path).map_err(|e| io_error(&path, e))?;
    let mut writer = BufWriter::new(handle);
    let labels = series.labels();

    let mut write = || -> std::io::Result<()> {
        writeln!(writer, "timestamp,value,anomaly_score,label")?;
        for i in 0..scores.len() {
            let (ts, value) = (&series.raw_timestamps[i], &series.raw_values[i]);
            writeln!(writer, "{ts},{value},{},{}", scores[i], labels[i])?;
        }
        writer.flush()
    };
    write().map_err(|e| io_error(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        Profile {
            name: "standard".into(),
            tp_weight: 1.0,
            fn_weight: 1.0,
            fp_weight: 0.11,
        }
    }

    /// A 100-row series at one-minute steps with the given windows (row indices).
    fn series(windows: &[(usize, usize)]) -> Series {
        let timestamps: Vec<i64> = (0..100).map(|i| i * 60_000_000).collect();
        Series {
            name: "cat/test.csv".into(),
            windows: windows
                .iter()
                .map(|&(s, e)| (timestamps[s], timestamps[e]))
                .collect(),
            raw_timestamps: timestamps.iter().map(i64::to_string).collect(),
            raw_values: vec!["0".into(); 100],
            values: vec![0.0; 100],
            timestamps,
        }
    }

    fn corpus(series: Series) -> Corpus {
        Corpus {
            series: vec![series],
            profiles: vec![profile()],
        }
    }

    fn spikes(at: &[usize]) -> Vec<f64> {
        let mut scores = vec![0.0; 100];
        for &i in at {
            scores[i] = 1.0;
        }
        scores
    }

    #[test]
    fn scaled_sigmoid_matches_nab_anchors() {
        assert!((scaled_sigmoid(-1.0) - 0.986_614_298_2).abs() < 1e-9);
        assert!((scaled_sigmoid(-0.5) - 0.848_283_639_9).abs() < 1e-9);
        assert_eq!(scaled_sigmoid(0.0), 0.0);
        assert!((scaled_sigmoid(1.0) + 0.986_614_298_2).abs() < 1e-9);
        assert_eq!(scaled_sigmoid(3.5), -1.0);
    }

    #[test]
    fn probation_is_fifteen_percent_capped_at_750_rows() {
        assert_eq!(series(&[]).probationary_len(), 15);

        let mut long = series(&[]);
        long.values = vec![0.0; 10_000];
        assert_eq!(long.probationary_len(), 750);
    }

    #[test]
    fn window_positions_follow_nab() {
        let points = sweep_points(&series(&[(40, 49)]), &[0.0; 100], 0);

        // Row 40 is the window start (relative position -1), which earns the full reward.
        let start = points[40 - 15];
        assert_eq!(start.window, Some(0));
        assert!((start.reward - 1.0).abs() < 1e-12);

        // The last row of a 10-row window sits at -1/10.
        let last = points[49 - 15];
        assert!((last.reward - scaled_sigmoid(-0.1) / scaled_sigmoid(-1.0)).abs() < 1e-12);

        // After the window, distance is measured against width - 1.
        let after = points[52 - 15];
        assert_eq!(after.window, None);
        assert!((after.reward - scaled_sigmoid(3.0 / 9.0)).abs() < 1e-12);

        // Before any window a false positive costs a full -1.
        assert_eq!(points[0].reward, -1.0);
    }

    #[test]
    fn only_the_earliest_detection_in_a_window_counts() {
        let points = sweep_points(&series(&[(40, 49)]), &spikes(&[45, 41, 47]), 0);
        let report = score_series("t", &points, 0.5, &profile());

        let expected = scaled_sigmoid(-9.0 / 10.0) / scaled_sigmoid(-1.0);
        assert!((report.raw_score - expected).abs() < 1e-12);
        assert_eq!(
            (
                report.true_positives,
                report.false_positives,
                report.false_negatives
            ),
            (1, 0, 0)
        );
    }

    #[test]
    fn false_positives_and_misses_are_charged() {
        let points = sweep_points(&series(&[(40, 49), (80, 89)]), &spikes(&[20, 55]), 0);
        let report = score_series("t", &points, 0.5, &profile());

        let expected = -0.11 + 0.11 * scaled_sigmoid(6.0 / 9.0) - 2.0;
        assert!((report.raw_score - expected).abs() < 1e-12);
        assert_eq!(
            (
                report.true_positives,
                report.false_positives,
                report.false_negatives
            ),
            (0, 2, 2)
        );
    }

    #[test]
    fn probationary_detections_and_windows_are_ignored() {
        let points = sweep_points(&series(&[(2, 8), (40, 49)]), &spikes(&[5, 10]), 0);
        let report = score_series("t", &points, 0.5, &profile());

        // Only the second window is scorable, and it is missed.
        assert_eq!(report.raw_score, -1.0);
        assert_eq!(
            (
                report.true_positives,
                report.false_positives,
                report.false_negatives
            ),
            (0, 0, 1)
        );
    }

    #[test]
    fn threshold_is_optimised_and_normalised_between_null_and_perfect() {
        let corpus = corpus(series(&[(40, 49)]));
        let mut scores = vec![0.1; 100];
        scores[30] = 0.7;
        scores[40] = 0.8;
        let report = score_corpus(&corpus, "t", &[scores]);
        let standard = &report.profiles[0];

        // Detecting only row 40 (threshold 0.8) beats also detecting the FP at row 30 (0.7).
        assert_eq!(standard.threshold, 0.8);
        assert!((standard.raw_score - 1.0).abs() < 1e-12);
        assert_eq!(standard.null_score, -1.0);
        assert!((standard.normalized_score - 100.0).abs() < 1e-9);
    }

    #[test]
    fn timestamps_parse_with_and_without_fraction() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:00"), Some(0));
        assert_eq!(
            parse_timestamp("1970-01-02 00:00:01.500000"),
            Some(86_401_500_000)
        );
        assert_eq!(
            parse_timestamp("2015-03-04 16:02:53.000000"),
            parse_timestamp("2015-03-04 16:02:53")
        );
        assert_eq!(
            parse_timestamp("2000-03-01 00:00:00"),
            Some(951_868_800_000_000)
        );
        assert_eq!(parse_timestamp("2015-13-01 00:00:00"), None);
    }
}
