//! `wp_job_spec`: a job being described before it is submitted (`JobSpec`). Each setter
//! checks its value with the Rust API's own rules (`JobSpec::validate`) and refuses a bad
//! one with nothing changed, so that a spec that reaches `wp_manager_submit_spec` fails
//! only for reasons of the manager's (its queue, its shutdown).

use super::common::wp_result::*;
use super::common::*;
use crate::job::JobSpec;
use std::ffi::c_char;

/// A job to submit: a bash script plus its options. Made by `wp_job_spec_new`; freed once
/// with `wp_job_spec_free`. Threads: one call at a time on a spec (setters change it);
/// `wp_manager_submit_spec` only reads it, so one spec may be submitted many times.
pub struct wp_job_spec {
    pub(crate) inner: JobSpec,
}

/// Applies a change to a copy of the spec's option on a bare spec and keeps it only if
/// `JobSpec::validate` accepts it.
fn checked(spec: &mut wp_job_spec, change: impl Fn(JobSpec) -> JobSpec) -> wp_result {
    if let Err(why) = change(JobSpec::new("true")).validate() {
        return fail(WP_RESULT_INVALID_ARGUMENT, why);
    }
    spec.inner = change(std::mem::replace(&mut spec.inner, JobSpec::new("")));
    WP_RESULT_OK
}

/// A new job that runs `/bin/bash -c script` on any worker, with no timeout, no
/// environment beyond the worker's, empty stdin, priority 0 and no retries. An empty (or
/// blank) script is refused.
///
/// Ownership: `script` is copied. `*out` receives a spec the caller owns and frees once
/// with `wp_job_spec_free`. Threads: callable from any thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_spec_new(
    script: *const c_char,
    out: *mut *mut wp_job_spec,
) -> wp_result {
    ffi!({
        let script = text!(script);
        out!(out);
        let inner = JobSpec::new(script);
        if let Err(why) = inner.validate() {
            return fail(WP_RESULT_INVALID_ARGUMENT, why);
        }
        boxed(out, wp_job_spec { inner })
    })
}

/// Sets a deadline from the job's start, in milliseconds (1 to 365 days): then SIGTERM,
/// SIGKILL after the kill grace, and the job ends `WP_OUTCOME_TIMED_OUT`.
///
/// Threads: one call at a time per spec.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_spec_set_timeout_ms(spec: *mut wp_job_spec, ms: u64) -> wp_result {
    ffi!({
        let spec = arg_mut!(spec);
        let d = match duration_ms("a timeout", ms, false, MAX_DURATION_MS) {
            Ok(d) => d,
            Err(code) => return code,
        };
        checked(spec, |s| s.timeout(d))
    })
}

/// Sets the grace between SIGTERM and SIGKILL on a timeout or cancel, in milliseconds
/// (0 to 365 days; by default the worker's `kill_grace`).
///
/// Threads: one call at a time per spec.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_spec_set_kill_grace_ms(
    spec: *mut wp_job_spec,
    ms: u64,
) -> wp_result {
    ffi!({
        let spec = arg_mut!(spec);
        let d = match duration_ms("a kill grace", ms, true, MAX_DURATION_MS) {
            Ok(d) => d,
            Err(code) => return code,
        };
        checked(spec, |s| s.kill_grace(d))
    })
}

/// Adds an environment variable (call it again for more; the same name again replaces
/// the value). The name must be non-empty, without `=`, and not start with `WORKPOOL_`
/// (the worker sets those).
///
/// Ownership: `name` and `value` are copied. Threads: one call at a time per spec.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_spec_add_env(
    spec: *mut wp_job_spec,
    name: *const c_char,
    value: *const c_char,
) -> wp_result {
    ffi!({
        let spec = arg_mut!(spec);
        let (name, value) = (text!(name), text!(value));
        checked(spec, |s| s.env(name, value))
    })
}

/// Sets the bytes fed to the job's standard input: `len` bytes from `data`, any bytes
/// (NUL included). `data` may be NULL only when `len` is 0, which gives the job an empty
/// stdin (`/dev/null`), as by default. At most half of a frame's limit is accepted for
/// the whole job (`wp_job_spec_wire_size`).
///
/// Ownership: the bytes are copied. Threads: one call at a time per spec.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_spec_set_stdin(
    spec: *mut wp_job_spec,
    data: *const u8,
    len: usize,
) -> wp_result {
    ffi!({
        let spec = arg_mut!(spec);
        if len == 0 {
            spec.inner.stdin = Vec::new();
            return WP_RESULT_OK;
        }
        if data.is_null() {
            return fail(WP_RESULT_NULL_PARAMETER, "data is NULL and len is not 0");
        }
        let max = crate::manager::MAX_JOB_BYTES;
        refuse_if!(
            len > max,
            "stdin of {len} bytes is more than a job may hold ({max})"
        );
        // SAFETY: `data` is non-NULL and the caller promises `len` readable bytes there.
        let bytes = unsafe { std::slice::from_raw_parts(data, len) };
        spec.inner.stdin = bytes.to_vec();
        WP_RESULT_OK
    })
}

