//! The deployment files under `deploy/`, checked against the server they deploy and against
//! each other: every metric the dashboard and the alert rules query is one a running server
//! exports, used as its type allows (counters and histogram buckets under `rate`), with labels it
//! carries; the ports, paths, user and command agree between the example config, the container
//! config, the Dockerfile, compose and Kubernetes; the systemd unit keeps its hardening. Where
//! `systemd-analyze` and `promtool` are installed they check the unit and the Prometheus files
//! as well. (That the container and Kubernetes configs load with the server's own config loader
//! is tested beside the loader, in `src/config.rs`.)

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use prost::Message;
use rumqttc::QoS;
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
use vigil_proto::sign_reading;

use crate::support::{BIN, Server, TestDevice, V3Device, http_get, wait_for};

/// Device connections one node must hold open, each a file descriptor.
const DEVICE_CONNECTIONS: u64 = 10_000;

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    let path = repo_path(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// Every YAML document of a file (Kubernetes manifests hold several).
fn yaml_documents(relative: &str) -> Vec<Yaml> {
    use serde::Deserialize;

    serde_yaml_ng::Deserializer::from_str(&read(relative))
        .map(|document| {
            Yaml::deserialize(document).unwrap_or_else(|error| panic!("{relative}: {error}"))
        })
        .collect()
}

fn yaml(relative: &str) -> Yaml {
    let mut documents = yaml_documents(relative);
    assert_eq!(documents.len(), 1, "{relative}: one YAML document expected");
    documents.remove(0)
}

fn toml_file(relative: &str) -> toml::Table {
    read(relative)
        .parse()
        .unwrap_or_else(|error| panic!("{relative}: {error}"))
}

/// `value[key1][key2]…` as a string, or a panic naming the path.
fn text<'a>(value: &'a Yaml, path: &[&str]) -> &'a str {
    let mut node = value;
    for key in path {
        node = &node[*key];
    }
    node.as_str()
        .unwrap_or_else(|| panic!("{path:?} is not a string in {value:?}"))
}

fn sequence<'a>(value: &'a Yaml, path: &[&str]) -> &'a [Yaml] {
    let mut node = value;
    for key in path {
        node = &node[*key];
    }
    node.as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{path:?} is not a list in {value:?}"))
}

// ---------------------------------------------------------------------------------------------
// The configs: the example (defaults) and the one the container image and Kubernetes run.

/// The listen addresses of a vigil.toml.
#[derive(Debug)]
struct Listeners {
    mqtt: SocketAddr,
    mqtt_tls: SocketAddr,
    grpc: SocketAddr,
    http: SocketAddr,
}

impl Listeners {
    fn of(config: &toml::Table) -> Self {
        let address = |table: &toml::Table, key: &str| -> SocketAddr {
            table[key]
                .as_str()
                .unwrap_or_else(|| panic!("{key} is not a string"))
                .parse()
                .unwrap_or_else(|error| panic!("{key}: {error}"))
        };
        let ingest = config["ingest"].as_table().expect("an [ingest] table");
        Self {
            mqtt: address(ingest, "mqtt_listen"),
            mqtt_tls: address(ingest, "mqtt_tls_listen"),
            grpc: address(config, "grpc_listen"),
            http: address(config, "http_listen"),
        }
    }

    /// The ports reachable from outside a container: MQTT over TLS, gRPC and HTTP.
    fn published_ports(&self) -> BTreeSet<u16> {
        [self.mqtt_tls.port(), self.grpc.port(), self.http.port()].into()
    }
}

fn container_config() -> toml::Table {
    toml_file("deploy/container/vigil.toml")
}

/// A string setting of the container config.
fn container_setting(path: &[&str]) -> String {
    let config = container_config();
    let mut node = &toml::Value::Table(config);
    for key in path {
        node = &node[*key];
    }
    node.as_str()
        .unwrap_or_else(|| panic!("{path:?} missing from the container config"))
        .to_owned()
}

fn parent_dir(path: &str) -> String {
    Path::new(path)
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned()
}

#[test]
fn the_container_config_uses_the_default_ports_and_serves_the_network() {
    let defaults = Listeners::of(&toml_file("deploy/vigil.toml"));
    let container = Listeners::of(&container_config());

    for (what, default, deployed) in [
        ("mqtt_listen", defaults.mqtt, container.mqtt),
        ("mqtt_tls_listen", defaults.mqtt_tls, container.mqtt_tls),
        ("grpc_listen", defaults.grpc, container.grpc),
        ("http_listen", defaults.http, container.http),
    ] {
        assert_eq!(default.port(), deployed.port(), "{what}: port differs");
    }
    for (what, address) in [
        ("mqtt_tls_listen", container.mqtt_tls),
        ("grpc_listen", container.grpc),
        ("http_listen", container.http),
    ] {
        assert!(
            address.ip().is_unspecified(),
            "{what} = {address}: unreachable from outside the container"
        );
    }
    // Plaintext MQTT on the network would carry login tokens in the clear.
    assert!(container.mqtt.ip().is_loopback());
}

// ---------------------------------------------------------------------------------------------
// Dockerfile and .dockerignore.

/// The instructions of a Dockerfile: keyword (upper case) and arguments, continuation lines
/// joined, comments and parser directives left out.
fn dockerfile() -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in read("deploy/Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (current.is_empty() && trimmed.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, arguments) = current.split_once(' ').unwrap_or((&current, ""));
                instructions.push((keyword.to_uppercase(), arguments.trim().to_owned()));
                current.clear();
            }
        }
    }
    instructions
}

