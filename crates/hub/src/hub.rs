//! The hub: what the gateway calls to publish, read state and open sessions on this node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::broker::{Broker, BrokerError, MemoryBroker};
use crate::config::HubConfig;
use crate::ids::{Seq, SessionId, SessionIds, UserId};
use crate::members::Members;
use crate::metrics::Metrics;
use crate::protocol;
use crate::registry::{CloseAll, Registry, RegistryStats, Stats};
use crate::session::Session;
use crate::store::{Appended, Draft, Receipt, Store, StoreError, Stored};
use crate::transport::Upgraded;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the hub is shutting down")]
    ShuttingDown,
}

/// A notification as a publisher hands it in.
#[derive(Debug, Clone)]
pub struct Publish {
    pub event: Option<String>,
    pub data: Box<RawValue>,
    pub idempotency_key: Option<String>,
}

/// The answer to one user's publish.
#[derive(Debug, Clone)]
pub struct Published {
    pub user: UserId,
    pub receipt: Receipt,
    /// `true` when the idempotency key was seen before and nothing new was sent.
    pub duplicate: bool,
}

/// The answer to a broadcast.
#[derive(Debug, Clone)]
pub struct Broadcasted {
    pub id: String,
    pub delivered: usize,
}

/// A page of a user's history.
#[derive(Debug, Clone)]
pub struct History {
    pub last_seq: Seq,
    pub notifications: Vec<Stored>,
}

struct Core {
    config: HubConfig,
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    registry: Addr<Registry>,
    /// The table sessions join and leave directly, on their own thread.
    members: Arc<Members>,
    metrics: Arc<Metrics>,
    session_ids: SessionIds,
}

/// Cheap to clone; every HTTP worker holds one.
#[derive(Clone)]
pub struct Hub(Arc<Core>);

impl Hub {
    /// Starts the registry on the current arbiter with the one-node broker.
    /// Must run inside an actix system.
    pub fn start(config: HubConfig, store: Arc<dyn Store>) -> Self {
        let Ok(hub) = Self::start_inner::<std::convert::Infallible>(config, store, |_, members| {
            Ok(Arc::new(MemoryBroker::new(members)))
        });
        hub
    }

    /// Starts the registry with the broker `make_broker` builds around it (a
    /// shared engine's broker delivers into this node's registry).
    /// Must run inside an actix system.
    pub fn start_with<E>(
        config: HubConfig,
        store: Arc<dyn Store>,
        make_broker: impl FnOnce(Addr<Registry>) -> Result<Arc<dyn Broker>, E>,
    ) -> Result<Self, E> {
        Self::start_inner(config, store, |registry, _| make_broker(registry))
    }

    fn start_inner<E>(
        config: HubConfig,
        store: Arc<dyn Store>,
        make_broker: impl FnOnce(Addr<Registry>, Arc<Members>) -> Result<Arc<dyn Broker>, E>,
    ) -> Result<Self, E> {
        let metrics = Arc::new(Metrics::default());
        let members = Arc::new(Members::new(Arc::clone(&metrics)));
        let registry = Registry::new(Arc::clone(&members)).start();
        let broker = make_broker(registry.clone(), Arc::clone(&members))?;
        Ok(Self(Arc::new(Core {
            config,
            store,
            broker,
            registry,
            members,
            metrics,
            session_ids: SessionIds::default(),
        })))
    }

