//! This node's share of cluster presence: its session counts per user and its heartbeat in the node table.

use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::Script;
use tokio::time::Instant;

use super::{MAX_BACKOFF, MIN_BACKOFF, Shared};
use crate::cluster::{RedisCallError, bounded};
use crate::ids::UserId;

/// KEYS: node table, node totals, then one presence hash per user.
/// ARGV: node, ttl_ms, node total, then one count per user (0 removes the node's field).
/// Answers 1 when this node's entry had lapsed (others may have dropped its counts).
const SYNC: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local node, ttl = ARGV[1], tonumber(ARGV[2])
local previous = redis.call('ZSCORE', KEYS[1], node)
local lapsed = 0
if not previous or tonumber(previous) <= now then lapsed = 1 end
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('HDEL', KEYS[2], dead)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, node)
redis.call('HSET', KEYS[2], node, ARGV[3])
for i = 3, #KEYS do
  local count = tonumber(ARGV[i + 1])
  if count > 0 then
    redis.call('HSET', KEYS[i], node, count)
    redis.call('PEXPIRE', KEYS[i], ttl * 2)
  else
    redis.call('HDEL', KEYS[i], node)
  end
end
return lapsed
";

/// Users written per script call.
const SYNC_BATCH: usize = 1000;
/// Changes within this window are written together.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Writes changed counts soon after they change, and every count every heartbeat; ends with the broker.
pub(super) async fn run(shared: Weak<Shared>) {
    let script = Script::new(SYNC);
    let mut backoff = MIN_BACKOFF;
    let mut full = true;
    let mut last_full = Instant::now();
    loop {
        let Some(node) = shared.upgrade() else { return };
        if !full {
            // Every count is rewritten each heartbeat, however busy the dirty path is.
            let next_full = last_full + node.config.presence_heartbeat();
            tokio::select! {
                () = node.presence_changed.notified() => tokio::time::sleep(DEBOUNCE).await,
                () = tokio::time::sleep_until(next_full) => {}
            }
            full = Instant::now() >= next_full;
        }
        let started = Instant::now();
        match sync(&node, &script, full).await {
            Ok(lapsed) => {
                backoff = MIN_BACKOFF;
                if full {
                    last_full = started;
                } else if lapsed {
                    tracing::warn!(node = %node.node, "this node's presence had lapsed; writing it again");
                }
                // A lapsed entry may have lost its counts: write them all, right away.
                full = lapsed && !full;
            }
            Err(e) => {
                tracing::warn!(node = %node.node, error = %e, retry_in = ?backoff, "writing presence failed");
                drop(node);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                full = true;
            }
        }
    }
}

/// Writes the dirty users' counts (all users' when `full`); answers whether the node had lapsed.
async fn sync(shared: &Arc<Shared>, script: &Script, full: bool) -> Result<bool, RedisCallError> {
    let (counts, total) = {
        let mut local = shared.local();
        let mut users: Vec<UserId> = local.dirty.drain().collect();
        if full {
            users.extend(local.sessions.keys().cloned());
            users.sort_unstable();
            users.dedup();
        }
        let counts: Vec<(UserId, usize)> = users
            .into_iter()
            .map(|u| {
                let n = local.sessions.get(&u).copied().unwrap_or(0);
                (u, n)
            })
            .collect();
        (counts, local.sessions.values().sum::<usize>())
    };
    let result = write(shared, script, &counts, total).await;
    if result.is_err() {
        // Written again on the next (full) sync; keep them marked meanwhile.
        let mut local = shared.local();
        local.dirty.extend(counts.into_iter().map(|(u, _)| u));
    }
    result
}

async fn write(
    shared: &Shared,
    script: &Script,
    counts: &[(UserId, usize)],
    total: usize,
) -> Result<bool, RedisCallError> {
    let ttl_ms = shared.config.presence_ttl.as_millis() as u64;
    let mut lapsed = false;
    // At least one call, so the heartbeat goes out even with no users.
    let chunks: Vec<&[(UserId, usize)]> = if counts.is_empty() {
        vec![&[]]
    } else {
        counts.chunks(SYNC_BATCH).collect()
    };
    for chunk in chunks {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(shared.keys.nodes())
            .key(shared.keys.node_sessions())
            .arg(&shared.node)
            .arg(ttl_ms)
            .arg(total);
        for (user, count) in chunk {
            invocation.key(shared.keys.presence(user)).arg(*count);
        }
        let mut conn = shared.conn.clone();
        let answer: i64 =
            bounded(shared.config.timeout, invocation.invoke_async(&mut conn)).await?;
        lapsed |= answer == 1;
    }
    Ok(lapsed)
}
