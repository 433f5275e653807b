//! Trust as the seed used it: certificates made by `openssl req -x509` with openssl's
//! defaults (self-signed, `CA:TRUE`, no subjectAltName), each side pinning the other's;
//! trust through a CA that issued the worker certificates; pinned certificates that are
//! accepted only as themselves; certificates that say what they are for; key files
//! written safely; and a worker's name bound to its certificate.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use workpool::job::JobSpec;
use workpool::manager::{Manager, ManagerConfig};
use workpool::tls::{Identity, PeerTrust, TrustRoots};
use workpool::worker::{Worker, WorkerConfig};

fn openssl(dir: &Path, name: &str, key_args: &[&str]) {
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey"])
        .args(key_args)
        .args(["-days", "3650", "-nodes", "-subj", &format!("/CN={name}")])
        .arg("-keyout")
        .arg(dir.join(format!("{name}-key.pem")))
        .arg("-out")
        .arg(dir.join(format!("{name}-cert.pem")))
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cluster_with_openssl_certs(label: &str, key_args: &[&str]) {
    let dir = scratch(label);
    openssl(&dir, "host", key_args);
    openssl(&dir, "worker-0", key_args);
    let manager = Manager::bind(ManagerConfig::new(
        "127.0.0.1:0",
        Identity::from_pem_files(dir.join("host-cert.pem"), dir.join("host-key.pem")).unwrap(),
        TrustRoots::from_pem_files([dir.join("worker-0-cert.pem")]).unwrap(),
    ))
    .unwrap();
    let events = manager.subscribe();
    // No subjectAltName in these certificates: like the seed, hostname checks are off.
    let worker = WorkerConfig::new(
        "127.0.0.1",
        manager.local_addr().port(),
        Identity::from_pem_files(dir.join("worker-0-cert.pem"), dir.join("worker-0-key.pem"))
            .unwrap(),
        TrustRoots::from_pem_files([dir.join("host-cert.pem")]).unwrap(),
    )
    .name("openssl-worker")
    .no_verify_hostname();
    let _w = Worker::start(worker).unwrap();
    wait_joined(&events, 1);
    let r = run(&manager, JobSpec::new("echo pinned"));
    assert_eq!(r.outcome, exited(0));
    assert_eq!(r.stdout_text(), "pinned\n");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn openssl_default_rsa_certificates_work_pinned_like_the_seeds() {
    cluster_with_openssl_certs("openssl-rsa", &["rsa:2048"]);
}

#[test]
fn openssl_default_ec_certificates_work_pinned() {
    cluster_with_openssl_certs("openssl-ec", &["ec", "-pkeyopt", "ec_paramgen_curve:P-256"]);
}

#[test]
fn worker_certificates_issued_by_a_trusted_ca_are_accepted_and_others_are_not() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "workpool test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["ca-worker".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();

    let certs = Certs::new(0);
    let manager = Manager::bind(ManagerConfig::new(
        "127.0.0.1:0",
        certs.manager_identity(),
        PeerTrust::ca_pem(ca_cert.pem().as_bytes()).unwrap(),
    ))
    .unwrap();
    let events = manager.subscribe();
    let port = manager.local_addr().port();
    let manager_root = || TrustRoots::from_pem(certs.manager.cert_pem.as_bytes()).unwrap();
    let issued = WorkerConfig::new(
        "127.0.0.1",
        port,
        Identity::from_pem(leaf.pem().as_bytes(), leaf_key.serialize_pem().as_bytes()).unwrap(),
        manager_root(),
    )
    .name("issued");
    let _w = Worker::start(issued).unwrap();
    assert_eq!(wait_joined(&events, 1), vec!["issued".to_string()]);
    assert_eq!(
        run(&manager, JobSpec::new("echo chained")).stdout_text(),
        "chained\n"
    );

    // A self-signed certificate the CA never issued is refused.
    let stray = workpool::tls::generate_self_signed(&["stray"]).unwrap();
    let stray_cfg = WorkerConfig::new(
        "127.0.0.1",
        port,
        Identity::from_pem(stray.cert_pem.as_bytes(), stray.key_pem.as_bytes()).unwrap(),
        manager_root(),
    )
    .name("stray");
    let stray = Worker::start(stray_cfg).unwrap();
    wait_until("the stray worker has tried twice", || {
        stray.connection_attempts() >= 2
    });
    assert_eq!(stray.sessions(), 0);
    assert_eq!(manager.workers().len(), 1);

    // Nor is the CA's own certificate a worker's, even with the CA's key.
    let ca_as_worker = Worker::start(
        WorkerConfig::new(
            "127.0.0.1",
            port,
            Identity::from_pem(ca_cert.pem().as_bytes(), ca_key.serialize_pem().as_bytes())
                .unwrap(),
            manager_root(),
        )
        .name("the-ca"),
    )
    .unwrap();
    assert!(
        !joins(&ca_as_worker),
        "the CA's certificate joined as a worker"
    );
    assert_eq!(manager.workers().len(), 1);
}

#[test]
fn plaintext_works_only_when_both_sides_opt_in() {
    let manager = Manager::bind(ManagerConfig::insecure_plaintext("127.0.0.1:0")).unwrap();
    let events = manager.subscribe();
    let _w = Worker::start(
        WorkerConfig::insecure_plaintext("127.0.0.1", manager.local_addr().port()).name("plain"),
    )
    .unwrap();
    wait_joined(&events, 1);
    assert_eq!(
        run(&manager, JobSpec::new("echo clear")).stdout_text(),
        "clear\n"
    );

    // A TLS worker cannot talk to a plaintext manager.
    let certs = Certs::new(1);
    let tls_worker =
        Worker::start(certs.worker_config(manager.local_addr().port(), 0, "tls")).unwrap();
    wait_until("the TLS worker has tried twice", || {
        tls_worker.connection_attempts() >= 2
    });
    assert_eq!(tls_worker.sessions(), 0);
}

#[test]
fn unreadable_or_mismatched_files_give_one_clear_error() {
    let dir = scratch("bad-files");
    let e = Identity::from_pem_files(dir.join("missing-cert.pem"), dir.join("missing-key.pem"))
        .unwrap_err();
    assert!(e.to_string().contains("missing-cert.pem"), "{e}");
    let certs = Certs::new(2);
    certs.write_to(&dir);
    let e = Identity::from_pem_files(dir.join("worker-0-cert.pem"), dir.join("worker-1-key.pem"))
        .unwrap_err();
    assert!(e.to_string().contains("does not fit"), "{e}");
    let e = TrustRoots::from_pem_files([dir.join("worker-0-key.pem")]).unwrap_err();
    assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A self-signed certificate that says it is a CA (as `openssl req -x509` makes them),
/// its key, and an issuer that signs with that key.
fn self_signed_ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair, rcgen::CertificateParams) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    (cert, key, params)
}

