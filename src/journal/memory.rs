//! A journal in memory: what a journal holds after a sequence of records, with no
//! disk. The reference for what each record means (the SQLite journal must agree with
//! it: `sqlite::tests` replays the same records through both), and the journal of the
//! in-memory tests, which "restart" a manager by reading [`MemoryJournal::recovered`].

use super::{EndedJob, Journal, OpenJob, Place, Record, Recovered, Retention, Submitter};
use crate::error::{Error, Result};
use crate::job::{JobId, JobSpec, Outcome, Stream};
use crate::sync::lock;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::SystemTime;

/// Output chunks, in order.
type KeptOutput = Vec<(Stream, Vec<u8>)>;

/// One job as the journal holds it.
#[derive(Clone, Debug)]
struct Entry {
    spec: JobSpec,
    submitter: Submitter,
    attempt: u32,
    /// `None`: queued; `Some(name)`: sent to that worker.
    sent_to: Option<String>,
    /// Sent ahead and not started.
    ahead: bool,
    end: Option<(Outcome, SystemTime)>,
    /// A detached job's kept output at its end, and the bytes dropped before it.
    kept: Option<(KeptOutput, u64)>,
}

/// What a journal holds: the state records build up.
#[derive(Clone, Debug, Default)]
pub(crate) struct State {
    manager_id: Option<u64>,
    next_job: u64,
    jobs: BTreeMap<JobId, Entry>,
    workers: HashMap<String, Option<Vec<u8>>>,
}

impl State {
    /// Applies one record written at `now`.
    pub(crate) fn apply(&mut self, record: Record, now: SystemTime) {
        match record {
            Record::ManagerId(id) => {
                self.manager_id.get_or_insert(id);
            }
            Record::Accepted {
                id,
                spec,
                submitter,
            } => {
                self.next_job = self.next_job.max(id.0 + 1);
                self.jobs.insert(
                    id,
                    Entry {
                        spec,
                        submitter,
                        attempt: 1,
                        sent_to: None,
                        ahead: false,
                        end: None,
                        kept: None,
                    },
                );
            }
            Record::Worker { name, cert } => {
                self.workers.insert(name, cert);
            }
            Record::Sent {
                id,
                attempt,
                worker,
                ahead,
            } => {
                if let Some(e) = self.jobs.get_mut(&id).filter(|e| e.end.is_none()) {
                    e.attempt = attempt;
                    e.sent_to = Some(worker);
                    e.ahead = ahead;
                }
            }
            Record::Started { id } => {
                if let Some(e) = self.jobs.get_mut(&id).filter(|e| e.end.is_none()) {
                    e.ahead = false;
                }
            }
            Record::Queued { id, attempt } => {
                if let Some(e) = self.jobs.get_mut(&id).filter(|e| e.end.is_none()) {
                    e.attempt = attempt;
                    e.sent_to = None;
                    e.ahead = false;
                }
            }
            Record::Ended { id, outcome } => {
                if let Some(e) = self.jobs.get_mut(&id).filter(|e| e.end.is_none()) {
                    e.end = Some((outcome, now));
                }
            }
            Record::Kept {
                id,
                output,
                dropped,
            } => {
                if let Some(e) = self.jobs.get_mut(&id) {
                    e.kept = Some((output, dropped));
                }
            }
        }
    }

    /// Forgets ended jobs past the retention at `now`: past its time, and beyond its
    /// count, which each kind of ended job (a detached job's, kept for a later attach,
    /// or another's) is kept to on its own.
    pub(crate) fn compact(&mut self, now: SystemTime, retention: Retention) {
        for detached in [false, true] {
            let mut ended: Vec<(SystemTime, JobId)> = self
                .jobs
                .iter()
                .filter(|(_, e)| {
                    matches!(e.submitter, Submitter::Remote { detached: true, .. }) == detached
                })
                .filter_map(|(&id, e)| e.end.as_ref().map(|(_, at)| (*at, id)))
                .collect();
            ended.sort();
            let old = |at: SystemTime| {
                now.duration_since(at)
                    .is_ok_and(|age| age >= retention.keep_ended_for)
            };
            let young = ended.iter().filter(|(at, _)| !old(*at)).count();
            let mut over = young.saturating_sub(retention.keep_ended);
            for (at, id) in ended {
                if old(at) {
                    self.jobs.remove(&id);
                } else if over > 0 {
                    over -= 1;
                    self.jobs.remove(&id);
                }
            }
        }
    }

