//! The node's conversation engine: where client requests meet the Raft groups.
//!
//! Owns: finding a conversation's group (slot → group, from the [`ClusterMap`]),
//! turning requests into [`Command`]s and queueing them on that group's write
//! [`Pipeline`] (which commits them in order through the group's leader, wherever it
//! is, retrying through elections until a bound), the wall clock for timestamps, and
//! answering reads from this node's replica of the group. Writes are two-step: the
//! engine queues a write and returns a [`Submitted`]; awaiting it gives the outcome. A
//! session queues its writes in the order it sent them, so writes of one session to one
//! conversation commit in that order. A write is answered only after its entry is
//! committed (fsync'ed on a quorum) and applied; every command is idempotent, so a
//! retry across a failover changes nothing twice (publishes carry their idempotency
//! key).
//!
//! Must not: touch sockets or sessions; fan-out happens in the state machine, on every
//! replica, when the entry is applied.
//!
//! Reads (authorization, history, next seq) come from this replica's applied state,
//! which may trail the leader by the entries in flight: a session on a follower sees a
//! message a moment later than one on the leader, never out of order.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herald_client::wire::{
    ClusterMapView, ConvKind, GroupView, IdempotencyKey, NodeView, Principal, Refusal, RefusalCode,
};
mod groups;
mod handler;
mod leaders;
pub mod moves;
mod pipeline;
mod retention;

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::cluster_map::{ClusterMap, SharedMap};
use crate::fanout::interest::Interest;
use crate::fanout::Hub;
use crate::metrics::Metrics;
use crate::raft::network::{PeerNetwork, PeerReply, ReadRequest};
use crate::raft::{GroupId, NodeId, Outcome};
use crate::routing::Router;
use crate::store::{Action, Command, History, StoredMessage};
pub use groups::{leads, Group, GroupSet, LeaderContact, MetaGroup};
pub use handler::GroupHandler;
pub use leaders::Leaders;
pub use moves::CATCH_UP_TIMEOUT;
pub use pipeline::Pipeline;
pub use retention::{UnpinOutcome, UNPIN_FREED_PER_SNAPSHOT_BYTE, UNPIN_SEGMENTS_MIN};

/// How long [`Engine::true_head_of`] waits for a quorum to confirm this node's
/// leadership: a few heartbeat rounds on a healthy cluster. Past it the head is not
/// final, and a subscription beyond it waits at its cursor instead of being refused.
pub const TRUE_HEAD_CONFIRM_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// The groups, the cluster map and the metrics of one node.
pub struct Engine {
    groups: GroupSet,
    map: SharedMap,
    hub: Arc<Hub>,
    peers: PeerNetwork,
    leaders: Arc<Leaders>,
    interest: Interest,
    /// Pipelines of groups with no replica here (writes forwarded to their leaders);
    /// at most one per group of the map.
    remote_pipelines: Mutex<HashMap<GroupId, Pipeline>>,
    node_id: NodeId,
    metrics: Arc<Metrics>,
    payload_bytes_max: u32,
    frame_bytes_max: u32,
    write_timeout: Duration,
}

/// What the engine needs to know of the node.
pub struct EngineConfig {
    /// This node.
    pub node_id: NodeId,
    /// `limits.payload_bytes_max`.
    pub payload_bytes_max: u32,
    /// `limits.frame_bytes_max` (frames rebuilt from remote history must fit).
    pub frame_bytes_max: u32,
    /// `raft.write_timeout`.
    pub write_timeout: Duration,
}

/// Which way [`Engine::change_members`] changes the member set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberChange {
    /// Add them (present ones are ignored).
    Add,
    /// Remove them (absent ones are ignored).
    Remove,
}

/// The outcome of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOutcome {
    /// The message's seq (the original one for a duplicate).
    pub seq: u64,
    /// True when the idempotency key was seen before and nothing was appended.
    pub duplicate: bool,
}

