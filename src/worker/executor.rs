//! Runs one job: `/bin/bash -c SCRIPT` in a fresh 0700 folder under the work dir, in its
//! own process group, with the job's environment (plus `WORKPOOL_JOB_ID` and the token of
//! `tree`) and its stdin bytes (or `/dev/null`), no other inherited descriptor, and as the
//! job user if the worker has one. [`run`] runs on a supervisor thread of the worker's
//! pool (`pool`): it polls the two output pipes, the process (a pidfd on Linux) and a
//! wake-up pipe for commands, and hands each piece of output, read into a buffer of its
//! own, to [`JobEvents`]. Timeouts and cancels send SIGTERM to every process of the job and
//! SIGKILL after the grace period. As soon as the script has exited and its output is
//! all read, the outcome is reported; then whatever it left running is killed, the
//! process is reaped and the folder deleted, and that is reported too.
//!
//! An interactive job's stdin is a pipe kept open (a terminal job's, its terminal: see
//! `spawn`). The bytes the session hands over ([`RunningJob::stdin`]) wait in the job's
//! [`Control`] until its supervisor writes them, in the same `poll` loop as the output:
//! our end is non-blocking, polled for `POLLOUT` while bytes wait, so neither the
//! session nor the supervisor ever waits for a job that does not read, and no thread is
//! added per job. What was written is reported as it goes ([`JobEvents::stdin_taken`]);
//! a job that closed its stdin (EPIPE, EIO, or `POLLERR` on an idle pipe) is reported
//! once ([`JobEvents::stdin_closed`]) and the bytes still waiting are dropped. What
//! waits is bounded by the session (at most `protocol::STDIN_WINDOW` beyond what was
//! taken).
//! Nothing here knows about connections.
use super::folder::{self, Removal};
use super::job_user::JobUser;
use super::replay::Chunk;
use super::spawn;
use super::tree;
use crate::job::{JobId, JobSpec, Outcome, PtySize, Stream};
use crate::protocol::OUTPUT_CHUNK;
use std::collections::VecDeque;
use std::ffi::{CString, OsStr};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// After the script exits and its leftovers are killed, how long its output pipes may
/// stay open (held by a process that escaped every kill) before reading stops.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Which run of which job: job ids are per manager, so the key names the manager too,
/// and a retried job can come back to the same worker while its killed earlier run is
/// still ending, so each run has a number of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct JobKey {
    pub manager: u64,
    pub job: JobId,
    pub run: u64,
}

/// Where a job's supervisor reports, in this order: output, then the exit, then the
/// end of the cleanup. Calls never block.
pub(crate) trait JobEvents: Send + Sync {
    /// The job wrote this.
    fn output(&self, key: JobKey, stream: Stream, bytes: Chunk);
    /// The job's exit status is known and all its output was reported. `cleanup_error`
    /// is set only when the folder was already dealt with (the job never ran).
    fn exited(&self, key: JobKey, outcome: Outcome, cleanup_error: Option<String>);
    /// What the job left is killed, it is reaped and its folder deleted (`error` if that
    /// failed): the supervisor is done with it.
    fn cleaned_up(&self, key: JobKey, error: Option<String>);
    /// An interactive job has taken every stdin byte before `upto` (written into its
    /// pipe or terminal).
    fn stdin_taken(&self, key: JobKey, upto: u64);
    /// An interactive job closed its stdin after taking `upto` bytes (not said when it
    /// simply ends: its exit says that).
    fn stdin_closed(&self, key: JobKey, upto: u64);
}

const NONE: u8 = 0;
const CANCEL: u8 = 1;
const KILL: u8 = 2;

/// What a job's supervisor is asked to do, and a pipe to wake it with.
struct Control {
    /// NONE, CANCEL (TERM, then KILL after the grace) or KILL (at once); only rises.
    request: AtomicU8,
    paused: AtomicBool,
    /// An interactive job's stdin and terminal, from the session.
    feed: Mutex<Feed>,
    wake_r: OwnedFd,
    wake_w: OwnedFd,
}

/// What the session has handed over for an interactive job, until its supervisor takes
/// it.
#[derive(Default)]
struct Feed {
    /// Stdin bytes, in order.
    bytes: VecDeque<Vec<u8>>,
    /// Stdin ends after them.
    end: bool,
    /// The terminal's new size.
    resize: Option<PtySize>,
}

impl Control {
    fn poke(&self) {
        let b = [1u8];
        // Non-blocking: a full pipe already holds a wake-up.
        // SAFETY: one byte from a live local to a descriptor this struct owns.
        unsafe {
            libc::write(
                self.wake_w.as_raw_fd(),
                b.as_ptr() as *const libc::c_void,
                1,
            )
        };
    }
}

