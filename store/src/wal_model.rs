//! Property test of the write-ahead log against a model of what is durable.
//!
//! Random runs of operations drive the real segment writer and replay: append a group of
//! records (one `append_durably`), roll to a new segment, crash (drop the writer; no shutdown
//! code exists to skip) with or without damage to the last segment (cut at a random byte, a
//! flipped byte, garbage appended), crash in the middle of a group's write, and flip a byte in
//! a segment that is not the last. After every crash the log is reopened as `Store::open` does
//! (replay, then a new segment numbered above every existing one) and the replayed records are
//! compared with the model:
//!
//! - every record of a group that completed before the crash is replayed exactly once, in
//!   order, with its segment number, unless damage to the last segment at or before it cut it
//!   away; damage to the last segment loses only the damaged record and what follows it in
//!   that segment, never an earlier record; the complete records of a group torn by the crash
//!   are replayed too (they are whole; nobody was told they were durable);
//! - replay cuts the damaged last segment back to its last good record, durably: the next
//!   replay finds nothing to cut;
//! - damage in any other segment is [`StoreError::WalCorrupt`] naming that file and the
//!   offset of the damaged record, and replay changes no file.
//!
//! The model is exact: a flipped byte always fails the record's CRC-32 (a single-byte change
//! cannot keep a CRC-32), and random garbage forms a valid record only with a 2^-32 chance.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;

use crate::error::{Result, StoreError};
use crate::wal::{SegmentWriter, encode_entry, replay, segment_path};
use crate::{AcceptedReading, Rejection, WalEntry};

/// Roll past this many bytes, as the writer does past `wal_segment_bytes` (small, so that runs
/// cross many segments).
const SEGMENT_BYTES: u64 = 600;

/// The shape of one record; its identity (`seq`) is given when it is appended.
#[derive(Debug, Clone)]
struct RecordShape {
    rejection: bool,
    id_len: usize,
    measurements: usize,
}

#[derive(Debug, Clone)]
enum Damage {
    None,
    /// Cut the last segment at this fraction of its length.
    Truncate(f64),
    /// XOR the byte at this fraction of the last segment's length with a non-zero mask.
    Flip(f64, u8),
    /// Append these bytes to the last segment (a crash that left junk, or zeros).
    Garbage(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<RecordShape>),
    Roll,
    Crash(Damage),
    /// Write this fraction of a group's bytes, then crash.
    TornCrash(Vec<RecordShape>, f64),
    /// Flip a byte of a segment other than the last (picked by the two numbers), then reopen.
    CorruptEarlier(usize, f64, u8),
}

fn shape() -> impl Strategy<Value = RecordShape> {
    (any::<bool>(), 1usize..24, 0usize..4).prop_map(|(rejection, id_len, measurements)| {
        RecordShape {
            rejection,
            id_len,
            measurements,
        }
    })
}

fn group() -> impl Strategy<Value = Vec<RecordShape>> {
    prop::collection::vec(shape(), 1..6)
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        2 => Just(Damage::None),
        2 => (0.0..1.0f64).prop_map(Damage::Truncate),
        2 => (0.0..1.0f64, 1u8..=255).prop_map(|(at, mask)| Damage::Flip(at, mask)),
        1 => prop_oneof![
            prop::collection::vec(any::<u8>(), 1..40),
            (1usize..40).prop_map(|n| vec![0u8; n]),
        ]
        .prop_map(Damage::Garbage),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => group().prop_map(Op::Append),
        1 => Just(Op::Roll),
        3 => damage().prop_map(Op::Crash),
        2 => (group(), 0.0..1.0f64).prop_map(|(g, keep)| Op::TornCrash(g, keep)),
        1 => (any::<usize>(), 0.0..1.0f64, 1u8..=255)
            .prop_map(|(segment, at, mask)| Op::CorruptEarlier(segment, at, mask)),
    ]
}

fn entry(shape: &RecordShape, seq: u64) -> WalEntry {
    let device_id = format!("{seq}-{}", "d".repeat(shape.id_len));
    if shape.rejection {
        WalEntry::Rejection(Rejection {
            device_id,
            received_at_ms: seq as i64,
            reason: "replay".to_owned(),
            detail: "x".repeat(shape.measurements * 7),
            peer: "127.0.0.1:1".to_owned(),
        })
    } else {
        WalEntry::Reading(AcceptedReading {
            device_id: Arc::from(device_id),
            seq,
            sampled_at_ms: seq as i64 * 10,
            received_at_ms: seq as i64 * 10 + 1,
            measurements: (0..shape.measurements)
                .map(|i| (format!("metric_{i}"), seq as f64 + i as f64 / 4.0))
                .collect(),
            signature_digest: [seq as u8; 16],
        })
    }
}

