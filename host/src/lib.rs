//! Wharf's worker host: runs `wasi:http` components in wasmtime under hard limits.
//!
//! The pieces, each in its own module:
//! - [`runtime`]: the wasmtime engine (pooling allocator, fuel, epochs), the
//!   on-disk compile cache, and loading a component with its checks.
//! - [`code_cache`]: compiled code in memory, an LRU within a byte budget,
//!   with one load per digest however many ask at once.
//! - [`workload`]: one loaded component with its limits; serves each request
//!   from a fresh instance and turns every failure into a clear response.
//! - [`cpu`]: foreground/background CPU tiers, fair between namespaces.
//! - [`limits`]: per-instance memory cap and per-request budgets.
//! - [`logs`]: a component's stdout/stderr captured as tagged log lines.
//! - [`messaging`]: `wasmcloud:messaging` for components: publish and
//!   request within the namespace; the handler export triggers call.
//! - [`egress`]: the outbound-request policy (allow-list) for `wasi:http`.
//! - [`metrics`]: Prometheus metrics for every workload on the host.
//! - [`agent`]: keeps the host running what its assignment says; heartbeats.
//! - [`routes`]: the ingress route table (host name + path prefix).
//! - [`ingress`]: the HTTP server that hands requests to a [`ingress::Handler`].
//! - [`tls`]: certificate and key loading and the handshake, for the ingress
//!   and the control plane's API alike.

pub mod admin;
pub mod agent;
pub mod body_stream;
pub mod code_cache;
pub mod cpu;
pub mod egress;
pub mod ingress;
pub mod keyvalue;
pub mod limits;
pub mod messaging;
pub mod logs;
pub mod metrics;
mod outbound;
pub mod remote;
pub mod routes;
pub mod runtime;
pub mod tls;
pub mod trace;
pub mod workload;

mod instance;

pub use limits::WorkloadLimits;
pub use runtime::{LoadError, LoadedComponent, Runtime, RuntimeConfig, RuntimeError};
pub use workload::{Outcome, Workload, WorkloadSpec};
