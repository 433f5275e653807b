//! One established connection between a manager and a worker, seen from either side:
//! the connect/accept handshakes (TLS + hello under one deadline), the link's shared
//! sending side ([`Tx`]: whoever sends writes directly, what the socket does not take
//! waits for the process's flusher), the reading side ([`Reader`]: non-blocking reads
//! and whole frames), heartbeats ([`Beat`]), and the manager's link loop ([`drive`]: one
//! thread per link, waiting in `poll` for its socket or its next heartbeat deadline).
//! It knows messages, not jobs.

use crate::error::{Error, Result};
use crate::flusher::{self, Flush, Flushed};
use crate::net;
use crate::protocol::{
    self, DEFAULT_MAX_FRAME, Heartbeat, PROTOCOL_VERSION, Role, SubmitterHello, WorkerHello,
};
use crate::sync::lock;
use crate::tls::{self, Io, PeerRoles, ServerTls};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, Connection};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::marker::PhantomData;
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

/// Hello frames are small; anything larger before the handshake ends is hostile.
const MAX_HELLO: usize = 64 * 1024;
/// A link reads at most this much from its socket at a time.
const READ_CHUNK: usize = 64 << 10;
/// A link's plaintext buffer keeps at most this much capacity once empty.
const KEPT_PLAIN_CAPACITY: usize = 128 << 10;
/// How long a refusal may take to go out before the connection is cut anyway.
const REFUSAL_WAIT: Duration = Duration::from_secs(1);

/// Timing of a link, decided by the manager and adopted by the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Timing {
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
}

/// The shortest heartbeat interval a worker adopts from a welcome.
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);
/// The longest heartbeat timeout a worker adopts from a welcome: beyond it a dead
/// manager would go unnoticed for too long.
pub(crate) const MAX_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(600);

impl Timing {
    /// The timing a worker adopts from the manager's welcome, made sane whatever the
    /// numbers say: the timeout within [20 ms, 10 min], the interval at least 10 ms and
    /// at most half the timeout (so that a heartbeat always arrives in time).
    pub(crate) fn adopted(interval_ms: u64, timeout_ms: u64) -> Timing {
        let timeout = Duration::from_millis(timeout_ms)
            .clamp(MIN_HEARTBEAT_INTERVAL * 2, MAX_HEARTBEAT_TIMEOUT);
        let interval =
            Duration::from_millis(interval_ms).clamp(MIN_HEARTBEAT_INTERVAL, timeout / 2);
        Timing {
            heartbeat_interval: interval,
            heartbeat_timeout: timeout,
        }
    }
}

/// What the manager announces to a worker: the link's timing and its reconnect grace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Paced {
    pub timing: Timing,
    pub grace: Duration,
}

/// The manager's heartbeat pace. Every worker sends a heartbeat per interval when quiet,
/// and each one wakes its link's thread in the manager: with many workers, that is most
/// of what an idle manager does. Past `max_per_second` heartbeats a second at the
/// configured interval, the interval is stretched to keep to that rate, and the timeout
/// and the reconnect grace by as much as both (so the grace less the timeout and the
/// interval, which is when a worker gives up its jobs after a loss, does not change).
/// See [`paced`].
pub(crate) struct Pace {
    base: Paced,
    max_per_second: u32,
    links: std::sync::atomic::AtomicUsize,
}

