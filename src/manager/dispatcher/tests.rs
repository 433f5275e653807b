//! The dispatcher in memory, on a clock the test moves. A [`Rig`] plays the parts
//! around the state machine: the driver (it carries out the actions into in-memory
//! links), the links' readers (worker messages go through the real reader-side routing,
//! `routing::on_worker_message`), and the submitters (each job's events land in a
//! channel the test reads). No socket, no thread, no sleep: every test runs in
//! milliseconds, and time moves only when the test says so.

use super::*;
use crate::job::Stream;
use crate::journal::{self, Journal, MemoryJournal, Retention};
use crate::link::Outbox;
use crate::manager::dispatcher::driver::Event;
use crate::manager::routing::{self, Complaints, Link};
use crate::protocol::{HeldJob, WorkerMessage};
use crossbeam_channel::{Receiver, Sender, unbounded};
use std::collections::HashMap;

const MANAGER_ID: u64 = 0x5eed;
const GRACE: Duration = Duration::from_secs(10);

/// A worker's link as the rig sees it: its route table, and everything queued for it.
struct TestLink {
    routes: Arc<Routes>,
    live: Arc<Liveness>,
    out: Outbox<ManagerMessage>,
    /// Closed cleanly (after a goodbye) or cut by the dispatcher.
    closed: bool,
    cut: bool,
}

struct Rig {
    d: Dispatcher,
    now: Instant,
    queued: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    next_job: u64,
    links: HashMap<u64, TestLink>,
    /// Links the dispatcher has forgotten, kept to look at what they were sent.
    gone: HashMap<u64, TestLink>,
    jobs: HashMap<JobId, Receiver<JobEvent>>,
    notes: Vec<ManagerEvent>,
    /// The channel link readers report on (as to the dispatcher thread).
    reports: (Sender<Event>, Receiver<Event>),
    /// The journal, if the manager keeps one.
    journal: Option<Arc<MemoryJournal>>,
}

fn hello(name: &str, slots: u32) -> WorkerHello {
    WorkerHello {
        name: name.into(),
        tags: BTreeSet::new(),
        platform: "linux-x86_64".into(),
        slots,
        ahead: 0,
        manager_id: None,
        jobs: vec![],
        draining: false,
    }
}

/// A hello of a worker coming back to this manager with `jobs` still held.
fn returning(name: &str, slots: u32, jobs: &[JobId]) -> WorkerHello {
    WorkerHello {
        manager_id: Some(MANAGER_ID),
        jobs: jobs
            .iter()
            .map(|&job| HeldJob {
                job,
                finished: false,
                ahead: false,
                stdin_taken: 0,
            })
            .collect(),
        ..hello(name, slots)
    }
}

fn runs(msgs: &[ManagerMessage]) -> Vec<u64> {
    msgs.iter()
        .filter_map(|m| match m {
            ManagerMessage::Run { job, .. } => Some(job.0),
            _ => None,
        })
        .collect()
}

impl Rig {
    fn new() -> Rig {
        Rig::with(GRACE, 4)
    }

    fn with(reconnect_grace: Duration, max_per_cert: usize) -> Rig {
        let queued = Arc::new(AtomicUsize::new(0));
        let counters: Arc<Counters> = Arc::default();
        let settings = Settings {
            reconnect_grace,
            max_connections_per_certificate: max_per_cert,
            manager_id: MANAGER_ID,
            journaled: false,
        };
        Rig {
            d: Dispatcher::new(settings, queued.clone(), counters.clone()),
            // Any moment will do; the dispatcher never compares it with the real clock.
            now: Instant::now(),
            queued,
            counters,
            next_job: 1,
            links: HashMap::new(),
            gone: HashMap::new(),
            jobs: HashMap::new(),
            notes: Vec::new(),
            reports: unbounded(),
            journal: None,
        }
    }

    /// A manager with a journal (in memory) that it has just created.
    fn journaled() -> Rig {
        let j = Arc::new(MemoryJournal::new(Retention {
            keep_ended_for: Duration::from_secs(3600),
            keep_ended: 100,
        }));
        j.record(vec![Record::ManagerId(MANAGER_ID)]);
        Rig::restarted(j)
    }

    /// A manager started on `j`: the jobs it holds come back, with new sinks (the
    /// test reads their events as before: new channels under the same ids).
    fn restarted(j: Arc<MemoryJournal>) -> Rig {
        j.reopen();
        let recovered = j.recovered();
        assert_eq!(recovered.manager_id, MANAGER_ID, "the journal keeps the id");
        let mut r = Rig::new();
        r.d.settings.journaled = true;
        r.next_job = recovered.next_job;
        let mut restored = Vec::new();
        for open in recovered.open {
            let (tx, rx) = unbounded();
            let sink = JobSink::new(open.id, tx, r.counters.clone());
            sink.journal_to(j.clone());
            r.jobs.insert(open.id, rx);
            let sent_to = open.place.sent_to();
            restored.push(Restored {
                job: QueuedJob {
                    id: open.id,
                    spec: open.spec,
                    events: sink,
                    attempt: open.attempt,
                    since: r.now,
                },
                sent_to,
            });
        }
        r.d.restore(r.now, restored);
        r.journal = Some(j);
        r.pump();
        r
    }

    /// Carries out the dispatcher's actions, as the driver does.
    fn pump(&mut self) {
        while let Some(a) = self.d.poll_action() {
            match a {
                Action::Send { worker, msg } => {
                    self.links[&worker].out.send(msg);
                }
                Action::Attach { worker, sink } => {
                    sink.set_producer(Some(self.links[&worker].out.clone()));
                }
                Action::Close { worker } => {
                    let l = self.links.get_mut(&worker).unwrap();
                    l.out.close();
                    l.closed = true;
                }
                Action::Cut { worker } => self.links.get_mut(&worker).unwrap().cut = true,
                Action::Forget { worker } => {
                    let l = self.links.remove(&worker).expect("forgotten once");
                    self.gone.insert(worker, l);
                }
                Action::Notify(ev) => self.notes.push(ev),
                Action::Record(rec) => {
                    self.journal.as_ref().expect("a journal").record(vec![rec]);
                }
            }
        }
    }

    /// Moves the clock on, and ticks as the driver does when a deadline passes.
    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.d.tick(self.now);
        self.pump();
    }

    fn join_with(
        &mut self,
        hello: WorkerHello,
        cert: Option<&[u8]>,
    ) -> std::result::Result<(u64, Vec<(JobId, u64)>), String> {
        let routes: Arc<Routes> = Arc::default();
        let live = Liveness::new();
        let out = Outbox::detached(live.clone(), crate::link::PENDING_LIMIT);
        let link = LinkPorts {
            routes: routes.clone(),
            live: live.clone(),
        };
        let r = self
            .d
            .register(self.now, hello, None, cert.map(<[u8]>::to_vec), link);
        if let Ok((id, _)) = &r {
            self.links.insert(
                *id,
                TestLink {
                    routes,
                    live,
                    out,
                    closed: false,
                    cut: false,
                },
            );
        }
        self.pump();
        r
    }

    /// A worker joins with `slots` and a certificate of its name.
    fn join(&mut self, name: &str, slots: u32) -> u64 {
        self.join_with(hello(name, slots), Some(name.as_bytes()))
            .expect("accepted")
            .0
    }

    /// A worker joins with `slots` and a look-ahead of `ahead` runs.
    fn join_ahead(&mut self, name: &str, slots: u32, ahead: u32) -> u64 {
        let hello = WorkerHello {
            ahead,
            ..hello(name, slots)
        };
        self.join_with(hello, Some(name.as_bytes()))
            .expect("accepted")
            .0
    }

    /// The runs queued for a worker since the last look, with whether each went ahead.
    fn runs_sent(&mut self, worker: u64) -> Vec<(u64, bool)> {
        self.sent(worker)
            .iter()
            .filter_map(|m| match m {
                ManagerMessage::Run { job, ahead, .. } => Some((job.0, *ahead)),
                _ => None,
            })
            .collect()
    }

    fn submit_spec(&mut self, spec: JobSpec) -> JobId {
        let id = JobId(self.next_job);
        self.next_job += 1;
        // As `Manager::submit` does: the place is reserved before the dispatcher sees it.
        self.queued.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded();
        let sink = JobSink::new(id, tx, self.counters.clone());
        if let Some(j) = &self.journal {
            // As `Manager::submit` does: accepted once it is in the journal.
            j.write(vec![Record::Accepted {
                id,
                spec: spec.clone(),
                submitter: journal::Submitter::Local,
            }])
            .unwrap();
            sink.journal_to(j.clone());
        }
        sink.push(JobEvent::Queued);
        self.jobs.insert(id, rx);
        self.d.submit(
            self.now,
            QueuedJob {
                id,
                spec,
                events: sink,
                attempt: 1,
                since: self.now,
            },
        );
        self.pump();
        id
    }

    fn submit(&mut self) -> JobId {
        self.submit_spec(JobSpec::new("true"))
    }

    /// Messages queued for a worker since the last look (heartbeats are the writer's).
    fn sent(&mut self, worker: u64) -> Vec<ManagerMessage> {
        let link = self
            .links
            .get(&worker)
            .or_else(|| self.gone.get(&worker))
            .expect("a link");
        link.out.take_sent().0
    }

    fn runs(&mut self, worker: u64) -> Vec<u64> {
        runs(&self.sent(worker))
    }

    /// A job's events since the last look.
    fn events(&self, job: JobId) -> Vec<JobEvent> {
        self.jobs[&job].try_iter().collect()
    }

    /// The worker sends `msg`: its link's reader acts on it, and what it reports reaches
    /// the dispatcher, as on a real link.
    fn says(&mut self, worker: u64, msg: WorkerMessage) {
        let routes = self.links[&worker].routes.clone();
        let out = self.links[&worker].out.clone();
        let link = Link {
            events: &self.reports.0,
            counters: &self.counters,
            worker,
            label: "test worker",
            routes: &routes,
            out: &out,
        };
        routing::on_worker_message(&link, &mut Complaints::default(), msg)
            .expect("a message within the protocol");
        while let Ok(ev) = self.reports.1.try_recv() {
            match ev {
                Event::Link { worker, event } => self.d.on_link(self.now, worker, event),
                _ => unreachable!("a reader reports only link events"),
            }
            self.pump();
        }
    }

    fn finished(&mut self, worker: u64, job: JobId, outcome: Outcome) {
        self.says(
            worker,
            WorkerMessage::Finished {
                job,
                outcome,
                cleanup_error: None,
            },
        );
    }

    fn output(&mut self, worker: u64, job: JobId, seq: u64, text: &str) {
        self.says(
            worker,
            WorkerMessage::Output {
                job,
                stream: Stream::Stdout,
                seq,
                bytes: text.as_bytes().to_vec(),
            },
        );
    }

    /// The link closes (its reader ended), as the link thread reports it.
    fn link_lost(&mut self, worker: u64) {
        self.d.on_link(
            self.now,
            worker,
            LinkEvent::Closed {
                reason: "cut".into(),
            },
        );
        self.pump();
    }

    fn state(&self, job: JobId) -> Option<JobState> {
        self.d.jobs(self.now, Some(job)).pop().map(|s| s.state)
    }
}

