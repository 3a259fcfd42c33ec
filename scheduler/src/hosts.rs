//! The hosts the control plane knows of, from their heartbeats. A host whose
//! heartbeats stop for longer than the timeout is no longer ready, and the
//! controller places its replicas elsewhere.

use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use wharf_bus::Bus;
use wharf_proto::names::{ALIVE_WILDCARD, HEARTBEAT_WILDCARD, HOST_DOWN_SUBJECT, host_of_subject, host_resend_subject};
use wharf_proto::{Heartbeat, HeartbeatAlive, HostDown, HostId, ReplicaState, ServiceId};

/// A lost host's services are listed in its announcement up to this many
/// (past it, the announcement concerns every service).
const MAX_DOWN_SERVICES: usize = 4096;

/// Tells every host that `down` is lost, so requests they sent it are sent again.
async fn announce_down(bus: &Bus, down: &HostDown) {
    let Ok(payload) = serde_json::to_vec(down) else { return };
    if let Err(e) = bus.publish(HOST_DOWN_SUBJECT, bytes::Bytes::from(payload)).await {
        tracing::warn!(host = %down.host, "cannot announce a lost host: {e}");
    }
}

/// The least time between two requests to one host for a full heartbeat.
const RESEND_PAUSE: Duration = Duration::from_secs(1);

/// How long after a disconnect advisory a heartbeat still counts as one
/// sent before it (in flight on another connection).
const DISCONNECT_SETTLE: Duration = Duration::from_millis(200);

/// Whether a beat whose body names `claimed` came on that host's own
/// subject. A host's NATS identity may publish only on its own subjects
/// (`wharf nats add-host`), so the subject says who sent it; a body naming
/// another host is forged (or misrouted) and is ignored, with a warning,
/// whatever the server's permissions let through: it could otherwise mark
/// that host draining, give it false capacity or take its volumes.
fn from_its_host(subject: &str, claimed: &HostId) -> bool {
    if host_of_subject(subject).as_ref() == Some(claimed) {
        return true;
    }
    tracing::warn!(%subject, claimed = %claimed, "ignoring a heartbeat whose body names another host than its subject");
    false
}

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
    /// When each host was last asked for a full heartbeat.
    asked: RwLock<BTreeMap<HostId, Instant>>,
}

