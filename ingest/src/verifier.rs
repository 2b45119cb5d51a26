//! Batch signature verification on a pool of threads, one shard of devices per thread.
//!
//! Invariants:
//! - A device always maps to the same shard, and a shard is one thread reading one FIFO queue,
//!   so a device's readings are checked, guarded and handed to the write-ahead log in the order
//!   they arrived, whatever the batching.
//! - Steps per batch: refuse small-order `R` (the batch equation skips that check), verify the
//!   batch in one multiscalar equation, and only if it fails re-check each signature with
//!   `verify_strict` to find the bad ones; then, in arrival order, the quarantine check and
//!   the replay guard; then one submission of the whole batch to the write-ahead log.
//! - Every job gets exactly one verdict and one durability completion: stored readings and
//!   refusals alike are acknowledged only once the log has them (an exact re-send waits behind
//!   a barrier for the original to be durable).

use std::hash::BuildHasher;
use std::sync::Arc;
use std::thread;

use ed25519_dalek::{Signature, VerifyingKey};
use tokio::sync::{mpsc, oneshot};
use vigil_detect::events::ReadingObservation;
use vigil_detect::{Observation, ObservationSender};
use vigil_proto::contract::READING_CONTEXT;
use vigil_proto::has_weak_r;
use vigil_store::{AcceptedReading, Completion, RecoveredState, Rejection, WalEntry, WalSender};

use crate::guard::{ReplayGuard, SeqCheck};
use crate::metrics::IngestMetrics;
use crate::payload::CheckedPayload;
use crate::reasons::RefusalReason;
use crate::registry::DeviceEntry;
use crate::{Error, Result};

/// Below this many signatures a batch is verified one by one: the batch equation's fixed cost
/// does not pay off.
const MIN_BATCH: usize = 4;

/// The verifier's verdict on one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Stored,
    Resent,
    Refused(RefusalReason),
}

/// One reading waiting for verification.
#[derive(Debug)]
pub struct VerifyJob {
    pub device: Arc<DeviceEntry>,
    pub payload: CheckedPayload,
    pub received_at_ms: i64,
    pub peer: Arc<str>,
    pub verdict: oneshot::Sender<Verdict>,
    pub durable: Completion,
}

/// Settings of the verifier pool.
#[derive(Debug, Clone)]
pub struct VerifierSettings {
    pub threads: usize,
    pub max_batch: usize,
    pub queue_capacity: usize,
    pub max_seq_jump: u64,
}

