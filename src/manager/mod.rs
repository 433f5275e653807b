//! The manager: listens on one port, accepts workers over mutual TLS, queues jobs and
//! hands them out. This file has the public [`Manager`] handle, its configuration and
//! the state its threads share. The scheduling state is the `dispatcher`'s (a state
//! machine driven by one thread); `acceptor` takes connections in and runs each one's
//! link thread, whose reader acts on the worker's messages (`routing`); [`JobHandle`]
//! is what a submitter holds.

mod acceptor;
mod admission;
mod dispatcher;
mod ids;
mod job_handle;
mod queue;
mod routing;
mod sink;
mod stdin;
mod submitters;

use crate::error::{Error, Result};
use crate::job::{JobEvent, JobId, JobSpec, JobStatus};
use crate::journal::{self, Journal, Record, Retention, Submitter};
use crate::link::{self, Pace, Timing};
use crate::metrics::{Counters, MetricsServer, Stats};
use crate::protocol::DEFAULT_MAX_FRAME;
use crate::sync::lock;
use crate::tls::{self, Identity, PeerTrust};
use admission::{Admission, Limits};
use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use dispatcher::driver::Event;
use dispatcher::{Dispatcher, Settings};
pub use job_handle::JobHandle;
use queue::QueuedJob;
use sink::{Dest, JobSink};
use std::collections::{BTreeSet, HashMap};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
pub(crate) use stdin::StdinPort;
use submitters::{HubSettings, RemoteDest, Submitters};

/// How many events a job's channel holds before its sink keeps a backlog and pauses the
/// job (about 1.9 MiB of output). The channel reserves its slots up front, so this is
/// also most of what a queued job costs (see docs/PERFORMANCE.md).
const JOB_EVENT_CAPACITY: usize = 32;

/// The longest `handshake_timeout` accepted: no unauthenticated peer needs more.
pub const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3600);

/// The accept queue asked of the kernel for the manager's port.
#[cfg(unix)]
const LISTEN_BACKLOG: libc::c_int = 4096;

/// The largest job accepted: half a frame, so that a `Run` always fits one.
pub const MAX_JOB_BYTES: usize = DEFAULT_MAX_FRAME / 2;

/// The longest grace or timeout a manager accepts in its configuration.
const MAX_CONFIG_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// How the manager authenticates workers and submitters.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ManagerSecurity {
    /// Mutual TLS: the manager shows `identity`; a worker must present a certificate
    /// that is exactly one of the pinned ones in `worker_trust`, or that one of its CAs
    /// issued; a submitter likewise through `submitter_trust`. Each role is trusted
    /// through its own list only: a certificate that only the worker trust accepts
    /// cannot submit jobs, and one that only the submitter trust accepts cannot take
    /// them (a certificate in both lists may do both). At least one list must trust
    /// something.
    MutualTls {
        /// The manager's certificate and key.
        identity: Identity,
        /// Worker certificates (pinned, each accepted only as itself) and the CAs that
        /// issue worker certificates, as two separate lists.
        worker_trust: PeerTrust,
        /// Submitter certificates (pinned) and the CAs that issue them, as two separate
        /// lists; empty (the default of [`ManagerConfig::new`]): no remote submitters.
        /// Set with [`ManagerConfig::submitter_trust`].
        submitter_trust: PeerTrust,
    },
    /// No encryption and no authentication. Anyone who can reach the port can take jobs.
    /// Logged loudly; for tests and trusted loopback only.
    InsecurePlaintext,
}

