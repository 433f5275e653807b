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
        // Links sent to in this round, held (corked) until its end: the messages one
        // event gives a link (a `Run` and the `Ended` before it) go out in one write.
        let mut corked: Vec<(u64, Outbox<ManagerMessage>)> = Vec::new();
        let mut records = Vec::new();
        while let Some(action) = d.poll_action() {
            match action {
                Action::Send { worker, msg } => {
                    if let Some(l) = self.links.get(&worker) {
                        if !corked.iter().any(|(w, _)| *w == worker) {
                            l.out.cork();
                            corked.push((worker, l.out.clone()));
                        }
                        l.out.send(msg);
                    }
                }
                Action::Attach { worker, sink } => {
                    if let Some(l) = self.links.get(&worker) {
                        sink.set_producer(Some(l.out.clone()));
                    }
                }
                Action::Close { worker } => {
                    if let Some(l) = self.links.get(&worker) {
                        l.out.close();
                        l.live.mark_closed();
                    }
                }
                Action::Cut { worker } => {
                    if let Some(l) = self.links.get(&worker) {
                        l.out.cut();
                    }
                }
                Action::Forget { worker } => {
                    self.links.remove(&worker);
                }
                Action::Notify(ev) => self.subscribers.retain(|s| s.send(ev.clone()).is_ok()),
                Action::Record(r) => records.push(r),
            }
        }
        // Into the journal before the messages go: a job's `Sent` comes before anything
        // its worker can answer (its end is journaled after it).
        if let Some(j) = self.journal.as_ref().filter(|_| !records.is_empty()) {
            j.record(records);
        }
        for (_, out) in corked {
            out.uncork();
        }
    }
}
