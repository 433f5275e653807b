//! Shared test fixtures: certificates made on the spot, a manager on 127.0.0.1:0,
//! workers in this process or in a child process, and waits with deadlines.
#![allow(dead_code)]

use crossbeam_channel::Receiver;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use workpool::job::{JobEvent, JobSpec, Outcome};
use workpool::manager::{Manager, ManagerConfig, ManagerEvent};
use workpool::tls::{
    DEFAULT_VALIDITY_DAYS, GeneratedCertificate, Identity, TrustRoots,
    generate_manager_certificate, generate_worker_certificate,
};
use workpool::worker::{Worker, WorkerConfig};

/// Generous: the machines are small and shared.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub struct Certs {
    pub manager: GeneratedCertificate,
    pub workers: Vec<GeneratedCertificate>,
}

impl Certs {
    pub fn new(workers: usize) -> Certs {
        Certs {
            manager: generate_manager_certificate(
                &["localhost", "127.0.0.1"],
                DEFAULT_VALIDITY_DAYS,
            )
            .unwrap(),
            workers: (0..workers)
                .map(|i| {
                    generate_worker_certificate(&[&format!("worker-{i}")], DEFAULT_VALIDITY_DAYS)
                        .unwrap()
                })
                .collect(),
        }
    }

    pub fn manager_identity(&self) -> Identity {
        Identity::from_pem(
            self.manager.cert_pem.as_bytes(),
            self.manager.key_pem.as_bytes(),
        )
        .unwrap()
    }

    pub fn worker_roots(&self) -> TrustRoots {
        let mut r = TrustRoots::new();
        for w in &self.workers {
            r.add_pem(w.cert_pem.as_bytes()).unwrap();
        }
        r
    }

    pub fn manager_config(&self) -> ManagerConfig {
        let mut c = ManagerConfig::new("127.0.0.1:0", self.manager_identity(), self.worker_roots());
        c.shutdown_grace = Duration::from_secs(5);
        // Short, so that tests of lost workers end quickly (tests of the grace set it).
        c.reconnect_grace = Duration::from_millis(500);
        c
    }

    /// A manager that trusts certificate 0 as a worker's only and the others as
    /// submitters' only.
    pub fn submitters_manager_config(&self) -> ManagerConfig {
        let mut submitters = TrustRoots::new();
        for c in &self.workers[1..] {
            submitters.add_pinned_pem(c.cert_pem.as_bytes()).unwrap();
        }
        let worker = TrustRoots::pinned_pem(self.workers[0].cert_pem.as_bytes()).unwrap();
        let mut c = ManagerConfig::new("127.0.0.1:0", self.manager_identity(), worker)
            .submitter_trust(submitters);
        c.shutdown_grace = Duration::from_secs(5);
        c
    }

    /// Starts a manager from `config` and worker 0 (`slots` slots) on it, joined.
    pub fn manager_and_worker(&self, config: ManagerConfig, slots: u32) -> (Manager, Worker) {
        let manager = Manager::bind(config).unwrap();
        let events = manager.subscribe();
        let worker = Worker::start(
            self.worker_config(manager.local_addr().port(), 0, "w0")
                .slots(slots),
        )
        .unwrap();
        wait_joined(&events, 1);
        (manager, worker)
    }

    pub fn worker_config(&self, port: u16, i: usize, name: &str) -> WorkerConfig {
        let w = &self.workers[i];
        let mut c = WorkerConfig::new(
            "127.0.0.1",
            port,
            Identity::from_pem(w.cert_pem.as_bytes(), w.key_pem.as_bytes()).unwrap(),
            TrustRoots::from_pem(self.manager.cert_pem.as_bytes()).unwrap(),
        )
        .name(name);
        c.backoff_initial = Duration::from_millis(20);
        c.backoff_max = Duration::from_millis(300);
        c
    }

    /// Writes every certificate and key as PEM files into `dir` (the CLI's file names).
    pub fn write_to(&self, dir: &Path) {
        std::fs::write(dir.join("host-cert.pem"), &self.manager.cert_pem).unwrap();
        std::fs::write(dir.join("host-key.pem"), &self.manager.key_pem).unwrap();
        for (i, w) in self.workers.iter().enumerate() {
            std::fs::write(dir.join(format!("worker-{i}-cert.pem")), &w.cert_pem).unwrap();
            std::fs::write(dir.join(format!("worker-{i}-key.pem")), &w.key_pem).unwrap();
        }
    }
}

