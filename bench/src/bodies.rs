//! Large bodies across the hop: a 10 MiB upload and a 10 MiB download
//! through the ingress of the host that runs the replica (local) and
//! through the ingress of another host (the body streams over NATS), on a
//! real nats-server with a scheduler and two hosts; throughput of each and
//! the hop's as a share of the local one.

use anyhow::{Context, bail};
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wharf_testkit::nats::NatsServer;
use wharf_testkit::process::Process;

#[derive(clap::Args)]
pub struct BodiesArgs {
    /// The `wharf` binary (default: next to this one).
    #[arg(long)]
    wharf: Option<PathBuf>,
    /// Bytes per body.
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    bytes: u64,
    /// Transfers per figure (alternating local and hop); figures are the median.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/bodies.json")]
    out: PathBuf,
}

pub async fn run(args: BodiesArgs) -> anyhow::Result<()> {
    let wharf = crate::wharf_binary(args.wharf.as_ref())?;
    let dir = crate::scratch_dir("bodies")?;
    let result = measure(&args, &wharf, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn url_in(line: &str) -> anyhow::Result<String> {
    line.split_whitespace().find(|w| w.starts_with("http://")).map(str::to_string).context("no URL in the line")
}

fn log_level() -> String {
    std::env::var("WHARF_BENCH_LOG").unwrap_or_else(|_| "warn".into())
}

async fn measure(args: &BodiesArgs, wharf: &Path, dir: &Path) -> anyhow::Result<()> {
    let nats = NatsServer::start();
    let mut scheduler = Process::spawn_with(
        Command::new(wharf).args(["scheduler", "--nats", &nats.url(), "--api", "127.0.0.1:0", "--data-dir"]).arg(dir.join("scheduler")).env("WHARF_LOG", log_level()),
    );
    let api = url_in(&scheduler.wait_for_line("Wharf scheduler: API", Duration::from_secs(60)))?;
    let token = std::fs::read_to_string(dir.join("scheduler/admin-token")).context("the scheduler's admin token")?.trim().to_string();
    let limit = (args.bytes * 2).to_string();
    let mut hosts = Vec::new();
    for (name, zone) in [("host-a", "zone=a"), ("host-b", "zone=b")] {
        let mut process = Process::spawn_with(
            Command::new(wharf)
                .args(["host", "--nats", &nats.url(), "--name", name, "--labels", zone, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--max-request-body", &limit, "--data-dir"])
                .arg(dir.join(name))
                .env("WHARF_LOG", log_level()),
        );
        let ingress = url_in(&process.wait_for_line("ingress http://", Duration::from_secs(60)))?;
        hosts.push((process, ingress));
    }
    let bulk = wharf_testkit::samples::path("bulk");
    let deploy = [
        "deploy",
        bulk.to_str().context("utf-8 path")?,
        "--name",
        "bulk",
        "--route",
        "/bulk",
        "--on",
        "zone=b",
        "--timeout",
        "300s",
        "--fuel",
        "unlimited",
    ];
    let output = Command::new(wharf).args(deploy).env("WHARF_API", &api).env("WHARF_TOKEN", &token).stdin(Stdio::null()).output()?;
    if !output.status.success() {
        bail!("wharf deploy failed: {}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    }
    let (hop, local) = (hosts[0].1.clone(), hosts[1].1.clone());
    let client = reqwest::Client::builder().timeout(Duration::from_secs(300)).build()?;
    let started = Instant::now();
    while !matches!(client.get(format!("{hop}/bulk?bytes=1")).send().await, Ok(r) if r.status().is_success()) {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("bulk never answered through host-a");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let body = bytes::Bytes::from((0..args.bytes).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let expected = format!("{} ", args.bytes);
    let (mut up_local, mut up_hop, mut down_local, mut down_hop) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // One untimed round each way warms both paths.
    for round in 0..=args.rounds {
        for (ingress, ups, downs) in [(&local, &mut up_local, &mut down_local), (&hop, &mut up_hop, &mut down_hop)] {
            let started = Instant::now();
            let answer = client.post(format!("{ingress}/bulk")).body(body.clone()).send().await?.text().await?;
            let up = started.elapsed();
            if !answer.starts_with(&expected) {
                bail!("upload through {ingress}: {answer}");
            }
            let started = Instant::now();
            let mut stream = client.get(format!("{ingress}/bulk?bytes={}", args.bytes)).send().await?.bytes_stream();
            let mut got = 0u64;
            while let Some(piece) = stream.next().await {
                got += piece?.len() as u64;
            }
            let down = started.elapsed();
            if got != args.bytes {
                bail!("download through {ingress}: {got} of {} bytes", args.bytes);
            }
            if round > 0 {
                ups.push(up);
                downs.push(down);
            }
        }
    }
    let mib = args.bytes as f64 / (1024.0 * 1024.0);
    let rate = |times: &mut Vec<Duration>| {
        times.sort();
        mib / times[times.len() / 2].as_secs_f64()
    };
    let (up_local, up_hop, down_local, down_hop) = (rate(&mut up_local), rate(&mut up_hop), rate(&mut down_local), rate(&mut down_hop));
    println!("{mib:.0} MiB bodies, median of {} transfers each:", args.rounds);
    println!("  upload:   {up_local:.1} MiB/s through the replica's own host, {up_hop:.1} MiB/s across the hop: {:.2}x", up_hop / up_local);
    println!("  download: {down_local:.1} MiB/s through the replica's own host, {down_hop:.1} MiB/s across the hop: {:.2}x", down_hop / down_local);
    let mut report = serde_json::Map::new();
    report.insert("bytes".into(), args.bytes.into());
    report.insert("rounds".into(), args.rounds.into());
    report.insert("upload_local_mib_per_s".into(), up_local.into());
    report.insert("upload_hop_mib_per_s".into(), up_hop.into());
    report.insert("upload_hop_over_local".into(), (up_hop / up_local).into());
    report.insert("download_local_mib_per_s".into(), down_local.into());
    report.insert("download_hop_mib_per_s".into(), down_hop.into());
    report.insert("download_hop_over_local".into(), (down_hop / down_local).into());
    crate::write_report(&args.out, &report)?;
    drop(hosts);
    drop(scheduler);
    Ok(())
}
