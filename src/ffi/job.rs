//! Jobs after submission: the `wp_job` handle (a `JobHandle` of a job submitted in
//! process, or a `RemoteJob` of one submitted or attached through a client: events,
//! wait, cancel), what a wait returns (`wp_job_result`, a `JobResult`), and where an
//! unfinished job is (`wp_job_status`, a `JobStatus`, alone or in a `wp_job_list`).

use super::common::wp_result::*;
use super::common::*;
use super::events::{job_event, outcome_parts, wp_event, wp_outcome};
use crate::client::RemoteJob;
use crate::job::{JobEvent, JobId, JobResult, JobState, JobStatus, Outcome};
use crate::manager::JobHandle;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::ffi::{CString, c_char};
use std::time::Duration;

/// A submitted job, local or remote: the same functions serve both. Made by
/// `wp_manager_submit` or `wp_manager_submit_spec` (a job of this process's manager), or
/// by `wp_client_submit`, `wp_client_submit_spec`, `wp_client_submit_array` or
/// `wp_client_attach` (a job of a remote manager, followed through a client);
/// `wp_job_free`, called once, forgets it (the job itself goes on; cancel it first if it
/// should not). Threads: one call at a time on a job (`wp_job_next_event` hands out
/// bytes that live in the handle), though the thread may change from call to call;
/// different jobs may be used at once.
pub struct wp_job {
    inner: Handle,
    /// The bytes of the last event handed out.
    data: Vec<u8>,
    /// Its end was delivered, as `WP_EVENT_FINISHED` or as a result.
    ended: bool,
}

/// What a `wp_job` follows.
enum Handle {
    Local(JobHandle),
    Remote(RemoteJob),
}

impl Handle {
    fn id(&self) -> JobId {
        match self {
            Handle::Local(h) => h.id(),
            Handle::Remote(h) => h.id(),
        }
    }

    fn events(&self) -> &Receiver<JobEvent> {
        match self {
            Handle::Local(h) => h.events(),
            Handle::Remote(h) => h.events(),
        }
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Option<JobResult> {
        match self {
            Handle::Local(h) => h.wait_timeout(timeout),
            Handle::Remote(h) => h.wait_timeout(timeout),
        }
    }

    fn cancel(&self) -> crate::Result<()> {
        match self {
            Handle::Local(h) => h.cancel(),
            Handle::Remote(h) => h.cancel(),
        }
    }

    fn stdin(&self) -> crate::Result<crate::JobStdin> {
        match self {
            Handle::Local(h) => h.stdin(),
            Handle::Remote(h) => h.stdin(),
        }
    }

    fn resize(&self, rows: u16, cols: u16) -> crate::Result<()> {
        match self {
            Handle::Local(h) => h.resize(rows, cols),
            Handle::Remote(h) => h.resize(rows, cols),
        }
    }

    /// Why the events ended without a `Finished` (as the handle's own wait says it).
    fn gone(&self) -> &'static str {
        match self {
            Handle::Local(_) => "the manager went away",
            Handle::Remote(_) => "the client was closed before the job ended",
        }
    }
}

impl wp_job {
    pub(crate) fn new(inner: JobHandle) -> wp_job {
        wp_job::of(Handle::Local(inner))
    }

    pub(crate) fn remote(inner: RemoteJob) -> wp_job {
        wp_job::of(Handle::Remote(inner))
    }

    fn of(inner: Handle) -> wp_job {
        wp_job {
            inner,
            data: Vec::new(),
            ended: false,
        }
    }
}

/// Refuses a second delivery of a job's end.
macro_rules! not_ended {
    ($job:expr) => {
        if $job.ended {
            return fail(
                WP_RESULT_ENDED,
                "the job's end was already delivered (WP_EVENT_FINISHED or a result)",
            );
        }
    };
}

