//! The CLI as a remote submitter: `workpool submit`, `attach`, `jobs` and `cancel` as
//! processes, against a manager (in this process) that trusts worker 0 as a worker and
//! workers 1 and 2's certificates as submitters only.

mod common;

use common::*;
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;
use workpool::job::JobSpec;
use workpool::manager::Manager;
use workpool::worker::Worker;

struct Pool {
    dir: PathBuf,
    manager: Manager,
    _worker: Worker,
}

/// A manager (reconnect grace `grace`) with one worker of `slots` slots; submitter
/// certificates 1 and 2 written to a fresh folder.
fn pool(name: &str, slots: u32, grace: Duration) -> Pool {
    let dir = scratch(name);
    let certs = Certs::new(3);
    certs.write_to(&dir);
    let mut config = certs.submitters_manager_config();
    config.reconnect_grace = grace;
    let (manager, worker) = certs.manager_and_worker(config, slots);
    Pool {
        dir,
        manager,
        _worker: worker,
    }
}

impl Pool {
    /// `workpool COMMAND` with the connection flags of submitter `who`, then `rest`.
    fn command(&self, command: &str, who: usize, rest: &[&str]) -> Command {
        let d = &self.dir;
        let path = |f: String| d.join(f).to_string_lossy().into_owned();
        let mut c = Command::new(cli());
        c.arg(command)
            .args(["-h", "127.0.0.1", "-p"])
            .arg(self.manager.local_addr().port().to_string())
            .args(["--security-pool-certificate", &path("host-cert.pem".into())])
            .args([
                "--security-submitter-certificate",
                &path(format!("worker-{who}-cert.pem")),
            ])
            .args([
                "--security-submitter-key",
                &path(format!("worker-{who}-key.pem")),
            ])
            .args(rest)
            .stdin(Stdio::null())
            .env("RUST_LOG", "warn");
        c
    }

    fn run(&self, command: &str, who: usize, rest: &[&str]) -> Output {
        let child = self
            .command(command, who, rest)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        finish(child)
    }
}

