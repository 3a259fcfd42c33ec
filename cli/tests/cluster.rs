//! A real cluster: a real nats-server, one `wharf scheduler` and three
//! `wharf host` processes in three zones, all on loopback.

use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use wharf_testkit::nats::NatsServer;
use wharf_testkit::process::Process;
use wharf_testkit::samples;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

fn url_in(line: &str) -> String {
    line.split_whitespace().find(|w| w.starts_with("http://")).expect("a URL").to_string()
}

/// The control plane's API and its admin token.
struct Api {
    url: String,
    token: String,
}

fn scheduler(nats: &str, dir: &Path) -> (Process, Api) {
    let mut p = Process::spawn(WHARF, &["scheduler", "--nats", nats, "--api", "127.0.0.1:0", "--data-dir", dir.to_str().expect("utf-8")]);
    let line = p.wait_for_line("Wharf scheduler: API", Duration::from_secs(60));
    let token = std::fs::read_to_string(dir.join("admin-token")).expect("admin token written on start").trim().to_string();
    (p, Api { url: url_in(&line), token })
}

struct Host {
    process: Process,
    name: String,
    ingress: String,
}

fn host(nats: &str, name: &str, zone: &str, dir: &Path) -> Host {
    host_with(nats, name, zone, dir, &[])
}

/// `host` with more flags.
fn host_with(nats: &str, name: &str, zone: &str, dir: &Path, more: &[&str]) -> Host {
    let dir = dir.join(name);
    let zone = format!("zone={zone}");
    let mut args = vec!["host", "--nats", nats, "--name", name, "--labels", &zone, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--data-dir", dir.to_str().expect("utf-8")];
    args.extend(more);
    let mut process = Process::spawn(WHARF, &args);
    let line = process.wait_for_line("ingress http://", Duration::from_secs(60));
    Host { process, name: name.to_string(), ingress: url_in(&line) }
}

fn wharf(api: &Api, args: &[&str]) -> String {
    let output = Command::new(WHARF).args(args).env("WHARF_API", &api.url).env("WHARF_TOKEN", &api.token).output().expect("wharf runs");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "wharf {args:?} failed:\n{text}");
    text
}

fn service(api: &Api, name: &str) -> Value {
    serde_json::from_str(&wharf(api, &["get", "services", name, "-o", "json"])).expect("json")
}

/// Hosts running a ready replica of `name`.
fn hosts_of(api: &Api, name: &str) -> Vec<String> {
    let view = service(api, name);
    view["status"]["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["state"] == "ready")
        .filter_map(|r| r["host"].as_str().map(str::to_string))
        .collect()
}

async fn get(url: &str) -> Result<(u16, String), String> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().map_err(|e| e.to_string())?;
    let response = client.get(url).send().await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    Ok((status, response.text().await.map_err(|e| e.to_string())?))
}

