//! An interactive job's stdin on its way to the job, and [`JobStdin`], its writer.
//!
//! [`StdinWindow`] is the flow control both senders use: the manager towards the job's
//! worker, and a remote client towards the manager. It is plain data (no I/O, no lock,
//! no clock): it keeps the bytes written and not yet taken by the next hop, at most
//! [`STDIN_WINDOW`] of them, so that they can be sent again after a reconnect, from
//! wherever the peer says it has taken them to. Offsets count from the start of the job's
//! stdin, so a byte sent twice is taken once.

use crate::error::Error;
use crate::job::JobId;
use crate::protocol::{OUTPUT_CHUNK, STDIN_WINDOW};
use std::collections::VecDeque;

/// What a sender is to send, from [`StdinWindow::pending`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StdinOut {
    /// These bytes, from `offset` of the job's stdin.
    Data { offset: u64, bytes: Vec<u8> },
    /// The stream ends at `offset`.
    Eof { offset: u64 },
}

/// Why bytes are not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The job closed its stdin or ended.
    Closed,
    /// The writer closed the stream ([`JobStdin::close`]).
    Finished,
}

/// One interactive job's stdin between a writer and the next hop (see the module).
#[derive(Debug)]
pub(crate) struct StdinWindow {
    /// The bytes from `taken` to the end of what was written.
    buf: VecDeque<u8>,
    /// Every byte before it was taken by the next hop (as far as we have heard).
    taken: u64,
    /// How far the bytes went out on the current link.
    sent: u64,
    /// The writer ended the stream at the end of what was written.
    eof: bool,
    eof_sent: bool,
    /// The job takes no more (it closed its stdin, or ended).
    closed: bool,
    /// There is a link to send on.
    linked: bool,
    window: u64,
}

impl Default for StdinWindow {
    fn default() -> StdinWindow {
        StdinWindow::new(STDIN_WINDOW)
    }
}

impl StdinWindow {
    pub(crate) fn new(window: u64) -> StdinWindow {
        StdinWindow {
            buf: VecDeque::new(),
            taken: 0,
            sent: 0,
            eof: false,
            eof_sent: false,
            closed: false,
            linked: false,
            window,
        }
    }

    /// The end of what was written.
    pub(crate) fn written(&self) -> u64 {
        self.taken + self.buf.len() as u64
    }

    pub(crate) fn taken(&self) -> u64 {
        self.taken
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Bytes kept (written and not taken): never more than the window.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.buf.len()
    }

    /// How many more bytes may be written now.
    pub(crate) fn room(&self) -> usize {
        if self.closed || self.eof {
            return 0;
        }
        (self.taken + self.window).saturating_sub(self.written()) as usize
    }

    /// Takes what fits of `bytes` (0 when the window is full: wait for the next hop to
    /// take some).
    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<usize, Refused> {
        if self.closed {
            return Err(Refused::Closed);
        }
        if self.eof {
            return Err(Refused::Finished);
        }
        let n = self.room().min(bytes.len());
        self.buf.extend(&bytes[..n]);
        Ok(n)
    }

    /// Bytes a remote writer sent from `offset`: what was already written is skipped (a
    /// resend after a reconnect). `Err` for bytes after a gap, beyond the window or
    /// after the end. Bytes for a closed stdin are dropped: the writer hears it is closed.
    pub(crate) fn offer(&mut self, offset: u64, bytes: &[u8]) -> Result<(), String> {
        if self.closed {
            // What was kept is gone (`written` is back at `taken`): bytes the writer
            // sent before it heard of the close may start anywhere after it.
            return Ok(());
        }
        let written = self.written();
        if offset > written {
            return Err(format!(
                "stdin bytes from offset {offset} when {written} were written"
            ));
        }
        let end = offset.saturating_add(bytes.len() as u64);
        if end <= written {
            return Ok(());
        }
        if self.eof {
            return Err(format!("stdin bytes after its end at {written}"));
        }
        if end > self.taken + self.window {
            return Err(format!(
                "stdin bytes up to {end}, beyond the window ({} taken, {} allowed ahead)",
                self.taken, self.window
            ));
        }
        let new = &bytes[(written - offset) as usize..];
        self.buf.extend(new);
        Ok(())
    }

