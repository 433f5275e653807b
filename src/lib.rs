pub mod error;
pub mod job;
pub(crate) mod link;
pub mod manager;
pub mod protocol;
pub mod tls;
pub mod worker;
