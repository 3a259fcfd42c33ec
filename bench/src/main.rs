//! Wharf's benchmark harness. Prints its figures and writes them as JSON to
//! `bench/results/`; `bench/RESULTS.md` records them with the command.
//!
//! `wharf-bench host`: the host runtime against `wasmtime serve` (when a
//! `wasmtime` 48 is on PATH), per-request instantiation time, and resident
//! memory per loaded workload.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod bodies;
mod cluster;
mod codecache;
mod coldstart;
mod control;
mod density;
mod kvbench;
mod load;
mod natsha;
mod noisy;
mod rollout;
mod rss;
mod soak;
mod tracing;
mod triggers;

#[derive(Parser)]
#[command(name = "wharf-bench", about = "Wharf's benchmarks: print figures and record them in bench/results/")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Host runtime: hello throughput/latency vs `wasmtime serve`, instantiation time, memory per workload.
    Host(HostArgs),
    /// A real cluster on loopback: failover time, local vs NATS-hop latency, remote throughput.
    Cluster(cluster::ClusterArgs),
    /// Large bodies: 10 MiB up and down through the replica's own host vs across the hop to another host (streamed over NATS).
    Bodies(bodies::BodiesArgs),
    /// The control plane at scale: simulated hosts over real NATS, two schedulers; placement time, idle cost, leader takeover.
    Control(control::ControlArgs),
    /// Scale from zero: first-request latency (compiled and not), replicas following a step in load.
    Coldstart(coldstart::ColdStartArgs),
    /// Many services on one host: N default hello services on one `wharf up`; ready, first requests, resident memory.
    Density(density::DensityArgs),
    /// Compiled-code cache: first request with code in memory vs after eviction (from disk) vs cold compile.
    Codecache(codecache::CodeCacheArgs),
    /// wasi:keyvalue get/set latency from inside a component vs raw JetStream KV.
    Kv(kvbench::KvArgs),
    /// JetStream KV on one nats-server vs a 3-node cluster: put/get/watch latency, writes resuming after kill -9.
    NatsHa(natsha::NatsHaArgs),
    /// Noisy neighbours: tenant B's latency with tenant A spinning and allocating to its caps.
    Noisy(noisy::NoisyArgs),
    /// Rollouts on a real cluster under load: a rolling update's duration and failed requests, a failed canary's rollback time.
    Rollout(rollout::RolloutArgs),
    /// A chaos soak: hosts, the leading scheduler and NATS nodes killed in turn under traffic, increments and deploys.
    Soak(soak::SoakArgs),
    /// Traces: hello throughput with no OTLP endpoint vs exporting every request's spans.
    Tracing(tracing::TracingArgs),
    /// Message triggers: messages/s through a trigger (core NATS, JetStream) vs a raw async-nats subscriber doing the same work.
    Triggers(triggers::TriggerArgs),
    /// Placement core: replicas placed per second on a simulated cluster.
    Placement(PlacementArgs),
    /// (internal) Loads N workloads in this process and prints its resident memory as JSON.
    #[command(hide = true)]
    RssProbe(rss::ProbeArgs),
}

