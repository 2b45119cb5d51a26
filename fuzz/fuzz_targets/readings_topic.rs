//! The topic of a PUBLISH: only `vigil/v1/devices/<device_id>/readings` with a device id of
//! the contract's alphabet names a device.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_proto::contract::is_valid_device_id;
use vigil_proto::{device_id_from_readings_topic, readings_topic};

fuzz_target!(|topic: &[u8]| {
    let Ok(topic) = std::str::from_utf8(topic) else {
        return;
    };
    if let Some(device_id) = device_id_from_readings_topic(topic) {
        assert!(is_valid_device_id(device_id));
        assert_eq!(readings_topic(device_id), topic);
    }
});