/// The instructions of the Dockerfile's last stage.
fn final_stage() -> Vec<(String, String)> {
    let instructions = dockerfile();
    let last_from = instructions
        .iter()
        .rposition(|(keyword, _)| keyword == "FROM")
        .expect("a FROM");
    instructions[last_from..].to_vec()
}

fn instruction(stage: &[(String, String)], keyword: &str) -> String {
    let found: Vec<_> = stage
        .iter()
        .filter(|(candidate, _)| candidate == keyword)
        .collect();
    assert_eq!(found.len(), 1, "one {keyword} expected in the final stage");
    found[0].1.clone()
}

/// The JSON (exec form) array after a Dockerfile keyword, e.g. `CMD ["vigil", "run"]`.
fn exec_form(arguments: &str) -> Vec<String> {
    let start = arguments
        .find('[')
        .unwrap_or_else(|| panic!("not exec form: {arguments}"));
    serde_json::from_str(&arguments[start..]).unwrap_or_else(|error| panic!("{arguments}: {error}"))
}

/// The numeric user of the image.
fn image_user() -> u64 {
    let user = instruction(&final_stage(), "USER");
    let uid = user.split(':').next().unwrap();
    uid.parse()
        .unwrap_or_else(|_| panic!("USER {user}: numeric, so that runAsNonRoot can check it"))
}

fn image_command() -> Vec<String> {
    exec_form(&instruction(&final_stage(), "CMD"))
}

/// The command of the Dockerfile's HEALTHCHECK.
fn health_check() -> Vec<String> {
    let arguments = instruction(&final_stage(), "HEALTHCHECK");
    let command = arguments
        .split_once("CMD ")
        .unwrap_or_else(|| panic!("HEALTHCHECK without CMD: {arguments}"))
        .1;
    exec_form(command)
}

#[test]
fn the_image_is_built_in_two_stages_and_runs_unprivileged() {
    let instructions = dockerfile();
    let stages: Vec<&String> = instructions
        .iter()
        .filter(|(keyword, _)| keyword == "FROM")
        .map(|(_, image)| image)
        .collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    assert!(stages[0].starts_with("rust:") && stages[0].ends_with(" AS build"));
    assert!(stages[1].starts_with("debian:") && stages[1].contains("-slim"));

    let stage = final_stage();
    assert!(image_user() != 0, "the server must not run as root");
    let config_path = "/etc/vigil/vigil.toml";
    assert_eq!(image_command(), ["vigil", "run", "--config", config_path]);
    assert!(
        stage.iter().any(|(keyword, arguments)| keyword == "COPY"
            && arguments == &format!("deploy/container/vigil.toml {config_path}")),
        "the container config is the image's {config_path}"
    );
    assert!(
        stage
            .iter()
            .any(|(keyword, arguments)| keyword == "COPY" && arguments.starts_with("--from=build"))
    );

    let volume = exec_form(&instruction(&stage, "VOLUME"));
    assert_eq!(volume, [container_setting(&["data_dir"])]);

    let exposed: BTreeSet<u16> = instruction(&stage, "EXPOSE")
        .split_whitespace()
        .map(|port| port.parse().unwrap())
        .collect();
    assert_eq!(
        exposed,
        Listeners::of(&container_config()).published_ports()
    );

    let check = health_check().join(" ");
    let http_port = Listeners::of(&container_config()).http.port();
    assert!(
        check.contains(&format!("127.0.0.1/{http_port}")) && check.contains("/healthz"),
        "the health check asks /healthz on the HTTP port: {check}"
    );
}

/// Whether a `.dockerignore` pattern (`*` within a component, `**/` in front) excludes `path`
/// or a directory above it.
fn ignored_by(pattern: &str, path: &str) -> bool {
    fn component_matches(pattern: &str, name: &str) -> bool {
        match pattern.split_once('*') {
            None => pattern == name,
            Some((prefix, suffix)) => {
                name.len() >= prefix.len() + suffix.len()
                    && name.starts_with(prefix)
                    && name.ends_with(suffix)
            }
        }
    }
    let components: Vec<&str> = path.split('/').collect();
    let (anywhere, pattern) = match pattern.strip_prefix("**/") {
        Some(rest) => (true, rest),
        None => (false, pattern),
    };
    let pattern: Vec<&str> = pattern.trim_end_matches('/').split('/').collect();
    let starts: Vec<usize> = if anywhere {
        (0..components.len()).collect()
    } else {
        vec![0]
    };
    starts.into_iter().any(|start| {
        components.len() >= start + pattern.len()
            && pattern
                .iter()
                .zip(&components[start..])
                .all(|(pattern, name)| component_matches(pattern, name))
    })
}

