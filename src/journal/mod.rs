//! The manager's journal: what it has accepted and where each job is, kept on disk so
//! that a restart loses nothing.
//!
//! The manager writes [`Record`]s; the journal keeps, per job that has not ended, its
//! spec, its submitter, its attempt and where it is (queued, or sent to a named worker),
//! and per ended job its outcome (and, for a detached job, its kept output) until
//! compaction forgets it. [`Journal::write`] returns once its records are durable;
//! writes from several threads at once share one commit (group commit).
//! [`Journal::record`] adds records to the next commit without waiting (state changes
//! that a restart can settle without them: see docs/ARCHITECTURE.md, "The journal").
//!
//! After a restart, [`Recovered`] is what the journal holds: the manager's id (so that
//! its workers come back to it), the next job id, the jobs that have not ended and the
//! ended detached jobs still kept. What the manager does with it (queue again, wait for
//! workers to claim their jobs) is decided in the dispatcher and the submitters' hub,
//! which are tested in memory with [`MemoryJournal`].
//!
//! The journal sits behind one small trait so that another store can sit behind it.

mod gather;
#[cfg(test)]
pub(crate) mod memory;
pub(crate) mod sqlite;

use crate::error::Result;
use crate::job::{JobId, JobSpec, Outcome, Stream};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[cfg(test)]
pub(crate) use memory::MemoryJournal;

/// Who submitted a job, as the journal keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Submitter {
    /// Through the `Manager` handle, in the manager's own process: after a restart
    /// nobody follows the job (it runs to its end, and its end is journaled).
    Local,
    /// A remote submitter.
    Remote {
        /// The certificate (DER) of its connection; `None` without TLS.
        cert: Option<Vec<u8>>,
        /// Its session.
        session: u64,
        /// The request (its `seq` in the session) that submitted the job.
        request: u64,
        /// Whether the job runs on when its submitter goes away.
        detached: bool,
    },
}

/// One change to what the journal holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum Record {
    /// The manager's instance id, written once when a journal is created.
    ManagerId(u64),
    /// A job was accepted (attempt 1, queued). Written with [`Journal::write`]: the
    /// job is accepted only once this is durable.
    Accepted {
        id: JobId,
        spec: JobSpec,
        submitter: Submitter,
    },
    /// A worker connected under this name with this certificate (DER; `None`
    /// without TLS): after a restart only it may claim the jobs sent to `name`.
    Worker { name: String, cert: Option<Vec<u8>> },
    /// The job's run `attempt` was sent to the worker named `worker` (`ahead`: to
    /// hold until one of its slots frees).
    Sent {
        id: JobId,
        attempt: u32,
        worker: String,
        ahead: bool,
    },
    /// A run sent ahead has started.
    Started { id: JobId },
    /// The job waits in the queue again: it was declined or given back (same
    /// attempt), or its worker was lost and it is retried (the next attempt).
    Queued { id: JobId, attempt: u32 },
    /// The job ended, once.
    Ended { id: JobId, outcome: Outcome },
    /// A detached job's kept output at its end: its last chunks, in order, and how
    /// many bytes were dropped before them.
    Kept {
        id: JobId,
        output: Vec<(Stream, Vec<u8>)>,
        dropped: u64,
    },
}

/// Where a job that has not ended was, as far as the journal knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    /// In the queue.
    Queued,
    /// Sent to the worker of this name (which had this certificate), and perhaps
    /// running there: after a restart it waits for that worker to claim it.
    Sent {
        worker: String,
        cert: Option<Vec<u8>>,
        /// Sent ahead (to hold until one of the worker's slots frees), and not known
        /// to have started.
        ahead: bool,
    },
}

impl Place {
    /// The worker it was sent to (name, certificate, whether ahead); `None`: queued.
    pub(crate) fn sent_to(self) -> Option<(String, Option<Vec<u8>>, bool)> {
        match self {
            Place::Queued => None,
            Place::Sent {
                worker,
                cert,
                ahead,
            } => Some((worker, cert, ahead)),
        }
    }
}

/// A job that had not ended when the journal was last written.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct OpenJob {
    pub id: JobId,
    pub spec: JobSpec,
    pub submitter: Submitter,
    pub attempt: u32,
    pub place: Place,
}

/// An ended job whose end is still kept (a detached job's, for a later attach).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct EndedJob {
    pub id: JobId,
    pub submitter: Submitter,
    pub outcome: Outcome,
    pub output: Vec<(Stream, Vec<u8>)>,
    pub dropped: u64,
    /// When its end was written.
    pub ended_at: SystemTime,
}

/// What a journal held when it was opened.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Recovered {
    /// The manager's instance id (a new random one for a new journal, already written).
    pub manager_id: u64,
    /// The id the next job gets: above every id the journal ever accepted.
    pub next_job: u64,
    /// Jobs that had not ended, by id.
    pub open: Vec<OpenJob>,
    /// Ended detached jobs still kept, oldest end first.
    pub ended_detached: Vec<EndedJob>,
    /// Every remote submission the journal still holds (open or ended), as
    /// `(session, request, job)` in job order: a request sent again after a restart
    /// is answered with its jobs instead of submitting them twice.
    pub remote_requests: Vec<(u64, u64, JobId)>,
}

/// How long ended jobs stay in the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Retention {
    /// Ended jobs are forgotten this long after their end.
    pub keep_ended_for: Duration,
    /// At most this many ended jobs are kept (the oldest are forgotten first).
    pub keep_ended: usize,
}

/// What [`Journal::record_then`] runs once a commit is done, told whether its records
/// are durable.
pub(crate) type Then = Box<dyn FnOnce(bool) + Send>;

/// The manager's journal.
pub(crate) trait Journal: Send + Sync {
    /// Adds `records` and returns once they are durable (with the records of every
    /// caller waiting at the same time: one commit). An error says the records were
    /// not kept (a full disk, an I/O error); the journal goes on working for later
    /// writes.
    fn write(&self, records: Vec<Record>) -> Result<()>;

    /// Adds `records` to the next commit without waiting for it. A failed commit is
    /// logged.
    fn record(&self, records: Vec<Record>);

    /// [`Journal::record`] (the records may be none), and runs `then` (on the
    /// journal's own thread: it must not block) once their commit is done, with whether
    /// they are durable (false: the commit failed, or the journal is closed). Every
    /// record added before (by any thread) is in that commit or an earlier one, and
    /// calls come in the order they were made.
    fn record_then(&self, records: Vec<Record>, then: Option<Then>);

    /// Bytes the journal takes on disk now.
    fn size_bytes(&self) -> u64;

    /// Commits what was recorded, and stops taking records (later ones are dropped).
    fn close(&self);
}

/// Opens (or creates) the journal at `path` and reads what it holds. A journal that is
/// corrupt, written by a newer version, or in use by another manager is an error
/// ([`crate::Error::Journal`], one line) and is left as it is.
pub(crate) fn open(path: &Path, retention: Retention) -> Result<(Arc<dyn Journal>, Recovered)> {
    sqlite::open(path, retention)
}
