//! Prometheus metrics for every workload on a host, served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Labels of per-service metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// `namespace/name`.
    pub service: String,
}

/// Labels of the request counter: the service and how the request ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `namespace/name`.
    pub service: String,
    /// One of [`crate::Outcome::label`].
    pub outcome: String,
}

/// Labels of the trigger message counter: the service and what became of the message.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    /// `namespace/name`.
    pub service: String,
    /// `handled`, `failed` (core NATS: not delivered again), `redelivered`
    /// or `dead_lettered` (streams).
    pub result: &'static str,
}

type HistogramFamily = Family<ServiceLabels, Histogram, fn() -> Histogram>;

/// The host's metric families. Cheap to clone; clones share the metrics.
#[derive(Clone)]
pub struct HostMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    latency: HistogramFamily,
    in_flight: Family<ServiceLabels, Gauge>,
    instantiation: HistogramFamily,
    fuel: Family<ServiceLabels, Counter>,
    background: Family<ServiceLabels, Counter>,
    log_lines_dropped: Family<ServiceLabels, Counter>,
    memory_peak: HistogramFamily,
    memory_reserved: Family<ServiceLabels, Gauge>,
    cold_starts: Counter,
    activation_wait: Histogram,
    trigger_messages: Family<TriggerLabels, Counter>,
    /// Live workloads per service: replicas share a service's series, which
    /// are removed only when the last of them goes.
    users: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~50 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

fn instantiation_histogram() -> Histogram {
    // 1 µs .. ~16 ms.
    Histogram::new(exponential_buckets(0.000_001, 2.0, 15))
}

fn memory_histogram() -> Histogram {
    // 64 KiB (one wasm page) .. 4 GiB.
    Histogram::new(exponential_buckets(65536.0, 2.0, 17))
}

impl Default for HostMetrics {
    /// The host's metrics without a compiled-code cache's (see [`HostMetrics::for_runtime`]).
    fn default() -> Self {
        HostMetrics::build(None)
    }
}

impl HostMetrics {
    /// The host's metrics, with those of `runtime`'s compiled-code cache.
    pub fn for_runtime(runtime: &crate::Runtime) -> Self {
        HostMetrics::build(Some(runtime.code_cache_metrics()))
    }

    fn build(cache: Option<&crate::code_cache::CodeCacheMetrics>) -> Self {
        let mut registry = Registry::with_prefix("wharf");
        if let Some(cache) = cache {
            let cache = cache.clone();
            registry.register("code_cache_hits", "Loads of compiled code answered from memory", cache.hits);
            registry.register("code_cache_misses", "Loads of compiled code not in memory (then read from disk or compiled)", cache.misses);
            registry.register("code_cache_disk_loads", "Compiled components read back from the disk cache", cache.disk_loads);
            registry.register("code_cache_compiles", "Components compiled", cache.compiles);
            registry.register("code_cache_evictions", "Compiled components dropped from memory to stay within --code-cache", cache.evictions);
            registry.register("code_cache_bytes", "Bytes of compiled code the cache holds in memory", cache.bytes);
            registry.register("code_cache_entries", "Compiled components the cache holds in memory", cache.entries);
        }
        let requests = Family::<OutcomeLabels, Counter>::default();
        let latency = HistogramFamily::new_with_constructor(latency_histogram);
        let in_flight = Family::<ServiceLabels, Gauge>::default();
        let instantiation = HistogramFamily::new_with_constructor(instantiation_histogram);
        let fuel = Family::<ServiceLabels, Counter>::default();
        let background = Family::<ServiceLabels, Counter>::default();
        let log_lines_dropped = Family::<ServiceLabels, Counter>::default();
        let memory_peak = HistogramFamily::new_with_constructor(memory_histogram);
        let memory_reserved = Family::<ServiceLabels, Gauge>::default();
        let cold_starts = Counter::default();
        let trigger_messages = Family::<TriggerLabels, Counter>::default();
        registry.register(
            "trigger_messages",
            "Messages this host took in for triggers, by service and what became of them (handled, failed, redelivered, dead_lettered)",
            trigger_messages.clone(),
        );
        let activation_wait = latency_histogram();
        registry.register("cold_starts", "Replicas started to serve requests held for a service scaled to zero", cold_starts.clone());
        registry.register("activation_wait_seconds", "How long requests for a service scaled to zero were held", activation_wait.clone());
        registry.register("requests", "Requests served, by service and outcome", requests.clone());
        registry.register("request_duration_seconds", "Time from admission to the end of the request", latency.clone());
        registry.register("requests_in_flight", "Requests admitted or waiting for an instance", in_flight.clone());
        registry.register("instantiation_seconds", "Time to create a fresh instance for a request", instantiation.clone());
        registry.register("fuel_consumed", "Fuel burned by requests", fuel.clone());
        registry.register(
            "background_requests",
            "Requests that ran in the background CPU level (long-running, or their namespace over its share)",
            background.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Guest log lines dropped: over the service's log rate (--log-rate), or the host's log writer was behind",
            log_lines_dropped.clone(),
        );
        registry.register("instance_memory_peak_bytes", "Peak linear memory of an instance", memory_peak.clone());
        registry.register("memory_reserved_bytes", "Memory placement reserved for a workload (its memory request)", memory_reserved.clone());
        HostMetrics {
            inner: Arc::new(Inner {
                registry,
                requests,
                latency,
                in_flight,
                instantiation,
                fuel,
                background,
                log_lines_dropped,
                memory_peak, memory_reserved, cold_starts, activation_wait, trigger_messages, users: Default::default() }),
        }
    }
}

