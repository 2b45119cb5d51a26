//! Access: API tokens with a role, created with `vigil tokens`, checked on every gRPC and Flight
//! SQL call; revocation (of new calls and of an open alert stream), restarts, refusal metrics,
//! and no secret on disk or in the log.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::{Server, TestDevice};

/// Every file under `dir` whose bytes contain `secret`.
fn files_containing(dir: &Path, secret: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_containing(&path, secret));
        } else if let Ok(bytes) = std::fs::read(&path)
            && bytes
                .windows(secret.len())
                .any(|window| window == secret.as_bytes())
        {
            found.push(path.display().to_string());
        }
    }
    found
}

fn assert_permission_denied(stderr: &str, secret: &str, what: &str) {
    assert!(
        stderr.contains("permission denied"),
        "{what}: expected a permission refusal, got: {stderr}"
    );
    assert!(
        !stderr.contains(secret),
        "{what}: the refusal echoes the secret"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_reaches_only_its_methods() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = Server::start(&data_dir);
    let pump = TestDevice::new("pump-1");
    server.enroll(&[&pump]);

    let analyst = server.cli(&["tokens", "create", "--role", "analyst", "--name", "grafana"]);
    let analyst = analyst.trim().to_owned();
    let soc = server.cli(&["tokens", "create", "--role", "soc", "--name", "night shift"]);
    let soc = soc.trim().to_owned();
    assert_eq!(analyst.len(), 64, "the secret alone on stdout: {analyst}");
    assert_ne!(analyst, soc);

    // The analyst queries, and nothing else.
    let count = server.cli_as(
        &analyst,
        &[
            "sql",
            "SELECT count(*) AS n FROM devices",
            "--format",
            "csv",
        ],
    );
    assert_eq!(count.trim(), "n\n1");
    let newcomer = TestDevice::new("pump-2");
    let key = newcomer.public_key_hex();
    let enroll = ["devices", "add", "pump-2", "--public-key", key.as_str()];
    for args in [
        &enroll[..],
        &["devices", "quarantine", "pump-1"],
        &["devices", "list"],
    ] {
        let stderr = server.cli_fails_as(&analyst, args);
        assert_permission_denied(&stderr, &analyst, &format!("analyst {args:?}"));
    }
    let stderr = server.cli_fails_as(&analyst, &["alerts", "tail", "--limit", "1"]);
    assert_permission_denied(&stderr, &analyst, "analyst alerts tail");

    // The SOC acts on devices and follows alerts, but enrolls nothing and manages no tokens.
    let quarantined = server.cli_as(
        &soc,
        &["devices", "quarantine", "pump-1", "--reason", "drill"],
    );
    assert!(quarantined.contains("quarantined"), "{quarantined}");
    let alert = server.cli_as(
        &soc,
        &["alerts", "tail", "--limit", "1", "--format", "json"],
    );
    let alert: serde_json::Value = serde_json::from_str(alert.trim()).unwrap();
    assert_eq!(alert["device_id"], "pump-1");
    assert_eq!(alert["action"], "quarantined");
    let released = server.cli_as(&soc, &["devices", "release", "pump-1"]);
    assert!(released.contains("active"), "{released}");
    assert!(
        server
            .cli_as(&soc, &["devices", "show", "pump-1"])
            .contains("pump-1")
    );
    server.cli_as(&soc, &["sql", "SELECT count(*) FROM alerts"]);

    let csv = data_dir.with_extension("soc-import.csv");
    std::fs::write(
        &csv,
        format!("device_id,public_key_hex,class\npump-2,{key},\n"),
    )
    .unwrap();
    let import = ["devices", "import", csv.to_str().unwrap()];
    let create = [
        "tokens",
        "create",
        "--role",
        "admin",
        "--name",
        "escalation",
    ];
    for args in [&enroll[..], &import, &create, &["tokens", "list"]] {
        let stderr = server.cli_fails_as(&soc, args);
        assert_permission_denied(&stderr, &soc, &format!("soc {args:?}"));
    }
    let devices = server.cli(&["devices", "list"]);
    assert!(
        !devices.contains("pump-2"),
        "nothing was enrolled: {devices}"
    );
    let role_denied = "vigil_grpc_auth_failures_total{reason=\"role_denied\"}";
    assert_eq!(server.metric(role_denied), 8.0);

    // A garbage token is refused on every service and counted.
    let unknown = "vigil_grpc_auth_failures_total{reason=\"unknown_token\"}";
    assert_eq!(server.metric(unknown), 0.0);
    let garbage = "not-a-token-at-all";
    for args in [
        &["sql", "SELECT 1"][..],
        &["devices", "list"],
        &["alerts", "ack", "1"],
    ] {
        let stderr = server.cli_fails_as(garbage, args);
        assert!(
            stderr.contains("unknown bearer token"),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains(garbage),
            "{args:?} echoes the token: {stderr}"
        );
    }
    assert_eq!(server.metric(unknown), 3.0);

    // Tokens survive a restart; a revoked one is refused at once, and after restarts too.
    server.restart();
    server.cli_as(&analyst, &["sql", "SELECT 1"]);
    server.cli_as(&soc, &["devices", "list"]);
    let listed = server.cli(&["tokens", "list"]);
    assert!(
        listed.contains("grafana") && listed.contains("night shift"),
        "{listed}"
    );
    let soc_id = listed
        .lines()
        .find(|line| line.contains("night shift"))
        .and_then(|line| line.split_whitespace().next())
        .unwrap()
        .to_owned();

    // An alert stream opened before the revocation is ended by it.
    let mut tail = server.spawn_cli_as(&soc, &["alerts", "tail"]);
    // Kept open to the end: the stream goes on printing (the release alert too).
    let mut alerts = BufReader::new(tail.stdout.take().unwrap());
    let mut first = String::new();
    alerts.read_line(&mut first).unwrap();
    assert!(first.contains("pump-1"), "the stream is open: {first}");

    let revoked = server.cli(&["tokens", "revoke", &soc_id]);
    assert!(revoked.contains(&soc_id), "{revoked}");
    let stderr = server.cli_fails_as(&soc, &["devices", "list"]);
    assert!(stderr.contains("revoked bearer token"), "{stderr}");

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = tail.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            tail.kill().unwrap();
            panic!("the alert stream outlived its token's revocation");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    tail.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success());
    assert!(stderr.contains("revoked bearer token"), "{stderr}");
    server.restart();
    let stderr = server.cli_fails_as(&soc, &["sql", "SELECT 1"]);
    assert!(stderr.contains("revoked bearer token"), "{stderr}");
    assert_eq!(
        server.metric("vigil_grpc_auth_failures_total{reason=\"revoked_token\"}"),
        1.0,
        "counters start again at a restart"
    );
    server.cli_as(&analyst, &["sql", "SELECT 1"]);
    let listed = server.cli(&["tokens", "list"]);
    let soc_line = listed.lines().find(|line| line.contains(&soc_id)).unwrap();
    assert!(
        !soc_line.trim_end().ends_with('-'),
        "revocation time shown: {listed}"
    );

    // Only hashes on disk, and no secret in the server's log.
    assert!(data_dir.join("tokens.json").exists());
    let log = data_dir.with_extension("log");
    for secret in [&analyst, &soc] {
        assert_eq!(files_containing(&data_dir, secret), Vec::<String>::new());
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains(secret.as_str()), "the log holds a secret");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(garbage), "the log echoes a refused token");
}
