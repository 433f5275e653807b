//! Faults injected for real: links cut and black-holed by a relay the test controls,
//! worker processes stopped and killed by PID, a manager process killed and replaced,
//! drains and shutdowns. Every test counts what it submitted against what ended.

mod common;

use common::*;
use std::time::Duration;
use workpool::job::{JobEvent, JobSpec, Outcome};
use workpool::manager::{Manager, ManagerConfig, ManagerEvent};
use workpool::worker::Worker;

fn fast_heartbeats(m: &mut ManagerConfig) {
    m.heartbeat_interval = Duration::from_millis(100);
    m.heartbeat_timeout = Duration::from_millis(1000);
}

/// A manager, and one worker that reaches it only through a relay.
fn relayed(
    grace: Duration,
) -> (
    Certs,
    Manager,
    crossbeam_channel::Receiver<ManagerEvent>,
    Relay,
    Worker,
) {
    let certs = Certs::new(1);
    let mut cfg = certs.manager_config();
    fast_heartbeats(&mut cfg);
    cfg.reconnect_grace = grace;
    let manager = Manager::bind(cfg).unwrap();
    let pool = manager.subscribe();
    let relay = Relay::start(manager.local_addr());
    let worker = Worker::start(certs.worker_config(relay.port, 0, "far")).unwrap();
    wait_joined(&pool, 1);
    (certs, manager, pool, relay, worker)
}

fn numbered(n: u32, pause: &str) -> String {
    format!("for i in $(seq 1 {n}); do echo line $i; sleep {pause}; done")
}

fn expected_lines(n: u32) -> String {
    (1..=n).map(|i| format!("line {i}\n")).collect()
}

/// Waits until the job has printed `line N`.
fn wait_for_line(events: &crossbeam_channel::Receiver<JobEvent>, n: u32, seen: &mut Vec<u8>) {
    let want = format!("line {n}\n");
    while !String::from_utf8_lossy(seen).contains(&want) {
        match next_event(events) {
            JobEvent::Output { bytes, .. } => seen.extend(bytes),
            JobEvent::Finished(o) => panic!("ended early: {o}"),
            _ => {}
        }
    }
}

#[test]
fn brief_cuts_lose_nothing_the_job_goes_on_and_ends_once() {
    let (_certs, manager, pool, relay, worker) = relayed(Duration::from_secs(30));
    let h = manager
        .submit(JobSpec::new(numbered(300, "0.005")))
        .unwrap();
    let mut seen = Vec::new();
    wait_for_line(h.events(), 50, &mut seen);
    relay.cut();
    wait_for_line(h.events(), 150, &mut seen);
    relay.cut();
    let (rest, ends, _) = drain_job(h.events());
    seen.extend(rest);
    assert_eq!(
        String::from_utf8(seen).unwrap(),
        expected_lines(300),
        "every byte once, in order"
    );
    assert_eq!(ends, vec![exited(0)]);
    assert!(
        worker.sessions() >= 3,
        "the worker reconnected after each cut"
    );
    // The manager saw the worker leave and come back, and it is there now.
    let left = pool
        .try_iter()
        .filter(|e| matches!(e, ManagerEvent::WorkerLeft { .. }))
        .count();
    assert!(left >= 2);
    assert_eq!(manager.workers().len(), 1);
}

#[test]
fn a_black_holed_link_is_noticed_by_heartbeats_and_nothing_is_lost() {
    let (_certs, manager, _pool, relay, worker) = relayed(Duration::from_secs(30));
    let h = manager.submit(JobSpec::new(numbered(200, "0.01"))).unwrap();
    let mut seen = Vec::new();
    wait_for_line(h.events(), 40, &mut seen);
    // Bytes vanish from now on but no socket closes: only the heartbeats can tell.
    relay.black_hole();
    let (rest, ends, _) = drain_job(h.events());
    seen.extend(rest);
    assert_eq!(String::from_utf8(seen).unwrap(), expected_lines(200));
    assert_eq!(ends, vec![exited(0)]);
    assert!(worker.sessions() >= 2);
}

