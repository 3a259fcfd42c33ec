//! Message triggers: a service invoked once per message on NATS subjects of
//! its namespace (`triggers: [{subject: "orders.>"}]`), at most once from
//! core NATS or, with `stream:`, at least once from a JetStream consumer;
//! the subjects they use, and the messages hosts pass each other to deliver
//! one to a replica elsewhere.
//!
//! Subjects are relative to the service's namespace: `orders.new` written
//! in namespace `shop` is the NATS subject `wharf.msg.shop.orders.new`
//! ([`message_subject`]). So a tenant names only its own namespace's
//! subjects, and none of Wharf's own.

use crate::names::HostId;
use serde::{Deserialize, Serialize};

/// Every tenant's message subject starts with this, then the namespace.
pub const MESSAGE_PREFIX: &str = "wharf.msg";

/// The most triggers one service may declare.
pub const MAX_TRIGGERS: usize = 16;

/// The longest relative subject, in bytes.
pub const MAX_SUBJECT: usize = 256;

/// The most deliveries a stream trigger may ask for before dead-lettering.
pub const MAX_DELIVER: u32 = 100;

/// The WIT interface a component must export to be triggered by messages
/// (`wasmcloud:messaging` 0.2.0, as wasmCloud's components target).
pub const MESSAGE_HANDLER_EXPORT: &str = "wasmcloud:messaging/handler@0.2.0";

/// One trigger of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    /// The subject, relative to the namespace; `*` matches one token and a
    /// final `>` one or more (`orders.>`).
    pub subject: String,
    /// A JetStream stream (a DNS label, per namespace) that keeps the
    /// subject's messages: each is handled at least once, acknowledged after
    /// the handler succeeds and redelivered when it fails. Without it,
    /// delivery is at most once (core NATS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Deliveries of one message before it goes to the dead-letter subject
    /// (default 5; only with `stream`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_deliver: Option<u32>,
    /// Where a message goes after `max_deliver` failed deliveries, relative
    /// to the namespace (default `dead-letter.<service>`; only with `stream`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<String>,
}

/// `max_deliver` when a stream trigger does not say.
pub const DEFAULT_MAX_DELIVER: u32 = 5;

impl Trigger {
    /// A core NATS trigger on `subject`.
    pub fn subject(subject: impl Into<String>) -> Self {
        Trigger { subject: subject.into(), stream: None, max_deliver: None, dead_letter: None }
    }

    /// Deliveries before dead-lettering.
    pub fn max_deliver(&self) -> u32 {
        self.max_deliver.unwrap_or(DEFAULT_MAX_DELIVER)
    }

    /// The dead-letter subject, relative to the namespace.
    pub fn dead_letter(&self, service: &str) -> String {
        self.dead_letter.clone().unwrap_or_else(|| format!("dead-letter.{service}"))
    }

    /// Checks the subject, the stream's name and the delivery settings;
    /// the error says which field and why.
    pub fn validate(&self, service: &str) -> Result<(), (&'static str, String)> {
        check_subject(&self.subject, true).map_err(|e| ("subject", e))?;
        let Some(stream) = &self.stream else {
            if self.max_deliver.is_some() {
                return Err(("max_deliver", "only a trigger with `stream:` is redelivered; add `stream: NAME` or remove max_deliver".into()));
            }
            if self.dead_letter.is_some() {
                return Err(("dead_letter", "only a trigger with `stream:` dead-letters; add `stream: NAME` or remove dead_letter".into()));
            }
            return Ok(());
        };
        crate::names::check_label(stream).map_err(|e| ("stream", e.to_string()))?;
        let max = self.max_deliver();
        if !(1..=MAX_DELIVER).contains(&max) {
            return Err(("max_deliver", format!("must be between 1 and {MAX_DELIVER}, got {max}")));
        }
        let dead = self.dead_letter(service);
        check_subject(&dead, false).map_err(|e| ("dead_letter", e))?;
        if subject_matches(&self.subject, &dead) {
            return Err(("dead_letter", format!("{dead:?} matches the trigger's own subject {:?}: a dead letter would be delivered again", self.subject)));
        }
        Ok(())
    }
}

