//! The hosts the control plane knows of, from their heartbeats. A host whose
//! heartbeats stop for longer than the timeout is no longer ready, and the
//! controller places its replicas elsewhere.

use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use wharf_bus::Bus;
use wharf_proto::names::HEARTBEAT_WILDCARD;
use wharf_proto::{Heartbeat, HostId, ServiceId};

/// How long after a disconnect advisory a heartbeat still counts as one
/// sent before it (in flight on another connection).
const DISCONNECT_SETTLE: Duration = Duration::from_millis(200);

/// A host as last heard of.
#[derive(Debug, Clone)]
pub struct HostEntry {
    pub heartbeat: Heartbeat,
    /// When the last heartbeat arrived (this process's clock).
    pub seen: Instant,
    /// Whether heartbeats are current.
    pub ready: bool,
    /// Requests per second per service on this host, from the request
    /// counters of its last two heartbeats.
    pub rps: BTreeMap<ServiceId, f64>,
    /// Mean latency per service over the same interval, in milliseconds.
    pub latency_ms: BTreeMap<ServiceId, f64>,
}

/// Last heartbeat of every host; readiness derived from its age.
#[derive(Clone)]
pub struct HostTable {
    inner: Arc<Inner>,
}

struct Inner {
    /// The last heartbeat of each host, when it came, the rates from it.
    hosts: RwLock<BTreeMap<HostId, (Heartbeat, Instant, Rates)>>,
    /// Hosts whose NATS connection closed (a disconnect advisory), and
    /// when: not ready until a heartbeat comes after that.
    gone: RwLock<BTreeMap<HostId, Instant>>,
    timeout: Duration,
    /// When the table started following heartbeats.
    started: Instant,
    /// Bumped when a host appears, goes silent, comes back or its replicas' states change.
    changes: watch::Sender<u64>,
}

impl HostTable {
    /// Starts following heartbeats on `bus`. A host is ready while its last
    /// heartbeat is younger than `timeout`.
    pub async fn follow(bus: &Bus, timeout: Duration) -> Result<HostTable, wharf_bus::SubscribeError> {
        let mut heartbeats = bus.subscribe(HEARTBEAT_WILDCARD).await?;
        let (changes, _) = watch::channel(0);
        let table = HostTable {
            inner: Arc::new(Inner { hosts: RwLock::new(BTreeMap::new()), gone: RwLock::default(), timeout, started: Instant::now(), changes }),
        };
        table.follow_disconnects(bus).await;
        let weak = Arc::downgrade(&table.inner);
        tokio::spawn(async move {
            while let Some(message) = heartbeats.next().await {
                let Some(inner) = weak.upgrade() else { break };
                match serde_json::from_slice::<Heartbeat>(&message.payload) {
                    Ok(heartbeat) => HostTable { inner }.record(heartbeat),
                    Err(e) => tracing::warn!(subject = %message.subject, "ignoring an unreadable heartbeat: {e}"),
                }
            }
        });
        // Notice hosts going silent, which no message announces.
        let weak = Arc::downgrade(&table.inner);
        tokio::spawn(async move {
            let mut ready_before: Vec<HostId> = Vec::new();
            loop {
                tokio::time::sleep((timeout / 8).min(std::time::Duration::from_millis(100))).await;
                let Some(inner) = weak.upgrade() else { break };
                let table = HostTable { inner };
                let ready: Vec<HostId> = table.hosts().into_iter().filter(|h| h.ready).map(|h| h.heartbeat.host).collect();
                if ready != ready_before {
                    for gone in ready_before.iter().filter(|h| !ready.contains(h)) {
                        tracing::warn!(host = %gone, "host stopped sending heartbeats; it is down");
                    }
                    ready_before = ready;
                    table.inner.changes.send_modify(|n| *n += 1);
                }
            }
        });
        Ok(table)
    }

