//! Which sessions each user holds on this node, in a sharded table that any thread fans out from.
//!
//! A publish hands its frame to the user's sessions on the HTTP worker that stored it,
//! without a hop through an actor. Fan-out never waits on a session: it `try_send`s into
//! the session's bounded outbound queue, and a full queue evicts that session as a slow
//! consumer. A shard's lock is held only for one user's sessions at a time (or, for a
//! broadcast, one shard's), and never across an await.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use actix_rt::{Arbiter, ArbiterHandle};
use bytestring::ByteString;

use crate::ids::{Seq, SessionId, UserId};
use crate::metrics::Metrics;
use crate::registry::{RegistryStats, SessionEntry};
use crate::session::queue::{QueueSender, QueueWaker, TrySendError};
use crate::session::{Evict, EvictReason, Outbound};

/// The worker thread a session runs on, and how to run something there.
#[derive(Clone)]
pub struct Worker {
    thread: ThreadId,
    arbiter: ArbiterHandle,
}

impl Worker {
    /// The worker of the calling thread. Must run on an actix arbiter.
    pub fn current() -> Self {
        Self {
            thread: thread::current().id(),
            arbiter: Arbiter::current(),
        }
    }
}

/// Shards of the table; more than the threads that touch it, so they rarely meet.
const SHARDS: usize = 32;

type Shard = HashMap<UserId, Vec<SessionEntry>>;

pub struct Members {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
    sessions: AtomicUsize,
    users: AtomicUsize,
    /// Sessions that ever closed, however they ended: what whoever frees their memory watches.
    closed: AtomicU64,
    /// Serialises gauge updates so the last one written reads the latest counts.
    gauges: Mutex<()>,
    metrics: Arc<Metrics>,
}

