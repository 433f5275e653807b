//! The wire protocol: message types and the frame codec over any `Read`/`Write`.
//! No sockets and no threads here (see `docs/PROTOCOL.md`).
//!
//! A frame is a 4-byte big-endian length followed by that many body bytes. The first
//! frame each way is a hello whose body starts with [`MAGIC`] and the 4-byte big-endian
//! [`PROTOCOL_VERSION`], so that peers of any version can read each other's version
//! and refuse with a readable reason. Every later body is one bincode-encoded message;
//! bincode is called from [`encode_into`] and [`decode`] only.

use crate::error::{Error, Result};
use crate::job::{JobEvent, JobId, JobSpec, JobStatus, Outcome, PtySize, Stream};
use crate::manager::WorkerInfo;
use crate::metrics::Stats;
use bincode::Options;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io::{self, BufReader, Read};

/// The first four bytes of every hello.
pub const MAGIC: [u8; 4] = *b"WPL\x01";
/// The protocol version this build speaks. Peers of another version are refused.
pub const PROTOCOL_VERSION: u32 = 5;
/// The default largest frame body accepted, checked before any allocation.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;
/// The largest chunk of job output put into one message: with its framing and TLS
/// record overhead it stays under loopback's 65,483-byte segment (see docs/PERFORMANCE.md).
pub const OUTPUT_CHUNK: usize = 60_000;

/// The most bytes of an interactive job's stdin that may be on the way to it, sent and
/// not yet taken (written to its pipe or terminal): the sender waits for `StdinTaken`
/// beyond it, so a job that does not read its stdin holds its writer, and nothing on
/// the way grows without bound.
pub const STDIN_WINDOW: u64 = 256 << 10;

/// The most bytes of a peer's free text (a decline reason, a cleanup error, a spawn
/// error) that are logged or passed on to a submitter; the rest is cut.
pub const MAX_PEER_TEXT: usize = 4096;
/// The most bytes of a worker's name, of each of its tags and of its platform.
pub const MAX_NAME: usize = 256;
/// The most tags a worker may announce.
pub const MAX_TAGS: usize = 128;

/// A peer's free text made safe to log and to pass on: control characters (and the
/// invisible characters that reorder or hide text) are escaped, so that a line stays
/// one line and no terminal sequence gets through, and it is cut to at most
/// [`MAX_PEER_TEXT`] bytes, followed by a note of how much was left out.
pub(crate) fn peer_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_PEER_TEXT) + 40);
    for (i, c) in text.char_indices() {
        let start = out.len();
        if c.is_control() {
            out.extend(c.escape_default());
        } else if hides_text(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
        if out.len() > MAX_PEER_TEXT {
            out.truncate(start);
            out.push_str(&format!(" [{} more bytes cut]", text.len() - i));
            break;
        }
    }
    out
}

/// Format characters that change how text around them reads (bidirectional overrides,
/// zero-width characters, the byte-order mark).
fn hides_text(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// Whether a name, a tag or a platform is acceptable: 1 to [`MAX_NAME`] bytes of text
/// without control or invisible characters (it is shown in logs and events as it is).
pub(crate) fn check_label(what: &str, label: &str) -> std::result::Result<(), String> {
    if label.is_empty() || label.len() > MAX_NAME {
        return Err(format!("{what} must have 1 to {MAX_NAME} bytes"));
    }
    if label.chars().any(|c| c.is_control() || hides_text(c)) {
        return Err(format!(
            "{what} {} contains control or invisible characters",
            peer_text(&label.chars().take(64).collect::<String>())
        ));
    }
    Ok(())
}

/// Checks what a worker says about itself (name, tags, platform); `Err` says what is
/// wrong, in words safe to log.
pub(crate) fn check_identity(
    name: &str,
    tags: &BTreeSet<String>,
    platform: &str,
) -> std::result::Result<(), String> {
    check_label("a worker name", name)?;
    if tags.len() > MAX_TAGS {
        return Err(format!(
            "a worker may have at most {MAX_TAGS} tags, not {}",
            tags.len()
        ));
    }
    for tag in tags {
        check_label("a tag", tag)?;
    }
    if !platform.is_empty() {
        check_label("a platform", platform)?;
    }
    Ok(())
}

/// What a worker says about itself when it connects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHello {
    /// The worker's name (unique among connected workers).
    pub name: String,
    /// Its tags.
    pub tags: BTreeSet<String>,
    /// Its platform, for example `linux-x86_64`.
    pub platform: String,
    /// How many jobs it runs at once.
    pub slots: u32,
    /// How many runs it holds beyond its slots, to start each the moment a slot frees
    /// (its look-ahead; 0: none, every `Run` goes into a free slot).
    pub ahead: u32,
    /// The manager instance its held jobs belong to (after a reconnect).
    pub manager_id: Option<u64>,
    /// Jobs it still holds for that manager: running, or ended and not yet acknowledged.
    pub jobs: Vec<HeldJob>,
    /// Whether it is draining (takes no new jobs).
    pub draining: bool,
}

