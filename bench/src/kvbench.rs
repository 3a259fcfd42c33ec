//! `wasi:keyvalue` from inside a component vs a raw JetStream KV get/put
//! from Rust, in the same run, against the same nats-server; and the same
//! calls from a host of its own, which makes them through the control
//! plane's data broker (issue 17), against the in-process host's direct ones.

use crate::load;
use anyhow::{Context, bail};
use bytes::Bytes;
use std::path::PathBuf;
use std::time::Instant;
use wharf_testkit::nats::NatsServer;
use wharf_testkit::wharf::Up;

#[derive(clap::Args)]
pub struct KvArgs {
    /// The `wharf` binary (default: next to this one).
    #[arg(long)]
    wharf: Option<PathBuf>,
    /// Sequential operations per figure.
    #[arg(long, default_value_t = 2000)]
    ops: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/kv.json")]
    out: PathBuf,
}

async fn timed(client: &reqwest::Client, n: usize, request: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder) -> anyhow::Result<(f64, f64)> {
    for _ in 0..100 {
        request(client).send().await?.bytes().await?;
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let response = request(client).send().await?;
        let status = response.status();
        response.bytes().await?;
        if !(status.is_success() || status.as_u16() == 400) {
            bail!("answered {status}");
        }
        times.push(started.elapsed());
    }
    times.sort();
    Ok((load::percentile(&times, 0.5), load::percentile(&times, 0.99)))
}

