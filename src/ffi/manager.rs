//! `wp_manager` (a running `Manager`) and the snapshots it hands out: its workers
//! (`wp_worker_info`, `wp_worker_list`) and its figures (`wp_stats`). Jobs, their
//! statuses and the pool's events have files of their own (`job.rs`, `events.rs`); the
//! manager's functions that make them are here.

use super::common::wp_result::*;
use super::common::*;
use super::config::wp_manager_config;
use super::events::wp_subscription;
use super::job::{wp_job, wp_job_list, wp_job_status};
use super::spec::wp_job_spec;
use crate::job::{JobId, JobSpec};
use crate::manager::{Manager, ManagerSecurity, WorkerInfo};
use crate::metrics::{Histogram, Stats};
use std::ffi::{CString, c_char};
use std::sync::OnceLock;

/// A running manager. Made by `wp_manager_start`; `wp_manager_free` (called once, after
/// every other call on it has returned) shuts it down, then frees it. Threads: every
/// other `wp_manager_*` function may be called from several threads at once.
pub struct wp_manager {
    inner: Manager,
}

/// Starts a manager: binds the port and starts its threads. It needs an identity
/// (`wp_manager_config_set_identity_pem_files`) and a worker or submitter certificate or
/// CA to trust; a combination of settings that cannot
/// work (a heartbeat timeout not longer than its interval, ...) is
/// `WP_RESULT_INVALID_ARGUMENT`.
///
/// Ownership: the configuration is only read; free it whenever convenient. `*out`
/// receives a manager the caller owns and frees once with `wp_manager_free`. Threads:
/// callable from any thread (not alongside a setter on the same configuration).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_start(
    config: *const wp_manager_config,
    out: *mut *mut wp_manager,
) -> wp_result {
    ffi!({
        let config = arg!(config);
        out!(out);
        let Some(identity) = config.identity.clone() else {
            return fail(
                WP_RESULT_INVALID_ARGUMENT,
                "the manager has no identity: call wp_manager_config_set_identity_pem_files",
            );
        };
        let mut rust = config.rust.clone();
        rust.security = ManagerSecurity::MutualTls {
            identity,
            worker_trust: config.worker_trust.clone(),
            submitter_trust: config.submitter_trust.clone(),
        };
        match Manager::bind(rust) {
            Ok(m) => boxed(out, wp_manager { inner: m }),
            Err(e) => from_error(e),
        }
    })
}

/// The port the manager listens on (the real one when configured with port 0); 0 for NULL.
///
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_port(manager: *const wp_manager) -> u16 {
    ffi!(0, { arg_or!(manager, 0).inner.local_addr().port() })
}

/// The port the metrics endpoint listens on (`wp_manager_config_set_metrics_address`);
/// 0 when there is none (and for NULL).
///
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_metrics_port(manager: *const wp_manager) -> u16 {
    ffi!(0, {
        arg_or!(manager, 0)
            .inner
            .metrics_addr()
            .map_or(0, |a| a.port())
    })
}

fn submit(manager: &wp_manager, spec: JobSpec, out: *mut *mut wp_job) -> wp_result {
    match manager.inner.submit(spec) {
        Ok(h) => boxed(out, wp_job::new(h)),
        Err(e) => from_error(e),
    }
}

/// Submits `/bin/bash -c script` to run on any worker, with no options (see
/// `wp_manager_submit_spec` for them). `WP_RESULT_QUEUE_FULL` when the queue holds its
/// capacity; `WP_RESULT_SHUT_DOWN` once shutdown has begun.
///
/// Ownership: `script` is copied. `*out` receives a job handle the caller owns and frees
/// once with `wp_job_free`. Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_submit(
    manager: *mut wp_manager,
    script: *const c_char,
    out: *mut *mut wp_job,
) -> wp_result {
    ffi!({
        let manager = arg!(manager);
        let script = text!(script);
        out!(out);
        submit(manager, JobSpec::new(script), out)
    })
}

