//! The journal in an SQLite database (WAL mode, `synchronous=FULL`), written by one
//! thread that commits whatever has come in since its last commit as one transaction
//! (group commit), then answers every caller of that commit.
//!
//! The database holds the state the records build up, in tables an operator can read
//! with `sqlite3` (`select id, state, worker, outcome from jobs`):
//!
//! - `meta(key, value)`: `format` (the layout's version), `manager_id`, `next_job`;
//! - `jobs`: one row per job not yet compacted: `state` (`queued`, `running`: sent to
//!   `worker` to run now or started there, `ahead`: sent to `worker` to hold until one
//!   of its slots frees, `ended`), `attempt`, `priority`, `script`, who submitted it,
//!   and once ended its `outcome` (`exited`, `signaled`, … with `outcome_code` and
//!   `outcome_reason`) and `ended_at` (nanoseconds since the Unix epoch:
//!   `datetime(ended_at / 1e9, 'unixepoch')`). `spec` is the job's spec as the protocol
//!   encodes it, kept until the job ends;
//! - `kept_output(job, n, stream, bytes)`: a detached job's kept output at its end;
//! - `workers(name, cert)`: the certificate each worker name last connected with.
//!
//! Opening reads them back with a few SELECTs. Ended jobs are compacted by the writer
//! thread (by their end time, through an index, and by count) about a second after
//! jobs end and whenever the oldest kept end expires; the pages they took are reused,
//! and given back to the file system when a quarter of the file is free.
//!
//! Another manager is kept out by an exclusive `flock` on `PATH.lock` (a second open in
//! the same process is refused too), taken before the database is touched. A journal
//! that cannot be used (corrupt, a newer format, in use) is an error of one line that
//! names the file, and the file is left as it is.

use super::gather::Gather;
use super::{EndedJob, Journal, OpenJob, Place, Record, Recovered, Retention, Submitter};
use crate::error::{Error, Result};
use crate::job::{JobId, JobSpec, Outcome, Stream};
use crate::sync::lock;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The layout of the tables this build writes and reads. A journal of a higher format
/// is refused (it was written by a newer version).
const FORMAT: i64 = 1;

/// How long after jobs end the writer compacts (at the latest).
const COMPACT_AFTER: Duration = Duration::from_secs(1);

/// At most this many records go into one commit (a commit's size stays bounded while
/// writers keep coming).
const MAX_BATCH_RECORDS: usize = 65_536;

/// How long a commit waits for the database's write lock (only an operator's own write
/// transaction can hold it) before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The WAL is cut back to this size after a checkpoint.
const WAL_SIZE_LIMIT: i64 = 4 << 20;

const SCHEMA: &str = "
CREATE TABLE meta (
    key TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE workers (
    name TEXT PRIMARY KEY NOT NULL,
    cert BLOB
) WITHOUT ROWID;
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    worker TEXT,
    priority INTEGER NOT NULL,
    script TEXT NOT NULL,
    submitter TEXT NOT NULL,
    session INTEGER,
    request INTEGER,
    detached INTEGER NOT NULL,
    submitter_cert BLOB,
    outcome TEXT,
    outcome_code INTEGER,
    outcome_reason TEXT,
    ended_at INTEGER,
    kept_dropped INTEGER,
    spec BLOB
);
CREATE INDEX jobs_ended ON jobs (ended_at, id) WHERE state = 'ended';
CREATE TABLE kept_output (
    job INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    n INTEGER NOT NULL,
    stream TEXT NOT NULL,
    bytes BLOB NOT NULL,
    PRIMARY KEY (job, n)
) WITHOUT ROWID;
";

/// Opens (or creates) the journal at `path`.
pub(crate) fn open(path: &Path, retention: Retention) -> Result<(Arc<dyn Journal>, Recovered)> {
    let (journal, recovered) = SqliteJournal::open(path, retention)?;
    Ok((Arc::new(journal), recovered))
}

/// `path` with `suffix` added to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

