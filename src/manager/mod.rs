//! The manager: listens on one port, accepts workers over mutual TLS, queues jobs and
//! hands them out. [`Manager`] is the public handle; the [`dispatcher`] thread owns the
//! scheduling state; each worker connection has a reader thread (the one that accepted
//! it) and a writer thread (see `link`).

mod admission;
mod dispatcher;
mod queue;
mod sink;

use crate::error::{Error, Result};
use crate::job::{JobEvent, JobId, JobResult, JobSpec, JobStatus, Outcome, Stream};
use crate::link::{self, Liveness, Outbound, Outbox, Timing};
use crate::metrics::{Counters, MetricsServer, Stats};
use crate::protocol::{
    DEFAULT_MAX_FRAME, ManagerMessage, OUTPUT_CHUNK, Welcome, WorkerMessage, peer_text,
};
use crate::tls::{self, Identity, PeerTrust};
use admission::{Admission, Limits, Reason};
use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use dispatcher::{Dispatcher, Event, LinkHandle, Routes};
use queue::QueuedJob;
use sink::JobSink;
use std::collections::{BTreeSet, HashMap};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// How many messages may wait in a link's outbound queue. Legitimately a link holds a
/// few per running job (`Run`, `Pause`/`Resume`, `Cancel`, `Ended`) and a worker has at
/// most 1024 slots; a worker that stops reading fills it, and its link is closed rather
/// than the queue grown or anyone blocked.
const LINK_QUEUE: usize = 4096;

/// The longest grace or timeout a manager accepts in its configuration.
const MAX_CONFIG_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// How many messages about jobs it does not run are logged per link; the rest are
/// counted and reported once when the link closes.
const LOGGED_COMPLAINTS: u64 = 10;

/// How the manager authenticates workers.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ManagerSecurity {
    /// Mutual TLS: the manager shows `identity`; a worker must present a certificate
    /// that is exactly one of the pinned ones in `worker_trust`, or that one of its CAs
    /// issued.
    MutualTls {
        /// The manager's certificate and key.
        identity: Identity,
        /// Worker certificates (pinned, each accepted only as itself) and the CAs that
        /// issue worker certificates, as two separate lists.
        worker_trust: PeerTrust,
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
    /// How workers are authenticated.
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
    /// A link that has sent nothing for this long sends a heartbeat.
    pub heartbeat_interval: Duration,
    /// A link that has heard nothing for this long is closed (its jobs end `WorkerLost`).
    pub heartbeat_timeout: Duration,
    /// On shutdown, how long running jobs may go on before they are cancelled.
    pub shutdown_grace: Duration,
    /// How long the jobs of a worker whose connection dropped wait for that worker (same
    /// name, same certificate) to come back and go on with them; then they end
    /// `WorkerLost` (or are retried). Zero ends them at once.
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
}

impl ManagerConfig {
    /// A mutual-TLS manager listening on `listen`, with defaults for everything else.
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
            },
        )
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// so that a full queue refuses synchronously).
    queued: AtomicUsize,
    capacity: usize,
    next_job: AtomicU64,
    closing: AtomicBool,
    tls: Option<Arc<rustls::ServerConfig>>,
    timing: Timing,
    manager_id: u64,
    counters: Arc<Counters>,
    result_limit: usize,
    reconnect_grace: Duration,
    max_connections_per_certificate: usize,
    /// The connections in handshake (see `admission`); the watchdog waits on `admission_wake`.
    admission: Mutex<Admission>,
    admission_wake: Condvar,
    /// Every open connection, so that shutdown can cut them all.
    connections: Mutex<HashMap<u64, TcpStream>>,
    next_connection: AtomicU64,
    link_threads: Mutex<Vec<JoinHandle<()>>>,
}

