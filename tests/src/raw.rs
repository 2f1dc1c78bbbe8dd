//! Hand-written HTTP on a bare TCP socket: requests no client library would send
//! (dot segments, raw bytes, chunked bodies) and WebSocket peers that misbehave.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::SOON;

/// A parsed HTTP response: status, headers (lower-cased names) and body.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// Sends `request` exactly as given (it should say `Connection: close`) and reads the whole answer.
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    let mut raw = Vec::new();
    tokio::time::timeout(SOON, stream.read_to_end(&mut raw))
        .await
        .expect("the server answered and closed in time")
        .expect("read response");
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> RawResponse {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    RawResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = std::str::from_utf8(&data[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || data.len() < eol + 2 + size {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[(eol + 4 + size).min(data.len())..];
    }
}

/// A WebSocket peer on a bare socket: it completes the handshake by hand and
/// afterwards does only what the test tells it to (by default: nothing at all,
/// like a half-open connection whose other end vanished).
pub struct RawWebSocket {
    pub stream: TcpStream,
}

impl RawWebSocket {
    /// Upgrades `path` (with its query) and reads exactly the 101 response head.
    /// Answers the HTTP status when the server refuses.
    pub async fn connect(addr: SocketAddr, path: &str) -> Result<Self, u16> {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write upgrade");
        // Byte by byte, so not one byte of the WebSocket stream after the head is consumed.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            let n = tokio::time::timeout(SOON, stream.read(&mut byte))
                .await
                .expect("upgrade answered in time")
                .expect("read upgrade response");
            assert!(n == 1, "connection closed during the handshake");
            head.push(byte[0]);
        }
        let response = parse_response(&head);
        if response.status != 101 {
            return Err(response.status);
        }
        assert_eq!(
            response.header("sec-websocket-accept"),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "RFC 6455 accept key"
        );
        Ok(Self { stream })
    }

    /// Writes raw bytes (frames built with [`client_frame`] / [`client_fragment`]).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Writes one masked text frame, as a client must (RFC 6455 §5.3).
    pub async fn send_text(&mut self, text: &str) -> std::io::Result<()> {
        self.stream
            .write_all(&client_frame(0x1, text.as_bytes()))
            .await
    }

    /// True once the server has closed or reset the connection (reads until EOF or error).
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Reads server frames until a Close; answers its code (None: the socket ended without one).
    pub async fn close_code(&mut self, wait: Duration) -> Option<u16> {
        let read = async {
            loop {
                let mut head = [0u8; 2];
                self.stream.read_exact(&mut head).await.ok()?;
                let len = match head[1] & 0x7f {
                    126 => {
                        let mut n = [0u8; 2];
                        self.stream.read_exact(&mut n).await.ok()?;
                        u16::from_be_bytes(n) as usize
                    }
                    127 => {
                        let mut n = [0u8; 8];
                        self.stream.read_exact(&mut n).await.ok()?;
                        u64::from_be_bytes(n) as usize
                    }
                    n => n as usize,
                };
                let mut payload = vec![0u8; len];
                self.stream.read_exact(&mut payload).await.ok()?;
                if head[0] & 0x0f == 0x8 {
                    return (len >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                }
            }
        };
        tokio::time::timeout(wait, read)
            .await
            .expect("the server closed in time")
    }
}

/// A masked client frame with FIN set.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    client_fragment(true, opcode, payload)
}

/// A masked client frame; `fin = false` starts or continues a fragmented message.
pub fn client_fragment(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}
