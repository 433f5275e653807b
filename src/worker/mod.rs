//! The worker: dials the manager (it never listens, so it works behind NAT), registers,
//! runs the jobs it is given and streams their output back. When the connection fails
//! or cannot be made yet it retries with capped exponential backoff and jitter, until
//! [`Worker::stop`]. One thread owns the worker's state; each session adds a reader and
//! a writer thread; each job has a thread of its own (see `executor`).

mod executor;
mod folder;
mod job_user;
mod tree;

use crate::error::{Error, Result};
use crate::job::Outcome;
use crate::job::{JobId, Stream};
use crate::link::{self, Liveness, Outbound, Timing};
use crate::protocol::{HeldJob, ManagerMessage, Welcome, WorkerHello, WorkerMessage};
use crate::tls::{self, Identity, PeerTrust};
use crossbeam_channel::{Receiver, Sender, bounded, select, unbounded};
use executor::{ExecEvent, JobKey, RunningJob};
use job_user::JobUser;
use rustls::ClientConfig;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long [`Worker::stop`] waits for killed jobs to be reaped and cleaned up.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// The longest grace or timeout taken from a configuration or a welcome (longer ones
/// are refused or cut to it), so that no deadline built from one can overflow.
const MAX_GRACE: Duration = Duration::from_secs(365 * 86_400);

/// How the worker authenticates itself and the manager.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum WorkerSecurity {
    /// Mutual TLS: the worker shows `identity`; the manager's certificate must be
    /// exactly one of the pinned ones in `manager_trust`, or one that one of its CAs
    /// issued.
    MutualTls {
        /// The worker's certificate and key.
        identity: Identity,
        /// The manager's certificate (pinned, accepted only as itself) and the CAs that
        /// issue the manager's certificate, as two separate lists.
        manager_trust: PeerTrust,
        /// Check that the manager's certificate names the host dialled (on by default).
        verify_hostname: bool,
    },
    /// No TLS. For tests and trusted loopback only; logged loudly.
    InsecurePlaintext,
}

/// Settings of a worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The manager's host name or address.
    pub host: String,
    /// The manager's port.
    pub port: u16,
    /// How the link is secured.
    pub security: WorkerSecurity,
    /// The name announced to the manager (unique among its workers).
    pub name: String,
    /// Tags jobs can require.
    pub tags: BTreeSet<String>,
    /// The platform announced, detected as `OS-ARCH` (e.g. `linux-x86_64`).
    pub platform: String,
    /// How many jobs run at once.
    pub slots: u32,
    /// Where job folders are made (the system temp dir by default).
    pub work_dir: PathBuf,
    /// Deadline for connecting, the TLS handshake and the hello.
    pub connect_timeout: Duration,
    /// First wait before reconnecting; doubles per failure up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Longest wait between attempts.
    pub backoff_max: Duration,
    /// Between SIGTERM and SIGKILL when a job times out or is cancelled, unless the job
    /// sets its own.
    pub kill_grace: Duration,
    /// Per job, how much output is kept for a reconnect: recently sent output that may
    /// not have arrived, and output made while disconnected (beyond that the job waits).
    pub reconnect_buffer: usize,
    /// Runs every job as this user, with its primary group and no supplementary groups,
    /// so that a job cannot read the worker's key or other users' files; its job folders
    /// belong to that user. The worker must run as root, and [`Worker::start`] refuses a
    /// user that does not exist (or is root). `None` (the default): jobs run as the
    /// worker's own user.
    pub job_user: Option<String>,
}

/// `OS-ARCH` of this machine, e.g. `linux-x86_64`.
pub fn detect_platform() -> String {
    format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for `buf.len()` bytes, the length passed.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if r == 0 && end > 0 {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "worker".into()
    }
}

