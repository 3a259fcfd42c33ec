//! The host's admin listener: operator endpoints, kept off the public
//! ingress (loopback by default, `--admin-listen`), as Envoy keeps its admin
//! interface off its listeners.
//!
//! It answers `GET /metrics` (Prometheus text) and `GET /healthz`; anything
//! else is 404. It runs on the same bounded edge server as the ingress.

use crate::metrics::HostMetrics;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use std::future::Future;
use tokio::net::TcpListener;
use wharf_edge::ServerConfig;

/// Where the admin listener serves Prometheus metrics.
pub const METRICS_PATH: &str = "/metrics";

/// Where the admin listener answers liveness checks.
pub const HEALTH_PATH: &str = "/healthz";

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, config: ServerConfig, metrics: HostMetrics, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let service = hyper::service::service_fn(move |request: Request<wharf_edge::Body>| {
        let response = answer(&metrics, request.method(), request.uri().path());
        async move { Ok::<_, std::convert::Infallible>(response) }
    });
    wharf_edge::serve(listener, None, config, service, shutdown).await
}

fn answer(metrics: &HostMetrics, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        METRICS_PATH | HEALTH_PATH if method != Method::GET => {
            (StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", format!("{path} only answers GET\n"))
        }
        METRICS_PATH => (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.encode()),
        HEALTH_PATH => (StatusCode::OK, "text/plain; charset=utf-8", "ok\n".to_string()),
        _ => (StatusCode::NOT_FOUND, "text/plain; charset=utf-8", format!("the admin listener serves {METRICS_PATH} and {HEALTH_PATH}; tenants' routes are on the ingress\n")),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_metrics_and_health_and_nothing_else() {
        let metrics = HostMetrics::default();
        assert_eq!(answer(&metrics, &Method::GET, "/metrics").status(), StatusCode::OK);
        assert_eq!(answer(&metrics, &Method::GET, "/healthz").status(), StatusCode::OK);
        assert_eq!(answer(&metrics, &Method::POST, "/metrics").status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(answer(&metrics, &Method::GET, "/hello").status(), StatusCode::NOT_FOUND);
    }
}