#[derive(clap::Args)]
struct PlacementArgs {
    /// Simulated hosts.
    #[arg(long, default_value_t = 10_000)]
    hosts: usize,
    /// Replicas to place (services of 10 replicas each).
    #[arg(long, default_value_t = 100_000)]
    replicas: usize,
    /// Runs; the figures are the median run.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Services of 10 replicas added one at a time to the full cluster
    /// kept in a persistent index, each timed (0: skip the index figures).
    #[arg(long, default_value_t = 100)]
    added: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/placement.json")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct HostArgs {
    /// The `wharf` binary to benchmark (default: next to this one).
    #[arg(long)]
    wharf: Option<PathBuf>,
    /// The `wasmtime` binary for the baseline (default: `wasmtime` on PATH, if any).
    #[arg(long)]
    wasmtime: Option<PathBuf>,
    /// Concurrent keep-alive connections of the load generator.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Measured seconds per load run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Alternating rounds (wharf, wasmtime, wharf, ...); figures are the mean.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Instantiations to time.
    #[arg(long, default_value_t = 20_000)]
    instantiations: usize,
    /// Loaded workloads for the memory figure.
    #[arg(long, default_value_t = 100)]
    workloads: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/host.json")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Host(args) => tokio::runtime::Runtime::new()?.block_on(host(args)),
        Cmd::Placement(args) => placement(args),
        Cmd::Noisy(args) => tokio::runtime::Runtime::new()?.block_on(noisy::run(args)),
        Cmd::Kv(args) => tokio::runtime::Runtime::new()?.block_on(kvbench::run(args)),
        Cmd::NatsHa(args) => tokio::runtime::Runtime::new()?.block_on(natsha::run(args)),
        Cmd::Coldstart(args) => tokio::runtime::Runtime::new()?.block_on(coldstart::run(args)),
        Cmd::Density(args) => tokio::runtime::Runtime::new()?.block_on(density::run(args)),
        Cmd::Codecache(args) => tokio::runtime::Runtime::new()?.block_on(codecache::run(args)),
        Cmd::Cluster(args) => tokio::runtime::Runtime::new()?.block_on(cluster::run(args)),
        Cmd::Bodies(args) => tokio::runtime::Runtime::new()?.block_on(bodies::run(args)),
        Cmd::Control(args) => tokio::runtime::Runtime::new()?.block_on(control::run(args)),
        Cmd::Rollout(args) => tokio::runtime::Runtime::new()?.block_on(rollout::run(args)),
        Cmd::Soak(args) => tokio::runtime::Runtime::new()?.block_on(soak::run(args)),
        Cmd::Tracing(args) => tokio::runtime::Runtime::new()?.block_on(tracing::run(args)),
        Cmd::Triggers(args) => tokio::runtime::Runtime::new()?.block_on(triggers::run(args)),
        Cmd::RssProbe(args) => tokio::runtime::Runtime::new()?.block_on(rss::probe(args)),
    }
}

/// The `wharf` binary to measure: the one given, or the one next to this.
fn wharf_binary(given: Option<&PathBuf>) -> std::io::Result<PathBuf> {
    match given {
        Some(path) => Ok(path.clone()),
        None => Ok(std::env::current_exe()?.with_file_name("wharf")),
    }
}

