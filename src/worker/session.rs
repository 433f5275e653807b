//! The worker's side of the protocol as a state machine with no socket, no thread and no
//! clock of its own: the connect/backoff loop, the welcome and the resume of held jobs,
//! draining, declined runs, giving up held jobs before the manager's grace, stopping,
//! and what goes on the link and in which order.
//!
//! Whoever has an input calls [`Session::handle`] with the current `Instant`: a message
//! from the manager, the link coming up or going down, a job event from a supervisor,
//! a call of the public API, or a timer tick. The session answers with [`Action`]s
//! (start, cancel, kill, pause a job; make a connection attempt; wake the link's writer;
//! exit) and with the next instant it wants a tick at ([`Session::next_deadline`]). The
//! link's writer pulls what to send with [`Session::transmit`]: output is numbered and
//! kept here (see `replay`), so the writer and a replay after a reconnect read the same
//! shared chunks, every byte once and in order.
//!
//! The threads around it (`driver`) own the sockets and the processes and do what it
//! says; they decide nothing. Its tests move a fake clock.

use super::executor::JobKey;
use super::replay::{Chunk, Numbered, OutputLog};
use super::stdin::StdinFlow;
use crate::job::{JobId, JobSpec, Outcome, PtySize, Stream};
use crate::protocol::{HeldJob, ManagerMessage, Welcome, WorkerHello, WorkerMessage};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long a leaving worker waits for its killed jobs to be reaped and cleaned up
/// (and its link to close) before it exits anyway.
pub(crate) const STOP_WAIT: Duration = Duration::from_secs(10);
/// The shortest window given to a connection attempt when the held jobs' grace is about
/// to run out.
const MIN_CONNECT_WINDOW: Duration = Duration::from_millis(100);
/// What a message other than output is counted as against a writer's batch.
const SMALL_MESSAGE: usize = 64;

/// What the session needs to know of the worker's configuration.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub name: String,
    pub tags: BTreeSet<String>,
    pub platform: String,
    pub slots: u32,
    /// How many runs sent ahead it holds at most beyond its slots.
    pub ahead: u32,
    /// For log lines: the manager's address.
    pub address: String,
    pub connect_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Per job run: the most output kept of what was handed to a link, and the most
    /// output waiting for a link before the job is paused.
    pub reconnect_buffer: usize,
}

/// Something that happened, for the session to act on.
#[derive(Debug)]
pub(crate) enum Input {
    /// A timer the session asked for may have expired; nothing else happened.
    Tick,
    /// The attempt asked for with [`Action::Connect`] was welcomed.
    Connected(Welcome),
    /// That attempt failed; `loud` when the manager refused (it is always logged).
    ConnectFailed { why: String, loud: bool },
    /// The link that was up has closed.
    Disconnected { why: String },
    /// A message from the manager.
    Manager(ManagerMessage),
    /// A job wrote this.
    Output {
        key: JobKey,
        stream: Stream,
        bytes: Chunk,
    },
    /// A job's exit status is known and all its output was given as `Output` before.
    /// `cleanup_error` is only set when cleaning up came first (the job never ran).
    Exited {
        key: JobKey,
        outcome: Outcome,
        cleanup_error: Option<String>,
    },
    /// The job's folder is deleted and its leftover processes are gone; its supervisor
    /// is free. `error` if the folder could not be deleted.
    CleanedUp { key: JobKey, error: Option<String> },
    /// `Worker::drain`: take no new jobs, leave when the held ones are done, and kill
    /// what still runs at the deadline.
    Drain(Option<Instant>),
    /// `Worker::stop`: kill the jobs, say goodbye, leave.
    Stop,
    /// An interactive job's supervisor wrote every stdin byte before `upto` into the
    /// job's pipe or terminal.
    StdinTaken { key: JobKey, upto: u64 },
    /// An interactive job closed its stdin (a write failed with EPIPE or EIO) after
    /// taking `upto` bytes.
    StdinClosed { key: JobKey, upto: u64 },
}

/// What the session asks its drivers to do.
#[derive(Debug, PartialEq)]
pub(crate) enum Action {
    /// Connect now, saying `hello`, and give up at `deadline`; then report
    /// [`Input::Connected`] or [`Input::ConnectFailed`].
    Connect {
        hello: WorkerHello,
        deadline: Instant,
    },
    /// Run this job on a supervisor.
    Start { key: JobKey, spec: JobSpec },
    /// SIGTERM to the job's processes, SIGKILL after its grace.
    Cancel(JobKey),
    /// SIGKILL to the job's processes now (and never pause it again).
    Kill(JobKey),
    /// Stop (true) or go on (false) reading the job's output.
    Pause(JobKey, bool),
    /// The link's writer waits and there is something to send: wake it.
    WakeWriter,
    /// Write these bytes into an interactive job's stdin, after those given before.
    Stdin { key: JobKey, bytes: Vec<u8> },
    /// An interactive job's stdin ends after the bytes given: close it (a pipe), or
    /// say end-of-file through the terminal.
    StdinEnd(JobKey),
    /// A terminal job's terminal has a new size.
    Resize(JobKey, PtySize),
    /// The manager broke the protocol: close the link, for this reason.
    CloseLink(String),
    /// Everything is done: the worker ends.
    Exit,
}

