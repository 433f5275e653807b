pub mod error;
pub mod job;
pub mod protocol;
pub mod tls;
