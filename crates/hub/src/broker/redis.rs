//! The shared broker: per-user Redis channels for the users this node holds, one broadcast channel, and cluster presence.
//!
//! The store's append script PUBLISHes each notification on its user's channel,
//! so `publish` here only counts the user's sessions across the cluster. This
//! node SUBSCRIBEs to a user's channel when its first local session of that user
//! joins (the join waits for Redis to confirm, so the subscription is in place
//! before the session reads its head) and UNSUBSCRIBEs when the last one leaves.
//!
//! The pubsub connection is this module's own (a `ConnectionManager` cannot
//! carry RESP2 subscriptions): when it drops, the subscriber reconnects with
//! backoff, subscribes again to every user held, and hands each user's latest
//! stored notification to the local registry. A session whose cursor is behind
//! that seq sees a gap and its writer fills it from the store: live sessions
//! catch up without being closed.
//!
//! Presence: each node writes its session count per user into a per-user hash
//! (node -> count) and refreshes its own expiry in a node table every
//! `presence_ttl / 3`. Counts of a node whose expiry passed are ignored and
//! deleted, so a dead node's sessions stop counting within `presence_ttl`.

mod presence;
mod subscriber;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix::Addr;
use async_trait::async_trait;
use bytestring::ByteString;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redis::Script;
use redis::aio::ConnectionManager;
use tokio::sync::{Notify, mpsc, oneshot};

use super::{Broker, BrokerError};
use crate::cluster::{Keys, RedisConfig, bounded};
use crate::ids::UserId;
use crate::registry::Registry;
use crate::store::Notification;

/// KEYS: a hash node -> count, the node table. Sums the counts of live nodes; forgets dead ones.
const COUNT_LIVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fields = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #fields, 2 do
  local expiry = redis.call('ZSCORE', KEYS[2], fields[i])
  if expiry and tonumber(expiry) > now then
    total = total + tonumber(fields[i + 1])
  else
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
return total
";

/// Sessions this node holds, per user: what subscriptions and presence follow.
#[derive(Default)]
struct Local {
    sessions: HashMap<UserId, usize>,
    /// Users whose count changed since presence was last written.
    dirty: HashSet<UserId>,
}

/// What the broker, the subscriber task and the presence task share.
struct Shared {
    node: String,
    keys: Keys,
    config: RedisConfig,
    conn: ConnectionManager,
    local: Mutex<Local>,
    presence_changed: Notify,
    count_live: Script,
}

impl Shared {
    fn local(&self) -> MutexGuard<'_, Local> {
        // A panic while holding this lock cannot leave the counts half-updated.
        self.local
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn holds(&self, user: &UserId) -> bool {
        self.local().sessions.contains_key(user)
    }

    fn held_users(&self) -> Vec<UserId> {
        self.local().sessions.keys().cloned().collect()
    }

    /// Sums a node -> count hash over the live nodes.
    async fn count_live(&self, hash: String) -> Result<usize, BrokerError> {
        let mut invocation = self.count_live.prepare_invoke();
        invocation.key(hash).key(self.keys.nodes());
        let mut conn = self.conn.clone();
        bounded(self.config.timeout, invocation.invoke_async(&mut conn))
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))
    }
}

/// A subscriber request, in the order sessions joined and left.
enum Subscription {
    /// A session of this user joined; answer once the node receives the user's channel.
    Join(UserId, oneshot::Sender<Result<(), String>>),
    /// The user's last session on this node left.
    Leave(UserId),
}

/// [`Broker`] over Redis pub/sub, shared by every node. Pairs with `RedisStore`,
/// whose append script publishes.
pub struct RedisBroker {
    shared: Arc<Shared>,
    subscriptions: mpsc::UnboundedSender<Subscription>,
}

impl RedisBroker {
    /// Starts the subscriber and presence tasks for node `node`, sending commands
    /// over `conn` (the store's). Must run inside an actix system.
    pub fn start(
        config: &RedisConfig,
        conn: ConnectionManager,
        node: String,
        registry: Addr<Registry>,
    ) -> Result<Self, BrokerError> {
        let unavailable = |e: redis::RedisError| BrokerError::Unavailable(e.to_string());
        let client = redis::Client::open(config.url.as_str()).map_err(unavailable)?;
        let shared = Arc::new(Shared {
            node,
            keys: Keys::new(&config.prefix),
            config: config.clone(),
            conn,
            local: Mutex::default(),
            presence_changed: Notify::new(),
            count_live: Script::new(COUNT_LIVE),
        });
        let (subscriptions, requests) = mpsc::unbounded_channel();
        tracing::info!(node = %shared.node, prefix = %config.prefix, "redis engine started");
        actix_rt::spawn(presence::run(Arc::downgrade(&shared)));
        actix_rt::spawn(subscriber::run(
            Arc::clone(&shared),
            client,
            requests,
            registry,
        ));
        Ok(Self {
            shared,
            subscriptions,
        })
    }

