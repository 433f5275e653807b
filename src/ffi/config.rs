//! The configuration handles, `wp_manager_config`, `wp_worker_config` and
//! `wp_client_config`: each holds the Rust configuration (`ManagerConfig`,
//! `WorkerConfig`, `ClientConfig`) with its defaults, plus the identity and trust that C
//! sets from PEM files. Setters check their argument and refuse a bad one with nothing
//! changed; `wp_manager_start`, `wp_worker_start` and `wp_client_connect` (in
//! `manager.rs`, `worker.rs` and `client.rs`) read a configuration and never change it.

use super::common::wp_result::*;
use super::common::*;
use crate::client::ClientConfig;
use crate::manager::{MAX_HANDSHAKE_TIMEOUT, ManagerConfig};
use crate::tls::{Identity, PeerTrust};
use crate::worker::WorkerConfig;
use std::ffi::c_char;

/// Settings for `wp_manager_start`. Made by `wp_manager_config_new`; freed once with
/// `wp_manager_config_free`. Threads: one call at a time on a configuration (setters
/// change it); `wp_manager_start` only reads it, so one configuration may start several
/// managers.
pub struct wp_manager_config {
    /// Every setting but the security, which `wp_manager_start` fills in.
    pub(crate) rust: ManagerConfig,
    pub(crate) identity: Option<Identity>,
    pub(crate) worker_trust: PeerTrust,
    pub(crate) submitter_trust: PeerTrust,
}

/// Settings for `wp_worker_start`. Made by `wp_worker_config_new`; freed once with
/// `wp_worker_config_free`. Threads: one call at a time on a configuration (setters
/// change it); `wp_worker_start` only reads it, so one configuration may start several
/// workers (each needs a name of its own).
pub struct wp_worker_config {
    /// Every setting but the security, which `wp_worker_start` fills in.
    pub(crate) rust: WorkerConfig,
    pub(crate) dial: Dial,
}

/// Settings for `wp_client_connect`. Made by `wp_client_config_new`; freed once with
/// `wp_client_config_free`. Threads: one call at a time on a configuration (setters
/// change it); `wp_client_connect` only reads it, so one configuration may connect
/// several clients.
pub struct wp_client_config {
    /// Every setting but the security, which `wp_client_connect` fills in.
    pub(crate) rust: ClientConfig,
    pub(crate) dial: Dial,
}

/// How a worker or a client reaches the manager, as C sets it: the manager's address
/// (in the Rust configuration, once set), the identity and what the manager must show.
pub(crate) struct Dial {
    manager_set: bool,
    identity: Option<Identity>,
    manager_trust: PeerTrust,
    verify_hostname: bool,
}

impl Dial {
    fn new() -> Dial {
        Dial {
            manager_set: false,
            identity: None,
            manager_trust: PeerTrust::new(),
            verify_hostname: true,
        }
    }

    /// The manager's host and port, into the Rust configuration's `host` and `port`.
    fn set_manager(&mut self, host: &str, port: u16, to: (&mut String, &mut u16)) -> wp_result {
        refuse_if!(
            host.is_empty() || port == 0,
            "the manager's host must not be empty nor its port 0"
        );
        *to.0 = host.to_string();
        *to.1 = port;
        self.manager_set = true;
        WP_RESULT_OK
    }

    /// The identity, the manager's trust and whether its host name is checked; `Err`
    /// (after saying `needs`) when the manager or the identity was not set.
    pub(crate) fn security(&self, needs: &str) -> Result<(Identity, PeerTrust, bool), wp_result> {
        match (self.manager_set, &self.identity) {
            (true, Some(identity)) => Ok((
                identity.clone(),
                self.manager_trust.clone(),
                self.verify_hostname,
            )),
            _ => Err(fail(WP_RESULT_INVALID_ARGUMENT, needs)),
        }
    }
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
    result_of(match kind {
        TrustKind::Pinned => trust.add_pinned_pem_file(path),
        TrustKind::Ca => trust.add_ca_pem_file(path),
    })
}