/// A job a reconnecting worker still holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldJob {
    /// The job.
    pub job: JobId,
    /// Whether it has ended (its `Finished` may not have arrived).
    pub finished: bool,
    /// A run sent ahead that has not started: the manager takes it back.
    pub ahead: bool,
    /// An interactive job's stdin bytes taken so far (the manager sends again from here).
    pub stdin_taken: u64,
}

/// The manager's answer to an accepted hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// A random id of this manager instance: job ids are only unique within one.
    pub manager_id: u64,
    /// The id the manager gave this connection.
    pub worker_id: u64,
    /// How often each side sends a heartbeat when it has nothing else to send.
    pub heartbeat_interval_ms: u64,
    /// After how long without any frame a side declares the link dead.
    pub heartbeat_timeout_ms: u64,
    /// How long the manager waits for a lost worker to come back before its jobs end.
    pub reconnect_grace_ms: u64,
    /// Held jobs the manager still waits for, with the output `seq` it expects next.
    /// Every other held job is to be dropped (killed if it still runs).
    pub resume: Vec<(JobId, u64)>,
}

/// Worker → manager, after the hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerMessage {
    /// Bytes a job wrote; `seq` counts the job's output messages from 0.
    Output {
        /// The job.
        job: JobId,
        /// Which stream.
        stream: Stream,
        /// Per-job message counter.
        seq: u64,
        /// The bytes.
        #[serde(with = "byte_buf")]
        bytes: Vec<u8>,
    },
    /// A job ended. Sent after all of its output.
    Finished {
        /// The job.
        job: JobId,
        /// How it ended.
        outcome: Outcome,
        /// Set when the job's temp folder could not be deleted.
        cleanup_error: Option<String>,
    },
    /// Nothing to say; the link is alive.
    Heartbeat,
    /// The worker takes no new jobs; it leaves when its running jobs have ended.
    Draining,
    /// The worker did not take this job (it is draining, or has no free slot): not an
    /// ending; the manager queues the job again.
    Declined {
        /// The job.
        job: JobId,
        /// Why, in words.
        reason: String,
    },
    /// The worker is leaving on purpose: its jobs will not come back.
    Goodbye,
    /// A job's folder could not be deleted. Sent once the cleanup, which follows the
    /// job's exit, has failed: before the job's `Finished` if that has not gone yet,
    /// else after it.
    CleanupFailed {
        /// The job.
        job: JobId,
        /// What went wrong, in words.
        error: String,
    },
    /// A run sent ahead (`Run { ahead: true }`) has started. Sent before the `Finished`
    /// of the job whose slot it took.
    Started {
        /// The job.
        job: JobId,
    },
    /// An interactive job has been given every stdin byte before `upto` (written to its
    /// pipe or terminal): the manager may send up to [`STDIN_WINDOW`] bytes beyond it.
    StdinTaken {
        /// The job.
        job: JobId,
        /// Stdin bytes taken, from the start.
        upto: u64,
    },
    /// An interactive job's stdin is closed (the job closed it, or ended): the bytes
    /// from `upto` on were not taken, and no more will be.
    StdinClosed {
        /// The job.
        job: JobId,
        /// Stdin bytes taken, from the start.
        upto: u64,
    },
}

