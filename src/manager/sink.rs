//! One job's path to its submitter: events arrive in order, the thread that produces
//! them never blocks, and memory stays bounded. Normally an event goes straight into the
//! job's bounded channel (or, for a remote submitter, into the sessions that follow the
//! job: see `submitters`). When that is full (the submitter reads slower than the job
//! writes), later events wait in a backlog that a short-lived thread hands over as
//! room appears, and the worker is told to pause the job's output until the backlog is
//! gone — so one slow reader holds back only its own job, never its worker's link.
//!
//! Two things a worker controls are bounded here: the backlog (a worker that goes on
//! sending after `Pause` is refused once the backlog holds [`MAX_BACKLOG_BYTES`], and its
//! link is closed by the caller) and the number of warnings a job gets
//! ([`MAX_WARNINGS`]; the rest are counted and summed up in one more before `Finished`).

use super::stdin::StdinPort;
use super::submitters::RemoteDest;
use crate::job::{JobEvent, JobId, Outcome, Stream};
use crate::journal::{Journal, Record};
use crate::link::Outbox;
use crate::metrics::Counters;
use crate::protocol::ManagerMessage;
use crossbeam_channel::{SendError, Sender, TrySendError};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Where a job's output comes from while it runs: its worker's link, to pause and resume.
pub(crate) type Producer = Outbox<ManagerMessage>;

/// The most a paused job's backlog may hold (output bytes, plus [`EVENT_COST`] per
/// event). An honest worker sends at most what was in flight when it was paused (its
/// two 64-message queues and the socket buffers, about 8 MiB) and, after a reconnect,
/// what it replays (up to twice its `reconnect_buffer`, 16 MiB by default); a worker
/// that ignores `Pause` reaches this limit and is disconnected.
pub(crate) const MAX_BACKLOG_BYTES: usize = 64 << 20;
/// What one event costs in the backlog besides its output bytes.
const EVENT_COST: usize = 64;
/// What an in-process submitter's handle hears of a job the manager kept in its
/// journal when it stopped.
pub(crate) const SUSPENDED: &str =
    "the manager stopped; the job is kept in its journal and goes on when it starts again";
/// The most warnings one job delivers; later ones are counted and reported as one.
pub(crate) const MAX_WARNINGS: u32 = 16;

/// Where a job's events go: the bounded channel of an in-process [`super::JobHandle`],
/// or the sessions of the remote submitters that follow the job (see `submitters`).
/// Both take an event at once or say they are full, and both can wait for room. An
/// output event comes with its worker's `seq`, which only a remote submitter is told
/// (it drops output it already has after the manager restarted).
pub(crate) enum Dest {
    Local(Sender<JobEvent>),
    Remote(RemoteDest),
}

impl Dest {
    fn try_send(&self, ev: JobEvent, seq: Option<u64>) -> Result<(), TrySendError<JobEvent>> {
        match self {
            Dest::Local(tx) => tx.try_send(ev),
            Dest::Remote(r) => r.try_send(ev, seq),
        }
    }

    fn send(&self, ev: JobEvent, seq: Option<u64>) -> Result<(), SendError<JobEvent>> {
        match self {
            Dest::Local(tx) => tx.send(ev),
            Dest::Remote(r) => r.send(ev, seq),
        }
    }
}

/// An event on its way, with the worker's `seq` of an output message.
type Numbered = (JobEvent, Option<u64>);

impl From<Sender<JobEvent>> for Dest {
    fn from(tx: Sender<JobEvent>) -> Dest {
        Dest::Local(tx)
    }
}

pub(crate) struct JobSink {
    job: JobId,
    tx: Dest,
    state: Mutex<State>,
    counters: Arc<Counters>,
    backlog_limit: usize,
    /// An interactive job's stdin: it goes to the same worker link as the output
    /// comes from, and closes at the job's end.
    stdin: Option<Arc<StdinPort>>,
    /// The manager's journal, which hears of the job's end from here.
    journal: OnceLock<Arc<dyn Journal>>,
}

