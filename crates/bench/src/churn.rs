//! Churn: sessions open at a fixed rate, each held for a while and then closed cleanly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message;

use crate::latency::Latency;
use crate::subscribers::{await_greeting, node_slot, open, round_robin, source_addr};
use crate::template::{Fill, Template};

#[derive(Debug, Clone)]
pub struct ChurnPlan {
    /// Session i opens through `urls[i % n]`.
    pub urls: Vec<String>,
    pub user_prefix: String,
    pub users: usize,
    /// New sessions per second; as many close per second once the pool is full.
    pub rate: f64,
    pub duration: Duration,
    /// Sessions open at once in steady state (each is held `pool / rate` seconds).
    pub pool: usize,
    pub greeting: bool,
    pub source_base: u8,
    pub per_source: usize,
}

#[derive(Clone, Default, Serialize, Deserialize)]
pub struct ChurnResult {
    pub attempted: u64,
    pub connected: u64,
    pub failed: u64,
    /// Sessions the hub closed before the bench did.
    pub dropped: u64,
    /// Sessions whose close handshake the hub answered.
    pub closed_clean: u64,
    pub first_error: Option<String>,
    pub secs: f64,
    /// Time to open one session (TCP, upgrade, greeting), in microseconds.
    pub connect_latency: Latency,
}

#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    closed_clean: AtomicU64,
    first_error: Mutex<Option<String>>,
    connect_latency: Mutex<Latency>,
}

pub async fn churn(plan: ChurnPlan) -> ChurnResult {
    let counters = Arc::new(Counters::default());
    let urls: Vec<Template> = plan.urls.iter().map(|u| Template::parse(u)).collect();
    let hold = Duration::from_secs_f64(plan.pool as f64 / plan.rate.max(1e-3));
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut attempted = 0u64;
    loop {
        let due = start + Duration::from_secs_f64(attempted as f64 / plan.rate.max(1e-3));
        if due >= start + plan.duration {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let i = attempted as usize;
        let user = format!("{}{}", plan.user_prefix, i % plan.users.max(1));
        let url = round_robin(&urls, node_slot(i, plan.users))
            .map(|url| {
                url.render(&Fill {
                    user: &user,
                    users: "",
                    ts: 0,
                    id: 0,
                })
            })
            .ok_or_else(|| "no subscriber URL".to_string());
        let source = source_addr(plan.source_base, plan.per_source, i % (plan.per_source * 4));
        tasks.push(tokio::spawn(one_session(
            url,
            source,
            plan.greeting,
            hold,
            counters.clone(),
        )));
        attempted += 1;
        // Finished sessions leave the list so a long run keeps its memory flat.
        if tasks.len() > 4 * plan.pool.max(64) {
            tasks.retain(|t| !t.is_finished());
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    ChurnResult {
        attempted,
        connected: counters.connected.load(Ordering::Acquire),
        failed: counters.failed.load(Ordering::Acquire),
        dropped: counters.dropped.load(Ordering::Acquire),
        closed_clean: counters.closed_clean.load(Ordering::Acquire),
        first_error: counters.first_error.lock().ok().and_then(|e| e.clone()),
        secs: start.elapsed().as_secs_f64(),
        connect_latency: counters
            .connect_latency
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default(),
    }
}

async fn one_session(
    url: Result<String, String>,
    source: Result<std::net::IpAddr, String>,
    greeting: bool,
    hold: Duration,
    counters: Arc<Counters>,
) {
    let began = Instant::now();
    let opened = async {
        let mut ws = open(&url?, source?, None).await?;
        if greeting {
            await_greeting(&mut ws, Duration::from_secs(30)).await?;
        }
        Ok::<_, String>(ws)
    }
    .await;
    let mut ws = match opened {
        Ok(ws) => ws,
        Err(e) => {
            counters.failed.fetch_add(1, Ordering::AcqRel);
            if let Ok(mut first) = counters.first_error.lock() {
                first.get_or_insert(e);
            }
            return;
        }
    };
    counters.connected.fetch_add(1, Ordering::AcqRel);
    if let Ok(mut latency) = counters.connect_latency.lock() {
        latency.record(began.elapsed().as_micros() as u64);
    }
    // Hold the session, answering pings, until its time is up.
    let held = tokio::time::timeout(hold, async {
        while let Some(msg) = ws.next().await {
            if matches!(msg, Ok(Message::Close(_)) | Err(_)) {
                return;
            }
        }
    })
    .await;
    if held.is_ok() {
        counters.dropped.fetch_add(1, Ordering::AcqRel);
        return;
    }
    if ws.send(Message::Close(None)).await.is_err() {
        return;
    }
    // Generous: a busy machine may be slow to answer, and this is a count, not a timing.
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Close(_)) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    })
    .await;
    if answered == Ok(true) {
        counters.closed_clean.fetch_add(1, Ordering::AcqRel);
    }
}