/// Submits a job described by a spec. Fails as `wp_manager_submit` does, and with
/// `WP_RESULT_INVALID_ARGUMENT` for a job above half a frame (`wp_job_spec_wire_size`).
///
/// Ownership: the spec is only read (submit it again, change it, or free it). `*out`
/// receives a job handle the caller owns and frees once with `wp_job_free`. Threads:
/// any, concurrently (not alongside a setter on the same spec).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_submit_spec(
    manager: *const wp_manager,
    spec: *const wp_job_spec,
    out: *mut *mut wp_job,
) -> wp_result {
    ffi!({
        let manager = arg!(manager);
        let spec = arg!(spec);
        out!(out);
        submit(manager, spec.inner.clone(), out)
    })
}

/// Cancels job `id`: a queued one never starts; a running one is killed. Either way it
/// ends `WP_OUTCOME_CANCELLED` (unless it finished first). `WP_RESULT_UNKNOWN_JOB`: it
/// has ended or never existed. Waits for the manager to have taken it in, not for the
/// job to end.
///
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_cancel(manager: *const wp_manager, id: u64) -> wp_result {
    ffi!({ result_of(arg!(manager).inner.cancel(JobId(id))) })
}

/// Where job `id` is, if it has not ended: queued, running where, for how long, which
/// attempt, whether its output is paused. `WP_RESULT_UNKNOWN_JOB`: it has ended or never
/// existed.
///
/// Ownership: `*out` receives a status the caller owns and frees once with
/// `wp_job_status_free`. Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_job_status(
    manager: *const wp_manager,
    id: u64,
    out: *mut *mut wp_job_status,
) -> wp_result {
    ffi!({
        let manager = arg!(manager);
        out!(out);
        match manager.inner.job(JobId(id)) {
            Some(status) => boxed(out, wp_job_status::new(status)),
            None => fail(
                WP_RESULT_UNKNOWN_JOB,
                format!("no such job: {id} (it has ended or never existed)"),
            ),
        }
    })
}

/// Every job that has not ended, by id (empty once the manager has shut down).
///
/// Ownership: `*out` receives a list the caller owns and frees once with
/// `wp_job_list_free`. Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_jobs(
    manager: *const wp_manager,
    out: *mut *mut wp_job_list,
) -> wp_result {
    ffi!({
        let manager = arg!(manager);
        out!(out);
        boxed(out, wp_job_list::new(manager.inner.jobs()))
    })
}

/// The connected workers (none once the manager has shut down).
///
/// Ownership: `*out` receives a list the caller owns and frees once with
/// `wp_worker_list_free`. Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_workers(
    manager: *const wp_manager,
    out: *mut *mut wp_worker_list,
) -> wp_result {
    ffi!({
        let manager = arg!(manager);
        out!(out);
        boxed(out, wp_worker_list::new(manager.inner.workers()))
    })
}

/// A snapshot of the manager's figures: workers, slots, jobs by state and outcome,
/// waits, bytes streamed, and per-worker figures.
///
/// Ownership: `*out` receives a snapshot the caller owns and frees once with
/// `wp_stats_free`. Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_stats(
    manager: *const wp_manager,
    out: *mut *mut wp_stats,
) -> wp_result {
    ffi!({
        let manager = arg!(manager);
        out!(out);
        boxed(out, wp_stats::new(manager.inner.stats()))
    })
}

/// Subscribes to the pool's events (workers joining and leaving) from now on; read them
/// with `wp_subscription_next`.
///
/// Ownership: `*out` receives a subscription the caller owns and frees once with
/// `wp_subscription_free` (before or after `wp_manager_free`). Threads: any,
/// concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_subscribe(
    manager: *const wp_manager,
    out: *mut *mut wp_subscription,
) -> wp_result {
    ffi!({
        let manager = arg!(manager);
        out!(out);
        boxed(out, wp_subscription::new(manager.inner.subscribe()))
    })
}

/// Shuts down gracefully: stops taking jobs, ends queued jobs `WP_OUTCOME_REJECTED`,
/// lets running jobs finish within the configured shutdown grace and cancels the rest,
/// says goodbye to the workers, and returns when every manager thread has ended. A
/// second call does nothing. The handle stays valid (free it with `wp_manager_free`).
///
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_shutdown(manager: *const wp_manager) -> wp_result {
    ffi!({
        arg!(manager).inner.shutdown();
        WP_RESULT_OK
    })
}

