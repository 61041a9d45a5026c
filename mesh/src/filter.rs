//! The traffic filter: which racks' traffic this rack drops, on the
//! orders of a drill (`fieldrack drill`).
//!
//! A drill must work on real racks, on whatever radio links join them, so
//! faults are not firewall rules but decisions of the mesh itself: the
//! swarm actor drops SWIM and revocation messages to or from a filtered
//! rack (requests and their responses), and a rack filtered either way is
//! left out of the admitted set that stream users read, so no raw stream
//! (Raft calls, volume pushes, cache copies) is opened to it or accepted
//! from it, and the bulk plane closes its connections. A stream needs both
//! directions, so a one-way cut stops every stream between the two racks;
//! SWIM messages are dropped in the named direction only. A *silent* rack
//! (power cut) drops every connection, accepts none and dials nobody.
//!
//! The filter is pure data; [`crate::MeshHandle::set_filter`] installs it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Most racks one filter names in each direction: a filter names racks of
/// one field, which has at most as many members as membership keeps
/// (`membership::MAX_MEMBERS`).
pub const MAX_FILTERED_RACKS: usize = 1024;

/// What this rack drops.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficFilter {
    /// Drop everything, both ways, as if this rack had no power.
    #[serde(default)]
    pub silent: bool,
    /// Racks whose messages are dropped on arrival.
    #[serde(default)]
    pub drop_from: BTreeSet<String>,
    /// Racks this rack sends nothing to.
    #[serde(default)]
    pub drop_to: BTreeSet<String>,
}

/// Why a filter is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FilterError {
    /// It names more racks than a field has.
    #[error("the filter names {0} racks in one direction (at most {MAX_FILTERED_RACKS})")]
    TooManyRacks(usize),
}

impl TrafficFilter {
    /// Whether it drops nothing.
    #[must_use]
    pub fn is_open(&self) -> bool {
        !self.silent && self.drop_from.is_empty() && self.drop_to.is_empty()
    }

    /// Whether a message from `rack` (None: name not known yet) is read.
    #[must_use]
    pub fn passes_from(&self, rack: Option<&str>) -> bool {
        !self.silent && rack.is_none_or(|r| !self.drop_from.contains(r))
    }

    /// Whether a message to `rack` (None: name not known yet) is sent.
    #[must_use]
    pub fn passes_to(&self, rack: Option<&str>) -> bool {
        !self.silent && rack.is_none_or(|r| !self.drop_to.contains(r))
    }

    /// Whether streams to and from `rack` are carried (they need both
    /// directions).
    #[must_use]
    pub fn carries_streams(&self, rack: Option<&str>) -> bool {
        self.passes_from(rack) && self.passes_to(rack)
    }

    /// Check the bounds.
    ///
    /// # Errors
    /// [`FilterError::TooManyRacks`].
    pub fn validate(&self) -> Result<(), FilterError> {
        let n = self.drop_from.len().max(self.drop_to.len());
        if n > MAX_FILTERED_RACKS {
            return Err(FilterError::TooManyRacks(n));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(r: &[&str]) -> BTreeSet<String> {
        r.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn directions_table() {
        let one_way = TrafficFilter {
            silent: false,
            drop_from: set(&[]),
            drop_to: set(&["b"]),
        };
        let silent = TrafficFilter {
            silent: true,
            ..TrafficFilter::default()
        };
        // (filter, rack, from, to, streams)
        let cases: [(&TrafficFilter, Option<&str>, bool, bool, bool); 6] = [
            (&TrafficFilter::default(), Some("b"), true, true, true),
            (&one_way, Some("b"), true, false, false),
            (&one_way, Some("c"), true, true, true),
            (&one_way, None, true, true, true),
            (&silent, Some("c"), false, false, false),
            (&silent, None, false, false, false),
        ];
        for (f, rack, from, to, streams) in cases {
            assert_eq!(f.passes_from(rack), from, "{f:?} from {rack:?}");
            assert_eq!(f.passes_to(rack), to, "{f:?} to {rack:?}");
            assert_eq!(f.carries_streams(rack), streams, "{f:?} streams {rack:?}");
        }
        assert!(TrafficFilter::default().is_open());
        assert!(!one_way.is_open());
        assert!(!silent.is_open());
    }

    #[test]
    fn bounded() {
        let big = TrafficFilter {
            drop_from: (0..=MAX_FILTERED_RACKS).map(|i| format!("r{i}")).collect(),
            ..TrafficFilter::default()
        };
        assert_eq!(
            big.validate(),
            Err(FilterError::TooManyRacks(MAX_FILTERED_RACKS + 1))
        );
        assert_eq!(TrafficFilter::default().validate(), Ok(()));
    }
}