    /// Ends the stream after what was written (again: no change).
    pub(crate) fn finish(&mut self) -> Result<(), Refused> {
        if self.closed {
            return Err(Refused::Closed);
        }
        self.eof = true;
        Ok(())
    }

    /// A remote writer ends the stream at `offset`, which must be the end of what it wrote.
    pub(crate) fn finish_at(&mut self, offset: u64) -> Result<(), String> {
        if self.closed {
            return Ok(());
        }
        let written = self.written();
        if offset != written {
            return Err(format!(
                "stdin's end at {offset} when {written} bytes were written"
            ));
        }
        self.eof = true;
        Ok(())
    }

    /// The next hop has taken every byte before `upto`: those are let go, and as many
    /// may be written. True when that changed anything. `Err` for bytes never written.
    pub(crate) fn on_taken(&mut self, upto: u64) -> Result<bool, String> {
        let written = self.written();
        if upto > written {
            return Err(format!(
                "stdin taken up to {upto}, when only {written} bytes were written"
            ));
        }
        if upto <= self.taken {
            return Ok(false);
        }
        self.buf.drain(..(upto - self.taken) as usize);
        self.taken = upto;
        self.sent = self.sent.max(upto);
        Ok(true)
    }

    /// A writer that joins a stream others wrote (an attach) starts where the job has
    /// taken it to, when it has nothing of its own on the way.
    pub(crate) fn catch_up(&mut self, upto: u64) {
        if self.buf.is_empty() && upto > self.taken {
            self.taken = upto;
            self.sent = upto;
        }
    }

    /// After the manager restarted, a stdin that starts where the first of its worker and
    /// its writer to come back says the stream is: every byte before `upto` is taken as
    /// far as this hop is concerned (what was kept before it is let go).
    pub(crate) fn skip_to(&mut self, upto: u64) {
        if upto > self.written() {
            self.buf.clear();
            self.taken = upto;
            self.sent = upto;
        }
    }

    /// The job takes no more (it closed its stdin at `upto`, or ended): what is kept is
    /// dropped, writers are refused. True when that changed anything.
    pub(crate) fn on_closed(&mut self, upto: u64) -> Result<bool, String> {
        self.on_taken(upto)?;
        Ok(self.close())
    }

    /// The job ended (or cannot take more): as [`StdinWindow::on_closed`], where it was.
    pub(crate) fn close(&mut self) -> bool {
        if self.closed {
            return false;
        }
        self.closed = true;
        self.buf = VecDeque::new();
        true
    }

    /// There is a link to the next hop, which has every byte before `from` (`None`:
    /// before `taken`): what follows is sent again.
    pub(crate) fn link(&mut self, from: Option<u64>) -> Result<(), String> {
        if let Some(from) = from {
            self.on_taken(from)?;
        }
        self.linked = true;
        self.sent = self.taken;
        self.eof_sent = false;
        Ok(())
    }

    /// The link is gone: nothing is sent until the next one.
    pub(crate) fn unlink(&mut self) {
        self.linked = false;
    }

    /// What is to go out on the link now, in chunks of at most [`OUTPUT_CHUNK`] bytes.
    pub(crate) fn pending(&mut self) -> Vec<StdinOut> {
        let mut out = Vec::new();
        if !self.linked || self.closed {
            return out;
        }
        let written = self.written();
        while self.sent < written {
            let from = (self.sent - self.taken) as usize;
            let n = (self.buf.len() - from).min(OUTPUT_CHUNK);
            let bytes: Vec<u8> = self.buf.range(from..from + n).copied().collect();
            out.push(StdinOut::Data {
                offset: self.sent,
                bytes,
            });
            self.sent += n as u64;
        }
        if self.eof && !self.eof_sent {
            self.eof_sent = true;
            out.push(StdinOut::Eof { offset: written });
        }
        out
    }
}

/// The error a writer gets once the job takes no more.
pub(crate) fn closed_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stdin closed")
}

pub(crate) fn refused_error(r: Refused) -> std::io::Error {
    match r {
        Refused::Closed => closed_error(),
        Refused::Finished => std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "stdin closed: it was ended with close()",
        ),
    }
}

