//! An interactive job's stdin on the manager: the bytes its submitter wrote and its
//! worker has not taken (at most `STDIN_WINDOW`, kept to be sent again after the worker
//! reconnects), sent on the job's current worker link. The job's sink holds it and
//! gives it its link with the output's (`JobSink::set_producer`); the link's reader hands
//! it the worker's `StdinTaken` and `StdinClosed`; the sink closes it at the job's end.
//! Writers are a local [`JobStdin`](crate::JobStdin) (which waits here for room) or a
//! remote submitter's session (told of each step through the hub).
//!
//! Locks: a sink's lock may be held when this one is taken, and this one when the hub's
//! is: nothing here calls back into a sink or a route table.

use super::sink::Producer;
use super::submitters::Submitters;
use crate::job::{JobId, PtySize};
use crate::protocol::ManagerMessage;
use crate::stdin::{StdinOut, StdinWindow, refused_error};
use crate::sync::{self, lock};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// One interactive job's stdin on the manager (see the module).
pub(crate) struct StdinPort {
    job: JobId,
    pty: bool,
    state: Mutex<State>,
    /// Notified when bytes are taken, and when the stdin closes.
    room: Condvar,
    /// A remote job's hub: the sessions following the job hear how far it was taken.
    hub: Option<Arc<Submitters>>,
}

struct State {
    w: StdinWindow,
    producer: Option<Producer>,
    /// Where the next link starts sending (what its worker said it had taken).
    resume_from: Option<u64>,
    /// The terminal's size asked for since the job was submitted.
    size: Option<PtySize>,
    /// Rebuilt after the manager restarted (see [`StdinPort::restored`]): the stream
    /// starts where the worker says it took it to, or where the writer's first bytes
    /// start, whichever comes first and is further.
    adopt_worker: bool,
    adopt_writer: bool,
}

impl std::fmt::Debug for StdinPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StdinPort({})", self.job)
    }
}

impl StdinPort {
    pub(crate) fn new(job: JobId, pty: bool, hub: Option<Arc<Submitters>>) -> Arc<StdinPort> {
        Arc::new(StdinPort {
            job,
            pty,
            state: Mutex::new(State {
                w: StdinWindow::default(),
                producer: None,
                resume_from: None,
                size: None,
                adopt_worker: false,
                adopt_writer: false,
            }),
            room: Condvar::new(),
            hub,
        })
    }

    /// The stdin of a remote job found in the journal after a restart: what the old
    /// manager held of it is gone, so it starts where its worker (on its return) or its
    /// submitter (sending again what it kept) says the stream is, and goes on from there.
    pub(crate) fn restored(job: JobId, pty: bool, hub: Arc<Submitters>) -> Arc<StdinPort> {
        let port = StdinPort::new(job, pty, Some(hub));
        {
            let mut s = port.lock();
            s.adopt_worker = true;
            s.adopt_writer = true;
        }
        port
    }

