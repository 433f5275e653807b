//! One job's output as the worker keeps it for the link: numbered chunks not yet handed
//! to a link, and those recently handed over, kept so that they can be sent again after
//! a reconnect. A chunk is shared (`Arc`) between this log and the message that carries
//! it, so keeping it for a replay copies nothing. Plain data: no threads, no I/O, no
//! clock.

use crate::job::Stream;
use std::collections::VecDeque;
use std::sync::Arc;

/// A piece of job output, as read from the job's pipe; shared, never copied, between
/// the log and the link's writer.
pub(crate) type Chunk = Arc<Vec<u8>>;

/// A numbered chunk: `seq` counts the job's output messages from 0.
#[derive(Clone, Debug)]
pub(crate) struct Numbered {
    pub seq: u64,
    pub stream: Stream,
    pub bytes: Chunk,
}

/// The output of one job run. Entries have consecutive numbers; those before the
/// cursor were handed to a link (the replay ring, trimmed to a byte limit), those from
/// it on were not (unsent).
#[derive(Debug, Default)]
pub(crate) struct OutputLog {
    entries: VecDeque<Numbered>,
    /// The number the next chunk gets.
    next_seq: u64,
    /// The number of the first entry not yet handed to a link (`next_seq` if none).
    cursor: u64,
    sent_bytes: usize,
    unsent_bytes: usize,
}

impl OutputLog {
    /// The number of `entries[0]`.
    fn first_seq(&self) -> u64 {
        self.next_seq - self.entries.len() as u64
    }

    /// Adds a chunk at the end; returns its number.
    pub(crate) fn push(&mut self, stream: Stream, bytes: Chunk) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unsent_bytes += bytes.len();
        self.entries.push_back(Numbered { seq, stream, bytes });
        seq
    }

    /// Whether some output waits to be handed to a link.
    pub(crate) fn has_unsent(&self) -> bool {
        self.cursor < self.next_seq
    }

    /// Bytes waiting to be handed to a link.
    pub(crate) fn unsent_bytes(&self) -> usize {
        self.unsent_bytes
    }

    /// Bytes kept of what was handed to a link.
    #[cfg(test)]
    pub(crate) fn kept_bytes(&self) -> usize {
        self.sent_bytes
    }

    /// Hands the next unsent chunk to a link, keeping it for a replay; the kept chunks
    /// beyond `keep` bytes (oldest first) are forgotten.
    pub(crate) fn take_next(&mut self, keep: usize) -> Option<Numbered> {
        if !self.has_unsent() {
            return None;
        }
        let entry = self.entries[(self.cursor - self.first_seq()) as usize].clone();
        self.cursor += 1;
        self.unsent_bytes -= entry.bytes.len();
        self.sent_bytes += entry.bytes.len();
        while self.sent_bytes > keep && self.first_seq() < self.cursor {
            let old = self
                .entries
                .pop_front()
                .expect("an entry before the cursor");
            self.sent_bytes -= old.bytes.len();
        }
        Some(entry)
    }

    /// After a reconnect: the manager has every chunk before `from`. Those are
    /// forgotten, and everything kept from `from` on is unsent again. When `from` is
    /// older than what is kept, sending starts at the oldest chunk kept (the manager
    /// sees the gap); when it is beyond what was ever made, nothing is sent again.
    pub(crate) fn rewind(&mut self, from: u64) {
        while self.first_seq() < from.min(self.next_seq) {
            self.entries.pop_front();
        }
        self.cursor = self.first_seq();
        self.sent_bytes = 0;
        self.unsent_bytes = self.entries.iter().map(|e| e.bytes.len()).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: usize, b: u8) -> Chunk {
        Arc::new(vec![b; n])
    }

    fn drain(log: &mut OutputLog, keep: usize) -> Vec<u64> {
        std::iter::from_fn(|| log.take_next(keep).map(|e| e.seq)).collect()
    }

    #[test]
    fn chunks_are_numbered_in_order_and_handed_over_once() {
        let mut log = OutputLog::default();
        for i in 0..3 {
            assert_eq!(log.push(Stream::Stdout, chunk(10, i)), i as u64);
        }
        assert_eq!(log.unsent_bytes(), 30);
        assert_eq!(drain(&mut log, 1 << 20), vec![0, 1, 2]);
        assert!(!log.has_unsent());
        assert_eq!((log.unsent_bytes(), log.kept_bytes()), (0, 30));
        assert_eq!(log.push(Stream::Stderr, chunk(5, 9)), 3);
        assert_eq!(drain(&mut log, 1 << 20), vec![3]);
    }

    #[test]
    fn the_replay_ring_keeps_only_the_newest_bytes_up_to_its_limit() {
        let mut log = OutputLog::default();
        for i in 0..10 {
            log.push(Stream::Stdout, chunk(100, i));
        }
        assert_eq!(drain(&mut log, 250).len(), 10);
        assert_eq!(log.kept_bytes(), 200);
        // The manager lost everything: only the kept two come again.
        log.rewind(0);
        assert_eq!(log.unsent_bytes(), 200);
        assert_eq!(drain(&mut log, 250), vec![8, 9]);
    }

    #[test]
    fn a_rewind_sends_again_from_the_expected_seq_then_what_was_never_sent() {
        let mut log = OutputLog::default();
        for i in 0..4 {
            log.push(Stream::Stdout, chunk(10, i));
        }
        assert_eq!(drain(&mut log, 1 << 20), vec![0, 1, 2, 3]);
        log.push(Stream::Stdout, chunk(10, 4));
        log.push(Stream::Stdout, chunk(10, 5));
        log.rewind(2);
        assert_eq!(log.unsent_bytes(), 40);
        assert_eq!(drain(&mut log, 1 << 20), vec![2, 3, 4, 5]);
        // A manager that has it all gets nothing again.
        log.rewind(6);
        assert_eq!(drain(&mut log, 1 << 20), Vec::<u64>::new());
        // Nor does one that claims more than was made; numbering goes on.
        log.rewind(100);
        assert_eq!(log.push(Stream::Stdout, chunk(1, 0)), 6);
        assert_eq!(drain(&mut log, 1 << 20), vec![6]);
    }

    #[test]
    fn kept_chunks_are_shared_not_copied() {
        let mut log = OutputLog::default();
        let c = chunk(1000, 7);
        log.push(Stream::Stdout, c.clone());
        let sent = log.take_next(1 << 20).unwrap();
        assert!(Arc::ptr_eq(&sent.bytes, &c));
        log.rewind(0);
        assert!(Arc::ptr_eq(&log.take_next(1 << 20).unwrap().bytes, &c));
    }
}