impl HostTable {
    /// Starts following heartbeats on `bus`. A host is ready while its last
    /// heartbeat is younger than `timeout`.
    pub async fn follow(bus: &Bus, timeout: Duration) -> Result<HostTable, wharf_bus::SubscribeError> {
        let heartbeats = bus.subscribe(HEARTBEAT_WILDCARD).await?;
        let alive = bus.subscribe(ALIVE_WILDCARD).await?;
        let (changes, _) = watch::channel(0);
        let table = HostTable {
            inner: Arc::new(Inner {
                hosts: RwLock::new(BTreeMap::new()),
                gone: RwLock::default(),
                timeout,
                started: Instant::now(),
                changes,
                asked: RwLock::default(),
            }),
        };
        table.follow_disconnects(bus).await;
        let weak = Arc::downgrade(&table.inner);
        let asker = bus.clone();
        tokio::spawn(async move {
            // Full reports and "nothing changed" ones, in one task so each
            // host's are taken in the order they came.
            let mut beats = futures::stream::select(heartbeats.map(|m| (true, m)), alive.map(|m| (false, m)));
            while let Some((full, message)) = beats.next().await {
                let Some(inner) = weak.upgrade() else { break };
                let table = HostTable { inner };
                if full {
                    match serde_json::from_slice::<Heartbeat>(&message.payload) {
                        Ok(heartbeat) if from_its_host(&message.subject, &heartbeat.host) => table.record(heartbeat),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(subject = %message.subject, "ignoring an unreadable heartbeat: {e}"),
                    }
                    continue;
                }
                match serde_json::from_slice::<HeartbeatAlive>(&message.payload) {
                    Ok(alive) if !from_its_host(&message.subject, &alive.host) => {}
                    Ok(alive) => {
                        if !table.record_alive(&alive) && table.may_ask(&alive.host) {
                            tracing::debug!(host = %alive.host, version = alive.version, "asking for a full heartbeat");
                            if let Err(e) = asker.publish(&host_resend_subject(&alive.host), bytes::Bytes::new()).await {
                                tracing::debug!(host = %alive.host, "cannot ask for a full heartbeat: {e}");
                            }
                        }
                    }
                    Err(e) => tracing::warn!(subject = %message.subject, "ignoring an unreadable heartbeat: {e}"),
                }
            }
        });
        // Notice hosts going silent, which no message announces.
        let weak = Arc::downgrade(&table.inner);
        let announcer = bus.clone();
        tokio::spawn(async move {
            let mut ready_before: Vec<HostId> = Vec::new();
            loop {
                tokio::time::sleep((timeout / 8).min(std::time::Duration::from_millis(100))).await;
                let Some(inner) = weak.upgrade() else { break };
                let table = HostTable { inner };
                let ready = table.ready_hosts();
                if ready != ready_before {
                    for gone in ready_before.iter().filter(|h| !ready.contains(h)) {
                        // Draining hosts finish what they took; hosts whose
                        // connection closed were announced when it did.
                        if let Some(down) = table.lost(gone) {
                            tracing::warn!(host = %gone, "host stopped sending heartbeats; it is down");
                            announce_down(&announcer, &down).await;
                        }
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
        let announcer = bus.clone();
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
                let down = table.lost(&host);
                if let Ok(mut gone) = table.inner.gone.write() {
                    gone.insert(host, Instant::now());
                }
                table.inner.changes.send_modify(|n| *n += 1);
                if let Some(down) = down {
                    announce_down(&announcer, &down).await;
                }
            }
        });
    }

    /// A heartbeat that comes well after a disconnect means the host is
    /// back (it reconnected); one right after it was in flight before.
    fn settle_gone(&self, host: &HostId) {
        if let Ok(mut gone) = self.inner.gone.write()
            && gone.get(host).is_some_and(|at| at.elapsed() > DISCONNECT_SETTLE)
        {
            gone.remove(host);
        }
    }

    fn record(&self, heartbeat: Heartbeat) {
        self.settle_gone(&heartbeat.host);
        let changed = {
            let Ok(mut hosts) = self.inner.hosts.write() else { return };
            let previous = hosts.get(&heartbeat.host);
            let changed = match previous {
                None => {
                    tracing::info!(host = %heartbeat.host, addr = ?heartbeat.addr, "host joined");
                    true
                }
                Some((before, seen, _)) => {
                    // A new memory peak changes what new replicas are placed by.
                    let shape = |r: &'_ wharf_proto::ReplicaStatus| (r.service.clone(), r.revision, r.replica, r.attempt, r.state, r.failures, r.memory_peak);
                    seen.elapsed() > self.inner.timeout
                        || before.replicas.iter().map(shape).ne(heartbeat.replicas.iter().map(shape))
                        || before.started_at_ms != heartbeat.started_at_ms
                        || before.draining != heartbeat.draining
                        || before.labels != heartbeat.labels
                        || before.capacity != heartbeat.capacity
                        || before.memory_overcommit != heartbeat.memory_overcommit
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

    /// A heartbeat that says only "nothing changed since version N": the
    /// host is alive and its last full report still holds. Returns false
    /// when this table does not hold that report (it missed it, or started
    /// after it), so the host must be asked for a full one; meanwhile a
    /// host it knows stays ready on its older report, unless the process
    /// restarted (its replicas are gone, and only a full report says so).
    fn record_alive(&self, alive: &HeartbeatAlive) -> bool {
        self.settle_gone(&alive.host);
        let (known, back) = {
            let Ok(mut hosts) = self.inner.hosts.write() else { return true };
            match hosts.get_mut(&alive.host) {
                // The same process: alive, whether or not this table holds its newest report.
                Some((heartbeat, seen, rates)) if heartbeat.started_at_ms == alive.started_at_ms => {
                    let back = seen.elapsed() > self.inner.timeout;
                    *seen = Instant::now();
                    let known = alive.version != 0 && heartbeat.version == alive.version;
                    if known {
                        heartbeat.sent_at_ms = alive.sent_at_ms;
                        // Counters that did not move: no requests since.
                        *rates = Rates::default();
                    }
                    (known, back && known)
                }
                _ => (false, false),
            }
        };
        if back {
            self.inner.changes.send_modify(|n| *n += 1);
        }
        known
    }

    /// What to announce about `host`, lost just now: `None` when it was
    /// draining (it finishes what it took) or already known gone.
    fn lost(&self, host: &HostId) -> Option<HostDown> {
        if self.inner.gone.read().is_ok_and(|gone| gone.contains_key(host)) {
            return None;
        }
        let hosts = self.inner.hosts.read().ok()?;
        let (heartbeat, _, _) = hosts.get(host)?;
        if heartbeat.draining {
            return None;
        }
        let services: BTreeSet<&ServiceId> = heartbeat.replicas.iter().map(|r| &r.service).collect();
        let services = (services.len() <= MAX_DOWN_SERVICES).then(|| services.into_iter().cloned().collect());
        Some(HostDown { host: host.clone(), services })
    }

    /// Whether `host` may be asked for a full heartbeat now (at most once per [`RESEND_PAUSE`]).
    fn may_ask(&self, host: &HostId) -> bool {
        let Ok(mut asked) = self.inner.asked.write() else { return false };
        if asked.get(host).is_some_and(|at| at.elapsed() < RESEND_PAUSE) {
            return false;
        }
        asked.insert(host.clone(), Instant::now());
        true
    }

    /// The hosts whose entry passes `keep` (given whether it is ready and
    /// its rates), each turned by `make`; the gone list read once.
    fn select<T>(&self, keep: impl Fn(bool, &Rates) -> bool, make: impl Fn(&Heartbeat, Instant, bool, &Rates) -> T) -> Vec<T> {
        let Ok(hosts) = self.inner.hosts.read() else { return Vec::new() };
        let Ok(gone) = self.inner.gone.read() else { return Vec::new() };
        hosts
            .values()
            .filter_map(|(heartbeat, seen, rates)| {
                let ready = seen.elapsed() <= self.inner.timeout && !heartbeat.draining && !gone.contains_key(&heartbeat.host);
                keep(ready, rates).then(|| make(heartbeat, *seen, ready, rates))
            })
            .collect()
    }

    /// The ids of the ready hosts, without copying their reports.
    fn ready_hosts(&self) -> Vec<HostId> {
        self.select(|ready, _| ready, |heartbeat, _, _, _| heartbeat.host.clone())
    }

    /// The ready hosts that served requests since their previous report
    /// (the only ones an outlier can be on): at idle, none is copied.
    pub fn serving_hosts(&self) -> Vec<HostEntry> {
        self.select(|ready, rates| ready && !rates.rps.is_empty(), entry)
    }

    /// Whether `host`'s last report lists a replica of a service `wanted` picks.
    pub fn reports_replica_of(&self, host: &HostId, wanted: impl Fn(&ServiceId) -> bool) -> bool {
        let Ok(hosts) = self.inner.hosts.read() else { return false };
        hosts.get(host).is_some_and(|(heartbeat, _, _)| heartbeat.replicas.iter().any(|r| wanted(&r.service)))
    }

    /// The ready hosts whose last report lists a ready replica of
    /// `service`, and the other ready hosts: where a message the intake
    /// took in goes (`crate::intake`).
    pub fn intake_hosts(&self, service: &ServiceId) -> (Vec<HostId>, Vec<HostId>) {
        let hosts = self.select(
            |ready, _| ready,
            |heartbeat, _, _, _| (heartbeat.host.clone(), heartbeat.replicas.iter().any(|r| r.service == *service && r.state == ReplicaState::Ready)),
        );
        let (with, without): (Vec<_>, Vec<_>) = hosts.into_iter().partition(|(_, has)| *has);
        (with.into_iter().map(|(host, _)| host).collect(), without.into_iter().map(|(host, _)| host).collect())
    }

    /// Whether `host` is lost: unknown, silent past the timeout, or its
    /// connection closed (a draining host is not lost: it finishes what it took).
    pub fn is_lost(&self, host: &HostId) -> bool {
        let silent = self.inner.hosts.read().map_or(true, |hosts| hosts.get(host).is_none_or(|(_, seen, _)| seen.elapsed() > self.inner.timeout));
        silent || self.inner.gone.read().is_ok_and(|gone| gone.contains_key(host))
    }

    /// Every known host, ready or not, by id.
    pub fn hosts(&self) -> Vec<HostEntry> {
        self.select(|_, _| true, entry)
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

/// A host's entry as listed: its report, when it came, readiness, rates.
fn entry(heartbeat: &Heartbeat, seen: Instant, ready: bool, rates: &Rates) -> HostEntry {
    HostEntry { heartbeat: heartbeat.clone(), seen, ready, rps: rates.rps.clone(), latency_ms: rates.latency_ms.clone() }
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
    // Only services that served requests: an idle host's rates are empty,
    // and what reads them costs nothing per idle replica.
    for (service, (requests, micros)) in totals.into_iter().filter(|(_, (requests, _))| *requests > 0) {
        rates.rps.insert(service.clone(), requests as f64 / seconds);
        rates.latency_ms.insert(service, micros as f64 / requests as f64 / 1000.0);
    }
    rates
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_bus::LocalStore;
    use wharf_proto::beats::{Beat, Beats};
    use wharf_proto::names::{host_alive_subject, host_heartbeat_subject};
    use wharf_proto::{ByteSize, Capacity};

    fn report(host: &HostId, started_at_ms: u64) -> Heartbeat {
        Heartbeat {
            host: host.clone(),
            addr: None,
            labels: BTreeMap::new(),
            capacity: Capacity { memory: ByteSize::gib(1), instances: 10 },
            cached: Vec::new(),
            replicas: Vec::new(),
            sent_at_ms: crate::store::now_ms(),
            started_at_ms,
            draining: false,
            demand: Vec::new(),
            memory_reserved: ByteSize::default(),
            memory_in_use: ByteSize::default(),
            memory_overcommit: None,
            version: 0,
            seal_key: None,
        }
    }

    async fn send(bus: &Bus, beat: Beat) {
        let (subject, payload) = match &beat {
            Beat::Full(h) => (host_heartbeat_subject(&h.host), serde_json::to_vec(h).expect("json")),
            Beat::Alive(a) => (host_alive_subject(&a.host), serde_json::to_vec(a).expect("json")),
        };
        bus.publish(&subject, payload.into()).await.expect("the in-process bus");
    }

    async fn ready(table: &HostTable, host: &HostId) -> bool {
        tokio::time::sleep(Duration::from_millis(50)).await;
        table.hosts().iter().any(|h| &h.heartbeat.host == host && h.ready)
    }

    #[tokio::test]
    async fn alive_beats_keep_a_host_ready_past_the_timeout_and_change_nothing() {
        let bus = Bus::local(LocalStore::in_memory().expect("an in-memory store"));
        let table = HostTable::follow(&bus, Duration::from_millis(400)).await.expect("the in-process bus");
        let host = HostId::new("h1").expect("valid");
        let mut beats = Beats::new();
        send(&bus, beats.next(report(&host, 7))).await;
        assert!(ready(&table, &host).await);
        // The sweep for silent hosts notices the join too; let it.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let changes = table.changes();
        let before = *changes.borrow();
        for _ in 0..8 {
            let beat = beats.next(report(&host, 7));
            assert!(matches!(beat, Beat::Alive(_)), "nothing changed: {beat:?}");
            send(&bus, beat).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready(&table, &host).await, "1.2 s of alive beats with a 400 ms timeout");
        assert_eq!(*changes.borrow(), before, "alive beats are not changes");
        // And silence still takes it down.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!ready(&table, &host).await);
    }

    #[tokio::test]
    async fn a_table_that_missed_the_full_report_asks_for_it_and_a_restart_is_never_taken_as_alive() {
        let bus = Bus::local(LocalStore::in_memory().expect("an in-memory store"));
        let host = HostId::new("h2").expect("valid");
        let mut asked = bus.subscribe(&host_resend_subject(&host)).await.expect("the in-process bus");
        let mut beats = Beats::new();
        // The full report goes out before this table listens.
        beats.next(report(&host, 7));
        let table = HostTable::follow(&bus, Duration::from_millis(400)).await.expect("the in-process bus");
        send(&bus, beats.next(report(&host, 7))).await;
        assert!(!ready(&table, &host).await, "an alive beat about a report never heard says nothing of replicas");
        tokio::time::timeout(Duration::from_secs(2), asked.next()).await.expect("the table asks for a full report").expect("valid");
        // Asked again only after a pause.
        send(&bus, beats.next(report(&host, 7))).await;
        assert!(tokio::time::timeout(Duration::from_millis(300), asked.next()).await.is_err(), "asked twice within a second");
        beats.resend();
        send(&bus, beats.next(report(&host, 7))).await;
        assert!(ready(&table, &host).await);
        // The host restarts: its replicas are gone, which only a full report says.
        let mut restarted = Beats::new();
        restarted.next(report(&host, 8));
        tokio::time::sleep(Duration::from_millis(500)).await;
        send(&bus, restarted.next(report(&host, 8))).await;
        assert!(!ready(&table, &host).await, "an alive beat from a new process does not keep the old report");
    }

    /// A beat on one host's subject whose body names another host changes
    /// nothing of that other host (nor makes the table ask it to resend),
    /// and a beat on its own subject still counts.
    #[tokio::test]
    async fn a_beat_naming_another_host_than_its_subject_is_ignored() {
        let bus = Bus::local(LocalStore::in_memory().expect("an in-memory store"));
        let table = HostTable::follow(&bus, Duration::from_secs(5)).await.expect("the in-process bus");
        let (a, b) = (HostId::new("host-a").expect("valid"), HostId::new("host-b").expect("valid"));
        let mut resend_b = bus.subscribe(&host_resend_subject(&b)).await.expect("the in-process bus");
        send(&bus, Beat::Full(report(&b, 1))).await;
        assert!(ready(&table, &b).await);

        // host-a's subjects, bodies claiming host-b: draining, other capacity, a new process.
        let mut forged = report(&b, 2);
        forged.draining = true;
        forged.capacity.instances = 10_000;
        bus.publish(&host_heartbeat_subject(&a), serde_json::to_vec(&forged).expect("json").into()).await.expect("the in-process bus");
        let alive = HeartbeatAlive { host: b.clone(), started_at_ms: 3, version: 9, sent_at_ms: crate::store::now_ms() };
        bus.publish(&host_alive_subject(&a), serde_json::to_vec(&alive).expect("json").into()).await.expect("the in-process bus");
        assert!(ready(&table, &b).await, "host-b is still ready, not draining");
        let listed = table.hosts();
        let entry = listed.iter().find(|h| h.heartbeat.host == b).expect("host-b listed");
        assert_eq!((entry.heartbeat.draining, entry.heartbeat.capacity.instances, entry.heartbeat.started_at_ms), (false, 10, 1));
        assert!(!listed.iter().any(|h| h.heartbeat.host == a), "nothing was recorded for host-a either");
        assert!(tokio::time::timeout(Duration::from_millis(300), resend_b.next()).await.is_err(), "a forged alive beat made the table ask host-b to resend");

        // The same body on host-b's own subject is taken.
        send(&bus, Beat::Full(forged)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(table.hosts().iter().any(|h| h.heartbeat.host == b && h.heartbeat.draining));
    }

    /// A host that goes silent is announced lost with the services it ran
    /// (hosts then resend what they had in flight to it); a draining host
    /// that goes silent is not (it finishes what it took).
    #[tokio::test]
    async fn a_silent_host_is_announced_lost_with_its_services_and_a_draining_one_is_not() {
        let bus = Bus::local(LocalStore::in_memory().expect("an in-memory store"));
        let mut announced = bus.subscribe(HOST_DOWN_SUBJECT).await.expect("the in-process bus");
        let _table = HostTable::follow(&bus, Duration::from_millis(300)).await.expect("the in-process bus");
        let service = ServiceId::new("shop", "web").expect("valid");
        let running = |host: &HostId, draining: bool| {
            let mut heartbeat = report(host, 1);
            heartbeat.draining = draining;
            let key = wharf_proto::ReplicaKey { service: service.clone(), revision: 1, replica: 0 };
            heartbeat.replicas = vec![wharf_proto::ReplicaStatus::new(key, 0, wharf_proto::ReplicaState::Ready)];
            heartbeat
        };
        let (lost, drained) = (HostId::new("lost").expect("valid"), HostId::new("drained").expect("valid"));
        send(&bus, Beat::Full(running(&lost, false))).await;
        send(&bus, Beat::Full(running(&drained, false))).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Both fall silent; one said it was draining first.
        send(&bus, Beat::Full(running(&drained, true))).await;
        let message = tokio::time::timeout(Duration::from_secs(2), announced.next()).await.expect("an announcement").expect("a message");
        let down: HostDown = serde_json::from_slice(&message.payload).expect("a HostDown");
        assert_eq!(down, HostDown { host: lost, services: Some(vec![service]) });
        assert!(tokio::time::timeout(Duration::from_millis(800), announced.next()).await.is_err(), "a draining host was announced lost");
    }
}
