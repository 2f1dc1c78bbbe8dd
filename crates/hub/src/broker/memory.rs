//! The one-node broker: fan-out straight into this process's registry.

use actix::Addr;
use async_trait::async_trait;
use bytestring::ByteString;

use super::{Broker, BrokerError};
use crate::ids::UserId;
use crate::registry::{Broadcast, Deliver, Presence, Registry};
use crate::store::Notification;

pub struct MemoryBroker {
    registry: Addr<Registry>,
}

impl MemoryBroker {
    pub fn new(registry: Addr<Registry>) -> Self {
        Self { registry }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, n: &Notification) -> Result<usize, BrokerError> {
        let deliver = Deliver {
            user: n.user.clone(),
            seq: n.seq,
            frame: n.frame.clone(),
        };
        self.registry
            .send(deliver)
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))
    }

    async fn broadcast(&self, frame: ByteString) -> Result<usize, BrokerError> {
        self.registry
            .send(Broadcast { frame })
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))
    }

    async fn presence(&self, user: &UserId) -> Result<usize, BrokerError> {
        self.registry
            .send(Presence { user: user.clone() })
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))
    }
}
