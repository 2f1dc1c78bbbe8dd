//! A node's memory follows its sessions down: what thousands of closed sessions used goes
//! back to the OS within seconds. Its own `herald` process, so its RSS is Herald's alone.

use std::time::Duration;

use futures_util::StreamExt;
use herald_tests::{HeraldProcess, Subscriber, eventually, rss_bytes_of, subscribe_at};

/// Sessions opened, then closed: well over the 500 closes that trigger a release.
const SESSIONS: usize = 3000;
/// Connects in flight at once.
const CONNECTING: usize = 64;
/// Herald checks for closed sessions every 5 s; two checks and the release fit in this.
const RELEASED_WITHIN: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_of_closed_sessions_goes_back_to_the_os() {
    let dir = tempfile::tempdir().expect("temp dir");
    let herald = HeraldProcess::start(dir.path(), &[]);
    let pid = herald.child.id();
    let addr = herald.addr;
    let baseline = rss_bytes_of(pid);

    let sessions: Vec<Subscriber> = futures_util::stream::iter(0..SESSIONS)
        .map(|n| async move { subscribe_at(addr, &format!("u{n}"), None).await })
        .buffer_unordered(CONNECTING)
        .collect()
        .await;
    let connected = rss_bytes_of(pid);
    let grown = connected.saturating_sub(baseline);
    // Without that much growth the test could not tell a release from noise.
    assert!(
        grown > 4 * 1024 * 1024,
        "{SESSIONS} sessions grew RSS by only {grown} bytes"
    );

    drop(sessions);
    // Most of what the sessions took is returned; the allocator may keep some for reuse.
    let bound = baseline + grown / 3;
    eventually(RELEASED_WITHIN, "RSS back near its baseline", || async {
        rss_bytes_of(pid) < bound
    })
    .await;
}