/// A message as one line.
fn one_line(s: impl std::fmt::Display) -> String {
    s.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Nanoseconds since the Unix epoch (negative before it), saturated to `i64`.
fn to_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

fn from_ns(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// Ids are `u64` in Rust and `INTEGER` (`i64`) in SQLite: stored bit for bit.
fn sql_u64(v: u64) -> i64 {
    v as i64
}

fn rust_u64(v: i64) -> u64 {
    v as u64
}

fn stream_name(s: Stream) -> &'static str {
    s.name()
}

/// The exclusive lock on `PATH.lock` that keeps a second manager out, held as long as
/// the journal is open.
struct LockFile {
    _file: File,
}

impl LockFile {
    fn take(path: &Path) -> Result<LockFile> {
        let lock_path = with_suffix(path, ".lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| {
                Error::Journal(format!(
                    "{}: cannot open its lock file {}: {e}",
                    path.display(),
                    lock_path.display()
                ))
            })?;
        // SAFETY: the descriptor belongs to `file`, which is open for the whole call;
        // flock takes no pointers.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let by = match holder.trim().parse::<u32>() {
                    Ok(pid) if pid == std::process::id() => "in this process".to_owned(),
                    Ok(pid) => format!("process {pid}"),
                    Err(_) => "another process".to_owned(),
                };
                return Err(Error::Journal(format!(
                    "{} is in use by another manager ({by}); it is left as it is",
                    path.display()
                )));
            }
            return Err(Error::Journal(format!(
                "{}: cannot lock {}: {e}",
                path.display(),
                lock_path.display()
            )));
        }
        // Who holds it, for the message another manager gets.
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| write!(file, "{}\n", std::process::id()))
            .and_then(|()| file.flush());
        Ok(LockFile { _file: file })
    }
}

/// Why opening failed, before it is put in words.
enum OpenError {
    /// The file is not a database this build can read.
    Corrupt(String),
    /// A workpool journal of a newer format.
    Newer(i64),
    /// An SQLite database that is not a workpool journal.
    Foreign,
    /// Anything else (permissions, I/O).
    Other(String),
}

impl From<rusqlite::Error> for OpenError {
    fn from(e: rusqlite::Error) -> OpenError {
        match e.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
                OpenError::Corrupt(one_line(e))
            }
            _ => OpenError::Other(one_line(e)),
        }
    }
}

/// The database and what the records do to it: plain calls on one connection, with the
/// time passed in (the writer thread passes the clock's).
pub(crate) struct Db {
    conn: Connection,
    path: PathBuf,
}

/// What a failed commit is put down to.
fn describe(conn: &Connection, e: &rusqlite::Error) -> String {
    let full = match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => true,
        Some(ErrorCode::SystemIoFailure) => {
            // SAFETY: `conn` is an open connection; the call only reads its last errno.
            let errno = unsafe { rusqlite::ffi::sqlite3_system_errno(conn.handle()) };
            matches!(errno, libc::ENOSPC | libc::EFBIG | libc::EDQUOT)
        }
        _ => false,
    };
    if full {
        format!("the disk is full ({})", one_line(e))
    } else {
        one_line(e)
    }
}

impl Db {
    /// Opens the database at `path` (creating it, with a new manager id, if it does not
    /// exist or holds nothing) and checks that this build can use it.
    fn open(path: &Path) -> Result<Db> {
        Db::open_inner(path).map_err(|e| {
            let p = path.display();
            Error::Journal(match e {
                OpenError::Corrupt(why) => {
                    format!("{p} is corrupt ({why}); it is left as it is")
                }
                OpenError::Newer(format) => format!(
                    "{p} was written by a newer version of workpool (journal format {format}; \
                     this build reads format {FORMAT}); it is left as it is"
                ),
                OpenError::Foreign => format!(
                    "{p} is an SQLite database but not a workpool journal; it is left as it is"
                ),
                OpenError::Other(why) => format!("{p}: cannot open the journal: {why}"),
            })
        })
    }

