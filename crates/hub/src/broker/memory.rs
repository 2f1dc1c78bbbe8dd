//! The one-node broker: fan-out straight into this process's table of sessions.

use std::sync::Arc;

use async_trait::async_trait;
use bytestring::ByteString;

use super::{Broker, BrokerError};
use crate::ids::UserId;
use crate::members::Members;
use crate::store::Notification;

pub struct MemoryBroker {
    members: Arc<Members>,
}

impl MemoryBroker {
    pub fn new(members: Arc<Members>) -> Self {
        Self { members }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, n: &Notification) -> Result<usize, BrokerError> {
        Ok(self.members.deliver(&n.user, n.seq, &n.frame))
    }

    async fn broadcast(&self, frame: ByteString) -> Result<usize, BrokerError> {
        let (delivered, backlog) = self.members.broadcast(&frame);
        backlog.wait_if_behind(delivered).await;
        Ok(delivered)
    }

    async fn presence(&self, user: &UserId) -> Result<usize, BrokerError> {
        Ok(self.members.presence(user))
    }
}
