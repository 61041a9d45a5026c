//! Raft storage in sled: the log (and vote) in [`LogStore`], the applied
//! field state and snapshots in [`StateMachine`].
//!
//! Durability: a log append is acknowledged to openraft (`LogFlushed`) only
//! after sled has flushed it; the vote is flushed before `save_vote`
//! returns. The applied state is written (and flushed) after every applied
//! batch, so a restart resumes from it; if it were lost, openraft would
//! re-apply from the log, which is never purged past the last snapshot.
//!
//! Format: every value (log entry, vote, committed and purged ids, applied
//! state, snapshot) is JSON in the `[version][crc32][payload]` envelope of
//! `util::record`, checked when read. A record that fails the check is
//! reported as a [`RecordReadError`] (inside openraft's `StorageError`,
//! which stops the Raft node) and is never applied or sent to a peer. A
//! database written before records carried an envelope is refused at open
//! with [`OpenError::LegacyFormat`], which tells the operator to remove it:
//! the agent is pre-release, and a rack whose control store is removed
//! rejoins its cluster empty and receives the state from its leader.

// openraft's StorageError is large; it is the type its traits demand.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::field::{Command, FieldState, Response};
use crate::lease::{LeaseWatch, Receipts};
use crate::{NodeId, RackNode, TypeConfig};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// Format version of every record's payload (the first byte of each value).
pub const RECORD_VERSION: u8 = 1;

/// Where the database's format is recorded (default tree): absent in a
/// database written before records were versioned and checksummed.
const FORMAT_KEY: &[u8] = b"control-format";

/// Why the control plane's database could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// sled failed (I/O, a full disk, its own corruption checks).
    #[error("control store database")]
    Sled(#[from] sled::Error),
    /// A record the state machine resumes from is corrupt.
    #[error(transparent)]
    Record(#[from] RecordReadError),
    /// Written by an earlier build whose records had no version or checksum.
    #[error(
        "{path} was written by an older Fieldrack whose Raft records carry no version or \
         checksum; stop the agent, remove {path} and start it again (the rack rejoins its \
         cluster empty and receives the state from the leader)"
    )]
    LegacyFormat {
        /// The database directory (`data_dir/control`).
        path: std::path::PathBuf,
    },
    /// Written by a newer build.
    #[error("{path} has control store format {found}; this build reads format {RECORD_VERSION}")]
    UnknownFormat {
        /// The database directory.
        path: std::path::PathBuf,
        /// The format it records.
        found: u8,
    },
}

/// A stored Raft record that cannot be used: it is reported, never applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordReadError {
    /// The envelope's version or checksum is wrong (a flipped bit, a torn
    /// write, a record of another format).
    #[error("corrupt record {key} in {tree}")]
    Corrupt {
        /// The sled tree.
        tree: String,
        /// The key (a log index, `vote`, `applied`...).
        key: String,
        /// What the check found.
        #[source]
        source: util::record::RecordError,
    },
    /// The checksum holds but the payload is not what this build expects.
    #[error("record {key} in {tree} does not decode")]
    Decode {
        /// The sled tree.
        tree: String,
        /// The key.
        key: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write(&std::io::Error::other(e.to_string())).into()
}

fn read_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read(&std::io::Error::other(e.to_string())).into()
}

/// A key as an operator reads it: a log index, or the key's name.
fn key_label(key: &[u8]) -> String {
    match <[u8; 8]>::try_from(key) {
        Ok(idx) => format!("log index {}", u64::from_be_bytes(idx)),
        Err(_) => String::from_utf8_lossy(key).into_owned(),
    }
}

/// Check and decode one stored value.
fn decode<T: for<'de> Deserialize<'de>>(
    tree: &sled::Tree,
    key: &[u8],
    value: &[u8],
) -> Result<T, RecordReadError> {
    let label = || {
        (
            String::from_utf8_lossy(&tree.name()).into_owned(),
            key_label(key),
        )
    };
    let payload = util::record::open(RECORD_VERSION, value).map_err(|source| {
        let (tree, key) = label();
        RecordReadError::Corrupt { tree, key, source }
    })?;
    serde_json::from_slice(payload).map_err(|source| {
        let (tree, key) = label();
        RecordReadError::Decode { tree, key, source }
    })
}

