//! One writer among many schedulers: a lease in a KV bucket
//! ([`wharf_proto::names::LEADER_BUCKET`]), taken and renewed by
//! compare-and-set. Every scheduler serves the API; only the holder of the
//! lease runs the controller and the autoscaler.
//!
//! - A follower reads the lease every `poll`. It notes when the lease last
//!   changed *by its own clock*; once the lease has not changed for `ttl`
//!   (its holder stopped renewing), or its holder released it, the follower
//!   takes it by compare-and-set against the revision it read, with the
//!   epoch bumped. Of several followers racing, one wins.
//! - The leader renews every `renew` by compare-and-set against its own
//!   last write. A mismatch means another scheduler took the lease: it
//!   steps down at once. When it cannot reach the store, it steps down once
//!   `ttl - renew` has passed since its last renewal, before any follower
//!   (which waits a whole `ttl` from when it saw that renewal) can take over.
//! - On shutdown the leader releases the lease, so a follower takes over at
//!   its next poll instead of after `ttl`.
//!
//! Judging expiry by when a change was seen, not by timestamps in the
//! lease, keeps clocks out of it: schedulers on machines whose clocks
//! disagree still agree on who leads. The epoch fences the leader's writes:
//! they carry it, and hosts ignore assignments from an older epoch.

use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use wharf_bus::{Kv, KvError};
use wharf_proto::Lease;
use wharf_proto::names::LEADER_KEY;

/// Lease timings.
#[derive(Debug, Clone, Copy)]
pub struct LeaseConfig {
    /// How long a lease lasts without renewal.
    pub ttl: Duration,
    /// How often the leader renews it.
    pub renew: Duration,
    /// How often a follower reads it.
    pub poll: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        // A leader killed just after renewing is replaced ttl + poll later:
        // within 2 s.
        LeaseConfig { ttl: Duration::from_millis(1500), renew: Duration::from_millis(400), poll: Duration::from_millis(100) }
    }
}

impl LeaseConfig {
    /// Timings for a lease of `ttl`: renewed four times per ttl, read every
    /// tenth of it (at least every 20 ms, at most every 100 ms).
    pub fn with_ttl(ttl: Duration) -> LeaseConfig {
        let ttl = ttl.max(Duration::from_millis(200));
        LeaseConfig { ttl, renew: ttl / 4, poll: (ttl / 10).clamp(Duration::from_millis(20), Duration::from_millis(100)) }
    }
}

/// Whether this scheduler leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    /// Another scheduler (`leader`, if known) leads, or none yet.
    Follower {
        /// The holder of the lease, as last read.
        leader: Option<String>,
    },
    /// This scheduler leads, with this epoch.
    Leader {
        /// The lease's epoch: every write of this leader carries it.
        epoch: u64,
    },
}

impl Leadership {
    /// The epoch, when leading.
    pub fn epoch(&self) -> Option<u64> {
        match self {
            Leadership::Leader { epoch } => Some(*epoch),
            Leadership::Follower { .. } => None,
        }
    }
}

/// Until when this scheduler's lease holds by its own clock: its last
/// renewal plus the ttl, less one renewal period (after that a follower
/// may have taken it). A process frozen past it (stopped, starved of CPU)
/// does not claim to lead on waking, before its campaign has looked at the
/// lease again. Shared; cheap to clone.
#[derive(Clone)]
pub struct LeaseClock {
    start: Instant,
    /// Milliseconds after `start`; 0: not held.
    until_ms: Arc<AtomicU64>,
}

impl LeaseClock {
    fn new() -> LeaseClock {
        LeaseClock { start: Instant::now(), until_ms: Arc::new(AtomicU64::new(0)) }
    }

    fn set(&self, until: Option<Instant>) {
        let ms = until.map_or(0, |until| u64::try_from(until.duration_since(self.start).as_millis()).unwrap_or(u64::MAX).max(1));
        self.until_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether the lease holds now, by this process's clock.
    pub fn holds(&self) -> bool {
        let until = self.until_ms.load(Ordering::Relaxed);
        until != 0 && u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX) < until
    }

    /// `leadership` as it stands now: a leader whose lease ran out by its
    /// own clock is a follower until its campaign says more.
    pub fn check(&self, leadership: Leadership) -> Leadership {
        match leadership {
            Leadership::Leader { .. } if !self.holds() => Leadership::Follower { leader: None },
            other => other,
        }
    }
}

/// Campaigns for the lease as `me` until `stop` turns true; the receiver
/// follows this scheduler's leadership, and the clock says until when its
/// lease holds.
pub fn campaign(kv: Kv, me: String, config: LeaseConfig, mut stop: watch::Receiver<bool>) -> (watch::Receiver<Leadership>, LeaseClock) {
    let (tx, rx) = watch::channel(Leadership::Follower { leader: None });
    let clock = LeaseClock::new();
    let lease_clock = clock.clone();
    tokio::spawn(async move {
        let mut elector = Elector { kv, me, config, seen: None, held: None };
        loop {
            let pause = match elector.held {
                Some(_) => config.renew,
                None => config.poll,
            };
            let stopping = tokio::select! {
                _ = tokio::time::sleep(pause) => false,
                _ = stop.changed() => true,
            };
            if stopping || *stop.borrow() {
                lease_clock.set(None);
                elector.release().await;
                tx.send_replace(Leadership::Follower { leader: None });
                return;
            }
            let leadership = elector.step().await;
            lease_clock.set(elector.held.map(|held| held.renewed + config.ttl.saturating_sub(config.renew)));
            tx.send_if_modified(|current| {
                let changed = *current != leadership;
                if changed {
                    match &leadership {
                        Leadership::Leader { epoch } => tracing::info!(epoch, "this scheduler now leads the control plane"),
                        Leadership::Follower { leader: Some(holder) } if matches!(current, Leadership::Leader { .. }) => {
                            tracing::warn!(%holder, "this scheduler no longer leads");
                        }
                        Leadership::Follower { .. } if matches!(current, Leadership::Leader { .. }) => {
                            tracing::warn!("this scheduler no longer leads (cannot renew its lease)");
                        }
                        Leadership::Follower { .. } => {}
                    }
                    *current = leadership.clone();
                }
                changed
            });
        }
    });
    (rx, clock)
}

