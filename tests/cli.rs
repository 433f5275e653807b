//! The example CLI as a user runs it: `--json` streams, directives, errors, certificates.

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use workpool::manager::{Manager, ManagerConfig};
use workpool::tls::{Identity, TrustRoots};
use workpool::worker::{Worker, WorkerConfig};

/// Runs a CLI manager with no workers over `stdin`, to its end; returns its JSON events.
fn manager_session(dir: &std::path::Path, extra: &[&str], stdin: &[u8]) -> Vec<Value> {
    let out = Command::new(cli())
        .args(manager_args(dir))
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(stdin)?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    json_lines(&String::from_utf8(out.stdout).unwrap())
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

#[test]
fn the_json_stream_shows_each_job_from_submission_to_its_end() {
    let dir = scratch("cli-json");
    let certs = Certs::new(1);
    certs.write_to(&dir);
    let CliManager {
        mut child,
        mut stdout,
        addr,
    } = start_cli_manager(&dir);
    let _worker = Worker::start(certs.worker_config(addr.port(), 0, "cli-w").tag("gpu")).unwrap();
    // Wait for the join to show in the stream, so that `:workers` below lists the worker.
    let mut rest = String::new();
    while !rest.contains("worker_joined") {
        assert!(
            stdout.read_line(&mut rest).unwrap() > 0,
            "the manager ended early"
        );
    }
    {
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(
                b"echo hello\n\n:tags gpu\necho tagged\n:tags\necho oops >&2; exit 4\n:workers\n",
            )
            .unwrap();
    } // end of stdin: the manager waits for the three jobs, then exits 0
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let events = json_lines(&rest);
    let of = |kind: &str| -> Vec<&Value> { events.iter().filter(|e| e["event"] == kind).collect() };

    let submitted = of("submitted");
    assert_eq!(submitted.len(), 3);
    assert_eq!(submitted[0]["job"], 1);
    assert_eq!(submitted[0]["command"], "echo hello");
    assert_eq!(submitted[1]["job"], 2);
    assert_eq!(submitted[2]["command"], "echo oops >&2; exit 4");
    assert_eq!(of("started").len(), 3);
    assert!(of("started").iter().all(|e| e["worker"] == "cli-w"));

    let output = |job: u64, stream: &str| -> String {
        of("output")
            .iter()
            .filter(|e| e["job"] == job && e["stream"] == stream)
            .map(|e| e["data"].as_str().unwrap())
            .collect()
    };
    assert_eq!(output(1, "stdout"), "hello\n");
    assert_eq!(output(2, "stdout"), "tagged\n");
    assert_eq!(output(3, "stderr"), "oops\n");

    let finished = of("finished");
    assert_eq!(finished.len(), 3, "each job ends exactly once");
    for f in &finished {
        assert_eq!(f["outcome"], "exited");
        assert_eq!(f["worker"], "cli-w");
        let code = if f["job"] == 3 { 4 } else { 0 };
        assert_eq!(f["exit_code"], code, "{f}");
    }
    // Per job: submitted, started, output, finished, in that order.
    for job in 1..=3u64 {
        let order: Vec<&str> = events
            .iter()
            .filter(|e| e["job"] == job)
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        assert_eq!(order.first(), Some(&"submitted"));
        assert_eq!(order.get(1), Some(&"started"));
        assert_eq!(order.last(), Some(&"finished"));
    }
    let joined = of("worker_joined");
    assert_eq!(joined[0]["worker"], "cli-w");
    assert_eq!(joined[0]["tags"], serde_json::json!(["gpu"]));
    assert_eq!(joined[0]["slots"], 1);
    assert_eq!(of("workers")[0]["workers"][0]["worker"], "cli-w");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn exit_is_not_a_job_and_rejects_what_is_still_queued() {
    let dir = scratch("cli-exit");
    Certs::new(1).write_to(&dir);
    let events = manager_session(&dir, &[], b"echo waits\nexit\necho never\n");
    let submitted: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "submitted")
        .collect();
    assert_eq!(submitted.len(), 1);
    assert_eq!(submitted[0]["command"], "echo waits");
    let finished: Vec<&Value> = events.iter().filter(|e| e["event"] == "finished").collect();
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0]["outcome"], "rejected");
    assert_eq!(finished[0]["exit_code"], Value::Null);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn exit_with_a_journal_says_the_jobs_are_kept_not_rejected() {
    let dir = scratch("cli-exit-journal");
    Certs::new(1).write_to(&dir);
    let journal = dir.join("journal.sqlite");
    // Human output: the shutdown is told in words.
    let args = manager_args(&dir).into_iter().filter(|a| a != "--json");
    let out = Command::new(cli())
        .args(args)
        .args(["--journal", journal.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(b"echo waits\nexit\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let said = err
        .lines()
        .find(|l| l.contains("shutting down (exit)"))
        .unwrap_or_else(|| panic!("no shutdown line in:\n{err}"));
    assert!(
        said.contains("kept in the journal") && !said.contains("rejected"),
        "{said}"
    );
    // And so it is: a manager started again on the journal has the job queued.
    let m =
        Manager::bind(ManagerConfig::insecure_plaintext("127.0.0.1:0").journal(&journal)).unwrap();
    assert_eq!(m.jobs().len(), 1, "{:?}", m.jobs());
    drop(m);
    std::fs::remove_dir_all(dir).unwrap();
}

fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cli())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_input_gives_one_line_errors_and_non_zero_exits() {
    let (code, _, err) = run_cli(&["manager", "--bogus"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown option \"--bogus\""), "{err}");
    let (code, _, err) = run_cli(&["manager", "-p", "notaport", "--insecure-plaintext"]);
    assert_eq!(code, 2);
    assert!(err.contains("not a valid number"), "{err}");
    let (code, _, err) = run_cli(&["worker"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--security-pool-certificate is required"),
        "{err}"
    );
    let (code, _, err) = run_cli(&["frobnicate"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown subcommand"), "{err}");
    let (code, _, err) = run_cli(&[
        "manager",
        "--security-pool-certificate",
        "/nonexistent/cert.pem",
        "--security-pool-key",
        "/nonexistent/key.pem",
        "--security-worker-certificates",
        "/nonexistent/w.pem",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/cert.pem"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"));

    let dir = scratch("cli-bad");
    let certs = Certs::new(2);
    certs.write_to(&dir);
    let d = |n: &str| dir.join(n).display().to_string();
    let (code, _, err) = run_cli(&[
        "worker",
        "--security-pool-certificate",
        &d("host-cert.pem"),
        "--security-worker-certificate",
        &d("worker-0-cert.pem"),
        "--security-worker-key",
        &d("worker-1-key.pem"),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("does not fit"), "{err}");

    // A port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, _, err) = run_cli(&[
        "manager",
        "-p",
        &port,
        "--security-pool-certificate",
        &d("host-cert.pem"),
        "--security-pool-key",
        &d("host-key.pem"),
        "--security-worker-certificates",
        &d("worker-0-cert.pem"),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("binding 127.0.0.1:{port}")), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn generated_certificates_work_with_hostname_verification_on() {
    let dir = scratch("cli-gen");
    let (code, out, err) = run_cli(&[
        "generate-tls-certificates",
        "--number-of-workers",
        "2",
        "--hostname",
        "pool.example",
        "--output-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    for f in [
        "host-cert.pem",
        "host-key.pem",
        "worker-0-cert.pem",
        "worker-0-key.pem",
        "worker-1-key.pem",
    ] {
        assert!(out.contains(f), "{out}");
        assert!(dir.join(f).exists());
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("host-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "keys are private to their owner");

    let manager = Manager::bind(ManagerConfig::new(
        "127.0.0.1:0",
        Identity::from_pem_files(dir.join("host-cert.pem"), dir.join("host-key.pem")).unwrap(),
        TrustRoots::from_pem_files([dir.join("worker-0-cert.pem"), dir.join("worker-1-cert.pem")])
            .unwrap(),
    ))
    .unwrap();
    let events = manager.subscribe();
    for i in 0..2 {
        let cfg = WorkerConfig::new(
            "127.0.0.1",
            manager.local_addr().port(),
            Identity::from_pem_files(
                dir.join(format!("worker-{i}-cert.pem")),
                dir.join(format!("worker-{i}-key.pem")),
            )
            .unwrap(),
            TrustRoots::from_pem_files([dir.join("host-cert.pem")]).unwrap(),
        )
        .name(format!("gen-{i}"));
        std::mem::forget(Worker::start(cfg).unwrap());
    }
    assert_eq!(wait_joined(&events, 2).len(), 2);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_demo_runs_its_showcase_and_exits_zero() {
    let (code, out, err) = run_cli(&["demo", "--json"]);
    assert_eq!(code, 0, "{err}");
    let events = json_lines(&out);
    let count = |kind: &str| events.iter().filter(|e| e["event"] == kind).count();
    assert!(count("submitted") >= 5);
    assert_eq!(count("submitted"), count("finished"));
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "finished" && e["exit_code"] == 3),
        "the failing job"
    );
    assert_eq!(count("worker_joined"), 2);
}

#[test]
fn job_control_directives_shape_the_jobs_that_follow() {
    let dir = scratch("cli-directives");
    let certs = Certs::new(1);
    certs.write_to(&dir);
    let CliManager {
        mut child,
        mut stdout,
        addr,
    } = start_cli_manager(&dir);
    let mut stdin = child.stdin.take().unwrap();
    // No worker yet: everything queues, so :cancel and :jobs see queued jobs.
    stdin
        .write_all(
            b":timeout 1s\nsleep 600\n:timeout\n:env GREETING=hello there\necho \"$GREETING\"\n:env\n\
              :priority 5\necho high\n:priority\ntouch never-runs\n:cancel 4\n:jobs\n:bogus\n",
        )
        .unwrap();
    let mut seen = String::new();
    while !seen.contains("\"event\":\"jobs\"") {
        assert!(
            stdout.read_line(&mut seen).unwrap() > 0,
            "the manager ended early"
        );
    }
    let _worker = Worker::start(certs.worker_config(addr.port(), 0, "w")).unwrap();
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    let events = json_lines(&(seen + &rest));
    let finished = |job: u64| -> &Value {
        events
            .iter()
            .find(|e| e["event"] == "finished" && e["job"] == job)
            .unwrap_or_else(|| panic!("job {job} never finished"))
    };
    assert_eq!(finished(1)["outcome"], "timed_out");
    assert_eq!(finished(2)["outcome"], "exited");
    assert_eq!(finished(4)["outcome"], "cancelled");
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "started" && e["job"] == 4)
    );
    let out2: String = events
        .iter()
        .filter(|e| e["event"] == "output" && e["job"] == 2)
        .map(|e| e["data"].as_str().unwrap())
        .collect();
    assert_eq!(out2, "hello there\n");
    let jobs = events.iter().find(|e| e["event"] == "jobs").unwrap();
    let listed: Vec<(u64, i64, &str)> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["job"].as_u64().unwrap(),
                j["priority"].as_i64().unwrap(),
                j["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![(1, 0, "queued"), (2, 0, "queued"), (3, 5, "queued")]
    );
    // The job with priority 5 started before the older ones of priority 0.
    let started: Vec<u64> = events
        .iter()
        .filter(|e| e["event"] == "started")
        .map(|e| e["job"].as_u64().unwrap())
        .collect();
    assert_eq!(started[0], 3, "{started:?}");
    assert!(events.iter().any(|e| {
        e["event"] == "error"
            && e["message"]
                .as_str()
                .unwrap()
                .contains("unknown directive :bogus")
    }));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_help_text_lists_every_directive() {
    let (code, out, _) = run_cli(&["manager", "--help"]);
    assert_eq!(code, 0);
    for d in [
        ":tags",
        ":platform",
        ":timeout",
        ":env",
        ":priority",
        ":retries",
        ":cancel",
        ":jobs",
        ":workers",
        "exit",
    ] {
        assert!(out.contains(d), "--help lacks {d}");
    }
}

#[test]
fn status_reports_the_numbers_as_json() {
    let dir = scratch("cli-status");
    Certs::new(1).write_to(&dir);
    let events = manager_session(
        &dir,
        &["--metrics-address", "127.0.0.1:0"],
        b"echo queued\n:status\nexit\n",
    );
    let status = events
        .iter()
        .find(|e| e["event"] == "status")
        .expect("a status event");
    assert_eq!(status["queued"], 1);
    assert_eq!(status["workers"], 0);
    assert_eq!(status["submitted"], 1);
    assert!(status["oldest_queued_wait_seconds"].as_f64().is_some());
    std::fs::remove_dir_all(dir).unwrap();
}

/// A console manager (`--json`) in a fresh scratch folder with one worker certificate
/// written there, and its output read line by line.
struct Console {
    dir: std::path::PathBuf,
    certs: Certs,
    child: std::process::Child,
    out: Lines,
    addr: std::net::SocketAddr,
}

fn console(name: &str) -> Console {
    let dir = scratch(name);
    let certs = Certs::new(1);
    certs.write_to(&dir);
    let CliManager {
        child,
        stdout,
        addr,
    } = start_cli_manager(&dir);
    Console {
        dir,
        certs,
        child,
        out: Lines::new(stdout),
        addr,
    }
}

/// A child's output, line by line, read on a thread of its own so that every wait for a
/// line has a deadline.
struct Lines(crossbeam_channel::Receiver<Vec<u8>>);

impl Lines {
    fn new(from: impl std::io::Read + Send + 'static) -> Lines {
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            let mut from = std::io::BufReader::new(from);
            loop {
                let mut line = Vec::new();
                match from.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Lines(rx)
    }

    /// The next JSON line; None at the end of the output. Panics at the deadline.
    fn next_json(&self) -> Option<Value> {
        match self.0.recv_timeout(DEADLINE) {
            Ok(line) => {
                Some(serde_json::from_slice(&line).unwrap_or_else(|e| {
                    panic!("not JSON: {:?}: {e}", String::from_utf8_lossy(&line))
                }))
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => None,
            Err(e) => panic!("no line before the deadline: {e}"),
        }
    }

    /// Reads JSON lines up to the first `event` of this kind (for which `also` holds);
    /// returns it.
    fn until(&self, kind: &str, also: impl Fn(&Value) -> bool) -> Value {
        loop {
            match self.next_json() {
                Some(v) if v["event"] == kind && also(&v) => return v,
                Some(_) => {}
                None => panic!("the output ended before an {kind:?} event"),
            }
        }
    }

    /// Every line left, to the end of the output (within the deadline), as raw bytes.
    fn rest_raw(&self) -> Vec<Vec<u8>> {
        let deadline = std::time::Instant::now() + DEADLINE;
        let mut all = Vec::new();
        loop {
            match self.0.recv_deadline(deadline) {
                Ok(line) => all.push(line),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return all,
                Err(e) => panic!("the output did not end before the deadline: {e}"),
            }
        }
    }

    fn rest_json(&self) -> Vec<Value> {
        self.rest_raw()
            .iter()
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }
}

/// Waits (with the deadline) for a child to exit; its exit code.
fn exit_code(child: &mut std::process::Child) -> i32 {
    let mut status = None;
    wait_until("the CLI exits", || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap().code().expect("an exit code, not a signal")
}

fn send_signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill takes no pointers; the PID is our own child's, not yet reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

#[test]
fn serve_keeps_serving_with_stdin_closed_and_sigterm_shuts_it_down_gracefully() {
    let dir = scratch("cli-serve");
    let certs = Certs::new(1);
    certs.write_to(&dir);
    // stdin is closed from the start: a console would have ended at once. A service
    // keeps a journal by default, in the XDG state folder (here the test's own).
    let mut child = Command::new(cli())
        .args(manager_args(&dir))
        .args(["--serve", "-h", "127.0.0.1"])
        .env_remove("STATE_DIRECTORY")
        .env("XDG_STATE_HOME", &dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = Lines::new(child.stdout.take().unwrap());
    let listening = out.until("listening", |_| true);
    let addr: std::net::SocketAddr = listening["address"].as_str().unwrap().parse().unwrap();
    assert_eq!(addr.ip().to_string(), "127.0.0.1", "-h is --host");

    let first = Worker::start(certs.worker_config(addr.port(), 0, "svc-1")).unwrap();
    out.until("worker_joined", |e| e["worker"] == "svc-1");
    first.stop();
    out.until("worker_left", |e| e["worker"] == "svc-1");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the manager is still up"
    );
    let _second = Worker::start(certs.worker_config(addr.port(), 0, "svc-2")).unwrap();
    out.until("worker_joined", |e| e["worker"] == "svc-2");

    send_signal(&child, libc::SIGTERM);
    let shutting = out.until("shutting_down", |_| true);
    assert_eq!(shutting["reason"], "signal");
    assert_eq!(shutting["signal"], libc::SIGTERM);
    let rest = out.rest_json();
    let last = rest.last().expect("a last line");
    assert_eq!(last["event"], "shut_down", "{rest:?}");
    assert_eq!(last["signal"], libc::SIGTERM);
    assert_eq!(
        exit_code(&mut child),
        0,
        "a service stopped on request exits 0"
    );
    let journal = dir.join("workpool/journal.sqlite");
    assert!(
        journal.is_file(),
        "the default journal {}",
        journal.display()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sigterm_on_the_console_is_exit_running_jobs_finish_and_queued_ones_are_rejected() {
    let Console {
        dir,
        certs,
        mut child,
        out,
        addr,
    } = console("cli-sigterm");
    let _worker = Worker::start(certs.worker_config(addr.port(), 0, "w")).unwrap();
    out.until("worker_joined", |_| true);
    let go = dir.join("go");
    let mut stdin = child.stdin.take().unwrap();
    writeln!(
        stdin,
        "echo begun; while [ ! -e {} ]; do sleep 0.05; done; echo ended",
        go.display()
    )
    .unwrap();
    stdin.flush().unwrap();
    out.until("output", |e| e["job"] == 1 && e["data"] == "begun\n");
    // The only slot is taken: this one waits in the queue.
    stdin.write_all(b"echo never runs\n").unwrap();
    stdin.flush().unwrap();
    out.until("submitted", |e| e["job"] == 2);
    send_signal(&child, libc::SIGTERM);
    out.until("shutting_down", |e| e["signal"] == libc::SIGTERM);
    // The running job goes on during the grace; let it end.
    std::fs::write(&go, "").unwrap();
    let rest = out.rest_json();
    let finished = |job: u64| {
        rest.iter()
            .find(|e| e["event"] == "finished" && e["job"] == job)
            .unwrap_or_else(|| panic!("job {job} never finished: {rest:?}"))
    };
    assert_eq!(finished(1)["outcome"], "exited");
    assert_eq!(finished(1)["exit_code"], 0);
    assert!(
        rest.iter()
            .any(|e| e["event"] == "output" && e["job"] == 1 && e["data"] == "ended\n")
    );
    assert_eq!(finished(2)["outcome"], "rejected");
    assert_eq!(rest.last().unwrap()["event"], "shut_down");
    assert_eq!(exit_code(&mut child), 128 + libc::SIGTERM);
    drop(stdin);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_double_colon_submits_a_script_that_begins_with_a_colon_and_exit_in_any_case_ends() {
    let Console {
        dir,
        certs,
        mut child,
        out,
        addr,
    } = console("cli-colon");
    let _worker = Worker::start(certs.worker_config(addr.port(), 0, "w")).unwrap();
    let made = dir.join("made");
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, ":: > {}; echo colon", made.display()).unwrap();
    stdin.flush().unwrap();
    let submitted = out.until("submitted", |_| true);
    assert_eq!(
        submitted["command"],
        format!(": > {}; echo colon", made.display())
    );
    let finished = out.until("finished", |e| e["job"] == 1);
    assert_eq!(finished["exit_code"], 0, "{finished}");
    assert!(made.exists(), "the script `: > FILE` ran");
    // `EXIT` ends the console while stdin stays open.
    stdin.write_all(b"EXIT\necho never\n").unwrap();
    stdin.flush().unwrap();
    let rest = out.rest_json();
    assert!(!rest.iter().any(|e| e["event"] == "submitted"), "{rest:?}");
    assert_eq!(rest.last().unwrap()["event"], "shut_down");
    assert_eq!(rest.last().unwrap()["reason"], "exit");
    assert_eq!(exit_code(&mut child), 0);
    drop(stdin);
    std::fs::remove_dir_all(dir).unwrap();
}

/// 8 MiB of text without a newline: ASCII, control bytes and multi-byte characters.
fn long_line() -> Vec<u8> {
    let piece = "abc\u{0}\t\u{1b}\"\\ é€😀 xyz\r".as_bytes();
    piece.iter().copied().cycle().take(8 << 20).collect()
}

#[test]
fn eight_mib_without_a_newline_arrive_byte_exact_in_json_mode() {
    let Console {
        dir,
        certs,
        mut child,
        out,
        addr,
    } = console("cli-long-json");
    let data = long_line();
    std::fs::write(dir.join("data"), &data).unwrap();
    let _worker = Worker::start(certs.worker_config(addr.port(), 0, "w")).unwrap();
    writeln!(
        child.stdin.take().unwrap(),
        "cat {}",
        dir.join("data").display()
    )
    .unwrap(); // and the end of stdin: the manager exits when the job has ended
    let events = out.rest_json();
    let text: String = events
        .iter()
        .filter(|e| e["event"] == "output" && e["job"] == 1 && e["stream"] == "stdout")
        .map(|e| e["data"].as_str().unwrap())
        .collect();
    assert!(text.as_bytes() == data, "the output differs");
    let finished = events.iter().find(|e| e["event"] == "finished").unwrap();
    assert_eq!(finished["exit_code"], 0);
    assert_eq!(exit_code(&mut child), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn eight_mib_without_a_newline_arrive_byte_exact_in_human_mode_in_bounded_pieces() {
    let dir = scratch("cli-long-human");
    let certs = Certs::new(1);
    certs.write_to(&dir);
    let data = long_line();
    std::fs::write(dir.join("data"), &data).unwrap();
    let port = free_port();
    let mut args = manager_args(&dir);
    args.retain(|a| a != "--json");
    args[2] = port.to_string(); // -p PORT instead of 0
    let mut child = Command::new(cli())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = Lines::new(child.stdout.take().unwrap());
    let _worker = Worker::start(certs.worker_config(port, 0, "w")).unwrap();
    writeln!(
        child.stdin.take().unwrap(),
        "cat {}",
        dir.join("data").display()
    )
    .unwrap();
    let lines = out.rest_raw();
    let prefix = b"[1] Standard Output: ";
    let pieces: Vec<&[u8]> = lines
        .iter()
        .filter_map(|l| l.strip_prefix(prefix.as_slice()))
        .map(|l| l.strip_suffix(b"\n").expect("whole lines"))
        .collect();
    assert!(pieces.len() > 1, "a long line comes in pieces");
    assert!(
        pieces.iter().all(|p| p.len() <= 64 << 10),
        "no piece is longer than 64 KiB"
    );
    assert!(pieces.concat() == data, "the output differs");
    assert!(
        lines.iter().any(|l| l == b"[1] Exit code      : 0\n"),
        "the job's end"
    );
    assert_eq!(exit_code(&mut child), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn usage_errors_exit_2_with_one_line_and_h_is_the_host() {
    for args in [
        &["manager", "--bogus"][..],
        &["manager", "-h"],
        &[
            "manager",
            "--insecure-plaintext",
            "--port",
            "1",
            "--port",
            "2",
        ],
        &["manager", "--insecure-plaintext", "--serve=yes"],
        &["worker", "--insecure-plaintext", "--slots", "many"],
        &["generate-tls-certificates"],
        &["demo", "stray"],
        &[],
    ] {
        let (code, out, err) = run_cli(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert!(err.starts_with("workpool: error: "), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
    let (_, _, err) = run_cli(&["manager", "-h"]);
    assert!(err.contains("--host needs a value"), "{err}");
    let (_, _, err) = run_cli(&["manager", "--insecure-plaintext", "-p", "1", "-p", "2"]);
    assert!(err.contains("--port given more than once"), "{err}");
    let (_, _, err) = run_cli(&["generate-tls-certificates"]);
    assert!(err.contains("--hostname is required"), "{err}");
    let (_, _, err) = run_cli(&[]);
    assert!(err.contains("a subcommand is needed"), "{err}");
    // Help is on --help only, for every subcommand.
    for sub in ["manager", "worker", "generate-tls-certificates", "demo"] {
        let (code, out, _) = run_cli(&[sub, "--help"]);
        assert_eq!(code, 0, "{sub}");
        assert!(out.contains("--help"), "{sub}: {out}");
    }
    let (_, out, _) = run_cli(&["manager", "--help"]);
    assert!(out.contains("-h, --host <HOST>"), "{out}");
    assert!(out.contains("--serve"), "{out}");
    let (code, out, _) = run_cli(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("generate-tls-certificates"), "{out}");
}

#[test]
fn every_job_of_a_long_queue_is_printed_whole_and_in_order() {
    // More jobs than the console waits on at once (it looks at the younger ones in
    // turn), and one with a higher priority that starts from deep in the queue (its
    // events may be printed after those of jobs that started later, but whole and in
    // order).
    let Console {
        dir,
        certs,
        mut child,
        out,
        addr,
    } = console("cli-long-queue");
    let mut script = String::new();
    for _ in 0..299 {
        script.push_str("echo job-$WORKPOOL_JOB_ID\n");
    }
    script.push_str(":priority 9\necho job-$WORKPOOL_JOB_ID\n");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    // The worker comes when everything is queued.
    out.until("submitted", |e| e["job"] == 300);
    let _worker = Worker::start(certs.worker_config(addr.port(), 0, "w").slots(4)).unwrap();
    let events = out.rest_json();
    for job in 1..=300u64 {
        let mine: Vec<&Value> = events.iter().filter(|e| e["job"] == job).collect();
        let kinds: Vec<&str> = mine.iter().map(|e| e["event"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["started", "output", "finished"], "job {job}");
        assert_eq!(mine[1]["data"], format!("job-{job}\n"));
        assert_eq!(mine[2]["exit_code"], 0);
    }
    assert_eq!(exit_code(&mut child), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_second_signal_while_shutting_down_ends_the_manager_at_once() {
    let Console {
        dir,
        certs,
        mut child,
        out,
        addr,
    } = console("cli-second-signal");
    let worker = Worker::start(certs.worker_config(addr.port(), 0, "w")).unwrap();
    let go = dir.join("go");
    let mut stdin = child.stdin.take().unwrap();
    writeln!(
        stdin,
        "echo begun; while [ ! -e {} ]; do sleep 0.05; done",
        go.display()
    )
    .unwrap();
    stdin.flush().unwrap();
    out.until("output", |e| e["data"] == "begun\n");
    send_signal(&child, libc::SIGTERM);
    out.until("shutting_down", |_| true);
    // The job still runs (the grace is 10 s); a second signal does not wait for it.
    send_signal(&child, libc::SIGINT);
    assert_eq!(exit_code(&mut child), 128 + libc::SIGINT);
    let rest = out.rest_json();
    assert!(!rest.iter().any(|e| e["event"] == "finished"), "{rest:?}");
    worker.stop();
    drop(stdin);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A CLI manager ends at the end of its stdin (it has no jobs): its exit code.
fn end_cli_manager(mut m: CliManager) -> i32 {
    drop(m.child.stdin.take());
    exit_code(&mut m.child)
}

#[test]
fn generated_submitter_certificates_are_for_clients_and_the_cli_manager_takes_them_as_submitters() {
    use workpool::Error;
    use workpool::protocol::{SubmitterHello, WorkerHello};
    let dir = scratch("cli-gen-submitters");
    let (code, out, err) = run_cli(&[
        "generate-tls-certificates",
        "--number-of-submitters",
        "2",
        "--hostname",
        "localhost",
        "--output-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    use std::os::unix::fs::PermissionsExt;
    for k in 1..=2 {
        for f in [
            format!("submitter-{k}-cert.pem"),
            format!("submitter-{k}-key.pem"),
        ] {
            assert!(out.contains(&f), "{out}");
            assert!(dir.join(&f).exists(), "{f}");
        }
        let mode = std::fs::metadata(dir.join(format!("submitter-{k}-key.pem")))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "submitter-{k}'s key");
    }
    assert!(!dir.join("submitter-0-cert.pem").exists());
    assert!(!dir.join("submitter-3-cert.pem").exists());
    assert!(dir.join("worker-0-cert.pem").exists(), "workers as before");
    // Their extendedKeyUsage is clientAuth only, as the workers'.
    if have_tool("openssl") {
        for f in [
            "submitter-1-cert.pem",
            "submitter-2-cert.pem",
            "worker-0-cert.pem",
        ] {
            let out = Command::new("openssl")
                .args(["x509", "-noout", "-ext", "extendedKeyUsage", "-in"])
                .arg(dir.join(f))
                .output()
                .unwrap();
            assert!(out.status.success(), "{f}");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("TLS Web Client Authentication"),
                "{f}: {text}"
            );
            assert!(!text.contains("Server Authentication"), "{f}: {text}");
        }
    } else {
        missing_prerequisite(
            "the extendedKeyUsage of generated submitter certificates",
            "openssl is not installed",
        );
    }

    let f = |d: &std::path::Path, n: &str| d.join(n).display().to_string();
    let identity = |d: &std::path::Path, name: &str| {
        Identity::from_pem_files(
            d.join(format!("{name}-cert.pem")),
            d.join(format!("{name}-key.pem")),
        )
        .unwrap()
    };
    let manager_trust = TrustRoots::from_pem_files([dir.join("host-cert.pem")]).unwrap();
    let as_submitter = |m: &CliManager, id: &Identity| {
        let hello = SubmitterHello {
            name: "cli-submitter".into(),
            resume: None,
        };
        workpool::testing::connect_submitter(
            &m.addr.to_string(),
            "localhost",
            id,
            &manager_trust,
            &hello,
            DEADLINE,
        )
        .map(|_| ())
    };
    let as_worker = |m: &CliManager, id: &Identity| {
        let hello = WorkerHello {
            name: "cli-worker".into(),
            tags: Default::default(),
            platform: "linux-x86_64".into(),
            slots: 1,
            ahead: 0,
            manager_id: None,
            jobs: vec![],
            draining: false,
        };
        workpool::testing::connect_worker(
            &m.addr.to_string(),
            "localhost",
            id,
            &manager_trust,
            &hello,
            DEADLINE,
        )
        .map(|_| ())
    };
    let refusal = |r: workpool::Result<()>| match r {
        Err(Error::Refused(text)) => text,
        Err(e) => panic!("not the manager's refusal: {e}"),
        Ok(()) => panic!("welcomed"),
    };
    let not_for_its_role = |r: workpool::Result<()>| {
        if let Err(e) = r {
            assert!(matches!(e, Error::Refused(_)), "{e}");
            assert!(!e.to_string().contains("this certificate is"), "{e}");
        }
    };

    // Pinned: the manager trusts worker-0 as a worker, the two submitters as submitters.
    let m = start_cli_manager_with(
        &dir,
        &[
            "--security-submitter-certificates",
            &f(&dir, "submitter-1-cert.pem"),
            &f(&dir, "submitter-2-cert.pem"),
        ],
    );
    not_for_its_role(as_submitter(&m, &identity(&dir, "submitter-1")));
    let why = refusal(as_worker(&m, &identity(&dir, "submitter-2")));
    assert!(
        why.contains("a submitter certificate cannot take jobs"),
        "{why}"
    );
    let why = refusal(as_submitter(&m, &identity(&dir, "worker-0")));
    assert!(
        why.contains("a worker certificate cannot submit jobs"),
        "{why}"
    );
    as_worker(&m, &identity(&dir, "worker-0")).unwrap();
    assert_eq!(end_cli_manager(m), 0);

    // Through a CA: what the submitter CA issued may submit, not take jobs.
    let issued = dir.join("issued");
    std::fs::create_dir_all(&issued).unwrap();
    write_ca_issued(&issued, 1);
    let m = start_cli_manager_with(
        &dir,
        &["--security-submitter-ca", &f(&issued, "ca-cert.pem")],
    );
    not_for_its_role(as_submitter(&m, &identity(&issued, "worker-0")));
    let why = refusal(as_worker(&m, &identity(&issued, "worker-0")));
    assert!(
        why.contains("a submitter certificate cannot take jobs"),
        "{why}"
    );
    assert_eq!(end_cli_manager(m), 0);

    // A bad submitter file is one clear error.
    let (code, _, err) = run_cli(&[
        "manager",
        "-p",
        "0",
        "--security-pool-certificate",
        &f(&dir, "host-cert.pem"),
        "--security-pool-key",
        &f(&dir, "host-key.pem"),
        "--security-submitter-ca",
        &f(&dir, "no-such-ca.pem"),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no-such-ca.pem"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}
