//! The connection to the NATS system account, and the disconnect advisories it hears.
//!
//! When a client's connection closes, the server it was connected to
//! publishes an advisory on `$SYS.ACCOUNT.<account>.DISCONNECT` naming the
//! client (its connection name, user and account) and why. Only the system
//! account may subscribe to those subjects, so hearing them takes a second
//! connection with a system-account user's credentials. System subjects
//! cross the routes of a cluster: one connection hears the advisories of
//! every server. A server that dies (rather than shutting down) sends none
//! for its clients; they reconnect to another server or are missed, and
//! heartbeats notice them.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::{RequestErrorKind, ServerAddr};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Deserialize;

use super::{NatsAuth, NatsBus, NatsOptions, TlsSetup};
use crate::error::{ConnectError, DisconnectsError};
use crate::{ClientGone, DisconnectReason};

/// How long the server may take to answer a system request.
const SYSTEM_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to the system account as `auth`, and checks that it is the system account.
pub(super) async fn connect(
    addrs: &[ServerAddr],
    urls: &str,
    options: &NatsOptions,
    auth: &NatsAuth,
    tls: Option<&TlsSetup>,
) -> Result<async_nats::Client, ConnectError> {
    let wrap = |source: ConnectError| ConnectError::SystemAccount {
        url: urls.to_owned(),
        source: Box::new(source),
    };
    let name = format!("{}-system", options.name);
    let connect = super::client_options(&name, auth, options.connect_timeout, tls)
        .await
        .map_err(wrap)?;
    let client = super::open(connect, addrs, urls, tls).await.map_err(wrap)?;
    // Servers answer `$SYS.REQ.SERVER.PING` to system-account users only;
    // for any other account nobody listens on it.
    let ping = async_nats::Request::new()
        .payload(Bytes::new())
        .timeout(Some(SYSTEM_REQUEST_TIMEOUT));
    match client.send_request("$SYS.REQ.SERVER.PING", ping).await {
        Ok(_) => Ok(client),
        Err(err) if err.kind() == RequestErrorKind::NoResponders => {
            Err(ConnectError::NotSystemAccount {
                url: urls.to_owned(),
            })
        }
        Err(err) => Err(wrap(ConnectError::Unreachable {
            url: urls.to_owned(),
            source: Box::new(err),
        })),
    }
}

impl NatsBus {
    pub(crate) async fn client_disconnects(&self) -> Result<NatsDisconnects, DisconnectsError> {
        let system = self
            .system
            .as_ref()
            .ok_or(DisconnectsError::NotConfigured)?;
        // Only this bus's own account: other applications sharing the
        // servers are none of its business. A server that does not say
        // which account that is gets every account's advisories.
        let subject = match self.account().await {
            Some(account) => format!("$SYS.ACCOUNT.{account}.DISCONNECT"),
            None => "$SYS.ACCOUNT.*.DISCONNECT".to_owned(),
        };
        let subscriber =
            system
                .subscribe(subject)
                .await
                .map_err(|err| DisconnectsError::Unavailable {
                    source: Box::new(err),
                })?;
        // Once the server has answered a flush it holds the subscription, so
        // no disconnect after this returns is missed.
        system
            .flush()
            .await
            .map_err(|err| DisconnectsError::Unavailable {
                source: Box::new(err),
            })?;
        Ok(NatsDisconnects { subscriber })
    }

    /// The account of this bus's own connection, as the server reports it
    /// (`$SYS.REQ.USER.INFO`, 2.10 and newer); `None` if it does not answer.
    async fn account(&self) -> Option<String> {
        let request = async_nats::Request::new()
            .payload(Bytes::new())
            .timeout(Some(SYSTEM_REQUEST_TIMEOUT));
        let reply = self
            .client
            .send_request("$SYS.REQ.USER.INFO", request)
            .await
            .ok()?;
        let info: UserInfoReply = serde_json::from_slice(&reply.payload).ok()?;
        Some(info.data.account).filter(|account| !account.is_empty())
    }
}

/// The advisories of one subscription, as [`ClientGone`]s.
pub(crate) struct NatsDisconnects {
    subscriber: async_nats::Subscriber,
}

impl Stream for NatsDisconnects {
    type Item = ClientGone;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ClientGone>> {
        loop {
            let Some(message) = std::task::ready!(self.subscriber.poll_next_unpin(cx)) else {
                return Poll::Ready(None);
            };
            match parse_advisory(&message.payload) {
                Ok(gone) => return Poll::Ready(Some(gone)),
                Err(err) => tracing::warn!(
                    subject = %message.subject,
                    "ignoring a disconnect advisory that does not parse: {err}"
                ),
            }
        }
    }
}

/// The parts of `io.nats.server.advisory.v1.client_disconnect` the bus reports.
/// Other fields, and fields a newer server adds, are ignored.
#[derive(Deserialize)]
struct DisconnectAdvisory {
    server: AdvisoryServer,
    client: AdvisoryClient,
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
struct AdvisoryServer {
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
struct AdvisoryClient {
    #[serde(default)]
    name: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    acc: String,
}

/// The reply to `$SYS.REQ.USER.INFO`.
#[derive(Deserialize)]
struct UserInfoReply {
    data: UserInfo,
}

#[derive(Deserialize)]
struct UserInfo {
    #[serde(default)]
    account: String,
}

fn parse_advisory(payload: &[u8]) -> Result<ClientGone, serde_json::Error> {
    let advisory: DisconnectAdvisory = serde_json::from_slice(payload)?;
    Ok(ClientGone {
        name: advisory.client.name,
        user: advisory.client.user,
        account: advisory.client.acc,
        server: advisory.server.name,
        reason: DisconnectReason::from_server(&advisory.reason),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_advisory_becomes_a_client_gone() {
        // As nats-server 2.15 sends it (abridged), with a field it may add one day.
        let payload = br#"{"type":"io.nats.server.advisory.v1.client_disconnect","id":"BX4Hfe7ScSpb6lUhORLXpA",
            "timestamp":"2026-11-28T16:48:16.537443743Z",
            "server":{"name":"n1","host":"127.0.0.1","id":"NBWM","ver":"2.15.1","jetstream":true,"seq":24},
            "client":{"start":"2026-11-28T16:48:16.535678155Z","host":"127.0.0.1","id":9,"acc":"WHARF","user":"host",
                      "name":"wharf-host-x","lang":"rust","ver":"0.51.0","kind":"Client","client_type":"nats"},
            "sent":{"msgs":0,"bytes":0},"received":{"msgs":0,"bytes":0},"reason":"Client Closed","future":1}"#;
        let gone = parse_advisory(payload).expect("parses");
        assert_eq!(
            gone,
            ClientGone {
                name: "wharf-host-x".to_owned(),
                user: "host".to_owned(),
                account: "WHARF".to_owned(),
                server: "n1".to_owned(),
                reason: DisconnectReason::ClientClosed,
            }
        );
    }

    #[test]
    fn an_unnamed_client_and_other_reasons_parse() {
        let payload =
            br#"{"server":{"name":"n0"},"client":{"acc":"$G"},"reason":"Stale Connection"}"#;
        let gone = parse_advisory(payload).expect("parses");
        assert_eq!(gone.name, "");
        assert_eq!(gone.account, "$G");
        assert_eq!(
            gone.reason,
            DisconnectReason::Other("Stale Connection".to_owned())
        );
        assert!(parse_advisory(b"{\"server\":{}}").is_err(), "no client");
        assert!(parse_advisory(b"not json").is_err());
    }
}
