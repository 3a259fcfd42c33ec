//! `wharf up` and the client commands end to end: the real binary, a real
//! data directory, real components, over loopback.

use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use wharf_testkit::wharf::Up;
use wharf_testkit::samples;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

fn start(data_dir: &Path) -> Up {
    Up::start(Path::new(WHARF), data_dir, &["--host-id", "test-host"])
}

fn services(up: &Up) -> Value {
    serde_json::from_str(&up.ok(&["get", "services", "-o", "json"])).expect("json")
}

async fn curl(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.expect("answered");
    (response.status().as_u16(), response.text().await.expect("body"))
}

/// Polls until `url` answers with `status` and `body`, or panics after 30 s.
async fn eventually(url: &str, status: u16, body_contains: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = curl(url).await;
        if got.0 == status && got.1.contains(body_contains) {
            return;
        }
        assert!(Instant::now() < deadline, "{url}: expected {status} with {body_contains:?}, last got {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn path(sample: &str) -> String {
    samples::path(sample).to_str().expect("utf-8").to_string()
}

#[tokio::test]
async fn deploy_curl_scale_delete_and_redeploy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = start(dir.path());
    let out = up.ok(&["deploy", &path("hello"), "--name", "web", "--route", "/web"]);
    assert!(out.contains("created default/web: revision 1") && out.contains("default/web: rolled out"), "{out}");
    assert_eq!(curl(&format!("{}/web", up.ingress)).await, (200, "Hello from Wharf!\n".to_string()));

    up.ok(&["scale", "web", "3"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let services = services(&up);
        let status = &services[0]["status"];
        if status["ready"] == 3 {
            assert_eq!(status["desired"], 3);
            assert_eq!(status["replicas"].as_array().map(Vec::len), Some(3), "{services}");
            break;
        }
        assert!(Instant::now() < deadline, "never 3 ready: {services}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let table = up.ok(&["get", "services"]);
    assert!(table.contains("default/web") && table.contains("3/3") && table.contains("/web"), "{table}");
    assert_eq!(curl(&format!("{}/web", up.ingress)).await.0, 200);

    up.ok(&["delete", "web"]);
    eventually(&format!("{}/web", up.ingress), 404, "no service is routed at /web").await;
    let (ok, text) = up.wharf(&["get", "services", "web"]);
    assert!(!ok && text.contains("not found"), "{text}");

    // A new version under the same name replaces the old one.
    up.ok(&["deploy", &path("backend"), "--name", "web", "--route", "/web"]);
    assert_eq!(curl(&format!("{}/web/x", up.ingress)).await, (200, "backend ok /web/x\n".to_string()));
    up.ok(&["deploy", &path("hello"), "--name", "web", "--route", "/web", "--env", "GREETING=v3"]);
    eventually(&format!("{}/web", up.ingress), 200, "v3").await;

    // Service to service: frontend calls http://backend, which this cluster routes.
    up.ok(&["deploy", &path("backend"), "--name", "backend"]);
    up.ok(&["deploy", &path("frontend"), "--name", "frontend", "--route", "/frontend"]);
    assert_eq!(curl(&format!("{}/frontend/x", up.ingress)).await, (200, "frontend got: backend ok /frontend/x\n".to_string()));

    let hosts = up.ok(&["get", "hosts"]);
    assert!(hosts.contains("test-host") && hosts.contains("yes"), "{hosts}");
}

#[tokio::test]
async fn state_survives_kill_9_and_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut up = start(dir.path());
    up.ok(&["deploy", &path("hello"), "--name", "hello", "--route", "/hello", "--env", "GREETING=persisted"]);
    up.ok(&["deploy", &path("echo"), "--name", "echo", "--namespace", "other", "--route", "/echo"]);
    up.process.kill();

    let mut up = start(dir.path());
    eventually(&format!("{}/hello", up.ingress), 200, "persisted").await;
    eventually(&format!("{}/echo", up.ingress), 200, "\"path\": \"/echo\"").await;
    let status = up.process.terminate(Duration::from_secs(15));
    assert!(status.success(), "clean exit on SIGTERM: {status}");

    let up = start(dir.path());
    eventually(&format!("{}/hello", up.ingress), 200, "persisted").await;
    let services = up.ok(&["get", "services"]);
    assert!(services.contains("default/hello") && services.contains("other/echo"), "{services}");
}

#[tokio::test]
async fn bad_manifests_are_refused_by_name_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = start(&dir.path().join("data"));
    let hello = path("hello");
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"this is not a component").expect("write");
    let cases = [
        ("unknown.yaml", format!("name: a\ncomponent: {{ file: {hello} }}\nreplicaz: 2\n"), "replicaz"),
        ("noname.yaml", format!("component: {{ file: {hello} }}\n"), "name"),
        ("negative.toml", format!("name = \"a\"\nreplicas = -1\n[component]\nfile = \"{hello}\"\n"), "replicas"),
        ("badmem.yaml", format!("name: a\ncomponent: {{ file: {hello} }}\nlimits: {{ memory: lots }}\n"), "limits.memory"),
        ("notwasm.yaml", format!("name: a\ncomponent: {{ file: {} }}\n", garbage.display()), "not a WebAssembly component"),
        ("missing.yaml", "name: a\ncomponent: { file: nowhere.wasm }\n".to_string(), "does not exist"),
        (
            "second-bad.yaml",
            format!("services:\n  - name: good\n    component: {{ file: {hello} }}\n  - name: Bad_Name\n    component: {{ file: {hello} }}\n"),
            "services[1].name",
        ),
    ];
    for (file, text, expected) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, text).expect("write");
        let (ok, out) = up.wharf(&["apply", "-f", path.to_str().expect("utf-8")]);
        assert!(!ok, "{file} must be refused");
        assert!(out.contains(expected), "{file}: expected {expected:?} in: {out}");
    }
    let services = services(&up);
    assert_eq!(services, serde_json::json!([]), "nothing was applied");

    // A good manifest applies, and applying it again changes nothing.
    let good = dir.path().join("good.toml");
    std::fs::write(&good, format!("[[services]]\nname = \"a\"\nreplicas = 2\nroutes = [{{ path_prefix = \"/a\" }}]\n[services.component]\nfile = \"{hello}\"\n")).expect("write");
    let out = up.ok(&["apply", "-f", good.to_str().expect("utf-8")]);
    assert!(out.contains("default/a created"), "{out}");
    let out = up.ok(&["apply", "-f", good.to_str().expect("utf-8")]);
    assert!(out.contains("default/a unchanged"), "{out}");
    assert_eq!(curl(&format!("{}/a", up.ingress)).await.0, 200);
}

