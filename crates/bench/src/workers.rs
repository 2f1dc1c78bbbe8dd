//! Subscribers beyond one process's open-file limit: worker processes of this binary, each
//! holding a slice of the sessions, driven over stdin/stdout JSON lines and summed.

use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::subscribers::{ConnectStats, Expected, Group, GroupResult, GroupSpec};

/// The hidden flag that turns `herald-bench` into a worker.
pub const WORKER_FLAG: &str = "--worker";

#[derive(Serialize, Deserialize)]
struct DrainOrder {
    expected: Expected,
    drain_ms: u64,
}

/// The sessions of one run, in this process or spread over workers.
pub enum Subscribers {
    Local(Group),
    Remote(Vec<Worker>),
}

pub struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Subscribers {
    /// Connects `spec`'s sessions, in `ceil(n / max_per_process)` processes when more than one is needed.
    pub async fn connect(
        spec: GroupSpec,
        max_per_process: usize,
    ) -> Result<(Self, ConnectStats, usize), String> {
        let total = spec.end - spec.first;
        let processes = total.div_ceil(max_per_process.max(1)).max(1);
        if processes == 1 {
            let (group, stats) = Group::connect(spec).await;
            return Ok((Subscribers::Local(group), stats, 1));
        }
        let chunk = total.div_ceil(processes);
        let mut workers = Vec::with_capacity(processes);
        for k in 0..processes {
            let mut slice = spec.clone();
            slice.first = spec.first + k * chunk;
            slice.end = (slice.first + chunk).min(spec.end);
            workers.push(Worker::spawn(&slice).await?);
        }
        let mut stats = ConnectStats::default();
        for worker in &mut workers {
            let part: ConnectStats = worker.read().await?;
            stats.add(&part);
        }
        Ok((Subscribers::Remote(workers), stats, processes))
    }

    /// Waits until the sessions hold what `expected` says, or `drain` passes.
    pub async fn drain(&mut self, expected: &Expected, drain: Duration) -> Result<(), String> {
        match self {
            Subscribers::Local(group) => {
                group.drain(expected, drain).await;
                Ok(())
            }
            Subscribers::Remote(workers) => {
                let order = DrainOrder {
                    expected: expected.clone(),
                    drain_ms: drain.as_millis() as u64,
                };
                for worker in workers.iter_mut() {
                    worker.write(&order).await?;
                }
                for worker in workers.iter_mut() {
                    let _: bool = worker.read().await?;
                }
                Ok(())
            }
        }
    }

    /// Closes every session and answers what they saw.
    pub async fn finish(self, expected: &Expected) -> Result<GroupResult, String> {
        match self {
            Subscribers::Local(group) => Ok(group.finish(expected).await),
            Subscribers::Remote(workers) => {
                let mut total = GroupResult::default();
                for mut worker in workers {
                    worker.write(&true).await?;
                    let part: GroupResult = worker.read().await?;
                    total.add(&part);
                    let _ = worker.child.wait().await;
                }
                Ok(total)
            }
        }
    }
}

impl Worker {
    async fn spawn(spec: &GroupSpec) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .arg(WORKER_FLAG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawn worker: {e}"))?;
        let stdin = child.stdin.take().ok_or("worker stdin")?;
        let stdout = child.stdout.take().ok_or("worker stdout")?;
        let mut worker = Worker {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        };
        worker.write(spec).await?;
        Ok(worker)
    }

    async fn write<T: Serialize>(&mut self, value: &T) -> Result<(), String> {
        let mut line = serde_json::to_string(value).map_err(|e| e.to_string())?;
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("worker stdin: {e}"))
    }

    async fn read<T: for<'de> Deserialize<'de>>(&mut self) -> Result<T, String> {
        let line = self
            .lines
            .next_line()
            .await
            .map_err(|e| format!("worker stdout: {e}"))?
            .ok_or("worker exited early")?;
        serde_json::from_str(&line).map_err(|e| format!("worker said {line:?}: {e}"))
    }
}

/// The worker side: spec in, connect stats out, drain order in, `true` out, finish in, result out.
pub async fn worker_main() -> Result<(), String> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    let spec: GroupSpec = read_line(&mut lines).await?;
    let (group, stats) = Group::connect(spec).await;
    write_line(&mut stdout, &stats).await?;
    let order: DrainOrder = read_line(&mut lines).await?;
    group
        .drain(&order.expected, Duration::from_millis(order.drain_ms))
        .await;
    write_line(&mut stdout, &true).await?;
    let _: bool = read_line(&mut lines).await?;
    let result = group.finish(&order.expected).await;
    write_line(&mut stdout, &result).await
}

async fn read_line<T: for<'de> Deserialize<'de>>(
    lines: &mut Lines<BufReader<tokio::io::Stdin>>,
) -> Result<T, String> {
    let line = lines
        .next_line()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("parent closed stdin")?;
    serde_json::from_str(&line).map_err(|e| e.to_string())
}

async fn write_line<T: Serialize>(out: &mut tokio::io::Stdout, value: &T) -> Result<(), String> {
    let mut line = serde_json::to_string(value).map_err(|e| e.to_string())?;
    line.push('\n');
    out.write_all(line.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    out.flush().await.map_err(|e| e.to_string())
}
