//! Protocol peers driven by hand, for tests that play a worker or a manager speaking
//! the protocol wrongly (`tests/misbehaving.rs`). Only built with the `testing` feature,
//! which the crate's own tests turn on; not part of the API for normal use.
//!
//! The handshakes are the real ones (`link::connect`, `link::accept`, `link::welcome`):
//! TLS with the given certificates, the hello and the welcome. After that the test
//! decides every frame: a [`RawReader`] and a [`RawWriter`] over the two halves of the
//! connection, usable from two threads at once.

use crate::error::Result;
use crate::link::{self, Established};
use crate::protocol::{self, FrameReader, Welcome, WorkerHello};
use crate::tls::{self, Closer, Identity, ReadHalf, TrustRoots, WriteHalf};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The reading half of a hand-driven link.
pub struct RawReader {
    inner: FrameReader<ReadHalf>,
}

impl RawReader {
    /// The next message, heartbeats included; `Ok(None)` when the peer closed cleanly.
    pub fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>> {
        match self.inner.read_frame()? {
            Some(body) => protocol::decode(&body).map(Some),
            None => Ok(None),
        }
    }

    /// Sets the socket's read timeout (`None`: block).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.inner.get_ref().tcp().set_read_timeout(timeout)
    }
}

/// The writing half of a hand-driven link.
pub struct RawWriter {
    inner: WriteHalf,
    closer: Closer,
}

impl RawWriter {
    /// Sends one message as a frame.
    pub fn send<M: Serialize>(&mut self, msg: &M) -> std::io::Result<()> {
        let mut frame = Vec::new();
        protocol::encode_into(&mut frame, msg).map_err(std::io::Error::other)?;
        self.inner.write_all(&frame)
    }

    /// Sends bytes as they are (frames made by hand).
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(bytes)
    }

    /// Cuts the connection both ways at once (no goodbye).
    pub fn cut(&self) {
        self.closer.close();
    }
}

fn halves(est: Established) -> (RawReader, RawWriter) {
    (
        RawReader { inner: est.reader },
        RawWriter {
            inner: est.writer,
            closer: est.closer,
        },
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
        hello,
        Instant::now() + timeout,
    )?;
    est.reader
        .get_ref()
        .tcp()
        .set_read_timeout(None)
        .map_err(|e| crate::Error::io("setting a read timeout", e))?;
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
    let tls = tls::server_config(identity, worker_roots)?;
    let (mut est, hello) = link::accept(tcp, Some(&tls), Instant::now() + timeout)?;
    link::welcome(&mut est, welcome)?;
    est.reader
        .get_ref()
        .tcp()
        .set_read_timeout(None)
        .map_err(|e| crate::Error::io("setting a read timeout", e))?;
    let (r, w) = halves(est);
    Ok((hello, r, w))
}
