//! Who gets a connection slot: the global cap, a cap per source address, and
//! a smaller budget for connections that have not authenticated yet, so that
//! idle sockets and stalled handshakes from anywhere cannot lock authenticated
//! clients out (`docs/SECURITY.md`, "Denial of service").
//!
//! A connection is *unauthenticated* from accept until its session may
//! upload: in secure mode when the client's proof was accepted (1650), on
//! the legacy listener when the key exchange is done (1602 or 1605). While
//! the unauthenticated budget is full, a newcomer takes the slot of a random
//! unauthenticated connection of the source that holds the most of them,
//! unless the newcomer's own source is that source, in which case it is
//! refused. The heaviest sources lose first, and a client that holds one
//! connection while it authenticates is evicted only when every other source
//! holds at most as many (sshd's `MaxStartups` drops at random; this keeps
//! the randomness but aims it at whoever holds the most).
//!
//! Sources are IPv4 addresses and IPv6 /64 networks (one host is commonly
//! given a whole /64).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::seq::SliceRandom;
use rand::Rng;
use tokio_util::sync::CancellationToken;

/// Where a connection comes from, for the per-source limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// The source of a peer address: the IPv4 address (also when mapped into
    /// IPv6), or the IPv6 /64 network.
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    Self(IpAddr::V6(Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => v4.fmt(f),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// The three limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections of one source at once, authenticated or not.
    pub max_per_source: usize,
    /// Connections not yet authenticated, from every source together.
    pub max_unauthenticated: usize,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The global cap is reached.
    AtCapacity,
    /// Its source holds its limit of connections.
    SourceLimit,
    /// The unauthenticated budget is full and its source holds the most of
    /// it.
    Unauthenticated,
}

impl Refusal {
    /// The reason as a metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refusal::AtCapacity => "at_capacity",
            Refusal::SourceLimit => "source_limit",
            Refusal::Unauthenticated => "unauthenticated",
        }
    }

    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refusal::AtCapacity => "at capacity",
            Refusal::SourceLimit => "too many connections from this source",
            Refusal::Unauthenticated => "too many unauthenticated connections from this source",
        }
    }
}

#[derive(Debug)]
struct Pending {
    id: u64,
    source: Source,
    evict: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    total: usize,
    per_source: HashMap<Source, usize>,
    unauthenticated: Vec<Pending>,
    unauthenticated_per_source: HashMap<Source, usize>,
    next_id: u64,
}

impl State {
    fn remove_unauthenticated(&mut self, id: u64) -> Option<Pending> {
        let at = self.unauthenticated.iter().position(|p| p.id == id)?;
        let pending = self.unauthenticated.swap_remove(at);
        decrement(&mut self.unauthenticated_per_source, pending.source);
        Some(pending)
    }
}

fn decrement(counts: &mut HashMap<Source, usize>, source: Source) {
    if let Some(n) = counts.get_mut(&source) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&source);
        }
    }
}

/// The admission state of one server, shared by its listeners.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: AdmissionLimits,
    state: Mutex<State>,
}

/// An admitted connection's slot, released when dropped.
#[derive(Debug)]
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    source: Source,
    evicted: CancellationToken,
    authenticated: bool,
}

/// The outcome of a successful admission.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub(crate) ticket: Ticket,
    /// The unauthenticated connection that made room for this one.
    pub(crate) evicted: Option<Source>,
}

impl Admission {
    pub(crate) fn new(limits: AdmissionLimits) -> Arc<Self> {
        let limits = AdmissionLimits {
            max_connections: limits.max_connections.max(1),
            max_per_source: limits.max_per_source.max(1),
            max_unauthenticated: limits.max_unauthenticated.max(1),
        };
        Arc::new(Self {
            limits,
            state: Mutex::new(State::default()),
        })
    }

    pub(crate) fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between statements: a panic elsewhere
        // does not make it unusable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Connections admitted and not yet released: (all, unauthenticated).
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (usize, usize) {
        let state = self.state();
        (state.total, state.unauthenticated.len())
    }

