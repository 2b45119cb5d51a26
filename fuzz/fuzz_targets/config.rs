//! The whole configuration file (every section: listeners, TLS paths, limits, storage,
//! detection) through the TOML parser and the checks of its shape: any text is a
//! configuration or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_config::VigilConfig;

fuzz_target!(|text: &[u8]| {
    if let Ok(text) = std::str::from_utf8(text) {
        // The outcome does not matter here, only that there is one.
        let _ = VigilConfig::parse(text);
    }
});
