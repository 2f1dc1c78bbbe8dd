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
                Outbound::Frame(frame) => self.ws.text(frame).await?,
                Outbound::Ping => self.ws.ping(b"").await?,
                Outbound::Pong(payload) => self.ws.pong(&payload).await?,
            }
        }
    }

    /// Sends `hello`, then with `since` every stored notification after it; answers the cursor.
    async fn hello_and_replay(&mut self) -> Result<Seq, WriterError> {
        let head = self.store.head(&self.user).await?;
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
        );
        self.ws.text(hello.encode()).await?;
        if recovered == Some(false) {
            tracing::info!(user = %self.user, session = %self.session, since = ?self.since, first_seq = head.first_seq, "resume older than retention");
        }
        if self.since.is_some() {
            loop {
                let page = self.store.read(&self.user, cursor, PAGE).await?;
                let full = page.len() == PAGE;
                for stored in page {
                    self.ws.text(stored.frame).await?;
                    cursor = stored.seq;
                }
                if !full {
                    break;
                }
            }
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
