//! Many services on one host: `--services` `hello` services with default
//! settings applied in manifests of 500 (a manifest holds at most 1,000)
//! on one `wharf up` with a stated
//! `--memory`; how many become ready, why the rest do not, how many answer
//! their first request, and the host's resident memory.
//!
//! With `--scale-to-zero`, every service scales to zero (`min: 0`) and
//! starts with none: the bench then wakes `--warm` of them, chosen at
//! random, by a first request each, and reads the host's resident memory
//! before and after (memory per warm replica); then times the first
//! request of `--cold` more, also at random, each waking its service. With
//! `--variants N` the services run N distinct components (`hello` with a
//! custom section naming the variant: its own digest, its own compiled
//! code), so with a small `--code-cache` most wake-ups load code from disk.

use anyhow::{Context, bail};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use wharf_testkit::wharf::Up;

#[derive(clap::Args)]
pub struct DensityArgs {
    /// The `wharf` binary (default: next to this one).
    #[arg(long)]
    wharf: Option<PathBuf>,
    /// Services to deploy.
    #[arg(long, default_value_t = 2000)]
    services: usize,
    /// The host's `--memory`.
    #[arg(long, default_value = "2GiB")]
    memory: String,
    /// More `wharf up` flags, e.g. `--max-instances=4000`.
    #[arg(long = "up-flag", allow_hyphen_values = true)]
    up_flags: Vec<String>,
    /// `limits` for every service, e.g. `memory_request: 1GiB` (the old default's reservation).
    #[arg(long)]
    limits: Option<String>,
    /// Seconds to wait at most for the ready count to stop changing.
    #[arg(long, default_value_t = 180)]
    settle_secs: u64,
    /// Milliseconds between cold first requests (0: back to back). Each
    /// wake sets off work after its answer (the control plane places the
    /// service, the host loads its assigned replica); a pause lets that
    /// finish, so the figures show the wake alone.
    #[arg(long, default_value_t = 0)]
    cold_pause_ms: u64,
    /// Services scale to zero and start with none (see the module's doc).
    #[arg(long)]
    scale_to_zero: bool,
    /// With --scale-to-zero: services woken (at random) to measure memory per warm replica.
    #[arg(long, default_value_t = 1000)]
    warm: usize,
    /// With --scale-to-zero: more services whose first request is timed.
    #[arg(long, default_value_t = 300)]
    cold: usize,
    /// Distinct components the services run (round robin).
    #[arg(long, default_value_t = 1)]
    variants: usize,
    /// Also write the host's log (its stderr and stdout) to this file at the
    /// end, e.g. with `--up-flag=--log=info,wharf_host::agent=debug` to see
    /// why each replica loaded its code.
    #[arg(long)]
    host_log: Option<PathBuf>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/density.json")]
    out: PathBuf,
}

/// `count` distinct numbers below `below`, none in `except`, in a random order (a fixed seed).
fn pick(count: usize, below: usize, except: &std::collections::BTreeSet<usize>, seed: u64) -> Vec<usize> {
    let mut state = seed | 1;
    let mut chosen = std::collections::BTreeSet::new();
    let mut order = Vec::new();
    let available = below.saturating_sub(except.len());
    while order.len() < count.min(available) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let n = (state % below as u64) as usize;
        if !except.contains(&n) && chosen.insert(n) {
            order.push(n);
        }
    }
    order
}