#[derive(Default)]
struct State {
    backlog: VecDeque<Numbered>,
    /// What the backlog holds, counted as [`MAX_BACKLOG_BYTES`] is.
    backlog_bytes: usize,
    pumping: bool,
    /// Warnings delivered, and those left out beyond [`MAX_WARNINGS`].
    warnings: u32,
    warnings_left_out: u64,
    /// `Finished` has been accepted: nothing more is.
    ended: bool,
    /// The manager stopped with the job kept in its journal: its end here is not its
    /// end (see [`JobSink::suspend`]).
    suspended: bool,
    /// The submitter dropped its handle: events are discarded.
    abandoned: bool,
    producer: Option<Producer>,
    /// The link whose worker reported the job's end (see [`JobSink::finished_on`]).
    reported_on: Option<Producer>,
    paused: bool,
}

impl std::fmt::Debug for JobSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JobSink({})", self.job)
    }
}

impl JobSink {
    #[cfg(test)]
    pub(crate) fn new(job: JobId, tx: impl Into<Dest>, counters: Arc<Counters>) -> Arc<JobSink> {
        JobSink::with_backlog_limit(job, tx.into(), counters, MAX_BACKLOG_BYTES)
    }

    /// A sink whose backlog holds at most `backlog_limit` (see [`MAX_BACKLOG_BYTES`]).
    #[cfg(test)]
    pub(crate) fn with_backlog_limit(
        job: JobId,
        tx: Dest,
        counters: Arc<Counters>,
        backlog_limit: usize,
    ) -> Arc<JobSink> {
        Arc::new(JobSink {
            job,
            tx,
            state: Mutex::default(),
            counters,
            backlog_limit,
            stdin: None,
            journal: OnceLock::new(),
        })
    }

    /// The sink of an interactive job, with its stdin (see [`StdinPort`]).
    pub(crate) fn with_stdin(
        job: JobId,
        tx: impl Into<Dest>,
        counters: Arc<Counters>,
        stdin: Option<Arc<StdinPort>>,
    ) -> Arc<JobSink> {
        Arc::new(JobSink {
            job,
            tx: tx.into(),
            state: Mutex::default(),
            counters,
            backlog_limit: MAX_BACKLOG_BYTES,
            stdin,
            journal: OnceLock::new(),
        })
    }

    /// Has the job's end written to `journal` when it comes.
    pub(crate) fn journal_to(&self, journal: Arc<dyn Journal>) {
        let _ = self.journal.set(journal);
    }

    /// The manager stops and keeps the job in its journal (it goes on after a restart):
    /// an in-process submitter's handle ends `Rejected` with that said, and nothing is
    /// journaled or counted; a remote submitter hears nothing (it follows the job
    /// again through the restarted manager).
    pub(crate) fn suspend(self: &Arc<Self>) {
        let inline = {
            let mut s = self.lock();
            if s.ended {
                return;
            }
            s.suspended = true;
            if matches!(self.tx, Dest::Remote(_)) {
                self.abandon(&mut s);
            }
            self.push_locked(
                &mut s,
                JobEvent::Finished(Outcome::Rejected(SUSPENDED.into())),
                None,
            )
        };
        self.hand_over(inline);
    }

    /// An interactive job's stdin.
    pub(crate) fn stdin(&self) -> Option<&Arc<StdinPort>> {
        self.stdin.as_ref()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }

    /// Sets (or clears) the link the job's output comes from. A job whose submitter is
    /// still behind is paused on its new link too.
    pub(crate) fn set_producer(&self, producer: Option<Producer>) {
        let mut s = self.lock();
        if let Some(stdin) = self.stdin.as_ref().filter(|_| !s.ended) {
            stdin.set_producer(producer.clone());
        }
        s.producer = producer;
        if let Some(p) = s.producer.as_ref().filter(|_| s.paused) {
            p.send(ManagerMessage::Pause { job: self.job });
        }
    }

    /// Whether the job's worker has been told to pause its output.
    pub(crate) fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Whether `Finished` has been accepted.
    #[cfg(test)]
    pub(crate) fn ended(&self) -> bool {
        self.lock().ended
    }

