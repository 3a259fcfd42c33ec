//! Namespaces' records at this host, kept from the namespaces bucket: their
//! request-rate quotas (one token bucket per namespace with a quota, taken
//! by ingress requests and calls from other services alike), which other
//! namespaces may call theirs, and their replica and memory quotas (which
//! activation respects).

use std::collections::BTreeMap;
use std::sync::{Mutex, RwLock};
use std::time::Instant;

/// A token bucket: `rps` tokens a second, bursts of up to `rps`.
struct RateBucket {
    rps: u32,
    tokens: f64,
    last: Instant,
}

impl RateBucket {
    fn new(rps: u32) -> Self {
        RateBucket { rps, tokens: f64::from(rps), last: Instant::now() }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let rate = f64::from(self.rps);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate.max(1.0));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The buckets of every namespace with a quota, and who may call in.
#[derive(Default)]
pub(crate) struct Rates {
    /// Held only to take a token or swap a bucket.
    buckets: Mutex<BTreeMap<String, RateBucket>>,
    /// Each namespace's record, where it has callers from other namespaces
    /// or a replica or memory quota.
    records: RwLock<BTreeMap<String, wharf_proto::Namespace>>,
}

impl Rates {
    /// Whether services of namespace `caller` may call those of `callee`.
    pub(crate) fn admits(&self, callee: &str, caller: &str) -> bool {
        if callee == caller {
            return true;
        }
        self.records.read().is_ok_and(|records| records.get(callee).is_some_and(|record| record.admits(callee, caller)))
    }

    /// Namespace `ns`'s replica and memory quota, where it has one.
    pub(crate) fn quota(&self, ns: &str) -> Option<wharf_proto::Quota> {
        let records = self.records.read().ok()?;
        records.get(ns).map(|r| r.quota.clone()).filter(|q| q.replicas.is_some() || q.memory.is_some())
    }

    /// A namespace's record changed: keep its quotas and callers (or drop them).
    pub(crate) fn set(&self, namespace: &str, value: Option<&[u8]>) {
        let record = value.and_then(|v| match serde_json::from_slice::<wharf_proto::Namespace>(v) {
            Ok(record) => Some(record),
            Err(e) => {
                tracing::warn!(%namespace, "ignoring an unreadable namespace record (no quota, no callers from other namespaces): {e}");
                None
            }
        });
        if let Ok(mut records) = self.records.write() {
            match &record {
                Some(r) if !r.allow_from.is_empty() || r.quota.replicas.is_some() || r.quota.memory.is_some() => {
                    drop(records.insert(namespace.to_string(), r.clone()))
                }
                _ => drop(records.remove(namespace)),
            }
        }
        let rps = record.and_then(|n| n.quota.rps);
        if let Ok(mut buckets) = self.buckets.lock() {
            match rps {
                Some(rps) if buckets.get(namespace).is_none_or(|b| b.rps != rps) => {
                    buckets.insert(namespace.to_string(), RateBucket::new(rps));
                }
                Some(_) => {}
                None => {
                    buckets.remove(namespace);
                }
            }
        }
    }

    /// Takes one request from the namespace's quota: `Some(rps)` when it is spent.
    pub(crate) fn over(&self, namespace: &str) -> Option<u32> {
        let mut buckets = self.buckets.lock().ok()?;
        let bucket = buckets.get_mut(namespace)?;
        if bucket.take() { None } else { Some(bucket.rps) }
    }
}
