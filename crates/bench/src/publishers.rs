//! Publishers: a small pool of keep-alive HTTP/1.1 connections (hyper), each with one request
//! in flight, at the maximum rate or paced to a fixed rate, counting every status.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::latency::unix_micros;
use crate::subscribers::Expected;
use crate::template::{Fill, Template};

/// Where a publish goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fanout {
    /// One random user per publish.
    Unicast,
    /// `n` distinct random users per publish.
    Multicast(usize),
    /// Every session.
    Broadcast,
}

#[derive(Debug, Clone)]
pub struct PublishPlan {
    pub fanout: Fanout,
    /// `http://host:port/path` templates; connection k sends to `urls[k % n]`.
    pub urls: Vec<String>,
    pub body: String,
    pub headers: Vec<(String, String)>,
    pub user_prefix: String,
    pub users: usize,
    /// Publishes per second in total; None: as fast as the connections go.
    pub rate: Option<f64>,
    pub duration: Duration,
    pub connections: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PublishResult {
    pub sent: u64,
    pub accepted: u64,
    /// Status code (or "error" for transport failures) -> count.
    pub statuses: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    pub secs: f64,
    /// Unix micros when publishing began.
    pub started_us: u64,
    #[serde(skip)]
    pub expected: Expected,
}

/// One publish endpoint: where to connect and the path to fill.
struct Endpoint {
    authority: String,
    path: Template,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        Ok(Self {
            authority: authority.to_string(),
            path: Template::parse(path),
        })
    }
}

struct Shared {
    plan: PublishPlan,
    body: Template,
    next_id: AtomicU64,
    per_user: Vec<AtomicU64>,
    all: AtomicU64,
    statuses: Mutex<BTreeMap<String, u64>>,
    first_error: Mutex<Option<String>>,
    start: Instant,
    start_us: u64,
}

