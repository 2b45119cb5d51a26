//! The HTTP listener: Prometheus `/metrics` and `/healthz`.
//!
//! `/healthz` is always open: a load balancer or an orchestrator probes it without a secret,
//! and it tells nothing but "ok". `/metrics` names devices' refusal counts and the server's
//! load; with `metrics_require_token` set it answers only a request with
//! `Authorization: Bearer <token>` of a `metrics` or `admin` token. A request without a token,
//! or with an unknown or revoked one, gets 401 with `WWW-Authenticate: Bearer`; a valid token
//! of another role gets 403. Refusals are counted in `vigil_http_auth_failures_total{reason}`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;

use crate::auth::{Access, AuthFailure, Authenticator};

/// What the `/metrics` route needs.
#[derive(Debug, Clone)]
struct MetricsPage {
    registry: Arc<Registry>,
    /// Checks the bearer token of each request; `None` when the page is open.
    authenticator: Option<Arc<Authenticator>>,
}

/// Serves the HTTP routes until `shutdown` resolves. With an `authenticator`, `/metrics` asks
/// for a bearer token.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    authenticator: Option<Arc<Authenticator>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(MetricsPage {
            registry,
            authenticator,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(page): State<MetricsPage>, headers: HeaderMap) -> Response {
    if let Some(authenticator) = &page.authenticator
        && let Err((failure, _)) = authenticator.check(Access::Metrics, &headers)
    {
        return refusal(failure);
    }

    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &page.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            error.to_string(),
        )
            .into_response(),
    }
}

/// The answer to a refused request: 401 with a bearer challenge when the token is missing or
/// not valid, 403 when a valid token's role may not read metrics.
fn refusal(failure: AuthFailure) -> Response {
    let (status, reason) = match failure {
        AuthFailure::MissingToken => (StatusCode::UNAUTHORIZED, "missing bearer token"),
        AuthFailure::UnknownToken => (StatusCode::UNAUTHORIZED, "unknown bearer token"),
        AuthFailure::RevokedToken => (StatusCode::UNAUTHORIZED, "revoked bearer token"),
        AuthFailure::RoleDenied => (
            StatusCode::FORBIDDEN,
            "this token's role may not read metrics; use a metrics or admin token",
        ),
    };
    let challenge = if status == StatusCode::UNAUTHORIZED {
        "Bearer realm=\"vigil\""
    } else {
        "Bearer realm=\"vigil\", error=\"insufficient_scope\""
    };
    (
        status,
        [
            (header::WWW_AUTHENTICATE, challenge),
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        ],
        format!("{reason}\n"),
    )
        .into_response()
}