#[test]
fn the_build_context_leaves_out_builds_but_keeps_the_sources() {
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect();
    assert!(!patterns.iter().any(|pattern| pattern.starts_with('!')));
    let ignored = |path: &str| patterns.iter().any(|pattern| ignored_by(pattern, path));

    for path in [
        "target/debug/vigil",
        ".git/HEAD",
        "store/target/x",
        "vigil-data/wal",
    ] {
        assert!(ignored(path), "{path} is sent to the image build");
    }

    // Everything the build stage compiles: the workspace's members and the root package.
    let manifest = toml_file("Cargo.toml");
    let members = manifest["workspace"]["members"].as_array().unwrap();
    let mut needed: Vec<String> = members
        .iter()
        .map(|member| format!("{}/Cargo.toml", member.as_str().unwrap()))
        .collect();
    needed.extend(
        [
            "Cargo.toml",
            "Cargo.lock",
            "src/main.rs",
            "proto/build.rs",
            "deploy/container/vigil.toml",
        ]
        .map(str::to_owned),
    );
    for path in &needed {
        assert!(repo_path(path).exists(), "{path} does not exist");
        assert!(!ignored(path), "{path} is left out of the image build");
    }
}

// ---------------------------------------------------------------------------------------------
// Compose, Prometheus and Grafana.

/// `[ip:]host:container` port mappings of a compose service, as (host ip, container port).
fn published(service: &Yaml) -> Vec<(Option<String>, u16)> {
    sequence(service, &["ports"])
        .iter()
        .map(|mapping| {
            let mapping = mapping.as_str().expect("ports as strings");
            let parts: Vec<&str> = mapping.split(':').collect();
            let container = parts.last().unwrap().parse().unwrap();
            let ip = (parts.len() == 3).then(|| parts[0].to_owned());
            (ip, container)
        })
        .collect()
}

/// Bind mounts of a compose service: container path → source path (relative to the file).
fn mounts(service: &Yaml) -> BTreeMap<String, String> {
    sequence(service, &["volumes"])
        .iter()
        .map(|volume| {
            let parts: Vec<&str> = volume.as_str().unwrap().split(':').collect();
            (parts[1].to_owned(), parts[0].to_owned())
        })
        .collect()
}

/// The file a compose bind mount refers to, relative to the repository root.
fn compose_source(source: &str) -> String {
    let path = Path::new("deploy/compose").join(source);
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            std::path::Component::ParentDir => assert!(normal.pop(), "{source} leaves the repo"),
            std::path::Component::CurDir => {}
            other => normal.push(other),
        }
    }
    normal.to_str().unwrap().to_owned()
}

/// `host:port` of a URL or scrape target.
fn host_and_port(address: &str) -> (String, u16) {
    let address = address.split("://").last().unwrap().trim_end_matches('/');
    let (host, port) = address.rsplit_once(':').unwrap();
    (host.to_owned(), port.parse().unwrap())
}

#[test]
fn compose_runs_the_image_with_its_ports_data_and_certificate() {
    let compose = yaml("deploy/compose/single-node.yml");
    let vigil = &compose["services"]["vigil"];
    let listeners = Listeners::of(&container_config());

    assert_eq!(text(vigil, &["build", "dockerfile"]), "deploy/Dockerfile");
    assert_eq!(compose_source(text(vigil, &["build", "context"])), "");

    let ports = published(vigil);
    let container_ports: BTreeSet<u16> = ports.iter().map(|(_, port)| *port).collect();
    assert_eq!(container_ports, listeners.published_ports());
    for (ip, port) in &ports {
        if *port != listeners.mqtt_tls.port() {
            assert_eq!(
                ip.as_deref(),
                Some("127.0.0.1"),
                "port {port} has no TLS: the host's loopback only"
            );
        }
    }

    let mounts = mounts(vigil);
    assert_eq!(
        mounts
            .get(&container_setting(&["data_dir"]))
            .map(String::as_str),
        Some("vigil-data"),
        "the data directory is a named volume"
    );
    for setting in ["tls_cert_path", "tls_key_path"] {
        let directory = parent_dir(&container_setting(&["ingest", setting]));
        assert!(
            mounts.contains_key(&directory),
            "{setting}: nothing mounted at {directory}"
        );
    }

    let nofile = vigil["ulimits"]["nofile"]["soft"].as_u64().unwrap();
    assert!(nofile > DEVICE_CONNECTIONS, "nofile {nofile}");
}

