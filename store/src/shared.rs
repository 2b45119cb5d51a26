//! Pieces for a store whose parts run in other processes (a cluster): a [`WalSender`] whose
//! entries are made durable by someone else (a gateway publishing to Kafka), and the tables
//! directory that store workers write Parquet files into and that every node's SQL reads.
//!
//! # Invariants
//!
//! - An [`ExternalLog`] owner makes each entry durable in submission order, then records it
//!   with [`ExternalLog::record_durable`] before firing its completion, so the replay-guard
//!   state describes exactly the durable readings, as with the local WAL writer.
//! - A file in the shared tables directory appears under its final name only once it is
//!   complete and fsynced (temporary name, fsync, rename, fsync of the directory): a reader
//!   listing `*.parquet` never sees half a file.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::array::RecordBatch;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::Mutex;

use crate::error::Result;
use crate::guard::GuardState;
use crate::writer::Command;
use crate::{Completion, WalEntry, WalSender};

/// The receiving end of a [`WalSender`] whose entries another system makes durable.
pub struct ExternalLog {
    commands: Receiver<Command>,
    guard: Arc<Mutex<GuardState>>,
    failed_groups: Arc<AtomicU64>,
}

impl std::fmt::Debug for ExternalLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalLog")
            .field("queued", &self.commands.len())
            .finish()
    }
}

/// A bounded submission queue of `capacity` entries: the sender for the verifier, the
/// receiver for whatever makes the entries durable.
pub fn external_log(capacity: usize) -> (WalSender, ExternalLog) {
    let (commands, received) = crossbeam_channel::bounded(capacity.max(1));
    let guard = Arc::new(Mutex::new(GuardState::default()));
    let failed_groups = Arc::new(AtomicU64::new(0));
    let sender = WalSender {
        commands,
        guard: guard.clone(),
        failed_groups: failed_groups.clone(),
    };
    let log = ExternalLog {
        commands: received,
        guard,
        failed_groups,
    };
    (sender, log)
}

/// What [`ExternalLog::recv_timeout`] hands out.
#[derive(Debug)]
pub enum LogEntry {
    /// An entry to make durable, with its completion.
    Entry(WalEntry, Option<Completion>),
    /// Nothing arrived within the wait.
    Idle,
    /// Every sender is gone.
    Closed,
}

impl ExternalLog {
    /// The next submitted entry, waiting up to `timeout`.
    pub fn recv_timeout(&self, timeout: std::time::Duration) -> LogEntry {
        loop {
            match self.commands.recv_timeout(timeout) {
                Ok(Command::Entry(entry, completion)) => return LogEntry::Entry(entry, completion),
                // Rolls and shutdowns belong to the local WAL writer; nobody sends them here,
                // but a shutdown request still deserves its answer.
                Ok(Command::Shutdown(reply)) => {
                    let _ = reply.send(());
                }
                Ok(Command::Roll(reply)) => {
                    let _ = reply.send(Ok(0));
                }
                Err(RecvTimeoutError::Timeout) => return LogEntry::Idle,
                Err(RecvTimeoutError::Disconnected) => return LogEntry::Closed,
            }
        }
    }

    /// Entries waiting in the queue.
    pub fn queued(&self) -> usize {
        self.commands.len()
    }

    /// Records a reading made durable (before its completion fires).
    pub fn record_durable(&self, device_id: &str, seq: u64, signature_digest: [u8; 16]) {
        self.guard.lock().apply(device_id, seq, signature_digest);
    }

    /// Whether a reading with this seq and digest is known durable (an exact re-send's check).
    pub fn holds(&self, device_id: &str, seq: u64, signature_digest: [u8; 16]) -> bool {
        self.guard
            .lock()
            .devices
            .get(device_id)
            .is_some_and(|state| state.recent.contains(&(seq, signature_digest)))
    }

    /// Records that entries failed to become durable (raised before their completions fire,
    /// so the verifier re-reads the durable state).
    pub fn record_failure(&self) {
        self.failed_groups.fetch_add(1, Ordering::AcqRel);
    }
}

/// Writes `batch` to `dir/name` atomically and durably (see the module's invariants);
/// returns the file's size in bytes.
pub fn write_parquet_file(dir: &Path, name: &str, batch: &RecordBatch) -> Result<u64> {
    crate::flush::write_parquet(dir, name, batch).map(|file| file.size)
}
