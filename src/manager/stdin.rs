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
            }),
            room: Condvar::new(),
            hub,
        })
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
        s.w.offer(offset, bytes)?;
        self.flush(&mut s);
        Ok(())
    }

    /// A remote submitter ends the stream at `offset`.
    pub(crate) fn finish_at(&self, offset: u64) -> Result<(), String> {
        let mut s = self.lock();
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