#[test]
fn a_cut_longer_than_the_grace_ends_the_job_worker_lost_and_the_worker_kills_it() {
    let (_certs, manager, pool, relay, worker) = relayed(Duration::from_millis(800));
    let h = manager.submit(JobSpec::new("echo $$; sleep 600")).unwrap();
    let pid = first_number(h.events());
    relay.refuse(true);
    relay.cut();
    let (_, ends, _) = drain_job(h.events());
    assert_eq!(ends, vec![Outcome::WorkerLost]);
    // When the network comes back, the worker learns the manager gave up on the job
    // and kills it (or has already killed it once the grace was over).
    let before = worker.sessions();
    relay.refuse(false);
    wait_until("the worker is back", || worker.sessions() > before);
    wait_until("the orphaned job is dead", || !alive(pid));
    assert!(
        pool.try_iter()
            .any(|e| matches!(e, ManagerEvent::WorkerLeft { .. }))
    );
    assert_eq!(
        run(&manager, JobSpec::new("echo after")).stdout_text(),
        "after\n"
    );
}

#[test]
fn a_stopped_worker_is_declared_dead_gets_no_work_and_its_jobs_end_worker_lost() {
    let certs = Certs::new(1);
    let dir = scratch("sigstop");
    certs.write_to(&dir);
    let mut cfg = certs.manager_config();
    fast_heartbeats(&mut cfg);
    cfg.reconnect_grace = Duration::from_millis(500);
    let manager = Manager::bind(cfg).unwrap();
    let pool = manager.subscribe();
    let mut child = spawn_worker_process(&dir, manager.local_addr().port(), "frozen");
    wait_joined(&pool, 1);
    let h = manager.submit(JobSpec::new("echo $$; sleep 600")).unwrap();
    let pgid = first_number(h.events());
    let pid = child.id() as i32;
    // SAFETY: kill has no memory effects; the pid is our own child's.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // Its TCP connection stays open; only the heartbeat timeout can tell.
    let (_, ends, _) = drain_job(h.events());
    assert_eq!(ends, vec![Outcome::WorkerLost]);
    assert!(manager.workers().is_empty());
    // New work waits for a live worker instead of going to the frozen one.
    let queued = manager.submit(JobSpec::new("echo fresh")).unwrap();
    let _fresh =
        Worker::start(certs.worker_config(manager.local_addr().port(), 0, "fresh")).unwrap();
    let r = queued.wait();
    assert_eq!((r.outcome, r.worker.as_deref()), (exited(0), Some("fresh")));
    // SAFETY: kill has no memory effects; the pid is our own child's.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    child.kill().unwrap();
    child.wait().unwrap();
    // SAFETY: kill has no memory effects; the group is the job's own, printed by it.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_worker_busy_on_every_slot_is_not_declared_dead() {
    let c = Cluster::custom(1, fast_heartbeats, |_, w| w.slots(2));
    let spin = || JobSpec::new("while :; do :; done").timeout(Duration::from_secs(3));
    let (a, b) = (
        c.manager.submit(spin()).unwrap(),
        c.manager.submit(spin()).unwrap(),
    );
    assert_eq!(a.wait().outcome, Outcome::TimedOut);
    assert_eq!(b.wait().outcome, Outcome::TimedOut);
    assert!(
        !c.events
            .try_iter()
            .any(|e| matches!(e, ManagerEvent::WorkerLeft { .. })),
        "the busy worker was declared dead"
    );
}