/// Refuses anything but `HOST:PORT` that resolves.
fn check_address(address: &str) -> Result<(), wp_result> {
    if std::net::ToSocketAddrs::to_socket_addrs(address).is_err() {
        return Err(fail(
            WP_RESULT_INVALID_ARGUMENT,
            format!("{address:?} is not a HOST:PORT address"),
        ));
    }
    Ok(())
}

/// Sets a duration field from milliseconds checked by `duration_ms`.
macro_rules! set_ms {
    ($field:expr, $what:expr, $ms:expr, $zero_ok:expr, $max:expr) => {
        match duration_ms($what, $ms, $zero_ok, $max) {
            Ok(d) => {
                $field = d;
                WP_RESULT_OK
            }
            Err(code) => code,
        }
    };
}

/// The longest heartbeat interval or timeout (10 minutes, as the Rust API).
const MAX_HEARTBEAT_MS: u64 = 600_000;

/// A new manager configuration: listen on `127.0.0.1:9001`, no identity or trust yet,
/// everything else as `ManagerConfig`'s defaults.
///
/// Ownership: `*out` receives a configuration the caller owns and frees once with
/// `wp_manager_config_free`. Threads: callable from any thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_new(out: *mut *mut wp_manager_config) -> wp_result {
    ffi!({
        out!(out);
        boxed(
            out,
            wp_manager_config {
                rust: ManagerConfig::insecure_plaintext("127.0.0.1:9001"),
                identity: None,
                worker_trust: PeerTrust::new(),
                submitter_trust: PeerTrust::new(),
            },
        )
    })
}

/// Sets the address to listen on, e.g. `"0.0.0.0:9001"` or `"127.0.0.1:0"` (any free port).
///
/// Ownership: `address` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_listen(
    config: *mut wp_manager_config,
    address: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let address = text!(address);
        if let Err(code) = check_address(address) {
            return code;
        }
        config.rust.listen = address.to_string();
        WP_RESULT_OK
    })
}

/// Loads the manager's certificate chain and key from PEM files.
///
/// Ownership: the paths are only read. Threads: one call at a time per configuration.
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
///
/// Ownership: `path` is only read. Threads: one call at a time per configuration.
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
///
/// Ownership: `path` is only read. Threads: one call at a time per configuration.
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

/// Pins the self-signed submitter certificates in a PEM file: a submitter presenting
/// exactly one of them is accepted (within its validity period), as a submitter only: a
/// certificate that only the submitter trust accepts cannot take jobs. Pinned as for
/// workers (`wp_manager_config_add_worker_certificate_pem_file`): accepted only as
/// itself; a certificate that is not self-signed is refused
/// (`WP_RESULT_INVALID_ARGUMENT`). Without any, no remote submitter is accepted.
///
/// Ownership: `path` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_add_submitter_certificate_pem_file(
    config: *mut wp_manager_config,
    path: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        // SAFETY: `path` is NULL (refused) or a NUL-terminated string, as documented.
        unsafe { add_trust(&mut config.submitter_trust, path, TrustKind::Pinned) }
    })
}

/// Trusts the CA certificates in a PEM file as issuers of submitter certificates: a
/// submitter whose certificate one of them issued (for client authentication) is
/// accepted, as a submitter only.
///
/// Ownership: `path` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_add_submitter_ca_pem_file(
    config: *mut wp_manager_config,
    path: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        // SAFETY: `path` is NULL (refused) or a NUL-terminated string, as documented.
        unsafe { add_trust(&mut config.submitter_trust, path, TrustKind::Ca) }
    })
}

/// The former name of `wp_manager_config_add_worker_certificate_pem_file`, and the same:
/// it pins (CAs go to `wp_manager_config_add_worker_ca_pem_file`).
///
/// Ownership: `path` is only read. Threads: one call at a time per configuration.
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
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_max_connections_per_certificate(
    config: *mut wp_manager_config,
    max: u32,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        refuse_if!(
            max == 0,
            "max_connections_per_certificate must be at least 1"
        );
        config.rust.max_connections_per_certificate = max as usize;
        WP_RESULT_OK
    })
}

