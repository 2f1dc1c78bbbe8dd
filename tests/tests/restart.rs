//! The real `herald` binary stopped (SIGTERM) or killed (SIGKILL) and started again on the
//! same store: nothing acknowledged is lost, seqs continue, and a store it cannot read stops
//! the start without being touched.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_tests::{HeraldProcess, Publisher, SOON, seqs};
use rand::RngCore;
use serde_json::{Value, json};

const STORE_FILE: &str = "herald.sqlite3";
/// Keep everything these tests publish, whatever the default retention is.
const KEEP_ALL: (&str, &str) = ("HERALD_STORE__RETENTION_PER_USER", "1000000");
/// Leaves the secrets unset, so a start would generate them into the store folder.
const GENERATED_SECRETS: [(&str, &str); 2] = [
    ("HERALD_AUTH__API_KEYS", ""),
    ("HERALD_AUTH__JWT_SECRET", ""),
];
/// Acknowledged publishes to collect before the signal, so it lands mid-stream.
const ACKED_BEFORE_SIGNAL: usize = 300;
/// A bound on each stream publisher, in case the signal never stops it.
const MAX_PER_PUBLISHER: usize = 5000;

/// How long a graceful stop (or a long replay) may take, generously.
const STOP_LIMIT: Duration = Duration::from_secs(30);

