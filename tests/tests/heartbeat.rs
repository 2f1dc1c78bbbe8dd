//! Half-open connections and peers that stopped reading: they are evicted within
//! `timeout + interval` (plus slack), the server's memory does not grow with what is
//! addressed to them, and a healthy user on the same server is served all along.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use herald_tests::{
    Herald, RawWebSocket, SOON, TCP_ESTABLISHED, client_frame, eventually, rss_bytes,
    server_socket_state, token,
};
use serde_json::json;
use tokio::task::JoinHandle;

const INTERVAL_MS: u64 = 250;
/// Four intervals: a busy CI machine may delay a healthy client's Pong by a few
/// hundred milliseconds, and that must not evict it.
const TIMEOUT_MS: u64 = 1000;
/// Scheduling slack on a busy 2-core machine on top of `timeout + interval`.
const SLACK: Duration = Duration::from_secs(3);

/// One test at a time: RSS is process-wide, so a flood in a concurrent test would
/// count against another's bound.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn eviction_limit() -> Duration {
    Duration::from_millis(TIMEOUT_MS + INTERVAL_MS) + SLACK
}

async fn start() -> Herald {
    Herald::start_with(|s| {
        s.heartbeat.interval_ms = INTERVAL_MS;
        s.heartbeat.timeout_ms = TIMEOUT_MS;
        // Durability is not under test here; this keeps thousands of publishes quick.
        s.store.fsync = false;
    })
    .await
}

/// A healthy user on the same server: publishes to it every 25 ms and checks each
/// notification arrives, in seq order, while the test misbehaves elsewhere.
struct Bystander {
    stop: Arc<AtomicBool>,
    task: JoinHandle<u64>,
}

impl Bystander {
    async fn start(herald: &Herald) -> Self {
        let mut sub = herald.subscribe("healthy").await;
        let publisher = herald.publisher();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut seq = 0;
            while !stopped.load(Ordering::Relaxed) {
                seq += 1;
                let published = publisher.publish_ok("healthy", json!({"n": seq})).await;
                assert_eq!(published, seq, "healthy's seq");
                // Generous: "promptly" is about not being starved, never about speed.
                let got = sub.notifications(1, SOON).await;
                assert_eq!(got[0]["seq"], seq, "healthy receives in order");
                assert_eq!(got[0]["data"]["n"], seq);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            sub.expect_silence(Duration::from_millis(100)).await;
            seq
        });
        Self { stop, task }
    }

    /// Stops and answers how many notifications the healthy user received.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task
            .await
            .expect("the healthy user was served throughout")
    }
}

