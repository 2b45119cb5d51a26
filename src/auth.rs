//! Bearer tokens and roles on the gRPC port: device administration, the SOC service and Flight
//! SQL.
//!
//! Every call passes [`AuthLayer`] before it reaches a service. The layer reads
//! `authorization: Bearer <secret>`, finds who holds the secret, and checks that the holder's
//! [`Role`] may call the request's gRPC path (`/package.Service/Method`). A call with no token,
//! an unknown one or a revoked one is refused with `unauthenticated`; a known token whose role
//! lacks the method with `permission_denied`. Refusals are counted in
//! `vigil_grpc_auth_failures_total{reason}` and logged with the path and the token's id, never
//! with the secret.
//!
//! Two kinds of token exist. The bootstrap admin token: on first start, when none exists, the
//! server writes one to `<data-dir>/admin.token`, readable by its owner only, and keeps only its
//! SHA-256 (the file is for the operator; the server reads it once per start). API tokens:
//! created, listed and revoked over gRPC by an admin and kept as hashes in
//! [`TokenStore`](crate::tokens::TokenStore). A revocation is seen by the next call, and a call
//! still running under the revoked token (an alert stream, a long query result) is ended with
//! `unauthenticated` in its trailers at its next frame or as soon as it waits for one.

use std::fs;
use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::Context;
use futures::future::{Either, Ready, ready};
use http_body::Frame;
use serde::{Deserialize, Serialize};
use tonic::Status;
use tonic::codegen::{Bytes, Service, http};

use crate::metrics::AccessMetrics;
use crate::tokens::{TokenStore, secret_hash};

const TOKEN_FILE: &str = "admin.token";

/// Prefix of every Flight SQL method's path.
const FLIGHT_SQL_PATHS: &str = "/arrow.flight.protocol.FlightService/";

/// Methods the `soc` role may call besides Flight SQL: the alert stream, acknowledgement, and
/// the device actions of incident response.
const SOC_METHODS: [&str; 6] = [
    "/vigil.v1.Soc/StreamAlerts",
    "/vigil.v1.Soc/AckAlert",
    "/vigil.v1.DeviceAdmin/ListDevices",
    "/vigil.v1.DeviceAdmin/ShowDevice",
    "/vigil.v1.DeviceAdmin/QuarantineDevice",
    "/vigil.v1.DeviceAdmin/ReleaseDevice",
];

/// What a token may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    /// Flight SQL only: read-only queries over readings, rejections, devices and alerts.
    Analyst,
    /// Flight SQL, the alert stream and its acknowledgement, and device quarantine, release,
    /// show and list; no enrollment, no token management.
    Soc,
    /// Everything, including device enrollment and token management.
    Admin,
    /// The Prometheus page `/metrics` on the HTTP port only (when it asks for a token): a
    /// scraper's token that, if it leaks, reads no patient data and changes nothing.
    Metrics,
}

impl Role {
    /// Every role, least privileged first.
    pub(crate) const ALL: [Role; 4] = [Role::Metrics, Role::Analyst, Role::Soc, Role::Admin];

    /// The role's name on the wire and on the command line.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Analyst => "analyst",
            Role::Soc => "soc",
            Role::Admin => "admin",
            Role::Metrics => "metrics",
        }
    }

    /// Every role's name, for messages: `metrics, analyst, soc, admin`.
    pub(crate) fn names() -> String {
        let names: Vec<&str> = Role::ALL.iter().map(|role| role.as_str()).collect();
        names.join(", ")
    }

    /// The role named `name`, if any.
    pub(crate) fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_str() == name)
    }

    /// Whether this role may call the gRPC method at `path`. Paths nobody listed are for
    /// `admin` only, so a method added later is closed until someone opens it.
    pub(crate) fn may_call(self, path: &str) -> bool {
        let flight_sql = path.starts_with(FLIGHT_SQL_PATHS);
        match self {
            Role::Admin => true,
            Role::Soc => flight_sql || SOC_METHODS.contains(&path),
            Role::Analyst => flight_sql,
            Role::Metrics => false,
        }
    }

    /// Whether this role may have `access`: `/metrics` is for `metrics` and `admin`.
    pub(crate) fn may(self, access: Access<'_>) -> bool {
        match access {
            Access::Grpc(path) => self.may_call(path),
            Access::Metrics => matches!(self, Role::Metrics | Role::Admin),
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access<'a> {
    /// The gRPC method at this path (`/package.Service/Method`).
    Grpc(&'a str),
    /// The Prometheus page `/metrics` of the HTTP port.
    Metrics,
}

impl Access<'_> {
    /// What was asked for, for logs: the gRPC path or `/metrics`.
    fn target(self) -> &'static str {
        match self {
            Access::Grpc(_) => "grpc",
            Access::Metrics => "http /metrics",
        }
    }
}