/// A manager with `workers` in-process workers (one slot each unless changed), all joined.
pub struct Cluster {
    pub certs: Certs,
    pub manager: Manager,
    pub events: Receiver<ManagerEvent>,
    pub workers: Vec<Worker>,
}

impl Cluster {
    pub fn new(workers: usize) -> Cluster {
        Cluster::with(workers, |_, c| c)
    }

    /// Like `new`, with each worker's config adjusted by `f(index, config)`.
    pub fn with(n: usize, f: impl Fn(usize, WorkerConfig) -> WorkerConfig) -> Cluster {
        Cluster::custom(n, |_| {}, f)
    }

    /// Like `with`, with the manager's config adjusted by `m` too.
    pub fn custom(
        n: usize,
        m: impl FnOnce(&mut ManagerConfig),
        f: impl Fn(usize, WorkerConfig) -> WorkerConfig,
    ) -> Cluster {
        let certs = Certs::new(n.max(1));
        let mut config = certs.manager_config();
        m(&mut config);
        let manager = Manager::bind(config).unwrap();
        let events = manager.subscribe();
        let port = manager.local_addr().port();
        let workers: Vec<Worker> = (0..n)
            .map(|i| Worker::start(f(i, certs.worker_config(port, i, &format!("w{i}")))).unwrap())
            .collect();
        wait_joined(&events, n);
        Cluster {
            certs,
            manager,
            events,
            workers,
        }
    }

    pub fn port(&self) -> u16 {
        self.manager.local_addr().port()
    }
}

/// Waits until `n` workers have joined (per the manager's events); returns their names.
pub fn wait_joined(events: &Receiver<ManagerEvent>, n: usize) -> Vec<String> {
    let deadline = Instant::now() + DEADLINE;
    let mut names = Vec::new();
    while names.len() < n {
        match events.recv_deadline(deadline) {
            Ok(ManagerEvent::WorkerJoined(info)) => names.push(info.name),
            Ok(_) => {}
            Err(e) => panic!(
                "only {} of {n} workers joined before the deadline: {e}",
                names.len()
            ),
        }
    }
    names
}

/// Waits for the next event of a job, with the deadline.
pub fn next_event(events: &Receiver<JobEvent>) -> JobEvent {
    events
        .recv_timeout(DEADLINE)
        .expect("a job event before the deadline")
}

/// Waits for the condition, checking it every few milliseconds, up to the deadline.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Submits and waits for the result.
pub fn run(manager: &Manager, spec: JobSpec) -> workpool::job::JobResult {
    let mut h = manager.submit(spec).unwrap();
    h.wait_timeout(DEADLINE)
        .expect("the job ends before the deadline")
}

pub fn exited(code: i32) -> Outcome {
    Outcome::Exited(code)
}

/// A fresh private scratch folder for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("workpool-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A port that was free a moment ago (for a worker that must start before its manager).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Called when something a test needs (a tool, root, namespaces) is missing. Under
/// `CI=true`, where `.ci/run` installs every tool, that is a failure; elsewhere the test
/// prints a loud skip line and the caller returns without asserting anything.
pub fn missing_prerequisite(test: &str, why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {why} (CI=true: a test whose tool is missing fails)");
    }
    eprintln!("\n*** SKIPPED {test}: {why} ***\n");
}

/// Whether `tool` runs (trying `-V`, then `--version`).
pub fn have_tool(tool: &str) -> bool {
    ["-V", "--version"].iter().any(|flag| {
        std::process::Command::new(tool)
            .arg(flag)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok()
    })
}

/// Whether a process exists (signal 0).
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only asks whether the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// The body of a worker process started by `spawn_worker_process`: the test binary runs
/// itself with `worker_process_helper --exact --ignored`, and that ignored test calls this.
/// Without the environment it returns at once, so that running ignored tests is harmless.
pub fn worker_process_main() {
    let Ok(port) = std::env::var("WP_HELPER_PORT") else {
        return;
    };
    let dir = PathBuf::from(std::env::var("WP_HELPER_DIR").unwrap());
    let host = std::env::var("WP_HELPER_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let cfg = WorkerConfig::new(
        host,
        port.parse().unwrap(),
        Identity::from_pem_files(dir.join("worker-0-cert.pem"), dir.join("worker-0-key.pem"))
            .unwrap(),
        TrustRoots::from_pem_files([dir.join("host-cert.pem")]).unwrap(),
    )
    .name(std::env::var("WP_HELPER_NAME").unwrap());
    let _w = Worker::start(cfg).unwrap();
    // Serve until killed (the test kills this process by PID).
    loop {
        std::thread::park();
    }
}