/// One message for the writer to put on the link.
#[derive(Debug)]
pub(crate) enum Transmit {
    /// Job output, sent from the shared chunk.
    Output { job: JobId, chunk: Numbered },
    /// Any other message.
    Message(WorkerMessage),
}

/// What [`Session::transmit`] tells the writer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pull {
    /// Messages were added: send them, and ask again.
    Sent,
    /// Nothing to send: wait for [`Action::WakeWriter`] (or send a heartbeat).
    Idle,
    /// Close the link cleanly (the goodbye is out, or this link is no longer the
    /// session's).
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    /// No link; the next attempt is due at `at`.
    Waiting { at: Instant, failures: u32 },
    /// An attempt is under way.
    Connecting { failures: u32 },
    /// Connected; `id` tells this link's writer from an older one's.
    Up { id: u64 },
    /// No link, and none will be made: the worker is leaving.
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Goodbye {
    None,
    Pending,
    Sent,
}

/// One run of a job on this worker: running, or ended and not yet acknowledged, or
/// being killed, or waiting for its cleanup.
#[derive(Debug, Default)]
struct Run {
    log: OutputLog,
    /// How it ended, once it has; kept until the manager acknowledges it (`Ended`).
    finished: Option<(Outcome, Option<String>)>,
    /// Its `Finished` was handed to the current link.
    finished_sent: bool,
    /// A cleanup failure not yet reported.
    cleanup_failure: Option<String>,
    /// The manager has its `Finished`.
    acked: bool,
    /// Killed (if it ran) and forgotten: no manager waits for it.
    dropped: bool,
    /// Its supervisor is done with it.
    cleaned: bool,
    /// Paused by the session: too much output waits for a link.
    held_back: bool,
    /// Paused by the manager: its submitter is behind. Its output is not sent either.
    paused_by_manager: bool,
    /// What its supervisor was last told.
    paused: bool,
    /// In the writer's round.
    queued: bool,
    /// An interactive run's stdin counts.
    stdin: Option<StdinFlow>,
    /// A terminal run.
    pty: bool,
}

impl Run {
    /// The manager may still want it: not dropped, not acknowledged.
    fn held(&self) -> bool {
        !self.dropped && !self.acked
    }

    /// Takes a slot: runs, and someone waits for it.
    fn busy(&self) -> bool {
        !self.dropped && self.finished.is_none()
    }

    /// Something of it can be sent now.
    fn sendable(&self) -> bool {
        if self.dropped {
            return false;
        }
        if self.log.has_unsent() {
            return !self.paused_by_manager;
        }
        self.cleanup_failure.is_some() || (self.finished.is_some() && !self.finished_sent)
    }

    /// Nothing more will happen to it here.
    fn done(&self) -> bool {
        self.cleaned && (self.dropped || (self.acked && self.cleanup_failure.is_none()))
    }
}

/// A run sent ahead of the worker's slots, held until one frees.
#[derive(Debug)]
struct Waiting {
    /// The manager that sent it.
    manager: u64,
    job: JobId,
    spec: JobSpec,
    /// The manager asked to pause its output (its submitter is behind).
    paused: bool,
    /// An interactive run's stdin counts, and the bytes that came before it started
    /// (at most the window).
    stdin: Option<StdinFlow>,
    stdin_held: Vec<u8>,
}

/// The worker's session state (see the module documentation).
pub(crate) struct Session {
    cfg: Settings,
    runs: BTreeMap<JobKey, Run>,
    /// Runs sent ahead, in the order they came, to start as slots free (at most
    /// `cfg.ahead`).
    waiting: VecDeque<Waiting>,
    /// The manager whose jobs this worker holds (from the last welcome).
    manager: Option<u64>,
    /// Numbers the runs of jobs (see `JobKey::run`).
    next_run: u64,
    /// That manager's reconnect grace, less its heartbeat timeout: after it, held jobs
    /// are given up.
    grace: Duration,
    link: Link,
    next_link_id: u64,
    disconnected_since: Option<Instant>,
    draining: Option<Option<Instant>>,
    drain_killed: bool,
    /// Leaving (stopped, or drained): exit at the latest then.
    leaving: Option<Instant>,
    goodbye: Goodbye,
    exited: bool,
    /// Messages other than job output and `Finished`, in order.
    control: VecDeque<WorkerMessage>,
    /// Runs with something to send, in turn.
    ready: VecDeque<JobKey>,
    writer_waiting: bool,
    /// The link that is up is being closed for a protocol error: what else it brings is
    /// not acted on.
    link_failed: bool,
    actions: Vec<Action>,
    rng: u64,
}

impl Session {
    /// A session that makes its first connection attempt at `now`; `seed` drives the
    /// backoff's jitter.
    pub(crate) fn new(cfg: Settings, now: Instant, seed: u64) -> Session {
        Session {
            cfg,
            runs: BTreeMap::new(),
            waiting: VecDeque::new(),
            manager: None,
            next_run: 0,
            grace: Duration::ZERO,
            link: Link::Waiting {
                at: now,
                failures: 0,
            },
            next_link_id: 1,
            disconnected_since: None,
            draining: None,
            drain_killed: false,
            leaving: None,
            goodbye: Goodbye::None,
            exited: false,
            control: VecDeque::new(),
            ready: VecDeque::new(),
            writer_waiting: false,
            link_failed: false,
            actions: Vec::new(),
            rng: seed | 1,
        }
    }