/// Sets how many sessions one submitter certificate may hold at once, connected or
/// waiting for their submitter within the reconnect grace (default 64; at least 1).
/// A new session beyond it is refused; a resumed one is not new.
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_max_sessions_per_certificate(
    config: *mut wp_manager_config,
    max: u32,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        refuse_if!(max == 0, "max_sessions_per_certificate must be at least 1");
        config.rust.max_sessions_per_certificate = max as usize;
        WP_RESULT_OK
    })
}

/// Sets the most heartbeats a second the manager should hear from idle workers (default
/// 2000; 0: no limit). Beyond that many workers per second of heartbeat interval, the
/// interval announced to workers is stretched to keep to the rate, and the heartbeat
/// timeout and the reconnect grace by as much (see `ManagerConfig::max_heartbeats_per_second`).
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_max_heartbeats_per_second(
    config: *mut wp_manager_config,
    max: u32,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        config.rust.max_heartbeats_per_second = max;
        WP_RESULT_OK
    })
}

/// Sets the deadline for a new connection's TLS handshake and hello, in milliseconds,
/// counted from its acceptance however the peer spaces its bytes (default 10000; 1 to
/// 3600000).
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_handshake_timeout_ms(
    config: *mut wp_manager_config,
    ms: u64,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let max = millis(MAX_HANDSHAKE_TIMEOUT);
        refuse_if!(
            ms == 0 || ms > max,
            "the handshake timeout must be 1 to {max} ms"
        );
        config.rust.handshake_timeout = std::time::Duration::from_millis(ms);
        WP_RESULT_OK
    })
}

/// Sets how many connections may be in handshake at once (default 256). When all are
/// taken, a new connection displaces the oldest handshake of the source holding the most.
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_max_handshakes(
    config: *mut wp_manager_config,
    max: u32,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        refuse_if!(max == 0, "max_handshakes must be at least 1");
        config.rust.max_handshakes = max as usize;
        WP_RESULT_OK
    })
}

/// Sets how many connections from one source (an IPv4 address, or an IPv6 /64) may be
/// in handshake at once (default 8). A new connection beyond it displaces that source's
/// oldest handshake.
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_max_handshakes_per_source(
    config: *mut wp_manager_config,
    max: u32,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        refuse_if!(max == 0, "max_handshakes_per_source must be at least 1");
        config.rust.max_handshakes_per_source = max as usize;
        WP_RESULT_OK
    })
}

/// Sets how many jobs may wait for a worker (default 100000; at least 1). Beyond it
/// `wp_manager_submit` returns `WP_RESULT_QUEUE_FULL`.
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_queue_capacity(
    config: *mut wp_manager_config,
    capacity: usize,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        refuse_if!(capacity == 0, "queue_capacity must be at least 1");
        config.rust.queue_capacity = capacity;
        WP_RESULT_OK
    })
}

/// Sets how long a link may send nothing before it sends a heartbeat, in milliseconds
/// (default 1000; 1 to 600000). `wp_manager_start` refuses a heartbeat timeout that is
/// not longer than it.
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_heartbeat_interval_ms(
    config: *mut wp_manager_config,
    ms: u64,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        set_ms!(
            config.rust.heartbeat_interval,
            "the heartbeat interval",
            ms,
            false,
            MAX_HEARTBEAT_MS
        )
    })
}

/// Sets how long a link may hear nothing before it is closed (its jobs wait for the
/// worker to come back, see `wp_manager_config_set_reconnect_grace_ms`), in milliseconds
/// (default 5000; 1 to 600000, and longer than the heartbeat interval).
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_heartbeat_timeout_ms(
    config: *mut wp_manager_config,
    ms: u64,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        set_ms!(
            config.rust.heartbeat_timeout,
            "the heartbeat timeout",
            ms,
            false,
            MAX_HEARTBEAT_MS
        )
    })
}

