//! `idempotency_key`: the same key for the same user answers `200` with the first answer and
//! delivers nothing new, within the retention window and across a graceful restart.

use std::time::Duration;

use herald_tests::{Herald, HeraldProcess, Publisher, SOON, seqs};
use serde_json::{Value, json};

/// The fields of a publish answer that a repeat must reproduce.
fn receipt(body: &Value) -> Value {
    json!({"id": body["id"], "user": body["user"], "seq": body["seq"], "delivered": body["delivered"]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_answers_the_first_receipt_and_delivers_nothing_new() {
    let herald = Herald::start().await;
    let publisher = herald.publisher();
    let mut tab = herald.subscribe("idem").await;

    let (status, first) = publisher
        .publish_keyed("idem", json!({"n": 1}), "order-42")
        .await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(
        (first["seq"].as_u64(), first["delivered"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(tab.notifications(1, SOON).await[0]["id"], first["id"]);

    // A second tab opens: the repeat must not reach it, nor the first one.
    let mut other_tab = herald.subscribe("idem").await;
    for data in [json!({"n": 1}), json!({"n": "different body, same key"})] {
        let (status, again) = publisher.publish_keyed("idem", data, "order-42").await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(receipt(&again), receipt(&first));
    }
    tab.expect_silence(Duration::from_millis(500)).await;
    other_tab.expect_silence(Duration::from_millis(100)).await;

    // The key belongs to this user only, and another key is a new notification.
    let (status, body) = publisher
        .publish_keyed("someone-else", json!({}), "order-42")
        .await;
    assert_eq!((status, body["seq"].as_u64()), (202, Some(1)), "{body}");
    let (status, body) = publisher.publish_keyed("idem", json!({}), "order-43").await;
    assert_eq!((status, body["seq"].as_u64()), (202, Some(2)), "{body}");
    assert_eq!(seqs(&tab.notifications(1, SOON).await), vec![2]);
    assert_eq!(seqs(&other_tab.notifications(1, SOON).await), vec![2]);

    assert_eq!(
        seqs(&publisher.history("idem").await),
        vec![1, 2],
        "stored once"
    );
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_with_one_key_store_and_deliver_once() {
    let herald = Herald::start().await;
    let mut tab = herald.subscribe("racy").await;
    let racing: Vec<_> = (0..8)
        .map(|i| {
            let publisher = herald.publisher();
            tokio::spawn(async move {
                publisher
                    .publish_keyed("racy", json!({"i": i}), "same")
                    .await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in racing {
        answers.push(task.await.unwrap());
    }
    let firsts: Vec<_> = answers
        .iter()
        .filter(|(status, _)| *status == 202)
        .collect();
    assert_eq!(firsts.len(), 1, "exactly one publish is new: {answers:?}");
    let first = &firsts[0].1;
    // `delivered` is not compared: a repeat that arrives while the first is still being
    // fanned out answers before the first's count is recorded (it says 0).
    for (status, body) in &answers {
        assert!(*status == 202 || *status == 200, "{status}: {body}");
        assert_eq!(
            (&body["id"], &body["seq"]),
            (&first["id"], &first["seq"]),
            "{body}"
        );
    }
    assert_eq!(seqs(&tab.notifications(1, SOON).await), vec![1]);
    tab.expect_silence(Duration::from_millis(500)).await;
    assert_eq!(seqs(&herald.publisher().history("racy").await), vec![1]);
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_older_than_retention_is_forgotten() {
    let herald = Herald::start_with(|s| s.store.retention_secs = 1).await;
    let publisher = herald.publisher();
    let (status, first) = publisher.publish_keyed("forgetful", json!({}), "k").await;
    assert_eq!(status, 202, "{first}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, again) = publisher.publish_keyed("forgetful", json!({}), "k").await;
    assert_eq!(status, 202, "outside the window the key is new: {again}");
    assert_eq!(again["seq"], 2);
    assert_ne!(again["id"], first["id"]);
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_after_a_graceful_restart_answers_the_first_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let mut herald = HeraldProcess::start(dir.path(), &[]);
    let publisher = herald.publisher();
    let mut tab = herald.subscribe("idem", None).await;
    let (status, first) = publisher
        .publish_keyed("idem", json!({"n": 1}), "once")
        .await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(first["delivered"], 1);
    tab.notifications(1, SOON).await;
    herald.signal("TERM");
    assert_eq!(tab.closed(Duration::from_secs(30)).await, Some(1001));
    assert_eq!(herald.wait(Duration::from_secs(20)), Some(0));

    let herald = HeraldProcess::start(dir.path(), &[]);
    let publisher: Publisher = herald.publisher();
    let mut tab = herald.subscribe("idem", None).await;
    assert_eq!(tab.hello["seq"], 1);
    let (status, again) = publisher
        .publish_keyed("idem", json!({"n": 1}), "once")
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        receipt(&again),
        receipt(&first),
        "the first answer, delivered count included"
    );
    tab.expect_silence(Duration::from_millis(500)).await;
    let (status, next) = publisher
        .publish_keyed("idem", json!({"n": 2}), "twice")
        .await;
    assert_eq!((status, next["seq"].as_u64()), (202, Some(2)), "{next}");
    assert_eq!(seqs(&tab.notifications(1, SOON).await), vec![2]);
}
