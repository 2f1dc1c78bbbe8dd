//! Appends the journal holds and SQLite does not show yet: reads and idempotency checks see them here.
//!
//! The writer adds a batch once its journal write is durable, before answering it; the
//! indexer removes it once SQLite has committed it. A reader that looks here first and in
//! SQLite second therefore never misses an acknowledged row (it may see one twice, and
//! merges by seq).

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex};

use super::journal::Record;
use super::{Receipt, Stored};
use crate::ids::{Seq, UserId};

#[derive(Default)]
pub struct Pending {
    inner: Mutex<Inner>,
    /// Signalled whenever the indexer let rows go.
    drained: Condvar,
}

#[derive(Default)]
struct Inner {
    /// Per user, oldest first (the writer appends in seq order).
    rows: HashMap<UserId, VecDeque<Row>>,
    keys: HashMap<(UserId, String), Keyed>,
    /// Frame bytes held, the bulk of what this costs.
    bytes: usize,
}

struct Row {
    seq: Seq,
    ts_ms: i64,
    frame: bytestring::ByteString,
}

struct Keyed {
    receipt: Receipt,
    ts_ms: i64,
}

/// The bounds a read applies: what retention still shows.
#[derive(Debug, Clone, Copy)]
pub struct Visible {
    /// Rows at or below it were dropped by the per-user count.
    pub above_seq: Seq,
    /// Rows older than it (ms since the epoch) expired.
    pub since_ms: i64,
}

impl Visible {
    fn shows(&self, seq: Seq, ts_ms: i64) -> bool {
        seq > self.above_seq && ts_ms >= self.since_ms
    }
}

impl Pending {
    /// A durable batch, not yet in SQLite. Answers the frame bytes held now.
    pub fn add<'a>(&self, records: impl IntoIterator<Item = &'a Record>) -> usize {
        let Ok(mut inner) = self.inner.lock() else {
            return 0;
        };
        for r in records {
            if let Some((key, id)) = &r.key {
                let receipt = Receipt {
                    id: id.clone(),
                    seq: r.seq,
                    delivered: 0,
                };
                let keyed = Keyed {
                    receipt,
                    ts_ms: r.ts_ms,
                };
                inner.keys.insert((r.user.clone(), key.clone()), keyed);
            }
            let row = Row {
                seq: r.seq,
                ts_ms: r.ts_ms,
                frame: r.frame.clone(),
            };
            inner.bytes += row.frame.len();
            inner.rows.entry(r.user.clone()).or_default().push_back(row);
        }
        inner.bytes
    }

    /// Waits until the frames held take less than `limit` bytes.
    pub fn wait_below(&self, limit: usize) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        while inner.bytes >= limit {
            inner = match self.drained.wait(inner) {
                Ok(inner) => inner,
                Err(_) => return,
            };
        }
    }

    /// Frame bytes held.
    pub fn bytes(&self) -> usize {
        self.inner.lock().map_or(0, |inner| inner.bytes)
    }

    /// SQLite committed these (added earlier, in this order): readers find them there now.
    pub fn indexed<'a>(&self, records: impl IntoIterator<Item = &'a Record>) {
        let Ok(mut guard) = self.inner.lock() else {
            return;
        };
        let inner = &mut *guard;
        for r in records {
            if let Some((key, _)) = &r.key {
                inner.keys.remove(&(r.user.clone(), key.clone()));
            }
            let emptied = match inner.rows.get_mut(&r.user) {
                Some(rows) => {
                    if rows.front().is_some_and(|row| row.seq == r.seq)
                        && let Some(row) = rows.pop_front()
                    {
                        inner.bytes -= row.frame.len();
                    }
                    rows.is_empty()
                }
                None => false,
            };
            if emptied {
                inner.rows.remove(&r.user);
            }
        }
        self.drained.notify_all();
        if inner.rows.is_empty() {
            // Let a burst's tables go.
            inner.rows.shrink_to_fit();
            inner.keys.shrink_to_fit();
        }
    }

    /// Up to `limit` of the user's rows with seq > `after` that `visible` shows, oldest first.
    pub fn read(&self, user: &UserId, after: Seq, limit: usize, visible: Visible) -> Vec<Stored> {
        let Ok(inner) = self.inner.lock() else {
            return Vec::new();
        };
        let Some(rows) = inner.rows.get(user) else {
            return Vec::new();
        };
        rows.iter()
            .filter(|row| row.seq > after && visible.shows(row.seq, row.ts_ms))
            .take(limit)
            .map(|row| Stored {
                seq: row.seq,
                frame: row.frame.clone(),
            })
            .collect()
    }

    /// The user's oldest row here that `visible` shows: (seq, ts_ms).
    pub fn oldest(&self, user: &UserId, visible: Visible) -> Option<(Seq, i64)> {
        let inner = self.inner.lock().ok()?;
        inner
            .rows
            .get(user)?
            .iter()
            .find(|row| visible.shows(row.seq, row.ts_ms))
            .map(|row| (row.seq, row.ts_ms))
    }

    /// The first receipt for `key`, if its append is here and not older than `since_ms`.
    pub fn receipt(&self, user: &UserId, key: &str, since_ms: i64) -> Option<Receipt> {
        let inner = self.inner.lock().ok()?;
        let keyed = inner.keys.get(&(user.clone(), key.to_owned()))?;
        (keyed.ts_ms >= since_ms).then(|| keyed.receipt.clone())
    }

    /// Remembers how many sessions the keyed append reached, while it is here.
    pub fn set_delivered(&self, user: &UserId, key: &str, delivered: usize) {
        if let Ok(mut inner) = self.inner.lock()
            && let Some(keyed) = inner.keys.get_mut(&(user.clone(), key.to_owned()))
        {
            keyed.receipt.delivered = delivered;
        }
    }
}

