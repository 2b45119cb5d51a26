//! The login nonce cache: every token nonce is accepted once, also across restarts.
//!
//! Invariants:
//! - A nonce is appended to `<data-dir>/nonces.log` and fsynced before the login it belongs to
//!   is accepted, so a crash can never make an accepted token usable again.
//! - A nonce is only kept until its token expires: an expired token is refused anyway. On open
//!   the log is rewritten with the live nonces only, which bounds the file and the memory by
//!   the number of logins within one maximum token lifetime.
//! - Record format: 16 nonce bytes then the expiry as u64 little endian (24 bytes). A torn last
//!   record (crash mid-append) is ignored: its login was never accepted.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::registry::write_atomically;
use crate::{Error, Result};

const RECORD_LEN: usize = 24;

/// Outcome of offering a nonce to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    Fresh,
    Reused,
}

#[derive(Debug)]
struct Inner {
    seen: HashMap<[u8; 16], u64>,
    log: File,
    records_in_log: usize,
}

/// Durable set of the nonces of unexpired tokens.
#[derive(Debug)]
pub struct NonceCache {
    path: PathBuf,
    inner: Mutex<Inner>,
}

impl NonceCache {
    pub fn open(data_dir: &Path, now_unix_s: u64) -> Result<Self> {
        let path = data_dir.join("nonces.log");
        let io_error = |source| Error::Io {
            path: path.clone(),
            source,
        };

        let mut seen = HashMap::new();
        if path.exists() {
            let mut bytes = Vec::new();
            File::open(&path)
                .and_then(|mut file| file.read_to_end(&mut bytes))
                .map_err(io_error)?;
            for record in bytes.chunks_exact(RECORD_LEN) {
                let mut nonce = [0u8; 16];
                nonce.copy_from_slice(&record[..16]);
                let mut expiry = [0u8; 8];
                expiry.copy_from_slice(&record[16..]);
                let expires = u64::from_le_bytes(expiry);
                if expires >= now_unix_s {
                    seen.insert(nonce, expires);
                }
            }
        }

        let compacted: Vec<u8> = seen
            .iter()
            .flat_map(|(nonce, expires)| encode(nonce, *expires))
            .collect();
        write_atomically(&path, &compacted)?;
        let log = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_error)?;
        let records_in_log = seen.len();

        Ok(Self {
            path,
            inner: Mutex::new(Inner {
                seen,
                log,
                records_in_log,
            }),
        })
    }

    /// Records a nonce durably unless it was seen before.
    pub fn check_and_insert(
        &self,
        nonce: [u8; 16],
        expires_unix_s: u64,
        now_unix_s: u64,
    ) -> Result<NonceCheck> {
        let mut inner = self.inner.lock();
        if inner.seen.contains_key(&nonce) {
            return Ok(NonceCheck::Reused);
        }

        let io_error = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        inner
            .log
            .write_all(&encode(&nonce, expires_unix_s))
            .map_err(io_error)?;
        inner.log.sync_data().map_err(io_error)?;
        inner.seen.insert(nonce, expires_unix_s);
        inner.records_in_log += 1;

        // Expired nonces are dropped from memory now and then; the file is compacted on open.
        if inner.records_in_log.is_multiple_of(4096) {
            inner.seen.retain(|_, expires| *expires >= now_unix_s);
        }
        Ok(NonceCheck::Fresh)
    }

    pub fn len(&self) -> usize {
        self.inner.lock().seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn encode(nonce: &[u8; 16], expires_unix_s: u64) -> [u8; RECORD_LEN] {
    let mut record = [0u8; RECORD_LEN];
    record[..16].copy_from_slice(nonce);
    record[16..].copy_from_slice(&expires_unix_s.to_le_bytes());
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_single_use_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let cache = NonceCache::open(dir.path(), 100).unwrap();
        assert_eq!(
            cache.check_and_insert([1; 16], 200, 100).unwrap(),
            NonceCheck::Fresh
        );
        assert_eq!(
            cache.check_and_insert([1; 16], 200, 100).unwrap(),
            NonceCheck::Reused
        );
        assert_eq!(
            cache.check_and_insert([2; 16], 150, 100).unwrap(),
            NonceCheck::Fresh
        );
        drop(cache);

        let reopened = NonceCache::open(dir.path(), 160).unwrap();
        assert_eq!(
            reopened.len(),
            1,
            "the nonce that expired at 150 is dropped"
        );
        assert_eq!(
            reopened.check_and_insert([1; 16], 200, 160).unwrap(),
            NonceCheck::Reused
        );
    }

    #[test]
    fn a_torn_record_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = NonceCache::open(dir.path(), 100).unwrap();
        cache.check_and_insert([1; 16], 200, 100).unwrap();
        drop(cache);
        let mut log = OpenOptions::new()
            .append(true)
            .open(dir.path().join("nonces.log"))
            .unwrap();
        log.write_all(&[9; 10]).unwrap();
        drop(log);

        let reopened = NonceCache::open(dir.path(), 100).unwrap();
        assert_eq!(reopened.len(), 1);
    }
}
