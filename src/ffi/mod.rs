//! The C ABI (`include/workpool.h`): opaque handles over the Rust API, one result enum,
//! panics caught at the boundary. No logic lives here that Rust users lack; each
//! function converts its arguments, calls the Rust API, and converts the answer.
//!
//! Conventions: inputs first, outputs last (`**out`); a failed call writes nothing to
//! its outputs and leaves its message for `wp_last_error_message` on the calling thread;
//! `_free(NULL)` does nothing; every string is NUL-terminated UTF-8.

#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]

use crate::error::Error;
use crate::job::{JobEvent, JobSpec, Outcome, Stream};
use crate::manager::{JobHandle, Manager, ManagerConfig};
use crate::tls::{Identity, PeerTrust};
use crate::worker::{Worker, WorkerConfig};
use std::cell::RefCell;
use std::ffi::{CStr, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

/// What a fallible call returns. Values are fixed and never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum wp_result {
    /// It worked.
    WP_RESULT_OK = 0,
    /// Nothing happened before the timeout (`wp_job_next_event`).
    WP_RESULT_TIMEOUT = 1,
    /// A required pointer was NULL.
    WP_RESULT_NULL_PARAMETER = 2,
    /// An argument is not valid: not UTF-8, not an address, missing configuration, ...
    WP_RESULT_INVALID_ARGUMENT = 3,
    /// An operating-system error: a file, a socket, a thread.
    WP_RESULT_IO = 4,
    /// A certificate or key problem, or a refused handshake.
    WP_RESULT_TLS = 5,
    /// The manager's queue is full; the job was not queued.
    WP_RESULT_QUEUE_FULL = 6,
    /// The manager or worker has shut down.
    WP_RESULT_SHUT_DOWN = 7,
    /// A bug: workpool panicked. The call did nothing.
    WP_RESULT_PANIC = 8,
    /// The job's last event (`WP_EVENT_FINISHED`) was already delivered.
    WP_RESULT_ENDED = 9,
    /// No such job (it ended or never existed).
    WP_RESULT_UNKNOWN_JOB = 10,
    /// A protocol error with a peer.
    WP_RESULT_PROTOCOL = 11,
}

use wp_result::*;

/// What happened to a job (`wp_event.kind`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum wp_event_kind {
    /// The job waits in the queue.
    WP_EVENT_QUEUED = 0,
    /// A worker took it; `data`/`len` hold the worker's name.
    WP_EVENT_STARTED = 1,
    /// Output bytes in `data`/`len`, from `stream`.
    WP_EVENT_OUTPUT = 2,
    /// The job ended: see `outcome` and `exit_code`. Nothing follows.
    WP_EVENT_FINISHED = 3,
    /// A warning text in `data`/`len` (for example: its folder could not be deleted).
    WP_EVENT_WARNING = 4,
    /// Its worker was lost and it waits in the queue again (`exit_code` = next attempt).
    WP_EVENT_REQUEUED = 5,
}

/// Which output stream (`wp_event.stream`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum wp_stream {
    /// Standard output.
    WP_STREAM_STDOUT = 0,
    /// Standard error.
    WP_STREAM_STDERR = 1,
}

/// How a job ended (`wp_event.outcome`, for `WP_EVENT_FINISHED`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum wp_outcome {
    /// Not a `WP_EVENT_FINISHED` event.
    WP_OUTCOME_NONE = 0,
    /// The script exited; `exit_code` is its code.
    WP_OUTCOME_EXITED = 1,
    /// The script was killed by signal `exit_code`.
    WP_OUTCOME_SIGNALED = 2,
    /// It ran past its timeout.
    WP_OUTCOME_TIMED_OUT = 3,
    /// It was cancelled.
    WP_OUTCOME_CANCELLED = 4,
    /// Its worker went away.
    WP_OUTCOME_WORKER_LOST = 5,
    /// It never ran (for example: the manager shut down); the reason is in `data`/`len`.
    WP_OUTCOME_REJECTED = 6,
    /// The worker could not start it; the reason is in `data`/`len`.
    WP_OUTCOME_SPAWN_FAILED = 7,
}

