//! The journal proven with real processes: a journaled CLI manager killed with SIGKILL
//! at pseudo-random moments under a stream of submissions, and restarted each time on
//! the same port and journal, loses no accepted job and runs none twice; a SIGTERM
//! restart leaves running jobs running; a journal that is corrupt, in use or from a newer
//! version stops the CLI manager in one line and is left as it is; a file size limit
//! fails submissions clearly while a running job goes on.
//!
//! Every job appends `S TOKEN` to a file when it starts and `E TOKEN` when it ends (on
//! the worker's side, which is this machine): each token must be there once of each.
//! The journal itself is read at the end (rusqlite, read-only, once the manager has
//! stopped): every job it knows ended `exited 0`, and it knows exactly the jobs that ran.

mod common;

use common::*;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the end of a run may take: every job left to run on a small machine.
const DRAIN_DEADLINE: Duration = Duration::from_secs(180);

/// A pool's files: certificates (workers 0 and 1 are workers, 2 is a submitter), the
/// journal, the marker files the jobs write, and the processes' logs.
struct Pool {
    dir: PathBuf,
    port: u16,
    journal: PathBuf,
    starts: PathBuf,
    ends: PathBuf,
    /// Every process started, stopped by PID when the test ends however it ends.
    children: Vec<u32>,
}

