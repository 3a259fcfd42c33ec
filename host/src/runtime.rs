//! The wasmtime engine a host runs every component on, and loading a component
//! into it: the checks a component must pass before it can run, and the
//! caches of compiled code: in memory (an LRU within a byte budget, see
//! [`crate::code_cache`]) over the disk.
//!
//! One [`Runtime`] per host. Its engine uses the pooling allocator (instance
//! slots reserved up front, sized from the host's configured capacity), fuel
//! for per-request CPU budgets, and epoch interruption for wall-clock
//! deadlines; a background thread advances the epoch every [`EPOCH_TICK`].

use crate::code_cache::{CodeCache, CodeCacheMetrics, CodeCacheStats, Loaded, Source};
use crate::instance::InstanceState;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wharf_proto::{ByteSize, Digest};

/// How often the epoch advances. A running guest yields to the tokio
/// scheduler once per tick and its deadline is checked then, so this is both
/// the time slice and the resolution of deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(2);

/// The export of a component that serves HTTP (a component has it, the
/// message handler, or both).
pub const HTTP_HANDLER_EXPORT: &str = "wasi:http/incoming-handler";

/// The default budget of compiled code kept in memory: about a thousand
/// small Rust components (a `hello` holds 256 KiB of code,
/// bench/RESULTS.md), while a host with thousands of idle services stays
/// bounded.
pub const DEFAULT_CODE_CACHE: ByteSize = ByteSize::mib(256);

/// The default number of instances a host runs at once, over all its
/// replicas: the pool's slots. Each replica reserves its instance request
/// (1 by default) of them, so a host holds about this many always-on
/// replicas (and any number scaled to zero). A slot costs address space
/// for its memories (about 8.6GiB with the default 4GiB reservation and
/// guards), not memory: 4,096 slots take some 35TiB of the 128TiB a
/// process may map.
pub const DEFAULT_MAX_INSTANCES: u32 = 4096;

/// How a host's engine is sized.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Instance slots in the pooling allocator: the most instances, over all
    /// workloads, that can run at once on this host.
    pub max_instances: u32,
    /// The largest linear memory any one instance may be given.
    pub max_instance_memory: ByteSize,
    /// Where compiled components are cached; `None` keeps them in memory only.
    pub cache_dir: Option<PathBuf>,
    /// The most compiled code kept in memory for components, least recently
    /// used dropped first (it stays on disk). Code a running replica uses
    /// stays in memory with the replica whatever the budget.
    pub code_cache: ByteSize,
    /// OS priority of the threads that run long requests. See [`crate::cpu`].
    pub background: crate::cpu::BackgroundPriority,
    /// How fast each service may log. See [`crate::logs`].
    pub logs: crate::logs::LogLimits,
    /// Bounds on each `wasi:keyvalue` call. See [`crate::keyvalue`].
    pub keyvalue: crate::keyvalue::KeyValueLimits,
    /// The non-public address ranges components may reach anyway (none by
    /// default). See [`wharf_proto::egress`].
    pub private_egress: wharf_proto::egress::PrivateEgress,
    /// The linear memory all instances together may hold (a host's
    /// `--memory`); past it a grow is refused and the request gets 503
    /// `host_memory_full`. `None`: only each instance's cap applies.
    pub memory_budget: Option<ByteSize>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_instances: DEFAULT_MAX_INSTANCES,
            max_instance_memory: ByteSize::gib(1),
            cache_dir: None,
            code_cache: DEFAULT_CODE_CACHE,
            background: crate::cpu::BackgroundPriority::Idle,
            logs: crate::logs::LogLimits::default(),
            keyvalue: crate::keyvalue::KeyValueLimits::default(),
            private_egress: wharf_proto::egress::PrivateEgress::default(),
            memory_budget: None,
        }
    }
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The engine could not be created, typically because the pooling
    /// allocator could not reserve address space for its slots.
    #[error("could not create the wasm engine with {max_instances} instance slots of up to {max_memory} each: {source:#}; lower --max-instances or the largest memory")]
    Engine { max_instances: u32, max_memory: ByteSize, source: wasmtime::Error },
    /// The WASI interfaces could not be linked (a bug).
    #[error("could not link the WASI interfaces (a bug in Wharf): {0:#}")]
    Link(wasmtime::Error),
    /// The background thread pool could not start.
    #[error("could not start the background thread pool for long-running requests: {0}")]
    BackgroundPool(std::io::Error),
    /// The thread that writes components' logs could not start.
    #[error("could not start the log writer thread: {0}")]
    LogWriter(std::io::Error),
    /// The compile cache directory could not be created.
    #[error("could not create the compile cache directory {path}: {source}")]
    CacheDir { path: PathBuf, source: std::io::Error },
}