fn started(on: &str) -> JobEvent {
    JobEvent::Started { worker: on.into() }
}

fn out(text: &str) -> JobEvent {
    JobEvent::Output {
        stream: Stream::Stdout,
        bytes: text.as_bytes().to_vec(),
    }
}

fn finished(o: Outcome) -> JobEvent {
    JobEvent::Finished(o)
}

// ---- the basics ----

#[test]
fn a_job_runs_on_a_free_worker_and_ends_once_with_its_output() {
    let mut r = Rig::new();
    let w = r.join("a", 1);
    let job = r.submit();
    assert_eq!(r.runs(w), vec![job.0]);
    r.output(w, job, 0, "hi\n");
    r.finished(w, job, Outcome::Exited(0));
    assert_eq!(
        r.events(job),
        vec![
            JobEvent::Queued,
            started("a"),
            out("hi\n"),
            finished(Outcome::Exited(0))
        ]
    );
    // A second Finished (or anything else) about it is ignored.
    r.finished(w, job, Outcome::Exited(1));
    assert_eq!(r.events(job), vec![]);
    assert_eq!(r.state(job), None);
    assert_eq!(r.queued.load(Ordering::Relaxed), 0);
    assert_eq!(r.d.next_deadline(), None, "nothing to wake up for");
}

#[test]
fn a_finished_job_is_acknowledged_and_its_slot_refilled_in_the_same_batch() {
    let mut r = Rig::new();
    let w = r.join("a", 1);
    let first = r.submit();
    let second = r.submit();
    assert_eq!(r.runs(w), vec![first.0], "one slot: one job");
    r.finished(w, first, Outcome::Exited(0));
    // `Run` for the next and `Ended` for the first, back to back, so that the link's
    // writer sends them in one write.
    let sent = r.sent(w);
    assert!(
        matches!(
            sent.as_slice(),
            [ManagerMessage::Run { job: b, .. }, ManagerMessage::Ended { job: a }]
                if *a == first && *b == second
        ),
        "{sent:?}"
    );
}

#[test]
fn queued_jobs_start_by_priority_then_in_order_of_submission() {
    let mut r = Rig::new();
    let low = r.submit_spec(JobSpec::new("low").priority(-1));
    let a = r.submit();
    let high = r.submit_spec(JobSpec::new("high").priority(5));
    let b = r.submit();
    let high2 = r.submit_spec(JobSpec::new("high2").priority(5));
    assert_eq!(r.d.queue.len(), 5);
    let w = r.join("w", 1);
    let mut order = r.runs(w);
    for _ in 0..4 {
        let job = JobId(*order.last().unwrap());
        r.finished(w, job, Outcome::Exited(0));
        order.extend(r.runs(w));
    }
    assert_eq!(order, vec![high.0, high2.0, a.0, b.0, low.0]);
}

#[test]
fn a_new_job_goes_to_the_freest_matching_worker_and_ties_go_round() {
    let mut r = Rig::new();
    let two = r.join("two", 2);
    let three = r.join("three", 3);
    let gpu = r
        .join_with(
            WorkerHello {
                tags: ["gpu".to_string()].into(),
                ..hello("gpu", 1)
            },
            Some(b"gpu"),
        )
        .unwrap()
        .0;
    let jobs: Vec<JobId> = (0..5).map(|_| r.submit()).collect();
    // three (3 free), then two and three tie at 2, then at 1 with gpu too.
    let (on_two, on_three, on_gpu) = (r.runs(two), r.runs(three), r.runs(gpu));
    assert_eq!(on_three.len() + on_two.len() + on_gpu.len(), 5);
    assert_eq!(on_three[0], jobs[0].0, "the freest first");
    assert_eq!(
        (on_two.len(), on_three.len()),
        (2, 2),
        "{on_two:?} {on_three:?}"
    );
    assert_eq!(on_gpu.len(), 1);
    // A job that needs the tag waits for the tagged worker.
    let needs = r.submit_spec(JobSpec::new("x").require_tag("gpu"));
    assert_eq!(r.d.queue.len(), 1);
    r.finished(two, JobId(on_two[0]), Outcome::Exited(0));
    assert_eq!(r.runs(two), Vec::<u64>::new(), "not for this worker");
    r.finished(gpu, JobId(on_gpu[0]), Outcome::Exited(0));
    assert_eq!(r.runs(gpu), vec![needs.0]);
}

// ---- reconnecting ----

#[test]
fn a_worker_that_comes_back_within_the_grace_goes_on_with_its_jobs_from_the_next_seq() {
    let mut r = Rig::new();
    let w = r.join("a", 2);
    let (j1, j2) = (r.submit(), r.submit());
    assert_eq!(r.runs(w), vec![j1.0, j2.0]);
    for (seq, text) in ["one\n", "two\n", "three\n"].iter().enumerate() {
        r.output(w, j1, seq as u64, text);
    }
    r.output(w, j2, 0, "other\n");
    r.link_lost(w);
    assert!(matches!(
        r.state(j1),
        Some(JobState::Disconnected { worker }) if worker == "a"
    ));
    assert_eq!(r.d.next_deadline(), Some(r.now + GRACE));
    assert!(matches!(
        r.notes.last(),
        Some(ManagerEvent::WorkerLeft { name, .. }) if name == "a"
    ));
    // Nearly the whole grace passes: nothing ends.
    r.advance(GRACE - Duration::from_millis(1));
    assert_eq!(r.d.stats(r.now).jobs_disconnected, 2);
    let (again, resume) = r
        .join_with(returning("a", 2, &[j1, j2]), Some(b"a"))
        .expect("the same worker is let in");
    let mut resume = resume;
    resume.sort();
    assert_eq!(
        resume,
        vec![(j1, 3), (j2, 1)],
        "the next seq expected per job"
    );
    assert_eq!(r.d.next_deadline(), None, "no grace runs any more");
    assert!(matches!(r.state(j1), Some(JobState::Running { worker }) if worker == "a"));
    // What it sends again from before the cut is taken once; the rest goes on.
    r.output(again, j1, 2, "three\n");
    r.output(again, j1, 3, "four\n");
    r.finished(again, j1, Outcome::Exited(0));
    r.finished(again, j2, Outcome::Exited(3));
    let e1 = r.events(j1);
    assert_eq!(
        e1,
        vec![
            JobEvent::Queued,
            started("a"),
            out("one\n"),
            out("two\n"),
            out("three\n"),
            out("four\n"),
            finished(Outcome::Exited(0))
        ]
    );
    assert_eq!(r.events(j2).last(), Some(&finished(Outcome::Exited(3))));
    // Its slots are its own again: both run new work.
    let (a, b) = (r.submit(), r.submit());
    let mut got = r.runs(again);
    got.retain(|j| *j == a.0 || *j == b.0);
    assert_eq!(got, vec![a.0, b.0]);
}

#[test]
fn a_worker_that_comes_back_without_a_job_or_from_another_manager_has_it_settled() {
    // Its hello names this manager: it holds every run it got and was not told ended,
    // so the one it does not list never reached it (lost with the link). It is queued
    // again, the same attempt, and runs once.
    let mut r = Rig::new();
    let w = r.join("a", 2);
    let (kept, forgotten) = (r.submit(), r.submit());
    r.link_lost(w);
    let (again, resume) = r.join_with(returning("a", 2, &[kept]), Some(b"a")).unwrap();
    assert_eq!(resume, vec![(kept, 0)]);
    assert_eq!(r.runs(again), vec![forgotten.0]);
    assert_eq!(
        r.events(forgotten),
        vec![
            JobEvent::Queued,
            started("a"),
            JobEvent::Requeued { attempt: 1 },
            started("a")
        ]
    );
    assert_eq!(r.d.jobs(r.now, Some(forgotten))[0].attempt, 1);
    // One that gave its runs up after its own grace names no manager: a job it does
    // not list may have run (it may have killed it), and is not run again.
    let mut r = Rig::new();
    let w = r.join("a", 2);
    let (kept, lost) = (r.submit(), r.submit());
    r.link_lost(w);
    let gave_up = WorkerHello {
        manager_id: None,
        ..returning("a", 2, &[kept])
    };
    let (again, resume) = r.join_with(gave_up, Some(b"a")).unwrap();
    assert_eq!(resume, vec![]);
    assert_eq!(r.runs(again), vec![]);
    assert_eq!(r.events(lost).last(), Some(&finished(Outcome::WorkerLost)));
    assert_eq!(r.events(kept).last(), Some(&finished(Outcome::WorkerLost)));
    // A worker that restarted (no manager id, or another one) holds none of ours.
    let mut r = Rig::new();
    let w = r.join("b", 1);
    let job = r.submit();
    r.link_lost(w);
    let other = WorkerHello {
        manager_id: Some(MANAGER_ID + 1),
        ..returning("b", 1, &[job])
    };
    let (again, resume) = r.join_with(other, Some(b"b")).unwrap();
    assert_eq!(resume, vec![]);
    assert_eq!(r.events(job).last(), Some(&finished(Outcome::WorkerLost)));
    // And its slot is free for new work.
    let next = r.submit();
    assert_eq!(r.runs(again), vec![next.0]);
}

