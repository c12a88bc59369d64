//! The cluster map: the nodes, which slots each data group owns, and which nodes hold
//! each group's replicas. It is the state of the metadata group (group 0): every node
//! applies the same [`MetaCommand`]s to it, in log order.
//!
//! Owns: the map's data, its invariants ([`ClusterMap::validate`]), the deterministic
//! changes ([`ClusterMap::apply`]), and the rules that derive from it: a conversation's
//! group (`slot_of(conv)` → the group owning that slot), a node's groups, and the
//! initial placement of a new cluster.
//! Must not: do I/O, read a clock, or know about Raft instances; the node starts and
//! stops groups to match the map, the map only says what should be.
//!
//! # Initial placement
//!
//! With nodes `n_0 < n_1 < … < n_{N-1}` (by id), `G` groups and replication factor
//! `R' = min(R, N)`, group `i + 1` (for `i` in `0..G`) owns slots
//! `[i·4096/G, (i+1)·4096/G)`. Its first replica — its preferred leader — is
//! `n_{i mod N}`, so node `n_j` prefers to lead `⌈G/N⌉` or `⌊G/N⌋` groups; its other
//! `R' − 1` replicas are the nodes with the fewest replicas so far (the nearest after
//! `n_{i mod N}` on ties), so replica counts differ by at most one.
//!
//! # Moving a replica
//!
//! `MoveStart { group, add, remove }` marks `add` as joining: that node starts the
//! group with an empty log and the group's leader adds it as a learner, waits until it
//! has caught up, and changes the voters from the old set to the new one.
//! `MoveDone { group, add, remove }` then records the new set (`add` in `remove`'s
//! place, so a preferred leader's groups stay its own) and `remove` stops hosting the
//! group. `MoveAbort { group, add, remove }` ends a move whose new node is leaving
//! (the group's leader first restored the old voters). Both name the move they end
//! and are refused for any other, so a late or repeated one never ends a later move.
//! One move per group at a time.

use std::collections::BTreeMap;
use std::ops::Range;

use herald_client::wire::{slot_of, Refusal, RefusalCode, SLOT_COUNT};
use rkyv::{Archive, Deserialize, Serialize};

use crate::raft::{GroupId, NodeId, FIRST_DATA_GROUP};

/// The most data groups a cluster may have: one per slot.
pub const GROUPS_MAX: u32 = SLOT_COUNT;

/// The most nodes a map holds.
pub const NODES_MAX: usize = 4096;

/// The node's current view of the map, swapped whole on every change (readers load it
/// without a lock).
pub type SharedMap = std::sync::Arc<arc_swap::ArcSwap<ClusterMap>>;

/// Why a map cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    /// No node to place anything on.
    #[error("the cluster has no members")]
    NoMembers,
    /// A group count of 0 or above one group per slot.
    #[error(
        "{groups} groups: a cluster has between 1 and {GROUPS_MAX} data groups (cluster.groups)"
    )]
    GroupCount {
        /// The count asked for.
        groups: u32,
    },
    /// A replication factor of 0.
    #[error("a replication factor of 0 keeps no copy; use 1 or more (cluster.replication_factor)")]
    NoReplicas,
}

/// A node of the cluster.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    /// Its QUIC address (`host:port`), for clients and peers.
    pub addr: String,
    /// It is being drained: its replicas move elsewhere, then it is removed.
    pub leaving: bool,
}

/// A data group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    /// The nodes holding its replicas; the first is its preferred leader.
    pub replicas: Vec<NodeId>,
    /// The slots it owns.
    pub slots: Range<u32>,
    /// A node being added to the group (a move in progress), if any.
    pub joining: Option<NodeId>,
    /// The replica a move in progress takes out, if any.
    pub removing: Option<NodeId>,
    /// Moves ended so far (done or called off). 0: the group still has the replicas it was created
    /// with, and only then may its first replica initialize it (a replica added later
    /// always joins through the leader).
    pub generation: u64,
}

impl GroupEntry {
    /// Clears the move in flight (done or called off): a new generation.
    fn end_move(&mut self) {
        self.joining = None;
        self.removing = None;
        self.generation += 1;
    }
}