/// A job run, for controlling it from any thread. Made before its supervisor starts, so
/// that a request that comes first is not lost. Every call returns at once.
#[derive(Clone)]
pub(crate) struct RunningJob {
    control: Arc<Control>,
}

impl RunningJob {
    /// A handle for a run about to start.
    pub(crate) fn new() -> io::Result<RunningJob> {
        let (wake_r, wake_w) = pipe()?;
        Ok(RunningJob {
            control: Arc::new(Control {
                request: AtomicU8::new(NONE),
                paused: AtomicBool::new(false),
                feed: Mutex::new(Feed::default()),
                wake_r,
                wake_w,
            }),
        })
    }

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

    /// Bytes for an interactive job's stdin, after those handed over before.
    pub(crate) fn stdin(&self, bytes: Vec<u8>) {
        crate::sync::lock(&self.control.feed).bytes.push_back(bytes);
        self.control.poke();
    }

    /// An interactive job's stdin ends after the bytes handed over: a pipe is closed;
    /// a terminal in canonical mode is sent its end-of-file character (as typing Ctrl-D
    /// would), and stays open.
    pub(crate) fn stdin_end(&self) {
        crate::sync::lock(&self.control.feed).end = true;
        self.control.poke();
    }

    /// A terminal job's terminal gets this size.
    pub(crate) fn resize(&self, size: PtySize) {
        crate::sync::lock(&self.control.feed).resize = Some(size);
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
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are new and owned by nobody else.
        return Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) });
    }
    #[allow(unreachable_code)]
    {
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
}

/// Runs a job run on the calling thread, as `user` if given, and reports to `events`:
/// its output, its exit, then the end of its cleanup. Returns after the cleanup.
pub(crate) fn run(
    key: JobKey,
    spec: &JobSpec,
    work_dir: &Path,
    default_grace: Duration,
    user: Option<&JobUser>,
    job: &RunningJob,
    events: &dyn JobEvents,
) {
    let grace = spec.kill_grace.unwrap_or(default_grace);
    let control = &*job.control;
    let dir = match make_job_dir(work_dir, key.job, user) {
        Ok(d) => d,
        Err(e) => {
            let why = format!("cannot create a job folder in {}: {e}", work_dir.display());
            events.exited(key, Outcome::SpawnFailed(why), None);
            events.cleaned_up(key, None);
            return;
        }
    };
    supervise(key, spec, &dir, user, grace, control, events);
}

/// Checks at start that jobs can run as `user` in folders under `work_dir`: that this
/// process may take on the user's identity, and that the user may run `/bin/bash` and
/// enter `work_dir` (its job folders' paths must work for it). The answer says what
/// failed.
pub(crate) fn probe(user: &JobUser, work_dir: &Path) -> Result<(), String> {
    let mut cmd = Command::new(spawn::SHELL);
    cmd.args(["-c", "cd -- \"$1\"", "bash"])
        .arg(work_dir)
        .current_dir("/")
        .env("HOME", &user.home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    spawn::prepare_as(&mut cmd, user);
    let status = cmd
        .spawn()
        .and_then(|mut c| c.wait())
        .map_err(|e| format!("cannot start /bin/bash as that user: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "that user cannot enter the work dir {} (it needs search permission on every \
             folder of the path)",
            work_dir.display()
        ))
    }
}

/// Spawns the job's shell in its folder, supervises it, and cleans up (see [`run`]).
fn supervise(
    key: JobKey,
    spec: &JobSpec,
    dir: &JobDir,
    user: Option<&JobUser>,
    grace: Duration,
    control: &Control,
    events: &dyn JobEvents,
) {
    let token = tree::new_token();
    let job_id = key.job.0.to_string();
    let mut vars: Vec<(&str, &str)> = Vec::with_capacity(spec.env.len() + 2);
    vars.extend(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    vars.push(("WORKPOOL_JOB_ID", &job_id));
    vars.push((tree::TOKEN_VAR, &token));
    let spawned = spawn::spawn(&spawn::Launch {
        script: &spec.script,
        dir: &dir.path,
        vars: &vars,
        stdin: !spec.stdin.is_empty() || spec.interactive,
        live: spec.interactive,
        pty: spec.pty,
        user,
    });
    let process = match spawned {
        Ok(p) => p,
        Err(e) => {
            let cleanup = remove_job_dir(dir);
            let who = user.map_or(String::new(), |u| format!(" as user {}", u.name));
            let why = format!("cannot run {}{who}: {e}", spawn::SHELL);
            events.exited(key, Outcome::SpawnFailed(why), cleanup);
            events.cleaned_up(key, None);
            return;
        }
    };
    let pid = process.pid;
    let interactive = spec.interactive || spec.pty.is_some();
    let (feeder, mut live) = match process.stdin {
        Some(stdin) if interactive => (None, Some(LiveStdin::new(stdin, spec.pty.is_some()))),
        Some(stdin) => (Some(feed_stdin(stdin, spec.stdin.clone())), None),
        None => (None, None),
    };
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
        swept: false,
        started: Instant::now(),
    };
    let exit_watch = ExitWatch::new(pid);
    job.pump(
        process.stdout,
        process.stderr,
        &mut live,
        &exit_watch,
        control,
        events,
    );
    // What waits for a job that has ended is dropped (the session counts its stdin
    // closed when it hears of the exit).
    drop(live);
    // The outcome is known before the process is reaped (so that its pid and process
    // group stay reserved for the sweep below): reported at once.
    let early = match job.reason.take() {
        Some(reason) => Some(reason),
        None => exit_watch.outcome(),
    };
    if let Some(outcome) = &early {
        events.exited(key, outcome.clone(), None);
    }
    if !job.swept {
        job.sweep();
    }
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let status = spawn::wait(pid);
    if early.is_none() {
        let outcome = match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(code), _) => Outcome::Exited(code),
                (None, Some(sig)) => Outcome::Signaled(sig),
                (None, None) => Outcome::SpawnFailed(format!("unknown exit status {s:?}")),
            },
            Err(e) => Outcome::SpawnFailed(format!("waiting for the script: {e}")),
        };
        events.exited(key, outcome, None);
    }
    events.cleaned_up(key, remove_job_dir(dir));
}

