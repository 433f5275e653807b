//! Reader-side routing: what a link's reader does with each message from its worker.
//! Output goes straight into the job's sink through the link's route table (the
//! dispatcher never sees a byte of it); a job's end, a declined job and the start of a
//! run sent ahead go through the route table too, and then to the dispatcher as
//! [`LinkEvent`]s. This file owns
//! [`Route`] (a running job's place on its link) and the rule that goes with it:
//! **whoever removes a job's route delivers its one `Finished`.**

use super::dispatcher::LinkEvent;
use super::dispatcher::driver::Event;
use super::ids::IdMap;
use super::sink;
use crate::job::{JobEvent, JobId, Outcome};
use crate::metrics::Counters;
use crate::protocol::{OUTPUT_CHUNK, WorkerMessage, peer_text};
use crate::sync::lock;
use crossbeam_channel::Sender;
use sink::JobSink;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// How many messages about jobs it does not run are logged per link; the rest are
/// counted and reported once when the link closes.
const LOGGED_COMPLAINTS: u64 = 10;

/// A running job's place on its link: where its events go, and the output `seq` the
/// manager expects next (so that output replayed after a reconnect is taken once).
pub(crate) struct Route {
    pub sink: Arc<JobSink>,
    pub next_seq: u64,
    /// Output messages that never arrived (gaps in `seq`), and in how many gaps: the
    /// first gap is reported at once, the rest summed up when the job ends.
    pub lost: u64,
    pub gaps: u64,
    /// A run sent ahead that has not started: the name of the worker holding it, for
    /// the job's `Started` event when the worker says it has started. `None` once it
    /// has (and for a run sent into a free slot, whose `Started` went with its `Run`).
    pub held_by: Option<String>,
    /// Read back from the journal after a restart: what was delivered before is not
    /// known here, so the first output `seq` that comes is where delivery goes on (the
    /// worker sends again from the oldest output it kept; a remote submitter drops what
    /// it already has).
    pub restored: bool,
}

impl Route {
    pub(crate) fn new(sink: Arc<JobSink>) -> Route {
        Route {
            sink,
            next_seq: 0,
            lost: 0,
            gaps: 0,
            held_by: None,
            restored: false,
        }
    }

    /// The route of a job read back from the journal (see [`Route::restored`]).
    pub(crate) fn restored(sink: Arc<JobSink>) -> Route {
        Route {
            restored: true,
            ..Route::new(sink)
        }
    }

    /// The route of a run sent ahead to worker `name`, not started yet.
    pub(crate) fn held(sink: Arc<JobSink>, name: String) -> Route {
        Route {
            held_by: Some(name),
            ..Route::new(sink)
        }
    }

    /// Takes note of output `seq`: `Ok(true)` to deliver it, `Ok(false)` for a replay
    /// already delivered, `Err` for a `seq` no worker can have sent (`u64::MAX`, after
    /// which there would be no next one). A gap is counted; only the first one of a job
    /// becomes a warning at once (see [`Route::report_gaps`]).
    pub(crate) fn take_seq(
        &mut self,
        seq: u64,
        job: JobId,
        label: &str,
    ) -> std::result::Result<bool, String> {
        let Some(next) = seq.checked_add(1) else {
            return Err(format!("job {job}: output seq {seq} is out of range"));
        };
        if std::mem::take(&mut self.restored) {
            self.next_seq = seq;
        }
        if seq < self.next_seq {
            return Ok(false);
        }
        if seq > self.next_seq {
            let lost = seq - self.next_seq;
            self.lost = self.lost.saturating_add(lost);
            self.gaps += 1;
            if self.gaps == 1 {
                log::warn!("{label}: job {job}: {lost} output message(s) lost in a reconnect");
                self.sink.push(JobEvent::Warning(format!(
                    "{lost} output message(s) were lost while the worker reconnected"
                )));
            }
        }
        self.next_seq = next;
        Ok(true)
    }

    /// Before the job's end: the gaps not yet reported, summed up in one warning.
    pub(crate) fn report_gaps(&mut self, job: JobId, label: &str) {
        if self.gaps > 1 {
            let text = format!(
                "in all, {} output message(s) were lost in {} gaps",
                self.lost, self.gaps
            );
            log::warn!("{label}: job {job}: {text}");
            self.sink.push(JobEvent::Warning(text));
            self.gaps = 1;
        }
    }
}

