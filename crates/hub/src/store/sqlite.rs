//! The embedded store: SQLite in WAL mode, one writer thread that group-commits, pooled readers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytestring::ByteString;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{Semaphore, oneshot};

use super::{Appended, Draft, Head, Notification, Receipt, Store, StoreError, Stored};
use crate::config::Retention;
use crate::ids::{Seq, UserId};
use crate::protocol;

/// The schema this build reads and writes, kept in `PRAGMA user_version`.
/// Version 2: `users.last_seq` is written when retention deletes a user's newest rows,
/// not on every append; a user's last seq is the larger of it and their newest row.
/// A version 1 file is a valid version 2 file (its `users` are exact) and is upgraded
/// in place; a version 1 build refuses a version 2 file, since it would reuse seqs.
const SCHEMA_VERSION: i64 = 2;
/// File name inside `store.path`.
pub const DB_FILE: &str = "herald.sqlite3";
/// Appends committed in one transaction at most; bounds one commit's latency.
const MAX_BATCH: usize = 4096;
/// Concurrent read connections; reads are short, more would only contend on the disk.
const MAX_READERS: usize = 4;
/// The writer's page cache in KiB (SQLite's default is 2 MB): pages of users' recent
/// rows, so that appends to many users read fewer pages back from the file (measured:
/// fewer `pread`s; the throughput difference was within this machine's noise).
const WRITER_CACHE_KIB: i64 = 16 * 1024;
/// WAL pages before the writer copies them into the main file (SQLite's default: 1,000).
/// Appends to many users dirty pages all over the file; a longer WAL holds many versions
/// of the same page, and the checkpoint writes each page once (measured: about 8 µs less
/// CPU per publish, unicast to 10,000 users). Costs up to ~40 MB of WAL on disk.
const WAL_CHECKPOINT_PAGES: u32 = 10_000;