/// Why a component was refused. Every variant names the problem and, where
/// it can, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not WebAssembly at all.
    #[error("not a WebAssembly component: the file does not start with the wasm magic bytes (\\0asm); found {found}")]
    NotWasm { found: String },
    /// A core module, not a component.
    #[error("this is a core WebAssembly module, not a component: build for the wasm32-wasip2 target or wrap it with `wasm-tools component new`")]
    CoreModule,
    /// The digest given with the bytes does not match them.
    #[error("digest mismatch: expected {expected}, the bytes hash to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    /// wasmtime refused the component (malformed or invalid).
    #[error("invalid component: {0}")]
    Invalid(String),
    /// The component imports something this host does not provide.
    #[error("the component imports `{import}`, which Wharf hosts do not provide (they provide WASI 0.2: wasi:http, wasi:cli, wasi:io, wasi:clocks, wasi:random, wasi:filesystem, wasi:sockets; wasi:keyvalue 0.2.0-draft, wasi:config 0.2.0-rc.1 and wasmcloud:messaging 0.2.0): {detail}")]
    UnsupportedImport { import: String, detail: String },
    /// The component exports neither the HTTP handler, the message handler
    /// nor the command entry point.
    #[error("the component does not export `{HTTP_HANDLER_EXPORT}` (the wasi:http/proxy world), `wasmcloud:messaging/handler@0.2.0` (for message triggers) or `wasi:cli/run` (the wasi:cli/command world, for jobs); its exports are: {exports}")]
    WrongWorld { exports: String },
    /// The export exists but its type does not match wasi:http 0.2.
    #[error("the component's `{HTTP_HANDLER_EXPORT}` export does not match wasi:http 0.2: {0}")]
    IncompatibleExport(String),
    /// The messaging handler export exists but its type does not match.
    #[error("the component's `wasmcloud:messaging/handler@0.2.0` export does not match wasmcloud:messaging 0.2.0: {0}")]
    IncompatibleHandler(String),
    /// The `wasi:cli/run` export exists but its type does not match WASI 0.2.
    #[error("the component's `wasi:cli/run` export does not match WASI 0.2's command world: {0}")]
    IncompatibleCommand(String),
}

impl LoadedComponent {
    /// Whether the component exports the message handler triggers call.
    pub fn handles_messages(&self) -> bool {
        self.messaging.is_some()
    }

    /// Whether the component exports the HTTP handler.
    pub fn handles_http(&self) -> bool {
        self.pre.is_some()
    }

    /// Whether the component exports `wasi:cli/run`: it can run as a job.
    pub fn runs_to_completion(&self) -> bool {
        self.command.is_some()
    }
}

/// The names of a component's top-level exports, read without compiling
/// (the control plane checks a triggered service's handler with it).
pub fn component_exports(bytes: &[u8]) -> Result<Vec<String>, LoadError> {
    check_preamble(bytes)?;
    Ok(top_level(bytes)?.1)
}

