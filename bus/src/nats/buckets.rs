//! Opening, creating and updating the JetStream streams behind KV buckets and object stores.
//!
//! A bucket is created with one copy per server of the cluster, up to 3
//! (or [`NatsOptions::replicas`](super::NatsOptions::replicas)), and a size
//! limit. How many servers there are comes from the `connect_urls` the server
//! advertises in its INFO (every member of its cluster; none when it is not
//! clustered): JetStream's own API does not tell an ordinary account.
//!
//! Opening with options (`Bus::kv_with`) also updates an existing bucket
//! whose settings differ: JetStream changes a stream's copies and size limit
//! in place, keeping its data (a limit below what a bucket holds refuses
//! further writes, and deletes nothing: Wharf's buckets discard new writes,
//! never old data). An update the server refuses is logged, and the bucket
//! is used as it is.

use async_nats::jetstream::context::{CreateStreamError, CreateStreamErrorKind};
use async_nats::jetstream::{self, ErrorCode, kv, object_store, stream::StorageType};

use super::{NatsBus, NatsKv, NatsObjects};
use crate::BucketOptions;
use crate::error::{BucketSettingsError, KvError, ObjectError, describe_bytes};

/// The most copies a bucket gets without being told: a majority survives the loss of one server.
const MAX_AUTOMATIC_REPLICAS: usize = 3;

/// What kind of bucket a stream backs; streams are named `KV_<bucket>` and `OBJ_<bucket>`.
#[derive(Clone, Copy)]
enum Kind {
    Kv,
    Objects,
}

impl Kind {
    fn stream(self, bucket: &str) -> String {
        match self {
            Kind::Kv => format!("KV_{bucket}"),
            Kind::Objects => format!("OBJ_{bucket}"),
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Kv => "KV bucket",
            Kind::Objects => "object bucket",
        }
    }
}

impl NatsBus {
    /// Opens KV bucket `bucket`, creating it with `options` if missing; with
    /// `update`, an existing bucket is brought to `options` and this bus's copies.
    ///
    /// Whatever the reason opening fails, creating either works (JetStream
    /// creates idempotently) or reports the real problem, unless another
    /// process created the bucket meanwhile, with other settings, which a
    /// second opening finds. [`NatsBus::objects`] takes the same steps with
    /// the other store type; one generic function over async closures would
    /// make the callers' futures lose `Send`.
    pub(crate) async fn kv(
        &self,
        bucket: &str,
        options: BucketOptions,
        update: bool,
    ) -> Result<NatsKv, KvError> {
        let store = match self.jetstream.get_key_value(bucket).await {
            Ok(store) => store,
            Err(_) => match self.create_kv(bucket, options).await {
                Ok(created) => return Ok(self.kv_handle(bucket, created)),
                Err(err) => self
                    .jetstream
                    .get_key_value(bucket)
                    .await
                    .map_err(|_| err)?,
            },
        };
        if update {
            self.update(Kind::Kv, bucket, options).await;
        }
        Ok(self.kv_handle(bucket, store))
    }

    /// Opens object bucket `bucket`, as [`NatsBus::kv`] does KV buckets.
    pub(crate) async fn objects(
        &self,
        bucket: &str,
        options: BucketOptions,
        update: bool,
    ) -> Result<NatsObjects, ObjectError> {
        let store = match self.jetstream.get_object_store(bucket).await {
            Ok(store) => store,
            Err(_) => match self.create_objects(bucket, options).await {
                Ok(created) => return Ok(self.objects_handle(bucket, created)),
                Err(err) => self
                    .jetstream
                    .get_object_store(bucket)
                    .await
                    .map_err(|_| err)?,
            },
        };
        if update {
            self.update(Kind::Objects, bucket, options).await;
        }
        Ok(self.objects_handle(bucket, store))
    }

    fn kv_handle(&self, bucket: &str, store: kv::Store) -> NatsKv {
        NatsKv::new(store, bucket, self.client.clone(), self.jetstream.clone(), self.connection.clone(), self.consumers().clone())
    }

    fn objects_handle(&self, bucket: &str, store: object_store::ObjectStore) -> NatsObjects {
        NatsObjects::new(store, bucket, self.jetstream.clone())
    }

    /// How many servers the cluster has: those the server advertises, or
    /// itself alone when it advertises none (it is not clustered).
    pub(crate) fn cluster_size(&self) -> usize {
        cluster_size(&self.client)
    }

    /// The copies a new bucket gets.
    pub(crate) fn replicas_for_new(&self) -> usize {
        replicas_for(&self.client, self.replicas)
    }

    /// The copies an existing bucket with `current` copies should have. Left
    /// to itself the bus only ever adds copies: a server that has not yet
    /// heard of all its peers must not shrink buckets to what it sees.
    fn replicas_for_existing(&self, current: usize) -> usize {
        self.replicas
            .unwrap_or_else(|| current.max(self.cluster_size().min(MAX_AUTOMATIC_REPLICAS)))
    }

