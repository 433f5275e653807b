//! Interactive jobs on a real worker, driven by a manager made by hand (`testing`): the
//! real TLS handshake, hello and welcome, then every frame decided here. Live stdin
//! (`StdinData`, `StdinEof`) and what the worker says back (`StdinTaken`,
//! `StdinClosed`), its window, a reconnect in the middle, and terminal jobs.

mod common;

use common::*;
use std::net::TcpListener;
use std::time::Instant;
use workpool::job::{JobId, JobSpec, Outcome, Stream};
use workpool::protocol::{ManagerMessage, STDIN_WINDOW, Welcome, WorkerHello, WorkerMessage};
use workpool::testing::{self, RawReader, RawWriter};
use workpool::worker::Worker;

const MANAGER_ID: u64 = 42;
const JOB: JobId = JobId(1);

/// A real worker and the manager made by hand that it joined.
struct Rig {
    certs: Certs,
    listener: TcpListener,
    worker: Option<Worker>,
    r: RawReader,
    w: RawWriter,
}

fn welcome(resume: Vec<(JobId, u64)>) -> Welcome {
    Welcome {
        manager_id: MANAGER_ID,
        worker_id: 1,
        heartbeat_interval_ms: 1000,
        // Held jobs are given up a timeout and an interval before the grace ends.
        heartbeat_timeout_ms: 60_000,
        reconnect_grace_ms: 300_000,
        resume,
    }
}

impl Rig {
    fn new(name: &str) -> Rig {
        let certs = Certs::new(1);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let worker = Worker::start(certs.worker_config(port, 0, name)).unwrap();
        let (_, r, w) = accept(&certs, &listener, welcome(vec![]));
        Rig {
            certs,
            listener,
            worker: Some(worker),
            r,
            w,
        }
    }

    fn run(&mut self, spec: JobSpec) {
        self.send(ManagerMessage::Run {
            job: JOB,
            spec,
            ahead: false,
        });
    }

    fn send(&mut self, m: ManagerMessage) {
        self.w.send(&m).unwrap();
    }

    fn stdin(&mut self, offset: u64, bytes: &[u8]) {
        self.send(ManagerMessage::StdinData {
            job: JOB,
            offset,
            bytes: bytes.to_vec(),
        });
    }

    /// The next message other than a heartbeat; `None` when the link closed.
    fn next(&mut self) -> Option<WorkerMessage> {
        loop {
            match self.r.recv::<WorkerMessage>() {
                Ok(Some(WorkerMessage::Heartbeat)) => {}
                Ok(Some(m)) => return Some(m),
                Ok(None) => return None,
                Err(e) if e.to_string().contains("timed out") => {
                    panic!("nothing from the worker within the deadline")
                }
                Err(_) => return None,
            }
        }
    }

