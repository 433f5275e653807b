//! The workpool command line: a drop-in for the seed's `manager`, `worker` and
//! `generate-tls-certificates` subcommands, plus `demo`, which runs a manager and two
//! workers in this process on loopback with fresh certificates.
//!
//! ```text
//! cargo run --release --example workpool -- demo
//! cargo run --release --example workpool -- generate-tls-certificates --number-of-workers 2 --hostname localhost
//! cargo run --release --example workpool -- manager --security-pool-certificate host-cert.pem \
//!     --security-pool-key host-key.pem --security-worker-certificates worker-0-cert.pem worker-1-cert.pem
//! cargo run --release --example workpool -- worker --security-pool-certificate host-cert.pem \
//!     --security-worker-certificate worker-0-cert.pem --security-worker-key worker-0-key.pem
//! ```
//!
//! A certificate given to `--security-worker-certificates` or `--security-pool-certificate`
//! is pinned: accepted only as itself. Issuers go to `--security-worker-ca` and
//! `--security-pool-ca`.
//!
//! Set `RUST_LOG=debug` for more log lines (they go to stderr).

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use workpool::job::{JobEvent, JobId, JobSpec, JobState, Outcome, Stream};
use workpool::manager::{Manager, ManagerConfig, ManagerEvent, WorkerInfo};
use workpool::tls::{
    DEFAULT_VALIDITY_DAYS, Identity, PeerTrust, generate_manager_certificate,
    generate_worker_certificate,
};
use workpool::worker::{Worker, WorkerConfig};

const USAGE: &str = "\
workpool: run shell commands on a pool of workers over mutual TLS

USAGE:
  workpool manager [OPTIONS]      accept workers; read jobs from stdin, one per line
  workpool worker [OPTIONS]       connect to a manager and run its jobs
  workpool generate-tls-certificates [OPTIONS]
  workpool demo [--interactive] [--json]
                                  a manager and two workers in this process, on loopback

Run `workpool SUBCOMMAND --help` for a subcommand's options.";

const MANAGER_HELP: &str = "\
workpool manager: accept workers and run the jobs read from stdin

OPTIONS:
  -h, --host HOST                         address to listen on [default: 127.0.0.1]
  -p, --port PORT                         port to listen on [default: 9001]
      --security-pool-certificate FILE    the manager's certificate (PEM)
      --security-pool-key FILE            the manager's private key (PEM)
      --security-worker-certificates FILE [FILE ...]
                                          self-signed worker certificates to pin: each is
                                          accepted only as itself, never as an issuer
      --security-worker-ca FILE [FILE ...]
                                          CA certificates whose issued worker certificates
                                          are accepted (at least one of these two options)
      --json                              one JSON object per line on stdout
      --metrics-address ADDR              serve Prometheus metrics at http://ADDR/metrics
      --max-connections-per-certificate N
                                          connections one worker certificate may hold [default: 4]
      --insecure-plaintext                no TLS at all (anyone who reaches the port can take jobs)
      --help                              this text

STDIN: each non-empty line is a job, submitted at once (`/bin/bash -c LINE` on a worker).
  exit               shut down gracefully (queued jobs are rejected, running ones finish)
  :tags a,b          jobs after this line need workers with tags a and b (`:tags` clears)
  :platform P        jobs after this line need platform P, e.g. linux-x86_64 (`:platform` clears)
  :timeout 30s       jobs after this line get SIGTERM after 30 s, SIGKILL 5 s later (`:timeout` clears)
  :env NAME=VALUE    jobs after this line get this variable (repeat for more; `:env` clears)
  :priority N        jobs after this line have priority N (higher first; default 0)
  :retries N         jobs after this line run again up to N times if their worker is lost
  :cancel ID         cancel job ID (queued: it never starts; running: TERM, then KILL)
  :jobs              list queued and running jobs
  :workers           list the connected workers
  :status            workers, slots, jobs by state and outcome, queue wait, bytes streamed
  :help              this list
At the end of stdin the manager waits for every job to end, then exits 0.";

const WORKER_HELP: &str = "\
workpool worker: connect to a manager and run its jobs (reconnects by itself)

OPTIONS:
  -h, --host HOST                         the manager's host [default: 127.0.0.1]
  -p, --port PORT                         the manager's port [default: 9001]
      --security-pool-certificate FILE    the manager's self-signed certificate to pin (PEM):
                                          accepted only as itself, never as an issuer
      --security-pool-ca FILE             a CA whose issued manager certificate is accepted
                                          (repeatable; at least one of these two options)
      --security-worker-certificate FILE  this worker's certificate (PEM)
      --security-worker-key FILE          this worker's private key (PEM)
      --name NAME                         name shown to the manager [default: HOSTNAME-PID]
      --tag TAG                           a tag jobs can require (repeatable)
      --slots N                           jobs run at once [default: 1]
      --ahead N                           runs held beyond the slots, each started the moment
                                          a slot frees (0 to 1024) [default: 1]
      --no-verify-hostname                do not check that the manager's certificate names HOST
      --job-user NAME                     run every job as this user, its primary group and no
                                          other group, so that jobs cannot read this worker's key
                                          (the worker must be started as root)
      --insecure-plaintext                no TLS at all
      --help                              this text
