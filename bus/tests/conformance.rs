//! One suite for both bus implementations: every case in `cases` runs against
//! an in-memory store, a redb file and a real nats-server, so that single-node
//! mode and NATS mode cannot drift apart unnoticed.

mod common;

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use wharf_bus::{Bus, LocalStore, Message, NatsOptions, Subscription};
use wharf_testkit::nats::NatsServer;

/// What a bus needs alive for the length of a test: its temp dir or its nats-server.
type Backing = Box<dyn std::any::Any>;

async fn local_memory() -> (Bus, Backing) {
    let store = LocalStore::in_memory().expect("in-memory store");
    (Bus::local(store), Box::new(()))
}

async fn local_redb() -> (Bus, Backing) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = LocalStore::open(dir.path().join("state.redb")).expect("redb store");
    (Bus::local(store), Box::new(dir))
}

async fn nats() -> (Bus, Backing) {
    let server = NatsServer::start();
    let bus = Bus::connect_nats(&server.url(), NatsOptions::default())
        .await
        .expect("connect to the test nats-server");
    (bus, Box::new(server))
}

/// A NATS bus whose consumers a broker makes (as a host's are): the
/// broker, a second bus, allows an ask only when it delivers into the
/// asker's own inboxes.
async fn nats_brokered() -> (Bus, Backing) {
    let server = NatsServer::start();
    let broker = Bus::connect_nats(&server.url(), NatsOptions::default())
        .await
        .expect("connect the broker");
    let policy: wharf_bus::ConsumerPolicy = std::sync::Arc::new(common::OwnInboxes { private: None });
    broker
        .serve_consumer_broker("conformance.consumers.*", "brokers", policy)
        .await
        .expect("serve consumer asks");
    let options = NatsOptions {
        inbox_prefix: Some("_INBOX.tenant".to_owned()),
        consumer_broker: Some("conformance.consumers.tenant".to_owned()),
        ..NatsOptions::default()
    };
    let bus = Bus::connect_nats(&server.url(), options)
        .await
        .expect("connect to the test nats-server");
    (bus, Box::new((server, broker)))
}

/// Instantiates every case once per implementation, as `<implementation>::<case>`.
macro_rules! conformance {
    ($($case:ident),+ $(,)?) => {
        conformance!(@each local_memory, $($case),+);
        conformance!(@each local_redb, $($case),+);
        conformance!(@each nats, $($case),+);
        conformance!(@each nats_brokered, $($case),+);
    };
    (@each $implementation:ident, $($case:ident),+) => {
        mod $implementation {
            $(
                #[tokio::test]
                async fn $case() {
                    let (bus, backing) = super::$implementation().await;
                    super::cases::$case(bus).await;
                    drop(backing);
                }
            )+
        }
    };
}

conformance!(
    publish_reaches_every_subscriber,
    star_matches_exactly_one_token,
    greater_than_matches_one_or_more_tokens,
    queue_group_delivers_each_message_to_one_member,
    request_gets_the_reply,
    new_inboxes_are_distinct_and_receive_what_is_sent_there,
    request_without_responders_fails_at_once,
    request_times_out_when_nobody_replies,
    payloads_over_max_payload_are_refused,
    invalid_names_are_refused,
    kv_revisions_count_every_change_per_bucket,
    kv_create_refuses_an_existing_key,
    kv_update_is_compare_and_set,
    kv_delete_makes_a_key_vacant,
    kv_keys_and_entries_list_live_keys,
    kv_watch_replays_current_values_then_follows_changes,
    kv_watch_pattern_filters_keys,
    kv_values_are_limited_like_nats_messages,
    kv_buckets_refuse_writes_past_their_limit,
    kv_with_updates_an_existing_bucket_and_kv_leaves_it_alone,
    kv_creates_state_buckets_with_the_bus_limits,
    kv_keys_page_reads_a_prefix_in_bounded_pages,
    kv_keys_longer_than_a_subject_may_be_are_refused,
    kv_identical_writes_are_each_a_write,
    objects_hold_large_blobs,
    objects_are_listed_and_deleted,
    objects_refuse_blobs_past_their_limit,
);

/// How long a test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(5);

