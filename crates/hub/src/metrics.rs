//! Prometheus metrics of one node; `encode` renders the text format for `/metrics`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::session::EvictReason;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EvictLabels {
    reason: ReasonLabel,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum ReasonLabel {
    heartbeat,
    slow_consumer,
    frame_too_big,
    protocol_error,
    shutdown,
}

impl From<EvictReason> for ReasonLabel {
    fn from(reason: EvictReason) -> Self {
        match reason {
            EvictReason::Heartbeat => Self::heartbeat,
            EvictReason::SlowConsumer => Self::slow_consumer,
            EvictReason::FrameTooBig => Self::frame_too_big,
            EvictReason::ProtocolError => Self::protocol_error,
            EvictReason::Shutdown => Self::shutdown,
        }
    }
}

/// The node's counters. Updating one is an atomic add; nothing here locks.
pub struct Metrics {
    registry: Registry,
    sessions: Gauge,
    users_online: Gauge,
    published: Counter,
    delivered: Counter,
    broadcasts: Counter,
    evicted: Family<EvictLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("herald");
        let (sessions, users_online) = (Gauge::default(), Gauge::default());
        let (published, delivered, broadcasts) =
            (Counter::default(), Counter::default(), Counter::default());
        let evicted = Family::<EvictLabels, Counter>::default();
        registry.register(
            "sessions",
            "Open WebSocket sessions on this node",
            sessions.clone(),
        );
        registry.register(
            "users_online",
            "Users with at least one session on this node",
            users_online.clone(),
        );
        registry.register(
            "notifications_published",
            "Notifications stored and fanned out",
            published.clone(),
        );
        registry.register(
            "notifications_delivered",
            "Frames handed to this node's sessions (notifications and broadcasts)",
            delivered.clone(),
        );
        registry.register("broadcasts", "Broadcasts fanned out", broadcasts.clone());
        registry.register(
            "sessions_evicted",
            "Sessions closed by the server, by reason",
            evicted.clone(),
        );
        for reason in [EvictReason::Heartbeat, EvictReason::SlowConsumer] {
            // Present from the start so dashboards and tests see 0, not nothing.
            let _ = evicted.get_or_create(&EvictLabels {
                reason: reason.into(),
            });
        }
        Self {
            registry,
            sessions,
            users_online,
            published,
            delivered,
            broadcasts,
            evicted,
        }
    }
}

impl Metrics {
    pub fn set_presence(&self, sessions: usize, users: usize) {
        self.sessions.set(sessions as i64);
        self.users_online.set(users as i64);
    }

    pub fn published(&self) {
        self.published.inc();
    }

    pub fn delivered(&self, n: usize) {
        self.delivered.inc_by(n as u64);
    }

    pub fn broadcast(&self) {
        self.broadcasts.inc();
    }

    pub fn evicted(&self, reason: EvictReason) {
        self.evicted
            .get_or_create(&EvictLabels {
                reason: reason.into(),
            })
            .inc();
    }

    pub fn evicted_count(&self, reason: EvictReason) -> u64 {
        self.evicted
            .get_or_create(&EvictLabels {
                reason: reason.into(),
            })
            .get()
    }

    /// The Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
