use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deploy::appliance::parse_manifest;
use deploy::Role;
use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{log_id, StoreBuilder, Suite};
use openraft::{
    Config, Entry, EntryPayload, Membership, Raft, RaftLogReader, RaftSnapshotBuilder, ServerState,
    StorageError,
};
use tempfile::TempDir;

use super::*;
use crate::field::{RackReport, Transfer};
use crate::lease::LeaseConfig;

/// A state machine on `db` with its own publication channel, and no log
/// store telling it when renewals were received.
fn open_sm(db: &sled::Db, leases: LeaseWatch) -> Result<(StateMachine, Applies), OpenError> {
    open_sm_for(db, leases, &SharedReceipts::default())
}

/// A state machine on `db` that learns from `receipts` (a log store's).
fn open_sm_for(
    db: &sled::Db,
    leases: LeaseWatch,
    receipts: &SharedReceipts,
) -> Result<(StateMachine, Applies), OpenError> {
    let (tx, _) = tokio::sync::watch::channel(std::sync::Arc::new(crate::FieldState::default()));
    StateMachine::open(
        db,
        std::sync::Arc::new(std::sync::Mutex::new(leases)),
        receipts.clone(),
        tx,
    )
}

fn cfg() -> LeaseConfig {
    LeaseConfig::default()
}

fn open(dir: &Path) -> sled::Db {
    // A db dropped a moment ago (by a Raft shutting down) may still hold
    // its lock briefly.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match open_db(dir) {
            Ok(db) => return db,
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("open {}: {e}", dir.display()),
        }
    }
}

fn deploy_cmd(names: &[&str]) -> Command {
    let text: String = names
        .iter()
        .map(|n| {
            format!(
                "[[appliance]]\nname = \"{n}\"\ndriver = \"process\"\ncommand = [\"/bin/true\"]\n\
                 [[appliance.volume]]\nname = \"{n}-data\"\nsize = \"64M\"\n"
            )
        })
        .collect();
    Command::Deploy {
        specs: parse_manifest(&text).expect("valid manifest"),
    }
}

fn renew_cmd(rack: &str) -> Command {
    Command::Renew {
        rack: rack.into(),
        report: RackReport {
            role: Role::Rack,
            cpus: 4,
            memory_mb: 1024,
            ..RackReport::default()
        },
    }
}

fn assign_cmd(name: &str, owner: &str, expect_epoch: u64) -> Command {
    Command::Assign {
        name: name.into(),
        owner: Some(owner.into()),
        expect_epoch,
        transfer: Transfer {
            from: None,
            reason: "placed".into(),
            planned: false,
            released: None,
            detected_ms: None,
            decided_ms: 0,
        },
    }
}

fn normal(term: u64, index: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Normal(cmd),
    }
}

fn membership_entry(term: u64, index: u64) -> Entry<TypeConfig> {
    let nodes = BTreeMap::from([(
        1,
        RackNode {
            rack: "a".into(),
            peer_id: "p".into(),
        },
    )]);
    Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Membership(Membership::new(vec![[1].into()], nodes)),
    }
}

/// openraft's own storage conformance suite, on a fresh sled db each time.
struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open_db(dir.path()).map_err(io_err)?;
        let log = LogStore::new(&db).map_err(io_err)?;
        let (sm, _) = open_sm_for(&db, LeaseWatch::new(cfg(), Instant::now()), &log.receipts())
            .map_err(io_err)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn passes_the_openraft_storage_suite() {
    Suite::test_all(Builder).expect("storage suite");
}

