//! Messages per second through a trigger (core NATS and JetStream) vs a raw
//! async-nats subscriber doing the same work, in the same run, against the
//! same nats-server.
//!
//! The work is the `messenger` sample's handler with body `noop`: a fresh
//! instance per message that returns at once, so the figures are the cost
//! of the message path plus one instantiation. Three ways each:
//! - `trigger`: `wharf up --nats` with a service triggered by the subject
//!   (its intake, dispatch, the handler in a fresh instance, ack for
//!   JetStream);
//! - `raw + wasm`: an async-nats subscriber (or pull consumer) in this
//!   process running the same handler through `wharf_host::Workload`,
//!   holding as many messages at once as a trigger's intake (the concurrency);
//! - `raw`: the same subscriber doing nothing per message (the floor).
//!
//! Each run publishes every message, then waits until all are handled;
//! messages/s = messages / (first publish to last handled).

use anyhow::{Context, bail};
use futures::StreamExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use wharf_host::messaging::BrokerMessage;
use wharf_host::metrics::HostMetrics;
use wharf_host::{Runtime, RuntimeConfig, Workload, WorkloadSpec};
use wharf_testkit::nats::NatsServer;
use wharf_testkit::wharf::Up;

#[derive(clap::Args)]
pub struct TriggerArgs {
    /// The `wharf` binary (default: next to this one).
    #[arg(long)]
    wharf: Option<PathBuf>,
    /// Messages per figure.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Instances one replica (and the raw subscriber) runs at once.
    #[arg(long, default_value_t = 64)]
    concurrency: u32,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/triggers.json")]
    out: PathBuf,
}

/// What a raw subscriber does per message.
#[derive(Clone)]
enum Work {
    Nothing,
    Wasm(Workload),
}

impl Work {
    async fn run(&self, subject: &str, body: bytes::Bytes) -> anyhow::Result<()> {
        match self {
            Work::Nothing => Ok(()),
            Work::Wasm(workload) => workload
                .handle_message(BrokerMessage { subject: subject.to_string(), body: body.to_vec(), reply_to: None })
                .await
                .map_err(anyhow::Error::from),
        }
    }
}

pub async fn run(args: TriggerArgs) -> anyhow::Result<()> {
    let wharf = crate::wharf_binary(args.wharf.as_ref())?;
    let nats = NatsServer::start();
    let dir = crate::scratch_dir("triggers")?;
    let up = Up::start(&wharf, &dir.join("data"), &["--nats", &nats.url(), "--host-id", "triggers"]);
    let messenger = wharf_testkit::samples::path("messenger");
    let manifest = dir.join("triggers.yaml");
    let messenger = messenger.to_str().context("utf-8 path")?;
    let c = args.concurrency;
    std::fs::write(
        &manifest,
        format!(
            "services:\n\
             - name: bench-core\n  component: {{ file: {messenger} }}\n  limits: {{ concurrency: {c} }}\n  triggers: [{{ subject: \"core.>\" }}]\n\
             - name: bench-stream\n  component: {{ file: {messenger} }}\n  limits: {{ concurrency: {c} }}\n  triggers: [{{ subject: \"stream.>\", stream: bench }}]\n"
        ),
    )?;
    let (ok, text) = up.wharf(&["apply", "-f", manifest.to_str().context("utf-8 path")?]);
    if !ok {
        bail!("apply failed: {text}");
    }
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client.clone());
    // Every intake subscribes once its service is known; give them a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let runtime = Runtime::new(RuntimeConfig { cache_dir: Some(dir.join("compiled")), ..RuntimeConfig::default() })?;
    let metrics = HostMetrics::for_runtime(&runtime);
    let bytes = std::fs::read(messenger)?;
    let loaded = tokio::task::spawn_blocking({
        let runtime = runtime.clone();
        move || runtime.load(&bytes, None)
    })
    .await??;
    let mut spec = WorkloadSpec::new("bench/raw");
    spec.limits.concurrency = args.concurrency;
    let wasm = Work::Wasm(Workload::new(&runtime, loaded, spec, &metrics)?);
    let n = args.messages;

    // Core NATS.
    let core_trigger = trigger_core(&client, &up.admin, n).await?;
    // A raw subscriber holds as many messages at once as a trigger's intake:
    // the replica's concurrency.
    let in_flight = args.concurrency as usize;
    let core_wasm = raw_core(&client, n, in_flight, wasm.clone()).await?;
    let core_raw = raw_core(&client, n, in_flight, Work::Nothing).await?;
    // JetStream.
    let stream_trigger = trigger_stream(&js, n).await?;
    let stream_wasm = raw_stream(&js, "wasm", n, in_flight, wasm.clone()).await?;
    let stream_raw = raw_stream(&js, "nothing", n, in_flight, Work::Nothing).await?;

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!("{n} messages each, handler `noop` in a fresh instance (messenger sample), concurrency {c}:");
    for (what, trigger, raw_wasm, raw) in [("core NATS", core_trigger, core_wasm, core_raw), ("JetStream", stream_trigger, stream_wasm, stream_raw)] {
        println!("  {what}:");
        println!("    trigger (wharf up --nats):        {:>8.0} msg/s  ({:.1} µs/msg)", rate(trigger), per(trigger));
        println!("    raw async-nats + same wasm work:  {:>8.0} msg/s  ({:.1} µs/msg)", rate(raw_wasm), per(raw_wasm));
        println!("    raw async-nats, no work:          {:>8.0} msg/s  ({:.1} µs/msg)", rate(raw), per(raw));
        println!("    trigger cost / raw + same work:   {:.2}x", per(trigger) / per(raw_wasm));
    }
    let figure = |d: Duration| serde_json::json!({"seconds": d.as_secs_f64(), "messages_per_second": rate(d), "micros_per_message": per(d)});
    let report = serde_json::json!({
        "messages": n,
        "concurrency": c,
        "core": {"trigger": figure(core_trigger), "raw_wasm": figure(core_wasm), "raw_nothing": figure(core_raw)},
        "jetstream": {"trigger": figure(stream_trigger), "raw_wasm": figure(stream_wasm), "raw_nothing": figure(stream_raw)},
    });
    crate::write_report(&args.out, &report)?;
    drop(up);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Handled messages of `service` (outcome ok) on the host's `/metrics`.
