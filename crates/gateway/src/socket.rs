//! The TCP connection under a request: kernel limits set at accept, and cutting the
//! connection under a WebSocket session whose peer stopped reading.
//!
//! actix-web flushes a response to its peer for as long as the peer stays connected.
//! A peer that stopped reading therefore kept an evicted session's socket (and the
//! frames queued for it) open. Both measures here bound that.

use std::any::Any;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::HttpRequest;
use actix_web::dev::Extensions;
use actix_web::rt::net::TcpStream;
use herald_hub::CutConnection;
use socket2::SockRef;

/// The connection's socket, by number, and whether the connection still owns it.
///
/// Not a duplicated descriptor: that would cost every connection a second file
/// descriptor, and the process limit is what bounds how many connections a node holds.
struct ConnectionSocket {
    fd: RawFd,
    open: Arc<AtomicBool>,
}

impl Drop for ConnectionSocket {
    /// Runs when actix drops the connection (its data lives exactly as long), so a
    /// later cut never touches a descriptor number the kernel has handed to someone else.
    fn drop(&mut self) {
        self.open.store(false, Ordering::Relaxed);
    }
}

/// `HttpServer::on_connect`: limits how long the kernel keeps data a peer does not
/// acknowledge (TCP_USER_TIMEOUT, the heartbeat timeout), and remembers the socket to cut.
pub fn on_connect(conn: &dyn Any, data: &mut Extensions, stalled_peer_limit: Duration) {
    let Some(tcp) = conn.downcast_ref::<TcpStream>() else {
        return;
    };
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = SockRef::from(tcp).set_tcp_user_timeout(Some(stalled_peer_limit)) {
        tracing::debug!(error = %e, "could not set TCP_USER_TIMEOUT");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = stalled_peer_limit;
    data.insert(ConnectionSocket {
        fd: tcp.as_raw_fd(),
        open: Arc::new(AtomicBool::new(true)),
    });
}

/// What the hub calls to drop the connection under `req`'s WebSocket at once.
/// TCP_USER_TIMEOUT alone does not do it for a peer that keeps sending (each of its
/// segments restarts the kernel's zero-window clock).
///
/// Must run on the worker thread that owns the connection (the session's arbiter):
/// the connection can then not be dropped between the `open` check and the cut.
pub fn cutter(req: &HttpRequest) -> Option<CutConnection> {
    let socket = req.conn_data::<ConnectionSocket>()?;
    let (fd, open) = (socket.fd, Arc::clone(&socket.open));
    Some(Box::new(move || {
        if !open.load(Ordering::Relaxed) {
            return;
        }
        // SAFETY: `open` is true, so the connection still owns `fd`; it is dropped only
        // on this same thread, never while this closure runs.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = SockRef::from(&fd);
        // Linger 0: the last close resets the connection rather than keep trying to
        // deliver what the peer will never read.
        let _ = socket.set_linger(Some(Duration::ZERO));
        let _ = socket.shutdown(Shutdown::Both);
    }))
}