async fn evictions(herald: &Herald) -> (f64, f64) {
    (
        herald
            .metric("herald_sessions_evicted_total{reason=\"heartbeat\"}")
            .await,
        herald
            .metric("herald_sessions_evicted_total{reason=\"slow_consumer\"}")
            .await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_connection_is_evicted_by_the_heartbeat() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let herald = start().await;
    let bystander = Bystander::start(&herald).await;
    let (heartbeat_before, slow_before) = evictions(&herald).await;

    // The handshake by hand, then silence: no reads, no writes, no close, like a
    // peer whose machine vanished.
    let url = format!("/ws/ghost?token={}", token("ghost"));
    let mut ghost = RawWebSocket::connect(herald.addr, &url)
        .await
        .expect("upgrade");
    let client = ghost.stream.local_addr().unwrap();
    eventually(SOON, "ghost joined", || async {
        herald.presence("ghost").await == 1
    })
    .await;
    assert_eq!(herald.metric("herald_sessions").await, 2.0);

    let took = eventually(eviction_limit(), "ghost evicted", || async {
        herald.presence("ghost").await == 0
    })
    .await;
    assert!(
        took >= Duration::from_millis(TIMEOUT_MS / 2),
        "evicted after {took:?}, long before the {TIMEOUT_MS} ms timeout"
    );
    assert_eq!(herald.metric("herald_sessions").await, 1.0);
    assert_eq!(herald.metric("herald_users_online").await, 1.0);
    let (heartbeat_after, slow_after) = evictions(&herald).await;
    assert_eq!(heartbeat_after - heartbeat_before, 1.0, "reason heartbeat");
    assert_eq!(slow_after, slow_before);

    // The server let go of the socket too.
    assert!(
        ghost.closed_within(SOON).await,
        "the server closed the ghost's socket"
    );
    eventually(SOON, "server socket released", || async {
        server_socket_state(herald.addr, client) != Some(TCP_ESTABLISHED)
    })
    .await;

    assert_eq!(herald.presence("healthy").await, 1);
    assert!(bystander.finish().await > 0);
    herald.shutdown().await.unwrap();
}

/// Publishes `count` notifications of `size` bytes of data to `user`, 8 at a time,
/// while sampling this process's RSS; answers the peak RSS seen.
async fn flood(herald: &Herald, user: &str, count: usize, size: usize) -> u64 {
    let peak = Arc::new(AtomicU64::new(rss_bytes()));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (Arc::clone(&peak), Arc::clone(&sampling));
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let blob = "x".repeat(size);
    let publisher = herald.publisher();
    futures_util::stream::iter(0..count)
        .map(|i| {
            let (publisher, blob, user) = (publisher.clone(), blob.clone(), user.to_owned());
            async move {
                let (status, body) = publisher
                    .publish(&user, json!({"i": i, "blob": blob}))
                    .await;
                assert_eq!(status, 202, "{body}");
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    peak.fetch_max(rss_bytes(), Ordering::Relaxed);
    peak.load(Ordering::Relaxed)
}

/// What one flood sends: 3,000 notifications of 32 KiB, about 94 MiB addressed to a
/// peer that reads none of it.
const FLOOD_COUNT: usize = 3000;
const FLOOD_BYTES: usize = 32 * 1024;

/// How much this process's RSS may grow during a flood. What the server may
/// legitimately hold for a stalled session is bounded: its queue
/// (`limits.session_queue` = 256 frames ≈ 8 MiB of these), actix-ws's channel (32
/// frames ≈ 1 MiB) and one write buffer; the rest sits in kernel socket buffers,
/// which RSS does not count. On top come SQLite's page caches, HTTP buffers of 8
/// concurrent publishes and allocator slack. 48 MiB covers all of that with room to
/// spare, yet is about half of what one flood addresses to the stalled peer, so a
/// server that buffered per session without bound would exceed it.
const RSS_GROWTH_BOUND: u64 = 48 * 1024 * 1024;

/// Warms up the store and allocator with the same kind of traffic, so the baseline
/// already includes caches that any publish fills. Answers that baseline and the pace
/// of the flood, in notifications per second.
async fn warm_up(herald: &Herald) -> (u64, f64) {
    const WARM_UP: usize = 300;
    let started = tokio::time::Instant::now();
    flood(herald, "warm-up", WARM_UP, FLOOD_BYTES).await;
    let pace = WARM_UP as f64 / started.elapsed().as_secs_f64();
    (rss_bytes(), pace)
}

/// How long a flood at `pace` takes to fill what stands between Herald and a peer that
/// stopped reading. Acknowledged frames are signs of life (README, Liveness), so such a
/// peer looks alive until its receive buffer and Herald's send buffer are full (at most
/// the `tcp_rmem` and `tcp_wmem` maxima); then its queue fills (`limits.session_queue`
/// frames: closed as a slow consumer) or the heartbeat sees no progress. On a slow
/// machine that alone took seconds.
fn fill_time(pace: f64) -> Duration {
    let max_of = |path: &str| -> u64 {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|v| v.split_whitespace().last()?.parse().ok())
            .unwrap_or(8 << 20)
    };
    let kernel = max_of("/proc/sys/net/ipv4/tcp_rmem") + max_of("/proc/sys/net/ipv4/tcp_wmem");
    let frames = kernel / FLOOD_BYTES as u64 + 256;
    Duration::from_secs_f64(frames as f64 / pace)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stopped_reading_is_evicted_and_costs_bounded_memory() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let herald = start().await;
    let (baseline, pace) = warm_up(&herald).await;
    let limit = eviction_limit() + fill_time(pace);
    let bystander = Bystander::start(&herald).await;
    let (heartbeat_before, slow_before) = evictions(&herald).await;

    // A real client that completed the handshake and read hello, then its
    // application stopped reading: the kernel keeps ACKing, nothing is consumed
    // and no Pong is ever sent back.
    let url = herald.ws_url("stalled", Some(&token("stalled")), None);
    let (mut stalled, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    let hello = stalled.next().await.expect("hello").expect("hello");
    let client = stalled.get_ref().get_ref().local_addr().unwrap();
    assert!(hello.to_text().unwrap().contains("\"hello\""));
    let stalled_at = tokio::time::Instant::now();
    assert_eq!(herald.presence("stalled").await, 1);

    let flooding = async {
        let peak = flood(&herald, "stalled", FLOOD_COUNT, FLOOD_BYTES).await;
        assert!(
            peak.saturating_sub(baseline) < RSS_GROWTH_BOUND,
            "RSS grew by {} MiB while flooding a stalled peer",
            peak.saturating_sub(baseline) >> 20
        );
    };
    let evicted = async {
        eventually(limit, "stalled reader evicted", || async {
            herald.presence("stalled").await == 0
        })
        .await;
        stalled_at.elapsed()
    };
    let ((), took) = tokio::join!(flooding, evicted);
    assert!(
        took <= limit + Duration::from_millis(100),
        "evicted after {took:?}"
    );

    assert_eq!(herald.metric("herald_sessions").await, 1.0);
    let (heartbeat_after, slow_after) = evictions(&herald).await;
    // Evicted for `heartbeat` or `slow_consumer`, unless the kernel's TCP user timeout
    // (`heartbeat.timeout_ms` of unacknowledged data) dropped the connection first.
    assert!(
        (heartbeat_after - heartbeat_before) + (slow_after - slow_before) <= 1.0,
        "at most one eviction"
    );
    eventually(SOON, "server socket released", || async {
        server_socket_state(herald.addr, client) != Some(TCP_ESTABLISHED)
    })
    .await;
    assert_eq!(herald.presence("healthy").await, 1);
    assert!(bystander.finish().await > 0);
    drop(stalled);
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_pings_but_never_reads_is_dropped_and_costs_bounded_memory() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let herald = start().await;
    let (baseline, _) = warm_up(&herald).await;
    let bystander = Bystander::start(&herald).await;
    let (heartbeat_before, slow_before) = evictions(&herald).await;

    // Alive by the heartbeat's measure (an app-level ping every 100 ms), but it never
    // reads: only its overflowing queue can tell the server it is useless.
    let url = format!("/ws/pinger?token={}", token("pinger"));
    let pinger = RawWebSocket::connect(herald.addr, &url)
        .await
        .expect("upgrade");
    let client = pinger.stream.local_addr().unwrap();
    let (unread, mut write) = pinger.stream.into_split();
    let pinging = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let ping = client_frame(0x1, br#"{"type":"ping"}"#);
        while write.write_all(&ping).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    eventually(SOON, "pinger joined", || async {
        herald.presence("pinger").await == 1
    })
    .await;

    let peak = flood(&herald, "pinger", FLOOD_COUNT, FLOOD_BYTES).await;
    eventually(SOON, "pinger evicted", || async {
        herald.presence("pinger").await == 0
    })
    .await;
    assert!(
        peak.saturating_sub(baseline) < RSS_GROWTH_BOUND,
        "RSS grew by {} MiB while flooding a peer that does not read",
        peak.saturating_sub(baseline) >> 20
    );
    let (heartbeat_after, slow_after) = evictions(&herald).await;
    // Two things race to end it, both right: its queue overflows (slow_consumer), or
    // the kernel drops the connection first (TCP_USER_TIMEOUT = heartbeat timeout,
    // see the gateway's socket.rs) and the session just ends with it, uncounted.
    assert!(
        [0.0, 1.0].contains(&(slow_after - slow_before)),
        "at most one slow_consumer eviction"
    );
    assert_eq!(
        heartbeat_after, heartbeat_before,
        "its pings kept it alive for the heartbeat"
    );
    assert_eq!(herald.metric("herald_sessions").await, 1.0);
    // While the peer keeps sending, TCP_USER_TIMEOUT does not reliably fire (seen:
    // ESTABLISHED for over 10 s, zero-window probes answered), so this relies on the
    // session cutting its connection after the close grace.
    eventually(SOON, "server socket released", || async {
        server_socket_state(herald.addr, client) != Some(TCP_ESTABLISHED)
    })
    .await;

    assert!(bystander.finish().await > 0);
    pinging.abort();
    drop(unread);
    herald.shutdown().await.unwrap();
}

/// Frames a peer that reads everything but never answers counted by opcode: (Pings, texts).
struct Reader {
    pings: Arc<AtomicU64>,
    texts: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Reader {
    /// Reads `read` to its end, answering nothing: no Pong, no close reply.
    fn start(mut read: tokio::net::tcp::OwnedReadHalf) -> Self {
        use tokio::io::AsyncReadExt;
        let pings = Arc::new(AtomicU64::new(0));
        let texts = Arc::new(AtomicU64::new(0));
        let (p, t) = (Arc::clone(&pings), Arc::clone(&texts));
        let task = tokio::spawn(async move {
            loop {
                let mut head = [0u8; 2];
                if read.read_exact(&mut head).await.is_err() {
                    return;
                }
                let len = match head[1] & 0x7f {
                    126 => read.read_u16().await.map(usize::from),
                    127 => read.read_u64().await.map(|n| n as usize),
                    n => Ok(usize::from(n)),
                };
                let Ok(len) = len else {
                    return;
                };
                let mut payload = vec![0u8; len];
                if read.read_exact(&mut payload).await.is_err() {
                    return;
                }
                match head[0] & 0x0f {
                    0x1 => t.fetch_add(1, Ordering::Relaxed),
                    0x9 => p.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
            }
        });
        Self { pings, texts, task }
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.pings.load(Ordering::Relaxed),
            self.texts.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_tcp_takes_its_notifications_needs_no_pong_until_they_stop() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let herald = start().await;
    let (heartbeat_before, _) = evictions(&herald).await;

    // It reads every frame and never answers a Ping: the frames it is sent, which its
    // TCP acknowledges, are the only sign of it.
    let url = format!("/ws/reader?token={}", token("reader"));
    let peer = RawWebSocket::connect(herald.addr, &url)
        .await
        .expect("upgrade");
    let (read, write) = peer.stream.into_split();
    let reader = Reader::start(read);
    eventually(SOON, "reader joined", || async {
        herald.presence("reader").await == 1
    })
    .await;

    // Three timeouts of traffic: without a Pong it would have been evicted twice over.
    let publisher = herald.publisher();
    let traffic = Duration::from_millis(3 * TIMEOUT_MS);
    let began = tokio::time::Instant::now();
    let mut sent = 0;
    while began.elapsed() < traffic {
        publisher.publish_ok("reader", json!({"n": sent})).await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        herald.presence("reader").await,
        1,
        "evicted while its TCP acknowledged every notification"
    );
    eventually(SOON, "every notification read", || async {
        reader.counts().1 == sent + 1
    })
    .await;
    let (pings_during_traffic, _) = reader.counts();

    // Traffic stops: the heartbeat pings again, no Pong comes, and it is evicted.
    let quiet = tokio::time::Instant::now();
    eventually(
        eviction_limit(),
        "reader evicted once the traffic stopped",
        || async { herald.presence("reader").await == 0 },
    )
    .await;
    let took = quiet.elapsed();
    assert!(
        took >= Duration::from_millis(TIMEOUT_MS / 2),
        "evicted {took:?} after the traffic stopped, long before the {TIMEOUT_MS} ms timeout"
    );
    let (pings, _) = reader.counts();
    assert!(
        pings > pings_during_traffic,
        "no Ping once the traffic stopped ({pings} in all)"
    );
    let (heartbeat_after, _) = evictions(&herald).await;
    assert_eq!(heartbeat_after - heartbeat_before, 1.0, "reason heartbeat");

    reader.task.abort();
    drop(write);
    herald.shutdown().await.unwrap();
}
