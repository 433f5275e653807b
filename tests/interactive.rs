//! Interactive jobs: a job's stdin written while it runs, with flow control end to end,
//! and a terminal. The first tests put a raw worker (workpool's own link code, through
//! the `testing` feature) in front of the manager and answer its stdin by hand; the
//! rest run real workers, locally and through a remote client and a relay that cuts.

mod common;

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};
use workpool::job::{JobEvent, JobSpec, Outcome, PtySize};
use workpool::manager::Manager;
use workpool::protocol::{
    HeldJob, ManagerMessage, STDIN_WINDOW, Welcome, WorkerHello, WorkerMessage,
};
use workpool::testing::{self, RawReader, RawWriter};
use workpool::tls::{Identity, TrustRoots};
use workpool::{Client, ClientConfig, JobHandle, JobStdin};

const DEADLINE: Duration = Duration::from_secs(30);

fn hello(name: &str, manager_id: Option<u64>, jobs: Vec<HeldJob>) -> WorkerHello {
    WorkerHello {
        name: name.into(),
        tags: Default::default(),
        platform: "linux-x86_64".into(),
        slots: 1,
        ahead: 0,
        manager_id,
        jobs,
        draining: false,
    }
}

fn join(certs: &Certs, manager: &Manager, hello: &WorkerHello) -> (Welcome, RawReader, RawWriter) {
    let w = &certs.workers[0];
    let (welcome, r, w) = testing::connect_worker(
        &manager.local_addr().to_string(),
        "127.0.0.1",
        &Identity::from_pem(w.cert_pem.as_bytes(), w.key_pem.as_bytes()).unwrap(),
        &TrustRoots::from_pem(certs.manager.cert_pem.as_bytes()).unwrap(),
        hello,
        DEADLINE,
    )
    .unwrap();
    r.set_read_timeout(Some(DEADLINE)).unwrap();
    (welcome, r, w)
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

/// Reads `StdinData` until the stream has reached `upto` bytes; checks each starts where
/// the last ended and none goes beyond `taken` + the window.
fn read_stdin_to(r: &mut RawReader, from: u64, upto: u64, taken: u64) -> Vec<u8> {
    let mut got = Vec::new();
    let mut at = from;
    while at < upto {
        match next(r) {
            ManagerMessage::StdinData { offset, bytes, .. } => {
                assert_eq!(offset, at, "the stream goes on where it was");
                at += bytes.len() as u64;
                assert!(at <= taken + STDIN_WINDOW, "sent beyond the window");
                got.extend_from_slice(&bytes);
            }
            other => panic!("expected stdin, got {other:?}"),
        }
    }
    assert_eq!(at, upto);
    got
}

/// Writes `bytes` to the job's stdin on a thread of its own; the result comes back on
/// the channel.
fn write_on_thread(
    mut stdin: JobStdin,
    bytes: Vec<u8>,
) -> crossbeam_channel::Receiver<std::io::Result<()>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(stdin.write_all(&bytes));
    });
    rx
}

/// A manager, a raw worker, and an interactive job that the worker was told to run.
fn started(certs: &Certs, spec: JobSpec) -> (Manager, JobHandle, RawReader, RawWriter, u64) {
    let manager = Manager::bind(certs.manager_config()).unwrap();
    let (welcome, mut r, w) = join(certs, &manager, &hello("raw", None, vec![]));
    let job = manager.submit(spec).unwrap();
    match next(&mut r) {
        ManagerMessage::Run { job: id, .. } => assert_eq!(id, job.id()),
        other => panic!("expected the run, got {other:?}"),
    }
    (manager, job, r, w, welcome.manager_id)
}