/// Why a call was refused; the `reason` label of `vigil_grpc_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthFailure {
    /// No `authorization` header, or not a bearer token.
    MissingToken,
    /// A bearer token nobody issued.
    UnknownToken,
    /// A token that was revoked.
    RevokedToken,
    /// A valid token whose role may not call the method.
    RoleDenied,
}

impl AuthFailure {
    /// Every reason, for counters that start at zero.
    pub(crate) const ALL: [AuthFailure; 4] = [
        AuthFailure::MissingToken,
        AuthFailure::UnknownToken,
        AuthFailure::RevokedToken,
        AuthFailure::RoleDenied,
    ];

    /// The reason's label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AuthFailure::MissingToken => "missing_token",
            AuthFailure::UnknownToken => "unknown_token",
            AuthFailure::RevokedToken => "revoked_token",
            AuthFailure::RoleDenied => "role_denied",
        }
    }
}

/// Who made an admitted call; put in the request's extensions for the services to log.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The API token's id; `None` for the bootstrap admin token.
    pub(crate) token_id: Option<String>,
    /// The token's role.
    pub(crate) role: Role,
}

impl Caller {
    /// The caller's token id for logs: the id, or `bootstrap` for the admin token's file.
    pub(crate) fn token_label(&self) -> &str {
        self.token_id.as_deref().unwrap_or("bootstrap")
    }
}

/// Decides for each call whether its token may make it.
pub(crate) struct Authenticator {
    admin_hash: [u8; 32],
    tokens: Arc<TokenStore>,
    metrics: Arc<AccessMetrics>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authenticator { .. }")
    }
}

impl Authenticator {
    /// Loads the bootstrap admin token of `data_dir`, creating it on first start, and checks
    /// API tokens against `tokens`.
    pub(crate) fn load_or_create(
        data_dir: &Path,
        tokens: Arc<TokenStore>,
        metrics: Arc<AccessMetrics>,
    ) -> anyhow::Result<Self> {
        let path = data_dir.join(TOKEN_FILE);
        if !path.exists() {
            let token = hex::encode(rand::random::<[u8; 32]>());
            write_owner_only(&path, token.as_bytes())
                .with_context(|| format!("cannot create admin token {}", path.display()))?;
            tracing::info!(path = %path.display(), "created admin token");
        }

        let token = fs::read_to_string(&path)
            .with_context(|| format!("cannot read admin token {}", path.display()))?;
        Ok(Self {
            admin_hash: secret_hash(&token),
            tokens,
            metrics,
        })
    }

    /// Checks the bearer token in `headers` for a call of `path`; refusals are counted and
    /// logged here.
    #[allow(clippy::result_large_err)]
    pub(crate) fn authorize(
        &self,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Result<Caller, Status> {
        self.check(Access::Grpc(path), headers)
            .map_err(|(failure, caller)| match failure {
                AuthFailure::MissingToken => Status::unauthenticated("missing bearer token"),
                AuthFailure::UnknownToken => Status::unauthenticated("unknown bearer token"),
                AuthFailure::RevokedToken => Status::unauthenticated("revoked bearer token"),
                AuthFailure::RoleDenied => Status::permission_denied(format!(
                    "permission denied: role {} may not call {}",
                    caller.map_or("", |caller| caller.role.as_str()),
                    path.escape_default()
                )),
            })
    }

    /// Checks the bearer token in `headers` for `access`. A refusal is counted and logged
    /// (with the token's id, never its secret) and names the caller when the token was valid.
    pub(crate) fn check(
        &self,
        access: Access<'_>,
        headers: &http::HeaderMap,
    ) -> Result<Caller, (AuthFailure, Option<Caller>)> {
        let (failure, caller) = match self.identify(headers) {
            Ok(caller) if caller.role.may(access) => return Ok(caller),
            Ok(caller) => (AuthFailure::RoleDenied, Some(caller)),
            Err(failure) => (failure, None),
        };

        self.metrics.auth_failure(access, failure);
        let token_id = caller.as_ref().map_or("", Caller::token_label);
        let role = caller.as_ref().map_or("", |caller| caller.role.as_str());
        let path = match access {
            Access::Grpc(path) => path,
            Access::Metrics => "/metrics",
        };
        tracing::info!(
            reason = failure.as_str(),
            port = access.target(),
            path = ?path,
            token_id,
            role,
            "call refused"
        );
        Err((failure, caller))
    }

    /// Who holds the bearer token in `headers`.
    fn identify(&self, headers: &http::HeaderMap) -> Result<Caller, AuthFailure> {
        let secret = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|secret| !secret.is_empty())
            .ok_or(AuthFailure::MissingToken)?;

        let hash = secret_hash(secret);
        if constant_time_eq(&hash, &self.admin_hash) {
            return Ok(Caller {
                token_id: None,
                role: Role::Admin,
            });
        }
        // A map lookup by hash: its timing can tell an attacker about the hash of a guess,
        // which says nothing about a secret.
        let record = self.tokens.find(&hash).ok_or(AuthFailure::UnknownToken)?;
        if record.revoked_at_ms.is_some() {
            return Err(AuthFailure::RevokedToken);
        }
        Ok(Caller {
            token_id: Some(record.id.clone()),
            role: record.role,
        })
    }
}