    /// The stdin of an in-process submitter's job found in the journal after a restart:
    /// its writer was in the old process, so the stream ends where the job's worker (on
    /// its return) says it took it, or at once for a run that starts now.
    pub(crate) fn orphaned(job: JobId, pty: bool) -> Arc<StdinPort> {
        let port = StdinPort::new(job, pty, None);
        {
            let mut s = port.lock();
            s.adopt_worker = true;
            let _ = s.w.finish();
        }
        port
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Sends what is pending on the link, if there is one.
    fn flush(&self, s: &mut State) {
        let out = s.w.pending();
        if let Some(p) = &s.producer {
            for o in out {
                p.send(match o {
                    StdinOut::Data { offset, bytes } => ManagerMessage::StdinData {
                        job: self.job,
                        offset,
                        bytes,
                    },
                    StdinOut::Eof { offset } => ManagerMessage::StdinEof {
                        job: self.job,
                        offset,
                    },
                });
            }
        }
    }

    /// Writers and remote sessions hear that bytes were taken or the stdin closed.
    fn changed(&self, s: &State) {
        self.room.notify_all();
        if let Some(hub) = &self.hub {
            hub.lock().stdin(self.job, s.w.taken(), s.w.is_closed());
        }
    }

    /// The job's worker link (set after its `Run`, or after its worker came back), or
    /// none (the link dropped, or the job goes back to the queue).
    pub(crate) fn set_producer(&self, producer: Option<Producer>) {
        let mut s = self.lock();
        match producer {
            None => {
                s.w.unlink();
                s.producer = None;
            }
            Some(p) => {
                let from = s.resume_from.take();
                let before = s.w.taken();
                if std::mem::take(&mut s.adopt_worker)
                    && let Some(from) = from
                {
                    s.w.skip_to(from);
                }
                if let Err(e) = s.w.link(from) {
                    // A worker cannot have taken what was never sent: sent from what
                    // the manager knows was taken.
                    log::warn!("job {}: {e}", self.job);
                    s.w.link(None).expect("from what was taken");
                }
                s.producer = Some(p);
                if let (Some(size), Some(p)) = (s.size, &s.producer) {
                    p.send(ManagerMessage::Resize {
                        job: self.job,
                        size,
                    });
                }
                self.flush(&mut s);
                if s.w.taken() != before {
                    self.changed(&s);
                }
            }
        }
    }

    /// The job's worker came back saying it had taken every byte before `taken`: the
    /// next link sends from there.
    pub(crate) fn resume_from(&self, taken: u64) {
        self.lock().resume_from = Some(taken);
    }

    /// The worker took every byte before `upto`. `Err`: bytes it was never sent.
    pub(crate) fn on_taken(&self, upto: u64) -> Result<(), String> {
        let mut s = self.lock();
        if s.w.on_taken(upto)? {
            self.changed(&s);
        }
        Ok(())
    }

    /// The job closed its stdin (or ended) having taken every byte before `upto`.
    pub(crate) fn on_closed(&self, upto: u64) -> Result<(), String> {
        let mut s = self.lock();
        let before = s.w.taken();
        let closed = s.w.on_closed(upto)?;
        if closed || s.w.taken() != before {
            self.changed(&s);
        }
        Ok(())
    }

    /// The job ended: writers are let go.
    pub(crate) fn end(&self) {
        let mut s = self.lock();
        if s.w.close() {
            s.producer = None;
            self.changed(&s);
        }
    }

    /// A local writer's bytes: what fits, waiting (without a deadline) while nothing does.
    pub(crate) fn write(&self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut s = self.lock();
        loop {
            let n = s.w.write(bytes).map_err(refused_error)?;
            if n > 0 {
                self.flush(&mut s);
                return Ok(n);
            }
            s = sync::wait(&self.room, s);
        }
    }

    /// A local writer ends the stream.
    pub(crate) fn finish(&self) -> std::io::Result<()> {
        let mut s = self.lock();
        s.w.finish().map_err(refused_error)?;
        self.flush(&mut s);
        Ok(())
    }

    /// A remote submitter's bytes from `offset`. `Err`: it broke the protocol.
    pub(crate) fn offer(&self, offset: u64, bytes: &[u8]) -> Result<(), String> {
        let mut s = self.lock();
        if std::mem::take(&mut s.adopt_writer) {
            s.w.skip_to(offset);
        }
        s.w.offer(offset, bytes)?;
        self.flush(&mut s);
        Ok(())
    }

    /// A remote submitter ends the stream at `offset`.
    pub(crate) fn finish_at(&self, offset: u64) -> Result<(), String> {
        let mut s = self.lock();
        if std::mem::take(&mut s.adopt_writer) {
            s.w.skip_to(offset);
        }
        s.w.finish_at(offset)?;
        self.flush(&mut s);
        Ok(())
    }

    /// The terminal's new size, sent to the worker now or when the job starts.
    pub(crate) fn resize(&self, size: PtySize) -> crate::Result<()> {
        if !self.pty {
            return Err(crate::Error::InvalidJob(format!(
                "job {} has no terminal to resize (JobSpec::pty)",
                self.job
            )));
        }
        if size.rows == 0 || size.cols == 0 {
            return Err(crate::Error::InvalidJob(
                "a terminal must have at least one row and one column".into(),
            ));
        }
        let mut s = self.lock();
        s.size = Some(size);
        if let Some(p) = &s.producer {
            p.send(ManagerMessage::Resize {
                job: self.job,
                size,
            });
        }
        Ok(())
    }

    /// How far the stdin was taken, and whether it is closed (for a session that
    /// begins to follow the job).
    pub(crate) fn progress(&self) -> (u64, bool) {
        let s = self.lock();
        (s.w.taken(), s.w.is_closed())
    }

    /// Bytes kept for the worker (at most the window).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.lock().w.held()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobEvent, Outcome};
    use crate::link::{Liveness, Outbox};
    use crate::manager::sink::JobSink;
    use crate::protocol::STDIN_WINDOW;
    use crossbeam_channel::unbounded;
    use std::io::Write;
    use std::time::{Duration, Instant};

    fn producer() -> Producer {
        Outbox::detached(Liveness::new(), 4 << 20)
    }

    /// The stdin bytes a worker link was sent, as `(offset, len)`, and whether an end.
    fn sent(p: &Producer) -> (Vec<(u64, usize)>, Option<u64>, Vec<PtySize>) {
        let (mut data, mut eof, mut sizes) = (Vec::new(), None, Vec::new());
        for m in p.take_sent().0 {
            match m {
                ManagerMessage::StdinData { offset, bytes, .. } => data.push((offset, bytes.len())),
                ManagerMessage::StdinEof { offset, .. } => eof = Some(offset),
                ManagerMessage::Resize { size, .. } => sizes.push(size),
                _ => {}
            }
        }
        (data, eof, sizes)
    }

    fn writer(port: &Arc<StdinPort>) -> crate::JobStdin {
        crate::JobStdin {
            job: JobId(1),
            end: crate::stdin::End::Local(port.clone()),
        }
    }

    #[test]
    fn bytes_before_the_start_wait_for_the_link_and_a_returning_worker_gets_them_again() {
        let port = StdinPort::new(JobId(1), false, None);
        let (tx, _rx) = unbounded();
        let sink = JobSink::with_stdin(JobId(1), tx, Arc::default(), Some(port.clone()));
        let mut w = writer(&port);
        w.write_all(&[b'a'; 1000]).unwrap();
        let first = producer();
        sink.set_producer(Some(first.clone()));
        assert_eq!(sent(&first).0, vec![(0, 1000)]);
        port.on_taken(400).unwrap();
        assert_eq!(port.held(), 600);
        // The link drops; meanwhile more is written and the stream ended.
        sink.set_producer(None);
        w.write_all(&[b'b'; 500]).unwrap();
        w.close().unwrap();
        // The worker comes back having taken 700 (its report of it was lost).
        port.resume_from(700);
        let second = producer();
        sink.set_producer(Some(second.clone()));
        assert_eq!(sent(&second), (vec![(700, 800)], Some(1500), vec![]));
        assert_eq!(port.progress(), (700, false));
        assert!(port.on_taken(1501).is_err(), "more than was written");
    }

    #[test]
    fn a_writer_waits_at_the_window_goes_on_when_bytes_are_taken_and_fails_when_closed() {
        let port = StdinPort::new(JobId(1), true, None);
        let out = producer();
        port.set_producer(Some(out.clone()));
        let mut w = writer(&port);
        let window = STDIN_WINDOW as usize;
        let (done_tx, done) = unbounded();
        let t = std::thread::spawn(move || {
            let r = w.write_all(&vec![7u8; 3 * window]);
            done_tx.send(()).unwrap();
            r
        });
        // It fills the window and waits there.
        let deadline = Instant::now() + Duration::from_secs(10);
        while port.held() < window {
            assert!(Instant::now() < deadline, "the window never filled");
            std::thread::yield_now();
        }
        assert!(done.try_recv().is_err(), "the writer waits");
        assert_eq!(port.held(), window, "never more than the window");
        // The job reads one window: the writer goes on, and fills it again.
        port.on_taken(STDIN_WINDOW).unwrap();
        while port.progress().0 < STDIN_WINDOW || port.held() < window {
            assert!(Instant::now() < deadline, "the writer did not go on");
            std::thread::yield_now();
        }
        let (data, ..) = sent(&out);
        assert_eq!(
            data.iter().map(|(_, n)| n).sum::<usize>(),
            2 * window,
            "two windows sent"
        );
        // The job closes its stdin: the waiting writer is let go with a clear error.
        port.on_closed(STDIN_WINDOW + 10).unwrap();
        done.recv_timeout(Duration::from_secs(10))
            .expect("the writer returned");
        let e = t.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
        assert_eq!(e.to_string(), "stdin closed");
        assert_eq!(port.held(), 0, "nothing kept once closed");
        assert_eq!(port.progress(), (STDIN_WINDOW + 10, true));
    }

    #[test]
    fn the_job_s_end_lets_a_waiting_writer_go_and_a_resize_goes_to_the_link() {
        let port = StdinPort::new(JobId(1), true, None);
        let (tx, _rx) = unbounded();
        let sink = JobSink::with_stdin(JobId(1), tx, Arc::default(), Some(port.clone()));
        // Resized before the start: told when the job gets its link.
        port.resize(PtySize { rows: 5, cols: 6 }).unwrap();
        assert!(port.resize(PtySize { rows: 0, cols: 6 }).is_err());
        let out = producer();
        sink.set_producer(Some(out.clone()));
        assert_eq!(sent(&out).2, vec![PtySize { rows: 5, cols: 6 }]);
        port.resize(PtySize { rows: 7, cols: 8 }).unwrap();
        assert_eq!(sent(&out).2, vec![PtySize { rows: 7, cols: 8 }]);
        let mut w = writer(&port);
        let t = std::thread::spawn(move || w.write_all(&vec![1u8; 2 * STDIN_WINDOW as usize]));
        let deadline = Instant::now() + Duration::from_secs(10);
        while port.held() < STDIN_WINDOW as usize {
            assert!(Instant::now() < deadline, "the window never filled");
            std::thread::yield_now();
        }
        sink.push(JobEvent::Finished(Outcome::Exited(0)));
        let e = t.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
        let again = writer(&port).close().unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::BrokenPipe);
        // A job without a terminal has nothing to resize.
        let plain = StdinPort::new(JobId(2), false, None);
        assert!(plain.resize(PtySize { rows: 1, cols: 1 }).is_err());
    }

