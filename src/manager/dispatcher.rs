//! The dispatcher: the one thread that owns all scheduling state (the queue, the
//! worker table, which job runs where, the jobs of workers that are reconnecting).
//! Everything else talks to it through one channel of [`Event`]s, so no lock guards
//! scheduling state. Job output does not pass through here: link readers push it into
//! the job's sink via the link's route table, and whoever removes a job's route
//! delivers its single `Finished`.

use super::queue::{Queue, QueuedJob};
use super::sink::JobSink;
use super::{ManagerEvent, Shared, WorkerInfo};
use crate::error::{Error, Result};
use crate::job::{JobEvent, JobId, JobSpec, JobState, JobStatus, Outcome};
use crate::link::{Liveness, Outbox};
use crate::metrics::{Histogram, Stats, WorkerStats};
use crate::protocol::{self, ManagerMessage, WorkerHello};
use crate::tls::Closer;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running job's place on its link: where its events go, and the output `seq` the
/// manager expects next (so that output replayed after a reconnect is taken once).
pub(crate) struct Route {
    pub sink: Arc<JobSink>,
    pub next_seq: u64,
    /// Output messages that never arrived (gaps in `seq`), and in how many gaps: the
    /// first gap is reported at once, the rest summed up when the job ends.
    pub lost: u64,
    pub gaps: u64,
}

impl Route {
    pub(crate) fn new(sink: Arc<JobSink>) -> Route {
        Route {
            sink,
            next_seq: 0,
            lost: 0,
            gaps: 0,
        }
    }

    /// Takes note of output `seq`: `Ok(true)` to deliver it, `Ok(false)` for a replay
    /// already delivered, `Err` for a `seq` no worker can have sent (`u64::MAX`, after
    /// which there would be no next one). A gap is counted; only the first one of a job
    /// becomes a warning at once (see [`Route::report_gaps`]).
    pub(crate) fn take_seq(
        &mut self,
        seq: u64,
        job: JobId,
        label: &str,
    ) -> std::result::Result<bool, String> {
        let Some(next) = seq.checked_add(1) else {
            return Err(format!("job {job}: output seq {seq} is out of range"));
        };
        if seq < self.next_seq {
            return Ok(false);
        }
        if seq > self.next_seq {
            let lost = seq - self.next_seq;
            self.lost = self.lost.saturating_add(lost);
            self.gaps += 1;
            if self.gaps == 1 {
                log::warn!("{label}: job {job}: {lost} output message(s) lost in a reconnect");
                self.sink.push(JobEvent::Warning(format!(
                    "{lost} output message(s) were lost while the worker reconnected"
                )));
            }
        }
        self.next_seq = next;
        Ok(true)
    }

    /// Before the job's end: the gaps not yet reported, summed up in one warning.
    pub(crate) fn report_gaps(&mut self, job: JobId, label: &str) {
        if self.gaps > 1 {
            let text = format!(
                "in all, {} output message(s) were lost in {} gaps",
                self.lost, self.gaps
            );
            log::warn!("{label}: job {job}: {text}");
            self.sink.push(JobEvent::Warning(text));
            self.gaps = 1;
        }
    }
}

/// The routes of one link, shared by the dispatcher and that link's reader. Events are
/// pushed under this lock (pushing never blocks), and removing an entry is the right to
/// deliver the job's `Finished`: so nothing follows it.
pub(crate) type Routes = Mutex<HashMap<JobId, Route>>;

/// The most slots one worker may announce.
pub(crate) const MAX_SLOTS: u32 = 1024;

/// How long a closing manager waits for its links to say goodbye before cutting them.
const LINK_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// How long a worker that declined a job is offered nothing: this long after a first
/// decline, twice as long after each further one in a row, at most `DECLINE_REST_MAX`.
/// A job that ends on the worker starts the count again.
pub(crate) const DECLINE_REST_MIN: Duration = Duration::from_millis(200);
pub(crate) const DECLINE_REST_MAX: Duration = Duration::from_secs(30);

/// `now + d`, or a far-off moment when that does not fit an `Instant`.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

/// Workers resting after a decline. Plain state: the caller says what time it is.
#[derive(Default)]
pub(crate) struct Rests {
    by_worker: HashMap<u64, Rest>,
}

struct Rest {
    /// Declines in a row.
    streak: u32,
    until: Instant,
    /// Its end has not been acted on yet.
    pending: bool,
}

impl Rests {
    /// A worker declined a job at `now`: how long it is now offered nothing.
    pub(crate) fn declined(&mut self, worker: u64, now: Instant) -> Duration {
        let r = self.by_worker.entry(worker).or_insert(Rest {
            streak: 0,
            until: now,
            pending: false,
        });
        r.streak = r.streak.saturating_add(1);
        let rest = DECLINE_REST_MIN
            .saturating_mul(1 << (r.streak - 1).min(16))
            .min(DECLINE_REST_MAX);
        r.until = later(now, rest);
        r.pending = true;
        rest
    }

    /// Whether the worker is resting at `now`.
    pub(crate) fn resting(&self, worker: u64, now: Instant) -> bool {
        self.by_worker.get(&worker).is_some_and(|r| now < r.until)
    }

    /// A job ended on the worker (or it left): its next decline starts afresh.
    pub(crate) fn forget(&mut self, worker: u64) {
        self.by_worker.remove(&worker);
    }

