//! Herald's HTTP and WebSocket ingress, and the `herald` command line.
//!
//! # Layout
//!
//! - `cli`: the `herald` command (serve, token).
//! - [`settings`]: defaults, TOML file, `HERALD_<SECTION>__<KEY>` overrides, validation.
//! - [`secrets`]: configured secrets, or ones generated once on first start.
//! - `auth`: publisher API keys and subscriber tokens.
//! - `routes`: the endpoints of `API.md`, one module per concern.
//! - `body`: JSON request bodies and their 400/413/415/422 errors.
//! - `error`: every HTTP error and its one JSON mapping.
//! - `memory`: the allocator (mimalloc), and returning memory freed by closed sessions to the OS.
//! - [`server`]: `run(listener, settings, shutdown)`, the whole server, callable from tests.
//! - [`listener`]: the listening sockets, one per worker on one address (`SO_REUSEPORT`).
//! - `workers`: the HTTP worker threads, each accepting and serving its own connections.
//! - `upgrade`: WebSocket upgrades, taken from the HTTP dispatcher and handed to the hub.
//! - `socket`: kernel settings for every accepted TCP connection, set on the listeners.
//! - `telemetry`: tracing setup.

mod auth;
mod body;
pub mod cli;
mod error;
pub mod listener;
mod memory;
mod routes;
pub mod secrets;
pub mod server;
pub mod settings;
mod socket;
mod telemetry;
mod upgrade;
mod workers;

pub use auth::mint as mint_token;
pub use listener::Listener;
pub use server::{RunError, run};
pub use settings::Settings;
