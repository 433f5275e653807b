//! Runs one job: `/bin/bash -c SCRIPT` in a fresh 0700 folder under the work dir, in its
//! own process group, with the job's environment (plus `WORKPOOL_JOB_ID` and the token of
//! `tree`) and its stdin bytes (or `/dev/null`). One thread per job polls the two output
//! pipes, the process (a pidfd on Linux) and a wake-up pipe for commands, and sends output
//! as it comes. Timeouts and cancels send SIGTERM to every process of the job and SIGKILL
//! after the grace period. When the script exits, whatever it left running is killed,
//! the process is reaped, the folder is deleted, and `Finished` is sent last.
//! Nothing here knows about connections.

use super::tree;
use crate::job::{JobId, JobSpec, Outcome, Stream};
use crate::protocol::OUTPUT_CHUNK;
use crossbeam_channel::Sender;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// After the script exits and its leftovers are killed, how long its output pipes may
/// stay open (held by a process that escaped every kill) before reading stops.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Which run of which job: job ids are per manager, so the key names the manager too,
/// and a retried job can come back to the same worker while its killed earlier run is
/// still ending, so each run has a number of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct JobKey {
    pub manager: u64,
    pub job: JobId,
    pub run: u64,
}

/// What a running job reports.
#[derive(Debug)]
pub(crate) enum ExecEvent {
    Output {
        key: JobKey,
        stream: Stream,
        bytes: Vec<u8>,
    },
    Finished {
        key: JobKey,
        outcome: Outcome,
        cleanup_error: Option<String>,
    },
}

const NONE: u8 = 0;
const CANCEL: u8 = 1;
const KILL: u8 = 2;

struct Control {
    /// The job's pid (= its process group id) until it is reaped; then `None`.
    pid: Mutex<Option<i32>>,
    /// NONE, CANCEL (TERM, then KILL after the grace) or KILL (at once); only rises.
    request: AtomicU8,
    paused: AtomicBool,
    wake: OwnedFd,
}

impl Control {
    fn poke(&self) {
        let b = [1u8];
        // Non-blocking: a full pipe already holds a wake-up.
        // SAFETY: one byte from a live local to a descriptor this struct owns.
        unsafe { libc::write(self.wake.as_raw_fd(), b.as_ptr() as *const libc::c_void, 1) };
    }
}

/// A started job, for controlling it from the worker's thread. Every call returns at once.
pub(crate) struct RunningJob {
    control: Arc<Control>,
}

impl RunningJob {
    /// SIGTERM to all its processes, SIGKILL after the grace; it ends `Cancelled`
    /// (unless it had already exited).
    pub(crate) fn cancel(&self) {
        self.control.request.fetch_max(CANCEL, Ordering::SeqCst);
        self.control.poke();
    }

    /// SIGKILL to all its processes now. A paused job is unpaused, so that what is left
    /// of its output drains (to be dropped by the caller) and the process is reaped.
    pub(crate) fn kill(&self) {
        self.control.request.store(KILL, Ordering::SeqCst);
        self.control.paused.store(false, Ordering::SeqCst);
        self.control.poke();
    }