fn ids_by_seq(frames: &[Value]) -> BTreeMap<u64, String> {
    frames
        .iter()
        .map(|f| {
            (
                f["seq"].as_u64().expect("seq"),
                f["id"].as_str().expect("id").to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_for_an_offline_user_survive_a_graceful_restart_in_order_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut herald = HeraldProcess::start(dir.path(), &[]);
    let publisher = herald.publisher();
    let mut published = Vec::new();
    for i in 1..=50u64 {
        let (status, body) = publisher.publish("offline", json!({"i": i})).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["seq"], i);
        assert_eq!(body["delivered"], 0, "nobody is online");
        published.push(body);
    }
    herald.signal("TERM");
    assert_eq!(herald.wait(STOP_LIMIT), Some(0), "a graceful stop exits 0");

    let herald = HeraldProcess::start(dir.path(), &[]);
    let mut sub = herald.subscribe("offline", Some(0)).await;
    assert_eq!(sub.hello["seq"], 50);
    assert_eq!(sub.hello["first_seq"], 1);
    assert_eq!(sub.hello["recovered"], true);
    let replay = sub.notifications(50, SOON).await;
    assert_eq!(seqs(&replay), (1..=50).collect::<Vec<_>>());
    for (got, sent) in replay.iter().zip(&published) {
        assert_eq!(got["id"], sent["id"]);
    }
    assert_eq!(replay[49]["data"], json!({"i": 50}));
    sub.expect_silence(Duration::from_millis(500)).await;

    assert_eq!(
        herald.publisher().publish_ok("offline", json!({})).await,
        51
    );
    assert_eq!(seqs(&sub.notifications(1, SOON).await), vec![51]);
}

/// Publishers posting to `user` as fast as they can until the server goes away.
struct Stream {
    acked: Arc<Mutex<Vec<(u64, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<Vec<u16>>>,
}

impl Stream {
    fn start(publisher: &Publisher, user: &'static str, publishers: usize) -> Self {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..publishers)
            .map(|p| {
                let (publisher, acked) = (publisher.clone(), Arc::clone(&acked));
                tokio::spawn(async move {
                    // Every answer other than 202, in order; the stream ends at the first one.
                    let mut refused = Vec::new();
                    for i in 0..MAX_PER_PUBLISHER {
                        match publisher.try_publish(user, json!({"p": p, "i": i})).await {
                            Ok((202, body)) => acked.lock().unwrap().push((
                                body["seq"].as_u64().expect("seq"),
                                body["id"].as_str().expect("id").to_owned(),
                            )),
                            Ok((status, _)) => {
                                refused.push(status);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    refused
                })
            })
            .collect();
        Self { acked, tasks }
    }

    async fn wait_for_acks(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.acked.lock().unwrap().len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "publishing is too slow"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for every publisher to stop; answers the acknowledged (seq, id) pairs and refusals.
    async fn finish(self) -> (BTreeMap<u64, String>, Vec<u16>) {
        let mut refused = Vec::new();
        for task in self.tasks {
            refused.extend(task.await.expect("publisher task"));
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        let count = acked.len();
        let acked: BTreeMap<_, _> = acked.into_iter().collect();
        assert_eq!(acked.len(), count, "two 202s carried the same seq");
        (acked, refused)
    }
}

/// After a restart: the store holds 1..=M without a gap, every acknowledged publish is in it
/// under its seq, a resume from 0 replays all of it in order, and the next publish gets M + 1.
async fn check_nothing_acknowledged_was_lost(store: &Path, acked: &BTreeMap<u64, String>) {
    let herald = HeraldProcess::start(store, &[KEEP_ALL]);
    let publisher = herald.publisher();
    let stored = publisher.history("victim").await;
    let last = stored.len() as u64;
    assert_eq!(
        seqs(&stored),
        (1..=last).collect::<Vec<_>>(),
        "no gap in the store"
    );
    let stored_ids = ids_by_seq(&stored);
    for (seq, id) in acked {
        assert_eq!(
            stored_ids.get(seq),
            Some(id),
            "seq {seq} was acknowledged with id {id} ({} acked, {last} stored)",
            acked.len()
        );
    }

    let mut sub = herald.subscribe("victim", Some(0)).await;
    assert_eq!(sub.hello["seq"], last);
    let replay = sub.notifications(last as usize, STOP_LIMIT).await;
    assert_eq!(
        ids_by_seq(&replay),
        stored_ids,
        "the resume replays the store in order"
    );
    sub.expect_silence(Duration::from_millis(300)).await;

    assert_eq!(
        publisher.publish_ok("victim", json!({})).await,
        last + 1,
        "seqs continue without reuse"
    );
    assert_eq!(seqs(&sub.notifications(1, SOON).await), vec![last + 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acknowledged_publish_and_seqs_continue() {
    let dir = tempfile::tempdir().unwrap();
    let mut herald = HeraldProcess::start(dir.path(), &[KEEP_ALL]);
    let stream = Stream::start(&herald.publisher(), "victim", 4);
    stream.wait_for_acks(ACKED_BEFORE_SIGNAL).await;
    herald.signal("KILL");
    assert_eq!(herald.wait(STOP_LIMIT), None, "killed by the signal");
    let (acked, _) = stream.finish().await;
    check_nothing_acknowledged_was_lost(dir.path(), &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_publishes_in_flight_loses_no_acknowledged_publish() {
    let dir = tempfile::tempdir().unwrap();
    let mut herald = HeraldProcess::start(dir.path(), &[KEEP_ALL]);
    let mut tab = herald.subscribe("victim", Some(0)).await;
    let stream = Stream::start(&herald.publisher(), "victim", 4);
    stream.wait_for_acks(ACKED_BEFORE_SIGNAL).await;
    herald.signal("TERM");
    assert_eq!(
        tab.closed(STOP_LIMIT).await,
        Some(1001),
        "sessions close with 1001"
    );
    assert_eq!(herald.wait(STOP_LIMIT), Some(0), "a graceful stop exits 0");
    let (acked, refused) = stream.finish().await;
    assert!(
        refused.iter().all(|&status| status == 503),
        "while stopping, publishes are either served or refused with 503: {refused:?}"
    );
    check_nothing_acknowledged_was_lost(dir.path(), &acked).await;
}

/// Each file of the store folder with its size and a hash of its bytes, to prove a
/// refused start touched nothing (and to keep a failure message short). SQLite's `-shm`
/// is left out: it is a shared-memory index that any reader rebuilds, not data.
fn snapshot(dir: &Path) -> BTreeMap<String, (usize, u64)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter(|entry| !entry.file_name().to_string_lossy().ends_with("-shm"))
        .map(|entry| {
            let bytes = std::fs::read(entry.path()).unwrap();
            let mut hasher = std::hash::DefaultHasher::new();
            std::hash::Hash::hash(&bytes, &mut hasher);
            (
                entry.file_name().to_string_lossy().into_owned(),
                (bytes.len(), std::hash::Hasher::finish(&hasher)),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_store_stops_the_start_and_is_left_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(STORE_FILE);
    let mut garbage = vec![0u8; 64 * 1024];
    rand::rng().fill_bytes(&mut garbage);
    std::fs::write(&file, &garbage).unwrap();
    // No configured secrets: a start that goes on to generate them must not get that far.
    assert_refused_untouched(
        dir.path(),
        &GENERATED_SECRETS,
        &[&file.display().to_string()],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_with_a_good_header_and_corrupt_pages_stops_the_start_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let mut herald = HeraldProcess::start(dir.path(), &[KEEP_ALL]);
    let publisher = herald.publisher();
    for i in 0..200 {
        publisher
            .publish_ok(
                &format!("user-{}", i % 20),
                json!({"padding": "x".repeat(200)}),
            )
            .await;
    }
    herald.signal("TERM");
    assert_eq!(herald.wait(STOP_LIMIT), Some(0));

    // Keep SQLite's 100-byte header and first page; trash everything after.
    let file = dir.path().join(STORE_FILE);
    let mut bytes = std::fs::read(&file).unwrap();
    assert!(bytes.len() > 3 * 4096, "the store has pages to corrupt");
    rand::rng().fill_bytes(&mut bytes[4096..]);
    std::fs::write(&file, &bytes).unwrap();
    assert_refused_untouched(dir.path(), &[], &[&file.display().to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_another_schema_version_stops_the_start_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let mut herald = HeraldProcess::start(dir.path(), &[]);
    herald.publisher().publish_ok("alice", json!({})).await;
    herald.signal("TERM");
    assert_eq!(herald.wait(STOP_LIMIT), Some(0));

    // SQLite keeps `PRAGMA user_version` at bytes 60..64 of the header, big-endian.
    let file = dir.path().join(STORE_FILE);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[60..64].copy_from_slice(&99u32.to_be_bytes());
    std::fs::write(&file, &bytes).unwrap();
    assert_refused_untouched(
        dir.path(),
        &[],
        &[&file.display().to_string(), "version 99"],
    );
}

/// Starts Herald on `store`, which it must refuse: non-zero exit, every one of `named`
/// in its log, and the store folder exactly as it was.
fn assert_refused_untouched(store: &std::path::Path, env: &[(&str, &str)], named: &[&str]) {
    let before = snapshot(store);
    let exited = HeraldProcess::start_fails(store, env);
    assert!(matches!(exited.code, Some(c) if c != 0), "{exited:?}");
    for needle in named {
        assert!(
            exited.log.contains(needle),
            "the message names {needle:?}: {}",
            exited.log
        );
    }
    assert_eq!(snapshot(store), before, "the store folder was changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_path_that_is_a_regular_file_stops_the_start_untouched() {
    // Permissions (chmod 000) do not bind root, which runs these tests; a store path that
    // cannot be a folder fails the same way for every user.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-folder");
    std::fs::write(&path, b"an operator's file, not Herald's").unwrap();

    let exited = HeraldProcess::start_fails(&path, &[]);
    assert!(matches!(exited.code, Some(c) if c != 0), "{exited:?}");
    assert!(
        exited.log.contains(&path.display().to_string()) && exited.log.contains("not a folder"),
        "the message names the path and what is wrong: {}",
        exited.log
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"an operator's file, not Herald's"
    );
}
