//! The wire: frames the server sends, frames a client may send, and close codes.
//!
//! Server frames are encoded once into a [`ByteString`] and shared by every
//! session that receives them; cloning one is a refcount, not a copy.

use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::ids::{Seq, SessionId, UserId};

/// WebSocket close codes Herald uses (RFC 6455 plus the 4000 range it owns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    Normal = 1000,
    GoingAway = 1001,
    ProtocolError = 1002,
    Policy = 1008,
    TooBig = 1009,
    HeartbeatTimeout = 4000,
    SlowConsumer = 4001,
}

impl CloseCode {
    pub fn code(self) -> u16 {
        self as u16
    }
}

/// The heartbeat a session runs, announced in `hello` so clients can match it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HeartbeatInfo {
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

/// The first frame of every session.
#[derive(Debug, Serialize)]
pub struct Hello<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub session: String,
    pub user: &'a UserId,
    /// The user's latest seq when the session started.
    pub seq: Seq,
    /// The oldest seq still stored for this user (`seq + 1` when none is).
    pub first_seq: Seq,
    /// Only with `since`: `false` when notifications after `since` were already
    /// dropped by retention, so the client knows it missed some.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    pub heartbeat: HeartbeatInfo,
}

impl Hello<'_> {
    pub fn encode(&self) -> ByteString {
        encode(self)
    }
}

pub fn hello<'a>(
    session: SessionId,
    user: &'a UserId,
    seq: Seq,
    first_seq: Seq,
    recovered: Option<bool>,
    heartbeat: HeartbeatInfo,
) -> Hello<'a> {
    Hello {
        kind: "hello",
        session: session.to_string(),
        user,
        seq,
        first_seq,
        recovered,
        heartbeat,
    }
}

#[derive(Serialize)]
struct NotificationFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    seq: Seq,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    data: &'a RawValue,
    ts: &'a str,
}

/// `{"type":"notification",...}`: what a session receives and what history returns.
pub fn notification_frame(
    id: &str,
    seq: Seq,
    event: Option<&str>,
    data: &RawValue,
    ts: &str,
) -> ByteString {
    encode(&NotificationFrame {
        kind: "notification",
        id,
        seq,
        event,
        data,
        ts,
    })
}

#[derive(Serialize)]
struct BroadcastFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    data: &'a RawValue,
    ts: &'a str,
}

/// `{"type":"broadcast",...}`: live only, no seq.
pub fn broadcast_frame(id: &str, event: Option<&str>, data: &RawValue, ts: &str) -> ByteString {
    encode(&BroadcastFrame {
        kind: "broadcast",
        id,
        event,
        data,
        ts,
    })
}

pub fn pong_frame() -> ByteString {
    ByteString::from_static(r#"{"type":"pong"}"#)
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    code: &'a str,
    message: &'a str,
}

pub fn error_frame(code: &str, message: &str) -> ByteString {
    encode(&ErrorFrame {
        kind: "error",
        code,
        message,
    })
}

fn encode<T: Serialize>(frame: &T) -> ByteString {
    // Serializing our own structs of strings, numbers and already-valid raw JSON cannot fail.
    ByteString::from(serde_json::to_string(frame).expect("server frames always serialize"))
}

/// What a client may send. Anything else earns an `error` frame.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientFrame {
    Ping,
}

/// Why a client's text frame was not understood; becomes an `error` frame.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadFrame {
    #[error("frame is not JSON")]
    NotJson,
    #[error("frame has no string `type`")]
    NoType,
    #[error("unknown frame type `{0}`")]
    UnknownType(String),
}

impl ClientFrame {
    pub fn parse(text: &str) -> Result<Self, BadFrame> {
        #[derive(Deserialize)]
        struct Typed {
            #[serde(rename = "type")]
            kind: Option<String>,
        }
        let typed: Typed = serde_json::from_str(text).map_err(|_| BadFrame::NotJson)?;
        match typed.kind.as_deref() {
            Some("ping") => Ok(Self::Ping),
            Some(other) => Err(BadFrame::UnknownType(other.chars().take(64).collect())),
            None => Err(BadFrame::NoType),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notification_frame_matches_the_contract() {
        let data = RawValue::from_string(r#"{"order":42}"#.into()).unwrap();
        let frame = notification_frame(
            "n1",
            19,
            Some("order.shipped"),
            &data,
            "2026-11-25T17:00:00Z",
        );
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"notification","id":"n1","seq":19,"event":"order.shipped","data":{"order":42},"ts":"2026-11-25T17:00:00Z"})
        );
    }

    #[test]
    fn client_frames() {
        assert_eq!(
            ClientFrame::parse(r#"{"type":"ping"}"#),
            Ok(ClientFrame::Ping)
        );
        assert_eq!(ClientFrame::parse("nope"), Err(BadFrame::NotJson));
        assert_eq!(ClientFrame::parse("{}"), Err(BadFrame::NoType));
        assert_eq!(
            ClientFrame::parse(r#"{"type":"sub"}"#),
            Err(BadFrame::UnknownType("sub".into()))
        );
    }
}