SIGTERM or SIGINT drains the worker: it takes no new jobs, lets the running ones finish, then
exits. A second SIGTERM or SIGINT stops it at once: running jobs are killed and cleaned up.";

const GENERATE_HELP: &str = "\
workpool generate-tls-certificates: write self-signed certificates for a manager and its workers

OPTIONS:
      --number-of-workers N   how many worker certificates [default: 1]
      --hostname HOST         the manager's host name (also valid: localhost, 127.0.0.1) [required]
      --output-dir DIR        where to write them [default: .]
      --days N                how long they are valid [default: 3650]
      --force                 replace files that exist already (they are replaced, never
                              written through; keys are new files of mode 0600)
Writes host-cert.pem host-key.pem worker-0-cert.pem worker-0-key.pem ...
The manager's certificate is for server authentication only, the workers' for client
authentication only: neither is accepted in the other's place.";

const DEMO_HELP: &str = "\
workpool demo: a manager and two workers in this process, on loopback, with fresh certificates,
running a short showcase (streaming output, queueing, tag routing, a failing job).

OPTIONS:
      --interactive   after the showcase, keep reading jobs from stdin like `manager`
      --json          one JSON object per line on stdout
      --help          this text";

/// A command-line failure: the message, and whether it was the user's input (exit 2).
struct Failure {
    message: String,
    usage: bool,
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        usage: true,
    }
}

fn failed(e: impl std::fmt::Display) -> Failure {
    Failure {
        message: e.to_string(),
        usage: false,
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The demo is about job output; the daemons log what they do.
    let default_log = if args.first().map(String::as_str) == Some("demo") {
        "warn"
    } else {
        "info"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_log)).init();
    let result = match args.first().map(String::as_str) {
        Some("manager") => run_manager(&args[1..]),
        Some("worker") => run_worker(&args[1..]),
        Some("generate-tls-certificates") => generate(&args[1..]),
        Some("demo") => demo(&args[1..]),
        Some("--help") | Some("help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(usage(format!("unknown subcommand {other:?}; try --help"))),
        None => Err(usage(format!("a subcommand is needed\n\n{USAGE}"))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("workpool: error: {}", f.message);
            ExitCode::from(if f.usage { 2 } else { 1 })
        }
    }
}

/// Parsed options: each flag's values in order (flags without a value get one "").
struct Options(HashMap<&'static str, Vec<String>>);

/// A flag: its names, and how many values it takes (0, 1, or `MANY` until the next flag).
type Spec = (&'static [&'static str], usize);
const MANY: usize = usize::MAX;

fn parse(args: &[String], specs: &[Spec], help: &str) -> Result<Options, Failure> {
    let mut found: HashMap<&'static str, Vec<String>> = HashMap::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if arg == "--help" {
            println!("{help}");
            std::process::exit(0);
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let Some(&(names, arity)) = specs.iter().find(|(names, _)| names.contains(&name)) else {
            return Err(usage(format!("unknown option {arg:?}; try --help")));
        };
        let key = names[0];
        let values = found.entry(key).or_default();
        i += 1;
        match (arity, inline) {
            (0, None) => values.push(String::new()),
            (0, Some(_)) => return Err(usage(format!("{key} takes no value"))),
            (_, Some(v)) => values.push(v),
            (1, None) => {
                let v = args
                    .get(i)
                    .ok_or_else(|| usage(format!("{key} needs a value")))?;
                values.push(v.clone());
                i += 1;
            }
            (_, None) => {
                let start = values.len();
                while i < args.len() && !args[i].starts_with('-') {
                    values.push(args[i].clone());
                    i += 1;
                }
                if values.len() == start {
                    return Err(usage(format!("{key} needs at least one value")));
                }
            }
        }
    }
    Ok(Options(found))
}

impl Options {
    fn one(&self, key: &str) -> Result<Option<&str>, Failure> {
        match self.0.get(key).map(Vec::as_slice) {
            None | Some([]) => Ok(None),
            Some([v]) => Ok(Some(v)),
            Some(_) => Err(usage(format!("{key} given more than once"))),
        }
    }

    fn required(&self, key: &str, why: &str) -> Result<&str, Failure> {
        self.one(key)?
            .ok_or_else(|| usage(format!("{key} is required{why}")))
    }

    fn all(&self, key: &str) -> &[String] {
        self.0.get(key).map_or(&[], Vec::as_slice)
    }

    fn flag(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    fn number<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, Failure> {
        match self.one(key)? {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| usage(format!("{key}: {v:?} is not a valid number"))),
        }
    }
}

