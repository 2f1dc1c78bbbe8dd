//! The registry actor: which sessions each user holds on this node, and fan-out to them.
//!
//! Fan-out never waits on a session: it `try_send`s into the session's bounded
//! outbound queue, and a full queue evicts that session as a slow consumer.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use bytestring::ByteString;
use tokio::sync::mpsc::{self, error::TrySendError};

use crate::ids::{Seq, SessionId, UserId};
use crate::metrics::Metrics;
use crate::session::{Evict, EvictReason, Outbound};

/// How the registry reaches one session.
pub struct SessionEntry {
    pub id: SessionId,
    /// The session's bounded outbound queue, drained by its writer.
    pub outbound: mpsc::Sender<Outbound>,
    /// Tells the session actor to close; the registry never knows the concrete session type.
    pub control: Recipient<Evict>,
}

/// Messages queued before senders park (they still enqueue, in order).
const MAILBOX_CAPACITY: usize = 1 << 20;

pub struct Registry {
    users: HashMap<UserId, Vec<SessionEntry>>,
    sessions: usize,
    metrics: Arc<Metrics>,
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            users: HashMap::new(),
            sessions: 0,
            metrics,
        }
    }

    fn publish_presence(&self) {
        self.metrics.set_presence(self.sessions, self.users.len());
    }

    /// Hands `item` to every session in `entries`; evicts the ones whose queue is full.
    fn fan_out(
        entries: &mut Vec<SessionEntry>,
        item: impl Fn() -> Outbound,
        user: Option<&UserId>,
    ) -> (usize, usize) {
        let before = entries.len();
        let mut handed = 0;
        entries.retain(|entry| match entry.outbound.try_send(item()) {
            Ok(()) => {
                handed += 1;
                true
            }
            Err(TrySendError::Full(_)) => {
                tracing::info!(user = user.map(UserId::as_str), session = %entry.id, "slow consumer evicted");
                let _ = entry.control.try_send(Evict { reason: EvictReason::SlowConsumer });
                false
            }
            Err(TrySendError::Closed(_)) => false,
        });
        (handed, before - entries.len())
    }
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Publishers are bounded upstream (HTTP workers, store commits); parking them
        // here would only add latency to every publish. Not usize::MAX: actix adds to
        // the capacity when an address is cloned, which would overflow.
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
    }
}

/// A session is ready to receive its user's notifications.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Join {
    pub user: UserId,
    pub entry: SessionEntry,
}

/// A session ended. Removes it only if the id matches, so a late leave never evicts a newer session.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub user: UserId,
    pub session: SessionId,
}

/// A stored notification for every session of `user` on this node.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Deliver {
    pub user: UserId,
    pub seq: Seq,
    pub frame: ByteString,
}

/// A live frame for every session on this node.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Broadcast {
    pub frame: ByteString,
}

/// How many sessions `user` holds on this node.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Presence {
    pub user: UserId,
}

/// Closes every session (server shutdown); answers how many there were.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CloseAll;

/// Users and sessions held, for tests and diagnostics.
#[derive(Message)]
#[rtype(result = "RegistryStats")]
pub struct Stats;

/// Users online and sessions open on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, MessageResponse)]
pub struct RegistryStats {
    pub users: usize,
    pub sessions: usize,
}

impl Handler<Join> for Registry {
    type Result = ();

    /// Adds the session beside any others the user already has.
    fn handle(&mut self, msg: Join, _: &mut Self::Context) {
        self.users.entry(msg.user).or_default().push(msg.entry);
        self.sessions += 1;
        self.publish_presence();
    }
}

impl Handler<Leave> for Registry {
    type Result = ();

    /// Removes exactly that session, if it is still there.
    fn handle(&mut self, msg: Leave, _: &mut Self::Context) {
        let Some(entries) = self.users.get_mut(&msg.user) else {
            return;
        };
        let before = entries.len();
        entries.retain(|e| e.id != msg.session);
        self.sessions -= before - entries.len();
        if entries.is_empty() {
            self.users.remove(&msg.user);
        }
        self.publish_presence();
    }
}

impl Handler<Deliver> for Registry {
    type Result = usize;

    /// Fans one notification out to the user's sessions; answers how many took it.
    fn handle(&mut self, msg: Deliver, _: &mut Self::Context) -> usize {
        let Some(entries) = self.users.get_mut(&msg.user) else {
            return 0;
        };
        let (seq, frame) = (msg.seq, msg.frame);
        let (handed, dropped) = Self::fan_out(
            entries,
            || Outbound::Notification {
                seq,
                frame: frame.clone(),
            },
            Some(&msg.user),
        );
        if entries.is_empty() {
            self.users.remove(&msg.user);
        }
        if dropped > 0 {
            self.sessions -= dropped;
            self.publish_presence();
        }
        handed
    }
}

impl Handler<Broadcast> for Registry {
    type Result = usize;

    /// Fans one live frame out to every session on the node.
    fn handle(&mut self, msg: Broadcast, _: &mut Self::Context) -> usize {
        let mut total = 0;
        let mut dropped_total = 0;
        for (user, entries) in self.users.iter_mut() {
            let (handed, dropped) =
                Self::fan_out(entries, || Outbound::Frame(msg.frame.clone()), Some(user));
            total += handed;
            dropped_total += dropped;
        }
        if dropped_total > 0 {
            self.users.retain(|_, entries| !entries.is_empty());
            self.sessions -= dropped_total;
            self.publish_presence();
        }
        total
    }
}

impl Handler<Presence> for Registry {
    type Result = usize;

    fn handle(&mut self, msg: Presence, _: &mut Self::Context) -> usize {
        self.users.get(&msg.user).map_or(0, Vec::len)
    }
}

impl Handler<CloseAll> for Registry {
    type Result = usize;

    /// Asks every session to close with 1001; they leave as they stop.
    fn handle(&mut self, _: CloseAll, _: &mut Self::Context) -> usize {
        for entry in self.users.values().flatten() {
            let _ = entry.control.try_send(Evict {
                reason: EvictReason::Shutdown,
            });
        }
        self.sessions
    }
}

impl Handler<Stats> for Registry {
    type Result = RegistryStats;

    fn handle(&mut self, _: Stats, _: &mut Self::Context) -> RegistryStats {
        RegistryStats {
            users: self.users.len(),
            sessions: self.sessions,
        }
    }
}