impl Pace {
    pub(crate) fn new(timing: Timing, grace: Duration, max_per_second: u32) -> Pace {
        // The timing as a worker adopts it (the interval at most half the timeout), so
        // that both sides go by the same numbers and the answering side's beat keeps
        // its promise (see `Timing::answer_after`).
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let timing = Timing::adopted(ms(timing.heartbeat_interval), ms(timing.heartbeat_timeout));
        Pace {
            base: Paced { timing, grace },
            max_per_second,
            links: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The configured timing and grace.
    pub(crate) fn base(&self) -> Paced {
        self.base
    }

    /// The pace for as many links as are live now.
    pub(crate) fn now(&self) -> Paced {
        paced(
            self.base,
            self.max_per_second,
            self.links.load(Ordering::Relaxed),
        )
    }

    /// Counts a live link until the guard is dropped.
    pub(crate) fn link_up(self: &Arc<Self>) -> PaceGuard {
        self.links.fetch_add(1, Ordering::Relaxed);
        PaceGuard(self.clone())
    }
}

/// A live link, counted in its [`Pace`].
pub(crate) struct PaceGuard(Arc<Pace>);

impl Drop for PaceGuard {
    fn drop(&mut self) {
        self.0.links.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The timing for `links` live links: the base one while `links` heartbeats per interval
/// stay within `max_per_second` (0: always the base), else an interval of
/// `links / max_per_second` seconds, with the timeout stretched by the same factor (at
/// most [`MAX_HEARTBEAT_TIMEOUT`], the interval at most half of it) and the grace longer
/// by as much as the timeout and the interval together.
pub(crate) fn paced(base: Paced, max_per_second: u32, links: usize) -> Paced {
    let t = base.timing;
    if max_per_second == 0 || t.heartbeat_interval.is_zero() {
        return base;
    }
    let wanted = Duration::from_secs_f64(links as f64 / f64::from(max_per_second));
    if wanted <= t.heartbeat_interval {
        return base;
    }
    let factor = wanted.as_secs_f64() / t.heartbeat_interval.as_secs_f64();
    let timeout = Duration::from_secs_f64(
        (t.heartbeat_timeout.as_secs_f64() * factor).min(MAX_HEARTBEAT_TIMEOUT.as_secs_f64()),
    )
    .max(t.heartbeat_timeout);
    let ms = |d: Duration| Duration::from_millis(d.as_millis() as u64);
    let timeout = ms(timeout);
    let interval = ms(wanted.min(timeout / 2)).max(t.heartbeat_interval);
    Paced {
        timing: Timing {
            heartbeat_interval: interval,
            heartbeat_timeout: timeout,
        },
        grace: base.grace + (timeout - t.heartbeat_timeout) + (interval - t.heartbeat_interval),
    }
}

impl Paced {
    /// Whether `other` is far enough from this (a quarter either way, in the interval)
    /// to be worth telling a worker about.
    pub(crate) fn differs(&self, other: &Paced) -> bool {
        let (a, b) = (
            self.timing.heartbeat_interval.as_secs_f64(),
            other.timing.heartbeat_interval.as_secs_f64(),
        );
        b > a * 1.25 || b < a / 1.25
    }
}

/// When a link last heard its peer, and whether (and why) this side is closing it;
/// shared by the link's thread, its senders and the dispatcher (for statistics).
pub(crate) struct Liveness {
    epoch: Instant,
    last_rx_ms: AtomicU64,
    closed: AtomicBool,
    /// Why this side closed the link, when it did so on purpose (the first reason wins).
    reason: Mutex<Option<String>>,
    /// The most the grace announced on this link exceeded the configured one (see
    /// [`Pace`]): the manager waits that much longer for the worker after a loss.
    stretch_ms: AtomicU64,
}

impl Liveness {
    pub(crate) fn new() -> Arc<Liveness> {
        Arc::new(Liveness {
            epoch: Instant::now(),
            last_rx_ms: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            reason: Mutex::new(None),
            stretch_ms: AtomicU64::new(0),
        })
    }

    /// Notes that a grace this much longer than the configured one was announced.
    pub(crate) fn note_stretch(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.stretch_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// The longest stretch of the grace announced on this link.
    pub(crate) fn stretch(&self) -> Duration {
        Duration::from_millis(self.stretch_ms.load(Ordering::Relaxed))
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(crate) fn touch(&self) {
        self.last_rx_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// How long, at `now`, since the last frame arrived (for callers that are given the
    /// time rather than read the clock).
    pub(crate) fn silent_at(&self, now: Instant) -> Duration {
        let last = self.epoch + Duration::from_millis(self.last_rx_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    /// Marks the link as going away (its errors are then expected, not news).
    pub(crate) fn mark_closed(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    /// Whether [`Liveness::mark_closed`] was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Marks the link as closed by this side for a reason (kept if it is the first).
    pub(crate) fn close_because(&self, why: String) {
        let mut reason = crate::sync::lock(&self.reason);
        if reason.is_none() && !self.is_closed() {
            *reason = Some(why);
        }
        self.mark_closed();
    }

    /// Why this side closed the link, if it did so through [`Liveness::close_because`].
    pub(crate) fn reason(&self) -> Option<String> {
        crate::sync::lock(&self.reason).clone()
    }
}

/// Who keeps a quiet link's heartbeats going. Liveness is "a frame heard recently" on
/// both sides; what differs is when a side sends a heartbeat of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Beat {
    /// Sends one whenever it has sent nothing for the interval (the worker).
    Lead,
    /// Answers: sends one when a frame arrives after it has been quiet for
    /// [`Timing::answer_after`], so that it wakes once per heartbeat it hears; by
    /// itself only after that and one interval more (the manager).
    Answer,
}

impl Timing {
    /// How long the answering side stays quiet before a frame it hears gets a
    /// heartbeat back: half the timeout less an interval, at least half an interval.
    /// Its peer then hears from it at least every `answer_after` + interval, which is
    /// at most three quarters of the timeout (the interval is at most half of it).
    pub(crate) fn answer_after(&self) -> Duration {
        (self.heartbeat_timeout / 2)
            .saturating_sub(self.heartbeat_interval)
            .max(self.heartbeat_interval / 2)
    }
}

impl Beat {
    /// Whether to send a heartbeat at `now`, having sent nothing since `last_tx`;
    /// `heard` says whether a frame has just arrived.
    pub(crate) fn due(self, t: Timing, last_tx: Instant, now: Instant, heard: bool) -> bool {
        let quiet = now.saturating_duration_since(last_tx);
        match self {
            Beat::Lead => quiet >= t.heartbeat_interval,
            Beat::Answer => {
                (heard && quiet >= t.answer_after())
                    || quiet >= t.answer_after() + t.heartbeat_interval
            }
        }
    }

    /// When a heartbeat falls due if nothing is sent or heard before.
    pub(crate) fn next(self, t: Timing, last_tx: Instant) -> Instant {
        match self {
            Beat::Lead => last_tx + t.heartbeat_interval,
            Beat::Answer => last_tx + t.answer_after() + t.heartbeat_interval,
        }
    }
}

/// The most bytes a link keeps for a peer that does not read them: about two of the
/// largest frames. Beyond it the link is closed (its peer has stopped reading).
pub(crate) const PENDING_LIMIT: usize = 2 * DEFAULT_MAX_FRAME;

/// A link's sending side, shared by every thread that sends on it (the manager's
/// dispatcher, job sinks and link thread; the worker's supervisors, session thread and
/// the flusher). A message is encoded, encrypted and handed to the socket by the thread
/// that sends it, under this lock, without waiting: what the socket does not take at once
/// stays pending, and the link is handed to the flusher, which sends it when the socket
/// has room. Whole frames are queued under the lock, so senders never interleave inside
/// one.
pub(crate) struct Tx {
    state: Mutex<TxState>,
    live: Arc<Liveness>,
    label: String,
    /// Pending bytes beyond which the link is closed.
    limit: usize,
    /// What the flusher calls when the socket has room (this `Tx` itself, unless a link
    /// pulls what to send from elsewhere: the worker's session).
    flush_with: OnceLock<Weak<dyn Flush>>,
}

struct TxState {
    io: Io,
    /// Frames sent before the link opened (plain), queued after the opening frame.
    held: Option<Vec<u8>>,
    scratch: Vec<u8>,
    corked: u32,
    /// Handed to the flusher and not yet done there.
    flushing: bool,
    /// When a frame was last queued.
    last_tx: Instant,
    /// How long the peer may leave pending bytes unread before the link is cut.
    stall: Duration,
}

/// What became of a send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Queued; all of it (and everything before it) is with the socket, or will be
    /// once the link is uncorked or opened.
    Out,
    /// Queued; some bytes wait for the socket (the flusher has the link).
    Left,
    /// Not queued: the link is closed or closing (or was closed now, for a peer that
    /// left too much unread).
    Refused,
}

impl Tx {
    /// The sending side of `io`. A `gated` link holds what it is given until
    /// [`Tx::open`] (the manager's welcome must go first).
    pub(crate) fn new(io: Io, live: Arc<Liveness>, label: String, gated: bool) -> Arc<Tx> {
        Tx::with_limit(io, live, label, gated, PENDING_LIMIT)
    }

    pub(crate) fn with_limit(
        io: Io,
        live: Arc<Liveness>,
        label: String,
        gated: bool,
        limit: usize,
    ) -> Arc<Tx> {
        Arc::new(Tx {
            state: Mutex::new(TxState {
                io,
                held: gated.then(Vec::new),
                scratch: Vec::new(),
                corked: 0,
                flushing: false,
                last_tx: Instant::now(),
                stall: Duration::from_secs(5),
            }),
            live,
            label,
            limit,
            flush_with: OnceLock::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, TxState> {
        lock(&self.state)
    }

    /// Makes `f` the one that flushes this link: the flusher holds the link, which hands
    /// over to `f` from then on (also for bytes that were waiting before).
    pub(crate) fn flush_with(&self, f: Weak<dyn Flush>) {
        let _ = self.flush_with.set(f);
    }

    pub(crate) fn live(&self) -> &Arc<Liveness> {
        &self.live
    }

    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    /// How long the peer may leave bytes unread before the link is cut.
    pub(crate) fn set_stall(&self, stall: Duration) {
        self.lock().stall = stall;
    }

    /// When a frame was last queued.
    pub(crate) fn last_tx(&self) -> Instant {
        self.lock().last_tx
    }

    /// Bytes waiting for the socket.
    pub(crate) fn pending(&self) -> usize {
        self.lock().io.pending()
    }

    /// Whether nothing more may be sent (closing, closed or cut).
    pub(crate) fn is_closing(&self) -> bool {
        self.lock().io.is_closing()
    }

    /// Encodes one or more frames with `encode` and sends them (see [`Tx`]).
    pub(crate) fn send_with(
        self: &Arc<Self>,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<()>,
    ) -> Sent {
        let mut st = self.lock();
        if !st.io.is_open() {
            return Sent::Refused;
        }
        if let Some(held) = &mut st.held {
            if let Err(e) = encode(held) {
                log::error!(
                    "{}: dropping a message that cannot be encoded: {e}",
                    self.label
                );
            }
            if held.len() > self.limit {
                drop(st);
                self.overflow();
                return Sent::Refused;
            }
            return Sent::Out;
        }
        let mut scratch = std::mem::take(&mut st.scratch);
        scratch.clear();
        let queued = match encode(&mut scratch) {
            Ok(()) => self.queue_locked(&mut st, &[&scratch]),
            Err(e) => {
                log::error!(
                    "{}: dropping a message that cannot be encoded: {e}",
                    self.label
                );
                Sent::Out
            }
        };
        if scratch.capacity() <= KEPT_PLAIN_CAPACITY {
            st.scratch = scratch;
        }
        queued
    }

    /// Sends bytes that are already frames, as one run (see [`Io::queue`]); on a gated
    /// link that has not opened, they are held to follow the opening frame.
    pub(crate) fn send_parts(self: &Arc<Self>, parts: &[&[u8]]) -> Sent {
        let mut st = self.lock();
        if !st.io.is_open() {
            return Sent::Refused;
        }
        if let Some(held) = &mut st.held {
            for part in parts {
                held.extend_from_slice(part);
            }
            if held.len() > self.limit {
                drop(st);
                self.overflow();
                return Sent::Refused;
            }
            return Sent::Out;
        }
        self.queue_locked(&mut st, parts)
    }

    fn queue_locked(self: &Arc<Self>, st: &mut TxState, parts: &[&[u8]]) -> Sent {
        if let Err(e) = st.io.queue(parts) {
            self.failed(st, e);
            return Sent::Refused;
        }
        st.last_tx = Instant::now();
        if st.corked > 0 {
            if st.io.pending() > self.limit {
                self.overflow_locked(st);
                return Sent::Refused;
            }
            return Sent::Out;
        }
        self.push_locked(st)
    }

    /// Sends what the socket takes now; hands the rest to the flusher.
    fn push_locked(self: &Arc<Self>, st: &mut TxState) -> Sent {
        match st.io.push() {
            Ok(true) => Sent::Out,
            Ok(false) => {
                if st.io.pending() > self.limit {
                    self.overflow_locked(st);
                    return Sent::Refused;
                }
                if !st.flushing
                    && let Some(tcp) = st.io.socket().cloned()
                {
                    let deadline = st.io.last_progress() + st.stall;
                    match flusher::register(tcp, self.clone(), deadline) {
                        Ok(()) => st.flushing = true,
                        Err(e) => {
                            log::error!("{}: {e}; closing the link", self.label);
                            self.live.close_because(e);
                            st.io.cut();
                            return Sent::Refused;
                        }
                    }
                }
                Sent::Left
            }
            Err(e) => {
                self.failed(st, e);
                Sent::Refused
            }
        }
    }

    fn failed(&self, st: &mut TxState, e: std::io::Error) {
        if !self.live.is_closed() && !st.io.is_closing() {
            log::warn!("{}: write failed: {e}; closing the link", self.label);
        }
        self.live.mark_closed();
        st.io.cut();
    }

    fn overflow(&self) {
        let mut st = self.lock();
        self.overflow_locked(&mut st);
    }

    fn overflow_locked(&self, st: &mut TxState) {
        let why = format!(
            "its outbound buffer is full ({} MiB unsent): it does not read what it is sent",
            self.limit >> 20
        );
        if !self.live.is_closed() {
            log::warn!("{}: {why}; closing the link", self.label);
        }
        self.live.close_because(why);
        st.io.cut();
    }

    /// Opens a gated link: `first` goes out, then what was held.
    pub(crate) fn open(self: &Arc<Self>, first: &[u8]) -> Sent {
        let mut st = self.lock();
        let held = st.held.take().unwrap_or_default();
        if !st.io.is_open() {
            return Sent::Refused;
        }
        self.queue_locked(&mut st, &[first, &held])
    }

    /// Holds what is sent from now until [`Tx::uncork`], to go out in one write.
    pub(crate) fn cork(&self) {
        self.lock().corked += 1;
    }

    /// Sends what was held since [`Tx::cork`].
    pub(crate) fn uncork(self: &Arc<Self>) {
        let mut st = self.lock();
        st.corked = st.corked.saturating_sub(1);
        if st.corked == 0 && st.io.pending() > 0 && !st.flushing {
            self.push_locked(&mut st);
        }
    }

    /// Closes the link cleanly: what is pending goes out, then close_notify, then the
    /// socket is shut down `how` (for the manager the write side: it reads on until the
    /// worker closes; for the worker both).
    pub(crate) fn close(self: &Arc<Self>, how: Shutdown) {
        let mut st = self.lock();
        st.held = None;
        st.io.close(how);
        if !st.flushing {
            self.push_locked(&mut st);
        }
    }

    /// Shuts the socket down now, both ways: the link's thread wakes and ends.
    pub(crate) fn cut(&self) {
        self.live.mark_closed();
        self.lock().io.cut();
    }

    /// The link has ended: cut, and the socket and TLS state let go of (nothing keeps
    /// the descriptor open, however long others hold this `Tx`).
    pub(crate) fn release(&self) {
        self.live.mark_closed();
        self.lock().io.release();
    }

    /// Runs `f` on the TLS state (to decrypt what arrived), then sends what that left
    /// to say (an alert).
    fn with_io<T>(self: &Arc<Self>, f: impl FnOnce(&mut Io) -> T) -> T {
        let mut st = self.lock();
        let r = f(&mut st.io);
        if st.io.pending() > 0 && !st.flushing && st.corked == 0 && st.held.is_none() {
            self.push_locked(&mut st);
        }
        r
    }

    /// For a link's own flusher: sends what is pending. `Done` when nothing is (the
    /// flusher lets go of the link), else when to look again; a peer that left bytes
    /// unread for the stall time gets its link cut.
    pub(crate) fn flush_pending(&self, now: Instant) -> Flushed {
        let mut st = self.lock();
        match st.io.push() {
            Ok(true) => {
                // Let go under the same lock that saw nothing pending: a sender that
                // finds the socket full after this registers the link anew.
                st.flushing = false;
                Flushed::Done
            }
            Ok(false) => {
                let deadline = st.io.last_progress() + st.stall;
                if now < deadline {
                    return Flushed::Waiting { deadline };
                }
                let why = format!(
                    "it read nothing of what it was sent for {:.1} s",
                    st.stall.as_secs_f64()
                );
                if !self.live.is_closed() {
                    log::warn!("{}: {why}; closing the link", self.label);
                }
                self.live.close_because(why);
                st.io.cut();
                st.flushing = false;
                Flushed::Done
            }
            Err(e) => {
                self.failed(&mut st, e);
                st.flushing = false;
                Flushed::Done
            }
        }
    }

    /// Whether the flusher has the link.
    pub(crate) fn is_flushing(&self) -> bool {
        self.lock().flushing
    }
}

impl Flush for Tx {
    fn flush(&self, now: Instant) -> Flushed {
        // A link with a flush target of its own (the worker's, which pulls the next
        // batch from its session as the socket drains) has it do the flushing, whenever
        // the link was registered.
        if let Some(target) = self.flush_with.get().and_then(Weak::upgrade) {
            return target.flush(now);
        }
        self.flush_pending(now)
    }
}

/// The sending end of a link for code that must never block on a peer (the manager's
/// dispatcher, job sinks, link threads): a message is written at once, as far as the
/// socket takes it, and the rest waits for the flusher. A peer that stops reading gets
/// its link closed (once [`PENDING_LIMIT`] bytes wait, or once it has read nothing for
/// the heartbeat timeout) instead of anyone waiting or the buffer growing.
pub(crate) struct Outbox<M> {
    tx: Arc<Tx>,
    _m: PhantomData<fn(M)>,
}

impl<M> Clone for Outbox<M> {
    fn clone(&self) -> Self {
        Outbox {
            tx: self.tx.clone(),
            _m: PhantomData,
        }
    }
}

impl<M: Serialize> Outbox<M> {
    pub(crate) fn new(tx: Arc<Tx>) -> Outbox<M> {
        Outbox {
            tx,
            _m: PhantomData,
        }
    }

    /// An outbox without a socket behind it (in-memory tests): what it is sent stays
    /// in its buffer for [`Outbox::take_sent`], up to `limit` bytes.
    #[cfg(test)]
    pub(crate) fn detached(live: Arc<Liveness>, limit: usize) -> Outbox<M> {
        Outbox::new(Tx::with_limit(
            Io::detached(),
            live,
            "test link".into(),
            false,
            limit,
        ))
    }

    /// Sends a message without blocking; false if it was not taken (the link is gone
    /// or closing, or was closed now because its peer reads nothing).
    pub(crate) fn send(&self, msg: M) -> bool {
        self.tx.send_with(|buf| protocol::encode_into(buf, &msg)) != Sent::Refused
    }

    /// Holds what is sent until [`Outbox::uncork`], so that messages sent together go
    /// out in one write.
    pub(crate) fn cork(&self) {
        self.tx.cork();
    }

    pub(crate) fn uncork(&self) {
        self.tx.uncork();
    }

    /// Sends what is pending and closes the link cleanly (the peer closes its side).
    pub(crate) fn close(&self) {
        self.tx.close(Shutdown::Write);
    }

    /// Shuts the link's socket down now.
    pub(crate) fn cut(&self) {
        self.tx.cut();
    }

    /// What a detached outbox was sent since the last look, and whether it was closed.
    #[cfg(test)]
    pub(crate) fn take_sent(&self) -> (Vec<M>, bool)
    where
        M: DeserializeOwned,
    {
        let mut st = self.tx.lock();
        let bytes = st.io.take_pending();
        let closing = st.io.is_closing();
        drop(st);
        let mut msgs = Vec::new();
        let mut at = 0;
        while at + 4 <= bytes.len() {
            let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            msgs.push(protocol::decode(&bytes[at + 4..at + 4 + len]).expect("a frame"));
            at += 4 + len;
        }
        (msgs, closing)
    }
}

/// A link's reading side, owned by the one thread that reads it: non-blocking reads of
/// what the socket holds, decrypted (under the [`Tx`]'s lock, which is never held across
/// a wait), and cut into whole frames.
pub(crate) struct Reader {
    tcp: Arc<TcpStream>,
    /// Ciphertext just read (its capacity is allocated on first use, and only what
    /// arrives is touched).
    raw: Vec<u8>,
    /// Plaintext, frames from `pos` on.
    plain: Vec<u8>,
    pos: usize,
    max_frame: usize,
    /// The stream has ended: cleanly (`Some(Ok)`) or not.
    end: Option<std::result::Result<(), std::io::ErrorKind>>,
}

/// What one [`Reader::fill`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fill {
    /// Bytes arrived; more may wait when the read filled its buffer.
    Got { full: bool },
    /// Nothing to read now.
    Nothing,
    /// The stream is over (after the frames still buffered).
    End,
}

impl Reader {
    fn new(tcp: Arc<TcpStream>, max_frame: usize) -> Reader {
        Reader {
            tcp,
            raw: Vec::new(),
            plain: Vec::new(),
            pos: 0,
            max_frame,
            end: None,
        }
    }

    /// The socket (for `poll`).
    pub(crate) fn socket(&self) -> &Arc<TcpStream> {
        &self.tcp
    }

    /// Changes the largest frame accepted from now on.
    pub(crate) fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Reads what the socket holds now (up to [`READ_CHUNK`]) and decrypts it.
    pub(crate) fn fill(&mut self, tx: &Arc<Tx>) -> Result<Fill> {
        if let Some(end) = self.end {
            return match end {
                Ok(()) => Ok(Fill::End),
                Err(kind) => Err(protocol::read_error(kind.into())),
            };
        }
        self.raw.clear();
        if self.raw.capacity() < READ_CHUNK {
            self.raw.reserve_exact(READ_CHUNK);
        }
        let n = loop {
            match tls::recv_now(&self.tcp, &mut self.raw) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Fill::Nothing),
                Err(e) => {
                    self.end = Some(Err(e.kind()));
                    return Err(protocol::read_error(e));
                }
            }
        };
        let plain = &mut self.plain;
        let fed = if n == 0 {
            tx.with_io(|io| io.feed_eof(plain).map(|()| true))
        } else {
            let raw = &self.raw;
            tx.with_io(|io| io.feed(raw, plain))
        };
        let full = n == READ_CHUNK;
        match fed {
            Ok(true) => {
                self.end = Some(Ok(()));
                Ok(Fill::Got { full })
            }
            Ok(false) => Ok(Fill::Got { full }),
            Err(e) => {
                self.end = Some(Err(e.kind()));
                Err(tls_read_error(e))
            }
        }
    }

    /// Whether the stream has ended cleanly (what is buffered is still to be read).
    pub(crate) fn ended(&self) -> bool {
        matches!(self.end, Some(Ok(())))
    }

    /// The next whole frame's body, if one has arrived.
    pub(crate) fn frame(&mut self) -> Result<Option<&[u8]>> {
        let avail = self.plain.len() - self.pos;
        if avail >= 4 {
            let head: [u8; 4] = self.plain[self.pos..self.pos + 4]
                .try_into()
                .unwrap_or([0; 4]);
            let len = u32::from_be_bytes(head) as usize;
            if len > self.max_frame {
                return Err(Error::Protocol(format!(
                    "frame of {len} bytes exceeds the limit of {} bytes",
                    self.max_frame
                )));
            }
            if avail >= 4 + len {
                let start = self.pos + 4;
                self.pos = start + len;
                return Ok(Some(&self.plain[start..start + len]));
            }
        }
        // Keep only the partial frame, at the front.
        if self.pos > 0 {
            self.plain.drain(..self.pos);
            self.pos = 0;
        }
        if self.plain.is_empty() && self.plain.capacity() > KEPT_PLAIN_CAPACITY {
            self.plain = Vec::new();
        }
        if self.ended() && !self.plain.is_empty() {
            return Err(Error::Protocol(format!(
                "connection closed inside a frame ({} bytes of it came)",
                self.plain.len()
            )));
        }
        Ok(None)
    }
}

fn tls_read_error(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::InvalidData {
        return Error::Tls(e.to_string());
    }
    protocol::read_error(e)
}

/// A connection after its handshakes.
pub(crate) struct Established {
    pub reader: Reader,
    pub tx: Arc<Tx>,
    /// The peer's certificate (DER), when TLS is on: the worker's identity.
    pub peer_cert: Option<Vec<u8>>,
    /// On the manager's side with TLS: which of its trust lists accepted the peer's
    /// certificate, that is the roles the peer may take. Otherwise any.
    pub peer_roles: PeerRoles,
}

/// Sets the socket options every link uses: no Nagle delay (frames are latency-bound)
/// and TCP keepalive as a backstop under the heartbeats.
pub(crate) fn tune_socket(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    #[cfg(target_os = "linux")]
    {
        let fd = tcp.as_raw_fd();
        // SAFETY: `value` is a live c_int whose size is the length passed; `fd` is the stream's own.
        let set = |level, name, value: libc::c_int| unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
    }
}

fn remaining(deadline: Instant, what: &str) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Error::Timeout(what.into()));
    }
    Ok(left)
}

impl Tx {
    /// Waits (in `poll`, sending as the socket takes more) until nothing is pending or
    /// `deadline` passes; true when all went out.
    pub(crate) fn wait_sent(self: &Arc<Self>, deadline: Instant) -> bool {
        loop {
            let tcp = {
                let mut st = self.lock();
                match st.io.push() {
                    Ok(true) => return true,
                    Ok(false) => {}
                    Err(e) => {
                        self.failed(&mut st, e);
                        return false;
                    }
                }
                match st.io.socket() {
                    Some(t) => t.clone(),
                    None => return false,
                }
            };
            match net::wait_ready(tcp.as_raw_fd(), libc::POLLOUT, Some(deadline)) {
                Ok(true) => {}
                _ => return false,
            }
        }
    }
}

/// Reads the first frame (a hello or its answer) before `deadline`, however the peer
/// spaces its bytes.
fn read_hello_frame(est: &mut Established, deadline: Instant) -> Result<Vec<u8>> {
    loop {
        if let Some(body) = est.reader.frame()? {
            return Ok(body.to_vec());
        }
        remaining(deadline, "hello")?;
        match est.reader.fill(&est.tx)? {
            Fill::Got { .. } => {}
            Fill::End => {
                return Err(Error::Protocol("connection closed before the hello".into()));
            }
            Fill::Nothing => {
                let fd = est.reader.socket().as_raw_fd();
                if !net::wait_ready(fd, libc::POLLIN, Some(deadline))
                    .map_err(|e| Error::io("waiting for the hello", e))?
                {
                    return Err(Error::Timeout("no hello before the deadline".into()));
                }
            }
        }
    }
}

fn establish(
    tcp: Arc<TcpStream>,
    conn: Option<Connection>,
    server: Option<&ServerTls>,
    deadline: Instant,
    label: String,
    gated: bool,
) -> Result<Established> {
    tune_socket(&tcp);
    let conn = match conn {
        Some(mut c) => {
            tls::handshake(&mut c, &tcp, deadline)?;
            Some(c)
        }
        None => None,
    };
    let chain = conn.as_ref().and_then(|c| c.peer_certificates());
    let peer_cert = chain
        .and_then(|certs| certs.first())
        .map(|c| c.as_ref().to_vec());
    let peer_roles = match server {
        Some(s) => s.peer_roles(chain.unwrap_or_default()),
        None => PeerRoles::ANY,
    };
    let mut io = Io::new(tcp.clone(), conn);
    let mut reader = Reader::new(tcp, MAX_HELLO);
    // The handshake's last read may have brought the first frames too (a hello sent
    // right behind the handshake): rustls holds them; take them out now, or no poll
    // would ever say they are there.
    if let Err(e) = io.feed(&[], &mut reader.plain) {
        return Err(tls_read_error(e));
    }
    Ok(Established {
        reader,
        tx: Tx::new(io, Liveness::new(), label, gated),
        peer_cert,
        peer_roles,
    })
}

/// A peer's hello: a worker's or a submitter's (the byte after the version says which).
#[derive(Debug)]
pub(crate) enum Hello {
    Worker(WorkerHello),
    Submitter(SubmitterHello),
}

/// Manager side: TLS handshake and the peer's hello, all before `deadline`, on a
/// socket that is already the caller's (`tcp`, shared so that the acceptor can cut it).
/// A peer of another protocol version is told so before the error is returned. The
/// link holds what is sent on it until [`welcome`].
pub(crate) fn accept(
    tcp: Arc<TcpStream>,
    tls: Option<&ServerTls>,
    deadline: Instant,
    label: String,
) -> Result<(Established, Hello)> {
    let conn = match tls {
        Some(t) => Some(Connection::Server(rustls::ServerConnection::new(
            t.config.clone(),
        )?)),
        None => None,
    };
    let mut est = establish(tcp, conn, tls, deadline, label, true)?;
    let body = read_hello_frame(&mut est, deadline)?;
    let (version, rest) = protocol::parse_hello(&body)?;
    if version != PROTOCOL_VERSION {
        let e = Error::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: version,
        };
        refuse(&est, &e.to_string());
        return Err(e);
    }
    let hello = match rest.split_first().map(|(b, r)| (Role::from_byte(*b), r)) {
        Some((Some(Role::Worker), r)) => Hello::Worker(protocol::decode(r)?),
        Some((Some(Role::Submitter), r)) => Hello::Submitter(protocol::decode(r)?),
        _ => {
            let e = Error::Protocol("the hello names no known role".into());
            refuse(&est, &e.to_string());
            return Err(e);
        }
    };
    Ok((est, hello))
}

const REPLY_WELCOME: u8 = 0;
const REPLY_REFUSED: u8 = 1;

/// Manager side: accepts the peer, switches the link to its working limits and opens
/// it (what was sent on it meanwhile follows the welcome).
pub(crate) fn welcome<W: Serialize>(
    est: &mut Established,
    welcome: &W,
    timing: Timing,
) -> Result<()> {
    let mut rest = vec![REPLY_WELCOME];
    protocol::encode_into(&mut rest, welcome)?;
    let mut frame = Vec::new();
    protocol::hello_frame_into(&mut frame, &rest);
    est.tx.set_stall(timing.heartbeat_timeout);
    if est.tx.open(&frame) == Sent::Refused {
        return Err(Error::Protocol("the link closed before the welcome".into()));
    }
    est.reader.set_max_frame(DEFAULT_MAX_FRAME);
    Ok(())
}

/// Manager side: refuses the worker with a reason it will log, and closes the link
/// (waiting a moment for the refusal to go out).
pub(crate) fn refuse(est: &Established, reason: &str) {
    let mut rest = vec![REPLY_REFUSED];
    rest.extend_from_slice(reason.as_bytes());
    let mut frame = Vec::new();
    protocol::hello_frame_into(&mut frame, &rest);
    est.tx.open(&frame);
    est.tx.close(Shutdown::Write);
    est.tx.wait_sent(Instant::now() + REFUSAL_WAIT);
    est.tx.release();
}

/// Worker or submitter side: connects, runs the TLS handshake, sends the hello (of
/// `role`) and reads the answer, all before `deadline`.
pub(crate) fn connect<H: Serialize, W: DeserializeOwned>(
    address: &str,
    server_name: &str,
    tls: Option<&Arc<ClientConfig>>,
    role: Role,
    hello: &H,
    deadline: Instant,
) -> Result<(Established, W)> {
    let addrs: Vec<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|e| Error::io(format!("resolving {address}"), e))?
        .collect();
    let mut last = None;
    let mut tcp = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, remaining(deadline, "connect")?) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let tcp = match tcp {
        Some(t) => t,
        None => {
            let e = last.unwrap_or_else(|| std::io::Error::other("no address"));
            return Err(Error::io(format!("connecting to {address}"), e));
        }
    };
    let conn = match tls {
        Some(cfg) => {
            let name = ServerName::try_from(server_name.to_string()).map_err(|_| {
                Error::InvalidConfig(format!("{server_name:?} is not a valid host name"))
            })?;
            Some(Connection::Client(rustls::ClientConnection::new(
                cfg.clone(),
                name,
            )?))
        }
        None => None,
    };
    let mut est = establish(
        Arc::new(tcp),
        conn,
        None,
        deadline,
        format!("manager {address}"),
        false,
    )?;
    let mut frame = Vec::new();
    protocol::role_hello_frame_into(&mut frame, role, hello)?;
    if est.tx.send_parts(&[&frame]) == Sent::Refused || !est.tx.wait_sent(deadline) {
        est.tx.release();
        return Err(Error::Timeout("sending the hello".into()));
    }
    let reply = read_hello_frame(&mut est, deadline).inspect_err(|_| est.tx.release())?;
    let (version, rest) = protocol::parse_hello(&reply)?;
    let refused = rest.first() == Some(&REPLY_REFUSED);
    if version != PROTOCOL_VERSION {
        let e = Error::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: version,
        };
        return Err(if refused {
            Error::Refused(format!("{e} ({})", String::from_utf8_lossy(&rest[1..])))
        } else {
            e
        });
    }
    match rest.split_first() {
        Some((&REPLY_WELCOME, welcome)) => {
            let welcome: W = protocol::decode(welcome.get(4..).unwrap_or_default())?;
            est.reader.set_max_frame(DEFAULT_MAX_FRAME);
            Ok((est, welcome))
        }
        Some((&REPLY_REFUSED, reason)) => {
            Err(Error::Refused(String::from_utf8_lossy(reason).into_owned()))
        }
        _ => Err(Error::Protocol("unreadable answer to the hello".into())),
    }
}

/// What [`drive`] does with each wake-up's messages.
pub(crate) struct Drive<'a, M> {
    /// The timing and grace the peer was told in the welcome.
    pub paced: Paced,
    /// Where the timing to use now comes from; when it is far enough from the one the
    /// peer was told, `announce` tells it the new one.
    pub pace: &'a Pace,
    pub announce: &'a dyn Fn(&Paced),
    pub beat: Beat,
    /// Sends this side's heartbeat.
    pub heartbeat: &'a dyn Fn(),
    /// Takes one message (not a heartbeat); false to stop reading.
    pub deliver: &'a mut dyn FnMut(M) -> bool,
}

