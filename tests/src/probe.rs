//! Watching the server from outside: waiting for a condition, reading this process's memory.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

/// Polls `check` every 20 ms until it holds; answers how long that took.
/// Panics with `what` when it still does not hold after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// This process's resident set size in bytes (`VmRSS` of /proc/self/status).
/// The in-process server lives here too, so this is the server's memory plus the test's.
pub fn rss_bytes() -> u64 {
    rss_bytes_of(std::process::id())
}

/// Another process's resident set size in bytes, e.g. a `HeraldProcess`'s.
pub fn rss_bytes_of(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("a process status file");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// The kernel's TCP state of the server's end of the connection from `client`
/// (`/proc/net/tcp`, IPv4 loopback): e.g. `1` established, `4` FIN-WAIT-1, `7` closed;
/// None when the kernel holds no such socket any more. Shows whether the server
/// really let go of a socket even while its peer never reads.
pub fn server_socket_state(server: SocketAddr, client: SocketAddr) -> Option<u8> {
    let hex = |addr: SocketAddr| match addr {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => panic!("tests run on IPv4 loopback"),
    };
    let (local, remote) = (hex(server), hex(client));
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace().skip(1);
        let (l, r, state) = (fields.next()?, fields.next()?, fields.next()?);
        (l == local && r == remote).then(|| u8::from_str_radix(state, 16).ok())?
    })
}

/// `/proc/net/tcp`'s number for an established connection.
pub const TCP_ESTABLISHED: u8 = 1;
