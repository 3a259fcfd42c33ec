//! Converging on the assignment: load the replicas assigned here (read
//! the revision's spec, fetch and compile the component, build the
//! workload, run its readiness check), reload a failed replica when the
//! control plane asks for a new attempt, and stop the rest. A replica that
//! fails reports why and how often; when to retry it, and where, is the
//! control plane's decision, not a timer here.

use super::HostAgent;
use super::replicas::Slot;
use crate::egress::ServiceLink;
use crate::workload::Workload;
use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use wharf_proto::names::{ARTIFACTS_BUCKET, artifact_object};
use wharf_proto::{AssignedReplica, Assignment, Digest, Readiness, ServiceId, ServiceSpec};

/// How long a replica waits for secrets sealed to this host's key before
/// it fails saying why (the control plane seals them again within a pass
/// of reading a heartbeat that announces a new key).
const SEALED_SECRETS_WAIT: Duration = Duration::from_secs(10);

/// How long a host reading secrets itself waits for the secrets bucket to open.
const SECRETS_OPEN_PATIENCE: Duration = Duration::from_secs(10);

impl HostAgent {
    /// A new value of this host's assignment.
    pub(super) fn assignment_changed(&self, value: Option<&[u8]>, revision: u64) {
        let assignment = match value.map(serde_json::from_slice::<Assignment>) {
            None => None,
            Some(Ok(assignment)) => Some(assignment),
            Some(Err(e)) => {
                tracing::error!(revision, "ignoring an unreadable assignment: {e}");
                return;
            }
        };
        if let Some(assignment) = &assignment {
            // Fencing: a deposed leader's late write never undoes its successor's.
            let newest = self.inner.epoch.fetch_max(assignment.epoch, Ordering::SeqCst);
            if assignment.epoch < newest {
                tracing::warn!(
                    epoch = assignment.epoch,
                    newest,
                    "ignoring an assignment from an older leader (epoch {} < {newest})",
                    assignment.epoch
                );
                return;
            }
        }
        // The secrets first: the replicas loaded next (and those waiting for
        // secrets sealed to this host's new key) read them.
        let secrets = assignment.as_ref().and_then(|a| a.secrets.clone()).map(Arc::new);
        self.inner.sealed.send_replace(secrets);
        self.converge(assignment.map(|a| a.replicas).unwrap_or_default());
    }

    /// Makes the replicas match `desired` (see [`super::replicas::ReplicaSet::converge`]).
    pub(super) fn converge(&self, desired: Vec<AssignedReplica>) {
        let converged = self.inner.replicas.converge(&desired);
        if converged.stopped > 0 {
            tracing::info!(host = %self.inner.config.host, "stopping {} replica(s)", converged.stopped);
        }
        self.replicas_changed();
        for assigned in converged.load {
            let agent = self.clone();
            tokio::spawn(async move { agent.load(assigned).await });
        }
    }

    /// Loads one replica and checks it, then marks it ready (or failed),
    /// unless the assignment moved on meanwhile.
    async fn load(&self, assigned: AssignedReplica) {
        let key = assigned.key();
        let spec = match self.inner.directory.revision(&assigned.service, assigned.revision).await {
            Ok(spec) => spec,
            Err(error) => {
                self.settle(&assigned, Slot::Failed(error), None);
                return;
            }
        };
        // The activation replica a wake started here, if it runs this very
        // revision and spec, takes over: its code is loaded already.
        let workload = match self.inner.activations.adopt(&assigned.service, assigned.revision, &spec).await {
            Some(activated) => {
                tracing::debug!(replica = %key, "the activation replica takes over as the assigned replica");
                activated
            }
            None => match self.build_workload(&assigned.service, assigned.revision, &spec).await {
                Ok(workload) => workload,
                Err(error) => {
                    self.settle(&assigned, Slot::Failed(error), Some(spec));
                    return;
                }
            },
        };
        self.publish_logs(key.clone(), &workload);
        if let Some(readiness) = &spec.health.readiness {
            if !self.settle(&assigned, Slot::Probing, Some(spec.clone())) {
                return;
            }
            if let Err(error) = self.probe(&key, assigned.attempt, &workload, readiness, &spec).await {
                self.settle(&assigned, Slot::Failed(error), None);
                return;
            }
        }
        if self.settle(&assigned, Slot::Ready(workload), Some(spec)) {
            tracing::info!(replica = %key, attempt = assigned.attempt, "replica ready");
        }
    }