impl WorkerConfig {
    /// A mutual-TLS worker for the manager at `host:port`, hostname verification on.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        identity: Identity,
        manager_trust: PeerTrust,
    ) -> WorkerConfig {
        WorkerConfig::with_security(
            host,
            port,
            WorkerSecurity::MutualTls {
                identity,
                manager_trust,
                verify_hostname: true,
            },
        )
    }

    /// A worker without TLS (see [`WorkerSecurity::InsecurePlaintext`]).
    pub fn insecure_plaintext(host: impl Into<String>, port: u16) -> WorkerConfig {
        WorkerConfig::with_security(host, port, WorkerSecurity::InsecurePlaintext)
    }

    fn with_security(host: impl Into<String>, port: u16, security: WorkerSecurity) -> WorkerConfig {
        WorkerConfig {
            host: host.into(),
            port,
            security,
            name: format!("{}-{}", hostname(), std::process::id()),
            tags: BTreeSet::new(),
            platform: detect_platform(),
            slots: 1,
            work_dir: std::env::temp_dir(),
            connect_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            kill_grace: Duration::from_secs(5),
            reconnect_buffer: 8 << 20,
            job_user: None,
        }
    }

    /// Sets the name.
    pub fn name(mut self, name: impl Into<String>) -> WorkerConfig {
        self.name = name.into();
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> WorkerConfig {
        self.tags.insert(tag.into());
        self
    }

    /// Sets the number of slots.
    pub fn slots(mut self, slots: u32) -> WorkerConfig {
        self.slots = slots;
        self
    }

    /// Runs every job as this user (see [`WorkerConfig::job_user`]).
    pub fn job_user(mut self, name: impl Into<String>) -> WorkerConfig {
        self.job_user = Some(name.into());
        self
    }

    /// Turns hostname verification of the manager's certificate off (like the seed's
    /// `.noHostnameVerification`); the certificate itself is still verified.
    pub fn no_verify_hostname(mut self) -> WorkerConfig {
        if let WorkerSecurity::MutualTls {
            verify_hostname, ..
        } = &mut self.security
        {
            *verify_hostname = false;
        }
        self
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.slots == 0 {
            return bad("slots must be at least 1".into());
        }
        if self.name.is_empty() || self.name.len() > 256 {
            return bad("the worker name must have 1 to 256 bytes".into());
        }
        crate::protocol::check_identity(&self.name, &self.tags, &self.platform).or_else(bad)?;
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("backoff_max", self.backoff_max),
            ("kill_grace", self.kill_grace),
        ] {
            if d > MAX_GRACE {
                return bad(format!("{name} must be at most 365 days"));
            }
        }
        if self.host.is_empty() {
            return bad("the manager host is empty".into());
        }
        if self.backoff_initial.is_zero() || self.backoff_max < self.backoff_initial {
            return bad("backoff_initial must be non-zero and at most backoff_max".into());
        }
        if !self.work_dir.is_dir() {
            return bad(format!(
                "work_dir {} is not a folder",
                self.work_dir.display()
            ));
        }
        if self.job_user.as_deref() == Some("") {
            return bad("job_user is empty".into());
        }
        Ok(())
    }

    /// The job user, looked up, once it is known that jobs can run as it.
    fn resolve_job_user(&self) -> Result<Option<JobUser>> {
        let Some(name) = &self.job_user else {
            return Ok(None);
        };
        let user = JobUser::resolve(name)?;
        executor::probe(&user, &self.work_dir)
            .map_err(|why| Error::InvalidConfig(format!("job_user {name:?}: {why}")))?;
        Ok(Some(user))
    }

    fn address(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

struct Status {
    connected: AtomicBool,
    sessions: AtomicU64,
    attempts: AtomicU64,
}

enum Control {
    Stop,
    Drain(Option<Instant>),
}

/// A running worker. Dropping it stops it.
pub struct Worker {
    name: String,
    control: Sender<Control>,
    status: Arc<Status>,
    /// Disconnected when the worker thread has ended.
    done: Receiver<()>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Worker {
    /// Checks the configuration and starts the worker in the background. It connects
    /// (and reconnects) on its own; an unreachable manager is not an error here.
    pub fn start(config: WorkerConfig) -> Result<Worker> {
        config.validate()?;
        let tls = match &config.security {
            WorkerSecurity::MutualTls {
                identity,
                manager_trust,
                verify_hostname,
            } => Some(tls::client_config(
                identity,
                manager_trust,
                *verify_hostname,
            )?),
            WorkerSecurity::InsecurePlaintext => {
                log::warn!(
                    "worker {} connects WITHOUT TLS to {}",
                    config.name,
                    config.address()
                );
                None
            }
        };
        let job_user = config.resolve_job_user()?;
        // SAFETY: geteuid has no preconditions.
        let mut owners = vec![unsafe { libc::geteuid() }];
        owners.extend(job_user.as_ref().map(|u| u.uid));
        executor::sweep_stale_dirs(&config.work_dir, &owners);
        let (control_tx, control_rx) = unbounded();
        let (done_tx, done_rx) = bounded::<()>(0);
        let status = Arc::new(Status {
            connected: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
        });
        let name = config.name.clone();
        let st = status.clone();
        let thread = crate::thread::spawn(format!("wp-worker-{name}"), move || {
            let _done = done_tx;
            let mut worker = WorkerLoop::new(config, tls, control_rx, st);
            worker.job_user = job_user;
            worker.run()
        })
        .map_err(|e| Error::io("starting the worker thread", e))?;
        Ok(Worker {
            name,
            control: control_tx,
            status,
            done: done_rx,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether it is connected to the manager right now.
    pub fn is_connected(&self) -> bool {
        self.status.connected.load(Ordering::Relaxed)
    }

    /// How many times it has been accepted by a manager so far.
    pub fn sessions(&self) -> u64 {
        self.status.sessions.load(Ordering::Relaxed)
    }

    /// How many times it has tried to connect so far (successful or not).
    pub fn connection_attempts(&self) -> u64 {
        self.status.attempts.load(Ordering::Relaxed)
    }

    /// Starts draining and returns at once: the worker takes no new jobs (the manager
    /// stops routing to it), lets the running ones finish and report, then leaves. With
    /// a deadline, jobs still running then are killed (they end `Cancelled`).
    /// [`Worker::wait`] tells when it has left; [`Worker::stop`] cuts it short.
    pub fn drain(&self, deadline: Option<Duration>) {
        let _ = self
            .control
            .send(Control::Drain(deadline.map(|d| Instant::now() + d)));
    }

    /// Waits until the worker has left (after a drain), up to `timeout`; true if it has.
    pub fn wait(&self, timeout: Duration) -> bool {
        let left = matches!(
            self.done.recv_timeout(timeout),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected)
        );
        if left && let Some(t) = crate::sync::lock(&self.thread).take() {
            let _ = t.join();
        }
        left
    }

    /// Stops now: kills running jobs (the manager, told goodbye, ends them `WorkerLost`),
    /// cleans up their folders, closes the connection, and returns when the worker's
    /// threads are gone.
    pub fn stop(&self) {
        let Some(t) = crate::sync::lock(&self.thread).take() else {
            return;
        };
        let _ = self.control.send(Control::Stop);
        let _ = t.join();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One job this worker holds: running, or ended and not yet acknowledged.
struct Job {
    handle: RunningJob,
    next_seq: u64,
    /// Output made while disconnected, not yet handed to any link.
    unsent: VecDeque<(u64, Stream, Vec<u8>)>,
    unsent_bytes: usize,
    /// Output recently handed to a link, kept to be sent again after a reconnect.
    replay: VecDeque<(u64, Stream, Vec<u8>)>,
    replay_bytes: usize,
    /// Paused by us: too much output waits for a link.
    held_back: bool,
    /// How it ended, once it has; kept until the manager acknowledges it.
    finished: Option<(Outcome, Option<String>)>,
    /// Killed and forgotten: its manager no longer waits for it.
    dropped: bool,
}

impl Job {
    fn new(handle: RunningJob) -> Job {
        Job {
            handle,
            next_seq: 0,
            unsent: VecDeque::new(),
            unsent_bytes: 0,
            replay: VecDeque::new(),
            replay_bytes: 0,
            held_back: false,
            finished: None,
            dropped: false,
        }
    }

    /// Sends output on a link, keeping a copy for a replay after a reconnect.
    fn send_output(
        &mut self,
        job: JobId,
        (seq, stream, bytes): (u64, Stream, Vec<u8>),
        limit: usize,
        out: &Out,
    ) {
        self.remember((seq, stream, bytes.clone()), limit);
        let _ = out.send(Outbound::Message(WorkerMessage::Output {
            job,
            stream,
            seq,
            bytes,
        }));
    }

    fn remember(&mut self, entry: (u64, Stream, Vec<u8>), limit: usize) {
        self.replay_bytes += entry.2.len();
        self.replay.push_back(entry);
        while self.replay_bytes > limit {
            match self.replay.pop_front() {
                Some((_, _, b)) => self.replay_bytes -= b.len(),
                None => break,
            }
        }
    }
}

enum SessionEnd {
    Stop,
    Lost(String),
}

type Out = Sender<Outbound<WorkerMessage>>;

struct WorkerLoop {
    config: WorkerConfig,
    address: String,
    tls: Option<Arc<ClientConfig>>,
    control: Receiver<Control>,
    status: Arc<Status>,
    jobs: HashMap<JobKey, Job>,
    /// The manager whose jobs this worker holds (from the last welcome).
    manager: Option<u64>,
    /// Numbers the runs of jobs (see `JobKey::run`).
    next_run: u64,
    /// That manager's reconnect grace: after it, held jobs are given up.
    grace: Duration,
    disconnected_since: Option<Instant>,
    draining: Option<Option<Instant>>,
    exec_tx: Sender<ExecEvent>,
    exec_rx: Receiver<ExecEvent>,
    rng: u64,
    /// Who runs the jobs (`WorkerConfig::job_user`, looked up); `None`: this process's user.
    job_user: Option<JobUser>,
}

impl WorkerLoop {
    fn new(
        config: WorkerConfig,
        tls: Option<Arc<ClientConfig>>,
        control: Receiver<Control>,
        status: Arc<Status>,
    ) -> WorkerLoop {
        // Bounded: a job that writes faster than the link drains waits on its pipe.
        let (exec_tx, exec_rx) = bounded(64);
        WorkerLoop {
            address: config.address(),
            config,
            tls,
            control,
            status,
            jobs: HashMap::new(),
            manager: None,
            next_run: 0,
            grace: Duration::ZERO,
            disconnected_since: None,
            draining: None,
            exec_tx,
            exec_rx,
            rng: crate::random::u64() | 1,
            job_user: None,
        }
    }

    fn name(&self) -> &str {
        &self.config.name
    }

    fn run(mut self) {
        let mut failures: u32 = 0;
        loop {
            if self.drained() {
                break;
            }
            let hello = WorkerHello {
                name: self.config.name.clone(),
                tags: self.config.tags.clone(),
                platform: self.config.platform.clone(),
                slots: self.config.slots,
                draining: self.draining.is_some(),
                manager_id: self.manager,
                jobs: self
                    .jobs
                    .iter()
                    .filter(|(k, j)| !j.dropped && Some(k.manager) == self.manager)
                    .map(|(k, j)| HeldJob {
                        job: k.job,
                        finished: j.finished.is_some(),
                    })
                    .collect(),
            };
            self.give_up_if_abandoned();
            // Never still be connecting when the manager gives up on the jobs held here.
            let mut deadline = Instant::now() + self.config.connect_timeout;
            if let Some(since) = self.disconnected_since
                && self.jobs.values().any(|j| !j.dropped)
            {
                deadline = deadline
                    .min((since + self.grace).max(Instant::now() + Duration::from_millis(100)));
            }
            let server_name = self
                .config
                .host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let attempt = link::connect(
                &self.address,
                &server_name,
                self.tls.as_ref(),
                &hello,
                deadline,
            );
            self.status.attempts.fetch_add(1, Ordering::Relaxed);
            match attempt {
                Ok((est, welcome)) => {
                    failures = 0;
                    self.status.sessions.fetch_add(1, Ordering::Relaxed);
                    self.status.connected.store(true, Ordering::Relaxed);
                    log::info!(
                        "worker {} connected to the manager at {}",
                        self.name(),
                        self.address
                    );
                    let end = self.session(est, welcome);
                    self.status.connected.store(false, Ordering::Relaxed);
                    match end {
                        SessionEnd::Stop => break,
                        SessionEnd::Lost(why) => {
                            self.disconnected_since = Some(Instant::now());
                            let held = self.jobs.values().filter(|j| !j.dropped).count();
                            log::warn!(
                                "worker {}: lost the manager at {}: {why}{}",
                                self.name(),
                                self.address,
                                if held > 0 {
                                    format!("; {held} job(s) go on while it reconnects")
                                } else {
                                    String::new()
                                }
                            );
                        }
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let msg = format!(
                        "worker {}: cannot join the manager at {}: {e}",
                        self.name(),
                        self.address
                    );
                    if failures == 1
                        || failures.is_multiple_of(10)
                        || matches!(e, Error::Refused(_) | Error::VersionMismatch { .. })
                    {
                        log::warn!("{msg} (attempt {failures})");
                    } else {
                        log::debug!("{msg} (attempt {failures})");
                    }
                }
            }
            let delay = self.backoff(failures);
            if self.idle(delay) {
                break;
            }
        }
        self.shut_down();
    }

    /// Capped exponential backoff with jitter: a random wait in [d/2, d], where d doubles
    /// per failure from `backoff_initial` up to `backoff_max`, so that many workers of a
    /// restarted manager do not all come back in the same instant.
    fn backoff(&mut self, failures: u32) -> Duration {
        let c = &self.config;
        let exp = failures.saturating_sub(1).min(30);
        let d = c
            .backoff_initial
            .saturating_mul(1u32 << exp)
            .min(c.backoff_max);
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let frac = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        d.mul_f64(0.5 + 0.5 * frac)
    }

    /// Whether a drain is complete: nothing held any more.
    fn drained(&self) -> bool {
        self.draining.is_some() && self.jobs.values().all(|j| j.dropped)
    }

    /// Waits between attempts while handling job events; true when it is time to leave.
    fn idle(&mut self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        loop {
            self.give_up_if_abandoned();
            if self.drain_deadline_passed() || self.drained() {
                return self.drained();
            }
            select! {
                recv(self.control) -> c => match c {
                    Ok(Control::Drain(d)) => self.begin_drain(d, None),
                    _ => return true,
                },
                recv(self.exec_rx) -> ev => if let Ok(ev) = ev { self.on_exec(ev, None); },
                default(deadline.saturating_duration_since(Instant::now())) => return false,
            }
        }
    }

    /// Held jobs of a manager that has surely given up on them (its reconnect grace has
    /// passed) are killed rather than left running for nobody.
    fn give_up_if_abandoned(&mut self) {
        let Some(since) = self.disconnected_since else {
            return;
        };
        if since.elapsed() <= self.grace {
            return;
        }
        let mut n = 0;
        for job in self.jobs.values_mut().filter(|j| !j.dropped) {
            job.dropped = true;
            job.handle.kill();
            n += 1;
        }
        if n > 0 {
            log::warn!(
                "worker {}: killed {n} job(s): no manager for longer than its reconnect grace ({:.1} s)",
                self.config.name,
                self.grace.as_secs_f64()
            );
        }
        self.jobs.retain(|_, j| j.finished.is_none() || !j.dropped);
    }

    fn drain_deadline_passed(&mut self) -> bool {
        let Some(Some(deadline)) = self.draining else {
            return false;
        };
        if Instant::now() < deadline {
            return false;
        }
        for job in self.jobs.values().filter(|j| j.finished.is_none()) {
            job.handle.kill();
        }
        false
    }

    fn begin_drain(&mut self, deadline: Option<Instant>, out: Option<&Out>) {
        log::info!(
            "worker {} draining: no new jobs; leaving when the running ones end",
            self.config.name
        );
        self.draining = Some(deadline);
        if let Some(out) = out {
            let _ = out.send(Outbound::Message(WorkerMessage::Draining));
        }
    }

    /// Runs one accepted connection until it ends.
    fn session(&mut self, est: link::Established, welcome: Welcome) -> SessionEnd {
        // Whatever the numbers say, the timing adopted is sane (see `Timing::adopted`).
        let timing = Timing::adopted(welcome.heartbeat_interval_ms, welcome.heartbeat_timeout_ms);
        if let Err(e) = link::go_live(&est, timing) {
            return SessionEnd::Lost(e.to_string());
        }
        let link::Established {
            mut reader,
            writer,
            closer,
            ..
        } = est;
        let live = Liveness::new();
        let (out_tx, out_rx) = bounded::<Outbound<WorkerMessage>>(64);
        let label = format!("manager {}", self.address);
        let writer =
            match link::spawn_writer(label, writer, closer.clone(), out_rx, live.clone(), timing) {
                Ok(w) => w,
                Err(e) => return SessionEnd::Lost(format!("cannot start a writer thread: {e}")),
            };
        let (in_tx, in_rx) = unbounded::<ManagerMessage>();
        let (l2, c2) = (live.clone(), closer.clone());
        let reader = crate::thread::relay("wp-link-reader", move || {
            let r =
                link::read_messages(&mut reader, &l2, |m: ManagerMessage| in_tx.send(m).is_ok());
            l2.mark_closed();
            c2.close();
            r
        });
        let reader = match reader {
            Ok(r) => Some(r),
            Err(e) => {
                closer.close();
                let _ = writer.join();
                return SessionEnd::Lost(format!("cannot start a reader thread: {e}"));
            }
        };
        self.resume(&welcome, &out_tx);
        if self.draining.is_some() {
            let _ = out_tx.send(Outbound::Message(WorkerMessage::Draining));
        }
        let end = loop {
            if self.drain_deadline_passed() || self.drained() {
                break SessionEnd::Stop;
            }
            let tick = crossbeam_channel::after(Duration::from_millis(500));
            select! {
                recv(self.control) -> c => match c {
                    Ok(Control::Drain(d)) => self.begin_drain(d, Some(&out_tx)),
                    _ => break SessionEnd::Stop,
                },
                recv(in_rx) -> msg => match msg {
                    Ok(m) => self.on_manager(m, &out_tx),
                    Err(_) => break SessionEnd::Lost(String::new()),
                },
                recv(self.exec_rx) -> ev => if let Ok(ev) = ev { self.on_exec(ev, Some(&out_tx)); },
                recv(tick) -> _ => {}
            }
        };
        if matches!(end, SessionEnd::Stop) {
            // Leaving on purpose: the manager ends what is left at once.
            for (key, job) in self.jobs.iter_mut().filter(|(_, j)| !j.dropped) {
                job.dropped = true;
                job.handle.kill();
                log::info!("worker stopping: killed job {}", key.job);
            }
            let _ = out_tx.send(Outbound::Message(WorkerMessage::Goodbye));
        }
        // Say goodbye properly (close_notify) whether we leave or the manager did.
        let _ = out_tx.send(Outbound::Close);
        drop(out_tx);
        let _ = writer.join();
        live.mark_closed();
        closer.close();
        let read_result = reader.and_then(|r| r.join().ok());
        match end {
            SessionEnd::Lost(_) => SessionEnd::Lost(match read_result {
                Some(Ok(())) => "the manager closed the connection".into(),
                Some(Err(e)) => e.to_string(),
                None => "the reader thread failed".into(),
            }),
            stop => stop,
        }
    }

    /// After a welcome: goes on with the held jobs the manager still waits for (sending
    /// again what it may have missed), and drops the others.
    fn resume(&mut self, welcome: &Welcome, out: &Out) {
        let same_manager = self.manager == Some(welcome.manager_id);
        self.manager = Some(welcome.manager_id);
        // The manager's grace clock may have started up to a heartbeat timeout before
        // this worker noticed the loss: give up that much earlier, so that an old run
        // never goes on next to a retry of the same job.
        self.grace = Duration::from_millis(welcome.reconnect_grace_ms)
            .min(MAX_GRACE)
            .saturating_sub(Duration::from_millis(welcome.heartbeat_timeout_ms));
        self.disconnected_since = None;
        let wanted: HashMap<JobId, u64> = welcome.resume.iter().copied().collect();
        let limit = self.config.reconnect_buffer;
        for (key, job) in self.jobs.iter_mut().filter(|(_, j)| !j.dropped) {
            let next = if same_manager {
                wanted.get(&key.job).copied()
            } else {
                None
            };
            let Some(next) = next else {
                job.dropped = true;
                if job.finished.is_none() {
                    job.handle.kill();
                    log::warn!(
                        "killed job {}: its manager {} no longer waits for it",
                        key.job,
                        if same_manager {
                            "(after its reconnect grace)"
                        } else {
                            "(a new manager answered)"
                        }
                    );
                }
                continue;
            };
            let replay = std::mem::take(&mut job.replay);
            let unsent = std::mem::take(&mut job.unsent);
            (job.replay_bytes, job.unsent_bytes) = (0, 0);
            for entry in replay
                .into_iter()
                .chain(unsent)
                .filter(|(seq, _, _)| *seq >= next)
            {
                job.send_output(key.job, entry, limit, out);
            }
            if let Some((outcome, cleanup_error)) = &job.finished {
                let _ = out.send(Outbound::Message(WorkerMessage::Finished {
                    job: key.job,
                    outcome: outcome.clone(),
                    cleanup_error: cleanup_error.clone(),
                }));
            }
            // Pauses belonged to the old link; the manager pauses again if it must.
            job.held_back = false;
            job.handle.pause(false);
        }
        self.jobs
            .retain(|_, j| !(j.dropped && j.finished.is_some()));
        let resumed = self.jobs.values().filter(|j| !j.dropped).count();
        if resumed > 0 {
            log::info!(
                "worker {}: going on with {resumed} job(s) after reconnecting",
                self.config.name
            );
        }
    }

    /// The live (not dropped) run of a job of the current manager.
    fn live(&self, job: JobId) -> Option<JobKey> {
        let manager = self.manager.unwrap_or_default();
        self.jobs
            .iter()
            .find(|(k, j)| k.manager == manager && k.job == job && !j.dropped)
            .map(|(k, _)| *k)
    }

    fn on_manager(&mut self, msg: ManagerMessage, out: &Out) {
        let manager = self.manager.unwrap_or_default();
        match msg {
            ManagerMessage::Run { job, spec } => {
                let running = self
                    .jobs
                    .values()
                    .filter(|j| !j.dropped && j.finished.is_none())
                    .count();
                if let Err(e) = spec.validate() {
                    // A job no manager of this version sends; refused, not run.
                    log::warn!("refusing job {job}: {e}");
                    let _ = out.send(Outbound::Message(WorkerMessage::Finished {
                        job,
                        outcome: Outcome::Rejected(format!("the worker refused the job: {e}")),
                        cleanup_error: None,
                    }));
                    return;
                }
                let refusal = if self.draining.is_some() {
                    Some("the worker is draining")
                } else if running >= self.config.slots as usize || self.live(job).is_some() {
                    log::error!(
                        "the manager sent job {job} beyond this worker's slots; declining it"
                    );
                    Some("the worker has no free slot")
                } else {
                    None
                };
                if let Some(why) = refusal {
                    // Not an ending: the manager queues the job again.
                    let _ = out.send(Outbound::Message(WorkerMessage::Declined {
                        job,
                        reason: why.into(),
                    }));
                    return;
                }
                log::debug!("starting job {job}");
                self.next_run += 1;
                let key = JobKey {
                    manager,
                    job,
                    run: self.next_run,
                };
                let started = executor::start(
                    key,
                    spec,
                    self.config.work_dir.clone(),
                    self.config.kill_grace,
                    self.job_user.clone(),
                    self.exec_tx.clone(),
                );
                match started {
                    Ok(handle) => {
                        self.jobs.insert(key, Job::new(handle));
                    }
                    Err(e) => {
                        let _ = out.send(Outbound::Message(WorkerMessage::Finished {
                            job,
                            outcome: Outcome::SpawnFailed(format!(
                                "cannot start a job thread: {e}"
                            )),
                            cleanup_error: None,
                        }));
                    }
                }
            }
            ManagerMessage::Cancel { job } => {
                if let Some(j) = self.live(job).and_then(|k| self.jobs.get(&k)) {
                    log::info!("cancelling job {job}");
                    j.handle.cancel();
                }
            }
            ManagerMessage::Pause { job } => {
                if let Some(j) = self.live(job).and_then(|k| self.jobs.get(&k)) {
                    log::debug!("pausing the output of job {job}: its submitter is behind");
                    j.handle.pause(true);
                }
            }
            ManagerMessage::Resume { job } => {
                if let Some(j) = self.live(job).and_then(|k| self.jobs.get(&k)) {
                    j.handle.pause(j.held_back);
                }
            }
            ManagerMessage::Ended { job } => {
                if let Some(k) = self.live(job).filter(|k| self.jobs[k].finished.is_some()) {
                    self.jobs.remove(&k);
                }
            }
            ManagerMessage::Shutdown => {
                log::info!("the manager at {} is shutting down", self.address)
            }
            ManagerMessage::Heartbeat => {}
        }
    }

    /// A job event: sent on the link if there is one (and kept for a replay), else kept
    /// until there is.
    fn on_exec(&mut self, ev: ExecEvent, out: Option<&Out>) {
        let limit = self.config.reconnect_buffer;
        let out = out.filter(|_| self.disconnected_since.is_none());
        match ev {
            ExecEvent::Output { key, stream, bytes } => {
                let Some(j) = self.jobs.get_mut(&key) else {
                    return;
                };
                if j.dropped {
                    return;
                }
                let seq = j.next_seq;
                j.next_seq += 1;
                match out {
                    Some(out) => j.send_output(key.job, (seq, stream, bytes), limit, out),
                    None => {
                        j.unsent_bytes += bytes.len();
                        j.unsent.push_back((seq, stream, bytes));
                        if j.unsent_bytes > limit && !j.held_back {
                            j.held_back = true;
                            j.handle.pause(true);
                        }
                    }
                }
            }
            ExecEvent::Finished {
                key,
                outcome,
                cleanup_error,
            } => {
                let Some(j) = self.jobs.get_mut(&key) else {
                    return;
                };
                log::debug!("job {} ended: {outcome}", key.job);
                if j.dropped {
                    self.jobs.remove(&key);
                    return;
                }
                if let Some(out) = out {
                    let _ = out.send(Outbound::Message(WorkerMessage::Finished {
                        job: key.job,
                        outcome: outcome.clone(),
                        cleanup_error: cleanup_error.clone(),
                    }));
                }
                // Kept until the manager says it has it.
                j.finished = Some((outcome, cleanup_error));
            }
        }
    }

    /// Kills what still runs and waits (bounded) for the jobs to be reaped and their
    /// folders removed.
    fn shut_down(&mut self) {
        for job in self.jobs.values_mut() {
            job.dropped = true;
            job.handle.kill();
        }
        self.jobs.retain(|_, j| j.finished.is_none());
        let deadline = Instant::now() + STOP_WAIT;
        while !self.jobs.is_empty() {
            match self.exec_rx.recv_deadline(deadline) {
                Ok(ev) => self.on_exec(ev, None),
                Err(_) => {
                    log::warn!(
                        "worker {}: {} job(s) did not end in time",
                        self.config.name,
                        self.jobs.len()
                    );
                    break;
                }
            }
        }
        log::info!("worker {} stopped", self.config.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let config = WorkerConfig::insecure_plaintext("127.0.0.1", 1);
        let (initial, max) = (config.backoff_initial, config.backoff_max);
        let mut loops: Vec<WorkerLoop> = (0..50)
            .map(|_| {
                WorkerLoop::new(
                    config.clone(),
                    None,
                    unbounded().1,
                    Arc::new(Status {
                        connected: AtomicBool::new(false),
                        sessions: AtomicU64::new(0),
                        attempts: AtomicU64::new(0),
                    }),
                )
            })
            .collect();
        for failures in 1..12u32 {
            let full = initial.saturating_mul(1 << (failures - 1)).min(max);
            let delays: Vec<Duration> = loops.iter_mut().map(|l| l.backoff(failures)).collect();
            for d in &delays {
                assert!(
                    *d >= full / 2 && *d <= full,
                    "failure {failures}: {d:?} not in [{:?}, {full:?}]",
                    full / 2
                );
            }
            let distinct: std::collections::BTreeSet<Duration> = delays.iter().copied().collect();
            assert!(
                distinct.len() > 40,
                "50 workers must not retry in lockstep: {} distinct delays",
                distinct.len()
            );
        }
    }
}
