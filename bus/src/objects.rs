//! Object buckets: named blobs of any size (component artifacts), whole-object put and get.

use std::sync::Arc;

use bytes::Bytes;

use crate::error::ObjectError;
use crate::{local, nats, subject};

/// A handle to one object bucket; cheap to clone.
///
/// Objects are not limited by [`Bus::max_payload`](crate::Bus::max_payload):
/// over NATS the object store splits them into chunks.
#[derive(Clone)]
pub struct Objects {
    inner: ObjectsInner,
}

/// async-nats' object store handle carries a copy of its stream's info (over a KiB), hence the `Arc`.
#[derive(Clone)]
enum ObjectsInner {
    Nats(Arc<nats::NatsObjects>),
    Local(local::LocalObjects),
    /// Reads a data broker makes for this process (see `nats/data.rs`): no writes.
    Brokered(Arc<nats::BrokeredObjects>),
}

impl Objects {
    pub(crate) fn nats(objects: nats::NatsObjects) -> Objects {
        Objects {
            inner: ObjectsInner::Nats(Arc::new(objects)),
        }
    }

    pub(crate) fn brokered(objects: nats::BrokeredObjects) -> Objects {
        Objects {
            inner: ObjectsInner::Brokered(Arc::new(objects)),
        }
    }

    pub(crate) fn local(objects: local::LocalObjects) -> Objects {
        Objects {
            inner: ObjectsInner::Local(objects),
        }
    }

    /// Stores `data` as object `name` (any non-empty string), replacing any object of that name.
    pub async fn put(&self, name: &str, data: Bytes) -> Result<(), ObjectError> {
        subject::check_object_name(name).map_err(ObjectError::InvalidName)?;
        match &self.inner {
            ObjectsInner::Nats(objects) => objects.put(name, data).await,
            ObjectsInner::Local(objects) => objects.put(name, data).await,
            ObjectsInner::Brokered(_) => Err(read_only(name)),
        }
    }

    /// The content of object `name`, or `None` if there is no such object.
    pub async fn get(&self, name: &str) -> Result<Option<Bytes>, ObjectError> {
        subject::check_object_name(name).map_err(ObjectError::InvalidName)?;
        match &self.inner {
            ObjectsInner::Nats(objects) => objects.get(name).await,
            ObjectsInner::Local(objects) => objects.get(name).await,
            ObjectsInner::Brokered(objects) => objects.get(name).await,
        }
    }

    /// Whether object `name` exists, without fetching it.
    pub async fn exists(&self, name: &str) -> Result<bool, ObjectError> {
        subject::check_object_name(name).map_err(ObjectError::InvalidName)?;
        match &self.inner {
            ObjectsInner::Nats(objects) => objects.exists(name).await,
            ObjectsInner::Local(objects) => objects.exists(name).await,
            ObjectsInner::Brokered(objects) => objects.exists(name).await,
        }
    }

    /// Deletes object `name`; deleting an object that does not exist is not an error.
    pub async fn delete(&self, name: &str) -> Result<(), ObjectError> {
        subject::check_object_name(name).map_err(ObjectError::InvalidName)?;
        match &self.inner {
            ObjectsInner::Nats(objects) => objects.delete(name).await,
            ObjectsInner::Local(objects) => objects.delete(name).await,
            ObjectsInner::Brokered(_) => Err(read_only(name)),
        }
    }

    /// The names of all objects, sorted.
    pub async fn list(&self) -> Result<Vec<String>, ObjectError> {
        let mut names = match &self.inner {
            ObjectsInner::Nats(objects) => objects.list().await?,
            ObjectsInner::Local(objects) => objects.list().await?,
            ObjectsInner::Brokered(_) => return Err(read_only("*")),
        };
        names.sort_unstable();
        Ok(names)
    }
}

/// A write or listing through a data broker, which makes reads only.
fn read_only(name: &str) -> ObjectError {
    ObjectError::Unavailable { bucket: String::new(), source: format!("object {name}: a bucket opened through the data broker is read-only").into() }
}