/// Settings of a manager.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// Address to listen on, e.g. `127.0.0.1:9001` (port 0 picks a free port).
    pub listen: String,
    /// How workers and submitters are authenticated.
    pub security: ManagerSecurity,
    /// Most jobs waiting for a worker; beyond it `submit` fails with [`Error::QueueFull`].
    pub queue_capacity: usize,
    /// Deadline for a new connection's TLS handshake and hello, counted from its
    /// acceptance however the peer spaces its bytes (10 s by default; at most an hour).
    pub handshake_timeout: Duration,
    /// Most connections in handshake at once (256 by default). When all are taken, a
    /// new connection displaces the oldest handshake of the source holding the most.
    pub max_handshakes: usize,
    /// Most connections in handshake at once from one source: an IPv4 address or an
    /// IPv6 /64 (8 by default). A new connection beyond it displaces that source's
    /// oldest handshake. See docs/SECURITY.md for the policy.
    pub max_handshakes_per_source: usize,
    /// A link that has sent nothing for this long sends a heartbeat (at most half of
    /// `heartbeat_timeout` is used: a longer one is taken as that half).
    pub heartbeat_interval: Duration,
    /// A link that has heard nothing for this long is closed (its jobs end `WorkerLost`).
    pub heartbeat_timeout: Duration,
    /// On shutdown, how long running jobs may go on before they are cancelled (without
    /// a journal: with one, shutting down ends no job, see [`ManagerConfig::journal`]).
    pub shutdown_grace: Duration,
    /// How long the jobs of a worker whose connection dropped wait for that worker (same
    /// name, same certificate) to come back and go on with them; then they end
    /// `WorkerLost` (or are retried). Zero ends them at once. With a journal, the jobs
    /// found running at a restart wait as long for their workers. A worker learns it
    /// when it connects, and holds its jobs while away for this long less a heartbeat
    /// timeout and interval (4 s with the defaults), so a manager restarted later than
    /// that finds them killed: raise it before a slow upgrade.
    pub reconnect_grace: Duration,
    /// Where to serve Prometheus metrics (`GET /metrics`, plain HTTP), if anywhere;
    /// e.g. `127.0.0.1:9100`.
    pub metrics_addr: Option<String>,
    /// Most bytes of each stream that [`JobHandle::wait`] keeps (16 MiB by default);
    /// beyond it the result says `truncated`. Live output events are never cut.
    pub result_output_limit: usize,
    /// Most connections that present the same worker certificate at once (4 by
    /// default); more are refused when they register. A worker holds one (a reconnecting
    /// worker's new connection replaces its old one under the same name). Without TLS
    /// there are no certificates and no such limit.
    pub max_connections_per_certificate: usize,
    /// Most sessions one submitter certificate may hold at once (64 by default),
    /// connected or waiting for their submitter to come back within the grace; a new
    /// one beyond it is refused (a resumed one is not new). Each session may keep up to
    /// about two windows of unacknowledged events and one answer, so this bounds what one
    /// certificate can make the manager hold. Without TLS there is no such limit.
    pub max_sessions_per_certificate: usize,
    /// Most heartbeats a second the manager should hear from its workers when they are
    /// idle (2,000 by default; 0: no limit). Each worker sends one per
    /// `heartbeat_interval`; beyond this many workers per second of interval, the
    /// manager stretches the interval it announces so as to keep to the rate, and the
    /// timeout and the reconnect grace by as much (it tells connected workers as the
    /// count changes). With the defaults, up to 2,000 workers keep 1 s / 5 s / 10 s; at
    /// 10,000 a worker heartbeats every 5 s, a silent link is closed after 25 s, and
    /// its jobs wait 34 s for it.
    pub max_heartbeats_per_second: u32,
    /// Most bytes of output a detached job keeps (its last ones) for a later `attach`
    /// by a remote submitter (1 MiB by default; what is dropped is counted and told).
    pub detached_output_limit: usize,
    /// How long a detached job's outcome and kept output stay after it ends (1 hour by
    /// default).
    pub detached_retention: Duration,
    /// Most ended detached jobs kept at once (1,000 by default); the oldest go first.
    pub detached_retention_count: usize,
    /// Where the manager keeps its journal, an SQLite database (see
    /// [`ManagerConfig::journal`]); `None` (the default): no journal, everything is in
    /// memory and a restart loses the queue.
    pub journal: Option<PathBuf>,
    /// How long an ended job stays in the journal (1 hour by default); then it is
    /// compacted away. Keep it at least `detached_retention`, or a detached job's end
    /// cannot be attached to after a restart.
    pub journal_retention: Duration,
    /// Most ended jobs the journal keeps (10,000 by default; the oldest go first), and
    /// as many detached jobs' ends besides (kept for a later attach: keep it at least
    /// `detached_retention_count`).
    pub journal_retention_count: usize,
}

