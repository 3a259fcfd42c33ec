//! Serving requests: from the ingress (routed by host name and path) and
//! from other components, to a ready local replica when there is one, else
//! over the bus to another host that has one; and answering the requests
//! that reach this host over the bus.
//!
//! A service whose traffic is split picks a revision per request (see
//! [`super::directory::Directory::pick`]); otherwise any ready replica of
//! any revision will do. An `x-wharf-revision: N` header pins a request to
//! revision N. The sender picks the host, too: one the directory says has
//! a ready replica of the revision (the hosts in turn), and sends the
//! request on that host's own subject for the revision
//! ([`wharf_proto::names::host_request_subject`]). A host that answers
//! "not here", or where nobody listens, is left for another (a bounded
//! number of them).
//!
//! A host listens only on its own subjects, exactly for the revisions it
//! has a ready replica of (its NATS identity may subscribe to no other
//! host's), and announces each as it starts. When it stops, it drains: it
//! unsubscribes and still answers what NATS already handed it (from the
//! replica being stopped, or with a "not here" answer the sender sends
//! elsewhere), so a replica going away never loses a request in flight to it.

use super::HostAgent;
use crate::ingress::RequestBody;
use crate::limits::WorkloadLimits;
use crate::remote::{NoReplica, Prepared};
use crate::workload::{ResponseBody, error_response};
use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::oneshot;
use wharf_proto::names::{host_request_subject, revision_queue_group, service_ready_subject};
use wharf_proto::{HostId, ReplicaReady, ServiceId};

/// Header pinning a request to one revision of its service.
pub const REVISION_HEADER: &str = "x-wharf-revision";

/// Hosts (and revisions) a request is sent to at most: others are tried
/// when one has no replica any more (it was being stopped, or its status
/// was stale), or is lost while a safe request is in flight there.
pub(super) const HOSTS_TRIED: usize = 5;

/// What a host listens on: one revision of a service, on its own subject.
pub(crate) type Listen = (ServiceId, u64);

/// A listening task and the signal that makes it drain and stop.
pub(crate) struct Listener {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl HostAgent {
    /// Routes one ingress request by host name and path.
    pub async fn route(&self, request: Request<RequestBody>) -> Response<ResponseBody> {
        let host = request.headers().get(http::header::HOST).and_then(|h| h.to_str().ok());
        let host = host.or_else(|| request.uri().authority().map(|a| a.as_str()));
        let path = request.uri().path();
        let Some(service) = self.inner.directory.lookup(host, path) else {
            return error_response(StatusCode::NOT_FOUND, "no_route", format!("no service is routed at {path} (host {})", host.unwrap_or("any")));
        };
        if let Some(refused) = self.over_quota(&service.namespace) {
            return refused;
        }
        self.call(&service, request).await
    }

    /// A call from a service of namespace `caller` (`http://svc.ns`):
    /// refused unless the callee's namespace admits the caller's
    /// (`allow_from`), and counted against the callee namespace's rate
    /// quota like a request at the ingress.
    pub async fn call_from(&self, caller: &str, service: &ServiceId, request: Request<RequestBody>) -> Response<ResponseBody> {
        if !self.inner.rates.admits(&service.namespace, caller) {
            return error_response(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "namespace {} does not accept calls from namespace {caller}; an admin allows them with `wharf namespace set {} --allow-from {caller}`",
                    service.namespace, service.namespace
                ),
            );
        }
        if let Some(refused) = self.over_quota(&service.namespace) {
            return refused;
        }
        self.call(service, request).await
    }

    /// Takes one request from the namespace's rate quota at this host; the
    /// answer when it is spent.
    fn over_quota(&self, namespace: &str) -> Option<Response<ResponseBody>> {
        let rps = self.inner.rates.over(namespace)?;
        let mut response =
            error_response(StatusCode::TOO_MANY_REQUESTS, "rate_limited", format!("namespace {namespace} is over its quota of {rps} requests/s at this host"));
        response.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        Some(response)
    }

