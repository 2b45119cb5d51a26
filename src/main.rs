//! `vigil`: the telemetry gateway for medical device fleets, and its client commands.
//!
//! The binary only parses the command line and wires the stages together; the domain logic
//! lives in the `proto`, `ingest`, `store`, `detect` and `loadtest` crates.

mod admin;
mod auth;
mod client;
mod cluster;
mod config;
mod demo;
mod drill;
mod grpc_tls;
mod http;
mod metrics;
mod server;
mod tokens;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::client::{Client, DeviceAction, OutputFormat};
use crate::config::VigilConfig;
use crate::server::RunningServer;

#[derive(Debug, Parser)]
#[command(
    name = "vigil",
    version,
    about = "Telemetry gateway for medical device fleets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Run(RunArgs),
    /// Start a server on loopback with a fresh data directory and run a simulated fleet.
    Demo(demo::DemoArgs),
    /// Run a detection exercise: a healthy fleet, one attacked device per scenario, and a
    /// detection report against the attacks' ground truth.
    Drill(drill::DrillArgs),
    /// Enroll, list and act on devices.
    Devices {
        #[command(flatten)]
        connection: ConnectionArgs,
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Follow and acknowledge the SOC's alerts.
    Alerts {
        #[command(flatten)]
        connection: ConnectionArgs,
        #[command(subcommand)]
        command: AlertsCommand,
    },
    /// Run the streaming detector over a Numenta Anomaly Benchmark directory and score it.
    Nab {
        /// A directory laid out like NAB: data/<category>/<series>.csv and
        /// labels/combined_windows.json (config/profiles.json optional).
        data_dir: PathBuf,
        /// Write per-series results (timestamp,value,anomaly_score,label) under this directory.
        #[arg(long)]
        results_dir: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "vigil")]
        detector: NabDetector,
    },
    /// Create, list and revoke API tokens (admin role).
    Tokens {
        #[command(flatten)]
        connection: ConnectionArgs,
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Run a SQL query over Flight SQL.
    Sql {
        #[command(flatten)]
        connection: ConnectionArgs,
        /// The query, e.g. "SELECT count(*) FROM readings".
        query: String,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
}

#[derive(Debug, Subcommand)]
enum AlertsCommand {
    /// Print alerts as they are raised, starting after `--since`; reconnects on its own and
    /// resumes after the last alert it printed.
    Tail {
        /// Start after this alert id (0: from the oldest kept alert).
        #[arg(long, default_value_t = 0)]
        since: u64,
        #[arg(long, value_enum, default_value = "text")]
        format: AlertFormat,
        /// Stop after printing this many alerts.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Acknowledge an alert.
    Ack {
        alert_id: u64,
        #[arg(long, default_value = "")]
        note: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// Create a token; prints its secret on stdout, the only time it is shown.
    Create {
        /// metrics (the HTTP /metrics page only), analyst (Flight SQL), soc (alerts, device
        /// quarantine and release, SQL) or admin (everything).
        #[arg(long)]
        role: String,
        /// A label for the token's holder, e.g. grafana.
        #[arg(long)]
        name: String,
    },
    /// List every token with its role; revoked ones show when they were revoked.
    List,
    /// Revoke a token by its id; the server refuses it from then on.
    Revoke { token_id: String },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum AlertFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum NabDetector {
    Vigil,
    Zscore,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// TOML configuration file (see deploy/vigil.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    mqtt_listen: Option<SocketAddr>,
    #[arg(long)]
    grpc_listen: Option<SocketAddr>,
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// The stages to run: all (one process, no Kafka), or in a cluster gateway, store or
    /// detect (see the config's [cluster] section).
    #[arg(long)]
    role: Option<vigil_config::Role>,
    /// Kafka bootstrap servers of the cluster, host:port[,host:port...].
    #[arg(long)]
    brokers: Option<String>,
    /// The tables directory shared by the cluster's nodes.
    #[arg(long)]
    shared_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ConnectionArgs {
    /// gRPC address of the server; `https://` when the server has a certificate.
    #[arg(long, global = true, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// PEM file of the CA (or self-signed certificate) to trust for an `https://` server, in
    /// addition to the public web roots.
    #[arg(long, global = true, env = "VIGIL_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Bearer token.
    #[arg(long, global = true, env = "VIGIL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token (default: ./vigil-data/admin.token).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
}

impl ConnectionArgs {
    async fn connect(&self) -> anyhow::Result<Client> {
        let token = auth::client_token(self.token.as_deref(), self.token_file.as_deref())?;
        Client::connect(&self.server, token, self.ca_cert.as_deref()).await
    }
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// Enroll one device with its Ed25519 public key (the private key stays on the device).
    Add {
        device_id: String,
        #[arg(long)]
        public_key: String,
        #[arg(long)]
        class: Option<String>,
    },
    /// Enroll devices from a CSV file: device_id,public_key_hex,class with a header line.
    Import { csv: PathBuf },
    /// List enrolled devices.
    List,
    /// Show one device.
    Show { device_id: String },
    /// Cut a device off: close its session and refuse its logins until released.
    Quarantine {
        device_id: String,
        #[arg(long, default_value = "quarantined by an operator")]
        reason: String,
    },
    /// Restore a quarantined device's logins.
    Release { device_id: String },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;

    match cli.command {
        Command::Run(args) => runtime.block_on(run(args)),
        Command::Demo(args) => {
            init_logging("text", "warn");
            runtime.block_on(demo::run(args))
        }
        Command::Drill(args) => {
            init_logging("text", "warn");
            let report = runtime.block_on(drill::run(args))?;
            println!("\n{report}");
            Ok(())
        }
        Command::Devices {
            connection,
            command,
        } => runtime.block_on(devices(connection, command)),
        Command::Alerts {
            connection,
            command,
        } => runtime.block_on(alerts(connection, command)),
        Command::Tokens {
            connection,
            command,
        } => runtime.block_on(tokens(connection, command)),
        Command::Nab {
            data_dir,
            results_dir,
            detector,
        } => {
            let kind = match detector {
                NabDetector::Vigil => vigil_detect::nab::DetectorKind::Vigil,
                NabDetector::Zscore => vigil_detect::nab::DetectorKind::RollingZScore,
            };
            let report = vigil_detect::nab::run_benchmark(&data_dir, results_dir.as_deref(), kind)
                .with_context(|| format!("cannot score {}", data_dir.display()))?;
            println!("{report}");
            Ok(())
        }
        Command::Sql {
            connection,
            query,
            format,
        } => runtime.block_on(async move {
            let batches = connection.connect().await?.sql(&query).await?;
            print!("{}", client::format_batches(&batches, format)?);
            println!();
            Ok(())
        }),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => VigilConfig::load(path)?,
        None => VigilConfig::default(),
    };
    if let Some(data_dir) = args.data_dir {
        config.data_dir = data_dir;
    }
    if let Some(address) = args.mqtt_listen {
        config.ingest.mqtt_listen = address;
    }
    if let Some(address) = args.grpc_listen {
        config.grpc_listen = address;
    }
    if let Some(address) = args.http_listen {
        config.http_listen = address;
    }
    if let Some(role) = args.role {
        config.cluster.role = role;
    }
    if let Some(brokers) = args.brokers {
        config.cluster.brokers = brokers;
    }
    if let Some(shared_dir) = args.shared_dir {
        config.cluster.shared_dir = shared_dir;
    }
    init_logging(&config.log_format, "info");

    let role = config.cluster.role;
    if role != vigil_config::Role::All {
        prepare_cluster(&mut config).await?;
    }
    if matches!(role, vigil_config::Role::Store | vigil_config::Role::Detect) {
        let worker = cluster::RunningWorker::start(&config).await?;
        tracing::info!(
            role = role.as_str(),
            grpc = %worker.grpc_address,
            http = %worker.http_address,
            brokers = config.cluster.brokers,
            shared_dir = %config.cluster.shared_dir.display(),
            "vigil worker is running"
        );
        shutdown_signal().await;
        tracing::info!("shutting down");
        bounded_stop(worker.stop()).await;
        return Ok(());
    }

    let server = RunningServer::start(&config).await?;
    tracing::info!(
        mqtt = %server.mqtt_address,
        grpc = %server.grpc_address,
        http = %server.http_address,
        data_dir = %config.data_dir.display(),
        "vigil is running"
    );

    shutdown_signal().await;
    tracing::info!("shutting down");
    if role == vigil_config::Role::All {
        // The store's last sync must finish, however long the disk takes.
        server.stop().await;
    } else {
        bounded_stop(server.stop()).await;
    }
    Ok(())
}

/// Longest a cluster node takes to stop before it exits anyway.
const CLUSTER_STOP_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Stops a cluster node within [`CLUSTER_STOP_LIMIT`]. With Kafka unreachable, librdkafka's
/// consumers can wait for ever to leave their group; nothing is lost by exiting then: a store
/// worker's unflushed records stay in Kafka, and a gateway acknowledged nothing Kafka lacks.
async fn bounded_stop(stop: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(CLUSTER_STOP_LIMIT, stop)
        .await
        .is_err()
    {
        tracing::error!(
            limit_s = CLUSTER_STOP_LIMIT.as_secs(),
            "not stopped in time (is Kafka reachable?); exiting now"
        );
        std::process::exit(1);
    }
}

/// What every cluster role needs first: the data and shared directories as absolute paths
/// (SQL reads Parquet files by absolute location), and the topics.
async fn prepare_cluster(config: &mut VigilConfig) -> anyhow::Result<()> {
    for dir in [&mut config.data_dir, &mut config.cluster.shared_dir] {
        std::fs::create_dir_all(&*dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
        *dir = std::fs::canonicalize(&*dir)
            .with_context(|| format!("cannot resolve directory {}", dir.display()))?;
    }
    vigil_cluster::ensure_topics(&config.cluster)
        .await
        .context("cannot reach Kafka or create the cluster's topics")?;
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; stopping on Ctrl-C only");
                let _ = interrupt.await;
                return;
            }
        };
    tokio::select! {
        _ = interrupt => {}
        _ = terminate.recv() => {}
    }
}

async fn devices(connection: ConnectionArgs, command: DevicesCommand) -> anyhow::Result<()> {
    let client = connection.connect().await?;
    match command {
        DevicesCommand::Add {
            device_id,
            public_key,
            class,
        } => {
            let device = vigil_proto::v1::Device {
                device_id,
                public_key_hex: public_key,
                class: class.unwrap_or_default(),
                ..Default::default()
            };
            let added = client.add_devices(vec![device]).await?;
            println!("{added} device(s) enrolled");
        }
        DevicesCommand::Import { csv } => {
            let devices = client::read_enrollment_csv(&csv)?;
            let total = devices.len();
            let added = client.add_devices(devices).await?;
            println!("{added} of {total} device(s) newly enrolled");
        }
        DevicesCommand::List => print!("{}", client::format_devices(&client.list_devices().await?)),
        DevicesCommand::Show { device_id } => {
            let device = client
                .device_action(DeviceAction::Show, &device_id, "")
                .await?;
            print!("{}", client::format_devices(&[device]));
        }
        DevicesCommand::Quarantine { device_id, reason } => {
            let device = client
                .device_action(DeviceAction::Quarantine, &device_id, &reason)
                .await?;
            print!("{}", client::format_devices(&[device]));
        }
        DevicesCommand::Release { device_id } => {
            let device = client
                .device_action(DeviceAction::Release, &device_id, "")
                .await?;
            print!("{}", client::format_devices(&[device]));
        }
    }
    Ok(())
}

async fn tokens(connection: ConnectionArgs, command: TokensCommand) -> anyhow::Result<()> {
    let client = connection.connect().await?;
    match command {
        TokensCommand::Create { role, name } => {
            let created = client.create_token(&role, &name).await?;
            let token = created.token.context("server answered without a token")?;
            // The secret alone on stdout, so `vigil tokens create … > grafana.token` makes a
            // file for `--token-file`; the rest goes to stderr.
            println!("{}", created.secret);
            eprintln!(
                "created token {} ({}, {}); its secret is shown only this once",
                token.token_id,
                token.role,
                token.name.escape_default()
            );
        }
        TokensCommand::List => print!("{}", client::format_tokens(&client.list_tokens().await?)),
        TokensCommand::Revoke { token_id } => {
            let token = client.revoke_token(&token_id).await?;
            println!("revoked token {} ({})", token.token_id, token.role);
        }
    }
    Ok(())
}

async fn alerts(connection: ConnectionArgs, command: AlertsCommand) -> anyhow::Result<()> {
    let client = connection.connect().await?;
    match command {
        AlertsCommand::Tail {
            since,
            format,
            limit,
        } => {
            let json = matches!(format, AlertFormat::Json);
            let mut last = since;
            let mut printed = 0u64;
            loop {
                let mut stream = match client.stream_alerts(last).await {
                    Ok(stream) => stream,
                    Err(error) if client::is_refusal(&error) => return Err(error),
                    Err(error) => {
                        eprintln!("alert stream unavailable ({error:#}); retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                };
                loop {
                    match stream.message().await {
                        Ok(Some(alert)) => {
                            last = alert.alert_id;
                            println!("{}", client::format_alert(&alert, json));
                            printed += 1;
                            if limit.is_some_and(|limit| printed >= limit) {
                                return Ok(());
                            }
                        }
                        Ok(None) => break,
                        Err(status)
                            if matches!(
                                status.code(),
                                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                            ) =>
                        {
                            return Err(status.into());
                        }
                        Err(status) => {
                            eprintln!("alert stream broke ({status}); resuming after #{last}");
                            break;
                        }
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        AlertsCommand::Ack { alert_id, note } => {
            let alert = client.ack_alert(alert_id, &note).await?;
            println!("{}", client::format_alert(&alert, false));
            Ok(())
        }
    }
}

fn init_logging(format: &str, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colours only on a terminal: a log file or journald would keep the escape sequences.
    // A log that cannot be written (its disk is full, say) is lost silently: the default
    // report of a failed write goes to stderr through `eprintln!`, which panics when stderr
    // fails too, and would take down whichever thread logged (the log writer, a verifier).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