#[test]
fn the_writer_waits_at_the_window_and_goes_on_as_the_worker_takes_bytes() {
    let certs = Certs::new(1);
    let (manager, job, mut r, mut w, _) = started(&certs, JobSpec::new("cat").interactive());
    let total = 3 * STDIN_WINDOW as usize;
    let pattern: Vec<u8> = (0..total).map(|i| (i % 253) as u8).collect();
    let done = write_on_thread(job.stdin().unwrap(), pattern.clone());
    // One window arrives, and nothing beyond it (`read_stdin_to` checks each message).
    let mut got = read_stdin_to(&mut r, 0, STDIN_WINDOW, 0);
    assert!(done.try_recv().is_err(), "the writer waits at the window");
    // The job takes a window at a time: the writer goes on each time.
    for round in 1..3u64 {
        w.send(&WorkerMessage::StdinTaken {
            job: job.id(),
            upto: round * STDIN_WINDOW,
        })
        .unwrap();
        got.extend(read_stdin_to(
            &mut r,
            round * STDIN_WINDOW,
            (round + 1) * STDIN_WINDOW,
            round * STDIN_WINDOW,
        ));
    }
    done.recv_timeout(DEADLINE)
        .expect("the writer returned")
        .unwrap();
    assert!(got == pattern, "every byte once, in order");
    job.stdin().unwrap().close().unwrap();
    assert_eq!(
        next(&mut r),
        ManagerMessage::StdinEof {
            job: job.id(),
            offset: total as u64
        }
    );
    job.resize(3, 4).unwrap_err(); // not a terminal job
    w.send(&WorkerMessage::Finished {
        job: job.id(),
        outcome: Outcome::Exited(0),
        cleanup_error: None,
    })
    .unwrap();
    assert_eq!(job.wait().outcome, Outcome::Exited(0));
    manager.shutdown_within(Duration::ZERO);
}

#[test]
fn a_closed_stdin_lets_a_waiting_writer_go_with_broken_pipe() {
    let certs = Certs::new(1);
    let (manager, job, mut r, mut w, _) = started(&certs, JobSpec::new("head -c 1").interactive());
    let done = write_on_thread(job.stdin().unwrap(), vec![b'x'; 2 * STDIN_WINDOW as usize]);
    read_stdin_to(&mut r, 0, STDIN_WINDOW, 0);
    // The job read one byte and closed its stdin.
    w.send(&WorkerMessage::StdinClosed {
        job: job.id(),
        upto: 1,
    })
    .unwrap();
    let e = done
        .recv_timeout(DEADLINE)
        .expect("the writer returned")
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
    assert_eq!(e.to_string(), "stdin closed");
    let again = job.stdin().unwrap().write(b"y").unwrap_err();
    assert_eq!(again.kind(), std::io::ErrorKind::BrokenPipe);
    w.send(&WorkerMessage::Finished {
        job: job.id(),
        outcome: Outcome::Exited(0),
        cleanup_error: None,
    })
    .unwrap();
    assert_eq!(job.wait().outcome, Outcome::Exited(0));
    manager.shutdown_within(Duration::ZERO);
}

#[test]
fn a_returning_worker_gets_the_stdin_again_from_what_it_says_it_took() {
    let certs = Certs::new(1);
    let mut config = certs.manager_config();
    config.reconnect_grace = Duration::from_secs(30);
    let manager = Manager::bind(config).unwrap();
    let (welcome, mut r, mut w) = join(&certs, &manager, &hello("raw", None, vec![]));
    let job = manager.submit(JobSpec::new("cat").pty(24, 80)).unwrap();
    assert!(matches!(next(&mut r), ManagerMessage::Run { .. }));
    let mut stdin = job.stdin().unwrap();
    stdin.write_all(b"hello, ").unwrap();
    assert_eq!(read_stdin_to(&mut r, 0, 7, 0), b"hello, ");
    w.send(&WorkerMessage::StdinTaken {
        job: job.id(),
        upto: 2,
    })
    .unwrap();
    // The link is cut; the job's stdin goes on being written and resized meanwhile.
    w.cut();
    drop((r, w));
    wait_until("the worker's loss is noticed", || {
        manager.workers().is_empty()
    });
    stdin.write_all(b"world").unwrap();
    stdin.close().unwrap();
    job.resize(30, 100).unwrap();
    // It comes back having taken 5 bytes: it is sent the rest from there, then the end.
    let held = HeldJob {
        job: job.id(),
        finished: false,
        ahead: false,
        stdin_taken: 5,
    };
    let (back, mut r, mut w) = join(
        &certs,
        &manager,
        &hello("raw", Some(welcome.manager_id), vec![held]),
    );
    assert_eq!(back.resume, vec![(job.id(), 0)]);
    assert_eq!(
        next(&mut r),
        ManagerMessage::Resize {
            job: job.id(),
            size: PtySize {
                rows: 30,
                cols: 100
            }
        }
    );
    assert_eq!(read_stdin_to(&mut r, 5, 12, 5), b", world");
    assert_eq!(
        next(&mut r),
        ManagerMessage::StdinEof {
            job: job.id(),
            offset: 12
        }
    );
    w.send(&WorkerMessage::Finished {
        job: job.id(),
        outcome: Outcome::Exited(0),
        cleanup_error: None,
    })
    .unwrap();
    assert_eq!(job.wait().outcome, Outcome::Exited(0));
    manager.shutdown_within(Duration::ZERO);
}

