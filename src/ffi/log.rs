//! Logs for C: `wp_set_log_callback` installs a `log::Log` that hands every record
//! (level, target, message) to a C function, from whichever workpool thread logged it.
//! The library itself logs only through the `log` facade and installs nothing unless
//! asked; Rust programs pick their own logger.

use super::common::wp_result::*;
use super::common::*;
use std::cell::Cell;
use std::ffi::{c_char, c_void};
use std::sync::{OnceLock, RwLock};

/// A log level: `wp_log_record.level` holds one, and `wp_set_log_callback` takes one as a
/// plain `uint32_t` (checked, so any value a C program passes is safe).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum wp_log_level {
    /// No records (`wp_set_log_callback` only).
    WP_LOG_OFF = 0,
    /// Something failed.
    WP_LOG_ERROR = 1,
    /// Something is wrong or suspicious, and workpool goes on.
    WP_LOG_WARN = 2,
    /// What a manager or worker does: listening, workers joining and leaving, shutdown.
    WP_LOG_INFO = 3,
    /// More detail: connections, jobs, TLS.
    WP_LOG_DEBUG = 4,
    /// Everything.
    WP_LOG_TRACE = 5,
}

use wp_log_level::*;

/// One log record, valid only during the callback (copy what you keep).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct wp_log_record {
    /// `WP_LOG_ERROR` to `WP_LOG_TRACE`.
    pub level: wp_log_level,
    /// Where it comes from: a Rust module path such as `workpool::manager` (or
    /// `rustls::...` for the TLS library's own records), NUL-terminated.
    pub target: *const c_char,
    /// The message, NUL-terminated UTF-8 without a trailing newline.
    pub message: *const c_char,
}

/// Receives log records: `userdata` as given to `wp_set_log_callback`, and the record.
/// Called from any thread, several at once; it must not unwind (no C++ exception, no
/// `longjmp`) and must not call `wp_set_log_callback`.
pub type wp_log_callback =
    Option<unsafe extern "C" fn(userdata: *mut c_void, record: *const wp_log_record)>;

struct Sink {
    callback: unsafe extern "C" fn(*mut c_void, *const wp_log_record),
    userdata: *mut c_void,
}

// SAFETY: `userdata` is only passed back to the host's callback, and the host promises
// (in `wp_set_log_callback`'s contract) that the callback may be called with it from any
// thread, several at once.
unsafe impl Send for Sink {}
// SAFETY: as above; the sink itself is never changed while shared (it is replaced under
// the write lock).
unsafe impl Sync for Sink {}

/// The callback in use. Calls hold the read lock, so that once `wp_set_log_callback`
/// (which takes the write lock) returns, the old callback is never called again.
static SINK: RwLock<Option<Sink>> = RwLock::new(None);

/// Whether the forwarder is the process's `log` logger (decided by the first call).
static INSTALLED: OnceLock<bool> = OnceLock::new();

thread_local! {
    /// Set while this thread runs the callback: a record logged from inside it (by a
    /// workpool call it makes) is dropped rather than fed back into it.
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

fn level_of(level: log::Level) -> wp_log_level {
    match level {
        log::Level::Error => WP_LOG_ERROR,
        log::Level::Warn => WP_LOG_WARN,
        log::Level::Info => WP_LOG_INFO,
        log::Level::Debug => WP_LOG_DEBUG,
        log::Level::Trace => WP_LOG_TRACE,
    }
}

/// The filter for a level from C; `None` for a value that is not one.
fn filter_of(level: u32) -> Option<log::LevelFilter> {
    Some(match level {
        0 => log::LevelFilter::Off,
        1 => log::LevelFilter::Error,
        2 => log::LevelFilter::Warn,
        3 => log::LevelFilter::Info,
        4 => log::LevelFilter::Debug,
        5 => log::LevelFilter::Trace,
        _ => return None,
    })
}

struct Forwarder;

static FORWARDER: Forwarder = Forwarder;

impl log::Log for Forwarder {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) || IN_CALLBACK.with(Cell::get) {
            return;
        }
        let sink = SINK.read().unwrap_or_else(|p| p.into_inner());
        let Some(sink) = sink.as_ref() else {
            return;
        };
        let target = c_text(record.target());
        let message = c_text(&record.args().to_string());
        let c_record = wp_log_record {
            level: level_of(record.level()),
            target: target.as_ptr(),
            message: message.as_ptr(),
        };
        IN_CALLBACK.with(|c| c.set(true));
        // SAFETY: the callback is the host's, installed with `wp_set_log_callback`, whose
        // contract lets it be called from any thread with this `userdata`; the record and
        // its strings live until it returns.
        unsafe { (sink.callback)(sink.userdata, &c_record) };
        IN_CALLBACK.with(|c| c.set(false));
    }

    fn flush(&self) {}
}

