//! The WAL writer thread: group commit, then hot tier, then replay-guard state, then
//! completions.
//!
//! # Invariants
//!
//! - Exactly one thread appends to the WAL. It takes every queued entry up to
//!   `wal_max_group_entries`, encodes them into one buffer, writes it with one `write` and
//!   makes it durable with one `sync_data`.
//! - Only after that `sync_data` returns does it, in this order: append the rows to the hot
//!   tier (so a query sees a reading as soon as it is acknowledged), record the readings in
//!   the live replay-guard state, and fire the completions with `Ok`.
//! - Entries are handled in submission order, so a barrier's completion fires after every
//!   entry submitted before it is durable or failed. A re-send's completion is `Ok` only if
//!   the live replay-guard state (the durable readings) holds its seq and digest.
//! - A failed group completes every entry with an error and changes no state but the count of
//!   failed groups, raised before the completions fire; the writer then continues in a fresh
//!   segment.
//! - A roll requested by a flush happens between groups; at that moment every record of the
//!   older segments is in the hot tier, which is sealed under the same catalog lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use parking_lot::{Mutex, RwLock};

use crate::error::{Result, StoreError};
use crate::guard::GuardState;
use crate::metrics::Metrics;
use crate::tables::{Catalog, TableKind, readings_batch, rejections_batch, truncate_rejection};
use crate::wal::{SegmentWriter, encode_entry};
use crate::{Completion, WalEntry};

/// What the writer thread receives.
pub(crate) enum Command {
    Entry(WalEntry, Option<Completion>),
    /// Close the current segment, seal the hot tier, reply with the new segment's number.
    Roll(Sender<Result<u64>>),
    /// Write everything queued, then stop.
    Shutdown(Sender<()>),
}

/// Everything the writer thread owns or shares.
pub(crate) struct Writer {
    pub(crate) segment: SegmentWriter,
    pub(crate) segment_bytes: u64,
    pub(crate) max_group_entries: usize,
    pub(crate) flush_max_rows: usize,
    pub(crate) commands: Receiver<Command>,
    pub(crate) catalog: Arc<RwLock<Catalog>>,
    pub(crate) guard: Arc<Mutex<GuardState>>,
    pub(crate) metrics: Metrics,
    /// Wakes the flusher when the hot tier is full.
    pub(crate) flush_nudge: Sender<()>,
    pub(crate) failed_groups: Arc<AtomicU64>,
}

