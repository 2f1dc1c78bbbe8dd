//! The session's single writer: hello, replay from `since`, then live frames in seq order.
//!
//! Publishes of one user may reach the registry out of order (two HTTP workers
//! race), and a broker may drop one. The writer therefore owns the session's
//! cursor: it drops any seq it already sent, holds a seq that arrives early, and
//! if the missing one does not follow within `gap_wait`, reads it from the store.
//! That is what makes "no gap, no duplicate" hold for every session.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytestring::ByteString;
use tokio::time::Instant;

use super::Outbound;
use super::queue::{QueueReceiver, TryRecvError};
use crate::ids::{Seq, SessionId, UserId};
use crate::protocol::{self, HeartbeatInfo};
use crate::store::{Store, StoreError};
use crate::transport::{FLUSH_AT, FrameSink, PeerGone};

/// Notifications read from the store per query during replay and gap fill.
const PAGE: usize = 500;
/// Times a writer lets its worker's other tasks run before a write, while frames keep
/// arriving in between.
const MAX_YIELDS: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub(crate) enum WriterError {
    #[error("the peer is gone")]
    PeerGone,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("more than a queue's worth of control frames arrived during the replay")]
    Overflow,
}

impl From<PeerGone> for WriterError {
    fn from(_: PeerGone) -> Self {
        Self::PeerGone
    }
}

pub(crate) struct Writer {
    pub sink: FrameSink,
    pub queue: QueueReceiver,
    pub store: Arc<dyn Store>,
    pub user: UserId,
    pub session: SessionId,
    pub since: Option<Seq>,
    pub heartbeat: HeartbeatInfo,
    pub gap_wait: Duration,
}

impl Writer {
    /// Runs until the queue closes (the session stopped) or the peer is gone.
    pub(crate) async fn run(mut self) -> Result<(), WriterError> {
        let mut cursor = self.hello_and_replay().await?;
        let mut early: BTreeMap<Seq, ByteString> = BTreeMap::new();
        let mut gap_deadline: Option<Instant> = None;
        let mut yields = 0;
        let mut arrived = false;
        loop {
            // Whatever is queued already goes out in one write; the flush comes only
            // when the queue is empty (or the batch full), right before waiting for more.
            let ready = match self.queue.try_recv() {
                Ok(item) => {
                    arrived = true;
                    Some(item)
                }
                Err(TryRecvError::Disconnected) => return Ok(()),
                Err(TryRecvError::Empty)
                    if self.sink.queued() > 0
                        && (yields == 0 || arrived && yields < MAX_YIELDS) =>
                {
                    // Before writing, let the worker's other tasks run: on an idle worker
                    // that costs a few microseconds, on a busy one the frames that arrive
                    // meanwhile share this write (a flood of broadcasts otherwise costs a
                    // system call per frame per session).
                    yields += 1;
                    arrived = false;
                    tokio::task::yield_now().await;
                    continue;
                }
                Err(TryRecvError::Empty) => {
                    yields = 0;
                    self.sink.flush().await?;
                    None
                }
            };
            let item = match (ready, gap_deadline) {
                (Some(item), _) => Some(item),
                (None, Some(deadline)) => tokio::select! {
                    item = self.queue.recv() => item,
                    () = tokio::time::sleep_until(deadline) => {
                        cursor = self.fill_gap(cursor, &mut early).await?;
                        gap_deadline = None;
                        continue;
                    }
                },
                (None, None) => self.queue.recv().await,
            };
            let Some(item) = item else { return Ok(()) };
            match item {
                Outbound::Notification { seq, frame } => {
                    if seq <= cursor {
                        continue;
                    }
                    if seq > cursor + 1 {
                        early.insert(seq, frame);
                        gap_deadline.get_or_insert_with(|| Instant::now() + self.gap_wait);
                        continue;
                    }
                    self.push(frame).await?;
                    cursor = self.send_contiguous(seq, &mut early).await?;
                    if early.is_empty() {
                        gap_deadline = None;
                    }
                }
                other => self.queue_other(other),
            }
            if self.sink.queued() >= FLUSH_AT {
                self.sink.flush().await?;
            }
        }
    }

    /// Queues a text frame; writes the batch once it is full.
    async fn push(&mut self, frame: ByteString) -> Result<(), WriterError> {
        self.sink.queue_text(frame.into_bytes());
        if self.sink.queued() >= FLUSH_AT {
            self.sink.flush().await?;
        }
        Ok(())
    }

    /// Queues an item that is not a notification, as it comes.
    fn queue_other(&mut self, item: Outbound) {
        match item {
            Outbound::Frame(frame) => self.sink.queue_text(frame.into_bytes()),
            Outbound::Ping => self.sink.queue_ping(),
            Outbound::Pong(payload) => self.sink.queue_pong(payload),
            // Only the callers' own loops handle notifications.
            Outbound::Notification { .. } => {}
        }
    }

