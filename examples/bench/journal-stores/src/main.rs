//! Durable records per second through one group-committing writer thread, for the two
//! embedded stores considered for workpool's journal: SQLite (rusqlite, bundled, WAL,
//! `synchronous=FULL`) and redb (`Durability::Immediate`).
//!
//! Both get the same record mix as the manager writes (a job `Accepted` with a spec of
//! about 200 bytes, then `Sent` to a worker, then `Ended`), kept as the state those
//! records build (a row per job, updated in place), and the same writer: one thread
//! takes every batch waiting in its channel, commits them as one durable transaction and
//! then answers their callers.
//!
//! - `threads`: N threads, each writing its jobs' records one at a time and waiting for
//!   each to be durable (as N submitters do);
//! - `batches`: one thread writing 100 `Accepted` records per durable write (as an array
//!   submit does).
//!
//! Usage: `cargo run --release -- [--seconds S] [--runs R] [--threads 1,4,16,64]
//! [--stores sqlite,redb] [--dir D]`
//! Prints every run and the median per store and load.

use crossbeam_channel::{Receiver, Sender};
use redb::{ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One change, as the manager writes it.
#[derive(Clone)]
enum Rec {
    Accepted {
        id: u64,
        priority: i32,
        script: String,
        spec: Vec<u8>,
    },
    Sent {
        id: u64,
        worker: String,
    },
    Ended {
        id: u64,
        code: i32,
        at: i64,
    },
}

/// A store: commits a batch of records as one durable transaction.
trait Store: Send + 'static {
    fn commit(&mut self, batch: &[Rec]);
    /// Bytes on disk now.
    fn size(&self) -> u64;
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

struct Sqlite {
    conn: rusqlite::Connection,
    path: PathBuf,
}

impl Sqlite {
    fn create(path: &Path) -> Sqlite {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO meta VALUES ('next_job', 1);
             CREATE TABLE jobs (
                 id INTEGER PRIMARY KEY, state TEXT NOT NULL, attempt INTEGER NOT NULL,
                 worker TEXT, priority INTEGER NOT NULL, script TEXT NOT NULL,
                 outcome TEXT, outcome_code INTEGER, ended_at INTEGER, spec BLOB);
             CREATE INDEX jobs_ended ON jobs (ended_at, id) WHERE state = 'ended';",
        )
        .unwrap();
        Sqlite {
            conn,
            path: path.to_owned(),
        }
    }
}

impl Store for Sqlite {
    fn commit(&mut self, batch: &[Rec]) {
        let c = &self.conn;
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        for r in batch {
            match r {
                Rec::Accepted {
                    id,
                    priority,
                    script,
                    spec,
                } => {
                    c.prepare_cached(
                        "INSERT INTO jobs (id, state, attempt, priority, script, spec) \
                         VALUES (?1, 'queued', 1, ?2, ?3, ?4)",
                    )
                    .unwrap()
                    .execute(rusqlite::params![*id as i64, priority, script, spec])
                    .unwrap();
                    c.prepare_cached(
                        "UPDATE meta SET value = max(value, ?1) WHERE key = 'next_job'",
                    )
                    .unwrap()
                    .execute([*id as i64 + 1])
                    .unwrap();
                }
                Rec::Sent { id, worker } => {
                    c.prepare_cached(
                        "UPDATE jobs SET state = 'running', worker = ?2 WHERE id = ?1 AND state != 'ended'",
                    )
                    .unwrap()
                    .execute(rusqlite::params![*id as i64, worker])
                    .unwrap();
                }
                Rec::Ended { id, code, at } => {
                    c.prepare_cached(
                        "UPDATE jobs SET state = 'ended', outcome = 'exited', outcome_code = ?2, \
                         ended_at = ?3, spec = NULL WHERE id = ?1 AND state != 'ended'",
                    )
                    .unwrap()
                    .execute(rusqlite::params![*id as i64, code, at])
                    .unwrap();
                }
            }
        }
        c.execute_batch("COMMIT").unwrap();
    }

    fn size(&self) -> u64 {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        file_len(&self.path) + file_len(Path::new(&wal))
    }
}

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const ENDED: TableDefinition<(i64, u64), ()> = TableDefinition::new("ended");

/// A job's row in redb: the same fields as SQLite's columns, laid out by hand.
struct Row {
    state: u8,
    attempt: u32,
    priority: i32,
    code: i32,
    ended_at: i64,
    worker: String,
    script: String,
    spec: Vec<u8>,
}