/// A fresh scratch directory for one harness run, unique to this process.
fn scratch_dir(harness: &str) -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("wharf-bench-{harness}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn host(args: HostArgs) -> anyhow::Result<()> {
    let wharf = wharf_binary(args.wharf.as_ref())?;
    if !wharf.is_file() {
        bail!("{} not found: build it first with `cargo build --release --bin wharf` (or pass --wharf)", wharf.display());
    }
    let wasmtime = args.wasmtime.clone().or_else(|| which("wasmtime"));
    eprintln!("building the sample components ...");
    let hello = wharf_testkit::samples::path("hello");
    let mut report = serde_json::Map::new();

    // Throughput and latency, alternating so drift hits both sides equally.
    let cache = tempdir_in_target("bench-cache")?;
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for round in 0..args.rounds {
        eprintln!("round {}/{}: wharf serve", round + 1, args.rounds);
        let port = free_port()?;
        let server = Server::spawn(
            Command::new(&wharf)
                .arg("serve")
                .arg(&hello)
                .args(["--listen", &format!("127.0.0.1:{port}"), "--admin-listen", "127.0.0.1:0", "--concurrency", "256", "--cache-dir"])
                .arg(&cache)
                .env("WHARF_LOG", "warn"),
            port,
        )
        .await?;
        ours.push(load::run(server.addr, "/", args.connections, Duration::from_secs(2), Duration::from_secs(args.seconds)).await?);
        drop(server);
        if let Some(wasmtime) = &wasmtime {
            eprintln!("round {}/{}: wasmtime serve", round + 1, args.rounds);
            let port = free_port()?;
            let server = Server::spawn(
                Command::new(wasmtime).args(["serve", "-Scli", "--addr", &format!("127.0.0.1:{port}")]).arg(&hello),
                port,
            )
            .await?;
            theirs.push(load::run(server.addr, "/", args.connections, Duration::from_secs(2), Duration::from_secs(args.seconds)).await?);
        }
    }
    let ours = mean(&ours);
    println!("wharf serve hello: {:.0} req/s, p50 {:.0} µs, p99 {:.0} µs, {} errors ({} connections)", ours.requests_per_second, ours.p50_micros, ours.p99_micros, ours.errors, args.connections);
    report.insert("wharf_serve".into(), serde_json::to_value(&ours)?);
    if theirs.is_empty() {
        println!("wasmtime serve: skipped (no `wasmtime` on PATH; `cargo install --locked wasmtime-cli --version 48.0.8`)");
    } else {
        let theirs = mean(&theirs);
        let version = wasmtime.as_ref().map(|w| version_of(w)).unwrap_or_default();
        println!("wasmtime serve hello ({version}): {:.0} req/s, p50 {:.0} µs, p99 {:.0} µs, {} errors", theirs.requests_per_second, theirs.p50_micros, theirs.p99_micros, theirs.errors);
        let ratio = ours.requests_per_second / theirs.requests_per_second;
        println!("throughput ratio wharf/wasmtime: {ratio:.2}x (target >= 1.0x); p50 latency ratio {:.2}x", ours.p50_micros / theirs.p50_micros);
        report.insert("wasmtime_serve".into(), serde_json::to_value(&theirs)?);
        report.insert("wasmtime_version".into(), version.into());
        report.insert("throughput_ratio".into(), ratio.into());
    }

    // Instantiation of a fresh instance, as each request does.
    let instantiation = rss::time_instantiation(&hello, args.instantiations).await?;
    println!(
        "instantiation (hello, fresh store + instance from InstancePre): p50 {:.1} µs, p99 {:.1} µs over {} (target p50 < 20 µs)",
        instantiation.0, instantiation.1, args.instantiations
    );
    report.insert("instantiation_p50_micros".into(), instantiation.0.into());
    report.insert("instantiation_p99_micros".into(), instantiation.1.into());

    // Resident memory of a host process with 1 and with N loaded workloads.
    let me = std::env::current_exe()?;
    rss::run_probe(&me, &cache, args.workloads, true).await?;
    let one = rss::run_probe(&me, &cache, 1, false).await?;
    let many = rss::run_probe(&me, &cache, args.workloads, false).await?;
    let per = (many.rss_bytes as f64 - one.rss_bytes as f64) / (args.workloads - 1).max(1) as f64;
    println!(
        "resident memory: {:.1} MiB with 1 workload, {:.1} MiB with {} (distinct components, each served once): {:.0} KiB per loaded workload (target < 2048 KiB)",
        one.rss_bytes as f64 / MIB, many.rss_bytes as f64 / MIB, args.workloads, per / 1024.0
    );
    report.insert("rss_1_workload_bytes".into(), one.rss_bytes.into());
    report.insert("rss_n_workloads_bytes".into(), many.rss_bytes.into());
    report.insert("rss_workloads".into(), args.workloads.into());
    report.insert("rss_per_workload_bytes".into(), per.into());
    report.insert("connections".into(), args.connections.into());
    report.insert("seconds".into(), args.seconds.into());

    write_report(&args.out, &report)?;
    Ok(())
}

