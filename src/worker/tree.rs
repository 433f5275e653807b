//! Finding every process a job started, to signal them all. A job's processes are:
//! its process group; on Linux also every process that still carries the job's token in
//! its environment (`WORKPOOL_JOB_TOKEN`, inherited through `fork`, `setsid`, `nohup`,
//! double forks), and, while the job's shell lives, every descendant of it (found
//! through the parent links in `/proc`, which also covers a descendant that cleared its
//! environment). Elsewhere only the process group is reached.
//!
//! Not used: making the worker a child subreaper. It is a process-wide setting that would
//! also make the worker responsible for reaping orphans of a program that embeds it.

/// The variable that marks a job's processes.
pub(crate) const TOKEN_VAR: &str = "WORKPOOL_JOB_TOKEN";

/// A fresh random token for one run of a job.
pub(crate) fn new_token() -> String {
    crate::random::hex(16)
}

/// Sends `sig` to the job's process group, to every process marked with its token, and
/// (if `root` has not exited) to the root's descendants. Returns how many processes
/// outside the process group were signalled.
pub(crate) fn signal_job(root: i32, token: &str, sig: i32, root_alive: bool) -> usize {
    if root <= 1 {
        return 0; // never -1 (everyone) or the group of init
    }
    // SAFETY: kill has no memory effects; `root > 1`, so this is never everyone or init's group.
    unsafe { libc::kill(-root, sig) };
    let mut hit = 0;
    for pid in others(root, token, root_alive, Scope::All) {
        // SAFETY: kill has no memory effects.
        if unsafe { libc::kill(pid, sig) } == 0 {
            hit += 1;
        }
    }
    hit
}

/// After the job's shell has exited (and before it is reaped, so that its process group
/// id cannot be reused): kills everything left, repeating while killing uncovers more
/// (a process forked between the scan and the kill). Returns how many were killed
/// outside the process group.
///
/// `ran_for` is how long the job ran. A job's processes were all created after its
/// shell, so for a short job (under a second: the pid counter cannot have wrapped round)
/// only processes with pids allocated since are read; a longer job gets a full scan.
pub(crate) fn kill_leftovers(root: i32, token: &str, ran_for: std::time::Duration) -> usize {
    if root <= 1 {
        return 0;
    }
    let scope = if ran_for < std::time::Duration::from_secs(1) {
        Scope::born_after(root)
    } else {
        Scope::All
    };
    let mut total = 0;
    for _ in 0..16 {
        // SAFETY: kill has no memory effects; `root > 1` was checked above.
        unsafe { libc::kill(-root, libc::SIGKILL) };
        let mut n = 0;
        for pid in others(root, token, false, scope) {
            // SAFETY: kill has no memory effects.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                n += 1;
            }
        }
        total += n;
        if n == 0 {
            break;
        }
    }
    total
}

/// The pids a scan looks at: when few pids were handed out since the job's shell, just
/// those (a pid that is gone, or a thread's id, costs one failed or harmless open);
/// otherwise every process listed in `/proc`.
#[cfg(target_os = "linux")]
fn candidates(scope: Scope) -> Box<dyn Iterator<Item = i32>> {
    if let Scope::After { root, last, max } = scope {
        let span = (last - root).rem_euclid(max);
        if span <= 4096 {
            return Box::new((1..=span).map(move |d| (root + d) % max));
        }
    }
    let listed = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    Box::new(listed.filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()))
}

/// Which processes a scan reads.
#[derive(Clone, Copy, Debug)]
enum Scope {
    All,
    /// Only pids allocated after `root` and up to `last` (the newest pid), counting round
    /// the kernel's `pid_max`.
    After {
        root: i32,
        last: i32,
        max: i32,
    },
}

impl Scope {
    fn born_after(root: i32) -> Scope {
        let read = |f: &str| std::fs::read_to_string(f).ok()?.trim().parse::<i32>().ok();
        match (
            read("/proc/sys/kernel/ns_last_pid"),
            read("/proc/sys/kernel/pid_max"),
        ) {
            (Some(last), Some(max)) if max > 0 => Scope::After { root, last, max },
            _ => Scope::All,
        }
    }

    fn includes(self, pid: i32) -> bool {
        match self {
            Scope::All => true,
            Scope::After { root, last, max } => {
                let dist = |a: i32, b: i32| (b - a).rem_euclid(max);
                let d = dist(root, pid);
                d > 0 && d <= dist(root, last)
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn others(root: i32, token: &str, root_alive: bool, scope: Scope) -> Vec<i32> {
    use std::io::Read;
    let me = std::process::id() as i32;
    let marker = format!("{TOKEN_VAR}={token}");
    let mut parent_of: Vec<(i32, i32)> = Vec::new();
    let mut found = Vec::new();
    let mut buf = Vec::with_capacity(4096);
    for pid in candidates(scope) {
        if pid == me || pid == root || !scope.includes(pid) {
            continue;
        }
        buf.clear();
        let marked = std::fs::File::open(format!("/proc/{pid}/environ"))
            .and_then(|mut f| f.read_to_end(&mut buf))
            .is_ok()
            && buf.split(|&b| b == 0).any(|var| var == marker.as_bytes());
        if marked {
            found.push(pid);
        } else if root_alive && let Some(ppid) = parent(pid) {
            parent_of.push((pid, ppid));
        }
    }
    if root_alive {
        // Descendants of the root that no longer carry the token.
        let mut frontier = vec![root];
        frontier.extend(found.iter().copied());
        while let Some(p) = frontier.pop() {
            for &(child, ppid) in &parent_of {
                if ppid == p && !found.contains(&child) {
                    found.push(child);
                    frontier.push(child);
                }
            }
        }
    }
    found
}

#[cfg(target_os = "linux")]
fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(not(target_os = "linux"))]
fn others(_root: i32, _token: &str, _root_alive: bool, _scope: Scope) -> Vec<i32> {
    Vec::new()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_short_job_scope_counts_round_pid_max() {
        let s = Scope::After {
            root: 100,
            last: 200,
            max: 1000,
        };
        assert!(s.includes(101) && s.includes(200));
        assert!(!s.includes(100) && !s.includes(201) && !s.includes(50));
        let wrapped = Scope::After {
            root: 990,
            last: 20,
            max: 1000,
        };
        assert!(wrapped.includes(995) && wrapped.includes(5) && wrapped.includes(20));
        assert!(!wrapped.includes(500) && !wrapped.includes(990));
    }

    #[test]
    fn tokens_are_fresh() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn a_marked_process_in_another_session_is_found_and_killed() {
        use std::os::unix::process::{CommandExt, ExitStatusExt};
        let token = new_token();
        let mut root = std::process::Command::new("sleep")
            .arg("600")
            .process_group(0)
            .spawn()
            .unwrap();
        let mut child = std::process::Command::new("setsid")
            .args(["sleep", "600"])
            .env(TOKEN_VAR, &token)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // `setsid` execs sleep in the same process once it runs in a new session; the
        // token is there either way.
        // Waits until it has become `sleep` too: while `setsid` execs, its environment
        // may not be readable for a moment, and one scan would miss it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let is_sleep = || {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
        };
        while !(is_sleep() && others(root.id() as i32, &token, false, Scope::All).contains(&pid)) {
            assert!(
                std::time::Instant::now() < deadline,
                "the marked process was never found"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Started after the root, so the short-job scan covers it too.
        assert!(kill_leftovers(root.id() as i32, &token, std::time::Duration::ZERO) >= 1);
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert_eq!(root.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
