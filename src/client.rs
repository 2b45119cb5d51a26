//! Client commands: device administration, alerts, API tokens and SQL against a running
//! server's gRPC port.

use std::path::Path;

use anyhow::{Context, bail};
use arrow::array::RecordBatch;
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use vigil_proto::v1::device_admin_client::DeviceAdminClient;
use vigil_proto::v1::soc_client::SocClient;
use vigil_proto::v1::{
    AckAlertRequest, AddDevicesRequest, Alert, ApiToken, CreateTokenRequest, CreateTokenResponse,
    Device, DeviceActionRequest, ListDevicesRequest, ListTokensRequest, RevokeTokenRequest,
    StreamAlertsRequest,
};

/// Devices per enrollment request when importing a file.
const IMPORT_CHUNK: usize = 5_000;

type AuthInterceptor =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

/// A connection to a server's gRPC port with a bearer token.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    channel: Channel,
    token: String,
}

impl Client {
    /// Connects to `server`. An `https://` server is checked against the public web roots and,
    /// when given, the PEM certificate(s) in `ca_cert` (a hospital's private CA, or the server's
    /// own self-signed certificate).
    pub(crate) async fn connect(
        server: &str,
        token: String,
        ca_cert: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let mut endpoint = Channel::from_shared(server.to_owned())
            .with_context(|| format!("invalid server URL {server}"))?;
        if server.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_webpki_roots();
            if let Some(path) = ca_cert {
                let pem = std::fs::read(path)
                    .with_context(|| format!("cannot read CA certificate {}", path.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(tls)
                .with_context(|| format!("cannot set up TLS for {server}"))?;
        } else if let Some(path) = ca_cert {
            bail!(
                "a CA certificate ({}) is given but the server URL {server} is not https://",
                path.display()
            );
        }

        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach {server}"))?;
        Ok(Self { channel, token })
    }

    /// Adds the bearer token to every call.
    fn authorization(&self) -> anyhow::Result<AuthInterceptor> {
        let header: MetadataValue<_> = format!("Bearer {}", self.token)
            .parse()
            .context("the token contains characters not allowed in a header")?;
        Ok(Box::new(move |mut request: tonic::Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
            Ok(request)
        }))
    }

    fn admin(
        &self,
    ) -> anyhow::Result<DeviceAdminClient<InterceptedService<Channel, AuthInterceptor>>> {
        Ok(
            DeviceAdminClient::with_interceptor(self.channel.clone(), self.authorization()?)
                .max_decoding_message_size(64 * 1024 * 1024),
        )
    }

    fn soc(&self) -> anyhow::Result<SocClient<InterceptedService<Channel, AuthInterceptor>>> {
        Ok(SocClient::with_interceptor(
            self.channel.clone(),
            self.authorization()?,
        ))
    }

    /// The stream of alerts after `after_id`.
    pub(crate) async fn stream_alerts(
        &self,
        after_id: u64,
    ) -> anyhow::Result<tonic::Streaming<Alert>> {
        Ok(self
            .soc()?
            .stream_alerts(StreamAlertsRequest { after_id })
            .await?
            .into_inner())
    }

    pub(crate) async fn ack_alert(&self, alert_id: u64, note: &str) -> anyhow::Result<Alert> {
        self.soc()?
            .ack_alert(AckAlertRequest {
                alert_id,
                note: note.to_owned(),
            })
            .await?
            .into_inner()
            .alert
            .context("server answered without an alert")
    }

    /// Enrolls devices; returns how many were new.
    pub(crate) async fn add_devices(&self, devices: Vec<Device>) -> anyhow::Result<u32> {
        let mut added = 0;
        for chunk in devices.chunks(IMPORT_CHUNK) {
            let request = AddDevicesRequest {
                devices: chunk.to_vec(),
            };
            added += self.admin()?.add_devices(request).await?.into_inner().added;
        }
        Ok(added)
    }

    pub(crate) async fn list_devices(&self) -> anyhow::Result<Vec<Device>> {
        Ok(self
            .admin()?
            .list_devices(ListDevicesRequest {})
            .await?
            .into_inner()
            .devices)
    }

    pub(crate) async fn device_action(
        &self,
        action: DeviceAction,
        device_id: &str,
        reason: &str,
    ) -> anyhow::Result<Device> {
        let request = DeviceActionRequest {
            device_id: device_id.to_owned(),
            reason: reason.to_owned(),
        };
        let mut admin = self.admin()?;
        let response = match action {
            DeviceAction::Show => admin.show_device(request).await?,
            DeviceAction::Quarantine => admin.quarantine_device(request).await?,
            DeviceAction::Release => admin.release_device(request).await?,
        };
        response
            .into_inner()
            .device
            .context("server answered without a device")
    }

    /// Creates an API token; the answer carries its secret, which the server sends only once.
    pub(crate) async fn create_token(
        &self,
        role: &str,
        name: &str,
    ) -> anyhow::Result<CreateTokenResponse> {
        let request = CreateTokenRequest {
            role: role.to_owned(),
            name: name.to_owned(),
        };
        Ok(self.admin()?.create_token(request).await?.into_inner())
    }

    pub(crate) async fn list_tokens(&self) -> anyhow::Result<Vec<ApiToken>> {
        Ok(self
            .admin()?
            .list_tokens(ListTokensRequest {})
            .await?
            .into_inner()
            .tokens)
    }

    pub(crate) async fn revoke_token(&self, token_id: &str) -> anyhow::Result<ApiToken> {
        let request = RevokeTokenRequest {
            token_id: token_id.to_owned(),
        };
        self.admin()?
            .revoke_token(request)
            .await?
            .into_inner()
            .token
            .context("server answered without a token")
    }

    /// Runs a query over Flight SQL and collects its result.
    pub(crate) async fn sql(&self, query: &str) -> anyhow::Result<Vec<RecordBatch>> {
        let mut flight = FlightSqlServiceClient::new(self.channel.clone());
        flight.set_token(self.token.clone());
        let info = flight.execute(query.to_owned(), None).await?;

        let mut batches = Vec::new();
        for endpoint in info.endpoint {
            let ticket = endpoint
                .ticket
                .context("flight endpoint without a ticket")?;
            let stream = flight.do_get(ticket).await?;
            batches.extend(stream.try_collect::<Vec<_>>().await?);
        }
        Ok(batches)
    }
}

/// Device actions that take one device id.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DeviceAction {
    Show,
    Quarantine,
    Release,
}

