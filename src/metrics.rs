//! What a manager counts, and how it is shown: lock-free counters that the job sinks and
//! link readers bump, histograms the dispatcher fills, the [`Stats`] snapshot, and its
//! Prometheus text form. Also the optional `GET /metrics` endpoint (plain HTTP on
//! `std::net`), which never touches scheduling state except through a stats query.

use crate::job::Outcome;
use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The outcome names, in the order of the counters.
pub const OUTCOMES: [&str; 7] = [
    "exited",
    "signaled",
    "timed_out",
    "cancelled",
    "worker_lost",
    "rejected",
    "spawn_failed",
];

fn outcome_index(o: &Outcome) -> usize {
    OUTCOMES.iter().position(|n| *n == o.name()).unwrap_or(0)
}

/// Counters shared by the threads that see jobs end and bytes pass.
#[derive(Default)]
pub(crate) struct Counters {
    pub submitted: AtomicU64,
    finished: [AtomicU64; 7],
    pub output_bytes: AtomicU64,
}

impl Counters {
    pub(crate) fn finished(&self, o: &Outcome) {
        self.finished[outcome_index(o)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn finished_by_outcome(&self) -> Vec<(&'static str, u64)> {
        OUTCOMES
            .iter()
            .zip(&self.finished)
            .map(|(n, c)| (*n, c.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Upper bounds of the histogram buckets, in seconds: 1 µs to 100 s, three per decade.
const BOUNDS: [f64; 25] = [
    1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1,
    0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0,
];

/// A histogram of durations with fixed buckets (see `BOUNDS`), as Prometheus has them.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last counts those above 100 s.
    pub counts: [u64; 26],
    /// How many observations.
    pub count: u64,
    /// Their sum, in seconds.
    pub sum: f64,
}

impl Histogram {
    /// Adds one observation.
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BOUNDS.iter().position(|b| s <= *b).unwrap_or(BOUNDS.len());
        self.counts[i] += 1;
        self.count += 1;
        self.sum += s;
    }

    /// The value below which a fraction `q` (0..=1) of observations fall, as the upper
    /// bound of its bucket; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let want = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                // Above the last bound: report the last bound (a lower limit).
                return Some(Duration::from_secs_f64(BOUNDS[i.min(BOUNDS.len() - 1)]));
            }
        }
        None
    }
}

/// A worker, as the stats see it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorkerStats {
    /// Its name.
    pub name: String,
    /// Jobs it has been given since it connected.
    pub jobs_run: u64,
    /// Jobs it runs now.
    pub running: usize,
    /// Its slots.
    pub slots: u32,
    /// Whether it is draining.
    pub draining: bool,
    /// How long since the manager last heard from it (any frame, heartbeats included).
    pub last_heard: Duration,
    /// How long it has been connected.
    pub connected_for: Duration,
}

/// A snapshot of a manager (see `Manager::stats`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// Connected workers.
    pub workers: usize,
    /// Of which draining.
    pub workers_draining: usize,
    /// Slots of the connected workers.
    pub slots_total: usize,
    /// Of which running a job.
    pub slots_busy: usize,
    /// Jobs waiting for a worker.
    pub jobs_queued: usize,
    /// Jobs running (including those whose worker is reconnecting).
    pub jobs_running: usize,
    /// Jobs whose worker is reconnecting.
    pub jobs_disconnected: usize,
    /// Jobs accepted since the manager started.
    pub jobs_submitted: u64,
    /// Jobs ended, by outcome name (`exited`, `worker_lost`, ...).
    #[serde(with = "outcome_counts")]
    pub jobs_finished: Vec<(&'static str, u64)>,
    /// How long the longest-waiting queued job has waited.
    pub oldest_queued_wait: Option<Duration>,
    /// Time from submission (or re-queueing) to start, for every started job.
    pub queue_wait: Histogram,
    /// Time from submission to the job's `Run` being handed to its worker's link, for jobs
    /// that found a free worker at once.
    pub dispatch_latency: Histogram,
    /// Output bytes received from workers.
    pub output_bytes: u64,
    /// Per connected worker.
    pub per_worker: Vec<WorkerStats>,
    /// Bytes the manager's journal takes on disk (its database and write-ahead log);
    /// `None` without a journal.
    #[serde(default)]
    pub journal_bytes: Option<u64>,
}

