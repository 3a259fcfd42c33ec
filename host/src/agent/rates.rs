//! Namespaces' request-rate quotas at this host's ingress: one token bucket
//! per namespace with a quota, kept from the namespaces bucket.

use std::collections::BTreeMap;
use std::sync::Mutex;
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

/// The buckets of every namespace with a quota.
#[derive(Default)]
pub(crate) struct Rates {
    /// Held only to take a token or swap a bucket.
    buckets: Mutex<BTreeMap<String, RateBucket>>,
}

impl Rates {
    /// A namespace's record changed: keep its quota (or drop it).
    pub(crate) fn set(&self, namespace: &str, value: Option<&[u8]>) {
        let rps = value.and_then(|v| serde_json::from_slice::<wharf_proto::Namespace>(v).ok()).and_then(|n| n.quota.rps);
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
