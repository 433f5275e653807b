//! The workpool benchmark: each figure next to a baseline measured in the same run, on
//! loopback with real mutual TLS.
//!
//! ```text
//! cargo run --release --example bench                  # default sizes, a few minutes on 2 cores
//! cargo run --release --example bench -- --quick       # seconds (the test suite runs this)
//! cargo run --release --example bench -- --json out.json
//! cargo run --release --example bench -- --workers 1000,2000,4000 [--per-process 1000]
//! cargo run --release --example bench -- --instructions [--jobs 100,300] [--keep-callgrind DIR]
//! ```
//!
//! Workers run as separate processes: this binary started again with `__worker` (one
//! worker) or `__workers` (many workers in one process, for the scale scenario).
//! `--workers` runs the scale scenario alone at each size, after checking that the
//! threads it needs fit under `kernel.pid_max` and the descriptors under `RLIMIT_NOFILE`
//! (raised as far as the process may). `--instructions` counts, with valgrind's callgrind,
//! the instructions a manager process (`__manager`) and a worker process execute per
//! trivial job. Memory, threads, descriptors and CPU time are read from `/proc`, so the
//! benchmark is Linux-only.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};
use workpool::job::{JobEvent, JobSpec, Outcome};
use workpool::manager::{Manager, ManagerConfig, ManagerEvent};
use workpool::tls::{GeneratedCertificate, Identity, TrustRoots, generate_self_signed};
use workpool::worker::{Worker, WorkerConfig};
use workpool::{Client, ClientConfig, JobHandle};

struct Sizes {
    throughput_jobs: usize,
    latency_jobs: usize,
    stream_bytes: u64,
    scale_workers: usize,
    /// Most workers in one worker process in the scale scenario.
    scale_per_host: usize,
    scale_probes: usize,
    /// How long the manager's CPU is watched with every worker connected and idle.
    idle_window: Duration,
    queue_jobs: usize,
    drain_jobs: usize,
    /// Durable submits per run from 4, 16 and 64 threads (from one thread: an eighth).
    journal_submits: usize,
    /// Runs of each journal measurement (their median is reported).
    journal_runs: usize,
    /// `fsync` calls timed before each run of durable submits (its baseline).
    journal_fsyncs: usize,
    /// Jobs queued in the journal before the timed restart.
    journal_restart_jobs: usize,
    /// Jobs run through a journal between two looks at its size.
    journal_compact_jobs: usize,
    /// Ended jobs the journal keeps in the compaction measurement.
    journal_keep: usize,
    /// How long the journal's files stay the same before its size is taken (its writer
    /// compacts within a second of jobs ending).
    journal_settle: Duration,
}

const FULL: Sizes = Sizes {
    throughput_jobs: 2000,
    latency_jobs: 300,
    stream_bytes: 1 << 30,
    scale_workers: 1000,
    scale_per_host: 500,
    scale_probes: 200,
    idle_window: Duration::from_secs(5),
    queue_jobs: 100_000,
    drain_jobs: 2000,
    journal_submits: 6400,
    journal_runs: 3,
    journal_fsyncs: 100,
    journal_restart_jobs: 100_000,
    journal_compact_jobs: 20_000,
    journal_keep: 1000,
    journal_settle: Duration::from_millis(2500),
};

const QUICK: Sizes = Sizes {
    throughput_jobs: 60,
    latency_jobs: 20,
    stream_bytes: 16 << 20,
    scale_workers: 20,
    scale_per_host: 10,
    scale_probes: 20,
    idle_window: Duration::from_millis(500),
    queue_jobs: 2000,
    drain_jobs: 40,
    journal_submits: 128,
    journal_runs: 1,
    journal_fsyncs: 10,
    journal_restart_jobs: 2000,
    journal_compact_jobs: 100,
    journal_keep: 20,
    journal_settle: Duration::from_millis(1500),
};

/// One line of the table.
struct Row {
    scenario: String,
    metric: String,
    value: String,
    baseline: String,
    ratio: Option<f64>,
    goal: String,
}

struct Certs {
    dir: PathBuf,
    host: GeneratedCertificate,
    worker: GeneratedCertificate,
}

