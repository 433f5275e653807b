//! Secure randomness, from the same source rustls uses (the `ring` provider's
//! `SecureRandom`: the operating system's generator). The one place workpool gets random
//! bytes: manager instance ids, job tokens, and the seed of the backoff jitter.

use rustls::crypto::SecureRandom;
use std::sync::OnceLock;
use std::time::Duration;

fn source() -> &'static dyn SecureRandom {
    static SOURCE: OnceLock<&'static dyn SecureRandom> = OnceLock::new();
    *SOURCE.get_or_init(|| rustls::crypto::ring::default_provider().secure_random)
}

/// Fills `buf` with secure random bytes. The operating system's generator does not fail
/// once the system has booted; if it ever does, this panics rather than hand out
/// predictable bytes.
pub(crate) fn fill(buf: &mut [u8]) {
    source()
        .fill(buf)
        .expect("the operating system's random generator failed");
}

/// A secure random `u64`.
pub(crate) fn u64() -> u64 {
    let mut b = [0u8; 8];
    fill(&mut b);
    u64::from_le_bytes(b)
}

/// `n` secure random bytes as lowercase hex (`2n` characters).
pub(crate) fn hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Capped exponential backoff with jitter, for a connect loop after its `failures`-th
/// failure in a row: a random wait in [d/2, d], where d doubles per failure from
/// `initial` up to `max`, so that many peers of a restarted manager do not all come
/// back in the same instant. `rng` is the caller's xorshift state (seeded from [`u64`];
/// a test gives its own, to see the waits it expects).
pub(crate) fn backoff(initial: Duration, max: Duration, failures: u32, rng: &mut u64) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let d = initial.saturating_mul(1u32 << exp).min(max);
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    let frac = (*rng >> 11) as f64 / (1u64 << 53) as f64;
    d.mul_f64(0.5 + 0.5 * frac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn random_values_differ_and_hex_has_the_asked_length() {
        let ids: HashSet<u64> = (0..1000).map(|_| u64()).collect();
        assert_eq!(ids.len(), 1000, "1000 draws of 64 bits never collide");
        let h = hex(16);
        assert_eq!(h.len(), 32);
        assert!(
            h.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(h, hex(16));
        // Every byte value turns up in a large enough sample (no stuck bits).
        let mut buf = vec![0u8; 1 << 16];
        fill(&mut buf);
        let seen: HashSet<u8> = buf.iter().copied().collect();
        assert_eq!(seen.len(), 256);
    }
}
