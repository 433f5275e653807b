//! A remote client's session as a state machine, with no I/O and no clock of its own:
//! the numbering of requests and their resending after a reconnect, the session's
//! numbered events (duplicates dropped, acknowledgements, events held for a job whose
//! reader is behind), the reconnect backoff, and giving up on a session the manager no
//! longer keeps. The client's thread and its API calls feed it inputs and carry out the
//! [`Action`]s it leaves.
//!
//! Flow control: each followed job has a bounded channel. An event that does not fit is
//! held, and so is every event after it (whatever its job), so that the session's order
//! is kept; held events are tried again on a short timer. Only events handed over (or
//! dropped because nobody reads the job any more) are acknowledged, so a reader that is
//! behind fills the manager's window of unacknowledged events, which pauses the job's
//! output at its worker.
//!
//! After the manager restarted with a journal, the session comes back `restored`: the
//! manager has its jobs but not what it had sent or taken, so the session tells it
//! which jobs it follows and sends again every request it has no answer for. A job's
//! output then comes numbered by its worker (attempt, `seq`), which may send again
//! what the client already has: that is dropped, a real gap is told as a warning, and
//! a repeated `Queued`, `Started` or `Finished` is dropped too.

use crate::error::Error;
use crate::job::{JobEvent, JobId, Outcome, PtySize};
use crate::protocol::{
    MAX_FOLLOW, Reply, Request, RequestError, SessionEvent, SessionResume, SubmitterHello,
    SubmitterMessage, SubmitterWelcome,
};
use crate::stdin::{Refused, StdinOut, StdinWindow};
use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Room in a job's channel, in events.
pub(crate) const JOB_CHANNEL: usize = 32;
/// An acknowledgement goes out once this many events were taken since the last one...
pub(crate) const ACK_EVENTS: u64 = 64;
/// ... or this many bytes of output.
pub(crate) const ACK_BYTES: usize = 512 << 10;
/// How soon held events are tried again.
pub(crate) const HELD_RETRY: Duration = Duration::from_millis(5);
/// The longest grace taken from a configuration or a welcome.
const MAX_GRACE: Duration = Duration::from_secs(365 * 86_400);
/// The grace used before a welcome has said one (the manager's default).
pub(crate) const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// The session's settings.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub name: String,
    pub connect_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long to try to get back into a lost session (`None`: the welcome's grace).
    pub reconnect_grace: Option<Duration>,
}

/// What a request's caller is answered.
#[derive(Debug)]
pub(crate) enum Answer {
    /// A reply that starts nothing to follow.
    Reply(Reply),
    /// The jobs a submit or an attach made the session follow, with their events.
    Follow(Vec<(JobId, Receiver<JobEvent>)>),
}

/// Where a request's answer goes.
pub(crate) type Slot = Sender<crate::Result<Answer>>;

struct Pending {
    request: Request,
    /// `None`: nobody waits (a cancel from a job's handle, or a caller that gave up).
    slot: Option<Slot>,
    /// It went out on some link (and may have been taken).
    sent: bool,
    /// Its caller gave up waiting.
    abandoned: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Link {
    /// The next connection attempt is due at `at`.
    Waiting {
        at: Instant,
        failures: u32,
    },
    /// An attempt is under way.
    Connecting {
        failures: u32,
    },
    Up,
    Closed,
}

struct Follow {
    tx: Sender<JobEvent>,
    /// Its `Finished` has arrived (it may still be held).
    ended: bool,
    /// The run its output comes from: the attempt, and the `seq` of the next output
    /// message expected. `None` until its first numbered output, for a job attached to
    /// (its kept output is not numbered but for its last chunk; the live output goes on
    /// from anywhere).
    run: Option<(u32, u64)>,
    /// Whether a `Started` was handed over for the current run.
    started: bool,
    /// Whether any event was handed over.
    seen: bool,
}

/// What becomes of an event of a followed job.
#[derive(Debug, PartialEq)]
enum Verdict {
    Take,
    /// Already here: sent again after the manager restarted.
    Drop,
    /// Taken, after this many output messages that never came.
    Gap(u64),
}

impl Follow {
    fn new(tx: Sender<JobEvent>, run: Option<(u32, u64)>) -> Follow {
        Follow {
            tx,
            ended: false,
            run,
            started: false,
            seen: false,
        }
    }

