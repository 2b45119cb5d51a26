//! The record format of vigil's write-ahead log: the entries it holds and their bytes.
//!
//! In: entries to log (accepted readings, refusal records). Out: their encoding, and the
//! decoder that replay runs over every segment at start. The decoder reads bytes from disk that
//! a crash may have torn or a disk may have damaged: every defect is an error naming what is
//! wrong, never a panic, and no allocation is larger than the record being read. Segment files,
//! group commits and replay are the store's (`vigil_store`'s `wal` module).
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

use std::sync::Arc;

/// Record kind of an accepted reading.
pub const KIND_READING: u8 = 1;
/// Record kind of a rejection.
pub const KIND_REJECTION: u8 = 2;
/// Bytes before the kind byte: len and crc.
const HEADER_BYTES: usize = 8;
/// Largest record replay accepts; anything longer is treated as a corrupt length field.
pub const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// A verified reading, one per MQTT message.
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptedReading {
    /// Device id.
    pub device_id: Arc<str>,
    /// Device sequence number.
    pub seq: u64,
    /// Device clock, Unix milliseconds.
    pub sampled_at_ms: i64,
    /// Server clock, Unix milliseconds (partitioning uses this, UTC).
    pub received_at_ms: i64,
    /// (metric, value); one row each in `readings`.
    pub measurements: Vec<(String, f64)>,
    /// Identifies the exact signed bytes (for re-send detection).
    pub signature_digest: [u8; 16],
}

/// A refused message; `device_id` and `detail` come from attackers.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// Claimed device id (untrusted).
    pub device_id: String,
    /// Server clock, Unix milliseconds.
    pub received_at_ms: i64,
    /// Why it was refused.
    pub reason: String,
    /// Detail (untrusted).
    pub detail: String,
    /// Peer address.
    pub peer: String,
}

/// One entry submitted to the write-ahead log.
#[derive(Debug, Clone, PartialEq)]
pub enum WalEntry {
    /// An accepted reading.
    Reading(AcceptedReading),
    /// A rejection.
    Rejection(Rejection),
    /// Writes nothing; completes once every entry submitted before it is durable or failed.
    Barrier,
    /// An exact re-send of a reading believed stored: writes nothing; completes once every
    /// entry submitted before it is handled, with `Ok` only if the reading is durable.
    Resend {
        device_id: Arc<str>,
        seq: u64,
        signature_digest: [u8; 16],
    },
}

/// Appends one encoded record for `entry` to `buf`. A barrier or a re-send encodes nothing.
pub fn encode_entry(buf: &mut Vec<u8>, entry: &WalEntry) {
    match entry {
        WalEntry::Reading(reading) => {
            encode_record(buf, KIND_READING, |b| encode_reading(b, reading))
        }
        WalEntry::Rejection(rejection) => {
            encode_record(buf, KIND_REJECTION, |b| encode_rejection(b, rejection))
        }
        WalEntry::Barrier | WalEntry::Resend { .. } => {}
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
pub fn parse_record(bytes: &[u8]) -> Result<(WalEntry, usize), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(seq: u64) -> WalEntry {
        WalEntry::Reading(AcceptedReading {
            device_id: Arc::from("infusion-3"),
            seq,
            sampled_at_ms: -1,
            received_at_ms: i64::MAX,
            measurements: vec![("glucose_mg_dl".to_owned(), f64::MIN_POSITIVE)],
            signature_digest: [0xA5; 16],
        })
    }

    fn rejection() -> WalEntry {
        WalEntry::Rejection(Rejection {
            device_id: "line\nbreak\u{1b}[2J".to_owned(),
            received_at_ms: 0,
            reason: "malformed".to_owned(),
            detail: String::new(),
            peer: "[::1]:1883".to_owned(),
        })
    }

    #[test]
    fn each_kind_round_trips_and_a_barrier_writes_nothing() {
        let mut buf = Vec::new();
        encode_entry(&mut buf, &WalEntry::Barrier);
        assert!(buf.is_empty());
        for entry in [reading(9), rejection()] {
            buf.clear();
            encode_entry(&mut buf, &entry);
            assert_eq!(parse_record(&buf), Ok((entry, buf.len())));
        }
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
