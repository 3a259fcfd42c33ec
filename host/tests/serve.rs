//! The host runtime end to end: real sample components in real wasmtime,
//! served over loopback HTTP, under their limits.

use std::sync::Arc;
use std::time::Duration;
use wharf_host::egress::EgressPolicy;
use wharf_host::ingress;
use wharf_host::metrics::HostMetrics;
use wharf_host::{LoadError, LoadedComponent, Runtime, RuntimeConfig, Workload, WorkloadLimits, WorkloadSpec};
use wharf_proto::egress::PrivateEgress;
use wharf_proto::{ByteSize, Digest};
use wharf_testkit::samples;

/// One runtime with any number of workloads, each on its own loopback port.
struct Host {
    runtime: Runtime,
    metrics: HostMetrics,
    client: reqwest::Client,
}

/// A workload being served; the server stops when this is dropped.
struct Served {
    url: String,
    workload: Workload,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Host {
    fn new() -> Self {
        Self::with(RuntimeConfig::default())
    }

    /// A host whose runtime has `config`'s host-call policies.
    fn with(config: RuntimeConfig) -> Self {
        let runtime = Runtime::new(RuntimeConfig { max_instances: 200, max_instance_memory: ByteSize::mib(256), cache_dir: None, ..config })
            .expect("runtime starts");
        Host::with_runtime(runtime)
    }

    fn with_runtime(runtime: Runtime) -> Self {
        let metrics = HostMetrics::for_runtime(&runtime);
        Host { runtime, metrics, client: reqwest::Client::new() }
    }

    async fn serve(&self, sample: &str, configure: impl FnOnce(&mut WorkloadSpec)) -> Served {
        let component = self.runtime.load(&samples::bytes(sample), None).expect("sample loads");
        self.serve_loaded(sample, component, configure).await
    }

    async fn serve_loaded(&self, sample: &str, component: LoadedComponent, configure: impl FnOnce(&mut WorkloadSpec)) -> Served {
        let mut spec = WorkloadSpec::new(format!("test/{sample}"));
        configure(&mut spec);
        let workload = Workload::new(&self.runtime, component, spec, &self.metrics).expect("workload starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handler = Arc::new(workload.clone());
        tokio::spawn(async move {
            let _ = ingress::serve(listener, None, wharf_edge::ServerConfig::default(), handler, async move {
                let _ = stopped.await;
            })
            .await;
        });
        Served { url, workload, _stop: stop }
    }

    async fn get(&self, url: &str) -> (u16, Option<String>, String) {
        let response = self.client.get(url).send().await.expect("request is answered");
        let status = response.status().as_u16();
        let error = response.headers().get("x-wharf-error").map(|v| v.to_str().unwrap_or("?").to_string());
        let body = response.text().await.expect("body reads");
        (status, error, body)
    }
}

fn limits(configure: impl FnOnce(&mut WorkloadLimits)) -> impl FnOnce(&mut WorkloadSpec) {
    move |spec| configure(&mut spec.limits)
}

#[tokio::test]
async fn hello_says_hello_and_takes_its_greeting_from_env() {
    let host = Host::new();
    let plain = host.serve("hello", |_| {}).await;
    assert_eq!(host.get(&format!("{}/", plain.url)).await, (200, None, "Hello from Wharf!\n".to_string()));
    let greeted = host.serve("hello", |spec| spec.env = vec![("GREETING".into(), "ahoy".into())]).await;
    assert_eq!(host.get(&format!("{}/", greeted.url)).await.2, "ahoy\n");
    // Its stdout is captured as a log line tagged with the service.
    let logs = plain.workload.logs().recent();
    assert!(logs.iter().any(|l| l.line == "hello: served /" && &*l.service == "test/hello"), "{logs:?}");
}

#[tokio::test]
async fn echo_reflects_method_path_headers_and_body() {
    let host = Host::new();
    let echo = host.serve("echo", |_| {}).await;
    let response = host
        .client
        .post(format!("{}/some/path?x=1", echo.url))
        .header("x-probe", "42")
        .body("payload bytes")
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);
    let json: serde_json::Value = response.json().await.expect("json");
    assert_eq!(json["method"], "POST");
    assert_eq!(json["path"], "/some/path");
    assert_eq!(json["query"], "x=1");
    assert_eq!(json["headers"]["x-probe"], "42");
    assert_eq!(json["body"], "payload bytes");
    assert_eq!(json["body_len"], 13);
}

#[tokio::test]
async fn a_thousand_requests_at_64_concurrent_all_succeed() {
    let host = Host::new();
    let hello = host.serve("hello", limits(|l| l.concurrency = 64)).await;
    let url = format!("{}/", hello.url);
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..64 {
        let client = host.client.clone();
        let url = url.clone();
        tasks.spawn(async move {
            let mut failures = Vec::new();
            for _ in (worker..1000).step_by(64) {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        let body = r.text().await.unwrap_or_default();
                        if body != "Hello from Wharf!\n" {
                            failures.push(format!("body {body:?}"));
                        }
                    }
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(format!("error {e}")),
                }
            }
            failures
        });
    }
    let mut failures = Vec::new();
    while let Some(result) = tasks.join_next().await {
        failures.extend(result.expect("worker finishes"));
    }
    assert!(failures.is_empty(), "{} failures, first: {:?}", failures.len(), failures.first());
    assert_eq!(hello.workload.load().requests, 1000);
}

