//! The in-memory store: per-user history in this process only, lost when it stops.
//!
//! For deployments that want catch-up across reconnects but not across restarts (live
//! dashboards, presence-like events), and to measure what durability costs: the same
//! hub with nothing written down (BENCHMARKS.md). An append is one lock of the user's
//! shard on the publishing thread; no thread is woken, nothing touches a disk.
//!
//! After a restart every user's seqs begin again at 1; a client resuming with a `since`
//! beyond them is told `recovered: false` and replayed from the start, as after a resume
//! older than retention.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::Duration;

use async_trait::async_trait;
use bytestring::ByteString;
use dashmap::DashMap;

use super::{Appended, Draft, Head, Notification, Receipt, Store, StoreError, Stored};
use crate::config::Retention;
use crate::ids::{Seq, UserId};

/// Per-user history kept in memory. Cheap to share; the sweeper thread holds it weakly.
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    retention: Retention,
    /// One entry per user who ever had a notification: the last seq outlives the rows, so
    /// it is never handed out twice while the process runs.
    logs: DashMap<UserId, Log>,
    closed: AtomicBool,
}

#[derive(Default)]
struct Log {
    last_seq: Seq,
    /// Retained rows, oldest first, seqs consecutive.
    rows: VecDeque<Row>,
    /// Idempotency keys within retention and the receipt their first publish got.
    keys: HashMap<String, Keyed>,
}

struct Row {
    seq: Seq,
    ts_ms: i64,
    frame: ByteString,
}

struct Keyed {
    receipt: Receipt,
    ts_ms: i64,
}

impl Log {
    /// Drops the rows retention no longer keeps, over the count or too old: the oldest
    /// first, so an append pays for at most what it pushed out.
    fn trim(&mut self, retention: Retention, cutoff_ms: i64) {
        let over = self.rows.len().saturating_sub(retention.per_user as usize);
        self.rows.drain(..over);
        while self.rows.front().is_some_and(|row| row.ts_ms < cutoff_ms) {
            self.rows.pop_front();
        }
        if self.rows.capacity() > 2 * self.rows.len().max(8) {
            self.rows.shrink_to_fit();
        }
    }

    /// Also forgets idempotency keys too old to answer. It walks every key, so only the
    /// sweeper does it; a publish checks the one key it looks up.
    fn sweep(&mut self, retention: Retention, cutoff_ms: i64) {
        self.trim(retention, cutoff_ms);
        self.keys.retain(|_, keyed| keyed.ts_ms >= cutoff_ms);
    }

    fn head(&self) -> Head {
        Head {
            first_seq: self.rows.front().map_or(self.last_seq + 1, |row| row.seq),
            last_seq: self.last_seq,
        }
    }
}

impl MemoryStore {
    /// An empty store; a background thread sweeps expired rows and idempotency keys (an
    /// append or a read trims its own user's rows on the spot, and ignores expired keys).
    pub fn new(retention: Retention) -> Self {
        let inner = Arc::new(Inner {
            retention,
            logs: DashMap::new(),
            closed: AtomicBool::new(false),
        });
        let every =
            (retention.max_age / 10).clamp(Duration::from_millis(100), Duration::from_secs(60));
        let weak = Arc::downgrade(&inner);
        let spawned = thread::Builder::new()
            .name("herald-sweep".into())
            .spawn(move || sweep_until_gone(weak, every));
        if let Err(e) = spawned {
            // Memory then holds expired rows until their user is touched again, and
            // expired keys until the same key is published again.
            tracing::warn!(error = %e, "memory store: sweeper not started");
        }
        Self { inner }
    }

    fn open(&self) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    /// Rows currently held for every user; for tests of the sweeper.
    #[cfg(test)]
    fn rows_held(&self) -> usize {
        self.inner.logs.iter().map(|log| log.rows.len()).sum()
    }
}