#[test]
fn compose_mounts_the_prometheus_and_grafana_files_where_they_are_looked_for() {
    let compose = yaml("deploy/compose/single-node.yml");
    let services = compose["services"].as_mapping().unwrap();
    let prometheus = &compose["services"]["prometheus"];
    let grafana = &compose["services"]["grafana"];

    // Every file mounted from the repository exists.
    for service in services.values() {
        if service.get("volumes").is_none() {
            continue;
        }
        for source in mounts(service).values() {
            if source.starts_with("../") {
                let path = compose_source(source);
                assert!(repo_path(&path).exists(), "{path} is mounted but missing");
            }
        }
    }

    // Prometheus reads its config and the rule file it names from the mounts.
    let prometheus_mounts = mounts(prometheus);
    let config_flag = sequence(prometheus, &["command"])
        .iter()
        .filter_map(|flag| flag.as_str()?.strip_prefix("--config.file="))
        .next()
        .expect("--config.file");
    assert_eq!(
        compose_source(&prometheus_mounts[config_flag]),
        "deploy/prometheus/prometheus.yml"
    );
    let config = yaml("deploy/prometheus/prometheus.yml");
    for rule_file in sequence(&config, &["rule_files"]) {
        let rule_file = rule_file.as_str().unwrap();
        let target = Path::new(config_flag).parent().unwrap().join(rule_file);
        let source = &prometheus_mounts[target.to_str().unwrap()];
        assert_eq!(
            compose_source(source),
            format!("deploy/prometheus/{rule_file}")
        );
    }

    // The scrape target is the vigil service on its HTTP port.
    let http_port = Listeners::of(&container_config()).http.port();
    let jobs = sequence(&config, &["scrape_configs"]);
    let vigil_job = jobs
        .iter()
        .find(|job| text(job, &["job_name"]) == "vigil")
        .expect("a vigil job");
    for target in sequence(&vigil_job["static_configs"][0], &["targets"]) {
        let (host, port) = host_and_port(target.as_str().unwrap());
        assert!(services.contains_key(host.as_str()), "no service {host}");
        assert_eq!(port, http_port);
    }

    // Grafana's datasource is the Prometheus service, and its dashboard folder holds the
    // dashboard file.
    let datasources = yaml("deploy/grafana/provisioning/datasources/vigil.yml");
    let datasource = &sequence(&datasources, &["datasources"])[0];
    let (host, port) = host_and_port(text(datasource, &["url"]));
    assert_eq!(host, "prometheus");
    assert!(
        published(prometheus)
            .iter()
            .any(|(_, inner)| *inner == port),
        "Prometheus listens on {port}"
    );
    let grafana_mounts = mounts(grafana);
    assert_eq!(
        compose_source(&grafana_mounts["/etc/grafana/provisioning"]),
        "deploy/grafana/provisioning"
    );
    let providers = yaml("deploy/grafana/provisioning/dashboards/vigil.yml");
    let folder = text(
        &sequence(&providers, &["providers"])[0],
        &["options", "path"],
    );
    let dashboard = grafana_mounts
        .iter()
        .find(|(_, source)| source.ends_with("vigil-dashboard.json"))
        .expect("the dashboard is mounted");
    assert_eq!(
        parent_dir(dashboard.0),
        folder,
        "the dashboard is mounted outside the provisioned folder"
    );
}

// ---------------------------------------------------------------------------------------------
// Metric names: the dashboard and the alert rules against a running server's /metrics.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetricType {
    Counter,
    Gauge,
    /// A histogram's `_bucket`, `_sum` and `_count` series.
    HistogramSeries,
}

/// One series name a server exports: its type and the values of each label.
#[derive(Debug)]
struct Series {
    metric_type: MetricType,
    labels: BTreeMap<String, BTreeSet<String>>,
    has_samples: bool,
}

/// Every series name in an OpenMetrics text, from its `# TYPE` lines (so that families without
/// a sample yet are known too) and the labels of its samples.
fn exported_series(metrics: &str) -> BTreeMap<String, Series> {
    let mut series = BTreeMap::new();
    for line in metrics.lines() {
        if let Some(declaration) = line.strip_prefix("# TYPE ") {
            let (family, kind) = declaration.split_once(' ').unwrap();
            let names: Vec<(String, MetricType)> = match kind {
                "counter" => vec![(format!("{family}_total"), MetricType::Counter)],
                "gauge" => vec![(family.to_owned(), MetricType::Gauge)],
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|suffix| (format!("{family}{suffix}"), MetricType::HistogramSeries))
                    .collect(),
                other => panic!("unexpected metric type {other} of {family}"),
            };
            for (name, metric_type) in names {
                series.insert(
                    name,
                    Series {
                        metric_type,
                        labels: BTreeMap::new(),
                        has_samples: false,
                    },
                );
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap();
        let Some(entry) = series.get_mut(&line[..name_end]) else {
            continue;
        };
        entry.has_samples = true;
        if line[name_end..].starts_with('{') {
            let label_text = &line[name_end + 1..line.rfind('}').unwrap()];
            for (label, value) in label_matchers(label_text) {
                entry.labels.entry(label).or_default().insert(value);
            }
        }
    }
    series
}

/// `name="value"` pairs of a label set or of equality matchers (`=~` and `!=` matchers are
/// returned with their operator in the name, e.g. `severity=~`).
fn label_matchers(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let operator_at = rest.find(['=', '!']).unwrap();
        let label = rest[..operator_at].trim().to_owned();
        let after = &rest[operator_at..];
        let operator_len = if after.starts_with("=~") || after.starts_with("!=") {
            2
        } else {
            1
        };
        let operator = &after[..operator_len];
        let value_and_rest = after[operator_len..].trim_start();
        assert!(value_and_rest.starts_with('"'), "quoted value in {text}");
        let close = value_and_rest[1..].find('"').unwrap() + 1;
        let value = value_and_rest[1..close].to_owned();
        let name = if operator == "=" {
            label
        } else {
            format!("{label}{operator}")
        };
        pairs.push((name, value));
        rest = value_and_rest[close + 1..]
            .trim_start()
            .trim_start_matches(',');
        rest = rest.trim_start();
    }
    pairs
}

/// A metric name in a query, where it starts and its `{…}` selector.
#[derive(Debug)]
struct MetricUse {
    name: String,
    start: usize,
    selector: Option<String>,
}

/// The identifiers of a PromQL expression outside quoted strings, with their selectors.
fn identifiers(expression: &str) -> Vec<MetricUse> {
    let bytes = expression.as_bytes();
    let mut found = Vec::new();
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        if byte == b'"' {
            index += 1 + expression[index + 1..].find('"').expect("closed quote") + 1;
        } else if byte.is_ascii_alphabetic() || byte == b'_' || byte == b':' {
            let start = index;
            while index < bytes.len()
                && (bytes[index].is_ascii_alphanumeric() || b"_:".contains(&bytes[index]))
            {
                index += 1;
            }
            let name = expression[start..index].to_owned();
            let selector = (bytes.get(index) == Some(&b'{')).then(|| {
                let close = index + expression[index..].find('}').expect("closed selector");
                let selector = expression[index + 1..close].to_owned();
                index = close + 1;
                selector
            });
            found.push(MetricUse {
                name,
                start,
                selector,
            });
        } else {
            index += 1;
        }
    }
    found
}