#[test]
fn a_plain_job_has_no_stdin_writer_and_an_interactive_one_is_not_retried() {
    let certs = Certs::new(1);
    let manager = Manager::bind(certs.manager_config()).unwrap();
    let job = manager.submit(JobSpec::new("true")).unwrap();
    let e = job.stdin().unwrap_err().to_string();
    assert!(e.contains("is not interactive"), "{e}");
    let e = job.resize(10, 10).unwrap_err().to_string();
    assert!(e.contains("no terminal"), "{e}");
    let Err(e) = manager.submit(JobSpec::new("cat").interactive().retries(1)) else {
        panic!("an interactive job with retries was taken");
    };
    let e = e.to_string();
    assert!(e.contains("not retried"), "{e}");
    manager.shutdown_within(Duration::ZERO);
}

// ---- with real workers ----

/// Reads the job's output until it holds `needle`; what was read.
fn await_output(events: &crossbeam_channel::Receiver<JobEvent>, needle: &str) -> String {
    let deadline = Instant::now() + DEADLINE;
    let mut seen = String::new();
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(JobEvent::Output { bytes, .. }) => seen.push_str(&String::from_utf8_lossy(&bytes)),
            Ok(JobEvent::Finished(o)) => panic!("ended ({o:?}) before {needle:?}; saw {seen:?}"),
            Ok(_) => {}
            Err(_) => panic!("no {needle:?} in time; saw {seen:?}"),
        }
    }
    seen
}

#[test]

fn cat_echoes_each_line_before_the_next_is_written() {
    let certs = Certs::new(1);
    let (manager, _worker) = certs.manager_and_worker(certs.manager_config(), 1);
    let job = manager.submit(JobSpec::new("cat").interactive()).unwrap();
    let mut stdin = job.stdin().unwrap();
    for i in 0..20 {
        let line = format!("line {i}\n");
        stdin.write_all(line.as_bytes()).unwrap();
        await_output(job.events(), &line);
    }
    stdin.close().unwrap();
    let result = job.wait();
    assert_eq!(result.outcome, Outcome::Exited(0));
}

#[test]

fn head_takes_one_byte_and_the_writer_gets_stdin_closed_not_a_hang() {
    let certs = Certs::new(1);
    let (manager, _worker) = certs.manager_and_worker(certs.manager_config(), 1);
    let job = manager
        .submit(JobSpec::new("head -c 1").interactive())
        .unwrap();
    let done = write_on_thread(job.stdin().unwrap(), vec![b'z'; 8 << 20]);
    let e = done
        .recv_timeout(DEADLINE)
        .expect("the writer returned")
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
    let result = job.wait();
    assert_eq!(result.outcome, Outcome::Exited(0));
    assert_eq!(result.stdout, b"z");
}

/// This process's resident memory, in bytes (Linux).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[test]

fn a_job_that_never_reads_holds_a_100_mib_writer_and_memory_stays_bounded() {
    let certs = Certs::new(1);
    let (manager, _worker) = certs.manager_and_worker(certs.manager_config(), 1);
    let job = manager
        .submit(JobSpec::new("sleep 600").interactive())
        .unwrap();
    let before = rss();
    // 100 MiB offered in 1 MiB writes; the writer stops at the window (the manager's
    // and the worker's, both in this process), and stays there.
    let (tx, progress) = crossbeam_channel::unbounded();
    let mut stdin = job.stdin().unwrap();
    std::thread::spawn(move || {
        let chunk = vec![b'q'; 1 << 20];
        for _ in 0..100 {
            let mut at = 0;
            while at < chunk.len() {
                match stdin.write(&chunk[at..]) {
                    Ok(n) => {
                        at += n;
                        let _ = tx.send(n);
                    }
                    Err(e) => {
                        let _ = tx.send(0);
                        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
                        return;
                    }
                }
            }
        }
    });
    // Wait until a window has gone (the writer is then at the window or beyond it).
    let mut written = 0usize;
    while written < STDIN_WINDOW as usize {
        written += progress.recv_timeout(DEADLINE).expect("the writer wrote");
    }
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "memory grew by {grown} bytes for a job that reads nothing"
    );
    job.cancel().unwrap();
    assert_eq!(job.wait().outcome, Outcome::Cancelled);
    // The waiting writer was let go with the job's end, having written only what the
    // windows and the job's pipe hold, not the 100 MiB offered.
    loop {
        match progress
            .recv_timeout(DEADLINE)
            .expect("the writer was let go")
        {
            0 => break,
            n => written += n,
        }
    }
    assert!(
        written < 16 << 20,
        "{written} bytes were taken for a job that reads nothing"
    );
    let grown = rss().saturating_sub(before);
    assert!(grown < 64 << 20, "memory grew by {grown} bytes");
}

