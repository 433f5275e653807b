//! [`Client`]: submits jobs to a manager from another process or machine, and follows
//! them, over one connection with a thread of its own (see docs/ARCHITECTURE.md,
//! "The remote client").
//!
//! - The **client thread** drives the link: it waits in `poll` on the link's socket and
//!   its waker, with the earliest of the session's deadline (held events to try again,
//!   the next connection attempt, the end of the reconnect grace), the next heartbeat
//!   and the manager's silence running out as the timeout. It reads the manager's
//!   events into the session (`client::session`), sends heartbeats (an
//!   acknowledgement when one is owed), and reconnects, with the connection attempt on
//!   this same thread.
//! - **API calls** lock the session, number their request and send it on the link
//!   themselves, without waiting on the socket (what it does not take goes out through
//!   the process's flusher); then each waits for its answer on a channel of its own.
//! - Each followed job's events go to a bounded channel that its [`RemoteJob`] reads.
//!   The session decides everything (numbering, resending, acknowledgements, holding,
//!   giving up); the thread and the calls only carry its inputs and actions.

mod config;
mod session;

pub use config::{ClientConfig, ClientSecurity};

use crate::error::{Error, Result};
use crate::job::{JobEvent, JobId, JobResult, JobSpec, JobStatus, Partial, PtySize};
use crate::link::{self, Beat, Reader, Timing, Tx};
use crate::manager::WorkerInfo;
use crate::metrics::Stats;
use crate::net::{self, Waker};
use crate::protocol::{self, Reply, Request, Role, SubmitterHello, ToSubmitter};
use crate::stdin::{End, JobStdin, closed_error, not_interactive, refused_error};
use crate::sync::{self, lock};
use crate::tls;
use crossbeam_channel::{Receiver, RecvTimeoutError, bounded};
use session::{Action, Answer, Session, Settings};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long closing waits for the goodbye to go out, and for the client thread.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A connection to a manager as a submitter: submits jobs, follows their events, and
/// asks about jobs, workers and numbers. Blocking calls, one thread per client; it
/// reconnects by itself, and within the manager's reconnect grace its jobs' events go
/// on without loss or duplication. Dropping it closes it (see [`Client::close`]).
pub struct Client {
    shared: Arc<Shared>,
    /// Disconnected when the client thread has ended.
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    name: String,
    state: Mutex<State>,
    /// Notified whenever the session has changed: writers of a job's stdin look again.
    stdin_room: Condvar,
    /// Wakes the client thread from its `poll`.
    wake: Waker,
    address: String,
    server_name: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    result_limit: usize,
}

struct State {
    session: Session,
    /// The sending side of the link that is up.
    tx: Option<Arc<Tx>>,
    /// Until when the client thread sleeps, while it does.
    sleeps_until: Option<Option<Instant>>,
    stop: bool,
}

/// The link the client thread reads.
struct Reading {
    reader: Reader,
    tx: Arc<Tx>,
    timing: Timing,
}

impl Client {
    /// Checks the configuration, connects to the manager (TCP, TLS and the hello
    /// before `connect_timeout`) and starts the client's thread. Fails with the
    /// manager's refusal ([`Error::Refused`]), a timeout or the connection's error.
    pub fn connect(config: ClientConfig) -> Result<Client> {
        config.validate()?;
        let tls = match &config.security {
            ClientSecurity::MutualTls {
                identity,
                manager_trust,
                verify_hostname,
            } => Some(tls::client_config(
                identity,
                manager_trust,
                *verify_hostname,
            )?),
            ClientSecurity::InsecurePlaintext => {
                log::warn!(
                    "client {} connects WITHOUT TLS to {}",
                    config.name,
                    config.address()
                );
                None
            }
        };
        let settings = Settings {
            name: config.name.clone(),
            connect_timeout: config.connect_timeout,
            backoff_initial: config.backoff_initial,
            backoff_max: config.backoff_max,
            reconnect_grace: config.reconnect_grace,
        };
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ ((std::process::id() as u64) << 32)
            ^ crate::random::u64();
        let mut session = Session::new(settings, seed);
        let address = config.address();
        let server_name = config.server_name();
        let (est, welcome) = link::connect(
            &address,
            &server_name,
            tls.as_ref(),
            Role::Submitter,
            &session.hello(),
            Instant::now() + config.connect_timeout,
        )?;
        let reading = adopt(est, &welcome);
        session.connected(Instant::now(), &welcome);
        let shared = Arc::new(Shared {
            name: config.name.clone(),
            state: Mutex::new(State {
                session,
                tx: Some(reading.tx.clone()),
                sleeps_until: None,
                stop: false,
            }),
            stdin_room: Condvar::new(),
            wake: Waker::new().map_err(|e| Error::io("making the client's waker", e))?,
            address,
            server_name,
            tls,
            result_limit: config.result_output_limit,
        });
        shared.carry_out(&mut lock(&shared.state));
        let (done_tx, done) = bounded::<()>(0);
        let s = shared.clone();
        let thread = crate::thread::spawn(format!("wp-client-{}", config.name), move || {
            let _done = done_tx;
            client_thread(s, reading);
        })
        .map_err(|e| {
            reading_release(&shared);
            Error::io("starting the client thread", e)
        })?;
        Ok(Client {
            shared,
            done,
            thread: Some(thread),
        })
    }

