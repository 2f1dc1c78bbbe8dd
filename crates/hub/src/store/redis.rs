//! The shared store: per-user seq, history, idempotency and retention in Redis, each append one Lua script.
//!
//! The append script assigns the seq, stores the frame, trims by count and age,
//! remembers the idempotency key and PUBLISHes the frame on the user's channel,
//! all atomically: whoever subscribed before a head read receives every later
//! seq, and the channel carries one user's notifications in seq order.

use std::time::Duration;

use async_trait::async_trait;
use bytestring::ByteString;
use redis::aio::ConnectionManager;
use redis::{Script, Value};

use super::{Appended, Draft, Head, Notification, Receipt, Store, StoreError, Stored};
use crate::cluster::{Keys, RedisCallError, RedisConfig, bounded, command_connection};
use crate::config::Retention;
use crate::ids::{Seq, UserId};

/// KEYS: seq, log, idempotency (the seq key again when there is none).
/// ARGV: has_key, id, frame head, frame tail, ts_ms, per_user, max_age_ms, channel.
/// Answers {1, id, seq, frame} for a new notification, {0, id, seq, delivered} for a duplicate.
const APPEND: &str = r"
local has_key = ARGV[1] == '1'
if has_key then
  local prev = redis.call('HMGET', KEYS[3], 'id', 'seq', 'delivered')
  if prev[1] then return {0, prev[1], tonumber(prev[2]), tonumber(prev[3])} end
end
local seq = redis.call('INCR', KEYS[1])
local frame = ARGV[3] .. seq .. ARGV[4]
redis.call('ZADD', KEYS[2], seq, ARGV[5] .. ' ' .. frame)
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[6]) + 1))
local cutoff = tonumber(ARGV[5]) - tonumber(ARGV[7])
while true do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 or tonumber(string.match(oldest[1], '^(%-?%d+) ')) >= cutoff then break end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, 0)
end
redis.call('PEXPIRE', KEYS[2], ARGV[7])
if has_key then
  redis.call('HSET', KEYS[3], 'id', ARGV[2], 'seq', seq, 'delivered', 0)
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
end
redis.call('PUBLISH', ARGV[8], seq .. ' ' .. frame)
return {1, ARGV[2], seq, frame}
";

/// KEYS: seq, log. ARGV: cutoff_ms. Answers {first_seq, last_seq}.
const HEAD: &str = r"
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local cutoff = tonumber(ARGV[1])
local from = 0
while true do
  local page = redis.call('ZRANGE', KEYS[2], from, from + 99, 'WITHSCORES')
  if #page == 0 then return {last + 1, last} end
  for i = 1, #page, 2 do
    if tonumber(string.match(page[i], '^(%-?%d+) ')) >= cutoff then
      return {tonumber(page[i + 1]), last}
    end
  end
  from = from + 100
end
";

/// KEYS: idempotency. ARGV: delivered. Only touches a key that still exists.
const RECORD_DELIVERED: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'delivered', ARGV[1])
end
return 0
";

/// [`Store`] on a Redis shared by every node. Durability is Redis's: run it with
/// `appendonly yes` and `appendfsync always` for "stored before acknowledged".
pub struct RedisStore {
    conn: ConnectionManager,
    keys: Keys,
    retention: Retention,
    timeout: Duration,
    append: Script,
    head: Script,
    record_delivered: Script,
}

impl RedisStore {
    /// Prepares the store; connects lazily, so Redis may come up later.
    pub fn open(config: &RedisConfig, retention: Retention) -> Result<Self, StoreError> {
        let conn = command_connection(config).map_err(|e| StoreError::Open {
            path: config.url.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            conn,
            keys: Keys::new(&config.prefix),
            retention,
            timeout: config.timeout,
            append: Script::new(APPEND),
            head: Script::new(HEAD),
            record_delivered: Script::new(RECORD_DELIVERED),
        })
    }

    /// The node's command connection, for the broker to share (one multiplexed
    /// connection per node, one reconnect when Redis comes back).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn max_age_ms(&self) -> i64 {
        self.retention.max_age.as_millis() as i64
    }
}

fn backend(e: RedisCallError) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn malformed(what: &str) -> StoreError {
    StoreError::Backend(format!("redis answered a malformed {what}"))
}

/// The frame around its seq, so the script can put the seq it assigns in between.
fn frame_around_seq(draft: &Draft) -> Result<(String, String), StoreError> {
    let whole = draft.frame(0);
    // `seq` follows `type` and `id`, whose JSON strings cannot contain an unescaped quote.
    const MARK: &str = r#","seq":0,"#;
    let at = whole.find(MARK).ok_or_else(|| malformed("frame"))?;
    let head = &whole[..at + MARK.len() - 2];
    let tail = &whole[at + MARK.len() - 1..];
    Ok((head.to_owned(), tail.to_owned()))
}

/// Splits a history member `"<ts_ms> <frame>"`.
fn split_member(member: &str) -> Option<(i64, &str)> {
    let (ts, frame) = member.split_once(' ')?;
    Some((ts.parse().ok()?, frame))
}