/// Sets how long running jobs may go on after `wp_manager_shutdown` (and
/// `wp_manager_free`) before they are cancelled, in milliseconds (default 10000; 0 to
/// 365 days).
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_shutdown_grace_ms(
    config: *mut wp_manager_config,
    ms: u64,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        set_ms!(
            config.rust.shutdown_grace,
            "the shutdown grace",
            ms,
            true,
            MAX_DURATION_MS
        )
    })
}

/// Sets how long the jobs of a worker whose connection dropped wait for that worker to
/// come back and go on with them, in milliseconds (default 10000; 0 to 365 days; 0 ends
/// them at once as `WP_OUTCOME_WORKER_LOST`, or retries them).
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_reconnect_grace_ms(
    config: *mut wp_manager_config,
    ms: u64,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        set_ms!(
            config.rust.reconnect_grace,
            "the reconnect grace",
            ms,
            true,
            MAX_DURATION_MS
        )
    })
}

/// Serves Prometheus metrics (`GET /metrics`, plain HTTP) on `address`, e.g.
/// `"127.0.0.1:9100"` or `"127.0.0.1:0"` (any free port; `wp_manager_metrics_port` tells
/// which). Off by default.
///
/// Ownership: `address` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_metrics_address(
    config: *mut wp_manager_config,
    address: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let address = text!(address);
        if let Err(code) = check_address(address) {
            return code;
        }
        config.rust.metrics_addr = Some(address.to_string());
        WP_RESULT_OK
    })
}

/// Sets how many bytes of each stream a `wp_job_result` keeps (default 16 MiB; 0 keeps
/// none); beyond it `wp_job_result_truncated` says so. Live `WP_EVENT_OUTPUT` events are
/// never cut.
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_result_output_limit(
    config: *mut wp_manager_config,
    bytes: usize,
) -> wp_result {
    ffi!({
        arg_mut!(config).rust.result_output_limit = bytes;
        WP_RESULT_OK
    })
}

/// Sets how many bytes of output a detached job keeps (its last ones) for a remote
/// submitter's later attach (default 1 MiB; what is dropped is counted and told).
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_detached_output_limit(
    config: *mut wp_manager_config,
    bytes: usize,
) -> wp_result {
    ffi!({
        arg_mut!(config).rust.detached_output_limit = bytes;
        WP_RESULT_OK
    })
}

/// Sets how long a detached job's outcome and kept output stay after it ends, in
/// milliseconds (default 3600000, one hour; 0 to 365 days), and how many ended detached
/// jobs are kept at most (default 1000; the oldest are forgotten first).
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_detached_retention(
    config: *mut wp_manager_config,
    ms: u64,
    count: usize,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let set = set_ms!(
            config.rust.detached_retention,
            "the detached jobs' retention",
            ms,
            true,
            MAX_DURATION_MS
        );
        if set == WP_RESULT_OK {
            config.rust.detached_retention_count = count;
        }
        set
    })
}

/// Keeps the manager's journal at `path`, an SQLite database (created if missing; off
/// by default): a job is accepted only once it is on disk, and a manager started again
/// on the same journal goes on with its queue, its running jobs, its job ids and its
/// detached jobs' ends. With a journal, shutting the manager down ends no job. A journal
/// that is corrupt, from a newer version or in use by another manager makes
/// `wp_manager_start` fail with `WP_RESULT_JOURNAL`.
///
/// Ownership: `path` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_journal(
    config: *mut wp_manager_config,
    path: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let path = text!(path);
        if path.is_empty() {
            return fail(WP_RESULT_INVALID_ARGUMENT, "the journal's path is empty");
        }
        config.rust.journal = Some(path.into());
        WP_RESULT_OK
    })
}

