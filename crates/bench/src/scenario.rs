//! One run: connect the sessions, drive the scenario, read the server from /proc, and report.

use std::time::Duration;

use crate::churn::{ChurnPlan, churn};
use crate::cli::{Args, Scenario};
use crate::procfs::{PeakRss, ProcSample, sample};
use crate::publishers::{
    Fanout, PublishPlan, PublishResult, nothing_expected, parse_header, publish,
};
use crate::report::{
    ChurnSummary, ConnectSummary, DeliverySummary, PublishSummary, Report, ServerSummary,
    StalledSummary,
};
use crate::subscribers::{Expected, GroupSpec};
use crate::workers::Subscribers;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid arguments: {0}")]
    Args(String),
    #[error("publishers: {0}")]
    Publish(String),
    #[error("worker processes: {0}")]
    Workers(String),
}

/// Runs the scenario `args` describes against the hub it points at.
pub async fn run(args: &Args) -> Result<Report, BenchError> {
    if args.scenario == Scenario::Churn {
        return run_churn(args).await;
    }
    let headers = args
        .headers
        .iter()
        .map(|h| parse_header(h))
        .collect::<Result<Vec<_>, _>>()
        .map_err(BenchError::Args)?;
    let users = args.users();
    let broadcasting = matches!(args.scenario, Scenario::Broadcast | Scenario::Stalled);
    let sub_urls = if broadcasting && !args.broadcast_sub_url.is_empty() {
        args.broadcast_sub_url.clone()
    } else {
        args.sub_url.clone()
    };
    let stalled = if args.scenario == Scenario::Stalled {
        args.stalled.min(args.sessions)
    } else {
        0
    };
    let spec = GroupSpec {
        urls: sub_urls.clone(),
        user_prefix: args.user_prefix.clone(),
        users,
        first: 0,
        end: args.sessions,
        stalled,
        greeting: args.greeting,
        source_base: args.source_base,
        per_source: args.per_source,
        connect_concurrency: args.connect_concurrency,
        evict_wait_ms: (args.evict_wait * 1000.0) as u64,
        timeline_ms: args.timeline,
    };
    let pids = &args.server_pids;
    let baseline = sample(pids);
    let (mut subscribers, connect, processes) = Subscribers::connect(spec, args.max_per_process)
        .await
        .map_err(BenchError::Workers)?;
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let connected = sample(pids);
    let peak = PeakRss::start(pids.clone());
    let cpu_start = sample(pids);
    let measured_from = std::time::Instant::now();

    let fanout = match args.scenario {
        Scenario::Unicast => Some((Fanout::Unicast, &args.pub_url, &args.body)),
        Scenario::Multicast => Some((
            Fanout::Multicast(args.multicast_size),
            &args.multicast_url,
            &args.multicast_body,
        )),
        Scenario::Broadcast | Scenario::Stalled => {
            Some((Fanout::Broadcast, &args.broadcast_url, &args.broadcast_body))
        }
        Scenario::Idle | Scenario::Churn => None,
    };
    let published: Option<PublishResult> = match fanout {
        Some((fanout, url, body)) => Some(
            publish(PublishPlan {
                fanout,
                urls: url.clone(),
                body: body.clone(),
                headers,
                user_prefix: args.user_prefix.clone(),
                users,
                rate: args.rate(),
                duration: Duration::from_secs_f64(args.duration),
                connections: args.publishers,
            })
            .await
            .map_err(BenchError::Publish)?,
        ),
        None => {
            tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
            None
        }
    };
    let expected: Expected = published
        .as_ref()
        .map(|p| p.expected.clone())
        .unwrap_or_else(|| nothing_expected(users));
    subscribers
        .drain(&expected, Duration::from_secs_f64(args.drain))
        .await
        .map_err(BenchError::Workers)?;
    let cpu_end = sample(pids);
    let measured_secs = measured_from.elapsed().as_secs_f64();
    let seen = subscribers
        .finish(&expected)
        .await
        .map_err(BenchError::Workers)?;
    let rss_peak = peak.stop();
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let end = sample(pids);

    let mut report = Report {
        scenario: args.scenario.name().into(),
        subscribe_url: sub_urls.join(" "),
        sessions: args.sessions,
        users,
        processes,
        duration_secs: args.duration,
        rate: args.rate(),
        connect: ConnectSummary {
            attempted: connect.attempted,
            connected: connect.connected,
            failed: connect.failed,
            per_sec: connect.connected as f64 / connect.secs.max(1e-9),
            first_error: connect.first_error.clone(),
        },
        ..Default::default()
    };
    if connect.failed > 0 {
        report.problems.push(format!(
            "{} of {} sessions failed to connect: {}",
            connect.failed,
            connect.attempted,
            connect.first_error.as_deref().unwrap_or("?")
        ));
    }
    if let Some(p) = &published {
        let rejected = p.sent - p.accepted;
        if rejected > 0 {
            report.problems.push(format!(
                "{rejected} of {} publishes were not accepted: {:?}",
                p.sent, p.statuses
            ));
        }
        // From the first publish to the last delivery: a hub that falls behind pays here.
        let delivering_secs =
            (seen.last_delivery_us.saturating_sub(p.started_us) as f64 / 1e6).max(1e-3);
        report.publish = Some(PublishSummary {
            sent: p.sent,
            accepted: p.accepted,
            per_sec: p.sent as f64 / p.secs.max(1e-9),
            statuses: p.statuses.clone(),
            first_error: p.first_error.clone(),
        });
        report.delivery = Some(DeliverySummary {
            delivered: seen.delivered,
            per_sec: seen.delivered as f64 / delivering_secs,
            missing: seen.missing,
            duplicates: seen.duplicates,
            unexpected: seen.unexpected,
            dropped: seen.dropped,
        });
        report.latency_us = Some(seen.latency.quantiles());
        report.timeline = seen.timeline.slices(p.started_us);
        for (what, n) in [
            ("missing", seen.missing),
            ("duplicate", seen.duplicates),
            ("unexpected", seen.unexpected),
        ] {
            if n > 0 {
                report.problems.push(format!("{n} {what} deliveries"));
            }
        }
    }
    if seen.dropped > 0 {
        report.problems.push(format!(
            "{} reading sessions were closed by the hub",
            seen.dropped
        ));
    }
    if args.scenario == Scenario::Stalled {
        report.stalled = Some(StalledSummary {
            stalled: seen.stalled,
            evicted: seen.stalled_evicted,
        });
        if seen.stalled_evicted < seen.stalled {
            report.problems.push(format!(
                "{} of {} stalled sessions were not evicted",
                seen.stalled - seen.stalled_evicted,
                seen.stalled
            ));
        }
    }
    report.server = server_summary(
        baseline,
        connected,
        rss_peak,
        end,
        (cpu_start, cpu_end, measured_secs),
        connect.connected,
        report.delivery.as_ref().map(|d| d.delivered),
    );
    Ok(report)
}

