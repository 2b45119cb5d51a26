//! The `DeviceAdmin` gRPC service: enrollment, listing and cut-off of devices, and API token
//! management. Which role may call which method is decided before a call gets here, in
//! [`crate::auth`].

use std::sync::Arc;

use tonic::{Request, Response, Status};
use vigil_detect::{Detector, Observation, ObservationSender};
use vigil_ingest::Ingest;
use vigil_ingest::registry::{DeviceEntry, Enrollment};
use vigil_proto::v1::device_admin_server::DeviceAdmin;
use vigil_proto::v1::{
    AddDevicesRequest, AddDevicesResponse, ApiToken, CreateTokenRequest, CreateTokenResponse,
    Device, DeviceActionRequest, DeviceActionResponse, ListDevicesRequest, ListDevicesResponse,
    ListTokensRequest, ListTokensResponse, RevokeTokenRequest, RevokeTokenResponse,
};

use crate::auth::{Caller, Role};
use crate::tokens::{TokenRecord, TokenStore};

/// Most devices one enrollment request may carry.
const MAX_DEVICES_PER_REQUEST: usize = 100_000;

/// Serves device administration over the ingest side's registry.
#[derive(Debug, Clone)]
pub(crate) struct AdminService {
    ingest: Arc<Ingest>,
    detector: Arc<Detector>,
    observations: ObservationSender,
    tokens: Arc<TokenStore>,
}

impl AdminService {
    pub(crate) fn new(
        ingest: Arc<Ingest>,
        detector: Arc<Detector>,
        observations: ObservationSender,
        tokens: Arc<TokenStore>,
    ) -> Self {
        Self {
            ingest,
            detector,
            observations,
            tokens,
        }
    }

    fn found(
        &self,
        entry: Option<Arc<DeviceEntry>>,
        device_id: &str,
    ) -> Result<Response<DeviceActionResponse>, Status> {
        found(entry, device_id, &self.detector)
    }
}

/// The gRPC view of a registry entry, with the detector's risk.
pub(crate) fn device_message(entry: &DeviceEntry, detector: &Detector) -> Device {
    Device {
        device_id: entry.id.to_string(),
        public_key_hex: entry.public_key_hex(),
        class: entry.class.to_string(),
        status: entry.status().as_str().to_owned(),
        enrolled_at_ms: entry.enrolled_at_ms,
        status_changed_at_ms: entry.status_changed_at_ms(),
        risk: detector.risk_of(&entry.id),
    }
}

/// The gRPC view of a token record.
fn token_message(record: &TokenRecord) -> ApiToken {
    ApiToken {
        token_id: record.id.clone(),
        name: record.name.clone(),
        role: record.role.as_str().to_owned(),
        created_at_ms: record.created_at_ms,
        revoked_at_ms: record.revoked_at_ms.unwrap_or(0),
    }
}

/// The id of the token that made a call, for logs.
fn caller_of<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<Caller>()
        .map_or("unknown", Caller::token_label)
        .to_owned()
}

fn token_store_failed(error: anyhow::Error) -> Status {
    tracing::error!(error = format!("{error:#}"), "token store change failed");
    Status::internal("the token store could not be written")
}

fn internal(error: vigil_ingest::Error) -> Status {
    tracing::error!(%error, "device administration failed");
    Status::internal(error.to_string())
}

fn found(
    entry: Option<Arc<DeviceEntry>>,
    device_id: &str,
    detector: &Detector,
) -> Result<Response<DeviceActionResponse>, Status> {
    match entry {
        Some(entry) => Ok(Response::new(DeviceActionResponse {
            device: Some(device_message(&entry, detector)),
        })),
        None => Err(Status::not_found(format!(
            "no device {}",
            device_id.escape_default()
        ))),
    }
}