#[tokio::test]
async fn the_state_machine_persists_and_reopens_to_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let (state, last) = {
        let db = open(dir.path());
        let (mut sm, applies) = open_sm(&db, LeaseWatch::new(cfg(), Instant::now())).unwrap();
        let r = sm
            .apply([
                membership_entry(1, 1),
                normal(1, 2, deploy_cmd(&["db", "web"])),
                normal(1, 3, renew_cmd("a")),
                normal(1, 4, assign_cmd("db", "a", 0)),
                normal(1, 5, assign_cmd("db", "b", 0)),
                normal(1, 6, renew_cmd("a")),
            ])
            .await
            .unwrap();
        assert_eq!(r.len(), 6);
        assert_eq!(r[0], Response::Ok);
        assert_eq!(r[2], Response::Granted(vec![]));
        assert_eq!(r[3], Response::Ok);
        assert!(matches!(r[4], Response::Refused(_)), "stale: {:?}", r[4]);
        assert_eq!(r[5], Response::Granted(vec![("db".into(), 1)]));
        let state = applies.state.borrow().clone();
        assert_eq!(state.apps["db"].owner.as_deref(), Some("a"));
        assert_eq!(state.apps.len(), 2);
        let (last, membership) = sm.applied_state().await.unwrap();
        assert_eq!(last, Some(log_id(1, 1, 6)));
        assert_eq!(membership.log_id(), &Some(log_id(1, 1, 1)));
        assert_eq!(members(&membership).len(), 1);
        ((*state).clone(), last)
    };
    let db = open(dir.path());
    let (mut sm, applies) = open_sm(&db, LeaseWatch::new(cfg(), Instant::now())).unwrap();
    assert_eq!(**applies.state.borrow(), state);
    let (last_again, membership) = sm.applied_state().await.unwrap();
    assert_eq!(last_again, last);
    assert_eq!(members(&membership)[&1].rack, "a");
}

#[tokio::test]
async fn a_snapshot_installed_elsewhere_gives_the_same_state() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let db1 = open(d1.path());
    let db2 = open(d2.path());
    let (mut sm1, a1) = open_sm(&db1, LeaseWatch::new(cfg(), Instant::now())).unwrap();
    let (mut sm2, a2) = open_sm(&db2, LeaseWatch::new(cfg(), Instant::now())).unwrap();
    sm1.apply([
        membership_entry(1, 1),
        normal(1, 2, deploy_cmd(&["db"])),
        normal(2, 3, renew_cmd("a")),
        normal(2, 4, assign_cmd("db", "a", 0)),
    ])
    .await
    .unwrap();
    let snap = sm1
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(snap.meta.last_log_id, Some(log_id(2, 1, 4)));
    // The built snapshot is the current one.
    let current = sm1.get_current_snapshot().await.unwrap().expect("stored");
    assert_eq!(current.meta, snap.meta);
    assert_eq!(current.snapshot.get_ref(), snap.snapshot.get_ref());

    let before = Instant::now();
    sm2.install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    assert_eq!(**a2.state.borrow(), **a1.state.borrow());
    assert_eq!(
        sm2.applied_state().await.unwrap(),
        sm1.applied_state().await.unwrap()
    );
    let got = sm2
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("installed");
    assert_eq!(got.meta, current.meta);
    // What came before the snapshot is unknown: a gate counts from the install.
    let gate = a2.leases.lock().unwrap().gate("db", 1);
    assert!(gate >= before + cfg().lease + cfg().drift_margin);
    // Applying on from there works as on the original.
    for sm in [&mut sm1, &mut sm2] {
        let r = sm.apply([normal(2, 5, renew_cmd("a"))]).await.unwrap();
        assert_eq!(r, vec![Response::Granted(vec![("db".into(), 1)])]);
    }
    assert_eq!(**a2.state.borrow(), **a1.state.borrow());
}

