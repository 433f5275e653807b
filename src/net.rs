//! Small socket helpers shared by the manager's acceptor and the metrics endpoint.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// Wakes a thread blocked in `accept()` on `listener`, so that it can see it is to stop.
/// On Linux shutting the listener down for reading does it (and later `accept`s fail at
/// once); everywhere, a connection to the listener's own address does it too (a
/// wildcard address is dialled on loopback). Waits at most `timeout` for that connection.
pub(crate) fn wake_acceptor(listener: &TcpListener, timeout: Duration) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: shutdown() on the listener's own open descriptor (borrowed, so alive
        // for the call) takes no pointers and has no memory effects.
        unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RD) };
    }
    let Ok(mut addr) = listener.local_addr() else {
        return;
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    let _ = TcpStream::connect_timeout(&addr, timeout);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_blocked_accept_returns_when_woken() {
        for bind in ["127.0.0.1:0", "0.0.0.0:0"] {
            let listener = std::sync::Arc::new(TcpListener::bind(bind).unwrap());
            let l = listener.clone();
            let (tx, rx) = crossbeam_channel::bounded(1);
            let t = std::thread::spawn(move || {
                let _ = l.accept();
                let _ = tx.send(());
            });
            wake_acceptor(&listener, Duration::from_secs(5));
            rx.recv_deadline(Instant::now() + Duration::from_secs(30))
                .expect("accept() returned");
            t.join().unwrap();
        }
    }
}
