//! Scale from zero: the first request's latency after a service has scaled
//! to zero, with its component already compiled on the host and without;
//! and how fast replicas follow a step in load.

use crate::load;
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use wharf_testkit::wharf::Up;

#[derive(clap::Args)]
pub struct ColdStartArgs {
    /// The `wharf` binary (default: next to this one).
    #[arg(long)]
    wharf: Option<PathBuf>,
    /// Cycles (scale to zero, then one request) with a compiled component.
    #[arg(long, default_value_t = 20)]
    cycles: usize,
    /// Cold starts of never-compiled components.
    #[arg(long, default_value_t = 10)]
    uncompiled: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/coldstart.json")]
    out: PathBuf,
}

fn start_up(wharf: &Path, dir: &Path) -> Up {
    Up::start(wharf, &dir.join("data"), &["--host-id", "bench"])
}

fn run_ok(up: &Up, args: &[&str]) -> anyhow::Result<String> {
    match up.wharf(args) {
        (true, text) => Ok(text),
        (false, text) => bail!("wharf {args:?} failed: {text}"),
    }
}

/// Waits until the service has no replica desired or ready.
async fn wait_for_zero(up: &Up, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = &up.service(name)["status"];
        if status["ready"] == 0 && status["desired"] == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} did not scale to zero: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Times one GET; fails unless it succeeds.
async fn time_get(client: &reqwest::Client, url: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let response = client.get(url).send().await?;
    let status = response.status();
    response.bytes().await?;
    let took = started.elapsed();
    if !status.is_success() {
        bail!("{url}: {status}");
    }
    Ok(took)
}

fn manifest(dir: &Path, name: &str, component: &Path) -> anyhow::Result<String> {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "name: {name}\ncomponent: {{ file: {} }}\nroutes: [{{ path_prefix: /{name} }}]\nlimits: {{ concurrency: 64 }}\n\
             autoscale: {{ min: 0, max: 8, target_concurrency: 1, scale_down_delay: 1s, scale_to_zero_after: 1s, stable_window: 6s }}\n",
            component.display()
        ),
    )?;
    Ok(path.to_str().context("utf-8")?.to_string())
}

pub async fn run(args: ColdStartArgs) -> anyhow::Result<()> {
    let wharf = crate::wharf_binary(args.wharf.as_ref())?;
    let dir = crate::scratch_dir("coldstart")?;
    let wharf_path = wharf.clone();
    let up = start_up(&wharf, &dir);
    let client = reqwest::Client::builder().pool_max_idle_per_host(1).build()?;
    let hello = wharf_testkit::samples::path("hello");
    let mut report = serde_json::Map::new();

    // Compiled: the host compiled the component when it was deployed.
    run_ok(&up, &["apply", "--no-wait", "-f", &manifest(&dir, "cold", &hello)?])?;
    let mut compiled = Vec::new();
    for cycle in 0..args.cycles {
        wait_for_zero(&up, "cold").await?;
        let took = time_get(&client, &format!("{}/cold", up.ingress)).await.with_context(|| format!("cycle {cycle}"))?;
        eprintln!("cold start {}/{} (compiled): {took:.2?}", cycle + 1, args.cycles);
        compiled.push(took);
    }
    compiled.sort();
    let (p50, p99) = (load::percentile(&compiled, 0.5) / 1000.0, load::percentile(&compiled, 0.99) / 1000.0);
    println!("first request after scale to zero, component compiled on the host, {} cycles: p50 {p50:.2} ms, p99 {p99:.2} ms (target p99 < 10 ms)", compiled.len());
    report.insert("compiled_p50_ms".into(), p50.into());
    report.insert("compiled_p99_ms".into(), p99.into());

    // Not compiled: `wharf up` restarted with its compile cache emptied, then
    // the first request for the service (still at zero).
    let mut up = up;
    let mut uncompiled = Vec::new();
    for i in 0..args.uncompiled {
        wait_for_zero(&up, "cold").await?;
        drop(up);
        std::fs::remove_dir_all(dir.join("data").join("compiled")).context("clear the compile cache")?;
        up = start_up(&wharf_path, &dir);
        let took = time_get(&client, &format!("{}/cold", up.ingress)).await.with_context(|| format!("uncompiled run {i}"))?;
        eprintln!("cold start {}/{} (empty compile cache): {took:.2?}", i + 1, args.uncompiled);
        uncompiled.push(took);
    }
    uncompiled.sort();
    let (p50u, p99u) = (load::percentile(&uncompiled, 0.5) / 1000.0, load::percentile(&uncompiled, 0.99) / 1000.0);
    println!("first request after a restart with an empty compile cache (compile included), {} runs: p50 {p50u:.1} ms, p99 {p99u:.1} ms", uncompiled.len());
    report.insert("uncompiled_p50_ms".into(), p50u.into());
    report.insert("uncompiled_p99_ms".into(), p99u.into());

    // A step in load: 8 clients keep a 200 ms request in flight each; time to 4 ready replicas.
    let sleep = wharf_testkit::samples::path("sleep");
    run_ok(&up, &["apply", "--no-wait", "-f", &manifest(&dir, "step", &sleep)?])?;
    wait_for_zero(&up, "step").await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (client, stop) = (client.clone(), stop.clone());
        let url = format!("{}/step?ms=200", up.ingress);
        clients.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = client.get(&url).send().await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    let started = Instant::now();
    let mut half = None;
    while started.elapsed() < Duration::from_secs(30) {
        if up.service("step")["status"]["ready"].as_u64().unwrap_or(0) >= 4 {
            half = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }
    match half {
        Some(half) => {
            println!("step in load (0 -> 8 clients each keeping a 200 ms request in flight, target 1 in flight per replica): 4 ready replicas after {half:.2?}");
            report.insert("step_to_4_ready_ms".into(), (half.as_secs_f64() * 1000.0).into());
        }
        None => println!("step in load: fewer than 4 ready replicas after 30 s"),
    }
    crate::write_report(&args.out, &report)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