    /// Stops (or resumes) reading its output; the job blocks once its pipes fill. A
    /// killed job is not paused again.
    pub(crate) fn pause(&self, paused: bool) {
        let paused = paused && self.control.request.load(Ordering::SeqCst) != KILL;
        self.control.paused.store(paused, Ordering::SeqCst);
        self.control.poke();
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe writes.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe succeeded, so both descriptors are new and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    for fd in [&r, &w] {
        // SAFETY: fcntl on a descriptor we own; no memory is passed.
        unsafe {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
        }
    }
    Ok((r, w))
}

/// Starts a job on a thread of its own. Its events, `Finished` last, go to `events`.
pub(crate) fn start(
    key: JobKey,
    spec: JobSpec,
    work_dir: PathBuf,
    default_grace: Duration,
    events: Sender<ExecEvent>,
) -> io::Result<RunningJob> {
    let (wake_r, wake_w) = pipe()?;
    let control = Arc::new(Control {
        pid: Mutex::new(None),
        request: AtomicU8::new(NONE),
        paused: AtomicBool::new(false),
        wake: wake_w,
    });
    let c = control.clone();
    crate::thread::spawn(format!("wp-job-{}", key.job), move || {
        let grace = spec.kill_grace.unwrap_or(default_grace);
        let (outcome, cleanup_error) = run(key, &spec, &work_dir, grace, &c, &wake_r, &events);
        let _ = events.send(ExecEvent::Finished {
            key,
            outcome,
            cleanup_error,
        });
    })?;
    Ok(RunningJob { control })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn run(
    key: JobKey,
    spec: &JobSpec,
    work_dir: &Path,
    grace: Duration,
    control: &Control,
    wake: &OwnedFd,
    events: &Sender<ExecEvent>,
) -> (Outcome, Option<String>) {
    let dir = match make_job_dir(work_dir, key.job) {
        Ok(d) => d,
        Err(e) => {
            let why = format!("cannot create a job folder in {}: {e}", work_dir.display());
            return (Outcome::SpawnFailed(why), None);
        }
    };
    let token = tree::new_token();
    let spawned = Command::new("/bin/bash")
        .arg("-c")
        .arg(&spec.script)
        .current_dir(&dir)
        .envs(&spec.env)
        .env("WORKPOOL_JOB_ID", key.job.0.to_string())
        .env(tree::TOKEN_VAR, &token)
        .stdin(if spec.stdin.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let cleanup = remove_job_dir(&dir);
            return (
                Outcome::SpawnFailed(format!("cannot run /bin/bash: {e}")),
                cleanup,
            );
        }
    };
    let pid = child.id() as i32;
    *lock(&control.pid) = Some(pid);
    let feeder = child
        .stdin
        .take()
        .map(|stdin| feed_stdin(stdin, spec.stdin.clone()));
    let mut job = Supervisor {
        key,
        pid,
        token,
        grace,
        deadline: spec.timeout.map(|t| Instant::now() + t),
        reason: None,
        term_sent: None,
        killed: false,
        exited: None,
        started: Instant::now(),
    };
    job.pump(&mut child, control, wake, events);
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let status = {
        let mut guard = lock(&control.pid);
        let status = child.wait();
        *guard = None;
        status
    };
    let outcome = match (job.reason, status) {
        (Some(reason), _) => reason,
        (None, Ok(s)) => match (s.code(), s.signal()) {
            (Some(code), _) => Outcome::Exited(code),
            (None, Some(sig)) => Outcome::Signaled(sig),
            (None, None) => Outcome::SpawnFailed(format!("unknown exit status {s:?}")),
        },
        (None, Err(e)) => Outcome::SpawnFailed(format!("waiting for the script: {e}")),
    };
    (outcome, remove_job_dir(&dir))
}

/// Writes the job's stdin bytes, then closes it. A job that exits without reading gets
/// an EPIPE here, never a SIGPIPE (blocked on this thread; matters when embedded in C).
fn feed_stdin(mut stdin: std::process::ChildStdin, bytes: Vec<u8>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        crate::thread::block_sigpipe();
        let _ = stdin.write_all(&bytes);
    })
}

/// One job's process, from spawn to exit.
struct Supervisor {
    key: JobKey,
    pid: i32,
    token: String,
    grace: Duration,
    deadline: Option<Instant>,
    /// Why the job is being ended early, if it is: decides the outcome.
    reason: Option<Outcome>,
    term_sent: Option<Instant>,
    killed: bool,
    exited: Option<Instant>,
    started: Instant,
}

impl Supervisor {
    fn signal_all(&mut self, sig: i32) {
        if self.exited.is_none() {
            tree::signal_job(self.pid, &self.token, sig, true);
        }
        if sig == libc::SIGKILL {
            self.killed = true;
        }
    }

    /// Acts on requests and deadlines; returns when the next one is due, if any.
    fn enforce(&mut self, control: &Control) -> Option<Instant> {
        let now = Instant::now();
        if self.exited.is_some() {
            return None;
        }
        match control.request.load(Ordering::SeqCst) {
            KILL if !self.killed => {
                self.reason.get_or_insert(Outcome::Cancelled);
                self.signal_all(libc::SIGKILL);
            }
            CANCEL if self.reason.is_none() => {
                self.reason = Some(Outcome::Cancelled);
                self.term_sent = Some(now);
                self.signal_all(libc::SIGTERM);
            }
            _ => {}
        }
        if self.reason.is_none() && self.deadline.is_some_and(|d| now >= d) {
            log::info!("job {}: timed out; sending SIGTERM", self.key.job);
            self.reason = Some(Outcome::TimedOut);
            self.term_sent = Some(now);
            self.signal_all(libc::SIGTERM);
        }
        if let Some(t) = self
            .term_sent
            .filter(|t| !self.killed && now >= *t + self.grace)
        {
            log::info!(
                "job {}: still running {:?} after SIGTERM; sending SIGKILL",
                self.key.job,
                now - t
            );
            self.signal_all(libc::SIGKILL);
        }
        let escalation = self
            .term_sent
            .filter(|_| !self.killed)
            .map(|t| t + self.grace);
        let timeout = self.deadline.filter(|_| self.reason.is_none());
        [escalation, timeout].into_iter().flatten().min()
    }

