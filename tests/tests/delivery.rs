//! Delivery: every session of a user gets exactly that user's notifications, in seq
//! order; multi-user publish, broadcast, presence and the metrics that count them.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use herald_tests::{Herald, RawWebSocket, SOON, Subscriber, eventually, metric_value, token};
use rand::Rng;
use serde_json::{Value, json};

/// Long enough for a stray frame to arrive if one were on its way.
const QUIET: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_session_gets_exactly_its_users_notifications_in_order() {
    let herald = Herald::start().await;
    let publisher = herald.publisher();
    let mut rng = rand::rng();

    // 20 users with 1 to 3 sessions each; 5 more users have none.
    let users: Vec<String> = (0..20).map(|i| format!("user-{i}")).collect();
    let offline: Vec<String> = (0..5).map(|i| format!("offline-{i}")).collect();
    let mut sessions: Vec<(String, Subscriber)> = Vec::new();
    for user in &users {
        for _ in 0..rng.random_range(1..=3) {
            sessions.push((user.clone(), herald.subscribe(user).await));
        }
    }
    let session_count = |user: &str| sessions.iter().filter(|(u, _)| u == user).count();
    let expected_sessions: HashMap<&str, usize> = users
        .iter()
        .map(|u| (u.as_str(), session_count(u)))
        .chain(offline.iter().map(|u| (u.as_str(), 0)))
        .collect();

    // 300 publishes to random users, 8 in flight at once so one user's publishes race.
    let targets: Vec<(usize, String)> = (0..300)
        .map(|i| {
            let user = if rng.random_range(0..10) == 0 {
                &offline[rng.random_range(0..offline.len())]
            } else {
                &users[rng.random_range(0..users.len())]
            };
            (i, user.clone())
        })
        .collect();
    let answers: Vec<(String, usize, Value)> = futures_util::stream::iter(targets)
        .map(|(i, user)| {
            let publisher = publisher.clone();
            async move {
                let (status, body) = publisher
                    .publish(&user, json!({"user": user, "i": i}))
                    .await;
                assert_eq!(status, 202, "{body}");
                (user, i, body)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;

    // What each user is owed: seq -> i, from the publish answers.
    let mut owed: HashMap<String, HashMap<u64, usize>> = HashMap::new();
    for (user, i, body) in &answers {
        assert_eq!(body["user"], *user);
        assert_eq!(
            body["delivered"].as_u64(),
            Some(expected_sessions[user.as_str()] as u64),
            "delivered counts {user}'s sessions: {body}"
        );
        let seq = body["seq"].as_u64().expect("seq");
        let previous = owed.entry(user.clone()).or_default().insert(seq, *i);
        assert!(previous.is_none(), "{user} got seq {seq} twice");
    }
    for (user, by_seq) in &owed {
        let n = by_seq.len() as u64;
        assert!(
            (1..=n).all(|s| by_seq.contains_key(&s)),
            "{user}'s seqs are 1..={n} without gaps"
        );
    }

    for (user, sub) in &mut sessions {
        let by_seq = owed.get(user.as_str()).cloned().unwrap_or_default();
        let got = sub.notifications(by_seq.len(), SOON).await;
        for (k, frame) in got.iter().enumerate() {
            let seq = k as u64 + 1;
            assert_eq!(frame["seq"], seq, "{user}: in seq order");
            assert_eq!(frame["data"]["user"], *user, "{user} got someone else's");
            assert_eq!(frame["data"]["i"], by_seq[&seq], "{user} seq {seq}");
            assert_eq!(frame["event"], "test");
            assert!(frame["id"].is_string() && frame["ts"].is_string());
        }
    }
    // Nothing else, for anyone (checked after all, so one wait covers every session).
    tokio::time::sleep(QUIET).await;
    for (user, sub) in &mut sessions {
        if let Some(extra) = sub.next(Duration::ZERO).await {
            panic!("{user} got more than it was owed: {extra:?}");
        }
    }
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publish_to_many_users_reaches_each_once() {
    let herald = Herald::start().await;
    let publisher = herald.publisher();
    let mut alice = [
        herald.subscribe("alice").await,
        herald.subscribe("alice").await,
    ];
    let mut bob = herald.subscribe("bob").await;
    let mut carol = herald.subscribe("carol").await;

    let (status, body) = publisher
        .post(
            "/v1/notifications",
            &json!({"users": ["alice", "bob", "alice", "nobody"], "event": "e", "data": {"n": 1}}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert!(body["id"].is_string(), "{body}");
    let results: HashMap<String, Value> = body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| (r["user"].as_str().unwrap().to_owned(), r.clone()))
        .collect();
    // A user listed twice is one recipient: one seq, one delivery.
    assert_eq!(results.len(), 3, "{body}");
    assert_eq!(results["alice"]["delivered"], 2);
    assert_eq!(results["alice"]["seq"], 1);
    assert_eq!(results["bob"]["delivered"], 1);
    assert_eq!(results["nobody"]["delivered"], 0);

    for sub in alice.iter_mut().chain([&mut bob]) {
        let got = sub.notifications(1, SOON).await;
        assert_eq!(got[0]["data"], json!({"n": 1}));
        assert_eq!(got[0]["event"], "e");
    }
    for sub in alice.iter_mut().chain([&mut bob, &mut carol]) {
        sub.expect_silence(QUIET).await;
    }

    // The limit is 1,000 users: one more is refused and stores nothing.
    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let (status, body) = publisher
        .post("/v1/notifications", &json!({"users": too_many, "data": {}}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["code"].is_string(), "{body}");
    let (status, body) = publisher
        .post("/v1/notifications", &json!({"users": [], "data": {}}))
        .await;
    assert_eq!(status, 400, "an empty list: {body}");
    let (status, body) = publisher
        .post(
            "/v1/notifications",
            &json!({"users": ["ok", "not ok"], "data": {}}),
        )
        .await;
    assert_eq!(status, 400, "one invalid user id: {body}");
    let (_, history) = publisher.get("/v1/users/ok/notifications").await;
    assert_eq!(history["last_seq"], 0, "a refused publish stores nothing");

    // Exactly 1,000 is fine.
    let mut thousand: Vec<String> = (0..999).map(|i| format!("u{i}")).collect();
    thousand.push("carol".into());
    let (status, body) = publisher
        .post("/v1/notifications", &json!({"users": thousand, "data": 7}))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["results"].as_array().map(Vec::len), Some(1000));
    assert_eq!(carol.notifications(1, SOON).await[0]["data"], 7);
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_every_session() {
    let herald = Herald::start().await;
    let mut subs = Vec::new();
    for (user, n) in [("alice", 2), ("bob", 1), ("carol", 3)] {
        for _ in 0..n {
            subs.push(herald.subscribe(user).await);
        }
    }
    let (status, body) = herald
        .publisher()
        .post(
            "/v1/broadcast",
            &json!({"event": "maintenance", "data": {"at": "noon"}}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["delivered"], 6);
    let id = body["id"].as_str().expect("id").to_owned();
    for sub in &mut subs {
        let frame = sub.frame(SOON).await;
        assert_eq!(frame["type"], "broadcast");
        assert_eq!(frame["id"], id.as_str());
        assert_eq!(frame["event"], "maintenance");
        assert_eq!(frame["data"], json!({"at": "noon"}));
        assert!(
            frame.get("seq").is_none(),
            "broadcasts carry no seq: {frame}"
        );
        sub.expect_silence(QUIET).await;
    }
    // Live only: not in anyone's history.
    let (_, history) = herald
        .publisher()
        .get("/v1/users/alice/notifications")
        .await;
    assert_eq!(history["last_seq"], 0, "{history}");
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_counts_sessions_and_drops_after_close() {
    let herald = Herald::start().await;
    assert_eq!(herald.presence("alice").await, 0);
    let first = herald.subscribe("alice").await;
    let second = herald.subscribe("alice").await;
    let _bob = herald.subscribe("bob").await;
    // The session joins the registry before hello is sent, so this is exact at once.
    assert_eq!(herald.presence("alice").await, 2);
    assert_eq!(herald.presence("bob").await, 1);
    let (_, body) = herald.publisher().get("/v1/users/alice/presence").await;
    assert_eq!(
        body,
        json!({"user": "alice", "online": true, "sessions": 2})
    );

    drop(first); // the client sends a close frame
    eventually(SOON, "alice down to one session", || async {
        herald.presence("alice").await == 1
    })
    .await;
    drop(second);
    eventually(SOON, "alice offline", || async {
        herald.presence("alice").await == 0
    })
    .await;
    let (_, body) = herald.publisher().get("/v1/users/alice/presence").await;
    assert_eq!(
        body,
        json!({"user": "alice", "online": false, "sessions": 0})
    );
    assert_eq!(herald.presence("bob").await, 1, "bob is untouched");
    herald.shutdown().await.unwrap();
}

/// A session joins the table on its own thread as it starts and leaves it as it stops:
/// one that hangs up right after its 101, on either worker, must not leave an entry
/// behind (a leave handled before its join would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_hang_up_at_once_leave_nothing_behind() {
    let herald = Herald::start().await;
    let path = format!("/ws/flicker?token={}", token("flicker"));
    let hang_ups = (0..40).map(|_| {
        let path = path.clone();
        let addr = herald.addr;
        tokio::spawn(async move {
            let raw = RawWebSocket::connect(addr, &path).await.expect("upgrade");
            drop(raw);
        })
    });
    for hang_up in futures_util::future::join_all(hang_ups).await {
        hang_up.unwrap();
    }
    let staying = herald.subscribe("flicker").await;
    eventually(SOON, "only the staying session left", || async {
        herald.presence("flicker").await == 1 && herald.metric("herald_sessions").await == 1.0
    })
    .await;
    drop(staying);
    eventually(SOON, "flicker offline", || async {
        herald.presence("flicker").await == 0 && herald.metric("herald_users_online").await == 0.0
    })
    .await;
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_metrics() {
    let herald = Herald::start().await;
    let anonymous = herald.publisher().with_key(None);
    assert_eq!(
        anonymous.get("/healthz").await,
        (200, json!({"status": "ok"}))
    );

    let before = herald.metrics().await;
    for series in [
        "herald_sessions",
        "herald_users_online",
        "herald_notifications_published_total",
        "herald_notifications_delivered_total",
        "herald_sessions_evicted_total{reason=\"heartbeat\"}",
        "herald_sessions_evicted_total{reason=\"slow_consumer\"}",
    ] {
        assert!(
            metric_value(&before, series).is_some(),
            "{series} missing from\n{before}"
        );
    }
    assert!(before.contains("# TYPE herald_sessions gauge"), "{before}");
    assert!(
        before.contains("# TYPE herald_notifications_published counter"),
        "{before}"
    );

    let mut alice = [
        herald.subscribe("alice").await,
        herald.subscribe("alice").await,
    ];
    let _bob = herald.subscribe("bob").await;
    assert_eq!(herald.metric("herald_sessions").await, 3.0);
    assert_eq!(herald.metric("herald_users_online").await, 2.0);

    let publisher = herald.publisher();
    for i in 0..3 {
        publisher.publish_ok("alice", json!(i)).await;
    }
    publisher.publish_ok("nobody", json!(0)).await;
    for sub in &mut alice {
        sub.notifications(3, SOON).await;
    }
    let after = herald.metrics().await;
    let delta = |series: &str| {
        metric_value(&after, series).unwrap() - metric_value(&before, series).unwrap()
    };
    assert_eq!(delta("herald_notifications_published_total"), 4.0);
    assert_eq!(delta("herald_notifications_delivered_total"), 6.0);
    herald.shutdown().await.unwrap();
}
