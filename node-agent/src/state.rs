//! The agent's durable facts, on top of [`Store`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use deploy::Revocation;
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, Tree, MAX_EVENTS};

const INCARNATION_KEY: &[u8] = b"incarnation";

/// One line of the local event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Sequence number, contiguous.
    pub seq: u64,
    /// Unix milliseconds.
    pub at_ms: u64,
    /// What happened, e.g. `peer_state`.
    pub kind: String,
    /// Details.
    pub detail: serde_json::Value,
}

/// What the store held when the agent started.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecoveryReport {
    /// Verified records.
    pub records: usize,
    /// Records that failed verification (skipped).
    pub corrupt: usize,
    /// Events in the log.
    pub events: usize,
    /// First and last event sequence numbers.
    pub event_range: Option<(u64, u64)>,
    /// Whether event sequence numbers were contiguous.
    pub events_contiguous: bool,
}

/// Durable agent state.
#[derive(Clone)]
pub struct AgentState {
    store: Arc<dyn Store>,
    next_event: Arc<AtomicU64>,
}

impl AgentState {
    /// Wrap a store and check everything in it.
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    pub fn open(store: Arc<dyn Store>) -> Result<(Self, RecoveryReport), StoreError> {
        let mut report = RecoveryReport {
            events_contiguous: true,
            ..Default::default()
        };
        for tree in [Tree::Meta, Tree::Revocations, Tree::Volumes, Tree::Drills] {
            let (good, bad) = store.scan(tree)?;
            report.records += good.len();
            report.corrupt += bad;
        }
        let (events, bad) = store.scan(Tree::Events)?;
        report.corrupt += bad;
        report.records += events.len();
        report.events = events.len();
        let seqs: Vec<u64> = events
            .iter()
            .filter_map(|(k, _)| {
                <[u8; 8]>::try_from(k.as_slice())
                    .ok()
                    .map(u64::from_be_bytes)
            })
            .collect();
        if let (Some(first), Some(last)) = (seqs.first(), seqs.last()) {
            report.event_range = Some((*first, *last));
            report.events_contiguous = seqs.windows(2).all(|w| w[1] == w[0] + 1);
        }
        let next = seqs.last().map_or(1, |l| l + 1);
        Ok((
            Self {
                store,
                next_event: Arc::new(AtomicU64::new(next)),
            },
            report,
        ))
    }

    /// Start a new life: the incarnation grows on every start, also when the
    /// store was lost (it never goes below the clock in seconds).
    ///
    /// # Errors
    /// [`StoreError`]: the agent must not start with an incarnation it could
    /// reuse after a crash.
    pub fn bump_incarnation(&self, unix_secs: u64) -> Result<u64, StoreError> {
        let old = match self.store.get(Tree::Meta, INCARNATION_KEY) {
            Ok(Some(v)) => <[u8; 8]>::try_from(v.as_slice())
                .map(u64::from_le_bytes)
                .unwrap_or(0),
            Ok(None) => 0,
            Err(StoreError::Corrupt { reason, .. }) => {
                tracing::error!(%reason, "incarnation record corrupt; falling back to the clock");
                0
            }
            Err(e) => return Err(e),
        };
        let new = (old + 1).max(unix_secs);
        self.store
            .put_durable(Tree::Meta, INCARNATION_KEY, &new.to_le_bytes())?;
        Ok(new)
    }

    /// Every stored revocation.
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    pub fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        let (entries, _) = self.store.scan(Tree::Revocations)?;
        Ok(entries
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
    }

    /// Store a revocation durably, keyed by the revoked PeerId.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn add_revocation(&self, peer_id: &str, rev: &Revocation) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(rev).expect("Revocation serializes");
        self.store
            .put_durable(Tree::Revocations, peer_id.as_bytes(), &bytes)
    }

    /// Replication bookkeeping of every volume.
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    pub fn volume_records(
        &self,
    ) -> Result<std::collections::HashMap<String, crate::volumes::VolumeRecord>, StoreError> {
        let (entries, _) = self.store.scan(Tree::Volumes)?;
        Ok(entries
            .into_iter()
            .filter_map(|(k, v)| {
                Some((String::from_utf8(k).ok()?, serde_json::from_slice(&v).ok()?))
            })
            .collect())
    }

    /// Store one volume's replication bookkeeping durably (it decides
    /// where copies are; losing it would re-place replicas needlessly).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn put_volume_record(
        &self,
        volume: &str,
        rec: &crate::volumes::VolumeRecord,
    ) -> Result<(), StoreError> {
        self.store.put_durable(
            Tree::Volumes,
            volume.as_bytes(),
            &serde_json::to_vec(rec).expect("record serializes"),
        )
    }

    /// Append to the event log (flushed with the next durable write, or by
    /// sled's periodic flush), trimming the oldest beyond [`MAX_EVENTS`].
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn record_event(&self, kind: &str, detail: serde_json::Value) -> Result<u64, StoreError> {
        let seq = self.next_event.fetch_add(1, Ordering::SeqCst);
        let at_ms = util::time::unix_ms();
        let ev = Event {
            seq,
            at_ms,
            kind: kind.into(),
            detail,
        };
        self.store.put(
            Tree::Events,
            &seq.to_be_bytes(),
            &serde_json::to_vec(&ev).expect("Event serializes"),
        )?;
        if seq > MAX_EVENTS {
            self.store
                .remove(Tree::Events, &(seq - MAX_EVENTS).to_be_bytes())?;
        }
        Ok(seq)
    }

    /// The most recent `n` events, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    pub fn recent_events(&self, n: usize) -> Result<Vec<Event>, StoreError> {
        let (entries, _) = self.store.scan(Tree::Events)?;
        let skip = entries.len().saturating_sub(n);
        Ok(entries
            .into_iter()
            .skip(skip)
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
    }

    /// The store itself, for modules that keep records of their own
    /// (drills).
    #[must_use]
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Flush pending non-durable writes (on shutdown).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn flush(&self) -> Result<(), StoreError> {
        self.store.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    #[test]
    fn incarnation_grows_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let (st, report) = AgentState::open(s).unwrap();
        assert_eq!(report.corrupt, 0);
        let a = st.bump_incarnation(5).unwrap();
        let b = st.bump_incarnation(5).unwrap();
        assert_eq!((a, b), (5, 6));
        drop(st);
        let s: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let (st, _) = AgentState::open(s).unwrap();
        assert_eq!(st.bump_incarnation(0).unwrap(), 7);
        assert_eq!(st.bump_incarnation(100).unwrap(), 100);
    }

    #[test]
    fn events_are_contiguous_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let (st, _) = AgentState::open(s.clone()).unwrap();
        for i in 0..5 {
            st.record_event("test", serde_json::json!({ "i": i }))
                .unwrap();
        }
        st.flush().unwrap();
        let (_, report) = AgentState::open(s).unwrap();
        assert_eq!(report.events, 5);
        assert_eq!(report.event_range, Some((1, 5)));
        assert!(report.events_contiguous);
        assert_eq!(
            st.recent_events(2)
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>(),
            vec![4, 5]
        );
    }
}