    /// Whether output of this many bytes may still be taken: false when the job is
    /// paused and its backlog holds [`MAX_BACKLOG_BYTES`] (its worker went on sending
    /// after `Pause`). Other events are always taken.
    pub(crate) fn has_room(&self, output_bytes: usize) -> bool {
        let s = self.lock();
        !s.pumping
            || s.abandoned
            || s.ended
            || s.backlog_bytes.saturating_add(EVENT_COST + output_bytes) <= self.backlog_limit
    }

    /// Adds an event; never blocks. After `Finished`, nothing is accepted. Warnings
    /// beyond [`MAX_WARNINGS`] are counted, and reported as one before `Finished`.
    pub(crate) fn push(self: &Arc<Self>, ev: JobEvent) {
        let inline = self.push_locked(&mut self.lock(), ev, None);
        self.hand_over(inline);
    }

    /// The job's worker reported its end on `link`: `Finished` is pushed, and with a
    /// journal that worker is told `Ended` on `link` once the end is on disk.
    pub(crate) fn finished_on(self: &Arc<Self>, outcome: Outcome, link: &Producer) {
        let inline = {
            let mut s = self.lock();
            s.reported_on = Some(link.clone());
            let inline = self.push_locked(&mut s, JobEvent::Finished(outcome), None);
            s.reported_on = None;
            inline
        };
        self.hand_over(inline);
    }

    /// Adds the worker's output message `seq` (see [`JobSink::push`]).
    pub(crate) fn push_output(self: &Arc<Self>, seq: u64, stream: Stream, bytes: Vec<u8>) {
        let ev = JobEvent::Output { stream, bytes };
        let inline = self.push_locked(&mut self.lock(), ev, Some(seq));
        self.hand_over(inline);
    }

    /// Takes an event under the lock; returns events to hand over in place (only when a
    /// delivery thread could not be started).
    fn push_locked(
        self: &Arc<Self>,
        s: &mut State,
        ev: JobEvent,
        seq: Option<u64>,
    ) -> Vec<Numbered> {
        let mut inline = Vec::new();
        if s.ended {
            return inline;
        }
        match &ev {
            JobEvent::Warning(_) if s.warnings >= MAX_WARNINGS => {
                s.warnings_left_out = s.warnings_left_out.saturating_add(1);
                return inline;
            }
            JobEvent::Warning(_) => s.warnings += 1,
            JobEvent::Finished(_) if s.warnings_left_out > 0 => {
                let n = std::mem::take(&mut s.warnings_left_out);
                let summary = JobEvent::Warning(format!(
                    "{n} more warning(s) about this job were left out (at most {MAX_WARNINGS} are given)"
                ));
                self.deliver(s, summary, None, &mut inline);
            }
            _ => {}
        }
        self.deliver(s, ev, seq, &mut inline);
        inline
    }

    fn deliver(
        self: &Arc<Self>,
        s: &mut State,
        ev: JobEvent,
        seq: Option<u64>,
        inline: &mut Vec<Numbered>,
    ) {
        if let JobEvent::Finished(outcome) = &ev {
            // The one place every job's end passes exactly once: count it here, and let
            // its stdin's writers go (they hear before the end is delivered).
            s.ended = true;
            if let Some(stdin) = &self.stdin {
                stdin.end();
            }
            if !s.suspended {
                self.counters.finished(outcome);
                if let Some(journal) = self.journal.get() {
                    // The worker forgets the job when told `Ended`: only once its end is
                    // on disk, so that a restart never finds a job sent to a worker that
                    // no longer has it although it ran (it would end lost, or run again).
                    // The worker told is the one that reported the end, on its link: the
                    // job's producer may still be an older link of the same worker, or
                    // none yet (a job resumed after a reconnect or a restart is attached
                    // to its new link after the round's records are on disk, and the
                    // worker may report its end before that).
                    let job = self.job;
                    let then = s.reported_on.take().map(|link| {
                        Box::new(move |durable| {
                            if durable {
                                link.send(ManagerMessage::Ended { job });
                            }
                        }) as crate::journal::Then
                    });
                    let ended = Record::Ended {
                        id: job,
                        outcome: outcome.clone(),
                    };
                    journal.record_then(vec![ended], then);
                }
            }
        }
        if s.abandoned {
            return;
        }
        if !inline.is_empty() {
            inline.push((ev, seq));
            return;
        }
        if s.pumping {
            s.backlog_bytes += cost(&ev);
            s.backlog.push_back((ev, seq));
            return;
        }
        match self.tx.try_send(ev, seq) {
            Ok(()) => {}
            Err(TrySendError::Disconnected(_)) => self.abandon(s),
            Err(TrySendError::Full(ev)) => {
                s.backlog_bytes += cost(&ev);
                s.backlog.push_back((ev, seq));
                s.pumping = true;
                if let Some(p) = s.producer.as_ref().filter(|_| !s.ended) {
                    p.send(ManagerMessage::Pause { job: self.job });
                    s.paused = true;
                }
                let me = self.clone();
                let spawned = crate::thread::relay("wp-deliver", move || me.pump());
                if let Err(e) = spawned {
                    // Without a thread, hand over in place rather than lose the events.
                    log::error!(
                        "job {}: cannot start a delivery thread ({e}); delivering inline",
                        self.job
                    );
                    inline.extend(s.backlog.drain(..));
                    s.backlog_bytes = 0;
                    s.pumping = false;
                }
            }
        }
    }

