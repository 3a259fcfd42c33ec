//! NATS over mutual TLS, end to end: certificates made by `wharf nats
//! certs`, a real nats-server that requires TLS and verifies clients, a
//! `wharf scheduler` and a `wharf host` connected over it deploying and
//! serving `hello`; and every way of getting TLS wrong refused, each with an
//! error that says what is wrong, and never a word of plain text on the wire.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use wharf_testkit::cluster::{Host, Scheduler};
use wharf_testkit::nats::NatsServer;
use wharf_testkit::process::Process;
use wharf_testkit::samples;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

/// What `wharf nats certs` wrote into a directory.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    /// Runs `wharf nats certs` for a server on loopback and clients `scheduler` and `host`.
    fn make(dir: &Path) -> Certs {
        let dir = dir.to_path_buf();
        let output = Command::new(WHARF)
            .args(["nats", "certs", "--dir", text(&dir), "--server-name", "127.0.0.1,localhost", "--client", "scheduler,host"])
            .output()
            .expect("wharf runs");
        let printed = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "wharf nats certs: {printed}");
        assert!(printed.contains("WHARF_NATS_SERVER_CERT="), "it says how to use them: {printed}");
        Certs { dir }
    }

    fn file(&self, name: &str) -> String {
        text(&self.dir.join(name)).to_string()
    }

    /// The flags of a client `name` with the CA and its certificate.
    fn flags(&self, name: &str) -> Vec<String> {
        ["--nats-ca".to_string(), self.file("ca.pem"), "--nats-cert".into(), self.file(&format!("{name}.pem")), "--nats-key".into(), self.file(&format!("{name}.key"))].to_vec()
    }

    /// A nats-server whose clients must speak TLS and show a certificate signed by this CA.
    fn server(&self) -> NatsServer {
        NatsServer::start_with_config(&format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n}}",
            self.file("server.pem"),
            self.file("server.key"),
            self.file("ca.pem")
        ))
    }
}

