//! What happens, as C reads it: a job's events (`wp_event`, from `wp_job_next_event`)
//! and the pool's (`wp_manager_event`, from a `wp_subscription`). Each field of an event
//! means one thing; a field that does not apply to an event's kind is 0 or NULL.

use super::common::wp_result::*;
use super::common::*;
use super::manager::wp_worker_info;
use crate::job::{JobEvent, Outcome, Stream};
use crate::manager::ManagerEvent;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::ffi::{CString, c_char};
use std::time::Duration;

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
    /// The job ended: see `outcome` (and `exit_code` or `signal`). Nothing follows.
    WP_EVENT_FINISHED = 3,
    /// A warning text in `data`/`len` (for example: its folder could not be deleted).
    WP_EVENT_WARNING = 4,
    /// Its worker was lost and it waits in the queue again; `attempt` is the attempt
    /// that comes next.
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

/// How a job ended (`wp_event.outcome` for `WP_EVENT_FINISHED`, `wp_job_result_outcome`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum wp_outcome {
    /// Not an ending (another event kind, or a NULL result).
    WP_OUTCOME_NONE = 0,
    /// The script exited; `exit_code` is its code.
    WP_OUTCOME_EXITED = 1,
    /// The script was killed by a signal; `signal` is its number.
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

/// One job event. Each field means one thing; a field that does not apply to `kind` is
/// 0 (or NULL). `data` points into the job handle and stays valid until the next call
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
    /// For `WP_OUTCOME_EXITED`: the exit code. 0 otherwise.
    pub exit_code: i32,
    /// For `WP_OUTCOME_SIGNALED`: the signal that killed the script. 0 otherwise.
    pub signal: i32,
    /// For `WP_EVENT_REQUEUED`: the attempt that comes next (2 for the first retry).
    /// 0 otherwise.
    pub attempt: u32,
}

/// How an outcome reads in C: its kind, exit code, signal, and reason text.
pub(crate) struct OutcomeParts<'a> {
    pub outcome: wp_outcome,
    pub exit_code: i32,
    pub signal: i32,
    pub reason: Option<&'a str>,
}

pub(crate) fn outcome_parts(o: &Outcome) -> OutcomeParts<'_> {
    let mut parts = OutcomeParts {
        outcome: wp_outcome::WP_OUTCOME_NONE,
        exit_code: 0,
        signal: 0,
        reason: None,
    };
    parts.outcome = match o {
        Outcome::Exited(c) => {
            parts.exit_code = *c;
            wp_outcome::WP_OUTCOME_EXITED
        }
        Outcome::Signaled(s) => {
            parts.signal = *s;
            wp_outcome::WP_OUTCOME_SIGNALED
        }
        Outcome::TimedOut => wp_outcome::WP_OUTCOME_TIMED_OUT,
        Outcome::Cancelled => wp_outcome::WP_OUTCOME_CANCELLED,
        Outcome::WorkerLost => wp_outcome::WP_OUTCOME_WORKER_LOST,
        Outcome::Rejected(r) => {
            parts.reason = Some(r);
            wp_outcome::WP_OUTCOME_REJECTED
        }
        Outcome::SpawnFailed(r) => {
            parts.reason = Some(r);
            wp_outcome::WP_OUTCOME_SPAWN_FAILED
        }
    };
    parts
}

