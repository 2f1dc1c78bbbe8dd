//! When the peer's TCP last acknowledged anything, as the kernel keeps it (Linux `TCP_INFO`).

use std::time::Duration;

use tokio::net::TcpStream;

/// Milliseconds since the last ACK arrived on `socket`: a sign of the peer's host and
/// socket that costs no frame. `None` off Linux or when the kernel refuses.
#[cfg(target_os = "linux")]
pub(crate) fn last_ack_age(socket: &TcpStream) -> Option<Duration> {
    use std::os::fd::AsRawFd;

    // SAFETY: `tcp_info` is plain integers, so all zeros is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes and the kernel writes at most `len`;
    // the descriptor stays open while `socket` is borrowed.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    let filled =
        std::mem::offset_of!(libc::tcp_info, tcpi_last_ack_recv) + std::mem::size_of::<u32>();
    (rc == 0 && len as usize >= filled)
        .then(|| Duration::from_millis(info.tcpi_last_ack_recv.into()))
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn last_ack_age(_: &TcpStream) -> Option<Duration> {
    None
}
