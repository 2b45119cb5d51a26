//! Device identity, login tokens, reading signatures and topics of the `v1` contract.
//!
//! A login token is `v1.<expires>.<nonce>.<signature>`: `expires` in canonical decimal Unix
//! seconds, `nonce` 16 bytes and `signature` 64 bytes, both unpadded base64url. The signature
//! covers `"vigil-login-v1\n" + device_id + "\n" + expires + "\n" + nonce`, with every field as
//! written in the token. Parsing is strict: any other spelling of the same values is refused, so
//! that one token has exactly one encoding and the nonce cache cannot be sidestepped.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use prost::Message;

use crate::v1::{Reading, SignedReading};

/// Domain separation for login tokens.
pub const LOGIN_CONTEXT: &str = "vigil-login-v1\n";
/// Domain separation for readings: the signature covers this prefix and the `Reading` bytes.
pub const READING_CONTEXT: &[u8] = b"vigil-reading-v1\n";
/// Longest device id the contract allows.
pub const MAX_DEVICE_ID_LEN: usize = 64;

const TOPIC_PREFIX: &str = "vigil/v1/devices/";
const NONCE_LEN: usize = 16;
const NONCE_TEXT_LEN: usize = 22;
const SIGNATURE_TEXT_LEN: usize = 86;

/// Why a device id, token or payload does not follow the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    #[error("device id must be 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    InvalidDeviceId,
    #[error("login token is malformed: {0}")]
    MalformedToken(&'static str),
    #[error("login token signature does not verify")]
    BadTokenSignature,
}

