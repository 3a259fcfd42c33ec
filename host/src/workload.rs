//! One loaded component with its limits, serving each request from a fresh
//! instance and turning every way a request can fail into a clear response.

use crate::cpu::{Demotion, FOREGROUND_TICKS};
use crate::egress::{EgressHooks, EgressPolicy, ServiceLink};
use crate::instance::InstanceState;
use crate::limits::WorkloadLimits;
use crate::logs::LogBuffer;
use crate::metrics::{HostMetrics, ServiceMetrics};
use crate::runtime::{LoadedComponent, Runtime};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wharf_proto::ByteSize;

/// The body of every response a workload produces.
pub type ResponseBody = HyperOutgoingBody;

/// Header naming the failure on every error response Wharf itself writes.
pub const ERROR_HEADER: &str = "x-wharf-error";

/// Time past the deadline before a request stuck in a host call is abandoned.
/// Guest code is interrupted at the deadline itself (within one epoch tick).
const DEADLINE_GRACE: Duration = Duration::from_millis(20);

/// What a workload runs with besides its component.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// `namespace/name` of the service; tags logs and metrics.
    pub service: String,
    /// Memory cap, fuel, deadline and concurrency.
    pub limits: WorkloadLimits,
    /// Environment variables the component sees.
    pub env: Vec<(String, String)>,
    /// Outbound hosts the component may call.
    pub egress: EgressPolicy,
    /// Log lines kept in memory.
    pub log_lines: usize,
    /// Where calls to `http://<service>` go; `None` treats them as egress.
    pub services: Option<ServiceLink>,
    /// The key-value buckets the component may open; `None`: none at all.
    pub keyvalue: Option<crate::keyvalue::KeyValueAccess>,
    /// Host directories the component sees, with the path it sees each at.
    pub volumes: Vec<(std::path::PathBuf, String)>,
    /// Runtime configuration (`wasi:config`), secrets included.
    pub config: ConfigValues,
    /// Publishing and requesting over `wasmcloud:messaging`; `None`: refused.
    pub messaging: Option<crate::messaging::MessagingAccess>,
    /// The command line a job's component sees (`argv`, its name first);
    /// empty for services.
    pub args: Vec<String>,
}

/// Runtime configuration values; `Debug` shows only the keys, since some
/// values are secrets.
#[derive(Clone, Default)]
pub struct ConfigValues(pub Vec<(String, String)>);

impl std::fmt::Debug for ConfigValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(k, _)| format!("{k}=<hidden>"))).finish()
    }
}

impl WorkloadSpec {
    /// A spec with default limits, no environment and no outbound access.
    pub fn new(service: impl Into<String>) -> Self {
        WorkloadSpec {
            service: service.into(),
            limits: WorkloadLimits::default(),
            env: Vec::new(),
            egress: EgressPolicy::default(),
            log_lines: 1000,
            services: None,
            keyvalue: None,
            volumes: Vec::new(),
            config: ConfigValues::default(),
            messaging: None,
            args: Vec::new(),
        }
    }
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The component answered (whatever its status code).
    Ok,
    /// The component trapped (a panic, `unreachable`, an out-of-bounds access).
    Trap(String),
    /// The request burned its whole fuel budget.
    FuelExhausted { budget: u64 },
    /// The instance tried to grow its memory past the cap.
    MemoryLimit { cap: ByteSize },
    /// The instance tried to grow its memory within its cap, but the
    /// host's instances together hold all the host's memory (requests
    /// overcommitted, or many replicas at their peak at once).
    HostMemoryFull { budget: ByteSize },
    /// The request ran past its wall-clock deadline.
    Deadline { timeout: Duration },
    /// No instance slot came free within the queue timeout.
    Overloaded { concurrency: u32, waited: Duration },
    /// The replica had a slot free, but the host's instance pool was full
    /// (every replica's instances together) for the queue timeout.
    HostInstancesFull { slots: u32, waited: Duration },
    /// The request could not be handed to the component.
    BadRequest(String),
    /// The component finished without ever setting a response.
    NoResponse,
    /// The host could not run the component (e.g. no instance slot in the pool).
    HostError(String),
    /// The message handler returned an error.
    HandlerError(String),
    /// The component has no HTTP handler (it only handles messages).
    NoHttpHandler,
    /// A job's component exited with a non-zero code.
    Exited(i32),
}