/// Manager → worker, after the welcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManagerMessage {
    /// Run this job.
    Run {
        /// Its id.
        job: JobId,
        /// What to run.
        spec: JobSpec,
        /// Sent ahead, beyond the worker's free slots: the worker holds it until a slot
        /// frees (or starts it at once if one has), and says `Started` when it starts.
        ahead: bool,
    },
    /// Stop this job (it ends `Cancelled`).
    Cancel {
        /// The job.
        job: JobId,
    },
    /// Stop reading this job's output for now: its submitter is behind.
    Pause {
        /// The job.
        job: JobId,
    },
    /// Go on reading this job's output.
    Resume {
        /// The job.
        job: JobId,
    },
    /// The job's `Finished` arrived: the worker may forget it.
    Ended {
        /// The job.
        job: JobId,
    },
    /// Nothing to say; the link is alive.
    Heartbeat,
    /// The manager is going away on purpose.
    Shutdown,
    /// Give back a run sent ahead that has not started: the worker answers
    /// `Declined { reason: "revoked" }`, or nothing if it has started it (its `Started`
    /// is on the way).
    Revoke {
        /// The job.
        job: JobId,
    },
    /// Bytes of an interactive job's stdin, from byte `offset` of its stream (bytes the
    /// worker has already taken are skipped: after a reconnect the manager sends again
    /// from what the worker said it had).
    StdinData {
        /// The job.
        job: JobId,
        /// Where these bytes start in the job's stdin.
        offset: u64,
        /// The bytes.
        #[serde(with = "byte_buf")]
        bytes: Vec<u8>,
    },
    /// An interactive job's stdin ends at byte `offset` (after every byte before it).
    StdinEof {
        /// The job.
        job: JobId,
        /// Its length.
        offset: u64,
    },
    /// A terminal job's terminal has a new size.
    Resize {
        /// The job.
        job: JobId,
        /// The size.
        size: PtySize,
    },
    /// From now on, the link's timing is this (the manager stretches it when many
    /// workers are connected: see `ManagerConfig::max_heartbeats_per_second`). The
    /// fields mean what they mean in the welcome; the grace less the timeout and the
    /// interval stays the same, so when the worker gives up held jobs does not change.
    Timing {
        /// How often the worker sends a heartbeat when it has nothing else to send.
        heartbeat_interval_ms: u64,
        /// After how long without any frame a side declares the link dead.
        heartbeat_timeout_ms: u64,
        /// How long the manager waits for this worker to come back if the link is lost.
        reconnect_grace_ms: u64,
    },
}

/// What a connection is, said by the first byte after the hello's version: a worker
/// takes jobs, a submitter sends them. The manager trusts each through its own
/// certificates (see docs/SECURITY.md) and refuses a certificate used for the other role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Takes jobs (its hello is a [`WorkerHello`]).
    Worker,
    /// Submits jobs and follows them (its hello is a [`SubmitterHello`]).
    Submitter,
}

impl Role {
    /// The role's byte in the hello.
    pub fn byte(self) -> u8 {
        match self {
            Role::Worker => 0,
            Role::Submitter => 1,
        }
    }

    /// The role a hello's byte names.
    pub fn from_byte(b: u8) -> Option<Role> {
        match b {
            0 => Some(Role::Worker),
            1 => Some(Role::Submitter),
            _ => None,
        }
    }

    /// The role's name, as logs and refusals say it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Submitter => "submitter",
        }
    }
}

/// What a submitter says when it connects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitterHello {
    /// A name for logs (for example `host:pid`); not an identity (the certificate is).
    pub name: String,
    /// After a reconnect: the session to go on with.
    pub resume: Option<SessionResume>,
}

/// A submitter's way back into its session after its connection was lost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionResume {
    /// The manager instance the session belongs to.
    pub manager_id: u64,
    /// The session's id, from the first welcome.
    pub session: u64,
    /// The `seq` of the first [`SessionEvent`] the submitter has not received: the
    /// manager sends again from there.
    pub next_event: u64,
}

