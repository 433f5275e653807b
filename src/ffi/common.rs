//! What every handle's file shares: the result codes, the calling thread's last error,
//! the macros every `extern "C"` body goes through (panics caught, pointers and strings
//! checked), boxing and freeing of handles, and the conversions of numbers and text that
//! cross the boundary. No handle lives here.

use crate::error::Error;
use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::time::Duration;

/// What a fallible call returns. Values are fixed and never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum wp_result {
    /// It worked.
    WP_RESULT_OK = 0,
    /// Nothing happened before the timeout (`wp_job_next_event`, `wp_job_wait_timeout`,
    /// `wp_subscription_next`, `wp_worker_wait`).
    WP_RESULT_TIMEOUT = 1,
    /// A required pointer was NULL.
    WP_RESULT_NULL_PARAMETER = 2,
    /// An argument is not valid: not UTF-8, not an address, out of range, missing
    /// configuration, ...
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
    /// The job's end was already delivered (`WP_EVENT_FINISHED` or a `wp_job_result`).
    WP_RESULT_ENDED = 9,
    /// No such job (it ended or never existed).
    WP_RESULT_UNKNOWN_JOB = 10,
    /// A protocol error with a peer.
    WP_RESULT_PROTOCOL = 11,
    /// `wp_set_log_callback`: another logger of the `log` crate is installed in this
    /// process (by a Rust part of the program), or the call came from inside the callback.
    WP_RESULT_LOGGER_IN_USE = 12,
    /// An interactive job's stdin is closed: the job closed it or ended, or it was ended
    /// with `wp_job_close_stdin` (`wp_job_write_stdin`, `wp_job_close_stdin`).
    WP_RESULT_STDIN_CLOSED = 13,
    /// The manager's journal cannot be opened, read or written (corrupt, from a newer
    /// version, in use by another manager, a full disk): see the message.
    WP_RESULT_JOURNAL = 14,
}

use wp_result::*;

/// A span of bytes owned by a handle: `data` is valid for `len` bytes (NULL when `len` is
/// 0) until that handle is freed, and is not NUL-terminated. Binary data may hold any
/// byte.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct wp_bytes {
    /// The first byte, or NULL when there are none.
    pub data: *const u8,
    /// How many bytes.
    pub len: usize,
}

impl wp_bytes {
    pub(crate) const EMPTY: wp_bytes = wp_bytes {
        data: std::ptr::null(),
        len: 0,
    };

    pub(crate) fn of(bytes: &[u8]) -> wp_bytes {
        if bytes.is_empty() {
            wp_bytes::EMPTY
        } else {
            wp_bytes {
                data: bytes.as_ptr(),
                len: bytes.len(),
            }
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Leaves `message` for `wp_last_error_message` on this thread and returns `code`.
pub(crate) fn fail(code: wp_result, message: impl Into<String>) -> wp_result {
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
        Error::NotPermitted(_) => WP_RESULT_INVALID_ARGUMENT,
        Error::ContactLost(_) => WP_RESULT_IO,
        Error::Journal(_) => WP_RESULT_JOURNAL,
        Error::Protocol(_) | Error::VersionMismatch { .. } | Error::Refused(_) => {
            WP_RESULT_PROTOCOL
        }
    }
}

/// Leaves the error's message for `wp_last_error_message` and returns its code.
pub(crate) fn from_error(e: Error) -> wp_result {
    let code = code_of(&e);
    fail(code, e.to_string())
}

/// `WP_RESULT_OK`, or the error's code and message.
pub(crate) fn result_of(r: crate::Result<()>) -> wp_result {
    match r {
        Ok(()) => WP_RESULT_OK,
        Err(e) => from_error(e),
    }
}

/// Runs an `extern "C"` body: a panic becomes `WP_RESULT_PANIC` (or the given default,
/// with the same message left for `wp_last_error_message`). Every exported function's
/// body goes through it.
macro_rules! ffi {
    ($default:expr, $body:block) => {
        match ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| $body)) {
            Ok(v) => v,
            Err(_) => {
                $crate::ffi::common::fail(
                    $crate::ffi::common::wp_result::WP_RESULT_PANIC,
                    "workpool panicked (a bug); the call did nothing",
                );
                $default
            }
        }
    };
    ($body:block) => {
        ffi!($crate::ffi::common::wp_result::WP_RESULT_PANIC, $body)
    };
}

