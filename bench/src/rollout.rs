//! Rollouts on a real cluster (nats-server, one scheduler, three hosts on
//! loopback) under steady load through every host's ingress: how long a
//! rolling update of many replicas takes and how many requests fail
//! meanwhile (target 0), and, for a canary that fails its analysis, the
//! time from the failure's detection to the stable revision taking all
//! traffic again (the last failing answer seen by clients).

use std::path::PathBuf;
use std::time::{Duration, Instant};
use wharf_testkit::cluster::{Host, Scheduler};
use wharf_testkit::load::Load;
use wharf_testkit::nats::NatsServer;

#[derive(clap::Args)]
pub struct RolloutArgs {
    /// The `wharf` binary (default: next to this one).
    #[arg(long)]
    wharf: Option<PathBuf>,
    /// Replicas of the service rolled out.
    #[arg(long, default_value_t = 30)]
    replicas: u32,
    /// Load workers per host ingress (closed loop).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/rollout.json")]
    out: PathBuf,
}

pub async fn run(args: RolloutArgs) -> anyhow::Result<()> {
    let wharf = crate::wharf_binary(args.wharf.as_ref())?;
    let dir = crate::scratch_dir("rollout")?;
    let hello = wharf_testkit::samples::path("hello").to_str().unwrap_or_default().to_string();
    let nats = NatsServer::start();
    let scheduler = Scheduler::start(&wharf, &nats.url(), &dir.join("scheduler"), &[]);
    let hosts: Vec<Host> = ["a", "b", "c"].iter().map(|z| Host::start(&wharf, &nats.url(), &format!("host-{z}"), z, &dir, &[])).collect();
    let replicas = args.replicas.to_string();
    scheduler.ok(&["deploy", &hello, "--name", "web", "--route", "/web", "--replicas", &replicas, "--readiness", "/healthz", "--env", "GREETING=v1"]);
    let urls: Vec<String> = hosts.iter().map(|h| format!("{}/web", h.ingress)).collect();
    let load = Load::start(&urls, args.workers);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A rolling update of every replica.
    let started = Instant::now();
    scheduler.ok(&["deploy", &hello, "--name", "web", "--env", "GREETING=v2"]);
    let rolling = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_rolling = load.snapshot();
    eprintln!(
        "rolling update of {} replicas: {rolling:.2?}, {} failed of {} requests ({:.0} requests/s)",
        args.replicas,
        after_rolling.failures.len(),
        after_rolling.total(),
        after_rolling.rate()
    );

    // A canary that fails every request: aborted by its analysis.
    let manifest = dir.join("canary.yaml");
    std::fs::write(
        &manifest,
        format!(
            "name: web\ncomponent: {{ file: {hello} }}\nreplicas: {}\nroutes: [{{ path_prefix: /web }}]\n\
             health: {{ readiness: {{ path: /healthz }} }}\nenv: {{ GREETING: bad, FAIL_STATUS: \"500\" }}\n\
             rollout: {{ canary: {{ steps: [10], interval: 3s, min_requests: 20, max_error_rate: 5 }} }}\n",
            args.replicas
        ),
    )?;
    let (refused, text) = scheduler.wharf(&["apply", "-f", manifest.to_str().unwrap_or_default()]);
    if refused {
        anyhow::bail!("the failing canary was not aborted:\n{text}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tally = load.stop().await;
    let rollout = scheduler.service("web")["status"]["rollout"].clone();
    let detected_ms = rollout["failed"]["at_ms"].as_u64().unwrap_or(0);
    let canary_failures: Vec<u64> = tally
        .failures
        .iter()
        .filter(|(_, what)| what.contains("failing with 500"))
        .map(|(at, _)| tally.started_at_ms + u64::try_from(at.as_millis()).unwrap_or(0))
        .collect();
    let last_bad_ms = canary_failures.iter().copied().max().unwrap_or(detected_ms);
    let back_ms = last_bad_ms.saturating_sub(detected_ms);
    eprintln!(
        "failed canary: {} requests failed while it was judged; stable revision took all traffic again {back_ms} ms after the failure was detected",
        canary_failures.len()
    );
    for (at, what) in tally.failures.iter().filter(|(_, what)| !what.contains("failing with 500")) {
        eprintln!("  another failure during the canary, at {at:.2?}: {what}");
    }
    let report = serde_json::json!({
        "replicas": args.replicas,
        "hosts": 3,
        "load_requests_per_second": after_rolling.rate(),
        "rolling_update_seconds": rolling.as_secs_f64(),
        "rolling_update_failed_requests": after_rolling.failures.len(),
        "rolling_update_requests": after_rolling.total(),
        "canary_failed_requests": canary_failures.len(),
        "canary_detection_to_all_stable_ms": back_ms,
        "other_failures": tally.failures.len() - canary_failures.len(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    crate::write_report(&args.out, &report)
}