/// The writing end of an interactive job's stdin, from [`JobHandle::stdin`] or
/// [`RemoteJob::stdin`].
///
/// `write` takes what fits of the bytes and returns how many; when [`STDIN_WINDOW`]
/// bytes are on the way and not yet taken by the job, it waits (with no deadline, as a
/// pipe does) until the job reads. Once the job has closed its stdin or ended, it fails
/// with [`std::io::ErrorKind::BrokenPipe`] ("stdin closed"), a waiting `write`
/// included. Every `JobStdin` of a job writes to the one stream: each `write` puts its
/// bytes in one piece, but two threads' `write_all` may interleave. Dropping a
/// `JobStdin` leaves the stream open (ask for another to go on); [`JobStdin::close`]
/// ends it for all of them, and the job reads EOF after the bytes written.
///
/// [`JobHandle::stdin`]: crate::JobHandle::stdin
/// [`RemoteJob::stdin`]: crate::RemoteJob::stdin
pub struct JobStdin {
    pub(crate) job: JobId,
    pub(crate) end: End,
}

pub(crate) enum End {
    Local(std::sync::Arc<crate::manager::StdinPort>),
    Remote(crate::client::RemoteStdin),
}

impl JobStdin {
    /// The job's id.
    pub fn job(&self) -> JobId {
        self.job
    }

    /// Ends the stream: the job reads EOF after every byte written before. Fails
    /// (BrokenPipe) when the job has closed its stdin or ended.
    pub fn close(self) -> std::io::Result<()> {
        match &self.end {
            End::Local(port) => port.finish(),
            End::Remote(r) => r.finish(),
        }
    }
}

impl std::io::Write for JobStdin {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        match &self.end {
            End::Local(port) => port.write(buf),
            End::Remote(r) => r.write(buf),
        }
    }

    /// Bytes written are on their way at once: there is nothing to flush.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::fmt::Debug for JobStdin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStdin").field("job", &self.job).finish()
    }
}

