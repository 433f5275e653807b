//! Admission under a flood: peers that open connections and then trickle their bytes
//! (one byte of a TLS ClientHello now and then) from one loopback address or from many
//! (127.0.0.2, 127.0.0.3, ...), while a real worker joins and runs a job; and peers that
//! trickle, dropped at the deadline (measured), on every read that has one.

mod common;

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use workpool::job::JobSpec;
use workpool::manager::ManagerConfig;
use workpool::protocol;
use workpool::worker::{Worker, WorkerConfig};

/// How long a trickling peer waits between two bytes.
const TRICKLE: Duration = Duration::from_millis(250);

/// A TCP connection from `source` (bound before connecting) to `to`.
fn connect_from(source: Ipv4Addr, to: SocketAddrV4) -> std::io::Result<TcpStream> {
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: socket() takes no pointers; a negative result is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns; it is closed on every path.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let local = sockaddr(SocketAddrV4::new(source, 0));
    // SAFETY: `local` is a valid sockaddr_in of `len` bytes that outlives the call.
    if unsafe { libc::bind(fd, (&raw const local).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let remote = sockaddr(to);
    // SAFETY: as for bind.
    if unsafe { libc::connect(fd, (&raw const remote).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TcpStream::from(owned))
}

/// The bytes a stalling peer trickles: a real ClientHello, in a TLS record whose header
/// claims the largest record length, so that it never completes however long it runs.
fn stalled_client_hello() -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    assert_eq!(hello[0], 22, "a handshake record");
    hello[3..5].copy_from_slice(&16384u16.to_be_bytes());
    hello.resize(5 + 16384, 0);
    hello
}

/// Connections that trickle a stalled ClientHello: in each round each sends its next byte,
/// and one found closed is opened again (as an attacker would); rounds are `pause` apart
/// (none: as fast as one thread can). One thread drives them all; it stops when the
/// flood is dropped.
struct Flood {
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    rounds: Arc<AtomicU64>,
    opened: Arc<AtomicU64>,
    cut: Arc<AtomicU64>,
    started: Instant,
}

impl Flood {
    /// `per_source` connections from each of `sources` to the manager's port.
    fn start(port: u16, sources: &[Ipv4Addr], per_source: usize, pause: Duration) -> Flood {
        let target = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        let hello = stalled_client_hello();
        let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
        let (rounds, opened, cut): (Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>) =
            (Arc::default(), Arc::default(), Arc::default());
        let (r, o, c) = (Arc::clone(&rounds), Arc::clone(&opened), Arc::clone(&cut));
        let mut slots: Vec<(Ipv4Addr, Option<TcpStream>, usize)> = sources
            .iter()
            .flat_map(|s| (0..per_source).map(|_| (*s, None, 0)))
            .collect();
        let thread = std::thread::spawn(move || {
            loop {
                for (source, conn, sent) in &mut slots {
                    let alive = conn.as_ref().is_some_and(|s| {
                        matches!(s.peek(&mut [0u8; 1]),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                    });
                    if !alive {
                        if conn.take().is_some() {
                            c.fetch_add(1, Ordering::Relaxed);
                        }
                        let Ok(s) = connect_from(*source, target) else {
                            continue;
                        };
                        s.set_nonblocking(true).unwrap();
                        o.fetch_add(1, Ordering::Relaxed);
                        (*conn, *sent) = (Some(s), 0);
                    }
                    let s = conn.as_mut().unwrap();
                    if s.write(&hello[*sent..*sent + 1]).is_ok() {
                        *sent = (*sent + 1).min(hello.len() - 1);
                    }
                }
                r.fetch_add(1, Ordering::Relaxed);
                match stopped.recv_timeout(pause) {
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            }
        });
        Flood {
            stop: Some(stop),
            thread: Some(thread),
            rounds,
            opened,
            cut,
            started: Instant::now(),
        }
    }

    /// Waits until every connection has been opened once and the manager has cut some
    /// (so it is full: its handshake slots are all taken).
    fn wait_saturated(&self) {
        wait_until("the flood has made its connections", || {
            self.rounds.load(Ordering::Relaxed) >= 1
        });
        wait_until("the manager is full and cuts flood connections", || {
            self.cut.load(Ordering::Relaxed) > 0
        });
    }

    fn report(&self) -> String {
        let opened = self.opened.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64();
        format!(
            "{opened} connections opened in {secs:.1} s ({:.0}/s), {} found cut",
            opened as f64 / secs,
            self.cut.load(Ordering::Relaxed)
        )
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A manager whose handshake deadline is longer than any wait in these tests: a worker
/// that gets in does so because of the admission policy, not because flood connections
/// timed out.
fn flooded_manager(max_handshakes: usize) -> Cluster {
    Cluster::custom(
        0,
        |m: &mut ManagerConfig| {
            m.handshake_timeout = DEADLINE * 2;
            m.max_handshakes = max_handshakes;
        },
        |_, w| w,
    )
}

/// Starts a real worker, waits (with the deadline) until it joined, runs a job on it, and
/// returns how long the join took.
fn real_worker_joins_and_works(c: &Cluster, name: &str) -> (Worker, Duration) {
    real_worker_with(c, c.certs.worker_config(c.port(), 0, name))
}

fn real_worker_with(c: &Cluster, config: WorkerConfig) -> (Worker, Duration) {
    let name = config.name.clone();
    let started = Instant::now();
    let w = Worker::start(config).unwrap();
    assert_eq!(wait_joined(&c.events, 1), vec![name.clone()]);
    let waited = started.elapsed();
    let r = run(&c.manager, JobSpec::new("echo served"));
    assert_eq!(
        (r.outcome.clone(), r.stdout_text(), r.worker.clone()),
        (exited(0), "served\n".to_string(), Some(name))
    );
    (w, waited)
}

/// `n` loopback addresses other than 127.0.0.1: 127.0.0.2, 127.0.0.3, ...
fn sources(n: usize) -> Vec<Ipv4Addr> {
    (0..n)
        .map(|i| Ipv4Addr::new(127, 0, (i / 200) as u8, 2 + (i % 200) as u8))
        .collect()
}

#[test]
fn a_trickling_flood_from_one_other_address_does_not_keep_a_worker_out() {
    let c = flooded_manager(16);
    let flood = Flood::start(c.port(), &sources(1), 24, TRICKLE);
    flood.wait_saturated();
    let (_w, waited) = real_worker_joins_and_works(&c, "patient");
    println!(
        "one-source flood (24 from 127.0.0.2, 16 slots): the worker joined after {waited:?}; {}",
        flood.report()
    );
}

#[test]
fn a_trickling_flood_from_the_worker_s_own_address_does_not_keep_it_out() {
    let c = flooded_manager(16);
    let flood = Flood::start(c.port(), &[Ipv4Addr::LOCALHOST], 24, TRICKLE);
    flood.wait_saturated();
    let (_w, waited) = real_worker_joins_and_works(&c, "patient");
    println!(
        "same-address flood (24 from 127.0.0.1, 16 slots): the worker joined after {waited:?}; {}",
        flood.report()
    );
}

#[test]
fn a_trickling_flood_from_many_addresses_does_not_keep_a_worker_out() {
    let c = flooded_manager(32);
    let flood = Flood::start(c.port(), &sources(16), 4, TRICKLE);
    flood.wait_saturated();
    let (_w, waited) = real_worker_joins_and_works(&c, "patient");
    println!(
        "many-source flood (16 addresses x 4, 32 slots): the worker joined after {waited:?}; {}",
        flood.report()
    );
}

/// Trickles `bytes` into `s`, one every `TRICKLE`, until the peer ends the connection;
/// returns how long after `since` that was, and anything the peer sent first.
fn trickle_until_cut(
    s: &mut (impl Read + Write),
    tcp: &TcpStream,
    bytes: &[u8],
    since: Instant,
) -> (Duration, Vec<u8>) {
    tcp.set_read_timeout(Some(TRICKLE)).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    for b in bytes.iter().cycle() {
        assert!(
            since.elapsed() < DEADLINE,
            "still connected after {:?}",
            since.elapsed()
        );
        if s.write_all(std::slice::from_ref(b))
            .and_then(|()| s.flush())
            .is_err()
        {
            return (since.elapsed(), answer);
        }
        loop {
            match s.read(&mut buf) {
                Ok(0) => return (since.elapsed(), answer),
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(_) => return (since.elapsed(), answer),
            }
        }
    }
    unreachable!("a cycle never ends")
}

#[test]
fn a_peer_trickling_its_client_hello_is_dropped_at_the_handshake_deadline() {
    let timeout = Duration::from_secs(2);
    let c = Cluster::custom(0, |m| m.handshake_timeout = timeout, |_, w| w);
    let since = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", c.port())).unwrap();
    let t = s.try_clone().unwrap();
    let (cut, _) = trickle_until_cut(&mut s, &t, &stalled_client_hello(), since);
    println!(
        "a peer sending a ClientHello byte every {TRICKLE:?} was dropped after {cut:?} (deadline {timeout:?})"
    );
    assert!(cut >= timeout, "dropped after {cut:?}, before the deadline");
}

#[test]
fn a_trusted_peer_trickling_its_hello_is_dropped_at_the_handshake_deadline() {
    let timeout = Duration::from_secs(2);
    let c = Cluster::custom(1, |m| m.handshake_timeout = timeout, |_, w| w);
    let me = &c.certs.workers[0];
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(me.cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(me.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("127.0.0.1").unwrap())
            .unwrap();
    let since = Instant::now();
    let mut tcp = TcpStream::connect(("127.0.0.1", c.port())).unwrap();
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    // A hello frame that announces 60,000 bytes (under the hello limit) and never ends.
    let mut frame = Vec::new();
    protocol::hello_frame_into(&mut frame, &[0u8; 60_000 - 8]);
    let t = tcp.try_clone().unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let (cut, _) = trickle_until_cut(&mut s, &t, &frame, since);
    println!(
        "a trusted peer sending its hello a byte every {TRICKLE:?} was dropped after {cut:?} (deadline {timeout:?})"
    );
    assert!(cut >= timeout, "dropped after {cut:?}, before the deadline");
    // The real worker was never disturbed.
    let r = run(&c.manager, JobSpec::new("echo alive"));
    assert_eq!(r.stdout_text(), "alive\n");
}

#[test]
fn a_worker_gives_up_a_manager_that_trickles_its_welcome_at_the_deadline() {
    let certs = Certs::new(1);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from_pem_slice(certs.manager.cert_pem.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(certs.manager.key_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    let timeout = Duration::from_secs(2);
    let mut config = certs.worker_config(port, 0, "w0");
    config.connect_timeout = timeout;
    config.backoff_initial = Duration::from_secs(30);
    config.backoff_max = Duration::from_secs(30);
    let since = Instant::now();
    let w = Worker::start(config).unwrap();
    let mut tcp = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(since.elapsed() < DEADLINE, "the worker never connected");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    tcp.set_nonblocking(false).unwrap();
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut conn = rustls::ServerConnection::new(Arc::new(server)).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    // The worker's hello arrives; the answer is a welcome frame that never ends.
    let t = tcp.try_clone().unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut first = [0u8; 4];
    s.read_exact(&mut first).unwrap();
    let mut frame = Vec::new();
    protocol::hello_frame_into(&mut frame, &[0u8; 60_000 - 8]);
    let (cut, _) = trickle_until_cut(&mut s, &t, &frame, since);
    println!(
        "a manager sending its welcome a byte every {TRICKLE:?} was given up after {cut:?} (deadline {timeout:?})"
    );
    assert!(
        cut >= timeout,
        "given up after {cut:?}, before the deadline"
    );
    assert!(!w.is_connected());
    w.stop();
}

#[test]
fn a_metrics_client_trickling_its_request_is_dropped_at_the_deadline() {
    let c = Cluster::custom(0, |m| m.metrics_addr = Some("127.0.0.1:0".into()), |_, w| w);
    let addr = c.manager.metrics_addr().unwrap();
    let since = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    let t = s.try_clone().unwrap();
    let request = format!("GET /metrics HTTP/1.1\r\nX-Padding: {}", "a".repeat(4000));
    let (cut, answer) = trickle_until_cut(&mut s, &t, request.as_bytes(), since);
    let answer = String::from_utf8_lossy(&answer);
    println!(
        "a metrics client sending a byte every {TRICKLE:?} was dropped after {cut:?} (deadline 2 s): {:?}",
        answer.lines().next()
    );
    assert!(cut >= Duration::from_secs(2), "dropped after {cut:?}");
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
}

#[test]
fn bad_admission_settings_are_refused_with_a_clear_error() {
    let certs = Certs::new(1);
    type Setting = fn(&mut ManagerConfig);
    let cases: [(Setting, &str); 4] = [
        (
            |c| c.max_handshakes_per_source = 0,
            "max_handshakes_per_source must be at least 1",
        ),
        (
            |c| c.max_handshakes = 0,
            "max_handshakes must be at least 1",
        ),
        (
            |c| c.handshake_timeout = Duration::ZERO,
            "handshake_timeout must be more than zero and at most an hour",
        ),
        (
            |c| c.handshake_timeout = Duration::from_secs(u64::MAX),
            "handshake_timeout must be more than zero and at most an hour",
        ),
    ];
    for (set, why) in cases {
        let mut config = certs.manager_config();
        set(&mut config);
        let e = workpool::manager::Manager::bind(config)
            .err()
            .expect("refused");
        assert_eq!(e.to_string(), format!("invalid configuration: {why}"));
    }
}

/// How long a real worker waits to join (and then runs a job) under floods the size of
/// the original report, with the default admission settings (10 s, 256 in all, 8 per
/// source). A measurement, not a check; run it on the release build:
/// `cargo test --release --test admission -- --ignored --nocapture`
#[test]
#[ignore]
fn measure_how_long_a_worker_waits_to_join_under_floods() {
    const TRIALS: usize = 10;
    /// How long one trial waits for the worker to join before it counts as kept out.
    const GIVE_UP: Duration = Duration::from_secs(30);
    let fast = Duration::ZERO;
    let own = vec![Ipv4Addr::LOCALHOST];
    let floods: [(&str, Vec<Ipv4Addr>, usize, Duration); 8] = [
        ("no flood", vec![], 0, TRICKLE),
        ("300 from one other address", sources(1), 300, TRICKLE),
        (
            "300 from one other address, full speed",
            sources(1),
            300,
            fast,
        ),
        ("64 addresses x 8", sources(64), 8, TRICKLE),
        ("64 addresses x 8, full speed", sources(64), 8, fast),
        ("300 addresses x 1, full speed", sources(300), 1, fast),
        (
            "300 from the worker's own address",
            own.clone(),
            300,
            TRICKLE,
        ),
        (
            "300 from the worker's own address, full speed",
            own,
            300,
            fast,
        ),
    ];
    for (label, from, per_source, pause) in floods {
        let c = Cluster::custom(0, |_| {}, |_, w| w);
        let flood = Flood::start(c.port(), &from, per_source, pause);
        if per_source > 0 {
            flood.wait_saturated();
        }
        let (mut waits, mut kept_out) = (Vec::new(), 0);
        for i in 0..TRIALS {
            // A worker as deployed: the default reconnect backoff (0.1 s doubling to 10 s).
            let name = format!("m{i}");
            let mut config = c.certs.worker_config(c.port(), 0, &name);
            let defaults = WorkerConfig::insecure_plaintext("localhost", 1);
            config.backoff_initial = defaults.backoff_initial;
            config.backoff_max = defaults.backoff_max;
            let started = Instant::now();
            let w = Worker::start(config).unwrap();
            let joined = loop {
                match c.events.recv_deadline(started + GIVE_UP) {
                    Ok(workpool::manager::ManagerEvent::WorkerJoined(info))
                        if info.name == name =>
                    {
                        break Some(started.elapsed());
                    }
                    Ok(_) => {}
                    Err(_) => break None,
                }
            };
            match joined {
                Some(waited) => {
                    let r = run(&c.manager, JobSpec::new("echo served"));
                    assert_eq!(r.stdout_text(), "served\n");
                    waits.push(waited);
                }
                None => kept_out += 1,
            }
            w.stop();
        }
        waits.sort();
        let joins = if waits.is_empty() {
            "never joined".to_string()
        } else {
            format!(
                "joined after min {:?}, median {:?}, max {:?}",
                waits[0],
                waits[waits.len() / 2],
                waits[waits.len() - 1]
            )
        };
        println!(
            "{label}: {joins} ({} of {TRIALS} joined and ran a job, {kept_out} not within {GIVE_UP:?}); flood: {}",
            waits.len(),
            flood.report()
        );
    }
}
