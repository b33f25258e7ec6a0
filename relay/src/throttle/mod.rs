//! The support-key brute-force guard: a sans-IO rate limiter of failed key attempts.
//!
//! A support key is 9 digits, so the key space (10^9) is small enough that only a
//! failure budget keeps it safe. Two budgets apply, and an attempt must pass both:
//!
//! - **per address**: at most `per_address_failures` failures within `window`; the next
//!   one starts a lock-out of `lockout_base`, doubling with each further lock-out of that
//!   address up to `lockout_max`. IPv6 addresses are grouped by their /64, since one
//!   host usually owns a whole /64.
//! - **node-wide**: `node_failures` failures within `window`, across all addresses, are
//!   free; once they are spent, an attempt is looked up only with a solved proof-of-work
//!   [`challenge`] ([`Verdict::NeedsProof`]), so that many addresses together cannot
//!   sweep the key space cheaply, and a customer with the right key still gets in after
//!   a moment of work instead of being refused. The difficulty starts at
//!   `challenge_bits` and grows by one bit each time the failures past the budget
//!   double (up to `challenge_max_bits`), so the faster someone guesses, the more each
//!   guess costs.
//!
//! While throttled (an address locked out), an attempt is refused **without being
//! looked up**, so a correct key does not get through either. Support links (128-bit
//! tokens, not guessable) are never held by these budgets: they have a throttle of
//! their own, per address only ([`KeyThrottle::per_address_only`]), for unknown links.
//! The tracked addresses are bounded
//! (`max_tracked_addresses`); beyond it the least recently seen entry that is not locked
//! out is forgotten. Like the rest of the core it reads no clock: every call takes `now`.

pub mod challenge;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Limits of the guard; built from `[limits]` in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleSettings {
    /// Failures one address may have within `window` before it is locked out.
    pub per_address_failures: u32,
    /// The sliding window the failure counts cover.
    pub window: Duration,
    /// The first lock-out of an address.
    pub lockout_base: Duration,
    /// The longest lock-out (lock-outs double up to this).
    pub lockout_max: Duration,
    /// Failures the whole node may see within `window` before attempts need a proof.
    pub node_failures: u32,
    /// Most addresses tracked at once (memory bound).
    pub max_tracked_addresses: usize,
    /// Difficulty (leading zero bits) of the first challenge once the node budget is spent.
    pub challenge_bits: u8,
    /// The most the difficulty grows to under a sustained sweep.
    pub challenge_max_bits: u8,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        ThrottleSettings {
            per_address_failures: 30,
            window: Duration::from_secs(60),
            lockout_base: Duration::from_secs(60),
            lockout_max: Duration::from_secs(3600),
            node_failures: 300,
            max_tracked_addresses: 100_000,
            challenge_bits: 18,
            challenge_max_bits: 22,
        }
    }
}

/// Which budget refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The source address's own budget.
    Address,
    /// The node-wide budget.
    Node,
}

impl Scope {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Address => "address",
            Scope::Node => "node",
        }
    }
}

/// Whether an attempt may be looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Allow,
    /// The node-wide budget is spent: look the attempt up only if it comes with a
    /// solved challenge of this many bits; otherwise hand it one.
    NeedsProof {
        /// The difficulty a new challenge gets now.
        bits: u8,
    },
    /// Refuse without looking the key up.
    Throttled {
        /// When the caller may try again.
        retry_after: Duration,
        /// Which budget is spent.
        scope: Scope,
    },
}

/// How an address is grouped: IPv4 as is, IPv6 by its /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AddressKey(u128);

impl AddressKey {
    fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(v4) => AddressKey(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey(u128::from(u32::from(v4))),
                None => AddressKey((u128::from(v6) >> 64) | (1 << 127)),
            },
        }
    }
}

#[derive(Debug)]
struct AddressRecord {
    failures: VecDeque<Instant>,
    locked_until: Option<Instant>,
    /// Lock-outs so far; the next lasts `lockout_base * 2^lockouts`.
    lockouts: u32,
    last_seen: Instant,
}

/// The lock-outs one failure started (it can start both: the failure that spends the
/// node budget may also spend its address's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Started {
    /// The address's lock-out started.
    pub address: bool,
    /// The node budget is spent from now on (attempts need a proof).
    pub node: bool,
}