pub async fn run(args: KvArgs) -> anyhow::Result<()> {
    let wharf = crate::wharf_binary(args.wharf.as_ref())?;
    let nats = NatsServer::start();
    let dir = crate::scratch_dir("kv")?;
    let up = Up::start(&wharf, &dir.join("data"), &["--nats", &nats.url(), "--host-id", "kv"]);
    let ingress = up.ingress.clone();
    let counter = wharf_testkit::samples::path("counter");
    let (ok, text) = up.wharf(&["deploy", counter.to_str().context("utf-8 path")?, "--name", "counter", "--route", "/", "--keyvalue", "counter"]);
    if !ok {
        bail!("deploy failed: {text}");
    }
    let client = reqwest::Client::builder().pool_max_idle_per_host(1).build()?;
    client.put(format!("{ingress}/set?key=k")).body("v".repeat(100)).send().await?;

    // The same request path without touching the store: /get without a key answers 400 before any KV call.
    let baseline = timed(&client, args.ops, |c| c.get(format!("{ingress}/get"))).await?;
    let get = timed(&client, args.ops, |c| c.get(format!("{ingress}/get?key=k"))).await?;
    let set = timed(&client, args.ops, |c| c.put(format!("{ingress}/set?key=k")).body("v".repeat(100))).await?;

    // Raw JetStream KV from Rust, the same bucket, through wharf-bus (async-nats).
    let bus = wharf_bus::Bus::connect_nats(&nats.url(), wharf_bus::NatsOptions::default()).await?;
    let kv = bus.kv(&wharf_proto::names::kv_bucket("default")).await?;
    let key = wharf_proto::names::kv_key("counter", "raw");
    let value = Bytes::from("v".repeat(100));
    kv.put(&key, value.clone()).await?;
    let mut raw_get = Vec::new();
    let mut raw_put = Vec::new();
    for _ in 0..args.ops {
        let started = Instant::now();
        kv.get(&key).await?.context("raw key present")?;
        raw_get.push(started.elapsed());
        let started = Instant::now();
        kv.put(&key, value.clone()).await?;
        raw_put.push(started.elapsed());
    }
    raw_get.sort();
    raw_put.sort();
    drop(up);

    // The same through a host of its own (`wharf scheduler` + `wharf
    // host`): its data calls go through the control plane's data broker.
    let scheduler = wharf_testkit::cluster::Scheduler::start(&wharf, &nats.url(), &dir.join("scheduler"), &[]);
    let host = wharf_testkit::cluster::Host::start(&wharf, &nats.url(), "kv-host", "a", &dir, &[]);
    let (ok, text) = scheduler.wharf(&["deploy", counter.to_str().context("utf-8 path")?, "--name", "counter2", "--route", "/", "--keyvalue", "counter"]);
    if !ok {
        bail!("deploy on the host failed: {text}");
    }
    let brokered_ingress = host.ingress.clone();
    let started = Instant::now();
    while client.get(format!("{brokered_ingress}/get")).send().await.map(|r| r.status().as_u16()).unwrap_or(0) != 400 {
        if started.elapsed() > std::time::Duration::from_secs(60) {
            bail!("the host did not serve counter2 within a minute");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    client.put(format!("{brokered_ingress}/set?key=k")).body("v".repeat(100)).send().await?;
    let brokered_baseline = timed(&client, args.ops, |c| c.get(format!("{brokered_ingress}/get"))).await?;
    let brokered_get = timed(&client, args.ops, |c| c.get(format!("{brokered_ingress}/get?key=k"))).await?;
    let brokered_set = timed(&client, args.ops, |c| c.put(format!("{brokered_ingress}/set?key=k")).body("v".repeat(100))).await?;
    drop(host);
    drop(scheduler);
    let raw_get = (load::percentile(&raw_get, 0.5), load::percentile(&raw_get, 0.99));
    let raw_put = (load::percentile(&raw_put, 0.5), load::percentile(&raw_put, 0.99));
    println!("wasi:keyvalue over JetStream KV (counter sample via wharf up --nats), {} sequential ops each:", args.ops);
    println!("  request without a KV call (baseline):  p50 {:.0} µs, p99 {:.0} µs", baseline.0, baseline.1);
    println!("  request with bucket.get (100 B):       p50 {:.0} µs, p99 {:.0} µs -> the get adds {:.0} µs at p50", get.0, get.1, get.0 - baseline.0);
    println!("  request with bucket.set (100 B):       p50 {:.0} µs, p99 {:.0} µs -> the set adds {:.0} µs at p50", set.0, set.1, set.0 - baseline.0);
    println!("  raw JetStream KV get from Rust:        p50 {:.0} µs, p99 {:.0} µs", raw_get.0, raw_get.1);
    println!("  raw JetStream KV put from Rust:        p50 {:.0} µs, p99 {:.0} µs", raw_put.0, raw_put.1);
    println!("  ratio, component get cost / raw get: {:.2}x; component set cost / raw put: {:.2}x", (get.0 - baseline.0) / raw_get.0, (set.0 - baseline.0) / raw_put.0);
    println!("through a host of its own, its data calls made by the control plane's data broker:");
    println!("  request without a KV call (baseline):  p50 {:.0} µs, p99 {:.0} µs", brokered_baseline.0, brokered_baseline.1);
    println!("  request with bucket.get (100 B):       p50 {:.0} µs, p99 {:.0} µs -> the get adds {:.0} µs at p50", brokered_get.0, brokered_get.1, brokered_get.0 - brokered_baseline.0);
    println!("  request with bucket.set (100 B):       p50 {:.0} µs, p99 {:.0} µs -> the set adds {:.0} µs at p50", brokered_set.0, brokered_set.1, brokered_set.0 - brokered_baseline.0);
    println!(
        "  ratio, brokered cost / direct cost: get {:.2}x, set {:.2}x",
        (brokered_get.0 - brokered_baseline.0) / (get.0 - baseline.0),
        (brokered_set.0 - brokered_baseline.0) / (set.0 - baseline.0)
    );
    let report = serde_json::json!({
        "ops": args.ops,
        "baseline_p50_micros": baseline.0, "baseline_p99_micros": baseline.1,
        "component_get_p50_micros": get.0, "component_get_p99_micros": get.1,
        "component_set_p50_micros": set.0, "component_set_p99_micros": set.1,
        "raw_get_p50_micros": raw_get.0, "raw_get_p99_micros": raw_get.1,
        "raw_put_p50_micros": raw_put.0, "raw_put_p99_micros": raw_put.1,
        "brokered_baseline_p50_micros": brokered_baseline.0, "brokered_baseline_p99_micros": brokered_baseline.1,
        "brokered_get_p50_micros": brokered_get.0, "brokered_get_p99_micros": brokered_get.1,
        "brokered_set_p50_micros": brokered_set.0, "brokered_set_p99_micros": brokered_set.1,
    });
    crate::write_report(&args.out, &report)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