/// One job event. `data` points into the job handle and stays valid until the next call
/// on that job (or `wp_job_free`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct wp_event {
    /// What happened.
    pub kind: wp_event_kind,
    /// For `WP_EVENT_OUTPUT`: which stream.
    pub stream: wp_stream,
    /// Bytes that go with the event (see `wp_event_kind`); not NUL-terminated.
    pub data: *const u8,
    /// How many bytes `data` holds.
    pub len: usize,
    /// For `WP_EVENT_FINISHED`: how the job ended.
    pub outcome: wp_outcome,
    /// For `WP_OUTCOME_EXITED`: the exit code; `WP_OUTCOME_SIGNALED`: the signal;
    /// `WP_EVENT_REQUEUED`: the attempt that comes next.
    pub exit_code: i32,
}

/// Settings for `wp_manager_start`. Made by `wp_manager_config_new`; freed once with
/// `wp_manager_config_free`. Threads: use from one thread at a time (setters change it);
/// `wp_manager_start` only reads it, so one config may start several managers.
pub struct wp_manager_config {
    listen: String,
    identity: Option<Identity>,
    worker_trust: PeerTrust,
    max_connections_per_certificate: Option<usize>,
    handshake_timeout: Duration,
    max_handshakes: usize,
    max_handshakes_per_source: usize,
}

/// A running manager. Made by `wp_manager_start`; `wp_manager_free` (called once, after
/// every other call on it has returned) shuts it down, then frees it. Threads: every
/// other `wp_manager_*` function may be called from several threads at once.
pub struct wp_manager {
    inner: Manager,
}

/// Settings for `wp_worker_start`. Made by `wp_worker_config_new`; freed once with
/// `wp_worker_config_free`. Threads: use from one thread at a time (setters change it);
/// `wp_worker_start` only reads it.
pub struct wp_worker_config {
    host: Option<String>,
    port: u16,
    identity: Option<Identity>,
    manager_trust: PeerTrust,
    name: Option<String>,
    tags: Vec<String>,
    slots: u32,
    verify_hostname: bool,
    job_user: Option<String>,
}

/// A running worker. Made by `wp_worker_start`; `wp_worker_free` (called once, after
/// every other call on it has returned) stops it, then frees it. Threads: every other
/// `wp_worker_*` function may be called from several threads at once.
pub struct wp_worker {
    /// Held for its `Drop`, which stops the worker.
    _inner: Worker,
}

