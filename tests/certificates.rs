//! Trust as the seed used it: certificates made by `openssl req -x509` with openssl's
//! defaults (self-signed, `CA:TRUE`, no subjectAltName), each side pinning the other's;
//! trust through a CA that issued the worker certificates; pinned certificates that are
//! accepted only as themselves; certificates that say what they are for; key files
//! written safely; and a worker's name bound to its certificate.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use workpool::job::JobSpec;
use workpool::job::{JobEvent, JobState};
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

#[test]
fn a_pinned_manager_certificate_is_not_an_issuer_even_when_it_says_ca() {
    // The worker pins the manager's certificate, which says CA:TRUE.
    let (host_cert, host_key, host_params) = self_signed_ca("127.0.0.1");
    let certs = Certs::new(1);
    let w = &certs.workers[0];
    let worker_identity =
        || Identity::from_pem(w.cert_pem.as_bytes(), w.key_pem.as_bytes()).unwrap();
    // A manager whose certificate was signed with the pinned certificate's key.
    let (minted_cert, minted_key) = minted_by(host_params, &host_key, &["127.0.0.1"]);
    let fake = Manager::bind(ManagerConfig::new(
        "127.0.0.1:0",
        Identity::from_pem(minted_cert.as_bytes(), minted_key.as_bytes()).unwrap(),
        certs.worker_roots(),
    ))
    .unwrap();
    let fooled = Worker::start(
        WorkerConfig::new(
            "127.0.0.1",
            fake.local_addr().port(),
            worker_identity(),
            TrustRoots::from_pem(host_cert.pem().as_bytes()).unwrap(),
        )
        .name("w0"),
    )
    .unwrap();
    assert!(
        !joins(&fooled),
        "a manager certificate minted with the pinned key was accepted"
    );
    assert!(fake.workers().is_empty());

    // The pinned certificate itself is accepted.
    let real = Manager::bind(ManagerConfig::new(
        "127.0.0.1:0",
        Identity::from_pem(
            host_cert.pem().as_bytes(),
            host_key.serialize_pem().as_bytes(),
        )
        .unwrap(),
        certs.worker_roots(),
    ))
    .unwrap();
    let events = real.subscribe();
    let _w = Worker::start(
        WorkerConfig::new(
            "127.0.0.1",
            real.local_addr().port(),
            worker_identity(),
            TrustRoots::from_pem(host_cert.pem().as_bytes()).unwrap(),
        )
        .name("w0"),
    )
    .unwrap();
    wait_joined(&events, 1);
}