impl ManagerConfig {
    /// A mutual-TLS manager listening on `listen`, with defaults for everything else:
    /// workers are trusted through `worker_trust`, and no submitter is (see
    /// [`ManagerConfig::submitter_trust`]).
    pub fn new(
        listen: impl Into<String>,
        identity: Identity,
        worker_trust: PeerTrust,
    ) -> ManagerConfig {
        ManagerConfig::with_security(
            listen,
            ManagerSecurity::MutualTls {
                identity,
                worker_trust,
                submitter_trust: PeerTrust::new(),
            },
        )
    }

    /// Trusts submitters through `trust` (pinned certificates and CAs), in place of the
    /// submitter trust so far. A certificate only this list accepts may submit jobs but
    /// not take them. Without TLS ([`ManagerConfig::insecure_plaintext`]) there are no
    /// certificates, and this changes nothing.
    pub fn submitter_trust(mut self, trust: PeerTrust) -> ManagerConfig {
        if let ManagerSecurity::MutualTls {
            submitter_trust, ..
        } = &mut self.security
        {
            *submitter_trust = trust;
        }
        self
    }

    /// Keeps a journal at `path` (an SQLite database; created if missing): a job is
    /// accepted only once it is on disk, where each job is goes there too, and a
    /// manager started again on the same journal goes on with its queue, its running
    /// jobs (their workers keep them while away, see
    /// [`ManagerConfig::reconnect_grace`], and come back), its job ids and its detached
    /// jobs' ends. A journal that is corrupt, from a newer
    /// version, or in use by another manager is refused ([`Error::Journal`]). With a
    /// journal, shutting down ends no job: they go on when the manager starts again.
    pub fn journal(mut self, path: impl Into<PathBuf>) -> ManagerConfig {
        self.journal = Some(path.into());
        self
    }

    /// A manager without TLS. Anyone who can reach the port can take and answer jobs.
    pub fn insecure_plaintext(listen: impl Into<String>) -> ManagerConfig {
        ManagerConfig::with_security(listen, ManagerSecurity::InsecurePlaintext)
    }

    fn with_security(listen: impl Into<String>, security: ManagerSecurity) -> ManagerConfig {
        ManagerConfig {
            listen: listen.into(),
            security,
            queue_capacity: 100_000,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 256,
            max_handshakes_per_source: 8,
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            result_output_limit: 16 << 20,
            metrics_addr: None,
            reconnect_grace: Duration::from_secs(10),
            max_connections_per_certificate: 4,
            max_sessions_per_certificate: 64,
            max_heartbeats_per_second: 2000,
            detached_output_limit: 1 << 20,
            detached_retention: Duration::from_secs(3600),
            detached_retention_count: 1000,
            journal: None,
            journal_retention: Duration::from_secs(3600),
            journal_retention_count: 10_000,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidConfig(m.into()));
        if self.queue_capacity == 0 {
            return bad("queue_capacity must be at least 1");
        }
        if self.max_handshakes == 0 {
            return bad("max_handshakes must be at least 1");
        }
        if self.max_handshakes_per_source == 0 {
            return bad("max_handshakes_per_source must be at least 1");
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_timeout <= self.heartbeat_interval {
            return bad("heartbeat_timeout must be longer than a non-zero heartbeat_interval");
        }
        if self.handshake_timeout.is_zero() || self.handshake_timeout > MAX_HANDSHAKE_TIMEOUT {
            return bad("handshake_timeout must be more than zero and at most an hour");
        }
        if self.max_sessions_per_certificate == 0 {
            return bad("max_sessions_per_certificate must be at least 1");
        }
        if self.max_connections_per_certificate == 0 {
            return bad("max_connections_per_certificate must be at least 1");
        }
        if self.heartbeat_timeout > link::MAX_HEARTBEAT_TIMEOUT {
            return bad("heartbeat_timeout must be at most 10 minutes");
        }
        for (name, d) in [
            ("handshake_timeout", self.handshake_timeout),
            ("shutdown_grace", self.shutdown_grace),
            ("reconnect_grace", self.reconnect_grace),
            ("detached_retention", self.detached_retention),
            ("journal_retention", self.journal_retention),
        ] {
            if d > MAX_CONFIG_DURATION {
                return Err(Error::InvalidConfig(format!(
                    "{name} must be at most 365 days"
                )));
            }
        }
        Ok(())
    }
}

/// A connected worker, as the manager sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerInfo {
    /// The manager's id for this connection.
    pub id: u64,
    /// The name the worker announced.
    pub name: String,
    /// Where it connected from.
    pub address: Option<SocketAddr>,
    /// Its tags.
    pub tags: BTreeSet<String>,
    /// Its platform, e.g. `linux-x86_64`.
    pub platform: String,
    /// How many jobs it runs at once.
    pub slots: u32,
    /// How many it runs now.
    pub running: usize,
    /// Whether it is draining: it takes no new jobs and leaves when its jobs end.
    pub draining: bool,
}

