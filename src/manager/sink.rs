//! One job's path to its submitter: events arrive in order, the thread that produces
//! them never blocks, and memory stays bounded. Normally an event goes straight into the
//! job's bounded channel. When that channel is full (the submitter reads slower than the
//! job writes), later events wait in a backlog that a short-lived thread hands over as
//! room appears, and the worker is told to pause the job's output until the backlog is
//! gone — so one slow reader holds back only its own job, never its worker's link.

use crate::job::{JobEvent, JobId};
use crate::link::Outbound;
use crate::metrics::Counters;
use crate::protocol::ManagerMessage;
use crossbeam_channel::{Sender, TrySendError};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

/// Where a job's output comes from while it runs: its worker's link, to pause and resume.
pub(crate) type Producer = Sender<Outbound<ManagerMessage>>;

pub(crate) struct JobSink {
    job: JobId,
    tx: Sender<JobEvent>,
    state: Mutex<State>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct State {
    backlog: VecDeque<JobEvent>,
    pumping: bool,
    /// `Finished` has been accepted: nothing more is.
    ended: bool,
    /// The submitter dropped its handle: events are discarded.
    abandoned: bool,
    producer: Option<Producer>,
    paused: bool,
}

impl JobSink {
    pub(crate) fn new(job: JobId, tx: Sender<JobEvent>, counters: Arc<Counters>) -> Arc<JobSink> {
        Arc::new(JobSink {
            job,
            tx,
            state: Mutex::default(),
            counters,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets (or clears) the link the job's output comes from. A job whose submitter is
    /// still behind is paused on its new link too.
    pub(crate) fn set_producer(&self, producer: Option<Producer>) {
        let mut s = self.lock();
        s.producer = producer;
        if let Some(p) = s.producer.as_ref().filter(|_| s.paused) {
            let _ = p.send(Outbound::Message(ManagerMessage::Pause { job: self.job }));
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

    /// Adds an event; never blocks. After `Finished`, nothing is accepted.
    pub(crate) fn push(self: &Arc<Self>, ev: JobEvent) {
        let mut s = self.lock();
        if s.ended {
            return;
        }
        if let JobEvent::Finished(outcome) = &ev {
            // The one place every job's end passes exactly once: count it here.
            s.ended = true;
            self.counters.finished(outcome);
        }
        if s.abandoned {
            return;
        }
        if s.pumping {
            s.backlog.push_back(ev);
            return;
        }
        match self.tx.try_send(ev) {
            Ok(()) => {}
            Err(TrySendError::Disconnected(_)) => self.abandon(&mut s),
            Err(TrySendError::Full(ev)) => {
                s.backlog.push_back(ev);
                s.pumping = true;
                if let Some(p) = s.producer.as_ref().filter(|_| !s.ended) {
                    let _ = p.send(Outbound::Message(ManagerMessage::Pause { job: self.job }));
                    s.paused = true;
                }
                let me = self.clone();
                let spawned = crate::thread::spawn("wp-deliver", move || me.pump());
                if let Err(e) = spawned {
                    // Without a thread, hand over in place rather than lose the events.
                    log::error!(
                        "job {}: cannot start a delivery thread ({e}); delivering inline",
                        self.job
                    );
                    let backlog: Vec<JobEvent> = s.backlog.drain(..).collect();
                    s.pumping = false;
                    drop(s);
                    for ev in backlog {
                        if self.tx.send(ev).is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }

    fn abandon(&self, s: &mut State) {
        s.abandoned = true;
        s.backlog.clear();
        self.resume(s);
    }

    fn resume(&self, s: &mut State) {
        if s.paused {
            s.paused = false;
            if let Some(p) = &s.producer {
                let _ = p.send(Outbound::Message(ManagerMessage::Resume { job: self.job }));
            }
        }
    }

    /// Hands the backlog over as the submitter makes room, then lets the job go on.
    fn pump(self: Arc<Self>) {
        loop {
            let ev = {
                let mut s = self.lock();
                match s.backlog.pop_front() {
                    Some(ev) => ev,
                    None => {
                        s.pumping = false;
                        self.resume(&mut s);
                        return;
                    }
                }
            };
            if self.tx.send(ev).is_err() {
                let mut s = self.lock();
                s.pumping = false;
                self.abandon(&mut s);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Outcome, Stream};
    use crossbeam_channel::{bounded, unbounded};
    use std::time::Duration;

    fn out(n: u8) -> JobEvent {
        JobEvent::Output {
            stream: Stream::Stdout,
            bytes: vec![n],
        }
    }

    #[test]
    fn a_full_channel_pauses_the_producer_and_keeps_the_order() {
        let (tx, rx) = bounded(2);
        let (ptx, prx) = unbounded();
        let sink = JobSink::new(JobId(9), tx, Arc::default());
        sink.set_producer(Some(ptx));
        for n in 0..10 {
            sink.push(out(n)); // never blocks, though only 2 fit
        }
        sink.push(JobEvent::Finished(Outcome::Exited(0)));
        sink.push(out(99)); // after Finished: ignored
        assert!(matches!(
            prx.recv_timeout(Duration::from_secs(10)).unwrap(),
            Outbound::Message(ManagerMessage::Pause { job: JobId(9) })
        ));
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
        let (ptx, prx) = unbounded();
        let sink = JobSink::new(JobId(3), tx, Arc::default());
        sink.set_producer(Some(ptx));
        sink.push(out(0));
        sink.push(out(1)); // full: pause, pump waits
        drop(rx);
        let msgs: Vec<_> = (0..2)
            .map(|_| prx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        assert!(matches!(
            msgs[0],
            Outbound::Message(ManagerMessage::Pause { .. })
        ));
        assert!(matches!(
            msgs[1],
            Outbound::Message(ManagerMessage::Resume { .. })
        ));
        sink.push(out(2)); // discarded without error
    }
}