/// The name of the innermost function call around byte `position` of `expression`.
fn enclosing_function(expression: &str, position: usize) -> Option<&str> {
    let mut depth = 0;
    for (index, character) in expression[..position].char_indices().rev() {
        match character {
            ')' => depth += 1,
            '(' if depth > 0 => depth -= 1,
            '(' => {
                let before = expression[..index].trim_end();
                let start = before
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .map_or(0, |at| at + 1);
                return Some(&before[start..]);
            }
            _ => {}
        }
    }
    None
}

/// The labels of the `by (…)` clauses of an expression.
fn grouping_labels(expression: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    let mut rest = expression;
    while let Some(at) = rest.find("by (") {
        let inside = &rest[at + 4..];
        let close = inside.find(')').unwrap();
        labels.extend(
            inside[..close]
                .split(',')
                .map(|label| label.trim().to_owned()),
        );
        rest = &inside[close..];
    }
    labels
}

/// Everything wrong with one query against the series the server exports.
fn query_problems(
    expression: &str,
    exported: &BTreeMap<String, Series>,
    where_: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut problem = |text: String| problems.push(format!("{where_}: {text} in `{expression}`"));
    const RATES: [&str; 3] = ["rate", "irate", "increase"];

    let metric_uses: Vec<MetricUse> = identifiers(expression)
        .into_iter()
        .filter(|found| found.name.starts_with("vigil_"))
        .collect();
    if metric_uses.is_empty() {
        problem("no vigil metric".to_owned());
    }
    let mut known_labels = BTreeSet::from(["le".to_owned()]);
    let mut all_have_samples = true;
    for metric_use in &metric_uses {
        let Some(series) = exported.get(&metric_use.name) else {
            problem(format!("{} is not exported", metric_use.name));
            continue;
        };
        all_have_samples &= series.has_samples;
        known_labels.extend(series.labels.keys().cloned());

        let function = enclosing_function(expression, metric_use.start);
        let under_rate = function.is_some_and(|function| RATES.contains(&function));
        match series.metric_type {
            MetricType::Counter | MetricType::HistogramSeries if !under_rate => problem(format!(
                "{} is a counter: it needs rate() or increase()",
                metric_use.name
            )),
            MetricType::Gauge if under_rate => problem(format!(
                "{} is a gauge: rate() of it means nothing",
                metric_use.name
            )),
            _ => {}
        }

        for (label, value) in label_matchers(metric_use.selector.as_deref().unwrap_or("")) {
            if !series.has_samples || label.ends_with('~') || label.ends_with("!=") {
                continue;
            }
            match series.labels.get(&label) {
                None => problem(format!("{} has no label {label}", metric_use.name)),
                Some(values) if !values.contains(&value) => problem(format!(
                    "{} has no {label}=\"{value}\" (it has {values:?})",
                    metric_use.name
                )),
                Some(_) => {}
            }
        }
    }

    if all_have_samples {
        for label in grouping_labels(expression) {
            if !known_labels.contains(&label) {
                problem(format!("no metric here has the label {label}"));
            }
        }
    }
    let mut rest = expression;
    while let Some(at) = rest.find("histogram_quantile(") {
        rest = &rest[at + 1..];
        if !rest.contains("_bucket") || !grouping_labels(rest).contains("le") {
            problem("histogram_quantile needs _bucket series grouped by le".to_owned());
        }
    }
    problems
}

/// Every query of the dashboard with where it is and its legend.
fn dashboard_queries(dashboard: &Json) -> Vec<(String, String, String)> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap();
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            queries.push((
                format!("panel {title}"),
                target["expr"].as_str().unwrap().to_owned(),
                target["legendFormat"].as_str().unwrap_or("").to_owned(),
            ));
        }
    }
    queries
}

fn dashboard() -> Json {
    serde_json::from_str(&read("deploy/grafana/vigil-dashboard.json"))
        .unwrap_or_else(|error| panic!("vigil-dashboard.json: {error}"))
}

fn alert_rules() -> Vec<Yaml> {
    let rules = yaml("deploy/prometheus/vigil-rules.yml");
    sequence(&rules, &["groups"])
        .iter()
        .flat_map(|group| sequence(group, &["rules"]).to_vec())
        .collect()
}

