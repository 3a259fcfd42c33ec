//! Service specs: what a service runs, how many replicas, under which limits,
//! how traffic reaches it and where it may be placed, with the checks that
//! every spec passes before it is stored.

use crate::Digest;
use crate::names::{DEFAULT_NAMESPACE, NameError, ServiceId, check_label};
use crate::rollout::{Health, RolloutPolicy, TrafficTarget};
use crate::units::{ByteSize, duration_text, format_duration};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

/// The smallest linear-memory cap an instance may have.
pub const MIN_MEMORY: ByteSize = ByteSize::mib(1);
/// The largest linear-memory cap an instance may have (all a 32-bit memory can address).
pub const MAX_MEMORY: ByteSize = ByteSize::gib(4);
/// The shortest request deadline.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(1);
/// The longest request deadline.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// The memory a replica reserves for placement when its spec names no
/// `limits.memory_request` (capped at `memory x concurrency`). A `hello`
/// instance peaks at about 1.1MiB of linear memory (measured:
/// `cli/tests/density.rs` reads the peak hosts report), and most requests
/// run one or two instances of a replica at a time: 8MiB covers that with
/// room, where reserving the cap times the concurrency (1GiB by default)
/// let a 24GiB machine hold only 18 services. A service that uses more is
/// placed by the peak its instances were seen using (see
/// [`ServiceSpec::memory_request`]); the cap is still enforced per instance.
pub const DEFAULT_MEMORY_REQUEST: ByteSize = ByteSize::mib(8);
/// The instance slots a replica reserves on its host for placement when its
/// spec names no `limits.instances_request` (capped at `concurrency`).
/// Instances live only while a request runs, and most replicas run one or
/// two at a time; reserving the concurrency (16 by default) let a host of
/// 1,000 slots hold 62 services. The host's slots are shared: a request
/// that finds them all busy waits its queue timeout, then gets 503
/// `host_instances_full`.
pub const DEFAULT_INSTANCES_REQUEST: u32 = 1;
/// The smallest memory request: one wasm page.
pub const MIN_MEMORY_REQUEST: ByteSize = ByteSize(64 << 10);
/// The most instances one replica may run at once.
pub const MAX_CONCURRENCY: u32 = 10_000;
/// The most replicas one service may ask for; a typo such as `replicas:
/// 10000000` is refused instead of keeping the scheduler busy.
pub const MAX_REPLICAS: u32 = 100_000;

/// A service as the control plane stores it: everything needed to run its
/// replicas.
///
/// `C` is how the component is named. A stored spec pins it by [`Digest`];
/// a manifest may name a file instead (see [`crate::ServiceManifest`]), which
/// the CLI uploads and replaces by its digest with [`ServiceSpec::with_component`].
/// Every field but `name` and `component` has a default. Unknown fields are
/// refused where people write specs (manifests and the API, through
/// [`crate::strict`]), so that a typo is an error, not a silently ignored
/// setting; between processes they are ignored, so that a newer sender does
/// not break an older reader.
///
/// A spec has two parts. Its *template* (the component and everything that
/// changes how a replica runs: env, config, secrets, buckets, limits,
/// routes, placement, volumes, health checks) is what a revision captures:
/// changing it makes a new revision. `replicas`, `autoscale`, `rollout` and
/// `traffic` say how many run and how the service moves between revisions;
/// changing them makes none. See [`ServiceSpec::same_template`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec<C = Digest> {
    /// The namespace, a DNS label (default `default`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The service's name, a DNS label unique within its namespace.
    pub name: String,
    /// The component every replica runs.
    pub component: C,
    /// How many replicas should run (default 1). A service has either a
    /// fixed replica count or an `autoscale` policy: with a policy, this is
    /// only the count it starts with, and the autoscaler decides afterwards.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// Per-instance and per-request limits.
    #[serde(default)]
    pub limits: Limits,
    /// Ingress routes that lead to this service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Environment variables the component sees.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Constraints on the hosts a replica may be placed on.
    #[serde(default, skip_serializing_if = "Placement::is_unconstrained")]
    pub placement: Placement,
    /// Hosts the component may call over `wasi:http` (`api.example.com`,
    /// `host:8443`, `*.example.com`); everything else is denied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_outbound: Vec<String>,
    /// Scaling with demand; without it the service keeps `replicas` replicas.
    /// With it, `replicas` is only the starting count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<Autoscale>,
    /// Volumes the component may use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// `wasi:keyvalue` buckets the component may open, by the identifier it passes to `open` (any string of 1 to 256 bytes).
    /// They live in the namespace; opening any other bucket fails.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keyvalue: Vec<String>,
    /// Runtime configuration the component reads through `wasi:config`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// Secrets of the namespace granted to the service, by name; each is
    /// handed to the component as the config value of the same name. Only
    /// names are ever stored in the spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// When a replica takes traffic (readiness) and when it is taken out (ejection).
    #[serde(default, skip_serializing_if = "Health::is_default")]
    pub health: Health,
    /// How a new revision replaces the running one.
    #[serde(default, skip_serializing_if = "RolloutPolicy::is_default")]
    pub rollout: RolloutPolicy,
    /// An explicit split of the traffic between revisions; empty: the
    /// rollout policy decides (the latest revision, once rolled out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficTarget>,
    /// Where the component was pulled from (`oci://REGISTRY/REPO:TAG`), for
    /// people; `component` pins what runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<crate::OciReference>,
    /// Subjects of the namespace whose messages invoke the component's
    /// `wasmcloud:messaging/handler` export, one fresh instance per message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<crate::trigger::Trigger>,
}

