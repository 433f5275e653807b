//! The session in memory: a clock the test moves, inputs fed by hand, and what a
//! writer would send pulled with `transmit`. Nothing here sleeps or opens a socket.

use super::*;
use crate::protocol::STDIN_WINDOW;
use std::sync::Arc;

const MANAGER: u64 = 7;
const MS: Duration = Duration::from_millis(1);

fn settings(slots: u32, reconnect_buffer: usize) -> Settings {
    Settings {
        name: "w".into(),
        tags: BTreeSet::new(),
        platform: "linux-x86_64".into(),
        slots,
        ahead: 0,
        address: "manager:1".into(),
        connect_timeout: Duration::from_secs(10),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
        reconnect_buffer,
    }
}

/// A welcome from `manager` with a heartbeat timeout of 5 s and a grace of 10 s.
fn welcome(manager: u64, resume: &[(u64, u64)]) -> Welcome {
    Welcome {
        manager_id: manager,
        worker_id: 1,
        heartbeat_interval_ms: 1000,
        heartbeat_timeout_ms: 5000,
        reconnect_grace_ms: 10_000,
        resume: resume.iter().map(|&(j, s)| (JobId(j), s)).collect(),
    }
}

fn run(job: u64) -> Input {
    Input::Manager(ManagerMessage::Run {
        job: JobId(job),
        spec: JobSpec::new("true"),
        ahead: false,
    })
}

fn chunk(n: usize, byte: u8) -> Chunk {
    Arc::new(vec![byte; n])
}

/// What a writer would put on the wire, simplified for comparisons.
#[derive(Debug, PartialEq)]
enum Wire {
    Out(u64, u64, usize),
    Msg(WorkerMessage),
}

struct Harness {
    s: Session,
    now: Instant,
}

impl Harness {
    fn new(slots: u32, reconnect_buffer: usize) -> Harness {
        let now = Instant::now();
        Harness {
            s: Session::new(settings(slots, reconnect_buffer), now, 0x5eed),
            now,
        }
    }

    fn feed(&mut self, input: Input) -> Vec<Action> {
        self.s.handle(self.now, input);
        self.s.take_actions().collect()
    }

    /// Moves the clock and ticks.
    fn after(&mut self, d: Duration) -> Vec<Action> {
        self.now += d;
        self.feed(Input::Tick)
    }

    /// Moves the clock to the session's next deadline and ticks.
    fn at_deadline(&mut self) -> Vec<Action> {
        let at = self.s.next_deadline().expect("a deadline");
        assert!(at >= self.now, "a deadline in the past");
        self.now = at;
        self.feed(Input::Tick)
    }

    /// Expects a connection attempt now; returns its hello and deadline.
    fn expect_attempt(&mut self, actions: Vec<Action>) -> (WorkerHello, Instant) {
        let mut attempts = actions.into_iter().filter_map(|a| match a {
            Action::Connect { hello, deadline } => Some((hello, deadline)),
            _ => None,
        });
        let attempt = attempts.next().expect("a connection attempt");
        assert!(attempts.next().is_none());
        attempt
    }

    /// Makes the first attempt and has it welcomed by `MANAGER`.
    fn connected() -> Harness {
        let mut h = Harness::new(2, 1000);
        let a = h.feed(Input::Tick);
        h.expect_attempt(a);
        h.feed(Input::Connected(welcome(MANAGER, &[])));
        h
    }

    /// Like `connected`, with `slots` and a look-ahead of `ahead` runs.
    fn connected_ahead(slots: u32, ahead: u32) -> Harness {
        let now = Instant::now();
        let cfg = Settings {
            ahead,
            ..settings(slots, 1000)
        };
        let mut h = Harness {
            s: Session::new(cfg, now, 0x5eed),
            now,
        };
        let a = h.feed(Input::Tick);
        h.expect_attempt(a);
        h.feed(Input::Connected(welcome(MANAGER, &[])));
        h
    }

    /// Everything the writer of the current link would send now.
    fn sent(&mut self) -> Vec<Wire> {
        let id = self.s.link_id().expect("a link");
        let mut wire = Vec::new();
        loop {
            let mut out = Vec::new();
            let pull = self.s.transmit(id, 60_000, &mut out);
            for t in out {
                wire.push(match t {
                    Transmit::Output { job, chunk } => {
                        Wire::Out(job.0, chunk.seq, chunk.bytes.len())
                    }
                    Transmit::Message(m) => Wire::Msg(m),
                });
            }
            match pull {
                Pull::Sent => continue,
                Pull::Idle | Pull::Close => return wire,
            }
        }
    }

    /// Starts job `job` and returns its run's key.
    fn start(&mut self, job: u64) -> JobKey {
        let a = self.feed(run(job));
        match &a[..] {
            [Action::Start { key, .. }] => *key,
            other => panic!("expected a start, got {other:?}"),
        }
    }

    fn output(&mut self, key: JobKey, n: usize) -> Vec<Action> {
        self.feed(Input::Output {
            key,
            stream: Stream::Stdout,
            bytes: chunk(n, 1),
        })
    }

    fn exit(&mut self, key: JobKey, code: i32) -> Vec<Action> {
        self.feed(Input::Exited {
            key,
            outcome: Outcome::Exited(code),
            cleanup_error: None,
        })
    }

    fn clean(&mut self, key: JobKey) -> Vec<Action> {
        self.feed(Input::CleanedUp { key, error: None })
    }
}

fn run_ahead(job: u64) -> Input {
    Input::Manager(ManagerMessage::Run {
        job: JobId(job),
        spec: JobSpec::new("true"),
        ahead: true,
    })
}

fn started(job: u64) -> Wire {
    Wire::Msg(WorkerMessage::Started { job: JobId(job) })
}

/// The keys of the runs the actions start.
fn starts(actions: &[Action]) -> Vec<JobKey> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Start { key, .. } => Some(*key),
            _ => None,
        })
        .collect()
}

/// The key of the one run the actions start.
fn started_key(actions: &[Action]) -> JobKey {
    match starts(actions)[..] {
        [key] => key,
        _ => panic!("expected one start, got {actions:?}"),
    }
}