/// A device id that follows the contract's alphabet and length.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    pub fn parse(text: &str) -> Result<Self, ContractError> {
        if is_valid_device_id(text) {
            Ok(Self(text.to_owned()))
        } else {
            Err(ContractError::InvalidDeviceId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// True when `text` is 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
pub fn is_valid_device_id(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_DEVICE_ID_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The topic a device publishes its readings to.
pub fn readings_topic(device_id: &str) -> String {
    format!("{TOPIC_PREFIX}{device_id}/readings")
}

/// The topic a device may subscribe to for notices from the server.
pub fn notices_topic(device_id: &str) -> String {
    format!("{TOPIC_PREFIX}{device_id}/notices")
}

/// The device id named by a readings topic, if the topic has exactly that shape.
pub fn device_id_from_readings_topic(topic: &str) -> Option<&str> {
    let id = topic
        .strip_prefix(TOPIC_PREFIX)?
        .strip_suffix("/readings")?;
    is_valid_device_id(id).then_some(id)
}

/// Builds a login token for `device_id` with the given expiry and nonce.
pub fn make_login_token(
    key: &SigningKey,
    device_id: &str,
    expires_unix_s: u64,
    nonce: [u8; NONCE_LEN],
) -> String {
    let expires = expires_unix_s.to_string();
    let nonce = URL_SAFE_NO_PAD.encode(nonce);
    let signature = key.sign(login_signed_text(device_id, &expires, &nonce).as_bytes());
    format!(
        "v1.{expires}.{nonce}.{}",
        URL_SAFE_NO_PAD.encode(signature.to_bytes())
    )
}

/// Builds a login token with a random nonce, valid for `lifetime_s` seconds from `now_unix_s`.
pub fn fresh_login_token(
    key: &SigningKey,
    device_id: &str,
    now_unix_s: u64,
    lifetime_s: u64,
) -> String {
    let nonce: [u8; NONCE_LEN] = rand::random();
    make_login_token(key, device_id, now_unix_s + lifetime_s, nonce)
}

fn login_signed_text(device_id: &str, expires: &str, nonce: &str) -> String {
    format!("{LOGIN_CONTEXT}{device_id}\n{expires}\n{nonce}")
}

/// A login token whose encoding has been checked, not yet its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginToken<'a> {
    expires_text: &'a str,
    nonce_text: &'a str,
    pub expires_unix_s: u64,
    pub nonce: [u8; NONCE_LEN],
    pub signature: Signature,
}

impl<'a> LoginToken<'a> {
    /// Parses a token, refusing every non-canonical spelling.
    pub fn parse(token: &'a str) -> Result<Self, ContractError> {
        let mut parts = token.split('.');
        let (Some(version), Some(expires_text), Some(nonce_text), Some(signature_text), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(ContractError::MalformedToken(
                "expected four dot-separated fields",
            ));
        };
        if version != "v1" {
            return Err(ContractError::MalformedToken("unknown version"));
        }

        let expires_unix_s = parse_canonical_decimal(expires_text).ok_or(
            ContractError::MalformedToken("expiry is not canonical decimal"),
        )?;
        if nonce_text.len() != NONCE_TEXT_LEN {
            return Err(ContractError::MalformedToken("nonce is not 22 characters"));
        }
        let nonce: [u8; NONCE_LEN] = decode_canonical(nonce_text).ok_or(
            ContractError::MalformedToken("nonce is not canonical base64url"),
        )?;
        if signature_text.len() != SIGNATURE_TEXT_LEN {
            return Err(ContractError::MalformedToken(
                "signature is not 86 characters",
            ));
        }
        let signature: [u8; 64] = decode_canonical(signature_text).ok_or(
            ContractError::MalformedToken("signature is not canonical base64url"),
        )?;

        Ok(Self {
            expires_text,
            nonce_text,
            expires_unix_s,
            nonce,
            signature: Signature::from_bytes(&signature),
        })
    }

    /// Checks the signature against the device's key with `verify_strict`.
    pub fn verify(&self, device_id: &str, key: &VerifyingKey) -> Result<(), ContractError> {
        let text = login_signed_text(device_id, self.expires_text, self.nonce_text);
        key.verify_strict(text.as_bytes(), &self.signature)
            .map_err(|_| ContractError::BadTokenSignature)
    }
}

fn parse_canonical_decimal(text: &str) -> Option<u64> {
    let canonical = !text.is_empty()
        && text.len() <= 20
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if canonical { text.parse().ok() } else { None }
}

/// Decodes unpadded base64url and refuses encodings with stray low bits set, which would let
/// two different strings stand for the same bytes.
fn decode_canonical<const N: usize>(text: &str) -> Option<[u8; N]> {
    let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
    let array: [u8; N] = bytes.try_into().ok()?;
    (URL_SAFE_NO_PAD.encode(array) == text).then_some(array)
}

/// The exact bytes the reading signature covers.
pub fn reading_signing_message(reading_bytes: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(READING_CONTEXT.len() + reading_bytes.len());
    message.extend_from_slice(READING_CONTEXT);
    message.extend_from_slice(reading_bytes);
    message
}

/// Encodes and signs a reading as a device does.
pub fn sign_reading(key: &SigningKey, reading: &Reading) -> SignedReading {
    let reading_bytes = reading.encode_to_vec();
    let signature = key.sign(&reading_signing_message(&reading_bytes));
    SignedReading {
        reading: reading_bytes,
        signature: signature.to_bytes().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[5; 32])
    }

    #[test]
    fn device_ids_follow_the_alphabet() {
        assert!(is_valid_device_id("icu-bed-07.spo2_a"));
        assert!(is_valid_device_id(&"a".repeat(64)));
        assert!(!is_valid_device_id(""));
        assert!(!is_valid_device_id(&"a".repeat(65)));
        assert!(!is_valid_device_id("a/b"));
        assert!(!is_valid_device_id("a+"));
        assert!(!is_valid_device_id("é"));
    }

    #[test]
    fn readings_topic_round_trips() {
        assert_eq!(
            device_id_from_readings_topic(&readings_topic("d-1")),
            Some("d-1")
        );
        assert_eq!(
            device_id_from_readings_topic("vigil/v1/devices/+/readings"),
            None
        );
        assert_eq!(
            device_id_from_readings_topic("vigil/v1/devices/a/b/readings"),
            None
        );
        assert_eq!(
            device_id_from_readings_topic("vigil/v1/devices/d-1/notices"),
            None
        );
    }

    #[test]
    fn a_token_verifies_for_its_device_only() {
        let token = make_login_token(&key(), "dev-1", 1_800_000_000, [1; 16]);
        let parsed = LoginToken::parse(&token).unwrap();
        assert_eq!(parsed.expires_unix_s, 1_800_000_000);
        assert!(parsed.verify("dev-1", &key().verifying_key()).is_ok());
        assert!(parsed.verify("dev-2", &key().verifying_key()).is_err());
    }

    #[test]
    fn non_canonical_tokens_are_refused() {
        let token = make_login_token(&key(), "dev-1", 1_800_000_000, [1; 16]);
        let fields: Vec<&str> = token.split('.').collect();

        let leading_zero = format!("v1.0{}.{}.{}", fields[1], fields[2], fields[3]);
        assert!(LoginToken::parse(&leading_zero).is_err());

        let padded = format!("v1.{}.{}==.{}", fields[1], fields[2], fields[3]);
        assert!(LoginToken::parse(&padded).is_err());

        // The last nonce character carries 2 unused bits; flipping them must be refused.
        let mut nonce = fields[2].to_owned();
        let last = nonce.pop().unwrap();
        let twin = if last == 'Q' { 'R' } else { 'B' };
        let stray_bits = format!("v1.{}.{}{}.{}", fields[1], nonce, twin, fields[3]);
        assert!(LoginToken::parse(&stray_bits).is_err());

        assert!(LoginToken::parse(&format!("{token}.")).is_err());
        assert!(LoginToken::parse(&token.replacen("v1", "v2", 1)).is_err());
        assert!(LoginToken::parse("").is_err());
    }

    #[test]
    fn signed_reading_verifies() {
        let reading = Reading {
            device_id: "dev-1".into(),
            seq: 1,
            sampled_at_ms: 1,
            measurements: vec![],
        };
        let signed = sign_reading(&key(), &reading);
        let signature = Signature::from_slice(&signed.signature).unwrap();
        let message = reading_signing_message(&signed.reading);
        assert!(
            key()
                .verifying_key()
                .verify_strict(&message, &signature)
                .is_ok()
        );
    }
}
