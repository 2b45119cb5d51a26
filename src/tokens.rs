//! API tokens with a role, for the gRPC port: created, listed and revoked by an admin.
//!
//! A token is a 256-bit random secret, sent by the client as `authorization: Bearer <secret>`.
//! The server never stores the secret: `<data-dir>/tokens.json` holds one record per token ever
//! created (id, name, role, creation time, revocation time, SHA-256 of the secret), and the
//! secret itself leaves the server once, in the answer to its creation.
//!
//! Durability: every change is on disk before anyone sees it. The whole file is written to
//! `tokens.json.tmp` (mode 0600), fsynced, renamed over `tokens.json`, and the directory
//! fsynced; only then does the in-memory index change and the call answer. So a revoked token
//! is refused from the moment `RevokeToken` answers, and a crash at any step leaves the old file
//! or the new one, never a mix. A restart reads the file back; a file that cannot be read stops
//! the start, because starting without it would drop revocations silently.
//!
//! Revoked tokens stay in the file with their revocation time, so `vigil tokens list` shows them
//! and a refused call can say "revoked" rather than "unknown". Changes are serialized by one
//! writer lock; lookups read an immutable index and never wait on the disk. A revocation also
//! wakes [`TokenStore::until_revoked`], which ends calls still running under the token (an
//! alert stream, a long query result).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::auth::Role;

/// File of the token records under the data directory.
pub(crate) const TOKENS_FILE: &str = "tokens.json";

/// Longest token name, in characters.
const MAX_NAME_CHARS: usize = 64;

/// Version of the file layout; a file with another version is refused.
const FILE_VERSION: u32 = 1;

/// One API token as the server keeps it: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TokenRecord {
    /// Random id, 16 lowercase hex characters; what `vigil tokens revoke` takes.
    pub(crate) id: String,
    /// The operator's label for the token's holder.
    pub(crate) name: String,
    /// What the token may call.
    pub(crate) role: Role,
    /// Creation time, milliseconds since the Unix epoch.
    pub(crate) created_at_ms: i64,
    /// Revocation time, milliseconds since the Unix epoch; `None` while valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) revoked_at_ms: Option<i64>,
    /// SHA-256 of the secret, 64 lowercase hex characters.
    secret_sha256: String,
}

/// The on-disk document.
#[derive(Debug, Serialize, Deserialize)]
struct TokensFile {
    version: u32,
    tokens: Vec<TokenRecord>,
}

/// The records and their lookup by secret hash; replaced whole on every change.
#[derive(Debug, Default)]
struct Index {
    records: Vec<Arc<TokenRecord>>,
    by_hash: HashMap<[u8; 32], Arc<TokenRecord>>,
}

impl Index {
    fn build(records: Vec<TokenRecord>) -> anyhow::Result<Self> {
        let mut index = Self::default();
        for record in records {
            let hash = decode_hash(&record.secret_sha256)
                .with_context(|| format!("token {} has an invalid secret hash", record.id))?;
            let record = Arc::new(record);
            index.by_hash.insert(hash, record.clone());
            index.records.push(record);
        }
        Ok(index)
    }
}

/// The durable set of API tokens of one data directory.
#[derive(Debug)]
pub(crate) struct TokenStore {
    path: PathBuf,
    index: RwLock<Arc<Index>>,
    /// Held for the whole of a change, so two changes never write the file at once.
    writer: Mutex<()>,
    /// Counts revocations, to wake the calls that watch their token.
    revocations: watch::Sender<u64>,
}

