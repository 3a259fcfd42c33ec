//! A chaos soak: a real 3-node NATS cluster, two `wharf scheduler`
//! processes and three `wharf host` processes on loopback, serving steady
//! traffic and counting increments while, in turn, a host, the leading
//! scheduler and a NATS node are killed with `kill -9` and started again.
//! A new service is deployed every minute meanwhile.
//!
//! Reports: increments acknowledged vs counted (lost = acknowledged but not
//! counted), deployments acknowledged vs present and ready at the end,
//! failed requests as a share and how many fell outside the windows after a
//! kill, and each process's resident memory at its start and end.

use anyhow::{Context, bail};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wharf_testkit::cluster::{Host, Scheduler};
use wharf_testkit::nats::NatsCluster;

#[derive(clap::Args)]
pub struct SoakArgs {
    /// The `wharf` binary (default: next to this one).
    #[arg(long)]
    wharf: Option<PathBuf>,
    /// How long the soak runs, in minutes.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Seconds between two kills (a host, the leader, a NATS node, in turn).
    #[arg(long, default_value_t = 45)]
    chaos_every: u64,
    /// Seconds a killed process stays down before it is started again.
    #[arg(long, default_value_t = 5)]
    down_for: u64,
    /// Seconds after a kill in which failed requests count as inside its failover window.
    #[arg(long, default_value_t = 15)]
    window: u64,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/soak.json")]
    out: PathBuf,
}

/// Everything the soak started, shared with the traffic tasks.
struct Fleet {
    wharf: PathBuf,
    dir: PathBuf,
    urls: String,
    schedulers: Vec<Option<Scheduler>>,
    hosts: Vec<Option<Host>>,
    /// Resident memory per process incarnation: (first, last) sample in KiB.
    rss: BTreeMap<String, (u64, u64)>,
    /// How many times each process was started.
    starts: BTreeMap<String, u32>,
}

const HOSTS: [(&str, &str); 3] = [("host-a", "a"), ("host-b", "b"), ("host-c", "c")];
const SCHEDULERS: [&str; 2] = ["s1", "s2"];

impl Fleet {
    fn start_scheduler(&mut self, index: usize) {
        let name = SCHEDULERS[index];
        let scheduler = Scheduler::start(&self.wharf, &self.urls, &self.dir.join(name), &["--name", name]);
        self.schedulers[index] = Some(scheduler);
        *self.starts.entry(name.to_string()).or_default() += 1;
        self.rss.remove(name);
    }

    fn start_host(&mut self, index: usize) {
        let (name, zone) = HOSTS[index];
        self.hosts[index] = Some(Host::start(&self.wharf, &self.urls, name, zone, &self.dir, &[]));
        *self.starts.entry(name.to_string()).or_default() += 1;
        self.rss.remove(name);
    }

    /// A scheduler that is up, for API calls (both serve the API).
    fn api(&self) -> Option<&Scheduler> {
        self.schedulers.iter().flatten().next()
    }

    fn ingresses(&self) -> Vec<String> {
        self.hosts.iter().flatten().map(|h| h.ingress.clone()).collect()
    }

    /// Samples every live process's resident memory.
    fn sample_rss(&mut self) {
        let mut live: Vec<(String, u32)> = Vec::new();
        for (i, s) in self.schedulers.iter().enumerate() {
            if let Some(s) = s {
                live.push((SCHEDULERS[i].to_string(), s.process.id()));
            }
        }
        for (i, h) in self.hosts.iter().enumerate() {
            if let Some(h) = h {
                live.push((HOSTS[i].0.to_string(), h.process.id()));
            }
        }
        for (name, pid) in live {
            if let Some(kib) = rss_kib(pid) {
                let entry = self.rss.entry(name).or_insert((kib, kib));
                entry.1 = kib;
            }
        }
    }
}

/// Resident memory of `pid` in KiB, from /proc.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A scheduler's `/healthz` says it leads.
async fn leads(client: &reqwest::Client, api: &str) -> bool {
    let Ok(response) = client.get(format!("{api}/healthz")).send().await else { return false };
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    body["leadership"]["leader"] == true
}