#[tokio::test]
async fn spin_past_its_fuel_budget_is_stopped_and_hello_answers_right_after() {
    let host = Host::new();
    let spin = host.serve("spin", limits(|l| l.fuel = Some(5_000_000))).await;
    let hello = host.serve("hello", |_| {}).await;
    // A modest loop fits in the budget.
    let (status, _, body) = host.get(&format!("{}/?n=1000", spin.url)).await;
    assert_eq!((status, body.starts_with("spun 1000 iterations")), (200, true), "{body}");
    let (status, error, body) = host.get(&format!("{}/?n=100000000000", spin.url)).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(error.as_deref(), Some("fuel_exhausted"));
    assert!(body.contains("fuel"), "{body}");
    assert_eq!(host.get(&format!("{}/", hello.url)).await.0, 200);
    assert_eq!(host.get(&format!("{}/?n=10", spin.url)).await.0, 200, "the same workload serves the next request");
    let metrics = host.metrics.encode();
    assert!(metrics.contains(r#"wharf_requests_total{service="test/spin",outcome="fuel_exhausted"} 1"#), "{metrics}");
}

#[tokio::test]
async fn spin_past_its_deadline_gets_504() {
    let host = Host::new();
    let spin = host.serve("spin", limits(|l| {
        l.fuel = None;
        l.timeout = Duration::from_millis(200);
    }))
    .await;
    let started = std::time::Instant::now();
    let (status, error, body) = host.get(&format!("{}/?n=100000000000", spin.url)).await;
    assert_eq!((status, error.as_deref()), (504, Some("deadline")), "{body}");
    assert!(started.elapsed() < Duration::from_secs(3), "interrupted near the deadline, took {:?}", started.elapsed());
    assert_eq!(host.get(&format!("{}/?n=10", spin.url)).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_spinning_at_full_concurrency_does_not_hold_up_another_tenants_requests() {
    let host = Host::new();
    let spin = host
        .serve("spin", |spec| {
            spec.service = "noisy/spin".into();
            spec.limits.concurrency = 8;
            spec.limits.fuel = None;
            spec.limits.timeout = Duration::from_secs(4);
        })
        .await;
    let hello = host.serve("hello", |spec| spec.service = "quiet/hello".into()).await;
    let demoted_before = host.runtime.demoted_requests();
    // Eight requests that would spin far past their deadline: more than the cores.
    let mut spinning = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let client = host.client.clone();
        let url = format!("{}/?n=10000000000000", spin.url);
        spinning.spawn(async move {
            let response = client.get(url).send().await.expect("answered");
            (response.status().as_u16(), response.headers().get("x-wharf-error").map(|v| v.to_str().unwrap_or("?").to_string()))
        });
    }
    let waiting = std::time::Instant::now();
    while spin.workload.load().in_flight < 8 {
        assert!(waiting.elapsed() < Duration::from_secs(3), "the spinning requests never all arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..50 {
        assert_eq!(host.get(&format!("{}/", hello.url)).await.0, 200);
    }
    assert_eq!(spin.workload.load().in_flight, 8, "all 50 hello requests were answered while every spinning request was still running");
    assert!(
        host.runtime.demoted_requests() >= demoted_before + 8,
        "the long requests moved to the background pool ({} demoted)",
        host.runtime.demoted_requests() - demoted_before
    );
    // The spinners, held back, still end at their deadline with its error.
    while let Some(result) = spinning.join_next().await {
        assert_eq!(result.expect("spinning request"), (504, Some("deadline".to_string())));
    }
    let metrics = host.metrics.encode();
    assert!(metrics.contains(r#"wharf_background_requests_total{service="noisy/spin"} 8"#), "{metrics}");
    assert!(!metrics.contains(r#"wharf_background_requests_total{service="quiet/hello"} "#) || metrics.contains(r#"wharf_background_requests_total{service="quiet/hello"} 0"#), "{metrics}");
}

#[tokio::test]
async fn a_request_stuck_in_a_host_call_is_cut_at_the_deadline() {
    let host = Host::new();
    let sleep = host.serve("sleep", limits(|l| l.timeout = Duration::from_millis(200))).await;
    assert_eq!(host.get(&format!("{}/?ms=10", sleep.url)).await.2, "slept 10 ms\n");
    let (status, error, _) = host.get(&format!("{}/?ms=10000", sleep.url)).await;
    assert_eq!((status, error.as_deref()), (504, Some("deadline")));
}

#[tokio::test]
async fn hog_past_the_memory_cap_gets_the_memory_error() {
    let host = Host::new();
    let hog = host.serve("hog", limits(|l| l.memory = ByteSize::mib(32))).await;
    assert_eq!(host.get(&format!("{}/?mb=4", hog.url)).await.2, "allocated 4 MiB\n");
    let (status, error, body) = host.get(&format!("{}/?mb=100", hog.url)).await;
    assert_eq!((status, error.as_deref()), (500, Some("memory_limit")), "{body}");
    assert!(body.contains("32 MiB") || body.contains("32MiB"), "names the cap: {body}");
    assert_eq!(host.get(&format!("{}/?mb=4", hog.url)).await.0, 200, "the next request is served");
}

#[tokio::test]
async fn panic_gets_a_500_and_the_next_request_works() {
    let host = Host::new();
    let panic = host.serve("panic", |_| {}).await;
    let hello = host.serve("hello", |_| {}).await;
    for _ in 0..2 {
        let (status, error, body) = host.get(&format!("{}/", panic.url)).await;
        assert_eq!((status, error.as_deref()), (500, Some("trap")), "{body}");
        assert_eq!(host.get(&format!("{}/", hello.url)).await.0, 200);
    }
    let logs = panic.workload.logs().recent();
    assert!(logs.iter().any(|l| l.line.contains("about to panic")), "stderr captured: {logs:?}");
    assert!(logs.iter().any(|l| l.line.contains("deliberate panic")), "panic message captured: {logs:?}");
}

#[tokio::test]
async fn a_full_workload_answers_503_with_retry_after() {
    let host = Host::new();
    let sleep = host.serve("sleep", limits(|l| {
        l.concurrency = 1;
        l.queue_timeout = Duration::from_millis(100);
    }))
    .await;
    let slow = tokio::spawn({
        let client = host.client.clone();
        let url = format!("{}/?ms=1500", sleep.url);
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = host.client.get(format!("{}/?ms=1", sleep.url)).send().await.expect("answered");
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers().get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]));
    assert_eq!(response.headers().get("x-wharf-error").map(|v| v.as_bytes()), Some(&b"overloaded"[..]));
    assert_eq!(slow.await.expect("joins").expect("answered"), 200, "the request holding the slot finishes");
}

/// The host's instance slots are shared by all its replicas: with every
/// one busy, another replica's request (its own slots free) waits its queue
/// timeout and gets 503 `host_instances_full` naming the host's limit,
/// never a failed instantiation; once a slot comes free it is served.
#[tokio::test]
async fn a_full_host_pool_answers_503_naming_the_host_limit_and_frees_with_its_instances() {
    let runtime = Runtime::new(RuntimeConfig { max_instances: 2, max_instance_memory: ByteSize::mib(64), cache_dir: None, ..RuntimeConfig::default() }).expect("runtime starts");
    let host = Host::with_runtime(runtime);
    let sleep = host.serve("sleep", limits(|l| l.concurrency = 2)).await;
    let hello = host.serve("hello", limits(|l| {
        l.concurrency = 2;
        l.queue_timeout = Duration::from_millis(200);
    }))
    .await;
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let client = host.client.clone();
            let url = format!("{}/?ms=2500", sleep.url);
            tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    let started = std::time::Instant::now();
    while host.runtime.instances_running() < 2 {
        assert!(started.elapsed() < Duration::from_secs(10), "the slow requests never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, error, body) = host.get(&hello.url).await;
    assert_eq!((status, error.as_deref()), (503, Some("host_instances_full")), "{body}");
    assert!(body.contains("2 instances at once (--max-instances)"), "{body}");
    for request in slow {
        assert_eq!(request.await.expect("joins").expect("answered"), 200, "the requests holding the slots finish");
    }
    // The client reads the end of a body just before the server task drops
    // the instance that wrote it, so its slot comes back a moment later.
    let finished = std::time::Instant::now();
    while host.runtime.instances_running() > 0 {
        assert!(finished.elapsed() < Duration::from_secs(5), "their slots never came back: {} still held", host.runtime.instances_running());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, _, body) = host.get(&hello.url).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn outbound_calls_are_denied_unless_allowed() {
    // The backend listens on loopback, which hosts refuse unless the admin
    // allows it: this host does.
    let host = Host::with(RuntimeConfig { private_egress: PrivateEgress::parse("127.0.0.0/8").expect("range"), ..RuntimeConfig::default() });
    let backend = host.serve("backend", |_| {}).await;
    let backend_authority = backend.url.trim_start_matches("http://").to_string();
    let denied = host.serve("frontend", |spec| spec.env = vec![("BACKEND_URL".into(), backend.url.clone())]).await;
    let (status, _, body) = host.get(&format!("{}/x", denied.url)).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.to_lowercase().contains("denied"), "{body}");
    let notes = denied.workload.logs().recent();
    assert!(notes.iter().any(|l| l.line.contains("127.0.0.1") && l.line.contains("denied")), "{notes:?}");

    let allowed = host
        .serve("frontend", |spec| {
            spec.env = vec![("BACKEND_URL".into(), backend.url.clone())];
            spec.egress = EgressPolicy::allow([backend_authority]);
        })
        .await;
    let (status, _, body) = host.get(&format!("{}/x", allowed.url)).await;
    assert_eq!((status, body.as_str()), (200, "frontend got: backend ok /x\n"));
}

#[tokio::test]
async fn an_allowed_name_that_resolves_to_loopback_is_refused_after_resolution() {
    // A real backend on loopback, reachable in principle.
    let open = Host::with(RuntimeConfig { private_egress: PrivateEgress::parse("127.0.0.1").expect("range"), ..RuntimeConfig::default() });
    let backend = open.serve("backend", |_| {}).await;
    let port = backend.url.rsplit(':').next().expect("port").to_string();
    // `localhost` resolves to 127.0.0.1 through /etc/hosts; the allow-list
    // lets the name through, the address check after resolution does not.
    let via_name = format!("http://localhost:{port}");
    let host = Host::new();
    let frontend = host
        .serve("frontend", |spec| {
            spec.env = vec![("BACKEND_URL".into(), via_name.clone())];
            spec.egress = EgressPolicy::allow([format!("localhost:{port}")]);
        })
        .await;
    let (status, _, body) = host.get(&format!("{}/x", frontend.url)).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.to_lowercase().contains("prohibited"), "the guest gets a clear egress error: {body}");
    let notes = frontend.workload.logs().recent();
    assert!(
        notes.iter().any(|l| l.line.contains("localhost resolves to 127.0.0.1") && l.line.contains("loopback") && l.line.contains("--allow-private-egress")),
        "{notes:?}"
    );
    // The same name through a host whose admin allows loopback reaches the backend.
    let allowed = open
        .serve("frontend", |spec| {
            spec.env = vec![("BACKEND_URL".into(), via_name.clone())];
            spec.egress = EgressPolicy::allow([format!("localhost:{port}")]);
        })
        .await;
    let (status, _, body) = open.get(&format!("{}/x", allowed.url)).await;
    assert_eq!((status, body.as_str()), (200, "frontend got: backend ok /x\n"));
}

#[tokio::test]
async fn metrics_report_requests_latency_and_instantiation() {
    let host = Host::new();
    let hello = host.serve("hello", |_| {}).await;
    for _ in 0..3 {
        host.get(&format!("{}/", hello.url)).await;
    }
    // Metrics are on the admin listener; on the ingress /metrics is the component's.
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let admin_url = format!("http://{}", admin.local_addr().expect("local addr"));
    tokio::spawn(wharf_host::admin::serve(admin, wharf_edge::ServerConfig::default(), host.metrics.clone(), std::future::pending()));
    let (status, _, body) = host.get(&format!("{}/metrics", hello.url)).await;
    assert_eq!((status, body.as_str()), (200, "Hello from Wharf!\n"), "the component answers /metrics on the ingress");
    let (status, _, text) = host.get(&format!("{admin_url}/metrics")).await;
    assert_eq!(status, 200);
    for needle in [
        r#"wharf_requests_total{service="test/hello",outcome="ok"} 4"#,
        r#"wharf_request_duration_seconds_count{service="test/hello"} 4"#,
        r#"wharf_instantiation_seconds_count{service="test/hello"} 4"#,
        "wharf_requests_in_flight",
        "wharf_fuel_consumed",
        "wharf_instance_memory_peak_bytes",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
}

#[test]
fn garbage_core_modules_and_the_wrong_world_are_refused_by_name() {
    let host = Host::new();
    let refused = |bytes: &[u8]| host.runtime.load(bytes, None).expect_err("refused");

    let garbage = refused(b"definitely not wasm");
    assert!(matches!(garbage, LoadError::NotWasm { .. }), "{garbage}");
    assert!(garbage.to_string().contains("magic"), "{garbage}");

    let module = wat::parse_str("(module (func (export \"f\")))").expect("wat");
    let core = refused(&module);
    assert!(matches!(core, LoadError::CoreModule), "{core}");
    assert!(core.to_string().contains("core WebAssembly module"), "{core}");

    // A command (`fn main`) loads: it runs as a job, and serves no HTTP.
    let command = host.runtime.load(&samples::bytes("notcomponent"), None).expect("a command loads");
    assert!(command.runs_to_completion() && !command.handles_http() && !command.handles_messages());
    let nothing = wat::parse_str("(component)").expect("wat");
    let world = refused(&nothing);
    assert!(matches!(world, LoadError::WrongWorld { .. }), "{world}");
    let text = world.to_string();
    assert!(text.contains("wasi:http/incoming-handler") && text.contains("wasi:cli/run"), "{text}");

    let missing = wat::parse_str(r#"(component (import "acme:missing/api@1.0.0" (instance (export "ping" (func)))))"#).expect("wat");
    let import = refused(&missing);
    assert!(matches!(import, LoadError::UnsupportedImport { .. }), "{import}");
    assert!(import.to_string().contains("acme:missing/api@1.0.0"), "{import}");

    let mut truncated = samples::bytes("hello");
    truncated.truncate(truncated.len() / 2);
    let invalid = refused(&truncated);
    assert!(matches!(invalid, LoadError::Invalid(_)), "{invalid}");
}

#[test]
fn a_digest_given_with_the_bytes_is_verified() {
    let host = Host::new();
    let bytes = samples::bytes("hello");
    let right = Digest::of(&bytes);
    assert_eq!(host.runtime.load(&bytes, Some(&right)).expect("loads").digest, right);
    let wrong = Digest::of(b"something else");
    let error = host.runtime.load(&bytes, Some(&wrong)).expect_err("refused");
    assert!(matches!(error, LoadError::DigestMismatch { .. }), "{error}");
    assert!(error.to_string().contains(&wrong.to_string()), "{error}");
}

#[tokio::test]
async fn refused_loads_leave_running_workloads_serving() {
    let host = Host::new();
    let hello = host.serve("hello", |_| {}).await;
    let no_export = wat::parse_str("(component)").expect("wat");
    for bad in [b"junk".to_vec(), no_export] {
        assert!(host.runtime.load(&bad, None).is_err());
        assert_eq!(host.get(&format!("{}/", hello.url)).await.0, 200);
    }
}

#[test]
fn compiled_code_is_cached_on_disk_by_digest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = || RuntimeConfig { max_instances: 4, max_instance_memory: ByteSize::mib(64), cache_dir: Some(dir.path().into()), ..RuntimeConfig::default() };
    let bytes = samples::bytes("hello");
    let first = Runtime::new(config()).expect("runtime");
    let loaded = first.load(&bytes, None).expect("loads");
    assert!(!loaded.cached, "first load compiles");
    assert!(first.has_compiled(&loaded.digest));
    let files: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").flatten().map(|e| e.file_name()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].to_string_lossy().starts_with(&loaded.digest.hex()), "{files:?}");
    // A second runtime (a restart) finds it on disk and does not compile.
    let second = Runtime::new(config()).expect("runtime");
    assert!(second.load(&bytes, None).expect("loads").cached);
    // A corrupt cache file is ignored and replaced, not trusted.
    let path = dir.path().join(&files[0]);
    std::fs::write(&path, b"corrupt").expect("write");
    let third = Runtime::new(config()).expect("runtime");
    let reloaded = third.load(&bytes, None).expect("loads despite a corrupt cache");
    assert!(!reloaded.cached);
}

/// The files in a compile cache directory, by name, sorted.
fn cache_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).expect("dir").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[tokio::test]
async fn evicted_code_is_reloaded_from_disk_without_compiling_and_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    // One byte: only the most recently used component stays in memory.
    let runtime = Runtime::new(RuntimeConfig {
        max_instances: 8,
        max_instance_memory: ByteSize::mib(64),
        cache_dir: Some(dir.path().into()),
        code_cache: ByteSize(1),
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let host = Host::with_runtime(runtime.clone());
    let hello = runtime.load(&samples::bytes("hello"), None).expect("hello loads");
    let echo = runtime.load(&samples::bytes("echo"), None).expect("echo loads");
    let stats = runtime.code_cache_stats();
    assert_eq!((stats.compiles, stats.evictions, stats.entries), (2, 1, 1), "{stats:?}");
    assert!(stats.bytes > 0, "the held component is counted: {stats:?}");
    assert_eq!(runtime.compiled_digests(), vec![echo.digest.clone()]);
    assert!(runtime.has_compiled(&hello.digest), "still on disk");
    drop(hello);

    // The first request for hello after the eviction: from disk, not compiled.
    let digest = Digest::of(&samples::bytes("hello"));
    let reloaded = runtime.load_compiled(&digest).expect("on disk").expect("loads");
    assert!(reloaded.cached);
    let stats = runtime.code_cache_stats();
    assert_eq!((stats.compiles, stats.disk_loads, stats.evictions), (2, 1, 2), "{stats:?}");
    let served = host.serve_loaded("hello", reloaded, |_| {}).await;
    let (status, _, body) = host.get(&format!("{}/", served.url)).await;
    assert_eq!(status, 200);
    assert!(body.contains("Hello"), "{body}");

    // Loading with the bytes also prefers the disk over compiling.
    assert!(runtime.load(&samples::bytes("echo"), None).expect("echo loads").cached);
    assert_eq!(runtime.code_cache_stats().compiles, 2);
    let metrics = host.metrics.encode();
    for name in ["wharf_code_cache_hits_total", "wharf_code_cache_misses_total 4", "wharf_code_cache_disk_loads_total 2", "wharf_code_cache_compiles_total 2", "wharf_code_cache_evictions_total 3", "wharf_code_cache_bytes"] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
}

#[test]
fn concurrent_loads_of_one_digest_compile_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = Runtime::new(RuntimeConfig { max_instances: 8, max_instance_memory: ByteSize::mib(64), cache_dir: Some(dir.path().into()), ..RuntimeConfig::default() })
        .expect("runtime");
    let bytes = Arc::new(samples::bytes("hello"));
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let loads: Vec<_> = (0..8)
        .map(|_| {
            let (runtime, bytes, barrier) = (runtime.clone(), bytes.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                runtime.load(&bytes, None).map(|loaded| loaded.digest)
            })
        })
        .collect();
    for load in loads {
        assert_eq!(load.join().expect("no panic").expect("loads"), Digest::of(&bytes));
    }
    let stats = runtime.code_cache_stats();
    assert_eq!(stats.compiles, 1, "{stats:?}");
    assert_eq!(stats.hits + stats.misses, 8, "{stats:?}");
    assert_eq!(cache_files(dir.path()).len(), 1, "one compiled file, no temporary ones: {:?}", cache_files(dir.path()));
}

#[test]
fn hosts_sharing_a_cache_directory_never_write_the_same_temporary_file() {
    // Two runtimes (two host processes, say) compile the same component at
    // once into one directory; each must write a complete file.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = || RuntimeConfig { max_instances: 4, max_instance_memory: ByteSize::mib(64), cache_dir: Some(dir.path().into()), ..RuntimeConfig::default() };
    let bytes = Arc::new(samples::bytes("spin"));
    let barrier = Arc::new(std::sync::Barrier::new(4));
    let loads: Vec<_> = (0..4)
        .map(|_| {
            let runtime = Runtime::new(config()).expect("runtime");
            let (bytes, barrier) = (bytes.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                // A precompile and a load race in each runtime too.
                let precompiled = runtime.precompile(&bytes, &Digest::of(&bytes));
                let loaded = runtime.load(&bytes, None);
                (precompiled.map(|_| ()), loaded.map(|_| ()))
            })
        })
        .collect();
    for load in loads {
        let (precompiled, loaded) = load.join().expect("no panic");
        precompiled.expect("precompiles");
        loaded.expect("loads");
    }
    let files = cache_files(dir.path());
    assert_eq!(files.len(), 1, "one compiled file, no temporary ones: {files:?}");
    let fresh = Runtime::new(config()).expect("runtime");
    assert!(fresh.load(&bytes, None).expect("the cached file is whole").cached);
    assert_eq!(fresh.code_cache_stats().disk_loads, 1);
}

/// Sends raw bytes to the server and returns the status line it answers with.
async fn raw_status(url: &str, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = stream.write_all(request).await;
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer)).await.expect("answered in time").expect("read");
    String::from_utf8_lossy(&answer[..n]).lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn oversized_heads_and_bodies_are_refused_before_the_component_runs() {
    let host = Host::new();
    let echo = host.serve("echo", |_| {}).await;
    let huge_header = format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(100 * 1024));
    let status = raw_status(&echo.url, huge_header.as_bytes()).await;
    assert!(status.contains("431"), "{status}");
    let huge_body = format!("POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", ingress::MAX_BODY + 1);
    let status = raw_status(&echo.url, huge_body.as_bytes()).await;
    assert!(status.contains("413"), "{status}");
    assert_eq!(echo.workload.load().requests, 0, "the component never ran");
    // Within the limits, all is served.
    assert_eq!(host.get(&format!("{}/", echo.url)).await.0, 200);
}

#[tokio::test]
async fn key_value_calls_are_bounded_by_the_host_limits() {
    use wharf_host::keyvalue::{KeyValueAccess, KeyValueLimits};
    let limits = KeyValueLimits { page_keys: 10, batch_keys: 5, batch_bytes: 1024 };
    let host = Host::with(RuntimeConfig { keyvalue: limits, ..RuntimeConfig::default() });
    let bus = wharf_bus::Bus::local(wharf_bus::LocalStore::in_memory().expect("store"));
    let counter = host.serve("counter", |spec| spec.keyvalue = Some(KeyValueAccess::new(bus.clone(), "test", "counter", ["counter".to_string()]))).await;
    for i in 0..25 {
        let response = host.client.put(format!("{}/set?key=k{i:02}", counter.url)).body(vec![b'v'; 600]).send().await.expect("answered");
        assert_eq!(response.status(), 200);
    }
    // list-keys: pages of 10 with a cursor, every key once.
    let (status, _, body) = host.get(&format!("{}/keys", counter.url)).await;
    assert_eq!(status, 200, "{body}");
    let mut lines = body.lines();
    assert_eq!(lines.next(), Some("pages: 3"), "{body}");
    assert_eq!(lines.collect::<Vec<_>>(), (0..25).map(|i| format!("k{i:02}")).collect::<Vec<_>>());
    // get-many: at most 5 keys, at most 1 KiB of values.
    let (status, _, body) = host.get(&format!("{}/many?keys=k00", counter.url)).await;
    assert_eq!((status, body.as_str()), (200, "found 1\n"));
    let (status, _, body) = host.get(&format!("{}/many?keys=k00,k01,k02,k03,k04,k05", counter.url)).await;
    assert!(status == 500 && body.contains("6 keys in one call") && body.contains("at most 5"), "{body}");
    let (status, _, body) = host.get(&format!("{}/many?keys=k00,k01", counter.url)).await;
    assert!(status == 500 && body.contains("more than 1KiB"), "two 600-byte values pass the budget: {body}");
    // A key past 1 KiB is refused in the guest, before the bus.
    let (status, _, body) = host.get(&format!("{}/get?key={}", counter.url, "k".repeat(1025))).await;
    assert!(status == 500 && body.contains("1025 bytes"), "{body}");
}
