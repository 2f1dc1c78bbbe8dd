//! Fan-out behind one trait: a stored notification or a live broadcast reaches every session, on every node.
//!
//! Every publish goes through the broker and comes back to the registry, whether
//! the broker is in-process or shared by several nodes.

mod memory;
mod redis;

pub use memory::MemoryBroker;
pub use redis::RedisBroker;

use async_trait::async_trait;
use bytestring::ByteString;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use crate::ids::UserId;
use crate::store::Notification;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Hands a stored notification to every session of its user; answers how many took it.
    async fn publish(&self, notification: &Notification) -> Result<usize, BrokerError>;

    /// Hands a live frame to every session; answers how many took it.
    async fn broadcast(&self, frame: ByteString) -> Result<usize, BrokerError>;

    /// Sessions `user` holds on every node.
    async fn presence(&self, user: &UserId) -> Result<usize, BrokerError>;

    /// A session of `user` is joining this node. Counted at once (so a later
    /// [`Broker::leave`] always balances it); the future resolves once this node
    /// receives the user's notifications, which must be before the session reads its head.
    fn join(&self, _user: &UserId) -> BoxFuture<'static, Result<(), BrokerError>> {
        futures_util::future::ready(Ok(())).boxed()
    }

    /// A session that called [`Broker::join`] ended.
    fn leave(&self, _user: &UserId) {}
}
