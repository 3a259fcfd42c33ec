//! The shipped NATS configuration (`deploy/nats/`) works as its README says:
//! the three-node cluster and the single server start from the files as they
//! are (random ports and temporary stores put in by flags, certificates made
//! here), clients and routes speak mutual TLS, a scheduler-role client keeps
//! buckets on three servers, a host-role client cannot write the control
//! plane's buckets, and the system user hears disconnects.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use wharf_bus::{
    Bus, ClientCertificate, ConnectError, KvError, NatsAuth, NatsOptions, NatsTls, TlsFailure,
};
use wharf_testkit::nats::{ClusterOptions, ConfigFile, NatsCluster, NatsServer};
use wharf_testkit::tls::{self, TestCerts};

/// The passwords `deploy/nats/accounts.conf` reads.
const PASSWORDS: [(&str, &str); 3] = [
    ("WHARF_SCHEDULER_PASSWORD", "s3cret-s"),
    ("WHARF_HOST_PASSWORD", "s3cret-h"),
    ("WHARF_SYSTEM_PASSWORD", "s3cret-sys"),
];

/// The certificate variables the shipped configs' `tls` blocks read.
fn certificates(certs: &TestCerts) -> Vec<(String, String)> {
    [
        ("WHARF_NATS_CA", &certs.ca),
        ("WHARF_NATS_SERVER_CERT", &certs.cert),
        ("WHARF_NATS_SERVER_KEY", &certs.key),
    ]
    .map(|(key, path)| (key.to_owned(), path.display().to_string()))
    .to_vec()
}

/// A shipped config file, run as its README says: with the passwords and
/// certificates it reads and the store directory in `WHARF_NATS_DATA`.
fn shipped(file: &str, certs: &TestCerts) -> ConfigFile {
    let mut env = certificates(certs);
    env.extend(PASSWORDS.map(|(key, value)| (key.to_owned(), value.to_owned())));
    ConfigFile {
        path: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nats")).join(file),
        env,
        store_dir_var: Some("WHARF_NATS_DATA".to_owned()),
    }
}

/// TLS with the test CA and its client certificate, as every Wharf process connects.
fn mutual_tls(certs: &TestCerts) -> Option<NatsTls> {
    Some(NatsTls {
        ca: Some(certs.ca.clone()),
        client: Some(ClientCertificate {
            cert: certs.client_cert.clone(),
            key: certs.client_key.clone(),
        }),
    })
}

fn as_user(name: &str, user: &str, password: &str, certs: &TestCerts) -> NatsOptions {
    NatsOptions {
        name: name.to_owned(),
        auth: NatsAuth::UserPassword {
            user: user.to_owned(),
            password: password.to_owned(),
        },
        tls: mutual_tls(certs),
        ..NatsOptions::default()
    }
}

