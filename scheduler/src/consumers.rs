//! The brokers hosts ask for what their NATS identities may not do
//! themselves: JetStream consumers, and services' key-value data.
//!
//! **Data.** A host reads and writes a namespace's `wharf-kv-<ns>` only
//! through the data broker, which allows it only while the host runs that
//! namespace: a replica assigned to it, a replica of a scale-from-zero
//! service it reports (any host may start one on a request), or a job
//! attempt started there.
//!
//! **Consumers.**
//! nats-server does not check where a consumer delivers against the rights
//! of whoever makes it, so a host allowed to make consumers could copy any
//! message it can read onto the control plane's subjects (a delete marker
//! onto a service's key erases the service). Hosts are denied the consumer
//! API; every scheduler serves this broker instead (one queue group), which
//! makes what a host asks for only when it delivers into that host's own
//! inboxes and reads only what the host may read: watches of the desired
//! state it follows, of its own assignment, and of key-value data of
//! namespaces it runs. No stream consumers: the control plane takes in
//! trigger messages itself (`crate::intake`).

use std::sync::Arc;

use wharf_bus::{Bus, ConsumerAsk, ConsumerPolicy, ConsumerRules, DataAsk, DataPolicy, DataRules, SubscribeError};
use wharf_proto::HostId;
use wharf_proto::names::{self, ASSIGNMENTS_BUCKET, NAMESPACES_BUCKET, REVISIONS_BUCKET, SERVICES_BUCKET, STATUS_BUCKET};
use wharf_proto::trigger::{MESSAGE_PREFIX, subject_namespace};
use wharf_scheduler_core::jobs::running_attempts;

use crate::hosts::HostTable;
use crate::informer::Informer;
use crate::jobs::Jobs;

/// The queue group the consumer brokers of all schedulers share.
const GROUP: &str = "wharf-consumer-brokers";

/// The queue group the data brokers of all schedulers share.
const DATA_GROUP: &str = "wharf-data-brokers";

/// Serves consumer asks from hosts on [`names::CONSUMER_BROKER_WILDCARD`],
/// and data asks on [`names::DATA_BROKER_WILDCARD`].
pub(crate) async fn serve(bus: &Bus, informer: Informer, hosts: HostTable, jobs: Jobs) -> Result<(), SubscribeError> {
    let access = Arc::new(DataAccess { informer, hosts, jobs });
    let policy: ConsumerPolicy = access.clone();
    bus.serve_consumer_broker(names::CONSUMER_BROKER_WILDCARD, GROUP, policy).await?;
    let data: DataPolicy = access;
    bus.serve_data_broker(names::DATA_BROKER_WILDCARD, DATA_GROUP, data).await
}

/// Which namespaces' data a host may read and write: those it runs.
struct DataAccess {
    informer: Informer,
    hosts: HostTable,
    jobs: Jobs,
}

impl DataAccess {
    /// Whether `host` runs something of namespace `namespace` (see the module's doc).
    fn runs(&self, host: &HostId, namespace: &str) -> bool {
        let assigned = self.informer.read(|state| state.assignments.get(host).is_some_and(|a| a.replicas.iter().any(|r| r.service.namespace == namespace)));
        if assigned {
            return true;
        }
        let autoscaled: Vec<_> =
            self.informer.read(|state| state.services.values().filter(|s| s.spec.namespace == namespace && s.spec.autoscale.is_some()).map(|s| s.spec.id()).collect());
        (!autoscaled.is_empty() && self.hosts.reports_replica_of(host, |service| autoscaled.contains(service)))
            || self.jobs.read(|state| {
                state.runs.iter().any(|(job, (history, _))| job.namespace == namespace && running_attempts(history).iter().any(|a| a.host == *host))
            })
    }

    /// Whether `host` may have a component's message published (or a
    /// request made) on `subject`: one of a namespace it runs.
    fn may_publish(&self, host: &HostId, subject: &str) -> Result<(), String> {
        let Some(namespace) = subject_namespace(subject) else {
            return Err(format!("host {host} may have the control plane publish components' messages only ({MESSAGE_PREFIX}.<namespace>.…), not on {subject}"));
        };
        if self.runs(host, namespace) {
            Ok(())
        } else {
            Err(format!("host {host} runs nothing of namespace {namespace}, so it may not publish its messages (on {subject})"))
        }
    }
}

impl DataRules for DataAccess {
    fn may_answer(&self, asker: &str, reply: &str) -> bool {
        HostId::new(asker).is_ok_and(|host| own_inbox(&host, reply))
    }