/// Things that happen to the pool (see [`Manager::subscribe`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManagerEvent {
    /// A worker connected and was accepted.
    WorkerJoined(WorkerInfo),
    /// A worker's connection ended; its running jobs ended `WorkerLost`.
    WorkerLeft {
        /// The manager's id for the connection.
        id: u64,
        /// Its name.
        name: String,
        /// Why, in words.
        reason: String,
    },
}

/// State shared by the public handle, the acceptor and the link threads.
pub(crate) struct Shared {
    events: Sender<Event>,
    /// Jobs accepted and not yet started (the queue's length, counted at submit time
    /// so that a full queue refuses synchronously; the dispatcher counts them down).
    queued: Arc<AtomicUsize>,
    capacity: usize,
    next_job: AtomicU64,
    closing: AtomicBool,
    /// Held (shared) by each submission from its admission until its jobs are queued,
    /// and taken (exclusive) by shutdown once `closing` is set: every job admitted
    /// before the shutdown, and perhaps already in the journal, reaches the dispatcher
    /// before it shuts down (a submission whose journal write was on disk never fails
    /// as shut down while its job stays in the journal).
    submitting: std::sync::RwLock<()>,
    tls: Option<tls::ServerTls>,
    /// The links' timing and grace, stretched with the number of workers.
    pace: Arc<Pace>,
    manager_id: u64,
    counters: Arc<Counters>,
    result_limit: usize,
    /// The connections in handshake (see `admission`); the watchdog waits on `admission_wake`.
    admission: Mutex<Admission>,
    admission_wake: Condvar,
    /// Every open connection, so that the handshake watchdog and shutdown can cut
    /// them. Weak: the link thread owns the socket, and this keeps no descriptor open.
    connections: Mutex<HashMap<u64, Weak<TcpStream>>>,
    next_connection: AtomicU64,
    link_threads: Mutex<Vec<JoinHandle<()>>>,
    /// Remote submitters' sessions and the jobs they follow.
    submitters: Arc<Submitters>,
    /// Where accepted jobs and their changes are kept, if anywhere.
    journal: Option<Arc<dyn Journal>>,
}

/// The dispatcher, the acceptor, the handshake watchdog and the submitters' timer.
type ManagerThreads = (
    JoinHandle<()>,
    JoinHandle<()>,
    JoinHandle<()>,
    JoinHandle<()>,
);

/// A running manager. Dropping it shuts it down without a grace period.
pub struct Manager {
    shared: Arc<Shared>,
    /// Shared with the acceptor, so that its descriptor stays ours until shutdown is done.
    listener: Arc<TcpListener>,
    local_addr: SocketAddr,
    grace: Duration,
    threads: Mutex<Option<ManagerThreads>>,
    metrics: Mutex<Option<MetricsServer>>,
    metrics_addr: Option<SocketAddr>,
}

