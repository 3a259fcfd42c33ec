//! The per-request state of one instance: what a wasmtime `Store` holds.

use crate::egress::EgressHooks;
use crate::keyvalue::{KeyValue, KeyValueAccess};
use crate::limits::MemoryLimiter;
use crate::messaging::{Messaging, MessagingAccess};
use crate::logs::{CapturedOutput, LogBuffer, LogStream};
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};
use wharf_proto::ByteSize;

/// What an instance sees of its surroundings through WASI: its command
/// line (jobs), environment and preopened directories (volumes, each at
/// the path the component sees it).
pub(crate) struct Surroundings<'a> {
    pub(crate) args: &'a [String],
    pub(crate) env: &'a [(String, String)],
    pub(crate) volumes: &'a [(std::path::PathBuf, String)],
}

/// Everything one instance may touch. Built fresh for each request and dropped
/// with it, so nothing leaks from one request to the next.
pub(crate) struct InstanceState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: EgressHooks,
    pub(crate) limiter: MemoryLimiter,
    stdout: CapturedOutput,
    stderr: CapturedOutput,
    keyvalue: Option<KeyValueAccess>,
    config: std::sync::Arc<wasmtime_wasi_config::WasiConfigVariables>,
    logs: LogBuffer,
    messaging: Option<MessagingAccess>,
    /// The reply subject of the message this instance handles, if any.
    reply_to: Option<String>,
}

impl InstanceState {
    /// Fails only if a volume's directory cannot be opened.
    pub(crate) fn new(
        seen: Surroundings<'_>,
        memory: ByteSize,
        host_memory: Option<std::sync::Arc<crate::limits::HostMemory>>,
        hooks: EgressHooks,
        keyvalue: Option<KeyValueAccess>,
        config: std::sync::Arc<wasmtime_wasi_config::WasiConfigVariables>,
        logs: &LogBuffer,
    ) -> Result<Self, String> {
        let stdout = logs.stream(LogStream::Stdout);
        let stderr = logs.stream(LogStream::Stderr);
        // No sockets, and no directories but the service's own volumes
        // (capability-based: nothing outside them can be named). The
        // component reaches the outside world only through wasi:http.
        let Surroundings { args, env, volumes } = seen;
        let mut builder = WasiCtx::builder();
        builder.args(args).envs(env).stdout(stdout.clone()).stderr(stderr.clone()).allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
        for (dir, path) in volumes {
            builder
                .preopened_dir(dir, path, wasmtime_wasi::FsPerms::ReadWrite)
                .map_err(|e| format!("cannot open the volume at {} ({}): {e:#}", path, dir.display()))?;
        }
        let wasi = builder.build();
        Ok(InstanceState {
            wasi,
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks,
            limiter: MemoryLimiter::new(memory, host_memory),
            stdout,
            stderr,
            keyvalue,
            config,
            logs: logs.clone(),
            messaging: None,
            reply_to: None,
        })
    }

    /// The `wasi:config` view of this instance.
    pub(crate) fn config(&mut self) -> wasmtime_wasi_config::WasiConfig<'_> {
        wasmtime_wasi_config::WasiConfig::from(&*self.config)
    }

    /// The `wasi:keyvalue` view of this instance.
    pub(crate) fn keyvalue(&mut self) -> KeyValue<'_> {
        KeyValue { access: self.keyvalue.as_ref(), table: &mut self.table, logs: &self.logs }
    }

    /// Gives the instance messaging, and the reply subject of the message it handles.
    pub(crate) fn set_messaging(&mut self, access: Option<MessagingAccess>, reply_to: Option<String>) {
        self.messaging = access;
        self.reply_to = reply_to;
    }

    /// The `wasmcloud:messaging` view of this instance.
    pub(crate) fn messaging(&mut self) -> Messaging<'_> {
        Messaging { access: self.messaging.as_ref(), reply_to: self.reply_to.as_deref(), logs: &self.logs }
    }

    /// Flushes partial log lines once the instance is done.
    pub(crate) fn finish_logs(&self) {
        self.stdout.finish();
        self.stderr.finish();
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for InstanceState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.hooks }
    }
}
