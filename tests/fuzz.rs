//! 100,000+ generated and mutated frames through the frame reader and the decoders of
//! every message type: no panic, and no allocation beyond a fixed bound whatever the
//! bytes claim (measured by a counting allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use workpool::job::{JobId, JobSpec, Outcome, Stream};
use workpool::protocol::{
    self, FrameReader, HeldJob, ManagerMessage, Welcome, WorkerHello, WorkerMessage,
};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to the system allocator with the same arguments,
// so its contract is the system allocator's; the counters are only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout is passed on unchanged.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` was allocated by `alloc` above with layout `l`, as the caller guarantees.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() {
            let now = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        } else {
            LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
        }
        LARGEST.fetch_max(new, Ordering::Relaxed);
        // SAFETY: `p` was allocated by this allocator with layout `l`, as the caller guarantees.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn sample(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    let job = JobId(rng.next());
    match rng.below(6) {
        0 => protocol::encode_into(
            &mut out,
            &WorkerMessage::Output {
                job,
                stream: Stream::Stderr,
                seq: rng.next(),
                bytes: vec![7; rng.below(300) as usize],
            },
        ),
        1 => protocol::encode_into(
            &mut out,
            &WorkerMessage::Finished {
                job,
                outcome: Outcome::SpawnFailed("no".into()),
                cleanup_error: Some("x".into()),
            },
        ),
        2 => protocol::encode_into(
            &mut out,
            &ManagerMessage::Run {
                job,
                spec: JobSpec::new("echo hi")
                    .require_tag("t")
                    .env("A", "b")
                    .stdin(vec![1, 2, 3])
                    .retries(2),
                ahead: true,
            },
        ),
        3 => protocol::encode_into(
            &mut out,
            &WorkerHello {
                name: "n".into(),
                tags: ["a".to_string()].into(),
                platform: "p".into(),
                slots: 3,
                ahead: 1,
                draining: true,
                manager_id: Some(rng.next()),
                jobs: vec![HeldJob {
                    job,
                    finished: true,
                    ahead: false,
                    stdin_taken: rng.next(),
                }],
            },
        ),
        4 => protocol::encode_into(
            &mut out,
            &Welcome {
                manager_id: 1,
                worker_id: 2,
                heartbeat_interval_ms: 3,
                heartbeat_timeout_ms: 4,
                reconnect_grace_ms: 5,
                resume: vec![(job, 9)],
            },
        ),
        _ => protocol::encode_into(&mut out, &ManagerMessage::Pause { job }),
    }
    .unwrap();
    out
}

fn mutate(frame: &mut Vec<u8>, rng: &mut Rng) {
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !frame.is_empty() => {
                let i = rng.below(frame.len() as u64) as usize;
                frame[i] ^= 1 << rng.below(8);
            }
            1 if !frame.is_empty() => {
                let i = rng.below(frame.len() as u64) as usize;
                frame[i] = 0xff;
            }
            2 => frame.truncate(rng.below(frame.len() as u64 + 1) as usize),
            3 => frame.extend((0..rng.below(16)).map(|_| rng.next() as u8)),
            4 if frame.len() >= 4 => {
                // Lie about the length, often hugely.
                let lie = [rng.next() as u32, u32::MAX, 1 << 30, 0][rng.below(4) as usize];
                frame[..4].copy_from_slice(&lie.to_be_bytes());
            }
            _ if frame.len() > 8 => {
                // Lie about a length inside the body (bincode varint markers).
                let i = 4 + rng.below(frame.len() as u64 - 4) as usize;
                frame[i] = [0xfb, 0xfc, 0xfd][rng.below(3) as usize];
            }
            _ => {}
        }
    }
}

#[test]
fn mutated_frames_never_panic_or_allocate_without_bound() {
    let mut rng = Rng(0x2545f4914f6cdd1d);
    let base = LIVE.load(Ordering::Relaxed);
    let (mut frames, mut decoded, mut refused) = (0u64, 0u64, 0u64);
    while frames < 120_000 {
        // A stream of several frames, some mutated, read back frame by frame.
        let mut stream = Vec::new();
        for _ in 0..4 {
            let mut f = sample(&mut rng);
            if rng.below(4) != 0 {
                mutate(&mut f, &mut rng);
            }
            stream.extend(f);
            frames += 1;
        }
        let mut reader = FrameReader::new(&stream[..], protocol::DEFAULT_MAX_FRAME);
        loop {
            match reader.read_frame() {
                Ok(Some(body)) => {
                    let ok = [
                        protocol::decode::<WorkerMessage>(&body).is_ok(),
                        protocol::decode::<ManagerMessage>(&body).is_ok(),
                        protocol::decode::<WorkerHello>(&body).is_ok(),
                        protocol::decode::<Welcome>(&body).is_ok(),
                        protocol::parse_hello(&body).is_ok(),
                    ];
                    if ok.iter().any(|&b| b) {
                        decoded += 1;
                    } else {
                        refused += 1;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    refused += 1;
                    break;
                }
            }
        }
    }
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let largest = LARGEST.load(Ordering::Relaxed);
    println!(
        "{frames} frames: {decoded} decoded, {refused} refused; peak {peak} bytes, largest block {largest} bytes"
    );
    assert!(frames >= 100_000);
    assert!(
        decoded > 1000 && refused > 1000,
        "both paths exercised: {decoded} / {refused}"
    );
    // Frames here are under 1 KiB. A lying length inside a message can make serde reserve
    // at most 1 MiB for a sequence (its "cautious" size hint), never what the lie claims.
    assert!(
        largest <= 1 << 20,
        "a block of {largest} bytes was allocated"
    );
    assert!(peak < 8 << 20, "peak live memory {peak} bytes");
}