impl Outcome {
    /// The metric label and `x-wharf-error` value of this outcome.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Trap(_) => "trap",
            Outcome::FuelExhausted { .. } => "fuel_exhausted",
            Outcome::MemoryLimit { .. } => "memory_limit",
            Outcome::HostMemoryFull { .. } => "host_memory_full",
            Outcome::Deadline { .. } => "deadline",
            Outcome::Overloaded { .. } => "overloaded",
            Outcome::HostInstancesFull { .. } => "host_instances_full",
            Outcome::BadRequest(_) => "bad_request",
            Outcome::NoResponse => "no_response",
            Outcome::HostError(_) => "host_error",
            Outcome::HandlerError(_) => "handler_error",
            Outcome::NoHttpHandler => "no_http_handler",
            Outcome::Exited(_) => "exited_nonzero",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Outcome::Ok => StatusCode::OK,
            Outcome::Deadline { .. } => StatusCode::GATEWAY_TIMEOUT,
            Outcome::Overloaded { .. } | Outcome::HostMemoryFull { .. } | Outcome::HostInstancesFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Outcome::BadRequest(_) => StatusCode::BAD_REQUEST,
            Outcome::NoHttpHandler => StatusCode::NOT_FOUND,
            Outcome::Trap(_)
            | Outcome::FuelExhausted { .. }
            | Outcome::MemoryLimit { .. }
            | Outcome::NoResponse
            | Outcome::HostError(_)
            | Outcome::HandlerError(_)
            | Outcome::Exited(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// What happened, for people, naming `service`.
    pub fn message(&self, service: &str) -> String {
        match self {
            Outcome::Ok => "ok".to_string(),
            Outcome::Trap(detail) => format!("{service}: the component trapped: {detail} (a panic ends this way; see the service's logs)"),
            Outcome::FuelExhausted { budget } => {
                format!("{service}: the request used up its fuel budget of {budget} units (CPU limit); raise --fuel or do less work per request")
            }
            Outcome::MemoryLimit { cap } => {
                format!("{service}: the instance tried to grow its memory past its cap of {cap}; raise --memory or use less memory per request")
            }
            Outcome::HostMemoryFull { budget } => format!(
                "{service}: this host's instances hold all its memory for instances ({}); retry shortly, or give the service a larger memory request so fewer replicas share a host",
                budget.human()
            ),
            Outcome::Deadline { timeout } => {
                format!("{service}: the request ran past its deadline of {}", humanize(*timeout))
            }
            Outcome::Overloaded { concurrency, waited } => format!(
                "{service}: all {concurrency} instances are busy and none came free within {}; retry shortly",
                humanize(*waited)
            ),
            Outcome::HostInstancesFull { slots, waited } => format!(
                "{service}: the host runs its {slots} instances at once (--max-instances), all busy with other requests, and none came free within {}; retry shortly",
                humanize(*waited)
            ),
            Outcome::BadRequest(detail) => format!("{service}: bad request: {detail}"),
            Outcome::NoResponse => format!("{service}: the component returned without setting a response"),
            Outcome::HostError(detail) => format!("{service}: the host could not run the component: {detail}"),
            Outcome::HandlerError(detail) => format!("{service}: the message handler failed: {detail}"),
            Outcome::NoHttpHandler => format!(
                "{service}: the component does not export `{}`; it handles only messages (its triggers)",
                crate::runtime::HTTP_HANDLER_EXPORT
            ),
            Outcome::Exited(code) => format!("{service}: the component exited with code {code}"),
        }
    }
}

fn humanize(d: Duration) -> String {
    if d.as_millis() >= 1000 && d.as_millis().is_multiple_of(1000) { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

/// Counters a host reports in its heartbeats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadLoad {
    /// Requests admitted or waiting right now.
    pub in_flight: u64,
    /// Requests finished since the workload started.
    pub requests: u64,
    /// Of those, the ones that did not end [`Outcome::Ok`].
    pub failures: u64,
    /// Of those, the ones answered with a server error (5xx: traps,
    /// exhausted budgets, deadlines, or the component's own 5xx), except
    /// requests refused for load (`overloaded`): what outlier ejection and
    /// canary analysis count as failed.
    pub errors: u64,
    /// Sum of their durations in microseconds.
    pub latency_micros: u64,
    /// Their durations in buckets (see [`wharf_proto::latency`]).
    pub latency: wharf_proto::LatencyHistogram,
    /// The most linear memory one instance held, in bytes; 0 before the first.
    pub memory_peak: u64,
}

/// A component loaded with its limits. Cheap to clone.
#[derive(Clone)]
pub struct Workload {
    inner: Arc<WorkloadInner>,
}

struct WorkloadInner {
    service: Arc<str>,
    /// The namespace part of `service`: whom the CPU is shared between.
    namespace: Arc<str>,
    component: LoadedComponent,
    runtime: Runtime,
    spec: WorkloadSpec,
    logs: LogBuffer,
    /// The runtime configuration, built once and shared by every instance.
    config: Arc<wasmtime_wasi_config::WasiConfigVariables>,
    /// One permit per instance that may run at once.
    permits: Arc<Semaphore>,
    metrics: ServiceMetrics,
    in_flight: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    errors: AtomicU64,
    latency_micros: AtomicU64,
    /// The most linear memory one instance held, in bytes (reported to the
    /// control plane, which places new replicas by at least this).
    memory_peak: AtomicU64,
    /// Requests per latency bucket ([`wharf_proto::latency::BUCKET_BOUNDS_MICROS`], then one more).
    latency: [AtomicU64; LATENCY_BUCKETS],
}

/// The buckets of a workload's latency histogram: the proto's bounds plus the overflow.
const LATENCY_BUCKETS: usize = wharf_proto::latency::BUCKET_BOUNDS_MICROS.len() + 1;

impl Drop for WorkloadInner {
    fn drop(&mut self) {
        let spec = &self.spec;
        let reserved = spec.limits.memory_reserved().bytes();
        self.metrics.memory_reserved.dec_by(i64::try_from(reserved).unwrap_or(i64::MAX));
        self.metrics.forget();
    }
}

/// Why a message was not handled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// No instance came free within the queue timeout: the handler never
    /// ran, so the message is not the handler's failure (try again).
    #[error("{0}")]
    Overloaded(String),
    /// The handler ran and failed: its own error, a trap or a budget.
    #[error("{0}")]
    Failed(String),
}

/// Why a workload could not be created.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The memory cap is above what the host's engine allows per instance.
    #[error("memory cap {requested} is above this host's per-instance maximum of {maximum}")]
    MemoryAboveHostMaximum { requested: ByteSize, maximum: ByteSize },
    /// Concurrency 0 would never serve anything.
    #[error("concurrency must be at least 1")]
    ZeroConcurrency,
}