    /// The name the manager's logs know this client by.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Whether a connection to the manager is up right now.
    pub fn is_connected(&self) -> bool {
        lock(&self.shared.state).session.is_up()
    }

    /// Submits a job; the returned handle follows its events. The job is attached to
    /// this client (cancelled if the client is gone for the manager's reconnect grace)
    /// unless its spec is [`JobSpec::detached`].
    pub fn submit(&self, spec: JobSpec) -> Result<RemoteJob> {
        let detached = spec.detached;
        let mut jobs = self.follow(Request::Submit { spec, detached })?;
        match jobs.len() {
            1 => Ok(jobs.remove(0)),
            n => Err(Error::Protocol(format!(
                "the manager answered a submit with {n} jobs"
            ))),
        }
    }

    /// Submits one job per index in `first..=last`, all with `spec` (sent once), each
    /// with `WORKPOOL_ARRAY_INDEX` set to its index; the handles are in index order.
    /// All are queued or none.
    pub fn submit_array(&self, spec: JobSpec, first: u64, last: u64) -> Result<Vec<RemoteJob>> {
        if first > last {
            return Err(Error::InvalidJob(format!(
                "an array's first index ({first}) is after its last ({last})"
            )));
        }
        let detached = spec.detached;
        let jobs = self.follow(Request::SubmitArray {
            spec,
            detached,
            first,
            last,
        })?;
        let wanted = (last - first).saturating_add(1);
        if jobs.len() as u64 != wanted {
            return Err(Error::Protocol(format!(
                "the manager answered an array of {wanted} jobs with {}",
                jobs.len()
            )));
        }
        Ok(jobs)
    }

    /// Follows a job this client's certificate submitted: what the manager kept of its
    /// events, then the rest as they come (its end only, if it has ended). A job this
    /// client follows already (it submitted or attached to it) is refused
    /// ([`Error::InvalidJob`]): its events go to the `RemoteJob` the client has.
    pub fn attach(&self, id: JobId) -> Result<RemoteJob> {
        // One follower per job and client: a second would take the first one's events.
        if lock(&self.shared.state).session.follows_job(id) {
            return Err(Error::InvalidJob(format!(
                "job {id} is followed by this client already: its events go to the RemoteJob it has"
            )));
        }
        let mut jobs = self.follow(Request::Attach { job: id })?;
        jobs.pop()
            .ok_or_else(|| Error::Protocol("the manager answered an attach with no job".into()))
    }

    /// Where a job that has not ended is; `None` when it has ended or never existed.
    pub fn job(&self, id: JobId) -> Result<Option<JobStatus>> {
        match self.call(Request::Job { job: id })? {
            Reply::Job(status) => Ok(status),
            other => Err(unexpected("a job's status", &other)),
        }
    }

    /// Every job that has not ended (the jobs this certificate did not submit, those of
    /// the manager's own process included, without their scripts).
    pub fn jobs(&self) -> Result<Vec<JobStatus>> {
        match self.call(Request::Jobs)? {
            Reply::Jobs(jobs) => Ok(jobs),
            other => Err(unexpected("the jobs", &other)),
        }
    }

    /// The connected workers.
    pub fn workers(&self) -> Result<Vec<WorkerInfo>> {
        match self.call(Request::Workers)? {
            Reply::Workers(workers) => Ok(workers),
            other => Err(unexpected("the workers", &other)),
        }
    }

    /// The manager's numbers.
    pub fn stats(&self) -> Result<Stats> {
        match self.call(Request::Stats)? {
            Reply::Stats(stats) => Ok(*stats),
            other => Err(unexpected("the numbers", &other)),
        }
    }

