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

use super::placement::{next_steps, replaced};
use super::voters_wanted;
use crate::cluster_map::{ClusterMap, MetaCommand};
use crate::engine::{Engine, MetaGroup, CATCH_UP_TIMEOUT};
use crate::raft::network::PeerReply;
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
        let mut moves: HashMap<GroupId, JoinHandle<()>> = HashMap::new();
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
        moves: &mut HashMap<GroupId, JoinHandle<()>>,
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
        moves.retain(|_, task| !task.is_finished());
        for (id, group) in map.groups() {
            if let (Some(add), Some(remove)) = (group.joining, group.removing) {
                if !moves.contains_key(id) {
                    let this = self.clone();
                    let group = *id;
                    moves.insert(
                        group,
                        tokio::spawn(async move { this.carry_out(group, add, remove).await }),
                    );
                }
            }
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
        // count, leaving and removed ones taken out.
        let active = map.active_nodes();
        let wanted = voters_wanted(active.len());
        let mut target: BTreeSet<NodeId> = voters
            .iter()
            .copied()
            .filter(|v| active.contains(v))
            .collect();
        for id in &active {
            if target.len() >= wanted {
                break;
            }
            target.insert(*id);
        }
        // Too many (nodes left): demote the highest ids, never this node (the leader).
        while target.len() > wanted {
            let Some(extra) = target.iter().rev().copied().find(|id| *id != self.node_id) else {
                break;
            };
            target.remove(&extra);
        }
        if !target.is_empty() && target != voters {
            tracing::info!(?voters, ?target, "changing the metadata group's voters");
            meta.raft
                .change_membership(ChangeMembers::ReplaceAllVoters(target), true)
                .await
                .map_err(|e| format!("cannot change the metadata voters: {e}"))?;
        }
        // Nodes no longer in the map stop following.
        let gone: BTreeSet<NodeId> = nodes
            .iter()
            .copied()
            .filter(|id| !map.nodes().contains_key(id) && !voters.contains(id))
            .collect();
        if !gone.is_empty() {
            meta.raft
                .change_membership(ChangeMembers::RemoveNodes(gone), true)
                .await
                .map_err(|e| format!("cannot remove nodes from the metadata group: {e}"))?;
        }
        Ok(())
    }

    /// Carries one move to its end (retrying while this node leads the metadata group).
    async fn carry_out(&self, group: GroupId, add: NodeId, remove: NodeId) {
        let started = Instant::now();
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
            if entry.joining != Some(add) {
                return; // done, or replaced by another plan
            }
            let Some(add_addr) = map.addr(add).map(str::to_owned) else {
                return;
            };
            let peers = self.engine.peers().clone();
            let reply = self
                .engine
                .leaders()
                .call(group, move |target, addr| {
                    let (peers, add_addr) = (peers.clone(), add_addr.clone());
                    async move {
                        peers
                            .reconfigure(
                                group,
                                target,
                                &addr,
                                (add, add_addr, remove),
                                CATCH_UP_TIMEOUT,
                            )
                            .await
                    }
                })
                .await;
            match reply {
                Ok(PeerReply::Done) => {
                    let replicas = replaced(&entry.replicas, add, remove);
                    match self
                        .propose(MetaCommand::MoveDone { group, replicas })
                        .await
                    {
                        Ok(()) => {
                            tracing::info!(
                                group,
                                from = remove,
                                to = add,
                                took_ms = started.elapsed().as_millis() as u64,
                                "moved a replica"
                            );
                            return;
                        }
                        Err(refusal) => {
                            tracing::info!(group, %refusal, "cannot record a finished move; retrying")
                        }
                    }
                }
                Ok(other) => tracing::info!(
                    group,
                    reply = other.kind(),
                    "the move was not carried out; retrying"
                ),
                Err(refusal) => {
                    tracing::info!(group, %refusal, "the group's leader cannot move the replica; retrying")
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
