//! Records refusals that never reach a verifier (logins, ACL, malformed payloads) in the
//! write-ahead log, off the connection threads.
//!
//! The queue is bounded and never blocks a connection: when it is full, the record is dropped
//! and counted (`vigil_ingest_rejections_dropped_total`), so a flood of garbage cannot stall
//! the gateway. The refusal itself still happens.

use std::sync::Arc;
use std::thread;

use tokio::sync::mpsc;
use vigil_store::{Completion, Rejection, WalEntry, WalSender};

use crate::metrics::IngestMetrics;
use crate::{Error, Result};

const MAX_GROUP: usize = 1024;

/// Handle to the refusal recorder thread.
#[derive(Debug, Clone)]
pub struct RejectionRecorder {
    queue: mpsc::Sender<(Rejection, Option<Completion>)>,
    metrics: Arc<IngestMetrics>,
}

impl RejectionRecorder {
    pub fn start(wal: WalSender, capacity: usize, metrics: Arc<IngestMetrics>) -> Result<Self> {
        let (queue, mut receiver) =
            mpsc::channel::<(Rejection, Option<Completion>)>(capacity.max(1));

        thread::Builder::new()
            .name("vigil-rejections".into())
            .spawn(move || {
                let mut group = Vec::with_capacity(MAX_GROUP);
                while let Some(first) = receiver.blocking_recv() {
                    group.push(first);
                    while group.len() < MAX_GROUP {
                        match receiver.try_recv() {
                            Ok(next) => group.push(next),
                            Err(_) => break,
                        }
                    }
                    let entries = group
                        .drain(..)
                        .map(|(rejection, completion)| (WalEntry::Rejection(rejection), completion))
                        .collect();
                    if let Err(error) = wal.submit_batch(entries) {
                        tracing::error!(%error, "refusal records could not be logged");
                    }
                }
            })
            .map_err(|source| Error::Thread {
                name: "rejection recorder",
                source,
            })?;

        Ok(Self { queue, metrics })
    }

    /// Queues a refusal record; returns false (and counts it) when the queue is full.
    pub fn record(&self, rejection: Rejection, completion: Option<Completion>) -> bool {
        match self.queue.try_send((rejection, completion)) {
            Ok(()) => true,
            Err(_) => {
                self.metrics.rejections_dropped.inc();
                false
            }
        }
    }
}
