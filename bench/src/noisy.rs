//! Noisy neighbours: tenant A's `spin` and `hog` at full concurrency on the
//! same host as tenant B's `hello`; B's latency with A noisy vs A idle.
//! With `--noise logs`, tenant A is instead a guest logging in a tight loop
//! (`spin?log=20000`, two clients) on a host with a log rate limit, as
//! production runs it (`--log info`): B's latency must not feel the log path.
//!
//! B sends at a fixed rate (`--rate`), as a latency-sensitive service with
//! its own modest load would; its p99 with A noisy over its p99 with A idle
//! is the figure with a target. B is also run closed loop (each connection
//! sending as fast as answers come): then B alone saturates the machine, so
//! with A noisy its throughput shows the share of the host it still gets.

use crate::load;
use anyhow::{Context, bail};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use wharf_testkit::wharf::Up;

/// What tenant A does to its neighbour.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Noise {
    /// 16 clients spinning to the fuel budget, 16 allocating to the memory cap.
    Cpu,
    /// 2 clients calling a guest that writes 20,000 log lines per request.
    Logs,
}

#[derive(clap::Args)]
pub struct NoisyArgs {
    /// What tenant A does.
    #[arg(long, value_enum, default_value_t = Noise::Cpu)]
    noise: Noise,
    /// The `wharf` binary (default: next to this one).
    #[arg(long)]
    wharf: Option<PathBuf>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Connections tenant B's load uses.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Tenant B's paced request rate (requests/s over all its connections).
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// MiB each of tenant A's `hog` requests allocates (its cap is 64 MiB:
    /// the default fails at once; under the cap it fills memory and frees it).
    #[arg(long, default_value_t = 200)]
    hog_mb: u64,
    /// The host's `--background-priority` (`idle` or a nice value).
    #[arg(long, default_value = "idle")]
    background_priority: wharf_host::cpu::BackgroundPriority,
    /// OS priority (nice) of tenant A's client threads. They share this
    /// machine's cores with the host under test, which remote clients would not.
    #[arg(long, default_value_t = 0)]
    noise_nice: i32,
    /// Rounds of B's paced load, A idle then A noisy, alternating; the ratio
    /// is of the rounds' median p99s (the first round also runs closed loop).
    #[arg(long, default_value_t = 1)]
    rounds: u32,
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
    let wharf = crate::wharf_binary(args.wharf.as_ref())?;
    let dir = crate::scratch_dir("noisy")?;
    let priority = args.background_priority.to_string();
    let mut flags = vec!["--host-id", "noisy", "--background-priority", &priority];
    if args.noise == Noise::Logs {
        // Component lines really reach the host's stderr, rate-limited.
        flags.extend(["--log", "info", "--log-rate", "100", "--log-burst", "200"]);
    }
    let up = Up::start(&wharf, &dir.join("data"), &flags);
    let sample = |name: &str| wharf_testkit::samples::path(name).to_str().map(str::to_string).context("utf-8 path");
    match args.noise {
        Noise::Cpu => {
            deploy(&up, &["deploy", &sample("spin")?, "--name", "spin", "-n", "tenant-a", "--route", "/a/spin", "--concurrency", "16"])?;
            deploy(&up, &["deploy", &sample("hog")?, "--name", "hog", "-n", "tenant-a", "--route", "/a/hog", "--concurrency", "16", "--memory", "64MiB"])?;
        }
        Noise::Logs => {
            deploy(&up, &["deploy", &sample("spin")?, "--name", "chatty", "-n", "tenant-a", "--route", "/a/chatty", "--concurrency", "4"])?;
        }
    }
    deploy(&up, &["deploy", &sample("hello")?, "--name", "hello", "-n", "tenant-b", "--route", "/b"])?;
    let addr: std::net::SocketAddr = up.ingress.trim_start_matches("http://").parse()?;
    let seconds = Duration::from_secs(args.seconds);

    let warmup = Duration::from_secs(1);
    let (connections, rate) = (args.connections, args.rate);
    let paced = move || isolated(move || load::run_paced(addr, "/b", connections, rate, warmup, seconds));
    let closed = move || isolated(move || load::run(addr, "/b", connections, warmup, seconds));
    let idle = paced().await?;
    println!("tenant B hello at {} req/s, A idle:  p50 {:.0} µs, p99 {:.0} µs", args.rate, idle.p50_micros, idle.p99_micros);
    let idle_closed = closed().await?;
    println!("tenant B hello closed loop, A idle:  p50 {:.0} µs, p99 {:.0} µs, {:.0} req/s", idle_closed.p50_micros, idle_closed.p99_micros, idle_closed.requests_per_second);