/// Checks the roles of the shipped accounts on the server(s) at `urls`,
/// over mutual TLS with `certs`; buckets the scheduler creates there get
/// `replicas` copies.
async fn roles_hold(
    urls: &str,
    certs: &TestCerts,
    replicas: u64,
    copies: impl Fn(&str) -> Option<u64>,
) {
    let scheduler = Bus::connect_nats(
        urls,
        NatsOptions {
            system_auth: Some(NatsAuth::UserPassword {
                user: "system".to_owned(),
                password: "s3cret-sys".to_owned(),
            }),
            ..as_user("wharf-scheduler", "scheduler", "s3cret-s", certs)
        },
    )
    .await
    .expect("the scheduler role connects, with the system user");
    let services = scheduler.kv("wharf-services").await.expect("create");
    services
        .put("default.web", Bytes::from_static(b"{}"))
        .await
        .expect("the scheduler writes desired state");
    scheduler
        .kv_with("wharf-kv-default", scheduler.storage_limits().data)
        .await
        .expect("create a data bucket");
    let deadline = Instant::now() + Duration::from_secs(30);
    while copies("KV_wharf-services") != Some(replicas) {
        assert!(
            Instant::now() < deadline,
            "wharf-services has {:?} copies, not {replicas}",
            copies("KV_wharf-services")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut disconnects = scheduler
        .client_disconnects()
        .await
        .expect("the system user hears advisories");

    {
        let host = Bus::connect_nats(urls, as_user("wharf-host-h1", "host", "s3cret-h", certs))
            .await
            .expect("the host role connects");
        let services = host
            .kv("wharf-services")
            .await
            .expect("a host reads desired state");
        let entry = services
            .get("default.web")
            .await
            .expect("get")
            .expect("entry");
        assert_eq!(entry.value, Bytes::from_static(b"{}"));
        let refused = services
            .put("default.web", Bytes::from_static(b"{\"evil\":1}"))
            .await;
        assert!(refused.is_err(), "a host wrote the control plane's state");
        let refused = host.kv("wharf-leader").await;
        assert!(
            matches!(refused, Err(KvError::Unavailable { .. })),
            "a host created a bucket: {:?}",
            refused.err()
        );
        host.kv("wharf-kv-default")
            .await
            .expect("data bucket")
            .put("counter.hits", Bytes::from_static(b"1"))
            .await
            .expect("a host writes services' data");
        // Its last handle dropped, the host's connection closes.
    }
    let kept = services
        .get("default.web")
        .await
        .expect("get")
        .expect("entry");
    assert_eq!(
        kept.value,
        Bytes::from_static(b"{}"),
        "the host's write changed desired state"
    );
    let gone = tokio::time::timeout(Duration::from_secs(10), disconnects.next())
        .await
        .expect("no advisory for the host")
        .expect("the advisories ended");
    assert_eq!(
        (gone.name.as_str(), gone.user.as_str()),
        ("wharf-host-h1", "host")
    );
    assert_eq!(gone.account, "WHARF");
}

#[tokio::test]
async fn the_shipped_cluster_runs_with_three_copies_and_the_roles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tls::write(dir.path());
    let options = ClusterOptions {
        config_files: ["a", "b", "c"]
            .map(|node| shipped(&format!("cluster/node-{node}.conf"), &certs))
            .to_vec(),
        ..ClusterOptions::default()
    };
    // The nodes form a cluster only if their routes' TLS holds.
    let cluster = NatsCluster::start_with(3, &options);
    for node in 0..cluster.size() {
        let varz = cluster.monitor(node, "/varz").expect("varz");
        assert_eq!(
            (
                &varz["cluster"]["tls_required"],
                &varz["cluster"]["tls_verify"]
            ),
            (
                &serde_json::Value::Bool(true),
                &serde_json::Value::Bool(true)
            ),
            "routes of node {node}: {}",
            varz["cluster"]
        );
    }
    roles_hold(&cluster.urls(), &certs, 3, |stream| {
        cluster.stream_replicas(stream)
    })
    .await;
}

#[tokio::test]
async fn the_shipped_single_server_runs_with_the_roles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tls::write(dir.path());
    let server = NatsServer::start_from(&shipped("nats-server.conf", &certs));
    // One server: the bus creates every bucket with one copy (three would be refused).
    roles_hold(&server.url(), &certs, 1, |_| Some(1)).await;

    // Without its client certificate, the right password is not enough.
    let without_certificate = NatsOptions {
        tls: Some(NatsTls {
            ca: Some(certs.ca.clone()),
            client: None,
        }),
        ..as_user("wharf-host-h2", "host", "s3cret-h", &certs)
    };
    match Bus::connect_nats(&server.url(), without_certificate).await {
        Err(ConnectError::Tls { failure, .. }) => {
            assert_eq!(failure, TlsFailure::ClientCertificateRequired);
        }
        Err(other) => panic!("refused, but not for the certificate: {other}"),
        Ok(_) => panic!("a client without a certificate connected"),
    }
}

#[tokio::test]
async fn the_shipped_configuration_needs_its_passwords_and_certificates() {
    // Without a variable nats-server refuses to start, naming the first one missing.
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tls::write(dir.path());
    let refusal = |env: Vec<(String, String)>| {
        let file = ConfigFile {
            env,
            ..shipped("nats-server.conf", &certs)
        };
        match std::panic::catch_unwind(|| NatsServer::start_from(&file)) {
            Ok(_) => panic!("nats-server started without all its variables"),
            Err(panic) => panic.downcast_ref::<String>().cloned().unwrap_or_default(),
        }
    };
    let message = refusal(certificates(&certs));
    assert!(message.contains("WHARF_SCHEDULER_PASSWORD"), "{message}");
    let message = refusal(
        PASSWORDS
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .to_vec(),
    );
    assert!(message.contains("WHARF_NATS_SERVER_CERT"), "{message}");
}
