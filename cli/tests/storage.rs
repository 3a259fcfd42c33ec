//! Services' key-value data (wasi:keyvalue) on a real `wharf up`: atomic,
//! scoped to declared buckets, kept across restarts, reachable by `wharf kv`.

use std::path::Path;
use std::time::Duration;
use wharf_testkit::wharf::Up;
use wharf_testkit::samples;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

fn up(dir: &Path) -> Up {
    Up::start(Path::new(WHARF), dir, &["--host-id", "store"])
}

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.expect("answered");
    (response.status().as_u16(), response.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_atomically_keeps_data_across_restarts_and_stays_in_its_buckets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut cluster = up(&data);
    let counter = samples::path("counter");
    let (ok, out) = cluster.wharf(&["deploy", counter.to_str().expect("utf-8"), "--name", "counter", "--route", "/", "--replicas", "2", "--keyvalue", "counter"]);
    assert!(ok, "{out}");

    // 200 increments from 50 concurrent clients over two replicas: exactly 200, every value once.
    let client = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (client, url) = (client.clone(), format!("{}/hit", cluster.ingress));
        tasks.spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..4 {
                let response = client.get(&url).send().await.expect("answered");
                assert_eq!(response.status(), 200);
                seen.push(response.text().await.expect("body").trim().parse::<u64>().expect("a number"));
            }
            seen
        });
    }
    let mut values = Vec::new();
    while let Some(seen) = tasks.join_next().await {
        values.extend(seen.expect("task"));
    }
    values.sort_unstable();
    assert_eq!(values, (1..=200).collect::<Vec<u64>>(), "every increment returned a distinct value");
    assert_eq!(get(&format!("{}/get?key=hits", cluster.ingress)).await, (200, "200".to_string()));

    // A bucket the spec does not declare is refused, by name.
    let (status, body) = get(&format!("{}/hit?bucket=secrets", cluster.ingress)).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("`secrets` is not declared") && body.contains("counter"), "{body}");
    // There is no way to name another namespace's data: such names are just undeclared buckets.
    for other in ["other.counter", "other/counter", "wharf-kv-other"] {
        let (status, body) = get(&format!("{}/hit?bucket={other}", cluster.ingress)).await;
        assert_eq!(status, 500, "{other}: {body}");
        assert!(body.contains("is not declared"), "{other}: {body}");
    }

    // Operators see and change the same data.
    let (ok, out) = cluster.wharf(&["kv", "get", "counter", "hits"]);
    assert!(ok && out.trim() == "200", "{out}");
    assert!(cluster.wharf(&["kv", "put", "counter", "greeting", "hello there"]).0);
    assert_eq!(get(&format!("{}/get?key=greeting", cluster.ingress)).await, (200, "hello there".to_string()));
    let (_, keys) = cluster.wharf(&["kv", "list", "counter"]);
    assert_eq!(keys.lines().collect::<Vec<_>>(), vec!["greeting", "hits"]);
    assert!(cluster.wharf(&["kv", "delete", "counter", "greeting"]).0);
    let (ok, out) = cluster.wharf(&["kv", "get", "counter", "greeting"]);
    assert!(!ok && out.contains("no key"), "{out}");
    let (ok, out) = cluster.wharf(&["kv", "get", "counter", "hits", "--namespace", "other"]);
    assert!(!ok && out.contains("no key"), "namespaces do not share data: {out}");

    // kill -9, start again: the count goes on.
    cluster.process.kill();
    let cluster = up(&data);
    let mut next = (0, String::new());
    for _ in 0..100 {
        next = get(&format!("{}/hit", cluster.ingress)).await;
        if next.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(next, (200, "201\n".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_keeps_files_and_nothing_escapes_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut cluster = up(&data);
    let notes = samples::path("notes");
    let (ok, out) = cluster.wharf(&["deploy", notes.to_str().expect("utf-8"), "--name", "notes", "--route", "/", "--volume", "data"]);
    assert!(ok, "{out}");
    let client = reqwest::Client::new();
    let saved = client.put(format!("{}/notes/todo", cluster.ingress)).body("buy rope").send().await.expect("answered");
    assert_eq!(saved.status(), 200);
    assert_eq!(get(&format!("{}/notes/todo", cluster.ingress)).await, (200, "buy rope".to_string()));
    // The file is where the volume lives on the host, and nowhere else.
    let on_disk = data.join("volumes/default/notes/data/todo");
    assert_eq!(std::fs::read_to_string(&on_disk).expect("on the host's disk"), "buy rope");

    // Escapes: `..`, an absolute path, a symlink pointing out. Each fails.
    std::fs::write(dir.path().join("secret.txt"), "outside").expect("write");
    #[cfg(unix)]
    std::os::unix::fs::symlink(dir.path(), data.join("volumes/default/notes/data/link")).expect("symlink");
    for path in ["/data/../secret.txt", "../secret.txt", dir.path().join("secret.txt").to_str().expect("utf-8"), "/data/link/secret.txt", "/etc/passwd"] {
        let (status, body) = get(&format!("{}/escape?path={path}", cluster.ingress)).await;
        assert_eq!(status, 403, "{path} must not be readable: {body}");
        assert!(body.contains("cannot open"), "{body}");
    }

    // The files outlive the process.
    let status = cluster.process.terminate(Duration::from_secs(15));
    assert!(status.success());
    let cluster = up(&data);
    let mut got = (0, String::new());
    for _ in 0..100 {
        got = get(&format!("{}/notes/todo", cluster.ingress)).await;
        if got.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got, (200, "buy rope".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_and_secrets_reach_the_component_and_secrets_are_never_shown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = up(&dir.path().join("data"));
    let secret_value = "hunter2-very-secret";
    let (ok, out) = cluster.wharf(&["secret", "set", "db-password", secret_value]);
    assert!(ok, "{out}");
    let settings = samples::path("settings");
    let settings = settings.to_str().expect("utf-8");
    // A secret that does not exist is refused at deploy, naming it; forced,
    // the replica fails with a message naming it.
    let (ok, out) = cluster.wharf(&["deploy", settings, "--name", "broken", "--route", "/broken", "--secret", "nope", "--no-wait"]);
    assert!(!ok && out.contains("secret nope does not exist in namespace default"), "{out}");
    let (ok, out) = cluster.wharf(&["deploy", settings, "--name", "broken", "--route", "/broken", "--secret", "nope", "--no-wait", "--force"]);
    assert!(ok, "{out}");
    let (ok, out) = cluster.wharf(&["deploy", settings, "--name", "settings", "--route", "/", "--config", "mode=prod", "--secret", "db-password"]);
    assert!(ok, "{out}");
    assert_eq!(get(&format!("{}/?key=mode", cluster.ingress)).await, (200, "prod".to_string()));
    assert_eq!(get(&format!("{}/?key=db-password", cluster.ingress)).await, (200, secret_value.to_string()));
    assert_eq!(get(&format!("{}/?key=other", cluster.ingress)).await.0, 404);

    // Nowhere in what Wharf shows: get, status, the secret list, metrics, its own output.
    let mut shown = Vec::new();
    for args in [&["get", "services", "-o", "json"][..], &["get", "services"], &["get", "hosts", "-o", "json"], &["secret", "list"]] {
        shown.push(cluster.wharf(args).1);
    }
    assert!(shown[3].contains("db-password"), "the name is listed: {}", shown[3]);
    let metrics = reqwest::Client::new().get(format!("{}/metrics", cluster.api)).bearer_auth(&cluster.token).send().await.expect("metrics");
    shown.push(metrics.text().await.expect("body"));
    shown.push(reqwest::get(format!("{}/metrics", cluster.admin)).await.expect("metrics").text().await.expect("body"));
    shown.push(cluster.process.output());
    for text in &shown {
        assert!(!text.contains(secret_value), "the secret value leaked into: {text}");
    }
    let mut broken = String::new();
    for _ in 0..50 {
        broken = cluster.wharf(&["get", "services", "broken", "-o", "json"]).1;
        if broken.contains("secret nope") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(broken.contains("secret nope is granted to the service but does not exist"), "{broken}");
}

/// `PUT body` to `url`: (status, body).
async fn put(url: &str, body: Vec<u8>) -> (u16, String) {
    let response = reqwest::Client::new().put(url).body(body).send().await.expect("answered");
    (response.status().as_u16(), response.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_named_as_other_platforms_name_them_are_deployed_and_kept_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = up(&dir.path().join("data"));
    let counter = samples::path("counter");
    // Underscores, dots and capitals, as wasi:keyvalue allows and other platforms use.
    let buckets = ["user_sessions", "app.cache.v2", "MyBucket"];
    let mut args = vec!["deploy", counter.to_str().expect("utf-8"), "--name", "counter", "--route", "/"];
    for bucket in buckets {
        args.extend(["--keyvalue", bucket]);
    }
    let (ok, out) = cluster.wharf(&args);
    assert!(ok, "deployed with those names granted: {out}");
    for bucket in buckets {
        let (status, body) = put(&format!("{}/set?bucket={bucket}&key=k", cluster.ingress), format!("in {bucket}").into_bytes()).await;
        assert_eq!(status, 200, "{bucket}: {body}");
    }
    for bucket in buckets {
        assert_eq!(get(&format!("{}/get?bucket={bucket}&key=k", cluster.ingress)).await, (200, format!("in {bucket}")), "each bucket reads back its own value");
        assert_eq!(cluster.ok(&["kv", "get", bucket, "k"]).trim(), format!("in {bucket}"), "wharf kv takes the same identifiers");
        assert!(cluster.ok(&["kv", "list", bucket]).lines().any(|l| l == "k"));
    }
    // A near miss of a granted name is another bucket, and not granted.
    let (status, body) = get(&format!("{}/get?bucket=mybucket&key=k", cluster.ingress)).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("is not declared"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_too_long_for_nats_is_an_error_in_the_guest_and_the_host_keeps_its_connection() {
    let nats = wharf_testkit::nats::NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Up::start(Path::new(WHARF), &dir.path().join("data"), &["--host-id", "store", "--nats", &nats.url()]);
    let counter = samples::path("counter");
    let (ok, out) = cluster.wharf(&["deploy", counter.to_str().expect("utf-8"), "--name", "counter", "--route", "/", "--keyvalue", "counter"]);
    assert!(ok, "{out}");
    let long = "k".repeat(5000);
    let (status, body) = put(&format!("{}/set?key={long}", cluster.ingress), b"v".to_vec()).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("5000 bytes") && body.contains("at most 1024"), "a clear error in the guest: {body}");
    let (status, body) = get(&format!("{}/get?key={long}", cluster.ingress)).await;
    assert!(status == 500 && body.contains("at most 1024"), "{body}");
    // The host's connection survived: data still flows and heartbeats still arrive.
    assert_eq!(get(&format!("{}/hit", cluster.ingress)).await, (200, "1\n".to_string()));
    let (ok, out) = cluster.wharf(&["kv", "get", "counter", &long]);
    assert!(!ok && out.contains("at most 1024"), "the API refuses it too: {out}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hosts = cluster.ok(&["get", "hosts", "-o", "json"]);
    let hosts: serde_json::Value = serde_json::from_str(&hosts).expect("json");
    let host = &hosts["hosts"][0];
    assert_eq!(host["ready"], true, "heartbeats continue: {hosts}");
    assert!(host["last_seen_ms"].as_u64().is_some_and(|ms| ms < 2000), "{hosts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_bucket_refuses_the_write_and_the_service_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = up(&dir.path().join("data"));
    cluster.ok(&["namespace", "set", "default", "--kv-bytes", "64KiB"]);
    let counter = samples::path("counter");
    let (ok, out) = cluster.wharf(&["deploy", counter.to_str().expect("utf-8"), "--name", "counter", "--route", "/", "--keyvalue", "counter"]);
    assert!(ok, "{out}");
    assert_eq!(get(&format!("{}/hit", cluster.ingress)).await, (200, "1\n".to_string()));
    let value = vec![b'x'; 8 * 1024];
    let mut stored = 0;
    let refusal = loop {
        let (status, body) = put(&format!("{}/set?key=k{stored}", cluster.ingress), value.clone()).await;
        if status != 200 {
            break (status, body);
        }
        stored += 1;
        assert!(stored < 20, "64 KiB took {stored} values of 8 KiB");
    };
    assert_eq!(refusal.0, 500, "{}", refusal.1);
    assert!(refusal.1.contains("data is full") && refusal.1.contains("kv_bytes") && refusal.1.contains("64KiB"), "a clear error: {}", refusal.1);
    assert!((5..8).contains(&stored), "about 64 KiB fit: {stored}");
    // Nothing else changed, and the service keeps serving.
    assert_eq!(get(&format!("{}/get?key=k{stored}", cluster.ingress)).await.0, 404, "the refused key was not written");
    assert_eq!(get(&format!("{}/get?key=k0", cluster.ingress)).await, (200, String::from_utf8(value.clone()).expect("utf-8")));
    assert_eq!(get(&format!("{}/hit", cluster.ingress)).await, (200, "2\n".to_string()), "existing keys can still change");
    // The admin raises the quota: the write goes through.
    cluster.ok(&["namespace", "set", "default", "--kv-bytes", "1MiB"]);
    let (status, body) = put(&format!("{}/set?key=k{stored}", cluster.ingress), value).await;
    assert_eq!(status, 200, "{body}");
}
