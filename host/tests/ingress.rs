//! The ingress under hostile clients: half-sent heads, more connections
//! than its cap, idle keep-alive connections, stalled bodies and oversized
//! heads, against a real workload in real wasmtime on a loopback port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wharf_edge::ServerConfig;
use wharf_host::metrics::HostMetrics;
use wharf_host::{Runtime, RuntimeConfig, Workload, WorkloadSpec, ingress};
use wharf_proto::ByteSize;
use wharf_testkit::samples;

const HELLO: &str = "Hello from Wharf!\n";

/// Serves `sample` on a loopback port with `config` until the test ends.
async fn serve(sample: &str, config: ServerConfig) -> SocketAddr {
    let runtime = Runtime::new(RuntimeConfig { max_instances: 64, max_instance_memory: ByteSize::mib(64), cache_dir: None, ..RuntimeConfig::default() })
        .expect("runtime starts");
    let component = runtime.load(&samples::bytes(sample), None).expect("sample loads");
    let workload = Workload::new(&runtime, component, WorkloadSpec::new(format!("test/{sample}")), &HostMetrics::default()).expect("workload");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(ingress::serve(listener, None, config, Arc::new(workload), std::future::pending()));
    addr
}

/// Sends one keep-alive GET on `stream` and reads until the hello body; the
/// response's first line.
async fn get_on(stream: &mut TcpStream) -> std::io::Result<String> {
    stream.write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n").await?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(HELLO) {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&seen).lines().next().unwrap_or_default().to_string())
}