    fn open_inner(path: &Path) -> Result<Db, OpenError> {
        let existing = match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => return Err(OpenError::Other("it is a folder".into())),
            Ok(m) => m.len() > 0,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(OpenError::Other(one_line(e))),
        };
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if existing {
            // Read the header before SQLite does anything with the file.
            let mut head = [0u8; 16];
            let mut f = File::open(path).map_err(|e| OpenError::Other(one_line(e)))?;
            let n = f
                .read(&mut head)
                .map_err(|e| OpenError::Other(one_line(e)))?;
            if n < head.len() || &head != b"SQLite format 3\0" {
                return Err(OpenError::Corrupt("not an SQLite database".into()));
            }
        } else {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
        if tables == 0 {
            // New, or created by a manager that stopped before its first commit.
            conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.execute_batch("BEGIN IMMEDIATE")?;
            let made = conn.execute_batch(SCHEMA).and_then(|()| {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('format', ?1), ('next_job', 1), \
                     ('manager_id', ?2)",
                    params![FORMAT, sql_u64(crate::random::u64())],
                )?;
                conn.execute_batch("COMMIT")
            });
            if let Err(e) = made {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e.into());
            }
        } else {
            let check: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0))?;
            if check != "ok" {
                return Err(OpenError::Corrupt(one_line(check)));
            }
            let has_meta: bool = conn.query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
                [],
                |r| r.get(0),
            )?;
            if !has_meta {
                return Err(OpenError::Foreign);
            }
            let format: Option<i64> = conn
                .query_row("SELECT value FROM meta WHERE key = 'format'", [], |r| {
                    r.get(0)
                })
                .optional()?;
            match format {
                None => return Err(OpenError::Foreign),
                Some(f) if f > FORMAT => return Err(OpenError::Newer(f)),
                Some(f) if f < FORMAT => {
                    return Err(OpenError::Corrupt(format!("unknown journal format {f}")));
                }
                Some(_) => {}
            }
            let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                conn.pragma_update(None, "journal_mode", "WAL")?;
            }
            conn.pragma_update(None, "synchronous", "FULL")?;
        }
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
        Ok(Db {
            conn,
            path: path.to_owned(),
        })
    }

    /// Applies `records`, written at `now`, in one transaction. Returns whether a job
    /// ended (something to compact later).
    fn commit<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a Record>,
        now: SystemTime,
    ) -> rusqlite::Result<bool> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let mut ended = false;
        let r = (|| {
            for r in records {
                ended |= self.apply(r, now)?;
            }
            self.conn.execute_batch("COMMIT")
        })();
        if r.is_err() && !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        r.map(|()| ended)
    }

    /// Applies one record (in the open transaction); returns whether a job ended.
    fn apply(&self, record: &Record, now: SystemTime) -> rusqlite::Result<bool> {
        let c = &self.conn;
        match record {
            Record::ManagerId(id) => {
                c.prepare_cached(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('manager_id', ?1)",
                )?
                .execute([sql_u64(*id)])?;
            }
            Record::Accepted {
                id,
                spec,
                submitter,
            } => {
                let mut frame = Vec::with_capacity(spec.wire_size() + 16);
                crate::protocol::encode_into(&mut frame, spec)
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                let body = &frame[4..];
                let (kind, session, request, detached, cert) = match submitter {
                    Submitter::Local => ("local", None, None, false, None),
                    Submitter::Remote {
                        cert,
                        session,
                        request,
                        detached,
                    } => (
                        "remote",
                        Some(sql_u64(*session)),
                        Some(sql_u64(*request)),
                        *detached,
                        cert.as_deref(),
                    ),
                };
                // A job accepted again under the same id starts over (never done: ids
                // are not reused).
                c.prepare_cached("DELETE FROM jobs WHERE id = ?1")?
                    .execute([sql_u64(id.0)])?;
                c.prepare_cached(
                    "INSERT INTO jobs (id, state, attempt, priority, script, submitter, session, \
                     request, detached, submitter_cert, spec) \
                     VALUES (?1, 'queued', 1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![
                    sql_u64(id.0),
                    spec.priority,
                    spec.script,
                    kind,
                    session,
                    request,
                    detached,
                    cert,
                    body
                ])?;
                c.prepare_cached("UPDATE meta SET value = max(value, ?1) WHERE key = 'next_job'")?
                    .execute([sql_u64(id.0.saturating_add(1))])?;
            }
            Record::Worker { name, cert } => {
                c.prepare_cached("INSERT OR REPLACE INTO workers (name, cert) VALUES (?1, ?2)")?
                    .execute(params![name, cert.as_deref()])?;
            }
            Record::Sent {
                id,
                attempt,
                worker,
                ahead,
            } => {
                c.prepare_cached(
                    "UPDATE jobs SET attempt = ?2, worker = ?3, state = ?4 \
                     WHERE id = ?1 AND state != 'ended'",
                )?
                .execute(params![
                    sql_u64(id.0),
                    attempt,
                    worker,
                    if *ahead { "ahead" } else { "running" }
                ])?;
            }
            Record::Started { id } => {
                c.prepare_cached(
                    "UPDATE jobs SET state = 'running' WHERE id = ?1 AND state = 'ahead'",
                )?
                .execute([sql_u64(id.0)])?;
            }
            Record::Queued { id, attempt } => {
                c.prepare_cached(
                    "UPDATE jobs SET attempt = ?2, worker = NULL, state = 'queued' \
                     WHERE id = ?1 AND state != 'ended'",
                )?
                .execute(params![sql_u64(id.0), attempt])?;
            }
            Record::Ended { id, outcome } => {
                let (code, reason) = match outcome {
                    Outcome::Exited(c) | Outcome::Signaled(c) => (Some(*c), None),
                    Outcome::Rejected(r) | Outcome::SpawnFailed(r) => (None, Some(r.as_str())),
                    Outcome::TimedOut | Outcome::Cancelled | Outcome::WorkerLost => (None, None),
                };
                // The spec is not needed once the job has ended.
                let n = c
                    .prepare_cached(
                        "UPDATE jobs SET state = 'ended', outcome = ?2, outcome_code = ?3, \
                         outcome_reason = ?4, ended_at = ?5, spec = NULL \
                         WHERE id = ?1 AND state != 'ended'",
                    )?
                    .execute(params![
                        sql_u64(id.0),
                        outcome.name(),
                        code,
                        reason,
                        to_ns(now)
                    ])?;
                return Ok(n > 0);
            }
            Record::Kept {
                id,
                output,
                dropped,
            } => {
                let n = c
                    .prepare_cached("UPDATE jobs SET kept_dropped = ?2 WHERE id = ?1")?
                    .execute(params![sql_u64(id.0), sql_u64(*dropped)])?;
                if n > 0 {
                    c.prepare_cached("DELETE FROM kept_output WHERE job = ?1")?
                        .execute([sql_u64(id.0)])?;
                    let mut insert = c.prepare_cached(
                        "INSERT INTO kept_output (job, n, stream, bytes) VALUES (?1, ?2, ?3, ?4)",
                    )?;
                    for (i, (stream, bytes)) in output.iter().enumerate() {
                        insert.execute(params![
                            sql_u64(id.0),
                            i as i64,
                            stream_name(*stream),
                            bytes
                        ])?;
                    }
                }
            }
        }
        Ok(false)
    }

    /// Forgets ended jobs past `retention` at `now` (as [`super::memory::State::compact`]
    /// does) and gives free pages back when a quarter of the file is free. Returns when
    /// the oldest ended job still kept expires, if one is kept.
    fn compact(
        &mut self,
        now: SystemTime,
        retention: Retention,
    ) -> rusqlite::Result<Option<SystemTime>> {
        let cutoff = now.checked_sub(retention.keep_ended_for).map(to_ns);
        let (count, oldest): (i64, Option<i64>) = self.conn.query_row(
            "SELECT count(*), min(ended_at) FROM jobs WHERE state = 'ended'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let keep = i64::try_from(retention.keep_ended).unwrap_or(i64::MAX);
        let expired = matches!((oldest, cutoff), (Some(o), Some(c)) if o <= c);
        if count > keep || expired {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            let r = (|| {
                let old = match cutoff {
                    Some(c) => self
                        .conn
                        .prepare_cached(
                            "DELETE FROM jobs WHERE state = 'ended' AND ended_at <= ?1",
                        )?
                        .execute([c])?,
                    None => 0,
                };
                let over = (count - old as i64 - keep).max(0);
                if over > 0 {
                    self.conn
                        .prepare_cached(
                            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs \
                             WHERE state = 'ended' ORDER BY ended_at, id LIMIT ?1)",
                        )?
                        .execute([over])?;
                }
                self.conn.execute_batch("COMMIT")
            })();
            if r.is_err() && !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            r?;
            let free: i64 = self
                .conn
                .pragma_query_value(None, "freelist_count", |r| r.get(0))?;
            let pages: i64 = self
                .conn
                .pragma_query_value(None, "page_count", |r| r.get(0))?;
            if free > 64 && free * 4 > pages {
                // Keep half for the jobs to come, give the rest back. The pragma frees a
                // page per row it returns: it runs until its last row.
                let mut vacuum = self.conn.prepare("PRAGMA incremental_vacuum(?1)")?;
                let mut rows = vacuum.query([free / 2])?;
                while rows.next()?.is_some() {}
            }
        }
        let oldest: Option<i64> = self.conn.query_row(
            "SELECT min(ended_at) FROM jobs WHERE state = 'ended'",
            [],
            |r| r.get(0),
        )?;
        Ok(oldest.and_then(|o| from_ns(o).checked_add(retention.keep_ended_for)))
    }

    /// What the journal holds.
    fn recovered(&self) -> Result<Recovered> {
        self.recovered_inner().map_err(|e| {
            Error::Journal(format!(
                "{} is corrupt (it cannot be read back: {}); it is left as it is",
                self.path.display(),
                one_line(e)
            ))
        })
    }

    fn recovered_inner(&self) -> rusqlite::Result<Recovered> {
        let c = &self.conn;
        let meta = |key: &str| -> rusqlite::Result<Option<i64>> {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        };
        let manager_id = rust_u64(meta("manager_id")?.ok_or_else(|| bad("no manager id"))?);
        let next_job = rust_u64(meta("next_job")?.ok_or_else(|| bad("no next job id"))?).max(1);

        let mut open = Vec::new();
        let mut stmt = c.prepare(
            "SELECT j.id, j.spec, j.submitter, j.session, j.request, j.detached, \
             j.submitter_cert, j.attempt, j.worker, w.cert \
             FROM jobs j LEFT JOIN workers w ON w.name = j.worker \
             WHERE j.state != 'ended' ORDER BY j.id",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let id = JobId(rust_u64(r.get(0)?));
            let spec: Option<Vec<u8>> = r.get(1)?;
            let spec: JobSpec = crate::protocol::decode(
                spec.as_deref()
                    .ok_or_else(|| bad(format!("job {id} has no spec")))?,
            )
            .map_err(|e| bad(format!("job {id}'s spec: {e}")))?;
            let submitter = submitter_of(r, 2)?;
            let worker: Option<String> = r.get(8)?;
            open.push(OpenJob {
                id,
                spec,
                submitter,
                attempt: r.get(7)?,
                place: match worker {
                    None => Place::Queued,
                    Some(worker) => Place::Sent {
                        worker,
                        cert: r.get(9)?,
                    },
                },
            });
        }

        let mut ended_detached = Vec::new();
        let mut stmt = c.prepare(
            "SELECT id, submitter, session, request, detached, submitter_cert, outcome, \
             outcome_code, outcome_reason, ended_at, kept_dropped FROM jobs \
             WHERE state = 'ended' AND submitter = 'remote' AND detached \
             ORDER BY ended_at, id",
        )?;
        let mut kept =
            c.prepare("SELECT stream, bytes FROM kept_output WHERE job = ?1 ORDER BY n")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            let name: String = r.get(6)?;
            let code: Option<i32> = r.get(7)?;
            let reason: Option<String> = r.get(8)?;
            let outcome = outcome_of(&name, code, reason)
                .ok_or_else(|| bad(format!("job {id} has an unknown outcome {name:?}")))?;
            let mut output = Vec::new();
            let mut chunks = kept.query([id])?;
            while let Some(k) = chunks.next()? {
                let stream: String = k.get(0)?;
                let stream = match stream.as_str() {
                    "stdout" => Stream::Stdout,
                    "stderr" => Stream::Stderr,
                    other => return Err(bad(format!("job {id} kept output of stream {other:?}"))),
                };
                output.push((stream, k.get(1)?));
            }
            ended_detached.push(EndedJob {
                id: JobId(rust_u64(id)),
                submitter: submitter_of(r, 1)?,
                outcome,
                output,
                dropped: rust_u64(r.get::<_, Option<i64>>(10)?.unwrap_or(0)),
                ended_at: from_ns(r.get(9)?),
            });
        }

        let mut remote_requests = Vec::new();
        let mut stmt = c.prepare(
            "SELECT session, request, id FROM jobs WHERE submitter = 'remote' ORDER BY id",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            remote_requests.push((
                rust_u64(r.get(0)?),
                rust_u64(r.get(1)?),
                JobId(rust_u64(r.get(2)?)),
            ));
        }
        Ok(Recovered {
            manager_id,
            next_job,
            open,
            ended_detached,
            remote_requests,
        })
    }

    /// Bytes the database and its WAL take.
    fn size_bytes(path: &Path) -> u64 {
        let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        len(path) + len(&with_suffix(path, "-wal"))
    }
}

