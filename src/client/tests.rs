//! A [`Client`] against a fake manager on loopback: a thread that accepts with the
//! crate's own handshake and answers with hand-made frames, so that what the client
//! does on the wire (numbering, resuming, acknowledging) is seen as it is.

use super::*;
use crate::job::{Outcome, Stream};
use crate::link::Established;
use crate::protocol::{SessionEvent, SubmitterMessage, SubmitterWelcome};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};

const MANAGER: u64 = 77;
const SESSION: u64 = 5;

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

/// Accepts one submitter and reads its hello.
fn accept(listener: &TcpListener) -> (Established, SubmitterHello) {
    let (tcp, _) = listener.accept().unwrap();
    let (est, hello) = link::accept(Arc::new(tcp), None, deadline(), "fake".into()).unwrap();
    match hello {
        link::Hello::Submitter(h) => (est, h),
        other => panic!("{other:?}"),
    }
}

fn welcome(est: &mut Established, resumed: bool, next_request: u64) {
    let w = SubmitterWelcome {
        manager_id: MANAGER,
        session: SESSION,
        resumed,
        restored: false,
        next_request,
        heartbeat_interval_ms: 50,
        heartbeat_timeout_ms: 5000,
        reconnect_grace_ms: 20_000,
    };
    link::welcome(est, &w, Timing::adopted(50, 5000)).unwrap();
}

fn send(est: &Established, seq: u64, event: SessionEvent) {
    let msg = ToSubmitter::Event { seq, event };
    assert_ne!(
        est.tx.send_with(|buf| protocol::encode_into(buf, &msg)),
        link::Sent::Refused
    );
}

fn output(job: u64, line: u64) -> SessionEvent {
    SessionEvent::Job {
        job: JobId(job),
        event: JobEvent::Output {
            stream: Stream::Stdout,
            bytes: format!("line {line}\n").into_bytes(),
        },
    }
}