impl Certs {
    fn new() -> Certs {
        let dir = std::env::temp_dir().join(format!("workpool-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let host = generate_self_signed(&["127.0.0.1"]).unwrap();
        let worker = generate_self_signed(&["bench-worker"]).unwrap();
        std::fs::write(dir.join("host-cert.pem"), &host.cert_pem).unwrap();
        std::fs::write(dir.join("host-key.pem"), &host.key_pem).unwrap();
        std::fs::write(dir.join("worker-cert.pem"), &worker.cert_pem).unwrap();
        std::fs::write(dir.join("worker-key.pem"), &worker.key_pem).unwrap();
        Certs { dir, host, worker }
    }

    fn manager(&self) -> Manager {
        Manager::bind(self.config()).unwrap()
    }

    fn config(&self) -> ManagerConfig {
        bench_config(
            self.host.cert_pem.as_bytes(),
            self.host.key_pem.as_bytes(),
            self.worker.cert_pem.as_bytes(),
        )
    }
}

/// The benchmark's manager: a large queue, no grace on shutdown, and admission limits
/// opened for many workers that share one certificate and one source address.
fn manager_config(host_cert: &[u8], host_key: &[u8], worker_cert: &[u8]) -> Manager {
    Manager::bind(bench_config(host_cert, host_key, worker_cert)).unwrap()
}

fn bench_config(host_cert: &[u8], host_key: &[u8], worker_cert: &[u8]) -> ManagerConfig {
    let mut c = ManagerConfig::new(
        "127.0.0.1:0",
        Identity::from_pem(host_cert, host_key).unwrap(),
        TrustRoots::from_pem(worker_cert).unwrap(),
    );
    c.queue_capacity = 1_000_000;
    c.shutdown_grace = Duration::ZERO;
    c.result_output_limit = 1 << 20;
    c.max_connections_per_certificate = 100_000;
    c.max_handshakes_per_source = c.max_handshakes;
    // The benchmark's one certificate also submits (the remote streaming rows).
    c.submitter_trust(TrustRoots::from_pem(worker_cert).unwrap())
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Worker processes, killed by PID on drop.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn worker_processes(certs: &Certs, manager: &Manager, n: usize, slots: u32) -> Procs {
    let events = manager.subscribe();
    let exe = std::env::current_exe().unwrap();
    let procs = Procs(
        (0..n)
            .map(|i| {
                Command::new(&exe)
                    .args([
                        "__worker",
                        &manager.local_addr().port().to_string(),
                        &format!("p{i}"),
                        &slots.to_string(),
                    ])
                    .arg(&certs.dir)
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    wait_joined(&events, n);
    procs
}

fn wait_joined(events: &crossbeam_channel::Receiver<ManagerEvent>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut joined = 0;
    while joined < n {
        match events.recv_deadline(deadline) {
            Ok(ManagerEvent::WorkerJoined(_)) => joined += 1,
            Ok(_) => {}
            Err(_) => panic!("only {joined} of {n} workers joined"),
        }
    }
}

fn worker_main(args: &[String]) {
    let (port, name, slots, dir) = (&args[0], &args[1], &args[2], Path::new(&args[3]));
    let cfg = WorkerConfig::new(
        "127.0.0.1",
        port.parse().unwrap(),
        Identity::from_pem_files(dir.join("worker-cert.pem"), dir.join("worker-key.pem")).unwrap(),
        TrustRoots::from_pem_files([dir.join("host-cert.pem")]).unwrap(),
    )
    .name(name.clone())
    .slots(slots.parse().unwrap());
    let _w = Worker::start(cfg).unwrap();
    loop {
        std::thread::park();
    }
}

fn local_true() {
    let s = Command::new("/bin/bash")
        .args(["-c", "true"])
        .status()
        .unwrap();
    assert!(s.success());
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn proc_status(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn throughput(certs: &Certs, s: &Sizes, k: usize, rows: &mut Vec<Row>) -> f64 {
    let manager = certs.manager();
    let _procs = worker_processes(certs, &manager, k, 1);
    let t = Instant::now();
    let handles: Vec<_> = (0..s.throughput_jobs)
        .map(|_| manager.submit(JobSpec::new("true")).unwrap())
        .collect();
    for h in handles {
        assert_eq!(h.wait().outcome, Outcome::Exited(0));
    }
    let pool = t.elapsed();
    let t = Instant::now();
    std::thread::scope(|sc| {
        for _ in 0..k {
            sc.spawn(|| {
                for _ in 0..s.throughput_jobs / k {
                    local_true();
                }
            });
        }
    });
    let local = t.elapsed();
    let (pool_rate, local_rate) = (
        s.throughput_jobs as f64 / pool.as_secs_f64(),
        s.throughput_jobs as f64 / local.as_secs_f64(),
    );
    rows.push(Row {
        scenario: "1 throughput".into(),
        metric: format!(
            "{} `true` jobs, {k} worker processes × 1 slot",
            s.throughput_jobs
        ),
        value: format!("{pool_rate:.0} jobs/s"),
        baseline: format!("{local_rate:.0} jobs/s (local bash -c true, {k} at a time)"),
        ratio: Some(pool_rate / local_rate),
        goal: "≥ 0.9".into(),
    });
    local_rate
}

fn latency(certs: &Certs, s: &Sizes, rows: &mut Vec<Row>) {
    let manager = certs.manager();
    let _procs = worker_processes(certs, &manager, 1, 1);
    let mut pool: Vec<Duration> = (0..s.latency_jobs)
        .map(|_| {
            let t = Instant::now();
            assert_eq!(
                manager.submit(JobSpec::new("true")).unwrap().wait().outcome,
                Outcome::Exited(0)
            );
            t.elapsed()
        })
        .collect();
    let mut local: Vec<Duration> = (0..s.latency_jobs)
        .map(|_| {
            let t = Instant::now();
            local_true();
            t.elapsed()
        })
        .collect();
    pool.sort();
    local.sort();
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        let (p, l) = (percentile(&pool, q), percentile(&local, q));
        rows.push(Row {
            scenario: "2 latency".into(),
            metric: format!("{name} submit→finished, one job at a time"),
            value: us(p),
            baseline: format!("{} (local bash -c true)", us(l)),
            ratio: Some(l.as_secs_f64() / p.as_secs_f64()),
            goal: if q == 0.5 { "overhead < 200 µs" } else { "" }.into(),
        });
    }
    let overhead = percentile(&pool, 0.5).saturating_sub(percentile(&local, 0.5));
    rows.push(Row {
        scenario: "2 latency".into(),
        metric: "p50 overhead (workpool − local)".into(),
        value: us(overhead),
        baseline: "-".into(),
        ratio: None,
        goal: "< 200 µs".into(),
    });
}

fn raw_tls_seconds(certs: &Certs, bytes: u64) -> f64 {
    use std::io::{Read, Write};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![
                rustls::pki_types::pem::PemObject::from_pem_slice(certs.host.cert_pem.as_bytes())
                    .unwrap(),
            ],
            rustls::pki_types::pem::PemObject::from_pem_slice(certs.host.key_pem.as_bytes())
                .unwrap(),
        )
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            rustls::pki_types::pem::PemObject::from_pem_slice(certs.host.cert_pem.as_bytes())
                .unwrap(),
        )
        .unwrap();
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_nodelay(true).unwrap();
        let conn = rustls::ServerConnection::new(Arc::new(server_cfg)).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let chunk = vec![0u8; 60_000];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            tls.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
        tls.flush().unwrap();
        tls.conn.send_close_notify();
        let _ = tls.flush();
    });
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(client_cfg), "127.0.0.1".try_into().unwrap())
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let t = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while got < bytes {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) => panic!("raw TLS read: {e}"),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    server.join().unwrap();
    assert_eq!(got, bytes);
    secs
}

fn streaming(certs: &Certs, s: &Sizes, rows: &mut Vec<Row>) {
    let manager = certs.manager();
    let _procs = worker_processes(certs, &manager, 1, 1);
    reset_peak();
    let rss_before = proc_status("VmRSS:");
    let h = manager
        .submit(JobSpec::new(format!(
            "head -c {} /dev/zero",
            s.stream_bytes
        )))
        .unwrap();
    let t = Instant::now();
    let mut got = 0u64;
    for ev in h.events() {
        match ev {
            JobEvent::Output { bytes, .. } => got += bytes.len() as u64,
            JobEvent::Finished(o) => {
                assert_eq!(o, Outcome::Exited(0));
                break;
            }
            _ => {}
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let peak = proc_status("VmHWM:");
    assert_eq!(got, s.stream_bytes);
    let remote = remote_stream_seconds(certs, &manager, s.stream_bytes);
    let cli = cli_stream_seconds(certs, &manager, s.stream_bytes);
    let raw = raw_tls_seconds(certs, s.stream_bytes);
    let gb = |secs: f64| format!("{:.2} GB/s", s.stream_bytes as f64 / secs / 1e9);
    rows.push(Row {
        scenario: "3 streaming".into(),
        metric: format!("{} of stdout to the submitter", mib(s.stream_bytes)),
        value: gb(secs),
        baseline: format!("{} (raw rustls over loopback)", gb(raw)),
        ratio: Some(raw / secs),
        goal: "≥ 0.5".into(),
    });
    let library = format!("{} (the same to a submitter in process)", gb(secs));
    rows.push(Row {
        scenario: "3 streaming".into(),
        metric: format!(
            "{} of stdout to a remote submitter (`Client`, in this process)",
            mib(s.stream_bytes)
        ),
        value: gb(remote),
        baseline: library.clone(),
        ratio: Some(secs / remote),
        goal: "≥ 0.8".into(),
    });
    match cli {
        Ok(cli) => rows.push(Row {
            scenario: "3 streaming".into(),
            metric: format!(
                "{} of stdout through `workpool submit` to /dev/null (its start included)",
                mib(s.stream_bytes)
            ),
            value: gb(cli),
            baseline: library,
            ratio: Some(secs / cli),
            goal: "≥ 0.8".into(),
        }),
        Err(why) => eprintln!("bench: `workpool submit` not measured: {why}"),
    }
    rows.push(Row {
        scenario: "3 streaming".into(),
        metric: "manager process peak RSS during the stream".into(),
        value: mib(peak),
        baseline: format!("{} before", mib(rss_before)),
        ratio: None,
        goal: "bounded".into(),
    });
}

/// The command that streams `bytes` of zeros.
fn zeros(bytes: u64) -> JobSpec {
    JobSpec::new(format!("head -c {bytes} /dev/zero"))
}

/// Seconds for `bytes` of a job's stdout to reach a remote client in this process.
fn remote_stream_seconds(certs: &Certs, manager: &Manager, bytes: u64) -> f64 {
    let config = ClientConfig::new(
        "127.0.0.1",
        manager.local_addr().port(),
        Identity::from_pem(
            certs.worker.cert_pem.as_bytes(),
            certs.worker.key_pem.as_bytes(),
        )
        .unwrap(),
        TrustRoots::from_pem(certs.host.cert_pem.as_bytes()).unwrap(),
    );
    let client = Client::connect(config).unwrap();
    let job = client.submit(zeros(bytes)).unwrap();
    let t = Instant::now();
    let mut got = 0u64;
    for ev in job.events() {
        match ev {
            JobEvent::Output { bytes, .. } => got += bytes.len() as u64,
            JobEvent::Finished(o) => {
                assert_eq!(o, Outcome::Exited(0));
                break;
            }
            _ => {}
        }
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(got, bytes);
    client.close();
    secs
}

/// Seconds from starting `workpool submit -- head -c BYTES /dev/zero` (stdout to
/// /dev/null) to its exit: the CLI built beside this benchmark.
fn cli_stream_seconds(certs: &Certs, manager: &Manager, bytes: u64) -> Result<f64, String> {
    let exe = std::env::current_exe().unwrap();
    let cli = exe.with_file_name("workpool");
    if !cli.exists() {
        return Err(format!(
            "{} is missing (cargo build --release --example workpool)",
            cli.display()
        ));
    }
    let d = &certs.dir;
    let t = Instant::now();
    let status = Command::new(&cli)
        .args(["submit", "-p", &manager.local_addr().port().to_string()])
        .arg("--security-pool-certificate")
        .arg(d.join("host-cert.pem"))
        .arg("--security-submitter-certificate")
        .arg(d.join("worker-cert.pem"))
        .arg("--security-submitter-key")
        .arg(d.join("worker-key.pem"))
        .args(["--", &format!("head -c {bytes} /dev/zero")])
        .stdout(std::process::Stdio::null())
        .env("RUST_LOG", "warn")
        .status()
        .map_err(|e| format!("cannot run {}: {e}", cli.display()))?;
    let secs = t.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("`workpool submit` failed: {status}"));
    }
    Ok(secs)
}

fn median_dispatch(manager: &Manager, probes: usize) -> Duration {
    let mut v: Vec<Duration> = (0..probes)
        .map(|_| {
            let t = Instant::now();
            let h = manager.submit(JobSpec::new("true")).unwrap();
            loop {
                match h.events().recv().unwrap() {
                    JobEvent::Started { .. } => break,
                    JobEvent::Finished(o) => panic!("ended before starting: {o}"),
                    _ => {}
                }
            }
            let d = t.elapsed();
            let _ = h.wait();
            d
        })
        .collect();
    v.sort();
    percentile(&v, 0.5)
}

/// What `/proc/PID` says about one process.
#[derive(Clone, Copy, Default)]
struct ProcFigures {
    rss: u64,
    vsz: u64,
    threads: usize,
    fds: usize,
    /// User plus system CPU time, in clock ticks.
    cpu_ticks: u64,
}

fn proc_figures(pid: u32) -> ProcFigures {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis start at field 3 (state); utime and
    // stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    ProcFigures {
        rss: field("VmRSS:") * 1024,
        vsz: field("VmSize:") * 1024,
        threads: field("Threads:") as usize,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count()),
        cpu_ticks: f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0),
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Threads (kernel tasks) alive on the whole machine: the fourth field of /proc/loadavg.
fn system_threads() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    s.split_whitespace().nth(3)?.split_once('/')?.1.parse().ok()
}

/// Raises this process's open-file limit: the soft limit to the hard one, and the hard one
/// to `want` if that is higher and the process may (CAP_SYS_RESOURCE). Returns the soft
/// limit in force afterwards.
fn raise_nofile(want: u64) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 0;
    }
    if want > r.rlim_max {
        let up = libc::rlimit {
            rlim_cur: want,
            rlim_max: want,
        };
        // SAFETY: `up` is a valid rlimit; failure (no privilege, above fs.nr_open) is handled.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &up) } == 0 {
            return want;
        }
    }
    let soft = libc::rlimit {
        rlim_cur: r.rlim_max,
        rlim_max: r.rlim_max,
    };
    // SAFETY: `soft` is a valid rlimit whose soft limit equals the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } == 0 {
        r.rlim_max
    } else {
        r.rlim_cur
    }
}

