//! What the Redis engine's store and broker share: its settings, key and channel names, the node id, and bounded Redis calls.
//!
//! Several Herald nodes share one Redis. Every key of one user carries the user
//! id in a `{hash tag}`, so a user's keys would stay on one shard of a Redis
//! Cluster; the scripts only ever touch one user's keys (plus the node table).

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::ids::UserId;

/// The Redis engine's tunables (from `engine.*` in the settings).
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// Prepended to every key and channel, so two clusters (or tests) can share one Redis.
    pub prefix: String,
    /// The longest any single Redis call may take before it counts as failed.
    pub timeout: Duration,
    /// A node's sessions count in presence this long after its last heartbeat;
    /// it is also the bound on how long a dead node's sessions linger.
    pub presence_ttl: Duration,
}

impl RedisConfig {
    /// The node refreshes its presence this often: three chances before its entry lapses.
    pub fn presence_heartbeat(&self) -> Duration {
        self.presence_ttl / 3
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RedisCallError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// Runs one Redis call, failing after `limit` instead of waiting for a Redis that is gone.
pub async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, RedisCallError> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(RedisCallError::Timeout(limit)),
    }
}

/// The command connection: multiplexed, reconnecting by itself with backoff.
///
/// Lazy, so a node starts (and answers 503) while Redis is still coming up.
pub fn command_connection(config: &RedisConfig) -> redis::RedisResult<ConnectionManager> {
    let client = redis::Client::open(config.url.as_str())?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.timeout))
        .set_response_timeout(Some(config.timeout))
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_secs(2))
        .set_number_of_retries(2);
    ConnectionManager::new_lazy_with_config(client, manager_config)
}

/// Key and channel names, all under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// The user's last assigned seq (never expires: a seq is never reused).
    pub fn seq(&self, user: &UserId) -> String {
        format!("{}:{{{user}}}:seq", self.prefix)
    }

    /// The user's history: a sorted set scored by seq, members `"<ts_ms> <frame>"`.
    pub fn log(&self, user: &UserId) -> String {
        format!("{}:{{{user}}}:log", self.prefix)
    }

    /// One idempotency key's first receipt (a hash with a TTL of the retention age).
    pub fn idempotency(&self, user: &UserId, key: &str) -> String {
        format!("{}:{{{user}}}:idem:{key}", self.prefix)
    }

    /// Sessions per node of the user: a hash node -> count.
    pub fn presence(&self, user: &UserId) -> String {
        format!("{}:{{{user}}}:presence", self.prefix)
    }

    /// Live nodes: a sorted set node -> expiry (Redis time, ms).
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// Sessions per node in total: a hash node -> count (for a broadcast's `delivered`).
    pub fn node_sessions(&self) -> String {
        format!("{}:node-sessions", self.prefix)
    }

    /// The channel a user's notifications are published on, as `"<seq> <frame>"`.
    pub fn user_channel(&self, user: &UserId) -> String {
        format!("{}:live:{user}", self.prefix)
    }

    /// Answers the user whose channel this is, if it is one.
    pub fn user_of_channel(&self, channel: &str) -> Option<UserId> {
        let rest = channel.strip_prefix(&self.prefix)?.strip_prefix(":live:")?;
        UserId::parse(rest).ok()
    }

    /// The channel every node listens on for broadcasts.
    pub fn broadcast_channel(&self) -> String {
        format!("{}:broadcast", self.prefix)
    }
}

/// This process's name in the cluster: host, pid and a random part, so a restarted node is a new one.
pub fn generate_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "herald".into());
    let random = uuid::Uuid::now_v7().simple().to_string();
    // The tail of a UUIDv7 is its random part.
    let tail = &random[random.len() - 8..];
    format!("{host}-{}-{tail}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_channel_maps_back_to_its_user() {
        let keys = Keys::new("h1");
        let alice = UserId::parse("alice@x.io").unwrap();
        assert_eq!(
            keys.user_of_channel(&keys.user_channel(&alice)),
            Some(alice)
        );
        assert_eq!(keys.user_of_channel(&keys.broadcast_channel()), None);
        assert_eq!(keys.user_of_channel("h2:live:alice"), None);
    }

    #[test]
    fn node_ids_differ_per_call() {
        assert_ne!(generate_node_id(), generate_node_id());
    }
}