/// Runs the plan to its end and answers what the hub acknowledged.
pub async fn publish(plan: PublishPlan) -> Result<PublishResult, String> {
    let endpoints = plan
        .urls
        .iter()
        .map(|url| Endpoint::parse(url).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    if endpoints.is_empty() {
        return Err("no publish URL".into());
    }
    let shared = Arc::new(Shared {
        body: Template::parse(&plan.body),
        next_id: AtomicU64::new(1),
        per_user: (0..plan.users).map(|_| AtomicU64::new(0)).collect(),
        all: AtomicU64::new(0),
        statuses: Mutex::new(BTreeMap::new()),
        first_error: Mutex::new(None),
        start: Instant::now(),
        start_us: unix_micros(),
        plan,
    });
    let workers: Vec<_> = (0..shared.plan.connections.max(1))
        .map(|k| {
            let endpoint = endpoints[k % endpoints.len()].clone();
            tokio::spawn(connection_loop(shared.clone(), endpoint))
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    let statuses = shared
        .statuses
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    let accepted = statuses
        .iter()
        .filter(|(code, _)| code.starts_with('2'))
        .map(|(_, n)| n)
        .sum();
    Ok(PublishResult {
        sent: statuses.values().sum(),
        accepted,
        statuses,
        first_error: shared.first_error.lock().ok().and_then(|e| e.clone()),
        secs: shared.start.elapsed().as_secs_f64(),
        started_us: shared.start_us,
        expected: Expected {
            per_user: shared
                .per_user
                .iter()
                .map(|n| n.load(Ordering::Acquire))
                .collect(),
            all: shared.all.load(Ordering::Acquire),
        },
    })
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn open(authority: &str) -> Result<Sender, String> {
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect {authority}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn connection_loop(shared: Arc<Shared>, endpoint: Arc<Endpoint>) {
    let plan = &shared.plan;
    let end = shared.start + plan.duration;
    let mut sender: Option<Sender> = None;
    let mut targets: Vec<usize> = Vec::new();
    loop {
        let id = shared.next_id.fetch_add(1, Ordering::AcqRel);
        // Fixed rate: message `id` is due at start + (id-1)/rate. Its timestamp is that due
        // time, not the moment it left, so a stalled hub cannot hide its backlog
        // (coordinated omission).
        let ts = match plan.rate {
            Some(rate) => {
                let due = shared.start + Duration::from_secs_f64((id - 1) as f64 / rate);
                if due >= end {
                    return;
                }
                tokio::time::sleep_until(due.into()).await;
                shared.start_us + (due - shared.start).as_micros() as u64
            }
            None => {
                if Instant::now() >= end {
                    return;
                }
                unix_micros()
            }
        };
        pick_targets(plan, &mut targets);
        let status = match send(&shared, &endpoint, &mut sender, &targets, ts, id).await {
            Ok(status) => status.to_string(),
            Err(e) => {
                sender = None;
                if let Ok(mut first) = shared.first_error.lock() {
                    first.get_or_insert(e);
                }
                // A hub that refuses connections must not turn this loop into a spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                "error".to_string()
            }
        };
        if status.starts_with('2') {
            match plan.fanout {
                Fanout::Broadcast => {
                    shared.all.fetch_add(1, Ordering::AcqRel);
                }
                _ => {
                    for user in &targets {
                        shared.per_user[*user].fetch_add(1, Ordering::AcqRel);
                    }
                }
            }
        }
        if let Ok(mut statuses) = shared.statuses.lock() {
            *statuses.entry(status).or_default() += 1;
        }
    }
}

fn pick_targets(plan: &PublishPlan, targets: &mut Vec<usize>) {
    targets.clear();
    let users = plan.users.max(1);
    let mut rng = rand::rng();
    match plan.fanout {
        Fanout::Broadcast => {}
        Fanout::Unicast => targets.push(rng.random_range(0..users)),
        Fanout::Multicast(n) => {
            targets.extend(rand::seq::index::sample(&mut rng, users, n.min(users)).iter())
        }
    }
}

async fn send(
    shared: &Shared,
    endpoint: &Endpoint,
    sender: &mut Option<Sender>,
    targets: &[usize],
    ts: u64,
    id: u64,
) -> Result<u16, String> {
    let plan = &shared.plan;
    let user = targets
        .first()
        .map(|u| format!("{}{u}", plan.user_prefix))
        .unwrap_or_default();
    let users = if matches!(plan.fanout, Fanout::Multicast(_)) {
        let names: Vec<String> = targets
            .iter()
            .map(|u| format!("\"{}{u}\"", plan.user_prefix))
            .collect();
        format!("[{}]", names.join(","))
    } else {
        String::new()
    };
    let fill = Fill {
        user: &user,
        users: &users,
        ts,
        id,
    };
    let mut request = Request::post(endpoint.path.render(&fill))
        .header(hyper::header::HOST, &endpoint.authority)
        .header(hyper::header::CONTENT_TYPE, "application/json");
    for (name, value) in &plan.headers {
        request = request.header(name, value);
    }
    let request = request
        .body(Full::new(Bytes::from(shared.body.render(&fill))))
        .map_err(|e| e.to_string())?;
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        *sender = Some(open(&endpoint.authority).await?);
    }
    let Some(conn) = sender.as_mut() else {
        return Err("no connection".into());
    };
    conn.ready().await.map_err(|e| e.to_string())?;
    let response = conn
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    // Read the whole answer so the connection is ready for the next request.
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(status)
}

/// Parses `Name: value` header arguments.
pub fn parse_header(arg: &str) -> Result<(String, String), String> {
    let (name, value) = arg
        .split_once(':')
        .ok_or_else(|| format!("header {arg:?} is not `Name: value`"))?;
    Ok((name.trim().to_string(), value.trim().to_string()))
}

/// Gives `Expected` a per-user vector of the right size even when nothing was published.
pub fn nothing_expected(users: usize) -> Expected {
    Expected {
        per_user: vec![0; users],
        all: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_headers() {
        assert_eq!(
            parse_header("Authorization: Bearer k:1").unwrap(),
            ("Authorization".into(), "Bearer k:1".into())
        );
        assert!(parse_header("nocolon").is_err());
    }
}