#[tokio::test]
async fn the_api_refuses_bad_requests_with_json_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = start(dir.path());
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {}", up.token).parse().expect("header"));
    let http = reqwest::Client::builder().default_headers(headers).build().expect("client");
    let api = &up.api;

    // A command uploads (it can run as a job), but a service of it is refused by the export it lacks.
    let command: Value = http.post(format!("{api}/v1/artifacts")).body(samples::bytes("notcomponent")).send().await.expect("answered").json().await.expect("json");
    let command = command["digest"].as_str().expect("digest").to_string();
    let refused = http.put(format!("{api}/v1/namespaces/default/services/cmd")).json(&serde_json::json!({"component": command})).send().await.expect("answered");
    assert_eq!(refused.status(), 422);
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["code"], "invalid_component");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("wasi:http/incoming-handler"), "{body}");
    let garbage = http.post(format!("{api}/v1/artifacts")).body(&b"\0asm\x0d\0\x01\0"[..]).send().await.expect("answered");
    assert_eq!(garbage.status(), 422, "a component exporting nothing is refused at upload");

    let uploaded: Value = http.post(format!("{api}/v1/artifacts")).body(samples::bytes("hello")).send().await.expect("answered").json().await.expect("json");
    let digest = uploaded["digest"].as_str().expect("digest").to_string();
    let url = format!("{api}/v1/namespaces/default/services/web");

    let oversized = http.put(&url).body(vec![b' '; 2 << 20]).send().await.expect("answered");
    assert_eq!(oversized.status(), 413, "a 2 MiB spec is refused");
    let bad_json = http.put(&url).body("{not json").send().await.expect("answered");
    assert_eq!(bad_json.status(), 400);
    let unknown = http.put(&url).json(&serde_json::json!({"component": "sha256:nothex", "name": "web"})).send().await.expect("answered");
    assert_eq!(unknown.status(), 400, "a malformed digest");
    let missing = http.put(&url).json(&serde_json::json!({"component": format!("sha256:{}", "ab".repeat(32))})).send().await.expect("answered");
    assert_eq!(missing.status(), 422);
    assert!(missing.text().await.expect("body").contains("POST its bytes to /v1/namespaces/default/artifacts"));
    let mismatch = http.put(&url).json(&serde_json::json!({"component": digest, "name": "other"})).send().await.expect("answered");
    assert_eq!(mismatch.status(), 400);

    let created = http.put(&url).json(&serde_json::json!({"component": digest})).send().await.expect("answered");
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.expect("json");
    let revision = created["service"]["revision"].as_u64().expect("revision");
    let updated = http.put(&url).header("if-match", revision.to_string()).json(&serde_json::json!({"component": digest, "replicas": 2})).send().await.expect("answered");
    assert_eq!(updated.status(), 200);
    let stale = http.put(&url).header("if-match", revision.to_string()).json(&serde_json::json!({"component": digest, "replicas": 3})).send().await.expect("answered");
    assert_eq!(stale.status(), 409, "a stale revision is refused");
    let current: Value = http.get(&url).send().await.expect("answered").json().await.expect("json");
    assert_eq!(current["service"]["spec"]["replicas"], 2, "the refused write changed nothing");

    let nowhere = http.get(format!("{api}/v1/nowhere")).send().await.expect("answered");
    assert_eq!(nowhere.status(), 404);
    let body: Value = nowhere.json().await.expect("json");
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(http.get(format!("{api}/healthz")).send().await.expect("answered").status(), 200);
}

