//! A Herald out of file descriptors: the accept that fails (EMFILE) is retried after a
//! pause, the sessions it holds keep working, and the waiting connection is served once
//! sockets close. Its own test binary: the limit is set on a `herald` process of its own.

use std::time::Duration;

use herald_tests::{HeraldProcess, SOON, Subscriber};
use serde_json::json;
use tokio::task::JoinHandle;

/// Herald's open-file limit here: its own files (store, journal, epoll, ...) plus a few
/// dozen sockets, so the test reaches it quickly.
const OPEN_FILES: u64 = 96;
/// More sessions than can fit under the limit: the loop must hit it before this.
const MAX_SESSIONS: usize = 200;
/// How long a connect may wait before it counts as stuck behind the limit.
const STUCK_AFTER: Duration = Duration::from_secs(2);
/// Sessions closed to free descriptors.
const CLOSED: usize = 10;

#[tokio::test]
async fn a_herald_out_of_files_pauses_accepting_and_serves_again_once_sockets_close() {
    let dir = tempfile::tempdir().expect("temp dir");
    let herald = HeraldProcess::start_with_open_files(dir.path(), &[], OPEN_FILES);

    let mut sessions: Vec<Subscriber> = Vec::new();
    let mut stuck: Option<JoinHandle<Subscriber>> = None;
    for n in 0..MAX_SESSIONS {
        let addr = herald.addr;
        let mut connecting =
            tokio::spawn(
                async move { herald_tests::subscribe_at(addr, &format!("u{n}"), None).await },
            );
        // A connect that takes long is stuck behind the limit only if Herald said it hit
        // one; otherwise it was merely slow (a busy CI machine), and is waited for.
        let joined = match tokio::time::timeout(STUCK_AFTER, &mut connecting).await {
            Ok(joined) => joined,
            Err(_) if said_out_of_files(&herald) => {
                stuck = Some(connecting);
                break;
            }
            Err(_) => tokio::time::timeout(SOON, &mut connecting)
                .await
                .expect("a connect that is not stuck behind the limit"),
        };
        sessions.push(joined.expect("a session that connected"));
    }
    let stuck = stuck.unwrap_or_else(|| {
        panic!("{MAX_SESSIONS} sessions under an open-file limit of {OPEN_FILES}: never hit it")
    });
    assert!(
        sessions.len() > CLOSED,
        "only {} sessions fit",
        sessions.len()
    );

    // The connect waits in the backlog meanwhile: neither refused nor served.
    assert!(
        !stuck.is_finished(),
        "the stuck connect finished on its own"
    );

    sessions.truncate(sessions.len() - CLOSED);
    let mut served = tokio::time::timeout(SOON * 2, stuck)
        .await
        .expect("the waiting connection served once sockets closed")
        .expect("its session");
    assert_eq!(served.hello["type"], "hello");

    // A session from before the limit still gets what is published to it.
    let publisher = herald.publisher();
    let seq = publisher
        .publish_ok("u0", json!({"after": "the limit"}))
        .await;
    assert_eq!(sessions[0].notifications(1, SOON).await[0]["seq"], seq);
    let user = served.hello["user"].as_str().expect("user").to_owned();
    let seq = publisher
        .publish_ok(&user, json!({"to": "the late one"}))
        .await;
    assert_eq!(served.notifications(1, SOON).await[0]["seq"], seq);
}

/// Whether Herald's log says, within a second, that an accept failed and will be retried.
fn said_out_of_files(herald: &HeraldProcess) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match herald.log.recv_timeout(left) {
            Ok(line) if line.contains("accept failed") && line.contains("retrying") => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}