/// Encode one value for storage.
fn encode<T: Serialize>(v: &T) -> StorageResult<Vec<u8>> {
    let json = serde_json::to_vec(v).map_err(io_err)?;
    Ok(util::record::seal(RECORD_VERSION, &json))
}

fn get_record<T: for<'de> Deserialize<'de>>(
    tree: &sled::Tree,
    key: &[u8],
) -> Result<Option<T>, OpenError> {
    match tree.get(key)? {
        Some(b) => Ok(Some(decode(tree, key, &b)?)),
        None => Ok(None),
    }
}

fn get_json<T: for<'de> Deserialize<'de>>(
    tree: &sled::Tree,
    key: &[u8],
) -> StorageResult<Option<T>> {
    get_record(tree, key).map_err(|e| match e {
        OpenError::Record(e) => StorageIOError::read(&e).into(),
        e => read_err(e),
    })
}

fn put_json<T: Serialize>(tree: &sled::Tree, key: &[u8], v: &T) -> StorageResult<()> {
    tree.insert(key, encode(v)?).map_err(io_err)?;
    Ok(())
}

/// Check that `db` holds records of this build's format, recording the
/// format in a new database.
fn check_format(db: &sled::Db, path: &std::path::Path) -> Result<(), OpenError> {
    match db.get(FORMAT_KEY)?.as_deref() {
        Some([RECORD_VERSION]) => Ok(()),
        Some(other) => Err(OpenError::UnknownFormat {
            path: path.to_owned(),
            found: other.first().copied().unwrap_or(0),
        }),
        None => {
            let raft_data = db.tree_names().iter().any(|name| {
                TREES.iter().any(|base| name.starts_with(base.as_bytes()))
                    && db.open_tree(name).is_ok_and(|t| !t.is_empty())
            });
            if raft_data {
                return Err(OpenError::LegacyFormat {
                    path: path.to_owned(),
                });
            }
            db.insert(FORMAT_KEY, &[RECORD_VERSION])?;
            db.flush()?;
            Ok(())
        }
    }
}

/// Open (or create) the control plane's sled database, dropping the trees
/// of incarnations this rack left (see [`leave_incarnation`]).
///
/// # Errors
/// [`OpenError`]: sled cannot open it, or it holds records of another
/// format.
pub fn open_db(path: &std::path::Path) -> Result<sled::Db, OpenError> {
    // Every write that must survive a crash is flushed explicitly (log
    // appends, the vote, the applied state); sled's own periodic flush is
    // left to clean segments, every 2 s instead of twice a second.
    let db = sled::Config::new()
        .path(path)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(Some(2_000))
        .open()?;
    check_format(&db, path)?;
    let current = incarnation(&db)?;
    for name in db.tree_names() {
        let Ok(name) = std::str::from_utf8(&name).map(str::to_owned) else {
            continue;
        };
        let stale = TREES
            .iter()
            .any(|base| (0..current).any(|n| tree_name(base, n) == name));
        if stale {
            db.drop_tree(name.as_bytes())?;
        }
    }
    Ok(db)
}

/// The trees one incarnation of the Raft node uses.
const TREES: [&str; 3] = ["raft-log", "raft-meta", "raft-sm"];

/// Where the current incarnation number is kept (default tree).
const INCARNATION_KEY: &[u8] = b"control-incarnation";

/// A tree's name in incarnation `n` (0: the names of the first).
fn tree_name(base: &str, n: u64) -> String {
    if n == 0 {
        base.to_owned()
    } else {
        format!("{base}-{n}")
    }
}

/// The current incarnation of this rack's Raft node.
///
/// # Errors
/// If sled fails.
pub fn incarnation(db: &sled::Db) -> Result<u64, sled::Error> {
    Ok(db
        .get(INCARNATION_KEY)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_le_bytes))
}

/// Start a new, empty incarnation (this rack leaves its cluster to join
/// another): later [`LogStore::new`] and [`StateMachine::open`] use fresh
/// trees, so the stopping node's tasks, which may still write to the old
/// ones, cannot touch the new node's state; the old trees are dropped at
/// the next open. Durable before it returns.
///
/// # Errors
/// If sled fails.
pub fn leave_incarnation(db: &sled::Db) -> Result<u64, sled::Error> {
    let next = incarnation(db)? + 1;
    db.insert(INCARNATION_KEY, &next.to_le_bytes())?;
    db.flush()?;
    Ok(next)
}