/// A row that cannot be read back.
fn bad(why: impl Into<String>) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
        Some(why.into()),
    )
}

/// The submitter in columns `at..at + 5` (kind, session, request, detached, cert).
fn submitter_of(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Submitter> {
    let kind: String = r.get(at)?;
    match kind.as_str() {
        "local" => Ok(Submitter::Local),
        "remote" => Ok(Submitter::Remote {
            session: rust_u64(r.get(at + 1)?),
            request: rust_u64(r.get(at + 2)?),
            detached: r.get(at + 3)?,
            cert: r.get(at + 4)?,
        }),
        other => Err(bad(format!("unknown submitter {other:?}"))),
    }
}

fn outcome_of(name: &str, code: Option<i32>, reason: Option<String>) -> Option<Outcome> {
    Some(match name {
        "exited" => Outcome::Exited(code?),
        "signaled" => Outcome::Signaled(code?),
        "timed_out" => Outcome::TimedOut,
        "cancelled" => Outcome::Cancelled,
        "worker_lost" => Outcome::WorkerLost,
        "rejected" => Outcome::Rejected(reason?),
        "spawn_failed" => Outcome::SpawnFailed(reason?),
        _ => return None,
    })
}

/// What is done once records are committed.
enum Done {
    /// Nothing (a failure is logged).
    Nothing,
    /// Say whether they are durable to a caller who waits.
    Tell(Sender<Result<(), String>>),
    /// Run this once they are durable (not if their commit failed).
    Then(Box<dyn FnOnce() + Send>),
}

/// What the writer thread is sent.
enum Msg {
    /// Records, and what is done once they are committed.
    Records(Vec<Record>, Done),
    /// Commit what came before, then stop.
    Close,
}

/// The journal in an SQLite database (see the module's documentation).
pub(crate) struct SqliteJournal {
    path: PathBuf,
    tx: Sender<Msg>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Commits so far (each fsyncs once).
    commits: Arc<AtomicU64>,
}

impl SqliteJournal {
    /// Opens the journal at `path` and starts its writer thread.
    pub(crate) fn open(path: &Path, retention: Retention) -> Result<(SqliteJournal, Recovered)> {
        let lock = LockFile::take(path)?;
        let mut db = Db::open(path)?;
        let now = SystemTime::now();
        let next = db.compact(now, retention).map_err(|e| {
            Error::Journal(format!(
                "{}: cannot compact the journal: {}",
                path.display(),
                describe(&db.conn, &e)
            ))
        })?;
        let recovered = db.recovered()?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let commits = Arc::new(AtomicU64::new(0));
        let counted = commits.clone();
        let writer = crate::thread::spawn("wp-journal", move || {
            let _lock = lock;
            run(db, rx, retention, next, &counted);
        })
        .map_err(|e| Error::Journal(format!("{}: cannot start its writer: {e}", path.display())))?;
        Ok((
            SqliteJournal {
                path: path.to_owned(),
                tx,
                writer: Mutex::new(Some(writer)),
                commits,
            },
            recovered,
        ))
    }

    /// How many commits the writer has made.
    #[cfg(test)]
    fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// How many messages wait for the writer.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.tx.len()
    }
}

