//! One established connection between a manager and a worker, seen from either side:
//! the connect/accept handshakes (TLS + hello under one deadline), the writer thread
//! (the only writer to the socket, batching messages and sending heartbeats), and the
//! reader loop (decoding frames, noting liveness). It knows messages, not jobs.

use crate::error::{Error, Result};
use crate::protocol::{
    self, DEFAULT_MAX_FRAME, FrameReader, Heartbeat, PROTOCOL_VERSION, Welcome, WorkerHello,
};
use crate::tls::{self, Closer, ReadHalf, WriteHalf};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, Connection, ServerConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Hello frames are small; anything larger before the handshake ends is hostile.
const MAX_HELLO: usize = 64 * 1024;
/// A writer gathers queued messages into one socket write up to about this size.
const BATCH_BYTES: usize = 60_000;

/// Timing of a link, decided by the manager and adopted by the worker.
#[derive(Clone, Copy, Debug)]
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

/// What a link's writer thread is told to do.
pub(crate) enum Outbound<M> {
    /// Send this message.
    Message(M),
    /// Send what is queued, then close the stream cleanly.
    Close,
}

/// Shared by a link's two threads: when a frame last arrived, and whether the link is
/// being closed. (The reader never blocks on anything but the socket, so silence is
/// always the peer's.)
pub(crate) struct Liveness {
    epoch: Instant,
    last_rx_ms: AtomicU64,
    closed: AtomicBool,
    /// Why this side closed the link, when it did so on purpose (the first reason wins).
    reason: Mutex<Option<String>>,
}