/// Waits up to `timeout_ms` for the job's next event and writes it to `*out`.
/// `WP_RESULT_TIMEOUT`: none yet. `WP_RESULT_ENDED`: its end was already delivered.
/// Events read here are not part of a later `wp_job_wait`'s result.
///
/// Ownership: the event's `data` is owned by the job, valid until the next call on it.
/// Threads: one call at a time per job.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_next_event(
    job: *mut wp_job,
    timeout_ms: u32,
    out: *mut wp_event,
) -> wp_result {
    ffi!({
        let job = arg_mut!(job);
        out!(out);
        not_ended!(job);
        let ev = match job
            .inner
            .events()
            .recv_timeout(Duration::from_millis(u64::from(timeout_ms)))
        {
            Ok(ev) => ev,
            Err(RecvTimeoutError::Timeout) => return WP_RESULT_TIMEOUT,
            Err(RecvTimeoutError::Disconnected) => {
                JobEvent::Finished(Outcome::Rejected(job.inner.gone().into()))
            }
        };
        job.ended = matches!(ev, JobEvent::Finished(_));
        write(out, job_event(ev, &mut job.data))
    })
}

/// Waits for the job to end and writes its result to `*out`: the outcome, exit code or
/// signal, and the output collected (up to the result output limit per stream, the
/// manager's or, for a remote job, the client's; `wp_job_result_truncated` says when
/// more was cut). Output already taken with `wp_job_next_event` is not in it.
/// `WP_RESULT_ENDED`: its end was already delivered.
///
/// Ownership: `*out` receives a result the caller owns and frees once with
/// `wp_job_result_free`. Threads: one call at a time per job; it blocks until the job
/// ends (a manager that shuts down, or a client that is closed, ends every job).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_wait(job: *mut wp_job, out: *mut *mut wp_job_result) -> wp_result {
    ffi!({
        let job = arg_mut!(job);
        out!(out);
        not_ended!(job);
        let result = loop {
            if let Some(r) = job.inner.wait_timeout(Duration::from_secs(3600)) {
                break r;
            }
        };
        job.ended = true;
        boxed(out, wp_job_result::new(result))
    })
}

/// `wp_job_wait` that gives up after `timeout_ms` with `WP_RESULT_TIMEOUT` (output
/// received so far is kept for the next call).
///
/// Ownership: as `wp_job_wait`. Threads: one call at a time per job.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_wait_timeout(
    job: *mut wp_job,
    timeout_ms: u32,
    out: *mut *mut wp_job_result,
) -> wp_result {
    ffi!({
        let job = arg_mut!(job);
        out!(out);
        not_ended!(job);
        match job
            .inner
            .wait_timeout(Duration::from_millis(u64::from(timeout_ms)))
        {
            Some(result) => {
                job.ended = true;
                boxed(out, wp_job_result::new(result))
            }
            None => WP_RESULT_TIMEOUT,
        }
    })
}

/// Asks for the job to be cancelled (queued: it never starts; running: SIGTERM, then
/// SIGKILL) and returns at once. Its end says how it ended. For a remote job the request
/// is sent and not waited for (`wp_client_cancel` waits for the manager to take it);
/// `WP_RESULT_SHUT_DOWN` once its client is closed.
///
/// Threads: one call at a time per job.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_cancel(job: *mut wp_job) -> wp_result {
    ffi!({ result_of(arg!(job).inner.cancel()) })
}

/// Writes `len` bytes from `data` to an interactive job's stdin (`wp_job_spec_set_interactive`
/// or `wp_job_spec_set_pty`), local or remote, and returns when all of them are on their
/// way. It waits (with no deadline, as a pipe does) while 256 KiB are on the way and not
/// yet read by the job. `WP_RESULT_STDIN_CLOSED`: the job closed its stdin or ended (a
/// waiting write returns then too; some of the bytes may have been taken), or
/// `wp_job_close_stdin` was called. `WP_RESULT_INVALID_ARGUMENT`: the job is not
/// interactive. `data` may be NULL only when `len` is 0 (which does nothing).
///
/// Ownership: the bytes are copied. Threads: one call at a time per job, as for every
/// call on it: a job whose output nobody reads may stop reading its stdin, so write in
/// pieces between reading its events (`wp_job_next_event`) when it echoes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_write_stdin(
    job: *mut wp_job,
    data: *const u8,
    len: usize,
) -> wp_result {
    ffi!({
        let job = arg_mut!(job);
        if len == 0 {
            return WP_RESULT_OK;
        }
        if data.is_null() {
            return fail(WP_RESULT_NULL_PARAMETER, "data is NULL and len is not 0");
        }
        // SAFETY: `data` is non-NULL and the caller promises `len` readable bytes there.
        let bytes = unsafe { std::slice::from_raw_parts(data, len) };
        let mut stdin = match job.inner.stdin() {
            Ok(s) => s,
            Err(e) => return from_error(e),
        };
        match std::io::Write::write_all(&mut stdin, bytes) {
            Ok(()) => WP_RESULT_OK,
            Err(e) => fail(WP_RESULT_STDIN_CLOSED, e.to_string()),
        }
    })
}

