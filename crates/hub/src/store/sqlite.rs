//! The embedded store: a writer thread makes appends durable in a journal, an indexer thread
//! puts them into SQLite (WAL mode) off the publish path, and reads see both.
//!
//! Why two steps: with rows keyed by (user, seq), a transaction per batch wrote a whole
//! 4 KiB WAL page per ~200-byte row and synced them all; half of a publish's CPU went there
//! (BENCHMARKS.md). The journal appends the rows and syncs once per batch; SQLite commits
//! every [`INDEX_EVERY`] without syncing, and is synced by a checkpoint before the journal
//! segments it covers are deleted. A crash loses nothing acknowledged: the next start
//! replays the journal into SQLite.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytestring::ByteString;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{Semaphore, oneshot};

use super::journal::{self, Journal, Record, SegmentNo};
use super::pending::{Pending, Visible};
use super::positions::{Positions, RowId};
use super::spare::Spare;
use super::{Appended, Draft, Head, Notification, Receipt, Store, StoreError, Stored};
use crate::config::Retention;
use crate::ids::{Seq, UserId};

/// The schema this build reads and writes, kept in `PRAGMA user_version`.
/// Version 2: `users.last_seq` is written when retention deletes a user's newest rows,
/// not on every append; a user's last seq is the larger of it and their newest row.
/// A version 1 file is a valid version 2 file (its `users` are exact) and is upgraded
/// in place; a version 1 build refuses a version 2 file, since it would reuse seqs.
/// Version 3: `notifications` is a rowid table in the order rows were indexed, with a
/// unique index on (user, seq). Keyed by (user, seq) itself, every commit rewrote a leaf
/// page per user that published (10,000 users: ~10,000 pages, more than the page cache);
/// now rows append to the end of the table and only the small index entries land
/// scattered.
/// Version 4: no index on (user, seq). Its entries landed scattered too, a 4 KiB page
/// per row once it outgrew a commit, so a commit's cost grew with the store; where each
/// user's rows are is held in memory instead ([`Positions`], rebuilt by a scan at open).
/// Version 3 is upgraded by dropping the index; versions 1 and 2 are rebuilt in one
/// transaction at open ([`rebuild_notifications`]). A version 3 build refuses a version
/// 4 file (it would read it without its index). The journal beside the file changes
/// nothing in it.
const SCHEMA_VERSION: i64 = 4;
/// File name inside `store.path`.
pub const DB_FILE: &str = "herald.sqlite3";
/// Appends made durable by one journal write at most; bounds one batch's latency.
const MAX_BATCH: usize = 4096;
/// Concurrent read connections; reads are short, more would only contend on the disk.
const MAX_READERS: usize = 4;
/// The indexer's page cache in KiB (SQLite's default is 2 MB): pages of users' recent
/// rows, so that appends to many users read fewer pages back from the file.
const INDEX_CACHE_KIB: i64 = 16 * 1024;
/// The indexer commits at least this often while it has rows, and at most this late:
/// longer windows write a page once for several of its rows, and keep more in memory.
/// At 1 s each commit was a 20-40 ms burst of page writes that delayed the journal's
/// syncs (fixed 20,000/s: p99 25-30 ms against 16-20 ms at 250 ms, for ~5% less peak
/// throughput; BENCHMARKS.md).
const INDEX_EVERY: Duration = Duration::from_millis(250);
/// Within a window, the indexer puts what arrived into the open transaction this often:
/// many small slices of B-tree work instead of one burst that would take a core from
/// the publish path for a fifth of a second.
const APPLY_EVERY: Duration = Duration::from_millis(100);
/// ... or once the frames waiting for it take this much memory, whichever comes first
/// (a flood of large notifications must not pile up in memory for a whole window).
const INDEX_BYTES: usize = 4 * 1024 * 1024;
/// Frames waiting for the indexer at most; then publishes wait for it (backpressure).
const MAX_UNINDEXED_BYTES: usize = 4 * INDEX_BYTES;
/// Journaled batches the indexer may lag behind; then the writer waits (backpressure),
/// which bounds the memory of rows not yet in SQLite.
const INDEX_QUEUE: usize = 4096;
/// Rows one prune transaction deletes at most (small in tests, so theirs take several).
const PRUNE_SLICE: usize = if cfg!(test) { 2 } else { 10_000 };
/// How often the indexer tries to checkpoint while sealed journal segments wait for it.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Every table but `notifications` ([`NOTIFICATIONS`]).
const SCHEMA: &str = "
CREATE TABLE users (
    user     TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE idempotency (
    user      TEXT NOT NULL,
    key       TEXT NOT NULL,
    id        TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    delivered INTEGER NOT NULL,
    ts_ms     INTEGER NOT NULL,
    PRIMARY KEY (user, key)
) WITHOUT ROWID;
CREATE INDEX idempotency_by_age ON idempotency (ts_ms);
";

/// The notifications table and its index; with [`SCHEMA`], the whole version 4 schema.
/// Rows are in the order they were indexed; [`Positions`] finds a user's.
const NOTIFICATIONS: &str = "
CREATE TABLE notifications (
    user  TEXT NOT NULL,
    seq   INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    frame TEXT NOT NULL
);
CREATE INDEX notifications_by_age ON notifications (ts_ms);
";

/// Rebuilds a version 1 or 2 `notifications` table (keyed by (user, seq)) as version 4's
/// rowid table, oldest rows first; the other tables are already version 4's.
fn rebuild_notifications() -> String {
    format!(
        "ALTER TABLE notifications RENAME TO notifications_v2;
         DROP INDEX notifications_by_age;
         {NOTIFICATIONS}
         INSERT INTO notifications (user, seq, ts_ms, frame)
             SELECT user, seq, ts_ms, frame FROM notifications_v2 ORDER BY ts_ms, user, seq;
         DROP TABLE notifications_v2;"
    )
}

/// What the store asks of its writer thread.
enum Command {
    Append {
        user: UserId,
        draft: Draft,
        reply: oneshot::Sender<Result<Appended, StoreError>>,
    },
    Delivered {
        user: UserId,
        key: String,
        delivered: usize,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// What the writer hands the indexer, in journal order.
enum IndexJob {
    Rows(Vec<Row>),
    Delivered {
        user: UserId,
        key: String,
        delivered: usize,
    },
    /// Every row of this segment came before; it may go once a checkpoint covers them.
    Sealed(SegmentNo),
    Close(oneshot::Sender<()>),
}

/// A journaled append on its way into SQLite.
struct Row {
    record: Record,
    /// The per-user count dropped the user's rows up to this seq.
    trim_through: Option<Seq>,
}

/// SQLite-backed [`Store`] with a journal in front. Appends go through one thread so seq
/// assignment is trivially atomic and many publishes share one `fdatasync`.
pub struct SqliteStore {
    commands: Mutex<Option<std_mpsc::Sender<Command>>>,
    readers: Arc<ReaderPool>,
    heads: Arc<Heads>,
    positions: Arc<Positions>,
    pending: Arc<Pending>,
    retention: Retention,
}

/// The stored range of every user with history: read once at open, then kept exact by
/// the writer (which sees every append) and published only once an append is durable.
/// Appends assign seqs without reading SQLite, and `head` answers from memory: a user it
/// does not know has no history (most subscribers, most of the time), so a subscribe
/// needs no SQLite read and no hop to a blocking thread. It costs one entry per user
/// with history, as the `users` table does on disk.
#[derive(Default)]
struct Heads(Mutex<HashMap<UserId, Cached>>);

#[derive(Debug, Clone, Copy)]
struct Cached {
    last_seq: Seq,
    /// The user's oldest stored row, `None` when nothing is stored. It may be older than
    /// the real one (a background prune, a row dropped by the per-user count): its age
    /// then sends `head` to SQLite, which finds the real one.
    oldest: Option<Oldest>,
}

#[derive(Debug, Clone, Copy)]
struct Oldest {
    seq: Seq,
    ts_ms: i64,
}

impl Cached {
    const NOTHING: Self = Self {
        last_seq: 0,
        oldest: None,
    };

    /// Takes the append of `seq` (the next one) and answers through which seq the
    /// per-user count drops the user's rows, if it drops any.
    fn push(&mut self, seq: Seq, ts_ms: i64, per_user: u64) -> Option<Seq> {
        self.last_seq = seq;
        let oldest = *self.oldest.get_or_insert(Oldest { seq, ts_ms });
        // Keeps the newest `per_user`; the row just written is never among those dropped.
        let keep_after = seq.saturating_sub(per_user);
        let trim_through = (oldest.seq <= keep_after).then_some(keep_after);
        if trim_through.is_some() {
            // The dropped row's age stands in for the new oldest's (never younger).
            self.oldest = Some(Oldest {
                seq: keep_after + 1,
                ts_ms: oldest.ts_ms,
            });
        }
        trim_through
    }
}

impl Heads {
    fn get(&self, user: &UserId) -> Option<Cached> {
        self.0.lock().ok()?.get(user).copied()
    }

    /// The head as `head` answers it, if memory knows it for `cutoff_ms`.
    fn head(&self, user: &UserId, cutoff_ms: i64) -> Option<Head> {
        let cached = self.get(user)?;
        match cached.oldest {
            None => Some(Head {
                first_seq: cached.last_seq + 1,
                last_seq: cached.last_seq,
            }),
            Some(oldest) if oldest.ts_ms >= cutoff_ms => Some(Head {
                first_seq: oldest.seq,
                last_seq: cached.last_seq,
            }),
            Some(_) => None,
        }
    }

    /// Every user with history, as the file holds it: the last seq (newest row, or what
    /// a prune recorded) and the oldest row; and where each row is. One pass over each
    /// table.
    fn load(conn: &Connection) -> rusqlite::Result<(Self, Positions)> {
        let mut heads: HashMap<UserId, Cached> = HashMap::new();
        let valid = |user: String| match UserId::parse(&user) {
            Ok(user) => Some(user),
            Err(e) => {
                tracing::warn!(user, error = %e, "store holds an invalid user id; ignored");
                None
            }
        };
        let mut recorded = conn.prepare("SELECT user, last_seq FROM users")?;
        let rows = recorded.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (user, last_seq) = row?;
            if let Some(user) = valid(user) {
                let cached = Cached {
                    last_seq: last_seq as Seq,
                    oldest: None,
                };
                heads.insert(user, cached);
            }
        }
        // One scan in table order; nothing is allocated per row, only per user.
        let mut positions: HashMap<UserId, VecDeque<(Seq, RowId)>> = HashMap::new();
        let mut refused = HashSet::new();
        let mut scan = conn.prepare("SELECT rowid, user, seq, ts_ms FROM notifications")?;
        let mut rows = scan.query([])?;
        while let Some(row) = rows.next()? {
            let name = row.get_ref(1)?.as_str().map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, e.into())
            })?;
            let (rowid, seq, ts_ms) = (row.get(0)?, row.get::<_, i64>(2)? as Seq, row.get(3)?);
            if !positions.contains_key(name) {
                if refused.contains(name) {
                    continue;
                }
                let Some(user) = valid(name.to_owned()) else {
                    refused.insert(name.to_owned());
                    continue;
                };
                heads.entry(user.clone()).or_insert(Cached::NOTHING);
                positions.insert(user, VecDeque::new());
            }
            if let Some(held) = positions.get_mut(name) {
                held.push_back((seq, rowid));
            }
            if let Some(cached) = heads.get_mut(name) {
                cached.last_seq = cached.last_seq.max(seq);
                if cached.oldest.is_none_or(|oldest| seq < oldest.seq) {
                    cached.oldest = Some(Oldest { seq, ts_ms });
                }
            }
        }
        Ok((Self(Mutex::new(heads)), Positions::new(positions)))
    }

    /// Takes the rows the journal replays at open, newer than any of their user's, and
    /// notes which of the user's older rows each one drops.
    fn replay(&self, rows: &mut [Row], per_user: u64) {
        if let Ok(mut heads) = self.0.lock() {
            for row in rows {
                let record = &row.record;
                let cached = heads.entry(record.user.clone()).or_insert(Cached::NOTHING);
                row.trim_through = cached.push(record.seq, record.ts_ms, per_user);
            }
        }
    }

    /// Publishes what one durable batch changed.
    fn apply(&self, staged: HashMap<UserId, Cached>) {
        if let Ok(mut heads) = self.0.lock() {
            heads.extend(staged);
        }
    }

    /// Replaces a stale oldest row with what SQLite found, unless an append got there first.
    fn refresh_oldest(&self, user: &UserId, seen: Cached, oldest: Option<Oldest>) {
        if let Ok(mut heads) = self.0.lock()
            && let Some(cached) = heads.get_mut(user)
            && cached.last_seq == seen.last_seq
        {
            cached.oldest = oldest;
        }
    }
}

