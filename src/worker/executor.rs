//! Runs one job: `/bin/bash -c SCRIPT` in a fresh 0700 folder under the work dir, in its
//! own process group, stdin empty, `WORKPOOL_JOB_ID` set. One thread per job polls the
//! two output pipes and the process (a pidfd on Linux) and sends output as it comes.
//! When the script exits, whatever it left running in its process group is killed, the
//! process is reaped, the folder is deleted, and `Finished` is sent last.
//! Nothing here knows about connections.

use crate::job::{JobId, JobSpec, Outcome, Stream};
use crate::protocol::OUTPUT_CHUNK;
use crossbeam_channel::Sender;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// After the script exits, how long its output pipes may stay open (held by a process
/// that escaped its process group) before reading stops.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// What a running job reports.
#[derive(Debug)]
pub(crate) enum ExecEvent {
    Output {
        job: JobId,
        stream: Stream,
        bytes: Vec<u8>,
    },
    Finished {
        job: JobId,
        outcome: Outcome,
        cleanup_error: Option<String>,
    },
}

struct Control {
    /// The job's pid (= its process group id) until it is reaped; then `None`, so that a
    /// late cancel can never signal a recycled pid.
    pid: Mutex<Option<i32>>,
    cancelled: AtomicBool,
}

/// A started job, for cancelling it.
pub(crate) struct RunningJob {
    control: Arc<Control>,
}