/// The kind of a thread, from its name (`wp-job-17` and `wp-job-18` are one kind).
fn thread_kind(comm: &str, main: bool) -> String {
    if main {
        return "main".into();
    }
    for prefix in ["wp-worker-", "wp-job-"] {
        if comm.starts_with(prefix) {
            return format!("{prefix}*");
        }
    }
    comm.to_string()
}

/// One kind of thread in one process: how many, the stack reserved for each (the size
/// of the mapping that holds its stack pointer) and the most of it any of them has
/// touched (resident pages of that mapping: a high-water mark, since a thread's stack
/// pages stay resident while it lives).
struct StackKind {
    kind: String,
    threads: usize,
    reserved: u64,
    touched_max: u64,
}

/// The stacks of a process's threads, by kind; threads whose stack pointer cannot be
/// read (running at that moment) are counted with zeros.
fn stack_kinds(pid: u32) -> Vec<StackKind> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut maps: Vec<(u64, u64, u64)> = Vec::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            maps.push((a, b, 0));
        } else if let Some(kb) = line.strip_prefix("Rss:")
            && let Some(m) = maps.last_mut()
        {
            m.2 = kb
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024;
        }
    }
    let mut kinds: Vec<StackKind> = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    for t in tasks.flatten() {
        let tid = t.file_name().to_string_lossy().to_string();
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let kind = thread_kind(comm.trim(), tid == pid.to_string());
        // "nr args... sp pc" while in a system call, "-1 sp pc" while blocked outside
        // one, "running" while on a CPU.
        let syscall = std::fs::read_to_string(t.path().join("syscall")).unwrap_or_default();
        let fields: Vec<&str> = syscall.split_whitespace().collect();
        let sp = (fields.len() >= 3)
            .then(|| fields[fields.len() - 2].trim_start_matches("0x"))
            .and_then(|x| u64::from_str_radix(x, 16).ok());
        let (reserved, touched) = sp
            .and_then(|sp| maps.iter().find(|m| m.0 <= sp && sp < m.1))
            .map_or((0, 0), |m| (m.1 - m.0, m.2));
        merge_kinds(
            &mut kinds,
            vec![StackKind {
                kind,
                threads: 1,
                reserved,
                touched_max: touched,
            }],
        );
    }
    kinds
}

/// Adds the kinds of another process to `into` (threads summed, sizes the largest).
fn merge_kinds(into: &mut Vec<StackKind>, more: Vec<StackKind>) {
    for k in more {
        match into.iter_mut().find(|i| i.kind == k.kind) {
            Some(i) => {
                i.threads += k.threads;
                i.reserved = i.reserved.max(k.reserved);
                i.touched_max = i.touched_max.max(k.touched_max);
            }
            None => into.push(k),
        }
    }
    into.sort_by(|a, b| b.threads.cmp(&a.threads).then(a.kind.cmp(&b.kind)));
}

/// Worker-host processes (this binary started with `__workers`), each holding many
/// workers. Closing a host's stdin ends it; dropping kills them by PID.
struct Hosts(Vec<Child>);

impl Drop for Hosts {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `__workers PORT FIRST COUNT DIR`: starts COUNT workers named `hFIRST`… in this
/// process and keeps them until stdin closes.
fn workers_main(args: &[String]) {
    let (port, first, count, dir) = (
        args[0].parse::<u16>().unwrap(),
        args[1].parse::<usize>().unwrap(),
        args[2].parse::<usize>().unwrap(),
        Path::new(&args[3]),
    );
    raise_nofile(count as u64 * 8 + 256);
    let identity =
        Identity::from_pem_files(dir.join("worker-cert.pem"), dir.join("worker-key.pem")).unwrap();
    let trust = TrustRoots::from_pem_files([dir.join("host-cert.pem")]).unwrap();
    let mut workers = Vec::with_capacity(count);
    for i in first..first + count {
        let mut c = WorkerConfig::new("127.0.0.1", port, identity.clone(), trust.clone())
            .name(format!("h{i}"));
        c.backoff_max = Duration::from_secs(2);
        match Worker::start(c) {
            Ok(w) => workers.push(w),
            Err(e) => {
                eprintln!("worker host: worker h{i}: {e}");
                std::process::exit(3);
            }
        }
    }
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    // The manager sees every link close at once; no worker is stopped one by one.
    std::process::exit(0);
}

/// Everything one scale run measured.
struct ScaleRun {
    workers: usize,
    hosts: usize,
    join: Duration,
    manager_before: ProcFigures,
    manager_after: ProcFigures,
    host_figures: Vec<ProcFigures>,
    idle_window: Duration,
    manager_idle_ticks: u64,
    hosts_idle_ticks: u64,
    dispatch_p50: Duration,
    manager_stacks: Vec<StackKind>,
    host_stacks: Vec<StackKind>,
}

impl ScaleRun {
    fn manager_rss_per_worker(&self) -> f64 {
        self.manager_after
            .rss
            .saturating_sub(self.manager_before.rss) as f64
            / self.workers as f64
    }
    fn manager_vsz_per_worker(&self) -> f64 {
        self.manager_after
            .vsz
            .saturating_sub(self.manager_before.vsz) as f64
            / self.workers as f64
    }
    fn manager_threads_per_worker(&self) -> f64 {
        self.manager_after
            .threads
            .saturating_sub(self.manager_before.threads) as f64
            / self.workers as f64
    }
    /// Not counting the pipe to each worker process's stdin, which this process holds.
    fn manager_fds_per_worker(&self) -> f64 {
        (self.manager_after.fds).saturating_sub(self.manager_before.fds + self.hosts) as f64
            / self.workers as f64
    }
    /// Each host has one main thread besides its workers' threads.
    fn host_threads_per_worker(&self) -> f64 {
        let t: usize = self.host_figures.iter().map(|f| f.threads - 1).sum();
        t as f64 / self.workers as f64
    }
    fn host_rss_per_worker(&self) -> f64 {
        self.host_figures.iter().map(|f| f.rss).sum::<u64>() as f64 / self.workers as f64
    }
    fn host_vsz_per_worker(&self) -> f64 {
        self.host_figures.iter().map(|f| f.vsz).sum::<u64>() as f64 / self.workers as f64
    }
    fn cpu_percent(&self, ticks: u64) -> f64 {
        ticks as f64 / clock_ticks_per_second() / self.idle_window.as_secs_f64() * 100.0
    }
}

/// `n` workers in processes of at most `per_host` each, against one manager in this
/// process: the time for all to join, what they cost the manager, its idle CPU, and the
/// median submit→started.
fn scale_run(
    certs: &Certs,
    n: usize,
    per_host: usize,
    probes: usize,
    idle: Duration,
) -> Result<ScaleRun, String> {
    let me = std::process::id();
    let manager = certs.manager();
    let events = manager.subscribe();
    let manager_before = proc_figures(me);
    let exe = std::env::current_exe().unwrap();
    let port = manager.local_addr().port().to_string();
    let t = Instant::now();
    let mut hosts = Hosts(Vec::new());
    for first in (0..n).step_by(per_host.max(1)) {
        let count = per_host.min(n - first);
        let child = Command::new(&exe)
            .args(["__workers", &port, &first.to_string(), &count.to_string()])
            .arg(&certs.dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("starting a worker host: {e}"))?;
        hosts.0.push(child);
    }
    let deadline = Instant::now() + Duration::from_secs(120 + n as u64 / 20);
    let mut joined = 0;
    while joined < n {
        match events.recv_timeout(Duration::from_millis(500)) {
            Ok(ManagerEvent::WorkerJoined(_)) => joined += 1,
            Ok(_) => {}
            Err(_) => {
                for h in &mut hosts.0 {
                    if let Ok(Some(status)) = h.try_wait() {
                        return Err(format!(
                            "a worker host ended ({status}) with {joined} of {n} workers joined"
                        ));
                    }
                }
                if Instant::now() > deadline {
                    return Err(format!("only {joined} of {n} workers joined in time"));
                }
            }
        }
    }
    let join = t.elapsed();
    let pids: Vec<u32> = hosts.0.iter().map(Child::id).collect();
    // A link's threads start around its join event: wait until no process's thread count
    // has changed for 300 ms (at most 10 s).
    let threads = || -> Vec<usize> {
        std::iter::once(me)
            .chain(pids.iter().copied())
            .map(|p| proc_figures(p).threads)
            .collect()
    };
    let (mut seen, mut since, settle) = (threads(), Instant::now(), Instant::now());
    while since.elapsed() < Duration::from_millis(300) && settle.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
        let now = threads();
        if now != seen {
            (seen, since) = (now, Instant::now());
        }
    }
    let manager_after = proc_figures(me);
    let host_figures: Vec<ProcFigures> = pids.iter().map(|&p| proc_figures(p)).collect();
    // Stacks, with one job running (its thread has spawned the job and waits for it).
    let probe = manager.submit(JobSpec::new("sleep 2")).unwrap();
    while !matches!(probe.events().recv(), Ok(JobEvent::Started { .. }) | Err(_)) {}
    let mut host_stacks = Vec::new();
    for &p in &pids {
        merge_kinds(&mut host_stacks, stack_kinds(p));
    }
    let manager_stacks = stack_kinds(me);
    assert_eq!(probe.wait().outcome, Outcome::Exited(0));
    // Idle: every worker connected, no job anywhere; only heartbeats move.
    let m0 = proc_figures(me).cpu_ticks;
    let h0: u64 = pids.iter().map(|&p| proc_figures(p).cpu_ticks).sum();
    let window = Instant::now();
    std::thread::sleep(idle);
    let idle_window = window.elapsed();
    let manager_idle_ticks = proc_figures(me).cpu_ticks.saturating_sub(m0);
    let hosts_idle_ticks = pids
        .iter()
        .map(|&p| proc_figures(p).cpu_ticks)
        .sum::<u64>()
        .saturating_sub(h0);
    let dispatch_p50 = median_dispatch(&manager, probes);
    drop(hosts);
    manager.shutdown_within(Duration::ZERO);
    Ok(ScaleRun {
        workers: n,
        hosts: pids.len(),
        join,
        manager_before,
        manager_after,
        host_figures,
        idle_window,
        manager_idle_ticks,
        hosts_idle_ticks,
        dispatch_p50,
        manager_stacks,
        host_stacks,
    })
}