pub async fn run(args: DensityArgs) -> anyhow::Result<()> {
    let wharf = crate::wharf_binary(args.wharf.as_ref())?;
    let dir = crate::scratch_dir("density")?;
    let hello = wharf_testkit::samples::path("hello");
    let original = std::fs::read(&hello).context("read the hello sample")?;
    let mut components = Vec::new();
    for n in 0..args.variants.max(1) {
        if args.variants <= 1 {
            components.push(hello.clone());
            break;
        }
        let path = dir.join(format!("hello-{n}.wasm"));
        // A custom section naming the variant: the same program under another digest.
        std::fs::write(&path, crate::rss::with_custom_section(&original, &format!("wharf-bench-variant-{n}")))?;
        components.push(path);
    }
    let mut flags: Vec<&str> = vec!["--host-id", "bench", "--memory", &args.memory];
    flags.extend(args.up_flags.iter().map(String::as_str));
    let up = Up::start(&wharf, &dir.join("data"), &flags);
    let client = reqwest::Client::new();
    let started = Instant::now();
    let names: Vec<usize> = (0..args.services).collect();
    // Each manifest's apply, in order: one that grows with the services
    // already stored shows a PUT whose cost does.
    let mut manifests: Vec<Duration> = Vec::new();
    for (part, chunk) in names.chunks(500).enumerate() {
        let mut manifest = String::from("services:\n");
        for i in chunk {
            let component = &components[i % components.len()];
            manifest.push_str(&format!("  - name: s{i}\n    component: {{ file: {} }}\n    routes: [{{ path_prefix: /s{i} }}]\n", component.display()));
            if args.scale_to_zero {
                manifest.push_str("    autoscale: { min: 0, max: 1, target_concurrency: 1, scale_to_zero_after: 1h }\n");
            }
            if let Some(limits) = &args.limits {
                manifest.push_str(&format!("    limits: {{ {limits} }}\n"));
            }
        }
        let path = dir.join(format!("many-{part}.yaml"));
        std::fs::write(&path, manifest)?;
        let applying = Instant::now();
        match up.wharf(&["apply", "--no-wait", "-f", path.to_str().context("utf-8")?]) {
            (true, _) => {}
            (false, text) => bail!("apply failed: {text}"),
        }
        manifests.push(applying.elapsed());
    }
    let applied = started.elapsed();
    print_applies(&manifests, chunk_len(args.services));
    if args.scale_to_zero {
        let mut report = at_zero(&args, &up, &client, applied).await?;
        apply_figures(&mut report, &manifests, chunk_len(args.services));
        crate::write_report(&args.out, &report)?;
        write_host_log(&args, &up)?;
        drop(up);
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }

    // Ready counts until they stop changing and every service not ready
    // says why (or all are ready).
    let (mut ready, mut last_change, mut listed) = (0, Instant::now(), Vec::<Value>::new());
    let explained = |listed: &[Value]| listed.iter().all(|s| s["status"]["ready"] == 1 || s["status"]["last_error"].is_string());
    while (last_change.elapsed() < Duration::from_secs(10) || !explained(&listed)) && started.elapsed() < Duration::from_secs(args.settle_secs) {
        let body: Value = client.get(format!("{}/v1/namespaces/default/services", up.api)).bearer_auth(&up.token).send().await?.json().await?;
        listed = body["services"].as_array().cloned().unwrap_or_default();
        let now = listed.iter().filter(|s| s["status"]["ready"] == 1).count();
        if now != ready {
            ready = now;
            last_change = Instant::now();
        }
        if ready == args.services {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let all_ready = last_change.duration_since(started);
    let mut reasons: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for service in &listed {
        if let Some(error) = service["status"]["last_error"].as_str() {
            *reasons.entry(error.to_string()).or_default() += 1;
        }
    }

    // The first request to each service.
    let mut answered = 0;
    let mut latencies = Vec::new();
    for i in 0..args.services {
        let sent = Instant::now();
        if let Ok(response) = client.get(format!("{}/s{i}", up.ingress)).send().await
            && response.status().is_success()
        {
            answered += 1;
            latencies.push(sent.elapsed());
        }
    }
    latencies.sort();
    let hosts: Value = client.get(format!("{}/v1/hosts", up.api)).bearer_auth(&up.token).send().await?.json().await?;
    let host = &hosts["hosts"][0];

    println!("{} hello services applied in manifests of 500 on one `wharf up --memory {}` (apply took {applied:.2?})", args.services, args.memory);
    println!("ready: {ready} of {} (the count last changed {all_ready:.2?} after the first apply began)", args.services);
    for (reason, count) in &reasons {
        println!("  not ready, {count} x: {reason}");
    }
    println!(
        "answered their first request: {answered} of {} (p50 {:.2} ms, p99 {:.2} ms)",
        args.services,
        crate::load::percentile(&latencies, 0.5) / 1000.0,
        crate::load::percentile(&latencies, 0.99) / 1000.0
    );
    println!("host: memory reserved {}, resident {}", host["memory_reserved"], host["memory_in_use"]);
    let mut report = serde_json::Map::new();
    report.insert("services".into(), args.services.into());
    report.insert("memory".into(), args.memory.clone().into());
    report.insert("ready".into(), ready.into());
    report.insert("answered".into(), answered.into());
    report.insert("not_ready_reasons".into(), serde_json::to_value(&reasons)?);
    report.insert("memory_reserved".into(), host["memory_reserved"].clone());
    report.insert("memory_in_use".into(), host["memory_in_use"].clone());
    apply_figures(&mut report, &manifests, chunk_len(args.services));
    crate::write_report(&args.out, &report)?;
    write_host_log(&args, &up)?;
    drop(up);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Writes the host's output so far to `--host-log`, if given.
fn write_host_log(args: &DensityArgs, up: &Up) -> anyhow::Result<()> {
    if let Some(path) = &args.host_log {
        std::fs::write(path, up.process.output()).with_context(|| format!("cannot write the host's log to {}", path.display()))?;
        println!("host log: {}", path.display());
    }
    Ok(())
}

/// The host's compiled-code cache counters (`*code_cache_*` on its
/// metrics endpoint), by name; empty if they cannot be read.
async fn code_cache(client: &reqwest::Client, admin: &str) -> std::collections::BTreeMap<String, f64> {
    let Ok(response) = client.get(format!("{admin}/metrics")).send().await else { return Default::default() };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|line| !line.starts_with('#') && line.contains("code_cache_") && !line.contains("code_cache_bytes"))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Services in each manifest but perhaps the last.
fn chunk_len(services: usize) -> usize {
    services.min(500)
}

/// Prints each manifest's apply time, and per service, first and last.
fn print_applies(manifests: &[Duration], per: usize) {
    let each = |d: &Duration| d.as_secs_f64() * 1000.0 / per.max(1) as f64;
    let times: Vec<String> = manifests.iter().map(|d| format!("{:.1}", d.as_secs_f64())).collect();
    println!("apply, each manifest of {per} in order (s): {}", times.join(" "));
    if let (Some(first), Some(last)) = (manifests.first(), manifests.last()) {
        println!("per service: {:.1} ms in the first manifest, {:.1} ms in the last", each(first), each(last));
    }
}

/// The apply figures, in a report.
fn apply_figures(report: &mut serde_json::Map<String, Value>, manifests: &[Duration], per: usize) {
    let seconds: Vec<f64> = manifests.iter().map(Duration::as_secs_f64).collect();
    report.insert("apply_seconds_per_manifest".into(), serde_json::to_value(&seconds).unwrap_or_default());
    report.insert("services_per_manifest".into(), per.into());
}

/// The `--scale-to-zero` run: every service stored and at zero; then the
/// memory `--warm` woken services hold, and the first request of `--cold` more.
async fn at_zero(args: &DensityArgs, up: &Up, client: &reqwest::Client, applied: Duration) -> anyhow::Result<serde_json::Map<String, Value>> {
    let started = Instant::now();
    loop {
        let body: Value = client.get(format!("{}/v1/namespaces/default/services", up.api)).bearer_auth(&up.token).send().await?.json().await?;
        let listed = body["services"].as_array().cloned().unwrap_or_default();
        let at_zero = listed.iter().filter(|s| s["status"]["desired"] == 0).count();
        if at_zero == args.services {
            break;
        }
        if started.elapsed() > Duration::from_secs(args.settle_secs) {
            bail!("{} of {} services at zero after {}s", at_zero, args.services, args.settle_secs);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Let the host settle (routes, watches) before reading its memory.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pid = up.process.id();
    let rss = |pid| crate::soak::rss_kib(pid).map(|kib| kib * 1024).context("no VmRSS for the host process");
    let idle = rss(pid)?;
    let first = |i: usize| {
        let url = format!("{}/s{i}", up.ingress);
        async move {
            let sent = Instant::now();
            let response = client.get(url).send().await.ok()?;
            response.status().is_success().then(|| sent.elapsed())
        }
    };
    println!("all {} services at zero; waking {} at random", args.services, args.warm);
    let mut woken = std::collections::BTreeSet::new();
    let mut warm_latencies = Vec::new();
    for i in pick(args.warm, args.services, &woken, 0x9e37_79b9_7f4a_7c15) {
        if let Some(latency) = first(i).await {
            warm_latencies.push(latency);
        }
        woken.insert(i);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let warm = rss(pid)?;
    let before = code_cache(client, &up.admin).await;
    println!("timing the first request to {} more", args.cold);
    let mut cold_latencies = Vec::new();
    for i in pick(args.cold, args.services, &woken, 0x2545_f491_4f6c_dd1d) {
        if let Some(latency) = first(i).await {
            cold_latencies.push(latency);
        }
        tokio::time::sleep(Duration::from_millis(args.cold_pause_ms)).await;
    }
    // Where the cold requests' code came from: memory, disk or a compile.
    let after = code_cache(client, &up.admin).await;
    let during: Vec<String> = after.iter().map(|(name, value)| format!("{name} +{}", value - before.get(name).copied().unwrap_or(0.0))).collect();
    let answered = warm_latencies.len() + cold_latencies.len();
    warm_latencies.sort();
    cold_latencies.sort();
    let per_warm = warm.saturating_sub(idle) / (warm_latencies.len().max(1) as u64);
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let ms = |latencies: &[Duration], q: f64| crate::load::percentile(latencies, q) / 1000.0;
    println!("{} hello services ({} components), all at zero, on one `wharf up --memory {}` (apply took {applied:.2?})", args.services, args.variants.max(1), args.memory);
    println!("host resident: {:.1} MiB with every service at zero", mib(idle));
    println!(
        "woke {} of {} at random: resident {:.1} MiB, {:.3} MiB per warm replica; their first requests p50 {:.2} ms, p99 {:.2} ms",
        warm_latencies.len(),
        args.warm,
        mib(warm),
        mib(per_warm),
        ms(&warm_latencies, 0.5),
        ms(&warm_latencies, 0.99)
    );
    println!(
        "first request to {} more at random (each wakes its service; {} ms apart): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        cold_latencies.len(),
        args.cold_pause_ms,
        ms(&cold_latencies, 0.5),
        ms(&cold_latencies, 0.99),
        cold_latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    );
    println!("code cache during those requests: {}", during.join(", "));
    let mut report = serde_json::Map::new();
    report.insert("services".into(), args.services.into());
    report.insert("variants".into(), args.variants.max(1).into());
    report.insert("code_cache_during_cold".into(), during.into());
    report.insert("cold_pause_ms".into(), args.cold_pause_ms.into());
    report.insert("answered".into(), answered.into());
    report.insert("rss_idle_mib".into(), mib(idle).into());
    report.insert("rss_warm_mib".into(), mib(warm).into());
    report.insert("rss_per_warm_replica_mib".into(), mib(per_warm).into());
    report.insert("warm_first_request_p99_ms".into(), ms(&warm_latencies, 0.99).into());
    report.insert("cold_first_request_p50_ms".into(), ms(&cold_latencies, 0.5).into());
    report.insert("cold_first_request_p99_ms".into(), ms(&cold_latencies, 0.99).into());
    Ok(report)
}
