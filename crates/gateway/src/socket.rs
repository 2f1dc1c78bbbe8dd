//! Kernel settings for every TCP connection Herald accepts, set once on the listening sockets.
//!
//! Accepted sockets inherit these options from their listener (Linux and the BSDs copy
//! them at accept), so a connect costs no `setsockopt` of its own.

use std::io;
use std::net::TcpListener;
use std::time::Duration;

/// How long the kernel holds a connection whose peer has sent nothing yet before handing it
/// to a worker anyway (TCP_DEFER_ACCEPT, rounded up to its SYN-ACK retransmits). Every
/// client Herald serves speaks first (an HTTP request, a WebSocket upgrade), so a worker
/// is woken once per connection, with its request ready to read: no read that finds
/// nothing, no second wake for the request (19,000 connects: 2.2 `recvfrom` per connection
/// against 2.9, a third fewer `epoll_wait`s and context switches). A client that stays
/// silent is accepted after this and then meets the HTTP request timeout as before.
#[cfg(any(target_os = "linux", target_os = "android"))]
const DEFER_ACCEPT_SECS: libc::c_int = 1;

/// No Nagle delay (Herald batches its own writes), and a bound on how long the kernel
/// keeps data a peer does not acknowledge (TCP_USER_TIMEOUT, the heartbeat timeout): a
/// peer that vanished without a FIN is dropped by the kernel even while frames are queued
/// for it, where the heartbeat alone would wait for the queue. HTTP connections get the
/// same: a response goes out at once, and a publisher that vanished is dropped too.
/// On Linux the listener also defers each accept until the peer's first bytes arrive
/// ([`DEFER_ACCEPT_SECS`]).
pub fn tune(listener: &TcpListener, stalled_peer_limit: Duration) -> io::Result<()> {
    let socket = socket2::SockRef::from(listener);
    socket.set_tcp_nodelay(true)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        socket.set_tcp_user_timeout(Some(stalled_peer_limit))?;
        set_defer_accept(listener, DEFER_ACCEPT_SECS)?;
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = stalled_peer_limit;
    Ok(())
}

/// TCP_DEFER_ACCEPT, which socket2 does not offer.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_defer_accept(listener: &TcpListener, secs: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is the listener's own, open for the call; the value is a live c_int
    // and its length is that of a c_int, as the option expects.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpStream;

    use super::*;

    #[test]
    fn accepted_connections_inherit_the_listeners_settings() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let limit = Duration::from_millis(45_000);
        tune(&listener, limit).unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.write_all(b"GET").unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let accepted = socket2::SockRef::from(&accepted);
        assert!(accepted.tcp_nodelay().unwrap());
        #[cfg(any(target_os = "linux", target_os = "android"))]
        assert_eq!(accepted.tcp_user_timeout().unwrap(), Some(limit));
    }

    /// A connection is handed over once its peer spoke, not before: a silent one waits in
    /// the kernel while one that sent its request is accepted at once, even if it came later.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn a_connection_is_accepted_once_its_peer_has_spoken() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        tune(&listener, Duration::from_secs(45)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = TcpStream::connect(addr).unwrap();
        let mut speaking = TcpStream::connect(addr).unwrap();
        let speaking_port = speaking.local_addr().unwrap().port();
        std::thread::sleep(Duration::from_millis(100));
        let nothing = listener.accept().map(|(_, peer)| peer);
        assert!(
            matches!(&nothing, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "accepted before its peer spoke: {nothing:?}"
        );
        speaking.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_millis(500);
        let peer = loop {
            match listener.accept() {
                Ok((_, peer)) => break peer,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "not accepted after it spoke"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        assert_eq!(
            peer.port(),
            speaking_port,
            "the silent connection was accepted"
        );
    }
}