#[test]
fn when_the_grace_runs_out_the_jobs_end_worker_lost() {
    let mut r = Rig::new();
    let w = r.join("a", 1);
    let job = r.submit();
    r.link_lost(w);
    r.advance(GRACE - Duration::from_millis(1));
    assert_eq!(r.events(job), vec![JobEvent::Queued, started("a")]);
    r.advance(Duration::from_millis(1));
    assert_eq!(r.events(job), vec![finished(Outcome::WorkerLost)]);
    assert_eq!(r.state(job), None);
    assert_eq!(r.d.next_deadline(), None);
    // The worker coming back later is a stranger to the job: nothing to resume.
    let (_, resume) = r.join_with(returning("a", 1, &[job]), Some(b"a")).unwrap();
    assert_eq!(resume, vec![]);
    assert_eq!(r.events(job), vec![], "ended once");
}

#[test]
fn a_grace_stretched_with_the_heartbeats_is_waited_out_in_full() {
    // The link announced a grace 20 s longer than the configured one (many workers
    // stretched the heartbeats): the worker gives its jobs up by that grace less the
    // timeout it was told, so the manager waits all of it.
    let mut r = Rig::new();
    let w = r.join("a", 1);
    let job = r.submit();
    r.links[&w].live.note_stretch(Duration::from_secs(20));
    r.link_lost(w);
    r.advance(GRACE);
    assert_eq!(r.events(job), vec![JobEvent::Queued, started("a")]);
    r.advance(Duration::from_secs(20) - Duration::from_millis(1));
    assert_eq!(r.events(job), vec![], "still waiting");
    r.advance(Duration::from_millis(1));
    assert_eq!(r.events(job), vec![finished(Outcome::WorkerLost)]);
}

#[test]
fn when_the_grace_runs_out_a_job_with_retries_runs_again_elsewhere() {
    let mut r = Rig::new();
    let a = r.join("a", 1);
    let job = r.submit_spec(JobSpec::new("x").retries(1));
    assert_eq!(r.runs(a), vec![job.0]);
    r.output(a, job, 0, "first try\n");
    r.link_lost(a);
    let b = r.join("b", 1);
    assert_eq!(r.runs(b), vec![], "still waiting for its worker");
    r.advance(GRACE);
    assert_eq!(r.runs(b), vec![job.0], "queued again and started at once");
    assert!(matches!(r.state(job), Some(JobState::Running { worker }) if worker == "b"));
    assert_eq!(r.d.jobs(r.now, Some(job))[0].attempt, 2);
    r.output(b, job, 0, "second try\n");
    r.finished(b, job, Outcome::Exited(0));
    assert_eq!(
        r.events(job),
        vec![
            JobEvent::Queued,
            started("a"),
            out("first try\n"),
            JobEvent::Requeued { attempt: 2 },
            started("b"),
            out("second try\n"),
            finished(Outcome::Exited(0)),
        ]
    );
}

#[test]
fn a_worker_that_says_goodbye_or_a_zero_grace_ends_its_jobs_at_once() {
    let mut r = Rig::new();
    let w = r.join("a", 2);
    let (plain, retried) = (r.submit(), r.submit_spec(JobSpec::new("x").retries(2)));
    r.says(w, WorkerMessage::Goodbye);
    r.link_lost(w);
    assert_eq!(r.events(plain).last(), Some(&finished(Outcome::WorkerLost)));
    assert_eq!(
        r.events(retried).last(),
        Some(&JobEvent::Requeued { attempt: 2 })
    );
    assert_eq!(r.d.next_deadline(), None, "nothing waits for it");
    let b = r.join("b", 1);
    assert_eq!(r.runs(b), vec![retried.0]);
    // Without a grace, a lost link is the end too.
    let mut r = Rig::with(Duration::ZERO, 4);
    let w = r.join("a", 1);
    let job = r.submit();
    r.link_lost(w);
    assert_eq!(r.events(job).last(), Some(&finished(Outcome::WorkerLost)));
}

#[test]
fn a_name_stays_bound_to_its_certificate_while_its_worker_is_away() {
    let mut r = Rig::new();
    let w = r.join("a", 1);
    let job = r.submit();
    r.link_lost(w);
    r.advance(Duration::from_secs(4));
    let why = r
        .join_with(returning("a", 1, &[job]), Some(b"impostor"))
        .expect_err("another certificate is refused the name");
    assert!(
        why.contains("held for another certificate for 6.0 s more"),
        "{why}"
    );
    assert_eq!(r.d.stats(r.now).jobs_disconnected, 1, "and takes nothing");
    // Without jobs the name is held just the same.
    let idle = r.join("idle", 1);
    r.link_lost(idle);
    assert!(r.join_with(hello("idle", 1), Some(b"other")).is_err());
    // The rightful worker is let in under it.
    let (_, resume) = r.join_with(returning("a", 1, &[job]), Some(b"a")).unwrap();
    assert_eq!(resume, vec![(job, 0)]);
    // Once the grace has passed, the name is free for anyone.
    r.advance(GRACE);
    assert!(r.join_with(hello("idle", 1), Some(b"other")).is_ok());
}

#[test]
fn a_second_connection_of_a_connected_worker_replaces_the_first() {
    let mut r = Rig::new();
    let first = r.join("a", 1);
    let job = r.submit();
    // The same certificate reconnects before its old link was found dead.
    let (second, resume) = r.join_with(returning("a", 1, &[job]), Some(b"a")).unwrap();
    assert_ne!(first, second);
    assert!(r.gone[&first].cut, "the old connection is cut");
    assert_eq!(resume, vec![(job, 0)]);
    r.finished(second, job, Outcome::Exited(0));
    assert_eq!(r.events(job).last(), Some(&finished(Outcome::Exited(0))));
    // Another certificate under a connected name is refused.
    let why = r.join_with(hello("a", 1), Some(b"b")).err().unwrap();
    assert!(why.contains("already connected"), "{why}");
}

// ---- draining and declining ----

#[test]
fn a_draining_worker_finishes_its_jobs_and_is_given_no_new_ones() {
    let mut r = Rig::new();
    let a = r.join("a", 2);
    let running = r.submit();
    assert_eq!(r.runs(a), vec![running.0]);
    r.says(a, WorkerMessage::Draining);
    assert!(r.d.workers()[0].draining);
    let waiting = r.submit();
    assert_eq!(r.runs(a), vec![], "it has a free slot, but drains");
    assert_eq!(r.d.queue.len(), 1);
    r.finished(a, running, Outcome::Exited(0));
    assert_eq!(
        r.events(running).last(),
        Some(&finished(Outcome::Exited(0)))
    );
    assert_eq!(r.runs(a), vec![], "not even when its job ends");
    let b = r.join("b", 1);
    assert_eq!(r.runs(b), vec![waiting.0]);
    // It leaves; reconnecting while draining, it still gets nothing.
    r.says(a, WorkerMessage::Goodbye);
    r.link_lost(a);
    let again = r
        .join_with(
            WorkerHello {
                draining: true,
                ..hello("a", 2)
            },
            Some(b"a"),
        )
        .unwrap()
        .0;
    r.submit();
    assert_eq!(r.runs(again), vec![]);
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

fn decline(r: &mut Rig, worker: u64, job: JobId) {
    r.says(
        worker,
        WorkerMessage::Declined {
            job,
            reason: "no free slot".into(),
        },
    );
}

#[test]
fn a_worker_that_declines_is_offered_nothing_until_its_rest_ends_and_the_job_goes_elsewhere() {
    let mut r = Rig::new();
    let a = r.join("a", 1);
    let job = r.submit();
    assert_eq!(r.runs(a), vec![job.0]);
    let mut rest = DECLINE_REST_MIN;
    let mut sent = 1;
    for _ in 0..10 {
        decline(&mut r, a, job);
        assert_eq!(r.d.next_deadline(), Some(r.now + rest));
        // Not sent back at once, nor at any moment of the rest.
        assert_eq!(r.runs(a), Vec::<u64>::new());
        r.advance(rest - Duration::from_millis(1));
        assert_eq!(r.runs(a), Vec::<u64>::new());
        assert_eq!(r.d.queue.len(), 1);
        // At its end the job is offered again, once.
        r.advance(Duration::from_millis(1));
        assert_eq!(r.runs(a), vec![job.0]);
        sent += 1;
        rest = (rest * 2).min(DECLINE_REST_MAX);
    }
    assert_eq!(sent, 11, "one Run per decline, none in between");
    let events = r.events(job);
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, JobEvent::Requeued { attempt: 1 }))
            .count(),
        10,
        "a decline is not an attempt: {events:?}"
    );
    // Another worker joins while `a` rests: the declined job goes there at once.
    decline(&mut r, a, job);
    let c = r.join("c", 1);
    assert_eq!(r.runs(c), vec![job.0]);
    // New jobs go to `c` or wait; none to `a` while it rests.
    let second = r.submit();
    assert_eq!(r.runs(a), Vec::<u64>::new());
    assert_eq!(r.d.queue.len(), 1);
    // A job that ends on `c` frees it for the waiting one.
    r.finished(c, job, Outcome::Exited(0));
    assert_eq!(r.runs(c), vec![second.0]);
    // Once `a` has run a job to its end, its next decline rests the shortest time.
    r.advance(DECLINE_REST_MAX);
    let third = r.submit();
    assert_eq!(r.runs(a), vec![third.0]);
    r.finished(a, third, Outcome::Exited(0));
    let fourth = r.submit();
    assert_eq!(r.runs(a), vec![fourth.0]);
    decline(&mut r, a, fourth);
    r.advance(DECLINE_REST_MIN);
    assert_eq!(r.runs(a), vec![fourth.0]);
}