impl Members {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
            sessions: AtomicUsize::new(0),
            users: AtomicUsize::new(0),
            closed: AtomicU64::new(0),
            gauges: Mutex::new(()),
            metrics,
        }
    }

    fn shard(&self, user: &UserId) -> MutexGuard<'_, Shard> {
        let index = self.hasher.hash_one(user) as usize % SHARDS;
        // A panic while holding a shard leaves it consistent (no await, no partial edits
        // that matter), so a poisoned lock is taken over rather than spreading the panic.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish_presence(&self) {
        let _serial = self.gauges.lock();
        self.metrics.set_presence(
            self.sessions.load(Ordering::SeqCst),
            self.users.load(Ordering::SeqCst),
        );
    }

    /// Adds the session beside any others the user already has. Once this returns, every
    /// later fan-out to the user reaches it.
    pub fn join(&self, user: UserId, entry: SessionEntry) {
        {
            let mut shard = self.shard(&user);
            // Room for one: most users hold one session, and `push` would reserve four.
            let entries = shard.entry(user).or_insert_with(|| Vec::with_capacity(1));
            if entries.is_empty() {
                self.users.fetch_add(1, Ordering::SeqCst);
            }
            entries.push(entry);
            self.sessions.fetch_add(1, Ordering::SeqCst);
        }
        self.publish_presence();
    }

    /// Removes exactly that session, if it is still there.
    pub fn leave(&self, user: &UserId, session: SessionId) {
        let removed = {
            let mut shard = self.shard(user);
            let Some(entries) = shard.get_mut(user) else {
                return;
            };
            let before = entries.len();
            entries.retain(|e| e.id != session);
            let removed = before - entries.len();
            let emptied = entries.is_empty();
            self.forget(&mut shard, user, removed, emptied);
            removed
        };
        if removed > 0 {
            self.publish_presence();
        }
    }

    /// Counts `removed` sessions gone from `user`'s entries, and the user too once
    /// `emptied` (their list is empty; the caller looked, so the map is not asked again).
    fn forget(&self, shard: &mut Shard, user: &UserId, removed: usize, emptied: bool) {
        self.count_closed(removed);
        if emptied {
            shard.remove(user);
            self.users.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Fans one stored notification out to the user's sessions; answers how many took it.
    pub fn deliver(&self, user: &UserId, seq: Seq, frame: &ByteString) -> usize {
        let (handed, dropped) = {
            let mut shard = self.shard(user);
            let Some(entries) = shard.get_mut(user) else {
                return 0;
            };
            let item = || Outbound::Notification {
                seq,
                frame: frame.clone(),
            };
            let mut wakes = Wakes::new();
            let (handed, dropped) =
                fan_out(entries, item, user, &mut Backlog::default(), &mut wakes);
            wakes.send();
            if dropped > 0 {
                let emptied = entries.is_empty();
                self.forget(&mut shard, user, dropped, emptied);
            }
            (handed, dropped)
        };
        if dropped > 0 {
            self.publish_presence();
        }
        // Counted where frames meet sessions: with several nodes, each counts its own.
        self.metrics.delivered(handed);
        handed
    }

    /// Fans one live frame out to every session on the node; answers how many took it,
    /// and how far behind their writers are.
    pub fn broadcast(&self, frame: &ByteString) -> (usize, Backlog) {
        let mut backlog = Backlog::default();
        let mut wakes = Wakes::new();
        let mut total = 0;
        let mut dropped_total = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let mut emptied = 0;
            for (user, entries) in shard.iter_mut() {
                let frame = || Outbound::Frame(frame.clone());
                let (handed, dropped) = fan_out(entries, frame, user, &mut backlog, &mut wakes);
                total += handed;
                dropped_total += dropped;
                emptied += usize::from(entries.is_empty());
            }
            if emptied > 0 {
                shard.retain(|_, entries| !entries.is_empty());
                self.users.fetch_sub(emptied, Ordering::SeqCst);
            }
        }
        wakes.send();
        if dropped_total > 0 {
            self.count_closed(dropped_total);
            self.publish_presence();
        }
        self.metrics.delivered(total);
        (total, backlog)
    }

    /// How many sessions `user` holds on this node.
    pub fn presence(&self, user: &UserId) -> usize {
        self.shard(user).get(user).map_or(0, Vec::len)
    }

    /// Asks every session to close with 1001; answers how many there were.
    pub fn close_all(&self) -> usize {
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for entry in shard.values().flatten() {
                let _ = entry.control.try_send(Evict {
                    reason: EvictReason::Shutdown,
                });
            }
        }
        self.sessions.load(Ordering::SeqCst)
    }

    fn count_closed(&self, sessions: usize) {
        self.sessions.fetch_sub(sessions, Ordering::SeqCst);
        self.closed.fetch_add(sessions as u64, Ordering::Relaxed);
    }

    /// Sessions that closed on this node since it started.
    pub fn closed(&self) -> u64 {
        self.closed.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> RegistryStats {
        RegistryStats {
            users: self.users.load(Ordering::SeqCst),
            sessions: self.sessions.load(Ordering::SeqCst),
        }
    }
}

/// How long a broadcast's publisher waits, at most, for the node's writers to catch up.
const BACKLOG_WAIT: Duration = Duration::from_secs(1);

/// The sessions a fan-out left with their queue more than half full.
///
/// One broadcast is a frame for every session, and the HTTP side accepts broadcasts far
/// faster than the writers send 10,000 frames each. Left alone, every queue overflows and
/// healthy sessions are evicted as slow consumers although only the node is behind. When
/// a fifth of the sessions or more are behind, the publisher of the broadcast waits
/// instead (backpressure); a few slow peers (fewer than a fifth) never hold it up.
/// Not "most": one worker thread's sessions can fall behind together while the other's
/// keep up (measured: 2,601 of 10,000 sessions evicted with a "most" rule).
#[derive(Default)]
pub struct Backlog {
    behind: usize,
    /// One of the sessions behind, watched for when the writers have caught up.
    sample: Option<QueueSender>,
}

