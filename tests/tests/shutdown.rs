//! Graceful shutdown: open sessions get close 1001, `run` returns Ok, and the real
//! binary exits 0 on SIGTERM or SIGINT.

use std::time::Duration;

use herald_tests::{
    API_KEY, Herald, HeraldProcess, JWT_SECRET, Publisher, RawWebSocket, SOON, Subscriber, token,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_every_session_with_1001() {
    let herald = Herald::start().await;
    let mut subs = vec![
        herald.subscribe("alice").await,
        herald.subscribe("alice").await,
        herald.subscribe("bob").await,
    ];
    // A peer that never reads must not hold the shutdown up.
    let mut ghost =
        RawWebSocket::connect(herald.addr, &format!("/ws/ghost?token={}", token("ghost")))
            .await
            .expect("upgrade");
    let grace = Duration::from_millis(herald.settings.server.shutdown_grace_ms);
    herald.publisher().publish_ok("alice", json!(1)).await;

    let stopping = tokio::spawn(herald.shutdown());
    for sub in &mut subs {
        assert_eq!(sub.closed(SOON).await, Some(1001), "going away");
    }
    assert_eq!(ghost.close_code(SOON).await, Some(1001));
    let result = tokio::time::timeout(grace + SOON, stopping)
        .await
        .expect("shutdown finished within its grace")
        .expect("server thread");
    assert_eq!(result, Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_no_sessions_returns_ok() {
    let herald = Herald::start().await;
    herald.publisher().publish_ok("alice", json!(1)).await;
    assert_eq!(herald.shutdown().await, Ok(()));
}

/// The real binary: `signal` makes it close sessions with 1001 and exit 0, and its
/// log never shows a secret.
async fn the_binary_stops_gracefully_on(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut herald = HeraldProcess::start(dir.path(), &[]);
    let base = herald.base_url();
    let ws = |user: &str| format!("ws://{}/ws/{user}?token={}", herald.addr, token(user));
    let mut alice = Subscriber::connect(&ws("alice")).await.expect("subscribe");
    let mut bob = Subscriber::connect(&ws("bob")).await.expect("subscribe");
    let publisher = Publisher::new(base, Some(API_KEY.into()));
    publisher.publish_ok("alice", json!("before")).await;
    assert_eq!(alice.notifications(1, SOON).await[0]["data"], "before");

    herald.signal(signal);
    assert_eq!(alice.closed(SOON).await, Some(1001));
    assert_eq!(bob.closed(SOON).await, Some(1001));
    let code = tokio::task::spawn_blocking(move || {
        let code = herald.wait(Duration::from_secs(15));
        let log: Vec<String> = herald.log.try_iter().collect();
        (code, log)
    })
    .await
    .unwrap();
    let (code, log) = code;
    assert_eq!(
        code,
        Some(0),
        "exit status after SIG{signal}; log:\n{}",
        log.join("\n")
    );
    for line in &log {
        assert!(
            !line.contains(API_KEY) && !line.contains(JWT_SECRET),
            "a secret in the log: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_stops_gracefully_on_sigterm() {
    the_binary_stops_gracefully_on("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_stops_gracefully_on_sigint() {
    the_binary_stops_gracefully_on("INT").await;
}