// ---- cancelling ----

#[test]
fn a_cancelled_queued_job_ends_at_once_and_never_starts() {
    let mut r = Rig::new();
    let job = r.submit();
    assert_eq!(r.queued.load(Ordering::Relaxed), 1);
    r.d.cancel(r.now, job).unwrap();
    assert_eq!(
        r.events(job),
        vec![JobEvent::Queued, finished(Outcome::Cancelled)]
    );
    assert_eq!(r.queued.load(Ordering::Relaxed), 0);
    let w = r.join("a", 1);
    assert_eq!(r.runs(w), vec![]);
    assert!(matches!(
        r.d.cancel(r.now, job),
        Err(Error::UnknownJob(n)) if n == job.0
    ));
}

#[test]
fn a_cancelled_running_job_is_stopped_by_its_worker_and_ends_once() {
    let mut r = Rig::new();
    let w = r.join("a", 1);
    let job = r.submit_spec(JobSpec::new("sleep 100").retries(3));
    r.sent(w);
    r.d.cancel(r.now, job).unwrap();
    r.pump();
    assert_eq!(r.sent(w), vec![ManagerMessage::Cancel { job }]);
    // It ends when the worker says so.
    assert!(r.state(job).is_some());
    r.finished(w, job, Outcome::Cancelled);
    assert_eq!(r.events(job).last(), Some(&finished(Outcome::Cancelled)));
    // A cancelled job whose worker goes is not retried.
    let job = r.submit_spec(JobSpec::new("sleep 100").retries(3));
    r.d.cancel(r.now, job).unwrap();
    r.pump();
    r.says(w, WorkerMessage::Goodbye);
    r.link_lost(w);
    assert_eq!(r.events(job).last(), Some(&finished(Outcome::Cancelled)));
    assert_eq!(r.d.queue.len(), 0);
}

#[test]
fn a_cancelled_job_of_a_worker_that_is_away_ends_at_once_and_is_not_resumed() {
    let mut r = Rig::new();
    let w = r.join("a", 2);
    let (cancelled, kept) = (r.submit(), r.submit());
    r.link_lost(w);
    r.d.cancel(r.now, cancelled).unwrap();
    assert_eq!(
        r.events(cancelled).last(),
        Some(&finished(Outcome::Cancelled))
    );
    let (again, resume) = r
        .join_with(returning("a", 2, &[cancelled, kept]), Some(b"a"))
        .unwrap();
    assert_eq!(resume, vec![(kept, 0)], "the worker is to drop the other");
    r.finished(again, cancelled, Outcome::Exited(0));
    assert_eq!(r.events(cancelled), vec![], "ended once");
}

#[test]
fn a_job_cancelled_while_its_worker_replaces_its_connection_is_cancelled_on_the_new_one() {
    let mut r = Rig::new();
    let first = r.join("a", 1);
    let job = r.submit();
    r.d.cancel(r.now, job).unwrap();
    r.pump();
    assert_eq!(r.runs(first), vec![job.0]);
    // The old link dies before the worker acted on the Cancel; it comes back at once.
    let (second, resume) = r.join_with(returning("a", 1, &[job]), Some(b"a")).unwrap();
    assert_eq!(resume, vec![(job, 0)]);
    assert_eq!(r.sent(second), vec![ManagerMessage::Cancel { job }]);
}

// ---- shutdown ----

#[test]
fn shutdown_refuses_queued_jobs_lets_running_ones_use_the_grace_and_cancels_the_rest() {
    let mut r = Rig::new();
    let w = r.join("a", 2);
    let (quick, slow, queued) = (r.submit(), r.submit(), r.submit());
    r.sent(w);
    let grace = Duration::from_secs(30);
    r.d.shutdown(r.now, grace);
    r.pump();
    assert_eq!(
        r.events(queued).last(),
        Some(&finished(Outcome::Rejected(SHUTTING_DOWN.into())))
    );
    assert_eq!(r.queued.load(Ordering::Relaxed), 0);
    // Nothing new is taken meanwhile.
    let late = r.submit();
    assert_eq!(
        r.events(late).last(),
        Some(&finished(Outcome::Rejected(SHUTTING_DOWN.into())))
    );
    let why = r.join_with(hello("b", 1), Some(b"b")).err().unwrap();
    assert_eq!(why, SHUTTING_DOWN);
    // A job that ends within the grace ends as it would have.
    r.advance(Duration::from_secs(1));
    r.finished(w, quick, Outcome::Exited(0));
    assert_eq!(r.events(quick).last(), Some(&finished(Outcome::Exited(0))));
    assert_eq!(
        r.d.next_deadline(),
        Some(r.now + grace - Duration::from_secs(1))
    );
    r.advance(grace - Duration::from_secs(1) - Duration::from_millis(1));
    assert!(!r.links[&w].closed);
    assert_eq!(r.events(slow), vec![JobEvent::Queued, started("a")]);
    // At the end of the grace the rest is cancelled and the worker told goodbye.
    r.advance(Duration::from_millis(1));
    assert_eq!(r.events(slow), vec![finished(Outcome::Cancelled)]);
    let sent = r.sent(w);
    assert_eq!(
        sent,
        vec![
            ManagerMessage::Ended { job: quick },
            ManagerMessage::Cancel { job: slow },
            ManagerMessage::Shutdown
        ]
    );
    assert!(r.links[&w].closed);
    assert!(!r.d.is_done(), "waits for the link to close");
    // Late news of the cancelled job changes nothing.
    r.finished(w, slow, Outcome::Cancelled);
    assert_eq!(r.events(slow), vec![]);
    r.link_lost(w);
    assert!(r.d.is_done());
    assert!(!r.gone[&w].cut, "it closed by itself");
}

#[test]
fn shutdown_ends_at_once_when_nothing_runs_and_cuts_links_that_do_not_close() {
    let mut r = Rig::new();
    let w = r.join("a", 1);
    r.d.shutdown(r.now, Duration::from_secs(60));
    r.pump();
    assert_eq!(r.sent(w), vec![ManagerMessage::Shutdown]);
    assert!(r.links[&w].closed);
    assert_eq!(r.d.next_deadline(), Some(r.now + LINK_CLOSE_WAIT));
    r.advance(LINK_CLOSE_WAIT);
    assert!(r.links[&w].cut);
    assert!(r.d.is_done());
}

#[test]
fn shutdown_ends_jobs_of_workers_that_are_away_as_lost() {
    let mut r = Rig::new();
    let w = r.join("a", 1);
    let job = r.submit();
    r.link_lost(w);
    r.d.shutdown(r.now, Duration::from_secs(1));
    r.pump();
    assert_eq!(r.state(job).map(|_| ()), Some(()), "waits within the grace");
    r.advance(Duration::from_secs(1));
    assert_eq!(r.events(job).last(), Some(&finished(Outcome::WorkerLost)));
    assert!(r.d.is_done(), "no link left to wait for");
}

#[test]
fn with_no_one_left_to_send_anything_the_dispatcher_ends_everything_at_once() {
    let mut r = Rig::new();
    let w = r.join("a", 1);
    let job = r.submit();
    r.d.abandon(r.now);
    r.pump();
    assert_eq!(r.events(job).last(), Some(&finished(Outcome::Cancelled)));
    assert!(r.links[&w].closed && r.links[&w].cut);
    assert!(r.d.is_done());
}

// ---- registration rules and numbers ----

#[test]
fn one_certificate_holds_a_bounded_number_of_connections() {
    let mut r = Rig::with(GRACE, 2);
    let first = r.join_with(hello("one", 1), Some(b"shared")).unwrap().0;
    r.join_with(hello("two", 1), Some(b"shared")).unwrap();
    let refused = r
        .join_with(hello("three", 1), Some(b"shared"))
        .expect_err("refused");
    assert!(
        refused.contains("already holds 2 connection(s)")
            && refused.contains("max_connections_per_certificate = 2"),
        "{refused}"
    );
    // The same worker reconnecting replaces its old connection: not one more.
    let again = r.join_with(hello("one", 1), Some(b"shared")).unwrap().0;
    assert_ne!(again, first);
    assert_eq!(r.d.workers.len(), 2);
    // Other certificates are counted on their own.
    assert!(r.join_with(hello("four", 1), Some(b"other")).is_ok());
    // When a connection closes, its place is free again.
    r.link_lost(again);
    assert!(r.join_with(hello("three", 1), Some(b"shared")).is_ok());
    // Without certificates (plaintext) there is nothing to count.
    let mut r = Rig::with(GRACE, 1);
    for i in 0..5 {
        assert!(r.join_with(hello(&format!("p{i}"), 1), None).is_ok());
    }
}