/// Failed requests, with when they were sent (ms since the soak started).
#[derive(Default)]
struct Failures {
    at_ms: Mutex<Vec<(u64, String)>>,
}

/// A client sending requests to the ingresses that are up, in turn.
#[derive(Clone)]
struct Traffic {
    client: reqwest::Client,
    ingresses: Arc<Mutex<Vec<String>>>,
    failures: Arc<Failures>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    started: Instant,
}

impl Traffic {
    /// GETs `/path` every `pause` until stopped, starting at ingress
    /// `first`; returns the path, the requests answered 200 and those that
    /// failed (each recorded with when).
    async fn run(self, path: &'static str, first: usize, pause: Duration) -> (&'static str, u64, u64) {
        let (mut ok, mut failed, mut i) = (0, 0, first);
        while !self.stop.load(Ordering::Relaxed) {
            let Some(url) = self.ingresses.lock().ok().and_then(|list| (!list.is_empty()).then(|| format!("{}/{path}", list[i % list.len()]))) else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            i += 1;
            // A failure counts from when its request was sent (one may wait out a deadline).
            let sent = self.started.elapsed().as_millis() as u64;
            match self.client.get(&url).send().await {
                Ok(r) if r.status() == 200 => ok += 1,
                other => {
                    failed += 1;
                    let what = match other {
                        Ok(r) => format!("{} {}", r.status(), r.text().await.unwrap_or_default().trim()),
                        Err(e) => e.to_string(),
                    };
                    if let Ok(mut list) = self.failures.at_ms.lock() {
                        list.push((sent, format!("GET {url}: {what}")));
                    }
                }
            }
            tokio::time::sleep(pause).await;
        }
        (path, ok, failed)
    }
}

