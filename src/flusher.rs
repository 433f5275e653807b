//! The process's flusher: one thread, started when first needed, that sends what links
//! left pending because their socket was full. Whoever sends on a link writes directly,
//! only what the socket takes at once; a link with bytes left over is handed here, and
//! the flusher `poll`s every such socket for room (`POLLOUT`) and asks the link to send
//! more (see [`Flush`]). So no link needs a writer thread or a wake-up descriptor of its
//! own: the flusher has one waker for itself, and watches only the links that wait.
//!
//! The flusher decides nothing about a link: [`Flush::flush`] sends, and says when the
//! link must next be looked at even if its socket stays full (the link cuts itself once
//! its peer has left bytes unread too long).

use crate::net::{self, Waker};
use crate::sync::lock;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// A link with bytes waiting for its socket.
pub(crate) trait Flush: Send + Sync {
    /// Sends what the socket takes now (and, for a link that pulls what to send, pulls
    /// more while it does).
    fn flush(&self, now: Instant) -> Flushed;
}

/// What [`Flush::flush`] left.
pub(crate) enum Flushed {
    /// Nothing waits any more (or the link is gone): stop watching.
    Done,
    /// Bytes still wait: look again when the socket has room, or at `deadline`.
    Waiting { deadline: Instant },
}

struct Entry {
    /// Holds the socket open while it is polled.
    tcp: Arc<TcpStream>,
    link: Arc<dyn Flush>,
    deadline: Instant,
}

struct Flusher {
    waker: Waker,
    /// Links handed over since the thread last looked.
    new: Mutex<Vec<Entry>>,
}

static FLUSHER: OnceLock<std::io::Result<Flusher>> = OnceLock::new();
static STARTED: OnceLock<std::io::Result<()>> = OnceLock::new();

fn flusher() -> Result<&'static Flusher, String> {
    let f = FLUSHER.get_or_init(|| {
        Ok(Flusher {
            waker: Waker::new()?,
            new: Mutex::new(Vec::new()),
        })
    });
    let f = f
        .as_ref()
        .map_err(|e| format!("cannot make the flusher's waker: {e}"))?;
    let started =
        STARTED.get_or_init(|| crate::thread::relay("wp-flusher", move || run(f)).map(|_| ()));
    started
        .as_ref()
        .map_err(|e| format!("cannot start the flusher thread: {e}"))?;
    Ok(f)
}

/// Hands a link with pending bytes to the flusher, which calls [`Flush::flush`] when
/// `tcp` can take more, or at `deadline`, until the link says it is done. The caller
/// registers a link once until then. Err only if the flusher could not be started.
pub(crate) fn register(
    tcp: Arc<TcpStream>,
    link: Arc<dyn Flush>,
    deadline: Instant,
) -> Result<(), String> {
    let f = flusher()?;
    lock(&f.new).push(Entry {
        tcp,
        link,
        deadline,
    });
    f.waker.wake();
    Ok(())
}

fn run(f: &'static Flusher) {
    let mut entries: Vec<Entry> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    loop {
        entries.append(&mut lock(&f.new));
        fds.clear();
        fds.push(net::pollfd(f.waker.fd(), libc::POLLIN));
        fds.extend(
            entries
                .iter()
                .map(|e| net::pollfd(e.tcp.as_raw_fd(), libc::POLLOUT)),
        );
        let deadline = entries.iter().map(|e| e.deadline).min();
        if let Err(e) = net::poll(&mut fds, deadline) {
            log::error!("flusher: poll failed: {e}");
            // Not a busy loop if the failure lasts (e.g. ENOMEM): the entries are
            // tried again below, and then after a pause.
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if fds[0].revents != 0 {
            f.waker.clear();
        }
        let now = Instant::now();
        let mut ready = fds[1..].iter().map(|p| p.revents != 0);
        entries.retain_mut(|e| {
            if !ready.next().unwrap_or(false) && e.deadline > now {
                return true;
            }
            match e.link.flush(now) {
                Flushed::Done => false,
                Flushed::Waiting { deadline } => {
                    e.deadline = deadline;
                    true
                }
            }
        });
    }
}
