//! What traces cost on the request path: `wharf serve hello` under the same
//! load without an OTLP endpoint (no exporter: the request path's spans are
//! never built) and with one, exporting every request's spans (guest,
//! instantiation) to a collector in this process that accepts and drops
//! them. Alternating rounds, so drift hits both alike.

use crate::{Server, free_port, load, mean, tempdir_in_target, wharf_binary, write_report};
use anyhow::bail;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

#[derive(clap::Args)]
pub struct TracingArgs {
    /// The `wharf` binary to benchmark (default: next to this one).
    #[arg(long)]
    wharf: Option<PathBuf>,
    /// Concurrent keep-alive connections of the load generator.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Measured seconds per load run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds (without, with, without, ...); figures are the mean.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/tracing.json")]
    out: PathBuf,
}

/// A collector that answers 200 to every export and counts the bytes.
async fn collector() -> anyhow::Result<(String, std::sync::Arc<std::sync::atomic::AtomicU64>)> {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = received.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let counter = counter.clone();
                    async move {
                        let body = request.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
                        counter.fetch_add(body as u64, std::sync::atomic::Ordering::Relaxed);
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
            });
        }
    });
    Ok((url, received))
}

pub async fn run(args: TracingArgs) -> anyhow::Result<()> {
    let wharf = wharf_binary(args.wharf.as_ref())?;
    if !wharf.is_file() {
        bail!("{} not found: build it first with `cargo build --release --bin wharf` (or pass --wharf)", wharf.display());
    }
    let hello = wharf_testkit::samples::path("hello");
    let cache = tempdir_in_target("bench-cache")?;
    let (endpoint, exported) = collector().await?;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        for export in [false, true] {
            eprintln!("round {}/{}: {}", round + 1, args.rounds, if export { "exporting spans" } else { "no endpoint" });
            let port = free_port()?;
            let mut command = Command::new(&wharf);
            command
                .arg("serve")
                .arg(&hello)
                .args(["--listen", &format!("127.0.0.1:{port}"), "--admin-listen", "127.0.0.1:0", "--concurrency", "256", "--cache-dir"])
                .arg(&cache)
                .env("WHARF_LOG", "warn")
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
            if export {
                command.args(["--otlp-endpoint", &endpoint]);
            }
            let server = Server::spawn(&mut command, port).await?;
            let report = load::run(server.addr, "/", args.connections, Duration::from_secs(2), Duration::from_secs(args.seconds)).await?;
            if export { on.push(report) } else { off.push(report) }
        }
    }
    let (off, on) = (mean(&off), mean(&on));
    let ratio = on.requests_per_second / off.requests_per_second;
    println!("no endpoint:     {:.0} req/s, p50 {:.0} µs, p99 {:.0} µs, {} errors", off.requests_per_second, off.p50_micros, off.p99_micros, off.errors);
    println!("exporting spans: {:.0} req/s, p50 {:.0} µs, p99 {:.0} µs, {} errors ({:.1} MiB of OTLP received)", on.requests_per_second, on.p50_micros, on.p99_micros, on.errors, exported.load(std::sync::atomic::Ordering::Relaxed) as f64 / crate::MIB);
    println!("throughput with export / without: {ratio:.3}");
    write_report(&args.out, &serde_json::json!({"no_endpoint": off, "exporting": on, "ratio": ratio, "connections": args.connections, "seconds": args.seconds, "rounds": args.rounds}))
}