/// The manager's answer to a submitter's accepted hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitterWelcome {
    /// A random id of this manager instance.
    pub manager_id: u64,
    /// The session's id (a new one unless the hello's was resumed).
    pub session: u64,
    /// Whether the hello's session was resumed. When it was not (the grace ran out, or
    /// the manager restarted without a journal), its attached jobs were cancelled and its
    /// unanswered requests were never taken.
    pub resumed: bool,
    /// With `resumed`: the session was rebuilt from the manager's journal after a
    /// restart. Its jobs are there, but not what the manager had sent or taken: its
    /// events go on from the hello's `next_event`, and the submitter sends
    /// [`SubmitterMessage::Follow`], then every request it has no answer for (a submit
    /// the journal holds is answered with its jobs, not submitted again).
    pub restored: bool,
    /// The `seq` of the first request the manager has not taken: the submitter sends
    /// again from there (0 in a new session; 0 and not to be relied on when `restored`).
    pub next_request: u64,
    /// How often each side sends a heartbeat when it has nothing else to send.
    pub heartbeat_interval_ms: u64,
    /// After how long without any frame a side declares the link dead.
    pub heartbeat_timeout_ms: u64,
    /// How long the manager keeps the session (and its attached jobs) for a lost
    /// submitter to come back.
    pub reconnect_grace_ms: u64,
}

/// Submitter → manager, after the hello.
///
/// Requests are numbered per session from 0 (`seq`) and taken in order, each exactly
/// once: after a reconnect the submitter sends again those from the welcome's
/// `next_request`. The manager's answers and the events of the jobs the session
/// follows come back as [`SessionEvent`]s, numbered per session from 0, which the
/// submitter acknowledges; the manager keeps what is not acknowledged to send again
/// after a reconnect, and sends no more while that is over its window (so a submitter
/// that reads slowly pauses its jobs' output, as a local reader does).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubmitterMessage {
    /// A request.
    Request {
        /// Per-session request counter.
        seq: u64,
        /// What is asked.
        request: Request,
    },
    /// Every event before `next` has been taken: the manager may forget them.
    Ack {
        /// The `seq` of the first event not yet taken.
        next: u64,
    },
    /// Nothing to say; the link is alive.
    Heartbeat,
    /// The submitter is leaving on purpose: its attached jobs are cancelled now.
    Goodbye,
    /// Bytes of an interactive job's stdin, from byte `offset` (as `ManagerMessage::
    /// StdinData`; bytes the manager has taken are skipped, so a resend after a reconnect
    /// is harmless). At most [`STDIN_WINDOW`] beyond what the manager last said it took.
    Stdin {
        /// The job.
        job: JobId,
        /// Where these bytes start in the job's stdin.
        offset: u64,
        /// The bytes.
        #[serde(with = "byte_buf")]
        bytes: Vec<u8>,
    },
    /// An interactive job's stdin ends at byte `offset`.
    StdinEof {
        /// The job.
        job: JobId,
        /// Its length.
        offset: u64,
    },
    /// A terminal job's terminal has a new size.
    Resize {
        /// The job.
        job: JobId,
        /// The size.
        size: PtySize,
    },
    /// After a welcome that says `restored`, before anything else: the jobs the
    /// submitter follows and has not seen end (a restarted manager does not know who
    /// followed what). Their events go to the session from now on; a job the manager
    /// no longer knows (it ended, and its end was not kept) is ended for the session
    /// with `Rejected`. Sent in pieces of at most [`MAX_FOLLOW`] jobs.
    Follow {
        /// The jobs.
        jobs: Vec<JobId>,
    },
}

/// The most jobs one [`SubmitterMessage::Follow`] names.
pub const MAX_FOLLOW: usize = 100_000;

/// What a submitter asks of the manager.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Queue a job; the session follows its events unless it is detached.
    Submit {
        /// The job.
        spec: JobSpec,
        /// Whether it runs on if the submitter goes away (see [`JobSpec::detached`]).
        detached: bool,
    },
    /// Queue one job per index in `first..=last`, all with `spec`, each with
    /// `WORKPOOL_ARRAY_INDEX` set to its index. All are taken or none.
    SubmitArray {
        /// The spec the jobs share.
        spec: JobSpec,
        /// Whether they run on if the submitter goes away.
        detached: bool,
        /// The first index.
        first: u64,
        /// The last index.
        last: u64,
    },
    /// Follow a job of this certificate: its kept output, then everything that follows.
    Attach {
        /// The job.
        job: JobId,
    },
    /// Cancel a job of this certificate.
    Cancel {
        /// The job.
        job: JobId,
    },
    /// Where a job is.
    Job {
        /// The job.
        job: JobId,
    },
    /// Every job that has not ended.
    Jobs,
    /// The connected workers.
    Workers,
    /// The manager's numbers.
    Stats,
}

