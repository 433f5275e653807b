//! Submitters: remote connections that send jobs and follow them.
//!
//! A submitter's connection belongs to a **session**, which outlives the connection for
//! the reconnect grace. The session numbers what it sends (replies to requests and the
//! events of the jobs it follows) and keeps what the submitter has not acknowledged, to
//! send it again after a reconnect; it takes each numbered request once. A session
//! that stays away past the grace is closed: the attached jobs it submitted are
//! cancelled. A detached job keeps the last part of its output for whoever attaches
//! later, and is forgotten a while after it ends.
//!
//! With a journal, a restarted manager rebuilds the sessions and jobs it finds there
//! ([`Hub::restore`]): each session waits for its submitter for the grace, adopts the
//! submitter's numbering of events when it comes back, and answers a submit the journal
//! holds with its jobs instead of submitting them again.
//!
//! [`Hub`] is the state machine (sessions, the jobs they follow, what is unacknowledged,
//! the grace), tested in memory on a clock the test moves. [`Submitters`] puts it behind
//! a lock for the threads that feed it: each submitter's link thread ([`serve`]), the job
//! sinks that push job events into it (through [`RemoteDest`]), and a timer thread that
//! ends sessions past their grace.

use super::Shared;
use super::dispatcher::driver::Event;
use super::sink::{Dest, JobSink};
use super::stdin::StdinPort;
use crate::error::Error;
use crate::job::{JobEvent, JobId, JobSpec, JobStatus, Outcome, Stream};
use crate::journal::{self, EndedJob, Journal, OpenJob};
use crate::link::{self, Beat, Established, Pace, Tx};
use crate::protocol::{
    self, Reply, Request, RequestError, SessionResume, SubmitterHello, SubmitterMessage,
    SubmitterWelcome, ToSubmitter,
};
use crate::sync::{self, lock};
use crossbeam_channel::{SendError, TrySendError};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// The most bytes of unacknowledged events a session keeps for its submitter; beyond
/// it, the output of the jobs it follows waits (their workers are paused) until it
/// acknowledges. 1 MiB streamed fastest on loopback: 1 GiB through `workpool submit`
/// took a median 2.0 s with 1 MiB, 2.8 s with 4 MiB and 5.4 s with 16 MiB (a
/// submitter acknowledges every 512 KiB; see docs/PERFORMANCE.md).
pub(crate) const WINDOW: usize = 1 << 20;

/// The most jobs a `Jobs` answer lists (the oldest first), and the most bytes of each
/// script it shows, so that the answer fits one frame.
const MAX_LISTED_JOBS: usize = 10_000;
const MAX_LISTED_SCRIPT: usize = 1024;

/// How many jobs a restored session may be told have ended unknown beyond those the
/// journal says it submitted (jobs it had attached to; see [`Hub::follow_again`]).
const UNKNOWN_ENDS_SLACK: usize = 10_000;

/// The most bytes of output a detached job keeps in one event (see `Kept::push`).
const KEPT_CHUNK: usize = 64 << 10;

/// The most jobs one array request may hold.
pub(crate) const MAX_ARRAY: u64 = 1_000_000;
/// The most bytes an array's jobs may hold in all (each job has its own copy of the
/// spec: one request of a few MiB must not become gigabytes in the manager).
pub(crate) const MAX_ARRAY_BYTES: usize = 1 << 30;

/// Who a session is: the certificate (DER) its connection presented; `None` without TLS
/// (every plaintext submitter is the same nobody).
pub(crate) type Owner = Option<Arc<[u8]>>;

/// What the hub keeps and for how long.
#[derive(Clone, Debug)]
pub(crate) struct HubSettings {
    /// How long a session waits for its submitter to come back.
    pub grace: Duration,
    /// See [`WINDOW`].
    pub window: usize,
    /// The most output bytes a detached job keeps (its last ones).
    pub kept_output: usize,
    /// How long a detached job is kept after it ends.
    pub keep_ended_for: Duration,
    /// The most ended detached jobs kept (the oldest are forgotten first).
    pub keep_ended: usize,
    /// The most sessions one certificate may hold (none without TLS).
    pub max_sessions_per_owner: usize,
}

struct Session {
    owner: Owner,
    /// Its connection's sending side, while it has one.
    link: Option<Arc<Tx>>,
    /// The `seq` the next event gets.
    next_event: u64,
    /// Events sent and not acknowledged, as frames, oldest first.
    unacked: VecDeque<(u64, Vec<u8>)>,
    unacked_bytes: usize,
    /// The `seq` of the next request to take.
    next_request: u64,
    /// Since when it has had no connection.
    gone_since: Option<Instant>,
    /// Attached jobs it submitted that have not ended: cancelled when it is closed.
    attached: BTreeSet<JobId>,
    /// Rebuilt from the journal after a restart (see [`Hub::restore`]): it takes
    /// requests with gaps (its submitter sends again each one it has no answer for),
    /// and its welcome says `restored` until the submitter has said which jobs it
    /// follows ([`Hub::follow_again`], then [`Hub::follows_told`]).
    restored: bool,
    /// The submitter came back: the numbering of events is its (for a restored
    /// session, events are numbered provisionally from 0 until then).
    adopted: bool,
    /// A restored session's submitter has said which jobs it follows.
    told_follows: bool,
    /// How many more followed jobs it may be told have ended unknown (each is an
    /// event kept for it beyond the window): the jobs the journal says it submitted,
    /// and some it may have attached to.
    unknown_ends: usize,
}

impl Session {
    /// Numbers an event, keeps it until it is acknowledged and sends it if connected.
    fn emit(&mut self, event: SessionEventRef<'_>) {
        let seq = self.next_event;
        let mut frame = Vec::new();
        let msg = ToSubmitterRef::Event { seq, event };
        if let Err(e) = protocol::encode_into(&mut frame, &msg) {
            // Only an answer can be this large; say so instead of leaving the
            // submitter waiting for it.
            log::error!("dropping a submitter event that cannot be encoded: {e}");
            let &SessionEventRef::Reply { request, .. } = msg.event() else {
                return;
            };
            frame.clear();
            let failed = Reply::Failed(RequestError::InvalidJob(format!(
                "the answer is too large to send: {e}"
            )));
            let msg = ToSubmitterRef::Event {
                seq,
                event: SessionEventRef::Reply {
                    request,
                    reply: &failed,
                },
            };
            if protocol::encode_into(&mut frame, &msg).is_err() {
                return;
            }
        }
        self.next_event += 1;
        if let Some(tx) = &self.link
            && tx.send_parts(&[&frame]) == link::Sent::Refused
        {
            // The link thread notices and closes the session's connection; the event
            // is kept for the submitter's return.
            self.link = None;
        }
        self.unacked_bytes += frame.len();
        self.unacked.push_back((seq, frame));
    }

    fn ack(&mut self, next: u64) {
        while let Some((seq, frame)) = self.unacked.front() {
            if *seq >= next {
                break;
            }
            self.unacked_bytes -= frame.len();
            self.unacked.pop_front();
        }
    }

    fn full(&self, window: usize) -> bool {
        self.unacked_bytes >= window
    }

    /// A restored session's submitter came back expecting event `next_event` next: the
    /// events kept for it since the restart are numbered from there.
    fn adopt(&mut self, next_event: u64) {
        let kept = std::mem::take(&mut self.unacked);
        self.unacked_bytes = 0;
        self.next_event = next_event;
        for (_, frame) in kept {
            let event = match protocol::decode::<ToSubmitter>(&frame[4..]) {
                Ok(ToSubmitter::Event { event, .. }) => event,
                other => {
                    log::error!("a kept submitter event does not decode: {other:?}");
                    continue;
                }
            };
            let seq = self.next_event;
            let mut frame = Vec::new();
            if protocol::encode_into(&mut frame, &ToSubmitter::Event { seq, event }).is_ok() {
                self.next_event += 1;
                self.unacked_bytes += frame.len();
                self.unacked.push_back((seq, frame));
            }
        }
        self.adopted = true;
    }
}

/// `ToSubmitter::Event` as bincode lays it out, from borrowed parts (no copy of a job's
/// output to encode it).
#[derive(Serialize)]
enum ToSubmitterRef<'a> {
    Event {
        seq: u64,
        event: SessionEventRef<'a>,
    },
}

impl<'a> ToSubmitterRef<'a> {
    fn event(&self) -> &SessionEventRef<'a> {
        let ToSubmitterRef::Event { event, .. } = self;
        event
    }
}

/// `SessionEvent`, borrowed.
#[derive(Clone, Copy, Serialize)]
enum SessionEventRef<'a> {
    Reply {
        request: u64,
        reply: &'a Reply,
    },
    Stdin {
        job: JobId,
        taken: u64,
        closed: bool,
    },
    Job {
        job: JobId,
        event: &'a JobEvent,
    },
    Output {
        job: JobId,
        attempt: u32,
        seq: u64,
        stream: Stream,
        #[serde(with = "protocol::byte_buf")]
        bytes: &'a [u8],
    },
}

/// A job that remote submitters follow.
struct Record {
    owner: Owner,
    detached: bool,
    /// The sessions that get its events.
    watchers: Vec<u64>,
    /// A detached job's last events, for a later `attach`.
    kept: Option<Kept>,
    ended: bool,
    /// An interactive job's stdin, which the session that submitted it writes.
    stdin: Option<Arc<StdinPort>>,
    /// The session that submitted the job.
    submitter: u64,
    /// The attempt its output comes from (see `SessionEvent::Output`).
    attempt: u32,
}

/// The last events of a detached job: every event but output is kept; output is kept
/// up to a number of bytes, the oldest dropped first and counted.
#[derive(Default)]
struct Kept {
    events: VecDeque<JobEvent>,
    output: usize,
    dropped: u64,
    /// The attempt and worker's `seq` of the last output message kept, if it came
    /// numbered: the last kept output is replayed with them, so that a submitter that
    /// attached drops that output when the worker sends it again after a restart.
    last_out: Option<(u32, u64)>,
}

impl Kept {
    fn push(&mut self, ev: &JobEvent, limit: usize) {
        if let JobEvent::Output { bytes, stream } = ev {
            self.output += bytes.len();
            // Output joins the chunk before it (up to a size): a job that writes a byte
            // at a time would otherwise cost an event (tens of bytes) per byte kept.
            if let Some(JobEvent::Output {
                stream: last_stream,
                bytes: last,
            }) = self.events.back_mut()
                && last_stream == stream
                && last.len() + bytes.len() <= KEPT_CHUNK
            {
                last.extend_from_slice(bytes);
                self.trim(limit);
                return;
            }
        }
        self.events.push_back(ev.clone());
        self.trim(limit);
    }

    /// Drops the oldest output beyond `limit` bytes.
    fn trim(&mut self, limit: usize) {
        while self.output > limit {
            // Drop the oldest output (whole chunks, then part of one).
            let Some(i) = self
                .events
                .iter()
                .position(|e| matches!(e, JobEvent::Output { .. }))
            else {
                break;
            };
            let JobEvent::Output { bytes, .. } = &mut self.events[i] else {
                unreachable!("found as output");
            };
            let over = self.output - limit;
            if bytes.len() <= over {
                self.output -= bytes.len();
                self.dropped += bytes.len() as u64;
                self.events.remove(i);
            } else {
                bytes.drain(..over);
                self.output -= over;
                self.dropped += over as u64;
            }
        }
    }

    /// The output a journal keeps of it: its chunks, in order.
    fn output(&self) -> Vec<(Stream, Vec<u8>)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                JobEvent::Output { stream, bytes } => Some((*stream, bytes.clone())),
                _ => None,
            })
            .collect()
    }

    /// What a new watcher is sent: the kept events, a note of the dropped output first.
    fn replay(&self) -> Vec<JobEvent> {
        let mut out = Vec::with_capacity(self.events.len() + 1);
        let mut noted = self.dropped == 0;
        for ev in &self.events {
            if !noted && matches!(ev, JobEvent::Output { .. }) {
                out.push(JobEvent::Warning(format!(
                    "{} bytes of earlier output were not kept (a detached job keeps its last {})",
                    self.dropped,
                    human_bytes(self.output.max(1) as u64)
                )));
                noted = true;
            }
            out.push(ev.clone());
        }
        out
    }
}

fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} bytes")
    }
}

/// What became of a job event pushed into the hub.
#[derive(Debug, PartialEq)]
pub(crate) enum Pushed {
    /// Taken: sent to (and kept for) every session that follows the job.
    Taken,
    /// A session that follows the job has its window full: try again when it has room.
    Full(JobEvent),
    /// Nobody follows the job any more: its events can be dropped.
    Gone(JobEvent),
}

/// What a submitter's hello led to.
#[derive(Debug, PartialEq)]
pub(crate) struct Opened {
    pub session: u64,
    pub resumed: bool,
    /// Resumed into a session rebuilt from the journal (see `SubmitterWelcome::restored`).
    pub restored: bool,
    pub next_request: u64,
}

/// Whether a numbered request is to be carried out.
#[derive(Debug, PartialEq)]
pub(crate) enum Take {
    /// Yes: it is the next one.
    New,
    /// No: it was taken before (sent again after a reconnect).
    Again,
    /// No: requests before it are missing (a broken peer).
    Gap { expected: u64 },
    /// No: the session holds this many bytes the submitter has not acknowledged.
    Unacknowledged(usize),
}

