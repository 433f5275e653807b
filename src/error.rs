//! The one error type of the crate. Every fallible public call returns
//! [`Result<T>`]; each variant says what went wrong in words a user can act on.

use std::fmt;
use std::io;

/// Everything that can go wrong in workpool.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error (socket, file, process), with what was being done.
    Io {
        /// What workpool was doing, e.g. `binding 127.0.0.1:9001`.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A TLS failure: a bad certificate, a refused handshake, a mismatched key.
    Tls(String),
    /// A PEM file or buffer that holds no usable certificate or key.
    Pem(String),
    /// A configuration value that cannot work (the message names it).
    InvalidConfig(String),
    /// A job that cannot be accepted as given (the message says why).
    InvalidJob(String),
    /// The peer broke the wire protocol: bad magic, undecodable frame, oversized frame.
    Protocol(String),
    /// The peer speaks another protocol version.
    VersionMismatch {
        /// The version this side speaks.
        ours: u32,
        /// The version the peer announced.
        theirs: u32,
    },
    /// The manager refused this worker, with its reason.
    Refused(String),
    /// The manager's queue holds its configured maximum of jobs; nothing was queued.
    QueueFull {
        /// The configured capacity.
        capacity: usize,
    },
    /// The manager (or worker) has shut down; the call did nothing.
    ShutDown,
    /// No job with that id is known (it never existed or has long ended).
    UnknownJob(u64),
    /// A deadline passed before the operation completed.
    Timeout(String),
    /// The manager does not let this submitter do that (for example: attach to or
    /// cancel a job another certificate submitted); the message says what.
    NotPermitted(String),
    /// A remote client lost contact with the manager and its session did not survive:
    /// the request may or may not have been carried out (the message says which).
    ContactLost(String),
    /// The manager's journal cannot be opened, read or written (corrupt, written by a
    /// newer version, in use by another manager, a full disk); the message says which
    /// and where.
    Journal(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] with what was being done.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Tls(m) => write!(f, "TLS: {m}"),
            Error::Pem(m) => write!(f, "PEM: {m}"),
            Error::InvalidConfig(m) => write!(f, "invalid configuration: {m}"),
            Error::InvalidJob(m) => write!(f, "invalid job: {m}"),
            Error::Protocol(m) => write!(f, "protocol error: {m}"),
            Error::VersionMismatch { ours, theirs } => write!(
                f,
                "protocol version mismatch: this side speaks version {ours}, the peer speaks version {theirs}"
            ),
            Error::Refused(m) => write!(f, "refused by the manager: {m}"),
            Error::QueueFull { capacity } => {
                write!(f, "the job queue is full ({capacity} jobs); job not queued")
            }
            Error::ShutDown => write!(f, "shut down"),
            Error::UnknownJob(id) => write!(f, "no such job: {id}"),
            Error::Timeout(m) => write!(f, "timed out: {m}"),
            Error::NotPermitted(m) => write!(f, "not permitted: {m}"),
            Error::ContactLost(m) => write!(f, "contact with the manager was lost: {m}"),
            Error::Journal(m) => write!(f, "journal: {m}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<rustls::Error> for Error {
    fn from(e: rustls::Error) -> Error {
        Error::Tls(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_stays_small() {
        // Results of Error travel through channels on hot paths; keep the enum compact.
        assert!(
            std::mem::size_of::<Error>() <= 48,
            "{}",
            std::mem::size_of::<Error>()
        );
    }

    #[test]
    fn display_names_the_problem() {
        let e = Error::io(
            "binding 127.0.0.1:1",
            io::Error::from(io::ErrorKind::AddrInUse),
        );
        assert!(e.to_string().starts_with("binding 127.0.0.1:1: "));
        assert_eq!(
            Error::QueueFull { capacity: 3 }.to_string(),
            "the job queue is full (3 jobs); job not queued"
        );
    }
}