#[test]
fn a_hello_with_control_characters_or_no_slots_is_refused() {
    let mut r = Rig::new();
    for name in ["evil\nworker x joined", "\u{1b}[2Jw", "w\u{202e}"] {
        let why = r
            .join_with(hello(name, 1), Some(b"c"))
            .expect_err("refused");
        assert!(why.contains("control or invisible"), "{why}");
        assert!(!why.chars().any(char::is_control), "{why:?}");
    }
    for slots in [0, MAX_SLOTS + 1] {
        let why = r.join_with(hello("w", slots), Some(b"c")).err().unwrap();
        assert!(why.contains("1 to 1024 slots"), "{why}");
    }
    assert!(r.d.workers.is_empty());
}

#[test]
fn statuses_and_numbers_are_as_at_the_time_given() {
    let mut r = Rig::new();
    let queued = r.submit();
    r.advance(Duration::from_secs(3));
    let w = r.join("a", 1);
    r.advance(Duration::from_secs(2));
    let s = r.d.jobs(r.now, None);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].since, Duration::from_secs(2), "running for 2 s");
    let st = r.d.stats(r.now);
    assert_eq!((st.workers, st.slots_total, st.slots_busy), (1, 1, 1));
    assert_eq!(st.per_worker[0].connected_for, Duration::from_secs(2));
    assert_eq!(st.queue_wait.count, 1);
    assert_eq!(st.queue_wait.sum, 3.0, "it waited 3 s for a worker");
    let waiting = r.submit();
    r.advance(Duration::from_secs(7));
    let st = r.d.stats(r.now);
    assert_eq!(st.oldest_queued_wait, Some(Duration::from_secs(7)));
    assert_eq!(st.jobs_queued, 1);
    r.finished(w, queued, Outcome::Exited(0));
    assert_eq!(r.runs(w), vec![queued.0, waiting.0]);
    assert_eq!(r.d.stats(r.now).jobs_queued, 0);
}

// ---- runs sent ahead of the slots ----

fn declined_revoked(job: JobId) -> WorkerMessage {
    WorkerMessage::Declined {
        job,
        reason: "revoked".into(),
    }
}

#[test]
fn trivial_jobs_on_one_slot_never_wait_a_round_trip() {
    let mut r = Rig::new();
    let w = r.join_ahead("a", 1, 1);
    let jobs: Vec<JobId> = (0..10).map(|_| r.submit()).collect();
    // One into the slot, the next ahead of it; the rest queued.
    assert_eq!(r.runs_sent(w), vec![(jobs[0].0, false), (jobs[1].0, true)]);
    assert_eq!(
        r.state(jobs[1]),
        Some(JobState::Queued),
        "held: still queued"
    );
    assert_eq!(r.events(jobs[1]), vec![JobEvent::Queued]);
    let stats = r.d.stats(r.now);
    assert_eq!((stats.jobs_queued, stats.jobs_running), (9, 1));
    for i in 0..jobs.len() {
        // The held run starts as the job ends: `Started` comes before `Finished`.
        if i + 1 < jobs.len() {
            r.says(w, WorkerMessage::Started { job: jobs[i + 1] });
            assert!(
                matches!(r.state(jobs[i + 1]), Some(JobState::Running { worker }) if worker == "a")
            );
        }
        r.finished(w, jobs[i], Outcome::Exited(0));
        // The answer: the next run ahead, and the acknowledgement. At no point does
        // the worker's slot wait for a `Run`: it always holds the next one.
        let sent = r.sent(w);
        let expected: Vec<ManagerMessage> = jobs
            .get(i + 2)
            .map(|&job| ManagerMessage::Run {
                job,
                spec: JobSpec::new("true"),
                ahead: true,
            })
            .into_iter()
            .chain([ManagerMessage::Ended { job: jobs[i] }])
            .collect();
        assert_eq!(sent, expected, "after job {i}");
    }
    for (i, &job) in jobs.iter().enumerate() {
        // (The second job's `Queued` was read above.)
        let queued = if i == 1 { None } else { Some(JobEvent::Queued) };
        let expected: Vec<JobEvent> = queued
            .into_iter()
            .chain([started("a"), finished(Outcome::Exited(0))])
            .collect();
        assert_eq!(r.events(job), expected, "job {i} starts and ends once");
    }
    assert_eq!(r.queued.load(Ordering::Relaxed), 0);
    let stats = r.d.stats(r.now);
    assert_eq!((stats.jobs_queued, stats.jobs_running), (0, 0));
    assert_eq!(stats.per_worker[0].jobs_run, 10);
}

#[test]
fn a_held_run_takes_the_slot_that_frees_even_before_its_started_arrives() {
    // The held run reached the worker after its slot freed: the worker started it at
    // once, and its `Started` comes after the last job's `Finished`. Meanwhile the
    // manager must not count that slot as free (a `Run` into it would be declined).
    let mut r = Rig::new();
    let w = r.join_ahead("a", 1, 1);
    let (first, held, third) = (r.submit(), r.submit(), r.submit());
    r.sent(w);
    r.finished(w, first, Outcome::Exited(0));
    assert_eq!(
        r.runs_sent(w),
        vec![(third.0, true)],
        "ahead, not into the slot"
    );
    assert_eq!(r.d.workers()[0].running, 0);
    assert_eq!(r.state(held), Some(JobState::Queued));
    r.says(w, WorkerMessage::Started { job: held });
    assert!(matches!(r.state(held), Some(JobState::Running { worker }) if worker == "a"));
    assert_eq!(r.d.workers()[0].running, 1);
    assert_eq!(r.runs_sent(w), vec![], "no room: it holds the third");
}

#[test]
fn runs_go_ahead_only_when_no_matching_worker_has_a_free_slot() {
    let mut r = Rig::new();
    let a = r.join_ahead("a", 1, 1);
    let first = r.submit();
    assert_eq!(r.runs_sent(a), vec![(first.0, false)]);
    let b = r.join_ahead("b", 1, 1);
    let second = r.submit();
    assert_eq!(
        r.runs_sent(b),
        vec![(second.0, false)],
        "b's free slot first"
    );
    assert_eq!(r.runs_sent(a), vec![]);
    // Both busy: ahead, in turn; then queued.
    let (third, fourth, fifth) = (r.submit(), r.submit(), r.submit());
    let mut ahead = r.runs_sent(a);
    ahead.extend(r.runs_sent(b));
    ahead.sort();
    assert_eq!(ahead, vec![(third.0, true), (fourth.0, true)]);
    assert_eq!(r.state(fifth), Some(JobState::Queued));
    assert_eq!(r.d.queue.len(), 1);
    // A worker with no look-ahead gets only free slots.
    let mut r = Rig::new();
    let w = r.join_ahead("c", 1, 0);
    let (one, _two) = (r.submit(), r.submit());
    assert_eq!(r.runs_sent(w), vec![(one.0, false)]);
    assert_eq!(r.d.queue.len(), 1);
}

#[test]
fn a_held_run_moves_to_a_worker_that_frees_first() {
    let mut r = Rig::new();
    let a = r.join_ahead("a", 1, 1);
    let long = r.submit();
    let held = r.submit();
    assert_eq!(r.runs_sent(a), vec![(long.0, false), (held.0, true)]);
    // Another worker comes with a free slot the queue cannot fill: the run held behind
    // the long job is taken back for it.
    r.advance(Duration::from_millis(5));
    let b = r.join_ahead("b", 1, 1);
    assert_eq!(r.sent(a), vec![ManagerMessage::Revoke { job: held }]);
    assert_eq!(r.runs_sent(b), vec![]);
    r.says(a, declined_revoked(held));
    assert_eq!(r.runs_sent(b), vec![(held.0, false)], "into b's free slot");
    assert_eq!(r.events(held), vec![JobEvent::Queued, started("b")]);
    assert_eq!(r.d.jobs(r.now, Some(held))[0].attempt, 1, "no retry used");
    // The worker that gave it back is not resting: it has room ahead again.
    assert!(!r.d.rests.resting(a, r.now));
    assert_eq!(
        r.d.with_room.iter().copied().collect::<Vec<_>>(),
        vec![a, b]
    );
    let next = r.submit();
    assert_eq!(r.runs_sent(b), vec![(next.0, true)], "the rotation's turn");
    // b's job ends and it starts the run it held: a holds nothing to take back.
    r.says(b, WorkerMessage::Started { job: next });
    r.finished(b, held, Outcome::Exited(0));
    assert_eq!(r.sent(a), vec![]);
}

