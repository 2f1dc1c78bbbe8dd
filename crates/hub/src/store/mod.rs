//! Per-user history behind one trait: seq assignment, replay, idempotency, retention.

#[cfg(test)]
pub(crate) mod conformance;
mod journal;
mod memory;
mod pending;
mod positions;
mod redis;
mod spare;
mod sqlite;

pub use memory::MemoryStore;
pub use redis::RedisStore;
pub use sqlite::SqliteStore;

use async_trait::async_trait;
use bytestring::ByteString;
use serde_json::value::RawValue;

use crate::ids::{Seq, UserId};

/// Milliseconds since the Unix epoch: the clock of `ts_ms` and of retention by age.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A notification before the store has given it a seq.
#[derive(Debug, Clone)]
pub struct Draft {
    pub id: String,
    pub event: Option<String>,
    pub data: Box<RawValue>,
    /// RFC 3339, as it appears in the frame.
    pub ts: String,
    /// Milliseconds since the Unix epoch, for retention by age.
    pub ts_ms: i64,
    pub idempotency_key: Option<String>,
}

impl Draft {
    /// The notification's frame once the store has given it `seq`.
    pub fn frame(&self, seq: Seq) -> ByteString {
        crate::protocol::notification_frame(
            &self.id,
            seq,
            self.event.as_deref(),
            &self.data,
            &self.ts,
        )
    }
}

/// A stored notification, its frame encoded once for every session and for history.
#[derive(Debug, Clone)]
pub struct Notification {
    pub user: UserId,
    pub id: String,
    pub seq: Seq,
    pub frame: ByteString,
}

/// What a publish answered the first time; repeated for the same idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub id: String,
    pub seq: Seq,
    pub delivered: usize,
}

/// The outcome of [`Store::append`].
#[derive(Debug, Clone)]
pub enum Appended {
    New(Notification),
    /// The idempotency key was seen within retention: nothing was stored.
    Duplicate(Receipt),
}

/// A user's stored range: `first_seq..=last_seq`; empty when `first_seq > last_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub first_seq: Seq,
    pub last_seq: Seq,
}

/// One entry of a user's history.
#[derive(Debug, Clone)]
pub struct Stored {
    pub seq: Seq,
    pub frame: ByteString,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("store failed: {0}")]
    Backend(String),
    #[error("store is closed")]
    Closed,
}

/// Durable history. Every implementation passes `conformance::run_all`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Assigns the user's next seq and stores the notification durably, or
    /// answers the first receipt if its idempotency key was already used.
    async fn append(&self, user: &UserId, draft: Draft) -> Result<Appended, StoreError>;

    /// Up to `limit` notifications with seq > `after`, oldest first, within retention.
    async fn read(
        &self,
        user: &UserId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Stored>, StoreError>;

    /// The user's stored range.
    async fn head(&self, user: &UserId) -> Result<Head, StoreError>;

    /// Remembers how many sessions the first publish with this key reached.
    async fn record_delivered(
        &self,
        user: &UserId,
        key: &str,
        delivered: usize,
    ) -> Result<(), StoreError>;

    /// Finishes pending writes and releases the store.
    async fn close(&self) -> Result<(), StoreError>;
}