    /// What a manager opening this journal finds (`fresh_id`: the id a journal
    /// without one gets).
    pub(crate) fn recovered(&self, fresh_id: u64) -> Recovered {
        let mut open = Vec::new();
        let mut ended_detached = Vec::new();
        let mut remote_requests = Vec::new();
        for (&id, e) in &self.jobs {
            if let Submitter::Remote {
                session, request, ..
            } = e.submitter
            {
                remote_requests.push((session, request, id));
            }
            match &e.end {
                None => open.push(OpenJob {
                    id,
                    spec: e.spec.clone(),
                    submitter: e.submitter.clone(),
                    attempt: e.attempt,
                    place: match &e.sent_to {
                        None => Place::Queued,
                        Some(name) => Place::Sent {
                            worker: name.clone(),
                            cert: self.workers.get(name).cloned().flatten(),
                            ahead: e.ahead,
                        },
                    },
                }),
                Some((outcome, at)) => {
                    if matches!(e.submitter, Submitter::Remote { detached: true, .. }) {
                        let (output, dropped) = e.kept.clone().unwrap_or_default();
                        ended_detached.push(EndedJob {
                            id,
                            submitter: e.submitter.clone(),
                            outcome: outcome.clone(),
                            output,
                            dropped,
                            ended_at: *at,
                        });
                    }
                }
            }
        }
        ended_detached.sort_by_key(|e| (e.ended_at, e.id));
        Recovered {
            manager_id: self.manager_id.unwrap_or(fresh_id),
            next_job: self.next_job.max(1),
            open,
            ended_detached,
            remote_requests,
        }
    }

    /// How many jobs (open or ended) are held.
    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }
}

/// A [`Journal`] in memory, for tests: what it holds survives the manager that wrote
/// it, and its writes can be made to fail.
#[derive(Debug, Default)]
pub(crate) struct MemoryJournal {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    state: State,
    retention: Option<Retention>,
    /// Writes fail with this message (a full disk) while it is set.
    failing: Option<String>,
    closed: bool,
}

impl MemoryJournal {
    /// An empty journal that keeps ended jobs as `retention` says.
    pub(crate) fn new(retention: Retention) -> MemoryJournal {
        let j = MemoryJournal::default();
        lock(&j.inner).retention = Some(retention);
        j
    }

    /// What a manager opening it now would find.
    pub(crate) fn recovered(&self) -> Recovered {
        let fresh = crate::random::u64();
        let mut inner = lock(&self.inner);
        inner
            .state
            .apply(Record::ManagerId(fresh), SystemTime::now());
        inner.state.recovered(fresh)
    }

    /// Makes writes fail with `why` (`None`: work again).
    pub(crate) fn fail_writes(&self, why: Option<&str>) {
        lock(&self.inner).failing = why.map(str::to_owned);
    }

    /// Opens it again for a new manager.
    pub(crate) fn reopen(&self) {
        lock(&self.inner).closed = false;
    }

    fn add(&self, records: Vec<Record>) -> Result<()> {
        let mut inner = lock(&self.inner);
        if inner.closed {
            // As the SQLite journal: nothing is said to be kept that was not.
            return Err(Error::Journal("the journal is closed".into()));
        }
        if let Some(why) = &inner.failing {
            return Err(Error::Journal(why.clone()));
        }
        let now = SystemTime::now();
        for r in records {
            inner.state.apply(r, now);
        }
        if let Some(retention) = inner.retention {
            inner.state.compact(now, retention);
        }
        Ok(())
    }
}

impl Journal for MemoryJournal {
    fn write(&self, records: Vec<Record>) -> Result<()> {
        self.add(records)
    }

    fn record(&self, records: Vec<Record>) {
        self.record_then(records, None);
    }

    fn record_then(&self, records: Vec<Record>, then: Option<super::Then>) {
        let durable = match self.add(records) {
            Ok(()) => !lock(&self.inner).closed,
            Err(e) => {
                log::error!("the journal lost records: {e}");
                false
            }
        };
        if let Some(then) = then {
            then(durable);
        }
    }

    fn size_bytes(&self) -> u64 {
        0
    }

    fn close(&self) {
        lock(&self.inner).closed = true;
    }
}