fn kib(b: f64) -> String {
    format!("{:.0} KiB", b / 1024.0)
}

fn scale_rows(one: &ScaleRun, run: &ScaleRun, rows: &mut Vec<Row>) {
    let n = run.workers;
    rows.push(Row {
        scenario: "4 scale".into(),
        metric: format!("{n} workers in {} processes join", run.hosts),
        value: format!("{:.3} s", run.join.as_secs_f64()),
        baseline: format!("{:.3} s for 1 worker", one.join.as_secs_f64()),
        ratio: None,
        goal: "".into(),
    });
    rows.push(Row {
        scenario: "4 scale".into(),
        metric: format!("manager memory per connected worker, {n} workers"),
        value: format!(
            "{} RSS ({} VSZ)",
            kib(run.manager_rss_per_worker()),
            kib(run.manager_vsz_per_worker())
        ),
        baseline: format!("{} RSS before", mib(run.manager_before.rss)),
        ratio: None,
        goal: "≤ 100 KiB".into(),
    });
    rows.push(Row {
        scenario: "4 scale".into(),
        metric: format!("worker-process memory per worker, {n} workers"),
        value: format!(
            "{} RSS ({} VSZ)",
            kib(run.host_rss_per_worker()),
            kib(run.host_vsz_per_worker())
        ),
        baseline: "-".into(),
        ratio: None,
        goal: "".into(),
    });
    rows.push(Row {
        scenario: "4 scale".into(),
        metric: format!(
            "manager CPU while idle with {n} workers connected ({:.0} s)",
            run.idle_window.as_secs_f64()
        ),
        value: format!("{:.1} % of a core", run.cpu_percent(run.manager_idle_ticks)),
        baseline: format!(
            "{:.1} % for the worker processes",
            run.cpu_percent(run.hosts_idle_ticks)
        ),
        ratio: None,
        goal: "≤ 10 %".into(),
    });
    rows.push(Row {
        scenario: "4 scale".into(),
        metric: format!("threads (and fds) per connection, {n} workers"),
        value: format!(
            "manager {:.2} ({:.2} fds), worker {:.2}",
            run.manager_threads_per_worker(),
            run.manager_fds_per_worker(),
            run.host_threads_per_worker()
        ),
        baseline: "-".into(),
        ratio: None,
        goal: "≈ 1 each".into(),
    });
    rows.push(Row {
        scenario: "4 scale".into(),
        metric: format!("median submit→started with {n} workers"),
        value: us(run.dispatch_p50),
        baseline: format!("{} with 1 worker", us(one.dispatch_p50)),
        ratio: Some(one.dispatch_p50.as_secs_f64() / run.dispatch_p50.as_secs_f64()),
        goal: "≥ 0.5 (≤ 2×)".into(),
    });
}

fn print_stacks(run: &ScaleRun) {
    println!(
        "\nthread stacks with {} workers: reserved = the mapping holding the stack pointer, touched = most resident pages of any one",
        run.workers
    );
    println!("| process | thread kind | threads | stack reserved | touched (max) |");
    println!("| --- | --- | --- | --- | --- |");
    for (side, kinds) in [
        ("manager", &run.manager_stacks),
        ("worker processes", &run.host_stacks),
    ] {
        for k in kinds {
            println!(
                "| {side} | {} | {} | {} | {} |",
                k.kind,
                k.threads,
                kib(k.reserved as f64),
                kib(k.touched_max as f64)
            );
        }
    }
}

/// `__scale N PER_PROCESS JSON [--quick]`: the scale scenario at one size in this fresh
/// process; writes its rows to JSON and prints its thread-stack table.
fn scale_main(args: &[String]) {
    let n: usize = args[0].parse().unwrap();
    let per_host: usize = args[1].parse().unwrap();
    let s = if args.iter().any(|a| a == "--quick") {
        QUICK
    } else {
        FULL
    };
    let certs = Certs::new();
    let mut rows = Vec::new();
    if let Some(run) = scale_only(&certs, &s, &[n], per_host, &mut rows) {
        print_stacks(&run);
    }
    std::fs::write(&args[2], rows_to_json(&rows)).unwrap();
}

/// Runs the scale scenario at `n` workers in a fresh process (`__scale`), so that no
/// earlier scenario's memory, freed but kept by the allocator, or cached thread stacks
/// blur its figures. Returns its rows and its printed thread-stack table.
fn scale_in_child(n: usize, per_host: usize, quick: bool) -> (Vec<Row>, String) {
    let exe = std::env::current_exe().unwrap();
    let json = std::env::temp_dir().join(format!(
        "workpool-bench-scale-{}-{n}.json",
        std::process::id()
    ));
    let mut c = Command::new(exe);
    c.args(["__scale", &n.to_string(), &per_host.to_string()])
        .arg(&json);
    if quick {
        c.arg("--quick");
    }
    let out = c
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("starting the scale process");
    let stacks = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "the scale process failed: {stacks}");
    let text = std::fs::read_to_string(&json).expect("the scale process's rows");
    let _ = std::fs::remove_file(&json);
    (rows_from_json(&text), stacks)
}

