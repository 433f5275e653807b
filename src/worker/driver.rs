//! The threads around a worker's [`Session`]: they feed it inputs and carry out what it
//! asks, and decide nothing themselves.
//!
//! - The **worker thread** ticks the session at its deadlines (a backoff, the held jobs'
//!   grace, a drain deadline, the stop wait) and, while connected, also drives the link:
//!   it waits in `poll` on the link's socket and its own waker, with the earliest of the
//!   session's deadline, the next heartbeat and the manager's silence running out as the
//!   timeout; it reads the manager's messages into the session, sends heartbeats and
//!   closes a link whose manager went silent. A connected idle worker has this one thread.
//! - A short-lived **link thread** per connection attempt connects (TCP, TLS and the
//!   hello under the deadline the session chose) and hands the link to the worker thread.
//! - Nothing writes on a thread of its own: whoever gives the session something to send
//!   (a supervisor reporting output or an ending, the worker thread, an API call) then
//!   sends what the session has for the link itself, as much as the socket takes
//!   without waiting (`LinkOut::kick`); the rest waits for the process's flusher
//!   thread, which pulls more from the session as the socket drains, so output is paced
//!   by what the socket takes ([`Session::transmit`]).
//! - The **supervisor pool** (`pool`) runs the jobs; a supervisor reports output and
//!   endings straight into the session, which numbers and keeps them: output usually
//!   goes from the job's pipe to the socket with no hand-off, in the buffer it was read
//!   into.
//!
//! The session sits behind one mutex. Whoever has an input locks it, feeds it, carries
//! out its actions and unlocks; nothing done under the lock blocks (a job control is an
//! atomic store and a pipe poke, waking the worker thread a write to its waker), and no
//! thread ever waits on the socket, so a full link never keeps the session from handling
//! `Stop`, `Cancel` or `Pause`. Handing a job to a supervisor, starting a link thread and
//! sending happen after the unlock.

use super::config::WorkerConfig;
use super::executor::{self, JobEvents, JobKey, RunningJob};
use super::job_user::JobUser;
use super::pool::Pool;
use super::replay::Chunk;
use super::session::{Action, Input, Pull, STOP_WAIT, Session, Transmit};
use crate::error::Error;
use crate::flusher::{Flush, Flushed};
use crate::job::{JobSpec, Outcome, Stream};
use crate::link::{self, Beat, Reader, Sent, Timing, Tx};
use crate::net::{self, Waker};
use crate::protocol::{self, Heartbeat, ManagerMessage, Role, WorkerHello, WorkerMessage};
use crossbeam_channel::Sender;
use rustls::ClientConfig;
use std::collections::HashMap;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
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
    out: Arc<LinkOut>,
}

/// A link's sending side: whoever holds `sending` sends what the session has for the
/// link (see [`LinkOut::kick`]).
struct LinkOut {
    id: u64,
    tx: Arc<Tx>,
    sending: Mutex<Sending>,
    /// Someone had something for the link while another thread was sending: that one
    /// goes round again.
    want: AtomicBool,
    shared: Weak<Shared>,
}

#[derive(Default)]
struct Sending {
    batch: Vec<Transmit>,
    frames: Frames,
}

/// The link the worker thread reads, handed over by the link thread that connected it.
struct Reading {
    id: u64,
    reader: Reader,
    out: Arc<LinkOut>,
    timing: Timing,
}

struct State {
    session: Session,
    /// Runs that have a supervisor (or are about to), until it is done with them.
    jobs: HashMap<JobKey, RunningJob>,
    link: Option<LinkHandle>,
    /// A link just made, for the worker thread to take and read.
    reading: Option<Reading>,
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
    /// Send what the session has for this link from the feeding thread.
    send: Option<Arc<LinkOut>>,
}

