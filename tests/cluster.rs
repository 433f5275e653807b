//! The cluster end to end over 127.0.0.1 with real mutual TLS.

mod common;

use common::*;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use workpool::job::{JobEvent, JobSpec, Outcome, Stream};
use workpool::manager::{Manager, ManagerEvent};
use workpool::tls::{Identity, TrustRoots, generate_self_signed};
use workpool::worker::{Worker, WorkerConfig};

#[test]
fn output_and_exit_code_come_back() {
    let c = Cluster::new(1);
    let r = run(&c.manager, JobSpec::new("echo hello world; exit 7"));
    assert_eq!(r.outcome, exited(7));
    assert_eq!(r.stdout_text(), "hello world\n");
    assert_eq!(r.worker.as_deref(), Some("w0"));
}

#[test]
fn stderr_is_kept_apart_from_stdout() {
    let c = Cluster::new(1);
    let r = run(
        &c.manager,
        JobSpec::new("echo to-out; echo to-err >&2; echo more-out"),
    );
    assert_eq!(r.outcome, exited(0));
    assert_eq!(r.stdout_text(), "to-out\nmore-out\n");
    assert_eq!(r.stderr_text(), "to-err\n");
}

#[test]
fn events_come_in_order_and_end_with_one_finished() {
    let c = Cluster::new(1);
    let h = c.manager.submit(JobSpec::new("echo a")).unwrap();
    assert_eq!(next_event(h.events()), JobEvent::Queued);
    assert_eq!(
        next_event(h.events()),
        JobEvent::Started {
            worker: "w0".into()
        }
    );
    assert_eq!(
        next_event(h.events()),
        JobEvent::Output {
            stream: Stream::Stdout,
            bytes: b"a\n".to_vec()
        }
    );
    assert_eq!(next_event(h.events()), JobEvent::Finished(exited(0)));
    // Nothing after Finished: the channel closes.
    assert!(h.events().recv_timeout(DEADLINE).is_err());
}

#[test]
fn output_arrives_while_the_job_still_runs() {
    let c = Cluster::new(1);
    let dir = scratch("streaming");
    let flag = dir.join("go-on");
    let script = format!(
        "echo first; while [ ! -e {f} ]; do sleep 0.02; done; echo second",
        f = flag.display()
    );
    let h = c.manager.submit(JobSpec::new(script)).unwrap();
    let first = loop {
        match next_event(h.events()) {
            JobEvent::Output { bytes, .. } => break bytes,
            JobEvent::Finished(o) => panic!("finished before any output: {o}"),
            _ => {}
        }
    };
    // The job cannot end until the flag exists, so this output came while it ran.
    assert_eq!(first, b"first\n");
    std::fs::write(&flag, "").unwrap();
    let r = h.wait();
    assert_eq!(r.outcome, exited(0));
    assert_eq!(r.stdout_text(), "second\n");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_temp_folder_is_private_and_gone_afterwards() {
    let c = Cluster::new(1);
    let r = run(
        &c.manager,
        JobSpec::new("pwd; stat -c %a .; touch made-here; ls; echo id=$WORKPOOL_JOB_ID"),
    );
    assert_eq!(r.outcome, exited(0));
    let out = r.stdout_text();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[1], "700", "{out}");
    assert_eq!(lines[2], "made-here", "{out}");
    assert_eq!(lines[3], format!("id={}", r.id), "{out}");
    // Deleted right after the job's ending is reported.
    wait_until(&format!("{} to be deleted", lines[0]), || {
        !std::path::Path::new(lines[0]).exists()
    });
}

#[test]
fn a_job_submitted_before_any_worker_runs_when_one_joins() {
    let certs = Certs::new(1);
    let manager = Manager::bind(certs.manager_config()).unwrap();
    let events = manager.subscribe();
    let h = manager.submit(JobSpec::new("echo late worker")).unwrap();
    assert_eq!(next_event(h.events()), JobEvent::Queued);
    let _w = Worker::start(certs.worker_config(manager.local_addr().port(), 0, "late")).unwrap();
    wait_joined(&events, 1);
    let r = h.wait();
    assert_eq!(r.outcome, exited(0));
    assert_eq!(r.stdout_text(), "late worker\n");
}