impl Engine {
    /// An engine over the started groups of this node. A write that finds no leader
    /// for `write_timeout` is refused with `Unavailable`.
    pub fn new(
        config: EngineConfig,
        groups: GroupSet,
        map: SharedMap,
        hub: Arc<Hub>,
        peers: PeerNetwork,
        metrics: Arc<Metrics>,
    ) -> Self {
        let leaders = Arc::new(Leaders::new(
            config.node_id,
            map.clone(),
            groups.clone(),
            peers.clone(),
        ));
        let interest = Interest::new(groups.clone(), leaders.clone(), peers.clone(), hub.clone());
        Engine {
            groups,
            map,
            hub,
            peers,
            leaders,
            interest,
            remote_pipelines: Mutex::new(HashMap::new()),
            node_id: config.node_id,
            metrics,
            payload_bytes_max: config.payload_bytes_max,
            frame_bytes_max: config.frame_bytes_max,
            write_timeout: config.write_timeout,
        }
    }

    /// The local routing table.
    pub fn router(&self) -> &Router {
        self.hub.router()
    }

    /// Where this node's deliveries arrive.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Dials the other nodes.
    pub fn peers(&self) -> &PeerNetwork {
        &self.peers
    }

    /// The groups this node hosts.
    pub fn groups(&self) -> &GroupSet {
        &self.groups
    }

    /// The cluster map as this node knows it now.
    pub fn map(&self) -> Arc<ClusterMap> {
        self.map.load_full()
    }

    /// Replaces the node's map (the reconciler, on every change of the metadata group).
    pub fn set_map(&self, map: Arc<ClusterMap>) {
        self.map.store(map);
    }

    /// Leader guesses for every group.
    pub fn leaders(&self) -> &Arc<Leaders> {
        &self.leaders
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The group that owns `conv`.
    pub fn group_of(&self, conv: u64) -> GroupId {
        self.map.load().group_of(conv)
    }

    /// Queues a conversation create (idempotent); the answer says whether this call
    /// created it.
    pub async fn create(
        &self,
        principal: &Principal,
        conv: u64,
        kind: ConvKind,
        members: Vec<u64>,
    ) -> Result<Submitted<bool>, Refusal> {
        // Creating needs only the role check; the conversation may not exist yet.
        self.authorize_role(principal, conv)?;
        let command = Command::CreateConversation {
            conv,
            kind,
            members,
        };
        self.submit(conv, command, |outcome| match outcome {
            Outcome::Created { created } => Ok(created),
            other => Err(unexpected(other)),
        })
        .await
    }

    /// Queues adding or removing members.
    pub async fn change_members(
        &self,
        principal: &Principal,
        conv: u64,
        members: Vec<u64>,
        change: MemberChange,
    ) -> Result<Submitted<()>, Refusal> {
        self.authorize_role(principal, conv)?;
        let command = match change {
            MemberChange::Add => Command::AddMembers { conv, members },
            MemberChange::Remove => Command::RemoveMembers { conv, members },
        };
        self.submit(conv, command, |_| Ok(())).await
    }

    /// Queues a message. Answered after commit and apply; the state machine
    /// authorizes it and fans it out on every replica.
    pub async fn publish(
        &self,
        principal: &Principal,
        conv: u64,
        key: IdempotencyKey,
        payload: Vec<u8>,
    ) -> Result<Submitted<PublishOutcome>, Refusal> {
        if payload.len() > self.payload_bytes_max as usize {
            return Err(self.refuse(Refusal::new(
                RefusalCode::PayloadTooLarge,
                format!(
                    "payload of {} bytes is above the limit of {} bytes (limits.payload_bytes_max)",
                    payload.len(),
                    self.payload_bytes_max
                ),
            )));
        }
        let command = Command::Publish {
            conv,
            sender: principal.clone(),
            key,
            payload,
            timestamp_ms: now_ms(),
        };
        let metrics = self.metrics.clone();
        self.submit(conv, command, move |outcome| match outcome {
            Outcome::Published { seq, duplicate } => {
                if duplicate {
                    metrics.publish_duplicates.inc();
                }
                Ok(PublishOutcome { seq, duplicate })
            }
            other => Err(unexpected(other)),
        })
        .await
    }

    async fn submit<T>(
        &self,
        conv: u64,
        command: Command,
        map: impl FnOnce(Outcome) -> Result<T, Refusal> + Send + 'static,
    ) -> Result<Submitted<T>, Refusal> {
        let answer = self
            .pipeline(self.group_of(conv))
            .submit(command, Instant::now() + self.write_timeout)
            .await;
        Ok(Submitted {
            answer,
            map: Box::new(map),
            metrics: self.metrics.clone(),
        })
    }

    /// The write pipeline of `group`: its replica's here, else one that forwards to its
    /// leader.
    fn pipeline(&self, group: GroupId) -> Pipeline {
        if let Some(local) = self.groups.get(group) {
            return local.pipeline.clone();
        }
        self.forwarding_pipeline(group)
    }

    fn start_remote_pipeline(&self, group: GroupId) -> Pipeline {
        Pipeline::start_remote(
            group,
            self.leaders.clone(),
            self.peers.clone(),
            self.node_id,
            self.metrics.clone(),
        )
    }

    /// The forwarding pipeline of `group` (created if this node had none): a replica
    /// starting here takes it over ([`Engine::hosted`]), so there is one queue per
    /// group. Taken before the replica starts, so a write arriving meanwhile joins the
    /// same queue.
    pub fn forwarding_pipeline(&self, group: GroupId) -> Pipeline {
        self.remote_pipelines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(group)
            .or_insert_with(|| self.start_remote_pipeline(group))
            .clone()
    }

    /// A replica of `group` now runs here (already in the group set) with the
    /// pipeline it took over: forget it as a forwarding pipeline.
    pub fn hosted(&self, group: GroupId) {
        self.remote_pipelines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&group);
    }

