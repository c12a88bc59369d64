//! What a peer may ask of a group this node hosts.
//!
//! Owns: [`GroupHandler`], the peer protocol's view of a hosted group: Raft's RPCs go to
//! its Raft; forwarded writes are proposed there; reads, watches and replica moves are
//! served by a data group's leader only; an `Elect` makes this replica start an
//! election (leader balance).
//! Must not: decide anything the group's leader did not ask for.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;

use super::groups::{Group, MetaGroup};
use crate::raft::network::frame::{WireFatal, HISTORY_REPLY_BYTES_MAX};
use crate::raft::network::{
    ClientWriteRaftError, PeerHandler, PeerReply, ReadRequest, WireHistory,
};
use crate::raft::{NodeId, Raft, Response, TypeConfig};
use crate::store::Command;

/// How long a leader waits for a new replica to catch up before it gives up on a move
/// (the mover retries).
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(300);
/// A new replica counts as caught up once it stores the leader's log up to this many
/// entries behind its end (and at least up to where the wait began). Entries are
/// batches of up to 4096 writes, so openraft's default of 5000 entries would let a
/// replica missing a whole history become a voter.
pub const CATCH_UP_LAG_ENTRIES_MAX: u64 = 8;

/// A hosted group, as a peer addresses it.
#[derive(Clone)]
pub enum GroupHandler {
    /// A data group.
    Data(Arc<Group>),
    /// The metadata group.
    Meta(Arc<MetaGroup>),
}

impl GroupHandler {
    fn raft(&self) -> &Raft {
        match self {
            GroupHandler::Data(g) => &g.raft,
            GroupHandler::Meta(m) => &m.raft,
        }
    }
}

impl PeerHandler for GroupHandler {
    async fn append_entries(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        self.raft().append_entries(rpc).await
    }

    async fn vote(
        &self,
        rpc: VoteRequest<NodeId>,
    ) -> Result<VoteResponse<NodeId>, RaftError<NodeId>> {
        self.raft().vote(rpc).await
    }

    async fn install_snapshot(
        &self,
        rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        self.raft().install_snapshot(rpc).await
    }

    async fn client_write(&self, command: Command) -> Result<Response, ClientWriteRaftError> {
        PeerHandler::client_write(self.raft(), command).await
    }

    async fn client_write_batch(
        &self,
        commands: Vec<Command>,
    ) -> Result<Vec<Option<Response>>, ClientWriteRaftError> {
        self.raft().client_write_batch(commands).await
    }

    async fn read(&self, request: ReadRequest) -> PeerReply {
        match self {
            GroupHandler::Data(group) => read(group, request),
            GroupHandler::Meta(_) => PeerReply::error("the metadata group holds no conversation"),
        }
    }

    async fn elect(&self) -> PeerReply {
        match self.raft().trigger().elect().await {
            Ok(()) => PeerReply::Done,
            Err(fatal) => PeerReply::Fatal(WireFatal::from(&fatal)),
        }
    }

    async fn reconfigure(&self, add: NodeId, addr: String, remove: NodeId) -> PeerReply {
        match self {
            GroupHandler::Data(group) => reconfigure(group, add, addr, remove).await,
            GroupHandler::Meta(_) => {
                PeerReply::error("the metadata group's members are managed by its leader")
            }
        }
    }

    async fn watch(&self, convs: Vec<u64>, send: quinn::SendStream, recv: quinn::RecvStream) {
        match self {
            // The peer's id is not needed to serve it; 0 marks "a peer" in logs.
            GroupHandler::Data(group) => {
                crate::fanout::watchers::serve_watch(group, 0, convs, send, recv).await
            }
            GroupHandler::Meta(_) => {
                let mut send = send;
                crate::raft::network::server::send_reply(
                    &mut send,
                    &PeerReply::error("the metadata group has no conversations to watch"),
                )
                .await;
            }
        }
    }
}

fn read(group: &Group, request: ReadRequest) -> PeerReply {
    if let Some(not_leader) = group.not_leader() {
        return not_leader;
    }
    match request {
        ReadRequest::Authorize {
            principal,
            action,
            conv,
        } => PeerReply::Authorized(
            group
                .sm
                .with_store(|s| s.authorize(&principal, action, conv))
                .and_then(|r| r.map_err(|e| e.refusal())),
        ),
        ReadRequest::History { conv, from, limit } => {
            PeerReply::History(group.sm.read(conv, from.max(1), limit as usize).map(|h| {
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

/// Waits (at most [`CATCH_UP_TIMEOUT`]) until learner `node` stores this leader's log
/// up to where it ended when the wait began, and to within
/// [`CATCH_UP_LAG_ENTRIES_MAX`] of its end now.
async fn caught_up(raft: &Raft, node: NodeId) -> Result<(), String> {
    let mut metrics = raft.metrics();
    let target = metrics.borrow().last_log_index.unwrap_or(0);
    let started = tokio::time::Instant::now();
    let wait = async {
        loop {
            {
                let m = metrics.borrow_and_update();
                let Some(replication) = &m.replication else {
                    return Err("this node stopped leading the group".to_owned());
                };
                let matched = replication
                    .get(&node)
                    .and_then(|l| l.as_ref().map(|l| l.index))
                    .unwrap_or(0);
                let end = m.last_log_index.unwrap_or(0);
                if matched >= target && matched + CATCH_UP_LAG_ENTRIES_MAX >= end {
                    return Ok(());
                }
            }
            if metrics.changed().await.is_err() {
                return Err("the group's raft stopped".to_owned());
            }
        }
    };
    match tokio::time::timeout(CATCH_UP_TIMEOUT, wait).await {
        Ok(Ok(())) => {
            tracing::info!(
                node,
                entries = target,
                took_ms = started.elapsed().as_millis() as u64,
                "the new replica caught up"
            );
            Ok(())
        }
        Ok(Err(problem)) => Err(problem),
        Err(_) => Err(format!(
            "node {node} did not catch up within {CATCH_UP_TIMEOUT:?}"
        )),
    }
}

/// Moves one replica of `group` (this node leads it): `add` joins as a learner, catches
/// up, and the voters change from the current set to the set with `add` in place of
/// `remove`. Idempotent: a move already done answers `Done` at once.
async fn reconfigure(group: &Group, add: NodeId, addr: String, remove: NodeId) -> PeerReply {
    if let Some(not_leader) = group.not_leader() {
        return not_leader;
    }
    let (voters, nodes): (BTreeSet<NodeId>, BTreeMap<NodeId, BasicNode>) = {
        let metrics = group.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        (
            membership.voter_ids().collect(),
            membership.nodes().map(|(id, n)| (*id, n.clone())).collect(),
        )
    };
    let mut target = voters.clone();
    target.remove(&remove);
    target.insert(add);
    if voters == target {
        return PeerReply::Done;
    }
    if !nodes.contains_key(&add) {
        if let Err(e) = group.raft.add_learner(add, BasicNode { addr }, false).await {
            return PeerReply::error(format!("cannot add node {add} as a learner: {e}"));
        }
    }
    // Also when an earlier attempt added the learner: it may still be behind.
    if let Err(problem) = caught_up(&group.raft, add).await {
        return PeerReply::error(problem);
    }
    match group.raft.change_membership(target, false).await {
        Ok(_) => PeerReply::Done,
        Err(e) => PeerReply::error(format!("cannot change the voters: {e}")),
    }
}
