//! The node's pubsub connection: subscribes to the users held here, delivers their messages locally, reconnects and catches up.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use bytestring::ByteString;
use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::mpsc;

use super::{MAX_BACKOFF, MIN_BACKOFF, Shared, Subscription};
use crate::cluster::{RedisCallError, bounded};
use crate::ids::{Seq, UserId};
use crate::registry::{Broadcast, Deliver, Registry};

/// Requests taken from the queue and applied with one SUBSCRIBE and one UNSUBSCRIBE.
const MAX_BATCH: usize = 1000;
/// Users whose latest notification is read per round trip when catching up.
const CATCH_UP_BATCH: usize = 200;

/// Why a connection stopped serving.
enum Ended {
    /// The broker was dropped: the node is stopping.
    BrokerGone,
    Lost(String),
}

/// Runs until the broker is dropped: connect, subscribe, catch up, serve; on loss, back off and again.
pub(super) async fn run(
    shared: Arc<Shared>,
    client: redis::Client,
    mut requests: mpsc::UnboundedReceiver<Subscription>,
    registry: Addr<Registry>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let attempt = Instant::now();
        let ended = match connect(&shared, &client).await {
            Ok((sink, stream, subscribed)) => {
                Connection {
                    shared: &shared,
                    registry: &registry,
                    sink,
                    subscribed,
                }
                .serve(stream, &mut requests)
                .await
            }
            Err(e) => Ended::Lost(e.to_string()),
        };
        match ended {
            Ended::BrokerGone => return,
            Ended::Lost(reason) => {
                tracing::warn!(node = %shared.node, error = %reason, retry_in = ?backoff, "redis pubsub connection lost");
            }
        }
        // A connection that held for a while earns a quick retry; a flapping one backs off.
        if attempt.elapsed() >= MAX_BACKOFF * 2 {
            backoff = MIN_BACKOFF;
        }
        if refuse_until(&mut requests, backoff).await.is_err() {
            return;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// While disconnected: joins fail at once (the session closes and its client retries).
async fn refuse_until(
    requests: &mut mpsc::UnboundedReceiver<Subscription>,
    wait: Duration,
) -> Result<(), ()> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return Ok(()),
            request = requests.recv() => match request {
                None => return Err(()),
                Some(Subscription::Join(_, ack)) => {
                    let _ = ack.send(Err("redis pubsub is reconnecting".into()));
                }
                Some(Subscription::Leave(_)) => {}
            },
        }
    }
}

/// Opens the pubsub connection and subscribes to the broadcast channel and every user held.
async fn connect(
    shared: &Shared,
    client: &redis::Client,
) -> Result<(PubSubSink, PubSubStream, HashSet<UserId>), RedisCallError> {
    let timeout = shared.config.timeout;
    let (mut sink, stream) = bounded(timeout, client.get_async_pubsub()).await?.split();
    bounded(timeout, sink.subscribe(shared.keys.broadcast_channel())).await?;
    let users = shared.held_users();
    for chunk in users.chunks(MAX_BATCH) {
        let channels: Vec<String> = chunk.iter().map(|u| shared.keys.user_channel(u)).collect();
        bounded(timeout, sink.subscribe(channels)).await?;
    }
    tracing::info!(node = %shared.node, users = users.len(), "redis pubsub subscribed");
    Ok((sink, stream, users.into_iter().collect()))
}

struct Connection<'a> {
    shared: &'a Shared,
    registry: &'a Addr<Registry>,
    sink: PubSubSink,
    /// Users whose channel this connection is subscribed to.
    subscribed: HashSet<UserId>,
}