impl HostMetrics {
    /// The metrics of one service, with label sets resolved once.
    pub fn service(&self, service: &str) -> ServiceMetrics {
        let labels = ServiceLabels { service: service.to_string() };
        let inner = &self.inner;
        if let Ok(mut users) = inner.users.lock() {
            *users.entry(service.to_string()).or_default() += 1;
        }
        ServiceMetrics {
            metrics: self.clone(),
            latency: inner.latency.get_or_create(&labels).clone(),
            in_flight: inner.in_flight.get_or_create(&labels).clone(),
            instantiation: inner.instantiation.get_or_create(&labels).clone(),
            fuel: inner.fuel.get_or_create(&labels).clone(),
            background: inner.background.get_or_create(&labels).clone(),
            log_lines_dropped: inner.log_lines_dropped.get_or_create(&labels).clone(),
            memory_peak: inner.memory_peak.get_or_create(&labels).clone(),
            memory_reserved: inner.memory_reserved.get_or_create(&labels).clone(),
            labels,
        }
    }

    /// Counts a message a trigger took in, by what became of it (see [`TriggerLabels`]).
    pub fn trigger_message(&self, service: &str, result: &'static str) {
        self.inner.trigger_messages.get_or_create(&TriggerLabels { service: service.to_string(), result }).inc();
    }

    /// Counts a replica started for activation (a cold start).
    pub fn cold_start(&self) {
        self.inner.cold_starts.inc();
    }

    /// Records how long a request was held for activation.
    pub fn activation(&self, waited: std::time::Duration) {
        self.inner.activation_wait.observe(waited.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry) {
            tracing::error!("could not encode metrics (a bug): {e}");
        }
        out
    }

    /// Removes a service's series when its workload is unloaded.
    fn forget(&self, labels: &ServiceLabels) {
        let inner = &self.inner;
        if let Ok(mut users) = inner.users.lock() {
            let count = users.entry(labels.service.clone()).or_default();
            *count = count.saturating_sub(1);
            if *count > 0 {
                return;
            }
            users.remove(&labels.service);
        }
        inner.latency.remove(labels);
        inner.in_flight.remove(labels);
        inner.instantiation.remove(labels);
        inner.fuel.remove(labels);
        inner.background.remove(labels);
        inner.log_lines_dropped.remove(labels);
        inner.memory_peak.remove(labels);
        inner.memory_reserved.remove(labels);
    }
}

/// One service's metrics.
#[derive(Clone)]
pub struct ServiceMetrics {
    metrics: HostMetrics,
    labels: ServiceLabels,
    pub(crate) latency: Histogram,
    pub(crate) in_flight: Gauge,
    pub(crate) instantiation: Histogram,
    pub(crate) fuel: Counter,
    pub(crate) background: Counter,
    pub(crate) log_lines_dropped: Counter,
    pub(crate) memory_peak: Histogram,
    pub(crate) memory_reserved: Gauge,
}

impl ServiceMetrics {
    /// Counts one finished request with its outcome label.
    pub(crate) fn count(&self, outcome: &'static str) {
        let labels = OutcomeLabels { service: self.labels.service.clone(), outcome: outcome.to_string() };
        self.metrics.inner.requests.get_or_create(&labels).inc();
    }

    /// Removes this service's gauges and histograms (counters stay: they are cumulative).
    pub(crate) fn forget(&self) {
        self.metrics.forget(&self.labels);
    }
}
