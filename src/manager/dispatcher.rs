//! The dispatcher: all scheduling state (the queue, the worker table, which job runs
//! where, the jobs of workers that are reconnecting) in one plain state machine. It
//! reads no clock, starts no thread, touches no socket and receives from no channel:
//! each input — an API call, news from a link, a timer tick — comes with the time, and
//! what is to be done on links (messages to send, links to close) and for subscribers
//! is left as [`Action`]s for its driver to carry out, in order;
//! [`Dispatcher::next_deadline`] says when it next needs a tick. The driver
//! ([`driver`]) is the one thread that feeds it from a channel; the tests feed it by
//! hand with a clock they move.
//!
//! Job output does not pass through here: link readers push it into the job's sink via
//! the link's route table, and whoever removes a job's route delivers its single
//! `Finished`. The dispatcher holds the sinks and route tables as data: pushing into a
//! sink and taking a route table's lock never block. It must not touch anything else
//! that is shared.

pub(crate) mod driver;
#[cfg(test)]
mod tests;

use super::ids::{IdMap, IdSet};
use super::queue::{Queue, QueuedJob};
use super::routing::{Route, Routes};
use super::sink::JobSink;
use super::{ManagerEvent, WorkerInfo};
use crate::error::{Error, Result};
use crate::job::{JobEvent, JobId, JobSpec, JobState, JobStatus, Outcome};
use crate::journal::Record;
use crate::link::Liveness;
use crate::metrics::{Counters, Histogram, Stats, WorkerStats};
use crate::protocol::{self, ManagerMessage, WorkerHello};
use crate::sync::lock;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The most slots one worker may announce.
pub(crate) const MAX_SLOTS: u32 = 1024;
/// The most runs one worker may hold ahead of its slots.
pub(crate) const MAX_AHEAD: u32 = 1024;

/// How long a closing manager waits for its links to say goodbye before cutting them.
pub(crate) const LINK_CLOSE_WAIT: Duration = Duration::from_secs(2);

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
    by_worker: IdMap<u64, Rest>,
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

/// What the dispatcher keeps of a link, as data: its route table (shared with the
/// link's reader) and its liveness (for the statistics).
pub(crate) struct LinkPorts {
    pub routes: Arc<Routes>,
    pub live: Arc<Liveness>,
}

/// What the dispatcher answers to a registration: the worker's id and the held jobs
/// it is to go on with (with the next output seq expected), or a refusal.
pub(crate) type Registration = std::result::Result<(u64, Vec<(JobId, u64)>), String>;

/// News from a worker's link, as its reader (or the link's end) reports it.
pub(crate) enum LinkEvent {
    /// The worker reported the job's end; the reader removed its route and delivers
    /// its `Finished`.
    JobEnded { job: JobId },
    /// The worker takes no new jobs.
    Draining,
    /// The worker did not take the job (or gave back a run sent ahead); the reader
    /// removed its route and hands it over.
    Declined { job: JobId, route: Route },
    /// A run sent ahead has started; the reader has told its submitter.
    Started { job: JobId },
    /// The worker is leaving on purpose.
    Goodbye,
    /// The link has closed.
    Closed { reason: String },
}

/// What the driver is to do, in the order given.
#[derive(Debug)]
pub(crate) enum Action {
    /// Queue a message on a worker's link.
    Send { worker: u64, msg: ManagerMessage },
    /// The job's output now comes from this worker's link (given after its `Run`, so
    /// that a job whose submitter is behind can be paused there at once).
    Attach { worker: u64, sink: Arc<JobSink> },
    /// Send what is queued on the worker's link, then close it cleanly.
    Close { worker: u64 },
    /// Cut the worker's connection now.
    Cut { worker: u64 },
    /// The dispatcher is done with the worker's link: no later action names it.
    Forget { worker: u64 },
    /// Tell the subscribers.
    Notify(ManagerEvent),
    /// Add to the journal (without waiting), before the messages of the same round go.
    Record(Record),
}

/// What the dispatcher is told at its start.
pub(crate) struct Settings {
    pub reconnect_grace: Duration,
    pub max_connections_per_certificate: usize,
    pub manager_id: u64,
    /// The manager keeps a journal: where jobs go is recorded, and a shutdown keeps
    /// them (they go on after a restart) instead of ending them.
    pub journaled: bool,
}

/// A worker as the journal names it: its name and its certificate (DER).
pub(crate) type NamedWorker = (String, Option<Vec<u8>>);

/// A job read back from the journal at a restart, with its new sink.
pub(crate) struct Restored {
    pub job: QueuedJob,
    /// The worker it was sent to, which may claim it, and whether it was sent ahead
    /// (and not known to have started); `None`: queued.
    pub sent_to: Option<(String, Option<Vec<u8>>, bool)>,
}

struct WorkerEntry {
    info: WorkerInfo,
    /// Its free slots as last recorded in `by_free`.
    indexed_free: usize,
    cert: Option<Vec<u8>>,
    /// Its jobs that run (as far as the manager knows).
    running: IdSet<JobId>,
    /// Runs sent ahead that have not started, in the order sent.
    held: VecDeque<JobId>,
    /// How many runs it holds at most beyond its slots.
    ahead: usize,
    /// Held runs of other workers being revoked for it.
    claims: usize,
    /// Whether it is in `with_room`.
    indexed_room: bool,
    jobs_run: u64,
    connected_at: Instant,
    routes: Arc<Routes>,
    live: Arc<Liveness>,
    /// Said goodbye: its jobs end at once when the link closes.
    leaving: bool,
}

impl WorkerEntry {
    fn free(&self) -> usize {
        if self.info.draining {
            return 0;
        }
        (self.info.slots as usize).saturating_sub(self.taken())
    }

    /// Its jobs and the runs it holds: a held run takes the next slot that frees, on
    /// the worker, before the manager hears of it (its `Started` may still be on the
    /// way when that slot's `Finished` arrives), so it counts as taking one.
    fn taken(&self) -> usize {
        self.running.len() + self.held.len()
    }