    /// Reads both pipes until they close and the process has exited (not reaped: its pid
    /// and process group stay reserved until the caller reaps it).
    fn pump(
        &mut self,
        child: &mut Child,
        control: &Control,
        wake: &OwnedFd,
        events: &Sender<ExecEvent>,
    ) {
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let mut pipes: Vec<(Stream, i32)> = Vec::with_capacity(2);
        if let Some(s) = &stdout {
            pipes.push((Stream::Stdout, s.as_raw_fd()));
        }
        if let Some(s) = &stderr {
            pipes.push((Stream::Stderr, s.as_raw_fd()));
        }
        let exit_watch = ExitWatch::new(self.pid);
        let mut drain_until: Option<Instant> = None;
        let mut buf = vec![0u8; OUTPUT_CHUNK];
        loop {
            if self.exited.is_none() && exit_watch.has_exited_now() {
                self.exited = Some(Instant::now());
                // Whatever the script left behind goes with it.
                let escaped = tree::kill_leftovers(self.pid, &self.token, self.started.elapsed());
                if escaped > 0 {
                    log::info!(
                        "job {}: killed {escaped} process(es) it left running",
                        self.key.job
                    );
                }
            }
            let next_deadline = self.enforce(control);
            let paused = control.paused.load(Ordering::SeqCst);
            if self.exited.is_some() {
                if pipes.is_empty() {
                    return;
                }
                if paused {
                    drain_until = None;
                } else {
                    let until =
                        *drain_until.get_or_insert_with(|| Instant::now() + DRAIN_AFTER_EXIT);
                    if Instant::now() >= until {
                        log::warn!(
                            "job {}: output still open {} s after the script exited \
                             (held by a process that escaped the job); no longer reading it",
                            self.key.job,
                            DRAIN_AFTER_EXIT.as_secs()
                        );
                        return;
                    }
                }
            }
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(4);
            let poll = |fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            if !paused {
                fds.extend(pipes.iter().map(|&(_, fd)| poll(fd)));
            }
            fds.push(poll(wake.as_raw_fd()));
            let mut wake_at = next_deadline;
            if self.exited.is_none() {
                match exit_watch.fd() {
                    Some(fd) => fds.push(poll(fd)),
                    None => {
                        wake_at = Some(
                            wake_at.map_or(Instant::now() + Duration::from_millis(50), |w| {
                                w.min(Instant::now() + Duration::from_millis(50))
                            }),
                        )
                    }
                }
            } else if let Some(d) = drain_until {
                wake_at = Some(wake_at.map_or(d, |w| w.min(d)));
            }
            let timeout_ms = wake_at.map_or(-1, |w| {
                w.saturating_duration_since(Instant::now()).as_millis() as i32 + 1
            });
            // SAFETY: `fds` is a live array of `fds.len()` pollfd entries.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("job {}: poll failed: {e}", self.key.job);
                exit_watch.wait();
                return;
            }
            drain_wake(wake);
            if paused {
                continue;
            }
            let mut closed = Vec::new();
            for (i, &(stream, fd)) in pipes.iter().enumerate() {
                if fds[i].revents == 0 {
                    continue;
                }
                // SAFETY: `buf` is writable for `buf.len()` bytes; `fd` is a pipe we own.
                let r = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
                if r > 0 {
                    let bytes = buf[..r as usize].to_vec();
                    let _ = events.send(ExecEvent::Output {
                        key: self.key,
                        stream,
                        bytes,
                    });
                } else if r == 0 {
                    closed.push(i);
                } else {
                    let e = io::Error::last_os_error();
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) {
                        closed.push(i);
                    }
                }
            }
            for i in closed.into_iter().rev() {
                pipes.remove(i);
            }
        }
        // `stdout` and `stderr` close here.
    }
}

