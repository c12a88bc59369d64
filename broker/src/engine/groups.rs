//! The Raft groups this node hosts.
//!
//! Owns: the set of running groups (each an openraft instance with its state machine,
//! its view of the node's shared log and its write pipeline), looking one up by id
//! without a lock (readers load a snapshot of the set; adding or removing a group swaps
//! it), and serving peers' RPCs to the right group.
//! Must not: decide which groups should run here (the cluster map does) or touch
//! sessions.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::pipeline::Pipeline;
use crate::raft::log_store::LogStore;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use crate::raft::network::frame::HISTORY_REPLY_BYTES_MAX;
use crate::raft::network::{
    ClientWriteRaftError, GroupResolver, PeerHandler, PeerReply, ReadRequest, WireHistory,
};
use crate::raft::state_machine::StateMachine;
use crate::raft::{GroupId, NodeId, Raft};
use crate::raft::{Response, TypeConfig};
use crate::store::Command;

/// One Raft group on this node.
pub struct Group {
    /// The group's id.
    pub id: GroupId,
    /// Its openraft instance.
    pub raft: Raft,
    /// This replica's state machine.
    pub sm: StateMachine,
    /// Its log in the node's shared log.
    pub log: LogStore,
    /// Its write pipeline.
    pub pipeline: Pipeline,
}

impl Group {
    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// True while this replica leads the group.
    pub fn is_leader(&self, me: NodeId) -> bool {
        self.leader() == Some(me)
    }

    /// The leader this replica knows of, with its address (for `NotLeader` hints).
    pub fn leader_addr(&self) -> Option<(NodeId, String)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let leader = m.current_leader?;
        let node = m.membership_config.membership().get_node(&leader)?;
        Some((leader, node.addr.clone()))
    }

    /// The seq the next message of `conv` gets on this replica (1 when it does not
    /// exist here yet).
    pub fn next_seq(&self, conv: u64) -> u64 {
        self.sm
            .with_store(|s| s.next_seq(conv).unwrap_or(1))
            .unwrap_or(1)
    }

    fn not_leader(&self) -> Option<PeerReply> {
        (!self.sm.is_leader()).then(|| PeerReply::NotLeader {
            leader: self.leader_addr(),
        })
    }
}

/// What a peer may ask of a group this node hosts: Raft's RPCs go to its Raft; reads
/// and watches are served by its leader only.
impl PeerHandler for Group {
    async fn append_entries(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
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
        self.raft.install_snapshot(rpc).await
    }

    async fn client_write(&self, command: Command) -> Result<Response, ClientWriteRaftError> {
        PeerHandler::client_write(&self.raft, command).await
    }

    async fn client_write_batch(
        &self,
        commands: Vec<Command>,
    ) -> Result<Vec<Option<Response>>, ClientWriteRaftError> {
        self.raft.client_write_batch(commands).await
    }

    async fn read(&self, request: ReadRequest) -> PeerReply {
        if let Some(not_leader) = self.not_leader() {
            return not_leader;
        }
        match request {
            ReadRequest::Authorize {
                principal,
                action,
                conv,
            } => PeerReply::Authorized(
                self.sm
                    .with_store(|s| s.authorize(&principal, action, conv))
                    .and_then(|r| r.map_err(|e| e.refusal())),
            ),
            ReadRequest::History { conv, from, limit } => {
                PeerReply::History(self.sm.read(conv, from.max(1), limit as usize).map(|h| {
                    let mut bytes = 0;
                    let messages = h
                        .messages
                        .iter()
                        .take_while(|m| {
                            bytes += m.delivery.frame.len();
                            bytes <= HISTORY_REPLY_BYTES_MAX
                        })
                        .map(|m| m.message.clone())
                        .collect();
                    WireHistory {
                        messages,
                        first_seq: h.first_seq,
                        next_seq: h.next_seq,
                    }
                }))
            }
        }
    }

    async fn elect(&self) -> PeerReply {
        match self.raft.trigger().elect().await {
            Ok(()) => PeerReply::Done,
            Err(fatal) => PeerReply::Fatal(crate::raft::network::frame::WireFatal::from(&fatal)),
        }
    }

    async fn watch(&self, convs: Vec<u64>, send: quinn::SendStream, recv: quinn::RecvStream) {
        // The peer's id is not needed to serve it; 0 marks "a peer" in logs.
        crate::fanout::watchers::serve_watch(self, 0, convs, send, recv).await;
    }
}

/// The groups this node hosts. Cheap to clone; clones share the set.
#[derive(Clone, Default)]
pub struct GroupSet {
    groups: Arc<ArcSwap<BTreeMap<GroupId, Arc<Group>>>>,
}

impl GroupSet {
    /// A set of these groups.
    pub fn new(groups: impl IntoIterator<Item = Group>) -> Self {
        let map = groups.into_iter().map(|g| (g.id, Arc::new(g))).collect();
        GroupSet {
            groups: Arc::new(ArcSwap::from_pointee(map)),
        }
    }

    /// The group `id`, if this node hosts it.
    pub fn get(&self, id: GroupId) -> Option<Arc<Group>> {
        self.groups.load().get(&id).cloned()
    }

    /// Every hosted group, by id.
    pub fn all(&self) -> Arc<BTreeMap<GroupId, Arc<Group>>> {
        self.groups.load_full()
    }

    /// Adds (or replaces) a group.
    pub fn insert(&self, group: Group) {
        let group = Arc::new(group);
        self.groups.rcu(|current| {
            let mut next = BTreeMap::clone(current);
            next.insert(group.id, group.clone());
            next
        });
    }

    /// Removes a group; returns it.
    pub fn remove(&self, id: GroupId) -> Option<Arc<Group>> {
        let mut removed = None;
        self.groups.rcu(|current| {
            let mut next = BTreeMap::clone(current);
            removed = next.remove(&id);
            next
        });
        removed
    }
}

/// Peers' RPCs go to the hosted group; a group not hosted here is `NoGroup`.
impl GroupResolver for GroupSet {
    type Handler = Arc<Group>;

    fn group(&self, group: GroupId) -> Option<Arc<Group>> {
        self.get(group)
    }
}
