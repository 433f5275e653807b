//! An interactive job's stdin as the worker's session counts it: what came from the
//! manager (`StdinData`, `StdinEof`), what the job's supervisor has written into the
//! job's pipe or terminal, and what the manager is told back (`StdinTaken`,
//! `StdinClosed`). No bytes are kept here: new bytes go straight on to the supervisor,
//! which writes them as the job reads. Plain counting, tested in memory.
//!
//! The rules:
//! - Offsets count from the start of the job's stdin. Bytes before `received` (handed
//!   to the supervisor already, after a reconnect when the manager sends again from the
//!   `stdin_taken` of the worker's hello) are skipped; a gap (bytes starting after
//!   `received`) is a protocol error.
//! - At most [`STDIN_WINDOW`] bytes beyond `taken` may have come: more is a protocol
//!   error, so that what waits at the worker is bounded.
//! - `StdinTaken` goes back when a quarter of the window was taken since the last one,
//!   and whenever everything that came has been taken (the pipe drained).
//! - `StdinClosed` goes back once, when the job closed its stdin or ended; after it,
//!   bytes that still come are dropped.

use crate::protocol::STDIN_WINDOW;

/// How much must be taken since the last `StdinTaken` before another is sent (unless
/// everything that came was taken).
const REPORT_STEP: u64 = STDIN_WINDOW / 4;

/// One interactive run's stdin counts.
#[derive(Debug, Default)]
pub(crate) struct StdinFlow {
    /// Bytes that came and were handed on (from the start of the stream).
    received: u64,
    /// Bytes written into the job's pipe or terminal.
    taken: u64,
    /// The last `StdinTaken` sent.
    reported: u64,
    /// Where the manager said the stream ends.
    eof: Option<u64>,
    /// The end was handed on to the supervisor.
    eof_given: bool,
    /// Closed (by the job, or because it ended), with the bytes taken by then.
    closed: Option<u64>,
}