/// The client's next message other than a heartbeat; `None` when the link ended.
fn next(est: &mut Established) -> Option<SubmitterMessage> {
    let until = deadline();
    loop {
        if let Some(body) = est.reader.frame().unwrap() {
            let m: SubmitterMessage = protocol::decode(body).unwrap();
            if m != SubmitterMessage::Heartbeat {
                return Some(m);
            }
            continue;
        }
        if est.reader.ended() {
            return None;
        }
        match est.reader.fill(&est.tx) {
            Ok(link::Fill::Nothing) => {
                let fd = est.reader.socket().as_raw_fd();
                assert!(
                    net::wait_ready(fd, libc::POLLIN, Some(until)).unwrap(),
                    "the client said nothing for 30 s"
                );
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// The client's next request, skipping acknowledgements.
fn next_request(est: &mut Established) -> (u64, Request) {
    loop {
        match next(est).expect("a request") {
            SubmitterMessage::Request { seq, request } => return (seq, request),
            SubmitterMessage::Ack { .. } => {}
            other => panic!("{other:?}"),
        }
    }
}

/// Reads until the client acknowledges `upto`; every acknowledgement seen on the way.
fn acked_up_to(est: &mut Established, upto: u64) -> Vec<u64> {
    let mut acks = Vec::new();
    loop {
        match next(est).expect("an acknowledgement") {
            SubmitterMessage::Ack { next } => {
                acks.push(next);
                if next >= upto {
                    return acks;
                }
            }
            other => panic!("{other:?}"),
        }
    }
}

fn connect(listener: &TcpListener) -> Client {
    let port = listener.local_addr().unwrap().port();
    let mut config = ClientConfig::insecure_plaintext("127.0.0.1", port).name("test-client");
    config.backoff_initial = Duration::from_millis(10);
    config.backoff_max = Duration::from_millis(50);
    Client::connect(config).unwrap()
}

#[test]
fn a_cut_mid_stream_loses_nothing_every_event_arrives_once_in_order_and_requests_resume() {
    const LINES: u64 = 400;
    const CUT_AT: u64 = 150;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake = {
        let listener = listener.try_clone().unwrap();
        std::thread::spawn(move || {
            let (mut est, hello) = accept(&listener);
            assert_eq!(hello.name, "test-client");
            assert_eq!(hello.resume, None);
            welcome(&mut est, false, 0);
            let (seq, request) = next_request(&mut est);
            assert_eq!(seq, 0);
            assert!(matches!(
                request,
                Request::Submit {
                    detached: false,
                    ..
                }
            ));
            send(
                &est,
                0,
                SessionEvent::Reply {
                    request: 0,
                    reply: Reply::Submitted(vec![JobId(1)]),
                },
            );
            for line in 1..=CUT_AT {
                send(&est, line, output(1, line));
            }
            // The connection is cut with events on the way.
            est.tx.cut();
            drop(est);
            let (mut est, hello) = accept(&listener);
            let resume = hello.resume.expect("a resume");
            assert_eq!((resume.manager_id, resume.session), (MANAGER, SESSION));
            assert!(resume.next_event <= CUT_AT + 1, "{resume:?}");
            welcome(&mut est, true, 1);
            // From a little before what was asked: those are dropped as duplicates.
            for seq in resume.next_event.saturating_sub(5).max(1)..=LINES {
                send(&est, seq, output(1, seq));
            }
            let end = SessionEvent::Job {
                job: JobId(1),
                event: JobEvent::Finished(Outcome::Exited(0)),
            };
            send(&est, LINES + 1, end);
            // Every event is acknowledged in the end.
            acked_up_to(&mut est, LINES + 2);
            let (seq, request) = next_request(&mut est);
            assert_eq!((seq, request), (1, Request::Jobs));
            send(
                &est,
                LINES + 2,
                SessionEvent::Reply {
                    request: 1,
                    reply: Reply::Jobs(vec![]),
                },
            );
            assert_eq!(next(&mut est), Some(SubmitterMessage::Goodbye));
            resume.next_event
        })
    };
    let client = connect(&listener);
    let job = client.submit(JobSpec::new("ignored")).unwrap();
    assert_eq!(job.id(), JobId(1));
    let result = job.wait();
    let want: String = (1..=LINES).map(|i| format!("line {i}\n")).collect();
    assert_eq!(result.stdout_text(), want, "every line once, in order");
    assert_eq!(result.outcome, Outcome::Exited(0));
    assert_eq!(client.jobs().unwrap(), vec![]);
    client.close();
    let resumed_from = fake.join().unwrap();
    assert!(resumed_from >= 1, "resumed from event {resumed_from}");
}

#[test]
fn a_reader_that_is_behind_holds_back_the_acknowledgements_and_so_the_manager() {
    const LINES: u64 = 200;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let reading = Arc::new(AtomicBool::new(false));
    let (held_back, acked_33) = bounded::<()>(1);
    let fake = {
        let listener = listener.try_clone().unwrap();
        let reading = reading.clone();
        std::thread::spawn(move || {
            let (mut est, _) = accept(&listener);
            welcome(&mut est, false, 0);
            let (seq, _) = next_request(&mut est);
            send(
                &est,
                0,
                SessionEvent::Reply {
                    request: seq,
                    reply: Reply::Submitted(vec![JobId(3)]),
                },
            );
            for line in 1..=LINES {
                send(&est, line, output(3, line));
            }
            let end = SessionEvent::Job {
                job: JobId(3),
                event: JobEvent::Finished(Outcome::Exited(0)),
            };
            send(&est, LINES + 1, end);
            // Nobody reads yet: the acknowledgements stop at the reply and the 32
            // events the job's channel holds (the heartbeat tick sends them).
            let first = acked_up_to(&mut est, 1 + session::JOB_CHANNEL as u64);
            held_back.send(()).unwrap();
            assert_eq!(*first.last().unwrap(), 1 + session::JOB_CHANNEL as u64);
            // Only once the reader has started does anything further come.
            let mut later = Vec::new();
            loop {
                match next(&mut est).expect("an acknowledgement") {
                    SubmitterMessage::Ack { next } => {
                        if next > 1 + session::JOB_CHANNEL as u64 {
                            assert!(reading.load(Ordering::SeqCst), "acked {next} unread");
                        }
                        later.push(next);
                        if next == LINES + 2 {
                            break;
                        }
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert!(later.windows(2).all(|w| w[0] < w[1]), "{later:?}");
            est.tx.close(Shutdown::Write);
        })
    };
    let client = connect(&listener);
    let mut job = client.submit(JobSpec::new("ignored")).unwrap();
    // The job's channel fills up, the rest is held, and the manager hears of the
    // events taken only: then the reader starts.
    acked_33
        .recv_timeout(Duration::from_secs(30))
        .expect("acknowledged up to the held events");
    assert_eq!(job.events().len(), session::JOB_CHANNEL);
    reading.store(true, Ordering::SeqCst);
    let result = job.wait_timeout(Duration::from_secs(30)).expect("ended");
    let want: String = (1..=LINES).map(|i| format!("line {i}\n")).collect();
    assert_eq!(result.stdout_text(), want);
    fake.join().unwrap();
    drop(client);
}

#[test]
fn a_refusal_is_the_manager_s_reason_and_a_dead_port_is_an_error() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = std::thread::spawn(move || {
        let (est, _) = accept(&listener);
        link::refuse(&est, "this certificate may not submit");
    });
    let e = Client::connect(ClientConfig::insecure_plaintext("127.0.0.1", port))
        .err()
        .expect("refused");
    assert!(
        matches!(&e, Error::Refused(why) if why.contains("may not submit")),
        "{e}"
    );
    fake.join().unwrap();
    // Nobody listens there any more.
    let e = Client::connect(ClientConfig::insecure_plaintext("127.0.0.1", port))
        .err()
        .expect("no manager");
    assert!(e.to_string().contains("connecting to 127.0.0.1"), "{e}");
}

#[test]
fn stdin_bytes_not_taken_are_sent_again_after_a_cut_and_reach_the_manager_once_in_order() {
    use crate::protocol::STDIN_WINDOW;
    const TOTAL: usize = 700_000;
    let pattern: Vec<u8> = (0..TOTAL).map(|i| (i % 251) as u8).collect();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake = {
        let listener = listener.try_clone().unwrap();
        std::thread::spawn(move || {
            let (mut est, _) = accept(&listener);
            welcome(&mut est, false, 0);
            let (_, request) = next_request(&mut est);
            assert!(matches!(request, Request::Submit { ref spec, .. } if spec.interactive));
            let reply = Reply::Submitted(vec![JobId(1)]);
            send(&est, 0, SessionEvent::Reply { request: 0, reply });
            // What the manager has of the job's stdin, each byte once, by offset.
            let mut got: Vec<u8> = Vec::new();
            let mut taken = 0u64;
            let mut seq = 1;
            let mut cut = false;
            let eof = loop {
                let msg = next(&mut est).expect("the client's stdin");
                match msg {
                    SubmitterMessage::Stdin { job, offset, bytes } => {
                        assert_eq!(job, JobId(1));
                        assert!(offset <= got.len() as u64, "a gap at {offset}");
                        let end = offset + bytes.len() as u64;
                        assert!(end <= taken + STDIN_WINDOW, "beyond the window");
                        if end > got.len() as u64 {
                            got.extend_from_slice(&bytes[got.len() - offset as usize..]);
                        }
                    }
                    SubmitterMessage::StdinEof { offset, .. } => break offset,
                    SubmitterMessage::Ack { .. } => continue,
                    other => panic!("{other:?}"),
                }
                // A window's worth arrived: the job "takes" half of it.
                if got.len() as u64 == taken + STDIN_WINDOW {
                    taken += STDIN_WINDOW / 2;
                    let closed = false;
                    send(
                        &est,
                        seq,
                        SessionEvent::Stdin {
                            job: JobId(1),
                            taken,
                            closed,
                        },
                    );
                    seq += 1;
                    if !cut {
                        // The link is cut with bytes on the way and not taken.
                        cut = true;
                        est.tx.cut();
                        drop(est);
                        let (e, hello) = accept(&listener);
                        est = e;
                        let resume = hello.resume.expect("a resume");
                        seq = resume.next_event;
                        welcome(&mut est, true, 1);
                        // The manager forgot what it had beyond what was taken.
                        got.truncate(taken as usize);
                    }
                }
            };
            assert!(cut);
            assert_eq!(eof, TOTAL as u64);
            let end = SessionEvent::Job {
                job: JobId(1),
                event: JobEvent::Finished(Outcome::Exited(0)),
            };
            send(&est, seq, end);
            assert_eq!(next_goodbye(&mut est), Some(SubmitterMessage::Goodbye));
            got
        })
    };
    let client = connect(&listener);
    let job = client
        .submit(JobSpec::new("cat >/dev/null").interactive())
        .unwrap();
    let mut stdin = job.stdin().unwrap();
    use std::io::Write;
    stdin.write_all(&pattern).unwrap();
    stdin.close().unwrap();
    assert_eq!(job.wait().outcome, Outcome::Exited(0));
    // The job has ended: its stdin is closed.
    let e = client_stdin_error(&client);
    assert_eq!(e, std::io::ErrorKind::BrokenPipe);
    client.close();
    let got = fake.join().unwrap();
    assert!(got == pattern, "every byte once, in order");
}

/// A non-interactive job's handle has no stdin; an ended job's writer fails.
fn client_stdin_error(client: &Client) -> std::io::ErrorKind {
    let end = RemoteStdin {
        client: Arc::downgrade(&client.shared),
        job: JobId(1),
    };
    end.write(b"x").unwrap_err().kind()
}

/// The client's next message other than an acknowledgement.
fn next_goodbye(est: &mut Established) -> Option<SubmitterMessage> {
    loop {
        match next(est)? {
            SubmitterMessage::Ack { .. } => {}
            other => return Some(other),
        }
    }
}

fn numbered_output(job: u64, seq: u64) -> SessionEvent {
    SessionEvent::Output {
        job: JobId(job),
        attempt: 1,
        seq,
        stream: Stream::Stdout,
        bytes: format!("line {seq}\n").into_bytes(),
    }
}

#[test]
fn through_a_restart_of_the_manager_a_job_s_output_arrives_once_and_an_unanswered_request_is_answered()
 {
    const LINES: u64 = 100;
    const BEFORE: u64 = 50;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (asked, workers_asked) = bounded::<()>(1);
    let fake = {
        let listener = listener.try_clone().unwrap();
        std::thread::spawn(move || {
            let (mut est, _) = accept(&listener);
            welcome(&mut est, false, 0);
            let (seq, _) = next_request(&mut est);
            assert_eq!(seq, 0);
            send(
                &est,
                0,
                SessionEvent::Reply {
                    request: 0,
                    reply: Reply::Submitted(vec![JobId(1)]),
                },
            );
            for line in 0..BEFORE {
                send(&est, 1 + line, numbered_output(1, line));
            }
            acked_up_to(&mut est, 1 + BEFORE);
            asked.send(()).unwrap();
            let (seq, request) = next_request(&mut est);
            assert_eq!((seq, request), (1, Request::Workers));
            // The manager dies without answering; a new one with the same journal
            // (and so the same id) comes up on the same port.
            est.tx.cut();
            drop(est);
            let (mut est, hello) = accept(&listener);
            let resume = hello.resume.expect("a resume");
            assert_eq!(resume.next_event, 1 + BEFORE);
            let w = SubmitterWelcome {
                manager_id: MANAGER,
                session: SESSION,
                resumed: true,
                restored: true,
                next_request: 0,
                heartbeat_interval_ms: 50,
                heartbeat_timeout_ms: 5000,
                reconnect_grace_ms: 20_000,
            };
            link::welcome(&mut est, &w, Timing::adopted(50, 5000)).unwrap();
            let mut said = Vec::new();
            while said.len() < 2 {
                match next(&mut est).expect("the client's news") {
                    SubmitterMessage::Ack { .. } => {}
                    other => said.push(other),
                }
            }
            assert_eq!(
                said,
                vec![
                    SubmitterMessage::Follow {
                        jobs: vec![JobId(1)]
                    },
                    SubmitterMessage::Request {
                        seq: 1,
                        request: Request::Workers
                    }
                ]
            );
            let mut seq = resume.next_event;
            send(
                &est,
                seq,
                SessionEvent::Reply {
                    request: 1,
                    reply: Reply::Workers(vec![]),
                },
            );
            seq += 1;
            // The worker sends again from the oldest output it kept.
            for line in BEFORE - 10..LINES {
                send(&est, seq, numbered_output(1, line));
                seq += 1;
            }
            for _ in 0..2 {
                let end = SessionEvent::Job {
                    job: JobId(1),
                    event: JobEvent::Finished(Outcome::Exited(0)),
                };
                send(&est, seq, end);
                seq += 1;
            }
            loop {
                match next(&mut est).expect("a goodbye") {
                    SubmitterMessage::Ack { next } => assert!(next <= seq),
                    SubmitterMessage::Goodbye => break,
                    other => panic!("{other:?}"),
                }
            }
        })
    };
    let client = Arc::new(connect(&listener));
    let job = client.submit(JobSpec::new("ignored")).unwrap();
    let waiting = std::thread::spawn(move || job.wait());
    workers_asked
        .recv_timeout(Duration::from_secs(30))
        .expect("the job's first output acknowledged");
    let asking = {
        let client = client.clone();
        std::thread::spawn(move || client.workers())
    };
    let result = waiting.join().unwrap();
    let want: String = (0..LINES).map(|i| format!("line {i}\n")).collect();
    assert_eq!(result.stdout_text(), want, "every line once, in order");
    assert_eq!(result.outcome, Outcome::Exited(0));
    assert!(result.warnings.is_empty(), "{:?}", result.warnings);
    assert_eq!(asking.join().unwrap().unwrap(), vec![]);
    Arc::into_inner(client).unwrap().close();
    fake.join().unwrap();
}
