//! The session actor: joins the registry, runs the heartbeat, reads the peer, and closes with the right code.

use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_ws::{AggregatedMessage, CloseReason, ProtocolError};
use tokio::sync::mpsc;

use super::writer::{Writer, WriterError};
use super::{CutConnection, Evict, EvictReason, Outbound};
use crate::broker::BrokerError;
use crate::hub::Hub;
use crate::ids::{Seq, SessionId, UserId};
use crate::protocol::{self, ClientFrame, CloseCode, HeartbeatInfo};
use crate::registry::{Join, Leave, SessionEntry};

#[derive(Debug, thiserror::Error)]
enum JoinError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the registry is stopping")]
    Stopping,
}

/// How long a close frame may wait for room behind a peer that stopped reading.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

pub struct Session {
    id: SessionId,
    user: UserId,
    since: Option<Seq>,
    hub: Hub,
    ws: actix_ws::Session,
    outbound: mpsc::Sender<Outbound>,
    /// Taken by the writer once the session has joined the registry.
    queue: Option<mpsc::Receiver<Outbound>>,
    /// When the peer last sent anything at all: the heartbeat's only input.
    last_seen: Instant,
    writer: Option<SpawnHandle>,
    closing: bool,
    /// Used once the close frame had its grace, so a stalled peer cannot keep the socket.
    cut: Option<CutConnection>,
}

impl Session {
    /// Starts the actor for an upgraded socket; `stream` is the peer's inbound half.
    pub fn start(
        hub: Hub,
        id: SessionId,
        user: UserId,
        since: Option<Seq>,
        ws: actix_ws::Session,
        stream: actix_ws::MessageStream,
        cut: Option<CutConnection>,
    ) -> Addr<Self> {
        let config = hub.config();
        let (outbound, queue) = mpsc::channel(config.session_queue);
        let stream = stream
            .max_frame_size(config.max_frame_bytes)
            .aggregate_continuations()
            .max_continuation_size(config.max_frame_bytes);
        Session::create(move |ctx| {
            ctx.add_stream(stream);
            Session {
                id,
                user,
                since,
                hub,
                ws,
                outbound,
                queue: Some(queue),
                last_seen: Instant::now(),
                writer: None,
                closing: false,
                cut,
            }
        })
    }