impl StdinFlow {
    /// Bytes of the stream from `offset`: what is new in them (to hand on, possibly
    /// nothing), or why they break the protocol.
    pub(crate) fn accept<'a>(&mut self, offset: u64, bytes: &'a [u8]) -> Result<&'a [u8], String> {
        if self.closed.is_some() {
            return Ok(&[]); // sent before the manager heard of the close
        }
        let end = offset
            .checked_add(bytes.len() as u64)
            .ok_or_else(|| format!("stdin bytes at offset {offset} run past 2^64"))?;
        if offset > self.received {
            return Err(format!(
                "stdin bytes from offset {offset}, but only {} came before: bytes are missing",
                self.received
            ));
        }
        if let Some(eof) = self.eof
            && end > eof
        {
            return Err(format!(
                "stdin bytes up to offset {end}, past its end at {eof}"
            ));
        }
        if end > self.taken + STDIN_WINDOW {
            return Err(format!(
                "stdin bytes up to offset {end}, {} beyond the {} taken, more than the window \
                 of {STDIN_WINDOW}",
                end - self.taken,
                self.taken
            ));
        }
        let skip = (self.received - offset).min(bytes.len() as u64) as usize;
        self.received = self.received.max(end);
        Ok(&bytes[skip..])
    }

    /// The stream ends at `offset` (handed on by [`StdinFlow::end_due`] once every byte
    /// before it has come), or why that breaks the protocol.
    pub(crate) fn end(&mut self, offset: u64) -> Result<(), String> {
        if self.closed.is_some() {
            return Ok(());
        }
        if offset < self.received {
            return Err(format!(
                "stdin ends at offset {offset}, but {} bytes came",
                self.received
            ));
        }
        if let Some(eof) = self.eof
            && eof != offset
        {
            return Err(format!(
                "stdin ends at offset {offset}, but it ended at {eof} before"
            ));
        }
        self.eof = Some(offset);
        Ok(())
    }

    /// Whether the end is to be handed on now (once).
    pub(crate) fn end_due(&mut self) -> bool {
        if self.eof_given || self.closed.is_some() || self.eof != Some(self.received) {
            return false;
        }
        self.eof_given = true;
        true
    }

    /// The supervisor wrote every byte before `upto`: the `StdinTaken` to send, if one
    /// is due.
    pub(crate) fn taken(&mut self, upto: u64) -> Option<u64> {
        if self.closed.is_some() {
            return None;
        }
        self.taken = self.taken.max(upto.min(self.received));
        let step = self.taken - self.reported;
        if step > 0 && (step >= REPORT_STEP || self.taken == self.received) {
            self.reported = self.taken;
            return Some(self.taken);
        }
        None
    }

    /// The job closed its stdin (after taking `upto`), or ended: the `StdinClosed` to
    /// send, the first time.
    pub(crate) fn close(&mut self, upto: u64) -> Option<u64> {
        if self.closed.is_some() {
            return None;
        }
        self.taken = self.taken.max(upto.min(self.received));
        self.closed = Some(self.taken);
        Some(self.taken)
    }

    /// Bytes taken so far (for the hello of a reconnecting worker).
    pub(crate) fn taken_so_far(&self) -> u64 {
        self.taken
    }

    /// Bytes that came so far.
    #[cfg(test)]
    pub(crate) fn received(&self) -> u64 {
        self.received
    }

    /// When closed, with the bytes taken by then.
    pub(crate) fn closed(&self) -> Option<u64> {
        self.closed
    }

    /// After a reconnect: the `StdinTaken` that brings the new link up to date, if
    /// anything was taken since the start.
    pub(crate) fn resync(&mut self) -> Option<u64> {
        if self.closed.is_some() || self.taken == 0 {
            return None;
        }
        self.reported = self.taken;
        Some(self.taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_bytes_are_handed_on_once_and_duplicates_after_a_resend_are_skipped() {
        let mut f = StdinFlow::default();
        assert_eq!(f.accept(0, b"hello").unwrap(), b"hello");
        assert_eq!(f.accept(5, b" world").unwrap(), b" world");
        // A resend from 3 after a reconnect: only what did not come is new.
        assert_eq!(f.accept(3, b"lo world!").unwrap(), b"!");
        assert_eq!(f.accept(0, b"hel").unwrap(), b"");
        assert_eq!(f.received(), 12);
        let e = f.accept(13, b"x").unwrap_err();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn at_most_a_window_beyond_what_was_taken_is_accepted() {
        let mut f = StdinFlow::default();
        let w = STDIN_WINDOW as usize;
        assert_eq!(f.accept(0, &vec![1; w]).unwrap().len(), w);
        let e = f.accept(w as u64, b"x").unwrap_err();
        assert!(e.contains("window"), "{e}");
        assert_eq!(f.taken(10), None, "a small step with bytes still waiting");
        assert_eq!(f.accept(w as u64, &[2; 10]).unwrap().len(), 10);
        assert!(f.accept(w as u64 + 10, b"x").is_err());
        assert!(f.accept(u64::MAX, b"xy").unwrap_err().contains("2^64"));
    }

    #[test]
    fn taken_is_reported_every_quarter_window_and_when_everything_was_taken() {
        let mut f = StdinFlow::default();
        f.accept(0, &vec![0; STDIN_WINDOW as usize]).unwrap();
        assert_eq!(f.taken(REPORT_STEP - 1), None);
        assert_eq!(f.taken(REPORT_STEP), Some(REPORT_STEP));
        assert_eq!(f.taken(REPORT_STEP + 1), None);
        assert_eq!(f.taken(STDIN_WINDOW), Some(STDIN_WINDOW));
        assert_eq!(f.taken(STDIN_WINDOW), None, "nothing new");
        // Small bytes, each taken at once: each is reported (the pipe drained).
        assert_eq!(f.accept(STDIN_WINDOW, b"ab").unwrap(), b"ab");
        assert_eq!(f.taken(STDIN_WINDOW + 1), None);
        assert_eq!(f.taken(STDIN_WINDOW + 2), Some(STDIN_WINDOW + 2));
        // A supervisor cannot have taken more than came.
        assert_eq!(f.taken(u64::MAX), None);
        assert_eq!(f.taken_so_far(), STDIN_WINDOW + 2);
    }

    #[test]
    fn the_end_is_handed_on_once_every_byte_before_it_has_come() {
        let mut f = StdinFlow::default();
        f.accept(0, b"abc").unwrap();
        assert_eq!(f.end(5), Ok(()));
        assert!(!f.end_due(), "bytes before it have not come");
        assert!(f.end(6).is_err(), "the end moved");
        assert!(f.accept(3, b"def").unwrap_err().contains("past its end"));
        assert_eq!(f.accept(3, b"de").unwrap(), b"de");
        assert!(f.end_due());
        assert!(!f.end_due(), "once");
        assert_eq!(f.end(5), Ok(()));
        assert!(!f.end_due(), "a resent end is not handed on again");
        assert!(f.end(4).is_err());
    }

    #[test]
    fn closed_once_and_what_comes_after_is_dropped() {
        let mut f = StdinFlow::default();
        f.accept(0, b"abcdef").unwrap();
        f.taken(2);
        assert_eq!(f.close(4), Some(4));
        assert_eq!(f.close(6), None);
        assert_eq!(f.closed(), Some(4));
        assert_eq!(
            f.accept(6, &vec![0; 2 * STDIN_WINDOW as usize]).unwrap(),
            b""
        );
        assert_eq!(f.taken(6), None);
        assert_eq!(f.end(100), Ok(()));
        assert!(!f.end_due());
        assert_eq!(f.resync(), None);
    }
}
