//! `vigil-loadtest`: a simulated device fleet against a running vigil server (`run`), or vigil
//! side by side with Mosquitto and rumqttd (`compare`). Reports go to stdout, and as JSON to
//! the file given with `--json`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Serialize;
use vigil_loadtest::compare::{CompareConfig, compare};
use vigil_loadtest::measure::{default_corpus_dir, raise_open_file_limit};
use vigil_loadtest::server_run::{RunConfig, run};
use vigil_loadtest::targets::{MOSQUITTO_BIN, build_dir, default_rumqttd_peer};

#[derive(Debug, Parser)]
#[command(
    name = "vigil-loadtest",
    about = "Load tests of the vigil telemetry gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a fleet against a running vigil server and checks what it stored.
    Run(RunArgs),
    /// Runs the same fleet against vigil, Mosquitto and rumqttd, one after the other.
    Compare(CompareArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// MQTT listener of the server, host:port.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: String,
    /// gRPC address of the server (enrollment and Flight SQL).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Admin token of the server.
    #[arg(long, env = "VIGIL_TOKEN", hide_env_values = true)]
    token: String,
    /// Process id of the server, for its CPU time and memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Simulated devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Readings per device per second.
    #[arg(long, default_value_t = 1.0)]
    rate_hz: f64,
    /// How long each device sends, seconds.
    #[arg(long, default_value_t = 30)]
    duration_s: u64,
    /// Seed of the fleet's keys; a server refuses a fleet it has enrolled already.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Raise the rate step by step until the server stops keeping up.
    #[arg(long)]
    closed_loop: bool,
    /// Oldest cached corpus to use, seconds; keep it below the server's `max_clock_skew_ms`.
    #[arg(long, default_value_t = 240)]
    max_corpus_age_s: u64,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Debug, clap::Args)]
struct CompareArgs {
    /// Fleet sizes, comma-separated; every target runs once per size.
    #[arg(long, value_delimiter = ',', default_value = "100")]
    devices: Vec<usize>,
    /// How long each device sends, seconds.
    #[arg(long, default_value_t = 20)]
    duration_s: u64,
    /// Readings per device per second.
    #[arg(long, default_value_t = 10.0)]
    rate_hz: f64,
    /// Seed of the fleet's keys.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Mosquitto binary.
    #[arg(long, default_value = MOSQUITTO_BIN)]
    mosquitto_bin: PathBuf,
    /// The rumqttd peer binary [default: target/rumqttd-peer/<profile>/rumqttd-peer].
    #[arg(long)]
    rumqttd_bin: Option<PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Debug, clap::Args)]
struct CommonArgs {
    /// The vigil binary [default: beside this one].
    #[arg(long)]
    vigil_bin: Option<PathBuf>,
    /// Where signed corpora are kept between runs [default: target/loadtest-corpus].
    #[arg(long)]
    corpus_dir: Option<PathBuf>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

impl CommonArgs {
    fn vigil_bin(&self) -> PathBuf {
        self.vigil_bin
            .clone()
            .or_else(|| build_dir().map(|dir| dir.join("vigil")))
            .unwrap_or_else(|| PathBuf::from("vigil"))
    }

    fn corpus_dir(&self) -> Option<PathBuf> {
        self.corpus_dir.clone().or_else(default_corpus_dir)
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber_init();
    let cli = Cli::parse();
    let open_files = raise_open_file_limit()?;
    let runtime = tokio::runtime::Runtime::new()?;

    match cli.command {
        Command::Run(args) => {
            let needed = args.devices as u64 + 64;
            anyhow::ensure!(
                open_files >= needed,
                "{} devices need {needed} open files, the limit is {open_files}",
                args.devices
            );
            let (host, port) = args
                .mqtt
                .rsplit_once(':')
                .and_then(|(host, port)| Some((host.to_owned(), port.parse::<u16>().ok()?)))
                .with_context(|| format!("--mqtt {} is not host:port", args.mqtt))?;
            let config = RunConfig {
                mqtt_host: host,
                mqtt_port: port,
                server_url: args.server.clone(),
                token: args.token.trim().to_owned(),
                vigil_bin: args.common.vigil_bin(),
                devices: args.devices,
                rate_hz: args.rate_hz,
                duration: Duration::from_secs(args.duration_s),
                seed: args.seed,
                closed_loop: args.closed_loop,
                server_pid: args.server_pid,
                corpus_dir: args.common.corpus_dir(),
                max_corpus_age: Duration::from_secs(args.max_corpus_age_s),
                progress: !args.common.quiet,
            };
            let report = runtime.block_on(run(&config))?;
            println!("{report}");
            write_json(args.common.json.as_deref(), &report)
        }
        Command::Compare(args) => {
            let config = CompareConfig {
                device_counts: args.devices.clone(),
                duration: Duration::from_secs(args.duration_s),
                rate_hz: args.rate_hz,
                seed: args.seed,
                vigil_bin: args.common.vigil_bin(),
                mosquitto_bin: Some(args.mosquitto_bin.clone()),
                rumqttd_bin: args.rumqttd_bin.clone().or_else(default_rumqttd_peer),
                corpus_dir: args.common.corpus_dir(),
                progress: !args.common.quiet,
            };
            let report = runtime.block_on(compare(&config))?;
            println!("{report}");
            write_json(args.common.json.as_deref(), &report)
        }
    }
}

fn write_json(path: Option<&Path>, report: &impl Serialize) -> anyhow::Result<()> {
    let Some(path) = path else {
        return Ok(());
    };
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
}

/// Warnings of the fleet and the probes go to stderr; `RUST_LOG` raises the level.
fn tracing_subscriber_init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
