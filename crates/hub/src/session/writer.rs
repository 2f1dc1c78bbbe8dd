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
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Outbound;
use crate::ids::{Seq, SessionId, UserId};
use crate::protocol::{self, HeartbeatInfo};
use crate::store::{Store, StoreError};

/// Notifications read from the store per query during replay and gap fill.
const PAGE: usize = 500;

#[derive(Debug, thiserror::Error)]
pub(crate) enum WriterError {
    #[error("the peer is gone")]
    PeerGone,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<actix_ws::Closed> for WriterError {
    fn from(_: actix_ws::Closed) -> Self {
        Self::PeerGone
    }
}

pub(crate) struct Writer {
    pub ws: actix_ws::Session,
    pub queue: mpsc::Receiver<Outbound>,
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
        loop {
            let item = match gap_deadline {
                Some(deadline) => tokio::select! {
                    item = self.queue.recv() => item,
                    () = tokio::time::sleep_until(deadline) => {
                        cursor = self.fill_gap(cursor, &mut early).await?;
                        gap_deadline = None;
                        continue;
                    }
                },
                None => self.queue.recv().await,
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
                    self.ws.text(frame).await?;
                    cursor = self.send_contiguous(seq, &mut early).await?;
                    if early.is_empty() {
                        gap_deadline = None;
                    }
                }
                other => self.send_other(other).await?,
            }
        }
    }

    /// Sends an item that is not a notification, as it comes.
    async fn send_other(&mut self, item: Outbound) -> Result<(), WriterError> {
        match item {
            Outbound::Frame(frame) => self.ws.text(frame).await?,
            Outbound::Ping => self.ws.ping(b"").await?,
            Outbound::Pong(payload) => self.ws.pong(&payload).await?,
            // Only the callers' own loops handle notifications.
            Outbound::Notification { .. } => {}
        }
        Ok(())
    }

    /// Sends `hello`, then with `since` every stored notification after it; answers the cursor.
    ///
    /// The session is in the registry already, so live notifications queue up from the
    /// start. Left there during a replay, they overflow the queue of a busy user's session
    /// and get a healthy peer evicted as a slow consumer, even before its `hello`. Every
    /// live notification is in the store before it is fanned out, so until the replay is
    /// done the queue is drained while the work goes on (see `draining`), and the replay
    /// reads on until it has passed the newest live seq it dropped. A live-only session
    /// keeps its queue: its `hello` is one short read away.
    async fn hello_and_replay(&mut self) -> Result<Seq, WriterError> {
        let mut newest_live = 0;
        let (store, user) = (Arc::clone(&self.store), self.user.clone());
        let head = match self.since {
            None => store.head(&user).await?,
            Some(_) => {
                self.draining(async move { store.head(&user).await }, &mut newest_live)
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
            self.ws.text(hello).await?;
            return Ok(cursor);
        }
        self.send_draining(hello, &mut newest_live).await?;
        if recovered == Some(false) {
            tracing::info!(user = %self.user, session = %self.session, since = ?self.since, first_seq = head.first_seq, "resume older than retention");
        }
        loop {
            let (store, user) = (Arc::clone(&self.store), self.user.clone());
            let read = async move { store.read(&user, cursor, PAGE).await };
            let page = self.draining(read, &mut newest_live).await??;
            let (full, empty) = (page.len() == PAGE, page.is_empty());
            for stored in page {
                self.send_draining(stored.frame, &mut newest_live).await?;
                cursor = stored.seq;
            }
            // Empty: retention took what was seen live; the live loop's gap fill handles it.
            if empty || (!full && newest_live <= cursor) {
                break;
            }
        }
        Ok(cursor)
    }

    /// Sends one text frame during the replay, draining the queue meanwhile.
    async fn send_draining(
        &mut self,
        frame: ByteString,
        newest_live: &mut Seq,
    ) -> Result<(), WriterError> {
        let mut ws = self.ws.clone();
        Ok(self
            .draining(async move { ws.text(frame).await }, newest_live)
            .await??)
    }

    /// Runs `work` (which must not borrow the writer) while emptying the queue.
    async fn draining<T>(
        &mut self,
        work: impl Future<Output = T>,
        newest_live: &mut Seq,
    ) -> Result<T, WriterError> {
        tokio::pin!(work);
        let out = loop {
            tokio::select! {
                biased;
                out = &mut work => break out,
                item = self.queue.recv() => match item {
                    Some(item) => self.take_during_replay(item, newest_live).await?,
                    None => return Err(WriterError::PeerGone),
                },
            }
        };
        // Work that is ready at once never lets the select look at the queue, and a page
        // of sends that all are can outrun a small queue.
        while let Ok(item) = self.queue.try_recv() {
            self.take_during_replay(item, newest_live).await?;
        }
        Ok(out)
    }

    /// During the replay: sends what is not a notification; drops a notification (the
    /// replay reads it from the store) and remembers the newest seq dropped.
    async fn take_during_replay(
        &mut self,
        item: Outbound,
        newest_live: &mut Seq,
    ) -> Result<(), WriterError> {
        match item {
            Outbound::Notification { seq, .. } => *newest_live = (*newest_live).max(seq),
            other => self.send_other(other).await?,
        }
        Ok(())
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
                self.ws.text(frame).await?;
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
                self.ws.text(stored.frame).await?;
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
