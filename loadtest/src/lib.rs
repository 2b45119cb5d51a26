//! Fleet simulator for vigil: simulated medical devices that speak the `v1` device contract.
//!
//! In: a fleet size and seed, and the address of an MQTT server. Out: the fleet's enrollment
//! file (`device_id,public_key_hex,class`), and a [`FleetReport`] of a timed run in which every
//! device logs in with a fresh login token, publishes signed readings of a simulated patient at
//! a fixed rate with QoS 1, re-sends what was not acknowledged after a reconnect, and measures
//! how long each PUBACK took (the server acknowledges only durable readings).
//!
//! - [`profiles`]: device classes and per-patient vital-sign generators.
//! - [`fleet`]: device identities, enrollment, run settings and [`run_fleet`].
//! - [`corpus`]: readings generated and signed ahead of the run.
//! - [`report`]: the run's report.
//! - [`attacks`]: attack scenarios with their ground truth, for the detection report.
//! - [`targets`], [`usage`], [`sql`], [`measure`]: the servers a load test starts, their CPU
//!   time and memory, checks of what vigil stored, and measured runs.
//! - [`server_run`] and [`compare`]: the `vigil-loadtest run` and `compare` commands.

pub mod attacks;
pub mod compare;
pub mod corpus;
pub mod fleet;
pub mod measure;
pub mod profiles;
pub mod report;
pub mod server_run;
mod session;
pub mod sql;
pub mod targets;
pub mod usage;

pub use corpus::{DeviceSchedule, PresignedReadings, presign_fleet};
pub use fleet::{
    DRAIN_TIMEOUT, FleetConfig, SimDevice, enrollment_csv, generate_fleet, plan_schedules,
    run_fleet,
};
pub use profiles::{DeviceClass, Patient, plausible_range};
pub use report::{FleetReport, LatencySummary};
