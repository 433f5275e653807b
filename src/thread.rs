//! Starting workpool's threads. Every thread workpool starts ignores SIGPIPE for itself:
//! a write to a socket or pipe whose reader has gone then fails with `EPIPE` instead of
//! killing the process. Rust programs ignore SIGPIPE process-wide at start-up, but C and
//! Swift programs that embed the library do not, and `writev` (used by rustls) has no
//! per-call way to opt out. Blocking the signal per thread changes nothing for the rest
//! of the embedding program.
//!
//! Each thread also gets a stack sized for what it does rather than Rust's 2 MiB default:
//! a manager holds a thread per worker connection and a worker one per worker, so at thousands
//! of connections the default reserves gigabytes of address space (and of commit charge
//! where overcommit is strict) for stacks that touch tens of KiB.

use std::io;
use std::sync::OnceLock;
use std::thread::JoinHandle;

/// How much stack a thread gets, by what it does. Each size is at least three times the
/// most any thread of that kind was measured to touch in a debug build, where frames are
/// largest (docs/PERFORMANCE.md, "Thread stacks"). `RUST_MIN_STACK`, when set, is a floor
/// for all of them (e.g. for an embedding program whose logger needs more).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stack {
    /// Relays bytes or messages between sockets or pipes and channels: the flusher,
    /// output delivery, metrics clients, a job's stdin. 128 KiB.
    Relay,
    /// TLS handshakes and certificate checks, the protocol's state, dispatching (manager
    /// link threads, worker sessions, the dispatcher, the acceptor), and what has no
    /// kind of its own. 256 KiB.
    Full,
    /// Runs a job: spawns and watches it, then removes its folder, which recurses up to
    /// 64 folders deep (`worker::folder`). 512 KiB.
    Job,
}

impl Stack {
    /// The stack size in bytes.
    pub(crate) fn bytes(self) -> usize {
        let own = match self {
            Stack::Relay => 128 << 10,
            Stack::Full => 256 << 10,
            Stack::Job => 512 << 10,
        };
        own.max(min_stack_from_env())
    }
}

/// `RUST_MIN_STACK` in bytes, read once (0 when unset or not a number).
fn min_stack_from_env() -> usize {
    static MIN: OnceLock<usize> = OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("RUST_MIN_STACK")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    })
}

/// Spawns a named thread with a [`Stack::Full`] stack and SIGPIPE blocked on it.
pub(crate) fn spawn<T, F>(name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_with_stack(name, Stack::Full, f)
}

/// Spawns a named thread with a [`Stack::Relay`] stack and SIGPIPE blocked on it.
pub(crate) fn relay<T, F>(name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_with_stack(name, Stack::Relay, f)
}

/// Spawns a named thread with a [`Stack::Job`] stack and SIGPIPE blocked on it.
pub(crate) fn for_job<T, F>(name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_with_stack(name, Stack::Job, f)
}

/// Spawns a named thread with the given stack and SIGPIPE blocked on it.
pub(crate) fn spawn_with_stack<T, F>(
    name: impl Into<String>,
    stack: Stack,
    f: F,
) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(stack.bytes())
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

/// The calling thread's stack, for tests: the size of the mapping that holds it (the
/// stack plus the thread's TLS block, rounded to pages) and how much of it is resident,
/// which for a live thread's stack is the most it has touched so far (from
/// /proc/self/smaps).
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn stack_use_here() -> (usize, usize) {
    let local = 0u8;
    let addr = std::hint::black_box(&local) as *const u8 as usize;
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut found: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            if found.is_some() {
                break;
            }
            if a <= addr && addr < b {
                found = Some((b - a, 0));
            }
        } else if let (Some(kb), Some(f)) = (line.strip_prefix("Rss:"), found.as_mut()) {
            f.1 = kb
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap()
                * 1024;
        }
    }
    found.expect("a mapping holds the stack")
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn threads_get_the_stack_of_their_kind() {
        for stack in [Stack::Relay, Stack::Full, Stack::Job] {
            // glibc hands a new thread the cached stack of an ended one when that is
            // large enough (up to four times the size asked for), and other tests end
            // threads of larger kinds: so several threads are alive at once, and at
            // least one of them has a stack of its own. The cache holds at most 40 MiB
            // (20 of the 2 MiB stacks of std's threads, which other tests end in
            // numbers, and which are at most four times the `Job` size): 48 at once.
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(48));
            let handles: Vec<_> = (0..48)
                .map(|_| {
                    let b = barrier.clone();
                    spawn_with_stack("wp-test", stack, move || {
                        let r = stack_use_here().0;
                        b.wait();
                        r
                    })
                    .unwrap()
                })
                .collect();
            let sizes: Vec<usize> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            assert!(
                sizes.iter().all(|&r| r >= stack.bytes()),
                "{stack:?}: {sizes:?}"
            );
            let reserved = *sizes.iter().min().unwrap();
            assert!(
                reserved < stack.bytes() + (64 << 10),
                "{stack:?}: {reserved}"
            );
        }
        assert!(Stack::Relay.bytes() < Stack::Full.bytes());
        assert!(Stack::Full.bytes() < Stack::Job.bytes());
        assert!(Stack::Job.bytes() < 2 << 20);
    }
}
