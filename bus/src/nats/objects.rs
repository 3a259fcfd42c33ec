//! Object buckets over the JetStream Object Store.

use async_nats::jetstream::{self, ErrorCode, object_store};
use bytes::Bytes;
use futures::TryStreamExt;

use super::buckets::jetstream_code;
use super::kv::{Attempt, ride_over};
use crate::error::{BackendError, ObjectError};

/// The object store's chunk size (async-nats' default): each chunk is a message of its own.
const CHUNK_SIZE: u64 = 128 * 1024;

/// Bytes of stream bookkeeping per chunk (subject, headers, record), rounded up.
const CHUNK_OVERHEAD: u64 = 128;

/// Bytes of an object's metadata message (name, digest, sizes), rounded up.
const META_OVERHEAD: u64 = 1024;

/// A JetStream object store bucket.
pub(crate) struct NatsObjects {
    store: object_store::ObjectStore,
    bucket: String,
    /// For the stream's size and limit, which the store's handle does not expose.
    jetstream: jetstream::Context,
}

impl NatsObjects {
    pub(crate) fn new(
        store: object_store::ObjectStore,
        bucket: &str,
        jetstream: jetstream::Context,
    ) -> NatsObjects {
        NatsObjects {
            store,
            bucket: bucket.to_owned(),
            jetstream,
        }
    }

    /// Checks for room first: the store writes an object chunk by chunk, and
    /// one refused halfway would leave its first chunks behind, taking room
    /// until the bucket is purged. A new object needs room beside an object
    /// it replaces, whose chunks go only once the new one is complete.
    pub(crate) async fn put(&self, name: &str, data: Bytes) -> Result<(), ObjectError> {
        let size = data.len() as u64;
        let needed = size + size.div_ceil(CHUNK_SIZE) * CHUNK_OVERHEAD + META_OVERHEAD;
        let (stored, max_bytes) = self.usage().await?;
        if let Some(max_bytes) = max_bytes
            && stored.saturating_add(needed) > max_bytes
        {
            return Err(self.full(max_bytes, size));
        }
        let mut reader: &[u8] = &data;
        match self.store.put(name, &mut reader).await {
            Ok(_) => Ok(()),
            // Someone else filled the bucket since the check.
            Err(err) if jetstream_code(&err) == Some(ErrorCode::STREAM_STORE_FAILED) => {
                match self.usage().await {
                    Ok((_, Some(max_bytes))) => Err(self.full(max_bytes, size)),
                    _ => Err(self.unavailable(err)),
                }
            }
            Err(err) => Err(self.unavailable(err)),
        }
    }

    /// How a failed read is answered: on a cluster, tried again (the
    /// loss of a node looks like a timeout or no responders until the
    /// stream elects a leader); on a lone server, at once.
    fn read_failed(&self, err: impl Into<BackendError>) -> Attempt<ObjectError> {
        if self.jetstream.client().server_info().connect_urls.len() > 1 {
            Attempt::Retry(self.unavailable(err))
        } else {
            Attempt::Final(self.unavailable(err))
        }
    }

    /// The bytes the stream holds, and its size limit if it has one.
    async fn usage(&self) -> Result<(u64, Option<u64>), ObjectError> {
        let info = ride_over(&self.bucket, || async {
            let mut stream = self.jetstream.get_stream(format!("OBJ_{}", self.bucket)).await.map_err(|err| self.read_failed(err))?;
            stream.info().await.cloned().map_err(|err| self.read_failed(err))
        })
        .await?;
        let max_bytes = u64::try_from(info.config.max_bytes)
            .ok()
            .filter(|max| *max > 0);
        Ok((info.state.bytes, max_bytes))
    }

    fn full(&self, max_bytes: u64, size: u64) -> ObjectError {
        ObjectError::BucketFull {
            bucket: self.bucket.clone(),
            max_bytes,
            size,
        }
    }

    /// Reads the object's chunks one by one with the stream's message-get
    /// API (the next message on the chunks' subject after the last one
    /// read), not with a consumer: a process that may not make consumers
    /// (a host, see `consumers.rs`) can still read objects.
    pub(crate) async fn get(&self, name: &str) -> Result<Option<Bytes>, ObjectError> {
        ride_over(&self.bucket, || async {
            let info = match self.store.info(name).await {
                Ok(info) if !info.deleted => info,
                Ok(_) => return Ok(None),
                Err(err) if err.kind() == object_store::InfoErrorKind::NotFound => return Ok(None),
                Err(err) => return Err(self.read_failed(err)),
            };
            let subject = format!("$O.{}.C.{}", self.bucket, info.nuid);
            let stream = self.jetstream.get_stream_no_info(format!("OBJ_{}", self.bucket)).await.map_err(|err| self.read_failed(err))?;
            let mut data = Vec::with_capacity(info.size);
            let mut after = 0;
            for _ in 0..info.chunks {
                let chunk = stream.get_first_raw_message_by_subject(&subject, after + 1).await.map_err(|err| self.read_failed(err))?;
                after = chunk.sequence;
                data.extend_from_slice(&chunk.payload);
            }
            if data.len() != info.size {
                return Err(Attempt::Final(self.unavailable(format!("object {name}: read {} bytes of {}", data.len(), info.size))));
            }
            Ok(Some(data.into()))
        })
        .await
    }

    pub(crate) async fn exists(&self, name: &str) -> Result<bool, ObjectError> {
        ride_over(&self.bucket, || async {
            match self.store.info(name).await {
                // A deleted object keeps its metadata, marked deleted.
                Ok(info) => Ok(!info.deleted),
                Err(err) if err.kind() == object_store::InfoErrorKind::NotFound => Ok(false),
                Err(err) => Err(self.read_failed(err)),
            }
        })
        .await
    }

    pub(crate) async fn delete(&self, name: &str) -> Result<(), ObjectError> {
        match self.store.delete(name).await {
            Err(err) if err.kind() != object_store::DeleteErrorKind::NotFound => {
                Err(self.unavailable(err))
            }
            _ => Ok(()),
        }
    }

    pub(crate) async fn list(&self) -> Result<Vec<String>, ObjectError> {
        self.store
            .list()
            .await
            .map_err(|err| self.unavailable(err))?
            .map_ok(|info| info.name)
            .try_collect()
            .await
            .map_err(|err| self.unavailable(err))
    }

    fn unavailable(&self, err: impl Into<BackendError>) -> ObjectError {
        unavailable(&self.bucket, err)
    }
}

pub(crate) fn unavailable(bucket: &str, err: impl Into<BackendError>) -> ObjectError {
    ObjectError::Unavailable {
        bucket: bucket.to_owned(),
        source: err.into(),
    }
}
