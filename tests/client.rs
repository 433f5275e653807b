//! Remote clients end to end: a real manager and worker on loopback, clients with
//! their own certificates, jobs submitted and followed over the wire; a relay that cuts
//! a client's connection mid-stream.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use workpool::job::{JobEvent, JobId, JobSpec, Outcome, Stream};
use workpool::manager::{Manager, ManagerConfig};
use workpool::tls::{Identity, TrustRoots};
use workpool::worker::Worker;
use workpool::{Client, ClientConfig, Error};

/// A manager with one worker (certificate 0, `slots` slots); certificates 1 and on are
/// for clients, trusted as submitters only.
struct Pool {
    certs: Certs,
    manager: Manager,
    _worker: Worker,
}

fn pool(slots: u32, clients: usize, m: impl FnOnce(&mut ManagerConfig)) -> Pool {
    let certs = Certs::new(1 + clients);
    // Certificate 0 may only take jobs; the others may only submit them.
    let mut config = certs.submitters_manager_config();
    config.reconnect_grace = Duration::from_secs(30);
    m(&mut config);
    let (manager, worker) = certs.manager_and_worker(config, slots);
    Pool {
        certs,
        manager,
        _worker: worker,
    }
}

impl Pool {
    /// A client with certificate `i` (1 and on) of the manager at `port`.
    fn client_config(&self, port: u16, i: usize) -> ClientConfig {
        let c = &self.certs.workers[i];
        let mut config = ClientConfig::new(
            "127.0.0.1",
            port,
            Identity::from_pem(c.cert_pem.as_bytes(), c.key_pem.as_bytes()).unwrap(),
            TrustRoots::from_pem(self.certs.manager.cert_pem.as_bytes()).unwrap(),
        )
        .name(format!("client-{i}"));
        config.backoff_initial = Duration::from_millis(20);
        config.backoff_max = Duration::from_millis(200);
        config
    }

    fn client(&self, i: usize) -> Client {
        Client::connect(self.client_config(self.manager.local_addr().port(), i)).unwrap()
    }
}

#[test]
fn a_job_s_two_streams_and_its_exit_code_come_back() {
    let p = pool(1, 1, |_| {});
    let client = p.client(1);
    let job = client
        .submit(JobSpec::new("echo out; echo err >&2; exit 7"))
        .unwrap();
    let mut events = Vec::new();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        let ev = next_event(job.events());
        match &ev {
            JobEvent::Output {
                stream: Stream::Stdout,
                bytes,
            } => out.extend_from_slice(bytes),
            JobEvent::Output {
                stream: Stream::Stderr,
                bytes,
            } => err.extend_from_slice(bytes),
            _ => {}
        }
        let end = matches!(ev, JobEvent::Finished(_));
        events.push(ev);
        if end {
            break;
        }
    }
    assert_eq!((&out[..], &err[..]), (&b"out\n"[..], &b"err\n"[..]));
    assert_eq!(events.last(), Some(&JobEvent::Finished(Outcome::Exited(7))));
    assert!(
        matches!(events.iter().find(|e| matches!(e, JobEvent::Started { .. })), Some(JobEvent::Started { worker }) if worker == "w0"),
        "{events:?}"
    );
    // Nothing follows the end: the channel is closed.
    assert!(job.events().recv_timeout(DEADLINE).is_err());
    // And the same through wait().
    let r = client
        .submit(JobSpec::new("echo out; echo err >&2; exit 7"))
        .unwrap()
        .wait();
    assert_eq!(
        (r.stdout_text(), r.stderr_text(), r.outcome, r.attempts),
        ("out\n".into(), "err\n".into(), Outcome::Exited(7), 1)
    );
    client.close();
}

#[test]
fn two_clients_submitting_at_once_each_see_exactly_their_own_jobs() {
    const EACH: usize = 25;
    let p = pool(4, 2, |_| {});
    let runs: Vec<_> = [1, 2]
        .map(|i| {
            let client = p.client(i);
            std::thread::spawn(move || {
                let jobs: Vec<_> = (0..EACH)
                    .map(|k| {
                        client
                            .submit(JobSpec::new(format!(
                                "echo client {i} job {k} $WORKPOOL_JOB_ID"
                            )))
                            .unwrap()
                    })
                    .collect();
                let mut seen = Vec::new();
                for (k, job) in jobs.into_iter().enumerate() {
                    let id = job.id();
                    let r = job.wait();
                    assert_eq!(r.outcome, Outcome::Exited(0));
                    assert_eq!(r.stdout_text(), format!("client {i} job {k} {id}\n"));
                    seen.push(id);
                }
                client.close();
                seen
            })
        })
        .into_iter()
        .collect();
    let ids: Vec<Vec<JobId>> = runs.into_iter().map(|t| t.join().unwrap()).collect();
    let all: BTreeSet<JobId> = ids.iter().flatten().copied().collect();
    assert_eq!(all.len(), 2 * EACH, "no job is seen by both");
}

