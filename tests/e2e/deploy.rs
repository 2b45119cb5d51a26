//! The deployment files under `deploy/`, checked against the server they deploy and against
//! each other: every metric the dashboard and the alert rules query is one a running server
//! exports, used as its type allows (counters and histogram buckets under `rate`), with labels it
//! carries; the ports, paths, user and command agree between the example config, the container
//! config, the Dockerfile, compose and Kubernetes; the systemd unit keeps its hardening. Where
//! `systemd-analyze` and `promtool` are installed they check the unit and the Prometheus files
//! as well. (That the one-node container and Kubernetes configs load with the server's own config
//! loader is tested beside the loader, in `src/config.rs`.)
//!
//! The cluster files are checked the same way, and for what makes a cluster: each role's config
//! loads with the server's loader and names its role, the three share their Kafka and shared
//! tables directory; compose runs Kafka with a health check the nodes wait for, two nodes of
//! each role, each with a data volume of its own and all with the shared one; Kubernetes runs
//! a StatefulSet of two replicas per role, every pod on the ReadWriteMany claim, the devices'
//! load balancer in front of the gateways only.

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
use vigil_config::{Role, VigilConfig};
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

/// The roles of a cluster, each with its config beside the one-node container config.
const ROLES: [Role; 3] = [Role::Gateway, Role::Store, Role::Detect];

fn role_config_file(role: Role) -> String {
    format!("deploy/container/{}.toml", role.as_str())
}

/// Every config a container runs: one node's and each cluster role's.
fn container_config_files() -> Vec<String> {
    let mut files = vec!["deploy/container/vigil.toml".to_owned()];
    files.extend(ROLES.map(role_config_file));
    files
}

/// A config file of the repository, through the server's own loader (unknown fields refused).
fn load_config(relative: &str) -> VigilConfig {
    VigilConfig::load(&repo_path(relative)).unwrap_or_else(|error| panic!("{error}"))
}

/// Whether the server opens its gRPC port with this config: on a non-loopback address only with
/// a certificate or `grpc_allow_plaintext` (`ServerConfig::grpc_tls` in `src/config.rs`).
fn grpc_starts(config: &VigilConfig) -> bool {
    match (&config.grpc_tls_cert_path, &config.grpc_tls_key_path) {
        (Some(_), Some(_)) => true,
        (None, None) => config.grpc_listen.ip().is_loopback() || config.grpc_allow_plaintext,
        _ => false,
    }
}

#[test]
fn every_container_config_loads_and_opens_the_same_ports() {
    let one_node = container_config();
    for relative in container_config_files() {
        let config = load_config(&relative);
        assert!(
            grpc_starts(&config),
            "{relative}: the server refuses plaintext gRPC on {} without grpc_allow_plaintext",
            config.grpc_listen
        );
        // What every container shares: the image's volume, the listeners, JSON logs.
        let table = toml_file(&relative);
        for key in [
            "data_dir",
            "grpc_listen",
            "grpc_allow_plaintext",
            "http_listen",
            "log_format",
        ] {
            assert_eq!(table.get(key), one_node.get(key), "{relative}: {key}");
        }
    }
}