impl RunningJob {
    /// Kills the job's process group; the job then ends `Cancelled`.
    pub(crate) fn cancel(&self) {
        self.control.cancelled.store(true, Ordering::SeqCst);
        let pid = self.control.pid.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pid) = *pid {
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
}

/// Starts a job on a thread of its own. Its events, `Finished` last, go to `events`.
pub(crate) fn start(
    job: JobId,
    spec: JobSpec,
    work_dir: PathBuf,
    events: Sender<ExecEvent>,
) -> io::Result<RunningJob> {
    let control = Arc::new(Control {
        pid: Mutex::new(None),
        cancelled: AtomicBool::new(false),
    });
    let c = control.clone();
    std::thread::Builder::new()
        .name(format!("wp-job-{job}"))
        .spawn(move || {
            let (outcome, cleanup_error) = run(job, &spec, &work_dir, &c, &events);
            let _ = events.send(ExecEvent::Finished {
                job,
                outcome,
                cleanup_error,
            });
        })?;
    Ok(RunningJob { control })
}

fn run(
    job: JobId,
    spec: &JobSpec,
    work_dir: &Path,
    control: &Control,
    events: &Sender<ExecEvent>,
) -> (Outcome, Option<String>) {
    let dir = match make_job_dir(work_dir, job) {
        Ok(d) => d,
        Err(e) => {
            return (
                Outcome::SpawnFailed(format!(
                    "cannot create a job folder in {}: {e}",
                    work_dir.display()
                )),
                None,
            );
        }
    };
    let spawned = Command::new("/bin/bash")
        .arg("-c")
        .arg(&spec.script)
        .current_dir(&dir)
        .env("WORKPOOL_JOB_ID", job.0.to_string())
        .stdin(Stdio::null())
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
    *control.pid.lock().unwrap_or_else(|p| p.into_inner()) = Some(pid);
    if control.cancelled.load(Ordering::SeqCst) {
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    pump(job, &mut child, pid, events);
    let status = {
        let mut guard = control.pid.lock().unwrap_or_else(|p| p.into_inner());
        let status = child.wait();
        *guard = None;
        status
    };
    let outcome = match status {
        _ if control.cancelled.load(Ordering::SeqCst) => Outcome::Cancelled,
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => Outcome::Exited(code),
            (None, Some(sig)) => Outcome::Signaled(sig),
            (None, None) => Outcome::SpawnFailed(format!("unknown exit status {s:?}")),
        },
        Err(e) => Outcome::SpawnFailed(format!("waiting for the script: {e}")),
    };
    (outcome, remove_job_dir(&dir))
}

/// Reads both pipes until they close and the process has exited (not reaped: its pid
/// and process group stay reserved until the caller reaps it).
fn pump(job: JobId, child: &mut Child, pid: i32, events: &Sender<ExecEvent>) {
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut pipes: Vec<(Stream, i32)> = Vec::with_capacity(2);
    if let Some(s) = &stdout {
        pipes.push((Stream::Stdout, s.as_raw_fd()));
    }
    if let Some(s) = &stderr {
        pipes.push((Stream::Stderr, s.as_raw_fd()));
    }
    let exit_fd = ExitWatch::new(pid);
    let mut exited_at: Option<Instant> = None;
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    loop {
        if exited_at.is_none() && exit_fd.has_exited_now() {
            exited_at = Some(Instant::now());
            // Whatever the script left behind in its group goes with it.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        if pipes.is_empty() && exited_at.is_some() {
            return;
        }
        let mut fds: Vec<libc::pollfd> = pipes
            .iter()
            .map(|&(_, fd)| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let timeout_ms = match exited_at {
            Some(t) => {
                let left = DRAIN_AFTER_EXIT.saturating_sub(t.elapsed());
                if left.is_zero() {
                    log::warn!(
                        "job {job}: output still open {} s after the script exited \
                         (held by a process outside its process group); no longer reading it",
                        DRAIN_AFTER_EXIT.as_secs()
                    );
                    return;
                }
                left.as_millis() as i32 + 1
            }
            None => {
                if let Some(fd) = exit_fd.fd() {
                    fds.push(libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    -1
                } else {
                    50
                }
            }
        };
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("job {job}: poll failed: {e}");
            return;
        }
        let mut closed = Vec::new();
        for (i, &(stream, fd)) in pipes.iter().enumerate() {
            if fds[i].revents == 0 {
                continue;
            }
            let r = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if r > 0 {
                let bytes = buf[..r as usize].to_vec();
                let _ = events.send(ExecEvent::Output { job, stream, bytes });
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

/// Tells when a child has exited without reaping it: a pidfd where the kernel has them,
/// else `waitid(WNOWAIT)` polled by the caller.
struct ExitWatch {
    pid: i32,
    pidfd: Option<std::os::fd::OwnedFd>,
}

impl ExitWatch {
    fn new(pid: i32) -> ExitWatch {
        #[cfg(target_os = "linux")]
        let pidfd = {
            use std::os::fd::FromRawFd;
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
            (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
        };
        #[cfg(not(target_os = "linux"))]
        let pidfd = None;
        ExitWatch { pid, pidfd }
    }

    fn fd(&self) -> Option<i32> {
        self.pidfd.as_ref().map(|f| f.as_raw_fd())
    }

    fn has_exited_now(&self) -> bool {
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        r == 0 && unsafe { info.si_pid() } != 0
    }
}

static DIR_COUNTER: AtomicU64 = AtomicU64::new(0);

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
            "workpool-job-{job}-{}-{nonce:016x}",
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

/// Deletes a job's folder; a failure is logged and returned for the job's result.
fn remove_job_dir(dir: &Path) -> Option<String> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            let msg = format!("could not delete the job folder {}: {e}", dir.display());
            log::warn!("{msg}");
            Some(msg)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::unbounded;

    fn run_job(script: &str) -> (Outcome, Vec<u8>, Vec<u8>, Option<String>) {
        let (tx, rx) = unbounded();
        let _job = start(JobId(1), JobSpec::new(script), std::env::temp_dir(), tx).unwrap();
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

    #[test]
    fn exit_code_and_both_streams_come_back() {
        let (o, out, err, c) = run_job("echo out; echo err >&2; exit 3");
        assert_eq!(o, Outcome::Exited(3));
        assert_eq!(out, b"out\n");
        assert_eq!(err, b"err\n");
        assert_eq!(c, None);
    }

    #[test]
    fn the_job_runs_in_a_private_folder_that_is_deleted_afterwards() {
        let (o, out, _, _) = run_job("pwd; stat -c %a .; echo $WORKPOOL_JOB_ID");
        assert_eq!(o, Outcome::Exited(0));
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("workpool-job-1-"), "{text}");
        assert_eq!(lines[1], "700");
        assert_eq!(lines[2], "1");
        assert!(!Path::new(lines[0]).exists());
    }

    #[test]
    fn a_background_process_left_behind_does_not_hold_the_job_open() {
        // `sleep` inherits stdout; without the group kill the pipe would stay open 600 s.
        let (o, out, _, _) = run_job("sleep 600 & echo started");
        assert_eq!(o, Outcome::Exited(0));
        assert_eq!(out, b"started\n");
    }

    #[test]
    fn a_signal_is_reported_as_signaled() {
        let (o, _, _, _) = run_job("kill -SEGV $$");
        assert_eq!(o, Outcome::Signaled(libc::SIGSEGV));
    }

    #[test]
    fn cancel_kills_the_job_and_reports_cancelled() {
        let (tx, rx) = unbounded();
        let job = start(
            JobId(2),
            JobSpec::new("echo up; sleep 600"),
            std::env::temp_dir(),
            tx,
        )
        .unwrap();
        match rx.recv_timeout(Duration::from_secs(30)).unwrap() {
            ExecEvent::Output { bytes, .. } => assert_eq!(bytes, b"up\n"),
            other => panic!("{other:?}"),
        }
        job.cancel();
        match rx.recv_timeout(Duration::from_secs(30)).unwrap() {
            ExecEvent::Finished { outcome, .. } => assert_eq!(outcome, Outcome::Cancelled),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_missing_work_dir_is_a_spawn_failure() {
        let (tx, rx) = unbounded();
        let _j = start(
            JobId(3),
            JobSpec::new("true"),
            "/nonexistent/workpool".into(),
            tx,
        )
        .unwrap();
        match rx.recv_timeout(Duration::from_secs(30)).unwrap() {
            ExecEvent::Finished {
                outcome: Outcome::SpawnFailed(m),
                ..
            } => assert!(m.contains("/nonexistent/workpool"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_delete_is_reported() {
        // /proc entries cannot be removed, even by root.
        let r = remove_job_dir(Path::new("/proc/self/fd"));
        assert!(r.unwrap().contains("could not delete"));
    }
}
