pub mod error;
pub mod job;
pub mod protocol;
pub mod tls;
pub(crate) mod link;
pub mod manager;
