//! Resume with `since` while publishes race: clients of one user drop and reconnect at random
//! moments, others stay or join late, and every one of them ends with exactly 1..N in order.

use std::net::SocketAddr;
use std::time::Duration;

use herald_tests::{Event, Herald, SOON, Subscriber, subscribe_at};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

const USER: &str = "racer";
const PUBLISHERS: u64 = 2;
const PER_PUBLISHER: u64 = 750;
const TOTAL: u64 = PUBLISHERS * PER_PUBLISHER;
const RESUMING_CLIENTS: u64 = 4;
/// Generous: the race takes seconds, but the machine is shared.
const RACE_LIMIT: Duration = Duration::from_secs(180);

/// What one client received, across all its connections.
#[derive(Debug, Default)]
struct Tally {
    seqs: Vec<u64>,
    connections: usize,
    /// Close codes of connections the server ended (a client closing itself is not counted).
    server_closes: Vec<Option<u16>>,
}

impl Tally {
    fn last(&self) -> u64 {
        self.seqs.last().copied().unwrap_or(0)
    }

    /// Takes one notification frame, which must carry exactly the next seq.
    fn take(&mut self, client: &str, frame: &serde_json::Value) {
        assert_eq!(frame["type"], "notification", "{client}: {frame}");
        let seq = frame["seq"].as_u64().expect("seq");
        let last = self.last();
        assert_eq!(
            seq,
            last + 1,
            "{client}: after seq {last} came {seq}: a gap or a duplicate"
        );
        self.seqs.push(seq);
    }

    fn complete(&self, total: &watch::Receiver<Option<u64>>) -> bool {
        *total.borrow() == Some(self.last())
    }
}

/// Connects, stays for a random number of frames or a random time, drops the connection,
/// and comes back with `since` = the last seq it saw; until it holds every notification.
async fn resuming_client(
    addr: SocketAddr,
    name: String,
    seed: u64,
    total: watch::Receiver<Option<u64>>,
) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    while !tally.complete(&total) {
        let since = tally.last();
        let mut sub = subscribe_at(addr, USER, Some(since)).await;
        tally.connections += 1;
        assert_eq!(sub.hello["recovered"], true, "{name}: {}", sub.hello);
        assert!(
            sub.hello["seq"].as_u64() >= Some(since),
            "{name} resumed after {since}: {}",
            sub.hello
        );
        let stay_frames = rng.random_range(0..200);
        let stay_until = Instant::now() + Duration::from_millis(rng.random_range(0..300));
        let mut taken = 0;
        while taken < stay_frames && !tally.complete(&total) {
            let left = stay_until.saturating_duration_since(Instant::now());
            match sub.next(left).await {
                Some(Event::Frame(frame)) => {
                    tally.take(&name, &frame);
                    taken += 1;
                }
                Some(Event::Closed(code)) => {
                    tally.server_closes.push(code);
                    break;
                }
                None => break,
            }
        }
        drop(sub);
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..50))).await;
    }
    tally
}

