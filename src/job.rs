//! Jobs as plain data: what is asked ([`JobSpec`]), what happens ([`JobEvent`]),
//! and how it ends ([`Outcome`], [`JobResult`]). No I/O and no threads here.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

/// A job's id: unique within one manager, counting up from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a worker must offer to run a job: every listed tag, and the platform if one is named.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Requirements {
    /// Tags the worker must all have.
    pub tags: BTreeSet<String>,
    /// The platform the worker must report (for example `linux-x86_64`), if any.
    pub platform: Option<String>,
}

impl Requirements {
    /// Whether a worker with these tags and this platform may run the job.
    pub fn matches(&self, tags: &BTreeSet<String>, platform: &str) -> bool {
        self.platform.as_deref().is_none_or(|p| p == platform) && self.tags.is_subset(tags)
    }
}

impl fmt::Display for Requirements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tags: Vec<&str> = self.tags.iter().map(String::as_str).collect();
        write!(f, "tags [{}]", tags.join(","))?;
        if let Some(p) = &self.platform {
            write!(f, ", platform {p}")?;
        }
        Ok(())
    }
}

/// The longest timeout and kill grace a job may have (365 days): deadlines built from
/// them must fit the clock.
pub const MAX_JOB_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// A job: a bash script and what the worker running it must offer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Run as `/bin/bash -c SCRIPT` in a fresh private temp folder.
    pub script: String,
    /// Which workers may run it.
    pub requirements: Requirements,
    /// Higher runs first among queued jobs a worker could take; FIFO within a priority.
    pub priority: i32,
    /// Deadline from the start: then SIGTERM, SIGKILL after the grace period, and the job
    /// ends [`Outcome::TimedOut`].
    pub timeout: Option<Duration>,
    /// Between SIGTERM and SIGKILL on a timeout or cancel (the worker's default if unset).
    pub kill_grace: Option<Duration>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Bytes fed to the job's standard input (empty: stdin is `/dev/null`).
    #[serde(with = "crate::protocol::byte_buf")]
    pub stdin: Vec<u8>,
    /// How many times the job is queued again after ending [`Outcome::WorkerLost`]
    /// (default 0: at most once, since a script may not be safe to run twice).
    pub retries: u32,
    /// For a remote submitter ([`Client`](crate::Client)): the job runs on if its
    /// submitter goes away, and the manager keeps its outcome and the last part of its
    /// output for a later `attach`. An attached job (the default) is cancelled when its
    /// submitter has been gone for the reconnect grace. A job submitted in process is
    /// never cancelled for its submitter, so this changes nothing there.
    pub detached: bool,
    /// Whether the job's stdin stays open and is fed while it runs
    /// ([`JobHandle::stdin`](crate::JobHandle::stdin)), instead of `stdin`'s bytes up
    /// front. Flow control is end to end: a job that does not read makes the writer wait.
    pub interactive: bool,
    /// Run the job under a pseudo-terminal of this size, as the session leader with the
    /// terminal as its controlling terminal: its stdout and stderr come merged as stdout.
    /// A terminal job is interactive.
    pub pty: Option<PtySize>,
}

/// A terminal's size, in characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PtySize {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

impl JobSpec {
    /// A job that runs `script` on any worker.
    pub fn new(script: impl Into<String>) -> JobSpec {
        JobSpec {
            script: script.into(),
            requirements: Requirements::default(),
            priority: 0,
            timeout: None,
            kill_grace: None,
            env: BTreeMap::new(),
            stdin: Vec::new(),
            retries: 0,
            detached: false,
            interactive: false,
            pty: None,
        }
    }

    /// Keeps the job's stdin open, to be written while it runs (see
    /// [`JobSpec::interactive`]).
    pub fn interactive(mut self) -> JobSpec {
        self.interactive = true;
        self
    }

    /// Runs the job under a pseudo-terminal of `rows` × `cols` (see [`JobSpec::pty`]); the
    /// job is interactive.
    pub fn pty(mut self, rows: u16, cols: u16) -> JobSpec {
        self.pty = Some(PtySize { rows, cols });
        self.interactive = true;
        self
    }

    /// Makes the job independent of its submitter (see [`JobSpec::detached`]).
    pub fn detached(mut self) -> JobSpec {
        self.detached = true;
        self
    }