fn drain_wake(wake: &OwnedFd) {
    let mut b = [0u8; 64];
    // SAFETY: `b` is writable for its length; the descriptor is owned by the caller's `OwnedFd`.
    while unsafe {
        libc::read(
            wake.as_raw_fd(),
            b.as_mut_ptr() as *mut libc::c_void,
            b.len(),
        )
    } > 0
    {}
}

/// Tells when a child has exited without reaping it: a pidfd where the kernel has them,
/// else `waitid(WNOWAIT)` polled by the caller.
struct ExitWatch {
    pid: i32,
    pidfd: Option<OwnedFd>,
}

impl ExitWatch {
    fn new(pid: i32) -> ExitWatch {
        #[cfg(target_os = "linux")]
        let pidfd = {
            // SAFETY: pidfd_open takes two integers and returns a new descriptor or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
            // SAFETY: a non-negative result of pidfd_open is a new descriptor owned by nobody else.
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
        };
        #[cfg(not(target_os = "linux"))]
        let pidfd = None;
        ExitWatch { pid, pidfd }
    }

    fn fd(&self) -> Option<i32> {
        self.pidfd.as_ref().map(|f| f.as_raw_fd())
    }

    fn waitid(&self, flags: libc::c_int) -> bool {
        // SAFETY: siginfo_t is plain old data; all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a live, writable siginfo_t for waitid to fill.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | flags,
            )
        };
        // SAFETY: `info` was zeroed and then filled by waitid; si_pid reads a field of it.
        r == 0 && unsafe { info.si_pid() } != 0
    }

    fn has_exited_now(&self) -> bool {
        self.waitid(libc::WNOHANG)
    }

    /// Blocks until the child has exited (still without reaping it).
    fn wait(&self) {
        while !self.waitid(0) {
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return;
            }
        }
    }
}

static DIR_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The prefix of every job folder: `workpool-job-JOB-WORKERPID-NONCE`.
const DIR_PREFIX: &str = "workpool-job-";

/// Creates a new private folder for a job (mode 0700; `mkdir` fails rather than reuse
/// anything that exists, so a planted folder or link is never entered).
fn make_job_dir(work_dir: &Path, job: JobId) -> io::Result<PathBuf> {
    let mut last = None;
    for _ in 0..16 {
        let nonce = DIR_COUNTER.fetch_add(1, Ordering::Relaxed)
            ^ (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                .rotate_left(17));
        let dir = work_dir.join(format!(
            "{DIR_PREFIX}{job}-{}-{nonce:016x}",
            std::process::id()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no unique folder name")))
}

/// Deletes a job's folder, first giving back any permission the job took away from its
/// own subfolders; a failure is logged and returned for the job's result.
fn remove_job_dir(dir: &Path) -> Option<String> {
    let first = match std::fs::remove_dir_all(dir) {
        Ok(()) => return None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => e,
    };
    restore_permissions(dir);
    match std::fs::remove_dir_all(dir) {
        Ok(()) => None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            let msg = format!(
                "could not delete the job folder {}: {e} (first try: {first})",
                dir.display()
            );
            log::warn!("{msg}");
            Some(msg)
        }
    }
}

fn restore_permissions(dir: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            restore_permissions(&e.path());
        }
    }
}