fn rows_to_json(rows: &[Row]) -> String {
    let items: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "scenario": r.scenario,
                "metric": r.metric,
                "value": r.value,
                "baseline": r.baseline,
                "ratio": r.ratio.map(|x| (x * 1e4).round() / 1e4),
                "goal": r.goal,
            })
        })
        .collect();
    serde_json::to_string_pretty(&items).unwrap() + "\n"
}

fn rows_from_json(text: &str) -> Vec<Row> {
    let items: Vec<serde_json::Value> = serde_json::from_str(text).unwrap();
    let field = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("").to_string();
    items
        .iter()
        .map(|v| Row {
            scenario: field(v, "scenario"),
            metric: field(v, "metric"),
            value: field(v, "value"),
            baseline: field(v, "baseline"),
            ratio: v["ratio"].as_f64(),
            goal: field(v, "goal"),
        })
        .collect()
}

/// The scale scenario at each of `sizes` that fits in the machine's limits (threads under
/// `kernel.pid_max`, descriptors under `RLIMIT_NOFILE`), after one worker as the
/// baseline; a size that does not fit gets a row saying which limit stops it. Returns the
/// last run, for its stacks.
fn scale_only(
    certs: &Certs,
    s: &Sizes,
    sizes: &[usize],
    per_host: usize,
    rows: &mut Vec<Row>,
) -> Option<ScaleRun> {
    let one = scale_run(certs, 1, 1, s.scale_probes, s.idle_window).unwrap();
    // Threads a worker costs, both sides, as measured with one.
    // (A worker's own connect thread ends once it has joined; a little is added for
    // threads that come and go.)
    let per_worker = one.manager_threads_per_worker() + one.host_threads_per_worker() + 0.05;
    let fds_per_worker = one.manager_fds_per_worker().max(1.0).ceil() as u64;
    let pid_max = read_number("/proc/sys/kernel/pid_max").unwrap_or(32768);
    let nofile =
        raise_nofile(sizes.iter().max().copied().unwrap_or(1) as u64 * fds_per_worker + 256);
    eprintln!(
        "a worker costs {per_worker:.2} threads (manager and worker side) and {fds_per_worker} manager fds; \
         kernel.pid_max {pid_max}, threads in use now {}, RLIMIT_NOFILE {nofile}",
        system_threads().unwrap_or(0)
    );
    let mut last = None;
    for &n in sizes {
        // Keep a few thousand pids for the rest of the machine (other builds and
        // benchmarks share the table; a full one makes every fork fail).
        let margin = 4096.min(pid_max / 4);
        let in_use = system_threads().unwrap_or(0);
        let need = (n as f64 * per_worker) as u64 + (n / per_host.max(1)) as u64 + 1;
        let limit = if in_use + need + margin > pid_max {
            Some(format!(
                "needs ~{need} threads; {in_use} of kernel.pid_max {pid_max} are in use and {margin} are kept for the rest of the machine"
            ))
        } else if n as u64 * fds_per_worker + 64 > nofile {
            Some(format!(
                "needs ~{} descriptors in the manager; RLIMIT_NOFILE is {nofile}",
                n as u64 * fds_per_worker
            ))
        } else {
            None
        };
        if let Some(why) = limit {
            rows.push(Row {
                scenario: "4 scale".into(),
                metric: format!("{n} workers"),
                value: "not run".into(),
                baseline: why,
                ratio: None,
                goal: "".into(),
            });
            continue;
        }
        eprintln!("scale: {n} workers...");
        match scale_run(certs, n, per_host, s.scale_probes, s.idle_window) {
            Ok(run) => {
                scale_rows(&one, &run, rows);
                last = Some(run);
            }
            Err(e) => rows.push(Row {
                scenario: "4 scale".into(),
                metric: format!("{n} workers"),
                value: "failed".into(),
                baseline: e,
                ratio: None,
                goal: "".into(),
            }),
        }
    }
    last
}

fn queue(certs: &Certs, s: &Sizes, local_rate: f64, rows: &mut Vec<Row>) {
    // Baseline for submitting: sending the same specs over a plain channel.
    let spec = JobSpec::new("true");
    let (tx, rx) = crossbeam_channel::unbounded();
    let t = Instant::now();
    for _ in 0..s.queue_jobs {
        tx.send(spec.clone()).unwrap();
    }
    let channel = t.elapsed();
    drop(rx);
    let manager = certs.manager();
    let rss_before = proc_status("VmRSS:");
    let t = Instant::now();
    let handles: Vec<_> = (0..s.queue_jobs)
        .map(|_| manager.submit(spec.clone()).unwrap())
        .collect();
    let submit = t.elapsed();
    // Let the dispatcher take them all in before measuring.
    while manager.stats().jobs_queued < s.queue_jobs {
        std::thread::sleep(Duration::from_millis(5));
    }
    let rss = proc_status("VmRSS:").saturating_sub(rss_before);
    rows.push(Row {
        scenario: "5 queue".into(),
        metric: format!("submit {} jobs with no worker", s.queue_jobs),
        value: format!("{:.0} jobs/s", s.queue_jobs as f64 / submit.as_secs_f64()),
        baseline: format!(
            "{:.0} sends/s (plain channel)",
            s.queue_jobs as f64 / channel.as_secs_f64()
        ),
        ratio: Some(channel.as_secs_f64() / submit.as_secs_f64()),
        goal: "".into(),
    });
    rows.push(Row {
        scenario: "5 queue".into(),
        metric: "memory per queued job (handle included)".into(),
        value: format!("{:.0} bytes", rss as f64 / s.queue_jobs as f64),
        baseline: "-".into(),
        ratio: None,
        goal: "".into(),
    });
    let k = 2;
    let t = Instant::now();
    let _procs = worker_processes(certs, &manager, k, 1);
    for h in handles.into_iter().take(s.drain_jobs) {
        assert_eq!(h.wait().outcome, Outcome::Exited(0));
    }
    let drain = s.drain_jobs as f64 / t.elapsed().as_secs_f64();
    rows.push(Row {
        scenario: "5 queue".into(),
        metric: format!("drain: first {} jobs once {k} workers join", s.drain_jobs),
        value: format!("{drain:.0} jobs/s"),
        baseline: format!("{local_rate:.0} jobs/s (local, scenario 1)"),
        ratio: Some(drain / local_rate),
        goal: "".into(),
    });
    manager.shutdown_within(Duration::ZERO);
}

/// The file system that holds `path`: its type, device and mount point, from
/// `/proc/self/mountinfo` (the last mount on the longest matching mount point).
fn file_system(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(dash) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        let (Some(mount), Some(fstype), Some(source)) =
            (f.get(4), f.get(dash + 1), f.get(dash + 2))
        else {
            continue;
        };
        let mount = mount.replace("\\040", " ");
        if path.starts_with(&mount) && best.as_ref().is_none_or(|(l, _)| mount.len() >= *l) {
            best = Some((mount.len(), format!("{fstype} on {source} at {mount}")));
        }
    }
    best.map_or_else(|| "an unknown file system".into(), |(_, s)| s)
}

