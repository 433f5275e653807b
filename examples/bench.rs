//! The workpool benchmark: each figure next to a baseline measured in the same run, on
//! loopback with real mutual TLS.
//!
//! ```text
//! cargo run --release --example bench                  # default sizes, a few minutes on 2 cores
//! cargo run --release --example bench -- --quick       # seconds (the test suite runs this)
//! cargo run --release --example bench -- --json out.json
//! cargo run --release --example bench -- --only throughput,latency,streaming
//! ```
//!
//! Workers run as separate processes (this binary started again with `__worker`), except
//! in the scale scenario, where a thousand workers run as threads of this process.
//! Memory is read from `/proc/self/status` (VmRSS, and VmHWM after resetting it through
//! `/proc/self/clear_refs`), so it is Linux-only.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};
use workpool::job::{JobEvent, JobSpec, Outcome};
use workpool::manager::{Manager, ManagerConfig, ManagerEvent};
use workpool::tls::{GeneratedCertificate, Identity, TrustRoots, generate_self_signed};
use workpool::worker::{Worker, WorkerConfig};

struct Sizes {
    throughput_jobs: usize,
    latency_jobs: usize,
    stream_bytes: u64,
    scale_workers: usize,
    scale_probes: usize,
    queue_jobs: usize,
    drain_jobs: usize,
}

const FULL: Sizes = Sizes {
    throughput_jobs: 2000,
    latency_jobs: 300,
    stream_bytes: 1 << 30,
    scale_workers: 1000,
    scale_probes: 200,
    queue_jobs: 100_000,
    drain_jobs: 2000,
};

const QUICK: Sizes = Sizes {
    throughput_jobs: 60,
    latency_jobs: 20,
    stream_bytes: 16 << 20,
    scale_workers: 20,
    scale_probes: 20,
    queue_jobs: 2000,
    drain_jobs: 40,
};