fn finished(job: u64, code: i32) -> Wire {
    Wire::Msg(WorkerMessage::Finished {
        job: JobId(job),
        outcome: Outcome::Exited(code),
        cleanup_error: None,
    })
}

fn declined(job: u64, why: &str) -> Wire {
    Wire::Msg(WorkerMessage::Declined {
        job: JobId(job),
        reason: why.into(),
    })
}

#[test]
fn the_first_attempt_is_at_once_and_failures_back_off_doubling_to_the_cap_with_jitter() {
    let mut h = Harness::new(1, 1000);
    let a = h.feed(Input::Tick);
    let (hello, deadline) = h.expect_attempt(a);
    assert_eq!(hello.name, "w");
    assert_eq!((hello.manager_id, hello.jobs.len()), (None, 0));
    assert_eq!(deadline, h.now + Duration::from_secs(10));
    // While the attempt runs, nothing more is asked for.
    assert_eq!(h.s.next_deadline(), None);
    let mut full = Duration::from_millis(100);
    for attempt in 1..8 {
        h.feed(Input::ConnectFailed {
            why: "refused".into(),
            loud: false,
        });
        let wait = h.s.next_deadline().unwrap() - h.now;
        assert!(
            wait >= full / 2 && wait <= full,
            "attempt {attempt}: waits {wait:?}, not in [{:?}, {full:?}]",
            full / 2
        );
        assert!(h.after(wait - MS).is_empty(), "too early");
        let a = h.after(MS);
        h.expect_attempt(a);
        full = (full * 2).min(Duration::from_secs(2));
    }
}

#[test]
fn workers_started_together_do_not_retry_in_lockstep() {
    let waits: BTreeSet<Duration> = (0..50u64)
        .map(|seed| {
            let now = Instant::now();
            let mut s = Session::new(settings(1, 1000), now, seed * 7919 + 1);
            s.handle(now, Input::Tick);
            s.handle(
                now,
                Input::ConnectFailed {
                    why: "x".into(),
                    loud: false,
                },
            );
            s.next_deadline().unwrap() - now
        })
        .collect();
    assert!(waits.len() > 40, "{} distinct waits of 50", waits.len());
}

#[test]
fn a_lost_link_is_dialled_again_after_the_first_backoff_and_the_jobs_go_on() {
    let mut h = Harness::connected();
    let key = h.start(1);
    h.output(key, 10);
    assert_eq!(h.sent(), vec![Wire::Out(1, 0, 10)]);
    let a = h.feed(Input::Disconnected { why: "cut".into() });
    assert!(a.is_empty(), "nothing is killed: {a:?}");
    let wait = h.s.next_deadline().unwrap() - h.now;
    assert!(wait >= Duration::from_millis(50) && wait <= Duration::from_millis(100));
    let a = h.at_deadline();
    let (hello, deadline) = h.expect_attempt(a);
    assert_eq!(hello.manager_id, Some(MANAGER));
    assert_eq!(
        hello.jobs,
        vec![HeldJob {
            job: JobId(1),
            finished: false,
            ahead: false,
            stdin_taken: 0,
        }]
    );
    // The attempt ends before the manager would give up on the job (grace 10 s less the
    // heartbeat timeout of 5 s, from the loss).
    assert!(deadline <= h.now + Duration::from_secs(5));
}

#[test]
fn resume_sends_again_from_the_seq_the_manager_expects_then_the_rest_then_finished() {
    let mut h = Harness::connected();
    let key = h.start(1);
    for _ in 0..4 {
        h.output(key, 10);
    }
    assert_eq!(h.sent().len(), 4);
    h.feed(Input::Disconnected { why: "cut".into() });
    // Made while away: kept, not sent.
    h.output(key, 20);
    h.output(key, 30);
    h.exit(key, 3);
    let a = h.at_deadline();
    let (hello, _) = h.expect_attempt(a);
    assert!(hello.jobs[0].finished);
    h.feed(Input::Connected(welcome(MANAGER, &[(1, 2)])));
    assert_eq!(
        h.sent(),
        vec![
            Wire::Out(1, 2, 10),
            Wire::Out(1, 3, 10),
            Wire::Out(1, 4, 20),
            Wire::Out(1, 5, 30),
            finished(1, 3),
        ]
    );
    // Not acknowledged: after another cut it comes again, and only the ending.
    h.feed(Input::Disconnected { why: "cut".into() });
    let a = h.at_deadline();
    h.expect_attempt(a);
    h.feed(Input::Connected(welcome(MANAGER, &[(1, 6)])));
    assert_eq!(h.sent(), vec![finished(1, 3)]);
    h.feed(Input::Manager(ManagerMessage::Ended { job: JobId(1) }));
    h.clean(key);
    h.feed(Input::Disconnected { why: "cut".into() });
    let a = h.at_deadline();
    let (hello, _) = h.expect_attempt(a);
    assert!(hello.jobs.is_empty(), "an acknowledged job is forgotten");
}

#[test]
fn a_replay_shares_the_bytes_of_the_first_send() {
    let mut h = Harness::connected();
    let key = h.start(1);
    let bytes = chunk(100, 9);
    h.feed(Input::Output {
        key,
        stream: Stream::Stderr,
        bytes: bytes.clone(),
    });
    let id = h.s.link_id().unwrap();
    let mut out = Vec::new();
    h.s.transmit(id, 60_000, &mut out);
    h.feed(Input::Disconnected { why: "cut".into() });
    h.at_deadline();
    h.feed(Input::Connected(welcome(MANAGER, &[(1, 0)])));
    let id2 = h.s.link_id().unwrap();
    assert_ne!(id, id2);
    // The old link's writer gets nothing more.
    assert_eq!(h.s.transmit(id, 60_000, &mut Vec::new()), Pull::Close);
    h.s.transmit(id2, 60_000, &mut out);
    let shared: Vec<bool> = out
        .iter()
        .map(|t| match t {
            Transmit::Output { chunk, .. } => Arc::ptr_eq(&chunk.bytes, &bytes),
            Transmit::Message(m) => panic!("{m:?}"),
        })
        .collect();
    assert_eq!(shared, vec![true, true]);
}