impl Workload {
    /// Wraps a loaded component with its limits.
    pub fn new(runtime: &Runtime, component: LoadedComponent, spec: WorkloadSpec, metrics: &HostMetrics) -> Result<Self, WorkloadError> {
        let maximum = runtime.config().max_instance_memory;
        if spec.limits.memory > maximum {
            return Err(WorkloadError::MemoryAboveHostMaximum { requested: spec.limits.memory, maximum });
        }
        if spec.limits.concurrency == 0 {
            return Err(WorkloadError::ZeroConcurrency);
        }
        let service: Arc<str> = spec.service.as_str().into();
        let namespace: Arc<str> = spec.service.split_once('/').map_or(spec.service.as_str(), |(ns, _)| ns).into();
        let metrics = metrics.service(&spec.service);
        let reserved = spec.limits.memory_reserved().bytes();
        metrics.memory_reserved.inc_by(i64::try_from(reserved).unwrap_or(i64::MAX));
        Ok(Workload {
            inner: Arc::new(WorkloadInner {
                logs: LogBuffer::new(service.clone(), spec.log_lines, runtime.log_sink(), metrics.log_lines_dropped.clone()),
                config: Arc::new(spec.config.0.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()),
                service,
                namespace,
                component,
                runtime: runtime.clone(),
                permits: Arc::new(Semaphore::new(spec.limits.concurrency as usize)),
                spec,
                metrics,
                in_flight: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                latency_micros: AtomicU64::new(0),
                memory_peak: AtomicU64::new(0),
                latency: std::array::from_fn(|_| AtomicU64::new(0)),
            }),
        })
    }