/// Reads whatever frames the socket has now and hands each message on; heartbeats only
/// count as heard. A read that did not fill its buffer is taken as all there was (one
/// system call per wake-up for a small message: the next `poll` says if more came).
pub(crate) fn read_ready<M>(
    reader: &mut Reader,
    tx: &Arc<Tx>,
    deliver: &mut dyn FnMut(M) -> bool,
) -> Result<ReadReady>
where
    M: DeserializeOwned + Heartbeat,
{
    let mut heard = false;
    let mut more = true;
    loop {
        while let Some(body) = reader.frame()? {
            let msg: M = protocol::decode(body)?;
            heard = true;
            tx.live().touch();
            if msg.is_heartbeat() {
                continue;
            }
            if !deliver(msg) {
                return Ok(ReadReady { heard, open: false });
            }
        }
        if reader.ended() {
            return Ok(ReadReady { heard, open: false });
        }
        if !more {
            return Ok(ReadReady { heard, open: true });
        }
        match reader.fill(tx)? {
            Fill::Got { full } => more = full,
            Fill::End => {}
            Fill::Nothing => return Ok(ReadReady { heard, open: true }),
        }
    }
}

/// What one [`read_ready`] found.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReadReady {
    /// A frame arrived.
    pub heard: bool,
    /// The link goes on.
    pub open: bool,
}