pub(crate) fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

fn default_replicas() -> u32 {
    1
}

/// Limits on each instance of a replica and on each request it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Linear-memory cap of one instance (default 64MiB): the limit an
    /// instance may grow to, enforced by the runtime.
    pub memory: ByteSize,
    /// Memory placement reserves for each replica on its host (its
    /// *request*, as Kubernetes separates a request from a limit); at most
    /// `memory x concurrency`. Unset: [`DEFAULT_MEMORY_REQUEST`], or `memory
    /// x concurrency` when that is smaller. See [`ServiceSpec::memory_request`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_request: Option<ByteSize>,
    /// Fuel per request, about one unit per wasm instruction (default one
    /// billion); `None`, written `unlimited`, turns metering off.
    #[serde(with = "fuel_text")]
    pub fuel: Option<u64>,
    /// Wall-clock deadline of one request (default 5s), written `500ms`, `5s`, `2m`.
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    /// Instances one replica may run at once (default 16).
    pub concurrency: u32,
    /// Instance slots placement reserves for each replica on its host (its
    /// request; at most `concurrency`). Unset: [`DEFAULT_INSTANCES_REQUEST`].
    /// See [`ServiceSpec::instances_request`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances_request: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: ByteSize::mib(64),
            memory_request: None,
            fuel: Some(1_000_000_000),
            timeout: Duration::from_secs(5),
            concurrency: 16,
            instances_request: None,
        }
    }
}

/// An ingress route: requests whose host and path match go to the service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The `Host` the request must name; any host when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The path prefix the request must start with, itself starting with `/`.
    pub path_prefix: String,
}

/// Where a service's replicas may run, and how they spread.
///
/// In a manifest:
///
/// ```yaml
/// placement:
///   labels: { disk: ssd }   # only hosts with disk=ssd
///   spread: zone            # replicas evenly over the hosts' `zone` values
/// ```
///
/// `spread` lives only here: there is no top-level `spread`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct Placement {
    /// Labels a host must carry, every one with the same value.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// A label key whose values are failure domains (`zone`, `rack`): the
    /// service's replicas are spread evenly over the distinct values of that
    /// label among the hosts that qualify, so that the replicas per value
    /// differ by at most one while capacity allows. Hosts without the label
    /// together count as one more value. Without it, replicas still spread
    /// over hosts (and, as a preference only, over `zone`s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spread: Option<String>,
}

impl Placement {
    /// Whether this is the default placement: any ready host will do and
    /// no label is spread over. A spec with the default placement leaves
    /// `placement` out when serialised.
    pub fn is_unconstrained(&self) -> bool {
        self.labels.is_empty() && self.spread.is_none()
    }

    /// Whether a host with `labels` satisfies this placement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    }
}

/// Scaling a service with its load, between `min` and `max` replicas.
///
/// The autoscaler (`wharf_scheduler_core::Autoscaler`) aims for a load per
/// replica given by one target: `target_concurrency` (requests in flight)
/// or `target_rps` (requests per second). Set at most one; with neither,
/// the target is 10 requests in flight per replica ([`DEFAULT_TARGET_CONCURRENCY`]).
///
/// ```yaml
/// autoscale:
///   max: 20
///   target_rps: 50            # or target_concurrency: 10, not both
///   scale_down_delay: 10s     # a lower count must hold this long
///   scale_to_zero_after: 30s  # with min 0: idle this long, then no replica
///   stable_window: 30s        # load is averaged over this window
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Autoscale {
    /// The fewest replicas; 0 lets the service scale to zero (default 0).
    #[serde(default)]
    pub min: u32,
    /// The most replicas, at least 1.
    pub max: u32,
    /// In-flight requests per replica the autoscaler aims for. Exclusive
    /// with `target_rps`; see [`Autoscale::target`] for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_concurrency: Option<u32>,
    /// Requests per second per replica the autoscaler aims for. Exclusive
    /// with `target_concurrency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_rps: Option<u32>,
    /// How long a lower replica count must be wanted before the service
    /// scales down to it (default 10s). Scaling up never waits.
    #[serde(default = "default_scale_down_delay", with = "duration_text")]
    pub scale_down_delay: Duration,
    /// How long a service with `min: 0` must see no load at all before its
    /// last replica stops (default 30s).
    #[serde(default = "default_scale_to_zero_after", with = "duration_text")]
    pub scale_to_zero_after: Duration,
    /// The window the load is averaged over (default 30s). A tenth of it is
    /// the panic window, which reacts to bursts.
    #[serde(default = "default_stable_window", with = "duration_text")]
    pub stable_window: Duration,
}

/// The target when an [`Autoscale`] names none: requests in flight per replica.
pub const DEFAULT_TARGET_CONCURRENCY: u32 = 10;
/// The shortest [`Autoscale::stable_window`]: its panic window (a tenth)
/// should still hold a sample or two.
pub const MIN_STABLE_WINDOW: Duration = Duration::from_secs(6);
/// The longest autoscaling window or delay.
pub const MAX_AUTOSCALE_WINDOW: Duration = Duration::from_secs(3600);

/// The load per replica an [`Autoscale`] policy aims for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoscaleTarget {
    /// Requests in flight per replica.
    Concurrency(u32),
    /// Requests per second per replica.
    Rps(u32),
}