/// The sessions of remote submitters and the jobs they follow.
pub(crate) struct Hub {
    settings: HubSettings,
    sessions: HashMap<u64, Session>,
    jobs: HashMap<JobId, Record>,
    /// Detached jobs that ended, with when each is forgotten, oldest first.
    ended: VecDeque<(Instant, JobId)>,
    /// See [`Hub::take_timer_news`].
    timer_news: bool,
    /// See [`Hub::take_orphaned_stdin`].
    orphaned_stdin: Vec<Arc<StdinPort>>,
    /// Where a detached job's kept output is recorded at its end.
    journal: Option<Arc<dyn Journal>>,
    /// The jobs each request of a restored session submitted, as the journal holds
    /// them: a request sent again is answered with them (see [`Hub::answer_again`]).
    requests: HashMap<u64, HashMap<u64, Vec<JobId>>>,
    /// Per restored session, the last request the journal holds jobs of: the old
    /// manager took every request up to it (a session's requests are taken in order).
    taken_upto: HashMap<u64, u64>,
}

/// The end given to a job that a submitter follows and a restarted manager no longer
/// knows.
fn not_kept() -> Outcome {
    Outcome::Rejected(
        "the job ended before the manager restarted, and its end was not kept: its outcome is not known"
            .into(),
    )
}

impl Hub {
    pub(crate) fn new(settings: HubSettings) -> Hub {
        Hub {
            settings,
            sessions: HashMap::new(),
            jobs: HashMap::new(),
            ended: VecDeque::new(),
            timer_news: false,
            orphaned_stdin: Vec::new(),
            journal: None,
            requests: HashMap::new(),
            taken_upto: HashMap::new(),
        }
    }

    /// Records each detached job's kept output in `journal` when the job ends.
    pub(crate) fn set_journal(&mut self, journal: Arc<dyn Journal>) {
        self.journal = Some(journal);
    }

    /// Rebuilds, after a restart, what the journal holds of remote submitters (called
    /// once, before any submitter connects; `now` and `wall` are the same moment on the
    /// two clocks):
    ///
    /// - each session that submitted a job of `open` or `ended`, away since now (it
    ///   waits for its submitter for the grace, then is closed and its attached jobs are
    ///   cancelled), with its certificate, following the open jobs it submitted;
    /// - each open job of `open` (other submitters are skipped), attached or detached,
    ///   at its attempt; a detached one keeps its output from now on;
    /// - each ended detached job of `ended` (oldest end first), with its kept output and
    ///   its outcome, for `attach` until its retention, counted from its `ended_at`;
    /// - `remote_requests` (`(session, request, job)`, in job order): what a request sent
    ///   again is answered with.
    pub(crate) fn restore(
        &mut self,
        now: Instant,
        wall: SystemTime,
        open: &[&OpenJob],
        ended: Vec<EndedJob>,
        remote_requests: &[(u64, u64, JobId)],
    ) {
        let keep_for = self.settings.keep_ended_for;
        let limit = self.settings.kept_output;
        for job in open {
            let journal::Submitter::Remote {
                cert,
                session,
                detached,
                ..
            } = &job.submitter
            else {
                continue;
            };
            let s = self.restored_session(now, *session, cert);
            if !detached {
                s.attached.insert(job.id);
            }
            self.jobs.insert(
                job.id,
                Record {
                    owner: cert.as_deref().map(Arc::from),
                    detached: *detached,
                    watchers: vec![*session],
                    kept: detached.then(Kept::default),
                    ended: false,
                    stdin: None,
                    submitter: *session,
                    attempt: job.attempt,
                },
            );
        }
        for job in ended {
            let journal::Submitter::Remote { cert, session, .. } = &job.submitter else {
                continue;
            };
            let age = wall.duration_since(job.ended_at).unwrap_or_default();
            let Some(left) = keep_for.checked_sub(age).filter(|d| !d.is_zero()) else {
                continue; // kept long enough already
            };
            self.restored_session(now, *session, cert);
            let mut kept = Kept::default();
            for (stream, bytes) in job.output {
                kept.push(&JobEvent::Output { stream, bytes }, limit);
            }
            kept.dropped += job.dropped;
            kept.push(&JobEvent::Finished(job.outcome), limit);
            self.jobs.insert(
                job.id,
                Record {
                    owner: cert.as_deref().map(Arc::from),
                    detached: true,
                    watchers: Vec::new(),
                    kept: Some(kept),
                    ended: true,
                    stdin: None,
                    submitter: *session,
                    attempt: 1,
                },
            );
            self.ended.push_back((now + left, job.id));
        }
        self.forget_ended(now);
        for &(session, request, job) in remote_requests {
            if let Some(s) = self.sessions.get_mut(&session) {
                s.unknown_ends += 1;
                let upto = self.taken_upto.entry(session).or_default();
                *upto = (*upto).max(request);
                self.requests
                    .entry(session)
                    .or_default()
                    .entry(request)
                    .or_default()
                    .push(job);
            }
        }
    }

    /// The restored session `id`, made now if it is not there yet.
    fn restored_session(&mut self, now: Instant, id: u64, cert: &Option<Vec<u8>>) -> &mut Session {
        self.sessions.entry(id).or_insert_with(|| Session {
            owner: cert.as_deref().map(Arc::from),
            link: None,
            next_event: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            next_request: 0,
            gone_since: Some(now),
            attached: BTreeSet::new(),
            restored: true,
            adopted: false,
            told_follows: false,
            unknown_ends: UNKNOWN_ENDS_SLACK,
        })
    }

    /// A connection's hello: resumes its session if it names one this manager still
    /// keeps for the same certificate, else starts a new one. What the submitter has
    /// not received is sent again on `link` (which holds it until the welcome). A
    /// restored session takes the submitter's numbering of events the first time.
    pub(crate) fn open(
        &mut self,
        owner: Owner,
        link: Arc<Tx>,
        resume: Option<&SessionResume>,
        manager_id: u64,
    ) -> Result<Opened, String> {
        if let Some(r) = resume.filter(|r| r.manager_id == manager_id)
            && let Some(s) = self.sessions.get_mut(&r.session)
            && s.owner == owner
        {
            if let Some(old) = s.link.replace(link.clone()) {
                // The old connection is dead, whether or not its thread knows yet.
                old.cut();
            }
            if !s.adopted {
                // Room for as many events as a session could ever number.
                if r.next_event > u64::MAX / 2 {
                    return Err(format!(
                        "its resume names event {}, out of range",
                        r.next_event
                    ));
                }
                s.adopt(r.next_event);
            }
            s.gone_since = None;
            s.ack(r.next_event.min(s.next_event));
            for (_, frame) in &s.unacked {
                if link.send_parts(&[frame]) == link::Sent::Refused {
                    s.link = None;
                    break;
                }
            }
            return Ok(Opened {
                session: r.session,
                resumed: true,
                restored: s.restored && !s.told_follows,
                next_request: s.next_request,
            });
        }
        if owner.is_some() {
            // Sessions restored from the journal count once their submitter is back.
            let held = self
                .sessions
                .values()
                .filter(|s| s.owner == owner && s.adopted)
                .count();
            let max = self.settings.max_sessions_per_owner;
            if held >= max {
                return Err(format!(
                    "its certificate already holds {held} session(s), the most allowed (max_sessions_per_certificate = {max}); a session is kept for the reconnect grace after its connection ends"
                ));
            }
        }
        let mut id = crate::random::u64();
        while id == 0 || self.sessions.contains_key(&id) {
            id = crate::random::u64();
        }
        self.sessions.insert(
            id,
            Session {
                owner,
                link: Some(link),
                next_event: 0,
                unacked: VecDeque::new(),
                unacked_bytes: 0,
                next_request: 0,
                gone_since: None,
                attached: BTreeSet::new(),
                restored: false,
                adopted: true,
                told_follows: false,
                unknown_ends: 0,
            },
        );
        Ok(Opened {
            session: id,
            resumed: false,
            restored: false,
            next_request: 0,
        })
    }

    /// A session's connection ended (`link` is the one that ended: a newer one that
    /// replaced it keeps the session). The grace starts now.
    pub(crate) fn disconnected(&mut self, now: Instant, session: u64, link: &Arc<Tx>) {
        if let Some(s) = self.sessions.get_mut(&session)
            && s.link.as_ref().is_none_or(|l| Arc::ptr_eq(l, link))
        {
            s.link = None;
            s.gone_since.get_or_insert(now);
        }
    }

    /// The submitter left on purpose, or its grace ran out: the session ends, and the
    /// attached jobs it submitted are returned, to be cancelled.
    pub(crate) fn close(&mut self, session: u64) -> Vec<JobId> {
        let Some(s) = self.sessions.remove(&session) else {
            return Vec::new();
        };
        self.requests.remove(&session);
        self.taken_upto.remove(&session);
        if let Some(l) = &s.link {
            l.close(std::net::Shutdown::Write);
        }
        // Nobody else writes the stdin of the jobs it submitted: it ends where it is
        // (for a detached job, which runs on; see `take_orphaned_stdin`).
        let orphaned = self
            .jobs
            .values()
            .filter(|r| r.submitter == session && !r.ended);
        self.orphaned_stdin
            .extend(orphaned.filter_map(|r| r.stdin.clone()));
        s.attached
            .into_iter()
            .filter(|j| self.jobs.get(j).is_some_and(|r| !r.ended))
            .collect()
    }