/// `wp_manager_shutdown` with a grace of its own for running jobs, in milliseconds (0 to
/// 365 days; 0 cancels them at once).
///
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_shutdown_within(
    manager: *const wp_manager,
    grace_ms: u64,
) -> wp_result {
    ffi!({
        let manager = arg!(manager);
        let grace = match duration_ms("the shutdown grace", grace_ms, true, MAX_DURATION_MS) {
            Ok(d) => d,
            Err(code) => return code,
        };
        manager.inner.shutdown_within(grace);
        WP_RESULT_OK
    })
}

/// Shuts the manager down (as `wp_manager_shutdown`, unless that was done), waits for
/// its threads, and frees it; NULL does nothing. Handles of its jobs and subscriptions
/// stay valid and report how their jobs ended.
///
/// Ownership: call it once per manager, after every other call on it returned.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_free(manager: *mut wp_manager) {
    ffi!((), {
        // SAFETY: NULL or a live manager handle, freed here once, as the header requires.
        if let Some(m) = unsafe { manager.as_ref() } {
            m.inner.shutdown();
        }
        free(manager)
    })
}

/// A connected worker, as the manager saw it. Borrowed from a `wp_worker_list` or a
/// `wp_manager_event`, never freed on its own. Every accessor only reads, so it may be
/// read from several threads at once.
pub struct wp_worker_info {
    pub(crate) id: u64,
    pub(crate) name: CString,
    address: Option<CString>,
    platform: CString,
    tags: Vec<CString>,
    slots: u32,
    running: usize,
    draining: bool,
}

impl wp_worker_info {
    pub(crate) fn new(info: WorkerInfo) -> wp_worker_info {
        wp_worker_info {
            id: info.id,
            name: c_text(&info.name),
            address: info.address.map(|a| c_text(&a.to_string())),
            platform: c_text(&info.platform),
            tags: info.tags.iter().map(|t| c_text(t)).collect(),
            slots: info.slots,
            running: info.running,
            draining: info.draining,
        }
    }
}

/// The manager's id for the worker's connection; 0 for NULL. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_info_id(info: *const wp_worker_info) -> u64 {
    ffi!(0, { arg_or!(info, 0).id })
}

/// The name the worker announced; NULL for NULL.
///
/// Ownership: owned by the list or event it came from. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_info_name(info: *const wp_worker_info) -> *const c_char {
    ffi!(std::ptr::null(), {
        arg_or!(info, std::ptr::null()).name.as_ptr()
    })
}

/// Where it connected from, as `ADDRESS:PORT`; NULL when not known (and for NULL).
///
/// Ownership: owned by the list or event it came from. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_info_address(info: *const wp_worker_info) -> *const c_char {
    ffi!(std::ptr::null(), {
        c_ptr(arg_or!(info, std::ptr::null()).address.as_ref())
    })
}

/// The platform it announced, e.g. `linux-x86_64`; NULL for NULL.
///
/// Ownership: owned by the list or event it came from. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_info_platform(info: *const wp_worker_info) -> *const c_char {
    ffi!(std::ptr::null(), {
        arg_or!(info, std::ptr::null()).platform.as_ptr()
    })
}

/// How many tags it has; 0 for NULL. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_info_tag_count(info: *const wp_worker_info) -> usize {
    ffi!(0, { arg_or!(info, 0).tags.len() })
}

/// Tag number `index` (from 0, in sorted order); NULL when out of range (and for NULL).
///
/// Ownership: owned by the list or event it came from. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_info_tag(
    info: *const wp_worker_info,
    index: usize,
) -> *const c_char {
    ffi!(std::ptr::null(), {
        c_ptr(arg_or!(info, std::ptr::null()).tags.get(index))
    })
}

/// How many jobs it runs at once; 0 for NULL. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_info_slots(info: *const wp_worker_info) -> u32 {
    ffi!(0, { arg_or!(info, 0).slots })
}