    /// Room for runs sent ahead: only once no slot is free.
    fn room(&self) -> usize {
        if self.info.draining || self.free() > 0 {
            return 0;
        }
        (self.info.slots as usize + self.ahead).saturating_sub(self.taken())
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
    /// Since it started, or was sent ahead.
    since: Instant,
    cancelled: bool,
    /// Sent ahead and not started yet.
    held: Option<Held>,
}

/// A run sent ahead of a worker's slots that has not started: to the submitter (and
/// `Manager::job`), still queued.
#[derive(Clone, Copy, Debug)]
struct Held {
    /// Its place in the queue, to go back to if it is given back.
    place: u64,
    /// When it was queued.
    queued_since: Instant,
    /// When it was sent (its key in `Dispatcher::held`).
    sent: Instant,
    revoking: Revoking,
}

/// Whether a held run is being taken back, and for whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Revoking {
    No,
    /// For this worker, which has room the queue cannot fill.
    For(u64),
    /// The manager is shutting down: it ends `Rejected`.
    Shutdown,
}

/// Where the dispatcher is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Open,
    /// Shutting down: nothing new is taken; running jobs have until `deadline`.
    Closing {
        deadline: Instant,
    },
    /// Every worker has been told goodbye; their links have until `deadline` to close.
    Finishing {
        deadline: Instant,
    },
    /// Nothing is left to do but refuse.
    Done,
}

pub(crate) struct Dispatcher {
    settings: Settings,
    /// Jobs accepted and not yet started, as counted by `Manager::submit` (which
    /// reserves a place before the job reaches the dispatcher).
    queued: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    queue: Queue,
    workers: BTreeMap<u64, WorkerEntry>,
    /// Every started job: where it runs, and what is needed to run it again.
    running: IdMap<JobId, Running>,
    detached: Vec<Detached>,
    next_worker: u64,
    /// Where the rotation among equally free workers continues.
    cursor: u64,
    /// Workers by how many free slots they have (0 not kept), so that a job finds the
    /// freest worker without looking at every worker.
    by_free: BTreeMap<usize, BTreeSet<u64>>,
    /// Workers with no free slot and room for a run sent ahead (not promised to a run
    /// being revoked for it).
    with_room: BTreeSet<u64>,
    /// Where the rotation among workers with room continues.
    room_cursor: u64,
    /// Runs sent ahead and not started, of connected workers, oldest first.
    held: BTreeSet<(Instant, JobId)>,
    phase: Phase,
    queue_wait: Histogram,
    dispatch_latency: Histogram,
    /// Workers offered nothing for a while after declining a job.
    rests: Rests,
    /// What the driver is yet to do.
    actions: VecDeque<Action>,
}

fn fmt_addr(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "?".into(), |a| a.to_string())
}

const SHUTTING_DOWN: &str = "the manager is shutting down";

impl Dispatcher {
    pub(crate) fn new(
        settings: Settings,
        queued: Arc<AtomicUsize>,
        counters: Arc<Counters>,
    ) -> Dispatcher {
        Dispatcher {
            settings,
            queued,
            counters,
            queue: Queue::default(),
            workers: BTreeMap::new(),
            running: IdMap::default(),
            detached: Vec::new(),
            next_worker: 1,
            cursor: 0,
            by_free: BTreeMap::new(),
            with_room: BTreeSet::new(),
            room_cursor: 0,
            held: BTreeSet::new(),
            phase: Phase::Open,
            queue_wait: Histogram::default(),
            dispatch_latency: Histogram::default(),
            rests: Rests::default(),
            actions: VecDeque::new(),
        }
    }

    // ---- outputs ----