    /// Records a replica's new state and tells whoever follows.
    fn settle(&self, assigned: &AssignedReplica, slot: Slot, spec: Option<Arc<ServiceSpec>>) -> bool {
        if let Slot::Failed(error) = &slot {
            tracing::warn!(replica = %assigned.key(), attempt = assigned.attempt, "replica failed: {error}");
        }
        let settled = self.inner.replicas.settle(&assigned.key(), assigned.attempt, slot, spec);
        if settled {
            self.replicas_changed();
        }
        settled
    }

    /// The readiness check: `GET path` on a fresh instance, 2xx within the
    /// timeout, tried every `period` until `failure_threshold` in a row fail.
    async fn probe(
        &self,
        key: &wharf_proto::ReplicaKey,
        attempt: u32,
        workload: &Workload,
        readiness: &Readiness,
        spec: &ServiceSpec,
    ) -> Result<(), String> {
        let host = spec.routes.iter().find_map(|r| r.host.clone()).unwrap_or_else(|| "localhost".to_string());
        let mut last = String::new();
        for check in 1..=readiness.failure_threshold {
            if !self.inner.replicas.wants(key, attempt) {
                return Err("no longer assigned".to_string());
            }
            let request = Request::get(readiness.path.as_str())
                .header(http::header::HOST, host.as_str())
                .header(http::header::USER_AGENT, "wharf-readiness")
                .body(http_body_util::Empty::<Bytes>::new().map_err(|never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} }));
            let request = match request {
                Ok(request) => request,
                Err(e) => return Err(format!("readiness check GET {}: not a valid request: {e}", readiness.path)),
            };
            match tokio::time::timeout(readiness.timeout, workload.handle(request)).await {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => {
                    let status = response.status();
                    let why = response.headers().get(crate::workload::ERROR_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
                    last = match why {
                        Some(why) => format!("answered {status} ({why})"),
                        None => format!("answered {status}"),
                    };
                }
                Err(_) => last = format!("did not answer within {}", wharf_proto::units::format_duration(readiness.timeout)),
            }
            if check < readiness.failure_threshold {
                tokio::time::sleep(readiness.period).await;
            }
        }
        Err(format!("readiness check GET {} failed {} time(s) in a row: it {last}", readiness.path, readiness.failure_threshold))
    }

    /// Builds the workload a replica of `service` runs with `spec`: the
    /// component (compiled here before, or fetched and compiled), its
    /// limits, env, config and secrets, volumes and key-value access.
    pub(super) async fn build_workload(&self, service: &ServiceId, revision: u64, spec: &ServiceSpec) -> Result<Workload, String> {
        let component = self.load_component(&spec.component).await?;
        let mut workload = super::workload_spec(service, revision, spec, &self.inner.config.host);
        workload.services = Some(ServiceLink { calls: Arc::new(super::AgentCalls(Arc::downgrade(&self.inner))), namespace: service.namespace.clone() });
        for volume in &spec.volumes {
            let Some(root) = &self.inner.config.volumes_dir else {
                return Err(format!("volume {} needs a data directory, and host {} has none", volume.name, self.inner.config.host));
            };
            let dir = root.join(&service.namespace).join(&service.name).join(&volume.name);
            std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create volume {} at {}: {e}", volume.name, dir.display()))?;
            workload.volumes.push((dir, volume.path.clone()));
        }
        workload.config.0 = spec.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if !spec.secrets.is_empty() {
            let values = match &self.inner.config.seal_key {
                Some(key) => self.sealed_secrets(key, &service.namespace, &spec.secrets).await?,
                None => self.read_secrets(&service.namespace, &spec.secrets).await?,
            };
            workload.config.0.extend(values);
        }
        if !spec.triggers.is_empty() && !component.handles_messages() {
            return Err(format!(
                "the service has triggers, but its component does not export `{}`",
                wharf_proto::trigger::MESSAGE_HANDLER_EXPORT
            ));
        }
        if spec.triggers.is_empty() && !component.handles_http() {
            return Err(format!(
                "the component exports no `{}`, and the service has no triggers for its message handler",
                crate::runtime::HTTP_HANDLER_EXPORT
            ));
        }
        workload.messaging = Some(crate::messaging::MessagingAccess::new(self.inner.bus.clone(), &service.namespace, &service.to_string()));
        workload.keyvalue =
            Some(crate::keyvalue::KeyValueAccess::new(self.inner.bus.clone(), &service.namespace, &service.to_string(), spec.keyvalue.iter().cloned()));
        Workload::new(&self.inner.runtime, component, workload, &self.inner.metrics).map_err(|e| e.to_string())
    }

    /// The secrets `names` of `namespace`, from this host's assignment,
    /// opened with this host's own key. Secrets sealed to another key (this
    /// host restarted with a new one), or not yet sealed (a replica started
    /// for held requests before its assignment), are waited for a while:
    /// the control plane seals them again when it reads this host's
    /// heartbeat.
    async fn sealed_secrets(&self, key: &wharf_proto::sealed::HostKey, namespace: &str, names: &[String]) -> Result<Vec<(String, String)>, String> {
        let host = &self.inner.config.host;
        let mine = key.public().to_string();
        let mut updates = self.inner.sealed.subscribe();
        let deadline = tokio::time::Instant::now() + SEALED_SECRETS_WAIT;
        loop {
            let why = {
                let current = updates.borrow_and_update();
                match current.as_deref() {
                    None => format!(
                        "the control plane sent host {host} no secrets sealed to its key {mine} (its assignment carries none: a scheduler older than this host, or one that has not read its heartbeat yet)"
                    ),
                    Some(sealed) if sealed.to != mine => format!(
                        "the secrets in host {host}'s assignment are sealed to key {}, not to its key {mine} (the host restarted with a new key?), and the control plane had not sealed them again",
                        sealed.to
                    ),
                    Some(sealed) => {
                        let mut values = Vec::with_capacity(names.len());
                        let mut missing = None;
                        for name in names {
                            let secret = wharf_proto::names::secret_key(namespace, name);
                            let Some(text) = sealed.values.get(&secret) else {
                                missing = Some(name);
                                break;
                            };
                            let bytes = hex::decode(text).map_err(|_| format!("secret {name} in host {host}'s assignment is not hex"))?;
                            let value = key.open(&secret, &bytes).map_err(|e| format!("cannot open secret {name} on host {host}: {e}"))?;
                            values.push((name.clone(), String::from_utf8_lossy(&value).into_owned()));
                        }
                        match missing {
                            None => return Ok(values),
                            Some(name) => format!(
                                "secret {name} is granted to the service but is not in host {host}'s assignment: it does not exist in namespace {namespace} (create it with `wharf secret set {name} ...`), or the control plane could not read it"
                            ),
                        }
                    }
                }
            };
            match tokio::time::timeout_at(deadline, updates.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(why),
            }
        }
    }

    /// The secrets `names` of `namespace`, read from the secrets bucket and
    /// opened with the control plane's key: for a host without a sealing
    /// key of its own (`wharf up`, one process on an in-process bus).
    async fn read_secrets(&self, namespace: &str, names: &[String]) -> Result<Vec<(String, String)>, String> {
        let host = &self.inner.config.host;
        let unreadable = |name: &str, e: &dyn std::fmt::Display| {
            format!(
                "cannot read secret {name} from the secrets bucket: {e} (host {host} announces no sealing key of its own, so it reads secrets itself; \
                 a host given --secret-key-file does that, and the shipped per-host NATS identities may not read the bucket: \
                 run it without --secret-key-file to receive secrets sealed to its own key)"
            )
        };
        let first = names.first().map_or("", String::as_str);
        // Bounded: under an identity that may not even open the bucket, each
        // refused JetStream request goes unanswered until its timeout.
        // Itself, not through the data broker: the broker serves hosts
        // nothing of the secrets bucket, and this host holds the key to it.
        let secrets = match tokio::time::timeout(SECRETS_OPEN_PATIENCE, self.inner.bus.kv_itself(wharf_proto::names::SECRETS_BUCKET)).await {
            Ok(Ok(secrets)) => secrets,
            Ok(Err(e)) => return Err(unreadable(first, &e)),
            Err(_) => return Err(unreadable(first, &format!("the bucket did not open within {SECRETS_OPEN_PATIENCE:?}"))),
        };
        let mut values = Vec::with_capacity(names.len());
        for name in names {
            let key = wharf_proto::names::secret_key(namespace, name);
            match secrets.get(&key).await {
                Ok(Some(entry)) => {
                    let value = wharf_proto::sealed::open(self.inner.config.secret_key.as_ref(), &key, &entry.value)
                        .map_err(|e| format!("cannot open secret {name} on host {host}: {e}"))?;
                    values.push((name.clone(), String::from_utf8_lossy(&value).into_owned()));
                }
                Ok(None) => {
                    return Err(format!(
                        "secret {name} is granted to the service but does not exist in namespace {namespace}; create it with `wharf secret set {name} ...`"
                    ));
                }
                Err(e) => return Err(unreadable(name, &e)),
            }
        }
        Ok(values)
    }

    /// The component `digest`, compiled here before, or fetched and compiled.
    pub(super) async fn load_component(&self, digest: &Digest) -> Result<crate::runtime::LoadedComponent, String> {
        tracing::debug!(%digest, "loading a component's code");
        let runtime = self.inner.runtime.clone();
        let cached = {
            let digest = digest.clone();
            tokio::task::spawn_blocking(move || runtime.load_compiled(&digest)).await.map_err(|e| format!("the load task failed: {e}"))?
        };
        match cached {
            Some(loaded) => loaded.map_err(|e| e.to_string()),
            None => {
                let bytes = self.fetch_artifact(digest).await?;
                let runtime = self.inner.runtime.clone();
                let expected = digest.clone();
                tokio::task::spawn_blocking(move || runtime.load(&bytes, Some(&expected)))
                    .await
                    .map_err(|e| format!("the compile task failed: {e}"))?
                    .map_err(|e| e.to_string())
            }
        }
    }

    async fn fetch_artifact(&self, digest: &Digest) -> Result<Vec<u8>, String> {
        let objects = self.inner.bus.objects(ARTIFACTS_BUCKET).await.map_err(|e| format!("cannot open the artifact store: {e}"))?;
        // The store may be briefly unreachable (NATS restarting): retry a few times.
        let mut last = String::new();
        for attempt in 0..5u32 {
            match objects.get(&artifact_object(digest)).await {
                Ok(Some(bytes)) => return Ok(bytes.to_vec()),
                Ok(None) => return Err(format!("component {digest} is not in the artifact store")),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt + 1))).await;
        }
        Err(format!("cannot fetch component {digest}: {last}"))
    }

    /// Compiles a service's component into the disk cache in the
    /// background (one at a time), so that if a replica lands here later,
    /// after a failover say, it starts without compiling.
    pub(super) fn precompile(&self, digest: Digest) {
        let agent = self.clone();
        tokio::spawn(async move {
            let _turn = agent.inner.precompiling.lock().await;
            if agent.inner.runtime.has_compiled(&digest) {
                return;
            }
            let bytes = match agent.fetch_artifact(&digest).await {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::debug!(%digest, "not precompiled: {e}");
                    return;
                }
            };
            let runtime = agent.inner.runtime.clone();
            let result = tokio::task::spawn_blocking(move || runtime.precompile(&bytes, &digest)).await;
            if let Ok(Err(e)) = result {
                tracing::debug!("precompile failed: {e}");
            }
        });
    }
}