    /// Cancels a job this client's certificate submitted and waits for the manager to
    /// take the cancel (the job then ends `Cancelled`, unless it ended first).
    pub fn cancel(&self, id: JobId) -> Result<()> {
        match self.call(Request::Cancel { job: id })? {
            Reply::Done => Ok(()),
            other => Err(unexpected("a cancel", &other)),
        }
    }

    /// Says goodbye to the manager (which cancels the jobs attached to this client at
    /// once; detached jobs run on), waits a moment for that to go out, and ends the
    /// client's thread. Handles of jobs that had not ended end `Rejected`.
    pub fn close(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        let tx = {
            let mut st = lock(&self.shared.state);
            st.session.close();
            self.shared.carry_out(&mut st);
            st.stop = true;
            st.tx.take()
        };
        if let Some(tx) = tx {
            tx.close(Shutdown::Write);
            tx.wait_sent(Instant::now() + CLOSE_WAIT);
        }
        self.shared.wake.wake();
        let ended = matches!(
            self.done.recv_timeout(CLOSE_WAIT),
            Err(RecvTimeoutError::Disconnected)
        );
        if let Some(t) = self.thread.take() {
            if ended {
                let _ = t.join();
            } else {
                // Still inside a connection attempt: it ends by that attempt's deadline.
                log::debug!("client {}: its thread ends on its own", self.shared.name);
            }
        }
    }

    /// Sends a request that makes the session follow jobs, and waits for them.
    fn follow(&self, request: Request) -> Result<Vec<RemoteJob>> {
        // Only the submitter writes a job's stdin: a job attached to has no writer here
        // (another writer's bytes may be on the way, at offsets this client cannot know).
        let (interactive, attached) = match &request {
            Request::Submit { spec, .. } | Request::SubmitArray { spec, .. } => {
                (spec.interactive, false)
            }
            _ => (false, true),
        };
        match self.shared.ask(request)? {
            Answer::Follow(jobs) => Ok(jobs
                .into_iter()
                .map(|(id, events)| RemoteJob {
                    id,
                    events,
                    client: Arc::downgrade(&self.shared),
                    partial: Partial::default(),
                    limit: self.shared.result_limit,
                    interactive,
                    attached,
                })
                .collect()),
            Answer::Reply(other) => Err(unexpected("jobs to follow", &other)),
        }
    }

    fn call(&self, request: Request) -> Result<Reply> {
        match self.shared.ask(request)? {
            Answer::Reply(reply) => Ok(reply),
            Answer::Follow(_) => Err(Error::Protocol(
                "the manager answered with jobs to follow".into(),
            )),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shut();
        }
    }
}

fn unexpected(wanted: &str, got: &Reply) -> Error {
    let got = match got {
        Reply::Submitted(_) => "Submitted",
        Reply::Attached => "Attached",
        Reply::Done => "Done",
        Reply::Job(_) => "Job",
        Reply::Jobs(_) => "Jobs",
        Reply::Workers(_) => "Workers",
        Reply::Stats(_) => "Stats",
        Reply::Failed(_) => "Failed",
    };
    Error::Protocol(format!(
        "the manager answered {got} where {wanted} was asked"
    ))
}

impl Shared {
    /// Sends a request and waits for its answer (a reconnect in between is invisible).
    fn ask(self: &Arc<Self>, request: Request) -> Result<Answer> {
        let (slot, answer) = bounded(1);
        let (seq, patience) = {
            let mut st = lock(&self.state);
            let seq = st.session.request(request, Some(slot))?;
            self.carry_out(&mut st);
            (seq, st.session.patience())
        };
        match answer.recv_timeout(patience) {
            Ok(answer) => answer,
            Err(RecvTimeoutError::Timeout) => {
                lock(&self.state).session.abandon(seq);
                Err(Error::Timeout(format!(
                    "no answer from the manager in {:.1} s",
                    patience.as_secs_f64()
                )))
            }
            Err(RecvTimeoutError::Disconnected) => Err(Error::ShutDown),
        }
    }

    /// Sends a request whose answer nobody waits for.
    fn tell(&self, request: Request) -> Result<()> {
        let mut st = lock(&self.state);
        st.session.request(request, None)?;
        self.carry_out(&mut st);
        Ok(())
    }

