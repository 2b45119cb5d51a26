//! The password of an MQTT CONNECT: a login token must parse only in its one canonical
//! spelling, and checking its signature must refuse, never panic.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use vigil_proto::LoginToken;

const DEVICE_ID: &str = "icu-bed-07-spo2";

fuzz_target!(|password: &[u8]| {
    let Ok(text) = std::str::from_utf8(password) else {
        return;
    };
    let Ok(token) = LoginToken::parse(text) else {
        return;
    };

    // Canonical: the parsed values spell the input back exactly.
    let spelled = format!(
        "v1.{}.{}.{}",
        token.expires_unix_s,
        URL_SAFE_NO_PAD.encode(token.nonce),
        URL_SAFE_NO_PAD.encode(token.signature.to_bytes())
    );
    assert_eq!(spelled, text);

    let key = SigningKey::from_bytes(&[7; 32]).verifying_key();
    // A token the fuzzer made cannot carry this key's signature.
    assert!(token.verify(DEVICE_ID, &key).is_err());
});
