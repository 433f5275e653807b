//! `wp_client`: a connected `Client` (a remote submitter) — started from a
//! `wp_client_config`; submits jobs (one, or an array) and attaches to them, each
//! followed through the same `wp_job` handle as a job of an in-process manager; asks
//! about jobs, workers and figures with the same snapshots as `wp_manager`; cancels;
//! closes.

use super::common::wp_result::*;
use super::common::*;
use super::config::wp_client_config;
use super::job::{wp_job, wp_job_list, wp_job_status};
use super::manager::{wp_stats, wp_worker_list};
use super::spec::wp_job_spec;
use crate::client::{Client, ClientSecurity};
use crate::job::{JobId, JobSpec};
use std::ffi::{CString, c_char};
use std::sync::RwLock;

/// A client connected to a manager as a submitter. Made by `wp_client_connect`;
/// `wp_client_free` (called once, after every other call on it has returned) closes it,
/// then frees it. Threads: every other `wp_client_*` function may be called from several
/// threads at once; many jobs may be in flight on one client.
pub struct wp_client {
    /// `None` once closed.
    inner: RwLock<Option<Client>>,
    name: CString,
}

impl wp_client {
    /// Runs `f` on the client while it is open; `WP_RESULT_SHUT_DOWN` once it is closed.
    fn with(&self, f: impl FnOnce(&Client) -> wp_result) -> wp_result {
        let guard = self.inner.read().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(client) => f(client),
            None => fail(
                WP_RESULT_SHUT_DOWN,
                "the client is closed (wp_client_close)",
            ),
        }
    }
}

/// Connects to the manager as a submitter (TCP, the TLS handshake and the hello, within
/// the connect timeout) and starts the client's thread, which reconnects by itself
/// afterwards. It needs the manager (`wp_client_config_set_manager`) and an identity
/// (`wp_client_config_set_identity_pem_files`); settings that cannot work together are
/// `WP_RESULT_INVALID_ARGUMENT`. A manager that refuses the certificate (not trusted as
/// a submitter: a worker certificate, say) is `WP_RESULT_PROTOCOL` with its reason; an
/// unreachable one `WP_RESULT_IO`, `WP_RESULT_TIMEOUT` or `WP_RESULT_TLS`.
///
/// Ownership: the configuration is only read; free it whenever convenient. `*out`
/// receives a client the caller owns and frees once with `wp_client_free`. Threads:
/// callable from any thread (not alongside a setter on the same configuration).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_connect(
    config: *const wp_client_config,
    out: *mut *mut wp_client,
) -> wp_result {
    ffi!({
        let c = arg!(config);
        out!(out);
        let (identity, manager_trust, verify_hostname) = match c.dial.security(
            "the client needs wp_client_config_set_manager and wp_client_config_set_identity_pem_files",
        ) {
            Ok(parts) => parts,
            Err(code) => return code,
        };
        let mut rust = c.rust.clone();
        rust.security = ClientSecurity::MutualTls {
            identity,
            manager_trust,
            verify_hostname,
        };
        let name = c_text(&rust.name);
        match Client::connect(rust) {
            Ok(client) => boxed(
                out,
                wp_client {
                    inner: RwLock::new(Some(client)),
                    name,
                },
            ),
            Err(e) => from_error(e),
        }
    })
}

/// The client's name (as the manager's logs know it); NULL for NULL.
///
/// Ownership: owned by the client, valid until `wp_client_free`. Threads: any,
/// concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_name(client: *const wp_client) -> *const c_char {
    ffi!(std::ptr::null(), {
        arg_or!(client, std::ptr::null()).name.as_ptr()
    })
}

/// Whether a connection to the manager is up right now; false once closed (and for
/// NULL).
///
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_is_connected(client: *const wp_client) -> bool {
    ffi!(false, {
        let client = arg_or!(client, false);
        let guard = client.inner.read().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().is_some_and(Client::is_connected)
    })
}

fn submit(client: &wp_client, spec: JobSpec, out: *mut *mut wp_job) -> wp_result {
    client.with(|c| match c.submit(spec) {
        Ok(job) => boxed(out, wp_job::remote(job)),
        Err(e) => from_error(e),
    })
}

