//! Stored history: paging with `since` and `limit`, retention by count and by age, and
//! how a resume older than retention is reported (`hello.first_seq`, `hello.recovered`).

use std::time::Duration;

use herald_tests::{Herald, SOON, seqs};
use serde_json::{Value, json};

fn history_path(user: &str, query: &str) -> String {
    format!("/v1/users/{user}/notifications{query}")
}

async fn publish_n(herald: &Herald, user: &str, n: u64) {
    let publisher = herald.publisher();
    for i in 1..=n {
        assert_eq!(publisher.publish_ok(user, json!({"i": i})).await, i);
    }
}

fn page_seqs(body: &Value) -> Vec<u64> {
    seqs(body["notifications"].as_array().expect("notifications"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_with_since_and_limit_oldest_first() {
    let herald = Herald::start().await;
    publish_n(&herald, "pager", 25).await;
    let publisher = herald.publisher();

    let mut since = 0;
    let mut pages = Vec::new();
    loop {
        let (status, body) = publisher
            .get(&history_path("pager", &format!("?since={since}&limit=10")))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["user"], "pager");
        assert_eq!(
            body["last_seq"], 25,
            "last_seq is the head, not the page end"
        );
        let page = page_seqs(&body);
        let Some(&last) = page.last() else { break };
        pages.push(page);
        since = last;
    }
    assert_eq!(
        pages,
        vec![
            (1..=10).collect::<Vec<_>>(),
            (11..=20).collect(),
            (21..=25).collect()
        ]
    );

    let (status, body) = publisher.get(&history_path("pager", "")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        page_seqs(&body),
        (1..=25).collect::<Vec<_>>(),
        "since defaults to 0, limit to 100"
    );
    let first = &body["notifications"][0];
    assert_eq!(first["type"], "notification");
    assert_eq!(first["data"], json!({"i": 1}));
    assert_eq!(first["event"], "test");
    assert!(
        first["id"].is_string() && first["ts"].is_string(),
        "{first}"
    );

    let (status, body) = publisher
        .get(&history_path("pager", "?limit=1000&since=24"))
        .await;
    assert_eq!((status, page_seqs(&body)), (200, vec![25]));

    let (status, body) = publisher.get(&history_path("nobody", "")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"user": "nobody", "last_seq": 0, "notifications": []})
    );
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_rejects_limits_out_of_range_and_bad_since() {
    let herald = Herald::start().await;
    let publisher = herald.publisher();
    for query in [
        "?limit=0",
        "?limit=1001",
        "?limit=-1",
        "?limit=ten",
        "?since=abc",
        "?since=-1",
        "?since=1.5",
    ] {
        let (status, body) = publisher.get(&history_path("alice", query)).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["code"], "invalid_query", "{query}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{query}: {body}"
        );
    }
    for query in ["?limit=1", "?limit=1000", "?since=0", "?since=99"] {
        let (status, body) = publisher.get(&history_path("alice", query)).await;
        assert_eq!(status, 200, "{query}: {body}");
    }
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_count_keeps_the_newest_and_a_resume_behind_it_reports_the_gap() {
    let herald = Herald::start_with(|s| s.store.retention_per_user = 5).await;
    publish_n(&herald, "counted", 12).await;

    let (status, body) = herald.publisher().get(&history_path("counted", "")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["last_seq"], 12);
    assert_eq!(page_seqs(&body), vec![8, 9, 10, 11, 12]);

    // Seqs 1..=7 are gone: a client that saw nothing, or only up to 6, missed some.
    for since in [0, 6] {
        let mut sub = herald.subscribe_since("counted", since).await;
        assert_eq!(sub.hello["seq"], 12, "since={since}");
        assert_eq!(sub.hello["first_seq"], 8, "since={since}");
        assert_eq!(sub.hello["recovered"], false, "since={since}");
        let replay = sub.notifications(5, SOON).await;
        assert_eq!(seqs(&replay), vec![8, 9, 10, 11, 12], "since={since}");
        sub.expect_silence(Duration::from_millis(300)).await;
    }
    // A client that saw 7 missed nothing.
    let mut sub = herald.subscribe_since("counted", 7).await;
    assert_eq!(sub.hello["first_seq"], 8);
    assert_eq!(sub.hello["recovered"], true);
    assert_eq!(
        seqs(&sub.notifications(5, SOON).await),
        vec![8, 9, 10, 11, 12]
    );
    // A live-only session is told nothing about recovery.
    let live = herald.subscribe("counted").await;
    assert_eq!(live.hello["first_seq"], 8);
    assert!(live.hello.get("recovered").is_none(), "{}", live.hello);

    // And the live stream goes on from there.
    herald.publisher().publish_ok("counted", json!({})).await;
    assert_eq!(seqs(&sub.notifications(1, SOON).await), vec![13]);
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_age_drops_old_notifications_and_never_reuses_their_seqs() {
    let herald = Herald::start_with(|s| s.store.retention_secs = 1).await;
    let published = std::time::Instant::now();
    publish_n(&herald, "aged", 3).await;
    let (_, body) = herald.publisher().get(&history_path("aged", "")).await;
    // A machine stalled for a second would have aged them already; only then is this moot.
    if published.elapsed() < Duration::from_millis(800) {
        assert_eq!(page_seqs(&body), vec![1, 2, 3], "kept while young");
    }

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = herald.publisher().get(&history_path("aged", "")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["last_seq"], 3, "the head survives its notifications");
    assert_eq!(page_seqs(&body), Vec::<u64>::new(), "expired: {body}");

    let mut sub = herald.subscribe_since("aged", 0).await;
    assert_eq!(sub.hello["seq"], 3);
    assert_eq!(
        sub.hello["first_seq"], 4,
        "nothing kept: first_seq is seq + 1"
    );
    assert_eq!(sub.hello["recovered"], false);
    sub.expect_silence(Duration::from_millis(300)).await;

    assert_eq!(
        herald.publisher().publish_ok("aged", json!({})).await,
        4,
        "seqs continue after expiry"
    );
    assert_eq!(seqs(&sub.notifications(1, SOON).await), vec![4]);
    herald.shutdown().await.unwrap();
}