    /// `namespace/name` of the service this workload serves.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The component's digest.
    pub fn digest(&self) -> &wharf_proto::Digest {
        &self.inner.component.digest
    }

    /// The spec it runs with.
    pub fn spec(&self) -> &WorkloadSpec {
        &self.inner.spec
    }

    /// The component's captured stdout and stderr.
    pub fn logs(&self) -> &LogBuffer {
        &self.inner.logs
    }

    /// Requests admitted or waiting right now (cheap: for picking a replica per request).
    pub fn in_flight(&self) -> u64 {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// Current load counters.
    pub fn load(&self) -> WorkloadLoad {
        let inner = &self.inner;
        WorkloadLoad {
            in_flight: inner.in_flight.load(Ordering::Relaxed),
            requests: inner.requests.load(Ordering::Relaxed),
            failures: inner.failures.load(Ordering::Relaxed),
            errors: inner.errors.load(Ordering::Relaxed),
            latency_micros: inner.latency_micros.load(Ordering::Relaxed),
            memory_peak: inner.memory_peak.load(Ordering::Relaxed),
            latency: wharf_proto::LatencyHistogram::from_counts(inner.latency.iter().map(|c| c.load(Ordering::Relaxed)).collect()),
        }
    }

    /// Serves one request from a fresh instance.
    ///
    /// Waits at most the queue timeout for an instance slot, then runs the
    /// component under its fuel budget, memory cap and deadline. Every
    /// failure becomes a response with a clear message and an
    /// [`ERROR_HEADER`]; nothing a component does can fail the host.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<ResponseBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let response = self.serve(request).await;
        let refused_for_load = response.headers().get(ERROR_HEADER).is_some_and(|v| v == "overloaded");
        if response.status().is_server_error() && !refused_for_load {
            self.inner.errors.fetch_add(1, Ordering::Relaxed);
        }
        response
    }

