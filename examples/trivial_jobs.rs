//! A fixed run of trivial jobs (`true`) through a manager and one worker in this one
//! process, over mutual TLS on loopback: the workload for counting instructions per job,
//! a figure that repeats from run to run on a busy machine where timings do not.
//!
//! ```text
//! cargo build --release --example trivial_jobs
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.220 target/release/examples/trivial_jobs 220
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.20  target/release/examples/trivial_jobs 20
//! # instructions per job, manager + worker (start-up and shutdown cancel out):
//! #   (Ir of the 220-job run − Ir of the 20-job run) / 200
//! ```
//!
//! Arguments: `JOBS [SLOTS [all]]`: how many jobs, the worker's slots (1), and `all` to
//! submit them all at once (by default each is submitted when the one before ended).
//! The jobs' own processes (bash) are not counted: callgrind follows this process only.
//! Under valgrind the executor cannot use a pidfd and polls the job every 50 ms, so
//! runs take a while; the instruction count is what to read, not the time.

use std::time::{Duration, Instant};
use workpool::job::{JobSpec, Outcome};
use workpool::manager::{Manager, ManagerConfig, ManagerEvent};
use workpool::tls::{Identity, TrustRoots, generate_self_signed};
use workpool::worker::{Worker, WorkerConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let jobs: usize = args.first().map_or(100, |a| a.parse().expect("JOBS"));
    let slots: u32 = args.get(1).map_or(1, |a| a.parse().expect("SLOTS"));
    let all_at_once = args.get(2).is_some_and(|a| a == "all");
    let host = generate_self_signed(&["127.0.0.1"]).unwrap();
    let worker = generate_self_signed(&["w"]).unwrap();
    let id = |g: &workpool::tls::GeneratedCertificate| {
        Identity::from_pem(g.cert_pem.as_bytes(), g.key_pem.as_bytes()).unwrap()
    };
    let trust = |g: &workpool::tls::GeneratedCertificate| {
        TrustRoots::from_pem(g.cert_pem.as_bytes()).unwrap()
    };
    let mut config = ManagerConfig::new("127.0.0.1:0", id(&host), trust(&worker));
    config.shutdown_grace = Duration::ZERO;
    let manager = Manager::bind(config).unwrap();
    let events = manager.subscribe();
    let _worker = Worker::start(
        WorkerConfig::new(
            "127.0.0.1",
            manager.local_addr().port(),
            id(&worker),
            trust(&host),
        )
        .name("w")
        .slots(slots),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match events.recv_deadline(deadline) {
            Ok(ManagerEvent::WorkerJoined(_)) => break,
            Ok(_) => {}
            Err(_) => panic!("the worker did not join"),
        }
    }
    let t = Instant::now();
    if all_at_once {
        let handles: Vec<_> = (0..jobs)
            .map(|_| manager.submit(JobSpec::new("true")).unwrap())
            .collect();
        for h in handles {
            assert_eq!(h.wait().outcome, Outcome::Exited(0));
        }
    } else {
        for _ in 0..jobs {
            let h = manager.submit(JobSpec::new("true")).unwrap();
            assert_eq!(h.wait().outcome, Outcome::Exited(0));
        }
    }
    let took = t.elapsed();
    manager.shutdown();
    println!(
        "{jobs} jobs, {slots} slot(s), {}: {:.3} s ({:.0} µs per job)",
        if all_at_once {
            "submitted at once"
        } else {
            "one at a time"
        },
        took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / jobs as f64
    );
}