#[cfg(test)]
impl Shared {
    /// Shared state for in-memory tests of the dispatcher: plaintext, default settings.
    pub(crate) fn for_tests(events: Sender<Event>, config: &ManagerConfig) -> Arc<Shared> {
        Arc::new(Shared {
            events,
            queued: AtomicUsize::new(0),
            capacity: config.queue_capacity,
            next_job: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            tls: None,
            timing: Timing {
                heartbeat_interval: config.heartbeat_interval,
                heartbeat_timeout: config.heartbeat_timeout,
            },
            manager_id: 1,
            counters: Arc::default(),
            result_limit: config.result_output_limit,
            reconnect_grace: config.reconnect_grace,
            max_connections_per_certificate: config.max_connections_per_certificate,
            admission: Mutex::new(Admission::new(Limits {
                total: config.max_handshakes,
                per_source: config.max_handshakes_per_source,
                timeout: config.handshake_timeout,
            })),
            admission_wake: Condvar::new(),
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
            link_threads: Mutex::new(Vec::new()),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The dispatcher, the acceptor and the handshake watchdog.
type ManagerThreads = (JoinHandle<()>, JoinHandle<()>, JoinHandle<()>);

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
            } => Some(tls::server_config(identity, worker_trust)?),
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
        let (tx, rx) = unbounded();
        let shared = Arc::new(Shared {
            events: tx,
            queued: AtomicUsize::new(0),
            capacity: config.queue_capacity,
            next_job: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            tls,
            timing: Timing {
                heartbeat_interval: config.heartbeat_interval,
                heartbeat_timeout: config.heartbeat_timeout,
            },
            manager_id: {
                use std::hash::{BuildHasher, Hasher};
                // Randomly keyed per process by the standard library.
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u128(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos()),
                );
                h.finish()
            },
            counters: Arc::default(),
            result_limit: config.result_output_limit,
            reconnect_grace: config.reconnect_grace,
            max_connections_per_certificate: config.max_connections_per_certificate,
            admission: Mutex::new(Admission::new(Limits {
                total: config.max_handshakes,
                per_source: config.max_handshakes_per_source,
                timeout: config.handshake_timeout,
            })),
            admission_wake: Condvar::new(),
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
            link_threads: Mutex::new(Vec::new()),
        });
        let d = Dispatcher::new(shared.clone());
        let dispatcher = crate::thread::spawn("wp-dispatcher", move || d.run(rx))
            .map_err(|e| Error::io("starting the dispatcher thread", e))?;
        let listener = Arc::new(listener);
        let (s, l) = (shared.clone(), listener.clone());
        let acceptor = crate::thread::spawn("wp-acceptor", move || accept_loop(&l, s))
            .map_err(|e| Error::io("starting the acceptor thread", e))?;
        let s = shared.clone();
        let watchdog = crate::thread::spawn("wp-handshakes", move || watch_handshakes(&s))
            .map_err(|e| Error::io("starting the handshake watchdog thread", e))?;
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
            threads: Mutex::new(Some((dispatcher, acceptor, watchdog))),
        })
    }

    /// The address the manager listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Queues a job; it starts as soon as a matching worker has a free slot.
    /// Fails with [`Error::QueueFull`] when the queue holds its capacity, and with
    /// [`Error::ShutDown`] once shutdown has begun.
    pub fn submit(&self, spec: JobSpec) -> Result<JobHandle> {
        let s = &self.shared;
        if s.closing.load(Ordering::Acquire) {
            return Err(Error::ShutDown);
        }
        spec.validate().map_err(Error::InvalidJob)?;
        let size = spec.wire_size();
        if size > MAX_JOB_BYTES {
            return Err(Error::InvalidJob(format!(
                "the job is {size} bytes (script, stdin, environment); at most {MAX_JOB_BYTES} are accepted"
            )));
        }
        s.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < s.capacity).then_some(q + 1)
            })
            .map_err(|_| Error::QueueFull {
                capacity: s.capacity,
            })?;
        let id = JobId(s.next_job.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = bounded(JOB_EVENT_CAPACITY);
        let sink = JobSink::new(id, tx, s.counters.clone());
        s.counters.submitted.fetch_add(1, Ordering::Relaxed);
        sink.push(JobEvent::Queued);
        let job = QueuedJob {
            id,
            spec,
            events: sink,
            attempt: 1,
            since: Instant::now(),
        };
        if s.events.send(Event::Submit(job)).is_err() {
            s.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::ShutDown);
        }
        Ok(JobHandle {
            id,
            events: rx,
            shared: self.shared.clone(),
            partial: Partial::default(),
        })
    }

    /// Cancels a job: a queued one never starts; a running one is killed. Either way it
    /// ends `Cancelled` (unless it finished first).
    pub fn cancel(&self, id: JobId) -> Result<()> {
        let (tx, rx) = bounded(1);
        self.shared
            .events
            .send(Event::Cancel {
                id,
                reply: Some(tx),
            })
            .map_err(|_| Error::ShutDown)?;
        rx.recv().map_err(|_| Error::ShutDown)?
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
        let (tx, rx) = bounded(1);
        if self
            .shared
            .events
            .send(Event::Jobs { only, reply: tx })
            .is_err()
        {
            return Vec::new();
        }
        rx.recv().unwrap_or_default()
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
        })
    }

    /// Where the metrics endpoint listens, if it was asked for.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The connected workers.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        let (tx, rx) = bounded(1);
        if self.shared.events.send(Event::Workers(tx)).is_err() {
            return Vec::new();
        }
        rx.recv().unwrap_or_default()
    }

    /// A stream of pool events (workers joining and leaving) from now on.
    pub fn subscribe(&self) -> Receiver<ManagerEvent> {
        let (tx, rx) = unbounded();
        let _ = self.shared.events.send(Event::Subscribe(tx));
        rx
    }

    /// Shuts down gracefully: stops taking jobs, ends queued jobs `Rejected`, lets
    /// running jobs finish within the configured grace period and cancels the rest,
    /// says goodbye to the workers, and returns when every manager thread has ended.
    pub fn shutdown(&self) {
        self.shutdown_within(self.grace);
    }

    /// [`Manager::shutdown`] with a grace period of its own.
    pub fn shutdown_within(&self, grace: Duration) {
        let Some((dispatcher, acceptor, watchdog)) = lock(&self.threads).take() else {
            return;
        };
        let s = &self.shared;
        drop(lock(&self.metrics).take());
        s.closing.store(true, Ordering::Release);
        let _ = s.events.send(Event::Shutdown { grace });
        let _ = dispatcher.join();
        // Wake the acceptor from accept(): on Linux shutting the listener down does it;
        // connecting to it works everywhere the address is reachable.
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: shutting down a descriptor we own (the listener is alive in `self`) has no memory effects.
            unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RD) };
        }
        let mut wake = self.local_addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        let _ = acceptor.join();
        {
            // Taken so that the watchdog is either waiting (and gets the notification) or
            // yet to look at `closing`.
            let _admission = lock(&s.admission);
            s.admission_wake.notify_all();
        }
        let _ = watchdog.join();
        for tcp in lock(&s.connections).values() {
            let _ = tcp.shutdown(std::net::Shutdown::Both);
        }
        let threads: Vec<JoinHandle<()>> = lock(&s.link_threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        log::info!("manager on {} shut down", self.local_addr);
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.shutdown_within(Duration::ZERO);
    }
}

