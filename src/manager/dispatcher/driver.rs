//! The dispatcher thread: a thin driver around the [`Dispatcher`] state machine. It
//! receives [`Event`]s from one channel (API calls from the [`Manager`] handle, news
//! from link threads), reads the clock once per event, hands the event to the state
//! machine, and carries out its [`Action`]s: messages written to links (which never
//! blocks: a link whose peer stops reading is closed), links closed or cut, subscribers
//! told. The messages one event gives a link go out together, in one write. Between
//! events it sleeps until the state machine's next deadline. It owns what the state
//! machine must not: each link's outbox, and the subscribers.
//!
//! [`Manager`]: crate::Manager

use super::{Action, Dispatcher, LinkEvent, LinkPorts, Registration};
use crate::error::Result;
use crate::job::{JobId, JobStatus};
use crate::journal::Journal;
use crate::link::{Liveness, Outbox};
use crate::manager::ids::IdMap;
use crate::manager::queue::QueuedJob;
use crate::manager::routing::Routes;
use crate::manager::{ManagerEvent, WorkerInfo};
use crate::metrics::Stats;
use crate::protocol::{ManagerMessage, WorkerHello};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a link thread gives the dispatcher at registration.
pub(crate) struct LinkHandle {
    pub out: Outbox<ManagerMessage>,
    pub routes: Arc<Routes>,
    pub live: Arc<Liveness>,
}

/// What the dispatcher thread is sent.
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
    /// News from a registered worker's link.
    Link {
        worker: u64,
        event: LinkEvent,
    },
    Shutdown {
        grace: Duration,
    },
}

/// The driver's own part: what carries out the state machine's actions.
struct Ports {
    links: IdMap<u64, LinkHandle>,
    subscribers: Vec<Sender<ManagerEvent>>,
    journal: Option<Arc<dyn Journal>>,
}

/// Runs the dispatcher until its shutdown is complete, then answers what is left in
/// the channel.
pub(crate) fn run(mut d: Dispatcher, rx: Receiver<Event>, journal: Option<Arc<dyn Journal>>) {
    let mut ports = Ports {
        links: IdMap::default(),
        subscribers: Vec::new(),
        journal,
    };
    while !d.is_done() {
        let ev = match d.next_deadline() {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(t) => rx.recv_deadline(t),
        };
        let now = Instant::now();
        match ev {
            Ok(ev) => {
                ports.handle(&mut d, now, ev);
                // A busy channel never times out: deadlines that passed meanwhile are
                // acted on here (queries do not tick).
                if d.next_deadline().is_some_and(|t| t <= now) {
                    d.tick(now);
                }
            }
            Err(RecvTimeoutError::Timeout) => d.tick(now),
            Err(RecvTimeoutError::Disconnected) => d.abandon(now),
        }
        ports.carry_out(&mut d);
    }
    while let Ok(ev) = rx.try_recv() {
        ports.handle(&mut d, Instant::now(), ev);
        ports.carry_out(&mut d);
    }
}

impl Ports {
    fn handle(&mut self, d: &mut Dispatcher, now: Instant, ev: Event) {
        match ev {
            Event::Submit(job) => d.submit(now, job),
            Event::Cancel { id, reply } => {
                let r = d.cancel(now, id);
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
            }
            Event::Workers(reply) => {
                let _ = reply.send(d.workers());
            }
            Event::Stats(reply) => {
                let _ = reply.send(d.stats(now));
            }
            Event::Jobs { only, reply } => {
                let _ = reply.send(d.jobs(now, only));
            }
            Event::Subscribe(tx) => self.subscribers.push(tx),
            Event::Register {
                hello,
                peer,
                cert,
                link,
                reply,
            } => {
                let ports = LinkPorts {
                    routes: link.routes.clone(),
                    live: link.live.clone(),
                };
                let r = d.register(now, hello, peer, cert, ports);
                let id = r.as_ref().ok().map(|(id, _)| *id);
                if let Some(id) = id {
                    self.links.insert(id, link);
                }
                // The link thread waits for this answer; it is gone only if that thread
                // died, and then the worker's link is as good as closed.
                if reply.send(r).is_err()
                    && let Some(id) = id
                {
                    let event = LinkEvent::Closed {
                        reason: "its link ended before the welcome".into(),
                    };
                    d.on_link(now, id, event);
                }
            }
            Event::Link { worker, event } => d.on_link(now, worker, event),
            Event::Shutdown { grace } => d.shutdown(now, grace),
        }
    }