    /// Carries out the session's actions, under the lock; a connection attempt is
    /// returned for the client thread (the only one that ticks the session).
    fn carry_out(&self, st: &mut State) -> Option<(SubmitterHello, Instant)> {
        let mut connect = None;
        let State {
            session,
            tx,
            sleeps_until,
            ..
        } = st;
        for action in session.take_actions() {
            match action {
                Action::Send(msg) => {
                    // A link that does not take it is going: the session sends it
                    // again after the reconnect if the manager has not taken it.
                    if let Some(tx) = tx {
                        tx.send_with(|buf| protocol::encode_into(buf, &msg));
                    }
                }
                Action::Cut(why) => {
                    if let Some(tx) = tx {
                        tx.live().close_because(why);
                        tx.cut();
                    }
                }
                Action::Connect { hello, deadline } => connect = Some((hello, deadline)),
            }
        }
        // Writers of a job's stdin waiting for room look again.
        self.stdin_room.notify_all();
        // The client thread sleeps until a deadline that may now be too late.
        if let Some(until) = *sleeps_until {
            let earlier = match (session.next_deadline(), until) {
                (Some(n), Some(u)) => n < u,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if earlier {
                self.wake.wake();
            }
        }
        connect
    }
}

/// A connection just welcomed, made ready for the client thread.
fn adopt(est: link::Established, welcome: &protocol::SubmitterWelcome) -> Reading {
    // Whatever the numbers say, the timing adopted is sane (see `Timing::adopted`).
    let timing = Timing::adopted(welcome.heartbeat_interval_ms, welcome.heartbeat_timeout_ms);
    let link::Established { reader, tx, .. } = est;
    tx.set_stall(timing.heartbeat_timeout);
    tx.live().touch();
    Reading { reader, tx, timing }
}

fn reading_release(shared: &Shared) {
    if let Some(tx) = lock(&shared.state).tx.take() {
        tx.release();
    }
}

/// Ticks the session at its deadlines, connects when it says, and drives the link that
/// is up, until the client is closed.
fn client_thread(shared: Arc<Shared>, first: Reading) {
    let mut reading = Some(first);
    // Frames that came with the welcome (already read) are not announced by `poll`.
    if let Some(why) = reading.as_mut().and_then(|r| read_link(&shared, r)) {
        link_down(&shared, reading.take(), &why);
    }
    loop {
        let (connect, deadline) = {
            let mut st = lock(&shared.state);
            if st.stop {
                break;
            }
            st.session.tick(Instant::now());
            let connect = shared.carry_out(&mut st);
            let deadline = st.session.next_deadline();
            if connect.is_none() {
                st.sleeps_until = Some(deadline);
            }
            (connect, deadline)
        };
        if let Some((hello, deadline)) = connect {
            reading = attempt(&shared, &hello, deadline);
            continue;
        }
        let mut fds = [
            net::pollfd(shared.wake.fd(), libc::POLLIN),
            net::pollfd(-1, libc::POLLIN),
        ];
        let mut until = deadline;
        if let Some(r) = &reading {
            match link_deadline(&shared, r) {
                Some(d) => until = Some(until.map_or(d, |u| u.min(d))),
                None => {
                    link_down(&shared, reading.take(), "the manager went silent");
                    lock(&shared.state).sleeps_until = None;
                    continue;
                }
            }
            fds[1].fd = r.reader.socket().as_raw_fd();
        }
        if let Err(e) = net::poll(&mut fds, until) {
            log::error!("client {}: poll failed: {e}", shared.name);
        }
        if fds[0].revents != 0 {
            shared.wake.clear();
        }
        lock(&shared.state).sleeps_until = None;
        if fds[1].revents != 0
            && let Some(r) = &mut reading
            && let Some(why) = read_link(&shared, r)
        {
            link_down(&shared, reading.take(), &why);
        }
    }
    if let Some(mut r) = reading {
        linger(&mut r, Instant::now() + CLOSE_WAIT);
        r.tx.release();
    }
    reading_release(&shared);
}

/// After the goodbye: reads (and drops) what the manager still sends until it closes its
/// side, or `deadline`. Closing a socket with bytes unread resets the connection, and a
/// reset makes the manager throw away what it has not read yet: the goodbye, and stdin
/// bytes written just before it.
fn linger(r: &mut Reading, deadline: Instant) {
    let fd = r.reader.socket().as_raw_fd();
    loop {
        loop {
            match r.reader.frame() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        if r.reader.ended() {
            return;
        }
        match r.reader.fill(&r.tx) {
            Ok(link::Fill::Got { .. }) => {}
            Ok(link::Fill::Nothing) => {
                if !matches!(net::wait_ready(fd, libc::POLLIN, Some(deadline)), Ok(true)) {
                    return;
                }
            }
            Ok(link::Fill::End) | Err(_) => return,
        }
    }
}

/// One connection attempt, on the client thread; the link if it was welcomed.
fn attempt(shared: &Arc<Shared>, hello: &SubmitterHello, deadline: Instant) -> Option<Reading> {
    let got = link::connect::<_, protocol::SubmitterWelcome>(
        &shared.address,
        &shared.server_name,
        shared.tls.as_ref(),
        Role::Submitter,
        hello,
        deadline,
    );
    let mut st = lock(&shared.state);
    match got {
        Ok((est, welcome)) => {
            let mut r = adopt(est, &welcome);
            if st.stop {
                r.tx.release();
                return None;
            }
            log::info!(
                "client {}: connected to {}{}",
                shared.name,
                shared.address,
                if welcome.resumed {
                    " (session resumed)"
                } else {
                    ""
                }
            );
            st.tx = Some(r.tx.clone());
            st.session.connected(Instant::now(), &welcome);
            shared.carry_out(&mut st);
            drop(st);
            match read_link(shared, &mut r) {
                Some(why) => {
                    link_down(shared, Some(r), &why);
                    None
                }
                None => Some(r),
            }
        }
        Err(e) => {
            if matches!(e, Error::Refused(_) | Error::VersionMismatch { .. }) {
                log::warn!("client {}: {e}", shared.name);
            }
            st.session.connect_failed(Instant::now(), &e.to_string());
            shared.carry_out(&mut st);
            None
        }
    }
}

/// For the link the client thread drives: sends a heartbeat (or an acknowledgement)
/// if one is due, and says when to look again; `None` when the manager has been silent
/// too long (the link is then cut).
fn link_deadline(shared: &Shared, r: &Reading) -> Option<Instant> {
    let live = r.tx.live();
    let now = Instant::now();
    let silent = live.silent_at(now);
    if silent > r.timing.heartbeat_timeout {
        let why = format!(
            "nothing heard for {:.1} s (timeout {:.1} s)",
            silent.as_secs_f64(),
            r.timing.heartbeat_timeout.as_secs_f64()
        );
        log::warn!("{}: {why}; closing the link", r.tx.label());
        live.close_because(why);
        r.tx.cut();
        return None;
    }
    if Beat::Lead.due(r.timing, r.tx.last_tx(), now, false) && !r.tx.is_closing() {
        let st = &mut *lock(&shared.state);
        let msg = st.session.beat();
        r.tx.send_with(|buf| protocol::encode_into(buf, &msg));
    }
    let silence_ends = now + (r.timing.heartbeat_timeout - silent) + Duration::from_millis(1);
    Some(Beat::Lead.next(r.timing, r.tx.last_tx()).min(silence_ends))
}

/// Reads what the manager sent into the session; why the link ended, if it did.
fn read_link(shared: &Shared, r: &mut Reading) -> Option<String> {
    // Each event as it is decoded, so that acknowledgements go out while the rest of
    // what the socket holds is still being read (the manager's window keeps moving).
    let read = link::read_ready(&mut r.reader, &r.tx, &mut |m| {
        if let ToSubmitter::Event { seq, event } = m {
            let mut st = lock(&shared.state);
            st.session.received(Instant::now(), seq, event);
            shared.carry_out(&mut st);
        }
        true
    });
    match read {
        Ok(got) if got.open => None,
        Ok(_) => Some("the manager closed the connection".into()),
        Err(e) => Some(e.to_string()),
    }
}

/// The link the client thread drove has ended: its socket is let go of, and the
/// session hears of it.
fn link_down(shared: &Shared, r: Option<Reading>, why: &str) {
    let Some(r) = r else { return };
    let why = r.tx.live().reason().unwrap_or_else(|| why.to_string());
    r.tx.release();
    let mut st = lock(&shared.state);
    if st.tx.as_ref().is_some_and(|t| Arc::ptr_eq(t, &r.tx)) {
        st.tx = None;
    }
    st.session.disconnected(Instant::now(), &why);
    shared.carry_out(&mut st);
}

/// A job submitted or attached through a [`Client`]: its events as they happen, and
/// its result at the end (as [`JobHandle`](crate::JobHandle) is for a job submitted
/// in process).
pub struct RemoteJob {
    id: JobId,
    events: Receiver<JobEvent>,
    client: Weak<Shared>,
    partial: Partial,
    limit: usize,
    interactive: bool,
    /// From [`Client::attach`]: it follows the job, and does not write its stdin.
    attached: bool,
}

impl RemoteJob {
    /// A writer for an interactive job's stdin ([`JobSpec::interactive`]); an error
    /// ([`Error::InvalidJob`]) for a job submitted without it. The client keeps what
    /// the manager has not taken (at most the window) and sends it again after a
    /// reconnect, so every byte reaches the job once, in order. Only the `RemoteJob`
    /// that submitted the job writes it: one from [`Client::attach`] gets the same error
    /// (the submitter's bytes may be on the way). See [`JobStdin`].
    pub fn stdin(&self) -> Result<JobStdin> {
        if self.attached {
            return Err(Error::InvalidJob(format!(
                "job {} was attached to: only the RemoteJob that submitted it writes its stdin",
                self.id
            )));
        }
        if !self.interactive {
            return Err(not_interactive(self.id));
        }
        Ok(JobStdin {
            job: self.id,
            end: End::Remote(RemoteStdin {
                client: self.client.clone(),
                job: self.id,
            }),
        })
    }

    /// Tells a terminal job ([`JobSpec::pty`]) its terminal's new size; does not wait
    /// (told again after a reconnect). An error for a job without a terminal as far as
    /// this client knows, or a size of zero.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        if !self.interactive {
            return Err(Error::InvalidJob(format!(
                "job {} has no terminal to resize (JobSpec::pty)",
                self.id
            )));
        }
        if rows == 0 || cols == 0 {
            return Err(Error::InvalidJob(
                "a terminal must have at least one row and one column".into(),
            ));
        }
        let client = self.client.upgrade().ok_or(Error::ShutDown)?;
        let mut st = lock(&client.state);
        st.session
            .resize(self.id, PtySize { rows, cols })
            .map_err(|_| Error::InvalidJob(format!("job {}: its stdin is closed", self.id)))?;
        client.carry_out(&mut st);
        Ok(())
    }