/// Submits `/bin/bash -c script` to run on any worker, with no options (see
/// `wp_client_submit_spec` for them), attached to this client: cancelled if the client
/// is gone longer than the manager's reconnect grace. Waits for the manager to take it.
/// `WP_RESULT_QUEUE_FULL`: the manager's queue is full; `WP_RESULT_SHUT_DOWN`: the
/// manager is shutting down, or the client is closed; `WP_RESULT_IO`: the connection was
/// lost and whether the job was taken is not known; `WP_RESULT_TIMEOUT`: no answer.
///
/// Ownership: `script` is copied. `*out` receives a job handle (read it with the
/// `wp_job_*` functions, as a local job) the caller owns and frees once with
/// `wp_job_free`. Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_submit(
    client: *const wp_client,
    script: *const c_char,
    out: *mut *mut wp_job,
) -> wp_result {
    ffi!({
        let client = arg!(client);
        let script = text!(script);
        out!(out);
        submit(client, JobSpec::new(script), out)
    })
}

/// Submits a job described by a spec (detached with `wp_job_spec_set_detached`: it then
/// runs on without the client, and `wp_client_attach` follows it again). Fails as
/// `wp_client_submit` does, and with `WP_RESULT_INVALID_ARGUMENT` for a job the manager
/// refuses (above half a frame, `wp_job_spec_wire_size`).
///
/// Ownership: the spec is only read (submit it again, change it, or free it). `*out`
/// receives a job handle the caller owns and frees once with `wp_job_free`. Threads:
/// any, concurrently (not alongside a setter on the same spec).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_submit_spec(
    client: *const wp_client,
    spec: *const wp_job_spec,
    out: *mut *mut wp_job,
) -> wp_result {
    ffi!({
        let client = arg!(client);
        let spec = arg!(spec);
        out!(out);
        submit(client, spec.inner.clone(), out)
    })
}

/// Submits an array: one job per index from `first` to `last` (both included), all with
/// the spec (sent once), each with `WORKPOOL_ARRAY_INDEX` set to its index. All are
/// queued or none. `out` is the caller's array of `out_len` job pointers, and `out_len`
/// must be the array's length, `last - first + 1` (`WP_RESULT_INVALID_ARGUMENT`
/// otherwise, and when `first` is after `last`); on success `out[i]` is the job of index
/// `first + i`. Fails as `wp_client_submit_spec` does.
///
/// Ownership: the spec is only read; `out` stays the caller's. Each `out[i]` receives a
/// job handle the caller owns and frees once with `wp_job_free`; a failed call writes
/// none. Threads: any, concurrently (not alongside a setter on the same spec).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_submit_array(
    client: *const wp_client,
    spec: *const wp_job_spec,
    first: u64,
    last: u64,
    out: *mut *mut wp_job,
    out_len: usize,
) -> wp_result {
    ffi!({
        let client = arg!(client);
        let spec = arg!(spec);
        out!(out);
        refuse_if!(
            first > last,
            "an array's first index ({first}) is after its last ({last})"
        );
        let count = u128::from(last - first) + 1;
        refuse_if!(
            count != out_len as u128,
            "out_len is {out_len}, but the array {first}..={last} has {count} jobs"
        );
        client.with(|c| match c.submit_array(spec.inner.clone(), first, last) {
            Ok(jobs) => {
                for (i, job) in jobs.into_iter().enumerate() {
                    let handle = Box::into_raw(Box::new(wp_job::remote(job)));
                    // SAFETY: `out` is non-NULL (checked above) and the caller's array of
                    // `out_len` pointers; the client returned exactly `out_len` jobs (one per
                    // index, checked against the request), so `i < out_len`.
                    unsafe { out.add(i).write(handle) };
                }
                WP_RESULT_OK
            }
            Err(e) => from_error(e),
        })
    })
}

/// Follows job `id`, which this client's certificate submitted (from this client or an
/// earlier one): what the manager kept of its events (a detached job's last output),
/// then the rest as they come; only its end if it has ended. `WP_RESULT_UNKNOWN_JOB`: no
/// such job (or an ended one the manager no longer keeps); `WP_RESULT_INVALID_ARGUMENT`:
/// another certificate submitted it, or this client follows it already (its events go to
/// the handle the client has).
///
/// Ownership: `*out` receives a job handle the caller owns and frees once with
/// `wp_job_free`. Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_attach(
    client: *const wp_client,
    id: u64,
    out: *mut *mut wp_job,
) -> wp_result {
    ffi!({
        let client = arg!(client);
        out!(out);
        client.with(|c| match c.attach(JobId(id)) {
            Ok(job) => boxed(out, wp_job::remote(job)),
            Err(e) => from_error(e),
        })
    })
}

