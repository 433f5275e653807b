//! workpool runs shell commands on a pool of remote workers.
//!
//! A [`Manager`] listens on one port. [`Worker`]s dial out to it over mutual TLS (so
//! they work behind NAT), say who they are (name, tags, platform, slots) and take work.
//! Each job is `/bin/bash -c SCRIPT`, run in a fresh private temp folder that is deleted
//! afterwards; its stdout and stderr stream back while it runs, then its exit status.
//! Jobs wait in the manager's queue until a matching worker has a free slot, and every
//! submitted job ends exactly once with one [`Outcome`].
//!
//! ```
//! use workpool::{JobSpec, Manager, ManagerConfig, Outcome, Worker, WorkerConfig};
//! use workpool::tls::{self, Identity, PeerTrust};
//!
//! # fn main() -> workpool::Result<()> {
//! // Certificates for a manager and one worker, valid for 10 years; each side pins the
//! // other's (a pinned certificate is accepted only as itself).
//! let m = tls::generate_manager_certificate(&["localhost", "127.0.0.1"], 3650)?;
//! let w = tls::generate_worker_certificate(&["worker-0"], 3650)?;
//!
//! let manager = Manager::bind(ManagerConfig::new(
//!     "127.0.0.1:0",
//!     Identity::from_pem(m.cert_pem.as_bytes(), m.key_pem.as_bytes())?,
//!     PeerTrust::pinned_pem(w.cert_pem.as_bytes())?,
//! ))?;
//! let _worker = Worker::start(
//!     WorkerConfig::new(
//!         "127.0.0.1",
//!         manager.local_addr().port(),
//!         Identity::from_pem(w.cert_pem.as_bytes(), w.key_pem.as_bytes())?,
//!         PeerTrust::pinned_pem(m.cert_pem.as_bytes())?,
//!     )
//!     .name("worker-0"),
//! )?;
//!
//! // Queued until the worker has joined, then run there.
//! let result = manager.submit(JobSpec::new("echo hello from $WORKPOOL_JOB_ID"))?.wait();
//! assert_eq!(result.outcome, Outcome::Exited(0));
//! assert_eq!(result.stdout_text(), "hello from 1\n");
//! manager.shutdown();
//! # Ok(())
//! # }
//! ```
//!
//! See `docs/ARCHITECTURE.md` for how it is built, `docs/PROTOCOL.md` for the wire
//! format and `docs/SECURITY.md` for what the TLS setup does and does not protect.

#![warn(missing_docs)]

pub mod client;
pub mod error;
pub mod ffi;
pub(crate) mod flusher;
pub mod job;
pub(crate) mod journal;
pub(crate) mod link;
pub mod manager;
pub mod metrics;
pub(crate) mod net;
pub mod protocol;
pub(crate) mod random;
pub(crate) mod stdin;
pub(crate) mod sync;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;
pub(crate) mod thread;
pub mod tls;
pub mod worker;

pub use client::{Client, ClientConfig, ClientSecurity, RemoteJob};
pub use error::{Error, Result};
pub use job::{
    JobEvent, JobId, JobResult, JobSpec, JobState, JobStatus, Outcome, Requirements, Stream,
};
pub use manager::{JobHandle, Manager, ManagerConfig, ManagerEvent, ManagerSecurity, WorkerInfo};
pub use stdin::JobStdin;
pub use worker::{Worker, WorkerConfig, WorkerSecurity};