/// The routes of one link, shared by the dispatcher and that link's reader. Events are
/// pushed under this lock (pushing never blocks), and removing an entry is the right to
/// deliver the job's `Finished`: so nothing follows it.
pub(crate) type Routes = Mutex<IdMap<JobId, Route>>;

/// What a link's reader needs to act on its worker's messages.
pub(crate) struct Link<'a> {
    /// The dispatcher's channel.
    pub events: &'a Sender<Event>,
    pub counters: &'a Counters,
    pub worker: u64,
    pub label: &'a str,
    pub routes: &'a Routes,
    /// The link's outbox: a job's end it reports is acknowledged on it.
    pub out: &'a crate::link::Outbox<crate::protocol::ManagerMessage>,
}

impl Link<'_> {
    fn tell(&self, event: LinkEvent) {
        let _ = self.events.send(Event::Link {
            worker: self.worker,
            event,
        });
    }
}

/// Messages about jobs a worker does not run, counted per link so that a worker cannot
/// fill the log with them: the first few are logged, the rest summed up at the end.
#[derive(Default)]
pub(crate) struct Complaints {
    ignored: u64,
}

impl Complaints {
    /// Counts one; true while it is still to be logged.
    fn ignored(&mut self, label: &str) -> bool {
        self.ignored += 1;
        if self.ignored == LOGGED_COMPLAINTS + 1 {
            log::warn!(
                "{label}: more messages about jobs it does not run; they are counted, not logged"
            );
        }
        self.ignored <= LOGGED_COMPLAINTS
    }

    pub(crate) fn summary(&self, label: &str) {
        if self.ignored > LOGGED_COMPLAINTS {
            log::warn!(
                "{label}: {} messages about jobs it does not run were ignored in all",
                self.ignored
            );
        }
    }
}

/// A worker's account of how a job ended, with its free text made safe to pass on.
fn peer_outcome(outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::Rejected(why) => Outcome::Rejected(peer_text(&why)),
        Outcome::SpawnFailed(why) => Outcome::SpawnFailed(peer_text(&why)),
        other => other,
    }
}

