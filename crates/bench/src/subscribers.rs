//! A group of WebSocket subscribers: connects them from spread source addresses, reads and
//! checks every delivery (latency, missing, duplicate), and stalls the ones asked to stall.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::latency::{Latency, Timeline, unix_micros};
use crate::template::{Fill, ID_KEY, TS_KEY, Template, probe_number};

/// Which sessions a group holds and how it reaches the hub.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupSpec {
    /// WebSocket URL templates; `{user}` is the session's user. Session i uses `urls[i % n]`.
    pub urls: Vec<String>,
    pub user_prefix: String,
    pub users: usize,
    /// Global session indexes `[first, end)`; session i belongs to user `i % users`.
    pub first: usize,
    pub end: usize,
    /// Sessions `[0, stalled)` stop reading once connected.
    pub stalled: usize,
    /// Wait for the hub's first frame (Herald's `hello`) before counting a session connected.
    pub greeting: bool,
    /// Session i connects from 127.0.0.(source_base + i / per_source).
    pub source_base: u8,
    pub per_source: usize,
    pub connect_concurrency: usize,
    /// How long a stalled session, reading again after the run, waits for the hub's close.
    pub evict_wait_ms: u64,
    /// Width of the latency timeline's slices; 0 keeps none.
    pub timeline_ms: u64,
}

/// Per-user expected deliveries (unicast, multicast) plus broadcasts every session expects.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Expected {
    pub per_user: Vec<u64>,
    pub all: u64,
}