/// Reads `device_id,public_key_hex,class` with a header line; an empty class means `generic`.
pub(crate) fn read_enrollment_csv(path: &Path) -> anyhow::Result<Vec<Device>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_enrollment_csv(&text).with_context(|| format!("in {}", path.display()))
}

pub(crate) fn parse_enrollment_csv(text: &str) -> anyhow::Result<Vec<Device>> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty());
    match lines.next() {
        Some((_, header)) if header.trim().starts_with("device_id,public_key_hex") => {}
        _ => bail!("the first line must be the header device_id,public_key_hex,class"),
    }

    let mut devices = Vec::new();
    for (index, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let (device_id, public_key_hex, class) = match fields.as_slice() {
            [id, key] => (*id, *key, ""),
            [id, key, class] => (*id, *key, *class),
            _ => bail!("line {}: expected 2 or 3 fields", index + 1),
        };
        devices.push(Device {
            device_id: device_id.to_owned(),
            public_key_hex: public_key_hex.to_owned(),
            class: class.to_owned(),
            ..Device::default()
        });
    }
    Ok(devices)
}

/// Output formats of `vigil sql`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum OutputFormat {
    Table,
    Csv,
    Json,
}

pub(crate) fn format_batches(
    batches: &[RecordBatch],
    format: OutputFormat,
) -> anyhow::Result<String> {
    match format {
        OutputFormat::Table => Ok(arrow::util::pretty::pretty_format_batches(batches)?.to_string()),
        OutputFormat::Csv => {
            let mut bytes = Vec::new();
            {
                let mut writer = arrow::csv::Writer::new(&mut bytes);
                for batch in batches {
                    writer.write(batch)?;
                }
            }
            Ok(String::from_utf8(bytes)?)
        }
        OutputFormat::Json => {
            let mut writer = arrow::json::ArrayWriter::new(Vec::new());
            let refs: Vec<&RecordBatch> = batches.iter().collect();
            writer.write_batches(&refs)?;
            writer.finish()?;
            let mut text = String::from_utf8(writer.into_inner())?;
            if text.is_empty() {
                text.push_str("[]");
            }
            Ok(text)
        }
    }
}

