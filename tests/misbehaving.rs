//! A trusted worker that speaks the protocol wrongly: it holds a valid certificate,
//! does the real TLS handshake and sends a real hello (workpool's own link code, through
//! the `testing` feature), and then ignores `Pause`, skips output sequence numbers,
//! declines every `Run`, sends the largest text fields a frame holds, stops reading,
//! opens many connections with one certificate, or sends numbers that overflow. The
//! manager bounds each of these; and a worker given out-of-range numbers by its manager
//! refuses them rather than panic.

mod common;

use common::*;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use workpool::job::{JobId, JobSpec, Outcome, Stream};
use workpool::manager::{Manager, ManagerEvent};
use workpool::protocol::{ManagerMessage, OUTPUT_CHUNK, Welcome, WorkerHello, WorkerMessage};
use workpool::testing::{self, RawReader, RawWriter};
use workpool::tls::{Identity, TrustRoots};
use workpool::worker::Worker;
use workpool::{Error, ManagerConfig};

fn hello(name: &str, slots: u32) -> WorkerHello {
    WorkerHello {
        name: name.into(),
        tags: Default::default(),
        platform: "linux-x86_64".into(),
        slots,
        ahead: 0,
        manager_id: None,
        jobs: vec![],
        draining: false,
    }
}

/// Joins `manager` as a worker with `certs.workers[i]` and this hello.
fn join_with(
    certs: &Certs,
    manager: &Manager,
    i: usize,
    hello: &WorkerHello,
) -> workpool::Result<(Welcome, RawReader, RawWriter)> {
    let w = &certs.workers[i];
    testing::connect_worker(
        &manager.local_addr().to_string(),
        "127.0.0.1",
        &Identity::from_pem(w.cert_pem.as_bytes(), w.key_pem.as_bytes()).unwrap(),
        &TrustRoots::from_pem(certs.manager.cert_pem.as_bytes()).unwrap(),
        hello,
        DEADLINE,
    )
}

/// Joins as a worker that must be welcomed.
fn join(c: &Cluster, name: &str, slots: u32) -> (RawReader, RawWriter) {
    let (_, r, w) = join_with(&c.certs, &c.manager, 0, &hello(name, slots))
        .unwrap_or_else(|e| panic!("{name} was not welcomed: {e}"));
    r.set_read_timeout(Some(DEADLINE)).unwrap();
    (r, w)
}

/// The next message other than a heartbeat.
fn next(r: &mut RawReader) -> ManagerMessage {
    loop {
        match r.recv::<ManagerMessage>() {
            Ok(Some(ManagerMessage::Heartbeat)) => {}
            Ok(Some(m)) => return m,
            other => panic!("expected a message from the manager, got {other:?}"),
        }
    }
}

fn expect_run(r: &mut RawReader) -> JobId {
    match next(r) {
        ManagerMessage::Run { job, .. } => job,
        other => panic!("expected a Run, got {other:?}"),
    }
}

/// Waits for the manager to say that worker `name` left; returns why.
fn wait_left(events: &crossbeam_channel::Receiver<ManagerEvent>, name: &str) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match events.recv_deadline(deadline) {
            Ok(ManagerEvent::WorkerLeft {
                name: n, reason, ..
            }) if n == name => return reason,
            Ok(_) => {}
            Err(e) => panic!("worker {name} was not seen leaving before the deadline: {e}"),
        }
    }
}

