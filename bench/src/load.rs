//! A closed-loop HTTP/1.1 load generator: `connections` keep-alive
//! connections, each sending its next request as soon as the last is
//! answered, for a fixed time. Every latency is recorded, so percentiles are
//! exact rather than bucketed.

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What one load run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub p50_micros: f64,
    pub p99_micros: f64,
}

/// Sends GET `path` to `addr` over `connections` connections for `warmup`
/// (not counted) and then `duration`.
pub async fn run(addr: SocketAddr, path: &str, connections: usize, warmup: Duration, duration: Duration) -> anyhow::Result<LoadReport> {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let path = path.to_string();
        tasks.spawn(async move { connection(addr, path, measure_from, end).await });
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    while let Some(result) = tasks.join_next().await {
        let (mut lat, errs) = result.context("load task")??;
        latencies.append(&mut lat);
        errors += errs;
    }
    if latencies.is_empty() {
        bail!("no request to {addr}{path} succeeded");
    }
    latencies.sort_unstable();
    let seconds = duration.as_secs_f64();
    Ok(LoadReport {
        requests: latencies.len() as u64,
        errors,
        seconds,
        requests_per_second: latencies.len() as f64 / seconds,
        p50_micros: percentile(&latencies, 0.50),
        p99_micros: percentile(&latencies, 0.99),
    })
}

/// The `q` quantile of sorted durations, in microseconds.
pub fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

async fn connection(addr: SocketAddr, path: String, measure_from: Instant, end: Instant) -> anyhow::Result<(Vec<Duration>, u64)> {
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut errors = 0;
    'reconnect: while Instant::now() < end {
        let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        loop {
            let now = Instant::now();
            if now >= end {
                break 'reconnect;
            }
            let request = http::Request::get(&path).header(http::header::HOST, addr.to_string()).body(Empty::<Bytes>::new())?;
            if sender.ready().await.is_err() {
                errors += 1;
                continue 'reconnect;
            }
            let ok = match sender.send_request(request).await {
                Ok(response) => {
                    let status = response.status();
                    response.into_body().collect().await.is_ok() && status.is_success()
                }
                Err(_) => false,
            };
            let done = Instant::now();
            if now >= measure_from {
                if ok {
                    latencies.push(done - now);
                } else {
                    errors += 1;
                }
            }
            if !ok {
                continue 'reconnect;
            }
        }
    }
    Ok((latencies, errors))
}
