//! Submitters: remote connections that send jobs and follow them.

use super::Shared;
use crate::link::{self, Established};
use crate::protocol::SubmitterHello;
use std::net::SocketAddr;
use std::sync::Arc;

/// A submitter's link, after its hello.
pub(crate) fn serve(
    _shared: &Arc<Shared>,
    est: Established,
    hello: SubmitterHello,
    peer: SocketAddr,
) {
    log::warn!(
        "refused submitter {:?} at {peer}: not served yet",
        hello.name
    );
    link::refuse(&est, "this manager does not take submitters yet");
}