impl SqliteStore {
    /// Opens (or creates) the store in folder `dir` and replays its journal into SQLite.
    /// Refuses anything it cannot read as its own schema; never truncates or overwrites
    /// an existing file, and touches nothing before the file is accepted.
    pub fn open(dir: &Path, retention: Retention, fsync: bool) -> Result<Self, StoreError> {
        let file = dir.join(DB_FILE);
        let open_err = |reason: String| StoreError::Open {
            path: file.display().to_string(),
            reason,
        };
        create_private_dir(dir).map_err(|e| StoreError::Open {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;

        let conn = Connection::open_with_flags(
            &file,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )
        .map_err(|e| open_err(e.to_string()))?;
        // Closing the last connection would otherwise checkpoint the WAL into the main
        // file and delete it: a refused start would write to the very store it refused.
        // `close` checkpoints explicitly instead.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map_err(|e| open_err(e.to_string()))?;
        prepare_index(&conn, fsync).map_err(open_err)?;

        let readers = Arc::new(ReaderPool::new(file.clone()));
        // Open one reader now so a store we can write but not read fails at start.
        let probe = readers.open().map_err(|e| open_err(e.to_string()))?;
        readers.put(probe);
        let lookup = readers.open().map_err(|e| open_err(e.to_string()))?;

        let (heads, positions) = Heads::load(&conn).map_err(|e| open_err(e.to_string()))?;
        let positions = Arc::new(positions);
        let pending = Arc::new(Pending::default());
        let spare = Arc::new(Spare::open(dir, fsync).map_err(|e| open_err(e.to_string()))?);
        let mut indexer = Indexer {
            conn,
            positions: Arc::clone(&positions),
            tx: Uncommitted::default(),
            dir: dir.to_path_buf(),
            retention,
            pending: Arc::clone(&pending),
            in_tx: false,
            broken: false,
            unindexed: Vec::new(),
            oldest_unindexed: None,
            sealed: Vec::new(),
            spare: Arc::clone(&spare),
            last_checkpoint: Instant::now(),
        };
        let replayed = indexer.recover(&heads).map_err(open_err)?;
        let heads = Arc::new(heads);
        let journal = Journal::create(dir, fsync, spare).map_err(|e| open_err(e.to_string()))?;

        let (index_tx, index_rx) = std_mpsc::sync_channel(INDEX_QUEUE);
        let indexer = thread::Builder::new()
            .name("herald-index".into())
            .spawn(move || indexer.run(index_rx))
            .map_err(|e| open_err(e.to_string()))?
            .thread()
            .clone();
        let (tx, rx) = std_mpsc::channel();
        let writer = Writer {
            journal,
            lookup,
            heads: Arc::clone(&heads),
            pending: Arc::clone(&pending),
            retention,
            index: index_tx,
            indexer,
            failed: None,
            batches: 0,
            commands: 0,
        };
        thread::Builder::new()
            .name("herald-store".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| open_err(e.to_string()))?;
        tracing::info!(path = %file.display(), fsync, replayed, rows = positions.len(), "store opened");
        Ok(Self {
            commands: Mutex::new(Some(tx)),
            readers,
            heads,
            positions,
            pending,
            retention,
        })
    }

    fn send(&self, cmd: Command) -> Result<(), StoreError> {
        let guard = self.commands.lock().map_err(|_| StoreError::Closed)?;
        guard
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(cmd)
            .map_err(|_| StoreError::Closed)
    }

    /// What retention shows of `user`'s rows now.
    fn visible(&self, user: &UserId) -> Visible {
        let last = self.heads.get(user).map_or(0, |h| h.last_seq);
        Visible {
            above_seq: last.saturating_sub(self.retention.per_user),
            since_ms: self.retention.cutoff_ms(),
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn append(&self, user: &UserId, draft: Draft) -> Result<Appended, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Append {
            user: user.clone(),
            draft,
            reply,
        })?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn read(
        &self,
        user: &UserId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Stored>, StoreError> {
        let visible = self.visible(user);
        // Memory before SQLite: a row the indexer commits in between is then in both.
        let unindexed = self.pending.read(user, after, limit, visible);
        if unindexed.first().is_some_and(|row| row.seq == after + 1) {
            // Everything after `after` is still in memory (rows are pending in seq order).
            return Ok(unindexed);
        }
        // Every indexed row after `after`: the first ones may be too old to show.
        let indexed = self.positions.after(user, after.max(visible.above_seq));
        let user = user.clone();
        let mut rows = self
            .readers
            .with(move |conn| {
                let mut rows = Vec::new();
                for (seq, rowid) in indexed {
                    if rows.len() == limit {
                        break;
                    }
                    let row = indexed_row(conn, rowid, &user, seq)?;
                    if let Some((_, frame)) = row.filter(|(ts_ms, _)| *ts_ms >= visible.since_ms) {
                        rows.push(Stored { seq, frame });
                    }
                }
                Ok(rows)
            })
            .await?;
        let newest = rows.last().map_or(after, |row| row.seq);
        let room = limit.saturating_sub(rows.len());
        rows.extend(
            unindexed
                .into_iter()
                .filter(|row| row.seq > newest)
                .take(room),
        );
        Ok(rows)
    }

    async fn head(&self, user: &UserId) -> Result<Head, StoreError> {
        if let Some(head) = self.heads.head(user, self.retention.cutoff_ms()) {
            return Ok(head);
        }
        let Some(seen) = self.heads.get(user) else {
            return Ok(Head {
                first_seq: 1,
                last_seq: 0,
            });
        };
        // The remembered oldest row expired or was dropped: the real one is the oldest
        // visible in SQLite, else in memory. Memory's last seq is exact.
        let visible = self.visible(user);
        let unindexed = self.pending.oldest(user, visible);
        let candidates = self.positions.after(user, visible.above_seq);
        let owner = user.clone();
        let indexed = self
            .readers
            .with(move |conn| {
                for (seq, rowid) in candidates {
                    if let Some((ts_ms, _)) = indexed_row(conn, rowid, &owner, seq)?
                        && ts_ms >= visible.since_ms
                    {
                        return Ok(Some((seq, ts_ms)));
                    }
                }
                Ok(None)
            })
            .await?;
        let oldest = indexed
            .or(unindexed)
            .map(|(seq, ts_ms)| Oldest { seq, ts_ms });
        self.heads.refresh_oldest(user, seen, oldest);
        Ok(Head {
            first_seq: oldest.map_or(seen.last_seq + 1, |o| o.seq),
            last_seq: seen.last_seq,
        })
    }

    async fn record_delivered(
        &self,
        user: &UserId,
        key: &str,
        delivered: usize,
    ) -> Result<(), StoreError> {
        self.send(Command::Delivered {
            user: user.clone(),
            key: key.to_owned(),
            delivered,
        })
    }

    async fn close(&self) -> Result<(), StoreError> {
        let sender = self.commands.lock().map_err(|_| StoreError::Closed)?.take();
        let Some(sender) = sender else { return Ok(()) };
        let (reply, done) = oneshot::channel();
        sender
            .send(Command::Close { reply })
            .map_err(|_| StoreError::Closed)?;
        let _ = done.await;
        Ok(())
    }
}

/// The single writer: assigns seqs, journals each batch with one sync, then answers.
struct Writer {
    journal: Journal,
    /// Read-only: idempotency keys the index already holds.
    lookup: Connection,
    heads: Arc<Heads>,
    pending: Arc<Pending>,
    retention: Retention,
    index: std_mpsc::SyncSender<IndexJob>,
    /// Woken only when it must not sleep out its window: a close, a full queue.
    indexer: thread::Thread,
    /// Set when a journal write failed: what reached the disk is unknown, so no later
    /// append may reuse its seqs. A restart replays whatever is whole.
    failed: Option<String>,
    batches: u64,
    commands: u64,
}

/// One batch being staged: heads and keys it changed, published once it is durable.
#[derive(Default)]
struct Staged {
    heads: HashMap<UserId, Cached>,
    keys: HashMap<(UserId, String), Receipt>,
    rows: Vec<Row>,
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Command>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            self.batches += 1;
            self.commands += batch.len() as u64;
            if let Some(reply) = self.commit(batch) {
                tracing::info!(
                    batches = self.batches,
                    commands = self.commands,
                    "store writer closed"
                );
                self.to_index(IndexJob::Sealed(self.journal.segment()));
                self.to_index(IndexJob::Close(reply));
                self.indexer.unpark();
                return;
            }
        }
    }

    /// Queues a job without waking the indexer, unless the queue is full: then it wakes
    /// it and waits for room (backpressure on publishes).
    fn to_index(&self, job: IndexJob) {
        match self.index.try_send(job) {
            Ok(()) | Err(std_mpsc::TrySendError::Disconnected(_)) => {}
            Err(std_mpsc::TrySendError::Full(job)) => {
                self.indexer.unpark();
                let _ = self.index.send(job);
            }
        }
    }

    /// Journals one batch; answers every append only once its record is durable.
    fn commit(&mut self, batch: Vec<Command>) -> Option<oneshot::Sender<()>> {
        let cutoff = self.retention.cutoff_ms();
        let mut staged = Staged::default();
        let mut replies = Vec::with_capacity(batch.len());
        let mut later = Vec::new();
        let mut close = None;
        for cmd in batch {
            match cmd {
                Command::Append { user, draft, reply } => {
                    let outcome = match &self.failed {
                        Some(failure) => Err(StoreError::Backend(format!(
                            "the journal failed earlier ({failure}); restart Herald"
                        ))),
                        None => self.stage(&user, draft, cutoff, &mut staged),
                    };
                    replies.push((reply, outcome));
                }
                Command::Delivered {
                    user,
                    key,
                    delivered,
                } => {
                    self.pending.set_delivered(&user, &key, delivered);
                    later.push(IndexJob::Delivered {
                        user,
                        key,
                        delivered,
                    });
                }
                Command::Close { reply } => close = Some(reply),
            }
        }
        let mut behind = false;
        if !staged.rows.is_empty() {
            match self
                .journal
                .append(staged.rows.iter().map(|row| &row.record))
            {
                Ok(()) => {
                    // Rows before heads: whoever sees a new last seq also finds its row.
                    let held = self.pending.add(staged.rows.iter().map(|row| &row.record));
                    self.heads.apply(staged.heads);
                    // Blocks while the indexer is INDEX_QUEUE batches behind.
                    self.to_index(IndexJob::Rows(staged.rows));
                    if held >= INDEX_BYTES {
                        self.indexer.unpark();
                    }
                    behind = held >= MAX_UNINDEXED_BYTES;
                }
                Err(e) => {
                    tracing::error!(error = %e, "journal write failed; appends refused until a restart");
                    let failure = e.to_string();
                    for (_, outcome) in &mut replies {
                        *outcome = Err(StoreError::Backend(failure.clone()));
                    }
                    self.failed = Some(failure);
                }
            }
        }
        for job in later {
            self.to_index(job);
        }
        for (reply, outcome) in replies {
            let _ = reply.send(outcome);
        }
        if behind {
            // This batch is answered; the next waits until the indexer catches up.
            self.pending.wait_below(MAX_UNINDEXED_BYTES);
        }
        if self.failed.is_none() && self.journal.is_full() {
            match self.journal.rotate() {
                Ok(sealed) => {
                    self.to_index(IndexJob::Sealed(sealed));
                }
                Err(e) => {
                    tracing::error!(error = %e, "journal rotation failed; appends refused until a restart");
                    self.failed = Some(e.to_string());
                }
            }
        }
        close
    }

    /// Gives the append its seq and frame, or finds the receipt of its idempotency key.
    fn stage(
        &self,
        user: &UserId,
        draft: Draft,
        cutoff: i64,
        staged: &mut Staged,
    ) -> Result<Appended, StoreError> {
        if let Some(key) = &draft.idempotency_key
            && let Some(receipt) = self.receipt(user, key, cutoff, staged)?
        {
            return Ok(Appended::Duplicate(receipt));
        }
        let mut head = match staged.heads.get(user) {
            Some(head) => *head,
            None => self.heads.get(user).unwrap_or(Cached::NOTHING),
        };
        let seq = head.last_seq + 1;
        let frame = draft.frame(seq);
        let trim_through = head.push(seq, draft.ts_ms, self.retention.per_user);
        staged.heads.insert(user.clone(), head);
        let key = draft.idempotency_key.map(|key| {
            let receipt = Receipt {
                id: draft.id.clone(),
                seq,
                delivered: 0,
            };
            staged.keys.insert((user.clone(), key.clone()), receipt);
            (key, draft.id.clone())
        });
        let record = Record {
            user: user.clone(),
            seq,
            ts_ms: draft.ts_ms,
            frame: frame.clone(),
            key,
        };
        staged.rows.push(Row {
            record,
            trim_through,
        });
        Ok(Appended::New(Notification {
            user: user.clone(),
            id: draft.id,
            seq,
            frame,
        }))
    }

    /// The first receipt for `key` within retention: this batch, then memory, then SQLite
    /// (the indexer drops a key from memory only after committing it).
    fn receipt(
        &self,
        user: &UserId,
        key: &str,
        cutoff: i64,
        staged: &Staged,
    ) -> Result<Option<Receipt>, StoreError> {
        if let Some(receipt) = staged.keys.get(&(user.clone(), key.to_owned())) {
            return Ok(Some(receipt.clone()));
        }
        if let Some(receipt) = self.pending.receipt(user, key, cutoff) {
            return Ok(Some(receipt));
        }
        self.lookup
            .prepare_cached(
                "SELECT id, seq, delivered FROM idempotency WHERE user = ?1 AND key = ?2 AND ts_ms >= ?3",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![user.as_str(), key, cutoff], |r| {
                    Ok(Receipt {
                        id: r.get(0)?,
                        seq: r.get::<_, i64>(1)? as Seq,
                        delivered: r.get::<_, i64>(2)? as usize,
                    })
                })
                .optional()
            })
            .map_err(|e| StoreError::Backend(e.to_string()))
    }
}