    /// Sets a deadline (see [`JobSpec::timeout`]).
    pub fn timeout(mut self, timeout: Duration) -> JobSpec {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the grace between SIGTERM and SIGKILL.
    pub fn kill_grace(mut self, grace: Duration) -> JobSpec {
        self.kill_grace = Some(grace);
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> JobSpec {
        self.env.insert(name.into(), value.into());
        self
    }

    /// Sets the bytes fed to standard input.
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> JobSpec {
        self.stdin = bytes.into();
        self
    }

    /// Sets how many times the job may be re-queued after its worker is lost.
    pub fn retries(mut self, retries: u32) -> JobSpec {
        self.retries = retries;
        self
    }

    /// Checks what a worker cannot check for itself; `Err` says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.script.trim().is_empty() {
            return Err("the script is empty".into());
        }
        if self.script.contains('\0') {
            return Err("the script contains a NUL byte".into());
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(format!("{name:?} is not a valid environment variable name"));
            }
            if value.contains('\0') {
                return Err(format!("the value of {name} contains a NUL byte"));
            }
            // The manager sets an array job's index; the worker sets the others.
            if name.starts_with("WORKPOOL_") && name != "WORKPOOL_ARRAY_INDEX" {
                return Err(format!("{name}: WORKPOOL_ variables are set by the worker"));
            }
        }
        if self.interactive && !self.stdin.is_empty() {
            return Err(
                "an interactive job takes its stdin while it runs: write these bytes to it instead"
                    .into(),
            );
        }
        if self.pty.is_some() && !self.interactive {
            return Err("a terminal job is interactive".into());
        }
        if self.pty.is_some_and(|p| p.rows == 0 || p.cols == 0) {
            return Err("a terminal must have at least one row and one column".into());
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err("a timeout must be longer than zero".into());
        }
        if self.timeout.is_some_and(|t| t > MAX_JOB_DURATION) {
            return Err("a timeout must be at most 365 days".into());
        }
        if self.kill_grace.is_some_and(|t| t > MAX_JOB_DURATION) {
            return Err("a kill grace must be at most 365 days".into());
        }
        Ok(())
    }

    /// Roughly how many bytes the job takes on the wire.
    pub fn wire_size(&self) -> usize {
        self.script.len()
            + self.stdin.len()
            + self
                .requirements
                .tags
                .iter()
                .map(|t| t.len() + 8)
                .sum::<usize>()
            + self.requirements.platform.as_ref().map_or(0, String::len)
            + self
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len() + 16)
                .sum::<usize>()
            + 64
    }

    /// Sets the priority (default 0; higher first).
    pub fn priority(mut self, priority: i32) -> JobSpec {
        self.priority = priority;
        self
    }

    /// Only workers with this tag may run the job (adds to earlier tags).
    pub fn require_tag(mut self, tag: impl Into<String>) -> JobSpec {
        self.requirements.tags.insert(tag.into());
        self
    }

    /// Only workers reporting this platform (for example `linux-x86_64`) may run the job.
    pub fn require_platform(mut self, platform: impl Into<String>) -> JobSpec {
        self.requirements.platform = Some(platform.into());
        self
    }
}

/// Which output stream bytes came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stream {
    /// The job's standard output.
    Stdout,
    /// The job's standard error.
    Stderr,
}

impl Stream {
    /// `"stdout"` or `"stderr"`.
    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// How a job ended. Every submitted job gets exactly one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Outcome {
    /// The script exited with this code.
    Exited(i32),
    /// The script was killed by this signal.
    Signaled(i32),
    /// The job ran past its deadline and was killed.
    TimedOut,
    /// The job was cancelled (before or while running).
    Cancelled,
    /// The worker running the job went away before it finished.
    WorkerLost,
    /// The job was never run, for this reason (for example: the manager is shutting down).
    Rejected(String),
    /// The worker could not start the script (for example: no `/bin/bash`, no temp folder).
    SpawnFailed(String),
}

