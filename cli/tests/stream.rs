//! Bodies of any size across the hop between hosts: a real nats-server with
//! the shipped configuration (each host with its own NATS identity, so its
//! permissions are the real ones), a `wharf scheduler` and two `wharf host`
//! processes; the only replica of `bulk` runs on host-b and every request
//! enters host-a's ingress, so each body crosses NATS as a stream.

use futures::StreamExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use wharf_testkit::nats::NatsServer;
use wharf_testkit::process::Process;
use wharf_testkit::samples;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");
const MIB: u64 = 1024 * 1024;
/// The transfer each way: far past a NATS message's 1 MiB.
const BIG: u64 = 100 * MIB;
/// What a host's resident memory may grow by while it carries [`BIG`].
const RSS_BOUND: u64 = 64 * MIB;

fn url_in(line: &str) -> String {
    line.split_whitespace().find(|w| w.starts_with("http://")).expect("a URL").to_string()
}

struct Api {
    url: String,
    token: String,
}

struct Host {
    process: Process,
    ingress: String,
}

fn wharf(api: &Api, args: &[&str]) -> String {
    let output = Command::new(WHARF).args(args).env("WHARF_API", &api.url).env("WHARF_TOKEN", &api.token).output().expect("wharf runs");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "wharf {args:?} failed:\n{text}");
    text
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

fn scheduler(nats: &str, dir: &Path) -> (Process, Api) {
    let tls = tls_flags(dir, "scheduler");
    let dir = dir.join("scheduler");
    let mut args = vec!["scheduler", "--nats", nats, "--nats-user", "scheduler", "--nats-password", "s3cret-s", "--api", "127.0.0.1:0", "--data-dir", dir.to_str().expect("utf-8")];
    args.extend(tls.iter().map(String::as_str));
    let mut sched = Process::spawn(WHARF, &args);
    let line = sched.wait_for_line("Wharf scheduler: API", Duration::from_secs(60));
    let api = Api { url: url_in(&line), token: std::fs::read_to_string(dir.join("admin-token")).expect("token").trim().to_string() };
    (sched, api)
}

/// `wharf host` named `name` in zone `zone`, with its own NATS identity,
/// accepting bodies up to 200 MiB at its ingress.
fn host(nats: &str, name: &str, zone: &str, dir: &Path) -> Host {
    let data = dir.join(name);
    let seed = dir.join("nats/hosts").join(format!("{name}.nk")).to_str().expect("utf-8").to_string();
    let tls = tls_flags(dir, name);
    let zone = format!("zone={zone}");
    let mut args = vec![
        "host", "--nats", nats, "--nats-nkey", &seed, "--name", name, "--labels", &zone, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--data-dir",
        data.to_str().expect("utf-8"), "--max-request-body", "200MiB",
    ];
    args.extend(tls.iter().map(String::as_str));
    let mut process = Process::spawn(WHARF, &args);
    let line = process.wait_for_line("ingress http://", Duration::from_secs(60));
    Host { process, ingress: url_in(&line) }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(300)).build().expect("client")
}

/// Polls until `url` answers 200 with `body` in it.
async fn until_ok(url: &str, body: &str, within: Duration) {
    let started = Instant::now();
    loop {
        let got = match client().get(url).send().await {
            Ok(response) => Ok((response.status().as_u16(), response.text().await.unwrap_or_default())),
            Err(e) => Err(e.to_string()),
        };
        if matches!(&got, Ok((200, b)) if b.contains(body)) {
            return;
        }
        assert!(started.elapsed() < within, "{url}: no 200 with {body:?} within {within:?}; last {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// FNV-1a (64-bit), as the `bulk` sample hashes.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Bytes `offset..offset + len` of the pattern `bulk` answers with (byte `i` is `i % 251`).
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| ((offset + i) % 251) as u8).collect()
}

/// The length and hash `bulk` answers for [`upload`]`(len)`'s body.
fn expected_digest(len: u64) -> String {
    let mut hash = Fnv::new();
    let mut offset = 0;
    while offset < len {
        let piece = pattern(offset, (len - offset).min(MIB) as usize);
        hash.update(&piece);
        offset += piece.len() as u64;
    }
    format!("{len} {:016x}", hash.0)
}

/// A body of `len` pattern bytes made as it is sent, in pieces of 64 KiB,
/// with no declared length (chunked), as a streaming client sends it; it
/// fails after `fail_after` bytes when given (the client giving up).
fn upload(len: u64, fail_after: Option<u64>) -> reqwest::Body {
    upload_counted(len, fail_after, std::sync::Arc::default())
}

/// [`upload`], counting the bytes taken from it in `taken`.
fn upload_counted(len: u64, fail_after: Option<u64>, taken: std::sync::Arc<std::sync::atomic::AtomicU64>) -> reqwest::Body {
    const PIECE: u64 = 64 * 1024;
    let pieces = futures::stream::unfold(0u64, move |offset| {
        taken.store(offset, std::sync::atomic::Ordering::Relaxed);
        async move {
        if offset >= len {
            return None;
        }
        if fail_after.is_some_and(|limit| offset >= limit) {
            return Some((Err(std::io::Error::other("the client gave up")), len));
        }
        let piece = pattern(offset, (len - offset).min(PIECE) as usize);
        Some((Ok(bytes::Bytes::from(piece)), offset + PIECE))
        }
    });
    reqwest::Body::wrap_stream(pieces)
}

/// A process's resident memory now, from /proc/<pid>/status.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status.lines().find_map(|line| line.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    kib.unwrap_or(0) * 1024
}