impl TokenStore {
    /// Reads `<data_dir>/tokens.json`; a missing file is an empty store.
    pub(crate) fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join(TOKENS_FILE);
        let records = match fs::read(&path) {
            Ok(bytes) => {
                let file: TokensFile = serde_json::from_slice(&bytes)
                    .with_context(|| format!("cannot parse token store {}", path.display()))?;
                if file.version != FILE_VERSION {
                    bail!(
                        "token store {} has version {}, this build reads version {FILE_VERSION}",
                        path.display(),
                        file.version
                    );
                }
                file.tokens
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("cannot read token store {}", path.display()));
            }
        };
        let index =
            Index::build(records).with_context(|| format!("in token store {}", path.display()))?;
        tracing::info!(
            path = %path.display(),
            tokens = index.records.len(),
            "token store opened"
        );
        Ok(Self {
            path,
            index: RwLock::new(Arc::new(index)),
            writer: Mutex::new(()),
            revocations: watch::Sender::new(0),
        })
    }

    /// Every token ever created, oldest first.
    pub(crate) fn list(&self) -> Vec<Arc<TokenRecord>> {
        self.index.read().records.clone()
    }

    /// The token whose secret hashes to `secret_hash`, revoked or not.
    pub(crate) fn find(&self, secret_hash: &[u8; 32]) -> Option<Arc<TokenRecord>> {
        self.index.read().by_hash.get(secret_hash).cloned()
    }

    /// Whether the token with id `id` exists and is revoked.
    pub(crate) fn is_revoked(&self, id: &str) -> bool {
        self.index
            .read()
            .records
            .iter()
            .any(|record| record.id == id && record.revoked_at_ms.is_some())
    }

    /// Completes once the token with id `id` is revoked; never, if it stays valid.
    pub(crate) fn until_revoked(
        self: &Arc<Self>,
        id: String,
    ) -> impl Future<Output = ()> + Send + 'static {
        let mut revocations = self.revocations.subscribe();
        let tokens = Arc::clone(self);
        async move {
            // The sender lives as long as the store, which this future holds: no error here.
            if revocations
                .wait_for(|_| tokens.is_revoked(&id))
                .await
                .is_err()
            {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Creates a token and returns its record and its secret. Blocks on the disk.
    pub(crate) fn create(
        &self,
        role: Role,
        name: &str,
        now_ms: i64,
    ) -> anyhow::Result<(TokenRecord, String)> {
        check_name(name)?;
        let _writer = self.writer.lock();
        let current = self.index.read().clone();

        let secret = hex::encode(rand::random::<[u8; 32]>());
        let record = TokenRecord {
            id: fresh_id(&current),
            name: name.to_owned(),
            role,
            created_at_ms: now_ms,
            revoked_at_ms: None,
            secret_sha256: hex::encode(secret_hash(&secret)),
        };
        let mut records: Vec<TokenRecord> = current.records.iter().map(|r| (**r).clone()).collect();
        records.push(record.clone());

        self.replace(records)?;
        Ok((record, secret))
    }

    /// Revokes the token with id `id`; `None` when there is none. Revoking a revoked token
    /// changes nothing. Blocks on the disk.
    pub(crate) fn revoke(&self, id: &str, now_ms: i64) -> anyhow::Result<Option<TokenRecord>> {
        let _writer = self.writer.lock();
        let current = self.index.read().clone();
        let Some(position) = current.records.iter().position(|record| record.id == id) else {
            return Ok(None);
        };
        if current.records[position].revoked_at_ms.is_some() {
            return Ok(Some((*current.records[position]).clone()));
        }

        let mut records: Vec<TokenRecord> = current.records.iter().map(|r| (**r).clone()).collect();
        records[position].revoked_at_ms = Some(now_ms);
        let revoked = records[position].clone();

        self.replace(records)?;
        self.revocations.send_modify(|count| *count += 1);
        Ok(Some(revoked))
    }

    /// Makes `records` durable, then visible. The caller holds the writer lock.
    fn replace(&self, records: Vec<TokenRecord>) -> anyhow::Result<()> {
        let file = TokensFile {
            version: FILE_VERSION,
            tokens: records,
        };
        let bytes = serde_json::to_vec_pretty(&file).context("cannot encode the token store")?;
        write_durably(&self.path, &bytes)
            .with_context(|| format!("cannot write token store {}", self.path.display()))?;

        let index = Index::build(file.tokens)?;
        *self.index.write() = Arc::new(index);
        Ok(())
    }
}

/// The SHA-256 of a bearer secret, as the server compares and stores it.
pub(crate) fn secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.trim().as_bytes()).into()
}

