//! Job control over a real cluster: timeouts, cancellation of whole process trees,
//! priority, environment and stdin, retries, result limits, job status.

mod common;

use common::*;
use std::time::Duration;
use workpool::job::{JobEvent, JobSpec, JobState, Outcome};
use workpool::manager::Manager;
use workpool::worker::Worker;

/// Gone, or a zombie (dead, waiting to be reaped by someone else).
fn dead(pid: i32) -> bool {
    !alive(pid)
        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
            .unwrap_or(true)
}

fn pids_until_ready(events: &crossbeam_channel::Receiver<JobEvent>) -> Vec<i32> {
    let mut text = String::new();
    while !text.contains("ready") {
        match next_event(events) {
            JobEvent::Output { bytes, .. } => text.push_str(&String::from_utf8_lossy(&bytes)),
            JobEvent::Finished(o) => panic!("ended before it was ready: {o}; output {text:?}"),
            _ => {}
        }
    }
    text.split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

#[test]
fn a_job_past_its_timeout_ends_timed_out_within_seconds() {
    let c = Cluster::new(1);
    let r = run(
        &c.manager,
        JobSpec::new("sleep 600").timeout(Duration::from_secs(1)),
    );
    assert_eq!(r.outcome, Outcome::TimedOut);
}

#[test]
fn a_job_that_ignores_sigterm_still_dies_by_sigkill() {
    let c = Cluster::new(1);
    let spec = JobSpec::new("trap '' TERM; echo $$ ready; while :; do sleep 0.1; done")
        .timeout(Duration::from_secs(1))
        .kill_grace(Duration::from_secs(1));
    let h = c.manager.submit(spec).unwrap();
    let pids = pids_until_ready(h.events());
    assert_eq!(h.wait().outcome, Outcome::TimedOut);
    assert!(
        dead(pids[0]),
        "the shell {} ignored TERM and survived KILL",
        pids[0]
    );
}

#[test]
fn a_cancelled_queued_job_never_starts() {
    let certs = Certs::new(1);
    let manager = Manager::bind(certs.manager_config()).unwrap();
    let dir = scratch("cancel-queued");
    let marker = dir.join("ran");
    let h = manager
        .submit(JobSpec::new(format!("touch {}", marker.display())))
        .unwrap();
    assert_eq!(manager.job(h.id()).unwrap().state, JobState::Queued);
    h.cancel().unwrap();
    let mut events = Vec::new();
    while let Ok(ev) = h.events().recv_timeout(DEADLINE) {
        events.push(ev);
    }
    assert_eq!(
        events,
        vec![JobEvent::Queued, JobEvent::Finished(Outcome::Cancelled)]
    );
    assert!(manager.job(h.id()).is_none());
    // A worker joins and takes later work; the cancelled job is not among it.
    let _w = Worker::start(certs.worker_config(manager.local_addr().port(), 0, "w")).unwrap();
    assert_eq!(run(&manager, JobSpec::new("true")).outcome, exited(0));
    assert!(!marker.exists(), "the cancelled job ran");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn cancelling_a_running_job_kills_every_process_it_started_even_in_new_sessions() {
    let c = Cluster::new(1);
    let script = r#"
        sleep 600 & echo $!
        setsid sleep 600 > /dev/null 2>&1 & echo $!
        ( setsid sleep 600 > /dev/null 2>&1 & echo $! )
        ( nohup sleep 600 > /dev/null 2>&1 & echo $! )
        bash -c 'setsid bash -c "sleep 600 & echo \$!; wait" > /dev/null 2>&1 & echo $!' 
        echo $$ ready
        wait
    "#;
    let h = c.manager.submit(JobSpec::new(script)).unwrap();
    let pids = pids_until_ready(h.events());
    assert!(pids.len() >= 6, "{pids:?}");
    for &p in &pids {
        assert!(alive(p), "{p} was not running before the cancel");
    }
    c.manager.cancel(h.id()).unwrap();
    assert_eq!(h.wait().outcome, Outcome::Cancelled);
    for &p in &pids {
        wait_until(&format!("process {p} is dead"), || dead(p));
    }
}

#[test]
fn env_and_stdin_reach_the_job() {
    let c = Cluster::new(1);
    let r = run(
        &c.manager,
        JobSpec::new("echo \"$COLOUR/$SHAPE\"; wc -c")
            .env("COLOUR", "blue")
            .env("SHAPE", "a square")
            .stdin(vec![b'x'; 100_000]),
    );
    assert_eq!(r.outcome, exited(0));
    assert_eq!(r.stdout_text(), "blue/a square\n100000\n");
}

#[test]
fn a_job_starts_with_no_signal_blocked_or_ignored() {
    // This process ignores SIGPIPE (every Rust program does) and the worker's threads
    // block it; neither reaches the job. `exec`: bash puts back what it was given.
    let c = Cluster::new(1);
    let r = run(
        &c.manager,
        JobSpec::new("exec grep -E '^Sig(Blk|Ign)' /proc/self/status"),
    );
    assert_eq!(r.outcome, exited(0));
    let text = r.stdout_text();
    let mask = |name: &str| {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap();
        u64::from_str_radix(line[name.len()..].trim(), 16).unwrap()
    };
    // Signals 32 and 33 (bits 31 and 32) belong to glibc, which no program linked with
    // it can use or reset; glibc's posix_spawn leaves them ignored.
    let glibc_own = 0b11 << 31;
    assert_eq!(mask("SigBlk:"), 0, "blocked in the job: {text}");
    assert_eq!(
        mask("SigIgn:") & !glibc_own,
        0,
        "ignored in the job: {text}"
    );
}

#[test]
fn bad_jobs_are_refused_at_submit() {
    let c = Cluster::new(0);
    for spec in [
        JobSpec::new("   "),
        JobSpec::new("true").env("A=B", "x"),
        JobSpec::new("true").env("WORKPOOL_JOB_ID", "7"),
        JobSpec::new("true").timeout(Duration::ZERO),
        JobSpec::new("x".repeat(workpool::manager::MAX_JOB_BYTES + 1)),
    ] {
        let err = c.manager.submit(spec).err().expect("refused");
        assert!(matches!(err, workpool::Error::InvalidJob(_)), "{err}");
    }
}

#[test]
fn priorities_order_a_backlog_and_equal_priorities_stay_in_order() {
    let certs = Certs::new(1);
    let manager = Manager::bind(certs.manager_config()).unwrap();
    let events = manager.subscribe();
    let dir = scratch("priority");
    let log = dir.join("order");
    let mut handles = Vec::new();
    for (name, prio) in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1), ("f", 10)] {
        let spec = JobSpec::new(format!("echo {name} >> {}", log.display())).priority(prio);
        handles.push(manager.submit(spec).unwrap());
    }
    // One slot, joining after the whole backlog is queued: jobs start one at a time.
    let _w = Worker::start(certs.worker_config(manager.local_addr().port(), 0, "solo")).unwrap();
    wait_joined(&events, 1);
    for h in handles {
        assert_eq!(h.wait().outcome, exited(0));
    }
    let order = std::fs::read_to_string(&log)
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join("");
    assert_eq!(order, "fbdace");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn wait_keeps_at_most_the_result_limit_but_live_output_is_whole() {
    let c = Cluster::custom(1, |m| m.result_output_limit = 1000, |_, w| w);
    let r = run(
        &c.manager,
        JobSpec::new("head -c 5000 /dev/zero; echo err >&2"),
    );
    assert_eq!(r.outcome, exited(0));
    assert_eq!(r.stdout.len(), 1000);
    assert_eq!(r.stderr, b"err\n");
    assert!(r.truncated);
    let h = c
        .manager
        .submit(JobSpec::new("head -c 5000 /dev/zero"))
        .unwrap();
    let mut live = 0;
    loop {
        match next_event(h.events()) {
            JobEvent::Output { bytes, .. } => live += bytes.len(),
            JobEvent::Finished(_) => break,
            _ => {}
        }
    }
    assert_eq!(live, 5000);
}

#[test]
fn job_status_shows_queued_and_running_jobs() {
    let certs = Certs::new(1);
    let manager = Manager::bind(certs.manager_config()).unwrap();
    let dir = scratch("status");
    let flag = dir.join("go");
    let h = manager
        .submit(
            JobSpec::new(format!(
                "echo up; while [ ! -e {} ]; do sleep 0.02; done",
                flag.display()
            ))
            .priority(3),
        )
        .unwrap();
    let s = manager.job(h.id()).unwrap();
    assert_eq!(
        (s.state.clone(), s.attempt, s.priority),
        (JobState::Queued, 1, 3)
    );
    let _w = Worker::start(certs.worker_config(manager.local_addr().port(), 0, "runner")).unwrap();
    while !matches!(next_event(h.events()), JobEvent::Output { .. }) {}
    let s = manager.job(h.id()).unwrap();
    assert_eq!(
        s.state,
        JobState::Running {
            worker: "runner".into()
        }
    );
    assert_eq!(manager.jobs().len(), 1);
    std::fs::write(&flag, "").unwrap();
    let h_id = h.id();
    assert_eq!(h.wait().outcome, exited(0));
    // Once wait() has returned, the manager no longer counts the job.
    assert!(manager.job(h_id).is_none());
    assert!(manager.jobs().is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn with_retries_a_job_whose_worker_is_killed_runs_again_elsewhere() {
    let certs = Certs::new(1);
    let dir = scratch("retries");
    certs.write_to(&dir);
    let manager = Manager::bind(certs.manager_config()).unwrap();
    let pool = manager.subscribe();
    let mut doomed = spawn_worker_process(&dir, manager.local_addr().port(), "doomed");
    wait_joined(&pool, 1);
    let mark = dir.join("first-attempt");
    let script = format!(
        "if [ -e {m} ]; then echo second on $WORKPOOL_JOB_ID; else touch {m}; echo $$ first; exec sleep 600; fi",
        m = mark.display()
    );
    let h = manager.submit(JobSpec::new(script).retries(1)).unwrap();
    let mut log = Vec::new();
    let first_pgid: i32 = loop {
        let ev = next_event(h.events());
        log.push(ev.clone());
        if let JobEvent::Output { bytes, .. } = ev {
            break String::from_utf8(bytes)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
        }
    };
    let _survivor =
        Worker::start(certs.worker_config(manager.local_addr().port(), 0, "survivor")).unwrap();
    wait_joined(&pool, 1);
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    while let Ok(ev) = h.events().recv_timeout(DEADLINE) {
        log.push(ev);
    }
    let id = h.id();
    let expected_tail = [
        JobEvent::Requeued { attempt: 2 },
        JobEvent::Started {
            worker: "survivor".into(),
        },
        JobEvent::Output {
            stream: workpool::Stream::Stdout,
            bytes: format!("second on {id}\n").into_bytes(),
        },
        JobEvent::Finished(exited(0)),
    ];
    assert_eq!(
        log[..2],
        [
            JobEvent::Queued,
            JobEvent::Started {
                worker: "doomed".into()
            }
        ]
    );
    assert_eq!(log[log.len() - 4..], expected_tail[..], "{log:?}");
    assert_eq!(
        log.iter()
            .filter(|e| matches!(e, JobEvent::Finished(_)))
            .count(),
        1
    );
    // The first attempt's processes outlived their SIGKILLed worker; clean them up.
    // SAFETY: kill has no memory effects; the group is the first attempt's, printed by it.
    unsafe { libc::kill(-first_pgid, libc::SIGKILL) };
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_cancelled_job_is_not_retried_when_its_worker_goes() {
    let c = Cluster::new(1);
    let h = c
        .manager
        .submit(
            JobSpec::new("trap '' TERM; echo ready; while :; do sleep 0.1; done")
                .retries(3)
                .kill_grace(Duration::from_secs(30)),
        )
        .unwrap();
    let _ = pids_until_ready(h.events());
    h.cancel().unwrap();
    // The job ignores TERM for 30 s; its worker stops meanwhile.
    c.workers[0].stop();
    let rest: Vec<JobEvent> = h.events().iter().collect();
    assert_eq!(
        rest,
        vec![JobEvent::Finished(Outcome::Cancelled)],
        "not requeued"
    );
}

/// Not a test on its own: the body of a worker process for tests that kill one.
#[test]
#[ignore]
fn worker_process_helper() {
    worker_process_main();
}