impl Expected {
    pub fn for_user(&self, user: usize) -> u64 {
        self.per_user.get(user).copied().unwrap_or(0) + self.all
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectStats {
    pub attempted: usize,
    pub connected: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub secs: f64,
}

impl ConnectStats {
    pub fn add(&mut self, other: &ConnectStats) {
        self.attempted += other.attempted;
        self.connected += other.connected;
        self.failed += other.failed;
        self.secs = self.secs.max(other.secs);
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }
}

/// What a group saw, summed over its sessions.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct GroupResult {
    /// Frames that carried a message id.
    pub delivered: u64,
    pub missing: u64,
    pub duplicates: u64,
    /// Distinct messages beyond what the publishers saw acknowledged.
    pub unexpected: u64,
    /// Reading sessions the hub closed or lost during the run.
    pub dropped: u64,
    pub stalled: u64,
    pub stalled_evicted: u64,
    /// Unix micros of the last delivery, for delivered/s.
    pub last_delivery_us: u64,
    pub latency: Latency,
    pub timeline: Timeline,
}

impl GroupResult {
    pub fn add(&mut self, other: &GroupResult) {
        self.delivered += other.delivered;
        self.missing += other.missing;
        self.duplicates += other.duplicates;
        self.unexpected += other.unexpected;
        self.dropped += other.dropped;
        self.stalled += other.stalled;
        self.stalled_evicted += other.stalled_evicted;
        self.last_delivery_us = self.last_delivery_us.max(other.last_delivery_us);
        self.latency.merge(&other.latency);
        self.timeline.merge(&other.timeline);
    }
}

/// State the session tasks share; only counters and one histogram lock per delivery.
#[derive(Default)]
struct Shared {
    distinct: AtomicU64,
    last_delivery_us: AtomicU64,
    latency: Mutex<(Latency, Timeline)>,
    connected_reading: Mutex<Vec<u32>>,
    connect: Mutex<ConnectStats>,
    ready: AtomicUsize,
}

struct Outcome {
    user: usize,
    connected: bool,
    stalled: bool,
    distinct: u64,
    duplicates: u64,
    dropped: bool,
    evicted: bool,
}

/// A connected group, reading until `finish`.
pub struct Group {
    spec: GroupSpec,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Outcome>>,
}

type Ws = WebSocketStream<TcpStream>;

/// Small client buffers: the bench holds tens of thousands of mostly idle sockets.
pub fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Item `i mod n` of a list (sessions or publishers spread over nodes); None when it is empty.
pub fn round_robin<T>(items: &[T], i: usize) -> Option<&T> {
    items.get(i % items.len().max(1))
}

/// Where session `i` (user `i % users`, that user's `i / users`-th session) goes in a
/// round-robin over nodes: a user's sessions land on consecutive nodes, whatever `users` is.
pub fn node_slot(i: usize, users: usize) -> usize {
    let users = users.max(1);
    i % users + i / users
}

/// The loopback source address of session `i`.
pub fn source_addr(base: u8, per_source: usize, i: usize) -> Result<IpAddr, String> {
    let octet = usize::from(base) + i / per_source.max(1);
    let last =
        u8::try_from(octet).map_err(|_| format!("session {i} needs source 127.0.0.{octet}"))?;
    Ok(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
}

/// Opens one WebSocket from `source`, with an optional small receive buffer (stalled peers).
pub async fn open(url: &str, source: IpAddr, recv_buffer: Option<u32>) -> Result<Ws, String> {
    let (host, port) = host_port(url)?;
    let server: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| e.to_string())?
        .find(|a| a.is_ipv4())
        .ok_or_else(|| format!("{host} has no IPv4 address"))?;
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    if let Some(bytes) = recv_buffer {
        socket
            .set_recv_buffer_size(bytes)
            .map_err(|e| e.to_string())?;
    }
    defer_port_choice(&socket).map_err(|e| format!("IP_BIND_ADDRESS_NO_PORT: {e}"))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let stream = socket
        .connect(server)
        .await
        .map_err(|e| format!("connect {server} from {source}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(client_config()))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    Ok(ws)
}

/// Binding to (source, 0) would reserve a port from the one shared ephemeral range for
/// good; with IP_BIND_ADDRESS_NO_PORT the kernel picks it at connect time by the full
/// 4-tuple, so every source address gets its own ~28k ports and other connects
/// (the publishers, other hubs' runs) are not starved.
fn defer_port_choice(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd and a pointer to a c_int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn host_port(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("{url}: only ws:// URLs are supported"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let (host, port) = authority
        .rsplit_once(':')
        .map(|(h, p)| (h, p.parse::<u16>()))
        .unwrap_or((authority, Ok(80)));
    let port = port.map_err(|e| format!("{url}: bad port: {e}"))?;
    Ok((host.to_string(), port))
}

/// Waits for the first frame; any non-data frame before it is fine.
pub async fn await_greeting(ws: &mut Ws, limit: Duration) -> Result<(), String> {
    let wait = async {
        while let Some(msg) = ws.next().await {
            match msg.map_err(|e| e.to_string())? {
                Message::Text(_) | Message::Binary(_) => return Ok(()),
                Message::Close(frame) => return Err(format!("closed before greeting: {frame:?}")),
                _ => {}
            }
        }
        Err("ended before greeting".to_string())
    };
    tokio::time::timeout(limit, wait)
        .await
        .map_err(|_| "no greeting in time".to_string())?
}

impl Group {
    /// Connects every session of the spec (bounded concurrency) and starts them reading.
    pub async fn connect(spec: GroupSpec) -> (Group, ConnectStats) {
        let shared = Arc::new(Shared {
            latency: Mutex::new((Latency::default(), Timeline::new(spec.timeline_ms))),
            connected_reading: Mutex::new(vec![0; spec.users]),
            ..Default::default()
        });
        let (stop, _) = watch::channel(false);
        let gate = Arc::new(Semaphore::new(spec.connect_concurrency.max(1)));
        let urls: Vec<Template> = spec.urls.iter().map(|u| Template::parse(u)).collect();
        let started = Instant::now();
        let total = spec.end.saturating_sub(spec.first);
        let mut tasks = Vec::with_capacity(total);
        for i in spec.first..spec.end {
            let user = i % spec.users.max(1);
            let name = format!("{}{user}", spec.user_prefix);
            let url = round_robin(&urls, node_slot(i, spec.users)).map(|url| {
                url.render(&Fill {
                    user: &name,
                    users: "",
                    ts: 0,
                    id: 0,
                })
            });
            let session = SessionTask {
                user,
                stalled: i < spec.stalled,
                source: source_addr(spec.source_base, spec.per_source, i),
                url,
                greeting: spec.greeting,
                evict_wait: Duration::from_millis(spec.evict_wait_ms),
                shared: shared.clone(),
                gate: gate.clone(),
                stop: stop.subscribe(),
            };
            tasks.push(tokio::spawn(session.run()));
        }
        while shared.ready.load(Ordering::Acquire) < total {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut stats = shared.connect.lock().map(|s| s.clone()).unwrap_or_default();
        stats.attempted = total;
        stats.secs = started.elapsed().as_secs_f64();
        (
            Group {
                spec,
                shared,
                stop,
                tasks,
            },
            stats,
        )
    }

    /// Waits until every reading session has what the publishers got acknowledged, or `limit` passes.
    pub async fn drain(&self, expected: &Expected, limit: Duration) {
        let target: u64 = {
            let counts = self
                .shared
                .connected_reading
                .lock()
                .map(|c| c.clone())
                .unwrap_or_default();
            counts
                .iter()
                .enumerate()
                .map(|(user, n)| u64::from(*n) * expected.for_user(user))
                .sum()
        };
        let deadline = Instant::now() + limit;
        while self.shared.distinct.load(Ordering::Acquire) < target && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops reading, checks each session against `expected`, and lets the stalled
    /// sessions read again to see whether the hub evicted them.
    pub async fn finish(self, expected: &Expected) -> GroupResult {
        let _ = self.stop.send(true);
        let mut result = GroupResult::default();
        let evict_wait = Duration::from_millis(self.spec.evict_wait_ms);
        let join_deadline = tokio::time::Instant::now() + evict_wait + Duration::from_secs(5);
        for task in self.tasks {
            let Ok(Ok(outcome)) = tokio::time::timeout_at(join_deadline, task).await else {
                // A session that neither stopped nor finished in time is counted as lost.
                result.dropped += 1;
                continue;
            };
            if !outcome.connected {
                continue;
            }
            if outcome.stalled {
                result.stalled += 1;
                result.stalled_evicted += u64::from(outcome.evicted);
                continue;
            }
            let want = expected.for_user(outcome.user);
            result.missing += want.saturating_sub(outcome.distinct);
            result.unexpected += outcome.distinct.saturating_sub(want);
            result.duplicates += outcome.duplicates;
            result.dropped += u64::from(outcome.dropped);
        }
        result.delivered = self.shared.distinct.load(Ordering::Acquire);
        result.last_delivery_us = self.shared.last_delivery_us.load(Ordering::Acquire);
        if let Ok(latency) = self.shared.latency.lock() {
            (result.latency, result.timeline) = latency.clone();
        }
        result
    }
}

struct SessionTask {
    user: usize,
    stalled: bool,
    source: Result<IpAddr, String>,
    url: Option<String>,
    greeting: bool,
    evict_wait: Duration,
    shared: Arc<Shared>,
    gate: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
}

/// A stalled peer's receive buffer: small, so the hub's queue for it fills quickly.
const STALLED_RECV_BUFFER: u32 = 4096;

impl SessionTask {
    async fn run(mut self) -> Outcome {
        let mut outcome = Outcome {
            user: self.user,
            connected: false,
            stalled: self.stalled,
            distinct: 0,
            duplicates: 0,
            dropped: false,
            evicted: false,
        };
        let ws = self.connect().await;
        {
            let mut stats = self
                .shared
                .connect
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match &ws {
                Ok(_) => stats.connected += 1,
                Err(e) => {
                    stats.failed += 1;
                    if stats.first_error.is_none() {
                        stats.first_error = Some(e.clone());
                    }
                }
            }
        }
        if let (Ok(_), false, Ok(mut counts)) =
            (&ws, self.stalled, self.shared.connected_reading.lock())
            && let Some(n) = counts.get_mut(self.user)
        {
            *n += 1;
        }
        self.shared.ready.fetch_add(1, Ordering::AcqRel);
        let Ok(mut ws) = ws else { return outcome };
        outcome.connected = true;
        if self.stalled {
            let _ = self.stop.wait_for(|stop| *stop).await;
            outcome.evicted = drained_to_close(&mut ws, self.evict_wait).await;
            return outcome;
        }
        let mut seen = HashSet::new();
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                biased;
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(text))) => on_frame(&self.shared, text.as_bytes(), &mut seen, &mut outcome),
                    Some(Ok(Message::Binary(bytes))) => on_frame(&self.shared, &bytes, &mut seen, &mut outcome),
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        outcome.dropped = true;
                        break;
                    }
                    Some(Ok(_)) => {}
                },
                _ = stop.wait_for(|stop| *stop) => {
                    outcome.dropped = false;
                    break;
                }
            }
        }
        outcome.distinct = seen.len() as u64;
        outcome
    }

    async fn connect(&mut self) -> Result<Ws, String> {
        let _permit = self.gate.acquire().await.map_err(|e| e.to_string())?;
        let source = self.source.clone()?;
        let recv = self.stalled.then_some(STALLED_RECV_BUFFER);
        let url = self.url.as_deref().ok_or("no subscriber URL")?;
        let mut ws = open(url, source, recv).await?;
        if self.greeting {
            await_greeting(&mut ws, Duration::from_secs(30)).await?;
        }
        Ok(ws)
    }
}

/// Checks one delivery: new or duplicate, and how late.
fn on_frame(shared: &Shared, frame: &[u8], seen: &mut HashSet<u64>, outcome: &mut Outcome) {
    let Some(id) = probe_number(frame, ID_KEY) else {
        return;
    };
    let now = unix_micros();
    if !seen.insert(id) {
        outcome.duplicates += 1;
        return;
    }
    shared.distinct.fetch_add(1, Ordering::AcqRel);
    shared.last_delivery_us.fetch_max(now, Ordering::Relaxed);
    if let (Some(sent), Ok(mut latency)) = (probe_number(frame, TS_KEY), shared.latency.lock()) {
        let (whole, timeline) = &mut *latency;
        let micros = now.saturating_sub(sent);
        whole.record(micros);
        timeline.record(sent, micros);
    }
}

/// Reads what a stalled peer left unread, as raw bytes so no Pong goes back (the peer stays
/// dead to the hub's heartbeat); true when the hub closed the connection within `limit`.
async fn drained_to_close(ws: &mut Ws, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let socket = ws.get_mut();
    let mut buf = vec![0u8; 64 * 1024];
    let drain = async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, drain).await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_sessions_over_source_addresses() {
        assert_eq!(source_addr(2, 25_000, 0).unwrap().to_string(), "127.0.0.2");
        assert_eq!(
            source_addr(2, 25_000, 25_000).unwrap().to_string(),
            "127.0.0.3"
        );
        assert!(source_addr(250, 1, 10).is_err());
    }

    #[test]
    fn spreads_sessions_round_robin_over_nodes() {
        let nodes = ["a", "b", "c"];
        let picked: Vec<_> = (0..5).map(|i| *round_robin(&nodes, i).unwrap()).collect();
        assert_eq!(picked, ["a", "b", "c", "a", "b"]);
        assert!(round_robin::<&str>(&[], 3).is_none());
        // 2 users with 2 sessions each over 2 nodes: each user gets one session per node.
        let slots: Vec<_> = (0..4).map(|i| node_slot(i, 2) % 2).collect();
        assert_eq!(slots, [0, 1, 1, 0]);
    }

    #[test]
    fn finds_host_and_port() {
        assert_eq!(
            host_port("ws://127.0.0.1:81/ws/u1?x=1").unwrap(),
            ("127.0.0.1".into(), 81)
        );
        assert_eq!(
            host_port("ws://localhost/sub/a").unwrap(),
            ("localhost".into(), 80)
        );
        assert!(host_port("http://x").is_err());
    }
}
