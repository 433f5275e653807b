//! The worker: dials the manager (it never listens, so it works behind NAT), registers,
//! runs the jobs it is given and streams their output back. When the connection fails
//! or cannot be made yet it retries with capped exponential backoff and jitter, until
//! [`Worker::stop`]. One thread owns the worker's state; each session adds a reader and
//! a writer thread; each job has a thread of its own (see `executor`).

mod executor;
mod tree;

use crate::error::{Error, Result};
use crate::job::Outcome;
use crate::link::{self, Liveness, Outbound, Timing};
use crate::protocol::{ManagerMessage, Welcome, WorkerHello, WorkerMessage};
use crate::tls::{self, Identity, TrustRoots};
use crossbeam_channel::{Receiver, Sender, bounded, select, unbounded};
use executor::{ExecEvent, JobKey, RunningJob};
use rustls::ClientConfig;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long [`Worker::stop`] waits for killed jobs to be reaped and cleaned up.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// How the worker authenticates itself and the manager.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum WorkerSecurity {
    /// Mutual TLS: the worker shows `identity`; the manager's certificate must be one
    /// of, or chain to one of, `manager_roots`.
    MutualTls {
        /// The worker's certificate and key.
        identity: Identity,
        /// The manager's certificate (pinned) or the CA that issued it.
        manager_roots: TrustRoots,
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
}