    fn next_open(&mut self) -> WorkerMessage {
        self.next().expect("the worker closed the link")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

fn accept(
    certs: &Certs,
    listener: &TcpListener,
    welcome: Welcome,
) -> (WorkerHello, RawReader, RawWriter) {
    let (tcp, _) = listener.accept().unwrap();
    let (hello, r, w) = testing::accept_worker(
        tcp,
        &certs.manager_identity(),
        &certs.worker_roots(),
        &welcome,
        DEADLINE,
    )
    .unwrap();
    r.set_read_timeout(Some(DEADLINE)).unwrap();
    (hello, r, w)
}

/// What came of one job, as it came: its output text, the stdin counts it was told
/// of, and its ending.
#[derive(Default, Debug)]
struct Seen {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    taken: Vec<u64>,
    closed: Option<u64>,
    /// `StdinClosed` came before `Finished`.
    closed_first: bool,
    outcome: Option<Outcome>,
    next_seq: u64,
}

impl Seen {
    fn take(&mut self, m: WorkerMessage) {
        match m {
            WorkerMessage::Output {
                job,
                stream,
                seq,
                bytes,
            } => {
                assert_eq!(job, JOB);
                assert_eq!(seq, self.next_seq, "output in order, once");
                self.next_seq += 1;
                match stream {
                    Stream::Stdout => self.stdout.extend_from_slice(&bytes),
                    Stream::Stderr => self.stderr.extend_from_slice(&bytes),
                }
            }
            WorkerMessage::StdinTaken { job, upto } => {
                assert_eq!(job, JOB);
                assert!(self.closed.is_none(), "taken after closed");
                if let Some(&last) = self.taken.last() {
                    assert!(upto >= last, "taken went back: {last} then {upto}");
                }
                self.taken.push(upto);
            }
            WorkerMessage::StdinClosed { job, upto } => {
                assert_eq!(job, JOB);
                assert_eq!(self.closed, None, "closed twice");
                self.closed = Some(upto);
                self.closed_first = self.outcome.is_none();
            }
            WorkerMessage::Finished { job, outcome, .. } => {
                assert_eq!(job, JOB);
                self.outcome = Some(outcome);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Reads until `done` says so.
fn until(rig: &mut Rig, seen: &mut Seen, mut done: impl FnMut(&Seen) -> bool) {
    while !done(seen) {
        let m = rig.next_open();
        seen.take(m);
    }
}

#[test]
fn cat_gives_back_each_line_before_the_next_is_written() {
    let mut rig = Rig::new("cat");
    rig.run(JobSpec::new("cat").interactive());
    let mut seen = Seen::default();
    let mut offset = 0;
    let mut expected = String::new();
    for i in 0..5 {
        let line = format!("line {i}\n");
        rig.stdin(offset, line.as_bytes());
        offset += line.len() as u64;
        expected.push_str(&line);
        until(&mut rig, &mut seen, |s| s.stdout.len() >= expected.len());
        assert_eq!(seen.text(), expected, "line {i} came back alone");
    }
    rig.send(ManagerMessage::StdinEof { job: JOB, offset });
    until(&mut rig, &mut seen, |s| s.outcome.is_some());
    assert_eq!(seen.outcome, Some(Outcome::Exited(0)));
    assert_eq!(
        seen.taken.last(),
        Some(&offset),
        "every byte taken and said so"
    );
    assert_eq!(seen.closed, Some(offset));
    assert!(seen.closed_first, "StdinClosed comes before Finished");
    assert_eq!(seen.text(), expected);
}

#[test]
fn head_takes_one_byte_and_ends_while_more_is_offered() {
    let mut rig = Rig::new("head");
    rig.run(JobSpec::new("head -c 1").interactive());
    let mut offered = vec![b'a'];
    offered.extend(std::iter::repeat_n(b'z', 200 << 10));
    rig.stdin(0, &offered);
    let mut seen = Seen::default();
    until(&mut rig, &mut seen, |s| s.outcome.is_some());
    assert_eq!(seen.outcome, Some(Outcome::Exited(0)));
    assert_eq!(seen.text(), "a");
    let closed = seen.closed.expect("StdinClosed");
    assert!(seen.closed_first);
    assert!(
        (1..offered.len() as u64).contains(&closed),
        "{closed} of {} taken",
        offered.len()
    );
    // More after the close is dropped without a word, and the link goes on.
    rig.stdin(offered.len() as u64, b"more");
    rig.send(ManagerMessage::Ended { job: JOB });
    rig.send(ManagerMessage::Run {
        job: JobId(2),
        spec: JobSpec::new("echo still here"),
        ahead: false,
    });
    match rig.next_open() {
        WorkerMessage::Output { job, bytes, .. } => {
            assert_eq!(job, JobId(2));
            assert_eq!(bytes, b"still here\n");
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// The pipe's buffer on this machine (what a job that never reads still takes).
fn pipe_buffer() -> u64 {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fcntl on a descriptor just made; then both are closed.
    let size = unsafe { libc::fcntl(fds[0], libc::F_GETPIPE_SZ) };
    // SAFETY: closing the two descriptors made above.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    assert!(size > 0);
    size as u64
}

#[test]
fn a_job_that_never_reads_takes_at_most_its_pipe_and_a_window_more_closes_the_link() {
    capture_logs(log::LevelFilter::Warn);
    let mut rig = Rig::new("never-reads");
    rig.run(JobSpec::new("echo ready; exec sleep 600").interactive());
    let mut seen = Seen::default();
    until(&mut rig, &mut seen, |s| s.text() == "ready\n");
    // A whole window, in pieces: allowed, whatever the job takes.
    let piece = 32 << 10;
    let mut offset = 0;
    while offset < STDIN_WINDOW {
        rig.stdin(offset, &vec![b'x'; piece]);
        offset += piece as u64;
    }
    // The pipe fills: taken stops at its buffer, said once a quarter window was taken.
    let pipe = pipe_buffer();
    assert!(pipe <= STDIN_WINDOW / 2, "a pipe of {pipe} bytes");
    until(&mut rig, &mut seen, |s| !s.taken.is_empty());
    let taken = *seen.taken.last().unwrap();
    assert!(taken <= pipe, "{taken} taken into a pipe of {pipe}");
    // Past the window (whatever was taken, at most the pipe): the link is closed.
    rig.stdin(offset, &vec![b'y'; pipe as usize + 1]);
    while let Some(m) = rig.next() {
        seen.take(m);
    }
    assert!(seen.taken.iter().all(|&t| t <= pipe), "{:?}", seen.taken);
    assert_eq!(seen.outcome, None, "the job goes on");
    let why = logged("never-reads")
        .into_iter()
        .find(|l| l.contains("broke the protocol"))
        .expect("the reason is logged");
    assert!(why.contains("window"), "{why}");
    // It comes back holding the job, with the stdin it took; a resend from there skips
    // what it has (the bytes waiting at it), and its count stays within the pipe.
    let (hello, r, w) = accept(&rig.certs, &rig.listener, welcome(vec![(JOB, 1)]));
    rig.r = r;
    rig.w = w;
    let held = hello
        .jobs
        .iter()
        .find(|j| j.job == JOB)
        .unwrap_or_else(|| panic!("held: {hello:?}"));
    assert!(held.stdin_taken > 0 && held.stdin_taken <= pipe, "{held:?}");
    let from = held.stdin_taken;
    rig.stdin(from, &vec![b'x'; (STDIN_WINDOW - from) as usize]);
    rig.send(ManagerMessage::Cancel { job: JOB });
    let mut seen = Seen {
        next_seq: 1,
        ..Seen::default()
    };
    until(&mut rig, &mut seen, |s| s.outcome.is_some());
    assert_eq!(seen.outcome, Some(Outcome::Cancelled));
    let closed = seen.closed.expect("StdinClosed");
    assert!(closed <= pipe, "{closed}");
}

#[test]
fn after_a_reconnect_stdin_sent_again_from_the_hello_is_taken_once() {
    let mut rig = Rig::new("resend");
    rig.run(JobSpec::new("cat").interactive());
    let mut seen = Seen::default();
    rig.stdin(0, b"one\n");
    until(&mut rig, &mut seen, |s| s.text() == "one\n");
    rig.w.cut();
    // It comes back; a manager that lost track sends everything again, then more.
    let (hello, r, w) = accept(&rig.certs, &rig.listener, welcome(vec![(JOB, 1)]));
    rig.r = r;
    rig.w = w;
    let held = hello
        .jobs
        .iter()
        .find(|j| j.job == JOB)
        .unwrap_or_else(|| panic!("held: {hello:?}"));
    assert_eq!(held.stdin_taken, 4);
    rig.stdin(0, b"one\ntwo\n");
    rig.stdin(4, b"two\nthree\n");
    rig.send(ManagerMessage::StdinEof {
        job: JOB,
        offset: 14,
    });
    until(&mut rig, &mut seen, |s| s.outcome.is_some());
    assert_eq!(seen.text(), "one\ntwo\nthree\n");
    assert_eq!(seen.closed, Some(14));
    assert_eq!(seen.outcome, Some(Outcome::Exited(0)));
}

// ---- terminal jobs ----

fn pty_job(script: &str, rows: u16, cols: u16) -> JobSpec {
    JobSpec::new(script).pty(rows, cols)
}

#[test]
fn a_terminal_job_has_a_pts_its_size_a_resize_and_reads_a_typed_line() {
    let mut rig = Rig::new("pty");
    rig.run(pty_job(
        "tty; stty size; read a; stty size; read x; echo \"got $x\"",
        24,
        80,
    ));
    let mut seen = Seen::default();
    until(&mut rig, &mut seen, |s| s.text().contains("24 80\r\n"));
    assert!(seen.text().starts_with("/dev/pts/"), "{:?}", seen.text());
    rig.send(ManagerMessage::Resize {
        job: JOB,
        size: workpool::job::PtySize {
            rows: 30,
            cols: 100,
        },
    });
    rig.stdin(0, b"\n");
    until(&mut rig, &mut seen, |s| s.text().contains("30 100\r\n"));
    rig.stdin(1, b"hello\r");
    until(&mut rig, &mut seen, |s| s.outcome.is_some());
    assert!(seen.text().contains("got hello\r\n"), "{:?}", seen.text());
    assert_eq!(seen.outcome, Some(Outcome::Exited(0)));
    assert!(seen.stderr.is_empty());
    assert_eq!(seen.closed, Some(7));
}

#[test]
fn ctrl_c_through_the_terminal_ends_the_job_with_sigint() {
    let mut rig = Rig::new("ctrl-c");
    rig.run(pty_job("echo ready; exec sleep 100", 24, 80));
    let mut seen = Seen::default();
    until(&mut rig, &mut seen, |s| s.text().contains("ready"));
    rig.stdin(0, b"\x03");
    until(&mut rig, &mut seen, |s| s.outcome.is_some());
    assert_eq!(seen.outcome, Some(Outcome::Signaled(libc::SIGINT)));
}

#[test]
fn a_terminal_job_s_stderr_comes_merged_into_its_output() {
    let mut rig = Rig::new("merged");
    rig.run(pty_job("echo out; echo err >&2; echo out again", 24, 80));
    let mut seen = Seen::default();
    until(&mut rig, &mut seen, |s| s.outcome.is_some());
    assert_eq!(seen.text(), "out\r\nerr\r\nout again\r\n");
    assert!(seen.stderr.is_empty());
    assert_eq!(seen.outcome, Some(Outcome::Exited(0)));
}

#[test]
fn the_end_of_stdin_reaches_a_terminal_job_as_end_of_file() {
    let mut rig = Rig::new("pty-eof");
    rig.run(pty_job("cat > /dev/null; echo done", 24, 80));
    rig.stdin(0, b"abc\n");
    rig.send(ManagerMessage::StdinEof {
        job: JOB,
        offset: 4,
    });
    let mut seen = Seen::default();
    until(&mut rig, &mut seen, |s| s.outcome.is_some());
    assert!(seen.text().ends_with("done\r\n"), "{:?}", seen.text());
    assert_eq!(seen.outcome, Some(Outcome::Exited(0)));
}

/// The state letter of a process in `/proc/PID/stat`, if it exists.
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

#[test]
fn cancel_kills_a_terminal_job_s_whole_tree() {
    let mut rig = Rig::new("pty-cancel");
    rig.run(pty_job(
        "sleep 600 & echo $!; setsid sleep 600 & echo $!; echo up; wait",
        24,
        80,
    ));
    let mut seen = Seen::default();
    until(&mut rig, &mut seen, |s| s.text().contains("up"));
    let pids: Vec<i32> = seen
        .text()
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(pids.len(), 2, "{:?}", seen.text());
    rig.send(ManagerMessage::Cancel { job: JOB });
    until(&mut rig, &mut seen, |s| s.outcome.is_some());
    assert_eq!(seen.outcome, Some(Outcome::Cancelled));
    let deadline = Instant::now() + DEADLINE;
    for pid in pids {
        while matches!(process_state(pid), Some(s) if s != 'Z') {
            assert!(Instant::now() < deadline, "{pid} survived the cancel");
            std::thread::yield_now();
        }
    }
}