#[test]

fn a_terminal_job_has_a_tty_its_size_changes_and_a_line_is_read() {
    let certs = Certs::new(1);
    let (manager, _worker) = certs.manager_and_worker(certs.manager_config(), 1);
    let job = manager.submit(JobSpec::new("tty").pty(24, 80)).unwrap();
    let result = job.wait();
    assert!(
        result.stdout_text().starts_with("/dev/pts/"),
        "{:?}",
        result.stdout_text()
    );
    let job = manager
        .submit(JobSpec::new("stty size; read x; stty size; read line; echo got:$line").pty(24, 80))
        .unwrap();
    await_output(job.events(), "24 80");
    job.resize(40, 120).unwrap();
    let mut stdin = job.stdin().unwrap();
    stdin.write_all(b"\n").unwrap();
    await_output(job.events(), "40 120");
    stdin.write_all(b"typed here\n").unwrap();
    await_output(job.events(), "got:typed here");
    assert_eq!(job.wait().outcome, Outcome::Exited(0));
}

#[test]

fn ctrl_c_through_the_terminal_ends_sleep_with_sigint() {
    let certs = Certs::new(1);
    let (manager, _worker) = certs.manager_and_worker(certs.manager_config(), 1);
    let mut job = manager
        .submit(JobSpec::new("echo ready; exec sleep 100").pty(24, 80))
        .unwrap();
    await_output(job.events(), "ready");
    job.stdin().unwrap().write_all(&[0x03]).unwrap();
    let result = job
        .wait_timeout(DEADLINE)
        .expect("the job ended after Ctrl-C");
    assert_eq!(result.outcome, Outcome::Signaled(libc::SIGINT));
}

#[test]

fn a_relay_cut_during_a_remote_session_loses_and_duplicates_no_stdin_byte() {
    let certs = Certs::new(2);
    let mut config = certs.submitters_manager_config();
    config.reconnect_grace = Duration::from_secs(20);
    let (manager, _worker) = certs.manager_and_worker(config, 1);
    let relay = Relay::start(manager.local_addr());
    let s = &certs.workers[1];
    let mut cc = ClientConfig::new(
        "127.0.0.1",
        relay.port,
        Identity::from_pem(s.cert_pem.as_bytes(), s.key_pem.as_bytes()).unwrap(),
        TrustRoots::from_pem(certs.manager.cert_pem.as_bytes()).unwrap(),
    );
    cc.backoff_initial = Duration::from_millis(10);
    cc.backoff_max = Duration::from_millis(100);
    let client = Client::connect(cc).unwrap();
    // The job counts what it reads and echoes a checksum at the end.
    let job = client.submit(JobSpec::new("cksum").interactive()).unwrap();
    let data: Vec<u8> = (0..6_000_000u64).map(|i| (i * 7 % 256) as u8).collect();
    let mut stdin = job.stdin().unwrap();
    for (i, piece) in data.chunks(500_000).enumerate() {
        stdin.write_all(piece).unwrap();
        if i % 4 == 1 {
            relay.cut();
        }
    }
    stdin.close().unwrap();
    let result = job.wait();
    assert_eq!(result.outcome, Outcome::Exited(0));
    let want = local_cksum(&data);
    assert_eq!(result.stdout_text(), want, "every byte once, in order");
}

