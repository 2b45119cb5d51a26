//! rumqttd 0.20 as a standalone MQTT 3.1.1 broker on one address, for the load test's side by
//! side comparison: no authentication, no TLS, QoS 1 acknowledged by the broker on receipt.
//!
//! Usage: `rumqttd-peer <listen address> [max connections]`. The broker runs until killed.

use std::process::ExitCode;

const USAGE: &str = "usage: rumqttd-peer <listen address, e.g. 127.0.0.1:1883> [max connections]";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(listen) = args.next() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let max_connections = match args.next().map(|text| text.parse::<usize>()) {
        None => 20_000,
        Some(Ok(count)) => count,
        Some(Err(error)) => {
            eprintln!("max connections: {error}\n{USAGE}");
            return ExitCode::from(2);
        }
    };

    let config = match broker_config(&listen, max_connections) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("invalid broker settings for {listen}: {error}");
            return ExitCode::from(2);
        }
    };
    let mut broker = rumqttd::Broker::new(config);
    match broker.start() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rumqttd stopped: {error}");
            ExitCode::FAILURE
        }
    }
}

/// One v4 (MQTT 3.1.1) listener. The commit log is kept small: nothing subscribes, so every
/// publish only lands in the log, and 4 segments of 16 MiB bound the broker's memory.
fn broker_config(listen: &str, max_connections: usize) -> Result<rumqttd::Config, toml::de::Error> {
    let text = format!(
        r#"
id = 0

[router]
max_connections = {max_connections}
max_outgoing_packet_count = 200
max_segment_size = 16777216
max_segment_count = 4

[v4.1]
name = "v4-1"
listen = "{listen}"
next_connection_delay_ms = 0

[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 20480
max_inflight_count = 100
dynamic_filters = true
"#
    );
    toml::from_str(&text)
}
