//! `vigil demo`: a server on loopback with a fresh data directory, a simulated fleet enrolled
//! over gRPC and publishing over MQTT, and a summary with an SQL answer at the end.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use vigil_loadtest::fleet::{FleetConfig, enrollment_csv, generate_fleet, run_fleet};

use crate::client::{Client, OutputFormat, format_batches, parse_enrollment_csv};
use crate::config::VigilConfig;
use crate::server::RunningServer;

/// The sample query shown at the end of the demo.
const SAMPLE_QUERY: &str = "SELECT metric, count(*) AS readings, count(DISTINCT device_id) AS \
     devices, round(avg(value), 1) AS mean, round(min(value), 1) AS min, \
     round(max(value), 1) AS max \
     FROM readings GROUP BY metric ORDER BY metric";

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// How long the fleet publishes, in seconds.
    #[arg(long, default_value_t = 60)]
    duration_s: u64,
    /// Readings per device per second.
    #[arg(long, default_value_t = 10.0)]
    rate_hz: f64,
    /// Data directory; by default a fresh temporary one, removed at the end.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let scratch = tempfile::Builder::new().prefix("vigil-demo-").tempdir()?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| scratch.path().to_owned());
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config = VigilConfig {
        data_dir: data_dir.clone(),
        ..VigilConfig::default()
    };
    config.ingest.mqtt_listen = loopback;
    config.grpc_listen = loopback;
    config.http_listen = loopback;
    config.store.flush_interval_ms = 15_000;

    let server = RunningServer::start(&config).await?;
    println!(
        "vigil demo: MQTT {}, gRPC {}, metrics http://{}/metrics, data in {}",
        server.mqtt_address,
        server.grpc_address,
        server.http_address,
        data_dir.display()
    );

    let token = std::fs::read_to_string(data_dir.join("admin.token"))
        .context("the server did not create its admin token")?;
    let client = Client::connect(&format!("http://{}", server.grpc_address), token, None).await?;
    let fleet = generate_fleet(args.devices, 42);
    let enrolled = client
        .add_devices(parse_enrollment_csv(&enrollment_csv(&fleet))?)
        .await?;
    println!(
        "enrolled {enrolled} devices over gRPC; running the fleet for {} s",
        args.duration_s
    );

    let fleet_config = FleetConfig {
        mqtt_host: server.mqtt_address.ip().to_string(),
        mqtt_port: server.mqtt_address.port(),
        readings_per_device_per_s: args.rate_hz,
        duration: Duration::from_secs(args.duration_s),
        token_lifetime_s: 300,
        max_inflight_per_device: 16,
        progress: true,
        connect_spread: Duration::from_secs(2),
    };
    let report = run_fleet(&fleet, &fleet_config).await?;
    println!("\n{report}");

    let metrics = &server.ingest.metrics;
    let count = |family: &prometheus_client::metrics::family::Family<
        vigil_ingest::metrics::ReasonLabel,
        prometheus_client::metrics::counter::Counter,
    >,
                 reason: &'static str| {
        family
            .get_or_create(&vigil_ingest::metrics::ReasonLabel { reason })
            .get()
    };
    let by_reason = |counts: Vec<(&'static str, u64)>| -> (u64, String) {
        let total = counts.iter().map(|(_, n)| n).sum();
        let listed: Vec<String> = counts
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        let listed = if listed.is_empty() {
            String::new()
        } else {
            format!(" ({})", listed.join(", "))
        };
        (total, listed)
    };
    let (refused, refused_reasons) = by_reason(
        vigil_ingest::reasons::RefusalReason::ALL
            .iter()
            .map(|reason| {
                (
                    reason.as_str(),
                    count(&metrics.readings_refused, reason.as_str()),
                )
            })
            .collect(),
    );
    let (logins_refused, login_reasons) = by_reason(
        vigil_ingest::login::LoginRefusal::ALL
            .iter()
            .map(|reason| {
                (
                    reason.as_str(),
                    count(&metrics.logins_refused, reason.as_str()),
                )
            })
            .collect(),
    );
    println!(
        "server: {} readings accepted, {} re-sends acknowledged, {refused} refused{refused_reasons}, \
         {} logins, {logins_refused} refused{login_reasons}",
        metrics.readings_accepted.get(),
        metrics.readings_resent.get(),
        metrics.logins_accepted.get()
    );

    println!("\n$ vigil sql \"{SAMPLE_QUERY}\"");
    let batches = client.sql(SAMPLE_QUERY).await?;
    println!("{}", format_batches(&batches, OutputFormat::Table)?);

    server.stop().await;
    Ok(())
}