impl AutoscaleTarget {
    /// The target as a number of requests (in flight, or per second).
    pub fn value(self) -> u32 {
        match self {
            AutoscaleTarget::Concurrency(n) | AutoscaleTarget::Rps(n) => n,
        }
    }
}

impl Autoscale {
    /// A policy between `min` and `max` replicas with every other setting at
    /// its default.
    pub fn new(min: u32, max: u32) -> Self {
        Autoscale {
            min,
            max,
            target_concurrency: None,
            target_rps: None,
            scale_down_delay: default_scale_down_delay(),
            scale_to_zero_after: default_scale_to_zero_after(),
            stable_window: default_stable_window(),
        }
    }

    /// The target in force: `target_rps` when set, else `target_concurrency`,
    /// else [`DEFAULT_TARGET_CONCURRENCY`] in flight. [`Autoscale::validate`]
    /// refuses a policy that sets both.
    pub fn target(&self) -> AutoscaleTarget {
        match (self.target_concurrency, self.target_rps) {
            (_, Some(rps)) => AutoscaleTarget::Rps(rps),
            (Some(n), None) => AutoscaleTarget::Concurrency(n),
            (None, None) => AutoscaleTarget::Concurrency(DEFAULT_TARGET_CONCURRENCY),
        }
    }

    /// The window bursts are measured over: a tenth of the stable window.
    pub fn panic_window(&self) -> Duration {
        self.stable_window / 10
    }
}

fn default_scale_down_delay() -> Duration {
    Duration::from_secs(10)
}

fn default_scale_to_zero_after() -> Duration {
    Duration::from_secs(30)
}

fn default_stable_window() -> Duration {
    Duration::from_secs(30)
}

/// A directory on the host that the component sees at `path`: local
/// persistent storage. A service with a volume is pinned to the host that
/// holds it, like a local persistent volume in Kubernetes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// The volume's name, a DNS label unique within the service.
    pub name: String,
    /// Where the component sees it (default `/data`): an absolute path.
    #[serde(default = "default_volume_path")]
    pub path: String,
}

fn default_volume_path() -> String {
    "/data".to_string()
}

/// What is wrong with a spec, and where: `field` is a path such as
/// `limits.memory` or, inside a manifest, `services[1].limits.memory`.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct SpecError {
    /// The path to the offending field.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl SpecError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, problem: impl fmt::Display) -> Self {
        SpecError {
            field: field.into(),
            problem: problem.to_string(),
        }
    }

    /// The same error seen from the enclosing value: `prefix.field`.
    pub fn within(self, prefix: impl fmt::Display) -> Self {
        SpecError {
            field: format!("{prefix}.{}", self.field),
            problem: self.problem,
        }
    }
}

impl<C> ServiceSpec<C> {
    /// A spec for `name` in the default namespace with every other setting at its default.
    pub fn new(name: impl Into<String>, component: C) -> Self {
        ServiceSpec {
            namespace: default_namespace(),
            name: name.into(),
            component,
            replicas: default_replicas(),
            limits: Limits::default(),
            routes: Vec::new(),
            env: BTreeMap::new(),
            placement: Placement::default(),
            allow_outbound: Vec::new(),
            autoscale: None,
            volumes: Vec::new(),
            keyvalue: Vec::new(),
            config: BTreeMap::new(),
            secrets: Vec::new(),
            health: Health::default(),
            rollout: RolloutPolicy::default(),
            traffic: Vec::new(),
            source: None,
            triggers: Vec::new(),
        }
    }

    /// The memory a replica reserves on its host, for placement, host
    /// capacity and namespace quotas: `limits.memory_request`, or by default
    /// [`DEFAULT_MEMORY_REQUEST`] capped at [`Limits::most_memory`]. The
    /// control plane places new replicas by the larger of this and the peak
    /// the service's instances were seen using.
    pub fn memory_request(&self) -> ByteSize {
        self.limits.memory_request.unwrap_or_else(|| {
            ByteSize(DEFAULT_MEMORY_REQUEST.bytes().min(self.limits.most_memory().bytes()))
        })
    }

    /// The instance slots a replica reserves on its host, for placement and
    /// host capacity: `limits.instances_request`, or by default
    /// [`DEFAULT_INSTANCES_REQUEST`], never more than `limits.concurrency`.
    pub fn instances_request(&self) -> u32 {
        self.limits.instances_request.unwrap_or(DEFAULT_INSTANCES_REQUEST).min(self.limits.concurrency)
    }