pub async fn run(args: SoakArgs) -> anyhow::Result<()> {
    let wharf = crate::wharf_binary(args.wharf.as_ref())?;
    if !wharf.is_file() {
        bail!("{} not found: build it first with `cargo build --release --bin wharf` (or pass --wharf)", wharf.display());
    }
    let dir = crate::scratch_dir("soak")?;
    let result = soak(&args, &wharf, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn soak(args: &SoakArgs, wharf: &Path, dir: &Path) -> anyhow::Result<()> {
    eprintln!("building the sample components ...");
    let hello = wharf_testkit::samples::path("hello").to_str().context("utf-8")?.to_string();
    let counter = wharf_testkit::samples::path("counter").to_str().context("utf-8")?.to_string();
    let mut nats = NatsCluster::start(3);
    let mut fleet = Fleet {
        wharf: wharf.to_path_buf(),
        dir: dir.to_path_buf(),
        urls: nats.urls(),
        schedulers: vec![None, None],
        hosts: vec![None, None, None],
        rss: BTreeMap::new(),
        starts: BTreeMap::new(),
    };
    for i in 0..SCHEDULERS.len() {
        fleet.start_scheduler(i);
    }
    for i in 0..HOSTS.len() {
        fleet.start_host(i);
    }
    let api = fleet.api().context("a scheduler")?;
    api.ok(&["deploy", &hello, "--name", "web", "--route", "/web", "--replicas", "3", "--spread", "zone"]);
    api.ok(&["deploy", &counter, "--name", "counter", "--route", "/", "--replicas", "3", "--spread", "zone", "--keyvalue", "counter", "--timeout", "30s"]);
    let started = Instant::now();
    while api.hosts_of("web").len() < 3 || api.hosts_of("counter").len() < 3 {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("web and counter did not get 3 ready replicas each within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("soak: {} minutes, a kill every {} s", args.minutes, args.chaos_every);

    let soak_started = Instant::now();
    let ingresses = Arc::new(Mutex::new(fleet.ingresses()));
    let failures = Arc::new(Failures::default());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(40)).pool_max_idle_per_host(0).build()?;
    let mut tasks = tokio::task::JoinSet::new();
    let traffic = Traffic { client: client.clone(), ingresses: ingresses.clone(), failures: failures.clone(), stop: stop.clone(), started: soak_started };
    // Steady traffic: two clients on /web; increments one at a time, which
    // must all be counted when acknowledged (a failed one may or may not).
    tasks.spawn(traffic.clone().run("web", 0, Duration::from_millis(5)));
    tasks.spawn(traffic.clone().run("web", 1, Duration::from_millis(5)));
    tasks.spawn(traffic.run("hit", 0, Duration::from_millis(20)));

    // Chaos and deploys, on this task.
    let mut kills: Vec<(u64, String)> = Vec::new();
    let mut deployed: Vec<String> = Vec::new();
    let mut deploy_failures = 0u32;
    let mut next_kill = Instant::now() + Duration::from_secs(args.chaos_every);
    let mut next_deploy = Instant::now() + Duration::from_secs(20);
    let mut next_sample = Instant::now();
    let (mut host_turn, mut nats_turn, mut turn) = (0usize, 0usize, 0usize);
    let end = soak_started + Duration::from_secs(args.minutes * 60);
    let health = reqwest::Client::builder().timeout(Duration::from_millis(500)).build()?;
    while Instant::now() < end {
        if Instant::now() >= next_sample {
            fleet.sample_rss();
            next_sample = Instant::now() + Duration::from_secs(30);
        }
        if Instant::now() >= next_deploy {
            let name = format!("soak-{}", deployed.len() + 1);
            let mut done = false;
            // Retried while the API is changing hands; every attempt that is not acknowledged counts.
            for _ in 0..20 {
                if let Some(api) = fleet.api() {
                    let (ok, text) = api.wharf(&["deploy", &hello, "--name", &name, "--route", &format!("/{name}"), "--no-wait"]);
                    if ok {
                        done = true;
                        break;
                    }
                    deploy_failures += 1;
                    eprintln!("  deploy {name} not acknowledged (retrying): {}", text.trim());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            if done {
                deployed.push(name);
            }
            next_deploy = Instant::now() + Duration::from_secs(60);
        }
        if Instant::now() >= next_kill {
            let at = soak_started.elapsed();
            let action = match turn % 3 {
                0 => {
                    let index = host_turn % HOSTS.len();
                    host_turn += 1;
                    if let Some(mut host) = fleet.hosts[index].take() {
                        if let Ok(mut list) = ingresses.lock() {
                            list.retain(|u| *u != host.ingress);
                        }
                        host.process.kill();
                    }
                    tokio::time::sleep(Duration::from_secs(args.down_for)).await;
                    fleet.start_host(index);
                    if let Ok(mut list) = ingresses.lock() {
                        *list = fleet.ingresses();
                    }
                    format!("kill -9 {}", HOSTS[index].0)
                }
                1 => {
                    let mut leader = None;
                    for (i, s) in fleet.schedulers.iter().enumerate() {
                        if let Some(s) = s
                            && leads(&health, &s.api).await
                        {
                            leader = Some(i);
                        }
                    }
                    let index = leader.unwrap_or(0);
                    if let Some(mut scheduler) = fleet.schedulers[index].take() {
                        scheduler.process.kill();
                    }
                    tokio::time::sleep(Duration::from_secs(args.down_for)).await;
                    fleet.start_scheduler(index);
                    format!("kill -9 scheduler {} ({})", SCHEDULERS[index], if leader.is_some() { "the leader" } else { "no leader found" })
                }
                _ => {
                    let index = nats_turn % nats.size();
                    nats_turn += 1;
                    nats.kill(index);
                    tokio::time::sleep(Duration::from_secs(args.down_for)).await;
                    nats.restart(index);
                    format!("kill -9 {}", nats.name(index))
                }
            };
            turn += 1;
            eprintln!("{:>6.1} s: {action}", at.as_secs_f64());
            kills.push((at.as_millis() as u64, action));
            next_kill = Instant::now() + Duration::from_secs(args.chaos_every);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut acknowledged, mut unsure, mut served) = (0, 0, 0);
    while let Some(result) = tasks.join_next().await {
        match result? {
            ("hit", ok, failed) => (acknowledged, unsure) = (acknowledged + ok, unsure + failed),
            (_, ok, _) => served += ok,
        }
    }
    fleet.sample_rss();

    // What survived.
    let api = fleet.api().context("a scheduler at the end")?;
    let ingress = fleet.ingresses().first().cloned().context("a host at the end")?;
    let counted: u64 = {
        let mut value = None;
        for _ in 0..50 {
            if let Ok(r) = client.get(format!("{ingress}/get?key=hits")).send().await
                && r.status() == 200
            {
                value = r.text().await.ok().and_then(|t| t.trim().parse().ok());
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        value.context("the counter could not be read at the end")?
    };
    let settle = Instant::now();
    let mut missing: Vec<String> = deployed.clone();
    while !missing.is_empty() && settle.elapsed() < Duration::from_secs(60) {
        missing.retain(|name| api.hosts_of(name).is_empty());
        if !missing.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let failures_list = failures.at_ms.lock().map(|l| l.clone()).unwrap_or_default();
    let window_ms = args.window * 1000;
    let outside: Vec<&(u64, String)> = failures_list
        .iter()
        .filter(|(at, _)| !kills.iter().any(|(k, _)| *at >= *k && *at <= k + window_ms + args.down_for * 1000))
        .collect();
    let requests = served + acknowledged + failures_list.len() as u64;
    let lost = acknowledged.saturating_sub(counted);

    println!("soak: {} min, {} kills (host, leader scheduler, NATS node in turn)", args.minutes, kills.len());
    let doubled = counted.saturating_sub(acknowledged + unsure);
    println!("  increments: {acknowledged} acknowledged, {unsure} failed (may or may not count), {counted} counted: {lost} lost, at least {doubled} counted twice");
    println!("  deployments: {} acknowledged ({deploy_failures} attempts refused and retried), {} missing or not ready at the end", deployed.len(), missing.len());
    println!(
        "  requests: {requests}, failed {} ({:.3}%), outside the {} s windows after kills: {}",
        failures_list.len(),
        failures_list.len() as f64 * 100.0 / requests.max(1) as f64,
        args.window + args.down_for,
        outside.len()
    );
    for (at, what) in outside.iter().take(10) {
        println!("    outside a window, sent at {:.1} s: {what}", *at as f64 / 1000.0);
    }
    for (name, (first, last)) in &fleet.rss {
        println!(
            "  rss {name}: {:.1} MiB -> {:.1} MiB over its last run ({} start(s))",
            *first as f64 / 1024.0,
            *last as f64 / 1024.0,
            fleet.starts.get(name).copied().unwrap_or(0)
        );
    }
    let mut report = serde_json::Map::new();
    report.insert("minutes".into(), args.minutes.into());
    report.insert("kills".into(), serde_json::json!(kills));
    report.insert("increments_acknowledged".into(), acknowledged.into());
    report.insert("increments_failed".into(), unsure.into());
    report.insert("increments_counted".into(), counted.into());
    report.insert("increments_lost".into(), lost.into());
    report.insert("increments_counted_twice_at_least".into(), doubled.into());
    report.insert("deployments_acknowledged".into(), deployed.len().into());
    report.insert("deployments_missing".into(), serde_json::json!(missing));
    report.insert("requests".into(), requests.into());
    report.insert("requests_failed".into(), failures_list.len().into());
    report.insert("requests_failed_outside_windows".into(), outside.len().into());
    report.insert("failures".into(), serde_json::json!(failures_list.iter().take(200).collect::<Vec<_>>()));
    report.insert(
        "rss_kib".into(),
        serde_json::json!(fleet.rss.iter().map(|(n, (f, l))| (n.clone(), serde_json::json!({"first": f, "last": l, "starts": fleet.starts.get(n)}))).collect::<serde_json::Map<_, _>>()),
    );
    crate::write_report(&args.out, &report)?;
    if lost > 0 || !missing.is_empty() {
        bail!("the soak lost {lost} increment(s) and {} deployment(s)", missing.len());
    }
    Ok(())
}