#[tokio::test]
async fn the_lease_watch_learns_renewals_and_assignments_in_apply_order() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let c = cfg();
    let t0 = Instant::now();
    let (mut sm, applies) = open_sm(&db, LeaseWatch::new(c, t0)).unwrap();
    sm.apply([
        normal(1, 1, deploy_cmd(&["db"])),
        normal(1, 2, assign_cmd("db", "a", 0)),
    ])
    .await
    .unwrap();
    let before_renew = Instant::now();
    sm.apply([normal(1, 3, renew_cmd("a"))]).await.unwrap();
    let after_renew = Instant::now();
    {
        let w = applies.leases.lock().unwrap();
        let age = w.renew_age("a", after_renew).expect("renewal seen");
        assert!(age <= after_renew - before_renew);
        assert!(w.renew_age("b", after_renew).is_none());
        // Placed from nowhere: counts from the horizon.
        assert_eq!(w.gate("db", 1), t0 + c.lease + c.drift_margin);
    }
    // Failover a → b: b waits for a's last renewal plus lease and margin.
    sm.apply([normal(1, 4, assign_cmd("db", "b", 1))])
        .await
        .unwrap();
    let gate = applies.leases.lock().unwrap().gate("db", 2);
    assert!(gate >= before_renew + c.lease + c.drift_margin);
    assert!(gate <= after_renew + c.lease + c.drift_margin);
    // A refused (stale) assignment teaches nothing.
    sm.apply([normal(1, 5, assign_cmd("db", "c", 1))])
        .await
        .unwrap();
    assert_eq!(applies.leases.lock().unwrap().gate("db", 2), gate);
    assert_eq!(
        applies.state.borrow().apps["db"].owner.as_deref(),
        Some("b")
    );
}

/// A follower whose leader died applies the leader's last entries only
/// after an election: the old owner's renewal among them counts from
/// when the follower received it, not from the apply.
#[tokio::test]
async fn a_renewal_counts_from_its_receipt_into_the_log() {
    use openraft::storage::RaftLogStorageExt;
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let c = cfg();
    let t0 = Instant::now();
    let mut log = LogStore::new(&db).unwrap();
    let (mut sm, applies) = open_sm_for(&db, LeaseWatch::new(c, t0), &log.receipts()).unwrap();
    let first = [
        normal(1, 1, deploy_cmd(&["db"])),
        normal(1, 2, assign_cmd("db", "a", 0)),
    ];
    log.blocking_append(first.clone()).await.unwrap();
    sm.apply(first).await.unwrap();
    // a's renewal arrives; a stale entry 4 arrives too, and is truncated
    // and replaced by the next leader's.
    let before_receipt = Instant::now();
    log.blocking_append([normal(1, 3, renew_cmd("a")), normal(1, 4, renew_cmd("a"))])
        .await
        .unwrap();
    let after_receipt = Instant::now();
    log.truncate(log_id(1, 1, 4)).await.unwrap();
    // The election.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let next = [normal(2, 4, assign_cmd("db", "b", 1))];
    log.blocking_append(next.clone()).await.unwrap();
    let before_apply = Instant::now();
    sm.apply([normal(1, 3, renew_cmd("a"))]).await.unwrap();
    sm.apply(next).await.unwrap();
    let w = applies.leases.lock().unwrap();
    let gate = w.gate("db", 2);
    assert!(gate >= before_receipt + c.lease + c.drift_margin);
    assert!(
        gate <= after_receipt + c.lease + c.drift_margin,
        "the gate counts from the apply, {:?} after the receipt",
        before_apply - after_receipt
    );
    assert!(
        log.receipts().lock().unwrap().is_empty(),
        "applied receipts are forgotten"
    );
}

/// A network for a cluster of one: never used.
#[derive(Clone)]
struct NoNet;

fn unreachable<E: std::error::Error>() -> RPCError<NodeId, RackNode, RaftError<NodeId, E>> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other("single node")))
}

impl RaftNetworkFactory<TypeConfig> for NoNet {
    type Network = NoNet;
    async fn new_client(&mut self, _target: NodeId, _node: &RackNode) -> NoNet {
        NoNet
    }
}

