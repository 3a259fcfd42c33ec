//! Scaling with demand, to zero and back, on a real `wharf up`.

use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wharf_testkit::wharf::Up;
use wharf_testkit::samples;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

fn up(dir: &Path) -> Up {
    Up::start(Path::new(WHARF), dir, &["--host-id", "solo"])
}

fn status(up: &Up, name: &str) -> Value {
    up.service(name)["status"].clone()
}

/// Waits until `check` holds for the service's status; returns how long it took.
async fn until(up: &Up, name: &str, within: Duration, what: &str, check: impl Fn(&Value) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let status = status(up, name);
        if check(&status) {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{name}: not {what} within {within:?}; status {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asks `url` until it answers 200, for up to 30 s; else fails with `what`
/// and the last answer.
async fn until_served(client: &reqwest::Client, url: &str, what: &str) {
    let started = Instant::now();
    loop {
        let response = client.get(url).send().await.expect("answered");
        if response.status() == 200 {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{what}: {}", response.text().await.unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn manifest(dir: &Path, name: &str, sample: &str, max: u32) -> String {
    let path = dir.join(format!("{name}.yaml"));
    let text = format!(
        "name: {name}\ncomponent: {{ file: {} }}\nroutes: [{{ path_prefix: /{name} }}]\nlimits: {{ concurrency: 50 }}\n\
         autoscale: {{ min: 0, max: {max}, target_concurrency: 1, scale_down_delay: 1s, scale_to_zero_after: 2s, stable_window: 6s }}\n",
        samples::path(sample).display()
    );
    std::fs::write(&path, text).expect("write manifest");
    path.to_str().expect("utf-8").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_from_zero_up_with_load_and_back_to_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = up(&dir.path().join("data"));
    up.ok(&["apply", "--no-wait", "-f", &manifest(dir.path(), "slow", "sleep", 4)]);
    until(&up, "slow", Duration::from_secs(10), "at zero", |s| s["ready"] == 0 && s["desired"] == 0).await;

    // The first request is held while a replica starts, then served.
    let client = reqwest::Client::new();
    let url = format!("{}/slow?ms=10", up.ingress);
    let first = client.get(&url).send().await.expect("answered");
    assert_eq!(first.status(), 200);
    assert_eq!(first.text().await.expect("body"), "slept 10 ms\n");

    // Four clients keeping a 300 ms request in flight each: about four replicas (target 1 in flight each).
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, stop) = (client.clone(), stop.clone());
        let url = format!("{}/slow?ms=300", up.ingress);
        load.push(tokio::spawn(async move {
            let mut failures = 0;
            while !stop.load(Ordering::Relaxed) {
                if !matches!(client.get(&url).send().await, Ok(r) if r.status() == 200) {
                    failures += 1;
                }
            }
            failures
        }));
    }
    let rose = until(&up, "slow", Duration::from_secs(20), "scaled up to 3+", |s| s["ready"].as_u64().unwrap_or(0) >= 3).await;
    println!("scaled up to 3+ ready replicas {rose:.1?} after the load started");
    let top = up.ok(&["top", "--once"]);
    assert!(top.contains("default/slow") && top.contains("load"), "{top}");
    stop.store(true, Ordering::Relaxed);
    for task in load {
        assert_eq!(task.await.expect("load task"), 0, "no request failed under load");
    }
    let metrics = client.get(format!("{}/metrics", up.api)).bearer_auth(&up.token).send().await.expect("answered").text().await.expect("body");
    assert!(metrics.contains(r#"wharf_autoscaler_decisions_total{service="default/slow",direction="up"}"#), "{metrics}");
    // The series name services and their load: no token, no series; a
    // namespace token sees its own namespaces' only, and not the control loop's.
    let anonymous = client.get(format!("{}/metrics", up.api)).send().await.expect("answered");
    assert_eq!(anonymous.status(), 401, "/metrics without a token");
    let shop = up.ok(&["token", "create", "-n", "shop"]).trim().to_string();
    let as_shop = client.get(format!("{}/metrics", up.api)).bearer_auth(&shop).send().await.expect("answered");
    assert_eq!(as_shop.status(), 200);
    let as_shop = as_shop.text().await.expect("body");
    assert!(!as_shop.contains("default/slow") && !as_shop.contains("wharf_controller_"), "a shop token saw default's series: {as_shop}");
    assert!(as_shop.ends_with("# EOF\n"), "{as_shop}");
    // The control loop's cost: passes run, over the one service, with time spent.
    let value = |name: &str| metric(&metrics, name);
    assert!(value("wharf_controller_passes_total ") >= 3.0, "a pass per scale step at least: {metrics}");
    assert_eq!(value("wharf_controller_services "), 1.0, "{metrics}");
    assert!(value(r#"wharf_controller_pass_seconds_total{part="deciding"}"#) > 0.0, "{metrics}");
    assert!(metrics.ends_with("# EOF\n"), "one closing EOF: {metrics}");
    let host_metrics = client.get(format!("{}/metrics", up.admin)).send().await.expect("answered").text().await.expect("body");
    assert!(host_metrics.contains("wharf_cold_starts_total 1"), "one activation replica was started: {host_metrics}");

    // Idle: back down, then to zero after scale_to_zero_after.
    let fell = until(&up, "slow", Duration::from_secs(40), "scaled to zero", |s| s["desired"] == 0 && s["ready"] == 0).await;
    println!("scaled to zero {fell:.1?} after the load stopped");
    let again = client.get(&url).send().await.expect("answered");
    assert_eq!(again.status(), 200, "the next request after zero is served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_200_at_zero_all_succeed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = up(&dir.path().join("data"));
    up.ok(&["apply", "--no-wait", "-f", &manifest(dir.path(), "burst", "hello", 10)]);
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
    let url = format!("{}/burst", up.ingress);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            match client.get(&url).send().await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(e) => (0, e.to_string()),
            }
        });
    }
    let mut failures = Vec::new();
    while let Some(result) = tasks.join_next().await {
        let (status, body) = result.expect("task");
        if status != 200 || body != "Hello from Wharf!\n" {
            failures.push((status, body));
        }
    }
    assert!(failures.is_empty(), "{} of 200 failed, e.g. {:?}", failures.len(), failures.first());
}

/// Activation holds to the host's capacity as placement does: a replica
/// that does not fit is not started, the held request's 503 says why, and
/// other services keep serving; once room is made, the next request wakes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_that_does_not_fit_says_why_and_fits_once_room_is_made() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Up::start(Path::new(WHARF), &dir.path().join("data"), &["--host-id", "solo", "--memory", "256MiB", "--activation-timeout", "3s"]);
    let hello = samples::path("hello");
    let hello = hello.to_str().expect("utf-8");
    // 3 x 64 MiB requested: 192 MiB of 256 reserved.
    up.ok(&["deploy", hello, "--name", "web", "--route", "/web", "--replicas", "3", "--memory", "64MiB", "--memory-request", "64MiB", "--concurrency", "1"]);
    let path = dir.path().join("lazy.yaml");
    std::fs::write(
        &path,
        format!(
            "name: lazy\ncomponent: {{ file: {hello} }}\nroutes: [{{ path_prefix: /lazy }}]\nlimits: {{ memory: 64MiB, memory_request: 128MiB, concurrency: 2 }}\n\
             autoscale: {{ min: 0, max: 1, target_concurrency: 1, scale_to_zero_after: 60s }}\n"
        ),
    )
    .expect("write manifest");
    up.ok(&["apply", "--no-wait", "-f", path.to_str().expect("utf-8")]);
    until(&up, "lazy", Duration::from_secs(10), "at zero", |s| s["ready"] == 0 && s["desired"] == 0).await;

    let client = reqwest::Client::new();
    let refused = client.get(format!("{}/lazy", up.ingress)).send().await.expect("answered");
    assert_eq!(refused.status(), 503);
    let body = refused.text().await.expect("body");
    assert!(body.contains("host solo did not start one: insufficient memory: a replica requests 128MiB, and 192MiB of the host's 256MiB is reserved"), "{body}");
    assert_eq!(client.get(format!("{}/web", up.ingress)).send().await.expect("answered").status(), 200, "the others keep serving");

    up.ok(&["scale", "web", "1"]);
    until_served(&client, &format!("{}/lazy", up.ingress), "lazy never woke once room was made").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_past_a_namespace_quota_is_answered_at_once_naming_the_quota() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A long activation timeout: an answer well inside it was not a timeout.
    let up = Up::start(Path::new(WHARF), &dir.path().join("data"), &["--host-id", "solo", "--activation-timeout", "30s"]);
    let hello = samples::path("hello");
    let hello = hello.to_str().expect("utf-8");
    for name in ["first", "second"] {
        let path = dir.path().join(format!("{name}.yaml"));
        let text = format!(
            "name: {name}\ncomponent: {{ file: {hello} }}\nroutes: [{{ path_prefix: /{name} }}]\n\
             autoscale: {{ min: 0, max: 1, target_concurrency: 1, scale_to_zero_after: 120s }}\n"
        );
        std::fs::write(&path, text).expect("write manifest");
        up.ok(&["apply", "--no-wait", "-f", path.to_str().expect("utf-8")]);
        until(&up, name, Duration::from_secs(10), "at zero", |s| s["ready"] == 0 && s["desired"] == 0).await;
    }
    // Deployed under no quota (each counts its max: 2 replicas); an admin
    // then lowers the namespace's quota to 1 replica, below that.
    up.ok(&["namespace", "set", "default", "--max-replicas", "1"]);

    let client = reqwest::Client::new();
    let woken = client.get(format!("{}/first", up.ingress)).send().await.expect("answered");
    assert_eq!(woken.status(), 200, "the first activation fits in the quota");
    until(&up, "first", Duration::from_secs(10), "scaled to one", |s| s["ready"] == 1).await;

    let asked = Instant::now();
    let refused = client.get(format!("{}/second", up.ingress)).send().await.expect("answered");
    let took = asked.elapsed();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers().get("x-wharf-error").and_then(|v| v.to_str().ok()), Some("quota_exceeded"));
    let body = refused.text().await.expect("body");
    assert!(
        body.contains("service default/second is scaled to zero and cannot start: namespace default is at its quota replicas=1 (1 in use)")
            && body.contains("wharf namespace set default --max-replicas N"),
        "{body}"
    );
    assert!(took < Duration::from_secs(15), "answered after {took:?}: it waited for the 30 s activation timeout instead");
    assert_eq!(client.get(format!("{}/first", up.ingress)).send().await.expect("answered").status(), 200, "the namespace's other service keeps serving");
    // The control plane holds the scale at the quota as well, and says so.
    let held = until(&up, "second", Duration::from_secs(10), "held by the quota", |s| {
        s["autoscale"]["reason"].as_str().is_some_and(|r| r.contains("held at 0: namespace default is at its quota replicas=1"))
    });
    held.await;
    assert_eq!(status(&up, "second")["ready"], 0, "no replica started past the quota");
    let events = up.ok(&["events", "--service", "second"]);
    assert!(events.contains("ScaleHeld") && events.contains("quota replicas=1"), "{events}");

    // Raised, the same request wakes the service.
    up.ok(&["namespace", "set", "default", "--max-replicas", "2"]);
    until_served(&client, &format!("{}/second", up.ingress), "second never woke once the quota was raised").await;
}

/// The host's code-cache loads so far (from memory, disk or a compile).
async fn code_loads(client: &reqwest::Client, up: &Up) -> u64 {
    let text = client.get(format!("{}/metrics", up.admin)).send().await.expect("answered").text().await.expect("body");
    let counter = |name: &str| {
        text.lines().find_map(|line| line.strip_prefix(name).and_then(|rest| rest.trim().parse::<f64>().ok())).unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    (counter("wharf_code_cache_hits_total ") + counter("wharf_code_cache_misses_total ")) as u64
}

/// A wake starts an activation replica, and the replica the control plane
/// then assigns here takes it over: the code is loaded once per wake, not
/// again (on the host, while the first requests are served), and the
/// service keeps answering through the handover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assigned_replica_takes_over_the_activation_replica_and_the_code_is_loaded_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = up(&dir.path().join("data"));
    up.ok(&["apply", "--no-wait", "-f", &manifest(dir.path(), "nap", "sleep", 1)]);
    until(&up, "nap", Duration::from_secs(10), "at zero", |s| s["ready"] == 0 && s["desired"] == 0).await;
    let client = reqwest::Client::new();
    // Compiled ahead when the service arrived; loads settle once that is done.
    let mut before = code_loads(&client, &up).await;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = code_loads(&client, &up).await;
        if now == before {
            break;
        }
        before = now;
    }

    let url = format!("{}/nap?ms=1", up.ingress);
    let first = client.get(&url).send().await.expect("answered");
    assert_eq!(first.status(), 200, "the wake is served");
    until(&up, "nap", Duration::from_secs(20), "placed and ready", |s| s["ready"] == 1).await;
    // The activation replica is dropped once the assigned one is ready; requests go on.
    for _ in 0..20 {
        let response = client.get(&url).send().await.expect("answered");
        assert_eq!(response.status(), 200, "served through the handover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = code_loads(&client, &up).await;
    assert_eq!(after - before, 1, "one load for the wake and the assigned replica together, not one each");
    let host_metrics = client.get(format!("{}/metrics", up.admin)).send().await.expect("answered").text().await.expect("body");
    assert!(host_metrics.contains("wharf_cold_starts_total 1"), "one activation replica: {host_metrics}");
}

/// The controller's passes so far, from the scheduler's `/metrics`.
async fn passes(client: &reqwest::Client, up: &Up) -> u64 {
    let metrics = client.get(format!("{}/metrics", up.api)).bearer_auth(&up.token).send().await.expect("answered").text().await.expect("body");
    metric(&metrics, "wharf_controller_passes_total ") as u64
}

/// The value of the first sample in `metrics` whose line starts with `name`.
fn metric(metrics: &str, name: &str) -> f64 {
    let line = metrics.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in {metrics}"));
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("unreadable: {line}"))
}

/// The autoscaler samples load every 500 ms, but with nothing changing no
/// pass runs (each pass goes over every service); a wake runs passes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscaled_services_at_rest_cost_no_passes_and_a_wake_still_scales() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = up(&dir.path().join("data"));
    for name in ["quiet-a", "quiet-b", "quiet-c"] {
        up.ok(&["apply", "--no-wait", "-f", &manifest(dir.path(), name, "hello", 2)]);
    }
    for name in ["quiet-a", "quiet-b", "quiet-c"] {
        until(&up, name, Duration::from_secs(10), "at zero", |s| s["ready"] == 0 && s["desired"] == 0).await;
    }
    let client = reqwest::Client::new();
    // Settled: the passes the deploys set off (and the statuses they wrote) are over.
    let mut before = passes(&client, &up).await;
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = passes(&client, &up).await;
        if now == before {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "passes never stopped: {before} then {now}");
        before = now;
    }
    // Six autoscale ticks at least, and not one pass.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(passes(&client, &up).await, before, "passes ran while nothing changed");

    // A wake still scales the service up: the announcement runs a pass.
    let answer = client.get(format!("{}/quiet-b", up.ingress)).send().await.expect("answered");
    assert_eq!(answer.status(), 200);
    until(&up, "quiet-b", Duration::from_secs(10), "scaled up by its wake", |s| s["desired"] == 1).await;
    // (The pass is counted once its writes are done, just after the status.)
    let counted = Instant::now();
    while passes(&client, &up).await == before {
        assert!(counted.elapsed() < Duration::from_secs(5), "the wake's pass was never counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
