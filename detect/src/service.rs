//! The SOC's gRPC service: a stream of alerts resumable from the last id a client saw, and
//! acknowledgement.
//!
//! The stream first sends the kept alerts after the client's id, then waits for new ones. It
//! reads from the durable alert log, so a client that reconnects (or a server that restarts)
//! loses nothing: the client passes the last id it saw and gets everything after it.

use std::collections::VecDeque;
use std::pin::Pin;

use futures::Stream;
use tonic::{Request, Response, Status};
use vigil_proto::v1;
use vigil_proto::v1::soc_server::Soc;

use crate::alerts::{Alert, AlertLog};

/// Alerts read from the log per step of a stream.
const STREAM_CHUNK: usize = 256;

/// Serves [`Soc`] over the alert log.
#[derive(Debug, Clone)]
pub struct SocService {
    alerts: AlertLog,
}

impl SocService {
    pub fn new(alerts: AlertLog) -> Self {
        Self { alerts }
    }
}

/// The protobuf form of an alert.
pub fn alert_message(alert: &Alert) -> v1::Alert {
    v1::Alert {
        alert_id: alert.alert_id,
        device_id: alert.device_id.clone(),
        raised_at_ms: alert.raised_at_ms,
        detector: alert.detector.clone(),
        severity: alert.severity.as_str().to_owned(),
        score: alert.score,
        summary: alert.summary.clone(),
        evidence: alert
            .evidence
            .iter()
            .map(|e| v1::Evidence {
                feature: e.feature.clone(),
                observed: e.observed,
                expected: e.expected,
                deviation: e.deviation,
            })
            .collect(),
        action: alert.action.as_str().to_owned(),
        acknowledged: alert.acknowledged,
        device_class: alert.device_class.clone(),
    }
}

type AlertStream = Pin<Box<dyn Stream<Item = Result<v1::Alert, Status>> + Send>>;

struct Cursor {
    log: AlertLog,
    latest: tokio::sync::watch::Receiver<u64>,
    after: u64,
    buffer: VecDeque<Alert>,
}

impl Cursor {
    /// The next alert after the cursor, waiting for one to be raised if need be; `None` once
    /// the log is gone (the server stops).
    async fn next(&mut self) -> Option<Alert> {
        loop {
            if let Some(alert) = self.buffer.pop_front() {
                self.after = alert.alert_id;
                return Some(alert);
            }
            // Mark the current id seen before looking, so no append can slip between the
            // look and the wait.
            self.latest.borrow_and_update();
            self.buffer.extend(self.log.after(self.after, STREAM_CHUNK));
            if self.buffer.is_empty() && self.latest.changed().await.is_err() {
                return None;
            }
        }
    }
}

#[tonic::async_trait]
impl Soc for SocService {
    type StreamAlertsStream = AlertStream;

    async fn stream_alerts(
        &self,
        request: Request<v1::StreamAlertsRequest>,
    ) -> Result<Response<Self::StreamAlertsStream>, Status> {
        let cursor = Cursor {
            latest: self.alerts.latest(),
            log: self.alerts.clone(),
            after: request.into_inner().after_id,
            buffer: VecDeque::new(),
        };
        let stream = futures::stream::unfold(cursor, |mut cursor| async move {
            let alert = cursor.next().await?;
            Some((Ok(alert_message(&alert)), cursor))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack_alert(
        &self,
        request: Request<v1::AckAlertRequest>,
    ) -> Result<Response<v1::AckAlertResponse>, Status> {
        let request = request.into_inner();
        match self
            .alerts
            .acknowledge(request.alert_id, &request.note, crate::now_ms())
        {
            Ok(Some(alert)) => Ok(Response::new(v1::AckAlertResponse {
                alert: Some(alert_message(&alert)),
            })),
            Ok(None) => Err(Status::not_found(format!("no alert {}", request.alert_id))),
            Err(error) => {
                tracing::error!(%error, "alert acknowledgement could not be written");
                Err(Status::internal(error.to_string()))
            }
        }
    }
}
