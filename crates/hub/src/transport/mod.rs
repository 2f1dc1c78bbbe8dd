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

mod acks;
mod inbound;
mod outbound;

pub use inbound::{Inbound, InboundError, InboundFrame};
pub use outbound::{FLUSH_AT, FrameSink, PeerGone};

use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::net::TcpStream;

use outbound::{Line, Wire};

/// A socket the gateway upgraded: the 101 is decided, the rest is the session's.
#[derive(Debug)]
pub struct Upgraded {
    pub stream: TcpStream,
    /// Bytes the peer sent after its handshake that the HTTP parser had already read.
    pub read_ahead: BytesMut,
    /// The encoded 101 response, not sent yet: it goes out in one write with the session's
    /// first frames (the `hello`), which saves a write and the peer a read per connect.
    /// Empty when there is nothing to send first.
    pub handshake: Bytes,
}

/// The parts of one connection a session holds.
pub(crate) struct Transport {
    pub inbound: Inbound,
    pub sink: FrameSink,
    pub socket: Socket,
}

/// The socket itself: what the heartbeat asks of it, and its close after the session's
/// reader and writer are gone.
#[derive(Clone)]
pub(crate) struct Socket {
    io: Rc<TcpStream>,
    line: Rc<Line>,
}

impl Upgraded {
    /// Splits the connection for one session; the reader refuses messages over `max_message`.
    pub(crate) fn into_transport(self, max_message: usize) -> Transport {
        let io = Rc::new(self.stream);
        let line = Rc::new(Line::default());
        let mut sink = FrameSink::new(Rc::clone(&io), Rc::clone(&line));
        if !self.handshake.is_empty() {
            sink.queue_handshake(self.handshake);
        }
        Transport {
            inbound: Inbound::new(Rc::clone(&io), self.read_ahead, max_message),
            sink,
            socket: Socket { io, line },
        }
    }
}

impl Socket {
    /// Text frames that went out whole so far, wrapping.
    pub(crate) fn texts_sent(&self) -> u32 {
        self.line.texts_sent.get()
    }

    /// How long ago the peer's TCP last acknowledged anything; `None` where the kernel
    /// does not say.
    pub(crate) fn last_ack_age(&self) -> Option<Duration> {
        acks::last_ack_age(&self.io)
    }