/// Deletes job folders left by worker processes that no longer exist (a worker killed
/// with SIGKILL cannot clean up). Folders of live workers are left alone.
pub(crate) fn sweep_stale_dirs(work_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let mut parts = rest.split('-');
        let (_job, owner) = (
            parts.next(),
            parts.next().and_then(|p| p.parse::<i32>().ok()),
        );
        let Some(owner) = owner else { continue };
        let gone = owner > 0
            // SAFETY: signal 0 only asks whether the process exists.
            && unsafe { libc::kill(owner, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone && e.file_type().is_ok_and(|t| t.is_dir()) {
            log::info!(
                "removing {}, left by worker process {owner}, which is gone",
                e.path().display()
            );
            if let Some(err) = remove_job_dir(&e.path()) {
                log::warn!("{err}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::unbounded;

    fn key(n: u64) -> JobKey {
        JobKey {
            manager: 0,
            job: JobId(n),
            run: n,
        }
    }

    fn start_job(spec: JobSpec) -> (RunningJob, crossbeam_channel::Receiver<ExecEvent>) {
        let (tx, rx) = unbounded();
        let job = start(
            key(1),
            spec,
            std::env::temp_dir(),
            Duration::from_secs(5),
            tx,
        )
        .unwrap();
        (job, rx)
    }

    fn collect(
        rx: &crossbeam_channel::Receiver<ExecEvent>,
    ) -> (Outcome, Vec<u8>, Vec<u8>, Option<String>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match rx
                .recv_timeout(Duration::from_secs(60))
                .expect("job ends within a minute")
            {
                ExecEvent::Output {
                    stream: Stream::Stdout,
                    bytes,
                    ..
                } => out.extend(bytes),
                ExecEvent::Output { bytes, .. } => err.extend(bytes),
                ExecEvent::Finished {
                    outcome,
                    cleanup_error,
                    ..
                } => return (outcome, out, err, cleanup_error),
            }
        }
    }

    fn run_job(spec: JobSpec) -> (Outcome, Vec<u8>, Vec<u8>, Option<String>) {
        let (_job, rx) = start_job(spec);
        collect(&rx)
    }

    fn first_line(rx: &crossbeam_channel::Receiver<ExecEvent>) -> String {
        let mut got = Vec::new();
        while !got.contains(&b'\n') {
            match rx.recv_timeout(Duration::from_secs(60)).unwrap() {
                ExecEvent::Output { bytes, .. } => got.extend(bytes),
                other => panic!("{other:?}"),
            }
        }
        String::from_utf8(got).unwrap()
    }

    #[test]
    fn exit_code_and_both_streams_come_back() {
        let (o, out, err, c) = run_job(JobSpec::new("echo out; echo err >&2; exit 3"));
        assert_eq!(o, Outcome::Exited(3));
        assert_eq!(out, b"out\n");
        assert_eq!(err, b"err\n");
        assert_eq!(c, None);
    }

    #[test]
    fn the_job_runs_in_a_private_folder_that_is_deleted_afterwards() {
        let (o, out, _, _) = run_job(JobSpec::new("pwd; stat -c %a .; echo $WORKPOOL_JOB_ID"));
        assert_eq!(o, Outcome::Exited(0));
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("workpool-job-1-"), "{text}");
        assert_eq!(lines[1], "700");
        assert_eq!(lines[2], "1");
        assert!(!Path::new(lines[0]).exists());
    }

    #[test]
    fn env_and_stdin_reach_the_job() {
        let spec = JobSpec::new("echo \"$GREETING\"; tr a-z A-Z")
            .env("GREETING", "hi there")
            .stdin(b"from stdin\n".to_vec());
        let (o, out, _, _) = run_job(spec);
        assert_eq!(o, Outcome::Exited(0));
        assert_eq!(out, b"hi there\nFROM STDIN\n");
    }

    #[test]
    fn a_job_that_ignores_its_stdin_is_not_hurt() {
        let (o, _, _, _) = run_job(JobSpec::new("exit 0").stdin(vec![b'x'; 1 << 20]));
        assert_eq!(o, Outcome::Exited(0));
    }

    #[test]
    fn a_background_process_left_behind_is_killed_and_does_not_hold_the_job_open() {
        // `sleep` inherits stdout; without the kill the pipe would stay open 600 s.
        let (o, out, _, _) = run_job(JobSpec::new("sleep 600 & echo $!"));
        assert_eq!(o, Outcome::Exited(0));
        wait_gone(String::from_utf8(out).unwrap().trim().parse().unwrap());
    }

    #[test]
    fn processes_that_escaped_the_group_are_killed_when_the_script_exits() {
        let (o, out, _, _) = run_job(JobSpec::new(
            "setsid sleep 600 > /dev/null 2>&1 & echo $!; (setsid sleep 600 > /dev/null 2>&1 & echo $!)",
        ));
        assert_eq!(o, Outcome::Exited(0));
        for pid in String::from_utf8(out).unwrap().split_whitespace() {
            let pid: i32 = pid.parse().unwrap();
            wait_gone(pid);
        }
    }

    #[test]
    fn a_signal_is_reported_as_signaled() {
        let (o, _, _, _) = run_job(JobSpec::new("kill -SEGV $$"));
        assert_eq!(o, Outcome::Signaled(libc::SIGSEGV));
    }

    #[test]
    fn cancel_terminates_the_job_and_reports_cancelled() {
        let (job, rx) = start_job(JobSpec::new("echo up; sleep 600"));
        assert_eq!(first_line(&rx), "up\n");
        job.cancel();
        assert_eq!(collect(&rx).0, Outcome::Cancelled);
    }

    #[test]
    fn a_timeout_ends_the_job_as_timed_out() {
        let (o, _, _, _) = run_job(JobSpec::new("sleep 600").timeout(Duration::from_millis(200)));
        assert_eq!(o, Outcome::TimedOut);
    }

    #[test]
    fn a_job_that_ignores_sigterm_dies_by_sigkill_after_the_grace() {
        let spec = JobSpec::new("trap '' TERM; echo ready; while :; do sleep 0.05; done")
            .kill_grace(Duration::from_millis(300));
        let (job, rx) = start_job(spec);
        assert_eq!(first_line(&rx), "ready\n");
        job.cancel();
        assert_eq!(collect(&rx).0, Outcome::Cancelled);
    }

    #[test]
    fn pausing_and_resuming_loses_no_output() {
        let (job, rx) = start_job(JobSpec::new("head -c 3000000 /dev/zero"));
        let mut total = 0;
        let outcome = loop {
            match rx.recv_timeout(Duration::from_secs(60)).unwrap() {
                ExecEvent::Output { bytes, .. } => {
                    total += bytes.len();
                    job.pause(true);
                    job.pause(false);
                }
                ExecEvent::Finished { outcome, .. } => break outcome,
            }
        };
        assert_eq!(outcome, Outcome::Exited(0));
        assert_eq!(total, 3_000_000);
    }

    #[test]
    fn a_killed_job_that_was_paused_still_ends() {
        let (job, rx) = start_job(JobSpec::new("echo up; yes"));
        assert!(first_line(&rx).starts_with("up\n"));
        job.pause(true);
        job.kill();
        job.pause(true); // too late: a killed job is not paused again
        assert_eq!(collect(&rx).0, Outcome::Cancelled);
    }

    #[test]
    fn a_missing_work_dir_is_a_spawn_failure() {
        let (tx, rx) = unbounded();
        let _j = start(
            key(3),
            JobSpec::new("true"),
            "/nonexistent/workpool".into(),
            Duration::from_secs(1),
            tx,
        )
        .unwrap();
        match collect(&rx).0 {
            Outcome::SpawnFailed(m) => assert!(m.contains("/nonexistent/workpool"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_delete_is_reported() {
        // /proc entries cannot be removed, even by root.
        let r = remove_job_dir(Path::new("/proc/self/fd"));
        assert!(r.unwrap().contains("could not delete"));
    }

    #[test]
    fn a_folder_the_job_locked_is_still_deleted() {
        let (o, out, _, c) = run_job(JobSpec::new(
            "mkdir -p locked/inner; touch locked/inner/f; chmod 000 locked/inner locked; pwd",
        ));
        assert_eq!(o, Outcome::Exited(0));
        assert_eq!(c, None);
        assert!(!Path::new(String::from_utf8(out).unwrap().trim()).exists());
    }

    #[test]
    fn stale_folders_of_dead_workers_are_swept_and_live_ones_kept() {
        let base = std::env::temp_dir().join(format!("workpool-sweep-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        // A pid that cannot exist (above the kernel's limit) and our own, live pid.
        let dead = base.join(format!("{DIR_PREFIX}7-{}-00", i32::MAX));
        let live = base.join(format!("{DIR_PREFIX}8-{}-00", std::process::id()));
        std::fs::create_dir_all(dead.join("sub")).unwrap();
        std::fs::create_dir_all(&live).unwrap();
        sweep_stale_dirs(&base);
        assert!(!dead.exists());
        assert!(live.exists());
        std::fs::remove_dir_all(base).unwrap();
    }

    fn gone(pid: i32) -> bool {
        // Gone, or a zombie waiting for a parent that is not us.
        // SAFETY: signal 0 only asks whether the process exists.
        (unsafe { libc::kill(pid, 0) }) != 0
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
                .unwrap_or(true)
    }

    fn wait_gone(pid: i32) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !gone(pid) {
            assert!(Instant::now() < deadline, "{pid} survived");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