    /// The replica of `group` is about to stop here: its pipeline goes on as the
    /// group's forwarding pipeline (queued writes are forwarded to the leader). Call
    /// before removing the group from the group set.
    pub fn unhosting(&self, group: GroupId, pipeline: &Pipeline) {
        pipeline.unhost(self.leaders.clone());
        self.remote_pipelines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(group)
            .or_insert_with(|| pipeline.clone());
    }

    /// `conv`'s true head (the seq its next message gets) when this node leads its
    /// group and its replica holds every message ever acknowledged there (see
    /// [`Group::leads_caught_up`]), confirmed by a quorum (openraft's
    /// `ensure_linearizable`: an old leader cut off by a partition still names itself
    /// leader and caught up on its own metrics, and its head may trail the new
    /// leader's): a cursor beyond it names messages the group never had. `None`
    /// elsewhere, on a leader not caught up yet, and when no quorum confirms within
    /// [`TRUE_HEAD_CONFIRM_WAIT`]. The head is read from the replica after the check,
    /// never from a cache that may trail it. Costs a heartbeat round: for the rare
    /// "cursor beyond the head" path only.
    pub async fn true_head_of(&self, conv: u64) -> Option<u64> {
        let group = self.groups.get(self.group_of(conv))?;
        if !group.leads_caught_up(self.node_id) {
            return None;
        }
        match tokio::time::timeout(TRUE_HEAD_CONFIRM_WAIT, group.raft.ensure_linearizable()).await {
            Ok(Ok(_)) => Some(group.next_seq(conv)),
            Ok(Err(e)) => {
                tracing::debug!(conv, error = %e, "leadership not confirmed; the head is not final here");
                None
            }
            Err(_) => {
                tracing::debug!(
                    conv,
                    "no quorum confirmed the leadership within {TRUE_HEAD_CONFIRM_WAIT:?}; the head is not final here"
                );
                None
            }
        }
    }

    /// Checks that `principal` may do `action` in `conv`: on this node's replica of
    /// its group if there is one (which may trail the leader by the entries in flight),
    /// else at the group's leader.
    pub async fn authorize(
        &self,
        principal: &Principal,
        action: Action,
        conv: u64,
    ) -> Result<(), Refusal> {
        if action == Action::Manage {
            // Decided by role alone, wherever the conversation lives.
            return crate::store::ConversationStore::authorize_role(principal, conv)
                .map_err(|e| self.refuse(e.refusal()));
        }
        let result = match self.groups.get(self.group_of(conv)) {
            Some(group) => group
                .sm
                .with_store(|s| s.authorize(principal, action, conv))?
                .map_err(|e| e.refusal()),
            None => {
                let request = ReadRequest::Authorize {
                    principal: principal.clone(),
                    action,
                    conv,
                };
                match self.leaders.read(self.group_of(conv), request).await? {
                    PeerReply::Authorized(result) => result,
                    other => Err(unexpected_reply(&other)),
                }
            }
        };
        result.map_err(|r| self.refuse(r))
    }