fn text(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Runs `wharf host` against `nats` with `flags`, which must make it exit
/// with an error within a minute; returns what it printed.
fn refused(nats: &str, flags: &[String], data: &Path) -> String {
    let mut args = vec!["host", "--nats", nats, "--name", "refused", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--data-dir", text(data)];
    args.extend(flags.iter().map(String::as_str));
    let mut process = Process::spawn_with(Command::new(WHARF).args(&args).env_remove("WHARF_NATS_CA").env_remove("WHARF_NATS_TLS").env_remove("WHARF_NATS_CERT").env_remove("WHARF_NATS_KEY"));
    // Output lines arrive in order, so once the error line is in, all before it is too.
    let line = process.wait_for_line("error:", Duration::from_secs(60));
    let status = process.wait(Duration::from_secs(10));
    let output = format!("{}\n{line}", process.output());
    assert!(!status.success(), "wharf host {flags:?} connected:\n{output}");
    output
}

fn assert_says(output: &str, words: &[&str]) {
    for word in words {
        assert!(output.contains(word), "expected {word:?} in:\n{output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_and_a_host_over_mutual_tls_deploy_and_serve_hello() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = Certs::make(&dir.path().join("certs"));
    let nats = certs.server();

    let scheduler_flags = certs.flags("scheduler");
    let scheduler_flags: Vec<&str> = scheduler_flags.iter().map(String::as_str).collect();
    let scheduler = Scheduler::start(Path::new(WHARF), &nats.url(), &dir.path().join("scheduler"), &scheduler_flags);
    // The host dials a tls:// URL; the scheduler a nats:// one, made TLS by --nats-ca.
    let tls_url = format!("tls://127.0.0.1:{}", nats.port());
    let host_flags = certs.flags("host");
    let host_flags: Vec<&str> = host_flags.iter().map(String::as_str).collect();
    let host = Host::start(Path::new(WHARF), &tls_url, "h1", "z1", dir.path(), &host_flags);

    let hello = samples::path("hello");
    let out = scheduler.ok(&["deploy", text(&hello), "--name", "hello", "--route", "/hello"]);
    assert!(out.contains("ready"), "deploy: {out}");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
    let url = format!("{}/hello", host.ingress);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = match client.get(&url).send().await {
            Ok(response) => Some((response.status().as_u16(), response.text().await.unwrap_or_default())),
            Err(_) => None,
        };
        if matches!(&got, Some((200, body)) if body.contains("Hello from Wharf!")) {
            break;
        }
        assert!(Instant::now() < deadline, "{url}: last {got:?}\n--- host:\n{}", host.process.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The server saw both processes, and every one of its client connections speaks TLS.
    let connz = nats.monitor("/connz?limit=1024").expect("connz");
    let connections = connz["connections"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = connections.iter().filter_map(|c| c["name"].as_str()).collect();
    assert!(names.contains(&"wharf-scheduler") && names.contains(&"wharf-host-h1"), "connections: {names:?}");
    for connection in &connections {
        let version = connection["tls_version"].as_str().unwrap_or_default();
        assert!(version.starts_with("1."), "a connection without TLS: {connection}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_without_the_ca_a_client_certificate_or_tls_is_refused_saying_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = Certs::make(&dir.path().join("certs"));
    // Another CA, whose certificates the server does not accept.
    let strangers = Certs::make(&dir.path().join("strangers"));
    let nats = certs.server();
    let url = nats.url();
    let data = dir.path().join("data");
    let host = certs.flags("host");

    // Private keys are the owner's alone, and certificates are never overwritten.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca.key", "server.key", "host.key"] {
            let mode = std::fs::metadata(certs.dir.join(key)).expect("key").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
    }
    let ca_before = std::fs::read(certs.dir.join("ca.pem")).expect("ca.pem");
    let again = Command::new(WHARF).args(["nats", "certs", "--dir", text(&certs.dir), "--server-name", "127.0.0.1"]).output().expect("wharf runs");
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already exists"), "{again:?}");
    assert_eq!(std::fs::read(certs.dir.join("ca.pem")).expect("ca.pem"), ca_before, "the CA was overwritten");

    // No TLS flags: the server's INFO requires TLS, so the client upgrades
    // anyway, and cannot trust the server's private CA.
    let out = refused(&url, &[], &data);
    assert_says(&out, &["TLS with NATS", "server's certificate is not trusted", "--nats-ca"]);
    // Its certificate, but not the CA: the same.
    let out = refused(&url, &host[2..], &data);
    assert_says(&out, &["server's certificate is not trusted", "--nats-ca"]);
    // The CA but no client certificate: the server verifies clients.
    let out = refused(&url, &host[..2], &data);
    assert_says(&out, &["verifies clients' certificates and none was given", "--nats-cert"]);
    // A client certificate from another CA.
    let mut foreign = host[..2].to_vec();
    foreign.extend(strangers.flags("host")[2..].iter().cloned());
    let out = refused(&url, &foreign, &data);
    assert_says(&out, &["refused the client certificate"]);

    // Files that are missing or wrong are named, with their flag, before anything is dialled.
    let missing = dir.path().join("missing-ca.pem");
    let out = refused(&url, &["--nats-ca".to_string(), text(&missing).to_string()], &data);
    assert_says(&out, &["missing-ca.pem", "CA certificate file", "--nats-ca"]);
    let out = refused(&url, &["--nats-ca".to_string(), certs.file("ca.key")], &data);
    assert_says(&out, &["ca.key", "no PEM certificate", "--nats-ca"]);
    let mut mismatched = host[..4].to_vec();
    mismatched.extend(["--nats-key".to_string(), certs.file("scheduler.key")]);
    let out = refused(&url, &mismatched, &data);
    assert_says(&out, &["scheduler.key", "does not go with the certificate", "--nats-key"]);

    // TLS required, and a server that does not speak it: refused, not talked to in plain text.
    let plain = NatsServer::start();
    let out = refused(&plain.url(), &host, &data);
    assert_says(&out, &["does not speak TLS"]);

    // A plain-text client: the server announces that TLS is required and
    // answers nothing in plain text but that refusal.
    let mut stream = TcpStream::connect(("127.0.0.1", nats.port())).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut info = String::new();
    BufReader::new(stream.try_clone().expect("clone")).read_line(&mut info).expect("INFO");
    assert!(info.starts_with("INFO ") && info.contains("\"tls_required\":true"), "{info}");
    stream.write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\nSUB > 1\r\n").expect("write");
    let mut answer = Vec::new();
    // The server closes the connection (or resets it); either ends the read.
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(!answer.contains("PONG") && !answer.contains("+OK"), "a plain-text client was served: {answer}");
}