#[test]
fn a_held_run_comes_out_from_behind_a_long_job_and_even_jobs_revoke_nothing() {
    let mut r = Rig::new();
    let a = r.join_ahead("a", 1, 1);
    let b = r.join_ahead("b", 1, 1);
    let t0 = r.now;
    let long = r.submit();
    let s1 = r.submit();
    let (behind_long, behind_s1) = (r.submit(), r.submit());
    assert_eq!(r.runs_sent(a), vec![(long.0, false), (behind_long.0, true)]);
    assert_eq!(r.runs_sent(b), vec![(s1.0, false), (behind_s1.0, true)]);
    // s1 ends after 10 ms and b starts what it held. The run behind the long job has
    // waited as long as s1 ran, not longer: nothing is taken back.
    r.advance(Duration::from_millis(10));
    r.says(b, WorkerMessage::Started { job: behind_s1 });
    r.finished(b, s1, Outcome::Exited(0));
    assert_eq!(r.sent(a), vec![]);
    // A new short job goes ahead on b (a has no room).
    let s3 = r.submit();
    assert_eq!(r.runs_sent(b), vec![(s3.0, true)]);
    // A job submitted now waits in the queue: nobody has room.
    let queued = r.submit();
    assert_eq!(r.state(queued), Some(JobState::Queued));
    assert_eq!(r.d.queue.len(), 1);
    // 10 ms later b's job ends again: the run behind the long job has now waited
    // 20 ms, longer than that job ran: it is taken back for the room b has again, before
    // the younger queued job.
    r.advance(Duration::from_millis(10));
    r.says(b, WorkerMessage::Started { job: s3 });
    r.finished(b, behind_s1, Outcome::Exited(0));
    assert_eq!(r.sent(a), vec![ManagerMessage::Revoke { job: behind_long }]);
    assert_eq!(r.runs_sent(b), vec![], "b's room is kept for it");
    r.says(a, declined_revoked(behind_long));
    assert_eq!(r.runs_sent(b), vec![(behind_long.0, true)], "now behind s3");
    // The queued job takes the room it left (a waits on no run of its own).
    assert_eq!(r.runs_sent(a), vec![(queued.0, true)]);
    assert_eq!(r.state(behind_long), Some(JobState::Queued));
    let since = r.d.jobs(r.now, Some(behind_long))[0].since;
    assert_eq!(since, r.now - t0, "queued since it was submitted");
    r.says(b, WorkerMessage::Started { job: behind_long });
    r.finished(b, s3, Outcome::Exited(0));
    r.finished(b, behind_long, Outcome::Exited(0));
    assert_eq!(
        r.events(behind_long),
        vec![JobEvent::Queued, started("b"), finished(Outcome::Exited(0))]
    );
    // b's next end takes back the run now behind the long job in turn: it waited
    // longer than behind_long ran.
    assert_eq!(r.sent(a), vec![ManagerMessage::Revoke { job: queued }]);
    assert_eq!(r.events(long), vec![JobEvent::Queued, started("a")]);
}

#[test]
fn a_revoke_that_crosses_the_start_is_dropped() {
    let mut r = Rig::new();
    let a = r.join_ahead("a", 1, 1);
    let (first, held) = (r.submit(), r.submit());
    r.sent(a);
    let b = r.join_ahead("b", 1, 1);
    assert_eq!(r.sent(a), vec![ManagerMessage::Revoke { job: held }]);
    // Meanwhile the first job ended on a and the held run started there.
    r.says(a, WorkerMessage::Started { job: held });
    r.finished(a, first, Outcome::Exited(0));
    assert!(matches!(r.state(held), Some(JobState::Running { worker }) if worker == "a"));
    // The worker does not answer the revoke (it started the run): nothing more comes.
    r.finished(a, held, Outcome::Exited(0));
    assert_eq!(
        r.events(held),
        vec![JobEvent::Queued, started("a"), finished(Outcome::Exited(0))]
    );
    // b's free slot is still there for new work.
    let next = r.submit();
    assert_eq!(r.runs_sent(b), vec![(next.0, false)]);
    // A late `Declined` for the started run would be a stranger's: ignored.
    r.says(a, declined_revoked(held));
    assert_eq!(r.events(held), vec![]);
}

#[test]
fn a_cancelled_held_run_ends_cancelled_and_never_starts() {
    let mut r = Rig::new();
    let w = r.join_ahead("a", 1, 1);
    let (first, held) = (r.submit(), r.submit());
    r.sent(w);
    r.d.cancel(r.now, held).unwrap();
    r.pump();
    assert_eq!(r.sent(w), vec![ManagerMessage::Cancel { job: held }]);
    // The worker drops it and says so.
    r.finished(w, held, Outcome::Cancelled);
    assert_eq!(
        r.events(held),
        vec![JobEvent::Queued, finished(Outcome::Cancelled)]
    );
    assert_eq!(r.state(held), None);
    // Its place ahead is free again.
    let next = r.submit();
    assert_eq!(r.runs_sent(w), vec![(next.0, true)]);
    r.finished(w, first, Outcome::Exited(0));
    // A cancel that crosses the run being given back: it ends cancelled all the same.
    let mut r = Rig::new();
    let a = r.join_ahead("a", 1, 1);
    let (_, held) = (r.submit(), r.submit());
    r.join_ahead("b", 1, 1);
    assert_eq!(
        r.sent(a).last(),
        Some(&ManagerMessage::Revoke { job: held })
    );
    r.d.cancel(r.now, held).unwrap();
    r.pump();
    r.says(a, declined_revoked(held));
    assert_eq!(
        r.events(held),
        vec![JobEvent::Queued, finished(Outcome::Cancelled)]
    );
    assert_eq!(r.d.queue.len(), 0);
}

#[test]
fn a_held_run_goes_back_after_a_goodbye_and_is_settled_as_running_after_a_cut() {
    // Goodbye: the link ended in order, so a `Started` would have come first: at once
    // back to the queue, no retry used.
    let mut r = Rig::new();
    let a = r.join_ahead("a", 1, 1);
    let (running, held) = (r.submit(), r.submit_spec(JobSpec::new("x")));
    r.says(a, WorkerMessage::Goodbye);
    r.link_lost(a);
    assert_eq!(
        r.events(running).last(),
        Some(&finished(Outcome::WorkerLost))
    );
    assert_eq!(r.events(held), vec![JobEvent::Queued], "it never ran");
    assert_eq!(r.state(held), Some(JobState::Queued));
    assert_eq!(r.queued.load(Ordering::Relaxed), 1);
    let b = r.join_ahead("b", 1, 1);
    assert_eq!(r.runs_sent(b), vec![(held.0, false)]);
    assert_eq!(r.d.jobs(r.now, Some(held))[0].attempt, 1);
    // A cut with a grace: it waits with its worker (it may have started, its `Started`
    // lost with the link). The worker does not come back: it may have run, so it ends
    // lost like a running job, never run a second time.
    let mut r = Rig::new();
    let a = r.join_ahead("a", 1, 1);
    let (_, held) = (r.submit(), r.submit());
    r.link_lost(a);
    let b = r.join_ahead("b", 1, 1);
    assert_eq!(
        r.runs_sent(b),
        vec![],
        "nothing to revoke from a worker away"
    );
    r.advance(GRACE);
    assert_eq!(r.runs_sent(b), vec![], "not run again");
    assert_eq!(r.events(held).last(), Some(&finished(Outcome::WorkerLost)));
    // The same with a retry left: the retry is used, as for a running job.
    let mut r = Rig::new();
    let a = r.join_ahead("a", 1, 1);
    let (_, held) = (r.submit(), r.submit_spec(JobSpec::new("x").retries(1)));
    r.link_lost(a);
    let b = r.join_ahead("b", 1, 1);
    r.advance(GRACE);
    assert_eq!(r.runs_sent(b), vec![(held.0, false)]);
    assert_eq!(r.d.jobs(r.now, Some(held))[0].attempt, 2);
    // A cut with no grace: the same at once.
    let mut r = Rig::with(Duration::ZERO, 4);
    let a = r.join_ahead("a", 1, 1);
    let (_, held) = (r.submit(), r.submit());
    r.link_lost(a);
    assert_eq!(r.events(held).last(), Some(&finished(Outcome::WorkerLost)));
}

#[test]
fn a_held_run_its_returning_worker_does_not_list_may_have_run_and_is_not_run_again() {
    // Its `Started` was lost with the link, and the worker gave it up (killed it) after
    // its own grace: it comes back within the manager's without it, naming no manager
    // (it gave its runs up). It may have run: settled as a running job.
    let mut r = Rig::new();
    let a = r.join_ahead("a", 1, 1);
    let (_, held) = (r.submit(), r.submit());
    r.link_lost(a);
    r.advance(GRACE / 2);
    let back = WorkerHello {
        manager_id: None,
        ahead: 1,
        ..hello("a", 1)
    };
    let (again, _) = r.join_with(back, Some(b"a")).unwrap();
    assert_eq!(r.runs_sent(again), vec![], "not run again");
    assert_eq!(r.events(held).last(), Some(&finished(Outcome::WorkerLost)));
    // A worker that names this manager and does not list it never got it: it goes back
    // to its place in the queue (no event: it was queued all along) and out again.
    let mut r = Rig::new();
    let a = r.join_ahead("a", 1, 1);
    let (first, held) = (r.submit(), r.submit());
    r.link_lost(a);
    let back = WorkerHello {
        manager_id: Some(MANAGER_ID),
        ahead: 1,
        ..returning("a", 1, &[first])
    };
    let (again, resume) = r.join_with(back, Some(b"a")).unwrap();
    assert_eq!(resume, vec![(first, 0)]);
    assert_eq!(r.runs_sent(again), vec![(held.0, true)], "sent again");
    assert_eq!(r.events(held), vec![JobEvent::Queued]);
    assert_eq!(r.d.jobs(r.now, Some(held))[0].attempt, 1);
}

#[test]
fn a_held_run_cut_off_during_shutdown_ends_lost_not_rejected() {
    // It may have started (its `Started` lost with the link): not "never ran".
    let mut r = Rig::new();
    let a = r.join_ahead("a", 1, 1);
    let (_, held) = (r.submit(), r.submit());
    r.d.shutdown(r.now, Duration::from_secs(30));
    r.pump();
    r.link_lost(a);
    assert_eq!(
        r.events(held),
        vec![JobEvent::Queued, finished(Outcome::WorkerLost)]
    );
}

