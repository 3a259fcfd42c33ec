//! Resident memory per loaded workload, measured in a child process so the
//! load generator and earlier runs do not pollute the figure; and the
//! per-request instantiation time.

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::Duration;
use wharf_host::metrics::HostMetrics;
use wharf_host::{Runtime, RuntimeConfig, Workload, WorkloadSpec};

#[derive(clap::Args)]
pub struct ProbeArgs {
    /// The component to load (distinct copies are made by adding a custom section).
    #[arg(long)]
    component: PathBuf,
    /// Compile cache directory.
    #[arg(long)]
    cache: PathBuf,
    /// Workloads to load.
    #[arg(long)]
    workloads: usize,
    /// Only compile into the cache, then exit.
    #[arg(long)]
    prepare: bool,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Probe {
    pub workloads: usize,
    pub rss_bytes: u64,
}

/// Runs `rss-probe` in a child process and reads its answer.
pub async fn run_probe(me: &Path, cache: &Path, workloads: usize, prepare: bool) -> anyhow::Result<Probe> {
    let component = wharf_testkit::samples::path("hello");
    let mut command = tokio::process::Command::new(me);
    command.arg("rss-probe").arg("--component").arg(component).arg("--cache").arg(cache).arg("--workloads").arg(workloads.to_string());
    if prepare {
        command.arg("--prepare");
    }
    let output = command.output().await.context("run rss-probe")?;
    if !output.status.success() {
        bail!("rss-probe failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    serde_json::from_slice(&output.stdout).context("rss-probe output")
}

/// The probe itself: a host runtime as `wharf` sizes it by default, with
/// `workloads` distinct components loaded from the compile cache (as after a
/// restart), each serving one request.
pub async fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.component)?;
    let runtime = Runtime::new(RuntimeConfig { cache_dir: Some(args.cache.clone()), ..RuntimeConfig::default() })?;
    let metrics = HostMetrics::default();
    let mut loaded = Vec::new();
    for i in 0..args.workloads {
        let variant = with_custom_section(&bytes, &format!("wharf-bench-variant-{i}"));
        let component = runtime.load(&variant, None)?;
        if args.prepare {
            continue;
        }
        let workload = Workload::new(&runtime, component, WorkloadSpec::new(format!("bench/hello-{i}")), &metrics)?;
        serve_one(&workload).await.with_context(|| format!("workload {i}"))?;
        loaded.push(workload);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let probe = Probe { workloads: args.workloads, rss_bytes: resident_bytes()? };
    println!("{}", serde_json::to_string(&probe)?);
    drop(loaded);
    Ok(())
}

/// Sends one GET to a workload directly (no HTTP server) and reads the whole answer.
pub async fn serve_one(workload: &Workload) -> anyhow::Result<()> {
    let request = http::Request::get("http://localhost/").body(Empty::<Bytes>::new().map_err(|never: Infallible| -> wasmtime_wasi_http::Error { match never {} }))?;
    let response = workload.handle(request).await;
    if !response.status().is_success() {
        bail!("answered {}", response.status());
    }
    response.into_body().collect().await.map_err(|e| anyhow::anyhow!("body: {e:?}"))?;
    Ok(())
}

/// Per-request instantiation time (p50, p99) in microseconds.
pub async fn time_instantiation(component: &Path, n: usize) -> anyhow::Result<(f64, f64)> {
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let loaded = runtime.load(&std::fs::read(component)?, None)?;
    let workload = Workload::new(&runtime, loaded, WorkloadSpec::new("bench/hello"), &HostMetrics::default())?;
    workload.time_instantiations(1000).await.map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let mut times = workload.time_instantiations(n).await.map_err(|e| anyhow::anyhow!("{e:#}"))?;
    times.sort_unstable();
    Ok((crate::load::percentile(&times, 0.5), crate::load::percentile(&times, 0.99)))
}

/// A copy of a component with a custom section appended: a distinct digest,
/// so a distinct compiled artifact, with the same behaviour.
pub fn with_custom_section(bytes: &[u8], name: &str) -> Vec<u8> {
    let mut payload = Vec::new();
    leb128(&mut payload, name.len() as u64);
    payload.extend_from_slice(name.as_bytes());
    let mut out = bytes.to_vec();
    out.push(0);
    leb128(&mut out, payload.len() as u64);
    out.extend_from_slice(&payload);
    out
}

fn leb128(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// This process's resident set size.
fn resident_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/self/status")?;
    Ok(kib * 1024)
}