const SCHEMA: &str = "
CREATE TABLE users (
    user     TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE notifications (
    user  TEXT NOT NULL,
    seq   INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    frame TEXT NOT NULL,
    PRIMARY KEY (user, seq)
) WITHOUT ROWID;
CREATE INDEX notifications_by_age ON notifications (ts_ms);
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

/// SQLite-backed [`Store`]. Writes go through one thread so seq assignment is
/// trivially atomic and many publishes share one fsync.
pub struct SqliteStore {
    commands: Mutex<Option<std_mpsc::Sender<Command>>>,
    readers: Arc<ReaderPool>,
    heads: Arc<Heads>,
    retention: Retention,
}

/// The stored range of every user with history: read once at open, then kept exact by
/// the writer (which sees every append) and published only once a commit is durable.
/// Appends assign seqs without reading SQLite, and `head` answers from memory: a user it
/// does not know has no history (most subscribers, most of the time), so a subscribe
/// needs no SQLite read and no hop to a blocking thread. It costs one entry per user
/// with history, as the `users` table does on disk.
#[derive(Default)]
struct Heads(Mutex<HashMap<UserId, Cached>>);

#[derive(Debug, Clone, Copy)]
struct Cached {
    last_seq: Seq,
    /// The user's oldest stored row, `None` when nothing is stored. After a background
    /// prune it may name a deleted row; its age then gives it away (older than retention).
    oldest: Option<Oldest>,
}

#[derive(Debug, Clone, Copy)]
struct Oldest {
    seq: Seq,
    ts_ms: i64,
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

    /// Whether `user` has any history (memory knows every such user).
    fn knows(&self, user: &UserId) -> bool {
        self.0.lock().is_ok_and(|heads| heads.contains_key(user))
    }

    /// Every user with history, as the file holds it: the last seq (newest row, or what
    /// a prune recorded) and the oldest row. One pass over each table's key order.
    fn load(conn: &Connection) -> rusqlite::Result<Self> {
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
        let mut ranges = conn.prepare(
            "SELECT n.user, n.seq, n.ts_ms, r.last FROM
               (SELECT user, MIN(seq) AS first, MAX(seq) AS last FROM notifications GROUP BY user) r
             JOIN notifications n ON n.user = r.user AND n.seq = r.first",
        )?;
        let rows = ranges.query_map([], |r| {
            let oldest = Oldest {
                seq: r.get::<_, i64>(1)? as Seq,
                ts_ms: r.get(2)?,
            };
            Ok((r.get::<_, String>(0)?, oldest, r.get::<_, i64>(3)? as Seq))
        })?;
        for row in rows {
            let (user, oldest, newest) = row?;
            if let Some(user) = valid(user) {
                let cached = heads.entry(user).or_insert(Cached {
                    last_seq: 0,
                    oldest: None,
                });
                cached.last_seq = cached.last_seq.max(newest);
                cached.oldest = Some(oldest);
            }
        }
        Ok(Self(Mutex::new(heads)))
    }

    /// Publishes what one durable commit changed.
    fn apply(&self, staged: HashMap<UserId, Cached>) {
        if let Ok(mut heads) = self.0.lock() {
            heads.extend(staged);
        }
    }
}

impl SqliteStore {
    /// Opens (or creates) the store in folder `dir`. Refuses anything it cannot
    /// read as its own schema; never truncates or overwrites an existing file.
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

        let writer = Connection::open_with_flags(
            &file,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )
        .map_err(|e| open_err(e.to_string()))?;
        // Closing the last connection would otherwise checkpoint the WAL into the main
        // file and delete it: a refused start would write to the very store it refused.
        // `close` checkpoints explicitly instead.
        writer
            .set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map_err(|e| open_err(e.to_string()))?;
        prepare_writer(&writer, fsync).map_err(open_err)?;

        let readers = Arc::new(ReaderPool::new(file.clone()));
        // Open one reader now so a store we can write but not read fails at start.
        let probe = readers.open().map_err(|e| open_err(e.to_string()))?;
        readers.put(probe);

        let heads = Arc::new(Heads::load(&writer).map_err(|e| open_err(e.to_string()))?);
        let (tx, rx) = std_mpsc::channel();
        let writer_heads = Arc::clone(&heads);
        thread::Builder::new()
            .name("herald-store".into())
            .spawn(move || {
                Writer {
                    conn: writer,
                    retention,
                    heads: writer_heads,
                    commits: 0,
                    commands: 0,
                }
                .run(rx)
            })
            .map_err(|e| open_err(e.to_string()))?;
        tracing::info!(path = %file.display(), fsync, "store opened");
        Ok(Self {
            commands: Mutex::new(Some(tx)),
            readers,
            heads,
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

    fn cutoff_ms(&self) -> i64 {
        now_ms() - self.retention.max_age.as_millis() as i64
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
        let (user, cutoff) = (user.clone(), self.cutoff_ms());
        self.readers
            .with(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT seq, frame FROM notifications
                     WHERE user = ?1 AND seq > ?2 AND ts_ms >= ?3 ORDER BY seq LIMIT ?4",
                )?;
                let rows = stmt.query_map(
                    params![user.as_str(), after as i64, cutoff, limit as i64],
                    |row| {
                        Ok(Stored {
                            seq: row.get::<_, i64>(0)? as Seq,
                            frame: ByteString::from(row.get::<_, String>(1)?),
                        })
                    },
                )?;
                rows.collect()
            })
            .await
    }

    async fn head(&self, user: &UserId) -> Result<Head, StoreError> {
        let cutoff = self.cutoff_ms();
        if let Some(head) = self.heads.head(user, cutoff) {
            return Ok(head);
        }
        if !self.heads.knows(user) {
            return Ok(Head {
                first_seq: 1,
                last_seq: 0,
            });
        }
        // Its remembered oldest row expired: the new oldest is in SQLite. What is
        // committed is what memory would say, since memory changes only after commits.
        let user = user.clone();
        self.readers
            .with(move |conn| {
                let tx = conn.unchecked_transaction()?;
                let last = last_seq(&tx, &user)?;
                let first: Option<i64> = tx
                    .prepare_cached(
                        "SELECT MIN(seq) FROM notifications WHERE user = ?1 AND ts_ms >= ?2",
                    )?
                    .query_row(params![user.as_str(), cutoff], |r| r.get(0))?;
                tx.finish()?;
                Ok(Head {
                    first_seq: first.map_or(last + 1, |f| f as Seq),
                    last_seq: last,
                })
            })
            .await
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

/// The single writer: batches appends into one transaction per fsync.
struct Writer {
    conn: Connection,
    retention: Retention,
    heads: Arc<Heads>,
    commits: u64,
    commands: u64,
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Command>) {
        let prune_every =
            (self.retention.max_age / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut last_prune = std::time::Instant::now();
        loop {
            let first = match rx.recv_timeout(prune_every) {
                Ok(cmd) => cmd,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    self.prune();
                    last_prune = std::time::Instant::now();
                    continue;
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            self.commits += 1;
            self.commands += batch.len() as u64;
            let close = self.commit(batch);
            if last_prune.elapsed() >= prune_every {
                self.prune();
                last_prune = std::time::Instant::now();
            }
            if let Some(reply) = close {
                self.prune();
                if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
                    tracing::warn!(error = %e, "store checkpoint at close failed");
                }
                tracing::info!(
                    commits = self.commits,
                    commands = self.commands,
                    "store closed"
                );
                let _ = reply.send(());
                return;
            }
        }
    }

    /// Commits one batch; answers every append only after the commit is durable.
    fn commit(&mut self, batch: Vec<Command>) -> Option<oneshot::Sender<()>> {
        let mut close = None;
        let mut replies = Vec::with_capacity(batch.len());
        // Heads this batch changed; published once the commit is durable.
        let mut staged = HashMap::new();
        let result: rusqlite::Result<()> = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let cutoff = now_ms() - self.retention.max_age.as_millis() as i64;
            let mut appender = Appender {
                tx: &tx,
                heads: &self.heads,
                staged: &mut staged,
                per_user: self.retention.per_user,
                cutoff,
            };
            for cmd in batch {
                match cmd {
                    Command::Append { user, draft, reply } => {
                        let outcome = appender.append(&user, draft)?;
                        replies.push((reply, outcome));
                    }
                    Command::Delivered {
                        user,
                        key,
                        delivered,
                    } => {
                        tx.prepare_cached(
                            "UPDATE idempotency SET delivered = ?3 WHERE user = ?1 AND key = ?2",
                        )?
                        .execute(params![
                            user.as_str(),
                            key,
                            delivered as i64
                        ])?;
                    }
                    Command::Close { reply } => close = Some(reply),
                }
            }
            tx.commit()
        })();
        match result {
            Ok(()) => {
                self.heads.apply(staged);
                for (reply, outcome) in replies {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; the batch was rolled back");
                for (reply, _) in replies {
                    let _ = reply.send(Err(StoreError::Backend(e.to_string())));
                }
            }
        }
        close
    }

    fn prune(&mut self) {
        let cutoff = now_ms() - self.retention.max_age.as_millis() as i64;
        let result: rusqlite::Result<(usize, usize)> = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            // A user's last seq outlives their rows: it is never handed out again.
            tx.execute(
                "INSERT INTO users (user, last_seq)
                 SELECT user, MAX(seq) FROM notifications WHERE ts_ms < ?1 GROUP BY user
                 ON CONFLICT (user) DO UPDATE SET last_seq = MAX(last_seq, excluded.last_seq)",
                [cutoff],
            )?;
            let n = tx.execute("DELETE FROM notifications WHERE ts_ms < ?1", [cutoff])?;
            let m = tx.execute("DELETE FROM idempotency WHERE ts_ms < ?1", [cutoff])?;
            tx.commit()?;
            Ok((n, m))
        })();
        match result {
            Ok((0, 0)) => {}
            Ok((notifications, keys)) => tracing::debug!(notifications, keys, "retention pruned"),
            Err(e) => tracing::warn!(error = %e, "retention prune failed"),
        }
    }
}

