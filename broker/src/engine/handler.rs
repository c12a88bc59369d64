//! What a peer may ask of a group this node hosts.
//!
//! Owns: [`GroupHandler`], the peer protocol's view of a hosted group: Raft's RPCs go to
//! its Raft; forwarded writes are proposed there; reads, watches and replica moves are
//! served by a data group's leader only; an `Elect` makes this replica start an
//! election (leader balance).
//! Must not: decide anything the group's leader did not ask for.

use std::sync::Arc;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::groups::{Group, MetaGroup};
use crate::raft::network::frame::{WireFatal, HISTORY_REPLY_BYTES_MAX};
use crate::raft::network::{
    ClientWriteRaftError, MoveRequest, PeerHandler, PeerReply, ReadRequest, WireHistory,
};
use crate::raft::{NodeId, Raft, Response, TypeConfig};
use crate::store::Command;

/// A hosted group, as a peer addresses it.
#[derive(Clone)]
pub struct GroupHandler {
    /// The group.
    pub hosted: Hosted,
    /// This node is draining: it refuses to start elections (it is handing its
    /// leaderships away, and must not take them back).
    pub draining: bool,
}

/// Which kind of group a [`GroupHandler`] serves.
#[derive(Clone)]
pub enum Hosted {
    /// A data group.
    Data(Arc<Group>),
    /// The metadata group.
    Meta(Arc<MetaGroup>),
}

impl GroupHandler {
    fn contact(&self) -> &super::groups::LeaderContact {
        match &self.hosted {
            Hosted::Data(g) => &g.contact,
            Hosted::Meta(m) => &m.contact,
        }
    }

    /// Runs `propose`, a write another node forwarded here; a data group's is held
    /// during a handover of the group (see `engine::pipeline`).
    async fn forwarded<T>(&self, propose: impl std::future::Future<Output = T>) -> T {
        match &self.hosted {
            Hosted::Data(group) => group.pipeline.propose_forwarded(propose).await,
            Hosted::Meta(_) => propose.await,
        }
    }

    fn raft(&self) -> &Raft {
        match &self.hosted {
            Hosted::Data(g) => &g.raft,
            Hosted::Meta(m) => &m.raft,
        }
    }
}

impl PeerHandler for GroupHandler {
    async fn append_entries(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        let commit_index = rpc.leader_commit.map_or(0, |l| l.index);
        let response = self.raft().append_entries(rpc).await;
        // Accepted from the current leader (a conflict is still contact with it; a
        // higher vote means the sender is not the leader).
        if matches!(
            response,
            Ok(AppendEntriesResponse::Success
                | AppendEntriesResponse::PartialSuccess(_)
                | AppendEntriesResponse::Conflict)
        ) {
            self.contact().heard(commit_index);
        }
        response
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
        self.forwarded(PeerHandler::client_write(self.raft(), command))
            .await
    }

    async fn client_write_batch(
        &self,
        commands: crate::raft::Batch,
    ) -> Result<Vec<Option<Response>>, ClientWriteRaftError> {
        self.forwarded(self.raft().client_write_batch(commands))
            .await
    }

    async fn read(&self, request: ReadRequest) -> PeerReply {
        match &self.hosted {
            Hosted::Data(group) => read(group, request),
            Hosted::Meta(_) => PeerReply::error("the metadata group holds no conversation"),
        }
    }

    async fn elect(&self) -> PeerReply {
        if self.draining {
            return PeerReply::error(
                "this node is draining (shutting down) and will not lead; pick another replica",
            );
        }
        match self.raft().trigger().elect().await {
            Ok(()) => PeerReply::Done,
            Err(fatal) => PeerReply::Fatal(WireFatal::from(&fatal)),
        }
    }

    async fn reconfigure(&self, request: MoveRequest) -> PeerReply {
        match &self.hosted {
            Hosted::Data(group) => super::moves::reconfigure(group, request).await,
            Hosted::Meta(_) => {
                PeerReply::error("the metadata group's members are managed by its leader")
            }
        }
    }

    async fn watch(&self, convs: Vec<u64>, send: quinn::SendStream, recv: quinn::RecvStream) {
        match &self.hosted {
            // The peer's id is not needed to serve it; 0 marks "a peer" in logs.
            Hosted::Data(group) => {
                crate::fanout::watchers::serve_watch(group, 0, convs, send, recv).await
            }
            Hosted::Meta(_) => {
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
                let messages = h.messages_within(HISTORY_REPLY_BYTES_MAX);
                WireHistory {
                    messages,
                    first_seq: h.first_seq,
                    next_seq: h.next_seq,
                }
            }))
        }
    }
}