    /// The service's id, `namespace/name`.
    pub fn id(&self) -> ServiceId {
        ServiceId {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// The same spec with the component named another way, e.g. a manifest's
    /// file replaced by the digest it was uploaded under.
    pub fn with_component<D>(self, component: D) -> ServiceSpec<D> {
        ServiceSpec {
            namespace: self.namespace,
            name: self.name,
            component,
            replicas: self.replicas,
            limits: self.limits,
            routes: self.routes,
            env: self.env,
            placement: self.placement,
            allow_outbound: self.allow_outbound,
            autoscale: self.autoscale,
            volumes: self.volumes,
            keyvalue: self.keyvalue,
            config: self.config,
            secrets: self.secrets,
            health: self.health,
            rollout: self.rollout,
            traffic: self.traffic,
            source: self.source,
            triggers: self.triggers,
        }
    }

    /// Whether `other` runs the same way: equal but for `replicas`,
    /// `autoscale`, `rollout` and `traffic`. Two specs with the same
    /// template are the same revision.
    pub fn same_template(&self, other: &Self) -> bool
    where
        C: PartialEq,
    {
        self.component == other.component
            && self.namespace == other.namespace
            && self.name == other.name
            && self.limits == other.limits
            && self.routes == other.routes
            && self.env == other.env
            && self.placement == other.placement
            && self.allow_outbound == other.allow_outbound
            && self.volumes == other.volumes
            && self.keyvalue == other.keyvalue
            && self.config == other.config
            && self.secrets == other.secrets
            && self.health == other.health
            && self.triggers == other.triggers
    }

    /// Checks every field; the error names the first field found wrong.
    pub fn validate(&self) -> Result<(), SpecError> {
        label("namespace", &self.namespace)?;
        label("name", &self.name)?;
        in_range("replicas", self.replicas, 0, MAX_REPLICAS, u32::to_string)?;
        self.limits.validate().map_err(|e| e.within("limits"))?;
        for (i, route) in self.routes.iter().enumerate() {
            route
                .validate()
                .map_err(|e| e.within(format_args!("routes[{i}]")))?;
        }
        check_env(&self.env)?;
        check_placement(&self.placement)?;
        check_outbound(&self.allow_outbound)?;
        if let Some(autoscale) = &self.autoscale {
            autoscale.validate().map_err(|e| e.within("autoscale"))?;
        }
        check_config(&self.config)?;
        let mut granted = BTreeSet::new();
        for (i, secret) in self.secrets.iter().enumerate() {
            let field = format!("secrets[{i}]");
            label(&field, secret)?;
            if self.config.contains_key(secret) {
                return Err(SpecError::new(field, format!("secret {secret:?} has the same name as a config key")));
            }
            if !granted.insert(secret) {
                return Err(SpecError::new(field, format!("secret {secret:?} is granted twice")));
            }
        }
        check_keyvalue(&self.keyvalue)?;
        self.validate_triggers()?;
        self.health.validate().map_err(|e| e.within("health"))?;
        self.rollout.validate().map_err(|e| e.within("rollout"))?;
        TrafficTarget::validate_split(&self.traffic)?;
        let mut volumes = BTreeSet::new();
        let mut paths = BTreeSet::new();
        for (i, volume) in self.volumes.iter().enumerate() {
            let field = format!("volumes[{i}].name");
            label(&field, &volume.name)?;
            if !volumes.insert(&volume.name) {
                return Err(SpecError::new(
                    field,
                    format!("volume {:?} is declared twice", volume.name),
                ));
            }
            let path_field = format!("volumes[{i}].path");
            if !volume.path.starts_with('/') || volume.path.split('/').any(|part| part == ".." || part == ".") || volume.path.contains(char::is_whitespace) {
                return Err(SpecError::new(path_field, format!("{:?} must be an absolute path without `.` or `..`", volume.path)));
            }
            if !paths.insert(&volume.path) {
                return Err(SpecError::new(path_field, format!("two volumes are mounted at {:?}", volume.path)));
            }
        }
        Ok(())
    }
}

impl<C> ServiceSpec<C> {
    /// Checks each trigger, and that no subject is declared twice.
    fn validate_triggers(&self) -> Result<(), SpecError> {
        if self.triggers.len() > crate::trigger::MAX_TRIGGERS {
            return Err(SpecError::new(
                "triggers",
                format!("at most {} triggers, got {}", crate::trigger::MAX_TRIGGERS, self.triggers.len()),
            ));
        }
        let mut subjects = BTreeSet::new();
        for (i, trigger) in self.triggers.iter().enumerate() {
            trigger
                .validate(&self.name)
                .map_err(|(field, problem)| SpecError::new(format!("triggers[{i}].{field}"), problem))?;
            if !subjects.insert(&trigger.subject) {
                return Err(SpecError::new(
                    format!("triggers[{i}].subject"),
                    format!("subject {:?} is declared twice", trigger.subject),
                ));
            }
        }
        Ok(())
    }
}

/// What [`is_label_key`] asks of a host label's key.
/// `config`: keys non-empty, without whitespace.
pub(crate) fn check_config(config: &BTreeMap<String, String>) -> Result<(), SpecError> {
    for key in config.keys() {
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(SpecError::new(format!("config.{key}"), "config keys must be non-empty without whitespace"));
        }
    }
    Ok(())
}

/// `keyvalue`: bucket identifiers of 1 to 256 bytes, each declared once.
pub(crate) fn check_keyvalue(keyvalue: &[String]) -> Result<(), SpecError> {
    let mut buckets = BTreeSet::new();
    for (i, bucket) in keyvalue.iter().enumerate() {
        let field = format!("keyvalue[{i}]");
        // `wasi:keyvalue` takes any string; only its length is bounded.
        if bucket.is_empty() || bucket.len() > crate::names::MAX_KV_IDENTIFIER {
            return Err(SpecError::new(
                field,
                format!("a bucket identifier must be 1 to {} bytes long (got {})", crate::names::MAX_KV_IDENTIFIER, bucket.len()),
            ));
        }
        if !buckets.insert(bucket) {
            return Err(SpecError::new(field, format!("bucket {bucket:?} is declared twice")));
        }
    }
    Ok(())
}

/// `env`: variable names non-empty, without '=' or NUL.
pub(crate) fn check_env(env: &BTreeMap<String, String>) -> Result<(), SpecError> {
    for key in env.keys() {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(SpecError::new(
                format!("env[{key:?}]"),
                "a variable name must be non-empty, without '=' or NUL",
            ));
        }
    }
    Ok(())
}