    /// Sends a request to `service`: to a ready local replica if there is
    /// one (the least busy of the revision picked), else over the bus.
    pub async fn call(&self, service: &ServiceId, request: Request<RequestBody>) -> Response<ResponseBody> {
        let pinned = match request.headers().get(REVISION_HEADER) {
            None => None,
            Some(value) => match value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) {
                Some(revision) => Some(revision),
                None => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        format!("{REVISION_HEADER} must be a revision number, got {value:?}"),
                    );
                }
            },
        };
        let revision = pinned.or_else(|| self.inner.directory.pick(service));
        let local = self.inner.replicas.least_busy(service, revision);
        let local = local.or_else(|| pinned.is_none().then(|| self.inner.activations.replica(service)).flatten());
        if let Some(workload) = local {
            return workload.handle(request).await;
        }
        let spec = self.inner.directory.spec(service);
        let timeout = spec.as_ref().map_or(Duration::from_secs(5), |s| s.limits.timeout);
        // The deadline runs on the serving host; allow for a full queue wait and the hop.
        let timeout = timeout + WorkloadLimits::default().queue_timeout + Duration::from_millis(500);
        // The hop to another host: its own span, whose context the request carries.
        let hop = tracing::trace_span!(target: crate::trace::TARGET, "hop", from = %self.inner.config.host, service = %service);
        let mut request = request;
        crate::trace::inject(&hop, request.headers_mut());
        let payload = match crate::remote::prepare(&self.inner.bus, request).await {
            Ok(payload) => payload,
            Err(response) => return response,
        };
        match tracing::Instrument::instrument(self.send(service, revision, payload.clone(), timeout), hop).await {
            Ok(response) => return response,
            Err(_) if revision.is_some() && pinned.is_none() => {
                // The split named a revision no host could take right now
                // (it is starting or stopping): any ready replica will do,
                // a local one first.
                if let Some(workload) = self.inner.replicas.least_busy(service, None) {
                    return match payload.into_request() {
                        Ok(request) => workload.handle(request).await,
                        Err(e) => error_response(StatusCode::BAD_REQUEST, "bad_request", e),
                    };
                }
                if let Ok(response) = self.send(service, None, payload.clone(), timeout).await {
                    return response;
                }
            }
            Err(_) => {}
        }
        if let Some(pinned) = pinned {
            return crate::remote::not_ready(service, &format!("has no ready replica of revision {pinned}"));
        }
        match spec {
            Some(spec) if spec.autoscale.is_some() => self.activate(service, payload, timeout).await,
            _ => {
                let local = self.inner.replicas.why_not_ready(service);
                let why = if local.is_empty() { "has no ready replica on any host".to_string() } else { format!("has no ready replica: {local}") };
                crate::remote::not_ready(service, &why)
            }
        }
    }

    /// Sends a prepared request to another host with a ready replica of
    /// `revision` of the service (of any revision when `None`); to others
    /// (at most [`HOSTS_TRIED`] in all) when the one chosen has none any
    /// more or is lost. `Err` when no host could take it.
    ///
    /// A streamed body goes to the next host only if the one before took
    /// none of it (nobody listened, or it answered "not here", which a host
    /// does before it grants credit for the body); once taken, the body is
    /// gone and the next try answers that it cannot be sent again.
    pub(super) async fn send(&self, service: &ServiceId, revision: Option<u64>, payload: Prepared, timeout: Duration) -> Result<Response<ResponseBody>, NoReplica> {
        let me = &self.inner.config.host;
        let mut tried: Vec<(HostId, u64)> = Vec::new();
        let mut outcome = Err(NoReplica::NoResponders);
        while tried.len() < HOSTS_TRIED {
            let Some((host, chosen)) = self.inner.directory.choose(service, revision, me, &tried) else { break };
            tried.push((host.clone(), chosen));
            outcome = self.send_once(service, revision, (&host, chosen), payload.clone(), timeout, &tried).await;
            match &outcome {
                Err(why) => tracing::debug!(%service, %host, revision = chosen, "{why:?}; trying another host"),
                Ok(_) => break,
            }
        }
        outcome
    }

    /// Sends a prepared request to one host, on its subject for revision
    /// `to.1`, and gives up on that host when the control plane announces
    /// it lost (a request or a body in flight there would otherwise wait
    /// out its deadline, or a stream its silence, [`crate::body_stream::IDLE`]):
    /// - before the answer, a safe request ([`Prepared::is_safe`]) goes to
    ///   another host serving `revision` if there is one (`Err(HostLost)`),
    ///   else waits for its answer after all; any other request is
    ///   answered 502 `host_lost` and never sent again (it may have run
    ///   there, or its streamed body gone there);
    /// - after the answer, a body still streaming from that host fails
    ///   (never ends short): its sender is gone.
    async fn send_once(
        &self,
        service: &ServiceId,
        revision: Option<u64>,
        to: (&HostId, u64),
        payload: Prepared,
        timeout: Duration,
        tried: &[(HostId, u64)],
    ) -> Result<Response<ResponseBody>, NoReplica> {
        let (host, chosen) = to;
        let subject = host_request_subject(host, &service.namespace, &service.name, chosen);
        let safe = payload.is_safe();
        let mut lost = self.inner.hosts_down.subscribe();
        let first = crate::remote::send(&self.inner.bus, service, &subject, payload, timeout);
        tokio::pin!(first);
        let mut watching = true;
        let response = loop {
            tokio::select! {
                outcome = &mut first => break outcome?,
                down = lost.recv(), if watching => {
                    let gone = match down {
                        Ok(down) => down.host == *host && down.affects(service),
                        // Announcements were missed: one may have been about this
                        // host. A safe request may go elsewhere on that doubt.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => safe,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            watching = false;
                            continue;
                        }
                    };
                    if !gone {
                        continue;
                    }
                    if !safe {
                        return Ok(error_response(
                            StatusCode::BAD_GATEWAY,
                            "host_lost",
                            format!("host {host}, which was sent this request for service {service}, was lost before it answered; the request is not sent again (it may have run there)"),
                        ));
                    }
                    if self.inner.directory.choose(service, revision, &self.inner.config.host, tried).is_some() {
                        tracing::debug!(%service, %host, "the host holding this request may be lost; sending it to another");
                        return Err(NoReplica::HostLost);
                    }
                    // Nowhere else to send it: wait for this answer after all.
                    watching = false;
                }
            }
        };
        Ok(failed_if_lost(response, host.clone(), service.clone(), lost))
    }

    /// Serves one request that came over the bus, always locally (a second
    /// hop could loop): the least busy ready replica, else one being
    /// stopped, else a "not here" answer the sender retries elsewhere.
    async fn answer(&self, service: &ServiceId, revision: u64, message: wharf_bus::Message) {
        let response = match crate::remote::decode_request(&message) {
            Ok((mut request, streamed)) => {
                let span = tracing::trace_span!(target: crate::trace::TARGET, "from bus", host = %self.inner.config.host, service = %service);
                crate::trace::continue_from(&span, request.headers());
                crate::trace::inject(&span, request.headers_mut());
                let workload = self.inner.replicas.least_busy(service, Some(revision)).or_else(|| self.inner.replicas.draining(service, Some(revision)));
                match (workload, streamed) {
                    // Not served here: the body, if streamed, was not asked
                    // for, so the sender may still send it elsewhere.
                    (None, _) => crate::remote::not_here(service, self.inner.config.host.as_str()),
                    (Some(workload), None) => tracing::Instrument::instrument(workload.handle(request), span).await,
                    (Some(workload), Some(inbox)) => match crate::remote::receive_body(&self.inner.bus, request, inbox).await {
                        Ok(request) => tracing::Instrument::instrument(workload.handle(request), span).await,
                        Err(e) => error_response(StatusCode::BAD_GATEWAY, "stream_failed", format!("cannot receive the request body from the sending host: {e}")),
                    },
                }
            }
            Err(e) => error_response(StatusCode::BAD_REQUEST, "bad_request", format!("unreadable request from the bus: {e}")),
        };
        if let Err(e) = crate::remote::reply(&self.inner.bus, &message, response).await {
            tracing::debug!(%service, "could not answer a bus request: {e}");
        }
    }

    /// Follows other hosts' announcements of ready replicas into the
    /// directory, so requests go to them before the status says so.
    pub(super) async fn follow_ready_replicas(&self) -> Result<(), wharf_bus::SubscribeError> {
        self.each_message(wharf_proto::names::READY_WILDCARD, |agent, message| async move { agent.replica_announced(&message.subject, &message.payload) }).await
    }

    /// Notes one announcement of a ready replica, which came on `subject`,
    /// in the directory: only when it names the host whose subject it came
    /// on (a host may publish on its own subjects only).
    pub(super) fn replica_announced(&self, subject: &str, payload: &[u8]) {
        match serde_json::from_slice::<ReplicaReady>(payload) {
            Ok(ready) if ready.host == self.inner.config.host => {}
            Ok(ready) if wharf_proto::names::host_of_subject(subject).as_ref() != Some(&ready.host) => {
                tracing::debug!(host = %ready.host, "ignoring a ready announcement on {subject}, another host's subject");
            }
            Ok(ready) => self.inner.directory.replica_announced(ready),
            Err(e) => tracing::debug!("ignoring an unreadable ready announcement: {e}"),
        }
    }

    /// Listens on the bus for exactly the revisions with a ready local
    /// replica (none while draining); stops listening drains.
    pub(super) fn update_listening(&self) {
        let wanted: BTreeSet<Listen> = if self.inner.draining.load(Ordering::Relaxed) { BTreeSet::new() } else { self.inner.replicas.ready() };
        let Ok(mut listening) = self.inner.listening.lock() else { return };
        listening.retain(|listen, listener| {
            let keep = wanted.contains(listen) && !listener.task.is_finished();
            if !keep && let Some(stop) = listener.stop.take() {
                let _ = stop.send(());
            }
            keep || !listener.task.is_finished()
        });
        for listen in wanted {
            if listening.get(&listen).is_some_and(|l| l.stop.is_some()) {
                continue;
            }
            let (stop, stopped) = oneshot::channel();
            let task = tokio::spawn(listen_on(Arc::downgrade(&self.inner), listen.clone(), stopped));
            listening.insert(listen, Listener { stop: Some(stop), task });
        }
    }
}

