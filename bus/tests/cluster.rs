//! The NATS bus over a real 3-node nats-server cluster: buckets kept on
//! three servers, and a client that rides over the loss of one of them
//! (`kill -9`) with no acknowledged write lost and its watches going on.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use wharf_bus::{Bus, ClientGone, DisconnectReason, KvEvent, NatsAuth, NatsOptions};
use wharf_testkit::nats::{ClusterOptions, NatsCluster};

/// How long a test waits for something that should happen, on a busy machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// How soon writes must succeed again after a node is killed: a new stream
/// leader is elected in a few seconds, more on a machine busy with other builds.
const WRITES_RESUME_WITHIN: Duration = Duration::from_secs(20);

async fn connect(cluster: &NatsCluster, options: NatsOptions) -> Bus {
    Bus::connect_nats(&cluster.urls(), options)
        .await
        .expect("connect to the cluster")
}

fn named(name: &str) -> NatsOptions {
    NatsOptions {
        name: name.to_owned(),
        ..NatsOptions::default()
    }
}

/// Waits until stream `stream` reports `replicas` copies.
async fn wait_for_replicas(cluster: &NatsCluster, stream: &str, replicas: u64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found = cluster.stream_replicas(stream);
        if found == Some(replicas) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{stream} has {found:?} replicas, not {replicas}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn buckets_are_kept_on_three_servers() {
    let cluster = NatsCluster::start(3);
    let bus = connect(&cluster, named("wharf-test")).await;
    bus.kv("state").await.expect("kv");
    wait_for_replicas(&cluster, "KV_state", 3).await;
    bus.objects("artifacts").await.expect("objects");
    wait_for_replicas(&cluster, "OBJ_artifacts", 3).await;

    // A bus told otherwise creates buckets with that many copies...
    let one = connect(
        &cluster,
        NatsOptions {
            replicas: Some(1),
            ..named("wharf-one")
        },
    )
    .await;
    one.kv("single").await.expect("kv");
    wait_for_replicas(&cluster, "KV_single", 1).await;
    // ...and brings existing buckets to it when it owns them.
    one.kv_with("state", one.storage_limits().state)
        .await
        .expect("kv");
    wait_for_replicas(&cluster, "KV_state", 1).await;

    // A bus left to itself adds copies to a bucket that has too few.
    bus.kv_with("single", bus.storage_limits().state)
        .await
        .expect("kv");
    wait_for_replicas(&cluster, "KV_single", 3).await;
    // Opening without options changes nothing.
    bus.kv("state").await.expect("kv");
    wait_for_replicas(&cluster, "KV_state", 1).await;
}

/// What the writer of [`a_client_rides_over_the_loss_of`] saw: every acknowledged write, and when.
struct Written {
    /// key → (value written, revision acknowledged, when).
    acked: BTreeMap<String, (u64, u64, Instant)>,
    failures: usize,
}

/// One acknowledged write: when it was sent, and when its acknowledgement came.
struct Ack {
    sent: Instant,
}

/// Writes `k<n>` = n for n = 0, 1, ... until told to stop, through the outage.
async fn write_until_stopped(
    kv: wharf_bus::Kv,
    mut stop: tokio::sync::watch::Receiver<bool>,
    progress: mpsc::UnboundedSender<Ack>,
) -> Written {
    let mut written = Written {
        acked: BTreeMap::new(),
        failures: 0,
    };
    for n in 0u64.. {
        if *stop.borrow_and_update() {
            break;
        }
        let key = format!("k{n:06}");
        let sent = Instant::now();
        match kv.put(&key, Bytes::from(n.to_string())).await {
            Ok(revision) => {
                written.acked.insert(key, (n, revision, Instant::now()));
                let _ = progress.send(Ack { sent });
            }
            Err(_) => {
                written.failures += 1;
                // Not a busy loop while there is no leader; the client's own timeout paces the rest.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    written
}

/// Kills (`kill -9`) the node `victim` picks while a client writes and
/// watches, then checks that writes resume within a few seconds, that no
/// acknowledged write is lost, and that the watch saw every one of them.
async fn a_client_rides_over_the_loss_of(victim: impl Fn(&NatsCluster) -> usize) {
    let mut cluster = NatsCluster::start(3);
    let bus = connect(&cluster, named("wharf-writer")).await;
    let kv = bus.kv("orders").await.expect("kv");
    wait_for_replicas(&cluster, "KV_orders", 3).await;
    let mut watch = kv.watch(">").await.expect("watch");
    let (events_tx, mut events) = mpsc::unbounded_channel::<(KvEvent, Instant)>();
    tokio::spawn(async move {
        while let Some(event) = watch.next().await {
            if events_tx.send((event, Instant::now())).is_err() {
                break;
            }
        }
    });
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (progress_tx, mut progress) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_until_stopped(kv.clone(), stop, progress_tx));
    let mut acks_before_kill = 0;
    while acks_before_kill < 50 {
        tokio::time::timeout(PATIENCE, progress.recv())
            .await
            .expect("writes go through before the kill")
            .expect("the writer stopped");
        acks_before_kill += 1;
    }

    let victim = victim(&cluster);
    cluster.kill(victim);
    let killed = Instant::now();
    // The first write sent after the kill that is acknowledged: acks of
    // writes sent before it may still be on their way.
    let first_ack_after = tokio::time::timeout(WRITES_RESUME_WITHIN, async {
        loop {
            let ack = progress.recv().await.expect("the writer stopped");
            if ack.sent > killed {
                return Instant::now();
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!("no write succeeded within {WRITES_RESUME_WITHIN:?} of killing n{victim}")
    });
    let mut acks_after_kill = 1;
    while acks_after_kill < 100 {
        tokio::time::timeout(PATIENCE, progress.recv())
            .await
            .expect("writes keep going after the kill")
            .expect("the writer stopped");
        acks_after_kill += 1;
    }
    stop_tx.send(true).expect("stop the writer");
    let written = writer.await.expect("the writer panicked");
    println!(
        "killed n{victim}: writes resumed after {:?} ({} failed meanwhile)",
        first_ack_after - killed,
        written.failures
    );

    // No acknowledged write is lost.
    for (key, (value, revision, _)) in &written.acked {
        let entry = kv
            .get(key)
            .await
            .expect("get after the kill")
            .unwrap_or_else(|| panic!("acknowledged write {key} (revision {revision}) is lost"));
        assert_eq!(
            (entry.value, entry.revision),
            (Bytes::from(value.to_string()), *revision),
            "{key}"
        );
    }

    // The watch went on: it saw every acknowledged write, once, in order.
    let mut seen: BTreeMap<String, (u64, Instant)> = BTreeMap::new();
    let mut last_revision = 0;
    let deadline = Instant::now() + PATIENCE;
    while written.acked.keys().any(|key| !seen.contains_key(key)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let (event, at) = tokio::time::timeout(left, events.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the watch saw {} of {} acknowledged writes",
                    seen.len(),
                    written.acked.len()
                )
            })
            .expect("the watch ended");
        assert!(
            event.revision > last_revision,
            "revision {} after {last_revision}",
            event.revision
        );
        last_revision = event.revision;
        assert!(
            seen.insert(event.key.clone(), (event.revision, at))
                .is_none(),
            "{} seen twice",
            event.key
        );
    }
    let mut worst_lag = Duration::ZERO;
    for (key, (_, revision, acked_at)) in &written.acked {
        let (seen_revision, seen_at) = seen[key];
        assert_eq!(seen_revision, *revision, "{key}");
        worst_lag = worst_lag.max(seen_at.saturating_duration_since(*acked_at));
    }
    println!("the watch lagged an acknowledgement by at most {worst_lag:?}");
    assert!(
        worst_lag < WRITES_RESUME_WITHIN,
        "the watch fell {worst_lag:?} behind"
    );

    // The node comes back, catches up, and serves every write from its own
    // connections. (Right after it rejoins, a listing may briefly miss the
    // newest keys: JetStream can serve it from the replica still catching up.)
    cluster.restart(victim);
    let only_victim = Bus::connect_nats(&cluster.url(victim), named("wharf-reader"))
        .await
        .expect("connect to the restarted node");
    let kv = only_victim.kv("orders").await.expect("kv");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut missing = 0;
        for (key, (_, revision, _)) in &written.acked {
            let entry = kv.get(key).await.expect("get from the restarted node");
            if entry.map(|entry| entry.revision) != Some(*revision) {
                missing += 1;
            }
        }
        let keys = kv.keys().await.expect("keys").len();
        if missing == 0 && keys == written.acked.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted node lacks {missing} writes and lists {keys} keys of {}",
            written.acked.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_client_rides_over_the_loss_of_the_streams_leader() {
    a_client_rides_over_the_loss_of(|cluster| {
        cluster
            .stream_leader("KV_orders")
            .expect("the bucket's stream has a leader")
    })
    .await;
}

#[tokio::test]
async fn a_client_rides_over_the_loss_of_its_own_server() {
    a_client_rides_over_the_loss_of(|cluster| {
        cluster
            .node_of_client("wharf-writer")
            .expect("the writer is connected to a node")
    })
    .await;
}

#[tokio::test]
async fn a_disconnect_on_any_server_is_heard() {
    let options = ClusterOptions {
        config: r#"
            accounts {
              WHARF: { jetstream: enabled, users: [ { user: wharf, password: w } ] }
              SYS: { users: [ { user: system, password: s } ] }
            }
            system_account: SYS
        "#
        .to_owned(),
        ..ClusterOptions::default()
    };
    let cluster = NatsCluster::start_with(3, &options);
    let wharf = NatsAuth::UserPassword {
        user: "wharf".to_owned(),
        password: "w".to_owned(),
    };
    // The scheduler on node 0 only; the host on node 2 only.
    let scheduler = Bus::connect_nats(
        &cluster.url(0),
        NatsOptions {
            auth: wharf.clone(),
            system_auth: Some(NatsAuth::UserPassword {
                user: "system".to_owned(),
                password: "s".to_owned(),
            }),
            ..named("wharf-scheduler")
        },
    )
    .await
    .expect("connect the scheduler");
    let mut disconnects = scheduler.client_disconnects().await.expect("advisories");
    let host = Bus::connect_nats(
        &cluster.url(2),
        NatsOptions {
            auth: wharf,
            ..named("wharf-host-far")
        },
    )
    .await
    .expect("connect the host");
    drop(host);
    let gone: ClientGone = tokio::time::timeout(PATIENCE, disconnects.next())
        .await
        .expect("no advisory from the other server")
        .expect("the advisories ended");
    assert_eq!(gone.name, "wharf-host-far");
    assert_eq!(gone.server, cluster.name(2));
    assert_eq!(gone.reason, DisconnectReason::ClientClosed);
}

/// A clustered stream refuses a compare-and-set with an error code of its
/// own (10164, not 10071): it is still a revision mismatch, or an existing
/// key for a create, never "unavailable"; and two writers of the same
/// value expecting the same revision are two writes, one of them refused.
#[tokio::test]
async fn compare_and_set_conflicts_are_named_on_a_cluster() {
    let cluster = NatsCluster::start(3);
    let bus = connect(&cluster, named("wharf-test")).await;
    let kv = bus.kv("cas").await.expect("kv");
    let first = kv.put("n", Bytes::from_static(b"5")).await.expect("put");
    kv.update("n", Bytes::from_static(b"6"), first).await.expect("update");
    let stale = kv.update("n", Bytes::from_static(b"7"), first).await;
    assert!(matches!(stale, Err(wharf_bus::KvError::RevisionMismatch { .. })), "{stale:?}");
    let taken = kv.create("n", Bytes::from_static(b"8")).await;
    assert!(matches!(taken, Err(wharf_bus::KvError::AlreadyExists { .. })), "{taken:?}");

    // Ten increments by compare-and-set from two clients at once count ten.
    let other = connect(&cluster, named("wharf-test-2")).await;
    let kvs = [kv.clone(), other.kv("cas").await.expect("kv")];
    let mut tasks = tokio::task::JoinSet::new();
    for kv in kvs {
        tasks.spawn(async move {
            for _ in 0..5 {
                loop {
                    let entry = kv.get("n").await.expect("get").expect("a value");
                    let value: u64 = std::str::from_utf8(&entry.value).expect("utf-8").parse().expect("a number");
                    match kv.update("n", Bytes::from((value + 1).to_string()), entry.revision).await {
                        Ok(_) => break,
                        Err(wharf_bus::KvError::RevisionMismatch { .. }) => continue,
                        Err(e) => panic!("increment failed: {e}"),
                    }
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task");
    }
    let entry = kv.get("n").await.expect("get").expect("a value");
    assert_eq!(entry.value, Bytes::from_static(b"16"));
}
