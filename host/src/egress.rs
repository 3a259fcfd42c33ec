//! Outbound `wasi:http` requests: calls to services go to them (locally or
//! over the bus); anything else is denied unless the destination is on the
//! workload's allow-list, and then sent by [`crate::outbound`], which also
//! refuses addresses in private ranges after resolving the name.

use crate::ingress::RequestBody;
use crate::logs::LogBuffer;
use crate::workload::ResponseBody;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use wharf_proto::ServiceId;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

/// Which outbound destinations one workload may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Allowed destinations: `host`, `host:port`, or `*.domain` for any subdomain.
    allowed: Arc<[String]>,
}

impl EgressPolicy {
    /// A policy allowing exactly `hosts`.
    pub fn allow(hosts: impl IntoIterator<Item = String>) -> Self {
        EgressPolicy { allowed: hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect() }
    }

    /// Whether a request to `host` (and `port`, if the URI had one) is allowed.
    pub fn permits(&self, host: &str, port: Option<u16>) -> bool {
        let host = host.to_ascii_lowercase();
        self.allowed.iter().any(|entry| {
            let (entry_host, entry_port) = match entry.rsplit_once(':') {
                Some((h, p)) => match p.parse::<u16>() {
                    Ok(p) => (h, Some(p)),
                    Err(_) => (entry.as_str(), None),
                },
                None => (entry.as_str(), None),
            };
            if entry_port.is_some() && entry_port != port {
                return false;
            }
            match entry_host.strip_prefix("*.") {
                Some(domain) => host.len() > domain.len() + 1 && host.ends_with(domain) && host[..host.len() - domain.len()].ends_with('.'),
                None => host == entry_host,
            }
        })
    }

    fn describe(&self) -> String {
        if self.allowed.is_empty() { "none".to_string() } else { self.allowed.join(", ") }
    }
}

/// How a component's outgoing request to `http://<service>` reaches that
/// service: the host agent implements it (locally or over the bus).
pub trait ServiceCalls: Send + Sync + 'static {
    /// The service an outgoing URL's host names (`name` in `namespace`, or
    /// `name.namespace`), if there is one.
    fn resolve(&self, host: &str, namespace: &str) -> Option<ServiceId>;
    /// Sends the request from a service of namespace `caller` to `service`,
    /// with the same limits and errors as ingress traffic, if the callee's
    /// namespace admits the caller's.
    fn call(&self, caller: &str, service: ServiceId, request: http::Request<RequestBody>) -> Pin<Box<dyn Future<Output = http::Response<ResponseBody>> + Send>>;
}

/// Service-to-service calls for one workload: who routes them, and the
/// namespace a bare service name is looked up in.
#[derive(Clone)]
pub struct ServiceLink {
    pub calls: Arc<dyn ServiceCalls>,
    pub namespace: String,
}

impl std::fmt::Debug for ServiceLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceLink").field("namespace", &self.namespace).finish_non_exhaustive()
    }
}

/// The `wasi:http` hooks of one instance: calls to services go to them;
/// anything else must pass the egress check before the real client sends it.
pub(crate) struct EgressHooks {
    pub(crate) policy: EgressPolicy,
    /// The non-public ranges the host's admin opened (the runtime's config).
    pub(crate) private: wharf_proto::egress::PrivateEgress,
    pub(crate) logs: LogBuffer,
    pub(crate) services: Option<ServiceLink>,
}

type SendFuture = Box<
    dyn Future<Output = Result<(http::Response<WasiBody>, Box<dyn Future<Output = Result<(), HttpError>> + Send>), HttpError>>
        + Send,
>;

impl WasiHttpHooks for EgressHooks {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> SendFuture {
        let uri = request.uri();
        let host = uri.host().unwrap_or_default();
        // A service name with no port is a call to that service.
        if uri.port().is_none()
            && let Some(link) = &self.services
            && let Some(service) = link.calls.resolve(host, &link.namespace)
        {
            drop(fut);
            // Called from inside the guest's span: the call is its child, and the request carries it.
            let span = tracing::trace_span!(target: crate::trace::TARGET, "call", service = %service);
            crate::trace::inject(&span, request.headers_mut());
            let response = tracing::Instrument::instrument(link.calls.call(&link.namespace, service, request), span);
            return Box::new(async move {
                let response = response.await;
                Ok((response, Box::new(async { Ok(()) }) as Box<dyn Future<Output = _> + Send>))
            });
        }
        if !self.policy.permits(host, uri.port_u16()) {
            self.logs.push_host_note(&format!(
                "wharf: outbound request to {uri} denied: {host} is not in this service's allowed outbound hosts ({})",
                self.policy.describe()
            ));
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        // The body-writing future only matters to embedders that drive it
        // themselves; hyper drives the body on its own.
        drop(fut);
        let (private, logs) = (self.private.clone(), self.logs.clone());
        Box::new(async move {
            crate::outbound::send(request, options, &private).await.map_err(|refused| {
                if !refused.note.is_empty() {
                    logs.push_host_note(&refused.note);
                }
                refused.error
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_matches_hosts_ports_and_subdomains() {
        let policy = EgressPolicy::allow(["api.example.com".into(), "db.local:5432".into(), "*.svc.test".into()]);
        assert!(policy.permits("api.example.com", None));
        assert!(policy.permits("API.example.com", Some(443)));
        assert!(!policy.permits("example.com", None));
        assert!(policy.permits("db.local", Some(5432)));
        assert!(!policy.permits("db.local", Some(80)));
        assert!(policy.permits("a.svc.test", None));
        assert!(!policy.permits("svc.test", None));
        assert!(!policy.permits("evilsvc.test", None));
        assert!(!EgressPolicy::default().permits("anything", None));
    }
}
