//! Write-ahead log: segment files, record format, replay.
//!
//! # Files
//!
//! Segments live in `<data_dir>/wal/` and are named `<16-digit number>.wal`, numbers rising.
//! A segment is only ever appended to by the process that created it: on start the writer
//! opens a new segment numbered above every existing one (and above the last flushed segment
//! recorded in the replay-guard snapshot), so an old tail is never written again.
//!
//! # Records
//!
//! The byte format of one record and its decoder live in the `vigil-wal-record` crate (small,
//! so that it can be fuzzed without the SQL engine); a segment is records back to back.
//!
//! # Invariants
//!
//! - A group of records is written with one `write` and made durable with one `sync_data`;
//!   nothing in a group is acknowledged before that `sync_data` returns.
//! - Only the last segment can end in a torn group (a crash during its write). Replay truncates
//!   the last segment at its first bad record, logging file and offset; the bytes cut away were
//!   never acknowledged. A bad record in any other segment is an error naming file and offset:
//!   replay never skips records silently. Known limit: bit rot inside the last segment is
//!   indistinguishable from a torn write and truncates acknowledged records after it.
//! - Segments are deleted only after every record in them is in committed Parquet files and
//!   the replay-guard snapshot covers them (see `flush`).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub use vigil_wal_record::encode_entry;
use vigil_wal_record::parse_record;

use crate::WalEntry;
use crate::error::{Result, StoreError};

/// Path of segment `number` in `wal_dir`.
pub(crate) fn segment_path(wal_dir: &Path, number: u64) -> PathBuf {
    wal_dir.join(format!("{number:016}.wal"))
}

/// Numbers of the segments in `wal_dir`, ascending. Files with other names are ignored.
pub(crate) fn list_segments(wal_dir: &Path) -> Result<Vec<u64>> {
    let read_dir = std::fs::read_dir(wal_dir).map_err(StoreError::io("list WAL dir", wal_dir))?;
    let mut numbers = Vec::new();
    for dir_entry in read_dir {
        let dir_entry = dir_entry.map_err(StoreError::io("list WAL dir", wal_dir))?;
        let name = dir_entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".wal") else {
            continue;
        };
        if stem.len() == 16
            && let Ok(number) = stem.parse::<u64>()
        {
            numbers.push(number);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// Fsyncs a directory so that a create, rename or delete inside it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("fsync directory", dir))
}

/// What replay found.
#[derive(Debug, Default)]
pub(crate) struct ReplaySummary {
    /// Segment numbers present, ascending.
    pub(crate) segments: Vec<u64>,
    /// Records decoded.
    pub(crate) records: u64,
}

/// Reads every segment in order and hands each record to `visit(segment_number, entry)`.
///
/// A bad record at the tail of the last segment is truncated away (and logged); anywhere
/// else it is a [`StoreError::WalCorrupt`].
pub(crate) fn replay(
    wal_dir: &Path,
    mut visit: impl FnMut(u64, WalEntry),
) -> Result<ReplaySummary> {
    let segments = list_segments(wal_dir)?;
    let mut records = 0u64;

    for (index, &number) in segments.iter().enumerate() {
        let path = segment_path(wal_dir, number);
        let bytes = std::fs::read(&path).map_err(StoreError::io("read WAL segment", &path))?;
        let is_last = index + 1 == segments.len();

        let mut offset = 0usize;
        while offset < bytes.len() {
            match parse_record(&bytes[offset..]) {
                Ok((entry, used)) => {
                    visit(number, entry);
                    records += 1;
                    offset += used;
                }
                Err(reason) if is_last => {
                    tracing::warn!(
                        path = %path.display(),
                        offset,
                        discarded_bytes = bytes.len() - offset,
                        %reason,
                        "truncating torn tail of the last WAL segment"
                    );
                    truncate_segment(&path, offset as u64)?;
                    break;
                }
                Err(reason) => {
                    return Err(StoreError::WalCorrupt {
                        path,
                        offset: offset as u64,
                        reason,
                    });
                }
            }
        }
    }

    Ok(ReplaySummary { segments, records })
}

fn truncate_segment(path: &Path, length: u64) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(StoreError::io("open WAL segment to truncate", path))?;
    file.set_len(length)
        .and_then(|()| file.sync_all())
        .map_err(StoreError::io("truncate WAL segment", path))
}

/// The segment being appended to. Owned by the writer thread only.
#[derive(Debug)]
pub struct SegmentWriter {
    wal_dir: PathBuf,
    number: u64,
    path: PathBuf,
    file: File,
    size: u64,
}

