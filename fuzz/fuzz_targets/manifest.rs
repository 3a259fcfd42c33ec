//! Fuzzes manifest parsing and validation: any text, in every format, must
//! give services or a `ManifestError`, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf_proto::{ManifestFormat, parse_manifest};

fuzz_target!(|data: &[u8]| {
    // Manifests are read as text; bytes that are not UTF-8 never reach the parser.
    let Ok(text) = std::str::from_utf8(data) else { return };
    for format in [ManifestFormat::Yaml, ManifestFormat::Toml, ManifestFormat::Json] {
        let _ = parse_manifest(text, format);
    }
});