/// Manager → submitter, after the welcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToSubmitter {
    /// The next event of the session.
    Event {
        /// Per-session event counter, from 0.
        seq: u64,
        /// The event.
        event: SessionEvent,
    },
    /// Nothing to say; the link is alive.
    Heartbeat,
}

/// One event of a submitter's session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SessionEvent {
    /// The answer to a request.
    Reply {
        /// The request's `seq`.
        request: u64,
        /// The answer.
        reply: Reply,
    },
    /// How far an interactive job's stdin has been taken (see
    /// `WorkerMessage::StdinTaken`), and whether it is closed: the submitter may write up
    /// to [`STDIN_WINDOW`] bytes beyond `taken`.
    Stdin {
        /// The job.
        job: JobId,
        /// Stdin bytes taken, from the start.
        taken: u64,
        /// Whether the job's stdin is closed (no more is taken).
        closed: bool,
    },
    /// An event of a job the session follows (in the job's order; a job's events
    /// follow the reply that made the session follow it).
    Job {
        /// The job.
        job: JobId,
        /// The event.
        event: JobEvent,
    },
    /// Output of a job the session follows, as its worker numbered it: after a
    /// restart of the manager the worker sends again from the oldest output it kept, so
    /// the submitter drops what it has (an `attempt` below the one it has, or a `seq`
    /// below the next it expects for that attempt). Output kept for an `Attach` comes
    /// as [`SessionEvent::Job`], but for its last chunk, which comes as this, numbered
    /// as the last message it holds.
    Output {
        /// The job.
        job: JobId,
        /// The job's attempt that wrote it (1, then 2 after a first retry, ...).
        attempt: u32,
        /// The output message's number in that attempt's run, from 0.
        seq: u64,
        /// Which stream.
        stream: Stream,
        /// The bytes.
        #[serde(with = "byte_buf")]
        bytes: Vec<u8>,
    },
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// The job or jobs submitted, in index order.
    Submitted(Vec<JobId>),
    /// Attached: the job's kept events follow (its output as kept, a warning of what
    /// was dropped, and its end if it has ended), then its live ones.
    Attached,
    /// Done (a cancel).
    Done,
    /// The answer to `Job`.
    Job(Option<JobStatus>),
    /// The answer to `Jobs`.
    Jobs(Vec<JobStatus>),
    /// The answer to `Workers`.
    Workers(Vec<WorkerInfo>),
    /// The answer to `Stats`.
    Stats(Box<Stats>),
    /// The request failed.
    Failed(RequestError),
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestError {
    /// The queue is full.
    QueueFull {
        /// Its capacity.
        capacity: usize,
    },
    /// The job is not valid (the reason in words).
    InvalidJob(String),
    /// No such job (or it ended and is no longer kept).
    NoSuchJob(JobId),
    /// The job belongs to another certificate.
    NotYours(JobId),
    /// The manager is shutting down.
    ShutDown,
    /// The manager could not make the job durable in its journal (a full disk, an I/O
    /// error): it was not accepted.
    Journal(String),
}

impl Heartbeat for SubmitterMessage {
    fn heartbeat() -> Self {
        SubmitterMessage::Heartbeat
    }
    fn is_heartbeat(&self) -> bool {
        matches!(self, SubmitterMessage::Heartbeat)
    }
}

impl Heartbeat for ToSubmitter {
    fn heartbeat() -> Self {
        ToSubmitter::Heartbeat
    }
    fn is_heartbeat(&self) -> bool {
        matches!(self, ToSubmitter::Heartbeat)
    }
}

/// A message type that has a heartbeat, so a link can keep itself alive generically.
pub(crate) trait Heartbeat {
    /// The heartbeat message.
    fn heartbeat() -> Self;
    /// Whether this is one.
    fn is_heartbeat(&self) -> bool;
}

