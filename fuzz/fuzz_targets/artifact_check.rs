//! Fuzzes the checks an upload goes through before anything is compiled
//! (`runtime::check_component`: magic, validation, imports, exports): much
//! faster per input than `artifact`, which compiles, so it reaches deeper
//! into the parser in the same time. Any bytes must get `Ok` or a
//! `LoadError`, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wharf_host::runtime::check_component(data);
});
