//! Fuzzes decoding of everything that arrives over the bus: the JSON wire
//! messages, a service spec and its validation, and the HTTP request framing
//! used between hosts. Each must answer with a value or an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf_proto::{Assignment, Heartbeat, ServiceSpec, StoredService};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<Heartbeat>(data);
    let _ = serde_json::from_slice::<Assignment>(data);
    if let Ok(stored) = serde_json::from_slice::<StoredService>(data) {
        let _ = stored.spec.validate();
    }
    if let Ok(spec) = serde_json::from_slice::<ServiceSpec>(data) {
        let _ = spec.validate();
    }
    let _ = wharf_host::remote::decode_request_bytes(&bytes::Bytes::copy_from_slice(data));
});