    #[test]
    fn an_orphaned_stdin_ends_where_its_worker_took_it_or_at_once() {
        let port = StdinPort::orphaned(JobId(1), false);
        port.resume_from(700);
        let link = producer();
        port.set_producer(Some(link.clone()));
        assert_eq!(sent(&link), (vec![], Some(700), vec![]));
        let port = StdinPort::orphaned(JobId(2), true);
        let link = producer();
        port.set_producer(Some(link.clone()));
        assert_eq!(sent(&link), (vec![], Some(0), vec![]));
    }

    #[test]
    fn a_restored_stdin_starts_where_its_worker_or_its_writer_comes_back_and_goes_on_once() {
        let hub = super::super::submitters::Submitters::new(
            super::super::submitters::HubSettings {
                grace: Duration::from_secs(10),
                window: 1 << 20,
                kept_output: 1 << 20,
                keep_ended_for: Duration::from_secs(60),
                keep_ended: 10,
                max_sessions_per_owner: 4,
            },
            Arc::new(crate::link::Pace::new(
                crate::link::Timing {
                    heartbeat_interval: Duration::from_secs(1),
                    heartbeat_timeout: Duration::from_secs(5),
                },
                Duration::from_secs(10),
                0,
            )),
        );
        let bytes = |n: usize| vec![b'x'; n];
        // The worker comes back first, having taken 700; the writer sends again what
        // it kept, from 400 (what the old manager last told it), and ends the stream.
        let port = StdinPort::restored(JobId(1), false, hub.clone());
        port.resume_from(700);
        let link = producer();
        port.set_producer(Some(link.clone()));
        assert_eq!(sent(&link), (vec![], None, vec![]));
        assert_eq!(port.progress(), (700, false));
        port.offer(400, &bytes(600)).unwrap();
        port.finish_at(1000).unwrap();
        assert_eq!(sent(&link), (vec![(700, 300)], Some(1000), vec![]));
        // The writer comes back first, from 400; the worker had taken 900.
        let port = StdinPort::restored(JobId(2), false, hub.clone());
        port.offer(400, &bytes(600)).unwrap();
        port.resume_from(900);
        let link = producer();
        port.set_producer(Some(link.clone()));
        assert_eq!(sent(&link).0, vec![(900, 100)]);
        assert_eq!(port.progress(), (900, false));
        // The worker had taken more than the writer's first piece reached: what the
        // writer sends after is taken from there.
        let port = StdinPort::restored(JobId(3), false, hub.clone());
        port.offer(400, &bytes(60)).unwrap();
        port.resume_from(900);
        let link = producer();
        port.set_producer(Some(link.clone()));
        assert_eq!(sent(&link).0, vec![]);
        port.offer(460, &bytes(540)).unwrap();
        assert_eq!(sent(&link).0, vec![(900, 100)]);
        // Only the first of each says where the stream is: a later gap is still one.
        assert!(port.offer(1200, &bytes(1)).is_err());
        // A stdin that was not restored takes no gap at its start.
        let plain = StdinPort::new(JobId(4), false, None);
        assert!(plain.offer(400, &bytes(1)).is_err());
    }
}
