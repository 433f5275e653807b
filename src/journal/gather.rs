//! When the journal's writer commits: at once, or after waiting a little for more writes
//! (group commit on a slow disk). Decided here, apart from the writer thread, so that it
//! is tested with a clock the test moves.

use std::time::{Duration, Instant};

/// Whether the writer, holding a batch, waits a little for more writes before it
/// commits. A commit costs one flush of the disk, however many writes it carries; while
/// it runs, the writes that come in wait for the next one. With several writers that
/// each write again as soon as they are answered, the writers split into two groups
/// that take turns (one group's writes come in while the other's commit runs), and
/// each commit carries half of them. When commits are slow (a disk whose flush takes a
/// millisecond or more), waiting briefly for the writers just answered lets one commit
/// carry them all: at most a quarter of the last commit's time, and no longer than
/// [`Gather::QUIET`] after the last write came in. A lone writer, or a fast disk, never
/// waits.
#[derive(Default)]
pub(crate) struct Gather {
    /// Writes that waited for the last commit, and how long it took.
    last_callers: usize,
    last_commit: Duration,
}

impl Gather {
    /// Commits shorter than this never wait: waiting would cost more than it saves.
    const SLOW: Duration = Duration::from_millis(1);
    /// A wait ends when no write has come in for this long.
    const QUIET: Duration = Duration::from_micros(100);
    /// The longest wait.
    const MOST: Duration = Duration::from_millis(1);

    /// With a batch of `callers` waiting writes complete at `now`: until when to wait for
    /// more (`None`: commit now).
    pub(crate) fn until(&self, now: Instant, callers: usize) -> Option<Instant> {
        if self.last_commit < Self::SLOW || (callers < 2 && self.last_callers < 2) {
            return None;
        }
        Some(now + (self.last_commit / 4).min(Self::MOST))
    }

    /// When to stop waiting for the next write, at `now`, while waiting until `until`.
    pub(crate) fn next(now: Instant, until: Instant) -> Instant {
        (now + Self::QUIET).min(until)
    }

    /// A commit of `callers` waiting writes took `took`.
    pub(crate) fn committed(&mut self, callers: usize, took: Duration) {
        self.last_callers = callers;
        self.last_commit = took;
    }
}

#[cfg(test)]
mod tests {
    use super::Gather;
    use std::time::{Duration, Instant};

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn fast_commits_never_wait() {
        let mut g = Gather::default();
        let now = Instant::now();
        assert_eq!(g.until(now, 16), None, "before any commit");
        g.committed(16, Gather::SLOW - Duration::from_micros(1));
        assert_eq!(g.until(now, 16), None);
    }

    #[test]
    fn a_lone_writer_never_waits() {
        let mut g = Gather::default();
        g.committed(1, 3 * MS);
        assert_eq!(g.until(Instant::now(), 1), None);
        assert_eq!(g.until(Instant::now(), 0), None, "records nobody waits for");
    }

    #[test]
    fn slow_commits_with_several_writers_wait_a_quarter_of_the_last_commit() {
        let mut g = Gather::default();
        let now = Instant::now();
        g.committed(8, 2 * MS);
        assert_eq!(g.until(now, 8), Some(now + MS / 2));
        // One write in hand, but the last commit answered eight: they come back.
        assert_eq!(g.until(now, 1), Some(now + MS / 2));
        g.committed(1, 2 * MS);
        assert_eq!(g.until(now, 2), Some(now + MS / 2), "two in hand");
        // Never longer than MOST, however slow the commit.
        g.committed(8, 40 * MS);
        assert_eq!(g.until(now, 8), Some(now + Gather::MOST));
    }

    #[test]
    fn a_wait_ends_quiet_after_the_last_write_and_never_past_its_end() {
        let now = Instant::now();
        let until = now + MS;
        assert_eq!(Gather::next(now, until), now + Gather::QUIET);
        let late = until - Gather::QUIET / 2;
        assert_eq!(Gather::next(late, until), until);
        assert_eq!(Gather::next(until + MS, until), until, "past the end: stop");
    }
}
