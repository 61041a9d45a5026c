//! The field's backhaul quota, granted through the log.
//!
//! `field_daily_quota_bytes` caps what all racks' uplinks fetch in one UTC
//! day. Gossip alone cannot enforce a cap: two racks that each see the
//! other's last report spend the same remainder twice. So the bytes are
//! *granted*: a rack with an uplink asks with every lease renewal
//! ([`BackhaulUse`] in its [`RackReport`]), and the state machine, applying
//! renewals one after another in log order, hands out byte grants whose
//! sum never exceeds the quota. A rack starts an upstream fetch only while
//! its uplink has used less than its grant.
//!
//! - **Sizing.** A grant adds `min(want, max(left / (2 n), min(left,
//!   quota / 64)))` bytes, `left` being the quota minus what every rack
//!   holds (the larger of its grant and its use) and `n` the racks holding
//!   grants today: each asking rack gets an even share of half of what is
//!   left, so a busy rack cannot starve one that asks later, and the pool
//!   halves rather than emptying at once; the last 1/64 of the quota goes
//!   in whole pieces. `want` is the rack's own need (what it used lately,
//!   a few seconds of its uplink's rate), so an idle rack holds little.
//! - **Overshoot.** A fetch that started within the grant finishes (a
//!   half-delivered object helps no one): a rack's use may pass its grant
//!   by the objects in flight at that moment. The rack reports its use,
//!   and use above a grant counts as held, so the next grants shrink by it.
//! - **Days.** The ledger follows the newest day any rack reports (UTC,
//!   from the racks' clocks); an ask for an older day gets nothing new, so
//!   around midnight a rack whose clock is a little behind waits those
//!   seconds (a clock a day off is what `fieldrack doctor`'s clock check
//!   is for).
//! - **Dead uplinks.** A rack whose uplink has been down for a few seconds
//!   gives back the unused part of its grant with its renewals (`release`),
//!   so a quota held by a rack whose satellite link died goes to the racks
//!   whose links work; it asks again once its uplink is back.
//! - **Partitions.** A rack cut off from the majority gets no new grant
//!   (its renewals do not commit): it spends what it holds, then refuses
//!   misses with the quota's 503 until it is back.
//!
//! Pure and deterministic, like the rest of [`crate::field`].
//!
//! [`RackReport`]: crate::field::RackReport

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The smallest grant, as a fraction of the quota, while at least that
/// much is left: smaller ones would cost a renewal round per few objects.
pub const MIN_GRANT_DIVISOR: u64 = 64;

/// What a rack's uplink used and needs, sent with its renewal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackhaulUse {
    /// The UTC day (Unix seconds / 86 400) on the rack's clock.
    pub day: u64,
    /// The field's daily quota in the rack's configuration.
    pub field_quota_bytes: u64,
    /// Bytes the rack's uplink fetched that day.
    pub used_today_bytes: u64,
    /// Bytes it asks to be added to its grant (0: it holds enough).
    pub want_bytes: u64,
    /// Its uplink is down: it gives back what it holds of its grant and
    /// did not use, so the racks whose uplinks work can have it.
    #[serde(default)]
    pub release: bool,
}

/// One rack's grant for the ledger's day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RackGrant {
    /// Bytes granted in all today.
    pub granted: u64,
    /// Bytes used, as last reported.
    pub used: u64,
}

impl RackGrant {
    /// What the rack holds of the quota: its grant, or its use if a fetch
    /// in flight took it past the grant.
    fn held(self) -> u64 {
        self.granted.max(self.used)
    }
}

/// Today's grants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackhaulLedger {
    /// The UTC day the grants are for.
    pub day: u64,
    /// Grants by rack.
    pub racks: BTreeMap<String, RackGrant>,
}

impl BackhaulLedger {
    /// Takes in `rack`'s renewal report; grants it more if it asks.
    pub fn renewed(&mut self, rack: &str, ask: &BackhaulUse) {
        if ask.field_quota_bytes == 0 || ask.day < self.day {
            return;
        }
        if ask.day > self.day {
            self.day = ask.day;
            self.racks.clear();
        }
        let held_by_others: u64 = self
            .racks
            .iter()
            .filter(|(r, _)| r.as_str() != rack)
            .map(|(_, g)| g.held())
            .fold(0, u64::saturating_add);
        let holders = self.racks.len() as u64 + u64::from(!self.racks.contains_key(rack));
        let entry = self.racks.entry(rack.to_owned()).or_default();
        entry.used = entry.used.max(ask.used_today_bytes);
        if ask.release {
            entry.granted = entry.granted.min(entry.used);
            return;
        }
        if ask.want_bytes == 0 {
            return;
        }
        let held = entry.held();
        let left = ask
            .field_quota_bytes
            .saturating_sub(held_by_others.saturating_add(held));
        let floor = (ask.field_quota_bytes / MIN_GRANT_DIVISOR).max(1);
        let share = (left / (2 * holders)).max(left.min(floor));
        let more = ask.want_bytes.min(share);
        entry.granted = held + more;
    }

    /// What `rack` may fetch on `day` in all, if it holds a grant for it.
    #[must_use]
    pub fn granted(&self, rack: &str, day: u64) -> Option<u64> {
        (self.day == day)
            .then(|| self.racks.get(rack).map(|g| g.granted))
            .flatten()
    }