/// How many it was running; 0 for NULL. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_info_running(info: *const wp_worker_info) -> usize {
    ffi!(0, { arg_or!(info, 0).running })
}

/// Whether it was draining (taking no new jobs, leaving when its jobs end); false for
/// NULL. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_info_draining(info: *const wp_worker_info) -> bool {
    ffi!(false, { arg_or!(info, false).draining })
}

/// The workers connected when `wp_manager_workers` or `wp_client_workers` was called.
/// Freed once with `wp_worker_list_free`. Every accessor only reads, so a list may be
/// read from several threads at once.
pub struct wp_worker_list {
    items: Vec<wp_worker_info>,
}

impl wp_worker_list {
    pub(crate) fn new(workers: Vec<WorkerInfo>) -> wp_worker_list {
        wp_worker_list {
            items: workers.into_iter().map(wp_worker_info::new).collect(),
        }
    }
}

/// How many workers the list holds; 0 for NULL. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_list_len(list: *const wp_worker_list) -> usize {
    ffi!(0, { arg_or!(list, 0).items.len() })
}

/// Worker number `index` (from 0); NULL when out of range (and for NULL).
///
/// Ownership: owned by the list, valid until `wp_worker_list_free`; never free it on its
/// own. Threads: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_list_get(
    list: *const wp_worker_list,
    index: usize,
) -> *const wp_worker_info {
    ffi!(std::ptr::null(), {
        arg_or!(list, std::ptr::null())
            .items
            .get(index)
            .map_or(std::ptr::null(), |w| w as *const wp_worker_info)
    })
}

/// Frees a worker list; NULL does nothing.
///
/// Ownership: call it once per list, after every other call on it (and on its entries)
/// returned.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_list_free(list: *mut wp_worker_list) {
    ffi!((), { free(list) })
}

/// The scalar figures of a `wp_stats` snapshot (`wp_stats_figures`). Durations are in
/// milliseconds or microseconds, as their names say.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct wp_stats_figures {
    /// Connected workers.
    pub workers: usize,
    /// Of which draining.
    pub workers_draining: usize,
    /// Slots of the connected workers.
    pub slots_total: usize,
    /// Of which running a job.
    pub slots_busy: usize,
    /// Jobs waiting for a worker.
    pub jobs_queued: usize,
    /// Jobs running (including those whose worker is reconnecting).
    pub jobs_running: usize,
    /// Jobs whose worker is reconnecting.
    pub jobs_disconnected: usize,
    /// Jobs accepted since the manager started.
    pub jobs_submitted: u64,
    /// Jobs ended, all outcomes together.
    pub jobs_ended: u64,
    /// Jobs ended `WP_OUTCOME_EXITED` (any code).
    pub jobs_exited: u64,
    /// Jobs ended `WP_OUTCOME_SIGNALED`.
    pub jobs_signaled: u64,
    /// Jobs ended `WP_OUTCOME_TIMED_OUT`.
    pub jobs_timed_out: u64,
    /// Jobs ended `WP_OUTCOME_CANCELLED`.
    pub jobs_cancelled: u64,
    /// Jobs ended `WP_OUTCOME_WORKER_LOST`.
    pub jobs_worker_lost: u64,
    /// Jobs ended `WP_OUTCOME_REJECTED`.
    pub jobs_rejected: u64,
    /// Jobs ended `WP_OUTCOME_SPAWN_FAILED`.
    pub jobs_spawn_failed: u64,
    /// How long the longest-waiting queued job had waited, in milliseconds; 0 when no
    /// job was queued.
    pub oldest_queued_wait_ms: u64,
    /// How many jobs have started (each start counts): the queue-wait observations.
    pub queue_wait_count: u64,
    /// Their total time from submission (or re-queueing) to start, in seconds.
    pub queue_wait_sum_seconds: f64,
    /// The upper bound of the histogram bucket that holds the median queue wait, in
    /// microseconds; 0 when there are no observations.
    pub queue_wait_p50_us: u64,
    /// The same for the 99th percentile.
    pub queue_wait_p99_us: u64,
    /// How many jobs found a free worker at once: the dispatch-latency observations.
    pub dispatch_latency_count: u64,
    /// Their total time from submission to the job being handed to its worker's link, in
    /// seconds.
    pub dispatch_latency_sum_seconds: f64,
    /// The upper bound of the bucket that holds the median dispatch latency, in
    /// microseconds; 0 when there are no observations.
    pub dispatch_latency_p50_us: u64,
    /// The same for the 99th percentile.
    pub dispatch_latency_p99_us: u64,
    /// Output bytes received from workers.
    pub output_bytes: u64,
    /// Bytes the manager's journal takes on disk; 0 without a journal.
    pub journal_bytes: u64,
}

