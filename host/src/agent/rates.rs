//! Namespaces' records at this host, kept from the namespaces bucket: their
//! request-rate quotas (one token bucket per namespace with a quota, taken
//! by ingress requests and calls from other services alike) and which
//! other namespaces may call theirs.

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
    /// Each namespace's `allow_from`, where it has one.
    callers: RwLock<BTreeMap<String, wharf_proto::Namespace>>,
}

impl Rates {
    /// Whether services of namespace `caller` may call those of `callee`.
    pub(crate) fn admits(&self, callee: &str, caller: &str) -> bool {
        if callee == caller {
            return true;
        }
        self.callers.read().is_ok_and(|callers| callers.get(callee).is_some_and(|record| record.admits(callee, caller)))
    }

    /// A namespace's record changed: keep its quota and callers (or drop them).
    pub(crate) fn set(&self, namespace: &str, value: Option<&[u8]>) {
        let record = value.and_then(|v| match serde_json::from_slice::<wharf_proto::Namespace>(v) {
            Ok(record) => Some(record),
            Err(e) => {
                tracing::warn!(%namespace, "ignoring an unreadable namespace record (no quota, no callers from other namespaces): {e}");
                None
            }
        });
        if let Ok(mut callers) = self.callers.write() {
            match &record {
                Some(record) if !record.allow_from.is_empty() => drop(callers.insert(namespace.to_string(), record.clone())),
                _ => drop(callers.remove(namespace)),
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