/// Writes the job's stdin bytes, then closes it. A job that exits without reading gets
/// an EPIPE here, never a SIGPIPE (blocked on this thread; matters when embedded in C).
fn feed_stdin(stdin: OwnedFd, bytes: Vec<u8>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        crate::thread::block_sigpipe();
        let _ = std::fs::File::from(stdin).write_all(&bytes);
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
    /// What the script left running has been killed.
    swept: bool,
    started: Instant,
}

impl Supervisor {
    /// Kills whatever the script left running (it has exited, and is not reaped yet).
    fn sweep(&mut self) {
        self.swept = true;
        let escaped = tree::kill_leftovers(self.pid, &self.token, self.started.elapsed());
        if escaped > 0 {
            log::info!(
                "job {}: killed {escaped} process(es) it left running",
                self.key.job
            );
        }
    }

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
    /// and process group stay reserved until the caller reaps it). When the script
    /// exits, what is in its pipes is read at once; if that ends them, the job is done
    /// and what it left running is killed later (`sweep`), after its exit is reported.
    /// If something else still holds a pipe open, it is killed now, so that the pipe
    /// ends.
    ///
    /// An interactive job's stdin is written in the same loop (see [`LiveStdin`]), and a
    /// terminal's new size set on its master (`stdout`), until the script exits.
    fn pump(
        &mut self,
        stdout: OwnedFd,
        stderr: Option<OwnedFd>,
        live: &mut Option<LiveStdin>,
        exit_watch: &ExitWatch,
        control: &Control,
        events: &dyn JobEvents,
    ) {
        // Our ends are non-blocking (`spawn`): reads never wait. A terminal's master is
        // its output, stderr merged.
        let mut pipes: Vec<(Stream, i32)> = vec![(Stream::Stdout, stdout.as_raw_fd())];
        if let Some(stderr) = &stderr {
            pipes.push((Stream::Stderr, stderr.as_raw_fd()));
        }
        let wake = &control.wake_r;
        let mut drain_until: Option<Instant> = None;
        let mut buf = Vec::with_capacity(OUTPUT_CHUNK);
        loop {
            if self.exited.is_none() && exit_watch.has_exited_now() {
                self.exited = Some(Instant::now());
                let paused = control.paused.load(Ordering::SeqCst);
                if paused || !self.read_all(&mut pipes, &mut buf, events) {
                    // Whatever the script left behind goes with it.
                    self.sweep();
                }
            }
            let next_deadline = self.enforce(control);
            let paused = control.paused.load(Ordering::SeqCst);
            if let Some(l) = live.as_mut() {
                if self.exited.is_some() {
                    *live = None;
                } else if let Some(size) = l.take_feed(control)
                    && let Err(e) = spawn::set_size(&stdout, size)
                {
                    log::warn!("job {}: cannot resize its terminal: {e}", self.key.job);
                }
            }
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
            let wake_index = fds.len();
            fds.push(poll(wake.as_raw_fd()));
            let stdin_index = fds.len();
            if let Some((fd, events)) = live.as_ref().and_then(LiveStdin::wants) {
                fds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
            }
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
                self.exited.get_or_insert_with(Instant::now);
                return;
            }
            if fds[wake_index].revents != 0 {
                drain_wake(wake);
            }
            if let Some(l) = live.as_mut()
                && fds.len() > stdin_index
                && fds[stdin_index].fd == l.raw_fd()
                && fds[stdin_index].revents != 0
            {
                l.on_ready(fds[stdin_index].revents, self.key, events);
            }
            if paused {
                continue;
            }
            let mut closed = Vec::new();
            for (i, &(stream, fd)) in pipes.iter().enumerate() {
                if fds[i].revents == 0 {
                    continue;
                }
                if read_once(fd, stream, &mut buf, self.key, events) == Read::Closed {
                    closed.push(i);
                }
            }
            for i in closed.into_iter().rev() {
                pipes.remove(i);
            }
        }
        // `stdout` and `stderr` close here.
    }

    /// Reads what the pipes hold without waiting; true if that ended them all (nothing
    /// else holds them open).
    fn read_all(
        &mut self,
        pipes: &mut Vec<(Stream, i32)>,
        buf: &mut Vec<u8>,
        events: &dyn JobEvents,
    ) -> bool {
        pipes.retain(|&(stream, fd)| {
            // Bounded: a process that writes without end is not waited for here.
            for _ in 0..64 {
                match read_once(fd, stream, buf, self.key, events) {
                    Read::Data => {}
                    Read::Closed => return false,
                    Read::Empty => return true,
                }
            }
            true
        });
        pipes.is_empty()
    }
}

