//! The session actor: joins the session table, runs the heartbeat, reads the peer, and closes with the right code.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::queue::{self, QueueReceiver, QueueSender, TrySendError};
use super::writer::{Writer, WriterError};
use super::{Evict, EvictReason, Outbound};
use crate::hub::Hub;
use crate::ids::{Seq, SessionId, UserId};
use crate::members::Worker;
use crate::protocol::{self, ClientFrame, CloseCode, HeartbeatInfo};
use crate::registry::SessionEntry;
use crate::transport::{FrameSink, InboundError, InboundFrame, Socket, Upgraded};

/// How long a close frame may wait for room behind a peer that stopped reading.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

pub struct Session {
    id: SessionId,
    user: UserId,
    since: Option<Seq>,
    hub: Hub,
    outbound: QueueSender,
    /// Taken by the writer once the session is in the table and the broker confirmed its join.
    queue: Option<(QueueReceiver, FrameSink)>,
    /// When the peer last showed it is there: a frame from it, or its TCP acknowledging
    /// the frames sent to it (see `heartbeat`).
    last_seen: Instant,
    /// The socket's count of text frames sent at the last heartbeat tick.
    texts_seen: u32,
    writer: Option<SpawnHandle>,
    /// Taken by `close`, which sends the close frame and then closes the socket.
    socket: Option<Socket>,
}

impl Session {
    /// Starts the actor for an upgraded socket, on the current thread (the socket's).
    pub fn start(
        hub: Hub,
        id: SessionId,
        user: UserId,
        since: Option<Seq>,
        upgraded: Upgraded,
    ) -> Addr<Self> {
        let config = hub.config();
        let (outbound, queue) = queue::channel(config.session_queue);
        let transport = upgraded.into_transport(config.max_frame_bytes);
        Session::create(move |ctx| {
            ctx.add_stream(transport.inbound);
            Session {
                id,
                user,
                since,
                hub,
                outbound,
                queue: Some((queue, transport.sink)),
                last_seen: Instant::now(),
                texts_seen: GREETING_TEXTS,
                writer: None,
                socket: Some(transport.socket),
            }
        })
    }

    /// Queues a reply to the peer; a full queue means the peer is not reading.
    fn reply(&mut self, ctx: &mut Context<Self>, item: Outbound) {
        if let Err(TrySendError::Full(_)) = self.outbound.try_send(item) {
            self.evict(ctx, EvictReason::SlowConsumer);
        }
    }

    /// One heartbeat tick. A session that was sent frames since its last tick, and whose
    /// peer's TCP acknowledged something within the interval, is alive without a Ping: its
    /// host is up and its socket open, which is what a Pong would prove. So a busy session
    /// costs the heartbeat no frame and its peer no Pong, and the busy sessions of a slot
    /// do not all ping in one instant. A quiet session is pinged; the `hello` is not
    /// traffic, so a session that got nothing else is pinged within one interval of its
    /// connect.
    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        let texts = self
            .socket
            .as_ref()
            .map_or(self.texts_seen, Socket::texts_sent);
        let sent = std::mem::replace(&mut self.texts_seen, texts) != texts;
        let interval = self.hub.config().heartbeat.interval;
        let acknowledged_at = || {
            let age = self.socket.as_ref().and_then(Socket::last_ack_age)?;
            (age < interval).then(|| Instant::now().checked_sub(age))?
        };
        match sent.then(acknowledged_at).flatten() {
            Some(at) => self.last_seen = self.last_seen.max(at),
            None => self.ping_or_evict(ctx),
        }
    }

    fn ping_or_evict(&mut self, ctx: &mut Context<Self>) {
        if self.last_seen.elapsed() >= self.hub.config().heartbeat.timeout {
            self.evict(ctx, EvictReason::Heartbeat);
        } else {
            // A full queue is the registry's to judge; the ping just waits its turn.
            let _ = self.outbound.try_send(Outbound::Ping);
        }
    }

    /// Heartbeat ticks fall on slots of a grid shared by every session of the process,
    /// so one timer wake-up serves all the sessions due in a slot, and sessions are dealt
    /// over the slots of one interval ([`first_tick`]), so the pings are spread evenly
    /// however the sessions arrived.
    fn start_heartbeat(&mut self, ctx: &mut Context<Self>) {
        let interval = self.hub.config().heartbeat.interval;
        ctx.run_later(first_tick(interval), move |act, ctx| {
            act.heartbeat(ctx);
            ctx.run_interval(interval, |act, ctx| act.heartbeat(ctx));
        });
    }

    fn evict(&mut self, ctx: &mut Context<Self>, reason: EvictReason) {
        if self.socket.is_none() {
            return;
        }
        tracing::info!(user = %self.user, session = %self.id, reason = reason.as_str(), "session evicted");
        self.hub.metrics().evicted(reason);
        self.close(ctx, reason.close_code());
    }

    /// Stops writing, sends a close frame (best effort when the peer stopped reading) and stops.
    fn close(&mut self, ctx: &mut Context<Self>, code: CloseCode) {
        let Some(socket) = self.socket.take() else {
            return;
        };
        // Queued frames are dropped: a client resumes with `since` and loses nothing.
        if let Some(writer) = self.writer.take() {
            ctx.cancel_future(writer);
        }
        self.queue = None;
        let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
        actix_rt::spawn(socket.close(code.code(), deadline));
        ctx.stop();
    }

    fn start_writer(&mut self, ctx: &mut Context<Self>) {
        let Some((queue, sink)) = self.queue.take() else {
            return;
        };
        let config = self.hub.config();
        let writer = Writer {
            sink,
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
                Err(WriterError::Overflow) => act.evict(ctx, EvictReason::SlowConsumer),
                Err(WriterError::Store(e)) => {
                    tracing::error!(user = %act.user, session = %act.id, error = %e, "session closed: store unavailable");
                    act.close(ctx, CloseCode::GoingAway);
                }
            }
        }));
        self.writer = Some(handle);
    }
}