    /// Takes note of an event about to be handed over (`out`: the attempt and `seq` of
    /// numbered output).
    fn admit(&mut self, event: &JobEvent, out: Option<(u32, u64)>) -> Verdict {
        let first = !std::mem::replace(&mut self.seen, true);
        match event {
            JobEvent::Queued if !first => Verdict::Drop,
            JobEvent::Started { .. } if self.started => Verdict::Drop,
            JobEvent::Started { .. } => {
                self.started = true;
                Verdict::Take
            }
            JobEvent::Requeued { attempt } => {
                // Another run: its output counts from 0.
                self.started = false;
                if self.run.is_none_or(|(a, _)| *attempt >= a) {
                    self.run = Some((*attempt, 0));
                }
                Verdict::Take
            }
            JobEvent::Output { .. } => {
                let Some((attempt, seq)) = out else {
                    return Verdict::Take;
                };
                let next = match self.run {
                    None => seq,
                    Some((a, _)) if attempt < a => return Verdict::Drop,
                    Some((a, _)) if attempt > a => 0,
                    Some((_, next)) if seq < next => return Verdict::Drop,
                    Some((_, next)) => next,
                };
                self.run = Some((attempt, seq.saturating_add(1)));
                match seq - next {
                    0 => Verdict::Take,
                    lost => Verdict::Gap(lost),
                }
            }
            _ => Verdict::Take,
        }
    }
}

/// An event not yet handed to its job's channel. `seq` is `None` for an event the
/// client made itself (the end of a job whose session was lost, a warning of lost
/// output), and for the events of a session that is over.
struct Held {
    seq: Option<u64>,
    job: JobId,
    event: JobEvent,
    /// Numbered output: its attempt and `seq`.
    out: Option<(u32, u64)>,
    /// Its job's [`Follow::admit`] has seen it.
    checked: bool,
}

impl Held {
    fn new(seq: Option<u64>, job: JobId, event: JobEvent) -> Held {
        Held {
            seq,
            job,
            event,
            out: None,
            checked: false,
        }
    }
}

/// What the driver does for the session.
#[derive(Debug, PartialEq)]
pub(crate) enum Action {
    /// Connect with this hello before the deadline; report with `connected` or
    /// `connect_failed`.
    Connect {
        hello: SubmitterHello,
        deadline: Instant,
    },
    /// Send this on the link that is up.
    Send(SubmitterMessage),
    /// Drop the link: the manager broke the protocol (why in words).
    Cut(String),
}

/// A remote client's session (see the module's documentation).
pub(crate) struct Session {
    cfg: Settings,
    link: Link,
    /// The manager instance and the session, once welcomed.
    session: Option<(u64, u64)>,
    grace: Duration,
    heartbeat_timeout: Duration,
    /// Since when the manager has been out of reach (after a session was established).
    lost_since: Option<Instant>,
    next_request: u64,
    requests: BTreeMap<u64, Pending>,
    /// The `seq` of the first event not received yet.
    next_event: u64,
    /// The `next` of the last acknowledgement.
    acked: u64,
    /// Events and bytes taken since the last acknowledgement.
    taken_events: u64,
    taken_bytes: usize,
    held: VecDeque<Held>,
    retry_at: Option<Instant>,
    follows: HashMap<JobId, Follow>,
    /// Submits sent again after a restored welcome and not answered yet: events of jobs
    /// it does not follow wait for them (they may be those submits' jobs, whose answer
    /// the restart lost).
    restored_submits: BTreeSet<u64>,
    /// The stdin of the interactive jobs it follows: what was written and the manager
    /// has not taken (at most the window), sent again after a reconnect.
    stdins: HashMap<JobId, Stdin>,
    actions: Vec<Action>,
    rng: u64,
}

/// An interactive job's stdin, on the client.
#[derive(Default)]
struct Stdin {
    w: StdinWindow,
    /// The terminal size last asked for, told again after a reconnect.
    size: Option<PtySize>,
}

impl Session {
    /// A session whose first connection attempt the caller makes now, with
    /// [`Session::hello`]; `seed` drives the backoff's jitter.
    pub(crate) fn new(cfg: Settings, seed: u64) -> Session {
        let grace = cfg.reconnect_grace.unwrap_or(DEFAULT_GRACE).min(MAX_GRACE);
        Session {
            cfg,
            link: Link::Connecting { failures: 0 },
            session: None,
            grace,
            heartbeat_timeout: Duration::from_secs(5),
            lost_since: None,
            next_request: 0,
            requests: BTreeMap::new(),
            next_event: 0,
            acked: 0,
            taken_events: 0,
            taken_bytes: 0,
            held: VecDeque::new(),
            retry_at: None,
            follows: HashMap::new(),
            restored_submits: BTreeSet::new(),
            stdins: HashMap::new(),
            actions: Vec::new(),
            rng: seed | 1,
        }
    }