/// Acts on one message from a worker; `Err` says how it broke the protocol (the link
/// closes).
pub(crate) fn on_worker_message(
    link: &Link<'_>,
    complaints: &mut Complaints,
    msg: WorkerMessage,
) -> std::result::Result<(), String> {
    let Link {
        counters,
        label,
        routes,
        ..
    } = *link;
    match msg {
        WorkerMessage::StdinTaken { job, upto } | WorkerMessage::StdinClosed { job, upto } => {
            let closed = matches!(msg, WorkerMessage::StdinClosed { .. });
            // Under the routes lock: the job's stdin does not block (it may tell the
            // sessions following a remote job, whose hub never waits either).
            let routes = lock(routes);
            let Some(route) = routes.get(&job) else {
                drop(routes);
                if complaints.ignored(label) {
                    log::warn!("{label}: stdin news of job {job}, which it does not run (ignored)");
                }
                return Ok(());
            };
            let Some(stdin) = route.sink.stdin() else {
                return Err(format!("stdin news of job {job}, which is not interactive"));
            };
            let r = if closed {
                stdin.on_closed(upto)
            } else {
                stdin.on_taken(upto)
            };
            r.map_err(|e| format!("job {job}: {e}"))?;
        }
        WorkerMessage::Output {
            job,
            stream,
            seq,
            bytes,
        } => {
            if bytes.len() > OUTPUT_CHUNK {
                return Err(format!(
                    "an output message of {} bytes (at most {OUTPUT_CHUNK} allowed)",
                    bytes.len()
                ));
            }
            // Pushed under the routes lock (pushing never blocks), so that no output can
            // slip in after whoever removes the route has delivered `Finished`.
            let mut routes = lock(routes);
            let Some(route) = routes.get_mut(&job) else {
                log::debug!("{label}: output for job {job}, which it does not run (ignored)");
                return Ok(());
            };
            if seq < route.next_seq && !route.restored {
                return Ok(()); // replayed after a reconnect, and already delivered
            }
            // Checked before the seq is taken: refused output is not counted as
            // delivered, so a worker that reconnects sends it again.
            if !route.sink.has_room(bytes.len()) {
                return Err(format!(
                    "job {job}: it went on sending output after Pause ({} MiB held for the job)",
                    sink::MAX_BACKLOG_BYTES >> 20
                ));
            }
            if !route.take_seq(seq, job, label)? {
                return Ok(());
            }
            counters
                .output_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            route.sink.push_output(seq, stream, bytes);
        }
        WorkerMessage::Finished {
            job,
            outcome,
            cleanup_error,
        } => {
            let route = lock(routes).remove(&job);
            match route {
                Some(mut route) => {
                    // The dispatcher hears of it first: whoever sees `Finished` and then
                    // asks the manager finds the job gone and the slot free. It sends the
                    // acknowledgement (`Ended`) and the slot's next `Run` together.
                    link.tell(LinkEvent::JobEnded { job });
                    route.report_gaps(job, label);
                    if let Some(e) = cleanup_error {
                        let e = peer_text(&e);
                        log::warn!("{label}: job {job}: {e}");
                        route.sink.push(JobEvent::Warning(e));
                    }
                    route.sink.finished_on(peer_outcome(outcome), link.out);
                }
                None => {
                    if complaints.ignored(label) {
                        log::warn!(
                            "{label}: reported job {job} finished, which it does not run (ignored)"
                        );
                    }
                }
            }
        }
        WorkerMessage::Declined { job, reason } => {
            let route = lock(routes).remove(&job);
            match route {
                Some(route) => {
                    log::info!(
                        "{label}: declined job {job} ({}); queueing it again",
                        peer_text(&reason)
                    );
                    link.tell(LinkEvent::Declined { job, route });
                }
                None => {
                    if complaints.ignored(label) {
                        log::warn!("{label}: declined job {job}, which it was not given (ignored)");
                    }
                }
            }
        }
        WorkerMessage::CleanupFailed { job, error } => {
            // After the job's `Finished`, its route is gone: then it is only logged.
            let error = peer_text(&error);
            let routes = lock(routes);
            match routes.get(&job) {
                Some(route) => {
                    log::warn!("{label}: job {job}: {error}");
                    route.sink.push(JobEvent::Warning(error));
                }
                None => {
                    if complaints.ignored(label) {
                        log::warn!("{label}: job {job}, already ended: {error}");
                    }
                }
            }
        }
        WorkerMessage::Started { job } => {
            // Under the routes lock, before any output of the run can be pushed: the
            // submitter sees `Started` first.
            let mut routes = lock(routes);
            match routes.get_mut(&job) {
                Some(route) => {
                    if let Some(worker) = route.held_by.take() {
                        route.sink.push(JobEvent::Started { worker });
                        drop(routes);
                        link.tell(LinkEvent::Started { job });
                    }
                }
                None => {
                    drop(routes);
                    if complaints.ignored(label) {
                        log::warn!("{label}: started job {job}, which it was not given (ignored)");
                    }
                }
            }
        }
        WorkerMessage::Draining => link.tell(LinkEvent::Draining),
        WorkerMessage::Goodbye => link.tell(LinkEvent::Goodbye),
        WorkerMessage::Heartbeat => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::unbounded;

    #[test]
    fn output_seqs_replays_gaps_and_the_largest_seq_are_handled_without_overflow() {
        let (tx, rx) = unbounded();
        let mut route = Route::new(JobSink::new(JobId(1), tx, Arc::default()));
        assert_eq!(route.take_seq(0, JobId(1), "w"), Ok(true));
        assert_eq!(route.take_seq(0, JobId(1), "w"), Ok(false), "a replay");
        // Every other message missing: many gaps, one warning at once.
        for seq in (2..20_000).step_by(2) {
            assert_eq!(route.take_seq(seq, JobId(1), "w"), Ok(true));
        }
        assert_eq!((route.lost, route.gaps), (9_999, 9_999));
        let first: Vec<JobEvent> = rx.try_iter().collect();
        assert_eq!(
            first,
            vec![JobEvent::Warning(
                "1 output message(s) were lost while the worker reconnected".into()
            )]
        );
        // The rest, summed up once before the end.
        route.report_gaps(JobId(1), "w");
        route.report_gaps(JobId(1), "w");
        let sum: Vec<JobEvent> = rx.try_iter().collect();
        assert_eq!(
            sum,
            vec![JobEvent::Warning(
                "in all, 9999 output message(s) were lost in 9999 gaps".into()
            )]
        );
        // A seq with no next one is refused, and changes nothing.
        let e = route.take_seq(u64::MAX, JobId(1), "w").unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        assert_eq!(route.next_seq, 19_999);
        assert_eq!(route.take_seq(u64::MAX - 1, JobId(1), "w"), Ok(true));
        assert_eq!(route.next_seq, u64::MAX);
        assert_eq!(route.lost, 9_999 + (u64::MAX - 1 - 19_999));
    }
}