impl Backlog {
    /// Waits (up to `BACKLOG_WAIT`) while a fifth of the `handed` sessions are behind.
    pub async fn wait_if_behind(self, handed: usize) {
        let Some(sample) = self.sample.filter(|_| self.behind * 5 >= handed) else {
            return;
        };
        let deadline = Instant::now() + BACKLOG_WAIT;
        while sample.len() * 4 > sample.capacity()
            && !sample.is_closed()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// How a fan-out wakes the writers it handed frames to: this thread's at once, every other
/// worker's from that worker, in one task run there.
///
/// A writer woken from another thread waits in its worker's remote queue, which tokio's
/// `LocalSet` serves once in 31 tasks while local ones are ready. Under a broadcast flood
/// the writers woken from the other worker starved there until their queues overflowed
/// (400-600 of 10,000 healthy sessions evicted in half of the maximum-rate runs).
struct Wakes {
    here: ThreadId,
    /// Per other worker, the writers to wake there. A few workers (one per core), so a
    /// scan beats hashing the thread id once per session of every broadcast.
    elsewhere: Vec<(ThreadId, ArbiterHandle, Vec<QueueWaker>)>,
}

impl Wakes {
    fn new() -> Self {
        Self {
            here: thread::current().id(),
            elsewhere: Vec::new(),
        }
    }

    /// Queues `item` for the entry's writer and notes the writer for waking.
    fn hand(
        &mut self,
        entry: &SessionEntry,
        item: Outbound,
    ) -> Result<usize, TrySendError<Outbound>> {
        let queued = entry.outbound.push_quietly(item)?;
        let worker = &entry.worker;
        if worker.thread == self.here {
            entry.outbound.wake();
            return Ok(queued);
        }
        let waker = entry.outbound.waker();
        match self
            .elsewhere
            .iter_mut()
            .find(|(thread, ..)| *thread == worker.thread)
        {
            Some((_, _, wakers)) => wakers.push(waker),
            None => self
                .elsewhere
                .push((worker.thread, worker.arbiter.clone(), vec![waker])),
        }
        Ok(queued)
    }

    /// Runs each other worker's wakes on that worker.
    fn send(self) {
        for (_, arbiter, wakers) in self.elsewhere {
            let wakes = WakeOnDrop(wakers);
            // A stopped arbiter drops the task here, which still wakes them all.
            arbiter.spawn(async move { drop(wakes) });
        }
    }
}

/// Wakes its writers when dropped: on their worker once its task ran, or here if the
/// worker is gone.
struct WakeOnDrop(Vec<QueueWaker>);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        for waker in &self.0 {
            waker.wake();
        }
    }
}