/// A component that passed every check, compiled and pre-linked.
#[derive(Clone)]
pub struct LoadedComponent {
    /// The sha256 of the component's bytes.
    pub digest: Digest,
    pub(crate) instance_pre: wasmtime::component::InstancePre<InstanceState>,
    /// The `wasi:http/incoming-handler` export, if the component has it.
    pub(crate) pre: Option<ProxyPre<InstanceState>>,
    /// The `wasmcloud:messaging/handler` export, if the component has it.
    pub(crate) messaging: Option<crate::messaging::MessagingPre<InstanceState>>,
    /// The `wasi:cli/run` export (a job's entry point), if the component has it.
    pub(crate) command: Option<wasmtime_wasi::p2::bindings::CommandPre<InstanceState>>,
    /// Whether the compiled code came from the cache (memory or disk).
    pub cached: bool,
    /// Time spent compiling or loading compiled code.
    pub load_time: Duration,
}

impl std::fmt::Debug for LoadedComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedComponent").field("digest", &self.digest).field("cached", &self.cached).finish()
    }
}

/// The host's wasm engine and its compile cache. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

struct RuntimeInner {
    engine: Engine,
    linker: Linker<InstanceState>,
    cache_dir: Option<PathBuf>,
    /// Hash of the engine's code-generation settings; part of every cache file name.
    engine_hash: String,
    /// Compiled components by digest, so a second replica of the same
    /// artifact shares code with the first; loads of one digest at once
    /// share one compile.
    compiled: CodeCache<Component>,
    config: RuntimeConfig,
    /// Where long-running requests go: a low-priority pool shared fairly
    /// between namespaces (see [`crate::cpu`]).
    cpu: crate::cpu::CpuScheduler,
    /// Writes components' log lines to the host's log, within each service's rate.
    logs: crate::logs::LogSink,
    /// What all instances' linear memory counts against (`memory_budget`).
    host_memory: Option<Arc<crate::limits::HostMemory>>,
    /// One permit per instance the pool holds (`max_instances`), shared by
    /// every workload: a request takes one besides its replica's own, so a
    /// full pool is a wait and then a clean 503, never a failed instantiation.
    instance_slots: Arc<tokio::sync::Semaphore>,
}

impl Drop for RuntimeInner {
    fn drop(&mut self) {
        tracing::debug!("wasm runtime stopped");
    }
}