    /// Ends the sessions gone longer than the grace and forgets detached jobs kept long
    /// enough. Returns the jobs to cancel and when to look again.
    pub(crate) fn tick(&mut self, now: Instant) -> (Vec<JobId>, Option<Instant>) {
        let grace = self.settings.grace;
        let expired: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.gone_since.is_some_and(|t| now >= t + grace))
            .map(|(&id, _)| id)
            .collect();
        let mut cancel = Vec::new();
        for id in expired {
            let jobs = self.close(id);
            if !jobs.is_empty() {
                log::warn!(
                    "a submitter stayed away longer than its grace ({:.1} s): cancelling its {} attached job(s)",
                    grace.as_secs_f64(),
                    jobs.len()
                );
            }
            cancel.extend(jobs);
        }
        self.forget_ended(now);
        let next_session = self
            .sessions
            .values()
            .filter_map(|s| s.gone_since)
            .min()
            .map(|t| t + grace);
        let next_forget = self.ended.front().map(|(at, _)| *at);
        let next = match (next_session, next_forget) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        (cancel, next)
    }

    /// Forgets the ended detached jobs kept long enough, and the oldest beyond the count.
    fn forget_ended(&mut self, now: Instant) {
        while let Some(&(at, job)) = self.ended.front() {
            let old = now >= at;
            if !old && self.ended.len() <= self.settings.keep_ended {
                break;
            }
            self.ended.pop_front();
            self.jobs.remove(&job);
        }
    }

    /// The stdin of jobs whose submitter's session ended, to be ended (EOF) by the
    /// caller once the hub's lock is let go (a stdin's lock comes after the hub's only
    /// when the hub's is not held).
    pub(crate) fn take_orphaned_stdin(&mut self) -> Vec<Arc<StdinPort>> {
        std::mem::take(&mut self.orphaned_stdin)
    }

    /// Whether the timer's next deadline may have moved earlier since the last call
    /// (a first ended detached job to forget later): the caller wakes the timer.
    pub(crate) fn take_timer_news(&mut self) -> bool {
        std::mem::take(&mut self.timer_news)
    }

    /// Whether the numbered request is the next one of the session. A session that
    /// holds more than twice its window unacknowledged takes none: answers do not wait
    /// for the window, so a submitter that asks and never acknowledges would make the
    /// manager keep answers without bound.
    pub(crate) fn take_request(&mut self, session: u64, seq: u64) -> Take {
        let Some(s) = self.sessions.get_mut(&session) else {
            return Take::Again;
        };
        if s.unacked_bytes > 2 * self.settings.window {
            return Take::Unacknowledged(s.unacked_bytes);
        }
        match seq.cmp(&s.next_request) {
            std::cmp::Ordering::Less => Take::Again,
            std::cmp::Ordering::Equal => {
                s.next_request += 1;
                Take::New
            }
            // A restored session's submitter sends again the requests it has no
            // answer for, which need not follow each other.
            std::cmp::Ordering::Greater if s.restored => {
                s.next_request = seq + 1;
                Take::New
            }
            std::cmp::Ordering::Greater => Take::Gap {
                expected: s.next_request,
            },
        }
    }

    /// The submitter has every event before `next`.
    pub(crate) fn ack(&mut self, session: u64, next: u64) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.ack(next);
        }
    }

    /// Answers a request.
    pub(crate) fn reply(&mut self, session: u64, request: u64, reply: &Reply) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.emit(SessionEventRef::Reply { request, reply });
        }
    }

    /// A job the session submitted: it follows it from now on (its events come after
    /// this). Detached jobs keep their last output for a later `attach`.
    pub(crate) fn follow_new(&mut self, session: u64, job: JobId, detached: bool) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if !detached {
            s.attached.insert(job);
        }
        self.jobs.insert(
            job,
            Record {
                owner: s.owner.clone(),
                detached,
                watchers: vec![session],
                kept: detached.then(Kept::default),
                ended: false,
                stdin: None,
                submitter: session,
                attempt: 1,
            },
        );
    }

    /// A request of a restored session sent again, which the journal says submitted
    /// jobs before the restart: it is answered with them (true), and not carried out
    /// again. The session follows them: those still running already did since the
    /// restore; for one that has ended it is sent what the job kept (a detached job's
    /// last output and end), or an end saying its outcome is not known. A submit the
    /// journal no longer holds that the old manager took all the same (one before the
    /// last request the journal holds: its jobs ended and were compacted away) is
    /// answered with a failure (true): it is never submitted twice.
    pub(crate) fn answer_again(&mut self, session: u64, request: u64) -> bool {
        // An answered request's jobs are left empty (the journal holds none without).
        let ids = self
            .requests
            .get_mut(&session)
            .and_then(|r| r.get_mut(&request))
            .map(std::mem::take);
        let Some(ids) = ids else {
            if self
                .taken_upto
                .get(&session)
                .is_some_and(|&upto| request < upto)
                && let Some(s) = self.sessions.get_mut(&session)
            {
                let why = "the manager took this submission before it restarted, and its jobs \
                           ended and were compacted out of its journal since: it is not \
                           submitted again, and its jobs' ids are not known"
                    .to_owned();
                s.emit(SessionEventRef::Reply {
                    request,
                    reply: &Reply::Failed(RequestError::Journal(why)),
                });
                return true;
            }
            return false;
        };
        if ids.is_empty() {
            return true; // answered already: neither answered nor carried out again
        }
        let Some(s) = self.sessions.get_mut(&session) else {
            return false;
        };
        s.emit(SessionEventRef::Reply {
            request,
            reply: &Reply::Submitted(ids.clone()),
        });
        for job in ids {
            match self.jobs.get_mut(&job) {
                Some(r) if r.ended => {
                    for ev in r.kept.as_ref().map(Kept::replay).unwrap_or_default() {
                        s.emit(SessionEventRef::Job { job, event: &ev });
                    }
                }
                Some(r) => {
                    if !r.watchers.contains(&session) {
                        r.watchers.push(session);
                    }
                }
                None => s.emit(SessionEventRef::Job {
                    job,
                    event: &JobEvent::Finished(not_kept()),
                }),
            }
        }
        true
    }

    /// The jobs a restored session's submitter follows (`SubmitterMessage::Follow`):
    /// the session gets their events from now on; a job that has ended is sent its end
    /// (kept, or not known: only in a restored session, at most as many as it may be
    /// told of).
    pub(crate) fn follow_again(&mut self, session: u64, jobs: &[JobId]) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        for &job in jobs {
            match self.jobs.get_mut(&job) {
                Some(r) if r.owner != s.owner => {
                    log::warn!(
                        "a submitter asked to follow job {job}, which another certificate submitted (ignored)"
                    );
                }
                Some(r) if r.ended => {
                    let end = r.kept.as_ref().and_then(|k| k.events.back());
                    let end = match end {
                        Some(ev @ JobEvent::Finished(_)) => ev.clone(),
                        _ => JobEvent::Finished(not_kept()),
                    };
                    s.emit(SessionEventRef::Job { job, event: &end });
                }
                Some(r) => {
                    if !r.watchers.contains(&session) {
                        r.watchers.push(session);
                    }
                }
                None if s.unknown_ends > 0 => {
                    s.unknown_ends -= 1;
                    s.emit(SessionEventRef::Job {
                        job,
                        event: &JobEvent::Finished(not_kept()),
                    });
                }
                None => log::debug!(
                    "a submitter asked to follow job {job}, which this manager does not know (ignored)"
                ),
            }
        }
    }

    /// A restored session's submitter has sent something after its `Follow`s: later
    /// returns are ordinary resumes.
    pub(crate) fn follows_told(&mut self, session: u64) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.told_follows = true;
        }
    }

    /// An interactive job's stdin, for the session that submitted it to write.
    pub(crate) fn give_stdin(&mut self, job: JobId, stdin: Arc<StdinPort>) {
        if let Some(r) = self.jobs.get_mut(&job) {
            r.stdin = Some(stdin);
        }
    }

    /// The stdin of a job the session may write to: `Ok(None)` for a job that has ended
    /// or is not its certificate's (the bytes are dropped), `Err` when the session holds
    /// too much unacknowledged (each step of a stdin is an event: a submitter that
    /// writes and never acknowledges would make the manager keep events without bound).
    pub(crate) fn stdin_of(
        &self,
        session: u64,
        job: JobId,
    ) -> std::result::Result<Option<Arc<StdinPort>>, String> {
        let Some(s) = self.sessions.get(&session) else {
            return Ok(None);
        };
        if s.unacked_bytes > 2 * self.settings.window {
            return Err(format!(
                "it wrote a job's stdin with {} bytes of events unacknowledged",
                s.unacked_bytes
            ));
        }
        let Some(r) = self.jobs.get(&job) else {
            return Ok(None);
        };
        if r.owner != s.owner || r.submitter != session {
            // Offsets are the submitter's own: another writer's bytes would collide.
            log::warn!(
                "a submitter wrote to the stdin of job {job}, which another session submitted (dropped)"
            );
            return Ok(None);
        }
        Ok(r.stdin.clone())
    }

    /// How far a job's stdin has been taken, and whether it closed: every session that
    /// follows the job hears it (not held for the window: it is small, and it is what
    /// lets the submitter write more).
    pub(crate) fn stdin(&mut self, job: JobId, taken: u64, closed: bool) {
        let Some(r) = self.jobs.get(&job) else {
            return;
        };
        for w in &r.watchers {
            if let Some(s) = self.sessions.get_mut(w) {
                s.emit(SessionEventRef::Stdin { job, taken, closed });
            }
        }
    }

    /// The same, for one session that has just begun to follow the job.
    pub(crate) fn stdin_to(&mut self, session: u64, job: JobId, taken: u64, closed: bool) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.emit(SessionEventRef::Stdin { job, taken, closed });
        }
    }

    /// Whether `owner` may act on the job: `Err` says why not.
    pub(crate) fn check_owner(
        &self,
        owner: &Owner,
        job: JobId,
    ) -> std::result::Result<(), RequestError> {
        match self.jobs.get(&job) {
            None => Err(RequestError::NoSuchJob(job)),
            Some(r) if r.owner != *owner => Err(RequestError::NotYours(job)),
            Some(_) => Ok(()),
        }
    }

    /// Whether a job is one of `owner`'s (listings show other owners' scripts as empty).
    pub(crate) fn owns(&self, owner: &Owner, job: JobId) -> bool {
        self.jobs.get(&job).is_some_and(|r| r.owner == *owner)
    }

    /// The session follows a job of its certificate from now on: it is answered, then
    /// sent what the job kept (a detached job's last output, and its end if it has
    /// ended), then its events as they come.
    pub(crate) fn attach(&mut self, session: u64, request: u64, job: JobId) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let checked = match self.jobs.get_mut(&job) {
            None => Err(RequestError::NoSuchJob(job)),
            Some(r) if r.owner != s.owner => Err(RequestError::NotYours(job)),
            Some(r) => Ok(r),
        };
        match checked {
            Err(e) => s.emit(SessionEventRef::Reply {
                request,
                reply: &Reply::Failed(e),
            }),
            Ok(r) => {
                s.emit(SessionEventRef::Reply {
                    request,
                    reply: &Reply::Attached,
                });
                if let Some(k) = &r.kept {
                    let events = k.replay();
                    let last = events
                        .iter()
                        .rposition(|e| matches!(e, JobEvent::Output { .. }));
                    for (i, ev) in events.iter().enumerate() {
                        match (ev, k.last_out) {
                            (JobEvent::Output { stream, bytes }, Some((attempt, seq)))
                                if Some(i) == last =>
                            {
                                s.emit(SessionEventRef::Output {
                                    job,
                                    attempt,
                                    seq,
                                    stream: *stream,
                                    bytes,
                                })
                            }
                            _ => s.emit(SessionEventRef::Job { job, event: ev }),
                        }
                    }
                }
                if !r.ended && !r.watchers.contains(&session) {
                    r.watchers.push(session);
                }
            }
        }
    }

    /// A job event, from the job's sink (in the job's order).
    #[cfg(test)]
    pub(crate) fn push(&mut self, now: Instant, job: JobId, ev: JobEvent) -> Pushed {
        self.push_numbered(now, job, ev, None)
    }

    /// The same, with the worker's `seq` of an output message (sent on to the
    /// submitter, which drops output it already has).
    pub(crate) fn push_numbered(
        &mut self,
        now: Instant,
        job: JobId,
        ev: JobEvent,
        seq: Option<u64>,
    ) -> Pushed {
        let Some(r) = self.jobs.get_mut(&job) else {
            return Pushed::Gone(ev);
        };
        // Only output and warnings wait for room. A job's other events are few (queued,
        // started, requeued per retry, finished) and small, and each one held back
        // would cost the job a delivery thread while it waits: a session behind on one
        // job's output would otherwise take a thread per job it submits meanwhile.
        let window = match ev {
            JobEvent::Output { .. } | JobEvent::Warning(_) => self.settings.window,
            _ => usize::MAX,
        };
        let sessions = &mut self.sessions;
        let mut full = false;
        // A watcher that is away is waited for as well, detached job or not: it comes
        // back within the grace expecting every event, or its session ends and it goes.
        r.watchers.retain(|w| match sessions.get(w) {
            None => false,
            Some(s) => {
                full |= s.full(window);
                true
            }
        });
        if full {
            return Pushed::Full(ev);
        }
        if let JobEvent::Requeued { attempt } = ev {
            r.attempt = attempt;
        }
        let event = match (&ev, seq) {
            (JobEvent::Output { stream, bytes }, Some(seq)) => SessionEventRef::Output {
                job,
                attempt: r.attempt,
                seq,
                stream: *stream,
                bytes,
            },
            _ => SessionEventRef::Job { job, event: &ev },
        };
        for w in &r.watchers {
            if let Some(s) = sessions.get_mut(w) {
                s.emit(event);
            }
        }
        if let Some(k) = &mut r.kept {
            if let JobEvent::Output { .. } = ev {
                k.last_out = seq.map(|seq| (r.attempt, seq));
            }
            k.push(&ev, self.settings.kept_output);
        }
        if matches!(ev, JobEvent::Finished(_)) {
            r.ended = true;
            // Only the session that submitted an attached job lists it (if it is still
            // there: it may have left before the job ended).
            if let Some(s) = sessions.get_mut(&r.submitter) {
                s.attached.remove(&job);
            }
            if r.detached {
                r.watchers.clear();
                if let (Some(j), Some(k)) = (&self.journal, &r.kept) {
                    j.record(vec![journal::Record::Kept {
                        id: job,
                        output: k.output(),
                        dropped: k.dropped,
                    }]);
                }
                self.timer_news |= self.ended.is_empty();
                self.ended
                    .push_back((now + self.settings.keep_ended_for, job));
                // The count is kept at once; the time, by the timer.
                self.forget_ended(now);
            } else {
                self.jobs.remove(&job);
            }
        }
        Pushed::Taken
    }

    #[cfg(test)]
    fn unacked(&self, session: u64) -> usize {
        self.sessions[&session].unacked.len()
    }
}

/// The hub behind its lock, with what the threads around it wait on.
pub(crate) struct Submitters {
    hub: Mutex<Hub>,
    /// Notified when a session has more room (or went away): sinks waiting to push.
    room: Condvar,
    /// Notified when the next deadline may have changed: the timer thread.
    wake: Condvar,
    closing: std::sync::atomic::AtomicBool,
    /// The timing of submitter links: the manager's base timing, never stretched.
    pub(crate) pace: Arc<Pace>,
}