    /// When the next rest ends, if one is still to be acted on.
    pub(crate) fn next_end(&self) -> Option<Instant> {
        self.by_worker
            .values()
            .filter(|r| r.pending)
            .map(|r| r.until)
            .min()
    }

    /// The workers whose rest has ended by `now` and was not yet acted on.
    pub(crate) fn ended(&mut self, now: Instant) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .by_worker
            .iter_mut()
            .filter(|(_, r)| r.pending && r.until <= now)
            .map(|(&id, r)| {
                r.pending = false;
                id
            })
            .collect();
        ids.sort_unstable();
        ids
    }
}

/// What a link gives the dispatcher so it can send work and end jobs.
pub(crate) struct LinkHandle {
    pub out: Outbox<ManagerMessage>,
    pub routes: Arc<Routes>,
    pub live: Arc<Liveness>,
    pub closer: Closer,
}

/// What the dispatcher answers to a registration: the worker's id and the held jobs
/// it is to go on with (with the next output seq expected), or a refusal.
pub(crate) type Registration = Result<(u64, Vec<(JobId, u64)>), String>;

pub(crate) enum Event {
    Submit(QueuedJob),
    Cancel {
        id: JobId,
        reply: Option<Sender<Result<()>>>,
    },
    Workers(Sender<Vec<WorkerInfo>>),
    Stats(Sender<Stats>),
    Jobs {
        only: Option<JobId>,
        reply: Sender<Vec<JobStatus>>,
    },
    Subscribe(Sender<ManagerEvent>),
    Register {
        hello: WorkerHello,
        peer: Option<SocketAddr>,
        cert: Option<Vec<u8>>,
        link: LinkHandle,
        reply: Sender<Registration>,
    },
    JobEnded {
        worker: u64,
        job: JobId,
    },
    Draining {
        worker: u64,
    },
    Declined {
        worker: u64,
        job: JobId,
        route: Route,
    },
    Goodbye {
        worker: u64,
    },
    LinkClosed {
        worker: u64,
        reason: String,
    },
    Shutdown {
        grace: Duration,
    },
}

struct WorkerEntry {
    info: WorkerInfo,
    /// Its free slots as last recorded in `by_free`.
    indexed_free: usize,
    cert: Option<Vec<u8>>,
    running: HashSet<JobId>,
    jobs_run: u64,
    connected_at: Instant,
    link: LinkHandle,
    /// Said goodbye: its jobs end at once when the link closes.
    leaving: bool,
}

impl WorkerEntry {
    fn free(&self) -> usize {
        if self.info.draining {
            return 0;
        }
        (self.info.slots as usize).saturating_sub(self.running.len())
    }
}

/// The jobs of a worker whose link dropped, kept for `reconnect_grace` in case the same
/// worker (same name, same certificate) comes back.
struct Detached {
    name: String,
    cert: Option<Vec<u8>>,
    jobs: Vec<(JobId, Route)>,
    until: Instant,
}

struct Running {
    /// The worker running it; `None` while that worker is reconnecting.
    worker: Option<u64>,
    spec: JobSpec,
    attempt: u32,
    since: Instant,
    cancelled: bool,
}

pub(crate) struct Dispatcher {
    shared: Arc<Shared>,
    queue: Queue,
    workers: BTreeMap<u64, WorkerEntry>,
    /// Every started job: where it runs, and what is needed to run it again.
    running: HashMap<JobId, Running>,
    detached: Vec<Detached>,
    subscribers: Vec<Sender<ManagerEvent>>,
    next_worker: u64,
    /// Where the rotation among equally free workers continues.
    cursor: u64,
    /// Workers by how many free slots they have (0 not kept), so that a job finds the
    /// freest worker without looking at every worker.
    by_free: BTreeMap<usize, BTreeSet<u64>>,
    closing: bool,
    queue_wait: Histogram,
    dispatch_latency: Histogram,
    /// Workers offered nothing for a while after declining a job.
    rests: Rests,
    /// The time, for decisions about rests (a clock the tests move).
    clock: Box<dyn Fn() -> Instant + Send>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn fmt_addr(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "?".into(), |a| a.to_string())
}

impl Dispatcher {
    pub(crate) fn new(shared: Arc<Shared>) -> Dispatcher {
        Dispatcher {
            shared,
            queue: Queue::default(),
            workers: BTreeMap::new(),
            running: HashMap::new(),
            detached: Vec::new(),
            subscribers: Vec::new(),
            next_worker: 1,
            cursor: 0,
            by_free: BTreeMap::new(),
            closing: false,
            queue_wait: Histogram::default(),
            dispatch_latency: Histogram::default(),
            rests: Rests::default(),
            clock: Box::new(Instant::now),
        }
    }

    fn now(&self) -> Instant {
        (self.clock)()
    }

    /// Offers work again to workers whose rest after a decline has ended.
    fn wake_rested(&mut self) {
        let now = self.now();
        for worker in self.rests.ended(now) {
            self.fill(worker);
        }
    }

