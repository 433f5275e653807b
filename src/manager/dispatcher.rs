//! The dispatcher: the one thread that owns all scheduling state (the queue, the
//! worker table, which job runs where). Everything else talks to it through one
//! channel of [`Event`]s, so no lock guards scheduling state. Job output does not pass
//! through here: link readers hand it straight to the job's channel via the link's
//! route table, and whoever removes a job's route delivers its single `Finished`.

use super::queue::{Queue, QueuedJob};
use super::sink::JobSink;
use super::{ManagerEvent, Shared, WorkerInfo};
use crate::error::{Error, Result};
use crate::job::{JobEvent, JobId, JobSpec, JobState, JobStatus, Outcome};
use crate::link::{Liveness, Outbound};
use crate::protocol::{ManagerMessage, WorkerHello};
use crate::tls::Closer;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where a running job's events go, per link: shared by the dispatcher and that link's
/// reader. Events are pushed under this lock (pushing never blocks), and removing an entry
/// is the right to deliver the job's `Finished`: so nothing follows it.
pub(crate) type Routes = Mutex<HashMap<JobId, Arc<JobSink>>>;

/// The most slots one worker may announce.
pub(crate) const MAX_SLOTS: u32 = 1024;

/// How long a closing manager waits for its links to say goodbye before cutting them.
const LINK_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What a link gives the dispatcher so it can send work and end jobs.
pub(crate) struct LinkHandle {
    pub out: Sender<Outbound<ManagerMessage>>,
    pub routes: Arc<Routes>,
    pub live: Arc<Liveness>,
    pub closer: Closer,
}

pub(crate) enum Event {
    Submit(QueuedJob),
    Cancel {
        id: JobId,
        reply: Option<Sender<Result<()>>>,
    },
    Workers(Sender<Vec<WorkerInfo>>),
    Jobs {
        only: Option<JobId>,
        reply: Sender<Vec<JobStatus>>,
    },
    Subscribe(Sender<ManagerEvent>),
    Register {
        hello: WorkerHello,
        peer: Option<SocketAddr>,
        link: LinkHandle,
        reply: Sender<Result<u64, String>>,
    },
    JobEnded {
        worker: u64,
        job: JobId,
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
    running: HashSet<JobId>,
    link: LinkHandle,
}

impl WorkerEntry {
    fn free(&self) -> usize {
        (self.info.slots as usize).saturating_sub(self.running.len())
    }
}

struct Running {
    worker: u64,
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
    subscribers: Vec<Sender<ManagerEvent>>,
    next_worker: u64,
    /// Where the rotation among equally free workers continues.
    cursor: u64,
    closing: bool,
}

impl Dispatcher {
    pub(crate) fn new(shared: Arc<Shared>) -> Dispatcher {
        Dispatcher {
            shared,
            queue: Queue::default(),
            workers: BTreeMap::new(),
            running: HashMap::new(),
            subscribers: Vec::new(),
            next_worker: 1,
            cursor: 0,
            closing: false,
        }
    }