#[tokio::test]
async fn tokens_are_required_and_scoped_to_namespaces_and_roles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = start(dir.path());
    let token_file = dir.path().join("admin-token");
    assert!(up.token.starts_with("wharf_"), "an admin token was created on first start");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).expect("token file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "only the operator can read the admin token");
    }
    let api = &up.api;
    let anonymous = reqwest::Client::new();
    let no_token = anonymous.get(format!("{api}/v1/services")).send().await.expect("answered");
    assert_eq!(no_token.status(), 401);
    let body: Value = no_token.json().await.expect("json");
    assert_eq!(body["error"]["code"], "unauthenticated");
    let bad = anonymous.get(format!("{api}/v1/services")).bearer_auth("wharf_0123456789ab_nope").send().await.expect("answered");
    assert_eq!(bad.status(), 401);
    assert_eq!(anonymous.get(format!("{api}/healthz")).send().await.expect("answered").status(), 200);

    // Tokens bound to namespace `shop`: one read-only, one read-write.
    let reader = up.ok(&["token", "create", "-n", "shop"]).trim().to_string();
    let writer = up.ok(&["token", "create", "-n", "shop", "--write"]).trim().to_string();
    let hello = samples::path("hello");
    let hello = hello.to_str().expect("utf-8");
    let as_token = |token: &str, args: &[&str]| {
        let output = std::process::Command::new(WHARF).args(args).env("WHARF_API", api).env("WHARF_TOKEN", token).output().expect("runs");
        (output.status.success(), format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)))
    };
    let (ok, out) = as_token(&writer, &["deploy", hello, "--name", "web", "--namespace", "shop", "--no-wait"]);
    assert!(ok, "a write token deploys in its namespace: {out}");
    let (ok, out) = as_token(&writer, &["deploy", hello, "--name", "web", "--namespace", "other", "--no-wait"]);
    assert!(!ok && out.contains("only in namespace(s) shop, not other"), "wrong namespace: {out}");
    let (ok, out) = as_token(&reader, &["scale", "shop/web", "2"]);
    assert!(!ok && out.contains("may only read"), "read-only token writing: {out}");
    let (ok, out) = as_token(&reader, &["get", "services", "shop/web"]);
    assert!(ok && out.contains("shop/web"), "a read token reads: {out}");
    let (ok, out) = as_token(&writer, &["namespace", "set", "shop", "--max-replicas", "100"]);
    assert!(!ok && out.contains("only admin tokens set namespace quotas"), "{out}");
    let (ok, out) = as_token(&reader, &["token", "create", "--admin"]);
    assert!(!ok && out.contains("only admin tokens"), "{out}");
    let raw = anonymous.delete(format!("{api}/v1/namespaces/shop/services/web")).bearer_auth(&reader).send().await.expect("answered");
    assert_eq!(raw.status(), 403);
}