    pub fn config(&self) -> HubConfig {
        self.0.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    pub(crate) fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.0.store)
    }

    pub(crate) fn broker(&self) -> &Arc<dyn Broker> {
        &self.0.broker
    }

    pub(crate) fn members(&self) -> &Members {
        &self.0.members
    }

    /// Stores a notification durably, then fans it out; answers after both.
    ///
    /// Runs detached from the caller: a publisher that hangs up mid-request
    /// cannot leave a stored notification unannounced.
    pub async fn publish(&self, user: UserId, publish: Publish) -> Result<Published, HubError> {
        let hub = self.clone();
        actix_rt::spawn(async move { hub.publish_now(user, publish).await })
            .await
            .map_err(|_| HubError::ShuttingDown)?
    }

    async fn publish_now(&self, user: UserId, publish: Publish) -> Result<Published, HubError> {
        let (ts, ts_ms) = now();
        let key = publish.idempotency_key.clone();
        let draft = Draft {
            id: new_id(),
            event: publish.event,
            data: publish.data,
            ts,
            ts_ms,
            idempotency_key: publish.idempotency_key,
        };
        let notification = match self.0.store.append(&user, draft).await? {
            Appended::Duplicate(receipt) => {
                return Ok(Published {
                    user,
                    receipt,
                    duplicate: true,
                });
            }
            Appended::New(n) => n,
        };
        self.0.metrics.published();
        // Stored means accepted: a broker failure only costs the live push, and
        // sessions catch up from the store when they resume.
        let delivered = match self.0.broker.publish(&notification).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(user = %user, seq = notification.seq, error = %e, "stored but not fanned out");
                0
            }
        };
        if let Some(key) = key {
            self.0
                .store
                .record_delivered(&user, &key, delivered)
                .await?;
        }
        let receipt = Receipt {
            id: notification.id,
            seq: notification.seq,
            delivered,
        };
        Ok(Published {
            user,
            receipt,
            duplicate: false,
        })
    }

    /// Publishes to several users at once; each gets its own seq.
    pub async fn publish_many(
        &self,
        users: Vec<UserId>,
        publish: Publish,
    ) -> Result<Vec<Published>, HubError> {
        let all = users
            .into_iter()
            .map(|user| self.publish(user, publish.clone()));
        futures_util::future::join_all(all)
            .await
            .into_iter()
            .collect()
    }

    /// Sends a live frame to every connected session; nothing is stored.
    pub async fn broadcast(
        &self,
        event: Option<String>,
        data: Box<RawValue>,
    ) -> Result<Broadcasted, HubError> {
        let (ts, _) = now();
        let id = new_id();
        let frame = protocol::broadcast_frame(&id, event.as_deref(), &data, &ts);
        let delivered = self.0.broker.broadcast(frame).await?;
        self.0.metrics.broadcast();
        Ok(Broadcasted { id, delivered })
    }

    pub async fn history(
        &self,
        user: &UserId,
        since: Seq,
        limit: usize,
    ) -> Result<History, HubError> {
        // Page first, head second: `last_seq` is then never below a seq on the page.
        let notifications = self.0.store.read(user, since, limit).await?;
        let head = self.0.store.head(user).await?;
        Ok(History {
            last_seq: head.last_seq,
            notifications,
        })
    }

    /// Sessions the user holds, on every node the broker knows of.
    pub async fn presence(&self, user: &UserId) -> Result<usize, HubError> {
        Ok(self.0.broker.presence(user).await?)
    }

    /// Users online and sessions open on this node.
    pub async fn stats(&self) -> Result<RegistryStats, HubError> {
        self.0
            .registry
            .send(Stats)
            .await
            .map_err(|_| HubError::ShuttingDown)
    }

    /// Sessions that closed on this node since it started, however they ended.
    pub fn sessions_closed(&self) -> u64 {
        self.0.members.closed()
    }

    /// Starts a session actor for an upgraded socket. Call on the worker that owns the socket.
    pub fn open_session(&self, user: UserId, since: Option<Seq>, upgraded: Upgraded) -> SessionId {
        let id = self.0.session_ids.next();
        Session::start(self.clone(), id, user, since, upgraded);
        id
    }

    /// Closes every session with 1001 and waits (up to `grace`) until they are gone.
    pub async fn close_sessions(&self, grace: Duration) {
        let Ok(open) = self.0.registry.send(CloseAll).await else {
            return;
        };
        tracing::info!(sessions = open, "closing sessions");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            match self.stats().await {
                Ok(RegistryStats { sessions: 0, .. }) | Err(_) => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Flushes and releases the store. Call after the HTTP server stopped.
    pub async fn close_store(&self) -> Result<(), HubError> {
        Ok(self.0.store.close().await?)
    }
}

fn now() -> (String, i64) {
    let now = OffsetDateTime::now_utc();
    let ms = (now.unix_timestamp_nanos() / 1_000_000) as i64;
    // Millisecond precision keeps `ts` short and sortable.
    let now = now
        .replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap_or(now);
    (now.format(&Rfc3339).unwrap_or_default(), ms)
}

/// Time-ordered unique ids (UUIDv7), so ids sort the way notifications were published.
fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