    // A at full concurrency: 16 clients spinning to their fuel budget, 16
    // allocating to their memory cap (or 2 logging in a loop). A's clients run on their own threads,
    // so B's requests never queue behind them inside this process.
    let nice = args.noise_nice;
    let noise_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("noise")
        .on_thread_start(move || {
            if nice != 0 && let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice) {
                eprintln!("could not set the noise threads' nice to {nice}: {e}");
            }
        })
        .enable_all()
        .build()?;
    let hog_mb = args.hog_mb;
    let client = reqwest::Client::new();
    let clients = if args.noise == Noise::Logs { 2 } else { 32 };
    let ingress = up.ingress.clone();
    // Starts tenant A's clients; they run until the flag is set.
    let start_noise = || {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                let (client, stop) = (client.clone(), stop.clone());
                let url = match args.noise {
                    Noise::Logs => format!("{ingress}/a/chatty?n=1&log=20000"),
                    Noise::Cpu if i % 2 == 0 => format!("{ingress}/a/spin?n=100000000000"),
                    Noise::Cpu => format!("{ingress}/a/hog?mb={hog_mb}"),
                };
                noise_runtime.spawn(async move {
                    let mut answered = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if client.get(&url).send().await.is_ok() {
                            answered += 1;
                        }
                    }
                    answered
                })
            })
            .collect();
        (stop, tasks)
    };
    let stop_noise = |(stop, tasks): (Arc<AtomicBool>, Vec<tokio::task::JoinHandle<u64>>)| async move {
        stop.store(true, Ordering::Relaxed);
        let mut answered = 0;
        for task in tasks {
            answered += task.await.unwrap_or(0);
        }
        answered
    };
    let noise = start_noise();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let noisy = paced().await?;
    let noisy_closed = closed().await?;
    let mut noise_requests = stop_noise(noise).await;
    println!("tenant B hello at {} req/s, A noisy: p50 {:.0} µs, p99 {:.0} µs ({} errors)", args.rate, noisy.p50_micros, noisy.p99_micros, noisy.errors);
    println!(
        "tenant B hello closed loop, A noisy: p50 {:.0} µs, p99 {:.0} µs, {:.0} req/s ({} errors; A's requests answered meanwhile: {noise_requests})",
        noisy_closed.p50_micros, noisy_closed.p99_micros, noisy_closed.requests_per_second, noisy_closed.errors
    );
    if noise_requests == 0 {
        bail!("tenant A was never answered: the noise did not run");
    }
    let dropped = if args.noise == Noise::Logs { Some(log_lines_dropped(&up).await?) } else { None };
    if let Some(dropped) = dropped {
        println!("tenant A's log lines dropped over its rate: {dropped:.0}");
    }
    // More rounds, paced only, idle and noisy alternating, so a burst from
    // elsewhere on the machine does not decide the ratio alone.
    let (mut idle_p99s, mut noisy_p99s) = (vec![idle.p99_micros], vec![noisy.p99_micros]);
    for round in 2..=args.rounds {
        drained(&up).await?;
        let idle = paced().await?;
        let noise = start_noise();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let noisy = paced().await?;
        noise_requests += stop_noise(noise).await;
        println!("round {round}: tenant B p99 at {} req/s, A idle {:.0} µs, A noisy {:.0} µs ({} errors)", args.rate, idle.p99_micros, noisy.p99_micros, noisy.errors);
        idle_p99s.push(idle.p99_micros);
        noisy_p99s.push(noisy.p99_micros);
    }
    let median = |values: &[f64]| {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    };
    let ratio = median(&noisy_p99s) / median(&idle_p99s);
    let share = noisy_closed.requests_per_second / idle_closed.requests_per_second;
    println!(
        "B's p99 with A noisy / A idle: {ratio:.2}x (medians of {} round(s); target <= 2x); closed-loop throughput kept: {:.0}%",
        idle_p99s.len(),
        share * 100.0
    );
    let report = serde_json::json!({
        "noise": if args.noise == Noise::Logs { "logs" } else { "cpu" }, "log_lines_dropped": dropped,
        "rate": args.rate, "hog_mb": args.hog_mb, "idle": idle, "noisy": noisy, "p99_ratio": ratio,
        "idle_closed_loop": idle_closed, "noisy_closed_loop": noisy_closed, "closed_loop_share": share,
        "rounds": idle_p99s.len(), "idle_p99_micros_per_round": idle_p99s, "noisy_p99_micros_per_round": noisy_p99s,
        "noise_requests": noise_requests,
    });
    noise_runtime.shutdown_background();
    crate::write_report(&args.out, &report)?;
    drop(up);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Waits until tenant A has no request in flight on the host, then a
/// second more: A's last requests go on after its clients stop (a spinning
/// one runs to its fuel or its deadline), and an idle round measured while
/// they end is not idle (issue 7's single-run ratio did not hold up for
/// that reason).
async fn drained(up: &Up) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let metrics = reqwest::get(format!("{}/metrics", up.admin)).await?.text().await?;
        let busy = crate::metric_sum(&metrics, "wharf_requests_in_flight", |labels| labels.contains("\"tenant-a/"));
        if busy == 0.0 {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("tenant A still had {busy} request(s) in flight 120 s after its clients stopped");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(())
}

/// `wharf_log_lines_dropped_total` of tenant A's logging guest.
async fn log_lines_dropped(up: &Up) -> anyhow::Result<f64> {
    let metrics = reqwest::get(format!("{}/metrics", up.admin)).await?.text().await?;
    metrics
        .lines()
        .find(|l| l.starts_with(r#"wharf_log_lines_dropped_total{service="tenant-a/chatty"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .context("no drop counter for tenant-a/chatty in the host's metrics")
}

/// Runs one measurement on a thread and runtime of its own.
async fn isolated<F, Fut>(measure: F) -> anyhow::Result<load::LoadReport>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<load::LoadReport>>,
{
    tokio::task::spawn_blocking(move || tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(measure()))
        .await
        .context("the measuring thread panicked")?
}
