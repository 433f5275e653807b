//! Roles: the manager trusts workers and submitters through two lists of their own. A
//! certificate only the worker list accepts cannot submit, one only the submitter list
//! accepts cannot take jobs, and each refusal is one line to the peer that says why,
//! logged by the manager with the peer's address. Pinned certificates and CAs alike.

mod common;

use common::*;
use workpool::Error;
use workpool::manager::{Manager, ManagerConfig};
use workpool::protocol::{SubmitterHello, WorkerHello};
use workpool::testing;
use workpool::tls::{GeneratedCertificate, Identity, PeerTrust, TrustRoots};
use workpool::worker::{Worker, WorkerConfig};

const WORKER_CANNOT_SUBMIT: &str = "this certificate is trusted for workers, not for submitters: a worker certificate cannot submit jobs";
const SUBMITTER_CANNOT_WORK: &str = "this certificate is trusted for submitters, not for workers: a submitter certificate cannot take jobs";

/// A client certificate and its key.
struct Client {
    cert_pem: String,
    key_pem: String,
}

impl Client {
    fn identity(&self) -> Identity {
        Identity::from_pem(self.cert_pem.as_bytes(), self.key_pem.as_bytes()).unwrap()
    }
}

impl From<&GeneratedCertificate> for Client {
    fn from(g: &GeneratedCertificate) -> Client {
        Client {
            cert_pem: g.cert_pem.clone(),
            key_pem: g.key_pem.clone(),
        }
    }
}

/// A CA, as PEM, and a clientAuth certificate it issued for each name.
fn ca_issuing(ca_name: &str, names: &[&str]) -> (String, Vec<Client>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa};
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let clients = names
        .iter()
        .map(|name| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
            params.distinguished_name.push(DnType::CommonName, *name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            Client {
                cert_pem: params.signed_by(&key, &issuer).unwrap().pem(),
                key_pem: key.serialize_pem(),
            }
        })
        .collect();
    (ca_pem, clients)
}

/// A worker's certificate, a submitter's, the trust lists that make them so, and the
/// manager's certificate.
struct Roles {
    certs: Certs,
    worker: Client,
    submitter: Client,
    worker_trust: PeerTrust,
    submitter_trust: PeerTrust,
}

impl Roles {
    /// Self-signed certificates, each pinned in its own list.
    fn pinned() -> Roles {
        let certs = Certs::new(0);
        let days = workpool::tls::DEFAULT_VALIDITY_DAYS;
        let worker = workpool::tls::generate_worker_certificate(&["a-worker"], days).unwrap();
        let submitter =
            workpool::tls::generate_submitter_certificate(&["a-submitter"], days).unwrap();
        Roles {
            worker_trust: PeerTrust::pinned_pem(worker.cert_pem.as_bytes()).unwrap(),
            submitter_trust: PeerTrust::pinned_pem(submitter.cert_pem.as_bytes()).unwrap(),
            worker: (&worker).into(),
            submitter: (&submitter).into(),
            certs,
        }
    }

    /// Certificates issued by two CAs: the workers' and the submitters'.
    fn through_cas() -> Roles {
        let (worker_ca, mut workers) = ca_issuing("worker CA", &["a-worker"]);
        let (submitter_ca, mut submitters) = ca_issuing("submitter CA", &["a-submitter"]);
        Roles {
            certs: Certs::new(0),
            worker: workers.remove(0),
            submitter: submitters.remove(0),
            worker_trust: PeerTrust::ca_pem(worker_ca.as_bytes()).unwrap(),
            submitter_trust: PeerTrust::ca_pem(submitter_ca.as_bytes()).unwrap(),
        }
    }

    fn manager(&self) -> Manager {
        Manager::bind(
            ManagerConfig::new(
                "127.0.0.1:0",
                self.certs.manager_identity(),
                self.worker_trust.clone(),
            )
            .submitter_trust(self.submitter_trust.clone()),
        )
        .unwrap()
    }

    fn manager_trust(&self) -> TrustRoots {
        TrustRoots::from_pem(self.certs.manager.cert_pem.as_bytes()).unwrap()
    }

    /// Says a submitter's hello with `client`'s certificate.
    fn as_submitter(&self, manager: &Manager, client: &Client, name: &str) -> workpool::Result<()> {
        let hello = SubmitterHello {
            name: name.into(),
            resume: None,
        };
        testing::connect_submitter(
            &manager.local_addr().to_string(),
            "localhost",
            &client.identity(),
            &self.manager_trust(),
            &hello,
            DEADLINE,
        )
        .map(|_| ())
    }

    /// Says a worker's hello with `client`'s certificate.
    fn as_worker(&self, manager: &Manager, client: &Client, name: &str) -> workpool::Result<()> {
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
        testing::connect_worker(
            &manager.local_addr().to_string(),
            "localhost",
            &client.identity(),
            &self.manager_trust(),
            &hello,
            DEADLINE,
        )
        .map(|_| ())
    }

    fn worker_config(&self, manager: &Manager, client: &Client, name: &str) -> WorkerConfig {
        let mut c = WorkerConfig::new(
            "127.0.0.1",
            manager.local_addr().port(),
            client.identity(),
            self.manager_trust(),
        )
        .name(name);
        c.backoff_initial = std::time::Duration::from_millis(20);
        c.backoff_max = std::time::Duration::from_millis(300);
        c
    }
}