/// The tower layer that puts [`Authenticator`] in front of every gRPC service of the server.
#[derive(Debug, Clone)]
pub(crate) struct AuthLayer {
    authenticator: Arc<Authenticator>,
}

impl AuthLayer {
    pub(crate) fn new(authenticator: Arc<Authenticator>) -> Self {
        Self { authenticator }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            authenticator: self.authenticator.clone(),
            inner,
        }
    }
}

/// A gRPC service behind [`AuthLayer`]: admitted calls reach it with a [`Caller`] extension,
/// refused ones are answered with their status and never reach it.
#[derive(Debug, Clone)]
pub(crate) struct AuthService<S> {
    authenticator: Arc<Authenticator>,
    inner: S,
}

type BoxedFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for AuthService<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResponseBody: http_body::Body<Data = Bytes> + Default + Unpin + Send + 'static,
{
    type Response = http::Response<RevocableBody<ResponseBody>>;
    type Error = S::Error;
    type Future = Either<
        Ready<Result<Self::Response, S::Error>>,
        BoxedFuture<Result<Self::Response, S::Error>>,
    >;

    fn poll_ready(&mut self, context: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<RequestBody>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let caller = match self.authenticator.authorize(&path, request.headers()) {
            Ok(caller) => caller,
            Err(status) => return Either::Left(ready(Ok(status.into_http()))),
        };

        // The bootstrap token cannot be revoked; an API token's calls watch their token.
        let revoked = caller.token_id.clone().map(|token_id| {
            let until_revoked = self.authenticator.tokens.until_revoked(token_id.clone());
            Box::pin(async move {
                until_revoked.await;
                tracing::info!(token_id, path = ?path, "grpc call ended: its token was revoked");
            }) as BoxedFuture<()>
        });
        request.extensions_mut().insert(caller);
        let response = self.inner.call(request);
        Either::Right(Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| RevocableBody {
                inner,
                revoked,
                ended: false,
            }))
        }))
    }
}

/// A response body that ends with `unauthenticated` once the caller's token is revoked.
pub(crate) struct RevocableBody<B> {
    inner: B,
    /// Completes when the token is revoked; `None` for the bootstrap token.
    revoked: Option<BoxedFuture<()>>,
    ended: bool,
}

impl<B> std::fmt::Debug for RevocableBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocableBody")
            .field("revocable", &self.revoked.is_some())
            .field("ended", &self.ended)
            .finish()
    }
}

impl<B: Default> Default for RevocableBody<B> {
    fn default() -> Self {
        Self {
            inner: B::default(),
            revoked: None,
            ended: false,
        }
    }
}

