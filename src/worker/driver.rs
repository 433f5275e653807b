//! The threads around a worker's [`Session`]: they feed it inputs and carry out what it
//! asks, and decide nothing themselves.
//!
//! - The **worker thread** sleeps until the session's next deadline (a backoff, the
//!   held jobs' grace, a drain deadline, the stop wait) and ticks it, until it exits.
//! - A **link thread** per connection attempt connects (TCP, TLS and the hello under the
//!   deadline the session chose), then reads the manager's messages into the session
//!   until the link drops.
//! - A **writer** per link pulls what to send from the session ([`Session::transmit`]),
//!   frames it, and writes it; it sends a heartbeat when it has been idle for the
//!   heartbeat interval and closes the link when the manager has been silent too long.
//! - The **supervisor pool** (`pool`) runs the jobs; a supervisor reports output and
//!   endings straight into the session, which numbers and keeps them. If the link's
//!   writer is idle, the supervisor then sends what the session has for the link
//!   itself, as much as the socket takes without waiting, and leaves the rest to the
//!   writer thread: output usually goes from the job's pipe to the socket with no
//!   hand-off, in the buffer it was read into.
//!
//! The session sits behind one mutex. Whoever has an input locks it, feeds it, carries
//! out its actions and unlocks; nothing done under the lock blocks (a job control is an
//! atomic store and a pipe poke, waking the writer a channel `try_send`), so a full
//! link never keeps the session from handling `Stop`, `Cancel` or `Pause`. Handing a
//! job to a supervisor and starting a link thread happen after the unlock.

use super::config::WorkerConfig;
use super::executor::{self, JobEvents, JobKey, RunningJob};
use super::job_user::JobUser;
use super::pool::Pool;
use super::replay::Chunk;
use super::session::{Action, Input, Pull, STOP_WAIT, Session, Transmit};
use crate::error::Error;
use crate::job::{JobSpec, Outcome, Stream};
use crate::link::{self, Liveness, Timing};
use crate::protocol::{self, WorkerHello, WorkerMessage};
use crate::tls::{Closer, WriteHalf};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use rustls::ClientConfig;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A writer gathers messages into one socket write of about this size: one output
/// chunk with its framing and TLS records fits loopback's 65,483-byte segment.
const BATCH_BYTES: usize = 60_000;

/// What the worker's handle shows.
#[derive(Default)]
pub(crate) struct Status {
    pub connected: AtomicBool,
    pub sessions: AtomicU64,
    pub attempts: AtomicU64,
}

/// What the drivers need besides the session.
pub(crate) struct Env {
    pub address: String,
    pub server_name: String,
    pub tls: Option<Arc<ClientConfig>>,
    pub work_dir: PathBuf,
    pub kill_grace: Duration,
    pub job_user: Option<JobUser>,
}

impl Env {
    pub(crate) fn new(
        config: &WorkerConfig,
        tls: Option<Arc<ClientConfig>>,
        job_user: Option<JobUser>,
    ) -> Env {
        Env {
            address: config.address(),
            server_name: config
                .host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            tls,
            work_dir: config.work_dir.clone(),
            kill_grace: config.kill_grace,
            job_user,
        }
    }
}

/// The link that is up, as the drivers reach it.
struct LinkHandle {
    id: u64,
    wake_writer: Sender<()>,
    closer: Closer,
    out: Arc<LinkOut>,
}

/// A link's sending side: whoever holds `writer` sends what the session has for the
/// link. That is the link's writer thread, or a supervisor that has just reported its
/// job's end and finds the writer idle (one hand-off less on a job's way back).
struct LinkOut {
    id: u64,
    writer: Mutex<Sending>,
    closer: Closer,
    live: Arc<Liveness>,
    label: String,
}

struct Sending {
    half: WriteHalf,
    batch: Vec<Transmit>,
    frames: Frames,
    last_tx: Instant,
}

/// How a round of sending ended.
enum Sent {
    /// Nothing left to send.
    Idle,
    /// The socket takes no more now; what is left waits in the link's queue for the
    /// writer thread (only when not waiting).
    Busy,
    /// The goodbye is out: close the link.
    Close,
    /// Writing failed; the link is being closed.
    Failed,
}

struct State {
    session: Session,
    /// Runs that have a supervisor (or are about to), until it is done with them.
    jobs: HashMap<JobKey, RunningJob>,
    link: Option<LinkHandle>,
    /// Link threads, joined when the worker ends.
    link_threads: Vec<JoinHandle<()>>,
    /// When the worker thread will wake by itself, while it sleeps.
    sleeps_until: Option<Option<Instant>>,
}