/// One line of the table.
struct Row {
    scenario: &'static str,
    metric: String,
    value: String,
    baseline: String,
    ratio: Option<f64>,
    goal: &'static str,
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
        std::fs::write(dir.join("worker-cert.pem"), &worker.cert_pem).unwrap();
        std::fs::write(dir.join("worker-key.pem"), &worker.key_pem).unwrap();
        Certs { dir, host, worker }
    }

    fn manager(&self) -> Manager {
        let mut c = ManagerConfig::new(
            "127.0.0.1:0",
            Identity::from_pem(self.host.cert_pem.as_bytes(), self.host.key_pem.as_bytes())
                .unwrap(),
            TrustRoots::from_pem(self.worker.cert_pem.as_bytes()).unwrap(),
        );
        c.queue_capacity = 1_000_000;
        c.shutdown_grace = Duration::ZERO;
        c.result_output_limit = 1 << 20;
        // Every benchmark worker presents the same certificate.
        c.max_connections_per_certificate = 100_000;
        Manager::bind(c).unwrap()
    }

    fn worker_config(&self, port: u16, name: &str) -> WorkerConfig {
        WorkerConfig::new(
            "127.0.0.1",
            port,
            Identity::from_pem(
                self.worker.cert_pem.as_bytes(),
                self.worker.key_pem.as_bytes(),
            )
            .unwrap(),
            TrustRoots::from_pem(self.host.cert_pem.as_bytes()).unwrap(),
        )
        .name(name)
    }
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
        scenario: "1 throughput",
        metric: format!(
            "{} `true` jobs, {k} worker processes × 1 slot",
            s.throughput_jobs
        ),
        value: format!("{pool_rate:.0} jobs/s"),
        baseline: format!("{local_rate:.0} jobs/s (local bash -c true, {k} at a time)"),
        ratio: Some(pool_rate / local_rate),
        goal: "≥ 0.9",
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
            scenario: "2 latency",
            metric: format!("{name} submit→finished, one job at a time"),
            value: us(p),
            baseline: format!("{} (local bash -c true)", us(l)),
            ratio: Some(l.as_secs_f64() / p.as_secs_f64()),
            goal: if q == 0.5 { "overhead < 200 µs" } else { "" },
        });
    }
    let overhead = percentile(&pool, 0.5).saturating_sub(percentile(&local, 0.5));
    rows.push(Row {
        scenario: "2 latency",
        metric: "p50 overhead (workpool − local)".into(),
        value: us(overhead),
        baseline: "-".into(),
        ratio: None,
        goal: "< 200 µs",
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
    let raw = raw_tls_seconds(certs, s.stream_bytes);
    let gb = |secs: f64| format!("{:.2} GB/s", s.stream_bytes as f64 / secs / 1e9);
    rows.push(Row {
        scenario: "3 streaming",
        metric: format!("{} of stdout to the submitter", mib(s.stream_bytes)),
        value: gb(secs),
        baseline: format!("{} (raw rustls over loopback)", gb(raw)),
        ratio: Some(raw / secs),
        goal: "≥ 0.5",
    });
    rows.push(Row {
        scenario: "3 streaming",
        metric: "manager process peak RSS during the stream".into(),
        value: mib(peak),
        baseline: format!("{} before", mib(rss_before)),
        ratio: None,
        goal: "bounded",
    });
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

fn scale(certs: &Certs, s: &Sizes, rows: &mut Vec<Row>) {
    let one = {
        let manager = certs.manager();
        let events = manager.subscribe();
        let _w = Worker::start(certs.worker_config(manager.local_addr().port(), "solo")).unwrap();
        wait_joined(&events, 1);
        median_dispatch(&manager, s.scale_probes)
    };
    let manager = certs.manager();
    let events = manager.subscribe();
    let rss_before = proc_status("VmRSS:");
    let t = Instant::now();
    let workers: Vec<Worker> = (0..s.scale_workers)
        .map(|i| {
            let mut c = certs.worker_config(manager.local_addr().port(), &format!("t{i}"));
            c.backoff_max = Duration::from_secs(2);
            Worker::start(c).unwrap()
        })
        .collect();
    wait_joined(&events, s.scale_workers);
    let join = t.elapsed();
    let rss = proc_status("VmRSS:").saturating_sub(rss_before);
    let many = median_dispatch(&manager, s.scale_probes);
    rows.push(Row {
        scenario: "4 scale",
        metric: format!("{} workers (threads here) join", s.scale_workers),
        value: format!("{:.2} s", join.as_secs_f64()),
        baseline: "-".into(),
        ratio: None,
        goal: "",
    });
    rows.push(Row {
        scenario: "4 scale",
        metric: format!(
            "memory for {} workers, manager and worker sides",
            s.scale_workers
        ),
        value: format!(
            "{} ({:.0} KiB each)",
            mib(rss),
            rss as f64 / 1024.0 / s.scale_workers as f64
        ),
        baseline: "-".into(),
        ratio: None,
        goal: "",
    });
    rows.push(Row {
        scenario: "4 scale",
        metric: format!("median submit→started with {} workers", s.scale_workers),
        value: us(many),
        baseline: format!("{} with 1 worker", us(one)),
        ratio: Some(one.as_secs_f64() / many.as_secs_f64()),
        goal: "",
    });
    drop(workers);
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
        scenario: "5 queue",
        metric: format!("submit {} jobs with no worker", s.queue_jobs),
        value: format!("{:.0} jobs/s", s.queue_jobs as f64 / submit.as_secs_f64()),
        baseline: format!(
            "{:.0} sends/s (plain channel)",
            s.queue_jobs as f64 / channel.as_secs_f64()
        ),
        ratio: Some(channel.as_secs_f64() / submit.as_secs_f64()),
        goal: "",
    });
    rows.push(Row {
        scenario: "5 queue",
        metric: "memory per queued job (handle included)".into(),
        value: format!("{:.0} bytes", rss as f64 / s.queue_jobs as f64),
        baseline: "-".into(),
        ratio: None,
        goal: "",
    });
    let k = 2;
    let t = Instant::now();
    let _procs = worker_processes(certs, &manager, k, 1);
    for h in handles.into_iter().take(s.drain_jobs) {
        assert_eq!(h.wait().outcome, Outcome::Exited(0));
    }
    let drain = s.drain_jobs as f64 / t.elapsed().as_secs_f64();
    rows.push(Row {
        scenario: "5 queue",
        metric: format!("drain: first {} jobs once {k} workers join", s.drain_jobs),
        value: format!("{drain:.0} jobs/s"),
        baseline: format!("{local_rate:.0} jobs/s (local, scenario 1)"),
        ratio: Some(drain / local_rate),
        goal: "",
    });
    manager.shutdown_within(Duration::ZERO);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("__worker") {
        return worker_main(&args[1..]);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let s = if quick { QUICK } else { FULL };
    let certs = Certs::new();
    let k = 2;
    let mut rows = Vec::new();
    let started = Instant::now();
    // `--only throughput,latency` runs just those scenarios (the others load the machine).
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').map(str::to_string).collect());
    let run = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|n| n == name));
    let mut local_rate = 0.0;
    if run("throughput") || run("queue") {
        eprintln!("throughput...");
        local_rate = throughput(&certs, &s, k, &mut rows);
    }
    if run("latency") {
        eprintln!("latency...");
        latency(&certs, &s, &mut rows);
    }
    if run("streaming") {
        eprintln!("streaming...");
        streaming(&certs, &s, &mut rows);
    }
    if run("scale") {
        eprintln!("scale...");
        scale(&certs, &s, &mut rows);
    }
    if run("queue") {
        eprintln!("queue...");
        queue(&certs, &s, local_rate, &mut rows);
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
    if let Some(path) = json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"scenario\":{:?},\"metric\":{:?},\"value\":{:?},\"baseline\":{:?},\"ratio\":{},\"goal\":{:?}}}",
                    r.scenario,
                    r.metric,
                    r.value,
                    r.baseline,
                    r.ratio.map_or("null".into(), |x| format!("{x:.4}")),
                    r.goal
                )
            })
            .collect();
        std::fs::write(&path, format!("[\n{}\n]\n", items.join(",\n"))).unwrap();
    }
}
