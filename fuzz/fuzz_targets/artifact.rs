//! Fuzzes the artifact validator: `Runtime::load` must accept or refuse any
//! bytes with a `LoadError`, never panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use wharf_host::{Runtime, RuntimeConfig};
use wharf_proto::ByteSize;

/// One engine for the whole run, as a host has: creating an engine (and its
/// pooling allocator and epoch ticker) per input would dominate the run.
fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        Runtime::new(RuntimeConfig { max_instances: 1, max_instance_memory: ByteSize::mib(16), cache_dir: None, ..RuntimeConfig::default() })
            .expect("the fuzzing engine must start")
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = runtime().load(data, None);
});