/// Ends an interactive job's stdin: the job reads EOF after every byte written before.
/// `WP_RESULT_STDIN_CLOSED`: the job had closed it or ended already.
/// `WP_RESULT_INVALID_ARGUMENT`: the job is not interactive.
///
/// Threads: one call at a time per job.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_close_stdin(job: *mut wp_job) -> wp_result {
    ffi!({
        let job = arg_mut!(job);
        let stdin = match job.inner.stdin() {
            Ok(s) => s,
            Err(e) => return from_error(e),
        };
        match stdin.close() {
            Ok(()) => WP_RESULT_OK,
            Err(e) => fail(WP_RESULT_STDIN_CLOSED, e.to_string()),
        }
    })
}

/// Tells a terminal job (`wp_job_spec_set_pty`) its terminal's new size, as a window
/// resize does, and returns at once. `WP_RESULT_INVALID_ARGUMENT`: the job has no
/// terminal, or `rows` or `cols` is 0.
///
/// Threads: one call at a time per job.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_resize(job: *mut wp_job, rows: u16, cols: u16) -> wp_result {
    ffi!({ result_of(arg!(job).inner.resize(rows, cols)) })
}

/// The job's id (counting up from 1 per manager: a remote job's is its manager's); 0
/// for NULL.
///
/// Threads: one call at a time per job.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_id(job: *const wp_job) -> u64 {
    ffi!(0, { arg_or!(job, 0).inner.id().0 })
}

/// Frees a job handle; NULL does nothing. The job itself goes on.
///
/// Ownership: call it once per job, after every other call on it returned; results it
/// gave stay valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_free(job: *mut wp_job) {
    ffi!((), { free(job) })
}

/// A finished job: its outcome and what it wrote. Made by `wp_job_wait` or
/// `wp_job_wait_timeout`; freed once with `wp_job_result_free`. Every accessor only
/// reads, so a result may be read from several threads at once.
pub struct wp_job_result {
    inner: JobResult,
    worker: Option<CString>,
    reason: Option<CString>,
    warnings: Vec<CString>,
}

impl wp_job_result {
    fn new(inner: JobResult) -> wp_job_result {
        wp_job_result {
            worker: inner.worker.as_deref().map(c_text),
            reason: outcome_parts(&inner.outcome).reason.map(c_text),
            warnings: inner.warnings.iter().map(|w| c_text(w)).collect(),
            inner,
        }
    }
}

/// The job's id; 0 for NULL. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_result_id(result: *const wp_job_result) -> u64 {
    ffi!(0, { arg_or!(result, 0).inner.id.0 })
}

/// How the job ended; `WP_OUTCOME_NONE` for NULL. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_result_outcome(result: *const wp_job_result) -> wp_outcome {
    ffi!(wp_outcome::WP_OUTCOME_NONE, {
        outcome_parts(&arg_or!(result, wp_outcome::WP_OUTCOME_NONE).inner.outcome).outcome
    })
}

/// The script's exit code when the outcome is `WP_OUTCOME_EXITED`; -1 otherwise (and
/// for NULL). Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_result_exit_code(result: *const wp_job_result) -> i32 {
    ffi!(-1, {
        arg_or!(result, -1).inner.outcome.exit_code().unwrap_or(-1)
    })
}

/// The signal that killed the script when the outcome is `WP_OUTCOME_SIGNALED`; 0
/// otherwise (and for NULL). Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_result_signal(result: *const wp_job_result) -> i32 {
    ffi!(0, {
        outcome_parts(&arg_or!(result, 0).inner.outcome).signal
    })
}