    async fn create_kv(&self, bucket: &str, options: BucketOptions) -> Result<kv::Store, KvError> {
        let replicas = self.replicas_for_new();
        self.jetstream
            .create_key_value(kv::Config {
                bucket: bucket.to_owned(),
                // Wharf's state is level-triggered: only the latest value matters.
                history: 1,
                max_value_size: -1,
                max_bytes: stream_max_bytes(options),
                storage: StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(
                |err| match settings_error(&err, bucket, options, replicas) {
                    Some(err) => KvError::Settings(err),
                    None => super::kv::unavailable(bucket, err),
                },
            )
    }

    async fn create_objects(
        &self,
        bucket: &str,
        options: BucketOptions,
    ) -> Result<object_store::ObjectStore, ObjectError> {
        let replicas = self.replicas_for_new();
        self.jetstream
            .create_object_store(object_store::Config {
                bucket: bucket.to_owned(),
                max_bytes: stream_max_bytes(options),
                storage: StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(
                |err| match settings_error(&err, bucket, options, replicas) {
                    Some(err) => ObjectError::Settings(err),
                    None => super::objects::unavailable(bucket, err),
                },
            )
    }

    /// Brings the stream behind `bucket` to `options` and this bus's copies;
    /// logs what changed, or why it could not.
    async fn update(&self, kind: Kind, bucket: &str, options: BucketOptions) {
        let name = kind.stream(bucket);
        let info = match self.jetstream.get_stream(&name).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => info.clone(),
                Err(err) => return warn_unchecked(kind, bucket, &err),
            },
            Err(err) => return warn_unchecked(kind, bucket, &err),
        };
        let mut config = info.config.clone();
        config.num_replicas = self.replicas_for_existing(config.num_replicas);
        config.max_bytes = stream_max_bytes(options);
        if config.num_replicas == info.config.num_replicas
            && config.max_bytes == info.config.max_bytes
        {
            return;
        }
        let (replicas, max_bytes) = (config.num_replicas, config.max_bytes);
        let was = describe_settings(info.config.num_replicas, info.config.max_bytes);
        let now = describe_settings(replicas, max_bytes);
        match self.jetstream.update_stream(config).await {
            Ok(_) => {
                tracing::info!(
                    bucket,
                    "{} `{bucket}` updated from {was} to {now}",
                    kind.noun()
                );
                if let Some(limit) = u64::try_from(max_bytes).ok().filter(|limit| *limit > 0)
                    && info.state.bytes > limit
                {
                    tracing::warn!(
                        bucket,
                        "{} `{bucket}` holds {} bytes, more than its new limit of {}: writes are refused until data is deleted",
                        kind.noun(),
                        info.state.bytes,
                        describe_bytes(limit)
                    );
                }
            }
            Err(err) => {
                let reason = settings_error(&err, bucket, options, replicas)
                    .map_or_else(|| err.to_string(), |err| err.to_string());
                tracing::warn!(
                    bucket,
                    "{} `{bucket}` keeps its settings ({was}) instead of {now}: {reason}",
                    kind.noun()
                );
            }
        }
    }
}

fn warn_unchecked(kind: Kind, bucket: &str, err: &dyn std::error::Error) {
    tracing::warn!(
        bucket,
        "cannot read the settings of {} `{bucket}`, so they are left as they are: {err}",
        kind.noun()
    );
}

/// JetStream's spelling of a size limit: -1 for none.
fn stream_max_bytes(options: BucketOptions) -> i64 {
    options
        .max_bytes
        .map_or(-1, |bytes| i64::try_from(bytes).unwrap_or(i64::MAX))
}

fn describe_settings(replicas: usize, max_bytes: i64) -> String {
    let limit = u64::try_from(max_bytes)
        .ok()
        .filter(|limit| *limit > 0)
        .map_or_else(
            || "no size limit".to_owned(),
            |limit| format!("a limit of {}", describe_bytes(limit)),
        );
    format!(
        "{replicas} cop{} and {limit}",
        if replicas == 1 { "y" } else { "ies" }
    )
}

/// The settings problem behind a failed create or update, if that is what it is.
fn settings_error(
    err: &(dyn std::error::Error + 'static),
    bucket: &str,
    options: BucketOptions,
    replicas: usize,
) -> Option<BucketSettingsError> {
    let code = jetstream_code(err)?;
    let bucket = bucket.to_owned();
    if code == ErrorCode::STORAGE_RESOURCES_EXCEEDED || code == ErrorCode::INSUFFICIENT_RESOURCES {
        Some(BucketSettingsError::InsufficientStorage {
            bucket,
            max_bytes: options.max_bytes,
        })
    } else if code == ErrorCode::CLUSTER_NO_PEERS
        || code == ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED
    {
        Some(BucketSettingsError::TooFewServers { bucket, replicas })
    } else {
        None
    }
}

/// How many servers the cluster `client` is connected to has.
fn cluster_size(client: &async_nats::Client) -> usize {
    let mut urls = client.server_info().connect_urls;
    urls.sort_unstable();
    urls.dedup();
    urls.len().max(1)
}

/// The copies a new bucket or stream gets: `replicas` if set, else one per
/// server of the cluster, up to three.
pub(crate) fn replicas_for(client: &async_nats::Client, replicas: Option<usize>) -> usize {
    replicas.unwrap_or_else(|| cluster_size(client).min(MAX_AUTOMATIC_REPLICAS))
}

/// The JetStream API error code somewhere in `err`'s chain of sources, if any.
///
/// async-nats wraps the server's answer in one or two errors of its own: as
/// the source of an ack error around a publish error, or as the kind of a
/// stream error (creating and updating). The code, not the text, says what
/// the server meant.
pub(crate) fn jetstream_code(err: &(dyn std::error::Error + 'static)) -> Option<ErrorCode> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(jetstream) = err.downcast_ref::<jetstream::Error>() {
            return Some(jetstream.error_code());
        }
        if let Some(stream) = err.downcast_ref::<CreateStreamError>()
            && let CreateStreamErrorKind::JetStream(jetstream) = stream.kind()
        {
            return Some(jetstream.error_code());
        }
        current = err.source();
    }
    None
}
