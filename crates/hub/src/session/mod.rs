//! One WebSocket session: the actor that keeps the peer alive and the writer that feeds it in seq order.

mod actor;
pub mod queue;
mod writer;

pub use actor::Session;

use actix::Message;
use bytes::Bytes;
use bytestring::ByteString;

use crate::ids::Seq;
use crate::protocol::CloseCode;

/// What travels through a session's bounded outbound queue, in order.
#[derive(Debug)]
pub enum Outbound {
    /// A stored notification; the writer orders these by seq and drops duplicates.
    Notification { seq: Seq, frame: ByteString },
    /// Any other text frame (broadcast, pong, error), sent as it comes.
    Frame(ByteString),
    /// A WebSocket Ping (the server's heartbeat).
    Ping,
    /// A WebSocket Pong answering the peer's Ping.
    Pong(Bytes),
}

/// Why the server closed a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictReason {
    /// No sign of the peer (an inbound frame, acknowledged frames) for `heartbeat.timeout_ms`.
    Heartbeat,
    /// The outbound queue overflowed: the peer reads too slowly.
    SlowConsumer,
    /// The peer sent a frame over `limits.max_frame_bytes`.
    FrameTooBig,
    /// The peer broke the WebSocket protocol.
    ProtocolError,
    /// The server is shutting down.
    Shutdown,
}

impl EvictReason {
    /// The one place reasons map to close codes.
    pub fn close_code(self) -> CloseCode {
        match self {
            Self::Heartbeat => CloseCode::HeartbeatTimeout,
            Self::SlowConsumer => CloseCode::SlowConsumer,
            Self::FrameTooBig => CloseCode::TooBig,
            Self::ProtocolError => CloseCode::ProtocolError,
            Self::Shutdown => CloseCode::GoingAway,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Heartbeat => "heartbeat",
            Self::SlowConsumer => "slow_consumer",
            Self::FrameTooBig => "frame_too_big",
            Self::ProtocolError => "protocol_error",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Asks a session to close with the code its reason maps to.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Evict {
    pub reason: EvictReason,
}
