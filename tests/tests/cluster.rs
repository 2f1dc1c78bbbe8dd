//! Several Herald nodes sharing one real Redis: fan-out across nodes, resume on another node, Redis and node failures.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use herald_tests::{Herald, HeraldProcess, Publisher, RedisServer, SOON, Subscriber, token};
use serde_json::{Value, json};

/// Presence converges within the presence TTL (3 s in tests) plus a busy machine's slack.
const CONVERGE: Duration = Duration::from_secs(20);

async fn nodes(redis: &RedisServer, n: usize) -> Vec<Herald> {
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(Herald::start_with(|s| redis.engine(s)).await);
    }
    nodes
}

async fn subscribe(addr: SocketAddr, user: &str, since: Option<u64>) -> Subscriber {
    let mut url = format!("ws://{addr}/ws/{user}?token={}", token(user));
    if let Some(since) = since {
        url.push_str(&format!("&since={since}"));
    }
    Subscriber::connect(&url).await.expect("subscribe")
}

fn publisher(addr: SocketAddr) -> Publisher {
    Publisher::new(format!("http://{addr}"), Some(herald_tests::API_KEY.into()))
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| f["seq"].as_u64().expect("seq"))
        .collect()
}

async fn presence(publisher: Publisher, user: &str) -> u64 {
    let (status, body) = publisher.get(&format!("/v1/users/{user}/presence")).await;
    assert_eq!(status, 200, "{body}");
    body["sessions"].as_u64().expect("sessions")
}