fn query_stats(shared: &Shared) -> Option<Stats> {
    let (tx, rx) = bounded(1);
    shared.events.send(Event::Stats(tx)).ok()?;
    rx.recv_timeout(Duration::from_secs(5)).ok()
}

fn accept_loop(listener: &TcpListener, shared: Arc<Shared>) {
    // Displacements are logged as a warning at most once per this long (a flood makes
    // thousands), the rest at debug level.
    const WARN_EVERY: Duration = Duration::from_secs(10);
    let mut warned: Option<Instant> = None;
    for conn in listener.incoming() {
        if shared.closing.load(Ordering::Acquire) {
            break;
        }
        let tcp = match conn {
            Ok(t) => t,
            Err(e) => {
                log::warn!("accept failed: {e}");
                // Out of descriptors or similar: do not spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        // Without its address (already reset) or a second handle (needed to cut it at
        // its deadline), a connection is dropped at once.
        let (Ok(peer), Ok(cut)) = (tcp.peer_addr(), tcp.try_clone()) else {
            continue;
        };
        let conn_id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
        lock(&shared.connections).insert(conn_id, cut);
        let admitted = {
            let mut admission = lock(&shared.admission);
            let admitted = admission.admit(conn_id, peer.ip(), Instant::now());
            if let Some(d) = admitted.displaced {
                cut_connection(&shared, d.id);
                let limits = admission.limits();
                let why = match d.reason {
                    Reason::SourceFull => format!(
                        "{} already had {} connections in handshake",
                        d.source, limits.per_source
                    ),
                    Reason::AllFull => format!(
                        "all {} handshake slots were taken; {} held the most",
                        limits.total, d.source
                    ),
                };
                let msg = format!(
                    "a connection from {peer} displaced the oldest handshake from {}: {why}",
                    d.source
                );
                if warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    warned = Some(Instant::now());
                    log::warn!(
                        "{msg} (more displacements in the next {} s are logged at debug level)",
                        WARN_EVERY.as_secs()
                    );
                } else {
                    log::debug!("{msg}");
                }
            }
            admitted
        };
        shared.admission_wake.notify_all();
        let s = shared.clone();
        let spawned = crate::thread::spawn("wp-link", move || {
            serve_connection(&s, tcp, peer, conn_id, admitted.deadline);
            lock(&s.connections).remove(&conn_id);
        });
        match spawned {
            Ok(handle) => {
                let mut threads = lock(&shared.link_threads);
                threads.retain(|t| !t.is_finished());
                threads.push(handle);
            }
            Err(e) => {
                lock(&shared.admission).finish(conn_id);
                lock(&shared.connections).remove(&conn_id);
                log::error!("cannot start a link thread: {e}");
            }
        }
    }
}

/// Cuts a connection from any thread: its blocked reads and writes return at once.
fn cut_connection(shared: &Shared, id: u64) {
    if let Some(tcp) = lock(&shared.connections).get(&id) {
        let _ = tcp.shutdown(std::net::Shutdown::Both);
    }
}

/// The handshake watchdog: cuts every connection still in handshake at its deadline, so
/// that no peer keeps a slot longer, whatever the link thread is blocked on.
fn watch_handshakes(shared: &Shared) {
    let mut admission = lock(&shared.admission);
    while !shared.closing.load(Ordering::Acquire) {
        let now = Instant::now();
        for (id, source) in admission.expire(now) {
            log::debug!("cutting a connection from {source}: its handshake deadline passed");
            cut_connection(shared, id);
        }
        admission = match admission.next_deadline() {
            Some(d) => {
                shared
                    .admission_wake
                    .wait_timeout(admission, d.saturating_duration_since(now))
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => shared
                .admission_wake
                .wait(admission)
                .unwrap_or_else(|p| p.into_inner()),
        };
    }
}

/// One worker connection, on its own thread: handshake, registration, then this thread
/// reads while a second one writes.
fn serve_connection(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    deadline: Instant,
) {
    let who = peer.to_string();
    let accepted = link::accept(tcp, shared.tls.as_ref(), deadline);
    // False when the watchdog or a newcomer took the slot (and cut the socket) first.
    let kept_slot = lock(&shared.admission).finish(conn_id);
    let (mut est, hello) = match accepted {
        Ok(x) if kept_slot => x,
        Err(e) if kept_slot => {
            log::warn!("refused connection from {who}: {e}");
            return;
        }
        _ if Instant::now() >= deadline => {
            log::warn!("refused connection from {who}: no TLS handshake and hello by the deadline");
            return;
        }
        _ => {
            log::debug!(
                "dropped connection from {who}: a newer connection took its handshake slot"
            );
            return;
        }
    };
    let peer = Some(peer);
    let live = Liveness::new();
    let (out_tx, out_rx) = bounded::<Outbound<ManagerMessage>>(LINK_QUEUE);
    let out = Outbox::new(out_tx, live.clone(), est.closer.clone());
    let routes: Arc<Routes> = Arc::default();
    let (reply_tx, reply_rx) = bounded(1);
    let name = hello.name.clone();
    let register = Event::Register {
        hello,
        peer,
        cert: est.peer_cert.clone(),
        link: LinkHandle {
            out: out.clone(),
            routes: routes.clone(),
            live: live.clone(),
            closer: est.closer.clone(),
        },
        reply: reply_tx,
    };
    if shared.events.send(register).is_err() {
        link::refuse(&mut est.writer, "the manager is shutting down");
        return;
    }
    let (worker_id, resume) = match reply_rx.recv() {
        Ok(Ok(x)) => x,
        Ok(Err(reason)) => {
            link::refuse(&mut est.writer, &reason);
            return;
        }
        Err(_) => {
            link::refuse(&mut est.writer, "the manager is shutting down");
            return;
        }
    };
    let label = format!("worker {name} ({who})");
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let welcome = Welcome {
        manager_id: shared.manager_id,
        worker_id,
        heartbeat_interval_ms: ms(shared.timing.heartbeat_interval),
        heartbeat_timeout_ms: ms(shared.timing.heartbeat_timeout),
        reconnect_grace_ms: ms(shared.reconnect_grace),
        resume,
    };
    let started =
        link::welcome(&mut est, &welcome).and_then(|()| link::go_live(&est, shared.timing));
    let writer = match started {
        Ok(()) => link::spawn_writer(
            label.clone(),
            est.writer,
            est.closer.clone(),
            out_rx,
            live.clone(),
            shared.timing,
        )
        .map_err(|e| Error::io("starting a link writer thread", e)),
        Err(e) => Err(e),
    };
    let mut complaints = Complaints::default();
    let result = match &writer {
        // A panic here must not leave the worker registered with its link gone.
        Ok(_) => catch_unwind(AssertUnwindSafe(|| {
            link::read_messages(&mut est.reader, &live, |msg: WorkerMessage| {
                let link = Link {
                    shared,
                    worker: worker_id,
                    label: &label,
                    routes: &routes,
                    out: &out,
                };
                match on_worker_message(&link, &mut complaints, msg) {
                    Ok(()) => true,
                    Err(why) => {
                        log::warn!("{label}: {why}; closing the link");
                        live.close_because(why);
                        false
                    }
                }
            })
        }))
        .unwrap_or_else(|_| {
            Err(Error::Protocol(
                "the link's reader failed (a bug: see the log)".into(),
            ))
        }),
        Err(e) => Err(Error::Protocol(e.to_string())),
    };
    complaints.summary(&label);
    live.mark_closed();
    est.closer.close();
    let reason = live.reason().unwrap_or_else(|| match result {
        Ok(()) => "it closed the connection".to_string(),
        Err(e) => e.to_string(),
    });
    let _ = shared.events.send(Event::LinkClosed {
        worker: worker_id,
        reason,
    });
    if let Ok(w) = writer {
        let _ = w.join();
    }
}

/// What a link's reader needs to act on its worker's messages.
struct Link<'a> {
    shared: &'a Shared,
    worker: u64,
    label: &'a str,
    routes: &'a Routes,
    out: &'a Outbox<ManagerMessage>,
}

/// Messages about jobs a worker does not run, counted per link so that a worker cannot
/// fill the log with them: the first few are logged, the rest summed up at the end.
#[derive(Default)]
struct Complaints {
    ignored: u64,
}

impl Complaints {
    /// Counts one; true while it is still to be logged.
    fn ignored(&mut self, label: &str) -> bool {
        self.ignored += 1;
        if self.ignored == LOGGED_COMPLAINTS + 1 {
            log::warn!(
                "{label}: more messages about jobs it does not run; they are counted, not logged"
            );
        }
        self.ignored <= LOGGED_COMPLAINTS
    }

    fn summary(&self, label: &str) {
        if self.ignored > LOGGED_COMPLAINTS {
            log::warn!(
                "{label}: {} messages about jobs it does not run were ignored in all",
                self.ignored
            );
        }
    }
}

/// A worker's account of how a job ended, with its free text made safe to pass on.
fn peer_outcome(outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::Rejected(why) => Outcome::Rejected(peer_text(&why)),
        Outcome::SpawnFailed(why) => Outcome::SpawnFailed(peer_text(&why)),
        other => other,
    }
}