#[test]
fn a_returning_worker_s_held_runs_are_taken_back_or_go_on_if_they_started() {
    let mut r = Rig::new();
    let a = r.join_ahead("a", 2, 1);
    let (j1, j2, held) = (r.submit(), r.submit(), r.submit());
    assert_eq!(
        r.runs_sent(a),
        vec![(j1.0, false), (j2.0, false), (held.0, true)]
    );
    let started_away = r.submit();
    assert_eq!(r.d.queue.len(), 1);
    r.link_lost(a);
    // It comes back listing j1 running and `held` still held (taken back); j2 it does
    // not list.
    let back = WorkerHello {
        manager_id: Some(MANAGER_ID),
        jobs: vec![
            HeldJob {
                job: j1,
                finished: false,
                ahead: false,
                stdin_taken: 0,
            },
            HeldJob {
                job: held,
                finished: false,
                ahead: true,
                stdin_taken: 0,
            },
        ],
        ahead: 1,
        ..hello("a", 2)
    };
    let (again, resume) = r.join_with(back, Some(b"a")).unwrap();
    assert_eq!(resume, vec![(j1, 0)]);
    // j2 never reached it: queued again, after the others.
    assert_eq!(
        r.events(j2).last(),
        Some(&JobEvent::Requeued { attempt: 1 })
    );
    // Taken back to its place, ahead of the one submitted later: both go out again,
    // into the slot j2 left and ahead of it.
    assert_eq!(
        r.runs_sent(again),
        vec![(held.0, false), (started_away.0, true)]
    );
    assert_eq!(r.d.queue.len(), 1, "j2 waits for room");
    assert_eq!(
        r.events(held),
        vec![JobEvent::Queued, started("a")],
        "no requeue: it never started"
    );
    // A held run that started while the link was down goes on, and its `Started`
    // reaches the submitter now.
    let mut r = Rig::new();
    let a = r.join_ahead("a", 1, 1);
    let (first, held) = (r.submit(), r.submit());
    r.link_lost(a);
    let back = WorkerHello {
        manager_id: Some(MANAGER_ID),
        jobs: vec![
            HeldJob {
                job: first,
                finished: true,
                ahead: false,
                stdin_taken: 0,
            },
            HeldJob {
                job: held,
                finished: false,
                ahead: false,
                stdin_taken: 0,
            },
        ],
        ahead: 1,
        ..hello("a", 1)
    };
    let (again, mut resume) = r.join_with(back, Some(b"a")).unwrap();
    resume.sort();
    assert_eq!(resume, vec![(first, 0), (held, 0)]);
    assert_eq!(r.events(held), vec![JobEvent::Queued, started("a")]);
    r.finished(again, first, Outcome::Exited(0));
    r.finished(again, held, Outcome::Exited(0));
    assert_eq!(r.events(held), vec![finished(Outcome::Exited(0))]);
}

#[test]
fn a_draining_worker_gives_back_its_held_runs_to_their_place() {
    let mut r = Rig::new();
    let a = r.join_ahead("a", 1, 2);
    let (first, h1, h2) = (r.submit(), r.submit(), r.submit());
    let later = r.submit();
    r.sent(a);
    r.says(a, WorkerMessage::Draining);
    for job in [h1, h2] {
        r.says(
            a,
            WorkerMessage::Declined {
                job,
                reason: "the worker is draining".into(),
            },
        );
    }
    assert_eq!(r.d.queue.len(), 3);
    let b = r.join_ahead("b", 1, 1);
    assert_eq!(r.runs_sent(b), vec![(h1.0, false), (h2.0, true)]);
    assert_eq!(r.state(later), Some(JobState::Queued));
    r.finished(a, first, Outcome::Exited(0));
    assert_eq!(r.runs_sent(a), vec![]);
    assert_eq!(r.events(h1), vec![JobEvent::Queued, started("b")]);
    assert_eq!(r.events(h2), vec![JobEvent::Queued], "held by b now");
}

#[test]
fn shutdown_takes_held_runs_back_and_they_end_rejected() {
    let mut r = Rig::new();
    let a = r.join_ahead("a", 1, 1);
    let (running, held) = (r.submit(), r.submit());
    r.sent(a);
    r.d.shutdown(r.now, Duration::from_secs(30));
    r.pump();
    assert_eq!(r.sent(a), vec![ManagerMessage::Revoke { job: held }]);
    r.says(a, declined_revoked(held));
    assert_eq!(
        r.events(held),
        vec![
            JobEvent::Queued,
            finished(Outcome::Rejected(SHUTTING_DOWN.into()))
        ]
    );
    // The running one has its grace; when it ends, shutdown goes on at once.
    r.finished(a, running, Outcome::Exited(0));
    assert_eq!(
        r.sent(a),
        vec![
            ManagerMessage::Ended { job: running },
            ManagerMessage::Shutdown
        ]
    );
    // One that started before the revoke arrived runs in the grace like the others.
    let mut r = Rig::new();
    let a = r.join_ahead("a", 1, 1);
    let (first, held) = (r.submit(), r.submit());
    r.d.shutdown(r.now, Duration::from_secs(30));
    r.pump();
    r.says(a, WorkerMessage::Started { job: held });
    r.finished(a, first, Outcome::Exited(0));
    r.finished(a, held, Outcome::Exited(0));
    assert_eq!(
        r.events(held),
        vec![JobEvent::Queued, started("a"), finished(Outcome::Exited(0))]
    );
    assert!(r.links[&a].closed);
}

#[test]
fn a_hello_with_too_large_a_look_ahead_is_refused() {
    let mut r = Rig::new();
    let why = r
        .join_with(
            WorkerHello {
                ahead: MAX_AHEAD + 1,
                ..hello("a", 1)
            },
            Some(b"a"),
        )
        .unwrap_err();
    assert!(why.contains("ahead"), "{why}");
}

#[test]
fn a_retry_can_be_held_ahead_and_counts_one_start_per_attempt() {
    let mut r = Rig::new();
    let a = r.join_ahead("a", 1, 1);
    let b = r.join_ahead("b", 1, 1);
    let job = r.submit_spec(JobSpec::new("x").retries(1));
    let busy = r.submit();
    assert_eq!(r.runs_sent(a), vec![(job.0, false)]);
    assert_eq!(r.runs_sent(b), vec![(busy.0, false)]);
    // a says goodbye and goes: the job is queued for its second attempt, and goes
    // ahead to b, whose slot is busy.
    r.says(a, WorkerMessage::Goodbye);
    r.link_lost(a);
    assert_eq!(r.runs_sent(b), vec![(job.0, true)]);
    assert_eq!(r.state(job), Some(JobState::Queued));
    assert_eq!(r.d.jobs(r.now, Some(job))[0].attempt, 2);
    r.says(b, WorkerMessage::Started { job });
    r.finished(b, busy, Outcome::Exited(0));
    r.finished(b, job, Outcome::Exited(0));
    assert_eq!(
        r.events(job),
        vec![
            JobEvent::Queued,
            started("a"),
            JobEvent::Requeued { attempt: 2 },
            started("b"),
            finished(Outcome::Exited(0)),
        ]
    );
}

// ---- with a journal: a restart loses nothing ----

fn the_journal(r: &Rig) -> Arc<MemoryJournal> {
    r.journal.clone().expect("a journal")
}

fn open_jobs(j: &MemoryJournal) -> Vec<(u64, u32, journal::Place)> {
    j.recovered()
        .open
        .into_iter()
        .map(|o| (o.id.0, o.attempt, o.place))
        .collect()
}

fn sent_to(name: &str) -> journal::Place {
    journal::Place::Sent {
        worker: name.into(),
        cert: Some(name.as_bytes().to_vec()),
        ahead: false,
    }
}

#[test]
fn queued_jobs_come_back_after_a_restart_in_their_order_and_ids_go_on() {
    let mut r = Rig::journaled();
    let low = r.submit_spec(JobSpec::new("low").priority(-1));
    let a = r.submit();
    let high = r.submit_spec(JobSpec::new("high").priority(5));
    let b = r.submit();
    let j = the_journal(&r);
    drop(r); // a crash: nothing more is written

    let mut r = Rig::restarted(j.clone());
    assert_eq!(r.queued.load(Ordering::Relaxed), 4, "queued again, counted");
    assert_eq!(r.d.jobs(r.now, None).len(), 4);
    let w = r.join("w", 1);
    let mut order = r.runs(w);
    for _ in 0..3 {
        let job = JobId(*order.last().unwrap());
        r.finished(w, job, Outcome::Exited(0));
        order.extend(r.runs(w));
    }
    assert_eq!(order, vec![high.0, a.0, b.0, low.0]);
    // Ids go on past every id ever accepted.
    let next = r.submit();
    assert_eq!(next.0, b.0 + 1);
    assert_eq!(r.runs(w), vec![], "one slot, still taken by {low}");
    r.finished(w, low, Outcome::Exited(0));
    r.finished(w, next, Outcome::Exited(3));
    assert_eq!(open_jobs(&j), vec![], "every end is in the journal");
}

#[test]
fn a_job_running_at_a_restart_is_claimed_by_its_worker_and_ends_once() {
    let mut r = Rig::journaled();
    let w = r.join("a", 1);
    let job = r.submit();
    assert_eq!(r.runs(w), vec![job.0]);
    r.output(w, job, 0, "one ");
    let j = the_journal(&r);
    assert_eq!(open_jobs(&j), vec![(job.0, 1, sent_to("a"))]);
    drop(r);

    let mut r = Rig::restarted(j.clone());
    assert!(
        matches!(r.state(job), Some(JobState::Disconnected { worker }) if worker == "a"),
        "{:?}",
        r.state(job)
    );
    // The name is held for its certificate: another certificate cannot claim the job.
    assert!(r.join_with(returning("a", 1, &[job]), Some(b"b")).is_err());
    let (w, resume) = r
        .join_with(returning("a", 1, &[job]), Some(b"a"))
        .expect("its worker comes back");
    assert_eq!(
        resume,
        vec![(job, 0)],
        "sent again from the oldest output kept"
    );
    assert_eq!(r.sent(w), vec![], "nothing runs twice");
    // The worker kept only its output from seq 3 on: delivery goes on from there with
    // no warning of a gap (a remote submitter drops what it already has).
    r.output(w, job, 3, "four ");
    r.output(w, job, 3, "four ");
    r.output(w, job, 4, "five");
    r.finished(w, job, Outcome::Exited(0));
    r.finished(w, job, Outcome::Exited(0));
    assert_eq!(
        r.events(job),
        vec![out("four "), out("five"), finished(Outcome::Exited(0))]
    );
    assert_eq!(open_jobs(&j), vec![]);
    assert_eq!(r.d.next_deadline(), None);
}