async fn handled(http: &reqwest::Client, admin: &str, service: &str) -> anyhow::Result<usize> {
    let text = http.get(format!("{admin}/metrics")).send().await?.text().await?;
    let needle = format!("service=\"{service}\"");
    Ok(crate::metric_sum(&text, "wharf_requests_total", |labels| labels.contains(&needle) && labels.contains("outcome=\"ok\"")) as usize)
}

async fn trigger_core(client: &async_nats::Client, admin: &str, n: usize) -> anyhow::Result<Duration> {
    let http = reqwest::Client::new();
    let before = handled(&http, admin, "default/bench-core").await?;
    let started = Instant::now();
    for _ in 0..n {
        client.publish("wharf.msg.default.core.x", "noop".into()).await?;
    }
    client.flush().await?;
    wait(started, || async { Ok(handled(&http, admin, "default/bench-core").await? >= before + n) }).await
}

async fn trigger_stream(js: &async_nats::jetstream::Context, n: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    publish_stream(js, "wharf.msg.default.stream.x", n).await?;
    wait(started, || async {
        let name = wharf_proto::trigger::consumer_name("bench-stream", "stream.>");
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = js.get_consumer_from_stream(&name, "wharf-msg-default-bench").await?;
        let info = consumer.info().await?;
        Ok(info.num_pending == 0 && info.num_ack_pending == 0)
    })
    .await
}

/// Publishes `n` messages to a stream, each stored before it returns.
async fn publish_stream(js: &async_nats::jetstream::Context, subject: &str, n: usize) -> anyhow::Result<()> {
    let mut acks = Vec::with_capacity(1000);
    for i in 0..n {
        acks.push(js.publish(subject.to_string(), "noop".into()).await?);
        if acks.len() == 1000 || i + 1 == n {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    Ok(())
}

/// Polls `done` every 10 ms; the time from `started` to when it first holds.
async fn wait<F, Fut>(started: Instant, done: F) -> anyhow::Result<Duration>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    loop {
        if done().await? {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("not all messages were handled within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn raw_core(client: &async_nats::Client, n: usize, in_flight: usize, work: Work) -> anyhow::Result<Duration> {
    let subject = "raw.core.x";
    let mut subscriber = client.subscribe(subject).await?;
    client.flush().await?;
    let done = Arc::new(AtomicUsize::new(0));
    let (finished, mut all) = tokio::sync::watch::channel(false);
    let permits = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let consumer = {
        let done = done.clone();
        tokio::spawn(async move {
            while let Some(message) = subscriber.next().await {
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let (work, done, finished) = (work.clone(), done.clone(), finished.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = work.run(&message.subject, message.payload).await {
                        eprintln!("raw handler failed: {e:#}");
                    }
                    if done.fetch_add(1, Ordering::Relaxed) + 1 == n {
                        let _ = finished.send(true);
                    }
                });
            }
        })
    };
    let started = Instant::now();
    for _ in 0..n {
        client.publish(subject, "noop".into()).await?;
    }
    client.flush().await?;
    tokio::time::timeout(Duration::from_secs(300), all.wait_for(|all| *all)).await??;
    let elapsed = started.elapsed();
    consumer.abort();
    Ok(elapsed)
}

async fn raw_stream(js: &async_nats::jetstream::Context, name: &str, n: usize, in_flight: usize, work: Work) -> anyhow::Result<Duration> {
    use async_nats::jetstream::{consumer, stream};
    let subject = format!("raw.stream.{name}");
    let stream = js.get_or_create_stream(stream::Config { name: format!("raw-{name}"), subjects: vec![subject.clone()], ..Default::default() }).await?;
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            "raw",
            consumer::pull::Config {
                durable_name: Some("raw".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                max_ack_pending: 1024,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    let done = Arc::new(AtomicUsize::new(0));
    let (finished, mut all) = tokio::sync::watch::channel(false);
    let permits = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let pulling = {
        let done = done.clone();
        tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                let Ok(message) = message else { continue };
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let (work, done, finished) = (work.clone(), done.clone(), finished.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match work.run(&message.subject, message.payload.clone()).await {
                        Ok(()) => {
                            let _ = message.ack().await;
                        }
                        Err(e) => eprintln!("raw handler failed: {e:#}"),
                    }
                    if done.fetch_add(1, Ordering::Relaxed) + 1 == n {
                        let _ = finished.send(true);
                    }
                });
            }
        })
    };
    let started = Instant::now();
    publish_stream(js, &subject, n).await?;
    tokio::time::timeout(Duration::from_secs(300), all.wait_for(|all| *all)).await??;
    let elapsed = started.elapsed();
    pulling.abort();
    Ok(elapsed)
}