/// Waits (with a deadline) for a child's exit, with all it wrote.
fn finish(mut child: Child) -> Output {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut o = Vec::new();
        out.read_to_end(&mut o).unwrap();
        o
    });
    let mut e = Vec::new();
    err.read_to_end(&mut e).unwrap();
    let mut status = None;
    wait_until("the CLI exits", || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    Output {
        status: status.unwrap(),
        stdout: reader.join().unwrap(),
        stderr: e,
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn submit_writes_the_job_s_streams_as_they_are_and_exits_with_its_status() {
    let p = pool("submit-streams", 1, Duration::from_secs(10));
    let out = p.run("submit", 1, &["--", "echo out; echo err >&2; exit 7"]);
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    assert_eq!(out.status.code(), Some(7));
    // Bytes that are not text, and no newline at the end, come back as they were.
    let out = p.run("submit", 2, &["--", "printf 'a\\000b\\377'; kill -TERM $$"]);
    assert_eq!(out.stdout, b"a\0b\xff");
    assert_eq!(out.status.code(), Some(128 + 15), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("killed by signal 15"));
    let out = p.run("submit", 1, &["--timeout", "1", "--", "sleep 30"]);
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr).lines().count(),
        1,
        "{}",
        text(&out.stderr)
    );
    // Job flags reach the job.
    let out = p.run(
        "submit",
        1,
        &["--env", "A=1", "--env", "B=two words", "--", "echo $A $B"],
    );
    assert_eq!(text(&out.stdout), "1 two words\n");
    let out = p.run(
        "submit",
        1,
        &["--tag", "none-has-it", "--detach", "--", "true"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn an_array_runs_one_job_per_index_and_exits_non_zero_if_any_failed() {
    let p = pool("submit-array", 2, Duration::from_secs(10));
    let out = p.run(
        "submit",
        1,
        &[
            "--array",
            "1-6",
            "--",
            "echo index $WORKPOOL_ARRAY_INDEX; [ $WORKPOOL_ARRAY_INDEX != 4 ]",
        ],
    );
    let stdout = text(&out.stdout);
    for i in 1..=6 {
        assert!(
            stdout.contains(&format!("[{i}] Standard Output: index {i}\n")),
            "{stdout}"
        );
    }
    assert!(stdout.contains("[4] Exit code      : 1"), "{stdout}");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("6 job(s): 6 exited; 1 did not succeed"),
        "{err}"
    );
    let out = p.run("submit", 1, &["--array", "5-3", "--", "true"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an empty range is a usage error"
    );
}

#[test]
fn jobs_read_from_stdin_take_the_console_s_directives_and_are_each_followed() {
    let p = pool("submit-stdin", 2, Duration::from_secs(10));
    let mut child = p
        .command("submit", 1, &["--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(
                b":env GREETING=hi\necho $GREETING\n::; echo colon\nexit 3\nEXIT\necho never\n",
            )
            .unwrap();
    }
    let out = finish(child);
    let lines: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let data: Vec<&str> = lines
        .iter()
        .filter(|l| l["event"] == "output")
        .map(|l| l["data"].as_str().unwrap())
        .collect();
    assert!(
        data.contains(&"hi\n") && data.contains(&"colon\n"),
        "{data:?}"
    );
    let finished: Vec<i64> = lines
        .iter()
        .filter(|l| l["event"] == "finished")
        .map(|l| l["exit_code"].as_i64().unwrap())
        .collect();
    assert_eq!(finished.len(), 3, "`EXIT` ended the input: {lines:?}");
    let summary = lines.last().unwrap();
    assert_eq!(summary["event"], "summary");
    assert_eq!(summary["jobs"], 3);
    assert_eq!(summary["failed"], 1);
    assert_eq!(out.status.code(), Some(1));
}

/// The PIDs a job wrote to `file`, once it has written them all.
fn pids_in(file: &Path, n: usize) -> Vec<i32> {
    let mut pids = Vec::new();
    wait_until("the job writes its PIDs", || {
        pids = std::fs::read_to_string(file)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        pids.len() >= n
    });
    pids
}

#[test]
fn sigint_or_sigterm_on_submit_cancels_the_job_s_whole_process_tree_and_exits_128_n() {
    let p = pool("submit-sigint", 1, Duration::from_secs(10));
    for (n, sig) in [libc::SIGINT, libc::SIGTERM].into_iter().enumerate() {
        let pids = p.dir.join(format!("pids-{n}"));
        let script = format!(
            "sleep 300 & echo $! >> {f}; (sleep 301 & echo $! >> {f}; wait) & echo $$ >> {f}; wait",
            f = pids.display()
        );
        let child = p
            .command("submit", 1, &["--", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let tree = pids_in(&pids, 3);
        assert!(tree.iter().all(|&pid| alive(pid)));
        // SAFETY: kill takes no pointers; the PID is our own child's, not yet reaped.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let out = finish(child);
        assert_eq!(out.status.code(), Some(128 + sig), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("cancelled"),
            "{}",
            text(&out.stderr)
        );
        wait_until("every process of the job is gone", || {
            tree.iter().all(|&pid| !alive(pid))
        });
        wait_until("the manager forgets the job", || {
            p.manager.jobs().is_empty()
        });
    }
}

#[test]
fn a_killed_client_s_attached_job_is_cancelled_after_the_grace() {
    let p = pool("submit-killed", 1, Duration::from_secs(3));
    let pids = p.dir.join("pids");
    let script = format!("echo $$ > {}; sleep 300", pids.display());
    let mut child = p
        .command("submit", 1, &["--", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let shell = pids_in(&pids, 1)[0];
    child.kill().unwrap();
    child.wait().unwrap();
    // The job outlives its client for the grace, then is cancelled with its tree.
    assert_eq!(p.manager.jobs().len(), 1);
    wait_until("the job is cancelled", || p.manager.jobs().is_empty());
    wait_until("its shell is gone", || !alive(shell));
    let s = p.manager.stats();
    assert!(
        s.jobs_finished.contains(&("cancelled", 1)),
        "{:?}",
        s.jobs_finished
    );
}

#[test]
fn a_detached_job_survives_its_client_and_only_its_certificate_may_attach_or_cancel() {
    let p = pool("submit-detach", 1, Duration::from_millis(500));
    let flag = p.dir.join("go");
    let script = format!(
        "echo first; while [ ! -e {} ]; do sleep 0.05; done; echo second >&2; exit 5",
        flag.display()
    );
    let out = p.run("submit", 1, &["--detach", "--", &script]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    assert!(id.parse::<u64>().is_ok(), "{id:?}");
    // Its client is gone (with a goodbye, which cancels attached jobs at once); it runs
    // on, as its end below shows. Another certificate can see that it runs, not what it is, and cannot touch it.
    let out = p.run("jobs", 2, &["--json"]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["jobs"][0]["command"], "", "{listed}");
    for cmd in ["attach", "cancel"] {
        let out = p.run(cmd, 2, &[&id]);
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        assert!(
            text(&out.stderr).contains("another certificate"),
            "{cmd}: {}",
            text(&out.stderr)
        );
    }
    let out = p.run("jobs", 1, &["--json"]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["jobs"][0]["command"], script.as_str());
    // Its own certificate attaches from a new client: what it kept, then the rest.
    let child = p
        .command("attach", 1, &[&id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::fs::write(&flag, b"").unwrap();
    let out = finish(child);
    assert_eq!(text(&out.stdout), "first\n");
    assert_eq!(text(&out.stderr), "second\n");
    assert_eq!(out.status.code(), Some(5));
    // After it ended, its outcome and output are still kept.
    let out = p.run("attach", 1, &[&id]);
    assert_eq!(text(&out.stdout), "first\n");
    assert_eq!(out.status.code(), Some(5));
    // And `cancel` of a job that ended says so.
    let out = p.run("cancel", 1, &[&id]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
}

#[test]
fn a_worker_certificate_cannot_submit_and_a_bad_flag_is_a_usage_error() {
    let p = pool("submit-refused", 1, Duration::from_secs(10));
    let out = p.run("submit", 0, &["--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("a worker certificate cannot submit jobs"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = p.run("submit", 1, &["--env", "NOEQUALS", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    let out = p.run("status", 1, &["--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["workers"], 1);
    let out = p.run("workers", 1, &[]);
    assert!(
        text(&out.stdout).contains("worker w0:"),
        "{}",
        text(&out.stdout)
    );
    // A job the manager queues but no worker can take stays listed until cancelled.
    let h = p
        .manager
        .submit(JobSpec::new("true").require_tag("nobody"))
        .unwrap();
    let out = p.run("jobs", 1, &[]);
    assert!(
        text(&out.stdout).contains("its script is not shown"),
        "{}",
        text(&out.stdout)
    );
    p.manager.cancel(h.id()).unwrap();
}
