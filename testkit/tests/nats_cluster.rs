//! The cluster harness itself: three real nats-servers form one JetStream
//! cluster, and a node killed, stopped or restarted behaves as a real one does.
//!
//! The checks speak the NATS text protocol over a `TcpStream` and read the
//! servers' monitoring endpoints, so the harness is tested without the bus it
//! exists to test.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};
use wharf_testkit::nats::NatsCluster;

/// Talks the NATS protocol to one server: reads its INFO, then sends requests.
struct RawClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    info: Value,
}

impl RawClient {
    fn connect(url: &str) -> RawClient {
        let address = url.trim_start_matches("nats://");
        let stream = TcpStream::connect(address).expect("connect to the node");
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("read timeout");
        let writer = stream.try_clone().expect("clone the stream");
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).expect("INFO line");
        let info =
            serde_json::from_str(line.trim_start_matches("INFO ").trim()).expect("INFO JSON");
        let mut client = RawClient {
            reader,
            writer,
            info,
        };
        client.send("CONNECT {\"verbose\":false,\"headers\":true}\r\nSUB _INBOX.raw 1\r\n");
        client
    }

    fn send(&mut self, text: &str) {
        self.writer
            .write_all(text.as_bytes())
            .expect("write to the node");
    }

    /// Sends `payload` to `subject` and returns the JSON reply.
    fn request(&mut self, subject: &str, payload: &Value) -> Value {
        self.try_request(subject, payload)
            .unwrap_or_else(|| panic!("no reply on {subject}"))
    }

    /// Like [`RawClient::request`]; `None` if no reply comes within the read
    /// timeout (as when JetStream has no stream leader to answer).
    fn try_request(&mut self, subject: &str, payload: &Value) -> Option<Value> {
        let body = payload.to_string();
        self.send(&format!(
            "PUB {subject} _INBOX.raw {}\r\n{body}\r\n",
            body.len()
        ));
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).ok()?;
            if line.starts_with("PING") {
                self.send("PONG\r\n");
            } else if line.starts_with("MSG ") {
                let mut body = String::new();
                self.reader.read_line(&mut body).ok()?;
                return Some(serde_json::from_str(body.trim()).expect("reply JSON"));
            }
        }
    }
}

/// Every node's view of stream `name` (messages it holds), from its monitoring endpoint.
fn stream_messages(cluster: &NatsCluster, index: usize, name: &str) -> Option<u64> {
    let jsz = cluster.monitor(index, "/jsz?accounts=true&streams=true")?;
    jsz["account_details"]
        .as_array()?
        .iter()
        .filter_map(|account| account["stream_detail"].as_array())
        .flatten()
        .find(|detail| detail["name"] == name)?["state"]["messages"]
        .as_u64()
}

#[test]
fn three_nodes_form_one_jetstream_cluster() {
    let cluster = NatsCluster::start(3);
    assert_eq!(cluster.size(), 3);
    let urls: Vec<String> = (0..3).map(|index| cluster.url(index)).collect();
    assert_eq!(cluster.urls(), urls.join(","));
    for (index, url) in urls.iter().enumerate() {
        let client = RawClient::connect(url);
        assert_eq!(client.info["server_name"], format!("n{index}"));
        assert_eq!(client.info["jetstream"], true);
        let connect_urls = client.info["connect_urls"]
            .as_array()
            .expect("connect_urls");
        assert_eq!(connect_urls.len(), 3, "{:?}", client.info);
    }
    // A stream with three replicas needs all three JetStream peers.
    let mut client = RawClient::connect(&urls[0]);
    let created = client.request(
        "$JS.API.STREAM.CREATE.T",
        &json!({"name": "T", "subjects": ["t.>"], "num_replicas": 3}),
    );
    assert_eq!(created["config"]["num_replicas"], 3, "{created}");
    assert_eq!(
        created["cluster"]["replicas"].as_array().map(Vec::len),
        Some(2),
        "{created}"
    );
    assert!(cluster.stream_leader("T").is_some());
    assert_eq!(cluster.stream_replicas("T"), Some(3));
}

#[test]
fn a_killed_node_comes_back_on_its_ports_with_its_store() {
    let mut cluster = NatsCluster::start(3);
    let mut client = RawClient::connect(&cluster.url(0));
    client.request(
        "$JS.API.STREAM.CREATE.T",
        &json!({"name": "T", "subjects": ["t.>"], "num_replicas": 3}),
    );
    let ack = client.request("t.one", &json!({"n": 1}));
    assert_eq!(ack["seq"], 1, "{ack}");
    let victim = cluster.stream_leader("T").expect("stream T has a leader");
    let url = cluster.url(victim);

    cluster.kill(victim);
    assert!(!cluster.is_running(victim));
    assert!(
        TcpStream::connect(url.trim_start_matches("nats://")).is_err(),
        "a killed node still accepts connections"
    );
    // The survivors elect new leaders, for the meta group and the stream.
    cluster.wait_until_ready();
    let survivor = (0..3).find(|index| *index != victim).expect("a survivor");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let ack = loop {
        // A fresh connection per attempt, so a late reply to an earlier one cannot be mistaken for this one's.
        let mut client = RawClient::connect(&cluster.url(survivor));
        match client.try_request("t.two", &json!({"n": 2})) {
            Some(ack) if ack["seq"].is_u64() => break ack,
            // No stream leader yet: JetStream answers with an error, or not at all, until one is elected.
            reply => assert!(
                std::time::Instant::now() < deadline,
                "no stream leader within 30 s: {reply:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(ack["seq"], 2, "{ack}");
    assert_ne!(cluster.stream_leader("T"), Some(victim));

    cluster.restart(victim);
    assert!(cluster.is_running(victim));
    assert_eq!(cluster.url(victim), url, "restarted on another port");
    // Its store kept the first message, and it catches up with the second.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stream_messages(&cluster, victim, "T") != Some(2) {
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted node holds {:?} messages of T",
            stream_messages(&cluster, victim, "T")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_stopped_node_leaves_and_rejoins() {
    let mut cluster = NatsCluster::start(3);
    cluster.stop(1);
    assert!(!cluster.is_running(1));
    assert!(TcpStream::connect(cluster.url(1).trim_start_matches("nats://")).is_err());
    let client = RawClient::connect(&cluster.url(0));
    assert_eq!(client.info["server_name"], "n0");

    cluster.restart(1);
    let client = RawClient::connect(&cluster.url(1));
    assert_eq!(client.info["server_name"], "n1");
    assert_eq!(
        client.info["connect_urls"].as_array().map(Vec::len),
        Some(3),
        "{:?}",
        client.info
    );
}