/// A change to the map, in the metadata group's log.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum MetaCommand {
    /// The initial map of a new cluster; applied only to an empty map.
    Bootstrap(MapImage),
    /// A node joins the cluster (idempotent).
    AddNode {
        /// Its id.
        id: NodeId,
        /// Its QUIC address.
        addr: String,
    },
    /// A node is to be drained and removed.
    Leave {
        /// The node.
        id: NodeId,
    },
    /// A node holding no replica any more leaves the map.
    RemoveNode {
        /// The node.
        id: NodeId,
    },
    /// A move of one replica of `group` from `remove` to `add` begins.
    MoveStart {
        /// The group.
        group: GroupId,
        /// The node that gets a replica.
        add: NodeId,
        /// The node that loses one.
        remove: NodeId,
    },
    /// The move of `group` from `remove` to `add` is done: `add` is a voter in
    /// `remove`'s place.
    MoveDone {
        /// The group.
        group: GroupId,
        /// The node that got the replica.
        add: NodeId,
        /// The node that lost it.
        remove: NodeId,
    },
    /// The move of `group` from `remove` to `add` is called off (the group's voters
    /// are the old ones again).
    MoveAbort {
        /// The group.
        group: GroupId,
        /// The node that was to get the replica.
        add: NodeId,
        /// The node that keeps it.
        remove: NodeId,
    },
    /// Reorders a group's replicas (the first is its preferred leader).
    SetPreferred {
        /// The group.
        group: GroupId,
        /// The same replicas, in the new order.
        replicas: Vec<NodeId>,
    },
}

/// `replicas` with `add` in `remove`'s place (same position: a preferred leader stays
/// first).
pub fn replaced(replicas: &[NodeId], add: NodeId, remove: NodeId) -> Vec<NodeId> {
    replicas
        .iter()
        .map(|n| if *n == remove { add } else { *n })
        .collect()
}

/// The map as stored (snapshots) and sent (bootstrap).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct MapImage {
    /// `(id, node)` per node.
    pub nodes: Vec<(NodeId, NodeEntry)>,
    /// Per group.
    pub groups: Vec<GroupImage>,
    /// Replicas per group.
    pub replication_factor: u32,
    /// Changes applied so far.
    pub version: u64,
}

/// One group of a [`MapImage`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GroupImage {
    /// Its id.
    pub id: GroupId,
    /// Its replicas.
    pub replicas: Vec<NodeId>,
    /// First slot.
    pub slot_start: u32,
    /// One past the last slot.
    pub slot_end: u32,
    /// A node being added, if any.
    pub joining: Option<NodeId>,
    /// A replica being taken out, if any.
    pub removing: Option<NodeId>,
    /// Moves completed.
    pub generation: u64,
}

/// The cluster map (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterMap {
    nodes: BTreeMap<NodeId, NodeEntry>,
    groups: BTreeMap<GroupId, GroupEntry>,
    /// The group owning each slot (`SLOT_COUNT` entries; empty before bootstrap).
    by_slot: Vec<GroupId>,
    replication_factor: u32,
    /// Changes applied so far (bumped by every command that changed something).
    version: u64,
}

