//! Many services on one host: `--services` `hello` services with default
//! settings applied in manifests of 500 (a manifest holds at most 1,000)
//! on one `wharf up` with a stated
//! `--memory`; how many become ready, why the rest do not, how many answer
//! their first request, and the host's resident memory.

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
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/density.json")]
    out: PathBuf,
}

pub async fn run(args: DensityArgs) -> anyhow::Result<()> {
    let wharf = crate::wharf_binary(args.wharf.as_ref())?;
    let dir = crate::scratch_dir("density")?;
    let hello = wharf_testkit::samples::path("hello");
    let mut flags: Vec<&str> = vec!["--host-id", "bench", "--memory", &args.memory];
    flags.extend(args.up_flags.iter().map(String::as_str));
    let up = Up::start(&wharf, &dir.join("data"), &flags);
    let client = reqwest::Client::new();
    let started = Instant::now();
    let names: Vec<usize> = (0..args.services).collect();
    for (part, chunk) in names.chunks(500).enumerate() {
        let mut manifest = String::from("services:\n");
        for i in chunk {
            manifest.push_str(&format!("  - name: s{i}\n    component: {{ file: {} }}\n    routes: [{{ path_prefix: /s{i} }}]\n", hello.display()));
            if let Some(limits) = &args.limits {
                manifest.push_str(&format!("    limits: {{ {limits} }}\n"));
            }
        }
        let path = dir.join(format!("many-{part}.yaml"));
        std::fs::write(&path, manifest)?;
        match up.wharf(&["apply", "--no-wait", "-f", path.to_str().context("utf-8")?]) {
            (true, _) => {}
            (false, text) => bail!("apply failed: {text}"),
        }
    }
    let applied = started.elapsed();

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
    crate::write_report(&args.out, &report)?;
    drop(up);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
