//! Outbound `wasi:http` requests: denied unless the destination is on the
//! workload's allow-list. This is the hook where service-to-service calls will
//! be routed onto the bus.

use crate::logs::LogBuffer;
use std::sync::Arc;
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

/// The `wasi:http` hooks of one instance: the egress check in front of the real client.
pub(crate) struct EgressHooks {
    pub(crate) policy: EgressPolicy,
    pub(crate) logs: LogBuffer,
}

type SendFuture = Box<
    dyn Future<Output = Result<(http::Response<WasiBody>, Box<dyn Future<Output = Result<(), HttpError>> + Send>), HttpError>>
        + Send,
>;

impl WasiHttpHooks for EgressHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> SendFuture {
        let uri = request.uri();
        let host = uri.host().unwrap_or_default();
        if !self.policy.permits(host, uri.port_u16()) {
            self.logs.push_host_note(&format!(
                "wharf: outbound request to {uri} denied: {host} is not in this service's allowed outbound hosts ({})",
                self.policy.describe()
            ));
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        // The body-writing future only matters to embedders that drive it
        // themselves; the default client drives the body on its own.
        drop(fut);
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((response.map(BodyExt::boxed_unsync), Box::new(io) as Box<dyn Future<Output = _> + Send>))
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