impl Started {
    /// The scopes started, address first.
    pub fn scopes(self) -> impl Iterator<Item = Scope> {
        [
            self.address.then_some(Scope::Address),
            self.node.then_some(Scope::Node),
        ]
        .into_iter()
        .flatten()
    }
}

/// The guard itself; one per node.
#[derive(Debug)]
pub struct KeyThrottle {
    settings: ThrottleSettings,
    addresses: HashMap<AddressKey, AddressRecord>,
    /// Whether the node-wide budget applies (not for support links).
    node_wide: bool,
    /// Node-wide failures, one entry per failure, oldest first (bounded by `node_failures`).
    node_failures: VecDeque<Instant>,
    /// Failures past the node budget within the window (with proofs), oldest first;
    /// bounded by the count that reaches `challenge_max_bits`.
    over_budget: VecDeque<Instant>,
}

impl KeyThrottle {
    /// A guard with these limits.
    pub fn new(settings: ThrottleSettings) -> Self {
        KeyThrottle {
            settings,
            addresses: HashMap::new(),
            node_wide: true,
            node_failures: VecDeque::new(),
            over_budget: VecDeque::new(),
        }
    }

    /// A guard of the per-address budget alone (for unknown support links, which no
    /// sweep can find, so that no node-wide budget is needed to protect them).
    pub fn per_address_only(settings: ThrottleSettings) -> Self {
        KeyThrottle {
            node_wide: false,
            ..KeyThrottle::new(settings)
        }
    }

    /// The difficulty of a challenge handed out now: `challenge_bits`, plus one for
    /// each doubling of the failures past the node budget, up to `challenge_max_bits`.
    pub fn challenge_bits(&self) -> u8 {
        let s = &self.settings;
        let over = self.over_budget.len() as u64;
        let budget = u64::from(s.node_failures.max(1));
        // floor(log2(1 + over / budget))
        let extra = (1 + over / budget).ilog2();
        let bits = u32::from(s.challenge_bits) + extra;
        bits.min(u32::from(s.challenge_max_bits.max(s.challenge_bits))) as u8
    }

    /// Whether the node budget is spent now (attempts need proofs).
    pub fn needs_proof(&mut self, now: Instant) -> bool {
        self.expire_node(now);
        self.node_wide && self.node_failures.len() >= self.settings.node_failures as usize
    }

    /// Whether an attempt from `addr` may be looked up now.
    pub fn check(&mut self, now: Instant, addr: IpAddr) -> Verdict {
        self.expire_node(now);
        let mut retry = None;
        if let Some(rec) = self.addresses.get_mut(&AddressKey::of(addr)) {
            rec.last_seen = now;
            if let Some(until) = rec.locked_until.filter(|t| *t > now) {
                retry = Some((until - now, Scope::Address));
            }
        }
        match retry {
            Some((retry_after, scope)) => Verdict::Throttled {
                retry_after: retry_after.max(Duration::from_secs(1)),
                scope,
            },
            None if self.needs_proof(now) => Verdict::NeedsProof {
                bits: self.challenge_bits(),
            },
            None => Verdict::Allow,
        }
    }

