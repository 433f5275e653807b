//! The acceptor and what happens to a connection before it is a worker's link: the
//! accept loop (each connection gets a thread of its own at once), admission (at most
//! so many handshakes in all and per source; see `admission`), the handshake watchdog
//! that cuts handshakes at their deadline, and the link thread's life: handshake,
//! registration with the dispatcher, the welcome, then the link itself (`link::drive`:
//! reading, see `routing`, and heartbeats) until it closes. One thread and one
//! descriptor per connection. It holds no scheduling state.

use super::Shared;
use super::admission::Reason;
use super::dispatcher::LinkEvent;
use super::dispatcher::driver::{Event, LinkHandle};
use super::routing::{self, Complaints, Link, Routes};
use crate::error::{Error, Result};
use crate::link::{self, Beat, Established, Hello, Outbox};
use crate::protocol::{ManagerMessage, Role, Welcome, WorkerHello, WorkerMessage};
use crate::sync::{self, lock};
use crossbeam_channel::bounded;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Accepts connections until the manager closes; each gets a link thread at once.
pub(crate) fn accept_loop(listener: &TcpListener, shared: Arc<Shared>) {
    // Displacements are logged as a warning at most once per this long (a flood makes
    // thousands), the rest at debug level.
    const WARN_EVERY: Duration = Duration::from_secs(10);
    let mut warned: Option<Instant> = None;
    for conn in listener.incoming() {
        if shared.closing.load(Ordering::Acquire) {
            break;
        }
        let tcp = match conn {
            Ok(t) => t,
            Err(e) => {
                log::warn!("accept failed: {e}");
                // Out of descriptors or similar: do not spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        // Without its address (already reset), a connection is dropped at once.
        let Ok(peer) = tcp.peer_addr() else {
            continue;
        };
        // One descriptor: the link thread owns the socket; the table only names it (to
        // cut it at its handshake deadline or at shutdown) and keeps nothing open.
        let tcp = Arc::new(tcp);
        let conn_id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
        lock(&shared.connections).insert(conn_id, Arc::downgrade(&tcp));
        let admitted = {
            let mut admission = lock(&shared.admission);
            let admitted = admission.admit(conn_id, peer.ip(), Instant::now());
            if let Some(d) = admitted.displaced {
                cut_connection(&shared, d.id);
                let limits = admission.limits();
                let why = match d.reason {
                    Reason::SourceFull => format!(
                        "{} already had {} connections in handshake",
                        d.source, limits.per_source
                    ),
                    Reason::AllFull => format!(
                        "all {} handshake slots were taken; {} held the most",
                        limits.total, d.source
                    ),
                };
                let msg = format!(
                    "a connection from {peer} displaced the oldest handshake from {}: {why}",
                    d.source
                );
                if warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    warned = Some(Instant::now());
                    log::warn!(
                        "{msg} (more displacements in the next {} s are logged at debug level)",
                        WARN_EVERY.as_secs()
                    );
                } else {
                    log::debug!("{msg}");
                }
            }
            admitted
        };
        shared.admission_wake.notify_all();
        let s = shared.clone();
        let spawned = crate::thread::spawn("wp-link", move || {
            serve_connection(&s, tcp, peer, conn_id, admitted.deadline);
            lock(&s.connections).remove(&conn_id);
        });
        match spawned {
            Ok(handle) => {
                let mut threads = lock(&shared.link_threads);
                threads.retain(|t| !t.is_finished());
                threads.push(handle);
            }
            Err(e) => {
                lock(&shared.admission).finish(conn_id);
                lock(&shared.connections).remove(&conn_id);
                log::error!("cannot start a link thread: {e}");
            }
        }
    }
}

/// Cuts a connection from any thread: its blocked reads and writes return at once.
fn cut_connection(shared: &Shared, id: u64) {
    let tcp = lock(&shared.connections).get(&id).and_then(|t| t.upgrade());
    if let Some(tcp) = tcp {
        let _ = tcp.shutdown(std::net::Shutdown::Both);
    }
}

/// The handshake watchdog: cuts every connection still in handshake at its deadline, so
/// that no peer keeps a slot longer, whatever the link thread is blocked on.
pub(crate) fn watch_handshakes(shared: &Shared) {
    let mut admission = lock(&shared.admission);
    while !shared.closing.load(Ordering::Acquire) {
        let now = Instant::now();
        for (id, source) in admission.expire(now) {
            log::debug!("cutting a connection from {source}: its handshake deadline passed");
            cut_connection(shared, id);
        }
        admission = match admission.next_deadline() {
            Some(d) => sync::wait_timeout(
                &shared.admission_wake,
                admission,
                d.saturating_duration_since(now),
            ),
            None => sync::wait(&shared.admission_wake, admission),
        };
    }
}

/// One connection, on its own thread: handshake and hello, then a worker's or a
/// submitter's link (reading, heartbeats) on this same thread; whoever sends on it
/// writes directly. A hello whose role the peer's certificate is not trusted for (see
/// `PeerRoles`) is refused with one line that says why.
fn serve_connection(
    shared: &Arc<Shared>,
    tcp: Arc<TcpStream>,
    peer: SocketAddr,
    conn_id: u64,
    deadline: Instant,
) {
    let who = peer.to_string();
    let accepted = link::accept(tcp, shared.tls.as_ref(), deadline, format!("peer at {who}"));
    // False when the watchdog or a newcomer took the slot (and cut the socket) first.
    let kept_slot = lock(&shared.admission).finish(conn_id);
    let (est, hello) = match accepted {
        Ok(x) if kept_slot => x,
        Err(e) if kept_slot => {
            log::warn!("refused connection from {who}: {e}");
            return;
        }
        Ok((est, _)) => {
            est.tx.release();
            log_lost_slot(&who, deadline);
            return;
        }
        Err(_) => {
            log_lost_slot(&who, deadline);
            return;
        }
    };
    let (role, name) = match &hello {
        Hello::Worker(h) => (Role::Worker, &h.name),
        Hello::Submitter(h) => (Role::Submitter, &h.name),
    };
    if let Some(why) = est.peer_roles.refusal(role) {
        let role = match role {
            Role::Worker => "worker",
            Role::Submitter => "submitter",
        };
        log::warn!("refused {role} {name:?} at {who}: {why}");
        link::refuse(&est, why);
        return;
    }
    match hello {
        Hello::Worker(hello) => serve_worker(shared, est, hello, peer),
        Hello::Submitter(hello) => super::submitters::serve(shared, est, hello, peer),
    }
}

/// A worker's link, after its hello: registration with the dispatcher, the welcome,
/// then the link until it closes.
fn serve_worker(shared: &Arc<Shared>, mut est: Established, hello: WorkerHello, peer: SocketAddr) {
    let who = peer.to_string();
    let peer = Some(peer);
    let live = est.tx.live().clone();
    let out = Outbox::new(est.tx.clone());
    let reported = out.clone();
    let routes: Arc<Routes> = Arc::default();
    let (reply_tx, reply_rx) = bounded(1);
    let name = hello.name.clone();
    let register = Event::Register {
        hello,
        peer,
        cert: est.peer_cert.clone(),
        link: LinkHandle {
            out,
            routes: routes.clone(),
            live: live.clone(),
        },
        reply: reply_tx,
    };
    if shared.events.send(register).is_err() {
        link::refuse(&est, "the manager is shutting down");
        return;
    }
    let (worker_id, resume) = match reply_rx.recv() {
        Ok(Ok(x)) => x,
        Ok(Err(reason)) => {
            link::refuse(&est, &reason);
            return;
        }
        Err(_) => {
            link::refuse(&est, "the manager is shutting down");
            return;
        }
    };
    let label = format!("worker {name} ({who})");
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    // Counted among the live links (which pace the heartbeats) until this thread ends.
    let _counted = shared.pace.link_up();
    let paced = shared.pace.now();
    let welcome = Welcome {
        manager_id: shared.manager_id,
        worker_id,
        heartbeat_interval_ms: ms(paced.timing.heartbeat_interval),
        heartbeat_timeout_ms: ms(paced.timing.heartbeat_timeout),
        reconnect_grace_ms: ms(paced.grace),
        resume,
    };
    let started = link::welcome(&mut est, &welcome, paced.timing);
    let mut complaints = Complaints::default();
    // A panic here must not leave the worker registered with its link gone.
    let result = guarded(started, || {
        let link = Link {
            events: &shared.events,
            counters: &shared.counters,
            worker: worker_id,
            label: &label,
            routes: &routes,
            out: &reported,
        };
        // What the link's own thread sends: heartbeats, and timing changes.
        let own = Outbox::<ManagerMessage>::new(est.tx.clone());
        let heartbeat = || {
            own.send(ManagerMessage::Heartbeat);
        };
        let announce = |p: &link::Paced| {
            log::debug!(
                "{label}: heartbeats every {:.1} s now, timeout {:.1} s",
                p.timing.heartbeat_interval.as_secs_f64(),
                p.timing.heartbeat_timeout.as_secs_f64()
            );
            own.send(ManagerMessage::Timing {
                heartbeat_interval_ms: ms(p.timing.heartbeat_interval),
                heartbeat_timeout_ms: ms(p.timing.heartbeat_timeout),
                reconnect_grace_ms: ms(p.grace),
            });
        };
        let mut deliver =
            |msg: WorkerMessage| match routing::on_worker_message(&link, &mut complaints, msg) {
                Ok(()) => true,
                Err(why) => {
                    log::warn!("{label}: {why}; closing the link");
                    live.close_because(why);
                    false
                }
            };
        link::drive(
            &mut est.reader,
            &est.tx,
            link::Drive {
                paced,
                pace: &shared.pace,
                announce: &announce,
                beat: Beat::Answer,
                heartbeat: &heartbeat,
                deliver: &mut deliver,
            },
        )
    });
    complaints.summary(&label);
    // Nothing keeps the socket open from here: whoever still holds the link's `Tx`
    // (the dispatcher until it forgets the worker, job sinks) finds it closed.
    let reason = ended(&est, result);
    let _ = shared.events.send(Event::Link {
        worker: worker_id,
        event: LinkEvent::Closed { reason },
    });
}

/// Runs a welcomed link (`started` is the welcome's fate) with `run`, a panic taken as
/// the link's failure, so that a link thread always gets to say that its link ended.
pub(super) fn guarded(started: Result<()>, run: impl FnOnce() -> Result<()>) -> Result<()> {
    started?;
    catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|_| {
        Err(Error::Protocol(
            "the link's reader failed (a bug: see the log)".into(),
        ))
    })
}

/// Lets go of an ended link's socket; why it ended.
pub(super) fn ended(est: &Established, result: Result<()>) -> String {
    est.tx.release();
    est.tx.live().reason().unwrap_or_else(|| match result {
        Ok(()) => "it closed the connection".to_string(),
        Err(e) => e.to_string(),
    })
}

fn log_lost_slot(who: &str, deadline: Instant) {
    if Instant::now() >= deadline {
        log::warn!("refused connection from {who}: no TLS handshake and hello by the deadline");
    } else {
        log::debug!("dropped connection from {who}: a newer connection took its handshake slot");
    }
}