#[test]
fn output_beyond_the_buffer_while_away_pauses_the_job_until_it_is_sent() {
    let mut h = Harness::connected();
    let key = h.start(1);
    h.feed(Input::Disconnected { why: "cut".into() });
    assert!(h.output(key, 600).is_empty());
    assert_eq!(h.output(key, 600), vec![Action::Pause(key, true)]);
    // More that was already read is kept; it is not paused twice.
    assert!(h.output(key, 100).is_empty());
    h.at_deadline();
    let a = h.feed(Input::Connected(welcome(MANAGER, &[(1, 0)])));
    assert!(a.is_empty(), "still too much waiting: {a:?}");
    let id = h.s.link_id().unwrap();
    let mut out = Vec::new();
    assert_eq!(h.s.transmit(id, 1, &mut out), Pull::Sent);
    assert_eq!(out.len(), 1);
    // 700 left: above half the buffer.
    assert!(h.s.take_actions().next().is_none());
    h.s.transmit(id, 1, &mut out);
    assert_eq!(
        h.s.take_actions().collect::<Vec<_>>(),
        vec![Action::Pause(key, false)]
    );
    assert_eq!(h.sent(), vec![Wire::Out(1, 2, 100)]);
}

#[test]
fn output_faster_than_the_link_pauses_the_job_while_connected_too() {
    let mut h = Harness::connected();
    let key = h.start(1);
    h.output(key, 900);
    assert_eq!(h.output(key, 900), vec![Action::Pause(key, true)]);
    let a: Vec<Wire> = h.sent();
    assert_eq!(a, vec![Wire::Out(1, 0, 900), Wire::Out(1, 1, 900)]);
}

#[test]
fn a_manager_pause_holds_back_the_output_and_pauses_the_job_until_resume() {
    let mut h = Harness::connected();
    let key = h.start(1);
    let a = h.feed(Input::Manager(ManagerMessage::Pause { job: JobId(1) }));
    assert_eq!(a, vec![Action::Pause(key, true)]);
    h.output(key, 10);
    assert_eq!(h.sent(), vec![]);
    let a = h.feed(Input::Manager(ManagerMessage::Resume { job: JobId(1) }));
    assert_eq!(a, vec![Action::Pause(key, false), Action::WakeWriter]);
    assert_eq!(h.sent(), vec![Wire::Out(1, 0, 10)]);
}

#[test]
fn finished_follows_all_of_the_job_s_output() {
    let mut h = Harness::connected();
    let key = h.start(1);
    h.feed(Input::Manager(ManagerMessage::Pause { job: JobId(1) }));
    h.output(key, 10);
    h.exit(key, 0);
    assert_eq!(h.sent(), vec![], "the ending waits behind held output");
    h.feed(Input::Manager(ManagerMessage::Resume { job: JobId(1) }));
    assert_eq!(h.sent(), vec![Wire::Out(1, 0, 10), finished(1, 0)]);
}

#[test]
fn runs_beyond_the_slots_or_of_a_job_already_running_are_declined() {
    let mut h = Harness::connected();
    h.start(1);
    h.start(2);
    assert!(h.feed(run(3)).is_empty());
    assert!(h.feed(run(1)).is_empty());
    assert_eq!(
        h.sent(),
        vec![
            declined(3, "the worker has no free slot"),
            declined(1, "the worker has no free slot")
        ]
    );
}