    /// The next thing for the driver to do.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When the dispatcher next needs [`Dispatcher::tick`]: the end of a reconnect
    /// grace, of a worker's rest after a decline, of the shutdown grace, or of the
    /// wait for links to close.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let phase = match self.phase {
            Phase::Closing { deadline } | Phase::Finishing { deadline } => Some(deadline),
            Phase::Open | Phase::Done => None,
        };
        self.detached
            .iter()
            .map(|d| d.until)
            .chain(phase)
            .chain(self.rests.next_end())
            .min()
    }

    /// Whether shutdown is complete: every job has ended and every link was closed or
    /// cut. Inputs are still answered (with refusals).
    pub(crate) fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    fn closing(&self) -> bool {
        self.phase != Phase::Open
    }

    fn send(&mut self, worker: u64, msg: ManagerMessage) {
        self.actions.push_back(Action::Send { worker, msg });
    }

    fn notify(&mut self, ev: ManagerEvent) {
        self.actions.push_back(Action::Notify(ev));
    }

    fn record(&mut self, r: impl FnOnce() -> Record) {
        if self.settings.journaled {
            self.actions.push_back(Action::Record(r()));
        }
    }

    // ---- inputs ----

    /// Time has passed: acts on every deadline up to `now`.
    pub(crate) fn tick(&mut self, now: Instant) {
        self.expire_detached(now);
        for worker in self.rests.ended(now) {
            self.fill(now, worker);
        }
        if let Phase::Closing { deadline } = self.phase
            && (self.running.is_empty() || now >= deadline)
        {
            self.finish(now);
        }
        if let Phase::Finishing { deadline } = self.phase
            && (self.workers.is_empty() || now >= deadline)
        {
            let left: Vec<u64> = self.workers.keys().copied().collect();
            for worker in left {
                self.actions.push_back(Action::Cut { worker });
            }
            self.phase = Phase::Done;
        }
    }

    /// A job submitted: started at once on the freest matching worker, or queued.
    pub(crate) fn submit(&mut self, now: Instant, job: QueuedJob) {
        if self.closing() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.end_for_shutdown(&job.events);
        } else {
            if let Some(w) = self.pick_worker(now, &job) {
                self.dispatch_latency
                    .observe(now.saturating_duration_since(job.since));
                self.start(now, job, w);
            } else if let Some(w) = self.pick_room(now, &job) {
                let place = self.queue.new_place();
                self.send_ahead(now, job, place, w);
            } else {
                self.queue.push(job);
            }
        }
        self.tick(now);
    }

    /// After a restart, the jobs the journal holds (in id order): queued ones are queued
    /// again in their order (the queue orders by priority, then by that order); those
    /// sent to a worker wait for it to come back and claim them, as after a lost link,
    /// for the reconnect grace (then they end `WorkerLost`, or are retried).
    pub(crate) fn restore(&mut self, now: Instant, jobs: Vec<Restored>) {
        let mut by_worker: BTreeMap<NamedWorker, Vec<(JobId, Route)>> = BTreeMap::new();
        for Restored { job, sent_to } in jobs {
            match sent_to {
                None => {
                    self.queued.fetch_add(1, Ordering::Relaxed);
                    self.queue.push(job);
                }
                Some((name, cert, ahead)) => {
                    self.running.insert(
                        job.id,
                        Running {
                            worker: None,
                            spec: job.spec,
                            attempt: job.attempt,
                            since: now,
                            cancelled: false,
                            held: None,
                        },
                    );
                    // A run sent ahead tells its start when its worker says it has
                    // started (it may have while the manager was down).
                    let mut route = Route::restored(job.events);
                    if ahead {
                        route.held_by = Some(name.clone());
                    }
                    by_worker
                        .entry((name, cert))
                        .or_default()
                        .push((job.id, route));
                }
            }
        }
        let grace = self.settings.reconnect_grace;
        for ((name, cert), jobs) in by_worker {
            log::info!(
                "{} job(s) of worker {name} wait {:.1} s for it to come back",
                jobs.len(),
                grace.as_secs_f64()
            );
            self.detached.push(Detached {
                name,
                cert,
                jobs,
                until: later(now, grace),
            });
        }
        self.tick(now);
    }

    /// Cancels a job: a queued one ends at once, a running one (or one sent ahead) is
    /// told to stop (it ends when its worker says so), one whose worker is away ends at
    /// once.
    pub(crate) fn cancel(&mut self, now: Instant, id: JobId) -> Result<()> {
        let r = self.cancel_job(id);
        self.tick(now);
        r
    }

    fn cancel_job(&mut self, id: JobId) -> Result<()> {
        if let Some(job) = self.queue.remove(id) {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            job.events.push(JobEvent::Finished(Outcome::Cancelled));
            return Ok(());
        }
        let running = self.running.get_mut(&id).ok_or(Error::UnknownJob(id.0))?;
        running.cancelled = true;
        match running.worker.filter(|w| self.workers.contains_key(w)) {
            Some(w) => self.send(w, ManagerMessage::Cancel { job: id }),
            None => {
                // Its worker is reconnecting: end it now; if the worker comes back, it is
                // told to drop the job.
                self.release_held(id);
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

    /// Begins a graceful shutdown: queued jobs end `Rejected`, running ones have
    /// `grace` to end, then they are cancelled and every worker is told goodbye. With a
    /// journal, nothing ends: every worker is told goodbye at once and keeps its jobs
    /// for its reconnect grace, and the restarted manager goes on with them and with
    /// the queue (see [`JobSink::suspend`]).
    pub(crate) fn shutdown(&mut self, now: Instant, grace: Duration) {
        if !self.closing() && self.settings.journaled {
            self.phase = Phase::Closing { deadline: now };
        } else if !self.closing() {
            self.reject_queued();
            self.phase = Phase::Closing {
                deadline: later(now, grace),
            };
            // Runs sent ahead are queued jobs too: taken back, they end `Rejected`
            // (one that has started meanwhile runs on, in the grace).
            let held: Vec<JobId> = self.held.iter().map(|&(_, job)| job).collect();
            for job in held {
                self.revoke(job, Revoking::Shutdown);
            }
        }
        self.tick(now);
    }

    /// No input can come any more (every sender is gone): ends everything now, without
    /// waiting for links to report that they closed.
    pub(crate) fn abandon(&mut self, now: Instant) {
        self.shutdown(now, Duration::ZERO);
        if let Phase::Finishing { .. } = self.phase {
            self.phase = Phase::Finishing { deadline: now };
            self.tick(now);
        }
    }

    /// News from a worker's link.
    pub(crate) fn on_link(&mut self, now: Instant, worker: u64, ev: LinkEvent) {
        match ev {
            LinkEvent::JobEnded { job } => {
                // A run sent ahead ends without starting when it is cancelled.
                let claimant = self.release_held(job);
                let ran = self
                    .running
                    .remove(&job)
                    .filter(|r| r.held.is_none())
                    .map(|r| now.saturating_duration_since(r.since));
                let known = self
                    .workers
                    .get_mut(&worker)
                    .map(|w| w.running.remove(&job));
                self.rests.forget(worker);
                self.reindex(worker);
                // A run held elsewhere behind a longer job comes here before the queue.
                if let Some(ran) = ran {
                    self.revoke_for_room(now, worker, ran);
                }
                // The slot's next `Run` at once, then the acknowledgement (`Ended`): both
                // are queued back to back, so the link's writer usually sends them in one
                // write, and the worker starts the next job before it forgets the last.
                self.fill(now, worker);
                // With a journal, the job's sink says `Ended` once the end is on disk.
                if known.is_some() && !self.settings.journaled {
                    self.send(worker, ManagerMessage::Ended { job });
                }
                if let Some(x) = claimant {
                    self.fill(now, x);
                }
            }
            LinkEvent::Started { job } => self.started(now, worker, job),
            LinkEvent::Draining => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    log::info!("worker {} is draining: no new jobs for it", w.info.name);
                    w.info.draining = true;
                }
                self.reindex(worker);
            }
            LinkEvent::Declined { job, route } => self.declined(now, worker, job, route),
            LinkEvent::Goodbye => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.leaving = true;
                }
            }
            LinkEvent::Closed { reason } => self.link_closed(now, worker, &reason),
        }
        self.tick(now);
    }

    /// A run sent ahead has started on `worker`.
    fn started(&mut self, now: Instant, worker: u64, job: JobId) {
        let ours = self
            .running
            .get(&job)
            .is_some_and(|r| r.worker == Some(worker) && r.held.is_some());
        if !ours {
            return;
        }
        let claimant = self.release_held(job);
        self.record(|| Record::Started { id: job });
        let Some(r) = self.running.get_mut(&job) else {
            return;
        };
        if let Some(h) = r.held.take() {
            self.queue_wait
                .observe(now.saturating_duration_since(h.queued_since));
        }
        r.since = now;
        if let Some(w) = self.workers.get_mut(&worker) {
            w.running.insert(job);
            w.jobs_run += 1;
        }
        // Nothing opens here: a held run counts as taking a slot from the moment it is
        // sent (see `WorkerEntry::taken`); the room it held opens when the `Finished`
        // of the job whose slot it took arrives, before or after this.
        self.reindex(worker);
        // The revoke crossed the start: the worker it was for looks again.
        if let Some(x) = claimant {
            self.fill(now, x);
        }
    }

    fn declined(&mut self, now: Instant, worker: u64, job: JobId, route: Route) {
        let held = self
            .running
            .get(&job)
            .and_then(|r| r.held.filter(|_| r.worker == Some(worker)));
        if let Some(h) = held {
            // A run sent ahead given back: revoked (no rest for that), or declined.
            let claimant = self.release_held(job);
            if h.revoking == Revoking::No {
                self.rests.declined(worker, now);
            }
            if let Some(r) = self.running.remove(&job) {
                self.put_back(job, r, h, route.sink);
            }
            self.reindex(worker);
            // To the worker it was revoked for, if it still has room; the room it leaves
            // is filled from the queue.
            if let Some(x) = claimant {
                self.fill(now, x);
            }
            self.fill(now, worker);
            if self.queue.get(job).is_some() {
                self.fill_all(now);
            }
            return;
        }
        if let Some(w) = self.workers.get_mut(&worker) {
            w.running.remove(&job);
        }
        // Offer that worker nothing for a while, so that one that declines everything
        // does not have the same job sent back and forth.
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
            Some(r) if r.cancelled => route.sink.push(JobEvent::Finished(Outcome::Cancelled)),
            Some(r) => {
                self.queue_again(now, job, r.spec, route.sink, r.attempt);
                self.fill_all(now);
            }
            None => route.sink.push(JobEvent::Finished(Outcome::WorkerLost)),
        }
    }

    // ---- queries (no change of state) ----

    /// The connected workers.
    pub(crate) fn workers(&self) -> Vec<WorkerInfo> {
        self.workers.values().map(Self::info).collect()
    }

    fn info(w: &WorkerEntry) -> WorkerInfo {
        WorkerInfo {
            running: w.running.len(),
            ..w.info.clone()
        }
    }

    /// The manager's numbers at `now`.
    pub(crate) fn stats(&self, now: Instant) -> Stats {
        let c = &self.counters;
        let per_worker: Vec<WorkerStats> = self
            .workers
            .values()
            .map(|w| WorkerStats {
                name: w.info.name.clone(),
                jobs_run: w.jobs_run,
                running: w.running.len(),
                slots: w.info.slots,
                draining: w.info.draining,
                last_heard: w.live.silent_at(now),
                connected_for: now.saturating_duration_since(w.connected_at),
            })
            .collect();
        // Runs sent ahead and not started count as queued.
        let held = self.running.values().filter(|r| r.held.is_some()).count();
        Stats {
            workers: self.workers.len(),
            workers_draining: per_worker.iter().filter(|w| w.draining).count(),
            slots_total: per_worker.iter().map(|w| w.slots as usize).sum(),
            slots_busy: per_worker.iter().map(|w| w.running).sum(),
            jobs_queued: self.queue.len() + held,
            jobs_running: self.running.len() - held,
            jobs_disconnected: self.detached.iter().map(|d| d.jobs.len()).sum(),
            jobs_submitted: c.submitted.load(Ordering::Relaxed),
            jobs_finished: c.finished_by_outcome(),
            oldest_queued_wait: self
                .queue
                .oldest()
                .into_iter()
                .chain(
                    self.running
                        .values()
                        .filter_map(|r| r.held.map(|h| h.queued_since)),
                )
                .min()
                .map(|t| now.saturating_duration_since(t)),
            queue_wait: self.queue_wait.clone(),
            dispatch_latency: self.dispatch_latency.clone(),
            output_bytes: c.output_bytes.load(Ordering::Relaxed),
            per_worker,
            journal_bytes: None,
        }
    }

    /// Jobs that have not ended (or one of them), by id, as at `now`.
    pub(crate) fn jobs(&self, now: Instant, only: Option<JobId>) -> Vec<JobStatus> {
        let queued = |j: &QueuedJob| JobStatus {
            id: j.id,
            state: JobState::Queued,
            since: now.saturating_duration_since(j.since),
            attempt: j.attempt,
            script: j.spec.script.clone(),
            priority: j.spec.priority,
            output_paused: false,
        };
        let running = |id: JobId, r: &Running| {
            if let Some(h) = r.held {
                // Sent ahead, not started: queued, as far as its submitter knows.
                return JobStatus {
                    id,
                    state: JobState::Queued,
                    since: now.saturating_duration_since(h.queued_since),
                    attempt: r.attempt,
                    script: r.spec.script.clone(),
                    priority: r.spec.priority,
                    output_paused: false,
                };
            }
            let worker = r.worker.and_then(|w| self.workers.get(&w));
            let output_paused = worker
                .and_then(|w| lock(&w.routes).get(&id).map(|route| route.sink.is_paused()))
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
                since: now.saturating_duration_since(r.since),
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

    // ---- scheduling ----

    /// The matching worker with the most free slots; ties go round in turn. Looks at the
    /// freest workers first and stops at the first match.
    fn pick_worker(&mut self, now: Instant, job: &QueuedJob) -> Option<u64> {
        let req = &job.spec.requirements;
        let cursor = self.cursor;
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

    /// A matching worker with no free slot and room for a run sent ahead; in turn.
    /// Only asked once no worker has a free slot for the job.
    fn pick_room(&mut self, now: Instant, job: &QueuedJob) -> Option<u64> {
        let req = &job.spec.requirements;
        let cursor = self.room_cursor;
        let found = self
            .with_room
            .range(cursor..)
            .chain(self.with_room.range(..cursor))
            .find(|id| {
                self.workers
                    .get(id)
                    .is_some_and(|w| req.matches(&w.info.tags, &w.info.platform))
                    && !self.rests.resting(**id, now)
            })
            .copied()?;
        self.room_cursor = found + 1;
        Some(found)
    }

    /// Records a worker's current number of free slots in `by_free`, and whether it has
    /// room ahead in `with_room` (or drops it from both when it is gone).
    fn reindex(&mut self, worker: u64) {
        let now = self.workers.get(&worker).map(|w| {
            (
                w.indexed_free,
                w.free(),
                w.indexed_room,
                w.room() > w.claims,
            )
        });
        if let Some((old, new, old_room, new_room)) = now
            && old == new
            && old_room == new_room
        {
            return;
        }
        if now.is_none_or(|(old, new, _, _)| old != new) {
            // Few distinct free counts exist, so this walk is short.
            for ids in self.by_free.values_mut() {
                ids.remove(&worker);
            }
            self.by_free.retain(|_, ids| !ids.is_empty());
            if let Some((_, new, _, _)) = now {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.indexed_free = new;
                }
                if new > 0 {
                    self.by_free.entry(new).or_default().insert(worker);
                }
            }
        }
        match now {
            Some((_, _, _, true)) => {
                self.with_room.insert(worker);
            }
            _ => {
                self.with_room.remove(&worker);
            }
        }
        if let Some((_, _, _, room)) = now
            && let Some(w) = self.workers.get_mut(&worker)
        {
            w.indexed_room = room;
        }
    }

    /// Sends a job into one of the worker's free slots: it starts there at once.
    fn start(&mut self, now: Instant, job: QueuedJob, worker: u64) {
        let Some(w) = self.workers.get_mut(&worker) else {
            // Not reached: callers pick a worker that is there. Kept queued if it were.
            self.queue.push(job);
            return;
        };
        self.queued.fetch_sub(1, Ordering::Relaxed);
        self.queue_wait
            .observe(now.saturating_duration_since(job.since));
        w.jobs_run += 1;
        job.events.push(JobEvent::Started {
            worker: w.info.name.clone(),
        });
        lock(&w.routes).insert(job.id, Route::new(job.events.clone()));
        w.running.insert(job.id);
        self.send_run(now, worker, job, None);
        self.reindex(worker);
    }

    /// Sends a job's `Run` to its worker and notes it as running there (`held`: sent
    /// ahead). The spec stays here too, in case the job must run again elsewhere. The
    /// job's sink is attached to the link after `Run`: a job whose submitter is still
    /// behind (a retry) is paused on its new worker, which by then knows the job.
    fn send_run(&mut self, now: Instant, worker: u64, job: QueuedJob, held: Option<Held>) {
        if self.settings.journaled
            && let Some(w) = self.workers.get(&worker)
        {
            let name = w.info.name.clone();
            self.record(|| Record::Sent {
                id: job.id,
                attempt: job.attempt,
                worker: name,
                ahead: held.is_some(),
            });
        }
        self.send(
            worker,
            ManagerMessage::Run {
                job: job.id,
                spec: job.spec.clone(),
                ahead: held.is_some(),
            },
        );
        let sink = job.events;
        self.actions.push_back(Action::Attach { worker, sink });
        self.running.insert(
            job.id,
            Running {
                worker: Some(worker),
                spec: job.spec,
                attempt: job.attempt,
                since: now,
                cancelled: false,
                held,
            },
        );
    }

    /// Sends a job ahead to a worker with no free slot: it holds the run and starts it
    /// the moment a slot frees, and says `Started`. Until then the job counts as queued
    /// (`place` is where it goes back to if it is given back).
    fn send_ahead(&mut self, now: Instant, job: QueuedJob, place: u64, worker: u64) {
        let Some(w) = self.workers.get_mut(&worker) else {
            self.queue.restore(place, job);
            return;
        };
        self.queued.fetch_sub(1, Ordering::Relaxed);
        let route = Route::held(job.events.clone(), w.info.name.clone());
        lock(&w.routes).insert(job.id, route);
        w.held.push_back(job.id);
        self.held.insert((now, job.id));
        let held = Held {
            place,
            queued_since: job.since,
            sent: now,
            revoking: Revoking::No,
        };
        self.send_run(now, worker, job, Some(held));
        self.reindex(worker);
    }

    /// Gives a worker queued jobs: into its free slots, then ahead of its slots (only
    /// jobs no free slot elsewhere can take; room promised to a run being revoked for it
    /// is kept). A free slot the queue cannot fill takes a run held ahead by another
    /// worker.
    fn fill(&mut self, now: Instant, worker: u64) {
        if self.closing() || self.rests.resting(worker, now) {
            return;
        }
        while let Some(w) = self.workers.get(&worker) {
            if w.free() == 0 {
                break;
            }
            let Some(job) = self.queue.pop_for(&w.info.tags, &w.info.platform) else {
                break;
            };
            self.start(now, job, worker);
        }
        while let Some(w) = self.workers.get(&worker) {
            if w.room() <= w.claims {
                break;
            }
            let Some((place, job)) = self.queue.pop_placed(&w.info.tags, &w.info.platform) else {
                break;
            };
            match self.pick_worker(now, &job) {
                Some(other) => self.start(now, job, other),
                None => self.send_ahead(now, job, place, worker),
            }
        }
        self.revoke_for_free(now, worker);
    }

    /// A worker whose free slots the queue cannot fill: takes back, for it, the runs held
    /// longest ahead of other workers' slots that it can run, one per free slot.
    fn revoke_for_free(&mut self, now: Instant, worker: u64) {
        let Some(w) = self.workers.get(&worker) else {
            return;
        };
        let want = w.free().saturating_sub(w.claims);
        if want == 0 || self.held.is_empty() || self.rests.resting(worker, now) {
            return;
        }
        let picks = self.revocable(worker, None, want);
        for job in picks {
            self.revoke(job, Revoking::For(worker));
        }
    }

    /// A job that ran for `ran` has just ended on `worker`, whose slot went to a run it
    /// held: a run held elsewhere for longer than that (it waits behind a longer job) is
    /// taken back for the room this leaves, before the queue fills it (the queue's jobs
    /// are younger). With jobs of even length nothing is taken back.
    fn revoke_for_room(&mut self, now: Instant, worker: u64, ran: Duration) {
        if self.closing() || self.rests.resting(worker, now) {
            return;
        }
        let Some(w) = self.workers.get(&worker) else {
            return;
        };
        let want = w.room().saturating_sub(w.claims);
        let Some(before) = now.checked_sub(ran) else {
            return;
        };
        if want == 0 || self.held.is_empty() {
            return;
        }
        let picks = self.revocable(worker, Some(before), want);
        for job in picks {
            self.revoke(job, Revoking::For(worker));
        }
    }

    /// Up to `want` runs held by other workers, sent before `before` (if given), that
    /// `worker` can run and that are not being taken back yet, oldest first.
    fn revocable(&self, worker: u64, before: Option<Instant>, want: usize) -> Vec<JobId> {
        let Some(w) = self.workers.get(&worker) else {
            return Vec::new();
        };
        self.held
            .iter()
            .take_while(|(sent, _)| before.is_none_or(|b| *sent < b))
            .filter(|(_, job)| {
                self.running.get(job).is_some_and(|r| {
                    r.worker != Some(worker)
                        && r.held.is_some_and(|h| h.revoking == Revoking::No)
                        && r.spec.requirements.matches(&w.info.tags, &w.info.platform)
                })
            })
            .take(want)
            .map(|&(_, job)| job)
            .collect()
    }

    /// Asks the worker holding a run sent ahead to give it back.
    fn revoke(&mut self, job: JobId, why: Revoking) {
        let Some(r) = self.running.get_mut(&job) else {
            return;
        };
        let (Some(h), Some(holder)) = (r.held.as_mut(), r.worker) else {
            return;
        };
        if h.revoking != Revoking::No {
            return;
        }
        h.revoking = why;
        if let Revoking::For(x) = why
            && let Some(w) = self.workers.get_mut(&x)
        {
            w.claims += 1;
            self.reindex(x);
        }
        self.send(holder, ManagerMessage::Revoke { job });
    }

    /// A held run leaves its worker's list and the index (it started, ended, was given
    /// back, or its worker is gone); a revoke under way ends and its claim is released.
    /// Its `Held` record stays, for the caller. Returns the worker the revoke was for.
    fn release_held(&mut self, job: JobId) -> Option<u64> {
        let r = self.running.get_mut(&job)?;
        let h = r.held.as_mut()?;
        let revoking = std::mem::replace(&mut h.revoking, Revoking::No);
        self.held.remove(&(h.sent, job));
        let holder = r.worker;
        if let Some(w) = holder.and_then(|w| self.workers.get_mut(&w)) {
            w.held.retain(|j| *j != job);
        }
        if let Some(w) = holder {
            self.reindex(w);
        }
        match revoking {
            Revoking::For(x) => {
                if let Some(w) = self.workers.get_mut(&x) {
                    w.claims = w.claims.saturating_sub(1);
                    self.reindex(x);
                }
                Some(x)
            }
            Revoking::No | Revoking::Shutdown => None,
        }
    }

    /// A run sent ahead that never started goes back to its place in the queue (no
    /// event: to its submitter it was queued all along), unless it was cancelled or the
    /// manager is closing. The caller fills.
    fn put_back(&mut self, job: JobId, r: Running, h: Held, sink: Arc<JobSink>) {
        sink.set_producer(None);
        if r.cancelled {
            sink.push(JobEvent::Finished(Outcome::Cancelled));
        } else if self.closing() {
            self.end_for_shutdown(&sink);
        } else {
            self.record(|| Record::Queued {
                id: job,
                attempt: r.attempt,
            });
            self.queued.fetch_add(1, Ordering::Relaxed);
            self.queue.restore(
                h.place,
                QueuedJob {
                    id: job,
                    spec: r.spec,
                    events: sink,
                    attempt: r.attempt,
                    since: h.queued_since,
                },
            );
        }
    }

    /// A job that ran, or was sent, goes back to the end of the queue as `attempt`
    /// (its submitter hears `Requeued`); the caller fills.
    fn queue_again(
        &mut self,
        now: Instant,
        job: JobId,
        spec: JobSpec,
        sink: Arc<JobSink>,
        attempt: u32,
    ) {
        self.record(|| Record::Queued { id: job, attempt });
        sink.set_producer(None);
        sink.push(JobEvent::Requeued { attempt });
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.queue.push(QueuedJob {
            id: job,
            spec,
            events: sink,
            attempt,
            since: now,
        });
    }

    fn fill_all(&mut self, now: Instant) {
        if self.queue.len() == 0 {
            return;
        }
        let ids: Vec<u64> = self.workers.keys().copied().collect();
        for id in ids {
            self.fill(now, id);
        }
    }

    // ---- workers joining and leaving ----

    /// A worker's hello: the worker's id and the jobs it is to go on with, or why it is
    /// refused. Its link's outbox is the driver's; `link` is what the dispatcher keeps.
    pub(crate) fn register(
        &mut self,
        now: Instant,
        hello: WorkerHello,
        peer: Option<SocketAddr>,
        cert: Option<Vec<u8>>,
        link: LinkPorts,
    ) -> Registration {
        let r = self.admit(now, hello, peer, cert, link);
        self.tick(now);
        r
    }

    fn admit(
        &mut self,
        now: Instant,
        hello: WorkerHello,
        peer: Option<SocketAddr>,
        cert: Option<Vec<u8>>,
        link: LinkPorts,
    ) -> Registration {
        let refusal = if self.closing() {
            Some(SHUTTING_DOWN.to_string())
        } else if hello.slots == 0 || hello.slots > MAX_SLOTS {
            Some(format!(
                "a worker must offer 1 to {MAX_SLOTS} slots, not {}",
                hello.slots
            ))
        } else if hello.ahead > MAX_AHEAD {
            Some(format!(
                "a worker may hold at most {MAX_AHEAD} runs ahead, not {}",
                hello.ahead
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
            return Err(reason);
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
                d.until.saturating_duration_since(now).as_secs_f64()
            );
            log::warn!("refusing worker from {}: {reason}", fmt_addr(peer));
            return Err(reason);
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
            let max = self.settings.max_connections_per_certificate;
            if held >= max {
                let reason = format!(
                    "its certificate already holds {held} connection(s), the most allowed (max_connections_per_certificate = {max})"
                );
                log::warn!(
                    "refusing worker {} from {}: {reason}",
                    hello.name,
                    fmt_addr(peer)
                );
                return Err(reason);
            }
        }
        match namesake {
            Some((old, true)) => {
                self.actions.push_back(Action::Cut { worker: old });
                self.link_closed(now, old, "replaced by a new connection of the same worker");
            }
            Some((_, false)) => {
                let reason = format!("a worker named {:?} is already connected", hello.name);
                log::warn!(
                    "refusing worker from {}: {reason} (with another certificate)",
                    fmt_addr(peer)
                );
                return Err(reason);
            }
            None => {}
        }
        let id = self.next_worker;
        self.next_worker += 1;
        let resume = self.reattach(now, &hello, &cert, id, &link.routes);
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
        let resumed: IdSet<JobId> = resume.iter().map(|(j, _)| *j).collect();
        log::info!(
            "worker {} joined from {} ({} slot(s) and {} ahead, tags [{}], {}){}",
            info.name,
            fmt_addr(peer),
            info.slots,
            hello.ahead,
            info.tags.iter().cloned().collect::<Vec<_>>().join(","),
            info.platform,
            if resumed.is_empty() {
                String::new()
            } else {
                format!(", resuming {} job(s)", resumed.len())
            }
        );
        self.notify(ManagerEvent::WorkerJoined(info.clone()));
        self.record(|| Record::Worker {
            name: info.name.clone(),
            cert: cert.clone(),
        });
        self.workers.insert(
            id,
            WorkerEntry {
                info,
                cert,
                running: resumed,
                held: VecDeque::new(),
                ahead: hello.ahead as usize,
                claims: 0,
                indexed_room: false,
                jobs_run: 0,
                connected_at: now,
                indexed_free: 0,
                routes: link.routes,
                live: link.live,
                leaving: false,
            },
        );
        self.reindex(id);
        self.fill(now, id);
        Ok((id, resume))
    }

    /// Gives a returning worker back the jobs it still holds for this manager; settles
    /// the ones it no longer has. Returns what it is to go on with.
    fn reattach(
        &mut self,
        now: Instant,
        hello: &WorkerHello,
        cert: &Option<Vec<u8>>,
        id: u64,
        routes: &Routes,
    ) -> Vec<(JobId, u64)> {
        let Some(i) = self
            .detached
            .iter()
            .position(|d| d.name == hello.name && d.cert == *cert)
        else {
            return Vec::new();
        };
        let d = self.detached.swap_remove(i);
        let ours = hello.manager_id == Some(self.settings.manager_id);
        let mut resume = Vec::new();
        for (job, mut route) in d.jobs {
            let listed = hello
                .jobs
                .iter()
                .find(|h| ours && h.job == job)
                .map(|h| (h.ahead, h.stdin_taken));
            let listed = listed.map(|(ahead, stdin_taken)| {
                // An interactive job's stdin goes on from what the worker has taken.
                if let Some(stdin) = route.sink.stdin() {
                    stdin.resume_from(stdin_taken);
                }
                ahead
            });
            let mut starts_later = false;
            match listed {
                // Not listed by a worker that names this manager: such a worker holds
                // every run it was sent and not told ended (one that gave its runs up
                // after its grace names no manager), so this run never reached it (lost
                // with the link, or with a manager that crashed), or it declined it in a
                // message lost with the link. It goes back to the queue.
                None if ours => {
                    log::info!(
                        "job {job}: worker {} came back without it (it never got it); queued again",
                        d.name
                    );
                    self.never_arrived(now, job, route);
                    continue;
                }
                None => {
                    if route.held_by.is_none() {
                        log::warn!("job {job}: worker {} came back without it", d.name);
                    }
                    // A worker that gave its runs up after its grace (it may have
                    // started this one), or another process under its name: it may have
                    // run.
                    self.settle(now, job, route, false);
                    continue;
                }
                // Read back from the journal, which does not say which runs were sent
                // ahead: one the worker still holds ahead goes on as a running one (it
                // starts in the worker's next free slot), and its start is told when it
                // comes. (It has sent no output yet: its route is still `restored`.)
                Some(true) if route.restored => starts_later = true,
                // Sent ahead and still not started: taken back (the worker drops it).
                Some(true) if route.held_by.is_some() => {
                    self.settle(now, job, route, true);
                    continue;
                }
                Some(_) => {}
            }
            if starts_later {
                route.held_by = Some(d.name.clone());
            } else if let Some(worker) = route.held_by.take() {
                // Sent ahead, and it started while the link was down.
                self.record(|| Record::Started { id: job });
                route.sink.push(JobEvent::Started { worker });
                if let Some(r) = self.running.get_mut(&job)
                    && let Some(h) = r.held.take()
                {
                    self.queue_wait
                        .observe(now.saturating_duration_since(h.queued_since));
                    r.since = now;
                }
            }
            resume.push((job, route.next_seq));
            let cancelled = self.running.get(&job).is_some_and(|r| r.cancelled);
            if let Some(r) = self.running.get_mut(&job) {
                r.worker = Some(id);
            }
            let sink = route.sink.clone();
            lock(routes).insert(job, route);
            self.actions.push_back(Action::Attach { worker: id, sink });
            if cancelled {
                self.send(id, ManagerMessage::Cancel { job });
            }
        }
        resume
    }

    /// A run its worker never got (see [`Dispatcher::reattach`]) goes back to the queue
    /// with the same attempt, as if declined: a run sent ahead to its place, a running
    /// one (whose submitter saw it start) with `Requeued`; unless it was cancelled, or
    /// the manager is closing.
    fn never_arrived(&mut self, now: Instant, job: JobId, route: Route) {
        let claimant = self.release_held(job);
        let Some(mut r) = self.running.remove(&job) else {
            route.sink.push(JobEvent::Finished(Outcome::WorkerLost));
            return;
        };
        if let Some(h) = r.held.take() {
            self.put_back(job, r, h, route.sink);
        } else if r.cancelled {
            route.sink.push(JobEvent::Finished(Outcome::Cancelled));
        } else if self.closing() {
            self.end_for_shutdown(&route.sink);
        } else {
            self.queue_again(now, job, r.spec, route.sink, r.attempt);
        }
        if let Some(x) = claimant {
            self.fill(now, x);
        }
        self.fill_all(now);
    }

    fn link_closed(&mut self, now: Instant, worker: u64, reason: &str) {
        let Some(w) = self.workers.remove(&worker) else {
            return;
        };
        self.rests.forget(worker);
        self.reindex(worker);
        let routes: Vec<(JobId, Route)> = lock(&w.routes).drain().collect();
        let grace = self.settings.reconnect_grace;
        if w.leaving || grace.is_zero() || self.closing() {
            for (job, route) in routes {
                log::warn!("job {job} lost: worker {} went away", w.info.name);
                self.settle(now, job, route, w.leaving);
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
            // A grace stretched with the heartbeats (see `link::Pace`) is waited out in
            // full: the worker gives its jobs up by the grace less the timeout and the
            // interval it was told.
            let grace = grace + w.live.stretch();
            self.detach(now, &w.info.name, w.cert, routes, grace);
        }
        log::info!("worker {} left: {reason}", w.info.name);
        self.notify(ManagerEvent::WorkerLeft {
            id: worker,
            name: w.info.name.clone(),
            reason: reason.to_string(),
        });
        self.actions.push_back(Action::Forget { worker });
        self.fill_all(now);
    }

    fn detach(
        &mut self,
        now: Instant,
        name: &str,
        cert: Option<Vec<u8>>,
        jobs: Vec<(JobId, Route)>,
        grace: Duration,
    ) {
        for (job, route) in &jobs {
            route.sink.set_producer(None);
            // A run sent ahead waits with its worker, out of reach of revokes: it may
            // have started, and only the worker can tell.
            self.release_held(*job);
            if let Some(r) = self.running.get_mut(job) {
                r.worker = None;
            }
        }
        self.detached.push(Detached {
            name: name.to_string(),
            cert,
            jobs,
            until: later(now, grace),
        });
    }

    fn expire_detached(&mut self, now: Instant) {
        if !self.detached.iter().any(|d| d.until <= now) {
            return;
        }
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
                self.settle(now, job, route, false);
            }
        }
    }

    /// Ends a job whose worker is gone for good: queued again if it has retries left,
    /// else `WorkerLost` (or `Cancelled`, if that was asked for).
    /// A run sent ahead goes back to its place in the queue, with no retry used up, only
    /// when it is `known` not to have started: the worker said so (its hello on return),
    /// or its link ended in order (a goodbye: a `Started` would have arrived first) and
    /// none arrived. After a cut, a `Started` may have been lost with the link, so a held
    /// run whose worker does not come back is settled as a running one: it may have run,
    /// and it is never run again unless it has a retry left.
    fn settle(&mut self, now: Instant, job: JobId, route: Route, known: bool) {
        let claimant = self.release_held(job);
        let Some(mut r) = self.running.remove(&job) else {
            route.sink.push(JobEvent::Finished(Outcome::WorkerLost));
            return;
        };
        // (A held run whose `Started` reached the reader, not yet the dispatcher, has
        // started: it is settled as a running one.)
        let held = r.held.take();
        if let Some(h) = held
            && known
            && route.held_by.is_some()
        {
            self.put_back(job, r, h, route.sink);
            if let Some(x) = claimant {
                self.fill(now, x);
            }
            self.fill_all(now);
            return;
        }
        if r.cancelled {
            route.sink.push(JobEvent::Finished(Outcome::Cancelled));
        } else if r.attempt <= r.spec.retries && !self.closing() {
            log::warn!(
                "job {job}: queueing attempt {} of {}",
                r.attempt + 1,
                r.spec.retries + 1
            );
            self.queue_again(now, job, r.spec, route.sink, r.attempt + 1);
            self.fill_all(now);
        } else {
            route.sink.push(JobEvent::Finished(Outcome::WorkerLost));
        }
    }

    // ---- shutdown ----

    fn reject_queued(&mut self) {
        let queued: Vec<QueuedJob> = self.queue.drain().collect();
        self.queued.fetch_sub(queued.len(), Ordering::Relaxed);
        for job in queued {
            self.end_for_shutdown(&job.events);
        }
    }

    /// A job that does not start because the manager is closing: it ends `Rejected`,
    /// or, with a journal, stays there for the next start of the manager.
    fn end_for_shutdown(&self, sink: &Arc<JobSink>) {
        if self.settings.journaled {
            sink.suspend();
        } else {
            sink.push(JobEvent::Finished(Outcome::Rejected(SHUTTING_DOWN.into())));
        }
    }

    /// With a journal, at the end of a shutdown: the jobs that run or wait for their
    /// worker stay with their workers (told nothing but goodbye) and in the journal.
    fn keep_for_restart(&mut self) {
        for d in std::mem::take(&mut self.detached) {
            for (_, route) in d.jobs {
                route.sink.suspend();
            }
        }
        let ids: Vec<u64> = self.workers.keys().copied().collect();
        for worker in &ids {
            let kept: Vec<(JobId, Route)> = lock(&self.workers[worker].routes).drain().collect();
            for (_, route) in kept {
                route.sink.suspend();
            }
        }
    }

    /// Ends what is still running as cancelled (and what waits for a lost worker as
    /// lost), and says goodbye to every worker; their links then have
    /// [`LINK_CLOSE_WAIT`] to close before they are cut.
    fn finish(&mut self, now: Instant) {
        self.reject_queued();
        if self.settings.journaled {
            self.keep_for_restart();
        }
        for d in std::mem::take(&mut self.detached) {
            for (job, route) in d.jobs {
                self.running.remove(&job);
                route.sink.push(JobEvent::Finished(Outcome::WorkerLost));
            }
        }
        let ids: Vec<u64> = self.workers.keys().copied().collect();
        for worker in ids {
            let cut: Vec<(JobId, Route)> = lock(&self.workers[&worker].routes).drain().collect();
            for (job, route) in cut {
                self.send(worker, ManagerMessage::Cancel { job });
                route.sink.push(JobEvent::Finished(Outcome::Cancelled));
            }
            self.send(worker, ManagerMessage::Shutdown);
            self.actions.push_back(Action::Close { worker });
        }
        self.running.clear();
        self.held.clear();
        self.phase = Phase::Finishing {
            deadline: later(now, LINK_CLOSE_WAIT),
        };
    }
}