/// Turns a handle argument into a reference, or returns `WP_RESULT_NULL_PARAMETER`.
macro_rules! arg {
    ($p:expr) => {
        // SAFETY: the C caller passes NULL or a pointer to a live handle of this type (the
        // header's contract for every handle argument); NULL is answered above the deref.
        match unsafe { $p.as_ref() } {
            Some(r) => r,
            None => {
                return $crate::ffi::common::fail(
                    $crate::ffi::common::wp_result::WP_RESULT_NULL_PARAMETER,
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
                return $crate::ffi::common::fail(
                    $crate::ffi::common::wp_result::WP_RESULT_NULL_PARAMETER,
                    concat!(stringify!($p), " is NULL"),
                )
            }
        }
    };
}

/// For accessors that return a value rather than a `wp_result`: the handle behind the
/// pointer, or `return $default` for NULL.
macro_rules! arg_or {
    ($p:expr, $default:expr) => {
        // SAFETY: the C caller passes NULL or a pointer to a live handle of this type (the
        // header's contract for every handle argument); NULL is answered above the deref.
        match unsafe { $p.as_ref() } {
            Some(r) => r,
            None => return $default,
        }
    };
}

/// A NUL-terminated UTF-8 string argument.
macro_rules! text {
    ($p:expr) => {{
        if $p.is_null() {
            return $crate::ffi::common::fail(
                $crate::ffi::common::wp_result::WP_RESULT_NULL_PARAMETER,
                concat!(stringify!($p), " is NULL"),
            );
        }
        // SAFETY: checked non-NULL just above; the caller passes a NUL-terminated string that
        // stays valid for the call (the header's contract for every string argument).
        match unsafe { ::std::ffi::CStr::from_ptr($p) }.to_str() {
            Ok(s) => s,
            Err(_) => {
                return $crate::ffi::common::fail(
                    $crate::ffi::common::wp_result::WP_RESULT_INVALID_ARGUMENT,
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
            return $crate::ffi::common::fail(
                $crate::ffi::common::wp_result::WP_RESULT_NULL_PARAMETER,
                concat!(stringify!($p), " is NULL"),
            );
        }
    };
}

/// Returns `WP_RESULT_INVALID_ARGUMENT` with the message when the condition holds.
macro_rules! refuse_if {
    ($cond:expr, $($message:tt)+) => {
        if $cond {
            return $crate::ffi::common::fail(
                $crate::ffi::common::wp_result::WP_RESULT_INVALID_ARGUMENT,
                format!($($message)+),
            );
        }
    };
}

/// Moves `value` into a new handle written to `*out`. The caller checked `out` with `out!`.
pub(crate) fn boxed<T>(out: *mut *mut T, value: T) -> wp_result {
    // SAFETY: every caller checked `out` with `out!` first, and the C caller passes a
    // writable `**out` (the header's contract).
    unsafe { *out = Box::into_raw(Box::new(value)) };
    WP_RESULT_OK
}

/// Writes a value to `*out`. The caller checked `out` with `out!`.
pub(crate) fn write<T>(out: *mut T, value: T) -> wp_result {
    // SAFETY: every caller checked `out` with `out!` first, and the C caller passes a
    // pointer to writable memory for one `T` (the header's contract).
    unsafe { out.write(value) };
    WP_RESULT_OK
}

/// Frees a handle made by `boxed`; NULL does nothing.
pub(crate) fn free<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: `p` is non-NULL and, by the `_free` contract, came from `boxed` for this
        // type and is freed only once.
        drop(unsafe { Box::from_raw(p) });
    }
}

/// Text handed to C as a NUL-terminated string. An inner NUL (which no text workpool
/// makes should hold) is written as `\0`, so the string is never cut short silently.
pub(crate) fn c_text(s: &str) -> CString {
    CString::new(s.replace('\0', "\\0")).expect("no NUL is left")
}

/// A pointer to a string held by a handle, or NULL for none.
pub(crate) fn c_ptr(s: Option<&CString>) -> *const c_char {
    s.map_or(std::ptr::null(), |s| s.as_ptr())
}

/// Whole milliseconds, saturating at `u64::MAX`.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The longest duration a setter takes (365 days, as the Rust API).
pub(crate) const MAX_DURATION_MS: u64 = 365 * 86_400 * 1000;

/// A duration in milliseconds from C, checked against `0..=max_ms` (or `1..=max_ms`
/// when `zero_ok` is false); `Err` carries the code to return.
pub(crate) fn duration_ms(
    what: &str,
    ms: u64,
    zero_ok: bool,
    max_ms: u64,
) -> Result<Duration, wp_result> {
    let min = u64::from(!zero_ok);
    if ms < min || ms > max_ms {
        return Err(fail(
            WP_RESULT_INVALID_ARGUMENT,
            format!("{what} must be {min} to {max_ms} ms, not {ms}"),
        ));
    }
    Ok(Duration::from_millis(ms))
}

/// A static, NUL-terminated name for a result code, e.g. `"WP_RESULT_OK"`;
/// `"WP_RESULT_UNKNOWN"` for a value that is not a `wp_result`. It takes a plain
/// integer, so any value a C program passes is safe.
///
/// Ownership: the string is static; never free it. Threads: callable from any thread.
#[unsafe(no_mangle)]
pub extern "C" fn wp_result_name(result: u32) -> *const c_char {
    ffi!(c"WP_RESULT_PANIC".as_ptr(), {
        let name: &'static std::ffi::CStr = match result {
            0 => c"WP_RESULT_OK",
            1 => c"WP_RESULT_TIMEOUT",
            2 => c"WP_RESULT_NULL_PARAMETER",
            3 => c"WP_RESULT_INVALID_ARGUMENT",
            4 => c"WP_RESULT_IO",
            5 => c"WP_RESULT_TLS",
            6 => c"WP_RESULT_QUEUE_FULL",
            7 => c"WP_RESULT_SHUT_DOWN",
            8 => c"WP_RESULT_PANIC",
            9 => c"WP_RESULT_ENDED",
            10 => c"WP_RESULT_UNKNOWN_JOB",
            11 => c"WP_RESULT_PROTOCOL",
            12 => c"WP_RESULT_LOGGER_IN_USE",
            13 => c"WP_RESULT_STDIN_CLOSED",
            14 => c"WP_RESULT_JOURNAL",
            _ => c"WP_RESULT_UNKNOWN",
        };
        name.as_ptr()
    })
}

/// Copies this thread's last failure message into `buf` (NUL-terminated, cut to fit)
/// and returns its full length in bytes (without the NUL). `buf` may be NULL to ask the
/// length.
///
/// Ownership: `buf` stays the caller's. Threads: callable from any thread; each thread
/// has its own last message.
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
