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
