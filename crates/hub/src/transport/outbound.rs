//! Frames to the peer: payloads written from the shared bytes, headers from the stack, queued frames in one `writev`.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::rc::Rc;

use bytes::Bytes;
use tokio::net::TcpStream;

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
const FIN: u8 = 0x80;

/// Frames per `writev`: two slices each, well under the kernel's IOV_MAX of 1024.
const MAX_BATCH: usize = 64;

/// Frames queued beyond this are written before more are queued.
pub const FLUSH_AT: usize = MAX_BATCH;

/// A queue that grew past this many frames is given back once it is written.
const KEEP_CAPACITY: usize = 8;

#[derive(Debug, thiserror::Error)]
#[error("the peer is gone")]
pub struct PeerGone;

/// A server frame header: server frames are never masked, so it is the same for every
/// session that gets the payload.
#[derive(Clone, Copy)]
struct Header {
    bytes: [u8; 10],
    len: u8,
}

impl Header {
    fn new(opcode: u8, payload_len: usize) -> Self {
        let mut bytes = [0u8; 10];
        bytes[0] = FIN | opcode;
        let len = if payload_len < 126 {
            bytes[1] = payload_len as u8;
            2
        } else if let Ok(short) = u16::try_from(payload_len) {
            bytes[1] = 126;
            bytes[2..4].copy_from_slice(&short.to_be_bytes());
            4
        } else {
            bytes[1] = 127;
            bytes[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
            10
        };
        Self { bytes, len }
    }

    /// No header: bytes that go out as they are (the 101 before the first frame).
    const NONE: Self = Self {
        bytes: [0; 10],
        len: 0,
    };

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

struct Frame {
    header: Header,
    payload: Bytes,
}

impl Frame {
    fn len(&self) -> usize {
        usize::from(self.header.len) + self.payload.len()
    }

    fn is_text(&self) -> bool {
        self.header.len > 0 && self.header.bytes[0] & 0x0F == OP_TEXT
    }
}

/// How far the peer got in the connection's bytes, for whoever writes after this sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Wire {
    /// The 101 is not all sent: no frame may go out without it.
    Handshake,
    /// Between frames: a close frame may follow.
    #[default]
    Clean,
    /// A frame is sent in part: nothing else may follow it.
    Torn,
}

/// What the sink leaves for the others that hold the connection: the close and the heartbeat.
#[derive(Debug, Default)]
pub(crate) struct Line {
    /// Where the writer left the wire: only between frames may a close frame follow.
    pub wire: Cell<Wire>,
    /// Text frames that went out whole, wrapping: the heartbeat's sign of traffic.
    pub texts_sent: Cell<u32>,
}

/// Writes one session's frames, in order. Frames are queued, then `flush` writes them.
pub struct FrameSink {
    io: Rc<TcpStream>,
    queued: VecDeque<Frame>,
    /// How much of the first queued frame is on the wire already.
    written: usize,
    line: Rc<Line>,
}

impl FrameSink {
    pub(crate) fn new(io: Rc<TcpStream>, line: Rc<Line>) -> Self {
        Self {
            io,
            queued: VecDeque::new(),
            written: 0,
            line,
        }
    }

    /// Queues the upgrade's 101 in front of everything: the first flush sends it together
    /// with the first frames, in one write.
    pub(crate) fn queue_handshake(&mut self, response: Bytes) {
        self.queued.push_front(Frame {
            header: Header::NONE,
            payload: response,
        });
        self.line.wire.set(Wire::Handshake);
    }

    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    pub fn queue_text(&mut self, payload: Bytes) {
        self.queue(OP_TEXT, payload);
    }

    pub fn queue_ping(&mut self) {
        self.queue(OP_PING, Bytes::new());
    }

    pub fn queue_pong(&mut self, payload: Bytes) {
        self.queue(OP_PONG, payload);
    }

    pub(crate) fn queue_close(&mut self, code: u16) {
        self.queue(OP_CLOSE, Bytes::copy_from_slice(&code.to_be_bytes()));
    }

    fn queue(&mut self, opcode: u8, payload: Bytes) {
        let header = Header::new(opcode, payload.len());
        self.queued.push_back(Frame { header, payload });
    }

    /// Queues a text frame and sends it with everything queued before it.
    pub async fn send_text(&mut self, payload: Bytes) -> Result<(), PeerGone> {
        self.queue_text(payload);
        self.flush().await
    }

    /// Writes every queued frame; waits while the peer's receive window is full.
    pub async fn flush(&mut self) -> Result<(), PeerGone> {
        while !self.queued.is_empty() {
            match self.write_some() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.io.writable().await.map_err(|_| PeerGone)?;
                }
                Err(_) => return Err(PeerGone),
            }
        }
        if self.queued.capacity() > KEEP_CAPACITY {
            self.queued = VecDeque::new();
        }
        Ok(())
    }

    /// One `writev` of up to `MAX_BATCH` queued frames.
    fn write_some(&mut self) -> io::Result<()> {
        let mut slices = [IoSlice::new(&[]); 2 * MAX_BATCH];
        let mut count = 0;
        let mut skip = self.written;
        for frame in self.queued.iter().take(MAX_BATCH) {
            for part in [frame.header.as_slice(), &frame.payload[..]] {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                slices[count] = IoSlice::new(&part[skip..]);
                skip = 0;
                count += 1;
            }
        }
        let mut n = self.io.try_write_vectored(&slices[..count])?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        n += self.written;
        let mut sent_whole = false;
        let mut texts = 0u32;
        while let Some(front) = self.queued.front() {
            if n < front.len() {
                break;
            }
            n -= front.len();
            texts += u32::from(front.is_text());
            self.queued.pop_front();
            sent_whole = true;
        }
        self.written = n;
        self.line
            .texts_sent
            .set(self.line.texts_sent.get().wrapping_add(texts));
        // The 101 is always first: once anything left the queue whole, it was among it.
        let handshaking = self.line.wire.get() == Wire::Handshake && !sent_whole;
        self.line.wire.set(if handshaking {
            Wire::Handshake
        } else if n > 0 {
            Wire::Torn
        } else {
            Wire::Clean
        });
        Ok(())
    }
}