/// One worker's session and everything its threads share.
pub(crate) struct Shared {
    name: String,
    state: Mutex<State>,
    /// Wakes the worker thread from its `poll`.
    wake: Waker,
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
    let shared = Arc::new(Shared {
        name: name.clone(),
        state: Mutex::new(State {
            session,
            jobs: HashMap::new(),
            link: None,
            reading: None,
            link_threads: Vec::new(),
            sleeps_until: None,
        }),
        wake: Waker::new()?,
        pool: Pool::new(slots as usize),
        env,
        status: Status::default(),
    });
    let s = shared.clone();
    let thread = crate::thread::spawn(format!("wp-worker-{name}"), move || {
        let _done = done;
        worker_thread(s)
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
        let mut later = Later::default();
        {
            let mut st = lock(&self.state);
            before(&mut st);
            st.session.handle(Instant::now(), input);
            carry_out(&mut st, &mut later);
        }
        self.finish(later);
    }

    /// For a link's writer: the next messages to send on link `id`.
    fn transmit(self: &Arc<Self>, id: u64, out: &mut Vec<Transmit>) -> Pull {
        let mut later = Later::default();
        let pull = {
            let mut st = lock(&self.state);
            let pull = st.session.transmit(id, BATCH_BYTES, out);
            carry_out(&mut st, &mut later);
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
            self.wake.wake();
        }
        if let Some(out) = later.send {
            out.kick(self);
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
fn carry_out(st: &mut State, later: &mut Later) {
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
                    later.send = Some(l.out.clone());
                }
            }
            Action::Stdin { key, bytes } => {
                if let Some(job) = jobs.get(&key) {
                    job.stdin(bytes);
                }
            }
            Action::StdinEnd(key) => {
                if let Some(job) = jobs.get(&key) {
                    job.stdin_end();
                }
            }
            Action::Resize(key, size) => {
                if let Some(job) = jobs.get(&key) {
                    job.resize(size);
                }
            }
            Action::CloseLink(why) => {
                // The worker thread sees the socket shut and reports the link down,
                // with this reason.
                if let Some(l) = link {
                    l.out.tx.live().close_because(why);
                    l.out.tx.cut();
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
        self.0.feed(Input::Output { key, stream, bytes });
    }

    fn exited(&self, key: JobKey, outcome: Outcome, cleanup_error: Option<String>) {
        self.0.feed(Input::Exited {
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

    fn stdin_taken(&self, key: JobKey, upto: u64) {
        self.0.feed(Input::StdinTaken { key, upto });
    }

    fn stdin_closed(&self, key: JobKey, upto: u64) {
        self.0.feed(Input::StdinClosed { key, upto });
    }
}

/// Ticks the session at its deadlines and, while connected, drives the link, until the
/// session exits; then closes what is left.
fn worker_thread(shared: Arc<Shared>) {
    let mut reading: Option<Reading> = None;
    loop {
        shared.feed(Input::Tick);
        let deadline = {
            let mut st = lock(&shared.state);
            if st.session.has_exited() {
                break;
            }
            if let Some(r) = st.reading.take() {
                if let Some(old) = reading.replace(r) {
                    // (The session moved to a newer link; the old one is done.)
                    old.out.tx.release();
                }
                // Frames that came with the welcome (already read) are not announced
                // by `poll`: read them first.
                drop(st);
                if let Some(r) = &mut reading
                    && let Some(why) = read_link(&shared, r)
                {
                    let r = reading.take().expect("a link");
                    link_down(&shared, r, why);
                }
                continue;
            }
            let deadline = st.session.next_deadline();
            st.sleeps_until = Some(deadline);
            deadline
        };
        let mut fds = [
            net::pollfd(shared.wake.fd(), libc::POLLIN),
            net::pollfd(-1, libc::POLLIN),
        ];
        let mut until = deadline;
        if let Some(r) = &reading {
            match link_deadline(r) {
                Some(d) => until = Some(until.map_or(d, |u| u.min(d))),
                None => {
                    let r = reading.take().expect("a link");
                    link_down(&shared, r, "the manager went silent".into());
                    lock(&shared.state).sleeps_until = None;
                    continue;
                }
            }
            fds[1].fd = r.reader.socket().as_raw_fd();
        }
        if let Err(e) = net::poll(&mut fds, until) {
            log::error!("worker {}: poll failed: {e}", shared.name);
        }
        if fds[0].revents != 0 {
            shared.wake.clear();
        }
        lock(&shared.state).sleeps_until = None;
        if fds[1].revents != 0
            && let Some(r) = &mut reading
        {
            let ended = read_link(&shared, r);
            if let Some(why) = ended {
                let r = reading.take().expect("a link");
                link_down(&shared, r, why);
            }
        }
    }
    // A link still up (the goodbye could not go out in time) is cut; a connection
    // attempt under way ends by its own deadline.
    let link_threads = {
        let mut st = lock(&shared.state);
        if let Some(l) = st.link.take() {
            l.out.tx.cut();
        }
        if let Some(r) = st.reading.take() {
            r.out.tx.release();
        }
        std::mem::take(&mut st.link_threads)
    };
    if let Some(r) = reading.take() {
        r.out.tx.release();
    }
    for t in link_threads {
        let _ = t.join();
    }
    {
        // A link that came up while the worker was ending.
        let mut st = lock(&shared.state);
        if let Some(r) = st.reading.take() {
            r.out.tx.release();
        }
        st.link = None;
    }
    shared.status.connected.store(false, Ordering::Relaxed);
    if !shared.pool.close(Instant::now() + STOP_WAIT) {
        log::warn!(
            "worker {}: a job supervisor did not end in time; left behind",
            shared.name
        );
    }
}

/// For the link the worker thread drives: sends a heartbeat if one is due, and says
/// when to look again (the next heartbeat, or the manager's silence running out);
/// `None` when the manager has been silent too long (the link is then cut).
fn link_deadline(r: &Reading) -> Option<Instant> {
    let tx = &r.out.tx;
    let live = tx.live();
    let now = Instant::now();
    let silent = live.silent_at(now);
    if silent > r.timing.heartbeat_timeout {
        let why = format!(
            "nothing heard for {:.1} s (timeout {:.1} s)",
            silent.as_secs_f64(),
            r.timing.heartbeat_timeout.as_secs_f64()
        );
        log::warn!("{}: {why}; closing the link", tx.label());
        live.close_because(why);
        tx.cut();
        return None;
    }
    if Beat::Lead.due(r.timing, tx.last_tx(), now, false) && !tx.is_closing() {
        tx.send_with(|buf| protocol::encode_into(buf, &WorkerMessage::heartbeat()));
    }
    let silence_ends = now + (r.timing.heartbeat_timeout - silent) + Duration::from_millis(1);
    Some(Beat::Lead.next(r.timing, tx.last_tx()).min(silence_ends))
}

/// Reads what the manager sent into the session; why the link ended, if it did.
fn read_link(shared: &Arc<Shared>, r: &mut Reading) -> Option<String> {
    let mut retimed = None;
    let tx = r.out.tx.clone();
    let mut deliver = |m| {
        if let ManagerMessage::Timing {
            heartbeat_interval_ms,
            heartbeat_timeout_ms,
            ..
        } = m
        {
            // The link's own business: adopted here, made sane as a welcome's is.
            retimed = Some(Timing::adopted(heartbeat_interval_ms, heartbeat_timeout_ms));
            return true;
        }
        shared.feed(Input::Manager(m));
        // A protocol error closed the link: what else it brought is not read.
        !tx.live().is_closed()
    };
    let read = link::read_ready(&mut r.reader, &r.out.tx, &mut deliver);
    if let Some(timing) = retimed {
        r.timing = timing;
        r.out.tx.set_stall(timing.heartbeat_timeout);
    }
    match read {
        Ok(got) if got.open => None,
        Ok(_) => Some("the manager closed the connection".into()),
        Err(e) => Some(e.to_string()),
    }
}

/// The link the worker thread drove has ended: its socket is let go of, and the
/// session hears of it.
fn link_down(shared: &Arc<Shared>, r: Reading, why: String) {
    let why = r.out.tx.live().reason().unwrap_or(why);
    r.out.tx.release();
    shared.status.connected.store(false, Ordering::Relaxed);
    let id = r.id;
    shared.feed_with(Input::Disconnected { why }, |st| {
        if st.link.as_ref().is_some_and(|l| l.id == id) {
            st.link = None;
        }
    });
}

/// One connection attempt: connects and, if welcomed, hands the link to the worker
/// thread and ends.
fn link_thread(shared: Arc<Shared>, hello: WorkerHello, deadline: Instant) {
    let env = &shared.env;
    let attempt = link::connect(
        &env.address,
        &env.server_name,
        env.tls.as_ref(),
        Role::Worker,
        &hello,
        deadline,
    );
    shared.status.attempts.fetch_add(1, Ordering::Relaxed);
    let (est, welcome): (_, protocol::Welcome) = match attempt {
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
    let link::Established { reader, tx, .. } = est;
    tx.set_stall(timing.heartbeat_timeout);
    tx.live().touch();
    shared.feed(Input::Connected(welcome));
    let out = {
        let mut st = lock(&shared.state);
        match st.session.link_id() {
            Some(id) => {
                let out = Arc::new(LinkOut {
                    id,
                    tx: tx.clone(),
                    sending: Mutex::new(Sending::default()),
                    want: AtomicBool::new(false),
                    shared: Arc::downgrade(&shared),
                });
                let weak: Weak<LinkOut> = Arc::downgrade(&out);
                tx.flush_with(weak);
                st.link = Some(LinkHandle {
                    id,
                    out: out.clone(),
                });
                if let Some(old) = st.reading.replace(Reading {
                    id,
                    reader,
                    out: out.clone(),
                    timing,
                }) {
                    old.out.tx.release();
                }
                Some(out)
            }
            None => None,
        }
    };
    let Some(out) = out else {
        tx.release();
        return;
    };
    shared.status.sessions.fetch_add(1, Ordering::Relaxed);
    shared.status.connected.store(true, Ordering::Relaxed);
    shared.wake.wake();
    // What the session had for the link as it came up (a resume's replay).
    out.kick(&shared);
}

impl LinkOut {
    /// Sends what the session has for the link, unless another thread is at it (that
    /// one then goes round again). Never waits on the socket: what it does not take at
    /// once is left to the flusher, which pulls the rest as the socket drains.
    fn kick(self: &Arc<Self>, shared: &Arc<Shared>) {
        loop {
            self.want.store(true, Ordering::SeqCst);
            let mut sending = match self.sending.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            self.want.store(false, Ordering::SeqCst);
            send_round(shared, self, &mut sending);
            drop(sending);
            if !self.want.load(Ordering::SeqCst) {
                return;
            }
        }
    }
}

impl Flush for LinkOut {
    fn flush(&self, now: Instant) -> Flushed {
        let Some(shared) = self.shared.upgrade() else {
            self.tx.cut();
            return Flushed::Done;
        };
        {
            let mut sending = lock(&self.sending);
            if let Flushed::Waiting { deadline } = self.tx.flush_pending(now) {
                return Flushed::Waiting { deadline };
            }
            // The socket took it all: pull more (a rest that waits registers anew).
            send_round(&shared, self, &mut sending);
        }
        if self.want.load(Ordering::SeqCst) {
            // (`kick` needs the `Arc`; the session's link handle has one.)
            let out = lock(&shared.state)
                .link
                .as_ref()
                .filter(|l| l.id == self.id)
                .map(|l| l.out.clone());
            if let Some(out) = out {
                out.kick(&shared);
            }
        }
        Flushed::Done
    }
}

/// Sends what the session has for the link until it has nothing more, the socket takes
/// no more (the flusher then has the link), or the goodbye is out (the link is then
/// closed: close_notify, and the socket shut down both ways once it is out, which ends
/// the worker thread's reading at once).
fn send_round(shared: &Arc<Shared>, out: &LinkOut, sending: &mut Sending) {
    if out.tx.pending() > 0 || out.tx.is_flushing() {
        return; // the flusher has the link, and pulls more when the socket drains
    }
    let mut batch = std::mem::take(&mut sending.batch);
    loop {
        batch.clear();
        match shared.transmit(out.id, &mut batch) {
            Pull::Sent => {
                sending.frames.encode(&batch, out.tx.label());
                let parts = sending.frames.parts(&batch);
                match out.tx.send_parts(&parts) {
                    Sent::Out => {}
                    Sent::Left | Sent::Refused => break,
                }
            }
            Pull::Idle => break,
            Pull::Close => {
                out.tx.close(Shutdown::Both);
                break;
            }
        }
    }
    batch.clear();
    sending.batch = batch;
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
