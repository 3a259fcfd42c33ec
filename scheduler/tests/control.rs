//! The control plane over the in-process bus: the store's compare-and-set
//! and revisions, the leader lease, fenced writes, and the controller
//! turning services and heartbeats into assignments (and writing nothing
//! when nothing changes).

use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wharf_bus::{Bus, LocalStore};
use wharf_proto::names::{LEADER_KEY, host_heartbeat_subject};
use wharf_proto::{Assignment, ByteSize, Capacity, Digest, Heartbeat, HostId, Lease, ServiceSpec};
use wharf_scheduler::leader::{LeaseConfig, Leadership};
use wharf_scheduler::store::{Change, Store, StoreError, Written};
use wharf_scheduler::{ComponentCheck, ControlPlane, ControlPlaneConfig};

fn bus() -> Bus {
    Bus::local(LocalStore::in_memory().expect("in-memory store"))
}

fn spec(name: &str, replicas: u32) -> ServiceSpec {
    let mut spec = ServiceSpec::new(name, Digest::of(name.as_bytes()));
    spec.replicas = replicas;
    spec
}

fn change() -> Change {
    Change { by: "test".into(), cause: "test".into() }
}

#[tokio::test]
async fn writes_are_compare_and_set_and_templates_make_revisions() {
    let store = Store::open(&bus()).await.expect("store").with_history(3);
    let (created, how) = store.put_service(spec("web", 1), Some(0), &change(), None).await.expect("created");
    assert_eq!((how, created.generation, created.revision), (Written::Created, 1, 1));
    assert!(matches!(store.put_service(spec("web", 1), Some(0), &change(), None).await, Err(StoreError::Exists(_))));
    let (same, how) = store.put_service(spec("web", 1), None, &change(), None).await.expect("unchanged");
    assert_eq!((how, same.version, same.generation), (Written::Unchanged, created.version, 1));
    // A scale is not a revision.
    let (scaled, how) = store.put_service(spec("web", 2), Some(created.version), &change(), None).await.expect("updated");
    assert_eq!((how, scaled.generation, scaled.revision), (Written::Updated, 2, 1));
    let stale = store.put_service(spec("web", 5), Some(created.version), &change(), None).await;
    assert!(matches!(stale, Err(StoreError::Conflict { .. })), "{stale:?}");
    // A new template is; going back to a kept one reuses its number.
    let mut v2 = spec("web", 2);
    v2.env.insert("V".into(), "2".into());
    let (second, _) = store.put_service(v2.clone(), None, &change(), None).await.expect("v2");
    assert_eq!((second.revision, second.history.clone()), (2, vec![1, 2]));
    let (back, _) = store.put_service(spec("web", 2), None, &change(), None).await.expect("back");
    assert_eq!(back.revision, 1, "the template of revision 1 again");
    let revision = store.revision(&back.spec.id(), 2).await.expect("read").expect("kept");
    assert_eq!((revision.spec.env.get("V").map(String::as_str), revision.created_by.as_str()), (Some("2"), "test"));
    // Only the last 3 are kept, and the stable one.
    let mut last = back;
    for n in 3..=6 {
        let mut next = spec("web", 2);
        next.env.insert("V".into(), n.to_string());
        last = store.put_service(next, None, &change(), Some(1)).await.expect("next").0;
    }
    assert_eq!(last.history, vec![1, 4, 5, 6], "the last three and the stable one");
    assert!(store.revision(&last.spec.id(), 3).await.expect("read").is_none(), "pruned");
    // A record too large for the bus is refused with the reason.
    let mut huge = spec("web", 2);
    huge.env.insert("BIG".into(), "x".repeat(2 * 1024 * 1024));
    let refused = store.put_service(huge, None, &change(), None).await;
    assert!(matches!(&refused, Err(StoreError::TooLarge { .. })), "{refused:?}");
    let id = last.spec.id();
    assert!(matches!(store.delete_service(&id, Some(created.version)).await, Err(StoreError::Conflict { .. })));
    store.delete_service(&id, Some(last.version)).await.expect("deleted");
    assert!(store.service(&id).await.expect("read").is_none());
    assert!(store.revision(&id, 6).await.expect("read").is_none(), "its revisions went with it");
}

