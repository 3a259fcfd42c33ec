//! Wharf's wire contract: ids, units, service specs, wire messages, and the
//! names of every subject and bucket. Pure data and validation; no I/O.

pub mod digest;
pub mod units;

pub use digest::{Digest, DigestError};
pub use units::{ByteSize, ByteSizeError};