impl Heartbeat for WorkerMessage {
    fn heartbeat() -> Self {
        WorkerMessage::Heartbeat
    }
    fn is_heartbeat(&self) -> bool {
        matches!(self, WorkerMessage::Heartbeat)
    }
}

impl Heartbeat for ManagerMessage {
    fn heartbeat() -> Self {
        ManagerMessage::Heartbeat
    }
    fn is_heartbeat(&self) -> bool {
        matches!(self, ManagerMessage::Heartbeat)
    }
}

/// `Vec<u8>` as one run of bytes rather than a sequence of `u8`s: the same bytes on the
/// wire under bincode, but copied in one go instead of element by element, and checked
/// against the size limit before anything is allocated.
pub(crate) mod byte_buf {
    use serde::{Deserializer, Serializer, de};
    use std::fmt;

    pub(crate) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(Bytes)
    }

    struct Bytes;

    impl<'de> de::Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
    }
}

fn options(limit: usize) -> impl Options {
    bincode::DefaultOptions::new().with_limit(limit as u64)
}

/// Appends one frame (length + bincode body) holding `msg` to `out`.
pub fn encode_into<T: Serialize>(out: &mut Vec<u8>, msg: &T) -> Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    if let Err(e) = options(DEFAULT_MAX_FRAME).serialize_into(&mut *out, msg) {
        out.truncate(start);
        return Err(Error::Protocol(format!("cannot encode message: {e}")));
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Appends the start of a frame holding `WorkerMessage::Output { job, stream, seq,
/// bytes }` with `len` bytes: everything but the bytes themselves, which the caller sends
/// right after (from wherever they are, without copying them here). Header and bytes
/// together are exactly the frame [`encode_into`] makes of that message.
pub fn encode_output_head_into(
    out: &mut Vec<u8>,
    job: JobId,
    stream: Stream,
    seq: u64,
    len: usize,
) -> Result<()> {
    /// `WorkerMessage::Output` as bincode lays it out, up to the bytes: the same variant
    /// index (0), the same fields, and the byte run's length prefix as a `u64`.
    #[derive(Serialize)]
    enum Head {
        Output {
            job: JobId,
            stream: Stream,
            seq: u64,
            len: u64,
        },
    }
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let head = Head::Output {
        job,
        stream,
        seq,
        len: len as u64,
    };
    if let Err(e) = options(DEFAULT_MAX_FRAME).serialize_into(&mut *out, &head) {
        out.truncate(start);
        return Err(Error::Protocol(format!("cannot encode message: {e}")));
    }
    let body = out.len() - start - 4 + len;
    if body > DEFAULT_MAX_FRAME {
        out.truncate(start);
        return Err(Error::Protocol(format!(
            "an output message of {len} bytes is too large"
        )));
    }
    out[start..start + 4].copy_from_slice(&(body as u32).to_be_bytes());
    Ok(())
}

/// Decodes one frame body; trailing bytes and nested lengths past the frame are errors.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    options(body.len())
        .deserialize(body)
        .map_err(|e| Error::Protocol(format!("undecodable message: {e}")))
}

/// Appends a hello frame: magic, version, then `rest`.
pub fn hello_frame_into(out: &mut Vec<u8>, rest: &[u8]) {
    let len = (MAGIC.len() + 4 + rest.len()) as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    out.extend_from_slice(rest);
}

/// Appends a worker's or a submitter's hello frame: magic, version, the role's byte,
/// then `hello` (bincode).
pub fn role_hello_frame_into<T: Serialize>(out: &mut Vec<u8>, role: Role, hello: &T) -> Result<()> {
    let mut body = Vec::new();
    encode_into(&mut body, hello)?;
    // The role's byte goes where the message frame's length ended: the hello frame has
    // a length of its own.
    body[3] = role.byte();
    hello_frame_into(out, &body[3..]);
    Ok(())
}

/// Splits a hello body into the peer's version and the rest; a wrong magic is an error.
pub fn parse_hello(body: &[u8]) -> Result<(u32, &[u8])> {
    if body.len() < 8 || body[..4] != MAGIC {
        return Err(Error::Protocol(
            "the peer is not a workpool peer (bad hello magic)".into(),
        ));
    }
    let version = u32::from_be_bytes(body[4..8].try_into().expect("4 bytes"));
    Ok((version, &body[8..]))
}

