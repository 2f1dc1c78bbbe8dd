//! Kernel settings for a WebSocket's TCP connection.

use std::time::Duration;

use actix_web::rt::net::TcpStream;

/// No Nagle delay (Herald batches its own writes), and a bound on how long the kernel
/// keeps data a peer does not acknowledge (TCP_USER_TIMEOUT, the heartbeat timeout): a
/// peer that vanished without a FIN is dropped by the kernel even while frames are queued
/// for it, where the heartbeat alone would wait for the queue.
pub fn tune(stream: &TcpStream, stalled_peer_limit: Duration) {
    let _ = stream.set_nodelay(true);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(stalled_peer_limit)) {
        tracing::debug!(error = %e, "could not set TCP_USER_TIMEOUT");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = stalled_peer_limit;
}