impl Runtime {
    /// Creates the engine and starts its epoch ticker.
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        let engine = Engine::new(&engine_config(&config)).map_err(|source| RuntimeError::Engine {
            max_instances: config.max_instances,
            max_memory: config.max_instance_memory,
            source,
        })?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(RuntimeError::Link)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(RuntimeError::Link)?;
        crate::keyvalue::add_to_linker(&mut linker, InstanceState::keyvalue).map_err(RuntimeError::Link)?;
        wasmtime_wasi_config::add_to_linker(&mut linker, InstanceState::config).map_err(RuntimeError::Link)?;
        crate::messaging::add_to_linker(&mut linker, InstanceState::messaging).map_err(RuntimeError::Link)?;
        if let Some(dir) = &config.cache_dir {
            std::fs::create_dir_all(dir).map_err(|source| RuntimeError::CacheDir { path: dir.clone(), source })?;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_hash = format!("{:016x}", hasher.finish());
        let weak = engine.weak();
        let preempt: crate::cpu::Preempt = Box::new(move || {
            if let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
            }
        });
        let cpu = crate::cpu::CpuScheduler::new(config.background, Some(preempt)).map_err(RuntimeError::BackgroundPool)?;
        let logs = crate::logs::LogSink::start(config.logs).map_err(RuntimeError::LogWriter)?;
        spawn_epoch_ticker(engine.weak());
        Ok(Runtime {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                cache_dir: config.cache_dir.clone(),
                engine_hash,
                compiled: CodeCache::new(config.code_cache.bytes()),
                host_memory: config.memory_budget.map(crate::limits::HostMemory::new),
                instance_slots: Arc::new(tokio::sync::Semaphore::new(config.max_instances.max(1) as usize)),
                config,
                cpu,
                logs,
            }),
        })
    }

    /// Where this host's workloads send their log lines.
    pub(crate) fn log_sink(&self) -> &crate::logs::LogSink {
        &self.inner.logs
    }

    /// The engine's configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// The budget all instances' linear memory counts against, if any.
    pub fn host_memory(&self) -> Option<Arc<crate::limits::HostMemory>> {
        self.inner.host_memory.clone()
    }

    /// The host's instance slots (see `RuntimeInner::instance_slots`).
    pub(crate) fn instance_slots(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.inner.instance_slots
    }

    /// Instances running now, across every workload of the host.
    pub fn instances_running(&self) -> u32 {
        let free = u32::try_from(self.inner.instance_slots.available_permits()).unwrap_or(u32::MAX);
        self.inner.config.max_instances.max(1).saturating_sub(free)
    }

    pub(crate) fn cpu(&self) -> &crate::cpu::CpuScheduler {
        &self.inner.cpu
    }

    /// Requests that ran in the background pool (they ran long, or their
    /// namespace was over its share of the CPU) since the host started.
    pub fn demoted_requests(&self) -> u64 {
        self.inner.cpu.demoted()
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Whether this host already has `digest` compiled (in memory or on disk).
    pub fn has_compiled(&self, digest: &Digest) -> bool {
        self.inner.compiled.contains(digest) || self.cache_path(digest).is_some_and(|p| p.exists())
    }

    /// The compiled-code cache's counters and gauges, for `/metrics`.
    pub fn code_cache_metrics(&self) -> &CodeCacheMetrics {
        self.inner.compiled.metrics()
    }

    /// The compiled-code cache's counters now.
    pub fn code_cache_stats(&self) -> CodeCacheStats {
        self.inner.compiled.stats()
    }

    /// Checks and compiles a component. Blocking and CPU-heavy on a cache
    /// miss: call it from `spawn_blocking` in async code.
    ///
    /// The checks, in order: wasm magic; component rather than core module;
    /// `expected` digest; wasmtime's validation; every import provided by
    /// this host; the `wasi:http/incoming-handler`,
    /// `wasmcloud:messaging/handler` or `wasi:cli/run` export (one or
    /// more), with the right types.
    pub fn load(&self, bytes: &[u8], expected: Option<&Digest>) -> Result<LoadedComponent, LoadError> {
        let started = Instant::now();
        check_preamble(bytes)?;
        let digest = Digest::of(bytes);
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(LoadError::DigestMismatch { expected: expected.clone(), actual: digest });
        }
        let (component, cached) = self.compile(bytes, &digest)?;
        self.prepare(component, digest, cached, started)
    }

    /// Loads a component this host has compiled before (in memory or in the
    /// disk cache) without its bytes: `None` if it has not. The checks on
    /// the bytes passed when it was compiled; the link checks run again.
    pub fn load_compiled(&self, digest: &Digest) -> Option<Result<LoadedComponent, LoadError>> {
        let started = Instant::now();
        let found = self.inner.compiled.get_or_load(digest, true, || Ok::<_, std::convert::Infallible>(self.read_cache(digest)));
        let (component, _) = match found {
            Ok(found) => found?,
            Err(never) => match never {},
        };
        Some(self.prepare(component, digest.clone(), true, started))
    }

    /// The names of a loaded component's imports and exports, as an OCI
    /// artifact's config lists them.
    pub fn interfaces(&self, loaded: &LoadedComponent) -> (Vec<String>, Vec<String>) {
        let component_type = loaded.instance_pre.component().component_type();
        let imports = component_type.imports(&self.inner.engine).map(|(name, _)| name.to_string()).collect();
        let exports = component_type.exports(&self.inner.engine).map(|(name, _)| name.to_string()).collect();
        (imports, exports)
    }

    /// Links a compiled component and checks its world.
    fn prepare(&self, component: Component, digest: Digest, cached: bool, started: Instant) -> Result<LoadedComponent, LoadError> {
        let instance_pre = self.inner.linker.instantiate_pre(&component).map_err(|e| self.explain_link_error(&component, e))?;
        let exports: Vec<String> =
            component.component_type().exports(&self.inner.engine).map(|(name, _)| name.to_string()).collect();
        check_world(&exports)?;
        let messaging = if exports.iter().any(|name| name == wharf_proto::trigger::MESSAGE_HANDLER_EXPORT) {
            Some(crate::messaging::MessagingPre::new(instance_pre.clone()).map_err(|e| LoadError::IncompatibleHandler(format!("{e:#}")))?)
        } else {
            None
        };
        let pre = if exports.iter().any(|name| export_matches(name)) {
            Some(ProxyPre::new(instance_pre.clone()).map_err(|e| LoadError::IncompatibleExport(format!("{e:#}")))?)
        } else {
            None
        };
        let command = if exports.iter().any(|name| wharf_proto::job::is_run_export(name)) {
            Some(wasmtime_wasi::p2::bindings::CommandPre::new(instance_pre.clone()).map_err(|e| LoadError::IncompatibleCommand(format!("{e:#}")))?)
        } else {
            None
        };
        Ok(LoadedComponent { digest, instance_pre, pre, messaging, command, cached, load_time: started.elapsed() })
    }

    /// Compiles a component into the disk cache only, without keeping it in
    /// memory, so a replica placed here later starts without compiling.
    /// Returns whether it compiled (false: already cached, or no cache dir).
    pub fn precompile(&self, bytes: &[u8], digest: &Digest) -> Result<bool, LoadError> {
        let Some(path) = self.cache_path(digest) else { return Ok(false) };
        if path.exists() || self.inner.compiled.contains(digest) {
            return Ok(false);
        }
        check_preamble(bytes)?;
        let actual = Digest::of(bytes);
        if actual != *digest {
            return Err(LoadError::DigestMismatch { expected: digest.clone(), actual });
        }
        // Through the cache's single flight, so a replica loading the same
        // digest meanwhile waits for this compile instead of repeating it.
        let compiled = self.inner.compiled.get_or_load(digest, false, || self.read_or_compile(bytes, digest))?;
        Ok(compiled.is_some_and(|(_, source)| source == Source::Compiled))
    }

    /// Finds compiled code in memory, then on disk, then compiles; concurrent
    /// calls for one digest share one compile.
    fn compile(&self, bytes: &[u8], digest: &Digest) -> Result<(Component, bool), LoadError> {
        let found = self.inner.compiled.get_or_load(digest, true, || self.read_or_compile(bytes, digest))?;
        // `read_or_compile` always yields a component or an error.
        let (component, source) = found.ok_or_else(|| LoadError::Invalid("the compile produced nothing (a bug in Wharf)".into()))?;
        Ok((component, source != Source::Compiled))
    }

    /// Deserializes from the disk cache, else compiles and writes the disk cache.
    fn read_or_compile(&self, bytes: &[u8], digest: &Digest) -> Result<Option<Loaded<Component>>, LoadError> {
        if let Some(loaded) = self.read_cache(digest) {
            return Ok(Some(loaded));
        }
        // Refuse what cannot run before paying for a compile.
        check_component(bytes)?;
        let component = Component::new(&self.inner.engine, bytes).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        self.write_cache(digest, &component);
        Ok(Some(Loaded { bytes: code_size(&component), value: component, source: Source::Compiled }))
    }

    /// The components this host holds compiled in memory, in digest order.
    pub fn compiled_digests(&self) -> Vec<Digest> {
        let mut digests = self.inner.compiled.digests();
        digests.sort_by_key(Digest::hex);
        digests
    }

    /// Drops the in-memory compiled code of `digest` (its disk cache stays).
    pub fn forget(&self, digest: &Digest) {
        self.inner.compiled.remove(digest);
    }

    /// Drops every compiled copy of `digest`, in memory and on disk: for a
    /// component that was refused (an upload that failed its checks after
    /// compiling), so nothing of it stays behind.
    pub fn discard(&self, digest: &Digest) {
        self.inner.compiled.remove(digest);
        if let Some(path) = self.cache_path(digest) {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::debug!(path = %path.display(), "discarded the compiled code of a refused component"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %path.display(), "cannot remove the compiled code of a refused component: {e}"),
            }
        }
    }

    /// Whether compiled code of `digest` is kept, in memory or on disk.
    pub fn holds_compiled(&self, digest: &Digest) -> bool {
        self.inner.compiled.contains(digest) || self.cache_path(digest).is_some_and(|p| p.exists())
    }

    fn cache_path(&self, digest: &Digest) -> Option<PathBuf> {
        let dir = self.inner.cache_dir.as_ref()?;
        Some(dir.join(format!("{}-{}.cwasm", digest.hex(), self.inner.engine_hash)))
    }

    fn read_cache(&self, digest: &Digest) -> Option<Loaded<Component>> {
        let path = self.cache_path(digest)?;
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot read compiled cache entry: {e}");
                return None;
            }
        };
        // Read into memory rather than mapped: a mapped cache file truncated
        // underneath a running host (by an operator, say) would crash it.
        // SAFETY: the file name carries the digest of the source bytes and the
        // engine's compatibility hash, and only this module writes into the
        // cache directory (atomically, via rename), so the file holds code this
        // engine compiled. wasmtime also checks the header and engine settings.
        #[allow(unsafe_code, reason = "loading our own compiled code from the cache is unsafe by wasmtime's API")]
        let loaded = unsafe { Component::deserialize(&self.inner.engine, &bytes) };
        match loaded {
            Ok(component) => Some(Loaded { bytes: code_size(&component), value: component, source: Source::Disk }),
            Err(e) => {
                tracing::warn!(path = %path.display(), "discarding unusable compiled cache entry: {e:#}");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    fn write_cache(&self, digest: &Digest, component: &Component) {
        let Some(path) = self.cache_path(digest) else { return };
        let result = component.serialize().map_err(|e| e.to_string()).and_then(|bytes| {
            write_atomically(&path, &bytes).map_err(|e| e.to_string())
        });
        if let Err(e) = result {
            // The cache only saves time; a failure to write it is not fatal.
            tracing::warn!(path = %path.display(), "could not cache compiled component: {e}");
        }
    }

    fn explain_link_error(&self, component: &Component, error: wasmtime::Error) -> LoadError {
        let detail = format!("{error:#}");
        let import = component
            .component_type()
            .imports(&self.inner.engine)
            .map(|(name, _)| name.to_string())
            .find(|name| detail.contains(name.as_str()))
            .unwrap_or_else(|| "an interface".to_string());
        LoadError::UnsupportedImport { import, detail }
    }
}

/// The packages whose interfaces a host links (any version: the link check
/// after compiling holds components to the versions it provides).
const PROVIDED_PACKAGES: &[&str] =
    &["wasi:io", "wasi:clocks", "wasi:random", "wasi:filesystem", "wasi:sockets", "wasi:cli", "wasi:http", "wasi:keyvalue", "wasi:config", "wasmcloud:messaging"];

/// The checks of [`Runtime::load`] that need no compiling, in its order:
/// wasm magic, component rather than core module, validation, every
/// top-level import from a package hosts provide, and the
/// `wasi:http/incoming-handler` or `wasmcloud:messaging/handler` export. What only the compiled component
/// shows (the exact types) is checked when it is linked.
pub fn check_component(bytes: &[u8]) -> Result<(), LoadError> {
    check_preamble(bytes)?;
    wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::default())
        .validate_all(bytes)
        .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
    let (imports, exports) = top_level(bytes)?;
    if let Some(import) = imports.iter().find(|name| !PROVIDED_PACKAGES.iter().any(|package| name.strip_prefix(package).is_some_and(|rest| rest.starts_with('/')))) {
        return Err(LoadError::UnsupportedImport { import: import.clone(), detail: "no host links that package".into() });
    }
    check_world(&exports)
}

