//! The control plane at scale, against real processes: a real nats-server,
//! two real `wharf scheduler` processes, and many simulated hosts in this
//! process (they heartbeat over real NATS and report every replica they
//! are assigned as ready, without running wasm).
//!
//! Measures: the time to place every service of a cold apply; the leader's
//! CPU and the KV writes per second while nothing changes, with few and
//! with many services (the target: flat in the number of services); and
//! the time for the other scheduler to lead after `kill -9` of the leader.

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wharf_bus::{Bus, NatsOptions};
use wharf_proto::beats::{Beat, Beats};
use wharf_proto::names::{ASSIGNMENTS_BUCKET, STATUS_BUCKET, host_alive_subject, host_heartbeat_subject};
use wharf_proto::{Assignment, ByteSize, Capacity, Heartbeat, HostId, ReplicaState, ReplicaStatus};
use wharf_testkit::cluster::Scheduler;
use wharf_testkit::nats::NatsServer;

#[derive(clap::Args)]
pub struct ControlArgs {
    /// The `wharf` binary (default: next to this one).
    #[arg(long)]
    wharf: Option<PathBuf>,
    /// Simulated hosts.
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// Services in the small round (idle figures compared with the large one).
    #[arg(long, default_value_t = 1000)]
    small: usize,
    /// Services in all (the large round).
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Seconds the idle figures are measured over.
    #[arg(long, default_value_t = 20)]
    idle_seconds: u64,
    /// Leader kills to time.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/control.json")]
    out: PathBuf,
}

/// What each simulated host has been assigned, and the epoch of the writer.
type Assigned = Arc<Mutex<BTreeMap<HostId, Vec<wharf_proto::AssignedReplica>>>>;

