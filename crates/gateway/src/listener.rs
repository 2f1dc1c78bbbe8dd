//! The listening sockets: one per HTTP worker on the same address (`SO_REUSEPORT`), so the kernel spreads connections over the workers.
//!
//! A socket of its own per worker lets each worker accept on its own thread: no
//! acceptor thread, no hand-off of every accepted connection to another thread.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Connections the kernel queues on one worker's socket before the worker accepts
/// them (actix-server's default). A connect burst fills it faster than a worker drains it.
const BACKLOG: i32 = 2048;

/// The server's address, bound. [`Listener::bind`] makes the first socket; the server
/// adds one per further worker on the same address when it starts.
#[derive(Debug)]
pub struct Listener {
    first: std::net::TcpListener,
    addr: SocketAddr,
}

impl Listener {
    /// Binds `addr`; port 0 picks a free port, which every worker then shares.
    ///
    /// Fails when anything already listens there, as a plain bind would: the address is
    /// first bound once without `SO_REUSEPORT`, so a second Herald started on the same
    /// port does not silently join the first one's group and split its connections.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let addr = {
            let probe = socket(addr)?;
            probe.set_reuse_address(true)?;
            probe.bind(&addr.into())?;
            local_addr(&probe)?
        };
        let first = reuse_port_listener(addr)?;
        Ok(Self { first, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `count` listening sockets on this address, non-blocking: this one and `count - 1`
    /// more. The kernel hands each new connection to one of them.
    pub(crate) fn for_workers(self, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
        let mut listeners = Vec::with_capacity(count);
        listeners.push(self.first);
        for _ in 1..count {
            #[cfg(unix)]
            listeners.push(reuse_port_listener(self.addr)?);
            // No `SO_REUSEPORT`: the workers share the one socket.
            #[cfg(not(unix))]
            listeners.push(listeners[0].try_clone()?);
        }
        Ok(listeners)
    }
}

fn socket(addr: SocketAddr) -> io::Result<Socket> {
    Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
}

fn local_addr(socket: &Socket) -> io::Result<SocketAddr> {
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("bound socket has no IP address"))
}

/// A non-blocking listening socket on `addr` that other sockets with `SO_REUSEPORT` may share.
fn reuse_port_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket(addr)?;
    // Like std's bind: a restart may bind while the last run's connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_share_the_port_that_port_zero_picked() {
        let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr();
        assert_ne!(addr.port(), 0);
        let sockets = listener.for_workers(3).unwrap();
        assert_eq!(sockets.len(), 3);
        for socket in &sockets {
            assert_eq!(socket.local_addr().unwrap(), addr);
        }
    }

    #[test]
    fn a_taken_address_is_refused() {
        let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr();
        let taken = Listener::bind(addr).unwrap_err();
        assert_eq!(taken.kind(), io::ErrorKind::AddrInUse);
        // Also while the workers' sockets listen.
        let _sockets = listener.for_workers(2).unwrap();
        let taken = Listener::bind(addr).unwrap_err();
        assert_eq!(taken.kind(), io::ErrorKind::AddrInUse);
        let plain = std::net::TcpListener::bind(addr).unwrap_err();
        assert_eq!(plain.kind(), io::ErrorKind::AddrInUse);
    }
}