    /// Bytes held across the field today (grants, or use past them).
    #[must_use]
    pub fn held(&self) -> u64 {
        self.racks
            .values()
            .map(|g| g.held())
            .fold(0, u64::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ask(day: u64, quota: u64, used: u64, want: u64) -> BackhaulUse {
        BackhaulUse {
            day,
            field_quota_bytes: quota,
            used_today_bytes: used,
            want_bytes: want,
            release: false,
        }
    }

    #[test]
    fn a_rack_whose_uplink_died_gives_back_what_it_did_not_use() {
        let mut l = BackhaulLedger::default();
        // a, alone and busy, ends up holding nearly all of a small quota.
        for _ in 0..20 {
            l.renewed("a", &ask(1, 2_500, 100, 64 * 1024));
        }
        assert!(l.granted("a", 1).unwrap() > 2_400);
        l.renewed("b", &ask(1, 2_500, 0, 64 * 1024));
        assert!(l.granted("b", 1).unwrap() < 64, "little is left for b");
        // a's uplink dies: it keeps what it used, gives back the rest.
        l.renewed(
            "a",
            &BackhaulUse {
                release: true,
                ..ask(1, 2_500, 300, 0)
            },
        );
        assert_eq!(l.granted("a", 1), Some(300));
        l.renewed("b", &ask(1, 2_500, 0, 64 * 1024));
        assert!(l.granted("b", 1).unwrap() >= 500, "{l:?}");
        assert!(l.held() <= 2_500);
    }

    #[test]
    fn grants_halve_what_is_left_among_the_racks_that_ask() {
        let mut l = BackhaulLedger::default();
        l.renewed("a", &ask(1, 1 << 30, 0, u64::MAX));
        assert_eq!(l.granted("a", 1), Some(1 << 29));
        l.renewed("b", &ask(1, 1 << 30, 0, u64::MAX));
        // Half of the 512 MiB left, split between the two holders.
        assert_eq!(l.granted("b", 1), Some(1 << 27));
        assert!(l.held() <= 1 << 30);
    }

    #[test]
    fn an_idle_rack_holds_what_it_wants_only() {
        let mut l = BackhaulLedger::default();
        l.renewed("a", &ask(1, 1 << 30, 0, 1 << 20));
        assert_eq!(l.granted("a", 1), Some(1 << 20));
        // Enough held: asking for nothing changes nothing.
        l.renewed("a", &ask(1, 1 << 30, 1000, 0));
        assert_eq!(l.granted("a", 1), Some(1 << 20));
    }

    #[test]
    fn the_last_bytes_go_in_whole_pieces_and_then_nothing_is_granted() {
        let mut l = BackhaulLedger::default();
        let quota = 6400;
        // a holds all but 150 bytes; the floor is 100.
        l.day = 1;
        l.racks.insert(
            "a".into(),
            RackGrant {
                granted: quota - 150,
                used: 0,
            },
        );
        l.renewed("b", &ask(1, quota, 0, 1 << 20));
        assert_eq!(l.granted("b", 1), Some(100), "not 150 / 4");
        l.renewed("b", &ask(1, quota, 100, 1 << 20));
        assert_eq!(l.granted("b", 1), Some(150));
        l.renewed("b", &ask(1, quota, 150, 1 << 20));
        assert_eq!(l.granted("b", 1), Some(150), "nothing left");
        assert_eq!(l.held(), quota);
    }

    #[test]
    fn use_past_a_grant_counts_as_held() {
        let mut l = BackhaulLedger::default();
        l.renewed("a", &ask(1, 10_000, 0, 4_000));
        assert_eq!(l.granted("a", 1), Some(4_000));
        // A fetch in flight took a to 5 000.
        l.renewed("a", &ask(1, 10_000, 5_000, 0));
        l.renewed("b", &ask(1, 10_000, 0, 100_000));
        // Half of the 5 000 left (not 6 000), split between the two.
        assert_eq!(l.granted("b", 1), Some(1_250));
        assert_eq!(l.held(), 6_250);
    }

    #[test]
    fn a_new_day_starts_afresh_and_an_old_day_gets_nothing() {
        let mut l = BackhaulLedger::default();
        l.renewed("a", &ask(5, 1000, 0, 1000));
        assert_eq!(l.granted("a", 5), Some(500));
        l.renewed("b", &ask(4, 1000, 0, 1000));
        assert_eq!(l.granted("b", 4), None);
        l.renewed("a", &ask(6, 1000, 0, 1000));
        assert_eq!(l.granted("a", 5), None);
        assert_eq!(l.granted("a", 6), Some(500));
    }

    #[test]
    fn no_field_quota_no_ledger() {
        let mut l = BackhaulLedger::default();
        l.renewed("a", &ask(5, 0, 10, 1000));
        assert_eq!(l, BackhaulLedger::default());
    }

    proptest! {
        /// Whatever racks ask, in whatever order: the grants never add up
        /// to more than the quota, and a rack that kept within its grant
        /// never pushes the field past it.
        #[test]
        fn grants_never_exceed_the_quota(
            quota in 1u64..10_000_000,
            asks in prop::collection::vec((0usize..5, 0u64..4_000_000, any::<bool>()), 1..200),
        ) {
            let mut l = BackhaulLedger::default();
            let mut used = [0u64; 5];
            for (rack, want, spend) in asks {
                let name = format!("r{rack}");
                l.renewed(&name, &ask(1, quota, used[rack], want));
                let granted = l.granted(&name, 1).unwrap();
                if spend {
                    used[rack] = granted;
                }
                let total: u64 = l.racks.values().map(|g| g.granted).sum();
                prop_assert!(total <= quota, "{total} granted of {quota}");
                prop_assert!(l.held() <= quota);
            }
        }
    }
}