pub async fn run(args: ControlArgs) -> anyhow::Result<()> {
    let wharf = crate::wharf_binary(args.wharf.as_ref())?;
    let dir = crate::scratch_dir("control")?;
    let result = measure(&args, &wharf, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure(args: &ControlArgs, wharf: &Path, dir: &Path) -> anyhow::Result<()> {
    let nats = NatsServer::start();
    let mut first = Scheduler::start(wharf, &nats.url(), &dir.join("first"), &["--name", "first"]);
    let mut second = Scheduler::start(wharf, &nats.url(), &dir.join("second"), &["--name", "second"]);
    let bus = Bus::connect_nats(&nats.url(), NatsOptions { name: "bench-hosts".into(), ..NatsOptions::default() }).await?;
    let assigned: Assigned = Arc::default();
    let hosts: Vec<HostId> = (0..args.hosts).map(|i| HostId::new(format!("sim-{i}"))).collect::<Result<_, _>>()?;
    let writes = follow_assignments(&bus, assigned.clone()).await?;
    let status_writes = count_writes(&bus, STATUS_BUCKET).await?;
    let beats = heartbeat(bus.clone(), hosts.clone(), assigned.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;

    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let api = first.api.clone();
    let token = first.token.clone();
    let hello = std::fs::read(wharf_testkit::samples::path("hello"))?;
    let uploaded: serde_json::Value =
        client.post(format!("{api}/v1/artifacts")).bearer_auth(&token).body(hello).send().await?.error_for_status()?.json().await?;
    let digest = uploaded["digest"].as_str().context("a digest")?.to_string();
    let mut report = serde_json::Map::new();

    let mut placed = 0;
    for (round, target) in [("small", args.small), ("large", args.services)] {
        let started = Instant::now();
        apply(&client, &api, &token, &digest, placed..target).await?;
        let applied = started.elapsed();
        wait_until(Duration::from_secs(600), || total(&assigned) >= target).await.with_context(|| format!("placing {target} services"))?;
        let place_all = started.elapsed();
        placed = target;
        println!(
            "{round}: {} services applied in {applied:.2?}; all placed on {} simulated hosts {place_all:.2?} after the first write ({:.0} services/s)",
            target - (if round == "small" { 0 } else { args.small }),
            args.hosts,
            (target as f64) / place_all.as_secs_f64()
        );
        report.insert(format!("{round}_services"), target.into());
        report.insert(format!("{round}_apply_to_placed_seconds"), place_all.as_secs_f64().into());
        // Settled: the leader has written every status the placement
        // changed (no write for 5 s). Then idle: nothing changes; the
        // leader should do (almost) nothing.
        let settling = Instant::now();
        let mut last = (writes.load(), status_writes.load());
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_secs(5) {
            if settling.elapsed() > Duration::from_secs(600) {
                bail!("{round}: the leader kept writing for 10 minutes after placing everything");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = (writes.load(), status_writes.load());
            if now != last {
                last = now;
                quiet_since = Instant::now();
            }
        }
        let settled = settling.elapsed().saturating_sub(Duration::from_secs(5));
        println!("{round}: statuses settled {settled:.2?} after the last placement");
        report.insert(format!("{round}_settled_after_placed_seconds"), settled.as_secs_f64().into());
        let (pid, follower) = if leads(&client, &first.api).await {
            (first.process.id(), second.process.id())
        } else if leads(&client, &second.api).await {
            (second.process.id(), first.process.id())
        } else {
            bail!("no scheduler leads")
        };
        let (cpu0, follower0, a0, s0) = (cpu_seconds(pid)?, cpu_seconds(follower)?, writes.load(), status_writes.load());
        tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
        let (cpu1, follower1, a1, s1) = (cpu_seconds(pid)?, cpu_seconds(follower)?, writes.load(), status_writes.load());
        let cpu = (cpu1 - cpu0) / args.idle_seconds as f64;
        // The follower takes in the same heartbeats and watches but runs no
        // controller: the difference is what leading costs.
        let follower_cpu = (follower1 - follower0) / args.idle_seconds as f64;
        let kv = (a1 - a0 + s1 - s0) as f64 / args.idle_seconds as f64;
        println!(
            "{round}: idle leader CPU {:.1}% of a core (follower: {:.1}%), {kv:.2} KV writes/s (assignments + statuses)",
            cpu * 100.0,
            follower_cpu * 100.0
        );
        report.insert(format!("{round}_idle_leader_cpu_fraction"), cpu.into());
        report.insert(format!("{round}_idle_follower_cpu_fraction"), follower_cpu.into());
        report.insert(format!("{round}_idle_kv_writes_per_second"), kv.into());
    }

    // Leader takeover after kill -9.
    let mut times = Vec::new();
    for kill in 0..args.kills {
        let (victim, survivor) = if leads(&client, &first.api).await { (&mut first, &second) } else { (&mut second, &first) };
        let killed = Instant::now();
        victim.process.kill();
        while !leads(&client, &survivor.api).await {
            if killed.elapsed() > Duration::from_secs(10) {
                bail!("no takeover within 10 s of kill {}", kill + 1);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = killed.elapsed();
        times.push(took);
        eprintln!("kill {}/{}: the other scheduler led after {took:.2?}", kill + 1, args.kills);
        let name = if victim.process.id() == first.process.id() { "first" } else { "second" };
        let restarted = Scheduler::start(wharf, &nats.url(), &dir.join(name), &["--name", name]);
        if name == "first" {
            first = restarted;
        } else {
            second = restarted;
        }
        // The restarted one waits for its heartbeat window: let it settle.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    times.sort();
    let p50 = times.get(times.len() / 2).copied().unwrap_or_default();
    let max = times.last().copied().unwrap_or_default();
    println!("leader takeover after kill -9, {} kills: p50 {p50:.2?}, p99/max {max:.2?} (target < 2 s)", times.len());
    report.insert("takeover_p50_seconds".into(), p50.as_secs_f64().into());
    report.insert("takeover_p99_seconds".into(), max.as_secs_f64().into());
    report.insert("takeover_kills".into(), times.len().into());
    report.insert("hosts".into(), args.hosts.into());
    beats.abort();
    crate::write_report(&args.out, &report)
}

/// Whether the scheduler at `api` says it leads.
async fn leads(client: &reqwest::Client, api: &str) -> bool {
    let Ok(response) = client.get(format!("{api}/healthz")).timeout(Duration::from_millis(500)).send().await else { return false };
    response.json::<serde_json::Value>().await.is_ok_and(|v| v["leadership"]["leader"] == true)
}

/// PUTs services `svc-<i>` for `range`, 32 at a time.
async fn apply(client: &reqwest::Client, api: &str, token: &str, digest: &str, range: std::ops::Range<usize>) -> anyhow::Result<()> {
    let bodies = futures::stream::iter(range.map(|i| {
        let url = format!("{api}/v1/namespaces/default/services/svc-{i}");
        let body = serde_json::json!({"component": digest, "replicas": 1, "limits": {"memory": "1MiB", "concurrency": 1}});
        let request = client.put(url).bearer_auth(token).json(&body);
        async move {
            let response = request.send().await?;
            if !response.status().is_success() {
                bail!("PUT refused: {}", response.text().await.unwrap_or_default());
            }
            Ok(())
        }
    }));
    let results: Vec<anyhow::Result<()>> = bodies.buffer_unordered(32).collect().await;
    results.into_iter().collect()
}

async fn wait_until(within: Duration, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !check() {
        if Instant::now() > deadline {
            bail!("not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn total(assigned: &Assigned) -> usize {
    assigned.lock().map(|a| a.values().map(Vec::len).sum()).unwrap_or(0)
}

/// A counter shared with a task.
#[derive(Clone, Default)]
struct Counter(Arc<std::sync::atomic::AtomicU64>);

impl Counter {
    fn load(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Follows every host's assignment (one watch for all, dispatched here);
/// counts the writes seen.
async fn follow_assignments(bus: &Bus, assigned: Assigned) -> anyhow::Result<Counter> {
    let mut watch = bus.kv(ASSIGNMENTS_BUCKET).await?.watch(">").await?;
    let writes = Counter::default();
    let counter = writes.clone();
    tokio::spawn(async move {
        while let Some(event) = watch.next().await {
            counter.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(value) = event.value else { continue };
            let Ok(assignment) = serde_json::from_slice::<Assignment>(&value) else { continue };
            if let Ok(mut map) = assigned.lock() {
                map.insert(assignment.host.clone(), assignment.replicas);
            }
        }
    });
    Ok(writes)
}

/// Counts the writes to `bucket`.
async fn count_writes(bus: &Bus, bucket: &str) -> anyhow::Result<Counter> {
    let mut watch = bus.kv(bucket).await?.watch(">").await?;
    let writes = Counter::default();
    let counter = writes.clone();
    tokio::spawn(async move {
        while watch.next().await.is_some() {
            counter.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    Ok(writes)
}

/// Every 500 ms, a heartbeat from each simulated host reporting each
/// replica it is assigned as ready: as a real host does, the full report
/// when it changed or the control plane asked for it, else "alive, nothing
/// changed" ([`wharf_proto::beats`]).
fn heartbeat(bus: Bus, hosts: Vec<HostId>, assigned: Assigned) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started_at_ms = 1;
        let beats: Arc<Mutex<HashMap<HostId, Beats>>> = Arc::default();
        match bus.subscribe("wharf.host.*.resend").await {
            Ok(mut asked) => {
                let beats = beats.clone();
                tokio::spawn(async move {
                    while let Some(message) = asked.next().await {
                        let host = message.subject.split('.').nth(2).and_then(|h| HostId::new(h).ok());
                        if let (Some(host), Ok(mut beats)) = (host, beats.lock()) {
                            beats.entry(host).or_default().resend();
                        }
                    }
                });
            }
            Err(e) => eprintln!("simulated hosts cannot hear requests for full heartbeats: {e}"),
        }
        loop {
            let tick = Instant::now();
            let snapshot: HashMap<HostId, Vec<wharf_proto::AssignedReplica>> =
                assigned.lock().map(|a| a.iter().map(|(h, r)| (h.clone(), r.clone())).collect()).unwrap_or_default();
            for host in &hosts {
                let replicas = snapshot
                    .get(host)
                    .into_iter()
                    .flatten()
                    .map(|r| ReplicaStatus::new(r.key(), r.attempt, ReplicaState::Ready))
                    .collect();
                let heartbeat = Heartbeat {
                    host: host.clone(),
                    addr: None,
                    labels: BTreeMap::from([("zone".to_string(), format!("z{}", host.as_str().len() % 3))]),
                    capacity: Capacity { memory: ByteSize::gib(64), instances: 100_000 },
                    cached: Vec::new(),
                    replicas,
                    sent_at_ms: now_ms(),
                    started_at_ms,
                    draining: false,
                    demand: Vec::new(),
                    memory_reserved: ByteSize::default(),
                    memory_in_use: ByteSize::default(),
                    memory_overcommit: None,
                    version: 0,
                    seal_key: None,
                };
                let Ok(beat) = beats.lock().map(|mut b| b.entry(host.clone()).or_default().next(heartbeat)) else { return };
                let (subject, payload) = match &beat {
                    Beat::Full(full) => (host_heartbeat_subject(host), serde_json::to_vec(full)),
                    Beat::Alive(alive) => (host_alive_subject(host), serde_json::to_vec(alive)),
                };
                if let Ok(payload) = payload {
                    let _ = bus.publish(&subject, Bytes::from(payload)).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(500).saturating_sub(tick.elapsed())).await;
        }
    })
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces, in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("a /proc stat line")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    // /proc counts in USER_HZ, which Linux fixes at 100 in its ABI.
    Ok((utime + stime) / 100.0)
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