const HOST: &[&str] = &["--host", "-h"];
const PORT: &[&str] = &["--port", "-p"];
const POOL_CERT: &[&str] = &["--security-pool-certificate"];
const POOL_KEY: &[&str] = &["--security-pool-key"];
const WORKER_CERTS: &[&str] = &["--security-worker-certificates"];
const WORKER_CAS: &[&str] = &["--security-worker-ca"];
const POOL_CAS: &[&str] = &["--security-pool-ca"];
const WORKER_CERT: &[&str] = &["--security-worker-certificate"];
const WORKER_KEY: &[&str] = &["--security-worker-key"];
const PLAINTEXT: &[&str] = &["--insecure-plaintext"];
const JSON: &[&str] = &["--json"];

fn run_manager(args: &[String]) -> Result<(), Failure> {
    let o = parse(
        args,
        &[
            (HOST, 1),
            (PORT, 1),
            (POOL_CERT, 1),
            (POOL_KEY, 1),
            (WORKER_CERTS, MANY),
            (WORKER_CAS, MANY),
            (PLAINTEXT, 0),
            (JSON, 0),
            (&["--metrics-address"], 1),
            (&["--max-connections-per-certificate"], 1),
        ],
        MANAGER_HELP,
    )?;
    let host = o.one("--host")?.unwrap_or("127.0.0.1");
    let port: u16 = o.number("--port", 9001)?;
    let listen = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let config = if o.flag("--insecure-plaintext") {
        ManagerConfig::insecure_plaintext(listen)
    } else {
        let why = " (or --insecure-plaintext)";
        let cert = o.required("--security-pool-certificate", why)?;
        let key = o.required("--security-pool-key", why)?;
        let (pinned, cas) = (
            o.all("--security-worker-certificates"),
            o.all("--security-worker-ca"),
        );
        if pinned.is_empty() && cas.is_empty() {
            return Err(usage(
                "--security-worker-certificates is required (or --security-worker-ca, or --insecure-plaintext)",
            ));
        }
        let identity = Identity::from_pem_files(cert, key).map_err(failed)?;
        let mut trust = PeerTrust::pinned_pem_files(pinned).map_err(failed)?;
        for ca in cas {
            trust.add_ca_pem_file(ca).map_err(failed)?;
        }
        ManagerConfig::new(listen, identity, trust)
    };
    let mut config = config;
    config.metrics_addr = o.one("--metrics-address")?.map(String::from);
    config.max_connections_per_certificate = o.number(
        "--max-connections-per-certificate",
        config.max_connections_per_certificate,
    )?;
    let manager = Arc::new(Manager::bind(config).map_err(failed)?);
    let console = Console::new(manager.clone(), o.flag("--json"));
    // SAFETY: isatty only reads the state of descriptor 1; any value is a valid argument.
    if !console.json && unsafe { libc::isatty(1) } == 1 {
        show_progress(manager.clone());
    }
    if !console.json {
        eprintln!(
            "workpool manager listening on {}; one job per line, `exit` to quit, `:help` for directives",
            manager.local_addr()
        );
    }
    watch_signals_for_manager(manager.clone());
    console.run(std::io::stdin().lock());
    Ok(())
}

/// On a terminal, a line on stderr every few seconds while jobs are queued or running.
fn show_progress(manager: Arc<Manager>) {
    std::thread::spawn(move || {
        let mut last = String::new();
        loop {
            std::thread::sleep(Duration::from_secs(3));
            let s = manager.stats();
            if s.jobs_queued + s.jobs_running == 0 {
                continue;
            }
            let line = format!(
                "progress: {} queued, {} running, {} done",
                s.jobs_queued,
                s.jobs_running,
                s.jobs_ended()
            );
            if line != last {
                eprintln!("{line}");
                last = line;
            }
        }
    });
}

/// SIGINT/SIGTERM on the manager: the same graceful shutdown as `exit`.
fn watch_signals_for_manager(manager: Arc<Manager>) {
    let signals = block_signals();
    std::thread::spawn(move || {
        let sig = wait_signal(&signals);
        log::info!("signal {sig}: shutting down");
        manager.shutdown();
        std::process::exit(128 + sig);
    });
}