#[test]
fn the_cluster_configs_name_their_role_and_share_kafka_and_the_tables() {
    let one_node = container_config();
    let mut sections: Vec<(String, toml::Table)> = Vec::new();
    for role in ROLES {
        let relative = role_config_file(role);
        let config = load_config(&relative);
        let cluster = &config.cluster;
        assert_eq!(cluster.role, role, "{relative}");
        assert!(
            cluster.shared_dir.is_absolute(),
            "{relative}: shared_dir is the mount point of the shared volume"
        );
        assert!(
            !cluster.shared_dir.starts_with(&config.data_dir)
                && !config.data_dir.starts_with(&cluster.shared_dir),
            "{relative}: the node's own data and the shared tables are separate volumes"
        );
        for broker in cluster.brokers.split(',') {
            let (host, port) = broker
                .rsplit_once(':')
                .unwrap_or_else(|| panic!("{relative}: broker {broker} is not host:port"));
            assert!(
                !host.is_empty() && port.parse::<u16>().is_ok(),
                "{relative}: broker {broker}"
            );
        }
        assert!(cluster.replication_factor >= 1, "{relative}");

        // The gateways take the devices as one node does; the workers take no devices.
        let table = toml_file(&relative);
        if role == Role::Gateway {
            assert_eq!(table.get("ingest"), one_node.get("ingest"), "{relative}");
        } else {
            assert!(
                table.get("ingest").is_none(),
                "{relative}: a worker has no MQTT listener to configure"
            );
        }
        let mut section = table["cluster"]
            .as_table()
            .unwrap_or_else(|| panic!("{relative}: no [cluster] table"))
            .clone();
        assert_eq!(
            section
                .remove("role")
                .as_ref()
                .and_then(toml::Value::as_str),
            Some(role.as_str()),
            "{relative}: the role is set in the file"
        );
        sections.push((relative, section));
    }
    let (first, first_section) = &sections[0];
    for (relative, section) in &sections[1..] {
        assert_eq!(
            section, first_section,
            "{relative} and {first}: [cluster] differs beyond the role"
        );
    }

    // The image holds the shared directory's mount point, owned by the server's user: a new
    // named volume mounted there takes that owner, and the server can write to it.
    let shared_dir = load_config(first).cluster.shared_dir;
    let shared_dir = shared_dir.to_str().unwrap();
    let uid = image_user();
    let commands: Vec<String> = final_stage()
        .iter()
        .filter(|(keyword, _)| keyword == "RUN")
        .flat_map(|(_, arguments)| {
            arguments
                .split("&&")
                .map(|command| command.trim().to_owned())
        })
        .collect();
    let user = commands
        .iter()
        .find(|command| {
            command.starts_with("useradd") && command.contains(&format!("--uid {uid} "))
        })
        .and_then(|command| command.split_whitespace().last())
        .expect("useradd of the image's user");
    assert!(
        commands.iter().any(|command| {
            command.starts_with("install -d")
                && command.split_whitespace().any(|word| word == shared_dir)
                && (command.contains(&format!("-o {user} "))
                    || command.contains(&format!("-o {uid} ")))
        }),
        "the image does not make {shared_dir} for user {user}"
    );
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

/// A compose file with its `<<: *anchor` merge keys applied.
fn compose_file(relative: &str) -> Yaml {
    let mut compose = yaml(relative);
    compose
        .apply_merge()
        .unwrap_or_else(|error| panic!("{relative}: {error}"));
    compose
}

/// The Prometheus and Grafana of a compose file: every file it mounts from the repository
/// exists, Prometheus reads `prometheus_config` and the rule files it names from its mounts,
/// Grafana its datasource and dashboard. Returns the hosts the `vigil` scrape job scrapes, each
/// a service of the file on vigil's HTTP port.
fn assert_monitoring(relative: &str, prometheus_config: &str) -> BTreeSet<String> {
    let compose = compose_file(relative);
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
        prometheus_config,
        "{relative}"
    );
    let config = yaml(prometheus_config);
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
    let mut scraped = BTreeSet::new();
    for static_config in sequence(vigil_job, &["static_configs"]) {
        for target in sequence(static_config, &["targets"]) {
            let (host, port) = host_and_port(target.as_str().unwrap());
            assert!(services.contains_key(host.as_str()), "no service {host}");
            assert_eq!(port, http_port);
            assert!(
                scraped.insert(host),
                "{prometheus_config}: a target repeats"
            );
        }
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
    scraped
}

#[test]
fn compose_mounts_the_prometheus_and_grafana_files_where_they_are_looked_for() {
    let scraped = assert_monitoring(
        "deploy/compose/single-node.yml",
        "deploy/prometheus/prometheus.yml",
    );
    assert_eq!(scraped, BTreeSet::from(["vigil".to_owned()]));
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
// The cluster: compose with a Kafka of its own, Kubernetes around a Kafka the cluster brings.

/// `[ip:]host:container` port mappings of a compose service, as (host ip, host port, container
/// port).
fn port_mappings(service: &Yaml) -> Vec<(Option<String>, u16, u16)> {
    if service.get("ports").is_none() {
        return Vec::new();
    }
    sequence(service, &["ports"])
        .iter()
        .map(|mapping| {
            let mapping = mapping.as_str().expect("ports as strings");
            let port = |text: &str| -> u16 {
                text.parse()
                    .unwrap_or_else(|_| panic!("port mapping {mapping}"))
            };
            match mapping.split(':').collect::<Vec<_>>().as_slice() {
                [host, container] => (None, port(host), port(container)),
                [ip, host, container] => (Some((*ip).to_owned()), port(host), port(container)),
                _ => panic!("port mapping {mapping}"),
            }
        })
        .collect()
}

/// The one Kafka address of the role configs.
fn cluster_brokers() -> String {
    let brokers: BTreeSet<String> = ROLES
        .iter()
        .map(|role| load_config(&role_config_file(*role)).cluster.brokers)
        .collect();
    assert_eq!(
        brokers.len(),
        1,
        "the roles know different Kafkas: {brokers:?}"
    );
    brokers.into_iter().next().unwrap()
}

#[test]
fn compose_runs_two_nodes_of_each_role_around_kafka_and_one_shared_volume() {
    let compose = compose_file("deploy/compose/cluster.yml");
    let single_node = compose_file("deploy/compose/single-node.yml");
    let image = text(&single_node["services"]["vigil"], &["image"]);
    let command = image_command();
    let config_path = command.last().unwrap();
    let services = compose["services"].as_mapping().unwrap();
    let declared: BTreeSet<&str> = compose["volumes"]
        .as_mapping()
        .expect("named volumes")
        .keys()
        .map(|name| name.as_str().unwrap())
        .collect();
    let named_volume = |source: &str| declared.contains(source);
    let brokers = cluster_brokers();
    let (kafka_host, kafka_port) = host_and_port(&brokers);

    let mut nodes: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut data_volumes = BTreeSet::new();
    let mut shared_volumes = BTreeSet::new();
    let mut host_ports = BTreeSet::new();
    let mut partitions = BTreeSet::new();
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let ports = port_mappings(service);
        for (_, host, _) in &ports {
            assert!(host_ports.insert(*host), "host port {host} published twice");
        }
        if service["image"].as_str() != Some(image) {
            continue;
        }

        // The image, with its command, reading its role's config.
        assert_eq!(text(service, &["build", "dockerfile"]), "deploy/Dockerfile");
        assert_eq!(compose_source(text(service, &["build", "context"])), "");
        assert!(
            service.get("command").is_none(),
            "{name}: the image's command"
        );
        let mounts = mounts(service);
        let config_file = compose_source(
            mounts
                .get(config_path.as_str())
                .unwrap_or_else(|| panic!("{name}: no config at {config_path}")),
        );
        let config = load_config(&config_file);
        let role = config.cluster.role;
        assert_eq!(config_file, role_config_file(role), "{name}");
        assert!(
            name.starts_with(role.as_str()),
            "{name} runs the {} role",
            role.as_str()
        );
        nodes
            .entry(role.as_str())
            .or_default()
            .push(name.to_owned());
        partitions.insert(config.cluster.partitions);

        // A data volume of its own, and the one shared volume.
        let data_dir = config.data_dir.to_str().unwrap();
        let data = mounts
            .get(data_dir)
            .unwrap_or_else(|| panic!("{name}: nothing mounted at {data_dir}"));
        assert!(
            named_volume(data.as_str()),
            "{name}: {data_dir} is not a named volume"
        );
        assert!(
            data_volumes.insert(data.clone()),
            "{name}: data volume {data} shared with another node"
        );
        let shared_dir = config.cluster.shared_dir.to_str().unwrap();
        let shared = mounts
            .get(shared_dir)
            .unwrap_or_else(|| panic!("{name}: the shared tables ({shared_dir}) are not mounted"));
        assert!(
            named_volume(shared.as_str()),
            "{name}: {shared_dir} is not a named volume"
        );
        shared_volumes.insert(shared.clone());

        // Kafka first: every node checks, or creates, the topics as it starts.
        assert_eq!(
            service["depends_on"][kafka_host.as_str()]["condition"].as_str(),
            Some("service_healthy"),
            "{name} does not wait for Kafka's health check"
        );

        // Devices reach the gateways over TLS; everything else stays on the host's loopback.
        for (ip, host, container) in &ports {
            if role == Role::Gateway && *container == config.ingest.mqtt_tls_listen.port() {
                continue;
            }
            assert_eq!(
                ip.as_deref(),
                Some("127.0.0.1"),
                "{name}: port {host} has no TLS: the host's loopback only"
            );
        }
        let published_container_ports: BTreeSet<u16> =
            ports.iter().map(|(_, _, container)| *container).collect();
        match role {
            Role::Gateway => {
                assert!(
                    published_container_ports.contains(&config.ingest.mqtt_tls_listen.port()),
                    "{name}: devices cannot reach it"
                );
                for path in [&config.ingest.tls_cert_path, &config.ingest.tls_key_path] {
                    let path = path.as_ref().expect("a gateway takes MQTT over TLS");
                    let directory = parent_dir(path.to_str().unwrap());
                    assert!(
                        mounts.contains_key(&directory),
                        "{name}: nothing mounted at {directory}"
                    );
                }
                let nofile = service["ulimits"]["nofile"]["soft"].as_u64().unwrap();
                assert!(nofile > DEVICE_CONNECTIONS, "{name}: nofile {nofile}");
            }
            // The SOC follows every detect worker: each keeps the alerts it raises.
            Role::Detect => assert!(
                published_container_ports.contains(&config.grpc_listen.port()),
                "{name}: the SOC cannot reach its alerts"
            ),
            _ => {}
        }
    }
    let roles: BTreeSet<&str> = nodes.keys().copied().collect();
    assert_eq!(roles, ROLES.map(Role::as_str).into());
    for (role, names) in &nodes {
        assert_eq!(names.len(), 2, "{role} nodes: {names:?}");
    }
    assert_eq!(
        shared_volumes.len(),
        1,
        "every node mounts the same shared volume: {shared_volumes:?}"
    );
    assert!(data_volumes.is_disjoint(&shared_volumes));
    let partitions = partitions.into_iter().next().unwrap();
    for role in ["store", "detect"] {
        assert!(
            partitions >= nodes[role].len() as i32,
            "{role} workers beyond the {partitions} partitions would idle"
        );
    }

    // Kafka: one KRaft node that answers at the configs' brokers address, its log on a named
    // volume, with the health check the nodes wait for.
    let kafka = &compose["services"][kafka_host.as_str()];
    assert!(kafka.is_mapping(), "no service {kafka_host}");
    assert!(text(kafka, &["image"]).starts_with("apache/kafka:"));
    let environment = |key: &str| text(kafka, &["environment", key]);
    let process_roles: BTreeSet<&str> = environment("KAFKA_PROCESS_ROLES").split(',').collect();
    assert_eq!(
        process_roles,
        ["broker", "controller"].into(),
        "KRaft, one node"
    );
    assert!(!environment("KAFKA_CONTROLLER_QUORUM_VOTERS").is_empty());
    assert!(!environment("CLUSTER_ID").is_empty());
    assert!(
        environment("KAFKA_ADVERTISED_LISTENERS")
            .split(',')
            .any(|listener| listener.ends_with(&format!("://{brokers}"))),
        "Kafka does not advertise {brokers}"
    );
    assert!(
        environment("KAFKA_LISTENERS")
            .split(',')
            .any(|listener| listener.ends_with(&format!(":{kafka_port}"))),
        "Kafka does not listen on {kafka_port}"
    );
    // One broker: one replica of everything.
    assert_eq!(environment("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"), "1");
    for role in ROLES {
        let config = load_config(&role_config_file(role));
        assert_eq!(config.cluster.replication_factor, 1, "one broker");
    }
    let log_dir = environment("KAFKA_LOG_DIRS");
    assert!(
        mounts(kafka)
            .get(log_dir)
            .is_some_and(|source| named_volume(source.as_str())),
        "Kafka's log ({log_dir}) is not on a named volume"
    );
    let check: Vec<&str> = sequence(kafka, &["healthcheck", "test"])
        .iter()
        .map(|part| part.as_str().unwrap())
        .collect();
    assert!(
        check
            .iter()
            .any(|part| part.ends_with(&format!(":{kafka_port}"))),
        "Kafka's health check does not ask its port: {check:?}"
    );

    // Prometheus scrapes every node; Grafana is the one of one node.
    let scraped = assert_monitoring(
        "deploy/compose/cluster.yml",
        "deploy/prometheus/prometheus-cluster.yml",
    );
    let all_nodes: BTreeSet<String> = nodes.values().flatten().cloned().collect();
    assert_eq!(scraped, all_nodes, "Prometheus scrapes every node");
    assert_eq!(
        mounts(&compose["services"]["grafana"]),
        mounts(&single_node["services"]["grafana"])
    );
}

fn kubernetes_cluster() -> Vec<Yaml> {
    let kustomization = yaml("deploy/k8s/cluster/kustomization.yaml");
    sequence(&kustomization, &["resources"])
        .iter()
        .flat_map(|file| yaml_documents(&format!("deploy/k8s/cluster/{}", file.as_str().unwrap())))
        .collect()
}

/// One role's StatefulSet, as the services see it.
#[derive(Debug)]
struct RolePods {
    pod_labels: Yaml,
    /// Container port numbers by name.
    ports: BTreeMap<String, u16>,
    config: VigilConfig,
}

#[test]
fn the_kubernetes_cluster_runs_each_role_as_a_statefulset_on_the_shared_claim() {
    let objects = kubernetes_cluster();
    // The namespace of one node (deploy/k8s/namespace.yaml), made beforehand.
    assert_eq!(
        text(
            &yaml("deploy/k8s/cluster/kustomization.yaml"),
            &["namespace"]
        ),
        text(&yaml("deploy/k8s/namespace.yaml"), &["metadata", "name"])
    );

    let claims = of_kind(&objects, "PersistentVolumeClaim");
    assert_eq!(claims.len(), 1, "one claim, for the shared tables");
    let shared_claim = claims[0];
    assert!(
        sequence(shared_claim, &["spec", "accessModes"])
            .iter()
            .any(|mode| mode.as_str() == Some("ReadWriteMany")),
        "every pod of every role mounts the shared tables at once"
    );
    let shared_claim_name = text(shared_claim, &["metadata", "name"]);
    let config_maps = of_kind(&objects, "ConfigMap");
    let services = of_kind(&objects, "Service");

    let statefulsets = of_kind(&objects, "StatefulSet");
    assert_eq!(statefulsets.len(), ROLES.len());
    let command = image_command();
    let mut roles: BTreeMap<&str, RolePods> = BTreeMap::new();
    for statefulset in &statefulsets {
        let name = text(statefulset, &["metadata", "name"]);
        let spec = &statefulset["spec"];
        assert_eq!(spec["replicas"].as_u64(), Some(2), "{name}");
        let pod = &spec["template"]["spec"];
        let pod_labels = &spec["template"]["metadata"]["labels"];
        assert!(
            selects(&spec["selector"]["matchLabels"], pod_labels),
            "{name}"
        );
        let containers = sequence(pod, &["containers"]);
        assert_eq!(containers.len(), 1, "{name}");
        let container = &containers[0];

        // The image's command and user, unprivileged.
        let container_command: Vec<&str> = sequence(container, &["command"])
            .iter()
            .map(|part| part.as_str().unwrap())
            .collect();
        assert_eq!(container_command, command, "{name}");
        assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
        assert_eq!(
            pod["securityContext"]["runAsUser"].as_u64(),
            Some(image_user()),
            "{name}"
        );
        let security = &container["securityContext"];
        assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
        assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));

        // The role's config, from the ConfigMap, where the command reads it.
        let mounts: BTreeMap<&str, &Yaml> = sequence(container, &["volumeMounts"])
            .iter()
            .map(|mount| (text(mount, &["mountPath"]), mount))
            .collect();
        let volumes: BTreeMap<&str, &Yaml> = sequence(pod, &["volumes"])
            .iter()
            .map(|volume| (text(volume, &["name"]), volume))
            .collect();
        let volume_at = |path: &str| -> &Yaml {
            let mount = mounts
                .get(path)
                .unwrap_or_else(|| panic!("{name}: nothing mounted at {path}"));
            volumes[text(mount, &["name"])]
        };
        let config_mount = mounts[command.last().unwrap().as_str()];
        let config_map_name = text(
            volume_at(command.last().unwrap().as_str()),
            &["configMap", "name"],
        );
        let config_map = config_maps
            .iter()
            .find(|map| text(map, &["metadata", "name"]) == config_map_name)
            .expect("the mounted ConfigMap is defined");
        let key = text(config_mount, &["subPath"]);
        let embedded = text(config_map, &["data", key]);
        let config = VigilConfig::parse(embedded)
            .unwrap_or_else(|error| panic!("{name}: the ConfigMap's {key}: {error}"));
        let role = config.cluster.role;
        assert_eq!(
            embedded,
            read(&role_config_file(role)),
            "{name}: the ConfigMap's {key} differs from {}",
            role_config_file(role)
        );

        // Ports: gRPC and HTTP, and MQTT over TLS on the gateways only.
        let ports: BTreeMap<String, u16> = sequence(container, &["ports"])
            .iter()
            .map(|port| {
                let number = port["containerPort"].as_u64().unwrap() as u16;
                (text(port, &["name"]).to_owned(), number)
            })
            .collect();
        let mut expected: BTreeSet<u16> =
            [config.grpc_listen.port(), config.http_listen.port()].into();
        if role == Role::Gateway {
            expected.insert(config.ingest.mqtt_tls_listen.port());
        }
        assert_eq!(
            ports.values().copied().collect::<BTreeSet<_>>(),
            expected,
            "{name}"
        );
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            let get = &container[probe]["httpGet"];
            assert_eq!(text(get, &["path"]), "/healthz", "{name}: {probe}");
            assert_eq!(
                ports[text(get, &["port"])],
                config.http_listen.port(),
                "{name}: {probe}"
            );
        }
        for bound in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    container["resources"][bound][resource].is_string(),
                    "{name}: no {bound}.{resource}"
                );
            }
        }
        let annotations = &spec["template"]["metadata"]["annotations"];
        assert_eq!(
            text(annotations, &["prometheus.io/scrape"]),
            "true",
            "{name}"
        );
        assert_eq!(
            text(annotations, &["prometheus.io/port"]),
            config.http_listen.port().to_string(),
            "{name}"
        );
        assert_eq!(text(annotations, &["prometheus.io/path"]), "/metrics");

        // The data directory on the pod's own claim, the shared tables on the shared claim.
        let data_dir = config.data_dir.to_str().unwrap();
        let data_claim = text(mounts[data_dir], &["name"]);
        let templates = sequence(spec, &["volumeClaimTemplates"]);
        let template_names: Vec<&str> = templates
            .iter()
            .map(|claim| text(claim, &["metadata", "name"]))
            .collect();
        assert_eq!(
            template_names,
            [data_claim],
            "{name}: {data_dir} is not on its claim"
        );
        assert_eq!(
            sequence(&templates[0], &["spec", "accessModes"])[0].as_str(),
            Some("ReadWriteOnce")
        );
        let shared_dir = config.cluster.shared_dir.to_str().unwrap();
        assert_eq!(
            text(
                volume_at(shared_dir),
                &["persistentVolumeClaim", "claimName"]
            ),
            shared_claim_name,
            "{name}: {shared_dir} is not on the shared claim"
        );

        // The certificate where the gateway's config looks for it.
        match (&config.ingest.tls_cert_path, &config.ingest.tls_key_path) {
            (Some(cert), Some(key)) => {
                let directory = parent_dir(cert.to_str().unwrap());
                assert_eq!(parent_dir(key.to_str().unwrap()), directory);
                assert!(
                    volume_at(directory.as_str())["secret"]["secretName"].is_string(),
                    "{name}: the certificate is not a secret"
                );
            }
            _ => assert_ne!(role, Role::Gateway, "{name}: devices need MQTT over TLS"),
        }

        // The governing service gives each pod a stable name.
        let governing = text(spec, &["serviceName"]);
        assert!(
            services.iter().any(|service| {
                text(service, &["metadata", "name"]) == governing
                    && service["spec"]["clusterIP"].as_str() == Some("None")
                    && selects(&service["spec"]["selector"], pod_labels)
            }),
            "{name}: serviceName {governing} is not a headless service of its pods"
        );

        let pods = RolePods {
            pod_labels: pod_labels.clone(),
            ports,
            config,
        };
        assert!(
            roles.insert(role.as_str(), pods).is_none(),
            "two StatefulSets run the {} role",
            role.as_str()
        );
    }
    let role_names: BTreeSet<&str> = roles.keys().copied().collect();
    assert_eq!(role_names, ROLES.map(Role::as_str).into());

    // No StatefulSet claims another role's pods.
    for statefulset in &statefulsets {
        let selector = &statefulset["spec"]["selector"]["matchLabels"];
        let claimed = roles
            .values()
            .filter(|pods| selects(selector, &pods.pod_labels))
            .count();
        assert_eq!(claimed, 1, "{}", text(statefulset, &["metadata", "name"]));
    }

    // Every service reaches the pods of one role, by port names they have.
    let role_of = |service: &Yaml| -> &str {
        let name = text(service, &["metadata", "name"]);
        let selected: Vec<&str> = roles
            .iter()
            .filter(|(_, pods)| selects(&service["spec"]["selector"], &pods.pod_labels))
            .map(|(role, _)| *role)
            .collect();
        assert_eq!(selected.len(), 1, "{name} selects {selected:?}");
        selected[0]
    };
    let exposed = |service: &Yaml| -> BTreeSet<u16> {
        let ports = &roles[role_of(service)].ports;
        sequence(service, &["spec", "ports"])
            .iter()
            .map(|port| {
                let target = text(port, &["targetPort"]);
                *ports.get(target).unwrap_or_else(|| {
                    panic!(
                        "{}: no port named {target}",
                        text(service, &["metadata", "name"])
                    )
                })
            })
            .collect()
    };
    let of_type = |service_type: &str| -> Vec<&Yaml> {
        services
            .iter()
            .copied()
            .filter(|service| service["spec"]["type"].as_str() == Some(service_type))
            .collect()
    };
    for service in &services {
        exposed(service);
    }

    // Devices reach the gateways, and only them, through one TCP load balancer that keeps
    // their own addresses (the login throttle counts failures by them).
    let balancers = of_type("LoadBalancer");
    assert_eq!(balancers.len(), 1);
    let balancer = balancers[0];
    assert_eq!(role_of(balancer), Role::Gateway.as_str());
    assert_eq!(text(balancer, &["spec", "externalTrafficPolicy"]), "Local");
    let gateway = &roles[Role::Gateway.as_str()].config;
    assert_eq!(
        exposed(balancer),
        [gateway.ingest.mqtt_tls_listen.port()].into()
    );

    // gRPC and HTTP of every role inside the cluster.
    for (role, pods) in &roles {
        let inside: BTreeSet<u16> = of_type("ClusterIP")
            .into_iter()
            .filter(|service| role_of(service) == *role)
            .flat_map(&exposed)
            .collect();
        assert_eq!(
            inside,
            [
                pods.config.grpc_listen.port(),
                pods.config.http_listen.port()
            ]
            .into(),
            "{role}"
        );
    }

    // Kafka comes with the cluster: nothing here is named like the brokers.
    let brokers = cluster_brokers();
    for broker in brokers.split(',') {
        let (host, _) = host_and_port(broker);
        assert!(
            !objects
                .iter()
                .any(|object| object["metadata"]["name"].as_str() == Some(host.as_str())),
            "{host} is defined here; Kafka is the cluster's own"
        );
    }

    // Every store and detect worker can own a partition.
    for role in [Role::Store, Role::Detect] {
        let config = &roles[role.as_str()].config;
        let replicas = statefulsets
            .iter()
            .find(|statefulset| {
                selects(
                    &statefulset["spec"]["selector"]["matchLabels"],
                    &roles[role.as_str()].pod_labels,
                )
            })
            .and_then(|statefulset| statefulset["spec"]["replicas"].as_u64())
            .unwrap();
        assert!(
            config.cluster.partitions as u64 >= replicas,
            "{}",
            role.as_str()
        );
    }
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
    let cluster_config = repo_path("deploy/prometheus/prometheus-cluster.yml");
    let rules = repo_path("deploy/prometheus/vigil-rules.yml");
    for args in [
        vec!["check".as_ref(), "config".as_ref(), config.as_os_str()],
        vec![
            "check".as_ref(),
            "config".as_ref(),
            cluster_config.as_os_str(),
        ],
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