/// Checks a relative subject: non-empty tokens separated by `.`, no
/// whitespace, at most [`MAX_SUBJECT`] bytes; with `wildcards`, `*` and a
/// final `>` as whole tokens, else none.
pub fn check_subject(subject: &str, wildcards: bool) -> Result<(), String> {
    if subject.is_empty() || subject.len() > MAX_SUBJECT {
        return Err(format!("a subject must be 1 to {MAX_SUBJECT} bytes long (got {})", subject.len()));
    }
    if subject.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(format!("subject {subject:?} contains whitespace"));
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(format!("subject {subject:?} has an empty token (two dots, or a dot at an end)"));
        }
        let wild = *token == "*" || *token == ">";
        if !wild && token.contains(['*', '>']) {
            return Err(format!("subject {subject:?}: `*` and `>` must be whole tokens"));
        }
        if wild && !wildcards {
            return Err(format!("subject {subject:?} must not contain wildcards"));
        }
        if *token == ">" && i + 1 != tokens.len() {
            return Err(format!("subject {subject:?}: `>` may only be the last token"));
        }
    }
    Ok(())
}

/// Whether the literal subject `subject` matches `pattern` (NATS rules).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject = subject.split('.');
    for token in pattern.split('.') {
        match (token, subject.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (literal, Some(s)) if literal == s => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

/// The NATS subject of `relative` in `namespace`: `wharf.msg.<ns>.<relative>`.
pub fn message_subject(namespace: &str, relative: &str) -> String {
    format!("{MESSAGE_PREFIX}.{namespace}.{relative}")
}

/// The part of a NATS subject after `wharf.msg.<namespace>.`, if it is one
/// of that namespace's subjects.
pub fn relative_subject<'a>(namespace: &str, subject: &'a str) -> Option<&'a str> {
    subject.strip_prefix(MESSAGE_PREFIX)?.strip_prefix('.')?.strip_prefix(namespace)?.strip_prefix('.')
}

/// The namespace of a tenant's NATS subject (`wharf.msg.<ns>.…`), if it is one.
pub fn subject_namespace(subject: &str) -> Option<&str> {
    let rest = subject.strip_prefix(MESSAGE_PREFIX)?.strip_prefix('.')?;
    rest.split_once('.').map(|(ns, _)| ns)
}

/// The JetStream stream a namespace's `stream:` name stands for.
pub fn stream_name(namespace: &str, stream: &str) -> String {
    format!("wharf-msg-{namespace}-{stream}")
}

/// The durable consumer of a service's trigger on `subject` (one per
/// service and subject, shared by every host, so each message goes to one
/// of them): `wharf-<service>-<16 hex digits of the subject's SHA-256>`, as
/// consumer names may hold no `.`, `*` or `>`.
pub fn consumer_name(service: &str, subject: &str) -> String {
    use sha2::Digest as _;
    let hash = hex::encode(sha2::Sha256::digest(subject.as_bytes()));
    format!("wharf-{service}-{}", &hash[..16])
}

/// Where host `host`, with a ready replica of a triggered service, takes
/// messages another host received and chose it for (request/reply; queue
/// group [`delivery_queue_group`]). Each host listens only on its own
/// (its NATS identity may subscribe to no other host's), as for requests
/// ([`crate::names::host_request_subject`]).
pub fn delivery_subject(host: &HostId, namespace: &str, name: &str) -> String {
    format!("wharf.host.{host}.trigger.{namespace}.{name}")
}

/// Matches [`delivery_subject`] of every host: what a host may publish to
/// (messages handed to other hosts), never subscribe to.
pub const DELIVERIES_WILDCARD: &str = "wharf.host.*.trigger.>";

/// Where the control plane hands host `host` a message of a triggered
/// service it took in (request/reply, answered with a [`DeliveryResult`]):
/// the host runs it on a replica here, hands it to one elsewhere, or wakes
/// the service. Hosts take in no message themselves (their NATS identities
/// may not subscribe to `wharf.msg.>`, which would show them every
/// tenant's messages); the control plane's intake is the only subscriber.
pub fn intake_subject(host: &HostId, namespace: &str, name: &str) -> String {
    format!("wharf.host.{host}.intake.{namespace}.{name}")
}