    fn allows(&self, asker: &str, ask: &DataAsk) -> Result<(), String> {
        let host = HostId::new(asker).map_err(|e| format!("{asker:?} is not a host id: {e}"))?;
        if let Some(subject) = ask.subject() {
            return self.may_publish(&host, subject);
        }
        let bucket = ask.bucket();
        let reads_only = || if ask.writes() { Err(format!("host {host} may not write bucket {bucket}")) } else { Ok(()) };
        match ask {
            DataAsk::ObjectInfo { .. } | DataAsk::ObjectChunk { .. } => {
                return if bucket == names::ARTIFACTS_BUCKET { Ok(()) } else { Err(format!("host {host} may read components only, not objects of {bucket}")) };
            }
            _ if [SERVICES_BUCKET, STATUS_BUCKET, NAMESPACES_BUCKET, REVISIONS_BUCKET].contains(&bucket) => return reads_only(),
            DataAsk::Get { key, .. } if bucket == ASSIGNMENTS_BUCKET => {
                let own = names::assignment_key(&host);
                return if *key == own { Ok(()) } else { Err(format!("host {host} may read only its own assignment ({own}), not {key}")) };
            }
            _ => {}
        }
        let Some(namespace) = bucket.strip_prefix(names::KV_BUCKET_PREFIX) else {
            return Err(format!("host {host} may not use bucket {bucket} (it reads what it follows, and services' data of namespaces it runs)"));
        };
        if self.runs(&host, namespace) {
            Ok(())
        } else {
            Err(format!("host {host} runs nothing of namespace {namespace}, so it may not use its data"))
        }
    }
}

impl ConsumerRules for DataAccess {
    fn may_answer(&self, asker: &str, reply: &str) -> bool {
        HostId::new(asker).is_ok_and(|host| own_inbox(&host, reply))
    }

    fn allows(&self, asker: &str, ask: &ConsumerAsk) -> Result<(), String> {
        decide(asker, ask, |host, namespace| self.runs(host, namespace))
    }
}

/// Whether `subject` is one of `host`'s own inboxes (a literal subject under its prefix).
fn own_inbox(host: &HostId, subject: &str) -> bool {
    subject.strip_prefix(&names::host_inbox_prefix(host)).is_some_and(|rest| rest.starts_with('.') && rest.len() > 1 && !rest.contains(['*', '>']))
}