#[test]
fn a_restored_job_whose_worker_does_not_come_back_ends_lost_or_runs_again() {
    let mut r = Rig::journaled();
    let w = r.join("a", 2);
    let once = r.submit();
    let twice = r.submit_spec(JobSpec::new("true").retries(1));
    assert_eq!(r.runs(w), vec![once.0, twice.0]);
    let j = the_journal(&r);
    drop(r);

    let mut r = Rig::restarted(j.clone());
    r.advance(GRACE - Duration::from_millis(1));
    assert_eq!(r.events(once), vec![], "still waiting for its worker");
    r.advance(Duration::from_millis(1));
    assert_eq!(r.events(once), vec![finished(Outcome::WorkerLost)]);
    assert_eq!(r.events(twice), vec![JobEvent::Requeued { attempt: 2 }]);
    assert_eq!(open_jobs(&j), vec![(twice.0, 2, journal::Place::Queued)]);
    // The retry, after yet another restart, is still attempt 2 and still queued.
    drop(r);
    let mut r = Rig::restarted(j.clone());
    let b = r.join("b", 1);
    assert_eq!(r.runs(b), vec![twice.0]);
    assert_eq!(open_jobs(&j), vec![(twice.0, 2, sent_to("b"))]);
}

#[test]
fn a_returning_worker_that_does_not_list_a_restored_job_has_it_settled_never_run_twice() {
    let mut r = Rig::journaled();
    let w = r.join("a", 2);
    let lost = r.submit();
    let kept = r.submit();
    assert_eq!(r.runs(w), vec![lost.0, kept.0]);
    let j = the_journal(&r);
    drop(r);

    // The first `Run` never reached the worker (the manager crashed with it unsent):
    // it lists only the second, and names this manager, so it holds every run it got.
    // The first is queued again and runs once.
    let mut r = Rig::restarted(j.clone());
    let (w, resume) = r.join_with(returning("a", 2, &[kept]), Some(b"a")).unwrap();
    assert_eq!(resume, vec![(kept, 0)]);
    assert_eq!(r.runs(w), vec![lost.0]);
    assert_eq!(
        r.events(lost),
        vec![JobEvent::Requeued { attempt: 1 }, started("a")]
    );
    assert_eq!(
        open_jobs(&j),
        vec![(lost.0, 1, sent_to("a")), (kept.0, 1, sent_to("a"))]
    );
    r.finished(w, lost, Outcome::Exited(0));
    assert_eq!(r.events(lost), vec![finished(Outcome::Exited(0))]);
    drop(r);

    // A worker that gave its runs up after its grace (the manager stayed down too long)
    // names no manager: what it does not list may have run, and ends lost.
    let mut r = Rig::restarted(j.clone());
    let gave_up = WorkerHello {
        manager_id: None,
        ..hello("a", 2)
    };
    let (w, resume) = r.join_with(gave_up, Some(b"a")).unwrap();
    assert_eq!(resume, vec![]);
    assert_eq!(r.runs(w), vec![]);
    assert_eq!(r.events(kept), vec![finished(Outcome::WorkerLost)]);
    assert_eq!(open_jobs(&j), vec![]);
}

#[test]
fn a_journaled_shutdown_ends_no_job_and_the_next_manager_goes_on_with_them() {
    let mut r = Rig::journaled();
    let w = r.join("a", 1);
    let running = r.submit();
    let queued = r.submit();
    assert_eq!(r.runs(w), vec![running.0]);
    r.d.shutdown(r.now, Duration::from_secs(10));
    r.pump();
    let sent = r.sent(w);
    assert!(
        !sent
            .iter()
            .any(|m| matches!(m, ManagerMessage::Cancel { .. })),
        "{sent:?}"
    );
    assert!(sent.contains(&ManagerMessage::Shutdown), "{sent:?}");
    let suspended = finished(Outcome::Rejected(crate::manager::sink::SUSPENDED.into()));
    assert_eq!(r.events(running).last(), Some(&suspended));
    assert_eq!(r.events(queued).last(), Some(&suspended));
    assert_eq!(
        r.counters
            .finished_by_outcome()
            .iter()
            .map(|(_, n)| n)
            .sum::<u64>(),
        0
    );
    let j = the_journal(&r);
    assert_eq!(
        open_jobs(&j),
        vec![
            (running.0, 1, sent_to("a")),
            (queued.0, 1, journal::Place::Queued)
        ]
    );
    drop(r);

    let mut r = Rig::restarted(j.clone());
    let (w, resume) = r
        .join_with(returning("a", 1, &[running]), Some(b"a"))
        .unwrap();
    assert_eq!(resume, vec![(running, 0)]);
    r.finished(w, running, Outcome::Exited(0));
    assert_eq!(r.runs(w), vec![queued.0]);
    assert_eq!(r.events(running), vec![finished(Outcome::Exited(0))]);
}

#[test]
fn where_each_job_goes_is_journaled_declines_and_retries_included() {
    let mut r = Rig::journaled();
    let a = r.join("a", 1);
    let job = r.submit_spec(JobSpec::new("true").retries(1));
    let j = the_journal(&r);
    assert_eq!(open_jobs(&j), vec![(job.0, 1, sent_to("a"))]);
    decline(&mut r, a, job);
    assert_eq!(open_jobs(&j), vec![(job.0, 1, journal::Place::Queued)]);
    let b = r.join("b", 1);
    assert_eq!(r.runs(b), vec![job.0]);
    assert_eq!(open_jobs(&j), vec![(job.0, 1, sent_to("b"))]);
    r.link_lost(b);
    r.advance(GRACE);
    // Retried, and `a` (its rest over) took the second attempt at once.
    assert_eq!(
        r.events(job).last(),
        Some(&JobEvent::Started { worker: "a".into() })
    );
    assert_eq!(open_jobs(&j), vec![(job.0, 2, sent_to("a"))]);
}

#[test]
fn with_a_journal_a_worker_is_told_a_job_ended_only_once_its_end_is_on_disk() {
    let mut r = Rig::journaled();
    let w = r.join("a", 1);
    let first = r.submit();
    assert_eq!(r.runs(w), vec![first.0]);
    r.finished(w, first, Outcome::Exited(0));
    assert!(
        r.sent(w).contains(&ManagerMessage::Ended { job: first }),
        "acknowledged after its commit"
    );
    let second = r.submit();
    assert_eq!(r.runs(w), vec![second.0]);
    let j = the_journal(&r);
    j.fail_writes(Some("the disk is full"));
    r.finished(w, second, Outcome::Exited(0));
    let sent = r.sent(w);
    assert!(
        !sent.contains(&ManagerMessage::Ended { job: second }),
        "its end is not on disk: the worker keeps the job ({sent:?})"
    );
    assert_eq!(r.events(second).last(), Some(&finished(Outcome::Exited(0))));
}

#[test]
fn a_run_sent_ahead_before_a_restart_tells_its_start_when_it_starts() {
    let mut r = Rig::journaled();
    let w = r.join_ahead("a", 1, 1);
    let first = r.submit();
    let ahead = r.submit();
    assert_eq!(r.runs_sent(w), vec![(first.0, false), (ahead.0, true)]);
    let j = the_journal(&r);
    drop(r);

    // The worker comes back holding both: the first running, the other still ahead.
    let mut r = Rig::restarted(j.clone());
    let mut back = returning("a", 1, &[first, ahead]);
    back.ahead = 1;
    back.jobs[1].ahead = true;
    let (w, resume) = r.join_with(back, Some(b"a")).unwrap();
    assert_eq!(resume, vec![(first, 0), (ahead, 0)]);
    // A blip before it starts: it is still held ahead, and still not started.
    r.link_lost(w);
    let mut back = returning("a", 1, &[first, ahead]);
    back.ahead = 1;
    back.jobs[1].ahead = true;
    let (w, resume) = r.join_with(back, Some(b"a")).unwrap();
    assert_eq!(resume, vec![(first, 0), (ahead, 0)]);
    r.finished(w, first, Outcome::Exited(0));
    assert_eq!(r.events(ahead), vec![], "not started yet");
    r.says(w, WorkerMessage::Started { job: ahead });
    assert_eq!(r.events(ahead), vec![started("a")]);
    r.finished(w, ahead, Outcome::Exited(0));
    assert_eq!(r.events(ahead), vec![finished(Outcome::Exited(0))]);
}

#[test]
fn a_run_sent_ahead_that_started_while_the_manager_was_down_tells_its_start() {
    let mut r = Rig::journaled();
    let w = r.join_ahead("a", 1, 1);
    let first = r.submit();
    let ahead = r.submit();
    assert_eq!(r.runs_sent(w), vec![(first.0, false), (ahead.0, true)]);
    let j = the_journal(&r);
    drop(r);

    // Meanwhile the first ended and the other started: the worker holds both as running.
    let mut r = Rig::restarted(j.clone());
    let (w, resume) = r
        .join_with(returning("a", 1, &[first, ahead]), Some(b"a"))
        .unwrap();
    assert_eq!(resume, vec![(first, 0), (ahead, 0)]);
    assert_eq!(
        r.events(first),
        vec![],
        "its start was told before the restart"
    );
    assert_eq!(r.events(ahead), vec![started("a")]);
    r.finished(w, first, Outcome::Exited(0));
    r.finished(w, ahead, Outcome::Exited(0));
    assert_eq!(r.events(ahead), vec![finished(Outcome::Exited(0))]);
}
