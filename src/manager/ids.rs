//! Hash maps and sets keyed by the manager's own numbers (job ids, worker ids). These
//! are handed out by the manager in sequence, so they need no protection against chosen
//! collisions (a worker can only look keys up, not insert them), and the standard
//! library's SipHash costs more than the rest of a lookup: one multiplication spreads
//! them instead (Fibonacci hashing; the multiplier is odd, so consecutive ids fill
//! consecutive residues in the low bits and differ in the high bits).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes integer keys by a multiplication.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub(crate) type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
pub(crate) type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobId;

    #[test]
    fn consecutive_ids_spread_over_buckets_and_are_found_again() {
        let mut m: IdMap<JobId, u64> = IdMap::default();
        for i in 1..=100_000 {
            m.insert(JobId(i), i);
        }
        assert!((1..=100_000).all(|i| m.get(&JobId(i)) == Some(&i)));
        assert_eq!(m.get(&JobId(0)), None);
        // The top 7 bits (what a hashbrown group compares) differ between neighbours,
        // and the low bits of consecutive ids are all different.
        let h = |i: u64| {
            let mut s = IdHasher::default();
            s.write_u64(i);
            s.finish()
        };
        let tops: HashSet<u64> = (0..1024).map(|i| h(i) >> 57).collect();
        assert_eq!(tops.len(), 128);
        let lows: HashSet<u64> = (0..1024).map(|i| h(i) & 1023).collect();
        assert_eq!(lows.len(), 1024);
    }
}
