//! TEMPORARY: the interactive calls of `RemoteJob` (`stdin`, `resize`) as the library
//! will have them, so that the CLI builds before they exist. Every call fails. Deleted
//! as soon as the library has them.

use std::io;
use workpool::{Error, RemoteJob, Result};

fn missing() -> Error {
    Error::InvalidJob("this build of the library has no interactive jobs".into())
}

/// The writer for a job's stdin.
pub(crate) struct JobStdin(());

impl io::Write for JobStdin {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            missing().to_string(),
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl JobStdin {
    pub(crate) fn close(self) -> Result<()> {
        Err(missing())
    }
}

pub(crate) trait Interactive {
    fn stdin(&self) -> Result<JobStdin>;
    fn resize(&self, rows: u16, cols: u16) -> Result<()>;
}

impl Interactive for RemoteJob {
    fn stdin(&self) -> Result<JobStdin> {
        Err(missing())
    }

    fn resize(&self, _: u16, _: u16) -> Result<()> {
        Err(missing())
    }
}