/// One connected worker's figures (`wp_stats_worker`). `name` is owned by the
/// `wp_stats` it came from.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct wp_worker_stats {
    /// Its name (NUL-terminated).
    pub name: *const c_char,
    /// Jobs it has been given since it connected.
    pub jobs_run: u64,
    /// Jobs it was running.
    pub running: usize,
    /// Its slots.
    pub slots: u32,
    /// Whether it was draining.
    pub draining: bool,
    /// How long since the manager last heard from it (any frame), in milliseconds.
    pub last_heard_ms: u64,
    /// How long it had been connected, in milliseconds.
    pub connected_for_ms: u64,
}

/// A snapshot of a manager's figures. Made by `wp_manager_stats` or `wp_client_stats`;
/// freed once with `wp_stats_free`. Every accessor only reads, so a snapshot may be read
/// from several threads at once.
pub struct wp_stats {
    inner: Stats,
    names: Vec<CString>,
    prometheus: OnceLock<CString>,
}

impl wp_stats {
    pub(crate) fn new(inner: Stats) -> wp_stats {
        wp_stats {
            names: inner.per_worker.iter().map(|w| c_text(&w.name)).collect(),
            inner,
            prometheus: OnceLock::new(),
        }
    }

    fn figures(&self) -> wp_stats_figures {
        let s = &self.inner;
        let ended = |name: &str| {
            s.jobs_finished
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0, |(_, c)| *c)
        };
        let micros = |h: &Histogram, q: f64| {
            h.quantile(q)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        };
        wp_stats_figures {
            workers: s.workers,
            workers_draining: s.workers_draining,
            slots_total: s.slots_total,
            slots_busy: s.slots_busy,
            jobs_queued: s.jobs_queued,
            jobs_running: s.jobs_running,
            jobs_disconnected: s.jobs_disconnected,
            jobs_submitted: s.jobs_submitted,
            jobs_ended: s.jobs_ended(),
            jobs_exited: ended("exited"),
            jobs_signaled: ended("signaled"),
            jobs_timed_out: ended("timed_out"),
            jobs_cancelled: ended("cancelled"),
            jobs_worker_lost: ended("worker_lost"),
            jobs_rejected: ended("rejected"),
            jobs_spawn_failed: ended("spawn_failed"),
            oldest_queued_wait_ms: s.oldest_queued_wait.map_or(0, millis),
            queue_wait_count: s.queue_wait.count,
            queue_wait_sum_seconds: s.queue_wait.sum,
            queue_wait_p50_us: micros(&s.queue_wait, 0.5),
            queue_wait_p99_us: micros(&s.queue_wait, 0.99),
            dispatch_latency_count: s.dispatch_latency.count,
            dispatch_latency_sum_seconds: s.dispatch_latency.sum,
            dispatch_latency_p50_us: micros(&s.dispatch_latency, 0.5),
            dispatch_latency_p99_us: micros(&s.dispatch_latency, 0.99),
            output_bytes: s.output_bytes,
            journal_bytes: s.journal_bytes.unwrap_or(0),
        }
    }
}

/// Writes the snapshot's scalar figures to `*out`.
///
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_stats_get(
    stats: *const wp_stats,
    out: *mut wp_stats_figures,
) -> wp_result {
    ffi!({
        let stats = arg!(stats);
        out!(out);
        write(out, stats.figures())
    })
}