/// Waits until the server closes `stream` (EOF or reset), up to `limit`;
/// what it sent before closing.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(String::from_utf8_lossy(&seen).into_owned()),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// The test opens thousands of sockets, each counted twice (client and
/// server end) in this one process: raise the soft open-file limit to the
/// hard one, and size the test to what that allows.
fn open_file_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let (Some(current), Some(maximum)) = (limit.current, limit.maximum)
        && maximum > current
    {
        let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(maximum), maximum: Some(maximum) });
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_half_sent_heads_are_closed_on_time_while_others_are_served() {
    // 5,000 slow clients need 10,000 descriptors here plus a few hundred for the rest.
    let files = open_file_limit();
    let slow_clients: usize = if files >= 11_000 { 5_000 } else { usize::try_from(files.saturating_sub(1_000) / 2).unwrap_or(0) };
    assert!(slow_clients >= 1_000, "open-file limit {files} is too low for this test; raise it with ulimit -n");
    let header_timeout = Duration::from_secs(3);
    let addr = serve("hello", ServerConfig { header_read_timeout: header_timeout, ..ServerConfig::default() }).await;

    // Normal clients keep asking throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let normal = tokio::spawn({
        let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
        async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let ok = match client.get(format!("http://{addr}/")).send().await {
                    Ok(response) => response.status() == 200 && response.text().await.is_ok_and(|t| t == HELLO),
                    Err(_) => false,
                };
                if ok { served.fetch_add(1, Ordering::Relaxed) } else { failed.fetch_add(1, Ordering::Relaxed) };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });

    let mut slow = Vec::with_capacity(slow_clients);
    for i in 0..slow_clients {
        let mut stream = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("slow client {i} connects: {e}"));
        stream.write_all(b"GET / HTTP/1.1\r\nhost: test\r\nx-half-sent: ").await.expect("half a head is sent");
        slow.push((Instant::now(), stream));
    }
    let all_open = Instant::now();
    let during = served.load(Ordering::Relaxed);

    // Every slow client is closed after the header timeout, not long after.
    let waits: Vec<_> = slow
        .into_iter()
        .map(|(opened, mut stream)| {
            tokio::spawn(async move {
                let answer = closed_within(&mut stream, header_timeout * 6).await;
                (opened.elapsed(), answer)
            })
        })
        .collect();
    let mut longest = Duration::ZERO;
    for wait in waits {
        let (took, answer) = wait.await.expect("waiter");
        let answer = answer.unwrap_or_else(|| panic!("a half-sent head was still open after {:?}", header_timeout * 6));
        assert!(!answer.contains("200 OK"), "a half-sent head was answered: {answer}");
        // A little early is the timer's granularity; late is a busy machine.
        assert!(took + Duration::from_millis(100) >= header_timeout, "closed after {took:?}, before the {header_timeout:?} header timeout");
        longest = longest.max(took);
    }
    let closing = all_open.elapsed();
    stop.store(true, Ordering::Relaxed);
    normal.await.expect("normal client");
    let (served, failed) = (served.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("{slow_clients} half-sent heads; longest open {longest:?}; {served} normal requests served ({during} while the slow ones connected), {failed} failed; closing took {closing:?}");
    assert!(longest < header_timeout * 3, "the slowest close took {longest:?} with a {header_timeout:?} header timeout");
    assert_eq!(failed, 0, "every normal request is served while the slow clients hold connections");
    assert!(served >= 10, "normal requests kept being served ({served})");
    assert!(get_on(&mut TcpStream::connect(addr).await.expect("connect")).await.expect("served").contains("200"), "served afterwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_new_connections_get_503_and_established_ones_keep_working() {
    let cap = 20;
    let addr = serve("hello", ServerConfig { max_connections: cap, ..ServerConfig::default() }).await;
    let mut established = Vec::new();
    for _ in 0..cap {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        assert!(get_on(&mut stream).await.expect("served").contains("200"), "connections under the cap are served");
        established.push(stream);
    }
    for _ in 0..3 {
        let mut refused = TcpStream::connect(addr).await.expect("the kernel still accepts the TCP connection");
        let answer = closed_within(&mut refused, Duration::from_secs(10)).await.expect("a connection past the cap is closed at once");
        assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("20 open connections"), "past the cap: {answer:?}");
    }
    for stream in &mut established {
        assert!(get_on(stream).await.expect("still served").contains("200"), "established connections keep working past the cap");
    }
    // A connection that closes frees its place.
    drop(established.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        match get_on(&mut stream).await {
            Ok(line) if line.contains("200") => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("a freed place is not reused: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_and_busy_ones_are_not() {
    let idle_timeout = Duration::from_secs(1);
    let addr = serve("hello", ServerConfig { idle_timeout, header_read_timeout: Duration::from_secs(30), ..ServerConfig::default() }).await;
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    assert!(get_on(&mut idle).await.expect("served").contains("200"));
    let mut chatty = TcpStream::connect(addr).await.expect("connect");
    let started = Instant::now();
    // The chatty client asks every 300 ms, well inside the idle timeout, for 3 s.
    while started.elapsed() < Duration::from_secs(3) {
        assert!(get_on(&mut chatty).await.expect("a connection in use stays open").contains("200"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The idle one was closed long ago (its EOF waits in the socket).
    assert!(closed_within(&mut idle, Duration::from_millis(500)).await.is_some(), "an idle keep-alive connection is closed after {idle_timeout:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_fails_the_request_after_the_body_timeout() {
    let body_timeout = Duration::from_secs(1);
    let addr = serve("echo", ServerConfig { body_read_timeout: body_timeout, ..ServerConfig::default() }).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(b"POST / HTTP/1.1\r\nhost: test\r\ncontent-length: 100\r\n\r\nonly ten b").await.expect("send part of a body");
    let started = Instant::now();
    let answer = closed_within(&mut stream, Duration::from_secs(20)).await;
    let took = started.elapsed();
    // The component's body read fails; it answers 500 and the connection ends.
    let answer = answer.unwrap_or_else(|| panic!("a stalled body still held its connection after 20 s"));
    assert!(!answer.contains("200 OK"), "{answer}");
    assert!(took >= body_timeout - Duration::from_millis(100) && took < body_timeout * 10, "ended after {took:?} with a {body_timeout:?} body timeout: {answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_larger_than_the_connection_buffer_is_refused() {
    let addr = serve("hello", ServerConfig { max_buffer: 16 * 1024, ..ServerConfig::default() }).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!("GET / HTTP/1.1\r\nhost: test\r\nx-big: {}\r\n\r\n", "a".repeat(32 * 1024));
    // The server may close before taking all of it.
    let _ = stream.write_all(head.as_bytes()).await;
    let answer = closed_within(&mut stream, Duration::from_secs(10)).await.expect("closed");
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(!answer.contains("200"), "{answer}");
}
