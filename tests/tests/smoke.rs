//! The happy path end to end: subscribe, publish, receive.

use herald_tests::{Herald, SOON};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_notification_reaches_the_subscriber() {
    let herald = Herald::start().await;
    let mut alice = herald.subscribe("alice").await;
    assert_eq!(alice.hello["user"], "alice");
    assert_eq!(alice.hello["seq"], 0);
    let (status, body) = herald
        .publisher()
        .publish("alice", json!({"order": 42}))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["seq"], 1);
    assert_eq!(body["delivered"], 1);
    let got = alice.notifications(1, SOON).await;
    assert_eq!(got[0]["data"], json!({"order": 42}));
    assert_eq!(got[0]["seq"], 1);
    herald.shutdown().await.unwrap();
}