/// An instant `at` stands for, seen from now (now if it has passed).
fn instant_of(at: SystemTime) -> Option<Instant> {
    let wait = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Instant::now().checked_add(wait)
}

/// The writer thread: takes every message waiting (and, on a slow disk, waits a little
/// for more: [`Gather`]), commits their records as one transaction and answers their
/// callers; compacts when it is time.
fn run(
    mut db: Db,
    rx: Receiver<Msg>,
    retention: Retention,
    next_expiry: Option<SystemTime>,
    commits: &AtomicU64,
) {
    let mut gather = Gather::default();
    let mut compact_at: Option<Instant> = next_expiry.and_then(instant_of);
    let mut closing = false;
    let mut batch: Vec<(Vec<Record>, Done)> = Vec::new();
    while !closing {
        let first = match compact_at {
            Some(at) => rx.recv_deadline(at),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let mut n = 0;
        match first {
            Ok(Msg::Records(records, reply)) => {
                n += records.len();
                batch.push((records, reply));
            }
            Ok(Msg::Close) | Err(RecvTimeoutError::Disconnected) => closing = true,
            Err(RecvTimeoutError::Timeout) => {}
        }
        while !closing && !batch.is_empty() && n < MAX_BATCH_RECORDS {
            match rx.try_recv() {
                Ok(Msg::Records(records, reply)) => {
                    n += records.len();
                    batch.push((records, reply));
                }
                Ok(Msg::Close) | Err(TryRecvError::Disconnected) => closing = true,
                Err(TryRecvError::Empty) => break,
            }
        }
        let callers = |batch: &[(Vec<Record>, Done)]| {
            batch
                .iter()
                .filter(|(_, d)| matches!(d, Done::Tell(_)))
                .count()
        };
        let until = gather.until(Instant::now(), callers(&batch));
        if let Some(until) = until.filter(|_| !closing && !batch.is_empty()) {
            while n < MAX_BATCH_RECORDS {
                match rx.recv_deadline(Gather::next(Instant::now(), until)) {
                    Ok(Msg::Records(records, reply)) => {
                        n += records.len();
                        batch.push((records, reply));
                    }
                    Ok(Msg::Close) | Err(RecvTimeoutError::Disconnected) => {
                        closing = true;
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                }
            }
        }
        // The commit's time (with its answers), for the next round's gathering.
        let committing = (!batch.is_empty()).then(|| (callers(&batch), Instant::now()));

        if !batch.is_empty() {
            let r = db.commit(batch.iter().flat_map(|(r, _)| r), SystemTime::now());
            commits.fetch_add(1, Ordering::Relaxed);
            let r = r.map_err(|e| {
                format!(
                    "{}: cannot write the journal: {}",
                    db.path.display(),
                    describe(&db.conn, &e)
                )
            });
            if let Ok(true) = r {
                let soon = Instant::now() + COMPACT_AFTER;
                compact_at = Some(compact_at.map_or(soon, |at| at.min(soon)));
            }
            for (records, done) in batch.drain(..) {
                match (done, &r) {
                    (Done::Tell(reply), r) => {
                        let _ = reply.send(r.as_ref().map(|_| ()).map_err(Clone::clone));
                    }
                    (Done::Then(then), Ok(_)) => then(),
                    (Done::Nothing | Done::Then(_), Err(e)) => {
                        log::error!("{e}; {} records were lost", records.len());
                    }
                    (Done::Nothing, Ok(_)) => {}
                }
            }
        }

        if let Some((callers, started)) = committing {
            gather.committed(callers, started.elapsed());
        }
        if !closing && compact_at.is_some_and(|at| Instant::now() >= at) {
            compact_at = match db.compact(SystemTime::now(), retention) {
                Ok(next) => next.and_then(instant_of),
                Err(e) => {
                    log::warn!(
                        "{}: cannot compact the journal: {}",
                        db.path.display(),
                        describe(&db.conn, &e)
                    );
                    Some(Instant::now() + COMPACT_AFTER)
                }
            };
        }
    }
}

impl Journal for SqliteJournal {
    fn write(&self, records: Vec<Record>) -> Result<()> {
        let closed = || Error::Journal(format!("{}: the journal is closed", self.path.display()));
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.tx
            .send(Msg::Records(records, Done::Tell(reply)))
            .map_err(|_| closed())?;
        match answer.recv() {
            Ok(r) => r.map_err(Error::Journal),
            Err(_) => Err(closed()),
        }
    }

    fn record(&self, records: Vec<Record>) {
        self.record_then(records, None);
    }

    fn record_then(&self, records: Vec<Record>, then: Option<Box<dyn FnOnce() + Send>>) {
        let done = then.map_or(Done::Nothing, Done::Then);
        if self.tx.send(Msg::Records(records, done)).is_err() {
            log::debug!(
                "{}: the journal is closed; records were dropped",
                self.path.display()
            );
        }
    }

    fn size_bytes(&self) -> u64 {
        Db::size_bytes(&self.path)
    }

    fn close(&self) {
        let writer = lock(&self.writer).take();
        if let Some(writer) = writer {
            let _ = self.tx.send(Msg::Close);
            if writer.join().is_err() {
                log::error!("{}: the journal's writer panicked", self.path.display());
            }
        }
    }
}

impl Drop for SqliteJournal {
    fn drop(&mut self) {
        self.close();
    }
}