/// Acts on one message from a worker; `Err` says how it broke the protocol (the link
/// closes).
fn on_worker_message(
    link: &Link<'_>,
    complaints: &mut Complaints,
    msg: WorkerMessage,
) -> std::result::Result<(), String> {
    let Link {
        shared,
        worker,
        label,
        routes,
        out,
    } = *link;
    match msg {
        WorkerMessage::Output {
            job,
            stream,
            seq,
            bytes,
        } => {
            if bytes.len() > OUTPUT_CHUNK {
                return Err(format!(
                    "an output message of {} bytes (at most {OUTPUT_CHUNK} allowed)",
                    bytes.len()
                ));
            }
            // Pushed under the routes lock (pushing never blocks), so that no output can
            // slip in after whoever removes the route has delivered `Finished`.
            let mut routes = lock(routes);
            let Some(route) = routes.get_mut(&job) else {
                log::debug!("{label}: output for job {job}, which it does not run (ignored)");
                return Ok(());
            };
            if seq < route.next_seq {
                return Ok(()); // replayed after a reconnect, and already delivered
            }
            // Checked before the seq is taken: refused output is not counted as
            // delivered, so a worker that reconnects sends it again.
            if !route.sink.has_room(bytes.len()) {
                return Err(format!(
                    "job {job}: it went on sending output after Pause ({} MiB held for the job)",
                    sink::MAX_BACKLOG_BYTES >> 20
                ));
            }
            if !route.take_seq(seq, job, label)? {
                return Ok(());
            }
            shared
                .counters
                .output_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            route.sink.push(JobEvent::Output { stream, bytes });
        }
        WorkerMessage::Finished {
            job,
            outcome,
            cleanup_error,
        } => {
            let route = lock(routes).remove(&job);
            match route {
                Some(mut route) => {
                    // Acknowledged: the worker may forget the job.
                    out.send(ManagerMessage::Ended { job });
                    // The dispatcher hears of it first: whoever sees `Finished` and then
                    // asks the manager finds the job gone and the slot free.
                    let _ = shared.events.send(Event::JobEnded { worker, job });
                    route.report_gaps(job, label);
                    if let Some(e) = cleanup_error {
                        let e = peer_text(&e);
                        log::warn!("{label}: job {job}: {e}");
                        route.sink.push(JobEvent::Warning(e));
                    }
                    route.sink.push(JobEvent::Finished(peer_outcome(outcome)));
                }
                None => {
                    if complaints.ignored(label) {
                        log::warn!(
                            "{label}: reported job {job} finished, which it does not run (ignored)"
                        );
                    }
                }
            }
        }
        WorkerMessage::Declined { job, reason } => {
            let route = lock(routes).remove(&job);
            match route {
                Some(route) => {
                    log::info!(
                        "{label}: declined job {job} ({}); queueing it again",
                        peer_text(&reason)
                    );
                    let _ = shared.events.send(Event::Declined { worker, job, route });
                }
                None => {
                    if complaints.ignored(label) {
                        log::warn!("{label}: declined job {job}, which it was not given (ignored)");
                    }
                }
            }
        }
        WorkerMessage::CleanupFailed { job, error } => {
            // After the job's `Finished`, its route is gone: then it is only logged.
            let error = peer_text(&error);
            let routes = lock(routes);
            match routes.get(&job) {
                Some(route) => {
                    log::warn!("{label}: job {job}: {error}");
                    route.sink.push(JobEvent::Warning(error));
                }
                None => {
                    if complaints.ignored(label) {
                        log::warn!("{label}: job {job}, already ended: {error}");
                    }
                }
            }
        }
        WorkerMessage::Draining => {
            let _ = shared.events.send(Event::Draining { worker });
        }
        WorkerMessage::Goodbye => {
            let _ = shared.events.send(Event::Goodbye { worker });
        }
        WorkerMessage::Heartbeat => {}
    }
    Ok(())
}

