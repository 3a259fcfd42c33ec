//! The process's log and, when a collector is named, its traces: the
//! request path's spans (`wharf_host::trace`) exported with the
//! OpenTelemetry SDK's OTLP exporter (http/protobuf). Without an endpoint
//! no exporter exists and those spans are never built.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Flushes exported spans when dropped at the end of `main`.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: spans not all exported: {e}");
        }
    }
}

/// The OTLP/HTTP traces URL for a collector `endpoint`: the standard base
/// (`http://collector:4318`) gets `/v1/traces`, a full URL is kept.
fn traces_url(endpoint: &str) -> String {
    let endpoint = endpoint.trim_end_matches('/');
    if endpoint.ends_with("/v1/traces") { endpoint.to_string() } else { format!("{endpoint}/v1/traces") }
}

/// Sets up the log (stderr, `filter`; colour only on a terminal) and, with
/// `otlp_endpoint`, the export of traces. Call before any runtime starts:
/// the exporter's client and thread are its own.
pub fn init(filter: &str, otlp_endpoint: Option<&str>) -> Telemetry {
    let filter = std::env::var("RUST_LOG").ok().unwrap_or_else(|| filter.to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("warning: bad log filter {filter:?} ({e}); using `info`");
        tracing_subscriber::EnvFilter::new("info")
    });
    // Colour only on a terminal: redirected to a file or a pipe, the log is plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).with_target(false).with_filter(filter);
    let (provider, traces) = match otlp_endpoint.filter(|e| !e.trim().is_empty()).map(exporter) {
        Some(Ok(provider)) => {
            let tracer = provider.tracer("wharf");
            let only_request_spans = Targets::new().with_target(wharf_host::trace::TARGET, LevelFilter::TRACE);
            (Some(provider), Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(only_request_spans)))
        }
        Some(Err(e)) => {
            eprintln!("warning: traces will not be exported: {e}");
            (None, None)
        }
        None => (None, None),
    };
    tracing_subscriber::registry().with(log).with(traces).init();
    Telemetry { provider }
}

fn exporter(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let url = traces_url(endpoint);
    // The exporter's HTTP client is reqwest 0.13, built (for the OCI client) without a
    // crypto provider of its own: give it ring, as the rest of Wharf uses. Installing
    // fails only when one is installed already, which is as good.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url.clone())
        .build()
        .map_err(|e| anyhow::anyhow!("cannot export to {url} (--otlp-endpoint, OTEL_EXPORTER_OTLP_ENDPOINT): {e}"))?;
    // The service name: OTEL_SERVICE_NAME when set (the SDK reads it), else `wharf`.
    let resource = match std::env::var_os("OTEL_SERVICE_NAME") {
        Some(_) => Resource::builder().build(),
        None => Resource::builder().with_service_name("wharf").build(),
    };
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

#[cfg(test)]
mod tests {
    use super::traces_url;

    #[test]
    fn a_collector_base_gets_the_traces_path() {
        assert_eq!(traces_url("http://127.0.0.1:4318"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(traces_url("http://127.0.0.1:4318/"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
    }
}