impl Liveness {
    pub(crate) fn new() -> Arc<Liveness> {
        Arc::new(Liveness {
            epoch: Instant::now(),
            last_rx_ms: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            reason: Mutex::new(None),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_rx_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// How long since the last frame arrived.
    pub(crate) fn silent_for(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_rx_ms.load(Ordering::Relaxed)),
        )
    }

    /// How long, at `now`, since the last frame arrived (for callers that are given the
    /// time rather than read the clock).
    pub(crate) fn silent_at(&self, now: Instant) -> Duration {
        let last = self.epoch + Duration::from_millis(self.last_rx_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    pub(crate) fn stale(&self, timeout: Duration) -> bool {
        self.silent_for() > timeout
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

/// The sending end of a link's bounded outbound queue, for code that must never block
/// on a peer (the manager's dispatcher, job sinks, link readers). When the queue is full
/// — the peer has stopped reading — the link is closed instead of waiting or growing.
pub(crate) struct Outbox<M> {
    tx: Sender<Outbound<M>>,
    live: Arc<Liveness>,
    closer: Option<Closer>,
}

impl<M> Clone for Outbox<M> {
    fn clone(&self) -> Self {
        Outbox {
            tx: self.tx.clone(),
            live: self.live.clone(),
            closer: self.closer.clone(),
        }
    }
}

impl<M> Outbox<M> {
    /// An outbox in front of `tx` that closes the link through `closer` when full.
    pub(crate) fn new(tx: Sender<Outbound<M>>, live: Arc<Liveness>, closer: Closer) -> Outbox<M> {
        Outbox {
            tx,
            live,
            closer: Some(closer),
        }
    }

    /// An outbox without a socket behind it (in-memory tests): when full it only marks
    /// the link closed.
    #[cfg(test)]
    pub(crate) fn detached(tx: Sender<Outbound<M>>, live: Arc<Liveness>) -> Outbox<M> {
        Outbox {
            tx,
            live,
            closer: None,
        }
    }

    /// Queues a message without blocking; false if it was not queued (the link is gone,
    /// or its queue was full and the link is now being closed).
    pub(crate) fn send(&self, msg: M) -> bool {
        self.queue(Outbound::Message(msg))
    }

    /// Asks the writer to send what is queued and close the link cleanly (at once, if
    /// the queue is full).
    pub(crate) fn close(&self) {
        self.queue(Outbound::Close);
    }

    fn queue(&self, item: Outbound<M>) -> bool {
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(TrySendError::Disconnected(_)) => false,
            Err(TrySendError::Full(_)) => {
                let cap = self.tx.capacity().unwrap_or_default();
                self.live.close_because(format!(
                    "its outbound queue is full ({cap} messages): it does not read what it is sent"
                ));
                if let Some(c) = &self.closer {
                    c.close();
                }
                false
            }
        }
    }
}

/// A connection after its handshakes, ready to be driven by a reader and a writer.
pub(crate) struct Established {
    pub reader: FrameReader<ReadHalf>,
    pub writer: WriteHalf,
    pub closer: Closer,
    /// The peer's certificate (DER), when TLS is on: the worker's identity.
    pub peer_cert: Option<Vec<u8>>,
}

/// Sets the socket options every link uses: no Nagle delay (frames are latency-bound)
/// and TCP keepalive as a backstop under the heartbeats.
pub(crate) fn tune_socket(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
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

/// Reads the first frame (a hello or its answer) before `deadline`: every socket read it
/// takes gets the time left, so a peer that trickles its bytes is cut at the deadline.
fn read_hello_frame(reader: &mut FrameReader<ReadHalf>, deadline: Instant) -> Result<Vec<u8>> {
    remaining(deadline, "hello")?;
    reader.get_mut().set_deadline(Some(deadline));
    let read = reader.read_frame();
    reader.get_mut().set_deadline(None);
    match read {
        Ok(Some(body)) => Ok(body),
        Ok(None) => Err(Error::Protocol("connection closed before the hello".into())),
        Err(Error::Io { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(Error::Timeout("no hello before the deadline".into()))
        }
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::InvalidData => {
            Err(Error::Tls(source.to_string()))
        }
        Err(e) => Err(e),
    }
}

fn establish(
    mut tcp: TcpStream,
    conn: Option<Connection>,
    deadline: Instant,
) -> Result<Established> {
    tune_socket(&tcp);
    let conn = match conn {
        Some(mut c) => {
            tls::handshake(&mut c, &mut tcp, deadline)?;
            Some(c)
        }
        None => None,
    };
    let peer_cert = conn
        .as_ref()
        .and_then(|c| c.peer_certificates())
        .and_then(|certs| certs.first())
        .map(|c| c.as_ref().to_vec());
    let (read, writer, closer) =
        tls::split(tcp, conn).map_err(|e| Error::io("splitting the connection", e))?;
    Ok(Established {
        reader: FrameReader::new(read, MAX_HELLO),
        writer,
        closer,
        peer_cert,
    })
}

/// Manager side: TLS handshake and the worker's hello, all before `deadline`.
/// A peer of another protocol version is told so before the error is returned.
pub(crate) fn accept(
    tcp: TcpStream,
    tls: Option<&Arc<ServerConfig>>,
    deadline: Instant,
) -> Result<(Established, WorkerHello)> {
    let conn = match tls {
        Some(cfg) => Some(Connection::Server(rustls::ServerConnection::new(
            cfg.clone(),
        )?)),
        None => None,
    };
    let mut est = establish(tcp, conn, deadline)?;
    let body = read_hello_frame(&mut est.reader, deadline)?;
    let (version, rest) = protocol::parse_hello(&body)?;
    if version != PROTOCOL_VERSION {
        let e = Error::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: version,
        };
        refuse(&mut est.writer, &e.to_string());
        return Err(e);
    }
    let hello: WorkerHello = protocol::decode(rest)?;
    Ok((est, hello))
}

const REPLY_WELCOME: u8 = 0;
const REPLY_REFUSED: u8 = 1;

/// Manager side: accepts the worker and switches the link to its working limits.
pub(crate) fn welcome(est: &mut Established, welcome: &Welcome) -> Result<()> {
    let mut rest = vec![REPLY_WELCOME];
    protocol::encode_into(&mut rest, welcome)?;
    let mut frame = Vec::new();
    protocol::hello_frame_into(&mut frame, &rest);
    est.writer
        .write_all(&frame)
        .map_err(|e| Error::io("sending the welcome", e))?;
    est.reader.set_max_frame(DEFAULT_MAX_FRAME);
    Ok(())
}

/// Manager side: refuses the worker with a reason it will log.
pub(crate) fn refuse(writer: &mut WriteHalf, reason: &str) {
    let mut rest = vec![REPLY_REFUSED];
    rest.extend_from_slice(reason.as_bytes());
    let mut frame = Vec::new();
    protocol::hello_frame_into(&mut frame, &rest);
    let _ = writer.write_all(&frame);
    writer.close();
}

/// Worker side: connects, runs the TLS handshake, sends the hello and reads the answer,
/// all before `deadline`.
pub(crate) fn connect(
    address: &str,
    server_name: &str,
    tls: Option<&Arc<ClientConfig>>,
    hello: &WorkerHello,
    deadline: Instant,
) -> Result<(Established, Welcome)> {
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
    let mut est = establish(tcp, conn, deadline)?;
    let mut body = Vec::new();
    protocol::encode_into(&mut body, hello)?;
    let mut frame = Vec::new();
    protocol::hello_frame_into(&mut frame, &body[4..]);
    tls::set_timeouts(
        est.reader.get_ref().tcp(),
        Some(remaining(deadline, "hello")?),
    )?;
    est.writer
        .write_all(&frame)
        .map_err(|e| Error::io("sending the hello", e))?;
    let reply = read_hello_frame(&mut est.reader, deadline)?;
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
            let welcome: Welcome = protocol::decode(welcome.get(4..).unwrap_or_default())?;
            est.reader.set_max_frame(DEFAULT_MAX_FRAME);
            Ok((est, welcome))
        }
        Some((&REPLY_REFUSED, reason)) => {
            Err(Error::Refused(String::from_utf8_lossy(reason).into_owned()))
        }
        _ => Err(Error::Protocol("unreadable answer to the hello".into())),
    }
}

/// Prepares a link for work: no read timeout (the heartbeat clock decides), and a write
/// timeout so that a peer that stops reading cannot block the writer forever.
pub(crate) fn go_live(est: &Established, timing: Timing) -> Result<()> {
    let tcp = est.reader.get_ref().tcp();
    tcp.set_read_timeout(None)
        .and_then(|()| tcp.set_write_timeout(Some(timing.heartbeat_timeout)))
        .map_err(|e| Error::io("setting socket timeouts", e))
}

/// Starts a link's writer thread: it sends what arrives on `rx` (batched), a heartbeat
/// when it has been quiet for an interval, and closes the link when the peer has been
/// silent for the timeout.
pub(crate) fn spawn_writer<M>(
    label: String,
    mut writer: WriteHalf,
    closer: Closer,
    rx: Receiver<Outbound<M>>,
    live: Arc<Liveness>,
    timing: Timing,
) -> std::io::Result<JoinHandle<()>>
where
    M: Serialize + Heartbeat + Send + 'static,
{
    crate::thread::relay("wp-link-writer", move || {
        let mut buf = Vec::with_capacity(BATCH_BYTES + 1024);
        let mut last_tx = Instant::now();
        loop {
            let wait = timing.heartbeat_interval.saturating_sub(last_tx.elapsed());
            let mut closing = false;
            buf.clear();
            match rx.recv_timeout(wait) {
                Ok(Outbound::Message(m)) => {
                    encode_or_log(&mut buf, &m, &label);
                    while buf.len() < BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(Outbound::Message(m)) => encode_or_log(&mut buf, &m, &label),
                            Ok(Outbound::Close) => {
                                closing = true;
                                break;
                            }
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => {
                                closing = true;
                                break;
                            }
                        }
                    }
                }
                Ok(Outbound::Close) | Err(RecvTimeoutError::Disconnected) => closing = true,
                Err(RecvTimeoutError::Timeout) => encode_or_log(&mut buf, &M::heartbeat(), &label),
            }
            if !buf.is_empty() {
                if let Err(e) = writer.write_all(&buf) {
                    if !live.is_closed() {
                        log::warn!("{label}: write failed: {e}; closing the link");
                    }
                    break;
                }
                last_tx = Instant::now();
            }
            if closing {
                writer.close();
                return;
            }
            if live.stale(timing.heartbeat_timeout) {
                log::warn!(
                    "{label}: nothing heard for {:.1} s (timeout {:.1} s); closing the link",
                    live.silent_for().as_secs_f64(),
                    timing.heartbeat_timeout.as_secs_f64()
                );
                break;
            }
        }
        live.mark_closed();
        closer.close();
    })
}

fn encode_or_log<M: Serialize>(buf: &mut Vec<u8>, m: &M, label: &str) {
    if let Err(e) = protocol::encode_into(buf, m) {
        log::error!("{label}: dropping a message that cannot be encoded: {e}");
    }
}

/// Reads messages until the stream ends or fails, handing each to `deliver` (heartbeats
/// only refresh liveness). `deliver` returns false to stop. `Ok(())` is a clean close.
pub(crate) fn read_messages<M>(
    reader: &mut FrameReader<ReadHalf>,
    live: &Liveness,
    mut deliver: impl FnMut(M) -> bool,
) -> Result<()>
where
    M: DeserializeOwned + Heartbeat,
{
    live.touch();
    loop {
        let Some(body) = reader.read_frame()? else {
            return Ok(());
        };
        live.touch();
        let msg: M = protocol::decode(&body)?;
        if msg.is_heartbeat() {
            continue;
        }
        if !deliver(msg) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::bounded;

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
        let (tx, rx) = bounded::<Outbound<u32>>(2);
        let live = Liveness::new();
        let out = Outbox::detached(tx, live.clone());
        assert!(out.send(1));
        assert!(out.clone().send(2));
        assert!(!live.is_closed());
        assert!(!out.send(3), "a full queue refuses without blocking");
        assert!(live.is_closed());
        let why = live.reason().expect("a reason");
        assert!(why.contains("outbound queue is full (2 messages)"), "{why}");
        // Later reasons do not replace the first.
        live.close_because("something else".into());
        assert_eq!(live.reason().as_deref(), Some(why.as_str()));
        assert_eq!(rx.len(), 2);
        drop(rx);
        assert!(!out.send(4), "a link that is gone takes nothing");
    }
}