/// A self-signed `CA:FALSE` certificate for 127.0.0.1 with one extendedKeyUsage, and its
/// key (PEM).
fn for_purpose(purpose: rcgen::ExtendedKeyUsagePurpose) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![purpose];
    (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

#[test]
fn a_worker_certificate_is_refused_as_the_manager_s_and_the_manager_s_as_a_worker_s() {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let (server_cert, server_key) = for_purpose(ServerAuth);
    let (client_cert, client_key) = for_purpose(ClientAuth);
    let pinned = |pem: &str| TrustRoots::from_pem(pem.as_bytes()).unwrap();
    let identity = |c: &str, k: &str| Identity::from_pem(c.as_bytes(), k.as_bytes()).unwrap();
    let manager_with = |cert: &str, key: &str, trusted: &str| {
        Manager::bind(ManagerConfig::new(
            "127.0.0.1:0",
            identity(cert, key),
            pinned(trusted),
        ))
        .unwrap()
    };
    let worker_to = |m: &Manager, cert: &str, key: &str, trusted: &str, name: &str| {
        Worker::start(
            WorkerConfig::new(
                "127.0.0.1",
                m.local_addr().port(),
                identity(cert, key),
                pinned(trusted),
            )
            .name(name),
        )
        .unwrap()
    };

    // A manager showing a clientAuth certificate: the worker that pins it refuses it.
    let m = manager_with(&client_cert, &client_key, &client_cert);
    let w = worker_to(
        &m,
        &client_cert,
        &client_key,
        &client_cert,
        "client-as-server",
    );
    assert!(
        !joins(&w),
        "a clientAuth certificate was accepted as the manager's"
    );

    // A worker showing a serverAuth certificate: the manager that pins it refuses it.
    let m = manager_with(&server_cert, &server_key, &server_cert);
    let w = worker_to(
        &m,
        &server_cert,
        &server_key,
        &server_cert,
        "server-as-client",
    );
    assert!(
        !joins(&w),
        "a serverAuth certificate was accepted as a worker's"
    );
    assert!(m.workers().is_empty());

    // Each for its own purpose: accepted.
    let m = manager_with(&server_cert, &server_key, &client_cert);
    let events = m.subscribe();
    let _w = worker_to(
        &m,
        &client_cert,
        &client_key,
        &server_cert,
        "right-way-round",
    );
    assert_eq!(wait_joined(&events, 1), vec!["right-way-round".to_string()]);
}

/// Runs the CLI to its end: (exit code, stdout, stderr).
fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cli())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What `openssl x509` says about a certificate file (with extra arguments); and whether
/// it exited 0.
fn openssl_x509(cert: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-in"])
        .arg(cert)
        .args(args)
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn generated_certificates_say_what_they_are_for_and_expire() {
    let dir = scratch("gen-purpose");
    let (code, _, err) = run_cli(&[
        "generate-tls-certificates",
        "--hostname",
        "pool.example",
        "--days",
        "30",
        "--output-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let (host, worker) = (dir.join("host-cert.pem"), dir.join("worker-0-cert.pem"));
    let (_, host_text) = openssl_x509(&host, &["-text"]);
    let (_, worker_text) = openssl_x509(&worker, &["-text"]);
    assert!(
        host_text.contains("TLS Web Server Authentication"),
        "{host_text}"
    );
    assert!(
        !host_text.contains("TLS Web Client Authentication"),
        "{host_text}"
    );
    assert!(
        worker_text.contains("TLS Web Client Authentication"),
        "{worker_text}"
    );
    assert!(
        !worker_text.contains("TLS Web Server Authentication"),
        "{worker_text}"
    );
    for (text, file) in [(&host_text, &host), (&worker_text, &worker)] {
        assert!(text.contains("CA:FALSE"), "{text}");
        // Valid 29 days from now, not 31.
        assert!(openssl_x509(file, &["-checkend", &(29 * 86_400).to_string()]).0);
        assert!(!openssl_x509(file, &["-checkend", &(31 * 86_400).to_string()]).0);
    }
    // The default is ten years.
    let (code, _, err) = run_cli(&[
        "generate-tls-certificates",
        "--hostname",
        "pool.example",
        "--force",
        "--output-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let ten_years = 3650 * 86_400u64;
    assert!(openssl_x509(&host, &["-checkend", &(ten_years - 86_400).to_string()]).0);
    assert!(!openssl_x509(&host, &["-checkend", &(ten_years + 86_400).to_string()]).0);
    let (code, _, err) = run_cli(&[
        "generate-tls-certificates",
        "--hostname",
        "x",
        "--days",
        "0",
        "--output-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--days"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn generating_certificates_never_writes_through_existing_files() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = scratch("gen-files");
    let d = dir.to_str().unwrap();
    let generate = |force: bool| {
        let mut args = vec![
            "generate-tls-certificates",
            "--hostname",
            "h",
            "--output-dir",
            d,
        ];
        if force {
            args.push("--force");
        }
        run_cli(&args)
    };
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let mode = |f: &str| {
        std::fs::symlink_metadata(dir.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    let (code, _, err) = generate(false);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        (mode("host-key.pem"), mode("worker-0-key.pem")),
        (0o600, 0o600)
    );
    let first_worker_key = read("worker-0-key.pem");

    // host-key.pem is now a symlink to a file that is not ours to write; worker-0's key
    // has mode 0644 and a second link.
    let target = dir.join("precious");
    std::fs::write(&target, "not a key").unwrap();
    std::fs::remove_file(dir.join("host-key.pem")).unwrap();
    std::os::unix::fs::symlink(&target, dir.join("host-key.pem")).unwrap();
    let worker_key = dir.join("worker-0-key.pem");
    std::fs::set_permissions(&worker_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::hard_link(&worker_key, dir.join("old-worker-key")).unwrap();
    let old_inode = std::fs::metadata(&worker_key).unwrap().ino();
    let host_cert = read("host-cert.pem");

    // Without --force: refused, nothing written.
    let (code, _, err) = generate(false);
    assert_ne!(code, 0, "existing files were overwritten without --force");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(read("host-cert.pem"), host_cert);
    assert_eq!(read("worker-0-key.pem"), first_worker_key);
    assert_eq!(read("precious"), "not a key");

    // With --force: each file is replaced by a new one; the symlink is not followed,
    // and no old mode survives.
    let (code, _, err) = generate(true);
    assert_eq!(code, 0, "{err}");
    assert_eq!(read("precious"), "not a key");
    let host_key = std::fs::symlink_metadata(dir.join("host-key.pem")).unwrap();
    assert!(
        host_key.file_type().is_file(),
        "host-key.pem is still a symlink"
    );
    assert_eq!(mode("host-key.pem"), 0o600);
    assert_eq!(mode("worker-0-key.pem"), 0o600);
    assert_ne!(read("worker-0-key.pem"), first_worker_key);
    assert_ne!(std::fs::metadata(&worker_key).unwrap().ino(), old_inode);
    assert_eq!(
        read("old-worker-key"),
        first_worker_key,
        "rewritten in place"
    );
    assert_ne!(read("host-cert.pem"), host_cert);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_cli_takes_cas_and_pinned_certificates_apart() {
    use std::io::{BufRead, Read, Write};
    let dir = scratch("cli-ca");
    write_ca_issued(&dir, 1);
    let f = |n: &str| dir.join(n).display().to_string();
    // A certificate a CA issued cannot be pinned.
    let (code, _, err) = run_cli(&[
        "manager",
        "-p",
        "0",
        "--security-pool-certificate",
        &f("host-cert.pem"),
        "--security-pool-key",
        &f("host-key.pem"),
        "--security-worker-certificates",
        &f("worker-0-cert.pem"),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("self-signed"), "{err}");

    // Through the CA on both sides: the worker joins and runs the job.
    let mut manager = Command::new(cli())
        .args([
            "manager",
            "-p",
            "0",
            "--json",
            "--security-pool-certificate",
        ])
        .args([
            f("host-cert.pem"),
            "--security-pool-key".into(),
            f("host-key.pem"),
        ])
        .args(["--security-worker-ca".into(), f("ca-cert.pem")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(manager.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let listening: serde_json::Value = serde_json::from_str(&line).unwrap();
    let port = listening["address"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let mut worker = Command::new(cli())
        .args([
            "worker",
            "-p",
            &port,
            "--name",
            "via-ca",
            "--security-pool-ca",
        ])
        .args([f("ca-cert.pem"), "--security-worker-certificate".into()])
        .args([f("worker-0-cert.pem"), "--security-worker-key".into()])
        .arg(f("worker-0-key.pem"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        let mut stdin = manager.stdin.take().unwrap();
        stdin.write_all(b"echo through the CA\n").unwrap();
    } // end of stdin: the manager runs the job, then exits
    let mut rest = String::new();
    let read = stdout.read_to_string(&mut rest);
    let ended = manager.wait().unwrap();
    worker.kill().unwrap();
    worker.wait().unwrap();
    read.unwrap();
    assert!(ended.success());
    assert!(rest.contains("\"worker_joined\""), "{rest}");
    assert!(rest.contains("through the CA"), "{rest}");
    assert!(rest.contains("via-ca"), "{rest}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Lets a job blocked in `cat FIFO` go on: opens the FIFO for writing (without blocking:
/// retried until the job has it open for reading) and closes it.
fn release(fifo: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    wait_until("the job reads its FIFO", || {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
            .is_ok()
    });
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// A manager with a long reconnect grace (never waited out here), and the worker named
/// `real` (certificate 0) joined through a relay the test can cut.
fn away_and_back() -> (Certs, Manager, Relay, Worker) {
    let certs = Certs::new(2);
    let mut cfg = certs.manager_config();
    cfg.reconnect_grace = Duration::from_secs(120);
    let manager = Manager::bind(cfg).unwrap();
    let pool = manager.subscribe();
    let relay = Relay::start(manager.local_addr());
    let real = Worker::start(certs.worker_config(relay.port, 0, "real")).unwrap();
    wait_joined(&pool, 1);
    // Joined on the worker's side too (it has read its welcome).
    wait_until("the real worker has its session", || real.sessions() == 1);
    (certs, manager, relay, real)
}

/// Cuts the real worker off (it cannot come back until `relay.refuse(false)`).
fn cut_off(manager: &Manager, relay: &Relay) {
    relay.refuse(true);
    relay.cut();
    wait_until("the real worker is gone", || manager.workers().is_empty());
}

/// An impostor: a trusted certificate of its own (certificate 1), claiming `real`.
/// Returns once it has been refused twice.
fn impostor_is_refused(certs: &Certs, manager: &Manager) -> Worker {
    let impostor =
        Worker::start(certs.worker_config(manager.local_addr().port(), 1, "real")).unwrap();
    assert!(!joins(&impostor), "another certificate took the name");
    wait_until("the impostor has tried three times", || {
        impostor.connection_attempts() >= 3
    });
    assert_eq!(impostor.sessions(), 0);
    impostor
}

#[test]
fn a_worker_s_name_and_jobs_stay_bound_to_its_certificate_while_it_is_away() {
    let (certs, manager, relay, real) = away_and_back();
    let dir = scratch("name-binding");
    let fifo = dir.join("go");
    mkfifo(&fifo);
    let h = manager
        .submit(JobSpec::new(format!(
            "echo started; cat '{}'; echo finished",
            fifo.display()
        )))
        .unwrap();
    while !matches!(next_event(h.events()), JobEvent::Output { .. }) {}
    cut_off(&manager, &relay);

    // While the real worker is away, its name is not free for another certificate,
    // and its job keeps waiting for it.
    let impostor = impostor_is_refused(&certs, &manager);
    assert!(manager.workers().is_empty());
    assert_eq!(
        manager.job(h.id()).map(|s| s.state),
        Some(JobState::Disconnected {
            worker: "real".into()
        })
    );

    // The real worker comes back and goes on with its job.
    relay.refuse(false);
    wait_until("the real worker is back", || {
        manager.workers().iter().any(|w| w.name == "real") && real.sessions() == 2
    });
    release(&fifo);
    let (out, ends, _) = drain_job(h.events());
    assert_eq!(ends, vec![exited(0)]);
    // ("started" was read above, before the cut.)
    assert_eq!(String::from_utf8_lossy(&out), "finished\n");
    // The impostor is still out: the name is held by the connected worker now.
    assert_eq!(impostor.sessions(), 0);
    assert_eq!(manager.workers().len(), 1);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_worker_s_name_stays_bound_to_its_certificate_while_it_is_away_without_jobs() {
    let (certs, manager, relay, real) = away_and_back();
    cut_off(&manager, &relay);
    let impostor = impostor_is_refused(&certs, &manager);
    relay.refuse(false);
    wait_until("the real worker is back", || {
        manager.workers().iter().any(|w| w.name == "real") && real.sessions() == 2
    });
    assert_eq!(
        run(&manager, JobSpec::new("echo back")).stdout_text(),
        "back\n"
    );
    assert_eq!(impostor.sessions(), 0);
}