impl SegmentWriter {
    /// Creates segment `number` (which must not exist) and makes its directory entry durable.
    pub fn create(wal_dir: &Path, number: u64) -> Result<Self> {
        let path = segment_path(wal_dir, number);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(StoreError::io("create WAL segment", &path))?;
        sync_dir(wal_dir)?;
        Ok(Self {
            wal_dir: wal_dir.to_path_buf(),
            number,
            path,
            file,
            size: 0,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Writes `bytes` with one write and makes them durable with one `sync_data`.
    ///
    /// On failure the segment is cut back to its previous length (best effort), so that a
    /// later group never follows a partial one.
    pub fn append_durably(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let result = self
            .file
            .write_all(bytes)
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.size += bytes.len() as u64;
                Ok(())
            }
            Err(error) => {
                let restored = self
                    .file
                    .set_len(self.size)
                    .and_then(|()| self.file.seek(SeekFrom::Start(self.size)).map(|_| ()))
                    .and_then(|()| self.file.sync_data());
                if let Err(restore_error) = restored {
                    tracing::error!(
                        path = %self.path.display(),
                        offset = self.size,
                        error = %restore_error,
                        "could not cut a failed WAL group back; replay will report this offset"
                    );
                }
                Err(error)
            }
        }
    }

    /// Closes this segment and opens the next one; returns the new segment's number.
    pub(crate) fn roll(&mut self) -> Result<u64> {
        let next = SegmentWriter::create(&self.wal_dir, self.number + 1)?;
        *self = next;
        Ok(self.number)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{AcceptedReading, Rejection};

    fn reading(seq: u64) -> WalEntry {
        WalEntry::Reading(AcceptedReading {
            device_id: Arc::from("pump-7"),
            seq,
            sampled_at_ms: 1_700_000_000_000 + seq as i64,
            received_at_ms: 1_700_000_000_500 + seq as i64,
            measurements: vec![
                ("heart_rate_bpm".to_owned(), 71.5),
                ("spo2_pct".to_owned(), 98.0),
            ],
            signature_digest: [seq as u8; 16],
        })
    }

    fn rejection() -> WalEntry {
        WalEntry::Rejection(Rejection {
            device_id: "évil\u{0}id".to_owned(),
            received_at_ms: -5,
            reason: "bad_signature".to_owned(),
            detail: "ünïcode ✓".to_owned(),
            peer: "10.0.0.1:5555".to_owned(),
        })
    }

    fn write_segment(dir: &Path, number: u64, entries: &[WalEntry]) -> PathBuf {
        let mut writer = SegmentWriter::create(dir, number).expect("create");
        let mut buf = Vec::new();
        for entry in entries {
            encode_entry(&mut buf, entry);
        }
        writer.append_durably(&buf).expect("append");
        writer.path().to_path_buf()
    }

    fn replay_all(dir: &Path) -> Result<Vec<(u64, WalEntry)>> {
        let mut out = Vec::new();
        replay(dir, |segment, entry| out.push((segment, entry)))?;
        Ok(out)
    }

    #[test]
    fn round_trip_over_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_segment(dir.path(), 1, &[reading(1), rejection()]);
        write_segment(dir.path(), 2, &[reading(2), WalEntry::Barrier, reading(3)]);

        let replayed = replay_all(dir.path()).expect("replay");
        let expected = vec![
            (1, reading(1)),
            (1, rejection()),
            (2, reading(2)),
            (2, reading(3)),
        ];
        assert_eq!(replayed, expected);
    }

    #[test]
    fn torn_tail_of_last_segment_is_truncated() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_segment(dir.path(), 1, &[reading(1)]);
        let last = write_segment(dir.path(), 2, &[reading(2), reading(3), reading(4)]);

        // Cut the last record in half, then append garbage as a crash might leave.
        let full = std::fs::metadata(&last).expect("meta").len();
        let file = OpenOptions::new().append(true).open(&last).expect("open");
        file.set_len(full - 10).expect("truncate");
        (&file).write_all(&[0xAB; 37]).expect("garbage");
        drop(file);

        let replayed = replay_all(dir.path()).expect("replay");
        let seqs: Vec<u64> = replayed
            .iter()
            .filter_map(|(_, e)| match e {
                WalEntry::Reading(r) => Some(r.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);

        // The file now ends at the last complete record: a second replay sees no damage.
        let again = replay_all(dir.path()).expect("replay again");
        assert_eq!(again.len(), 3);
    }

    #[test]
    fn corruption_before_the_last_segment_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = write_segment(dir.path(), 1, &[reading(1), reading(2)]);
        write_segment(dir.path(), 2, &[reading(3)]);

        let mut bytes = std::fs::read(&first).expect("read");
        let flip = bytes.len() - 3;
        bytes[flip] ^= 0xFF;
        std::fs::write(&first, &bytes).expect("write");

        let error = replay_all(dir.path()).expect_err("must fail");
        match error {
            StoreError::WalCorrupt {
                path,
                offset,
                reason,
            } => {
                assert_eq!(path, first);
                assert!(offset > 0, "first record is intact, offset {offset}");
                assert!(reason.contains("crc"), "{reason}");
            }
            other => panic!("unexpected error {other}"),
        }
    }
}
