//! The per-source rate limit on registrations (`docs/PROTOCOL.md` §6.1,
//! §12.3): a token bucket per source address, so that one host cannot
//! take names faster than `registrations_per_minute` after an initial
//! `registration_burst`.
//!
//! A source is an IPv4 address, or an IPv6 /64 (one host usually owns a
//! whole /64, so single IPv6 addresses would cost an attacker nothing).
//! Only registrations (1025, legacy and secure) take tokens; reconnects and
//! everything else are never limited.
//!
//! The table is bounded: a source whose bucket has refilled is
//! indistinguishable from one never seen, so its entry may go; when the
//! table is at [`MAX_SOURCES`] those entries are swept, and if none can go,
//! a registration from a new source is refused until one can. Memory
//! stays bounded whatever the number of addresses an attacker has; while
//! the table is full of active sources, new sources wait at most
//! `burst / rate` (one minute with the defaults).
//!
//! Sans-IO: the caller passes the time, so tests need no sleeps.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::Config;

/// Sources tracked at once: about 100 bytes each, so at most about 1 MiB.
/// Far above the number of hosts that register within a minute on a
/// backup server; an attacker with more addresses than this is refused
/// rather than given fresh buckets.
pub(crate) const MAX_SOURCES: usize = 10_000;

/// How often refusals are logged: once per source (and once for a full
/// table) per this long, so that a flood does not flood the log.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(60);

/// Who a bucket belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    V4([u8; 4]),
    /// The first 64 bits of the address.
    V6([u8; 8]),
}

impl Source {
    fn of(ip: IpAddr) -> Self {
        // An IPv4 peer on a dual-stack listener shows as ::ffff:a.b.c.d.
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => {
                let mut prefix = [0u8; 8];
                prefix.copy_from_slice(&v6.octets()[..8]);
                Source::V6(prefix)
            }
        }
    }
}

#[derive(Debug)]
struct Bucket {
    /// Earned time: each registration costs one `interval`; never more
    /// than `capacity`.
    credit: Duration,
    /// When `credit` was last brought up to date.
    at: Instant,
    /// When a refusal for this source was last logged.
    logged: Option<Instant>,
}

#[derive(Debug, Default)]
struct Table {
    buckets: HashMap<Source, Bucket>,
    /// No bucket can have refilled before this (known after a sweep that
    /// freed nothing), so a full table need not be swept again before.
    no_sweep_before: Option<Instant>,
    /// When a refusal for a full table was last logged.
    full_logged: Option<Instant>,
}

/// Why a registration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The source used its burst and has not earned a token since.
    OverRate,
    /// The source is new and the table is full of active sources.
    TableFull,
}

/// The limiter's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allowed,
    /// `log` is set for the first refusal of its kind (per source, or for
    /// the full table) in [`LOG_EVERY`].
    Refused {
        why: Refusal,
        log: bool,
    },
}

/// Token buckets per source, shared by every connection.
#[derive(Debug)]
pub(crate) struct RegisterLimiter {
    /// Time that earns one registration.
    interval: Duration,
    /// Earned time a bucket holds at most: `burst` registrations.
    capacity: Duration,
    max_sources: usize,
    table: Mutex<Table>,
}

impl RegisterLimiter {
    /// `per_minute` registrations per source after a burst of `burst`
    /// (both at least 1), tracking at most `max_sources` sources.
    pub(crate) fn new(per_minute: u32, burst: u32, max_sources: usize) -> Self {
        let interval = Duration::from_secs(60) / per_minute.max(1);
        Self {
            interval,
            capacity: interval.saturating_mul(burst.max(1)),
            max_sources: max_sources.max(1),
            table: Mutex::default(),
        }
    }