/// What is done after the lock is released.
#[derive(Default)]
struct Later {
    starts: Vec<(JobKey, JobSpec, RunningJob)>,
    failed: Vec<(JobKey, String)>,
    connect: Option<(WorkerHello, Instant)>,
    wake_driver: bool,
    /// Send on this link from the feeding thread, unless its writer is at it.
    send_here: Option<(Arc<LinkOut>, Sender<()>)>,
}

/// One worker's session and everything its threads share.
pub(crate) struct Shared {
    name: String,
    state: Mutex<State>,
    wake_driver: Sender<()>,
    pool: Pool,
    env: Env,
    pub(crate) status: Status,
}

use crate::sync::lock;

/// Starts the worker thread; it returns when the session exits and the other threads
/// are gone (or given up on).
pub(crate) fn start(
    session: Session,
    name: String,
    slots: u32,
    env: Env,
    done: Sender<()>,
) -> std::io::Result<(Arc<Shared>, JoinHandle<()>)> {
    let (wake_tx, wake_rx) = bounded(1);
    let shared = Arc::new(Shared {
        name: name.clone(),
        state: Mutex::new(State {
            session,
            jobs: HashMap::new(),
            link: None,
            link_threads: Vec::new(),
            sleeps_until: None,
        }),
        wake_driver: wake_tx,
        pool: Pool::new(slots as usize),
        env,
        status: Status::default(),
    });
    let s = shared.clone();
    let thread = crate::thread::spawn(format!("wp-worker-{name}"), move || {
        let _done = done;
        worker_thread(s, wake_rx)
    })?;
    Ok((shared, thread))
}

impl Shared {
    /// Feeds one input and carries out what follows.
    pub(crate) fn feed(self: &Arc<Self>, input: Input) {
        self.feed_with(input, |_| {});
    }

    /// Like `feed`, running `before` under the same lock first.
    fn feed_with(self: &Arc<Self>, input: Input, before: impl FnOnce(&mut State)) {
        self.feed_inner(input, before, false);
    }

    /// Like `feed`, and what the input gives the link to send is sent from this thread
    /// if the link's writer is idle. Only for threads that may wait on the socket:
    /// supervisors (a supervisor that waits holds back only its own job).
    fn feed_and_send(self: &Arc<Self>, input: Input) {
        self.feed_inner(input, |_| {}, true);
    }

    fn feed_inner(
        self: &Arc<Self>,
        input: Input,
        before: impl FnOnce(&mut State),
        send_here: bool,
    ) {
        let mut later = Later::default();
        {
            let mut st = lock(&self.state);
            before(&mut st);
            st.session.handle(Instant::now(), input);
            carry_out(&mut st, &mut later, send_here);
        }
        self.finish(later);
    }

    /// For a link's writer: the next messages to send on link `id`.
    fn transmit(self: &Arc<Self>, id: u64, out: &mut Vec<Transmit>) -> Pull {
        let mut later = Later::default();
        let pull = {
            let mut st = lock(&self.state);
            let pull = st.session.transmit(id, BATCH_BYTES, out);
            carry_out(&mut st, &mut later, false);
            pull
        };
        self.finish(later);
        pull
    }

    /// What cannot be done under the lock: handing jobs to supervisors, starting a
    /// link thread, waking the worker thread.
    fn finish(self: &Arc<Self>, later: Later) {
        for (key, spec, job) in later.starts {
            let shared = self.clone();
            let task = Box::new(move || {
                let env = &shared.env;
                executor::run(
                    key,
                    &spec,
                    &env.work_dir,
                    env.kill_grace,
                    env.job_user.as_ref(),
                    &job,
                    &Reporter(shared.clone()),
                );
            });
            if let Err(e) = self.pool.run(task) {
                self.fail_start(key, format!("cannot start a supervisor thread: {e}"));
            }
        }
        for (key, why) in later.failed {
            self.fail_start(key, why);
        }
        if let Some((hello, deadline)) = later.connect {
            let shared = self.clone();
            let spawned =
                crate::thread::spawn("wp-link", move || link_thread(shared, hello, deadline));
            match spawned {
                Ok(t) => {
                    let mut st = lock(&self.state);
                    st.link_threads.retain(|t| !t.is_finished());
                    st.link_threads.push(t);
                }
                Err(e) => self.feed(Input::ConnectFailed {
                    why: format!("cannot start a link thread: {e}"),
                    loud: true,
                }),
            }
        }
        if later.wake_driver {
            let _ = self.wake_driver.try_send(());
        }
        if let Some((out, wake_writer)) = later.send_here {
            // Only if the writer is not at it; if it is, it sends this too.
            // Never waiting on the socket: what it does not take at once is left to the
            // writer thread (a supervisor also enforces its job's timeout and cancels).
            let sent = match out.writer.try_lock() {
                Ok(mut sending) => Some(send_all(self, &out, &mut sending, false)),
                Err(std::sync::TryLockError::Poisoned(p)) => {
                    Some(send_all(self, &out, &mut p.into_inner(), false))
                }
                Err(std::sync::TryLockError::WouldBlock) => None,
            };
            if !matches!(sent, Some(Sent::Idle)) {
                let _ = wake_writer.try_send(());
            }
        }
    }

