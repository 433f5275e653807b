//! Small socket helpers: waking a thread blocked in `accept()` (the manager's acceptor,
//! the metrics endpoint), waiting on descriptors with `poll(2)`, and a [`Waker`]: one
//! descriptor another thread can make readable to end such a wait.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Wakes a thread blocked in `accept()` on `listener`, so that it can see it is to stop.
/// On Linux shutting the listener down for reading does it (and later `accept`s fail at
/// once); everywhere, a connection to the listener's own address does it too (a
/// wildcard address is dialled on loopback). Waits at most `timeout` for that connection.
pub(crate) fn wake_acceptor(listener: &TcpListener, timeout: Duration) {
    #[cfg(target_os = "linux")]
    {
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

/// A `poll(2)` timeout in milliseconds for the time left until `deadline` (`None`:
/// wait without end), rounded up so that a wait never ends before its deadline.
pub(crate) fn poll_timeout(deadline: Option<Instant>) -> libc::c_int {
    match deadline {
        None => -1,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            let ms = left.as_nanos().div_ceil(1_000_000);
            libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
        }
    }
}

/// `poll(2)` on `fds` until one is ready or `deadline` passes (`None`: no deadline).
/// Returns how many are ready (0 at the deadline); an interrupted wait counts as 0.
pub(crate) fn poll(fds: &mut [libc::pollfd], deadline: Option<Instant>) -> io::Result<usize> {
    // SAFETY: `fds` is a live, exclusively borrowed slice of `fds.len()` pollfd structs,
    // which poll() only reads and writes within.
    let n = unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            poll_timeout(deadline),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

/// A pollfd asking for `events` on `fd`.
pub(crate) fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Waits until `fd` is ready for `events` (or has failed or hung up); false when
/// `deadline` passed first.
pub(crate) fn wait_ready(
    fd: RawFd,
    events: libc::c_short,
    deadline: Option<Instant>,
) -> io::Result<bool> {
    loop {
        let mut fds = [pollfd(fd, events)];
        if poll(&mut fds, deadline)? > 0 {
            return Ok(true);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(false);
        }
    }
}

/// A descriptor that another thread makes readable to wake a thread in `poll`: an
/// eventfd on Linux, a pipe elsewhere. Waking never blocks; the woken thread calls
/// [`Waker::clear`].
#[derive(Debug)]
pub(crate) struct Waker {
    read: OwnedFd,
    /// The pipe's writing end (none for an eventfd, which is both).
    #[cfg(not(target_os = "linux"))]
    write: OwnedFd,
}

impl Waker {
    pub(crate) fn new() -> io::Result<Waker> {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: eventfd() takes no pointers; a non-negative result is a new
            // descriptor that nothing else owns.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` was just made and is owned by nothing else.
            let read = unsafe { OwnedFd::from_raw_fd(fd) };
            Ok(Waker { read })
        }
        #[cfg(not(target_os = "linux"))]
        {
            let mut fds = [0 as libc::c_int; 2];
            // SAFETY: `fds` is a live array of the two ints pipe() writes.
            if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: both descriptors were just made and are owned by nothing else.
            let (read, write) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            for fd in [&read, &write] {
                // SAFETY: fcntl() on our own open descriptor, no pointers.
                unsafe {
                    libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
                    libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            Ok(Waker { read, write })
        }
    }

    /// The descriptor to poll for reading.
    pub(crate) fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Makes the descriptor readable (a wake-up already pending is enough).
    pub(crate) fn wake(&self) {
        #[cfg(target_os = "linux")]
        let fd = self.read.as_raw_fd();
        #[cfg(not(target_os = "linux"))]
        let fd = self.write.as_raw_fd();
        let one: u64 = 1;
        // SAFETY: `one` is a live 8-byte value; the descriptor is ours and non-blocking
        // (a full pipe or counter means a wake-up is pending already).
        unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    }

    /// Takes the pending wake-ups, if any.
    pub(crate) fn clear(&self) {
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: `buf` is a live buffer of the length given; the descriptor is ours
            // and non-blocking.
            let n =
                unsafe { libc::read(self.fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            // An eventfd is emptied by one read; a pipe may hold more.
            if n <= 0 || cfg!(target_os = "linux") {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waker_ends_a_wait_and_is_cleared() {
        let w = Waker::new().unwrap();
        let far = Some(Instant::now() + Duration::from_secs(30));
        assert!(!wait_ready(w.fd(), libc::POLLIN, Some(Instant::now())).unwrap());
        w.wake();
        w.wake();
        assert!(wait_ready(w.fd(), libc::POLLIN, far).unwrap());
        w.clear();
        assert!(!wait_ready(w.fd(), libc::POLLIN, Some(Instant::now())).unwrap());
    }

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