/// A server whose /metrics has every family, the detector's included: those are labelled by
/// severity, kind and detector, and appear with their first alert, event and finding, so one
/// device is made to publish a forged reading (and is cut off for it).
async fn server_with_an_alert(data_dir: &Path) -> Server {
    let server = Server::start(data_dir);
    let device = TestDevice::new("deploy-check-1");
    server.enroll(&[&device]);
    let mut session = V3Device::connect(&device, server.mqtt).await.unwrap();
    let forged = sign_reading(&SigningKey::from_bytes(&[7; 32]), &device.reading(1));
    session
        .client
        .publish(
            device.topic(),
            QoS::AtLeastOnce,
            false,
            forged.encode_to_vec(),
        )
        .await
        .unwrap();
    assert!(
        session.closed_within(Duration::from_secs(10)).await,
        "the forging device was not cut off"
    );
    wait_for(
        || {
            let metrics = server.metrics();
            [
                "vigil_detect_alerts_total{",
                "vigil_detect_findings_total{",
                "vigil_detect_security_events_total{",
            ]
            .iter()
            .all(|series| metrics.contains(series))
        },
        "the detector's metrics after a forged reading",
    )
    .await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_rules_query_what_the_server_exports() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_an_alert(&dir.path().join("data")).await;
    let exported = exported_series(&server.metrics());
    assert!(exported.len() > 20, "too few series: {exported:?}");
    let mut problems = Vec::new();

    let dashboard = dashboard();
    let queries = dashboard_queries(&dashboard);
    for (where_, expression, legend) in &queries {
        problems.extend(query_problems(expression, &exported, where_));
        // A legend `{{reason}}` shows a label only when the query keeps it.
        let mut rest = legend.as_str();
        while let Some(at) = rest.find("{{") {
            let close = rest[at..].find("}}").unwrap() + at;
            let label = rest[at + 2..close].trim();
            if !grouping_labels(expression).contains(label) {
                problems.push(format!(
                    "{where_}: legend {{{{{label}}}}} not kept by the query"
                ));
            }
            rest = &rest[close..];
        }
    }

    let scrape_jobs: BTreeSet<String> = sequence(
        &yaml("deploy/prometheus/prometheus.yml"),
        &["scrape_configs"],
    )
    .iter()
    .map(|job| text(job, &["job_name"]).to_owned())
    .collect();
    for rule in alert_rules() {
        let name = text(&rule, &["alert"]);
        let expression = text(&rule, &["expr"]);
        if let Some(job) = expression
            .split("job=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        {
            assert!(
                scrape_jobs.contains(job),
                "rule {name}: no scrape job {job}"
            );
        }
        if expression.trim_start().starts_with("up{") {
            continue;
        }
        problems.extend(query_problems(
            expression,
            &exported,
            &format!("rule {name}"),
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The dashboard shows each thing an operator looks for first.
    let used: BTreeSet<String> = queries
        .iter()
        .flat_map(|(_, expression, _)| identifiers(expression))
        .map(|found| found.name)
        .collect();
    for needed in [
        "vigil_ingest_readings_accepted_total",
        "vigil_ingest_readings_refused_total",
        "vigil_ingest_puback_latency_seconds_bucket",
        "vigil_store_wal_fsync_seconds_bucket",
        "vigil_store_queue_depth",
        "vigil_ingest_verifier_queue_depth",
        "vigil_detect_queue_depth",
        "vigil_ingest_connected_devices",
        "vigil_detect_quarantines_total",
        "vigil_detect_alerts_total",
        "vigil_grpc_auth_failures_total",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
    let refused_by_reason = queries.iter().any(|(_, expression, _)| {
        expression.contains("vigil_ingest_readings_refused_total")
            && grouping_labels(expression).contains("reason")
    });
    assert!(
        refused_by_reason,
        "refused readings are not broken down by reason"
    );

    // The Docker health check passes against a live server.
    let check = health_check();
    let container_http = Listeners::of(&container_config()).http.port();
    let check: Vec<String> = check
        .iter()
        .map(|part| {
            part.replace(
                &format!("/{container_http} "),
                &format!("/{} ", server.http.port()),
            )
        })
        .collect();
    let status = Command::new(&check[0]).args(&check[1..]).status().unwrap();
    assert!(status.success(), "health check {check:?} fails");

    // So do the Kubernetes probes.
    let objects = kubernetes();
    let container = &sequence(
        &of_kind(&objects, "StatefulSet")[0]["spec"]["template"]["spec"],
        &["containers"],
    )[0];
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let path = text(container, &[probe, "httpGet", "path"]);
        assert_eq!(
            http_get(server.http, path).as_deref(),
            Some("ok\n"),
            "{probe}"
        );
    }
}

#[test]
fn the_dashboard_is_well_formed_and_uses_the_provisioned_datasource() {
    let dashboard = dashboard();
    let datasources = yaml("deploy/grafana/provisioning/datasources/vigil.yml");
    let datasource = &sequence(&datasources, &["datasources"])[0];
    let uid = text(datasource, &["uid"]);
    assert_eq!(text(datasource, &["type"]), "prometheus");

    assert!(dashboard["uid"].as_str().is_some_and(|uid| !uid.is_empty()));
    assert!(dashboard["schemaVersion"].as_u64().is_some());
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "panel id of {title} reused"
        );
        let grid = &panel["gridPos"];
        let right = grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap();
        assert!(right <= 24, "panel {title} is wider than the dashboard");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], uid, "panel {title}");
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], uid, "panel {title}");
        }
    }
}