/// Where the current incarnation keeps its cluster's id (meta tree).
const CLUSTER_KEY: &[u8] = b"cluster";

/// The control-plane cluster the current incarnation is in (its id, drawn
/// by the rack that formed it), if any.
///
/// # Errors
/// If sled fails or the record is corrupt.
pub fn stored_cluster(db: &sled::Db) -> Result<Option<u64>, OpenError> {
    let meta = db.open_tree(tree_name(TREES[1], incarnation(db)?))?;
    get_record(&meta, CLUSTER_KEY)
}

/// Record, durably, that the current incarnation is in cluster `id`.
///
/// # Errors
/// If sled fails.
pub fn store_cluster(db: &sled::Db, id: u64) -> Result<(), OpenError> {
    let meta = db.open_tree(tree_name(TREES[1], incarnation(db)?))?;
    let record = util::record::seal(
        RECORD_VERSION,
        &serde_json::to_vec(&id).expect("an id serializes"),
    );
    meta.insert(CLUSTER_KEY, record)?;
    meta.flush()?;
    Ok(())
}

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
    receipts: SharedReceipts,
}

/// When this rack first received each renewal now in its log, shared by
/// the log store that records and the state machine that takes them
/// ([`crate::lease::Receipts`]).
pub type SharedReceipts = Arc<Mutex<Receipts<LogId<NodeId>>>>;

impl LogStore {
    /// On `db`.
    ///
    /// # Errors
    /// If sled cannot open its trees.
    pub fn new(db: &sled::Db) -> Result<Self, sled::Error> {
        let n = incarnation(db)?;
        Ok(Self {
            log: db.open_tree(tree_name(TREES[0], n))?,
            meta: db.open_tree(tree_name(TREES[1], n))?,
            receipts: SharedReceipts::default(),
        })
    }

    /// When this store received the renewals in its log: hand it to the
    /// state machine ([`StateMachine::open`]).
    #[must_use]
    pub fn receipts(&self) -> SharedReceipts {
        self.receipts.clone()
    }