impl<B> http_body::Body for RevocableBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let revoked_now = self
            .revoked
            .as_mut()
            .is_some_and(|revoked| revoked.as_mut().poll(context).is_ready());
        if revoked_now {
            self.ended = true;
            let status = Status::unauthenticated("revoked bearer token");
            let (mut parts, ()) = status.into_http::<()>().into_parts();
            parts.headers.remove(http::header::CONTENT_TYPE);
            return Poll::Ready(Some(Ok(Frame::trailers(parts.headers))));
        }
        Pin::new(&mut self.inner).poll_frame(context)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.revoked.is_some() {
            // It may end early, so no exact length.
            http_body::SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn write_owner_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Finds the token a client command should send: flag, file, environment, or the default
/// data directory's admin token.
pub(crate) fn client_token(
    token: Option<&str>,
    token_file: Option<&Path>,
) -> anyhow::Result<String> {
    if let Some(token) = token {
        return Ok(token.trim().to_owned());
    }
    if let Some(path) = token_file {
        let text = fs::read_to_string(path)
            .with_context(|| format!("cannot read token file {}", path.display()))?;
        return Ok(text.trim().to_owned());
    }
    let default = Path::new("./vigil-data").join(TOKEN_FILE);
    fs::read_to_string(&default)
        .map(|text| text.trim().to_owned())
        .with_context(|| {
            format!(
                "no token given (--token, --token-file or VIGIL_TOKEN) and {} is not readable",
                default.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(secret: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {secret}").parse().unwrap(),
        );
        headers
    }

    fn authenticator(dir: &Path) -> Authenticator {
        let tokens = Arc::new(TokenStore::open(dir).unwrap());
        Authenticator::load_or_create(dir, tokens, Arc::new(AccessMetrics::new())).unwrap()
    }

    #[test]
    fn admin_token_is_created_once_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authenticator(dir.path());
        let token = fs::read_to_string(dir.path().join(TOKEN_FILE)).unwrap();
        let again = authenticator(dir.path());
        assert_eq!(auth.admin_hash, again.admin_hash);

        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join(TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let enroll = "/vigil.v1.DeviceAdmin/AddDevices";
        let caller = auth.authorize(enroll, &headers(&token)).unwrap();
        assert_eq!(caller.role, Role::Admin);
        assert!(caller.token_id.is_none());

        let refused = auth.authorize(enroll, &headers("nope")).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        let refused = auth.authorize(enroll, &http::HeaderMap::new()).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn roles_decide_per_method_and_revocation_is_immediate() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authenticator(dir.path());
        let (_, analyst) = auth.tokens.create(Role::Analyst, "grafana", 1).unwrap();
        let (soc_record, soc) = auth.tokens.create(Role::Soc, "soc", 1).unwrap();

        let query = "/arrow.flight.protocol.FlightService/GetFlightInfo";
        let quarantine = "/vigil.v1.DeviceAdmin/QuarantineDevice";
        let enroll = "/vigil.v1.DeviceAdmin/AddDevices";
        let create_token = "/vigil.v1.DeviceAdmin/CreateToken";

        assert!(auth.authorize(query, &headers(&analyst)).is_ok());
        let denied = auth.authorize(quarantine, &headers(&analyst)).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(!denied.message().contains(&analyst));

        assert!(auth.authorize(quarantine, &headers(&soc)).is_ok());
        assert!(auth.authorize(query, &headers(&soc)).is_ok());
        for path in [enroll, create_token] {
            let denied = auth.authorize(path, &headers(&soc)).unwrap_err();
            assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        }

        for role in Role::ALL {
            let scrapes = matches!(role, Role::Metrics | Role::Admin);
            assert_eq!(role.may(Access::Metrics), scrapes, "{role:?}");
        }
        let (_, scraper) = auth.tokens.create(Role::Metrics, "prometheus", 1).unwrap();
        let denied = auth.authorize(query, &headers(&scraper)).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(auth.check(Access::Metrics, &headers(&scraper)).is_ok());
        let (failure, caller) = auth.check(Access::Metrics, &headers(&soc)).unwrap_err();
        assert_eq!(failure, AuthFailure::RoleDenied);
        assert_eq!(caller.unwrap().role, Role::Soc);

        auth.tokens.revoke(&soc_record.id, 2).unwrap();
        let refused = auth.authorize(query, &headers(&soc)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }

    /// Every method of the vigil services is either opened to `soc` on purpose or left to
    /// `admin`; this lists them, so a new RPC shows up here and gets a decision.
    #[test]
    fn every_vigil_method_has_a_decided_role() {
        let admin_only = [
            "/vigil.v1.DeviceAdmin/AddDevices",
            "/vigil.v1.DeviceAdmin/CreateToken",
            "/vigil.v1.DeviceAdmin/ListTokens",
            "/vigil.v1.DeviceAdmin/RevokeToken",
        ];
        let sources = [
            (
                "DeviceAdmin",
                include_str!("../proto/proto/vigil/v1/admin.proto"),
            ),
            ("Soc", include_str!("../proto/proto/vigil/v1/soc.proto")),
        ];
        let mut methods = Vec::new();
        for (service, text) in sources {
            for line in text.lines() {
                if let Some(rest) = line.trim().strip_prefix("rpc ") {
                    let name = rest.split('(').next().unwrap().trim();
                    methods.push(format!("/vigil.v1.{service}/{name}"));
                }
            }
        }
        assert_eq!(methods.len(), admin_only.len() + SOC_METHODS.len());
        for method in &methods {
            let soc = SOC_METHODS.contains(&method.as_str());
            assert!(soc || admin_only.contains(&method.as_str()), "{method}");
            assert_eq!(Role::Soc.may_call(method), soc, "{method}");
            assert!(!Role::Analyst.may_call(method), "{method}");
            assert!(!Role::Metrics.may_call(method), "{method}");
            assert!(Role::Admin.may_call(method), "{method}");
        }
    }
}