/// The lease as this scheduler holds it.
#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: u64,
    /// The KV revision of its own last write.
    revision: u64,
    /// When it last renewed.
    renewed: Instant,
}

struct Elector {
    kv: Kv,
    me: String,
    config: LeaseConfig,
    /// The lease's revision as last read, and when it was first seen.
    seen: Option<(u64, Instant)>,
    held: Option<Held>,
}

impl Elector {
    /// One renewal (leading) or one look at the lease (following).
    async fn step(&mut self) -> Leadership {
        match self.held {
            Some(held) => self.renew(held).await,
            None => self.follow().await,
        }
    }

    fn lease(&self, epoch: u64, released: bool) -> Bytes {
        let lease = Lease {
            holder: self.me.clone(),
            epoch,
            ttl_ms: u64::try_from(self.config.ttl.as_millis()).unwrap_or(u64::MAX),
            renewed_at_ms: crate::store::now_ms(),
            released,
        };
        Bytes::from(serde_json::to_vec(&lease).unwrap_or_default())
    }

    async fn renew(&mut self, held: Held) -> Leadership {
        match self.kv.update(LEADER_KEY, self.lease(held.epoch, false), held.revision).await {
            Ok(revision) => {
                self.held = Some(Held { revision, renewed: Instant::now(), ..held });
                Leadership::Leader { epoch: held.epoch }
            }
            Err(KvError::RevisionMismatch { .. }) => {
                self.held = None;
                self.seen = None;
                Leadership::Follower { leader: self.holder().await }
            }
            Err(e) => {
                // Unsure whether the lease still holds: keep leading only
                // while no follower could have taken it yet.
                if held.renewed.elapsed() + self.config.renew >= self.config.ttl {
                    tracing::warn!("cannot renew the leader lease: {e}");
                    self.held = None;
                    self.seen = None;
                    Leadership::Follower { leader: None }
                } else {
                    tracing::debug!("leader lease renewal failed, retrying: {e}");
                    Leadership::Leader { epoch: held.epoch }
                }
            }
        }
    }

    async fn follow(&mut self) -> Leadership {
        let entry = match self.kv.get(LEADER_KEY).await {
            Ok(entry) => entry,
            Err(e) => {
                tracing::debug!("cannot read the leader lease: {e}");
                return Leadership::Follower { leader: None };
            }
        };
        let Some(entry) = entry else {
            return match self.kv.create(LEADER_KEY, self.lease(1, false)).await {
                Ok(revision) => self.won(1, revision),
                Err(_) => Leadership::Follower { leader: None },
            };
        };
        let lease: Option<Lease> = serde_json::from_slice(&entry.value).ok();
        let now = Instant::now();
        let first_seen = match self.seen {
            Some((revision, at)) if revision == entry.revision => at,
            _ => {
                self.seen = Some((entry.revision, now));
                now
            }
        };
        let epoch = lease.as_ref().map_or(0, |l| l.epoch);
        // Free: released, unreadable, or unchanged for a whole ttl. A lease
        // naming this scheduler is a previous life of it (a restart with
        // the same id): it can be taken at once.
        let free = match &lease {
            None => true,
            Some(lease) => lease.released || lease.holder == self.me || now.duration_since(first_seen) >= self.config.ttl,
        };
        if !free {
            return Leadership::Follower { leader: lease.map(|l| l.holder) };
        }
        match self.kv.update(LEADER_KEY, self.lease(epoch + 1, false), entry.revision).await {
            Ok(revision) => self.won(epoch + 1, revision),
            Err(_) => Leadership::Follower { leader: lease.map(|l| l.holder) },
        }
    }

    fn won(&mut self, epoch: u64, revision: u64) -> Leadership {
        self.held = Some(Held { epoch, revision, renewed: Instant::now() });
        Leadership::Leader { epoch }
    }

    async fn holder(&self) -> Option<String> {
        let entry = self.kv.get(LEADER_KEY).await.ok()??;
        serde_json::from_slice::<Lease>(&entry.value).ok().map(|l| l.holder)
    }

    /// Gives the lease up, so a follower takes over at once.
    async fn release(&mut self) {
        if let Some(held) = self.held.take() {
            match self.kv.update(LEADER_KEY, self.lease(held.epoch, true), held.revision).await {
                Ok(_) => tracing::info!("leader lease released"),
                Err(e) => tracing::debug!("could not release the leader lease: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_leader_whose_lease_ran_out_by_its_own_clock_does_not_claim_to_lead() {
        let clock = LeaseClock::new();
        let leader = Leadership::Leader { epoch: 3 };
        assert_eq!(clock.check(leader.clone()), Leadership::Follower { leader: None }, "never renewed");
        clock.set(Some(Instant::now() + Duration::from_secs(10)));
        assert!(clock.holds());
        assert_eq!(clock.check(leader.clone()), leader);
        // Renewed long ago (a process frozen past its lease, then thawed).
        clock.set(Some(Instant::now()));
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(clock.check(leader.clone()), Leadership::Follower { leader: None });
        let follower = Leadership::Follower { leader: Some("s2".into()) };
        assert_eq!(clock.check(follower.clone()), follower, "a follower stays one");
        clock.set(None);
        assert!(!clock.holds());
    }
}