/// Sets how long an ended job stays in the journal, in milliseconds (default 3600000,
/// one hour; 0 to 365 days), and how many ended jobs it keeps at most (default 10000;
/// the oldest are compacted away first).
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_set_journal_retention(
    config: *mut wp_manager_config,
    ms: u64,
    count: usize,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let set = set_ms!(
            config.rust.journal_retention,
            "the journal's retention",
            ms,
            true,
            MAX_DURATION_MS
        );
        if set == WP_RESULT_OK {
            config.rust.journal_retention_count = count;
        }
        set
    })
}

/// Frees a configuration; NULL does nothing. Managers started from it are not affected.
///
/// Ownership: call it once per configuration, after every other call on it returned.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_manager_config_free(config: *mut wp_manager_config) {
    ffi!((), { free(config) })
}

/// A new worker configuration: one slot, hostname verification on, named HOSTNAME-PID,
/// the detected platform (e.g. `linux-x86_64`), job folders in the system's temp folder,
/// everything else as `WorkerConfig`'s defaults.
///
/// Ownership: `*out` receives a configuration the caller owns and frees once with
/// `wp_worker_config_free`. Threads: callable from any thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_new(out: *mut *mut wp_worker_config) -> wp_result {
    ffi!({
        out!(out);
        boxed(
            out,
            wp_worker_config {
                rust: WorkerConfig::insecure_plaintext("", 9001),
                dial: Dial::new(),
            },
        )
    })
}

/// Sets the manager to dial.
///
/// Ownership: `host` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_manager(
    config: *mut wp_worker_config,
    host: *const c_char,
    port: u16,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let host = text!(host);
        let rust = &mut config.rust;
        config
            .dial
            .set_manager(host, port, (&mut rust.host, &mut rust.port))
    })
}

/// Loads the worker's certificate chain and key from PEM files.
///
/// Ownership: the paths are only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_identity_pem_files(
    config: *mut wp_worker_config,
    cert_path: *const c_char,
    key_path: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        // SAFETY: the two paths are the caller's NUL-terminated strings, checked by `text!`.
        unsafe { set_identity(&mut config.dial.identity, cert_path, key_path) }
    })
}

/// Pins the manager's self-signed certificate(s) in a PEM file: a manager presenting
/// exactly one of them is accepted (within its validity period). A pinned certificate is
/// accepted only as itself, never as the issuer of another, even when it says `CA:TRUE`.
/// A certificate that is not self-signed is refused (`WP_RESULT_INVALID_ARGUMENT`): trust
/// its CA instead.
///
/// Ownership: `path` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_add_manager_certificate_pem_file(
    config: *mut wp_worker_config,
    path: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        // SAFETY: `path` is NULL (refused) or a NUL-terminated string, as documented.
        unsafe { add_trust(&mut config.dial.manager_trust, path, TrustKind::Pinned) }
    })
}

/// Trusts the CA certificates in a PEM file as issuers of the manager's certificate: a
/// manager whose certificate one of them issued (for server authentication) is accepted.
///
/// Ownership: `path` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_add_manager_ca_pem_file(
    config: *mut wp_worker_config,
    path: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        // SAFETY: `path` is NULL (refused) or a NUL-terminated string, as documented.
        unsafe { add_trust(&mut config.dial.manager_trust, path, TrustKind::Ca) }
    })
}

/// The former name of `wp_worker_config_add_manager_certificate_pem_file`, and the same:
/// it pins (CAs go to `wp_worker_config_add_manager_ca_pem_file`).
///
/// Ownership: `path` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_add_manager_root_pem_file(
    config: *mut wp_worker_config,
    path: *const c_char,
) -> wp_result {
    // SAFETY: the same arguments, passed on unchanged.
    unsafe { wp_worker_config_add_manager_certificate_pem_file(config, path) }
}

/// Sets the name the worker announces (1 to 256 bytes; unique among the manager's
/// workers).
///
/// Ownership: `name` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_name(
    config: *mut wp_worker_config,
    name: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let name = text!(name);
        refuse_if!(
            name.is_empty() || name.len() > 256,
            "a worker name must have 1 to 256 bytes"
        );
        config.rust.name = name.to_string();
        WP_RESULT_OK
    })
}

