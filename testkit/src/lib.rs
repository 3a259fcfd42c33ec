//! Test support shared by Wharf's suites: real sample components and real NATS servers.
//!
//! Nothing here mocks a part of Wharf: `samples` builds the components in
//! `sample-services/` with cargo, and `nats` starts a real `nats-server`.

pub mod nats;
pub mod process;
pub mod samples;
pub mod wharf;
