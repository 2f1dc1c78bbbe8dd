//! Herald as a child process (the real `herald` binary), for signals: SIGTERM, SIGKILL, restart.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::client::{Publisher, Subscriber};
use crate::server::{API_KEY, JWT_SECRET, subscribe_at};

/// The `herald` binary, built once per test run.
pub fn herald_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf();
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "-p",
                "herald-gateway",
                "--bin",
                "herald",
            ])
            .current_dir(&root)
            .status()
            .expect("cargo build herald");
        assert!(status.success(), "building herald failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("debug").join("herald")
    })
    .clone()
}

pub struct HeraldProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// stderr lines after `listening on`, for tests that read the log.
    pub log: std::sync::mpsc::Receiver<String>,
}

/// How a Herald that refused to start ended.
#[derive(Debug)]
pub struct Exited {
    /// The exit code (None when killed by a signal).
    pub code: Option<i32>,
    /// Everything it wrote to stderr.
    pub log: String,
}

/// `herald serve` with test secrets, its store in `store`, and `env` on top; with
/// `open_files`, under that open-file limit (sh lowers it for itself, then becomes
/// Herald, so the limit is Herald's alone).
fn command(store: &Path, env: &[(&str, &str)], open_files: Option<u64>) -> Command {
    let mut cmd = match open_files {
        None => {
            let mut cmd = Command::new(herald_bin());
            cmd.arg("serve");
            cmd
        }
        Some(limit) => {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", r#"ulimit -n "$1" && exec "$0" serve"#])
                .arg(herald_bin())
                .arg(limit.to_string());
            cmd
        }
    };
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        // Plain text, so tests can search the log.
        .env("NO_COLOR", "1")
        .env(
            "HERALD_CONFIG",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/default.toml"),
        )
        .env("HERALD_SERVER__BIND", "127.0.0.1:0")
        .env("HERALD_SERVER__WORKERS", "2")
        .env("HERALD_STORE__PATH", store)
        .env("HERALD_AUTH__API_KEYS", API_KEY)
        .env("HERALD_AUTH__JWT_SECRET", JWT_SECRET)
        .env("HERALD_HEARTBEAT__INTERVAL_MS", "1000")
        .env("HERALD_HEARTBEAT__TIMEOUT_MS", "5000");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

impl HeraldProcess {
    /// Starts `herald serve` with test secrets, its store in `store`, and `env` on top.
    pub fn start(store: &Path, env: &[(&str, &str)]) -> Self {
        Self::spawn(command(store, env, None))
    }

    /// A Herald that may hold at most `limit` open files (sockets included).
    pub fn start_with_open_files(store: &Path, env: &[(&str, &str)], limit: u64) -> Self {
        Self::spawn(command(store, env, Some(limit)))
    }

    fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn herald");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let addr = loop {
            let line = log
                .recv_timeout(Duration::from_secs(30))
                .expect("herald printed `listening on` in time");
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                break addr
                    .parse()
                    .unwrap_or_else(|_| panic!("address in {line:?}"));
            }
        };
        Self { child, addr, log }
    }

    /// Runs `herald serve` expecting it to refuse to start; panics if it starts listening.
    pub fn start_fails(store: &Path, env: &[(&str, &str)]) -> Exited {
        let mut child = command(store, env, None)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn herald");
        let mut stderr = child.stderr.take().expect("stderr");
        // Read stderr to its end on a thread, so a Herald that does start cannot hang the test.
        let reader = std::thread::spawn(move || {
            let mut log = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut log);
            log
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("herald kept running: {}", reader.join().unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = reader.join().expect("stderr reader");
        assert!(
            !log.contains("listening on"),
            "herald started although it should not have:\n{log}"
        );
        Exited {
            code: status.code(),
            log,
        }
    }

    /// An HTTP client with the test API key.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.base_url(), Some(API_KEY.into()))
    }

    /// A subscriber of `user` resuming after `since` (live only with None).
    pub async fn subscribe(&self, user: &str, since: Option<u64>) -> Subscriber {
        subscribe_at(self.addr, user, since).await
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal}");
    }

    /// Waits for the process to exit; answers its exit code (None when killed by a signal).
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "herald did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for HeraldProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