/// What `cksum` prints for these bytes read from stdin.
fn local_cksum(data: &[u8]) -> String {
    let mut child = std::process::Command::new("cksum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// A writer waiting at the window of a job that has not started.
fn queued_writer(
    manager: &Manager,
) -> (JobHandle, crossbeam_channel::Receiver<std::io::Result<()>>) {
    let job = manager.submit(JobSpec::new("cat").interactive()).unwrap();
    let done = write_on_thread(job.stdin().unwrap(), vec![b'q'; 2 * STDIN_WINDOW as usize]);
    (job, done)
}

#[test]
fn a_writer_of_a_queued_job_is_let_go_by_a_cancel_and_by_the_shutdown() {
    let certs = Certs::new(1);
    let manager = Manager::bind(certs.manager_config()).unwrap();
    let (cancelled, first) = queued_writer(&manager);
    let (_kept, second) = queued_writer(&manager);
    // No worker: both wait at the window.
    cancelled.cancel().unwrap();
    let e = first.recv_timeout(DEADLINE).expect("the cancel let it go");
    assert_eq!(e.unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);
    manager.shutdown_within(Duration::ZERO);
    let e = second
        .recv_timeout(DEADLINE)
        .expect("the shutdown let it go");
    assert_eq!(e.unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);
}

#[test]
fn a_remote_writer_of_a_queued_job_is_let_go_by_a_cancel_and_by_the_client_s_close() {
    let certs = Certs::new(2);
    let manager = Manager::bind(certs.submitters_manager_config()).unwrap();
    let s = &certs.workers[1];
    let cc = ClientConfig::new(
        "127.0.0.1",
        manager.local_addr().port(),
        Identity::from_pem(s.cert_pem.as_bytes(), s.key_pem.as_bytes()).unwrap(),
        TrustRoots::from_pem(certs.manager.cert_pem.as_bytes()).unwrap(),
    );
    let client = Client::connect(cc).unwrap();
    let spec = JobSpec::new("cat").interactive();
    let (cancelled, kept) = (
        client.submit(spec.clone()).unwrap(),
        client.submit(spec).unwrap(),
    );
    let big = vec![b'q'; 2 * STDIN_WINDOW as usize];
    let first = write_on_thread(cancelled.stdin().unwrap(), big.clone());
    let second = write_on_thread(kept.stdin().unwrap(), big);
    // No worker: both wait at the window.
    cancelled.cancel().unwrap();
    let e = first.recv_timeout(DEADLINE).expect("the cancel let it go");
    assert_eq!(e.unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);
    client.close();
    let e = second.recv_timeout(DEADLINE).expect("the close let it go");
    assert_eq!(e.unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);
    manager.shutdown_within(Duration::ZERO);
}

#[test]
fn only_the_submitter_writes_a_job_s_stdin_and_its_leaving_ends_it() {
    let certs = Certs::new(2);
    let (manager, _worker) = certs.manager_and_worker(certs.submitters_manager_config(), 1);
    let s = &certs.workers[1];
    let connect = || {
        Client::connect(ClientConfig::new(
            "127.0.0.1",
            manager.local_addr().port(),
            Identity::from_pem(s.cert_pem.as_bytes(), s.key_pem.as_bytes()).unwrap(),
            TrustRoots::from_pem(certs.manager.cert_pem.as_bytes()).unwrap(),
        ))
        .unwrap()
    };
    let first = connect();
    let job = first
        .submit(JobSpec::new("wc -c").interactive().detached())
        .unwrap();
    let id = job.id();
    // Less than a window: all of it is on its way when the writer returns.
    job.stdin()
        .unwrap()
        .write_all(&vec![b'a'; 200_000])
        .unwrap();
    drop(job);
    // The submitter leaves without closing the stdin: nobody else may write it (another
    // writer's offsets would collide with its bytes still on the way), so it ends there
    // and the detached job goes on to its end.
    first.close();
    let second = connect();
    let mut job = second.attach(id).unwrap();
    let e = job.stdin().unwrap_err();
    assert!(
        matches!(&e, workpool::Error::InvalidJob(m) if m.contains("only the RemoteJob that submitted it")),
        "{e}"
    );
    // It ends (it would wait for its stdin for ever otherwise), having read every byte:
    // the client reads until the manager closes its side, so closing its socket does not
    // reset the connection and throw away the goodbye and the last bytes before it.
    let result = job.wait_timeout(DEADLINE).expect("the job ended");
    assert_eq!(result.outcome, Outcome::Exited(0));
    let read: u64 = result.stdout_text().trim().parse().unwrap();
    assert_eq!(read, 200_000);
}
