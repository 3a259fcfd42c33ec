//! Message triggers across three real hosts over a real nats-server: 10,000
//! messages of a JetStream-backed trigger each handled exactly once (counted
//! in a key-value bucket), a failing handler redelivered then dead-lettered,
//! a component publishing and answering requests, a service at zero woken
//! by a message, publishing on another namespace's subject refused, a
//! looping handler stopped without holding up others, and a component
//! without the handler refused at deploy.

use futures::StreamExt;
use std::path::Path;
use std::time::{Duration, Instant};
use wharf_testkit::cluster::{Host, Scheduler};
use wharf_testkit::nats::NatsServer;
use wharf_testkit::samples;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

/// Messages of the exactly-once check.
const MESSAGES: usize = 10_000;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write manifest");
    path.to_str().expect("utf-8").to_string()
}

/// The stored values of the `messages` bucket of namespace `default`, by key.
async fn counts(js: &async_nats::jetstream::Context) -> std::collections::BTreeMap<String, String> {
    let kv = js.get_key_value("wharf-kv-default").await.expect("the namespace's data bucket");
    let mut keys = kv.keys().await.expect("keys");
    let mut counts = std::collections::BTreeMap::new();
    while let Some(key) = keys.next().await {
        let key = key.expect("key");
        if let Some(name) = key.strip_prefix("messages.") {
            let value = kv.get(&key).await.expect("get").map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default();
            counts.insert(name.to_string(), value);
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn message_triggers_across_three_hosts() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let wharf = Path::new(WHARF);
    let scheduler = Scheduler::start(wharf, &nats.url(), &dir.path().join("scheduler"), &[]);
    let hosts: Vec<Host> =
        [("host-a", "a"), ("host-b", "b"), ("host-c", "c")].iter().map(|(n, z)| Host::start(wharf, &nats.url(), n, z, dir.path(), &["--admin-listen", "127.0.0.1:0"])).collect();
    let client = async_nats::connect(nats.url()).await.expect("a test client");
    let js = async_nats::jetstream::new(client.clone());
    let messenger = samples::path("messenger");
    let messenger = messenger.display();

    // A component without the handler is refused at deploy, by the export's name.
    let refused = write(
        dir.path(),
        "refused.yaml",
        &format!("name: plain\ncomponent: {{ file: {} }}\ntriggers: [{{ subject: plain.> }}]\n", samples::path("hello").display()),
    );
    let (ok, out) = scheduler.wharf(&["apply", "-f", &refused]);
    assert!(!ok && out.contains("does not export `wasmcloud:messaging/handler@0.2.0`"), "{out}");
    let (ok, out) = scheduler.wharf(&["get", "services", "plain"]);
    assert!(!ok, "nothing was stored: {out}");

    // Three replicas, one per host, on a stream; a core trigger for requests.
    let manifest = write(
        dir.path(),
        "orders.yaml",
        &format!(
            "services:\n\
             - name: orders\n  component: {{ file: {messenger} }}\n  replicas: 3\n  placement: {{ spread: zone }}\n  limits: {{ concurrency: 64 }}\n  keyvalue: [messages]\n  routes: [{{ path_prefix: /orders }}]\n  triggers: [{{ subject: \"orders.>\", stream: orders, max_deliver: 3 }}]\n\
             - name: asker\n  component: {{ file: {messenger} }}\n  keyvalue: [messages]\n  limits: {{ timeout: 1s }}\n  triggers: [{{ subject: \"ask.>\" }}]\n"
        ),
    );
    scheduler.ok(&["apply", "-f", &manifest]);
    let table = scheduler.ok(&["get", "services"]);
    assert!(table.contains("/orders,msg:orders.>@orders") && table.contains("msg:ask.>"), "{table}");
    let mut placed = scheduler.hosts_of("orders");
    placed.sort();
    assert_eq!(placed, ["host-a", "host-b", "host-c"]);

    // Every host consumes: the stream exists once the first intake opened it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while js.get_stream("wharf-msg-default-orders").await.is_err() {
        assert!(Instant::now() < deadline, "no host created the trigger's stream");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 10,000 messages, each stored by the stream before we go on.
    let started = Instant::now();
    // In batches: the client holds at most a few thousand acks in flight.
    let mut acks = Vec::with_capacity(1000);
    for i in 0..MESSAGES {
        acks.push(js.publish(format!("wharf.msg.default.orders.{i}"), format!("m{i}").into()).await.expect("published"));
        if acks.len() == 1000 || i + 1 == MESSAGES {
            for ack in acks.drain(..) {
                ack.await.expect("stored by the stream");
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let counted = loop {
        let name = wharf_proto::trigger::consumer_name("orders", "orders.>");
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            js.get_consumer_from_stream(&name, "wharf-msg-default-orders").await.expect("the trigger's consumer");
        let info = consumer.info().await.expect("consumer info").clone();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break counts(&js).await;
        }
        assert!(Instant::now() < deadline, "not all messages were handled: {info:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let elapsed = started.elapsed();
    let handled: Vec<&String> = counted.keys().filter(|k| k.starts_with('m')).collect();
    assert_eq!(handled.len(), MESSAGES, "every message handled");
    let twice: Vec<(&String, &String)> = counted.iter().filter(|(k, v)| k.starts_with('m') && v.as_str() != "1").collect();
    assert!(twice.is_empty(), "handled more than once: {:?}", &twice[..twice.len().min(10)]);
    eprintln!("{MESSAGES} stream messages handled exactly once by three hosts in {elapsed:?}");

    // A failing handler: delivered max_deliver (3) times, then dead-lettered.
    let mut dead = client.subscribe("wharf.msg.default.dead-letter.orders").await.expect("subscribe");
    client.flush().await.expect("flush");
    js.publish("wharf.msg.default.orders.bad", "fail-once-more".into()).await.expect("publish").await.expect("stored");
    let letter = tokio::time::timeout(Duration::from_secs(30), dead.next()).await.expect("dead-lettered within 30 s").expect("a message");
    assert_eq!(&letter.payload[..], b"fail-once-more");
    assert_eq!(counts(&js).await.get("fail-once-more").map(String::as_str), Some("3"), "delivered three times");

    // A component publishes a message a test subscriber receives (from a
    // trigger's handler, and from an HTTP request).
    let mut news = client.subscribe("wharf.msg.default.news.>").await.expect("subscribe");
    client.flush().await.expect("flush");
    js.publish("wharf.msg.default.orders.announce", "publish news.today hello".into()).await.expect("publish").await.expect("stored");
    let got = tokio::time::timeout(Duration::from_secs(10), news.next()).await.expect("published within 10 s").expect("a message");
    assert_eq!((got.subject.as_str(), &got.payload[..]), ("wharf.msg.default.news.today", &b"hello"[..]));
    let http = reqwest::Client::new();
    let response = http.get(format!("{}/orders/publish?subject=news.http&body=hi", hosts[1].ingress)).send().await.expect("answered");
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let got = tokio::time::timeout(Duration::from_secs(10), news.next()).await.expect("published within 10 s").expect("a message");
    assert_eq!((got.subject.as_str(), &got.payload[..]), ("wharf.msg.default.news.http", &b"hi"[..]));

    // Publishing on another namespace's subject is refused, by name.
    let mut other = client.subscribe("wharf.msg.bank.>").await.expect("subscribe");
    client.flush().await.expect("flush");
    let response =
        http.get(format!("{}/orders/publish?subject=wharf.msg.bank.payments&body=steal", hosts[0].ingress)).send().await.expect("answered");
    let (status, text) = (response.status(), response.text().await.expect("body"));
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("subject wharf.msg.bank.payments belongs to namespace bank") && text.contains("default/orders"), "{text}");
    assert!(tokio::time::timeout(Duration::from_millis(300), other.next()).await.is_err(), "nothing reached namespace bank");

    // A core trigger with a reply subject: the handler answers the request.
    let reply = client.request("wharf.msg.default.ask.question", "q1".into()).await.expect("an answer");
    assert_eq!(&reply.payload[..], b"handled q1");

    // A handler that loops is stopped at its deadline; meanwhile the same
    // service and the others keep answering.
    client.publish("wharf.msg.default.ask.loop", "spin".into()).await.expect("publish");
    client.flush().await.expect("flush");
    let asked = Instant::now();
    let reply = client.request("wharf.msg.default.ask.again", "q2".into()).await.expect("an answer beside a looping handler");
    assert_eq!(&reply.payload[..], b"handled q2");
    assert!(asked.elapsed() < Duration::from_millis(900), "answered in {:?}, before the loop's deadline", asked.elapsed());

    // A service at zero is woken by a message, which is then handled.
    let sleepy = write(
        dir.path(),
        "sleepy.yaml",
        &format!(
            "name: sleepy\ncomponent: {{ file: {messenger} }}\nreplicas: 0\nkeyvalue: [messages]\n\
             autoscale: {{ min: 0, max: 1, scale_down_delay: 1s, scale_to_zero_after: 30s, stable_window: 6s }}\n\
             triggers: [{{ subject: \"wake.>\" }}]\n"
        ),
    );
    scheduler.ok(&["apply", "--no-wait", "-f", &sleepy]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(scheduler.hosts_of("sleepy").is_empty(), "at zero before the message");
    let woken = Instant::now();
    let request = async_nats::Request::new().payload("up".into()).timeout(Some(Duration::from_secs(30)));
    let reply = client.send_request("wharf.msg.default.wake.now", request).await.expect("woken and answered");
    assert_eq!(&reply.payload[..], b"handled up");
    eprintln!("a service at zero answered its first message in {:?}", woken.elapsed());
}

/// Single-node `wharf up` (the in-process bus): a core trigger fed by
/// another component's publish, a component with only the message handler
/// answering another's request, and a stream trigger refused at deploy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_triggers_in_one_process_and_streams_refused_without_nats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = wharf_testkit::wharf::Up::start(Path::new(WHARF), &dir.path().join("data"), &["--host-id", "one"]);
    let messenger = samples::path("messenger");
    let messenger = messenger.to_str().expect("utf-8");
    up.ok(&["deploy", messenger, "--name", "sender", "--route", "/sender"]);
    up.ok(&["deploy", messenger, "--name", "worker", "--keyvalue", "messages", "--trigger", "work.>"]);
    let table = up.ok(&["get", "services"]);
    assert!(table.contains("msg:work.>"), "{table}");

    let http = reqwest::Client::new();
    let response = http.get(format!("{}/sender/publish?subject=work.item&body=item-1", up.ingress)).send().await.expect("answered");
    assert_eq!(response.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out) = up.wharf(&["kv", "get", "messages", "item-1"]);
        if ok && out.trim() == "1" {
            break;
        }
        assert!(Instant::now() < deadline, "the worker never counted the message: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Counted once the handler has returned, a moment after its write.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = http.get(format!("{}/metrics", up.admin)).send().await.expect("metrics").text().await.expect("body");
        if metrics.contains("wharf_trigger_messages_total{service=\"default/worker\",result=\"handled\"} 1") {
            break;
        }
        assert!(Instant::now() < deadline, "the message is not counted: {metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A component with only the message handler (no HTTP) answers requests
    // another component makes; without triggers it is refused at deploy.
    let listener = samples::path("listener");
    let listener = listener.to_str().expect("utf-8");
    up.ok(&["deploy", listener, "--name", "listener", "--trigger", "listen.>"]);
    let response = http.get(format!("{}/sender/request?subject=listen.now&body=hi", up.ingress)).send().await.expect("answered");
    let (status, text) = (response.status(), response.text().await.expect("body"));
    assert_eq!((status.as_u16(), text.as_str()), (200, "heard hi"));
    let (ok, out) = up.wharf(&["deploy", listener, "--name", "deaf"]);
    assert!(!ok && out.contains("does not export `wasi:http/incoming-handler`") && out.contains("add triggers"), "{out}");

    let (ok, out) = up.wharf(&["deploy", messenger, "--name", "streamer", "--trigger", "jobs.>@jobs"]);
    assert!(!ok && out.contains("JetStream streams need NATS"), "{out}");
    let (ok, _) = up.wharf(&["get", "services", "streamer"]);
    assert!(!ok, "nothing was stored");
}

/// Every scheduler takes in every triggered service's messages (a queue
/// group for core NATS, one durable consumer for a stream), so a killed
/// scheduler loses none of the intake: after it dies, every core request
/// is answered and every stream message published is handled once, through
/// the other scheduler; stream messages it held when killed are handled
/// too, within the consumer's 10 s ack wait (with the 40 s budget here;
/// the ack wait was 2 × (timeout + 40 s) before progress acks).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_intake_goes_on_through_the_other_scheduler_when_one_is_killed() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let wharf = Path::new(WHARF);
    let mut first = Scheduler::start(wharf, &nats.url(), &dir.path().join("s1"), &["--name", "s1"]);
    let second = Scheduler::start(wharf, &nats.url(), &dir.path().join("s2"), &["--name", "s2"]);
    let _host = Host::start(wharf, &nats.url(), "host-a", "a", dir.path(), &[]);
    let client = async_nats::connect(nats.url()).await.expect("a test client");
    let js = async_nats::jetstream::new(client.clone());
    let messenger = samples::path("messenger");
    let manifest = write(
        dir.path(),
        "triggered.yaml",
        &format!(
            "services:\n\
             - name: orders\n  component: {{ file: {m} }}\n  keyvalue: [messages]\n  triggers: [{{ subject: \"orders.>\", stream: orders }}]\n\
             - name: asker\n  component: {{ file: {m} }}\n  keyvalue: [messages]\n  triggers: [{{ subject: \"ask.>\" }}]\n",
            m = messenger.display()
        ),
    );
    first.ok(&["apply", "-f", &manifest]);
    let ask = |body: String| {
        let client = client.clone();
        async move {
            let request = async_nats::Request::new().payload(body.into()).timeout(Some(Duration::from_secs(5)));
            client.send_request("wharf.msg.default.ask.q", request).await.map(|reply| String::from_utf8_lossy(&reply.payload).to_string())
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while ask("q0".into()).await.ok().as_deref() != Some("handled q0") {
        assert!(Instant::now() < deadline, "the core trigger never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Stream messages in flight when the scheduler dies: those it held
    // come back within the consumer's short ack wait (the live scheduler
    // keeps its own with progress acks), not after the handler's timeout.
    for i in 0..500 {
        js.publish(format!("wharf.msg.default.orders.{i}"), format!("before{i}").into()).await.expect("published").await.expect("stored");
    }
    first.process.kill();
    let killed = Instant::now();
    // The killed scheduler's subscription goes with its connection: every
    // request from now on is answered through the other.
    for i in 1..=20 {
        let body = format!("q{i}");
        assert_eq!(ask(body.clone()).await.expect("answered after a scheduler was killed"), format!("handled {body}"));
    }
    for i in 0..100 {
        js.publish(format!("wharf.msg.default.orders.{i}"), format!("after{i}").into()).await.expect("published").await.expect("stored");
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let counted = counts(&js).await;
        let after: Vec<(&String, &String)> = counted.iter().filter(|(k, _)| k.starts_with("after")).collect();
        let before = counted.keys().filter(|k| k.starts_with("before")).count();
        if after.len() == 100 && before == 500 {
            // Published after the kill: handled once. Before it, at least
            // once (one the killed scheduler handed over may run again).
            assert!(after.iter().all(|(_, v)| v.as_str() == "1"), "handled more than once: {after:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{before} of 500 messages published before the kill and {} of 100 after were handled", after.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("every stream message handled {:?} after a scheduler was killed", killed.elapsed());
    let (ok, out) = second.wharf(&["get", "services"]);
    assert!(ok && out.contains("orders"), "the other scheduler serves the API: {out}");
}

/// A stream message the control plane holds longer than the consumer's
/// ack wait (here: no host is up yet, so it waits for one) is not
/// delivered a second time meanwhile: the scheduler holding it sends
/// progress acks. When a host comes up 15 s later, it is handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_message_held_past_the_ack_wait_is_handled_once() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let wharf = Path::new(WHARF);
    let scheduler = Scheduler::start(wharf, &nats.url(), &dir.path().join("scheduler"), &[]);
    let client = async_nats::connect(nats.url()).await.expect("a test client");
    let js = async_nats::jetstream::new(client.clone());
    let manifest = write(
        dir.path(),
        "orders.yaml",
        &format!(
            "name: orders\ncomponent: {{ file: {} }}\nkeyvalue: [messages]\ntriggers: [{{ subject: \"orders.>\", stream: orders }}]\n",
            samples::path("messenger").display()
        ),
    );
    scheduler.ok(&["apply", "--no-wait", "-f", &manifest]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while js.get_stream("wharf-msg-default-orders").await.is_err() {
        assert!(Instant::now() < deadline, "the trigger's stream was not created");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    js.publish("wharf.msg.default.orders.one", "held".into()).await.expect("published").await.expect("stored");
    // Longer than the 10 s ack wait, shorter than the 40 s a message waits for a host.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let _host = Host::start(wharf, &nats.url(), "host-a", "a", dir.path(), &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !counts(&js).await.contains_key("held") {
        assert!(Instant::now() < deadline, "the held message was never handled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A second copy, had there been one, would follow at once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(counts(&js).await.get("held").map(String::as_str), Some("1"), "handled more than once");
}

/// Messages that together exceed a NATS message are not handed to a host
/// in one batch: two stream messages of 600 KB each (the handler
/// publishes each body on), pulled together, are both handled at their
/// first and only delivery (`max_deliver: 1`: a batch refused as too large
/// would dead-letter them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_that_arrive_together_are_handed_over_apart() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let wharf = Path::new(WHARF);
    let scheduler = Scheduler::start(wharf, &nats.url(), &dir.path().join("scheduler"), &[]);
    let _host = Host::start(wharf, &nats.url(), "host-a", "a", dir.path(), &[]);
    let client = async_nats::connect(nats.url()).await.expect("a test client");
    let js = async_nats::jetstream::new(client.clone());
    let manifest = write(
        dir.path(),
        "big.yaml",
        &format!("name: big\ncomponent: {{ file: {} }}\ntriggers: [{{ subject: \"big.>\", stream: big, max_deliver: 1 }}]\n", samples::path("messenger").display()),
    );
    // Both are stored before the service exists, so the intake's first
    // pull brings them together.
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "wharf-msg-default-big".into(),
        subjects: vec!["wharf.msg.default.big.>".into()],
        ..Default::default()
    })
    .await
    .expect("the stream");
    let mut out = client.subscribe("wharf.msg.default.out.>").await.expect("subscribe");
    client.flush().await.expect("flush");
    let text = "x".repeat(600 * 1024);
    for i in 0..2 {
        js.publish(format!("wharf.msg.default.big.{i}"), format!("publish out.{i} {text}").into()).await.expect("published").await.expect("stored");
    }
    scheduler.ok(&["apply", "-f", &manifest]);
    let mut got = Vec::new();
    while got.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(20), out.next()).await.expect("both handled within 20 s").expect("a message");
        assert_eq!(message.payload.len(), text.len());
        got.push(message.subject.to_string());
    }
    got.sort();
    assert_eq!(got, ["wharf.msg.default.out.0", "wharf.msg.default.out.1"]);
}