    /// Queues a reply to the peer; a full queue means the peer is not reading.
    fn reply(&mut self, ctx: &mut Context<Self>, item: Outbound) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.outbound.try_send(item) {
            self.evict(ctx, EvictReason::SlowConsumer);
        }
    }

    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        if self.last_seen.elapsed() >= self.hub.config().heartbeat.timeout {
            self.evict(ctx, EvictReason::Heartbeat);
        } else {
            // A full queue is the registry's to judge; the ping just waits its turn.
            let _ = self.outbound.try_send(Outbound::Ping);
        }
    }

    fn evict(&mut self, ctx: &mut Context<Self>, reason: EvictReason) {
        if self.closing {
            return;
        }
        tracing::info!(user = %self.user, session = %self.id, reason = reason.as_str(), "session evicted");
        self.hub.metrics().evicted(reason);
        self.close(ctx, reason.close_code());
    }

    /// Stops writing, sends a close frame (best effort when the peer stopped reading) and stops.
    fn close(&mut self, ctx: &mut Context<Self>, code: CloseCode) {
        if self.closing {
            return;
        }
        self.closing = true;
        // Queued frames are dropped: a client resumes with `since` and loses nothing.
        if let Some(writer) = self.writer.take() {
            ctx.cancel_future(writer);
        }
        let ws = self.ws.clone();
        let reason = CloseReason {
            code: code.code().into(),
            description: None,
        };
        let cut = self.cut.take();
        actix_rt::spawn(async move {
            let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
            let _ = tokio::time::timeout_at(deadline, ws.close(Some(reason))).await;
            // A peer that reads has the close frame by now and has hung up or will;
            // one that stopped reading would otherwise hold the socket indefinitely.
            if let Some(cut) = cut {
                tokio::time::sleep_until(deadline).await;
                cut();
            }
        });
        ctx.stop();
    }

    fn start_writer(&mut self, ctx: &mut Context<Self>) {
        let Some(queue) = self.queue.take() else {
            return;
        };
        let config = self.hub.config();
        let writer = Writer {
            ws: self.ws.clone(),
            queue,
            store: self.hub.store(),
            user: self.user.clone(),
            session: self.id,
            since: self.since,
            heartbeat: HeartbeatInfo {
                interval_ms: config.heartbeat.interval.as_millis() as u64,
                timeout_ms: config.heartbeat.timeout.as_millis() as u64,
            },
            gap_wait: config.gap_wait,
        };
        let handle = ctx.spawn(writer.run().into_actor(self).map(|result, act, ctx| {
            act.writer = None;
            match result {
                Ok(()) | Err(WriterError::PeerGone) => ctx.stop(),
                Err(WriterError::Store(e)) => {
                    tracing::error!(user = %act.user, session = %act.id, error = %e, "session closed: store unavailable");
                    act.close(ctx, CloseCode::GoingAway);
                }
            }
        }));
        self.writer = Some(handle);
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::debug!(user = %self.user, session = %self.id, "session started");
        ctx.run_interval(self.hub.config().heartbeat.interval, |act, ctx| {
            act.heartbeat(ctx)
        });
        let join = Join {
            user: self.user.clone(),
            entry: SessionEntry {
                id: self.id,
                outbound: self.outbound.clone(),
                control: ctx.address().recipient(),
            },
        };
        // The writer reads the user's head only after the broker delivers the user's
        // notifications to this node and the registry holds the session, so nothing
        // published in between can fall through the gap.
        let subscribed = self.hub.broker().join(&self.user);
        // `send` queues the Join now, so it is ordered before this session's own Leave.
        let registered = self.hub.registry().send(join);
        let joined = async move {
            subscribed.await?;
            registered.await.map_err(|_| JoinError::Stopping)
        };
        ctx.wait(joined.into_actor(self).map(|joined, act, ctx| match joined {
            Ok(()) => act.start_writer(ctx),
            Err(JoinError::Broker(e)) => {
                tracing::warn!(user = %act.user, session = %act.id, error = %e, "session closed: broker unavailable");
                act.close(ctx, CloseCode::GoingAway);
            }
            Err(JoinError::Stopping) => ctx.stop(),
        }));
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.hub.broker().leave(&self.user);
        self.hub.registry().do_send(Leave {
            user: self.user.clone(),
            session: self.id,
        });
        tracing::debug!(user = %self.user, session = %self.id, "session stopped");
    }
}

impl StreamHandler<Result<AggregatedMessage, ProtocolError>> for Session {
    /// Every inbound frame proves the peer alive; text frames may be app-level pings.
    fn handle(&mut self, item: Result<AggregatedMessage, ProtocolError>, ctx: &mut Self::Context) {
        self.last_seen = Instant::now();
        match item {
            Ok(AggregatedMessage::Text(text)) => match ClientFrame::parse(&text) {
                Ok(ClientFrame::Ping) => self.reply(ctx, Outbound::Frame(protocol::pong_frame())),
                Err(bad) => self.reply(
                    ctx,
                    Outbound::Frame(protocol::error_frame("bad_frame", &bad.to_string())),
                ),
            },
            Ok(AggregatedMessage::Binary(_)) => self.reply(
                ctx,
                Outbound::Frame(protocol::error_frame(
                    "bad_frame",
                    "binary frames are not supported",
                )),
            ),
            Ok(AggregatedMessage::Ping(payload)) => self.reply(ctx, Outbound::Pong(payload)),
            Ok(AggregatedMessage::Pong(_)) => {}
            Ok(AggregatedMessage::Close(_)) => self.close(ctx, CloseCode::Normal),
            Err(ProtocolError::Overflow) => self.evict(ctx, EvictReason::FrameTooBig),
            // A message over the limit in fragments is just as big, but actix-ws's aggregator
            // reports it only as an `Io` error with this text; without this arm it closed 1002.
            Err(ProtocolError::Io(e)) if e.to_string().contains("maximum continuation size") => {
                self.evict(ctx, EvictReason::FrameTooBig)
            }
            Err(e) => {
                tracing::debug!(user = %self.user, session = %self.id, error = %e, "protocol error");
                self.evict(ctx, EvictReason::ProtocolError);
            }
        }
    }

    /// The peer's half closed (TCP gone): nothing left to say.
    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<Evict> for Session {
    type Result = ();

    /// The registry (slow consumer) or the node (shutdown) closes this session.
    fn handle(&mut self, msg: Evict, ctx: &mut Self::Context) {
        self.evict(ctx, msg.reason);
    }
}
