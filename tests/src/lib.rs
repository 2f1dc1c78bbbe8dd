//! Helpers for the end-to-end tests: a real Herald (in-process or as a child process) and real clients.

mod client;
mod probe;
mod process;
mod raw;
mod redis;
mod server;

pub use client::{Event, Publisher, Subscriber, seqs};
pub use probe::{TCP_ESTABLISHED, eventually, rss_bytes, rss_bytes_of, server_socket_state};
pub use process::{Exited, HeraldProcess};
pub use raw::{RawResponse, RawWebSocket, client_fragment, client_frame, raw_http};
pub use redis::RedisServer;
pub use server::{
    API_KEY, Herald, JWT_SECRET, metric_value, subscribe_at, test_settings, token, ws_url,
};

/// How long a test waits for something that should happen at once.
pub const SOON: std::time::Duration = std::time::Duration::from_secs(5);
