//! Durable replay-guard state: per device, the highest stored seq and the recent digests.
//!
//! # Invariants
//!
//! - The writer thread updates [`GuardState`] after a group's `sync_data` and before its
//!   completions fire, so the live state always describes exactly the durable readings.
//! - `guard.snapshot` is written atomically (temporary file, fsync, rename, fsync of the
//!   directory) before any WAL segment is deleted, and describes at least every record in
//!   the deleted segments. It is also the commit point of a Parquet flush: it records the
//!   first WAL segment not yet in Parquet (`flushed_before_segment`) and the flush numbers
//!   whose Parquet files must be ignored because that flush failed half-way.
//! - Restart rebuilds the state as snapshot + every remaining WAL record. Applying a reading
//!   twice changes nothing (max of seq, digests de-duplicated), so the overlap between the
//!   snapshot and the remaining segments is harmless.
//!
//! # Snapshot format
//!
//! ```text
//! magic "VGSNAP01" flushed_before_segment:u64 aborted_count:u32 aborted:u64*
//! device_count:u32 (id_len:u16 id highest_seq:u64 recent_count:u16 (seq:u64 digest:[u8;16])*)*
//! crc32 of everything before it: u32
//! ```
//! All integers little-endian.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError};
use crate::wal::sync_dir;
use crate::{RECENT_DIGESTS, SeqState};

const MAGIC: &[u8; 8] = b"VGSNAP01";
/// Name of the snapshot file in the data directory.
pub(crate) const SNAPSHOT_FILE: &str = "guard.snapshot";

/// Replay-guard state of every device with a stored reading.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct GuardState {
    pub(crate) devices: HashMap<String, SeqState>,
}

impl GuardState {
    /// Records a stored reading. Idempotent, and independent of the order readings are
    /// applied in: `recent` keeps the digests of the highest seqs, in seq order. (A restart
    /// applies the snapshot first and then older log records; those must not push the newest
    /// digests out, or an exact re-send of a recent reading would look like a replay.)
    pub(crate) fn apply(&mut self, device_id: &str, seq: u64, digest: [u8; 16]) {
        let state = match self.devices.get_mut(device_id) {
            Some(state) => state,
            None => self.devices.entry(device_id.to_owned()).or_default(),
        };
        state.highest_seq = state.highest_seq.max(seq);

        if state.recent.contains(&(seq, digest)) {
            return;
        }
        let full = state.recent.len() >= RECENT_DIGESTS;
        if full
            && state
                .recent
                .front()
                .is_some_and(|&(oldest, _)| seq < oldest)
        {
            return;
        }
        let at = state.recent.partition_point(|&(kept, _)| kept <= seq);
        state.recent.insert(at, (seq, digest));
        while state.recent.len() > RECENT_DIGESTS {
            state.recent.pop_front();
        }
    }
}

/// Contents of `guard.snapshot`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Snapshot {
    /// Every WAL record in a segment numbered below this is in committed Parquet files.
    pub(crate) flushed_before_segment: u64,
    /// Flush numbers whose Parquet files are not committed (the flush failed half-way).
    pub(crate) aborted_flushes: BTreeSet<u64>,
    pub(crate) guard: GuardState,
}

pub(crate) fn snapshot_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SNAPSHOT_FILE)
}