    /// Admits a connection from `ip`, or says why not. `rng` picks whom to
    /// evict when the unauthenticated budget is full.
    pub(crate) fn admit<R: Rng>(
        self: &Arc<Self>,
        ip: IpAddr,
        rng: &mut R,
    ) -> Result<Admitted, Refusal> {
        let source = Source::of(ip);
        let mut state = self.state();
        if state.total >= self.limits.max_connections {
            return Err(Refusal::AtCapacity);
        }
        if state.per_source.get(&source).copied().unwrap_or(0) >= self.limits.max_per_source {
            return Err(Refusal::SourceLimit);
        }
        let mut evicted = None;
        if state.unauthenticated.len() >= self.limits.max_unauthenticated {
            let heaviest = state
                .unauthenticated_per_source
                .values()
                .copied()
                .max()
                .unwrap_or(0);
            let own = state
                .unauthenticated_per_source
                .get(&source)
                .copied()
                .unwrap_or(0);
            if own >= heaviest {
                return Err(Refusal::Unauthenticated);
            }
            let candidates: Vec<u64> = state
                .unauthenticated
                .iter()
                .filter(|p| state.unauthenticated_per_source.get(&p.source) == Some(&heaviest))
                .map(|p| p.id)
                .collect();
            let Some(&victim) = candidates.choose(rng) else {
                return Err(Refusal::Unauthenticated);
            };
            if let Some(pending) = state.remove_unauthenticated(victim) {
                pending.evict.cancel();
                evicted = Some(pending.source);
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        state.total += 1;
        *state.per_source.entry(source).or_insert(0) += 1;
        *state.unauthenticated_per_source.entry(source).or_insert(0) += 1;
        let evict = CancellationToken::new();
        state.unauthenticated.push(Pending {
            id,
            source,
            evict: evict.clone(),
        });
        Ok(Admitted {
            ticket: Ticket {
                admission: Arc::clone(self),
                id,
                source,
                evicted: evict,
                authenticated: false,
            },
            evicted,
        })
    }
}

impl Ticket {
    /// Cancelled when another connection took this one's slot; never after
    /// [`authenticated`](Self::authenticated).
    pub(crate) fn evicted(&self) -> &CancellationToken {
        &self.evicted
    }

    /// The connection authenticated: it leaves the unauthenticated budget
    /// and can no longer be evicted. Idempotent.
    pub(crate) fn authenticated(&mut self) {
        if self.authenticated {
            return;
        }
        self.authenticated = true;
        self.admission.state().remove_unauthenticated(self.id);
    }

    /// Whether [`authenticated`](Self::authenticated) was called.
    pub(crate) fn is_authenticated(&self) -> bool {
        self.authenticated
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.admission.state();
        state.remove_unauthenticated(self.id);
        state.total -= 1;
        decrement(&mut state.per_source, self.source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn limits(max: usize, per_source: usize, unauth: usize) -> Arc<Admission> {
        Admission::new(AdmissionLimits {
            max_connections: max,
            max_per_source: per_source,
            max_unauthenticated: unauth,
        })
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn admits_a_source_up_to_its_limit_and_refuses_one_more() {
        let a = limits(100, 3, 100);
        let mut rng = StdRng::seed_from_u64(1);
        let held: Vec<_> = (0..3).map(|_| a.admit(ip(2), &mut rng).unwrap()).collect();
        assert_eq!(a.admit(ip(2), &mut rng).unwrap_err(), Refusal::SourceLimit);
        assert!(
            a.admit(ip(3), &mut rng).is_ok(),
            "other sources still get in"
        );
        drop(held);
        assert!(a.admit(ip(2), &mut rng).is_ok(), "released on drop");
    }

    #[test]
    fn refuses_past_the_global_cap() {
        let a = limits(2, 10, 10);
        let mut rng = StdRng::seed_from_u64(1);
        let _one = a.admit(ip(2), &mut rng).unwrap();
        let _two = a.admit(ip(3), &mut rng).unwrap();
        assert_eq!(a.admit(ip(4), &mut rng).unwrap_err(), Refusal::AtCapacity);
    }

    #[test]
    fn a_full_unauthenticated_budget_evicts_from_the_heaviest_source() {
        let a = limits(100, 10, 4);
        let mut rng = StdRng::seed_from_u64(7);
        let heavy: Vec<_> = (0..3).map(|_| a.admit(ip(2), &mut rng).unwrap()).collect();
        let light = a.admit(ip(3), &mut rng).unwrap();
        assert_eq!(a.counts(), (4, 4));

        // The heaviest source itself is refused rather than evicting.
        assert_eq!(
            a.admit(ip(2), &mut rng).unwrap_err(),
            Refusal::Unauthenticated
        );
        // A newcomer from elsewhere takes one of the heavy source's slots.
        let newcomer = a.admit(ip(4), &mut rng).unwrap();
        assert_eq!(newcomer.evicted, Some(Source::of(ip(2))));
        let evicted = heavy
            .iter()
            .filter(|t| t.ticket.evicted().is_cancelled())
            .count();
        assert_eq!(evicted, 1);
        assert!(!light.ticket.evicted().is_cancelled());
        // The evicted connection still counts until its task ends.
        assert_eq!(a.counts(), (5, 4));
        drop(heavy);
        assert_eq!(a.counts(), (2, 2));
    }

    #[test]
    fn an_authenticated_connection_is_never_evicted_and_frees_the_budget() {
        let a = limits(100, 10, 2);
        let mut rng = StdRng::seed_from_u64(3);
        let mut first = a.admit(ip(2), &mut rng).unwrap();
        first.ticket.authenticated();
        first.ticket.authenticated();
        assert!(first.ticket.is_authenticated());
        let _b = a.admit(ip(3), &mut rng).unwrap();
        let _c = a.admit(ip(4), &mut rng).unwrap();
        assert_eq!(a.counts(), (3, 2));
        let newcomers: Vec<_> = (5..50)
            .map(|last| a.admit(ip(last), &mut rng).unwrap())
            .collect();
        assert!(!first.ticket.evicted().is_cancelled());
        assert_eq!(a.counts(), (48, 2));
        drop(first);
        assert_eq!(
            a.counts(),
            (47, 2),
            "its slot is released, the budget is not"
        );
        drop(newcomers);
    }

    #[test]
    fn a_client_among_many_attackers_survives_while_they_hold_more() {
        // 39 attacking addresses refill a budget of 64 without pause; a
        // client holding one connection is evicted only when every source
        // holds at most one.
        let a = limits(1000, 16, 64);
        let mut rng = StdRng::seed_from_u64(11);
        let mut held = Vec::new();
        for round in 0..20u8 {
            for last in 2..41u8 {
                if let Ok(t) = a.admit(ip(last), &mut rng) {
                    held.push(t);
                }
            }
            let _ = round;
        }
        let client = a.admit(ip(1), &mut rng).unwrap();
        for _ in 0..10 {
            for last in 2..41u8 {
                if let Ok(t) = a.admit(ip(last), &mut rng) {
                    held.push(t);
                }
            }
        }
        assert!(!client.ticket.evicted().is_cancelled());
    }

    #[test]
    fn groups_ipv6_by_64_and_unmaps_ipv4() {
        let a: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert_eq!(Source::of(mapped), Source::of(ip(2)));
        assert_eq!(Source::of(a).to_string(), "2001:db8:1:2::/64");
    }
}
