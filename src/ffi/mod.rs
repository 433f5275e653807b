//! The C ABI (`include/workpool.h`): opaque handles over the Rust API, one result enum,
//! panics caught at the boundary. No logic lives here that Rust users lack; each
//! function checks and converts its arguments, calls the Rust API, and converts the
//! answer. One file per kind of handle:
//!
//! | file | handles |
//! | --- | --- |
//! | `common.rs` | none: `wp_result`, `wp_bytes`, the last error, the boundary macros |
//! | `config.rs` | `wp_manager_config`, `wp_worker_config`, `wp_client_config` |
//! | `manager.rs` | `wp_manager`, and its snapshots `wp_worker_list`/`wp_worker_info`, `wp_stats` |
//! | `worker.rs` | `wp_worker` |
//! | `client.rs` | `wp_client` (its jobs are `wp_job`s, its snapshots the manager's) |
//! | `spec.rs` | `wp_job_spec` |
//! | `job.rs` | `wp_job` (a local or a remote job), `wp_job_result`, `wp_job_status`, `wp_job_list` |
//! | `events.rs` | `wp_event` (a job's), `wp_subscription` and `wp_manager_event` (the pool's) |
//! | `log.rs` | the log callback |
//!
//! Conventions: inputs first, outputs last (`**out`); a failed call writes nothing to
//! its outputs and leaves its message for `wp_last_error_message` on the calling thread;
//! `_free(NULL)` does nothing and each `_free` is called once; every string is
//! NUL-terminated UTF-8; an integer from C that names a choice is a plain integer,
//! checked, never a Rust enum. `docs/C-API.md` maps every Rust method to its C function.

#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]

#[macro_use]
mod common;
mod client;
mod config;
mod events;
mod job;
mod log;
mod manager;
mod spec;
mod worker;

pub use self::log::*;
pub use client::*;
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub use common::wp_debug_panic;
pub use common::{wp_bytes, wp_last_error_message, wp_result, wp_result_name};
pub use config::*;
pub use events::*;
pub use job::*;
pub use manager::*;
pub use spec::*;
pub use worker::*;
