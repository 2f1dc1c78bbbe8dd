//! What one run measured: the JSON shape scripts read, and the summary people read.

use std::collections::BTreeMap;
use std::fmt::{self, Display, Write};

use serde::{Deserialize, Serialize};

use crate::latency::{Quantiles, Slice};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub subscribe_url: String,
    pub sessions: usize,
    pub users: usize,
    pub processes: usize,
    pub duration_secs: f64,
    /// Publishes (or connects, for churn) per second asked for; None: as fast as possible.
    pub rate: Option<f64>,
    pub connect: ConnectSummary,
    pub publish: Option<PublishSummary>,
    pub delivery: Option<DeliverySummary>,
    /// End-to-end, from the send time inside the payload to its arrival.
    pub latency_us: Option<Quantiles>,
    /// The same by when each message was sent (`--timeline`); empty without it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<Slice>,
    pub stalled: Option<StalledSummary>,
    pub churn: Option<ChurnSummary>,
    pub server: Option<ServerSummary>,
    /// Correctness problems (never timing): empty when the run was clean.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectSummary {
    pub attempted: usize,
    pub connected: usize,
    pub failed: usize,
    pub per_sec: f64,
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PublishSummary {
    pub sent: u64,
    pub accepted: u64,
    pub per_sec: f64,
    pub statuses: BTreeMap<String, u64>,
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeliverySummary {
    pub delivered: u64,
    pub per_sec: f64,
    pub missing: u64,
    pub duplicates: u64,
    pub unexpected: u64,
    pub dropped: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StalledSummary {
    pub stalled: u64,
    pub evicted: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChurnSummary {
    pub attempted: u64,
    pub connected: u64,
    pub failed: u64,
    pub dropped: u64,
    pub closed_clean: u64,
    pub connects_per_sec: f64,
    pub connect_latency_us: Quantiles,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerSummary {
    pub rss_baseline_kib: u64,
    pub rss_connected_kib: u64,
    pub rss_peak_kib: u64,
    /// After the sessions closed and the hub settled.
    pub rss_end_kib: u64,
    pub rss_per_connection_bytes: Option<f64>,
    /// Over the measured phase: the hold (idle), publishing until delivered, or the churn.
    pub cpu_secs: f64,
    pub cpu_pct_of_core: f64,
    pub cpu_us_per_delivered: Option<f64>,
}

fn opt<T: Display>(value: &Option<T>) -> String {
    value.as_ref().map_or("-".into(), |v| v.to_string())
}

impl Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        let rate = self.rate.map_or("max".into(), |r| format!("{r:.0}/s"));
        let _ = writeln!(
            out,
            "{} · {} sessions over {} users · {} process(es) · {:.1} s · rate {rate}",
            self.scenario, self.sessions, self.users, self.processes, self.duration_secs
        );
        let c = &self.connect;
        let _ = writeln!(
            out,
            "  connect   {}/{} ok, {} failed, {:.0}/s{}",
            c.connected,
            c.attempted,
            c.failed,
            c.per_sec,
            c.first_error
                .as_ref()
                .map(|e| format!(" (first error: {e})"))
                .unwrap_or_default()
        );
        if let Some(p) = &self.publish {
            let _ = writeln!(
                out,
                "  publish   {} sent, {} accepted, {:.0}/s, statuses {:?}{}",
                p.sent,
                p.accepted,
                p.per_sec,
                p.statuses,
                p.first_error
                    .as_ref()
                    .map(|e| format!(" (first error: {e})"))
                    .unwrap_or_default()
            );
        }
        if let Some(d) = &self.delivery {
            let _ = writeln!(
                out,
                "  deliver   {} delivered, {:.0}/s · missing {} · duplicates {} · unexpected {} · dropped {}",
                d.delivered, d.per_sec, d.missing, d.duplicates, d.unexpected, d.dropped
            );
        }
        if let Some(l) = &self.latency_us {
            let _ = writeln!(
                out,
                "  latency   p50 {:.2} ms · p90 {:.2} · p99 {:.2} · p99.9 {:.2} · max {:.2} ({} samples)",
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.p999),
                ms(l.max),
                l.count
            );
        }
        for slice in &self.timeline {
            let l = &slice.latency_us;
            let _ = writeln!(
                out,
                "  sent at {:>7.1} s: p50 {:.2} ms · p99 {:.2} · max {:.2} ({} samples)",
                slice.at_ms as f64 / 1000.0,
                ms(l.p50),
                ms(l.p99),
                ms(l.max),
                l.count
            );
        }
        if let Some(s) = &self.stalled {
            let _ = writeln!(
                out,
                "  stalled   {} stalled, {} evicted",
                s.stalled, s.evicted
            );
        }
        if let Some(ch) = &self.churn {
            let l = &ch.connect_latency_us;
            let _ = writeln!(
                out,
                "  churn     {}/{} connected ({:.0}/s), {} failed, {} dropped, {} closed cleanly; connect p50 {:.2} ms p99 {:.2} ms",
                ch.connected,
                ch.attempted,
                ch.connects_per_sec,
                ch.failed,
                ch.dropped,
                ch.closed_clean,
                ms(l.p50),
                ms(l.p99)
            );
        }
        if let Some(s) = &self.server {
            let _ = writeln!(
                out,
                "  server    RSS {} KiB -> {} KiB connected (peak {}, end {}) · {} B/conn · CPU {:.2} s = {:.1}% of a core · {} µs CPU/delivered",
                s.rss_baseline_kib,
                s.rss_connected_kib,
                s.rss_peak_kib,
                s.rss_end_kib,
                opt(&s.rss_per_connection_bytes.map(|b| format!("{b:.0}"))),
                s.cpu_secs,
                s.cpu_pct_of_core,
                opt(&s.cpu_us_per_delivered.map(|u| format!("{u:.2}")))
            );
        }
        if self.problems.is_empty() {
            let _ = writeln!(out, "  check     ok");
        } else {
            for p in &self.problems {
                let _ = writeln!(out, "  PROBLEM   {p}");
            }
        }
        f.write_str(&out)
    }
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}