/// Starts a worker in a child process of its own (see `worker_process_main`).
pub fn spawn_worker_process(dir: &Path, port: u16, name: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "worker_process_helper",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("WP_HELPER_PORT", port.to_string())
        .env("WP_HELPER_DIR", dir)
        .env("WP_HELPER_NAME", name)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// A TCP relay between workers and a manager that the test controls: it can cut every
/// connection (as a dropped link), refuse new ones (as a network that stays down), or
/// black-hole existing ones (bytes vanish, sockets stay open: a cut cable).
pub struct Relay {
    pub port: u16,
    state: std::sync::Arc<RelayState>,
}

/// One relayed connection: the worker's side, the manager's side, and whether its bytes
/// vanish.
type Relayed = (
    std::net::TcpStream,
    std::net::TcpStream,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
);

#[derive(Default)]
struct RelayState {
    conns: std::sync::Mutex<Vec<Relayed>>,
    /// When a relayed connection ends, leave the worker's side open (it learns nothing).
    keep_worker_side: std::sync::atomic::AtomicBool,
    refusing: std::sync::atomic::AtomicBool,
    stopped: std::sync::atomic::AtomicBool,
}

impl Relay {
    pub fn start(target: std::net::SocketAddr) -> Relay {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = std::sync::Arc::new(RelayState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if st.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if st.refusing.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let hole = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    let hole = hole.clone();
                    let (st, worker_side) = (st.clone(), client.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            match std::io::Read::read(&mut from, &mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if hole.load(Ordering::SeqCst) {
                                        continue; // the bytes vanish
                                    }
                                    if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let keep = st.keep_worker_side.load(Ordering::SeqCst);
                        for s in [&to, &from] {
                            let is_worker_side = s.peer_addr().ok() == worker_side.peer_addr().ok();
                            if !(keep && is_worker_side) {
                                let _ = s.shutdown(std::net::Shutdown::Both);
                            }
                        }
                    });
                }
                st.conns.lock().unwrap().push((client, server, hole));
            }
        });
        Relay { port, state }
    }

    /// Closes every relayed connection now.
    pub fn cut(&self) {
        for (a, b, _) in self.state.conns.lock().unwrap().drain(..) {
            let _ = a.shutdown(std::net::Shutdown::Both);
            let _ = b.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Closes only the manager's side of every relayed connection: the manager sees the
    /// link drop at once, the worker only when its heartbeats go unanswered.
    pub fn cut_manager_side(&self) {
        self.state
            .keep_worker_side
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for (_, server, _) in self.state.conns.lock().unwrap().drain(..) {
            let _ = server.shutdown(std::net::Shutdown::Both);
        }
    }

    /// New connections are dropped at once (true) or relayed again (false).
    pub fn refuse(&self, refusing: bool) {
        self.state
            .refusing
            .store(refusing, std::sync::atomic::Ordering::SeqCst);
    }

    /// Existing connections silently lose every byte from now on; their sockets stay open.
    pub fn black_hole(&self) {
        for (_, _, hole) in self.state.conns.lock().unwrap().iter() {
            hole.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state
            .stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.cut();
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Reads a job's events to the end: (every stdout byte in order, every Finished).
pub fn drain_job(events: &Receiver<JobEvent>) -> (Vec<u8>, Vec<Outcome>, Vec<JobEvent>) {
    let (mut out, mut ends, mut all) = (Vec::new(), Vec::new(), Vec::new());
    while let Ok(ev) = events.recv_timeout(DEADLINE) {
        match &ev {
            JobEvent::Output {
                stream: workpool::Stream::Stdout,
                bytes,
            } => out.extend_from_slice(bytes),
            JobEvent::Finished(o) => ends.push(o.clone()),
            _ => {}
        }
        all.push(ev);
    }
    (out, ends, all)
}

/// The example binary that `cargo test` builds next to this test.
pub fn cli() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let bin = profile_dir.join("examples").join("workpool");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--example", "workpool"])
            .status()
            .unwrap();
        assert!(status.success());
    }
    bin
}

/// Arguments for a CLI manager on any free port, JSON out, trusting `worker-0`.
pub fn manager_args(dir: &std::path::Path) -> Vec<String> {
    let f = |n: &str| dir.join(n).display().to_string();
    vec![
        "manager".into(),
        "-p".into(),
        "0".into(),
        "--json".into(),
        "--security-pool-certificate".into(),
        f("host-cert.pem"),
        "--security-pool-key".into(),
        f("host-key.pem"),
        "--security-worker-certificates".into(),
        f("worker-0-cert.pem"),
    ]
}

/// Waits for a job's first output and reads the number it starts with (the tests' jobs
/// print `$$` first, to be found by PID later).
pub fn first_number(events: &Receiver<JobEvent>) -> i32 {
    loop {
        match next_event(events) {
            JobEvent::Output { bytes, .. } => {
                let text = String::from_utf8_lossy(&bytes);
                let first = text.split_whitespace().next().unwrap_or_default();
                return first
                    .parse()
                    .unwrap_or_else(|_| panic!("no number first in {text:?}"));
            }
            JobEvent::Finished(o) => panic!("ended before any output: {o}"),
            _ => {}
        }
    }
}

/// A CLI manager (`manager_args`, any free port, JSON out) and where it listens.
pub struct CliManager {
    pub child: std::process::Child,
    pub stdout: std::io::BufReader<std::process::ChildStdout>,
    pub addr: std::net::SocketAddr,
}

/// Starts a CLI manager and reads its `listening` event.
pub fn start_cli_manager(dir: &Path) -> CliManager {
    start_cli_manager_with(dir, &[])
}

/// [`start_cli_manager`] with more arguments after the usual ones.
pub fn start_cli_manager_with(dir: &Path, extra: &[&str]) -> CliManager {
    use std::io::BufRead;
    use std::process::Stdio;
    let mut child = std::process::Command::new(cli())
        .args(manager_args(dir))
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let listening: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(listening["event"], "listening", "{first}");
    let addr = listening["address"].as_str().unwrap().parse().unwrap();
    CliManager {
        child,
        stdout,
        addr,
    }
}

/// Whether the tests run as root (they do in CI).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// For a test that needs root: true when running as root. Otherwise it fails the test
/// under `CI=true` (CI runs as root, so the test must really run there) and prints a loud
/// skip line elsewhere.
pub fn root_or_skip(test: &str) -> bool {
    if running_as_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} needs root, and CI runs tests as root"
    );
    // Straight to stderr, past the test harness's capture, so that it is seen.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("!!!!! SKIPPED {test}: it needs root (not running as root) !!!!!\n").as_bytes(),
    );
    false
}