    fn carry_out(&mut self, d: &mut Dispatcher) {
        let mut ops: Vec<LinkOp> = Vec::new();
        let mut records = Vec::new();
        while let Some(action) = d.poll_action() {
            match action {
                Action::Send { worker, msg } => {
                    if let Some(l) = self.links.get(&worker) {
                        ops.push(LinkOp::Send(worker, l.out.clone(), msg));
                    }
                }
                Action::Attach { worker, sink } => {
                    if let Some(l) = self.links.get(&worker) {
                        ops.push(LinkOp::Attach(l.out.clone(), sink));
                    }
                }
                Action::Close { worker } => {
                    if let Some(l) = self.links.get(&worker) {
                        ops.push(LinkOp::Close(l.out.clone(), l.live.clone()));
                    }
                }
                Action::Cut { worker } => {
                    if let Some(l) = self.links.get(&worker) {
                        ops.push(LinkOp::Cut(l.out.clone()));
                    }
                }
                Action::Forget { worker } => {
                    self.links.remove(&worker);
                }
                Action::Notify(ev) => self.subscribers.retain(|s| s.send(ev.clone()).is_ok()),
                Action::Record(r) => records.push(r),
            }
        }
        // With a journal, what this round does to links waits until its records are
        // durable: a worker is never sent a `Run` whose `Sent` a restart would not know
        // (the restarted manager would queue the job again while the worker runs it).
        // The journal's thread does the rounds' link operations in their order, after
        // their commits; this thread does not wait.
        match &self.journal {
            Some(j) if !ops.is_empty() => {
                // (Done even if the commit failed, a full disk: running jobs go on.)
                j.record_then(records, Some(Box::new(move |_durable| apply(ops))));
            }
            Some(j) if !records.is_empty() => j.record(records),
            _ => apply(ops),
        }
    }
}

/// What a round of the dispatcher does to a link.
enum LinkOp {
    Send(u64, Outbox<ManagerMessage>, ManagerMessage),
    Attach(Outbox<ManagerMessage>, Arc<crate::manager::sink::JobSink>),
    Close(Outbox<ManagerMessage>, Arc<Liveness>),
    Cut(Outbox<ManagerMessage>),
}