/// How many workers the snapshot has figures for (`wp_stats_worker`); 0 for NULL.
///
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_stats_worker_count(stats: *const wp_stats) -> usize {
    ffi!(0, { arg_or!(stats, 0).inner.per_worker.len() })
}

/// Writes the figures of worker number `index` (from 0) to `*out`;
/// `WP_RESULT_INVALID_ARGUMENT` when `index` is out of range.
///
/// Ownership: `out->name` is owned by the snapshot, valid until `wp_stats_free`.
/// Threads: any, concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_stats_worker(
    stats: *const wp_stats,
    index: usize,
    out: *mut wp_worker_stats,
) -> wp_result {
    ffi!({
        let stats = arg!(stats);
        out!(out);
        let (Some(w), Some(name)) = (stats.inner.per_worker.get(index), stats.names.get(index))
        else {
            return fail(
                WP_RESULT_INVALID_ARGUMENT,
                format!(
                    "worker index {index} is out of range (the snapshot has {})",
                    stats.names.len()
                ),
            );
        };
        write(
            out,
            wp_worker_stats {
                name: name.as_ptr(),
                jobs_run: w.jobs_run,
                running: w.running,
                slots: w.slots,
                draining: w.draining,
                last_heard_ms: millis(w.last_heard),
                connected_for_ms: millis(w.connected_for),
            },
        )
    })
}

/// The snapshot in the Prometheus text format (as the metrics endpoint serves it);
/// NULL for NULL.
///
/// Ownership: owned by the snapshot, valid until `wp_stats_free`. Threads: any,
/// concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_stats_prometheus(stats: *const wp_stats) -> *const c_char {
    ffi!(std::ptr::null(), {
        let stats = arg_or!(stats, std::ptr::null());
        stats
            .prometheus
            .get_or_init(|| c_text(&stats.inner.to_prometheus()))
            .as_ptr()
    })
}

/// Frees a snapshot; NULL does nothing.
///
/// Ownership: call it once per snapshot, after every other call on it returned.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_stats_free(stats: *mut wp_stats) {
    ffi!((), { free(stats) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stats_figures_take_every_outcome_by_name_and_quantiles_in_microseconds() {
        let mut queue_wait = Histogram::default();
        queue_wait.observe(Duration::from_micros(1500));
        let s = wp_stats::new(Stats {
            workers: 2,
            workers_draining: 1,
            slots_total: 4,
            slots_busy: 3,
            jobs_queued: 5,
            jobs_running: 3,
            jobs_disconnected: 1,
            jobs_submitted: 40,
            jobs_finished: crate::metrics::OUTCOMES
                .iter()
                .enumerate()
                .map(|(i, n)| (*n, i as u64 + 1))
                .collect(),
            oldest_queued_wait: Some(Duration::from_millis(2500)),
            queue_wait,
            dispatch_latency: Histogram::default(),
            output_bytes: 99,
            per_worker: Vec::new(),
            journal_bytes: Some(4096),
        });
        let f = s.figures();
        assert_eq!(
            [
                f.jobs_exited,
                f.jobs_signaled,
                f.jobs_timed_out,
                f.jobs_cancelled,
                f.jobs_worker_lost,
                f.jobs_rejected,
                f.jobs_spawn_failed
            ],
            [1, 2, 3, 4, 5, 6, 7]
        );
        assert_eq!(f.jobs_ended, 28);
        assert_eq!(f.oldest_queued_wait_ms, 2500);
        // 1.5 ms falls in the bucket that ends at 2 ms.
        assert_eq!((f.queue_wait_p50_us, f.queue_wait_p99_us), (2000, 2000));
        assert_eq!(f.queue_wait_count, 1);
        assert_eq!(
            (f.dispatch_latency_count, f.dispatch_latency_p50_us),
            (0, 0)
        );
        assert_eq!((f.workers, f.slots_busy, f.output_bytes), (2, 3, 99));
        assert_eq!(f.journal_bytes, 4096);
    }
}
