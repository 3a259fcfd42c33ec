//! Test support shared by Wharf's suites: real sample components and real NATS servers.
//!
//! Nothing here mocks a part of Wharf: `samples` builds the components in
//! `sample-services/` with cargo, `nats` starts a real `nats-server`,
//! `registry` a real OCI registry, and `tls` makes real certificates.

pub mod cluster;
pub mod load;
pub mod nats;
pub mod process;
pub mod registry;
pub mod samples;
pub mod tls;
pub mod wharf;
