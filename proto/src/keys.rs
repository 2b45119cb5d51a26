//! Public-key hygiene: which Ed25519 keys and signature parts the server refuses outright.
//!
//! ed25519-dalek's batch verification skips the small-order and subgroup checks of
//! `verify_strict`. Weak keys are therefore refused at enrollment, and signatures whose `R` is a
//! small-order point (or not canonically encoded) are refused before batching.

use std::sync::OnceLock;

use curve25519_dalek::constants::EIGHT_TORSION;
use curve25519_dalek::edwards::CompressedEdwardsY;
use ed25519_dalek::VerifyingKey;

/// Why a public key cannot be enrolled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WeakKey {
    #[error("public key is not 32 bytes of hex")]
    Malformed,
    #[error("public key is not a valid curve point")]
    NotOnCurve,
    #[error("public key has small order")]
    SmallOrder,
    #[error("public key lies outside the prime-order subgroup")]
    MixedOrder,
    #[error("public key is not canonically encoded")]
    NonCanonical,
}

/// Parses a hex public key and refuses keys with which anyone could forge signatures.
pub fn strong_public_key(public_key_hex: &str) -> Result<VerifyingKey, WeakKey> {
    let bytes = decode_hex32(public_key_hex).ok_or(WeakKey::Malformed)?;
    if is_non_canonical_y(&bytes) {
        return Err(WeakKey::NonCanonical);
    }

    let point = CompressedEdwardsY(bytes)
        .decompress()
        .ok_or(WeakKey::NotOnCurve)?;
    if point.compress().to_bytes() != bytes {
        return Err(WeakKey::NonCanonical);
    }
    if point.is_small_order() {
        return Err(WeakKey::SmallOrder);
    }
    if !point.is_torsion_free() {
        return Err(WeakKey::MixedOrder);
    }

    VerifyingKey::from_bytes(&bytes).map_err(|_| WeakKey::NotOnCurve)
}

/// True when the `R` half of a signature is a small-order point or a non-canonical encoding.
///
/// A cheap byte comparison: the eight small-order points have fixed canonical encodings, and
/// any other encoding of them has `y >= p`, which an honest signer never produces.
pub fn has_weak_r(signature: &[u8; 64]) -> bool {
    let r: &[u8; 32] = signature[..32].try_into().unwrap_or(&[0; 32]);
    if is_non_canonical_y(r) {
        return true;
    }

    let mut y_only = *r;
    y_only[31] &= 0x7f;
    small_order_encodings().iter().any(|known| {
        let mut known_y = *known;
        known_y[31] &= 0x7f;
        known_y == y_only
    })
}

fn small_order_encodings() -> &'static [[u8; 32]; 8] {
    static ENCODINGS: OnceLock<[[u8; 32]; 8]> = OnceLock::new();
    ENCODINGS.get_or_init(|| EIGHT_TORSION.map(|point| point.compress().to_bytes()))
}

/// `y >= p = 2^255 - 19`, ignoring the sign bit.
fn is_non_canonical_y(bytes: &[u8; 32]) -> bool {
    bytes[31] & 0x7f == 0x7f && bytes[1..31].iter().all(|&b| b == 0xff) && bytes[0] >= 0xed
}

fn decode_hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
        let high = (chunk[0] as char).to_digit(16)?;
        let low = (chunk[1] as char).to_digit(16)?;
        out[i] = (high * 16 + low) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    #[test]
    fn an_ordinary_key_is_accepted() {
        let key = SigningKey::from_bytes(&[7; 32]).verifying_key();
        let hex = hex::encode(key.as_bytes());
        assert_eq!(strong_public_key(&hex).unwrap(), key);
    }

    #[test]
    fn small_order_keys_are_refused() {
        for point in EIGHT_TORSION {
            let hex = hex::encode(point.compress().to_bytes());
            assert!(strong_public_key(&hex).is_err(), "{hex} accepted");
        }
    }

    #[test]
    fn mixed_order_key_is_refused() {
        let honest = SigningKey::from_bytes(&[9; 32])
            .verifying_key()
            .to_edwards();
        let mixed = honest + EIGHT_TORSION[1];
        let hex = hex::encode(mixed.compress().to_bytes());
        assert_eq!(strong_public_key(&hex), Err(WeakKey::MixedOrder));
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert_eq!(strong_public_key("abcd"), Err(WeakKey::Malformed));
        assert_eq!(strong_public_key(&"zz".repeat(32)), Err(WeakKey::Malformed));
    }

    #[test]
    fn small_order_r_is_detected() {
        for point in EIGHT_TORSION {
            let mut signature = [0u8; 64];
            signature[..32].copy_from_slice(&point.compress().to_bytes());
            assert!(has_weak_r(&signature));
        }
        let honest = SigningKey::from_bytes(&[3; 32]).sign_prehashed_free(b"x");
        assert!(!has_weak_r(&honest));
    }

    trait SignFree {
        fn sign_prehashed_free(&self, message: &[u8]) -> [u8; 64];
    }

    impl SignFree for SigningKey {
        fn sign_prehashed_free(&self, message: &[u8]) -> [u8; 64] {
            use ed25519_dalek::Signer;
            self.sign(message).to_bytes()
        }
    }
}