/// Adds a tag that jobs can require (printable text, 1 to 256 bytes).
///
/// Ownership: `tag` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_add_tag(
    config: *mut wp_worker_config,
    tag: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let tag = text!(tag);
        if let Err(why) = crate::protocol::check_label("a tag", tag) {
            return fail(WP_RESULT_INVALID_ARGUMENT, why);
        }
        config.rust.tags.insert(tag.to_string());
        WP_RESULT_OK
    })
}

/// Sets the platform the worker announces, instead of the detected `OS-ARCH` (printable
/// text, 1 to 256 bytes). Jobs that require a platform run only on workers announcing it.
///
/// Ownership: `platform` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_platform(
    config: *mut wp_worker_config,
    platform: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let platform = text!(platform);
        if let Err(why) = crate::protocol::check_label("a platform", platform) {
            return fail(WP_RESULT_INVALID_ARGUMENT, why);
        }
        config.rust.platform = platform.to_string();
        WP_RESULT_OK
    })
}

/// Sets how many jobs run at once (1 to 1024).
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_slots(
    config: *mut wp_worker_config,
    slots: u32,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        refuse_if!(slots == 0 || slots > 1024, "slots must be 1 to 1024");
        config.rust.slots = slots;
        WP_RESULT_OK
    })
}

/// Sets how many runs the manager may send beyond the worker's free slots (0 to 1024,
/// default 1): the worker holds them and starts each the moment a slot frees, instead of
/// waiting a round trip for its next job; the manager takes a held run back when another
/// worker could start it sooner. 0: every run goes into a free slot.
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_ahead(
    config: *mut wp_worker_config,
    ahead: u32,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        refuse_if!(ahead > 1024, "ahead must be 0 to 1024");
        config.rust.ahead = ahead;
        WP_RESULT_OK
    })
}

/// Sets the folder in which job folders are made (default: the system's temp folder).
/// It must be an existing folder.
///
/// Ownership: `path` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_work_dir(
    config: *mut wp_worker_config,
    path: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let path = std::path::Path::new(text!(path));
        refuse_if!(
            !path.is_dir(),
            "work_dir {} is not a folder",
            path.display()
        );
        config.rust.work_dir = path.to_path_buf();
        WP_RESULT_OK
    })
}

/// Sets the deadline for connecting to the manager, the TLS handshake and the hello, in
/// milliseconds (default 10000; 1 to 365 days).
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_connect_timeout_ms(
    config: *mut wp_worker_config,
    ms: u64,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        set_ms!(
            config.rust.connect_timeout,
            "the connect timeout",
            ms,
            false,
            MAX_DURATION_MS
        )
    })
}

/// Sets the first wait before reconnecting, in milliseconds (default 100; 1 to 365
/// days); it doubles per failure up to the longest wait. `wp_worker_start` refuses a
/// first wait longer than the longest.
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_backoff_initial_ms(
    config: *mut wp_worker_config,
    ms: u64,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        set_ms!(
            config.rust.backoff_initial,
            "the first reconnect wait",
            ms,
            false,
            MAX_DURATION_MS
        )
    })
}

/// Sets the longest wait between connection attempts, in milliseconds (default 10000;
/// 1 to 365 days).
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_backoff_max_ms(
    config: *mut wp_worker_config,
    ms: u64,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        set_ms!(
            config.rust.backoff_max,
            "the longest reconnect wait",
            ms,
            false,
            MAX_DURATION_MS
        )
    })
}

/// Sets the grace between SIGTERM and SIGKILL when a job times out or is cancelled, for
/// jobs that set none (`wp_job_spec_set_kill_grace_ms`), in milliseconds (default 5000;
/// 0 to 365 days).
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_kill_grace_ms(
    config: *mut wp_worker_config,
    ms: u64,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        set_ms!(
            config.rust.kill_grace,
            "the kill grace",
            ms,
            true,
            MAX_DURATION_MS
        )
    })
}

