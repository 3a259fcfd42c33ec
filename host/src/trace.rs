//! Traces on the request path: W3C trace context (`traceparent`) is read
//! where a request enters a host (its ingress, or the bus from another
//! host) and written on every request the host sends on (over the bus, or
//! to another service), so one request through many hosts and services is
//! one trace.
//!
//! Spans are `tracing` spans of target [`TARGET`] at TRACE level. The
//! binary exports them (OpenTelemetry, OTLP) only when given an endpoint;
//! otherwise no subscriber wants them, so they are never built, no header is
//! read or written, and the request path pays one cached check per span.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of every span on the request path: what an exporter enables.
pub const TARGET: &str = "wharf::trace";

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut http::HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value)) {
            self.0.insert(name, value);
        }
    }
}

/// Makes `span` (just created, not yet entered) continue the trace the
/// request's `traceparent` names; without one, it starts a trace.
pub fn continue_from(span: &Span, headers: &http::HeaderMap) {
    if span.is_disabled() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    if let Err(e) = span.set_parent(parent) {
        tracing::debug!("trace context not set: {e}");
    }
}

/// Writes `span`'s trace context into a request about to be sent on
/// (`traceparent`, replacing one it came with).
pub fn inject(span: &Span, headers: &mut http::HeaderMap) {
    if span.is_disabled() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeadersMut(headers));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_subscriber_spans_are_off_and_headers_untouched() {
        let span = tracing::trace_span!(target: TARGET, "ingress");
        assert!(span.is_disabled());
        let mut headers = http::HeaderMap::new();
        inject(&span, &mut headers);
        continue_from(&span, &headers);
        assert!(headers.is_empty());
    }
}