/// Samples the resident memory of `pids` every 20 ms while it lives; the
/// highest seen per process when stopped.
struct RssPeaks {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: std::thread::JoinHandle<Vec<u64>>,
}

impl RssPeaks {
    fn start(pids: Vec<u32>) -> RssPeaks {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut peaks = vec![0u64; pids.len()];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for (peak, pid) in peaks.iter_mut().zip(&pids) {
                        *peak = (*peak).max(rss(*pid));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                peaks
            }
        });
        RssPeaks { stop, sampler }
    }

    fn stop(self) -> Vec<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.sampler.join().expect("sampler")
    }
}

/// Asserts that no process's peak grew past its baseline by [`RSS_BOUND`].
fn assert_bounded(what: &str, names: &[&str], baseline: &[u64], peaks: &[u64]) {
    for ((name, before), peak) in names.iter().zip(baseline).zip(peaks) {
        let grew = peak.saturating_sub(*before);
        eprintln!("{what}: {name} RSS {} MiB -> peak {} MiB (+{} MiB)", before / MIB, peak / MIB, grew / MIB);
        assert!(*peak > 0, "{name}: no RSS sample");
        assert!(grew < RSS_BOUND, "{what}: {name}'s RSS grew by {} MiB (from {} MiB), past {} MiB", grew / MIB, before / MIB, RSS_BOUND / MIB);
    }
}

/// A cluster of two hosts where `bulk` runs on host-b only.
struct Cluster {
    _nats: NatsServer,
    _scheduler: Process,
    api: Api,
    a: Host,
    b: Host,
    _dir: tempfile::TempDir,
}

async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = shipped_nats(dir.path(), &["host-a", "host-b"]);
    let url = nats.url();
    let (scheduler, api) = scheduler(&url, dir.path());
    let a = host(&url, "host-a", "a", dir.path());
    let b = host(&url, "host-b", "b", dir.path());
    let bulk = samples::path("bulk");
    wharf(&api, &["deploy", bulk.to_str().expect("utf-8"), "--name", "bulk", "--route", "/bulk", "--on", "zone=b", "--timeout", "300s", "--fuel", "unlimited"]);
    let hello = samples::path("hello");
    wharf(&api, &["deploy", hello.to_str().expect("utf-8"), "--name", "hello", "--route", "/hello", "--on", "zone=a"]);
    until_ok(&format!("{}/bulk?bytes=3", a.ingress), "\u{0}\u{1}\u{2}", Duration::from_secs(60)).await;
    until_ok(&format!("{}/hello", a.ingress), "Hello from Wharf!", Duration::from_secs(60)).await;
    Cluster { _nats: nats, _scheduler: scheduler, api, a, b, _dir: dir }
}

/// Downloads `url` as a stream, keeping only the length and hash; an error
/// if the body fails part-way.
async fn download(url: &str) -> Result<(u16, u64, u64), String> {
    let response = client().get(url).send().await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let mut body = response.bytes_stream();
    let (mut length, mut hash) = (0u64, Fnv::new());
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| format!("failed after {length} bytes: {e}"))?;
        length += piece.len() as u64;
        hash.update(&piece);
    }
    Ok((status, length, hash.0))
}