impl Submitters {
    pub(crate) fn new(settings: HubSettings, pace: Arc<Pace>) -> Arc<Submitters> {
        Arc::new(Submitters {
            hub: Mutex::new(Hub::new(settings)),
            room: Condvar::new(),
            wake: Condvar::new(),
            closing: Default::default(),
            pace,
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Hub> {
        lock(&self.hub)
    }

    /// Records each detached job's kept output in `journal` at its end.
    pub(crate) fn set_journal(&self, journal: Arc<dyn Journal>) {
        self.lock().set_journal(journal);
    }

    /// After a restart, before the manager's threads start: rebuilds the sessions and
    /// jobs of remote submitters that the journal holds (see [`Hub::restore`]; `open`
    /// may hold every open job, those of other submitters are skipped). Returns the
    /// stdin of each open interactive job, already given to its session: the job's
    /// sink is built with it (`JobSink::with_stdin(id, Dest::Remote(RemoteDest { .. }),
    /// counters, stdin)`). Such a stdin takes up where the first of the job's worker
    /// and its submitter to come back says it is.
    pub(crate) fn restore(
        self: &Arc<Self>,
        open: &[&OpenJob],
        ended: Vec<EndedJob>,
        remote_requests: &[(u64, u64, JobId)],
    ) -> HashMap<JobId, Arc<StdinPort>> {
        let mut hub = self.lock();
        hub.restore(
            Instant::now(),
            SystemTime::now(),
            open,
            ended,
            remote_requests,
        );
        let mut ports = HashMap::new();
        for job in open {
            if job.spec.interactive && hub.jobs.contains_key(&job.id) {
                let port = StdinPort::restored(job.id, job.spec.pty.is_some(), self.clone());
                hub.give_stdin(job.id, port.clone());
                ports.insert(job.id, port);
            }
        }
        drop(hub);
        self.wake.notify_all();
        ports
    }

    /// Ends sessions past their grace (cancelling their attached jobs through
    /// `cancel`) and forgets old detached jobs, until [`Submitters::stop`].
    pub(crate) fn run_timer(&self, cancel: &dyn Fn(JobId)) {
        let mut hub = self.lock();
        while !self.closing.load(Ordering::Acquire) {
            let (jobs, next) = hub.tick(Instant::now());
            // Sessions that ended no longer hold jobs back (a detached job's output
            // waited for them): let waiting sinks look again.
            self.room.notify_all();
            let orphaned = hub.take_orphaned_stdin();
            if !jobs.is_empty() || !orphaned.is_empty() {
                drop(hub);
                for stdin in orphaned {
                    let _ = stdin.finish();
                }
                self.room.notify_all();
                for job in jobs {
                    cancel(job);
                }
                hub = self.lock();
                continue;
            }
            hub = match next {
                Some(at) => sync::wait_timeout(
                    &self.wake,
                    hub,
                    at.saturating_duration_since(Instant::now()),
                ),
                None => sync::wait(&self.wake, hub),
            };
        }
    }

    /// Sends what each connected submitter has pending and closes its connection, within
    /// `deadline` (at shutdown, so that the last events get out before the sockets are cut).
    pub(crate) fn flush_all(&self, deadline: Instant) {
        let links: Vec<Arc<Tx>> = self
            .lock()
            .sessions
            .values()
            .filter_map(|s| s.link.clone())
            .collect();
        for l in &links {
            l.close(std::net::Shutdown::Write);
        }
        for l in &links {
            l.wait_sent(deadline);
        }
    }

    /// Stops the timer and lets every waiting sink go.
    pub(crate) fn stop(&self) {
        let _hub = self.lock();
        self.closing.store(true, Ordering::Release);
        self.wake.notify_all();
        self.room.notify_all();
    }
}

/// A remote job's destination (see `sink::Dest`): the hub, which hands the job's
/// events to the sessions that follow it.
pub(crate) struct RemoteDest {
    pub(crate) submitters: Arc<Submitters>,
    pub(crate) job: JobId,
}

impl RemoteDest {
    /// `seq`: the worker's number of an output message.
    pub(crate) fn try_send(
        &self,
        ev: JobEvent,
        seq: Option<u64>,
    ) -> std::result::Result<(), TrySendError<JobEvent>> {
        let mut hub = self.submitters.lock();
        match hub.push_numbered(Instant::now(), self.job, ev, seq) {
            Pushed::Taken => {
                if hub.take_timer_news() {
                    self.submitters.wake.notify_all();
                }
                Ok(())
            }
            Pushed::Full(ev) => Err(TrySendError::Full(ev)),
            Pushed::Gone(ev) => Err(TrySendError::Disconnected(ev)),
        }
    }

    /// Waits for room (the submitter's acknowledgement, its session's end, or the
    /// manager's shutdown, which drops the event).
    pub(crate) fn send(
        &self,
        ev: JobEvent,
        seq: Option<u64>,
    ) -> std::result::Result<(), SendError<JobEvent>> {
        let s = &self.submitters;
        let mut hub = s.lock();
        let mut ev = ev;
        loop {
            if s.closing.load(Ordering::Acquire) {
                return Err(SendError(ev));
            }
            match hub.push_numbered(Instant::now(), self.job, ev, seq) {
                Pushed::Taken => {
                    if hub.take_timer_news() {
                        s.wake.notify_all();
                    }
                    return Ok(());
                }
                Pushed::Gone(e) => return Err(SendError(e)),
                Pushed::Full(e) => ev = e,
            }
            // A bounded wait: a session's grace running out is noticed by the timer
            // thread, which notifies, but a missed wake-up must not hang a job.
            hub = sync::wait_timeout(&s.room, hub, Duration::from_secs(1));
        }
    }
}

/// What a submitter's link thread knows of its session.
struct Conn<'a> {
    shared: &'a Arc<Shared>,
    subs: &'a Arc<Submitters>,
    session: u64,
    owner: Owner,
    label: String,
    /// A restored session whose submitter has not sent anything after its `Follow`s
    /// yet on this link.
    following_told: std::cell::Cell<bool>,
}

/// A submitter's link, after its hello: the session (new or resumed), the welcome,
/// then the link until it closes, carrying out requests as they come.
pub(crate) fn serve(
    shared: &Arc<Shared>,
    mut est: Established,
    hello: SubmitterHello,
    peer: SocketAddr,
) {
    let subs = &shared.submitters;
    let name = protocol::peer_text(&hello.name.chars().take(64).collect::<String>());
    let label = format!("submitter {name} ({peer})");
    if shared.closing.load(Ordering::Acquire) {
        link::refuse(&est, "the manager is shutting down");
        return;
    }
    let owner: Owner = est.peer_cert.as_deref().map(Arc::from);
    let opened = subs.lock().open(
        owner.clone(),
        est.tx.clone(),
        hello.resume.as_ref(),
        shared.manager_id,
    );
    // A resume acknowledges what the submitter received: sinks waiting for room look again.
    subs.room.notify_all();
    let opened = match opened {
        Ok(o) => o,
        Err(why) => {
            log::warn!("refused submitter {name} at {peer}: {why}");
            link::refuse(&est, &why);
            return;
        }
    };
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let paced = subs.pace.now();
    let welcome = SubmitterWelcome {
        manager_id: shared.manager_id,
        session: opened.session,
        resumed: opened.resumed,
        restored: opened.restored,
        next_request: opened.next_request,
        heartbeat_interval_ms: ms(paced.timing.heartbeat_interval),
        heartbeat_timeout_ms: ms(paced.timing.heartbeat_timeout),
        reconnect_grace_ms: ms(paced.grace),
    };
    if opened.restored {
        log::info!(
            "{label} is back (session {:x}, restored from the journal)",
            opened.session
        );
    } else if opened.resumed {
        log::info!("{label} is back (session {:x})", opened.session);
    } else {
        log::info!("{label} connected (session {:x})", opened.session);
    }
    let conn = Conn {
        shared,
        subs,
        session: opened.session,
        owner,
        label,
        following_told: std::cell::Cell::new(!opened.restored),
    };
    let live = est.tx.live().clone();
    let started = link::welcome(&mut est, &welcome, paced.timing);
    let result = super::acceptor::guarded(started, || {
        let own = link::Outbox::<protocol::ToSubmitter>::new(est.tx.clone());
        let heartbeat = || {
            own.send(protocol::ToSubmitter::Heartbeat);
        };
        let mut deliver = |msg: SubmitterMessage| match conn.on_message(msg) {
            Ok(go_on) => go_on,
            Err(why) => {
                log::warn!("{}: {why}; closing the link", conn.label);
                live.close_because(why);
                false
            }
        };
        link::drive(
            &mut est.reader,
            &est.tx,
            link::Drive {
                paced,
                pace: &subs.pace,
                announce: &|_| {},
                beat: Beat::Answer,
                heartbeat: &heartbeat,
                deliver: &mut deliver,
            },
        )
    });

    let reason = super::acceptor::ended(&est, result);
    log::info!("{}: link ended: {reason}", conn.label);
    subs.lock()
        .disconnected(Instant::now(), conn.session, &est.tx);
    subs.wake.notify_all();
    subs.room.notify_all();
}

impl Conn<'_> {
    /// One message; `Ok(false)` ends the link (a goodbye), `Err` closes it.
    fn on_message(&self, msg: SubmitterMessage) -> std::result::Result<bool, String> {
        if !self.following_told.get() && !matches!(msg, SubmitterMessage::Follow { .. }) {
            // Every `Follow` it had came before this.
            self.following_told.set(true);
            self.subs.lock().follows_told(self.session);
        }
        match msg {
            // The hub's lock is let go before the job's stdin is taken (whose lock may
            // be held when the hub's is taken).
            SubmitterMessage::Stdin { job, offset, bytes } => {
                let stdin = self.subs.lock().stdin_of(self.session, job)?;
                if let Some(stdin) = stdin {
                    stdin
                        .offer(offset, &bytes)
                        .map_err(|e| format!("job {job}: {e}"))?;
                }
                Ok(true)
            }
            SubmitterMessage::StdinEof { job, offset } => {
                let stdin = self.subs.lock().stdin_of(self.session, job)?;
                if let Some(stdin) = stdin {
                    stdin
                        .finish_at(offset)
                        .map_err(|e| format!("job {job}: {e}"))?;
                }
                Ok(true)
            }
            SubmitterMessage::Resize { job, size } => {
                let stdin = self.subs.lock().stdin_of(self.session, job)?;
                if let Some(stdin) = stdin
                    && let Err(e) = stdin.resize(size)
                {
                    log::warn!("{}: {e} (ignored)", self.label);
                }
                Ok(true)
            }
            SubmitterMessage::Request { seq, request } => {
                match self.subs.lock().take_request(self.session, seq) {
                    Take::New => {}
                    Take::Again => return Ok(true),
                    Take::Gap { expected } => {
                        return Err(format!("request {seq} came when {expected} was expected"));
                    }
                    Take::Unacknowledged(bytes) => {
                        return Err(format!(
                            "it sent a request with {bytes} bytes of events unacknowledged"
                        ));
                    }
                }
                self.on_request(seq, request);
                Ok(true)
            }
            SubmitterMessage::Follow { jobs } => {
                if jobs.len() > protocol::MAX_FOLLOW {
                    return Err(format!(
                        "it named {} jobs to follow in one message (at most {} allowed)",
                        jobs.len(),
                        protocol::MAX_FOLLOW
                    ));
                }
                self.subs.lock().follow_again(self.session, &jobs);
                Ok(true)
            }
            SubmitterMessage::Ack { next } => {
                self.subs.lock().ack(self.session, next);
                self.subs.room.notify_all();
                Ok(true)
            }
            SubmitterMessage::Heartbeat => Ok(true),
            SubmitterMessage::Goodbye => {
                let (jobs, orphaned) = {
                    let mut hub = self.subs.lock();
                    (hub.close(self.session), hub.take_orphaned_stdin())
                };
                for stdin in orphaned {
                    let _ = stdin.finish();
                }
                self.subs.room.notify_all();
                if !jobs.is_empty() {
                    log::info!(
                        "{} left: cancelling its {} attached job(s)",
                        self.label,
                        jobs.len()
                    );
                }
                for job in jobs {
                    let _ = self.shared.events.send(Event::Cancel {
                        id: job,
                        reply: None,
                    });
                }
                Ok(false)
            }
        }
    }

    fn reply(&self, request: u64, reply: Reply) {
        self.subs.lock().reply(self.session, request, &reply);
    }

    fn on_request(&self, seq: u64, request: Request) {
        match request {
            Request::Submit { spec, detached } => self.submit(seq, spec, detached, None),
            Request::SubmitArray {
                spec,
                detached,
                first,
                last,
            } => self.submit(seq, spec, detached, Some((first, last))),
            Request::Attach { job } => {
                self.subs.lock().attach(self.session, seq, job);
                // An interactive job's stdin: how far it is, for the new follower to
                // write from (its later steps follow as they happen).
                let stdin = self.subs.lock().stdin_of(self.session, job);
                if let Ok(Some(stdin)) = stdin {
                    let (taken, closed) = stdin.progress();
                    self.subs.lock().stdin_to(self.session, job, taken, closed);
                }
            }
            Request::Cancel { job } => {
                let checked = self.subs.lock().check_owner(&self.owner, job);
                let reply = match checked {
                    Err(e) => Reply::Failed(e),
                    Ok(()) => match self.shared.cancel(job) {
                        Ok(()) => Reply::Done,
                        Err(Error::UnknownJob(_)) => Reply::Failed(RequestError::NoSuchJob(job)),
                        Err(_) => Reply::Failed(RequestError::ShutDown),
                    },
                };
                self.reply(seq, reply);
            }
            Request::Job { job } => {
                let mut found = self.shared.query_jobs(Some(job));
                self.redact(&mut found);
                self.reply(seq, Reply::Job(found.pop()));
            }
            Request::Jobs => {
                let mut all = self.shared.query_jobs(None);
                all.truncate(MAX_LISTED_JOBS);
                self.redact(&mut all);
                for j in &mut all {
                    cut_text(&mut j.script, MAX_LISTED_SCRIPT);
                }
                self.reply(seq, Reply::Jobs(all));
            }
            Request::Workers => {
                let workers = self.shared.query_workers();
                self.reply(seq, Reply::Workers(workers));
            }
            Request::Stats => {
                let reply = match super::query_stats(self.shared) {
                    Some(s) => Reply::Stats(Box::new(s)),
                    None => Reply::Failed(RequestError::ShutDown),
                };
                self.reply(seq, reply);
            }
        }
    }

    /// Hides the scripts of jobs that are not this certificate's.
    fn redact(&self, jobs: &mut [JobStatus]) {
        let hub = self.subs.lock();
        for j in jobs {
            if !hub.owns(&self.owner, j.id) {
                j.script.clear();
            }
        }
    }

    /// Queues one job, or one per index of an array (all or none), that the session
    /// follows; answers with their ids before any of their events.
    fn submit(&self, seq: u64, spec: JobSpec, detached: bool, array: Option<(u64, u64)>) {
        let detached = detached || spec.detached;
        // Sent again after a restart, and in the journal: answered with its jobs.
        if self.subs.lock().answer_again(self.session, seq) {
            return;
        }
        let count = match array {
            None => 1,
            Some((first, last)) if first <= last && last - first < MAX_ARRAY => {
                (last - first + 1) as usize
            }
            Some((first, last)) => {
                let why = format!(
                    "an array runs from its first index to its last, with at most {MAX_ARRAY} jobs (not {first}-{last})"
                );
                self.reply(seq, Reply::Failed(RequestError::InvalidJob(why)));
                return;
            }
        };
        let size = spec.wire_size();
        if array.is_some() && count.saturating_mul(size) > MAX_ARRAY_BYTES {
            let why = format!(
                "an array's jobs may hold at most {MAX_ARRAY_BYTES} bytes in all ({count} jobs of {size} bytes each were asked for)"
            );
            self.reply(seq, Reply::Failed(RequestError::InvalidJob(why)));
            return;
        }
        let s = self.shared;
        // Kept until the jobs are queued (see `Shared::submitting`).
        let _admitted = match s.admit(&spec, count) {
            Ok(admitted) => admitted,
            Err(e) => {
                let e = match e {
                    Error::QueueFull { capacity } => RequestError::QueueFull { capacity },
                    Error::InvalidJob(why) => RequestError::InvalidJob(why),
                    _ => RequestError::ShutDown,
                };
                self.reply(seq, Reply::Failed(e));
                return;
            }
        };
        let first = s.next_job.fetch_add(count as u64, Ordering::Relaxed);
        let ids: Vec<JobId> = (0..count as u64).map(|i| JobId(first + i)).collect();
        let specs: Vec<JobSpec> = (0..count)
            .map(|i| {
                let mut spec = spec.clone();
                if let Some((first_index, _)) = array {
                    spec.env.insert(
                        "WORKPOOL_ARRAY_INDEX".into(),
                        (first_index + i as u64).to_string(),
                    );
                }
                spec
            })
            .collect();
        // Durable before anything is said or queued: a job is accepted once the
        // journal keeps it.
        let accepted: Vec<(JobId, &JobSpec)> = ids.iter().copied().zip(&specs).collect();
        let submitter = crate::journal::Submitter::Remote {
            cert: self.owner.as_deref().map(<[u8]>::to_vec),
            session: self.session,
            request: seq,
            detached,
        };
        if let Err(e) = s.write_accepted(&accepted, &submitter) {
            s.queued.fetch_sub(count, Ordering::Relaxed);
            let why = match e {
                Error::Journal(why) => why,
                other => other.to_string(),
            };
            log::error!("{}: {count} job(s) not accepted: {why}", self.label);
            self.reply(seq, Reply::Failed(RequestError::Journal(why)));
            return;
        }
        let ports: Vec<Option<Arc<StdinPort>>> = ids
            .iter()
            .map(|&id| {
                spec.interactive
                    .then(|| StdinPort::new(id, spec.pty.is_some(), Some(self.subs.clone())))
            })
            .collect();
        {
            let mut hub = self.subs.lock();
            for (&id, port) in ids.iter().zip(&ports) {
                hub.follow_new(self.session, id, detached);
                if let Some(port) = port {
                    hub.give_stdin(id, port.clone());
                }
            }
            hub.reply(self.session, seq, &Reply::Submitted(ids.clone()));
        }
        for ((id, spec), port) in ids.into_iter().zip(specs).zip(ports) {
            let dest = RemoteDest {
                submitters: self.subs.clone(),
                job: id,
            };
            let sink = JobSink::with_stdin(id, Dest::Remote(dest), s.counters.clone(), port);
            if s.enqueue(id, spec, sink.clone()).is_err() {
                sink.push(JobEvent::Finished(crate::job::Outcome::Rejected(
                    "the manager shut down".into(),
                )));
            }
        }
    }
}

/// Cuts text to at most `max` bytes on a character boundary, noting the cut.
fn cut_text(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut at = max;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    text.truncate(at);
    text.push('…');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Outcome, Stream};
    use crate::link::{Liveness, Outbox};
    use crate::protocol::{SessionEvent, ToSubmitter};
    use crate::tls::Io;

