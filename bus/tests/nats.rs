//! What only the NATS bus has to show: clear connect errors, authentication,
//! the server's limits, reconnecting by itself after the server restarts,
//! several server URLs, and disconnect advisories from the system account.

mod common;

use std::io::BufRead;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use wharf_bus::{
    BucketSettingsError, Bus, ClientGone, ConnectError, ConnectionState, DisconnectReason,
    DisconnectsError, KvError, NatsAuth, NatsOptions,
};
use wharf_testkit::nats::NatsServer;

const PATIENCE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn connect_refuses_an_unreachable_url_at_once() {
    // A port nobody listens on: bound, then released.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let started = Instant::now();
    let err = Bus::connect_nats(&url, NatsOptions::default())
        .await
        .err()
        .expect("nothing listens there");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, ConnectError::Unreachable { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("cannot connect to NATS at {url}: ")),
        "{message}"
    );
    assert!(message.contains("nats-server -js"), "{message}");
}

#[tokio::test]
async fn connect_refuses_a_malformed_url() {
    let err = Bus::connect_nats("nats://127.0.0.1:notaport", NatsOptions::default())
        .await
        .err()
        .expect("malformed URL");
    assert!(matches!(err, ConnectError::InvalidUrl { .. }), "{err:?}");
}

/// A loopback port nobody listens on: bound, then released.
fn dead_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port()
}