/// Text frames every session is sent before any traffic: its `hello`.
const GREETING_TEXTS: u32 = 1;

/// How far the heartbeat grid's slots are apart, at most.
const HEARTBEAT_SLOT: Duration = Duration::from_secs(1);

/// The wait from now to this session's first heartbeat tick, in (0, interval]. Sessions
/// are dealt round-robin over the interval's slots: 10,000 sessions that connected within
/// one second (a restart's reconnect wave, a benchmark) would otherwise all ping in the
/// same instant, forever, and each such round of pings and pongs stalled a worker for
/// ~150 ms under load (BENCHMARKS.md). Dealt out, a slot holds 1/20 of them by default:
/// one timer wake-up per second still serves many sessions (100 ms slots cost 2.1% of a
/// core idle at 19,000 sessions, 1 s slots 1.8-1.9%).
fn first_tick(interval: Duration) -> Duration {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    static DEALT: AtomicU64 = AtomicU64::new(0);
    let now = Instant::now();
    let grid = Grid::new(interval);
    let phase = grid.phase(DEALT.fetch_add(1, Ordering::Relaxed));
    grid.wait(now.duration_since(*EPOCH.get_or_init(|| now)), phase)
}

/// One heartbeat interval cut into slots; times are nanoseconds since the process's epoch.
#[derive(Debug, Clone, Copy)]
struct Grid {
    interval: u128,
    slot: u128,
}

impl Grid {
    fn new(interval: Duration) -> Self {
        let interval = interval.as_nanos().max(1);
        Self {
            interval,
            slot: HEARTBEAT_SLOT.as_nanos().min(interval),
        }
    }

    /// The offset into the interval of the `nth` session's slot.
    fn phase(self, nth: u64) -> u128 {
        let slots = (self.interval / self.slot).max(1);
        (u128::from(nth) % slots) * self.slot
    }

    /// From `since_epoch` to the next moment at `phase` into an interval, in (0, interval].
    fn wait(self, since_epoch: Duration, phase: u128) -> Duration {
        let into = since_epoch.as_nanos() % self.interval;
        let wait = match (phase + self.interval - into) % self.interval {
            0 => self.interval,
            wait => wait,
        };
        // Below one interval, which came from a Duration, so it fits.
        Duration::from_nanos(wait as u64)
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::debug!(user = %self.user, session = %self.id, "session started");
        self.start_heartbeat(ctx);
        // Into the table at once, on this thread: every later fan-out to the user reaches
        // the queue, and this session's leave (in `stopped`, on this same thread) can only
        // come after its join.
        self.hub.members().join(
            self.user.clone(),
            SessionEntry {
                id: self.id,
                outbound: self.outbound.clone(),
                control: ctx.address().recipient(),
                worker: Worker::current(),
            },
        );
        // The writer reads the user's head only after the broker delivers the user's
        // notifications to this node and the table holds the session, so nothing
        // published in between can fall through the gap.
        let subscribed = self.hub.broker().join(&self.user);
        ctx.wait(subscribed.into_actor(self).map(|subscribed, act, ctx| match subscribed {
            Ok(()) => act.start_writer(ctx),
            Err(e) => {
                tracing::warn!(user = %act.user, session = %act.id, error = %e, "session closed: broker unavailable");
                act.close(ctx, CloseCode::GoingAway);
            }
        }));
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.hub.broker().leave(&self.user);
        self.hub.members().leave(&self.user, self.id);
        tracing::debug!(user = %self.user, session = %self.id, "session stopped");
    }
}