    async fn serve<B>(&self, request: Request<B>) -> Response<ResponseBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let started = Instant::now();
        let _in_flight = InFlight::enter(self);
        let limits = &self.inner.spec.limits;
        let permit = match self.admit().await {
            Ok(permit) => permit,
            Err(outcome) => {
                self.record(&outcome, started.elapsed());
                return self.error_response(&outcome);
            }
        };
        let deadline = Instant::now() + limits.timeout;
        let demotion = Arc::new(Demotion::default());
        let mut store = match self.new_store(deadline, demotion.clone()) {
            Ok(store) => store,
            Err(e) => {
                let outcome = Outcome::HostError(e);
                self.record(&outcome, started.elapsed());
                return self.error_response(&outcome);
            }
        };
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let prepared = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, request)
            .and_then(|req| Ok((req, store.data_mut().http().new_response_outparam(sender)?)));
        let (req, out) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                let outcome = Outcome::BadRequest(format!("{e:#}"));
                self.record(&outcome, started.elapsed());
                return self.error_response(&outcome);
            }
        };
        let this = self.clone();
        // The guest's span, a child of the request's: calls it makes to
        // other services continue its trace (see `egress.rs`).
        let span = tracing::trace_span!(target: crate::trace::TARGET, "guest", service = %self.inner.spec.service);
        // The guest runs in its own task so it can keep streaming the body
        // after the response head has been handed back.
        let task = tokio::spawn(async move {
            let _permit = permit;
            let guest = {
                let this = this.clone();
                Box::pin(tracing::Instrument::instrument(async move { this.run(&mut store, req, out, deadline).await }, span))
            };
            // The guest's own deadline stops it; this one covers a guest
            // that cannot get the CPU to notice.
            let cutoff = deadline + 2 * DEADLINE_GRACE;
            let (outcome, background) = this.inner.runtime.cpu().run(&this.inner.namespace, &demotion, cutoff, guest).await;
            if background {
                this.inner.metrics.background.inc();
            }
            let outcome = outcome.unwrap_or(Outcome::Deadline { timeout: this.inner.spec.limits.timeout });
            this.record(&outcome, started.elapsed());
            outcome
        });
        match receiver.await {
            Ok(Ok(response)) => response,
            Ok(Err(code)) => self.error_response(&Outcome::HostError(format!("the component answered with error {code:?}"))),
            // The guest dropped the response outparam: it finished or failed without answering.
            Err(_) => match task.await {
                Ok(Outcome::Ok) => self.error_response(&Outcome::NoResponse),
                Ok(outcome) => self.error_response(&outcome),
                Err(join) => self.error_response(&Outcome::HostError(format!("the request task failed (a bug in Wharf): {join}"))),
            },
        }
    }

    /// Handles one message of a trigger in a fresh instance, under the same
    /// permits, fuel, memory cap, deadline and CPU levels as a request.
    /// `Err` says why it failed (the handler's own error, a trap, a budget,
    /// or no instance free in time); the outcome is counted like a request's.
    pub async fn handle_message(&self, message: crate::messaging::BrokerMessage) -> Result<(), MessageError> {
        let started = Instant::now();
        let outcome = self.serve_message(message).await;
        self.record(&outcome, started.elapsed());
        match outcome {
            Outcome::Ok => Ok(()),
            Outcome::Overloaded { .. } | Outcome::HostInstancesFull { .. } => Err(MessageError::Overloaded(outcome.message(&self.inner.service))),
            outcome => {
                self.inner.errors.fetch_add(1, Ordering::Relaxed);
                Err(MessageError::Failed(outcome.message(&self.inner.service)))
            }
        }
    }

    async fn serve_message(&self, message: crate::messaging::BrokerMessage) -> Outcome {
        let _in_flight = InFlight::enter(self);
        let Some(pre) = self.inner.component.messaging.clone() else {
            return Outcome::BadRequest(format!("the component does not export `{}`", wharf_proto::trigger::MESSAGE_HANDLER_EXPORT));
        };
        let access = self.inner.spec.messaging.clone();
        let reply_to = message.reply_to.clone();
        self.in_fresh_instance(
            move |state| state.set_messaging(access, reply_to),
            move |this, mut store, deadline| async move { this.run_message(&mut store, pre, message, deadline).await },
        )
        .await
    }

    /// Runs a job's component to completion in a fresh instance (its
    /// `wasi:cli/run` export), under the same fuel, memory cap, deadline and
    /// CPU levels as a request, and counts the outcome like a request's:
    /// [`Outcome::Ok`] when it exited 0, [`Outcome::Exited`] with any other
    /// code, else what stopped it.
    pub async fn run_to_completion(&self) -> Outcome {
        let started = Instant::now();
        let outcome = self.serve_command().await;
        self.record(&outcome, started.elapsed());
        if outcome != Outcome::Ok {
            self.inner.errors.fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    async fn serve_command(&self) -> Outcome {
        let _in_flight = InFlight::enter(self);
        let Some(pre) = self.inner.component.command.clone() else {
            return Outcome::BadRequest(format!("the component does not export `{}`", wharf_proto::job::RUN_EXPORT));
        };
        self.in_fresh_instance(|_| {}, move |this, mut store, deadline| async move { this.run_command(&mut store, pre, deadline).await }).await
    }

    async fn run_command(&self, store: &mut Store<InstanceState>, pre: wasmtime_wasi::p2::bindings::CommandPre<InstanceState>, deadline: Instant) -> Outcome {
        let metrics = &self.inner.metrics;
        let call = async {
            let instantiating = Instant::now();
            let command = pre.instantiate_async(&mut *store).await?;
            metrics.instantiation.observe(instantiating.elapsed().as_secs_f64());
            command.wasi_cli_run().call_run(&mut *store).await
        };
        let result = tokio::time::timeout_at((deadline + DEADLINE_GRACE).into(), call).await;
        match self.finish(store, result) {
            Ok(Ok(())) => Outcome::Ok,
            // `wasi:cli/exit.exit(err)` and `run` returning `err` both mean exit code 1.
            Ok(Err(())) => Outcome::Exited(1),
            Err(outcome) => outcome,
        }
    }

    /// Waits for an instance slot (at most the queue timeout), builds a
    /// fresh store (`setup` adds to its state) and runs `body` in it on the
    /// CPU levels, cut off past the deadline.
    async fn in_fresh_instance<Fut>(
        &self,
        setup: impl FnOnce(&mut InstanceState),
        body: impl FnOnce(Workload, Store<InstanceState>, Instant) -> Fut,
    ) -> Outcome
    where
        Fut: std::future::Future<Output = Outcome> + Send + 'static,
    {
        let limits = &self.inner.spec.limits;
        let permit = match self.admit().await {
            Ok(permit) => permit,
            Err(outcome) => return outcome,
        };
        let deadline = Instant::now() + limits.timeout;
        let demotion = Arc::new(Demotion::default());
        let mut store = match self.new_store(deadline, demotion.clone()) {
            Ok(store) => store,
            Err(e) => return Outcome::HostError(e),
        };
        setup(store.data_mut());
        let call = body(self.clone(), store, deadline);
        let guest = Box::pin(async move {
            let _permit = permit;
            call.await
        });
        let (outcome, background) = self.inner.runtime.cpu().run(&self.inner.namespace, &demotion, deadline + 2 * DEADLINE_GRACE, guest).await;
        if background {
            self.inner.metrics.background.inc();
        }
        outcome.unwrap_or(Outcome::Deadline { timeout: limits.timeout })
    }

    async fn run_message(
        &self,
        store: &mut Store<InstanceState>,
        pre: crate::messaging::MessagingPre<InstanceState>,
        message: crate::messaging::BrokerMessage,
        deadline: Instant,
    ) -> Outcome {
        let metrics = &self.inner.metrics;
        let call = async {
            let instantiating = Instant::now();
            let instance = pre.instantiate_async(&mut *store).await?;
            metrics.instantiation.observe(instantiating.elapsed().as_secs_f64());
            instance.wasmcloud_messaging_handler().call_handle_message(&mut *store, &message).await
        };
        let result = tokio::time::timeout_at((deadline + DEADLINE_GRACE).into(), call).await;
        match self.finish(store, result) {
            Ok(Ok(())) => Outcome::Ok,
            Ok(Err(error)) => Outcome::HandlerError(error),
            Err(outcome) => outcome,
        }
    }

    /// Instantiates the component `n` times, each in a fresh store as a
    /// request would, without calling it; returns each instantiation's time.
    /// This is the per-request cold-start cost, for benchmarks.
    pub async fn time_instantiations(&self, n: usize) -> Result<Vec<Duration>, wasmtime::Error> {
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let deadline = Instant::now() + self.inner.spec.limits.timeout;
            let mut store = self.new_store(deadline, Arc::default()).map_err(wasmtime::Error::msg)?;
            let started = Instant::now();
            self.inner.component.instance_pre.instantiate_async(&mut store).await?;
            times.push(started.elapsed());
        }
        Ok(times)
    }

    fn new_store(&self, deadline: Instant, demotion: Arc<Demotion>) -> Result<Store<InstanceState>, String> {
        let spec = &self.inner.spec;
        let hooks = EgressHooks {
            policy: spec.egress.clone(),
            private: self.inner.runtime.config().private_egress.clone(),
            logs: self.inner.logs.clone(),
            services: spec.services.clone(),
        };
        let keyvalue = spec.keyvalue.clone().map(|access| access.with_limits(self.inner.runtime.config().keyvalue));
        let seen = crate::instance::Surroundings { args: &spec.args, env: &spec.env, volumes: &spec.volumes };
        let host_memory = self.inner.runtime.host_memory();
        let mut state = InstanceState::new(seen, spec.limits.memory, host_memory, hooks, keyvalue, self.inner.config.clone(), &self.inner.logs)?;
        state.set_messaging(spec.messaging.clone(), None);
        let mut store = Store::new(self.inner.runtime.engine(), state);
        store.limiter(|state| &mut state.limiter);
        // Fuel is always on in the engine; "unmetered" is simply a budget that never runs out.
        if let Err(e) = store.set_fuel(spec.limits.fuel.unwrap_or(u64::MAX)) {
            tracing::error!("could not set fuel (a bug): {e:#}");
        }
        store.set_epoch_deadline(1);
        // Every tick (2 ms): trap past the deadline; else yield, so a
        // spinning guest never holds a thread. Past its first few ticks the
        // request is demoted to the background pool (see `crate::cpu`).
        // The epoch also advances early when a tenant is waiting for a
        // foreground slot, so ticks alone would demote a short request
        // caught by a few of those; it must also have been around that long.
        let mut ticks = 0u32;
        let created = Instant::now();
        store.epoch_deadline_callback(move |_| {
            let now = Instant::now();
            if now >= deadline {
                return Ok(UpdateDeadline::Interrupt);
            }
            ticks = ticks.saturating_add(1);
            if ticks > FOREGROUND_TICKS && now.duration_since(created) >= crate::runtime::EPOCH_TICK * FOREGROUND_TICKS {
                demotion.demote();
            }
            Ok(UpdateDeadline::Yield(1))
        });
        Ok(store)
    }

    async fn run(
        &self,
        store: &mut Store<InstanceState>,
        req: wasmtime::component::Resource<wasmtime_wasi_http::p2::types::HostIncomingRequest>,
        out: wasmtime::component::Resource<wasmtime_wasi_http::p2::types::HostResponseOutparam>,
        deadline: Instant,
    ) -> Outcome {
        let metrics = &self.inner.metrics;
        let Some(pre) = self.inner.component.pre.clone() else {
            return Outcome::NoHttpHandler;
        };
        let call = async {
            let instantiating = Instant::now();
            let instantiation = tracing::trace_span!(target: crate::trace::TARGET, "instantiate");
            let proxy = tracing::Instrument::instrument(pre.instantiate_async(&mut *store), instantiation).await?;
            metrics.instantiation.observe(instantiating.elapsed().as_secs_f64());
            proxy.wasi_http_incoming_handler().call_handle(&mut *store, req, out).await
        };
        let result = tokio::time::timeout_at((deadline + DEADLINE_GRACE).into(), call).await;
        self.finish(store, result).err().unwrap_or(Outcome::Ok)
    }

    /// After a guest call: flushes its logs, records its memory peak and
    /// fuel, and names what stopped it, if anything did.
    fn finish<T>(&self, store: &Store<InstanceState>, result: Result<wasmtime::Result<T>, tokio::time::error::Elapsed>) -> Result<T, Outcome> {
        let limits = &self.inner.spec.limits;
        let metrics = &self.inner.metrics;
        let state = store.data();
        state.finish_logs();
        metrics.memory_peak.observe(state.limiter.peak as f64);
        self.inner.memory_peak.fetch_max(u64::try_from(state.limiter.peak).unwrap_or(u64::MAX), Ordering::Relaxed);
        let budget = limits.fuel.unwrap_or(u64::MAX);
        if let Ok(left) = store.get_fuel() {
            metrics.fuel.inc_by(budget - left);
        }
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                let budget = self.inner.runtime.host_memory().map(|host| host.budget());
                Err(classify(&error, &state.limiter, budget, limits))
            }
            Err(_elapsed) => Err(Outcome::Deadline { timeout: limits.timeout }),
        }
    }

    fn record(&self, outcome: &Outcome, elapsed: Duration) {
        let inner = &self.inner;
        inner.metrics.count(outcome.label());
        inner.metrics.latency.observe(elapsed.as_secs_f64());
        inner.requests.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        inner.latency_micros.fetch_add(micros, Ordering::Relaxed);
        let bucket = wharf_proto::latency::bucket_of(micros);
        inner.latency[bucket.min(LATENCY_BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        if *outcome != Outcome::Ok {
            inner.failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(service = %inner.service, outcome = outcome.label(), "{}", outcome.message(&inner.service));
        }
    }

    /// Waits, for at most the queue timeout in all, for one of the
    /// replica's instance slots, then for one of the host's.
    async fn admit(&self) -> Result<Admitted, Outcome> {
        let limits = &self.inner.spec.limits;
        let until = tokio::time::Instant::now() + limits.queue_timeout;
        // The semaphores are never closed, so the only failure is the wait.
        let Ok(Ok(replica)) = tokio::time::timeout_at(until, self.inner.permits.clone().acquire_owned()).await else {
            return Err(Outcome::Overloaded { concurrency: limits.concurrency, waited: limits.queue_timeout });
        };
        let slots = self.inner.runtime.instance_slots().clone();
        let host = match slots.clone().try_acquire_owned() {
            Ok(host) => host,
            Err(_) => match tokio::time::timeout_at(until, slots.acquire_owned()).await {
                Ok(Ok(host)) => host,
                _ => {
                    let slots = self.inner.runtime.config().max_instances.max(1);
                    return Err(Outcome::HostInstancesFull { slots, waited: limits.queue_timeout });
                }
            },
        };
        Ok(Admitted { _replica: replica, _host: host })
    }

    fn error_response(&self, outcome: &Outcome) -> Response<ResponseBody> {
        error_response(outcome.status(), outcome.label(), outcome.message(&self.inner.service))
    }
}

/// A plain-text error response written by Wharf (not by a component).
pub fn error_response(status: StatusCode, label: &'static str, message: String) -> Response<ResponseBody> {
    let mut response = Response::new(full_body(Bytes::from(message + "\n")));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(ERROR_HEADER, HeaderValue::from_static(label));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// A complete body in the type every response uses.
pub fn full_body(bytes: Bytes) -> ResponseBody {
    Full::new(bytes).map_err(|never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} }).boxed_unsync()
}