fn sweep_until_gone(store: Weak<Inner>, every: Duration) {
    loop {
        thread::sleep(every);
        let Some(inner) = store.upgrade() else { return };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let cutoff = inner.retention.cutoff_ms();
        for mut log in inner.logs.iter_mut() {
            log.sweep(inner.retention, cutoff);
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn append(&self, user: &UserId, draft: Draft) -> Result<Appended, StoreError> {
        self.open()?;
        let cutoff = self.inner.retention.cutoff_ms();
        let mut log = self.inner.logs.entry(user.clone()).or_default();
        if let Some(key) = &draft.idempotency_key
            && let Some(keyed) = log.keys.get(key).filter(|keyed| keyed.ts_ms >= cutoff)
        {
            return Ok(Appended::Duplicate(keyed.receipt.clone()));
        }
        let seq = log.last_seq + 1;
        let frame = draft.frame(seq);
        log.last_seq = seq;
        log.rows.push_back(Row {
            seq,
            ts_ms: draft.ts_ms,
            frame: frame.clone(),
        });
        log.trim(self.inner.retention, cutoff);
        if let Some(key) = draft.idempotency_key {
            let receipt = Receipt {
                id: draft.id.clone(),
                seq,
                delivered: 0,
            };
            log.keys.insert(
                key,
                Keyed {
                    receipt,
                    ts_ms: draft.ts_ms,
                },
            );
        }
        Ok(Appended::New(Notification {
            user: user.clone(),
            id: draft.id,
            seq,
            frame,
        }))
    }

    async fn read(
        &self,
        user: &UserId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Stored>, StoreError> {
        let cutoff = self.inner.retention.cutoff_ms();
        let Some(mut log) = self.inner.logs.get_mut(user) else {
            return Ok(Vec::new());
        };
        log.trim(self.inner.retention, cutoff);
        // Seqs are consecutive: the first row after `after` is found by subtraction.
        let skip = log
            .rows
            .front()
            .map_or(0, |first| after.saturating_sub(first.seq - 1) as usize);
        Ok(log
            .rows
            .iter()
            .skip(skip)
            .take(limit)
            .map(|row| Stored {
                seq: row.seq,
                frame: row.frame.clone(),
            })
            .collect())
    }

    async fn head(&self, user: &UserId) -> Result<Head, StoreError> {
        let cutoff = self.inner.retention.cutoff_ms();
        Ok(match self.inner.logs.get_mut(user) {
            Some(mut log) => {
                log.trim(self.inner.retention, cutoff);
                log.head()
            }
            None => Head {
                first_seq: 1,
                last_seq: 0,
            },
        })
    }

    async fn record_delivered(
        &self,
        user: &UserId,
        key: &str,
        delivered: usize,
    ) -> Result<(), StoreError> {
        if let Some(mut log) = self.inner.logs.get_mut(user)
            && let Some(keyed) = log.keys.get_mut(key)
        {
            keyed.receipt.delivered = delivered;
        }
        Ok(())
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.inner.closed.store(true, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{self, LONG, draft};

    #[actix_rt::test]
    async fn passes_the_store_conformance_suite() {
        conformance::run_all(|retention| (MemoryStore::new(retention), ())).await;
    }

    #[actix_rt::test]
    async fn the_sweeper_frees_rows_nobody_touches_again() {
        let store = MemoryStore::new(Retention {
            per_user: 1000,
            max_age: Duration::from_millis(300),
        });
        for n in 0..50 {
            let user = UserId::parse(&format!("u{n}")).unwrap();
            store.append(&user, draft(n, Some("k"))).await.unwrap();
        }
        assert_eq!(store.rows_held(), 50);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(store.rows_held(), 0, "expired rows of idle users are swept");
        let keys: usize = store.inner.logs.iter().map(|log| log.keys.len()).sum();
        assert_eq!(keys, 0, "expired idempotency keys are swept");
    }

    #[actix_rt::test]
    async fn a_closed_store_refuses_appends() {
        let store = MemoryStore::new(LONG);
        let user = UserId::parse("a").unwrap();
        store.close().await.unwrap();
        assert!(matches!(
            store.append(&user, draft(1, None)).await,
            Err(StoreError::Closed)
        ));
    }
}