#[test]
fn many_jobs_in_flight_on_one_connection_each_end_once_with_its_own_output() {
    const JOBS: usize = 300;
    let p = pool(8, 1, |_| {});
    let client = p.client(1);
    let jobs: Vec<_> = (0..JOBS)
        .map(|k| {
            client
                .submit(JobSpec::new(format!("echo job {k}")))
                .unwrap()
        })
        .collect();
    for (k, job) in jobs.into_iter().enumerate() {
        let mut job = job;
        let r = job.wait_timeout(DEADLINE).expect("ended");
        assert_eq!(r.outcome, Outcome::Exited(0));
        assert_eq!(r.stdout_text(), format!("job {k}\n"));
    }
    let stats = client.stats().unwrap();
    assert!(stats.jobs_submitted >= JOBS as u64, "{stats:?}");
    assert!(client.jobs().unwrap().is_empty());
    assert_eq!(
        client
            .workers()
            .unwrap()
            .iter()
            .map(|w| &w.name[..])
            .collect::<Vec<_>>(),
        vec!["w0"]
    );
    // An empty array is refused before anything is sent.
    assert!(matches!(
        client.submit_array(JobSpec::new("true"), 5, 4),
        Err(Error::InvalidJob(_))
    ));
}

#[test]
fn an_array_s_jobs_come_back_in_index_order_each_with_its_index() {
    const ARRAY: u64 = 300;
    let p = pool(8, 1, |_| {});
    let client = p.client(1);
    let array = client
        .submit_array(JobSpec::new("echo index $WORKPOOL_ARRAY_INDEX"), 1, ARRAY)
        .unwrap();
    assert_eq!(array.len() as u64, ARRAY);
    for (i, job) in array.into_iter().enumerate() {
        let r = job.wait();
        assert_eq!(r.outcome, Outcome::Exited(0));
        assert_eq!(r.stdout_text(), format!("index {}\n", i + 1));
    }
}

#[test]
fn a_relay_cut_keeps_every_output_byte_once_and_in_order() {
    const LINES: u32 = 400;
    let p = pool(1, 1, |_| {});
    let relay = Relay::start(p.manager.local_addr());
    let client = Client::connect(p.client_config(relay.port, 1)).unwrap();
    let job = client
        .submit(JobSpec::new(format!(
            "for i in $(seq 1 {LINES}); do echo line $i; sleep 0.003; done"
        )))
        .unwrap();
    let mut seen = Vec::new();
    let mut cuts = 0;
    let mut ends = Vec::new();
    let until = Instant::now() + DEADLINE;
    while ends.is_empty() {
        assert!(Instant::now() < until, "no end");
        match next_event(job.events()) {
            JobEvent::Output { bytes, .. } => seen.extend(bytes),
            JobEvent::Finished(o) => ends.push(o),
            _ => {}
        }
        let lines = seen.iter().filter(|&&b| b == b'\n').count();
        if (cuts == 0 && lines >= 100) || (cuts == 1 && lines >= 250) {
            relay.cut();
            cuts += 1;
        }
    }
    let (rest, more_ends, _) = drain_job(job.events());
    assert!(
        rest.is_empty() && more_ends.is_empty(),
        "nothing after the end"
    );
    let want: String = (1..=LINES).map(|i| format!("line {i}\n")).collect();
    assert_eq!(ends, vec![Outcome::Exited(0)]);
    assert_eq!(
        String::from_utf8(seen).unwrap(),
        want,
        "every byte once, in order"
    );
    assert_eq!(ends, vec![Outcome::Exited(0)]);
    assert_eq!(cuts, 2);
    // The session goes on: requests are answered after the cuts.
    assert!(client.jobs().unwrap().is_empty());
}

#[test]
fn cancel_job_and_attach_act_on_the_client_s_own_jobs_only() {
    let p = pool(2, 2, |_| {});
    let (mine, theirs) = (p.client(1), p.client(2));
    let job = mine.submit(JobSpec::new("echo started; sleep 60")).unwrap();
    let id = job.id();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("started") {
        if let JobEvent::Output { bytes, .. } = next_event(job.events()) {
            seen.extend(bytes);
        }
    }
    let status = mine.job(id).unwrap().expect("running");
    assert_eq!(status.script, "echo started; sleep 60");
    // Another certificate sees that it exists, not its script, and cannot touch it.
    let listed = theirs.jobs().unwrap();
    assert!(
        listed.iter().any(|j| j.id == id && j.script.is_empty()),
        "{listed:?}"
    );
    assert!(matches!(theirs.cancel(id), Err(Error::NotPermitted(_))));
    assert!(matches!(theirs.attach(id), Err(Error::NotPermitted(_))));
    // The client that follows it cannot follow it twice (the first would lose its
    // events); its own handle goes on.
    assert!(matches!(mine.attach(id), Err(Error::InvalidJob(_))));
    assert!(matches!(
        mine.cancel(JobId(999_999)),
        Err(Error::UnknownJob(999_999))
    ));
    mine.cancel(id).unwrap();
    let (_, ends, _) = drain_job(job.events());
    assert_eq!(ends, vec![Outcome::Cancelled]);
    assert_eq!(mine.job(id).unwrap(), None);
}