/// A component must export the HTTP handler, the message handler or the
/// command entry point (any of them; which one a service or a job needs is
/// checked where it is deployed).
fn check_world(exports: &[String]) -> Result<(), LoadError> {
    if exports.iter().any(|name| export_matches(name) || name == wharf_proto::trigger::MESSAGE_HANDLER_EXPORT || wharf_proto::job::is_run_export(name)) {
        return Ok(());
    }
    let exports = if exports.is_empty() { "none".to_string() } else { exports.join(", ") };
    Err(LoadError::WrongWorld { exports })
}

/// The top-level imports and exports of a component, by name.
fn top_level(bytes: &[u8]) -> Result<(Vec<String>, Vec<String>), LoadError> {
    let (mut imports, mut exports) = (Vec::new(), Vec::new());
    // Nested modules and components open with a version and close with an
    // end; only the outermost component's imports and exports matter.
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| LoadError::Invalid(format!("{e:#}")))? {
            wasmparser::Payload::Version { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth = depth.saturating_sub(1),
            wasmparser::Payload::ComponentImportSection(reader) if depth == 1 => {
                for import in reader {
                    imports.push(import.map_err(|e| LoadError::Invalid(format!("{e:#}")))?.name.name.to_string());
                }
            }
            wasmparser::Payload::ComponentExportSection(reader) if depth == 1 => {
                for export in reader {
                    exports.push(export.map_err(|e| LoadError::Invalid(format!("{e:#}")))?.name.name.to_string());
                }
            }
            _ => {}
        }
    }
    Ok((imports, exports))
}