/// Sets how much output per job is kept for a reconnect, in bytes (default 8 MiB):
/// recently sent output that may not have arrived, and output made while disconnected
/// (beyond it the job waits on its own writes).
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_reconnect_buffer(
    config: *mut wp_worker_config,
    bytes: usize,
) -> wp_result {
    ffi!({
        arg_mut!(config).rust.reconnect_buffer = bytes;
        WP_RESULT_OK
    })
}

/// Turns the check that the manager's certificate names its host on (default) or off.
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_verify_hostname(
    config: *mut wp_worker_config,
    verify: bool,
) -> wp_result {
    ffi!({
        arg_mut!(config).dial.verify_hostname = verify;
        WP_RESULT_OK
    })
}

/// Runs every job as the user called `user`, with its primary group and no other group,
/// so that jobs cannot read the worker's key or other users' files (their folders belong
/// to that user). `wp_worker_start` fails (`WP_RESULT_INVALID_ARGUMENT`) unless the
/// process runs as root and the user exists and is not root.
///
/// Ownership: `user` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_set_job_user(
    config: *mut wp_worker_config,
    user: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let user = text!(user);
        refuse_if!(user.is_empty(), "the job user's name is empty");
        config.rust.job_user = Some(user.to_string());
        WP_RESULT_OK
    })
}

/// Frees a configuration; NULL does nothing. Workers started from it are not affected.
///
/// Ownership: call it once per configuration, after every other call on it returned.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_worker_config_free(config: *mut wp_worker_config) {
    ffi!((), { free(config) })
}

/// A new client configuration: hostname verification on, named HOSTNAME:PID, the
/// reconnect grace the manager announces, everything else as `ClientConfig`'s defaults.
/// It needs the manager (`wp_client_config_set_manager`), an identity (a submitter
/// certificate, `wp_client_config_set_identity_pem_files`) and the manager's certificate
/// or CA before `wp_client_connect`.
///
/// Ownership: `*out` receives a configuration the caller owns and frees once with
/// `wp_client_config_free`. Threads: callable from any thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_config_new(out: *mut *mut wp_client_config) -> wp_result {
    ffi!({
        out!(out);
        boxed(
            out,
            wp_client_config {
                rust: ClientConfig::insecure_plaintext("", 9001),
                dial: Dial::new(),
            },
        )
    })
}

/// Sets the manager to dial.
///
/// Ownership: `host` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_config_set_manager(
    config: *mut wp_client_config,
    host: *const c_char,
    port: u16,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let host = text!(host);
        let rust = &mut config.rust;
        config
            .dial
            .set_manager(host, port, (&mut rust.host, &mut rust.port))
    })
}

/// Loads the client's certificate chain and key from PEM files: a submitter certificate
/// (`generate-tls-certificates --number-of-submitters`) that the manager trusts as a
/// submitter.
///
/// Ownership: the paths are only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_config_set_identity_pem_files(
    config: *mut wp_client_config,
    cert_path: *const c_char,
    key_path: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        // SAFETY: the two paths are the caller's NUL-terminated strings, checked by `text!`.
        unsafe { set_identity(&mut config.dial.identity, cert_path, key_path) }
    })
}

/// Pins the manager's self-signed certificate(s) in a PEM file, as
/// `wp_worker_config_add_manager_certificate_pem_file` does for a worker: accepted only as
/// itself; a certificate that is not self-signed is refused (`WP_RESULT_INVALID_ARGUMENT`).
///
/// Ownership: `path` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_config_add_manager_certificate_pem_file(
    config: *mut wp_client_config,
    path: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        // SAFETY: `path` is NULL (refused) or a NUL-terminated string, as documented.
        unsafe { add_trust(&mut config.dial.manager_trust, path, TrustKind::Pinned) }
    })
}