#[derive(Default)]
struct Partial {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    attempts: u32,
    truncated: bool,
    worker: Option<String>,
    warnings: Vec<String>,
}

/// A submitted job: its events as they happen, and its result at the end.
pub struct JobHandle {
    id: JobId,
    events: Receiver<JobEvent>,
    shared: Arc<Shared>,
    partial: Partial,
}

impl JobHandle {
    /// The job's id.
    pub fn id(&self) -> JobId {
        self.id
    }

    /// The job's events, in order, ending with exactly one [`JobEvent::Finished`].
    /// Events taken from here are not seen by [`JobHandle::wait`].
    pub fn events(&self) -> &Receiver<JobEvent> {
        &self.events
    }

    /// Asks for the job to be cancelled (see [`Manager::cancel`]); does not wait.
    pub fn cancel(&self) -> Result<()> {
        self.shared
            .events
            .send(Event::Cancel {
                id: self.id,
                reply: None,
            })
            .map_err(|_| Error::ShutDown)
    }

    /// Waits for the job to end; returns its outcome and everything it wrote.
    pub fn wait(mut self) -> JobResult {
        loop {
            let ev = self.events.recv().ok();
            if let Some(r) = self.absorb(ev) {
                return r;
            }
        }
    }

    /// Like [`JobHandle::wait`], but gives up after `timeout` (output received so far is
    /// kept for the next call). Once it has returned a result, do not call it again.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<JobResult> {
        let deadline = Instant::now() + timeout;
        loop {
            let ev = match self.events.recv_deadline(deadline) {
                Ok(ev) => Some(ev),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => return None,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => None,
            };
            if let Some(r) = self.absorb(ev) {
                return Some(r);
            }
        }
    }

    /// Takes one event into the partial result; returns the result at the end.
    /// `None` means the channel closed without a `Finished`, which happens only when
    /// the manager went away under the job.
    fn absorb(&mut self, ev: Option<JobEvent>) -> Option<JobResult> {
        let p = &mut self.partial;
        let outcome = match ev {
            None => Outcome::Rejected("the manager shut down".into()),
            Some(JobEvent::Finished(o)) => o,
            Some(JobEvent::Output { stream, bytes }) => {
                let buf = match stream {
                    Stream::Stdout => &mut p.stdout,
                    Stream::Stderr => &mut p.stderr,
                };
                let room = self.shared.result_limit.saturating_sub(buf.len());
                if bytes.len() > room {
                    p.truncated = true;
                }
                buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
                return None;
            }
            Some(JobEvent::Started { worker }) => {
                p.worker = Some(worker);
                p.attempts += 1;
                return None;
            }
            Some(JobEvent::Warning(w)) => {
                p.warnings.push(w);
                return None;
            }
            Some(_) => return None,
        };
        let p = std::mem::take(&mut self.partial);
        Some(JobResult {
            id: self.id,
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
