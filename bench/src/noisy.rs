//! Noisy neighbours: tenant A's `spin` and `hog` at full concurrency on the
//! same host as tenant B's `hello`; B's latency with A noisy vs A idle.

use crate::load;
use anyhow::{Context, bail};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use wharf_testkit::wharf::Up;

#[derive(clap::Args)]
pub struct NoisyArgs {
    /// The `wharf` binary (default: next to this one).
    #[arg(long)]
    wharf: Option<PathBuf>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Connections tenant B's load uses.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/noisy.json")]
    out: PathBuf,
}

fn deploy(up: &Up, args: &[&str]) -> anyhow::Result<()> {
    match up.wharf(args) {
        (true, _) => Ok(()),
        (false, text) => bail!("wharf {args:?} failed: {text}"),
    }
}

pub async fn run(args: NoisyArgs) -> anyhow::Result<()> {
    let wharf = match args.wharf.clone() {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("wharf"),
    };
    let dir = std::env::temp_dir().join(format!("wharf-bench-noisy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let up = Up::start(&wharf, &dir.join("data"), &["--host-id", "noisy"]);
    let sample = |name: &str| wharf_testkit::samples::path(name).to_str().map(str::to_string).context("utf-8 path");
    deploy(&up, &["deploy", &sample("spin")?, "--name", "spin", "-n", "tenant-a", "--route", "/a/spin", "--concurrency", "16"])?;
    deploy(&up, &["deploy", &sample("hog")?, "--name", "hog", "-n", "tenant-a", "--route", "/a/hog", "--concurrency", "16", "--memory", "64MiB"])?;
    deploy(&up, &["deploy", &sample("hello")?, "--name", "hello", "-n", "tenant-b", "--route", "/b"])?;
    let addr: std::net::SocketAddr = up.ingress.trim_start_matches("http://").parse()?;
    let seconds = Duration::from_secs(args.seconds);

    let idle = load::run(addr, "/b", args.connections, Duration::from_secs(1), seconds).await?;
    println!("tenant B hello, A idle:  p50 {:.0} µs, p99 {:.0} µs, {:.0} req/s", idle.p50_micros, idle.p99_micros, idle.requests_per_second);

    // A at full concurrency: 16 clients spinning to their fuel budget, 16 allocating to their memory cap.
    let stop = Arc::new(AtomicBool::new(false));
    let client = reqwest::Client::new();
    let mut noise = Vec::new();
    for i in 0..32 {
        let (client, stop) = (client.clone(), stop.clone());
        let url = if i % 2 == 0 { format!("{}/a/spin?n=100000000000", up.ingress) } else { format!("{}/a/hog?mb=200", up.ingress) };
        noise.push(tokio::spawn(async move {
            let mut answered = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if client.get(&url).send().await.is_ok() {
                    answered += 1;
                }
            }
            answered
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let noisy = load::run(addr, "/b", args.connections, Duration::from_secs(1), seconds).await?;
    stop.store(true, Ordering::Relaxed);
    let mut noise_requests = 0;
    for task in noise {
        noise_requests += task.await.unwrap_or(0);
    }
    println!("tenant B hello, A noisy: p50 {:.0} µs, p99 {:.0} µs, {:.0} req/s ({} errors; A's requests answered meanwhile: {noise_requests})", noisy.p50_micros, noisy.p99_micros, noisy.requests_per_second, noisy.errors);
    let ratio = noisy.p99_micros / idle.p99_micros;
    println!("B's p99 with A noisy / A idle: {ratio:.2}x (target <= 2x)");
    let report = serde_json::json!({
        "idle": idle, "noisy": noisy, "p99_ratio": ratio, "noise_requests": noise_requests,
    });
    crate::write_report(&args.out, &report)?;
    drop(up);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
