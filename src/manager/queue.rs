//! Jobs waiting for a worker, grouped by requirement class. Within a class jobs are
//! ordered by priority (higher first), then by submission order. A worker with a free
//! slot takes the first job among the classes it satisfies, so the cost of a pick
//! grows with the number of distinct classes, not with the number of queued jobs.
//! Owned by the dispatcher thread; no locking.

use super::ids::IdMap;
use super::sink::JobSink;
use crate::job::{JobId, JobSpec, Requirements};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

/// A job waiting in the queue.
pub(crate) struct QueuedJob {
    pub id: JobId,
    pub spec: JobSpec,
    pub events: Arc<JobSink>,
    /// 1 for the first run; one more per retry.
    pub attempt: u32,
    pub since: Instant,
}

/// Where a job sits in its class: (higher priority first, then older first).
type Key = (Reverse<i32>, u64);

#[derive(Default)]
pub(crate) struct Queue {
    classes: HashMap<Requirements, BTreeMap<Key, QueuedJob>>,
    /// Where each queued job is, for cancellation.
    index: IdMap<JobId, (Requirements, Key)>,
    next_seq: u64,
}

impl Queue {
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    pub(crate) fn push(&mut self, job: QueuedJob) {
        let place = self.new_place();
        self.restore(place, job);
    }

    /// A place after every job queued so far (for a job that goes out at once but may
    /// come back: see [`Queue::restore`]).
    pub(crate) fn new_place(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq - 1
    }

    /// Puts a job back at the place it had among the jobs of its priority (a run sent
    /// ahead and taken back before it started).
    pub(crate) fn restore(&mut self, place: u64, job: QueuedJob) {
        let key = (Reverse(job.spec.priority), place);
        let class = job.spec.requirements.clone();
        self.index.insert(job.id, (class.clone(), key));
        self.classes.entry(class).or_default().insert(key, job);
    }

    /// Takes the first job a worker with these tags and platform may run.
    pub(crate) fn pop_for(&mut self, tags: &BTreeSet<String>, platform: &str) -> Option<QueuedJob> {
        self.pop_placed(tags, platform).map(|(_, job)| job)
    }

    /// Like [`Queue::pop_for`], with the job's place (to put it back there).
    pub(crate) fn pop_placed(
        &mut self,
        tags: &BTreeSet<String>,
        platform: &str,
    ) -> Option<(u64, QueuedJob)> {
        let (class, key) = self
            .classes
            .iter()
            .filter(|(class, _)| class.matches(tags, platform))
            .filter_map(|(class, jobs)| jobs.first_key_value().map(|(k, _)| (class, *k)))
            .min_by_key(|(_, k)| *k)?;
        let class = class.clone();
        self.take(&class, key).map(|job| (key.1, job))
    }

    /// Takes a job out by id (for cancellation).
    pub(crate) fn remove(&mut self, id: JobId) -> Option<QueuedJob> {
        let (class, key) = self.index.get(&id)?.clone();
        self.take(&class, key)
    }

    fn take(&mut self, class: &Requirements, key: Key) -> Option<QueuedJob> {
        let jobs = self.classes.get_mut(class)?;
        let job = jobs.remove(&key)?;
        if jobs.is_empty() {
            self.classes.remove(class);
        }
        self.index.remove(&job.id);
        Some(job)
    }

    /// When the longest-waiting job was queued.
    pub(crate) fn oldest(&self) -> Option<Instant> {
        self.iter().map(|j| j.since).min()
    }

    /// Every queued job, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &QueuedJob> {
        self.classes.values().flat_map(|jobs| jobs.values())
    }

    /// One queued job.
    pub(crate) fn get(&self, id: JobId) -> Option<&QueuedJob> {
        let (class, key) = self.index.get(&id)?;
        self.classes.get(class)?.get(key)
    }

    /// Empties the queue, in no particular order.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = QueuedJob> + '_ {
        self.index.clear();
        self.classes
            .drain()
            .flat_map(|(_, jobs)| jobs.into_values())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: u64, spec: JobSpec) -> QueuedJob {
        QueuedJob {
            id: JobId(id),
            spec,
            events: JobSink::new(JobId(id), crossbeam_channel::unbounded().0, Arc::default()),
            attempt: 1,
            since: Instant::now(),
        }
    }

    fn tags(t: &[&str]) -> BTreeSet<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_worker_takes_the_oldest_job_it_can_run() {
        let mut q = Queue::default();
        q.push(job(1, JobSpec::new("a").require_tag("gpu")));
        q.push(job(2, JobSpec::new("b")));
        q.push(job(3, JobSpec::new("c").require_tag("gpu")));
        assert_eq!(q.pop_for(&tags(&[]), "p").unwrap().id, JobId(2));
        assert!(q.pop_for(&tags(&[]), "p").is_none());
        assert_eq!(q.pop_for(&tags(&["gpu"]), "p").unwrap().id, JobId(1));
        assert_eq!(q.pop_for(&tags(&["gpu"]), "p").unwrap().id, JobId(3));
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn priority_comes_before_age_and_age_breaks_ties() {
        let mut q = Queue::default();
        q.push(job(1, JobSpec::new("a")));
        q.push(job(2, JobSpec::new("b").priority(5)));
        q.push(job(3, JobSpec::new("c").priority(5).require_tag("x")));
        q.push(job(4, JobSpec::new("d").priority(-1)));
        let order: Vec<u64> =
            std::iter::from_fn(|| q.pop_for(&tags(&["x"]), "p").map(|j| j.id.0)).collect();
        assert_eq!(order, vec![2, 3, 1, 4]);
    }

    #[test]
    fn a_job_put_back_takes_its_old_place() {
        let mut q = Queue::default();
        for i in 1..=3 {
            q.push(job(i, JobSpec::new("x")));
        }
        let (place, first) = q.pop_placed(&tags(&[]), "p").unwrap();
        assert_eq!(first.id, JobId(1));
        q.push(job(4, JobSpec::new("x")));
        q.restore(place, first);
        let order: Vec<u64> =
            std::iter::from_fn(|| q.pop_for(&tags(&[]), "p").map(|j| j.id.0)).collect();
        assert_eq!(order, vec![1, 2, 3, 4]);
    }

    #[test]
    fn removing_by_id_leaves_the_rest_in_order() {
        let mut q = Queue::default();
        for i in 1..=4 {
            q.push(job(i, JobSpec::new("x")));
        }
        assert_eq!(q.remove(JobId(2)).unwrap().id, JobId(2));
        assert!(q.remove(JobId(2)).is_none());
        let order: Vec<u64> =
            std::iter::from_fn(|| q.pop_for(&tags(&[]), "p").map(|j| j.id.0)).collect();
        assert_eq!(order, vec![1, 3, 4]);
    }
}
