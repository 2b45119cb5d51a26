//! Login checks: the MQTT CONNECT of a device against its registered key.
//!
//! Order of the checks: cheap and keyless first (shape, identity, registry, expiry), then the
//! signature, and the nonce last, so that a forged or expired token never consumes a nonce
//! slot or an fsync.

use std::sync::Arc;

use vigil_proto::LoginToken;

use crate::nonces::{NonceCache, NonceCheck};
use crate::registry::{DeviceEntry, DeviceRegistry};

/// Why a login was refused; the label is the `reason` in metrics and in `rejections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginRefusal {
    MissingCredentials,
    IdentityMismatch,
    UnknownDevice,
    MalformedToken,
    Expired,
    LifetimeTooLong,
    BadSignature,
    NonceReused,
    Quarantined,
    /// The peer failed too many logins recently; its logins are refused unchecked.
    Throttled,
    /// The server is shedding load (storage cannot keep up); answered "server unavailable".
    Overloaded,
    ServerError,
}

impl LoginRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            LoginRefusal::MissingCredentials => "login_missing_credentials",
            LoginRefusal::IdentityMismatch => "login_identity_mismatch",
            LoginRefusal::UnknownDevice => "login_unknown_device",
            LoginRefusal::MalformedToken => "login_malformed_token",
            LoginRefusal::Expired => "login_token_expired",
            LoginRefusal::LifetimeTooLong => "login_token_lifetime_too_long",
            LoginRefusal::BadSignature => "login_bad_signature",
            LoginRefusal::NonceReused => "login_nonce_reused",
            LoginRefusal::Quarantined => "login_device_quarantined",
            LoginRefusal::Throttled => "login_peer_throttled",
            LoginRefusal::Overloaded => "login_server_overloaded",
            LoginRefusal::ServerError => "login_server_error",
        }
    }

    pub const ALL: [LoginRefusal; 12] = [
        LoginRefusal::MissingCredentials,
        LoginRefusal::IdentityMismatch,
        LoginRefusal::UnknownDevice,
        LoginRefusal::MalformedToken,
        LoginRefusal::Expired,
        LoginRefusal::LifetimeTooLong,
        LoginRefusal::BadSignature,
        LoginRefusal::NonceReused,
        LoginRefusal::Quarantined,
        LoginRefusal::Throttled,
        LoginRefusal::Overloaded,
        LoginRefusal::ServerError,
    ];
}

/// Checks CONNECT credentials against the registry and the nonce cache.
#[derive(Debug)]
pub struct LoginChecker {
    registry: Arc<DeviceRegistry>,
    nonces: NonceCache,
    max_token_lifetime_s: u64,
}

impl LoginChecker {
    pub fn new(
        registry: Arc<DeviceRegistry>,
        nonces: NonceCache,
        max_token_lifetime_s: u64,
    ) -> Self {
        Self {
            registry,
            nonces,
            max_token_lifetime_s,
        }
    }