#[tokio::test]
async fn connect_takes_several_urls_and_names_a_bad_one() {
    let server = NatsServer::start();
    // The dead URL first: the client tries the others too.
    let urls = format!("nats://127.0.0.1:{}, {}", dead_port(), server.url());
    let bus = Bus::connect_nats(&urls, NatsOptions::default())
        .await
        .expect("one of the URLs answers");
    bus.kv("listed").await.expect("kv");

    let urls = format!("{},nats://127.0.0.1:notaport", server.url());
    let err = Bus::connect_nats(&urls, NatsOptions::default())
        .await
        .err()
        .expect("a malformed URL in the list");
    match err {
        ConnectError::InvalidUrl { url, .. } => assert_eq!(url, "nats://127.0.0.1:notaport"),
        other => panic!("{other:?}"),
    }
    let err = Bus::connect_nats(&format!("{},", server.url()), NatsOptions::default())
        .await
        .err()
        .expect("an empty URL in the list");
    assert!(
        err.to_string().contains("the list holds an empty URL"),
        "{err}"
    );

    let urls = format!(
        "nats://127.0.0.1:{},nats://127.0.0.1:{}",
        dead_port(),
        dead_port()
    );
    let err = Bus::connect_nats(&urls, NatsOptions::default())
        .await
        .err()
        .expect("nothing answers");
    assert!(matches!(err, ConnectError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains(&urls), "{err}");
}

#[tokio::test]
async fn one_server_gets_one_copy_and_more_are_refused_clearly() {
    let server = NatsServer::start();
    let bus = Bus::connect_nats(&server.url(), NatsOptions::default())
        .await
        .expect("connect");
    // Not clustered: one copy, without being told.
    bus.kv("single").await.expect("kv with one copy");
    let options = NatsOptions {
        replicas: Some(3),
        ..NatsOptions::default()
    };
    let bus = Bus::connect_nats(&server.url(), options)
        .await
        .expect("connect");
    let err = bus
        .kv("triple")
        .await
        .err()
        .expect("three copies on one server");
    assert!(
        matches!(
            &err,
            KvError::Settings(BucketSettingsError::TooFewServers { bucket, replicas: 3 }) if bucket == "triple"
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("--kv-replicas"), "{err}");
    // The bucket that exists keeps working: updating it to three copies is refused and logged.
    bus.kv_with("single", bus.storage_limits().state)
        .await
        .expect("an existing bucket whose update is refused is used as it is");
}

#[tokio::test]
async fn a_bucket_larger_than_the_servers_can_reserve_is_refused_clearly() {
    let server = NatsServer::start_with_config("jetstream { max_file_store: 64MB }");
    let bus = Bus::connect_nats(&server.url(), NatsOptions::default())
        .await
        .expect("connect");
    let err = bus
        .kv_with("huge", wharf_bus::BucketOptions::max_bytes(1 << 30))
        .await
        .err()
        .expect("1 GiB on a server with 64 MB");
    assert!(
        matches!(
            &err,
            KvError::Settings(BucketSettingsError::InsufficientStorage {
                max_bytes: Some(1073741824),
                ..
            })
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("1 GiB") && message.contains("max_file_store"),
        "{message}"
    );
}

#[tokio::test]
async fn connect_reports_an_unreadable_credentials_file() {
    let path = PathBuf::from("/nonexistent/wharf.creds");
    let options = NatsOptions {
        auth: NatsAuth::CredentialsFile(path.clone()),
        ..NatsOptions::default()
    };
    let err = Bus::connect_nats("nats://127.0.0.1:4222", options)
        .await
        .err()
        .expect("no such file");
    assert!(
        matches!(err, ConnectError::CredentialsFile { path: ref p, .. } if *p == path),
        "{err:?}"
    );
}

#[tokio::test]
async fn users_authenticate_and_need_jetstream_in_their_account() {
    let server = NatsServer::start_with_config(
        r#"
        accounts {
          WHARF: { jetstream: enabled, users: [ { user: wharf, password: secret } ] }
          PLAIN: { users: [ { user: plain, password: secret } ] }
        }
        "#,
    );
    let as_user = |user: &str, password: &str| NatsOptions {
        auth: NatsAuth::UserPassword {
            user: user.to_owned(),
            password: password.to_owned(),
        },
        ..NatsOptions::default()
    };

    let bus = Bus::connect_nats(&server.url(), as_user("wharf", "secret"))
        .await
        .expect("right password");
    let kv = bus.kv("wharf-services").await.expect("kv");
    kv.put("k", Bytes::from_static(b"v")).await.expect("put");

    let err = Bus::connect_nats(&server.url(), as_user("wharf", "wrong"))
        .await
        .err()
        .expect("wrong password");
    assert!(matches!(err, ConnectError::Unauthorized { .. }), "{err:?}");

    let err = Bus::connect_nats(&server.url(), NatsOptions::default())
        .await
        .err()
        .expect("no credentials");
    assert!(matches!(err, ConnectError::Unauthorized { .. }), "{err:?}");

    let err = Bus::connect_nats(&server.url(), as_user("plain", "secret"))
        .await
        .err()
        .expect("account without JetStream");
    assert!(
        matches!(err, ConnectError::JetStreamUnavailable { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("enable JetStream for the account"),
        "{err}"
    );
}

#[tokio::test]
async fn max_payload_comes_from_the_server() {
    let server = NatsServer::start_with_config("max_payload: 2097152");
    let bus = Bus::connect_nats(&server.url(), NatsOptions::default())
        .await
        .expect("connect");
    assert_eq!(bus.max_payload(), 2 * 1024 * 1024);
}

#[tokio::test]
async fn reconnects_by_itself_when_the_server_comes_back() {
    let mut server = NatsServer::start();
    let bus = Bus::connect_nats(&server.url(), NatsOptions::default())
        .await
        .expect("connect");
    assert!(bus.is_connected());
    let kv = bus.kv("wharf-services").await.expect("kv");
    kv.put("default.hello", Bytes::from_static(b"spec"))
        .await
        .expect("put");
    let mut events = bus.subscribe("events.>").await.expect("subscribe");
    let mut watch = kv.watch(">").await.expect("watch");
    let replayed = tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("replay");
    assert_eq!(replayed.expect("watch ended").key, "default.hello");
    // A watch that is being awaited throughout, as a host awaits its assignments.
    let (forward, mut forwarded) = tokio::sync::mpsc::unbounded_channel();
    let mut awaited = kv.watch("default.*").await.expect("watch");
    tokio::spawn(async move {
        while let Some(event) = awaited.next().await {
            if forward.send(event).is_err() {
                break;
            }
        }
    });
    let replayed = tokio::time::timeout(PATIENCE, forwarded.recv())
        .await
        .expect("replay");
    assert_eq!(replayed.expect("watch ended").key, "default.hello");
    let mut state = bus.connection_changes();

    server.stop();
    tokio::time::timeout(
        PATIENCE,
        state.wait_for(|state| *state == ConnectionState::Disconnected),
    )
    .await
    .expect("no disconnect noticed")
    .expect("state channel closed");
    assert!(!bus.is_connected());

    server.start_again();
    tokio::time::timeout(
        PATIENCE,
        state.wait_for(|state| *state == ConnectionState::Connected),
    )
    .await
    .expect("did not reconnect")
    .expect("state channel closed");

    // JetStream kept the bucket, and the subscription was renewed.
    let entry = kv
        .get("default.hello")
        .await
        .expect("get")
        .expect("entry kept");
    assert_eq!(entry.value, "spec");
    bus.publish("events.after", Bytes::from_static(b"x"))
        .await
        .expect("publish");
    let message = tokio::time::timeout(PATIENCE, events.next())
        .await
        .expect("no message after reconnect")
        .expect("subscription ended");
    assert_eq!(message.subject, "events.after");

    // The watch follows changes made after the restart, at once: without
    // renewal, async-nats would notice its consumer is gone only after
    // missing heartbeats for 10 s.
    let revision = kv
        .put("default.after", Bytes::from_static(b"new"))
        .await
        .expect("put");
    let event = tokio::time::timeout(Duration::from_secs(2), watch.next())
        .await
        .expect("watch saw no change within 2 s of the restart")
        .expect("watch ended");
    assert_eq!(
        (event.key.as_str(), event.revision),
        ("default.after", revision)
    );
    let event = tokio::time::timeout(Duration::from_secs(2), forwarded.recv())
        .await
        .expect("awaited watch saw no change within 2 s of the restart")
        .expect("watch ended");
    assert_eq!(
        (event.key.as_str(), event.revision),
        ("default.after", revision)
    );
}

/// A server with accounts: Wharf's users in WHARF (with JetStream), another
/// application's user in OTHER, and a system account user.
fn server_with_a_system_account() -> NatsServer {
    NatsServer::start_with_config(
        r#"
        accounts {
          WHARF: { jetstream: enabled, users: [ { user: scheduler, password: s }, { user: host, password: h } ] }
          OTHER: { jetstream: enabled, users: [ { user: other, password: o } ] }
          SYS: { users: [ { user: system, password: sys } ] }
        }
        system_account: SYS
        "#,
    )
}

fn user(user: &str, password: &str) -> NatsAuth {
    NatsAuth::UserPassword {
        user: user.to_owned(),
        password: password.to_owned(),
    }
}

/// Options for `name` as `user`, with or without the system account.
fn options(name: &str, auth: NatsAuth, system_auth: Option<NatsAuth>) -> NatsOptions {
    NatsOptions {
        name: name.to_owned(),
        auth,
        system_auth,
        ..NatsOptions::default()
    }
}

/// A scheduler's bus on `server`, with the system account, and its disconnect advisories.
async fn listen_for_disconnects(server: &NatsServer) -> (Bus, wharf_bus::ClientDisconnects) {
    let scheduler = Bus::connect_nats(
        &server.url(),
        options(
            "wharf-scheduler",
            user("scheduler", "s"),
            Some(user("system", "sys")),
        ),
    )
    .await
    .expect("connect with the system account");
    let disconnects = scheduler.client_disconnects().await.expect("advisories");
    (scheduler, disconnects)
}

/// The next disconnect, or a panic after `within`.
async fn next_gone(disconnects: &mut wharf_bus::ClientDisconnects, within: Duration) -> ClientGone {
    tokio::time::timeout(within, disconnects.next())
        .await
        .unwrap_or_else(|_| panic!("no disconnect advisory within {within:?}"))
        .expect("the advisories ended")
}

/// Set in the child process of [`a_killed_client_is_reported_within_a_second`], to the server's URL.
const DISCONNECT_CHILD_VAR: &str = "WHARF_BUS_DISCONNECT_CHILD";

#[tokio::test]
async fn a_killed_client_is_reported_within_a_second() {
    if let Some(url) = std::env::var_os(DISCONNECT_CHILD_VAR) {
        // The child: connect as a host would, say so, and wait to be killed.
        let url = url.to_string_lossy().into_owned();
        let _bus = Bus::connect_nats(&url, options("wharf-host-x", user("host", "h"), None))
            .await
            .expect("the child connects");
        println!("connected");
        tokio::time::sleep(Duration::from_secs(600)).await;
        return;
    }

    let server = server_with_a_system_account();
    let (_scheduler, mut disconnects) = listen_for_disconnects(&server).await;

    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "a_killed_client_is_reported_within_a_second",
            "--nocapture",
        ])
        .env(DISCONNECT_CHILD_VAR, server.url())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the child");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("child stdout")).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line == "connected" => break,
            Some(Ok(_)) => {}
            other => panic!("the child ended before connecting: {other:?}"),
        }
    }
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    // Once reaped, the kernel has closed the child's socket: from here on
    // it is the server's and the bus's time.
    let killed = Instant::now();

    let gone = next_gone(&mut disconnects, Duration::from_secs(5)).await;
    let elapsed = killed.elapsed();
    assert_eq!(gone.name, "wharf-host-x");
    assert_eq!(gone.user, "host");
    assert_eq!(gone.account, "WHARF");
    assert_eq!(gone.reason, DisconnectReason::ClientClosed);
    assert!(!gone.server.is_empty());
    assert!(
        elapsed < Duration::from_secs(1),
        "reported after {elapsed:?}"
    );
}

#[tokio::test]
async fn disconnects_are_those_of_the_bus_account_only() {
    let server = server_with_a_system_account();
    let (_scheduler, mut disconnects) = listen_for_disconnects(&server).await;

    // Another application's client leaves first, then one of Wharf's: the
    // server sends their advisories in that order, so receiving Wharf's
    // first shows the other one was not delivered.
    let other = Bus::connect_nats(
        &server.url(),
        options("not-wharf", user("other", "o"), None),
    )
    .await
    .expect("connect");
    let host = Bus::connect_nats(
        &server.url(),
        options("wharf-host-y", user("host", "h"), None),
    )
    .await
    .expect("connect");
    drop(other);
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(host);
    let gone = next_gone(&mut disconnects, PATIENCE).await;
    assert_eq!(
        (gone.name.as_str(), gone.account.as_str()),
        ("wharf-host-y", "WHARF")
    );
    assert_eq!(gone.reason, DisconnectReason::ClientClosed);
}

#[tokio::test]
async fn disconnects_need_the_system_account() {
    let server = server_with_a_system_account();
    let bus = Bus::connect_nats(
        &server.url(),
        options("wharf-scheduler", user("scheduler", "s"), None),
    )
    .await
    .expect("connect");
    let err = bus
        .client_disconnects()
        .await
        .err()
        .expect("no system account");
    assert!(matches!(err, DisconnectsError::NotConfigured), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("--nats-system-user") && message.contains("heartbeats"),
        "{message}"
    );

    let err = Bus::connect_nats(
        &server.url(),
        options(
            "wharf-scheduler",
            user("scheduler", "s"),
            Some(user("system", "wrong")),
        ),
    )
    .await
    .err()
    .expect("a wrong system password");
    assert!(
        matches!(&err, ConnectError::SystemAccount { source, .. } if matches!(**source, ConnectError::Unauthorized { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("system account"), "{err}");

    let err = Bus::connect_nats(
        &server.url(),
        options(
            "wharf-scheduler",
            user("scheduler", "s"),
            Some(user("other", "o")),
        ),
    )
    .await
    .err()
    .expect("an ordinary user as the system account");
    assert!(
        matches!(err, ConnectError::NotSystemAccount { .. }),
        "{err:?}"
    );
}

/// A bus whose consumers a broker makes gets the broker's refusal, with its
/// reason, when the policy denies an ask; and an ask for delivery into
/// another client's inbox is refused by a policy that checks it.
#[tokio::test]
async fn a_consumer_broker_refuses_what_its_policy_denies_and_says_why() {
    let server = NatsServer::start();
    let broker = Bus::connect_nats(&server.url(), NatsOptions::default()).await.expect("connect the broker");
    let policy: wharf_bus::ConsumerPolicy = std::sync::Arc::new(common::OwnInboxes { private: Some("KV_private") });
    broker.serve_consumer_broker("test.consumers.*", "brokers", policy).await.expect("serve");
    broker.kv("private").await.expect("bucket private");
    let public = broker.kv("public").await.expect("bucket public");
    public.put("k", Bytes::from_static(b"v")).await.expect("put");

    let url = server.url();
    let client = |inbox: &str| {
        let options = NatsOptions {
            inbox_prefix: Some(inbox.to_owned()),
            consumer_broker: Some("test.consumers.alice".to_owned()),
            ..NatsOptions::default()
        };
        Bus::connect_nats(&url, options)
    };
    let alice = client("_INBOX.alice").await.expect("alice connects");
    let private = alice.kv("private").await.expect("open private");
    let err = private.watch(">").await.err().expect("the broker refuses a watch on private");
    assert!(err.to_string().contains("alice may not read bucket private"), "{err}");
    let err = private.keys().await.expect_err("and a listing");
    assert!(err.to_string().contains("may not read bucket private"), "{err}");

    // Allowed: a watch on public delivers into alice's inbox.
    let mut watch = alice.kv("public").await.expect("open public").watch(">").await.expect("watch public");
    let event = tokio::time::timeout(PATIENCE, watch.next()).await.expect("an event in time").expect("the watch goes on");
    assert_eq!((event.key.as_str(), event.value.as_deref()), ("k", Some(&b"v"[..])));

    // A client claiming to be alice with other inboxes: its asks would be
    // answered (and delivered) onto subjects that are not alice's, so the
    // broker drops them unanswered.
    let mallory = client("_INBOX.mallory").await.expect("mallory connects");
    let err = mallory.kv("public").await.expect("open public").keys().await.expect_err("unanswered");
    assert!(err.to_string().contains("did not answer"), "{err}");
}

/// A data broker for tests: answers only into the asker's own inboxes,
/// and lets it use only the bucket named after it (`data-<asker>`).
struct OwnBucket;

impl wharf_bus::DataRules for OwnBucket {
    fn may_answer(&self, asker: &str, reply: &str) -> bool {
        reply.starts_with(&format!("_INBOX.{asker}."))
    }

    fn allows(&self, asker: &str, ask: &wharf_bus::DataAsk) -> Result<(), String> {
        // A publish or a request: only on the asker's own `msg.<asker>.…`.
        if let Some(subject) = ask.subject() {
            return if subject.starts_with(&format!("msg.{asker}.")) { Ok(()) } else { Err(format!("{asker} may not use {subject}")) };
        }
        if ask.bucket() == format!("data-{asker}") { Ok(()) } else { Err(format!("{asker} may not use {}", ask.bucket())) }
    }
}

/// Publishes and requests on a connection's brokered subjects are made by
/// the data broker: a publish goes out naming no reply subject (a stream
/// storing it would acknowledge there), a request's reply, its lack of
/// responders or its time running out comes back as the bus's own answer
/// (the request sent from the broker's inbox), a subject the policy
/// denies is refused with the reason and nothing is published, and other
/// subjects go to the server directly.
#[tokio::test]
async fn brokered_subjects_are_published_and_requested_by_the_data_broker() {
    let server = NatsServer::start();
    let broker = Bus::connect_nats(&server.url(), NatsOptions::default()).await.expect("connect the broker");
    broker.serve_data_broker("test.data.*", "brokers", std::sync::Arc::new(OwnBucket)).await.expect("serve");
    let options = NatsOptions {
        inbox_prefix: Some("_INBOX.alice".to_owned()),
        data_broker: Some("test.data.alice".to_owned()),
        brokered_subjects: vec!["msg.".to_owned()],
        ..NatsOptions::default()
    };
    let alice = Bus::connect_nats(&server.url(), options).await.expect("alice connects");
    let watcher = async_nats::connect(server.url()).await.expect("a plain client");
    let mut seen = watcher.subscribe("msg.alice.hello").await.expect("subscribed");
    let mut questions_seen = watcher.subscribe("msg.alice.ask").await.expect("subscribed");
    let mut bobs = watcher.subscribe("msg.bob.>").await.expect("subscribed");
    let mut direct = watcher.subscribe("other.>").await.expect("subscribed");
    watcher.flush().await.expect("flushed");

    alice.publish("msg.alice.hello", Bytes::from_static(b"hi")).await.expect("published");
    let got = tokio::time::timeout(Duration::from_secs(5), seen.next()).await.expect("in time").expect("a message");
    assert_eq!((got.subject.as_str(), &got.payload[..], got.reply), ("msg.alice.hello", &b"hi"[..], None));

    let mut questions = broker.subscribe("msg.alice.ask").await.expect("subscribed");
    let answerer = broker.clone();
    tokio::spawn(async move {
        while let Some(question) = questions.next().await {
            let answer = [&b"re: "[..], &question.payload[..]].concat();
            answerer.respond(&question, Bytes::from(answer)).await.expect("answered");
        }
    });
    let reply = alice.request("msg.alice.ask", Bytes::from_static(b"q1"), Duration::from_secs(5)).await.expect("a reply");
    assert_eq!(&reply.payload[..], b"re: q1");
    let asked = tokio::time::timeout(Duration::from_secs(5), questions_seen.next()).await.expect("in time").expect("the question");
    assert!(asked.reply.as_deref().is_some_and(|reply| !reply.starts_with("_INBOX.alice")), "the broker's inbox, not alice's: {asked:?}");
    let none = alice.request("msg.alice.nobody", Bytes::new(), Duration::from_secs(2)).await.expect_err("no one listens");
    assert!(matches!(none, wharf_bus::RequestError::NoResponders { .. }), "{none:?}");
    // The watcher listens on msg.alice.hello and never answers.
    let late = alice.request("msg.alice.hello", Bytes::new(), Duration::from_secs(1)).await.expect_err("no answer");
    assert!(matches!(late, wharf_bus::RequestError::TimedOut { .. }), "{late:?}");
    assert!(seen.next().await.is_some_and(|m| m.payload.is_empty()), "the unanswered request was sent");

    let err = alice.publish("msg.bob.x", Bytes::from_static(b"as bob")).await.expect_err("refused");
    assert!(err.to_string().contains("alice may not use msg.bob.x"), "{err}");
    let err = alice.request("msg.bob.ask", Bytes::new(), Duration::from_secs(2)).await.expect_err("refused");
    assert!(err.to_string().contains("alice may not use msg.bob.ask"), "{err}");
    let stray = tokio::time::timeout(Duration::from_millis(300), bobs.next()).await;
    assert!(stray.is_err(), "nothing was published for a refused ask: {stray:?}");

    alice.publish("other.x", Bytes::from_static(b"straight")).await.expect("published");
    let got = tokio::time::timeout(Duration::from_secs(5), direct.next()).await.expect("in time").expect("a message");
    assert_eq!(&got.payload[..], b"straight");
}

/// Calls made through a data broker keep the bucket's contract: revisions,
/// create refusing an existing key, compare-and-set, deletes, pages of
/// keys, the value limit, each error as its own variant; a bucket the
/// policy denies is refused with the reason, after the broker has looked
/// again for a while; an ask from a client whose inboxes are not the
/// asker's goes unanswered.
#[tokio::test]
async fn a_data_broker_keeps_the_bucket_contract_and_refuses_what_its_policy_denies() {
    let server = NatsServer::start();
    let broker = Bus::connect_nats(&server.url(), NatsOptions::default()).await.expect("connect the broker");
    broker.serve_data_broker("test.data.*", "brokers", std::sync::Arc::new(OwnBucket)).await.expect("serve");
    broker.kv("data-alice").await.expect("bucket");
    broker.kv("data-bob").await.expect("bucket");
    let url = server.url();
    let client = |inbox: &str| {
        let options = NatsOptions { inbox_prefix: Some(inbox.to_owned()), data_broker: Some("test.data.alice".to_owned()), ..NatsOptions::default() };
        Bus::connect_nats(&url, options)
    };
    let alice = client("_INBOX.alice").await.expect("alice connects");
    let kv = alice.kv("data-alice").await.expect("open");
    let first = kv.put("a.one", Bytes::from_static(b"1")).await.expect("put");
    let second = kv.create("a.two", Bytes::from_static(b"2")).await.expect("create");
    assert!(second > first);
    assert!(matches!(kv.create("a.two", Bytes::from_static(b"x")).await, Err(KvError::AlreadyExists { .. })));
    assert!(matches!(kv.update("a.two", Bytes::from_static(b"x"), first).await, Err(KvError::RevisionMismatch { .. })));
    let third = kv.update("a.two", Bytes::from_static(b"3"), second).await.expect("compare-and-set");
    let entry = kv.get("a.two").await.expect("get").expect("a value");
    assert_eq!((&entry.value[..], entry.revision), (&b"3"[..], third));
    kv.delete("a.one").await.expect("delete");
    assert_eq!(kv.get("a.one").await.expect("get"), None);
    kv.put("b.three", Bytes::from_static(b"4")).await.expect("put");
    let page = kv.keys_page("a.", 0, 10).await.expect("page");
    assert_eq!((page.keys, page.next), (vec!["a.two".to_string()], None));
    assert_eq!(kv.keys().await.expect("keys"), vec!["a.two".to_string(), "b.three".to_string()]);
    let big = Bytes::from(vec![0u8; kv.max_value() + 1]);
    assert!(matches!(kv.put("a.big", big).await, Err(KvError::ValueTooLarge { .. })));
    // Seen from the broker's side: the same bucket, written.
    let direct = broker.kv("data-alice").await.expect("bucket");
    assert_eq!(direct.get("a.two").await.expect("get").map(|e| e.value), Some(Bytes::from_static(b"3")));

    // Another bucket: refused, with the policy's reason.
    let err = alice.kv("data-bob").await.expect("open").put("x", Bytes::from_static(b"1")).await.expect_err("refused");
    assert!(err.to_string().contains("alice may not use data-bob"), "{err}");
    assert_eq!(broker.kv("data-bob").await.expect("bucket").keys().await.expect("keys"), Vec::<String>::new());
    // A client claiming to be alice, with other inboxes: no answer.
    let mallory = client("_INBOX.mallory").await.expect("mallory connects");
    let err = mallory.kv("data-alice").await.expect("open").get("a.two").await.expect_err("unanswered");
    assert!(err.to_string().contains("did not answer"), "{err}");
    // Without a data broker, the same call opens the bucket itself.
    let plain = Bus::connect_nats(&url, NatsOptions::default()).await.expect("connect");
    assert_eq!(plain.kv("data-alice").await.expect("open").get("a.two").await.expect("get").map(|e| e.value), Some(Bytes::from_static(b"3")));
}

/// One data ask as the bus frames it (see `nats/data.rs`): its JSON
/// header's length, the header, then the value.
fn framed_ask(header: &serde_json::Value, value: &[u8]) -> Bytes {
    let json = serde_json::to_vec(header).expect("json");
    let mut out = (u32::try_from(json.len()).expect("short")).to_be_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(value);
    Bytes::from(out)
}

/// The JSON header of a data broker's answer.
fn answer_header(payload: &[u8]) -> serde_json::Value {
    let length = u32::from_be_bytes(payload[..4].try_into().expect("four bytes")) as usize;
    serde_json::from_slice(&payload[4..4 + length]).expect("a JSON header")
}

/// An ask that arrives twice under one id (its answer was lost, say, with
/// a NATS server, and the asker sent it again) is carried out once: an
/// increment counts once and both answers give the same number; a create
/// answers both times with its revision rather than "already exists". The
/// same ask under another id is a new call.
#[tokio::test]
async fn a_data_ask_sent_again_under_its_id_is_carried_out_once() {
    let server = NatsServer::start();
    let broker = Bus::connect_nats(&server.url(), NatsOptions::default()).await.expect("connect the broker");
    broker.serve_data_broker("test.data.*", "brokers", std::sync::Arc::new(OwnBucket)).await.expect("serve");
    let direct = broker.kv("data-alice").await.expect("bucket");
    let alice = async_nats::ConnectOptions::new().custom_inbox_prefix("_INBOX.alice").connect(server.url()).await.expect("a plain client");
    let ask = |header: serde_json::Value, id: &str| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Wharf-Ask-Id", id);
        let request = async_nats::Request::new().payload(framed_ask(&header, b"")).headers(headers).timeout(Some(Duration::from_secs(10)));
        let alice = alice.clone();
        async move { answer_header(&alice.send_request("test.data.alice", request).await.expect("answered").payload) }
    };
    let increment = serde_json::json!({"op": "increment", "bucket": "data-alice", "key": "count", "delta": 5});
    let first = ask(increment.clone(), "ask-1").await;
    let again = ask(increment.clone(), "ask-1").await;
    assert_eq!((first["revision"].as_u64(), again["revision"].as_u64()), (Some(5), Some(5)), "{first} {again}");
    assert_eq!(direct.get("count").await.expect("get").map(|e| e.value), Some(Bytes::from_static(b"5")), "counted once");
    assert_eq!(ask(increment, "ask-2").await["revision"].as_u64(), Some(10), "another id is another increment");

    let create = serde_json::json!({"op": "create", "bucket": "data-alice", "key": "made"});
    let first = ask(create.clone(), "ask-3").await;
    let again = ask(create.clone(), "ask-3").await;
    assert!(first["failed"].is_null() && first["revision"].as_u64().is_some(), "{first}");
    assert_eq!(first, again, "the same create, answered the same");
    assert_eq!(ask(create, "ask-4").await["failed"]["kind"], "already_exists");
}

/// An ask whose answer does not come (it was lost with a server) is sent
/// again, under the same id, and the call succeeds once a broker answers;
/// with no broker at all the call fails with a clear error rather than
/// hanging.
#[tokio::test]
async fn a_data_ask_left_unanswered_is_sent_again() {
    let server = NatsServer::start();
    let url = server.url();
    let options = NatsOptions { inbox_prefix: Some("_INBOX.alice".to_owned()), data_broker: Some("test.data.alice".to_owned()), ..NatsOptions::default() };
    let alice = Bus::connect_nats(&url, options).await.expect("alice connects");
    let kv = alice.kv("data-alice").await.expect("open");

    // No broker: a clear error, within the patience for a missing broker.
    let started = Instant::now();
    let err = kv.get("k").await.expect_err("no broker");
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "gave up after {:?}", started.elapsed());

    // The first sending is swallowed, as a server that dies with it would.
    let hole = async_nats::connect(&url).await.expect("connect");
    let mut swallowed = hole.subscribe("test.data.alice").await.expect("subscribe");
    hole.flush().await.expect("flush");
    let write = tokio::spawn(async move { kv.increment("n", 1).await });
    let first = tokio::time::timeout(Duration::from_secs(10), swallowed.next()).await.expect("the ask arrives").expect("a message");
    drop(swallowed);
    let broker = Bus::connect_nats(&url, NatsOptions::default()).await.expect("connect the broker");
    broker.serve_data_broker("test.data.*", "brokers", std::sync::Arc::new(OwnBucket)).await.expect("serve");
    assert_eq!(write.await.expect("joins").expect("the ask was sent again and answered"), 1);
    // The sending that reached the broker carried the swallowed one's id.
    let id = first.headers.as_ref().and_then(|h| h.get("Wharf-Ask-Id")).map(|id| id.to_string()).expect("an ask id");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Wharf-Ask-Id", id.as_str());
    let repeat = async_nats::Request::new().payload(first.payload.clone()).headers(headers).timeout(Some(Duration::from_secs(10)));
    let alice_raw = async_nats::ConnectOptions::new().custom_inbox_prefix("_INBOX.alice").connect(&url).await.expect("a plain client");
    let answer = answer_header(&alice_raw.send_request("test.data.alice", repeat).await.expect("answered").payload);
    assert_eq!(answer["revision"].as_u64(), Some(1), "the lost ask, arriving late, does not count again: {answer}");
    assert_eq!(broker.kv("data-alice").await.expect("bucket").get("n").await.expect("get").map(|e| e.value), Some(Bytes::from_static(b"1")));
}