pub(crate) fn read_error(e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        // rustls' text points to its manual; say what happened instead.
        return Error::io(
            "reading from the peer",
            io::Error::new(e.kind(), "the connection was cut (no TLS close_notify)"),
        );
    }
    Error::io("reading from the peer", e)
}

/// Reads whole frames from a byte stream, refusing a length over the limit before
/// allocating anything for it.
pub struct FrameReader<R: Read> {
    inner: BufReader<R>,
    max_frame: usize,
}

impl<R: Read> FrameReader<R> {
    /// A reader of frames of at most `max_frame` body bytes.
    pub fn new(inner: R, max_frame: usize) -> FrameReader<R> {
        FrameReader {
            inner: BufReader::with_capacity(64 * 1024, inner),
            max_frame,
        }
    }

    /// The next frame body; `Ok(None)` when the stream ends cleanly between frames.
    pub fn read_frame(&mut self) -> Result<Option<Vec<u8>>> {
        let mut header = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.inner.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => {
                    return Err(Error::Protocol(
                        "connection closed inside a frame header".into(),
                    ));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(read_error(e)),
            }
        }
        let len = u32::from_be_bytes(header) as usize;
        if len > self.max_frame {
            return Err(Error::Protocol(format!(
                "frame of {len} bytes exceeds the limit of {} bytes",
                self.max_frame
            )));
        }
        // Grow with the bytes that really arrive, not with the announced length.
        let mut body = Vec::with_capacity(len.min(64 * 1024));
        (&mut self.inner)
            .take(len as u64)
            .read_to_end(&mut body)
            .map_err(read_error)?;
        if body.len() != len {
            return Err(Error::Protocol(format!(
                "connection closed inside a frame ({} of {len} bytes)",
                body.len()
            )));
        }
        Ok(Some(body))
    }

    /// Changes the largest frame accepted from now on.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// The wrapped reader.
    pub fn get_ref(&self) -> &R {
        self.inner.get_ref()
    }

    /// The wrapped reader, mutably (bytes it has buffered are not seen through it).
    pub fn get_mut(&mut self) -> &mut R {
        self.inner.get_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_head_and_its_bytes_make_the_frame_of_the_whole_message() {
        for (len, seq, job) in [
            (0, 0, 1),
            (1, 250, 300),
            (60_000, u64::MAX - 1, u64::MAX),
            (1 << 20, 7, 70_000),
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            for stream in [Stream::Stdout, Stream::Stderr] {
                let mut whole = vec![9];
                encode_into(
                    &mut whole,
                    &WorkerMessage::Output {
                        job: JobId(job),
                        stream,
                        seq,
                        bytes: bytes.clone(),
                    },
                )
                .unwrap();
                let mut parts = vec![9];
                encode_output_head_into(&mut parts, JobId(job), stream, seq, len).unwrap();
                parts.extend_from_slice(&bytes);
                assert_eq!(parts, whole, "{len} bytes, seq {seq}, {stream:?}");
            }
        }
        let mut out = vec![1, 2];
        assert!(encode_output_head_into(&mut out, JobId(1), Stream::Stdout, 0, 17 << 20).is_err());
        assert_eq!(out, vec![1, 2], "nothing is left of a refused head");
    }

    fn frames_of(bytes: &[u8]) -> Vec<Result<Option<Vec<u8>>>> {
        let mut r = FrameReader::new(bytes, 1024);
        let mut out = Vec::new();
        loop {
            let f = r.read_frame();
            let stop = !matches!(f, Ok(Some(_)));
            out.push(f);
            if stop {
                return out;
            }
        }
    }

    #[test]
    fn messages_round_trip_through_frames() {
        let mut buf = Vec::new();
        let a = WorkerMessage::Output {
            job: JobId(7),
            stream: Stream::Stderr,
            seq: 3,
            bytes: b"hi\n".to_vec(),
        };
        let b = WorkerMessage::Finished {
            job: JobId(7),
            outcome: Outcome::Exited(2),
            cleanup_error: None,
        };
        encode_into(&mut buf, &a).unwrap();
        encode_into(&mut buf, &b).unwrap();
        let frames = frames_of(&buf);
        assert_eq!(frames.len(), 3);
        let got_a: WorkerMessage = decode(frames[0].as_ref().unwrap().as_ref().unwrap()).unwrap();
        let got_b: WorkerMessage = decode(frames[1].as_ref().unwrap().as_ref().unwrap()).unwrap();
        assert_eq!((got_a, got_b), (a, b));
        assert!(matches!(frames[2], Ok(None)));
    }

    #[test]
    fn an_oversized_length_is_refused_before_reading_the_body() {
        let bytes = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        let err = frames_of(&bytes).pop().unwrap().unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
    }

    #[test]
    fn a_truncated_frame_is_an_error_not_a_clean_end() {
        let err = frames_of(&[0, 0, 0, 9, 1, 2]).pop().unwrap().unwrap_err();
        assert!(err.to_string().contains("2 of 9 bytes"), "{err}");
        let err = frames_of(&[0, 0]).pop().unwrap().unwrap_err();
        assert!(err.to_string().contains("header"), "{err}");
    }

    #[test]
    fn trailing_garbage_in_a_body_does_not_decode() {
        let mut buf = Vec::new();
        encode_into(&mut buf, &ManagerMessage::Heartbeat).unwrap();
        let mut body = buf[4..].to_vec();
        body.push(0);
        assert!(decode::<ManagerMessage>(&body).is_err());
    }

    #[test]
    fn hello_carries_magic_and_version() {
        let mut buf = Vec::new();
        hello_frame_into(&mut buf, b"rest");
        let body = frames_of(&buf).remove(0).unwrap().unwrap();
        assert_eq!(
            parse_hello(&body).unwrap(),
            (PROTOCOL_VERSION, &b"rest"[..])
        );
        assert!(parse_hello(b"GET / HTTP/1.1").is_err());
    }

    #[test]
    fn a_lying_inner_length_cannot_allocate_past_the_frame() {
        // An Output whose byte vector claims 2^40 bytes inside a 16-byte frame.
        let mut body = vec![0u8]; // variant 0: Output
        body.extend_from_slice(&[7, 0, 3]); // job, stream, seq
        body.push(0xfc); // varint marker: u64 follows
        body.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decode::<WorkerMessage>(&body).is_err());
    }
    #[test]
    fn peer_text_escapes_control_characters_and_is_cut_to_the_cap() {
        assert_eq!(peer_text("plain words"), "plain words");
        assert_eq!(
            peer_text("a\nb\x1b[31mred\u{202e}txt\0"),
            "a\\nb\\u{1b}[31mred\\u{202e}txt\\u{0}"
        );
        let long = "é".repeat(MAX_PEER_TEXT); // 2 bytes each
        let cut = peer_text(&long);
        assert!(cut.starts_with("éé"));
        assert!(cut.len() <= MAX_PEER_TEXT + 40, "{}", cut.len());
        assert!(
            cut.ends_with(&format!(" [{} more bytes cut]", MAX_PEER_TEXT)),
            "{}",
            &cut[cut.len() - 40..]
        );
        let controls = "\x07".repeat(1 << 20);
        let cut = peer_text(&controls);
        assert!(cut.len() <= MAX_PEER_TEXT + 40);
        assert!(!cut.chars().any(char::is_control));
    }

    #[test]
    fn names_tags_and_platforms_must_be_short_printable_text() {
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert!(check_identity("w-1", &tags(&["gpu", "big"]), "linux-x86_64").is_ok());
        assert!(check_identity("w-1", &tags(&[]), "").is_ok());
        for (name, t, platform) in [
            ("", tags(&[]), "p"),
            ("w\nfake log line", tags(&[]), "p"),
            ("w", tags(&["ok", "\x1b[2J"]), "p"),
            ("w", tags(&[""]), "p"),
            ("w", tags(&[]), "linux\r"),
        ] {
            let e = check_identity(name, &t, platform).unwrap_err();
            assert!(!e.chars().any(char::is_control), "{e:?}");
        }
        assert!(check_identity(&"n".repeat(MAX_NAME + 1), &tags(&[]), "p").is_err());
        let many: BTreeSet<String> = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect();
        assert!(
            check_identity("w", &many, "p")
                .unwrap_err()
                .contains("tags")
        );
    }
}
