//! Starting workpool's threads. Every thread workpool starts ignores SIGPIPE for itself:
//! a write to a socket or pipe whose reader has gone then fails with `EPIPE` instead of
//! killing the process. Rust programs ignore SIGPIPE process-wide at start-up, but C and
//! Swift programs that embed the library do not, and `writev` (used by rustls) has no
//! per-call way to opt out. Blocking the signal per thread changes nothing for the rest
//! of the embedding program.

use std::io;
use std::thread::JoinHandle;

/// Spawns a named thread with SIGPIPE blocked on it.
pub(crate) fn spawn<T, F>(name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            block_sigpipe();
            f()
        })
}

/// Blocks SIGPIPE on the calling thread.
pub(crate) fn block_sigpipe() {
    // SAFETY: the set is a local that sigemptyset initialises before use; the old mask is not asked for (NULL).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