/// Polls until `url` answers 200 with `body`; returns how long that took.
async fn until_ok(url: &str, body: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let got = get(url).await;
        if matches!(&got, Ok((200, b)) if b.contains(body)) {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{url}: no 200 with {body:?} within {within:?}; last {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sample(name: &str) -> String {
    samples::path(name).to_str().expect("utf-8").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_zones_spread_route_fail_over_and_survive_restarts() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut sched, api) = scheduler(&url, &dir.path().join("scheduler"));
    let mut hosts: Vec<Host> = [("host-a", "a"), ("host-b", "b"), ("host-c", "c")].iter().map(|(n, z)| host(&url, n, z, dir.path())).collect();

    // Three replicas, spread over the zone label: one per zone.
    wharf(&api, &["deploy", &sample("hello"), "--name", "web", "--route", "/web", "--replicas", "3", "--spread", "zone"]);
    let mut placed = hosts_of(&api, "web");
    placed.sort();
    assert_eq!(placed, vec!["host-a", "host-b", "host-c"]);
    for h in &hosts {
        until_ok(&format!("{}/web", h.ingress), "Hello from Wharf!", Duration::from_secs(10)).await;
    }

    // frontend -> backend through the ingress of a host that runs neither.
    wharf(&api, &["deploy", &sample("backend"), "--name", "backend"]);
    wharf(&api, &["deploy", &sample("frontend"), "--name", "frontend", "--route", "/frontend"]);
    let backend_host = hosts_of(&api, "backend").pop().expect("backend placed");
    let frontend_host = hosts_of(&api, "frontend").pop().expect("frontend placed");
    let bystander = hosts.iter().find(|h| h.name != backend_host && h.name != frontend_host).expect("a host running neither");
    let (status, body) = get(&format!("{}/frontend/x", bystander.ingress)).await.expect("answered");
    assert_eq!((status, body.as_str()), (200, "frontend got: backend ok /frontend/x\n"), "via {}", bystander.name);

    // kill -9 the host running backend: a replacement comes up elsewhere.
    let victim = hosts.iter().position(|h| h.name == backend_host).expect("victim");
    let mut killed = hosts.remove(victim);
    let started = Instant::now();
    killed.process.kill();
    let survivor = hosts[0].ingress.clone();
    let recovered = until_ok(&format!("{survivor}/frontend/y"), "backend ok /frontend/y", Duration::from_secs(20)).await;
    println!("failover: host {} killed -> backend answering again after {:.2?}", killed.name, started.elapsed().max(recovered));
    // The status follows the new host's next heartbeat.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut moved = hosts_of(&api, "backend");
    while moved.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        moved = hosts_of(&api, "backend");
    }
    assert!(!moved.is_empty() && !moved.contains(&killed.name), "backend moved off {}: {moved:?}", killed.name);

    // kill -9 the scheduler under steady load: no request fails; the new one knows every service.
    let failures = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let (failures, served, stop) = (failures.clone(), served.clone(), stop.clone());
        let target = format!("{}/web", hosts[1].ingress);
        async move {
            while !stop.load(Ordering::Relaxed) {
                match get(&target).await {
                    Ok((200, _)) => served.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed request during scheduler restart: {other:?}");
                        failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    sched.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (restarted, api) = scheduler(&url, &dir.path().join("scheduler"));
    sched = restarted;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("load task");
    assert_eq!(failures.load(Ordering::Relaxed), 0, "requests failed while the scheduler was down");
    assert!(served.load(Ordering::Relaxed) > 10, "the load ran");
    let listed = wharf(&api, &["get", "services"]);
    for name in ["default/web", "default/backend", "default/frontend"] {
        assert!(listed.contains(name), "{name} missing after the scheduler restart:\n{listed}");
    }

    // Restart nats-server: service resumes without restarting any wharf process.
    nats.restart();
    until_ok(&format!("{}/web", hosts[0].ingress), "Hello from Wharf!", Duration::from_secs(20)).await;
    until_ok(&format!("{}/frontend/z", hosts[1].ingress), "backend ok /frontend/z", Duration::from_secs(20)).await;
    // The control plane works again too: a new deploy lands.
    wharf(&api, &["deploy", &sample("echo"), "--name", "echo", "--route", "/echo"]);
    until_ok(&format!("{}/echo", hosts[0].ingress), "\"path\": \"/echo\"", Duration::from_secs(20)).await;

    // A body larger than NATS' max payload crosses the bus as a stream,
    // and so does the answer that echoes it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut echo_on = hosts_of(&api, "echo");
    while echo_on.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        echo_on = hosts_of(&api, "echo");
    }
    let elsewhere = hosts.iter().find(|h| !echo_on.contains(&h.name)).expect("a host without echo");
    let big = reqwest::Client::new().post(format!("{}/echo", elsewhere.ingress)).body(vec![b'x'; 2 << 20]).send().await.expect("answered");
    assert_eq!(big.status(), 200);
    let json: Value = big.json().await.expect("json");
    assert_eq!(json["body_len"], 2 << 20);
    assert_eq!(json["body"].as_str().map(|b| b.bytes().all(|c| c == b'x')), Some(true), "the echo came back whole");
    assert!(json["headers"].get("x-wharf-stream").is_none(), "the stream header stays between the hosts: {}", json["headers"]);
    let small = reqwest::Client::new().post(format!("{}/echo", elsewhere.ingress)).body(vec![b'y'; 100 << 10]).send().await.expect("answered");
    assert_eq!(small.status(), 200, "a 100 KiB body crosses the bus whole");
    let json: Value = small.json().await.expect("json");
    assert_eq!(json["body_len"], 100 << 10);

    // SIGTERM drains a host: it exits cleanly and its replicas move.
    let mut leaving = hosts.remove(0);
    let status = leaving.process.terminate(Duration::from_secs(20));
    assert!(status.success(), "clean exit: {status}\n{}", leaving.process.output());
    assert!(leaving.process.output().contains("draining"), "{}", leaving.process.output());
    until_ok(&format!("{}/web", hosts[0].ingress), "Hello from Wharf!", Duration::from_secs(10)).await;
    drop(sched);
}

/// A GET in flight to a host that is killed is sent again to another
/// replica as soon as the control plane says the host is lost, instead of
/// waiting out its 30 s deadline (only safe methods are: `remote::is_safe`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_in_flight_on_a_killed_host_is_answered_by_another_replica() {
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_sched, api) = scheduler(&url, &dir.path().join("scheduler"));
    let mut hosts: Vec<Host> = [("host-a", "a"), ("host-b", "b"), ("host-c", "c")].iter().map(|(n, z)| host(&url, n, z, dir.path())).collect();
    wharf(&api, &["deploy", &sample("sleep"), "--name", "slow", "--route", "/slow", "--replicas", "2", "--spread", "zone", "--timeout", "30s"]);
    let started = Instant::now();
    let placed = loop {
        let placed = hosts_of(&api, "slow");
        if placed.len() == 2 {
            break placed;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "slow never had two ready replicas: {placed:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let bystander = hosts.iter().find(|h| !placed.contains(&h.name)).expect("a host running no replica").ingress.clone();
    until_ok(&format!("{bystander}/slow?ms=1"), "slept 1 ms", Duration::from_secs(10)).await;

    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
    let get = tokio::spawn({
        let (client, url) = (client.clone(), format!("{bystander}/slow?ms=4000"));
        async move {
            let response = client.get(url).send().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((response.status().as_u16(), response.text().await.map_err(|e| e.to_string())?))
        }
    });
    // The host serving it reports it in flight.
    let victim = loop {
        let listed: Value = serde_json::from_str(&wharf(&api, &["get", "hosts", "-o", "json"])).expect("json");
        let busy = listed["hosts"].as_array().into_iter().flatten().find(|h| {
            h["replicas"].as_array().into_iter().flatten().any(|r| r["service"] == "default/slow" && r["in_flight"].as_u64() > Some(0))
        });
        if let Some(busy) = busy {
            break busy["id"].as_str().expect("id").to_string();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no host reported the request in flight: {listed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let index = hosts.iter().position(|h| h.name == victim).expect("victim is ours");
    let killed = Instant::now();
    hosts[index].process.kill();
    let (status, body) = get.await.expect("joined").expect("answered");
    let took = killed.elapsed();
    println!("GET in flight on killed {victim}: answered {status} after {took:.2?}");
    assert_eq!((status, body.as_str()), (200, "slept 4000 ms\n"));
    assert!(took < Duration::from_secs(15), "the GET waited {took:?}: it was not sent again when {victim} was lost (deadline 30 s)");
}

/// Sends `signal` (e.g. `STOP`, `CONT`) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// The hosts the service's status (what hosts route by) says have a ready replica of it, sorted.
async fn ready_in_status(statuses: &wharf_bus::Kv, key: &str) -> Vec<String> {
    let entry = statuses.get(key).await.expect("the status bucket reads");
    let status: Option<wharf_proto::ServiceStatus> = entry.map(|e| serde_json::from_slice(&e.value).expect("a status"));
    let mut ready: Vec<String> = status.iter().flat_map(|s| s.placed.iter()).filter(|p| p.ready).map(|p| p.host.to_string()).collect();
    ready.sort();
    ready
}

/// Issue 17: a host sends a request to a host its directory says has a
/// ready replica, on that host's own subject. When the host it chose has
/// none any more and nobody has told the sender (here the chosen host is
/// killed while the control plane is frozen, so no status and no lost-host
/// announcement follow), the request goes to another ready host and is
/// served; when none is left, a clear 503 comes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_host_lost_its_replica_goes_to_another_ready_host_or_gets_a_clear_503() {
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let (sched, api) = scheduler(&url, &dir.path().join("scheduler"));
    // host-a runs nothing of the service; host-b and host-c one replica each.
    let edge = host_with(&url, "host-a", "a", dir.path(), &["--log", "info,wharf_host::agent::routing=debug"]);
    let mut b = host(&url, "host-b", "b", dir.path());
    let mut c = host(&url, "host-c", "b", dir.path());
    wharf(&api, &["deploy", &sample("hello"), "--name", "web", "--route", "/web", "--replicas", "2", "--on", "zone=b"]);
    let bus = wharf_bus::Bus::connect_nats(&url, wharf_bus::NatsOptions::default()).await.expect("connects");
    let statuses = bus.kv(wharf_proto::names::STATUS_BUCKET).await.expect("the status bucket");
    let started = Instant::now();
    loop {
        let ready = ready_in_status(&statuses, "default.web").await;
        if ready == ["host-b", "host-c"] {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "web never ready on host-b and host-c in its status: {ready:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let web = format!("{}/web", edge.ingress);
    until_ok(&web, "Hello from Wharf!", Duration::from_secs(10)).await;
    // host-a follows the status by a watch: give it time to see both hosts.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Frozen, the control plane writes no status and announces no lost host.
    signal(sched.id(), "STOP");
    b.process.kill();
    // The server has dropped host-b's subscriptions once nobody answers there.
    let gone = wharf_proto::names::host_request_subject(&wharf_proto::HostId::new("host-b").expect("valid"), "default", "web", 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(bus.request(&gone, bytes::Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"), Duration::from_secs(1)).await, Err(wharf_bus::RequestError::NoResponders { .. })) {
        assert!(Instant::now() < deadline, "host-b's subscription outlived it");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // host-a still believes host-b serves, and takes the hosts in turn:
    // each request host-b gets first is sent on to host-c.
    for i in 0..10 {
        let got = get(&web).await;
        assert_eq!(got, Ok((200, "Hello from Wharf!\n".to_string())), "request {i} after host-b went away");
    }
    let log = edge.process.output();
    assert!(log.lines().any(|l| l.contains("trying another host") && l.contains("host=host-b")), "host-a never found host-b gone:\n{log}");

    // With host-c gone too, nothing is ready: a clear 503, not a wait.
    c.process.kill();
    let gone = wharf_proto::names::host_request_subject(&wharf_proto::HostId::new("host-c").expect("valid"), "default", "web", 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(bus.request(&gone, bytes::Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"), Duration::from_secs(1)).await, Err(wharf_bus::RequestError::NoResponders { .. })) {
        assert!(Instant::now() < deadline, "host-c's subscription outlived it");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = get(&web).await.expect("answered");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("service default/web has no ready replica on any host"), "{body}");
    signal(sched.id(), "CONT");
    drop(edge);
}

/// Idle hosts send only "alive, nothing changed" between full reports; a
/// scheduler started after them asks each for its full report, and places
/// on them at once rather than after the periodic full one (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_started_after_the_hosts_asks_them_for_full_reports() {
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts: Vec<Host> = [("host-a", "a"), ("host-b", "b")].iter().map(|(n, z)| host(&url, n, z, dir.path())).collect();
    // Long enough for several heartbeats with nothing new in them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    let (_sched, api) = scheduler(&url, &dir.path().join("scheduler"));
    let listed: Value = serde_json::from_str(&wharf(&api, &["get", "hosts", "-o", "json"])).expect("json");
    let ready = |listed: &Value| listed["hosts"].as_array().into_iter().flatten().filter(|h| h["ready"] == true).count();
    let mut listed = listed;
    while ready(&listed) < 2 {
        assert!(started.elapsed() < Duration::from_secs(15), "the new scheduler never learned both hosts: {listed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        listed = serde_json::from_str(&wharf(&api, &["get", "hosts", "-o", "json"])).expect("json");
    }
    wharf(&api, &["deploy", &sample("hello"), "--name", "web", "--route", "/web", "--replicas", "2", "--spread", "zone"]);
    let mut placed = hosts_of(&api, "web");
    placed.sort();
    assert_eq!(placed, vec!["host-a", "host-b"]);
    for h in &hosts {
        until_ok(&format!("{}/web", h.ingress), "Hello from Wharf!", Duration::from_secs(10)).await;
    }
    println!("hosts learned and placed on {:.2?} after the scheduler started", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_from_zero_and_back_across_hosts() {
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_sched, api) = scheduler(&url, &dir.path().join("scheduler"));
    let hosts: Vec<Host> = [("host-a", "a"), ("host-b", "b"), ("host-c", "c")].iter().map(|(n, z)| host(&url, n, z, dir.path())).collect();
    let manifest = dir.path().join("auto.yaml");
    std::fs::write(
        &manifest,
        format!(
            "services:\n  - name: auto\n    component: {{ file: {} }}\n    routes: [{{ path_prefix: /auto }}]\n    limits: {{ concurrency: 64 }}\n    \
             autoscale: {{ min: 0, max: 6, target_concurrency: 1, scale_down_delay: 1s, scale_to_zero_after: 2s, stable_window: 6s }}\n",
            sample("sleep")
        ),
    )
    .expect("write");
    wharf(&api, &["apply", "--no-wait", "-f", manifest.to_str().expect("utf-8")]);
    let at_zero = |s: &Value| s["status"]["ready"] == 0 && s["status"]["desired"] == 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !at_zero(&service(&api, "auto")) {
        assert!(Instant::now() < deadline, "never at zero: {}", service(&api, "auto"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A burst of 200 at zero through one host's ingress: all served.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client");
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..200 {
        let (client, url) = (client.clone(), format!("{}/auto?ms=20", hosts[i % 3].ingress));
        burst.spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0) });
    }
    let mut failed = 0;
    while let Some(status) = burst.join_next().await {
        if status.expect("task") != 200 {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "requests of the burst at zero failed");

    // Load from every host's ingress: replicas rise and spread over hosts.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..6 {
        let (client, stop) = (client.clone(), stop.clone());
        let url = format!("{}/auto?ms=300", hosts[i % 3].ingress);
        load.push(tokio::spawn(async move {
            let mut failures = 0u32;
            while !stop.load(Ordering::Relaxed) {
                if !matches!(client.get(&url).send().await, Ok(r) if r.status() == 200) {
                    failures += 1;
                }
            }
            failures
        }));
    }
    let started = Instant::now();
    loop {
        let view = service(&api, "auto");
        let on: std::collections::BTreeSet<String> =
            view["status"]["replicas"].as_array().into_iter().flatten().filter(|r| r["state"] == "ready").filter_map(|r| r["host"].as_str().map(str::to_string)).collect();
        if view["status"]["ready"].as_u64().unwrap_or(0) >= 4 && on.len() >= 2 {
            println!("scaled to {} ready replicas on {} hosts after {:.1?}", view["status"]["ready"], on.len(), started.elapsed());
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "did not scale up across hosts: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        assert_eq!(task.await.expect("load"), 0, "no request failed under load");
    }
    let started = Instant::now();
    while !at_zero(&service(&api, "auto")) {
        assert!(started.elapsed() < Duration::from_secs(40), "never back to zero: {}", service(&api, "auto"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = get(&format!("{}/auto?ms=5", hosts[2].ingress)).await.expect("answered");
    assert_eq!((status, body.as_str()), (200, "slept 5 ms\n"), "served again from zero");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_over_three_hosts_counts_exactly_and_survives_failures() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_sched, api) = scheduler(&url, &dir.path().join("scheduler"));
    let mut hosts: Vec<Host> = [("host-a", "a"), ("host-b", "b"), ("host-c", "c")].iter().map(|(n, z)| host(&url, n, z, dir.path())).collect();
    wharf(&api, &["deploy", &sample("counter"), "--name", "counter", "--route", "/", "--replicas", "3", "--spread", "zone", "--keyvalue", "counter"]);

    // 1,000 increments spread over the three hosts' ingresses, 30 at a time.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client");
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..30usize {
        let client = client.clone();
        let ingresses: Vec<String> = hosts.iter().map(|h| h.ingress.clone()).collect();
        tasks.spawn(async move {
            let mut failures = Vec::new();
            for i in (worker..1000).step_by(30) {
                match client.get(format!("{}/hit", ingresses[i % 3])).send().await {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => failures.push(format!("{} {}", r.status(), r.text().await.unwrap_or_default())),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            failures
        });
    }
    let mut failures = Vec::new();
    while let Some(result) = tasks.join_next().await {
        failures.extend(result.expect("task"));
    }
    assert!(failures.is_empty(), "{} increments failed, e.g. {:?}", failures.len(), failures.first());
    assert_eq!(get(&format!("{}/get?key=hits", hosts[0].ingress)).await.expect("answered"), (200, "1000".to_string()));

    // kill -9 a host serving counter: the count goes on from the others.
    let mut killed = hosts.remove(0);
    killed.process.kill();
    until_ok(&format!("{}/hit", hosts[0].ingress), "1001", Duration::from_secs(10)).await;

    // Restart nats-server: the data is still there.
    nats.restart();
    until_ok(&format!("{}/get?key=hits", hosts[1].ingress), "1001", Duration::from_secs(20)).await;
    until_ok(&format!("{}/hit", hosts[1].ingress), "1002", Duration::from_secs(20)).await;

    // A service with a volume is pinned to its host: when that host is gone
    // it waits, pending with the reason, rather than start empty elsewhere.
    wharf(&api, &["deploy", &sample("notes"), "--name", "notes", "--route", "/notes", "--volume", "data"]);
    // The pin follows the first ready replica; give the controller a pass to record it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pinned = hosts_of(&api, "notes").pop().expect("notes placed");
    let index = hosts.iter().position(|h| h.name == pinned).expect("pinned host alive");
    let saved = reqwest::Client::new().put(format!("{}/notes/plan", hosts[index].ingress)).body("v1").send().await.expect("answered");
    assert_eq!(saved.status(), 200);
    let mut gone = hosts.remove(index);
    gone.process.kill();
    let started = Instant::now();
    loop {
        let view = service(&api, "notes");
        let replicas = view["status"]["replicas"].as_array().cloned().unwrap_or_default();
        let waiting = replicas.iter().any(|r| r["state"] == "unplaceable" && r["error"].as_str().is_some_and(|e| e.contains(&format!("volumes are on host {pinned}"))));
        if waiting {
            assert_eq!(view["status"]["ready"], 0, "not started elsewhere: {view}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "notes never shown waiting for its volume: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The shipped NATS configuration with an identity per host and mutual
/// TLS ([`wharf_testkit::nats::shipped`]).
fn shipped_nats(dir: &Path, hosts: &[&str]) -> NatsServer {
    wharf_testkit::nats::shipped(Path::new(WHARF), dir, hosts)
}

/// The flags that make a Wharf process `client` speak mutual TLS with `shipped_nats`.
fn tls_flags(dir: &Path, client: &str) -> Vec<String> {
    wharf_testkit::nats::shipped_tls_flags(dir, client)
}

/// A plain NATS client's options for mutual TLS with `shipped_nats`, as `client`.
fn with_tls(options: async_nats::ConnectOptions, dir: &Path, client: &str) -> async_nats::ConnectOptions {
    let tls = dir.join("nats/tls");
    options.require_tls(true).add_root_certificates(tls.join("ca.pem")).add_client_certificate(tls.join(format!("{client}.pem")), tls.join(format!("{client}.key")))
}

/// The options of `wharf_bus` for mutual TLS with `shipped_nats`, as `client`.
fn bus_tls(dir: &Path, client: &str) -> wharf_bus::NatsTls {
    let tls = dir.join("nats/tls");
    wharf_bus::NatsTls {
        ca: Some(tls.join("ca.pem")),
        client: Some(wharf_bus::ClientCertificate { cert: tls.join(format!("{client}.pem")), key: tls.join(format!("{client}.key")) }),
    }
}

/// A plain async-nats client (not Wharf's bus) with `host`'s identity and
/// certificate, and the errors the server sends it.
async fn raw_host_client(url: &str, dir: &Path, host: &str) -> (async_nats::Client, Arc<std::sync::Mutex<Vec<String>>>) {
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let client = with_tls(async_nats::ConnectOptions::with_nkey(std::fs::read_to_string(seed_of(dir, host)).expect("seed").trim().to_string()), dir, host)
        .custom_inbox_prefix(wharf_proto::names::host_inbox_prefix(&wharf_proto::HostId::new(host).expect("valid")))
        .event_callback({
            let errors = errors.clone();
            move |event| {
                let errors = errors.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        errors.lock().expect("lock").push(e.to_string());
                    }
                }
            }
        })
        .connect(url)
        .await
        .expect("the host's identity connects");
    (client, errors)
}

/// Waits up to 10 s for the server to send an error containing `what`.
async fn until_refused(errors: Arc<std::sync::Mutex<Vec<String>>>, what: String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if errors.lock().expect("lock").iter().any(|e| e.contains(&what)) {
            return;
        }
        assert!(Instant::now() < deadline, "the server did not refuse {what}; its errors: {:?}", errors.lock().expect("lock"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The seed file `shipped_nats` made for `host`.
fn seed_of(dir: &Path, host: &str) -> String {
    dir.join("nats/hosts").join(format!("{host}.nk")).to_str().expect("utf-8").to_string()
}

/// A scheduler over the shipped config, as the user `scheduler`.
fn scheduler_as_scheduler(nats: &str, dir: &Path) -> (Process, Api) {
    let tls = tls_flags(dir, "scheduler");
    let dir = dir.join("scheduler");
    let mut args = vec!["scheduler", "--nats", nats, "--nats-user", "scheduler", "--nats-password", "s3cret-s", "--api", "127.0.0.1:0", "--data-dir", dir.to_str().expect("utf-8")];
    args.extend(tls.iter().map(String::as_str));
    let mut sched = Process::spawn(WHARF, &args);
    let line = sched.wait_for_line("Wharf scheduler: API", Duration::from_secs(60));
    let api = Api { url: url_in(&line), token: std::fs::read_to_string(dir.join("admin-token")).expect("token").trim().to_string() };
    (sched, api)
}

/// `wharf host` named `name` with its own NATS identity.
fn host_with_identity(nats: &str, name: &str, dir: &Path) -> Host {
    host_with_identity_and(nats, name, dir, &[])
}

/// `host_with_identity` with more flags.
fn host_with_identity_and(nats: &str, name: &str, dir: &Path, more: &[&str]) -> Host {
    let data = dir.join(name);
    let seed = seed_of(dir, name);
    let tls = tls_flags(dir, name);
    let mut args = vec!["host", "--nats", nats, "--nats-nkey", &seed, "--name", name, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--data-dir", data.to_str().expect("utf-8")];
    args.extend(tls.iter().map(String::as_str));
    args.extend(more);
    let mut process = Process::spawn(WHARF, &args);
    let line = process.wait_for_line("ingress http://", Duration::from_secs(60));
    Host { process, name: name.to_string(), ingress: url_in(&line) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_with_host_credentials_serve_but_cannot_write_desired_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = shipped_nats(dir.path(), &["h1"]);
    let url = nats.url();
    let (_sched, api) = scheduler_as_scheduler(&url, dir.path());
    let host = host_with_identity(&url, "h1", dir.path());
    let ingress = host.ingress.clone();

    // With host credentials the host runs what it is assigned, serves, and stores services' data.
    wharf(&api, &["deploy", &sample("counter"), "--name", "counter", "--route", "/", "--keyvalue", "counter"]);
    until_ok(&format!("{ingress}/hit"), "1", Duration::from_secs(20)).await;

    // The same credentials cannot touch desired state: the NATS server
    // refuses every JetStream request of theirs, even a plain client's
    // account check, and every write to a bucket's subjects.
    let as_host = wharf_bus::Bus::connect_nats(
        &url,
        wharf_bus::NatsOptions {
            auth: wharf_bus::NatsAuth::NkeySeedFile(seed_of(dir.path(), "h1").into()),
            inbox_prefix: Some("_INBOX.host-h1".into()),
            tls: Some(bus_tls(dir.path(), "h1")),
            ..Default::default()
        },
    )
    .await;
    assert!(matches!(as_host, Err(wharf_bus::ConnectError::JetStreamUnavailable { .. })), "a host's identity used JetStream itself");
    let (client, errors) = raw_host_client(&url, dir.path(), "h1").await;
    for bucket in [
        wharf_proto::names::SERVICES_BUCKET,
        wharf_proto::names::ASSIGNMENTS_BUCKET,
        wharf_scheduler::auth::TOKENS_BUCKET,
        wharf_proto::names::ROUTE_CLAIMS_BUCKET,
        wharf_proto::names::ARTIFACT_OWNERS_BUCKET,
        &wharf_proto::names::kv_bucket("default"),
    ] {
        let subject = format!("$KV.{bucket}.default.counter");
        client.publish(subject.clone(), bytes::Bytes::from_static(b"{}")).await.expect("sent");
        client.flush().await.expect("flushed");
        until_refused(errors.clone(), format!("Permissions Violation for Publish to \"{subject}\"")).await;
    }
    // Services' data goes through the control plane's data broker (the
    // counter above counts through it): not written directly.
    // Nothing changed: the service is as deployed and still served.
    assert_eq!(service(&api, "counter")["service"]["generation"], 1);
    until_ok(&format!("{ingress}/hit"), "2", Duration::from_secs(5)).await;
    drop(host);
}

/// A host's own NATS identity (deploy/nats as shipped, `wharf nats
/// add-host`), used through a plain NATS client: the server refuses a
/// heartbeat on another host's subject and subscriptions to another host's
/// subjects or to others' inboxes; the scheduler ignores a heartbeat on the
/// host's own subject that names another host. Real hosts with their own
/// identities serve, hop requests to each other and report, and nothing
/// changes for host-b or the desired state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_identity_reaches_only_its_own_subjects_and_cannot_speak_for_another_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = shipped_nats(dir.path(), &["host-a", "host-b"]);
    let url = nats.url();
    let (sched, api) = scheduler_as_scheduler(&url, dir.path());
    let hosts = [host_with_identity(&url, "host-a", dir.path()), host_with_identity_and(&url, "host-b", dir.path(), &["--labels", "zone=b"])];
    // One replica, on host-b: host-a's ingress hands its requests to host-b over NATS.
    wharf(&api, &["deploy", &sample("hello"), "--name", "hello", "--route", "/hello", "--on", "zone=b"]);
    for host in &hosts {
        until_ok(&format!("{}/hello", host.ingress), "Hello from Wharf!", Duration::from_secs(30)).await;
    }
    assert_eq!(hosts_of(&api, "hello"), ["host-b"], "the only replica runs on host-b");
    let listed = |id: &str| -> Value {
        let all: Value = serde_json::from_str(&wharf(&api, &["get", "hosts", "-o", "json"])).expect("json");
        all["hosts"].as_array().into_iter().flatten().find(|h| h["id"] == id).cloned().unwrap_or(Value::Null)
    };
    let before = listed("host-b");
    assert_eq!((before["ready"].as_bool(), before["draining"].as_bool()), (Some(true), Some(false)), "{before}");
    assert_eq!(listed("host-a")["ready"], true, "host-a reports heartbeats");

    // host-a's credentials in a plain NATS client, with the server's errors collected.
    let (client, errors) = raw_host_client(&url, dir.path(), "host-a").await;
    let refused = |what: String| until_refused(errors.clone(), what);
    let host_b = wharf_proto::HostId::new("host-b").expect("valid");
    let forged = wharf_proto::Heartbeat {
        host: host_b.clone(),
        addr: None,
        labels: Default::default(),
        capacity: wharf_proto::Capacity { memory: wharf_proto::ByteSize::gib(1024), instances: 1_000_000 },
        cached: Vec::new(),
        replicas: Vec::new(),
        sent_at_ms: 0,
        started_at_ms: 1,
        draining: true,
        demand: Vec::new(),
        memory_reserved: Default::default(),
        memory_in_use: Default::default(),
        memory_overcommit: None,
        version: 1,
        seal_key: None,
    };
    let forged = bytes::Bytes::from(serde_json::to_vec(&forged).expect("json"));

    // On host-b's subject: the server refuses it.
    client.publish(wharf_proto::names::host_heartbeat_subject(&host_b), forged.clone()).await.expect("sent");
    client.flush().await.expect("flushed");
    refused("Permissions Violation for Publish to \"wharf.host.host-b.heartbeat\"".into()).await;
    // Nor announce a ready replica as host-b (nor on the old shared subject).
    for subject in [wharf_proto::names::service_ready_subject(&host_b, "default", "hello"), "wharf.ready.default.hello".to_string()] {
        client.publish(subject.clone(), bytes::Bytes::from_static(b"{}")).await.expect("sent");
        client.flush().await.expect("flushed");
        refused(format!("Permissions Violation for Publish to \"{subject}\"")).await;
    }
    // Nor can it end host-b's job attempts: results go on the sender's own subject.
    client.publish(wharf_proto::names::job_result_subject(&host_b), bytes::Bytes::from_static(b"{}")).await.expect("sent");
    client.flush().await.expect("flushed");
    refused("Permissions Violation for Publish to \"wharf.host.host-b.jobresult\"".into()).await;
    // On its own subject, naming host-b: the scheduler ignores it, saying so.
    for _ in 0..5 {
        client.publish("wharf.host.host-a.heartbeat", forged.clone()).await.expect("sent");
        client.flush().await.expect("flushed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut sched = sched;
    sched.wait_for_line("ignoring a heartbeat whose body names another host", Duration::from_secs(10));

    // Another host's subjects (its requests, trigger hand-offs and intake
    // among them), any service's requests or hand-offs, another host's
    // inboxes, the scheduler's: refused.
    let theirs = wharf_proto::names::host_request_subject(&host_b, "default", "hello", 1);
    // Nor components' messages, of any namespace: the control plane takes
    // them in and hands each to one host, on that host's own subject.
    let subjects = [
        "wharf.host.host-b.>",
        "wharf.host.host-b.svc.>",
        theirs.as_str(),
        "wharf.host.*.svc.>",
        "wharf.host.host-b.trigger.>",
        "wharf.host.host-b.intake.>",
        "wharf.host.*.jobs",
        "wharf.svc.>",
        "wharf.svc.default.hello",
        "wharf.trigger.>",
        "wharf.msg.>",
        "wharf.msg.default.>",
        "wharf.msg.bank.payments",
        "_INBOX.host-host-b.>",
        "_INBOX.>",
        ">",
    ];
    for subject in subjects {
        let _subscription = client.subscribe(subject.to_string()).await.expect("sent");
        client.flush().await.expect("flushed");
        refused(format!("Permissions Violation for Subscription to \"{subject}\"")).await;
    }
    // Its own subjects and inboxes are not.
    let _own = client.subscribe("wharf.host.host-a.>").await.expect("sent");
    let _inbox = client.subscribe("_INBOX.host-host-a.x").await.expect("sent");
    client.flush().await.expect("flushed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let errors_now = errors.lock().expect("lock").clone();
    assert!(!errors_now.iter().any(|e| e.contains("host-host-a") || e.contains("wharf.host.host-a")), "{errors_now:?}");

    // Log lines. A follower of hello (whose only replica is on host-b)
    // shows host-b's lines and none host-a writes: host-a may not publish
    // on the old shared subject nor on host-b's, and on its own subject a
    // line naming host-b, or any line of a service it does not run, is
    // dropped by the control plane.
    let mut follower = Process::spawn_with(Command::new(WHARF).args(["logs", "hello", "-f"]).env("WHARF_API", &api.url).env("WHARF_TOKEN", &api.token));
    follower.wait_for_line("served /hello", Duration::from_secs(10));
    let forged_line = |host: &wharf_proto::HostId, line: &str| {
        let record = wharf_proto::observe::LogRecord {
            time_ms: u64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_millis()).expect("fits"),
            host: host.clone(),
            service: "default/hello".parse().expect("an id"),
            revision: 1,
            replica: 0,
            stream: wharf_proto::observe::LogStreamName::Stdout,
            seq: 1_000_000,
            line: line.to_string(),
        };
        bytes::Bytes::from(serde_json::to_vec(&record).expect("json"))
    };
    let host_a = wharf_proto::HostId::new("host-a").expect("valid");
    for subject in ["wharf.logs.default.hello".to_string(), wharf_proto::names::host_log_lines_subject(&host_b, "default", "hello")] {
        client.publish(subject.clone(), forged_line(&host_b, "forged on a subject not its own")).await.expect("sent");
        client.flush().await.expect("flushed");
        refused(format!("Permissions Violation for Publish to \"{subject}\"")).await;
    }
    let own = wharf_proto::names::host_log_lines_subject(&host_a, "default", "hello");
    client.publish(own.clone(), forged_line(&host_b, "forged as host-b")).await.expect("sent");
    client.publish(own, forged_line(&host_a, "forged from host-a, which runs no replica of hello")).await.expect("sent");
    client.flush().await.expect("flushed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let response = reqwest::get(format!("{}/hello/after-forgery", hosts[0].ingress)).await.expect("answered");
    assert_eq!(response.status(), 200);
    let real = follower.wait_for_line("served /hello/after-forgery", Duration::from_secs(10));
    assert!(real.starts_with("[host-b r"), "host-b's own line, tagged: {real}");
    let shown = follower.output();
    assert!(!shown.contains("forged"), "a follower showed a line host-a wrote:\n{shown}");
    follower.kill();

    // host-b is as it reported itself; host-a too; the desired state and serving are intact.
    let after = listed("host-b");
    assert_eq!((after["ready"].as_bool(), after["draining"].as_bool()), (Some(true), Some(false)), "{after}");
    assert_eq!(after["capacity"], before["capacity"], "host-b's capacity changed");
    assert_eq!(after["started_at_ms"], before["started_at_ms"]);
    assert_eq!(listed("host-a")["ready"], true);
    assert_eq!(service(&api, "hello")["service"]["generation"], 1);
    // Served through host-a's ingress from host-b's replica, under these permissions.
    for host in &hosts {
        until_ok(&format!("{}/hello", host.ingress), "Hello from Wharf!", Duration::from_secs(5)).await;
        // Nothing a host does itself (watches, heartbeats, hops, announcements) is refused.
        let output = host.process.output();
        assert!(!output.contains("Permissions Violation"), "{} was refused something:\n{output}", host.name);
    }
}

/// Reads `host`'s assignment as the control plane (the user `scheduler`).
async fn assignment_of(nats: &str, dir: &Path, host: &str) -> wharf_proto::Assignment {
    let client = with_tls(async_nats::ConnectOptions::with_user_and_password("scheduler".into(), "s3cret-s".into()), dir, "scheduler")
        .connect(nats)
        .await
        .expect("the scheduler's user connects");
    let kv = async_nats::jetstream::new(client).get_key_value(wharf_proto::names::ASSIGNMENTS_BUCKET).await.expect("the assignments bucket");
    let value = kv.get(host).await.expect("read").expect("the host has an assignment");
    serde_json::from_slice(&value).expect("an assignment")
}

/// The public half of the sealing key in a host's data directory.
fn host_public_key(dir: &Path, host: &str) -> String {
    let text = std::fs::read_to_string(dir.join(host).join("host-seal.key")).expect("the host made its sealing key");
    wharf_proto::sealed::HostKey::parse(&text).expect("a host key").public().to_string()
}

/// Issue 17: a host receives the secrets of the replicas assigned to it
/// sealed to its own key, inside its assignment; with the shipped per-host
/// identities and no --secret-key-file, the service reads its secret while
/// the host's credentials, in a plain NATS client, cannot read the secrets
/// bucket in any way JetStream offers. A host restarted with a new key gets
/// its secrets sealed again; a host announcing no key (given the control
/// plane's key, so reading the bucket itself) fails the replica saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_receive_secrets_sealed_to_their_own_key_and_cannot_read_the_secrets_bucket() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = shipped_nats(dir.path(), &["host-a", "host-b"]);
    let url = nats.url();
    let (_sched, api) = scheduler_as_scheduler(&url, dir.path());
    let mut a = host_with_identity(&url, "host-a", dir.path());
    let key_file = dir.path().join("host-a/host-seal.key");
    assert_eq!(std::fs::metadata(&key_file).expect("key").permissions().mode() & 0o777, 0o600, "the host's key is its own");
    let value = "sealed-to-host-7f3a";
    wharf(&api, &["secret", "set", "token", value]);
    wharf(&api, &["deploy", &sample("settings"), "--name", "settings", "--route", "/", "--secret", "token", "--no-wait"]);
    until_ok(&format!("{}/?key=token", a.ingress), value, Duration::from_secs(90)).await;

    // What travelled: the assignment holds the secret sealed to host-a's key, not in plain text.
    let first_key = host_public_key(dir.path(), "host-a");
    let assignment = assignment_of(&url, dir.path(), "host-a").await;
    let sealed = assignment.secrets.clone().expect("secrets sealed to host-a");
    assert_eq!(sealed.to, first_key);
    let text = serde_json::to_string(&assignment).expect("json");
    assert!(sealed.values.contains_key("default.token") && !text.contains(value), "{text}");
    // Sealing is deterministic: heartbeats and passes meanwhile rewrite nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(assignment_of(&url, dir.path(), "host-a").await, assignment, "the assignment was rewritten while nothing changed");

    // host-a's credentials in a plain NATS client: every way to read the secrets bucket is refused.
    let (client, errors) = raw_host_client(&url, dir.path(), "host-a").await;
    let refused = |what: String| until_refused(errors.clone(), what);
    let attempts: [(&str, serde_json::Value); 6] = [
        ("$JS.API.DIRECT.GET.KV_wharf-secrets.$KV.wharf-secrets.default.token", serde_json::Value::Null),
        ("$JS.API.DIRECT.GET.KV_wharf-secrets", serde_json::json!({"last_by_subj": "$KV.wharf-secrets.default.token"})),
        ("$JS.API.STREAM.MSG.GET.KV_wharf-secrets", serde_json::json!({"last_by_subj": "$KV.wharf-secrets.default.token"})),
        (
            "$JS.API.CONSUMER.CREATE.KV_wharf-secrets",
            serde_json::json!({"stream_name": "KV_wharf-secrets", "config": {"deliver_subject": "_INBOX.host-host-a.steal", "deliver_policy": "all", "ack_policy": "none"}}),
        ),
        (
            "$JS.API.CONSUMER.CREATE.KV_wharf-secrets.steal.$KV.wharf-secrets.>",
            serde_json::json!({"stream_name": "KV_wharf-secrets", "config": {"name": "steal", "deliver_subject": "_INBOX.host-host-a.steal", "filter_subject": "$KV.wharf-secrets.>", "deliver_policy": "all", "ack_policy": "none"}}),
        ),
        (
            "$JS.API.CONSUMER.DURABLE.CREATE.KV_wharf-secrets.steal",
            serde_json::json!({"stream_name": "KV_wharf-secrets", "config": {"durable_name": "steal", "deliver_policy": "all", "ack_policy": "none"}}),
        ),
    ];
    let mut stolen = client.subscribe("_INBOX.host-host-a.steal").await.expect("its own inbox");
    for (subject, body) in attempts {
        let body = if body.is_null() { bytes::Bytes::new() } else { bytes::Bytes::from(body.to_string()) };
        let answer = tokio::time::timeout(Duration::from_secs(3), client.request(subject.to_string(), body)).await;
        if let Ok(Ok(reply)) = &answer {
            let reply = String::from_utf8_lossy(&reply.payload);
            assert!(!reply.contains(value) && !reply.contains("\"data\""), "{subject} answered: {reply}");
        }
        refused(format!("Permissions Violation for Publish to \"{subject}\"")).await;
    }
    // The bucket's own subjects cannot be subscribed to.
    let _watch = client.subscribe("$KV.wharf-secrets.>").await.expect("sent");
    client.flush().await.expect("flushed");
    refused("Permissions Violation for Subscription to \"$KV.wharf-secrets.>\"".into()).await;
    // Through JetStream's own key-value client too: nothing comes back.
    let js = async_nats::jetstream::new(client.clone());
    if let Ok(Ok(kv)) = tokio::time::timeout(Duration::from_secs(5), js.get_key_value(wharf_proto::names::SECRETS_BUCKET)).await {
        let got = tokio::time::timeout(Duration::from_secs(5), kv.get("default.token")).await;
        assert!(!matches!(got, Ok(Ok(Some(_)))), "host-a read the secret from the bucket: {got:?}");
    }
    assert!(tokio::time::timeout(Duration::from_millis(500), futures::StreamExt::next(&mut stolen)).await.is_err(), "a consumer delivered the bucket");
    // The host itself never tried: nothing it does is refused.
    let output = a.process.output();
    assert!(!output.contains("Permissions Violation"), "host-a was refused something:\n{output}");

    // Restarted with a new key: the control plane seals the secret again, to the new key.
    a.process.kill();
    std::fs::remove_file(&key_file).expect("remove the key");
    let a = host_with_identity(&url, "host-a", dir.path());
    let second_key = host_public_key(dir.path(), "host-a");
    assert_ne!(second_key, first_key);
    until_ok(&format!("{}/?key=token", a.ingress), value, Duration::from_secs(90)).await;
    assert_eq!(assignment_of(&url, dir.path(), "host-a").await.secrets.expect("secrets").to, second_key, "sealed again to the new key");

    // A host announcing no sealing key (given the control plane's key, it
    // reads the bucket itself) gets no secrets; its replica fails saying why.
    let mut a = a;
    a.process.kill();
    let control_plane_key = dir.path().join("scheduler/secret.key");
    let _b = host_with_identity_and(&url, "host-b", dir.path(), &["--secret-key-file", control_plane_key.to_str().expect("utf-8")]);
    let wait = Instant::now();
    loop {
        let view = service(&api, "settings").to_string();
        if view.contains("announces no sealing key") {
            assert!(view.contains("host-b") && view.contains("--secret-key-file") && view.contains("cannot read secret token from the secrets bucket"), "{view}");
            break;
        }
        assert!(wait.elapsed() < Duration::from_secs(90), "no clear error on host-b: {view}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(assignment_of(&url, dir.path(), "host-b").await.secrets, None, "nothing sealed to a host without a key");
}

/// Issue 17: a host cannot make a JetStream consumer, which would deliver
/// wherever its maker says (nats-server does not check a deliver subject,
/// nor a pull request's reply, against the maker's rights): with one, a
/// message carrying `Nats-Rollup: all` delivered onto a control-plane key
/// erases every service. host-a's credentials, in a plain NATS client: a
/// push consumer on its own namespace's data delivering onto the services
/// bucket, a named or durable one, and a pull with such a reply are refused
/// by the server. The control plane's broker, which makes a host's
/// consumers for it, refuses delivery outside the host's inboxes, the
/// secrets bucket and another host's assignment, and drops an ask whose
/// answer would go onto a control-plane key. The real hosts, whose watches
/// the broker makes, serve throughout, and the desired state is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cannot_make_a_consumer_that_delivers_onto_the_control_planes_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = shipped_nats(dir.path(), &["host-a", "host-b"]);
    let url = nats.url();
    let (_sched, api) = scheduler_as_scheduler(&url, dir.path());
    let hosts = [host_with_identity(&url, "host-a", dir.path()), host_with_identity(&url, "host-b", dir.path())];
    wharf(&api, &["deploy", &sample("hello"), "--name", "hello", "--route", "/hello"]);
    wharf(&api, &["deploy", &sample("counter"), "--name", "counter", "--route", "/hit", "--keyvalue", "counter"]);
    for host in &hosts {
        until_ok(&format!("{}/hello", host.ingress), "Hello from Wharf!", Duration::from_secs(30)).await;
    }
    until_ok(&format!("{}/hit", hosts[0].ingress), "1", Duration::from_secs(30)).await;

    let (client, errors) = raw_host_client(&url, dir.path(), "host-a").await;
    let refused = |what: String| until_refused(errors.clone(), what);
    // The bait: a message the host may write, into its namespace's data,
    // that would purge whatever bucket it landed in.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "all");
    client.publish_with_headers("$KV.wharf-kv-default.bait", headers, bytes::Bytes::from_static(b"x")).await.expect("sent");
    client.flush().await.expect("flushed");

    let target = "$KV.wharf-services.default.hello";
    let push = |name: Option<&str>| {
        let mut config = serde_json::json!({"deliver_subject": target, "filter_subject": "$KV.wharf-kv-default.bait", "deliver_policy": "last_per_subject", "ack_policy": "none"});
        if let Some(name) = name {
            config["name"] = name.into();
        }
        serde_json::json!({"stream_name": "KV_wharf-kv-default", "config": config}).to_string()
    };
    for (subject, body) in [
        ("$JS.API.CONSUMER.CREATE.KV_wharf-kv-default".to_string(), push(None)),
        ("$JS.API.CONSUMER.CREATE.KV_wharf-kv-default.evil.$KV.wharf-kv-default.bait".to_string(), push(Some("evil"))),
        ("$JS.API.CONSUMER.DURABLE.CREATE.KV_wharf-kv-default.evil".to_string(), push(Some("evil"))),
    ] {
        client.publish(subject.clone(), bytes::Bytes::from(body)).await.expect("sent");
        client.flush().await.expect("flushed");
        refused(format!("Permissions Violation for Publish to \"{subject}\"")).await;
    }
    // A pull request whose reply is the target: the consumer API is closed altogether.
    let next = "$JS.API.CONSUMER.MSG.NEXT.KV_wharf-kv-default.evil";
    client.publish_with_reply(next, target, bytes::Bytes::from_static(b"{\"batch\":1}")).await.expect("sent");
    client.flush().await.expect("flushed");
    refused(format!("Permissions Violation for Publish to \"{next}\"")).await;

    // Nor any JetStream request of its own: JetStream answers on whatever
    // reply subject a request names (an API call, an acknowledgement), with
    // the server's rights, so the answer would land on the target.
    for subject in ["$JS.API.INFO", "$JS.API.STREAM.INFO.KV_wharf-services", "$JS.API.DIRECT.GET.KV_wharf-services", "$JS.ACK.wharf-msg-default-x.c.1.1.1.1.0"] {
        client.publish_with_reply(subject, target, bytes::Bytes::from_static(b"{\"last_by_subj\":\"$KV.wharf-services.default.counter\"}")).await.expect("sent");
        client.flush().await.expect("flushed");
        refused(format!("Permissions Violation for Publish to \"{subject}\"")).await;
    }
    // Nor a component's message naming the target as its reply: a stream
    // storing the subject would acknowledge onto the target. The data
    // broker publishes components' messages for a host, naming no reply,
    // and only on a namespace the host runs.
    let message = "wharf.msg.default.orders.new";
    client.publish_with_reply(message, target, bytes::Bytes::from_static(b"{}")).await.expect("sent");
    client.flush().await.expect("flushed");
    refused(format!("Permissions Violation for Publish to \"{message}\"")).await;
    let watcher = with_tls(async_nats::ConnectOptions::with_user_and_password("scheduler".into(), "s3cret-s".into()), dir.path(), "scheduler")
        .connect(&url)
        .await
        .expect("the scheduler's user connects");
    let mut news = watcher.subscribe("wharf.msg.>").await.expect("subscribed");
    watcher.flush().await.expect("flushed");
    let data_broker = wharf_proto::names::data_broker_subject(&wharf_proto::HostId::new("host-a").expect("valid"));
    let publish = |subject: &str| {
        let (client, data_broker) = (client.clone(), data_broker.clone());
        let ask = data_ask(serde_json::json!({"op": "publish", "subject": subject}), b"from host-a");
        async move {
            let answer = tokio::time::timeout(Duration::from_secs(10), client.request(data_broker, ask)).await.expect("answered in time").expect("answered");
            String::from_utf8_lossy(&answer.payload).to_string()
        }
    };
    let answer = publish("wharf.msg.default.news.today").await;
    assert!(!answer.contains("failed"), "{answer}");
    let got = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut news)).await.expect("published in time").expect("a message");
    assert_eq!((got.subject.as_str(), &got.payload[..], got.reply), ("wharf.msg.default.news.today", &b"from host-a"[..], None), "published as asked, with no reply subject");
    let answer = publish("wharf.msg.bank.payments").await;
    assert!(answer.contains("runs nothing of namespace bank"), "{answer}");
    let answer = publish(target).await;
    assert!(answer.contains("components' messages only"), "{answer}");
    assert!(tokio::time::timeout(Duration::from_millis(300), futures::StreamExt::next(&mut news)).await.is_err(), "nothing else was published");

    // An acknowledgement through the broker must name a trigger stream's message.
    let ack = serde_json::json!({"kind": "ack", "ack": target, "nak_delay_ms": null}).to_string();
    client.publish(wharf_proto::names::consumer_broker_subject(&wharf_proto::HostId::new("host-a").expect("valid")), bytes::Bytes::from(ack)).await.expect("sent");

    // The broker makes consumers only into host-a's own inboxes, of what host-a may read.
    let broker = wharf_proto::names::consumer_broker_subject(&wharf_proto::HostId::new("host-a").expect("valid"));
    let ask = |stream: &str, filter: &str, deliver: &str| {
        bytes::Bytes::from(serde_json::json!({"kind": "push", "stream": stream, "filter": filter, "deliver": deliver, "from": null, "headers_only": false}).to_string())
    };
    for (body, why) in [
        (ask("KV_wharf-kv-default", "$KV.wharf-kv-default.bait", target), "only into its own inboxes"),
        (ask("KV_wharf-kv-default", "$KV.wharf-kv-default.bait", "_INBOX.host-host-b.x"), "only into its own inboxes"),
        (ask("KV_wharf-secrets", "$KV.wharf-secrets.>", "_INBOX.host-host-a.s"), "may not read bucket wharf-secrets"),
        (ask("KV_wharf-assignments", "$KV.wharf-assignments.host-b", "_INBOX.host-host-a.s"), "only its own assignment"),
        // Another namespace's data (host-a runs only `default`), and any
        // stream's messages: the control plane takes in trigger messages.
        (ask("KV_wharf-kv-bank", "$KV.wharf-kv-bank.>", "_INBOX.host-host-a.k"), "runs nothing of namespace bank"),
        (
            bytes::Bytes::from(
                serde_json::json!({"kind": "pull", "stream": "wharf-msg-default-orders", "consumer": "wharf-orders", "deliver": "_INBOX.host-host-a.p", "batch": 1, "expires_ms": 1000})
                    .to_string(),
            ),
            "may not consume stream wharf-msg-default-orders",
        ),
    ] {
        let answer = tokio::time::timeout(Duration::from_secs(5), client.request(broker.clone(), body)).await.expect("answered in time").expect("answered");
        let answer = String::from_utf8_lossy(&answer.payload).to_string();
        assert!(answer.contains("refused") && answer.contains(why), "{answer}");
    }
    // An ask whose answer would land on the target is dropped, not answered there.
    client.publish_with_reply(broker.clone(), target, ask("KV_wharf-kv-default", "$KV.wharf-kv-default.bait", "_INBOX.host-host-a.b")).await.expect("sent");
    client.flush().await.expect("flushed");
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The desired state is intact: the services are there as deployed,
    // read straight from the bucket as the control plane, and serve.
    let scheduler = with_tls(async_nats::ConnectOptions::with_user_and_password("scheduler".into(), "s3cret-s".into()), dir.path(), "scheduler")
        .connect(&url)
        .await
        .expect("the scheduler's user connects");
    let services = async_nats::jetstream::new(scheduler).get_key_value(wharf_proto::names::SERVICES_BUCKET).await.expect("services bucket");
    for name in ["default.hello", "default.counter"] {
        let value = services.get(name).await.expect("read").unwrap_or_else(|| panic!("{name} is gone from the services bucket"));
        assert!(serde_json::from_slice::<Value>(&value).is_ok(), "{name} holds something else: {}", String::from_utf8_lossy(&value));
    }
    assert_eq!(service(&api, "hello")["service"]["generation"], 1);
    assert_eq!(service(&api, "counter")["service"]["generation"], 1);
    until_ok(&format!("{}/hit", hosts[0].ingress), "2", Duration::from_secs(10)).await;
    for host in &hosts {
        until_ok(&format!("{}/hello", host.ingress), "Hello from Wharf!", Duration::from_secs(5)).await;
        // The hosts' own watches and listings go through the broker: nothing they do is refused.
        let output = host.process.output();
        assert!(!output.contains("Permissions Violation") && !output.contains("consumer ask refused"), "{} was refused something:\n{output}", host.name);
    }
}

/// One data-broker ask from a plain client: a JSON header (its length
/// first, four bytes big-endian), then the value.
fn data_ask(header: Value, value: &[u8]) -> bytes::Bytes {
    let json = header.to_string();
    let mut out = (json.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(value);
    out.into()
}

/// Issue 17: a host reads and writes services' key-value data only of the
/// namespaces it runs. Its identity may not touch any data bucket itself
/// (publish, direct get, stream info: refused by the server); the control
/// plane's data broker, which the real host uses, refuses a namespace it
/// runs nothing of, naming it, and drops an ask whose answer would land on
/// a control-plane key. The other namespace's data is intact, and the
/// host's own service keeps counting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_reaches_only_the_data_of_namespaces_it_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = shipped_nats(dir.path(), &["host-a"]);
    let url = nats.url();
    let (_sched, api) = scheduler_as_scheduler(&url, dir.path());
    let host = host_with_identity(&url, "host-a", dir.path());
    wharf(&api, &["deploy", &sample("counter"), "--name", "counter", "--route", "/hit", "--keyvalue", "counter"]);
    until_ok(&format!("{}/hit", host.ingress), "1", Duration::from_secs(30)).await;
    wharf(&api, &["kv", "put", "-n", "shop", "counter", "greeting", "kept-by-shop"]);
    let stored = wharf_proto::names::kv_key("counter", "greeting");

    let (client, errors) = raw_host_client(&url, dir.path(), "host-a").await;
    let refused = |what: String| until_refused(errors.clone(), what);
    for subject in [format!("$KV.wharf-kv-shop.{stored}"), format!("$KV.wharf-kv-default.{stored}")] {
        client.publish(subject.clone(), bytes::Bytes::from_static(b"overwritten")).await.expect("sent");
        client.flush().await.expect("flushed");
        refused(format!("Permissions Violation for Publish to \"{subject}\"")).await;
    }
    for subject in [
        "$JS.API.DIRECT.GET.KV_wharf-kv-shop".to_string(),
        format!("$JS.API.DIRECT.GET.KV_wharf-kv-shop.$KV.wharf-kv-shop.{stored}"),
        "$JS.API.STREAM.INFO.KV_wharf-kv-shop".to_string(),
        "$JS.API.STREAM.INFO.KV_wharf-secrets".to_string(),
        "$JS.API.DIRECT.GET.KV_wharf-assignments.$KV.wharf-assignments.host-b".to_string(),
    ] {
        let _ = tokio::time::timeout(Duration::from_secs(2), client.request(subject.clone(), bytes::Bytes::from_static(b"{\"last_by_subj\":\"$KV.wharf-kv-shop.x\"}"))).await;
        refused(format!("Permissions Violation for Publish to \"{subject}\"")).await;
    }

    let broker = wharf_proto::names::data_broker_subject(&wharf_proto::HostId::new("host-a").expect("valid"));
    let ask = |header: Value, value: &'static [u8]| {
        let client = client.clone();
        let broker = broker.clone();
        async move {
            let answer = tokio::time::timeout(Duration::from_secs(10), client.request(broker, data_ask(header, value))).await.expect("answered in time").expect("answered");
            String::from_utf8_lossy(&answer.payload).to_string()
        }
    };
    let put_shop = serde_json::json!({"op": "put", "bucket": "wharf-kv-shop", "key": stored});
    let answer = ask(put_shop.clone(), b"overwritten").await;
    assert!(answer.contains("runs nothing of namespace shop"), "{answer}");
    let answer = ask(serde_json::json!({"op": "get", "bucket": "wharf-kv-shop", "key": stored}), b"").await;
    assert!(answer.contains("runs nothing of namespace shop") && !answer.contains("kept-by-shop"), "{answer}");
    let answer = ask(serde_json::json!({"op": "put", "bucket": "wharf-services", "key": "default.counter"}), b"{}").await;
    assert!(answer.contains("may not write bucket wharf-services"), "{answer}");
    // Its own namespace's data: allowed.
    let answer = ask(serde_json::json!({"op": "keys_page", "bucket": "wharf-kv-default", "prefix": "", "after": 0, "limit": 10}), b"").await;
    assert!(answer.contains("\"keys\"") && !answer.contains("failed"), "{answer}");
    // An answer that would land on a control-plane key is not sent.
    client.publish_with_reply(broker.clone(), "$KV.wharf-services.default.counter", data_ask(serde_json::json!({"op": "get", "bucket": "wharf-kv-default", "key": "x"}), b"")).await.expect("sent");
    client.flush().await.expect("flushed");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // shop's data and the desired state are intact; host-a's service counts on.
    let kept = wharf(&api, &["kv", "get", "-n", "shop", "counter", "greeting"]);
    assert_eq!(kept.trim(), "kept-by-shop");
    assert_eq!(service(&api, "counter")["service"]["generation"], 1);
    until_ok(&format!("{}/hit", host.ingress), "2", Duration::from_secs(10)).await;
    let output = host.process.output();
    assert!(!output.contains("Permissions Violation") && !output.contains("refused"), "host-a was refused something:\n{output}");
}

/// The values of the `messages` bucket of namespace `default` (the
/// messenger sample counts each message body there), by body.
async fn message_counts(js: &async_nats::jetstream::Context) -> std::collections::BTreeMap<String, String> {
    let kv = js.get_key_value("wharf-kv-default").await.expect("the namespace's data bucket");
    let mut keys = kv.keys().await.expect("keys");
    let mut counts = std::collections::BTreeMap::new();
    while let Some(key) = futures::StreamExt::next(&mut keys).await {
        let key = key.expect("key");
        if let Some(body) = key.strip_prefix("messages.") {
            let value = kv.get(&key).await.expect("get").map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default();
            counts.insert(body.to_string(), value);
        }
    }
    counts
}

/// Waits until every body `prefix0..prefix{n-1}` is counted, and checks each was counted once.
async fn until_counted_once(js: &async_nats::jetstream::Context, prefix: &str, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let counts = message_counts(js).await;
        let ours: Vec<(&String, &String)> = counts.iter().filter(|(k, _)| k.strip_prefix(prefix).is_some_and(|i| i.parse::<usize>().is_ok())).collect();
        if ours.len() == n {
            let twice: Vec<_> = ours.iter().filter(|(_, v)| v.as_str() != "1").collect();
            assert!(twice.is_empty(), "handled more than once: {twice:?}");
            return;
        }
        assert!(Instant::now() < deadline, "{} of {n} {prefix}… messages handled within {within:?}", ours.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Issue 17: hosts with the shipped per-host identities may not subscribe
/// to components' messages (`wharf.msg.>`), so the control plane takes them
/// in and hands each to one host on that host's own subject. A core
/// trigger's request is answered, a stream's messages are each handled
/// once, a service at zero is woken by a message; with the host running the
/// stream's only replica killed, messages published meanwhile wait in the
/// stream and are each handled once after the replica is replaced on the
/// other host. Nothing a host does is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_takes_in_trigger_messages_for_hosts_that_may_not_read_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = shipped_nats(dir.path(), &["host-a", "host-b"]);
    let url = nats.url();
    let (_sched, api) = scheduler_as_scheduler(&url, dir.path());
    let mut hosts = vec![host_with_identity(&url, "host-a", dir.path()), host_with_identity(&url, "host-b", dir.path())];
    let messenger = sample("messenger");
    let manifest = dir.path().join("triggered.yaml");
    std::fs::write(
        &manifest,
        format!(
            "services:\n\
             - name: orders\n  component: {{ file: {messenger} }}\n  keyvalue: [messages]\n  triggers: [{{ subject: \"orders.>\", stream: orders, max_deliver: 3 }}]\n\
             - name: asker\n  component: {{ file: {messenger} }}\n  keyvalue: [messages]\n  triggers: [{{ subject: \"ask.>\" }}]\n\
             - name: sleepy\n  component: {{ file: {messenger} }}\n  replicas: 0\n  keyvalue: [messages]\n  \
               autoscale: {{ min: 0, max: 1, scale_down_delay: 1s, scale_to_zero_after: 30s, stable_window: 6s }}\n  triggers: [{{ subject: \"wake.>\" }}]\n"
        ),
    )
    .expect("manifest");
    wharf(&api, &["apply", "-f", manifest.to_str().expect("utf-8")]);
    let client = with_tls(async_nats::ConnectOptions::with_user_and_password("scheduler".into(), "s3cret-s".into()), dir.path(), "scheduler")
        .connect(&url)
        .await
        .expect("the scheduler's user connects");
    let js = async_nats::jetstream::new(client.clone());

    // A core trigger's request, answered by the handler.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let asked = async_nats::Request::new().payload("q1".into()).timeout(Some(Duration::from_secs(5)));
        match client.send_request("wharf.msg.default.ask.question", asked).await {
            Ok(reply) => {
                assert_eq!(&reply.payload[..], b"handled q1");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no answer to a core trigger's request: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A stream's messages, each handled once.
    for i in 0..200 {
        js.publish(format!("wharf.msg.default.orders.{i}"), format!("m{i}").into()).await.expect("published").await.expect("stored");
    }
    until_counted_once(&js, "m", 200, Duration::from_secs(30)).await;

    // A service at zero is woken by a message, which is then handled.
    assert!(hosts_of(&api, "sleepy").is_empty(), "at zero before the message");
    let woken = async_nats::Request::new().payload("up".into()).timeout(Some(Duration::from_secs(30)));
    let reply = client.send_request("wharf.msg.default.wake.now", woken).await.expect("woken and answered");
    assert_eq!(&reply.payload[..], b"handled up");

    // The host running the stream's only replica is killed; messages
    // published meanwhile wait, and are handled once on the other host.
    let placed = hosts_of(&api, "orders");
    assert_eq!(placed.len(), 1, "{placed:?}");
    let index = hosts.iter().position(|h| h.name == placed[0]).expect("a host of ours");
    let mut killed = hosts.remove(index);
    killed.process.kill();
    for i in 0..50 {
        js.publish(format!("wharf.msg.default.orders.k{i}"), format!("k{i}").into()).await.expect("published").await.expect("stored");
    }
    until_counted_once(&js, "k", 50, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while hosts_of(&api, "orders") != [hosts[0].name.clone()] {
        assert!(Instant::now() < deadline, "not replaced on the other host: {:?}", hosts_of(&api, "orders"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let output = hosts[0].process.output();
    assert!(!output.contains("Permissions Violation") && !output.contains("ask refused"), "{} was refused something:\n{output}", hosts[0].name);
}

/// Issue 17: a NATS client certificate can be revoked without a new CA.
/// The shipped servers accept only pinned certificates (`wharf nats pin`,
/// `add-host --cert`); `wharf nats unpin` and a reload drop host-b's
/// connection at once and refuse it afterwards, though its NKey and its
/// certificate are still valid and signed by the CA; the scheduler sees
/// host-b down, host-a keeps serving. Pinned again, host-b comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpinned_certificate_is_dropped_and_refused_until_pinned_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = shipped_nats(dir.path(), &["host-a", "host-b"]);
    let url = nats.url();
    let (_sched, api) = scheduler_as_scheduler(&url, dir.path());
    let hosts = [host_with_identity(&url, "host-a", dir.path()), host_with_identity(&url, "host-b", dir.path())];
    wharf(&api, &["deploy", &sample("hello"), "--name", "hello", "--route", "/hello", "--replicas", "2"]);
    for host in &hosts {
        until_ok(&format!("{}/hello", host.ingress), "Hello from Wharf!", Duration::from_secs(30)).await;
    }
    let ready = |id: &str| -> Option<bool> {
        let all: Value = serde_json::from_str(&wharf(&api, &["get", "hosts", "-o", "json"])).expect("json");
        all["hosts"].as_array().into_iter().flatten().find(|h| h["id"] == id).and_then(|h| h["ready"].as_bool())
    };
    let until_ready = |id: &'static str, want: bool, within: Duration| async move {
        let deadline = Instant::now() + within;
        loop {
            if ready(id) == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{id} is not ready={want} within {within:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    until_ready("host-b", true, Duration::from_secs(10)).await;

    let config = dir.path().join("nats");
    let cert_b = config.join("tls/host-b.pem");
    let nats_cli = |args: &[&str]| {
        let output = Command::new(WHARF).arg("nats").args(args).output().expect("wharf runs");
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "wharf nats {args:?}:\n{text}");
        text
    };
    let said = nats_cli(&["unpin", "--dir", config.to_str().expect("utf-8"), cert_b.to_str().expect("utf-8")]);
    assert!(said.contains("unpinned") && said.contains("reload"), "{said}");
    nats.reload();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !nats.log().contains("due to pinned certs reload") {
        assert!(Instant::now() < deadline, "the server kept host-b's connection:\n{}", nats.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until_ready("host-b", false, Duration::from_secs(10)).await;
    // host-b's own NKey with its CA-signed certificate: refused in the handshake.
    let seed = std::fs::read_to_string(seed_of(dir.path(), "host-b")).expect("seed").trim().to_string();
    let refused = with_tls(async_nats::ConnectOptions::with_nkey(seed.clone()), dir.path(), "host-b").connect(&url).await;
    assert!(refused.is_err(), "an unpinned certificate connected");
    assert!(nats.log().contains("certificate not pinned"), "{}", nats.log());
    // Meanwhile host-a serves hello (its replica, or one placed again there).
    until_ok(&format!("{}/hello", hosts[0].ingress), "Hello from Wharf!", Duration::from_secs(10)).await;
    until_ready("host-a", true, Duration::from_secs(5)).await;

    // Pinned again (as add-host does for a host), host-b reconnects by itself.
    let said = nats_cli(&["pin", "--dir", config.to_str().expect("utf-8"), cert_b.to_str().expect("utf-8")]);
    assert!(said.contains("pinned"), "{said}");
    nats.reload();
    until_ready("host-b", true, Duration::from_secs(30)).await;
    until_ok(&format!("{}/hello", hosts[1].ingress), "Hello from Wharf!", Duration::from_secs(30)).await;
}