/// Stays connected (on `first`, or from `since = 0`) until it holds every notification;
/// reconnects with `since` only if the server closes it.
async fn staying_client(
    addr: SocketAddr,
    name: String,
    first: Option<Subscriber>,
    total: watch::Receiver<Option<u64>>,
) -> Tally {
    let mut tally = Tally::default();
    let mut first = first;
    while !tally.complete(&total) {
        let mut sub = match first.take() {
            Some(sub) => sub,
            None => subscribe_at(addr, USER, Some(tally.last())).await,
        };
        tally.connections += 1;
        while !tally.complete(&total) {
            match sub.next(Duration::from_millis(200)).await {
                Some(Event::Frame(frame)) => tally.take(&name, &frame),
                Some(Event::Closed(code)) => {
                    tally.server_closes.push(code);
                    break;
                }
                None => {}
            }
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_resuming_at_random_moments_hold_every_seq_once_in_order() {
    let herald = Herald::start_with(|s| s.store.retention_per_user = 10 * TOTAL).await;
    let (total_tx, total) = watch::channel(None);
    let seed: u64 = rand::random();

    let mut clients = Vec::new();
    // A tab that stays, live only from before the first publish.
    let staying = herald.subscribe(USER).await;
    assert_eq!(staying.hello["seq"], 0);
    clients.push(tokio::spawn(staying_client(
        herald.addr,
        "staying".into(),
        Some(staying),
        total.clone(),
    )));
    for i in 0..RESUMING_CLIENTS {
        clients.push(tokio::spawn(resuming_client(
            herald.addr,
            format!("resuming-{i} (seed {seed})"),
            seed.wrapping_add(i),
            total.clone(),
        )));
    }

    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let publisher = herald.publisher();
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..PER_PUBLISHER {
                    seqs.push(
                        publisher
                            .publish_ok(USER, json!({"publisher": p, "i": i}))
                            .await,
                    );
                }
                seqs
            })
        })
        .collect();

    // A device that comes online mid-stream and replays everything from the start.
    let addr = herald.addr;
    let late_total = total.clone();
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        staying_client(addr, "late joiner".into(), None, late_total).await
    });
    clients.push(late);

    let mut published = Vec::new();
    for p in publishers {
        published.extend(p.await.expect("publisher"));
    }
    published.sort_unstable();
    assert_eq!(
        published,
        (1..=TOTAL).collect::<Vec<_>>(),
        "every 202 carried a distinct seq, 1..N"
    );
    total_tx.send(Some(TOTAL)).unwrap();

    let everyone = futures_util::future::join_all(clients);
    let tallies = tokio::time::timeout(RACE_LIMIT, everyone)
        .await
        .unwrap_or_else(|_| panic!("clients did not catch up within {RACE_LIMIT:?} (seed {seed})"));
    for (i, tally) in tallies.into_iter().enumerate() {
        let tally = tally.expect("client task");
        assert_eq!(
            tally.seqs,
            (1..=TOTAL).collect::<Vec<_>>(),
            "client #{i} (seed {seed})"
        );
        assert!(
            tally.server_closes.iter().all(|&code| code == Some(4001)),
            "client #{i}: the server closed it other than as a slow consumer: {:?}",
            tally.server_closes
        );
        if (1..=RESUMING_CLIENTS as usize).contains(&i) {
            assert!(
                tally.connections > 2,
                "client #{i} resumed only {} times; the test did not race",
                tally.connections
            );
        }
    }
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_replay_for_a_busy_user_is_not_evicted_as_a_slow_consumer() {
    const BUSY: &str = "busy";
    const BACKLOG: u64 = 3000;
    // A small queue: before the replay drained it, live notifications arriving during a
    // replay filled it and the session was closed 4001, often before its `hello`.
    let herald = Herald::start_with(|s| {
        s.store.retention_per_user = 10 * BACKLOG;
        s.limits.session_queue = 32;
    })
    .await;
    let backlog: Vec<_> = (0..8)
        .map(|_| {
            let publisher = herald.publisher();
            tokio::spawn(async move {
                // Big enough that sending the replay takes a while.
                let padding = "x".repeat(4096);
                for _ in 0..BACKLOG / 8 {
                    publisher
                        .publish_ok(BUSY, json!({"padding": padding}))
                        .await;
                }
            })
        })
        .collect();
    for task in backlog {
        task.await.unwrap();
    }

    let (stop_tx, stop) = watch::channel(false);
    let stream: Vec<_> = (0..6)
        .map(|_| {
            let (publisher, stop) = (herald.publisher(), stop.clone());
            tokio::spawn(async move {
                while !*stop.borrow() {
                    publisher.publish_ok(BUSY, json!({"live": true})).await;
                }
            })
        })
        .collect();
    // Let the live stream get going before resuming.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Several devices resume from the start, one after another, while the stream goes on.
    for device in 0..4 {
        let mut sub = herald.subscribe_since(BUSY, 0).await;
        let head = sub.hello["seq"].as_u64().expect("seq");
        assert!(head >= BACKLOG, "{}", sub.hello);
        let mut last = 0;
        while last < head {
            match sub.next(Duration::from_secs(30)).await {
                Some(Event::Frame(frame)) => {
                    assert_eq!(
                        frame["seq"].as_u64(),
                        Some(last + 1),
                        "after {last}: {frame}"
                    );
                    last += 1;
                }
                other => panic!("device {device}: after {last} of {head} replayed: {other:?}"),
            }
        }
    }
    stop_tx.send(true).unwrap();
    for task in stream {
        task.await.unwrap();
    }
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_from_another_history_replays_everything_kept_and_says_so() {
    // A client that saw seq 10 of a store since replaced (new data dir) by one holding 3.
    let herald = Herald::start().await;
    for i in 1..=3 {
        herald
            .publisher()
            .publish_ok("moved", json!({"i": i}))
            .await;
    }
    let mut sub = herald.subscribe_since("moved", 10).await;
    assert_eq!(sub.hello["seq"], 3);
    assert_eq!(sub.hello["first_seq"], 1);
    assert_eq!(sub.hello["recovered"], false);
    let replay = sub.notifications(3, SOON).await;
    assert_eq!(herald_tests::seqs(&replay), vec![1, 2, 3]);
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_since_is_refused_before_the_upgrade() {
    let herald = Herald::start().await;
    let url = herald.ws_url("alice", Some(&herald_tests::token("alice")), None);
    for since in ["abc", "-1", "1.5", ""] {
        let refused = Subscriber::connect(&format!("{url}&since={since}")).await;
        assert_eq!(refused.err(), Some(400), "since={since:?}");
    }
    herald.shutdown().await.unwrap();
}
