//! Which new connections may be in handshake (TLS and the hello) at once: a plain state
//! machine with no sockets and no clock of its own. The acceptor asks it about each new
//! connection, the link thread tells it when the handshake is over, and a watchdog asks
//! it which handshakes ran past their deadline; they cut the sockets it names.
//!
//! The policy (numbers in docs/SECURITY.md):
//! - every handshake has one absolute deadline, `timeout` after it was admitted;
//! - at most `per_source` handshakes from one source (an IPv4 address, or an IPv6 /64);
//! - at most `total` handshakes in all;
//! - a new connection is always admitted: when its source holds `per_source` already, it
//!   displaces that source's oldest handshake; otherwise, when all `total` slots are
//!   taken, it displaces the oldest handshake of the source that holds the most slots.
//!
//! A real handshake takes about a millisecond; a stalled one never ends. So whoever
//! stalls loses its slots to newcomers, one source can take slots only from itself or
//! from sources holding more than it, and a real peer is displaced only if more
//! connections than its rivals hold arrive within its millisecond.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Where a connection comes from, as the per-source cap counts: an IPv4 address (also
/// when IPv4-mapped into IPv6), or the /64 prefix of an IPv6 address (one host usually
/// holds a whole /64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    V4(std::net::Ipv4Addr),
    V6Net(u64),
}

impl Source {
    pub(crate) fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(a) => Source::V4(a),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4),
                None => Source::V6Net((u128::from(a) >> 64) as u64),
            },
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::V4(a) => write!(f, "{a}"),
            Source::V6Net(p) => {
                write!(f, "{}/64", std::net::Ipv6Addr::from(u128::from(*p) << 64))
            }
        }
    }
}

/// The admission limits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Most handshakes at once (at least 1).
    pub total: usize,
    /// Most handshakes from one source at once (at least 1).
    pub per_source: usize,
    /// How long a handshake may take, from its admission.
    pub timeout: Duration,
}

/// Why a handshake lost its slot to a newcomer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The newcomer's source already held `per_source` handshakes; its oldest went.
    SourceFull,
    /// All `total` slots were taken; the oldest of the source holding most went.
    AllFull,
}

/// A handshake that lost its slot: its connection is to be cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Displaced {
    pub id: u64,
    pub source: Source,
    pub reason: Reason,
}

/// The answer for a new connection: it is admitted, must finish by `deadline`, and took
/// the slot of `displaced`, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Admitted {
    pub deadline: Instant,
    pub displaced: Option<Displaced>,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    source: Source,
    deadline: Instant,
}

/// The handshakes in progress.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: Limits,
    next_seq: u64,
    /// By admission order (oldest first).
    by_age: BTreeMap<u64, Entry>,
    /// The admission order of each connection id.
    seq_of: HashMap<u64, u64>,
    /// (deadline, admission order), earliest first.
    by_deadline: BTreeSet<(Instant, u64)>,
    per_source: HashMap<Source, usize>,
}

impl Admission {
    pub(crate) fn new(limits: Limits) -> Admission {
        Admission {
            limits: Limits {
                total: limits.total.max(1),
                per_source: limits.per_source.max(1),
                timeout: limits.timeout,
            },
            next_seq: 0,
            by_age: BTreeMap::new(),
            seq_of: HashMap::new(),
            by_deadline: BTreeSet::new(),
            per_source: HashMap::new(),
        }
    }

    /// Admits connection `id` (not admitted before) from `peer` at `now`, displacing
    /// another handshake when the caps say so.
    pub(crate) fn admit(&mut self, id: u64, peer: IpAddr, now: Instant) -> Admitted {
        let source = Source::of(peer);
        let held = self.held_by(source);
        let victim = if held >= self.limits.per_source {
            self.oldest(|s| s == source)
                .map(|seq| (seq, Reason::SourceFull))
        } else if self.by_age.len() >= self.limits.total {
            let most = self.per_source.values().copied().max().unwrap_or(0);
            let per_source = &self.per_source;
            self.oldest(|s| per_source.get(&s) == Some(&most))
                .map(|seq| (seq, Reason::AllFull))
        } else {
            None
        };
        let displaced = victim.and_then(|(seq, reason)| {
            let e = self.remove_seq(seq)?;
            Some(Displaced {
                id: e.id,
                source: e.source,
                reason,
            })
        });
        // A caller that admits one id twice gets the old entry replaced, not duplicated.
        self.finish(id);
        let seq = self.next_seq;
        self.next_seq += 1;
        // A timeout too long for the clock means no deadline to speak of.
        let deadline = now
            .checked_add(self.limits.timeout)
            .unwrap_or(now + Duration::from_secs(86_400 * 365));
        self.by_age.insert(
            seq,
            Entry {
                id,
                source,
                deadline,
            },
        );
        self.seq_of.insert(id, seq);
        self.by_deadline.insert((deadline, seq));
        *self.per_source.entry(source).or_insert(0) += 1;
        Admitted {
            deadline,
            displaced,
        }
    }

