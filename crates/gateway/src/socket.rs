//! The TCP connection under a request: kernel limits set at accept, and cutting the
//! connection under a WebSocket session whose peer stopped reading.
//!
//! actix-web flushes a response to its peer for as long as the peer stays connected.
//! A peer that stopped reading therefore kept an evicted session's socket (and the
//! frames queued for it) open. Both measures here bound that.

use std::any::Any;
use std::net::Shutdown;
use std::sync::Arc;
use std::time::Duration;

use actix_web::HttpRequest;
use actix_web::dev::Extensions;
use actix_web::rt::net::TcpStream;
use herald_hub::CutConnection;
use socket2::SockRef;

/// A second handle on a connection's socket, kept with the connection so the
/// session upgraded on it can cut it. Closed with the connection.
struct ConnectionSocket(Arc<socket2::Socket>);

/// `HttpServer::on_connect`: limits how long the kernel keeps data a peer does not
/// acknowledge (TCP_USER_TIMEOUT, the heartbeat timeout), and keeps a handle to cut with.
pub fn on_connect(conn: &dyn Any, data: &mut Extensions, stalled_peer_limit: Duration) {
    let Some(tcp) = conn.downcast_ref::<TcpStream>() else {
        return;
    };
    let socket = SockRef::from(tcp);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = socket.set_tcp_user_timeout(Some(stalled_peer_limit)) {
        tracing::debug!(error = %e, "could not set TCP_USER_TIMEOUT");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = stalled_peer_limit;
    match socket.try_clone() {
        Ok(handle) => {
            data.insert(ConnectionSocket(Arc::new(handle)));
        }
        Err(e) => tracing::debug!(error = %e, "no handle to cut this connection with"),
    }
}

/// What the hub calls to drop the connection under `req`'s WebSocket at once.
/// TCP_USER_TIMEOUT alone does not do it for a peer that keeps sending (each of its
/// segments restarts the kernel's zero-window clock).
pub fn cutter(req: &HttpRequest) -> Option<CutConnection> {
    let socket = Arc::clone(&req.conn_data::<ConnectionSocket>()?.0);
    Some(Box::new(move || {
        // Linger 0: the last close resets the connection rather than keep trying to
        // deliver what the peer will never read.
        let _ = socket.set_linger(Some(Duration::ZERO));
        let _ = socket.shutdown(Shutdown::Both);
    }))
}
