//! The client's session in memory: a clock the test moves, events fed by hand, and
//! what the driver would send taken from the actions. Nothing here sleeps or opens a
//! socket.

use super::*;
use crate::job::{JobSpec, Stream};

const MANAGER: u64 = 7;
const SESSION: u64 = 3;
const MS: Duration = Duration::from_millis(1);

fn settings() -> Settings {
    Settings {
        name: "c".into(),
        connect_timeout: Duration::from_secs(10),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
        reconnect_grace: None,
    }
}

/// A welcome with a heartbeat timeout of 5 s and a grace of 10 s.
fn welcome(resumed: bool, next_request: u64) -> SubmitterWelcome {
    SubmitterWelcome {
        manager_id: MANAGER,
        session: SESSION,
        resumed,
        restored: false,
        next_request,
        heartbeat_interval_ms: 1000,
        heartbeat_timeout_ms: 5000,
        reconnect_grace_ms: 10_000,
    }
}

struct Harness {
    s: Session,
    now: Instant,
}

type Waiting = Receiver<crate::Result<Answer>>;

impl Harness {
    /// A session welcomed into a new session.
    fn up() -> Harness {
        let mut h = Harness {
            s: Session::new(settings(), 0x5eed),
            now: Instant::now(),
        };
        h.s.connected(h.now, &welcome(false, 0));
        assert!(h.actions().is_empty());
        h
    }

    fn actions(&mut self) -> Vec<Action> {
        self.s.take_actions().collect()
    }

    /// The messages the driver would send.
    fn sent(&mut self) -> Vec<SubmitterMessage> {
        self.actions()
            .into_iter()
            .map(|a| match a {
                Action::Send(m) => m,
                other => panic!("not a send: {other:?}"),
            })
            .collect()
    }

    fn ask(&mut self, request: Request) -> (u64, Waiting) {
        let (tx, rx) = bounded(1);
        let seq = self.s.request(request, Some(tx)).unwrap();
        (seq, rx)
    }

    fn event(&mut self, seq: u64, event: SessionEvent) {
        self.s.received(self.now, seq, event);
    }

    fn job_event(&mut self, seq: u64, job: u64, event: JobEvent) {
        self.event(
            seq,
            SessionEvent::Job {
                job: JobId(job),
                event,
            },
        );
    }

    /// Submits and answers with `ids` as event `seq`; the jobs' receivers.
    fn submit(&mut self, seq: u64, ids: &[u64]) -> Vec<(JobId, Receiver<JobEvent>)> {
        let (req, rx) = self.ask(Request::Submit {
            spec: JobSpec::new("true"),
            detached: false,
        });
        self.event(
            seq,
            SessionEvent::Reply {
                request: req,
                reply: Reply::Submitted(ids.iter().map(|&i| JobId(i)).collect()),
            },
        );
        match rx.try_recv().expect("answered") {
            Ok(Answer::Follow(jobs)) => jobs,
            other => panic!("{other:?}"),
        }
    }

    fn after(&mut self, d: Duration) -> Vec<Action> {
        self.now += d;
        self.s.tick(self.now);
        self.actions()
    }
}

fn out(n: usize, byte: u8) -> JobEvent {
    JobEvent::Output {
        stream: Stream::Stdout,
        bytes: vec![byte; n],
    }
}