    /// The actions decided so far, oldest first.
    pub(crate) fn take_actions(&mut self) -> std::vec::Drain<'_, Action> {
        self.actions.drain(..)
    }

    /// The link that is up, if one is.
    pub(crate) fn link_id(&self) -> Option<u64> {
        match self.link {
            Link::Up { id } => Some(id),
            _ => None,
        }
    }

    /// Whether [`Action::Exit`] was given.
    pub(crate) fn has_exited(&self) -> bool {
        self.exited
    }

    /// When the session wants an [`Input::Tick`] (at the latest).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        if self.exited {
            return None;
        }
        let attempt = match self.link {
            Link::Waiting { at, .. } if self.leaving.is_none() => Some(at),
            _ => None,
        };
        let give_up = self
            .disconnected_since
            .filter(|_| !self.waiting.is_empty() || self.runs.values().any(|r| !r.dropped))
            .map(|since| since + self.grace);
        let drain = self.draining.flatten().filter(|_| !self.drain_killed);
        [attempt, give_up, drain, self.leaving]
            .into_iter()
            .flatten()
            .min()
    }

    /// Acts on one input.
    pub(crate) fn handle(&mut self, now: Instant, input: Input) {
        match input {
            Input::Tick => {}
            Input::Connected(welcome) => self.on_connected(welcome),
            Input::ConnectFailed { why, loud } => self.on_connect_failed(now, why, loud),
            Input::Disconnected { why } => self.on_disconnected(now, why),
            Input::Manager(msg) => self.on_manager(msg),
            Input::Output { key, stream, bytes } => self.on_output(key, stream, bytes),
            Input::Exited {
                key,
                outcome,
                cleanup_error,
            } => self.on_exited(key, outcome, cleanup_error),
            Input::CleanedUp { key, error } => self.on_cleaned_up(key, error),
            Input::Drain(deadline) => self.on_drain(deadline),
            Input::Stop => self.leave(now),
            Input::StdinTaken { key, upto } => self.on_stdin_taken(key, upto),
            Input::StdinClosed { key, upto } => self.on_stdin_closed(key, upto),
        }
        self.check(now);
        self.start_waiting();
    }

    /// Moves what is to be sent on link `link` into `out`, up to about `budget` bytes
    /// (at least one message if there is any). Other messages go first, then the runs'
    /// output and endings in turn, one message per run per round.
    pub(crate) fn transmit(&mut self, link: u64, budget: usize, out: &mut Vec<Transmit>) -> Pull {
        if self.link != (Link::Up { id: link }) {
            return Pull::Close;
        }
        let start = out.len();
        let mut used = 0;
        while let Some(msg) = self.control.pop_front() {
            if out.len() > start && used + SMALL_MESSAGE > budget {
                self.control.push_front(msg);
                return Pull::Sent;
            }
            used += SMALL_MESSAGE;
            out.push(Transmit::Message(msg));
        }
        let keep = self.cfg.reconnect_buffer;
        while let Some(key) = self.ready.pop_front() {
            let Some(run) = self.runs.get_mut(&key) else {
                continue;
            };
            run.queued = false;
            if !run.sendable() {
                continue;
            }
            if run.log.has_unsent() {
                let next = run.log.unsent_bytes().min(crate::protocol::OUTPUT_CHUNK);
                if out.len() > start && used + next > budget {
                    run.queued = true;
                    self.ready.push_front(key);
                    break;
                }
                let chunk = run.log.take_next(keep).expect("unsent output");
                used += chunk.bytes.len() + 16;
                out.push(Transmit::Output {
                    job: key.job,
                    chunk,
                });
                if run.held_back && run.log.unsent_bytes() <= keep / 2 {
                    run.held_back = false;
                    sync_pause(&mut self.actions, key, run);
                }
            } else if let Some(error) = run.cleanup_failure.take() {
                used += SMALL_MESSAGE;
                out.push(Transmit::Message(WorkerMessage::CleanupFailed {
                    job: key.job,
                    error,
                }));
            } else if let Some((outcome, cleanup_error)) = &run.finished {
                used += SMALL_MESSAGE;
                run.finished_sent = true;
                out.push(Transmit::Message(WorkerMessage::Finished {
                    job: key.job,
                    outcome: outcome.clone(),
                    cleanup_error: cleanup_error.clone(),
                }));
            }
            if run.sendable() {
                run.queued = true;
                self.ready.push_back(key);
            } else if run.done() {
                self.runs.remove(&key);
            }
            if used >= budget {
                break;
            }
        }
        if out.len() > start {
            return Pull::Sent;
        }
        match self.goodbye {
            Goodbye::Pending => {
                self.goodbye = Goodbye::Sent;
                out.push(Transmit::Message(WorkerMessage::Goodbye));
                Pull::Sent
            }
            Goodbye::Sent => Pull::Close,
            Goodbye::None => {
                self.writer_waiting = true;
                Pull::Idle
            }
        }
    }

    /// The hello for the next attempt: who this worker is, and the jobs it holds.
    fn hello(&self) -> WorkerHello {
        WorkerHello {
            name: self.cfg.name.clone(),
            tags: self.cfg.tags.clone(),
            platform: self.cfg.platform.clone(),
            slots: self.cfg.slots,
            ahead: self.cfg.ahead,
            draining: self.draining.is_some(),
            manager_id: self.manager,
            jobs: self
                .runs
                .iter()
                .filter(|(k, r)| r.held() && Some(k.manager) == self.manager)
                .map(|(k, r)| HeldJob {
                    job: k.job,
                    finished: r.finished.is_some(),
                    ahead: false,
                    stdin_taken: r.stdin.as_ref().map_or(0, StdinFlow::taken_so_far),
                })
                .chain(
                    self.waiting
                        .iter()
                        .filter(|w| Some(w.manager) == self.manager)
                        .map(|w| HeldJob {
                            job: w.job,
                            finished: false,
                            ahead: true,
                            stdin_taken: 0,
                        }),
                )
                .collect(),
        }
    }

    /// The wait after the `failures`-th failed attempt in a row (see `random::backoff`).
    fn backoff(&mut self, failures: u32) -> Duration {
        let c = &self.cfg;
        crate::random::backoff(c.backoff_initial, c.backoff_max, failures, &mut self.rng)
    }

    /// Timers and the conditions that follow from any input.
    fn check(&mut self, now: Instant) {
        if let Some(since) = self.disconnected_since
            && now >= since + self.grace
        {
            self.give_up_held_jobs();
        }
        if let Some(Some(deadline)) = self.draining
            && now >= deadline
            && !self.drain_killed
        {
            self.drain_killed = true;
            for (key, run) in &self.runs {
                if run.busy() {
                    log::info!("job {}: the drain deadline has passed; killing it", key.job);
                    self.actions.push(Action::Kill(*key));
                }
            }
        }
        if self.draining.is_some()
            && self.leaving.is_none()
            && self.waiting.is_empty()
            && !self.runs.values().any(Run::held)
        {
            log::info!("worker {}: drained", self.cfg.name);
            self.leave(now);
        }
        if let Some(deadline) = self.leaving
            && !self.exited
        {
            let settled = self.link == Link::Closed && self.runs.is_empty();
            if settled || now >= deadline {
                if !settled {
                    log::warn!(
                        "worker {}: {} job(s) did not end in time",
                        self.cfg.name,
                        self.runs.values().filter(|r| !r.cleaned).count()
                    );
                }
                self.exited = true;
                self.actions.push(Action::Exit);
                log::info!("worker {} stopped", self.cfg.name);
            }
        }
        if let Link::Waiting { at, failures } = self.link
            && now >= at
        {
            // Never still be connecting when the manager gives up on the jobs held here.
            let mut deadline = now + self.cfg.connect_timeout;
            if let Some(since) = self.disconnected_since
                && (!self.waiting.is_empty() || self.runs.values().any(Run::held))
            {
                deadline = deadline.min((since + self.grace).max(now + MIN_CONNECT_WINDOW));
            }
            self.link = Link::Connecting { failures };
            let hello = self.hello();
            self.actions.push(Action::Connect { hello, deadline });
        }
    }

    /// Held jobs of a manager that has surely given up on them (its grace has passed)
    /// are killed rather than left running for nobody.
    fn give_up_held_jobs(&mut self) {
        if !self.waiting.is_empty() || self.runs.values().any(|r| !r.dropped) {
            // Its hellos name that manager no more: a hello that names a manager holds
            // every run of its that it was sent and not told ended, so that a run it
            // does not list never reached it (and is queued again, not taken for one
            // that may have run).
            self.manager = None;
        }
        self.waiting.clear();
        let mut n = 0;
        for (key, run) in self.runs.iter_mut().filter(|(_, r)| !r.dropped) {
            drop_run(&mut self.actions, *key, run);
            n += 1;
        }
        if n > 0 {
            log::warn!(
                "worker {}: killed {n} job(s): no manager for longer than its reconnect grace ({:.1} s)",
                self.cfg.name,
                self.grace.as_secs_f64()
            );
        }
        self.prune();
    }

    fn prune(&mut self) {
        self.runs.retain(|_, r| !r.done());
    }

    /// Stop, or the end of a drain: the jobs still running are killed, the manager is
    /// told goodbye (after the endings that are ready to go), and the session exits
    /// once the link is closed and the jobs are cleaned up, or at `STOP_WAIT`.
    fn leave(&mut self, now: Instant) {
        if self.leaving.is_some() {
            return;
        }
        self.leaving = Some(now + STOP_WAIT);
        // Runs sent ahead go back to the manager when the link closes after the goodbye.
        self.waiting.clear();
        let up = self.link_id().is_some();
        for (key, run) in self.runs.iter_mut().filter(|(_, r)| !r.dropped) {
            // An ending ready to go is sent before the goodbye; the rest ends now.
            if run.busy() || run.paused_by_manager || !up {
                if run.busy() {
                    log::info!("worker {} leaving: killed job {}", self.cfg.name, key.job);
                }
                drop_run(&mut self.actions, *key, run);
            }
        }
        self.prune();
        match self.link {
            Link::Waiting { .. } => self.link = Link::Closed,
            Link::Up { .. } => {
                self.goodbye = Goodbye::Pending;
                self.wake();
            }
            Link::Connecting { .. } | Link::Closed => {}
        }
    }

    fn wake(&mut self) {
        if self.writer_waiting && self.link_id().is_some() {
            self.writer_waiting = false;
            self.actions.push(Action::WakeWriter);
        }
    }

    fn send(&mut self, msg: WorkerMessage) {
        if self.link_id().is_some() {
            self.control.push_back(msg);
            self.wake();
        }
    }

    /// Puts a run in the writer's round if it has something to send on a link.
    fn queue(&mut self, key: JobKey) {
        let up = self.link_id().is_some();
        let Some(run) = self.runs.get_mut(&key) else {
            return;
        };
        if up && !run.queued && run.sendable() {
            run.queued = true;
            self.ready.push_back(key);
            self.wake();
        }
    }

    /// The live run of a job of the current manager: not dropped, not acknowledged.
    fn live(&self, job: JobId) -> Option<JobKey> {
        let manager = self.manager.unwrap_or_default();
        self.runs
            .iter()
            .find(|(k, r)| k.manager == manager && k.job == job && r.held())
            .map(|(k, _)| *k)
    }

    fn on_connected(&mut self, welcome: Welcome) {
        if !matches!(self.link, Link::Connecting { .. }) {
            log::error!("worker {}: a welcome nobody asked for", self.cfg.name);
        }
        let id = self.next_link_id;
        self.next_link_id += 1;
        self.link = Link::Up { id };
        self.writer_waiting = false;
        self.link_failed = false;
        self.goodbye = Goodbye::None;
        log::info!(
            "worker {} connected to the manager at {}",
            self.cfg.name,
            self.cfg.address
        );
        let same_manager = self.manager == Some(welcome.manager_id);
        self.manager = Some(welcome.manager_id);
        // The manager's grace clock may have started up to a heartbeat timeout before
        // this worker noticed the loss: give up that much earlier, and one heartbeat
        // interval more (the time to notice, and to kill, is not nothing), so that an
        // old run never goes on next to a retry of the same job.
        self.grace = Duration::from_millis(welcome.reconnect_grace_ms)
            .min(super::config::MAX_GRACE)
            .saturating_sub(Duration::from_millis(welcome.heartbeat_timeout_ms))
            .saturating_sub(Duration::from_millis(welcome.heartbeat_interval_ms));
        self.disconnected_since = None;
        let wanted: HashMap<JobId, u64> = welcome.resume.iter().copied().collect();
        let keep = self.cfg.reconnect_buffer;
        let mut resumed = Vec::new();
        for (key, run) in self.runs.iter_mut().filter(|(_, r)| !r.dropped) {
            let next = if same_manager && key.manager == welcome.manager_id && !run.acked {
                wanted.get(&key.job).copied()
            } else {
                None
            };
            let Some(next) = next else {
                if run.busy() {
                    log::warn!(
                        "killed job {}: its manager {} no longer waits for it",
                        key.job,
                        if same_manager {
                            "(after its reconnect grace)"
                        } else {
                            "(a new manager answered)"
                        }
                    );
                }
                drop_run(&mut self.actions, *key, run);
                continue;
            };
            run.log.rewind(next);
            run.finished_sent = false;
            // Pauses belonged to the old link; the manager pauses again if it must.
            run.paused_by_manager = false;
            run.held_back = run.finished.is_none() && run.log.unsent_bytes() > keep;
            sync_pause(&mut self.actions, *key, run);
            resumed.push(*key);
        }
        self.prune();
        // Runs sent ahead that had not started: the manager takes them back unless it
        // says otherwise.
        let manager = welcome.manager_id;
        self.waiting
            .retain(|w| same_manager && w.manager == manager && wanted.contains_key(&w.job));
        if !resumed.is_empty() {
            log::info!(
                "worker {}: going on with {} job(s) after reconnecting",
                self.cfg.name,
                resumed.len()
            );
        }
        for key in resumed {
            // The new link hears where the stdin of each interactive run stands (the
            // hello said what was taken when it was made).
            if let Some(flow) = self.runs.get_mut(&key).and_then(|r| r.stdin.as_mut()) {
                let job = key.job;
                if let Some(upto) = flow.closed() {
                    self.send(WorkerMessage::StdinClosed { job, upto });
                } else if let Some(upto) = flow.resync() {
                    self.send(WorkerMessage::StdinTaken { job, upto });
                }
            }
            self.queue(key);
        }
        if self.leaving.is_some() {
            // Stopped while connecting: say goodbye at once.
            for (key, run) in self.runs.iter_mut().filter(|(_, r)| !r.dropped) {
                drop_run(&mut self.actions, *key, run);
            }
            self.prune();
            self.ready.clear();
            self.goodbye = Goodbye::Pending;
        } else if self.draining.is_some() {
            self.send(WorkerMessage::Draining);
        }
    }

    fn on_connect_failed(&mut self, now: Instant, why: String, loud: bool) {
        let Link::Connecting { failures } = self.link else {
            log::error!("worker {}: a failed attempt nobody made", self.cfg.name);
            return;
        };
        let failures = failures.saturating_add(1);
        let msg = format!(
            "worker {}: cannot join the manager at {}: {why}",
            self.cfg.name, self.cfg.address
        );
        if failures == 1 || failures.is_multiple_of(10) || loud {
            log::warn!("{msg} (attempt {failures})");
        } else {
            log::debug!("{msg} (attempt {failures})");
        }
        self.link = if self.leaving.is_some() {
            Link::Closed
        } else {
            Link::Waiting {
                at: now + self.backoff(failures),
                failures,
            }
        };
    }

    fn on_disconnected(&mut self, now: Instant, why: String) {
        if self.link_id().is_none() {
            log::error!("worker {}: a link closed that was not up", self.cfg.name);
            return;
        }
        self.control.clear();
        self.ready.clear();
        self.writer_waiting = false;
        for run in self.runs.values_mut() {
            run.queued = false;
            run.finished_sent = false;
            if run.acked {
                // A cleanup failure the manager will not hear of: it was logged here.
                run.cleanup_failure = None;
            }
        }
        if self.leaving.is_some() {
            self.link = Link::Closed;
            self.waiting.clear();
            for (key, run) in self.runs.iter_mut().filter(|(_, r)| !r.dropped) {
                drop_run(&mut self.actions, *key, run);
            }
            self.prune();
            return;
        }
        self.prune();
        self.link = Link::Waiting {
            at: now + self.backoff(0),
            failures: 0,
        };
        self.disconnected_since = Some(now);
        let held = self.runs.values().filter(|r| r.held()).count();
        log::warn!(
            "worker {}: lost the manager at {}: {why}{}",
            self.cfg.name,
            self.cfg.address,
            if held > 0 {
                format!("; {held} job(s) go on while it reconnects")
            } else {
                String::new()
            }
        );
    }

    fn on_manager(&mut self, msg: ManagerMessage) {
        match msg {
            _ if self.link_failed => {}
            ManagerMessage::StdinData { job, offset, bytes } => {
                self.on_stdin_data(job, offset, bytes)
            }
            ManagerMessage::StdinEof { job, offset } => self.on_stdin_eof(job, offset),
            ManagerMessage::Resize { job, size } => self.on_resize(job, size),
            ManagerMessage::Run { job, spec, ahead } => self.on_run(job, spec, ahead),
            ManagerMessage::Cancel { job } => {
                if let Some(key) = self.live(job) {
                    log::info!("cancelling job {job}");
                    self.actions.push(Action::Cancel(key));
                } else if self.take_waiting(job).is_some() {
                    // Held, never started: it ends here and now.
                    log::info!("cancelling job {job} before it started");
                    self.send(WorkerMessage::Finished {
                        job,
                        outcome: Outcome::Cancelled,
                        cleanup_error: None,
                    });
                }
            }
            ManagerMessage::Revoke { job } => {
                // One that has started is not given back: its `Started` is on the way.
                if self.take_waiting(job).is_some() {
                    log::debug!("giving back job {job}, held ahead of the slots");
                    self.send(WorkerMessage::Declined {
                        job,
                        reason: "revoked".into(),
                    });
                }
            }
            ManagerMessage::Pause { job } => {
                if let Some(w) = self.waiting_mut(job) {
                    w.paused = true;
                } else if let Some(key) = self.live(job) {
                    log::debug!("pausing the output of job {job}: its submitter is behind");
                    let run = self.runs.get_mut(&key).expect("live");
                    run.paused_by_manager = true;
                    sync_pause(&mut self.actions, key, run);
                }
            }
            ManagerMessage::Resume { job } => {
                if let Some(w) = self.waiting_mut(job) {
                    w.paused = false;
                } else if let Some(key) = self.live(job) {
                    let run = self.runs.get_mut(&key).expect("live");
                    run.paused_by_manager = false;
                    sync_pause(&mut self.actions, key, run);
                    self.queue(key);
                }
            }
            ManagerMessage::Ended { job } => {
                if let Some(key) = self.live(job)
                    && let Some(run) = self.runs.get_mut(&key)
                    && run.finished.is_some()
                {
                    run.acked = true;
                    if run.done() {
                        self.runs.remove(&key);
                    }
                }
            }
            ManagerMessage::Shutdown => {
                log::info!("the manager at {} is shutting down", self.cfg.address)
            }
            // The link's own business (the driver adopts it): the grace less the
            // timeout, all the session uses, does not change with it.
            ManagerMessage::Heartbeat | ManagerMessage::Timing { .. } => {}
        }
    }

    /// The manager broke the protocol: the link is closed (the worker dials again, and
    /// its jobs go on meanwhile), and nothing more it brings is acted on.
    fn protocol_error(&mut self, why: String) {
        if self.link_failed || self.link_id().is_none() {
            return;
        }
        log::warn!(
            "worker {}: the manager at {} broke the protocol: {why}; closing the link",
            self.cfg.name,
            self.cfg.address
        );
        self.link_failed = true;
        self.actions.push(Action::CloseLink(format!(
            "the manager broke the protocol: {why}"
        )));
    }

    fn on_stdin_data(&mut self, job: JobId, offset: u64, bytes: Vec<u8>) {
        if let Some(w) = self.waiting_mut(job) {
            let Some(flow) = w.stdin.as_mut() else {
                let why = format!("stdin bytes for job {job}, which is not interactive");
                return self.protocol_error(why);
            };
            match flow.accept(offset, &bytes) {
                Ok(new) => w.stdin_held.extend_from_slice(new),
                Err(why) => self.protocol_error(format!("job {job}: {why}")),
            }
            return;
        }
        let Some(key) = self.live(job) else {
            return; // ended and forgotten, or never here: nothing to take it
        };
        let run = self.runs.get_mut(&key).expect("live");
        let Some(flow) = run.stdin.as_mut() else {
            let why = format!("stdin bytes for job {job}, which is not interactive");
            return self.protocol_error(why);
        };
        if run.finished.is_some() {
            return; // its stdin was closed when it ended
        }
        match flow.accept(offset, &bytes) {
            Ok(new) => {
                if !new.is_empty() {
                    let bytes = if new.len() == bytes.len() {
                        bytes
                    } else {
                        new.to_vec()
                    };
                    self.actions.push(Action::Stdin { key, bytes });
                }
                if flow.end_due() {
                    self.actions.push(Action::StdinEnd(key));
                }
            }
            Err(why) => self.protocol_error(format!("job {job}: {why}")),
        }
    }

    fn on_stdin_eof(&mut self, job: JobId, offset: u64) {
        let (flow, key) = if let Some(w) = self.waiting_mut(job) {
            (w.stdin.as_mut(), None)
        } else if let Some(key) = self.live(job) {
            let run = self.runs.get_mut(&key).expect("live");
            if run.finished.is_some() {
                return;
            }
            (run.stdin.as_mut(), Some(key))
        } else {
            return;
        };
        let Some(flow) = flow else {
            let why = format!("the end of stdin for job {job}, which is not interactive");
            return self.protocol_error(why);
        };
        match flow.end(offset) {
            // (A run not started yet is given its end when it starts.)
            Ok(()) => {
                if let Some(key) = key
                    && flow.end_due()
                {
                    self.actions.push(Action::StdinEnd(key));
                }
            }
            Err(why) => self.protocol_error(format!("job {job}: {why}")),
        }
    }

    fn on_resize(&mut self, job: JobId, size: PtySize) {
        if size.rows == 0 || size.cols == 0 {
            let why = format!("job {job}: a terminal size of {}x{}", size.rows, size.cols);
            return self.protocol_error(why);
        }
        if let Some(w) = self.waiting_mut(job) {
            if let Some(pty) = w.spec.pty.as_mut() {
                *pty = size; // it starts with the size it has by then
            }
        } else if let Some(key) = self.live(job)
            && self
                .runs
                .get(&key)
                .is_some_and(|r| r.pty && r.finished.is_none())
        {
            self.actions.push(Action::Resize(key, size));
        } else {
            log::debug!("job {job}: a resize for no running terminal job; ignored");
        }
    }

    fn on_stdin_taken(&mut self, key: JobKey, upto: u64) {
        let Some(run) = self.runs.get_mut(&key) else {
            return;
        };
        if run.dropped {
            return;
        }
        if let Some(upto) = run.stdin.as_mut().and_then(|f| f.taken(upto)) {
            self.send(WorkerMessage::StdinTaken { job: key.job, upto });
        }
    }

    fn on_stdin_closed(&mut self, key: JobKey, upto: u64) {
        let Some(run) = self.runs.get_mut(&key) else {
            return;
        };
        if run.dropped {
            return;
        }
        if let Some(upto) = run.stdin.as_mut().and_then(|f| f.close(upto)) {
            log::debug!("job {}: its stdin is closed after {upto} bytes", key.job);
            self.send(WorkerMessage::StdinClosed { job: key.job, upto });
        }
    }

    fn take_waiting(&mut self, job: JobId) -> Option<Waiting> {
        let manager = self.manager.unwrap_or_default();
        let i = self
            .waiting
            .iter()
            .position(|w| w.manager == manager && w.job == job)?;
        self.waiting.remove(i)
    }

    fn waiting_mut(&mut self, job: JobId) -> Option<&mut Waiting> {
        let manager = self.manager.unwrap_or_default();
        self.waiting
            .iter_mut()
            .find(|w| w.manager == manager && w.job == job)
    }

    /// Starts held runs while slots are free, oldest first, each with a `Started` for
    /// the manager. Called after every input: a slot frees when a job ends, and the
    /// next run starts before that job's `Finished` goes (the writer sends other
    /// messages, `Started` among them, before the runs' output and endings). Not while
    /// the link is down (the manager takes held runs back when the worker returns),
    /// draining or leaving.
    fn start_waiting(&mut self) {
        if self.waiting.is_empty()
            || self.link_id().is_none()
            || self.draining.is_some()
            || self.leaving.is_some()
        {
            return;
        }
        let mut running = self.runs.values().filter(|r| r.busy()).count();
        while running < self.cfg.slots as usize {
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            if Some(w.manager) != self.manager {
                continue;
            }
            let job = w.job;
            let key = self.start_run(w.job, w.spec, w.paused);
            if let Some(flow) = w.stdin {
                // What came while it waited is written first.
                let run = self.runs.get_mut(&key).expect("just started");
                if !w.stdin_held.is_empty() {
                    self.actions.push(Action::Stdin {
                        key,
                        bytes: w.stdin_held,
                    });
                }
                let mut flow = flow;
                if flow.end_due() {
                    self.actions.push(Action::StdinEnd(key));
                }
                run.stdin = Some(flow);
            }
            self.send(WorkerMessage::Started { job });
            running += 1;
        }
    }

    fn start_run(&mut self, job: JobId, spec: JobSpec, paused_by_manager: bool) -> JobKey {
        log::debug!("starting job {job}");
        self.next_run += 1;
        let key = JobKey {
            manager: self.manager.unwrap_or_default(),
            job,
            run: self.next_run,
        };
        let run = self.runs.entry(key).or_default();
        run.paused_by_manager = paused_by_manager;
        run.pty = spec.pty.is_some();
        if spec.interactive || spec.pty.is_some() {
            run.stdin = Some(StdinFlow::default());
        }
        self.actions.push(Action::Start { key, spec });
        sync_pause(&mut self.actions, key, run);
        key
    }

    fn on_run(&mut self, job: JobId, spec: JobSpec, ahead: bool) {
        if let Err(e) = spec.validate() {
            // A job no manager of this version sends; refused, not run.
            log::warn!("refusing job {job}: {e}");
            self.send(WorkerMessage::Finished {
                job,
                outcome: Outcome::Rejected(format!("the worker refused the job: {e}")),
                cleanup_error: None,
            });
            return;
        }
        let running = self.runs.values().filter(|r| r.busy()).count();
        let has_it = self.live(job).is_some() || self.waiting_mut(job).is_some();
        let full = running >= self.cfg.slots as usize;
        if ahead
            && full
            && !has_it
            && self.draining.is_none()
            && self.leaving.is_none()
            && self.waiting.len() < self.cfg.ahead as usize
        {
            log::debug!("holding job {job} until a slot frees");
            let interactive = spec.interactive || spec.pty.is_some();
            self.waiting.push_back(Waiting {
                manager: self.manager.unwrap_or_default(),
                job,
                spec,
                paused: false,
                stdin: interactive.then(StdinFlow::default),
                stdin_held: Vec::new(),
            });
            return;
        }
        let refusal = if self.draining.is_some() || self.leaving.is_some() {
            Some("the worker is draining")
        } else if full || has_it {
            log::error!("the manager sent job {job} beyond this worker's slots; declining it");
            Some("the worker has no free slot")
        } else {
            None
        };
        if let Some(why) = refusal {
            // Not an ending: the manager queues the job again.
            self.send(WorkerMessage::Declined {
                job,
                reason: why.into(),
            });
            return;
        }
        self.start_run(job, spec, false);
        if ahead {
            // Sent ahead, and a slot was free by the time it came.
            self.send(WorkerMessage::Started { job });
        }
    }

    fn on_output(&mut self, key: JobKey, stream: Stream, bytes: Chunk) {
        let Some(run) = self.runs.get_mut(&key) else {
            return;
        };
        if run.dropped || run.finished.is_some() {
            return;
        }
        run.log.push(stream, bytes);
        if !run.held_back && run.log.unsent_bytes() > self.cfg.reconnect_buffer {
            run.held_back = true;
            sync_pause(&mut self.actions, key, run);
        }
        self.queue(key);
    }

    fn on_exited(&mut self, key: JobKey, outcome: Outcome, cleanup_error: Option<String>) {
        let Some(run) = self.runs.get_mut(&key) else {
            return;
        };
        log::debug!("job {} ended: {outcome}", key.job);
        // Its stdin ends with it (sent before its `Finished`, which goes in the runs'
        // round after the other messages).
        let closed = run.stdin.as_mut().and_then(|f| f.close(0));
        run.finished = Some((outcome, cleanup_error));
        run.held_back = false;
        run.paused = false;
        if let Some(upto) = closed.filter(|_| !run.dropped) {
            self.send(WorkerMessage::StdinClosed { job: key.job, upto });
        }
        self.queue(key);
    }

    fn on_cleaned_up(&mut self, key: JobKey, error: Option<String>) {
        let Some(run) = self.runs.get_mut(&key) else {
            return;
        };
        run.cleaned = true;
        if !run.dropped {
            run.cleanup_failure = error;
        }
        if run.done() {
            self.runs.remove(&key);
        } else {
            self.queue(key);
        }
    }

    fn on_drain(&mut self, deadline: Option<Instant>) {
        if self.leaving.is_some() {
            return;
        }
        log::info!(
            "worker {} draining: no new jobs; leaving when the running ones end",
            self.cfg.name
        );
        self.draining = Some(deadline);
        self.drain_killed = false;
        self.send(WorkerMessage::Draining);
        // Runs sent ahead go back now (while the link is down, they go back when it is
        // up again: the manager takes them back then).
        if self.link_id().is_some() {
            for w in std::mem::take(&mut self.waiting) {
                self.send(WorkerMessage::Declined {
                    job: w.job,
                    reason: "the worker is draining".into(),
                });
            }
        }
    }
}

/// Tells the run's supervisor to pause or go on when what it should do has changed.
/// A run that has ended or is being killed is never paused.
fn sync_pause(actions: &mut Vec<Action>, key: JobKey, run: &mut Run) {
    let want = run.busy() && (run.held_back || run.paused_by_manager);
    if want != run.paused {
        run.paused = want;
        actions.push(Action::Pause(key, want));
    }
}

/// Forgets a run: killed if it still runs, nothing of it sent any more.
fn drop_run(actions: &mut Vec<Action>, key: JobKey, run: &mut Run) {
    if run.finished.is_none() {
        actions.push(Action::Kill(key));
    }
    run.dropped = true;
    run.paused = false;
    run.cleanup_failure = None;
}

#[cfg(test)]
mod tests;
