//! Helpers for the end-to-end tests: a real Herald (in-process or as a child process) and real clients.

mod client;
mod process;
mod redis;
mod server;

pub use client::{Event, Publisher, Subscriber, seqs};
pub use process::{Exited, HeraldProcess};
pub use redis::RedisServer;
pub use server::{API_KEY, Herald, JWT_SECRET, subscribe_at, test_settings, token, ws_url};

/// How long a test waits for something that should happen at once.
pub const SOON: std::time::Duration = std::time::Duration::from_secs(5);
