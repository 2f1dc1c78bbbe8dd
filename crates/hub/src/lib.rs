//! Herald's actor core: who is connected, what each user is owed, and getting it to them.
//!
//! No HTTP here: the gateway crate checks and upgrades a request, then hands the bare
//! socket to [`Hub::open_session`].
//!
//! # Layout
//!
//! - [`ids`]: typed ids (`UserId`, `SessionId`, `Seq`).
//! - [`protocol`]: the frames on the wire and the close codes.
//! - [`config`]: the hub's validated tunables.
//! - [`registry`]: the registry actor: brokers, shutdown and diagnostics reach the sessions through its mailbox.
//! - [`members`]: the sharded user → sessions table every publish fans out from; sessions join and leave it directly.
//! - [`session`]: one actor per WebSocket (heartbeat, inbound, eviction) and its ordered writer.
//! - [`transport`]: a WebSocket after its handshake: frames in and out of the bare socket.
//! - [`store`]: durable per-user history behind the `Store` trait (SQLite by default, or Redis).
//! - [`broker`]: fan-out behind the `Broker` trait (in-process by default, or Redis pub/sub).
//! - [`cluster`]: what the Redis engine's store and broker share (keys, node id, bounded calls).
//! - [`hub`]: the façade the gateway calls to publish, read state and open sessions.
//! - [`metrics`]: Prometheus counters and gauges.

pub mod broker;
pub mod cluster;
pub mod config;
pub mod hub;
pub mod ids;
pub mod members;
pub mod metrics;
pub mod protocol;
pub mod registry;
pub mod session;
pub mod store;
#[cfg(test)]
mod test_redis;
pub mod transport;

pub use config::{Heartbeat, HubConfig, Retention};
pub use hub::{Broadcasted, History, Hub, HubError, Publish, Published};
pub use ids::{InvalidUserId, Seq, SessionId, UserId};
pub use transport::Upgraded;