/// Whether the manager's side of the link has ended: reads until EOF or an error.
fn cut_off(r: &mut RawReader) -> bool {
    loop {
        match r.recv::<ManagerMessage>() {
            Ok(Some(_)) => {}
            Ok(None) => return true,
            Err(Error::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

fn output(job: JobId, seq: u64, bytes: Vec<u8>) -> WorkerMessage {
    WorkerMessage::Output {
        job,
        stream: Stream::Stdout,
        seq,
        bytes,
    }
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

#[test]
fn a_worker_that_ignores_pause_is_disconnected_after_a_bounded_backlog() {
    let c = Cluster::new(0);
    let (mut r, mut w) = join(&c, "deaf", 1);
    wait_joined(&c.events, 1);
    // Nobody reads this job's events for now: the manager must pause it.
    let h = c.manager.submit(JobSpec::new("cat /dev/zero")).unwrap();
    let job = expect_run(&mut r);
    let pauses = std::thread::spawn(move || {
        let mut pauses = 0;
        while let Ok(Some(m)) = r.recv::<ManagerMessage>() {
            if m == (ManagerMessage::Pause { job }) {
                pauses += 1;
            }
        }
        pauses
    });
    // It sends output as fast as it can, Pause or not: at most 2.5 times the limit.
    let limit = 160usize << 20;
    let chunk = vec![b'z'; OUTPUT_CHUNK];
    let mut sent = 0usize;
    let mut seq = 0;
    let mut cut = false;
    while sent < limit {
        if w.send(&output(job, seq, chunk.clone())).is_err() {
            cut = true;
            break;
        }
        sent += chunk.len();
        seq += 1;
    }
    assert!(
        cut,
        "the manager took {} MiB of output after Pause without closing the link",
        sent >> 20
    );
    eprintln!(
        "the link was cut after {} MiB were sent ({} messages)",
        sent >> 20,
        seq
    );
    let reason = wait_left(&c.events, "deaf");
    assert!(reason.contains("after Pause"), "{reason}");
    assert!(pauses.join().unwrap() >= 1, "the manager asked for a pause");
    // What the manager held stayed within its limit, and the job still ends once.
    let (out, ends, _) = drain_job(h.events());
    assert!(out.len() <= 66 << 20, "{} MiB delivered", out.len() >> 20);
    assert!(out.iter().all(|&b| b == b'z'));
    assert_eq!(ends, vec![Outcome::WorkerLost]);
    assert!(c.manager.workers().is_empty());
}

#[test]
fn skipped_output_sequence_numbers_give_a_bounded_number_of_warnings() {
    let c = Cluster::new(0);
    let (mut r, mut w) = join(&c, "skipper", 1);
    wait_joined(&c.events, 1);
    let h = c.manager.submit(JobSpec::new("seq 5000")).unwrap();
    let job = expect_run(&mut r);
    // Every other sequence number is skipped: 4999 gaps of one message.
    for i in 0..5000u64 {
        w.send(&output(job, 2 * i, format!("{i}\n").into_bytes()))
            .unwrap();
    }
    w.send(&WorkerMessage::Finished {
        job,
        outcome: Outcome::Exited(0),
        cleanup_error: None,
    })
    .unwrap();
    let mut h = h;
    let result = h.wait_timeout(DEADLINE).expect("the job ends");
    assert_eq!(result.outcome, Outcome::Exited(0));
    let want: String = (0..5000).map(|i| format!("{i}\n")).collect();
    assert_eq!(
        result.stdout_text(),
        want,
        "every message that came is kept"
    );
    assert!(
        result.warnings.len() <= 2,
        "{} warnings for one job",
        result.warnings.len()
    );
    assert_eq!(
        result.warnings,
        vec![
            "1 output message(s) were lost while the worker reconnected".to_string(),
            "in all, 4999 output message(s) were lost in 4999 gaps".to_string(),
        ]
    );
    // (Pause and Resume come first: nobody read the job's events while it ran.)
    loop {
        match next(&mut r) {
            ManagerMessage::Ended { job: j } if j == job => break,
            ManagerMessage::Pause { job: j } | ManagerMessage::Resume { job: j } if j == job => {}
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_worker_that_stops_reading_is_cut_off_when_its_outbound_buffer_is_full() {
    // Long heartbeats: only the full buffer can end this link within the test.
    let c = Cluster::custom(
        0,
        |m| {
            m.heartbeat_interval = Duration::from_secs(1);
            m.heartbeat_timeout = Duration::from_secs(300);
        },
        |_, w| w,
    );
    // It never reads: the first `Run`s of 6 MiB fill the socket buffers, and the rest
    // wait in the link's buffer of unsent bytes, which holds at most 32 MiB.
    let (_r, _w) = join(&c, "sleeper", 8);
    wait_joined(&c.events, 1);
    let big = vec![b's'; 6 << 20];
    let handles: Vec<workpool::JobHandle> = (0..8)
        .map(|_| {
            c.manager
                .submit(JobSpec::new("cat >/dev/null").stdin(big.clone()))
                .unwrap()
        })
        .collect();
    let reason = wait_left(&c.events, "sleeper");
    assert!(
        reason.contains("outbound buffer is full (32 MiB unsent)"),
        "{reason}"
    );
    drop(handles);
    // The dispatcher never waited on it: it answers, and the pool goes on.
    assert!(c.manager.workers().is_empty());
    let pool = c.manager.subscribe();
    let _w = Worker::start(c.certs.worker_config(c.port(), 0, "fresh").slots(8)).unwrap();
    wait_joined(&pool, 1);
    let r = run(&c.manager, JobSpec::new("echo alive").priority(100));
    assert_eq!(r.stdout_text(), "alive\n");
}

#[test]
fn a_worker_that_declines_every_job_is_not_sent_it_again_and_the_job_runs_elsewhere() {
    let certs = Certs::new(2);
    let manager = Manager::bind(certs.manager_config()).unwrap();
    let pool = manager.subscribe();
    let (_, mut r, mut w) = join_with(&certs, &manager, 0, &hello("decliner", 1)).unwrap();
    wait_joined(&pool, 1);
    let _honest =
        Worker::start(certs.worker_config(manager.local_addr().port(), 1, "honest")).unwrap();
    wait_joined(&pool, 1);
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let decliner = std::thread::spawn(move || {
        while let Ok(Some(m)) = r.recv::<ManagerMessage>() {
            if let ManagerMessage::Run { job, .. } = m {
                // Enough to tell a loop from a single offer; then it gives up.
                if counted.fetch_add(1, Ordering::SeqCst) >= 100 {
                    w.cut();
                    return;
                }
                let reason = "no, thanks".to_string();
                if w.send(&WorkerMessage::Declined { job, reason }).is_err() {
                    return;
                }
            }
        }
    });
    // The decliner joined first, so it is offered the job first.
    let result = run(&manager, JobSpec::new("echo ran"));
    assert_eq!(result.outcome, Outcome::Exited(0));
    assert_eq!(result.stdout_text(), "ran\n");
    assert_eq!(result.worker.as_deref(), Some("honest"));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the job was sent to the worker that declined it again"
    );
    drop(manager);
    decliner.join().unwrap();
}

#[test]
fn maximum_size_text_fields_are_cut_and_escaped_before_they_are_logged_or_passed_on() {
    capture_logs(log::LevelFilter::Info);
    let c = Cluster::new(0);
    let (mut r, mut w) = join(&c, "verbose", 1);
    wait_joined(&c.events, 1);
    let h = c.manager.submit(JobSpec::new("true")).unwrap();
    // Texts as large as a frame holds (16 MiB), full of control characters and
    // terminal codes.
    let huge = |marker: &str, size: usize| {
        let mut s = format!("{marker}\n\u{1b}[2J\u{1b}]0;pwned\u{7}\r");
        while s.len() < size {
            s.push_str("line\nbreak\u{1b}[31m\0");
        }
        s
    };
    let job = expect_run(&mut r);
    w.send(&WorkerMessage::Declined {
        job,
        reason: huge("DECLINE-MARK", 15 << 20),
    })
    .unwrap();
    // Offered again after a rest; this time it "fails to start" with more huge texts.
    let again = expect_run(&mut r);
    assert_eq!(again, job);
    w.send(&WorkerMessage::Finished {
        job,
        outcome: Outcome::SpawnFailed(huge("SPAWN-MARK", 15 << 19)),
        cleanup_error: Some(huge("CLEANUP-MARK", 15 << 19)),
    })
    .unwrap();
    let mut h = h;
    let result = h.wait_timeout(DEADLINE).expect("the job ends");
    let Outcome::SpawnFailed(why) = &result.outcome else {
        panic!("{:?}", result.outcome);
    };
    for text in std::iter::once(why).chain(&result.warnings) {
        assert!(text.len() <= 4096 + 64, "{} bytes passed on", text.len());
        assert!(!has_control(text), "control characters passed on");
        assert!(text.contains("more bytes cut"), "{text}");
    }
    assert!(why.starts_with("SPAWN-MARK\\n\\u{1b}[2J\\u{1b}]0;pwned\\u{7}\\r"));
    assert!(
        result
            .warnings
            .iter()
            .any(|w| w.starts_with("CLEANUP-MARK\\n"))
    );
    for marker in ["DECLINE-MARK", "CLEANUP-MARK"] {
        let lines = logged(marker);
        assert!(!lines.is_empty(), "{marker} was not logged");
        for line in lines {
            assert!(
                line.len() <= 4096 + 256,
                "a log line of {} bytes",
                line.len()
            );
            assert!(!has_control(&line), "control characters logged");
        }
    }
    // Names, tags and platforms with control characters are refused at the hello.
    let mut tagged = hello("tagged", 1);
    tagged.tags.insert("gpu\u{1b}[8m".into());
    for bad in [hello("evil\nworker root joined", 1), tagged] {
        match join_with(&c.certs, &c.manager, 0, &bad) {
            Err(Error::Refused(why)) => {
                assert!(why.contains("control or invisible"), "{why}");
                assert!(!has_control(&why));
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("{:?} was welcomed", bad.name),
        }
    }
}

/// `CleanupFailed` before the job's `Finished` reaches the submitter as a warning, cut
/// and escaped; after it (the job no longer routed), a flood of them is logged a bounded
/// number of times.
#[test]
fn cleanup_failures_reach_the_submitter_and_a_flood_after_the_end_is_logged_boundedly() {
    capture_logs(log::LevelFilter::Info);
    let c = Cluster::new(0);
    let (mut r, mut w) = join(&c, "untidy", 1);
    wait_joined(&c.events, 1);
    let mut h = c.manager.submit(JobSpec::new("true")).unwrap();
    let job = expect_run(&mut r);
    let error = format!("CLEANUP-EARLY\u{1b}[2J{}", "x".repeat(10_000));
    w.send(&WorkerMessage::CleanupFailed { job, error })
        .unwrap();
    w.send(&WorkerMessage::Finished {
        job,
        outcome: Outcome::Exited(0),
        cleanup_error: None,
    })
    .unwrap();
    let result = h.wait_timeout(DEADLINE).expect("the job ends");
    assert_eq!(result.outcome, Outcome::Exited(0));
    match &result.warnings[..] {
        [warning] => {
            assert!(warning.starts_with("CLEANUP-EARLY\\u{1b}[2J"), "{warning}");
            assert!(warning.len() <= 4096 + 64 && !has_control(warning));
        }
        other => panic!("{other:?}"),
    }
    for _ in 0..1000 {
        w.send(&WorkerMessage::CleanupFailed {
            job,
            error: "CLEANUP-LATE".into(),
        })
        .unwrap();
    }
    // A second job's ending arrives after all of them: by then they have been read.
    let h2 = c.manager.submit(JobSpec::new("true")).unwrap();
    loop {
        match next(&mut r) {
            ManagerMessage::Run { job: j, .. } => {
                w.send(&WorkerMessage::Finished {
                    job: j,
                    outcome: Outcome::Exited(0),
                    cleanup_error: None,
                })
                .unwrap();
                break;
            }
            ManagerMessage::Ended { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    let mut h2 = h2;
    assert_eq!(
        h2.wait_timeout(DEADLINE)
            .expect("the second job ends")
            .outcome,
        Outcome::Exited(0)
    );
    let late = logged("CLEANUP-LATE").len();
    assert!(
        (1..=10).contains(&late),
        "{late} lines logged for 1000 reports"
    );
}

#[test]
fn one_certificate_cannot_hold_more_than_the_allowed_connections() {
    let c = Cluster::new(0);
    // The default allows 4.
    let held: Vec<(RawReader, RawWriter)> = (0..4)
        .map(|i| join(&c, &format!("same-cert-{i}"), 1))
        .collect();
    wait_joined(&c.events, 4);
    for i in 4..20 {
        match join_with(
            &c.certs,
            &c.manager,
            0,
            &hello(&format!("same-cert-{i}"), 1),
        ) {
            Err(Error::Refused(why)) => assert!(
                why.contains("already holds 4 connection(s)")
                    && why.contains("max_connections_per_certificate = 4"),
                "{why}"
            ),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("connection {} with one certificate was welcomed", i + 1),
        }
    }
    assert_eq!(c.manager.workers().len(), 4);
    // A place freed is a place taken.
    held[0].1.cut();
    wait_until("the manager has seen the cut", || {
        c.manager.workers().len() == 3
    });
    let _again = join(&c, "same-cert-again", 1);
    // A lower limit, set in the configuration.
    let c = Cluster::custom(0, |m| m.max_connections_per_certificate = 1, |_, w| w);
    let _one = join(&c, "only", 1);
    let refused = join_with(&c.certs, &c.manager, 0, &hello("second", 1));
    assert!(matches!(refused, Err(Error::Refused(why)) if why.contains("= 1)")));
    let mut zero = c.certs.manager_config();
    zero.max_connections_per_certificate = 0;
    assert!(matches!(Manager::bind(zero), Err(Error::InvalidConfig(_))));
}

#[test]
fn an_output_seq_of_u64_max_closes_the_link_without_a_panic_or_a_ghost_worker() {
    let c = Cluster::new(0);
    let (mut r, mut w) = join(&c, "overflow", 1);
    wait_joined(&c.events, 1);
    let h = c.manager.submit(JobSpec::new("echo a")).unwrap();
    let job = expect_run(&mut r);
    w.send(&output(job, 0, b"a\n".to_vec())).unwrap();
    w.send(&output(job, u64::MAX, b"b\n".to_vec())).unwrap();
    let reason = wait_left(&c.events, "overflow");
    assert!(
        reason.contains("output seq 18446744073709551615 is out of range"),
        "{reason}"
    );
    // Its entry is gone, and so is the manager's end of the connection.
    assert!(c.manager.workers().is_empty());
    assert!(cut_off(&mut r), "the manager still holds the connection");
    let (out, ends, _) = drain_job(h.events());
    assert_eq!((out, ends), (b"a\n".to_vec(), vec![Outcome::WorkerLost]));
    // The manager goes on: the same certificate joins again and works.
    let (mut r, mut w) = join(&c, "overflow", 1);
    let h = c.manager.submit(JobSpec::new("echo c")).unwrap();
    let job = expect_run(&mut r);
    w.send(&output(job, 0, b"c\n".to_vec())).unwrap();
    w.send(&WorkerMessage::Finished {
        job,
        outcome: Outcome::Exited(0),
        cleanup_error: None,
    })
    .unwrap();
    let mut h = h;
    assert_eq!(h.wait_timeout(DEADLINE).unwrap().stdout_text(), "c\n");
}

#[test]
fn timeouts_and_graces_of_years_are_refused_by_the_manager() {
    let c = Cluster::new(0);
    for spec in [
        JobSpec::new("true").timeout(Duration::MAX),
        JobSpec::new("true").timeout(Duration::from_secs(400 * 86_400)),
        JobSpec::new("true").kill_grace(Duration::MAX),
    ] {
        match c.manager.submit(spec) {
            Err(Error::InvalidJob(why)) => assert!(why.contains("at most 365 days"), "{why}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a job with a timeout or grace of years was accepted"),
        }
    }
    let certs = Certs::new(1);
    for set in [
        (|m: &mut ManagerConfig| m.reconnect_grace = Duration::MAX) as fn(&mut ManagerConfig),
        |m| m.shutdown_grace = Duration::from_secs(u64::MAX),
        |m| m.heartbeat_timeout = Duration::from_secs(3600),
    ] {
        let mut config = certs.manager_config();
        set(&mut config);
        assert!(matches!(
            Manager::bind(config),
            Err(Error::InvalidConfig(_))
        ));
    }
}

/// A manager made by hand sends a real worker a welcome and a `Run` with numbers of
/// years: the worker neither panics nor goes silent.
#[test]
fn a_worker_given_out_of_range_numbers_refuses_the_job_and_keeps_its_heartbeat() {
    let certs = Certs::new(1);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let worker = Worker::start(certs.worker_config(port, 0, "target")).unwrap();
    let (tcp, _) = listener.accept().unwrap();
    let welcome = Welcome {
        manager_id: 42,
        worker_id: 1,
        heartbeat_interval_ms: u64::MAX,
        heartbeat_timeout_ms: 6000,
        reconnect_grace_ms: u64::MAX,
        resume: vec![],
    };
    let (hello, mut r, mut w) = testing::accept_worker(
        tcp,
        &certs.manager_identity(),
        &certs.worker_roots(),
        &welcome,
        DEADLINE,
    )
    .unwrap();
    assert_eq!(hello.name, "target");
    r.set_read_timeout(Some(DEADLINE)).unwrap();
    let spec = JobSpec::new("sleep 1")
        .timeout(Duration::MAX)
        .kill_grace(Duration::MAX);
    w.send(&ManagerMessage::Run {
        job: JobId(1),
        spec,
        ahead: false,
    })
    .unwrap();
    let (mut refused, mut heartbeat) = (None, false);
    while refused.is_none() || !heartbeat {
        match r.recv::<WorkerMessage>() {
            Ok(Some(WorkerMessage::Heartbeat)) => heartbeat = true,
            Ok(Some(WorkerMessage::Finished { job, outcome, .. })) => {
                assert_eq!(job, JobId(1));
                refused = Some(outcome);
            }
            Ok(Some(other)) => panic!("{other:?}"),
            other => panic!("the worker went silent: {other:?}"),
        }
    }
    match refused.unwrap() {
        Outcome::Rejected(why) => assert!(why.contains("365 days"), "{why}"),
        other => panic!("{other:?}"),
    }
    drop(worker);
}

/// The state letter of a process in `/proc/PID/stat` (`R`, `S`, `Z`, ...), if it exists.
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// A manager made by hand stops reading while a job floods its output: the worker's
/// link fills up and its writer blocks in a socket write. The worker still acts on the
/// `Cancel` that comes next (nothing that handles the manager's messages waits for the
/// link), and the job's process ends.
#[test]
fn a_worker_whose_manager_stops_reading_still_cancels_its_job() {
    let certs = Certs::new(1);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut config = certs.worker_config(port, 0, "flooded");
    config.reconnect_buffer = 1 << 20;
    let worker = Worker::start(config).unwrap();
    let (tcp, _) = listener.accept().unwrap();
    // Heartbeats that cannot time out during the test.
    let welcome = Welcome {
        manager_id: 42,
        worker_id: 1,
        heartbeat_interval_ms: 1000,
        heartbeat_timeout_ms: 600_000,
        reconnect_grace_ms: 600_000,
        resume: vec![],
    };
    let (_, mut r, mut w) = testing::accept_worker(
        tcp,
        &certs.manager_identity(),
        &certs.worker_roots(),
        &welcome,
        DEADLINE,
    )
    .unwrap();
    r.set_read_timeout(Some(DEADLINE)).unwrap();
    w.send(&ManagerMessage::Run {
        job: JobId(1),
        spec: JobSpec::new("echo $$; exec yes flood"),
        ahead: false,
    })
    .unwrap();
    let pid: i32 = loop {
        match r.recv::<WorkerMessage>() {
            Ok(Some(WorkerMessage::Output { bytes, .. })) => {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                break text.lines().next().unwrap().trim().parse().unwrap();
            }
            Ok(Some(WorkerMessage::Heartbeat)) => {}
            other => panic!("{other:?}"),
        }
    };
    // From here nothing is read. Once the socket is full, the writer blocks, the
    // worker's buffer for the job fills and the job is paused on its pipe: `yes` then
    // sleeps in its write for good.
    let deadline = Instant::now() + DEADLINE;
    let mut asleep_since: Option<Instant> = None;
    while asleep_since.is_none_or(|t| t.elapsed() < Duration::from_millis(300)) {
        assert!(Instant::now() < deadline, "the job was never held back");
        match process_state(pid) {
            Some('S') => {
                asleep_since.get_or_insert_with(Instant::now);
            }
            Some(_) => asleep_since = None,
            None => panic!("the job ended by itself"),
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    w.send(&ManagerMessage::Cancel { job: JobId(1) }).unwrap();
    let deadline = Instant::now() + DEADLINE;
    while matches!(process_state(pid), Some(s) if s != 'Z') {
        assert!(
            Instant::now() < deadline,
            "the cancel was not acted on while the link was full"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    w.cut();
    worker.stop();
}

#[test]
fn the_cli_manager_takes_its_limit_of_connections_per_certificate() {
    use std::process::{Command, Stdio};
    let dir = scratch("misbehaving-cli");
    let certs = Certs::new(1);
    certs.write_to(&dir);
    // A limit of 0 is refused with the reason.
    let out = Command::new(cli())
        .args(manager_args(&dir))
        .args(["--max-connections-per-certificate", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_connections_per_certificate must be at least 1"),
        "{err}"
    );
    // A limit of 1: a second connection with worker-0's certificate is refused.
    let CliManager {
        mut child,
        addr,
        stdout: _stdout,
    } = start_cli_manager_with(&dir, &["--max-connections-per-certificate", "1"]);
    let addr = addr.to_string();
    let join_cli = |name: &str| {
        let w = &certs.workers[0];
        testing::connect_worker(
            &addr,
            "127.0.0.1",
            &Identity::from_pem(w.cert_pem.as_bytes(), w.key_pem.as_bytes()).unwrap(),
            &TrustRoots::from_pem(certs.manager.cert_pem.as_bytes()).unwrap(),
            &hello(name, 1),
            DEADLINE,
        )
    };
    let _first = join_cli("first").unwrap();
    match join_cli("second") {
        Err(Error::Refused(why)) => assert!(why.contains("= 1)"), "{why}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a second connection with one certificate was welcomed"),
    }
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    std::fs::remove_dir_all(dir).unwrap();
}

/// The next `Timing` the manager sends on this link, skipping heartbeats and saying
/// something (a heartbeat) first so that the manager's link thread wakes up.
fn next_timing(r: &mut RawReader, w: &mut RawWriter) -> (u64, u64, u64) {
    w.send(&WorkerMessage::Heartbeat).unwrap();
    match next(r) {
        ManagerMessage::Timing {
            heartbeat_interval_ms,
            heartbeat_timeout_ms,
            reconnect_grace_ms,
        } => (
            heartbeat_interval_ms,
            heartbeat_timeout_ms,
            reconnect_grace_ms,
        ),
        other => panic!("expected a Timing, got {other:?}"),
    }
}

#[test]
fn heartbeats_stretch_as_workers_join_and_shrink_back_as_they_leave() {
    // One heartbeat a second at most: the interval grows with every worker (from
    // 100 ms / 1 s / 2 s configured), the timeout and the grace with it, and connected
    // workers are told; a real worker keeps working through every change.
    let c = Cluster::custom(
        1,
        |m| {
            m.max_heartbeats_per_second = 1;
            m.heartbeat_interval = Duration::from_millis(100);
            m.heartbeat_timeout = Duration::from_secs(1);
            m.reconnect_grace = Duration::from_secs(2);
        },
        |_, w| w,
    );
    let welcome = |name: &str| {
        let (welcome, r, w) = join_with(&c.certs, &c.manager, 0, &hello(name, 1))
            .unwrap_or_else(|e| panic!("{name} was not welcomed: {e}"));
        r.set_read_timeout(Some(DEADLINE)).unwrap();
        (welcome, r, w)
    };
    let told = |w: &Welcome| {
        (
            w.heartbeat_interval_ms,
            w.heartbeat_timeout_ms,
            w.reconnect_grace_ms,
        )
    };
    // With w0, two links: every 2 s, timeout 20 s, grace 2 + 19 + 1.9 s.
    let (wa, mut ra, mut xa) = welcome("raw-a");
    assert_eq!(told(&wa), (2000, 20_000, 22_900));
    // Three: every 3 s; the first raw worker is told.
    let (wb, _rb, xb) = welcome("raw-b");
    assert_eq!(told(&wb), (3000, 30_000, 33_900));
    assert_eq!(next_timing(&mut ra, &mut xa), (3000, 30_000, 33_900));
    // One leaves: back to every 2 s (a third less: news).
    xb.cut();
    wait_left(&c.events, "raw-b");
    assert_eq!(next_timing(&mut ra, &mut xa), (2000, 20_000, 22_900));
    // The real worker went through the same changes and still runs jobs (the raw one
    // leaves first, so that the job can only go to it).
    xa.cut();
    wait_left(&c.events, "raw-a");
    let out = run(&c.manager, JobSpec::new("echo still here"));
    assert_eq!(out.outcome, exited(0));
    assert_eq!(out.stdout, b"still here\n");
    assert!(
        c.manager.workers().iter().any(|w| w.name == "w0"),
        "w0 stayed"
    );
}
