//! Tuning tool: scores the Vigil detector with configuration overrides, on the whole corpus
//! and on subsets (each category, and the first and second half of the series by name), so
//! a change that only helps one kind of series shows up.
//!
//! `cargo run -p vigil-detect --release --example tune -- [-v] [DATA_DIR] window=300 ...`
//!
//! `-v` also prints the per-series outcome under the standard profile.

use std::path::PathBuf;
use std::process::ExitCode;

use vigil_detect::nab::{Corpus, NabReport, score_corpus};
use vigil_detect::streaming::{StreamingDetector, Vigil, VigilConfig};

fn main() -> ExitCode {
    let mut config = VigilConfig::default();
    let mut verbose = false;
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/nab");
    for arg in std::env::args().skip(1) {
        let Some((key, value)) = arg.split_once('=') else {
            if arg == "-v" {
                verbose = true;
            } else {
                dir = PathBuf::from(arg);
            }
            continue;
        };
        let Ok(number) = value.parse::<f64>() else {
            eprintln!("bad value in {arg}");
            return ExitCode::FAILURE;
        };
        if let Err(message) = set(&mut config, key, number) {
            eprintln!("{message}");
            return ExitCode::FAILURE;
        }
    }

    let corpus = match Corpus::load(&dir) {
        Ok(corpus) => corpus,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let scores: Vec<Vec<f64>> = corpus
        .series
        .iter()
        .map(|series| {
            let mut detector = Vigil::new(config.clone());
            series.values.iter().map(|&v| detector.update(v)).collect()
        })
        .collect();

    let report = score_corpus(&corpus, "vigil", &scores);
    println!("{} {config:?}", profile_scores(&report));
    print_subsets(&corpus, &scores);
    if verbose {
        print_details(&report);
    }
    ExitCode::SUCCESS
}

/// Applies one `key=value` override.
fn set(config: &mut VigilConfig, key: &str, number: f64) -> Result<(), String> {
    match key {
        "window" => config.window = number as usize,
        "slow_window" => config.slow_window = number as usize,
        "warmup" => config.warmup = number as usize,
        "max_period" => config.max_period = number as usize,
        "min_period_strength" => config.min_period_strength = number,
        "period_stride" => config.period_stride = number as usize,
        "cycle_trust" => config.cycle_trust = number,
        "record_window" => config.record_window = number as usize,
        "short_window" => config.short_window = number as usize,
        "min_surprise" => config.min_surprise = number,
        "suppression" => config.suppression = number as usize,
        "record_cap" => config.record_cap = number,
        "damping" => config.damping = number,
        _ => return Err(format!("unknown key {key}")),
    }
    Ok(())
}

/// The three profile scores, standard first.
fn profile_scores(report: &NabReport) -> String {
    let scores: Vec<String> = report
        .profiles
        .iter()
        .map(|p| format!("{:.2}", p.normalized_score))
        .collect();
    scores.join(" ")
}

/// Scores each category, and each half of the series, as a corpus of its own (with its own
/// optimised threshold), so the subsets do not borrow each other's threshold.
fn print_subsets(corpus: &Corpus, scores: &[Vec<f64>]) {
    let category = |name: &str| name.split('/').next().unwrap_or("").to_string();
    let mut subsets: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, series) in corpus.series.iter().enumerate() {
        let key = category(&series.name);
        match subsets.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(i),
            None => subsets.push((key, vec![i])),
        }
    }
    subsets.push((
        "even series".into(),
        (0..corpus.series.len()).step_by(2).collect(),
    ));
    subsets.push((
        "odd series".into(),
        (1..corpus.series.len()).step_by(2).collect(),
    ));

    for (name, members) in subsets {
        let sub = Corpus {
            series: members.iter().map(|&i| corpus.series[i].clone()).collect(),
            profiles: corpus.profiles.clone(),
        };
        if sub.window_count() == 0 {
            continue;
        }
        let sub_scores: Vec<Vec<f64>> = members.iter().map(|&i| scores[i].clone()).collect();
        let report = score_corpus(&sub, &name, &sub_scores);
        println!("  {name:<22} {}", profile_scores(&report));
    }
}

/// The corpus table and the per-series outcome under the standard profile.
fn print_details(report: &NabReport) {
    println!("{report}");
    let Some(standard) = report.profile("standard") else {
        return;
    };
    for s in &standard.series {
        println!(
            "{:<55} {:>8.3} tp {} fp {} fn {}",
            s.series, s.raw_score, s.true_positives, s.false_positives, s.false_negatives
        );
    }
}