    pub(crate) fn run(mut self, rx: Receiver<Event>) {
        let mut deadline: Option<Instant> = None;
        loop {
            let ev = match deadline {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(d) => rx.recv_deadline(d),
            };
            match ev {
                Ok(Event::Shutdown { grace }) => {
                    self.begin_shutdown();
                    deadline = Some(Instant::now() + grace);
                }
                Ok(ev) => self.handle(ev),
                Err(_) => break,
            }
            if self.closing && self.running.is_empty() {
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
            Event::Subscribe(tx) => self.subscribers.push(tx),
            Event::Jobs { only, reply } => {
                let _ = reply.send(self.jobs(only));
            }
            Event::Register {
                hello,
                peer,
                link,
                reply,
            } => self.register(hello, peer, link, reply),
            Event::JobEnded { worker, job } => {
                self.running.remove(&job);
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.running.remove(&job);
                }
                self.fill(worker);
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
            Some(w) => self.start(job, w),
            None => self.queue.push(job),
        }
    }

    /// The matching worker with the most free slots; ties go round in turn.
    fn pick_worker(&mut self, job: &QueuedJob) -> Option<u64> {
        let req = &job.spec.requirements;
        let mut best: Option<(usize, u64)> = None;
        let after = self.workers.range(self.cursor..);
        let before = self.workers.range(..self.cursor);
        for (&id, w) in after.chain(before) {
            let free = w.free();
            if free > 0
                && req.matches(&w.info.tags, &w.info.platform)
                && best.is_none_or(|(f, _)| free > f)
            {
                best = Some((free, id));
            }
        }
        let (_, id) = best?;
        self.cursor = id + 1;
        Some(id)
    }

    fn start(&mut self, job: QueuedJob, worker: u64) {
        self.shared.queued.fetch_sub(1, Ordering::Relaxed);
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        job.events.set_producer(Some(w.link.out.clone()));
        job.events.push(JobEvent::Started {
            worker: w.info.name.clone(),
        });
        lock(&w.link.routes).insert(job.id, job.events);
        // The spec stays here too, in case the job must run again elsewhere.
        let _ = w.link.out.send(Outbound::Message(ManagerMessage::Run {
            job: job.id,
            spec: job.spec.clone(),
        }));
        w.running.insert(job.id);
        self.running.insert(
            job.id,
            Running {
                worker,
                spec: job.spec,
                attempt: job.attempt,
                since: Instant::now(),
                cancelled: false,
            },
        );
    }

    fn jobs(&self, only: Option<JobId>) -> Vec<JobStatus> {
        let queued = |j: &QueuedJob| JobStatus {
            id: j.id,
            state: JobState::Queued,
            since: j.since.elapsed(),
            attempt: j.attempt,
            script: j.spec.script.clone(),
            priority: j.spec.priority,
        };
        let running = |id: JobId, r: &Running| JobStatus {
            id,
            state: JobState::Running {
                worker: self
                    .workers
                    .get(&r.worker)
                    .map_or_else(String::new, |w| w.info.name.clone()),
            },
            since: r.since.elapsed(),
            attempt: r.attempt,
            script: r.spec.script.clone(),
            priority: r.spec.priority,
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

    /// Gives a worker queued jobs while it has free slots.
    fn fill(&mut self, worker: u64) {
        if self.closing {
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

    fn cancel(&mut self, id: JobId) -> Result<()> {
        if let Some(job) = self.queue.remove(id) {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            job.events.push(JobEvent::Finished(Outcome::Cancelled));
            return Ok(());
        }
        let running = self.running.get_mut(&id).ok_or(Error::UnknownJob(id.0))?;
        running.cancelled = true;
        if let Some(w) = self.workers.get(&running.worker) {
            let _ = w
                .link
                .out
                .send(Outbound::Message(ManagerMessage::Cancel { job: id }));
        }
        Ok(())
    }

    fn register(
        &mut self,
        hello: WorkerHello,
        peer: Option<SocketAddr>,
        link: LinkHandle,
        reply: Sender<Result<u64, String>>,
    ) {
        let refusal = if self.closing {
            Some("the manager is shutting down".to_string())
        } else if hello.slots == 0 || hello.slots > MAX_SLOTS {
            Some(format!(
                "a worker must offer 1 to {MAX_SLOTS} slots, not {}",
                hello.slots
            ))
        } else if hello.name.is_empty() || hello.name.len() > 256 {
            Some("a worker name must have 1 to 256 bytes".to_string())
        } else if self.workers.values().any(|w| w.info.name == hello.name) {
            Some(format!(
                "a worker named {:?} is already connected",
                hello.name
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            log::warn!(
                "refusing worker {:?} from {}: {reason}",
                hello.name,
                fmt_addr(peer)
            );
            let _ = reply.send(Err(reason));
            return;
        }
        let id = self.next_worker;
        self.next_worker += 1;
        let info = WorkerInfo {
            id,
            name: hello.name,
            address: peer,
            tags: hello.tags,
            platform: hello.platform,
            slots: hello.slots,
            running: 0,
        };
        if reply.send(Ok(id)).is_err() {
            return;
        }
        log::info!(
            "worker {} joined from {} ({} slot(s), tags [{}], {})",
            info.name,
            fmt_addr(peer),
            info.slots,
            info.tags.iter().cloned().collect::<Vec<_>>().join(","),
            info.platform
        );
        self.notify(ManagerEvent::WorkerJoined(info.clone()));
        self.workers.insert(
            id,
            WorkerEntry {
                info,
                running: HashSet::new(),
                link,
            },
        );
        self.fill(id);
    }

    fn link_closed(&mut self, worker: u64, reason: &str) {
        let Some(w) = self.workers.remove(&worker) else {
            return;
        };
        let lost: Vec<(JobId, Arc<JobSink>)> = lock(&w.link.routes).drain().collect();
        let mut requeued = false;
        for (id, sink) in lost {
            let Some(r) = self.running.remove(&id) else {
                sink.push(JobEvent::Finished(Outcome::WorkerLost));
                continue;
            };
            if r.cancelled {
                sink.push(JobEvent::Finished(Outcome::Cancelled));
            } else if r.attempt <= r.spec.retries && !self.closing {
                log::warn!(
                    "job {id} lost with worker {}; queueing attempt {} of {}",
                    w.info.name,
                    r.attempt + 1,
                    r.spec.retries + 1
                );
                sink.set_producer(None);
                sink.push(JobEvent::Requeued {
                    attempt: r.attempt + 1,
                });
                self.shared.queued.fetch_add(1, Ordering::Relaxed);
                self.queue.push(QueuedJob {
                    id,
                    spec: r.spec,
                    events: sink,
                    attempt: r.attempt + 1,
                    since: Instant::now(),
                });
                requeued = true;
            } else {
                log::warn!("job {id} lost: worker {} went away", w.info.name);
                sink.push(JobEvent::Finished(Outcome::WorkerLost));
            }
        }
        if requeued {
            let ids: Vec<u64> = self.workers.keys().copied().collect();
            for id in ids {
                self.fill(id);
            }
        }
        log::info!("worker {} left: {reason}", w.info.name);
        self.notify(ManagerEvent::WorkerLeft {
            id: worker,
            name: w.info.name.clone(),
            reason: reason.to_string(),
        });
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

    /// Ends what is still running as cancelled, says goodbye to every worker, waits a
    /// little for the links to close, and answers whatever is still in the channel.
    fn finish(mut self, rx: &Receiver<Event>) {
        self.begin_shutdown();
        for w in self.workers.values() {
            let cut: Vec<(JobId, Arc<JobSink>)> = lock(&w.link.routes).drain().collect();
            for (id, sink) in cut {
                let _ = w
                    .link
                    .out
                    .send(Outbound::Message(ManagerMessage::Cancel { job: id }));
                sink.push(JobEvent::Finished(Outcome::Cancelled));
            }
            let _ = w.link.out.send(Outbound::Message(ManagerMessage::Shutdown));
            let _ = w.link.out.send(Outbound::Close);
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn fmt_addr(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "?".into(), |a| a.to_string())
}