/// Handle to the verifier threads; cloning it is cheap.
#[derive(Debug, Clone)]
pub struct VerifierPool {
    shards: Arc<[mpsc::Sender<VerifyJob>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl VerifierPool {
    /// Starts the threads, each with the replay-guard state of its devices.
    pub fn start(
        settings: &VerifierSettings,
        recovered: RecoveredState,
        wal: WalSender,
        metrics: Arc<IngestMetrics>,
        observations: ObservationSender,
    ) -> Result<Self> {
        let threads = settings.threads.max(1);
        let hasher = std::collections::hash_map::RandomState::new();

        let mut guards: Vec<ReplayGuard> = (0..threads)
            .map(|_| {
                let guard = ReplayGuard::new(settings.max_seq_jump);
                if recovered.partial {
                    guard.with_unknown_baseline()
                } else {
                    guard
                }
            })
            .collect();
        for (device_id, state) in recovered.devices {
            let shard = shard_of(&hasher, &device_id, threads);
            guards[shard].restore(Arc::from(device_id.as_str()), state);
        }

        let mut shards = Vec::with_capacity(threads);
        for (index, guard) in guards.into_iter().enumerate() {
            let (sender, receiver) = mpsc::channel(settings.queue_capacity.max(1));
            let worker = ShardWorker {
                receiver,
                guard,
                wal: wal.clone(),
                metrics: metrics.clone(),
                observations: observations.clone(),
                max_batch: settings.max_batch.max(1),
                seen_failed_groups: wal.failed_groups(),
            };
            thread::Builder::new()
                .name(format!("vigil-verify-{index}"))
                .spawn(move || worker.run())
                .map_err(|source| Error::Thread {
                    name: "verifier",
                    source,
                })?;
            shards.push(sender);
        }

        Ok(Self {
            shards: shards.into(),
            hasher,
        })
    }

    /// Queues a reading on its device's shard; waits while the shard's queue is full.
    pub async fn submit(&self, job: VerifyJob) -> std::result::Result<(), VerifyJob> {
        let shard = shard_of(&self.hasher, &job.device.id, self.shards.len());
        self.shards[shard].send(job).await.map_err(|error| error.0)
    }

    /// Readings waiting in all shard queues.
    pub fn queue_depth(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.max_capacity() - shard.capacity())
            .sum()
    }
}

fn shard_of(hasher: &impl BuildHasher, device_id: &str, shards: usize) -> usize {
    (hasher.hash_one(device_id) % shards as u64) as usize
}

struct ShardWorker {
    receiver: mpsc::Receiver<VerifyJob>,
    guard: ReplayGuard,
    wal: WalSender,
    metrics: Arc<IngestMetrics>,
    observations: ObservationSender,
    max_batch: usize,
    /// Failed group commits already accounted for in `guard`.
    seen_failed_groups: u64,
}

impl ShardWorker {
    fn run(mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut scratch = SignatureScratch::default();

        while let Some(first) = self.receiver.blocking_recv() {
            batch.push(first);
            while batch.len() < self.max_batch {
                match self.receiver.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.metrics.verify_batch_size.observe(batch.len() as f64);
            self.metrics
                .verifier_queue_depth
                .set(self.receiver.len() as i64);

            let valid = scratch.verify(&batch);
            self.resync_after_failures();
            self.decide_and_store(&mut batch, &valid);
        }
        tracing::debug!("verifier thread stops: its queue closed");
    }

    /// After a failed group commit, the guard counts as stored readings that never became
    /// durable; their re-sends would be taken for replays. Once everything submitted so far
    /// is handled, the guard is reset to the durable state.
    fn resync_after_failures(&mut self) {
        let failed = self.wal.failed_groups();
        if failed == self.seen_failed_groups {
            return;
        }
        let (done, handled) = oneshot::channel();
        if self
            .wal
            .submit_batch(vec![(WalEntry::Barrier, Some(done))])
            .is_err()
        {
            return;
        }
        // The barrier's result does not matter, only that everything before it was handled.
        let _ = handled.blocking_recv();
        self.guard
            .resync(|device_id| self.wal.durable_state(device_id));
        self.seen_failed_groups = failed;
        tracing::info!(
            failed_groups = failed,
            "replay guard reset to the durable readings after a failed log write"
        );
    }

    /// In arrival order: quarantine, signature, replay guard; then one log submission.
    fn decide_and_store(&mut self, batch: &mut Vec<VerifyJob>, valid: &[bool]) {
        let mut entries = Vec::with_capacity(batch.len());

        for (job, &signature_ok) in batch.drain(..).zip(valid) {
            // The highest stored seq a replay was measured against, for its record.
            let mut replayed_above = None;
            let verdict = if job.device.is_quarantined() {
                Verdict::Refused(RefusalReason::Quarantined)
            } else if !signature_ok {
                Verdict::Refused(RefusalReason::BadSignature)
            } else {
                let digest = job.payload.signature_digest();
                match self.guard.check(&job.device.id, job.payload.seq, digest) {
                    SeqCheck::New { gap } => {
                        self.metrics.seq_gaps.inc_by(gap);
                        Verdict::Stored
                    }
                    SeqCheck::Resend => Verdict::Resent,
                    SeqCheck::Replay { highest_seq } => {
                        replayed_above = Some(highest_seq);
                        Verdict::Refused(RefusalReason::Replay)
                    }
                    SeqCheck::JumpTooFar => Verdict::Refused(RefusalReason::SeqJumpTooFar),
                }
            };

            let entry = match verdict {
                Verdict::Stored => {
                    self.metrics.readings_accepted.inc();
                    let reading = accepted_reading(&job);
                    self.observations
                        .send(Observation::Reading(ReadingObservation {
                            device_id: reading.device_id.clone(),
                            class: job.device.class.clone(),
                            seq: reading.seq,
                            sampled_at_ms: reading.sampled_at_ms,
                            received_at_ms: reading.received_at_ms,
                            measurements: Arc::from(reading.measurements.as_slice()),
                        }));
                    WalEntry::Reading(reading)
                }
                Verdict::Resent => {
                    self.metrics.readings_resent.inc();
                    WalEntry::Resend {
                        device_id: job.device.id.clone(),
                        seq: job.payload.seq,
                        signature_digest: job.payload.signature_digest(),
                    }
                }
                Verdict::Refused(reason) => {
                    self.metrics.refused(reason);
                    self.observations
                        .security(&job.device.id, reason.event_kind(), &job.peer);
                    WalEntry::Rejection(refusal_record(&job, reason, replayed_above))
                }
            };
            entries.push((entry, Some(job.durable)));
            // The device may have gone; its verdict then has no reader, which is fine.
            let _ = job.verdict.send(verdict);
        }

        if let Err(error) = self.wal.submit_batch(entries) {
            // The completions were dropped with the batch: their devices see a storage
            // failure and will re-send after reconnecting.
            tracing::error!(%error, "write-ahead log refused a batch");
        }
    }
}

fn accepted_reading(job: &VerifyJob) -> AcceptedReading {
    AcceptedReading {
        device_id: job.device.id.clone(),
        seq: job.payload.seq,
        sampled_at_ms: job.payload.sampled_at_ms,
        received_at_ms: job.received_at_ms,
        measurements: job.payload.measurements.clone(),
        signature_digest: job.payload.signature_digest(),
    }
}

/// The record of a refused reading; a replay names the highest stored seq it fell under.
fn refusal_record(job: &VerifyJob, reason: RefusalReason, highest_seq: Option<u64>) -> Rejection {
    let detail = match highest_seq {
        Some(highest) => format!("seq {}, highest stored {highest}", job.payload.seq),
        None => format!("seq {}", job.payload.seq),
    };
    Rejection {
        device_id: job.device.id.to_string(),
        received_at_ms: job.received_at_ms,
        reason: reason.as_str().to_owned(),
        detail,
        peer: job.peer.to_string(),
    }
}

/// Buffers reused from batch to batch, so verification allocates nothing per reading.
#[derive(Default)]
struct SignatureScratch {
    messages: Vec<u8>,
    bounds: Vec<(usize, usize)>,
    signatures: Vec<Signature>,
    keys: Vec<VerifyingKey>,
    positions: Vec<usize>,
}

impl SignatureScratch {
    /// Returns, per job, whether its signature is valid.
    fn verify(&mut self, batch: &[VerifyJob]) -> Vec<bool> {
        let mut valid = vec![false; batch.len()];
        self.messages.clear();
        self.bounds.clear();
        self.signatures.clear();
        self.keys.clear();
        self.positions.clear();

        for (position, job) in batch.iter().enumerate() {
            if has_weak_r(&job.payload.signature) {
                continue;
            }
            let start = self.messages.len();
            self.messages.extend_from_slice(READING_CONTEXT);
            self.messages.extend_from_slice(&job.payload.reading_bytes);
            self.bounds.push((start, self.messages.len()));
            self.signatures
                .push(Signature::from_bytes(&job.payload.signature));
            self.keys.push(job.device.key);
            self.positions.push(position);
        }

        let messages: Vec<&[u8]> = self
            .bounds
            .iter()
            .map(|&(start, end)| &self.messages[start..end])
            .collect();
        let batch_ok = messages.len() >= MIN_BATCH
            && ed25519_dalek::verify_batch(&messages, &self.signatures, &self.keys).is_ok();

        for (index, &position) in self.positions.iter().enumerate() {
            valid[position] = batch_ok
                || self.keys[index]
                    .verify_strict(messages[index], &self.signatures[index])
                    .is_ok();
        }
        valid
    }
}