/// Puts journaled rows into SQLite: one open transaction, committed every [`INDEX_EVERY`]
/// without a sync; a checkpoint syncs it before the journal segments it covers go.
struct Indexer {
    conn: Connection,
    positions: Arc<Positions>,
    /// What the open transaction did to rows, for `positions` once it commits.
    tx: Uncommitted,
    dir: PathBuf,
    retention: Retention,
    pending: Arc<Pending>,
    in_tx: bool,
    /// A statement failed: the open transaction is rolled back and redone at the next commit.
    broken: bool,
    /// Rows in the open transaction, oldest first; memory serves them until it commits.
    unindexed: Vec<Row>,
    oldest_unindexed: Option<Instant>,
    sealed: Vec<SegmentNo>,
    /// Where a retired segment waits, zeroed, to be the writer's next one.
    spare: Arc<Spare>,
    last_checkpoint: Instant,
}

/// Rows the open transaction inserted and deleted.
#[derive(Default)]
struct Uncommitted {
    /// Each user's new rows, in seq order.
    added: HashMap<UserId, Vec<(Seq, RowId)>>,
    /// Rows the per-user count deleted.
    dropped: Vec<(UserId, Seq)>,
    /// Through which seq each user's rows are deleted already.
    trimmed: HashMap<UserId, Seq>,
}