/// What host `host` listens on for [`intake_subject`]: one subscription for every service.
pub fn host_intake_wildcard(host: &HostId) -> String {
    format!("wharf.host.{host}.intake.*.*")
}

/// The namespace and name of the service an [`intake_subject`] names.
pub fn intake_service(subject: &str) -> Option<(&str, &str)> {
    let rest = subject.strip_prefix("wharf.host.")?;
    let (_, rest) = rest.split_once(".intake.")?;
    let (namespace, name) = rest.split_once('.')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains('.')).then_some((namespace, name))
}

/// The queue group of [`delivery_subject`] (so a listener starting while
/// the previous one stops never takes a message the other took too) and of
/// a core trigger's subject (one member per host gets each message).
pub fn delivery_queue_group(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

/// A message handed from the host that received it to one with a replica:
/// this head (JSON), a newline, then the body as it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The subject relative to the namespace, as the handler sees it.
    pub subject: String,
    /// Where the sender waits for an answer, if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// For a stream's message the control plane took in: whether this is
    /// its last allowed delivery (a failure dead-letters it rather than
    /// delivering it again). `None` for a core NATS message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivery: Option<bool>,
}

/// How a handed-over message's handler ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryResult {
    /// Why the handler failed; `None` when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The host had no replica left to run it (it stopped meanwhile): the
    /// sender tries again elsewhere.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_here: bool,
    /// The handler never ran: no instance came free in time. The sender
    /// tries again; it is not a failed delivery.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overloaded: bool,
}

impl Delivery {
    /// Head, newline, body.
    pub fn encode(&self, body: &[u8]) -> Vec<u8> {
        // A struct of two strings always serializes.
        let mut out = serde_json::to_vec(self).unwrap_or_default();
        out.push(b'\n');
        out.extend_from_slice(body);
        out
    }

    /// Splits what [`Delivery::encode`] wrote into the head and the body.
    pub fn decode(bytes: &[u8]) -> Result<(Delivery, &[u8]), String> {
        let newline = bytes.iter().position(|b| *b == b'\n').ok_or("a delivery has no head line")?;
        let head = serde_json::from_slice(&bytes[..newline]).map_err(|e| format!("a delivery's head is unreadable: {e}"))?;
        Ok((head, &bytes[newline + 1..]))
    }
}

/// Several messages the control plane's intake hands a host at once (on
/// its [`intake_subject`]): each as [`Delivery::encode`] wrote it, preceded
/// by its length (4 bytes, big-endian). The host answers with one
/// [`DeliveryResult`] per message, in order (a JSON array).
pub fn encode_batch<'a>(deliveries: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for delivery in deliveries {
        // A delivery fits a NATS message, far below 4 GiB.
        out.extend_from_slice(&u32::try_from(delivery.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(delivery);
    }
    out
}

