//! The device-side code reproduces the published contract vectors byte for byte.
#![allow(clippy::unwrap_used)]

use ed25519_dalek::SigningKey;
use prost::Message;
use serde_json::Value;
use vigil_proto::v1::{Measurement, Reading, SignedReading};
use vigil_proto::{LoginToken, make_login_token, readings_topic, sign_reading, strong_public_key};

fn vectors() -> Value {
    let text = include_str!("contract-vectors.json");
    serde_json::from_str(text).unwrap()
}

fn key(vectors: &Value) -> SigningKey {
    let seed = hex::decode(vectors["secret_key_seed_hex"].as_str().unwrap()).unwrap();
    SigningKey::from_bytes(&seed.try_into().unwrap())
}

#[test]
fn public_key_matches_and_is_strong() {
    let vectors = vectors();
    let key = key(&vectors);
    let public_hex = vectors["public_key_hex"].as_str().unwrap();
    assert_eq!(hex::encode(key.verifying_key().as_bytes()), public_hex);
    assert_eq!(strong_public_key(public_hex).unwrap(), key.verifying_key());
}

#[test]
fn login_token_is_reproduced_and_verifies() {
    let vectors = vectors();
    let key = key(&vectors);
    let device_id = vectors["device_id"].as_str().unwrap();
    let login = &vectors["login"];
    let nonce = hex::decode(login["nonce_bytes_hex"].as_str().unwrap()).unwrap();
    let expires = login["expires"].as_u64().unwrap();

    let token = make_login_token(&key, device_id, expires, nonce.try_into().unwrap());
    assert_eq!(token, login["token"].as_str().unwrap());

    let parsed = LoginToken::parse(&token).unwrap();
    assert_eq!(parsed.expires_unix_s, expires);
    parsed.verify(device_id, &key.verifying_key()).unwrap();
}

#[test]
fn signed_reading_is_reproduced_byte_for_byte() {
    let vectors = vectors();
    let key = key(&vectors);
    let expected = &vectors["reading"];
    let measurements = expected["measurements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| Measurement {
            metric: pair[0].as_str().unwrap().to_owned(),
            value: pair[1].as_f64().unwrap(),
        })
        .collect();
    let reading = Reading {
        device_id: vectors["device_id"].as_str().unwrap().to_owned(),
        seq: expected["seq"].as_u64().unwrap(),
        sampled_at_ms: expected["sampled_at_ms"].as_i64().unwrap(),
        measurements,
    };

    let signed = sign_reading(&key, &reading);
    assert_eq!(
        hex::encode(&signed.reading),
        expected["reading_bytes_hex"].as_str().unwrap()
    );
    assert_eq!(
        hex::encode(&signed.signature),
        expected["signature_hex"].as_str().unwrap()
    );
    let payload = signed.encode_to_vec();
    assert_eq!(
        hex::encode(&payload),
        expected["signed_reading_payload_hex"].as_str().unwrap()
    );
    assert_eq!(
        readings_topic(&reading.device_id),
        expected["topic"].as_str().unwrap()
    );

    let decoded = SignedReading::decode(payload.as_slice()).unwrap();
    assert_eq!(
        Reading::decode(decoded.reading.as_slice()).unwrap(),
        reading
    );
}
