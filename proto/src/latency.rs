//! A small, fixed-bucket latency histogram: hosts count each replica's
//! request durations in it and report the counts in heartbeats; the control
//! plane subtracts two reports to get the histogram of an interval, merges
//! replicas, and reads quantiles (a canary's p99 against the stable
//! revision's). Fixed buckets make merging and subtracting exact.

use serde::{Deserialize, Serialize};

/// Upper bounds of the buckets in microseconds: 250µs doubling up to about
/// 33 s (18 buckets). Durations above the last bound fall in one more
/// bucket, whose quantile is reported as the last bound.
pub const BUCKET_BOUNDS_MICROS: [u64; 18] = {
    let mut bounds = [0u64; 18];
    let mut i = 0;
    while i < 18 {
        bounds[i] = 250 << i;
        i += 1;
    }
    bounds
};

/// Request counts per latency bucket (see [`BUCKET_BOUNDS_MICROS`]);
/// serialised as the list of counts with trailing zeros left out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
}

/// The bucket a duration of `micros` falls in: the first whose bound it
/// does not exceed, or `BUCKET_BOUNDS_MICROS.len()` (the overflow).
pub fn bucket_of(micros: u64) -> usize {
    BUCKET_BOUNDS_MICROS.iter().position(|&bound| micros <= bound).unwrap_or(BUCKET_BOUNDS_MICROS.len())
}

impl LatencyHistogram {
    /// A histogram from counts per bucket (trailing zeros are dropped).
    pub fn from_counts(mut counts: Vec<u64>) -> Self {
        while counts.last() == Some(&0) {
            counts.pop();
        }
        LatencyHistogram { counts }
    }

    /// Counts one request that took `micros` microseconds.
    pub fn record(&mut self, micros: u64) {
        let bucket = bucket_of(micros);
        if self.counts.len() <= bucket {
            self.counts.resize(bucket + 1, 0);
        }
        self.counts[bucket] += 1;
    }

    /// How many requests it counts.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Whether it counts nothing.
    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|&c| c == 0)
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
    }

    /// The requests counted here but not in `earlier` (an older report of
    /// the same replica); a bucket that shrank (the replica restarted)
    /// counts what it holds now.
    pub fn since(&self, earlier: &LatencyHistogram) -> LatencyHistogram {
        let restarted = earlier.counts.iter().enumerate().any(|(i, &e)| self.counts.get(i).copied().unwrap_or(0) < e);
        let counts = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, &now)| if restarted { now } else { now - earlier.counts.get(i).copied().unwrap_or(0) })
            .collect();
        LatencyHistogram { counts }
    }

    /// The `q` quantile (0 to 1) in microseconds: the upper bound of the
    /// bucket it falls in; `None` when empty.
    pub fn quantile_micros(&self, q: f64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        // The rank of the request at the quantile, counted from 1.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(BUCKET_BOUNDS_MICROS[i.min(BUCKET_BOUNDS_MICROS.len() - 1)]);
            }
        }
        BUCKET_BOUNDS_MICROS.last().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_read_bucket_bounds() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile_micros(0.99), None);
        for _ in 0..98 {
            h.record(300);
        }
        h.record(5_000);
        h.record(50_000_000);
        assert_eq!(h.total(), 100);
        assert_eq!(h.quantile_micros(0.5), Some(500));
        assert_eq!(h.quantile_micros(0.99), Some(8_000));
        assert_eq!(h.quantile_micros(1.0), Some(BUCKET_BOUNDS_MICROS[17]));
    }

    #[test]
    fn differences_and_sums_are_exact() {
        let mut before = LatencyHistogram::default();
        before.record(100);
        let mut now = before.clone();
        now.record(100);
        now.record(2_000);
        let delta = now.since(&before);
        assert_eq!(delta.total(), 2);
        let mut sum = delta.clone();
        sum.merge(&before);
        assert_eq!(sum, now);
        // A restarted replica reports less than before: count what it has.
        assert_eq!(before.since(&now), before);
        let json = serde_json::to_string(&delta).expect("serialises");
        assert_eq!(json, "[1,0,0,1]");
    }
}