/// One subscription, on this host's own subject for one revision of a
/// service: announces the ready replica, then answers each request in a
/// task of its own (at most the host's handler bound at once), until told
/// to stop; then drains. A queue group, so that a listener starting while
/// the previous one drains never takes a request the other also took.
async fn listen_on(agent: std::sync::Weak<super::Inner>, (service, revision): Listen, mut stop: oneshot::Receiver<()>) {
    let Some(inner) = agent.upgrade() else { return };
    let host = inner.config.host.clone();
    let subject = host_request_subject(&host, &service.namespace, &service.name, revision);
    let group = revision_queue_group(&service.namespace, &service.name, revision);
    let handlers = inner.handlers.clone();
    let mut subscription = match inner.bus.queue_subscribe(&subject, &group).await {
        Ok(subscription) => subscription,
        Err(e) => {
            tracing::error!(%service, "cannot listen for requests on the bus: {e}");
            return;
        }
    };
    // Other hosts may send here now, before the status says so, and
    // requests held for activation on other hosts wake.
    let announce_on = service_ready_subject(&host, &service.namespace, &service.name);
    let ready = ReplicaReady { host, service: service.clone(), revision };
    match serde_json::to_vec(&ready) {
        Ok(payload) => {
            if let Err(e) = inner.bus.publish(&announce_on, Bytes::from(payload)).await {
                tracing::debug!(%service, "could not announce a ready replica: {e}");
            }
        }
        Err(e) => tracing::error!("cannot encode a ready announcement (a bug): {e}"),
    }
    drop(inner);
    let mut draining = false;
    loop {
        let message = tokio::select! {
            message = subscription.next() => message,
            _ = &mut stop, if !draining => {
                draining = true;
                subscription.drain().await;
                continue;
            }
        };
        let Some(message) = message else { break };
        let Some(inner) = agent.upgrade() else { break };
        let Ok(permit) = handlers.clone().acquire_owned().await else { break };
        let agent = HostAgent { inner };
        let service = service.clone();
        tokio::spawn(async move {
            let _permit = permit;
            agent.answer(&service, revision, message).await;
        });
    }
}

