//! Helpers for the end-to-end tests: a real Herald (in-process or as a child process) and real clients.

mod client;
mod process;
mod redis;
mod server;

pub use client::{Event, Publisher, Subscriber};
pub use process::HeraldProcess;
pub use redis::RedisServer;
pub use server::{API_KEY, Herald, JWT_SECRET, test_settings, token};

/// How long a test waits for something that should happen at once.
pub const SOON: std::time::Duration = std::time::Duration::from_secs(5);
