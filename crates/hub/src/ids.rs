//! Typed identifiers: who a notification is for, which socket holds it, and its place in a user's stream.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Serialize, Serializer};

/// The longest user id the contract accepts, in bytes.
pub const MAX_USER_ID_BYTES: usize = 128;

/// Why a string is not a user id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidUserId {
    #[error("user id is empty")]
    Empty,
    #[error("user id is longer than {MAX_USER_ID_BYTES} bytes")]
    TooLong,
    #[error("user id may only hold A-Z a-z 0-9 . _ : @ -")]
    BadCharacter,
    #[error("user id may not be `.` or `..`")]
    DotSegment,
}

/// A validated user id: 1 to 128 bytes of `A-Z a-z 0-9 . _ : @ -`, never `.` or `..`.
///
/// Cheap to clone (`Arc<str>`) because the registry, every session and every
/// notification of that user carry one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

impl UserId {
    pub fn parse(raw: &str) -> Result<Self, InvalidUserId> {
        if raw.is_empty() {
            return Err(InvalidUserId::Empty);
        }
        if raw.len() > MAX_USER_ID_BYTES {
            return Err(InvalidUserId::TooLong);
        }
        let allowed =
            |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-');
        if !raw.bytes().all(allowed) {
            return Err(InvalidUserId::BadCharacter);
        }
        if raw == "." || raw == ".." {
            return Err(InvalidUserId::DotSegment);
        }
        Ok(Self(Arc::from(raw)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lets maps keyed by user id be looked up with a `&str` (a row read from the store)
/// without building an id; `Hash` and `Eq` are the `str`'s, as `Borrow` requires.
impl std::borrow::Borrow<str> for UserId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({})", &self.0)
    }
}

impl Serialize for UserId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// One WebSocket session. Ids come from a per-process counter, so they never
/// collide within a node and a stale `Leave` can never match a newer session.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(u64);

impl SessionId {
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s-{}", self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Hands out session ids 1, 2, 3, … for one process.
#[derive(Debug, Default)]
pub struct SessionIds(AtomicU64);

impl SessionIds {
    pub fn next(&self) -> SessionId {
        SessionId(self.0.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

/// A notification's place in its user's stream: 1, 2, 3, … with no gaps.
pub type Seq = u64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["alice", "a", "A.b_c:d@e-f", "0", &"x".repeat(128), "..."] {
            assert!(UserId::parse(ok).is_ok(), "{ok:?} should be valid");
        }
    }

    #[test]
    fn rejects_everything_else() {
        assert_eq!(UserId::parse(""), Err(InvalidUserId::Empty));
        assert_eq!(UserId::parse(&"x".repeat(129)), Err(InvalidUserId::TooLong));
        assert_eq!(UserId::parse("."), Err(InvalidUserId::DotSegment));
        assert_eq!(UserId::parse(".."), Err(InvalidUserId::DotSegment));
        for bad in ["a/b", "a b", "é", "a%2F", "a\0", "a\n", "a?b", "a#b"] {
            assert_eq!(
                UserId::parse(bad),
                Err(InvalidUserId::BadCharacter),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn session_ids_count_up() {
        let ids = SessionIds::default();
        assert_eq!(ids.next().to_string(), "s-1");
        assert_eq!(ids.next().to_string(), "s-2");
    }
}