#[tonic::async_trait]
impl DeviceAdmin for AdminService {
    async fn add_devices(
        &self,
        request: Request<AddDevicesRequest>,
    ) -> Result<Response<AddDevicesResponse>, Status> {
        let by = caller_of(&request);
        let devices = request.into_inner().devices;
        if devices.len() > MAX_DEVICES_PER_REQUEST {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_DEVICES_PER_REQUEST} devices per request"
            )));
        }
        let enrollments: Vec<Enrollment> = devices
            .into_iter()
            .map(|device| Enrollment {
                device_id: device.device_id,
                public_key_hex: device.public_key_hex,
                class: Some(device.class).filter(|class| !class.is_empty()),
            })
            .collect();

        let registry = self.ingest.registry.clone();
        let added = tokio::task::spawn_blocking(move || registry.enroll(&enrollments))
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(|error| match error {
                vigil_ingest::Error::InvalidEnrollment { .. } => {
                    Status::invalid_argument(error.to_string())
                }
                other => internal(other),
            })?;
        tracing::info!(added, by, "devices enrolled");
        Ok(Response::new(AddDevicesResponse {
            added: added as u32,
        }))
    }

    async fn list_devices(
        &self,
        _request: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        let devices = self
            .ingest
            .registry
            .list()
            .iter()
            .map(|entry| device_message(entry, &self.detector))
            .collect();
        Ok(Response::new(ListDevicesResponse { devices }))
    }

    async fn show_device(
        &self,
        request: Request<DeviceActionRequest>,
    ) -> Result<Response<DeviceActionResponse>, Status> {
        let device_id = request.into_inner().device_id;
        self.found(self.ingest.registry.get(&device_id), &device_id)
    }

    async fn quarantine_device(
        &self,
        request: Request<DeviceActionRequest>,
    ) -> Result<Response<DeviceActionResponse>, Status> {
        let by = caller_of(&request);
        let request = request.into_inner();
        tracing::info!(device_id = ?request.device_id, by, "quarantine requested");
        let reason = if request.reason.is_empty() {
            "quarantined by an operator"
        } else {
            &request.reason
        };
        let entry = self
            .ingest
            .quarantine(&request.device_id, reason)
            .map_err(internal)?;
        if let Some(entry) = &entry {
            self.observations.send_decision(Observation::StatusChanged {
                device_id: entry.id.clone(),
                quarantined: true,
                reason: reason.to_owned(),
            });
            // The quarantine itself is durable already; the detector also re-reads the
            // registry for quarantined devices, so a full queue only delays its view.
        }
        self.found(entry, &request.device_id)
    }

    async fn release_device(
        &self,
        request: Request<DeviceActionRequest>,
    ) -> Result<Response<DeviceActionResponse>, Status> {
        let by = caller_of(&request);
        let request = request.into_inner();
        let device_id = request.device_id;
        tracing::info!(device_id = ?device_id, by, "release requested");
        let entry = self.ingest.release(&device_id).map_err(internal)?;
        if let Some(entry) = &entry {
            let reason = if request.reason.is_empty() {
                "released by the SOC".to_owned()
            } else {
                request.reason
            };
            self.observations.send_decision(Observation::StatusChanged {
                device_id: entry.id.clone(),
                quarantined: false,
                reason,
            });
            // As for a quarantine: the registry is the truth, the detector catches up.
        }
        self.found(entry, &device_id)
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let by = caller_of(&request);
        let request = request.into_inner();
        let role = Role::parse(&request.role).ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown role {}; roles are {}",
                request.role.escape_default(),
                Role::names()
            ))
        })?;
        crate::tokens::check_name(&request.name)
            .map_err(|error| Status::invalid_argument(error.to_string()))?;

        let tokens = self.tokens.clone();
        let now_ms = vigil_ingest::now_ms();
        let (record, secret) =
            tokio::task::spawn_blocking(move || tokens.create(role, &request.name, now_ms))
                .await
                .map_err(|error| Status::internal(error.to_string()))?
                .map_err(token_store_failed)?;
        tracing::info!(
            token_id = %record.id,
            name = ?record.name,
            role = record.role.as_str(),
            by,
            "api token created"
        );
        Ok(Response::new(CreateTokenResponse {
            token: Some(token_message(&record)),
            secret,
        }))
    }

    async fn list_tokens(
        &self,
        _request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let tokens = self
            .tokens
            .list()
            .iter()
            .map(|record| token_message(record))
            .collect();
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let by = caller_of(&request);
        let token_id = request.into_inner().token_id;
        let tokens = self.tokens.clone();
        let now_ms = vigil_ingest::now_ms();
        let id = token_id.clone();
        let revoked = tokio::task::spawn_blocking(move || tokens.revoke(&id, now_ms))
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(token_store_failed)?;
        let Some(record) = revoked else {
            return Err(Status::not_found(format!(
                "no token {}",
                token_id.escape_default()
            )));
        };
        tracing::info!(token_id = %record.id, name = ?record.name, by, "api token revoked");
        Ok(Response::new(RevokeTokenResponse {
            token: Some(token_message(&record)),
        }))
    }
}