/// A submitted job. Made by `wp_manager_submit`; `wp_job_free`, called once, forgets it
/// (the job itself goes on; cancel it first if it should not). Threads: use from one
/// thread at a time (`wp_job_next_event` hands out bytes that live in the handle), though
/// the thread may change from call to call; different jobs may be used at once.
pub struct wp_job {
    inner: JobHandle,
    /// The bytes of the last event handed out.
    data: Vec<u8>,
    ended: bool,
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn fail(code: wp_result, message: impl Into<String>) -> wp_result {
    LAST_ERROR.with(|e| *e.borrow_mut() = message.into());
    code
}

fn code_of(e: &Error) -> wp_result {
    match e {
        Error::Io { .. } => WP_RESULT_IO,
        Error::Tls(_) | Error::Pem(_) => WP_RESULT_TLS,
        Error::InvalidConfig(_) | Error::InvalidJob(_) => WP_RESULT_INVALID_ARGUMENT,
        Error::QueueFull { .. } => WP_RESULT_QUEUE_FULL,
        Error::ShutDown => WP_RESULT_SHUT_DOWN,
        Error::UnknownJob(_) => WP_RESULT_UNKNOWN_JOB,
        Error::Timeout(_) => WP_RESULT_TIMEOUT,
        _ => WP_RESULT_PROTOCOL,
    }
}

fn from_error(e: Error) -> wp_result {
    let code = code_of(&e);
    fail(code, e.to_string())
}

/// Runs an `extern "C"` body: a panic becomes `WP_RESULT_PANIC` (or the given default).
macro_rules! ffi {
    ($default:expr, $body:block) => {
        match catch_unwind(AssertUnwindSafe(|| $body)) {
            Ok(v) => v,
            Err(_) => {
                fail(
                    WP_RESULT_PANIC,
                    "workpool panicked (a bug); the call did nothing",
                );
                $default
            }
        }
    };
    ($body:block) => {
        ffi!(WP_RESULT_PANIC, $body)
    };
}

/// Turns a pointer argument into a reference, or returns `WP_RESULT_NULL_PARAMETER`.
macro_rules! arg {
    ($p:expr) => {
        // SAFETY: the C caller passes NULL or a pointer to a live handle of this type (the
        // header's contract for every handle argument); NULL is answered above the deref.
        match unsafe { $p.as_ref() } {
            Some(r) => r,
            None => {
                return fail(
                    WP_RESULT_NULL_PARAMETER,
                    concat!(stringify!($p), " is NULL"),
                )
            }
        }
    };
}

/// Same, mutably.
macro_rules! arg_mut {
    ($p:expr) => {
        // SAFETY: as in `arg!`, and the caller does not use the handle from another thread
        // during the call (each mutating function's contract in the header).
        match unsafe { $p.as_mut() } {
            Some(r) => r,
            None => {
                return fail(
                    WP_RESULT_NULL_PARAMETER,
                    concat!(stringify!($p), " is NULL"),
                )
            }
        }
    };
}

/// A NUL-terminated UTF-8 string argument.
macro_rules! text {
    ($p:expr) => {{
        if $p.is_null() {
            return fail(
                WP_RESULT_NULL_PARAMETER,
                concat!(stringify!($p), " is NULL"),
            );
        }
        // SAFETY: checked non-NULL just above; the caller passes a NUL-terminated string that
        // stays valid for the call (the header's contract for every string argument).
        match unsafe { CStr::from_ptr($p) }.to_str() {
            Ok(s) => s,
            Err(_) => {
                return fail(
                    WP_RESULT_INVALID_ARGUMENT,
                    concat!(stringify!($p), " is not valid UTF-8"),
                );
            }
        }
    }};
}

/// Checks an output pointer before any work is done.
macro_rules! out {
    ($p:expr) => {
        if $p.is_null() {
            return fail(
                WP_RESULT_NULL_PARAMETER,
                concat!(stringify!($p), " is NULL"),
            );
        }
    };
}

/// Loads an identity from two PEM files into a configuration.
unsafe fn set_identity(
    slot: &mut Option<Identity>,
    cert_path: *const c_char,
    key_path: *const c_char,
) -> wp_result {
    let (cert, key) = (text!(cert_path), text!(key_path));
    match Identity::from_pem_files(cert, key) {
        Ok(id) => {
            *slot = Some(id);
            WP_RESULT_OK
        }
        Err(e) => from_error(e),
    }
}

/// Which list of a [`PeerTrust`] a PEM file goes to.
#[derive(Clone, Copy)]
enum TrustKind {
    Pinned,
    Ca,
}

/// Adds the certificates of a PEM file to the pinned certificates or to the CAs.
unsafe fn add_trust(trust: &mut PeerTrust, path: *const c_char, kind: TrustKind) -> wp_result {
    let path = text!(path);
    let added = match kind {
        TrustKind::Pinned => trust.add_pinned_pem_file(path),
        TrustKind::Ca => trust.add_ca_pem_file(path),
    };
    match added {
        Ok(()) => WP_RESULT_OK,
        Err(e) => from_error(e),
    }
}

fn boxed<T>(out: *mut *mut T, value: T) -> wp_result {
    // SAFETY: every caller checked `out` with `out!` first, and the C caller passes a
    // writable `**out` (the header's contract).
    unsafe { *out = Box::into_raw(Box::new(value)) };
    WP_RESULT_OK
}

fn free<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: `p` is non-NULL and, by the `_free` contract, came from `boxed` for this
        // type and is freed only once.
        drop(unsafe { Box::from_raw(p) });
    }
}

