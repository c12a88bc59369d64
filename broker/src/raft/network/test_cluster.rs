//! Real openraft nodes talking over the peer transport: a trivial in-memory log store
//! and state machine (tests only; nothing here is durable), a three-node cluster that
//! elects, replicates and forwards over QUIC, and a learner brought up to date by a
//! chunked snapshot.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald_client::io::TransportLimits;
use herald_client::wire::{IdempotencyKey, Principal, ALPN_PEER};
use openraft::error::{ClientWriteError, InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    BasicNode, EntryPayload, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StoredMembership,
};

use super::*;
use crate::raft::{Entry, LogId, NodeId, Outcome, Raft, Response, StorageError, TypeConfig, Vote};
use crate::store::Command;

const SECRET: &[u8] = b"cluster secret for the raft test";

#[derive(Default)]
struct LogInner {
    vote: Option<Vote>,
    committed: Option<LogId>,
    log: BTreeMap<u64, Entry>,
    last_purged: Option<LogId>,
}

/// In-memory log (clones share it).
#[derive(Clone, Default)]
struct MemLog(Arc<tokio::sync::Mutex<LogInner>>);

impl RaftLogReader<TypeConfig> for MemLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(self
            .0
            .lock()
            .await
            .log
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for MemLog {
    type LogReader = MemLog;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let inner = self.0.lock().await;
        let last = inner.log.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last.or(inner.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> MemLog {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.0.lock().await.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.0.lock().await.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.0.lock().await.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.0.lock().await.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.0.lock().await;
        for entry in entries {
            inner.log.insert(entry.log_id.index, entry);
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut inner = self.0.lock().await;
        let _ = inner.log.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut inner = self.0.lock().await;
        inner.last_purged = Some(log_id);
        inner.log = inner.log.split_off(&(log_id.index + 1));
        Ok(())
    }
}

/// In-memory state machine: the applied commands; its snapshot is their count plus
/// padding, so that it spans several chunks.
#[derive(Default)]
struct SmInner {
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, BasicNode>,
    applied: u64,
    snapshot: Option<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)>,
}

#[derive(Clone, Default)]
struct MemSm(Arc<tokio::sync::Mutex<SmInner>>);

const SNAPSHOT_PADDING: usize = 5000;

impl RaftSnapshotBuilder<TypeConfig> for MemSm {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let mut inner = self.0.lock().await;
        let mut data = inner.applied.to_le_bytes().to_vec();
        data.resize(8 + SNAPSHOT_PADDING, 0x5A);
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
            snapshot_id: format!("snap-{:?}", inner.last_applied.map(|l| l.index)),
        };
        inner.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for MemSm {
    type SnapshotBuilder = MemSm;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), StorageError> {
        let inner = self.0.lock().await;
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Response>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.0.lock().await;
        let mut out = Vec::new();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            out.push(match entry.payload {
                EntryPayload::Blank => vec![Ok(Outcome::Changed)],
                EntryPayload::Normal(commands) => commands
                    .iter()
                    .map(|_| {
                        inner.applied += 1;
                        Ok(Outcome::Published {
                            seq: inner.applied,
                            duplicate: false,
                        })
                    })
                    .collect(),
                EntryPayload::Membership(m) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), m);
                    vec![Ok(Outcome::Changed)]
                }
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> MemSm {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let mut inner = self.0.lock().await;
        inner.applied = data
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0);
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let inner = self.0.lock().await;
        Ok(inner.snapshot.clone().map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

/// Raft behind a counter of the snapshot chunks it received, and a follower that can
/// be made slow at large AppendEntries.
struct Counting {
    raft: Raft,
    snapshot_chunks: Arc<AtomicUsize>,
    slow: Arc<SlowAppends>,
}

/// An AppendEntries of more than `above_entries` entries is held for [`SLOW_APPEND`]
/// before Raft sees it: a request that cannot be served within openraft's
/// `heartbeat_interval`, like a large one on a slow link or in a loaded debug build.
struct SlowAppends {
    above_entries: AtomicUsize,
    held: AtomicUsize,
}

/// How long a slow AppendEntries is held (openraft's budget for one is 50 ms here).
const SLOW_APPEND: Duration = Duration::from_millis(200);

impl PeerHandler for Counting {
    async fn append_entries(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        if rpc.entries.len() > self.slow.above_entries.load(Ordering::SeqCst) {
            self.slow.held.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(SLOW_APPEND).await;
        }
        self.raft.append_entries(rpc).await
    }

    async fn vote(
        &self,
        rpc: VoteRequest<NodeId>,
    ) -> Result<VoteResponse<NodeId>, RaftError<NodeId>> {
        self.raft.vote(rpc).await
    }

    async fn install_snapshot(
        &self,
        rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        self.snapshot_chunks.fetch_add(1, Ordering::SeqCst);
        self.raft.install_snapshot(rpc).await
    }

    async fn client_write(
        &self,
        command: Command,
    ) -> Result<Response, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>> {
        PeerHandler::client_write(&self.raft, command).await
    }

    async fn client_write_batch(
        &self,
        commands: crate::raft::Batch,
    ) -> Result<Vec<Option<Response>>, ClientWriteRaftError> {
        PeerHandler::client_write_batch(&self.raft, commands).await
    }
}

struct Node {
    id: NodeId,
    snapshot_chunks: Arc<AtomicUsize>,
    slow: Arc<SlowAppends>,
    addr: String,
    raft: Raft,
    network: PeerNetwork,
    log: MemLog,
    sm: MemSm,
    endpoint: quinn::Endpoint,
}

impl Node {
    /// Stops Raft and closes the endpoint.
    async fn stop(&self) {
        self.raft.shutdown().await.unwrap();
        self.endpoint.close(0u32.into(), b"done");
    }
}

async fn start_node(id: NodeId, files: &(tempfile::TempDir, Vec<u8>)) -> Node {
    let dir = files.0.path();
    let server_config = crate::certs::server_config(
        &dir.join("node.pem"),
        &dir.join("node.key"),
        &TransportLimits::default(),
    )
    .unwrap();
    let endpoint = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap().to_string();
    let network = PeerNetwork::new(PeerNetworkConfig {
        node_id: id,
        secret: SECRET.to_vec(),
        endpoint: endpoint.clone(),
        client_config: herald_client::io::client_config(
            &files.1,
            ALPN_PEER,
            &TransportLimits::default(),
        )
        .unwrap(),
        connect_timeout: Duration::from_secs(2),
        rpc_timeout: Duration::from_secs(5),
    });
    let config = openraft::Config {
        cluster_name: "network-test".into(),
        heartbeat_interval: 50,
        election_timeout_min: 300,
        election_timeout_max: 600,
        snapshot_max_chunk_size: 1024,
        install_snapshot_timeout: 1000,
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        ..Default::default()
    };
    let sm = MemSm::default();
    let log = MemLog::default();
    let raft = Raft::new(
        id,
        Arc::new(config.validate().unwrap()),
        network.for_group(1),
        log.clone(),
        sm.clone(),
    )
    .await
    .unwrap();
    let snapshot_chunks = Arc::new(AtomicUsize::new(0));
    let slow = Arc::new(SlowAppends {
        above_entries: AtomicUsize::new(usize::MAX),
        held: AtomicUsize::new(0),
    });
    let ctx = Arc::new(PeerServerContext {
        groups: Arc::new(Counting {
            raft: raft.clone(),
            snapshot_chunks: snapshot_chunks.clone(),
            slow: slow.clone(),
        }),
        secret: SECRET.to_vec(),
        streams_max: 16,
    });
    {
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        serve_peer(conn, ctx).await;
                    }
                });
            }
        });
    }
    Node {
        id,
        snapshot_chunks,
        slow,
        addr,
        raft,
        network,
        log,
        sm,
        endpoint,
    }
}