impl Snapshot {
    fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(64 + self.guard.devices.len() * 128);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&self.flushed_before_segment.to_le_bytes());
        buf.extend_from_slice(&(self.aborted_flushes.len() as u32).to_le_bytes());
        for flush in &self.aborted_flushes {
            buf.extend_from_slice(&flush.to_le_bytes());
        }

        // Sorted so that the same state always gives the same bytes.
        let mut devices: Vec<_> = self.guard.devices.iter().collect();
        devices.sort_unstable_by(|a, b| a.0.cmp(b.0));
        buf.extend_from_slice(&(devices.len() as u32).to_le_bytes());
        for (device_id, state) in devices {
            // Device ids are at most 64 characters (device contract); u16 is ample.
            let id = &device_id.as_bytes()[..device_id.len().min(u16::MAX as usize)];
            buf.extend_from_slice(&(id.len() as u16).to_le_bytes());
            buf.extend_from_slice(id);
            buf.extend_from_slice(&state.highest_seq.to_le_bytes());
            buf.extend_from_slice(&(state.recent.len() as u16).to_le_bytes());
            for (seq, digest) in &state.recent {
                buf.extend_from_slice(&seq.to_le_bytes());
                buf.extend_from_slice(digest);
            }
        }

        let crc = crc32fast::hash(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        buf
    }

    fn decode(bytes: &[u8]) -> Result<Snapshot, String> {
        let (body, crc_bytes) = bytes
            .split_last_chunk::<4>()
            .ok_or("file shorter than its checksum")?;
        if crc32fast::hash(body) != u32::from_le_bytes(*crc_bytes) {
            return Err("checksum mismatch".to_owned());
        }
        let mut reader = Reader {
            bytes: body,
            position: 0,
        };
        if reader.take(MAGIC.len())? != MAGIC {
            return Err("not a vigil replay-guard snapshot (bad magic)".to_owned());
        }

        let flushed_before_segment = reader.u64()?;
        let aborted_count = reader.u32()?;
        let mut aborted_flushes = BTreeSet::new();
        for _ in 0..aborted_count {
            aborted_flushes.insert(reader.u64()?);
        }

        let device_count = reader.u32()?;
        let mut guard = GuardState::default();
        for _ in 0..device_count {
            let id_len = reader.u16()? as usize;
            let device_id = std::str::from_utf8(reader.take(id_len)?)
                .map_err(|e| format!("device id is not UTF-8: {e}"))?
                .to_owned();
            let highest_seq = reader.u64()?;
            let recent_count = reader.u16()? as usize;
            let mut recent = VecDeque::with_capacity(recent_count.min(RECENT_DIGESTS));
            for _ in 0..recent_count {
                let seq = reader.u64()?;
                let mut digest = [0u8; 16];
                digest.copy_from_slice(reader.take(16)?);
                recent.push_back((seq, digest));
            }
            guard.devices.insert(
                device_id,
                SeqState {
                    highest_seq,
                    recent,
                },
            );
        }
        if reader.position != body.len() {
            return Err("trailing bytes after the last device".to_owned());
        }
        Ok(Snapshot {
            flushed_before_segment,
            aborted_flushes,
            guard,
        })
    }

    /// Loads the snapshot of `data_dir`; a missing file is an empty snapshot.
    pub(crate) fn load(data_dir: &Path) -> Result<Snapshot> {
        let path = snapshot_path(data_dir);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Snapshot::default()),
            Err(e) => return Err(StoreError::io("read replay-guard snapshot", &path)(e)),
        };
        Snapshot::decode(&bytes).map_err(|reason| StoreError::SnapshotCorrupt { path, reason })
    }

    /// Replaces the snapshot of `data_dir` atomically and durably.
    pub(crate) fn store(&self, data_dir: &Path) -> Result<()> {
        let path = snapshot_path(data_dir);
        let tmp = data_dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        let bytes = self.encode();

        let mut file = std::fs::File::create(&tmp)
            .map_err(StoreError::io("create replay-guard snapshot", &tmp))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(StoreError::io("write replay-guard snapshot", &tmp))?;
        drop(file);

        std::fs::rename(&tmp, &path)
            .map_err(StoreError::io("rename replay-guard snapshot", &path))?;
        sync_dir(data_dir)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], String> {
        let end = self.position + count;
        let slice = self
            .bytes
            .get(self.position..end)
            .ok_or_else(|| format!("cut short at byte {}", self.position))?;
        self.position = end;
        Ok(slice)
    }

    fn u16(&mut self) -> Result<u16, String> {
        let mut b = [0u8; 2];
        b.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(b))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_keeps_max_and_last_digests() {
        let mut guard = GuardState::default();
        for seq in 1..=100u64 {
            guard.apply("d1", seq, [seq as u8; 16]);
        }
        guard.apply("d1", 100, [100; 16]);
        guard.apply("d1", 5, [5; 16]);
        let state = &guard.devices["d1"];
        assert_eq!(state.highest_seq, 100);
        assert_eq!(state.recent.len(), RECENT_DIGESTS);
        // The re-applied 100 did not duplicate; 5, older than every kept digest, evicted none.
        assert_eq!(state.recent.back(), Some(&(100, [100; 16])));
        assert_eq!(state.recent.front(), Some(&(37, [37; 16])));
        assert_eq!(state.recent.iter().filter(|(s, _)| *s == 100).count(), 1);
    }

    #[test]
    fn older_records_applied_after_newer_ones_keep_the_newest_digests() {
        // A restart applies the snapshot (newest state) and then older log records.
        let mut in_order = GuardState::default();
        let mut snapshot_first = GuardState::default();
        for seq in 1..=200u64 {
            in_order.apply("d1", seq, [seq as u8; 16]);
        }
        for seq in (150..=200u64).chain(1..=200) {
            snapshot_first.apply("d1", seq, [seq as u8; 16]);
        }
        assert_eq!(in_order, snapshot_first);
        assert_eq!(
            snapshot_first.devices["d1"].recent.front(),
            Some(&(
                200 - RECENT_DIGESTS as u64 + 1,
                [(200 - RECENT_DIGESTS + 1) as u8; 16]
            ))
        );
    }

    #[test]
    fn snapshot_round_trip_and_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            Snapshot::load(dir.path()).expect("missing is empty"),
            Snapshot::default()
        );

        let mut snapshot = Snapshot {
            flushed_before_segment: 42,
            ..Snapshot::default()
        };
        snapshot.aborted_flushes.insert(7);
        snapshot.guard.apply("a", 3, [1; 16]);
        snapshot.guard.apply("b-ü", 9, [2; 16]);
        snapshot.store(dir.path()).expect("store");
        assert_eq!(Snapshot::load(dir.path()).expect("load"), snapshot);

        let path = snapshot_path(dir.path());
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[12] ^= 1;
        std::fs::write(&path, bytes).expect("write");
        assert!(matches!(
            Snapshot::load(dir.path()),
            Err(StoreError::SnapshotCorrupt { .. })
        ));
    }
}
