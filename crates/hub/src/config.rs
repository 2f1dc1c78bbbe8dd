//! The hub's tunables, already validated by whoever loaded them (the gateway's settings).

use std::time::Duration;

/// How sessions prove they are alive.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    /// Each session is checked this often, and pinged unless its peer's TCP acknowledged
    /// frames sent to it since the last check.
    pub interval: Duration,
    /// A session with no sign of its peer (an inbound frame, acknowledged frames) for
    /// this long is evicted.
    pub timeout: Duration,
}

/// How much history the store keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// At most this many notifications per user; older ones are dropped first.
    pub per_user: u64,
    /// Nothing older than this is replayed, listed or remembered for idempotency.
    pub max_age: Duration,
}

impl Retention {
    /// The oldest `ts_ms` (milliseconds since the Unix epoch) retention keeps right now.
    pub fn cutoff_ms(&self) -> i64 {
        crate::store::now_ms() - self.max_age.as_millis() as i64
    }
}

/// Everything the hub needs to run sessions.
#[derive(Debug, Clone, Copy)]
pub struct HubConfig {
    pub heartbeat: Heartbeat,
    /// Frames queued for one session before it counts as a slow consumer.
    pub session_queue: usize,
    /// The largest frame a client may send; larger closes the session with 1009.
    pub max_frame_bytes: usize,
    /// How long a session waits for a missing seq to arrive live before it
    /// reads it from the store (publishes of one user can race each other).
    pub gap_wait: Duration,
}