/// A static, NUL-terminated name for a result code, e.g. `"WP_RESULT_OK"`;
/// `"WP_RESULT_UNKNOWN"` for a value that is not a `wp_result`. It takes a plain
/// integer, so any value a C program passes is safe. Callable from any thread; the
/// string is never freed.
#[unsafe(no_mangle)]
pub extern "C" fn wp_result_name(result: u32) -> *const c_char {
    let name: &'static [u8] = match result {
        0 => b"WP_RESULT_OK\0",
        1 => b"WP_RESULT_TIMEOUT\0",
        2 => b"WP_RESULT_NULL_PARAMETER\0",
        3 => b"WP_RESULT_INVALID_ARGUMENT\0",
        4 => b"WP_RESULT_IO\0",
        5 => b"WP_RESULT_TLS\0",
        6 => b"WP_RESULT_QUEUE_FULL\0",
        7 => b"WP_RESULT_SHUT_DOWN\0",
        8 => b"WP_RESULT_PANIC\0",
        9 => b"WP_RESULT_ENDED\0",
        10 => b"WP_RESULT_UNKNOWN_JOB\0",
        11 => b"WP_RESULT_PROTOCOL\0",
        _ => b"WP_RESULT_UNKNOWN\0",
    };
    name.as_ptr() as *const c_char
}

/// Copies this thread's last failure message into `buf` (NUL-terminated, cut to fit)
/// and returns its full length in bytes (without the NUL). `buf` may be NULL to ask the
/// length.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_last_error_message(buf: *mut c_char, len: usize) -> usize {
    ffi!(0, {
        LAST_ERROR.with(|e| {
            let msg = e.borrow();
            if !buf.is_null() && len > 0 {
                let n = msg.len().min(len - 1);
                // SAFETY: `buf` is non-NULL and writable for `len` bytes (the caller's promise); `n + 1
                // <= len`, and `msg` is a live string of at least `n` bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(msg.as_ptr(), buf as *mut u8, n);
                    *buf.add(n) = 0;
                }
            }
            msg.len()
        })
    })
}

/// A new manager configuration: listen on `127.0.0.1:9001`, no identity yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_new(out: *mut *mut wp_manager_config) -> wp_result {
    ffi!({
        out!(out);
        let defaults = ManagerConfig::insecure_plaintext("127.0.0.1:9001");
        boxed(
            out,
            wp_manager_config {
                listen: defaults.listen,
                identity: None,
                worker_trust: PeerTrust::new(),
                max_connections_per_certificate: None,
                handshake_timeout: defaults.handshake_timeout,
                max_handshakes: defaults.max_handshakes,
                max_handshakes_per_source: defaults.max_handshakes_per_source,
            },
        )
    })
}

/// Sets the address to listen on, e.g. `"0.0.0.0:9001"` or `"127.0.0.1:0"` (any free port).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_listen(
    config: *mut wp_manager_config,
    address: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let address = text!(address);
        if std::net::ToSocketAddrs::to_socket_addrs(address).is_err() {
            return fail(
                WP_RESULT_INVALID_ARGUMENT,
                format!("{address:?} is not a HOST:PORT address"),
            );
        }
        config.listen = address.to_string();
        WP_RESULT_OK
    })
}

/// Loads the manager's certificate chain and key from PEM files.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_identity_pem_files(
    config: *mut wp_manager_config,
    cert_path: *const c_char,
    key_path: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        // SAFETY: the two paths are the caller's NUL-terminated strings, checked by `text!`.
        unsafe { set_identity(&mut config.identity, cert_path, key_path) }
    })
}

/// Pins the self-signed worker certificates in a PEM file: a worker presenting exactly
/// one of them is accepted (within its validity period). A pinned certificate is accepted
/// only as itself, never as the issuer of another, even when it says `CA:TRUE`. A
/// certificate that is not self-signed is refused (`WP_RESULT_INVALID_ARGUMENT`): trust
/// its CA instead.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_add_worker_certificate_pem_file(
    config: *mut wp_manager_config,
    path: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        // SAFETY: `path` is NULL (refused) or a NUL-terminated string, as documented.
        unsafe { add_trust(&mut config.worker_trust, path, TrustKind::Pinned) }
    })
}

