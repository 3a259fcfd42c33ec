//! Per-instance memory caps and per-request budgets: wasm's stand-in for cgroups.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// The memory placement reserved for the replica (its request); `None`:
    /// `memory x concurrency`, all it may use.
    pub memory_request: Option<ByteSize>,
    /// The host's instance slots placement reserved for the replica.
    pub instances_request: u32,
}

impl WorkloadLimits {
    /// The memory the replica reserves on its host.
    pub fn memory_reserved(&self) -> ByteSize {
        self.memory_request.unwrap_or(ByteSize(self.memory.bytes().saturating_mul(u64::from(self.concurrency))))
    }
}

impl Default for WorkloadLimits {
    fn default() -> Self {
        WorkloadLimits {
            memory: ByteSize::mib(64),
            fuel: Some(DEFAULT_FUEL),
            timeout: Duration::from_secs(5),
            concurrency: 16,
            queue_timeout: Duration::from_secs(2),
            memory_request: None,
            instances_request: 1,
        }
    }
}

/// Default fuel per request: a few hundred milliseconds of CPU for typical code.
pub const DEFAULT_FUEL: u64 = 1_000_000_000;

/// The linear memory all instances on a host hold together, against the
/// host's `--memory`: the safety net under overcommitted memory requests.
/// Placement reserves requests, which are what replicas usually use, so
/// instances may together try to grow past what the host has; past the
/// budget a grow is refused like one past an instance's cap, and the
/// request fails with a clean `host_memory_full` (503), rather than the
/// kernel's out-of-memory killer ending the host.
#[derive(Debug)]
pub struct HostMemory {
    budget: u64,
    in_use: AtomicU64,
}

impl HostMemory {
    /// A budget of `budget` bytes of linear memory, over all instances.
    pub fn new(budget: ByteSize) -> Arc<Self> {
        Arc::new(HostMemory { budget: budget.bytes(), in_use: AtomicU64::new(0) })
    }

    /// The budget.
    pub fn budget(&self) -> ByteSize {
        ByteSize(self.budget)
    }

    /// Linear memory instances hold right now.
    pub fn in_use(&self) -> ByteSize {
        ByteSize(self.in_use.load(Ordering::Relaxed))
    }

    /// Takes `bytes` if the budget has room for them.
    fn take(&self, bytes: u64) -> bool {
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| used.checked_add(bytes).filter(|total| *total <= self.budget))
            .is_ok()
    }

    fn give_back(&self, bytes: u64) {
        self.in_use.fetch_sub(bytes, Ordering::AcqRel);
    }
}

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
    /// The host's budget this instance's memory counts against, if any.
    host: Option<Arc<HostMemory>>,
    /// Set when a grow within the cap was refused because the host's
    /// budget was spent.
    pub(crate) host_full: bool,
}

impl MemoryLimiter {
    pub(crate) fn new(cap: ByteSize, host: Option<Arc<HostMemory>>) -> Self {
        MemoryLimiter {
            cap: usize::try_from(cap.bytes()).unwrap_or(usize::MAX),
            in_use: 0,
            peak: 0,
            denied: false,
            host,
            host_full: false,
        }
    }
}

impl Drop for MemoryLimiter {
    fn drop(&mut self) {
        // The store, and with it the instance's memories, goes with the limiter.
        if let Some(host) = &self.host {
            host.give_back(self.in_use as u64);
        }
    }
}

/// Tables are bounded by the pooling allocator; this only stops runaway growth.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let more = desired.saturating_sub(current);
        let grown = self.in_use.saturating_add(more);
        if grown > self.cap {
            self.denied = true;
            return Ok(false);
        }
        if let Some(host) = &self.host
            && !host.take(more as u64)
        {
            self.host_full = true;
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
        let mut limiter = MemoryLimiter::new(ByteSize::mib(2), None);
        assert!(limiter.memory_growing(0, 1 << 20, None).expect("no error"));
        assert!(limiter.memory_growing(0, 1 << 19, None).expect("no error"));
        assert!(!limiter.denied);
        // A second memory pushing the total past the cap is refused and remembered.
        assert!(!limiter.memory_growing(1 << 19, 3 << 19, None).expect("no error"));
        assert!(limiter.denied);
        assert_eq!(limiter.peak, (1 << 20) + (1 << 19));
    }

    #[test]
    fn instances_share_the_host_budget_and_give_it_back() {
        let host = HostMemory::new(ByteSize::mib(3));
        let mut first = MemoryLimiter::new(ByteSize::mib(2), Some(host.clone()));
        let mut second = MemoryLimiter::new(ByteSize::mib(2), Some(host.clone()));
        assert!(first.memory_growing(0, 2 << 20, None).expect("no error"));
        // Within its own cap, but past what the host has left: refused, and
        // told apart from the cap.
        assert!(!second.memory_growing(0, 2 << 20, None).expect("no error"));
        assert!(second.host_full && !second.denied);
        assert_eq!(host.in_use(), ByteSize::mib(2), "a refused grow takes nothing");
        assert!(second.memory_growing(0, 1 << 20, None).expect("no error"));
        assert_eq!(host.in_use(), ByteSize::mib(3));
        drop(first);
        assert_eq!(host.in_use(), ByteSize::mib(1), "an instance gone gives its memory back");
        assert!(second.memory_growing(1 << 20, 2 << 20, None).expect("no error"));
        drop(second);
        assert_eq!(host.in_use(), ByteSize(0));
    }
}