fn server_summary(
    baseline: Option<ProcSample>,
    connected: Option<ProcSample>,
    rss_peak: u64,
    end: Option<ProcSample>,
    (cpu_start, cpu_end, secs): (Option<ProcSample>, Option<ProcSample>, f64),
    connections: usize,
    delivered: Option<u64>,
) -> Option<ServerSummary> {
    let (baseline, connected, end, cpu_start, cpu_end) =
        (baseline?, connected?, end?, cpu_start?, cpu_end?);
    let cpu_secs = cpu_end.cpu_secs_since(&cpu_start);
    Some(ServerSummary {
        rss_baseline_kib: baseline.rss_kib,
        rss_connected_kib: connected.rss_kib,
        rss_peak_kib: rss_peak.max(connected.rss_kib),
        rss_end_kib: end.rss_kib,
        rss_per_connection_bytes: (connections > 0).then(|| {
            (connected.rss_kib as f64 - baseline.rss_kib as f64) * 1024.0 / connections as f64
        }),
        cpu_secs,
        cpu_pct_of_core: 100.0 * cpu_secs / secs.max(1e-9),
        cpu_us_per_delivered: delivered
            .filter(|d| *d > 0)
            .map(|d| cpu_secs * 1e6 / d as f64),
    })
}

async fn run_churn(args: &Args) -> Result<Report, BenchError> {
    let rate = args
        .rate()
        .ok_or_else(|| BenchError::Args("churn needs --rate (connects per second)".into()))?;
    let pids = &args.server_pids;
    let plan = |secs: f64| ChurnPlan {
        urls: args.sub_url.clone(),
        user_prefix: args.user_prefix.clone(),
        users: args.users(),
        rate,
        duration: Duration::from_secs_f64(secs),
        pool: args.sessions,
        greeting: args.greeting,
        source_base: args.source_base,
        per_source: args.per_source,
    };
    let mut warmup_failed = 0;
    if args.warmup > 0.0 {
        warmup_failed = churn(plan(args.warmup)).await.failed;
        tokio::time::sleep(Duration::from_secs_f64(args.settle.max(1.0))).await;
    }
    let baseline = sample(pids);
    let peak = PeakRss::start(pids.clone());
    let result = churn(plan(args.duration)).await;
    let cpu_end = sample(pids);
    let rss_peak = peak.stop();
    tokio::time::sleep(Duration::from_secs_f64(args.settle.max(1.0))).await;
    let end = sample(pids);
    let mut report = Report {
        scenario: args.scenario.name().into(),
        subscribe_url: args.sub_url.join(" "),
        sessions: args.sessions,
        users: args.users(),
        processes: 1,
        duration_secs: args.duration,
        rate: Some(rate),
        connect: ConnectSummary {
            attempted: result.attempted as usize,
            connected: result.connected as usize,
            failed: result.failed as usize,
            per_sec: result.connected as f64 / args.duration.max(1e-9),
            first_error: result.first_error.clone(),
        },
        churn: Some(ChurnSummary {
            attempted: result.attempted,
            connected: result.connected,
            failed: result.failed,
            dropped: result.dropped,
            closed_clean: result.closed_clean,
            connects_per_sec: result.connected as f64 / args.duration.max(1e-9),
            connect_latency_us: result.connect_latency.quantiles(),
        }),
        ..Default::default()
    };
    if result.failed > 0 {
        report.problems.push(format!(
            "{} of {} connects failed: {}",
            result.failed,
            result.attempted,
            result.first_error.as_deref().unwrap_or("?")
        ));
    }
    if warmup_failed > 0 {
        report.problems.push(format!(
            "{warmup_failed} connects failed during the warm-up"
        ));
    }
    if result.dropped > 0 {
        report.problems.push(format!(
            "{} sessions were closed by the hub",
            result.dropped
        ));
    }
    if let (Some(baseline), Some(cpu_end), Some(end)) = (baseline, cpu_end, end) {
        let cpu_secs = cpu_end.cpu_secs_since(&baseline);
        report.server = Some(ServerSummary {
            rss_baseline_kib: baseline.rss_kib,
            rss_connected_kib: rss_peak,
            rss_peak_kib: rss_peak,
            rss_end_kib: end.rss_kib,
            rss_per_connection_bytes: None,
            cpu_secs,
            cpu_pct_of_core: 100.0 * cpu_secs / result.secs.max(1e-9),
            cpu_us_per_delivered: None,
        });
    }
    Ok(report)
}