#[test]
fn every_alert_rule_says_how_bad_and_what_happened() {
    let rules = alert_rules();
    let names: BTreeSet<&str> = rules.iter().map(|rule| text(rule, &["alert"])).collect();
    assert_eq!(names.len(), rules.len(), "alert names repeat");
    for rule in &rules {
        let name = text(rule, &["alert"]);
        let severity = text(rule, &["labels", "severity"]);
        assert!(
            ["critical", "warning"].contains(&severity),
            "{name}: {severity}"
        );
        assert!(!text(rule, &["annotations", "summary"]).is_empty());
    }
    let expressions: Vec<&str> = rules.iter().map(|rule| text(rule, &["expr"])).collect();
    for needed in [
        "vigil_ingest_readings_refused_total",
        "vigil_store_wal_fsync_seconds_bucket",
        "vigil_detect_quarantines_total",
    ] {
        assert!(
            expressions
                .iter()
                .any(|expression| expression.contains(needed)),
            "no rule on {needed}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes.

fn kubernetes() -> Vec<Yaml> {
    let kustomization = yaml("deploy/k8s/kustomization.yaml");
    sequence(&kustomization, &["resources"])
        .iter()
        .flat_map(|file| yaml_documents(&format!("deploy/k8s/{}", file.as_str().unwrap())))
        .collect()
}

fn of_kind<'a>(objects: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    objects
        .iter()
        .filter(|object| object["kind"].as_str() == Some(kind))
        .collect()
}

/// Whether a selector's labels are all among `labels`.
fn selects(selector: &Yaml, labels: &Yaml) -> bool {
    let selector = selector.as_mapping().expect("a selector");
    !selector.is_empty()
        && selector
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
}

#[test]
fn the_kubernetes_node_runs_the_image_with_its_config_data_and_certificate() {
    let objects = kubernetes();
    let statefulsets = of_kind(&objects, "StatefulSet");
    assert_eq!(statefulsets.len(), 1);
    let statefulset = statefulsets[0];
    let spec = &statefulset["spec"];
    assert_eq!(spec["replicas"].as_u64(), Some(1));
    let pod = &spec["template"]["spec"];
    let pod_labels = &spec["template"]["metadata"]["labels"];
    assert!(selects(&spec["selector"]["matchLabels"], pod_labels));
    let containers = sequence(pod, &["containers"]);
    assert_eq!(containers.len(), 1);
    let container = &containers[0];

    // The image's command and user.
    let command: Vec<&str> = sequence(container, &["command"])
        .iter()
        .map(|part| part.as_str().unwrap())
        .collect();
    assert_eq!(command, image_command());
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        pod["securityContext"]["runAsUser"].as_u64(),
        Some(image_user())
    );
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"].as_bool(),
        Some(false)
    );

    // Ports: the container config's, by name.
    let listeners = Listeners::of(&container_config());
    let container_ports: BTreeMap<String, u16> = sequence(container, &["ports"])
        .iter()
        .map(|port| {
            let number = port["containerPort"].as_u64().unwrap() as u16;
            (text(port, &["name"]).to_owned(), number)
        })
        .collect();
    assert_eq!(
        container_ports.values().copied().collect::<BTreeSet<_>>(),
        listeners.published_ports()
    );

    // Probes ask /healthz on the HTTP port.
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &container[probe]["httpGet"];
        assert_eq!(text(get, &["path"]), "/healthz", "{probe}");
        let port = container_ports[text(get, &["port"])];
        assert_eq!(port, listeners.http.port(), "{probe}");
    }
    for bound in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                container["resources"][bound][resource].is_string(),
                "no {bound}.{resource}"
            );
        }
    }

    // Mounts: the data volume at data_dir, the config file where the command reads it, the
    // TLS secret where the config looks for the certificate and key.
    let mounts: BTreeMap<&str, &Yaml> = sequence(container, &["volumeMounts"])
        .iter()
        .map(|mount| (text(mount, &["mountPath"]), mount))
        .collect();
    let volumes: BTreeMap<&str, &Yaml> = sequence(pod, &["volumes"])
        .iter()
        .map(|volume| (text(volume, &["name"]), volume))
        .collect();
    let data_dir = container_setting(&["data_dir"]);
    let data_claim = text(mounts[data_dir.as_str()], &["name"]);
    let claims: Vec<&str> = sequence(spec, &["volumeClaimTemplates"])
        .iter()
        .map(|claim| text(claim, &["metadata", "name"]))
        .collect();
    assert_eq!(
        claims,
        [data_claim],
        "the data directory is not on the claim"
    );

    let config_path = command.last().unwrap();
    let config_mount = mounts[*config_path];
    let config_map_name = text(
        volumes[text(config_mount, &["name"])],
        &["configMap", "name"],
    );
    let config_maps = of_kind(&objects, "ConfigMap");
    let config_map = config_maps
        .iter()
        .find(|map| text(map, &["metadata", "name"]) == config_map_name)
        .expect("the mounted ConfigMap is defined");
    let key = text(config_mount, &["subPath"]);
    assert_eq!(
        text(config_map, &["data", key]),
        read("deploy/container/vigil.toml"),
        "the ConfigMap's vigil.toml differs from deploy/container/vigil.toml"
    );

    let cert = container_setting(&["ingest", "tls_cert_path"]);
    let key = container_setting(&["ingest", "tls_key_path"]);
    let tls_directory = parent_dir(&cert);
    assert_eq!(parent_dir(&key), tls_directory);
    let tls_volume = volumes[text(mounts[tls_directory.as_str()], &["name"])];
    assert!(tls_volume["secret"]["secretName"].is_string());
    // A secret of type kubernetes.io/tls holds tls.crt and tls.key.
    assert!(cert.ends_with("/tls.crt") && key.ends_with("/tls.key"));

    // Services: MQTT over TLS through a TCP load balancer, gRPC and HTTP inside the cluster,
    // and the governing service of the StatefulSet.
    let services = of_kind(&objects, "Service");
    for service in &services {
        assert!(selects(&service["spec"]["selector"], pod_labels));
        for port in sequence(service, &["spec", "ports"]) {
            let target = text(port, &["targetPort"]);
            assert!(
                container_ports.contains_key(target),
                "no port named {target}"
            );
        }
    }
    let exposed = |service_type: &str| -> BTreeSet<u16> {
        services
            .iter()
            .filter(|service| service["spec"]["type"].as_str() == Some(service_type))
            .flat_map(|service| sequence(service, &["spec", "ports"]))
            .map(|port| container_ports[text(port, &["targetPort"])])
            .collect()
    };
    assert_eq!(exposed("LoadBalancer"), [listeners.mqtt_tls.port()].into());
    assert_eq!(
        exposed("ClusterIP"),
        [listeners.grpc.port(), listeners.http.port()].into()
    );
    let governing = text(spec, &["serviceName"]);
    assert!(
        services.iter().any(|service| {
            text(service, &["metadata", "name"]) == governing
                && service["spec"]["clusterIP"].as_str() == Some("None")
        }),
        "the StatefulSet's serviceName {governing} is not a headless service"
    );
}