/// Why the job never ran (`WP_OUTCOME_REJECTED`) or could not start
/// (`WP_OUTCOME_SPAWN_FAILED`); NULL for other outcomes (and for NULL).
///
/// Ownership: owned by the result, valid until `wp_job_result_free`. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_result_reason(result: *const wp_job_result) -> *const c_char {
    ffi!(std::ptr::null(), {
        c_ptr(arg_or!(result, std::ptr::null()).reason.as_ref())
    })
}

/// The job's standard output, up to the manager's result output limit.
///
/// Ownership: owned by the result, valid until `wp_job_result_free`. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_result_stdout(result: *const wp_job_result) -> wp_bytes {
    ffi!(wp_bytes::EMPTY, {
        wp_bytes::of(&arg_or!(result, wp_bytes::EMPTY).inner.stdout)
    })
}

/// The job's standard error, up to the manager's result output limit.
///
/// Ownership: owned by the result, valid until `wp_job_result_free`. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_result_stderr(result: *const wp_job_result) -> wp_bytes {
    ffi!(wp_bytes::EMPTY, {
        wp_bytes::of(&arg_or!(result, wp_bytes::EMPTY).inner.stderr)
    })
}

/// Whether stdout or stderr were cut at the manager's result output limit (live output
/// events are never cut); false for NULL. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_result_truncated(result: *const wp_job_result) -> bool {
    ffi!(false, { arg_or!(result, false).inner.truncated })
}

/// How many times the job was started (more than 1 after retries; 0 if it never ran,
/// and for NULL). Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_result_attempts(result: *const wp_job_result) -> u32 {
    ffi!(0, { arg_or!(result, 0).inner.attempts })
}

/// The name of the worker that ran the job last; NULL if none did (and for NULL).
///
/// Ownership: owned by the result, valid until `wp_job_result_free`. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_result_worker(result: *const wp_job_result) -> *const c_char {
    ffi!(std::ptr::null(), {
        c_ptr(arg_or!(result, std::ptr::null()).worker.as_ref())
    })
}

/// How many warnings the job got (for example: its folder could not be deleted); 0 for
/// NULL. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_result_warning_count(result: *const wp_job_result) -> usize {
    ffi!(0, { arg_or!(result, 0).warnings.len() })
}

/// Warning number `index` (from 0); NULL when `index` is out of range (and for NULL).
///
/// Ownership: owned by the result, valid until `wp_job_result_free`. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_result_warning(
    result: *const wp_job_result,
    index: usize,
) -> *const c_char {
    ffi!(std::ptr::null(), {
        c_ptr(arg_or!(result, std::ptr::null()).warnings.get(index))
    })
}

/// Frees a result; NULL does nothing.
///
/// Ownership: call it once per result, after every other call on it returned.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_result_free(result: *mut wp_job_result) {
    ffi!((), { free(result) })
}

/// Where an unfinished job is (`wp_job_status_state`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum wp_job_state {
    /// Not a status (a NULL argument).
    WP_JOB_STATE_NONE = 0,
    /// Waiting for a worker.
    WP_JOB_STATE_QUEUED = 1,
    /// Running on a worker (`wp_job_status_worker`).
    WP_JOB_STATE_RUNNING = 2,
    /// Its worker's connection dropped; it waits (up to the reconnect grace) for that
    /// worker to come back with it.
    WP_JOB_STATE_DISCONNECTED = 3,
}

/// A job that has not ended, as the manager saw it when asked. Made by
/// `wp_manager_job_status` or `wp_client_job` (freed once with `wp_job_status_free`) or
/// borrowed from a `wp_job_list` (never freed on its own). Every accessor only reads, so
/// a status may be read from several threads at once.
pub struct wp_job_status {
    inner: JobStatus,
    worker: Option<CString>,
    script: CString,
}

impl wp_job_status {
    pub(crate) fn new(inner: JobStatus) -> wp_job_status {
        let worker = match &inner.state {
            JobState::Queued => None,
            JobState::Running { worker } | JobState::Disconnected { worker } => {
                Some(c_text(worker))
            }
        };
        wp_job_status {
            worker,
            script: c_text(&inner.script),
            inner,
        }
    }
}