/// `OS-ARCH` of this machine, e.g. `linux-x86_64`.
pub fn detect_platform() -> String {
    format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
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
        manager_roots: TrustRoots,
    ) -> WorkerConfig {
        WorkerConfig::with_security(
            host,
            port,
            WorkerSecurity::MutualTls {
                identity,
                manager_roots,
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
        Ok(())
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

/// A running worker. Dropping it stops it.
pub struct Worker {
    name: String,
    stop: Sender<()>,
    status: Arc<Status>,
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
                manager_roots,
                verify_hostname,
            } => Some(tls::client_config(
                identity,
                manager_roots,
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
        executor::sweep_stale_dirs(&config.work_dir);
        let (stop_tx, stop_rx) = bounded(1);
        let status = Arc::new(Status {
            connected: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
        });
        let name = config.name.clone();
        let st = status.clone();
        let thread = std::thread::Builder::new()
            .name(format!("wp-worker-{name}"))
            .spawn(move || WorkerLoop::new(config, tls, stop_rx, st).run())
            .map_err(|e| Error::io("starting the worker thread", e))?;
        Ok(Worker {
            name,
            stop: stop_tx,
            status,
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

    /// Stops: kills running jobs (the manager ends them `WorkerLost`), cleans up their
    /// folders, closes the connection, and returns when the worker's threads are gone.
    pub fn stop(&self) {
        let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let _ = self.stop.try_send(());
        let _ = t.join();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Job {
    handle: RunningJob,
    seq: u64,
    /// Killed because its manager connection was lost or the worker stops: its
    /// remaining events are not sent anywhere.
    orphaned: bool,
}

enum SessionEnd {
    Stop,
    Lost(String),
}

struct WorkerLoop {
    config: WorkerConfig,
    address: String,
    tls: Option<Arc<ClientConfig>>,
    stop: Receiver<()>,
    status: Arc<Status>,
    jobs: HashMap<JobKey, Job>,
    /// The id of the manager of the current session.
    manager: u64,
    exec_tx: Sender<ExecEvent>,
    exec_rx: Receiver<ExecEvent>,
    rng: u64,
}

impl WorkerLoop {
    fn new(
        config: WorkerConfig,
        tls: Option<Arc<ClientConfig>>,
        stop: Receiver<()>,
        status: Arc<Status>,
    ) -> WorkerLoop {
        // Bounded: a job that writes faster than the link drains waits on its pipe.
        let (exec_tx, exec_rx) = bounded(64);
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ ((std::process::id() as u64) << 32)
            ^ (&stop as *const _ as u64);
        WorkerLoop {
            address: config.address(),
            config,
            tls,
            stop,
            status,
            jobs: HashMap::new(),
            manager: 0,
            exec_tx,
            exec_rx,
            rng: seed | 1,
        }
    }

    fn run(mut self) {
        let mut failures: u32 = 0;
        loop {
            let hello = WorkerHello {
                name: self.config.name.clone(),
                tags: self.config.tags.clone(),
                platform: self.config.platform.clone(),
                slots: self.config.slots,
            };
            let deadline = Instant::now() + self.config.connect_timeout;
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
                        self.config.name,
                        self.address
                    );
                    let end = self.session(est, &welcome);
                    self.status.connected.store(false, Ordering::Relaxed);
                    match end {
                        SessionEnd::Stop => break,
                        SessionEnd::Lost(why) => {
                            log::warn!(
                                "worker {}: lost the manager at {}: {why}",
                                self.config.name,
                                self.address
                            )
                        }
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let msg = format!(
                        "worker {}: cannot join the manager at {}: {e}",
                        self.config.name, self.address
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

    /// Waits between attempts while handling job events; true when told to stop.
    fn idle(&mut self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        loop {
            select! {
                recv(self.stop) -> _ => return true,
                recv(self.exec_rx) -> ev => if let Ok(ev) = ev { self.on_exec(ev, None); },
                default(deadline.saturating_duration_since(Instant::now())) => return false,
            }
        }
    }

    /// Runs one accepted connection until it ends.
    fn session(&mut self, est: link::Established, welcome: &Welcome) -> SessionEnd {
        self.manager = welcome.manager_id;
        let timing = Timing {
            heartbeat_interval: Duration::from_millis(welcome.heartbeat_interval_ms.max(10)),
            heartbeat_timeout: Duration::from_millis(welcome.heartbeat_timeout_ms.max(20)),
        };
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
        let reader = std::thread::Builder::new()
            .name("wp-link-reader".into())
            .spawn(move || {
                let r = link::read_messages(&mut reader, &l2, |m: ManagerMessage| {
                    in_tx.send(m).is_ok()
                });
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
        let end = loop {
            select! {
                recv(self.stop) -> _ => break SessionEnd::Stop,
                recv(in_rx) -> msg => match msg {
                    Ok(m) => self.on_manager(m, &out_tx),
                    Err(_) => break SessionEnd::Lost(String::new()),
                },
                recv(self.exec_rx) -> ev => if let Ok(ev) = ev { self.on_exec(ev, Some(&out_tx)); },
            }
        };
        for (key, job) in self.jobs.iter_mut() {
            if !job.orphaned {
                let id = key.job;
                job.orphaned = true;
                job.handle.kill();
                match &end {
                    SessionEnd::Stop => log::info!("worker stopping: killed job {id}"),
                    SessionEnd::Lost(_) => {
                        log::warn!("killed job {id}: the connection to its manager was lost")
                    }
                }
            }
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

    fn on_manager(&mut self, msg: ManagerMessage, out: &Sender<Outbound<WorkerMessage>>) {
        let manager = self.manager;
        let key = |job| JobKey { manager, job };
        match msg {
            ManagerMessage::Run { job, spec } => {
                let running = self.jobs.values().filter(|j| !j.orphaned).count();
                if running >= self.config.slots as usize || self.jobs.contains_key(&key(job)) {
                    log::error!(
                        "the manager sent job {job} beyond this worker's slots; refusing it"
                    );
                    let _ = out.send(Outbound::Message(WorkerMessage::Finished {
                        job,
                        outcome: Outcome::Rejected("the worker has no free slot".into()),
                        cleanup_error: None,
                    }));
                    return;
                }
                log::debug!("starting job {job}");
                let started = executor::start(
                    key(job),
                    spec,
                    self.config.work_dir.clone(),
                    self.config.kill_grace,
                    self.exec_tx.clone(),
                );
                match started {
                    Ok(handle) => {
                        let entry = Job {
                            handle,
                            seq: 0,
                            orphaned: false,
                        };
                        self.jobs.insert(key(job), entry);
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
                if let Some(j) = self.jobs.get(&key(job)) {
                    log::info!("cancelling job {job}");
                    j.handle.cancel();
                }
            }
            ManagerMessage::Pause { job } => {
                if let Some(j) = self.jobs.get(&key(job)) {
                    log::debug!("pausing the output of job {job}: its submitter is behind");
                    j.handle.pause(true);
                }
            }
            ManagerMessage::Resume { job } => {
                if let Some(j) = self.jobs.get(&key(job)) {
                    j.handle.pause(false);
                }
            }
            ManagerMessage::Shutdown => {
                log::info!("the manager at {} is shutting down", self.address)
            }
            ManagerMessage::Heartbeat => {}
        }
    }

    fn on_exec(&mut self, ev: ExecEvent, out: Option<&Sender<Outbound<WorkerMessage>>>) {
        let msg = match ev {
            ExecEvent::Output { key, stream, bytes } => {
                let Some(j) = self.jobs.get_mut(&key) else {
                    return;
                };
                if j.orphaned {
                    return;
                }
                j.seq += 1;
                WorkerMessage::Output {
                    job: key.job,
                    stream,
                    seq: j.seq - 1,
                    bytes,
                }
            }
            ExecEvent::Finished {
                key,
                outcome,
                cleanup_error,
            } => {
                let Some(j) = self.jobs.remove(&key) else {
                    return;
                };
                log::debug!("job {} ended: {outcome}", key.job);
                if j.orphaned {
                    return;
                }
                WorkerMessage::Finished {
                    job: key.job,
                    outcome,
                    cleanup_error,
                }
            }
        };
        if let Some(out) = out {
            let _ = out.send(Outbound::Message(msg));
        }
    }

    /// Kills what still runs and waits (bounded) for the jobs to be reaped and their
    /// folders removed.
    fn shut_down(&mut self) {
        for job in self.jobs.values_mut() {
            job.orphaned = true;
            job.handle.kill();
        }
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
