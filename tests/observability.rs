//! Stats and the Prometheus endpoint: the numbers move as jobs run, the endpoint parses as
//! Prometheus text, and bad or slow requests get an error without hurting the manager.

mod common;

use common::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use workpool::job::{JobEvent, JobSpec};

fn http(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(request).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Parses Prometheus text: every sample line is `name{labels} value`; returns them.
fn parse_prometheus(body: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut p = rest.split(' ');
            let (name, kind) = (p.next().unwrap(), p.next().unwrap());
            assert!(["gauge", "counter", "histogram"].contains(&kind), "{line}");
            assert!(name.starts_with("workpool_"), "{line}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "a counter without _total: {line}");
            }
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = key.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
        assert!(
            typed.contains(name) || typed.contains(family),
            "no TYPE before {line}"
        );
        let labels = &key[name.len()..];
        assert!(
            labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
            "{line}"
        );
        samples.insert(key.to_string(), value);
    }
    samples
}

#[test]
fn stats_move_as_jobs_queue_run_and_end() {
    let c = Cluster::new(1);
    let dir = scratch("stats");
    let flag = dir.join("go");
    let a = c
        .manager
        .submit(JobSpec::new(format!(
            "echo 12345; while [ ! -e {} ]; do sleep 0.02; done",
            flag.display()
        )))
        .unwrap();
    while !matches!(next_event(a.events()), JobEvent::Output { .. }) {}
    let b = c.manager.submit(JobSpec::new("echo b")).unwrap();
    let s = c.manager.stats();
    assert_eq!((s.workers, s.slots_total, s.slots_busy), (1, 1, 1));
    assert_eq!((s.jobs_queued, s.jobs_running, s.jobs_submitted), (1, 1, 2));
    assert!(s.oldest_queued_wait.is_some());
    assert_eq!(s.jobs_ended(), 0);
    assert_eq!(s.per_worker[0].name, "w0");
    assert!(s.per_worker[0].last_heard < Duration::from_secs(5));
    std::fs::write(&flag, "").unwrap();
    assert_eq!(b.wait().outcome, exited(0));
    let _ = a.events().iter().count();
    let s = c.manager.stats();
    assert_eq!((s.jobs_queued, s.jobs_running, s.slots_busy), (0, 0, 0));
    assert_eq!(
        s.jobs_finished
            .iter()
            .find(|(n, _)| *n == "exited")
            .unwrap()
            .1,
        2
    );
    assert_eq!(s.jobs_ended(), 2);
    assert_eq!(s.queue_wait.count, 2);
    assert_eq!(
        s.dispatch_latency.count, 1,
        "one job found a free worker at once"
    );
    assert_eq!(s.output_bytes, "12345\nb\n".len() as u64);
    assert_eq!(s.per_worker[0].jobs_run, 2);
    assert!(s.oldest_queued_wait.is_none());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_endpoint_serves_prometheus_text_that_matches_the_stats() {
    let c = Cluster::custom(1, |m| m.metrics_addr = Some("127.0.0.1:0".into()), |_, w| w);
    for _ in 0..3 {
        assert_eq!(run(&c.manager, JobSpec::new("true")).outcome, exited(0));
    }
    let _queued = c
        .manager
        .submit(JobSpec::new("true").require_tag("nobody"))
        .unwrap();
    let addr = c.manager.metrics_addr().unwrap();
    let response = http(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"));
    let m = parse_prometheus(body);
    assert_eq!(m["workpool_workers"], 1.0);
    assert_eq!(m["workpool_jobs_queued"], 1.0);
    assert_eq!(m["workpool_jobs_running"], 0.0);
    assert_eq!(m["workpool_jobs_submitted_total"], 4.0);
    assert_eq!(m["workpool_jobs_finished_total{outcome=\"exited\"}"], 3.0);
    assert_eq!(
        m["workpool_jobs_finished_total{outcome=\"worker_lost\"}"],
        0.0
    );
    assert_eq!(m["workpool_queue_wait_seconds_count"], 3.0);
    assert_eq!(m["workpool_queue_wait_seconds_bucket{le=\"+Inf\"}"], 3.0);
    assert!(m["workpool_oldest_queued_job_wait_seconds"] >= 0.0);
    assert_eq!(m["workpool_worker_jobs_total{worker=\"w0\"}"], 3.0);
}

#[test]
fn bad_and_slow_requests_get_errors_and_do_not_block_others() {
    let c = Cluster::custom(0, |m| m.metrics_addr = Some("127.0.0.1:0".into()), |_, w| w);
    let addr = c.manager.metrics_addr().unwrap();
    assert!(http(addr, b"hello there\r\n\r\n").starts_with("HTTP/1.1 400"));
    assert!(http(addr, b"GET /secrets HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(http(addr, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    assert!(http(addr, huge.as_bytes()).starts_with("HTTP/1.1 431"));
    // A client that sends half a request and stalls holds no one else up.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /met").unwrap();
    assert!(http(addr, b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
    // And it is let go at the request deadline, told why.
    slow.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut rest = String::new();
    let _ = slow.read_to_string(&mut rest);
    assert!(rest.starts_with("HTTP/1.1 408"), "{rest}");
    // The manager itself is unaffected.
    assert_eq!(c.manager.stats().workers, 0);
}