/// A small body through the hop, as a check that the hosts still serve.
async fn small_upload_works(ingress: &str) {
    let answer = client().post(format!("{ingress}/bulk")).body(pattern(0, 1000)).send().await.expect("small upload");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.expect("text").trim(), expected_digest(1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_mib_crosses_the_hop_each_way_intact_in_bounded_memory() {
    let cluster = cluster().await;
    let names = ["host-a", "host-b"];
    let pids = vec![cluster.a.process.id(), cluster.b.process.id()];
    // Warm both paths with bodies a little past one message, so the
    // baseline holds what any request allocates once.
    small_upload_works(&cluster.a.ingress).await;
    let answer = client().post(format!("{}/bulk", cluster.a.ingress)).body(upload(3 * MIB, None)).send().await;
    let answer = answer.unwrap_or_else(|e| panic!("{e}\nA:\n{}\nB:\n{}", cluster.a.process.output(), cluster.b.process.output()));
    assert_eq!(answer.text().await.expect("text").trim(), expected_digest(3 * MIB));
    let warm = download(&format!("{}/bulk?bytes={}", cluster.a.ingress, 3 * MIB)).await.expect("download");
    assert_eq!(warm.1, 3 * MIB);

    // 100 MiB up: the body streams from host-a's ingress to host-b's replica.
    let baseline: Vec<u64> = pids.iter().map(|pid| rss(*pid)).collect();
    let peaks = RssPeaks::start(pids.clone());
    let answer = client().post(format!("{}/bulk", cluster.a.ingress)).body(upload(BIG, None)).send().await;
    let answer = answer.unwrap_or_else(|e| panic!("{e}\nA:\n{}\nB:\n{}", cluster.a.process.output(), cluster.b.process.output()));
    let status = answer.status().as_u16();
    let text = answer.text().await.expect("text");
    let peaks = peaks.stop();
    assert_eq!((status, text.trim()), (200, expected_digest(BIG).as_str()), "every byte arrived, in order");
    assert_bounded("100 MiB upload", &names, &baseline, &peaks);

    // 100 MiB down: the replica's answer streams back to host-a's client.
    let baseline: Vec<u64> = pids.iter().map(|pid| rss(*pid)).collect();
    let peaks = RssPeaks::start(pids.clone());
    let got = download(&format!("{}/bulk?bytes={BIG}", cluster.a.ingress)).await;
    let peaks = peaks.stop();
    let mut expected = Fnv::new();
    let mut offset = 0;
    while offset < BIG {
        let piece = pattern(offset, MIB as usize);
        expected.update(&piece);
        offset += MIB;
    }
    assert_eq!(got, Ok((200, BIG, expected.0)), "every byte arrived, in order");
    assert_bounded("100 MiB download", &names, &baseline, &peaks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_cut_mid_stream_fails_cleanly_and_the_hosts_keep_serving() {
    let mut cluster = cluster().await;
    let names = ["host-a", "host-b"];
    let pids = vec![cluster.a.process.id(), cluster.b.process.id()];
    small_upload_works(&cluster.a.ingress).await;
    let baseline: Vec<u64> = pids.iter().map(|pid| rss(*pid)).collect();

    // The client gives up 20 MiB into a 100 MiB upload: the replica's body
    // ends in an error (bulk says so), nothing is left holding the rest,
    // and the next requests are served.
    let peaks = RssPeaks::start(pids.clone());
    let cut = client().post(format!("{}/bulk", cluster.a.ingress)).body(upload(BIG, Some(20 * MIB))).send().await;
    match cut {
        Err(_) => {}
        Ok(answer) => {
            let status = answer.status().as_u16();
            let text = answer.text().await.unwrap_or_default();
            assert!(status >= 400 && !text.contains(&expected_digest(BIG)), "a cut upload was taken as whole: {status} {text}");
        }
    }
    small_upload_works(&cluster.a.ingress).await;
    let answer = client().post(format!("{}/bulk", cluster.a.ingress)).body(upload(10 * MIB, None)).send().await.expect("upload");
    assert_eq!(answer.text().await.expect("text").trim(), expected_digest(10 * MIB), "a full upload after the cut one");
    let peaks = peaks.stop();
    assert_bounded("a cut upload", &names, &baseline, &peaks);
    let logs = cluster.b.process.output();
    assert!(logs.contains("bulk: the body failed after"), "the replica's body did not end in an error:\n{logs}");

    // host-b dies 10 MiB into a 100 MiB download and 10 MiB into a 100
    // MiB upload: host-a's clients see the download's body fail (never a
    // short body taken as whole) and the upload answered with an error;
    // host-a keeps serving, holding nothing of either.
    let taken = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let cut_upload = tokio::spawn(client().post(format!("{}/bulk", cluster.a.ingress)).body(upload_counted(BIG, None, taken.clone())).send());
    let url = format!("{}/bulk?bytes={BIG}", cluster.a.ingress);
    let response = client().get(&url).send().await.expect("the head arrives");
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut length = 0u64;
    while length < 10 * MIB {
        let piece = body.next().await.expect("more body").expect("a piece");
        length += piece.len() as u64;
    }
    let waited = Instant::now();
    while taken.load(std::sync::atomic::Ordering::Relaxed) < 10 * MIB {
        assert!(waited.elapsed() < Duration::from_secs(60), "the upload did not get 10 MiB in");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let a_before = rss(cluster.a.process.id());
    cluster.b.process.kill();
    let started = Instant::now();
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(90), body.next()).await.expect("the body ends within 90 s of the kill") {
            Some(Ok(piece)) => length += piece.len() as u64,
            Some(Err(e)) => break Err(e.to_string()),
            None => break Ok(length),
        }
    };
    assert!(ended.is_err(), "the body ended cleanly after {length} of {BIG} bytes: a short body taken as whole");
    eprintln!("the download failed {:?} after host-b was killed, after {length} bytes: {ended:?}", started.elapsed());
    let uploaded = tokio::time::timeout(Duration::from_secs(90), cut_upload).await.expect("the upload ends within 90 s of the kill").expect("upload task");
    match uploaded {
        Err(e) => eprintln!("the upload failed after host-b was killed: {e}"),
        Ok(answer) => {
            let status = answer.status().as_u16();
            let text = answer.text().await.unwrap_or_default();
            eprintln!("the upload was answered after host-b was killed: {status} {text}");
            assert!(status >= 500 && !text.contains(&expected_digest(BIG)), "a cut upload was taken as whole: {status} {text}");
        }
    }
    until_ok(&format!("{}/hello", cluster.a.ingress), "Hello from Wharf!", Duration::from_secs(10)).await;
    let grew = rss(cluster.a.process.id()).saturating_sub(a_before);
    assert!(grew < RSS_BOUND, "host-a holds {} MiB more after the failed transfers", grew / MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_to_a_service_at_zero_is_held_unread_then_streamed_to_the_replica_that_starts() {
    let cluster = cluster().await;
    let names = ["host-a", "host-b"];
    let pids = vec![cluster.a.process.id(), cluster.b.process.id()];
    // Only host-b may run it (host-a lacks the label, so it cannot start
    // an activation replica itself): the request waits on host-a.
    let manifest = cluster._dir.path().join("parked.yaml");
    std::fs::write(
        &manifest,
        format!(
            "services:\n  - name: parked\n    component: {{ file: {} }}\n    routes: [{{ path_prefix: /parked }}]\n    placement: {{ labels: {{ zone: b }} }}\n    \
             limits: {{ fuel: unlimited, timeout: 300s }}\n    \
             autoscale: {{ min: 0, max: 1, target_concurrency: 1, scale_down_delay: 1s, scale_to_zero_after: 2s, stable_window: 6s }}\n",
            samples::path("bulk").to_str().expect("utf-8")
        ),
    )
    .expect("write");
    wharf(&cluster.api, &["apply", "--no-wait", "-f", manifest.to_str().expect("utf-8")]);
    let started = Instant::now();
    loop {
        let view: serde_json::Value = serde_json::from_str(&wharf(&cluster.api, &["get", "services", "parked", "-o", "json"])).expect("json");
        if view["status"]["ready"] == 0 && view["status"]["desired"] == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never at zero: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    small_upload_works(&cluster.a.ingress).await;
    let baseline: Vec<u64> = pids.iter().map(|pid| rss(*pid)).collect();
    let peaks = RssPeaks::start(pids.clone());
    let answer = client().post(format!("{}/parked", cluster.a.ingress)).body(upload(BIG, None)).send().await.expect("answered");
    let status = answer.status().as_u16();
    let text = answer.text().await.expect("text");
    let peaks = peaks.stop();
    assert_eq!((status, text.trim()), (200, expected_digest(BIG).as_str()), "served from zero, every byte in order");
    assert_bounded("100 MiB upload to a service at zero", &names, &baseline, &peaks);
}
