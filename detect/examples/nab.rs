//! Runs a detector over a NAB-layout directory and prints its scores.
//!
//! `cargo run -p vigil-detect --release --example nab -- [vigil|zscore] [DATA_DIR] [OUT_DIR]`

use std::path::PathBuf;
use std::process::ExitCode;

use vigil_detect::nab::{DetectorKind, run_benchmark};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let detector = match args.first().map(String::as_str) {
        Some("zscore") => DetectorKind::RollingZScore,
        _ => DetectorKind::Vigil,
    };
    let data_dir = args.get(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/nab"),
        PathBuf::from,
    );
    let out_dir = args.get(2).map(PathBuf::from);

    match run_benchmark(&data_dir, out_dir.as_deref(), detector) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