#[tokio::test]
async fn fenced_writes_refuse_a_stale_writer() {
    let store = Store::open(&bus()).await.expect("store");
    let host = HostId::new("h1").expect("id");
    let mine = Assignment { host: host.clone(), replicas: Vec::new(), version: 0, generation: 1, epoch: 1, secrets: None };
    let version = store.put_assignment(&mine, 0).await.expect("first write");
    // A successor writes over it...
    let theirs = Assignment { generation: 2, epoch: 2, ..mine.clone() };
    store.put_assignment(&theirs, version).await.expect("successor's write");
    // ... so the deposed writer's late write, against what it last saw, is refused.
    let late = store.put_assignment(&Assignment { generation: 2, ..mine }, version).await;
    assert!(matches!(late, Err(StoreError::Fenced { .. })), "{late:?}");
}

struct Accept;

impl ComponentCheck for Accept {
    fn check(&self, _: &[u8]) -> Result<(), String> {
        Ok(())
    }

    fn exports(&self, _: &[u8]) -> Result<Vec<String>, String> {
        Ok(vec!["wasi:http/incoming-handler@0.2.0".to_string()])
    }
}

fn config(name: &str) -> ControlPlaneConfig {
    ControlPlaneConfig {
        host_timeout: Duration::from_millis(600),
        name: name.to_string(),
        lease: LeaseConfig::with_ttl(Duration::from_millis(600)),
        ..ControlPlaneConfig::default()
    }
}

async fn start(bus: &Bus, name: &str) -> ControlPlane {
    ControlPlane::start(bus, Arc::new(Accept), config(name)).await.expect("control plane")
}

async fn until<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends heartbeats for `hosts` every 100 ms until the task is aborted.
fn heartbeats(bus: &Bus, hosts: &[&str]) -> tokio::task::JoinHandle<()> {
    heartbeats_reporting(bus, hosts, Arc::default())
}