/// An interactive job's stdin on its supervisor: the bytes the session handed over,
/// written without waiting as the job's pipe or terminal takes them.
struct LiveStdin {
    /// Our end (non-blocking): the pipe's, or a second descriptor of the terminal's
    /// master. `None` once closed.
    fd: Option<OwnedFd>,
    terminal: bool,
    pending: VecDeque<Vec<u8>>,
    /// How much of the front buffer is written.
    front: usize,
    /// Bytes written, from the start.
    taken: u64,
    /// Stdin ends after the pending bytes.
    end: bool,
}

impl LiveStdin {
    fn new(fd: OwnedFd, terminal: bool) -> LiveStdin {
        LiveStdin {
            fd: Some(fd),
            terminal,
            pending: VecDeque::new(),
            front: 0,
            taken: 0,
            end: false,
        }
    }

    fn raw_fd(&self) -> i32 {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    /// Takes what the session handed over; returns a new terminal size, if one came.
    fn take_feed(&mut self, control: &Control) -> Option<PtySize> {
        let mut feed = crate::sync::lock(&control.feed);
        if self.fd.is_some() {
            self.pending.append(&mut feed.bytes);
            self.end |= feed.end;
        } else {
            feed.bytes.clear();
        }
        feed.resize.take()
    }

    /// The descriptor to poll, and for what: `POLLOUT` while there is something to
    /// write; nothing else otherwise (a pipe whose reader is gone still says `POLLERR`).
    fn wants(&self) -> Option<(i32, i16)> {
        let fd = self.fd.as_ref()?.as_raw_fd();
        let busy = !self.pending.is_empty() || self.end;
        Some((fd, if busy { libc::POLLOUT } else { 0 }))
    }

    /// Writes what it can without waiting; reports what was taken, or the close.
    fn on_ready(&mut self, revents: i16, key: JobKey, events: &dyn JobEvents) {
        let Some(fd) = self.fd.as_ref().map(|f| f.as_raw_fd()) else {
            return;
        };
        let before = self.taken;
        let mut closed = false;
        while let Some(buf) = self.pending.front() {
            let rest = &buf[self.front..];
            // SAFETY: `rest` is a live slice of its length; `fd` is our descriptor.
            let r = unsafe { libc::write(fd, rest.as_ptr() as *const libc::c_void, rest.len()) };
            if r > 0 {
                self.front += r as usize;
                self.taken += r as u64;
                if self.front == buf.len() {
                    self.pending.pop_front();
                    self.front = 0;
                }
                continue;
            }
            match io::Error::last_os_error().kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => break,
                // EPIPE (the reader is gone), EIO (the terminal is), or worse.
                _ => {
                    closed = true;
                    break;
                }
            }
        }
        if self.taken > before {
            events.stdin_taken(key, self.taken);
        }
        let idle = self.pending.is_empty() && !self.end;
        if closed || (idle && revents & (libc::POLLERR | libc::POLLHUP) != 0) {
            events.stdin_closed(key, self.taken);
            self.pending.clear();
            self.fd = None;
            return;
        }
        if self.pending.is_empty() && self.end {
            if self.terminal && !self.say_end_of_file(fd) {
                return; // the terminal's input is full: again when it takes more
            }
            // Closing a pipe's end is the job's end of file; a terminal's master stays
            // open (the job's output), only this second descriptor of it is closed.
            self.fd = None;
        }
    }

