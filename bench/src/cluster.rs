//! A real cluster on loopback (nats-server, one scheduler, three hosts) and
//! what it costs: failover time after `kill -9` of a host, latency of a
//! request served locally vs one hop over NATS vs a raw NATS round trip,
//! and throughput through one host's ingress to replicas on other hosts.

use crate::load;
use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wharf_testkit::nats::NatsServer;
use wharf_testkit::process::Process;

#[derive(clap::Args)]
pub struct ClusterArgs {
    /// The `wharf` binary (default: next to this one).
    #[arg(long)]
    wharf: Option<PathBuf>,
    /// Host kills to time.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// Heartbeat interval of hosts and scheduler.
    #[arg(long, default_value = "500ms")]
    heartbeat: String,
    /// Heartbeats missed before a host is down.
    #[arg(long, default_value_t = 3)]
    missed: u32,
    /// Sequential requests per latency figure.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Seconds of the throughput run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Connections of the throughput run.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// How the scheduler learns a host died: `advisories` (nats-server's
    /// disconnect advisories, read with a system account user, plus
    /// heartbeats), `heartbeats` (missed heartbeats only) or `both` (the
    /// failover figure in each mode, one after the other in one run).
    #[arg(long, default_value = "both", value_parser = ["advisories", "heartbeats", "both"])]
    failure_detection: String,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/cluster.json")]
    out: PathBuf,
}

/// A nats-server with a system account, so the scheduler can read
/// disconnect advisories: the scheduler and hosts log in to account WHARF.
const ACCOUNTS: &str = r#"
accounts {
  WHARF: { jetstream: enabled, users: [ { user: scheduler, password: s }, { user: host, password: h } ] }
  SYS: { users: [ { user: system, password: sys } ] }
}
system_account: SYS
"#;

struct Cluster {
    wharf: PathBuf,
    nats: NatsServer,
    dir: PathBuf,
    api: String,
    token: String,
    hosts: Vec<(String, Process, String)>,
    _scheduler: Process,
    next_host: usize,
    heartbeat: String,
    /// The hosts' NATS login, when the server has accounts.
    host_login: Vec<String>,
}

fn url_in(line: &str) -> anyhow::Result<String> {
    line.split_whitespace().find(|w| w.starts_with("http://")).map(str::to_string).context("no URL in the line")
}

impl Cluster {
    /// A server, a scheduler and three hosts; with `advisories` the server
    /// has a system account and the scheduler reads its disconnect advisories.
    fn start(wharf: PathBuf, dir: PathBuf, heartbeat: &str, missed: u32, advisories: bool) -> anyhow::Result<Cluster> {
        let nats = if advisories { NatsServer::start_with_config(ACCOUNTS) } else { NatsServer::start() };
        let login = |user: &str, password: &str| vec!["--nats-user".to_string(), user.to_string(), "--nats-password".to_string(), password.to_string()];
        let (scheduler_login, host_login) = if advisories {
            let mut scheduler = login("scheduler", "s");
            scheduler.extend(["--nats-system-user", "system", "--nats-system-password", "sys"].map(String::from));
            (scheduler, login("host", "h"))
        } else {
            (Vec::new(), Vec::new())
        };
        let mut scheduler = Process::spawn_with(
            Command::new(&wharf)
                .args(["scheduler", "--nats", &nats.url(), "--api", "127.0.0.1:0", "--heartbeat", heartbeat, "--missed-heartbeats", &missed.to_string(), "--data-dir"])
                .arg(dir.join("scheduler"))
                .args(&scheduler_login)
                .env("WHARF_LOG", std::env::var("WHARF_BENCH_LOG").unwrap_or_else(|_| "warn".into())),
        );
        let api = url_in(&scheduler.wait_for_line("Wharf scheduler: API", Duration::from_secs(60)))?;
        let token = std::fs::read_to_string(dir.join("scheduler").join("admin-token")).context("the scheduler's admin token")?.trim().to_string();
        let mut cluster = Cluster { wharf, nats, dir, api, token, hosts: Vec::new(), _scheduler: scheduler, next_host: 0, heartbeat: heartbeat.into(), host_login };
        for _ in 0..3 {
            cluster.add_host()?;
        }
        Ok(cluster)
    }