    /// The job's id.
    pub fn id(&self) -> JobId {
        self.id
    }

    /// The job's events, in order, ending with exactly one [`JobEvent::Finished`].
    /// Events taken from here are not seen by [`RemoteJob::wait`]. A reader that falls
    /// behind pauses the job's output at its worker, as for a local job.
    pub fn events(&self) -> &Receiver<JobEvent> {
        &self.events
    }

    /// Asks for the job to be cancelled; does not wait. [`Error::ShutDown`] when the
    /// client is closed.
    pub fn cancel(&self) -> Result<()> {
        let client = self.client.upgrade().ok_or(Error::ShutDown)?;
        client.tell(Request::Cancel { job: self.id })
    }

    /// Waits for the job to end; returns its outcome and everything it wrote.
    pub fn wait(mut self) -> JobResult {
        self.gather(None)
            .expect("without a deadline, the job's end")
    }

    /// Like [`RemoteJob::wait`], but gives up after `timeout` (output received so far
    /// is kept for the next call). Once it has returned a result, do not call it again.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<JobResult> {
        self.gather(Some(Instant::now() + timeout))
    }

    fn gather(&mut self, deadline: Option<Instant>) -> Option<JobResult> {
        self.partial.gather(
            self.id,
            self.limit,
            &self.events,
            deadline,
            "the client was closed before the job ended",
        )
    }
}

