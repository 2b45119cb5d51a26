//! Write-ahead log: segment files, record format, replay.
//!
//! # Files
//!
//! Segments live in `<data_dir>/wal/` and are named `<16-digit number>.wal`, numbers rising.
//! A segment is only ever appended to by the process that created it: on start the writer
//! opens a new segment numbered above every existing one (and above the last flushed segment
//! recorded in the replay-guard snapshot), so an old tail is never written again.
//!
//! # Record format
//!
//! ```text
//! [len u32 LE][crc32 u32 LE][kind u8][payload ...]
//!  len   = byte count of kind + payload
//!  crc32 = CRC-32 (IEEE) of kind + payload
//!  kind  = 1 reading, 2 rejection
//! ```
//!
//! Payloads are hand-encoded; `varint` is unsigned LEB128, `str` is a varint byte length
//! followed by UTF-8 bytes, fixed-width numbers are little-endian:
//!
//! ```text
//! reading   = device_id:str seq:u64 sampled_at_ms:i64 received_at_ms:i64 digest:[u8;16]
//!             count:varint (metric:str value:f64-bits)*count
//! rejection = device_id:str received_at_ms:i64 reason:str detail:str peer:str
//! ```
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
use std::sync::Arc;

use crate::error::{Result, StoreError};
use crate::{AcceptedReading, Rejection, WalEntry};

/// Record kind of an accepted reading.
pub(crate) const KIND_READING: u8 = 1;
/// Record kind of a rejection.
pub(crate) const KIND_REJECTION: u8 = 2;
/// Bytes before the kind byte: len and crc.
const HEADER_BYTES: usize = 8;
/// Largest record replay accepts; anything longer is treated as a corrupt length field.
const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

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

/// Appends one encoded record for `entry` to `buf`. A barrier encodes nothing.
pub fn encode_entry(buf: &mut Vec<u8>, entry: &WalEntry) {
    match entry {
        WalEntry::Reading(reading) => {
            encode_record(buf, KIND_READING, |b| encode_reading(b, reading))
        }
        WalEntry::Rejection(rejection) => {
            encode_record(buf, KIND_REJECTION, |b| encode_rejection(b, rejection))
        }
        WalEntry::Barrier => {}
    }
}

fn encode_record(buf: &mut Vec<u8>, kind: u8, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; HEADER_BYTES]);
    buf.push(kind);
    payload(buf);

    let body = &buf[start + HEADER_BYTES..];
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn encode_reading(buf: &mut Vec<u8>, reading: &AcceptedReading) {
    put_str(buf, &reading.device_id);
    buf.extend_from_slice(&reading.seq.to_le_bytes());
    buf.extend_from_slice(&reading.sampled_at_ms.to_le_bytes());
    buf.extend_from_slice(&reading.received_at_ms.to_le_bytes());
    buf.extend_from_slice(&reading.signature_digest);
    put_varint(buf, reading.measurements.len() as u64);
    for (metric, value) in &reading.measurements {
        put_str(buf, metric);
        buf.extend_from_slice(&value.to_bits().to_le_bytes());
    }
}

fn encode_rejection(buf: &mut Vec<u8>, rejection: &Rejection) {
    put_str(buf, &rejection.device_id);
    buf.extend_from_slice(&rejection.received_at_ms.to_le_bytes());
    put_str(buf, &rejection.reason);
    put_str(buf, &rejection.detail);
    put_str(buf, &rejection.peer);
}

fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_varint(buf, s.len() as u64);
    buf.extend_from_slice(s.as_bytes());
}

/// Reads the fields of one payload; every failure is a short description for the error.
struct Decoder<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Decoder<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], String> {
        let end = self
            .position
            .checked_add(count)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| format!("field of {count} bytes runs past the record"))?;
        let slice = &self.bytes[self.position..end];
        self.position = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".to_owned())
    }

    fn str(&mut self) -> Result<&'a str, String> {
        let len = usize::try_from(self.varint()?).map_err(|e| e.to_string())?;
        std::str::from_utf8(self.take(len)?).map_err(|e| format!("string is not UTF-8: {e}"))
    }

    fn finish(&self) -> Result<(), String> {
        if self.position == self.bytes.len() {
            Ok(())
        } else {
            Err(format!(
                "{} trailing bytes",
                self.bytes.len() - self.position
            ))
        }
    }
}