/// Appends within one commit; knows every head it touches without asking SQLite twice.
struct Appender<'a> {
    tx: &'a rusqlite::Transaction<'a>,
    heads: &'a Heads,
    staged: &'a mut HashMap<UserId, Cached>,
    per_user: u64,
    cutoff: i64,
}

impl Appender<'_> {
    fn append(&mut self, user: &UserId, draft: Draft) -> rusqlite::Result<Appended> {
        let tx = self.tx;
        if let Some(key) = &draft.idempotency_key {
            let seen = tx
                .prepare_cached("SELECT id, seq, delivered FROM idempotency WHERE user = ?1 AND key = ?2 AND ts_ms >= ?3")?
                .query_row(params![user.as_str(), key, self.cutoff], |r| {
                    Ok(Receipt { id: r.get(0)?, seq: r.get::<_, i64>(1)? as Seq, delivered: r.get::<_, i64>(2)? as usize })
                })
                .optional()?;
            if let Some(receipt) = seen {
                return Ok(Appended::Duplicate(receipt));
            }
        }
        let mut head = self.head(user)?;
        let seq = head.last_seq + 1;
        let frame = protocol::notification_frame(
            &draft.id,
            seq,
            draft.event.as_deref(),
            &draft.data,
            &draft.ts,
        );
        tx.prepare_cached(
            "INSERT INTO notifications (user, seq, ts_ms, frame) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![user.as_str(), seq as i64, draft.ts_ms, &*frame])?;
        head.last_seq = seq;
        let oldest = *head.oldest.get_or_insert(Oldest {
            seq,
            ts_ms: draft.ts_ms,
        });
        // Keeps the newest `per_user`; the row just written is never among those deleted.
        let keep_after = seq.saturating_sub(self.per_user);
        if oldest.seq <= keep_after {
            tx.prepare_cached("DELETE FROM notifications WHERE user = ?1 AND seq <= ?2")?
                .execute(params![user.as_str(), keep_after as i64])?;
            head.oldest = oldest_row(tx, user)?;
        }
        if let Some(key) = &draft.idempotency_key {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO idempotency (user, key, id, seq, delivered, ts_ms) VALUES (?1, ?2, ?3, ?4, 0, ?5)",
            )?
            .execute(params![user.as_str(), key, draft.id, seq as i64, draft.ts_ms])?;
        }
        self.staged.insert(user.clone(), head);
        Ok(Appended::New(Notification {
            user: user.clone(),
            id: draft.id,
            seq,
            frame,
        }))
    }

    /// The user's head as this transaction sees it: staged, else published, else read.
    fn head(&mut self, user: &UserId) -> rusqlite::Result<Cached> {
        if let Some(head) = self.staged.get(user) {
            return Ok(*head);
        }
        let mut head = match self.heads.get(user) {
            Some(head) => head,
            None => Cached {
                last_seq: last_seq(self.tx, user)?,
                oldest: oldest_row(self.tx, user)?,
            },
        };
        // A background prune may have deleted the remembered oldest row.
        if head.oldest.is_some_and(|o| o.ts_ms < self.cutoff) {
            head.oldest = oldest_row(self.tx, user)?;
        }
        Ok(head)
    }
}

