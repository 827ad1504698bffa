//! Arbitrary bytes through the stack-file loader and validator, the way
//! `stack` reads a file (`model::load_bytes`: size, encoding, YAML within
//! bounds, decoding, validation). A crash, a hang or memory past the limit
//! is a bug; so is a refusal without a located diagnostic.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use stack_model::model::{load_bytes, LoadError};

fuzz_target!(|bytes: &[u8]| {
    match load_bytes(Path::new("fuzz.yaml"), bytes) {
        Ok(_) => {}
        Err(LoadError::Invalid { diagnostics, .. }) => {
            assert!(!diagnostics.is_empty(), "refused without a diagnostic");
            for d in &diagnostics {
                // Rendered as the user sees it.
                let shown = d.to_string();
                assert!(d.line >= 1 && d.column >= 1, "unlocated: {shown}");
            }
        }
        Err(err) => panic!("bytes in memory cannot fail to be read: {err}"),
    }
});