/// Trusts the CA certificates in a PEM file as issuers of worker certificates: a worker
/// whose certificate one of them issued (for client authentication) is accepted.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_add_worker_ca_pem_file(
    config: *mut wp_manager_config,
    path: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        // SAFETY: `path` is NULL (refused) or a NUL-terminated string, as documented.
        unsafe { add_trust(&mut config.worker_trust, path, TrustKind::Ca) }
    })
}

/// The former name of `wp_manager_config_add_worker_certificate_pem_file`, and the same:
/// it pins (CAs go to `wp_manager_config_add_worker_ca_pem_file`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_add_worker_root_pem_file(
    config: *mut wp_manager_config,
    path: *const c_char,
) -> wp_result {
    // SAFETY: the same arguments, passed on unchanged.
    unsafe { wp_manager_config_add_worker_certificate_pem_file(config, path) }
}

/// Sets how many connections may present the same worker certificate at once (default
/// 4; at least 1). More are refused when they register.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_max_connections_per_certificate(
    config: *mut wp_manager_config,
    max: u32,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        if max == 0 {
            return fail(
                WP_RESULT_INVALID_ARGUMENT,
                "max_connections_per_certificate must be at least 1",
            );
        }
        config.max_connections_per_certificate = Some(max as usize);
        WP_RESULT_OK
    })
}

/// Sets the deadline for a new connection's TLS handshake and hello, in milliseconds,
/// counted from its acceptance however the peer spaces its bytes (default 10000; 1 to
/// 3600000).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_handshake_timeout_ms(
    config: *mut wp_manager_config,
    ms: u64,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        if ms == 0 || ms > 3_600_000 {
            return fail(
                WP_RESULT_INVALID_ARGUMENT,
                "the handshake timeout must be 1 to 3600000 ms",
            );
        }
        config.handshake_timeout = Duration::from_millis(ms);
        WP_RESULT_OK
    })
}

/// Sets how many connections may be in handshake at once (default 256). When all are
/// taken, a new connection displaces the oldest handshake of the source holding the most.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_max_handshakes(
    config: *mut wp_manager_config,
    max: u32,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        if max == 0 {
            return fail(
                WP_RESULT_INVALID_ARGUMENT,
                "max_handshakes must be at least 1",
            );
        }
        config.max_handshakes = max as usize;
        WP_RESULT_OK
    })
}

/// Sets how many connections from one source (an IPv4 address, or an IPv6 /64) may be
/// in handshake at once (default 8). A new connection beyond it displaces that source's
/// oldest handshake.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_max_handshakes_per_source(
    config: *mut wp_manager_config,
    max: u32,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        if max == 0 {
            return fail(
                WP_RESULT_INVALID_ARGUMENT,
                "max_handshakes_per_source must be at least 1",
            );
        }
        config.max_handshakes_per_source = max as usize;
        WP_RESULT_OK
    })
}

/// Frees a configuration. NULL is fine.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_free(config: *mut wp_manager_config) {
    ffi!((), { free(config) })
}

/// Starts a manager: binds the port and starts its threads. The configuration is only
/// read; free it whenever convenient.
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
        let mut rust =
            ManagerConfig::new(config.listen.clone(), identity, config.worker_trust.clone());
        if let Some(max) = config.max_connections_per_certificate {
            rust.max_connections_per_certificate = max;
        }
        rust.handshake_timeout = config.handshake_timeout;
        rust.max_handshakes = config.max_handshakes;
        rust.max_handshakes_per_source = config.max_handshakes_per_source;
        match Manager::bind(rust) {
            Ok(m) => boxed(out, wp_manager { inner: m }),
            Err(e) => from_error(e),
        }
    })
}