impl StreamHandler<Result<InboundFrame, InboundError>> for Session {
    /// Every inbound frame proves the peer alive; text frames may be app-level pings.
    fn handle(&mut self, item: Result<InboundFrame, InboundError>, ctx: &mut Self::Context) {
        self.last_seen = Instant::now();
        match item {
            Ok(InboundFrame::Text(text)) => match std::str::from_utf8(&text) {
                Ok(text) => match ClientFrame::parse(text) {
                    Ok(ClientFrame::Ping) => {
                        self.reply(ctx, Outbound::Frame(protocol::pong_frame()))
                    }
                    Err(bad) => self.reply(
                        ctx,
                        Outbound::Frame(protocol::error_frame("bad_frame", &bad.to_string())),
                    ),
                },
                // RFC 6455 §8.1: text that is not UTF-8 fails the connection.
                Err(_) => self.evict(ctx, EvictReason::ProtocolError),
            },
            Ok(InboundFrame::Binary) => self.reply(
                ctx,
                Outbound::Frame(protocol::error_frame(
                    "bad_frame",
                    "binary frames are not supported",
                )),
            ),
            Ok(InboundFrame::Ping(payload)) => self.reply(ctx, Outbound::Pong(payload)),
            Ok(InboundFrame::Pong) => {}
            Ok(InboundFrame::Close(_)) => self.close(ctx, CloseCode::Normal),
            Err(InboundError::TooBig(_)) => self.evict(ctx, EvictReason::FrameTooBig),
            Err(InboundError::Protocol(e)) => {
                tracing::debug!(user = %self.user, session = %self.id, error = %e, "protocol error");
                self.evict(ctx, EvictReason::ProtocolError);
            }
            Err(InboundError::Io(e)) => {
                tracing::debug!(user = %self.user, session = %self.id, error = %e, "connection failed");
                ctx.stop();
            }
        }
    }

    /// The peer hung up: nothing left to say.
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const INTERVAL: Duration = Duration::from_secs(20);

    /// Where in its interval a tick falls that `wait` after `since_epoch` is due.
    fn lands_at(grid: Grid, since_epoch: Duration, wait: Duration) -> u128 {
        (since_epoch + wait).as_nanos() % grid.interval
    }

    #[test]
    fn sessions_that_arrive_together_ping_in_different_slots() {
        let grid = Grid::new(INTERVAL);
        let arrived = Duration::from_millis(123_456_789);
        let mut per_tick: HashMap<u128, usize> = HashMap::new();
        for nth in 0..10_000 {
            let wait = grid.wait(arrived, grid.phase(nth));
            *per_tick.entry(lands_at(grid, arrived, wait)).or_default() += 1;
        }
        // 20 slots of 1 s in 20 s, 500 sessions each: nowhere a herd.
        assert_eq!(per_tick.len(), 20);
        assert!(per_tick.values().all(|&n| n == 500), "{per_tick:?}");
    }

    #[test]
    fn the_first_tick_comes_within_one_interval_on_its_slot() {
        let grid = Grid::new(INTERVAL);
        for since_ms in [0, 1, 999, 1_000, 19_999, 20_000, 987_654_321] {
            let since = Duration::from_millis(since_ms);
            for nth in [0, 1, 7, 19, 20, 12_345] {
                let phase = grid.phase(nth);
                let wait = grid.wait(since, phase);
                assert!(
                    wait > Duration::ZERO && wait <= INTERVAL,
                    "{since_ms} {nth}: {wait:?}"
                );
                assert_eq!(lands_at(grid, since, wait), phase, "{since_ms} {nth}");
            }
        }
    }

    #[test]
    fn an_interval_shorter_than_a_slot_is_one_slot() {
        let grid = Grid::new(Duration::from_millis(300));
        assert_eq!(grid.phase(0), 0);
        assert_eq!(grid.phase(7), 0);
        let wait = grid.wait(Duration::from_millis(100), 0);
        assert_eq!(wait, Duration::from_millis(200));
    }
}
