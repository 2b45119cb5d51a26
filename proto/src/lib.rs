//! The device wire contract (`v1`) and the gRPC services, shared by the server and by device-side
//! code such as the fleet simulator.
//!
//! In: device keys and readings. Out: login tokens, signed payloads and topic names exactly as
//! DESIGN.md's device contract writes them, and the generated protobuf and tonic types.

pub mod contract;
pub mod keys;
pub mod payload;

/// Generated protobuf messages and tonic services of package `vigil.v1`.
#[allow(missing_debug_implementations, unreachable_pub, clippy::all)]
pub mod v1 {
    tonic::include_proto!("vigil.v1");
}

pub use contract::{
    ContractError, DeviceId, LoginToken, device_id_from_readings_topic, fresh_login_token,
    make_login_token, notices_topic, reading_signing_message, readings_topic, sign_reading,
};
pub use keys::{WeakKey, has_weak_r, strong_public_key};
