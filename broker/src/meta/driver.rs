//! The metadata leader's work: bootstrap, membership of the metadata group, and moves.
//!
//! Owns: one task per node that, every [`DRIVE_INTERVAL`] and while this node leads
//! the metadata group:
//! 1. bootstraps the map of a new cluster (once: `Bootstrap` applies only to an empty
//!    map);
//! 2. makes every node of the map a member of the metadata group — a learner, or a
//!    voter while fewer than the wanted voters are active — and takes removed nodes out;
//! 3. carries each move in progress to its end: asks the group's leader to add the new
//!    replica, wait until it caught up and swap the voters (`GroupRequest::Reconfigure`,
//!    idempotent), then records `MoveDone`;
//! 4. removes leaving nodes that hold nothing any more;
//! 5. starts the next steps of the plan ([`super::placement`]), at most
//!    [`MOVES_IN_FLIGHT_MAX`] moves at once.
//!
//! Must not: act while another node leads the metadata group; assume a step it
//! proposed was applied (it reads the map again next round). Every step is idempotent,
//! so a new metadata leader picks up where the old one stopped.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_client::wire::{Refusal, RefusalCode};
use openraft::{BasicNode, ChangeMembers};
use tokio::task::JoinHandle;

use super::placement::next_steps;
use super::voters_wanted;
use crate::cluster_map::{ClusterMap, MetaCommand};
use crate::engine::moves::{caught_up_now, MEMBERSHIP_CHANGE_TIMEOUT};
use crate::engine::{Engine, MetaGroup, CATCH_UP_TIMEOUT};
use crate::raft::network::{MoveRequest, PeerReply};
use crate::raft::{GroupId, NodeId};
use crate::store::Command;

/// How often the metadata leader looks at the map.
pub const DRIVE_INTERVAL: Duration = Duration::from_millis(500);
/// Replica moves at once, at most (each copies a group's history to a new node).
pub const MOVES_IN_FLIGHT_MAX: usize = 2;
/// A map change waits this long for its commit.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts of a move that failed.
const MOVE_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// What the driver needs.
pub struct Driver {
    /// This node.
    pub node_id: NodeId,
    /// The node's engine (groups, leaders, peers, metrics).
    pub engine: Arc<Engine>,
    /// The map a new cluster starts with (empty on a joining node: it never
    /// bootstraps one).
    pub initial: ClusterMap,
}

