//! A manager with a journal, restarted in process: the queue, the ids, the manager's
//! identity and the running jobs go on; a journal another manager holds, or one that is
//! not a journal, is refused in one line.

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;
use workpool::job::{JobSpec, JobState};
use workpool::manager::{Manager, ManagerConfig};
use workpool::worker::Worker;
use workpool::{Error, JobId};

/// A manager on `port` (0: any) keeping its journal at `journal`.
fn journaled(certs: &Certs, port: u16, journal: &Path) -> Manager {
    let mut config = certs.manager_config().journal(journal);
    config.listen = format!("127.0.0.1:{port}");
    // Long enough for a restart in a loaded test run; the tests never wait it out.
    config.reconnect_grace = Duration::from_secs(60);
    Manager::bind(config).expect("the journaled manager starts")
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn ended(m: &Manager) -> u64 {
    m.stats().jobs_ended()
}

#[test]
fn queued_jobs_come_back_in_priority_order_and_ids_go_on_after_a_restart() {
    let dir = scratch("journal-queue");
    let journal = dir.join("journal.sqlite");
    let certs = Certs::new(1);
    let order = dir.join("order");
    let m = journaled(&certs, 0, &journal);
    let port = m.local_addr().port();
    let job = |name: &str, priority: i32| {
        JobSpec::new(format!("echo {name} >> {}", order.display())).priority(priority)
    };
    let low = m.submit(job("low", -1)).unwrap();
    let a = m.submit(job("a", 0)).unwrap();
    let high = m.submit(job("high", 5)).unwrap();
    let ids = [low.id(), a.id(), high.id()];
    let stats = m.stats();
    assert!(stats.journal_bytes.is_some_and(|b| b > 0), "{stats:?}");
    assert!(
        stats.to_prometheus().contains("\nworkpool_journal_bytes "),
        "the metrics tell the journal's size"
    );
    drop(m);

    let m = journaled(&certs, port, &journal);
    let queued: Vec<JobId> = m
        .jobs()
        .iter()
        .filter(|j| j.state == JobState::Queued)
        .map(|j| j.id)
        .collect();
    assert_eq!(queued, ids.to_vec(), "every accepted job is queued again");
    let next = m.submit(job("next", -5)).unwrap();
    assert!(next.id() > high.id(), "{} after {}", next.id(), high.id());
    let _w = Worker::start(certs.worker_config(port, 0, "w0")).unwrap();
    assert_eq!(next.wait().outcome, exited(0));
    wait_until("the restored jobs end", || ended(&m) == 4);
    assert_eq!(lines_of(&order), ["high", "a", "low", "next"]);
    assert!(m.jobs().is_empty());
    drop(m);

    // Their ends are journaled: a third start finds nothing to do.
    let m = journaled(&certs, port, &journal);
    assert!(m.jobs().is_empty(), "{:?}", m.jobs());
    drop(m);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_job_running_through_a_graceful_restart_goes_on_and_runs_once() {
    let dir = scratch("journal-running");
    let journal = dir.join("journal.sqlite");
    let certs = Certs::new(1);
    let log = dir.join("log");
    let go_on = dir.join("go-on");
    let m = journaled(&certs, 0, &journal);
    let port = m.local_addr().port();
    let w = Worker::start(certs.worker_config(port, 0, "w0")).unwrap();
    let script = format!(
        "echo start >> {log}; while [ ! -e {go} ]; do sleep 0.02; done; echo end >> {log}",
        log = log.display(),
        go = go_on.display()
    );
    let h = m.submit(JobSpec::new(script)).unwrap();
    let id = h.id();
    wait_until("the job starts", || lines_of(&log) == ["start"]);
    m.shutdown();
    // The handle hears that the manager stopped, not that the job ended.
    let r = h.wait();
    assert!(
        matches!(&r.outcome, workpool::job::Outcome::Rejected(why) if why.contains("journal")),
        "{:?}",
        r.outcome
    );
    drop(m);
    assert_eq!(lines_of(&log), ["start"], "the job was not killed");

    let m = journaled(&certs, port, &journal);
    wait_until("its worker claims it", || {
        matches!(m.job(id).map(|s| s.state), Some(JobState::Running { .. }))
    });
    std::fs::write(&go_on, "").unwrap();
    wait_until("the job ends", || m.job(id).is_none());
    assert_eq!(lines_of(&log), ["start", "end"], "it ran once");
    let stats = m.stats();
    let exited_count = stats.jobs_finished.iter().find(|(n, _)| *n == "exited");
    assert_eq!(exited_count.map(|(_, n)| *n), Some(1), "{stats:?}");
    drop(w);
    drop(m);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_journal_in_use_or_that_is_not_a_journal_is_refused_in_one_line() {
    let dir = scratch("journal-refused");
    let journal = dir.join("journal.sqlite");
    let certs = Certs::new(1);
    let m = journaled(&certs, 0, &journal);
    let second = Manager::bind(certs.manager_config().journal(&journal));
    let Err(Error::Journal(why)) = second else {
        panic!("a second manager on the journal: {:?}", second.err());
    };
    assert!(why.contains(&journal.display().to_string()), "{why}");
    assert!(!why.contains('\n'), "{why}");
    drop(m);

    let garbage = dir.join("garbage.sqlite");
    let junk = vec![0x5au8; 64 << 10];
    std::fs::write(&garbage, &junk).unwrap();
    let refused = Manager::bind(certs.manager_config().journal(&garbage));
    let Err(Error::Journal(why)) = refused else {
        panic!("a file that is not a journal: {:?}", refused.err());
    };
    assert!(
        why.contains("garbage.sqlite") && !why.contains('\n'),
        "{why}"
    );
    assert_eq!(std::fs::read(&garbage).unwrap(), junk, "left as it was");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn without_a_journal_nothing_is_written_and_stats_say_so() {
    let c = Cluster::new(1);
    assert_eq!(c.manager.stats().journal_bytes, None);
    assert!(!c.manager.stats().to_prometheus().contains("journal"));
    let config: ManagerConfig = Certs::new(1).manager_config();
    assert!(config.journal.is_none());
}

/// A remote client (certificate 1) of the manager at `port`.
fn client_config(certs: &Certs, port: u16) -> workpool::ClientConfig {
    use workpool::tls::{Identity, TrustRoots};
    let c = &certs.workers[1];
    let mut config = workpool::ClientConfig::new(
        "127.0.0.1",
        port,
        Identity::from_pem(c.cert_pem.as_bytes(), c.key_pem.as_bytes()).unwrap(),
        TrustRoots::from_pem(certs.manager.cert_pem.as_bytes()).unwrap(),
    )
    .name("journal-client");
    config.backoff_initial = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(200);
    config.reconnect_grace = Some(Duration::from_secs(60));
    config
}

/// A journaled manager that takes certificate 0 as a worker and 1 as a submitter.
fn journaled_for_submitters(certs: &Certs, port: u16, journal: &Path) -> Manager {
    let mut config = certs.submitters_manager_config().journal(journal);
    config.listen = format!("127.0.0.1:{port}");
    config.reconnect_grace = Duration::from_secs(60);
    Manager::bind(config).expect("the journaled manager starts")
}

#[test]
fn a_remote_submitter_follows_its_job_through_a_restart_with_every_byte_once_in_order() {
    use workpool::job::{JobEvent, Stream};
    let dir = scratch("journal-remote");
    let journal = dir.join("journal.sqlite");
    let flag = dir.join("second-half");
    let certs = Certs::new(2);
    let m = journaled_for_submitters(&certs, 0, &journal);
    let port = m.local_addr().port();
    let _w = Worker::start(certs.worker_config(port, 0, "w0")).unwrap();
    let client = workpool::Client::connect(client_config(&certs, port)).unwrap();
    let script = format!(
        "seq -f 'line-%g' 1 20000; while [ ! -e {f} ]; do sleep 0.02; done; seq -f 'line-%g' 20001 40000",
        f = flag.display()
    );
    let mut job = client.submit(JobSpec::new(script)).unwrap();
    let mut stdout = Vec::new();
    let first_half: Vec<u8> = (1..=20000)
        .flat_map(|i| format!("line-{i}\n").into_bytes())
        .collect();
    while stdout.len() < first_half.len() {
        match job.events().recv_timeout(DEADLINE).expect("output in time") {
            JobEvent::Output {
                stream: Stream::Stdout,
                bytes,
            } => stdout.extend_from_slice(&bytes),
            JobEvent::Finished(o) => panic!("ended before the restart: {o:?}"),
            _ => {}
        }
    }
    assert_eq!(stdout, first_half);
    drop(m);

    let m = journaled_for_submitters(&certs, port, &journal);
    std::fs::write(&flag, "").unwrap();
    let r = job.wait_timeout(DEADLINE).expect("the job ends in time");
    stdout.extend_from_slice(&r.stdout);
    let all: Vec<u8> = (1..=40000)
        .flat_map(|i| format!("line-{i}\n").into_bytes())
        .collect();
    assert_eq!(r.outcome, exited(0));
    assert!(
        stdout == all,
        "{} bytes, {} expected",
        stdout.len(),
        all.len()
    );
    // A job submitted after the restart has the next id.
    let next = client.submit(JobSpec::new("true")).unwrap();
    assert!(next.id() > job.id());
    assert_eq!(next.wait().outcome, exited(0));
    client.close();
    drop(m);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_job_that_ended_while_the_manager_was_down_is_acknowledged_so_its_worker_can_drain() {
    let dir = scratch("journal-ended-while-down");
    let journal = dir.join("journal.sqlite");
    let certs = Certs::new(1);
    let log = dir.join("log");
    let go_on = dir.join("go-on");
    let m = journaled(&certs, 0, &journal);
    let port = m.local_addr().port();
    let w = Worker::start(certs.worker_config(port, 0, "w0")).unwrap();
    let script = format!(
        "echo start >> {log}; while [ ! -e {go} ]; do sleep 0.02; done; echo end >> {log}",
        log = log.display(),
        go = go_on.display()
    );
    let id = m.submit(JobSpec::new(script)).unwrap().id();
    wait_until("the job starts", || lines_of(&log) == ["start"]);
    m.shutdown();
    drop(m);
    // The job ends while no manager is there: its worker keeps its end.
    std::fs::write(&go_on, "").unwrap();
    wait_until("the job ends", || lines_of(&log) == ["start", "end"]);

    let m = journaled(&certs, port, &journal);
    wait_until("its worker reports its end", || {
        m.stats().jobs_ended() == 1 && m.job(id).is_none()
    });
    // The worker was told `Ended`, so it holds nothing: a drain ends.
    w.drain(None);
    assert!(w.wait(DEADLINE), "the worker still holds the ended job");
    drop(m);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_submit_refused_as_the_manager_shuts_down_leaves_no_job_behind_in_the_journal() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let dir = scratch("journal-submit-shutdown");
    let certs = Certs::new(1);
    for trial in 0..10 {
        let journal = dir.join(format!("journal-{trial}.sqlite"));
        let m = Arc::new(journaled(&certs, 0, &journal));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let tries = Arc::new(AtomicUsize::new(0));
        let submitters: Vec<_> = (0..4)
            .map(|_| {
                let (m, accepted, tries) = (m.clone(), accepted.clone(), tries.clone());
                std::thread::spawn(move || {
                    loop {
                        tries.fetch_add(1, Ordering::Relaxed);
                        match m.submit(JobSpec::new("true")) {
                            Ok(h) => accepted.lock().unwrap().push(h.id()),
                            Err(Error::ShutDown) => return,
                            Err(e) => panic!("{e}"),
                        }
                    }
                })
            })
            .collect();
        wait_until("submits go on", || tries.load(Ordering::Relaxed) > 40);
        m.shutdown();
        for t in submitters {
            t.join().unwrap();
        }
        drop(m);
        // Whatever the journal holds was accepted: a refused submit left nothing.
        let m = journaled(&certs, 0, &journal);
        let mut kept: Vec<JobId> = m.jobs().iter().map(|j| j.id).collect();
        kept.sort();
        let mut accepted = accepted.lock().unwrap().clone();
        accepted.sort();
        assert_eq!(kept, accepted, "trial {trial}");
        drop(m);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_submitter_attached_to_a_detached_job_gets_its_output_once_through_a_restart() {
    use workpool::job::{JobEvent, Stream};
    let dir = scratch("journal-attached");
    let journal = dir.join("journal.sqlite");
    let printed = dir.join("printed");
    let flag = dir.join("go-on");
    let certs = Certs::new(2);
    let m = journaled_for_submitters(&certs, 0, &journal);
    let port = m.local_addr().port();
    let _w = Worker::start(certs.worker_config(port, 0, "w0")).unwrap();
    let client = workpool::Client::connect(client_config(&certs, port)).unwrap();
    let script = format!(
        "echo one; echo two; touch {p}; while [ ! -e {f} ]; do sleep 0.02; done; echo three",
        p = printed.display(),
        f = flag.display()
    );
    // Submitted detached, its handle let go at once: the client follows it no more.
    let id = client.submit(JobSpec::new(script).detached()).unwrap().id();
    wait_until("the job has written", || printed.exists());
    // Attached by the same client (whose session the journal knows, as the job's
    // submitter's): what the job kept, and nothing new yet.
    let mut attached = None;
    wait_until("the client attaches", || {
        attached = client.attach(id).ok();
        attached.is_some()
    });
    let mut job = attached.unwrap();
    let mut got = Vec::new();
    while got.len() < b"one\ntwo\n".len() {
        match job.events().recv_timeout(DEADLINE).expect("output in time") {
            JobEvent::Output {
                stream: Stream::Stdout,
                bytes,
            } => got.extend_from_slice(&bytes),
            JobEvent::Finished(o) => panic!("ended early: {o:?}"),
            _ => {}
        }
    }
    assert_eq!(got, b"one\ntwo\n");
    drop(m);

    let m = journaled_for_submitters(&certs, port, &journal);
    std::fs::write(&flag, "").unwrap();
    let r = job.wait_timeout(DEADLINE).expect("the job ends in time");
    assert_eq!(r.outcome, exited(0));
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "three\n",
        "what came after the restart: the rest, once"
    );
    client.close();
    drop(m);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Not met yet: the journal knows a remote session only through the jobs it submitted
/// (`Hub::restore`), so a session that only attached to a job is not restored, and a
/// restart ends its attachment with "contact with the manager was lost" although the
/// job runs on. Meeting it needs the journal to keep sessions (or attaches), or a
/// restarted manager to take back a session it does not know as restored.
#[test]
#[ignore = "a session that only attached to a job is not restored after a restart"]
fn a_submitter_attached_from_another_session_follows_the_job_through_a_restart() {
    use workpool::job::{JobEvent, Stream};
    let dir = scratch("journal-attached-elsewhere");
    let journal = dir.join("journal.sqlite");
    let flag = dir.join("go-on");
    let certs = Certs::new(2);
    let m = journaled_for_submitters(&certs, 0, &journal);
    let port = m.local_addr().port();
    let _w = Worker::start(certs.worker_config(port, 0, "w0")).unwrap();
    let submitter = workpool::Client::connect(client_config(&certs, port)).unwrap();
    let script = format!(
        "echo one; while [ ! -e {f} ]; do sleep 0.02; done; echo two",
        f = flag.display()
    );
    let id = submitter
        .submit(JobSpec::new(script).detached())
        .unwrap()
        .id();
    submitter.close();
    let client = workpool::Client::connect(client_config(&certs, port)).unwrap();
    let mut job = client.attach(id).unwrap();
    let mut got = Vec::new();
    while got != b"one\n" {
        match job.events().recv_timeout(DEADLINE).expect("output in time") {
            JobEvent::Output {
                stream: Stream::Stdout,
                bytes,
            } => got.extend_from_slice(&bytes),
            JobEvent::Finished(o) => panic!("ended early: {o:?}"),
            _ => {}
        }
    }
    drop(m);

    let m = journaled_for_submitters(&certs, port, &journal);
    std::fs::write(&flag, "").unwrap();
    let r = job.wait_timeout(DEADLINE).expect("the job ends in time");
    assert_eq!(r.outcome, exited(0));
    assert_eq!(String::from_utf8_lossy(&r.stdout), "two\n");
    client.close();
    drop(m);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_interactive_job_whose_in_process_submitter_is_gone_after_a_restart_gets_the_end_of_its_stdin()
{
    use std::io::Write;
    let dir = scratch("journal-interactive");
    let journal = dir.join("journal.sqlite");
    let certs = Certs::new(1);
    let log = dir.join("log");
    let m = journaled(&certs, 0, &journal);
    let port = m.local_addr().port();
    let _w = Worker::start(certs.worker_config(port, 0, "w0")).unwrap();
    // Reads its stdin to its end.
    let script = format!("cat >> {}; echo end >> {}", log.display(), log.display());
    let h = m.submit(JobSpec::new(script).interactive()).unwrap();
    let id = h.id();
    let mut stdin = h.stdin().unwrap();
    stdin.write_all(b"one\n").unwrap();
    stdin.flush().unwrap();
    wait_until("the job reads", || lines_of(&log) == ["one"]);
    m.shutdown();
    drop(m);

    // Its writer was in the old process: nobody can write to it or end its stdin now.
    let m = journaled(&certs, port, &journal);
    wait_until("the job ends", || m.job(id).is_none());
    assert_eq!(lines_of(&log), ["one", "end"]);
    drop(m);
    std::fs::remove_dir_all(dir).unwrap();
}