impl Manager {
    /// Binds the listening port and starts the manager's threads.
    pub fn bind(config: ManagerConfig) -> Result<Manager> {
        config.validate()?;
        let tls = match &config.security {
            ManagerSecurity::MutualTls {
                identity,
                worker_trust,
                submitter_trust,
            } => Some(tls::server_config(identity, worker_trust, submitter_trust)?),
            ManagerSecurity::InsecurePlaintext => {
                log::warn!(
                    "manager on {} runs WITHOUT TLS: anyone who can reach it can take jobs and forge results",
                    config.listen
                );
                None
            }
        };
        let listener = TcpListener::bind(&config.listen)
            .map_err(|e| Error::io(format!("binding {}", config.listen), e))?;
        // std listens with a backlog of 128: under a burst of new connections the kernel
        // then drops SYNs, and a real worker waits for its TCP retransmission (1 s, then
        // 3 s, ...). Listening again raises it (the kernel caps it at net.core.somaxconn).
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: the descriptor is the listener's own and open; listen() takes no
            // pointers, and on a listening socket only changes its backlog.
            unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) };
        }
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::io("reading the bound address", e))?;
        let (journal, recovered) = match &config.journal {
            Some(path) => {
                let retention = Retention {
                    keep_ended_for: config.journal_retention,
                    keep_ended: config.journal_retention_count,
                };
                let started = Instant::now();
                let (j, r) = journal::open(path, retention)?;
                log::info!(
                    "journal {}: {} job(s) to go on with, read in {:.3} s",
                    path.display(),
                    r.open.len(),
                    started.elapsed().as_secs_f64()
                );
                (Some(j), Some(r))
            }
            None => (None, None),
        };
        let (tx, rx) = unbounded();
        let manager_id = recovered
            .as_ref()
            .map_or_else(crate::random::u64, |r| r.manager_id);
        let queued = Arc::new(AtomicUsize::new(0));
        let counters: Arc<Counters> = Arc::default();
        let base = Timing {
            heartbeat_interval: config.heartbeat_interval,
            heartbeat_timeout: config.heartbeat_timeout,
        };
        let submitters = Submitters::new(
            HubSettings {
                grace: config.reconnect_grace,
                window: submitters::WINDOW,
                kept_output: config.detached_output_limit,
                keep_ended_for: config.detached_retention,
                keep_ended: config.detached_retention_count,
                max_sessions_per_owner: config.max_sessions_per_certificate,
            },
            // Submitters are few: their links keep the base timing.
            Arc::new(Pace::new(base, config.reconnect_grace, 0)),
        );
        let shared = Arc::new(Shared {
            events: tx,
            queued: queued.clone(),
            capacity: config.queue_capacity,
            next_job: AtomicU64::new(recovered.as_ref().map_or(1, |r| r.next_job)),
            closing: AtomicBool::new(false),
            submitting: std::sync::RwLock::new(()),
            tls,
            pace: Arc::new(Pace::new(
                base,
                config.reconnect_grace,
                config.max_heartbeats_per_second,
            )),
            manager_id,
            counters: counters.clone(),
            result_limit: config.result_output_limit,
            admission: Mutex::new(Admission::new(Limits {
                total: config.max_handshakes,
                per_source: config.max_handshakes_per_source,
                timeout: config.handshake_timeout,
            })),
            admission_wake: Condvar::new(),
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
            link_threads: Mutex::new(Vec::new()),
            submitters,
            journal: journal.clone(),
        });
        let settings = Settings {
            reconnect_grace: config.reconnect_grace,
            max_connections_per_certificate: config.max_connections_per_certificate,
            manager_id,
            journaled: journal.is_some(),
        };
        let mut d = Dispatcher::new(settings, queued, counters);
        if let Some(j) = &journal {
            shared.submitters.set_journal(j.clone());
        }
        if let Some(recovered) = recovered {
            d.restore(Instant::now(), shared.restore(recovered));
        }
        let dispatcher = crate::thread::spawn("wp-dispatcher", move || {
            dispatcher::driver::run(d, rx, journal)
        })
        .map_err(|e| Error::io("starting the dispatcher thread", e))?;
        let listener = Arc::new(listener);
        let (s, l) = (shared.clone(), listener.clone());
        let acceptor = crate::thread::spawn("wp-acceptor", move || acceptor::accept_loop(&l, s))
            .map_err(|e| Error::io("starting the acceptor thread", e))?;
        let s = shared.clone();
        let watchdog =
            crate::thread::spawn("wp-handshakes", move || acceptor::watch_handshakes(&s))
                .map_err(|e| Error::io("starting the handshake watchdog thread", e))?;
        let s = shared.clone();
        let timer = crate::thread::spawn("wp-submitters", move || {
            let cancel = |id: JobId| {
                let _ = s.events.send(Event::Cancel { id, reply: None });
            };
            s.submitters.run_timer(&cancel);
        })
        .map_err(|e| Error::io("starting the submitters' timer thread", e))?;
        log::info!("manager listening on {local_addr}");
        let metrics = match &config.metrics_addr {
            Some(addr) => {
                let s = shared.clone();
                let snapshot = Arc::new(move || query_stats(&s));
                let server = MetricsServer::start(addr, snapshot)
                    .map_err(|e| Error::io(format!("binding the metrics endpoint {addr}"), e))?;
                log::info!(
                    "metrics on http://{}/metrics",
                    server.local_addr().map_or(addr.clone(), |a| a.to_string())
                );
                Some(server)
            }
            None => None,
        };
        let metrics_addr = metrics.as_ref().and_then(MetricsServer::local_addr);
        Ok(Manager {
            metrics: Mutex::new(metrics),
            metrics_addr,
            shared,
            listener,
            local_addr,
            grace: config.shutdown_grace,
            threads: Mutex::new(Some((dispatcher, acceptor, watchdog, timer))),
        })
    }

    /// The address the manager listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Queues a job; it starts as soon as a matching worker has a free slot.
    /// Fails with [`Error::QueueFull`] when the queue holds its capacity, and with
    /// [`Error::ShutDown`] once shutdown has begun. With a journal it returns once the
    /// job's record is on disk, and fails with [`Error::Journal`] when it cannot be
    /// written (a full disk).
    pub fn submit(&self, spec: JobSpec) -> Result<JobHandle> {
        let s = &self.shared;
        let _admitted = s.admit(&spec, 1)?;
        let id = JobId(s.next_job.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = bounded(JOB_EVENT_CAPACITY);
        let stdin = spec
            .interactive
            .then(|| StdinPort::new(id, spec.pty.is_some(), None));
        if let Err(e) = s.write_accepted(&[(id, &spec)], &Submitter::Local) {
            s.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(e);
        }
        let sink = JobSink::with_stdin(id, tx, s.counters.clone(), stdin.clone());
        s.enqueue(id, spec, sink)?;
        Ok(JobHandle::new(id, rx, self.shared.clone(), stdin))
    }

    /// Cancels a job: a queued one never starts; a running one is killed. Either way it
    /// ends `Cancelled` (unless it finished first).
    pub fn cancel(&self, id: JobId) -> Result<()> {
        self.shared.cancel(id)
    }

    /// Where a job is, if it has not ended: queued (for how long) or running (where, for
    /// how long, which attempt). `None` for a job that ended or never existed.
    pub fn job(&self, id: JobId) -> Option<JobStatus> {
        self.query_jobs(Some(id)).pop()
    }

    /// Every job that has not ended, by id.
    pub fn jobs(&self) -> Vec<JobStatus> {
        self.query_jobs(None)
    }

    fn query_jobs(&self, only: Option<JobId>) -> Vec<JobStatus> {
        self.shared.query_jobs(only)
    }

    /// A snapshot of the manager's numbers (workers, slots, jobs by state and outcome,
    /// queue-wait and dispatch-latency histograms, bytes streamed, per-worker figures).
    pub fn stats(&self) -> Stats {
        query_stats(&self.shared).unwrap_or_else(|| Stats {
            workers: 0,
            workers_draining: 0,
            slots_total: 0,
            slots_busy: 0,
            jobs_queued: 0,
            jobs_running: 0,
            jobs_disconnected: 0,
            jobs_submitted: self.shared.counters.submitted.load(Ordering::Relaxed),
            jobs_finished: Vec::new(),
            oldest_queued_wait: None,
            queue_wait: Default::default(),
            dispatch_latency: Default::default(),
            output_bytes: self.shared.counters.output_bytes.load(Ordering::Relaxed),
            per_worker: Vec::new(),
            journal_bytes: self.shared.journal.as_ref().map(|j| j.size_bytes()),
        })
    }

    /// Where the metrics endpoint listens, if it was asked for.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The connected workers.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.shared.query_workers()
    }

    /// A stream of pool events (workers joining and leaving) from now on. Workers that
    /// joined before the call are not announced: to see every worker once, subscribe
    /// first, then read [`Manager::workers`], and skip a later `WorkerJoined` whose `id`
    /// is among them (as the example CLI does).
    pub fn subscribe(&self) -> Receiver<ManagerEvent> {
        let (tx, rx) = unbounded();
        let _ = self.shared.events.send(Event::Subscribe(tx));
        rx
    }

    /// Shuts down gracefully: stops taking jobs, ends queued jobs `Rejected`, lets
    /// running jobs finish within the configured grace period and cancels the rest,
    /// says goodbye to the workers, and returns when every manager thread has ended.
    /// With a journal no job ends: queued jobs stay in the journal, running ones go on
    /// on their workers, and a manager started again on the journal goes on with them
    /// (this process's [`JobHandle`]s end `Rejected`, saying so).
    pub fn shutdown(&self) {
        self.shutdown_within(self.grace);
    }

    /// [`Manager::shutdown`] with a grace period of its own.
    pub fn shutdown_within(&self, grace: Duration) {
        let Some((dispatcher, acceptor, watchdog, timer)) = lock(&self.threads).take() else {
            return;
        };
        let s = &self.shared;
        drop(lock(&self.metrics).take());
        s.closing.store(true, Ordering::Release);
        // Submissions admitted before `closing` was set queue their jobs first.
        drop(s.submitting.write().unwrap_or_else(|p| p.into_inner()));
        let _ = s.events.send(Event::Shutdown { grace });
        let _ = dispatcher.join();
        crate::net::wake_acceptor(&self.listener, Duration::from_secs(1));
        let _ = acceptor.join();
        {
            // Taken so that the watchdog is either waiting (and gets the notification) or
            // yet to look at `closing`.
            let _admission = lock(&s.admission);
            s.admission_wake.notify_all();
        }
        let _ = watchdog.join();
        s.submitters
            .flush_all(Instant::now() + Duration::from_secs(2));
        // Sinks still waiting for a submitter's room drop their events from here.
        s.submitters.stop();
        let _ = timer.join();
        let open: Vec<Arc<TcpStream>> = lock(&s.connections)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for tcp in open {
            let _ = tcp.shutdown(std::net::Shutdown::Both);
        }
        let threads: Vec<JoinHandle<()>> = lock(&s.link_threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        // Every thread that writes to the journal has ended: what it recorded is
        // committed, and the journal is let go (another manager may open it).
        if let Some(j) = &s.journal {
            j.close();
        }
        log::info!("manager on {} shut down", self.local_addr);
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.shutdown_within(Duration::ZERO);
    }
}