/// `placement`: label keys and values a host's labels can match.
pub(crate) fn check_placement(placement: &Placement) -> Result<(), SpecError> {
    for (key, value) in &placement.labels {
        let field = || format!("placement.labels[{key:?}]");
        if !is_label_key(key) {
            return Err(SpecError::new(field(), LABEL_KEY_RULE));
        }
        if value.contains(',') || value.contains(char::is_whitespace) {
            return Err(SpecError::new(
                field(),
                format!("label value {value:?} must not contain ',' or whitespace"),
            ));
        }
    }
    if let Some(key) = &placement.spread
        && !is_label_key(key)
    {
        return Err(SpecError::new(
            "placement.spread",
            format!("{key:?} is not a label key: {LABEL_KEY_RULE}"),
        ));
    }
    Ok(())
}

/// `allow_outbound`: each entry a host name.
pub(crate) fn check_outbound(allow_outbound: &[String]) -> Result<(), SpecError> {
    for (i, host) in allow_outbound.iter().enumerate() {
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(SpecError::new(
                format!("allow_outbound[{i}]"),
                format!(
                    "{host:?} is not a host: write `api.example.com`, `host:8443` or `*.example.com`"
                ),
            ));
        }
    }
    Ok(())
}

const LABEL_KEY_RULE: &str = "a label key must be non-empty, without '=', ',' or whitespace";

/// Whether `key` can be a host label's key (`zone`, `disk`): hosts are
/// given labels as `key=value,key=value`, so neither separator fits.
fn is_label_key(key: &str) -> bool {
    !key.is_empty() && !key.contains(['=', ',']) && !key.contains(char::is_whitespace)
}

pub(crate) fn label(field: &str, value: &str) -> Result<(), SpecError> {
    check_label(value).map_err(|e: NameError| SpecError::new(field, e))
}

/// Checks `min <= value <= max`, naming the field and the allowed range otherwise.
pub(crate) fn in_range<T: PartialOrd>(
    field: &str,
    value: T,
    min: T,
    max: T,
    show: impl Fn(&T) -> String,
) -> Result<(), SpecError> {
    if value < min || value > max {
        return Err(SpecError::new(
            field,
            format!(
                "must be between {} and {}, got {}",
                show(&min),
                show(&max),
                show(&value)
            ),
        ));
    }
    Ok(())
}

impl Limits {
    /// The most memory one replica may use: `concurrency` instances at
    /// their cap each.
    pub fn most_memory(&self) -> ByteSize {
        ByteSize(self.memory.bytes().saturating_mul(u64::from(self.concurrency)))
    }

    /// Checks each limit against its allowed range.
    pub fn validate(&self) -> Result<(), SpecError> {
        in_range(
            "memory",
            self.memory,
            MIN_MEMORY,
            MAX_MEMORY,
            ByteSize::to_string,
        )?;
        if self.fuel == Some(0) {
            return Err(SpecError::new(
                "fuel",
                "must be at least 1 (or `unlimited`)",
            ));
        }
        in_range("timeout", self.timeout, MIN_TIMEOUT, MAX_TIMEOUT, |d| {
            format_duration(*d)
        })?;
        in_range(
            "concurrency",
            self.concurrency,
            1,
            MAX_CONCURRENCY,
            u32::to_string,
        )?;
        if let Some(request) = self.instances_request
            && (request == 0 || request > self.concurrency)
        {
            return Err(SpecError::new(
                "instances_request",
                format!("must be between 1 and concurrency ({}), got {request}", self.concurrency),
            ));
        }
        if let Some(request) = self.memory_request {
            let most = self.most_memory();
            if request > most {
                return Err(SpecError::new(
                    "memory_request",
                    format!(
                        "{request} is more than a replica can use: memory x concurrency is {} x {} = {most}; \
                         lower the request or raise memory or concurrency",
                        self.memory, self.concurrency
                    ),
                ));
            }
            in_range(
                "memory_request",
                request,
                MIN_MEMORY_REQUEST,
                most,
                ByteSize::to_string,
            )?;
        }
        Ok(())
    }
}

impl Route {
    /// Checks the host and the path prefix.
    pub fn validate(&self) -> Result<(), SpecError> {
        if let Some(host) = &self.host
            && (host.is_empty() || host.contains('/') || host.contains(char::is_whitespace))
        {
            return Err(SpecError::new(
                "host",
                format!("{host:?} is not a host name"),
            ));
        }
        if !self.path_prefix.starts_with('/') {
            return Err(SpecError::new(
                "path_prefix",
                format!("{:?} must start with '/'", self.path_prefix),
            ));
        }
        if self.path_prefix.contains(char::is_whitespace) {
            return Err(SpecError::new(
                "path_prefix",
                format!("{:?} must not contain whitespace", self.path_prefix),
            ));
        }
        Ok(())
    }
}