/// The error for stdin asked of a job that is not interactive.
pub(crate) fn not_interactive(job: JobId) -> Error {
    Error::InvalidJob(format!(
        "job {job} is not interactive: its stdin was given with its spec (JobSpec::interactive)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(offset: u64, bytes: &[u8]) -> StdinOut {
        StdinOut::Data {
            offset,
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn a_full_window_takes_nothing_more_until_bytes_are_taken() {
        let mut w = StdinWindow::new(8);
        w.link(None).unwrap();
        assert_eq!(w.write(b"hello world"), Ok(8));
        assert_eq!(w.write(b"rld"), Ok(0), "full");
        assert_eq!(w.held(), 8);
        assert_eq!(w.pending(), vec![data(0, b"hello wo")]);
        assert_eq!(w.pending(), vec![], "sent once");
        assert_eq!(w.on_taken(5), Ok(true));
        assert_eq!(w.on_taken(3), Ok(false), "an old report changes nothing");
        assert_eq!(w.held(), 3);
        assert_eq!(w.write(b"rld!!!!!"), Ok(5));
        assert_eq!(w.pending(), vec![data(8, b"rld!!")]);
        assert!(w.on_taken(14).is_err(), "taken beyond what was written");
    }

    #[test]
    fn a_new_link_sends_again_from_what_the_peer_says_it_took() {
        let mut w = StdinWindow::new(100);
        w.link(None).unwrap();
        w.write(b"abcdefgh").unwrap();
        assert_eq!(w.pending(), vec![data(0, b"abcdefgh")]);
        w.on_taken(2).unwrap();
        w.unlink();
        w.write(b"ij").unwrap();
        assert_eq!(w.pending(), vec![], "no link");
        // The peer took up to 5 before the cut; the report was lost with the link.
        w.link(Some(5)).unwrap();
        assert_eq!(w.taken(), 5);
        assert_eq!(w.pending(), vec![data(5, b"fghij")]);
        w.finish().unwrap();
        assert_eq!(w.pending(), vec![StdinOut::Eof { offset: 10 }]);
        // Another link: the rest and the end again.
        w.link(Some(7)).unwrap();
        assert_eq!(
            w.pending(),
            vec![data(7, b"hij"), StdinOut::Eof { offset: 10 }]
        );
        assert!(w.link(Some(11)).is_err(), "taken beyond what was written");
    }

    #[test]
    fn the_end_goes_after_the_bytes_and_nothing_is_written_after_it() {
        let mut w = StdinWindow::new(4);
        w.write(b"abcd").unwrap();
        w.finish().unwrap();
        assert_eq!(w.write(b"x"), Err(Refused::Finished));
        assert_eq!(w.pending(), vec![], "not linked: the job has not started");
        w.link(None).unwrap();
        assert_eq!(
            w.pending(),
            vec![data(0, b"abcd"), StdinOut::Eof { offset: 4 }]
        );
    }

    #[test]
    fn a_closed_stdin_drops_what_it_kept_and_refuses_writers() {
        let mut w = StdinWindow::new(8);
        w.link(None).unwrap();
        w.write(b"abcdefgh").unwrap();
        assert_eq!(w.on_closed(1), Ok(true));
        assert_eq!(w.held(), 0);
        assert_eq!(w.write(b"x"), Err(Refused::Closed));
        assert_eq!(w.finish(), Err(Refused::Closed));
        assert_eq!(w.pending(), vec![]);
        assert_eq!(w.room(), 0);
        assert!(!w.close(), "closed once");
    }

    #[test]
    fn remote_bytes_are_taken_once_by_offset_within_the_window() {
        let mut w = StdinWindow::new(8);
        w.offer(0, b"abc").unwrap();
        w.offer(0, b"abcde").unwrap(); // resent, with more
        assert_eq!(w.written(), 5);
        w.offer(2, b"cde").unwrap(); // all seen
        assert_eq!(w.written(), 5);
        assert!(w.offer(6, b"x").is_err(), "a gap");
        assert!(w.offer(5, b"fghij").is_err(), "beyond the window");
        w.offer(5, b"fgh").unwrap();
        assert!(w.finish_at(7).is_err(), "not where the bytes end");
        w.finish_at(8).unwrap();
        w.finish_at(8).unwrap();
        assert!(w.offer(8, b"z").is_err(), "after the end");
        w.offer(7, b"h").unwrap(); // a resend of the last byte is fine
        w.link(None).unwrap();
        assert_eq!(
            w.pending(),
            vec![data(0, b"abcdefgh"), StdinOut::Eof { offset: 8 }]
        );
    }

    #[test]
    fn remote_bytes_still_on_the_way_when_the_job_closes_its_stdin_are_dropped() {
        // A remote writer sent a window's worth in chunks; the job took 3 bytes and
        // closed its stdin while the later chunks were still on their way.
        let mut w = StdinWindow::new(8);
        w.offer(0, b"ab").unwrap();
        w.offer(2, b"cd").unwrap();
        assert_eq!(w.on_closed(3), Ok(true));
        // The chunks that follow are dropped, not a protocol error: the writer had
        // not heard of the close when it sent them.
        assert_eq!(w.offer(4, b"ef"), Ok(()));
        assert_eq!(w.offer(6, b"gh"), Ok(()));
        assert_eq!(w.finish_at(8), Ok(()));
        assert_eq!(w.held(), 0);
    }

    #[test]
    fn large_writes_go_in_chunks_and_memory_stays_within_the_window() {
        let mut w = StdinWindow::default();
        w.link(None).unwrap();
        let big = vec![7u8; 10 << 20];
        let mut done = 0;
        let mut rounds = 0;
        while done < big.len() {
            done += w.write(&big[done..]).unwrap();
            assert!(w.held() as u64 <= STDIN_WINDOW);
            let out = w.pending();
            assert!(
                out.iter().all(
                    |o| matches!(o, StdinOut::Data { bytes, .. } if bytes.len() <= OUTPUT_CHUNK)
                )
            );
            let upto = w.written();
            w.on_taken(upto).unwrap();
            rounds += 1;
            assert!(rounds < 1000);
        }
        assert_eq!(w.taken(), 10 << 20);
    }
}