/// The next message of `subscription`, or a panic after [`PATIENCE`].
async fn next(subscription: &mut Subscription) -> Message {
    tokio::time::timeout(PATIENCE, subscription.next())
        .await
        .expect("no message within 5 s")
        .expect("subscription ended")
}

/// Whether `subscription` stays silent for a moment.
async fn stays_silent(subscription: &mut Subscription) -> bool {
    tokio::time::timeout(Duration::from_millis(200), subscription.next())
        .await
        .is_err()
}

fn bytes(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

/// The cases, each a function of a fresh bus.
///
/// "Not delivered" is shown without sleeping where possible: a message that
/// must not arrive is published before one that must, and as each publisher's
/// messages arrive in order, receiving the second first proves the first was
/// not delivered.
mod cases {
    use std::collections::BTreeSet;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use futures::StreamExt;
    use wharf_bus::{
        BucketOptions, Bus, Kv, KvError, KvEvent, ObjectError, PublishError, RequestError,
        StorageLimits, SubscribeError,
    };

    use super::{PATIENCE, bytes, next, stays_silent};

    pub async fn publish_reaches_every_subscriber(bus: Bus) {
        let mut first = bus.subscribe("events.a").await.expect("subscribe");
        let mut second = bus.subscribe("events.a").await.expect("subscribe");
        bus.publish("events.a", bytes("one"))
            .await
            .expect("publish");
        bus.publish("events.a", bytes("two"))
            .await
            .expect("publish");
        for subscriber in [&mut first, &mut second] {
            let message = next(subscriber).await;
            assert_eq!(message.subject, "events.a");
            assert_eq!(message.payload, "one");
            assert_eq!(message.reply, None);
            assert_eq!(next(subscriber).await.payload, "two");
        }
    }

    pub async fn star_matches_exactly_one_token(bus: Bus) {
        let mut star = bus.subscribe("events.*").await.expect("subscribe");
        let mut middle = bus.subscribe("a.*.c").await.expect("subscribe");
        bus.publish("events", bytes("too short"))
            .await
            .expect("publish");
        bus.publish("events.a.b", bytes("too long"))
            .await
            .expect("publish");
        bus.publish("events.a", bytes("match"))
            .await
            .expect("publish");
        let message = next(&mut star).await;
        assert_eq!(
            (message.subject.as_str(), &message.payload[..]),
            ("events.a", &b"match"[..])
        );

        bus.publish("a.b.d", bytes("no")).await.expect("publish");
        bus.publish("a.b.c", bytes("yes")).await.expect("publish");
        assert_eq!(next(&mut middle).await.subject, "a.b.c");
    }

    pub async fn greater_than_matches_one_or_more_tokens(bus: Bus) {
        let mut tail = bus.subscribe("events.>").await.expect("subscribe");
        let mut all = bus.subscribe(">").await.expect("subscribe");
        bus.publish("events", bytes("too short"))
            .await
            .expect("publish");
        bus.publish("events.a", bytes("one"))
            .await
            .expect("publish");
        bus.publish("events.a.b.c", bytes("three"))
            .await
            .expect("publish");
        assert_eq!(next(&mut tail).await.subject, "events.a");
        assert_eq!(next(&mut tail).await.subject, "events.a.b.c");
        for subject in ["events", "events.a", "events.a.b.c"] {
            assert_eq!(next(&mut all).await.subject, subject);
        }
    }

    pub async fn queue_group_delivers_each_message_to_one_member(bus: Bus) {
        const COUNT: usize = 200;
        let mut members = [
            bus.queue_subscribe("work.*", "workers")
                .await
                .expect("queue subscribe"),
            bus.queue_subscribe("work.*", "workers")
                .await
                .expect("queue subscribe"),
        ];
        let mut other_group = bus
            .queue_subscribe("work.*", "auditors")
            .await
            .expect("queue subscribe");
        let mut watcher = bus.subscribe("work.*").await.expect("subscribe");
        for index in 0..COUNT {
            bus.publish("work.item", Bytes::from(index.to_string()))
                .await
                .expect("publish");
        }

        // Every plain subscriber and every group sees all messages, in order.
        for subscription in [&mut watcher, &mut other_group] {
            for index in 0..COUNT {
                assert_eq!(next(subscription).await.payload, index.to_string());
            }
        }
        // Within the group, each message reached exactly one member, and both members got some.
        let mut seen = BTreeSet::new();
        let mut per_member = [0; 2];
        let [first, second] = &mut members;
        while seen.len() < COUNT {
            let (message, member) = tokio::select! {
                message = next(first) => (message, 0),
                message = next(second) => (message, 1),
            };
            assert!(
                seen.insert(message.payload.clone()),
                "delivered twice: {message:?}"
            );
            per_member[member] += 1;
        }
        assert!(
            per_member.iter().all(|&count| count > 0),
            "not spread: {per_member:?}"
        );
        for member in &mut members {
            assert!(stays_silent(member).await, "a member got an extra message");
        }
    }

    pub async fn new_inboxes_are_distinct_and_receive_what_is_sent_there(bus: Bus) {
        let (first, second) = (bus.new_inbox(), bus.new_inbox());
        assert_ne!(first, second);
        for inbox in [&first, &second] {
            assert!(inbox.starts_with("_INBOX."), "{inbox}");
        }
        let mut one = bus.subscribe(&first).await.expect("subscribe");
        let mut other = bus.subscribe(&second).await.expect("subscribe");
        bus.publish(&first, bytes("credit")).await.expect("publish");
        assert_eq!(next(&mut one).await.payload, "credit");
        assert!(stays_silent(&mut other).await, "another inbox got it");
    }

    pub async fn request_gets_the_reply(bus: Bus) {
        let mut requests = bus.subscribe("svc.echo").await.expect("subscribe");
        let responder = bus.clone();
        let serve = tokio::spawn(async move {
            let request = next(&mut requests).await;
            let mut reply = request.payload.to_vec();
            reply.extend_from_slice(b"!");
            responder
                .respond(&request, reply.into())
                .await
                .expect("respond");
        });
        let reply = bus
            .request("svc.echo", bytes("hello"), PATIENCE)
            .await
            .expect("request");
        assert_eq!(reply.payload, "hello!");
        serve.await.expect("responder");

        // A published message cannot be answered.
        let mut plain = bus.subscribe("svc.plain").await.expect("subscribe");
        bus.publish("svc.plain", bytes("x")).await.expect("publish");
        let message = next(&mut plain).await;
        let err = bus
            .respond(&message, bytes("y"))
            .await
            .expect_err("no reply subject");
        assert!(
            matches!(err, PublishError::NoReplySubject { .. }),
            "{err:?}"
        );
    }

    pub async fn request_without_responders_fails_at_once(bus: Bus) {
        let started = Instant::now();
        let err = bus
            .request("svc.nobody", bytes("hello"), Duration::from_secs(10))
            .await
            .expect_err("nobody listens");
        assert!(
            matches!(err, RequestError::NoResponders { ref subject } if subject == "svc.nobody"),
            "{err:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(err.to_string(), "no one is listening on `svc.nobody`");

        // After the only subscriber is dropped there are no responders again.
        drop(bus.subscribe("svc.gone").await.expect("subscribe"));
        let err = bus
            .request("svc.gone", bytes("hello"), Duration::from_secs(10))
            .await
            .expect_err("subscriber dropped");
        assert!(matches!(err, RequestError::NoResponders { .. }), "{err:?}");
    }

    pub async fn request_times_out_when_nobody_replies(bus: Bus) {
        let _silent = bus.subscribe("svc.silent").await.expect("subscribe");
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let err = bus
            .request("svc.silent", bytes("hello"), timeout)
            .await
            .expect_err("nobody replies");
        assert!(matches!(err, RequestError::TimedOut { .. }), "{err:?}");
        assert!(
            started.elapsed() >= timeout,
            "gave up after {:?}",
            started.elapsed()
        );
    }

    pub async fn payloads_over_max_payload_are_refused(bus: Bus) {
        let max = bus.max_payload();
        assert_eq!(max, 1024 * 1024);
        let mut subscription = bus.subscribe("big").await.expect("subscribe");
        bus.publish("big", Bytes::from(vec![7; max]))
            .await
            .expect("publish at the limit");
        assert_eq!(next(&mut subscription).await.payload.len(), max);

        let err = bus
            .publish("big", Bytes::from(vec![7; max + 1]))
            .await
            .expect_err("over the limit");
        assert!(
            matches!(err, PublishError::PayloadTooLarge { size, .. } if size == max + 1),
            "{err:?}"
        );
        let err = bus
            .request("big", Bytes::from(vec![7; max + 1]), PATIENCE)
            .await
            .expect_err("over the limit");
        assert!(
            matches!(err, RequestError::PayloadTooLarge { .. }),
            "{err:?}"
        );
    }

    pub async fn invalid_names_are_refused(bus: Bus) {
        for subject in ["", "a..b", "a.", "a b", "a.*", "a.>"] {
            let err = bus.publish(subject, bytes("x")).await.expect_err(subject);
            assert!(
                matches!(err, PublishError::InvalidSubject(_)),
                "{subject}: {err:?}"
            );
        }
        let err = bus.subscribe("a.>.b").await.err().expect("`>` not last");
        assert!(matches!(err, SubscribeError::InvalidName(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "invalid subject `a.>.b`: `>` may only be the last token"
        );
        let err = bus
            .queue_subscribe("a", "two words")
            .await
            .err()
            .expect("bad group");
        assert!(matches!(err, SubscribeError::InvalidName(_)), "{err:?}");

        let err = bus.kv("wharf.services").await.err().expect("bad bucket");
        assert!(matches!(err, KvError::InvalidName(_)), "{err:?}");
        assert!(bus.objects("").await.is_err());
        let kv = bus.kv("names").await.expect("kv");
        for key in ["", "a*", "a..b", ".a", "a b", "ä"] {
            let err = kv.put(key, bytes("x")).await.expect_err(key);
            assert!(matches!(err, KvError::InvalidName(_)), "{key}: {err:?}");
        }
        let err = kv.watch("a.>.b").await.err().expect("bad pattern");
        assert!(matches!(err, KvError::InvalidName(_)), "{err:?}");
    }

    pub async fn kv_revisions_count_every_change_per_bucket(bus: Bus) {
        let kv = bus.kv("wharf-services").await.expect("kv");
        assert_eq!(kv.get("default.hello").await.expect("get"), None);
        // Revisions are the bucket's change count: exactly as NATS numbers
        // the messages of the stream behind a bucket.
        assert_eq!(kv.put("default.hello", bytes("v1")).await.expect("put"), 1);
        assert_eq!(kv.put("default.hello", bytes("v2")).await.expect("put"), 2);
        assert_eq!(kv.put("default.other", bytes("o1")).await.expect("put"), 3);
        kv.delete("default.other").await.expect("delete");
        assert_eq!(kv.put("default.third", bytes("t1")).await.expect("put"), 5);

        let entry = kv.get("default.hello").await.expect("get").expect("entry");
        assert_eq!(
            (entry.key.as_str(), &entry.value[..], entry.revision),
            ("default.hello", &b"v2"[..], 2)
        );

        // Another bucket counts on its own and shares no keys.
        let other = bus.kv("wharf-kv-default").await.expect("kv");
        assert_eq!(other.get("default.hello").await.expect("get"), None);
        assert_eq!(
            other.put("default.hello", bytes("x")).await.expect("put"),
            1
        );
        // Opening a bucket again finds what is in it.
        let again = bus.kv("wharf-services").await.expect("kv");
        assert_eq!(
            again
                .get("default.hello")
                .await
                .expect("get")
                .map(|entry| entry.revision),
            Some(2)
        );
    }

    pub async fn kv_create_refuses_an_existing_key(bus: Bus) {
        let kv = bus.kv("create").await.expect("kv");
        let revision = kv.create("k", bytes("first")).await.expect("create");
        let err = kv.create("k", bytes("second")).await.expect_err("exists");
        assert!(
            matches!(err, KvError::AlreadyExists { ref key, .. } if key == "k"),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "key `k` already exists in bucket `create`");
        let entry = kv.get("k").await.expect("get").expect("entry");
        assert_eq!(
            (&entry.value[..], entry.revision),
            (&b"first"[..], revision)
        );
    }

    pub async fn kv_update_is_compare_and_set(bus: Bus) {
        let kv = bus.kv("cas").await.expect("kv");
        let first = kv.put("k", bytes("a")).await.expect("put");
        let second = kv
            .update("k", bytes("b"), first)
            .await
            .expect("update at the current revision");
        assert!(second > first);
        let err = kv
            .update("k", bytes("c"), first)
            .await
            .expect_err("stale revision");
        assert!(
            matches!(err, KvError::RevisionMismatch { ref key, expected, .. } if key == "k" && expected == first),
            "{err:?}"
        );
        assert_eq!(kv.get("k").await.expect("get").expect("entry").value, "b");

        // Revision 0 means "never written".
        kv.update("fresh", bytes("new"), 0)
            .await
            .expect("update of a new key at 0");
        let err = kv
            .update("fresh", bytes("again"), 0)
            .await
            .expect_err("no longer new");
        assert!(matches!(err, KvError::RevisionMismatch { .. }), "{err:?}");
    }

    pub async fn kv_delete_makes_a_key_vacant(bus: Bus) {
        let kv = bus.kv("delete").await.expect("kv");
        kv.put("k", bytes("a")).await.expect("put");
        kv.put("stays", bytes("b")).await.expect("put");
        kv.delete("k").await.expect("delete");
        assert_eq!(kv.get("k").await.expect("get"), None);
        assert_eq!(kv.keys().await.expect("keys"), ["stays"]);
        // Deleting what is not there is fine.
        kv.delete("k").await.expect("delete again");
        kv.delete("never")
            .await
            .expect("delete a key never written");
        let revision = kv
            .create("k", bytes("back"))
            .await
            .expect("create after delete");
        let entry = kv.get("k").await.expect("get").expect("entry");
        assert_eq!((&entry.value[..], entry.revision), (&b"back"[..], revision));
    }

    pub async fn kv_keys_and_entries_list_live_keys(bus: Bus) {
        let kv = bus.kv("listing").await.expect("kv");
        assert!(kv.keys().await.expect("keys").is_empty());
        assert!(kv.entries().await.expect("entries").is_empty());
        let keys = ["svc/default=hello", "b.two", "a-1_x.one", "gone"];
        for key in keys {
            kv.put(key, bytes(key)).await.expect("put");
        }
        kv.delete("gone").await.expect("delete");
        assert_eq!(
            kv.keys().await.expect("keys"),
            ["a-1_x.one", "b.two", "svc/default=hello"]
        );
        let entries = kv.entries().await.expect("entries");
        let listed: Vec<_> = entries
            .iter()
            .map(|entry| (entry.key.as_str(), &entry.value[..], entry.revision))
            .collect();
        assert_eq!(
            listed,
            [
                ("a-1_x.one", &b"a-1_x.one"[..], 3),
                ("b.two", &b"b.two"[..], 2),
                ("svc/default=hello", &b"svc/default=hello"[..], 1),
            ]
        );
    }

    pub async fn kv_watch_replays_current_values_then_follows_changes(bus: Bus) {
        let kv = bus.kv("watched").await.expect("kv");
        kv.put("deleted", bytes("x")).await.expect("put");
        kv.put("b", bytes("b1")).await.expect("put");
        kv.put("a", bytes("a1")).await.expect("put");
        kv.delete("deleted").await.expect("delete");

        let mut watch = kv.watch(">").await.expect("watch");
        let mut next_event = async || -> KvEvent {
            tokio::time::timeout(PATIENCE, watch.next())
                .await
                .expect("no event within 5 s")
                .expect("watch ended")
        };
        let event = |key: &str, value: Option<&str>, revision| KvEvent {
            key: key.to_owned(),
            value: value.map(bytes),
            revision,
        };
        // Current values first, oldest first; the deleted key is not replayed.
        assert_eq!(next_event().await, event("b", Some("b1"), 2));
        assert_eq!(next_event().await, event("a", Some("a1"), 3));
        // Then every change.
        kv.put("a", bytes("a2")).await.expect("put");
        assert_eq!(next_event().await, event("a", Some("a2"), 5));
        kv.delete("b").await.expect("delete");
        assert_eq!(next_event().await, event("b", None, 6));
        kv.create("c", bytes("c1")).await.expect("create");
        assert_eq!(next_event().await, event("c", Some("c1"), 7));
    }

    pub async fn kv_watch_pattern_filters_keys(bus: Bus) {
        let kv = bus.kv("assignments").await.expect("kv");
        kv.put("hosts.h1", bytes("1")).await.expect("put");
        kv.put("hosts.h1.extra", bytes("deeper"))
            .await
            .expect("put");
        kv.put("other", bytes("o")).await.expect("put");
        let mut watch = kv.watch("hosts.*").await.expect("watch");
        let mut next_key = async || -> (String, u64) {
            let event = tokio::time::timeout(PATIENCE, watch.next())
                .await
                .expect("no event within 5 s")
                .expect("watch ended");
            (event.key, event.revision)
        };
        assert_eq!(next_key().await, ("hosts.h1".to_owned(), 1));
        kv.put("other", bytes("o2")).await.expect("put");
        kv.put("hosts.h1.extra", bytes("deeper2"))
            .await
            .expect("put");
        kv.put("hosts.h2", bytes("2")).await.expect("put");
        assert_eq!(next_key().await, ("hosts.h2".to_owned(), 6));

        // A watch on one key sees that key only.
        let mut single = kv.watch("other").await.expect("watch");
        let event = tokio::time::timeout(PATIENCE, single.next())
            .await
            .expect("no event within 5 s")
            .expect("watch ended");
        assert_eq!((event.key.as_str(), event.revision), ("other", 4));
    }

    pub async fn kv_values_are_limited_like_nats_messages(bus: Bus) {
        let kv = bus.kv("limits").await.expect("kv");
        let max = bus.max_payload() - 1024;
        kv.put("big", Bytes::from(vec![1; max]))
            .await
            .expect("put at the limit");
        kv.update("big", Bytes::from(vec![2; max]), 1)
            .await
            .expect("update at the limit");
        assert_eq!(
            kv.get("big")
                .await
                .expect("get")
                .expect("entry")
                .value
                .len(),
            max
        );
        let err = kv
            .put("big", Bytes::from(vec![1; max + 1]))
            .await
            .expect_err("over the limit");
        assert!(
            matches!(err, KvError::ValueTooLarge { size, .. } if size == max + 1),
            "{err:?}"
        );
    }

    pub async fn kv_keys_page_reads_a_prefix_in_bounded_pages(bus: Bus) {
        let kv = bus.kv("paged").await.expect("kv");
        for i in 0..25 {
            kv.put(&format!("a.k{i}"), bytes("v")).await.expect("put");
        }
        kv.put("b.other", bytes("v")).await.expect("put");
        kv.put("ab.near", bytes("v")).await.expect("put");
        kv.delete("a.k3").await.expect("delete");
        let mut seen = BTreeSet::new();
        let (mut after, mut pages) = (0, 0);
        loop {
            let page = kv.keys_page("a.", after, 10).await.expect("page");
            pages += 1;
            assert!(page.keys.len() <= 10, "a page holds at most its limit: {page:?}");
            for key in &page.keys {
                assert!(seen.insert(key.clone()), "{key} listed twice");
            }
            match page.next {
                Some(next) => after = next,
                None => break,
            }
            assert!(pages < 10, "paging ends");
        }
        let expected: BTreeSet<String> = (0..25).filter(|i| *i != 3).map(|i| format!("a.k{i}")).collect();
        assert_eq!(seen, expected, "every live key under the prefix once, nothing else");
        assert_eq!(pages, 3, "24 keys in pages of 10");
        let all = kv.keys_page("", 0, 100).await.expect("every key");
        assert_eq!((all.keys.len(), all.next), (26, None));
        assert!(kv.keys_page("b.", 0, 10).await.expect("page").keys == ["b.other"]);
        assert!(kv.keys_page("zz.", 0, 10).await.expect("empty").keys.is_empty());
        assert!(matches!(kv.keys_page("a..", 0, 10).await, Err(KvError::InvalidName(_))));
    }

    /// Two writers that write the same value expecting the same revision
    /// are two writes: one wins, the other is refused (a counter loses no
    /// increment); and a value put again after another is stored again.
    pub async fn kv_identical_writes_are_each_a_write(bus: Bus) {
        let kv = bus.kv("same").await.expect("kv");
        let first = kv.put("n", bytes("5")).await.expect("put");
        let (a, b) = futures::join!(kv.update("n", bytes("6"), first), kv.update("n", bytes("6"), first));
        assert!(a.is_ok() != b.is_ok(), "exactly one compare-and-set wins: {a:?} {b:?}");
        let refused = if a.is_ok() { b } else { a };
        assert!(matches!(refused, Err(KvError::RevisionMismatch { .. })), "{refused:?}");
        let after = kv.update("n", bytes("6"), first).await;
        assert!(matches!(after, Err(KvError::RevisionMismatch { .. })), "the same write later is refused too: {after:?}");

        kv.put("k", bytes("v")).await.expect("put");
        kv.put("k", bytes("w")).await.expect("put");
        let last = kv.put("k", bytes("v")).await.expect("put");
        let entry = kv.get("k").await.expect("get").expect("a value");
        assert_eq!((entry.value, entry.revision), (bytes("v"), last), "the repeated value is stored again");
    }

    pub async fn kv_keys_longer_than_a_subject_may_be_are_refused(bus: Bus) {
        let kv = bus.kv("long").await.expect("kv");
        let long = "k".repeat(5000);
        assert!(matches!(kv.put(&long, bytes("v")).await, Err(KvError::InvalidName(_))));
        assert!(matches!(kv.get(&long).await, Err(KvError::InvalidName(_))));
        // The connection is still usable afterwards.
        kv.put("short", bytes("v")).await.expect("put after a refused key");
        assert!(kv.get("short").await.expect("get").is_some());
    }

    pub async fn objects_hold_large_blobs(bus: Bus) {
        let objects = bus.objects("wharf-artifacts").await.expect("objects");
        // Bigger than max_payload, so NATS has to chunk it; not a repeating
        // pattern, so chunks in the wrong order would show.
        let blob: Bytes = (0..3 * 1024 * 1024u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>()
            .into();
        let name = "sha256:0123abcd";
        assert!(!objects.exists(name).await.expect("exists"));
        assert_eq!(objects.get(name).await.expect("get"), None);
        objects.put(name, blob.clone()).await.expect("put");
        assert!(objects.exists(name).await.expect("exists"));
        assert!(
            objects.get(name).await.expect("get") == Some(blob),
            "content differs"
        );
        // Put replaces.
        objects.put(name, bytes("small")).await.expect("put again");
        assert_eq!(objects.get(name).await.expect("get"), Some(bytes("small")));
        // Buckets are separate.
        let other = bus.objects("other-artifacts").await.expect("objects");
        assert!(!other.exists(name).await.expect("exists"));
    }

    pub async fn objects_are_listed_and_deleted(bus: Bus) {
        let objects = bus.objects("listed").await.expect("objects");
        assert!(objects.list().await.expect("list").is_empty());
        for name in ["b", "a", "c/with slash"] {
            objects.put(name, bytes(name)).await.expect("put");
        }
        assert_eq!(
            objects.list().await.expect("list"),
            ["a", "b", "c/with slash"]
        );
        objects.delete("a").await.expect("delete");
        assert_eq!(objects.list().await.expect("list"), ["b", "c/with slash"]);
        assert_eq!(objects.get("a").await.expect("get"), None);
        assert!(!objects.exists("a").await.expect("exists"));
        objects.delete("a").await.expect("delete again");
        objects
            .delete("never")
            .await
            .expect("delete an object never stored");
    }

    /// Puts 1 KiB values under new keys `k0`, `k1`, ... until the bucket refuses one; returns that error and how many were stored.
    async fn fill(kv: &Kv) -> (KvError, usize) {
        for index in 0..1024 {
            if let Err(err) = kv.put(&format!("k{index}"), kib()).await {
                return (err, index);
            }
        }
        panic!("the bucket took 1 MiB without refusing a write");
    }

    fn kib() -> Bytes {
        Bytes::from(vec![b'x'; 1024])
    }

    /// Asserts that `err` says a bucket of `max_bytes` is full.
    fn assert_full(err: &KvError, max_bytes: u64) {
        assert!(
            matches!(err, KvError::BucketFull { max_bytes: max, .. } if *max == max_bytes),
            "{err:?}"
        );
    }

    pub async fn kv_buckets_refuse_writes_past_their_limit(bus: Bus) {
        let kv = bus
            .kv_with("capped", BucketOptions::max_bytes(16 * 1024))
            .await
            .expect("kv");
        let (err, stored) = fill(&kv).await;
        assert!(
            matches!(&err, KvError::BucketFull { bucket, max_bytes: 16384 } if bucket == "capped"),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("`capped`") && message.contains("16 KiB"),
            "{message}"
        );
        // Each entry takes its key and value plus some bookkeeping, so a
        // little under 16 fit.
        assert!((12..16).contains(&stored), "{stored} entries of 1 KiB fit");

        // The refused write changed nothing; neither does a create.
        let refused = format!("k{stored}");
        assert_eq!(kv.get(&refused).await.expect("get"), None);
        let err = kv.create("other", kib()).await.expect_err("bucket full");
        assert!(matches!(err, KvError::BucketFull { .. }), "{err:?}");
        assert_eq!(kv.keys().await.expect("keys").len(), stored);
        for index in 0..stored {
            let entry = kv
                .get(&format!("k{index}"))
                .await
                .expect("get")
                .expect("an acknowledged write is kept");
            assert_eq!(entry.value, kib());
        }

        // Deleting keys makes room again.
        kv.delete("k0").await.expect("delete");
        kv.delete("k1").await.expect("delete");
        kv.put(&refused, kib()).await.expect("room after deleting");
    }

    pub async fn kv_with_updates_an_existing_bucket_and_kv_leaves_it_alone(bus: Bus) {
        let kv = bus
            .kv_with("resized", BucketOptions::max_bytes(8 * 1024))
            .await
            .expect("kv");
        let (_, small) = fill(&kv).await;

        // Opening without options keeps the bucket's limit.
        let plain = bus.kv("resized").await.expect("kv");
        let err = plain.put("more", kib()).await.expect_err("still full");
        assert_full(&err, 8192);

        // Opening with options raises it.
        let kv = bus
            .kv_with("resized", BucketOptions::max_bytes(32 * 1024))
            .await
            .expect("kv");
        let (err, large) = fill(&kv).await;
        assert_full(&err, 32768);
        assert!(large > small * 3, "{small} entries, then {large}");

        // Lowering it below what the bucket holds keeps the data and refuses
        // writes that grow the bucket; replacing a value by one no larger
        // does not grow it.
        let kv = bus
            .kv_with("resized", BucketOptions::max_bytes(4 * 1024))
            .await
            .expect("kv");
        assert_eq!(kv.keys().await.expect("keys").len(), large);
        kv.put("k0", kib())
            .await
            .expect("a value replaced in place");
        let err = kv.put("new", kib()).await.expect_err("over the new limit");
        assert_full(&err, 4096);

        // And no limit at all.
        let kv = bus
            .kv_with("resized", BucketOptions::default())
            .await
            .expect("kv");
        kv.put("unlimited", kib()).await.expect("no limit");
    }

    pub async fn kv_creates_state_buckets_with_the_bus_limits(bus: Bus) {
        assert_eq!(bus.storage_limits(), StorageLimits::default());
        let limits = StorageLimits {
            state: BucketOptions::max_bytes(8 * 1024),
            ..StorageLimits::default()
        };
        let bus = bus.with_storage_limits(limits);
        assert_eq!(bus.storage_limits(), limits);
        let (err, _) = fill(&bus.kv("small-state").await.expect("kv")).await;
        assert_full(&err, 8192);
        // A data bucket gets the limit its owner asks for.
        let data = bus
            .kv_with("data", bus.storage_limits().data)
            .await
            .expect("kv");
        data.put("k", kib()).await.expect("room in the data bucket");
    }

    pub async fn objects_refuse_blobs_past_their_limit(bus: Bus) {
        let objects = bus
            .objects_with("capped-objects", BucketOptions::max_bytes(1024 * 1024))
            .await
            .expect("objects");
        let blob = |fill: u8| Bytes::from(vec![fill; 600 * 1024]);
        objects.put("first", blob(1)).await.expect("put");
        let err = objects
            .put("second", blob(2))
            .await
            .expect_err("no room for a second");
        assert!(
            matches!(&err, ObjectError::BucketFull { bucket, max_bytes: 1048576, size: 614400 } if bucket == "capped-objects"),
            "{err:?}"
        );
        assert!(err.to_string().contains("1 MiB"), "{err}");
        assert_eq!(objects.list().await.expect("list"), ["first"]);
        assert!(objects.get("first").await.expect("get") == Some(blob(1)));

        objects.delete("first").await.expect("delete");
        objects
            .put("second", blob(2))
            .await
            .expect("room after deleting");
        assert!(objects.get("second").await.expect("get") == Some(blob(2)));
    }
}