impl Indexer {
    fn run(mut self, rx: std_mpsc::Receiver<IndexJob>) {
        let prune_every =
            (self.retention.max_age / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut last_prune = Instant::now();
        loop {
            let next = match self.oldest_unindexed {
                // Idle: the first job wakes it.
                None => rx.recv_timeout(prune_every.saturating_sub(last_prune.elapsed())),
                // Rows wait: wake every APPLY_EVERY rather than for every batch (a wake-up
                // per batch cost more CPU than indexing it), then take all queued.
                Some(since) => {
                    let due = INDEX_EVERY.saturating_sub(since.elapsed());
                    thread::park_timeout(due.min(APPLY_EVERY));
                    rx.try_recv().map_err(|e| match e {
                        std_mpsc::TryRecvError::Empty => std_mpsc::RecvTimeoutError::Timeout,
                        std_mpsc::TryRecvError::Disconnected => {
                            std_mpsc::RecvTimeoutError::Disconnected
                        }
                    })
                }
            };
            let mut job = match next {
                Ok(job) => Some(job),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    self.flush();
                    return;
                }
            };
            while let Some(current) = job {
                match current {
                    IndexJob::Rows(rows) => {
                        for row in rows {
                            self.apply(row);
                        }
                    }
                    IndexJob::Delivered {
                        user,
                        key,
                        delivered,
                    } => self.record_delivered(&user, &key, delivered),
                    IndexJob::Sealed(segment) => self.sealed.push(segment),
                    IndexJob::Close(reply) => {
                        self.close();
                        let _ = reply.send(());
                        return;
                    }
                }
                job = rx.try_recv().ok();
            }
            let due = self
                .oldest_unindexed
                .is_some_and(|since| since.elapsed() >= INDEX_EVERY);
            if due || self.pending.bytes() >= INDEX_BYTES {
                self.flush();
                if !self.sealed.is_empty()
                    && self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY
                    && self.checkpoint("PASSIVE")
                {
                    self.retire_sealed();
                }
            }
            if last_prune.elapsed() >= prune_every {
                self.flush();
                self.prune();
                last_prune = Instant::now();
            }
        }
    }