    /// Sends `hello`, then with `since` every stored notification after it; answers the cursor.
    ///
    /// The session is in the registry already, so live notifications queue up from the
    /// start. Left there during a replay, they overflow the queue of a busy user's session
    /// and get a healthy peer evicted as a slow consumer, even before its `hello`. Every
    /// live notification is in the store before it is fanned out, so until the replay is
    /// done the queue is drained while the work goes on (see [`Replay::drain_while`]), and
    /// the replay reads on until it has passed the newest live seq it dropped. A live-only
    /// session keeps its queue: its `hello` is one short read away.
    async fn hello_and_replay(&mut self) -> Result<Seq, WriterError> {
        let mut replay = Replay {
            newest_live: 0,
            held: Vec::new(),
            // The queue's bound is also the bound on control frames held during a replay.
            capacity: self.queue.capacity(),
        };
        let (store, user) = (Arc::clone(&self.store), self.user.clone());
        let head = match self.since {
            None => store.head(&user).await?,
            Some(_) => {
                replay
                    .drain_while(&mut self.queue, async move { store.head(&user).await })
                    .await??
            }
        };
        let (mut cursor, recovered) = match self.since {
            None => (head.last_seq, None),
            // A cursor from another history (the store was replaced): replay all we have.
            Some(since) if since > head.last_seq => (head.first_seq.saturating_sub(1), Some(false)),
            Some(since) => (since, Some(since + 1 >= head.first_seq)),
        };
        let hello = protocol::hello(
            self.session,
            &self.user,
            head.last_seq,
            head.first_seq,
            recovered,
            self.heartbeat,
        )
        .encode();
        if self.since.is_none() {
            self.sink.send_text(hello.into_bytes()).await?;
            return Ok(cursor);
        }
        self.sink.queue_text(hello.into_bytes());
        if recovered == Some(false) {
            tracing::info!(user = %self.user, session = %self.session, since = ?self.since, first_seq = head.first_seq, "resume older than retention");
        }
        loop {
            replay
                .drain_while(&mut self.queue, self.sink.flush())
                .await??;
            let (store, user) = (Arc::clone(&self.store), self.user.clone());
            let read = async move { store.read(&user, cursor, PAGE).await };
            let page = replay.drain_while(&mut self.queue, read).await??;
            let (full, empty) = (page.len() == PAGE, page.is_empty());
            for stored in page {
                self.sink.queue_text(stored.frame.into_bytes());
                cursor = stored.seq;
            }
            // Empty: retention took what was seen live; the live loop's gap fill handles it.
            if empty || (!full && replay.newest_live <= cursor) {
                break;
            }
        }
        for item in replay.held {
            self.queue_other(item);
        }
        Ok(cursor)
    }

    /// After sending `cursor`, sends every held seq that now follows on.
    async fn send_contiguous(
        &mut self,
        mut cursor: Seq,
        early: &mut BTreeMap<Seq, ByteString>,
    ) -> Result<Seq, WriterError> {
        while let Some(entry) = early.first_entry() {
            if *entry.key() > cursor + 1 {
                break;
            }
            let (seq, frame) = entry.remove_entry();
            if seq == cursor + 1 {
                self.push(frame).await?;
                cursor = seq;
            }
        }
        Ok(cursor)
    }

    /// The missing seqs did not come live: read them from the store, then flush what was held.
    async fn fill_gap(
        &mut self,
        mut cursor: Seq,
        early: &mut BTreeMap<Seq, ByteString>,
    ) -> Result<Seq, WriterError> {
        let Some(&first_early) = early.keys().next() else {
            return Ok(cursor);
        };
        while cursor + 1 < first_early {
            let want = ((first_early - cursor - 1) as usize).min(PAGE);
            let page = self.store.read(&self.user, cursor, want).await?;
            let Some(last) = page.last().map(|s| s.seq) else {
                break;
            };
            for stored in page.into_iter().filter(|s| s.seq < first_early) {
                self.push(stored.frame).await?;
            }
            cursor = last.min(first_early - 1);
        }
        if cursor + 1 < first_early {
            tracing::warn!(user = %self.user, session = %self.session, from = cursor + 1, to = first_early - 1, "seqs gone from the store before they could be sent");
            cursor = first_early - 1;
        }
        self.send_contiguous(cursor, early).await
    }
}

/// What a replay keeps while it drains the live queue.
struct Replay {
    /// The newest live seq dropped: the replay reads at least this far.
    newest_live: Seq,
    /// Frames that are not notifications (pongs, pings, errors), sent after the replay.
    held: Vec<Outbound>,
    capacity: usize,
}

impl Replay {
    /// Runs `work` while emptying the queue: a notification is dropped (the replay reads
    /// it from the store), anything else is held for after the replay.
    async fn drain_while<T>(
        &mut self,
        queue: &mut QueueReceiver,
        work: impl Future<Output = T>,
    ) -> Result<T, WriterError> {
        tokio::pin!(work);
        let out = loop {
            tokio::select! {
                biased;
                out = &mut work => break out,
                item = queue.recv() => match item {
                    Some(item) => self.take(item)?,
                    None => return Err(WriterError::PeerGone),
                },
            }
        };
        // Work that is ready at once never lets the select look at the queue, and a page
        // of sends that all are can outrun a small queue.
        while let Ok(item) = queue.try_recv() {
            self.take(item)?;
        }
        Ok(out)
    }

    fn take(&mut self, item: Outbound) -> Result<(), WriterError> {
        match item {
            Outbound::Notification { seq, .. } => self.newest_live = self.newest_live.max(seq),
            // A peer that floods pings during a replay is held to the queue's bound.
            _ if self.held.len() >= self.capacity => return Err(WriterError::Overflow),
            other => self.held.push(other),
        }
        Ok(())
    }
}