    /// The limiter `config` asks for.
    pub(crate) fn from_config(config: &Config) -> Self {
        Self::new(
            config.registrations_per_minute,
            config.registration_burst,
            MAX_SOURCES,
        )
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // The table holds no invariant a panic could break half-way.
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a token for a registration from `peer` at `now`, or says why
    /// not. Never blocks for long: no I/O under the lock.
    pub(crate) fn check(&self, peer: IpAddr, now: Instant) -> Verdict {
        let source = Source::of(peer);
        let mut guard = self.table();
        let table = &mut *guard;
        if !table.buckets.contains_key(&source) {
            if table.buckets.len() >= self.max_sources {
                self.sweep(table, now);
                if table.buckets.len() >= self.max_sources {
                    return Verdict::Refused {
                        why: Refusal::TableFull,
                        log: due(&mut table.full_logged, now),
                    };
                }
            }
            // A new bucket may refill before the bound of the last sweep.
            table.no_sweep_before = None;
        }
        let bucket = table.buckets.entry(source).or_insert(Bucket {
            credit: self.capacity,
            at: now,
            logged: None,
        });
        bucket.credit = self.refilled(bucket, now);
        bucket.at = now.max(bucket.at);
        if bucket.credit >= self.interval {
            bucket.credit -= self.interval;
            Verdict::Allowed
        } else {
            Verdict::Refused {
                why: Refusal::OverRate,
                log: due(&mut bucket.logged, now),
            }
        }
    }

    /// The credit of `bucket` at `now`.
    fn refilled(&self, bucket: &Bucket, now: Instant) -> Duration {
        bucket
            .credit
            .saturating_add(now.saturating_duration_since(bucket.at))
            .min(self.capacity)
    }

    /// Drops every bucket that has refilled by `now`, unless none can have.
    fn sweep(&self, table: &mut Table, now: Instant) {
        if table.no_sweep_before.is_some_and(|t| now < t) {
            return;
        }
        let mut earliest: Option<Instant> = None;
        table.buckets.retain(|_, bucket| {
            if self.refilled(bucket, now) >= self.capacity {
                return false;
            }
            // (No bound from a bucket that refills beyond what an Instant
            // can hold: it never does.)
            if let Some(full_at) = bucket
                .at
                .checked_add(self.capacity.saturating_sub(bucket.credit))
            {
                earliest = Some(earliest.map_or(full_at, |e| e.min(full_at)));
            }
            true
        });
        table.no_sweep_before = earliest;
    }

    /// Sources tracked now (tests).
    #[cfg(test)]
    fn sources(&self) -> usize {
        self.table().buckets.len()
    }
}

/// Whether a refusal last logged at `last` is to be logged at `now`; if
/// so, `now` becomes the last.
fn due(last: &mut Option<Instant>, now: Instant) -> bool {
    if last.is_some_and(|t| now.saturating_duration_since(t) < LOG_EVERY) {
        return false;
    }
    *last = Some(now);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn allowed(l: &RegisterLimiter, peer: &str, now: Instant) -> bool {
        l.check(ip(peer), now) == Verdict::Allowed
    }

    #[test]
    fn accepts_exactly_the_burst_at_once_and_refuses_one_more() {
        let l = RegisterLimiter::new(10, 10, 100);
        let t = Instant::now();
        for i in 0..10 {
            assert!(allowed(&l, "192.0.2.1", t), "registration {i}");
        }
        assert_eq!(
            l.check(ip("192.0.2.1"), t),
            Verdict::Refused {
                why: Refusal::OverRate,
                log: true
            }
        );
        assert!(allowed(&l, "192.0.2.2", t), "another source has its own");
    }

    #[test]
    fn refills_one_registration_per_interval_and_no_sooner() {
        let l = RegisterLimiter::new(10, 2, 100);
        let t = Instant::now();
        assert!(allowed(&l, "192.0.2.1", t));
        assert!(allowed(&l, "192.0.2.1", t));
        assert!(!allowed(&l, "192.0.2.1", t));
        // 10 a minute: one every 6 s.
        let interval = Duration::from_secs(6);
        assert!(!allowed(
            &l,
            "192.0.2.1",
            t + interval - Duration::from_nanos(1)
        ));
        assert!(allowed(&l, "192.0.2.1", t + interval));
        assert!(!allowed(&l, "192.0.2.1", t + interval));
        // A long pause refills the burst, never more.
        let later = t + 100 * MIN;
        assert!(allowed(&l, "192.0.2.1", later));
        assert!(allowed(&l, "192.0.2.1", later));
        assert!(!allowed(&l, "192.0.2.1", later));
    }

    #[test]
    fn accepts_the_rate_for_ever_when_spread_out() {
        let l = RegisterLimiter::new(10, 1, 100);
        let t = Instant::now();
        for i in 0..100u32 {
            assert!(
                allowed(&l, "192.0.2.1", t + Duration::from_secs(6) * i),
                "{i}"
            );
        }
    }

    #[test]
    fn groups_ipv6_by_64_and_ipv4_mapped_as_ipv4() {
        let l = RegisterLimiter::new(1, 1, 100);
        let t = Instant::now();
        assert!(allowed(&l, "2001:db8:1:2::1", t));
        assert!(
            !allowed(&l, "2001:db8:1:2:ffff:ffff:ffff:ffff", t),
            "same /64"
        );
        assert!(allowed(&l, "2001:db8:1:3::1", t), "another /64");
        assert!(allowed(&l, "198.51.100.7", t));
        assert!(!allowed(&l, "::ffff:198.51.100.7", t), "the same host");
        assert_eq!(l.sources(), 3);
    }

    #[test]
    fn keeps_the_table_bounded_and_refuses_new_sources_while_it_is_full() {
        let l = RegisterLimiter::new(10, 2, 3);
        let t = Instant::now();
        for i in 1..=3 {
            assert!(allowed(&l, &format!("192.0.2.{i}"), t));
        }
        assert_eq!(
            l.check(ip("192.0.2.4"), t),
            Verdict::Refused {
                why: Refusal::TableFull,
                log: true
            }
        );
        // Known sources keep their buckets meanwhile.
        assert!(allowed(&l, "192.0.2.1", t));
        // Thousands of other addresses change nothing, and are logged once.
        for i in 0..5000u32 {
            let peer = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            assert_eq!(
                l.check(peer, t + Duration::from_millis(1)),
                Verdict::Refused {
                    why: Refusal::TableFull,
                    log: false
                }
            );
        }
        assert_eq!(l.sources(), 3);
        // 192.0.2.2 and .3 refill after one interval (6 s), .1 after two.
        let refilled = t + Duration::from_secs(6);
        assert!(allowed(&l, "192.0.2.4", refilled));
        assert!(allowed(&l, "192.0.2.5", refilled));
        assert!(!allowed(&l, "192.0.2.6", refilled), "192.0.2.1 still owes");
        assert_eq!(l.sources(), 3);
        assert!(allowed(&l, "192.0.2.6", t + Duration::from_secs(12)));
        assert!(l.sources() <= 3);
    }

    #[test]
    fn a_full_table_is_not_swept_again_before_a_bucket_can_refill() {
        let l = RegisterLimiter::new(10, 1, 2);
        let t = Instant::now();
        assert!(allowed(&l, "192.0.2.1", t));
        assert!(allowed(&l, "192.0.2.2", t + Duration::from_secs(3)));
        assert!(!allowed(&l, "192.0.2.3", t + Duration::from_secs(1)));
        assert_eq!(
            l.table().no_sweep_before,
            Some(t + Duration::from_secs(6)),
            "the first bucket refills at 6 s"
        );
        assert!(!allowed(&l, "192.0.2.3", t + Duration::from_secs(5)));
        assert!(allowed(&l, "192.0.2.3", t + Duration::from_secs(6)));
    }

    #[test]
    fn logs_the_first_refusal_per_source_per_minute() {
        let l = RegisterLimiter::new(1, 1, 100);
        let t = Instant::now();
        let logged = |peer: &str, at: Instant| match l.check(ip(peer), at) {
            Verdict::Refused { log, .. } => log,
            Verdict::Allowed => panic!("{peer} was allowed"),
        };
        assert!(allowed(&l, "192.0.2.1", t));
        assert!(allowed(&l, "192.0.2.2", t));
        assert!(logged("192.0.2.1", t));
        for s in 1..59 {
            assert!(!logged("192.0.2.1", t + Duration::from_secs(s)), "{s}");
        }
        assert!(logged("192.0.2.2", t), "each source has its own");
        // At 60 s a token is back: use it, then the next refusal is logged.
        assert!(allowed(&l, "192.0.2.1", t + MIN));
        assert!(logged("192.0.2.1", t + MIN));
    }

    #[test]
    fn a_clock_that_goes_backwards_earns_nothing() {
        let l = RegisterLimiter::new(10, 1, 100);
        let t = Instant::now() + MIN;
        assert!(allowed(&l, "192.0.2.1", t));
        assert!(!allowed(&l, "192.0.2.1", t - Duration::from_secs(30)));
        assert!(!allowed(&l, "192.0.2.1", t + Duration::from_secs(5)));
        assert!(allowed(&l, "192.0.2.1", t + Duration::from_secs(6)));
    }
}
