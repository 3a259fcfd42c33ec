//! Tenants reach nothing that is not theirs, on real `wharf up` processes
//! (and a real nats-server): host names and path prefixes have owners,
//! components belong to the namespace that uploaded them (with a quota, and
//! deletion), `/v1/hosts` shows a namespace token only its replicas; at rest
//! the data directory is the owner's alone, secrets are sealed in the store
//! file and in NATS KV, and tokens expire.

use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use wharf_testkit::samples;
use wharf_testkit::wharf::Up;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

/// A token made with `wharf token create ARGS` by the admin.
fn token(up: &Up, args: &[&str]) -> String {
    let mut all = vec!["token", "create"];
    all.extend_from_slice(args);
    let out = up.ok(&all);
    out.split_whitespace().find(|w| w.starts_with("wharf_")).unwrap_or_else(|| panic!("no token in: {out}")).to_string()
}

/// `wharf ARGS --token TOKEN`.
fn as_token(up: &Up, token: &str, args: &[&str]) -> (bool, String) {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--token", token]);
    up.wharf(&all)
}

fn http(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().expect("header"));
    reqwest::Client::builder().default_headers(headers).build().expect("client")
}

async fn json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn path(sample: &str) -> String {
    samples::path(sample).to_str().expect("utf-8").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_and_path_prefixes_belong_to_one_namespace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Up::start(Path::new(WHARF), &dir.path().join("data"), &["--host-id", "owners"]);
    let shop = token(&up, &["-n", "shop", "--write"]);
    let evil = token(&up, &["-n", "evil", "--write"]);

    // shop claims its host name first (explicitly) and deploys on it and on a path.
    let (ok, out) = as_token(&up, &shop, &["domain", "claim", "shop.example.com", "-n", "shop"]);
    assert!(ok && out.contains("belongs to namespace shop (claimed)"), "{out}");
    let manifest = dir.path().join("shop.yaml");
    std::fs::write(
        &manifest,
        format!(
            "services:\n  - name: store\n    namespace: shop\n    component: {{ file: {} }}\n    routes: [{{ host: shop.example.com, path_prefix: / }}, {{ path_prefix: /shop }}]\n",
            path("hello")
        ),
    )
    .expect("write");
    let (ok, out) = as_token(&up, &shop, &["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(ok, "{out}");

    // evil may not route shop's host name, nor a path under shop's prefix,
    // nor claim either: 409, naming the owner; nothing is written.
    let echo = path("echo");
    let evil_manifest = dir.path().join("evil.yaml");
    for route in ["{ host: Shop.Example.com, path_prefix: /login }", "{ path_prefix: /shop/login }", "{ path_prefix: /shop }"] {
        std::fs::write(&evil_manifest, format!("services:\n  - name: grab\n    namespace: evil\n    component: {{ file: {echo} }}\n    routes: [{route}]\n")).expect("write");
        let (ok, out) = as_token(&up, &evil, &["apply", "-f", evil_manifest.to_str().expect("utf-8")]);
        assert!(!ok && out.contains("belongs to namespace shop") && out.contains("route_owned"), "{route}: {out}");
    }
    let (ok, out) = as_token(&up, &evil, &["domain", "claim", "shop.example.com", "-n", "evil"]);
    assert!(!ok && out.contains("belongs to namespace shop"), "{out}");
    let (ok, out) = as_token(&up, &evil, &["domain", "claim", "/shop/admin", "--path", "-n", "evil"]);
    assert!(!ok && out.contains("belongs to namespace shop"), "{out}");
    assert!(up.service("evil/grab").is_null(), "no refused service was written");

    // Over the API: 409 with the owner named.
    let evil_http = http(&evil);
    let digest = up.ok(&["deploy", &echo, "--name", "probe", "-n", "evil", "--no-wait"]);
    assert!(digest.contains("evil/probe"), "{digest}");
    let probe = up.service("evil/probe");
    let component = probe["service"]["spec"]["component"].as_str().expect("component").to_string();
    let spec = serde_json::json!({"component": component, "routes": [{"host": "shop.example.com", "path_prefix": "/admin"}]});
    let (status, body) = json(evil_http.put(format!("{}/v1/namespaces/evil/services/probe", up.api)).json(&spec).send().await.expect("answered")).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "route_owned");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("namespace shop"), "{body}");
    // A prefix too long to be claimed is refused by its length, before anything is claimed.
    let long = serde_json::json!({"component": component, "routes": [{"path_prefix": format!("/{}", "a".repeat(2000))}]});
    let (status, body) = json(evil_http.put(format!("{}/v1/namespaces/evil/services/probe", up.api)).json(&long).send().await.expect("answered")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("at most 1024 bytes"), "{body}");

    // A host name nobody owns is claimed by the first namespace that routes it, and is then its own.
    std::fs::write(&evil_manifest, format!("services:\n  - name: grab\n    namespace: evil\n    component: {{ file: {echo} }}\n    routes: [{{ host: evil.example.com, path_prefix: / }}, {{ path_prefix: /login }}]\n")).expect("write");
    let (ok, out) = as_token(&up, &evil, &["apply", "-f", evil_manifest.to_str().expect("utf-8")]);
    assert!(ok, "{out}");
    let (ok, out) = as_token(&up, &evil, &["domain", "list", "-n", "evil"]);
    assert!(ok && out.contains("evil.example.com") && out.contains("deployed"), "{out}");
    let (ok, out) = as_token(&up, &shop, &["domain", "claim", "evil.example.com", "-n", "shop"]);
    assert!(!ok && out.contains("belongs to namespace evil"), "{out}");
    // Only an admin grants, and not from under another namespace's live routes.
    let (ok, out) = as_token(&up, &evil, &["domain", "grant", "shop.example.com", "-n", "evil"]);
    assert!(!ok && out.contains("only admin"), "{out}");
    let (ok, out) = up.wharf(&["domain", "grant", "shop.example.com", "-n", "evil"]);
    assert!(!ok && out.contains("routed by shop/store"), "{out}");
    let (ok, out) = up.wharf(&["domain", "grant", "free.example.com", "-n", "evil"]);
    assert!(ok && out.contains("belongs to namespace evil (granted)"), "{out}");

    // At the ingress, evil's path-only /login never takes a path of shop's host name.
    let client = reqwest::Client::new();
    let wait = std::time::Instant::now();
    loop {
        let response = client.get(format!("{}/login", up.ingress)).header("host", "shop.example.com").send().await.expect("answered");
        let (status, text) = (response.status().as_u16(), response.text().await.expect("body"));
        if status == 200 {
            assert!(text.contains("Hello"), "shop's host goes to shop's service: {text}");
            break;
        }
        assert!(wait.elapsed() < Duration::from_secs(60), "shop's service never answered: {status} {text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_belong_to_the_namespace_that_uploaded_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let up = Up::start(Path::new(WHARF), &data, &["--host-id", "artifacts"]);
    // A new data directory is made private from the start, without a warning.
    assert_eq!((mode(&data), mode(&data.join("state.redb"))), (0o700, 0o600));
    assert!(!up.process.output().contains("tightened"), "{}", up.process.output());
    let a = token(&up, &["-n", "a", "--write"]);
    let b = token(&up, &["-n", "b", "--write"]);
    let (a_http, b_http, admin_http) = (http(&a), http(&b), http(&up.token));
    let (ok, out) = as_token(&up, &a, &["deploy", &path("hello"), "--name", "web", "-n", "a", "--route", "/a"]);
    assert!(ok, "{out}");
    let digest = up.service("a/web")["service"]["spec"]["component"].as_str().expect("digest").to_string();

    // b sees none of a's components, and cannot deploy one by its digest.
    let (status, listed) = json(b_http.get(format!("{}/v1/namespaces/b/artifacts", up.api)).send().await.expect("answered")).await;
    assert_eq!(status, 200);
    assert_eq!(listed["artifacts"], serde_json::json!([]), "{listed}");
    for url in [format!("{}/v1/namespaces/a/artifacts", up.api), format!("{}/v1/artifacts", up.api)] {
        let (status, body) = json(b_http.get(&url).send().await.expect("answered")).await;
        assert_eq!(status, 403, "{url}: {body}");
    }
    let spec = serde_json::json!({"component": digest, "routes": [{"path_prefix": "/b"}]});
    let (status, body) = json(b_http.put(format!("{}/v1/namespaces/b/services/stolen", up.api)).json(&spec).send().await.expect("answered")).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("not uploaded in namespace b"), "{body}");
    // a lists it, with the service that runs it; an admin may deploy it anywhere.
    let (_, listed) = json(a_http.get(format!("{}/v1/namespaces/a/artifacts", up.api)).send().await.expect("answered")).await;
    assert_eq!(listed["artifacts"][0]["digest"], digest.as_str(), "{listed}");
    assert_eq!(listed["artifacts"][0]["used_by"], serde_json::json!(["a/web"]), "{listed}");
    let (status, body) = json(admin_http.put(format!("{}/v1/namespaces/c/services/shared", up.api)).json(&serde_json::json!({"component": digest})).send().await.expect("answered")).await;
    assert_eq!(status, 201, "{body}");

    // /v1/hosts: a namespace token sees its own replicas only.
    let replicas = |body: &Value| -> Vec<String> {
        body["hosts"].as_array().into_iter().flatten().flat_map(|h| h["replicas"].as_array().into_iter().flatten()).filter_map(|r| r["service"].as_str().map(str::to_string)).collect()
    };
    let wait = std::time::Instant::now();
    let all = loop {
        let (_, hosts) = json(admin_http.get(format!("{}/v1/hosts", up.api)).send().await.expect("answered")).await;
        let all = replicas(&hosts);
        if all.iter().any(|s| s == "a/web") && all.iter().any(|s| s == "c/shared") {
            break all;
        }
        assert!(wait.elapsed() < Duration::from_secs(60), "replicas never reported: {hosts}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(all.len() >= 2, "{all:?}");
    let (_, hosts) = json(b_http.get(format!("{}/v1/hosts", up.api)).send().await.expect("answered")).await;
    assert!(replicas(&hosts).is_empty(), "b sees no other namespace's replicas: {hosts}");
    assert_eq!(hosts["hosts"][0]["cached"], serde_json::json!([]), "nor which components a host holds");
    assert!(hosts["hosts"][0]["rps"].as_object().is_some_and(|m| m.is_empty()), "{hosts}");
    let (_, hosts) = json(a_http.get(format!("{}/v1/hosts", up.api)).send().await.expect("answered")).await;
    assert_eq!(replicas(&hosts), vec!["a/web".to_string()], "{hosts}");

    // A rejected upload leaves nothing: not in the store, not compiled.
    // This component passes the checks that need no compiling (a package
    // hosts provide, the handler's name) and fails at link time, after
    // the compile wrote the cache.
    let wrong = wat::parse_str(
        r#"(component
             (import "wasi:cli/environment@9.9.9" (instance (export "ping" (func))))
             (instance $handler)
             (export "wasi:http/incoming-handler@0.2.0" (instance $handler)))"#,
    )
    .expect("wat");
    let wrong_digest = wharf_proto::Digest::of(&wrong);
    let (status, body) = json(a_http.post(format!("{}/v1/namespaces/a/artifacts", up.api)).body(wrong).send().await.expect("answered")).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("wasi:cli/environment@9.9.9"), "refused at link time: {body}");
    let compiled: Vec<String> = std::fs::read_dir(data.join("compiled")).expect("compiled dir").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(compiled.iter().any(|f| f.starts_with(&digest[7..])), "the good component is compiled: {compiled:?}");
    assert!(!compiled.iter().any(|f| f.starts_with(&wrong_digest.hex())), "nothing compiled of the refused one: {compiled:?}");
    // An empty core module: wasm, but not a component (a command component
    // such as the `notcomponent` sample is accepted now: it can be a job).
    let not_component = b"\0asm\x01\0\0\0".to_vec();
    let (status, _) = json(a_http.post(format!("{}/v1/namespaces/a/artifacts", up.api)).body(not_component.clone()).send().await.expect("answered")).await;
    assert_eq!(status, 422);
    let (_, everything) = json(admin_http.get(format!("{}/v1/artifacts", up.api)).send().await.expect("answered")).await;
    let stored: Vec<&str> = everything["artifacts"].as_array().into_iter().flatten().filter_map(|a| a["digest"].as_str()).collect();
    assert!(stored.contains(&digest.as_str()), "{everything}");
    for refused in [wrong_digest.to_string(), wharf_proto::Digest::of(&not_component).to_string()] {
        assert!(!stored.contains(&refused.as_str()), "{refused} was stored: {everything}");
    }

    // A quota on components: past it an upload is refused and stores nothing.
    up.ok(&["namespace", "set", "a", "--max-artifacts", "1"]);
    let echo = samples::bytes("echo");
    let (status, body) = json(a_http.post(format!("{}/v1/namespaces/a/artifacts", up.api)).body(echo.clone()).send().await.expect("answered")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("quota artifacts=1"), "{body}");
    let (_, everything) = json(admin_http.get(format!("{}/v1/artifacts", up.api)).send().await.expect("answered")).await;
    assert!(!everything.to_string().contains(&wharf_proto::Digest::of(&echo).hex()), "{everything}");

    // Deleting: refused while a service uses it (naming it), then done.
    let (ok, out) = as_token(&up, &a, &["artifact", "rm", &digest, "-n", "a"]);
    assert!(!ok && out.contains("a/web") && out.contains("in_use"), "{out}");
    let (ok, out) = as_token(&up, &b, &["artifact", "rm", &digest, "-n", "b"]);
    assert!(!ok && out.contains("namespace b has no component"), "{out}");
    let (ok, out) = as_token(&up, &a, &["delete", "a/web"]);
    assert!(ok, "{out}");
    let (ok, out) = as_token(&up, &a, &["artifact", "rm", &digest, "-n", "a"]);
    assert!(ok, "{out}");
    assert!(out.contains("bytes stay"), "c/shared still runs it: {out}");
    let (ok, out) = as_token(&up, &a, &["artifact", "list", "-n", "a"]);
    assert!(ok && !out.contains(&digest), "{out}");
    let (status, _) = json(a_http.post(format!("{}/v1/namespaces/a/artifacts", up.api)).body(echo).send().await.expect("answered")).await;
    assert_eq!(status, 201, "the quota has room again");
}

/// Mode bits of `path`.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_is_private_secrets_are_sealed_and_tokens_expire() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // A data directory that already exists with loose modes is tightened.
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(data.join("notes"), "mine").expect("write");
    std::fs::set_permissions(data.join("notes"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut up = Up::start(Path::new(WHARF), &data, &["--host-id", "rest"]);
    assert_eq!(mode(&data), 0o700);
    for file in ["notes", "state.redb", "admin-token", "secret.key"] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
    assert!(up.process.output().contains("tightened"), "the change is logged: {}", up.process.output());

    // A secret reaches its component, and its bytes are nowhere in the store file.
    let value = "hunter2-sealed-at-rest-7f3a";
    up.ok(&["secret", "set", "db-password", value]);
    up.ok(&["deploy", &path("settings"), "--name", "settings", "--route", "/", "--secret", "db-password"]);
    let got = reqwest::get(format!("{}/?key=db-password", up.ingress)).await.expect("answered").text().await.expect("body");
    assert_eq!(got, value);
    let store = std::fs::read(data.join("state.redb")).expect("store");
    assert!(!store.windows(value.len()).any(|w| w == value.as_bytes()), "the secret is in plain text in state.redb");

    // Expiring tokens: listed with their expiry, refused with 401 saying so afterwards.
    let short = token(&up, &["-n", "default", "--ttl", "2s"]);
    let listed = up.ok(&["token", "list"]);
    assert!(listed.contains("EXPIRES") && listed.contains("never"), "{listed}");
    let (status, _) = json(http(&short).get(format!("{}/v1/namespaces/default/services", up.api)).send().await.expect("answered")).await;
    assert_eq!(status, 200, "works before it expires");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, body) = json(http(&short).get(format!("{}/v1/namespaces/default/services", up.api)).send().await.expect("answered")).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "token_expired");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("expired at"), "{body}");
    assert!(up.ok(&["token", "list"]).contains("(expired)"));
    let (status, body) = json(http(&up.token).post(format!("{}/v1/tokens", up.api)).json(&serde_json::json!({"namespaces": ["x"], "ttl": "soon"})).send().await.expect("answered")).await;
    assert_eq!(status, 400, "{body}");

    // A plain-text secret from before sealing is still read, and sealed at the next start.
    up.process.terminate(Duration::from_secs(10));
    {
        let bus = wharf_bus::Bus::local(wharf_bus::LocalStore::open(data.join("state.redb")).expect("store"));
        let kv = bus.kv(wharf_proto::names::SECRETS_BUCKET).await.expect("bucket");
        kv.put("default.legacy", bytes::Bytes::from_static(b"plain-from-before")).await.expect("put");
    }
    let up = Up::start(Path::new(WHARF), &data, &["--host-id", "rest"]);
    up.ok(&["deploy", &path("settings"), "--name", "legacy", "--route", "/legacy", "--secret", "legacy"]);
    let got = reqwest::get(format!("{}/legacy?key=legacy", up.ingress)).await.expect("answered").text().await.expect("body");
    assert_eq!(got, "plain-from-before");
    drop(up);
    {
        let bus = wharf_bus::Bus::local(wharf_bus::LocalStore::open(data.join("state.redb")).expect("store"));
        let kv = bus.kv(wharf_proto::names::SECRETS_BUCKET).await.expect("bucket");
        let stored = kv.get("default.legacy").await.expect("get").expect("kept");
        assert!(wharf_proto::sealed::is_sealed(&stored.value), "sealed at start");
    }

    // With another key, the control plane refuses to start, saying why.
    std::fs::write(data.join("secret.key"), "ab".repeat(32)).expect("write");
    let output = std::process::Command::new(WHARF)
        .args(["up", "--data-dir", data.to_str().expect("utf-8"), "--api", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .expect("ran");
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("were sealed with key") && text.contains("--secret-key-file"), "{text}");
    // A key file that is not a key is refused by name.
    std::fs::write(data.join("secret.key"), "not a key").expect("write");
    let output = std::process::Command::new(WHARF)
        .args(["up", "--data-dir", data.to_str().expect("utf-8"), "--api", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .expect("ran");
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && text.contains("secret.key is not a secret key"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_sealed_in_nats_kv() {
    let nats = wharf_testkit::nats::NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Up::start(Path::new(WHARF), &dir.path().join("data"), &["--host-id", "sealed", "--nats", &nats.url()]);
    let value = "nats-secret-value-91c2";
    up.ok(&["secret", "set", "api-key", value, "-n", "shop"]);
    up.ok(&["deploy", &path("settings"), "--name", "settings", "-n", "shop", "--route", "/", "--secret", "api-key"]);
    let got = reqwest::get(format!("{}/?key=api-key", up.ingress)).await.expect("answered").text().await.expect("body");
    assert_eq!(got, value, "the host opens it");
    // Read with a plain NATS client: the value in the bucket is sealed.
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let kv = async_nats::jetstream::new(client).get_key_value(wharf_proto::names::SECRETS_BUCKET).await.expect("bucket");
    let stored = kv.get("shop.api-key").await.expect("get").expect("stored");
    assert!(wharf_proto::sealed::is_sealed(&stored), "sealed");
    assert!(!stored.windows(value.len()).any(|w| w == value.as_bytes()), "the plain text is not in the KV value");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_over_nats_opens_secrets_only_with_the_control_planes_key() {
    use wharf_testkit::cluster::{Host, Scheduler};
    let nats = wharf_testkit::nats::NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Scheduler::start(Path::new(WHARF), &nats.url(), &dir.path().join("sched"), &[]);
    let key_file = dir.path().join("sched").join("secret.key");
    assert_eq!(mode(&key_file), 0o600, "the control plane made its key, private");
    // A host given another key: the replica fails, saying whose key sealed the secret.
    let wrong_dir = dir.path().join("wrong");
    std::fs::create_dir_all(&wrong_dir).expect("mkdir");
    let wrong_key = wrong_dir.join("other.key");
    std::fs::write(&wrong_key, "cd".repeat(32)).expect("write");
    let mut wrong = Host::start(Path::new(WHARF), &nats.url(), "wrong", "a", dir.path(), &["--secret-key-file", wrong_key.to_str().expect("utf-8")]);
    sched.ok(&["secret", "set", "token", "cluster-secret-5d1e"]);
    sched.ok(&["deploy", &path("settings"), "--name", "settings", "--route", "/", "--secret", "token", "--no-wait"]);
    let wait = std::time::Instant::now();
    loop {
        let view = sched.service("settings").to_string();
        if view.contains("was sealed with key") {
            assert!(view.contains("--secret-key-file"), "{view}");
            break;
        }
        assert!(wait.elapsed() < Duration::from_secs(60), "no clear error: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wrong.process.kill();
    // A host with the control plane's key runs it, and the component gets the value.
    let right = Host::start(Path::new(WHARF), &nats.url(), "right", "b", dir.path(), &["--secret-key-file", key_file.to_str().expect("utf-8")]);
    let wait = std::time::Instant::now();
    loop {
        if let Ok(response) = reqwest::get(format!("{}/?key=token", right.ingress)).await
            && response.status() == 200
        {
            assert_eq!(response.text().await.expect("body"), "cluster-secret-5d1e");
            break;
        }
        assert!(wait.elapsed() < Duration::from_secs(90), "never served with the right key: {}", sched.service("settings"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
