//! The control plane over the in-process bus: the store's compare-and-set,
//! and the controller turning services and heartbeats into assignments.

use bytes::Bytes;
use std::time::Duration;
use wharf_bus::{Bus, LocalStore};
use wharf_proto::names::host_heartbeat_subject;
use wharf_proto::{ByteSize, Capacity, Digest, Heartbeat, HostId, ServiceSpec};
use wharf_scheduler::autoscale::Autoscaling;
use wharf_scheduler::controller::{UnplaceableMap, reconcile_once};
use wharf_scheduler::hosts::HostTable;
use wharf_scheduler::store::{Store, StoreError, Written};

fn bus() -> Bus {
    Bus::local(LocalStore::in_memory().expect("in-memory store"))
}

fn spec(name: &str, replicas: u32) -> ServiceSpec {
    let mut spec = ServiceSpec::new(name, Digest::of(name.as_bytes()));
    spec.replicas = replicas;
    spec
}

#[tokio::test]
async fn writes_are_compare_and_set_and_idempotent() {
    let store = Store::open(&bus()).await.expect("store");
    let (created, how) = store.put_service(spec("web", 1), Some(0)).await.expect("created");
    assert_eq!((how, created.generation), (Written::Created, 1));
    assert!(matches!(store.put_service(spec("web", 1), Some(0)).await, Err(StoreError::Exists(_))));
    let (same, how) = store.put_service(spec("web", 1), None).await.expect("unchanged");
    assert_eq!((how, same.revision, same.generation), (Written::Unchanged, created.revision, 1));
    let (updated, how) = store.put_service(spec("web", 2), Some(created.revision)).await.expect("updated");
    assert_eq!((how, updated.generation), (Written::Updated, 2));
    let stale = store.put_service(spec("web", 5), Some(created.revision)).await;
    assert!(matches!(stale, Err(StoreError::Conflict { .. })), "{stale:?}");
    let current = store.service(&updated.spec.id()).await.expect("read").expect("exists");
    assert_eq!(current.spec.replicas, 2, "the stale write changed nothing");
    assert!(matches!(store.delete_service(&current.spec.id(), Some(created.revision)).await, Err(StoreError::Conflict { .. })));
    store.delete_service(&current.spec.id(), Some(current.revision)).await.expect("deleted");
    assert!(store.service(&current.spec.id()).await.expect("read").is_none());
}

fn ready_replica(spec: &ServiceSpec, replica: u32) -> wharf_proto::ReplicaStatus {
    wharf_proto::ReplicaStatus {
        service: spec.id(),
        replica,
        generation: 1,
        state: wharf_proto::ReplicaState::Ready,
        error: None,
        in_flight: 0,
        requests: 0,
        latency_micros: 0,
    }
}

async fn beat(bus: &Bus, host: &str) {
    beat_with(bus, host, Vec::new()).await;
}

async fn beat_with(bus: &Bus, host: &str, replicas: Vec<wharf_proto::ReplicaStatus>) {
    let heartbeat = Heartbeat {
        host: HostId::new(host).expect("id"),
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
    };
    let subject = host_heartbeat_subject(&heartbeat.host);
    bus.publish(&subject, Bytes::from(serde_json::to_vec(&heartbeat).expect("json"))).await.expect("published");
}

#[tokio::test]
async fn the_controller_spreads_replicas_and_moves_them_off_a_silent_host() {
    let bus = bus();
    let store = Store::open(&bus).await.expect("store");
    let hosts = HostTable::follow(&bus, Duration::from_millis(600)).await.expect("hosts");
    let unplaceable = UnplaceableMap::default();
    store.put_service(spec("web", 4), None).await.expect("put");
    for _ in 0..3 {
        beat(&bus, "a").await;
        beat(&bus, "b").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reconcile_once(&store, &hosts, &unplaceable, &Autoscaling::default()).await.expect("reconcile");
    let assignments = store.assignments().await.expect("assignments");
    let counts: Vec<usize> = assignments.iter().map(|a| a.replicas.len()).collect();
    assert_eq!(counts, vec![2, 2], "spread evenly: {assignments:?}");
    // Reconciling an unchanged world writes nothing.
    reconcile_once(&store, &hosts, &unplaceable, &Autoscaling::default()).await.expect("reconcile");
    let again = store.assignments().await.expect("assignments");
    assert_eq!(again.iter().map(|a| a.revision).collect::<Vec<_>>(), assignments.iter().map(|a| a.revision).collect::<Vec<_>>());

    // b goes silent: its replicas move to a.
    for _ in 0..10 {
        beat(&bus, "a").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reconcile_once(&store, &hosts, &unplaceable, &Autoscaling::default()).await.expect("reconcile");
    let moved = store.assignments().await.expect("assignments");
    let a = moved.iter().find(|x| x.host.as_str() == "a").expect("a");
    let b = moved.iter().find(|x| x.host.as_str() == "b").expect("b");
    assert_eq!((a.replicas.len(), b.replicas.len()), (4, 0), "{moved:?}");
}

#[tokio::test]
async fn a_service_with_a_volume_is_pinned_to_a_ready_host_and_waits_for_it() {
    let bus = bus();
    let store = Store::open(&bus).await.expect("store");
    let hosts = HostTable::follow(&bus, Duration::from_millis(600)).await.expect("hosts");
    let unplaceable = UnplaceableMap::default();
    let scaling = Autoscaling::default();
    for _ in 0..3 {
        beat(&bus, "a").await;
        beat(&bus, "b").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // a goes silent before the service exists.
    for _ in 0..10 {
        beat(&bus, "b").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut notes = spec("notes", 2);
    notes.volumes = vec![wharf_proto::Volume { name: "data".into(), path: "/data".into() }];
    store.put_service(notes.clone(), None).await.expect("put");
    reconcile_once(&store, &hosts, &unplaceable, &scaling).await.expect("reconcile");
    assert!(store.volume_pins().await.expect("pins").is_empty(), "not pinned before a replica is ready");
    let first = store.assignments().await.expect("assignments");
    let placed: Vec<_> = first.iter().filter(|a| !a.replicas.is_empty()).map(|a| a.host.as_str().to_string()).collect();
    assert_eq!(placed, vec!["b".to_string()], "one replica first, on the ready host");
    beat_with(&bus, "b", vec![ready_replica(&notes, 0)]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    reconcile_once(&store, &hosts, &unplaceable, &scaling).await.expect("reconcile");
    let pins = store.volume_pins().await.expect("pins");
    assert_eq!(pins.get(&notes.id()).map(|h| h.as_str()), Some("b"), "pinned to the host where it became ready");
    reconcile_once(&store, &hosts, &unplaceable, &scaling).await.expect("reconcile");
    let assignments = store.assignments().await.expect("assignments");
    let on_b = assignments.iter().find(|x| x.host.as_str() == "b").map_or(0, |x| x.replicas.len());
    assert_eq!(on_b, 2, "both replicas with the volume's host: {assignments:?}");

    // b goes silent too: the replicas wait for it, with the reason.
    tokio::time::sleep(Duration::from_millis(800)).await;
    reconcile_once(&store, &hosts, &unplaceable, &scaling).await.expect("reconcile");
    let reasons = unplaceable.lock().expect("lock").get(&notes.id()).cloned().unwrap_or_default();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].reason.contains("volumes are on host b"), "{}", reasons[0].reason);
}