    /// Replays the journal into SQLite (rows it does not hold yet), commits and checkpoints,
    /// then deletes the replayed segments. Answers how many rows it replayed.
    /// `heads` is what the file holds; it takes the replayed rows too.
    fn recover(&mut self, heads: &Heads) -> Result<usize, String> {
        let mut last: HashMap<UserId, Seq> = HashMap::new();
        let mut replayed = Vec::new();
        let segments = journal::replay(&self.dir, |record| {
            let known = last
                .entry(record.user.clone())
                .or_insert_with(|| heads.get(&record.user).map_or(0, |h| h.last_seq));
            if record.seq > *known {
                *known = record.seq;
                replayed.push(Row {
                    record,
                    trim_through: None,
                });
            }
        })
        .map_err(|e| e.to_string())?;
        heads.replay(&mut replayed, self.retention.per_user);
        let count = replayed.len();
        if count > 0 {
            tracing::warn!(
                rows = count,
                "replaying journaled appends the index did not hold (the last stop was not clean)"
            );
        }
        self.begin().map_err(|e| e.to_string())?;
        for row in &replayed {
            self.write(row).map_err(|e| e.to_string())?;
        }
        self.commit().map_err(|e| e.to_string())?;
        self.sealed = segments;
        if !self.sealed.is_empty() && self.checkpoint("TRUNCATE") {
            self.remove_sealed();
        }
        Ok(count)
    }

    fn begin(&mut self) -> rusqlite::Result<()> {
        if !self.in_tx {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            self.in_tx = true;
        }
        Ok(())
    }

    /// Adds a journaled row to the open transaction.
    fn apply(&mut self, row: Row) {
        if !self.broken
            && let Err(e) = self.begin().and_then(|()| self.write(&row))
        {
            tracing::error!(error = %e, "indexing failed; retried at the next commit (the journal holds the rows)");
            self.broken = true;
        }
        self.oldest_unindexed.get_or_insert_with(Instant::now);
        self.unindexed.push(row);
    }

    fn write(&mut self, row: &Row) -> rusqlite::Result<()> {
        let r = &row.record;
        self.conn
            .prepare_cached(
                "INSERT INTO notifications (user, seq, ts_ms, frame) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![r.user.as_str(), r.seq as i64, r.ts_ms, &*r.frame])?;
        let rowid = self.conn.last_insert_rowid();
        let added = self.tx.added.entry(r.user.clone()).or_default();
        added.push((r.seq, rowid));
        if let Some(through) = row.trim_through {
            self.trim(&r.user, through)?;
        }
        if let Some((key, id)) = &r.key {
            self.conn
                .prepare_cached(
                    "INSERT OR REPLACE INTO idempotency (user, key, id, seq, delivered, ts_ms) VALUES (?1, ?2, ?3, ?4, 0, ?5)",
                )?
                .execute(params![r.user.as_str(), key, id, r.seq as i64, r.ts_ms])?;
        }
        Ok(())
    }

    /// Deletes the user's rows up to `through` that this transaction has not deleted yet.
    fn trim(&mut self, user: &UserId, through: Seq) -> rusqlite::Result<()> {
        let done = self.tx.trimmed.get(user).copied().unwrap_or(0);
        if through <= done {
            return Ok(());
        }
        let committed = self.positions.through(user, through);
        let uncommitted = self.tx.added.get(user).into_iter().flatten().copied();
        let mut delete = self
            .conn
            .prepare_cached("DELETE FROM notifications WHERE rowid = ?1")?;
        for (seq, rowid) in committed.into_iter().chain(uncommitted) {
            if seq > through {
                break;
            }
            if seq > done {
                delete.execute([rowid])?;
                self.tx.dropped.push((user.clone(), seq));
            }
        }
        self.tx.trimmed.insert(user.clone(), through);
        Ok(())
    }

    /// Commits the open transaction and tells `positions` what it did.
    fn commit(&mut self) -> rusqlite::Result<()> {
        self.in_tx = false;
        let committed = self.conn.execute_batch("COMMIT");
        let tx = std::mem::take(&mut self.tx);
        committed?;
        self.positions
            .add(tx.added.into_iter().flat_map(|(user, rows)| {
                rows.into_iter()
                    .map(move |(seq, rowid)| (user.clone(), seq, rowid))
            }));
        self.positions.remove(tx.dropped);
        Ok(())
    }

    /// Commits the open transaction; then memory lets its rows go. A failed commit is
    /// rolled back and redone from `unindexed` next time.
    fn flush(&mut self) {
        if !self.in_tx && self.unindexed.is_empty() {
            return;
        }
        let committed = (|| {
            if self.broken {
                if self.in_tx {
                    self.in_tx = false;
                    self.tx = Uncommitted::default();
                    self.conn.execute_batch("ROLLBACK")?;
                }
                self.begin()?;
                let rows = std::mem::take(&mut self.unindexed);
                let rewritten = rows.iter().try_for_each(|row| self.write(row));
                self.unindexed = rows;
                rewritten?;
            }
            self.commit()
        })();
        match committed {
            Ok(()) => {
                self.broken = false;
                self.oldest_unindexed = None;
                self.pending
                    .indexed(self.unindexed.iter().map(|row| &row.record));
                self.unindexed.clear();
            }
            Err(e) => {
                tracing::error!(error = %e, rows = self.unindexed.len(), "index commit failed; retried (the journal holds the rows)");
                self.in_tx = false;
                self.tx = Uncommitted::default();
                let _ = self.conn.execute_batch("ROLLBACK");
                self.broken = true;
                self.oldest_unindexed = Some(Instant::now());
            }
        }
    }

    fn record_delivered(&mut self, user: &UserId, key: &str, delivered: usize) {
        let updated = self.begin().and_then(|()| {
            self.conn
                .prepare_cached(
                    "UPDATE idempotency SET delivered = ?3 WHERE user = ?1 AND key = ?2",
                )?
                .execute(params![user.as_str(), key, delivered as i64])
        });
        if let Err(e) = updated {
            // Only what a repeated publish reports as `delivered` is at stake.
            tracing::warn!(error = %e, "recording a delivered count failed");
        }
        self.oldest_unindexed.get_or_insert_with(Instant::now);
    }

    /// Copies the WAL into the main file and syncs both. True when that covered everything:
    /// the sealed journal segments are redundant then.
    fn checkpoint(&mut self, mode: &str) -> bool {
        self.last_checkpoint = Instant::now();
        let done = self
            .conn
            .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            });
        match done {
            Ok((0, log, copied)) if log == copied => true,
            // Readers still use older pages: the segments wait for the next checkpoint.
            Ok(_) => {
                tracing::debug!("checkpoint incomplete; journal segments kept");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "checkpoint failed; journal segments kept");
                false
            }
        }
    }

    /// While serving: the newest sealed segment becomes the spare when there is none (a
    /// delete stalled the publish path's `fdatasync`, see `spare.rs`), the rest go.
    fn retire_sealed(&mut self) {
        if let Some(&newest) = self.sealed.last() {
            match self.spare.recycle(newest) {
                Ok(true) => {
                    self.sealed.pop();
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "journal segment not recycled; deleted"),
            }
        }
        self.remove_sealed();
    }

    fn remove_sealed(&mut self) {
        match journal::remove(&self.dir, &self.sealed) {
            Ok(()) => self.sealed.clear(),
            Err(e) => tracing::warn!(error = %e, "journal segment not deleted"),
        }
    }

    fn close(mut self) {
        self.flush();
        self.prune();
        if self.checkpoint("TRUNCATE") {
            self.remove_sealed();
        }
        if let Err(e) = self.spare.discard() {
            tracing::warn!(error = %e, "spare journal segment not deleted");
        }
        tracing::info!(unindexed = self.unindexed.len(), "store closed");
    }

    fn prune(&mut self) {
        if !self.unindexed.is_empty() {
            // Retention decisions read committed rows; a failing index waits for its retry.
            return;
        }
        let cutoff = self.retention.cutoff_ms();
        let mut notifications = 0;
        let result = (|| -> rusqlite::Result<usize> {
            let tx = self.conn.unchecked_transaction()?;
            // A user's last seq outlives their rows: it is never handed out again.
            tx.execute(
                "INSERT INTO users (user, last_seq)
                 SELECT user, MAX(seq) FROM notifications WHERE ts_ms < ?1 GROUP BY user
                 ON CONFLICT (user) DO UPDATE SET last_seq = MAX(last_seq, excluded.last_seq)",
                [cutoff],
            )?;
            let keys = tx.execute("DELETE FROM idempotency WHERE ts_ms < ?1", [cutoff])?;
            tx.commit()?;
            // In slices, each forgotten by `positions` once committed: the first prune after a
            // long stop may delete millions of rows, and their list would be held at once.
            loop {
                let tx = self.conn.unchecked_transaction()?;
                let deleted = tx
                    .prepare_cached(
                        "DELETE FROM notifications WHERE rowid IN
                           (SELECT rowid FROM notifications WHERE ts_ms < ?1 LIMIT ?2)
                         RETURNING user, seq",
                    )?
                    .query_map(params![cutoff, PRUNE_SLICE as i64], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as Seq))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                tx.commit()?;
                notifications += deleted.len();
                let slice_was_full = deleted.len() == PRUNE_SLICE;
                self.positions.remove(
                    deleted
                        .into_iter()
                        .filter_map(|(user, seq)| UserId::parse(&user).ok().map(|u| (u, seq))),
                );
                if !slice_was_full {
                    return Ok(keys);
                }
            }
        })();
        match result {
            Ok(0) if notifications == 0 => {}
            Ok(keys) => tracing::debug!(notifications, keys, "retention pruned"),
            Err(e) => tracing::warn!(error = %e, notifications, "retention prune failed"),
        }
    }
}