/// The port the manager listens on (the real one when configured with port 0); 0 for NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_port(manager: *const wp_manager) -> u16 {
    ffi!(0, {
        // SAFETY: NULL or a live manager handle, as the header requires.
        match unsafe { manager.as_ref() } {
            Some(m) => m.inner.local_addr().port(),
            None => 0,
        }
    })
}

/// Submits `/bin/bash -c script` to run on any worker. The job's handle goes to `*out`.
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
        match manager.inner.submit(JobSpec::new(script)) {
            Ok(h) => boxed(
                out,
                wp_job {
                    inner: h,
                    data: Vec::new(),
                    ended: false,
                },
            ),
            Err(e) => from_error(e),
        }
    })
}

/// Shuts the manager down (queued jobs end rejected, running ones get the shutdown
/// grace, then are cancelled), waits for its threads, and frees it. NULL is fine.
/// Handles of its jobs stay valid and report how their jobs ended.
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

/// A new worker configuration: one slot, hostname verification on, named HOSTNAME-PID.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_new(out: *mut *mut wp_worker_config) -> wp_result {
    ffi!({
        out!(out);
        boxed(
            out,
            wp_worker_config {
                host: None,
                port: 9001,
                identity: None,
                manager_trust: PeerTrust::new(),
                name: None,
                tags: Vec::new(),
                slots: 1,
                verify_hostname: true,
                job_user: None,
            },
        )
    })
}

/// Sets the manager to dial.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_manager(
    config: *mut wp_worker_config,
    host: *const c_char,
    port: u16,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let host = text!(host);
        if host.is_empty() || port == 0 {
            return fail(
                WP_RESULT_INVALID_ARGUMENT,
                "the manager's host must not be empty nor its port 0",
            );
        }
        config.host = Some(host.to_string());
        config.port = port;
        WP_RESULT_OK
    })
}

/// Loads the worker's certificate chain and key from PEM files.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_identity_pem_files(
    config: *mut wp_worker_config,
    cert_path: *const c_char,
    key_path: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        // SAFETY: the two paths are the caller's NUL-terminated strings, checked by `text!`.
        unsafe { set_identity(&mut config.identity, cert_path, key_path) }
    })
}

/// Pins the manager's self-signed certificate(s) in a PEM file: a manager presenting
/// exactly one of them is accepted (within its validity period). A pinned certificate is
/// accepted only as itself, never as the issuer of another, even when it says `CA:TRUE`.
/// A certificate that is not self-signed is refused (`WP_RESULT_INVALID_ARGUMENT`): trust
/// its CA instead.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_add_manager_certificate_pem_file(
    config: *mut wp_worker_config,
    path: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        // SAFETY: `path` is NULL (refused) or a NUL-terminated string, as documented.
        unsafe { add_trust(&mut config.manager_trust, path, TrustKind::Pinned) }
    })
}

/// Trusts the CA certificates in a PEM file as issuers of the manager's certificate: a
/// manager whose certificate one of them issued (for server authentication) is accepted.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_add_manager_ca_pem_file(
    config: *mut wp_worker_config,
    path: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        // SAFETY: `path` is NULL (refused) or a NUL-terminated string, as documented.
        unsafe { add_trust(&mut config.manager_trust, path, TrustKind::Ca) }
    })
}

/// The former name of `wp_worker_config_add_manager_certificate_pem_file`, and the same:
/// it pins (CAs go to `wp_worker_config_add_manager_ca_pem_file`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_add_manager_root_pem_file(
    config: *mut wp_worker_config,
    path: *const c_char,
) -> wp_result {
    // SAFETY: the same arguments, passed on unchanged.
    unsafe { wp_worker_config_add_manager_certificate_pem_file(config, path) }
}

/// Sets the name the worker announces.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_name(
    config: *mut wp_worker_config,
    name: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let name = text!(name);
        if name.is_empty() || name.len() > 256 {
            return fail(
                WP_RESULT_INVALID_ARGUMENT,
                "a worker name must have 1 to 256 bytes",
            );
        }
        config.name = Some(name.to_string());
        WP_RESULT_OK
    })
}