/// Names what stopped a request. The memory flag comes first: Rust aborts
/// with a plain trap when an allocation fails, and the limiter knows why.
fn classify(error: &wasmtime::Error, memory: &crate::limits::MemoryLimiter, host_budget: Option<ByteSize>, limits: &WorkloadLimits) -> Outcome {
    if memory.host_full {
        return Outcome::HostMemoryFull { budget: host_budget.unwrap_or_default() };
    }
    if memory.denied {
        return Outcome::MemoryLimit { cap: limits.memory };
    }
    if let Some(exit) = error.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return if exit.0 == 0 { Outcome::Ok } else { Outcome::Exited(exit.0) };
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Outcome::FuelExhausted { budget: limits.fuel.unwrap_or(u64::MAX) },
        Some(Trap::Interrupt) => Outcome::Deadline { timeout: limits.timeout },
        Some(trap) => Outcome::Trap(trap.to_string()),
        None => {
            let text = format!("{error:#}");
            if text.contains("instance limit") || text.contains("concurrent") {
                Outcome::HostError(text)
            } else {
                Outcome::Trap(text)
            }
        }
    }
}

/// Counts a request as in flight from arrival until its handler returns.
struct InFlight<'a> {
    workload: &'a Workload,
}

impl<'a> InFlight<'a> {
    fn enter(workload: &'a Workload) -> Self {
        workload.inner.in_flight.fetch_add(1, Ordering::Relaxed);
        workload.inner.metrics.in_flight.inc();
        InFlight { workload }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.workload.inner.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.workload.inner.metrics.in_flight.dec();
    }
}

/// A request's places: one of its replica's instance slots and one of the
/// host's, given back when it is dropped.
struct Admitted {
    _replica: tokio::sync::OwnedSemaphorePermit,
    _host: tokio::sync::OwnedSemaphorePermit,
}
