//! A WebSocket after its handshake, owned by Herald: frames in and out of the bare socket, no buffer kept while idle.
//!
//! Why not actix-ws: it runs a WebSocket as a never-ending HTTP/1 request, so actix-http's
//! dispatcher keeps its 8 KiB read and 8 KiB write buffers for the whole life of every
//! session (16 KiB of the 17.8 KB an idle session cost), wakes two more tasks per frame,
//! and copies every frame into the write buffer. Here the gateway takes the socket from
//! the dispatcher at the 101 (actix-http's upgrade hook) and the session reads and writes
//! it directly:
//!
//! - inbound ([`Inbound`]): read into a stack buffer when the socket is readable; only a
//!   frame that arrived in part is kept, so an idle session holds no read buffer;
//! - outbound ([`FrameSink`]): a frame's payload is the publish's shared `Bytes` (encoded
//!   once for every session), its 2–10 byte header is built on the stack, and frames
//!   queued together go out in one `writev`.
//!
//! The framing rules (masking, lengths, opcodes, control-frame limits) are actix-http's
//! `ws::Parser`, the same code actix-ws runs.

mod inbound;
mod outbound;

pub use inbound::{Inbound, InboundError, InboundFrame};
pub use outbound::{FLUSH_AT, FrameSink, PeerGone};

use std::cell::Cell;
use std::rc::Rc;

use bytes::BytesMut;
use tokio::net::TcpStream;

/// A socket the gateway upgraded: the 101 is sent, the rest is the session's.
#[derive(Debug)]
pub struct Upgraded {
    pub stream: TcpStream,
    /// Bytes the peer sent after its handshake that the HTTP parser had already read.
    pub read_ahead: BytesMut,
}

/// The parts of one connection a session holds.
pub(crate) struct Transport {
    pub inbound: Inbound,
    pub sink: FrameSink,
    pub socket: Socket,
}

/// The socket itself, for closing it after the session's reader and writer are gone.
#[derive(Clone)]
pub(crate) struct Socket {
    io: Rc<TcpStream>,
    /// Set while a frame is written in part: nothing else may follow it on the wire.
    torn: Rc<Cell<bool>>,
}

impl Upgraded {
    /// Splits the connection for one session; the reader refuses messages over `max_message`.
    pub(crate) fn into_transport(self, max_message: usize) -> Transport {
        let io = Rc::new(self.stream);
        let torn = Rc::new(Cell::new(false));
        Transport {
            inbound: Inbound::new(Rc::clone(&io), self.read_ahead, max_message),
            sink: FrameSink::new(Rc::clone(&io), Rc::clone(&torn)),
            socket: Socket { io, torn },
        }
    }
}

impl Socket {
    /// Ends the connection: a close frame with `code` if the wire allows one, then waits
    /// (until `deadline`) for the peer's close or its hang-up before closing the socket.
    /// A peer that does not take the close frame in time gets a reset.
    pub(crate) async fn close(self, code: u16, deadline: tokio::time::Instant) {
        let sent = !self.torn.get() && {
            let mut sink = FrameSink::new(Rc::clone(&self.io), Rc::clone(&self.torn));
            sink.queue_close(code);
            matches!(
                tokio::time::timeout_at(deadline, sink.flush()).await,
                Ok(Ok(()))
            )
        };
        if sent {
            // A fresh reader: whatever the session's reader held in part is dropped, so
            // it may misread the stream; any error ends the wait like the reply would.
            let mut inbound = Inbound::new(Rc::clone(&self.io), BytesMut::new(), usize::MAX);
            let replied = async {
                use futures_util::StreamExt;
                while let Some(Ok(frame)) = inbound.next().await {
                    if matches!(frame, InboundFrame::Close(_)) {
                        break;
                    }
                }
            };
            if tokio::time::timeout_at(deadline, replied).await.is_ok() {
                return;
            }
        }
        // Linger 0: the close resets the connection instead of trying, for minutes, to
        // deliver what a peer that stopped reading will never take.
        let _ = socket2::SockRef::from(&*self.io).set_linger(Some(std::time::Duration::ZERO));
    }
}