    /// Marks a host down the moment its NATS connection closes (a killed
    /// process's socket is closed by the kernel at once), from the server's
    /// disconnect advisories, when the bus has system credentials; missed
    /// heartbeats stay the rule for partitions and hung processes.
    async fn follow_disconnects(&self, bus: &Bus) {
        let mut gone = match bus.client_disconnects().await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::info!("hosts that die are noticed by missed heartbeats only: {e}");
                return;
            }
        };
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            while let Some(client) = gone.next().await {
                // A server shutting down hands its clients to another.
                if client.reason == wharf_bus::DisconnectReason::ServerShutdown {
                    continue;
                }
                let Some(host) = wharf_proto::names::host_of_connection(&client.name) else { continue };
                let Some(inner) = weak.upgrade() else { break };
                let table = HostTable { inner };
                if !table.inner.hosts.read().is_ok_and(|h| h.contains_key(&host)) {
                    continue;
                }
                tracing::warn!(%host, reason = ?client.reason, "host's connection to NATS closed; it is down");
                if let Ok(mut gone) = table.inner.gone.write() {
                    gone.insert(host, Instant::now());
                }
                table.inner.changes.send_modify(|n| *n += 1);
            }
        });
    }

    fn record(&self, heartbeat: Heartbeat) {
        // A heartbeat that comes well after a disconnect means the host is
        // back (it reconnected); one right after it was in flight before.
        if let Ok(mut gone) = self.inner.gone.write()
            && gone.get(&heartbeat.host).is_some_and(|at| at.elapsed() > DISCONNECT_SETTLE)
        {
            gone.remove(&heartbeat.host);
        }
        let changed = {
            let Ok(mut hosts) = self.inner.hosts.write() else { return };
            let previous = hosts.get(&heartbeat.host);
            let changed = match previous {
                None => {
                    tracing::info!(host = %heartbeat.host, addr = ?heartbeat.addr, "host joined");
                    true
                }
                Some((before, seen, _)) => {
                    let shape = |r: &'_ wharf_proto::ReplicaStatus| (r.service.clone(), r.revision, r.replica, r.attempt, r.state, r.failures);
                    seen.elapsed() > self.inner.timeout
                        || before.replicas.iter().map(shape).ne(heartbeat.replicas.iter().map(shape))
                        || before.started_at_ms != heartbeat.started_at_ms
                        || before.draining != heartbeat.draining
                        || before.labels != heartbeat.labels
                        || before.capacity != heartbeat.capacity
                }
            };
            let rps = previous.map(|(before, _, _)| request_rates(before, &heartbeat)).unwrap_or_default();
            hosts.insert(heartbeat.host.clone(), (heartbeat, Instant::now(), rps));
            changed
        };
        if changed {
            self.inner.changes.send_modify(|n| *n += 1);
        }
    }

    /// Every known host, ready or not, by id.
    pub fn hosts(&self) -> Vec<HostEntry> {
        let Ok(hosts) = self.inner.hosts.read() else { return Vec::new() };
        let gone = self.inner.gone.read().map(|g| g.clone()).unwrap_or_default();
        hosts
            .values()
            .map(|(heartbeat, seen, rates)| HostEntry {
                heartbeat: heartbeat.clone(),
                seen: *seen,
                ready: seen.elapsed() <= self.inner.timeout && !heartbeat.draining && !gone.contains_key(&heartbeat.host),
                rps: rates.rps.clone(),
                latency_ms: rates.latency_ms.clone(),
            })
            .collect()
    }

    /// A receiver that changes whenever the set of ready hosts or their replicas' states change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Waits until the table has followed heartbeats for one timeout: every
    /// live host has been heard by then.
    pub async fn warmed_up(&self) {
        let until = self.inner.started + self.inner.timeout;
        tokio::time::sleep_until(until.into()).await;
    }

    /// The heartbeat timeout.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }
}

/// Load per service between two heartbeats of one host.
#[derive(Debug, Clone, Default)]
struct Rates {
    rps: BTreeMap<ServiceId, f64>,
    latency_ms: BTreeMap<ServiceId, f64>,
}

/// Requests per second and mean latency per service between two heartbeats of one host.
fn request_rates(before: &Heartbeat, now: &Heartbeat) -> Rates {
    let seconds = now.sent_at_ms.saturating_sub(before.sent_at_ms) as f64 / 1000.0;
    let mut rates = Rates::default();
    if seconds <= 0.0 {
        return rates;
    }
    let mut totals: BTreeMap<ServiceId, (u64, u64)> = BTreeMap::new();
    // Indexed once: a host may report thousands of replicas.
    let earlier_of: std::collections::HashMap<(&ServiceId, u64, u32), &wharf_proto::ReplicaStatus> =
        before.replicas.iter().map(|r| ((&r.service, r.revision, r.replica), r)).collect();
    for replica in &now.replicas {
        let earlier = earlier_of.get(&(&replica.service, replica.revision, replica.replica));
        let (requests, micros) = earlier.map_or((0, 0), |e| (replica.requests.saturating_sub(e.requests), replica.latency_micros.saturating_sub(e.latency_micros)));
        let total = totals.entry(replica.service.clone()).or_default();
        total.0 += requests;
        total.1 += micros;
    }
    for (service, (requests, micros)) in totals {
        rates.rps.insert(service.clone(), requests as f64 / seconds);
        if requests > 0 {
            rates.latency_ms.insert(service, micros as f64 / requests as f64 / 1000.0);
        }
    }
    rates
}