/// The bytes of a journal's database and of its write-ahead log.
fn journal_files(path: &Path) -> (u64, u64) {
    let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    (len(path), len(Path::new(&wal)))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// " (runs a, b, c)" for more than one run.
fn runs_of(v: &[f64], digits: usize) -> String {
    if v.len() < 2 {
        return String::new();
    }
    let each: Vec<String> = v.iter().map(|x| format!("{x:.digits$}")).collect();
    format!(" (runs {})", each.join(", "))
}

/// `fsync`s per second one thread gets appending 200 bytes at a time to a file in `dir`
/// (SQLite's commit ends with an `fsync` of its WAL): what a durable write costs on its
/// own on that file system, at that moment.
fn fsyncs_per_second(dir: &Path, n: usize) -> f64 {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let record = [b'x'; 200];
    let t = Instant::now();
    for _ in 0..n {
        f.write_all(&record).unwrap();
        f.sync_all().unwrap();
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    rate
}

/// `total` `true` jobs submitted from `threads` threads started together (as evenly as
/// `total` divides); returns the seconds until the last submit returned, and the handles.
fn submit_from(manager: &Manager, threads: usize, total: usize) -> (f64, Vec<JobHandle>) {
    let start = std::sync::Barrier::new(threads + 1);
    std::thread::scope(|sc| {
        let submitters: Vec<_> = (0..threads)
            .map(|i| {
                let n = total / threads + usize::from(i < total % threads);
                let start = &start;
                sc.spawn(move || {
                    start.wait();
                    (0..n)
                        .map(|_| manager.submit(JobSpec::new("true")).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        start.wait();
        let t = Instant::now();
        let handles: Vec<JobHandle> = submitters
            .into_iter()
            .flat_map(|s| s.join().unwrap())
            .collect();
        (t.elapsed().as_secs_f64(), handles)
    })
}

/// Seconds until `total` `true` jobs, submitted from `threads` threads started together
/// (each waits for the jobs it submitted), have all ended `Exited(0)`.
fn finish_jobs(manager: &Manager, threads: usize, total: usize) -> f64 {
    let start = std::sync::Barrier::new(threads + 1);
    std::thread::scope(|sc| {
        let submitters: Vec<_> = (0..threads)
            .map(|i| {
                let n = total / threads + usize::from(i < total % threads);
                let start = &start;
                sc.spawn(move || {
                    start.wait();
                    let handles: Vec<JobHandle> = (0..n)
                        .map(|_| manager.submit(JobSpec::new("true")).unwrap())
                        .collect();
                    for h in handles {
                        assert_eq!(h.wait().outcome, Outcome::Exited(0));
                    }
                })
            })
            .collect();
        start.wait();
        let t = Instant::now();
        for s in submitters {
            s.join().unwrap();
        }
        t.elapsed().as_secs_f64()
    })
}

/// Seconds for `jobs` `true` jobs submitted from `submitters` threads to end on `k`
/// fresh worker processes of one slot, against a fresh manager with the journal at
/// `journal`, or without one.
fn trivial_run(
    certs: &Certs,
    journal: Option<&Path>,
    k: usize,
    jobs: usize,
    submitters: usize,
) -> f64 {
    let mut c = certs.config();
    if let Some(path) = journal {
        c = c.journal(path);
    }
    let manager = Manager::bind(c).unwrap();
    let procs = worker_processes(certs, &manager, k, 1);
    let secs = finish_jobs(&manager, submitters, jobs);
    drop(procs);
    manager.shutdown_within(Duration::ZERO);
    secs
}

/// What a journal takes: its files, and as SQLite sees them (through the WAL) the bytes
/// of its pages in use and free, and the ended jobs it keeps (`None`: not readable).
struct JournalLook {
    db: u64,
    wal: u64,
    used: Option<u64>,
    free: Option<u64>,
    ended: Option<u64>,
}

impl JournalLook {
    fn of(path: &Path) -> JournalLook {
        use rusqlite::{Connection, OpenFlags};
        let (db, wal) = journal_files(path);
        let read = || -> rusqlite::Result<(i64, i64, i64, i64)> {
            let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            let one = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0));
            Ok((
                one("PRAGMA page_size")?,
                one("PRAGMA page_count")?,
                one("PRAGMA freelist_count")?,
                one("SELECT count(*) FROM jobs WHERE state = 'ended'")?,
            ))
        };
        let pages = read().ok();
        JournalLook {
            db,
            wal,
            used: pages.map(|(size, count, free, _)| ((count - free) * size) as u64),
            free: pages.map(|(size, _, free, _)| (free * size) as u64),
            ended: pages.map(|(.., ended)| ended as u64),
        }
    }

    fn on_disk(&self) -> u64 {
        self.db + self.wal
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "{} on disk (database {} + WAL {})",
            kib(self.on_disk() as f64),
            kib(self.db as f64),
            kib(self.wal as f64)
        );
        if let (Some(used), Some(free), Some(ended)) = (self.used, self.free, self.ended) {
            s += &format!(
                "; pages in use {}, free {}; {ended} ended jobs kept",
                kib(used as f64),
                kib(free as f64)
            );
        }
        s
    }
}

/// The journal once its files have not changed for `settle`, or after 60 s.
fn settled_journal(path: &Path, settle: Duration) -> JournalLook {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut last, mut since) = (journal_files(path), Instant::now());
    while since.elapsed() < settle && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = journal_files(path);
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    JournalLook::of(path)
}

/// Seconds SQLite alone takes to read the open jobs' rows (what a restart reads) from
/// the journal at `path`, and how many it read; an error if the layout is not the one
/// expected.
fn raw_journal_read(path: &Path) -> Result<(f64, usize), String> {
    use rusqlite::{Connection, OpenFlags};
    let t = Instant::now();
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| e.to_string())?;
    let mut stmt = conn
        .prepare(
            "SELECT id, spec, submitter, attempt, worker FROM jobs \
             WHERE state != 'ended' ORDER BY id",
        )
        .map_err(|e| e.to_string())?;
    let mut rows = stmt.query([]).map_err(|e| e.to_string())?;
    let mut n = 0;
    while let Some(r) = rows.next().map_err(|e| e.to_string())? {
        let spec: Vec<u8> = r.get(1).map_err(|e| e.to_string())?;
        std::hint::black_box(spec);
        n += 1;
    }
    Ok((t.elapsed().as_secs_f64(), n))
}

fn journal(certs: &Certs, s: &Sizes, base: &Path, rows: &mut Vec<Row>) {
    let fs = file_system(base);
    eprintln!("journal: journals in {} ({fs})", base.display());
    let fresh = |name: &str| -> PathBuf {
        let d = base.join(format!("journal-{name}"));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.join("journal.db")
    };
    let scenario = || "7 journal".to_string();
    let k = 2;

    // Durable submits, each run against what one fsync costs just before it (the disk's
    // flushes are as fast as whatever else the host writes lets them be).
    for n in [1, 4, 16, 64] {
        let total = if n == 1 {
            s.journal_submits / 8
        } else {
            s.journal_submits
        };
        eprintln!("journal: durable submits from {n} threads...");
        let (mut rates, mut fsyncs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..s.journal_runs {
            let fsync = fsyncs_per_second(base, s.journal_fsyncs);
            let path = fresh("submits");
            let manager = Manager::bind(certs.config().journal(&path)).unwrap();
            let (secs, handles) = submit_from(&manager, n, total);
            assert_eq!(handles.len(), total);
            manager.shutdown_within(Duration::ZERO);
            let rate = total as f64 / secs;
            rates.push(rate);
            fsyncs.push(fsync);
            ratios.push(rate / fsync);
        }
        rows.push(Row {
            scenario: scenario(),
            metric: format!(
                "durable submits, {n} thread(s) × {} `true` jobs, no worker (journal on {fs})",
                total / n
            ),
            value: format!("{:.0} submits/s{}", median(&rates), runs_of(&rates, 0)),
            baseline: format!(
                "{:.0} fsync/s just before (one thread appending 200 bytes){}",
                median(&fsyncs),
                runs_of(&fsyncs, 0)
            ),
            ratio: Some(median(&ratios)),
            goal: "≥ 5,000/s".into(),
        });
    }

    // Trivial jobs with and without the journal, in turn.
    for submitters in [1, 16] {
        eprintln!("journal: throughput with and without, {submitters} submitting threads...");
        let (mut with, mut without, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..s.journal_runs {
            let mut pair = [0.0; 2];
            for journaled in [round % 2 == 1, round % 2 == 0] {
                let path = fresh("throughput");
                let secs = trivial_run(
                    certs,
                    journaled.then_some(path.as_path()),
                    k,
                    s.throughput_jobs,
                    submitters,
                );
                pair[usize::from(journaled)] = s.throughput_jobs as f64 / secs;
            }
            without.push(pair[0]);
            with.push(pair[1]);
            ratios.push(pair[1] / pair[0]);
        }
        rows.push(Row {
            scenario: scenario(),
            metric: format!(
                "{} `true` jobs, {k} worker processes × 1 slot, submitted from {submitters} thread(s), with the journal",
                s.throughput_jobs
            ),
            value: format!("{:.0} jobs/s{}", median(&with), runs_of(&with, 0)),
            baseline: format!(
                "{:.0} jobs/s without a journal{}",
                median(&without),
                runs_of(&without, 0)
            ),
            ratio: Some(median(&ratios)),
            goal: "≥ 0.9".into(),
        });
    }

    // A restart with many queued jobs.
    let n = s.journal_restart_jobs;
    eprintln!("journal: {n} queued jobs...");
    let path = fresh("restart");
    let manager = Manager::bind(certs.config().journal(&path)).unwrap();
    let (submit_secs, handles) = submit_from(&manager, 64, n);
    drop(handles);
    manager.shutdown_within(Duration::ZERO);
    drop(manager);
    let (mut restarts, mut listed, mut raws) = (Vec::new(), Vec::new(), Vec::new());
    let mut raw_error = None;
    let mut size = 0;
    for _ in 0..s.journal_runs {
        match raw_journal_read(&path) {
            Ok((secs, read)) => {
                assert_eq!(read, n);
                raws.push(secs);
            }
            Err(e) => raw_error = Some(e),
        }
        let t = Instant::now();
        let manager = Manager::bind(certs.config().journal(&path)).unwrap();
        let stats = manager.stats();
        let restart = t.elapsed().as_secs_f64();
        assert_eq!(stats.jobs_queued, n);
        assert_eq!(manager.jobs().len(), n);
        listed.push(t.elapsed().as_secs_f64());
        restarts.push(restart);
        size = stats.journal_bytes.unwrap_or(0);
        manager.shutdown_within(Duration::ZERO);
    }
    let restart = median(&restarts);
    rows.push(Row {
        scenario: scenario(),
        metric: format!(
            "restart with {n} queued jobs: `Manager::bind` until `stats()` counts them ({} s until `jobs()` lists them)",
            format_args!("{:.2}", median(&listed))
        ),
        value: format!("{restart:.3} s{}", runs_of(&restarts, 3)),
        baseline: match &raw_error {
            None => format!(
                "{:.3} s (SQLite alone reading their rows){}",
                median(&raws),
                runs_of(&raws, 3)
            ),
            Some(e) => format!("SQLite alone not measured: {e}"),
        },
        ratio: raw_error.is_none().then(|| median(&raws) / restart),
        goal: "< 2 s".into(),
    });
    rows.push(Row {
        scenario: scenario(),
        metric: format!("journal with {n} queued jobs (submitted from 64 threads)"),
        value: format!(
            "{} ({:.0} bytes per job)",
            mib(size),
            size as f64 / n as f64
        ),
        baseline: format!(
            "submitted in {submit_secs:.1} s, {:.0} submits/s",
            n as f64 / submit_secs
        ),
        ratio: None,
        goal: "".into(),
    });

    // Compaction: the journal's size after many jobs, keeping few.
    let keep = s.journal_keep;
    let each = s.journal_compact_jobs;
    eprintln!("journal: {} jobs, keeping {keep} ended...", 2 * each);
    let path = fresh("compaction");
    let mut c = certs.config().journal(&path);
    c.journal_retention_count = keep;
    let manager = Manager::bind(c).unwrap();
    let fresh_look = settled_journal(&path, s.journal_settle);
    let procs = worker_processes(certs, &manager, k, 1);
    let mut after = Vec::new();
    for _ in 0..2 {
        finish_jobs(&manager, 16, each);
        after.push(settled_journal(&path, s.journal_settle));
    }
    drop(procs);
    manager.shutdown_within(Duration::ZERO);
    drop(manager);
    let (rest, _) = journal_files(&path);
    rows.push(Row {
        scenario: scenario(),
        metric: format!("journal after {each} `true` jobs, keeping {keep} ended"),
        value: after[0].describe(),
        baseline: format!("fresh: {}", fresh_look.describe()),
        ratio: None,
        goal: "".into(),
    });
    rows.push(Row {
        scenario: scenario(),
        metric: format!(
            "journal after {} `true` jobs, keeping {keep} ended",
            2 * each
        ),
        value: after[1].describe(),
        baseline: format!("{} after {each}", kib(after[0].on_disk() as f64)),
        ratio: Some(after[0].on_disk() as f64 / after[1].on_disk() as f64),
        goal: "bounded (≈ 1)".into(),
    });
    let per_job = match (after[1].used, fresh_look.used, after[1].ended) {
        (Some(u), Some(u0), Some(e)) if e > 0 => {
            format!("{:.0} bytes", u.saturating_sub(u0) as f64 / e as f64)
        }
        _ => "not measured (the journal's pages or rows could not be read)".into(),
    };
    rows.push(Row {
        scenario: scenario(),
        metric: format!(
            "bytes per ended job kept after {} jobs: pages in use over fresh ÷ jobs kept",
            2 * each
        ),
        value: per_job,
        baseline: format!(
            "{} at rest (manager stopped, WAL checkpointed): {:.1} bytes per job run",
            kib(rest as f64),
            rest as f64 / (2 * each) as f64
        ),
        ratio: None,
        goal: "".into(),
    });
}

/// `__submits THREADS TOTAL DIR`: durable submits of TOTAL `true` jobs from THREADS
/// threads to a manager with a fresh journal in DIR, no worker; prints submits/s. For
/// looking at the journal's writer from outside (`perf stat`, `strace -c`).
fn submits_main(args: &[String]) {
    let threads: usize = args[0].parse().unwrap();
    let total: usize = args[1].parse().unwrap();
    let dir = Path::new(&args[2]).join(format!("submits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let certs = Certs::new();
    let manager = Manager::bind(certs.config().journal(dir.join("journal.db"))).unwrap();
    let (secs, handles) = submit_from(&manager, threads, total);
    println!("{:.0} submits/s", handles.len() as f64 / secs);
    manager.shutdown_within(Duration::ZERO);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `__trivial JOURNAL SUBMITTERS JOBS DIR`: JOBS `true` jobs from SUBMITTERS threads on
/// two worker processes of one slot, against a manager with a fresh journal in DIR
/// (JOURNAL `yes`) or none (`no`); prints jobs/s and this process's CPU time per job
/// (the manager's; the workers are other processes). For `perf stat` from outside.
fn trivial_main(args: &[String]) {
    let journaled = args[0] == "yes";
    let submitters: usize = args[1].parse().unwrap();
    let jobs: usize = args[2].parse().unwrap();
    let dir = Path::new(&args[3]).join(format!("trivial-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let certs = Certs::new();
    let path = dir.join("journal.db");
    let cpu = || proc_figures(std::process::id()).cpu_ticks;
    let before = cpu();
    let secs = trivial_run(
        &certs,
        journaled.then_some(path.as_path()),
        2,
        jobs,
        submitters,
    );
    let ticks = cpu() - before;
    println!(
        "{:.0} jobs/s, manager process {:.0} µs of CPU per job",
        jobs as f64 / secs,
        ticks as f64 / clock_ticks_per_second() / jobs as f64 * 1e6
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `__manager COUNT DIR`: a manager that prints its port, waits for one worker, runs
/// COUNT `true` jobs (all submitted at once), prints `done`, and exits when stdin closes.
fn manager_main(args: &[String]) {
    let count: usize = args[0].parse().unwrap();
    let dir = Path::new(&args[1]);
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let manager = manager_config(
        &read("host-cert.pem"),
        &read("host-key.pem"),
        &read("worker-cert.pem"),
    );
    let events = manager.subscribe();
    println!("{}", manager.local_addr().port());
    wait_joined(&events, 1);
    let handles: Vec<_> = (0..count)
        .map(|_| manager.submit(JobSpec::new("true")).unwrap())
        .collect();
    for h in handles {
        assert_eq!(h.wait().outcome, Outcome::Exited(0));
    }
    println!("done");
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    manager.shutdown_within(Duration::ZERO);
    std::process::exit(0);
}

/// The instructions a callgrind output file counted (its `totals:` or `summary:` line).
fn callgrind_total(path: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no totals in {}", path.display()))
}

/// Runs one manager process and one worker process, each under callgrind, for `jobs`
/// trivial jobs; returns the instructions each executed.
fn counted_run(certs: &Certs, jobs: usize, keep: Option<&Path>) -> Result<(u64, u64), String> {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = keep.unwrap_or(&certs.dir).join(format!("callgrind-{jobs}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().unwrap();
    // Valgrind's own messages (e.g. that it lacks pidfd_open, so the worker falls back
    // to waitid) go to a log beside the counts.
    let valgrind = |who: &str| -> Result<Command, String> {
        let log = std::fs::File::create(dir.join(format!("{who}.log")))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut c = Command::new("valgrind");
        c.arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}/{who}.%p", dir.display()))
            .arg(&exe)
            .stdin(Stdio::piped())
            .stderr(log);
        Ok(c)
    };
    let mut manager = Procs(vec![
        valgrind("manager")?
            .args(["__manager", &jobs.to_string()])
            .arg(&certs.dir)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting valgrind: {e}"))?,
    ]);
    let mut out = BufReader::new(manager.0[0].stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).map_err(|e| e.to_string())?;
    let port = line.trim().to_string();
    let mut worker = Procs(vec![
        valgrind("worker")?
            .args(["__workers", &port, "0", "1"])
            .arg(&certs.dir)
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting valgrind: {e}"))?,
    ]);
    line.clear();
    out.read_line(&mut line).map_err(|e| e.to_string())?;
    if line.trim() != "done" {
        return Err(format!("the manager process said {line:?}, not done"));
    }
    // The worker leaves first, then the manager; each exits on its own (its stdin
    // closes), so callgrind writes its count.
    let (mpid, wpid) = (manager.0[0].id(), worker.0[0].id());
    for p in [&mut worker.0[0], &mut manager.0[0]] {
        drop(p.stdin.take());
        let status = p.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("a counted process ended {status}"));
        }
    }
    Ok((
        callgrind_total(&dir.join(format!("manager.{mpid}")))?,
        callgrind_total(&dir.join(format!("worker.{wpid}")))?,
    ))
}

/// `--instructions`: instructions per trivial job, counted by callgrind in the manager
/// process and in the worker process separately, as the difference between a run of
/// `small` jobs and one of `large` jobs divided by the difference in jobs (start-up,
/// handshake and shutdown cancel out).
fn instructions(
    certs: &Certs,
    small: usize,
    large: usize,
    keep: Option<&Path>,
) -> Result<Vec<Row>, String> {
    let v = Command::new("valgrind").arg("--version").output();
    if !v.is_ok_and(|o| o.status.success()) {
        return Err("--instructions needs valgrind (apt-get install valgrind)".into());
    }
    eprintln!("callgrind: {small} jobs...");
    let (m0, w0) = counted_run(certs, small, keep)?;
    eprintln!("callgrind: {large} jobs...");
    let (m1, w1) = counted_run(certs, large, keep)?;
    let d = (large - small) as f64;
    let per = |a: u64, b: u64| (b as f64 - a as f64) / d;
    let (pm, pw) = (per(m0, m1), per(w0, w1));
    let fixed = |a: u64, p: f64| {
        format!(
            "{:.1} M fixed (start-up, handshake, shutdown)",
            (a as f64 - p * small as f64) / 1e6
        )
    };
    Ok(vec![
        Row {
            scenario: "6 instructions".into(),
            metric: format!("manager process, per `true` job ({small} vs {large} jobs)"),
            value: format!("{:.1} k", pm / 1e3),
            baseline: fixed(m0, pm),
            ratio: None,
            goal: "halve".into(),
        },
        Row {
            scenario: "6 instructions".into(),
            metric: format!("worker process, per `true` job ({small} vs {large} jobs)"),
            value: format!("{:.1} k", pw / 1e3),
            baseline: fixed(w0, pw),
            ratio: None,
            goal: "halve".into(),
        },
        Row {
            scenario: "6 instructions".into(),
            metric: "manager + worker, per job".into(),
            value: format!("{:.1} k", (pm + pw) / 1e3),
            baseline: "-".into(),
            ratio: None,
            goal: "halve".into(),
        },
    ])
}

fn value_of<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .map(|i| args.get(i + 1).map_or("", String::as_str))
}

fn numbers(args: &[String], flag: &str) -> Option<Vec<usize>> {
    value_of(args, flag).map(|v| {
        v.split(',')
            .map(|x| {
                x.trim().parse().unwrap_or_else(|_| {
                    eprintln!("bench: {flag} takes numbers separated by commas, not {v:?}");
                    std::process::exit(2)
                })
            })
            .collect()
    })
}

const USAGE: &str = "\
usage: bench [--quick] [--only SCENARIO[,SCENARIO...]] [--journal-dir DIR] [--json FILE]
       bench --workers N[,N...] [--per-process M] [--quick] [--json FILE]
       bench --instructions [--jobs SMALL,LARGE] [--keep-callgrind DIR] [--json FILE]

With no mode, every scenario runs once (--quick: small sizes), or those --only names
(throughput, latency, streaming, scale, queue, journal). The journal scenario keeps
its journals under --journal-dir (the temporary directory by default: it should be
on the disk to measure, not tmpfs). --workers runs the scale
scenario alone at each size, M workers per worker process (1000 by default).
--instructions counts instructions per trivial job with valgrind's callgrind in a
manager process and a worker process (100 and 300 jobs by default).";

/// Exits with the usage on `--help`, and with an error on anything it does not know.
fn check_args(args: &[String]) {
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--quick" | "--instructions" => i += 1,
            "--json" | "--workers" | "--per-process" | "--jobs" | "--keep-callgrind" | "--only"
            | "--journal-dir" => {
                if args.get(i + 1).is_none_or(|v| v.starts_with("--")) {
                    eprintln!("bench: {} needs a value\n\n{USAGE}", args[i]);
                    std::process::exit(2);
                }
                i += 2;
            }
            other => {
                eprintln!("bench: unknown argument {other:?}\n\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("__worker") => return worker_main(&args[1..]),
        Some("__workers") => return workers_main(&args[1..]),
        Some("__manager") => return manager_main(&args[1..]),
        Some("__scale") => return scale_main(&args[1..]),
        Some("__submits") => return submits_main(&args[1..]),
        Some("__trivial") => return trivial_main(&args[1..]),
        _ => {}
    }
    check_args(&args);
    let quick = args.iter().any(|a| a == "--quick");
    let json = value_of(&args, "--json").map(String::from);
    let workers = numbers(&args, "--workers");
    if workers.as_ref().is_some_and(|w| w.contains(&0)) {
        eprintln!("bench: --workers takes counts of at least 1");
        std::process::exit(2);
    }
    let per_host = numbers(&args, "--per-process")
        .map_or(1000, |v| v[0])
        .max(1);
    let instr = args.iter().any(|a| a == "--instructions");
    let s = if quick { QUICK } else { FULL };
    let certs = Certs::new();
    let k = 2;
    let mut rows = Vec::new();
    let mut stacks = String::new();
    let started = Instant::now();
    if instr {
        let jobs = numbers(&args, "--jobs").unwrap_or(vec![100, 300]);
        if jobs.len() != 2 || jobs[0] >= jobs[1] {
            eprintln!("bench: --jobs takes two counts, the smaller first (e.g. 100,300)");
            std::process::exit(2);
        }
        // --keep-callgrind DIR keeps the counts for callgrind_annotate.
        let keep = value_of(&args, "--keep-callgrind").map(PathBuf::from);
        match instructions(&certs, jobs[0], jobs[1], keep.as_deref()) {
            Ok(r) => rows.extend(r),
            Err(e) => {
                eprintln!("bench: {e}");
                std::process::exit(1);
            }
        }
    } else if let Some(sizes) = workers {
        for n in sizes {
            let (r, st) = scale_in_child(n, per_host, quick);
            rows.extend(r);
            if !st.trim().is_empty() {
                stacks = st;
            }
        }
    } else {
        let only: Option<Vec<String>> =
            value_of(&args, "--only").map(|v| v.split(',').map(String::from).collect());
        let known = [
            "throughput",
            "latency",
            "streaming",
            "scale",
            "queue",
            "journal",
        ];
        if let Some(bad) = only.iter().flatten().find(|o| !known.contains(&o.as_str())) {
            eprintln!(
                "bench: unknown scenario {bad:?} (one of {})",
                known.join(", ")
            );
            std::process::exit(2);
        }
        let runs = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
        let mut local_rate = None;
        if runs("throughput") || runs("queue") {
            eprintln!("throughput...");
            local_rate = Some(throughput(&certs, &s, k, &mut rows));
        }
        if runs("latency") {
            eprintln!("latency...");
            latency(&certs, &s, &mut rows);
        }
        if runs("streaming") {
            eprintln!("streaming...");
            streaming(&certs, &s, &mut rows);
        }
        if runs("scale") {
            eprintln!("scale...");
            let (r, st) = scale_in_child(s.scale_workers, s.scale_per_host, quick);
            rows.extend(r);
            stacks = st;
        }
        if let Some(rate) = local_rate.filter(|_| runs("queue")) {
            eprintln!("queue...");
            queue(&certs, &s, rate, &mut rows);
        }
        if runs("journal") {
            eprintln!("journal...");
            let dir = match value_of(&args, "--journal-dir") {
                Some(d) => Path::new(d).join(format!("workpool-bench-{}", std::process::id())),
                None => certs.dir.clone(),
            };
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| {
                eprintln!("bench: --journal-dir: {}: {e}", dir.display());
                std::process::exit(2)
            });
            journal(&certs, &s, &dir, &mut rows);
            if dir != certs.dir {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    println!("| scenario | metric | value | baseline (same run) | ratio | goal |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        let ratio = r.ratio.map_or("-".into(), |x| format!("{x:.2}"));
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.scenario, r.metric, r.value, r.baseline, ratio, r.goal
        );
    }
    println!(
        "\n{} mode, {:.0} s in all, {} cores",
        if quick { "quick" } else { "full" },
        started.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    print!("{stacks}");
    if let Some(path) = json {
        std::fs::write(&path, rows_to_json(&rows)).unwrap();
    }
}