// ---------------------------------------------------------------------------------------------
// systemd.

/// `key → values` of one section of a unit file (keys may repeat).
fn unit_section(unit: &str, section: &str) -> BTreeMap<String, Vec<String>> {
    let mut entries: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut inside = false;
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == format!("[{section}]");
        } else if inside && !line.is_empty() && !line.starts_with('#') {
            let (key, value) = line.split_once('=').unwrap();
            entries
                .entry(key.to_owned())
                .or_default()
                .push(value.to_owned());
        }
    }
    entries
}

#[test]
fn the_systemd_unit_is_hardened_and_holds_the_fleet_s_connections() {
    let unit = read("deploy/systemd/vigil.service");
    let service = unit_section(&unit, "Service");
    let one = |key: &str| -> &str {
        let values = service
            .get(key)
            .unwrap_or_else(|| panic!("[Service] has no {key}"));
        assert_eq!(values.len(), 1, "{key} set more than once");
        &values[0]
    };

    for (key, expected) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("StateDirectory", "vigil"),
        ("UMask", "0077"),
        ("CapabilityBoundingSet", ""),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(one(key), expected, "{key}");
    }
    assert!(one("RestartSec").ends_with('s'));
    let user = one("User");
    assert!(!["root", "0", ""].contains(&user));
    let sysusers = read("deploy/systemd/vigil.sysusers");
    assert!(
        sysusers
            .lines()
            .any(|line| line.split_whitespace().take(2).eq(["u", user])),
        "vigil.sysusers does not create {user}"
    );

    let open_files: u64 = one("LimitNOFILE").parse().unwrap();
    assert!(
        open_files >= 4 * DEVICE_CONNECTIONS,
        "LimitNOFILE {open_files}"
    );

    let exec: Vec<&str> = one("ExecStart").split_whitespace().collect();
    let image = image_command();
    assert_eq!(exec[0], "/usr/local/bin/vigil");
    assert_eq!(&exec[1..image.len()], &image[1..], "the image's arguments");
    let state_directory = format!("/var/lib/{}", one("StateDirectory"));
    assert_eq!(
        &exec[image.len()..],
        ["--data-dir", state_directory.as_str()]
    );
    assert_eq!(
        unit_section(&unit, "Install")["WantedBy"],
        ["multi-user.target"]
    );

    // systemd's own reading of the unit, with the test's binary in place of the installed one.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("vigil.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/vigil", BIN)).unwrap();
    match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
    {
        Ok(output) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let complaints: Vec<&str> = stderr
                .lines()
                .filter(|line| line.contains("vigil.service"))
                .collect();
            assert!(
                output.status.success() && complaints.is_empty(),
                "systemd-analyze verify: {stderr}"
            );
        }
        Err(_) => {
            println!("systemd-analyze is not installed: unit checked by the rules above only")
        }
    }
}

#[test]
fn promtool_accepts_the_prometheus_config_and_rules_when_installed() {
    let config = repo_path("deploy/prometheus/prometheus.yml");
    let rules = repo_path("deploy/prometheus/vigil-rules.yml");
    for args in [
        vec!["check".as_ref(), "config".as_ref(), config.as_os_str()],
        vec!["check".as_ref(), "rules".as_ref(), rules.as_os_str()],
    ] {
        match Command::new("promtool").args(&args).output() {
            Ok(output) => assert!(
                output.status.success(),
                "promtool {args:?}: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(_) => {
                println!(
                    "promtool is not installed: Prometheus files checked by the rules above only"
                );
                return;
            }
        }
    }
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    fn yaml_files(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                yaml_files(&path, found);
            } else if path
                .extension()
                .is_some_and(|extension| extension == "yml" || extension == "yaml")
            {
                found.push(path);
            }
        }
    }
    let root = repo_path("");
    let mut found = Vec::new();
    yaml_files(&root.join("deploy"), &mut found);
    assert!(found.len() >= 10, "YAML files: {found:?}");
    for path in found {
        let relative = path
            .strip_prefix(&root)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let documents = yaml_documents(&relative);
        assert!(
            documents.iter().all(Yaml::is_mapping),
            "{relative}: every document is a mapping"
        );
    }
}