    fn settings() -> HubSettings {
        HubSettings {
            grace: Duration::from_secs(10),
            window: 1000,
            kept_output: 100,
            keep_ended_for: Duration::from_secs(60),
            keep_ended: 2,
            max_sessions_per_owner: 3,
        }
    }

    /// A link without a socket: what is sent on it can be read back.
    fn link() -> (Arc<Tx>, Outbox<ToSubmitter>) {
        let tx = Tx::with_limit(
            Io::detached(),
            Liveness::new(),
            "test submitter".into(),
            false,
            64 << 20,
        );
        (tx.clone(), Outbox::new(tx))
    }

    fn owner(name: &str) -> Owner {
        Some(Arc::from(name.as_bytes()))
    }

    fn out(n: usize) -> JobEvent {
        JobEvent::Output {
            stream: Stream::Stdout,
            bytes: vec![b'x'; n],
        }
    }

    /// The events sent, as (seq, event).
    fn events(o: &Outbox<ToSubmitter>) -> Vec<(u64, SessionEvent)> {
        o.take_sent()
            .0
            .into_iter()
            .filter_map(|m| match m {
                ToSubmitter::Event { seq, event } => Some((seq, event)),
                ToSubmitter::Heartbeat => None,
            })
            .collect()
    }

    fn job_events(o: &Outbox<ToSubmitter>) -> Vec<JobEvent> {
        events(o)
            .into_iter()
            .filter_map(|(_, e)| match e {
                SessionEvent::Job { event, .. } => Some(event),
                SessionEvent::Output { stream, bytes, .. } => {
                    Some(JobEvent::Output { stream, bytes })
                }
                SessionEvent::Reply { .. } | SessionEvent::Stdin { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_borrowed_event_encodes_as_the_message_the_submitter_decodes() {
        let ev = out(3);
        let reply = Reply::Submitted(vec![JobId(4), JobId(5)]);
        for (borrowed, owned) in [
            (
                SessionEventRef::Job {
                    job: JobId(9),
                    event: &ev,
                },
                SessionEvent::Job {
                    job: JobId(9),
                    event: ev.clone(),
                },
            ),
            (
                SessionEventRef::Reply {
                    request: 7,
                    reply: &reply,
                },
                SessionEvent::Reply {
                    request: 7,
                    reply: reply.clone(),
                },
            ),
        ] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            protocol::encode_into(
                &mut a,
                &ToSubmitterRef::Event {
                    seq: 3,
                    event: borrowed,
                },
            )
            .unwrap();
            protocol::encode_into(
                &mut b,
                &ToSubmitter::Event {
                    seq: 3,
                    event: owned,
                },
            )
            .unwrap();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn events_are_numbered_and_a_full_window_holds_the_job_until_acknowledged() {
        let t0 = Instant::now();
        let mut hub = Hub::new(settings());
        let (tx, o) = link();
        let s = hub.open(owner("a"), tx, None, 1).unwrap();
        assert!(!s.resumed);
        let s = s.session;
        hub.follow_new(s, JobId(1), false);
        hub.reply(s, 0, &Reply::Submitted(vec![JobId(1)]));
        assert_eq!(hub.push(t0, JobId(1), JobEvent::Queued), Pushed::Taken);
        assert_eq!(hub.push(t0, JobId(1), out(1000)), Pushed::Taken);
        // Over the window of 1000 bytes now: the next event waits.
        assert!(matches!(hub.push(t0, JobId(1), out(1)), Pushed::Full(_)));
        let got = events(&o);
        assert_eq!(
            got.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(matches!(
            got[0].1,
            SessionEvent::Reply {
                request: 0,
                reply: Reply::Submitted(_)
            }
        ));
        hub.ack(s, 2);
        assert_eq!(hub.unacked(s), 1, "the output is not acknowledged yet");
        assert!(matches!(hub.push(t0, JobId(1), out(1)), Pushed::Full(_)));
        hub.ack(s, 3);
        assert_eq!(hub.push(t0, JobId(1), out(1)), Pushed::Taken);
        assert_eq!(
            hub.push(t0, JobId(1), JobEvent::Finished(Outcome::Exited(0))),
            Pushed::Taken
        );
        // An attached job is forgotten once it ended.
        assert!(matches!(hub.push(t0, JobId(1), out(1)), Pushed::Gone(_)));
        assert_eq!(events(&o).len(), 2);
    }

    #[test]
    fn a_full_window_holds_back_output_and_warnings_only() {
        let t0 = Instant::now();
        let mut hub = Hub::new(settings());
        let (tx, o) = link();
        let s = hub.open(owner("a"), tx, None, 1).unwrap().session;
        hub.follow_new(s, JobId(1), false);
        hub.follow_new(s, JobId(2), false);
        assert_eq!(hub.push(t0, JobId(1), out(1000)), Pushed::Taken);
        assert!(matches!(hub.push(t0, JobId(1), out(1)), Pushed::Full(_)));
        let warning = JobEvent::Warning("w".into());
        assert!(matches!(hub.push(t0, JobId(2), warning), Pushed::Full(_)));
        for ev in [
            JobEvent::Queued,
            JobEvent::Started { worker: "w".into() },
            JobEvent::Requeued { attempt: 2 },
            JobEvent::Finished(Outcome::Cancelled),
        ] {
            assert_eq!(hub.push(t0, JobId(2), ev), Pushed::Taken);
        }
        assert_eq!(job_events(&o).len(), 5);
    }

    #[test]
    fn a_detached_job_s_kept_output_costs_few_events_whatever_its_chunks() {
        let mut k = Kept::default();
        for _ in 0..100_000 {
            k.push(&out(1), 1 << 20);
        }
        k.push(&JobEvent::Finished(Outcome::Exited(0)), 1 << 20);
        assert_eq!(k.output, 100_000);
        assert!(k.events.len() <= 3, "{} events kept", k.events.len());
        // Over the limit, the oldest bytes go and are counted.
        let mut k = Kept::default();
        for i in 0..10_000u32 {
            k.push(&out(1 + (i % 3) as usize), 1000);
        }
        assert_eq!(k.output, 1000);
        assert_eq!(k.dropped, 20_000 - 1000 - 1);
        assert!(k.events.len() <= 2, "{} events kept", k.events.len());
    }

    #[test]
    fn a_resumed_session_gets_again_what_was_not_received_and_requests_are_taken_once() {
        let t0 = Instant::now();
        let mut hub = Hub::new(settings());
        let (tx, o) = link();
        let s = hub.open(owner("a"), tx.clone(), None, 1).unwrap().session;
        assert_eq!(hub.take_request(s, 0), Take::New);
        hub.follow_new(s, JobId(1), false);
        hub.reply(s, 0, &Reply::Submitted(vec![JobId(1)]));
        for n in 1..=4 {
            hub.push(t0, JobId(1), out(n));
        }
        assert_eq!(events(&o).len(), 5);
        hub.ack(s, 2);
        hub.disconnected(t0, s, &tx);
        // Sent while away: kept.
        hub.push(t0, JobId(1), out(5));
        // Back, having received up to seq 3 (the link died before 3 and 4 arrived).
        let (tx2, o2) = link();
        let resume = SessionResume {
            manager_id: 1,
            session: s,
            next_event: 3,
        };
        let back = hub.open(owner("a"), tx2, Some(&resume), 1).unwrap();
        assert_eq!(
            back,
            Opened {
                session: s,
                resumed: true,
                restored: false,
                next_request: 1
            }
        );
        let again = events(&o2);
        assert_eq!(
            again.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(job_events(&o2), vec![]);
        // The request sent again is not taken twice; one past the next is a gap.
        assert_eq!(hub.take_request(s, 0), Take::Again);
        assert_eq!(hub.take_request(s, 2), Take::Gap { expected: 1 });
        assert_eq!(hub.take_request(s, 1), Take::New);
        // A submitter that asks and never acknowledges is stopped at twice its window.
        let big = Reply::Failed(RequestError::InvalidJob("x".repeat(1500)));
        hub.reply(s, 1, &big);
        assert_eq!(hub.take_request(s, 2), Take::New);
        hub.reply(s, 2, &big);
        assert!(matches!(hub.take_request(s, 3), Take::Unacknowledged(_)));
        hub.ack(s, u64::MAX);
        assert_eq!(hub.take_request(s, 3), Take::New);
        // Another certificate, or another manager, cannot resume it: a new session.
        let (tx3, _) = link();
        let other = hub.open(owner("b"), tx3, Some(&resume), 1).unwrap();
        assert!(!other.resumed && other.session != s);
        let (tx4, _) = link();
        let stale = hub
            .open(
                owner("a"),
                tx4,
                Some(&SessionResume {
                    manager_id: 2,
                    ..resume
                }),
                1,
            )
            .unwrap();
        assert!(!stale.resumed);
    }

    #[test]
    fn a_certificate_holds_a_bounded_number_of_sessions_and_a_resume_is_not_a_new_one() {
        let mut hub = Hub::new(settings());
        let mut held = Vec::new();
        for _ in 0..3 {
            let (tx, _) = link();
            held.push((hub.open(owner("a"), tx.clone(), None, 1).unwrap(), tx));
        }
        let (tx, _) = link();
        let e = hub.open(owner("a"), tx, None, 1).unwrap_err();
        assert!(e.contains("max_sessions_per_certificate = 3"), "{e}");
        // Away but within its grace, a session still counts; it may come back.
        let (first, old) = &held[0];
        hub.disconnected(Instant::now(), first.session, old);
        let (tx, _) = link();
        let e = hub.open(owner("a"), tx, None, 1).unwrap_err();
        assert!(e.contains("holds 3 session(s)"), "{e}");
        let resume = SessionResume {
            manager_id: 1,
            session: first.session,
            next_event: 0,
        };
        let (tx, _) = link();
        assert!(hub.open(owner("a"), tx, Some(&resume), 1).unwrap().resumed);
        // Another certificate has its own count; without TLS there is none.
        let (tx, _) = link();
        assert!(hub.open(owner("b"), tx, None, 1).is_ok());
        for _ in 0..5 {
            let (tx, _) = link();
            assert!(hub.open(None, tx, None, 1).is_ok());
        }
        // A session that ended makes room.
        hub.close(held[1].0.session);
        let (tx, _) = link();
        assert!(hub.open(owner("a"), tx, None, 1).is_ok());
    }

    #[test]
    fn a_session_away_past_its_grace_ends_and_its_attached_jobs_are_cancelled() {
        let t0 = Instant::now();
        let mut hub = Hub::new(settings());
        let (tx, _o) = link();
        let s = hub.open(owner("a"), tx.clone(), None, 1).unwrap().session;
        hub.follow_new(s, JobId(1), false);
        hub.follow_new(s, JobId(2), true);
        hub.follow_new(s, JobId(3), false);
        hub.push(t0, JobId(3), JobEvent::Finished(Outcome::Exited(0)));
        assert_eq!(hub.tick(t0), (vec![], None));
        hub.disconnected(t0, s, &tx);
        let (cancel, next) = hub.tick(t0 + Duration::from_secs(9));
        assert!(cancel.is_empty());
        assert_eq!(next, Some(t0 + Duration::from_secs(10)));
        // The attached job still running is cancelled; the detached one and the one
        // that ended are not.
        let (cancel, _) = hub.tick(t0 + Duration::from_secs(10));
        assert_eq!(cancel, vec![JobId(1)]);
        // Its end still passes once, to nobody; the detached job runs on, kept.
        assert_eq!(
            hub.push(t0, JobId(1), JobEvent::Finished(Outcome::Cancelled)),
            Pushed::Taken
        );
        assert_eq!(hub.push(t0, JobId(2), out(10)), Pushed::Taken);
    }

    #[test]
    fn a_goodbye_cancels_the_attached_jobs_at_once_and_a_returning_connection_keeps_them() {
        let t0 = Instant::now();
        let mut hub = Hub::new(settings());
        let (tx, _o) = link();
        let s = hub.open(owner("a"), tx.clone(), None, 1).unwrap().session;
        hub.follow_new(s, JobId(1), false);
        hub.disconnected(t0, s, &tx);
        let (tx2, _o2) = link();
        let resume = SessionResume {
            manager_id: 1,
            session: s,
            next_event: 0,
        };
        assert!(hub.open(owner("a"), tx2, Some(&resume), 1).unwrap().resumed);
        assert_eq!(hub.tick(t0 + Duration::from_secs(60)).0, vec![]);
        assert_eq!(hub.close(s), vec![JobId(1)]);
        assert_eq!(hub.close(s), vec![], "once");
    }

    #[test]
    fn a_detached_job_keeps_its_last_output_for_its_certificate_and_is_forgotten_later() {
        let t0 = Instant::now();
        let mut hub = Hub::new(settings());
        let (tx, o) = link();
        let s = hub.open(owner("a"), tx.clone(), None, 1).unwrap().session;
        hub.follow_new(s, JobId(1), true);
        hub.push(t0, JobId(1), JobEvent::Queued);
        for _ in 0..3 {
            hub.push(t0, JobId(1), out(60));
        }
        let _ = events(&o);
        // The submitter leaves; the job does not wait for it.
        assert_eq!(hub.close(s), vec![]);
        for _ in 0..100 {
            assert_eq!(hub.push(t0, JobId(1), out(60)), Pushed::Taken);
        }
        hub.push(t0, JobId(1), JobEvent::Finished(Outcome::Exited(3)));
        // Someone else cannot attach; the same certificate can, from a new session.
        let (tx2, o2) = link();
        let other = hub.open(owner("b"), tx2, None, 1).unwrap().session;
        hub.attach(other, 0, JobId(1));
        assert!(matches!(
            &events(&o2)[..],
            [(
                0,
                SessionEvent::Reply {
                    reply: Reply::Failed(RequestError::NotYours(JobId(1))),
                    ..
                }
            )]
        ));
        let (tx3, o3) = link();
        let again = hub.open(owner("a"), tx3, None, 1).unwrap().session;
        hub.attach(again, 0, JobId(1));
        let got = job_events(&o3);
        assert_eq!(got[0], JobEvent::Queued);
        let JobEvent::Warning(w) = &got[1] else {
            panic!("{got:?}")
        };
        assert!(
            w.contains("6080 bytes of earlier output were not kept"),
            "{w}"
        );
        let kept: usize = got
            .iter()
            .map(|e| match e {
                JobEvent::Output { bytes, .. } => bytes.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(kept, 100, "the last 100 bytes");
        assert_eq!(got.last(), Some(&JobEvent::Finished(Outcome::Exited(3))));
        // Kept for a minute, and at most two ended jobs at once.
        assert_eq!(
            hub.tick(t0 + Duration::from_secs(59)).1,
            Some(t0 + Duration::from_secs(60))
        );
        let (tx4, o4) = link();
        let late = hub.open(owner("a"), tx4, None, 1).unwrap().session;
        hub.tick(t0 + Duration::from_secs(60));
        hub.attach(late, 0, JobId(1));
        assert!(matches!(
            &events(&o4)[..],
            [(
                0,
                SessionEvent::Reply {
                    reply: Reply::Failed(RequestError::NoSuchJob(_)),
                    ..
                }
            )]
        ));
        let _ = hub.take_timer_news();
        for j in 2..=4 {
            hub.follow_new(late, JobId(j), true);
            hub.push(t0, JobId(j), JobEvent::Finished(Outcome::Exited(0)));
        }
        // The first ended job tells the timer (it will have one to forget); the count
        // is kept at once, without it.
        assert!(hub.take_timer_news());
        assert!(!hub.take_timer_news(), "told once");
        assert_eq!(
            hub.check_owner(&owner("a"), JobId(2)),
            Err(RequestError::NoSuchJob(JobId(2)))
        );
        assert_eq!(hub.check_owner(&owner("a"), JobId(4)), Ok(()));
        assert_eq!(
            hub.check_owner(&owner("b"), JobId(4)),
            Err(RequestError::NotYours(JobId(4)))
        );
    }

    #[test]
    fn a_detached_job_waits_for_a_watcher_that_is_away_until_its_grace_ends() {
        let t0 = Instant::now();
        let mut hub = Hub::new(settings());
        let (tx, _o) = link();
        let s = hub.open(owner("a"), tx.clone(), None, 1).unwrap().session;
        hub.follow_new(s, JobId(1), true);
        hub.follow_new(s, JobId(2), false);
        hub.push(t0, JobId(1), out(1000));
        // Connected and full: both wait.
        assert!(matches!(hub.push(t0, JobId(1), out(1)), Pushed::Full(_)));
        assert!(matches!(hub.push(t0, JobId(2), out(1)), Pushed::Full(_)));
        hub.disconnected(t0, s, &tx);
        // Away: both wait for it to come back (it expects every event).
        assert!(matches!(hub.push(t0, JobId(1), out(1)), Pushed::Full(_)));
        assert!(matches!(hub.push(t0, JobId(2), out(1)), Pushed::Full(_)));
        // Its grace ends: the detached job goes on without it, the attached one is
        // cancelled.
        let (cancel, _) = hub.tick(t0 + Duration::from_secs(10));
        assert_eq!(cancel, vec![JobId(2)]);
        assert_eq!(hub.push(t0, JobId(1), out(1)), Pushed::Taken);
    }

    #[test]
    fn a_watcher_away_with_its_window_full_gets_every_event_of_a_detached_job_when_it_returns() {
        let t0 = Instant::now();
        let mut hub = Hub::new(settings());
        let (tx, o) = link();
        let s = hub.open(owner("a"), tx.clone(), None, 1).unwrap().session;
        hub.follow_new(s, JobId(1), true);
        assert_eq!(hub.push(t0, JobId(1), out(1000)), Pushed::Taken);
        let received = events(&o).len() as u64;
        // The connection drops with the window full; the job goes on meanwhile.
        hub.disconnected(t0, s, &tx);
        let mut waiting = vec![out(7), JobEvent::Finished(Outcome::Exited(0))];
        // The submitter comes back within the grace, having received everything.
        let (tx2, o2) = link();
        let pushed = hub.push(t0, JobId(1), waiting.remove(0));
        if let Pushed::Full(ev) = pushed {
            waiting.insert(0, ev);
        }
        let resume = SessionResume {
            manager_id: 1,
            session: s,
            next_event: received,
        };
        assert!(hub.open(owner("a"), tx2, Some(&resume), 1).unwrap().resumed);
        for ev in waiting {
            assert_eq!(hub.push(t0, JobId(1), ev), Pushed::Taken);
        }
        // Nothing lost: the rest of the job's output and exactly one end.
        assert_eq!(
            job_events(&o2),
            vec![out(7), JobEvent::Finished(Outcome::Exited(0))]
        );
    }

    // ---- after a restart: what the journal held ----

    fn remote(cert: &str, session: u64, request: u64, detached: bool) -> journal::Submitter {
        journal::Submitter::Remote {
            cert: Some(cert.as_bytes().to_vec()),
            session,
            request,
            detached,
        }
    }

    fn open_job(id: u64, submitter: journal::Submitter, attempt: u32) -> OpenJob {
        OpenJob {
            id: JobId(id),
            spec: JobSpec::new("true"),
            submitter,
            attempt,
            place: journal::Place::Queued,
        }
    }

    fn resume(session: u64, next_event: u64) -> SessionResume {
        SessionResume {
            manager_id: 1,
            session,
            next_event,
        }
    }

    #[test]
    fn a_restored_session_adopts_the_submitter_s_numbering_and_gets_what_happened_while_it_was_away()
     {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut hub = Hub::new(settings());
        let a = open_job(7, remote("a", 40, 3, false), 2);
        let b = open_job(8, remote("a", 40, 4, true), 1);
        let local = open_job(9, journal::Submitter::Local, 1);
        hub.restore(t0, wall, &[&a, &b, &local], vec![], &[]);
        // Its jobs are its certificate's, whoever comes first; a job submitted in the
        // manager's process is not the hub's.
        assert_eq!(hub.check_owner(&owner("a"), JobId(7)), Ok(()));
        assert_eq!(
            hub.check_owner(&owner("b"), JobId(8)),
            Err(RequestError::NotYours(JobId(8)))
        );
        assert_eq!(
            hub.check_owner(&owner("a"), JobId(9)),
            Err(RequestError::NoSuchJob(JobId(9)))
        );
        // While its submitter is away, the session keeps its jobs' events: output
        // numbered by the worker, at the attempt the journal had.
        let numbered = |seq| JobEvent::Output {
            stream: Stream::Stdout,
            bytes: vec![b'0' + seq as u8],
        };
        assert_eq!(
            hub.push_numbered(t0, JobId(7), numbered(4), Some(4)),
            Pushed::Taken
        );
        assert_eq!(
            hub.push(t0, JobId(8), JobEvent::Finished(Outcome::Exited(0))),
            Pushed::Taken
        );
        // Another certificate naming the session gets a new one.
        let (tx, _) = link();
        let other = hub.open(owner("b"), tx, Some(&resume(40, 0)), 1).unwrap();
        assert!(!other.resumed && other.session != 40);
        // The submitter comes back having received 12 events: the kept ones are 12, 13.
        let (tx, o) = link();
        let back = hub.open(owner("a"), tx.clone(), Some(&resume(40, 12)), 1);
        assert_eq!(
            back,
            Ok(Opened {
                session: 40,
                resumed: true,
                restored: true,
                next_request: 0
            })
        );
        assert_eq!(
            events(&o),
            vec![
                (
                    12,
                    SessionEvent::Output {
                        job: JobId(7),
                        attempt: 2,
                        seq: 4,
                        stream: Stream::Stdout,
                        bytes: b"4".to_vec()
                    }
                ),
                (
                    13,
                    SessionEvent::Job {
                        job: JobId(8),
                        event: JobEvent::Finished(Outcome::Exited(0))
                    }
                )
            ]
        );
        // Live events go on from there; a retry's output comes with its attempt.
        hub.push(t0, JobId(7), JobEvent::Requeued { attempt: 3 });
        hub.push_numbered(t0, JobId(7), numbered(0), Some(0));
        let got = events(&o);
        assert_eq!(got[0].0, 14);
        assert!(matches!(
            got[1],
            (
                15,
                SessionEvent::Output {
                    attempt: 3,
                    seq: 0,
                    ..
                }
            )
        ));
        // Until it has said which jobs it follows, a return is still `restored`; then
        // it is an ordinary resume, and its numbering is kept.
        hub.disconnected(t0, 40, &tx);
        let (tx, o) = link();
        let again = hub.open(owner("a"), tx.clone(), Some(&resume(40, 15)), 1);
        assert!(again.as_ref().is_ok_and(|o| o.restored), "{again:?}");
        assert_eq!(events(&o).iter().map(|e| e.0).collect::<Vec<_>>(), [15]);
        hub.follow_again(40, &[JobId(7)]);
        hub.disconnected(t0, 40, &tx);
        let (tx, _o) = link();
        let again = hub.open(owner("a"), tx.clone(), Some(&resume(40, 16)), 1);
        assert!(
            again.is_ok_and(|o| o.restored),
            "until it sends something else"
        );
        hub.follow_again(40, &[JobId(7)]);
        hub.follows_told(40);
        hub.disconnected(t0, 40, &tx);
        let (tx, o) = link();
        let last = hub.open(owner("a"), tx, Some(&resume(40, 16)), 1).unwrap();
        assert!(last.resumed && !last.restored);
        assert!(events(&o).is_empty());
    }

    #[test]
    fn a_restored_session_whose_submitter_does_not_come_back_cancels_its_attached_jobs_after_the_grace()
     {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut hub = Hub::new(settings());
        let jobs = [
            open_job(1, remote("a", 40, 0, false), 1),
            open_job(2, remote("a", 40, 1, true), 1),
            open_job(3, remote("a", 41, 0, false), 1),
        ];
        hub.restore(t0, wall, &jobs.iter().collect::<Vec<_>>(), vec![], &[]);
        // Away since the restore: not counted against its certificate meanwhile.
        for _ in 0..3 {
            let (tx, _) = link();
            assert!(hub.open(owner("a"), tx, None, 1).is_ok());
        }
        let (cancel, next) = hub.tick(t0 + Duration::from_secs(9));
        assert!(cancel.is_empty());
        assert_eq!(next, Some(t0 + Duration::from_secs(10)));
        // Session 41 comes back in time; 40 does not: its attached job is cancelled,
        // its detached one runs on.
        let (tx, _o) = link();
        assert!(
            hub.open(owner("a"), tx, Some(&resume(41, 0)), 1)
                .unwrap()
                .resumed
        );
        let (mut cancel, _) = hub.tick(t0 + Duration::from_secs(10));
        cancel.sort();
        assert_eq!(cancel, vec![JobId(1)]);
        assert_eq!(hub.push(t0, JobId(2), out(5)), Pushed::Taken);
        assert_eq!(hub.check_owner(&owner("a"), JobId(3)), Ok(()));
    }

    #[test]
    fn a_request_sent_again_to_a_restored_session_is_answered_from_the_journal_and_not_taken_twice()
    {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut hub = Hub::new(settings());
        // Request 2 submitted job 5 (running) and job 6 (an array; it ended, attached:
        // its end was not kept); request 4, detached job 8, ended and kept.
        let running = open_job(5, remote("a", 40, 2, false), 1);
        let ended = EndedJob {
            id: JobId(8),
            submitter: remote("a", 40, 4, true),
            outcome: Outcome::Exited(3),
            output: vec![(Stream::Stdout, b"kept".to_vec())],
            dropped: 0,
            ended_at: wall - Duration::from_secs(5),
        };
        let requests = [(40, 2, JobId(5)), (40, 2, JobId(6)), (40, 4, JobId(8))];
        hub.restore(t0, wall, &[&running], vec![ended], &requests);
        let (tx, o) = link();
        hub.open(owner("a"), tx, Some(&resume(40, 30)), 1).unwrap();
        hub.follow_again(40, &[]);
        // The submitter sends again what it has no answer for: 2, 4 and 5 (a new one).
        assert_eq!(hub.take_request(40, 2), Take::New);
        assert!(hub.answer_again(40, 2));
        assert_eq!(hub.take_request(40, 4), Take::New);
        assert!(hub.answer_again(40, 4));
        assert_eq!(hub.take_request(40, 5), Take::New);
        assert!(!hub.answer_again(40, 5), "not in the journal: carried out");
        // Once taken, a request is not taken again.
        assert_eq!(hub.take_request(40, 4), Take::Again);
        assert!(
            hub.answer_again(40, 2),
            "answered once: neither carried out nor answered again"
        );
        let got = events(&o);
        assert_eq!(
            got,
            vec![
                (
                    30,
                    SessionEvent::Reply {
                        request: 2,
                        reply: Reply::Submitted(vec![JobId(5), JobId(6)])
                    }
                ),
                (
                    31,
                    SessionEvent::Job {
                        job: JobId(6),
                        event: JobEvent::Finished(not_kept())
                    }
                ),
                (
                    32,
                    SessionEvent::Reply {
                        request: 4,
                        reply: Reply::Submitted(vec![JobId(8)])
                    }
                ),
                (
                    33,
                    SessionEvent::Job {
                        job: JobId(8),
                        event: out_bytes(b"kept")
                    }
                ),
                (
                    34,
                    SessionEvent::Job {
                        job: JobId(8),
                        event: JobEvent::Finished(Outcome::Exited(3))
                    }
                ),
            ]
        );
        // The running job was followed since the restore, and still is.
        hub.push(t0, JobId(5), JobEvent::Started { worker: "w".into() });
        assert_eq!(
            job_events(&o),
            vec![JobEvent::Started { worker: "w".into() }]
        );
        // An ordinary session takes requests in order only.
        let (tx, _o) = link();
        let plain = hub.open(owner("a"), tx, None, 1).unwrap().session;
        assert_eq!(hub.take_request(plain, 1), Take::Gap { expected: 0 });
        assert!(!hub.answer_again(plain, 0));
    }

    fn out_bytes(b: &[u8]) -> JobEvent {
        JobEvent::Output {
            stream: Stream::Stdout,
            bytes: b.to_vec(),
        }
    }

    #[test]
    fn follows_named_after_a_restart_get_their_jobs_events_or_their_ends() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut hub = Hub::new(settings());
        // Job 5 was attached to by session 40 (the journal does not know that), job 6
        // is another certificate's, job 8 ended detached, job 9 is not known.
        let running = open_job(5, remote("a", 39, 0, true), 1);
        let theirs = open_job(6, remote("b", 50, 0, true), 1);
        let mine = open_job(7, remote("a", 40, 0, false), 1);
        let ended = EndedJob {
            id: JobId(8),
            submitter: remote("a", 39, 1, true),
            outcome: Outcome::Cancelled,
            output: vec![],
            dropped: 0,
            ended_at: wall,
        };
        hub.restore(t0, wall, &[&running, &theirs, &mine], vec![ended], &[]);
        let (tx, o) = link();
        hub.open(owner("a"), tx, Some(&resume(40, 0)), 1).unwrap();
        hub.follow_again(40, &[JobId(5), JobId(6), JobId(8), JobId(9)]);
        assert_eq!(
            job_events(&o),
            vec![
                JobEvent::Finished(Outcome::Cancelled),
                JobEvent::Finished(not_kept())
            ]
        );
        for j in [5, 6, 7] {
            hub.push(t0, JobId(j), JobEvent::Started { worker: "w".into() });
        }
        let got: Vec<JobId> = events(&o)
            .into_iter()
            .filter_map(|(_, e)| match e {
                SessionEvent::Job { job, .. } => Some(job),
                _ => None,
            })
            .collect();
        assert_eq!(got, vec![JobId(5), JobId(7)], "not another's job");
        // Ends of jobs it does not know: at most as many as the journal says the
        // session submitted, and some more; none in an ordinary session.
        let mut hub = Hub::new(settings());
        let mine = open_job(1, remote("a", 40, 0, false), 1);
        hub.restore(
            t0,
            wall,
            &[&mine],
            vec![],
            &[(40, 0, JobId(1)), (40, 1, JobId(2))],
        );
        let (tx, o) = link();
        hub.open(owner("a"), tx, Some(&resume(40, 0)), 1).unwrap();
        let many: Vec<JobId> = (1000..1000 + UNKNOWN_ENDS_SLACK as u64 + 5)
            .map(JobId)
            .collect();
        hub.follow_again(40, &many);
        hub.follow_again(40, &many);
        assert_eq!(job_events(&o).len(), UNKNOWN_ENDS_SLACK + 2);
        let (tx, o) = link();
        let plain = hub.open(owner("a"), tx, None, 1).unwrap().session;
        hub.follow_again(plain, &many);
        assert!(events(&o).is_empty());
    }

    #[test]
    fn an_ended_detached_job_is_attachable_after_a_restart_until_its_retention_from_its_end() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut hub = Hub::new(settings()); // kept 60 s, at most 2, 100 bytes of output
        let ended = |id: u64, ago: u64, output: Vec<(Stream, Vec<u8>)>, dropped| EndedJob {
            id: JobId(id),
            submitter: remote("a", 40, id, true),
            outcome: Outcome::Exited(id as i32),
            output,
            dropped,
            ended_at: wall - Duration::from_secs(ago),
        };
        hub.restore(
            t0,
            wall,
            &[],
            vec![
                ended(1, 60, vec![], 0),
                ended(
                    2,
                    50,
                    vec![
                        (Stream::Stdout, b"out".to_vec()),
                        (Stream::Stderr, b"err".to_vec()),
                    ],
                    1000,
                ),
                ended(3, 0, vec![], 0),
            ],
            &[],
        );
        // Job 1 was kept its 60 s already; job 2 ended 50 s ago: 10 s left.
        assert_eq!(
            hub.check_owner(&owner("a"), JobId(1)),
            Err(RequestError::NoSuchJob(JobId(1)))
        );
        let (tx, o) = link();
        let s = hub.open(owner("a"), tx, None, 1).unwrap().session;
        hub.attach(s, 0, JobId(2));
        let got = job_events(&o);
        assert!(
            matches!(&got[0], JobEvent::Warning(w) if w.contains("1000 bytes of earlier output were not kept")),
            "{got:?}"
        );
        assert_eq!(
            got[1..],
            [
                out_bytes(b"out"),
                JobEvent::Output {
                    stream: Stream::Stderr,
                    bytes: b"err".to_vec()
                },
                JobEvent::Finished(Outcome::Exited(2))
            ]
        );
        assert_eq!(hub.tick(t0).1, Some(t0 + Duration::from_secs(10)));
        hub.tick(t0 + Duration::from_secs(10));
        assert_eq!(
            hub.check_owner(&owner("a"), JobId(2)),
            Err(RequestError::NoSuchJob(JobId(2)))
        );
        assert_eq!(hub.check_owner(&owner("a"), JobId(3)), Ok(()));
        // The count holds across the restart: two more ended jobs forget job 3.
        for j in [10, 11] {
            hub.follow_new(s, JobId(j), true);
            hub.push(t0, JobId(j), JobEvent::Finished(Outcome::Exited(0)));
        }
        assert_eq!(
            hub.check_owner(&owner("a"), JobId(3)),
            Err(RequestError::NoSuchJob(JobId(3)))
        );
    }

    #[test]
    fn a_detached_job_s_kept_output_goes_to_the_journal_at_its_end_and_comes_back_after_a_restart()
    {
        let retention = journal::Retention {
            keep_ended_for: Duration::from_secs(60),
            keep_ended: 2,
        };
        let j = Arc::new(journal::MemoryJournal::new(retention));
        let t0 = Instant::now();
        let mut hub = Hub::new(settings());
        hub.set_journal(j.clone());
        let (tx, _o) = link();
        let s = hub.open(owner("a"), tx, None, 1).unwrap().session;
        // What the manager writes around the hub: the job accepted, then its end.
        let spec = JobSpec::new("seq 100");
        j.write(vec![journal::Record::Accepted {
            id: JobId(1),
            spec,
            submitter: remote("a", s, 0, true),
        }])
        .unwrap();
        hub.follow_new(s, JobId(1), true);
        for _ in 0..3 {
            hub.push_numbered(t0, JobId(1), out(60), Some(0));
        }
        j.record(vec![journal::Record::Ended {
            id: JobId(1),
            outcome: Outcome::Exited(4),
        }]);
        hub.push(t0, JobId(1), JobEvent::Finished(Outcome::Exited(4)));
        // A new manager finds it: kept output (the last 100 bytes) and end.
        let recovered = j.recovered();
        assert_eq!(recovered.ended_detached.len(), 1);
        assert_eq!(recovered.ended_detached[0].dropped, 80);
        assert_eq!(recovered.remote_requests, vec![(s, 0, JobId(1))]);
        let mut hub = Hub::new(settings());
        hub.restore(
            t0,
            SystemTime::now(),
            &[],
            recovered.ended_detached,
            &recovered.remote_requests,
        );
        let (tx, o) = link();
        let again = hub.open(owner("a"), tx, None, 1).unwrap().session;
        hub.attach(again, 0, JobId(1));
        let got = job_events(&o);
        let kept: usize = got
            .iter()
            .map(|e| match e {
                JobEvent::Output { bytes, .. } => bytes.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(kept, 100);
        assert!(matches!(&got[0], JobEvent::Warning(w) if w.contains("80 bytes")));
        assert_eq!(got.last(), Some(&JobEvent::Finished(Outcome::Exited(4))));
    }

    #[test]
    fn output_held_back_for_a_full_window_keeps_its_worker_s_numbers() {
        let pace = Arc::new(Pace::new(
            crate::link::Timing {
                heartbeat_interval: Duration::from_secs(1),
                heartbeat_timeout: Duration::from_secs(5),
            },
            Duration::from_secs(10),
            0,
        ));
        let subs = Submitters::new(settings(), pace); // a window of 1000 bytes
        let (tx, o) = link();
        let s = subs.lock().open(owner("a"), tx, None, 1).unwrap().session;
        subs.lock().follow_new(s, JobId(1), false);
        let dest = Dest::Remote(RemoteDest {
            submitters: subs.clone(),
            job: JobId(1),
        });
        let sink = JobSink::with_stdin(JobId(1), dest, Arc::default(), None);
        // The second fills the window: the rest wait in the sink's backlog.
        for seq in 0..5 {
            sink.push_output(seq, Stream::Stdout, vec![b'x'; 600]);
        }
        sink.push(JobEvent::Finished(Outcome::Exited(0)));
        let mut got: Vec<SessionEvent> = events(&o).into_iter().map(|(_, e)| e).collect();
        assert_eq!(got.len(), 2, "held back until acknowledged: {got:?}");
        subs.lock().ack(s, 2);
        subs.room.notify_all();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(
            got.last(),
            Some(SessionEvent::Job {
                event: JobEvent::Finished(_),
                ..
            })
        ) {
            assert!(Instant::now() < deadline, "only {got:?} came");
            let new = events(&o);
            if let Some(&(last, _)) = new.last() {
                subs.lock().ack(s, last + 1);
                subs.room.notify_all();
            }
            got.extend(new.into_iter().map(|(_, e)| e));
            std::thread::yield_now();
        }
        let numbers: Vec<u64> = got
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Output {
                    attempt: 1, seq, ..
                } => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(numbers, vec![0, 1, 2, 3, 4]);
        assert_eq!(got.len(), 6, "{got:?}");
    }

    #[test]
    fn an_attach_replays_the_last_kept_output_with_its_worker_s_number() {
        let t0 = Instant::now();
        let mut hub = Hub::new(settings());
        let (tx, _o) = link();
        let s = hub.open(owner("a"), tx, None, 1).unwrap().session;
        hub.follow_new(s, JobId(1), true);
        hub.push(t0, JobId(1), JobEvent::Started { worker: "w".into() });
        for seq in 0..3 {
            hub.push_numbered(t0, JobId(1), out(10), Some(seq));
        }
        let (tx, o) = link();
        let other = hub.open(owner("a"), tx, None, 1).unwrap().session;
        hub.attach(other, 0, JobId(1));
        let got: Vec<SessionEvent> = events(&o).into_iter().map(|(_, e)| e).collect();
        // The three messages were kept as one chunk: it goes as the last of them, so
        // that the worker's sending them again after a restart is dropped by the client.
        assert!(
            matches!(
                got.last(),
                Some(SessionEvent::Output {
                    attempt: 1,
                    seq: 2,
                    bytes,
                    ..
                }) if bytes.len() == 30
            ),
            "{got:?}"
        );
    }

    #[test]
    fn a_submit_sent_again_that_was_taken_before_the_restart_is_not_taken_twice() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut hub = Hub::new(settings());
        // Request 4 of session 40 submitted job 9, still running. Request 2 submitted
        // a job that ended and was compacted away: its answer never reached the
        // submitter, which sends request 2 again.
        let running = open_job(9, remote("a", 40, 4, false), 1);
        hub.restore(t0, wall, &[&running], vec![], &[(40, 4, JobId(9))]);
        let (tx, o) = link();
        hub.open(owner("a"), tx, Some(&resume(40, 0)), 1).unwrap();
        hub.follow_again(40, &[]);
        assert_eq!(hub.take_request(40, 2), Take::New);
        assert!(
            hub.answer_again(40, 2),
            "taken before the restart (requests are taken in order): not carried out again"
        );
        let got = events(&o);
        assert!(
            matches!(
                &got[..],
                [(
                    _,
                    SessionEvent::Reply {
                        request: 2,
                        reply: Reply::Failed(RequestError::Journal(_))
                    }
                )]
            ),
            "{got:?}"
        );
        // A request the old manager never took is carried out.
        assert_eq!(hub.take_request(40, 5), Take::New);
        assert!(!hub.answer_again(40, 5));
    }

    #[test]
    fn a_resume_naming_an_event_out_of_range_is_refused() {
        let t0 = Instant::now();
        let mut hub = Hub::new(settings());
        let job = open_job(1, remote("a", 40, 0, false), 1);
        hub.restore(t0, SystemTime::now(), &[&job], vec![], &[]);
        let (tx, _) = link();
        let e = hub
            .open(owner("a"), tx, Some(&resume(40, u64::MAX - 1)), 1)
            .unwrap_err();
        assert!(e.contains("out of range"), "{e}");
    }
}

/// A submitter spoken to message by message over a real socket: the manager side as a
/// whole (hello, session, requests, job events, resume).
#[cfg(test)]
mod wire_tests {
    use crate::job::{JobEvent, JobSpec, Outcome, Stream};
    use crate::link::{self, Established};
    use crate::protocol::{
        self, Reply, Request, Role, SessionEvent, SessionResume, SubmitterHello, SubmitterMessage,
        SubmitterWelcome, ToSubmitter,
    };
    use crate::{Manager, ManagerConfig, Worker, WorkerConfig};
    use std::time::{Duration, Instant};

    fn connect(m: &Manager, resume: Option<SessionResume>) -> (Established, SubmitterWelcome) {
        let hello = SubmitterHello {
            name: "wire test".into(),
            resume,
        };
        link::connect(
            &m.local_addr().to_string(),
            "localhost",
            None,
            Role::Submitter,
            &hello,
            Instant::now() + Duration::from_secs(10),
        )
        .unwrap()
    }

    fn send(est: &Established, msg: &SubmitterMessage) {
        link::Outbox::new(est.tx.clone()).send(msg.clone());
    }

    /// The next event (heartbeats skipped), within a deadline.
    fn next(est: &mut Established) -> (u64, SessionEvent) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(body) = est.reader.frame().unwrap() {
                match protocol::decode::<ToSubmitter>(body).unwrap() {
                    ToSubmitter::Event { seq, event } => return (seq, event),
                    ToSubmitter::Heartbeat => continue,
                }
            }
            assert!(Instant::now() < deadline, "no event in time");
            match est.reader.fill(&est.tx).unwrap() {
                link::Fill::End => panic!("the manager closed the link"),
                link::Fill::Got { .. } => {}
                link::Fill::Nothing => {
                    use std::os::fd::AsRawFd;
                    let fd = est.reader.socket().as_raw_fd();
                    crate::net::wait_ready(fd, libc::POLLIN, Some(deadline)).unwrap();
                }
            }
        }
    }

    #[test]
    fn a_raw_submitter_gets_its_answer_then_its_job_s_events_and_resumes_after_a_cut() {
        let m = Manager::bind(ManagerConfig::insecure_plaintext("127.0.0.1:0")).unwrap();
        let w = Worker::start(WorkerConfig::insecure_plaintext(
            "127.0.0.1",
            m.local_addr().port(),
        ))
        .unwrap();
        let (mut est, welcome) = connect(&m, None);
        assert!(!welcome.resumed);
        assert_eq!(welcome.next_request, 0);
        let spec = JobSpec::new("echo one; sleep 60; echo two");
        send(
            &est,
            &SubmitterMessage::Request {
                seq: 0,
                request: Request::Submit {
                    spec,
                    detached: false,
                },
            },
        );
        let (seq, ev) = next(&mut est);
        assert_eq!(seq, 0);
        let SessionEvent::Reply {
            request: 0,
            reply: Reply::Submitted(ids),
        } = ev
        else {
            panic!("{ev:?}")
        };
        let job = ids[0];
        let mut seen = vec![];
        let one = SessionEvent::Output {
            job,
            attempt: 1,
            seq: 0,
            stream: Stream::Stdout,
            bytes: b"one\n".to_vec(),
        };
        while !seen.contains(&one) {
            let (s, ev) = next(&mut est);
            assert_eq!(s, seen.len() as u64 + 1);
            match &ev {
                SessionEvent::Job { job: j, .. } | SessionEvent::Output { job: j, .. } => {
                    assert_eq!(*j, job)
                }
                other => panic!("{other:?}"),
            }
            seen.push(ev);
        }
        let received = seen.len() as u64 + 1;
        // The connection is cut; the session comes back with what it received.
        est.tx.cut();
        drop(est);
        let (mut est, welcome2) = connect(
            &m,
            Some(SessionResume {
                manager_id: welcome.manager_id,
                session: welcome.session,
                next_event: received,
            }),
        );
        assert!(welcome2.resumed);
        assert_eq!(welcome2.session, welcome.session);
        assert_eq!(welcome2.next_request, 1);
        // The submit sent again is not taken twice; the job is still there.
        send(
            &est,
            &SubmitterMessage::Request {
                seq: 0,
                request: Request::Submit {
                    spec: JobSpec::new("true"),
                    detached: false,
                },
            },
        );
        send(
            &est,
            &SubmitterMessage::Request {
                seq: 1,
                request: Request::Cancel { job },
            },
        );
        // The cancel's answer and the job's end race (the worker may report the end
        // before the link thread answers): read until both came.
        let done = SessionEvent::Reply {
            request: 1,
            reply: Reply::Done,
        };
        let finished = SessionEvent::Job {
            job,
            event: JobEvent::Finished(Outcome::Cancelled),
        };
        let mut rest = vec![];
        while !(rest.contains(&done) && rest.contains(&finished)) {
            let (s, ev) = next(&mut est);
            assert_eq!(s, received + rest.len() as u64);
            rest.push(ev);
        }
        let ends = rest
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    SessionEvent::Job {
                        event: JobEvent::Finished(_),
                        ..
                    }
                )
            })
            .count();
        assert_eq!(ends, 1, "{rest:?}");
        assert_eq!(m.jobs(), vec![], "no second job was queued");
        w.stop();
        m.shutdown();
    }

    #[test]
    fn a_submitter_comes_back_into_a_restored_session_and_its_numbering_its_requests_and_its_jobs_go_on()
     {
        use crate::job::JobId;
        use crate::journal::{EndedJob, Submitter};
        use std::time::SystemTime;
        let m = Manager::bind(ManagerConfig::insecure_plaintext("127.0.0.1:0")).unwrap();
        let w = Worker::start(WorkerConfig::insecure_plaintext(
            "127.0.0.1",
            m.local_addr().port(),
        ))
        .unwrap();
        // What a journal held: session 40 submitted detached job 1008 (request 2),
        // which ended, and attached job 1006 (request 3), whose end was not kept.
        let kept = EndedJob {
            id: JobId(1008),
            submitter: Submitter::Remote {
                cert: None,
                session: 40,
                request: 2,
                detached: true,
            },
            outcome: Outcome::Exited(3),
            output: vec![(Stream::Stdout, b"kept\n".to_vec())],
            dropped: 0,
            ended_at: SystemTime::now(),
        };
        let requests = [(40, 2, JobId(1008)), (40, 3, JobId(1006))];
        let ports = m.shared.submitters.restore(&[], vec![kept], &requests);
        assert!(ports.is_empty());
        // The submitter comes back having received 17 events.
        let resume = SessionResume {
            manager_id: m.shared.manager_id,
            session: 40,
            next_event: 17,
        };
        let (mut est, welcome) = connect(&m, Some(resume.clone()));
        assert!(welcome.resumed && welcome.restored, "{welcome:?}");
        assert_eq!(welcome.session, 40);
        send(&est, &SubmitterMessage::Follow { jobs: vec![] });
        // It sends again requests 3 and 2 (in order: 2, then 3), then a new one, 5.
        for (seq, script) in [(2, "true"), (3, "true"), (5, "echo hi")] {
            send(
                &est,
                &SubmitterMessage::Request {
                    seq,
                    request: Request::Submit {
                        spec: JobSpec::new(script),
                        detached: false,
                    },
                },
            );
        }
        let mut got = Vec::new();
        let finished = |e: &(u64, SessionEvent)| {
            matches!(
                e,
                (
                    _,
                    SessionEvent::Job {
                        event: JobEvent::Finished(_),
                        ..
                    }
                )
            )
        };
        while got.iter().filter(|e| finished(e)).count() < 3 {
            got.push(next(&mut est));
        }
        let seqs: Vec<u64> = got.iter().map(|e| e.0).collect();
        assert_eq!(seqs, (17..17 + got.len() as u64).collect::<Vec<_>>());
        let not_kept = || {
            JobEvent::Finished(Outcome::Rejected(
                "the job ended before the manager restarted, and its end was not kept: its outcome is not known"
                    .into(),
            ))
        };
        let job = |j: u64, event: JobEvent| SessionEvent::Job {
            job: JobId(j),
            event,
        };
        assert_eq!(
            got[..6].iter().map(|e| e.1.clone()).collect::<Vec<_>>(),
            vec![
                SessionEvent::Reply {
                    request: 2,
                    reply: Reply::Submitted(vec![JobId(1008)])
                },
                job(
                    1008,
                    JobEvent::Output {
                        stream: Stream::Stdout,
                        bytes: b"kept\n".to_vec()
                    }
                ),
                job(1008, JobEvent::Finished(Outcome::Exited(3))),
                SessionEvent::Reply {
                    request: 3,
                    reply: Reply::Submitted(vec![JobId(1006)])
                },
                job(1006, not_kept()),
                SessionEvent::Reply {
                    request: 5,
                    reply: Reply::Submitted(vec![JobId(1)])
                },
            ]
        );
        // The new one ran, its output numbered by its worker.
        let rest: Vec<SessionEvent> = got[6..].iter().map(|e| e.1.clone()).collect();
        assert!(
            rest.contains(&SessionEvent::Output {
                job: JobId(1),
                attempt: 1,
                seq: 0,
                stream: Stream::Stdout,
                bytes: b"hi\n".to_vec()
            }),
            "{rest:?}"
        );
        assert_eq!(
            rest.last(),
            Some(&job(1, JobEvent::Finished(Outcome::Exited(0))))
        );
        // The detached job ended before the restart is attachable; the job the
        // journal answered for was not queued again.
        send(
            &est,
            &SubmitterMessage::Request {
                seq: 6,
                request: Request::Attach { job: JobId(1008) },
            },
        );
        let (_, attached) = next(&mut est);
        assert_eq!(
            attached,
            SessionEvent::Reply {
                request: 6,
                reply: Reply::Attached
            }
        );
        assert_eq!(m.jobs(), vec![]);
        // After a cut, it is an ordinary resume: the manager took up to request 6.
        let received = 17 + got.len() as u64 + 1;
        est.tx.cut();
        drop(est);
        let (_est, again) = connect(
            &m,
            Some(SessionResume {
                next_event: received,
                ..resume
            }),
        );
        assert!(again.resumed && !again.restored, "{again:?}");
        assert_eq!(again.next_request, 7);
        w.stop();
        m.shutdown();
    }

    #[test]
    fn a_follow_naming_too_many_jobs_closes_the_link() {
        use crate::job::JobId;
        let m = Manager::bind(ManagerConfig::insecure_plaintext("127.0.0.1:0")).unwrap();
        let (mut est, _) = connect(&m, None);
        let jobs = (0..=protocol::MAX_FOLLOW as u64).map(JobId).collect();
        send(&est, &SubmitterMessage::Follow { jobs });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            while let Some(body) = est.reader.frame().unwrap() {
                let msg = protocol::decode::<ToSubmitter>(body).unwrap();
                assert_eq!(msg, ToSubmitter::Heartbeat, "nothing but heartbeats");
            }
            assert!(Instant::now() < deadline, "the link is still open");
            match est.reader.fill(&est.tx) {
                Ok(link::Fill::End) | Err(_) => break,
                Ok(link::Fill::Got { .. }) => {}
                Ok(link::Fill::Nothing) => {
                    use std::os::fd::AsRawFd;
                    let fd = est.reader.socket().as_raw_fd();
                    crate::net::wait_ready(fd, libc::POLLIN, Some(deadline)).unwrap();
                }
            }
        }
        // One of at most the allowed length is taken.
        let (est, _) = connect(&m, None);
        let jobs = (0..protocol::MAX_FOLLOW as u64).map(JobId).collect();
        send(&est, &SubmitterMessage::Follow { jobs });
        send(
            &est,
            &SubmitterMessage::Request {
                seq: 0,
                request: Request::Stats,
            },
        );
        let mut est = est;
        let (_, answer) = next(&mut est);
        assert!(
            matches!(
                answer,
                SessionEvent::Reply {
                    request: 0,
                    reply: Reply::Stats(_)
                }
            ),
            "{answer:?}"
        );
        m.shutdown();
    }
}