impl Stats {
    /// Total of `jobs_finished`.
    pub fn jobs_ended(&self) -> u64 {
        self.jobs_finished.iter().map(|(_, n)| n).sum()
    }

    /// The Prometheus text exposition (version 0.0.4) of the snapshot.
    pub fn to_prometheus(&self) -> String {
        let mut o = String::new();
        let mut gauge = |name: &str, help: &str, value: String| {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            "workpool_workers",
            "Connected workers.",
            self.workers.to_string(),
        );
        gauge(
            "workpool_workers_draining",
            "Connected workers that are draining.",
            self.workers_draining.to_string(),
        );
        gauge(
            "workpool_slots",
            "Slots of the connected workers.",
            self.slots_total.to_string(),
        );
        gauge(
            "workpool_slots_busy",
            "Slots running a job.",
            self.slots_busy.to_string(),
        );
        gauge(
            "workpool_jobs_queued",
            "Jobs waiting for a worker.",
            self.jobs_queued.to_string(),
        );
        gauge(
            "workpool_jobs_running",
            "Jobs running, including those whose worker is reconnecting.",
            self.jobs_running.to_string(),
        );
        gauge(
            "workpool_jobs_disconnected",
            "Running jobs whose worker is reconnecting.",
            self.jobs_disconnected.to_string(),
        );
        if let Some(bytes) = self.journal_bytes {
            gauge(
                "workpool_journal_bytes",
                "Bytes the manager's journal takes on disk.",
                bytes.to_string(),
            );
        }
        gauge(
            "workpool_oldest_queued_job_wait_seconds",
            "How long the longest-waiting queued job has waited (0 when none waits).",
            format!(
                "{}",
                self.oldest_queued_wait.map_or(0.0, |d| d.as_secs_f64())
            ),
        );
        let _ = writeln!(
            o,
            "# HELP workpool_jobs_submitted_total Jobs accepted.\n# TYPE workpool_jobs_submitted_total counter"
        );
        let _ = writeln!(o, "workpool_jobs_submitted_total {}", self.jobs_submitted);
        let _ = writeln!(
            o,
            "# HELP workpool_jobs_finished_total Jobs ended, by outcome.\n# TYPE workpool_jobs_finished_total counter"
        );
        for (outcome, n) in &self.jobs_finished {
            let _ = writeln!(
                o,
                "workpool_jobs_finished_total{{outcome=\"{outcome}\"}} {n}"
            );
        }
        let _ = writeln!(
            o,
            "# HELP workpool_output_bytes_total Job output bytes received from workers.\n# TYPE workpool_output_bytes_total counter"
        );
        let _ = writeln!(o, "workpool_output_bytes_total {}", self.output_bytes);
        histogram(
            &mut o,
            "workpool_queue_wait_seconds",
            "Time from submission to start.",
            &self.queue_wait,
        );
        histogram(
            &mut o,
            "workpool_dispatch_latency_seconds",
            "Time from submission to the job being handed to a free worker's link.",
            &self.dispatch_latency,
        );
        let per: [(&str, &str, WorkerValue); 4] = [
            (
                "workpool_worker_running_jobs",
                "Jobs a worker runs now.",
                |w| w.running.to_string(),
            ),
            (
                "workpool_worker_jobs_total",
                "Jobs a worker was given since it connected.",
                |w| w.jobs_run.to_string(),
            ),
            (
                "workpool_worker_last_heard_seconds",
                "Seconds since the manager last heard from a worker.",
                |w| format!("{:.3}", w.last_heard.as_secs_f64()),
            ),
            (
                "workpool_worker_connected_seconds",
                "Seconds a worker has been connected.",
                |w| format!("{:.3}", w.connected_for.as_secs_f64()),
            ),
        ];
        for (name, help, value) in per {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for w in &self.per_worker {
                let _ = writeln!(
                    o,
                    "{name}{{worker=\"{}\"}} {}",
                    escape_label(&w.name),
                    value(w)
                );
            }
        }
        o
    }
}

/// How one per-worker metric is read off a worker.
type WorkerValue = fn(&WorkerStats) -> String;

