//! Metrics of the server's own ports: refused bearer tokens and failed TLS handshakes on the
//! gRPC port (`vigil_grpc_<what>_<unit>`), refused bearer tokens on the HTTP port
//! (`vigil_http_<what>_<unit>`); counters end in `_total`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::auth::{Access, AuthFailure};

/// The `reason` label of refusal counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    reason: &'static str,
}

/// Every counter of the gRPC and HTTP ports.
#[derive(Debug)]
pub(crate) struct AccessMetrics {
    grpc_auth_failures: Family<ReasonLabel, Counter>,
    grpc_tls_handshake_failures: Counter,
    http_auth_failures: Family<ReasonLabel, Counter>,
}

impl AccessMetrics {
    pub(crate) fn new() -> Self {
        let metrics = Self {
            grpc_auth_failures: Family::default(),
            grpc_tls_handshake_failures: Counter::default(),
            http_auth_failures: Family::default(),
        };

        // Every label is present from the start, so dashboards and tests see zeros, not gaps.
        for failure in AuthFailure::ALL {
            let label = ReasonLabel {
                reason: failure.as_str(),
            };
            drop(metrics.grpc_auth_failures.get_or_create(&label));
            drop(metrics.http_auth_failures.get_or_create(&label));
        }
        metrics
    }

    /// Counts one refused call: a gRPC or Flight SQL call, or a request for `/metrics`.
    pub(crate) fn auth_failure(&self, access: Access<'_>, failure: AuthFailure) {
        let family = match access {
            Access::Grpc(_) => &self.grpc_auth_failures,
            Access::Metrics => &self.http_auth_failures,
        };
        family
            .get_or_create(&ReasonLabel {
                reason: failure.as_str(),
            })
            .inc();
    }

    /// Counts one connection to the gRPC port closed for its TLS handshake.
    pub(crate) fn grpc_tls_handshake_failure(&self) {
        self.grpc_tls_handshake_failures.inc();
    }

    pub(crate) fn register(&self, registry: &mut Registry) {
        let grpc = registry.sub_registry_with_prefix("vigil_grpc");
        grpc.register(
            "auth_failures",
            "gRPC and Flight SQL calls refused for their bearer token or its role, by reason",
            self.grpc_auth_failures.clone(),
        );
        grpc.register(
            "tls_handshake_failures",
            "Connections to the gRPC port closed because their TLS handshake failed or timed out",
            self.grpc_tls_handshake_failures.clone(),
        );
        registry.sub_registry_with_prefix("vigil_http").register(
            "auth_failures",
            "Requests for /metrics refused for their bearer token or its role, by reason",
            self.http_auth_failures.clone(),
        );
    }
}
