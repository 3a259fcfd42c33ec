//! Rollouts across three real hosts over a real nats-server: an update of
//! four replicas under load through two ingresses loses no request, a bad
//! update is rolled back while the old revision serves, and a replica
//! failing on one host is ejected and replaced elsewhere.

use std::path::Path;
use std::time::{Duration, Instant};
use wharf_testkit::cluster::{Host, Scheduler};
use wharf_testkit::load::Load;
use wharf_testkit::nats::NatsServer;
use wharf_testkit::samples;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollouts_across_hosts_lose_no_request_and_outliers_are_replaced() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let wharf = Path::new(WHARF);
    let scheduler = Scheduler::start(wharf, &nats.url(), &dir.path().join("scheduler"), &[]);
    let hosts: Vec<Host> =
        [("host-a", "a"), ("host-b", "b"), ("host-c", "c")].iter().map(|(n, z)| Host::start(wharf, &nats.url(), n, z, dir.path(), &[])).collect();
    let hello = samples::path("hello");
    let hello = hello.to_str().expect("utf-8");

    scheduler.ok(&["deploy", hello, "--name", "web", "--route", "/web", "--replicas", "4", "--readiness", "/healthz", "--env", "GREETING=v1"]);
    let urls = [format!("{}/web", hosts[0].ingress), format!("{}/web", hosts[1].ingress)];
    let load = Load::start(&urls, 6);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let out = scheduler.ok(&["deploy", hello, "--name", "web", "--env", "GREETING=v2"]);
    assert!(out.contains("rolled out"), "{out}");
    // A bad update: its readiness check fails; the old revision keeps serving.
    let (ok, out) = scheduler.wharf(&["deploy", hello, "--name", "web", "--env", "GREETING=v3", "--env", "HEALTH_STATUS=500"]);
    assert!(!ok && out.contains("readiness check GET /healthz"), "{out}");
    let rollout = scheduler.service("web")["status"]["rollout"].clone();
    assert_eq!((rollout["phase"].as_str(), rollout["stable"].as_u64()), (Some("failed"), Some(2)), "{rollout}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tally = load.stop().await;
    assert!(tally.failures.is_empty(), "{}", tally.describe_failures());
    assert!(tally.rate() >= 200.0, "{:.0} requests/s through two ingresses is too light to mean anything", tally.rate());
    assert!(!tally.bodies.contains_key("v3"), "the bad revision never answered: {:?}", tally.bodies);

    // One replica fails every request on host-b (a fault of that host):
    // it is ejected and replaced on another host.
    scheduler.ok(&["deploy", hello, "--name", "flaky", "--route", "/flaky", "--replicas", "3", "--spread", "zone", "--env", "FAIL_ON_HOST=host-b"]);
    let mut placed = scheduler.hosts_of("flaky");
    placed.sort();
    assert_eq!(placed, ["host-a", "host-b", "host-c"]);
    let urls: Vec<String> = hosts.iter().map(|h| format!("{}/flaky", h.ingress)).collect();
    let load = Load::start(&urls, 2);
    let deadline = Instant::now() + Duration::from_secs(30);
    let view = loop {
        let view = scheduler.service("flaky");
        let ejected = view["status"]["ejected"].as_array().is_some_and(|e| e.iter().any(|x| x["host"] == "host-b"));
        let ready: Vec<String> = scheduler.hosts_of("flaky");
        if ejected && ready.len() == 3 && !ready.iter().any(|h| h == "host-b") {
            break view;
        }
        assert!(Instant::now() < deadline, "the failing replica was not ejected and replaced: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let reason = view["status"]["ejected"][0]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("requests failed"), "{reason}");
    let events = scheduler.ok(&["events", "--service", "flaky"]);
    assert!(events.lines().any(|l| l.contains("Ejected") && l.contains("host-b") && l.contains("requests failed")), "the ejection is an event: {events}");
    let before = load.snapshot().failures.len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tally = load.stop().await;
    assert_eq!(tally.failures.len(), before, "after the ejection nothing fails: {}", tally.describe_failures());
    assert!(tally.ok > 0);
}