#[test]
fn a_run_the_worker_cannot_accept_is_refused_as_rejected() {
    let mut h = Harness::connected();
    let a = h.feed(Input::Manager(ManagerMessage::Run {
        job: JobId(1),
        spec: JobSpec::new("true").timeout(Duration::MAX),
        ahead: false,
    }));
    assert!(a.is_empty());
    match &h.sent()[..] {
        [
            Wire::Msg(WorkerMessage::Finished {
                outcome: Outcome::Rejected(why),
                ..
            }),
        ] => assert!(why.contains("365 days"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_drain_declines_new_runs_and_says_goodbye_once_its_jobs_are_acknowledged() {
    let mut h = Harness::connected();
    let key = h.start(1);
    h.feed(Input::Drain(None));
    assert!(h.feed(run(2)).is_empty());
    assert_eq!(
        h.sent(),
        vec![
            Wire::Msg(WorkerMessage::Draining),
            declined(2, "the worker is draining")
        ]
    );
    h.exit(key, 0);
    assert_eq!(h.sent(), vec![finished(1, 0)]);
    h.feed(Input::Manager(ManagerMessage::Ended { job: JobId(1) }));
    let id = h.s.link_id().unwrap();
    let mut out = Vec::new();
    assert_eq!(h.s.transmit(id, 60_000, &mut out), Pull::Sent);
    assert!(matches!(
        &out[..],
        [Transmit::Message(WorkerMessage::Goodbye)]
    ));
    assert_eq!(h.s.transmit(id, 60_000, &mut out), Pull::Close);
    assert!(
        h.feed(Input::Disconnected {
            why: "closed".into()
        })
        .is_empty()
    );
    // Exits once the job's folder is gone, and never dials again.
    assert_eq!(h.clean(key), vec![Action::Exit]);
    assert_eq!(h.s.next_deadline(), None);
}

#[test]
fn a_drain_deadline_kills_what_still_runs_and_its_ending_is_still_reported() {
    let mut h = Harness::connected();
    let key = h.start(1);
    h.feed(Input::Drain(Some(h.now + Duration::from_secs(30))));
    assert!(h.after(Duration::from_secs(29)).is_empty());
    assert_eq!(h.at_deadline(), vec![Action::Kill(key)]);
    h.feed(Input::Exited {
        key,
        outcome: Outcome::Cancelled,
        cleanup_error: None,
    });
    let sent = h.sent();
    assert_eq!(
        sent[1..],
        [Wire::Msg(WorkerMessage::Finished {
            job: JobId(1),
            outcome: Outcome::Cancelled,
            cleanup_error: None
        })]
    );
    h.feed(Input::Manager(ManagerMessage::Ended { job: JobId(1) }));
    assert_eq!(h.sent(), vec![Wire::Msg(WorkerMessage::Goodbye)]);
}

#[test]
fn a_worker_that_drains_while_away_says_so_when_it_is_back() {
    let mut h = Harness::connected();
    h.start(1);
    h.feed(Input::Disconnected { why: "cut".into() });
    h.feed(Input::Drain(None));
    let a = h.at_deadline();
    let (hello, _) = h.expect_attempt(a);
    assert!(hello.draining);
    h.feed(Input::Connected(welcome(MANAGER, &[(1, 0)])));
    assert_eq!(h.sent(), vec![Wire::Msg(WorkerMessage::Draining)]);
}

#[test]
fn held_jobs_are_given_up_a_heartbeat_timeout_and_an_interval_before_the_manager_s_grace_ends() {
    let mut h = Harness::connected();
    let key = h.start(1);
    let lost = h.now;
    h.feed(Input::Disconnected { why: "cut".into() });
    // The manager may not come back: every attempt fails.
    loop {
        let a = h.at_deadline();
        if a.contains(&Action::Kill(key)) {
            break;
        }
        let (_, deadline) = h.expect_attempt(a);
        assert!(
            deadline <= lost + Duration::from_secs(4)
                || deadline <= h.now + Duration::from_millis(100),
            "an attempt runs past the point where the jobs are given up"
        );
        h.feed(Input::ConnectFailed {
            why: "refused".into(),
            loud: false,
        });
    }
    // Grace 10 s, heartbeat timeout 5 s, interval 1 s: given up 4 s after the loss.
    assert_eq!(h.now, lost + Duration::from_secs(4));
    // Its late output and ending are dropped; the next hello does not list it, and
    // names no manager: a hello that names one holds every run of its it got (so that
    // the manager takes a run it does not list for one that never reached it).
    h.output(key, 10);
    h.exit(key, 0);
    let a = h.at_deadline();
    let (hello, _) = h.expect_attempt(a);
    assert!(hello.jobs.is_empty());
    assert_eq!(hello.manager_id, None, "it gave its runs up");
    h.feed(Input::Connected(welcome(MANAGER, &[])));
    assert_eq!(h.sent(), vec![]);
    // Away as long with nothing held, it has given nothing up: it still names its
    // manager.
    let mut h = Harness::connected();
    let lost = h.now;
    h.feed(Input::Disconnected { why: "cut".into() });
    let hello = loop {
        let a = h.at_deadline();
        let (hello, _) = h.expect_attempt(a);
        if h.now >= lost + Duration::from_secs(4) {
            break hello;
        }
        h.feed(Input::ConnectFailed {
            why: "refused".into(),
            loud: false,
        });
    };
    assert_eq!(hello.manager_id, Some(MANAGER));
}

#[test]
fn a_manager_that_no_longer_waits_for_a_job_has_it_killed_and_a_new_manager_too() {
    for (manager, resume) in [(MANAGER, vec![]), (MANAGER + 1, vec![(1, 0)])] {
        let mut h = Harness::connected();
        let key = h.start(1);
        h.output(key, 5);
        h.feed(Input::Disconnected { why: "cut".into() });
        h.at_deadline();
        let a = h.feed(Input::Connected(welcome(manager, &resume)));
        assert_eq!(a, vec![Action::Kill(key)]);
        assert_eq!(h.sent(), vec![]);
    }
}

#[test]
fn a_retry_to_the_same_worker_runs_next_to_the_old_run_being_killed() {
    let mut h = Harness::connected();
    let old = h.start(1);
    h.feed(Input::Disconnected { why: "cut".into() });
    h.at_deadline();
    // The manager retried the job meanwhile and no longer waits for this run.
    assert_eq!(
        h.feed(Input::Connected(welcome(MANAGER, &[]))),
        vec![Action::Kill(old)]
    );
    let new = h.start(1);
    assert_ne!(old, new);
    assert_eq!((old.job, new.job), (JobId(1), JobId(1)));
    // The old run's last words are dropped; the new run numbers from 0.
    h.output(old, 10);
    h.output(new, 20);
    h.feed(Input::Exited {
        key: old,
        outcome: Outcome::Cancelled,
        cleanup_error: None,
    });
    h.clean(old);
    // The manager acts on the new run.
    assert_eq!(
        h.feed(Input::Manager(ManagerMessage::Cancel { job: JobId(1) })),
        vec![Action::Cancel(new)]
    );
    h.exit(new, 0);
    assert_eq!(h.sent(), vec![Wire::Out(1, 0, 20), finished(1, 0)]);
}

#[test]
fn the_run_being_killed_does_not_take_a_slot() {
    let mut h = Harness::connected();
    let a = h.start(1);
    h.start(2);
    h.feed(Input::Disconnected { why: "cut".into() });
    h.at_deadline();
    h.feed(Input::Connected(welcome(MANAGER, &[(2, 0)])));
    h.start(3);
    // Slots: 2 and 3. Job 1's old run is still being killed, yet is no reason to decline.
    assert!(h.feed(run(4)).is_empty());
    assert_eq!(h.sent(), vec![declined(4, "the worker has no free slot")]);
    h.exit(a, 0);
}

#[test]
fn stop_kills_the_jobs_says_goodbye_and_exits_once_they_are_cleaned_up() {
    let mut h = Harness::connected();
    let running = h.start(1);
    let ended = h.start(2);
    h.exit(ended, 0);
    let a = h.feed(Input::Stop);
    assert_eq!(a, vec![Action::Kill(running)]);
    // The ending that was ready goes before the goodbye.
    assert_eq!(
        h.sent(),
        vec![finished(2, 0), Wire::Msg(WorkerMessage::Goodbye)]
    );
    assert!(h.feed(run(3)).is_empty(), "nothing new starts");
    h.feed(Input::Disconnected {
        why: "closed".into(),
    });
    h.exit(running, 137);
    assert!(
        h.clean(running).is_empty(),
        "job 2 is still being cleaned up"
    );
    assert_eq!(h.clean(ended), vec![Action::Exit]);
}

#[test]
fn stop_exits_at_its_deadline_if_a_job_cannot_be_reaped() {
    let mut h = Harness::connected();
    h.start(1);
    h.feed(Input::Stop);
    h.sent();
    h.feed(Input::Disconnected {
        why: "closed".into(),
    });
    assert!(h.after(STOP_WAIT - MS).is_empty());
    assert_eq!(h.after(MS), vec![Action::Exit]);
}

#[test]
fn stop_while_away_exits_without_dialling_again() {
    let mut h = Harness::connected();
    let key = h.start(1);
    h.feed(Input::Disconnected { why: "cut".into() });
    assert_eq!(h.feed(Input::Stop), vec![Action::Kill(key)]);
    h.exit(key, 137);
    assert_eq!(h.clean(key), vec![Action::Exit]);
}

#[test]
fn stop_during_an_attempt_says_goodbye_if_the_attempt_succeeds() {
    let mut h = Harness::new(1, 1000);
    let a = h.feed(Input::Tick);
    h.expect_attempt(a);
    assert!(h.feed(Input::Stop).is_empty());
    h.feed(Input::Connected(welcome(MANAGER, &[])));
    assert_eq!(h.sent(), vec![Wire::Msg(WorkerMessage::Goodbye)]);
    assert_eq!(
        h.feed(Input::Disconnected {
            why: "closed".into()
        }),
        vec![Action::Exit]
    );
}

#[test]
fn a_cleanup_failure_is_reported_before_finished_if_it_can_be_else_after() {
    let mut h = Harness::connected();
    let key = h.start(1);
    h.feed(Input::Manager(ManagerMessage::Pause { job: JobId(1) }));
    h.output(key, 10);
    h.exit(key, 0);
    h.feed(Input::CleanedUp {
        key,
        error: Some("could not delete".into()),
    });
    h.feed(Input::Manager(ManagerMessage::Resume { job: JobId(1) }));
    let failed = Wire::Msg(WorkerMessage::CleanupFailed {
        job: JobId(1),
        error: "could not delete".into(),
    });
    assert_eq!(h.sent(), vec![Wire::Out(1, 0, 10), failed, finished(1, 0)]);

    let key = h.start(2);
    h.exit(key, 0);
    assert_eq!(h.sent(), vec![finished(2, 0)]);
    h.feed(Input::Manager(ManagerMessage::Ended { job: JobId(2) }));
    h.feed(Input::CleanedUp {
        key,
        error: Some("gone wrong".into()),
    });
    assert_eq!(
        h.sent(),
        vec![Wire::Msg(WorkerMessage::CleanupFailed {
            job: JobId(2),
            error: "gone wrong".into(),
        })]
    );
}

#[test]
fn batches_stay_within_the_budget_and_jobs_take_turns() {
    let mut h = Harness::new(2, 1 << 20);
    let a = h.feed(Input::Tick);
    h.expect_attempt(a);
    h.feed(Input::Connected(welcome(MANAGER, &[])));
    let a = h.start(1);
    let b = h.start(2);
    for _ in 0..3 {
        h.output(a, 30_000);
        h.output(b, 30_000);
    }
    let id = h.s.link_id().unwrap();
    let mut batches = Vec::new();
    loop {
        let mut out = Vec::new();
        if h.s.transmit(id, 60_000, &mut out) != Pull::Sent {
            break;
        }
        batches.push(
            out.iter()
                .map(|t| match t {
                    Transmit::Output { job, chunk } => (job.0, chunk.seq),
                    Transmit::Message(m) => panic!("{m:?}"),
                })
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(
        batches,
        vec![
            vec![(1, 0)],
            vec![(2, 0)],
            vec![(1, 1)],
            vec![(2, 1)],
            vec![(1, 2)],
            vec![(2, 2)]
        ]
    );
}

/// A manager as far as output goes: what it has delivered of each job, in order.
#[derive(Default)]
struct Receiver {
    next: HashMap<u64, u64>,
    bytes: HashMap<u64, Vec<u8>>,
    finished: BTreeSet<u64>,
}

impl Receiver {
    /// Takes what arrived as the manager does: output it has already delivered (a
    /// replay) is dropped, anything else must be the next in order.
    fn deliver(&mut self, h: &mut Harness, out: Vec<Transmit>) {
        for t in out {
            match t {
                Transmit::Output { job, chunk } => {
                    let expect = self.next.entry(job.0).or_default();
                    if chunk.seq < *expect {
                        continue;
                    }
                    assert!(!self.finished.contains(&job.0), "output after Finished");
                    assert_eq!(chunk.seq, *expect, "a gap in job {job}");
                    *expect += 1;
                    self.bytes
                        .entry(job.0)
                        .or_default()
                        .extend(chunk.bytes.iter());
                }
                Transmit::Message(WorkerMessage::Finished { job, .. }) => {
                    assert!(self.finished.insert(job.0), "job {job} finished twice");
                    h.feed(Input::Manager(ManagerMessage::Ended { job }));
                }
                Transmit::Message(m) => panic!("{m:?}"),
            }
        }
    }

    fn reconnect(&self, h: &mut Harness, keys: &[JobKey]) {
        let a = h.at_deadline();
        h.expect_attempt(a);
        let resume: Vec<(u64, u64)> = keys
            .iter()
            .filter(|k| !self.finished.contains(&k.job.0))
            .map(|k| (k.job.0, self.next.get(&k.job.0).copied().unwrap_or(0)))
            .collect();
        h.feed(Input::Connected(welcome(MANAGER, &resume)));
    }
}

#[test]
fn every_byte_arrives_once_and_in_order_across_random_cuts() {
    let mut rng = 0x1234_5678_9abc_def1u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for _round in 0..20 {
        // A buffer big enough that nothing in flight is forgotten.
        let mut h = Harness::new(3, 1 << 20);
        let a = h.feed(Input::Tick);
        h.expect_attempt(a);
        h.feed(Input::Connected(welcome(MANAGER, &[])));
        let mut manager = Receiver::default();
        let keys: Vec<JobKey> = (1..=3).map(|j| h.start(j)).collect();
        let mut written: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut counter = 0u8;
        let mut exited = BTreeSet::new();
        let mut cuts = 0;
        for _ in 0..400 {
            match next(10) {
                0..=4 => {
                    let key = keys[next(3) as usize];
                    if exited.contains(&key.job.0) {
                        continue;
                    }
                    counter = counter.wrapping_add(1);
                    let n = 1 + next(50) as usize;
                    written
                        .entry(key.job.0)
                        .or_default()
                        .extend(vec![counter; n]);
                    h.feed(Input::Output {
                        key,
                        stream: Stream::Stdout,
                        bytes: Arc::new(vec![counter; n]),
                    });
                }
                5..=7 => {
                    // The writer sends a batch, which arrives only if the link holds.
                    let Some(id) = h.s.link_id() else { continue };
                    let mut out = Vec::new();
                    h.s.transmit(id, 1 + next(200) as usize, &mut out);
                    if next(4) != 0 {
                        manager.deliver(&mut h, out);
                    } else {
                        cuts += 1;
                        h.feed(Input::Disconnected { why: "cut".into() });
                    }
                }
                8 => {
                    let key = keys[next(3) as usize];
                    if exited.insert(key.job.0) {
                        h.exit(key, 0);
                    }
                }
                _ => {
                    if h.s.link_id().is_none() {
                        manager.reconnect(&mut h, &keys);
                    }
                }
            }
        }
        assert!(cuts > 0);
        // Everything ends, the link comes back, and all is sent.
        for key in &keys {
            if exited.insert(key.job.0) {
                h.exit(*key, 0);
            }
        }
        if h.s.link_id().is_none() {
            manager.reconnect(&mut h, &keys);
        }
        let id = h.s.link_id().unwrap();
        loop {
            let mut out = Vec::new();
            let pull = h.s.transmit(id, 60_000, &mut out);
            manager.deliver(&mut h, out);
            if pull != Pull::Sent {
                break;
            }
        }
        assert_eq!(manager.finished.len(), 3);
        for key in &keys {
            assert_eq!(
                manager.bytes.get(&key.job.0),
                written.get(&key.job.0),
                "job {}",
                key.job
            );
        }
    }
}

// ---- runs sent ahead of the slots ----

#[test]
fn trivial_jobs_follow_each_other_with_no_round_trip_between_them() {
    // One slot and one run ahead: the manager keeps one run held; each job's end starts
    // the next at once, before its `Finished` goes, with no word from the manager.
    let mut h = Harness::connected_ahead(1, 1);
    let mut key = h.start(1);
    assert!(h.feed(run_ahead(2)).is_empty(), "held, not started");
    assert_eq!(h.sent(), vec![], "nothing to say about a held run");
    for job in 2..=20 {
        // The job ends: the held run starts in the same step.
        let a = h.exit(key, 0);
        let next = started_key(&a);
        assert_eq!(next.job, JobId(job));
        // `Started` of the next goes before `Finished` of the last: the manager never
        // sees the slot free while it is taken.
        assert_eq!(h.sent(), vec![started(job), finished(job - 1, 0)]);
        h.clean(key);
        // The manager answers with the next run ahead and the acknowledgement.
        assert!(h.feed(run_ahead(job + 1)).is_empty());
        h.feed(Input::Manager(ManagerMessage::Ended {
            job: JobId(job - 1),
        }));
        key = next;
    }
}

#[test]
fn a_run_sent_ahead_that_finds_a_free_slot_starts_at_once_and_says_so() {
    let mut h = Harness::connected_ahead(1, 1);
    let key = h.start(1);
    // The job ended, its `Finished` is on the way, and the manager sent a run ahead.
    h.exit(key, 0);
    let a = h.feed(run_ahead(2));
    assert_eq!(started_key(&a).job, JobId(2));
    assert_eq!(h.sent(), vec![started(2), finished(1, 0)]);
}

#[test]
fn runs_beyond_the_look_ahead_are_declined() {
    let mut h = Harness::connected_ahead(1, 2);
    h.start(1);
    assert!(h.feed(run_ahead(2)).is_empty());
    assert!(h.feed(run_ahead(3)).is_empty());
    assert!(h.feed(run_ahead(4)).is_empty());
    assert!(h.feed(run_ahead(2)).is_empty(), "one it holds already");
    // A run sent into a slot the manager thinks is free is never held.
    assert!(h.feed(run(5)).is_empty());
    assert_eq!(
        h.sent(),
        vec![
            declined(4, "the worker has no free slot"),
            declined(2, "the worker has no free slot"),
            declined(5, "the worker has no free slot"),
        ]
    );
}

#[test]
fn a_revoked_run_is_given_back_if_held_and_kept_if_started() {
    let mut h = Harness::connected_ahead(1, 1);
    let key = h.start(1);
    h.feed(run_ahead(2));
    h.feed(Input::Manager(ManagerMessage::Revoke { job: JobId(2) }));
    assert_eq!(h.sent(), vec![declined(2, "revoked")]);
    // Gone: the slot that frees next starts nothing.
    assert!(starts(&h.exit(key, 0)).is_empty());
    assert_eq!(h.sent(), vec![finished(1, 0)]);
    // A revoke that crosses the start: the run goes on and nothing is answered (its
    // `Started` is already on the way).
    let key = h.start(3);
    h.feed(run_ahead(4));
    let next = started_key(&h.exit(key, 0));
    assert_eq!(next.job, JobId(4));
    assert!(
        h.feed(Input::Manager(ManagerMessage::Revoke { job: JobId(4) }))
            .is_empty()
    );
    assert_eq!(h.sent(), vec![started(4), finished(3, 0)]);
    // And one for a job it never had is ignored.
    h.feed(Input::Manager(ManagerMessage::Revoke { job: JobId(99) }));
    assert_eq!(h.sent(), vec![]);
}

#[test]
fn a_cancelled_held_run_ends_cancelled_without_ever_starting() {
    let mut h = Harness::connected_ahead(1, 1);
    let key = h.start(1);
    h.feed(run_ahead(2));
    assert!(
        h.feed(Input::Manager(ManagerMessage::Cancel { job: JobId(2) }))
            .is_empty(),
        "nothing to kill"
    );
    assert_eq!(
        h.sent(),
        vec![Wire::Msg(WorkerMessage::Finished {
            job: JobId(2),
            outcome: Outcome::Cancelled,
            cleanup_error: None,
        })]
    );
    assert!(
        starts(&h.exit(key, 0)).is_empty(),
        "it does not start later either"
    );
}

#[test]
fn a_pause_of_a_held_run_applies_when_it_starts() {
    let mut h = Harness::connected_ahead(1, 1);
    let key = h.start(1);
    h.feed(run_ahead(2));
    assert!(
        h.feed(Input::Manager(ManagerMessage::Pause { job: JobId(2) }))
            .is_empty()
    );
    let a = h.exit(key, 0);
    match &a[..] {
        [Action::Start { key: k, .. }, Action::Pause(p, true)] => {
            assert_eq!((k.job, p), (JobId(2), k));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_drain_gives_back_the_held_runs() {
    let mut h = Harness::connected_ahead(1, 2);
    let key = h.start(1);
    h.feed(run_ahead(2));
    h.feed(run_ahead(3));
    h.feed(Input::Drain(None));
    assert_eq!(
        h.sent(),
        vec![
            Wire::Msg(WorkerMessage::Draining),
            declined(2, "the worker is draining"),
            declined(3, "the worker is draining"),
        ]
    );
    assert!(
        starts(&h.exit(key, 0)).is_empty(),
        "nothing held is started"
    );
    assert_eq!(h.sent(), vec![finished(1, 0)]);
}

#[test]
fn a_reconnecting_worker_lists_its_held_runs_and_drops_them_unless_resumed() {
    let mut h = Harness::connected_ahead(1, 1);
    let key = h.start(1);
    h.feed(run_ahead(2));
    h.feed(Input::Disconnected { why: "cut".into() });
    // The job ends while the link is down: the held run does not start (the manager
    // takes it back when the worker returns).
    assert!(starts(&h.exit(key, 0)).is_empty());
    let a = h.at_deadline();
    let (hello, _) = h.expect_attempt(a);
    assert_eq!(hello.ahead, 1);
    assert_eq!(
        hello.jobs,
        vec![
            HeldJob {
                job: JobId(1),
                finished: true,
                ahead: false,
                stdin_taken: 0,
            },
            HeldJob {
                job: JobId(2),
                finished: false,
                ahead: true,
                stdin_taken: 0,
            },
        ]
    );
    h.feed(Input::Connected(welcome(MANAGER, &[(1, 0)])));
    assert_eq!(h.sent(), vec![finished(1, 0)]);
    // Dropped: it is not listed again, and the free slot takes a new run.
    h.feed(Input::Manager(ManagerMessage::Ended { job: JobId(1) }));
    h.clean(key);
    h.feed(Input::Disconnected { why: "cut".into() });
    let a = h.at_deadline();
    let (hello, _) = h.expect_attempt(a);
    assert_eq!(hello.jobs, vec![]);
}

#[test]
fn a_held_run_the_manager_resumes_starts_when_the_worker_is_back() {
    let mut h = Harness::connected_ahead(1, 1);
    let key = h.start(1);
    h.feed(run_ahead(2));
    h.feed(Input::Disconnected { why: "cut".into() });
    assert!(starts(&h.exit(key, 0)).is_empty());
    let a = h.at_deadline();
    h.expect_attempt(a);
    let a = h.feed(Input::Connected(welcome(MANAGER, &[(1, 0), (2, 0)])));
    assert_eq!(started_key(&a).job, JobId(2));
    assert_eq!(h.sent(), vec![started(2), finished(1, 0)]);
}

#[test]
fn held_runs_are_dropped_with_the_jobs_when_the_grace_runs_out_or_a_new_manager_answers() {
    let mut h = Harness::connected_ahead(1, 1);
    let key = h.start(1);
    h.feed(run_ahead(2));
    h.feed(Input::Disconnected { why: "cut".into() });
    loop {
        let a = h.at_deadline();
        if a.contains(&Action::Kill(key)) {
            break;
        }
        if a.iter().any(|a| matches!(a, Action::Connect { .. })) {
            h.feed(Input::ConnectFailed {
                why: "refused".into(),
                loud: false,
            });
        }
    }
    // Given up: the next hello lists nothing.
    let (hello, _) = loop {
        let a = h.at_deadline();
        if a.iter().any(|a| matches!(a, Action::Connect { .. })) {
            break h.expect_attempt(a);
        }
    };
    assert_eq!(hello.jobs, vec![]);
    // A new manager: a held run of the old one is dropped, never started.
    let mut h = Harness::connected_ahead(1, 1);
    let key = h.start(1);
    h.feed(run_ahead(2));
    h.feed(Input::Disconnected { why: "cut".into() });
    let a = h.at_deadline();
    h.expect_attempt(a);
    let a = h.feed(Input::Connected(welcome(MANAGER + 1, &[])));
    assert_eq!(a, vec![Action::Kill(key)]);
    h.exit(key, 0);
    assert_eq!(h.sent(), vec![]);
}

#[test]
fn stop_drops_the_held_runs() {
    let mut h = Harness::connected_ahead(1, 1);
    let key = h.start(1);
    h.feed(run_ahead(2));
    assert_eq!(h.feed(Input::Stop), vec![Action::Kill(key)]);
    assert!(starts(&h.exit(key, -1)).is_empty(), "nothing held starts");
    assert_eq!(h.sent(), vec![Wire::Msg(WorkerMessage::Goodbye)]);
}

// ---- interactive jobs ----

fn run_interactive(job: u64, spec: JobSpec) -> Input {
    Input::Manager(ManagerMessage::Run {
        job: JobId(job),
        spec,
        ahead: false,
    })
}

fn stdin_data(job: u64, offset: u64, bytes: &[u8]) -> Input {
    Input::Manager(ManagerMessage::StdinData {
        job: JobId(job),
        offset,
        bytes: bytes.to_vec(),
    })
}

/// The stdin bytes the actions hand to supervisors, and the ends.
fn stdin_actions(actions: &[Action]) -> (Vec<u8>, usize) {
    let mut bytes = Vec::new();
    let mut ends = 0;
    for a in actions {
        match a {
            Action::Stdin { bytes: b, .. } => bytes.extend_from_slice(b),
            Action::StdinEnd(_) => ends += 1,
            _ => {}
        }
    }
    (bytes, ends)
}

fn taken(job: u64, upto: u64) -> Wire {
    Wire::Msg(WorkerMessage::StdinTaken {
        job: JobId(job),
        upto,
    })
}

fn stdin_closed(job: u64, upto: u64) -> Wire {
    Wire::Msg(WorkerMessage::StdinClosed {
        job: JobId(job),
        upto,
    })
}

#[test]
fn stdin_is_handed_on_once_and_taken_is_said_when_the_pipe_drains() {
    let mut h = Harness::connected();
    let a = h.feed(run_interactive(1, JobSpec::new("cat").interactive()));
    let key = started_key(&a);
    let a = h.feed(stdin_data(1, 0, b"abc"));
    assert_eq!(stdin_actions(&a), (b"abc".to_vec(), 0));
    h.feed(Input::StdinTaken { key, upto: 2 });
    assert_eq!(h.sent(), vec![], "bytes still wait, and little was taken");
    h.feed(Input::StdinTaken { key, upto: 3 });
    assert_eq!(h.sent(), vec![taken(1, 3)]);
    // The end, after every byte before it.
    let a = h.feed(Input::Manager(ManagerMessage::StdinEof {
        job: JobId(1),
        offset: 3,
    }));
    assert_eq!(stdin_actions(&a), (vec![], 1));
    h.exit(key, 0);
    assert_eq!(h.sent(), vec![stdin_closed(1, 3), finished(1, 0)]);
}

#[test]
fn after_a_reconnect_the_hello_says_what_was_taken_and_a_resend_is_not_handed_on_twice() {
    let mut h = Harness::connected();
    let a = h.feed(run_interactive(1, JobSpec::new("cat").interactive()));
    let key = started_key(&a);
    h.feed(stdin_data(1, 0, b"hello world"));
    h.feed(Input::StdinTaken { key, upto: 5 });
    h.feed(Input::Disconnected { why: "cut".into() });
    let a = h.at_deadline();
    let (hello, _) = h.expect_attempt(a);
    assert_eq!(hello.jobs.len(), 1);
    assert_eq!(hello.jobs[0].stdin_taken, 5);
    h.feed(Input::Connected(welcome(MANAGER, &[(1, 0)])));
    assert_eq!(
        h.sent(),
        vec![taken(1, 5)],
        "the new link hears where stdin stands"
    );
    // The manager sends again from 5: what waits at the supervisor is skipped.
    let a = h.feed(stdin_data(1, 5, b" world!"));
    assert_eq!(stdin_actions(&a), (b"!".to_vec(), 0));
    let a = h.feed(stdin_data(1, 0, b"hello"));
    assert_eq!(stdin_actions(&a), (vec![], 0));
    assert!(h.s.link_id().is_some());
}

#[test]
fn stdin_past_the_window_or_with_a_gap_closes_the_link_and_nothing_after_is_acted_on() {
    for (offset, len) in [(0, STDIN_WINDOW as usize + 1), (1, 1)] {
        let mut h = Harness::connected();
        let a = h.feed(run_interactive(1, JobSpec::new("cat").interactive()));
        started_key(&a);
        let a = h.feed(stdin_data(1, offset, &vec![0; len]));
        let closes: Vec<&String> = a
            .iter()
            .filter_map(|a| match a {
                Action::CloseLink(why) => Some(why),
                _ => None,
            })
            .collect();
        assert_eq!(closes.len(), 1, "{a:?}");
        assert!(closes[0].contains("broke the protocol"), "{}", closes[0]);
        assert_eq!(stdin_actions(&a), (vec![], 0));
        // What the same link still brings is not acted on.
        let a = h.feed(Input::Manager(ManagerMessage::Cancel { job: JobId(1) }));
        assert_eq!(a, vec![]);
        // The next link is heard again.
        h.feed(Input::Disconnected {
            why: closes[0].clone(),
        });
        let a = h.at_deadline();
        h.expect_attempt(a);
        h.feed(Input::Connected(welcome(MANAGER, &[(1, 0)])));
        let a = h.feed(stdin_data(1, 0, b"ok"));
        assert_eq!(stdin_actions(&a), (b"ok".to_vec(), 0));
    }
}

#[test]
fn stdin_for_a_job_that_is_not_interactive_is_a_protocol_error() {
    let mut h = Harness::connected();
    h.start(1);
    let a = h.feed(stdin_data(1, 0, b"x"));
    assert!(matches!(&a[..], [Action::CloseLink(why)] if why.contains("not interactive")));
}

#[test]
fn a_job_that_closes_its_stdin_is_said_so_once_and_later_bytes_are_dropped() {
    let mut h = Harness::connected();
    let a = h.feed(run_interactive(1, JobSpec::new("head -c 1").interactive()));
    let key = started_key(&a);
    h.feed(stdin_data(1, 0, b"abcdef"));
    h.feed(Input::StdinClosed { key, upto: 4 });
    let a = h.feed(stdin_data(1, 6, b"more"));
    assert_eq!(a, vec![]);
    h.exit(key, 0);
    assert_eq!(h.sent(), vec![stdin_closed(1, 4), finished(1, 0)]);
}

#[test]
fn a_resize_reaches_a_terminal_job_and_a_run_held_ahead_gets_its_stdin_when_it_starts() {
    let mut h = Harness::connected_ahead(1, 1);
    let busy = h.start(1);
    h.feed(Input::Manager(ManagerMessage::Run {
        job: JobId(2),
        spec: JobSpec::new("cat").pty(24, 80),
        ahead: true,
    }));
    h.feed(stdin_data(2, 0, b"early"));
    h.feed(Input::Manager(ManagerMessage::StdinEof {
        job: JobId(2),
        offset: 5,
    }));
    let size = PtySize {
        rows: 30,
        cols: 100,
    };
    h.feed(Input::Manager(ManagerMessage::Resize {
        job: JobId(2),
        size,
    }));
    let a = h.exit(busy, 0);
    let key = started_key(&a);
    match a.iter().find(|a| matches!(a, Action::Start { .. })) {
        Some(Action::Start { spec, .. }) => assert_eq!(spec.pty, Some(size)),
        _ => unreachable!(),
    }
    assert_eq!(stdin_actions(&a), (b"early".to_vec(), 1));
    let a = h.feed(Input::Manager(ManagerMessage::Resize {
        job: JobId(2),
        size: PtySize { rows: 5, cols: 6 },
    }));
    assert_eq!(a, vec![Action::Resize(key, PtySize { rows: 5, cols: 6 })]);
}