    /// This node's id in the cluster.
    pub fn node(&self) -> &str {
        &self.shared.node
    }
}

#[async_trait]
impl Broker for RedisBroker {
    /// The append script already published; `delivered` is the user's cluster presence now.
    async fn publish(&self, n: &Notification) -> Result<usize, BrokerError> {
        self.shared
            .count_live(self.shared.keys.presence(&n.user))
            .await
    }

    async fn broadcast(&self, frame: ByteString) -> Result<usize, BrokerError> {
        let mut conn = self.shared.conn.clone();
        let _: i64 = bounded(
            self.shared.config.timeout,
            redis::cmd("PUBLISH")
                .arg(self.shared.keys.broadcast_channel())
                .arg(&frame[..])
                .query_async(&mut conn),
        )
        .await
        .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        // Published means sent: failing now would make the publisher retry a broadcast
        // that every node is already delivering (it has no idempotency key).
        match self
            .shared
            .count_live(self.shared.keys.node_sessions())
            .await
        {
            Ok(n) => Ok(n),
            Err(e) => {
                tracing::warn!(error = %e, "broadcast sent; its delivered count is unknown (reported as 0)");
                Ok(0)
            }
        }
    }

    async fn presence(&self, user: &UserId) -> Result<usize, BrokerError> {
        self.shared
            .count_live(self.shared.keys.presence(user))
            .await
    }

    fn join(&self, user: &UserId) -> BoxFuture<'static, Result<(), BrokerError>> {
        let (ack, acked) = oneshot::channel();
        {
            let mut local = self.shared.local();
            *local.sessions.entry(user.clone()).or_default() += 1;
            local.dirty.insert(user.clone());
            // Sent under the lock so the subscriber sees joins and leaves in count order.
            let _ = self
                .subscriptions
                .send(Subscription::Join(user.clone(), ack));
        }
        self.shared.presence_changed.notify_one();
        // The subscriber may be busy reconnecting; a session does not wait longer than this.
        let limit = self.shared.config.timeout * 2;
        async move {
            match tokio::time::timeout(limit, acked).await {
                Ok(Ok(Ok(()))) => Ok(()),
                Ok(Ok(Err(reason))) => Err(BrokerError::Unavailable(reason)),
                Ok(Err(_)) => Err(BrokerError::Unavailable("the subscriber stopped".into())),
                Err(_) => Err(BrokerError::Unavailable(format!(
                    "no subscription within {limit:?}"
                ))),
            }
        }
        .boxed()
    }

    fn leave(&self, user: &UserId) {
        {
            let mut local = self.shared.local();
            let Some(count) = local.sessions.get_mut(user) else {
                return;
            };
            *count -= 1;
            if *count == 0 {
                local.sessions.remove(user);
                let _ = self.subscriptions.send(Subscription::Leave(user.clone()));
            }
            local.dirty.insert(user.clone());
        }
        self.shared.presence_changed.notify_one();
    }
}

/// Backoff between reconnect attempts: doubling from `MIN_BACKOFF` up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use actix::Actor;

    use super::*;
    use crate::metrics::Metrics;
    use crate::test_redis::TestRedis;

    #[actix::test]
    async fn a_join_resolves_once_subscribed_and_counts_in_presence() {
        let redis = TestRedis::start();
        let config = redis.config("b");
        let members = Arc::new(crate::members::Members::new(Arc::new(Metrics::default())));
        let registry = Registry::new(members).start();
        let conn = crate::cluster::command_connection(&config).unwrap();
        let broker = RedisBroker::start(&config, conn, "n1".into(), registry).unwrap();
        let alice = UserId::parse("alice").unwrap();
        let client = redis::Client::open(config.url.as_str()).unwrap();
        let mut probe = client.get_multiplexed_async_connection().await.unwrap();
        let channel = Keys::new(&config.prefix).user_channel(&alice);
        let mut subscribers = async || -> i64 {
            let (_, n): (String, i64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async(&mut probe)
                .await
                .unwrap();
            n
        };
        broker.join(&alice).await.expect("joined");
        assert_eq!(
            subscribers().await,
            1,
            "subscribed before the join resolves"
        );
        broker.join(&alice).await.expect("joined again");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while broker.presence(&alice).await.unwrap() != 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "presence never reached 2"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        broker.leave(&alice);
        broker.leave(&alice);
        while broker.presence(&alice).await.unwrap() != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "presence never dropped to 0"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        while subscribers().await != 0 {
            assert!(std::time::Instant::now() < deadline, "never unsubscribed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