/// Adds a tag that jobs can require.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_add_tag(
    config: *mut wp_worker_config,
    tag: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let tag = text!(tag);
        if tag.is_empty() {
            return fail(WP_RESULT_INVALID_ARGUMENT, "a tag must not be empty");
        }
        config.tags.push(tag.to_string());
        WP_RESULT_OK
    })
}

/// Sets how many jobs run at once (1 to 1024).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_slots(
    config: *mut wp_worker_config,
    slots: u32,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        if slots == 0 || slots > 1024 {
            return fail(WP_RESULT_INVALID_ARGUMENT, "slots must be 1 to 1024");
        }
        config.slots = slots;
        WP_RESULT_OK
    })
}

/// Turns the check that the manager's certificate names its host on (default) or off.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_verify_hostname(
    config: *mut wp_worker_config,
    verify: bool,
) -> wp_result {
    ffi!({
        arg_mut!(config).verify_hostname = verify;
        WP_RESULT_OK
    })
}

/// Runs every job as the user called `user`, with its primary group and no other group,
/// so that jobs cannot read the worker's key or other users' files (their folders belong
/// to that user). `wp_worker_start` fails (`WP_RESULT_INVALID_ARGUMENT`) unless the
/// process runs as root and the user exists and is not root.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_job_user(
    config: *mut wp_worker_config,
    user: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let user = text!(user);
        if user.is_empty() {
            return fail(WP_RESULT_INVALID_ARGUMENT, "the job user's name is empty");
        }
        config.job_user = Some(user.to_string());
        WP_RESULT_OK
    })
}

/// Frees a configuration. NULL is fine.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_free(config: *mut wp_worker_config) {
    ffi!((), { free(config) })
}

/// Starts a worker in the background: it connects (and reconnects) by itself. The
/// configuration is only read.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_start(
    config: *const wp_worker_config,
    out: *mut *mut wp_worker,
) -> wp_result {
    ffi!({
        let c = arg!(config);
        out!(out);
        let (Some(host), Some(identity)) = (c.host.clone(), c.identity.clone()) else {
            return fail(
                WP_RESULT_INVALID_ARGUMENT,
                "the worker needs wp_worker_config_set_manager and wp_worker_config_set_identity_pem_files",
            );
        };
        let mut rust =
            WorkerConfig::new(host, c.port, identity, c.manager_trust.clone()).slots(c.slots);
        if let Some(name) = &c.name {
            rust = rust.name(name.clone());
        }
        for t in &c.tags {
            rust = rust.tag(t.clone());
        }
        if !c.verify_hostname {
            rust = rust.no_verify_hostname();
        }
        if let Some(user) = &c.job_user {
            rust = rust.job_user(user.clone());
        }
        match Worker::start(rust) {
            Ok(w) => boxed(out, wp_worker { _inner: w }),
            Err(e) => from_error(e),
        }
    })
}

/// Stops the worker (its running jobs are killed; the manager ends them lost), waits
/// for its threads, and frees it. NULL is fine.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_free(worker: *mut wp_worker) {
    ffi!((), { free(worker) })
}

