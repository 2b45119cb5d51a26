//! Metrics of the gRPC port itself, named `vigil_grpc_<what>_<unit>`; counters end in `_total`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::auth::AuthFailure;

/// The `reason` label of refusal counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    reason: &'static str,
}

/// Every counter of the gRPC port.
#[derive(Debug)]
pub(crate) struct GrpcMetrics {
    auth_failures: Family<ReasonLabel, Counter>,
}

impl GrpcMetrics {
    pub(crate) fn new() -> Self {
        let metrics = Self {
            auth_failures: Family::default(),
        };

        // Every label is present from the start, so dashboards and tests see zeros, not gaps.
        for failure in AuthFailure::ALL {
            drop(metrics.auth_failures.get_or_create(&ReasonLabel {
                reason: failure.as_str(),
            }));
        }
        metrics
    }

    /// Counts one refused gRPC or Flight SQL call.
    pub(crate) fn auth_failure(&self, failure: AuthFailure) {
        self.auth_failures
            .get_or_create(&ReasonLabel {
                reason: failure.as_str(),
            })
            .inc();
    }

    pub(crate) fn register(&self, registry: &mut Registry) {
        let grpc = registry.sub_registry_with_prefix("vigil_grpc");
        grpc.register(
            "auth_failures",
            "gRPC and Flight SQL calls refused for their bearer token or its role, by reason",
            self.auth_failures.clone(),
        );
    }
}
