//! A throwaway redis-server for unit tests: free loopback port, temp dir, killed on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::RedisConfig;

pub struct TestRedis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TestRedis {
    /// Starts redis-server; fails the test with a clear message when it is not installed.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed; scripts/test installs it (apt-get install redis-server)");
        let redis = Self {
            child,
            port,
            _dir: dir,
        };
        redis.wait_ready();
        redis
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && &buf == b"+PONG\r\n"
                {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }

    /// Engine settings pointing at this Redis, under their own key prefix.
    pub fn config(&self, prefix: &str) -> RedisConfig {
        RedisConfig {
            url: format!("redis://127.0.0.1:{}/0", self.port),
            prefix: prefix.to_owned(),
            timeout: Duration::from_secs(1),
            presence_ttl: Duration::from_secs(3),
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