/// A three-node cluster over QUIC, initialised; returns the nodes and the leader's id.
async fn three_nodes(files: &(tempfile::TempDir, Vec<u8>)) -> (Vec<Node>, NodeId) {
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start_node(id, files).await);
    }
    let members: BTreeMap<NodeId, BasicNode> = nodes
        .iter()
        .map(|n| (n.id, BasicNode::new(&n.addr)))
        .collect();
    nodes[0].raft.initialize(members).await.unwrap();
    let metrics = nodes[0]
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.current_leader.is_some(), "a leader")
        .await
        .unwrap();
    (nodes, metrics.current_leader.unwrap_or_default())
}

fn test_files() -> (tempfile::TempDir, Vec<u8>) {
    let generated = crate::certs::generate_pki(&["127.0.0.1", "localhost"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("node.pem"), &generated.node_cert_pem).unwrap();
    std::fs::write(dir.path().join("node.key"), &generated.node_key_pem).unwrap();
    (dir, generated.ca_pem.into_bytes())
}

fn publish(n: u64) -> Command {
    Command::Publish {
        conv: 1,
        sender: Principal::Service("backend".into()),
        key: IdempotencyKey::Caller(format!("k{n}")),
        payload: format!("message {n}").into_bytes(),
        timestamp_ms: n,
    }
}

#[tokio::test]
async fn a_raft_cluster_elects_replicates_forwards_and_snapshots_over_quic() {
    let files = test_files();
    let (nodes, leader_id) = three_nodes(&files).await;
    let timeout = Some(Duration::from_secs(10));
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    let follower = nodes.iter().find(|n| n.id != leader_id).unwrap();

    // A write on the leader is replicated to every node.
    let written = leader
        .raft
        .client_write(crate::raft::Batch::new(vec![publish(1)]))
        .await
        .unwrap();
    assert_eq!(
        written.data,
        vec![Ok(Outcome::Published {
            seq: 1,
            duplicate: false
        })]
    );
    // A follower forwards a write to the leader over the transport.
    let reply = follower
        .network
        .forward(1, leader.id, &leader.addr, publish(2))
        .await
        .unwrap();
    assert_eq!(
        reply,
        ForwardReply::Done(Ok(Outcome::Published {
            seq: 2,
            duplicate: false
        }))
    );
    // A follower asked to write answers with the leader.
    let other = nodes
        .iter()
        .find(|n| n.id != leader_id && n.id != follower.id)
        .unwrap();
    let reply = other
        .network
        .forward(1, follower.id, &follower.addr, publish(3))
        .await
        .unwrap();
    assert_eq!(
        reply,
        ForwardReply::NotLeader(Some((leader.id, leader.addr.clone())))
    );
    let last = leader.raft.metrics().borrow().last_applied.map(|l| l.index);
    for node in &nodes {
        node.raft
            .wait(timeout)
            .applied_index_at_least(last, "replicated")
            .await
            .unwrap();
        assert_eq!(node.sm.0.lock().await.applied, 2);
    }

    // Snapshot and purge the leader's log, then add a learner: only a snapshot (sent in
    // 1 KiB chunks over QUIC) can bring it up to date.
    leader.raft.trigger().snapshot().await.unwrap();
    leader
        .raft
        .wait(timeout)
        .metrics(|m| m.purged.is_some() && m.purged == m.snapshot, "purged")
        .await
        .unwrap();
    let learner = start_node(4, &files).await;
    leader
        .raft
        .add_learner(4, BasicNode::new(&learner.addr), true)
        .await
        .unwrap();
    learner
        .raft
        .wait(timeout)
        .applied_index_at_least(last, "snapshot installed")
        .await
        .unwrap();
    {
        let sm = learner.sm.0.lock().await;
        assert_eq!(sm.applied, 2);
        let (_, data) = sm.snapshot.as_ref().unwrap();
        assert_eq!(data.len(), 8 + SNAPSHOT_PADDING);
    }
    // 5008 bytes in 1 KiB chunks.
    assert_eq!(learner.snapshot_chunks.load(Ordering::SeqCst), 5);

    for node in nodes.iter().chain([&learner]) {
        node.stop().await;
    }
}

#[tokio::test]
async fn a_forwarded_batch_commits_in_order_on_the_leader() {
    let files = test_files();
    let (nodes, leader_id) = three_nodes(&files).await;
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    let follower = nodes.iter().find(|n| n.id != leader_id).unwrap();
    let other = nodes
        .iter()
        .find(|n| n.id != leader_id && n.id != follower.id)
        .unwrap();

    // A follower asked to take a batch answers with the leader; nothing is proposed.
    let reply = other
        .network
        .forward_batch(
            1,
            follower.id,
            &follower.addr,
            (1000..1010).map(publish).collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    assert_eq!(
        reply,
        ForwardBatchReply::NotLeader(Some((leader.id, leader.addr.clone())))
    );

    // The batch, sent to the leader from a follower: every command committed, in order.
    let numbers: Vec<u64> = (0..200).map(|i| (i * 7919) % 1000).collect();
    let commands: Vec<Command> = numbers.iter().copied().map(publish).collect();
    let reply = follower
        .network
        .forward_batch(1, leader.id, &leader.addr, commands.clone())
        .await
        .unwrap();
    let ForwardBatchReply::Done(results) = reply else {
        panic!("expected Done, got {reply:?}");
    };
    // The state machine numbers applied commands 1, 2, …: applied in batch order.
    let expected: Vec<Option<Response>> = (1..=200)
        .map(|seq| {
            Some(Ok(Outcome::Published {
                seq,
                duplicate: false,
            }))
        })
        .collect();
    assert_eq!(results, expected);

    // And the leader's log holds them as one entry, in the batch's order.
    let log = leader.log.0.lock().await;
    let normal: Vec<(u64, &crate::raft::Batch)> = log
        .log
        .values()
        .filter_map(|e| match &e.payload {
            EntryPayload::Normal(c) => Some((e.log_id.index, c)),
            _ => None,
        })
        .collect();
    assert_eq!(normal.len(), 1, "one entry for the whole batch");
    assert_eq!(normal[0].1.len(), 200);
    for (command, sent) in normal[0].1.iter().zip(&commands) {
        assert_eq!(command, sent);
    }
    drop(log);

    for node in &nodes {
        node.stop().await;
    }
}

/// openraft 0.9 gives each AppendEntries `heartbeat_interval` and resends the same
/// range after a timeout: a follower that cannot take a large request in time never
/// caught up (t60, 2026-12-02). Timed-out requests are halved until they fit.
#[tokio::test]
async fn a_follower_too_slow_for_large_appends_still_catches_up() {
    let files = test_files();
    let (nodes, leader_id) = three_nodes(&files).await;
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    let slow = nodes.iter().find(|n| n.id != leader_id).unwrap();
    // While 80 writes commit (one entry each; the other follower makes the quorum),
    // every AppendEntries with entries to the slow follower is too slow: its range
    // grows to 80 entries.
    slow.slow.above_entries.store(0, Ordering::SeqCst);
    for n in 0..80 {
        leader
            .raft
            .client_write(crate::raft::Batch::new(vec![publish(n)]))
            .await
            .unwrap();
    }
    // Now only requests of more than 4 entries are: resending the whole range after
    // each timeout would never get through.
    slow.slow.above_entries.store(4, Ordering::SeqCst);
    let last = leader.raft.metrics().borrow().last_log_index.unwrap();
    let caught_up = leader
        .raft
        .wait(Some(Duration::from_secs(20)))
        .metrics(
            |m| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&slow.id).copied().flatten())
                    .is_some_and(|matched| matched.index >= last)
            },
            "the slow follower has every entry",
        )
        .await;
    let held = slow.slow.held.load(Ordering::SeqCst);
    assert!(held > 0, "no AppendEntries was large enough to be slow");
    assert!(
        caught_up.is_ok(),
        "the slow follower did not catch up to index {last} ({held} slow AppendEntries): {caught_up:?}"
    );

    for node in &nodes {
        node.stop().await;
    }
}
