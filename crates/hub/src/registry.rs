//! The registry actor: the mailbox that brokers, shutdown and diagnostics reach this node's sessions through.
//!
//! The table itself is [`Members`], shared: publishes fan out from the thread that
//! stored them, and every message here is answered from the same table. Sessions join
//! and leave the table directly, each from its own thread (its `started` and `stopped`),
//! so a session's leave is always ordered after its join without a trip through here.

use std::sync::Arc;

use actix::prelude::*;
use bytestring::ByteString;

use crate::ids::{Seq, SessionId, UserId};
use crate::members::{Members, Worker};
use crate::session::Evict;
use crate::session::queue::QueueSender;

/// How the registry reaches one session.
pub struct SessionEntry {
    pub id: SessionId,
    /// The session's bounded outbound queue, drained by its writer.
    pub outbound: QueueSender,
    /// Tells the session actor to close; the registry never knows the concrete session type.
    pub control: Recipient<Evict>,
    /// The worker thread the session and its writer run on.
    pub worker: Worker,
}

/// Messages queued before senders park (they still enqueue, in order).
const MAILBOX_CAPACITY: usize = 1 << 20;

pub struct Registry {
    members: Arc<Members>,
}

impl Registry {
    pub fn new(members: Arc<Members>) -> Self {
        Self { members }
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

impl Handler<Deliver> for Registry {
    type Result = usize;

    /// Fans one notification out to the user's sessions; answers how many took it.
    fn handle(&mut self, msg: Deliver, _: &mut Self::Context) -> usize {
        self.members.deliver(&msg.user, msg.seq, &msg.frame)
    }
}

impl Handler<Broadcast> for Registry {
    type Result = usize;

    /// Fans one live frame out to every session on the node.
    fn handle(&mut self, msg: Broadcast, _: &mut Self::Context) -> usize {
        self.members.broadcast(&msg.frame).0
    }
}

impl Handler<Presence> for Registry {
    type Result = usize;

    fn handle(&mut self, msg: Presence, _: &mut Self::Context) -> usize {
        self.members.presence(&msg.user)
    }
}

impl Handler<CloseAll> for Registry {
    type Result = usize;

    /// Asks every session to close with 1001; they leave as they stop.
    fn handle(&mut self, _: CloseAll, _: &mut Self::Context) -> usize {
        self.members.close_all()
    }
}

impl Handler<Stats> for Registry {
    type Result = RegistryStats;

    fn handle(&mut self, _: Stats, _: &mut Self::Context) -> RegistryStats {
        self.members.stats()
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;
    use crate::ids::SessionIds;
    use crate::metrics::Metrics;
    use crate::session::EvictReason;
    use crate::session::Outbound;

    /// Stands in for a session actor: reports every `Evict` it is sent.
    struct Control(mpsc::UnboundedSender<EvictReason>);

    impl Actor for Control {
        type Context = Context<Self>;
    }

    impl Handler<Evict> for Control {
        type Result = ();

        fn handle(&mut self, msg: Evict, _: &mut Self::Context) {
            let _ = self.0.send(msg.reason);
        }
    }

    /// The far side of one registered session: its outbound queue and its evictions.
    struct Peer {
        id: SessionId,
        queue: crate::session::queue::QueueReceiver,
        evictions: mpsc::UnboundedReceiver<EvictReason>,
    }

    impl Peer {
        /// The seqs waiting in the queue, in order; panics on anything else.
        fn drain_seqs(&mut self) -> Vec<Seq> {
            let mut seqs = Vec::new();
            loop {
                match self.queue.try_recv() {
                    Ok(Outbound::Notification { seq, .. }) => seqs.push(seq),
                    Ok(other) => panic!("{}: unexpected {other:?}", self.id),
                    Err(_) => return seqs,
                }
            }
        }

        /// The frames waiting in the queue, in order; panics on anything else.
        fn drain_frames(&mut self) -> Vec<ByteString> {
            let mut frames = Vec::new();
            loop {
                match self.queue.try_recv() {
                    Ok(Outbound::Frame(frame)) => frames.push(frame),
                    Ok(other) => panic!("{}: unexpected {other:?}", self.id),
                    Err(_) => return frames,
                }
            }
        }

        /// The eviction the registry sent, waiting briefly since it travels through a mailbox.
        async fn eviction(&mut self) -> Option<EvictReason> {
            tokio::time::timeout(std::time::Duration::from_secs(5), self.evictions.recv())
                .await
                .ok()
                .flatten()
        }

        /// For a session the registry dropped: its control actor stops once the
        /// entry is gone, so `None` here proves no (further) eviction was ever sent.
        async fn assert_dropped_without_eviction(&mut self) {
            assert_eq!(self.eviction().await, None, "{} was evicted", self.id);
        }

        /// For a session still registered: no eviction so far.
        fn assert_not_evicted(&mut self) {
            if let Ok(reason) = self.evictions.try_recv() {
                panic!("{} was evicted: {reason:?}", self.id);
            }
        }
    }

    struct Fixture {
        registry: Addr<Registry>,
        /// Joined and left directly, as sessions do.
        members: Arc<Members>,
        metrics: Arc<Metrics>,
        ids: SessionIds,
    }

    impl Fixture {
        fn new() -> Self {
            let metrics = Arc::new(Metrics::default());
            let members = Arc::new(Members::new(Arc::clone(&metrics)));
            Self {
                registry: Registry::new(Arc::clone(&members)).start(),
                members,
                metrics,
                ids: SessionIds::default(),
            }
        }

        /// Registers a new session of `user` whose queue holds `capacity` items.
        async fn join(&self, user: &str, capacity: usize) -> Peer {
            let (outbound, queue) = crate::session::queue::channel(capacity);
            let (evicted, evictions) = mpsc::unbounded_channel();
            let control = Control(evicted).start().recipient();
            let id = self.ids.next();
            self.members.join(
                user_id(user),
                SessionEntry {
                    id,
                    outbound,
                    control,
                    worker: Worker::current(),
                },
            );
            Peer {
                id,
                queue,
                evictions,
            }
        }

        async fn leave(&self, user: &str, session: SessionId) {
            self.members.leave(&user_id(user), session);
        }

        async fn deliver(&self, user: &str, seq: Seq) -> usize {
            self.registry
                .send(Deliver {
                    user: user_id(user),
                    seq,
                    frame: format!("{{\"seq\":{seq}}}").into(),
                })
                .await
                .unwrap()
        }

        async fn broadcast(&self, frame: &'static str) -> usize {
            self.registry
                .send(Broadcast {
                    frame: frame.into(),
                })
                .await
                .unwrap()
        }

        async fn presence(&self, user: &str) -> usize {
            self.registry
                .send(Presence {
                    user: user_id(user),
                })
                .await
                .unwrap()
        }

        async fn stats(&self) -> RegistryStats {
            self.registry.send(Stats).await.unwrap()
        }

        /// The value of an unlabelled gauge in the metrics text.
        fn gauge(&self, name: &str) -> i64 {
            let text = self.metrics.encode();
            text.lines()
                .find_map(|line| line.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
                .parse()
                .unwrap()
        }
    }

    fn user_id(raw: &str) -> UserId {
        UserId::parse(raw).unwrap()
    }

    #[actix::test]
    async fn every_session_of_a_user_gets_its_notifications_and_no_one_else() {
        let hub = Fixture::new();
        let mut alice = vec![
            hub.join("alice", 8).await,
            hub.join("alice", 8).await,
            hub.join("alice", 8).await,
        ];
        let mut bob = hub.join("bob", 8).await;

        assert_eq!(hub.deliver("alice", 1).await, 3);
        assert_eq!(hub.deliver("alice", 2).await, 3);
        assert_eq!(hub.deliver("bob", 1).await, 1);
        assert_eq!(hub.deliver("carol", 1).await, 0, "nobody holds carol");

        for peer in &mut alice {
            assert_eq!(peer.drain_seqs(), [1, 2]);
            peer.assert_not_evicted();
        }
        assert_eq!(bob.drain_seqs(), [1]);
        assert_eq!(hub.presence("alice").await, 3);
        assert_eq!(hub.presence("bob").await, 1);
        assert_eq!(hub.presence("carol").await, 0);
        assert_eq!(
            hub.stats().await,
            RegistryStats {
                users: 2,
                sessions: 4
            }
        );
        assert_eq!(hub.gauge("herald_sessions"), 4);
        assert_eq!(hub.gauge("herald_users_online"), 2);
    }

    #[actix::test]
    async fn a_stale_leave_does_not_evict_a_newer_session() {
        let hub = Fixture::new();
        let old = hub.join("alice", 8).await;
        hub.leave("alice", old.id).await;
        let mut new = hub.join("alice", 8).await;
        // The old socket's cleanup arrives late, twice, and once under the wrong user.
        hub.leave("alice", old.id).await;
        hub.leave("alice", old.id).await;
        hub.leave("bob", new.id).await;

        assert_eq!(hub.presence("alice").await, 1);
        assert_eq!(hub.deliver("alice", 1).await, 1);
        assert_eq!(new.drain_seqs(), [1]);
        assert_eq!(
            hub.stats().await,
            RegistryStats {
                users: 1,
                sessions: 1
            }
        );
    }

    #[actix::test]
    async fn a_full_queue_evicts_only_that_session() {
        let hub = Fixture::new();
        let mut slow = hub.join("alice", 2).await;
        let mut fast = hub.join("alice", 64).await;

        // Nobody drains `slow`: two fit, the third overflows it.
        assert_eq!(hub.deliver("alice", 1).await, 2);
        assert_eq!(hub.deliver("alice", 2).await, 2);
        assert_eq!(hub.deliver("alice", 3).await, 1);

        assert_eq!(slow.eviction().await, Some(EvictReason::SlowConsumer));
        assert_eq!(hub.presence("alice").await, 1, "the entry is removed");
        assert_eq!(hub.deliver("alice", 4).await, 1);
        assert_eq!(slow.drain_seqs(), [1, 2], "nothing more after eviction");
        assert_eq!(fast.drain_seqs(), [1, 2, 3, 4]);
        fast.assert_not_evicted();
        slow.assert_dropped_without_eviction().await; // exactly one Evict
        assert_eq!(hub.gauge("herald_sessions"), 1);
    }

    #[actix::test]
    async fn a_full_queue_of_a_users_last_session_takes_the_user_offline() {
        let hub = Fixture::new();
        let mut slow = hub.join("alice", 1).await;
        let _bob = hub.join("bob", 8).await;
        assert_eq!(hub.deliver("alice", 1).await, 1);
        assert_eq!(hub.deliver("alice", 2).await, 0);
        assert_eq!(slow.eviction().await, Some(EvictReason::SlowConsumer));
        assert_eq!(
            hub.stats().await,
            RegistryStats {
                users: 1,
                sessions: 1
            }
        );
        assert_eq!(hub.gauge("herald_users_online"), 1);
        // Its own Leave arrives after the eviction and changes nothing.
        hub.leave("alice", slow.id).await;
        assert_eq!(hub.stats().await.sessions, 1);
    }

    #[actix::test]
    async fn a_session_whose_queue_closed_is_dropped_without_an_eviction() {
        let hub = Fixture::new();
        let mut gone = hub.join("alice", 8).await;
        gone.queue.close();
        assert_eq!(hub.deliver("alice", 1).await, 0);
        assert_eq!(hub.presence("alice").await, 0);
        assert_eq!(hub.stats().await.sessions, 0);
        gone.assert_dropped_without_eviction().await;
    }

    #[actix::test]
    async fn the_registry_is_empty_after_every_session_leaves() {
        let hub = Fixture::new();
        let mut peers = Vec::new();
        for user in ["alice", "bob", "carol"] {
            for _ in 0..3 {
                peers.push((user, hub.join(user, 8).await));
            }
        }
        assert_eq!(
            hub.stats().await,
            RegistryStats {
                users: 3,
                sessions: 9
            }
        );
        for (user, peer) in &peers {
            hub.leave(user, peer.id).await;
        }
        assert_eq!(
            hub.stats().await,
            RegistryStats {
                users: 0,
                sessions: 0
            }
        );
        assert_eq!(hub.members.closed(), 9);
        hub.leave("alice", peers[0].1.id).await;
        assert_eq!(hub.members.closed(), 9, "a session closes once");
        for user in ["alice", "bob", "carol"] {
            assert_eq!(hub.presence(user).await, 0);
            assert_eq!(hub.deliver(user, 1).await, 0);
        }
        assert_eq!(hub.broadcast("{}").await, 0);
        assert_eq!(hub.gauge("herald_sessions"), 0);
        assert_eq!(hub.gauge("herald_users_online"), 0);
    }

    #[actix::test]
    async fn broadcast_reaches_every_session_and_counts_them() {
        let hub = Fixture::new();
        let mut peers = vec![
            hub.join("alice", 8).await,
            hub.join("alice", 8).await,
            hub.join("bob", 8).await,
            hub.join("carol", 8).await,
            hub.join("carol", 8).await,
        ];
        let mut slow = hub.join("dave", 1).await;

        assert_eq!(hub.broadcast("one").await, 6);
        assert_eq!(hub.broadcast("two").await, 5, "dave's queue is full");
        assert_eq!(slow.eviction().await, Some(EvictReason::SlowConsumer));
        for peer in &mut peers {
            assert_eq!(peer.drain_frames(), ["one", "two"]);
            peer.assert_not_evicted();
        }
        assert_eq!(slow.drain_frames(), ["one"]);
        slow.assert_dropped_without_eviction().await;
        assert_eq!(
            hub.stats().await,
            RegistryStats {
                users: 3,
                sessions: 5
            }
        );
        assert_eq!(hub.presence("dave").await, 0);
        assert!(
            hub.metrics
                .encode()
                .contains("herald_notifications_delivered_total 11\n"),
            "the registry counts the frames it handed over: 6 + 5"
        );
    }

    #[actix::test]
    async fn close_all_asks_every_session_to_shut_down() {
        let hub = Fixture::new();
        let mut peers = vec![
            hub.join("alice", 8).await,
            hub.join("alice", 8).await,
            hub.join("bob", 8).await,
        ];
        assert_eq!(hub.registry.send(CloseAll).await.unwrap(), 3);
        for peer in &mut peers {
            assert_eq!(peer.eviction().await, Some(EvictReason::Shutdown));
        }
        // Sessions leave as they stop; until then they are still counted.
        for peer in &peers {
            hub.leave(
                if peer.id == peers[2].id {
                    "bob"
                } else {
                    "alice"
                },
                peer.id,
            )
            .await;
        }
        assert_eq!(hub.stats().await.sessions, 0);
    }
}
