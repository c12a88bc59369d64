//! The cluster map: the nodes, which slots each data group owns, and which nodes hold
//! each group's replicas.
//!
//! Owns: the map's data, its invariants ([`ClusterMap::validate`]) and the rules that
//! derive from it: a conversation's group (`slot_of(conv)` → the group owning that
//! slot), a node's groups, and the initial placement of a new cluster.
//! Must not: do I/O, read a clock, or know about Raft instances; the node starts and
//! stops groups to match the map, the map only says what should be.
//!
//! # Initial placement
//!
//! With nodes `n_0 < n_1 < … < n_{N-1}` (by id), `G` groups and replication factor
//! `R' = min(R, N)`, group `i + 1` (for `i` in `0..G`) owns slots
//! `[i·4096/G, (i+1)·4096/G)` and has replicas `n_i, n_{i+1}, …, n_{i+R'-1}` (indexes
//! mod N). The first replica is the group's preferred leader, so leaders start spread
//! evenly: node `n_j` prefers to lead `⌈G/N⌉` or `⌊G/N⌋` groups.

use std::collections::BTreeMap;
use std::ops::Range;

use herald_client::wire::{slot_of, SLOT_COUNT};

use crate::raft::{GroupId, NodeId, FIRST_DATA_GROUP};

/// The most data groups a cluster may have: one per slot.
pub const GROUPS_MAX: u32 = SLOT_COUNT;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    /// Its QUIC address (`host:port`), for clients and peers.
    pub addr: String,
}

/// A data group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    /// The nodes holding its replicas; the first is its preferred leader.
    pub replicas: Vec<NodeId>,
    /// The slots it owns.
    pub slots: Range<u32>,
}

/// The cluster map (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterMap {
    nodes: BTreeMap<NodeId, NodeEntry>,
    groups: BTreeMap<GroupId, GroupEntry>,
    /// The group owning each slot (`SLOT_COUNT` entries).
    by_slot: Vec<GroupId>,
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
        let copies = (replication_factor as usize).min(ids.len());
        let mut entries = BTreeMap::new();
        for i in 0..groups {
            let start = (u64::from(i) * u64::from(SLOT_COUNT) / u64::from(groups)) as u32;
            let end = (u64::from(i + 1) * u64::from(SLOT_COUNT) / u64::from(groups)) as u32;
            let replicas = (0..copies)
                .map(|k| ids[(i as usize + k) % ids.len()])
                .collect();
            entries.insert(
                FIRST_DATA_GROUP + i,
                GroupEntry {
                    replicas,
                    slots: start..end,
                },
            );
        }
        let nodes = members
            .iter()
            .map(|(id, addr)| (*id, NodeEntry { addr: addr.clone() }))
            .collect();
        Ok(ClusterMap::from_parts(nodes, entries))
    }

    /// A map of these nodes and groups (call [`ClusterMap::validate`] on anything that
    /// did not come from [`ClusterMap::initial`]).
    pub fn from_parts(
        nodes: BTreeMap<NodeId, NodeEntry>,
        groups: BTreeMap<GroupId, GroupEntry>,
    ) -> ClusterMap {
        let mut by_slot = vec![FIRST_DATA_GROUP; SLOT_COUNT as usize];
        for (id, group) in &groups {
            for slot in group.slots.clone() {
                if let Some(owner) = by_slot.get_mut(slot as usize) {
                    *owner = *id;
                }
            }
        }
        ClusterMap {
            nodes,
            groups,
            by_slot,
        }
    }

    /// The group that owns conversation `conv`.
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

    /// The groups with a replica on `node`.
    pub fn hosted_by(&self, node: NodeId) -> Vec<GroupId> {
        self.groups
            .iter()
            .filter(|(_, g)| g.replicas.contains(&node))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Checks the invariants: every slot is owned by exactly one group, every group has
    /// at least one replica, replicas are distinct nodes of the map.
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
            if *owner != Some(self.by_slot[slot]) {
                return Err(format!("the slot index disagrees for slot {slot}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: u64) -> BTreeMap<NodeId, String> {
        (1..=n)
            .map(|id| (id, format!("127.0.0.1:{}", 7400 + 10 * id)))
            .collect()
    }

    #[test]
    fn the_initial_map_spreads_replicas_and_leaders_evenly() {
        let map = ClusterMap::initial(&members(5), 32, 3).unwrap();
        map.validate().unwrap();
        assert_eq!(map.groups().len(), 32);
        let mut leads = BTreeMap::<NodeId, u32>::new();
        let mut hosts = BTreeMap::<NodeId, u32>::new();
        for group in map.groups().values() {
            assert_eq!(group.replicas.len(), 3);
            *leads.entry(group.replicas[0]).or_default() += 1;
            for node in &group.replicas {
                *hosts.entry(*node).or_default() += 1;
            }
        }
        // 32 groups on 5 nodes: 6 or 7 preferred leaderships each; 96 replicas, within
        // one of the mean of 19.2 either way.
        assert!(leads.values().all(|n| (6..=7).contains(n)), "{leads:?}");
        assert!(hosts.values().all(|n| (18..=20).contains(n)), "{hosts:?}");
        assert_eq!(map.hosted_by(1).len() as u32, hosts[&1]);
    }

    #[test]
    fn slots_cover_everything_once_and_conversations_find_their_group() {
        let map = ClusterMap::initial(&members(3), 12, 3).unwrap();
        let sizes: Vec<u32> = map
            .groups()
            .values()
            .map(|g| g.slots.len() as u32)
            .collect();
        assert_eq!(sizes.iter().sum::<u32>(), SLOT_COUNT);
        assert!(sizes.iter().all(|s| (341..=342).contains(s)), "{sizes:?}");
        for conv in [0u64, 1, 77, 123_456_789, u64::MAX] {
            let group = map.group_of(conv);
            assert!(map.group(group).unwrap().slots.contains(&slot_of(conv)));
        }
    }

    #[test]
    fn fewer_nodes_than_the_replication_factor_place_on_every_node() {
        let map = ClusterMap::initial(&members(1), 4, 3).unwrap();
        map.validate().unwrap();
        assert!(map.groups().values().all(|g| g.replicas == vec![1]));
        let map = ClusterMap::initial(&members(2), 2, 3).unwrap();
        assert_eq!(map.group(1).unwrap().replicas, vec![1, 2]);
        assert_eq!(map.group(2).unwrap().replicas, vec![2, 1]);
    }

    #[test]
    fn impossible_maps_are_refused() {
        assert_eq!(
            ClusterMap::initial(&BTreeMap::new(), 1, 3),
            Err(MapError::NoMembers)
        );
        assert_eq!(
            ClusterMap::initial(&members(3), 0, 3),
            Err(MapError::GroupCount { groups: 0 })
        );
        assert_eq!(
            ClusterMap::initial(&members(3), GROUPS_MAX + 1, 3),
            Err(MapError::GroupCount {
                groups: GROUPS_MAX + 1
            })
        );
        assert_eq!(
            ClusterMap::initial(&members(3), 4, 0),
            Err(MapError::NoReplicas)
        );
        let mut groups = ClusterMap::initial(&members(3), 2, 3)
            .unwrap()
            .groups()
            .clone();
        groups.get_mut(&2).unwrap().slots = 0..10;
        let broken = ClusterMap::from_parts(
            ClusterMap::initial(&members(3), 2, 3)
                .unwrap()
                .nodes()
                .clone(),
            groups,
        );
        assert!(broken.validate().unwrap_err().contains("owned by groups"));
    }
}
