//! Smoke run of every scenario against a real Herald: small counts, a few seconds each,
//! checking correctness only (nothing missing or duplicated, stalled sessions evicted,
//! the registry empty after churn), never timing.

use clap::Parser;
use herald_bench::{Args, Report};
use herald_tests::Herald;

async fn herald() -> Herald {
    Herald::start_with(|s| {
        s.auth.insecure = true;
        s.auth.api_keys.clear();
        s.auth.jwt_secret.clear();
    })
    .await
}

async fn bench(herald: &Herald, scenario: &str, extra: &[&str]) -> Report {
    let base = herald.addr;
    let pid = std::process::id().to_string();
    let mut argv: Vec<String> = [
        "herald-bench",
        scenario,
        "--sub-url",
        &format!("ws://{base}/ws/{{user}}"),
        "--pub-url",
        &format!("http://{base}/v1/users/{{user}}/notifications"),
        "--multicast-url",
        &format!("http://{base}/v1/notifications"),
        "--broadcast-url",
        &format!("http://{base}/v1/broadcast"),
        "--greeting",
        "--server-pid",
        &pid,
        "--duration",
        "2",
        "--settle",
        "0.3",
        "--drain",
        "15",
        "--publishers",
        "4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(extra.iter().map(|s| s.to_string()));
    let args = Args::try_parse_from(argv).expect("arguments");
    let report = herald_bench::run(&args).await.expect("run");
    eprintln!("{report}");
    report
}

fn assert_clean(report: &Report) {
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.connect.connected, report.connect.attempted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_delivery_scenario_delivers_each_message_exactly_once() {
    let herald = herald().await;
    let idle = bench(&herald, "idle", &["--sessions", "200"]).await;
    assert_clean(&idle);
    assert!(idle.server.is_some(), "server stats from /proc");

    for (scenario, rate) in [("unicast", "300"), ("multicast", "50"), ("broadcast", "20")] {
        let report = bench(
            &herald,
            scenario,
            &["--sessions", "150", "--users", "50", "--rate", rate],
        )
        .await;
        assert_clean(&report);
        let publish = report.publish.as_ref().expect("publish stats");
        let delivery = report.delivery.as_ref().expect("delivery stats");
        assert!(publish.accepted > 0, "{scenario}: nothing published");
        assert!(delivery.delivered >= publish.accepted, "{scenario}");
        assert_eq!(delivery.missing + delivery.duplicates, 0, "{scenario}");
    }
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_the_registry_empty() {
    let herald = herald().await;
    let report = bench(
        &herald,
        "churn",
        &["--sessions", "20", "--users", "20", "--rate", "100"],
    )
    .await;
    assert_clean(&report);
    let churn = report.churn.as_ref().expect("churn stats");
    assert!(churn.connected >= 150, "{}", churn.connected);
    assert_eq!(churn.closed_clean, churn.connected);
    let publisher = herald.publisher();
    for user in ["u0", "u7", "u19"] {
        let (status, body) = publisher.get(&format!("/v1/users/{user}/presence")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["sessions"], 0, "{user}: {body}");
    }
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_sessions_are_evicted_while_the_rest_receive_everything() {
    // Test settings: heartbeat 1 s, timeout 5 s, so a silent session goes within seconds.
    let herald = herald().await;
    let report = bench(
        &herald,
        "stalled",
        &[
            "--sessions",
            "60",
            "--stalled",
            "10",
            "--rate",
            "50",
            "--evict-wait",
            "20",
        ],
    )
    .await;
    assert_clean(&report);
    let stalled = report.stalled.as_ref().expect("stalled stats");
    assert_eq!(stalled.stalled, 10);
    assert_eq!(stalled.evicted, 10);
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_spreads_sessions_over_worker_processes_and_sums_them() {
    let herald = herald().await;
    let base = herald.addr;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald-bench"))
        .args([
            "unicast",
            "--sub-url",
            &format!("ws://{base}/ws/{{user}}"),
            "--pub-url",
            &format!("http://{base}/v1/users/{{user}}/notifications"),
            "--greeting",
            "--sessions",
            "120",
            "--users",
            "40",
            "--max-per-process",
            "50",
            "--rate",
            "200",
            "--duration",
            "2",
            "--settle",
            "0.3",
            "--drain",
            "15",
            "--timeline",
            "500",
            "--json",
            "--strict",
        ])
        .output()
        .await
        .expect("run herald-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Report = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(report.processes, 3, "120 sessions at 50 per process");
    assert_clean(&report);
    assert_eq!(report.connect.connected, 120);
    let delivery = report.delivery.as_ref().expect("delivery stats");
    let publish = report.publish.as_ref().expect("publish stats");
    // Each user has 3 sessions, in different workers: every accepted publish arrives 3 times.
    assert_eq!(delivery.delivered, 3 * publish.accepted);
    let latency = report.latency_us.as_ref().expect("latency");
    assert!(latency.count >= delivery.delivered);
    // The timeline holds the same samples, merged from every worker, by send time.
    let slices = &report.timeline;
    let in_slices: u64 = slices.iter().map(|s| s.latency_us.count).sum();
    assert_eq!(in_slices, latency.count, "{slices:?}");
    assert!(
        slices
            .windows(2)
            .all(|w| w[1].at_ms - w[0].at_ms >= 500 && (w[1].at_ms - w[0].at_ms) % 500 == 0),
        "{slices:?}"
    );
    assert!(
        (4..=6).contains(&slices.len()),
        "2 s of sends in 0.5 s slices: {slices:?}"
    );
    // A slice's histogram resolves 1%, the run's 0.1%.
    assert!(
        slices
            .iter()
            .all(|s| s.latency_us.max <= latency.max + latency.max / 50),
        "{slices:?}"
    );
    herald.shutdown().await.unwrap();
}
