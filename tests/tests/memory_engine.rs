//! `engine.kind = "memory"` on the real binary: history and resume work while it runs,
//! nothing is written to the store folder but secrets, and after a restart seqs begin
//! again and a client resuming beyond them is told `recovered: false`.

use std::time::Duration;

use herald_tests::{HeraldProcess, SOON, seqs};
use serde_json::json;

const MEMORY: (&str, &str) = ("HERALD_ENGINE__KIND", "memory");
const STOP_LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_engine_replays_while_it_runs_and_starts_over_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut herald = HeraldProcess::start(dir.path(), &[MEMORY]);
    let publisher = herald.publisher();
    for i in 1..=5u64 {
        assert_eq!(publisher.publish_ok("mem", json!({"i": i})).await, i);
    }
    let history = publisher.history("mem").await;
    assert_eq!(seqs(&history), (1..=5).collect::<Vec<_>>());

    let mut sub = herald.subscribe("mem", Some(2)).await;
    assert_eq!(sub.hello["seq"], 5);
    assert_eq!(sub.hello["first_seq"], 1);
    assert_eq!(sub.hello["recovered"], true);
    assert_eq!(seqs(&sub.notifications(3, SOON).await), vec![3, 4, 5]);
    assert_eq!(publisher.publish_ok("mem", json!({"i": 6})).await, 6);
    assert_eq!(seqs(&sub.notifications(1, SOON).await), vec![6]);
    drop(sub);

    herald.signal("TERM");
    assert_eq!(herald.wait(STOP_LIMIT), Some(0), "a graceful stop exits 0");
    let mut files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        Vec::<String>::new(),
        "the memory engine writes no store files"
    );

    let herald = HeraldProcess::start(dir.path(), &[MEMORY]);
    let mut sub = herald.subscribe("mem", Some(6)).await;
    assert_eq!(sub.hello["seq"], 0, "history is gone: {}", sub.hello);
    assert_eq!(sub.hello["recovered"], false, "{}", sub.hello);
    sub.expect_silence(Duration::from_millis(300)).await;
    let publisher = herald.publisher();
    assert_eq!(publisher.publish_ok("mem", json!({"i": 1})).await, 1);
    assert_eq!(seqs(&sub.notifications(1, SOON).await), vec![1]);
}
