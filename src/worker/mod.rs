//! The worker: dials the manager (it never listens, so it works behind NAT), registers,
//! runs the jobs it is given and streams their output back. When the connection fails
//! or cannot be made yet it retries with capped exponential backoff and jitter, until
//! [`Worker::stop`]; jobs go on while it reconnects, and their output is sent again from
//! where the manager lost it.
//!
//! What decides is `session`, a state machine without sockets, threads or a clock of
//! its own; `driver` holds the threads and sockets that feed it and carry out what it
//! says; `pool` keeps the job supervisor threads, which run `executor`; `replay` keeps
//! each job's output for the link; `stdin` counts an interactive job's stdin; `config` is
//! the worker's settings.

pub(crate) mod config;
mod driver;
mod executor;
mod folder;
mod job_user;
mod pool;
mod replay;
mod session;
mod spawn;
mod stdin;
mod tree;

pub use config::{WorkerConfig, WorkerSecurity, detect_platform};

use crate::error::{Error, Result};
use crate::tls;
use crossbeam_channel::{Receiver, bounded};
use driver::{Env, Shared};
use session::{Input, Session, Settings};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A running worker. Dropping it stops it.
pub struct Worker {
    name: String,
    shared: Arc<Shared>,
    /// Disconnected when the worker thread has ended.
    done: Receiver<()>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Worker {
    /// Checks the configuration and starts the worker in the background. It connects
    /// (and reconnects) on its own; an unreachable manager is not an error here.
    pub fn start(config: WorkerConfig) -> Result<Worker> {
        config.validate()?;
        let tls = match &config.security {
            WorkerSecurity::MutualTls {
                identity,
                manager_trust,
                verify_hostname,
            } => Some(tls::client_config(
                identity,
                manager_trust,
                *verify_hostname,
            )?),
            WorkerSecurity::InsecurePlaintext => {
                log::warn!(
                    "worker {} connects WITHOUT TLS to {}",
                    config.name,
                    config.address()
                );
                None
            }
        };
        let job_user = config.resolve_job_user()?;
        // The environment its jobs inherit, copied once rather than at each job.
        spawn::capture_environment();
        // SAFETY: geteuid has no preconditions.
        let mut owners = vec![unsafe { libc::geteuid() }];
        owners.extend(job_user.as_ref().map(|u| u.uid));
        executor::sweep_stale_dirs(&config.work_dir, &owners);
        let settings = Settings {
            name: config.name.clone(),
            tags: config.tags.clone(),
            platform: config.platform.clone(),
            slots: config.slots,
            ahead: config.ahead,
            address: config.address(),
            connect_timeout: config.connect_timeout,
            backoff_initial: config.backoff_initial,
            backoff_max: config.backoff_max,
            reconnect_buffer: config.reconnect_buffer,
        };
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ ((std::process::id() as u64) << 32)
            ^ (&settings as *const _ as u64);
        let session = Session::new(settings, Instant::now(), seed);
        let env = Env::new(&config, tls, job_user);
        let (done_tx, done_rx) = bounded::<()>(0);
        // Supervisors kept waiting: one per slot, and with a look-ahead one more per slot,
        // since a held run starts while the supervisor of the job before it still
        // cleans up (the folder, the leftover sweep).
        let supervisors = config.slots + config.ahead.min(config.slots);
        let (shared, thread) =
            driver::start(session, config.name.clone(), supervisors, env, done_tx)
                .map_err(|e| Error::io("starting the worker thread", e))?;
        Ok(Worker {
            name: config.name,
            shared,
            done: done_rx,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether it is connected to the manager right now.
    pub fn is_connected(&self) -> bool {
        self.shared.status.connected.load(Ordering::Relaxed)
    }

    /// How many times it has been accepted by a manager so far.
    pub fn sessions(&self) -> u64 {
        self.shared.status.sessions.load(Ordering::Relaxed)
    }

    /// How many times it has tried to connect so far (successful or not).
    pub fn connection_attempts(&self) -> u64 {
        self.shared.status.attempts.load(Ordering::Relaxed)
    }

    /// Starts draining and returns at once: the worker takes no new jobs (the manager
    /// stops routing to it), lets the running ones finish and report, then leaves. With
    /// a deadline, jobs still running then are killed (they end `Cancelled`).
    /// [`Worker::wait`] tells when it has left; [`Worker::stop`] cuts it short.
    pub fn drain(&self, deadline: Option<Duration>) {
        // A deadline too far for the clock is no deadline.
        let deadline = deadline.and_then(|d| Instant::now().checked_add(d));
        self.shared.feed(Input::Drain(deadline));
    }

    /// Waits until the worker has left (after a drain), up to `timeout`; true if it has.
    pub fn wait(&self, timeout: Duration) -> bool {
        let left = matches!(
            self.done.recv_timeout(timeout),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected)
        );
        if left && let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
        left
    }

    /// Stops now: kills running jobs (the manager, told goodbye, ends them `WorkerLost`),
    /// cleans up their folders, closes the connection, and returns when the worker's
    /// threads are gone.
    pub fn stop(&self) {
        let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        self.shared.feed(Input::Stop);
        let _ = t.join();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}