    async fn flush(&self) -> StorageResult<()> {
        self.log.flush_async().await.map_err(io_err)?;
        self.meta.flush_async().await.map_err(io_err)?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for kv in self.log.range(start.to_be_bytes()..) {
            let (k, v) = kv.map_err(read_err)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(read_err)?);
            if !range.contains(&idx) {
                break;
            }
            out.push(decode(&self.log, &k, &v).map_err(|e| StorageIOError::read_logs(&e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let purged: Option<LogId<NodeId>> = get_json(&self.meta, b"purged")?;
        let last = match self.log.last().map_err(read_err)? {
            // Only the id: the pre-vote's and formation's `Hello` ask for
            // it often, and an entry may carry a rack's whole report.
            Some((k, v)) => Some(
                decode::<EntryId>(&self.log, &k, &v)
                    .map_err(|e| StorageIOError::read_logs(&e))?
                    .log_id,
            ),
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        put_json(&self.meta, b"vote", vote)?;
        self.meta.flush_async().await.map_err(io_err)?;
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        get_json(&self.meta, b"vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        put_json(&self.meta, b"committed", &committed)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(get_json::<Option<LogId<NodeId>>>(&self.meta, b"committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let now = Instant::now();
        let mut batch = sled::Batch::default();
        for e in entries {
            if is_renewal(&e) {
                self.receipts.lock().expect("receipts lock").received(
                    e.log_id.index,
                    e.log_id,
                    now,
                );
            }
            batch.insert(&e.log_id.index.to_be_bytes(), encode(&e)?);
        }
        self.log.apply_batch(batch).map_err(io_err)?;
        let r = self.log.flush_async().await.map(|_| ());
        callback.log_io_completed(r.map_err(std::io::Error::other));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.receipts
            .lock()
            .expect("receipts lock")
            .truncated(log_id.index);
        let keys: Vec<_> = self
            .log
            .range(log_id.index.to_be_bytes()..)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(read_err)?;
        for k in keys {
            self.log.remove(k).map_err(io_err)?;
        }
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        put_json(&self.meta, b"purged", &Some(log_id))?;
        self.meta.flush_async().await.map_err(io_err)?;
        let keys: Vec<_> = self
            .log
            .range(..=log_id.index.to_be_bytes())
            .keys()
            .collect::<Result<_, _>>()
            .map_err(read_err)?;
        for k in keys {
            self.log.remove(k).map_err(io_err)?;
        }
        Ok(())
    }
}

/// Whether `e` renews a rack's lease.
fn is_renewal(e: &Entry<TypeConfig>) -> bool {
    matches!(&e.payload, EntryPayload::Normal(Command::Renew { .. }))
}

/// A log entry's id, read without decoding its payload.
#[derive(Deserialize)]
struct EntryId {
    log_id: LogId<NodeId>,
}

/// What the state machine persists.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, RackNode>,
    state: FieldState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, RackNode>,
    data: Vec<u8>,
}

/// Shared with the rest of the rack: the applied state, and what applying
/// it taught about other racks' leases.
#[derive(Clone)]
pub struct Applies {
    /// The latest applied field state.
    pub state: watch::Receiver<Arc<FieldState>>,
    /// Lease knowledge from the apply order.
    pub leases: Arc<Mutex<LeaseWatch>>,
}

/// The applied field state, persisted in sled.
pub struct StateMachine {
    tree: sled::Tree,
    applied: Applied,
    tx: watch::Sender<Arc<FieldState>>,
    leases: Arc<Mutex<LeaseWatch>>,
    receipts: SharedReceipts,
    snapshot_seq: u64,
    /// When the applied state was last written (none: not since open).
    persisted_at: Option<Instant>,
}

/// How often a batch of nothing but lease renewals writes the applied
/// state. Each rack renews every second, so in a field of N racks every
/// rack applies about N renewal batches a second; writing (and syncing)
/// the whole state for each was the largest part of an idle agent's CPU
/// at 16 racks and grew with the square of the field. Any other command
/// is written at once. A crash loses at most this much of applied
/// renewals, which openraft applies again from the durable log (renewals
/// are idempotent; the lease watch then sees them as fresh, which only
/// makes a start gate wait longer). Far below the entries kept in the log
/// past a snapshot, so none of them can have been purged.
pub const PERSIST_RENEWALS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

impl StateMachine {
    /// Open on `db`, resuming from the persisted state.
    ///
    /// # Errors
    /// [`OpenError`] if sled cannot be read or the applied state is corrupt
    /// (it is then not applied: the node does not start).
    /// `tx` publishes every applied state (it gets the resumed one at
    /// once); `leases` learns from the apply order, counting each renewal
    /// from when the log store took it in (`receipts`, from
    /// [`LogStore::receipts`]).
    pub fn open(
        db: &sled::Db,
        leases: Arc<Mutex<LeaseWatch>>,
        receipts: SharedReceipts,
        tx: watch::Sender<Arc<FieldState>>,
    ) -> Result<(Self, Applies), OpenError> {
        let n = incarnation(db)?;
        let tree = db.open_tree(tree_name(TREES[2], n))?;
        let applied: Applied = get_record(&tree, b"applied")?.unwrap_or_default();
        tx.send_replace(Arc::new(applied.state.clone()));
        let rx = tx.subscribe();
        Ok((
            Self {
                tree,
                applied,
                tx,
                leases: leases.clone(),
                receipts,
                snapshot_seq: 0,
                persisted_at: None,
            },
            Applies { state: rx, leases },
        ))
    }

    async fn persist(&mut self) -> StorageResult<()> {
        put_json(&self.tree, b"applied", &self.applied)?;
        self.tree.flush_async().await.map_err(io_err)?;
        self.persisted_at = Some(Instant::now());
        Ok(())
    }

    /// Whether a batch applied at `now` is written now: any command but a
    /// renewal (or a blank or membership entry) at once, renewals at most
    /// every [`PERSIST_RENEWALS_EVERY`].
    fn persist_due(&self, only_renewals: bool, now: Instant) -> bool {
        !only_renewals
            || self
                .persisted_at
                .is_none_or(|t| now.saturating_duration_since(t) >= PERSIST_RENEWALS_EVERY)
    }

    /// Applies `cmd`, which this rack saw at `seen`: its first receipt if
    /// it is a renewal received since start, else now.
    fn apply_one(&mut self, cmd: &Command, seen: Instant) -> Response {
        let before = match cmd {
            Command::Assign { name, .. } => {
                self.applied.state.apps.get(name).map(|a| a.owner.clone())
            }
            _ => None,
        };
        let adopted: Vec<String> = match cmd {
            Command::Adopt { apps } => apps
                .iter()
                .map(|c| c.spec.name.clone())
                .filter(|n| !self.applied.state.apps.contains_key(n))
                .collect(),
            _ => Vec::new(),
        };
        let r = self.applied.state.apply(cmd);
        let mut leases = self.leases.lock().expect("lease watch lock");
        match (cmd, &r) {
            (Command::Renew { rack, .. }, _) => leases.renew_applied(rack, seen),
            (Command::Assign { name, .. }, Response::Ok) => {
                let epoch = self.applied.state.apps[name].epoch;
                leases.assignment_applied(name, epoch, before.flatten().as_deref());
            }
            (Command::Adopt { .. }, Response::Ok) => {
                for name in adopted {
                    let epoch = self.applied.state.apps[&name].epoch;
                    leases.adopted(&name, epoch, seen);
                }
            }
            _ => {}
        }
        r
    }
}

/// Builds snapshots from a copy of the applied state.
pub struct SnapshotBuilder {
    tree: sled::Tree,
    applied: Applied,
    id: String,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let data = serde_json::to_vec(&self.applied.state).map_err(io_err)?;
        let meta = SnapshotMeta {
            last_log_id: self.applied.last_applied,
            last_membership: self.applied.membership.clone(),
            snapshot_id: self.id.clone(),
        };
        put_json(
            &self.tree,
            b"snapshot",
            &StoredSnapshot {
                meta: meta.clone(),
                data: data.clone(),
            },
        )?;
        self.tree.flush_async().await.map_err(io_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, RackNode>)> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut only_renewals = true;
        for e in entries {
            self.applied.last_applied = Some(e.log_id);
            let received = self
                .receipts
                .lock()
                .expect("receipts lock")
                .applied(e.log_id.index, e.log_id);
            only_renewals &= is_renewal(&e);
            let seen = received.map_or(now, |r| r.min(now));
            out.push(match e.payload {
                EntryPayload::Blank => Response::Ok,
                EntryPayload::Normal(cmd) => self.apply_one(&cmd, seen),
                EntryPayload::Membership(m) => {
                    self.applied.membership = StoredMembership::new(Some(e.log_id), m);
                    Response::Ok
                }
            });
        }
        if self.persist_due(only_renewals, now) {
            self.persist().await?;
        }
        self.tx.send_replace(Arc::new(self.applied.state.clone()));
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Logs up to the snapshot may be purged after it: the applied state
        // written must reach as far, or a restart could not re-apply the
        // renewals it skipped writing.
        if let Err(e) = self.persist().await {
            tracing::warn!(error = %e, "writing the applied state before a snapshot");
        }
        self.snapshot_seq += 1;
        let last = self.applied.last_applied.map_or_else(
            || "none".to_owned(),
            |l| format!("{}-{}", l.leader_id, l.index),
        );
        SnapshotBuilder {
            tree: self.tree.clone(),
            applied: self.applied.clone(),
            id: format!("{last}-{}", self.snapshot_seq),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, RackNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let state: FieldState = serde_json::from_slice(&data).map_err(read_err)?;
        self.applied = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            state,
        };
        put_json(
            &self.tree,
            b"snapshot",
            &StoredSnapshot {
                meta: meta.clone(),
                data,
            },
        )?;
        self.persist().await?;
        self.leases
            .lock()
            .expect("lease watch lock")
            .snapshot_installed(Instant::now());
        self.tx.send_replace(Arc::new(self.applied.state.clone()));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let s: Option<StoredSnapshot> = get_json(&self.tree, b"snapshot")?;
        Ok(s.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

/// Voters and their nodes from a stored membership.
#[must_use]
pub fn members(m: &StoredMembership<NodeId, RackNode>) -> BTreeMap<NodeId, RackNode> {
    m.nodes().map(|(k, v)| (*k, v.clone())).collect()
}

#[cfg(test)]
mod tests;