/// The manager's refusal, which must be one line with `why` in it, and its log line
/// (a warning naming the peer's address and the hello's name).
fn assert_refused(result: workpool::Result<()>, why: &str, name: &str) {
    match result {
        Err(Error::Refused(text)) => {
            assert!(text.contains(why), "{text}");
            assert!(!text.contains('\n'), "one line: {text:?}");
        }
        Err(e) => panic!("{name}: not the manager's refusal: {e}"),
        Ok(()) => panic!("{name} was welcomed"),
    }
    let lines = logged(&format!("{name:?}"));
    assert!(
        lines
            .iter()
            .any(|l| l.contains(why) && l.contains("at 127.0.0.1:")),
        "{name}: no log line with the reason and the peer's address: {lines:?}"
    );
}

/// Whatever the submitter's own service says, a hello of the role its certificate is
/// trusted for is not refused for its role.
fn assert_not_refused_for_its_role(result: workpool::Result<()>, name: &str) {
    if let Err(e) = result {
        let text = e.to_string();
        assert!(
            !text.contains("this certificate is"),
            "{name} was refused for its role: {text}"
        );
        assert!(
            matches!(e, Error::Refused(_)),
            "{name}: the connection itself failed: {text}"
        );
    }
}

fn roles_are_kept_apart(roles: Roles, label: &str) {
    capture_logs(log::LevelFilter::Warn);
    let manager = roles.manager();
    let events = manager.subscribe();

    // A worker certificate cannot submit jobs.
    let name = format!("{label}-worker-cert-as-submitter");
    let r = roles.as_submitter(&manager, &roles.worker, &name);
    assert_refused(r, WORKER_CANNOT_SUBMIT, &name);

    // A submitter certificate cannot take jobs: a hand-driven worker hello...
    let name = format!("{label}-submitter-cert-as-worker");
    let r = roles.as_worker(&manager, &roles.submitter, &name);
    assert_refused(r, SUBMITTER_CANNOT_WORK, &name);

    // ...and a real worker, which never gets a session.
    let name = format!("{label}-submitter-cert-worker");
    let refused = Worker::start(roles.worker_config(&manager, &roles.submitter, &name)).unwrap();
    wait_until(
        "the worker with a submitter certificate has tried twice",
        || refused.connection_attempts() >= 2,
    );
    assert_eq!(refused.sessions(), 0);
    assert!(manager.workers().is_empty());
    assert!(
        logged(&format!("{name:?}"))
            .iter()
            .any(|l| l.contains(SUBMITTER_CANNOT_WORK)),
        "the manager logged why"
    );
    refused.stop();

    // Each certificate in its own role is not refused for it.
    let name = format!("{label}-submitter");
    assert_not_refused_for_its_role(roles.as_submitter(&manager, &roles.submitter, &name), &name);
    let name = format!("{label}-worker");
    let _w = Worker::start(roles.worker_config(&manager, &roles.worker, &name)).unwrap();
    assert_eq!(wait_joined(&events, 1), vec![name]);
    let r = run(
        &manager,
        workpool::job::JobSpec::new("echo the job of a worker"),
    );
    assert_eq!(r.stdout_text(), "the job of a worker\n");
}

#[test]
fn a_pinned_worker_certificate_cannot_submit_and_a_pinned_submitter_certificate_cannot_take_jobs() {
    roles_are_kept_apart(Roles::pinned(), "pinned");
}

#[test]
fn a_worker_certificate_from_the_worker_ca_cannot_submit_nor_one_from_the_submitter_ca_take_jobs() {
    roles_are_kept_apart(Roles::through_cas(), "ca");
}

#[test]
fn a_certificate_in_both_lists_may_take_both_roles() {
    capture_logs(log::LevelFilter::Warn);
    let mut roles = Roles::pinned();
    roles
        .submitter_trust
        .add_pinned_pem(roles.worker.cert_pem.as_bytes())
        .unwrap();
    let manager = roles.manager();
    let name = "both-as-submitter";
    assert_not_refused_for_its_role(roles.as_submitter(&manager, &roles.worker, name), name);
    roles
        .as_worker(&manager, &roles.worker, "both-as-worker")
        .unwrap();
}

#[test]
fn without_submitter_trust_no_certificate_can_submit_and_workers_still_work() {
    capture_logs(log::LevelFilter::Warn);
    let roles = Roles::pinned();
    // ManagerConfig::new alone: workers only.
    let manager = Manager::bind(ManagerConfig::new(
        "127.0.0.1:0",
        roles.certs.manager_identity(),
        roles.worker_trust.clone(),
    ))
    .unwrap();
    let name = "no-submitters-here";
    let r = roles.as_submitter(&manager, &roles.worker, name);
    assert_refused(r, WORKER_CANNOT_SUBMIT, name);
    roles
        .as_worker(&manager, &roles.worker, "still-a-worker")
        .unwrap();
    // And a manager that trusts submitters only starts, and takes no worker.
    let manager = Manager::bind(
        ManagerConfig::new(
            "127.0.0.1:0",
            roles.certs.manager_identity(),
            PeerTrust::new(),
        )
        .submitter_trust(roles.submitter_trust.clone()),
    )
    .unwrap();
    let name = "no-workers-here";
    let r = roles.as_worker(&manager, &roles.worker, name);
    match r {
        // Neither list knows this certificate: the handshake itself fails.
        Err(Error::Refused(text)) => panic!("{name}: passed the handshake: {text}"),
        Err(_) => {}
        Ok(()) => panic!("{name} was welcomed"),
    }
    // Nothing trusted at all: refused when configured.
    let err = Manager::bind(ManagerConfig::new(
        "127.0.0.1:0",
        roles.certs.manager_identity(),
        PeerTrust::new(),
    ))
    .err()
    .unwrap();
    assert!(
        err.to_string()
            .contains("no worker or submitter certificates"),
        "{err}"
    );
}