/// Refuses names an operator could not read back in `vigil tokens list`.
pub(crate) fn check_name(name: &str) -> anyhow::Result<()> {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        bail!("a token name has 1 to {MAX_NAME_CHARS} characters");
    }
    if name.chars().any(char::is_control) {
        bail!("a token name has no control characters");
    }
    Ok(())
}

fn fresh_id(index: &Index) -> String {
    loop {
        let id = hex::encode(rand::random::<[u8; 8]>());
        if !index.records.iter().any(|record| record.id == id) {
            return id;
        }
    }
}

fn decode_hash(text: &str) -> anyhow::Result<[u8; 32]> {
    let bytes = hex::decode(text)?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("a SHA-256 hash has 32 bytes"))
}

/// Temp file, fsync, rename, fsync of the directory.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let temp = path.with_extension("json.tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);

    fs::rename(&temp, path)?;
    let directory = path.parent().unwrap_or(Path::new("."));
    fs::File::open(directory)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_survive_a_reopen_and_the_file_holds_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(dir.path()).unwrap();
        let (analyst, analyst_secret) = store.create(Role::Analyst, "grafana", 1).unwrap();
        let (soc, soc_secret) = store.create(Role::Soc, "night shift", 2).unwrap();
        assert_ne!(analyst.id, soc.id);
        assert_eq!(analyst_secret.len(), 64);

        let revoked = store.revoke(&soc.id, 3).unwrap().unwrap();
        assert_eq!(revoked.revoked_at_ms, Some(3));
        assert_eq!(
            store.revoke(&soc.id, 4).unwrap().unwrap().revoked_at_ms,
            Some(3)
        );
        assert!(store.revoke("0000000000000000", 5).unwrap().is_none());

        let text = fs::read_to_string(dir.path().join(TOKENS_FILE)).unwrap();
        assert!(!text.contains(&analyst_secret));
        assert!(!text.contains(&soc_secret));

        let reopened = TokenStore::open(dir.path()).unwrap();
        let found = reopened.find(&secret_hash(&analyst_secret)).unwrap();
        assert_eq!(*found, analyst);
        let found = reopened.find(&secret_hash(&soc_secret)).unwrap();
        assert_eq!(found.revoked_at_ms, Some(3));
        assert!(reopened.is_revoked(&soc.id));
        assert!(!reopened.is_revoked(&analyst.id));
        assert!(reopened.find(&secret_hash("nope")).is_none());
        assert_eq!(reopened.list().len(), 2);
    }

    #[tokio::test]
    async fn a_revocation_wakes_the_calls_of_its_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(TokenStore::open(dir.path()).unwrap());
        let (kept, _) = store.create(Role::Soc, "kept", 1).unwrap();
        let (revoked, _) = store.create(Role::Soc, "revoked", 1).unwrap();
        let kept = tokio::spawn(store.until_revoked(kept.id));
        let watched = tokio::spawn(store.until_revoked(revoked.id.clone()));

        let store_for_revoke = store.clone();
        tokio::task::spawn_blocking(move || store_for_revoke.revoke(&revoked.id, 2))
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), watched)
            .await
            .unwrap()
            .unwrap();
        assert!(!kept.is_finished());
        kept.abort();
    }

    #[test]
    fn names_are_checked_and_a_broken_file_stops_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(dir.path()).unwrap();
        assert!(store.create(Role::Admin, "", 1).is_err());
        assert!(store.create(Role::Admin, "a\nb", 1).is_err());
        assert!(store.create(Role::Admin, &"x".repeat(65), 1).is_err());
        assert!(store.list().is_empty());

        fs::write(dir.path().join(TOKENS_FILE), b"{ not json").unwrap();
        assert!(TokenStore::open(dir.path()).is_err());
    }
}
