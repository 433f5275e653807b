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
//! The writer thread opens and reads the database too, so that every write to it is made
//! on that thread, which blocks SIGXFSZ: past a file size limit a commit fails as on a
//! full disk (the error says so), and the process is not killed.
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
use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
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

/// At most this many records (and [`MAX_RETAINED_BYTES`] of kept output) of failed
/// commits are kept to be committed with the next one; beyond, the oldest are lost.
const MAX_RETAINED_RECORDS: usize = 65_536;
const MAX_RETAINED_BYTES: usize = 64 << 20;

/// How long a commit waits for the database's write lock (only an operator's own write
/// transaction can hold it) before it fails.
#[cfg(not(test))]
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
#[cfg(test)]
const BUSY_TIMEOUT: Duration = Duration::from_millis(200);

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
        // Next to the file itself, whatever symbolic links name it (or its folder): a
        // second manager reaching the journal by another name finds the same lock.
        let real = std::fs::canonicalize(path).ok().or_else(|| {
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            Some(std::fs::canonicalize(parent).ok()?.join(path.file_name()?))
        });
        let lock_path = with_suffix(real.as_deref().unwrap_or(path), ".lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
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
            .and_then(|()| writeln!(file, "{}", std::process::id()))
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
            // Owner only: specs hold environments and stdin, kept output what jobs
            // wrote. SQLite gives the WAL and shared-memory files the database's mode.
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // An empty file made beforehand (`touch`): made private as well.
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(path)
                        .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(0o600)))
                        .map_err(|e| OpenError::Other(one_line(e)))?;
                }
                Err(e) => return Err(OpenError::Other(one_line(e))),
            }
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

    /// Opens the database, compacts it and reads what it holds; returns it with when
    /// the oldest ended job kept expires.
    fn open_and_read(
        path: &Path,
        retention: Retention,
    ) -> Result<(Db, Recovered, Option<SystemTime>)> {
        let mut db = Db::open(path)?;
        // Compacting now is not needed to start: on a full disk, the writer tries again.
        let next = match db.compact(SystemTime::now(), retention) {
            Ok(next) => next,
            Err(e) => {
                log::warn!(
                    "{}: cannot compact the journal: {}",
                    path.display(),
                    describe(&db.conn, &e)
                );
                Some(SystemTime::now() + COMPACT_AFTER)
            }
        };
        let recovered = db.recovered()?;
        Ok((db, recovered, next))
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

    /// Forgets ended jobs past `retention` at `now` (as `memory::State::compact`
    /// does) and gives free pages back when a quarter of the file is free. Returns when
    /// the oldest ended job still kept expires, if one is kept.
    fn compact(
        &mut self,
        now: SystemTime,
        retention: Retention,
    ) -> rusqlite::Result<Option<SystemTime>> {
        let cutoff = now.checked_sub(retention.keep_ended_for).map(to_ns);
        // Each kind of ended job is kept to the count on its own: detached jobs' ends
        // (kept for a later attach) are not pushed out by the ends of the others.
        let counts = |conn: &Connection| -> rusqlite::Result<(i64, i64, Option<i64>)> {
            conn.query_row(
                "SELECT coalesce(sum(NOT kept), 0), coalesce(sum(kept), 0), min(ended_at) \
                 FROM (SELECT (submitter = 'remote' AND detached) AS kept, ended_at \
                 FROM jobs WHERE state = 'ended')",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
        };
        let (others, detached, oldest) = counts(&self.conn)?;
        let keep = i64::try_from(retention.keep_ended).unwrap_or(i64::MAX);
        let expired = matches!((oldest, cutoff), (Some(o), Some(c)) if o <= c);
        if others > keep || detached > keep || expired {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            let r = (|| {
                if let Some(c) = cutoff {
                    self.conn
                        .prepare_cached(
                            "DELETE FROM jobs WHERE state = 'ended' AND ended_at <= ?1",
                        )?
                        .execute([c])?;
                }
                let (others, detached, _) = counts(&self.conn)?;
                for (count, kept) in [(others, false), (detached, true)] {
                    let over = (count - keep).max(0);
                    if over > 0 {
                        self.conn
                            .prepare_cached(
                                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs \
                                 WHERE state = 'ended' \
                                 AND (submitter = 'remote' AND detached) = ?2 \
                                 ORDER BY ended_at, id LIMIT ?1)",
                            )?
                            .execute(params![over, kept])?;
                    }
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
                // A burst of ends was compacted (a steady flow of jobs reuses what each
                // compaction frees): give it all back. The pragma frees a page per row it
                // returns: it runs until its last row.
                let mut vacuum = self.conn.prepare("PRAGMA incremental_vacuum")?;
                let mut rows = vacuum.query([])?;
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
             j.submitter_cert, j.attempt, j.worker, w.cert, j.state = 'ahead' \
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
                        ahead: r.get(10)?,
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
    /// Run this once they are committed, or their commit failed (the failure logged
    /// first), with whether they are durable.
    Then(super::Then),
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
    /// Commits so far (each fsyncs once), for the tests.
    #[cfg(test)]
    commits: Arc<AtomicU64>,
}

impl SqliteJournal {
    /// Opens the journal at `path` and starts its writer thread, which opens and reads
    /// the database (every write to it is on that thread, see [`block_sigxfsz`]).
    pub(crate) fn open(path: &Path, retention: Retention) -> Result<(SqliteJournal, Recovered)> {
        let lock = LockFile::take(path)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let (opened_tx, opened) = crossbeam_channel::bounded(1);
        let commits = Arc::new(AtomicU64::new(0));
        let counted = commits.clone();
        let at = path.to_owned();
        let writer = crate::thread::spawn("wp-journal", move || {
            let _lock = lock;
            block_sigxfsz();
            match Db::open_and_read(&at, retention) {
                Ok((db, recovered, next)) => {
                    let _ = opened_tx.send(Ok(recovered));
                    run(db, rx, retention, next, &counted);
                }
                Err(e) => {
                    let _ = opened_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| Error::Journal(format!("{}: cannot start its writer: {e}", path.display())))?;
        let recovered = opened.recv().unwrap_or_else(|_| {
            Err(Error::Journal(format!(
                "{}: the journal's writer stopped while opening it",
                path.display()
            )))
        });
        let recovered = match recovered {
            Ok(r) => r,
            Err(e) => {
                // The lock is let go with the thread.
                let _ = writer.join();
                return Err(e);
            }
        };
        Ok((
            SqliteJournal {
                path: path.to_owned(),
                tx,
                writer: Mutex::new(Some(writer)),
                #[cfg(test)]
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

/// Blocks SIGXFSZ on the calling thread. A write past the file size limit
/// (`RLIMIT_FSIZE`) then fails with `EFBIG`, which the journal reports as a full disk,
/// instead of the signal killing the process (its default), whatever the program that
/// embeds the library does with the signal. The kernel sends it to the thread that
/// wrote, where it stays pending.
fn block_sigxfsz() {
    // SAFETY: the set is a local that sigemptyset initialises before use; the old mask
    // is not asked for (NULL).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGXFSZ);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
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
    // State changes of failed commits (a full disk), committed first with the next one:
    // the manager went on as they say (a run was sent, a job ended), and a restart must
    // find it so once there is room again.
    let mut retained = Retained::default();
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
        if !batch.is_empty() {
            // Only calls to run, no records: what came before them was committed (or
            // failed) in an earlier round.
            let r = if retained.records.is_empty() && batch.iter().all(|(r, _)| r.is_empty()) {
                Ok(false)
            } else {
                let started = Instant::now();
                let records = retained
                    .records
                    .iter()
                    .chain(batch.iter().flat_map(|(r, _)| r));
                let r = db.commit(records, SystemTime::now());
                if r.is_ok() {
                    retained = Retained::default();
                }
                commits.fetch_add(1, Ordering::Relaxed);
                // The commit's time, for the next round's gathering (what runs after
                // it, below, is not the disk's).
                gather.committed(callers(&batch), started.elapsed());
                r.map_err(|e| {
                    format!(
                        "{}: cannot write the journal: {}",
                        db.path.display(),
                        describe(&db.conn, &e)
                    )
                })
            };
            if let Ok(true) = r {
                let soon = Instant::now() + COMPACT_AFTER;
                compact_at = Some(compact_at.map_or(soon, |at| at.min(soon)));
            }
            for (records, done) in batch.drain(..) {
                match (done, &r) {
                    (Done::Tell(reply), r) => {
                        let _ = reply.send(r.as_ref().map(|_| ()).map_err(Clone::clone));
                    }
                    (Done::Then(then), Ok(_)) => then(true),
                    (Done::Then(then), Err(e)) => {
                        retained.keep(records, e);
                        then(false);
                    }
                    (Done::Nothing, Err(e)) => retained.keep(records, e),
                    (Done::Nothing, Ok(_)) => {}
                }
            }
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
    // What failed commits left is tried once more (the disk may have room by now).
    if !retained.records.is_empty()
        && let Err(e) = db.commit(retained.records.iter(), SystemTime::now())
    {
        log::error!(
            "{}: cannot write the journal: {}; {} records were lost",
            db.path.display(),
            describe(&db.conn, &e),
            retained.records.len()
        );
    }
    // Sent after the close: nothing more is written. A caller of `write` hears that the
    // journal is closed (its answer is dropped); what was to run once records were
    // committed runs, told they are not durable.
    while let Ok(msg) = rx.try_recv() {
        if let Msg::Records(_, Done::Then(then)) = msg {
            then(false);
        }
    }
}

/// Records of failed commits that nobody was told are lost (those of `record` and
/// `record_then`, not of `write`, whose caller is told), in their order, to be
/// committed first with the next commit. Only state changes are kept so: their
/// statements are fixed, so that only the disk (full, failing, held) fails them.
#[derive(Default)]
struct Retained {
    records: VecDeque<Record>,
    bytes: usize,
}

impl Retained {
    /// What a record costs here: its kept output, or a little.
    fn cost(r: &Record) -> usize {
        match r {
            Record::Kept { output, .. } => 64 + output.iter().map(|(_, b)| b.len()).sum::<usize>(),
            _ => 64,
        }
    }

    /// Keeps the records of a commit that failed with `e`; the oldest kept go beyond
    /// the bounds.
    fn keep(&mut self, records: Vec<Record>, e: &str) {
        if records.is_empty() {
            return;
        }
        if self.records.is_empty() {
            log::error!("{e}; its records are kept to be written with the next commit");
        }
        for r in records {
            self.bytes += Retained::cost(&r);
            self.records.push_back(r);
        }
        let mut lost = 0;
        while self.records.len() > MAX_RETAINED_RECORDS || self.bytes > MAX_RETAINED_BYTES {
            let Some(r) = self.records.pop_front() else {
                break;
            };
            self.bytes -= Retained::cost(&r);
            lost += 1;
        }
        if lost > 0 {
            log::error!("{e}; {lost} records kept for the next commit were lost");
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

    fn record_then(&self, records: Vec<Record>, then: Option<super::Then>) {
        let done = then.map_or(Done::Nothing, Done::Then);
        if let Err(e) = self.tx.send(Msg::Records(records, done)) {
            log::debug!(
                "{}: the journal is closed; records were dropped",
                self.path.display()
            );
            if let Msg::Records(_, Done::Then(then)) = e.into_inner() {
                then(false);
            }
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

#[cfg(test)]
mod tests {
    use super::super::memory::State;
    use super::*;
    use std::io::BufRead;
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;

    /// A fresh private folder for one test.
    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("workpool-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const KEEP_ALL: Retention = Retention {
        keep_ended_for: Duration::from_secs(1 << 40),
        keep_ended: usize::MAX,
    };

    const DEADLINE: Duration = Duration::from_secs(30);

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(secs)
    }

    fn spec(script: &str) -> JobSpec {
        JobSpec::new(script)
            .priority(3)
            .env("A", "b")
            .timeout(Duration::from_secs(5))
            .require_tag("gpu")
    }

    fn remote(session: u64, request: u64, detached: bool) -> Submitter {
        Submitter::Remote {
            cert: Some(vec![session as u8; 3]),
            session,
            request,
            detached,
        }
    }

    fn accepted(id: u64, submitter: Submitter) -> Record {
        Record::Accepted {
            id: JobId(id),
            spec: spec(&format!("echo {id}")),
            submitter,
        }
    }

    /// Both journals, fed the same records at the same times.
    struct Twins {
        db: Db,
        state: State,
    }

    impl Twins {
        fn new(path: &Path) -> Twins {
            let db = Db::open(path).unwrap();
            let mut state = State::default();
            state.apply(Record::ManagerId(db.recovered().unwrap().manager_id), t(0));
            Twins { db, state }
        }

        fn commit(&mut self, records: &[Record], now: SystemTime) {
            self.db.commit(records, now).unwrap();
            for r in records {
                self.state.apply(r.clone(), now);
            }
            self.same();
        }

        fn compact(&mut self, now: SystemTime, retention: Retention) {
            self.db.compact(now, retention).unwrap();
            self.state.compact(now, retention);
            self.same();
        }

        /// Both give back the same, and hold as many jobs.
        fn same(&self) {
            let from_db = self.db.recovered().unwrap();
            assert_eq!(from_db, self.state.recovered(u64::MAX));
            let held: i64 = self
                .db
                .conn
                .query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))
                .unwrap();
            assert_eq!(held as usize, self.state.len());
        }
    }

    #[test]
    fn the_same_records_give_back_what_the_memory_journal_gives() {
        let dir = scratch("same");
        let path = dir.join("journal.db");
        let mut tw = Twins::new(&path);
        let w1 = Record::Worker {
            name: "w1".into(),
            cert: Some(vec![1, 2, 3]),
        };
        let w2 = Record::Worker {
            name: "w2".into(),
            cert: None,
        };
        tw.commit(
            &[
                Record::ManagerId(7), // a second id changes nothing
                accepted(1, Submitter::Local),
                accepted(2, remote(10, 1, false)),
                accepted(3, remote(10, 2, true)),
                accepted(4, remote(11, 1, true)),
                accepted(5, Submitter::Local),
                w1.clone(),
                w2,
            ],
            t(1),
        );
        tw.commit(
            &[
                Record::Sent {
                    id: JobId(1),
                    attempt: 1,
                    worker: "w1".into(),
                    ahead: false,
                },
                Record::Sent {
                    id: JobId(2),
                    attempt: 1,
                    worker: "w2".into(),
                    ahead: true,
                },
                Record::Started { id: JobId(2) },
                Record::Sent {
                    id: JobId(3),
                    attempt: 1,
                    worker: "gone".into(), // no Worker record: no certificate
                    ahead: false,
                },
                Record::Sent {
                    id: JobId(4),
                    attempt: 1,
                    worker: "w1".into(),
                    ahead: false,
                },
                Record::Queued {
                    id: JobId(1),
                    attempt: 2,
                },
                Record::Kept {
                    id: JobId(3),
                    output: vec![(Stream::Stdout, b"early".to_vec())],
                    dropped: 1,
                },
            ],
            t(2),
        );
        tw.commit(
            &[
                Record::Ended {
                    id: JobId(3),
                    outcome: Outcome::Exited(4),
                },
                Record::Kept {
                    id: JobId(3),
                    output: vec![
                        (Stream::Stdout, b"out".to_vec()),
                        (Stream::Stderr, b"err".to_vec()),
                        (Stream::Stdout, Vec::new()),
                    ],
                    dropped: 17,
                },
                Record::Ended {
                    id: JobId(4),
                    outcome: Outcome::Rejected("the manager stopped".into()),
                },
                Record::Ended {
                    id: JobId(5),
                    outcome: Outcome::Signaled(9),
                },
                // Once ended, a job stays as it ended.
                Record::Ended {
                    id: JobId(4),
                    outcome: Outcome::Cancelled,
                },
                Record::Sent {
                    id: JobId(5),
                    attempt: 2,
                    worker: "w1".into(),
                    ahead: false,
                },
                Record::Queued {
                    id: JobId(4),
                    attempt: 3,
                },
                // Records about jobs the journal does not hold change nothing.
                Record::Ended {
                    id: JobId(99),
                    outcome: Outcome::TimedOut,
                },
                Record::Kept {
                    id: JobId(98),
                    output: vec![(Stream::Stdout, b"x".to_vec())],
                    dropped: 0,
                },
                Record::Started { id: JobId(97) },
                // A worker that connects again with another certificate.
                Record::Worker {
                    name: "w1".into(),
                    cert: Some(vec![9]),
                },
            ],
            t(3),
        );
        for outcome in [
            Outcome::TimedOut,
            Outcome::WorkerLost,
            Outcome::SpawnFailed("no bash".into()),
            Outcome::Cancelled,
            Outcome::Exited(0),
        ] {
            let id = 20 + tw.state.len() as u64;
            tw.commit(
                &[
                    accepted(id, remote(12, id, true)),
                    Record::Ended {
                        id: JobId(id),
                        outcome,
                    },
                ],
                t(4),
            );
        }
        let back = tw.db.recovered().unwrap();
        assert_eq!(back.next_job, 30);
        assert_eq!(back.open.len(), 2);
        assert_eq!(
            back.open[1].place,
            Place::Sent {
                worker: "w2".into(),
                cert: None,
                ahead: false
            }
        );
        assert_eq!(back.ended_detached.len(), 7);
        assert_eq!(back.ended_detached[0].dropped, 17);

        // Compaction by count, then by time; then everything.
        tw.compact(
            t(5),
            Retention {
                keep_ended_for: Duration::from_secs(3600),
                keep_ended: 4,
            },
        );
        tw.compact(
            t(4_000),
            Retention {
                keep_ended_for: Duration::from_secs(0) + Duration::from_millis(3_997),
                keep_ended: 100,
            },
        );
        tw.compact(
            t(100_000),
            Retention {
                keep_ended_for: Duration::from_secs(1),
                keep_ended: 100,
            },
        );
        let kept: i64 = tw
            .db
            .conn
            .query_row("SELECT count(*) FROM kept_output", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kept, 0, "compacted jobs take their kept output along");

        // A reopened database gives back the same.
        drop(tw.db);
        tw.db = Db::open(&path).unwrap();
        tw.same();
    }

    /// A small deterministic generator (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn any_record(rng: &mut Rng, next_id: &mut u64) -> Record {
        let id = JobId(1 + rng.below(*next_id + 2));
        let worker = format!("w{}", rng.below(3));
        match rng.below(10) {
            0 | 1 => {
                // Mostly new ids; now and then one accepted again.
                let id = if rng.below(20) == 0 {
                    id.0
                } else {
                    *next_id += 1;
                    *next_id
                };
                let submitter = match rng.below(3) {
                    0 => Submitter::Local,
                    _ => remote(rng.below(4), rng.below(100), rng.below(2) == 0),
                };
                Record::Accepted {
                    id: JobId(id),
                    spec: spec(&format!("job {id}")).priority(rng.below(5) as i32 - 2),
                    submitter,
                }
            }
            2 => Record::Worker {
                name: worker,
                cert: (rng.below(2) == 0).then(|| vec![rng.below(256) as u8; 4]),
            },
            3 => Record::Sent {
                id,
                attempt: 1 + rng.below(3) as u32,
                worker,
                ahead: rng.below(2) == 0,
            },
            4 => Record::Started { id },
            5 => Record::Queued {
                id,
                attempt: 1 + rng.below(3) as u32,
            },
            6 | 7 => Record::Ended {
                id,
                outcome: match rng.below(4) {
                    0 => Outcome::Exited(rng.below(3) as i32),
                    1 => Outcome::Signaled(15),
                    2 => Outcome::WorkerLost,
                    _ => Outcome::Rejected(format!("r{}", rng.below(9))),
                },
            },
            8 => Record::Kept {
                id,
                output: (0..rng.below(3))
                    .map(|i| {
                        let s = if rng.below(2) == 0 {
                            Stream::Stdout
                        } else {
                            Stream::Stderr
                        };
                        (s, vec![i as u8; rng.below(40) as usize])
                    })
                    .collect(),
                dropped: rng.below(1000),
            },
            _ => Record::ManagerId(rng.next()),
        }
    }

    #[test]
    fn random_records_compactions_and_reopens_give_back_what_the_memory_journal_gives() {
        let dir = scratch("random");
        let path = dir.join("journal.db");
        let mut tw = Twins::new(&path);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut next_id = 0;
        let mut now = t(0);
        for round in 0..300 {
            let records: Vec<Record> = (0..1 + rng.below(8))
                .map(|_| any_record(&mut rng, &mut next_id))
                .collect();
            now += Duration::from_millis(rng.below(3_000));
            tw.commit(&records, now);
            if rng.below(4) == 0 {
                let retention = Retention {
                    keep_ended_for: Duration::from_millis(2_000 + rng.below(20_000)),
                    keep_ended: rng.below(6) as usize,
                };
                tw.compact(now, retention);
            }
            if round % 50 == 49 {
                drop(tw.db);
                tw.db = Db::open(&path).unwrap();
                tw.same();
            }
        }
        assert!(next_id > 30, "the run accepted jobs");
    }

    #[test]
    fn a_reopened_journal_gives_back_what_was_written_and_ids_continue_past_compaction() {
        let dir = scratch("reopen");
        let path = dir.join("journal.db");
        let (j, first) = open(&path, KEEP_ALL).unwrap();
        assert_eq!(first.next_job, 1);
        assert!(first.open.is_empty() && first.ended_detached.is_empty());
        let before = SystemTime::now();
        j.write(vec![
            accepted(1, Submitter::Local),
            accepted(2, remote(5, 1, true)),
            accepted(3, remote(5, 2, false)),
        ])
        .unwrap();
        j.record(vec![
            Record::Worker {
                name: "w".into(),
                cert: Some(vec![4]),
            },
            Record::Sent {
                id: JobId(3),
                attempt: 1,
                worker: "w".into(),
                ahead: false,
            },
            Record::Ended {
                id: JobId(2),
                outcome: Outcome::Exited(0),
            },
            Record::Kept {
                id: JobId(2),
                output: vec![(Stream::Stdout, b"hello\n".to_vec())],
                dropped: 0,
            },
        ]);
        j.close();
        let after = SystemTime::now();
        let err = j.write(vec![accepted(4, Submitter::Local)]).unwrap_err();
        assert!(err.to_string().contains("closed"), "{err}");
        drop(j);

        let (j, back) = open(&path, KEEP_ALL).unwrap();
        assert_eq!(back.manager_id, first.manager_id);
        assert_eq!(back.next_job, 4);
        assert_eq!(
            back.open,
            vec![
                OpenJob {
                    id: JobId(1),
                    spec: spec("echo 1"),
                    submitter: Submitter::Local,
                    attempt: 1,
                    place: Place::Queued,
                },
                OpenJob {
                    id: JobId(3),
                    spec: spec("echo 3"),
                    submitter: remote(5, 2, false),
                    attempt: 1,
                    place: Place::Sent {
                        worker: "w".into(),
                        cert: Some(vec![4]),
                        ahead: false
                    },
                },
            ]
        );
        assert_eq!(back.ended_detached.len(), 1);
        let e = &back.ended_detached[0];
        assert_eq!(
            (e.id, &e.outcome, &e.output[..]),
            (
                JobId(2),
                &Outcome::Exited(0),
                &[(Stream::Stdout, b"hello\n".to_vec())][..]
            )
        );
        assert!(before <= e.ended_at && e.ended_at <= after);
        assert_eq!(
            back.remote_requests,
            vec![(5, 1, JobId(2)), (5, 2, JobId(3))]
        );
        // Every job ends; the highest id is then compacted away.
        j.write(vec![
            Record::Ended {
                id: JobId(1),
                outcome: Outcome::Cancelled,
            },
            Record::Ended {
                id: JobId(3),
                outcome: Outcome::WorkerLost,
            },
        ])
        .unwrap();
        drop(j);
        let forget_all = Retention {
            keep_ended_for: Duration::from_secs(3600),
            keep_ended: 0,
        };
        let (j, back) = open(&path, forget_all).unwrap();
        assert_eq!(back.manager_id, first.manager_id);
        assert!(back.open.is_empty() && back.ended_detached.is_empty());
        assert!(back.remote_requests.is_empty());
        assert_eq!(back.next_job, 4, "ids continue past compacted jobs");
        drop(j);
        let rows: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
    }

    #[test]
    fn a_new_journal_and_its_files_are_private_to_their_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("private");
        let path = dir.join("journal.db");
        let (j, _) = open(&path, KEEP_ALL).unwrap();
        j.write(vec![accepted(1, Submitter::Local)]).unwrap();
        for suffix in ["", "-wal", "-shm", ".lock"] {
            let file = with_suffix(&path, suffix);
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{}: mode {mode:o}", file.display());
        }
        // An empty file made beforehand for it, readable by all, is made private too.
        let made = dir.join("made.db");
        std::fs::write(&made, b"").unwrap();
        std::fs::set_permissions(&made, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (j, _) = open(&made, KEEP_ALL).unwrap();
        j.write(vec![accepted(1, Submitter::Local)]).unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let file = with_suffix(&made, suffix);
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{}: mode {mode:o}", file.display());
        }
    }

    #[test]
    fn what_follows_recorded_records_runs_once_they_are_on_disk() {
        let dir = scratch("then");
        let path = dir.join("journal.db");
        let (j, _) = open(&path, KEEP_ALL).unwrap();
        let (tx, rx) = mpsc::channel();
        let reader_path = path.clone();
        j.record_then(
            vec![
                accepted(1, Submitter::Local),
                Record::Ended {
                    id: JobId(1),
                    outcome: Outcome::Exited(0),
                },
            ],
            Some(Box::new(move |durable| {
                assert!(durable);
                // What another connection sees at that moment.
                let state: String = Connection::open(&reader_path)
                    .unwrap()
                    .query_row("SELECT state FROM jobs WHERE id = 1", [], |r| r.get(0))
                    .unwrap();
                tx.send(state).unwrap();
            })),
        );
        assert_eq!(rx.recv_timeout(DEADLINE).unwrap(), "ended");
    }

    #[test]
    fn state_changes_of_a_failed_commit_are_kept_and_committed_with_the_next() {
        let dir = scratch("failed-commit");
        let path = dir.join("journal.db");
        let (j, _) = open(&path, KEEP_ALL).unwrap();
        j.write(vec![
            accepted(1, Submitter::Local),
            accepted(2, Submitter::Local),
        ])
        .unwrap();
        // An operator's write transaction holds the database past the busy timeout:
        // the next commit fails.
        let operator = Connection::open(&path).unwrap();
        operator.execute_batch("BEGIN IMMEDIATE").unwrap();
        let (tx, rx) = mpsc::channel();
        j.record_then(
            vec![Record::Sent {
                id: JobId(1),
                attempt: 1,
                worker: "w".into(),
                ahead: false,
            }],
            Some(Box::new(move |durable| tx.send(durable).unwrap())),
        );
        j.record(vec![Record::Ended {
            id: JobId(2),
            outcome: Outcome::Exited(0),
        }]);
        let refused = j.write(vec![accepted(3, Submitter::Local)]);
        assert!(refused.is_err(), "the database is held");
        assert_eq!(rx.recv_timeout(DEADLINE), Ok(false), "told it did not hold");
        operator.execute_batch("ROLLBACK").unwrap();
        // The next commit carries what the failed one lost: job 1 went to its worker
        // (its run was sent all the same), job 2 ended; job 3 was refused.
        j.write(vec![accepted(4, Submitter::Local)]).unwrap();
        // What a failed commit left is written at the close as well.
        operator.execute_batch("BEGIN IMMEDIATE").unwrap();
        let (tx, rx) = mpsc::channel();
        j.record_then(
            vec![Record::Ended {
                id: JobId(4),
                outcome: Outcome::Exited(0),
            }],
            Some(Box::new(move |durable| tx.send(durable).unwrap())),
        );
        assert_eq!(rx.recv_timeout(DEADLINE), Ok(false));
        operator.execute_batch("ROLLBACK").unwrap();
        j.close();
        let (_j, back) = open(&path, KEEP_ALL).unwrap();
        let open: Vec<(u64, Place)> = back
            .open
            .iter()
            .map(|o| (o.id.0, o.place.clone()))
            .collect();
        assert_eq!(
            open,
            vec![(
                1,
                Place::Sent {
                    worker: "w".into(),
                    cert: None,
                    ahead: false
                }
            )]
        );
    }

    #[test]
    fn writers_waiting_at_the_same_time_share_one_commit_and_all_are_durable() {
        let dir = scratch("group");
        let path = dir.join("journal.db");
        let (j, _) = SqliteJournal::open(&path, KEEP_ALL).unwrap();
        let j = Arc::new(j);
        // Hold the database's write lock, as an operator's transaction would: the
        // writer takes the first record and waits for the lock.
        let gate = Connection::open(&path).unwrap();
        gate.execute_batch("BEGIN IMMEDIATE").unwrap();
        j.record(vec![accepted(1, Submitter::Local)]);
        wait_until("the writer takes the first record", || j.waiting() == 0);
        let writers: Vec<_> = (0..16u64)
            .map(|i| {
                let j = j.clone();
                std::thread::spawn(move || {
                    j.write(vec![
                        accepted(100 + i, remote(i, 1, false)),
                        Record::Queued {
                            id: JobId(100 + i),
                            attempt: 1,
                        },
                    ])
                })
            })
            .collect();
        wait_until("all 16 writers wait", || j.waiting() == 16);
        gate.execute_batch("COMMIT").unwrap();
        for w in writers {
            w.join().unwrap().unwrap();
        }
        assert_eq!(
            j.commits(),
            2,
            "the first record, then all 16 writes at once"
        );
        j.close();
        drop(j);
        let (_j, back) = open(&path, KEEP_ALL).unwrap();
        let ids: Vec<u64> = back.open.iter().map(|o| o.id.0).collect();
        let want: Vec<u64> = std::iter::once(1).chain(100..116).collect();
        assert_eq!(ids, want);
    }

    #[test]
    fn many_threads_writing_at_once_all_return_and_all_are_kept() {
        let dir = scratch("many");
        let path = dir.join("journal.db");
        let (j, _) = open(&path, KEEP_ALL).unwrap();
        let threads = 32u64;
        let each = 25u64;
        let writers: Vec<_> = (0..threads)
            .map(|t| {
                let j = j.clone();
                std::thread::spawn(move || {
                    for n in 0..each {
                        let id = 1 + t * each + n;
                        j.write(vec![accepted(id, Submitter::Local)]).unwrap();
                        j.record(vec![Record::Sent {
                            id: JobId(id),
                            attempt: 1,
                            worker: format!("w{t}"),
                            ahead: false,
                        }]);
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        j.close();
        drop(j);
        let (_j, back) = open(&path, KEEP_ALL).unwrap();
        assert_eq!(back.open.len() as u64, threads * each);
        assert_eq!(back.next_job, threads * each + 1);
        for (i, o) in back.open.iter().enumerate() {
            assert_eq!(o.id, JobId(i as u64 + 1));
            assert!(matches!(&o.place, Place::Sent { worker, .. }
                if *worker == format!("w{}", i as u64 / each)));
        }
    }

    #[test]
    fn a_detached_job_s_end_is_not_compacted_away_by_the_count_of_other_ends() {
        let dir = scratch("compact-detached");
        let mut tw = Twins::new(&dir.join("journal.db"));
        let retention = Retention {
            keep_ended_for: Duration::from_secs(3600),
            keep_ended: 2,
        };
        let end = |id: u64| Record::Ended {
            id: JobId(id),
            outcome: Outcome::Exited(0),
        };
        // A detached job ends, kept for a later attach; then many ordinary jobs end.
        tw.commit(&[accepted(1, remote(40, 0, true)), end(1)], t(1));
        for id in 2..=5 {
            tw.commit(&[accepted(id, Submitter::Local), end(id)], t(id));
            tw.compact(t(id), retention);
        }
        let r = tw.db.recovered().unwrap();
        let kept: Vec<JobId> = r.ended_detached.iter().map(|e| e.id).collect();
        assert_eq!(kept, vec![JobId(1)], "its end can still be attached to");
        let held: i64 = tw
            .db
            .conn
            .query_row(
                "SELECT count(*) FROM jobs WHERE submitter = 'local'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(held, 2, "the others are kept to the count");
        // Detached ends have their own count.
        for id in 6..=8 {
            tw.commit(&[accepted(id, remote(40, id, true)), end(id)], t(id));
            tw.compact(t(id), retention);
        }
        let r = tw.db.recovered().unwrap();
        let kept: Vec<JobId> = r.ended_detached.iter().map(|e| e.id).collect();
        assert_eq!(kept, vec![JobId(7), JobId(8)]);
    }

    /// Writes jobs 1..=10 ended and job 11 open through a journal with `retention`, in
    /// one write (so that no compaction comes between them); returns a reader of its
    /// database.
    fn ten_ended_one_open(path: &Path, retention: Retention) -> (Arc<dyn Journal>, Connection) {
        let (j, _) = open(path, retention).unwrap();
        let mut records = Vec::new();
        for id in 1..=10 {
            records.push(accepted(id, Submitter::Local));
            records.push(Record::Ended {
                id: JobId(id),
                outcome: Outcome::Exited(0),
            });
        }
        records.push(accepted(11, Submitter::Local));
        j.write(records).unwrap();
        (j, Connection::open(path).unwrap())
    }

    fn ids(reader: &Connection, state: &str) -> String {
        reader
            .query_row(
                "SELECT coalesce(group_concat(id), '') FROM \
                 (SELECT id FROM jobs WHERE state = ?1 ORDER BY id)",
                [state],
                |r| r.get(0),
            )
            .unwrap()
    }

    #[test]
    fn the_writer_compacts_ended_jobs_by_count_on_its_own() {
        let dir = scratch("compact-count");
        let retention = Retention {
            keep_ended_for: Duration::from_secs(3600),
            keep_ended: 3,
        };
        let (_j, reader) = ten_ended_one_open(&dir.join("journal.db"), retention);
        wait_until("three ended jobs are left", || {
            ids(&reader, "ended") != "1,2,3,4,5,6,7,8,9,10"
        });
        assert_eq!(ids(&reader, "ended"), "8,9,10", "the latest ends are kept");
        assert_eq!(ids(&reader, "queued"), "11", "the open job stays");
    }

    #[test]
    fn the_writer_compacts_ended_jobs_by_age_on_its_own() {
        let dir = scratch("compact-age");
        let retention = Retention {
            keep_ended_for: Duration::from_secs(1),
            keep_ended: 100,
        };
        let (_j, reader) = ten_ended_one_open(&dir.join("journal.db"), retention);
        wait_until("ended jobs expire", || ids(&reader, "ended").is_empty());
        assert_eq!(ids(&reader, "queued"), "11", "the open job stays");
    }

    #[test]
    fn compacted_space_is_reused_so_the_file_stays_bounded() {
        let dir = scratch("bounded");
        let path = dir.join("journal.db");
        let mut db = Db::open(&path).unwrap();
        let retention = Retention {
            keep_ended_for: Duration::from_secs(3600),
            keep_ended: 200,
        };
        let pages = |db: &Db| -> i64 {
            db.conn
                .pragma_query_value(None, "page_count", |r| r.get(0))
                .unwrap()
        };
        let mut id = 0;
        let mut after_round = Vec::new();
        for round in 0..6 {
            for _ in 0..20 {
                let mut records = Vec::new();
                for _ in 0..100 {
                    id += 1;
                    records.push(accepted(id, remote(1, id, true)));
                    records.push(Record::Ended {
                        id: JobId(id),
                        outcome: Outcome::Exited(0),
                    });
                    records.push(Record::Kept {
                        id: JobId(id),
                        output: vec![(Stream::Stdout, vec![b'x'; 300])],
                        dropped: 0,
                    });
                }
                db.commit(&records, t(round * 100 + id)).unwrap();
            }
            db.compact(t(round * 100 + id), retention).unwrap();
            after_round.push(pages(&db));
        }
        // 2,000 jobs a round, 200 kept: every round after the first reuses its pages.
        let first = after_round[0];
        assert!(
            after_round.iter().all(|&p| p <= first + first / 10),
            "pages after each round: {after_round:?}"
        );
        let back = db.recovered().unwrap();
        assert_eq!(back.ended_detached.len(), 200);
        assert_eq!(back.next_job, id + 1);
    }

    #[test]
    fn a_compaction_that_frees_a_quarter_of_the_file_gives_the_free_pages_back() {
        let dir = scratch("give-back");
        let path = dir.join("journal.db");
        let mut db = Db::open(&path).unwrap();
        let pragma = |db: &Db, name: &str| -> i64 {
            db.conn
                .pragma_query_value(None, name, |r| r.get(0))
                .unwrap()
        };
        // A burst of 2,000 ended detached jobs with some kept output each.
        let mut records = Vec::new();
        for id in 1..=2000u64 {
            records.push(accepted(id, remote(1, id, true)));
            records.push(Record::Ended {
                id: JobId(id),
                outcome: Outcome::Exited(0),
            });
            records.push(Record::Kept {
                id: JobId(id),
                output: vec![(Stream::Stdout, vec![b'x'; 300])],
                dropped: 0,
            });
        }
        db.commit(&records, t(1)).unwrap();
        let before = pragma(&db, "page_count");
        let retention = Retention {
            keep_ended_for: Duration::from_secs(3600),
            keep_ended: 10,
        };
        db.compact(t(2), retention).unwrap();
        let (after, free) = (pragma(&db, "page_count"), pragma(&db, "freelist_count"));
        assert!(
            after * 4 < before && free == 0,
            "pages {before} before, {after} after ({free} free)"
        );
        assert_eq!(db.recovered().unwrap().ended_detached.len(), 10);
    }

    #[test]
    fn the_writer_thread_stack_holds_what_sqlite_needs() {
        let dir = scratch("stack");
        let path = dir.join("journal.db");
        let (used, limit) = crate::thread::spawn("wp-journal-test", move || {
            let mut db = Db::open(&path).unwrap();
            let mut records = Vec::new();
            for id in 1..=500u64 {
                records.push(accepted(id, remote(1, id, true)));
                records.push(Record::Ended {
                    id: JobId(id),
                    outcome: Outcome::SpawnFailed("x".repeat(100)),
                });
                records.push(Record::Kept {
                    id: JobId(id),
                    output: vec![(Stream::Stderr, vec![7; 2000])],
                    dropped: 0,
                });
            }
            db.commit(&records, t(1)).unwrap();
            db.compact(
                t(2),
                Retention {
                    keep_ended_for: Duration::from_secs(60),
                    keep_ended: 10,
                },
            )
            .unwrap();
            db.recovered().unwrap();
            drop(db);
            Db::open(&path).unwrap().recovered().unwrap();
            (
                crate::thread::stack_use_here().1,
                crate::thread::Stack::Full.bytes(),
            )
        })
        .unwrap()
        .join()
        .unwrap();
        assert!(
            used * 3 <= limit,
            "the journal's work touched {used} bytes of a {limit}-byte stack"
        );
    }

    fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The error opening `path` gives; checks that it is one line naming the file and
    /// that the file was left as it was.
    fn open_error(path: &Path) -> String {
        let before = std::fs::read(path).unwrap();
        let err = match open(path, KEEP_ALL) {
            Ok(_) => panic!("{} opened", path.display()),
            Err(Error::Journal(m)) => m,
            Err(e) => panic!("not a journal error: {e}"),
        };
        assert!(!err.contains('\n'), "one line: {err:?}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert_eq!(std::fs::read(path).unwrap(), before, "{err}: file changed");
        err
    }

    /// A closed journal holding 300 jobs.
    fn journal_with_jobs(path: &Path) {
        let (j, _) = open(path, KEEP_ALL).unwrap();
        j.write((1..=300).map(|id| accepted(id, Submitter::Local)).collect())
            .unwrap();
        j.close();
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused_and_left_as_it_is() {
        let dir = scratch("garbage");
        let path = dir.join("journal.db");
        std::fs::write(
            &path,
            b"these are not the bytes of a database\n".repeat(200),
        )
        .unwrap();
        let err = open_error(&path);
        assert!(err.contains("is corrupt"), "{err}");
        assert!(!with_suffix(&path, "-wal").exists());
    }

    #[test]
    fn a_damaged_page_is_refused_and_left_as_it_is() {
        let dir = scratch("damaged");
        let path = dir.join("journal.db");
        journal_with_jobs(&path);
        let mut bytes = std::fs::read(&path).unwrap();
        let page = 4096;
        assert!(bytes.len() >= 6 * page, "{} bytes", bytes.len());
        for b in &mut bytes[3 * page..4 * page] {
            *b = 0x5a;
        }
        std::fs::write(&path, &bytes).unwrap();
        let err = open_error(&path);
        assert!(err.contains("is corrupt"), "{err}");
    }

    #[test]
    fn another_applications_database_is_refused_and_left_as_it_is() {
        let dir = scratch("foreign");
        let path = dir.join("journal.db");
        let other = Connection::open(&path).unwrap();
        other
            .execute_batch("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO photos (name) VALUES ('cat');")
            .unwrap();
        drop(other);
        let err = open_error(&path);
        assert!(err.contains("not a workpool journal"), "{err}");
    }

    #[test]
    fn a_journal_from_a_newer_version_is_refused_and_left_as_it_is() {
        let dir = scratch("newer");
        let path = dir.join("journal.db");
        journal_with_jobs(&path);
        let c = Connection::open(&path).unwrap();
        c.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'format'",
            [FORMAT + 1],
        )
        .unwrap();
        drop(c);
        let err = open_error(&path);
        assert!(err.contains("newer version"), "{err}");
        assert!(err.contains(&format!("format {}", FORMAT + 1)), "{err}");
    }

    #[test]
    fn a_row_that_cannot_be_read_back_is_refused() {
        let dir = scratch("badrow");
        let path = dir.join("journal.db");
        journal_with_jobs(&path);
        let c = Connection::open(&path).unwrap();
        c.execute("UPDATE jobs SET spec = x'ff00ff' WHERE id = 7", [])
            .unwrap();
        drop(c);
        let err = open_error(&path);
        assert!(err.contains("is corrupt") && err.contains("job 7"), "{err}");
    }

    #[test]
    fn a_journal_open_in_this_process_is_refused_until_it_is_closed() {
        let dir = scratch("locked");
        let path = dir.join("journal.db");
        let (j, first) = open(&path, KEEP_ALL).unwrap();
        j.write(vec![accepted(1, Submitter::Local)]).unwrap();
        let err = match open(&path, KEEP_ALL) {
            Ok(_) => panic!("opened twice"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("in use by another manager (in this process)"),
            "{err}"
        );
        assert!(err.contains(&path.display().to_string()) && !err.contains('\n'));
        // The first is untouched and goes on working.
        j.write(vec![accepted(2, Submitter::Local)]).unwrap();
        j.close();
        let (j2, back) = open(&path, KEEP_ALL).unwrap();
        assert_eq!(back.manager_id, first.manager_id);
        assert_eq!(back.open.len(), 2);
        drop(j2);
        // Dropping it lets the next one in too.
        let (_j3, back) = open(&path, KEEP_ALL).unwrap();
        assert_eq!(back.open.len(), 2);
    }

    #[test]
    fn a_journal_in_use_is_refused_under_another_name_for_it() {
        let dir = scratch("locked-other-name");
        let path = dir.join("journal.db");
        let (j, _) = open(&path, KEEP_ALL).unwrap();
        j.write(vec![accepted(1, Submitter::Local)]).unwrap();
        // A symbolic link to it, and a path through a symbolic link to its folder.
        let link = dir.join("link.db");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let folder = scratch("locked-other-name-folder");
        let _ = std::fs::remove_dir(&folder);
        std::os::unix::fs::symlink(&dir, &folder).unwrap();
        for other in [link, folder.join("journal.db")] {
            match open(&other, KEEP_ALL) {
                Ok(_) => panic!("{} opened while in use", other.display()),
                Err(e) => assert!(e.to_string().contains("in use by another manager"), "{e}"),
            }
        }
    }

    /// A child process running [`child_process`] in `mode` on `path`, its output lines
    /// coming through a channel.
    struct ChildRun {
        child: Child,
        lines: mpsc::Receiver<String>,
    }

    impl ChildRun {
        fn start(mode: &str, path: &Path) -> ChildRun {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args([
                    "journal::sqlite::tests::child_process",
                    "--exact",
                    "--include-ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("WP_JOURNAL_TEST_CHILD", mode)
                .env("WP_JOURNAL_TEST_PATH", path)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let out = child.stdout.take().unwrap();
            let (tx, lines) = mpsc::channel();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            ChildRun { child, lines }
        }

        /// Waits for a line holding `prefix` (the test harness may have written on the
        /// same line before it); returns what follows it.
        fn expect(&self, prefix: &str) -> String {
            let deadline = Instant::now() + DEADLINE;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.lines.recv_timeout(left) {
                    Ok(line) => {
                        if let Some((_, rest)) = line.split_once(prefix) {
                            return rest.to_owned();
                        }
                    }
                    Err(e) => panic!("no line {prefix:?} from the child: {e}"),
                }
            }
        }

        fn wait(mut self) -> std::process::ExitStatus {
            drop(self.child.stdin.take());
            let deadline = Instant::now() + DEADLINE;
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return status;
                }
                if Instant::now() >= deadline {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!("the child did not end");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// What the tests below run in a child process (nothing without
    /// `WP_JOURNAL_TEST_CHILD`).
    #[test]
    #[ignore = "the child process of other tests"]
    fn child_process() {
        let (Ok(mode), Some(path)) = (
            std::env::var("WP_JOURNAL_TEST_CHILD"),
            std::env::var_os("WP_JOURNAL_TEST_PATH"),
        ) else {
            return;
        };
        let path = PathBuf::from(path);
        match mode.as_str() {
            "hold" => {
                let (_j, _) = open(&path, KEEP_ALL).unwrap();
                println!("child: open");
                // Until the parent closes our stdin.
                let _ = std::io::stdin().read_to_end(&mut Vec::new());
            }
            "crash" => {
                let (j, _) = open(&path, KEEP_ALL).unwrap();
                for id in 1..=50 {
                    j.write(vec![accepted(id, Submitter::Local)]).unwrap();
                }
                println!("child: written");
                // SAFETY: sends a signal to this process; no memory is involved.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
            }
            "full" => full_disk_child(&path),
            other => panic!("unknown child mode {other}"),
        }
    }

    #[test]
    fn a_journal_in_use_by_another_process_is_refused_and_taken_once_it_has_gone() {
        let dir = scratch("other-process");
        let path = dir.join("journal.db");
        let holder = ChildRun::start("hold", &path);
        holder.expect("child: open");
        let pid = holder.child.id();
        let err = match open(&path, KEEP_ALL) {
            Ok(_) => panic!("opened while another process holds it"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(&format!("in use by another manager (process {pid})")),
            "{err}"
        );
        assert!(holder.wait().success());
        let (_j, back) = open(&path, KEEP_ALL).unwrap();
        assert!(back.open.is_empty());
    }

    #[test]
    fn a_write_that_returned_survives_the_process_being_killed() {
        let dir = scratch("crash");
        let path = dir.join("journal.db");
        let child = ChildRun::start("crash", &path);
        child.expect("child: written");
        let status = child.wait();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
        let (_j, back) = open(&path, KEEP_ALL).unwrap();
        let ids: Vec<u64> = back.open.iter().map(|o| o.id.0).collect();
        assert_eq!(ids, (1..=50).collect::<Vec<_>>());
        assert_eq!(back.next_job, 51);
    }

    /// In a child process (the file size limit is the whole process's): fills the
    /// "disk" with `RLIMIT_FSIZE`, checks the error, gives space back, writes again.
    /// SIGXFSZ keeps its default action (ending the process): the journal's writes
    /// must not raise it.
    fn full_disk_child(path: &Path) {
        let (j, _) = open(path, KEEP_ALL).unwrap();
        j.write(vec![accepted(1, Submitter::Local)]).unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `limit` is a valid rlimit for the call to fill.
        let read = unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit) };
        assert_eq!(read, 0);
        let original = limit;
        let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let biggest = len(path).max(len(&with_suffix(path, "-wal")));
        limit.rlim_cur = biggest + (64 << 10);
        // SAFETY: `limit` is a valid rlimit; the soft limit is below the hard one.
        let set = unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limit) };
        assert_eq!(set, 0);
        let big = |id: u64| Record::Accepted {
            id: JobId(id),
            spec: JobSpec::new("cat").stdin(vec![b'z'; 16 << 10]),
            submitter: Submitter::Local,
        };
        let mut failed = None;
        for id in 2..100 {
            if let Err(e) = j.write(vec![big(id)]) {
                failed = Some((id, e.to_string()));
                break;
            }
        }
        let (failed_id, err) = failed.expect("a write failed once the file could not grow");
        assert!(err.contains("disk is full"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(!err.contains('\n'), "{err}");
        // What was to follow the commit of records nobody waits for is told they are
        // not durable; the records are kept to be written with the next commit that
        // holds; nothing else breaks.
        let followed = Arc::new(std::sync::atomic::AtomicU8::new(0));
        let f = followed.clone();
        j.record_then(
            vec![big(failed_id + 1)],
            Some(Box::new(move |durable| {
                f.store(if durable { 1 } else { 2 }, Ordering::SeqCst)
            })),
        );
        let again = j.write(vec![big(failed_id + 2)]);
        assert!(again.is_err(), "the disk is still full");
        assert_eq!(
            followed.load(Ordering::SeqCst),
            2,
            "run after the failed commit, told it did not hold"
        );
        // Space comes back: the same journal works again.
        // SAFETY: `original` is the rlimit read above.
        let set = unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &original) };
        assert_eq!(set, 0);
        j.write(vec![big(failed_id + 3)]).unwrap();
        j.close();
        let (_j, back) = open(path, KEEP_ALL).unwrap();
        let ids: Vec<u64> = back.open.iter().map(|o| o.id.0).collect();
        let mut want: Vec<u64> = (1..failed_id).collect();
        want.push(failed_id + 1);
        want.push(failed_id + 3);
        assert_eq!(ids, want);
        assert_eq!(back.next_job, failed_id + 4);
        println!("child: full disk checked: write {failed_id} failed with: {err}");
    }

    #[test]
    fn a_full_disk_fails_the_write_with_a_clear_error_and_the_journal_works_again_after() {
        let dir = scratch("full");
        let path = dir.join("journal.db");
        let child = ChildRun::start("full", &path);
        let said = child.expect("child: full disk checked: ");
        assert!(said.contains("disk is full"), "{said}");
        assert!(child.wait().success());
    }
}

/// Figures for docs/PERFORMANCE.md ("The journal"):
/// `cargo test --release --lib journal::sqlite::measure -- --ignored --nocapture`.
#[cfg(test)]
mod measure {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "workpool-journal-measure-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A spec of about 200 bytes once encoded, as a typical job's.
    fn spec(id: u64) -> JobSpec {
        JobSpec::new(format!(
            "./run-step --input data/{id}.csv --output out/{id}.json --verbose"
        ))
        .env("RUN", "nightly")
        .env("STAGE", "transform")
        .require_tag("linux")
        .timeout(Duration::from_secs(600))
        .retries(1)
    }

    /// The manager's default retention.
    const RETENTION: Retention = Retention {
        keep_ended_for: Duration::from_secs(3600),
        keep_ended: 10_000,
    };

    /// `threads` submitters for `secs`: each writes a job's `Accepted` and waits for it
    /// to be durable, then records its `Sent` and `Ended` (as the dispatcher and the
    /// sink do). Returns durable submits per second.
    fn submits(threads: u64, secs: f64) -> f64 {
        let dir = scratch(&format!("submits-{threads}"));
        let path = dir.join("journal.db");
        let (j, _) = open(&path, RETENTION).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicU64::new(1));
        let start = Instant::now();
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (j, stop, next) = (j.clone(), stop.clone(), next.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let id = JobId(next.fetch_add(1, Ordering::Relaxed));
                        j.write(vec![Record::Accepted {
                            id,
                            spec: spec(id.0),
                            submitter: Submitter::Local,
                        }])
                        .unwrap();
                        j.record(vec![
                            Record::Sent {
                                id,
                                attempt: 1,
                                worker: format!("worker-{t}"),
                                ahead: false,
                            },
                            Record::Ended {
                                id,
                                outcome: Outcome::Exited(0),
                            },
                        ]);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        let done: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
        let rate = done as f64 / start.elapsed().as_secs_f64();
        j.close();
        drop(j);
        // Every job whose write returned is there.
        let (_j, back) = open(&path, KEEP_EVERYTHING).unwrap();
        assert_eq!(back.next_job, next.load(Ordering::Relaxed));
        let _ = std::fs::remove_dir_all(&dir);
        rate
    }

    const KEEP_EVERYTHING: Retention = Retention {
        keep_ended_for: Duration::from_secs(1 << 40),
        keep_ended: usize::MAX,
    };

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    }

    #[test]
    #[ignore = "a measurement: run by hand in release"]
    fn measure() {
        let runs = 3;
        let secs = 3.0;
        println!("durable submits/s, median of {runs} runs of {secs} s:");
        for threads in [1, 16, 64] {
            let all: Vec<f64> = (0..runs).map(|_| submits(threads, secs)).collect();
            println!(
                "  {threads:>2} threads: {:.0}  (runs: {})",
                median(all.clone()),
                all.iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }

        // 100,000 jobs through their end, with the default retention (10,000 ended
        // jobs for an hour), in writes of 1,000 jobs.
        let dir = scratch("bytes");
        let path = dir.join("journal.db");
        let jobs = 100_000u64;
        let (j, _) = open(&path, RETENTION).unwrap();
        for first in (1..=jobs).step_by(1000) {
            let mut records = Vec::new();
            for id in (first..first + 1000).map(JobId) {
                records.push(Record::Accepted {
                    id,
                    spec: spec(id.0),
                    submitter: Submitter::Local,
                });
                records.push(Record::Sent {
                    id,
                    attempt: 1,
                    worker: "worker-1".into(),
                    ahead: false,
                });
                records.push(Record::Ended {
                    id,
                    outcome: Outcome::Exited(0),
                });
            }
            j.write(records).unwrap();
        }
        let live = j.size_bytes();
        j.close();
        drop(j);
        // Opening compacts what the writer had not yet.
        let (j, back) = open(&path, RETENTION).unwrap();
        assert_eq!(back.next_job, jobs + 1);
        j.close();
        drop(j);
        let held: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(held as usize, RETENTION.keep_ended);
        let size = std::fs::metadata(&path).unwrap().len();
        println!(
            "{jobs} jobs ended, {held} kept: {size} bytes on disk after compaction \
             ({:.0} bytes per finished job kept; {live} bytes with the WAL while running)",
            size as f64 / held as f64
        );

        // Opening a journal with 100,000 queued jobs.
        let dir = scratch("queued");
        let path = dir.join("journal.db");
        let (j, _) = open(&path, RETENTION).unwrap();
        for first in (1..=jobs).step_by(1000) {
            j.write(
                (first..first + 1000)
                    .map(|id| Record::Accepted {
                        id: JobId(id),
                        spec: spec(id),
                        submitter: Submitter::Local,
                    })
                    .collect(),
            )
            .unwrap();
        }
        j.close();
        drop(j);
        let size = std::fs::metadata(&path).unwrap().len();
        let mut times = Vec::new();
        for _ in 0..runs {
            let started = Instant::now();
            let (j, back) = open(&path, RETENTION).unwrap();
            times.push(started.elapsed().as_secs_f64());
            assert_eq!(back.open.len() as u64, jobs);
            drop(j);
        }
        println!(
            "opening {jobs} queued jobs ({size} bytes): {:.3} s (median of {runs})",
            median(times)
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