impl RaftNetwork<TypeConfig> for NoNet {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, RackNode, RaftError<NodeId>>> {
        Err(unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, RackNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, RackNode, RaftError<NodeId>>> {
        Err(unreachable())
    }
}

async fn single_node(db: &sled::Db) -> (Raft<TypeConfig>, Applies) {
    let log = LogStore::new(db).unwrap();
    let (sm, applies) =
        open_sm_for(db, LeaseWatch::new(cfg(), Instant::now()), &log.receipts()).unwrap();
    let config = Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        ..Config::default()
    }
    .validate()
    .unwrap();
    let raft = Raft::new(1, Arc::new(config), NoNet, log, sm)
        .await
        .unwrap();
    (raft, applies)
}

/// Initialize a single-node cluster of rack `a` and wait until it leads.
async fn init_leader(raft: &Raft<TypeConfig>) {
    let node = RackNode {
        rack: "a".into(),
        peer_id: "p".into(),
    };
    raft.initialize(BTreeMap::from([(1, node)])).await.unwrap();
    wait_leader(raft).await;
}

async fn wait_leader(raft: &Raft<TypeConfig>) {
    raft.wait(Some(Duration::from_secs(10)))
        .state(ServerState::Leader, "single node leads")
        .await
        .expect("a single node elects itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_raft_commits_and_recovers_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (state, last_index) = {
        let db = open(dir.path());
        let (raft, applies) = single_node(&db).await;
        init_leader(&raft).await;
        let mut last = None;
        for cmd in [
            deploy_cmd(&["db", "web"]),
            renew_cmd("a"),
            assign_cmd("db", "a", 0),
            renew_cmd("a"),
        ] {
            let r = raft.client_write(cmd).await.unwrap();
            last = Some((r.log_id, r.data));
        }
        let (last_id, data) = last.unwrap();
        assert_eq!(data, Response::Granted(vec![("db".into(), 1)]));
        let state = applies.state.borrow().clone();
        assert_eq!(state.apps["db"].owner.as_deref(), Some("a"));
        raft.shutdown().await.unwrap();
        ((*state).clone(), last_id.index)
    };

    // The log itself, read back straight from sled.
    {
        let db = open(dir.path());
        let mut log = LogStore::new(&db).unwrap();
        let st = log.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id, None);
        assert_eq!(st.last_log_id.map(|l| l.index), Some(last_index));
        let vote = log.read_vote().await.unwrap().expect("a vote was saved");
        assert_eq!(vote.leader_id().voted_for(), Some(1));
        assert!(vote.is_committed());
        let all = log.try_get_log_entries(0..).await.unwrap();
        assert_eq!(all.len() as u64, last_index + 1, "indexes 0..=last");
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e.log_id.index, i as u64);
        }
        let cmds = all
            .iter()
            .filter(|e| matches!(e.payload, EntryPayload::Normal(_)))
            .count();
        assert_eq!(cmds, 4);
        let mid = log.try_get_log_entries(2..=3).await.unwrap();
        assert_eq!(
            mid.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(log
            .try_get_log_entries(last_index + 1..)
            .await
            .unwrap()
            .is_empty());
        let (sm, applies) = open_sm(&db, LeaseWatch::new(cfg(), Instant::now())).unwrap();
        drop(sm);
        assert_eq!(
            **applies.state.borrow(),
            state,
            "the applied state survives"
        );
    }

    // Restart Raft on the same db: recovered, and still accepting writes.
    let db = open(dir.path());
    let (raft, applies) = single_node(&db).await;
    assert_eq!(**applies.state.borrow(), state);
    wait_leader(&raft).await;
    let r = raft.client_write(assign_cmd("web", "a", 0)).await.unwrap();
    assert_eq!(r.data, Response::Ok);
    assert!(r.log_id.index > last_index);
    assert_eq!(
        raft.client_write(renew_cmd("a")).await.unwrap().data,
        Response::Granted(vec![("db".into(), 1), ("web".into(), 1)])
    );
    raft.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_are_written_at_most_every_interval_and_reapplied_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = {
        let db = open(dir.path());
        let (raft, applies) = single_node(&db).await;
        init_leader(&raft).await;
        raft.client_write(deploy_cmd(&["db"])).await.unwrap();
        for rack in ["a", "b", "c"] {
            raft.client_write(renew_cmd(rack)).await.unwrap();
        }
        let state = applies.state.borrow().clone();
        assert!(state.racks.contains_key("c"));
        raft.shutdown().await.unwrap();
        (*state).clone()
    };
    {
        // Written: the deploy, not (yet) the renewals right after it.
        let db = open(dir.path());
        let (_sm, applies) = open_sm(&db, LeaseWatch::new(cfg(), Instant::now())).unwrap();
        let written = applies.state.borrow().clone();
        assert!(written.apps.contains_key("db"));
        assert!(
            !written.racks.contains_key("c"),
            "a renewal batch right after a write is not written"
        );
    }
    // Raft re-applies them from the durable log at start.
    let db = open(dir.path());
    let (raft, applies) = single_node(&db).await;
    assert_eq!(**applies.state.borrow(), state);
    raft.shutdown().await.unwrap();
}