/// `response`, whose body fails (never ends short) if `host`, which sends
/// it, is announced lost on `lost` before it ends. A body sent whole
/// cannot be cut, and is returned as it is.
fn failed_if_lost(response: Response<ResponseBody>, host: HostId, service: ServiceId, mut lost: tokio::sync::broadcast::Receiver<Arc<wharf_proto::HostDown>>) -> Response<ResponseBody> {
    use http_body::Body as _;
    use http_body_util::BodyExt as _;
    // A body that came whole with the answer knows its length; a streamed one does not.
    if response.body().is_end_stream() || response.body().size_hint().exact().is_some() {
        return response;
    }
    let gone = async move {
        loop {
            match lost.recv().await {
                Ok(down) if down.host == host && down.affects(&service) => return host,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    };
    response.map(|body| {
        let frames = http_body_util::BodyStream::new(body);
        let state = (frames, Box::pin(gone), false);
        let cut = futures::stream::unfold(state, |(mut frames, mut gone, done)| async move {
            if done {
                return None;
            }
            tokio::select! {
                frame = frames.next() => frame.map(|frame| (frame, (frames, gone, false))),
                host = &mut gone => {
                    let error = wasmtime_wasi_http::Error::InternalError(Some(format!("host {host}, which was sending this body, was lost")));
                    Some((Err(error), (frames, gone, true)))
                }
            }
        });
        http_body_util::StreamBody::new(cut).boxed_unsync()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn down(host: &str) -> Arc<wharf_proto::HostDown> {
        Arc::new(wharf_proto::HostDown { host: HostId::new(host).expect("a label"), services: None })
    }

    /// A body streamed from another host fails (it does not end short)
    /// when that host is announced lost; another host's loss leaves it be,
    /// and a body that came whole is never cut.
    #[tokio::test]
    async fn a_body_streaming_from_a_host_announced_lost_fails_and_no_other_is_cut() {
        let (announce, _) = tokio::sync::broadcast::channel(8);
        let service: ServiceId = "default/bulk".parse().expect("an id");
        let (chunks, rest) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, wasmtime_wasi_http::Error>>(4);
        let frames = futures::stream::unfold(rest, |mut rest| async move { rest.recv().await.map(|frame| (frame, rest)) });
        let streamed = http_body_util::StreamBody::new(frames).boxed_unsync();
        let mut body = failed_if_lost(Response::new(streamed), HostId::new("host-b").expect("a label"), service.clone(), announce.subscribe()).into_body();
        chunks.send(Ok(http_body::Frame::data(Bytes::from_static(b"first")))).await.expect("sent");
        let first = body.frame().await.expect("a frame").expect("data").into_data().expect("data");
        assert_eq!(&first[..], b"first");
        announce.send(down("host-c")).expect("announced");
        chunks.send(Ok(http_body::Frame::data(Bytes::from_static(b"second")))).await.expect("sent");
        let second = body.frame().await.expect("a frame").expect("another host's loss cuts nothing").into_data().expect("data");
        assert_eq!(&second[..], b"second");
        announce.send(down("host-b")).expect("announced");
        let failed = body.frame().await.expect("a frame, not the end").expect_err("the sender is lost");
        assert!(failed.to_string().contains("host host-b, which was sending this body, was lost"), "{failed}");
        assert!(body.frame().await.is_none(), "nothing after the error");

        let whole = crate::workload::full_body(Bytes::from_static(b"all of it"));
        let mut whole = failed_if_lost(Response::new(whole), HostId::new("host-b").expect("a label"), service, announce.subscribe()).into_body();
        // A whole body keeps no receiver, so nobody may be listening.
        drop(announce.send(down("host-b")));
        let all = whole.frame().await.expect("a frame").expect("a whole body is not cut").into_data().expect("data");
        assert_eq!(&all[..], b"all of it");
    }
}