/// Polls `probe` until it answers `want`; panics with the last answer after `limit`.
async fn eventually<F, Fut>(limit: Duration, want: u64, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = u64>,
{
    let deadline = Instant::now() + limit;
    loop {
        let got = probe().await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still {got}, wanted {want}, after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_session_on_every_node_gets_every_notification_once_in_order() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, 3).await;
    let mut alice = Vec::new();
    for node in &nodes {
        for _ in 0..2 {
            alice.push(subscribe(node.addr, "alice", None).await);
        }
    }
    let mut bob = subscribe(nodes[1].addr, "bob", None).await;
    for node in &nodes {
        eventually(CONVERGE, 6, || presence(node.publisher(), "alice")).await;
    }

    // Three publishers race, one per node; Redis hands out one seq order for all.
    let tasks: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let publisher = node.publisher();
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for n in 0..10 {
                    let (status, body) =
                        publisher.publish("alice", json!({"node": i, "n": n})).await;
                    assert_eq!(status, 202, "{body}");
                    assert_eq!(body["delivered"], 6, "delivered counts every node: {body}");
                    seqs.push(body["seq"].as_u64().unwrap());
                }
                seqs
            })
        })
        .collect();
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.unwrap());
    }
    acked.sort_unstable();
    assert_eq!(acked, (1..=30).collect::<Vec<_>>());

    for session in &mut alice {
        let got = session.notifications(30, SOON * 2).await;
        assert_eq!(seqs(&got), (1..=30).collect::<Vec<_>>());
    }
    for session in &mut alice {
        session.expect_silence(Duration::from_millis(300)).await;
    }
    bob.expect_silence(Duration::from_millis(300)).await;

    // A broadcast reaches all seven sessions once, and counts them all.
    let (status, body) = nodes[2]
        .publisher()
        .post(
            "/v1/broadcast",
            &json!({"event": "maintenance", "data": {}}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["delivered"], 7, "{body}");
    for session in alice.iter_mut().chain(std::iter::once(&mut bob)) {
        assert_eq!(session.frame(SOON).await["type"], "broadcast");
        session.expect_silence(Duration::from_millis(200)).await;
    }

    // The last session of a user leaving one node shows in presence everywhere.
    drop(bob);
    for node in &nodes {
        eventually(CONVERGE, 0, || presence(node.publisher(), "bob")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_on_another_node_has_no_gap_and_no_duplicate() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, 3).await;
    let first = nodes[0].publisher();
    let mut session = subscribe(nodes[0].addr, "carol", None).await;
    for n in 1..=5 {
        first.publish_ok("carol", json!({"n": n})).await;
    }
    let got = session.notifications(5, SOON).await;
    assert_eq!(seqs(&got), vec![1, 2, 3, 4, 5]);
    drop(session);

    // While carol is away, and while she comes back, publishes keep landing on other nodes.
    for n in 6..=10 {
        nodes[1]
            .publisher()
            .publish_ok("carol", json!({"n": n}))
            .await;
    }
    let racing = {
        let publisher = nodes[1].publisher();
        tokio::spawn(async move {
            for n in 11..=40 {
                publisher.publish_ok("carol", json!({"n": n})).await;
            }
        })
    };
    let mut resumed = subscribe(nodes[2].addr, "carol", Some(5)).await;
    racing.await.unwrap();
    let got = resumed.notifications(35, SOON * 2).await;
    assert_eq!(seqs(&got), (6..=40).collect::<Vec<_>>());
    resumed.expect_silence(Duration::from_millis(500)).await;

    // A graceful stop closes the node's sessions with 1001, and its presence goes with them.
    let mut nodes = nodes.into_iter();
    let (a, b, c) = (
        nodes.next().unwrap(),
        nodes.next().unwrap(),
        nodes.next().unwrap(),
    );
    c.shutdown().await.expect("clean shutdown");
    assert_eq!(resumed.closed(SOON).await, Some(1001));
    eventually(CONVERGE, 0, || presence(a.publisher(), "carol")).await;
    a.shutdown().await.expect("clean shutdown");
    b.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_costs_503s_but_no_acknowledged_notification() {
    let mut redis = RedisServer::start();
    let nodes = nodes(&redis, 2).await;
    let mut sessions = vec![
        subscribe(nodes[0].addr, "dave", None).await,
        subscribe(nodes[1].addr, "dave", None).await,
    ];
    let publishers: Vec<Publisher> = nodes.iter().map(Herald::publisher).collect();

    let mut acked = Vec::new();
    let mut refused = 0;
    let mut n = 0;
    let publish = async |n: usize, acked: &mut Vec<u64>, refused: &mut usize| {
        let started = Instant::now();
        let (status, body) = publishers[n % 2].publish("dave", json!({"n": n})).await;
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "a publish hung for {:?}",
            started.elapsed()
        );
        match status {
            202 => acked.push(body["seq"].as_u64().expect("seq")),
            503 => {
                assert!(body["error"]["code"].is_string(), "503 is JSON: {body}");
                *refused += 1;
            }
            other => panic!("publish answered {other}: {body}"),
        }
    };
    for _ in 0..10 {
        publish(n, &mut acked, &mut refused).await;
        n += 1;
    }
    assert_eq!(acked.len(), 10, "all publishes succeed while Redis is up");

    redis.kill();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(3) {
        publish(n, &mut acked, &mut refused).await;
        n += 1;
    }
    assert!(refused > 0, "publishes while Redis is down answer 503");
    redis.restart();

    // Publishing resumes by itself once the nodes reconnect.
    let back = Instant::now();
    let before = acked.len();
    while acked.len() < before + 10 {
        assert!(
            back.elapsed() < Duration::from_secs(60),
            "publishes did not recover after Redis came back"
        );
        publish(n, &mut acked, &mut refused).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Everything acknowledged survived the restart ...
    let (status, history) = publishers[0]
        .get("/v1/users/dave/notifications?since=0&limit=1000")
        .await;
    assert_eq!(status, 200, "{history}");
    let stored = seqs(history["notifications"].as_array().unwrap());
    let last = history["last_seq"].as_u64().unwrap();
    assert_eq!(stored, (1..=last).collect::<Vec<_>>(), "no gap in history");
    for seq in &acked {
        assert!(stored.contains(seq), "acknowledged seq {seq} was lost");
    }
    // ... and the sessions, still open, caught up on all of it in order.
    for session in &mut sessions {
        let got = session.notifications(last as usize, SOON * 4).await;
        assert_eq!(seqs(&got), (1..=last).collect::<Vec<_>>());
        session.expect_silence(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_clients_resume_elsewhere_and_presence_converges() {
    let redis = RedisServer::start();
    let env = redis.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<HeraldProcess> = dirs
        .iter()
        .map(|d| HeraldProcess::start(d.path(), &env))
        .collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let survivor = publisher(addrs[1]);

    let mut sessions = Vec::new();
    for addr in &addrs {
        sessions.push(subscribe(*addr, "erin", None).await);
    }
    eventually(CONVERGE, 3, || presence(survivor.clone(), "erin")).await;
    for n in 1..=5 {
        publisher(addrs[n % 3])
            .publish_ok("erin", json!({"n": n}))
            .await;
    }
    for session in &mut sessions {
        assert_eq!(
            seqs(&session.notifications(5, SOON).await),
            vec![1, 2, 3, 4, 5]
        );
    }

    nodes[0].signal("KILL");
    nodes[0].wait(SOON);
    let mut orphan = sessions.remove(0);
    orphan.closed(SOON).await;
    for n in 6..=10 {
        survivor.publish_ok("erin", json!({"n": n})).await;
    }
    // Until the dead node's entry lapses its session still counts (3); then only the survivors'.
    for addr in &addrs[1..] {
        eventually(CONVERGE, 2, || presence(publisher(*addr), "erin")).await;
    }
    // The client reconnects to another node and resumes where it was.
    let mut moved = subscribe(addrs[2], "erin", Some(5)).await;
    survivor.publish_ok("erin", json!({"n": 11})).await;
    assert_eq!(
        seqs(&moved.notifications(6, SOON).await),
        (6..=11).collect::<Vec<_>>()
    );
    for session in &mut sessions {
        assert_eq!(
            seqs(&session.notifications(6, SOON).await),
            (6..=11).collect::<Vec<_>>()
        );
    }
    for addr in &addrs[1..] {
        eventually(CONVERGE, 3, || presence(publisher(*addr), "erin")).await;
    }
    let (_, body) = survivor.publish("erin", json!({"n": 12})).await;
    assert_eq!(body["delivered"], 3, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_pubsub_connection_catches_live_sessions_up_without_a_later_publish() {
    let redis = RedisServer::start();
    let node = Herald::start_with(|s| redis.engine(s)).await;
    let mut session = subscribe(node.addr, "frank", None).await;
    let publisher = node.publisher();
    publisher.publish_ok("frank", json!({"n": 1})).await;
    assert_eq!(seqs(&session.notifications(1, SOON).await), vec![1]);

    // Publish while the node's subscription is gone (it reconnects after a backoff),
    // and make sure it really was gone: nobody subscribed after the publish.
    let mut last = 1;
    let mut missed = false;
    for _ in 0..10 {
        let killed = redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        assert!(killed.starts_with(':'), "CLIENT KILL answered {killed:?}");
        last = publisher.publish_ok("frank", json!({"n": last + 1})).await;
        let subscribers = redis.command(&["PUBSUB", "NUMSUB", "herald:live:frank"]);
        if subscribers.ends_with(":0\r\n") {
            missed = true;
            break;
        }
        // Reconnected too fast to miss anything: wait for it to settle and try again.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(missed, "never published while the node was unsubscribed");
    // No later publish: the node's resubscription alone brings the session up to date.
    let got = session.notifications(last as usize - 1, SOON * 2).await;
    assert_eq!(seqs(&got), (2..=last).collect::<Vec<_>>());
    session.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_answers_503_instead_of_hanging_and_the_node_recovers() {
    let redis = RedisServer::start();
    let node = Herald::start_with(|s| redis.engine(s)).await;
    let mut session = subscribe(node.addr, "gus", None).await;
    let publisher = node.publisher();
    publisher.publish_ok("gus", json!({"n": 1})).await;

    redis.freeze();
    for n in 2..=3 {
        let started = Instant::now();
        let (status, body) = publisher.publish("gus", json!({"n": n})).await;
        // redis_timeout_ms is 1 s in tests; generous for a busy machine.
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "a publish hung for {:?}",
            started.elapsed()
        );
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
    }
    let (status, body) = publisher.get("/v1/users/gus/presence").await;
    assert_eq!(status, 503, "{body}");
    redis.thaw();

    // Recovers by itself; the open session never closed and gets everything stored.
    let back = Instant::now();
    let last = loop {
        let (status, body) = publisher.publish("gus", json!({"n": 4})).await;
        if status == 202 {
            break body["seq"].as_u64().unwrap();
        }
        assert!(
            back.elapsed() < Duration::from_secs(60),
            "never recovered: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let got = session.notifications(last as usize, SOON * 2).await;
    assert_eq!(seqs(&got), (1..=last).collect::<Vec<_>>());
}