/// A record the model expects replay to return: which segment, and where it ends there.
#[derive(Debug, Clone)]
struct ModelRecord {
    entry: WalEntry,
    start: u64,
    end: u64,
}

/// What the log must hold: per segment (ascending), its records and its byte length.
#[derive(Debug, Default)]
struct Model {
    segments: Vec<(u64, Vec<ModelRecord>, u64)>,
}

impl Model {
    fn expected(&self) -> Vec<(u64, WalEntry)> {
        self.segments
            .iter()
            .flat_map(|(number, records, _)| records.iter().map(|r| (*number, r.entry.clone())))
            .collect()
    }

    /// Records ending at or before `offset` stay in the last segment; replay cuts the rest.
    fn cut_last(&mut self, offset: u64) {
        if let Some((_, records, length)) = self.segments.last_mut() {
            records.retain(|record| record.end <= offset);
            *length = records.last().map_or(0, |record| record.end);
        }
    }

    /// Records `bytes` of encoded `entries` as appended to the last segment; returns the
    /// records and the new length. Entries cut off before their end are not recorded.
    fn append(&mut self, entries: &[WalEntry], written: u64) {
        let (_, records, length) = self.segments.last_mut().expect("a segment is open");
        let mut offset = *length;
        let base = *length;
        for entry in entries {
            let mut buf = Vec::new();
            encode_entry(&mut buf, entry);
            let end = offset + buf.len() as u64;
            if end - base <= written {
                records.push(ModelRecord {
                    entry: entry.clone(),
                    start: offset,
                    end,
                });
            }
            offset = end;
        }
        *length = base + written;
    }
}

/// Reopens as `Store::open` does: replay, then a new segment above every existing one.
fn reopen(dir: &Path) -> Result<(Vec<(u64, WalEntry)>, SegmentWriter)> {
    let mut replayed = Vec::new();
    let summary = replay(dir, |segment, entry| replayed.push((segment, entry)))?;
    let next = summary.segments.last().map_or(0, |number| number + 1);
    let writer = SegmentWriter::create(dir, next)?;
    Ok((replayed, writer))
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("segment exists").len()
}

fn encode_group(entries: &[WalEntry]) -> Vec<u8> {
    let mut buf = Vec::new();
    for entry in entries {
        encode_entry(&mut buf, entry);
    }
    buf
}