#[test]
fn closing_a_client_cancels_its_attached_jobs_and_not_its_detached_ones() {
    let p = pool(2, 2, |_| {});
    let client = p.client(1);
    let attached = client.submit(JobSpec::new("sleep 60")).unwrap().id();
    let detached = client
        .submit(JobSpec::new("sleep 1; echo still here").detached())
        .unwrap()
        .id();
    let watcher = p.client(2);
    wait_until("both running", || {
        watcher
            .jobs()
            .unwrap()
            .iter()
            .filter(|j| matches!(j.state, workpool::JobState::Running { .. }))
            .count()
            == 2
    });
    client.close();
    wait_until("the attached job cancelled", || {
        watcher.job(attached).unwrap().is_none()
    });
    // The detached one runs on, and the same certificate can attach to it later.
    let again = p.client(1);
    let r = again.attach(detached).unwrap().wait();
    assert_eq!(r.outcome, Outcome::Exited(0));
    assert_eq!(r.stdout_text(), "still here\n");
}

/// The threads of this process with this name.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

#[test]
fn jobs_queued_while_a_reader_is_behind_do_not_take_a_thread_each() {
    const ARRAY: u64 = 400;
    let p = pool(1, 1, |_| {});
    let client = p.client(1);
    // A job whose events nobody reads fills the session's window and is paused.
    let _unread = client
        .submit(JobSpec::new("head -c 30000000 /dev/zero"))
        .unwrap();
    wait_until("the unread job paused", || {
        p.manager.jobs().iter().any(|j| j.output_paused)
    });
    // Jobs that stay queued (no worker has the tag): their `Queued` comes while the
    // window is full.
    let array = client
        .submit_array(JobSpec::new("true").require_tag("nowhere"), 1, ARRAY)
        .unwrap();
    assert_eq!(array.len() as u64, ARRAY);
    wait_until("the array queued", || {
        p.manager.jobs().len() == ARRAY as usize + 1
    });
    let delivering = threads_named("wp-deliver");
    assert!(
        delivering < ARRAY as usize / 4,
        "{delivering} delivery threads for {ARRAY} queued jobs"
    );
}

#[test]
fn a_large_answer_is_acknowledged_before_the_next_request_and_the_link_stays_up() {
    const ARRAY: u64 = 9000;
    let p = pool(1, 1, |_| {});
    let relay = Relay::start(p.manager.local_addr());
    let mut config = p.client_config(relay.port, 1);
    config.reconnect_grace = Some(Duration::from_secs(2));
    let client = Client::connect(config).unwrap();
    // From now on the client cannot come back if its link is closed.
    relay.refuse(true);
    // Queued jobs of its own, listed with their scripts: an answer of about 9 MiB.
    let script = format!("true {}", "x".repeat(2000));
    let _array = client
        .submit_array(JobSpec::new(script).require_tag("nowhere"), 1, ARRAY)
        .unwrap();
    wait_until("the array queued", || {
        p.manager.jobs().len() == ARRAY as usize
    });
    assert_eq!(client.jobs().unwrap().len(), ARRAY as usize);
    // The next request finds the manager holding that answer unacknowledged, unless
    // the client said it has it.
    let stats = client.stats();
    assert!(stats.is_ok(), "{stats:?}");
    assert!(client.is_connected());
}

#[test]
fn an_array_whose_copies_of_its_spec_add_up_past_the_limit_is_refused() {
    let p = pool(1, 1, |_| {});
    let client = p.client(1);
    // One request of 4 MiB, which would be 300 jobs of 4 MiB each in the manager.
    let spec = JobSpec::new(format!("true {}", "x".repeat(4 << 20))).require_tag("nowhere");
    let refused = client.submit_array(spec, 1, 300);
    assert!(
        matches!(&refused, Err(Error::InvalidJob(why)) if why.contains("array")),
        "{:?}",
        refused.as_ref().map(|jobs| jobs.len())
    );
    assert!(p.manager.jobs().is_empty());
    // A smaller array of the same spec is taken.
    let spec = JobSpec::new(format!("true {}", "x".repeat(4 << 20))).require_tag("nowhere");
    assert_eq!(client.submit_array(spec, 1, 3).unwrap().len(), 3);
}
