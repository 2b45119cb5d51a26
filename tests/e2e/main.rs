//! End-to-end tests: each starts the real `vigil` binary and talks to it with real clients
//! (rumqttc and mosquitto_pub over MQTT, tonic over gRPC, Flight SQL for queries).
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

mod support;

mod bad_input;
mod cluster;
mod contract;
mod crash;
mod deploy;
mod detection;
mod floods;
mod log_hygiene;
mod metrics_token;
mod overload;
mod pipeline;
mod restart;
mod roles;
mod tls;
