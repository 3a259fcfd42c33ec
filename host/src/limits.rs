//! Per-instance memory caps and per-request budgets: wasm's stand-in for cgroups.

use std::time::Duration;
use wharf_proto::ByteSize;

/// The limits one workload runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadLimits {
    /// Cap on the linear memory (all memories together) of one instance.
    pub memory: ByteSize,
    /// Fuel (roughly, wasm instructions) one request may burn; `None` is unmetered.
    pub fuel: Option<u64>,
    /// Wall-clock deadline for one request, from admission to the guest's return.
    pub timeout: Duration,
    /// Instances of this workload that may run at once.
    pub concurrency: u32,
    /// How long a request may wait for a free instance slot before it gets 503.
    pub queue_timeout: Duration,
}

impl Default for WorkloadLimits {
    fn default() -> Self {
        WorkloadLimits {
            memory: ByteSize::mib(64),
            fuel: Some(DEFAULT_FUEL),
            timeout: Duration::from_secs(5),
            concurrency: 16,
            queue_timeout: Duration::from_secs(2),
        }
    }
}

/// Default fuel per request: a few hundred milliseconds of CPU for typical code.
pub const DEFAULT_FUEL: u64 = 1_000_000_000;

/// Enforces the memory cap of one instance and remembers whether it bit, so a
/// later trap (Rust aborts when an allocation fails) is reported as what it
/// really was: the memory cap, not a bug in the component.
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    cap: usize,
    /// Linear memory currently held by the instance, over all its memories.
    in_use: usize,
    /// The most the instance ever held; reported as a metric.
    pub(crate) peak: usize,
    /// Set when a grow was refused because of the cap.
    pub(crate) denied: bool,
}

impl MemoryLimiter {
    pub(crate) fn new(cap: ByteSize) -> Self {
        MemoryLimiter {
            cap: usize::try_from(cap.bytes()).unwrap_or(usize::MAX),
            in_use: 0,
            peak: 0,
            denied: false,
        }
    }
}

/// Tables are bounded by the pooling allocator; this only stops runaway growth.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let grown = self.in_use.saturating_add(desired.saturating_sub(current));
        if grown > self.cap {
            self.denied = true;
            return Ok(false);
        }
        self.in_use = grown;
        self.peak = self.peak.max(grown);
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    #[test]
    fn limiter_counts_all_memories_against_one_cap() {
        let mut limiter = MemoryLimiter::new(ByteSize::mib(2));
        assert!(limiter.memory_growing(0, 1 << 20, None).expect("no error"));
        assert!(limiter.memory_growing(0, 1 << 19, None).expect("no error"));
        assert!(!limiter.denied);
        // A second memory pushing the total past the cap is refused and remembered.
        assert!(!limiter.memory_growing(1 << 19, 3 << 19, None).expect("no error"));
        assert!(limiter.denied);
        assert_eq!(limiter.peak, (1 << 20) + (1 << 19));
    }
}