impl Shared {
    /// Checks a job and takes `n` places in the queue for it, all or none. The guard
    /// it returns is kept until the jobs are queued (see [`Shared::submitting`]).
    fn admit(&self, spec: &JobSpec, n: usize) -> Result<std::sync::RwLockReadGuard<'_, ()>> {
        let admitted = self.submitting.read().unwrap_or_else(|p| p.into_inner());
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::ShutDown);
        }
        spec.validate().map_err(Error::InvalidJob)?;
        if spec.interactive && spec.retries > 0 {
            // What a run took of its stdin is gone: another run could not have it again.
            return Err(Error::InvalidJob(
                "an interactive job is not retried: its stdin cannot be given to another run"
                    .into(),
            ));
        }
        let size = spec.wire_size();
        if size > MAX_JOB_BYTES {
            return Err(Error::InvalidJob(format!(
                "the job is {size} bytes (script, stdin, environment); at most {MAX_JOB_BYTES} are accepted"
            )));
        }
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                q.checked_add(n).filter(|&after| after <= self.capacity)
            })
            .map_err(|_| Error::QueueFull {
                capacity: self.capacity,
            })?;
        Ok(admitted)
    }

    /// With a journal, writes that these admitted jobs are accepted, and returns once
    /// that is on disk (a failure, such as a full disk, is the submission's error: the
    /// caller gives the queue places back). Without one, does nothing.
    pub(crate) fn write_accepted(
        &self,
        jobs: &[(JobId, &JobSpec)],
        submitter: &Submitter,
    ) -> Result<()> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        let records = jobs
            .iter()
            .map(|&(id, spec)| Record::Accepted {
                id,
                spec: spec.clone(),
                submitter: submitter.clone(),
            })
            .collect();
        journal.write(records)
    }

    /// The jobs a journal gave back at a restart, each with a new sink: a remote
    /// submitter's job delivers to the submitters' hub (which has its sessions back), an
    /// in-process submitter's to nobody (it runs to its end, which is journaled).
    fn restore(&self, recovered: journal::Recovered) -> Vec<dispatcher::Restored> {
        let now = Instant::now();
        let open: Vec<&journal::OpenJob> = recovered.open.iter().collect();
        let mut ports =
            self.submitters
                .restore(&open, recovered.ended_detached, &recovered.remote_requests);
        let mut restored = Vec::with_capacity(recovered.open.len());
        for open in recovered.open {
            let id = open.id;
            let sink = match open.submitter {
                Submitter::Remote { .. } => {
                    let dest = Dest::Remote(RemoteDest {
                        submitters: self.submitters.clone(),
                        job: id,
                    });
                    JobSink::with_stdin(id, dest, self.counters.clone(), ports.remove(&id))
                }
                Submitter::Local => {
                    // Its writer was in the old process: its stdin ends.
                    let stdin = open
                        .spec
                        .interactive
                        .then(|| StdinPort::orphaned(id, open.spec.pty.is_some()));
                    let (tx, _nobody) = bounded(1);
                    JobSink::with_stdin(id, tx, self.counters.clone(), stdin)
                }
            };
            if let Some(j) = &self.journal {
                sink.journal_to(j.clone());
            }
            let sent_to = open.place.sent_to();
            restored.push(dispatcher::Restored {
                job: QueuedJob {
                    id,
                    spec: open.spec,
                    events: sink,
                    attempt: open.attempt,
                    since: now,
                },
                sent_to,
            });
        }
        restored
    }

    /// Queues an admitted job whose events go to `sink`; fails only once shutdown
    /// has begun (and then gives its place in the queue back).
    fn enqueue(&self, id: JobId, spec: JobSpec, sink: Arc<JobSink>) -> Result<()> {
        if let Some(j) = &self.journal {
            sink.journal_to(j.clone());
        }
        self.counters.submitted.fetch_add(1, Ordering::Relaxed);
        sink.push(JobEvent::Queued);
        let job = QueuedJob {
            id,
            spec,
            events: sink,
            attempt: 1,
            since: Instant::now(),
        };
        if self.events.send(Event::Submit(job)).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::ShutDown);
        }
        Ok(())
    }

    fn cancel(&self, id: JobId) -> Result<()> {
        let (tx, rx) = bounded(1);
        self.events
            .send(Event::Cancel {
                id,
                reply: Some(tx),
            })
            .map_err(|_| Error::ShutDown)?;
        rx.recv().map_err(|_| Error::ShutDown)?
    }

    fn query_jobs(&self, only: Option<JobId>) -> Vec<JobStatus> {
        let (tx, rx) = bounded(1);
        if self.events.send(Event::Jobs { only, reply: tx }).is_err() {
            return Vec::new();
        }
        rx.recv().unwrap_or_default()
    }

    fn query_workers(&self) -> Vec<WorkerInfo> {
        let (tx, rx) = bounded(1);
        if self.events.send(Event::Workers(tx)).is_err() {
            return Vec::new();
        }
        rx.recv().unwrap_or_default()
    }
}

fn query_stats(shared: &Shared) -> Option<Stats> {
    let (tx, rx) = bounded(1);
    shared.events.send(Event::Stats(tx)).ok()?;
    let mut stats = rx.recv_timeout(Duration::from_secs(5)).ok()?;
    stats.journal_bytes = shared.journal.as_ref().map(|j| j.size_bytes());
    Some(stats)
}