fn request_seqs(msgs: &[SubmitterMessage]) -> Vec<u64> {
    msgs.iter()
        .filter_map(|m| match m {
            SubmitterMessage::Request { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect()
}

fn acks(msgs: &[SubmitterMessage]) -> Vec<u64> {
    msgs.iter()
        .filter_map(|m| match m {
            SubmitterMessage::Ack { next } => Some(*next),
            _ => None,
        })
        .collect()
}

/// The link goes down and the backoff runs out: the connection attempt it asks for.
fn reconnect(h: &mut Harness) -> SubmitterHello {
    h.s.disconnected(h.now, "cut");
    for _ in 0..100 {
        for a in h.after(10 * MS) {
            if let Action::Connect { hello, .. } = a {
                return hello;
            }
        }
    }
    panic!("no connection attempt within 1 s");
}

#[test]
fn requests_are_numbered_from_0_and_a_resume_resends_exactly_the_untaken_ones() {
    let mut h = Harness::up();
    let (a, _ra) = h.ask(Request::Jobs);
    let (b, _rb) = h.ask(Request::Workers);
    let (c, rc) = h.ask(Request::Stats);
    assert_eq!((a, b, c), (0, 1, 2));
    assert_eq!(request_seqs(&h.sent()), vec![0, 1, 2]);
    // Request 0 is answered; the link drops; one more is asked meanwhile.
    h.event(
        0,
        SessionEvent::Reply {
            request: 0,
            reply: Reply::Jobs(vec![]),
        },
    );
    let hello = reconnect(&mut h);
    assert_eq!(
        hello.resume,
        Some(SessionResume {
            manager_id: MANAGER,
            session: SESSION,
            next_event: 1
        })
    );
    let (d, _rd) = h.ask(Request::Jobs);
    assert_eq!(d, 3);
    assert!(h.sent().is_empty(), "nothing goes out without a link");
    // The manager had taken 0 and 1: 2 and 3 go (again), in order, nothing else.
    h.s.connected(h.now, &welcome(true, 2));
    let sent = h.sent();
    assert_eq!(request_seqs(&sent), vec![2, 3]);
    assert!(matches!(
        &sent[0],
        SubmitterMessage::Request {
            request: Request::Stats,
            ..
        }
    ));
    // Request 2's answer arrives once, whatever is sent again.
    let stats = || SessionEvent::Reply {
        request: 2,
        reply: Reply::Workers(vec![]),
    };
    h.event(1, stats());
    h.event(1, stats());
    assert!(matches!(
        rc.try_recv(),
        Ok(Ok(Answer::Reply(Reply::Workers(_))))
    ));
    assert!(rc.try_recv().is_err());
    assert_eq!(h.s.waiting_requests(), 2, "1 and 3 still wait");
}

#[test]
fn events_sent_again_after_a_resume_are_dropped_and_each_arrives_once_in_order() {
    let mut h = Harness::up();
    let jobs = h.submit(0, &[1]);
    let rx = &jobs[0].1;
    for seq in 1..=5 {
        h.job_event(seq, 1, out(1, seq as u8));
    }
    let hello = reconnect(&mut h);
    assert_eq!(hello.resume.unwrap().next_event, 6);
    h.s.connected(h.now, &welcome(true, 1));
    // The manager sends again from an older point than asked (as after a lost ack):
    // what is already here is dropped.
    for seq in 3..=8 {
        h.job_event(seq, 1, out(1, seq as u8));
    }
    let got: Vec<u8> = rx
        .try_iter()
        .map(|e| match e {
            JobEvent::Output { bytes, .. } => bytes[0],
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, vec![1, 2, 3, 4, 5, 6, 7, 8]);
    h.actions();
    // A gap is a broken manager: the link is cut, nothing is taken.
    h.job_event(10, 1, out(1, 10));
    assert!(matches!(&h.actions()[..], [Action::Cut(why)] if why.contains("skipped")));
    assert!(rx.try_recv().is_err());
}

#[test]
fn acks_go_out_after_64_events_or_512_kib_after_a_resume_and_on_the_heartbeat() {
    let mut h = Harness::up();
    let jobs = h.submit(0, &[1]);
    assert_eq!(h.s.beat(), SubmitterMessage::Ack { next: 1 });
    assert_eq!(h.s.beat(), SubmitterMessage::Heartbeat, "nothing unacked");
    let drain = |jobs: &Vec<(JobId, Receiver<JobEvent>)>| jobs[0].1.try_iter().count();
    let mut seq = 1;
    let mut sent = Vec::new();
    // 63 small events: no ack yet; the 64th brings one.
    for _ in 0..63 {
        h.job_event(seq, 1, out(1, 0));
        seq += 1;
        drain(&jobs);
    }
    sent.extend(h.sent());
    assert!(acks(&sent).is_empty(), "{sent:?}");
    h.job_event(seq, 1, out(1, 0));
    seq += 1;
    assert_eq!(acks(&h.sent()), vec![seq]);
    // 512 KiB in 2 events: an ack.
    for _ in 0..2 {
        h.job_event(seq, 1, out(256 << 10, 0));
        seq += 1;
        drain(&jobs);
    }
    assert_eq!(acks(&h.sent()), vec![seq]);
    // One more: acknowledged on the heartbeat tick.
    h.job_event(seq, 1, out(1, 0));
    seq += 1;
    assert!(h.sent().is_empty());
    assert_eq!(h.s.beat(), SubmitterMessage::Ack { next: seq });
    // And at once after a resume, if anything came since.
    h.job_event(seq, 1, out(1, 0));
    seq += 1;
    reconnect(&mut h);
    h.s.connected(h.now, &welcome(true, 1));
    assert_eq!(acks(&h.sent()), vec![seq]);
}

#[test]
fn a_full_channel_holds_its_event_and_every_later_one_in_order_and_held_events_are_not_acked() {
    let mut h = Harness::up();
    let jobs = h.submit(0, &[1, 2]);
    let (a, b) = (&jobs[0].1, &jobs[1].1);
    let mut seq = 1;
    // Job 1's channel fills; its next event is held, and job 2's after it too.
    for i in 0..JOB_CHANNEL + 1 {
        h.job_event(seq, 1, out(1, i as u8));
        seq += 1;
    }
    h.job_event(seq, 2, out(1, 200));
    seq += 1;
    h.job_event(seq, 1, JobEvent::Finished(Outcome::Exited(0)));
    seq += 1;
    assert_eq!(h.s.held_events(), 3);
    assert!(b.try_recv().is_err(), "job 2's event waits behind job 1's");
    let sent = h.sent();
    assert!(acks(&sent).is_empty(), "{sent:?}");
    // What is held is not acknowledged: the ack stops at the first held event.
    let first_held = 1 + JOB_CHANNEL as u64;
    assert_eq!(h.s.beat(), SubmitterMessage::Ack { next: first_held });
    assert_eq!(h.s.next_deadline(), Some(h.now + HELD_RETRY));
    // Nobody reads: the retry keeps them.
    assert!(h.after(HELD_RETRY).is_empty());
    assert_eq!(h.s.held_events(), 3);
    // Job 1's reader takes two: the held events go, in order, and are acknowledged.
    assert_eq!(a.try_recv().unwrap(), out(1, 0));
    assert_eq!(a.try_recv().unwrap(), out(1, 1));
    let sent = h.after(HELD_RETRY);
    assert_eq!(
        sent,
        vec![Action::Send(SubmitterMessage::Ack { next: seq })]
    );
    assert_eq!(h.s.held_events(), 0);
    assert_eq!(b.try_recv().unwrap(), out(1, 200));
    let rest: Vec<JobEvent> = a.try_iter().collect();
    assert_eq!(rest.len(), JOB_CHANNEL);
    assert_eq!(rest[JOB_CHANNEL - 2], out(1, JOB_CHANNEL as u8));
    assert_eq!(
        rest[JOB_CHANNEL - 1],
        JobEvent::Finished(Outcome::Exited(0))
    );
    assert_eq!(h.s.next_deadline(), None);
}

#[test]
fn a_dropped_handle_s_events_are_dropped_and_acknowledged() {
    let mut h = Harness::up();
    let mut jobs = h.submit(0, &[1]);
    jobs.clear();
    for seq in 1..=100 {
        h.job_event(seq, 1, out(10, 0));
    }
    assert_eq!(h.s.held_events(), 0);
    assert_eq!(h.s.beat(), SubmitterMessage::Ack { next: 101 });
}

#[test]
fn giving_up_ends_each_followed_job_once_after_its_held_events_and_fails_what_went_out() {
    let mut h = Harness::up();
    let jobs = h.submit(0, &[1, 2, 3]);
    // Job 3 has ended; job 1's channel is full with one more held.
    h.job_event(1, 3, JobEvent::Finished(Outcome::Exited(0)));
    for i in 0..=JOB_CHANNEL {
        h.job_event(2 + i as u64, 1, out(1, i as u8));
    }
    let (_, sent_before) = h.ask(Request::Jobs);
    h.s.disconnected(h.now, "cut");
    let (_, asked_after) = h.ask(Request::Workers);
    // Connection attempts fail until the grace (10 s from the welcome) has passed.
    let mut ended_at = None;
    for step in 0..200 {
        for a in h.after(100 * MS) {
            if let Action::Connect { hello, .. } = a {
                if hello.resume.is_none() && ended_at.is_none() {
                    ended_at = Some(step);
                }
                h.s.connect_failed(h.now, "refused");
            }
        }
        if ended_at.is_some() {
            break;
        }
    }
    assert!(ended_at.is_some(), "the session was given up");
    match sent_before.try_recv() {
        Ok(Err(Error::ContactLost(why))) => assert!(why.contains("reconnect grace"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(
        asked_after.try_recv().is_err(),
        "a request never sent waits"
    );
    // Job 1's held output comes first (the session's order), then job 1 and job 2
    // end, each once; job 3, which had ended, does not end again.
    let ends = |rx: &Receiver<JobEvent>| -> Vec<JobEvent> { rx.try_iter().collect() };
    assert_eq!(
        ends(&jobs[2].1),
        vec![JobEvent::Finished(Outcome::Exited(0))]
    );
    assert!(ends(&jobs[1].1).is_empty(), "behind job 1's held output");
    let mut one = ends(&jobs[0].1);
    assert_eq!(one.len(), JOB_CHANNEL);
    let mut two = Vec::new();
    for _ in 0..10 {
        h.after(HELD_RETRY);
        one.extend(ends(&jobs[0].1));
        two.extend(ends(&jobs[1].1));
    }
    assert_eq!(one.len(), JOB_CHANNEL + 3, "{one:?}");
    assert_eq!(one[JOB_CHANNEL], out(1, JOB_CHANNEL as u8));
    assert!(
        matches!(&one[JOB_CHANNEL + 1], JobEvent::Warning(w) if w.contains("contact with the manager was lost"))
    );
    assert!(
        matches!(&one[JOB_CHANNEL + 2], JobEvent::Finished(Outcome::Rejected(w)) if w.contains("contact with the manager was lost"))
    );
    assert_eq!(two.len(), 2, "{two:?}");
    assert!(matches!(
        two[..],
        [
            JobEvent::Warning(_),
            JobEvent::Finished(Outcome::Rejected(_))
        ]
    ));
    // A new session: the request that waited goes out as its request 0.
    h.s.connected(h.now, &welcome(false, 0));
    assert_eq!(request_seqs(&h.sent()), vec![0]);
    // Nothing ends twice, whatever follows.
    for _ in 0..3 {
        h.after(Duration::from_secs(20));
    }
    assert!(jobs.iter().all(|(_, rx)| rx.try_recv().is_err()));
}

#[test]
fn a_session_the_manager_did_not_resume_ends_its_jobs_and_unsent_requests_go_to_the_new_one() {
    let mut h = Harness::up();
    let jobs = h.submit(0, &[1]);
    let (_, went_out) = h.ask(Request::Jobs);
    h.s.disconnected(h.now, "cut");
    let (_, not_sent) = h.ask(Request::Stats);
    let hello = reconnect(&mut h);
    assert!(hello.resume.is_some());
    let mut w = welcome(false, 0);
    w.session = SESSION + 1;
    h.s.connected(h.now, &w);
    let sent = h.sent();
    assert_eq!(request_seqs(&sent), vec![0], "{sent:?}");
    assert!(matches!(
        went_out.try_recv(),
        Ok(Err(Error::ContactLost(_)))
    ));
    assert!(not_sent.try_recv().is_err(), "it waits for its answer");
    let ev: Vec<JobEvent> = jobs[0].1.try_iter().collect();
    assert!(matches!(
        ev[..],
        [
            JobEvent::Warning(_),
            JobEvent::Finished(Outcome::Rejected(_))
        ]
    ));
    // The new session's events count from 0.
    h.event(
        0,
        SessionEvent::Reply {
            request: 0,
            reply: Reply::Workers(vec![]),
        },
    );
    assert!(matches!(
        not_sent.try_recv(),
        Ok(Ok(Answer::Reply(Reply::Workers(_))))
    ));
    assert_eq!(h.s.hello().resume.unwrap().session, SESSION + 1);
}

#[test]
fn a_submit_whose_caller_gave_up_is_not_sent_and_a_taken_one_has_its_jobs_cancelled() {
    let mut h = Harness::up();
    h.s.disconnected(h.now, "cut");
    let (seq, rx) = h.ask(Request::Submit {
        spec: JobSpec::new("true"),
        detached: false,
    });
    drop(rx);
    h.s.abandon(seq);
    reconnect(&mut h);
    h.s.connected(h.now, &welcome(true, 0));
    let sent = h.sent();
    assert!(
        matches!(
            &sent[..],
            [SubmitterMessage::Request {
                seq: 0,
                request: Request::Stats
            }]
        ),
        "{sent:?}"
    );
    // One that was taken before its caller gave up: its jobs are cancelled.
    let (seq, rx) = h.ask(Request::Submit {
        spec: JobSpec::new("true"),
        detached: false,
    });
    h.sent();
    drop(rx);
    h.s.abandon(seq);
    h.event(
        0,
        SessionEvent::Reply {
            request: seq,
            reply: Reply::Submitted(vec![JobId(9)]),
        },
    );
    let sent = h.sent();
    assert!(
        matches!(
            &sent[..],
            [
                SubmitterMessage::Ack { next: 1 },
                SubmitterMessage::Request {
                    request: Request::Cancel { job: JobId(9) },
                    ..
                }
            ]
        ),
        "{sent:?}"
    );
    // Its events are dropped (and acknowledged).
    h.job_event(1, 9, JobEvent::Queued);
    assert_eq!(h.s.held_events(), 0);
    assert_eq!(h.s.beat(), SubmitterMessage::Ack { next: 2 });
}

#[test]
fn failed_requests_become_the_crate_s_errors() {
    let mut h = Harness::up();
    let cases = [
        (RequestError::QueueFull { capacity: 4 }, "queue is full"),
        (
            RequestError::InvalidJob("empty".into()),
            "invalid job: empty",
        ),
        (RequestError::NoSuchJob(JobId(5)), "no such job: 5"),
        (RequestError::NotYours(JobId(6)), "not permitted: job 6"),
        (RequestError::ShutDown, "shut down"),
        (
            RequestError::Journal("disk full".into()),
            "journal: disk full",
        ),
    ];
    for (i, (e, words)) in cases.into_iter().enumerate() {
        let (seq, rx) = h.ask(Request::Cancel { job: JobId(1) });
        h.event(
            i as u64,
            SessionEvent::Reply {
                request: seq,
                reply: Reply::Failed(e),
            },
        );
        let got = rx.try_recv().unwrap().unwrap_err().to_string();
        assert!(got.contains(words), "{got} (wanted {words:?})");
    }
}

#[test]
fn reconnects_back_off_doubling_to_the_cap_with_jitter() {
    let mut h = Harness::up();
    h.s.disconnected(h.now, "cut");
    let mut waits = Vec::new();
    let mut last = h.now;
    for _ in 0..8 {
        let mut attempted = false;
        for _ in 0..10_000 {
            let acts = h.after(MS);
            if acts.iter().any(|a| matches!(a, Action::Connect { .. })) {
                waits.push(h.now - last);
                h.s.connect_failed(h.now, "refused");
                last = h.now;
                attempted = true;
                break;
            }
        }
        assert!(attempted, "an attempt within 10 s");
    }
    // [d/2, d] with d = 100, 200, 400, 800, 1600, 2000, 2000, 2000 ms (1 ms ticks).
    for (i, w) in waits.iter().enumerate() {
        let d = (100u64 << i).min(2000);
        assert!(
            *w >= Duration::from_millis(d / 2) && *w <= Duration::from_millis(d + 1),
            "attempt {i}: {w:?} for d = {d} ms"
        );
    }
}

#[test]
fn a_closed_session_says_goodbye_answers_its_callers_and_takes_nothing_more() {
    let mut h = Harness::up();
    let jobs = h.submit(0, &[1]);
    let (_, rx) = h.ask(Request::Jobs);
    h.sent();
    h.s.close();
    assert_eq!(h.sent(), vec![SubmitterMessage::Goodbye]);
    assert!(matches!(rx.try_recv(), Ok(Err(Error::ShutDown))));
    assert!(matches!(
        jobs[0].1.try_recv(),
        Err(crossbeam_channel::TryRecvError::Disconnected)
    ));
    assert!(matches!(
        h.s.request(Request::Stats, None),
        Err(Error::ShutDown)
    ));
    assert!(h.after(Duration::from_secs(60)).is_empty(), "no reconnect");
}

#[test]
fn what_was_taken_is_acknowledged_before_the_next_request() {
    let mut h = Harness::up();
    let (a, _ra) = h.ask(Request::Jobs);
    assert_eq!(request_seqs(&h.sent()), vec![a]);
    // One answer (it may be megabytes): not enough for an acknowledgement by itself.
    h.event(
        0,
        SessionEvent::Reply {
            request: a,
            reply: Reply::Jobs(vec![]),
        },
    );
    assert!(h.sent().is_empty());
    // The next request goes out after the acknowledgement of that answer.
    let (b, _rb) = h.ask(Request::Stats);
    let sent = h.sent();
    assert_eq!(acks(&sent), vec![1]);
    assert!(matches!(sent[0], SubmitterMessage::Ack { next: 1 }));
    assert_eq!(request_seqs(&sent), vec![b]);
    // Nothing new taken: no acknowledgement again.
    let (c, _rc) = h.ask(Request::Workers);
    assert_eq!(h.sent().len(), 1, "request {c} alone");
}

// ---- after the manager restarted (a `restored` welcome) ----

fn restored_welcome() -> SubmitterWelcome {
    SubmitterWelcome {
        restored: true,
        ..welcome(true, 0)
    }
}

/// Output numbered by its worker: `attempt`, `seq`, one byte.
fn numbered(job: u64, attempt: u32, seq: u64, byte: u8) -> SessionEvent {
    SessionEvent::Output {
        job: JobId(job),
        attempt,
        seq,
        stream: Stream::Stdout,
        bytes: vec![byte],
    }
}

#[test]
fn a_restored_welcome_names_the_jobs_followed_and_sends_again_every_request_without_an_answer() {
    let mut h = Harness::up();
    let jobs = h.submit(0, &[1, 2]);
    // Job 2 ends; request 1 (a job list) was answered; 2 and 3 were not.
    h.job_event(1, 2, JobEvent::Finished(Outcome::Exited(0)));
    let (_, _r1) = h.ask(Request::Jobs);
    let (_, r2) = h.ask(Request::Workers);
    let (_, _r3) = h.ask(Request::Submit {
        spec: JobSpec::new("true"),
        detached: true,
    });
    h.event(
        2,
        SessionEvent::Reply {
            request: 1,
            reply: Reply::Jobs(vec![]),
        },
    );
    h.sent();
    let hello = reconnect(&mut h);
    assert_eq!(hello.resume.unwrap().next_event, 3);
    // The manager restarted: it says nothing about what it took.
    h.s.connected(h.now, &restored_welcome());
    let sent = h.sent();
    assert_eq!(
        sent[0],
        SubmitterMessage::Follow {
            jobs: vec![JobId(1)]
        },
        "{sent:?}"
    );
    assert_eq!(request_seqs(&sent), vec![2, 3]);
    assert!(
        !sent.iter().any(|m| matches!(
            m,
            SubmitterMessage::Request {
                request: Request::Cancel { .. },
                ..
            }
        )),
        "nothing is cancelled: {sent:?}"
    );
    // The session goes on where it was: job 1's events keep coming, numbered on.
    h.job_event(3, 1, out(1, 9));
    assert_eq!(jobs[0].1.try_recv().unwrap(), out(1, 9));
    h.event(
        4,
        SessionEvent::Reply {
            request: 2,
            reply: Reply::Workers(vec![]),
        },
    );
    assert!(matches!(
        r2.try_recv(),
        Ok(Ok(Answer::Reply(Reply::Workers(_))))
    ));
    // Events are numbered as before: one sent again is dropped.
    h.job_event(4, 1, out(1, 10));
    assert!(jobs[0].1.try_recv().is_err());
}

#[test]
fn output_the_worker_sends_again_after_a_restart_is_dropped_by_its_seq_and_a_gap_is_told() {
    let mut h = Harness::up();
    let jobs = h.submit(0, &[1]);
    let rx = &jobs[0].1;
    let mut seq = 1;
    let mut ev = |h: &mut Harness, e: SessionEvent| {
        h.event(seq, e);
        seq += 1;
    };
    ev(
        &mut h,
        SessionEvent::Job {
            job: JobId(1),
            event: JobEvent::Queued,
        },
    );
    let started = JobEvent::Started { worker: "w".into() };
    ev(
        &mut h,
        SessionEvent::Job {
            job: JobId(1),
            event: started.clone(),
        },
    );
    for s in 0..5 {
        ev(&mut h, numbered(1, 1, s, s as u8));
    }
    // After the restart: a `Started` and `Queued` again, and the worker sends again
    // from its output 2; then output 8 (6 and 7 never come).
    ev(
        &mut h,
        SessionEvent::Job {
            job: JobId(1),
            event: started.clone(),
        },
    );
    ev(
        &mut h,
        SessionEvent::Job {
            job: JobId(1),
            event: JobEvent::Queued,
        },
    );
    for s in [2, 3, 4, 5, 8, 9] {
        ev(&mut h, numbered(1, 1, s, s as u8));
    }
    // A retry: its output counts from 0 again; a late one of the old attempt is dropped.
    ev(
        &mut h,
        SessionEvent::Job {
            job: JobId(1),
            event: JobEvent::Requeued { attempt: 2 },
        },
    );
    ev(
        &mut h,
        SessionEvent::Job {
            job: JobId(1),
            event: started.clone(),
        },
    );
    ev(&mut h, numbered(1, 1, 10, 10));
    ev(&mut h, numbered(1, 2, 0, 100));
    ev(&mut h, numbered(1, 2, 0, 100));
    let end = JobEvent::Finished(Outcome::Exited(0));
    ev(
        &mut h,
        SessionEvent::Job {
            job: JobId(1),
            event: end.clone(),
        },
    );
    ev(
        &mut h,
        SessionEvent::Job {
            job: JobId(1),
            event: end.clone(),
        },
    );
    let got: Vec<JobEvent> = rx.try_iter().collect();
    let one = |b: u8| out(1, b);
    assert_eq!(
        got,
        vec![
            JobEvent::Queued,
            started.clone(),
            one(0),
            one(1),
            one(2),
            one(3),
            one(4),
            one(5),
            JobEvent::Warning(
                "2 output message(s) of this job were lost while the manager restarted".into()
            ),
            one(8),
            one(9),
            JobEvent::Requeued { attempt: 2 },
            started,
            one(100),
            end,
        ]
    );
    // Everything dropped was taken all the same: acknowledged.
    assert_eq!(h.s.beat(), SubmitterMessage::Ack { next: seq });
}

#[test]
fn a_job_attached_to_takes_its_first_numbered_output_wherever_it_starts() {
    let mut h = Harness::up();
    let (req, rx) = h.ask(Request::Attach { job: JobId(4) });
    h.event(
        0,
        SessionEvent::Reply {
            request: req,
            reply: Reply::Attached,
        },
    );
    let Ok(Ok(Answer::Follow(jobs))) = rx.try_recv() else {
        panic!("not followed")
    };
    // Kept output (not numbered), then live output from seq 40 of attempt 3.
    h.job_event(1, 4, out(1, 1));
    h.event(2, numbered(4, 3, 40, 2));
    h.event(3, numbered(4, 3, 40, 2));
    h.event(4, numbered(4, 3, 41, 3));
    let got: Vec<JobEvent> = jobs[0].1.try_iter().collect();
    assert_eq!(got, vec![out(1, 1), out(1, 2), out(1, 3)]);
}

#[test]
fn events_of_a_job_whose_submit_is_sent_again_wait_for_its_answer() {
    let mut h = Harness::up();
    let (_, rx) = h.ask(Request::Submit {
        spec: JobSpec::new("true"),
        detached: false,
    });
    h.sent();
    reconnect(&mut h);
    h.s.connected(h.now, &restored_welcome());
    let sent = h.sent();
    assert_eq!(sent[0], SubmitterMessage::Follow { jobs: vec![] });
    assert_eq!(request_seqs(&sent), vec![0]);
    // The manager kept events of the job since its restart, and sends them before it
    // answers the submit sent again (the answer before the restart was lost).
    h.job_event(0, 6, JobEvent::Started { worker: "w".into() });
    h.event(1, numbered(6, 1, 3, 3));
    assert_eq!(h.s.held_events(), 2);
    assert_eq!(
        h.s.beat(),
        SubmitterMessage::Heartbeat,
        "held: nothing acknowledged"
    );
    h.event(
        2,
        SessionEvent::Reply {
            request: 0,
            reply: Reply::Submitted(vec![JobId(6)]),
        },
    );
    let Ok(Ok(Answer::Follow(jobs))) = rx.try_recv() else {
        panic!("not answered")
    };
    let got: Vec<JobEvent> = jobs[0].1.try_iter().collect();
    assert_eq!(
        got,
        vec![
            JobEvent::Started { worker: "w".into() },
            JobEvent::Warning(
                "3 output message(s) of this job were lost while the manager restarted".into()
            ),
            out(1, 3)
        ]
    );
    // Once every submit sent again is answered, events of jobs not followed are dropped.
    h.job_event(3, 99, JobEvent::Queued);
    assert_eq!(h.s.held_events(), 0);
    assert_eq!(h.s.beat(), SubmitterMessage::Ack { next: 4 });
}