#[cfg(test)]
mod tests {
    use bytestring::ByteString;

    use super::*;

    const ALL: Visible = Visible {
        above_seq: 0,
        since_ms: 0,
    };

    fn record(user: &str, seq: Seq, key: Option<&str>) -> Record {
        Record {
            user: UserId::parse(user).unwrap(),
            seq,
            ts_ms: 1000 + seq as i64,
            frame: ByteString::from(format!("f{seq}")),
            key: key.map(|k| (k.to_owned(), format!("id{seq}"))),
        }
    }

    fn seqs(rows: Vec<Stored>) -> Vec<Seq> {
        rows.into_iter().map(|r| r.seq).collect()
    }

    #[test]
    fn rows_stay_visible_until_indexed() {
        let pending = Pending::default();
        let alice = UserId::parse("alice").unwrap();
        let batch = [
            record("alice", 1, None),
            record("bob", 1, None),
            record("alice", 2, Some("k")),
        ];
        assert_eq!(pending.add(&batch), 6, "three frames of two bytes");
        assert_eq!(seqs(pending.read(&alice, 0, 10, ALL)), vec![1, 2]);
        assert_eq!(seqs(pending.read(&alice, 1, 10, ALL)), vec![2]);
        assert_eq!(seqs(pending.read(&alice, 0, 1, ALL)), vec![1]);
        let newest_only = Visible {
            above_seq: 1,
            since_ms: 0,
        };
        assert_eq!(pending.oldest(&alice, newest_only), Some((2, 1002)));
        assert_eq!(pending.receipt(&alice, "k", 0).map(|r| r.seq), Some(2));
        assert_eq!(pending.receipt(&alice, "k", 5000), None, "expired");
        pending.set_delivered(&alice, "k", 3);
        assert_eq!(
            pending.receipt(&alice, "k", 0).map(|r| r.delivered),
            Some(3)
        );

        pending.indexed(&batch[..2]);
        assert_eq!(seqs(pending.read(&alice, 0, 10, ALL)), vec![2]);
        pending.indexed(&batch[2..]);
        assert!(pending.read(&alice, 0, 10, ALL).is_empty());
        assert_eq!(pending.receipt(&alice, "k", 0), None);
        assert!(
            pending.inner.lock().unwrap().rows.is_empty(),
            "nothing kept"
        );
        assert_eq!(pending.bytes(), 0);
    }
}