impl Pool {
    fn new(name: &str) -> Pool {
        let dir = scratch(name);
        Certs::new(3).write_to(&dir);
        Pool {
            port: port_outside_the_ephemeral_range(),
            journal: dir.join("journal.sqlite"),
            starts: dir.join("starts"),
            ends: dir.join("ends"),
            dir,
            children: Vec::new(),
        }
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// `manager` on this pool's port with its certificates, `--json`, then `extra`.
    fn manager_command(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(cli());
        c.args(self.manager_args(extra));
        c
    }

    fn manager_args(&self, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["manager", "-h", "127.0.0.1", "-p"]
            .map(String::from)
            .into();
        a.push(self.port.to_string());
        a.push("--json".into());
        a.extend([
            "--security-pool-certificate".into(),
            self.file("host-cert.pem"),
            "--security-pool-key".into(),
            self.file("host-key.pem"),
            "--security-worker-certificates".into(),
            self.file("worker-0-cert.pem"),
            self.file("worker-1-cert.pem"),
            "--security-submitter-certificates".into(),
            self.file("worker-2-cert.pem"),
        ]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// The journaled console manager: jobs are the lines written to its stdin.
    fn console_args(&self) -> Vec<String> {
        vec![
            "--journal".into(),
            self.journal.display().to_string(),
            "--reconnect-grace".into(),
            "30s".into(),
            // Every ended job stays in the journal, for the checks.
            "--journal-retention-count".into(),
            "10000000".into(),
        ]
    }

    /// Starts a manager from `command` (stdout: JSON lines; stderr appended to
    /// `manager.log`) and waits until it listens.
    fn start_manager(&mut self, mut command: Command) -> Mgr {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("manager.log"))
            .unwrap();
        let spawned = Instant::now();
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child.id());
        let events = json_lines(child.stdout.take().unwrap());
        let stdin = child.stdin.take();
        let mut mgr = Mgr {
            child,
            stdin,
            events,
            spawned,
            listening_after: Duration::ZERO,
            joined: 0,
            joined_after: None,
        };
        match mgr.events.recv_timeout(DEADLINE) {
            Ok(v) if v["event"] == "listening" => {}
            other => panic!(
                "the manager did not listen ({other:?}); its log:\n{}",
                tail(&self.dir.join("manager.log"), 20)
            ),
        }
        mgr.listening_after = spawned.elapsed();
        mgr
    }

    /// Starts CLI worker `i` (certificate `worker-i`) with `slots` slots; its log goes to
    /// `worker-i.log`.
    fn start_worker(&mut self, i: usize, slots: u32) -> Child {
        let log = std::fs::File::create(self.dir.join(format!("worker-{i}.log"))).unwrap();
        let child = Command::new(cli())
            .arg("worker")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["--security-pool-certificate", &self.file("host-cert.pem")])
            .args([
                "--security-worker-certificate",
                &self.file(&format!("worker-{i}-cert.pem")),
            ])
            .args([
                "--security-worker-key",
                &self.file(&format!("worker-{i}-key.pem")),
            ])
            .args(["--name", &format!("w{i}"), "--slots", &slots.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child.id());
        child
    }

    /// A short job: its start and end markers.
    fn short_job(&self, token: &str) -> String {
        format!(
            "echo S {token} >> {s}; echo E {token} >> {e}",
            s = self.starts.display(),
            e = self.ends.display()
        )
    }

    /// A long job that prints `1`..=`lines`, one line each `pace` seconds.
    fn long_job(&self, token: &str, lines: u32, pace: &str) -> String {
        format!(
            "echo S {token} >> {s}; for i in $(seq 1 {lines}); do echo $i; sleep {pace}; done; \
             echo E {token} >> {e}",
            s = self.starts.display(),
            e = self.ends.display()
        )
    }

    fn markers(&self) -> Markers {
        Markers {
            starts: count_tokens(&self.starts, "S"),
            ends: count_tokens(&self.ends, "E"),
        }
    }

    /// Lines of the workers' logs that say a job was killed because its manager no
    /// longer waited for it.
    fn orphan_kills(&self) -> Vec<String> {
        (0..2)
            .flat_map(|i| {
                std::fs::read_to_string(self.dir.join(format!("worker-{i}.log")))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("killed job"))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for &pid in &self.children {
            if running_child(pid) {
                // SAFETY: kill takes no pointers; the PID is a child of this process
                // that has not exited (so not one reaped whose number was reused).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// A free port below the range the kernel picks local ports of outgoing connections
/// from: while a killed manager is down, no connection (a worker or a submitter dialling
/// it again) can take its port, or connect to itself on it.
fn port_outside_the_ephemeral_range() -> u16 {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (first, span) = (10_000u16, low.saturating_sub(10_000).max(1));
    // Each call starts elsewhere (tests run in parallel, each with its own port).
    static CALLS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let start = (std::process::id() as u16)
        .wrapping_mul(7919)
        .wrapping_add(call.wrapping_mul(1009))
        % span;
    (0..span)
        .map(|i| first + (start + i) % span)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free port below the ephemeral range")
}

/// Whether `pid` is a child of this process that is still running.
fn running_child(pid: u32) -> bool {
    // SAFETY: an all-zero siginfo_t is a valid value for waitid to fill in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is valid for the call; WNOWAIT leaves an exited child unreaped.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: waitid filled `info` in, or left it zeroed (no child has exited).
    r == 0 && unsafe { info.si_pid() } == 0
}

/// A running CLI manager.
struct Mgr {
    child: Child,
    stdin: Option<ChildStdin>,
    events: Receiver<Value>,
    spawned: Instant,
    /// From its start until it listened.
    listening_after: Duration,
    /// Workers it has seen join, and how long after its start the second one did.
    joined: usize,
    joined_after: Option<Duration>,
}

impl Mgr {
    /// Writes lines to the console's stdin; false if it is gone.
    fn write_lines(&mut self, lines: &[String]) -> bool {
        let Some(stdin) = self.stdin.as_mut() else {
            return false;
        };
        let mut text = lines.join("\n");
        text.push('\n');
        stdin.write_all(text.as_bytes()).is_ok() && stdin.flush().is_ok()
    }

    /// The next event before `deadline` (None at the deadline or at the end of output);
    /// counts workers joining on the way.
    fn next_before(&mut self, deadline: Instant) -> Option<Value> {
        match self.events.recv_deadline(deadline) {
            Ok(v) => {
                if v["event"] == "worker_joined" {
                    self.joined += 1;
                    if self.joined == 2 {
                        self.joined_after = Some(self.spawned.elapsed());
                    }
                }
                Some(v)
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    /// The next event of this kind (panics at the deadline).
    fn until(&mut self, kind: &str) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.next_before(deadline) {
                Some(v) if v["event"] == kind => return v,
                Some(_) => {}
                None => panic!("no {kind:?} event from the manager before the deadline"),
            }
        }
    }

    /// The next event of one of these kinds (panics at the deadline).
    fn until_any(&mut self, kinds: &[&str]) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.next_before(deadline) {
                Some(v) if kinds.iter().any(|k| v["event"] == *k) => return v,
                Some(_) => {}
                None => panic!("no {kinds:?} event from the manager before the deadline"),
            }
        }
    }

    /// SIGKILL, and waits for it to be gone (so that its port is free).
    fn kill_9(mut self) {
        let status = self.child.try_wait().unwrap();
        assert!(
            status.is_none(),
            "the manager had ended by itself: {status:?}"
        );
        self.child.kill().unwrap();
        wait_exit(&mut self.child);
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill takes no pointers; the PID is our own child's, not yet reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Asks the console for the jobs it has (queued or running), by `:jobs`.
    fn jobs(&mut self) -> Vec<Value> {
        assert!(self.write_lines(&[":jobs".into()]), "the console is gone");
        self.until("jobs")["jobs"].as_array().unwrap().clone()
    }
}

/// A child's stdout as JSON lines, read on a thread of its own.
fn json_lines(from: impl std::io::Read + Send + 'static) -> Receiver<Value> {
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(from).lines() {
            let Ok(line) = line else { return };
            let v: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"));
            if tx.send(v).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits (with the deadline) until a child has exited; its status.
fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let mut status = None;
    wait_until("the process exits", || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// How many times each token is in a marker file (lines `TAG TOKEN`).
fn count_tokens(path: &Path, tag: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let (t, token) = line.split_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        assert_eq!(t, tag, "a line of {}: {line:?}", path.display());
        *counts.entry(token.to_owned()).or_insert(0) += 1;
    }
    counts
}

/// The start and end markers of every job that ran.
struct Markers {
    starts: HashMap<String, usize>,
    ends: HashMap<String, usize>,
}

impl Markers {
    /// Tokens started or ended more than once, and tokens started but never ended.
    fn faults(&self) -> Vec<String> {
        let mut faults: Vec<String> = Vec::new();
        for (t, &n) in &self.starts {
            if n > 1 {
                faults.push(format!("{t} started {n} times"));
            }
            if !self.ends.contains_key(t) {
                faults.push(format!("{t} started and never ended"));
            }
        }
        for (t, &n) in &self.ends {
            if n > 1 {
                faults.push(format!("{t} ended {n} times"));
            }
            if !self.starts.contains_key(t) {
                faults.push(format!("{t} ended without a start"));
            }
        }
        faults.sort();
        faults
    }
}

/// One row of the journal's `jobs` table: (state, outcome, exit code, script).
type JournalRow = (String, Option<String>, Option<i64>, String);

/// The journal's jobs by id, read once no manager has it open.
fn journal_jobs(path: &Path) -> BTreeMap<u64, JournalRow> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn
        .prepare("SELECT id, state, outcome, outcome_code, script FROM jobs")
        .unwrap();
    stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)? as u64,
            (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?),
        ))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// The token a marker script carries (`echo S TOKEN >> …`).
fn token_of(script: &str) -> Option<&str> {
    script.strip_prefix("echo S ")?.split_whitespace().next()
}

/// A small seeded generator (splitmix64): the moments of the faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = (hi - lo).as_micros() as u64;
        lo + Duration::from_micros(self.next() % (span + 1))
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Remote submitters: threads that each submit arrays of short jobs with `workpool
/// submit --detach --array`, and CLI processes that follow long jobs (`workpool submit`).
const SUBMITTERS: usize = 3;
const ARRAY: usize = 25;

/// Where the managers are: a generation that goes up each time one listens again.
#[derive(Default)]
struct Up {
    generation: std::sync::Mutex<u64>,
    changed: std::sync::Condvar,
}

impl Up {
    fn now(&self) -> u64 {
        *self.generation.lock().unwrap()
    }

    fn bump(&self) {
        *self.generation.lock().unwrap() += 1;
        self.changed.notify_all();
    }

    /// Waits (with the deadline) until a manager newer than `seen` listens.
    fn wait_past(&self, seen: u64) {
        let deadline = Instant::now() + DEADLINE;
        let mut g = self.generation.lock().unwrap();
        while *g <= seen {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no manager came back");
            g = self.changed.wait_timeout(g, left).unwrap().0;
        }
    }
}

/// How a remote submitter reaches the pool (certificate 2, trusted as a submitter).
#[derive(Clone)]
struct Conn {
    dir: PathBuf,
    port: u16,
}

impl Conn {
    fn command(&self, rest: &[&str]) -> Command {
        let f = |n: &str| self.dir.join(n).display().to_string();
        let mut c = Command::new(cli());
        c.arg("submit")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["--security-pool-certificate", &f("host-cert.pem")])
            .args(["--security-submitter-certificate", &f("worker-2-cert.pem")])
            .args(["--security-submitter-key", &f("worker-2-key.pem")])
            .args(rest)
            .env("RUST_LOG", "warn");
        c
    }
}

/// What a remote submitter thread saw: the tokens of the jobs it was answered with, by
/// id, and the token prefixes of arrays that got no answer (the manager died with them;
/// they may have been accepted).
#[derive(Default)]
struct Submitted {
    accepted: Vec<(String, u64)>,
    unanswered: Vec<String>,
    /// Why, as `submit` said (one line each).
    why: Vec<String>,
}

/// A remote submitter: `arrays` arrays of short jobs, each job writing `S PREFIX-INDEX`
/// and `E PREFIX-INDEX`; an array not answered is sent again (under a new prefix) once
/// a manager listens again.
fn remote_submitter(
    conn: Conn,
    up: Arc<Up>,
    me: usize,
    arrays: usize,
    markers: (PathBuf, PathBuf),
) -> Submitted {
    let script = format!(
        "echo S $T-$WORKPOOL_ARRAY_INDEX >> {}; echo E $T-$WORKPOOL_ARRAY_INDEX >> {}",
        markers.0.display(),
        markers.1.display()
    );
    let range = format!("1-{ARRAY}");
    let mut out = Submitted::default();
    let mut attempt = 0;
    for n in 0..arrays {
        loop {
            attempt += 1;
            let prefix = format!("r{me}-{n}-{attempt}");
            let seen = up.now();
            let env = format!("T={prefix}");
            let (code, stdout, stderr) = run_to_end(
                conn.command(&["--detach", "--array", &range, "--env", &env, "--", &script]),
            );
            if code == Some(0) {
                let ids: Vec<u64> = stdout.lines().map(|l| l.trim().parse().unwrap()).collect();
                assert_eq!(ids.len(), ARRAY, "{stdout}");
                for (i, id) in ids.into_iter().enumerate() {
                    out.accepted.push((format!("{prefix}-{}", i + 1), id));
                }
                break;
            }
            assert_eq!(code, Some(1), "{stderr}");
            let why = stderr.lines().last().unwrap_or_default();
            assert!(why.starts_with("workpool: error: "), "{stderr}");
            out.unanswered.push(prefix);
            out.why.push(why.to_owned());
            up.wait_past(seen);
        }
    }
    out
}

/// A long job followed by `workpool submit` (attached): it prints `1`..=`lines`, one
/// each `pace` seconds, between its start and end markers.
struct Follower {
    token: String,
    child: Child,
    stdout: std::thread::JoinHandle<Vec<u8>>,
}

fn follow_long_job(conn: &Conn, pool: &Pool, token: &str, lines: u32) -> Follower {
    use std::io::Read;
    let script = pool.long_job(token, lines, "0.05");
    let mut child = conn
        .command(&["--", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(pool.dir.join(format!("{token}.stderr"))).unwrap())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    Follower {
        token: token.to_owned(),
        child,
        stdout,
    }
}

#[test]
fn kill_9_at_random_moments_loses_no_accepted_job_and_runs_none_twice() {
    // Sizes (each can be changed for a longer soak): kills, short jobs in all (a quarter
    // through the console, the rest from remote submitters), and the seed of the moments.
    let kills: usize = env_or("WP_CRASH_KILLS", 36);
    let jobs: usize = env_or("WP_CRASH_JOBS", 4000);
    let arrays = (jobs * 3 / 4).div_ceil(ARRAY * SUBMITTERS);
    let target = jobs.saturating_sub(arrays * ARRAY * SUBMITTERS);
    let long_jobs: u32 = 4;
    let long_lines: u32 = 300;
    let seed: u64 = env_or(
        "WP_CRASH_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    eprintln!("crash test: seed {seed} (WP_CRASH_SEED), {kills} kills, {jobs} short jobs");
    let mut rng = Rng(seed);
    let began = Instant::now();
    let mut pool = Pool::new("journal-crash");
    let args = pool.console_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let conn = Conn {
        dir: pool.dir.clone(),
        port: pool.port,
    };
    let up = Arc::new(Up::default());

    // The first manager, then the workers (a few slots each, one run held ahead), then
    // the remote submitters.
    let mut mgr = pool.start_manager(pool.manager_command(&args));
    let mut workers = vec![pool.start_worker(0, 3), pool.start_worker(1, 3)];
    let submitters: Vec<_> = (0..SUBMITTERS)
        .map(|me| {
            let (conn, up) = (conn.clone(), up.clone());
            let markers = (pool.starts.clone(), pool.ends.clone());
            std::thread::spawn(move || remote_submitter(conn, up, me, arrays, markers))
        })
        .collect();
    let mut followers: Vec<Follower> = Vec::new();

    // Console jobs whose `submitted` line was seen (accepted: their record is on disk),
    // by token; tokens written to a console that died before saying so.
    let mut accepted: BTreeMap<String, u64> = BTreeMap::new();
    let mut unanswered: BTreeSet<String> = BTreeSet::new();
    let mut next_token = 0usize;
    let mut listening = Vec::new();
    let mut back = Vec::new();
    const CHUNK: usize = 20;

    for life in 0..=kills {
        let last = life == kills;
        let kill_at = (!last).then(|| {
            Instant::now() + rng.between(Duration::from_millis(150), Duration::from_millis(1500))
        });
        // Long jobs go in first, and again halfway: they run through many kills.
        if life == 0 || life == kills / 2 {
            for _ in 0..long_jobs / 2 {
                let token = format!("long{}", followers.len() + 1);
                let f = follow_long_job(&conn, &pool, &token, long_lines);
                pool.children.push(f.child.id());
                followers.push(f);
            }
        }
        // A chunk of console submissions in flight at a time; the next once it is
        // answered.
        let mut in_flight: BTreeSet<String> = BTreeSet::new();
        loop {
            if in_flight.is_empty() && accepted.len() < target {
                let chunk: Vec<String> = (0..CHUNK.min(target - accepted.len()))
                    .map(|_| {
                        next_token += 1;
                        format!("t{next_token}")
                    })
                    .collect();
                let lines: Vec<String> = chunk.iter().map(|t| pool.short_job(t)).collect();
                in_flight.extend(chunk);
                if !mgr.write_lines(&lines) {
                    break;
                }
            }
            let deadline = match kill_at {
                Some(at) => at,
                None if in_flight.is_empty() && accepted.len() >= target => break,
                None => Instant::now() + DEADLINE,
            };
            let Some(ev) = mgr.next_before(deadline) else {
                assert!(
                    kill_at.is_some(),
                    "the console answered no submission before the deadline"
                );
                break;
            };
            match ev["event"].as_str() {
                Some("submitted") => {
                    let script = ev["command"].as_str().unwrap();
                    let token = token_of(script).unwrap().to_owned();
                    in_flight.remove(&token);
                    accepted.insert(token, ev["job"].as_u64().unwrap());
                }
                Some("error") => panic!("a submission failed: {ev}"),
                _ => {}
            }
        }
        if last {
            break;
        }
        if life > 0
            && let Some(d) = mgr.joined_after
        {
            back.push(d);
        }
        mgr.kill_9();
        unanswered.extend(in_flight);
        mgr = pool.start_manager(pool.manager_command(&args));
        up.bump();
        listening.push(mgr.listening_after);
    }
    let console_accepted = accepted.len();
    let mut remote_unanswered = Vec::new();
    let mut remote_why: BTreeMap<String, usize> = BTreeMap::new();
    for s in submitters {
        let s = s.join().expect("a remote submitter panicked");
        accepted.extend(s.accepted);
        remote_unanswered.extend(s.unanswered);
        for w in s.why {
            // The address and the OS's words vary; what went wrong is before them.
            let what = w.split(" at 127.0.0.1").next().unwrap_or(&w).to_owned();
            *remote_why.entry(what).or_insert(0) += 1;
        }
    }
    let submitted_in = began.elapsed();

    // Every job runs to its end: the manager has none left (queued, running, or
    // waiting for its worker), and each follower has its job's every line.
    let deadline = Instant::now() + DRAIN_DEADLINE;
    loop {
        let jobs = mgr.jobs();
        if jobs.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} job(s) never ended, e.g. {:?}",
            jobs.len(),
            &jobs[..jobs.len().min(3)]
        );
        // Pacing of the polls only: what is waited for is the condition above.
        let _ = mgr.next_before(Instant::now() + Duration::from_millis(200));
    }
    let drained_in = began.elapsed() - submitted_in;
    let expected: Vec<u8> = (1..=long_lines)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();
    for mut f in followers {
        let status = wait_exit(&mut f.child);
        let stdout = f.stdout.join().unwrap();
        let stderr = std::fs::read_to_string(pool.dir.join(format!("{}.stderr", f.token))).unwrap();
        assert_eq!(status.code(), Some(0), "{}: {stderr}", f.token);
        assert!(
            stdout == expected,
            "{}: every line once and in order: {:?} (stderr: {stderr})",
            f.token,
            String::from_utf8_lossy(&stdout)
        );
        accepted.insert(f.token, 0);
    }

    // Stopped (a journaled shutdown ends nothing: there is nothing left), then read.
    mgr.signal(libc::SIGTERM);
    wait_exit(&mut mgr.child);
    for w in &mut workers {
        w.kill().unwrap();
        wait_exit(w);
    }
    let markers = pool.markers();
    assert_eq!(
        markers.faults(),
        Vec::<String>::new(),
        "each job ran once, to its end"
    );
    for t in accepted.keys() {
        assert_eq!(markers.starts.get(t), Some(&1), "accepted job {t} ran once");
    }
    // Jobs whose submission was not answered ran at most once (checked above); some of
    // them were accepted before the kill and ran.
    let remote_unanswered_ran = markers
        .starts
        .keys()
        .filter(|t| {
            remote_unanswered.iter().any(|p| {
                t.strip_prefix(p.as_str())
                    .is_some_and(|r| r.starts_with('-'))
            })
        })
        .count();
    let unconfirmed_ran = markers
        .starts
        .keys()
        .filter(|t| {
            unanswered.contains(*t)
                || remote_unanswered.iter().any(|p| {
                    t.strip_prefix(p.as_str())
                        .is_some_and(|r| r.starts_with('-'))
                })
        })
        .count();
    let journal = journal_jobs(&pool.journal);
    for (id, (state, outcome, code, script)) in &journal {
        assert_eq!(
            (state.as_str(), outcome.as_deref(), *code),
            ("ended", Some("exited"), Some(0)),
            "job {id} in the journal ({script})"
        );
    }
    for (t, id) in accepted.iter().filter(|(_, id)| **id > 0) {
        assert!(
            journal.contains_key(id),
            "accepted job {id} ({t}) is in the journal"
        );
    }
    assert_eq!(
        journal.len(),
        markers.starts.len(),
        "the journal knows exactly the jobs that ran"
    );
    let kills_of_jobs = pool.orphan_kills();
    assert!(
        kills_of_jobs.is_empty(),
        "workers killed jobs: {kills_of_jobs:?}"
    );

    // What the restarted managers did (from their logs): jobs resumed with their
    // workers, and runs that never reached their worker, queued again.
    let log = std::fs::read_to_string(pool.dir.join("manager.log")).unwrap();
    let resumed: usize = log
        .lines()
        .filter_map(|l| l.split(", resuming ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse::<usize>().ok())
        .sum();
    let never_got = log.matches("(it never got it); queued again").count();
    let mut opened: Vec<Duration> = log
        .lines()
        .filter_map(|l| l.split(" job(s) to go on with, read in ").nth(1))
        .filter_map(|rest| rest.trim_end_matches(" s").parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .collect();
    eprintln!(
        "crash test: the journal read at each start: median {:?}, max {:?}; arrays not \
         answered ({remote_unanswered_ran} of their jobs ran), and why: {remote_why:?}",
        median(&mut opened),
        opened.iter().max().copied().unwrap_or_default()
    );
    eprintln!(
        "crash test: {resumed} runs resumed by their workers after a restart, {never_got} \
         queued again (their run never reached its worker)"
    );
    eprintln!(
        "crash test: seed {seed}: {kills} kills; {console_accepted} short jobs accepted through \
         the console and {} from remote submitters, {long_jobs} long ones followed; {} more ran \
         that were accepted as the manager died ({} console and {} remote arrays never \
         answered); restart to listening: median {:?}, max {:?}; to both workers back: median \
         {:?} ({} seen); submissions over in {:.1} s, the rest ran in {:.1} s",
        accepted.len() - console_accepted - long_jobs as usize,
        unconfirmed_ran,
        unanswered.len(),
        remote_unanswered.len(),
        median(&mut listening.clone()),
        listening.iter().max().copied().unwrap_or_default(),
        median(&mut back),
        back.len(),
        submitted_in.as_secs_f64(),
        drained_in.as_secs_f64(),
    );
    std::fs::remove_dir_all(&pool.dir).unwrap();
}

/// Runs a process to its end (with the deadline): its exit code, stdout and stderr.
fn run_to_end(mut command: Command) -> (Option<i32>, String, String) {
    use std::io::Read;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut o = String::new();
        let _ = out.read_to_string(&mut o);
        o
    });
    let err_reader = std::thread::spawn(move || {
        let mut e = String::new();
        let _ = err.read_to_string(&mut e);
        e
    });
    let status = wait_exit(&mut child);
    (
        status.code(),
        reader.join().unwrap(),
        err_reader.join().unwrap(),
    )
}

/// A job that writes its shell's PID to `pid`, then runs until `go` exists.
fn held_job(pool: &Pool, token: &str, pid: &Path, go: &Path) -> String {
    format!(
        "echo S {token} >> {s}; echo $$ > {pid}; while [ ! -e {go} ]; do sleep 0.02; done; \
         echo E {token} >> {e}",
        s = pool.starts.display(),
        e = pool.ends.display(),
        pid = pid.display(),
        go = go.display()
    )
}

/// The PID a job wrote to `file`, once it has.
fn pid_in(file: &Path) -> i32 {
    let mut pid = None;
    wait_until("the job writes its PID", || {
        pid = std::fs::read_to_string(file)
            .ok()
            .and_then(|t| t.trim().parse().ok());
        pid.is_some()
    });
    pid.unwrap()
}

/// Waits (with the deadline) until the manager has no job left.
fn wait_no_jobs(mgr: &mut Mgr) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let jobs = mgr.jobs();
        if jobs.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "jobs never ended: {jobs:?}");
        // Pacing of the polls only: what is waited for is the condition above.
        let _ = mgr.next_before(Instant::now() + Duration::from_millis(50));
    }
}

#[test]
fn a_sigterm_restart_leaves_running_jobs_running_and_resumes_them() {
    let mut pool = Pool::new("journal-sigterm");
    let args = pool.console_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut mgr = pool.start_manager(pool.manager_command(&args));
    // Two slots and one run held ahead: two running jobs (one followed by a remote
    // submitter), one held on the worker, one in the manager's queue.
    let mut worker = pool.start_worker(0, 2);
    mgr.until("worker_joined");
    let (pid_file, go) = (pool.dir.join("pid"), pool.dir.join("go"));
    assert!(mgr.write_lines(&[held_job(&pool, "long", &pid_file, &go)]));
    let conn = Conn {
        dir: pool.dir.clone(),
        port: pool.port,
    };
    let followed = format!(
        "echo S followed >> {s}; seq 1 1000; while [ ! -e {go} ]; do sleep 0.02; done; \
         seq 1001 2000; echo E followed >> {e}",
        s = pool.starts.display(),
        e = pool.ends.display(),
        go = go.display()
    );
    let mut follower = {
        use std::io::Read;
        let mut child = conn
            .command(&["--", &followed])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        pool.children.push(child.id());
        let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let reader = std::thread::spawn(move || {
            let (mut o, mut e) = (Vec::new(), String::new());
            let _ = out.read_to_end(&mut o);
            let _ = err.read_to_string(&mut e);
            (o, e)
        });
        (child, reader)
    };
    wait_until("the followed job starts", || {
        pool.markers().starts.contains_key("followed")
    });
    assert!(mgr.write_lines(&[pool.short_job("next"), pool.short_job("last")]));
    let mut ids = BTreeMap::new();
    while ids.len() < 3 {
        let ev = mgr.until("submitted");
        let token = token_of(ev["command"].as_str().unwrap())
            .unwrap()
            .to_owned();
        ids.insert(token, ev["job"].as_u64().unwrap());
    }
    let shell = pid_in(&pid_file);

    // SIGTERM: the console shuts down, and with a journal it ends no job.
    mgr.signal(libc::SIGTERM);
    let status = wait_exit(&mut mgr.child);
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert!(alive(shell), "the running job was not killed");
    assert!(worker.try_wait().unwrap().is_none(), "the worker goes on");
    let started: BTreeSet<String> = pool.markers().starts.into_keys().collect();
    assert_eq!(
        started,
        BTreeSet::from(["long".to_owned(), "followed".to_owned()])
    );

    // Started again on the same port and journal: the worker comes back and is given
    // its job again; the others run after it.
    let mut mgr = pool.start_manager(pool.manager_command(&args));
    let long = ids["long"];
    let deadline = Instant::now() + DEADLINE;
    loop {
        let jobs = mgr.jobs();
        let state = jobs
            .iter()
            .find(|j| j["job"] == long)
            .map(|j| j["state"].clone());
        if state == Some(Value::from("running")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the long job was not resumed: {jobs:?}"
        );
        // Pacing of the polls only: what is waited for is the condition above.
        let _ = mgr.next_before(Instant::now() + Duration::from_millis(50));
    }
    let resumed_after = mgr.spawned.elapsed();
    assert!(alive(shell), "the same run goes on");
    std::fs::write(&go, "").unwrap();
    wait_no_jobs(&mut mgr);
    // Its remote submitter followed the other one through the restart: every line,
    // once and in order, and its exit status.
    let status = wait_exit(&mut follower.0);
    let (stdout, stderr) = follower.1.join().unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    let expected: Vec<u8> = (1..=2000)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();
    assert!(
        stdout == expected,
        "every line once and in order: {} bytes of {} ({stderr})",
        stdout.len(),
        expected.len()
    );
    let markers = pool.markers();
    assert_eq!(markers.faults(), Vec::<String>::new());
    for t in ids.keys() {
        assert_eq!(markers.starts.get(t), Some(&1), "{t} ran once");
    }
    assert_eq!(
        pid_in(&pid_file),
        shell,
        "its shell is the one that started first"
    );
    let kills = pool.orphan_kills();
    assert!(kills.is_empty(), "the worker killed jobs: {kills:?}");
    assert!(
        worker.try_wait().unwrap().is_none(),
        "the worker never stopped"
    );

    mgr.signal(libc::SIGTERM);
    wait_exit(&mut mgr.child);
    worker.kill().unwrap();
    wait_exit(&mut worker);
    let journal = journal_jobs(&pool.journal);
    for (t, id) in &ids {
        let (state, outcome, code, _) = &journal[id];
        assert_eq!(
            (state.as_str(), outcome.as_deref(), *code),
            ("ended", Some("exited"), Some(0)),
            "job {id} ({t})"
        );
    }
    eprintln!(
        "sigterm restart: the running job was resumed {:?} after the manager started again",
        resumed_after
    );
    std::fs::remove_dir_all(&pool.dir).unwrap();
}

/// `manager` on `journal` (its own free port, stdin closed) run to its end.
fn manager_on(pool: &Pool, journal: &Path) -> (Option<i32>, String, String) {
    let mut c = Command::new(cli());
    c.arg("manager")
        .args(["-h", "127.0.0.1", "-p", &free_port().to_string()])
        .args(["--security-pool-certificate", &pool.file("host-cert.pem")])
        .args(["--security-pool-key", &pool.file("host-key.pem")])
        .args([
            "--security-worker-certificates",
            &pool.file("worker-0-cert.pem"),
        ])
        .args(["--serve", "--journal"])
        .arg(journal);
    run_to_end(c)
}

/// A refused journal: exit code 1, one line on stderr that names the file and says
/// `why`, and the file as it was.
fn assert_refused(pool: &Pool, journal: &Path, why: &str) {
    let before = std::fs::read(journal).unwrap();
    let (code, _, err) = manager_on(pool, journal);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains(&journal.display().to_string()), "{err}");
    assert!(err.contains(why), "{err}");
    assert_eq!(std::fs::read(journal).unwrap(), before, "left as it was");
}

#[test]
fn a_corrupt_a_locked_a_newer_or_a_foreign_journal_stops_the_cli_manager_in_one_line() {
    let mut pool = Pool::new("journal-refused");
    // Garbage.
    let garbage = pool.dir.join("garbage.sqlite");
    let mut junk = vec![0u8; 64 << 10];
    let mut rng = Rng(14);
    for b in &mut junk {
        *b = rng.next() as u8;
    }
    std::fs::write(&garbage, &junk).unwrap();
    assert_refused(&pool, &garbage, "is corrupt");

    // In use by a running manager: the second is refused, the first goes on.
    let args = pool.console_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut first = pool.start_manager(pool.manager_command(&args));
    assert_refused(
        &pool,
        &pool.journal,
        &format!(
            "is in use by another manager (process {})",
            first.child.id()
        ),
    );
    let mut worker = pool.start_worker(0, 1);
    assert!(first.write_lines(&[pool.short_job("after")]));
    first.until("submitted");
    let finished = first.until("finished");
    assert_eq!(finished["exit_code"], 0, "{finished}");
    first.signal(libc::SIGTERM);
    wait_exit(&mut first.child);
    worker.kill().unwrap();
    wait_exit(&mut worker);

    // Written by a newer version (its format number, as a newer build would write it).
    let newer = pool.dir.join("newer.sqlite");
    std::fs::copy(&pool.journal, &newer).unwrap();
    {
        let c = rusqlite::Connection::open(&newer).unwrap();
        c.execute("UPDATE meta SET value = value + 1 WHERE key = 'format'", [])
            .unwrap();
    }
    assert_refused(&pool, &newer, "was written by a newer version of workpool");

    // An SQLite database of something else.
    let foreign = pool.dir.join("foreign.sqlite");
    {
        let c = rusqlite::Connection::open(&foreign).unwrap();
        c.execute_batch("CREATE TABLE notes (text TEXT); INSERT INTO notes VALUES ('mine');")
            .unwrap();
    }
    assert_refused(&pool, &foreign, "not a workpool journal");
    std::fs::remove_dir_all(&pool.dir).unwrap();
}

/// The file size limit the manager runs under in the full-disk test, in KiB (`ulimit
/// -f`): the new journal takes about 30 KiB, and each of the test's big jobs about
/// 130 KiB of write-ahead log (its script twice: as a column and in its spec), so a
/// few are taken before the journal cannot grow.
const FSIZE_LIMIT_KIB: u64 = 512;

#[test]
fn a_full_disk_fails_submissions_clearly_while_a_running_job_goes_on() {
    if !have_tool("bash") {
        return missing_prerequisite("the full-disk test", "bash is not installed");
    }
    let mut pool = Pool::new("journal-full");
    let args = pool.console_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // The soft limit only, so that it can be raised again from here (space comes back).
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(format!(
            "ulimit -S -f {FSIZE_LIMIT_KIB} && exec \"$0\" \"$@\""
        ))
        .arg(cli())
        .args(pool.manager_args(&args));
    let mut mgr = pool.start_manager(command);
    let manager_pid = mgr.child.id() as i32;
    let mut worker = pool.start_worker(0, 1);
    mgr.until("worker_joined");
    let (pid_file, go) = (pool.dir.join("pid"), pool.dir.join("go"));
    assert!(mgr.write_lines(&[held_job(&pool, "running", &pid_file, &go)]));
    let running = mgr.until("submitted")["job"].as_u64().unwrap();
    let shell = pid_in(&pid_file);

    // Big jobs from a remote submitter (`submit --detach`) until the journal cannot
    // take one more.
    let conn = Conn {
        dir: pool.dir.clone(),
        port: pool.port,
    };
    let padding = "x".repeat(60_000);
    let big = |t: &str| format!("{}; : {padding}", pool.short_job(t));
    let submit = |t: &str| run_to_end(conn.command(&["--detach", "--", &big(t)]));
    let mut accepted = BTreeMap::new();
    let mut refused = Vec::new();
    let mut why = String::new();
    for i in 0..100 {
        let token = format!("big{i}");
        let (code, stdout, stderr) = submit(&token);
        if code == Some(0) {
            accepted.insert(token, stdout.trim().parse::<u64>().unwrap());
        } else {
            assert_eq!(code, Some(1), "{stderr}");
            assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
            why = stderr.trim().to_owned();
            refused.push(token);
            break;
        }
    }
    let full_at = std::fs::metadata(&pool.journal).unwrap().len()
        + std::fs::metadata(pool.dir.join("journal.sqlite-wal")).map_or(0, |m| m.len());
    assert!(!accepted.is_empty(), "some jobs were taken first");
    assert!(
        !refused.is_empty(),
        "the journal never filled: {full_at} bytes"
    );
    assert!(
        why.starts_with("workpool: error: the job was not submitted:")
            && why.contains("journal")
            && why.contains(&pool.journal.display().to_string())
            && why.contains("the disk is full"),
        "{why}"
    );
    // The console's own submissions get the same answer.
    assert!(mgr.write_lines(&[big("console")]));
    let ev = mgr.until_any(&["submitted", "error"]);
    assert_eq!(ev["event"], "error", "{ev}");
    let said = ev["message"].as_str().unwrap();
    assert!(said.contains("the disk is full"), "{said}");
    refused.push("console".into());
    // The manager goes on, and so does the running job.
    assert!(mgr.child.try_wait().unwrap().is_none(), "the manager runs");
    assert!(alive(shell), "the running job runs");
    assert_eq!(mgr.jobs().len(), 1 + accepted.len());

    // Space comes back: the journal takes jobs again.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: both pointers are valid for the call (the old limit is not asked for);
    // the PID is the manager's, our child, not yet reaped.
    let r = unsafe {
        libc::prlimit(
            manager_pid,
            libc::RLIMIT_FSIZE,
            &unlimited,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    let (code, stdout, stderr) = submit("again");
    assert_eq!(code, Some(0), "{stderr}");
    accepted.insert("again".into(), stdout.trim().parse().unwrap());
    assert!(mgr.write_lines(&[big("console-again")]));
    let ev = mgr.until_any(&["submitted", "error"]);
    assert_eq!(ev["event"], "submitted", "{ev}");
    accepted.insert("console-again".into(), ev["job"].as_u64().unwrap());

    std::fs::write(&go, "").unwrap();
    wait_no_jobs(&mut mgr);
    let markers = pool.markers();
    assert_eq!(markers.faults(), Vec::<String>::new());
    assert_eq!(
        markers.starts.get("running"),
        Some(&1),
        "the running job ran once"
    );
    assert_eq!(pid_in(&pid_file), shell);
    for t in accepted.keys() {
        assert_eq!(markers.starts.get(t), Some(&1), "{t} ran once");
    }
    for t in &refused {
        assert!(
            !markers.starts.contains_key(t),
            "{t} was refused and never ran"
        );
    }
    mgr.signal(libc::SIGTERM);
    wait_exit(&mut mgr.child);
    worker.kill().unwrap();
    wait_exit(&mut worker);
    let journal = journal_jobs(&pool.journal);
    for id in accepted.values().chain([&running]) {
        let (state, outcome, code, _) = &journal[id];
        assert_eq!(
            (state.as_str(), outcome.as_deref(), *code),
            ("ended", Some("exited"), Some(0)),
            "job {id}"
        );
    }
    eprintln!(
        "full disk: a limit of {FSIZE_LIMIT_KIB} KiB took {} big job(s), then refused one \
         (journal: {full_at} bytes): {why}",
        accepted.len() - 2
    );
    std::fs::remove_dir_all(&pool.dir).unwrap();
}