impl Row {
    fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(32 + self.worker.len() + self.script.len() + self.spec.len());
        out.push(self.state);
        out.extend_from_slice(&self.attempt.to_le_bytes());
        out.extend_from_slice(&self.priority.to_le_bytes());
        out.extend_from_slice(&self.code.to_le_bytes());
        out.extend_from_slice(&self.ended_at.to_le_bytes());
        for part in [self.worker.as_bytes(), self.script.as_bytes(), &self.spec] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    fn decode(b: &[u8]) -> Row {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let mut at = 21;
        let mut part = || {
            let n = u32_at(at) as usize;
            let p = b[at + 4..at + 4 + n].to_vec();
            at += 4 + n;
            p
        };
        let worker = String::from_utf8(part()).unwrap();
        let script = String::from_utf8(part()).unwrap();
        let spec = part();
        Row {
            state: b[0],
            attempt: u32_at(1),
            priority: i32::from_le_bytes(b[5..9].try_into().unwrap()),
            code: i32::from_le_bytes(b[9..13].try_into().unwrap()),
            ended_at: i64::from_le_bytes(b[13..21].try_into().unwrap()),
            worker,
            script,
            spec,
        }
    }
}

struct Redb {
    db: redb::Database,
    path: PathBuf,
}

impl Redb {
    fn create(path: &Path) -> Redb {
        let db = redb::Database::create(path).unwrap();
        let tx = db.begin_write().unwrap();
        {
            tx.open_table(JOBS).unwrap();
            tx.open_table(ENDED).unwrap();
            tx.open_table(META).unwrap().insert("next_job", 1).unwrap();
        }
        tx.commit().unwrap();
        Redb {
            db,
            path: path.to_owned(),
        }
    }
}

impl Store for Redb {
    fn commit(&mut self, batch: &[Rec]) {
        let mut tx = self.db.begin_write().unwrap();
        tx.set_durability(redb::Durability::Immediate).unwrap();
        {
            let mut jobs = tx.open_table(JOBS).unwrap();
            let mut meta = tx.open_table(META).unwrap();
            // The end-time index SQLite keeps for compaction.
            let mut ended = tx.open_table(ENDED).unwrap();
            for r in batch {
                match r {
                    Rec::Accepted {
                        id,
                        priority,
                        script,
                        spec,
                    } => {
                        let row = Row {
                            state: 0,
                            attempt: 1,
                            priority: *priority,
                            code: 0,
                            ended_at: 0,
                            worker: String::new(),
                            script: script.clone(),
                            spec: spec.clone(),
                        };
                        jobs.insert(*id, row.encode().as_slice()).unwrap();
                        let next = meta.get("next_job").unwrap().map_or(1, |v| v.value());
                        meta.insert("next_job", next.max(id + 1)).unwrap();
                    }
                    Rec::Sent { id, worker } => {
                        let row = jobs.get(*id).unwrap().map(|v| Row::decode(v.value()));
                        if let Some(mut row) = row.filter(|r| r.state != 3) {
                            row.state = 1;
                            row.worker = worker.clone();
                            jobs.insert(*id, row.encode().as_slice()).unwrap();
                        }
                    }
                    Rec::Ended { id, code, at } => {
                        let row = jobs.get(*id).unwrap().map(|v| Row::decode(v.value()));
                        if let Some(mut row) = row.filter(|r| r.state != 3) {
                            row.state = 3;
                            row.code = *code;
                            row.ended_at = *at;
                            row.spec = Vec::new();
                            jobs.insert(*id, row.encode().as_slice()).unwrap();
                            ended.insert((*at, *id), ()).unwrap();
                        }
                    }
                }
            }
        }
        tx.commit().unwrap();
    }

    fn size(&self) -> u64 {
        file_len(&self.path)
    }
}

type Reply = Sender<()>;

/// The group-committing writer: every batch waiting is committed at once.
fn writer(
    mut store: Box<dyn Store>,
    rx: Receiver<(Vec<Rec>, Reply)>,
    commits: Arc<AtomicU64>,
) -> u64 {
    let mut batch = Vec::new();
    let mut records = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        records.clear();
        for (r, _) in &batch {
            records.extend_from_slice(r);
        }
        store.commit(&records);
        commits.fetch_add(1, Ordering::Relaxed);
        for (_, reply) in batch.drain(..) {
            let _ = reply.send(());
        }
    }
    store.size()
}

fn durable(tx: &Sender<(Vec<Rec>, Reply)>, records: Vec<Rec>) {
    let (reply, done) = crossbeam_channel::bounded(1);
    tx.send((records, reply)).unwrap();
    done.recv().unwrap();
}

/// A spec of about 200 bytes, as a typical job's encodes.
fn spec_bytes(id: u64) -> Vec<u8> {
    let mut s = format!("{{script:'./run-step --input data/{id}.csv --output out/{id}.json',env:{{RUN:'nightly'}},tags:['linux'],timeout:600,retries:1}}").into_bytes();
    s.resize(200, b' ');
    s
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Sqlite,
    Redb,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Sqlite => "sqlite",
            Kind::Redb => "redb",
        }
    }

    fn create(self, dir: &Path) -> Box<dyn Store> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        match self {
            Kind::Sqlite => Box::new(Sqlite::create(&dir.join("journal.db"))),
            Kind::Redb => Box::new(Redb::create(&dir.join("journal.redb"))),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// N threads, one record per durable write.
    Threads(u64),
    /// One thread, this many records per durable write.
    Batches(u64),
}