/// One reconcile from empty, timed; then the same cluster in a persistent
/// `PlacementIndex`: a bulk pass, and services added one at a time to the
/// full cluster. The pure core runs on one thread.
fn placement(args: PlacementArgs) -> anyhow::Result<()> {
    let mut runs: Vec<wharf_scheduler_core::BenchResult> =
        (0..args.runs.max(1)).map(|_| wharf_scheduler_core::bench_placement(args.hosts, args.replicas)).collect();
    runs.sort_by(|a, b| a.per_second.total_cmp(&b.per_second));
    let median = &runs[runs.len() / 2];
    println!(
        "placement (reconcile of a snapshot): {} replicas on {} hosts in {:.3} s: {:.0} placements/s (median of {}; range {:.0}..{:.0}), max spread imbalance {} (hosts) {} (domains)",
        median.placements,
        args.hosts,
        median.seconds,
        median.per_second,
        runs.len(),
        runs[0].per_second,
        runs[runs.len() - 1].per_second,
        median.max_spread_imbalance,
        median.max_domain_imbalance,
    );
    let mut report = serde_json::json!({
        "hosts": args.hosts,
        "replicas": median.placements,
        "seconds": median.seconds,
        "placements_per_second": median.per_second,
        "min_per_second": runs[0].per_second,
        "max_per_second": runs[runs.len() - 1].per_second,
        "max_spread_imbalance": median.max_spread_imbalance,
        "max_domain_imbalance": median.max_domain_imbalance,
        "runs": runs.len(),
    });
    if args.added > 0 {
        let index = wharf_scheduler_core::bench_index(args.hosts, args.replicas, args.added);
        let (p50, p99, max) = (index.added_quantile(0.5), index.added_quantile(0.99), index.added_quantile(1.0));
        println!(
            "placement index: {} hosts joined in {:.3} s; bulk pass: {} replicas in {:.3} s: {:.0} placements/s, max spread imbalance {} (hosts) {} (domains) (target >= 200,000/s, imbalance <= 1)",
            index.hosts, index.join_seconds, index.placements, index.seconds, index.per_second, index.max_spread_imbalance, index.max_domain_imbalance
        );
        println!(
            "placement index: {} services of 10 added to the full cluster, one pass each: p50 {p50:.3} ms, p99 {p99:.3} ms, max {max:.3} ms; {} replicas placed; max spread imbalance {} (hosts) {} (domains) (target p99 < 10 ms)",
            index.added, index.added_placements, index.added_max_spread_imbalance, index.added_max_domain_imbalance
        );
        report["index"] = serde_json::json!({
            "hosts": index.hosts,
            "join_seconds": index.join_seconds,
            "bulk_replicas": index.placements,
            "bulk_seconds": index.seconds,
            "bulk_placements_per_second": index.per_second,
            "bulk_owned_actions_seconds": index.owned_seconds,
            "bulk_decisions": format!("{:016x}", index.decisions),
            "bulk_max_spread_imbalance": index.max_spread_imbalance,
            "bulk_max_domain_imbalance": index.max_domain_imbalance,
            "added_services": index.added,
            "added_replicas": index.added_placements,
            "added_p50_ms": p50,
            "added_p99_ms": p99,
            "added_max_ms": max,
            "added_max_spread_imbalance": index.added_max_spread_imbalance,
            "added_max_domain_imbalance": index.added_max_domain_imbalance,
        });
    }
    write_report(&args.out, &report)?;
    Ok(())
}

/// Writes a harness's figures as pretty JSON to `out` (creating its folder).
fn write_report(out: &Path, report: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;

fn mean(reports: &[load::LoadReport]) -> load::LoadReport {
    let n = reports.len().max(1) as f64;
    let sum = |f: fn(&load::LoadReport) -> f64| reports.iter().map(f).sum::<f64>() / n;
    load::LoadReport {
        requests: reports.iter().map(|r| r.requests).sum(),
        errors: reports.iter().map(|r| r.errors).sum(),
        seconds: reports.iter().map(|r| r.seconds).sum(),
        requests_per_second: sum(|r| r.requests_per_second),
        p50_micros: sum(|r| r.p50_micros),
        p99_micros: sum(|r| r.p99_micros),
    }
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    async fn spawn(command: &mut Command, port: u16) -> anyhow::Result<Server> {
        let child = command.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().with_context(|| format!("spawn {command:?}"))?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut server = Server { child, addr };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!("{command:?} exited with {status} before serving");
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("{command:?} did not listen on {addr} within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sum of the samples of metric `name` in OpenMetrics `text` whose
/// labels (`{...}`) `labels` accepts.
fn metric_sum(text: &str, name: &str, labels: impl Fn(&str) -> bool) -> f64 {
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix('{'))
        .filter(|rest| labels(rest))
        .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(name)).find(|p| p.is_file())
}

fn version_of(binary: &Path) -> String {
    Command::new(binary)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "unknown version".into())
}

/// A fresh directory under the build's target dir (kept between runs is fine).
fn tempdir_in_target(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().map(|p| p.join(name)).context("exe has no parent")?;
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    #[test]
    fn metric_sum_adds_the_samples_of_one_metric_whose_labels_match() {
        let text = "# TYPE wharf_requests_in_flight gauge\n\
                    wharf_requests_in_flight{service=\"tenant-a/spin\"} 3\n\
                    wharf_requests_in_flight{service=\"tenant-a/hog\"} 2\n\
                    wharf_requests_in_flight{service=\"tenant-b/hello\"} 7\n\
                    wharf_requests_in_flight_max{service=\"tenant-a/spin\"} 100\n";
        assert_eq!(super::metric_sum(text, "wharf_requests_in_flight", |labels| labels.contains("\"tenant-a/")), 5.0);
        assert_eq!(super::metric_sum(text, "wharf_requests_total", |_| true), 0.0);
    }
}