/// Whether host `asker` may have `ask` made: delivered into its own inboxes,
/// watching the desired state it follows (its own assignment only) or the
/// key-value data of a namespace it `runs`. Never a stream's consumer: the
/// control plane takes in trigger messages (`crate::intake`).
pub(crate) fn decide(asker: &str, ask: &ConsumerAsk, runs: impl Fn(&HostId, &str) -> bool) -> Result<(), String> {
    let host = HostId::new(asker).map_err(|e| format!("{asker:?} is not a host id: {e}"))?;
    if let Some(deliver) = ask.deliver()
        && !own_inbox(&host, deliver)
    {
        return Err(format!("host {host} may have messages delivered only into its own inboxes ({}.…), not to {deliver}", names::host_inbox_prefix(&host)));
    }
    let stream = ask.stream();
    let ConsumerAsk::Push { filter, .. } = ask else {
        return Err(format!("host {host} may not consume stream {stream}: the control plane takes in trigger messages and hands them to hosts"));
    };
    let Some(bucket) = stream.strip_prefix("KV_") else {
        return Err(format!("host {host} may watch key-value buckets only, not stream {stream}"));
    };
    let prefix = format!("$KV.{bucket}.");
    if !filter.starts_with(&prefix) {
        return Err(format!("the filter {filter} is not a subject of bucket {bucket}"));
    }
    if bucket == ASSIGNMENTS_BUCKET {
        let own = format!("{prefix}{}", names::assignment_key(&host));
        return if *filter == own { Ok(()) } else { Err(format!("host {host} may watch only its own assignment ({own}), not {filter}")) };
    }
    if [SERVICES_BUCKET, STATUS_BUCKET, NAMESPACES_BUCKET, REVISIONS_BUCKET].contains(&bucket) {
        return Ok(());
    }
    match bucket.strip_prefix(names::KV_BUCKET_PREFIX) {
        Some(namespace) if runs(&host, namespace) => Ok(()),
        Some(namespace) => Err(format!("host {host} runs nothing of namespace {namespace}, so it may not watch its data")),
        None => Err(format!("host {host} may not read bucket {bucket}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(stream: &str, filter: &str, deliver: &str) -> ConsumerAsk {
        ConsumerAsk::Push { stream: stream.into(), filter: filter.into(), deliver: deliver.into(), from: None, headers_only: false }
    }

    /// Host `a` runs namespace `shop` only.
    fn runs_shop(_: &HostId, namespace: &str) -> bool {
        namespace == "shop"
    }

    #[test]
    fn answers_go_only_to_the_askers_own_inboxes() {
        let host = HostId::new("a").expect("host id");
        assert!(own_inbox(&host, "_INBOX.host-a.r1"));
        for reply in ["_INBOX.host-b.r1", "$KV.wharf-services.default.hello", "_INBOX.host-a", "_INBOX.host-a.>", "_INBOX.host-ab.r1"] {
            assert!(!own_inbox(&host, reply), "{reply}");
        }
    }

    #[test]
    fn a_host_gets_watches_of_what_it_follows_delivered_into_its_own_inboxes() {
        for ask in [
            push("KV_wharf-services", "$KV.wharf-services.>", "_INBOX.host-a.x1"),
            push("KV_wharf-status", "$KV.wharf-status.>", "_INBOX.host-a.x2"),
            push("KV_wharf-namespaces", "$KV.wharf-namespaces.>", "_INBOX.host-a.x3"),
            push("KV_wharf-assignments", "$KV.wharf-assignments.a", "_INBOX.host-a.x4"),
            push("KV_wharf-kv-shop", "$KV.wharf-kv-shop.cart.>", "_INBOX.host-a.x5"),
        ] {
            assert_eq!(decide("a", &ask, runs_shop), Ok(()), "{ask:?}");
        }
    }

    #[test]
    fn delivery_elsewhere_and_reads_beyond_a_host_are_refused_naming_why() {
        for (asker, ask, why) in [
            ("a", push("KV_wharf-services", "$KV.wharf-services.>", "$KV.wharf-services.default.hello"), "only into its own inboxes"),
            ("a", push("KV_wharf-services", "$KV.wharf-services.>", "_INBOX.host-b.x"), "only into its own inboxes"),
            ("a", push("KV_wharf-services", "$KV.wharf-services.>", "_INBOX.host-a.>"), "only into its own inboxes"),
            ("a", push("KV_wharf-secrets", "$KV.wharf-secrets.>", "_INBOX.host-a.x"), "may not read bucket wharf-secrets"),
            ("a", push("KV_wharf-assignments", "$KV.wharf-assignments.>", "_INBOX.host-a.x"), "only its own assignment"),
            ("a", push("KV_wharf-assignments", "$KV.wharf-assignments.b", "_INBOX.host-a.x"), "only its own assignment"),
            ("a", push("KV_wharf-services", "$KV.wharf-secrets.>", "_INBOX.host-a.x"), "not a subject of bucket"),
            ("a", push("OBJ_wharf-artifacts", "$O.wharf-artifacts.>", "_INBOX.host-a.x"), "key-value buckets only"),
            ("Not A Host", push("KV_wharf-services", "$KV.wharf-services.>", "_INBOX.host-a.x"), "not a host id"),
            ("a", push("KV_wharf-kv-bank", "$KV.wharf-kv-bank.>", "_INBOX.host-a.x"), "runs nothing of namespace bank"),
            (
                "a",
                ConsumerAsk::Pull { stream: "wharf-msg-shop-orders".into(), consumer: "c".into(), deliver: "_INBOX.host-a.p".into(), batch: 1, expires_ms: 1 },
                "the control plane takes in trigger messages",
            ),
            (
                "a",
                ConsumerAsk::Durable { stream: "wharf-msg-shop-orders".into(), subject: "wharf.msg.shop.orders.>".into(), consumer: "wharf-x".into(), max_deliver: 1, ack_wait_ms: 1, max_ack_pending: 1 },
                "the control plane takes in trigger messages",
            ),
            (
                "a",
                ConsumerAsk::Pull { stream: "KV_wharf-services".into(), consumer: "c".into(), deliver: "_INBOX.host-a.p".into(), batch: 1, expires_ms: 1 },
                "may not consume stream",
            ),
            (
                "a",
                ConsumerAsk::Pull { stream: "wharf-msg-shop-orders".into(), consumer: "c".into(), deliver: "$KV.wharf-services.x".into(), batch: 1, expires_ms: 1 },
                "only into its own inboxes",
            ),
            (
                "a",
                ConsumerAsk::Durable { stream: "KV_wharf-services".into(), subject: "$KV.wharf-services.>".into(), consumer: "wharf-x".into(), max_deliver: 1, ack_wait_ms: 1, max_ack_pending: 1 },
                "may not consume stream",
            ),
        ] {
            let refused = decide(asker, &ask, runs_shop).expect_err(&format!("{ask:?} must be refused"));
            assert!(refused.contains(why), "{ask:?}: {refused}");
        }
    }
}