impl ClusterMap {
    /// The map of a new cluster (see the module documentation).
    pub fn initial(
        members: &BTreeMap<NodeId, String>,
        groups: u32,
        replication_factor: u32,
    ) -> Result<ClusterMap, MapError> {
        if members.is_empty() {
            return Err(MapError::NoMembers);
        }
        if groups == 0 || groups > GROUPS_MAX {
            return Err(MapError::GroupCount { groups });
        }
        if replication_factor == 0 {
            return Err(MapError::NoReplicas);
        }
        let ids: Vec<NodeId> = members.keys().copied().collect();
        let n = ids.len();
        let copies = (replication_factor as usize).min(n);
        let mut load = vec![0usize; n];
        let mut entries = BTreeMap::new();
        for i in 0..groups {
            let start = (u64::from(i) * u64::from(SLOT_COUNT) / u64::from(groups)) as u32;
            let end = (u64::from(i + 1) * u64::from(SLOT_COUNT) / u64::from(groups)) as u32;
            // The preferred leader goes round the ring; the other replicas go to the
            // least loaded nodes (nearest after it on ties), so replica counts differ
            // by at most one.
            let first = i as usize % n;
            let mut others: Vec<usize> = (1..n).map(|d| (first + d) % n).collect();
            others.sort_by_key(|k| (load[*k], (*k + n - first) % n));
            let mut chosen = vec![first];
            chosen.extend(others.into_iter().take(copies - 1));
            for k in &chosen {
                load[*k] += 1;
            }
            let replicas = chosen.into_iter().map(|k| ids[k]).collect();
            entries.insert(
                FIRST_DATA_GROUP + i,
                GroupEntry {
                    replicas,
                    slots: start..end,
                    joining: None,
                    removing: None,
                    generation: 0,
                },
            );
        }
        let nodes = members
            .iter()
            .map(|(id, addr)| {
                (
                    *id,
                    NodeEntry {
                        addr: addr.clone(),
                        leaving: false,
                    },
                )
            })
            .collect();
        let mut map = ClusterMap::from_parts(nodes, entries);
        map.replication_factor = replication_factor;
        Ok(map)
    }

    /// A map of these nodes and groups (call [`ClusterMap::validate`] on anything that
    /// did not come from [`ClusterMap::initial`]).
    pub fn from_parts(
        nodes: BTreeMap<NodeId, NodeEntry>,
        groups: BTreeMap<GroupId, GroupEntry>,
    ) -> ClusterMap {
        let mut map = ClusterMap {
            nodes,
            groups,
            by_slot: Vec::new(),
            replication_factor: 3,
            version: 0,
        };
        map.index();
        map
    }

    fn index(&mut self) {
        if self.groups.is_empty() {
            self.by_slot = Vec::new();
            return;
        }
        let mut by_slot = vec![FIRST_DATA_GROUP; SLOT_COUNT as usize];
        for (id, group) in &self.groups {
            // Bounded by the slot count whatever the ranges say (validated separately).
            let end = group.slots.end.min(SLOT_COUNT);
            for slot in group.slots.start.min(end)..end {
                if let Some(owner) = by_slot.get_mut(slot as usize) {
                    *owner = *id;
                }
            }
        }
        self.by_slot = by_slot;
    }

    /// True before the cluster was bootstrapped (no group yet).
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Changes applied so far.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Replicas per group.
    pub fn replication_factor(&self) -> u32 {
        self.replication_factor
    }

    /// The group that owns conversation `conv` (group 1 before bootstrap).
    pub fn group_of(&self, conv: u64) -> GroupId {
        self.by_slot
            .get(slot_of(conv) as usize)
            .copied()
            .unwrap_or(FIRST_DATA_GROUP)
    }

    /// A group's entry.
    pub fn group(&self, id: GroupId) -> Option<&GroupEntry> {
        self.groups.get(&id)
    }

    /// Every data group, by id.
    pub fn groups(&self) -> &BTreeMap<GroupId, GroupEntry> {
        &self.groups
    }

    /// Every node, by id.
    pub fn nodes(&self) -> &BTreeMap<NodeId, NodeEntry> {
        &self.nodes
    }

    /// A node's QUIC address.
    pub fn addr(&self, node: NodeId) -> Option<&str> {
        self.nodes.get(&node).map(|n| n.addr.as_str())
    }

