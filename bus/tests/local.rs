//! What only the in-process bus has to show: its redb file keeps state across reopening, and is one process's alone.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use wharf_bus::{Bus, LocalStore, OpenStoreError};

#[tokio::test]
async fn redb_store_keeps_kv_and_objects_across_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The data directory does not exist yet: opening creates it.
    let path = dir.path().join("data").join("state.redb");
    let artifact: Bytes = (0..3 * 1024 * 1024u32)
        .map(|i| (i % 253) as u8)
        .collect::<Vec<_>>()
        .into();
    {
        let bus = Bus::local(LocalStore::open(&path).expect("open"));
        let kv = bus.kv("wharf-services").await.expect("kv");
        assert_eq!(
            kv.put("default.hello", Bytes::from_static(b"v1"))
                .await
                .expect("put"),
            1
        );
        assert_eq!(
            kv.put("default.gone", Bytes::from_static(b"x"))
                .await
                .expect("put"),
            2
        );
        kv.delete("default.gone").await.expect("delete");
        let objects = bus.objects("wharf-artifacts").await.expect("objects");
        objects
            .put("sha256:abc", artifact.clone())
            .await
            .expect("put");

        let err = LocalStore::open(&path)
            .err()
            .expect("second open while in use");
        assert!(matches!(err, OpenStoreError::InUse { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    let bus = Bus::local(LocalStore::open(&path).expect("reopen"));
    let kv = bus.kv("wharf-services").await.expect("kv");
    let entry = kv
        .get("default.hello")
        .await
        .expect("get")
        .expect("entry survived");
    assert_eq!((&entry.value[..], entry.revision), (&b"v1"[..], 1));
    assert_eq!(kv.get("default.gone").await.expect("get"), None);
    // Revisions carry on from where they were, deletes included.
    assert_eq!(
        kv.put("default.next", Bytes::from_static(b"n"))
            .await
            .expect("put"),
        4
    );
    // Compare-and-set against a revision from before the reopen still works.
    kv.update("default.hello", Bytes::from_static(b"v2"), 1)
        .await
        .expect("update");
    let objects = bus.objects("wharf-artifacts").await.expect("objects");
    assert!(
        objects.get("sha256:abc").await.expect("get") == Some(artifact),
        "artifact differs"
    );
    assert_eq!(objects.list().await.expect("list"), ["sha256:abc"]);
}

#[tokio::test]
async fn watches_see_changes_made_through_another_bus_on_the_same_store() {
    let store = LocalStore::in_memory().expect("store");
    let writer = Bus::local(store.clone()).kv("shared").await.expect("kv");
    let reader = Bus::local(store).kv("shared").await.expect("kv");
    let mut watch = reader.watch(">").await.expect("watch");
    writer
        .put("k", Bytes::from_static(b"v"))
        .await
        .expect("put");
    let event = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("no event within 5 s")
        .expect("watch ended");
    assert_eq!((event.key.as_str(), event.revision), ("k", 1));
}

/// Set in the child process of [`redb_store_survives_kill_9`], to the store's path.
const CRASH_CHILD_VAR: &str = "WHARF_BUS_CRASH_CHILD";

#[tokio::test]
async fn redb_store_survives_kill_9() {
    if let Some(path) = std::env::var_os(CRASH_CHILD_VAR) {
        // The child: write until killed, reporting each committed write.
        let kv = Bus::local(LocalStore::open(path).expect("open"))
            .kv("crash")
            .await
            .expect("kv");
        for index in 1u64.. {
            let revision = kv
                .put(&format!("k{index}"), Bytes::from(index.to_string()))
                .await
                .expect("put");
            println!("committed {revision}");
        }
    }

    // The parent: run this test again as the child, and kill it mid-write.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("state.redb");
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "redb_store_survives_kill_9", "--nocapture"])
        .env(CRASH_CHILD_VAR, &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the writer");
    // Kept open until the child is dead: a closed pipe would make its next
    // report fail and end it by panic rather than by the kill.
    let mut reports = std::io::BufRead::lines(std::io::BufReader::new(
        child.stdout.take().expect("child stdout"),
    ));
    let mut committed = 0;
    while committed < 50 {
        let Some(line) = reports.next() else {
            panic!("the writer stopped after {committed} writes");
        };
        if let Some(revision) = line.expect("child output").strip_prefix("committed ") {
            committed = revision.parse().expect("revision");
        }
    }
    // Let it write on unobserved for a moment, so the kill lands mid-write.
    std::thread::sleep(Duration::from_millis(20));
    child.kill().expect("SIGKILL the writer");
    let status = child.wait().expect("reap the writer");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the writer ended otherwise: {status}"
    );
    drop(reports);

    // Every write the child saw committed is there, intact, with its revision.
    let kv = Bus::local(LocalStore::open(&path).expect("reopen after kill -9"))
        .kv("crash")
        .await
        .expect("kv");
    let entries = kv.entries().await.expect("entries");
    assert!(
        entries.len() as u64 >= committed,
        "{} entries, {committed} committed",
        entries.len()
    );
    for entry in &entries {
        assert_eq!(entry.key, format!("k{}", entry.revision));
        assert_eq!(entry.value, entry.revision.to_string());
    }
    let next = kv
        .put("after", Bytes::from_static(b"x"))
        .await
        .expect("put");
    assert_eq!(next, entries.len() as u64 + 1, "revisions carry on");
}

#[tokio::test]
async fn the_in_process_bus_reports_no_disconnects() {
    // It has no other clients to lose: the stream stays silent, and open.
    let bus = Bus::local(LocalStore::in_memory().expect("store"));
    let mut disconnects = bus.client_disconnects().await.expect("always available");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), disconnects.next())
            .await
            .is_err(),
        "the in-process bus reported a disconnect"
    );
}