#[test]
fn jobs_go_only_to_workers_with_the_required_tags() {
    let c = Cluster::with(2, |i, cfg| {
        if i == 0 {
            cfg.tag("gpu").tag("big")
        } else {
            cfg
        }
    });
    let mut handles = Vec::new();
    for _ in 0..6 {
        handles.push((
            true,
            c.manager
                .submit(JobSpec::new("true").require_tag("gpu"))
                .unwrap(),
        ));
        handles.push((false, c.manager.submit(JobSpec::new("true")).unwrap()));
    }
    let mut untagged_on = BTreeSet::new();
    for (tagged, h) in handles {
        let r = h.wait();
        assert_eq!(r.outcome, exited(0));
        let w = r.worker.unwrap();
        if tagged {
            assert_eq!(w, "w0", "a gpu job ran on {w}");
        } else {
            untagged_on.insert(w);
        }
    }
    assert!(!untagged_on.is_empty());
    // A job nobody can run waits instead of failing.
    let h = c
        .manager
        .submit(JobSpec::new("true").require_tag("arm"))
        .unwrap();
    let p = c
        .manager
        .submit(JobSpec::new("true").require_platform("plan9-mips"))
        .unwrap();
    let w = c.manager.workers();
    assert_eq!(w.len(), 2);
    assert_eq!(next_event(h.events()), JobEvent::Queued);
    assert!(
        h.events().try_recv().is_err(),
        "the arm job must still be queued"
    );
    assert_eq!(next_event(p.events()), JobEvent::Queued);
    assert!(
        p.events().try_recv().is_err(),
        "the plan9 job must still be queued"
    );
    // A matching worker joins and takes it.
    let _arm = Worker::start(c.certs.worker_config(c.port(), 0, "arm-box").tag("arm")).unwrap();
    assert_eq!(h.wait().worker.as_deref(), Some("arm-box"));
}

#[test]
fn a_job_can_require_the_platform_a_worker_reports() {
    let c = Cluster::new(1);
    let platform = workpool::worker::detect_platform();
    assert_eq!(c.manager.workers()[0].platform, platform);
    let r = run(
        &c.manager,
        JobSpec::new("uname -s").require_platform(platform),
    );
    assert_eq!(r.outcome, exited(0));
}