    /// Hands events over in place, outside the lock (see [`JobSink::push_locked`]).
    fn hand_over(&self, inline: Vec<Numbered>) {
        for (ev, seq) in inline {
            if self.tx.send(ev, seq).is_err() {
                break;
            }
        }
    }

    fn abandon(&self, s: &mut State) {
        s.abandoned = true;
        s.backlog.clear();
        s.backlog_bytes = 0;
        self.resume(s);
    }

    fn resume(&self, s: &mut State) {
        if s.paused {
            s.paused = false;
            if let Some(p) = &s.producer {
                p.send(ManagerMessage::Resume { job: self.job });
            }
        }
    }

    /// Hands the backlog over as the submitter makes room, then lets the job go on.
    fn pump(self: Arc<Self>) {
        loop {
            let ev = {
                let mut s = self.lock();
                match s.backlog.pop_front() {
                    Some(ev) => {
                        s.backlog_bytes -= cost(&ev.0);
                        ev
                    }
                    None => {
                        s.pumping = false;
                        self.resume(&mut s);
                        return;
                    }
                }
            };
            if self.tx.send(ev.0, ev.1).is_err() {
                let mut s = self.lock();
                s.pumping = false;
                self.abandon(&mut s);
                return;
            }
        }
    }
}

/// What an event costs in a backlog.
fn cost(ev: &JobEvent) -> usize {
    EVENT_COST
        + match ev {
            JobEvent::Output { bytes, .. } => bytes.len(),
            JobEvent::Warning(w) => w.len(),
            _ => 0,
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Outcome, Stream};
    use crate::link::Liveness;
    use crossbeam_channel::{bounded, unbounded};
    use std::time::{Duration, Instant};

    fn out(n: u8) -> JobEvent {
        JobEvent::Output {
            stream: Stream::Stdout,
            bytes: vec![n],
        }
    }

    fn producer() -> (Producer, Sent) {
        let out = Outbox::detached(Liveness::new(), 1 << 20);
        (out.clone(), Sent(out))
    }

    /// What a producer was sent, as the worker would read it.
    struct Sent(Producer);

    impl Sent {
        /// The next `n` messages, waiting (with a deadline) for the sink's delivery
        /// thread to send them.
        fn next(&self, n: usize) -> Vec<ManagerMessage> {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut got = Vec::new();
            while got.len() < n {
                got.extend(self.0.take_sent().0);
                assert!(Instant::now() < deadline, "only {got:?} sent");
                std::thread::yield_now();
            }
            got
        }
    }

    fn sized(n: usize) -> JobEvent {
        JobEvent::Output {
            stream: Stream::Stdout,
            bytes: vec![b'x'; n],
        }
    }

    #[test]
    fn a_backlog_over_its_limit_has_no_room_for_more_output() {
        let (tx, rx) = bounded(1);
        let (ptx, prx) = producer();
        let sink = JobSink::with_backlog_limit(JobId(4), tx.into(), Arc::default(), 1000);
        sink.set_producer(Some(ptx));
        assert!(sink.has_room(100));
        sink.push(sized(100)); // into the channel
        sink.push(sized(100)); // full: backlog, pause
        assert_eq!(prx.next(1), vec![ManagerMessage::Pause { job: JobId(4) }]);
        let mut taken = 2;
        // The worker ignores the pause: the backlog takes up to its limit, then has no room.
        while sink.has_room(100) {
            sink.push(sized(100));
            taken += 1;
            assert!(taken < 100, "the backlog never filled");
        }
        assert!(!sink.has_room(100), "and stays full");
        // One in the channel, one in the pump's hands (or about to be), and 6 of
        // 100 + 64 bytes in a backlog of 1000.
        assert!((7..=8).contains(&taken), "{taken} taken");
        // Other events (the job's end) still get through, after everything taken.
        sink.push(JobEvent::Finished(Outcome::WorkerLost));
        let got: Vec<JobEvent> = (0..=taken)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        assert_eq!(got.last(), Some(&JobEvent::Finished(Outcome::WorkerLost)));
        assert!(got[..taken].iter().all(|e| *e == sized(100)));
        assert!(
            sink.has_room(1 << 30),
            "an ended job takes (and drops) anything"
        );
        sink.push(sized(1)); // after Finished: ignored
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn warnings_are_capped_and_the_rest_counted_in_one_before_finished() {
        let (tx, rx) = unbounded();
        let sink = JobSink::new(JobId(5), tx, Arc::default());
        for i in 0..10_000 {
            sink.push(JobEvent::Warning(format!("warning {i}")));
        }
        sink.push(JobEvent::Finished(Outcome::Exited(0)));
        let got: Vec<JobEvent> = rx.try_iter().collect();
        let warnings: Vec<&str> = got
            .iter()
            .filter_map(|e| match e {
                JobEvent::Warning(w) => Some(w.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(warnings.len(), MAX_WARNINGS as usize + 1);
        assert_eq!(warnings[0], "warning 0");
        let last = warnings.last().unwrap();
        assert!(
            last.contains(&format!("{} more warning(s)", 10_000 - MAX_WARNINGS)),
            "{last}"
        );
        assert_eq!(got.last(), Some(&JobEvent::Finished(Outcome::Exited(0))));
    }

    #[test]
    fn a_full_channel_pauses_the_producer_and_keeps_the_order() {
        let (tx, rx) = bounded(2);
        let (ptx, prx) = producer();
        let sink = JobSink::new(JobId(9), tx, Arc::default());
        sink.set_producer(Some(ptx));
        for n in 0..10 {
            sink.push(out(n)); // never blocks, though only 2 fit
        }
        sink.push(JobEvent::Finished(Outcome::Exited(0)));
        sink.push(out(99)); // after Finished: ignored
        assert_eq!(prx.next(1), vec![ManagerMessage::Pause { job: JobId(9) }]);
        let got: Vec<JobEvent> = rx.iter().take(11).collect();
        assert!(rx.try_recv().is_err(), "nothing after Finished");
        let mut want: Vec<JobEvent> = (0..10).map(out).collect();
        want.push(JobEvent::Finished(Outcome::Exited(0)));
        assert_eq!(got, want);
        assert!(sink.ended());
    }

    #[test]
    fn a_dropped_handle_resumes_the_producer_and_discards() {
        let (tx, rx) = bounded(1);
        let (ptx, prx) = producer();
        let sink = JobSink::new(JobId(3), tx, Arc::default());
        sink.set_producer(Some(ptx));
        sink.push(out(0));
        sink.push(out(1)); // full: pause, pump waits
        drop(rx);
        assert_eq!(
            prx.next(2),
            vec![
                ManagerMessage::Pause { job: JobId(3) },
                ManagerMessage::Resume { job: JobId(3) }
            ]
        );
        sink.push(out(2)); // discarded without error
    }
}