/// Adds a tag the worker must have (call it again for more; a worker must have every
/// one). Printable text, 1 to 256 bytes.
///
/// Ownership: `tag` is copied. Threads: one call at a time per spec.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_spec_require_tag(
    spec: *mut wp_job_spec,
    tag: *const c_char,
) -> wp_result {
    ffi!({
        let spec = arg_mut!(spec);
        let tag = text!(tag);
        if let Err(why) = crate::protocol::check_label("a tag", tag) {
            return fail(WP_RESULT_INVALID_ARGUMENT, why);
        }
        checked(spec, |s| s.require_tag(tag))
    })
}

/// Only workers announcing this platform (e.g. `linux-x86_64`) may run the job.
/// Printable text, 1 to 256 bytes.
///
/// Ownership: `platform` is copied. Threads: one call at a time per spec.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_spec_require_platform(
    spec: *mut wp_job_spec,
    platform: *const c_char,
) -> wp_result {
    ffi!({
        let spec = arg_mut!(spec);
        let platform = text!(platform);
        if let Err(why) = crate::protocol::check_label("a platform", platform) {
            return fail(WP_RESULT_INVALID_ARGUMENT, why);
        }
        checked(spec, |s| s.require_platform(platform))
    })
}

/// Sets the priority (default 0): among queued jobs a worker could take, higher starts
/// first, in submission order within a priority. Any value is valid.
///
/// Threads: one call at a time per spec.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_spec_set_priority(
    spec: *mut wp_job_spec,
    priority: i32,
) -> wp_result {
    ffi!({
        let spec = arg_mut!(spec);
        checked(spec, |s| s.priority(priority))
    })
}

/// Sets how many times the job is queued again after its worker is lost (default 0: at
/// most once, since a script may not be safe to run twice). Each retry shows as a
/// `WP_EVENT_REQUEUED` event. Any value is valid.
///
/// Threads: one call at a time per spec.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_spec_set_retries(
    spec: *mut wp_job_spec,
    retries: u32,
) -> wp_result {
    ffi!({
        let spec = arg_mut!(spec);
        checked(spec, |s| s.retries(retries))
    })
}

/// Makes the job independent of its remote submitter (`JobSpec::detached`): it runs on
/// if that submitter goes away, and the manager keeps its outcome and last output for a
/// later attach. `detached` false makes it attached again (the default). A job
/// submitted in process is never cancelled for its submitter either way.
///
/// Threads: one call at a time per spec.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_spec_set_detached(
    spec: *mut wp_job_spec,
    detached: bool,
) -> wp_result {
    ffi!({
        let spec = arg_mut!(spec);
        checked(spec, |mut s| {
            s.detached = detached;
            s
        })
    })
}

/// Makes the job interactive (`JobSpec::interactive`): its stdin stays open and is
/// written while it runs (`wp_job_write_stdin`, `wp_job_close_stdin`), instead of bytes
/// given up front (an interactive job takes none from `wp_job_spec_set_stdin`, and no
/// retries). `interactive` false makes it a plain job again, and drops a terminal.
///
/// Threads: one call at a time per spec.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_spec_set_interactive(
    spec: *mut wp_job_spec,
    interactive: bool,
) -> wp_result {
    ffi!({
        let spec = arg_mut!(spec);
        spec.inner.interactive = interactive;
        if !interactive {
            spec.inner.pty = None;
        }
        WP_RESULT_OK
    })
}

/// Runs the job under a pseudo-terminal of `rows` × `cols` (`JobSpec::pty`): it is the
/// session leader with the terminal as its controlling terminal, its stdout and stderr
/// come merged as stdout, and it is interactive. `wp_job_resize` changes the size while
/// it runs. Rows and columns must be at least 1.
///
/// Threads: one call at a time per spec.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_spec_set_pty(
    spec: *mut wp_job_spec,
    rows: u16,
    cols: u16,
) -> wp_result {
    ffi!({
        let spec = arg_mut!(spec);
        refuse_if!(
            rows == 0 || cols == 0,
            "a terminal must have at least one row and one column (not {rows} x {cols})"
        );
        spec.inner.pty = Some(crate::job::PtySize { rows, cols });
        spec.inner.interactive = true;
        WP_RESULT_OK
    })
}

/// Checks the spec as `JobSpec::validate` does: `WP_RESULT_OK`, or
/// `WP_RESULT_INVALID_ARGUMENT` with the reason for `wp_last_error_message`. (The setters
/// already refuse what it would; `wp_manager_submit_spec` also refuses a job whose
/// `wp_job_spec_wire_size` is above half a frame.)
///
/// Threads: may be called from several threads at once on one spec (it only reads),
/// but not alongside a setter.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_spec_validate(spec: *const wp_job_spec) -> wp_result {
    ffi!({
        match arg!(spec).inner.validate() {
            Ok(()) => WP_RESULT_OK,
            Err(why) => fail(WP_RESULT_INVALID_ARGUMENT, why),
        }
    })
}

/// Roughly how many bytes the job takes on the wire (script, stdin, environment, tags);
/// the manager refuses jobs above half a frame. 0 for NULL.
///
/// Threads: as `wp_job_spec_validate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_spec_wire_size(spec: *const wp_job_spec) -> usize {
    ffi!(0, { arg_or!(spec, 0).inner.wire_size() })
}

/// Frees a spec; NULL does nothing. Jobs submitted from it are not affected.
///
/// Ownership: call it once per spec, after every other call on it returned.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_spec_free(spec: *mut wp_job_spec) {
    ffi!((), { free(spec) })
}