    /// Types the terminal's end-of-file character, if it is in canonical mode (as
    /// util-linux's `script` does at the end of its input): a program reading a line
    /// then sees the end. False if the terminal cannot take it now.
    fn say_end_of_file(&self, fd: i32) -> bool {
        // SAFETY: all-zero bytes are a valid `termios`, filled in by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `t` is a live, writable termios; `fd` is a terminal's master.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 || t.c_lflag & libc::ICANON == 0 {
            return true;
        }
        let eof = [t.c_cc[libc::VEOF]];
        loop {
            // SAFETY: one byte from a live local to our descriptor.
            let r = unsafe { libc::write(fd, eof.as_ptr() as *const libc::c_void, 1) };
            if r == 1 {
                return true;
            }
            match io::Error::last_os_error().kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => return false,
                _ => return true,
            }
        }
    }
}

#[derive(PartialEq, Eq)]
enum Read {
    Data,
    Empty,
    Closed,
}

/// One read from a job's pipe into `buf`, handed on as a chunk of its own: a large read
/// gives its buffer away (no copy; `buf` gets a new one), a small one is copied out.
fn read_once(
    fd: i32,
    stream: Stream,
    buf: &mut Vec<u8>,
    key: JobKey,
    events: &dyn JobEvents,
) -> Read {
    buf.clear();
    buf.reserve(OUTPUT_CHUNK);
    // SAFETY: `buf` has room for OUTPUT_CHUNK bytes (reserved above); `fd` is a pipe we own.
    let r = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, OUTPUT_CHUNK) };
    if r > 0 {
        // SAFETY: read initialised the first `r` bytes, and `r` ≤ OUTPUT_CHUNK ≤ capacity.
        unsafe { buf.set_len(r as usize) };
        let chunk = if buf.len() >= OUTPUT_CHUNK / 2 {
            let mut full = std::mem::replace(buf, Vec::with_capacity(OUTPUT_CHUNK));
            full.shrink_to_fit();
            full
        } else {
            buf.to_vec()
        };
        events.output(key, stream, Arc::new(chunk));
        return Read::Data;
    }
    if r == 0 {
        return Read::Closed;
    }
    match io::Error::last_os_error().kind() {
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => Read::Empty,
        _ => Read::Closed,
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

    /// The child's exit as `waitid` reports it, without reaping it; `None` while it has
    /// not exited (with `WNOHANG`) or when the call fails.
    fn peek(&self, flags: libc::c_int) -> Option<libc::siginfo_t> {
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
        (r == 0 && unsafe { info.si_pid() } != 0).then_some(info)
    }

    fn waitid(&self, flags: libc::c_int) -> bool {
        self.peek(flags).is_some()
    }

    /// How the child ended, once it has, without reaping it.
    fn outcome(&self) -> Option<Outcome> {
        let info = self.peek(libc::WNOHANG)?;
        // SAFETY: `info` was filled by waitid for an exited child; this reads a field of it.
        let status = unsafe { info.si_status() };
        match info.si_code {
            libc::CLD_EXITED => Some(Outcome::Exited(status)),
            libc::CLD_KILLED | libc::CLD_DUMPED => Some(Outcome::Signaled(status)),
            _ => None,
        }
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

/// A job's folder: its name in the work dir (held open), and what identifies it.
struct JobDir {
    parent: OwnedFd,
    name: CString,
    path: PathBuf,
    /// (device, inode): anything put in its place later is not it.
    id: (libc::dev_t, libc::ino_t),
}

/// Creates a new private folder for a job (mode 0700; `mkdir` fails rather than reuse
/// anything that exists, so a planted folder or link is never entered), owned by the job
/// user if there is one.
fn make_job_dir(work_dir: &Path, job: JobId, user: Option<&JobUser>) -> io::Result<JobDir> {
    let parent = folder::open_dir(work_dir)?;
    let owner = user.map(|u| (u.uid, u.gid));
    let mut last = None;
    for _ in 0..16 {
        let nonce = DIR_COUNTER.fetch_add(1, Ordering::Relaxed)
            ^ (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                .rotate_left(17));
        let name = format!("{DIR_PREFIX}{job}-{}-{nonce:016x}", std::process::id());
        let c_name = folder::c_string(OsStr::new(&name))?;
        match folder::make_private_dir(&parent, &c_name, owner) {
            Ok(id) => {
                return Ok(JobDir {
                    parent,
                    name: c_name,
                    path: work_dir.join(name),
                    id,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no unique folder name")))
}

/// Deletes a job's folder — if it is still the one made for the job — giving back any
/// permission the job took away from its own subfolders and following no symlink; a
/// failure is logged and returned for the job's result.
fn remove_job_dir(dir: &JobDir) -> Option<String> {
    let removed = folder::remove_tree(&dir.parent, &dir.name, |st| {
        (st.st_dev, st.st_ino) == dir.id
    });
    let msg = match removed {
        Ok(Removal::Removed | Removal::Gone) => return None,
        Ok(Removal::NotAFolder) => format!(
            "the job folder {} was replaced by something that is not a folder; left alone",
            dir.path.display()
        ),
        Ok(Removal::Refused { owner }) => format!(
            "the job folder {} was replaced by another folder (of uid {owner}); left alone",
            dir.path.display()
        ),
        Err(e) => format!(
            "could not delete the job folder {}: {e}",
            dir.path.display()
        ),
    };
    log::warn!("{msg}");
    Some(msg)
}

/// Deletes job folders left by worker processes that no longer exist (a worker killed
/// with SIGKILL cannot clean up). Folders of live workers, folders of users other than
/// `owners` (this worker's user and its job user) and anything that is not a folder are
/// left alone; nothing is followed (see `folder`).
pub(crate) fn sweep_stale_dirs(work_dir: &Path, owners: &[libc::uid_t]) {
    let Ok(wd) = folder::open_dir(work_dir) else {
        return;
    };
    let Ok(names) = folder::list(&wd) else {
        return;
    };
    for name in names {
        let Some(rest) = name.to_str().ok().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let mut parts = rest.split('-');
        let (_job, worker) = (
            parts.next(),
            parts.next().and_then(|p| p.parse::<i32>().ok()),
        );
        let Some(worker) = worker else { continue };
        // SAFETY: signal 0 only checks whether the process exists.
        let gone = worker > 0
            && unsafe { libc::kill(worker, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if !gone {
            continue;
        }
        let shown = work_dir.join(OsStr::from_bytes(name.to_bytes()));
        match folder::remove_tree(&wd, &name, |st| owners.contains(&st.st_uid)) {
            Ok(Removal::Removed) => log::info!(
                "removed {}, left by worker process {worker}, which is gone",
                shown.display()
            ),
            Ok(Removal::Refused { owner }) => log::info!(
                "left {} alone: it looks like a job folder but belongs to uid {owner}",
                shown.display()
            ),
            Ok(Removal::Gone | Removal::NotAFolder) => {}
            Err(e) => log::warn!("could not delete {}: {e}", shown.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::job_user;
    use super::*;
    use crossbeam_channel::unbounded;
    use std::os::unix::process::CommandExt;

    fn key(n: u64) -> JobKey {
        JobKey {
            manager: 0,
            job: JobId(n),
            run: n,
        }
    }

    /// What a job reported, in the order it did.
    #[derive(Debug)]
    enum ExecEvent {
        Output {
            stream: Stream,
            bytes: Chunk,
        },
        Exited {
            outcome: Outcome,
            cleanup_error: Option<String>,
        },
        CleanedUp {
            error: Option<String>,
        },
    }

    struct Events(crossbeam_channel::Sender<ExecEvent>);

    impl JobEvents for Events {
        fn output(&self, _: JobKey, stream: Stream, bytes: Chunk) {
            let _ = self.0.send(ExecEvent::Output { stream, bytes });
        }
        fn exited(&self, _: JobKey, outcome: Outcome, cleanup_error: Option<String>) {
            let _ = self.0.send(ExecEvent::Exited {
                outcome,
                cleanup_error,
            });
        }
        fn cleaned_up(&self, _: JobKey, error: Option<String>) {
            let _ = self.0.send(ExecEvent::CleanedUp { error });
        }
        fn stdin_taken(&self, _: JobKey, _: u64) {}
        fn stdin_closed(&self, _: JobKey, _: u64) {}
    }

    /// Runs a job on a thread of its own, reporting to `tx`.
    fn start(
        key: JobKey,
        spec: JobSpec,
        work_dir: PathBuf,
        grace: Duration,
        user: Option<JobUser>,
        tx: crossbeam_channel::Sender<ExecEvent>,
    ) -> io::Result<RunningJob> {
        let job = RunningJob::new()?;
        let j = job.clone();
        std::thread::spawn(move || {
            run(key, &spec, &work_dir, grace, user.as_ref(), &j, &Events(tx));
        });
        Ok(job)
    }

    fn start_job(spec: JobSpec) -> (RunningJob, crossbeam_channel::Receiver<ExecEvent>) {
        let (tx, rx) = unbounded();
        let job = start(
            key(1),
            spec,
            std::env::temp_dir(),
            Duration::from_secs(5),
            None,
            tx,
        )
        .unwrap();
        (job, rx)
    }

    /// Everything a job reports until its cleanup ends: outcome, stdout, stderr, and a
    /// cleanup error. Checks the order: output, then the exit, then the cleanup.
    fn collect(
        rx: &crossbeam_channel::Receiver<ExecEvent>,
    ) -> (Outcome, Vec<u8>, Vec<u8>, Option<String>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut exited = None;
        loop {
            match rx
                .recv_timeout(Duration::from_secs(60))
                .expect("job ends within a minute")
            {
                ExecEvent::Output { stream, bytes } => {
                    assert!(exited.is_none(), "output after the exit");
                    match stream {
                        Stream::Stdout => out.extend(bytes.iter()),
                        Stream::Stderr => err.extend(bytes.iter()),
                    }
                }
                ExecEvent::Exited {
                    outcome,
                    cleanup_error,
                } => {
                    assert!(exited.is_none(), "two exits");
                    exited = Some((outcome, cleanup_error));
                }
                ExecEvent::CleanedUp { error } => {
                    let (outcome, early) = exited.expect("the exit comes before the cleanup");
                    return (outcome, out, err, early.or(error));
                }
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
                ExecEvent::Output { bytes, .. } => got.extend(bytes.iter()),
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
                ExecEvent::Exited { outcome, .. } => break outcome,
                ExecEvent::CleanedUp { .. } => panic!("cleaned up before the exit"),
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
            None,
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
        let meta = std::fs::metadata("/proc/self/fd").unwrap();
        use std::os::unix::fs::MetadataExt;
        let dir = JobDir {
            parent: folder::open_dir(Path::new("/proc/self")).unwrap(),
            name: c"fd".to_owned(),
            path: "/proc/self/fd".into(),
            id: (meta.dev(), meta.ino()),
        };
        let r = remove_job_dir(&dir);
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

    fn euid() -> libc::uid_t {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }

    /// Whether this process runs as root. Without root, a test that needs it fails under
    /// `CI=true` (CI runs as root) and prints a loud skip line otherwise.
    fn root_or_skip(test: &str) -> bool {
        if euid() == 0 {
            return true;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test} needs root, and CI runs tests as root"
        );
        // Straight to stderr, past the test harness's capture, so that it is seen.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("!!!!! SKIPPED {test}: it needs root (not running as root) !!!!!\n").as_bytes(),
        );
        false
    }

    fn scratch(name: &str) -> PathBuf {
        let base = std::env::temp_dir().join(format!("workpool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        base
    }

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// A folder outside any job, as a job would like to reach it: files, and a subfolder
    /// locked with mode 000 (a walk that gave permissions back through a symlink would
    /// open it).
    fn outside_target(base: &Path) -> PathBuf {
        let outside = base.join("outside");
        std::fs::create_dir_all(outside.join("locked")).unwrap();
        std::fs::write(outside.join("precious"), "keep me").unwrap();
        std::fs::write(outside.join("locked/inner"), "keep me too").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            outside.join("locked"),
            std::fs::Permissions::from_mode(0o000),
        )
        .unwrap();
        outside
    }

    /// The outside folder is as `outside_target` made it.
    fn assert_untouched(outside: &Path) {
        assert_eq!(
            std::fs::read_to_string(outside.join("precious")).unwrap(),
            "keep me"
        );
        assert_eq!(
            mode(&outside.join("locked")),
            0o000,
            "the locked folder was opened up"
        );
        use std::os::unix::fs::PermissionsExt;
        let locked = outside.join("locked");
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(
            std::fs::read_to_string(locked.join("inner")).unwrap(),
            "keep me too"
        );
    }

    #[test]
    fn stale_folders_of_dead_workers_are_swept_and_live_ones_kept() {
        let base = scratch("sweep");
        // A pid that cannot exist (above the kernel's limit) and our own, live pid.
        let dead = base.join(format!("{DIR_PREFIX}7-{}-00", i32::MAX));
        let live = base.join(format!("{DIR_PREFIX}8-{}-00", std::process::id()));
        std::fs::create_dir_all(dead.join("sub")).unwrap();
        std::fs::create_dir_all(&live).unwrap();
        sweep_stale_dirs(&base, &[euid()]);
        assert!(!dead.exists());
        assert!(live.exists());
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn the_sweep_leaves_other_users_folders_and_symlinks_alone_and_follows_nothing() {
        let base = scratch("sweep-foreign");
        let outside = outside_target(&base);
        // Named as by a worker process that cannot exist (a pid above the kernel's limit).
        let stale_in = |base: &Path, n: u32| base.join(format!("{DIR_PREFIX}{n}-{}-00", i32::MAX));
        let stale = |n: u32| stale_in(&base, n);
        // A look-alike that is a symlink to a folder outside.
        std::os::unix::fs::symlink(&outside, stale(1)).unwrap();
        // A stale folder of ours that holds symlinks to it.
        std::fs::create_dir_all(stale(2).join("sub")).unwrap();
        std::os::unix::fs::symlink(&outside, stale(2).join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("locked"), stale(2).join("sub/link")).unwrap();
        // A look-alike of ours, swept by a worker that only owns folders of other users.
        std::fs::create_dir_all(stale(3)).unwrap();
        std::fs::write(stale(3).join("f"), "x").unwrap();
        sweep_stale_dirs(&base, &[euid().wrapping_add(1)]);
        assert!(
            stale(3).join("f").exists(),
            "a folder of another owner was swept"
        );
        sweep_stale_dirs(&base, &[euid()]);
        assert!(!stale(2).exists() && !stale(3).exists());
        assert!(std::fs::symlink_metadata(stale(1)).unwrap().is_symlink());
        assert_untouched(&outside);
        std::fs::remove_dir_all(&base).unwrap();

        if !root_or_skip("the_sweep_leaves_other_users_folders_and_symlinks_alone (foreign owner)")
        {
            return;
        }
        // Really another user's: nobody's look-alike is left alone by a root worker...
        let base = scratch("sweep-foreign-root");
        let stale = |n: u32| stale_in(&base, n);
        std::fs::create_dir_all(stale(4).join("sub")).unwrap();
        std::fs::write(stale(4).join("sub/f"), "x").unwrap();
        let nobody = job_user::lookup("nobody")
            .unwrap()
            .expect("a user called nobody");
        for p in [stale(4), stale(4).join("sub"), stale(4).join("sub/f")] {
            std::os::unix::fs::lchown(&p, Some(nobody.uid), Some(nobody.gid)).unwrap();
        }
        sweep_stale_dirs(&base, &[0]);
        assert!(
            stale(4).join("sub/f").exists(),
            "nobody's folder was swept by root"
        );
        // ... and swept by one whose jobs run as nobody.
        sweep_stale_dirs(&base, &[0, nobody.uid]);
        assert!(!stale(4).exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_symlink_planted_in_the_job_folder_is_not_followed_when_it_is_deleted() {
        let base = scratch("planted");
        let outside = outside_target(&base);
        let o = outside.display();
        let (result, out, _, cleanup) = run_job(JobSpec::new(format!(
            "ln -s {o} link; ln -s {o}/locked locked-link; mkdir -p sub/deeper; \
             ln -s {o} sub/deeper/link; ln -s {o}/precious sub/file-link; \
             chmod 000 sub/deeper sub; chmod 500 .; pwd"
        )));
        assert_eq!(result, Outcome::Exited(0));
        assert_eq!(cleanup, None);
        assert!(!Path::new(String::from_utf8(out).unwrap().trim()).exists());
        assert_untouched(&outside);
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// The body of `an_unprivileged_worker_gives_back_permissions_without_following_links`,
    /// run by a process of an unprivileged user (where root would need no permission
    /// back). Without its variable it does nothing.
    #[test]
    #[ignore]
    fn unprivileged_removal_child() {
        if let Ok(base) = std::env::var("WP_UNPRIVILEGED_REMOVAL") {
            unprivileged_removal(Path::new(&base));
        }
    }

    fn unprivileged_removal(base: &Path) {
        assert_ne!(euid(), 0);
        let outside = outside_target(base);
        let job = base.join("job");
        std::fs::create_dir_all(job.join("sub/deeper")).unwrap();
        std::fs::write(job.join("sub/deeper/f"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, job.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("locked"), job.join("sub/link")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for p in [job.join("sub/deeper"), job.join("sub"), job.clone()] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
        }
        let wd = folder::open_dir(base).unwrap();
        let removed = folder::remove_tree(&wd, c"job", |_| true).unwrap();
        assert_eq!(removed, Removal::Removed);
        assert!(!job.exists());
        assert_untouched(&outside);
        std::fs::remove_dir_all(&outside).unwrap();
        // A process of the job swaps a locked subfolder and a symlink during the delete.
        #[cfg(target_os = "linux")]
        folder::tests::delete_while_swapping(base, 50);
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn an_unprivileged_worker_gives_back_permissions_without_following_links() {
        let base = scratch("unprivileged-removal");
        if euid() != 0 {
            // Already unprivileged: run the body here.
            unprivileged_removal(&base);
            return;
        }
        let nobody = job_user::lookup("nobody")
            .unwrap()
            .expect("a user called nobody");
        std::os::unix::fs::chown(&base, Some(nobody.uid), Some(nobody.gid)).unwrap();
        // A copy of this test program that nobody may run wherever the build is.
        let bin = scratch("unprivileged-removal-bin");
        let exe = bin.join("tests");
        std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
        let out = Command::new(&exe)
            .args([
                "worker::executor::tests::unprivileged_removal_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("WP_UNPRIVILEGED_REMOVAL", &base)
            .uid(nobody.uid)
            .gid(nobody.gid)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!base.exists(), "the child did not run to its end");
        std::fs::remove_dir_all(bin).unwrap();
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