/// Runs `ops`; `Err` describes the first difference between the log and the model.
fn run(ops: &[Op]) -> std::result::Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let mut model = Model::default();
    let mut next_seq = 1u64;
    let mut make = |shapes: &[RecordShape]| -> Vec<WalEntry> {
        shapes
            .iter()
            .map(|shape| {
                next_seq += 1;
                entry(shape, next_seq)
            })
            .collect()
    };

    let (replayed, mut writer) = reopen(dir).expect("open empty");
    prop_assert!(replayed.is_empty());
    model.segments.push((0, Vec::new(), 0));

    for op in ops {
        match op {
            Op::Append(shapes) => {
                let entries = make(shapes);
                let bytes = encode_group(&entries);
                writer.append_durably(&bytes).expect("append");
                model.append(&entries, bytes.len() as u64);
                if writer.size() >= SEGMENT_BYTES {
                    let number = writer.roll().expect("roll");
                    model.segments.push((number, Vec::new(), 0));
                }
            }
            Op::Roll => {
                let number = writer.roll().expect("roll");
                model.segments.push((number, Vec::new(), 0));
            }
            Op::Crash(damage) => {
                let last = writer.path().to_path_buf();
                drop(writer);
                let length = file_len(&last);
                match damage {
                    Damage::None => {}
                    Damage::Truncate(at) => {
                        let cut = (length as f64 * at) as u64;
                        let file = OpenOptions::new().write(true).open(&last).expect("open");
                        file.set_len(cut).expect("truncate");
                        model.cut_last(cut);
                    }
                    Damage::Flip(at, mask) => {
                        if length > 0 {
                            let offset = ((length as f64 * at) as u64).min(length - 1);
                            flip(&last, offset, *mask);
                            model.cut_last(offset);
                        }
                    }
                    Damage::Garbage(bytes) => {
                        let mut file = OpenOptions::new().append(true).open(&last).expect("open");
                        file.write_all(bytes).expect("garbage");
                    }
                }
                writer = reopen_and_check(dir, &mut model)?;
            }
            Op::TornCrash(shapes, keep) => {
                let entries = make(shapes);
                let bytes = encode_group(&entries);
                // At least one byte is missing: the group's write did not finish.
                let written = ((bytes.len() as f64 * keep) as usize).min(bytes.len() - 1);
                let last = writer.path().to_path_buf();
                drop(writer);
                let mut file = OpenOptions::new().append(true).open(&last).expect("open");
                file.write_all(&bytes[..written]).expect("partial group");
                drop(file);
                model.append(&entries, written as u64);
                // The partial record at the end is cut by replay.
                let complete = model
                    .segments
                    .last()
                    .and_then(|s| s.1.last())
                    .map(|r| r.end);
                model.cut_last(complete.unwrap_or(0));
                writer = reopen_and_check(dir, &mut model)?;
            }
            Op::CorruptEarlier(pick, at, mask) => {
                let candidates: Vec<usize> = (0..model.segments.len() - 1)
                    .filter(|&index| model.segments[index].2 > 0)
                    .collect();
                if candidates.is_empty() {
                    continue;
                }
                let index = candidates[pick % candidates.len()];
                let (number, records, length) = &model.segments[index];
                let offset = ((*length as f64 * at) as u64).min(length - 1);
                let damaged_start = records
                    .iter()
                    .find(|record| record.end > offset)
                    .map(|record| record.start)
                    .expect("a record covers every byte");
                let path = segment_path(dir, *number);
                drop(writer);
                flip(&path, offset, *mask);
                let lengths_before = segment_lengths(dir, &model);

                match reopen(dir) {
                    Err(StoreError::WalCorrupt {
                        path: error_path,
                        offset: error_offset,
                        ..
                    }) => {
                        prop_assert_eq!(error_path, path);
                        prop_assert_eq!(error_offset, damaged_start);
                    }
                    Err(other) => prop_assert!(false, "unexpected error {other}"),
                    Ok(_) => prop_assert!(false, "replay skipped damage in {}", path.display()),
                }
                prop_assert_eq!(
                    segment_lengths(dir, &model),
                    lengths_before,
                    "replay changed a file"
                );
                // The log needs an operator now; the run ends here.
                return Ok(());
            }
        }
    }
    Ok(())
}

fn segment_lengths(dir: &Path, model: &Model) -> Vec<u64> {
    model
        .segments
        .iter()
        .map(|(number, _, _)| file_len(&segment_path(dir, *number)))
        .collect()
}

fn flip(path: &Path, offset: u64, mask: u8) {
    let mut bytes = std::fs::read(path).expect("read segment");
    bytes[offset as usize] ^= mask;
    std::fs::write(path, bytes).expect("write segment");
}

/// Reopens after a crash, compares replay with the model, and checks that the last segment
/// was cut back to its good records (so that a second replay finds nothing to cut).
fn reopen_and_check(
    dir: &Path,
    model: &mut Model,
) -> std::result::Result<SegmentWriter, TestCaseError> {
    let (replayed, writer) = match reopen(dir) {
        Ok(opened) => opened,
        Err(error) => return Err(TestCaseError::fail(format!("reopen failed: {error}"))),
    };
    let expected = model.expected();
    prop_assert_eq!(replayed.len(), expected.len(), "records replayed");
    prop_assert_eq!(replayed, expected);
    prop_assert_eq!(
        segment_lengths(dir, model),
        model
            .segments
            .iter()
            .map(|(_, _, length)| *length)
            .collect::<Vec<_>>(),
        "segment lengths after replay"
    );

    let number = writer
        .path()
        .file_stem()
        .and_then(|stem| stem.to_str())
        .and_then(|stem| stem.parse::<u64>().ok())
        .expect("segment name");
    let above_all = model
        .segments
        .last()
        .is_none_or(|(last, _, _)| number > *last);
    prop_assert!(above_all, "new segment {number} is not above the old ones");
    model.segments.push((number, Vec::new(), 0));
    Ok(writer)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    })]

    #[test]
    fn replay_returns_exactly_the_durable_records(ops in prop::collection::vec(op(), 1..40)) {
        run(&ops)?;
    }
}