/// Like [`heartbeats`], each reporting the replicas in `reports` (by host).
fn heartbeats_reporting(
    bus: &Bus,
    hosts: &[&str],
    reports: Arc<std::sync::Mutex<std::collections::BTreeMap<String, Vec<wharf_proto::ReplicaStatus>>>>,
) -> tokio::task::JoinHandle<()> {
    let bus = bus.clone();
    let hosts: Vec<HostId> = hosts.iter().map(|h| HostId::new(*h).expect("id")).collect();
    tokio::spawn(async move {
        loop {
            for host in &hosts {
                let replicas = reports.lock().map(|r| r.get(host.as_str()).cloned().unwrap_or_default()).unwrap_or_default();
                let heartbeat = Heartbeat {
                    host: host.clone(),
                    addr: None,
                    labels: Default::default(),
                    capacity: Capacity { memory: ByteSize::gib(16), instances: 1000 },
                    cached: Vec::new(),
                    replicas,
                    sent_at_ms: 0,
                    started_at_ms: 1,
                    draining: false,
                    demand: Vec::new(),
                    memory_reserved: ByteSize::default(),
                    memory_in_use: ByteSize::default(),
                    memory_overcommit: None,
                    version: 0,
                    seal_key: None,
                };
                let payload = Bytes::from(serde_json::to_vec(&heartbeat).expect("json"));
                let _ = bus.publish(&host_heartbeat_subject(host), payload).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Replicas per host in the informer's assignments.
fn placed(plane: &ControlPlane) -> Vec<(String, usize, u64)> {
    plane.informer().read(|state| {
        state.assignments.values().map(|a| (a.host.to_string(), a.replicas.len(), a.version)).collect()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_scheduler_leads_spreads_replicas_and_writes_nothing_when_idle() {
    let bus = bus();
    let beats = heartbeats(&bus, &["a", "b"]);
    let first = start(&bus, "first").await;
    let second = start(&bus, "second").await;
    let leaders = || [&first, &second].iter().filter(|p| p.leadership().epoch().is_some()).count();
    until("a leader", Duration::from_secs(3), || (leaders() == 1).then_some(())).await;
    first.store().put_service(spec("web", 4), None, &change(), None).await.expect("put");
    let spread = until("replicas spread over both hosts", Duration::from_secs(10), || {
        let placed = placed(&second);
        (placed.iter().map(|p| p.1).collect::<Vec<_>>() == [2, 2]).then_some(placed)
    })
    .await;
    // Two schedulers, nothing changing: no assignment is written again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(placed(&first), spread, "an idle control plane writes nothing");
    assert_eq!(leaders(), 1, "exactly one leader all along");

    // The leader goes away: the other takes over and keeps the same plan.
    let (leader, follower) = if first.leadership().epoch().is_some() { (first, second) } else { (second, first) };
    let epoch = leader.leadership().epoch().expect("leads");
    leader.shutdown();
    let taken = until("a takeover", Duration::from_secs(2), || follower.leadership().epoch()).await;
    assert!(taken > epoch, "a new leader has a newer epoch ({taken} after {epoch})");
    // b goes silent: the new leader moves its replicas to a.
    beats.abort();
    let only_a = heartbeats(&bus, &["a"]);
    until("replicas moved off the silent host", Duration::from_secs(10), || {
        let placed = placed(&follower);
        placed.iter().any(|(h, n, _)| h == "a" && *n == 4).then_some(())
    })
    .await;
    let epochs: Vec<u64> = follower.informer().read(|s| s.assignments.values().map(|a| a.epoch).collect());
    assert!(epochs.contains(&taken), "the new leader's writes carry its epoch: {epochs:?}");
    only_a.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_stops_renewing_is_replaced_within_its_ttl() {
    let bus = bus();
    let store = Store::open(&bus).await.expect("store");
    // A "scheduler" that took the lease and then hung: never renews.
    let ghost = Lease { holder: "ghost".into(), epoch: 7, ttl_ms: 600, renewed_at_ms: 0, released: false };
    store.leader_kv().create(LEADER_KEY, Bytes::from(serde_json::to_vec(&ghost).expect("json"))).await.expect("lease");
    let plane = start(&bus, "live").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(plane.leadership(), Leadership::Follower { leader: Some("ghost".into()) }, "the lease is respected while fresh");
    let started = Instant::now();
    let epoch = until("takeover", Duration::from_secs(2), || plane.leadership().epoch()).await;
    assert_eq!(epoch, 8);
    assert!(started.elapsed() < Duration::from_millis(1500), "took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_with_a_volume_is_pinned_to_where_it_first_ran() {
    let bus = bus();
    let reports = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let beats = heartbeats_reporting(&bus, &["b"], reports.clone());
    let plane = start(&bus, "solo").await;
    until("leading", Duration::from_secs(3), || plane.leadership().epoch()).await;
    let mut notes = spec("notes", 2);
    notes.volumes = vec![wharf_proto::Volume { name: "data".into(), path: "/data".into() }];
    plane.store().put_service(notes.clone(), None, &change(), None).await.expect("put");
    // One replica first, until a replica is ready and the volume pinned.
    until("one replica placed", Duration::from_secs(10), || {
        placed(&plane).iter().any(|(h, n, _)| h == "b" && *n == 1).then_some(())
    })
    .await;
    assert!(plane.informer().read(|s| s.pins.is_empty()), "not pinned before a replica is ready");
    let ready = wharf_proto::ReplicaStatus::new(wharf_proto::ReplicaKey { service: notes.id(), revision: 1, replica: 0 }, 0, wharf_proto::ReplicaState::Ready);
    reports.lock().expect("lock").insert("b".to_string(), vec![ready]);
    until("pinned, then both replicas on b", Duration::from_secs(10), || {
        let pinned = plane.informer().read(|s| s.pins.get(&notes.id()).map(|h| h.to_string()));
        (pinned.as_deref() == Some("b") && placed(&plane).iter().any(|(h, n, _)| h == "b" && *n == 2)).then_some(())
    })
    .await;
    // b goes silent: the replicas wait for it, with the reason, rather than start empty elsewhere.
    beats.abort();
    let other = heartbeats(&bus, &["c"]);
    let status = until("unplaceable with the reason", Duration::from_secs(10), || {
        plane.informer().status(&notes.id()).filter(|s| s.unplaceable.len() == 2)
    })
    .await;
    assert!(status.unplaceable[0].reason.contains("volumes are on host b"), "{:?}", status.unplaceable);
    other.abort();
}
