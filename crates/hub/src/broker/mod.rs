//! Fan-out behind one trait: a stored notification or a live broadcast reaches every session, on every node.
//!
//! Every publish goes through the broker and comes back to the registry, whether
//! the broker is in-process or shared by several nodes.

mod memory;

pub use memory::MemoryBroker;

use async_trait::async_trait;
use bytestring::ByteString;

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
}