impl Outcome {
    /// The outcome's name as used in the CLI's JSON: `exited`, `signaled`, `timed_out`,
    /// `cancelled`, `worker_lost`, `rejected`, `spawn_failed`.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Exited(_) => "exited",
            Outcome::Signaled(_) => "signaled",
            Outcome::TimedOut => "timed_out",
            Outcome::Cancelled => "cancelled",
            Outcome::WorkerLost => "worker_lost",
            Outcome::Rejected(_) => "rejected",
            Outcome::SpawnFailed(_) => "spawn_failed",
        }
    }

    /// The exit code, for [`Outcome::Exited`].
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Outcome::Exited(c) => Some(*c),
            _ => None,
        }
    }

    /// True only for `Exited(0)`.
    pub fn success(&self) -> bool {
        *self == Outcome::Exited(0)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Exited(c) => write!(f, "exited with code {c}"),
            Outcome::Signaled(s) => write!(f, "killed by signal {s}"),
            Outcome::TimedOut => write!(f, "timed out"),
            Outcome::Cancelled => write!(f, "cancelled"),
            Outcome::WorkerLost => write!(f, "worker lost"),
            Outcome::Rejected(r) => write!(f, "rejected: {r}"),
            Outcome::SpawnFailed(r) => write!(f, "spawn failed: {r}"),
        }
    }
}

/// What happens to a job, in order: `Queued`, then `Started`, any number of `Output`
/// and `Warning`, and always exactly one `Finished` last.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum JobEvent {
    /// The job waits in the manager's queue.
    Queued,
    /// A worker took the job.
    Started {
        /// The worker's name.
        worker: String,
    },
    /// Bytes the job wrote, as they were produced (never truncated).
    Output {
        /// Which stream.
        stream: Stream,
        /// The bytes, in order; chunk boundaries carry no meaning.
        #[serde(with = "crate::protocol::byte_buf")]
        bytes: Vec<u8>,
    },
    /// The job's worker was lost and the job waits in the queue again (see
    /// [`JobSpec::retries`]); output of the lost attempt has already been delivered.
    Requeued {
        /// The attempt that comes next (2 for the first retry).
        attempt: u32,
    },
    /// Something worth knowing that did not change the outcome
    /// (for example: the worker could not delete the job's temp folder).
    Warning(String),
    /// The job ended. Nothing follows.
    Finished(Outcome),
}

/// A finished job: its outcome and everything it wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobResult {
    /// The job.
    pub id: JobId,
    /// How it ended.
    pub outcome: Outcome,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
    /// The worker that ran it last, if any did.
    pub worker: Option<String>,
    /// Warnings seen on the way (see [`JobEvent::Warning`]).
    pub warnings: Vec<String>,
    /// How many times the job was started (more than 1 after retries).
    pub attempts: u32,
    /// Whether `stdout` or `stderr` were cut at the manager's `result_output_limit`
    /// (the live [`JobEvent::Output`] events are never cut).
    pub truncated: bool,
}

/// A job's result as its events arrive: what [`JobHandle`](crate::JobHandle) and
/// [`RemoteJob`](crate::RemoteJob) gather until the job's `Finished`.
#[derive(Default)]
pub(crate) struct Partial {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    attempts: u32,
    truncated: bool,
    worker: Option<String>,
    warnings: Vec<String>,
}

impl Partial {
    /// Takes the events of job `id` from `events` until its end (its result) or until
    /// `deadline`, if there is one (`None`; what came so far is kept for the next call).
    pub(crate) fn gather(
        &mut self,
        id: JobId,
        limit: usize,
        events: &crossbeam_channel::Receiver<JobEvent>,
        deadline: Option<std::time::Instant>,
        gone: &str,
    ) -> Option<JobResult> {
        use crossbeam_channel::RecvTimeoutError;
        loop {
            let ev = match deadline {
                None => events.recv().ok(),
                Some(d) => match events.recv_deadline(d) {
                    Ok(ev) => Some(ev),
                    Err(RecvTimeoutError::Timeout) => return None,
                    Err(RecvTimeoutError::Disconnected) => None,
                },
            };
            if let Some(r) = self.absorb(id, limit, ev, gone) {
                return Some(r);
            }
        }
    }

