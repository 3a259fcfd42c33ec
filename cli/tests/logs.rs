//! Guest logs are bounded: a component logging in a tight loop on a real
//! `wharf up` neither stops another service from answering nor floods the
//! host's log, and its dropped lines are counted. How much it slows the
//! other service is measured in `bench/` (`wharf-bench noisy --noise logs`),
//! not bounded here: a timed bound flakes on a busy 2-core machine.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use wharf_testkit::samples;
use wharf_testkit::wharf::Up;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

/// `count` sequential requests to `url`, each answered 200.
async fn all_answered(client: &reqwest::Client, url: &str, count: usize) {
    for i in 0..count {
        let response = client.get(url).send().await.unwrap_or_else(|e| panic!("request {i} to {url}: {e}"));
        assert_eq!(response.status(), 200, "request {i} to {url}");
        response.bytes().await.expect("body");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_logging_in_a_loop_leaves_other_services_answering_and_its_drops_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    // WHARF_LOG=info: component lines really go to the host's stderr, as in production.
    let mut up = Up::start(Path::new(WHARF), &dir.path().join("data"), &["--host-id", "logs", "--log", "info", "--log-rate", "100", "--log-burst", "200"]);
    let (hello, spin) = (samples::path("hello"), samples::path("spin"));
    up.ok(&["deploy", hello.to_str().expect("utf-8"), "--name", "hello", "--route", "/hello", "--namespace", "quiet"]);
    up.ok(&["deploy", spin.to_str().expect("utf-8"), "--name", "chatty", "--route", "/chatty", "--namespace", "noisy", "--concurrency", "4"]);
    let client = reqwest::Client::new();
    let quiet_url = format!("{}/hello", up.ingress);
    all_answered(&client, &quiet_url, 20).await; // warm up: compiled, instances pooled

    let stop = Arc::new(AtomicBool::new(false));
    let noise: Vec<_> = (0..2)
        .map(|_| {
            let (client, stop) = (client.clone(), stop.clone());
            // 20,000 lines per request: a tight loop of writes.
            let url = format!("{}/chatty?n=1&log=20000", up.ingress);
            tokio::spawn(async move {
                let mut served = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    if client.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
                        served += 1;
                    }
                }
                served
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The quiet service keeps answering, every request, beside the noise.
    all_answered(&client, &quiet_url, 300).await;
    stop.store(true, Ordering::Relaxed);
    let mut lines = 0f64;
    for task in noise {
        let served = task.await.expect("noise task");
        assert!(served > 0, "the noisy guest was served too");
        lines += f64::from(served) * 20_000.0;
    }

    // The drops are counted, and reported in the host's log.
    let metrics = client.get(format!("{}/metrics", up.admin)).send().await.expect("metrics").text().await.expect("body");
    let dropped: f64 = metrics
        .lines()
        .find(|l| l.starts_with(r#"wharf_log_lines_dropped_total{service="noisy/chatty"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no drop counter for noisy/chatty in:\n{metrics}"));
    // At 100 lines/s with a burst of 200, a few seconds let through a few
    // hundred of the tens of thousands written.
    assert!(dropped >= lines * 0.9, "{dropped} of the {lines} lines written were dropped, not most of them");
    up.process.wait_for_line("log lines dropped in the last", Duration::from_secs(10));
    let written = up.process.output().matches("spin: log line").count();
    assert!(written < 5_000, "the host's log got {written} of the noisy lines, not all of them");
}
