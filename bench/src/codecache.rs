//! The compiled-code cache: a service's first request when its code is in
//! memory, when it was evicted from memory (so it is read back from the
//! disk cache), and when it was never compiled; each is load + new
//! workload + one request, measured in one process, in one run.

use crate::rss::{serve_one, with_custom_section};
use anyhow::{Context, bail};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use wharf_host::metrics::HostMetrics;
use wharf_host::{Runtime, RuntimeConfig, Workload, WorkloadSpec};
use wharf_proto::{ByteSize, Digest};

#[derive(clap::Args)]
pub struct CodeCacheArgs {
    /// Rounds; each measures all three cases with a fresh component.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/codecache.json")]
    out: PathBuf,
}

#[derive(serde::Serialize)]
struct Figures {
    rounds: usize,
    in_memory_ms: Summary,
    after_eviction_ms: Summary,
    cold_compile_ms: Summary,
    /// Medians: after eviction / in memory, and cold compile / after eviction.
    eviction_vs_memory: f64,
    compile_vs_eviction: f64,
    compiled_bytes: u64,
}

#[derive(serde::Serialize)]
struct Summary {
    p50: f64,
    max: f64,
}

fn summary(times: &mut [Duration]) -> Summary {
    times.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Summary { p50: ms(times[times.len() / 2]), max: ms(times[times.len() - 1]) }
}

/// Load (from wherever the runtime finds it) + workload + one request.
async fn first_request(runtime: &Runtime, metrics: &HostMetrics, bytes: &[u8], name: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let loaded = match runtime.load_compiled(&Digest::of(bytes)) {
        Some(loaded) => loaded?,
        None => runtime.load(bytes, None)?,
    };
    let workload = Workload::new(runtime, loaded, WorkloadSpec::new(format!("bench/{name}")), metrics)?;
    serve_one(&workload).await.with_context(|| name.to_string())?;
    Ok(started.elapsed())
}

pub async fn run(args: CodeCacheArgs) -> anyhow::Result<()> {
    let dir = crate::scratch_dir("codecache")?;
    // One byte: only the most recently used component stays in memory, so
    // loading any other one evicts it.
    let runtime = Runtime::new(RuntimeConfig { cache_dir: Some(dir.join("compiled")), code_cache: ByteSize(1), ..RuntimeConfig::default() })?;
    let metrics = HostMetrics::for_runtime(&runtime);
    let hello = std::fs::read(wharf_testkit::samples::path("hello"))?;
    let filler = with_custom_section(&hello, "wharf-bench-filler");
    first_request(&runtime, &metrics, &filler, "filler").await?;
    let (mut memory, mut evicted, mut cold) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let bytes = with_custom_section(&hello, &format!("wharf-bench-codecache-{round}-{}", std::process::id()));
        let before = runtime.code_cache_stats();
        cold.push(first_request(&runtime, &metrics, &bytes, "cold").await?);
        memory.push(first_request(&runtime, &metrics, &bytes, "memory").await?);
        first_request(&runtime, &metrics, &filler, "filler").await?;
        evicted.push(first_request(&runtime, &metrics, &bytes, "evicted").await?);
        let after = runtime.code_cache_stats();
        // One compile (the cold case); the filler and the evicted case come from disk.
        if after.compiles - before.compiles != 1 || after.disk_loads - before.disk_loads != 2 || after.hits - before.hits != 1 {
            bail!("round {round}: unexpected cache behaviour: before {before:?}, after {after:?}");
        }
    }
    let (in_memory_ms, after_eviction_ms, cold_compile_ms) = (summary(&mut memory), summary(&mut evicted), summary(&mut cold));
    let figures = Figures {
        rounds: args.rounds,
        eviction_vs_memory: after_eviction_ms.p50 / in_memory_ms.p50,
        compile_vs_eviction: cold_compile_ms.p50 / after_eviction_ms.p50,
        in_memory_ms,
        after_eviction_ms,
        cold_compile_ms,
        compiled_bytes: runtime.code_cache_stats().bytes,
    };
    println!("first request, code in memory:   p50 {:.2} ms, max {:.2} ms", figures.in_memory_ms.p50, figures.in_memory_ms.max);
    println!("first request, after eviction:   p50 {:.2} ms, max {:.2} ms", figures.after_eviction_ms.p50, figures.after_eviction_ms.max);
    println!("first request, cold compile:     p50 {:.2} ms, max {:.2} ms", figures.cold_compile_ms.p50, figures.cold_compile_ms.max);
    println!("after eviction / in memory: {:.1}x; cold compile / after eviction: {:.1}x", figures.eviction_vs_memory, figures.compile_vs_eviction);
    println!("compiled hello in memory: {} KiB", figures.compiled_bytes / 1024);
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&figures)?)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