    /// The groups `node` must run: those it holds a replica of or is joining.
    pub fn hosted_by(&self, node: NodeId) -> Vec<GroupId> {
        self.groups
            .iter()
            .filter(|(_, g)| g.replicas.contains(&node) || g.joining == Some(node))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The nodes that are not leaving, by id.
    pub fn active_nodes(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| !n.leaving)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Groups with a replica move in flight.
    pub fn moving_count(&self) -> usize {
        self.groups.values().filter(|g| g.joining.is_some()).count()
    }

    /// Replicas on `node` (joining ones included).
    pub fn replica_count(&self, node: NodeId) -> usize {
        self.hosted_by(node).len()
    }

    /// `group`'s entry if it is moving a replica from `remove` to `add`; refused
    /// otherwise (a late or repeated end of an earlier move).
    fn move_in_flight(
        &mut self,
        group: GroupId,
        add: NodeId,
        remove: NodeId,
    ) -> Result<&mut GroupEntry, Refusal> {
        let refuse = |why: String| Refusal::new(RefusalCode::InvalidRequest, why);
        let entry = self
            .groups
            .get_mut(&group)
            .ok_or_else(|| refuse(format!("group {group} does not exist")))?;
        if entry.joining != Some(add) || entry.removing != Some(remove) {
            return Err(refuse(format!(
                "group {group} is not moving a replica from node {remove} to node {add}"
            )));
        }
        Ok(entry)
    }

    /// Applies one change (the metadata group's state machine). Deterministic; a
    /// refused command changes nothing.
    pub fn apply(&mut self, command: MetaCommand) -> Result<(), Refusal> {
        let refuse = |why: String| Err(Refusal::new(RefusalCode::InvalidRequest, why));
        match command {
            MetaCommand::Bootstrap(image) => {
                if !self.is_empty() {
                    return Ok(()); // a second bootstrap of a running cluster: nothing to do
                }
                let map = ClusterMap::from_image(image).map_err(|e| {
                    Refusal::new(RefusalCode::InvalidRequest, format!("bad initial map: {e}"))
                })?;
                *self = map;
            }
            MetaCommand::AddNode { id, addr } => {
                if let Some(node) = self.nodes.get(&id) {
                    if node.addr == addr {
                        return Ok(());
                    }
                    return refuse(format!(
                        "node {id} is already in the cluster at {}; remove it first to change its address",
                        node.addr
                    ));
                }
                if self.nodes.len() >= NODES_MAX {
                    return refuse(format!(
                        "the cluster has {NODES_MAX} nodes, the most it may have"
                    ));
                }
                self.nodes.insert(
                    id,
                    NodeEntry {
                        addr,
                        leaving: false,
                    },
                );
            }
            MetaCommand::Leave { id } => {
                let Some(node) = self.nodes.get(&id) else {
                    return refuse(format!("node {id} is not in the cluster"));
                };
                if node.leaving {
                    return Ok(());
                }
                let active = self.nodes.values().filter(|n| !n.leaving).count();
                if active <= self.replication_factor.max(1) as usize {
                    return refuse(format!(
                        "removing node {id} would leave fewer nodes than the replication factor {}",
                        self.replication_factor
                    ));
                }
                if let Some(node) = self.nodes.get_mut(&id) {
                    node.leaving = true;
                }
            }
            MetaCommand::RemoveNode { id } => {
                if !self.nodes.contains_key(&id) {
                    return Ok(());
                }
                if let Some(group) = self.hosted_by(id).first() {
                    return refuse(format!(
                        "node {id} still holds a replica of group {group}; drain it first"
                    ));
                }
                self.nodes.remove(&id);
            }
            MetaCommand::MoveStart { group, add, remove } => {
                let Some(entry) = self.groups.get(&group) else {
                    return refuse(format!("group {group} does not exist"));
                };
                if entry.joining.is_some() {
                    if entry.joining == Some(add) && entry.removing == Some(remove) {
                        return Ok(());
                    }
                    return refuse(format!("group {group} is already moving a replica"));
                }
                if self.nodes.get(&add).is_none_or(|n| n.leaving) {
                    return refuse(format!("node {add} is not an active node of the cluster"));
                }
                if entry.replicas.contains(&add) || !entry.replicas.contains(&remove) {
                    return refuse(format!(
                        "group {group} (replicas {:?}) cannot move a replica from node {remove} to node {add}",
                        entry.replicas
                    ));
                }
                if let Some(entry) = self.groups.get_mut(&group) {
                    entry.joining = Some(add);
                    entry.removing = Some(remove);
                }
            }
            MetaCommand::MoveDone { group, add, remove } => {
                let entry = self.move_in_flight(group, add, remove)?;
                entry.replicas = replaced(&entry.replicas, add, remove);
                entry.end_move();
            }
            MetaCommand::MoveAbort { group, add, remove } => {
                self.move_in_flight(group, add, remove)?.end_move();
            }
            MetaCommand::SetPreferred { group, replicas } => {
                let Some(entry) = self.groups.get_mut(&group) else {
                    return refuse(format!("group {group} does not exist"));
                };
                let mut a = entry.replicas.clone();
                let mut b = replicas.clone();
                a.sort_unstable();
                b.sort_unstable();
                if a != b {
                    return refuse(format!(
                        "group {group} has replicas {:?}; {replicas:?} is not a reordering",
                        entry.replicas
                    ));
                }
                if entry.replicas == replicas {
                    return Ok(());
                }
                entry.replicas = replicas;
            }
        }
        self.version += 1;
        Ok(())
    }

    /// The map as stored in a snapshot.
    pub fn image(&self) -> MapImage {
        MapImage {
            nodes: self.nodes.iter().map(|(id, n)| (*id, n.clone())).collect(),
            groups: self
                .groups
                .iter()
                .map(|(id, g)| GroupImage {
                    id: *id,
                    replicas: g.replicas.clone(),
                    slot_start: g.slots.start,
                    slot_end: g.slots.end,
                    joining: g.joining,
                    removing: g.removing,
                    generation: g.generation,
                })
                .collect(),
            replication_factor: self.replication_factor,
            version: self.version,
        }
    }

    /// The map a snapshot stored, checked.
    pub fn from_image(image: MapImage) -> Result<ClusterMap, String> {
        let nodes = image.nodes.into_iter().collect();
        let groups = image
            .groups
            .into_iter()
            .map(|g| {
                (
                    g.id,
                    GroupEntry {
                        replicas: g.replicas,
                        slots: g.slot_start..g.slot_end,
                        joining: g.joining,
                        removing: g.removing,
                        generation: g.generation,
                    },
                )
            })
            .collect();
        let mut map = ClusterMap::from_parts(nodes, groups);
        map.replication_factor = image.replication_factor;
        map.version = image.version;
        if !map.is_empty() {
            map.validate()?;
        }
        Ok(map)
    }

    /// Checks the invariants: every slot is owned by exactly one group, every group has
    /// at least one replica, replicas are distinct nodes of the map, a joining node is
    /// a node of the map outside the replicas.
    pub fn validate(&self) -> Result<(), String> {
        let mut owner: Vec<Option<GroupId>> = vec![None; SLOT_COUNT as usize];
        for (id, group) in &self.groups {
            if *id < FIRST_DATA_GROUP {
                return Err(format!("group {id} is not a data group id"));
            }
            if group.replicas.is_empty() {
                return Err(format!("group {id} has no replica"));
            }
            for (k, node) in group.replicas.iter().enumerate() {
                if !self.nodes.contains_key(node) {
                    return Err(format!("group {id} has a replica on unknown node {node}"));
                }
                if group.replicas[..k].contains(node) {
                    return Err(format!("group {id} lists node {node} twice"));
                }
            }
            if let Some(joining) = group.joining {
                if !self.nodes.contains_key(&joining) || group.replicas.contains(&joining) {
                    return Err(format!(
                        "group {id} is joining node {joining}, which it cannot"
                    ));
                }
            }
            if group.slots.end > SLOT_COUNT || group.slots.is_empty() {
                return Err(format!("group {id} owns slots {:?}", group.slots));
            }
            for slot in group.slots.clone() {
                if let Some(other) = owner[slot as usize].replace(*id) {
                    return Err(format!("slot {slot} is owned by groups {other} and {id}"));
                }
            }
        }
        if let Some(slot) = owner.iter().position(Option::is_none) {
            return Err(format!("slot {slot} is owned by no group"));
        }
        for (slot, owner) in owner.iter().enumerate() {
            if *owner != self.by_slot.get(slot).copied() {
                return Err(format!("the slot index disagrees for slot {slot}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