/// The age and frame of the row `positions` put at `rowid`, if it is still there: a read
/// can race a delete (SQLite may reuse a deleted rowid, so the row must be the user's).
fn indexed_row(
    conn: &Connection,
    rowid: RowId,
    user: &UserId,
    seq: Seq,
) -> rusqlite::Result<Option<(i64, ByteString)>> {
    conn.prepare_cached(
        "SELECT ts_ms, frame FROM notifications WHERE rowid = ?1 AND user = ?2 AND seq = ?3",
    )?
    .query_row(params![rowid, user.as_str(), seq as i64], |r| {
        Ok((r.get(0)?, ByteString::from(r.get::<_, String>(1)?)))
    })
    .optional()
}

/// Sets the pragmas and checks (or creates) the schema. Errors name what is wrong.
fn prepare_index(conn: &Connection, fsync: bool) -> Result<(), String> {
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(|e| format!("not a readable SQLite database ({e})"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("could not switch to WAL mode (got {mode})"));
    }
    // NORMAL: commits are not synced (the journal is the durable copy); checkpoints are,
    // and only a completed one lets journal segments go. The WAL checkpoints at SQLite's
    // default of 1,000 pages: at 10,000, each checkpoint synced ~40 MB at once, and the
    // journal's `fdatasync` waited behind it (up to 174 ms; fixed-rate p99 42-79 ms
    // against 22-29 ms at 1,000 and at 300, BENCHMARKS.md).
    let sync = if fsync { "NORMAL" } else { "OFF" };
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync}; PRAGMA cache_size = -{INDEX_CACHE_KIB};"
    ))
    .map_err(|e| e.to_string())?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    let tables: i64 = conn
        .query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))
        .map_err(|e| format!("not a readable SQLite database ({e})"))?;
    match (version, tables) {
        (0, 0) => conn
            .execute_batch(&format!(
                "BEGIN; {SCHEMA} {NOTIFICATIONS} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))
            .map_err(|e| e.to_string()),
        (SCHEMA_VERSION, _) => Ok(()),
        (1..=3, _) => {
            tracing::info!(
                from = version,
                to = SCHEMA_VERSION,
                "upgrading the store's schema"
            );
            let upgrade = match version {
                3 => "DROP INDEX notifications_by_user;".to_owned(),
                _ => rebuild_notifications(),
            };
            conn.execute_batch(&format!(
                "BEGIN; {upgrade} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))
            .map_err(|e| format!("upgrading schema version {version} failed ({e})"))
        }
        (0, _) => Err("the file holds tables that are not Herald's; refusing to touch it".into()),
        (other, _) => Err(format!(
            "schema version {other}, this Herald reads version {SCHEMA_VERSION}"
        )),
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if dir.exists() {
        // Creating it would fail with a bare "File exists", which does not say what is wrong.
        return Err(std::io::Error::other(
            "exists and is not a folder (store.path names a folder)",
        ));
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Read connections, reused; reads run on tokio's blocking pool.
struct ReaderPool {
    file: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Semaphore,
}

impl ReaderPool {
    fn new(file: PathBuf) -> Self {
        Self {
            file,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(MAX_READERS),
        }
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(&self.file, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // Reads the schema and the table's first page: a file this connection cannot
        // read fails here, at once, however many rows it holds.
        conn.prepare("SELECT 1 FROM notifications LIMIT 1")?
            .exists([])?;
        Ok(conn)
    }

    fn put(&self, conn: Connection) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(conn);
        }
    }

    async fn with<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Closed)?;
        let pool = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let conn = match pool.idle.lock().ok().and_then(|mut idle| idle.pop()) {
                Some(conn) => conn,
                None => pool
                    .open()
                    .map_err(|e| StoreError::Backend(e.to_string()))?,
            };
            let result = f(&conn).map_err(|e| StoreError::Backend(e.to_string()));
            pool.put(conn);
            result
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;
    use crate::store::journal::{Journal, Record};
    use crate::store::now_ms;
    use crate::store::spare;

    fn open(dir: &Path, retention: Retention) -> SqliteStore {
        SqliteStore::open(dir, retention, true).expect("store opens")
    }

    /// The head of a user holding `first..=last`.
    fn range(first_seq: Seq, last_seq: Seq) -> Head {
        Head {
            first_seq,
            last_seq,
        }
    }

    /// Appends a draft without an idempotency key and answers the seq it got.
    async fn next_seq(store: &SqliteStore, user: &UserId) -> Seq {
        match store
            .append(user, conformance::draft(9, None))
            .await
            .unwrap()
        {
            Appended::New(n) => n.seq,
            Appended::Duplicate(_) => panic!("a draft without a key is never a duplicate"),
        }
    }

    #[actix_rt::test]
    async fn passes_the_store_conformance_suite() {
        conformance::run_all(|retention| {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path(), retention);
            (store, dir)
        })
        .await;
    }

    #[actix_rt::test]
    async fn history_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let user = UserId::parse("alice").unwrap();
        {
            let store = open(dir.path(), conformance::LONG);
            for i in 0..3 {
                store
                    .append(&user, conformance::draft(i, None))
                    .await
                    .unwrap();
            }
            store.close().await.unwrap();
        }
        let store = open(dir.path(), conformance::LONG);
        assert_eq!(store.head(&user).await.unwrap(), range(1, 3));
        assert_eq!(
            next_seq(&store, &user).await,
            4,
            "seqs continue after a restart"
        );
        let nobody = UserId::parse("nobody").unwrap();
        assert_eq!(
            store.head(&nobody).await.unwrap(),
            range(1, 0),
            "a user the reopened store never stored anything for"
        );
    }

    #[actix_rt::test]
    async fn journaled_appends_the_index_never_got_are_replayed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let user = UserId::parse("alice").unwrap();
        let store = open(dir.path(), conformance::LONG);
        next_seq(&store, &user).await;
        store.close().await.unwrap();
        assert_eq!(
            journal::segments(dir.path()).unwrap(),
            vec![],
            "a clean stop"
        );
        // What a crash leaves behind: appends journaled (and answered) but not in SQLite;
        // seq 1 is in both.
        let record = |seq: Seq| Record {
            user: user.clone(),
            seq,
            ts_ms: now_ms(),
            frame: ByteString::from(format!(r#"{{"seq":{seq}}}"#)),
            key: (seq == 3).then(|| ("k".to_owned(), "n-3".to_owned())),
        };
        let spare = Arc::new(Spare::open(dir.path(), true).unwrap());
        let mut journal = Journal::create(dir.path(), true, spare).unwrap();
        journal.append(&[record(1), record(2), record(3)]).unwrap();
        drop(journal);

        let store = open(dir.path(), conformance::LONG);
        assert_eq!(store.head(&user).await.unwrap(), range(1, 3));
        let read = store.read(&user, 0, 10).await.unwrap();
        let seqs: Vec<Seq> = read.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3], "replayed once each");
        assert_eq!(&*read[1].frame, r#"{"seq":2}"#);
        match store
            .append(&user, conformance::draft(7, Some("k")))
            .await
            .unwrap()
        {
            Appended::Duplicate(receipt) => {
                assert_eq!((receipt.id.as_str(), receipt.seq), ("n-3", 3))
            }
            Appended::New(n) => panic!("the replayed key was forgotten: got seq {}", n.seq),
        }
        assert_eq!(
            next_seq(&store, &user).await,
            4,
            "seqs continue after the replay"
        );
        store.close().await.unwrap();
        assert_eq!(
            journal::segments(dir.path()).unwrap(),
            vec![],
            "segments go once a checkpoint holds their rows"
        );
    }

    #[actix_rt::test]
    async fn a_retired_journal_segment_becomes_a_later_one_not_deleted() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), conformance::LONG);
        let user = UserId::parse("alice").unwrap();
        let spare_inode = || std::fs::metadata(dir.path().join(spare::SPARE)).map(|m| m.ino());
        let segment_inodes = || {
            journal::segments(dir.path())
                .unwrap()
                .into_iter()
                .map(|no| {
                    std::fs::metadata(journal::segment_path(dir.path(), no))
                        .unwrap()
                        .ino()
                })
                .collect::<Vec<_>>()
        };
        let mut appended = 0;
        let mut append_until = async |done: &dyn Fn() -> bool| {
            for _ in 0..5_000 {
                if done() {
                    return;
                }
                appended += 1;
                store
                    .append(&user, conformance::draft(appended, None))
                    .await
                    .unwrap();
                // Slow enough for the indexer's commits and checkpoints to come round.
                if appended % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            panic!("never happened");
        };
        append_until(&|| spare_inode().is_ok()).await;
        let recycled = spare_inode().unwrap();
        assert!(
            !segment_inodes().contains(&recycled),
            "retired: the spare now, under a name replay never reads"
        );
        append_until(&|| segment_inodes().contains(&recycled)).await;
        let seqs = seqs_read(&store, &user).await;
        let kept = appended.min(conformance::LONG.per_user);
        assert_eq!(
            seqs,
            ((appended - kept + 1)..=appended).collect::<Vec<_>>(),
            "every row readable, none twice"
        );
        store.close().await.unwrap();
        assert!(spare_inode().is_err(), "a clean stop leaves no spare");
        let store = open(dir.path(), conformance::LONG);
        assert_eq!(store.read(&user, 0, 1000).await.unwrap().len() as u64, kept);
        store.close().await.unwrap();
    }

    #[actix_rt::test]
    async fn the_background_prune_deletes_expired_rows_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            per_user: 1000,
            // Long enough to see the rows reach the file first (the indexer commits
            // within INDEX_EVERY), short enough for the prune to come soon after.
            max_age: Duration::from_secs(2),
        };
        let store = open(dir.path(), retention);
        let user = UserId::parse("alice").unwrap();
        for i in 0..5 {
            store
                .append(&user, conformance::draft(i, Some(&format!("k{i}"))))
                .await
                .unwrap();
        }
        let rows = |table: &str| -> i64 {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while (rows("notifications"), rows("idempotency")) != (5, 5) {
            assert!(std::time::Instant::now() < deadline, "never indexed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Idle, the indexer prunes at least once a second (in slices of PRUNE_SLICE rows);
        // reads only hide expired rows. Memory forgets where the rows were.
        while rows("notifications") + rows("idempotency") > 0 || store.positions.len() > 0 {
            assert!(std::time::Instant::now() < deadline, "never pruned");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            store.head(&user).await.unwrap().last_seq,
            5,
            "the seq survives"
        );
        store.close().await.unwrap();
        // Memory is gone too now: the seq must come from the file.
        let store = open(dir.path(), retention);
        assert_eq!(store.head(&user).await.unwrap(), range(6, 5));
        assert_eq!(
            next_seq(&store, &user).await,
            6,
            "a pruned seq is never handed out again"
        );
        store.close().await.unwrap();
    }

    /// What a read of `user`'s whole history answers: seq and frame of each row.
    async fn frames(store: &SqliteStore, user: &UserId) -> Vec<(Seq, String)> {
        let read = store.read(user, 0, 100).await.unwrap();
        read.into_iter()
            .map(|n| (n.seq, n.frame.to_string()))
            .collect()
    }

    /// The seqs a read of `user`'s whole history answers, oldest first.
    async fn seqs_read(store: &SqliteStore, user: &UserId) -> Vec<Seq> {
        let read = store.read(user, 0, 1000).await.unwrap();
        read.iter().map(|n| n.seq).collect()
    }

    fn user_version(dir: &Path) -> i64 {
        let conn = Connection::open(dir.join(DB_FILE)).unwrap();
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    /// The seqs of `user`'s rows in the file, in table order.
    fn seqs_in_file(dir: &Path, user: &str) -> Vec<i64> {
        let conn = Connection::open(dir.join(DB_FILE)).unwrap();
        conn.prepare("SELECT seq FROM notifications WHERE user = ?1 ORDER BY rowid")
            .unwrap()
            .query_map([user], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[actix_rt::test]
    async fn the_per_user_count_deletes_rows_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            per_user: 3,
            max_age: Duration::from_secs(3600),
        };
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        // Rows dropped in the transaction that added them ...
        let store = open(dir.path(), retention);
        for _ in 0..5 {
            next_seq(&store, &alice).await;
        }
        next_seq(&store, &bob).await;
        store.close().await.unwrap();
        assert_eq!(seqs_in_file(dir.path(), "alice"), [3, 4, 5]);
        // ... and rows an earlier run committed, found again after a restart.
        let store = open(dir.path(), retention);
        assert_eq!(store.head(&alice).await.unwrap(), range(3, 5));
        for _ in 0..2 {
            next_seq(&store, &alice).await;
        }
        store.close().await.unwrap();
        assert_eq!(seqs_in_file(dir.path(), "alice"), [5, 6, 7]);
        assert_eq!(
            seqs_in_file(dir.path(), "bob"),
            [1],
            "nobody else's rows go"
        );
        let store = open(dir.path(), retention);
        assert_eq!(seqs_read(&store, &alice).await, [5, 6, 7]);
        store.close().await.unwrap();
    }

    #[actix_rt::test]
    async fn a_version_3_store_drops_its_user_index_and_keeps_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(DB_FILE);
        let conn = Connection::open(&file).unwrap();
        let now = now_ms();
        conn.execute_batch(&format!(
            "{SCHEMA}
             CREATE TABLE notifications (
                 user TEXT NOT NULL, seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, frame TEXT NOT NULL
             );
             CREATE UNIQUE INDEX notifications_by_user ON notifications (user, seq);
             CREATE INDEX notifications_by_age ON notifications (ts_ms);
             INSERT INTO notifications VALUES
                 ('alice', 1, {now}, 'a1'), ('bob', 1, {now}, 'b1'), ('alice', 2, {now}, 'a2');
             INSERT INTO users VALUES ('carol', 9);
             PRAGMA user_version = 3;"
        ))
        .unwrap();
        drop(conn);

        let store = open(dir.path(), conformance::LONG);
        let alice = UserId::parse("alice").unwrap();
        assert_eq!(
            frames(&store, &alice).await,
            [(1, "a1".to_owned()), (2, "a2".to_owned())]
        );
        assert_eq!(store.read(&alice, 1, 10).await.unwrap().len(), 1);
        assert_eq!(next_seq(&store, &alice).await, 3);
        let carol = UserId::parse("carol").unwrap();
        assert_eq!(next_seq(&store, &carol).await, 10);
        store.close().await.unwrap();

        assert_eq!(user_version(dir.path()), SCHEMA_VERSION);
        let conn = Connection::open(&file).unwrap();
        let indexes: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'notifications_by_user'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 0, "the index is gone");
    }

    /// Versions 1 and 2 as they were created: `notifications` keyed by (user, seq).
    const SCHEMA_1_AND_2: &str = "
        CREATE TABLE users (user TEXT PRIMARY KEY, last_seq INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE notifications (
            user TEXT NOT NULL, seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, frame TEXT NOT NULL,
            PRIMARY KEY (user, seq)
        ) WITHOUT ROWID;
        CREATE INDEX notifications_by_age ON notifications (ts_ms);
        CREATE TABLE idempotency (
            user TEXT NOT NULL, key TEXT NOT NULL, id TEXT NOT NULL, seq INTEGER NOT NULL,
            delivered INTEGER NOT NULL, ts_ms INTEGER NOT NULL, PRIMARY KEY (user, key)
        ) WITHOUT ROWID;
        CREATE INDEX idempotency_by_age ON idempotency (ts_ms);
    ";

    #[actix_rt::test]
    async fn version_1_and_2_stores_are_rebuilt_in_place() {
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        for old in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join(DB_FILE);
            let conn = Connection::open(&file).unwrap();
            conn.execute_batch(SCHEMA_1_AND_2).unwrap();
            let now = now_ms();
            // Inserted newest first: the rebuild puts them in age order.
            for seq in (1..=3).rev() {
                conn.execute(
                    "INSERT INTO notifications VALUES ('alice', ?1, ?2, ?3)",
                    params![seq, now - 1000 + seq, format!("frame {seq}")],
                )
                .unwrap();
            }
            // Bob's rows were pruned; his last seq lives on in `users`.
            conn.execute_batch(&format!(
                "INSERT INTO users VALUES ('bob', 7);
                 INSERT INTO idempotency VALUES ('alice', 'k', 'id-2', 2, 1, {now});
                 PRAGMA user_version = {old};"
            ))
            .unwrap();
            drop(conn);

            let store = open(dir.path(), conformance::LONG);
            assert_eq!(store.head(&alice).await.unwrap(), range(1, 3), "v{old}");
            assert_eq!(
                frames(&store, &alice).await,
                [1, 2, 3].map(|seq| (seq, format!("frame {seq}"))),
                "v{old}"
            );
            assert_eq!(next_seq(&store, &alice).await, 4, "v{old}");
            assert_eq!(
                next_seq(&store, &bob).await,
                8,
                "v{old}: bob's seqs continue"
            );
            let repeated = store
                .append(&alice, conformance::draft(1, Some("k")))
                .await
                .unwrap();
            assert!(
                matches!(repeated, Appended::Duplicate(ref r) if r.seq == 2 && r.delivered == 1),
                "v{old}: the idempotency key survived: {repeated:?}"
            );
            store.close().await.unwrap();

            assert_eq!(user_version(dir.path()), SCHEMA_VERSION);
            assert_eq!(
                seqs_in_file(dir.path(), "alice"),
                [1, 2, 3, 4],
                "v{old}: a rowid table in age order"
            );
        }
    }

    #[test]
    fn refuses_a_file_that_is_not_a_database_and_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(DB_FILE);
        std::fs::write(&file, b"this is not sqlite, and must survive").unwrap();
        let err = SqliteStore::open(dir.path(), conformance::LONG, true)
            .err()
            .expect("refused");
        assert!(err.to_string().contains(DB_FILE), "{err}");
        assert_eq!(
            std::fs::read(&file).unwrap(),
            b"this is not sqlite, and must survive"
        );
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch("CREATE TABLE t (x); PRAGMA user_version = 99;")
            .unwrap();
        drop(conn);
        let err = SqliteStore::open(dir.path(), conformance::LONG, true)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("schema version 99"), "{err}");
    }

    #[test]
    fn refuses_someone_elses_database() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch("CREATE TABLE mine (x);").unwrap();
        drop(conn);
        let err = SqliteStore::open(dir.path(), conformance::LONG, true)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("not Herald's"), "{err}");
    }
}