fn histogram(o: &mut String, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (i, b) in BOUNDS.iter().enumerate() {
        cumulative += h.counts[i];
        let _ = writeln!(o, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
    }
    let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(o, "{name}_sum {}", h.sum);
    let _ = writeln!(o, "{name}_count {}", h.count);
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The most metrics requests handled at once; more are closed at once.
const MAX_CLIENTS: usize = 16;
/// A request head must arrive whole within this long, and the response must be taken
/// within this long again.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Largest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// The `GET /metrics` endpoint: one acceptor thread, one short-lived thread per request.
pub(crate) struct MetricsServer {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsServer {
    pub(crate) fn start(
        addr: &str,
        snapshot: Arc<dyn Fn() -> Option<Stats> + Send + Sync>,
    ) -> std::io::Result<MetricsServer> {
        let listener = Arc::new(TcpListener::bind(addr)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (listener.clone(), stop.clone());
        let clients = Arc::new(AtomicUsize::new(0));
        let thread = crate::thread::relay("wp-metrics", move || {
            for conn in l.incoming() {
                if s.load(Ordering::Acquire) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                    clients.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
                let (snap, c) = (snapshot.clone(), clients.clone());
                let spawned = crate::thread::relay("wp-metrics-client", move || {
                    serve(conn, &*snap);
                    c.fetch_sub(1, Ordering::AcqRel);
                });
                if spawned.is_err() {
                    clients.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })?;
        Ok(MetricsServer {
            listener,
            stop,
            thread: Some(thread),
        })
    }

    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        crate::net::wake_acceptor(&self.listener, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut conn: TcpStream, snapshot: &dyn Fn() -> Option<Stats>) {
    // One absolute deadline for the whole request head, however its bytes are spaced:
    // each read gets the time left.
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() > MAX_REQUEST {
            return respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "request too large\n",
            );
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return respond(&mut conn, "408 Request Timeout", "request too slow\n");
        }
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            // A timeout may end a little before the deadline (the kernel counts in ticks):
            // the loop reads again with what is left, or answers 408.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Interrupted | ErrorKind::WouldBlock | ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (method, path, version) = (parts.next(), parts.next(), parts.next());
    match (method, path, version) {
        (Some("GET"), Some("/metrics"), Some(v)) if v.starts_with("HTTP/1.") => match snapshot() {
            Some(stats) => {
                let body = stats.to_prometheus();
                send(
                    &mut conn,
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
            None => respond(
                &mut conn,
                "503 Service Unavailable",
                "the manager is shutting down\n",
            ),
        },
        (Some("GET"), Some(_), Some(v)) if v.starts_with("HTTP/1.") => {
            respond(&mut conn, "404 Not Found", "only /metrics is here\n")
        }
        (Some(_), Some(_), Some(v)) if v.starts_with("HTTP/1.") => {
            respond(&mut conn, "405 Method Not Allowed", "only GET\n")
        }
        _ => respond(&mut conn, "400 Bad Request", "not an HTTP request\n"),
    }
}

fn respond(conn: &mut TcpStream, status: &str, body: &str) {
    send(
        conn,
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}

/// Sends a response within `REQUEST_DEADLINE`, however slowly the client reads: each
/// write gets the time left, and what is not sent by then is dropped with the connection.
fn send(conn: &mut TcpStream, mut bytes: &[u8]) {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_write_timeout(Some(left)).is_err() {
            return;
        }
        match conn.write(bytes) {
            Ok(n) if n > 0 => bytes = &bytes[n..],
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Interrupted | ErrorKind::WouldBlock | ErrorKind::TimedOut
                ) => {}
            Ok(_) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let mut h = Histogram::default();
        for us in [3, 40, 40, 900, 900, 900, 2_000_000] {
            h.observe(Duration::from_micros(us));
        }
        assert_eq!(h.count, 7);
        assert_eq!(h.quantile(0.5), Some(Duration::from_micros(1000)));
        assert_eq!(h.quantile(0.0), Some(Duration::from_micros(5)));
        assert_eq!(h.quantile(1.0), Some(Duration::from_secs(2)));
        assert!((h.sum - 2.002_783).abs() < 1e-9);
    }
}

/// `Stats::jobs_finished` on the wire: the names as strings, read back as the known
/// outcome names (a name this build does not know is counted under `unknown`).
mod outcome_counts {
    use super::OUTCOMES;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(
        v: &[(&'static str, u64)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(&'static str, u64)>, D::Error> {
        let named: Vec<(String, u64)> = Vec::deserialize(d)?;
        Ok(named
            .into_iter()
            .map(|(name, n)| {
                let known = OUTCOMES.iter().find(|o| **o == name).copied();
                (known.unwrap_or("unknown"), n)
            })
            .collect())
    }
}