pub(crate) fn format_devices(devices: &[Device]) -> String {
    let mut out = format!(
        "{:<40} {:<24} {:<12} {:<5} {}\n",
        "DEVICE", "CLASS", "STATUS", "RISK", "PUBLIC KEY"
    );
    for device in devices {
        out.push_str(&format!(
            "{:<40} {:<24} {:<12} {:<5.2} {}\n",
            device.device_id, device.class, device.status, device.risk, device.public_key_hex
        ));
    }
    out
}

/// Whether `error` is the server refusing the token (unknown, revoked, or its role lacks the
/// method): retrying cannot help.
pub(crate) fn is_refusal(error: &anyhow::Error) -> bool {
    error.downcast_ref::<tonic::Status>().is_some_and(|status| {
        matches!(
            status.code(),
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
        )
    })
}

/// API tokens as a table; revoked ones say when. Names are escaped, as an admin typed them.
pub(crate) fn format_tokens(tokens: &[ApiToken]) -> String {
    let mut out = format!(
        "{:<16} {:<8} {:<24} {:<15} {}\n",
        "ID", "ROLE", "NAME", "CREATED_AT_MS", "REVOKED_AT_MS"
    );
    for token in tokens {
        let revoked = if token.revoked_at_ms == 0 {
            "-".to_owned()
        } else {
            token.revoked_at_ms.to_string()
        };
        out.push_str(&format!(
            "{:<16} {:<8} {:<24} {:<15} {}\n",
            token.token_id,
            token.role,
            token.name.escape_default().to_string(),
            token.created_at_ms,
            revoked
        ));
    }
    out
}

/// One alert on one line. Device ids and summaries may carry an attacker's text: they are
/// escaped, never printed raw.
pub(crate) fn format_alert(alert: &Alert, json: bool) -> String {
    if json {
        let evidence: Vec<serde_json::Value> = alert
            .evidence
            .iter()
            .map(|e| {
                serde_json::json!({
                    "feature": e.feature,
                    "observed": e.observed,
                    "expected": e.expected,
                    "deviation": e.deviation,
                })
            })
            .collect();
        return serde_json::json!({
            "alert_id": alert.alert_id,
            "device_id": alert.device_id,
            "device_class": alert.device_class,
            "raised_at_ms": alert.raised_at_ms,
            "detector": alert.detector,
            "severity": alert.severity,
            "score": alert.score,
            "summary": alert.summary,
            "evidence": evidence,
            "action": alert.action,
            "acknowledged": alert.acknowledged,
        })
        .to_string();
    }
    let evidence: Vec<String> = alert
        .evidence
        .iter()
        .map(|e| {
            format!(
                "{}={:.2} (normal {:.2}, {:+.2})",
                e.feature.escape_default(),
                e.observed,
                e.expected,
                e.deviation
            )
        })
        .collect();
    format!(
        "#{} {} {:<8} {} [{}] {}: {} | {}",
        alert.alert_id,
        alert.raised_at_ms,
        alert.severity,
        alert.device_id.escape_default(),
        alert.detector,
        alert.action,
        alert.summary.escape_default(),
        evidence.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrollment_csv_defaults_the_class() {
        let devices =
            parse_enrollment_csv("device_id,public_key_hex,class\na,00,pump\nb,11\n").unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].class, "pump");
        assert_eq!(devices[1].class, "");
        assert!(parse_enrollment_csv("a,00\n").is_err());
        assert!(parse_enrollment_csv("device_id,public_key_hex\na,b,c,d\n").is_err());
    }
}