/// Writes a CA (`ca-cert.pem`) and certificates it issued under the CLI's file names into
/// `dir`: `host-cert.pem`/`host-key.pem` (serverAuth, for localhost and 127.0.0.1) and
/// `worker-I-cert.pem`/`worker-I-key.pem` (clientAuth).
pub fn write_ca_issued(dir: &Path, workers: usize) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa};
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "workpool test CA");
    std::fs::write(
        dir.join("ca-cert.pem"),
        ca.self_signed(&ca_key).unwrap().pem(),
    )
    .unwrap();
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let issue = |names: &[&str], purpose: ExtendedKeyUsagePurpose, file: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{file}-cert.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}-key.pem")), key.serialize_pem()).unwrap();
    };
    issue(
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
        "host",
    );
    for i in 0..workers {
        let name = format!("worker-{i}");
        issue(&[&name], ExtendedKeyUsagePurpose::ClientAuth, &name);
    }
}

/// Trusts any server: for tests whose peer attacks the manager, not the other way round.
#[derive(Debug)]
pub struct AnyServer(pub std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Log lines, captured so that tests can look at what was logged (a test binary's one
/// logger: every test in it sees the lines of all).
struct Capture;

static LOGGED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let mut lines = LOGGED.lock().unwrap_or_else(|p| p.into_inner());
            if lines.len() < 200_000 {
                lines.push(r.args().to_string());
            }
        }
    }
    fn flush(&self) {}
}

/// Captures log lines at `level` and above from now on (the first call's level holds).
pub fn capture_logs(level: log::LevelFilter) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::set_logger(&Capture).expect("no other logger in this test binary");
        log::set_max_level(level);
    });
}

/// Captured log lines that contain `marker`.
pub fn logged(marker: &str) -> Vec<String> {
    let lines = LOGGED.lock().unwrap_or_else(|p| p.into_inner());
    lines
        .iter()
        .filter(|l| l.contains(marker))
        .cloned()
        .collect()
}