    /// Takes one event of job `id` (each stream kept up to `limit` bytes); returns the
    /// result at its `Finished`. `None` is the channel closed without a `Finished`: the
    /// job ends `Rejected(gone)`.
    pub(crate) fn absorb(
        &mut self,
        id: JobId,
        limit: usize,
        ev: Option<JobEvent>,
        gone: &str,
    ) -> Option<JobResult> {
        let outcome = match ev {
            None => Outcome::Rejected(gone.into()),
            Some(JobEvent::Finished(o)) => o,
            Some(JobEvent::Output { stream, bytes }) => {
                let buf = match stream {
                    Stream::Stdout => &mut self.stdout,
                    Stream::Stderr => &mut self.stderr,
                };
                let room = limit.saturating_sub(buf.len());
                if bytes.len() > room {
                    self.truncated = true;
                }
                buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
                return None;
            }
            Some(JobEvent::Started { worker }) => {
                self.worker = Some(worker);
                self.attempts += 1;
                return None;
            }
            Some(JobEvent::Warning(w)) => {
                self.warnings.push(w);
                return None;
            }
            Some(_) => return None,
        };
        let p = std::mem::take(self);
        Some(JobResult {
            id,
            outcome,
            stdout: p.stdout,
            stderr: p.stderr,
            worker: p.worker,
            warnings: p.warnings,
            attempts: p.attempts,
            truncated: p.truncated,
        })
    }
}

/// Where a job that has not ended is (see `Manager::job`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// Running on this worker.
    Running {
        /// The worker's name.
        worker: String,
    },
    /// Its worker's connection dropped; the job waits (up to the reconnect grace) for
    /// that worker to come back with it.
    Disconnected {
        /// The worker's name.
        worker: String,
    },
}

/// A job that has not ended yet, as the manager sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job.
    pub id: JobId,
    /// Queued or running where.
    pub state: JobState,
    /// How long it has been in that state.
    pub since: Duration,
    /// Which attempt this is (1 unless it was retried).
    pub attempt: u32,
    /// Its script (empty when a remote submitter lists another certificate's job: see
    /// docs/SECURITY.md).
    pub script: String,
    /// Its priority.
    pub priority: i32,
    /// Whether its worker was told to stop reading its output for now because the
    /// submitter is behind (the job waits on its own writes meanwhile).
    pub output_paused: bool,
}

impl JobResult {
    /// Standard output as (lossy) UTF-8.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Standard error as (lossy) UTF-8.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements_match_tag_subsets_and_platform() {
        let worker_tags: BTreeSet<String> = ["gpu", "big"].iter().map(|s| s.to_string()).collect();
        assert!(Requirements::default().matches(&worker_tags, "linux-x86_64"));
        let r = JobSpec::new("x").require_tag("gpu").requirements;
        assert!(r.matches(&worker_tags, "any"));
        let r = JobSpec::new("x")
            .require_tag("gpu")
            .require_tag("arm")
            .requirements;
        assert!(!r.matches(&worker_tags, "any"));
        let r = JobSpec::new("x")
            .require_platform("linux-x86_64")
            .requirements;
        assert!(r.matches(&worker_tags, "linux-x86_64"));
        assert!(!r.matches(&worker_tags, "macos-aarch64"));
    }

    #[test]
    fn outcome_names_are_the_cli_names() {
        assert_eq!(Outcome::Exited(0).name(), "exited");
        assert_eq!(Outcome::WorkerLost.name(), "worker_lost");
        assert_eq!(Outcome::SpawnFailed("x".into()).name(), "spawn_failed");
        assert!(Outcome::Exited(0).success());
        assert!(!Outcome::Exited(1).success());
        assert_eq!(Outcome::Signaled(9).exit_code(), None);
    }
    #[test]
    fn timeouts_and_graces_longer_than_a_year_are_refused() {
        let year = MAX_JOB_DURATION;
        assert!(JobSpec::new("true").timeout(year).validate().is_ok());
        assert!(JobSpec::new("true").kill_grace(year).validate().is_ok());
        for long in [year + Duration::from_secs(1), Duration::MAX] {
            let e = JobSpec::new("true").timeout(long).validate().unwrap_err();
            assert!(e.contains("timeout must be at most 365 days"), "{e}");
            let e = JobSpec::new("true")
                .kill_grace(long)
                .validate()
                .unwrap_err();
            assert!(e.contains("kill grace must be at most 365 days"), "{e}");
        }
    }
}