#[test]
fn slots_bound_how_many_jobs_a_worker_runs_at_once() {
    let c = Cluster::with(1, |_, cfg| cfg.slots(2));
    let dir = scratch("slots");
    let flag = dir.join("release");
    let script = format!("while [ ! -e {} ]; do sleep 0.02; done", flag.display());
    let handles: Vec<_> = (0..5)
        .map(|_| c.manager.submit(JobSpec::new(script.clone())).unwrap())
        .collect();
    // Two start...
    let mut started = 0;
    for h in &handles[..2] {
        assert_eq!(next_event(h.events()), JobEvent::Queued);
        assert!(matches!(next_event(h.events()), JobEvent::Started { .. }));
        started += 1;
    }
    assert_eq!(started, 2);
    // ...and the dispatcher, having handled all five submissions before this query, has
    // started no more: the other three hold nothing but `Queued`.
    let w = c.manager.workers();
    assert_eq!(w[0].running, 2);
    assert_eq!(w[0].slots, 2);
    for h in &handles[2..] {
        assert_eq!(h.events().try_recv().unwrap(), JobEvent::Queued);
        assert!(h.events().try_recv().is_err());
    }
    std::fs::write(&flag, "").unwrap();
    for h in handles {
        assert_eq!(h.wait().outcome, exited(0));
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_worker_started_before_its_manager_joins_when_it_comes_up() {
    let certs = Certs::new(1);
    let port = free_port();
    let worker = Worker::start(certs.worker_config(port, 0, "early")).unwrap();
    wait_until("the worker has tried to connect twice", || {
        worker.connection_attempts() >= 2
    });
    assert_eq!(worker.sessions(), 0);
    let mut cfg = certs.manager_config();
    cfg.listen = format!("127.0.0.1:{port}");
    let manager = Manager::bind(cfg).unwrap();
    let events = manager.subscribe();
    // It may have joined before the subscription: ask the manager directly too.
    if manager.workers().is_empty() {
        wait_joined(&events, 1);
    }
    assert_eq!(run(&manager, JobSpec::new("echo ok")).stdout_text(), "ok\n");
}

#[test]
fn a_worker_rejoins_a_restarted_manager_on_the_same_port() {
    let certs = Certs::new(1);
    let first = Manager::bind(certs.manager_config()).unwrap();
    let events = first.subscribe();
    let addr = first.local_addr();
    let worker = Worker::start(certs.worker_config(addr.port(), 0, "stayer")).unwrap();
    wait_joined(&events, 1);
    assert_eq!(run(&first, JobSpec::new("echo one")).stdout_text(), "one\n");
    first.shutdown();
    drop(first);
    let mut cfg = certs.manager_config();
    cfg.listen = addr.to_string();
    let second = Manager::bind(cfg).unwrap();
    let events = second.subscribe();
    if second.workers().is_empty() {
        wait_joined(&events, 1);
    }
    assert_eq!(
        run(&second, JobSpec::new("echo two")).stdout_text(),
        "two\n"
    );
    assert_eq!(worker.sessions(), 2);
}

#[test]
fn a_worker_with_an_untrusted_certificate_is_refused_while_others_keep_working() {
    let c = Cluster::new(1);
    let stranger = generate_self_signed(&["stranger"]).unwrap();
    let cfg = WorkerConfig::new(
        "127.0.0.1",
        c.port(),
        Identity::from_pem(stranger.cert_pem.as_bytes(), stranger.key_pem.as_bytes()).unwrap(),
        TrustRoots::from_pem(c.certs.manager.cert_pem.as_bytes()).unwrap(),
    )
    .name("stranger");
    let bad = Worker::start(cfg).unwrap();
    wait_until("the stranger has tried three times", || {
        bad.connection_attempts() >= 3
    });
    assert_eq!(bad.sessions(), 0);
    let names: Vec<String> = c.manager.workers().into_iter().map(|w| w.name).collect();
    assert_eq!(names, vec!["w0".to_string()]);
    assert_eq!(
        run(&c.manager, JobSpec::new("echo still fine")).stdout_text(),
        "still fine\n"
    );
}

#[test]
fn a_worker_that_does_not_trust_the_manager_never_joins() {
    let c = Cluster::new(1);
    let other = generate_self_signed(&["127.0.0.1"]).unwrap();
    let w = &c.certs.workers[0];
    let cfg = WorkerConfig::new(
        "127.0.0.1",
        c.port(),
        Identity::from_pem(w.cert_pem.as_bytes(), w.key_pem.as_bytes()).unwrap(),
        TrustRoots::from_pem(other.cert_pem.as_bytes()).unwrap(),
    )
    .name("suspicious");
    let wary = Worker::start(cfg).unwrap();
    wait_until("the wary worker has tried twice", || {
        wary.connection_attempts() >= 2
    });
    assert_eq!(wary.sessions(), 0);
    assert_eq!(c.manager.workers().len(), 1);
}

#[test]
fn hostname_verification_is_on_by_default_and_can_be_turned_off() {
    let certs = Certs::new(1);
    // The manager's certificate names localhost and 127.0.0.1, not 127.0.0.2.
    let manager = Manager::bind({
        let mut c = certs.manager_config();
        c.listen = "127.0.0.2:0".into();
        c
    });
    let Ok(manager) = manager else {
        eprintln!("skipped: 127.0.0.2 is not bindable here");
        return;
    };
    let events = manager.subscribe();
    let port = manager.local_addr().port();
    let mut strict = certs.worker_config(port, 0, "strict");
    strict.host = "127.0.0.2".into();
    let strict = Worker::start(strict).unwrap();
    wait_until("the strict worker has tried twice", || {
        strict.connection_attempts() >= 2
    });
    assert_eq!(strict.sessions(), 0);
    strict.stop();
    let mut lax = certs.worker_config(port, 0, "lax").no_verify_hostname();
    lax.host = "127.0.0.2".into();
    let _lax = Worker::start(lax).unwrap();
    assert_eq!(wait_joined(&events, 1), vec!["lax".to_string()]);
}

#[test]
fn a_full_queue_refuses_submit_with_a_clear_error() {
    let certs = Certs::new(1);
    let mut cfg = certs.manager_config();
    cfg.queue_capacity = 3;
    let manager = Manager::bind(cfg).unwrap();
    let held: Vec<_> = (0..3)
        .map(|_| manager.submit(JobSpec::new("true")).unwrap())
        .collect();
    let err = manager
        .submit(JobSpec::new("true"))
        .err()
        .expect("the fourth job is refused");
    assert!(
        matches!(err, workpool::error::Error::QueueFull { capacity: 3 }),
        "{err}"
    );
    assert!(err.to_string().contains("full"));
    // Nothing accepted is lost: a worker joins and all three run.
    let _w = Worker::start(certs.worker_config(manager.local_addr().port(), 0, "w")).unwrap();
    for h in held {
        assert_eq!(h.wait().outcome, exited(0));
    }
    assert!(manager.submit(JobSpec::new("true")).is_ok());
}

#[test]
fn shutdown_rejects_queued_jobs_and_refuses_new_ones() {
    let certs = Certs::new(1);
    let manager = Manager::bind(certs.manager_config()).unwrap();
    let queued = manager.submit(JobSpec::new("true")).unwrap();
    manager.shutdown();
    assert!(matches!(queued.wait().outcome, Outcome::Rejected(_)));
    assert!(matches!(
        manager.submit(JobSpec::new("true")),
        Err(workpool::error::Error::ShutDown)
    ));
}

#[test]
fn three_hundred_jobs_over_three_two_slot_workers_each_end_exactly_once() {
    let c = Cluster::with(3, |_, cfg| cfg.slots(2));
    let handles: Vec<_> = (0..300)
        .map(|i| {
            (
                i,
                c.manager.submit(JobSpec::new(format!("echo {i}"))).unwrap(),
            )
        })
        .collect();
    let mut finished = 0;
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    for (i, h) in handles {
        let mut ends = 0;
        let mut out = Vec::new();
        let mut worker = None;
        loop {
            match h.events().recv_timeout(DEADLINE) {
                Ok(JobEvent::Finished(o)) => {
                    assert_eq!(o, exited(0));
                    ends += 1;
                }
                Ok(JobEvent::Output { bytes, .. }) => out.extend(bytes),
                Ok(JobEvent::Started { worker: w }) => worker = Some(w),
                Ok(_) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                Err(e) => panic!("job {i}: {e}"),
            }
        }
        assert_eq!(ends, 1, "job {i} ended {ends} times");
        assert_eq!(out, format!("{i}\n").into_bytes());
        *per_worker.entry(worker.unwrap()).or_default() += 1;
        finished += 1;
    }
    assert_eq!(finished, 300, "submitted 300, ended {finished}");
    assert_eq!(per_worker.values().sum::<usize>(), 300);
    assert_eq!(
        per_worker.len(),
        3,
        "every worker took work: {per_worker:?}"
    );
}

#[test]
fn a_submitter_that_reads_slowly_holds_back_only_its_own_job() {
    // Short heartbeats: a link stalled behind the slow reader would be declared dead.
    let c = Cluster::custom(
        1,
        |m| {
            m.heartbeat_interval = Duration::from_millis(100);
            m.heartbeat_timeout = Duration::from_millis(800);
            m.result_output_limit = 64 << 20;
        },
        |_, cfg| cfg.slots(2),
    );
    // B writes far more than its channel holds, and nobody reads it for a while.
    let b = c
        .manager
        .submit(JobSpec::new("head -c 30000000 /dev/zero; echo end"))
        .unwrap();
    // Meanwhile A, on the same worker and link, outlives the heartbeat timeout and ends well.
    let a = run(&c.manager, JobSpec::new("sleep 2; echo a"));
    assert_eq!(a.outcome, exited(0));
    assert_eq!(a.stdout_text(), "a\n");
    let r = b.wait();
    assert_eq!(r.outcome, exited(0));
    assert_eq!(r.stdout.len(), 30_000_004);
    assert!(r.stdout.ends_with(b"end\n"));
}

#[test]
fn nothing_follows_finished_even_when_shutdown_cuts_a_streaming_job() {
    for round in 0..3 {
        let c = Cluster::new(1);
        let h = c.manager.submit(JobSpec::new("yes streaming")).unwrap();
        // Read a little, slowly enough that the channel fills, then shut down under it.
        let mut seen = 0;
        while seen < 20 {
            if let JobEvent::Output { .. } = next_event(h.events()) {
                seen += 1;
            }
        }
        c.manager.shutdown_within(Duration::ZERO);
        let mut finished = 0;
        for ev in h.events().iter() {
            match ev {
                JobEvent::Finished(o) => {
                    assert_eq!(o, Outcome::Cancelled, "round {round}");
                    finished += 1;
                }
                other => assert_eq!(finished, 0, "round {round}: {other:?} after Finished"),
            }
        }
        assert_eq!(finished, 1, "round {round}");
    }
}

/// Not a test on its own: the body of a worker process for tests that kill one.
#[test]
#[ignore]
fn worker_process_helper() {
    worker_process_main();
}

#[test]
fn a_killed_worker_s_running_job_ends_as_worker_lost() {
    let certs = Certs::new(1);
    let dir = scratch("killed-worker");
    certs.write_to(&dir);
    let manager = Manager::bind(certs.manager_config()).unwrap();
    let events = manager.subscribe();
    let mut child = spawn_worker_process(&dir, manager.local_addr().port(), "doomed");
    wait_joined(&events, 1);
    let h = manager
        .submit(JobSpec::new("echo $$; exec sleep 600"))
        .unwrap();
    let pgid = first_number(h.events());
    child.kill().unwrap(); // SIGKILL, by PID
    child.wait().unwrap();
    let mut ends = Vec::new();
    while let Ok(ev) = h.events().recv_timeout(DEADLINE) {
        if let JobEvent::Finished(o) = ev {
            ends.push(o);
        }
    }
    assert_eq!(ends, vec![Outcome::WorkerLost]);
    assert!(matches!(
        events.recv_timeout(DEADLINE).unwrap(),
        ManagerEvent::WorkerLeft { ref name, .. } if name == "doomed"
    ));
    // The job's own processes outlive a SIGKILLed worker; clean them up by group.
    // SAFETY: kill has no memory effects; the group is the job's own, printed by it.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_stopped_worker_ends_its_jobs_as_worker_lost_and_leaves_nothing_running() {
    let c = Cluster::new(1);
    let h = c
        .manager
        .submit(JobSpec::new("echo $$; sleep 600"))
        .unwrap();
    let pid = first_number(h.events());
    c.workers[0].stop();
    assert_eq!(h.wait().outcome, Outcome::WorkerLost);
    assert!(
        !alive(pid),
        "the job's shell {pid} survived its worker's stop"
    );
}

#[test]
fn a_job_goes_to_the_matching_worker_with_the_most_free_slots() {
    let c = Cluster::with(2, |i, cfg| cfg.slots(if i == 0 { 3 } else { 1 }));
    let dir = scratch("freest");
    let flag = dir.join("go");
    let block = JobSpec::new(format!(
        "while [ ! -e {} ]; do sleep 0.02; done",
        flag.display()
    ));
    let mut on = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..3 {
        let h = c.manager.submit(block.clone()).unwrap();
        assert_eq!(next_event(h.events()), JobEvent::Queued);
        match next_event(h.events()) {
            JobEvent::Started { worker } => on.push(worker),
            other => panic!("{other:?}"),
        }
        handles.push(h);
    }
    // w0 has 3 free, w1 1: w0 first (3 > 1), again (2 > 1), then a tie (1 = 1) goes on in
    // turn from w0, to w1.
    assert_eq!(on, ["w0", "w0", "w1"]);
    std::fs::write(&flag, "").unwrap();
    for h in handles {
        assert_eq!(h.wait().outcome, exited(0));
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn many_trivial_jobs_on_one_slot_with_a_run_held_ahead_each_end_once_with_their_output() {
    let c = Cluster::with(1, |_, cfg| cfg.slots(1).ahead(1));
    let handles: Vec<_> = (0..200)
        .map(|i| {
            (
                i,
                c.manager.submit(JobSpec::new(format!("echo {i}"))).unwrap(),
            )
        })
        .collect();
    for (i, h) in handles {
        let (mut starts, mut ends, mut out) = (0, 0, Vec::new());
        loop {
            match h.events().recv_timeout(DEADLINE) {
                Ok(JobEvent::Started { worker }) => {
                    assert_eq!(worker, "w0");
                    assert_eq!(ends, 0, "job {i}: started after it ended");
                    starts += 1;
                }
                Ok(JobEvent::Output { bytes, .. }) => {
                    assert_eq!(starts, 1, "job {i}: output before it started");
                    out.extend(bytes);
                }
                Ok(JobEvent::Finished(o)) => {
                    assert_eq!(o, exited(0), "job {i}");
                    ends += 1;
                }
                Ok(e @ (JobEvent::Requeued { .. } | JobEvent::Warning(_))) => {
                    panic!("job {i}: {e:?}")
                }
                Ok(_) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                Err(e) => panic!("job {i}: {e}"),
            }
        }
        assert_eq!((starts, ends), (1, 1), "job {i}");
        assert_eq!(out, format!("{i}\n").into_bytes(), "job {i}");
    }
    let stats = c.manager.stats();
    assert_eq!(stats.per_worker[0].jobs_run, 200);
    assert_eq!((stats.jobs_queued, stats.jobs_running), (0, 0));
}

#[test]
fn no_short_job_waits_behind_a_long_one_while_another_slot_is_free() {
    let certs = Certs::new(2);
    let manager = Manager::bind(certs.manager_config()).unwrap();
    let events = manager.subscribe();
    let port = manager.local_addr().port();
    let _w0 = Worker::start(certs.worker_config(port, 0, "w0").slots(1).ahead(1)).unwrap();
    wait_joined(&events, 1);
    let dir = scratch("ahead-long");
    let gate = dir.join("go");
    // The long job cannot end before the test makes the gate.
    let long = manager
        .submit(JobSpec::new(format!(
            "while [ ! -e {g} ]; do sleep 0.02; done; echo long",
            g = gate.display()
        )))
        .unwrap();
    loop {
        match next_event(long.events()) {
            JobEvent::Started { worker } => break assert_eq!(worker, "w0"),
            JobEvent::Queued => {}
            e => panic!("{e:?}"),
        }
    }
    // The first short job is sent ahead to w0, behind the long one; the rest wait.
    let shorts: Vec<_> = (0..20)
        .map(|i| manager.submit(JobSpec::new(format!("echo {i}"))).unwrap())
        .collect();
    assert_eq!(
        manager.job(shorts[0].id()).unwrap().state,
        workpool::job::JobState::Queued
    );
    // A second worker comes: every short job runs there, the one held behind the long
    // job too (it is taken back), while the long job still runs.
    let _w1 = Worker::start(certs.worker_config(port, 1, "w1").slots(1).ahead(1)).unwrap();
    for (i, h) in shorts.into_iter().enumerate() {
        let r = h.wait();
        assert_eq!(r.outcome, exited(0), "short job {i}");
        assert_eq!(r.stdout_text(), format!("{i}\n"));
        assert_eq!(r.worker.as_deref(), Some("w1"), "short job {i}");
        assert_eq!(r.attempts, 1);
    }
    assert!(
        matches!(
            manager.job(long.id()).unwrap().state,
            workpool::job::JobState::Running { ref worker } if worker == "w0"
        ),
        "the long job is still running"
    );
    std::fs::write(&gate, "").unwrap();
    let r = long.wait();
    assert_eq!(r.outcome, exited(0));
    assert_eq!(r.stdout_text(), "long\n");
    std::fs::remove_dir_all(dir).unwrap();
}