    /// The handshake of `id` is over (done or failed): its slot is free. False when it
    /// had lost its slot already (displaced, or past its deadline): its connection must
    /// not go on.
    pub(crate) fn finish(&mut self, id: u64) -> bool {
        match self.seq_of.get(&id) {
            Some(&seq) => self.remove_seq(seq).is_some(),
            None => false,
        }
    }

    /// Removes and returns the handshakes whose deadline is at or before `now`.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<(u64, Source)> {
        let mut gone = Vec::new();
        while let Some(&(deadline, seq)) = self.by_deadline.first() {
            if deadline > now {
                break;
            }
            if let Some(e) = self.remove_seq(seq) {
                gone.push((e.id, e.source));
            }
        }
        gone
    }

    /// The earliest deadline of a handshake in progress.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.first().map(|&(d, _)| d)
    }

    /// How many handshakes are in progress.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_age.len()
    }

    /// How many of them come from `source`.
    pub(crate) fn held_by(&self, source: Source) -> usize {
        self.per_source.get(&source).copied().unwrap_or(0)
    }

    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// The admission order of the oldest handshake whose source passes `which`.
    fn oldest(&self, which: impl Fn(Source) -> bool) -> Option<u64> {
        self.by_age
            .iter()
            .find(|(_, e)| which(e.source))
            .map(|(&seq, _)| seq)
    }

    fn remove_seq(&mut self, seq: u64) -> Option<Entry> {
        let e = self.by_age.remove(&seq)?;
        self.seq_of.remove(&e.id);
        self.by_deadline.remove(&(e.deadline, seq));
        if let Some(n) = self.per_source.get_mut(&e.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&e.source);
            }
        }
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// A clock the test moves.
    struct Clock(Instant);

    impl Clock {
        fn now(&self) -> Instant {
            self.0
        }
        fn advance(&mut self, ms: u64) -> Instant {
            self.0 += Duration::from_millis(ms);
            self.0
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn limits(total: usize, per_source: usize) -> Limits {
        Limits {
            total,
            per_source,
            timeout: Duration::from_secs(10),
        }
    }

    fn displaced(a: Admitted) -> Option<(u64, Reason)> {
        a.displaced.map(|d| (d.id, d.reason))
    }

    #[test]
    fn below_the_caps_everyone_is_admitted_with_a_deadline_from_admission() {
        let mut clock = Clock(Instant::now());
        let mut a = Admission::new(limits(4, 2));
        let t0 = clock.now();
        assert_eq!(
            a.admit(1, ip(1), t0),
            Admitted {
                deadline: t0 + Duration::from_secs(10),
                displaced: None
            }
        );
        let t1 = clock.advance(300);
        assert_eq!(a.admit(2, ip(2), t1).deadline, t1 + Duration::from_secs(10));
        assert_eq!(a.len(), 2);
        assert_eq!(a.next_deadline(), Some(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn a_source_at_its_cap_displaces_its_own_oldest_never_another_source() {
        let mut clock = Clock(Instant::now());
        let mut a = Admission::new(limits(100, 3));
        a.admit(100, ip(9), clock.now()); // someone else, older than all of the flood
        for id in 1..=3 {
            assert_eq!(displaced(a.admit(id, ip(1), clock.advance(1))), None);
        }
        // The flood goes on: each newcomer takes the slot of its own source's oldest.
        for id in 4..=50 {
            assert_eq!(
                displaced(a.admit(id, ip(1), clock.advance(1))),
                Some((id - 3, Reason::SourceFull))
            );
            assert_eq!(a.held_by(Source::of(ip(1))), 3);
        }
        assert_eq!(a.held_by(Source::of(ip(9))), 1, "never displaced");
        assert!(a.finish(100));
    }

    #[test]
    fn when_all_slots_are_taken_the_busiest_source_loses_its_oldest() {
        let mut clock = Clock(Instant::now());
        let mut a = Admission::new(limits(6, 4));
        // 10.0.0.1 holds 1 (the oldest of all), 10.0.0.2 holds 3, 10.0.0.3 holds 2.
        a.admit(1, ip(1), clock.advance(1));
        for id in [2, 3, 4] {
            a.admit(id, ip(2), clock.advance(1));
        }
        for id in [5, 6] {
            a.admit(id, ip(3), clock.advance(1));
        }
        assert_eq!(
            displaced(a.admit(7, ip(4), clock.advance(1))),
            Some((2, Reason::AllFull)),
            "the oldest of the source holding most, not the oldest overall"
        );
        // Now 10.0.0.2 and 10.0.0.3 hold 2 each: the oldest of either goes.
        assert_eq!(
            displaced(a.admit(8, ip(5), clock.advance(1))),
            Some((3, Reason::AllFull))
        );
        assert_eq!(
            displaced(a.admit(9, ip(6), clock.advance(1))),
            Some((5, Reason::AllFull))
        );
        // Every source holds 1: the oldest overall goes.
        assert_eq!(
            displaced(a.admit(10, ip(7), clock.advance(1))),
            Some((1, Reason::AllFull))
        );
        assert_eq!(a.len(), 6);
    }

    /// A flood from many sources fills every slot; a real peer arrives, and the flood
    /// keeps arriving: the real peer (one slot, the youngest) is displaced only after
    /// every flood source is down to one slot and every older handshake is gone.
    #[test]
    fn a_real_peer_outlives_a_flood_from_many_sources() {
        let mut clock = Clock(Instant::now());
        let mut a = Admission::new(limits(256, 8));
        let mut next = 1u64;
        for _ in 0..8 {
            for s in 0..40u8 {
                a.admit(next, ip(10 + s), clock.advance(1));
                next += 1;
            }
        }
        assert_eq!(a.len(), 256);
        let real = 999_999;
        assert!(a.admit(real, ip(1), clock.advance(1)).displaced.is_some());
        // The flood sends as many connections again as there are slots.
        for i in 0..256u64 {
            let d = a.admit(next, ip(10 + (i % 40) as u8), clock.advance(1));
            next += 1;
            assert_ne!(d.displaced.map(|d| d.id), Some(real), "after {i} newcomers");
        }
        assert!(a.finish(real), "the real peer still holds its slot");
    }

    #[test]
    fn a_flood_from_one_source_leaves_the_others_their_slots() {
        let mut clock = Clock(Instant::now());
        let mut a = Admission::new(limits(16, 8));
        for id in 0..1000 {
            a.admit(id, ip(1), clock.advance(1));
        }
        assert_eq!(a.len(), 8);
        for id in 1000..1008 {
            assert_eq!(a.admit(id, ip(2), clock.advance(1)).displaced, None);
        }
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn handshakes_expire_at_their_deadline_not_before() {
        let mut clock = Clock(Instant::now());
        let mut a = Admission::new(limits(10, 10));
        a.admit(1, ip(1), clock.now());
        clock.advance(4000);
        a.admit(2, ip(2), clock.now());
        assert_eq!(a.expire(clock.advance(5999)), vec![]);
        assert_eq!(
            a.next_deadline(),
            Some(clock.now() + Duration::from_millis(1))
        );
        assert_eq!(a.expire(clock.advance(1)), vec![(1, Source::of(ip(1)))]);
        assert!(!a.finish(1), "an expired handshake has lost its slot");
        assert_eq!(a.expire(clock.advance(3999)), vec![]);
        assert_eq!(a.expire(clock.advance(1)), vec![(2, Source::of(ip(2)))]);
        assert_eq!(a.next_deadline(), None);
        assert_eq!(a.len(), 0);
    }

    #[test]
    fn a_finished_handshake_frees_its_slot_once_and_a_displaced_one_is_told() {
        let mut clock = Clock(Instant::now());
        let mut a = Admission::new(limits(2, 1));
        a.admit(1, ip(1), clock.now());
        assert!(a.finish(1));
        assert!(!a.finish(1));
        assert_eq!(a.len(), 0);
        a.admit(2, ip(1), clock.advance(1));
        assert_eq!(
            displaced(a.admit(3, ip(1), clock.advance(1))),
            Some((2, Reason::SourceFull))
        );
        assert!(!a.finish(2), "displaced: it must not go on");
        assert!(a.finish(3));
        assert_eq!(a.next_deadline(), None, "no deadline left behind");
    }

    #[test]
    fn ipv6_sources_count_by_64_prefix_and_mapped_ipv4_as_ipv4() {
        let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(a.into()), Source::of(b.into()));
        assert_ne!(Source::of(a.into()), Source::of(c.into()));
        assert_eq!(Source::of(a.into()).to_string(), "2001:db8:1:2::/64");
        let mapped: Ipv6Addr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(Source::of(mapped.into()), Source::of(ip(1)));
        let mut clock = Clock(Instant::now());
        let mut adm = Admission::new(limits(10, 2));
        adm.admit(1, a.into(), clock.advance(1));
        adm.admit(2, b.into(), clock.advance(1));
        assert_eq!(
            displaced(adm.admit(3, c.into(), clock.advance(1))),
            None,
            "another /64"
        );
        assert_eq!(
            displaced(adm.admit(4, b.into(), clock.advance(1))),
            Some((1, Reason::SourceFull))
        );
    }

    #[test]
    fn zero_limits_are_raised_to_one() {
        let mut clock = Clock(Instant::now());
        let mut a = Admission::new(limits(0, 0));
        assert_eq!(a.admit(1, ip(1), clock.now()).displaced, None);
        assert_eq!(
            displaced(a.admit(2, ip(2), clock.advance(1))),
            Some((1, Reason::AllFull))
        );
        assert_eq!(a.limits().total, 1);
    }
}