    fn fail_start(self: &Arc<Self>, key: JobKey, why: String) {
        self.feed(Input::Exited {
            key,
            outcome: Outcome::SpawnFailed(why),
            cleanup_error: None,
        });
        self.feed_with(Input::CleanedUp { key, error: None }, |st| {
            st.jobs.remove(&key);
        });
    }
}

/// Carries out the session's actions that do not block, under the lock; collects the
/// others for `finish`.
fn carry_out(st: &mut State, later: &mut Later, send_here: bool) {
    let State {
        session,
        jobs,
        link,
        sleeps_until,
        ..
    } = st;
    for action in session.take_actions() {
        match action {
            Action::Connect { hello, deadline } => later.connect = Some((hello, deadline)),
            Action::Start { key, spec } => match RunningJob::new() {
                Ok(job) => {
                    jobs.insert(key, job.clone());
                    later.starts.push((key, spec, job));
                }
                Err(e) => later
                    .failed
                    .push((key, format!("cannot make a control pipe: {e}"))),
            },
            Action::Cancel(key) => {
                if let Some(job) = jobs.get(&key) {
                    job.cancel();
                }
            }
            Action::Kill(key) => {
                if let Some(job) = jobs.get(&key) {
                    job.kill();
                }
            }
            Action::Pause(key, paused) => {
                if let Some(job) = jobs.get(&key) {
                    job.pause(paused);
                }
            }
            Action::WakeWriter => {
                if let Some(l) = link {
                    if send_here {
                        later.send_here = Some((l.out.clone(), l.wake_writer.clone()));
                    } else {
                        let _ = l.wake_writer.try_send(());
                    }
                }
            }
            Action::Exit => later.wake_driver = true,
        }
    }
    // The worker thread sleeps until a deadline that may now be too late.
    if let Some(until) = *sleeps_until {
        let next = session.next_deadline();
        let earlier = match (next, until) {
            (Some(n), Some(u)) => n < u,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if earlier || session.has_exited() {
            later.wake_driver = true;
        }
    }
}

/// How supervisors report: straight into the session.
struct Reporter(Arc<Shared>);

impl JobEvents for Reporter {
    fn output(&self, key: JobKey, stream: Stream, bytes: Chunk) {
        self.0.feed_and_send(Input::Output { key, stream, bytes });
    }

    fn exited(&self, key: JobKey, outcome: Outcome, cleanup_error: Option<String>) {
        self.0.feed_and_send(Input::Exited {
            key,
            outcome,
            cleanup_error,
        });
    }

    fn cleaned_up(&self, key: JobKey, error: Option<String>) {
        self.0.feed_with(Input::CleanedUp { key, error }, |st| {
            st.jobs.remove(&key);
        });
    }
}

/// Ticks the session at its deadlines until it exits, then closes what is left.
fn worker_thread(shared: Arc<Shared>, wake: Receiver<()>) {
    loop {
        shared.feed(Input::Tick);
        let deadline = {
            let mut st = lock(&shared.state);
            if st.session.has_exited() {
                break;
            }
            let deadline = st.session.next_deadline();
            st.sleeps_until = Some(deadline);
            deadline
        };
        match deadline {
            Some(d) => {
                let _ = wake.recv_deadline(d);
            }
            None => {
                let _ = wake.recv();
            }
        }
        lock(&shared.state).sleeps_until = None;
    }
    // A link still up (the goodbye could not go out in time) is cut; a connection
    // attempt under way ends by its own deadline.
    let link_threads = {
        let mut st = lock(&shared.state);
        if let Some(l) = st.link.take() {
            l.closer.close();
        }
        std::mem::take(&mut st.link_threads)
    };
    for t in link_threads {
        let _ = t.join();
    }
    if !shared.pool.close(Instant::now() + STOP_WAIT) {
        log::warn!(
            "worker {}: a job supervisor did not end in time; left behind",
            shared.name
        );
    }
}

/// One connection: the attempt, then (if welcomed) the writer and the reading.
fn link_thread(shared: Arc<Shared>, hello: WorkerHello, deadline: Instant) {
    let env = &shared.env;
    let attempt = link::connect(
        &env.address,
        &env.server_name,
        env.tls.as_ref(),
        &hello,
        deadline,
    );
    shared.status.attempts.fetch_add(1, Ordering::Relaxed);
    let (est, welcome) = match attempt {
        Ok(ok) => ok,
        Err(e) => {
            let loud = matches!(e, Error::Refused(_) | Error::VersionMismatch { .. });
            shared.feed(Input::ConnectFailed {
                why: e.to_string(),
                loud,
            });
            return;
        }
    };
    // Whatever the numbers say, the timing adopted is sane (see `Timing::adopted`).
    let timing = Timing::adopted(welcome.heartbeat_interval_ms, welcome.heartbeat_timeout_ms);
    if let Err(e) = link::go_live(&est, timing) {
        shared.feed(Input::ConnectFailed {
            why: e.to_string(),
            loud: false,
        });
        return;
    }
    let link::Established {
        mut reader,
        writer,
        closer,
        ..
    } = est;
    let live = Liveness::new();
    let (wake_tx, wake_rx) = bounded(1);
    let mut out = None;
    shared.feed(Input::Connected(welcome));
    {
        let mut st = lock(&shared.state);
        if let Some(id) = st.session.link_id() {
            let link_out = Arc::new(LinkOut {
                id,
                writer: Mutex::new(Sending {
                    half: writer,
                    batch: Vec::new(),
                    frames: Frames::default(),
                    last_tx: Instant::now(),
                }),
                closer: closer.clone(),
                live: live.clone(),
                label: format!("manager {}", env.address),
            });
            out = Some(link_out.clone());
            st.link = Some(LinkHandle {
                id,
                wake_writer: wake_tx,
                closer: closer.clone(),
                out: link_out,
            });
        }
    }
    let Some(out) = out else {
        closer.close();
        return;
    };
    let id = out.id;
    shared.status.sessions.fetch_add(1, Ordering::Relaxed);
    shared.status.connected.store(true, Ordering::Relaxed);
    let writer = {
        let shared = shared.clone();
        crate::thread::relay("wp-link-writer", move || {
            write_link(&shared, &out, &wake_rx, timing)
        })
    };
    let writer = match writer {
        Ok(w) => Some(w),
        Err(e) => {
            log::error!("worker {}: cannot start a writer thread: {e}", shared.name);
            closer.close();
            None
        }
    };
    let read = link::read_messages(&mut reader, &live, |m| {
        shared.feed(Input::Manager(m));
        true
    });
    live.mark_closed();
    closer.close();
    if let Some(w) = writer {
        let _ = w.join();
    }
    shared.status.connected.store(false, Ordering::Relaxed);
    let why = match read {
        Ok(()) => "the manager closed the connection".into(),
        Err(e) => e.to_string(),
    };
    shared.feed_with(Input::Disconnected { why }, |st| {
        if st.link.as_ref().is_some_and(|l| l.id == id) {
            st.link = None;
        }
    });
}

/// A link's writer thread: sends what the session has for the link (unless a
/// supervisor is at it), a heartbeat when nothing was sent for the interval, and closes
/// the link when the manager has been silent too long.
fn write_link(shared: &Arc<Shared>, out: &LinkOut, wake: &Receiver<()>, timing: Timing) {
    let live = &out.live;
    loop {
        if live.stale(timing.heartbeat_timeout) {
            log::warn!(
                "{}: nothing heard for {:.1} s (timeout {:.1} s); closing the link",
                out.label,
                live.silent_for().as_secs_f64(),
                timing.heartbeat_timeout.as_secs_f64()
            );
            break;
        }
        let last_tx = {
            let mut sending = lock(&out.writer);
            match send_all(shared, out, &mut sending, true) {
                Sent::Idle | Sent::Busy => sending.last_tx,
                Sent::Close => {
                    // Close cleanly (close_notify), then cut both ways: the reader stops
                    // at once instead of waiting for the manager to close too.
                    sending.half.close();
                    break;
                }
                Sent::Failed => break,
            }
        };
        let wait = timing.heartbeat_interval.saturating_sub(last_tx.elapsed());
        match wake.recv_timeout(wait) {
            Ok(()) => {}
            Err(RecvTimeoutError::Timeout) => {
                let mut sending = lock(&out.writer);
                if sending.last_tx.elapsed() >= timing.heartbeat_interval {
                    let heartbeat = [Transmit::Message(WorkerMessage::Heartbeat)];
                    if write_batch(out, &mut sending, &heartbeat, true).is_none() {
                        break;
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    live.mark_closed();
    out.closer.close();
}

/// Sends what the session has for the link until it has nothing more, first what is
/// left from an earlier round. With `wait` false, stops when the socket takes no more.
fn send_all(shared: &Arc<Shared>, out: &LinkOut, sending: &mut Sending, wait: bool) -> Sent {
    if sending.half.has_queued() {
        match send_queued(out, sending, wait) {
            Some(true) => {}
            Some(false) => return Sent::Busy,
            None => return Sent::Failed,
        }
    }
    let mut batch = std::mem::take(&mut sending.batch);
    let sent = loop {
        batch.clear();
        match shared.transmit(out.id, &mut batch) {
            Pull::Sent => match write_batch(out, sending, &batch, wait) {
                Some(true) => {}
                Some(false) => break Sent::Busy,
                None => break Sent::Failed,
            },
            Pull::Idle => break Sent::Idle,
            Pull::Close => break Sent::Close,
        }
    };
    batch.clear();
    sending.batch = batch;
    sent
}

/// Frames, encrypts and sends one batch: `Some(true)` if all of it went, `Some(false)`
/// if some waits in the link's queue (only when not waiting), `None` if sending failed
/// (the link is then being closed).
fn write_batch(
    out: &LinkOut,
    sending: &mut Sending,
    batch: &[Transmit],
    wait: bool,
) -> Option<bool> {
    sending.frames.encode(batch, &out.label);
    if let Err(e) = sending.half.queue_parts(&sending.frames.parts(batch)) {
        return failed(out, e);
    }
    send_queued(out, sending, wait)
}

fn send_queued(out: &LinkOut, sending: &mut Sending, wait: bool) -> Option<bool> {
    match sending.half.send_queued(wait) {
        Ok(all) => {
            sending.last_tx = Instant::now();
            Some(all)
        }
        Err(e) => failed(out, e),
    }
}

fn failed(out: &LinkOut, e: std::io::Error) -> Option<bool> {
    if !out.live.is_closed() {
        log::warn!("{}: write failed: {e}; closing the link", out.label);
    }
    out.live.mark_closed();
    out.closer.close();
    None
}

/// A batch of messages as frames: the small parts (whole messages, and the heads of
/// output messages) encoded into one buffer, the output bytes left where they are.
#[derive(Default)]
struct Frames {
    small: Vec<u8>,
    spans: Vec<Span>,
}

enum Span {
    Small(usize, usize),
    Bytes(usize),
}

impl Frames {
    fn encode(&mut self, batch: &[Transmit], label: &str) {
        self.small.clear();
        self.spans.clear();
        for (i, t) in batch.iter().enumerate() {
            let start = self.small.len();
            let encoded = match t {
                Transmit::Output { job, chunk } => protocol::encode_output_head_into(
                    &mut self.small,
                    *job,
                    chunk.stream,
                    chunk.seq,
                    chunk.bytes.len(),
                ),
                Transmit::Message(m) => protocol::encode_into(&mut self.small, m),
            };
            if let Err(e) = encoded {
                log::error!("{label}: dropping a message that cannot be encoded: {e}");
                continue;
            }
            match self.spans.last_mut() {
                Some(Span::Small(_, end)) if *end == start => *end = self.small.len(),
                _ => self.spans.push(Span::Small(start, self.small.len())),
            }
            if matches!(t, Transmit::Output { .. }) {
                self.spans.push(Span::Bytes(i));
            }
        }
    }

    fn parts<'a>(&'a self, batch: &'a [Transmit]) -> Vec<&'a [u8]> {
        self.spans
            .iter()
            .map(|s| match *s {
                Span::Small(a, b) => &self.small[a..b],
                Span::Bytes(i) => match &batch[i] {
                    Transmit::Output { chunk, .. } => &chunk.bytes[..],
                    Transmit::Message(_) => &[],
                },
            })
            .collect()
    }
}
