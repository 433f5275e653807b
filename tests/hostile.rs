//! Hostile or broken peers on loopback. Each is refused or cut off, and the manager
//! keeps serving its real worker, which runs a job after every attack.

mod common;

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;
use workpool::job::{JobId, JobSpec, Outcome, Stream};
use workpool::manager::ManagerEvent;
use workpool::protocol::{self, FrameReader, ManagerMessage, WorkerHello, WorkerMessage};
use workpool::tls::{GeneratedCertificate, Identity, TrustRoots};
use workpool::worker::{Worker, WorkerConfig};

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A raw TLS connection to the manager, with a client certificate or without.
fn tls_to(port: u16, identity: Option<&GeneratedCertificate>) -> Tls {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let config = match identity {
        Some(g) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(g.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(g.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("127.0.0.1").unwrap())
            .unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Whether the peer ends the connection (EOF or an error) rather than answer.
fn is_cut_off(s: &mut impl Read) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return true,
            Ok(_) => continue, // e.g. a refusal or an alert before the close
        }
    }
}

fn hello_bytes(name: &str, version: u32) -> Vec<u8> {
    let hello = WorkerHello {
        name: name.into(),
        tags: Default::default(),
        platform: "linux-x86_64".into(),
        slots: 1,
        ahead: 0,
        manager_id: None,
        jobs: vec![],
        draining: false,
    };
    let mut frame = Vec::new();
    protocol::role_hello_frame_into(&mut frame, protocol::Role::Worker, &hello).unwrap();
    if version != protocol::PROTOCOL_VERSION {
        frame[8..12].copy_from_slice(&version.to_be_bytes());
    }
    frame
}

/// A worker made by hand: TLS with a trusted certificate, a hello, and the welcome read.
struct FakeWorker {
    reader: FrameReader<Tls>,
}

impl FakeWorker {
    fn join(port: u16, identity: &GeneratedCertificate, name: &str) -> FakeWorker {
        let mut tls = tls_to(port, Some(identity));
        tls.write_all(&hello_bytes(name, protocol::PROTOCOL_VERSION))
            .unwrap();
        let mut reader = FrameReader::new(tls, 1 << 20);
        let welcome = reader.read_frame().unwrap().unwrap();
        let (_, rest) = protocol::parse_hello(&welcome).unwrap();
        assert_eq!(
            rest[0],
            0,
            "welcomed: {}",
            String::from_utf8_lossy(&rest[1..])
        );
        FakeWorker { reader }
    }

    fn send(&mut self, msg: &WorkerMessage) -> std::io::Result<()> {
        let mut frame = Vec::new();
        protocol::encode_into(&mut frame, msg).unwrap();
        self.raw(&frame)
    }

    fn raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let s = self.reader.get_mut();
        s.write_all(bytes)?;
        s.flush()
    }

    /// The next message other than a heartbeat.
    fn next(&mut self) -> ManagerMessage {
        loop {
            let body = self.reader.read_frame().unwrap().expect("a message");
            let m: ManagerMessage = protocol::decode(&body).unwrap();
            if m != ManagerMessage::Heartbeat {
                return m;
            }
        }
    }
}

/// A cluster with one real worker `w0`; `certs.workers[1]` is trusted but unused, for
/// hand-made workers.
fn cluster() -> Cluster {
    Cluster::custom(
        1,
        |m| {
            m.handshake_timeout = Duration::from_secs(2);
        },
        |_, w| w,
    )
}

fn still_serving(c: &Cluster) {
    let r = run(&c.manager, JobSpec::new("echo alive"));
    assert_eq!(
        (r.outcome.clone(), r.stdout_text()),
        (exited(0), "alive\n".to_string())
    );
}

/// A certificate the manager trusts (the real worker's): hand-made connections use it
/// under other names.
fn trusted_cert(c: &Cluster) -> GeneratedCertificate {
    c.certs.workers[0].clone()
}

#[test]
fn garbage_and_plaintext_http_are_cut_off() {
    let c = cluster();
    let mut garbage = TcpStream::connect(("127.0.0.1", c.port())).unwrap();
    garbage.set_read_timeout(Some(DEADLINE)).unwrap();
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let _ = garbage.write_all(&bytes);
    assert!(is_cut_off(&mut garbage));
    let mut http = TcpStream::connect(("127.0.0.1", c.port())).unwrap();
    http.set_read_timeout(Some(DEADLINE)).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(is_cut_off(&mut http));
    still_serving(&c);
}

#[test]
fn a_tls_client_without_a_certificate_is_refused() {
    let c = cluster();
    let mut anon = tls_to(c.port(), None);
    let _ = anon.write_all(&hello_bytes("anon", protocol::PROTOCOL_VERSION));
    assert!(is_cut_off(&mut anon));
    assert_eq!(c.manager.workers().len(), 1);
    still_serving(&c);
}

