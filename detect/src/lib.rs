//! Detection and response: per-device features, detectors, risk, alerts and the SOC service.
//!
//! In: accepted readings and security events from the gateway and the verifier, through a
//! bounded [`events::ObservationSender`] that never blocks them. Out: decisions carried out
//! through a [`engine::Responder`] (cut-off, suspicion, peer throttling), and alerts kept in a
//! durable [`alerts::AlertLog`] that the SQL table `alerts` and the gRPC [`service::SocService`]
//! stream read.
//!
//! Three layers feed one risk score per device ([`risk`]): [`rules`] for what is never
//! legitimate, [`baseline`] statistics that learn each patient, and the [`fleet`] model of
//! each device class (linfa). [`streaming`] and [`nab`] hold the single-stream detector and the
//! Numenta Anomaly Benchmark that measures it.

pub mod alerts;
pub mod baseline;
pub mod engine;
pub mod events;
pub mod fleet;
pub mod metrics;
pub mod nab;
pub mod risk;
pub mod rules;
pub mod service;
pub mod streaming;

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

pub use engine::{DetectConfig, Detector, Responder};
pub use events::{EventKind, Observation, ObservationSender, observation_queue};

/// Errors of detection and response.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        name: &'static str,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Milliseconds since the Unix epoch, by the server's clock.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
