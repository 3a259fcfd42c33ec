//! What only the NATS bus has to show: clear connect errors, authentication,
//! the server's limits, and reconnecting by itself after the server restarts.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use wharf_bus::{Bus, ConnectError, ConnectionState, NatsAuth, NatsOptions};
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