#[tokio::test]
async fn namespace_quotas_refuse_with_the_quota_and_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = start(dir.path());
    up.ok(&["namespace", "set", "shop", "--max-replicas", "3", "--max-memory", "300MiB", "--max-rps", "5"]);
    let hello = samples::path("hello");
    let hello = hello.to_str().expect("utf-8");
    // 2 replicas requesting 64 MiB each = 128 MiB: within both quotas.
    up.ok(&["deploy", hello, "--name", "web", "-n", "shop", "--route", "/shop", "--replicas", "2", "--memory", "16MiB", "--concurrency", "4", "--memory-request", "64MiB"]);
    let (ok, out) = up.wharf(&["scale", "shop/web", "4"]);
    assert!(!ok && out.contains("quota replicas=3 exceeded") && out.contains("asks for 4"), "{out}");
    let (ok, out) = up.wharf(&["deploy", hello, "--name", "big", "-n", "shop", "--memory", "64MiB", "--concurrency", "4", "--memory-request", "256MiB", "--no-wait"]);
    assert!(!ok && out.contains("quota memory=300MiB exceeded") && out.contains("reserve 128MiB"), "{out}");
    let usage: Value = serde_json::from_str(&up.ok(&["namespace", "get", "shop"])).expect("json");
    assert_eq!(usage["usage"]["replicas"], 2, "refused changes changed nothing: {usage}");

    // The ingress holds the namespace to 5 requests/s (bursts of 5): of 20
    // sent at once, about 5 are served and the rest get 429.
    let client = reqwest::Client::new();
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (client, url) = (client.clone(), format!("{}/shop", up.ingress));
        burst.spawn(async move {
            let response = client.get(url).send().await.expect("answered");
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        });
    }
    let mut statuses = Vec::new();
    while let Some(result) = burst.join_next().await {
        let (status, body) = result.expect("task");
        if status == 429 {
            assert!(body.contains("quota of 5 requests/s"), "{body}");
        }
        statuses.push(status);
    }
    let served = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(served >= 5 && limited >= 5 && served + limited == 20, "{statuses:?}");
    // Another namespace is not limited.
    up.ok(&["deploy", hello, "--name", "free", "--route", "/free"]);
    for _ in 0..20 {
        assert_eq!(client.get(format!("{}/free", up.ingress)).send().await.expect("answered").status(), 200);
    }
}

