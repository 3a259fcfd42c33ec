//! JetStream KV on one nats-server vs a 3-node cluster (three copies of the
//! bucket), in the same run: put, get and watch latency through `wharf-bus`,
//! and how soon writes succeed again after `kill -9` of the bucket's leader.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use wharf_bus::{Bus, Kv, KvWatch, NatsOptions};
use wharf_testkit::nats::{NatsCluster, NatsServer};

use crate::load;

#[derive(clap::Args)]
pub struct NatsHaArgs {
    /// Sequential operations per figure and round.
    #[arg(long, default_value_t = 2000)]
    ops: usize,
    /// Alternating rounds (one server, cluster, one server, ...); figures are over all rounds.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Times the bucket's leader is killed (and restarted) to time how soon writes resume.
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/nats-ha.json")]
    out: PathBuf,
}

/// Latencies of one setup, in microseconds once summarised.
#[derive(Default)]
struct Samples {
    put: Vec<Duration>,
    get: Vec<Duration>,
    watch: Vec<Duration>,
}

impl Samples {
    fn summary(&mut self) -> serde_json::Value {
        let figure = |times: &mut Vec<Duration>| {
            times.sort();
            (load::percentile(times, 0.5), load::percentile(times, 0.99))
        };
        let (put, get, watch) = (
            figure(&mut self.put),
            figure(&mut self.get),
            figure(&mut self.watch),
        );
        serde_json::json!({
            "put_p50_micros": put.0, "put_p99_micros": put.1,
            "get_p50_micros": get.0, "get_p99_micros": get.1,
            "watch_p50_micros": watch.0, "watch_p99_micros": watch.1,
        })
    }
}

/// A writer and a watcher, each with its own connection, on one bucket.
struct Setup {
    kv: Kv,
    watch: KvWatch,
}

impl Setup {
    async fn open(urls: &str, bucket: &str) -> anyhow::Result<Setup> {
        let options = |name: &str| NatsOptions {
            name: name.to_owned(),
            ..NatsOptions::default()
        };
        let writer = Bus::connect_nats(urls, options("bench-writer")).await?;
        let watcher = Bus::connect_nats(urls, options("bench-watcher")).await?;
        let kv = writer.kv(bucket).await?;
        let mut watch = watcher.kv(bucket).await?.watch(">").await?;
        // Something to get, and the watch past its replay.
        let revision = kv.put("k", Bytes::from("v".repeat(100))).await?;
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
                .await?
                .context("watch ended")?;
            if event.revision >= revision {
                break;
            }
        }
        Ok(Setup { kv, watch })
    }

    /// `ops` sequential puts, gets, and put-to-watch-event round trips.
    async fn measure(&mut self, ops: usize, samples: &mut Samples) -> anyhow::Result<()> {
        let value = Bytes::from("v".repeat(100));
        for _ in 0..ops {
            let started = Instant::now();
            self.kv.put("k", value.clone()).await?;
            samples.put.push(started.elapsed());
            let started = Instant::now();
            self.kv.get("k").await?.context("the key is there")?;
            samples.get.push(started.elapsed());
        }
        for index in 0..ops {
            let key = format!("w{index}");
            let started = Instant::now();
            let revision = self.kv.put(&key, value.clone()).await?;
            loop {
                let event = tokio::time::timeout(Duration::from_secs(10), self.watch.next())
                    .await?
                    .context("watch ended")?;
                if event.revision >= revision {
                    break;
                }
            }
            samples.watch.push(started.elapsed());
        }
        Ok(())
    }
}

/// Kills the bucket's leader `kills` times; returns how long after each kill a put sent after it first succeeded.
async fn failovers(cluster: &mut NatsCluster, kills: usize) -> anyhow::Result<Vec<Duration>> {
    let bus = Bus::connect_nats(
        &cluster.urls(),
        NatsOptions {
            name: "bench-failover".to_owned(),
            ..NatsOptions::default()
        },
    )
    .await?;
    let kv = bus.kv("failover").await?;
    kv.put("k", Bytes::from_static(b"0")).await?;
    let mut resumed = Vec::new();
    for round in 0..kills {
        let deadline = Instant::now() + Duration::from_secs(30);
        let leader = loop {
            // /jsz learns of a new bucket, or a new leader, a moment after the fact.
            if let Some(leader) = cluster.stream_leader("KV_failover") {
                break leader;
            }
            if Instant::now() > deadline {
                bail!("the bucket has had no leader for 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        cluster.kill(leader);
        let killed = Instant::now();
        loop {
            if kv.put("k", Bytes::from(round.to_string())).await.is_ok() {
                break;
            }
            if killed.elapsed() > Duration::from_secs(60) {
                bail!("no write succeeded within 60 s of killing the leader");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        resumed.push(killed.elapsed());
        eprintln!(
            "kill {}/{kills}: writes resumed after {:?}",
            round + 1,
            killed.elapsed()
        );
        cluster.restart(leader);
        // The next kill finds all three copies caught up, as the first did.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cluster.stream_is_current("KV_failover") {
            if Instant::now() > deadline {
                bail!("the restarted node did not catch up within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    resumed.sort();
    Ok(resumed)
}

pub async fn run(args: NatsHaArgs) -> anyhow::Result<()> {
    let single = NatsServer::start();
    let mut cluster = NatsCluster::start(3);
    let mut one = Setup::open(&single.url(), "bench").await?;
    let mut three = Setup::open(&cluster.urls(), "bench").await?;
    let replicas = cluster.stream_replicas("KV_bench");
    if replicas != Some(3) {
        bail!("the cluster's bucket has {replicas:?} copies, not 3");
    }
    let (mut one_samples, mut three_samples) = (Samples::default(), Samples::default());
    for round in 0..args.rounds {
        eprintln!("round {}/{}: one server", round + 1, args.rounds);
        one.measure(args.ops, &mut one_samples).await?;
        eprintln!("round {}/{}: three-node cluster", round + 1, args.rounds);
        three.measure(args.ops, &mut three_samples).await?;
    }
    drop((one, three));
    let one_report = one_samples.summary();
    let three_report = three_samples.summary();
    let resumed = failovers(&mut cluster, args.kills).await?;

    let micros = |report: &serde_json::Value, key: &str| report[key].as_f64().unwrap_or(f64::NAN);
    println!(
        "JetStream KV through wharf-bus, 100-byte values, {} sequential ops x {} rounds per figure:",
        args.ops, args.rounds
    );
    println!(
        "  {:<22} {:>16} {:>16} {:>8}",
        "", "one server", "3-node cluster", "ratio"
    );
    for (name, key) in [
        ("put p50", "put_p50_micros"),
        ("put p99", "put_p99_micros"),
        ("get p50", "get_p50_micros"),
        ("get p99", "get_p99_micros"),
        ("put -> watch p50", "watch_p50_micros"),
        ("put -> watch p99", "watch_p99_micros"),
    ] {
        let (a, b) = (micros(&one_report, key), micros(&three_report, key));
        println!("  {name:<22} {a:>13.0} µs {b:>13.0} µs {:>7.2}x", b / a);
    }
    let seconds: Vec<f64> = resumed.iter().map(Duration::as_secs_f64).collect();
    println!(
        "  writes resumed after kill -9 of the bucket's leader ({} kills): {:?} s",
        args.kills,
        seconds
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
    );
    let report = serde_json::json!({
        "ops": args.ops,
        "rounds": args.rounds,
        "one_server": one_report,
        "three_nodes": three_report,
        "writes_resumed_after_leader_kill_seconds": seconds,
    });
    crate::write_report(&args.out, &report)?;
    Ok(())
}