/// Blocks SIGINT and SIGTERM in this thread and every thread it starts from now on, so
/// that one thread can take them with `sigwait` (children get a clean mask from std).
fn block_signals() -> libc::sigset_t {
    // SAFETY: the set is a local that sigemptyset initialises before use, and the
    // pointers passed are to it and to locals that outlive the calls.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` is an initialised signal set and `sig` a live local for the answer.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

fn run_worker(args: &[String]) -> Result<(), Failure> {
    let o = parse(
        args,
        &[
            (HOST, 1),
            (PORT, 1),
            (POOL_CERT, 1),
            (POOL_CAS, 1),
            (WORKER_CERT, 1),
            (WORKER_KEY, 1),
            (&["--name"], 1),
            (&["--tag"], 1),
            (&["--slots"], 1),
            (&["--ahead"], 1),
            (&["--no-verify-hostname"], 0),
            (&["--job-user"], 1),
            (PLAINTEXT, 0),
        ],
        WORKER_HELP,
    )?;
    let host = o.one("--host")?.unwrap_or("127.0.0.1");
    let port: u16 = o.number("--port", 9001)?;
    let mut config = if o.flag("--insecure-plaintext") {
        WorkerConfig::insecure_plaintext(host, port)
    } else {
        let why = " (or --insecure-plaintext)";
        let pool = o.one("--security-pool-certificate")?;
        let cas = o.all("--security-pool-ca");
        if pool.is_none() && cas.is_empty() {
            return Err(usage(
                "--security-pool-certificate is required (or --security-pool-ca, or --insecure-plaintext)",
            ));
        }
        let cert = o.required("--security-worker-certificate", why)?;
        let key = o.required("--security-worker-key", why)?;
        let identity = Identity::from_pem_files(cert, key).map_err(failed)?;
        let mut trust = PeerTrust::pinned_pem_files(pool).map_err(failed)?;
        for ca in cas {
            trust.add_ca_pem_file(ca).map_err(failed)?;
        }
        let c = WorkerConfig::new(host, port, identity, trust);
        if o.flag("--no-verify-hostname") {
            c.no_verify_hostname()
        } else {
            c
        }
    };
    if let Some(name) = o.one("--name")? {
        config.name = name.to_string();
    }
    for tag in o.all("--tag") {
        config = config.tag(tag.clone());
    }
    config.slots = o.number("--slots", 1)?;
    config.ahead = o.number("--ahead", 1)?;
    if let Some(user) = o.one("--job-user")? {
        config = config.job_user(user);
    }
    let signals = block_signals();
    let worker = Worker::start(config).map_err(failed)?;
    eprintln!(
        "workpool worker {} started; connecting to {host}:{port}",
        worker.name()
    );
    // First SIGTERM/SIGINT: drain (no new jobs; leave when the running ones end).
    // A second one: stop now, killing what still runs.
    let sig = wait_signal(&signals);
    log::info!("signal {sig}: draining; send it again to stop at once");
    worker.drain(None);
    let worker = Arc::new(worker);
    let w = worker.clone();
    std::thread::spawn(move || {
        let sig = wait_signal(&signals);
        log::info!("signal {sig}: stopping now");
        w.stop();
    });
    while !worker.wait(Duration::from_secs(3600)) {}
    Ok(())
}

fn generate(args: &[String]) -> Result<(), Failure> {
    let o = parse(
        args,
        &[
            (&["--number-of-workers"], 1),
            (&["--hostname"], 1),
            (&["--output-dir"], 1),
            (&["--days"], 1),
            (&["--force"], 0),
        ],
        GENERATE_HELP,
    )?;
    let n: usize = o.number("--number-of-workers", 1)?;
    let host = o.required("--hostname", "")?;
    let dir = PathBuf::from(o.one("--output-dir")?.unwrap_or("."));
    let days: u32 = o.number("--days", DEFAULT_VALIDITY_DAYS)?;
    if days == 0 {
        return Err(usage("--days must be at least 1"));
    }
    let force = o.flag("--force");
    let mut files = vec![("host-cert.pem".to_string(), "host-key.pem".to_string())];
    files.extend((0..n).map(|i| {
        (
            format!("worker-{i}-cert.pem"),
            format!("worker-{i}-key.pem"),
        )
    }));
    if !force {
        let existing: Vec<String> = files
            .iter()
            .flat_map(|(c, k)| [c, k])
            .map(|f| dir.join(f))
            .filter(|p| p.symlink_metadata().is_ok())
            .map(|p| p.display().to_string())
            .collect();
        if !existing.is_empty() {
            return Err(failed(format!(
                "{} exist(s) already; nothing was written (--force replaces them)",
                existing.join(", ")
            )));
        }
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| failed(format!("creating {}: {e}", dir.display())))?;
    let mut names = vec![host];
    for extra in ["localhost", "127.0.0.1"] {
        if !names.contains(&extra) {
            names.push(extra);
        }
    }
    for (i, (cert_file, key_file)) in files.iter().enumerate() {
        let generated = if i == 0 {
            generate_manager_certificate(&names, days)
        } else {
            let name = format!("worker-{}", i - 1);
            generate_worker_certificate(&[&name, "localhost", "127.0.0.1"], days)
        }
        .map_err(failed)?;
        let (cert_path, key_path) = (dir.join(cert_file), dir.join(key_file));
        generated
            .write_pem_files(&cert_path, &key_path, force)
            .map_err(failed)?;
        println!("wrote {}", cert_path.display());
        println!("wrote {}", key_path.display());
    }
    Ok(())
}

const SHOWCASE: &[&str] = &[
    "echo streaming, one line at a time:; for i in 1 2 3 4; do echo \"  tick $i\"; sleep 0.25; done",
    ":tags big",
    "echo this job needed the tag big and ran on $(hostname) as job $WORKPOOL_JOB_ID",
    ":tags",
    "sleep 0.4; echo queued job A done",
    "sleep 0.4; echo queued job B done",
    "sleep 0.4; echo queued job C done",
    "echo this one fails >&2; exit 3",
    ":workers",
];

fn demo(args: &[String]) -> Result<(), Failure> {
    let o = parse(args, &[(&["--interactive"], 0), (JSON, 0)], DEMO_HELP)?;
    let days = DEFAULT_VALIDITY_DAYS;
    let host = generate_manager_certificate(&["localhost", "127.0.0.1"], days).map_err(failed)?;
    let worker_certs: Vec<_> = ["alpha", "beta"]
        .iter()
        .map(|n| generate_worker_certificate(&[n], days))
        .collect::<Result<_, _>>()
        .map_err(failed)?;
    let mut roots = PeerTrust::new();
    for c in &worker_certs {
        roots
            .add_pinned_pem(c.cert_pem.as_bytes())
            .map_err(failed)?;
    }
    let identity =
        Identity::from_pem(host.cert_pem.as_bytes(), host.key_pem.as_bytes()).map_err(failed)?;
    let manager = Arc::new(
        Manager::bind(ManagerConfig::new("127.0.0.1:0", identity, roots)).map_err(failed)?,
    );
    let console = Console::new(manager.clone(), o.flag("--json"));
    let joined = manager.subscribe();
    let port = manager.local_addr().port();
    let mut workers = Vec::new();
    for (i, (name, c)) in ["alpha", "beta"].iter().zip(&worker_certs).enumerate() {
        let identity =
            Identity::from_pem(c.cert_pem.as_bytes(), c.key_pem.as_bytes()).map_err(failed)?;
        let roots = PeerTrust::pinned_pem(host.cert_pem.as_bytes()).map_err(failed)?;
        let mut config = WorkerConfig::new("127.0.0.1", port, identity, roots).name(*name);
        if i == 1 {
            config = config.tag("big");
        }
        workers.push(Worker::start(config).map_err(failed)?);
    }
    let mut seen = 0;
    while seen < workers.len() {
        match joined.recv_timeout(Duration::from_secs(30)) {
            Ok(ManagerEvent::WorkerJoined(_)) => seen += 1,
            Ok(_) => {}
            Err(_) => return Err(failed("the demo workers did not join within 30 s")),
        }
    }
    if !console.json {
        eprintln!(
            "demo: manager on {} with workers alpha (1 slot) and beta (1 slot, tag big), mutual TLS\n",
            manager.local_addr()
        );
    }
    let mut console = console;
    for line in SHOWCASE {
        if !console.json {
            console.say(&format!("> {line}"));
        }
        console.line(line);
    }
    if o.flag("--interactive") {
        if !console.json {
            console
                .say("demo: now reading jobs from stdin (`exit` to quit, `:help` for directives)");
        }
        console.run(std::io::stdin().lock());
    } else {
        console.wait_for_jobs();
    }
    for w in &workers {
        w.stop();
    }
    manager.shutdown();
    Ok(())
}

/// Reads job lines and directives, submits jobs, and prints what happens.
struct Console {
    manager: Arc<Manager>,
    json: bool,
    out: Arc<Mutex<()>>,
    /// What the directives set for the jobs that follow: requirements, timeout, env, ...
    template: JobSpec,
    printers: Vec<JoinHandle<()>>,
}

impl Console {
    fn new(manager: Arc<Manager>, json: bool) -> Console {
        let out = Arc::new(Mutex::new(()));
        if json {
            emit(
                &out,
                false,
                &format!(
                    "{{\"event\":\"listening\",\"address\":{}}}",
                    json_str(&manager.local_addr().to_string())
                ),
            );
        }
        let pool = manager.subscribe();
        let o = out.clone();
        std::thread::spawn(move || {
            for ev in pool {
                let line = match (&ev, json) {
                    (ManagerEvent::WorkerJoined(w), true) => format!(
                        "{{\"event\":\"worker_joined\",\"worker\":{},\"tags\":{},\"platform\":{},\"slots\":{}}}",
                        json_str(&w.name),
                        json_list(&w.tags),
                        json_str(&w.platform),
                        w.slots
                    ),
                    (ManagerEvent::WorkerLeft { name, reason, .. }, true) => format!(
                        "{{\"event\":\"worker_left\",\"worker\":{},\"reason\":{}}}",
                        json_str(name),
                        json_str(reason)
                    ),
                    (ManagerEvent::WorkerJoined(w), false) => {
                        format!("worker {} joined ({})", w.name, describe(w))
                    }
                    (ManagerEvent::WorkerLeft { name, reason, .. }, false) => {
                        format!("worker {name} left: {reason}")
                    }
                    _ => continue,
                };
                emit(&o, false, &line);
            }
        });
        Console {
            manager,
            json,
            out,
            template: JobSpec::new(""),
            printers: Vec::new(),
        }
    }

    fn say(&self, text: &str) {
        emit(&self.out, false, text);
    }

    fn complain(&self, text: &str) {
        if self.json {
            emit(
                &self.out,
                false,
                &format!("{{\"event\":\"error\",\"message\":{}}}", json_str(text)),
            );
        } else {
            emit(&self.out, true, &format!("workpool: {text}"));
        }
    }

    fn run(mut self, input: impl BufRead) {
        for line in input.lines() {
            let Ok(line) = line else { break };
            if !self.line(&line) {
                self.manager.shutdown();
                break;
            }
        }
        self.finish();
    }

    /// Waits for every job to end, then shuts the manager down.
    fn finish(&mut self) {
        self.wait_for_jobs();
        self.manager.shutdown();
    }

    fn wait_for_jobs(&mut self) {
        for p in self.printers.drain(..) {
            let _ = p.join();
        }
    }

    /// Handles one line; false means `exit`.
    fn line(&mut self, line: &str) -> bool {
        let line = line.trim();
        if line.is_empty() {
            return true;
        }
        if line == "exit" {
            return false;
        }
        if let Some(directive) = line.strip_prefix(':') {
            self.directive(directive);
            return true;
        }
        let spec = JobSpec {
            script: line.to_string(),
            ..self.template.clone()
        };
        match self.manager.submit(spec) {
            Ok(handle) => {
                let id = handle.id();
                if self.json {
                    self.say(&format!(
                        "{{\"event\":\"submitted\",\"job\":{id},\"command\":{}}}",
                        json_str(line)
                    ));
                }
                let (out, json) = (self.out.clone(), self.json);
                self.printers.push(std::thread::spawn(move || {
                    print_job(id, handle.events(), &out, json)
                }));
            }
            Err(e) => self.complain(&format!("job not submitted: {e}")),
        }
        true
    }

    fn status(&self) {
        let s = self.manager.stats();
        let ms = |d: Option<Duration>| {
            d.map_or("-".to_string(), |d| {
                format!("{:.3} ms", d.as_secs_f64() * 1e3)
            })
        };
        if self.json {
            let finished: Vec<String> = s
                .jobs_finished
                .iter()
                .map(|(n, c)| format!("\"{n}\":{c}"))
                .collect();
            self.say(&format!(
                "{{\"event\":\"status\",\"workers\":{},\"workers_draining\":{},\"slots\":{},\"slots_busy\":{},\"queued\":{},\"running\":{},\"submitted\":{},\"finished\":{{{}}},\"oldest_queued_wait_seconds\":{},\"output_bytes\":{}}}",
                s.workers,
                s.workers_draining,
                s.slots_total,
                s.slots_busy,
                s.jobs_queued,
                s.jobs_running,
                s.jobs_submitted,
                finished.join(","),
                s.oldest_queued_wait.map_or("null".into(), |d| format!("{:.3}", d.as_secs_f64())),
                s.output_bytes
            ));
            return;
        }
        let done: Vec<String> = s
            .jobs_finished
            .iter()
            .filter(|(_, c)| *c > 0)
            .map(|(n, c)| format!("{n} {c}"))
            .collect();
        let done = if done.is_empty() {
            String::new()
        } else {
            format!(" ({})", done.join(", "))
        };
        self.say(&format!(
            "status: {} worker(s) ({} draining), {}/{} slots busy, {} queued{}, {} running, {} done{}, {} bytes streamed",
            s.workers,
            s.workers_draining,
            s.slots_busy,
            s.slots_total,
            s.jobs_queued,
            s.oldest_queued_wait.map_or(String::new(), |d| format!(" (oldest {:.1} s)", d.as_secs_f64())),
            s.jobs_running,
            s.jobs_ended(),
            done,
            s.output_bytes
        ));
        self.say(&format!(
            "  queue wait p50 {} p99 {}; dispatch p50 {} p99 {}",
            ms(s.queue_wait.quantile(0.5)),
            ms(s.queue_wait.quantile(0.99)),
            ms(s.dispatch_latency.quantile(0.5)),
            ms(s.dispatch_latency.quantile(0.99))
        ));
        for w in &s.per_worker {
            self.say(&format!(
                "  worker {}: {} running, {} jobs, heard {:.1} s ago, connected {:.0} s",
                w.name,
                w.running,
                w.jobs_run,
                w.last_heard.as_secs_f64(),
                w.connected_for.as_secs_f64()
            ));
        }
    }

    fn list_jobs(&self) {
        let jobs = self.manager.jobs();
        if self.json {
            let list: Vec<String> = jobs
                .iter()
                .map(|j| {
                    let (state, worker) = match &j.state {
                        JobState::Running { worker } => ("running", json_str(worker)),
                        JobState::Disconnected { worker } => ("disconnected", json_str(worker)),
                        _ => ("queued", "null".into()),
                    };
                    format!(
                        "{{\"job\":{},\"state\":\"{state}\",\"worker\":{worker},\"since_seconds\":{:.3},\"attempt\":{},\"priority\":{},\"output_paused\":{},\"command\":{}}}",
                        j.id,
                        j.since.as_secs_f64(),
                        j.attempt,
                        j.priority,
                        j.output_paused,
                        json_str(&j.script)
                    )
                })
                .collect();
            self.say(&format!(
                "{{\"event\":\"jobs\",\"jobs\":[{}]}}",
                list.join(",")
            ));
        } else if jobs.is_empty() {
            self.say("no jobs queued or running");
        } else {
            for j in &jobs {
                let state = match &j.state {
                    JobState::Running { worker } if j.output_paused => {
                        format!("running on {worker} (output paused: the reader is behind)")
                    }
                    JobState::Running { worker } => format!("running on {worker}"),
                    JobState::Disconnected { worker } => {
                        format!("waiting for {worker} to reconnect")
                    }
                    _ => "queued".to_string(),
                };
                self.say(&format!(
                    "job {}: {state} for {:.1} s (attempt {}, priority {}): {}",
                    j.id,
                    j.since.as_secs_f64(),
                    j.attempt,
                    j.priority,
                    j.script
                ));
            }
        }
    }

    fn directive(&mut self, d: &str) {
        let (name, arg) = match d.split_once(char::is_whitespace) {
            Some((n, a)) => (n, a.trim()),
            None => (d, ""),
        };
        match name {
            "tags" => {
                self.template.requirements.tags = arg
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(String::from)
                    .collect();
            }
            "platform" => {
                self.template.requirements.platform = (!arg.is_empty()).then(|| arg.to_string())
            }
            "timeout" if arg.is_empty() => self.template.timeout = None,
            "timeout" => match parse_duration(arg) {
                Some(d) if !d.is_zero() => self.template.timeout = Some(d),
                _ => self.complain(&format!("not a duration: {arg:?} (try 30s, 500ms, 2m)")),
            },
            "env" if arg.is_empty() => self.template.env.clear(),
            "env" => match arg.split_once('=') {
                Some((k, v)) if !k.is_empty() && !k.starts_with("WORKPOOL_") => {
                    self.template.env.insert(k.to_string(), v.to_string());
                }
                _ => self.complain(&format!("expected :env NAME=VALUE, got {arg:?}")),
            },
            "priority" => match if arg.is_empty() { Ok(0) } else { arg.parse() } {
                Ok(p) => self.template.priority = p,
                Err(_) => self.complain(&format!("not a priority: {arg:?} (an integer)")),
            },
            "retries" => match if arg.is_empty() { Ok(0) } else { arg.parse() } {
                Ok(r) => self.template.retries = r,
                Err(_) => self.complain(&format!("not a retry count: {arg:?}")),
            },
            "cancel" => match arg.parse::<u64>() {
                Ok(id) => match self.manager.cancel(JobId(id)) {
                    Ok(()) => {}
                    Err(e) => self.complain(&format!("cannot cancel job {id}: {e}")),
                },
                Err(_) => self.complain(&format!("expected :cancel JOB-ID, got {arg:?}")),
            },
            "jobs" => self.list_jobs(),
            "status" => self.status(),
            "workers" => {
                let workers = self.manager.workers();
                if self.json {
                    let list: Vec<String> = workers
                        .iter()
                        .map(|w| {
                            format!(
                                "{{\"worker\":{},\"address\":{},\"tags\":{},\"platform\":{},\"slots\":{},\"running\":{}}}",
                                json_str(&w.name),
                                w.address.map_or("null".into(), |a| json_str(&a.to_string())),
                                json_list(&w.tags),
                                json_str(&w.platform),
                                w.slots,
                                w.running
                            )
                        })
                        .collect();
                    self.say(&format!(
                        "{{\"event\":\"workers\",\"workers\":[{}]}}",
                        list.join(",")
                    ));
                } else if workers.is_empty() {
                    self.say("no workers connected");
                } else {
                    for w in &workers {
                        self.say(&format!("worker {}: {}", w.name, describe(w)));
                    }
                }
            }
            "help" => self.say(
                MANAGER_HELP
                    .split_once("STDIN:")
                    .map_or(MANAGER_HELP, |(_, s)| s)
                    .trim(),
            ),
            _ => self.complain(&format!("unknown directive :{name} (try :help)")),
        }
    }
}

fn describe(w: &WorkerInfo) -> String {
    let tags: Vec<&str> = w.tags.iter().map(String::as_str).collect();
    format!(
        "{}, {} slot(s), {} running, tags [{}], from {}",
        w.platform,
        w.slots,
        w.running,
        tags.join(","),
        w.address.map_or("?".into(), |a| a.to_string())
    )
}

/// Prints one job's events as they come (a thread per job).
fn print_job(
    id: JobId,
    events: &crossbeam_channel::Receiver<JobEvent>,
    out: &Mutex<()>,
    json: bool,
) {
    let mut partial: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut worker: Option<String> = None;
    for ev in events {
        match ev {
            JobEvent::Queued => {}
            JobEvent::Started { worker: w } => {
                if json {
                    emit(
                        out,
                        false,
                        &format!(
                            "{{\"event\":\"started\",\"job\":{id},\"worker\":{}}}",
                            json_str(&w)
                        ),
                    );
                }
                worker = Some(w);
            }
            JobEvent::Output { stream, bytes } => {
                if json {
                    emit(
                        out,
                        false,
                        &format!(
                            "{{\"event\":\"output\",\"job\":{id},\"stream\":\"{}\",\"data\":{}}}",
                            stream.name(),
                            json_str(&String::from_utf8_lossy(&bytes))
                        ),
                    );
                } else {
                    let buf = &mut partial[stream as usize];
                    buf.extend_from_slice(&bytes);
                    if let Some(end) = buf.iter().rposition(|&b| b == b'\n') {
                        let lines: Vec<u8> = buf.drain(..=end).collect();
                        print_lines(id, stream, &lines, out);
                    }
                }
            }
            JobEvent::Requeued { attempt } => {
                if json {
                    emit(
                        out,
                        false,
                        &format!("{{\"event\":\"requeued\",\"job\":{id},\"attempt\":{attempt}}}"),
                    );
                } else {
                    emit(
                        out,
                        false,
                        &format!("[{id}] worker lost; queued again (attempt {attempt})"),
                    );
                }
            }
            JobEvent::Warning(w) => {
                if json {
                    emit(
                        out,
                        false,
                        &format!(
                            "{{\"event\":\"warning\",\"job\":{id},\"message\":{}}}",
                            json_str(&w)
                        ),
                    );
                } else {
                    emit(out, true, &format!("[{id}] warning: {w}"));
                }
            }
            JobEvent::Finished(outcome) => {
                if json {
                    let mut extra = String::new();
                    match &outcome {
                        Outcome::Signaled(s) => extra = format!(",\"signal\":{s}"),
                        Outcome::Rejected(r) | Outcome::SpawnFailed(r) => {
                            extra = format!(",\"reason\":{}", json_str(r))
                        }
                        _ => {}
                    }
                    emit(
                        out,
                        false,
                        &format!(
                            "{{\"event\":\"finished\",\"job\":{id},\"outcome\":\"{}\",\"exit_code\":{},\"worker\":{}{extra}}}",
                            outcome.name(),
                            outcome.exit_code().map_or("null".into(), |c| c.to_string()),
                            worker.as_deref().map_or("null".into(), json_str)
                        ),
                    );
                } else {
                    for stream in [Stream::Stdout, Stream::Stderr] {
                        let rest = std::mem::take(&mut partial[stream as usize]);
                        if !rest.is_empty() {
                            print_lines(id, stream, &rest, out);
                        }
                    }
                    let line = match &outcome {
                        Outcome::Exited(code) => format!("[{id}] Exit code      : {code}"),
                        other => format!("[{id}] Ended          : {other}"),
                    };
                    emit(out, false, &line);
                }
                return;
            }
            _ => {}
        }
    }
}

fn print_lines(id: JobId, stream: Stream, bytes: &[u8], out: &Mutex<()>) {
    let text = String::from_utf8_lossy(bytes);
    let (label, to_stderr) = match stream {
        Stream::Stdout => ("Standard Output", false),
        Stream::Stderr => ("Standard Error ", true),
    };
    let lines: Vec<String> = text
        .lines()
        .map(|l| format!("[{id}] {label}: {l}"))
        .collect();
    emit(out, to_stderr, &lines.join("\n"));
}

/// Writes whole lines under one lock so that concurrent jobs never interleave a line.
fn emit(lock: &Mutex<()>, to_stderr: bool, text: &str) {
    let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
    if to_stderr {
        let _ = writeln!(std::io::stderr().lock(), "{text}");
    } else {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{text}");
        let _ = o.flush();
    }
}

/// `30s`, `500ms`, `2m`, `1h`, `1.5s`, or a bare number of seconds.
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let scale = match unit.trim() {
        "" | "s" | "sec" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(n * scale).ok()
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_list(items: &BTreeSet<String>) -> String {
    let v: Vec<String> = items.iter().map(|s| json_str(s)).collect();
    format!("[{}]", v.join(","))
}
