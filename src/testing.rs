//! Protocol peers driven by hand, for tests that play a worker, a submitter or a
//! manager speaking the protocol wrongly (`tests/misbehaving.rs`), or with the wrong
//! certificate (`tests/certificates.rs`). Only built with the `testing` feature,
//! which the crate's own tests turn on; not part of the API for normal use.
//!
//! The handshakes are the real ones (`link::connect`, `link::accept`, `link::welcome`):
//! TLS with the given certificates, the hello and the welcome. After that the test
//! decides every frame: a [`RawReader`] and a [`RawWriter`] over the connection,
//! usable from two threads at once.

use crate::error::{Error, Result};
use crate::link::{self, Established, Fill, Reader, Sent, Tx};
use crate::protocol::{self, SubmitterHello, SubmitterWelcome, Welcome, WorkerHello};
use crate::tls::{self, Identity, TrustRoots};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a hand-driven peer waits for its socket to take what it sends.
const SEND_WAIT: Duration = Duration::from_secs(60);

/// The reading half of a hand-driven link.
pub struct RawReader {
    reader: Reader,
    tx: Arc<Tx>,
    timeout: std::cell::Cell<Option<Duration>>,
}

impl RawReader {
    /// The next message, heartbeats included; `Ok(None)` when the peer closed cleanly.
    /// Waits at most the read timeout (then an `Io` error of kind `TimedOut`).
    pub fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>> {
        let deadline = self.timeout.get().map(|t| Instant::now() + t);
        loop {
            if let Some(body) = self.reader.frame()? {
                return protocol::decode(body).map(Some);
            }
            if self.reader.ended() {
                return Ok(None);
            }
            match self.reader.fill(&self.tx)? {
                Fill::Got { .. } | Fill::End => {}
                Fill::Nothing => {
                    let fd = self.reader.socket().as_raw_fd();
                    let ready = crate::net::wait_ready(fd, libc::POLLIN, deadline)
                        .map_err(|e| Error::io("waiting to read", e))?;
                    if !ready {
                        return Err(Error::io(
                            "reading from the peer",
                            std::io::ErrorKind::TimedOut.into(),
                        ));
                    }
                }
            }
        }
    }

    /// Sets how long [`RawReader::recv`] waits (`None`: without end).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.timeout.set(timeout);
        Ok(())
    }
}

/// The writing half of a hand-driven link.
pub struct RawWriter {
    tx: Arc<Tx>,
}

impl RawWriter {
    /// Sends one message as a frame.
    pub fn send<M: Serialize>(&mut self, msg: &M) -> std::io::Result<()> {
        let mut frame = Vec::new();
        protocol::encode_into(&mut frame, msg).map_err(std::io::Error::other)?;
        self.send_raw(&frame)
    }

    /// Sends bytes as they are (frames made by hand), waiting (up to a minute) for the
    /// socket to take them.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.tx.send_parts(&[bytes]) == Sent::Refused {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        if !self.tx.wait_sent(Instant::now() + SEND_WAIT) {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        Ok(())
    }

    /// Cuts the connection both ways at once (no goodbye).
    pub fn cut(&self) {
        self.tx.cut();
    }
}

fn halves(est: Established) -> (RawReader, RawWriter) {
    // A peer driven by hand may leave what it is sent unread for as long as it likes.
    est.tx.set_stall(Duration::from_secs(24 * 3600));
    (
        RawReader {
            reader: est.reader,
            tx: est.tx.clone(),
            timeout: std::cell::Cell::new(None),
        },
        RawWriter { tx: est.tx },
    )
}

/// Joins a manager as a worker: TLS with `identity` (checking the manager against
/// `manager_roots` and `server_name`), then `hello`. Returns the welcome and the link, or
/// the manager's refusal as [`crate::Error::Refused`].
pub fn connect_worker(
    address: &str,
    server_name: &str,
    identity: &Identity,
    manager_roots: &TrustRoots,
    hello: &WorkerHello,
    timeout: Duration,
) -> Result<(Welcome, RawReader, RawWriter)> {
    let tls = tls::client_config(identity, manager_roots, true)?;
    let (est, welcome) = link::connect(
        address,
        server_name,
        Some(&tls),
        crate::protocol::Role::Worker,
        hello,
        Instant::now() + timeout,
    )?;
    let (r, w) = halves(est);
    Ok((welcome, r, w))
}

/// Joins a manager as a submitter: TLS with `identity` (checking the manager against
/// `manager_roots` and `server_name`), then `hello`. Returns the welcome and the link, or
/// the manager's refusal as [`crate::Error::Refused`].
pub fn connect_submitter(
    address: &str,
    server_name: &str,
    identity: &Identity,
    manager_roots: &TrustRoots,
    hello: &SubmitterHello,
    timeout: Duration,
) -> Result<(SubmitterWelcome, RawReader, RawWriter)> {
    let tls = tls::client_config(identity, manager_roots, true)?;
    let (est, welcome) = link::connect(
        address,
        server_name,
        Some(&tls),
        crate::protocol::Role::Submitter,
        hello,
        Instant::now() + timeout,
    )?;
    let (r, w) = halves(est);
    Ok((welcome, r, w))
}

/// Accepts a worker as a manager would: TLS with `identity` (the worker's certificate
/// checked against `worker_roots`) and its hello, answered with `welcome` whatever it
/// says. Returns the hello and the link.
pub fn accept_worker(
    tcp: TcpStream,
    identity: &Identity,
    worker_roots: &TrustRoots,
    welcome: &Welcome,
    timeout: Duration,
) -> Result<(WorkerHello, RawReader, RawWriter)> {
    let tls = tls::server_config(identity, worker_roots, &TrustRoots::new())?;
    let (mut est, hello) = link::accept(
        Arc::new(tcp),
        Some(&tls),
        Instant::now() + timeout,
        "test worker".into(),
    )?;
    let link::Hello::Worker(hello) = hello else {
        return Err(crate::Error::Protocol("the peer is not a worker".into()));
    };
    let timing = link::Timing {
        heartbeat_interval: Duration::from_secs(3600),
        heartbeat_timeout: Duration::from_secs(24 * 3600),
    };
    link::welcome(&mut est, welcome, timing)?;
    let (r, w) = halves(est);
    Ok((hello, r, w))
}