fn export_matches(name: &str) -> bool {
    name == HTTP_HANDLER_EXPORT || name.strip_prefix(HTTP_HANDLER_EXPORT).is_some_and(|rest| rest.starts_with("@0.2"))
}

/// The first eight bytes tell garbage, core modules and components apart
/// before wasmtime sees them, so each gets its own clear error.
fn check_preamble(bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        let shown: String = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
        let found = if bytes.is_empty() { "an empty file".to_string() } else { format!("bytes {shown}") };
        return Err(LoadError::NotWasm { found });
    }
    // Core modules have layer 0 (bytes 6..8), components layer 1.
    if bytes[6..8] == [0, 0] {
        return Err(LoadError::CoreModule);
    }
    Ok(())
}

/// Bytes of compiled code (and its metadata) a component holds in memory.
fn code_size(component: &Component) -> u64 {
    let range = component.image_range();
    u64::try_from(range.end.addr().saturating_sub(range.start.addr())).unwrap_or(u64::MAX)
}

/// Writes through a temporary file of a unique name in the same directory,
/// then renames it into place, so a reader never sees half a file and two
/// writers (two hosts sharing a cache directory, or a precompile racing a
/// load) never write into the same temporary file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::Builder::new().prefix(".compiling-").suffix(".tmp").tempfile_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path).map(|_| ()).map_err(|e| e.error)
}

