//! Bearer tokens for the gRPC port (device administration and Flight SQL).
//!
//! The server keeps only the SHA-256 hash of the admin token. On first start, when no token
//! exists, it creates one in `<data-dir>/admin.token`, readable by its owner only; the file is
//! for the operator, the server reads it once to learn the hash.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

const TOKEN_FILE: &str = "admin.token";

/// Checks the `authorization: Bearer <token>` header of every call.
#[derive(Clone)]
pub(crate) struct BearerAuth {
    admin_hash: Arc<[u8; 32]>,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerAuth { .. }")
    }
}

impl BearerAuth {
    /// Loads the admin token of `data_dir`, creating it on first start.
    pub(crate) fn load_or_create(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join(TOKEN_FILE);
        if !path.exists() {
            let token = hex::encode(rand::random::<[u8; 32]>());
            write_owner_only(&path, token.as_bytes())
                .with_context(|| format!("cannot create admin token {}", path.display()))?;
            tracing::info!(path = %path.display(), "created admin token");
        }

        let token = fs::read_to_string(&path)
            .with_context(|| format!("cannot read admin token {}", path.display()))?;
        Ok(Self {
            admin_hash: Arc::new(hash(token.trim())),
        })
    }

    /// Checks a request's bearer token.
    #[allow(clippy::result_large_err)]
    pub(crate) fn check<T>(&self, request: Request<T>) -> Result<Request<T>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization is not a bearer token"))?;

        if constant_time_eq(&hash(token.trim()), &self.admin_hash) {
            Ok(request)
        } else {
            tracing::warn!("grpc call refused: unknown bearer token");
            Err(Status::unauthenticated("unknown bearer token"))
        }
    }
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn write_owner_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Finds the token a client command should send: flag, file, environment, or the default
/// data directory's admin token.
pub(crate) fn client_token(
    token: Option<&str>,
    token_file: Option<&Path>,
) -> anyhow::Result<String> {
    if let Some(token) = token {
        return Ok(token.trim().to_owned());
    }
    if let Some(path) = token_file {
        let text = fs::read_to_string(path)
            .with_context(|| format!("cannot read token file {}", path.display()))?;
        return Ok(text.trim().to_owned());
    }
    let default = Path::new("./vigil-data").join(TOKEN_FILE);
    fs::read_to_string(&default)
        .map(|text| text.trim().to_owned())
        .with_context(|| {
            format!(
                "no token given (--token, --token-file or VIGIL_TOKEN) and {} is not readable",
                default.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_token_is_created_once_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let auth = BearerAuth::load_or_create(dir.path()).unwrap();
        let token = fs::read_to_string(dir.path().join(TOKEN_FILE)).unwrap();
        let again = BearerAuth::load_or_create(dir.path()).unwrap();
        assert_eq!(auth.admin_hash, again.admin_hash);

        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join(TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let mut good = Request::new(());
        good.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        assert!(auth.check(good).is_ok());

        let mut bad = Request::new(());
        bad.metadata_mut()
            .insert("authorization", "Bearer nope".parse().unwrap());
        assert!(auth.check(bad).is_err());
        assert!(auth.check(Request::new(())).is_err());
    }
}