    pub(crate) fn run(mut self, rx: Receiver<Event>) {
        let mut shutdown_at: Option<Instant> = None;
        loop {
            let wake = self
                .detached
                .iter()
                .map(|d| d.until)
                .chain(shutdown_at)
                .chain(self.rests.next_end())
                .min();
            let ev = match wake {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(d) => rx.recv_deadline(d),
            };
            match ev {
                Ok(Event::Shutdown { grace }) => {
                    self.begin_shutdown();
                    shutdown_at = Some(later(Instant::now(), grace));
                }
                Ok(ev) => self.handle(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.expire_detached(Instant::now());
            self.wake_rested();
            if self.closing
                && (self.running.is_empty() || shutdown_at.is_some_and(|t| Instant::now() >= t))
            {
                break;
            }
        }
        self.finish(&rx);
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Submit(job) => self.submit(job),
            Event::Cancel { id, reply } => {
                let r = self.cancel(id);
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
            }
            Event::Workers(reply) => {
                let _ = reply.send(self.workers.values().map(Self::info).collect());
            }
            Event::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
            Event::Jobs { only, reply } => {
                let _ = reply.send(self.jobs(only));
            }
            Event::Subscribe(tx) => self.subscribers.push(tx),
            Event::Register {
                hello,
                peer,
                cert,
                link,
                reply,
            } => self.register(hello, peer, cert, link, reply),
            Event::JobEnded { worker, job } => {
                self.running.remove(&job);
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.running.remove(&job);
                }
                self.rests.forget(worker);
                self.reindex(worker);
                self.fill(worker);
            }
            Event::Draining { worker } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    log::info!("worker {} is draining: no new jobs for it", w.info.name);
                    w.info.draining = true;
                }
                self.reindex(worker);
            }
            Event::Declined { worker, job, route } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.running.remove(&job);
                }
                // Offer that worker nothing for a while, so that one that declines
                // everything does not have the same job sent back and forth.
                let now = self.now();
                let rest = self.rests.declined(worker, now);
                if let Some(w) = self.workers.get(&worker) {
                    log::info!(
                        "worker {}: no jobs for it for {:.1} s after it declined job {job}",
                        w.info.name,
                        rest.as_secs_f64()
                    );
                }
                self.reindex(worker);
                match self.running.remove(&job) {
                    Some(r) => {
                        route.sink.set_producer(None);
                        route.sink.push(JobEvent::Requeued { attempt: r.attempt });
                        self.shared.queued.fetch_add(1, Ordering::Relaxed);
                        self.queue.push(QueuedJob {
                            id: job,
                            spec: r.spec,
                            events: route.sink,
                            attempt: r.attempt,
                            since: Instant::now(),
                        });
                        self.fill_all();
                    }
                    None => route.sink.push(JobEvent::Finished(Outcome::WorkerLost)),
                }
            }
            Event::Goodbye { worker } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.leaving = true;
                }
            }
            Event::LinkClosed { worker, reason } => self.link_closed(worker, &reason),
            Event::Shutdown { .. } => {}
        }
    }

    fn info(w: &WorkerEntry) -> WorkerInfo {
        WorkerInfo {
            running: w.running.len(),
            ..w.info.clone()
        }
    }

    fn notify(&mut self, ev: ManagerEvent) {
        self.subscribers.retain(|s| s.send(ev.clone()).is_ok());
    }

    fn submit(&mut self, job: QueuedJob) {
        if self.closing {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            job.events.push(JobEvent::Finished(Outcome::Rejected(
                "the manager is shutting down".into(),
            )));
            return;
        }
        match self.pick_worker(&job) {
            Some(w) => {
                let since = job.since;
                self.start(job, w);
                self.dispatch_latency.observe(since.elapsed());
            }
            None => self.queue.push(job),
        }
    }

    /// The matching worker with the most free slots; ties go round in turn. Looks at the
    /// freest workers first and stops at the first match.
    fn pick_worker(&mut self, job: &QueuedJob) -> Option<u64> {
        let req = &job.spec.requirements;
        let cursor = self.cursor;
        let now = self.now();
        let found = self.by_free.values().rev().find_map(|ids| {
            ids.range(cursor..)
                .chain(ids.range(..cursor))
                .find(|id| {
                    self.workers
                        .get(id)
                        .is_some_and(|w| req.matches(&w.info.tags, &w.info.platform))
                        && !self.rests.resting(**id, now)
                })
                .copied()
        })?;
        self.cursor = found + 1;
        Some(found)
    }

    /// Records a worker's current number of free slots in `by_free` (or drops it from
    /// there when it is gone).
    fn reindex(&mut self, worker: u64) {
        let now = self
            .workers
            .get(&worker)
            .map(|w| (w.indexed_free, w.free()));
        if let Some((old, new)) = now
            && old == new
        {
            return;
        }
        // Few distinct free counts exist, so this walk is short.
        for ids in self.by_free.values_mut() {
            ids.remove(&worker);
        }
        self.by_free.retain(|_, ids| !ids.is_empty());
        if let Some((_, new)) = now {
            if let Some(w) = self.workers.get_mut(&worker) {
                w.indexed_free = new;
            }
            if new > 0 {
                self.by_free.entry(new).or_default().insert(worker);
            }
        }
    }

    fn start(&mut self, job: QueuedJob, worker: u64) {
        self.shared.queued.fetch_sub(1, Ordering::Relaxed);
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        self.queue_wait.observe(job.since.elapsed());
        w.jobs_run += 1;
        job.events.push(JobEvent::Started {
            worker: w.info.name.clone(),
        });
        let sink = job.events.clone();
        lock(&w.link.routes).insert(job.id, Route::new(job.events));
        // The spec stays here too, in case the job must run again elsewhere.
        w.link.out.send(ManagerMessage::Run {
            job: job.id,
            spec: job.spec.clone(),
        });
        // After `Run`: a job whose submitter is still behind (a retry) is paused on its
        // new worker, which by now knows the job.
        sink.set_producer(Some(w.link.out.clone()));
        w.running.insert(job.id);
        self.reindex(worker);
        self.running.insert(
            job.id,
            Running {
                worker: Some(worker),
                spec: job.spec,
                attempt: job.attempt,
                since: Instant::now(),
                cancelled: false,
            },
        );
    }

    /// Gives a worker queued jobs while it has free slots.
    fn fill(&mut self, worker: u64) {
        if self.closing || self.rests.resting(worker, self.now()) {
            return;
        }
        while let Some(w) = self.workers.get(&worker) {
            if w.free() == 0 {
                break;
            }
            let Some(job) = self.queue.pop_for(&w.info.tags, &w.info.platform) else {
                break;
            };
            self.start(job, worker);
        }
    }

    fn fill_all(&mut self) {
        let ids: Vec<u64> = self.workers.keys().copied().collect();
        for id in ids {
            self.fill(id);
        }
    }

    fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let per_worker: Vec<WorkerStats> = self
            .workers
            .values()
            .map(|w| WorkerStats {
                name: w.info.name.clone(),
                jobs_run: w.jobs_run,
                running: w.running.len(),
                slots: w.info.slots,
                draining: w.info.draining,
                last_heard: w.link.live.silent_for(),
                connected_for: w.connected_at.elapsed(),
            })
            .collect();
        Stats {
            workers: self.workers.len(),
            workers_draining: per_worker.iter().filter(|w| w.draining).count(),
            slots_total: per_worker.iter().map(|w| w.slots as usize).sum(),
            slots_busy: per_worker.iter().map(|w| w.running).sum(),
            jobs_queued: self.queue.len(),
            jobs_running: self.running.len(),
            jobs_disconnected: self.detached.iter().map(|d| d.jobs.len()).sum(),
            jobs_submitted: c.submitted.load(Ordering::Relaxed),
            jobs_finished: c.finished_by_outcome(),
            oldest_queued_wait: self.queue.oldest().map(|t| t.elapsed()),
            queue_wait: self.queue_wait.clone(),
            dispatch_latency: self.dispatch_latency.clone(),
            output_bytes: c.output_bytes.load(Ordering::Relaxed),
            per_worker,
        }
    }

    fn jobs(&self, only: Option<JobId>) -> Vec<JobStatus> {
        let queued = |j: &QueuedJob| JobStatus {
            id: j.id,
            state: JobState::Queued,
            since: j.since.elapsed(),
            attempt: j.attempt,
            script: j.spec.script.clone(),
            priority: j.spec.priority,
            output_paused: false,
        };
        let running = |id: JobId, r: &Running| {
            let worker = r.worker.and_then(|w| self.workers.get(&w));
            let output_paused = worker
                .and_then(|w| {
                    lock(&w.link.routes)
                        .get(&id)
                        .map(|route| route.sink.is_paused())
                })
                .unwrap_or(false);
            let state = match worker {
                Some(w) => JobState::Running {
                    worker: w.info.name.clone(),
                },
                None => JobState::Disconnected {
                    worker: self
                        .detached
                        .iter()
                        .find(|d| d.jobs.iter().any(|(j, _)| *j == id))
                        .map_or_else(String::new, |d| d.name.clone()),
                },
            };
            JobStatus {
                id,
                state,
                since: r.since.elapsed(),
                attempt: r.attempt,
                script: r.spec.script.clone(),
                priority: r.spec.priority,
                output_paused,
            }
        };
        let mut all: Vec<JobStatus> = match only {
            Some(id) => self
                .queue
                .get(id)
                .map(queued)
                .or_else(|| self.running.get(&id).map(|r| running(id, r)))
                .into_iter()
                .collect(),
            None => self
                .queue
                .iter()
                .map(queued)
                .chain(self.running.iter().map(|(&id, r)| running(id, r)))
                .collect(),
        };
        all.sort_by_key(|j| j.id);
        all
    }

    fn cancel(&mut self, id: JobId) -> Result<()> {
        if let Some(job) = self.queue.remove(id) {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            job.events.push(JobEvent::Finished(Outcome::Cancelled));
            return Ok(());
        }
        let running = self.running.get_mut(&id).ok_or(Error::UnknownJob(id.0))?;
        running.cancelled = true;
        match running.worker.and_then(|w| self.workers.get(&w)) {
            Some(w) => {
                w.link.out.send(ManagerMessage::Cancel { job: id });
            }
            None => {
                // Its worker is reconnecting: end it now; if the worker comes back, it is
                // told to drop the job.
                for d in &mut self.detached {
                    if let Some(i) = d.jobs.iter().position(|(j, _)| *j == id) {
                        let (_, route) = d.jobs.remove(i);
                        route.sink.push(JobEvent::Finished(Outcome::Cancelled));
                    }
                }
                self.running.remove(&id);
            }
        }
        Ok(())
    }

    fn register(
        &mut self,
        hello: WorkerHello,
        peer: Option<SocketAddr>,
        cert: Option<Vec<u8>>,
        link: LinkHandle,
        reply: Sender<Registration>,
    ) {
        let refusal = if self.closing {
            Some("the manager is shutting down".to_string())
        } else if hello.slots == 0 || hello.slots > MAX_SLOTS {
            Some(format!(
                "a worker must offer 1 to {MAX_SLOTS} slots, not {}",
                hello.slots
            ))
        } else {
            protocol::check_identity(&hello.name, &hello.tags, &hello.platform).err()
        };
        if let Some(reason) = refusal {
            log::warn!(
                "refusing worker {} from {}: {reason}",
                protocol::peer_text(&hello.name.chars().take(256).collect::<String>()),
                fmt_addr(peer)
            );
            let _ = reply.send(Err(reason));
            return;
        }
        // A name is bound to the certificate that holds it, while its worker is connected
        // and for the reconnect grace after its link dropped. A second connection under a
        // connected worker's name: the same worker (same certificate) reconnecting before
        // its old link was found dead replaces it; anyone else is refused. Under the name
        // of a worker that is away, only its certificate is let in (and resumes its jobs).
        if let Some(d) = self
            .detached
            .iter()
            .find(|d| d.name == hello.name && d.cert != cert)
        {
            let reason = format!(
                "the name {:?} is held for another certificate for {:.1} s more (its worker may come back)",
                hello.name,
                d.until
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64()
            );
            log::warn!("refusing worker from {}: {reason}", fmt_addr(peer));
            let _ = reply.send(Err(reason));
            return;
        }
        let namesake = self
            .workers
            .iter()
            .find(|(_, w)| w.info.name == hello.name)
            .map(|(&id, w)| (id, w.cert == cert));
        // One certificate holds a bounded number of connections (the one it replaces
        // does not count).
        if let Some(c) = &cert {
            let replaced = namesake.filter(|(_, same)| *same).map(|(id, _)| id);
            let held = self
                .workers
                .iter()
                .filter(|(id, w)| w.cert.as_ref() == Some(c) && Some(**id) != replaced)
                .count();
            let max = self.shared.max_connections_per_certificate;
            if held >= max {
                let reason = format!(
                    "its certificate already holds {held} connection(s), the most allowed (max_connections_per_certificate = {max})"
                );
                log::warn!(
                    "refusing worker {} from {}: {reason}",
                    hello.name,
                    fmt_addr(peer)
                );
                let _ = reply.send(Err(reason));
                return;
            }
        }
        match namesake {
            Some((old, true)) => {
                if let Some(w) = self.workers.get(&old) {
                    w.link.live.mark_closed();
                    w.link.closer.close();
                }
                self.link_closed(old, "replaced by a new connection of the same worker");
            }
            Some((_, false)) => {
                let reason = format!("a worker named {:?} is already connected", hello.name);
                log::warn!(
                    "refusing worker from {}: {reason} (with another certificate)",
                    fmt_addr(peer)
                );
                let _ = reply.send(Err(reason));
                return;
            }
            None => {}
        }
        let id = self.next_worker;
        self.next_worker += 1;
        let resume = self.reattach(&hello, &cert, id, &link);
        let info = WorkerInfo {
            id,
            name: hello.name,
            address: peer,
            tags: hello.tags,
            platform: hello.platform,
            slots: hello.slots,
            running: 0,
            draining: hello.draining,
        };
        let resumed: HashSet<JobId> = resume.iter().map(|(j, _)| *j).collect();
        if reply.send(Ok((id, resume))).is_err() {
            // The link died before the welcome: its jobs go back to waiting for it.
            let routes: Vec<(JobId, Route)> = lock(&link.routes).drain().collect();
            self.detach(&info.name, cert, routes);
            return;
        }
        log::info!(
            "worker {} joined from {} ({} slot(s), tags [{}], {}){}",
            info.name,
            fmt_addr(peer),
            info.slots,
            info.tags.iter().cloned().collect::<Vec<_>>().join(","),
            info.platform,
            if resumed.is_empty() {
                String::new()
            } else {
                format!(", resuming {} job(s)", resumed.len())
            }
        );
        self.notify(ManagerEvent::WorkerJoined(info.clone()));
        self.workers.insert(
            id,
            WorkerEntry {
                info,
                cert,
                running: resumed,
                jobs_run: 0,
                connected_at: Instant::now(),
                indexed_free: 0,
                link,
                leaving: false,
            },
        );
        self.reindex(id);
        self.fill(id);
    }

    /// Gives a returning worker back the jobs it still holds for this manager; settles
    /// the ones it no longer has. Returns what it is to go on with.
    fn reattach(
        &mut self,
        hello: &WorkerHello,
        cert: &Option<Vec<u8>>,
        id: u64,
        link: &LinkHandle,
    ) -> Vec<(JobId, u64)> {
        let Some(i) = self
            .detached
            .iter()
            .position(|d| d.name == hello.name && d.cert == *cert)
        else {
            return Vec::new();
        };
        let d = self.detached.swap_remove(i);
        let ours = hello.manager_id == Some(self.shared.manager_id);
        let mut resume = Vec::new();
        for (job, route) in d.jobs {
            let held = ours && hello.jobs.iter().any(|h| h.job == job);
            if !held {
                log::warn!("job {job}: worker {} came back without it", d.name);
                self.settle(job, route);
                continue;
            }
            resume.push((job, route.next_seq));
            route.sink.set_producer(Some(link.out.clone()));
            let cancelled = self.running.get(&job).is_some_and(|r| r.cancelled);
            if let Some(r) = self.running.get_mut(&job) {
                r.worker = Some(id);
            }
            lock(&link.routes).insert(job, route);
            if cancelled {
                link.out.send(ManagerMessage::Cancel { job });
            }
        }
        resume
    }

    fn link_closed(&mut self, worker: u64, reason: &str) {
        let Some(w) = self.workers.remove(&worker) else {
            return;
        };
        self.rests.forget(worker);
        self.reindex(worker);
        let routes: Vec<(JobId, Route)> = lock(&w.link.routes).drain().collect();
        let grace = self.shared.reconnect_grace;
        if w.leaving || grace.is_zero() || self.closing {
            for (job, route) in routes {
                log::warn!("job {job} lost: worker {} went away", w.info.name);
                self.settle(job, route);
            }
        } else {
            // Its name stays bound to its certificate for the grace, with or without jobs.
            if !routes.is_empty() {
                log::warn!(
                    "worker {} lost with {} job(s) running; they wait {:.1} s for it to come back",
                    w.info.name,
                    routes.len(),
                    grace.as_secs_f64()
                );
            }
            self.detach(&w.info.name, w.cert, routes);
        }
        log::info!("worker {} left: {reason}", w.info.name);
        self.notify(ManagerEvent::WorkerLeft {
            id: worker,
            name: w.info.name.clone(),
            reason: reason.to_string(),
        });
        self.fill_all();
    }

    fn detach(&mut self, name: &str, cert: Option<Vec<u8>>, jobs: Vec<(JobId, Route)>) {
        for (job, route) in &jobs {
            route.sink.set_producer(None);
            if let Some(r) = self.running.get_mut(job) {
                r.worker = None;
            }
        }
        self.detached.push(Detached {
            name: name.to_string(),
            cert,
            jobs,
            until: later(Instant::now(), self.shared.reconnect_grace),
        });
    }

    fn expire_detached(&mut self, now: Instant) {
        let (expired, kept): (Vec<Detached>, Vec<Detached>) = std::mem::take(&mut self.detached)
            .into_iter()
            .partition(|d| d.until <= now);
        self.detached = kept;
        for d in expired {
            for (job, route) in d.jobs {
                log::warn!(
                    "job {job} lost: worker {} did not come back in time",
                    d.name
                );
                self.settle(job, route);
            }
        }
    }

    /// Ends a job whose worker is gone for good: queued again if it has retries left,
    /// else `WorkerLost` (or `Cancelled`, if that was asked for).
    fn settle(&mut self, job: JobId, route: Route) {
        let Some(r) = self.running.remove(&job) else {
            route.sink.push(JobEvent::Finished(Outcome::WorkerLost));
            return;
        };
        if r.cancelled {
            route.sink.push(JobEvent::Finished(Outcome::Cancelled));
        } else if r.attempt <= r.spec.retries && !self.closing {
            log::warn!(
                "job {job}: queueing attempt {} of {}",
                r.attempt + 1,
                r.spec.retries + 1
            );
            route.sink.set_producer(None);
            route.sink.push(JobEvent::Requeued {
                attempt: r.attempt + 1,
            });
            self.shared.queued.fetch_add(1, Ordering::Relaxed);
            self.queue.push(QueuedJob {
                id: job,
                spec: r.spec,
                events: route.sink,
                attempt: r.attempt + 1,
                since: Instant::now(),
            });
            self.fill_all();
        } else {
            route.sink.push(JobEvent::Finished(Outcome::WorkerLost));
        }
    }

    fn begin_shutdown(&mut self) {
        self.closing = true;
        let queued: Vec<QueuedJob> = self.queue.drain().collect();
        self.shared
            .queued
            .fetch_sub(queued.len(), Ordering::Relaxed);
        for job in queued {
            job.events.push(JobEvent::Finished(Outcome::Rejected(
                "the manager is shutting down".into(),
            )));
        }
    }

    /// Ends what is still running as cancelled (and what waits for a lost worker as
    /// lost), says goodbye to every worker, waits a little for the links to close, and
    /// answers whatever is still in the channel.
    fn finish(mut self, rx: &Receiver<Event>) {
        self.begin_shutdown();
        for d in std::mem::take(&mut self.detached) {
            for (job, route) in d.jobs {
                self.running.remove(&job);
                route.sink.push(JobEvent::Finished(Outcome::WorkerLost));
            }
        }
        for w in self.workers.values() {
            let cut: Vec<(JobId, Route)> = lock(&w.link.routes).drain().collect();
            for (id, route) in cut {
                w.link.out.send(ManagerMessage::Cancel { job: id });
                route.sink.push(JobEvent::Finished(Outcome::Cancelled));
            }
            w.link.out.send(ManagerMessage::Shutdown);
            w.link.out.close();
            w.link.live.mark_closed();
        }
        self.running.clear();
        let deadline = Instant::now() + LINK_CLOSE_WAIT;
        while !self.workers.is_empty() {
            match rx.recv_deadline(deadline) {
                Ok(ev) => self.handle(ev),
                Err(_) => break,
            }
        }
        for w in self.workers.values() {
            w.link.closer.close();
        }
        while let Ok(ev) = rx.try_recv() {
            self.handle(ev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::Outbound;
    use crate::manager::ManagerConfig;
    use crossbeam_channel::{bounded, unbounded};
    use std::net::{TcpListener, TcpStream};

    /// A dispatcher on a clock the test moves.
    struct Bench {
        d: Dispatcher,
        now: Arc<Mutex<Instant>>,
        next_job: u64,
        /// The far ends of the links' sockets, kept open.
        peers: Vec<TcpStream>,
    }

    /// A worker's link as the dispatcher sees it, and what the worker would be sent.
    struct TestLink {
        routes: Arc<Routes>,
        sent: Receiver<Outbound<ManagerMessage>>,
    }

    impl TestLink {
        /// The jobs sent to the worker in `Run`s since the last look.
        fn runs(&self) -> Vec<u64> {
            self.sent
                .try_iter()
                .filter_map(|m| match m {
                    Outbound::Message(ManagerMessage::Run { job, .. }) => Some(job.0),
                    _ => None,
                })
                .collect()
        }
    }

    impl Bench {
        fn new(max_per_cert: usize) -> Bench {
            let mut config = ManagerConfig::insecure_plaintext("127.0.0.1:0");
            config.max_connections_per_certificate = max_per_cert;
            let shared = Shared::for_tests(unbounded().0, &config);
            let mut d = Dispatcher::new(shared);
            let now = Arc::new(Mutex::new(Instant::now()));
            let clock = now.clone();
            d.clock = Box::new(move || *lock(&clock));
            Bench {
                d,
                now,
                next_job: 1,
                peers: Vec::new(),
            }
        }

        fn advance(&mut self, by: Duration) {
            *lock(&self.now) += by;
            self.d.wake_rested();
        }

        /// Registers a worker: its id and link, or the refusal.
        fn register(
            &mut self,
            name: &str,
            cert: Option<&[u8]>,
            slots: u32,
        ) -> std::result::Result<(u64, TestLink), String> {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            self.peers.push(listener.accept().unwrap().0);
            let (_, _, closer) = crate::tls::split(tcp, None).unwrap();
            let (tx, sent) = unbounded();
            let live = Liveness::new();
            let routes: Arc<Routes> = Arc::default();
            let link = LinkHandle {
                out: Outbox::detached(tx, live.clone()),
                routes: routes.clone(),
                live,
                closer,
            };
            let hello = WorkerHello {
                name: name.into(),
                tags: BTreeSet::new(),
                platform: "linux-x86_64".into(),
                slots,
                manager_id: None,
                jobs: vec![],
                draining: false,
            };
            let (reply, answer) = bounded(1);
            self.d.handle(Event::Register {
                hello,
                peer: None,
                cert: cert.map(<[u8]>::to_vec),
                link,
                reply,
            });
            let (id, _) = answer.try_recv().expect("an answer at once")?;
            Ok((id, TestLink { routes, sent }))
        }

        fn submit(&mut self) -> JobId {
            let id = JobId(self.next_job);
            self.next_job += 1;
            self.d.shared.queued.fetch_add(1, Ordering::Relaxed);
            let sink = JobSink::new(id, unbounded().0, Arc::default());
            self.d.handle(Event::Submit(QueuedJob {
                id,
                spec: JobSpec::new("true"),
                events: sink,
                attempt: 1,
                since: Instant::now(),
            }));
            id
        }

        /// The worker declines the job, as its link's reader reports it.
        fn decline(&mut self, worker: u64, link: &TestLink, job: JobId) {
            let route = lock(&link.routes)
                .remove(&job)
                .expect("the job is on that link");
            self.d.handle(Event::Declined { worker, job, route });
        }
    }

    #[test]
    fn rests_double_per_decline_in_a_row_up_to_the_cap_and_start_again_after_work() {
        let t0 = Instant::now();
        let mut r = Rests::default();
        let mut now = t0;
        let mut got = Vec::new();
        for _ in 0..12 {
            let rest = r.declined(7, now);
            got.push(rest.as_millis());
            assert!(r.resting(7, now));
            assert!(r.resting(7, now + rest - Duration::from_millis(1)));
            assert!(!r.resting(7, now + rest));
            assert_eq!(r.next_end(), Some(now + rest));
            assert!(r.ended(now + rest - Duration::from_millis(1)).is_empty());
            assert_eq!(r.ended(now + rest), vec![7]);
            assert_eq!(r.ended(now + rest), Vec::<u64>::new(), "acted on once");
            assert_eq!(r.next_end(), None);
            now += rest;
        }
        assert_eq!(
            got,
            [
                200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000, 30000
            ]
        );
        assert!(!r.resting(8, now), "others are not resting");
        r.forget(7);
        assert_eq!(r.declined(7, now), DECLINE_REST_MIN);
        // Far in the future, nothing overflows.
        let mut r = Rests::default();
        for _ in 0..100 {
            r.declined(1, now);
        }
        assert_eq!(r.declined(1, now), DECLINE_REST_MAX);
    }

    #[test]
    fn a_worker_that_declines_is_offered_nothing_until_its_rest_ends_and_the_job_goes_elsewhere() {
        let mut b = Bench::new(4);
        let (a, a_link) = b.register("a", Some(b"cert-a"), 1).unwrap();
        let job = b.submit();
        assert_eq!(a_link.runs(), vec![job.0]);
        let mut rest = DECLINE_REST_MIN;
        let mut sent = 1;
        for _ in 0..10 {
            b.decline(a, &a_link, job);
            // Not sent back at once, nor at any moment of the rest.
            assert_eq!(a_link.runs(), Vec::<u64>::new());
            b.advance(rest - Duration::from_millis(1));
            assert_eq!(a_link.runs(), Vec::<u64>::new());
            assert_eq!(b.d.queue.len(), 1);
            // At its end the job is offered again, once.
            b.advance(Duration::from_millis(1));
            assert_eq!(a_link.runs(), vec![job.0]);
            sent += 1;
            rest = (rest * 2).min(DECLINE_REST_MAX);
        }
        assert_eq!(sent, 11, "one Run per decline, none in between");
        // Another worker joins while `a` rests: the declined job goes there at once.
        b.decline(a, &a_link, job);
        let (c, c_link) = b.register("c", Some(b"cert-c"), 1).unwrap();
        assert_eq!(c_link.runs(), vec![job.0]);
        // New jobs go to `c` or wait; none to `a` while it rests.
        let second = b.submit();
        assert_eq!(a_link.runs(), Vec::<u64>::new());
        assert_eq!(b.d.queue.len(), 1);
        // A job that ends on `c` frees it for the waiting one.
        b.d.handle(Event::JobEnded { worker: c, job });
        assert_eq!(c_link.runs(), vec![second.0]);
        // Once `a` has run a job to its end, its next decline rests the shortest time.
        b.advance(DECLINE_REST_MAX);
        let third = b.submit();
        assert_eq!(a_link.runs(), vec![third.0]);
        b.d.handle(Event::JobEnded {
            worker: a,
            job: third,
        });
        let fourth = b.submit();
        assert_eq!(a_link.runs(), vec![fourth.0]);
        b.decline(a, &a_link, fourth);
        b.advance(DECLINE_REST_MIN);
        assert_eq!(a_link.runs(), vec![fourth.0]);
    }

    #[test]
    fn one_certificate_holds_a_bounded_number_of_connections() {
        let mut b = Bench::new(2);
        let (first, _l1) = b.register("one", Some(b"shared"), 1).unwrap();
        let _l2 = b.register("two", Some(b"shared"), 1).unwrap();
        let refused = b
            .register("three", Some(b"shared"), 1)
            .err()
            .expect("refused");
        assert!(
            refused.contains("already holds 2 connection(s)")
                && refused.contains("max_connections_per_certificate = 2"),
            "{refused}"
        );
        // The same worker reconnecting replaces its old connection: not one more.
        let (again, _l3) = b.register("one", Some(b"shared"), 1).unwrap();
        assert_ne!(again, first);
        assert_eq!(b.d.workers.len(), 2);
        // Other certificates are counted on their own.
        assert!(b.register("four", Some(b"other"), 1).is_ok());
        // When a connection closes, its place is free again.
        b.d.handle(Event::LinkClosed {
            worker: again,
            reason: "gone".into(),
        });
        assert!(b.register("three", Some(b"shared"), 1).is_ok());
        // Without certificates (plaintext) there is nothing to count.
        let mut b = Bench::new(1);
        for i in 0..5 {
            assert!(b.register(&format!("p{i}"), None, 1).is_ok());
        }
    }

    #[test]
    fn a_hello_with_control_characters_is_refused() {
        let mut b = Bench::new(4);
        for name in ["evil\nworker x joined", "\u{1b}[2Jw", "w\u{202e}"] {
            let why = b.register(name, Some(b"c"), 1).err().expect("refused");
            assert!(why.contains("control or invisible"), "{why}");
            assert!(!why.chars().any(char::is_control), "{why:?}");
        }
        assert!(b.d.workers.is_empty());
    }
    #[test]
    fn output_seqs_replays_gaps_and_the_largest_seq_are_handled_without_overflow() {
        let (tx, rx) = unbounded();
        let mut route = Route::new(JobSink::new(JobId(1), tx, Arc::default()));
        assert_eq!(route.take_seq(0, JobId(1), "w"), Ok(true));
        assert_eq!(route.take_seq(0, JobId(1), "w"), Ok(false), "a replay");
        // Every other message missing: many gaps, one warning at once.
        for seq in (2..20_000).step_by(2) {
            assert_eq!(route.take_seq(seq, JobId(1), "w"), Ok(true));
        }
        assert_eq!((route.lost, route.gaps), (9_999, 9_999));
        let first: Vec<JobEvent> = rx.try_iter().collect();
        assert_eq!(
            first,
            vec![JobEvent::Warning(
                "1 output message(s) were lost while the worker reconnected".into()
            )]
        );
        // The rest, summed up once before the end.
        route.report_gaps(JobId(1), "w");
        route.report_gaps(JobId(1), "w");
        let sum: Vec<JobEvent> = rx.try_iter().collect();
        assert_eq!(
            sum,
            vec![JobEvent::Warning(
                "in all, 9999 output message(s) were lost in 9999 gaps".into()
            )]
        );
        // A seq with no next one is refused, and changes nothing.
        let e = route.take_seq(u64::MAX, JobId(1), "w").unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        assert_eq!(route.next_seq, 19_999);
        assert_eq!(route.take_seq(u64::MAX - 1, JobId(1), "w"), Ok(true));
        assert_eq!(route.next_seq, u64::MAX);
        assert_eq!(route.lost, 9_999 + (u64::MAX - 1 - 19_999));
    }
}