#[test]
fn after_a_manager_restart_workers_take_work_at_once_and_old_jobs_are_killed() {
    use std::io::{BufRead, BufReader, Write};
    let dir = scratch("manager-crash");
    let certs = Certs::new(1);
    certs.write_to(&dir);
    let port = free_port();
    let mut args = manager_args(&dir);
    args[2] = port.to_string(); // -p PORT instead of 0
    let mut first = std::process::Command::new(cli())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let worker = Worker::start(certs.worker_config(port, 0, "loyal")).unwrap();
    let mut stdin = first.stdin.take().unwrap();
    stdin.write_all(b"echo pid $$; sleep 600\n").unwrap();
    let mut out = BufReader::new(first.stdout.take().unwrap());
    let mut line = String::new();
    let pid: i32 = loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0);
        if !line.contains("\"event\":\"output\"") {
            continue;
        }
        if let Some(rest) = line.split("pid ").nth(1) {
            break rest
                .trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .unwrap();
        }
    };
    // The manager dies without a word; a new one takes its port.
    first.kill().unwrap();
    first.wait().unwrap();
    let mut cfg = certs.manager_config();
    cfg.listen = format!("127.0.0.1:{port}");
    let second = Manager::bind(cfg).unwrap();
    let pool = second.subscribe();
    if second.workers().is_empty() {
        wait_joined(&pool, 1);
    }
    assert_eq!(
        run(&second, JobSpec::new("echo new work")).stdout_text(),
        "new work\n"
    );
    wait_until("the dead manager's job is killed", || !alive(pid));
    assert_eq!(worker.sessions(), 2);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_draining_worker_finishes_its_jobs_takes_no_new_ones_and_leaves() {
    let c = Cluster::new(1);
    let dir = scratch("drain");
    let flag = dir.join("go");
    let h = c
        .manager
        .submit(JobSpec::new(format!(
            "echo up; while [ ! -e {} ]; do sleep 0.02; done; echo done",
            flag.display()
        )))
        .unwrap();
    while !matches!(next_event(h.events()), JobEvent::Output { .. }) {}
    c.workers[0].drain(None);
    wait_until("the manager sees the drain", || {
        c.manager.workers().first().is_some_and(|w| w.draining)
    });
    let later = c.manager.submit(JobSpec::new("echo later")).unwrap();
    assert_eq!(next_event(later.events()), JobEvent::Queued);
    std::fs::write(&flag, "").unwrap();
    let (out, ends, _) = drain_job(h.events());
    assert_eq!((out, ends), (b"done\n".to_vec(), vec![exited(0)]));
    assert!(c.workers[0].wait(DEADLINE), "the drained worker left");
    assert!(
        later.events().try_recv().is_err(),
        "the later job did not start on the draining worker"
    );
    let _next = Worker::start(c.certs.worker_config(c.port(), 0, "next")).unwrap();
    assert_eq!(later.wait().worker.as_deref(), Some("next"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_drain_deadline_kills_what_still_runs() {
    let c = Cluster::new(1);
    let h = c
        .manager
        .submit(JobSpec::new("echo up; sleep 600"))
        .unwrap();
    while !matches!(next_event(h.events()), JobEvent::Output { .. }) {}
    c.workers[0].drain(Some(Duration::from_millis(300)));
    let (_, ends, _) = drain_job(h.events());
    assert_eq!(ends, vec![Outcome::Cancelled]);
    assert!(c.workers[0].wait(DEADLINE));
}

#[test]
fn shutdown_lets_running_jobs_finish_within_the_grace_and_cancels_the_rest() {
    let c = Cluster::custom(
        1,
        |m| m.shutdown_grace = Duration::from_secs(2),
        |_, w| w.slots(2),
    );
    let quick = c
        .manager
        .submit(JobSpec::new("echo started; sleep 0.3; echo finished"))
        .unwrap();
    let slow = c
        .manager
        .submit(JobSpec::new("echo started; sleep 600"))
        .unwrap();
    let queued = c.manager.submit(JobSpec::new("true")).unwrap();
    for h in [&quick, &slow] {
        while !matches!(next_event(h.events()), JobEvent::Output { .. }) {}
    }
    c.manager.shutdown();
    let outcomes: Vec<Vec<Outcome>> = [quick, slow, queued]
        .iter()
        .map(|h| drain_job(h.events()).1)
        .collect();
    assert_eq!(outcomes[0], vec![exited(0)]);
    assert_eq!(outcomes[1], vec![Outcome::Cancelled]);
    assert!(matches!(outcomes[2].as_slice(), [Outcome::Rejected(_)]));
}

#[test]
fn stopping_a_worker_whose_job_is_paused_for_a_slow_submitter_ends_and_reaps_it() {
    let c = Cluster::new(1);
    let h = c.manager.submit(JobSpec::new("echo $$; exec yes")).unwrap();
    let pid = first_number(h.events());
    // Nobody reads on: the job's channel fills, and the manager pauses the job.
    wait_until("the job is paused", || {
        c.manager.job(h.id()).is_some_and(|j| j.output_paused)
    });
    c.workers[0].stop();
    // Killed and reaped: not even a zombie is left.
    assert!(!alive(pid), "the paused job {pid} was never reaped");
    assert!(matches!(
        drain_job(h.events()).1.last(),
        Some(Outcome::WorkerLost)
    ));
}

#[test]
fn a_retry_can_come_back_to_the_same_worker_while_its_old_run_is_being_killed() {
    let certs = Certs::new(1);
    let mut cfg = certs.manager_config();
    fast_heartbeats(&mut cfg);
    cfg.reconnect_grace = Duration::from_millis(300);
    let manager = Manager::bind(cfg).unwrap();
    let pool = manager.subscribe();
    let relay = Relay::start(manager.local_addr());
    let worker = Worker::start(certs.worker_config(relay.port, 0, "far")).unwrap();
    wait_joined(&pool, 1);
    let dir = scratch("retry-same-worker");
    let mark = dir.join("first");
    let script = format!(
        "if [ -e {m} ]; then echo second; else touch {m}; echo first; exec sleep 600; fi",
        m = mark.display()
    );
    let h = manager.submit(JobSpec::new(script).retries(1)).unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("first") {
        if let JobEvent::Output { bytes, .. } = next_event(h.events()) {
            seen.extend(bytes);
        }
    }
    // The manager sees the link drop now; the worker only after its heartbeat timeout, by
    // when the manager has given up and queued the retry, which goes to the same worker.
    relay.cut_manager_side();
    let (out, ends, all) = drain_job(h.events());
    assert_eq!(ends, vec![exited(0)], "{all:?}");
    assert_eq!(out, b"second\n");
    assert!(all.contains(&JobEvent::Requeued { attempt: 2 }));
    assert!(all.contains(&JobEvent::Started {
        worker: "far".into()
    }));
    assert!(worker.sessions() >= 2);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_draining_worker_that_reconnects_is_given_no_new_work() {
    let certs = Certs::new(1);
    let mut cfg = certs.manager_config();
    fast_heartbeats(&mut cfg);
    cfg.reconnect_grace = Duration::from_secs(30);
    let manager = Manager::bind(cfg).unwrap();
    let pool = manager.subscribe();
    let relay = Relay::start(manager.local_addr());
    let worker = Worker::start(certs.worker_config(relay.port, 0, "leaving").slots(2)).unwrap();
    wait_joined(&pool, 1);
    let dir = scratch("drain-reconnect");
    let flag = dir.join("go");
    let first = manager
        .submit(JobSpec::new(format!(
            "echo up; while [ ! -e {} ]; do sleep 0.02; done",
            flag.display()
        )))
        .unwrap();
    while !matches!(next_event(first.events()), JobEvent::Output { .. }) {}
    worker.drain(None);
    wait_until("the manager sees the drain", || {
        manager.workers().first().is_some_and(|w| w.draining)
    });
    let second = manager.submit(JobSpec::new("echo second")).unwrap();
    relay.cut();
    wait_until("the worker is back", || {
        worker.sessions() >= 2 && manager.workers().len() == 1
    });
    assert!(manager.workers()[0].draining, "it came back draining");
    std::fs::write(&flag, "").unwrap();
    assert_eq!(drain_job(first.events()).1, vec![exited(0)]);
    assert!(worker.wait(DEADLINE), "the drained worker left");
    assert_eq!(
        manager.job(second.id()).map(|j| j.state),
        Some(workpool::JobState::Queued)
    );
    let _next = Worker::start(certs.worker_config(manager.local_addr().port(), 0, "next")).unwrap();
    let r = second.wait();
    assert_eq!((r.outcome, r.worker.as_deref()), (exited(0), Some("next")));
    std::fs::remove_dir_all(dir).unwrap();
}

/// Not a test on its own: the body of a worker process for tests that stop or kill one.
#[test]
#[ignore]
fn worker_process_helper() {
    worker_process_main();
}
