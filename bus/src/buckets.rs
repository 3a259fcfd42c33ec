//! How large buckets may grow, and how a caller says so: per-bucket [`BucketOptions`] and per-bus [`StorageLimits`].
//!
//! Every bucket has a size limit of its own, so what fills one (a tenant's
//! data, say) cannot take the storage another needs (the control plane's
//! state): keep the two in separate buckets and give each its limit. The
//! bus does not know which bucket is which; its caller does, and opens each
//! with the options that fit it (`Bus::kv_with`), or with the bus's default
//! for its own state (`Bus::kv`).

/// The settings of one KV bucket or object store.
///
/// Over NATS this is the JetStream stream's `max_bytes`; in-process the same
/// accounting is kept in the embedded store. A write that would take the
/// bucket past its limit fails with `KvError::BucketFull` or
/// `ObjectError::BucketFull` and changes nothing; deleting keys makes room
/// again. A write that does not grow the bucket (a value replaced by one no
/// larger) is allowed even past the limit, as after the limit was lowered
/// below what the bucket holds: lowering it deletes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BucketOptions {
    /// The most bytes the bucket may hold, counting keys, values and each
    /// entry's bookkeeping (some 30 to 100 bytes); `None`: no limit.
    pub max_bytes: Option<u64>,
}

impl BucketOptions {
    /// A bucket of at most `max_bytes`.
    pub fn max_bytes(max_bytes: u64) -> BucketOptions {
        BucketOptions {
            max_bytes: Some(max_bytes),
        }
    }
}

/// The size limits a bus gives the buckets it creates, by what they hold.
///
/// Over NATS, JetStream reserves each bucket's limit on every server that
/// holds a copy when the bucket is created, and refuses a bucket it cannot
/// reserve (`KvError::InsufficientStorage`), so the defaults are modest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageLimits {
    /// Each KV bucket of the system's own state, opened with `Bus::kv`.
    pub state: BucketOptions,
    /// Each bucket of users' data; the caller opens those with
    /// `Bus::kv_with(name, limits.data)` (or a limit of its own, e.g. a quota).
    pub data: BucketOptions,
    /// Each object store, opened with `Bus::objects`.
    pub objects: BucketOptions,
}

impl StorageLimits {
    /// Default limit of a state bucket: room for some 50,000 service records of 2 KiB.
    pub const DEFAULT_STATE_BYTES: u64 = 128 * 1024 * 1024;
    /// Default limit of a data bucket.
    pub const DEFAULT_DATA_BYTES: u64 = 64 * 1024 * 1024;
    /// Default limit of an object store: a few dozen large components.
    pub const DEFAULT_OBJECT_BYTES: u64 = 2 * 1024 * 1024 * 1024;
}

impl Default for StorageLimits {
    fn default() -> StorageLimits {
        StorageLimits {
            state: BucketOptions::max_bytes(StorageLimits::DEFAULT_STATE_BYTES),
            data: BucketOptions::max_bytes(StorageLimits::DEFAULT_DATA_BYTES),
            objects: BucketOptions::max_bytes(StorageLimits::DEFAULT_OBJECT_BYTES),
        }
    }
}
