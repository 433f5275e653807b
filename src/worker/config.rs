//! A worker's settings: where the manager is, how the link is secured, what the worker
//! announces, and the limits of its connect loop and job runs. Checked once, by
//! [`Worker::start`](super::Worker::start); nothing here starts anything.

use super::executor;
use super::job_user::JobUser;
use crate::error::{Error, Result};
use crate::tls::{Identity, PeerTrust};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

/// The longest grace or timeout taken from a configuration or a welcome (longer ones
/// are refused or cut to it), so that no deadline built from one can overflow.
pub(crate) const MAX_GRACE: Duration = Duration::from_secs(365 * 86_400);

/// How the worker authenticates itself and the manager.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum WorkerSecurity {
    /// Mutual TLS: the worker shows `identity`; the manager's certificate must be
    /// exactly one of the pinned ones in `manager_trust`, or one that one of its CAs
    /// issued.
    MutualTls {
        /// The worker's certificate and key.
        identity: Identity,
        /// The manager's certificate (pinned, accepted only as itself) and the CAs that
        /// issue the manager's certificate, as two separate lists.
        manager_trust: PeerTrust,
        /// Check that the manager's certificate names the host dialled (on by default).
        verify_hostname: bool,
    },
    /// No TLS. For tests and trusted loopback only; logged loudly.
    InsecurePlaintext,
}

/// Settings of a worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The manager's host name or address.
    pub host: String,
    /// The manager's port.
    pub port: u16,
    /// How the link is secured.
    pub security: WorkerSecurity,
    /// The name announced to the manager (unique among its workers).
    pub name: String,
    /// Tags jobs can require.
    pub tags: BTreeSet<String>,
    /// The platform announced, detected as `OS-ARCH` (e.g. `linux-x86_64`).
    pub platform: String,
    /// How many jobs run at once.
    pub slots: u32,
    /// How many runs the manager may send beyond the free slots (0 to 1024; default 1).
    /// The worker holds them and starts each the moment a slot frees, instead of
    /// waiting a round trip to the manager for its next job; the manager takes a held
    /// run back when another worker could start it sooner. 0: every run goes into a
    /// free slot.
    pub ahead: u32,
    /// Where job folders are made (the system temp dir by default).
    pub work_dir: PathBuf,
    /// Deadline for connecting, the TLS handshake and the hello.
    pub connect_timeout: Duration,
    /// First wait before reconnecting; doubles per failure up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Longest wait between attempts.
    pub backoff_max: Duration,
    /// Between SIGTERM and SIGKILL when a job times out or is cancelled, unless the job
    /// sets its own.
    pub kill_grace: Duration,
    /// Per job, how much output is kept for a reconnect: recently sent output that may
    /// not have arrived, and output made while disconnected (beyond that the job waits).
    pub reconnect_buffer: usize,
    /// Runs every job as this user, with its primary group and no supplementary groups,
    /// so that a job cannot read the worker's key or other users' files; its job folders
    /// belong to that user. The worker must run as root, and [`Worker::start`](super::Worker::start) refuses a
    /// user that does not exist (or is root). `None` (the default): jobs run as the
    /// worker's own user.
    pub job_user: Option<String>,
}

/// `OS-ARCH` of this machine, e.g. `linux-x86_64`.
pub fn detect_platform() -> String {
    format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH)
}

pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for `buf.len()` bytes, the length passed.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if r == 0 && end > 0 {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "worker".into()
    }
}

impl WorkerConfig {
    /// A mutual-TLS worker for the manager at `host:port`, hostname verification on.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        identity: Identity,
        manager_trust: PeerTrust,
    ) -> WorkerConfig {
        WorkerConfig::with_security(
            host,
            port,
            WorkerSecurity::MutualTls {
                identity,
                manager_trust,
                verify_hostname: true,
            },
        )
    }

    /// A worker without TLS (see [`WorkerSecurity::InsecurePlaintext`]).
    pub fn insecure_plaintext(host: impl Into<String>, port: u16) -> WorkerConfig {
        WorkerConfig::with_security(host, port, WorkerSecurity::InsecurePlaintext)
    }

    fn with_security(host: impl Into<String>, port: u16, security: WorkerSecurity) -> WorkerConfig {
        WorkerConfig {
            host: host.into(),
            port,
            security,
            name: format!("{}-{}", hostname(), std::process::id()),
            tags: BTreeSet::new(),
            platform: detect_platform(),
            slots: 1,
            ahead: 1,
            work_dir: std::env::temp_dir(),
            connect_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            kill_grace: Duration::from_secs(5),
            reconnect_buffer: 8 << 20,
            job_user: None,
        }
    }

    /// Sets the name.
    pub fn name(mut self, name: impl Into<String>) -> WorkerConfig {
        self.name = name.into();
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> WorkerConfig {
        self.tags.insert(tag.into());
        self
    }

    /// Sets the number of slots.
    pub fn slots(mut self, slots: u32) -> WorkerConfig {
        self.slots = slots;
        self
    }

    /// Sets how many runs it holds beyond its slots (see [`WorkerConfig::ahead`]).
    pub fn ahead(mut self, ahead: u32) -> WorkerConfig {
        self.ahead = ahead;
        self
    }

    /// Runs every job as this user (see [`WorkerConfig::job_user`]).
    pub fn job_user(mut self, name: impl Into<String>) -> WorkerConfig {
        self.job_user = Some(name.into());
        self
    }

    /// Turns hostname verification of the manager's certificate off (like the seed's
    /// `.noHostnameVerification`); the certificate itself is still verified.
    pub fn no_verify_hostname(mut self) -> WorkerConfig {
        if let WorkerSecurity::MutualTls {
            verify_hostname, ..
        } = &mut self.security
        {
            *verify_hostname = false;
        }
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.slots == 0 {
            return bad("slots must be at least 1".into());
        }
        if self.ahead > 1024 {
            return bad(format!("ahead must be at most 1024, not {}", self.ahead));
        }
        if self.name.is_empty() || self.name.len() > 256 {
            return bad("the worker name must have 1 to 256 bytes".into());
        }
        crate::protocol::check_identity(&self.name, &self.tags, &self.platform).or_else(bad)?;
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("backoff_max", self.backoff_max),
            ("kill_grace", self.kill_grace),
        ] {
            if d > MAX_GRACE {
                return bad(format!("{name} must be at most 365 days"));
            }
        }
        if self.host.is_empty() {
            return bad("the manager host is empty".into());
        }
        if self.backoff_initial.is_zero() || self.backoff_max < self.backoff_initial {
            return bad("backoff_initial must be non-zero and at most backoff_max".into());
        }
        if !self.work_dir.is_dir() {
            return bad(format!(
                "work_dir {} is not a folder",
                self.work_dir.display()
            ));
        }
        if self.job_user.as_deref() == Some("") {
            return bad("job_user is empty".into());
        }
        Ok(())
    }

    /// The job user, looked up, once it is known that jobs can run as it.
    pub(crate) fn resolve_job_user(&self) -> Result<Option<JobUser>> {
        let Some(name) = &self.job_user else {
            return Ok(None);
        };
        let user = JobUser::resolve(name)?;
        executor::probe(&user, &self.work_dir)
            .map_err(|why| Error::InvalidConfig(format!("job_user {name:?}: {why}")))?;
        Ok(Some(user))
    }

    pub(crate) fn address(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}