/// The job's id; 0 for NULL. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_status_id(status: *const wp_job_status) -> u64 {
    ffi!(0, { arg_or!(status, 0).inner.id.0 })
}

/// Queued, running or disconnected; `WP_JOB_STATE_NONE` for NULL. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_status_state(status: *const wp_job_status) -> wp_job_state {
    ffi!(wp_job_state::WP_JOB_STATE_NONE, {
        match arg_or!(status, wp_job_state::WP_JOB_STATE_NONE).inner.state {
            JobState::Queued => wp_job_state::WP_JOB_STATE_QUEUED,
            JobState::Running { .. } => wp_job_state::WP_JOB_STATE_RUNNING,
            JobState::Disconnected { .. } => wp_job_state::WP_JOB_STATE_DISCONNECTED,
        }
    })
}

/// The worker running it (or that it waits for); NULL when queued (and for NULL).
///
/// Ownership: owned by the status, valid as long as it is. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_status_worker(status: *const wp_job_status) -> *const c_char {
    ffi!(std::ptr::null(), {
        c_ptr(arg_or!(status, std::ptr::null()).worker.as_ref())
    })
}

/// How long it had been in its state, in milliseconds; 0 for NULL. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_status_since_ms(status: *const wp_job_status) -> u64 {
    ffi!(0, { millis(arg_or!(status, 0).inner.since) })
}

/// Which attempt this is (1 unless it was retried); 0 for NULL. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_status_attempt(status: *const wp_job_status) -> u32 {
    ffi!(0, { arg_or!(status, 0).inner.attempt })
}

/// Its script; NULL for NULL.
///
/// Ownership: owned by the status, valid as long as it is. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_status_script(status: *const wp_job_status) -> *const c_char {
    ffi!(std::ptr::null(), {
        arg_or!(status, std::ptr::null()).script.as_ptr()
    })
}

/// Its priority; 0 for NULL. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_status_priority(status: *const wp_job_status) -> i32 {
    ffi!(0, { arg_or!(status, 0).inner.priority })
}

/// Whether its worker was told to stop reading its output for now because whoever
/// reads the job's events is behind (the job waits on its own writes meanwhile); false
/// for NULL. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_status_output_paused(status: *const wp_job_status) -> bool {
    ffi!(false, { arg_or!(status, false).inner.output_paused })
}

/// Frees a status made by `wp_manager_job_status` or `wp_client_job`; NULL does nothing. Never pass one
/// from `wp_job_list_get`.
///
/// Ownership: call it once per status, after every other call on it returned.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_status_free(status: *mut wp_job_status) {
    ffi!((), { free(status) })
}

/// Every job that had not ended when `wp_manager_jobs` or `wp_client_jobs` was called,
/// by id. Made by either; freed once with `wp_job_list_free`. Every accessor only reads,
/// so a list may be read from several threads at once.
pub struct wp_job_list {
    items: Vec<wp_job_status>,
}

impl wp_job_list {
    pub(crate) fn new(jobs: Vec<JobStatus>) -> wp_job_list {
        wp_job_list {
            items: jobs.into_iter().map(wp_job_status::new).collect(),
        }
    }
}

/// How many jobs the list holds; 0 for NULL. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_list_len(list: *const wp_job_list) -> usize {
    ffi!(0, { arg_or!(list, 0).items.len() })
}

/// Job number `index` (from 0, by id); NULL when out of range (and for NULL).
///
/// Ownership: owned by the list, valid until `wp_job_list_free`; never free it on its
/// own. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_list_get(
    list: *const wp_job_list,
    index: usize,
) -> *const wp_job_status {
    ffi!(std::ptr::null(), {
        arg_or!(list, std::ptr::null())
            .items
            .get(index)
            .map_or(std::ptr::null(), |s| s as *const wp_job_status)
    })
}

/// Frees a list and the statuses in it; NULL does nothing.
///
/// Ownership: call it once per list, after every other call on it (and on its
/// statuses) returned.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_list_free(list: *mut wp_job_list) {
    ffi!((), { free(list) })
}
