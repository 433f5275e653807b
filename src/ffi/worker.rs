//! `wp_worker`: a running `Worker` — started from a `wp_worker_config`, its connection
//! state and counters, drain, wait, stop.

use super::common::wp_result::*;
use super::common::*;
use super::config::wp_worker_config;
use crate::worker::{Worker, WorkerSecurity};
use std::ffi::{CString, c_char};
use std::time::Duration;

/// A running worker. Made by `wp_worker_start`; `wp_worker_free` (called once, after
/// every other call on it has returned) stops it, then frees it. Threads: every other
/// `wp_worker_*` function may be called from several threads at once.
pub struct wp_worker {
    inner: Worker,
    name: CString,
}

/// Starts a worker in the background: it connects (and reconnects) by itself; an
/// unreachable manager is not an error here. It needs the manager
/// (`wp_worker_config_set_manager`) and an identity
/// (`wp_worker_config_set_identity_pem_files`); settings that cannot work together are
/// `WP_RESULT_INVALID_ARGUMENT`.
///
/// Ownership: the configuration is only read; free it whenever convenient. `*out`
/// receives a worker the caller owns and frees once with `wp_worker_free`. Threads:
/// callable from any thread (not alongside a setter on the same configuration).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_start(
    config: *const wp_worker_config,
    out: *mut *mut wp_worker,
) -> wp_result {
    ffi!({
        let c = arg!(config);
        out!(out);
        let (identity, manager_trust, verify_hostname) = match c.dial.security(
            "the worker needs wp_worker_config_set_manager and wp_worker_config_set_identity_pem_files",
        ) {
            Ok(parts) => parts,
            Err(code) => return code,
        };
        let mut rust = c.rust.clone();
        rust.security = WorkerSecurity::MutualTls {
            identity,
            manager_trust,
            verify_hostname,
        };
        let name = c_text(&rust.name);
        match Worker::start(rust) {
            Ok(w) => boxed(out, wp_worker { inner: w, name }),
            Err(e) => from_error(e),
        }
    })
}

/// The worker's name; NULL for NULL.
///
/// Ownership: owned by the worker, valid until `wp_worker_free`. Threads: any,
/// concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_name(worker: *const wp_worker) -> *const c_char {
    ffi!(std::ptr::null(), {
        arg_or!(worker, std::ptr::null()).name.as_ptr()
    })
}

/// Whether it is connected to the manager right now; false for NULL.
///
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_is_connected(worker: *const wp_worker) -> bool {
    ffi!(false, { arg_or!(worker, false).inner.is_connected() })
}

/// How many times a manager has accepted it so far; 0 for NULL.
///
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_sessions(worker: *const wp_worker) -> u64 {
    ffi!(0, { arg_or!(worker, 0).inner.sessions() })
}

/// How many times it has tried to connect so far (successful or not); 0 for NULL.
///
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_connection_attempts(worker: *const wp_worker) -> u64 {
    ffi!(0, { arg_or!(worker, 0).inner.connection_attempts() })
}

/// Starts draining and returns at once: the worker takes no new jobs (the manager stops
/// routing to it), lets the running ones finish and report, then leaves.
/// `wp_worker_wait` tells when it has left; `wp_worker_stop` cuts it short.
///
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_drain(worker: *const wp_worker) -> wp_result {
    ffi!({
        arg!(worker).inner.drain(None);
        WP_RESULT_OK
    })
}

/// `wp_worker_drain` with a deadline, in milliseconds from now (0 to 365 days): jobs
/// still running then are killed (they end `WP_OUTCOME_CANCELLED`).
///
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_drain_within(
    worker: *const wp_worker,
    deadline_ms: u64,
) -> wp_result {
    ffi!({
        let worker = arg!(worker);
        let deadline = match duration_ms("a drain deadline", deadline_ms, true, MAX_DURATION_MS) {
            Ok(d) => d,
            Err(code) => return code,
        };
        worker.inner.drain(Some(deadline));
        WP_RESULT_OK
    })
}

/// Waits up to `timeout_ms` for the worker to have left (after a drain, or a stop):
/// `WP_RESULT_OK` when it has, `WP_RESULT_TIMEOUT` when it has not yet.
///
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_wait(worker: *const wp_worker, timeout_ms: u32) -> wp_result {
    ffi!({
        let worker = arg!(worker);
        if worker
            .inner
            .wait(Duration::from_millis(u64::from(timeout_ms)))
        {
            WP_RESULT_OK
        } else {
            WP_RESULT_TIMEOUT
        }
    })
}

/// Stops now: kills running jobs (the manager, told goodbye, ends them
/// `WP_OUTCOME_WORKER_LOST`, or retries them), cleans up their folders, closes the
/// connection, and returns when the worker's threads are gone. A second call does
/// nothing. The handle stays valid (free it with `wp_worker_free`).
///
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_stop(worker: *const wp_worker) -> wp_result {
    ffi!({
        arg!(worker).inner.stop();
        WP_RESULT_OK
    })
}

/// Stops the worker (as `wp_worker_stop`, unless it has left), waits for its threads,
/// and frees it; NULL does nothing.
///
/// Ownership: call it once per worker, after every other call on it returned.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_free(worker: *mut wp_worker) {
    ffi!((), { free(worker) })
}
