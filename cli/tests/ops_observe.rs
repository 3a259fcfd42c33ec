//! What operators look at, on three real hosts over a real nats-server:
//! `wharf logs` merges every replica's lines from every host (`-f` within a
//! second of their being written), `wharf describe service` shows a
//! replica's failures, retries and move with their reasons, and a token for
//! one namespace reads neither the logs nor the events of another.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use wharf_testkit::cluster::{Host, Scheduler};
use wharf_testkit::nats::NatsServer;
use wharf_testkit::process::Process;
use wharf_testkit::samples;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

/// Waits until `name` has a ready replica on each of `hosts`.
async fn wait_spread(scheduler: &Scheduler, name: &str, hosts: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut placed = scheduler.hosts_of(name);
        placed.sort();
        if placed == hosts {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is not ready on {hosts:?}: {}", scheduler.service(name));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_from_three_hosts_describe_shows_failures_and_moves_and_tokens_stay_in_their_namespace() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let wharf = Path::new(WHARF);
    let scheduler = Scheduler::start(wharf, &nats.url(), &dir.path().join("scheduler"), &[]);
    let names = ["host-a", "host-b", "host-c"];
    let hosts: Vec<Host> = names.iter().zip(["a", "b", "c"]).map(|(n, z)| Host::start(wharf, &nats.url(), n, z, dir.path(), &["--admin-listen", "127.0.0.1:0"])).collect();
    let hello = samples::path("hello");
    let hello = hello.to_str().expect("utf-8");
    scheduler.ok(&["deploy", hello, "--name", "web", "--route", "/web", "--replicas", "3", "--spread", "zone"]);
    wait_spread(&scheduler, "web", &names).await;
    let client = reqwest::Client::new();

    // History: one line written on each host, merged by `wharf logs`.
    for host in &hosts {
        let response = client.get(format!("{}/web/before-{}", host.ingress, host.name)).send().await.expect("answered");
        assert_eq!(response.status(), 200);
    }
    let text = scheduler.ok(&["logs", "web"]);
    for host in &names {
        assert!(text.lines().any(|l| l.starts_with(&format!("[{host} r")) && l.contains(&format!("served /web/before-{host}"))), "{host}'s line, tagged:\n{text}");
    }
    let json = scheduler.ok(&["logs", "web", "--tail", "1", "--host", "host-b", "-o", "json"]);
    let record: serde_json::Value = serde_json::from_str(json.trim()).expect("one JSON line");
    assert_eq!((record["host"].as_str(), record["revision"].as_u64()), (Some("host-b"), Some(1)), "{json}");
    assert!(record["line"].as_str().is_some_and(|l| l.contains("before-host-b")), "{json}");
    let (ok, text) = scheduler.wharf(&["logs", "web", "--host", "host-z"]);
    assert!(!ok && text.contains("host host-z runs no replica of default/web"), "{text}");
    let (ok, text) = scheduler.wharf(&["logs", "nothing"]);
    assert!(!ok && text.contains("service default/nothing not found"), "{text}");
    let (ok, text) = scheduler.wharf(&["logs", "web", "--since", "ten minutes"]);
    assert!(!ok && text.contains("--since"), "a bad duration is refused naming the flag: {text}");

    // Follow: the history first, then each new line within a second of its request.
    let mut follower =
        Process::spawn_with(Command::new(WHARF).args(["logs", "web", "-f"]).env("WHARF_API", &scheduler.api).env("WHARF_TOKEN", &scheduler.token));
    for host in &names {
        follower.wait_for_line(&format!("served /web/before-{host}"), Duration::from_secs(10));
    }
    for host in &hosts {
        let sent = Instant::now();
        let response = client.get(format!("{}/web/live-{}", host.ingress, host.name)).send().await.expect("answered");
        assert_eq!(response.status(), 200);
        let line = follower.wait_for_line(&format!("served /web/live-{}", host.name), Duration::from_secs(1));
        let took = sent.elapsed();
        assert!(line.starts_with(&format!("[{} r", host.name)) && line.contains("rev1]"), "tagged with host, replica and revision: {line}");
        assert!(took < Duration::from_secs(1), "{}'s line took {took:?}", host.name);
        eprintln!("{}: line shown {took:?} after the request was sent", host.name);
    }
    follower.kill();

    // A token for namespace shop reads neither the logs nor the events of default.
    let shop = scheduler.ok(&["token", "create", "-n", "shop"]).trim().to_string();
    let as_shop = |args: &[&str]| {
        let output = Command::new(WHARF).args(args).env("WHARF_API", &scheduler.api).env("WHARF_TOKEN", &shop).output().expect("runs");
        (output.status.success(), format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)))
    };
    for args in [&["logs", "web"][..], &["logs", "web", "-f"], &["events"], &["events", "-f"], &["describe", "service", "web"]] {
        let (ok, text) = as_shop(args);
        assert!(!ok && text.contains("may act only in namespace(s) shop, not default"), "{args:?}: {text}");
        assert!(!text.contains("served /web"), "{args:?} showed default's lines: {text}");
    }
    let (ok, text) = as_shop(&["events", "-n", "shop"]);
    assert!(ok, "its own namespace's events: {text}");
    for path in ["/v1/namespaces/default/services/web/logs?follow=true", "/v1/namespaces/default/events"] {
        let response = client.get(format!("{}{path}", scheduler.api)).bearer_auth(&shop).send().await.expect("answered");
        assert_eq!(response.status(), 403, "{path}");
    }

    // A replica that fails its readiness check on host-b: failed, retried
    // with backoff, then moved; describe says so, with the reasons.
    scheduler.ok(&["deploy", hello, "--name", "flaky", "--route", "/flaky", "--replicas", "3", "--spread", "zone", "--readiness", "/ready", "--env", "FAIL_ON_HOST=host-b", "--no-wait"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let described = loop {
        let text = scheduler.ok(&["describe", "service", "flaky"]);
        let moved = text.lines().any(|l| l.contains("Moving") && l.contains("host-b"));
        let placed_elsewhere = text.lines().filter(|l| l.contains("Placed")).count() >= 4;
        if moved && placed_elsewhere {
            break text;
        }
        assert!(Instant::now() < deadline, "no move of the failing replica within 60 s:\n{text}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let event = |reason: &str| described.lines().find(|l| l.contains(reason)).unwrap_or_else(|| panic!("no {reason} event:\n{described}")).to_string();
    let failed = event("Failed");
    assert!(failed.contains("host-b") && failed.contains("readiness check GET /ready failed") && failed.contains("retry in"), "{failed}");
    assert!(event("Retrying").contains("host-b"), "{described}");
    assert!(event("Moving").contains("failed 3 times on host host-b"), "{described}");
    assert!(described.contains("Service:     default/flaky") && described.contains("Revisions:") && described.contains("Replicas:"), "{described}");
    // The same events on the API, for this service only.
    let events: serde_json::Value = client
        .get(format!("{}/v1/namespaces/default/events?service=flaky", scheduler.api))
        .bearer_auth(&scheduler.token)
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    let events = events["events"].as_array().cloned().unwrap_or_default();
    assert!(events.iter().all(|e| e["service"] == "default/flaky"), "{events:?}");
    assert!(events.iter().any(|e| e["reason"] == "Moving" && e["host"] == "host-b" && e["replica"].is_u64()), "{events:?}");
    let (ok, text) = scheduler.wharf(&["events", "--limit", "2"]);
    assert!(ok && text.lines().count() == 3, "a header and the newest two: {text}");
}
