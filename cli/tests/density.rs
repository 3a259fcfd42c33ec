//! Many services on one host: memory requests (what placement reserves)
//! apart from limits (what an instance may grow to), an overcommit ratio,
//! the peak hosts report, and refusals in human units, on a real `wharf up`.

use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use wharf_proto::ByteSize;
use wharf_testkit::samples;
use wharf_testkit::wharf::Up;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

/// Services deployed with default settings in the first test; with the old
/// reservation (64MiB x 16 = 1GiB per replica) the 2GiB offered held 2 of them.
const SERVICES: usize = 50;

/// The services of the default namespace, by name, from the REST API.
async fn services(client: &reqwest::Client, up: &Up) -> Vec<Value> {
    let response = client.get(format!("{}/v1/namespaces/default/services", up.api)).bearer_auth(&up.token).send().await.expect("answered");
    let body: Value = response.json().await.expect("json");
    body["services"].as_array().cloned().unwrap_or_default()
}

/// Applies one manifest of `hello` services `s<i>` for `names`, each with
/// default settings and the route `/s<i>`.
fn apply_hellos(up: &Up, dir: &Path, names: std::ops::Range<usize>) {
    let hello = samples::path("hello");
    let path = dir.join(format!("many-{}.yaml", names.start));
    let mut manifest = String::from("services:\n");
    for i in names {
        manifest.push_str(&format!("  - name: s{i}\n    component: {{ file: {} }}\n    routes: [{{ path_prefix: /s{i} }}]\n", hello.display()));
    }
    std::fs::write(&path, manifest).expect("write manifest");
    up.ok(&["apply", "--no-wait", "-f", path.to_str().expect("utf-8")]);
}

