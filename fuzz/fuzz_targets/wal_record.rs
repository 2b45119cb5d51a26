//! Write-ahead log records as replay reads them from disk after a crash or a disk fault: any
//! bytes are records or a named defect, never a panic or a huge allocation, and a record that
//! decodes encodes back to bytes that decode to the same record.
//!
//! The first input byte picks the mode: even, the rest is a segment, read record after record
//! as replay does; odd, the rest is one record body (kind and payload) given a correct length
//! and CRC, so that the body decoder is reached without the fuzzer having to find the CRC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_wal_record::{encode_entry, parse_record};

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let framed;
    let mut segment = rest;
    if mode & 1 == 1 {
        framed = frame(rest);
        segment = &framed;
    }

    let mut offset = 0;
    while offset < segment.len() {
        let Ok((entry, used)) = parse_record(&segment[offset..]) else {
            return;
        };
        assert!(used > 0 && used <= segment.len() - offset);

        let mut encoded = Vec::new();
        encode_entry(&mut encoded, &entry);
        let (again, again_used) = parse_record(&encoded).expect("an encoded record decodes");
        assert_eq!(again_used, encoded.len());
        let mut encoded_again = Vec::new();
        encode_entry(&mut encoded_again, &again);
        assert_eq!(encoded, encoded_again);
        offset += used;
    }
});

/// `body` behind a header with its true length and CRC.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(8 + body.len());
    record.extend_from_slice(&(body.len() as u32).to_le_bytes());
    record.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    record.extend_from_slice(body);
    record
}