    fn add_host(&mut self) -> anyhow::Result<()> {
        let name = format!("host-{}", self.next_host);
        let zone = ["a", "b", "c"][self.next_host % 3];
        self.next_host += 1;
        let mut process = Process::spawn_with(
            Command::new(&self.wharf)
                .args(["host", "--nats", &self.nats.url(), "--name", &name, "--labels", &format!("zone={zone}"), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--heartbeat", &self.heartbeat, "--data-dir"])
                .arg(self.dir.join(&name))
                .args(&self.host_login)
                .env("WHARF_LOG", std::env::var("WHARF_BENCH_LOG").unwrap_or_else(|_| "warn".into())),
        );
        let ingress = url_in(&process.wait_for_line("ingress http://", Duration::from_secs(60)))?;
        self.hosts.push((name, process, ingress));
        Ok(())
    }

    fn wharf(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new(&self.wharf).args(args).env("WHARF_API", &self.api).env("WHARF_TOKEN", &self.token).stdin(Stdio::null()).output()?;
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        if !output.status.success() {
            bail!("wharf {args:?} failed: {text}");
        }
        Ok(text)
    }

    fn ready_hosts(&self, service: &str) -> anyhow::Result<Vec<String>> {
        let view: serde_json::Value = serde_json::from_str(&self.wharf(&["get", "services", service, "-o", "json"])?)?;
        Ok(view["status"]["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["state"] == "ready")
            .filter_map(|r| r["host"].as_str().map(str::to_string))
            .collect())
    }
}

async fn ok(client: &reqwest::Client, url: &str) -> bool {
    matches!(client.get(url).send().await, Ok(r) if r.status().is_success())
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    let wharf = crate::wharf_binary(args.wharf.as_ref())?;
    let dir = crate::scratch_dir("cluster")?;
    let result = measure(&args, wharf, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure(args: &ClusterArgs, wharf: PathBuf, dir: &Path) -> anyhow::Result<()> {
    let advisories = args.failure_detection != "heartbeats";
    let mut cluster = Cluster::start(wharf.clone(), dir.to_path_buf(), &args.heartbeat, args.missed, advisories)?;
    let hello = wharf_testkit::samples::path("hello");
    let hello = hello.to_str().context("utf-8 path")?;
    cluster.wharf(&["deploy", hello, "--name", "web", "--route", "/web"])?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let mut report = serde_json::Map::new();

    // Latency: local replica vs one hop over NATS vs raw NATS request/reply.
    let runs_on = cluster.ready_hosts("web")?.pop().context("web placed")?;
    let local = cluster.hosts.iter().find(|h| h.0 == runs_on).map(|h| h.2.clone()).context("local host")?;
    let remote = cluster.hosts.iter().find(|h| h.0 != runs_on).map(|h| h.2.clone()).context("remote host")?;
    let local_lat = sequential(&local, args.requests).await?;
    let hop_lat = sequential(&remote, args.requests).await?;
    let auth = if advisories {
        wharf_bus::NatsAuth::UserPassword { user: "host".into(), password: "h".into() }
    } else {
        wharf_bus::NatsAuth::None
    };
    let raw_lat = raw_nats(&cluster.nats.url(), auth, args.requests).await?;
    println!("latency, {} sequential requests each:", args.requests);
    println!("  local replica (ingress on the host that runs it): p50 {:.0} µs, p99 {:.0} µs", local_lat.0, local_lat.1);
    println!("  one hop over NATS (ingress on another host):       p50 {:.0} µs, p99 {:.0} µs", hop_lat.0, hop_lat.1);
    println!("  raw NATS request/reply (~200 B, same server):      p50 {:.0} µs, p99 {:.0} µs", raw_lat.0, raw_lat.1);
    let added = hop_lat.0 - local_lat.0;
    println!("  the hop adds {added:.0} µs at p50 = {:.2}x the raw NATS round trip (target <= 2x)", added / raw_lat.0);
    report.insert("latency_local_p50_micros".into(), local_lat.0.into());
    report.insert("latency_local_p99_micros".into(), local_lat.1.into());
    report.insert("latency_hop_p50_micros".into(), hop_lat.0.into());
    report.insert("latency_hop_p99_micros".into(), hop_lat.1.into());
    report.insert("latency_raw_nats_p50_micros".into(), raw_lat.0.into());
    report.insert("latency_raw_nats_p99_micros".into(), raw_lat.1.into());
    report.insert("hop_added_over_raw_nats".into(), (added / raw_lat.0).into());

    // Throughput through one ingress to replicas on the two other hosts.
    cluster.wharf(&["scale", "web", "3"])?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.wharf(&["deploy", hello, "--name", "far", "--route", "/far", "--replicas", "2", "--on", "zone=b"])?;
    let entry = cluster.hosts.iter().find(|h| h.0 == "host-0").map(|h| h.2.clone()).context("host-0")?;
    let addr: std::net::SocketAddr = entry.trim_start_matches("http://").parse()?;
    let through = load::run(addr, "/far", args.connections, Duration::from_secs(1), Duration::from_secs(args.seconds)).await?;
    let direct = load::run(addr, "/web", args.connections, Duration::from_secs(1), Duration::from_secs(args.seconds)).await?;
    println!(
        "throughput via host-0's ingress: {:.0} req/s to replicas on other hosts (over NATS), {:.0} req/s to its local replica ({} errors)",
        through.requests_per_second, direct.requests_per_second, through.errors + direct.errors
    );
    report.insert("rps_remote_via_one_ingress".into(), through.requests_per_second.into());
    report.insert("rps_local_same_ingress".into(), direct.requests_per_second.into());
    cluster.wharf(&["delete", "far"])?;
    cluster.wharf(&["scale", "web", "1"])?;

    // Failover: kill -9 the host running web; time until a surviving ingress answers again.
    let first_mode = if args.failure_detection == "heartbeats" { "heartbeats" } else { "advisories" };
    let mut modes = vec![(first_mode, failover(&mut cluster, args.kills, &client).await?)];
    drop(cluster);
    if args.failure_detection == "both" {
        let mut again = Cluster::start(wharf.clone(), dir.join("heartbeats"), &args.heartbeat, args.missed, false)?;
        again.wharf(&["deploy", hello, "--name", "web", "--route", "/web"])?;
        modes.push(("heartbeats", failover(&mut again, args.kills, &client).await?));
    }
    let mut p99s = Vec::new();
    for (mode, times) in &modes {
        let p50 = load::percentile(times, 0.5) / 1000.0;
        let p99 = load::percentile(times, 0.99) / 1000.0;
        println!(
            "failover by {mode} (kill -9 of the host running the only replica -> first successful request), {} kills, heartbeat {} x {} missed: p50 {p50:.0} ms, p99 {p99:.0} ms",
            times.len(),
            args.heartbeat,
            args.missed
        );
        report.insert(format!("failover_{mode}_p50_ms"), p50.into());
        report.insert(format!("failover_{mode}_p99_ms"), p99.into());
        p99s.push(p99);
    }
    if let [advisories, heartbeats] = p99s[..] {
        println!("  p99 by heartbeats / by advisories: {:.2}x (target: advisories p99 < 500 ms)", heartbeats / advisories);
        report.insert("failover_p99_heartbeats_over_advisories".into(), (heartbeats / advisories).into());
    }
    report.insert("failover_kills".into(), args.kills.into());
    report.insert("heartbeat".into(), args.heartbeat.clone().into());
    report.insert("missed_heartbeats".into(), args.missed.into());

    crate::write_report(&args.out, &report)?;
    Ok(())
}

/// Times `kills` rounds of: kill -9 the host running `web`'s only replica,
/// then ask another host's ingress until it answers 2xx; a new host
/// replaces the dead one each round. Sorted.
async fn failover(cluster: &mut Cluster, kills: usize, client: &reqwest::Client) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::new();
    for round in 0..kills {
        let deadline = Instant::now() + Duration::from_secs(30);
        let victim = loop {
            if let Some(h) = cluster.ready_hosts("web")?.pop() {
                break h;
            }
            if Instant::now() > deadline {
                bail!("web never became ready before kill {round}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let index = cluster.hosts.iter().position(|h| h.0 == victim).context("victim")?;
        let (_, mut process, _) = cluster.hosts.remove(index);
        let witness = format!("{}/web", cluster.hosts[0].2);
        let killed = Instant::now();
        process.kill();
        loop {
            if ok(client, &witness).await {
                break;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                bail!("no successful request within 30 s of killing {victim}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = killed.elapsed();
        eprintln!("kill {}/{}: {victim} -> first success after {took:.2?}", round + 1, kills);
        if took > Duration::from_secs(1) {
            // A slow failover: what the processes said (WHARF_BENCH_LOG=info for more).
            let tail = |text: String| text.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n    ");
            eprintln!("  scheduler:\n    {}", tail(cluster._scheduler.output()));
            for (name, process, _) in &cluster.hosts {
                eprintln!("  {name}:\n    {}", tail(process.output()));
            }
        }
        times.push(took);
        cluster.add_host()?;
    }
    times.sort();
    Ok(times)
}

/// p50 and p99 of `n` sequential GETs on one keep-alive connection.
async fn sequential(url: &str, n: usize) -> anyhow::Result<(f64, f64)> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(1).build()?;
    let target = format!("{url}/web");
    for _ in 0..100 {
        client.get(&target).send().await?.bytes().await?;
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let response = client.get(&target).send().await?;
        if !response.status().is_success() {
            bail!("{target} answered {}", response.status());
        }
        response.bytes().await?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok((load::percentile(&times, 0.5), load::percentile(&times, 0.99)))
}

/// p50 and p99 of `n` raw request/reply round trips through the same NATS server.
async fn raw_nats(url: &str, auth: wharf_bus::NatsAuth, n: usize) -> anyhow::Result<(f64, f64)> {
    let options = wharf_bus::NatsOptions { auth, ..wharf_bus::NatsOptions::default() };
    let responder = wharf_bus::Bus::connect_nats(url, options.clone()).await?;
    let requester = wharf_bus::Bus::connect_nats(url, options).await?;
    let mut subscription = responder.queue_subscribe("bench.echo", "bench").await?;
    let answering = responder.clone();
    let task = tokio::spawn(async move {
        while let Some(message) = subscription.next().await {
            let _ = answering.respond(&message, Bytes::from_static(b"HTTP/1.1 200 -\r\ncontent-type: text/plain\r\n\r\nHello from Wharf!\n")).await;
        }
    });
    let payload = Bytes::from(vec![b'x'; 200]);
    // The subscription reaches the server asynchronously: retry until it answers.
    let mut warm = 0;
    while warm < 100 {
        match requester.request("bench.echo", payload.clone(), Duration::from_secs(5)).await {
            Ok(_) => warm += 1,
            Err(wharf_bus::RequestError::NoResponders { .. }) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => return Err(e.into()),
        }
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        requester.request("bench.echo", payload.clone(), Duration::from_secs(5)).await?;
        times.push(started.elapsed());
    }
    task.abort();
    times.sort();
    Ok((load::percentile(&times, 0.5), load::percentile(&times, 0.99)))
}