impl Autoscale {
    /// Checks that the bounds, the target and the windows make sense.
    pub fn validate(&self) -> Result<(), SpecError> {
        in_range("max", self.max, 1, MAX_REPLICAS, u32::to_string)?;
        if self.min > self.max {
            return Err(SpecError::new(
                "min",
                format!("{} is more than max ({})", self.min, self.max),
            ));
        }
        if self.target_concurrency.is_some() && self.target_rps.is_some() {
            return Err(SpecError::new(
                "target_rps",
                "set either target_concurrency or target_rps, not both",
            ));
        }
        for (field, target) in [
            ("target_concurrency", self.target_concurrency),
            ("target_rps", self.target_rps),
        ] {
            if target == Some(0) {
                return Err(SpecError::new(field, "must be at least 1"));
            }
        }
        let duration = |d: &Duration| format_duration(*d);
        in_range(
            "scale_down_delay",
            self.scale_down_delay,
            Duration::ZERO,
            MAX_AUTOSCALE_WINDOW,
            duration,
        )?;
        in_range(
            "scale_to_zero_after",
            self.scale_to_zero_after,
            Duration::ZERO,
            MAX_AUTOSCALE_WINDOW,
            duration,
        )?;
        in_range(
            "stable_window",
            self.stable_window,
            MIN_STABLE_WINDOW,
            MAX_AUTOSCALE_WINDOW,
            duration,
        )
    }
}

/// Serde for fuel: a number of units, or `unlimited` (or null) for no metering.
/// TOML has no null, hence the word.
pub(crate) mod fuel_text {
    use serde::Serializer;
    use serde::de::{self, Deserializer, Visitor};
    use std::fmt;

    const UNLIMITED: &str = "unlimited";

