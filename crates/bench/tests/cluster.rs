//! Smoke run against two Herald nodes sharing a real Redis: sessions and publishers spread
//! round-robin over both nodes' URLs, and every delivery still arrives exactly once.

use clap::Parser;
use herald_bench::{Args, Report};
use herald_tests::{Herald, RedisServer};

async fn node(redis: &RedisServer) -> Herald {
    Herald::start_with(|s| {
        redis.engine(s);
        s.auth.insecure = true;
        s.auth.api_keys.clear();
        s.auth.jwt_secret.clear();
    })
    .await
}

async fn bench(nodes: &[&Herald], scenario: &str, extra: &[&str]) -> Report {
    let mut argv: Vec<String> = vec!["herald-bench".into(), scenario.into()];
    for node in nodes {
        let base = node.addr;
        argv.extend([
            "--sub-url".into(),
            format!("ws://{base}/ws/{{user}}"),
            "--pub-url".into(),
            format!("http://{base}/v1/users/{{user}}/notifications"),
            "--broadcast-url".into(),
            format!("http://{base}/v1/broadcast"),
        ]);
    }
    for arg in [
        "--greeting",
        "--duration",
        "2",
        "--settle",
        "0.5",
        "--drain",
        "15",
        "--publishers",
        "4",
    ]
    .iter()
    .chain(extra)
    {
        argv.push(arg.to_string());
    }
    let args = Args::try_parse_from(argv).expect("arguments");
    let report = herald_bench::run(&args).await.expect("run");
    eprintln!("{report}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_publishers_spread_over_nodes_get_everything_once() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    for (scenario, rate) in [("unicast", "300"), ("broadcast", "20")] {
        // 100 sessions over 50 users, round-robin over 2 nodes: each user has one session per node.
        let report = bench(
            &[&a, &b],
            scenario,
            &["--sessions", "100", "--users", "50", "--rate", rate],
        )
        .await;
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.connect.connected, 100, "{scenario}");
        let publish = report.publish.as_ref().expect("publish stats");
        let delivery = report.delivery.as_ref().expect("delivery stats");
        assert!(publish.accepted > 0, "{scenario}: nothing published");
        let per_message = if scenario == "broadcast" { 100 } else { 2 };
        assert_eq!(
            delivery.delivered,
            per_message * publish.accepted,
            "{scenario}"
        );
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