/// Decodes a record body (kind + payload) whose crc has been checked.
fn decode_body(body: &[u8]) -> Result<WalEntry, String> {
    let (&kind, payload) = body.split_first().ok_or("empty record")?;
    let mut decoder = Decoder {
        bytes: payload,
        position: 0,
    };
    let entry = match kind {
        KIND_READING => {
            let device_id: Arc<str> = Arc::from(decoder.str()?);
            let seq = decoder.u64()?;
            let sampled_at_ms = decoder.i64()?;
            let received_at_ms = decoder.i64()?;
            let signature_digest = decoder.array::<16>()?;
            let count = decoder.varint()?;
            // Each measurement takes at least 9 bytes: bound the allocation by the record.
            if count > (payload.len() / 9) as u64 {
                return Err(format!("measurement count {count} exceeds the record"));
            }
            let mut measurements = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let metric = decoder.str()?.to_owned();
                let value = f64::from_bits(decoder.u64()?);
                measurements.push((metric, value));
            }
            WalEntry::Reading(AcceptedReading {
                device_id,
                seq,
                sampled_at_ms,
                received_at_ms,
                measurements,
                signature_digest,
            })
        }
        KIND_REJECTION => WalEntry::Rejection(Rejection {
            device_id: decoder.str()?.to_owned(),
            received_at_ms: decoder.i64()?,
            reason: decoder.str()?.to_owned(),
            detail: decoder.str()?.to_owned(),
            peer: decoder.str()?.to_owned(),
        }),
        other => return Err(format!("unknown record kind {other}")),
    };
    decoder.finish()?;
    Ok(entry)
}

/// Parses the record at the start of `bytes`: the entry and the record's total length.
fn parse_record(bytes: &[u8]) -> Result<(WalEntry, usize), String> {
    if bytes.len() < HEADER_BYTES {
        return Err(format!(
            "{} bytes left, shorter than a record header",
            bytes.len()
        ));
    }
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(&bytes[0..4]);
    let mut crc_bytes = [0u8; 4];
    crc_bytes.copy_from_slice(&bytes[4..8]);
    let len = u32::from_le_bytes(len_bytes) as usize;
    let crc = u32::from_le_bytes(crc_bytes);

    if len == 0 || len > MAX_RECORD_BYTES {
        return Err(format!("implausible record length {len}"));
    }
    let Some(body) = bytes.get(HEADER_BYTES..HEADER_BYTES + len) else {
        return Err(format!("record of {len} bytes cut short"));
    };
    let actual = crc32fast::hash(body);
    if actual != crc {
        return Err(format!(
            "crc mismatch (stored {crc:#010x}, computed {actual:#010x})"
        ));
    }
    let entry = decode_body(body)?;
    Ok((entry, HEADER_BYTES + len))
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
    use super::*;

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
    fn varint_round_trip() {
        for value in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut buf = Vec::new();
            put_varint(&mut buf, value);
            let mut decoder = Decoder {
                bytes: &buf,
                position: 0,
            };
            assert_eq!(decoder.varint(), Ok(value));
            assert!(decoder.finish().is_ok());
        }
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

    #[test]
    fn lengths_that_lie_are_rejected_without_allocating() {
        let mut buf = Vec::new();
        encode_entry(&mut buf, &reading(1));
        // A huge length field.
        buf[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_record(&buf).is_err());
        // Truncated everywhere: never panics.
        let mut good = Vec::new();
        encode_entry(&mut good, &rejection());
        for cut in 0..good.len() {
            assert!(parse_record(&good[..cut]).is_err());
        }
        assert!(parse_record(&good).is_ok());
    }
}