/// Where job `id` is, if it has not ended (without its script when this certificate did
/// not submit it). `WP_RESULT_UNKNOWN_JOB`: it has ended or never existed.
///
/// Ownership: `*out` receives a status the caller owns and frees once with
/// `wp_job_status_free`. Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_job(
    client: *const wp_client,
    id: u64,
    out: *mut *mut wp_job_status,
) -> wp_result {
    ffi!({
        let client = arg!(client);
        out!(out);
        client.with(|c| match c.job(JobId(id)) {
            Ok(Some(status)) => boxed(out, wp_job_status::new(status)),
            Ok(None) => fail(
                WP_RESULT_UNKNOWN_JOB,
                format!("no such job: {id} (it has ended or never existed)"),
            ),
            Err(e) => from_error(e),
        })
    })
}

/// Every job of the manager that has not ended, by id (the jobs this certificate did not
/// submit, those of the manager's own process included, without their scripts).
///
/// Ownership: `*out` receives a list the caller owns and frees once with
/// `wp_job_list_free`. Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_jobs(
    client: *const wp_client,
    out: *mut *mut wp_job_list,
) -> wp_result {
    ffi!({
        let client = arg!(client);
        out!(out);
        client.with(|c| match c.jobs() {
            Ok(jobs) => boxed(out, wp_job_list::new(jobs)),
            Err(e) => from_error(e),
        })
    })
}

/// The workers connected to the manager.
///
/// Ownership: `*out` receives a list the caller owns and frees once with
/// `wp_worker_list_free`. Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_workers(
    client: *const wp_client,
    out: *mut *mut wp_worker_list,
) -> wp_result {
    ffi!({
        let client = arg!(client);
        out!(out);
        client.with(|c| match c.workers() {
            Ok(workers) => boxed(out, wp_worker_list::new(workers)),
            Err(e) => from_error(e),
        })
    })
}

/// A snapshot of the manager's figures, as `wp_manager_stats` gives them.
///
/// Ownership: `*out` receives a snapshot the caller owns and frees once with
/// `wp_stats_free`. Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_stats(
    client: *const wp_client,
    out: *mut *mut wp_stats,
) -> wp_result {
    ffi!({
        let client = arg!(client);
        out!(out);
        client.with(|c| match c.stats() {
            Ok(stats) => boxed(out, wp_stats::new(stats)),
            Err(e) => from_error(e),
        })
    })
}

/// Cancels job `id`, which this client's certificate submitted, and waits for the
/// manager to take the cancel (the job then ends `WP_OUTCOME_CANCELLED`, unless it ended
/// first). `WP_RESULT_UNKNOWN_JOB`: it has ended or never existed;
/// `WP_RESULT_INVALID_ARGUMENT`: another certificate submitted it.
///
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_cancel(client: *const wp_client, id: u64) -> wp_result {
    ffi!({ arg!(client).with(|c| result_of(c.cancel(JobId(id)))) })
}

/// Closes the client: says goodbye to the manager (which cancels the jobs attached to
/// this client at once; detached jobs run on), waits a moment for that to go out, and
/// ends the client's thread. Its job handles that had not ended end
/// `WP_OUTCOME_REJECTED`. Calls on other threads that are in flight return first; later
/// calls are `WP_RESULT_SHUT_DOWN`. A second call does nothing. The handle stays valid
/// (free it with `wp_client_free`).
///
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_close(client: *const wp_client) -> wp_result {
    ffi!({
        let client = arg!(client);
        let open = client
            .inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(c) = open {
            c.close();
        }
        WP_RESULT_OK
    })
}

/// Closes the client (as `wp_client_close`, unless that was done) and frees it; NULL
/// does nothing. Handles of its jobs stay valid and report how their jobs ended.
///
/// Ownership: call it once per client, after every other call on it returned.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_free(client: *mut wp_client) {
    ffi!((), { free(client) })
}