    /// Admits `client_id` when username and token match the contract, at time `now_unix_s`.
    pub fn check(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
        now_unix_s: u64,
    ) -> Result<Arc<DeviceEntry>, LoginRefusal> {
        let (Some(username), Some(password)) = (username, password) else {
            return Err(LoginRefusal::MissingCredentials);
        };
        if username != client_id {
            return Err(LoginRefusal::IdentityMismatch);
        }
        let device = self
            .registry
            .get(client_id)
            .ok_or(LoginRefusal::UnknownDevice)?;

        let token = std::str::from_utf8(password).map_err(|_| LoginRefusal::MalformedToken)?;
        let token = LoginToken::parse(token).map_err(|_| LoginRefusal::MalformedToken)?;
        if token.expires_unix_s < now_unix_s {
            return Err(LoginRefusal::Expired);
        }
        if token.expires_unix_s - now_unix_s > self.max_token_lifetime_s {
            return Err(LoginRefusal::LifetimeTooLong);
        }
        token
            .verify(client_id, &device.key)
            .map_err(|_| LoginRefusal::BadSignature)?;

        if device.is_quarantined() {
            return Err(LoginRefusal::Quarantined);
        }
        match self
            .nonces
            .check_and_insert(token.nonce, token.expires_unix_s, now_unix_s)
        {
            Ok(NonceCheck::Fresh) => Ok(device),
            Ok(NonceCheck::Reused) => Err(LoginRefusal::NonceReused),
            Err(error) => {
                tracing::error!(%error, "nonce cache write failed; refusing logins");
                Err(LoginRefusal::ServerError)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Enrollment;
    use ed25519_dalek::SigningKey;
    use vigil_proto::make_login_token;

    const NOW: u64 = 1_800_000_000;

    fn checker(dir: &std::path::Path) -> (LoginChecker, SigningKey) {
        let key = SigningKey::from_bytes(&[4; 32]);
        let registry = Arc::new(DeviceRegistry::open(dir).unwrap());
        registry
            .enroll(&[Enrollment {
                device_id: "dev-1".into(),
                public_key_hex: hex::encode(key.verifying_key().as_bytes()),
                class: None,
            }])
            .unwrap();
        let nonces = NonceCache::open(dir, NOW).unwrap();
        (LoginChecker::new(registry, nonces, 600), key)
    }

    fn login(checker: &LoginChecker, id: &str, token: &str) -> Result<(), LoginRefusal> {
        checker
            .check(id, Some(id), Some(token.as_bytes()), NOW)
            .map(|_| ())
    }

    #[test]
    fn each_refusal_has_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (checker, key) = checker(dir.path());
        let token = make_login_token(&key, "dev-1", NOW + 60, [1; 16]);

        assert_eq!(login(&checker, "dev-1", &token), Ok(()));
        assert_eq!(
            login(&checker, "dev-1", &token),
            Err(LoginRefusal::NonceReused)
        );

        let expired = make_login_token(&key, "dev-1", NOW - 1, [2; 16]);
        assert_eq!(
            login(&checker, "dev-1", &expired),
            Err(LoginRefusal::Expired)
        );

        let too_long = make_login_token(&key, "dev-1", NOW + 6000, [3; 16]);
        assert_eq!(
            login(&checker, "dev-1", &too_long),
            Err(LoginRefusal::LifetimeTooLong)
        );

        let other_key = SigningKey::from_bytes(&[8; 32]);
        let forged = make_login_token(&other_key, "dev-1", NOW + 60, [4; 16]);
        assert_eq!(
            login(&checker, "dev-1", &forged),
            Err(LoginRefusal::BadSignature)
        );

        assert_eq!(
            login(&checker, "dev-2", &token),
            Err(LoginRefusal::UnknownDevice)
        );
        assert_eq!(
            login(&checker, "dev-1", "v1.x"),
            Err(LoginRefusal::MalformedToken)
        );
        assert_eq!(
            checker
                .check("dev-1", Some("dev-2"), Some(token.as_bytes()), NOW)
                .map(|_| ()),
            Err(LoginRefusal::IdentityMismatch)
        );
        assert_eq!(
            checker.check("dev-1", None, None, NOW).map(|_| ()),
            Err(LoginRefusal::MissingCredentials)
        );
    }

    #[test]
    fn a_forged_token_does_not_burn_the_nonce() {
        let dir = tempfile::tempdir().unwrap();
        let (checker, key) = checker(dir.path());
        let forged = make_login_token(
            &SigningKey::from_bytes(&[8; 32]),
            "dev-1",
            NOW + 60,
            [5; 16],
        );
        assert_eq!(
            login(&checker, "dev-1", &forged),
            Err(LoginRefusal::BadSignature)
        );
        let genuine = make_login_token(&key, "dev-1", NOW + 60, [5; 16]);
        assert_eq!(login(&checker, "dev-1", &genuine), Ok(()));
    }

    #[test]
    fn the_contract_vector_token_is_accepted_before_it_expires() {
        let vectors: serde_json::Value =
            serde_json::from_str(include_str!("../../proto/tests/contract-vectors.json")).unwrap();
        let device_id = vectors["device_id"].as_str().unwrap();
        let token = vectors["login"]["token"].as_str().unwrap();
        let expires = vectors["login"]["expires"].as_u64().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(DeviceRegistry::open(dir.path()).unwrap());
        registry
            .enroll(&[Enrollment {
                device_id: device_id.into(),
                public_key_hex: vectors["public_key_hex"].as_str().unwrap().into(),
                class: None,
            }])
            .unwrap();
        let checker = LoginChecker::new(registry, NonceCache::open(dir.path(), 0).unwrap(), 600);

        let before = expires - 300;
        let login = |now| checker.check(device_id, Some(device_id), Some(token.as_bytes()), now);
        assert_eq!(login(expires + 1).map(|_| ()), Err(LoginRefusal::Expired));
        assert!(login(before).is_ok());
        assert_eq!(login(before).map(|_| ()), Err(LoginRefusal::NonceReused));
    }
}