impl Load {
    fn name(self) -> String {
        match self {
            Load::Threads(n) => format!("{n} threads x 1 record"),
            Load::Batches(n) => format!("1 thread x {n} records"),
        }
    }
}

struct Run {
    records_per_s: f64,
    commits: u64,
    records: u64,
    bytes_per_job: f64,
}

fn run(kind: Kind, load: Load, seconds: f64, dir: &Path) -> Run {
    let store = kind.create(dir);
    let (tx, rx) = crossbeam_channel::unbounded();
    let commits = Arc::new(AtomicU64::new(0));
    let c = commits.clone();
    let writer = std::thread::spawn(move || writer(store, rx, c));
    let stop = Arc::new(AtomicBool::new(false));
    let next_id = Arc::new(AtomicU64::new(1));
    let records = Arc::new(AtomicU64::new(0));
    let threads = match load {
        Load::Threads(n) => n,
        Load::Batches(_) => 1,
    };
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (tx, stop, next_id, records) =
                (tx.clone(), stop.clone(), next_id.clone(), records.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match load {
                        Load::Threads(_) => {
                            let id = next_id.fetch_add(1, Ordering::Relaxed);
                            durable(
                                &tx,
                                vec![Rec::Accepted {
                                    id,
                                    priority: 0,
                                    script: format!("./run-step {id}"),
                                    spec: spec_bytes(id),
                                }],
                            );
                            durable(
                                &tx,
                                vec![Rec::Sent {
                                    id,
                                    worker: format!("worker-{t}"),
                                }],
                            );
                            durable(
                                &tx,
                                vec![Rec::Ended {
                                    id,
                                    code: 0,
                                    at: now_ns(),
                                }],
                            );
                            records.fetch_add(3, Ordering::Relaxed);
                        }
                        Load::Batches(n) => {
                            let first = next_id.fetch_add(n, Ordering::Relaxed);
                            let batch = (first..first + n)
                                .map(|id| Rec::Accepted {
                                    id,
                                    priority: 0,
                                    script: format!("./run-step {id}"),
                                    spec: spec_bytes(id),
                                })
                                .collect();
                            durable(&tx, batch);
                            records.fetch_add(n, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    drop(tx);
    let size = writer.join().unwrap();
    let records = records.load(Ordering::Relaxed);
    let jobs = next_id.load(Ordering::Relaxed) - 1;
    Run {
        records_per_s: records as f64 / elapsed,
        commits: commits.load(Ordering::Relaxed),
        records,
        bytes_per_job: size as f64 / jobs.max(1) as f64,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let mut seconds = 3.0;
    let mut runs = 3;
    let mut threads = vec![1, 4, 16, 64];
    let mut dir = std::env::temp_dir().join(format!("journal-stores-{}", std::process::id()));
    let mut kinds = vec![Kind::Sqlite, Kind::Redb];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--seconds" => seconds = value().parse().unwrap(),
            "--runs" => runs = value().parse().unwrap(),
            "--threads" => threads = value().split(',').map(|n| n.parse().unwrap()).collect(),
            "--dir" => dir = PathBuf::from(value()),
            "--stores" => {
                kinds = value()
                    .split(',')
                    .map(|k| match k {
                        "sqlite" => Kind::Sqlite,
                        "redb" => Kind::Redb,
                        other => panic!("unknown store {other}"),
                    })
                    .collect()
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let mut loads: Vec<Load> = threads.into_iter().map(Load::Threads).collect();
    loads.push(Load::Batches(100));
    let mut results: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); loads.len()]; kinds.len()];
    println!("store\tload\trun\trecords/s\tcommits\trecords/commit\tbytes/job");
    // Runs interleave the stores and loads, so that a noisy moment hits both alike.
    for r in 0..runs {
        for (li, &load) in loads.iter().enumerate() {
            for (ki, &kind) in kinds.iter().enumerate() {
                let out = run(kind, load, seconds, &dir.join(kind.name()));
                println!(
                    "{}\t{}\t{}\t{:.0}\t{}\t{:.1}\t{:.0}",
                    kind.name(),
                    load.name(),
                    r + 1,
                    out.records_per_s,
                    out.commits,
                    out.records as f64 / out.commits.max(1) as f64,
                    out.bytes_per_job
                );
                results[ki][li].push(out.records_per_s);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("\nmedian durable records/s of {runs} runs of {seconds} s");
    let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
    println!("load\t{}", names.join("\t"));
    for (li, load) in loads.iter().enumerate() {
        let cells: Vec<String> = (0..kinds.len())
            .map(|ki| format!("{:.0}", median(results[ki][li].clone())))
            .collect();
        println!("{}\t{}", load.name(), cells.join("\t"));
    }
}
