//! A worker's job supervisor threads. Each runs one job at a time (`executor::run`) and
//! then waits for the next, so that starting a job is a channel send to a waiting
//! thread rather than a thread spawn. Threads are made when none waits, and at most as
//! many wait as the worker has slots, or twice that with a look-ahead (a run still
//! being cleaned up or killed can need one more for a while; with a look-ahead the next
//! run starts at once, so that is the usual case; a thread beyond those ends when its
//! job does). Nothing here knows about jobs.

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Work for a supervisor thread.
pub(crate) type Task = Box<dyn FnOnce() + Send>;

use crate::sync::lock;

pub(crate) struct Pool {
    /// `None` once closed.
    tasks: Mutex<Option<Sender<Task>>>,
    waiting_for_tasks: Receiver<Task>,
    /// Threads waiting for a task and not yet promised one.
    idle: Arc<AtomicUsize>,
    max_idle: usize,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Each thread holds a clone until it ends; disconnected when all have.
    alive: Mutex<Option<Sender<()>>>,
    all_ended: Receiver<()>,
}

impl Pool {
    /// A pool keeping at most `max_idle` threads waiting.
    pub(crate) fn new(max_idle: usize) -> Pool {
        let (tx, rx) = unbounded();
        let (alive, all_ended) = crossbeam_channel::bounded(0);
        Pool {
            tasks: Mutex::new(Some(tx)),
            waiting_for_tasks: rx,
            idle: Arc::new(AtomicUsize::new(0)),
            max_idle,
            threads: Mutex::new(Vec::new()),
            alive: Mutex::new(Some(alive)),
            all_ended,
        }
    }

    /// Runs `task` on a waiting thread, or on a new one. Fails only when no thread can
    /// be started, or the pool is closed.
    pub(crate) fn run(&self, task: Task) -> io::Result<()> {
        let tasks = lock(&self.tasks).clone();
        let Some(tasks) = tasks else {
            return Err(io::Error::other("the worker is stopping"));
        };
        // A thread counted idle is blocked in `recv` (or about to be) and stays there
        // until it gets a task or the pool closes: promising it this one is safe.
        if self
            .idle
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return tasks
                .send(task)
                .map_err(|_| io::Error::other("the worker is stopping"));
        }
        let Some(alive) = lock(&self.alive).clone() else {
            return Err(io::Error::other("the worker is stopping"));
        };
        let (rx, idle, max_idle) = (
            self.waiting_for_tasks.clone(),
            self.idle.clone(),
            self.max_idle,
        );
        let thread = crate::thread::for_job("wp-supervisor", move || {
            let _alive = alive;
            task();
            loop {
                // Wait for more only if there are not enough waiting already.
                if idle
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                        (n < max_idle).then_some(n + 1)
                    })
                    .is_err()
                {
                    return;
                }
                match rx.recv() {
                    Ok(task) => task(),
                    Err(_) => return,
                }
            }
        })?;
        let mut threads = lock(&self.threads);
        threads.retain(|t| !t.is_finished());
        threads.push(thread);
        Ok(())
    }

    /// Takes no more tasks, lets the waiting threads go, and waits until `deadline` for
    /// the busy ones to end; returns whether all have (the others are left detached).
    pub(crate) fn close(&self, deadline: Instant) -> bool {
        lock(&self.tasks).take();
        lock(&self.alive).take();
        let ended = matches!(
            self.all_ended.recv_deadline(deadline),
            Err(RecvTimeoutError::Disconnected)
        );
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            if ended || t.is_finished() {
                let _ = t.join();
            }
        }
        ended
    }

    /// Threads alive now (waiting or busy).
    #[cfg(test)]
    fn threads(&self) -> usize {
        lock(&self.threads)
            .iter()
            .filter(|t| !t.is_finished())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const DEADLINE: Duration = Duration::from_secs(30);

    fn wait_idle(pool: &Pool, n: usize) {
        let deadline = Instant::now() + DEADLINE;
        while pool.idle.load(Ordering::SeqCst) != n {
            assert!(Instant::now() < deadline, "never {n} idle");
            std::thread::yield_now();
        }
    }

    #[test]
    fn threads_are_reused_and_at_most_max_idle_wait() {
        let pool = Pool::new(2);
        let (tx, rx) = unbounded();
        let (go_tx, go_rx) = unbounded::<()>();
        // Three at once: three threads.
        for i in 0..3 {
            let (tx, go) = (tx.clone(), go_rx.clone());
            pool.run(Box::new(move || {
                go.recv_timeout(DEADLINE).unwrap();
                tx.send((i, std::thread::current().id())).unwrap();
            }))
            .unwrap();
        }
        assert_eq!(pool.threads(), 3);
        for _ in 0..3 {
            go_tx.send(()).unwrap();
        }
        let first: std::collections::HashSet<_> = (0..3)
            .map(|_| rx.recv_timeout(DEADLINE).unwrap().1)
            .collect();
        assert_eq!(first.len(), 3);
        // Two stay to wait; the third ends.
        wait_idle(&pool, 2);
        let deadline = Instant::now() + DEADLINE;
        while pool.threads() != 2 {
            assert!(Instant::now() < deadline, "the third thread did not end");
            std::thread::yield_now();
        }
        // The next jobs run on the threads that wait: no new thread.
        for i in 0..2 {
            let tx = tx.clone();
            pool.run(Box::new(move || {
                tx.send((i, std::thread::current().id())).unwrap();
            }))
            .unwrap();
        }
        for _ in 0..2 {
            let (_, id) = rx.recv_timeout(DEADLINE).unwrap();
            assert!(first.contains(&id), "a new thread ran it");
        }
        assert!(pool.close(Instant::now() + DEADLINE));
        assert_eq!(pool.threads(), 0);
        assert!(
            pool.run(Box::new(|| {})).is_err(),
            "a closed pool runs nothing"
        );
    }

    #[test]
    fn close_gives_up_on_a_task_that_does_not_end_by_the_deadline() {
        let pool = Pool::new(1);
        let (release, wait) = unbounded::<()>();
        pool.run(Box::new(move || {
            let _ = wait.recv_timeout(DEADLINE);
        }))
        .unwrap();
        assert!(!pool.close(Instant::now()));
        drop(release);
    }
}