impl std::fmt::Debug for RemoteJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteJob").field("id", &self.id).finish()
    }
}

#[cfg(test)]
mod tests;

/// A remote job's stdin, written through its client's session.
pub(crate) struct RemoteStdin {
    client: Weak<Shared>,
    job: JobId,
}

impl RemoteStdin {
    /// What fits of `bytes`, waiting while nothing does (until the manager takes some,
    /// the stdin closes, the job ends or the client is closed).
    pub(crate) fn write(&self, bytes: &[u8]) -> std::io::Result<usize> {
        let client = self.client.upgrade().ok_or_else(closed_error)?;
        let mut st = lock(&client.state);
        loop {
            if st.stop || st.session.is_closed() {
                return Err(closed_error());
            }
            let n = st
                .session
                .stdin_write(self.job, bytes)
                .map_err(refused_error)?;
            if n > 0 {
                client.carry_out(&mut st);
                return Ok(n);
            }
            st = sync::wait(&client.stdin_room, st);
        }
    }

    pub(crate) fn finish(&self) -> std::io::Result<()> {
        let client = self.client.upgrade().ok_or_else(closed_error)?;
        let mut st = lock(&client.state);
        st.session.stdin_finish(self.job).map_err(refused_error)?;
        client.carry_out(&mut st);
        Ok(())
    }
}