/// The C form of a job event; its bytes go to `data`, which the event points into.
pub(crate) fn job_event(ev: JobEvent, data: &mut Vec<u8>) -> wp_event {
    let mut event = wp_event {
        kind: wp_event_kind::WP_EVENT_QUEUED,
        stream: wp_stream::WP_STREAM_STDOUT,
        data: std::ptr::null(),
        len: 0,
        outcome: wp_outcome::WP_OUTCOME_NONE,
        exit_code: 0,
        signal: 0,
        attempt: 0,
    };
    data.clear();
    match ev {
        JobEvent::Queued => {}
        JobEvent::Started { worker } => {
            event.kind = wp_event_kind::WP_EVENT_STARTED;
            data.extend_from_slice(worker.as_bytes());
        }
        JobEvent::Output { stream, bytes } => {
            event.kind = wp_event_kind::WP_EVENT_OUTPUT;
            event.stream = match stream {
                Stream::Stdout => wp_stream::WP_STREAM_STDOUT,
                Stream::Stderr => wp_stream::WP_STREAM_STDERR,
            };
            *data = bytes;
        }
        JobEvent::Warning(w) => {
            event.kind = wp_event_kind::WP_EVENT_WARNING;
            data.extend_from_slice(w.as_bytes());
        }
        JobEvent::Requeued { attempt } => {
            event.kind = wp_event_kind::WP_EVENT_REQUEUED;
            event.attempt = attempt;
        }
        JobEvent::Finished(o) => {
            event.kind = wp_event_kind::WP_EVENT_FINISHED;
            let parts = outcome_parts(&o);
            event.outcome = parts.outcome;
            event.exit_code = parts.exit_code;
            event.signal = parts.signal;
            if let Some(r) = parts.reason {
                data.extend_from_slice(r.as_bytes());
            }
        }
    }
    if !data.is_empty() {
        event.data = data.as_ptr();
        event.len = data.len();
    }
    event
}

/// What happened to the pool (`wp_manager_event.kind`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum wp_manager_event_kind {
    /// A worker connected and was accepted; `worker` describes it.
    WP_MANAGER_EVENT_WORKER_JOINED = 1,
    /// A worker's connection ended; `reason` says why, in words.
    WP_MANAGER_EVENT_WORKER_LEFT = 2,
}

/// One pool event. The strings and `worker` point into the subscription and stay valid
/// until the next call on it (or `wp_subscription_free`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct wp_manager_event {
    /// What happened.
    pub kind: wp_manager_event_kind,
    /// The manager's id for the worker's connection (as `wp_worker_info_id`).
    pub worker_id: u64,
    /// The worker's name (NUL-terminated).
    pub worker_name: *const c_char,
    /// For `WP_MANAGER_EVENT_WORKER_LEFT`: why, in words (NUL-terminated). NULL otherwise.
    pub reason: *const c_char,
    /// For `WP_MANAGER_EVENT_WORKER_JOINED`: the worker (read it with the
    /// `wp_worker_info_*` accessors; do not free it). NULL otherwise.
    pub worker: *const wp_worker_info,
}

/// The pool's events from the moment of `wp_manager_subscribe` on: workers joining and
/// leaving. Made by `wp_manager_subscribe`; freed once with `wp_subscription_free`
/// (which may come after `wp_manager_free`). Threads: one call at a time on a
/// subscription (an event's strings live in it), though the thread may change from call
/// to call; different subscriptions may be used at once.
pub struct wp_subscription {
    rx: Receiver<ManagerEvent>,
    /// What the last event handed out points into.
    worker: Option<wp_worker_info>,
    name: CString,
    reason: Option<CString>,
}

impl wp_subscription {
    pub(crate) fn new(rx: Receiver<ManagerEvent>) -> wp_subscription {
        wp_subscription {
            rx,
            worker: None,
            name: CString::default(),
            reason: None,
        }
    }
}