#[test]
fn a_renewal_batch_is_written_once_the_interval_passed() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let (mut sm, _) = open_sm(&db, LeaseWatch::new(cfg(), Instant::now())).unwrap();
    let t0 = Instant::now();
    assert!(sm.persist_due(true, t0), "nothing written since open");
    sm.persisted_at = Some(t0);
    assert!(!sm.persist_due(true, t0 + PERSIST_RENEWALS_EVERY / 2));
    assert!(
        sm.persist_due(false, t0 + PERSIST_RENEWALS_EVERY / 2),
        "other commands at once"
    );
    assert!(sm.persist_due(true, t0 + PERSIST_RENEWALS_EVERY));
}

#[tokio::test]
async fn truncate_purge_and_vote_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    // Fill a log through a single-node Raft (append needs openraft's callback).
    {
        let db = open(dir.path());
        let (raft, _) = single_node(&db).await;
        init_leader(&raft).await;
        for i in 0..8 {
            raft.client_write(renew_cmd(&format!("r{i}")))
                .await
                .unwrap();
        }
        raft.shutdown().await.unwrap();
    }
    let last = {
        let db = open(dir.path());
        let mut log = LogStore::new(&db).unwrap();
        let last = log.get_log_state().await.unwrap().last_log_id.unwrap();
        assert!(last.index >= 9, "{last:?}");
        let keep = log.try_get_log_entries(..=last.index).await.unwrap();
        // Truncate the last two, purge up to 3.
        let cut = keep[keep.len() - 2].log_id;
        log.truncate(cut).await.unwrap();
        let purged = keep[3].log_id;
        log.purge(purged).await.unwrap();
        let vote = Vote::new(7, 1);
        log.save_vote(&vote).await.unwrap();
        log.save_committed(Some(keep[4].log_id)).await.unwrap();
        (keep, cut, purged, vote)
    };
    let (keep, cut, purged, vote) = last;
    let db = open(dir.path());
    let mut log = LogStore::new(&db).unwrap();
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id, Some(purged));
    assert_eq!(st.last_log_id, Some(keep[cut.index as usize - 1].log_id));
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert_eq!(log.read_committed().await.unwrap(), Some(keep[4].log_id));
    let left = log.try_get_log_entries(0..).await.unwrap();
    assert_eq!(
        left.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
        (purged.index + 1..cut.index).collect::<Vec<_>>()
    );
    assert_eq!(left[0].log_id, keep[purged.index as usize + 1].log_id);
    // Purging everything: the log state falls back to the purged id.
    let last_left = left.last().unwrap().log_id;
    log.purge(last_left).await.unwrap();
    drop(log);
    drop(db);
    let db = open(dir.path());
    let mut log = LogStore::new(&db).unwrap();
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id, Some(last_left));
    assert_eq!(st.last_log_id, Some(last_left));
    assert!(log.try_get_log_entries(0..).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_new_incarnation_starts_empty_and_the_old_one_goes_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = open(dir.path());
        let (mut sm, _) = open_sm(&db, LeaseWatch::new(cfg(), Instant::now())).unwrap();
        sm.apply([membership_entry(1, 1), normal(1, 2, deploy_cmd(&["db"]))])
            .await
            .unwrap();
        let mut log = LogStore::new(&db).unwrap();
        log.save_vote(&openraft::Vote::new(3, 1)).await.unwrap();
        // Leave: what the old node's tasks still hold is theirs alone.
        assert_eq!(crate::store::leave_incarnation(&db).unwrap(), 1);
        sm.apply([normal(1, 3, deploy_cmd(&["late"]))])
            .await
            .unwrap();
        let (mut fresh, applies) = open_sm(&db, LeaseWatch::new(cfg(), Instant::now())).unwrap();
        assert!(
            applies.state.borrow().apps.is_empty(),
            "a new node starts empty"
        );
        assert_eq!(fresh.applied_state().await.unwrap().0, None);
        let mut log = LogStore::new(&db).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), None);
    }
    let db = open(dir.path());
    assert_eq!(crate::store::incarnation(&db).unwrap(), 1);
    let names: Vec<String> = db
        .tree_names()
        .iter()
        .filter_map(|n| String::from_utf8(n.to_vec()).ok())
        .collect();
    assert!(
        !names.iter().any(|n| n == "raft-sm" || n == "raft-log"),
        "{names:?}"
    );
    let (_, applies) = open_sm(&db, LeaseWatch::new(cfg(), Instant::now())).unwrap();
    assert!(applies.state.borrow().apps.is_empty());
}