/// Runs a live link on this thread until it ends: waits in `poll` for its socket or
/// the next deadline (a heartbeat to send, the peer's silence running out), reads and
/// hands on what came, and sends heartbeats as `beat` says. A peer silent for the
/// heartbeat timeout gets its link closed. `Ok(())` is a clean end.
pub(crate) fn drive<M>(reader: &mut Reader, tx: &Arc<Tx>, d: Drive<'_, M>) -> Result<()>
where
    M: DeserializeOwned + Heartbeat,
{
    let Drive {
        paced,
        pace,
        announce,
        beat,
        heartbeat,
        deliver,
    } = d;
    let mut paced = paced;
    // After a shorter timeout is announced, the old one still holds for as long as it
    // lasts: the peer may have been quiet by the old timing when the news reached it.
    let mut lenient: Option<(Instant, Duration)> = None;
    let mut stall = paced.timing.heartbeat_timeout;
    let live = tx.live().clone();
    live.touch();
    live.note_stretch(paced.grace.saturating_sub(pace.base().grace));
    let fd = reader.socket().as_raw_fd();
    // Frames that came with the hello (already read) are not announced by `poll`.
    if !read_ready(reader, tx, deliver)?.open {
        return Ok(());
    }
    loop {
        let now = Instant::now();
        let want = pace.now();
        if want.differs(&paced) && !tx.is_closing() {
            live.note_stretch(want.grace.saturating_sub(pace.base().grace));
            announce(&want);
            let old = paced.timing.heartbeat_timeout;
            if want.timing.heartbeat_timeout < old {
                // (Two shortenings in a row keep the longest timeout still owed.)
                lenient = Some(match lenient {
                    Some((until, owed)) => ((now + old).max(until), old.max(owed)),
                    None => (now + old, old),
                });
            }
            paced = want;
        }
        let timeout = match lenient {
            Some((until, old)) if now < until => old.max(paced.timing.heartbeat_timeout),
            _ => {
                lenient = None;
                paced.timing.heartbeat_timeout
            }
        };
        if timeout != stall {
            stall = timeout;
            tx.set_stall(stall);
        }
        let timing = paced.timing;
        let silent = live.silent_at(now);
        if silent > timeout {
            let why = format!(
                "nothing heard for {:.1} s (timeout {:.1} s)",
                silent.as_secs_f64(),
                timeout.as_secs_f64()
            );
            log::warn!("{}: {why}; closing the link", tx.label());
            live.close_because(why.clone());
            tx.cut();
            return Err(Error::Timeout(why));
        }
        if beat.due(timing, tx.last_tx(), now, false) && !tx.is_closing() {
            heartbeat();
        }
        let deadline = beat
            .next(timing, tx.last_tx())
            .min(now + timeout.saturating_sub(silent) + Duration::from_millis(1));
        let mut fds = [net::pollfd(fd, libc::POLLIN)];
        net::poll(&mut fds, Some(deadline)).map_err(|e| Error::io("waiting on a link", e))?;
        if fds[0].revents == 0 {
            continue;
        }
        let got = read_ready(reader, tx, deliver)?;
        if !got.open {
            return Ok(());
        }
        if got.heard && beat.due(timing, tx.last_tx(), Instant::now(), true) && !tx.is_closing() {
            heartbeat();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Paced {
        Paced {
            timing: Timing {
                heartbeat_interval: Duration::from_secs(1),
                heartbeat_timeout: Duration::from_secs(5),
            },
            grace: Duration::from_secs(10),
        }
    }

    #[test]
    fn heartbeats_are_stretched_to_keep_to_the_rate_and_the_grace_less_the_timeout_stays() {
        let b = base();
        // Up to the rate: the configured timing.
        assert_eq!(paced(b, 2000, 0), b);
        assert_eq!(paced(b, 2000, 2000), b);
        // No limit.
        assert_eq!(paced(b, 0, 1_000_000), b);
        // 10,000 workers at 2,000 a second: every 5 s, timed out after 25 s.
        let p = paced(b, 2000, 10_000);
        assert_eq!(p.timing.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(p.timing.heartbeat_timeout, Duration::from_secs(25));
        assert_eq!(p.grace, Duration::from_secs(34));
        assert_eq!(
            p.grace - p.timing.heartbeat_timeout - p.timing.heartbeat_interval,
            b.grace - b.timing.heartbeat_timeout - b.timing.heartbeat_interval
        );
        // Never past the longest timeout, the interval at most half of it.
        let p = paced(b, 1, 10_000_000);
        assert_eq!(p.timing.heartbeat_timeout, MAX_HEARTBEAT_TIMEOUT);
        assert_eq!(p.timing.heartbeat_interval, MAX_HEARTBEAT_TIMEOUT / 2);
        assert_eq!(
            p.grace,
            b.grace + MAX_HEARTBEAT_TIMEOUT - Duration::from_secs(5) + MAX_HEARTBEAT_TIMEOUT / 2
                - Duration::from_secs(1)
        );
        // What a worker adopts from it is what was announced.
        for n in [2001, 3000, 10_000, 123_456] {
            let p = paced(b, 2000, n);
            let ms = |d: Duration| d.as_millis() as u64;
            assert_eq!(
                Timing::adopted(
                    ms(p.timing.heartbeat_interval),
                    ms(p.timing.heartbeat_timeout)
                ),
                p.timing,
                "{n} links"
            );
            assert!(p.timing.heartbeat_interval * 2 <= p.timing.heartbeat_timeout);
        }
        // A quarter either way is news; less is not.
        assert!(!b.differs(&paced(b, 2000, 2400)));
        assert!(b.differs(&paced(b, 2000, 2600)));
        assert!(paced(b, 2000, 2600).differs(&b));
    }

    #[test]
    fn a_pace_counts_the_links_that_are_up() {
        let pace = Arc::new(Pace::new(base().timing, base().grace, 1));
        assert_eq!(pace.now(), base());
        let guards: Vec<PaceGuard> = (0..4).map(|_| pace.link_up()).collect();
        assert_eq!(pace.now().timing.heartbeat_interval, Duration::from_secs(4));
        drop(guards);
        assert_eq!(pace.now(), base());
        // An interval over half the timeout is used as a worker adopts it (half), so
        // that the answering side's beat keeps its promise.
        let t = Timing {
            heartbeat_interval: Duration::from_millis(3500),
            heartbeat_timeout: Duration::from_secs(5),
        };
        let pace = Pace::new(t, base().grace, 2000);
        assert_eq!(
            pace.base().timing.heartbeat_interval,
            Duration::from_millis(2500)
        );
        assert!(
            pace.base().timing.answer_after() + pace.base().timing.heartbeat_interval
                <= t.heartbeat_timeout * 3 / 4
        );
    }

    #[test]
    fn a_welcome_s_timing_is_made_sane_whatever_its_numbers() {
        let t = Timing::adopted(1000, 5000);
        assert_eq!(
            (t.heartbeat_interval, t.heartbeat_timeout),
            (Duration::from_secs(1), Duration::from_secs(5))
        );
        for (interval, timeout) in [
            (u64::MAX, u64::MAX),
            (0, 0),
            (u64::MAX, 0),
            (0, u64::MAX),
            (u64::MAX, 2000),
            (7000, 5000),
        ] {
            let t = Timing::adopted(interval, timeout);
            assert!(t.heartbeat_timeout <= MAX_HEARTBEAT_TIMEOUT, "{t:?}");
            assert!(t.heartbeat_interval >= MIN_HEARTBEAT_INTERVAL, "{t:?}");
            assert!(t.heartbeat_interval * 2 <= t.heartbeat_timeout, "{t:?}");
            // Deadlines built from it cannot overflow.
            let _ = Instant::now() + t.heartbeat_timeout + t.heartbeat_interval;
        }
        assert_eq!(
            Timing::adopted(u64::MAX, 2000).heartbeat_interval,
            Duration::from_secs(1)
        );
    }

    #[test]
    fn a_full_outbox_closes_the_link_instead_of_blocking_or_growing() {
        let live = Liveness::new();
        let out = Outbox::<u32>::detached(live.clone(), 12);
        assert!(out.send(1));
        assert!(out.clone().send(2));
        assert!(!live.is_closed());
        // Three 5-byte frames are more than 12 bytes: refused without blocking, and the
        // link closed with a reason.
        assert!(!out.send(3), "a full buffer refuses");
        assert!(live.is_closed());
        let why = live.reason().expect("a reason");
        assert!(why.contains("outbound buffer is full"), "{why}");
        assert!(why.contains("does not read"), "{why}");
        // Later reasons do not replace the first.
        live.close_because("something else".into());
        assert_eq!(live.reason().as_deref(), Some(why.as_str()));
        assert!(!out.send(4), "a link that is gone takes nothing");
    }

    #[test]
    fn a_corked_outbox_and_a_gated_link_keep_the_order() {
        let live = Liveness::new();
        let out = Outbox::<u32>::detached(live.clone(), 1 << 20);
        out.cork();
        assert!(out.send(1));
        assert!(out.send(2));
        out.uncork();
        assert!(out.send(3));
        assert_eq!(out.take_sent(), (vec![1, 2, 3], false));
        out.close();
        assert!(!out.send(4), "nothing after a close");
        assert!(out.take_sent().1);

        // A gated link: what is sent before it opens follows the opening frame.
        let tx = Tx::with_limit(Io::detached(), Liveness::new(), "t".into(), true, 1 << 20);
        let gated = Outbox::<u32>::new(tx.clone());
        assert!(gated.send(7));
        let mut frame = Vec::new();
        protocol::encode_into(&mut frame, &9u32).unwrap();
        assert_eq!(tx.send_parts(&[&frame[..2], &frame[2..]]), Sent::Out);
        assert_eq!(gated.take_sent(), (vec![], false));
        let mut first = Vec::new();
        protocol::encode_into(&mut first, &6u32).unwrap();
        assert_eq!(tx.open(&first), Sent::Left);
        assert!(gated.send(8));
        assert_eq!(gated.take_sent(), (vec![6, 7, 9, 8], false));
    }

    #[test]
    fn the_answering_side_hears_its_peer_beat_and_answers_in_time() {
        for (interval, timeout) in [(1000, 5000), (100, 1000), (3000, 6000), (10, 20)] {
            let t = Timing::adopted(interval, timeout);
            let e = t.answer_after();
            // Its peer hears from it well within the timeout.
            assert!(
                e + t.heartbeat_interval <= t.heartbeat_timeout * 3 / 4,
                "{t:?}"
            );
            let start = Instant::now();
            // The leading side beats every interval; the answering side answers the
            // first beat heard after `answer_after`, and never needs its own timer.
            let mut last_answer = start;
            let mut answers = 0;
            for k in 1..=20u32 {
                let now = start + t.heartbeat_interval * k;
                assert!(Beat::Lead.due(t, now - t.heartbeat_interval, now, false));
                if Beat::Answer.due(t, last_answer, now, true) {
                    assert!(now - last_answer <= e + t.heartbeat_interval, "{t:?}");
                    last_answer = now;
                    answers += 1;
                }
                assert!(
                    Beat::Answer.next(t, last_answer) > now,
                    "its own timer is later"
                );
            }
            assert!(
                answers
                    >= 20
                        / ((e + t.heartbeat_interval).as_millis()
                            / t.heartbeat_interval.as_millis()) as u32
            );
            // Unheard, it still beats by itself.
            assert!(Beat::Answer.due(t, start, Beat::Answer.next(t, start), false));
        }
    }

    /// A connected, handshaken (server, client) pair of links over loopback.
    fn connected() -> (Established, Established) {
        let pair = || {
            let g = tls::generate_self_signed(&["localhost", "127.0.0.1"]).unwrap();
            (
                tls::Identity::from_pem(g.cert_pem.as_bytes(), g.key_pem.as_bytes()).unwrap(),
                tls::TrustRoots::from_pem(g.cert_pem.as_bytes()).unwrap(),
            )
        };
        let (server_id, server_root) = pair();
        let (client_id, client_root) = pair();
        let sc = tls::server_config(&server_id, &client_root, &tls::PeerTrust::new()).unwrap();
        let cc = tls::client_config(&client_id, &server_root, true).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let server = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let conn =
                Connection::Server(rustls::ServerConnection::new(sc.config.clone()).unwrap());
            let est = establish(
                Arc::new(tcp),
                Some(conn),
                Some(&sc),
                deadline,
                "server".into(),
                false,
            )
            .unwrap();
            let worker_only = PeerRoles {
                worker: true,
                submitter: false,
            };
            assert_eq!(est.peer_roles, worker_only);
            est
        });
        let tcp = TcpStream::connect(addr).unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let conn = Connection::Client(rustls::ClientConnection::new(cc, name).unwrap());
        let client = establish(
            Arc::new(tcp),
            Some(conn),
            None,
            deadline,
            "client".into(),
            false,
        )
        .unwrap();
        let mut server = server.join().unwrap();
        let mut client = client;
        server.reader.set_max_frame(DEFAULT_MAX_FRAME);
        client.reader.set_max_frame(DEFAULT_MAX_FRAME);
        (server, client)
    }

    /// Sends `data` as frames of up to `piece` bytes, never waiting on the socket.
    fn send_frames(tx: &Arc<Tx>, data: &[u8], piece: usize) {
        for chunk in data.chunks(piece) {
            let head = (chunk.len() as u32).to_be_bytes();
            assert_ne!(tx.send_parts(&[&head, chunk]), Sent::Refused);
        }
    }

    /// Reads frames until `n` bytes of bodies came (or the stream ended); waits in poll.
    fn read_bytes(reader: &mut Reader, tx: &Arc<Tx>, n: usize) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut got = Vec::new();
        while got.len() < n {
            while let Some(body) = reader.frame().unwrap() {
                got.extend_from_slice(body);
            }
            if got.len() >= n || reader.ended() {
                break;
            }
            if reader.fill(tx).unwrap() == Fill::Nothing {
                let fd = reader.socket().as_raw_fd();
                assert!(
                    net::wait_ready(fd, libc::POLLIN, Some(deadline)).unwrap(),
                    "stalled"
                );
            }
        }
        got
    }

    /// Sends `data` as frames until the socket takes no more (nobody reads); sending
    /// never waits. Returns the payload bytes sent.
    fn send_until_left(tx: &Arc<Tx>, data: &[u8]) -> usize {
        let head = (data.len() as u32).to_be_bytes();
        let mut sent = 0;
        loop {
            let r = tx.send_parts(&[&head, data]);
            assert_ne!(r, Sent::Refused);
            sent += data.len();
            if r == Sent::Left {
                return sent;
            }
            assert!(sent < 256 << 20, "256 MiB went into a socket nobody reads");
        }
    }

    fn pattern(seed: usize, n: usize) -> Vec<u8> {
        (0..n).map(|i| ((i * seed) % 251) as u8).collect()
    }

    #[test]
    fn one_descriptor_carries_data_both_ways_at_once() {
        let (mut s, mut c) = connected();
        const N: usize = 8 << 20;
        let (a, b) = (pattern(31, N), pattern(7, N));
        let (stx, ctx) = (s.tx.clone(), c.tx.clone());
        // Each side sends 8 MiB in odd-sized frames, directly and through the flusher,
        // while its own thread reads (and decrypts, under the same lock).
        let (a2, b2) = (a.clone(), b.clone());
        let w1 = std::thread::spawn(move || send_frames(&stx, &a2, 100_003));
        let w2 = std::thread::spawn(move || send_frames(&ctx, &b2, 65_536));
        let (stx, ctx) = (s.tx.clone(), c.tx.clone());
        let r = std::thread::spawn(move || read_bytes(&mut c.reader, &ctx, N));
        let got_s = read_bytes(&mut s.reader, &stx, N);
        let got_c = r.join().unwrap();
        w1.join().unwrap();
        w2.join().unwrap();
        assert!(got_s == b, "the server read what the client sent, in order");
        assert!(got_c == a, "the client read what the server sent, in order");
    }

    #[test]
    fn what_a_full_socket_left_goes_out_in_order_without_anyone_waiting() {
        let (mut s, c) = connected();
        let data = pattern(13, 200_000);
        // Nobody reads yet: frames are sent until the socket takes no more; sending
        // never waits.
        let sent = send_until_left(&c.tx, &data);
        assert!(c.tx.pending() > 0);
        // The flusher sends the rest as the reader makes room: all of it, once, in order.
        let got = read_bytes(&mut s.reader, &s.tx.clone(), sent);
        assert_eq!(got.len(), sent);
        assert!(got.chunks(data.len()).all(|c| c == &data[..]));
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.tx.pending() > 0 || c.tx.is_flushing() {
            assert!(Instant::now() < deadline, "the flusher kept the link");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_sender_that_finds_the_socket_full_just_after_the_flusher_let_go_is_flushed() {
        // The order that used to lose bytes: the flusher finds nothing pending and lets
        // go, and before it says so another sender finds the socket full.
        let (mut s, c) = connected();
        c.tx.lock().flushing = true; // as the flusher holds a link
        assert!(matches!(c.tx.flush_pending(Instant::now()), Flushed::Done));
        let sent = send_until_left(&c.tx, &pattern(7, 200_000));
        assert!(
            c.tx.is_flushing(),
            "bytes are left and the flusher has the link"
        );
        let got = read_bytes(&mut s.reader, &s.tx.clone(), sent);
        assert_eq!(got.len(), sent, "every byte arrives");
    }

    #[test]
    fn a_peer_that_reads_nothing_is_cut_once_the_stall_time_passes() {
        let (_s, c) = connected();
        c.tx.set_stall(Duration::from_millis(200));
        let data = pattern(3, 1 << 20);
        let head = (data.len() as u32).to_be_bytes();
        // Until the kernel's buffers are full and more waits than they could take.
        let mut sent = 0;
        while c.tx.pending() < 4 << 20 {
            assert_ne!(c.tx.send_parts(&[&head, &data]), Sent::Refused);
            sent += 1;
            assert!(sent < 256, "256 MiB went into a socket nobody reads");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.tx.live().is_closed() {
            assert!(Instant::now() < deadline, "never cut");
            std::thread::yield_now();
        }
        let why = c.tx.live().reason().unwrap();
        assert!(why.contains("read nothing"), "{why}");
        assert!(c.tx.is_closing());
        assert_eq!(c.tx.send_parts(&[b"x"]), Sent::Refused);
    }

    #[test]
    fn a_clean_close_ends_the_stream_and_a_cut_is_an_unexpected_eof() {
        let (mut s, c) = connected();
        send_frames(&c.tx, b"last words", 100);
        c.tx.close(Shutdown::Write);
        assert_eq!(read_bytes(&mut s.reader, &s.tx.clone(), 100), b"last words");
        assert!(s.reader.ended());
        assert!(s.reader.frame().unwrap().is_none());

        let (mut s, c) = connected();
        c.tx.release();
        let deadline = Instant::now() + Duration::from_secs(30);
        let err = loop {
            match s.reader.fill(&s.tx) {
                Ok(Fill::Nothing) => {
                    let fd = s.reader.socket().as_raw_fd();
                    assert!(net::wait_ready(fd, libc::POLLIN, Some(deadline)).unwrap());
                }
                Ok(other) => panic!("{other:?}"),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("no TLS close_notify"), "{err}");
    }
}
