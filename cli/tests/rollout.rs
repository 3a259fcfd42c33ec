//! Safe rollouts on `wharf up`, end to end with the real binary: updates
//! under steady load lose no request, bad updates leave the serving
//! revision in place and are rolled back, a missing secret heals once
//! created, undo brings back an earlier revision, and canaries split
//! traffic by hand and by automatic analysis.

use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use wharf_testkit::load::Load;
use wharf_testkit::samples;
use wharf_testkit::wharf::Up;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

fn start(data_dir: &Path) -> Up {
    Up::start(Path::new(WHARF), data_dir, &["--host-id", "solo"])
}

fn path(sample: &str) -> String {
    samples::path(sample).to_str().expect("utf-8").to_string()
}

fn rollout_of(up: &Up, name: &str) -> Value {
    let (ok, text) = up.wharf(&["get", "services", name, "-o", "json"]);
    assert!(ok, "{text}");
    serde_json::from_str::<Value>(&text).expect("json")["status"]["rollout"].clone()
}

/// Waits until `check` holds for the service's rollout, or panics with it.
async fn until(up: &Up, name: &str, what: &str, within: Duration, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let rollout = rollout_of(up, name);
        if check(&rollout) {
            return rollout;
        }
        assert!(Instant::now() < deadline, "{name}: {what} not reached within {within:?}; rollout: {rollout}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deploys and expects the deploy command itself to fail, quickly, naming `reason`.
fn deploy_fails(up: &Up, args: &[&str], reason: &str) -> Duration {
    let started = Instant::now();
    let (ok, text) = up.wharf(args);
    let took = started.elapsed();
    assert!(!ok, "deploy {args:?} should have failed:\n{text}");
    assert!(text.contains("failed") && text.contains(reason), "deploy {args:?} should name {reason:?}:\n{text}");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_update_under_load_loses_no_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = start(dir.path());
    let hello = path("hello");
    up.ok(&["deploy", &hello, "--name", "web", "--route", "/web", "--replicas", "4", "--readiness", "/healthz", "--env", "GREETING=v1"]);
    let load = Load::start(&[format!("{}/web", up.ingress)], 8);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let out = up.ok(&["deploy", &hello, "--name", "web", "--env", "GREETING=v2"]);
    assert!(out.contains("revision 2") && out.contains("rolled out"), "{out}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tally = load.stop().await;
    assert!(tally.failures.is_empty(), "{}", tally.describe_failures());
    assert!(tally.rate() >= 200.0, "the load was too light to mean anything: {:.0} requests/s", tally.rate());
    assert!(tally.bodies.get("v1").copied().unwrap_or(0) > 0 && tally.bodies.get("v2").copied().unwrap_or(0) > 0, "{:?}", tally.bodies);
    let rollout = rollout_of(&up, "web");
    assert_eq!((rollout["phase"].as_str(), rollout["stable"].as_u64()), (Some("complete"), Some(2)), "{rollout}");
    // Deploy kept what the command line did not set: routes, replicas, readiness.
    let view = up.service("web");
    assert_eq!(view["service"]["spec"]["replicas"], 4, "{view}");
    assert_eq!(view["service"]["spec"]["routes"][0]["path_prefix"], "/web");
    assert_eq!(view["service"]["spec"]["health"]["readiness"]["path"], "/healthz");
    // A scale change is not a revision.
    up.ok(&["scale", "web", "2"]);
    assert_eq!(up.service("web")["service"]["revision"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_updates_leave_the_old_revision_serving_and_roll_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = start(dir.path());
    let hello = path("hello");
    up.ok(&["deploy", &hello, "--name", "web", "--route", "/web", "--replicas", "2", "--readiness", "/healthz", "--env", "GREETING=v1"]);
    let load = Load::start(&[format!("{}/web", up.ingress)], 4);

    // The API refuses at write time what it knows is wrong.
    let (ok, text) = up.wharf(&["deploy", &hello, "--name", "web", "--secret", "typo"]);
    assert!(!ok && text.contains("secret typo does not exist"), "{text}");

    // 1. A secret that does not exist yet (--force lets the rollout wait for it).
    let took = deploy_fails(&up, &["deploy", &hello, "--name", "web", "--secret", "typo", "--env", "GREETING=v2", "--force"], "secret typo");
    assert!(took < Duration::from_secs(30), "the failure took {took:?} to report");
    let failed = rollout_of(&up, "web");
    assert_eq!(failed["phase"], "failed", "{failed}");
    assert_eq!((failed["stable"].as_u64(), failed["failed"]["revision"].as_u64()), (Some(1), Some(2)), "{failed}");
    assert_eq!(failed["failed"]["rolled_back"], true);
    // ... and heals by itself once the secret exists.
    up.ok(&["secret", "set", "typo", "now-here"]);
    until(&up, "web", "revision 2 rolled out", Duration::from_secs(90), |r| r["phase"] == "complete" && r["stable"] == 2).await;

    // 2. A readiness path answering 500.
    deploy_fails(&up, &["deploy", &hello, "--name", "web", "--env", "GREETING=v3", "--env", "HEALTH_STATUS=500"], "readiness check GET /healthz");
    let failed = rollout_of(&up, "web");
    assert_eq!((failed["stable"].as_u64(), failed["failed"]["revision"].as_u64()), (Some(2), Some(3)), "{failed}");

    // 3. A component that traps on every request (its readiness check too).
    deploy_fails(&up, &["deploy", &path("panic"), "--name", "web"], "trap");
    let failed = rollout_of(&up, "web");
    assert_eq!((failed["stable"].as_u64(), failed["failed"]["revision"].as_u64()), (Some(2), Some(4)), "{failed}");
    assert_eq!(failed["failed"]["rolled_back"], true);

    tokio::time::sleep(Duration::from_millis(500)).await;
    let tally = load.stop().await;
    assert!(tally.failures.is_empty(), "{}", tally.describe_failures());
    // Only good revisions answered: v1, then v2 once its secret existed.
    let seen: Vec<&String> = tally.bodies.keys().collect();
    assert_eq!(seen, ["v1", "v2"], "{:?}", tally.bodies);
    let status = up.ok(&["rollout", "status", "web", "--no-wait"]);
    assert!(status.contains("failed") && status.contains("rolled back to revision 2"), "{status}");
    let (ok, text) = up.wharf(&["rollout", "status", "web", "--timeout", "2s"]);
    assert!(!ok && text.contains("the rollout of default/web failed"), "rollout status exits non-zero on a failed rollout:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn undo_brings_back_an_earlier_component_and_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = start(dir.path());
    let web = format!("{}/web", up.ingress);
    up.ok(&["deploy", &path("hello"), "--name", "web", "--route", "/web", "--env", "GREETING=one"]);
    up.ok(&["deploy", &path("backend"), "--name", "web"]);
    assert_eq!(get(&format!("{web}/x")).await, (200, "backend ok /web/x\n".to_string()));
    let history = up.ok(&["rollout", "history", "web"]);
    assert!(history.contains("current") && history.lines().count() == 3, "{history}");

    up.ok(&["rollout", "undo", "web"]);
    assert_eq!(get(&web).await, (200, "one\n".to_string()));
    let view = up.service("web");
    assert_eq!(view["service"]["revision"], 1, "undo reuses the revision: {view}");
    assert_eq!(view["service"]["spec"]["env"]["GREETING"], "one");

    up.ok(&["rollout", "undo", "web", "--to", "2"]);
    assert_eq!(get(&format!("{web}/y")).await, (200, "backend ok /web/y\n".to_string()));
    let (ok, text) = up.wharf(&["rollout", "undo", "web", "--to", "9"]);
    assert!(!ok && text.contains("no revision 9"), "{text}");
}

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.expect("answered");
    (response.status().as_u16(), response.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn canaries_split_traffic_and_are_judged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = start(dir.path());
    let hello = path("hello");
    let web = format!("{}/web", up.ingress);
    up.ok(&["deploy", &hello, "--name", "web", "--route", "/web", "--replicas", "2", "--env", "GREETING=v1"]);

    // By hand: 10% to the new revision.
    let out = up.ok(&["deploy", &hello, "--name", "web", "--env", "GREETING=v2", "--canary", "10"]);
    assert!(out.contains("revision 2"), "{out}");
    let rollout = rollout_of(&up, "web");
    assert_eq!(rollout["phase"], "split", "{rollout}");
    let client = reqwest::Client::new();
    let mut v2 = 0;
    for _ in 0..2000 {
        let body = client.get(&web).send().await.expect("answered").text().await.expect("body");
        v2 += usize::from(body.trim() == "v2");
    }
    assert!((140..=260).contains(&v2), "10% ± 3% of 2000 requests should reach the canary, {v2} did");
    // A request can be pinned to a revision.
    let pinned = client.get(&web).header("x-wharf-revision", "1").send().await.expect("answered").text().await.expect("body");
    assert_eq!(pinned.trim(), "v1");
    up.ok(&["rollout", "promote", "web"]);
    assert_eq!(get(&web).await.1.trim(), "v2");
    let rollout = until(&up, "web", "complete", Duration::from_secs(30), |r| r["phase"] == "complete").await;
    assert_eq!(rollout["stable"], 2);

    // Automatically: a canary that fails its requests is aborted...
    let manifest = dir.path().join("canary.yaml");
    let write = |greeting: &str, fail: Option<&str>| {
        let env = match fail {
            Some(status) => format!("{{ GREETING: {greeting}, FAIL_STATUS: \"{status}\" }}"),
            None => format!("{{ GREETING: {greeting} }}"),
        };
        std::fs::write(
            &manifest,
            format!(
                "name: web\ncomponent: {{ file: {hello} }}\nreplicas: 2\nroutes: [{{ path_prefix: /web }}]\nenv: {env}\n\
                 rollout: {{ canary: {{ steps: [20, 50], interval: 2s, min_requests: 10, max_error_rate: 5 }} }}\n"
            ),
        )
        .expect("manifest written");
    };
    let load = Load::start(std::slice::from_ref(&web), 4);
    write("v3", Some("500"));
    let (ok, text) = up.wharf(&["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(!ok && text.contains("error rate"), "a failing canary is aborted on its error rate:\n{text}");
    let failed = rollout_of(&up, "web");
    assert_eq!((failed["phase"].as_str(), failed["stable"].as_u64()), (Some("failed"), Some(2)), "{failed}");
    assert_eq!(failed["failed"]["retrying"], false, "a canary that failed its requests is not retried");
    // ... and a healthy one is promoted step by step.
    write("v4", None);
    let out = up.ok(&["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(out.contains("all rolled out"), "{out}");
    let tally = load.stop().await;
    assert!(tally.bodies.contains_key("v4"), "{:?}", tally.bodies);
    // Only the failing canary's share failed, and only while it was judged.
    let failed_canary: usize = tally.failures.iter().filter(|(_, what)| what.contains("failing with 500")).count();
    assert_eq!(failed_canary, tally.failures.len(), "{}", tally.describe_failures());
    assert_eq!(rollout_of(&up, "web")["stable"], 4);
}
