//! [`JobHandle`]: what `Manager::submit` returns. It reads the job's events from the
//! job's bounded channel (fed by the job's sink) and gathers them into a result; it
//! asks the dispatcher for nothing but a cancel.

use super::Shared;
use super::dispatcher::driver::Event;
use super::stdin::StdinPort;
use crate::error::{Error, Result};
use crate::job::{JobEvent, JobId, JobResult, Partial, PtySize};
use crate::stdin::{End, JobStdin, not_interactive};
use crossbeam_channel::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A submitted job: its events as they happen, and its result at the end.
pub struct JobHandle {
    id: JobId,
    events: Receiver<JobEvent>,
    shared: Arc<Shared>,
    partial: Partial,
    stdin: Option<Arc<StdinPort>>,
}

impl JobHandle {
    pub(crate) fn new(
        id: JobId,
        events: Receiver<JobEvent>,
        shared: Arc<Shared>,
        stdin: Option<Arc<StdinPort>>,
    ) -> JobHandle {
        JobHandle {
            id,
            events,
            shared,
            partial: Partial::default(),
            stdin,
        }
    }

    /// A writer for an interactive job's stdin ([`JobSpec::interactive`]); an error
    /// ([`Error::InvalidJob`]) for any other job. Bytes written before the job starts
    /// wait for it (up to the window). Every writer of a job writes the one stream:
    /// see [`JobStdin`].
    ///
    /// [`JobSpec::interactive`]: crate::JobSpec::interactive
    pub fn stdin(&self) -> Result<JobStdin> {
        let port = self.stdin.clone().ok_or_else(|| not_interactive(self.id))?;
        Ok(JobStdin {
            job: self.id,
            end: End::Local(port),
        })
    }

    /// Tells a terminal job ([`JobSpec::pty`](crate::JobSpec::pty)) its terminal's new
    /// size (as a window resize does); does not wait. An error for a job without a
    /// terminal, or a size of zero rows or columns.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        let port = self.stdin.as_ref().ok_or_else(|| {
            Error::InvalidJob(format!(
                "job {} has no terminal to resize (JobSpec::pty)",
                self.id
            ))
        })?;
        port.resize(PtySize { rows, cols })
    }

    /// The job's id.
    pub fn id(&self) -> JobId {
        self.id
    }

    /// The job's events, in order, ending with exactly one [`JobEvent::Finished`].
    /// Events taken from here are not seen by [`JobHandle::wait`].
    pub fn events(&self) -> &Receiver<JobEvent> {
        &self.events
    }

    /// Asks for the job to be cancelled (see [`Manager::cancel`](super::Manager::cancel)); does not wait.
    pub fn cancel(&self) -> Result<()> {
        self.shared
            .events
            .send(Event::Cancel {
                id: self.id,
                reply: None,
            })
            .map_err(|_| Error::ShutDown)
    }

    /// Waits for the job to end; returns its outcome and everything it wrote.
    pub fn wait(mut self) -> JobResult {
        self.gather(None)
            .expect("without a deadline, the job's end")
    }

    /// Like [`JobHandle::wait`], but gives up after `timeout` (output received so far is
    /// kept for the next call). Once it has returned a result, do not call it again.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<JobResult> {
        self.gather(Some(Instant::now() + timeout))
    }

    /// The job's events into its result, until its end or `deadline`. The channel
    /// closes without a `Finished` only when the manager went away under the job.
    fn gather(&mut self, deadline: Option<Instant>) -> Option<JobResult> {
        self.partial.gather(
            self.id,
            self.shared.result_limit,
            &self.events,
            deadline,
            "the manager shut down",
        )
    }
}