fn engine_config(config: &RuntimeConfig) -> Config {
    let max_instances = config.max_instances.max(1);
    let mut pool = PoolingAllocationConfig::default();
    // A Rust wasm32-wasip2 component holds several core instances (the
    // program, the WASI adapter and small shims) and up to two memories.
    pool.total_component_instances(max_instances)
        .total_core_instances(max_instances.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
        .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
        .total_memories(max_instances.saturating_mul(MEMORIES_PER_COMPONENT))
        .max_memories_per_component(MAX_MEMORIES_PER_COMPONENT)
        .total_tables(max_instances.saturating_mul(TABLES_PER_COMPONENT))
        .max_tables_per_component(MAX_TABLES_PER_COMPONENT)
        .total_stacks(max_instances)
        .max_memory_size(usize::try_from(config.max_instance_memory.bytes()).unwrap_or(usize::MAX))
        // Reset what a request dirtied with memset rather than madvise, up
        // to a limit: madvise unmaps pages, and unmapping interrupts every
        // other core (a TLB shootdown), so one tenant's request churn would
        // otherwise slow the requests of all. PAGEMAP_SCAN (Linux 6.7+)
        // finds the dirty pages so only those are reset.
        .linear_memory_keep_resident(KEEP_RESIDENT_MEMORY)
        .table_keep_resident(KEEP_RESIDENT_TABLE)
        .async_stack_keep_resident(KEEP_RESIDENT_STACK)
        .pagemap_scan(wasmtime::Enabled::Auto)
        .decommit_batch_size(DECOMMIT_BATCH);
    let mut wasm = Config::new();
    wasm.wasm_component_model(true)
        .consume_fuel(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    wasm
}

/// Bytes of each linear memory, table and async stack kept resident between
/// instances (reset in place).
const KEEP_RESIDENT_MEMORY: usize = 1 << 20;
const KEEP_RESIDENT_TABLE: usize = 64 << 10;
const KEEP_RESIDENT_STACK: usize = 128 << 10;
/// Decommits are not batched: a batch is flushed by whichever instance
/// fills it, so a tenant's short request would pay for unmapping another
/// tenant's big memories (measured: a 7 ms p99 for hello beside 60 MiB hogs
/// with batches of 16). Unbatched, each instance's teardown is its own.
const DECOMMIT_BATCH: usize = 1;

const CORE_INSTANCES_PER_COMPONENT: u32 = 8;
const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 64;
const MEMORIES_PER_COMPONENT: u32 = 2;
const MAX_MEMORIES_PER_COMPONENT: u32 = 4;
const TABLES_PER_COMPONENT: u32 = 4;
const MAX_TABLES_PER_COMPONENT: u32 = 16;

/// Advances the epoch until the engine is dropped. A plain thread rather than
/// a tokio task, so a busy runtime cannot delay the ticks that bound it.
fn spawn_epoch_ticker(engine: wasmtime::EngineWeak) {
    let spawned = std::thread::Builder::new().name("wharf-epoch".into()).spawn(move || {
        while let Some(engine) = engine.upgrade() {
            engine.increment_epoch();
            drop(engine);
            std::thread::sleep(EPOCH_TICK);
        }
    });
    if let Err(e) = spawned {
        tracing::error!("could not start the epoch ticker; deadlines will not be enforced: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_tells_garbage_core_modules_and_components_apart() {
        assert!(matches!(check_preamble(b""), Err(LoadError::NotWasm { found }) if found == "an empty file"));
        assert!(matches!(check_preamble(b"hello world"), Err(LoadError::NotWasm { found }) if found.starts_with("bytes 68 65")));
        assert!(matches!(check_preamble(b"\0asm\x01\0\0\0"), Err(LoadError::CoreModule)));
        assert!(check_preamble(b"\0asm\x0d\0\x01\0").is_ok());
    }

    #[test]
    fn components_are_checked_without_compiling() {
        assert!(check_component(&wharf_testkit::samples::bytes("hello")).is_ok());
        assert!(check_component(&wharf_testkit::samples::bytes("listener")).is_ok(), "a message handler alone is a world");
        assert_eq!(
            component_exports(&wharf_testkit::samples::bytes("listener")).expect("exports"),
            [wharf_proto::trigger::MESSAGE_HANDLER_EXPORT]
        );
        assert!(matches!(check_component(b"\0asm\x0d\0\x01\0"), Err(LoadError::WrongWorld { exports, .. }) if exports == "none"));
        let foreign = wat::parse_str(r#"(component (import "acme:thing/api@1.0.0" (instance)))"#).expect("wat");
        assert!(matches!(check_component(&foreign), Err(LoadError::UnsupportedImport { import, .. }) if import == "acme:thing/api@1.0.0"));
        assert!(matches!(check_component(b"\0asm\x0d\0\x01\0\xff"), Err(LoadError::Invalid(_))));
    }

    #[test]
    fn export_names_match_any_0_2_version() {
        assert!(export_matches("wasi:http/incoming-handler@0.2.0"));
        assert!(export_matches("wasi:http/incoming-handler@0.2.6"));
        assert!(!export_matches("wasi:http/incoming-handler@0.3.0"));
        assert!(!export_matches("wasi:cli/run@0.2.0"));
    }
}
