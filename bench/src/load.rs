//! An HTTP/1.1 load generator over `connections` keep-alive connections, for
//! a fixed time. Closed loop ([`run`]): each connection sends its next
//! request as soon as the last is answered. Paced ([`run_paced`]): requests
//! go out on a fixed schedule, and a request held back by a slow answer to
//! the one before counts from when it was due, so a stall is charged to
//! every request it delayed. Every latency
//! is recorded, so percentiles are exact rather than bucketed.

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
    drive(addr, path, connections, None, warmup, duration).await
}

/// Sends GET `path` at `rate` requests per second in all, spread over
/// `connections`, for `warmup` (not counted) and then `duration`.
pub async fn run_paced(addr: SocketAddr, path: &str, connections: usize, rate: f64, warmup: Duration, duration: Duration) -> anyhow::Result<LoadReport> {
    if rate.is_nan() || rate <= 0.0 {
        bail!("the request rate must be positive");
    }
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    drive(addr, path, connections, Some(interval), warmup, duration).await
}

async fn drive(addr: SocketAddr, path: &str, connections: usize, pace: Option<Duration>, warmup: Duration, duration: Duration) -> anyhow::Result<LoadReport> {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..connections {
        let path = path.to_string();
        // Paced connections start staggered so their requests interleave.
        let first = pace.map(|p| start + p.mul_f64(i as f64 / connections as f64));
        tasks.spawn(async move { connection(addr, path, pace.zip(first), measure_from, end).await });
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

/// One connection's requests; with `pace = (interval, first)`, request k is
/// due at `first + k * interval` and its latency counts from then.
async fn connection(addr: SocketAddr, path: String, pace: Option<(Duration, Instant)>, measure_from: Instant, end: Instant) -> anyhow::Result<(Vec<Duration>, u64)> {
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut due = pace.map(|(_, first)| first);
    let mut errors = 0;
    'reconnect: while Instant::now() < end {
        let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        loop {
            // A request sent late because the last one was still being
            // answered counts from when it was due; one the timer woke up
            // for counts from the wake-up (the timer's millisecond rounding
            // is not the server's doing).
            let now = match due {
                Some(at) if Instant::now() < at => {
                    tokio::time::sleep_until(at.into()).await;
                    Instant::now()
                }
                Some(at) => at,
                None => Instant::now(),
            };
            if now >= end {
                break 'reconnect;
            }
            if let (Some(at), Some((interval, _))) = (due.as_mut(), pace) {
                *at += interval;
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
