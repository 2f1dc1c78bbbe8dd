//! Frames from the peer: read when the socket is readable, unmasked, fragments joined, size bounded.

use std::io::{self, Read};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};

use actix_http::ws::{OpCode, Parser, ProtocolError};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes read per readiness event, into a buffer on the stack. Client frames are small
/// (pings, the odd app-level frame): one read almost always holds whole frames.
const READ_CHUNK: usize = 8 * 1024;

/// The longest frame header a client sends: 2 bytes, an 8-byte length, a 4-byte mask.
const MAX_HEADER: usize = 14;

/// One whole message or control frame from the peer.
#[derive(Debug, PartialEq, Eq)]
pub enum InboundFrame {
    /// A text message, fragments joined. Not yet checked for UTF-8.
    Text(Bytes),
    Binary,
    Ping(Bytes),
    Pong,
    /// The peer's close, with its status code if it gave one.
    Close(Option<u16>),
}

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("message over the {0}-byte limit")]
    TooBig(usize),
    #[error("WebSocket protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The peer's frames as a stream; it ends when the peer hangs up, after the first error.
pub struct Inbound {
    io: Rc<TcpStream>,
    /// Received bytes not yet parsed: empty, and unallocated, between frames.
    unparsed: BytesMut,
    /// A fragmented message in progress: whether it is text, and its bytes so far.
    message: Option<(bool, BytesMut)>,
    max_message: usize,
    done: bool,
}

impl Inbound {
    pub(crate) fn new(io: Rc<TcpStream>, read_ahead: BytesMut, max_message: usize) -> Self {
        Self {
            io,
            unparsed: read_ahead,
            message: None,
            max_message,
            done: false,
        }
    }

    /// The next whole frame in what was received, if there is one.
    fn parse(&mut self) -> Result<Option<InboundFrame>, InboundError> {
        loop {
            let parsed = Parser::parse(&mut self.unparsed, true, self.max_message)
                .map_err(|e| self.protocol_error(e))?;
            let Some((fin, opcode, payload)) = parsed else {
                // actix-http waits for a whole frame whatever its length; this does not.
                if self.unparsed.len() > self.max_message.saturating_add(MAX_HEADER) {
                    return Err(InboundError::TooBig(self.max_message));
                }
                if self.unparsed.is_empty() {
                    // Give back what a burst of reads grew, so an idle session holds nothing.
                    self.unparsed = BytesMut::new();
                }
                return Ok(None);
            };
            let payload = payload.unwrap_or_default();
            let frame = match opcode {
                OpCode::Ping => InboundFrame::Ping(payload.freeze()),
                OpCode::Pong => InboundFrame::Pong,
                OpCode::Close => InboundFrame::Close(close_code(&payload)),
                OpCode::Text | OpCode::Binary => {
                    if self.message.is_some() {
                        return Err(protocol("a new message began before the last one ended"));
                    }
                    let text = opcode == OpCode::Text;
                    if !fin {
                        self.message = Some((text, payload));
                        continue;
                    }
                    message(text, payload)
                }
                OpCode::Continue => {
                    let Some((_, joined)) = self.message.as_mut() else {
                        return Err(protocol("a continuation frame without a message"));
                    };
                    if joined.len() + payload.len() > self.max_message {
                        return Err(InboundError::TooBig(self.max_message));
                    }
                    joined.extend_from_slice(&payload);
                    if !fin {
                        continue;
                    }
                    let Some((text, joined)) = self.message.take() else {
                        continue;
                    };
                    message(text, joined)
                }
                OpCode::Bad => return Err(protocol("bad opcode")),
            };
            return Ok(Some(frame));
        }
    }

    fn protocol_error(&self, e: ProtocolError) -> InboundError {
        match e {
            ProtocolError::Overflow => InboundError::TooBig(self.max_message),
            e => InboundError::Protocol(e.to_string()),
        }
    }
}

/// Reads what the socket holds; a read that did not fill `chunk` took all of it, so the
/// socket's readiness is cleared then as well as on `WouldBlock`.
///
/// Why: `try_read` clears readiness only on `WouldBlock`, so every frame cost a second
/// `recvfrom` that found nothing (19,000 of the ~59,000 system calls an idle hold of 19,000
/// sessions made per heartbeat interval, BENCHMARKS.md). Epoll is edge-triggered: a short
/// read proves the buffer drained, and tokio's own `poll_read` clears readiness on it the
/// same way. The clear is safe against a race: tokio keeps readiness set if an event
/// arrived after the one this read was made on.
fn read_draining(io: &TcpStream, chunk: &mut [u8]) -> io::Result<usize> {
    let mut got = None;
    let cleared = io.try_io(Interest::READABLE, || {
        let n = (&*SockRef::from(io)).read(chunk)?;
        got = Some(n);
        if 0 < n && n < chunk.len() {
            // Makes `try_io` clear readiness; `got` carries the bytes out.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    match (got, cleared) {
        (Some(n), _) => Ok(n),
        (None, Err(e)) => Err(e),
        // The closure returns `Ok` only after setting `got`.
        (None, Ok(())) => Err(io::ErrorKind::WouldBlock.into()),
    }
}

fn message(text: bool, payload: BytesMut) -> InboundFrame {
    if text {
        InboundFrame::Text(payload.freeze())
    } else {
        InboundFrame::Binary
    }
}

fn protocol(what: &str) -> InboundError {
    InboundError::Protocol(what.to_owned())
}

fn close_code(payload: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*payload.first()?, *payload.get(1)?]))
}

impl Stream for Inbound {
    type Item = Result<InboundFrame, InboundError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.parse() {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if let Err(e) = ready!(this.io.poll_read_ready(cx)) {
                this.done = true;
                return Poll::Ready(Some(Err(e.into())));
            }
            let mut chunk = [0u8; READ_CHUNK];
            match read_draining(&this.io, &mut chunk) {
                Ok(0) => this.done = true,
                Ok(n) => this.unparsed.extend_from_slice(&chunk[..n]),
                // Spurious readiness: it was cleared, the next poll waits again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }
}
