//! The metrics page behind a bearer token: with `metrics_require_token`, Prometheus' own
//! `metrics` token (or an admin token) reads `/metrics`, every other request is refused with
//! 401 or 403 and counted, and `/healthz` stays open. Requests are made with curl.

use std::process::Command;

use crate::support::Server;

/// An HTTP answer as curl saw it.
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

/// GETs `path` from the server's HTTP port with curl, with `token` as a bearer token if any.
fn curl(server: &Server, path: &str, token: Option<&str>) -> Answer {
    let mut command = Command::new("curl");
    command
        .args(["--silent", "--show-error", "--include", "--max-time", "20"])
        .arg(format!("http://{}{path}", server.http));
    if let Some(token) = token {
        command
            .arg("--header")
            .arg(format!("Authorization: Bearer {token}"));
    }
    let output = command.output().expect("curl runs");
    assert!(
        output.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let (headers, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    Answer {
        status,
        headers: headers.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

/// The value of `vigil_http_auth_failures_total{reason="<reason>"}` in a metrics page.
fn refusals(page: &str, reason: &str) -> f64 {
    let name = format!("vigil_http_auth_failures_total{{reason=\"{reason}\"}} ");
    page.lines()
        .find_map(|line| line.strip_prefix(&name))
        .map(|value| value.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("{name} missing from:\n{page}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_ask_for_a_metrics_token_and_healthz_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vigil.toml");
    std::fs::write(&config, "metrics_require_token = true\n").unwrap();
    let server = Server::start_with(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let admin = server.token.trim().to_owned();
    let scraper = server.cli(&[
        "tokens",
        "create",
        "--role",
        "metrics",
        "--name",
        "prometheus",
    ]);
    let scraper = scraper.trim().to_owned();
    let analyst = server.cli(&["tokens", "create", "--role", "analyst", "--name", "grafana"]);
    let analyst = analyst.trim().to_owned();

    let healthz = curl(&server, "/healthz", None);
    assert_eq!((healthz.status, healthz.body.as_str()), (200, "ok\n"));

    let missing = curl(&server, "/metrics", None);
    assert_eq!(missing.status, 401, "{}", missing.body);
    assert!(missing.headers.contains("www-authenticate: bearer"));
    assert_eq!(missing.body, "missing bearer token\n");
    assert!(!missing.body.contains("vigil_"));

    let unknown = curl(&server, "/metrics", Some("not-a-token"));
    assert_eq!(unknown.status, 401);
    assert_eq!(unknown.body, "unknown bearer token\n");

    let other_role = curl(&server, "/metrics", Some(&analyst));
    assert_eq!(other_role.status, 403);
    assert!(other_role.body.contains("metrics or admin token"));

    let scraped = curl(&server, "/metrics", Some(&scraper));
    assert_eq!(scraped.status, 200, "{}", scraped.body);
    assert!(scraped.body.contains("vigil_ingest_"));

    // The scraper's token reads metrics and nothing else.
    let stderr = server.cli_fails_as(&scraper, &["sql", "SELECT count(*) FROM readings"]);
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert!(!stderr.contains(&scraper));

    let token_id = server
        .cli(&["tokens", "list"])
        .lines()
        .find(|line| line.contains("prometheus"))
        .and_then(|line| line.split_whitespace().next())
        .unwrap()
        .to_owned();
    server.cli(&["tokens", "revoke", &token_id]);
    let revoked = curl(&server, "/metrics", Some(&scraper));
    assert_eq!(revoked.status, 401);
    assert_eq!(revoked.body, "revoked bearer token\n");

    let page = curl(&server, "/metrics", Some(&admin));
    assert_eq!(page.status, 200);
    assert_eq!(refusals(&page.body, "missing_token"), 1.0);
    assert_eq!(refusals(&page.body, "unknown_token"), 1.0);
    assert_eq!(refusals(&page.body, "role_denied"), 1.0);
    assert_eq!(refusals(&page.body, "revoked_token"), 1.0);

    let log = std::fs::read_to_string(server.data_dir.with_extension("log")).unwrap();
    for secret in [&admin, &scraper, &analyst] {
        assert!(!log.contains(secret.as_str()), "a secret is in the log");
    }
}