/// The highest seq the user ever had: their newest row, or what a prune recorded.
fn last_seq(conn: &Connection, user: &UserId) -> rusqlite::Result<Seq> {
    let recorded: i64 = conn
        .prepare_cached("SELECT last_seq FROM users WHERE user = ?1")?
        .query_row([user.as_str()], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let newest: Option<i64> = conn
        .prepare_cached("SELECT MAX(seq) FROM notifications WHERE user = ?1")?
        .query_row([user.as_str()], |r| r.get(0))?;
    Ok(recorded.max(newest.unwrap_or(0)) as Seq)
}

fn oldest_row(conn: &Connection, user: &UserId) -> rusqlite::Result<Option<Oldest>> {
    conn.prepare_cached(
        "SELECT seq, ts_ms FROM notifications WHERE user = ?1 ORDER BY seq LIMIT 1",
    )?
    .query_row([user.as_str()], |r| {
        Ok(Oldest {
            seq: r.get::<_, i64>(0)? as Seq,
            ts_ms: r.get(1)?,
        })
    })
    .optional()
}

/// Sets the pragmas and checks (or creates) the schema. Errors name what is wrong.
fn prepare_writer(conn: &Connection, fsync: bool) -> Result<(), String> {
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(|e| format!("not a readable SQLite database ({e})"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("could not switch to WAL mode (got {mode})"));
    }
    let sync = if fsync { "FULL" } else { "OFF" };
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync}; PRAGMA cache_size = -{WRITER_CACHE_KIB};
         PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES};"
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
                "BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))
            .map_err(|e| e.to_string()),
        (SCHEMA_VERSION, _) => Ok(()),
        (1, _) => conn
            .execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION};"))
            .map_err(|e| e.to_string()),
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

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
        conn.query_row("SELECT COUNT(*) FROM notifications", [], |_| Ok(()))?;
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

    fn open(dir: &Path, retention: Retention) -> SqliteStore {
        SqliteStore::open(dir, retention, true).expect("store opens")
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
        assert_eq!(
            store.head(&user).await.unwrap(),
            Head {
                first_seq: 1,
                last_seq: 3
            }
        );
        assert_eq!(
            next_seq(&store, &user).await,
            4,
            "seqs continue after a restart"
        );
        let nobody = UserId::parse("nobody").unwrap();
        assert_eq!(
            store.head(&nobody).await.unwrap(),
            Head {
                first_seq: 1,
                last_seq: 0
            },
            "a user the reopened store never stored anything for"
        );
    }

    #[actix_rt::test]
    async fn the_background_prune_deletes_expired_rows_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            per_user: 1000,
            max_age: Duration::from_millis(300),
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
        assert_eq!((rows("notifications"), rows("idempotency")), (5, 5));
        // Idle, the writer prunes at least once a second; reads only hide expired rows.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while rows("notifications") + rows("idempotency") > 0 {
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
        assert_eq!(
            store.head(&user).await.unwrap(),
            Head {
                first_seq: 6,
                last_seq: 5
            }
        );
        assert_eq!(
            next_seq(&store, &user).await,
            6,
            "a pruned seq is never handed out again"
        );
        store.close().await.unwrap();
    }

    #[actix_rt::test]
    async fn a_version_1_store_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let user = UserId::parse("alice").unwrap();
        let store = open(dir.path(), conformance::LONG);
        for _ in 0..3 {
            next_seq(&store, &user).await;
        }
        store.close().await.unwrap();
        let version = |v: Option<i64>| -> i64 {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            if let Some(v) = v {
                conn.execute_batch(&format!("PRAGMA user_version = {v};"))
                    .unwrap();
            }
            conn.query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap()
        };
        version(Some(1));
        let store = open(dir.path(), conformance::LONG);
        assert_eq!(store.head(&user).await.unwrap().last_seq, 3);
        store.close().await.unwrap();
        assert_eq!(version(None), SCHEMA_VERSION);
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
