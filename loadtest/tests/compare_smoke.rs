//! A short `vigil-loadtest compare` against the real servers: the vigil binary of this build,
//! Mosquitto when installed (scripts/install-test-deps.sh installs it) and the rumqttd peer
//! (built here when missing). Checks correctness only: every reading acknowledged, nothing
//! lost or duplicated, and every field of the JSON report present. No timing is asserted.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

const LOADTEST: &str = env!("CARGO_BIN_EXE_vigil-loadtest");
const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const TARGET_FIELDS: [&str; 8] = [
    "name",
    "devices",
    "acked_per_s",
    "puback_p50_ms",
    "puback_p99_ms",
    "server_cpu_us_per_msg",
    "lost",
    "duplicated",
];

/// `target/<profile>/`, where cargo put the vigil binary beside this test's binary.
fn build_dir() -> PathBuf {
    Path::new(LOADTEST).parent().unwrap().to_owned()
}

/// The rumqttd peer of either profile, built (in debug) when neither exists. It is a
/// workspace of its own; see its manifest.
fn rumqttd_peer() -> PathBuf {
    let target_dir = build_dir().parent().unwrap().to_owned();
    let peer_dir = target_dir.join("rumqttd-peer");
    for profile in ["debug", "release"] {
        let binary = peer_dir.join(profile).join("rumqttd-peer");
        if binary.is_file() {
            return binary;
        }
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/rumqttd-peer/Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&peer_dir)
        .status()
        .unwrap();
    assert!(status.success(), "building the rumqttd peer failed");
    peer_dir.join("debug").join("rumqttd-peer")
}

#[test]
fn compare_loses_and_duplicates_nothing() {
    let vigil = build_dir().join("vigil");
    assert!(
        vigil.is_file(),
        "{} is missing: run `cargo test --workspace` (or `cargo build --workspace`) first",
        vigil.display()
    );
    let scratch = tempfile::tempdir().unwrap();
    let json_path = scratch.path().join("compare.json");

    let output = Command::new(LOADTEST)
        .args([
            "compare",
            "--devices",
            "20",
            "--duration-s",
            "3",
            "--rate-hz",
            "5",
        ])
        .arg("--vigil-bin")
        .arg(&vigil)
        .arg("--rumqttd-bin")
        .arg(rumqttd_peer())
        .arg("--corpus-dir")
        .arg(scratch.path().join("corpus"))
        .arg("--json")
        .arg(&json_path)
        .arg("--quiet")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "compare failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert!(report["verify_only_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["verify_us_per_sig"].as_f64().unwrap() > 0.0);

    let mut expected = vec!["vigil", "rumqttd"];
    if Path::new(MOSQUITTO).is_file() {
        expected.push("mosquitto");
    } else {
        eprintln!("{MOSQUITTO} is not installed: compared without Mosquitto");
    }
    let targets = report["targets"].as_array().unwrap();
    let mut names: Vec<&str> = targets
        .iter()
        .map(|target| target["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    expected.sort_unstable();
    assert_eq!(names, expected, "{stdout}");

    for target in targets {
        for field in TARGET_FIELDS {
            assert!(!target[field].is_null(), "{field} missing from {target}");
        }
        let name = target["name"].as_str().unwrap();
        assert_eq!(target["devices"], 20, "{name}");
        assert_eq!(target["offered"], 20 * 15, "{name}");
        assert_eq!(target["not_acked"], 0, "{name}: {stdout}");
        assert_eq!(target["lost"], 0, "{name}: {stdout}");
        assert_eq!(target["duplicated"], 0, "{name}: {stdout}");
        assert!(target["acked_per_s"].as_f64().unwrap() > 0.0, "{name}");
        // CPU time is counted in clock ticks (10 ms): a short run may show none.
        assert!(
            target["server_cpu_us_per_msg"].as_f64().unwrap() >= 0.0,
            "{name}"
        );
    }
    assert!(stdout.contains("vigil/rumqttd at 20 devices"), "{stdout}");
}