/// Trusts the CA certificates in a PEM file as issuers of the manager's certificate (for
/// server authentication).
///
/// Ownership: `path` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_config_add_manager_ca_pem_file(
    config: *mut wp_client_config,
    path: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        // SAFETY: `path` is NULL (refused) or a NUL-terminated string, as documented.
        unsafe { add_trust(&mut config.dial.manager_trust, path, TrustKind::Ca) }
    })
}

/// Turns the check that the manager's certificate names its host on (default) or off
/// (the certificate itself is still verified).
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_config_set_verify_hostname(
    config: *mut wp_client_config,
    verify: bool,
) -> wp_result {
    ffi!({
        arg_mut!(config).dial.verify_hostname = verify;
        WP_RESULT_OK
    })
}

/// Sets the name the manager's logs know the client by (printable text, 1 to 256 bytes;
/// not an identity: the certificate is).
///
/// Ownership: `name` is only read. Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_config_set_name(
    config: *mut wp_client_config,
    name: *const c_char,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        let name = text!(name);
        if let Err(why) = crate::protocol::check_label("the client name", name) {
            return fail(WP_RESULT_INVALID_ARGUMENT, why);
        }
        config.rust.name = name.to_string();
        WP_RESULT_OK
    })
}

/// Sets the deadline for connecting to the manager, the TLS handshake and the hello, in
/// milliseconds (default 10000; 1 to 365 days).
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_config_set_connect_timeout_ms(
    config: *mut wp_client_config,
    ms: u64,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        set_ms!(
            config.rust.connect_timeout,
            "the connect timeout",
            ms,
            false,
            MAX_DURATION_MS
        )
    })
}

/// Sets the first wait before reconnecting, in milliseconds (default 100; 1 to 365
/// days); it doubles per failure up to the longest wait. `wp_client_connect` refuses a
/// first wait longer than the longest.
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_config_set_backoff_initial_ms(
    config: *mut wp_client_config,
    ms: u64,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        set_ms!(
            config.rust.backoff_initial,
            "the first reconnect wait",
            ms,
            false,
            MAX_DURATION_MS
        )
    })
}

/// Sets the longest wait between connection attempts, in milliseconds (default 10000;
/// 1 to 365 days).
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_config_set_backoff_max_ms(
    config: *mut wp_client_config,
    ms: u64,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        set_ms!(
            config.rust.backoff_max,
            "the longest reconnect wait",
            ms,
            false,
            MAX_DURATION_MS
        )
    })
}

/// Sets how long the client tries to get back into its session after losing the
/// manager before it gives the session up (its waiting calls fail and its jobs end
/// `WP_OUTCOME_REJECTED`), in milliseconds (0 to 365 days). By default: the reconnect
/// grace the manager announced, after which the manager has given the session up too.
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_config_set_reconnect_grace_ms(
    config: *mut wp_client_config,
    ms: u64,
) -> wp_result {
    ffi!({
        let config = arg_mut!(config);
        match duration_ms("the reconnect grace", ms, true, MAX_DURATION_MS) {
            Ok(d) => {
                config.rust.reconnect_grace = Some(d);
                WP_RESULT_OK
            }
            Err(code) => code,
        }
    })
}

/// Sets how many bytes of each stream a `wp_job_result` of this client's jobs keeps
/// (default 16 MiB; 0 keeps none); beyond it `wp_job_result_truncated` says so. Live
/// `WP_EVENT_OUTPUT` events are never cut.
///
/// Threads: one call at a time per configuration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_config_set_result_output_limit(
    config: *mut wp_client_config,
    bytes: usize,
) -> wp_result {
    ffi!({
        arg_mut!(config).rust.result_output_limit = bytes;
        WP_RESULT_OK
    })
}

/// Frees a configuration; NULL does nothing. Clients connected with it are not affected.
///
/// Ownership: call it once per configuration, after every other call on it returned.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_client_config_free(config: *mut wp_client_config) {
    ffi!((), { free(config) })
}
