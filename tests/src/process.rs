//! Herald as a child process (the real `herald` binary), for signals: SIGTERM, SIGKILL, restart.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::server::{API_KEY, JWT_SECRET};

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

impl HeraldProcess {
    /// Starts `herald serve` with test secrets, its store in `store`, and `env` on top.
    pub fn start(store: &Path, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(herald_bin());
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
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
            .env("HERALD_HEARTBEAT__TIMEOUT_MS", "5000")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn herald");
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