/// A certificate for `names` signed with `issuer_key` (whose certificate's subject
/// becomes its issuer), and its own key.
fn minted_by(
    issuer_params: rcgen::CertificateParams,
    issuer_key: &rcgen::KeyPair,
    names: &[&str],
) -> (String, String) {
    let issuer = rcgen::Issuer::new(issuer_params, issuer_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let cert = rcgen::CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Waits until the worker has joined once or tried twice; true when it joined.
fn joins(worker: &Worker) -> bool {
    wait_until("the worker has joined or tried twice", || {
        worker.sessions() > 0 || worker.connection_attempts() >= 2
    });
    worker.sessions() > 0
}

#[test]
fn a_pinned_worker_certificate_is_not_an_issuer_even_when_it_says_ca() {
    // worker-0's certificate says CA:TRUE, as openssl's do; only it is pinned.
    let (w0_cert, w0_key, w0_params) = self_signed_ca("worker-0");
    let certs = Certs::new(0);
    let manager = Manager::bind(ManagerConfig::new(
        "127.0.0.1:0",
        certs.manager_identity(),
        TrustRoots::from_pem(w0_cert.pem().as_bytes()).unwrap(),
    ))
    .unwrap();
    let port = manager.local_addr().port();
    let manager_root = || TrustRoots::from_pem(certs.manager.cert_pem.as_bytes()).unwrap();

    // Whoever holds worker-0's key signs a certificate for any name it likes.
    let (minted_cert, minted_key) = minted_by(w0_params, &w0_key, &["mallory"]);
    let mallory = Worker::start(
        WorkerConfig::new(
            "127.0.0.1",
            port,
            Identity::from_pem(minted_cert.as_bytes(), minted_key.as_bytes()).unwrap(),
            manager_root(),
        )
        .name("mallory"),
    )
    .unwrap();
    assert!(
        !joins(&mallory),
        "a certificate minted with a pinned key joined"
    );
    assert!(manager.workers().is_empty());

    // The pinned certificate itself is still accepted.
    let events = manager.subscribe();
    let real = WorkerConfig::new(
        "127.0.0.1",
        port,
        Identity::from_pem(w0_cert.pem().as_bytes(), w0_key.serialize_pem().as_bytes()).unwrap(),
        manager_root(),
    )
    .name("worker-0");
    let _real = Worker::start(real).unwrap();
    assert_eq!(wait_joined(&events, 1), vec!["worker-0".to_string()]);
    assert_eq!(run(&manager, JobSpec::new("echo me")).stdout_text(), "me\n");
}
