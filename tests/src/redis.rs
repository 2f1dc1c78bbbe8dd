//! A real redis-server for cluster tests: free loopback port, its own temp dir, stoppable and restartable.
//!
//! Persistence is `appendonly yes` with `appendfsync always`: Redis fsyncs every
//! write before it replies, so an append acknowledged to Herald (and by Herald
//! with 202) survives even a SIGKILL of Redis. `everysec` would lose up to a
//! second of acknowledged publishes on a crash.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herald_gateway::Settings;
use herald_gateway::settings::EngineKind;

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts redis-server; fails with a clear message when it is not installed
    /// (scripts/test installs it).
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut redis = Self {
            child: None,
            port,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        redis.run();
        redis
    }

    fn run(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}): the cluster tests need it; \
                     scripts/test installs it (apt-get install -y redis-server)"
                )
            });
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if ping(self.port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills Redis hard (SIGKILL: no goodbye, no final flush) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A frozen process still dies of SIGKILL; thaw it anyway so it exits at once.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes Redis (SIGSTOP): connections stay open but nothing answers, like a hung host.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// Thaws a frozen Redis (SIGCONT).
    pub fn thaw(&self) {
        self.signal("CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis is running");
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} redis-server");
    }

    /// Starts Redis again on the same port and data folder.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }

    /// Settings tweak: this node uses the Redis engine here, with test-sized timeouts.
    pub fn engine(&self, settings: &mut Settings) {
        settings.engine.kind = EngineKind::Redis;
        settings.engine.redis_url = self.url();
        settings.engine.redis_timeout_ms = TIMEOUT_MS;
        settings.engine.presence_ttl_ms = PRESENCE_TTL_MS;
    }

    /// The same as environment variables, for `HeraldProcess`.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("HERALD_ENGINE__KIND".into(), "redis".into()),
            ("HERALD_ENGINE__REDIS_URL".into(), self.url()),
            (
                "HERALD_ENGINE__REDIS_TIMEOUT_MS".into(),
                TIMEOUT_MS.to_string(),
            ),
            (
                "HERALD_ENGINE__PRESENCE_TTL_MS".into(),
                PRESENCE_TTL_MS.to_string(),
            ),
        ]
    }
}

impl RedisServer {
    /// Runs one command (RESP over a plain socket) and answers the raw reply.
    pub fn command(&self, args: &[&str]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        s.write_all(request.as_bytes()).expect("send command");
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).expect("read reply");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

/// Redis calls in tests give up after this long.
pub const TIMEOUT_MS: u64 = 1000;
/// A dead test node's sessions stop counting after this long.
pub const PRESENCE_TTL_MS: u64 = 3000;

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