/// Waits up to `timeout_ms` for the pool's next event and writes it to `*out`.
/// `WP_RESULT_TIMEOUT`: none came. `WP_RESULT_SHUT_DOWN`: the manager has shut down and
/// every event was delivered.
///
/// Ownership: the event's pointers are owned by the subscription, valid until the next
/// call on it. Threads: one call at a time per subscription.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_subscription_next(
    subscription: *mut wp_subscription,
    timeout_ms: u32,
    out: *mut wp_manager_event,
) -> wp_result {
    ffi!({
        let sub = arg_mut!(subscription);
        out!(out);
        let ev = match sub
            .rx
            .recv_timeout(Duration::from_millis(u64::from(timeout_ms)))
        {
            Ok(ev) => ev,
            Err(RecvTimeoutError::Timeout) => return WP_RESULT_TIMEOUT,
            Err(RecvTimeoutError::Disconnected) => {
                return fail(WP_RESULT_SHUT_DOWN, "the manager has shut down");
            }
        };
        let event = match ev {
            ManagerEvent::WorkerJoined(info) => {
                let info = wp_worker_info::new(info);
                sub.name = info.name.clone();
                sub.reason = None;
                let worker = &*sub.worker.insert(info);
                wp_manager_event {
                    kind: wp_manager_event_kind::WP_MANAGER_EVENT_WORKER_JOINED,
                    worker_id: worker.id,
                    worker_name: sub.name.as_ptr(),
                    reason: std::ptr::null(),
                    worker,
                }
            }
            ManagerEvent::WorkerLeft { id, name, reason } => {
                sub.worker = None;
                sub.name = c_text(&name);
                let reason = &*sub.reason.insert(c_text(&reason));
                wp_manager_event {
                    kind: wp_manager_event_kind::WP_MANAGER_EVENT_WORKER_LEFT,
                    worker_id: id,
                    worker_name: sub.name.as_ptr(),
                    reason: reason.as_ptr(),
                    worker: std::ptr::null(),
                }
            }
        };
        write(out, event)
    })
}

/// Frees a subscription; NULL does nothing. Events not yet read are dropped.
///
/// Ownership: call it once per subscription, after every other call on it returned.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wp_subscription_free(subscription: *mut wp_subscription) {
    ffi!((), { free(subscription) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(ev: JobEvent) -> (wp_event, Vec<u8>) {
        let mut data = b"left over".to_vec();
        let e = job_event(ev, &mut data);
        if e.len > 0 {
            assert_eq!(e.data, data.as_ptr(), "the event points into the buffer");
        } else {
            assert!(e.data.is_null());
        }
        (e, data[..e.len].to_vec())
    }

    #[test]
    fn each_field_of_an_event_means_one_thing_and_is_zero_when_it_does_not_apply() {
        let (e, d) = convert(JobEvent::Requeued { attempt: 3 });
        assert_eq!(e.kind, wp_event_kind::WP_EVENT_REQUEUED);
        assert_eq!((e.attempt, e.exit_code, e.signal), (3, 0, 0));
        assert_eq!(e.outcome, wp_outcome::WP_OUTCOME_NONE);
        assert!(d.is_empty());

        let (e, _) = convert(JobEvent::Finished(Outcome::Signaled(9)));
        assert_eq!(e.outcome, wp_outcome::WP_OUTCOME_SIGNALED);
        assert_eq!((e.signal, e.exit_code, e.attempt), (9, 0, 0));

        let (e, _) = convert(JobEvent::Finished(Outcome::Exited(3)));
        assert_eq!(e.outcome, wp_outcome::WP_OUTCOME_EXITED);
        assert_eq!((e.exit_code, e.signal, e.attempt), (3, 0, 0));

        let (e, d) = convert(JobEvent::Finished(Outcome::SpawnFailed("no bash".into())));
        assert_eq!(e.outcome, wp_outcome::WP_OUTCOME_SPAWN_FAILED);
        assert_eq!(d, b"no bash");

        let (e, d) = convert(JobEvent::Output {
            stream: Stream::Stderr,
            bytes: vec![0, 1, 2],
        });
        assert_eq!(e.kind, wp_event_kind::WP_EVENT_OUTPUT);
        assert_eq!(e.stream, wp_stream::WP_STREAM_STDERR);
        assert_eq!(d, [0, 1, 2]);

        let (e, d) = convert(JobEvent::Started {
            worker: "w1".into(),
        });
        assert_eq!(e.kind, wp_event_kind::WP_EVENT_STARTED);
        assert_eq!(d, b"w1");

        // An event without bytes leaves nothing of the one before.
        let (e, d) = convert(JobEvent::Queued);
        assert_eq!((e.kind, e.len), (wp_event_kind::WP_EVENT_QUEUED, 0));
        assert!(d.is_empty());
        for o in [Outcome::TimedOut, Outcome::Cancelled, Outcome::WorkerLost] {
            let (e, _) = convert(JobEvent::Finished(o));
            assert_eq!((e.exit_code, e.signal, e.attempt, e.len), (0, 0, 0, 0));
        }
    }
}