    /// Counts a failed attempt from `addr`. Returns the lock-outs this failure started.
    pub fn record_failure(&mut self, now: Instant, addr: IpAddr) -> Started {
        self.expire_node(now);
        let mut started = Started::default();
        let node_limit = self.settings.node_failures as usize;
        if self.node_wide && self.node_failures.len() < node_limit {
            self.node_failures.push_back(now);
            started.node = self.node_failures.len() == node_limit;
        } else if self.node_wide {
            let s = &self.settings;
            let cap = node_limit.max(1)
                << s.challenge_max_bits
                    .saturating_sub(s.challenge_bits)
                    .min(20);
            if self.over_budget.len() >= cap {
                self.over_budget.pop_front();
            }
            self.over_budget.push_back(now);
        }

        let key = AddressKey::of(addr);
        if !self.addresses.contains_key(&key) {
            self.make_room(now);
        }
        let settings = &self.settings;
        let rec = self.addresses.entry(key).or_insert_with(|| AddressRecord {
            failures: VecDeque::new(),
            locked_until: None,
            lockouts: 0,
            last_seen: now,
        });
        rec.last_seen = now;
        while rec
            .failures
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= settings.window)
        {
            rec.failures.pop_front();
        }
        rec.failures.push_back(now);
        if rec.failures.len() >= settings.per_address_failures as usize {
            let factor = 1u32.checked_shl(rec.lockouts.min(31)).unwrap_or(u32::MAX);
            let lockout = settings
                .lockout_base
                .saturating_mul(factor)
                .min(settings.lockout_max);
            rec.locked_until = Some(now + lockout);
            rec.lockouts = rec.lockouts.saturating_add(1);
            rec.failures.clear();
            started.address = true;
        }
        started
    }

    /// A correct key from `addr`: its recent failures are forgiven (a customer who
    /// mistyped twice), but not its lock-out history.
    pub fn record_success(&mut self, now: Instant, addr: IpAddr) {
        if let Some(rec) = self.addresses.get_mut(&AddressKey::of(addr)) {
            rec.failures.clear();
            rec.last_seen = now;
        }
    }

    /// Forgets addresses that have nothing left to remember: no failure in the window,
    /// no lock-out running, and quiet for `lockout_max` (after which their lock-out
    /// history is forgiven too). Call now and then (the node does, every minute).
    pub fn prune(&mut self, now: Instant) {
        self.expire_node(now);
        let s = &self.settings;
        self.addresses.retain(|_, rec| {
            let locked = rec.locked_until.is_some_and(|t| t > now);
            let recent = rec
                .failures
                .back()
                .is_some_and(|t| now.saturating_duration_since(*t) < s.window);
            let remembered = now.saturating_duration_since(rec.last_seen) < s.lockout_max;
            locked || recent || (rec.lockouts > 0 && remembered)
        });
    }

    /// How many addresses are tracked (for tests and metrics).
    pub fn tracked_addresses(&self) -> usize {
        self.addresses.len()
    }

    fn expire_node(&mut self, now: Instant) {
        let window = self.settings.window;
        for queue in [&mut self.node_failures, &mut self.over_budget] {
            while queue
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) >= window)
            {
                queue.pop_front();
            }
        }
    }

    /// Keeps the table under its bound: first prune, then forget the least recently
    /// seen address that is not locked out (an attacker rotating addresses is held by
    /// the node-wide budget anyway).
    fn make_room(&mut self, now: Instant) {
        if self.addresses.len() < self.settings.max_tracked_addresses {
            return;
        }
        self.prune(now);
        if self.addresses.len() < self.settings.max_tracked_addresses {
            return;
        }
        let victim = self
            .addresses
            .iter()
            .filter(|(_, r)| r.locked_until.is_none_or(|t| t <= now))
            .min_by_key(|(_, r)| r.last_seen)
            .or_else(|| self.addresses.iter().min_by_key(|(_, r)| r.last_seen))
            .map(|(k, _)| *k);
        if let Some(k) = victim {
            self.addresses.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    fn settings() -> ThrottleSettings {
        ThrottleSettings {
            per_address_failures: 3,
            window: Duration::from_secs(60),
            lockout_base: Duration::from_secs(60),
            lockout_max: Duration::from_secs(300),
            node_failures: 10,
            max_tracked_addresses: 100,
            challenge_bits: 8,
            challenge_max_bits: 10,
        }
    }

    #[test]
    fn address_is_locked_after_its_budget_and_lockouts_double_up_to_the_max() {
        let mut t = KeyThrottle::new(settings());
        let mut now = Instant::now();
        let mut lockouts = Vec::new();
        for _round in 0..5 {
            for i in 0..3 {
                assert_eq!(t.check(now, v4(1)), Verdict::Allow);
                let started = t.record_failure(now, v4(1));
                assert_eq!(started.address, i == 2);
            }
            match t.check(now, v4(1)) {
                Verdict::Throttled { retry_after, scope } => {
                    assert_eq!(scope, Scope::Address);
                    lockouts.push(retry_after.as_secs());
                    now += retry_after;
                }
                other => panic!("not locked out: {other:?}"),
            }
            // Other addresses are unaffected.
            assert_eq!(t.check(now, v4(2)), Verdict::Allow);
            // Let the node-wide window pass so only the address budget matters.
            now += Duration::from_secs(61);
        }
        assert_eq!(lockouts, vec![60, 120, 240, 300, 300]);
    }

    #[test]
    fn failures_outside_the_window_do_not_count() {
        let mut t = KeyThrottle::new(settings());
        let mut now = Instant::now();
        for _ in 0..10 {
            t.record_failure(now, v4(1));
            t.record_failure(now, v4(1));
            now += Duration::from_secs(61);
            assert_eq!(t.check(now, v4(1)), Verdict::Allow);
        }
    }

    #[test]
    fn a_spent_node_budget_asks_every_address_for_a_proof_until_the_window_passes() {
        let mut t = KeyThrottle::new(settings());
        let now = Instant::now();
        let mut started = Vec::new();
        for i in 0..10 {
            started.push(t.record_failure(now, v4(i)));
        }
        assert!(started[..9].iter().all(|s| !s.node));
        assert_eq!(started.last().map(|s| s.node), Some(true));
        // A never-seen address is not refused: it is asked for work.
        assert_eq!(
            t.check(now + Duration::from_secs(10), v4(200)),
            Verdict::NeedsProof { bits: 8 }
        );
        assert_eq!(
            t.check(now + Duration::from_secs(60), v4(200)),
            Verdict::Allow
        );
    }

    #[test]
    fn the_failure_that_spends_both_budgets_starts_both_lock_outs() {
        let mut s = settings();
        s.node_failures = 3;
        let mut t = KeyThrottle::new(s);
        let now = Instant::now();
        t.record_failure(now, v4(1));
        t.record_failure(now, v4(1));
        let started = t.record_failure(now, v4(1));
        assert_eq!(
            started.scopes().collect::<Vec<_>>(),
            vec![Scope::Address, Scope::Node]
        );
    }

    #[test]
    fn the_difficulty_grows_a_bit_per_doubling_past_the_budget_up_to_the_max() {
        let mut t = KeyThrottle::new(settings());
        let now = Instant::now();
        let mut bits = Vec::new();
        for i in 0..10 + 80 {
            // Each from its own address, as a sweep from many addresses would be.
            t.record_failure(now, IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)));
            bits.push(t.challenge_bits());
        }
        // 10 free; past them: <10 over → 8 bits, 10..29 over → 9, 30.. → 10 (the max).
        assert_eq!(bits[9], 8);
        assert_eq!(bits[10 + 9], 9);
        assert_eq!(bits[10 + 29], 10);
        assert_eq!(*bits.last().expect("bits"), 10);
        // The window passes: back to free attempts.
        assert_eq!(
            t.check(now + Duration::from_secs(60), v4(1)),
            Verdict::Allow
        );
        assert_eq!(t.challenge_bits(), 8);
    }

    #[test]
    fn a_link_throttle_has_no_node_budget() {
        let mut t = KeyThrottle::per_address_only(settings());
        let now = Instant::now();
        for i in 0..50 {
            assert!(!t.record_failure(now, v4(i)).node);
        }
        assert_eq!(t.check(now, v4(200)), Verdict::Allow);
        // Its per-address budget still holds.
        for _ in 0..3 {
            t.record_failure(now, v4(201));
        }
        assert!(matches!(t.check(now, v4(201)), Verdict::Throttled { .. }));
    }

    #[test]
    fn ipv6_is_grouped_by_slash_64() {
        let mut t = KeyThrottle::new(settings());
        let now = Instant::now();
        for i in 0..3u16 {
            t.record_failure(
                now,
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, i)),
            );
        }
        let sibling = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 9, 9, 9, 9));
        let other = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1));
        assert!(matches!(t.check(now, sibling), Verdict::Throttled { .. }));
        assert_eq!(t.check(now, other), Verdict::Allow);
    }

    #[test]
    fn success_forgives_recent_failures() {
        let mut t = KeyThrottle::new(settings());
        let now = Instant::now();
        t.record_failure(now, v4(1));
        t.record_failure(now, v4(1));
        t.record_success(now, v4(1));
        assert_eq!(t.record_failure(now, v4(1)), Started::default());
        assert_eq!(t.check(now, v4(1)), Verdict::Allow);
    }

    #[test]
    fn table_stays_bounded_and_prune_forgets_quiet_addresses() {
        let mut s = settings();
        s.max_tracked_addresses = 5;
        s.node_failures = 1_000;
        let mut t = KeyThrottle::new(s);
        let now = Instant::now();
        for i in 0..50 {
            t.record_failure(now, v4(i));
            assert!(t.tracked_addresses() <= 5);
        }
        t.prune(now + Duration::from_secs(61));
        assert_eq!(t.tracked_addresses(), 0);
    }
}