impl Driver {
    /// Runs until the node stops.
    pub async fn run(self) {
        // Per moving group: whether the task calls the move off, and the task.
        let mut moves: HashMap<GroupId, (bool, JoinHandle<()>)> = HashMap::new();
        let mut tick = tokio::time::interval(DRIVE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let this = Arc::new(self);
        loop {
            tick.tick().await;
            let Some(meta) = this.engine.groups().meta() else {
                continue;
            };
            if !meta.is_leader(this.node_id) {
                continue;
            }
            if let Err(problem) = this.round(&meta, &mut moves).await {
                tracing::debug!(%problem, "metadata round did not finish");
            }
        }
    }

    async fn round(
        self: &Arc<Self>,
        meta: &MetaGroup,
        moves: &mut HashMap<GroupId, (bool, JoinHandle<()>)>,
    ) -> Result<(), String> {
        let map = meta.sm.map();
        if map.is_empty() {
            if self.initial.is_empty() {
                return Ok(()); // a joining node: the map comes from the cluster
            }
            tracing::info!("bootstrapping the cluster map");
            return self
                .propose(MetaCommand::Bootstrap(self.initial.image()))
                .await
                .map_err(|r| r.to_string());
        }
        self.members(meta, &map).await?;
        moves.retain(|_, (_, task)| !task.is_finished());
        for (id, group) in map.groups() {
            let (Some(add), Some(remove)) = (group.joining, group.removing) else {
                continue;
            };
            // A move onto a node that is leaving (or gone) is called off instead.
            let abort = map.nodes().get(&add).is_none_or(|n| n.leaving);
            if let Some((running_abort, task)) = moves.get(id) {
                if *running_abort == abort {
                    continue;
                }
                task.abort();
            }
            let this = self.clone();
            let group = *id;
            let task = tokio::spawn(async move { this.carry_out(group, add, remove, abort).await });
            moves.insert(group, (abort, task));
        }
        for (id, node) in map.nodes() {
            if node.leaving && map.replica_count(*id) == 0 {
                tracing::info!(node = id, "removing a drained node from the cluster");
                self.propose(MetaCommand::RemoveNode { id: *id })
                    .await
                    .map_err(|r| r.to_string())?;
            }
        }
        for step in next_steps(&map, MOVES_IN_FLIGHT_MAX) {
            tracing::info!(?step, "cluster map change");
            self.propose(step).await.map_err(|r| r.to_string())?;
        }
        Ok(())
    }

    /// Makes the metadata group's membership follow the map's nodes.
    async fn members(&self, meta: &MetaGroup, map: &ClusterMap) -> Result<(), String> {
        let (voters, nodes): (BTreeSet<NodeId>, BTreeSet<NodeId>) = {
            let metrics = meta.raft.metrics();
            let m = metrics.borrow();
            let membership = m.membership_config.membership();
            (
                membership.voter_ids().collect(),
                membership.nodes().map(|(id, _)| *id).collect(),
            )
        };
        // Every node of the map follows the metadata log.
        for (id, node) in map.nodes() {
            if !nodes.contains(id) {
                tracing::info!(
                    node = id,
                    "adding a node to the metadata group as a learner"
                );
                meta.raft
                    .add_learner(
                        *id,
                        BasicNode {
                            addr: node.addr.clone(),
                        },
                        false,
                    )
                    .await
                    .map_err(|e| format!("cannot add node {id} to the metadata group: {e}"))?;
            }
        }
        // Voters: the active ones kept, more active nodes promoted up to the wanted
        // count — only once caught up (a voter that is behind, or unreachable, would
        // make the group wait for it) — and leaving ones taken out once their
        // replacements are caught up.
        let active = map.active_nodes();
        let wanted = voters_wanted(active.len());
        let mut target: BTreeSet<NodeId> = voters
            .iter()
            .copied()
            .filter(|v| active.contains(v))
            .collect();
        let mut behind = 0;
        for id in &active {
            if target.len() >= wanted {
                break;
            }
            if target.contains(id) {
                continue;
            }
            if caught_up_now(&meta.raft, *id) {
                target.insert(*id);
            } else {
                behind += 1;
            }
        }
        if target.len() < wanted && behind > 0 {
            // Keep the leaving voters until their replacements have caught up.
            target.extend(
                voters
                    .iter()
                    .copied()
                    .filter(|v| map.nodes().contains_key(v)),
            );
        }
        // Too many (nodes left): demote the highest ids, never this node (the leader).
        while target.len() > wanted && behind == 0 {
            let Some(extra) = target.iter().rev().copied().find(|id| *id != self.node_id) else {
                break;
            };
            target.remove(&extra);
        }
        if !target.is_empty() && target != voters {
            tracing::info!(?voters, ?target, "changing the metadata group's voters");
            change(meta, ChangeMembers::ReplaceAllVoters(target)).await?;
        }
        // Nodes no longer in the map stop following.
        let gone: BTreeSet<NodeId> = nodes
            .iter()
            .copied()
            .filter(|id| !map.nodes().contains_key(id) && !voters.contains(id))
            .collect();
        if !gone.is_empty() {
            change(meta, ChangeMembers::RemoveNodes(gone)).await?;
        }
        Ok(())
    }

    /// Carries one move to its end — or calls it off (`abort`) — retrying while this
    /// node leads the metadata group and the map still has this move in flight.
    async fn carry_out(&self, group: GroupId, add: NodeId, remove: NodeId, abort: bool) {
        let started = Instant::now();
        let what = if abort { "call off" } else { "carry out" };
        loop {
            let Some(meta) = self.engine.groups().meta() else {
                return;
            };
            if !meta.is_leader(self.node_id) {
                return;
            }
            let map = meta.sm.map();
            let Some(entry) = map.group(group) else {
                return;
            };
            if entry.joining != Some(add) || entry.removing != Some(remove) {
                return; // recorded, or another move
            }
            let request = MoveRequest {
                add,
                addr: map.addr(add).unwrap_or_default().to_owned(),
                remove,
                voters: entry.replicas.clone(),
                abort,
            };
            let peers = self.engine.peers().clone();
            let reply = self
                .engine
                .leaders()
                .call(group, move |target, addr| {
                    let (peers, request) = (peers.clone(), request.clone());
                    async move {
                        peers
                            .reconfigure(group, target, &addr, request, CATCH_UP_TIMEOUT)
                            .await
                    }
                })
                .await;
            match reply {
                Ok(PeerReply::Done) => {
                    let record = if abort {
                        MetaCommand::MoveAbort { group, add, remove }
                    } else {
                        MetaCommand::MoveDone { group, add, remove }
                    };
                    match self.propose(record).await {
                        Ok(()) => {
                            tracing::info!(
                                group,
                                from = remove,
                                to = add,
                                aborted = abort,
                                took_ms = started.elapsed().as_millis() as u64,
                                "{}",
                                if abort {
                                    "called off a replica move"
                                } else {
                                    "moved a replica"
                                }
                            );
                            return;
                        }
                        Err(refusal) => {
                            tracing::info!(group, %refusal, "cannot record the move's end; retrying")
                        }
                    }
                }
                Ok(other) => tracing::info!(
                    group,
                    reply = other.kind(),
                    "cannot {what} the move yet; retrying"
                ),
                Err(refusal) => {
                    tracing::info!(group, %refusal, "the group's leader cannot {what} the move; retrying")
                }
            }
            tokio::time::sleep(MOVE_RETRY_PAUSE).await;
        }
    }

    /// Proposes one map change through the metadata pipeline and waits for its commit.
    async fn propose(&self, command: MetaCommand) -> Result<(), Refusal> {
        propose(&self.engine, command).await
    }
}

/// One change of the metadata group's membership, bounded by
/// [`MEMBERSHIP_CHANGE_TIMEOUT`] (removed voters stay learners while in the map).
async fn change(meta: &MetaGroup, members: ChangeMembers<NodeId, BasicNode>) -> Result<(), String> {
    match tokio::time::timeout(
        MEMBERSHIP_CHANGE_TIMEOUT,
        meta.raft.change_membership(members, true),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("cannot change the metadata group's members: {e}")),
        Err(_) => Err(format!(
            "the metadata membership change did not commit within {MEMBERSHIP_CHANGE_TIMEOUT:?}"
        )),
    }
}

/// Proposes one map change (from any node: the metadata pipeline forwards it to the
/// metadata leader) and waits for it to be committed and applied.
pub async fn propose(engine: &Engine, command: MetaCommand) -> Result<(), Refusal> {
    let Some(meta) = engine.groups().meta() else {
        return Err(Refusal::new(
            RefusalCode::Unavailable,
            "the metadata group is not running on this node",
        ));
    };
    let answer = meta
        .pipeline
        .submit(Command::Meta(command), Instant::now() + PROPOSE_TIMEOUT)
        .await;
    answer.wait().await.map(|_| ())
}