/// Splits what [`encode_batch`] wrote into its deliveries.
pub fn decode_batch(mut bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut deliveries = Vec::new();
    while !bytes.is_empty() {
        let (len, rest) = bytes.split_at_checked(4).ok_or("a batch of deliveries ends inside a length")?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let (delivery, rest) = rest.split_at_checked(len).ok_or("a batch of deliveries ends inside a delivery")?;
        deliveries.push(delivery);
        bytes = rest;
    }
    Ok(deliveries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_intake_subject_names_its_host_and_service() {
        let host = HostId::new("edge-a").expect("host id");
        let subject = intake_subject(&host, "shop", "orders");
        assert_eq!(subject, "wharf.host.edge-a.intake.shop.orders");
        assert_eq!(intake_service(&subject), Some(("shop", "orders")));
        for bad in ["wharf.host.edge-a.intake.shop", "wharf.host.edge-a.intake.shop.", "wharf.host.edge-a.trigger.shop.orders", "wharf.host.a.intake.shop.orders.x"] {
            assert_eq!(intake_service(bad), None, "{bad}");
        }
        let wildcard = host_intake_wildcard(&host);
        assert!(subject_matches(&wildcard, &subject), "{wildcard}");
    }

    #[test]
    fn subjects_are_checked() {
        for good in ["orders", "orders.>", "orders.*.new", "*", ">", "a-b_c.1"] {
            assert_eq!(check_subject(good, true), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "1 to 256"),
            ("a..b", "empty token"),
            ("a.", "empty token"),
            ("a b", "whitespace"),
            ("a.>.b", "last token"),
            ("a*", "whole tokens"),
        ] {
            let e = check_subject(bad, true).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(check_subject("a.*", false).expect_err("wild").contains("wildcards"));
    }

    #[test]
    fn patterns_match_as_nats_does() {
        assert!(subject_matches("orders.>", "orders.new"));
        assert!(subject_matches("orders.>", "orders.new.eu"));
        assert!(!subject_matches("orders.>", "orders"));
        assert!(subject_matches("orders.*", "orders.new"));
        assert!(!subject_matches("orders.*", "orders.new.eu"));
        assert!(subject_matches("orders", "orders"));
        assert!(!subject_matches("orders", "orders.new"));
    }

    #[test]
    fn subjects_live_in_their_namespace() {
        assert_eq!(message_subject("shop", "orders.new"), "wharf.msg.shop.orders.new");
        assert_eq!(relative_subject("shop", "wharf.msg.shop.orders.new"), Some("orders.new"));
        assert_eq!(relative_subject("shop", "wharf.msg.shopping.orders"), None);
        assert_eq!(subject_namespace("wharf.msg.other.x"), Some("other"));
        assert_eq!(subject_namespace("orders.x"), None);
        let host = HostId::new("edge-a").expect("valid");
        let handed = delivery_subject(&host, "shop", "orders");
        assert_eq!(handed, "wharf.host.edge-a.trigger.shop.orders");
        assert_eq!(crate::names::host_of_subject(&handed), Some(host), "on the host's own subjects");
        let (a, b) = (consumer_name("orders", "orders.>"), consumer_name("orders", "refunds.>"));
        assert!(a.starts_with("wharf-orders-") && a.len() == "wharf-orders-".len() + 16 && a != b, "{a} {b}");
    }

    #[test]
    fn stream_settings_need_a_stream() {
        let mut t = Trigger::subject("orders.>");
        assert_eq!(t.validate("svc"), Ok(()));
        t.max_deliver = Some(3);
        assert_eq!(t.validate("svc").map_err(|e| e.0), Err("max_deliver"));
        t.stream = Some("orders".into());
        assert_eq!(t.validate("svc"), Ok(()));
        t.dead_letter = Some("orders.dead".into());
        assert_eq!(t.validate("svc").map_err(|e| e.0), Err("dead_letter"));
        t.dead_letter = None;
        t.max_deliver = Some(0);
        assert_eq!(t.validate("svc").map_err(|e| e.0), Err("max_deliver"));
        t.max_deliver = None;
        t.stream = Some("Not A Label".into());
        assert_eq!(t.validate("svc").map_err(|e| e.0), Err("stream"));
    }

    #[test]
    fn batches_round_trip_and_a_cut_one_is_refused() {
        let one = Delivery { subject: "a".into(), reply_to: None, last_delivery: None }.encode(b"first");
        let two = Delivery { subject: "b".into(), reply_to: Some("_INBOX.x".into()), last_delivery: Some(false) }.encode(b"");
        let batch = encode_batch([one.as_slice(), two.as_slice()]);
        assert_eq!(decode_batch(&batch), Ok(vec![one.as_slice(), two.as_slice()]));
        assert_eq!(decode_batch(&[]), Ok(Vec::new()));
        assert!(decode_batch(&batch[..batch.len() - 1]).expect_err("cut").contains("inside a delivery"));
        assert!(decode_batch(&batch[..2]).expect_err("cut").contains("inside a length"));
    }

    #[test]
    fn deliveries_round_trip() {
        let d = Delivery { subject: "orders.new".into(), reply_to: Some("_INBOX.x".into()), last_delivery: Some(true) };
        let bytes = d.encode(b"body\nwith newline");
        assert_eq!(Delivery::decode(&bytes), Ok((d, &b"body\nwith newline"[..])));
        assert!(Delivery::decode(b"no newline").is_err());
    }
}