#[test]
fn an_expired_certificate_is_refused_even_when_pinned() {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["old".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2001, 1, 1);
    params.not_after = rcgen::date_time_ymd(2002, 1, 1);
    let expired = params.self_signed(&key).unwrap();
    let certs = Certs::new(1);
    let mut roots = certs.worker_roots();
    roots.add_pem(expired.pem().as_bytes()).unwrap();
    let manager = workpool::Manager::bind(workpool::ManagerConfig::new(
        "127.0.0.1:0",
        certs.manager_identity(),
        roots,
    ))
    .unwrap();
    let port = manager.local_addr().port();
    let old = Worker::start(
        WorkerConfig::new(
            "127.0.0.1",
            port,
            Identity::from_pem(expired.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap(),
            TrustRoots::from_pem(certs.manager.cert_pem.as_bytes()).unwrap(),
        )
        .name("old"),
    )
    .unwrap();
    wait_until("the expired worker has tried twice", || {
        old.connection_attempts() >= 2
    });
    assert_eq!(old.sessions(), 0);
    let pool = manager.subscribe();
    let _good = Worker::start(certs.worker_config(port, 0, "good")).unwrap();
    wait_joined(&pool, 1);
    assert_eq!(run(&manager, JobSpec::new("echo ok")).stdout_text(), "ok\n");
}

#[test]
fn an_oversized_frame_length_is_cut_off_before_anything_is_allocated() {
    let c = cluster();
    let spare = trusted_cert(&c);
    let mut tls = tls_to(c.port(), Some(&spare));
    tls.write_all(&[0xff, 0xff, 0xff, 0xff]).unwrap();
    tls.flush().unwrap();
    assert!(is_cut_off(&mut tls));
    still_serving(&c);
}

#[test]
fn an_unknown_protocol_version_gets_a_readable_refusal() {
    let c = cluster();
    let spare = trusted_cert(&c);
    let mut tls = tls_to(c.port(), Some(&spare));
    tls.write_all(&hello_bytes("future", 99)).unwrap();
    let mut reader = FrameReader::new(tls, 1 << 20);
    let reply = reader.read_frame().unwrap().unwrap();
    let (version, rest) = protocol::parse_hello(&reply).unwrap();
    assert_eq!(version, protocol::PROTOCOL_VERSION);
    assert_eq!(rest[0], 1, "a refusal");
    let reason = String::from_utf8_lossy(&rest[1..]);
    assert!(
        reason.contains("version mismatch") && reason.contains("99"),
        "{reason}"
    );
    still_serving(&c);
}

#[test]
fn a_frame_that_does_not_decode_closes_only_that_link() {
    let c = cluster();
    let spare = trusted_cert(&c);
    let mut fake = FakeWorker::join(c.port(), &spare, "mangled");
    wait_joined(&c.events, 1);
    fake.raw(&[0, 0, 0, 3, 0xee, 0xee, 0xee]).unwrap();
    assert!(is_cut_off(fake.reader.get_mut()));
    wait_until("the mangled worker is gone", || {
        c.manager.workers().len() == 1
    });
    still_serving(&c);
}

#[test]
fn hundreds_of_idle_connections_do_not_keep_a_real_worker_out() {
    let c = Cluster::custom(
        0,
        |m| {
            m.handshake_timeout = Duration::from_secs(1);
            m.max_handshakes = 50;
        },
        |_, w| w,
    );
    let idle: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", c.port())).ok())
        .collect();
    assert!(
        idle.len() >= 250,
        "only {} connections were made",
        idle.len()
    );
    let _w = Worker::start(c.certs.worker_config(c.port(), 0, "patient")).unwrap();
    wait_joined(&c.events, 1);
    still_serving(&c);
    // The idle ones were cut: displaced by newer connections, or at the handshake deadline.
    for mut s in idle.into_iter().take(20) {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        assert!(is_cut_off(&mut s));
    }
}

#[test]
fn a_second_worker_claiming_a_connected_name_with_another_certificate_is_refused() {
    let c = Cluster::new(2);
    let impostor_cert = c.certs.workers[1].clone();
    let mut tls = tls_to(c.port(), Some(&impostor_cert));
    tls.write_all(&hello_bytes("w0", protocol::PROTOCOL_VERSION))
        .unwrap();
    let mut reader = FrameReader::new(tls, 1 << 20);
    let reply = reader.read_frame().unwrap().unwrap();
    let (_, rest) = protocol::parse_hello(&reply).unwrap();
    assert_eq!(rest[0], 1);
    assert!(String::from_utf8_lossy(&rest[1..]).contains("already connected"));
    assert_eq!(c.manager.workers().len(), 2);
    still_serving(&c);
}

#[test]
fn messages_about_jobs_a_worker_does_not_run_are_ignored() {
    let c = Cluster::new(0);
    let spare = c.certs.workers[0].clone();
    let mut fake = FakeWorker::join(c.port(), &spare, "liar");
    wait_joined(&c.events, 1);
    for job in [7, 999, u64::MAX] {
        fake.send(&WorkerMessage::Output {
            job: JobId(job),
            stream: Stream::Stdout,
            seq: 0,
            bytes: b"forged".to_vec(),
        })
        .unwrap();
        fake.send(&WorkerMessage::Finished {
            job: JobId(job),
            outcome: Outcome::Exited(0),
            cleanup_error: None,
        })
        .unwrap();
    }
    // The liar is still connected and is given real work, which it answers honestly.
    let h = c.manager.submit(JobSpec::new("echo real")).unwrap();
    let job = match fake.next() {
        ManagerMessage::Run { job, .. } => job,
        other => panic!("{other:?}"),
    };
    assert_eq!(job, h.id());
    fake.send(&WorkerMessage::Output {
        job,
        stream: Stream::Stdout,
        seq: 0,
        bytes: b"real\n".to_vec(),
    })
    .unwrap();
    fake.send(&WorkerMessage::Finished {
        job,
        outcome: Outcome::Exited(0),
        cleanup_error: None,
    })
    .unwrap();
    let r = h.wait();
    assert_eq!(
        (r.outcome.clone(), r.stdout_text()),
        (exited(0), "real\n".to_string())
    );
    assert!(matches!(fake.next(), ManagerMessage::Ended { job: j } if j == job));
    assert!(
        !c.events
            .try_iter()
            .any(|e| matches!(e, ManagerEvent::WorkerLeft { .. }))
    );
}

#[test]
fn thousands_of_random_well_formed_messages_do_not_upset_the_manager() {
    let c = Cluster::new(1);
    let spare = c.certs.workers[0].clone();
    let mut fake = FakeWorker::join(c.port(), &spare, "chaos");
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for _ in 0..5000 {
        let job = JobId(next() % 8);
        let msg = match next() % 5 {
            0 => WorkerMessage::Output {
                job,
                stream: if next() % 2 == 0 {
                    Stream::Stdout
                } else {
                    Stream::Stderr
                },
                seq: next() % 4,
                bytes: vec![b'x'; (next() % 200) as usize],
            },
            1 => WorkerMessage::Finished {
                job,
                outcome: Outcome::Signaled((next() % 64) as i32),
                cleanup_error: Some("x".into()),
            },
            2 => WorkerMessage::Heartbeat,
            3 => WorkerMessage::Draining,
            _ => WorkerMessage::Output {
                job,
                stream: Stream::Stdout,
                seq: u64::MAX,
                bytes: vec![],
            },
        };
        if fake.send(&msg).is_err() {
            break;
        }
    }
    still_serving(&c);
}

#[test]
fn another_certificate_cannot_take_over_a_disconnected_worker_s_jobs() {
    let certs = Certs::new(2);
    let mut cfg = certs.manager_config();
    cfg.reconnect_grace = Duration::from_secs(3);
    let manager = workpool::Manager::bind(cfg).unwrap();
    let pool = manager.subscribe();
    let relay = Relay::start(manager.local_addr());
    let _victim = Worker::start(certs.worker_config(relay.port, 0, "victim")).unwrap();
    wait_joined(&pool, 1);
    let h = manager
        .submit(JobSpec::new("echo working; sleep 600"))
        .unwrap();
    while !matches!(next_event(h.events()), workpool::JobEvent::Output { .. }) {}
    // The attacker holds a trusted certificate of its own; it learns the manager's id
    // from a welcome under another name.
    let attacker = &certs.workers[1];
    let port = manager.local_addr().port();
    let scout = {
        let mut tls = tls_to(port, Some(attacker));
        tls.write_all(&hello_bytes("scout", protocol::PROTOCOL_VERSION))
            .unwrap();
        let mut reader = FrameReader::new(tls, 1 << 20);
        let reply = reader.read_frame().unwrap().unwrap();
        let (_, rest) = protocol::parse_hello(&reply).unwrap();
        protocol::decode::<protocol::Welcome>(&rest[5..]).unwrap()
    };
    relay.refuse(true);
    relay.cut();
    wait_until("the victim is gone", || {
        !manager.workers().iter().any(|w| w.name == "victim")
    });
    // Now it claims the victim's name and job.
    let claim = WorkerHello {
        name: "victim".into(),
        tags: Default::default(),
        platform: "linux-x86_64".into(),
        slots: 1,
        ahead: 0,
        draining: false,
        manager_id: Some(scout.manager_id),
        jobs: vec![protocol::HeldJob {
            job: h.id(),
            finished: false,
            ahead: false,
            stdin_taken: 0,
        }],
    };
    let mut frame = Vec::new();
    protocol::role_hello_frame_into(&mut frame, protocol::Role::Worker, &claim).unwrap();
    let mut tls = tls_to(port, Some(attacker));
    tls.write_all(&frame).unwrap();
    let mut reader = FrameReader::new(tls, 1 << 20);
    let reply = reader.read_frame().unwrap().unwrap();
    let (_, rest) = protocol::parse_hello(&reply).unwrap();
    assert_eq!(
        rest[0], 1,
        "the name of a worker that is away was given to another certificate"
    );
    let reason = String::from_utf8_lossy(&rest[1..]);
    assert!(reason.contains("held for another certificate"), "{reason}");
    // The job waits for its own worker, and when that does not come back, ends lost.
    let (_, ends, _) = drain_job(h.events());
    assert_eq!(ends, vec![Outcome::WorkerLost]);
}
