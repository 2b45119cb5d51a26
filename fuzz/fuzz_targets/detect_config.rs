//! The `[detect]` section of the configuration file (policies per device class, risk
//! thresholds, fleet model) through the TOML parser: any text is a configuration or an error,
//! never a panic. The rest of the file's types live in crates that link the SQL engine and are
//! not fuzzed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_detect::DetectConfig;

fuzz_target!(|text: &[u8]| {
    if let Ok(text) = std::str::from_utf8(text) {
        // The outcome does not matter here, only that there is one.
        let _ = toml::from_str::<DetectConfig>(text);
    }
});
