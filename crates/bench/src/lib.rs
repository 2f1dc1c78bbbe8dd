//! `herald-bench`: a load generator that measures Herald and its peers with one binary.
//!
//! # Layout
//! - `cli`: the arguments, scenarios and URL/body templates a run takes.
//! - `scenario`: one run from connect to report.
//! - `subscribers`: WebSocket sessions from spread source addresses; checks every delivery.
//! - `workers`: more sessions than one process may open, in worker processes of this binary.
//! - `publishers`: keep-alive HTTP/1.1 publishers at a maximum or fixed rate.
//! - `churn`: sessions opening and closing at a rate.
//! - `latency`: HDR histograms of end-to-end latency.
//! - `procfs`: the server's RSS and CPU time from /proc.
//! - `template`: `{user}`, `{users}`, `{ts}`, `{id}` placeholders.
//! - `report`: the JSON and human summaries.

mod churn;
mod cli;
mod latency;
mod procfs;
mod publishers;
mod report;
mod scenario;
mod subscribers;
mod template;
mod workers;

pub use cli::{Args, Scenario};
pub use latency::{Quantiles, Slice};
pub use report::Report;
pub use scenario::{BenchError, run};
pub use workers::{WORKER_FLAG, worker_main};