/// Waits up to `timeout_ms` for the job's next event and writes it to `*out`.
/// `WP_RESULT_TIMEOUT`: none yet. `WP_RESULT_ENDED`: `WP_EVENT_FINISHED` was already
/// delivered. The event's `data` is valid until the next call on this job.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_next_event(
    job: *mut wp_job,
    timeout_ms: u32,
    out: *mut wp_event,
) -> wp_result {
    ffi!({
        let job = arg_mut!(job);
        out!(out);
        if job.ended {
            return fail(
                WP_RESULT_ENDED,
                "the job's last event was already delivered",
            );
        }
        let ev = match job
            .inner
            .events()
            .recv_timeout(Duration::from_millis(timeout_ms as u64))
        {
            Ok(ev) => ev,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => return WP_RESULT_TIMEOUT,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                JobEvent::Finished(Outcome::Rejected("the manager went away".into()))
            }
        };
        let mut event = wp_event {
            kind: wp_event_kind::WP_EVENT_QUEUED,
            stream: wp_stream::WP_STREAM_STDOUT,
            data: std::ptr::null(),
            len: 0,
            outcome: wp_outcome::WP_OUTCOME_NONE,
            exit_code: 0,
        };
        job.data.clear();
        match ev {
            JobEvent::Queued => {}
            JobEvent::Started { worker } => {
                event.kind = wp_event_kind::WP_EVENT_STARTED;
                job.data.extend_from_slice(worker.as_bytes());
            }
            JobEvent::Output { stream, bytes } => {
                event.kind = wp_event_kind::WP_EVENT_OUTPUT;
                event.stream = match stream {
                    Stream::Stdout => wp_stream::WP_STREAM_STDOUT,
                    Stream::Stderr => wp_stream::WP_STREAM_STDERR,
                };
                job.data = bytes;
            }
            JobEvent::Warning(w) => {
                event.kind = wp_event_kind::WP_EVENT_WARNING;
                job.data.extend_from_slice(w.as_bytes());
            }
            JobEvent::Requeued { attempt } => {
                event.kind = wp_event_kind::WP_EVENT_REQUEUED;
                event.exit_code = attempt as i32;
            }
            JobEvent::Finished(o) => {
                event.kind = wp_event_kind::WP_EVENT_FINISHED;
                job.ended = true;
                event.outcome = match o {
                    Outcome::Exited(c) => {
                        event.exit_code = c;
                        wp_outcome::WP_OUTCOME_EXITED
                    }
                    Outcome::Signaled(s) => {
                        event.exit_code = s;
                        wp_outcome::WP_OUTCOME_SIGNALED
                    }
                    Outcome::TimedOut => wp_outcome::WP_OUTCOME_TIMED_OUT,
                    Outcome::Cancelled => wp_outcome::WP_OUTCOME_CANCELLED,
                    Outcome::WorkerLost => wp_outcome::WP_OUTCOME_WORKER_LOST,
                    Outcome::Rejected(r) => {
                        job.data.extend_from_slice(r.as_bytes());
                        wp_outcome::WP_OUTCOME_REJECTED
                    }
                    Outcome::SpawnFailed(r) => {
                        job.data.extend_from_slice(r.as_bytes());
                        wp_outcome::WP_OUTCOME_SPAWN_FAILED
                    }
                };
            }
        }
        if !job.data.is_empty() {
            event.data = job.data.as_ptr();
            event.len = job.data.len();
        }
        // SAFETY: `out` was checked non-NULL with `out!` and is writable, as the header requires.
        unsafe { *out = event };
        WP_RESULT_OK
    })
}

/// Asks for the job to be cancelled (queued: it never starts; running: SIGTERM, then
/// SIGKILL). Its `WP_EVENT_FINISHED` says how it ended.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_cancel(job: *mut wp_job) -> wp_result {
    ffi!({
        match arg!(job).inner.cancel() {
            Ok(()) => WP_RESULT_OK,
            Err(e) => from_error(e),
        }
    })
}

/// The job's id (counting up from 1 per manager); 0 for NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_id(job: *const wp_job) -> u64 {
    ffi!(0, {
        // SAFETY: NULL or a live job handle, as the header requires.
        match unsafe { job.as_ref() } {
            Some(j) => j.inner.id().0,
            None => 0,
        }
    })
}

/// Frees a job handle. The job itself goes on. NULL is fine.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_job_free(job: *mut wp_job) {
    ffi!((), { free(job) })
}

/// Test hook: panics inside the boundary, to show that the panic becomes
/// `WP_RESULT_PANIC`. Not in the header, and only built with the `test-hooks` feature,
/// which the crate's own tests turn on: a normal build does not export it.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
#[unsafe(no_mangle)]
pub extern "C" fn wp_debug_panic() -> wp_result {
    ffi!({
        if std::hint::black_box(true) {
            panic!("wp_debug_panic");
        }
        WP_RESULT_OK
    })
}