/// Hands `item` to every session in `entries`; evicts the ones whose queue is full.
/// Answers (handed, dropped); counts the sessions it left more than half full in `backlog`.
fn fan_out(
    entries: &mut Vec<SessionEntry>,
    item: impl Fn() -> Outbound,
    user: &UserId,
    backlog: &mut Backlog,
    wakes: &mut Wakes,
) -> (usize, usize) {
    let before = entries.len();
    let mut handed = 0;
    entries.retain(|entry| match wakes.hand(entry, item()) {
        Ok(queued) => {
            handed += 1;
            if queued * 2 > entry.outbound.capacity() {
                backlog.behind += 1;
                backlog.sample.get_or_insert_with(|| entry.outbound.clone());
            }
            true
        }
        Err(TrySendError::Full(_)) => {
            tracing::info!(user = %user, session = %entry.id, "slow consumer evicted");
            let _ = entry.control.try_send(Evict {
                reason: EvictReason::SlowConsumer,
            });
            false
        }
        Err(TrySendError::Closed(_)) => false,
    });
    (handed, before - entries.len())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use actix::prelude::*;

    use super::*;
    use crate::ids::SessionIds;
    use crate::session::queue;

    struct CountEvictions(Arc<AtomicUsize>);

    impl Actor for CountEvictions {
        type Context = Context<Self>;
    }

    impl Handler<Evict> for CountEvictions {
        type Result = ();

        fn handle(&mut self, _: Evict, _: &mut Self::Context) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Writers slower than a broadcast publisher: without the wait, the publisher's loop
    /// fills every queue (it never yields) and every session is evicted.
    #[actix::test]
    async fn a_broadcast_publisher_waits_while_most_writers_are_behind() {
        broadcast_to_writers(20).await;
    }

    /// Only some writers behind (one worker thread's sessions, say): they must not be
    /// evicted while the node is what is slow.
    #[actix::test]
    async fn a_broadcast_publisher_waits_while_a_fifth_of_the_writers_are_behind() {
        broadcast_to_writers(5).await;
    }

    /// Records the thread that woke it.
    struct WokenOn(std::sync::mpsc::Sender<ThreadId>);

    impl std::task::Wake for WokenOn {
        fn wake(self: Arc<Self>) {
            let _ = self.0.send(thread::current().id());
        }
    }

    /// A writer woken from another thread waits in its worker's remote queue, which tokio
    /// serves once in 31 tasks while local ones are ready (healthy sessions were evicted
    /// that way); a broadcast or a publish must wake each writer from its own worker.
    #[actix::test]
    async fn a_fan_out_wakes_writers_on_their_own_worker() {
        let members = Arc::new(Members::new(Arc::new(Metrics::default())));
        let worker = Arbiter::new();
        let (joined, receiver) = std::sync::mpsc::channel();
        let on_worker = Arc::clone(&members);
        worker.spawn_fn(move || {
            let (outbound, queue) = queue::channel(8);
            let control = CountEvictions(Arc::default()).start().recipient();
            let entry = SessionEntry {
                id: SessionIds::default().next(),
                outbound,
                control,
                worker: Worker::current(),
            };
            on_worker.join(UserId::parse("alice").unwrap(), entry);
            let _ = joined.send((queue, thread::current().id()));
        });
        let (mut queue, worker_thread) = receiver.recv().unwrap();
        let (woken, woken_on) = std::sync::mpsc::channel();
        let waker = std::task::Waker::from(Arc::new(WokenOn(woken)));
        let mut recv = Box::pin(queue.recv());
        let polled = recv
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker));
        assert!(polled.is_pending(), "nothing queued yet");

        let (handed, _) = members.broadcast(&ByteString::from_static("{}"));
        assert_eq!(handed, 1);
        let thread = woken_on.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_ne!(
            thread,
            thread::current().id(),
            "woken by the broadcasting thread"
        );
        assert_eq!(thread, worker_thread);

        let mut cx = std::task::Context::from_waker(&waker);
        assert!(recv.as_mut().poll(&mut cx).is_ready(), "the broadcast");
        drop(recv);
        let mut recv = Box::pin(queue.recv());
        assert!(recv.as_mut().poll(&mut cx).is_pending());
        let alice = UserId::parse("alice").unwrap();
        assert_eq!(
            members.deliver(&alice, 1, &ByteString::from_static("{}")),
            1
        );
        let thread = woken_on.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(thread, worker_thread, "a publish's wake");
        worker.stop();
    }

    /// Broadcasts to 20 sessions of which `slow` write a frame per millisecond and the
    /// rest as fast as they can; nobody may be evicted.
    async fn broadcast_to_writers(slow: usize) {
        const SESSIONS: usize = 20;
        const CAPACITY: usize = 8;
        const BROADCASTS: usize = 100;
        let members = Members::new(Arc::new(Metrics::default()));
        let evicted = Arc::new(AtomicUsize::new(0));
        let control = CountEvictions(Arc::clone(&evicted)).start().recipient();
        let ids = SessionIds::default();
        let mut writers = Vec::new();
        for i in 0..SESSIONS {
            let (outbound, mut queue) = queue::channel(CAPACITY);
            let entry = SessionEntry {
                id: ids.next(),
                outbound,
                control: control.clone(),
                worker: Worker::current(),
            };
            members.join(UserId::parse(&format!("u{i}")).unwrap(), entry);
            let is_slow = i < slow;
            writers.push(actix_rt::spawn(async move {
                let mut written = 0;
                while written < BROADCASTS && queue.recv().await.is_some() {
                    written += 1;
                    if is_slow {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                written
            }));
        }
        let frame = ByteString::from_static(r#"{"type":"broadcast"}"#);
        for n in 0..BROADCASTS {
            let (handed, backlog) = members.broadcast(&frame);
            assert_eq!(handed, SESSIONS, "broadcast {n} reached every session");
            backlog.wait_if_behind(handed).await;
            // Broadcasts come as separate requests: writers that keep up run in between.
            tokio::task::yield_now().await;
        }
        for writer in writers {
            assert_eq!(writer.await.unwrap(), BROADCASTS);
        }
        assert_eq!(evicted.load(Ordering::SeqCst), 0);
    }
}