    /// What the session asks of the driver, in order.
    pub(crate) fn take_actions(&mut self) -> std::vec::Drain<'_, Action> {
        self.actions.drain(..)
    }

    /// The hello of the next connection attempt: a resume if there is a session.
    pub(crate) fn hello(&self) -> SubmitterHello {
        SubmitterHello {
            name: self.cfg.name.clone(),
            resume: self.session.map(|(manager_id, session)| SessionResume {
                manager_id,
                session,
                next_event: self.next_event,
            }),
        }
    }

    /// Whether a link is up.
    pub(crate) fn is_up(&self) -> bool {
        self.link == Link::Up
    }

    /// Whether the client was closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.link == Link::Closed
    }

    /// How long a caller waits for an answer: long enough for a connection attempt, the
    /// link's loss to be noticed, and the reconnect grace.
    pub(crate) fn patience(&self) -> Duration {
        self.cfg.connect_timeout + self.heartbeat_timeout + self.grace
    }

    /// The earliest time [`Session::tick`] has something to do.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let mut next = self.retry_at;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        if let Link::Waiting { at: t, .. } = self.link {
            at(t);
        }
        if let (Some(since), Some(_)) = (self.lost_since, self.session)
            && self.link != Link::Up
        {
            at(since + self.grace);
        }
        next
    }

    /// A new request; it goes out at once if a link is up, else when one is. `Err` when
    /// the client was closed.
    pub(crate) fn request(&mut self, request: Request, slot: Option<Slot>) -> crate::Result<u64> {
        if self.is_closed() {
            return Err(Error::ShutDown);
        }
        let seq = self.next_request;
        self.next_request += 1;
        let up = self.is_up();
        if up {
            // What was taken is acknowledged first: the manager takes no request while
            // it holds more than twice its window unacknowledged, and one answer (a
            // long job list) can be that large.
            self.ack(true);
            self.actions.push(Action::Send(SubmitterMessage::Request {
                seq,
                request: request.clone(),
            }));
        }
        self.requests.insert(
            seq,
            Pending {
                request,
                slot,
                sent: up,
                abandoned: false,
            },
        );
        Ok(seq)
    }

    /// The caller of request `seq` gave up waiting: its answer is dropped when it comes
    /// (and the jobs of a submit are cancelled then); a submit not taken yet is never
    /// sent as such.
    pub(crate) fn abandon(&mut self, seq: u64) {
        if let Some(p) = self.requests.get_mut(&seq) {
            p.abandoned = true;
            p.slot = None;
        }
    }

    /// A connection attempt succeeded.
    pub(crate) fn connected(&mut self, now: Instant, welcome: &SubmitterWelcome) {
        if self.is_closed() {
            return;
        }
        let asked = self.session;
        let resumed = welcome.resumed && asked == Some((welcome.manager_id, welcome.session));
        let restored = resumed && welcome.restored;
        self.grace = self
            .cfg
            .reconnect_grace
            .unwrap_or(Duration::from_millis(welcome.reconnect_grace_ms))
            .min(MAX_GRACE);
        self.heartbeat_timeout = Duration::from_millis(welcome.heartbeat_timeout_ms)
            .min(crate::link::MAX_HEARTBEAT_TIMEOUT);
        self.link = Link::Up;
        self.lost_since = None;
        if !resumed {
            if asked.is_some() {
                self.end_session(
                    now,
                    "the manager no longer had this client's session (its reconnect grace ran out, or it restarted)",
                );
            }
            self.session = Some((welcome.manager_id, welcome.session));
            self.renumber_from(welcome.next_request);
        } else if !restored && welcome.next_request > self.next_request {
            self.cut(format!(
                "the manager says it took request {} and more, but only {} were sent",
                welcome.next_request, self.next_request
            ));
            return;
        }
        // Requests from `next_request` on were not taken: (again) now, in order. A
        // submit whose caller gave up goes as a harmless request instead, to keep the
        // numbering. A restored session knows no longer what it took: every request
        // without an answer goes again, after the jobs followed (the manager answers a
        // submit it has in its journal with its jobs, whose events may come first).
        let mut from = welcome.next_request;
        if restored {
            from = 0;
            log::info!(
                "client {}: the manager restarted and restored this client's session",
                self.cfg.name
            );
            let mut jobs: Vec<JobId> = self
                .follows
                .iter()
                .filter(|(_, f)| !f.ended)
                .map(|(&id, _)| id)
                .collect();
            jobs.sort();
            for piece in jobs.chunks(MAX_FOLLOW) {
                self.actions.push(Action::Send(SubmitterMessage::Follow {
                    jobs: piece.to_vec(),
                }));
            }
            if jobs.is_empty() {
                self.actions
                    .push(Action::Send(SubmitterMessage::Follow { jobs }));
            }
            self.restored_submits = self
                .requests
                .iter()
                .filter(|(_, p)| {
                    matches!(
                        p.request,
                        Request::Submit { .. } | Request::SubmitArray { .. }
                    )
                })
                .map(|(&seq, _)| seq)
                .collect();
        }
        for (&seq, p) in self.requests.range_mut(from..) {
            // (After a restart a submit goes as it was: its jobs, if it was taken, are
            // cancelled when the answer comes.)
            let request = if p.abandoned
                && !restored
                && matches!(
                    p.request,
                    Request::Submit { .. } | Request::SubmitArray { .. } | Request::Attach { .. }
                ) {
                Request::Stats
            } else {
                p.request.clone()
            };
            p.sent = true;
            self.actions
                .push(Action::Send(SubmitterMessage::Request { seq, request }));
        }
        // Stdin the manager has not said it took: again, from what it last said.
        let mut jobs: Vec<JobId> = self.stdins.keys().copied().collect();
        jobs.sort();
        for job in jobs {
            let Some(st) = self.stdins.get_mut(&job) else {
                continue;
            };
            st.w.link(None).expect("from what was taken");
            if let Some(size) = st.size {
                self.actions
                    .push(Action::Send(SubmitterMessage::Resize { job, size }));
            }
            self.send_stdin(job);
        }
        self.ack(true);
    }

    /// Sends what an interactive job's stdin has pending, if the link is up.
    fn send_stdin(&mut self, job: JobId) {
        if !self.is_up() {
            return;
        }
        let Some(st) = self.stdins.get_mut(&job) else {
            return;
        };
        for o in st.w.pending() {
            let msg = match o {
                StdinOut::Data { offset, bytes } => SubmitterMessage::Stdin { job, offset, bytes },
                StdinOut::Eof { offset } => SubmitterMessage::StdinEof { job, offset },
            };
            self.actions.push(Action::Send(msg));
        }
    }

    /// Bytes for an interactive job's stdin: how many were taken (0 when the window is
    /// full: the caller waits for the manager to take some). `Refused` once the job's
    /// stdin is closed, the job ended, or the client does not follow it.
    pub(crate) fn stdin_write(&mut self, job: JobId, bytes: &[u8]) -> Result<usize, Refused> {
        let st = self.stdins.get_mut(&job).ok_or(Refused::Closed)?;
        let n = st.w.write(bytes)?;
        if n > 0 {
            self.send_stdin(job);
        }
        Ok(n)
    }

    /// Ends an interactive job's stdin after what was written.
    pub(crate) fn stdin_finish(&mut self, job: JobId) -> Result<(), Refused> {
        let st = self.stdins.get_mut(&job).ok_or(Refused::Closed)?;
        st.w.finish()?;
        self.send_stdin(job);
        Ok(())
    }

    /// A terminal job's new size (told now, and again after a reconnect).
    pub(crate) fn resize(&mut self, job: JobId, size: PtySize) -> Result<(), Refused> {
        let st = self.stdins.get_mut(&job).ok_or(Refused::Closed)?;
        st.size = Some(size);
        if self.is_up() {
            self.actions
                .push(Action::Send(SubmitterMessage::Resize { job, size }));
        }
        Ok(())
    }

    fn on_stdin(&mut self, job: JobId, taken: u64, closed: bool) {
        let Some(st) = self.stdins.get_mut(&job) else {
            return;
        };
        if taken > st.w.written() {
            st.w.catch_up(taken);
        }
        let r = if closed {
            st.w.on_closed(taken).map(|_| ())
        } else {
            st.w.on_taken(taken).map(|_| ())
        };
        if let Err(e) = r {
            self.cut(format!("job {job}: {e}"));
        }
    }

    /// A connection attempt failed.
    pub(crate) fn connect_failed(&mut self, now: Instant, why: &str) {
        let failures = match self.link {
            Link::Connecting { failures } => failures + 1,
            _ => return,
        };
        log::debug!("client {}: cannot reach the manager: {why}", self.cfg.name);
        self.lost_since.get_or_insert(now);
        let at = now + self.backoff(failures);
        self.link = Link::Waiting { at, failures };
        self.tick(now);
    }

    /// The link that was up is gone.
    pub(crate) fn disconnected(&mut self, now: Instant, why: &str) {
        if self.link != Link::Up {
            return;
        }
        log::info!(
            "client {}: lost the connection to the manager: {why}; reconnecting",
            self.cfg.name
        );
        self.lost_since = Some(now);
        for st in self.stdins.values_mut() {
            st.w.unlink();
        }
        let at = now + self.backoff(1);
        self.link = Link::Waiting { at, failures: 1 };
    }

    /// Timers: held events tried again, the next connection attempt, giving up on a
    /// lost session.
    pub(crate) fn tick(&mut self, now: Instant) {
        if self.retry_at.is_some_and(|t| now >= t) {
            self.drain(now);
        }
        if let (Some(since), Some(_)) = (self.lost_since, self.session)
            && self.link != Link::Up
            && now >= since + self.grace
        {
            let why = format!(
                "no contact with the manager for its reconnect grace ({:.1} s)",
                self.grace.as_secs_f64()
            );
            log::warn!("client {}: {why}; its session is over", self.cfg.name);
            self.end_session(now, &why);
            self.session = None;
            self.lost_since = None;
            self.renumber_from(0);
        }
        if let Link::Waiting { at, failures } = self.link
            && now >= at
        {
            self.link = Link::Connecting { failures };
            self.actions.push(Action::Connect {
                hello: self.hello(),
                deadline: now + self.cfg.connect_timeout,
            });
        }
    }

    /// What to send when a heartbeat is due: an acknowledgement if anything is
    /// unacknowledged (it keeps the link alive as well).
    pub(crate) fn beat(&mut self) -> SubmitterMessage {
        let next = self.taken();
        if next > self.acked && self.is_up() {
            self.note_ack(next);
            return SubmitterMessage::Ack { next };
        }
        SubmitterMessage::Heartbeat
    }

    /// One event from the manager.
    pub(crate) fn received(&mut self, now: Instant, seq: u64, event: SessionEvent) {
        if seq < self.next_event {
            return; // sent again after a resume, and already here
        }
        if seq > self.next_event {
            self.cut(format!(
                "the manager skipped from event {} to event {seq}",
                self.next_event
            ));
            return;
        }
        self.next_event += 1;
        match event {
            SessionEvent::Stdin { job, taken, closed } => {
                self.on_stdin(job, taken, closed);
                self.taken_events += 1;
            }
            SessionEvent::Reply { request, reply } => {
                self.on_reply(request, reply);
                self.taken_events += 1;
                if self.restored_submits.remove(&request) && !self.held.is_empty() {
                    // Events held for the jobs it answers with may go now.
                    self.drain(now);
                }
            }
            SessionEvent::Job { job, event } => {
                self.job_event(now, Held::new(Some(seq), job, event));
            }
            SessionEvent::Output {
                job,
                attempt,
                seq: out,
                stream,
                bytes,
            } => {
                let mut h = Held::new(Some(seq), job, JobEvent::Output { stream, bytes });
                h.out = Some((attempt, out));
                self.job_event(now, h);
            }
        }
        self.ack(false);
    }

    fn job_event(&mut self, now: Instant, h: Held) {
        if matches!(h.event, JobEvent::Finished(_)) {
            if let Some(f) = self.follows.get_mut(&h.job) {
                f.ended = true;
            }
            // Its stdin's writers hear at once.
            self.stdins.remove(&h.job);
        }
        self.held.push_back(h);
        if self.retry_at.is_none() {
            self.drain(now);
        }
    }

    /// The client is closing: a goodbye goes out if a link is up; waiting callers are
    /// told, and followed jobs' channels are let go of (their readers see the end).
    pub(crate) fn close(&mut self) {
        if self.is_closed() {
            return;
        }
        self.restored_submits.clear();
        if self.is_up() {
            self.actions.push(Action::Send(SubmitterMessage::Goodbye));
        }
        self.link = Link::Closed;
        for (_, p) in std::mem::take(&mut self.requests) {
            if let Some(slot) = p.slot {
                let _ = slot.send(Err(Error::ShutDown));
            }
        }
        self.follows.clear();
        self.stdins.clear();
        self.held.clear();
        self.retry_at = None;
    }

    /// Whether the session follows the job (its events go to a `RemoteJob` of this client).
    pub(crate) fn follows_job(&self, job: JobId) -> bool {
        self.follows.contains_key(&job)
    }

    /// How many requests wait for their answers (for tests and statistics).
    #[cfg(test)]
    pub(crate) fn waiting_requests(&self) -> usize {
        self.requests.len()
    }

    /// How many events are held.
    #[cfg(test)]
    pub(crate) fn held_events(&self) -> usize {
        self.held.len()
    }

    fn cut(&mut self, why: String) {
        log::warn!("client {}: {why}; dropping the connection", self.cfg.name);
        self.actions.push(Action::Cut(why));
    }

    /// The `seq` of the first event not yet taken: handed over, dropped, or (a reply)
    /// answered. Replies are answered as they come; job events wait behind a held one.
    fn taken(&self) -> u64 {
        self.held
            .iter()
            .find_map(|h| h.seq)
            .unwrap_or(self.next_event)
    }

    fn note_ack(&mut self, next: u64) {
        self.acked = next;
        self.taken_events = 0;
        self.taken_bytes = 0;
    }

    /// Acknowledges what was taken, if enough was (or `force`, and anything was).
    fn ack(&mut self, force: bool) {
        if !self.is_up() {
            return;
        }
        let enough = self.taken_events >= ACK_EVENTS || self.taken_bytes >= ACK_BYTES;
        if !(force || enough) {
            return;
        }
        let next = self.taken();
        if next > self.acked {
            self.note_ack(next);
            self.actions
                .push(Action::Send(SubmitterMessage::Ack { next }));
        }
    }

    /// Hands held events to their jobs' channels, in order, until one does not fit.
    fn drain(&mut self, now: Instant) {
        let was_blocked = self.retry_at.take().is_some();
        while let Some(mut h) = self.held.pop_front() {
            let bytes = match &h.event {
                JobEvent::Output { bytes, .. } => bytes.len(),
                _ => 0,
            };
            if let Some(f) = self.follows.get_mut(&h.job) {
                if !std::mem::replace(&mut h.checked, true) {
                    match f.admit(&h.event, h.out) {
                        Verdict::Take => {}
                        Verdict::Drop => {
                            if h.seq.is_some() {
                                self.taken_events += 1;
                                self.taken_bytes += bytes;
                            }
                            continue;
                        }
                        Verdict::Gap(lost) => {
                            log::warn!(
                                "client {}: job {}: {lost} output message(s) never came",
                                self.cfg.name,
                                h.job
                            );
                            let warning = JobEvent::Warning(format!(
                                "{lost} output message(s) of this job were lost while the manager restarted"
                            ));
                            let mut w = Held::new(None, h.job, warning);
                            w.checked = true;
                            self.held.push_front(h);
                            self.held.push_front(w);
                            continue;
                        }
                    }
                }
                let finished = matches!(h.event, JobEvent::Finished(_));
                match f.tx.try_send(h.event) {
                    Ok(()) => {
                        if finished {
                            self.follows.remove(&h.job);
                        }
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        // Its handle was dropped: nobody reads it.
                        self.follows.remove(&h.job);
                    }
                    Err(TrySendError::Full(event)) => {
                        h.event = event;
                        self.held.push_front(h);
                        self.retry_at = Some(now + HELD_RETRY);
                        return;
                    }
                }
            } else if h.seq.is_some() && !self.restored_submits.is_empty() {
                // Perhaps a job of a submit sent again after a restart, whose answer
                // comes after the events the manager kept for it: it waits for that.
                self.held.push_front(h);
                self.retry_at = Some(now + HELD_RETRY);
                return;
            }
            // (A job nobody follows any more: its events are dropped.)
            if h.seq.is_some() {
                self.taken_events += 1;
                self.taken_bytes += bytes;
            }
        }
        if was_blocked {
            self.ack(true);
        }
    }

    fn on_reply(&mut self, seq: u64, reply: Reply) {
        let Some(p) = self.requests.remove(&seq) else {
            log::debug!(
                "client {}: an answer to request {seq}, which nobody waits for",
                self.cfg.name
            );
            return;
        };
        let followed = match (&p.request, &reply) {
            (_, Reply::Submitted(ids)) => Some(ids.clone()),
            (Request::Attach { job }, Reply::Attached) => Some(vec![*job]),
            _ => None,
        };
        // An interactive job's stdin, written from its start; an attached job's from
        // where the manager says it is (its next event: closed for a job that is not
        // interactive).
        let interactive = match &p.request {
            Request::Submit { spec, .. } | Request::SubmitArray { spec, .. } => spec.interactive,
            Request::Attach { .. } => true,
            _ => false,
        };
        if interactive && let Some(ids) = &followed {
            for &id in ids {
                let mut st = Stdin::default();
                if self.is_up() {
                    st.w.link(None).expect("from the start");
                }
                self.stdins.insert(id, st);
            }
        }
        if let Some(ids) = followed {
            let mut receivers = Vec::with_capacity(ids.len());
            // A submitted job's output counts from the start of its first attempt.
            let run = matches!(reply, Reply::Submitted(_)).then_some((1, 0));
            for &id in &ids {
                let (tx, rx) = bounded(JOB_CHANNEL);
                self.follows.insert(id, Follow::new(tx, run));
                receivers.push((id, rx));
            }
            let given = p
                .slot
                .is_some_and(|slot| slot.send(Ok(Answer::Follow(receivers))).is_ok());
            if !given {
                // Its caller gave up: nobody will see these jobs.
                for id in ids {
                    self.follows.remove(&id);
                    self.stdins.remove(&id);
                    if matches!(reply, Reply::Submitted(_)) {
                        let _ = self.request(Request::Cancel { job: id }, None);
                    }
                }
            }
            return;
        }
        if let Some(slot) = p.slot {
            let answer = match reply {
                Reply::Failed(e) => Err(request_error(e)),
                other => Ok(Answer::Reply(other)),
            };
            let _ = slot.send(answer);
        }
    }

    /// The session is over without the manager: requests that went out fail (they may
    /// or may not have been carried out), and every followed job that has not ended
    /// ends, after what is held for it, with a warning and `Rejected`. Requests that
    /// never went out wait for the next session.
    fn end_session(&mut self, now: Instant, why: &str) {
        let mut failed = 0;
        let requests = std::mem::take(&mut self.requests);
        for (seq, p) in requests {
            if p.sent {
                failed += 1;
                if let Some(slot) = p.slot {
                    let _ = slot.send(Err(Error::ContactLost(format!(
                        "{why}; whether the request was carried out is not known"
                    ))));
                }
            } else if !p.abandoned {
                self.requests.insert(seq, p);
            }
        }
        self.restored_submits.clear();
        for h in &mut self.held {
            h.seq = None; // that session's numbering is over
        }
        // The jobs of that session are over for this client: so are their stdins.
        self.stdins.clear();
        let mut ended: Vec<JobId> = self
            .follows
            .iter_mut()
            .filter(|(_, f)| !f.ended)
            .map(|(id, f)| {
                f.ended = true;
                *id
            })
            .collect();
        ended.sort();
        for &job in &ended {
            self.held.push_back(Held::new(
                None,
                job,
                JobEvent::Warning(format!("contact with the manager was lost: {why}")),
            ));
            self.held.push_back(Held::new(
                None,
                job,
                JobEvent::Finished(Outcome::Rejected(format!(
                    "contact with the manager was lost ({why}); the job's fate is not known"
                ))),
            ));
        }
        if failed + ended.len() > 0 {
            log::warn!(
                "client {}: {why}: {failed} request(s) failed, {} job(s) ended",
                self.cfg.name,
                ended.len()
            );
        }
        self.next_event = 0;
        self.acked = 0;
        self.taken_events = 0;
        self.taken_bytes = 0;
        if self.retry_at.is_none() {
            self.drain(now);
        }
    }

    /// Numbers the requests that wait (none of which went out) from `first`.
    fn renumber_from(&mut self, first: u64) {
        let waiting = std::mem::take(&mut self.requests);
        self.next_request = first;
        for (_, p) in waiting {
            self.requests.insert(self.next_request, p);
            self.next_request += 1;
        }
    }

    /// The wait after the `failures`-th failed attempt in a row (see `random::backoff`).
    fn backoff(&mut self, failures: u32) -> Duration {
        let c = &self.cfg;
        crate::random::backoff(c.backoff_initial, c.backoff_max, failures, &mut self.rng)
    }
}

/// A failed request as the crate's error.
pub(crate) fn request_error(e: RequestError) -> Error {
    match e {
        RequestError::QueueFull { capacity } => Error::QueueFull { capacity },
        RequestError::InvalidJob(why) => Error::InvalidJob(why),
        RequestError::NoSuchJob(id) => Error::UnknownJob(id.0),
        RequestError::NotYours(id) => {
            Error::NotPermitted(format!("job {id} was submitted with another certificate"))
        }
        RequestError::ShutDown => Error::ShutDown,
        RequestError::Journal(why) => Error::Journal(why),
    }
}

#[cfg(test)]
mod tests;