/// Calls between namespaces need the callee's consent (`allow_from`), and
/// count against the callee namespace's rate quota like ingress requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_between_namespaces_need_allow_from_and_count_against_the_callee_quota() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = start(dir.path());
    up.ok(&["deploy", &path("backend"), "--name", "backend", "-n", "pay"]);
    up.ok(&["deploy", &path("frontend"), "--name", "front", "-n", "shop", "--route", "/front", "--env", "BACKEND_URL=http://backend.pay"]);
    let front = format!("{}/front/x", up.ingress);
    eventually(&front, 200, "namespace pay does not accept calls from namespace shop").await;

    // A bad record is refused and changes nothing.
    let (ok, out) = up.wharf(&["namespace", "set", "pay", "--allow-from", "Not.A.Namespace"]);
    assert!(!ok && out.contains("allow_from") && out.contains("Not.A.Namespace"), "{out}");
    assert!(curl(&front).await.1.contains("does not accept calls from namespace shop"));

    up.ok(&["namespace", "set", "pay", "--allow-from", "shop", "--max-rps", "5"]);
    let record: Value = serde_json::from_str(&up.ok(&["namespace", "get", "pay"])).expect("json");
    assert_eq!(record["allow_from"], serde_json::json!(["shop"]), "{record}");
    eventually(&front, 200, "frontend got: backend ok").await;
    // Let pay's bucket refill after that probe, then 20 calls at once: about 5 get through.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let client = reqwest::Client::new();
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (client, url) = (client.clone(), front.clone());
        burst.spawn(async move { client.get(url).send().await.expect("answered").text().await.unwrap_or_default() });
    }
    let (mut served, mut limited) = (0, 0);
    while let Some(body) = burst.join_next().await {
        let body = body.expect("task");
        if body.contains("backend ok") {
            served += 1;
        } else if body.contains("namespace pay is over its quota of 5 requests/s") {
            limited += 1;
        } else {
            panic!("neither served nor limited: {body}");
        }
    }
    assert!(served >= 5 && limited >= 5, "served {served}, limited {limited}");

    // Consent withdrawn: refused again.
    up.ok(&["namespace", "set", "pay"]);
    eventually(&front, 200, "namespace pay does not accept calls from namespace shop").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_on_the_admin_listener_and_a_tenant_may_route_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = start(&dir.path().join("data"));
    assert!(up.admin.starts_with("http://127.0.0.1:"), "loopback by default: {}", up.admin);
    up.ok(&["deploy", &path("hello"), "--name", "stats", "--route", "/metrics"]);
    // On the public ingress /metrics is the tenant's route...
    eventually(&format!("{}/metrics", up.ingress), 200, "Hello from Wharf!").await;
    // ...and the host's metrics are on the admin listener only.
    let (status, text) = curl(&format!("{}/metrics", up.admin)).await;
    assert_eq!(status, 200);
    assert!(text.contains(r#"wharf_requests_total{service="default/stats",outcome="ok"}"#), "{text}");
    assert_eq!(curl(&format!("{}/healthz", up.admin)).await, (200, "ok\n".to_string()));
    assert_eq!(curl(&format!("{}/stats", up.admin)).await.0, 404, "the admin listener serves no tenant routes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_flags_bound_the_api_and_the_ingress() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Up::start(Path::new(WHARF), &dir.path().join("data"), &["--host-id", "test-host", "--header-timeout", "1s", "--max-connections", "8"]);
    let addr = |url: &str| url.trim_start_matches("http://").to_string();
    // A half-sent head to the API is closed after the header timeout.
    let mut slow = tokio::net::TcpStream::connect(addr(&up.api)).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").await.expect("half a head");
    let started = Instant::now();
    let mut buf = [0u8; 512];
    let closed = tokio::time::timeout(Duration::from_secs(20), slow.read(&mut buf)).await.expect("closed within 20 s");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed after {:?}, before the 1 s header timeout", started.elapsed());
    // Past 8 connections the ingress answers 503 and closes; the 8 keep working.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(tokio::net::TcpStream::connect(addr(&up.ingress)).await.expect("connect"));
    }
    let mut refused = tokio::net::TcpStream::connect(addr(&up.ingress)).await.expect("connect");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), refused.read_to_end(&mut answer)).await.expect("closed at once");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("8 open connections"), "{answer}");
    let first = &mut held[0];
    first.write_all(b"GET /nothing HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.expect("send");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), first.read_to_end(&mut reply)).await.expect("answered").expect("read");
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 404"), "an established connection is served past the cap");
}