/// Waits up to `patience` for `count` services, each with its replica ready.
async fn all_ready(client: &reqwest::Client, up: &Up, count: usize, patience: Duration) {
    let started = Instant::now();
    loop {
        let listed = services(client, up).await;
        let ready = listed.iter().filter(|s| s["status"]["ready"] == 1).count();
        if listed.len() == count && ready == count {
            return;
        }
        let errors: Vec<&Value> = listed.iter().map(|s| &s["status"]["last_error"]).filter(|e| e.is_string()).take(3).collect();
        assert!(started.elapsed() < patience, "{ready} of {count} ready after {patience:?}; e.g. {errors:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_default_services_fit_where_caps_fit_two_and_a_request_too_big_is_refused_in_human_units() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 1GiB of memory, overcommitted 2x: requests may add up to 2GiB.
    let up = Up::start(Path::new(WHARF), &dir.path().join("data"), &["--host-id", "solo", "--memory", "1GiB", "--memory-overcommit", "2"]);
    let hello = samples::path("hello");
    apply_hellos(&up, dir.path(), 0..SERVICES);

    // Every one becomes ready.
    let client = reqwest::Client::new();
    all_ready(&client, &up, SERVICES, Duration::from_secs(90)).await;
    // Each answers its first request.
    for i in 0..SERVICES {
        let response = client.get(format!("{}/s{i}", up.ingress)).send().await.expect("answered");
        assert_eq!(response.status(), 200, "s{i}");
        assert_eq!(response.text().await.expect("body"), "Hello from Wharf!\n", "s{i}");
    }

    // Each reserves the default request, not its limit times its concurrency,
    // and the host learns what an instance really used: well under the request.
    let shown = up.service("s0")["status"]["memory"].clone();
    assert_eq!(shown["request"], "8MiB", "{shown}");
    assert_eq!(shown["limit"], "64MiB", "{shown}");
    assert_eq!(shown["concurrency"], 16, "{shown}");
    assert_eq!(up.service("s0")["spec"]["limits"].get("instances_request"), None, "the default request is not written into the spec");
    let started = Instant::now();
    let peak = loop {
        let memory = up.service("s0")["status"]["memory"].clone();
        if let Some(peak) = memory["peak"].as_str() {
            assert_eq!(memory["placed_by"], "8MiB", "a peak under the request leaves the request: {memory}");
            break peak.parse::<ByteSize>().expect("a size");
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no memory peak reported for s0: {memory}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(peak > ByteSize(0) && peak < ByteSize::mib(8), "a hello instance peaked at {peak}, the default request is 8MiB");
    eprintln!("a hello instance's linear memory peaked at {} ({} bytes)", peak.human(), peak.bytes());
    let described = up.ok(&["describe", "service", "s0"]);
    assert!(described.contains("Memory:      request 8MiB per replica, limit 64MiB per instance x 16 at once; peak seen "), "{described}");
    let hosts = up.ok(&["get", "hosts", "-o", "json"]);
    let hosts: Value = serde_json::from_str(&hosts).expect("json");
    assert_eq!(hosts["hosts"][0]["memory_overcommit"], 2.0, "{hosts}");
    let reserved = hosts.to_string();
    assert!(reserved.contains(&format!("\"memory_reserved\":\"{}MiB\"", SERVICES * 8)), "the host reserves 50 x 8MiB: {reserved}");

    // A request over what a replica may use (64MiB x 16) is refused before it is stored.
    let hello = hello.to_str().expect("utf-8");
    let (ok, out) = up.wharf(&["deploy", hello, "--name", "greedy", "--memory-request", "2GiB", "--no-wait"]);
    assert!(!ok && out.contains("limits.memory_request: 2GiB is more than a replica can use: memory x concurrency is 64MiB x 16 = 1GiB"), "{out}");
    // One over what any host offers (1GiB x 2) is refused at deploy.
    let (ok, out) = up.wharf(&["deploy", hello, "--name", "huge", "--memory", "1GiB", "--memory-request", "3GiB", "--no-wait"]);
    assert!(!ok && out.contains("a replica requests 3GiB of memory, more than the largest host offers (2GiB)"), "{out}");
    // One that fits the host's 2GiB but not what the 50 left (2GiB - 400MiB)
    // is stored and stays unplaceable, saying so in human units.
    up.ok(&["deploy", hello, "--name", "big", "--memory", "1GiB", "--memory-request", "1900MiB", "--route", "/big", "--no-wait"]);
    let started = Instant::now();
    loop {
        let status = up.service("big")["status"].clone();
        if let Some(error) = status["last_error"].as_str() {
            assert!(error.contains("insufficient memory on 1 of 1 ready hosts (needs 1.9GiB, most free 1.6GiB)"), "{error}");
            assert_eq!(status["ready"], 0);
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "big was not refused placement: {status}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The others keep serving.
    let response = client.get(format!("{}/s{}", up.ingress, SERVICES - 1)).send().await.expect("answered");
    assert_eq!(response.status(), 200);
}

/// The safety net under overcommitted requests: instances together never
/// hold more than the host's `--memory`. A grow past it, within the
/// instance's own cap, fails that request with a 503 naming the cause; the
/// host keeps serving, and the memory comes back when the instance ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_past_the_hosts_memory_gets_a_503_and_the_host_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Up::start(Path::new(WHARF), &dir.path().join("data"), &["--host-id", "solo", "--memory", "32MiB", "--memory-overcommit", "4"]);
    let hog = samples::path("hog");
    up.ok(&["deploy", hog.to_str().expect("utf-8"), "--name", "hog", "--route", "/hog", "--memory", "64MiB", "--memory-request", "8MiB"]);
    let client = reqwest::Client::new();
    let refused = client.get(format!("{}/hog?mb=40", up.ingress)).send().await.expect("answered");
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers().get("x-wharf-error").and_then(|v| v.to_str().ok()), Some("host_memory_full"));
    let body = refused.text().await.expect("body");
    assert!(body.contains("this host's instances hold all its memory for instances (32MiB)"), "{body}");
    for _ in 0..3 {
        let served = client.get(format!("{}/hog?mb=8", up.ingress)).send().await.expect("answered");
        assert_eq!(served.status(), 200, "memory refused once is given back");
        assert_eq!(served.text().await.expect("body"), "allocated 8 MiB\n");
    }
}

/// What one host may hold resident with 2,000 replicas besides its compiled
/// code: the scheduler, the in-process bus and its state, and per replica
/// its workload, routes, metrics and log buffer (measured: the whole
/// process held about 220MiB with a 64MiB code cache, bench/RESULTS.md).
const OVERHEAD_OF_2000: ByteSize = ByteSize::mib(512);

/// The resident memory of process `pid`.
fn rss(pid: u32) -> ByteSize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process's status");
    let kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).expect("VmRSS");
    ByteSize(kib * 1024)
}

/// 2,000 services with default settings on one `wharf up` (issue 15): each
/// replica reserves its memory request (8MiB) and one instance slot, not
/// its concurrency, so all are placed; each answers its first request; and
/// the host stays within its code cache budget plus a stated overhead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_default_services_each_answer_their_first_request_in_bounded_memory() {
    const MANY: usize = 2000;
    let dir = tempfile::tempdir().expect("tempdir");
    let code_cache = ByteSize::mib(64);
    let cache_flag = code_cache.to_string();
    let up = Up::start(Path::new(WHARF), &dir.path().join("data"), &["--host-id", "solo", "--memory", "16GiB", "--code-cache", &cache_flag]);
    for part in 0..MANY / 500 {
        apply_hellos(&up, dir.path(), part * 500..(part + 1) * 500);
    }
    let client = reqwest::Client::new();
    all_ready(&client, &up, MANY, Duration::from_secs(300)).await;
    for i in 0..MANY {
        let response = client.get(format!("{}/s{i}", up.ingress)).send().await.expect("answered");
        assert_eq!(response.status(), 200, "s{i}");
    }
    let hosts: Value = serde_json::from_str(&up.ok(&["get", "hosts", "-o", "json"])).expect("json");
    let text = hosts.to_string();
    assert!(text.contains(&format!("\"memory_reserved\":\"{}\"", ByteSize::mib(8 * MANY as u64))), "each replica reserves 8MiB: {text}");
    let resident = rss(up.process.id());
    eprintln!("2,000 services: the host holds {} resident ({} per service)", resident.human(), ByteSize(resident.bytes() / MANY as u64).human());
    assert!(
        resident.bytes() < code_cache.bytes() + OVERHEAD_OF_2000.bytes(),
        "the host holds {} resident, over its code cache ({}) plus {}",
        resident.human(),
        code_cache.human(),
        OVERHEAD_OF_2000.human()
    );
}