    /// Up to `limit` messages of `conv` from `from` (the caller authorized the read).
    /// With `until`, messages up to `until` must be there: a replica here serves the
    /// read if it leads or already holds them; otherwise (and with no `until`: the
    /// newest) the group's leader does.
    pub async fn read(
        &self,
        conv: u64,
        from: u64,
        until: Option<u64>,
        limit: usize,
    ) -> Result<History, Refusal> {
        let group = self.group_of(conv);
        if let Some(local) = self.groups.get(group) {
            let covered = match until {
                Some(until) => local.next_seq(conv) > until,
                None => false,
            };
            if local.sm.is_leader() || covered {
                return local.sm.read(conv, from, limit);
            }
        }
        let request = ReadRequest::History {
            conv,
            from,
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
        };
        match self.leaders.read(group, request).await? {
            PeerReply::History(Ok(page)) => {
                let mut messages = Vec::with_capacity(page.messages.len());
                for message in page.messages {
                    let stored =
                        StoredMessage::new(message, self.frame_bytes_max).map_err(|e| {
                            Refusal::new(
                                RefusalCode::Internal,
                                format!("cannot re-encode a message read from the leader: {e}"),
                            )
                        })?;
                    messages.push(Arc::new(stored));
                }
                Ok(History {
                    messages,
                    first_seq: page.first_seq,
                    next_seq: page.next_seq,
                })
            }
            PeerReply::History(Err(refusal)) => Err(refusal),
            other => Err(unexpected_reply(&other)),
        }
    }

    /// The leader of `conv`'s group as far as this node knows, when it is another node
    /// (a hint for the client that sent a write here).
    pub fn leader_hint(&self, conv: u64) -> Option<NodeId> {
        self.leaders
            .known(self.group_of(conv))
            .filter(|l| *l != self.node_id)
    }

    /// The cluster map for clients: nodes, each group's slots and known leader.
    pub fn cluster_view(&self) -> ClusterMapView {
        let map = self.map();
        ClusterMapView {
            nodes: map
                .nodes()
                .iter()
                .map(|(id, node)| NodeView {
                    id: *id,
                    addr: node.addr.clone(),
                })
                .collect(),
            groups: map
                .groups()
                .iter()
                .map(|(id, group)| GroupView {
                    id: *id,
                    slot_start: group.slots.start,
                    slot_end: group.slots.end,
                    leader: self.leaders.known(*id),
                })
                .collect(),
        }
    }

    /// Makes every new message of `conv` reach this node's router (a session of this
    /// node subscribes to it; call after it is in the router). Returns the seq the next
    /// message gets as the group's leader registered it: everything below is in history.
    pub async fn watch(&self, conv: u64) -> Result<u64, Refusal> {
        self.interest.ensure(self.group_of(conv), conv).await
    }

    /// A session of this node stopped subscribing to `conv` (call after it left the
    /// router): the node stops watching it once no session does.
    pub fn unwatch(&self, conv: u64) {
        if self.router().subscriber_count(conv) == 0 {
            self.interest.release(self.group_of(conv), conv);
        }
    }

    fn authorize_role(&self, principal: &Principal, conv: u64) -> Result<(), Refusal> {
        crate::store::ConversationStore::authorize_role(principal, conv)
            .map_err(|e| self.refuse(e.refusal()))
    }

    fn refuse(&self, refusal: Refusal) -> Refusal {
        self.metrics.refused(refusal.code);
        refusal
    }
}

/// A write in the pipeline: [`Submitted::wait`] gives its outcome once committed.
pub struct Submitted<T> {
    answer: pipeline::Answer,
    map: Box<dyn FnOnce(Outcome) -> Result<T, Refusal> + Send>,
    metrics: Arc<Metrics>,
}

impl<T> Submitted<T> {
    /// Waits for the commit (or the refusal).
    pub async fn wait(self) -> Result<T, Refusal> {
        let result = self.answer.wait().await.and_then(self.map);
        if let Err(refusal) = &result {
            self.metrics.refused(refusal.code);
        }
        result
    }
}

fn unexpected_reply(reply: &PeerReply) -> Refusal {
    Refusal::new(
        RefusalCode::Internal,
        format!(
            "the leader answered a read with {}; this is a bug",
            reply.kind()
        ),
    )
}

fn unexpected(outcome: Outcome) -> Refusal {
    Refusal::new(
        RefusalCode::Internal,
        format!("the state machine answered {outcome:?} to another kind of command; this is a bug"),
    )
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