/// Does a round's link operations in order. The messages it gives a link are held
/// (corked) until its end, so that they go out together, in one write (a `Run` and the
/// `Ended` before it).
fn apply(ops: Vec<LinkOp>) {
    let mut corked: Vec<(u64, Outbox<ManagerMessage>)> = Vec::new();
    for op in ops {
        match op {
            LinkOp::Send(worker, out, msg) => {
                if !corked.iter().any(|(w, _)| *w == worker) {
                    out.cork();
                    corked.push((worker, out.clone()));
                }
                out.send(msg);
            }
            LinkOp::Attach(out, sink) => sink.set_producer(Some(out)),
            LinkOp::Close(out, live) => {
                out.close();
                live.mark_closed();
            }
            LinkOp::Cut(out) => out.cut(),
        }
    }
    for (_, out) in corked {
        out.uncork();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Record, Then};
    use crate::manager::sink::JobSink;
    use crate::manager::{Counters, JobSpec};
    use crate::sync::lock;
    use crossbeam_channel::{bounded, unbounded};
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    /// A journal whose commits the test makes: what it was given, waiting.
    #[derive(Default)]
    struct Held(Mutex<Vec<(Vec<Record>, Option<Then>)>>);

    impl Held {
        /// Commits everything given so far (durable or failed), in order; the records.
        fn commit(&self, durable: bool) -> Vec<Record> {
            let given: Vec<_> = lock(&self.0).drain(..).collect();
            let mut records = Vec::new();
            for (r, then) in given {
                records.extend(r);
                if let Some(then) = then {
                    then(durable);
                }
            }
            records
        }
    }

    impl Journal for Held {
        fn write(&self, records: Vec<Record>) -> crate::Result<()> {
            lock(&self.0).push((records, None));
            Ok(())
        }
        fn record(&self, records: Vec<Record>) {
            lock(&self.0).push((records, None));
        }
        fn record_then(&self, records: Vec<Record>, then: Option<Then>) {
            lock(&self.0).push((records, then));
        }
        fn size_bytes(&self) -> u64 {
            0
        }
        fn close(&self) {}
    }

    fn runs(out: &Outbox<ManagerMessage>) -> Vec<JobId> {
        out.take_sent()
            .0
            .into_iter()
            .filter_map(|m| match m {
                ManagerMessage::Run { job, .. } => Some(job),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn with_a_journal_a_run_goes_once_its_sent_is_committed_even_a_failed_commit() {
        let journal = Arc::new(Held::default());
        let settings = super::super::Settings {
            reconnect_grace: Duration::from_secs(10),
            max_connections_per_certificate: 4,
            manager_id: 7,
            journaled: true,
        };
        let counters: Arc<Counters> = Arc::default();
        let mut d = Dispatcher::new(settings, Arc::new(AtomicUsize::new(0)), counters.clone());
        let mut ports = Ports {
            links: IdMap::default(),
            subscribers: Vec::new(),
            journal: Some(journal.clone()),
        };
        let now = Instant::now();
        let live = Liveness::new();
        let out = Outbox::detached(live.clone(), crate::link::PENDING_LIMIT);
        let (reply, answer) = bounded(1);
        let hello = WorkerHello {
            name: "w".into(),
            tags: Default::default(),
            platform: "linux-x86_64".into(),
            slots: 2,
            ahead: 0,
            manager_id: None,
            jobs: vec![],
            draining: false,
        };
        let link = LinkHandle {
            out: out.clone(),
            routes: Arc::default(),
            live,
        };
        ports.handle(
            &mut d,
            now,
            Event::Register {
                hello,
                peer: None,
                cert: None,
                link,
                reply,
            },
        );
        ports.carry_out(&mut d);
        answer.try_recv().unwrap().unwrap();
        journal.commit(true);
        let mut submit = |id: u64| {
            let (tx, _rx) = unbounded();
            let job = QueuedJob {
                id: JobId(id),
                spec: JobSpec::new("true"),
                events: JobSink::new(JobId(id), tx, counters.clone()),
                attempt: 1,
                since: now,
            };
            ports.handle(&mut d, now, Event::Submit(job));
            ports.carry_out(&mut d);
        };
        submit(1);
        assert_eq!(runs(&out), vec![], "its `Sent` is not on disk yet");
        let records = journal.commit(true);
        assert!(
            matches!(records[..], [Record::Sent { id: JobId(1), .. }]),
            "{records:?}"
        );
        assert_eq!(runs(&out), vec![JobId(1)], "on disk: it goes");
        // A commit that fails (a full disk) lets the run go all the same: jobs go on.
        submit(2);
        assert_eq!(runs(&out), vec![]);
        journal.commit(false);
        assert_eq!(runs(&out), vec![JobId(2)]);
    }

    /// A journaled dispatcher and its driver's ports, on `journal`.
    fn journaled(journal: &Arc<Held>, counters: &Arc<Counters>) -> (Dispatcher, Ports) {
        let settings = super::super::Settings {
            reconnect_grace: Duration::from_secs(10),
            max_connections_per_certificate: 4,
            manager_id: 7,
            journaled: true,
        };
        let d = Dispatcher::new(settings, Arc::new(AtomicUsize::new(0)), counters.clone());
        let ports = Ports {
            links: IdMap::default(),
            subscribers: Vec::new(),
            journal: Some(journal.clone()),
        };
        (d, ports)
    }

    /// A worker registered on a link of its own.
    struct Joined {
        id: u64,
        resume: Vec<(JobId, u64)>,
        out: Outbox<ManagerMessage>,
        routes: Arc<Routes>,
    }

    /// A worker named "w" registers on a new link.
    fn register(
        d: &mut Dispatcher,
        ports: &mut Ports,
        now: Instant,
        manager_id: Option<u64>,
        jobs: Vec<crate::protocol::HeldJob>,
    ) -> Joined {
        let live = Liveness::new();
        let out = Outbox::detached(live.clone(), crate::link::PENDING_LIMIT);
        let routes: Arc<Routes> = Arc::default();
        let (reply, answer) = bounded(1);
        let hello = WorkerHello {
            name: "w".into(),
            tags: Default::default(),
            platform: "linux-x86_64".into(),
            slots: 2,
            ahead: 0,
            manager_id,
            jobs,
            draining: false,
        };
        let link = LinkHandle {
            out: out.clone(),
            routes: routes.clone(),
            live,
        };
        let event = Event::Register {
            hello,
            peer: None,
            cert: None,
            link,
            reply,
        };
        ports.handle(d, now, event);
        ports.carry_out(d);
        let (id, resume) = answer.try_recv().unwrap().unwrap();
        Joined {
            id,
            resume,
            out,
            routes,
        }
    }

    /// The worker reports `job` finished on its link, as the link's reader does.
    fn reader_finished(
        d: &mut Dispatcher,
        ports: &mut Ports,
        now: Instant,
        counters: &Counters,
        w: &Joined,
        job: JobId,
    ) {
        let (tx, rx) = unbounded();
        let link = crate::manager::routing::Link {
            events: &tx,
            counters,
            worker: w.id,
            label: "worker w",
            routes: &w.routes,
            out: &w.out,
        };
        let msg = crate::protocol::WorkerMessage::Finished {
            job,
            outcome: crate::job::Outcome::Exited(0),
            cleanup_error: None,
        };
        crate::manager::routing::on_worker_message(
            &link,
            &mut crate::manager::routing::Complaints::default(),
            msg,
        )
        .unwrap();
        for ev in rx.try_iter() {
            ports.handle(d, now, ev);
            ports.carry_out(d);
        }
    }

    fn ended(out: &Outbox<ManagerMessage>) -> Vec<JobId> {
        out.take_sent()
            .0
            .into_iter()
            .filter_map(|m| match m {
                ManagerMessage::Ended { job } => Some(job),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_job_that_ended_while_its_worker_was_away_is_acknowledged_on_the_link_it_came_back_on() {
        let journal = Arc::new(Held::default());
        let counters: Arc<Counters> = Arc::default();
        let (mut d, mut ports) = journaled(&journal, &counters);
        let now = Instant::now();
        let first = register(&mut d, &mut ports, now, None, vec![]);
        journal.commit(true);
        let (tx, _rx) = unbounded();
        let sink = JobSink::new(JobId(1), tx, counters.clone());
        sink.journal_to(journal.clone());
        let job = QueuedJob {
            id: JobId(1),
            spec: JobSpec::new("true"),
            events: sink,
            attempt: 1,
            since: now,
        };
        ports.handle(&mut d, now, Event::Submit(job));
        ports.carry_out(&mut d);
        journal.commit(true);
        assert_eq!(runs(&first.out), vec![JobId(1)]);
        // The link drops; the worker keeps the job, which ends meanwhile.
        let closed = super::super::LinkEvent::Closed {
            reason: "cut".into(),
        };
        ports.handle(
            &mut d,
            now,
            Event::Link {
                worker: first.id,
                event: closed,
            },
        );
        ports.carry_out(&mut d);
        journal.commit(true);
        let held = crate::protocol::HeldJob {
            job: JobId(1),
            finished: true,
            ahead: false,
            stdin_taken: 0,
        };
        let back = register(&mut d, &mut ports, now, Some(7), vec![held]);
        assert_eq!(back.resume, vec![(JobId(1), 0)]);
        // Welcomed, the worker sends its `Finished` again at once: its reader hands it on
        // before the round that registered the worker is on disk.
        reader_finished(&mut d, &mut ports, now, &counters, &back, JobId(1));
        journal.commit(true);
        assert_eq!(
            ended(&back.out),
            vec![JobId(1)],
            "the worker forgets the job only once told `Ended` on the link it is on"
        );
        assert_eq!(ended(&first.out), vec![], "not on the link that dropped");
    }

    #[test]
    fn after_a_restart_a_job_that_ended_while_the_manager_was_down_is_acknowledged() {
        let journal = Arc::new(Held::default());
        let counters: Arc<Counters> = Arc::default();
        let (mut d, mut ports) = journaled(&journal, &counters);
        let now = Instant::now();
        // The journal had job 1 sent to "w"; the restarted manager waits for it.
        let (tx, _rx) = unbounded();
        let sink = JobSink::new(JobId(1), tx, counters.clone());
        sink.journal_to(journal.clone());
        let restored = super::super::Restored {
            job: QueuedJob {
                id: JobId(1),
                spec: JobSpec::new("true"),
                events: sink,
                attempt: 1,
                since: now,
            },
            sent_to: Some(("w".into(), None, false)),
        };
        d.restore(now, vec![restored]);
        ports.carry_out(&mut d);
        journal.commit(true);
        let held = crate::protocol::HeldJob {
            job: JobId(1),
            finished: true,
            ahead: false,
            stdin_taken: 0,
        };
        let w = register(&mut d, &mut ports, now, Some(7), vec![held]);
        assert_eq!(w.resume, vec![(JobId(1), 0)]);
        reader_finished(&mut d, &mut ports, now, &counters, &w, JobId(1));
        let records = journal.commit(true);
        assert!(
            records
                .iter()
                .any(|r| matches!(r, Record::Ended { id: JobId(1), .. })),
            "{records:?}"
        );
        assert_eq!(ended(&w.out), vec![JobId(1)]);
    }
}