impl Connection<'_> {
    async fn serve(
        mut self,
        mut stream: PubSubStream,
        requests: &mut mpsc::UnboundedReceiver<Subscription>,
    ) -> Ended {
        // Anything published while this node was not subscribed is in the store:
        // hand each held user's latest seq to its sessions, whose writers fill the gap.
        if let Err(e) = self.catch_up().await {
            return Ended::Lost(format!("catching up: {e}"));
        }
        let mut ping = tokio::time::interval(self.shared.config.presence_heartbeat());
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => self.dispatch(&msg),
                    None => return Ended::Lost("connection closed".into()),
                },
                request = requests.recv() => {
                    let Some(first) = request else { return Ended::BrokerGone };
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match requests.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = self.apply(batch).await {
                        return Ended::Lost(format!("subscribing: {e}"));
                    }
                }
                _ = ping.tick() => {
                    // A silent connection could be half-open; a ping proves it alive.
                    // Subscribed, Redis answers a ping with ["pong", ""]: any answer will do.
                    let pong: Result<redis::Value, _> = bounded(self.shared.config.timeout, self.sink.ping()).await;
                    if let Err(e) = pong {
                        return Ended::Lost(format!("ping: {e}"));
                    }
                }
            }
        }
    }

    /// Brings the subscriptions in line with the sessions held now, then answers the joins.
    async fn apply(&mut self, batch: Vec<Subscription>) -> Result<(), RedisCallError> {
        let mut acks = Vec::new();
        let mut mentioned = HashSet::new();
        for request in batch {
            match request {
                Subscription::Join(user, ack) => {
                    mentioned.insert(user);
                    acks.push(ack);
                }
                Subscription::Leave(user) => {
                    mentioned.insert(user);
                }
            }
        }
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        for user in mentioned {
            match (self.shared.holds(&user), self.subscribed.contains(&user)) {
                (true, false) => add.push(user),
                (false, true) => remove.push(user),
                _ => {}
            }
        }
        let timeout = self.shared.config.timeout;
        let result = async {
            if !add.is_empty() {
                let channels: Vec<String> = add
                    .iter()
                    .map(|u| self.shared.keys.user_channel(u))
                    .collect();
                bounded(timeout, self.sink.subscribe(channels)).await?;
                self.subscribed.extend(add);
            }
            if !remove.is_empty() {
                let channels: Vec<String> = remove
                    .iter()
                    .map(|u| self.shared.keys.user_channel(u))
                    .collect();
                bounded(timeout, self.sink.unsubscribe(channels)).await?;
                for user in &remove {
                    self.subscribed.remove(user);
                }
            }
            Ok(())
        }
        .await;
        for ack in acks {
            let _ = ack.send(
                result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e: &RedisCallError| e.to_string()),
            );
        }
        result
    }

    fn dispatch(&self, msg: &redis::Msg) {
        let channel = msg.get_channel_name();
        let Ok(payload) = std::str::from_utf8(msg.get_payload_bytes()) else {
            tracing::warn!(channel, "non-UTF-8 message ignored");
            return;
        };
        if channel == self.shared.keys.broadcast_channel() {
            self.registry.do_send(Broadcast {
                frame: ByteString::from(payload),
            });
            return;
        }
        let Some(user) = self.shared.keys.user_of_channel(channel) else {
            return;
        };
        match split_live(payload) {
            Some((seq, frame)) => self.registry.do_send(Deliver {
                user,
                seq,
                frame: ByteString::from(frame),
            }),
            None => tracing::warn!(channel, "malformed live message ignored"),
        }
    }

    /// Hands every held user's latest stored notification to the local registry.
    async fn catch_up(&self) -> Result<(), RedisCallError> {
        let users: Vec<UserId> = self.subscribed.iter().cloned().collect();
        for chunk in users.chunks(CATCH_UP_BATCH) {
            let mut pipe = redis::pipe();
            for user in chunk {
                pipe.cmd("ZRANGE")
                    .arg(self.shared.keys.log(user))
                    .arg(-1)
                    .arg(-1)
                    .arg("WITHSCORES");
            }
            let mut conn = self.shared.conn.clone();
            let latest: Vec<Vec<(String, Seq)>> =
                bounded(self.shared.config.timeout, pipe.query_async(&mut conn)).await?;
            for (user, last) in chunk.iter().zip(latest) {
                let Some((member, seq)) = last.into_iter().next() else {
                    continue;
                };
                let Some((_, frame)) = member.split_once(' ') else {
                    continue;
                };
                self.registry.do_send(Deliver {
                    user: user.clone(),
                    seq,
                    frame: ByteString::from(frame),
                });
            }
        }
        if !users.is_empty() {
            tracing::info!(node = %self.shared.node, users = users.len(), "live sessions nudged to catch up");
        }
        Ok(())
    }
}

/// Splits a live message `"<seq> <frame>"`.
fn split_live(payload: &str) -> Option<(Seq, &str)> {
    let (seq, frame) = payload.split_once(' ')?;
    Some((seq.parse().ok()?, frame))
}
