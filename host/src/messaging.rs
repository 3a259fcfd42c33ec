//! `wasmcloud:messaging` 0.2.0 for components: the `consumer` import
//! (publish and request) over the bus, and the `handler` export a host
//! calls once per message of a trigger (see [`crate::workload::Workload::handle_message`]).
//!
//! Subjects are relative to the service's namespace: a component publishing
//! `orders.new` in namespace `shop` publishes on `wharf.msg.shop.orders.new`
//! ([`wharf_proto::trigger::message_subject`]). A full subject of its own
//! namespace (`wharf.msg.shop.…`) is taken as it is; one of another
//! namespace, or any other of Wharf's subjects, is refused with an error
//! naming the namespace it belongs to. The one exception is the reply
//! subject of the message being handled, which the component may answer.

use crate::logs::LogBuffer;
use bytes::Bytes;
use std::time::Duration;
use wasmtime::component::HasData;
use wharf_bus::{Bus, RequestError};
use wharf_proto::trigger::{MESSAGE_PREFIX, check_subject, message_subject, relative_subject, subject_namespace};

mod generated {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "wharf:host/messaging",
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

pub(crate) use generated::MessagingPre;
pub use generated::wasmcloud::messaging::types::BrokerMessage;
use generated::wasmcloud::messaging::{consumer, types};

/// The longest a component's `request` may wait, whatever it asks.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// What one workload may reach over messaging: the bus and its namespace.
/// Cheap to clone.
#[derive(Clone)]
pub struct MessagingAccess {
    bus: Bus,
    namespace: String,
    service: String,
}

impl std::fmt::Debug for MessagingAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessagingAccess").field("service", &self.service).finish_non_exhaustive()
    }
}

impl MessagingAccess {
    /// Access for `service` (`namespace/name`) in `namespace`, over `bus`.
    pub fn new(bus: Bus, namespace: &str, service: &str) -> Self {
        MessagingAccess { bus, namespace: namespace.to_string(), service: service.to_string() }
    }

    /// The NATS subject a component means by `subject`, or why it may not use it.
    /// `reply_to` is the reply subject of the message being handled, if any.
    pub fn resolve(&self, subject: &str, reply_to: Option<&str>) -> Result<String, String> {
        if reply_to == Some(subject) {
            return Ok(subject.to_string());
        }
        if let Some(namespace) = subject_namespace(subject) {
            if namespace == self.namespace {
                let relative = relative_subject(namespace, subject).unwrap_or_default();
                check_subject(relative, false).map_err(|e| format!("{}: {e}", self.service))?;
                return Ok(subject.to_string());
            }
            return Err(format!(
                "subject {subject} belongs to namespace {namespace}; service {} may use only the subjects of namespace {} (write them relative to it, e.g. `orders.new`)",
                self.service, self.namespace
            ));
        }
        if subject.starts_with("wharf.") || subject.starts_with('$') || subject.starts_with("_INBOX") {
            return Err(format!(
                "subject {subject} is reserved (Wharf's own, the server's, or another request's inbox); service {} may use only the subjects of namespace {}, written relative to it (`orders.new` is {}.{}.orders.new)",
                self.service, self.namespace, MESSAGE_PREFIX, self.namespace
            ));
        }
        check_subject(subject, false).map_err(|e| format!("{}: {e}", self.service))?;
        Ok(message_subject(&self.namespace, subject))
    }

    /// The subject as the component sees it: relative to its namespace when it is one of its own.
    fn shown(&self, subject: &str) -> String {
        relative_subject(&self.namespace, subject).unwrap_or(subject).to_string()
    }
}

/// The per-instance view the generated bindings call into.
pub struct Messaging<'a> {
    pub(crate) access: Option<&'a MessagingAccess>,
    /// The reply subject of the message this instance handles.
    pub(crate) reply_to: Option<&'a str>,
    pub(crate) logs: &'a LogBuffer,
}

/// Marks [`Messaging`] as the data of the messaging host functions.
pub(crate) struct HasMessaging;