/// Flip one bit in the middle of the value stored under `key` in `tree`.
fn flip_a_bit(tree: &sled::Tree, key: &[u8]) {
    let mut v = tree.get(key).unwrap().expect("the record exists").to_vec();
    let mid = v.len() / 2;
    v[mid] ^= 0x10;
    tree.insert(key, v).unwrap();
    tree.flush().unwrap();
}

#[tokio::test]
async fn records_are_sealed_and_a_flipped_bit_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let (mut sm, _) = open_sm(&db, LeaseWatch::new(cfg(), Instant::now())).unwrap();
    sm.apply([membership_entry(1, 1), normal(1, 2, deploy_cmd(&["db"]))])
        .await
        .unwrap();
    let mut log = LogStore::new(&db).unwrap();
    log.save_vote(&Vote::new(3, 1)).await.unwrap();
    for e in [membership_entry(1, 1), normal(1, 2, deploy_cmd(&["db"]))] {
        put_json(&log.log, &e.log_id.index.to_be_bytes(), &e).unwrap();
    }

    // Every value carries the envelope: version, then the CRC of the JSON.
    for (tree, key) in [
        (&log.log, 2u64.to_be_bytes().to_vec()),
        (&log.meta, b"vote".to_vec()),
        (&sm.tree, b"applied".to_vec()),
    ] {
        let v = tree.get(&key).unwrap().unwrap();
        assert_eq!(v[0], RECORD_VERSION);
        let json = util::record::open(RECORD_VERSION, &v).expect("verifies");
        assert!(serde_json::from_slice::<serde_json::Value>(json).is_ok());
    }

    // A log entry: reading it fails (so it can be neither applied nor sent
    // to a follower), and the error names the record and the check.
    flip_a_bit(&log.log, &2u64.to_be_bytes());
    let err = log.try_get_log_entries(0..).await.unwrap_err().to_string();
    assert!(err.contains("RecordReadError"), "{err}");
    assert!(err.contains("log index 2"), "{err}");
    assert!(err.contains("checksum mismatch"), "{err}");
    assert_eq!(
        log.try_get_log_entries(1..2).await.unwrap().len(),
        1,
        "intact entries still read"
    );
    assert!(
        log.get_log_state().await.is_err(),
        "the last entry is corrupt"
    );

    // The vote.
    flip_a_bit(&log.meta, b"vote");
    let err = log.read_vote().await.unwrap_err().to_string();
    assert!(err.contains("corrupt record vote"), "{err}");

    // The applied state: the state machine refuses to open rather than
    // resume from it.
    flip_a_bit(&sm.tree, b"applied");
    drop(sm);
    match open_sm(&db, LeaseWatch::new(cfg(), Instant::now())) {
        Err(OpenError::Record(RecordReadError::Corrupt { tree, key, source })) => {
            assert_eq!((tree.as_str(), key.as_str()), ("raft-sm", "applied"));
            assert!(
                matches!(source, util::record::RecordError::Checksum { .. }),
                "{source:?}"
            );
        }
        Err(e) => panic!("wrong error: {e:?}"),
        Ok(_) => panic!("a corrupt applied state was accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_committed_entry_stops_raft_and_is_never_applied() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = open(dir.path());
        let (raft, _) = single_node(&db).await;
        init_leader(&raft).await;
        raft.client_write(deploy_cmd(&["db"])).await.unwrap();
        raft.client_write(deploy_cmd(&["web"])).await.unwrap();
        raft.client_write(renew_cmd("a")).await.unwrap();
        raft.shutdown().await.unwrap();
    }
    {
        // Corrupt the entry that deploys "web", and forget the applied
        // state, so a restart must apply the log again from the start.
        let db = open(dir.path());
        let log = LogStore::new(&db).unwrap();
        let key = log
            .log
            .iter()
            .map(|kv| kv.unwrap())
            .find(|(_, v)| String::from_utf8_lossy(v).contains("\"web\""))
            .map(|(k, _)| k)
            .expect("the deploy of web is in the log");
        flip_a_bit(&log.log, &key);
        let sm = db.open_tree("raft-sm").unwrap();
        sm.remove(b"applied").unwrap();
        sm.remove(b"snapshot").unwrap();
        sm.flush().unwrap();
    }
    let db = open(dir.path());
    let log = LogStore::new(&db).unwrap();
    let (sm, applies) = open_sm(&db, LeaseWatch::new(cfg(), Instant::now())).unwrap();
    let config = Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        ..Config::default()
    }
    .validate()
    .unwrap();
    let fatal = match Raft::new(1, Arc::new(config), NoNet, log, sm).await {
        Err(e) => e.to_string(),
        Ok(raft) => {
            let deadline = Instant::now() + Duration::from_secs(10);
            let fatal = loop {
                if let Err(f) = &raft.metrics().borrow().running_state {
                    break f.to_string();
                }
                assert!(
                    Instant::now() < deadline,
                    "raft kept running on a corrupt log"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let _ = raft.shutdown().await;
            fatal
        }
    };
    assert!(fatal.contains("RecordReadError"), "{fatal}");
    assert!(
        !applies.state.borrow().apps.contains_key("web"),
        "the corrupt entry was applied"
    );
}

#[test]
fn a_database_of_bare_json_records_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = open(dir.path());
        db.remove(FORMAT_KEY).unwrap();
        db.open_tree("raft-meta")
            .unwrap()
            .insert(
                b"vote",
                &br#"{"leader_id":{"term":3,"node_id":1},"committed":true}"#[..],
            )
            .unwrap();
        db.flush().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match open_db(dir.path()) {
            Err(OpenError::Sled(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => break e,
            Ok(_) => panic!("a database without record envelopes was opened"),
        }
    };
    assert!(matches!(err, OpenError::LegacyFormat { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("remove") && text.contains(&dir.path().display().to_string()),
        "{text}"
    );

    // A new, empty database records its format and opens again.
    let fresh = tempfile::tempdir().unwrap();
    drop(open(fresh.path()));
    let db = open(fresh.path());
    assert_eq!(
        db.get(FORMAT_KEY).unwrap().as_deref(),
        Some(&[RECORD_VERSION][..])
    );
}
