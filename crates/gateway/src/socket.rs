//! Kernel settings for every TCP connection Herald accepts, set once on the listening sockets.
//!
//! Accepted sockets inherit these options from their listener (Linux and the BSDs copy
//! them at accept), so a connect costs no `setsockopt` of its own.

use std::io;
use std::net::TcpListener;
use std::time::Duration;

/// No Nagle delay (Herald batches its own writes), and a bound on how long the kernel
/// keeps data a peer does not acknowledge (TCP_USER_TIMEOUT, the heartbeat timeout): a
/// peer that vanished without a FIN is dropped by the kernel even while frames are queued
/// for it, where the heartbeat alone would wait for the queue. HTTP connections get the
/// same: a response goes out at once, and a publisher that vanished is dropped too.
pub fn tune(listener: &TcpListener, stalled_peer_limit: Duration) -> io::Result<()> {
    let socket = socket2::SockRef::from(listener);
    socket.set_tcp_nodelay(true)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket.set_tcp_user_timeout(Some(stalled_peer_limit))?;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = stalled_peer_limit;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;

    use super::*;

    #[test]
    fn accepted_connections_inherit_the_listeners_settings() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let limit = Duration::from_millis(45_000);
        tune(&listener, limit).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let accepted = socket2::SockRef::from(&accepted);
        assert!(accepted.tcp_nodelay().unwrap());
        #[cfg(any(target_os = "linux", target_os = "android"))]
        assert_eq!(accepted.tcp_user_timeout().unwrap(), Some(limit));
    }
}