impl HasData for HasMessaging {
    type Data<'a> = Messaging<'a>;
}

/// Adds `wasmcloud:messaging/consumer` (and its types) to a linker.
pub(crate) fn add_to_linker<T: Send + 'static>(linker: &mut wasmtime::component::Linker<T>, f: fn(&mut T) -> Messaging<'_>) -> wasmtime::Result<()> {
    consumer::add_to_linker::<_, HasMessaging>(linker, f)?;
    types::add_to_linker::<_, HasMessaging>(linker, f)?;
    Ok(())
}

impl Messaging<'_> {
    /// The access, or the guest error for a workload that has none.
    fn access(&self) -> Result<&MessagingAccess, String> {
        self.access.ok_or_else(|| "messaging is not available to this component (it runs outside a Wharf host's agent)".to_string())
    }

    /// Logs a refusal where the service's owner will see it, and returns it.
    fn refused(&self, message: String) -> String {
        self.logs.push_host_note(&format!("wharf: {message}"));
        message
    }
}

impl types::Host for Messaging<'_> {}

impl consumer::Host for Messaging<'_> {
    async fn publish(&mut self, msg: BrokerMessage) -> wasmtime::Result<Result<(), String>> {
        let access = match self.access() {
            Ok(access) => access,
            Err(e) => return Ok(Err(e)),
        };
        let subject = match access.resolve(&msg.subject, self.reply_to) {
            Ok(subject) => subject,
            Err(e) => return Ok(Err(self.refused(e))),
        };
        // A reply subject the component names is not passed on: core NATS
        // publishes carry none through the bus, and a message's reply-to would
        // let it answer into another namespace's inbox.
        Ok(access.bus.publish(&subject, Bytes::from(msg.body)).await.map_err(|e| format!("cannot publish on {}: {e}", msg.subject)))
    }

    async fn request(&mut self, subject: String, body: Vec<u8>, timeout_ms: u32) -> wasmtime::Result<Result<BrokerMessage, String>> {
        let access = match self.access() {
            Ok(access) => access,
            Err(e) => return Ok(Err(e)),
        };
        let resolved = match access.resolve(&subject, self.reply_to) {
            Ok(subject) => subject,
            Err(e) => return Ok(Err(self.refused(e))),
        };
        let timeout = Duration::from_millis(u64::from(timeout_ms)).min(MAX_REQUEST_TIMEOUT);
        Ok(match access.bus.request(&resolved, Bytes::from(body), timeout).await {
            Ok(reply) => Ok(BrokerMessage { subject: access.shown(&reply.subject), body: reply.payload.to_vec(), reply_to: None }),
            Err(RequestError::NoResponders { .. }) => Err(format!("no one is listening on {subject}")),
            Err(e) => Err(format!("request on {subject} failed: {e}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> MessagingAccess {
        MessagingAccess::new(Bus::local(wharf_bus::LocalStore::in_memory().expect("store")), "shop", "shop/orders")
    }

    #[test]
    fn subjects_resolve_within_the_namespace() {
        let a = access();
        assert_eq!(a.resolve("orders.new", None).as_deref(), Ok("wharf.msg.shop.orders.new"));
        assert_eq!(a.resolve("wharf.msg.shop.orders.new", None).as_deref(), Ok("wharf.msg.shop.orders.new"));
        assert_eq!(a.resolve("_INBOX.abc", Some("_INBOX.abc")).as_deref(), Ok("_INBOX.abc"));
        let other = a.resolve("wharf.msg.bank.payments", None).expect_err("another namespace");
        assert!(other.contains("belongs to namespace bank") && other.contains("shop/orders"), "{other}");
        for reserved in ["wharf.ctl.activate", "$JS.API.STREAM.LIST", "_INBOX.someone-else"] {
            assert!(a.resolve(reserved, None).expect_err(reserved).contains("reserved"), "{reserved}");
        }
        assert!(a.resolve("orders.*", None).expect_err("wildcard").contains("wildcards"));
        assert_eq!(a.shown("wharf.msg.shop.orders.new"), "orders.new");
    }
}