#[async_trait]
impl Store for RedisStore {
    async fn append(&self, user: &UserId, draft: Draft) -> Result<Appended, StoreError> {
        let (frame_head, frame_tail) = frame_around_seq(&draft)?;
        let seq_key = self.keys.seq(user);
        let idempotency_key = match &draft.idempotency_key {
            Some(key) => self.keys.idempotency(user, key),
            None => seq_key.clone(),
        };
        let mut invocation = self.append.prepare_invoke();
        invocation
            .key(&seq_key)
            .key(self.keys.log(user))
            .key(&idempotency_key)
            .arg(if draft.idempotency_key.is_some() {
                "1"
            } else {
                "0"
            })
            .arg(&draft.id)
            .arg(frame_head)
            .arg(frame_tail)
            .arg(draft.ts_ms)
            .arg(self.retention.per_user)
            .arg(self.max_age_ms().max(1))
            .arg(self.keys.user_channel(user));
        let mut conn = self.conn.clone();
        let (new, id, seq, last): (i64, String, u64, Value) =
            bounded(self.timeout, invocation.invoke_async(&mut conn))
                .await
                .map_err(backend)?;
        if new == 1 {
            let frame: String =
                redis::from_redis_value(last).map_err(|_| malformed("append answer"))?;
            Ok(Appended::New(Notification {
                user: user.clone(),
                id,
                seq,
                frame: ByteString::from(frame),
            }))
        } else {
            let delivered: usize =
                redis::from_redis_value(last).map_err(|_| malformed("append answer"))?;
            Ok(Appended::Duplicate(Receipt { id, seq, delivered }))
        }
    }

    async fn read(
        &self,
        user: &UserId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Stored>, StoreError> {
        let (log, cutoff) = (self.keys.log(user), self.retention.cutoff_ms());
        let mut out = Vec::new();
        let mut cursor = after;
        // Expired entries sit at the front until the next append trims them; skip past them.
        while out.len() < limit {
            let want = limit - out.len();
            let mut conn = self.conn.clone();
            let page: Vec<(String, u64)> = bounded(
                self.timeout,
                redis::cmd("ZRANGE")
                    .arg(&log)
                    .arg(format!("({cursor}"))
                    .arg("+inf")
                    .arg("BYSCORE")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(want)
                    .arg("WITHSCORES")
                    .query_async(&mut conn),
            )
            .await
            .map_err(backend)?;
            let full = page.len() == want;
            for (member, seq) in page {
                let (ts, frame) = split_member(&member).ok_or_else(|| malformed("entry"))?;
                cursor = seq;
                if ts >= cutoff {
                    out.push(Stored {
                        seq,
                        frame: ByteString::from(frame),
                    });
                }
            }
            if !full {
                break;
            }
        }
        Ok(out)
    }

    async fn head(&self, user: &UserId) -> Result<Head, StoreError> {
        let mut invocation = self.head.prepare_invoke();
        invocation
            .key(self.keys.seq(user))
            .key(self.keys.log(user))
            .arg(self.retention.cutoff_ms());
        let mut conn = self.conn.clone();
        let (first_seq, last_seq): (Seq, Seq) =
            bounded(self.timeout, invocation.invoke_async(&mut conn))
                .await
                .map_err(backend)?;
        Ok(Head {
            first_seq,
            last_seq,
        })
    }

    async fn record_delivered(
        &self,
        user: &UserId,
        key: &str,
        delivered: usize,
    ) -> Result<(), StoreError> {
        let mut invocation = self.record_delivered.prepare_invoke();
        invocation
            .key(self.keys.idempotency(user, key))
            .arg(delivered);
        let mut conn = self.conn.clone();
        let _: i64 = bounded(self.timeout, invocation.invoke_async(&mut conn))
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// Nothing to flush: every append was acknowledged by Redis before it answered.
    async fn close(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;
    use crate::test_redis::TestRedis;

    #[test]
    fn the_frame_splits_around_its_seq() {
        let d = conformance::draft(7, None);
        let (head, tail) = frame_around_seq(&d).unwrap();
        let whole = d.frame(42);
        assert_eq!(format!("{head}42{tail}"), whole.to_string());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn passes_the_store_conformance_suite() {
        let redis = TestRedis::start();
        let counter = std::sync::atomic::AtomicUsize::new(0);
        conformance::run_all(|retention| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let config = redis.config(&format!("conf{n}"));
            (RedisStore::open(&config, retention).unwrap(), ())
        })
        .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_unreachable_redis_fails_within_the_timeout() {
        let redis = TestRedis::start();
        let config = redis.config("gone");
        drop(redis);
        let store = RedisStore::open(&config, conformance::LONG).unwrap();
        let started = std::time::Instant::now();
        let user = UserId::parse("a").unwrap();
        assert!(
            store
                .append(&user, conformance::draft(1, None))
                .await
                .is_err()
        );
        assert!(store.head(&user).await.is_err());
        // Generous: the point is "answers instead of hanging", not speed.
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "took {:?}",
            started.elapsed()
        );
    }
}