impl Writer {
    /// Runs until a shutdown command or until every sender is gone.
    pub(crate) fn run(mut self) {
        tracing::info!(segment = %self.segment.path().display(), "wal writer started");
        let mut group: Vec<(WalEntry, Option<Completion>)> = Vec::new();
        let mut buffer: Vec<u8> = Vec::new();

        loop {
            let Ok(first) = self.commands.recv() else {
                break;
            };
            let mut control = None;
            match first {
                Command::Entry(entry, completion) => group.push((entry, completion)),
                other => control = Some(other),
            }
            while control.is_none() && group.len() < self.max_group_entries {
                match self.commands.try_recv() {
                    Ok(Command::Entry(entry, completion)) => group.push((entry, completion)),
                    Ok(other) => control = Some(other),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            if !group.is_empty() {
                self.commit_group(&mut group, &mut buffer);
            }

            match control {
                None => {}
                Some(Command::Entry(..)) => {}
                Some(Command::Roll(reply)) => {
                    let result = self.roll_for_flush();
                    // The flush may have given up waiting; nothing to do then.
                    let _ = reply.send(result);
                }
                Some(Command::Shutdown(reply)) => {
                    self.drain(&mut group, &mut buffer);
                    let _ = reply.send(());
                    break;
                }
            }
        }
        tracing::info!(segment = %self.segment.path().display(), "wal writer stopped");
    }

    /// Commits whatever is still queued (used at shutdown).
    fn drain(&mut self, group: &mut Vec<(WalEntry, Option<Completion>)>, buffer: &mut Vec<u8>) {
        loop {
            while group.len() < self.max_group_entries {
                match self.commands.try_recv() {
                    Ok(Command::Entry(entry, completion)) => group.push((entry, completion)),
                    Ok(Command::Roll(reply)) => {
                        let _ = reply.send(Err(StoreError::Shutdown));
                    }
                    Ok(Command::Shutdown(reply)) => {
                        let _ = reply.send(());
                    }
                    Err(_) => break,
                }
            }
            if group.is_empty() {
                return;
            }
            self.commit_group(group, buffer);
        }
    }

    fn roll_for_flush(&mut self) -> Result<u64> {
        let number = self.segment.roll()?;
        let mut catalog = self.catalog.write();
        catalog.seal();
        Ok(number)
    }

    fn commit_group(
        &mut self,
        group: &mut Vec<(WalEntry, Option<Completion>)>,
        buffer: &mut Vec<u8>,
    ) {
        // Untrusted text is cut before it reaches the log, so replay stores the same rows.
        buffer.clear();
        for (entry, _) in group.iter_mut() {
            if let WalEntry::Rejection(rejection) = entry {
                truncate_rejection(rejection);
            }
            encode_entry(buffer, entry);
        }

        let written = if buffer.is_empty() {
            Ok(())
        } else {
            let started = Instant::now();
            let result = self.segment.append_durably(buffer);
            self.metrics
                .wal_fsync_seconds
                .observe(started.elapsed().as_secs_f64());
            result
        };
        self.metrics.wal_group_entries.observe(group.len() as f64);

        match written {
            Ok(()) => {
                self.apply_durable(group);
                for (entry, completion) in group.drain(..) {
                    if let Some(completion) = completion {
                        let result = match entry {
                            WalEntry::Resend {
                                device_id,
                                seq,
                                signature_digest,
                            } => self.resend_result(&device_id, seq, signature_digest),
                            _ => Ok(()),
                        };
                        // A dropped receiver means the submitter stopped waiting: fine.
                        let _ = completion.send(result);
                    }
                }
                self.roll_if_full();
            }
            Err(error) => {
                self.failed_groups.fetch_add(1, Ordering::Release);
                let path = self.segment.path().to_path_buf();
                tracing::error!(
                    path = %path.display(),
                    entries = group.len(),
                    %error,
                    "wal group commit failed"
                );
                let reason = error.to_string();
                for (_, completion) in group.drain(..) {
                    if let Some(completion) = completion {
                        let failure = StoreError::WalWrite {
                            path: path.clone(),
                            reason: reason.clone(),
                        };
                        let _ = completion.send(Err(failure));
                    }
                }
                // Continue in a fresh file so that no later group follows a damaged tail.
                if let Err(roll_error) = self.segment.roll() {
                    tracing::error!(error = %roll_error, "could not open a new wal segment");
                }
            }
        }
        self.metrics.queue_depth.set(self.commands.len() as i64);
    }

    /// `Ok` if the re-sent reading is durable.
    fn resend_result(&self, device_id: &str, seq: u64, digest: [u8; 16]) -> Result<()> {
        let guard = self.guard.lock();
        let durable = guard
            .devices
            .get(device_id)
            .is_some_and(|state| state.recent.contains(&(seq, digest)));
        if durable {
            Ok(())
        } else {
            Err(StoreError::ResentNotDurable { seq })
        }
    }

    /// Hot tier, then replay-guard state, for a group that is durable.
    fn apply_durable(&mut self, group: &[(WalEntry, Option<Completion>)]) {
        let readings = group.iter().filter_map(|(entry, _)| match entry {
            WalEntry::Reading(reading) => Some(reading),
            _ => None,
        });
        let rejections = group.iter().filter_map(|(entry, _)| match entry {
            WalEntry::Rejection(rejection) => Some(rejection),
            _ => None,
        });
        let reading_count = readings.clone().count();
        let rejection_count = rejections.clone().count();

        let batches = readings_batch(readings.clone())
            .and_then(|r| rejections_batch(rejections).map(|j| (r, j)));
        match batches {
            Ok((readings_rows, rejection_rows)) => {
                let mut catalog = self.catalog.write();
                let appended = catalog
                    .append(TableKind::Readings, readings_rows)
                    .and_then(|()| catalog.append(TableKind::Rejections, rejection_rows));
                if let Err(error) = appended {
                    tracing::error!(%error, "could not add durable rows to the hot tier");
                }
                self.metrics.hot_rows.set(catalog.hot_rows() as i64);
                if catalog.active_rows() >= self.flush_max_rows {
                    // Full means a nudge is already pending.
                    let _ = self.flush_nudge.try_send(());
                }
            }
            Err(error) => {
                // Durable in the WAL all the same: a restart brings the rows back.
                tracing::error!(%error, "could not build hot-tier batches for a durable group");
            }
        }

        let mut guard = self.guard.lock();
        for reading in readings {
            guard.apply(&reading.device_id, reading.seq, reading.signature_digest);
        }
        drop(guard);

        self.metrics.readings_stored.inc_by(reading_count as u64);
        self.metrics
            .rejections_stored
            .inc_by(rejection_count as u64);
    }

    fn roll_if_full(&mut self) {
        if self.segment.size() < self.segment_bytes {
            return;
        }
        if let Err(error) = self.segment.roll() {
            // Keep appending to the current segment; it only grows past its target size.
            tracing::error!(%error, "could not roll to a new wal segment");
        }
    }
}