    pub fn serialize<S: Serializer>(fuel: &Option<u64>, serializer: S) -> Result<S::Ok, S::Error> {
        match fuel {
            Some(units) => serializer.serialize_u64(*units),
            None => serializer.serialize_str(UNLIMITED),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<u64>, D::Error> {
        deserializer.deserialize_any(FuelVisitor)
    }

    struct FuelVisitor;

    impl<'de> Visitor<'de> for FuelVisitor {
        type Value = Option<u64>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a number of fuel units (0 or more) or \"unlimited\"")
        }

        fn visit_u64<E: de::Error>(self, units: u64) -> Result<Self::Value, E> {
            Ok(Some(units))
        }

        fn visit_i64<E: de::Error>(self, units: i64) -> Result<Self::Value, E> {
            u64::try_from(units)
                .map(Some)
                .map_err(|_| E::invalid_value(de::Unexpected::Signed(units), &self))
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            if text.eq_ignore_ascii_case(UNLIMITED) {
                Ok(None)
            } else {
                Err(E::invalid_value(de::Unexpected::Str(text), &self))
            }
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_any(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        ServiceSpec::new("hello", Digest::of(b"hello"))
    }

    /// Applies `change` to a valid spec and checks that validation blames
    /// `field` with a message containing `problem`.
    #[track_caller]
    fn check(change: impl FnOnce(&mut ServiceSpec), field: &str, problem: &str) {
        let mut spec = spec();
        change(&mut spec);
        let err = spec.validate().expect_err("the spec should be refused");
        assert_eq!(err.field, field, "{err}");
        assert!(err.problem.contains(problem), "{err}");
    }

    #[test]
    fn defaults_are_valid() {
        let spec = spec();
        assert_eq!(spec.validate(), Ok(()));
        assert_eq!(spec.namespace, "default");
        assert_eq!(spec.replicas, 1);
        assert_eq!(spec.limits.memory, ByteSize::mib(64));
        assert_eq!(spec.limits.fuel, Some(1_000_000_000));
        assert_eq!(spec.limits.timeout, Duration::from_secs(5));
        assert_eq!(spec.limits.concurrency, 16);
        assert_eq!(spec.limits.memory_request, None);
        assert_eq!(spec.memory_request(), ByteSize::mib(8), "a small default, not the cap x concurrency");
        assert_eq!(spec.limits.most_memory(), ByteSize::gib(1));
    }

    #[test]
    fn memory_request_is_separate_from_the_limit() {
        let mut spec = spec();
        spec.limits.memory_request = Some(ByteSize::mib(100));
        assert_eq!(spec.validate(), Ok(()));
        assert_eq!(spec.memory_request(), ByteSize::mib(100), "an explicit request is what the replica reserves");
        assert_eq!(spec.limits.memory, ByteSize::mib(64), "and the limit stays the cap");
        // A limit below the default request: the default shrinks to what a replica can use.
        spec.limits = Limits { memory: ByteSize::mib(2), concurrency: 2, ..Limits::default() };
        assert_eq!(spec.validate(), Ok(()));
        assert_eq!(spec.memory_request(), ByteSize::mib(4));
        // A request of exactly memory x concurrency is allowed; one byte more is not.
        spec.limits.memory_request = Some(ByteSize::mib(4));
        assert_eq!(spec.validate(), Ok(()));
        spec.limits.memory_request = Some(ByteSize(ByteSize::mib(4).bytes() + 1));
        let err = spec.validate().expect_err("over memory x concurrency");
        assert_eq!(
            err.to_string(),
            "limits.memory_request: 4194305 is more than a replica can use: memory x concurrency is 2MiB x 2 = 4MiB; \
             lower the request or raise memory or concurrency"
        );
        spec.limits.memory_request = Some(ByteSize(1000));
        let err = spec.validate().expect_err("below a wasm page");
        assert_eq!(err.to_string(), "limits.memory_request: must be between 64KiB and 4MiB, got 1000");
    }

    #[test]
    fn instances_request_is_one_by_default_and_at_most_the_concurrency() {
        let mut spec = spec();
        assert_eq!((spec.limits.concurrency, spec.instances_request()), (16, 1), "a replica reserves one slot, not its concurrency");
        spec.limits.concurrency = 4;
        spec.limits.instances_request = Some(4);
        assert_eq!(spec.instances_request(), 4);
        spec.validate().expect("up to the concurrency");
        spec.limits.instances_request = Some(5);
        let err = spec.validate().expect_err("past the concurrency");
        assert_eq!(err.to_string(), "limits.instances_request: must be between 1 and concurrency (4), got 5");
        spec.limits.instances_request = Some(0);
        assert!(spec.validate().is_err(), "zero");
    }

    #[test]
    fn each_error_names_its_field() {
        check(|s| s.namespace = "Prod".into(), "namespace", "DNS label");
        check(|s| s.name = String::new(), "name", "empty");
        check(|s| s.name = "-hello".into(), "name", "DNS label");
        check(|s| s.name = "x".repeat(64), "name", "at most 63");
        check(
            |s| s.replicas = 100_001,
            "replicas",
            "between 0 and 100000, got 100001",
        );
        check(
            |s| s.limits.memory = ByteSize(1000),
            "limits.memory",
            "between 1MiB and 4GiB, got 1000",
        );
        check(
            |s| s.limits.memory = ByteSize::gib(8),
            "limits.memory",
            "got 8GiB",
        );
        check(|s| s.limits.fuel = Some(0), "limits.fuel", "at least 1");
        check(
            |s| s.limits.timeout = Duration::ZERO,
            "limits.timeout",
            "between 1ms and 10m",
        );
        check(
            |s| s.limits.timeout = Duration::from_secs(3600),
            "limits.timeout",
            "got 1h",
        );
        check(
            |s| s.limits.concurrency = 0,
            "limits.concurrency",
            "between 1 and 10000",
        );
        check(
            |s| s.limits.concurrency = 10_001,
            "limits.concurrency",
            "got 10001",
        );
        let route = |host: Option<&str>, prefix: &str| Route {
            host: host.map(String::from),
            path_prefix: prefix.into(),
        };
        check(
            |s| s.routes = vec![route(None, "/ok"), route(None, "hello")],
            "routes[1].path_prefix",
            "start with '/'",
        );
        check(
            |s| s.routes = vec![route(None, "/a b")],
            "routes[0].path_prefix",
            "whitespace",
        );
        check(
            |s| s.routes = vec![route(Some(""), "/")],
            "routes[0].host",
            "not a host name",
        );
        check(
            |s| _ = s.env.insert("A=B".into(), "c".into()),
            "env[\"A=B\"]",
            "without '='",
        );
        check(
            |s| _ = s.env.insert(String::new(), "c".into()),
            "env[\"\"]",
            "non-empty",
        );
        check(
            |s| _ = s.placement.labels.insert("zone a".into(), "b".into()),
            "placement.labels[\"zone a\"]",
            "whitespace",
        );
        check(
            |s| s.placement.spread = Some(String::new()),
            "placement.spread",
            "\"\" is not a label key: a label key must be non-empty",
        );
        check(
            |s| s.placement.spread = Some("zone a".into()),
            "placement.spread",
            "whitespace",
        );
        check(
            |s| s.placement.spread = Some("zone=a".into()),
            "placement.spread",
            "without '='",
        );
        check(
            |s| s.allow_outbound = vec!["api.example.com".into(), "".into()],
            "allow_outbound[1]",
            "not a host",
        );
        let autoscale = |change: fn(&mut Autoscale)| {
            let mut policy = Autoscale::new(0, 4);
            change(&mut policy);
            move |s: &mut ServiceSpec| s.autoscale = Some(policy)
        };
        check(
            autoscale(|a| {
                a.min = 3;
                a.max = 2;
            }),
            "autoscale.min",
            "3 is more than max (2)",
        );
        check(
            autoscale(|a| a.max = 0),
            "autoscale.max",
            "between 1 and 100000, got 0",
        );
        check(
            autoscale(|a| a.max = MAX_REPLICAS + 1),
            "autoscale.max",
            "between 1 and 100000, got 100001",
        );
        check(
            autoscale(|a| {
                a.target_concurrency = Some(10);
                a.target_rps = Some(100);
            }),
            "autoscale.target_rps",
            "either target_concurrency or target_rps, not both",
        );
        check(
            autoscale(|a| a.target_concurrency = Some(0)),
            "autoscale.target_concurrency",
            "at least 1",
        );
        check(
            autoscale(|a| a.target_rps = Some(0)),
            "autoscale.target_rps",
            "at least 1",
        );
        check(
            autoscale(|a| a.scale_down_delay = Duration::from_secs(3601)),
            "autoscale.scale_down_delay",
            "between 0s and 1h, got 1h 1s",
        );
        check(
            autoscale(|a| a.scale_to_zero_after = Duration::from_secs(7200)),
            "autoscale.scale_to_zero_after",
            "between 0s and 1h, got 2h",
        );
        check(
            autoscale(|a| a.stable_window = Duration::from_secs(5)),
            "autoscale.stable_window",
            "between 6s and 1h, got 5s",
        );
        let volume = |name: &str| Volume { name: name.into(), path: format!("/{name}") };
        check(
            |s| s.volumes = vec![volume("data"), volume("Data")],
            "volumes[1].name",
            "DNS label",
        );
        check(
            |s| s.volumes = vec![volume("data"), volume("data")],
            "volumes[1].name",
            "declared twice",
        );
    }

    #[test]
    fn error_paths_nest() {
        let err = SpecError::new("memory", "too big")
            .within("limits")
            .within("services[1]");
        assert_eq!(err.to_string(), "services[1].limits.memory: too big");
    }

    #[test]
    fn placement_matches_when_host_has_every_label() {
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let placement = Placement {
            labels: labels(&[("zone", "a"), ("disk", "ssd")]),
            spread: None,
        };
        assert!(placement.matches(&labels(&[("zone", "a"), ("disk", "ssd"), ("gpu", "no")])));
        assert!(!placement.matches(&labels(&[("zone", "a")])));
        assert!(!placement.matches(&labels(&[("zone", "b"), ("disk", "ssd")])));
        assert!(Placement::default().matches(&labels(&[])));
    }

    #[test]
    fn spread_is_a_placement_setting() {
        let mut spec = spec();
        spec.placement.spread = Some("zone".into());
        assert_eq!(spec.validate(), Ok(()));
        assert!(!spec.placement.is_unconstrained());
        assert!(
            spec.placement.matches(&BTreeMap::new()),
            "spread filters no host"
        );
        let json = serde_json::to_value(&spec).expect("serialises");
        assert_eq!(json["placement"], serde_json::json!({ "spread": "zone" }));
        let back: ServiceSpec = serde_json::from_value(json).expect("parses");
        assert_eq!(back, spec);

        let json = serde_json::to_value(self::spec()).expect("serialises");
        assert!(
            json.get("placement").is_none(),
            "default placement left out: {json}"
        );
        let placement: Placement =
            serde_json::from_str(r#"{"labels": {"disk": "ssd"}}"#).expect("parses");
        assert_eq!(placement.spread, None);
        let err = crate::strict::from_json::<Placement>(br#"{"spraed": "zone"}"#)
            .expect_err("unknown field");
        assert!(
            err.to_string().contains("expected `labels` or `spread`"),
            "{err}"
        );
    }

    #[test]
    fn json_round_trips_with_human_units() {
        let mut spec = spec();
        spec.limits.timeout = Duration::from_millis(1500);
        spec.limits.fuel = None;
        spec.routes.push(Route {
            host: Some("example.com".into()),
            path_prefix: "/hello".into(),
        });
        spec.env.insert("MODE".into(), "dev".into());
        spec.autoscale = Some(Autoscale {
            target_rps: Some(50),
            scale_to_zero_after: Duration::from_secs(300),
            ..Autoscale::new(0, 4)
        });
        spec.volumes.push(Volume {
            name: "data".into(),
            path: "/data".into(),
        });
        let json = serde_json::to_value(&spec).expect("serialises");
        assert_eq!(json["limits"]["timeout"], "1s 500ms");
        assert_eq!(json["limits"]["memory"], "64MiB");
        assert_eq!(json["limits"]["fuel"], "unlimited");
        assert_eq!(json["autoscale"]["scale_to_zero_after"], "5m");
        assert_eq!(json["autoscale"]["stable_window"], "30s");
        assert_eq!(json["autoscale"]["target_rps"], 50);
        assert!(json["autoscale"].get("target_concurrency").is_none());
        let back: ServiceSpec = serde_json::from_value(json).expect("parses");
        assert_eq!(back, spec);
    }

    #[test]
    fn autoscale_defaults_and_targets() {
        let parse = |json: &str| crate::strict::from_json::<Autoscale>(json.as_bytes()).map_err(|e| e.to_string());
        let policy = parse(r#"{"max": 5}"#).expect("parses");
        assert_eq!(policy, Autoscale::new(0, 5));
        assert_eq!(policy.target(), AutoscaleTarget::Concurrency(10));
        assert_eq!(policy.scale_down_delay, Duration::from_secs(10));
        assert_eq!(policy.scale_to_zero_after, Duration::from_secs(30));
        assert_eq!(policy.stable_window, Duration::from_secs(30));
        assert_eq!(policy.panic_window(), Duration::from_secs(3));
        let policy = parse(r#"{"max": 5, "target_concurrency": 4}"#).expect("parses");
        assert_eq!(policy.target(), AutoscaleTarget::Concurrency(4));
        let policy = parse(r#"{"min": 1, "max": 5, "target_rps": 200, "stable_window": "1m"}"#)
            .expect("parses");
        assert_eq!(policy.target(), AutoscaleTarget::Rps(200));
        assert_eq!(policy.target().value(), 200);
        assert_eq!(policy.stable_window, Duration::from_secs(60));
        assert!(
            parse(r#"{"max": 5, "target": 3}"#)
                .expect_err("unknown field")
                .contains("unknown field `target`")
        );
        assert!(
            parse(r#"{"max": 5, "scale_down_delay": "soon"}"#)
                .expect_err("bad duration")
                .contains("soon")
        );
    }

    #[test]
    fn fuel_reads_numbers_unlimited_and_null() {
        let limits = |json: &str| {
            serde_json::from_str::<Limits>(json)
                .map(|l| l.fuel)
                .map_err(|e| e.to_string())
        };
        assert_eq!(limits(r#"{"fuel": 5}"#), Ok(Some(5)));
        assert_eq!(limits(r#"{"fuel": "unlimited"}"#), Ok(None));
        assert_eq!(limits(r#"{"fuel": null}"#), Ok(None));
        assert_eq!(limits("{}"), Ok(Some(1_000_000_000)));
        let err = limits(r#"{"fuel": -1}"#).expect_err("negative fuel");
        assert!(err.contains("fuel units"), "{err}");
    }
}
