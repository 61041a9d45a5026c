//! The bounded gossip queue: which updates ride on the next outgoing message.
//!
//! Modelled on memberlist's `TransmitLimitedQueue`: one entry per member (a
//! newer update about a member replaces the older one), each entry is sent a
//! limited number of times, and the least-sent, newest entries go first.

use libp2p::PeerId;

use super::{Meta, Update};

/// Most updates waiting to be gossiped. The queue holds at most one entry per
/// member, so in steady state it is far below this; the bound only bites under
/// mass churn in a full table, where dropping the most-sent, oldest updates is
/// harmless: probes and the buddy rule re-derive any state that matters.
pub const MAX_BROADCASTS: usize = 512;

/// One queued update.
struct Item<M> {
    /// What is gossiped.
    update: Update<M>,
    /// How many messages have carried it so far.
    transmits: u32,
    /// Our own refutations jump the queue so a suspicion is answered before it
    /// turns into a death.
    priority: bool,
    /// Insertion order, to prefer newer updates among equally-sent ones.
    order: u64,
}

/// The broadcast queue. Deterministic: no randomness, no clock.
pub(super) struct Queue<M> {
    /// Queued updates, at most [`MAX_BROADCASTS`], at most one per member id.
    items: Vec<Item<M>>,
    /// Next insertion order number.
    next_order: u64,
}

impl<M: Meta> Queue<M> {
    pub(super) fn new() -> Self {
        Self {
            items: Vec::new(),
            next_order: 0,
        }
    }

    /// Queues `update`, replacing any queued update about the same member.
    pub(super) fn push(&mut self, update: Update<M>, priority: bool) {
        self.items.retain(|i| i.update.id != update.id);
        self.items.push(Item {
            update,
            transmits: 0,
            priority,
            order: self.next_order,
        });
        self.next_order = self.next_order.wrapping_add(1);
        while self.items.len() > MAX_BROADCASTS {
            // Drop the lowest-priority entry: not prioritised, most sent, oldest.
            let victim = self
                .items
                .iter()
                .enumerate()
                .min_by_key(|(_, i)| (i.priority, std::cmp::Reverse(i.transmits), i.order))
                .map(|(idx, _)| idx);
            match victim {
                Some(idx) => {
                    self.items.swap_remove(idx);
                }
                None => break,
            }
        }
    }

    /// Forgets anything queued about `id`.
    pub(super) fn remove(&mut self, id: &PeerId) {
        self.items.retain(|i| &i.update.id != id);
    }

    /// Takes up to `max` updates for one message, skipping updates about the
    /// ids in `skip` (already on the message). Each taken update counts as one
    /// transmission; updates sent `limit` times are dropped.
    pub(super) fn select(&mut self, skip: &[PeerId], max: usize, limit: u32) -> Vec<Update<M>> {
        if max == 0 || self.items.is_empty() {
            return Vec::new();
        }
        self.items.sort_by_key(|i| {
            (
                std::cmp::Reverse(i.priority),
                i.transmits,
                std::cmp::Reverse(i.order),
            )
        });
        let mut out = Vec::with_capacity(max.min(self.items.len()));
        for item in self.items.iter_mut() {
            if out.len() >= max {
                break;
            }
            if skip.contains(&item.update.id) {
                continue;
            }
            item.transmits = item.transmits.saturating_add(1);
            out.push(item.update.clone());
        }
        self.items.retain(|i| i.transmits < limit);
        out
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }
}