/// Sends workpool's log records at `level` and above (`WP_LOG_ERROR` is the highest) to
/// `callback`, from whichever thread logs them; records of the TLS library are included.
/// NULL (or `WP_LOG_OFF`) turns logging off. Until the first call nothing is logged
/// anywhere. A `level` that is not a `WP_LOG_*` value is `WP_RESULT_INVALID_ARGUMENT`;
/// `WP_RESULT_LOGGER_IN_USE` when a Rust part of the program installed a `log` logger
/// of its own, or when called from inside the callback.
///
/// Ownership: `userdata` stays the caller's; it is passed to `callback` as is. Once this
/// returns, the callback given before is never called again (a call in progress on
/// another thread is waited for), so its `userdata` may be freed then.
///
/// Threads: callable from any thread, several at once (the last call wins). The callback
/// is called from any thread, several at once; it must not unwind and must not block
/// for long (the thread that logs waits for it). Records logged by workpool calls the
/// callback itself makes are dropped.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_set_log_callback(
    callback: wp_log_callback,
    userdata: *mut c_void,
    level: u32,
) -> wp_result {
    ffi!({
        let Some(filter) = filter_of(level) else {
            return fail(
                WP_RESULT_INVALID_ARGUMENT,
                format!("{level} is not a log level (WP_LOG_OFF 0 to WP_LOG_TRACE 5)"),
            );
        };
        if IN_CALLBACK.with(Cell::get) {
            return fail(
                WP_RESULT_LOGGER_IN_USE,
                "wp_set_log_callback was called from inside the log callback",
            );
        }
        if !*INSTALLED.get_or_init(|| log::set_logger(&FORWARDER).is_ok()) {
            return fail(
                WP_RESULT_LOGGER_IN_USE,
                "another logger of the log crate is installed in this process",
            );
        }
        let mut sink = SINK.write().unwrap_or_else(|p| p.into_inner());
        *sink = callback.map(|callback| Sink { callback, userdata });
        log::set_max_level(if sink.is_some() {
            filter
        } else {
            log::LevelFilter::Off
        });
        WP_RESULT_OK
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_c_level_maps_to_its_filter_and_others_are_refused() {
        for (c, f) in [
            (WP_LOG_OFF, log::LevelFilter::Off),
            (WP_LOG_ERROR, log::LevelFilter::Error),
            (WP_LOG_WARN, log::LevelFilter::Warn),
            (WP_LOG_INFO, log::LevelFilter::Info),
            (WP_LOG_DEBUG, log::LevelFilter::Debug),
            (WP_LOG_TRACE, log::LevelFilter::Trace),
        ] {
            assert_eq!(filter_of(c as u32), Some(f));
            if let Some(level) = f.to_level() {
                assert_eq!(level_of(level), c);
            }
        }
        for bad in [6, 100, u32::MAX] {
            assert_eq!(filter_of(bad), None);
        }
    }

    #[test]
    fn another_logger_in_the_process_is_reported_not_replaced() {
        struct Other;
        impl log::Log for Other {
            fn enabled(&self, _: &log::Metadata<'_>) -> bool {
                false
            }
            fn log(&self, _: &log::Record<'_>) {}
            fn flush(&self) {}
        }
        static OTHER: Other = Other;
        // This test binary has no other logger, and no other test here installs one.
        log::set_logger(&OTHER).unwrap();
        // SAFETY: NULL callback; nothing is called.
        let r = unsafe { wp_set_log_callback(None, std::ptr::null_mut(), 3) };
        assert_eq!(r, WP_RESULT_LOGGER_IN_USE);
    }
}