    /// Ends the connection: a close frame with `code` if the wire allows one, then waits
    /// (until `deadline`) for the peer's close or its hang-up before closing the socket.
    /// A peer that does not take the close frame in time gets a reset.
    pub(crate) async fn close(self, code: u16, deadline: tokio::time::Instant) {
        // A peer that never got its 101 gets no close frame either: a reset ends its
        // handshake the way any failed connect does.
        let sent = self.line.wire.get() == Wire::Clean && {
            let mut sink = FrameSink::new(Rc::clone(&self.io), Rc::clone(&self.line));
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const MAX: usize = 1024;

    /// A client frame as browsers send it: masked (actix-http's client-side encoder).
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = BytesMut::new();
        actix_http::ws::Parser::write_message(&mut frame, payload, opcode.into(), fin, true);
        frame.to_vec()
    }

    /// A real loopback connection: the server side as a session gets it, and the peer.
    async fn pair() -> (Transport, TcpStream) {
        pair_after(Bytes::new()).await
    }

    /// A transport whose 101 (`handshake`) is still to be sent, and its peer.
    async fn pair_after(handshake: Bytes) -> (Transport, TcpStream) {
        pair_with(handshake, MAX).await
    }

    async fn pair_with(handshake: Bytes, max_message: usize) -> (Transport, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let upgraded = Upgraded {
            stream,
            read_ahead: BytesMut::new(),
            handshake,
        };
        (upgraded.into_transport(max_message), peer)
    }

    async fn next(inbound: &mut Inbound) -> Option<Result<InboundFrame, InboundError>> {
        tokio::time::timeout(Duration::from_secs(5), inbound.next())
            .await
            .expect("a frame or the end in time")
    }

    #[tokio::test]
    async fn frames_that_arrive_a_byte_at_a_time_or_in_fragments_come_out_whole() {
        let (mut transport, mut peer) = pair().await;
        let mut bytes = client_frame(true, 0x1, br#"{"type":"ping"}"#);
        bytes.extend(client_frame(false, 0x1, b"hel"));
        bytes.extend(client_frame(true, 0x9, b"in between"));
        bytes.extend(client_frame(true, 0x0, b"lo"));
        bytes.extend(client_frame(true, 0x8, &1000u16.to_be_bytes()));
        tokio::spawn(async move {
            for byte in bytes {
                peer.write_all(&[byte]).await.unwrap();
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            peer
        });
        let inbound = &mut transport.inbound;
        let text = |s: &'static str| InboundFrame::Text(Bytes::from_static(s.as_bytes()));
        assert_eq!(
            next(inbound).await.unwrap().unwrap(),
            text(r#"{"type":"ping"}"#)
        );
        assert_eq!(
            next(inbound).await.unwrap().unwrap(),
            InboundFrame::Ping(Bytes::from_static(b"in between"))
        );
        assert_eq!(next(inbound).await.unwrap().unwrap(), text("hello"));
        assert_eq!(
            next(inbound).await.unwrap().unwrap(),
            InboundFrame::Close(Some(1000))
        );
    }

    #[tokio::test]
    async fn a_message_longer_than_one_read_arrives_whole_and_the_next_after_a_pause() {
        // Reads fill their buffer (no drained socket assumed) and stop at a short one
        // (readiness cleared): the frame after a pause must still wake the stream.
        let (mut transport, mut peer) = pair_with(Bytes::new(), 64 * 1024).await;
        let long = vec![b'l'; 40 * 1024];
        peer.write_all(&client_frame(true, 0x1, &long))
            .await
            .unwrap();
        assert_eq!(
            next(&mut transport.inbound).await.unwrap().unwrap(),
            InboundFrame::Text(Bytes::from(long))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        peer.write_all(&client_frame(true, 0xA, b"")).await.unwrap();
        assert_eq!(
            next(&mut transport.inbound).await.unwrap().unwrap(),
            InboundFrame::Pong
        );
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_before_it_is_all_received() {
        let (mut transport, mut peer) = pair().await;
        let big = client_frame(true, 0x1, &vec![b'x'; 64 * MAX]);
        // Only a little more than the limit is sent; the rest never comes.
        peer.write_all(&big[..MAX + 64]).await.unwrap();
        assert!(matches!(
            next(&mut transport.inbound).await,
            Some(Err(InboundError::TooBig(MAX)))
        ));
        assert!(
            next(&mut transport.inbound).await.is_none(),
            "the stream ends after an error"
        );
    }

    #[tokio::test]
    async fn fragments_adding_up_past_the_limit_and_unmasked_frames_are_refused() {
        let (mut transport, mut peer) = pair().await;
        let part = vec![b'y'; MAX / 2 + 1];
        let mut bytes = client_frame(false, 0x1, &part);
        bytes.extend(client_frame(true, 0x0, &part));
        peer.write_all(&bytes).await.unwrap();
        assert!(matches!(
            next(&mut transport.inbound).await,
            Some(Err(InboundError::TooBig(_)))
        ));

        let (mut transport, mut peer) = pair().await;
        peer.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
        assert!(matches!(
            next(&mut transport.inbound).await,
            Some(Err(InboundError::Protocol(_)))
        ));
    }

    #[tokio::test]
    async fn queued_frames_go_out_in_order_even_through_a_full_socket() {
        let (mut transport, mut peer) = pair().await;
        // Far more than the socket buffers hold, so writes block and resume part-way.
        let payload = Bytes::from(vec![b'z'; 300_000]);
        let frames = 40;
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got
        });
        for _ in 0..frames {
            transport.sink.queue_text(payload.clone());
        }
        transport.sink.queue_ping();
        transport.sink.flush().await.unwrap();
        assert_eq!(transport.socket.line.wire.get(), Wire::Clean);
        drop(transport);
        let got = reader.await.unwrap();
        let mut at = 0;
        for _ in 0..frames {
            assert_eq!(&got[at..at + 2], &[0x81, 127]);
            assert_eq!(&got[at + 2..at + 10], &300_000u64.to_be_bytes());
            assert!(got[at + 10..at + 10 + 300_000].iter().all(|&b| b == b'z'));
            at += 10 + 300_000;
        }
        assert_eq!(&got[at..], &[0x89, 0x00], "the ping last, nothing after it");
    }

    const SWITCHING: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";

    #[tokio::test]
    async fn the_101_goes_out_first_with_the_first_frame() {
        let (mut transport, mut peer) = pair_after(Bytes::from_static(SWITCHING)).await;
        assert_eq!(transport.socket.line.wire.get(), Wire::Handshake);
        transport.sink.queue_ping();
        transport
            .sink
            .send_text(Bytes::from_static(b"hello"))
            .await
            .unwrap();
        assert_eq!(transport.socket.line.wire.get(), Wire::Clean);
        drop(transport);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        let mut want = SWITCHING.to_vec();
        want.extend([0x89, 0x00, 0x81, 0x05]);
        want.extend(b"hello");
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn counts_the_text_frames_that_went_out_whole() {
        let (mut transport, _peer) = pair_after(Bytes::from_static(SWITCHING)).await;
        transport.sink.queue_ping();
        transport.sink.queue_text(Bytes::from_static(b"hello"));
        transport.sink.queue_pong(Bytes::new());
        transport.sink.flush().await.unwrap();
        assert_eq!(
            transport.socket.texts_sent(),
            1,
            "the 101, a Ping, a Pong: no text"
        );
        transport
            .sink
            .send_text(Bytes::from_static(b"n"))
            .await
            .unwrap();
        assert_eq!(transport.socket.texts_sent(), 2);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn sees_when_the_peers_tcp_last_acknowledged() {
        let (mut transport, _peer) = pair().await;
        let quiet = Duration::from_millis(600);
        tokio::time::sleep(quiet).await;
        let age = transport.socket.last_ack_age().expect("TCP_INFO");
        assert!(age >= quiet / 2, "an ACK {age:?} ago on a quiet connection");
        // The peer never reads: its kernel acknowledges the frame all the same.
        transport
            .sink
            .send_text(Bytes::from_static(b"n"))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let age = transport.socket.last_ack_age().expect("TCP_INFO");
            if age < quiet / 2 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no ACK seen: {age:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_close_before_the_101_went_out_sends_no_frame() {
        let (transport, mut peer) = pair_after(Bytes::from_static(SWITCHING)).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        transport.socket.clone().close(1001, deadline).await;
        drop(transport);
        let mut got = Vec::new();
        // A reset or an end, and not one byte: a close frame without its 101 is garbage.
        let _ = peer.read_to_end(&mut got).await;
        assert!(got.is_empty(), "{got:?}");
    }
}
