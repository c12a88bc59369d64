//! What to change next so the map is drained and balanced: a pure function of the map.
//!
//! Owns: the rules. In order, each step only when the ones before have nothing to do:
//! 1. **Drain**: a replica on a leaving node moves to the active node with the fewest
//!    replicas that does not hold the group.
//! 2. **Balance replicas**: while the most loaded active node holds two or more
//!    replicas more than the least loaded one, one replica moves from the first to the
//!    second.
//! 3. **Balance preferred leaders**: while a node prefers to lead two or more groups
//!    more than another that also holds one of them, that group's replicas are
//!    reordered so the other node comes first (no data moves; the leader balancer
//!    then hands the leadership over).
//!
//! At most `moves_max` groups move at once; groups already moving count, and replica
//! balancing starts new moves only once none is in flight (loads are then exact).
//! Must not: read anything but the map; choose differently on equal input (ties break
//! by the lowest id), so every meta leader plans the same.

use std::collections::BTreeMap;

use crate::cluster_map::{ClusterMap, MetaCommand};
use crate::raft::{GroupId, NodeId};

/// The next changes to propose (moves to start, or reorderings).
pub fn next_steps(map: &ClusterMap, moves_max: usize) -> Vec<MetaCommand> {
    let moving = map.moving_count();
    let room = moves_max.saturating_sub(moving);
    let active = map.active_nodes();
    if active.is_empty() || map.is_empty() {
        return Vec::new();
    }
    let mut load: BTreeMap<NodeId, usize> =
        active.iter().map(|n| (*n, map.replica_count(*n))).collect();
    let mut steps = Vec::new();
    let mut planned: Vec<GroupId> = Vec::new();
    let is_free = |group: GroupId, planned: &[GroupId]| {
        !planned.contains(&group) && map.group(group).is_some_and(|g| g.joining.is_none())
    };

    // 1. Drain leaving nodes.
    for (id, group) in map.groups() {
        if steps.len() >= room {
            break;
        }
        if !is_free(*id, &planned) {
            continue;
        }
        let Some(leaving) = group
            .replicas
            .iter()
            .copied()
            .find(|r| map.nodes().get(r).is_some_and(|n| n.leaving))
        else {
            continue;
        };
        if let Some(add) = least_loaded(&load, |n| !group.replicas.contains(&n)) {
            steps.push(MetaCommand::MoveStart {
                group: *id,
                add,
                remove: leaving,
            });
            planned.push(*id);
            *load.entry(add).or_default() += 1;
        }
    }
    if !steps.is_empty() || moving > 0 {
        return steps;
    }

    // 2. Balance replica counts.
    while steps.len() < room {
        let (Some((&max_node, &max)), Some((&min_node, &min))) = (
            load.iter()
                .max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n))),
            load.iter().min_by_key(|(n, c)| (**c, **n)),
        ) else {
            break;
        };
        if max < min + 2 {
            break;
        }
        let candidate = map.groups().iter().find(|(id, g)| {
            is_free(**id, &planned)
                && g.replicas.contains(&max_node)
                && !g.replicas.contains(&min_node)
        });
        let Some((id, _)) = candidate else {
            break;
        };
        steps.push(MetaCommand::MoveStart {
            group: *id,
            add: min_node,
            remove: max_node,
        });
        planned.push(*id);
        *load.entry(max_node).or_default() -= 1;
        *load.entry(min_node).or_default() += 1;
    }
    if !steps.is_empty() {
        return steps;
    }

    // 3. Balance preferred leaders (one reordering per round: each changes the counts).
    let mut prefer: BTreeMap<NodeId, usize> = active.iter().map(|n| (*n, 0)).collect();
    for group in map.groups().values() {
        if let Some(first) = group.replicas.first() {
            *prefer.entry(*first).or_default() += 1;
        }
    }
    let (Some((&max_node, &max)), Some((&min_node, &min))) = (
        prefer
            .iter()
            .max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n))),
        prefer.iter().min_by_key(|(n, c)| (**c, **n)),
    ) else {
        return steps;
    };
    if max >= min + 2 {
        let candidate = map
            .groups()
            .iter()
            .find(|(_, g)| g.replicas.first() == Some(&max_node) && g.replicas.contains(&min_node));
        if let Some((id, group)) = candidate {
            let mut replicas = group.replicas.clone();
            if let Some(pos) = replicas.iter().position(|n| *n == min_node) {
                replicas.swap(0, pos);
                steps.push(MetaCommand::SetPreferred {
                    group: *id,
                    replicas,
                });
            }
        }
    }
    steps
}

/// The active node with the fewest replicas among those `allowed` (lowest id on ties).
fn least_loaded(
    load: &BTreeMap<NodeId, usize>,
    allowed: impl Fn(NodeId) -> bool,
) -> Option<NodeId> {
    load.iter()
        .filter(|(n, _)| allowed(**n))
        .min_by_key(|(n, c)| (**c, **n))
        .map(|(n, _)| *n)
}

/// The replicas of a group after its move: `add` in `remove`'s place.
pub use crate::cluster_map::replaced;

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(nodes: u64, groups: u32) -> ClusterMap {
        let members = (1..=nodes).map(|id| (id, format!("n{id}:7400"))).collect();
        ClusterMap::initial(&members, groups, 3).unwrap()
    }

    /// Applies steps (completing moves at once) until nothing is left; returns how
    /// many moves and reorderings it took.
    fn settle(map: &mut ClusterMap, moves_max: usize) -> (usize, usize) {
        let (mut moves, mut reorders) = (0, 0);
        for _ in 0..10_000 {
            let steps = next_steps(map, moves_max);
            if steps.is_empty() {
                return (moves, reorders);
            }
            for step in steps {
                match &step {
                    MetaCommand::MoveStart { group, add, remove } => {
                        let done = MetaCommand::MoveDone {
                            group: *group,
                            add: *add,
                            remove: *remove,
                        };
                        map.apply(step).unwrap();
                        map.apply(done).unwrap();
                        moves += 1;
                    }
                    _ => {
                        map.apply(step).unwrap();
                        reorders += 1;
                    }
                }
                map.validate().unwrap();
            }
        }
        panic!("the plan never settles");
    }

    fn spread(map: &ClusterMap) -> (usize, usize, usize, usize) {
        let active = map.active_nodes();
        let replicas: Vec<usize> = active.iter().map(|n| map.replica_count(*n)).collect();
        let prefer: Vec<usize> = active
            .iter()
            .map(|n| {
                map.groups()
                    .values()
                    .filter(|g| g.replicas[0] == *n)
                    .count()
            })
            .collect();
        (
            *replicas.iter().min().unwrap(),
            *replicas.iter().max().unwrap(),
            *prefer.iter().min().unwrap(),
            *prefer.iter().max().unwrap(),
        )
    }

    #[test]
    fn a_balanced_cluster_has_nothing_to_do() {
        assert!(next_steps(&cluster(3, 12), 2).is_empty());
        assert!(next_steps(&cluster(5, 32), 2).is_empty());
    }

    #[test]
    fn scale_out_from_3_to_5_nodes_balances_replicas_and_leaders() {
        let mut map = cluster(3, 12);
        for id in [4, 5] {
            map.apply(MetaCommand::AddNode {
                id,
                addr: format!("n{id}:7400"),
            })
            .unwrap();
        }
        let (moves, _) = settle(&mut map, 2);
        let (rmin, rmax, pmin, pmax) = spread(&map);
        assert!(rmax - rmin <= 1, "replicas {rmin}..{rmax}");
        assert!(
            pmax <= 12usize.div_ceil(5) + 1 && pmax - pmin <= 1,
            "preferred {pmin}..{pmax}"
        );
        // 36 replicas over 5 nodes: 7 or 8 each, so 14 or 15 moved to the new ones.
        assert!((14..=16).contains(&moves), "{moves} moves");
    }

    #[test]
    fn scale_in_drains_leaving_nodes_first() {
        let mut map = cluster(5, 32);
        map.apply(MetaCommand::Leave { id: 5 }).unwrap();
        map.apply(MetaCommand::Leave { id: 4 }).unwrap();
        let first = next_steps(&map, 2);
        assert!(
            first
                .iter()
                .all(|s| matches!(s, MetaCommand::MoveStart { remove, .. } if *remove >= 4)),
            "{first:?}"
        );
        settle(&mut map, 2);
        assert_eq!((map.replica_count(4), map.replica_count(5)), (0, 0));
        map.apply(MetaCommand::RemoveNode { id: 4 }).unwrap();
        map.apply(MetaCommand::RemoveNode { id: 5 }).unwrap();
        settle(&mut map, 2);
        let (rmin, rmax, _, pmax) = spread(&map);
        assert_eq!((rmin, rmax), (32, 32), "every group on each of 3 nodes");
        assert!(pmax <= 32usize.div_ceil(3) + 1, "preferred max {pmax}");
    }

    #[test]
    fn the_bound_on_moves_in_flight_holds() {
        let mut map = cluster(3, 12);
        map.apply(MetaCommand::AddNode {
            id: 4,
            addr: "n4:7400".into(),
        })
        .unwrap();
        let steps = next_steps(&map, 2);
        assert_eq!(steps.len(), 2, "{steps:?}");
        for step in steps {
            map.apply(step).unwrap();
        }
        assert!(next_steps(&map, 2).is_empty(), "two moves are in flight");
        // Balancing waits for the moves in flight, whatever the bound: loads are
        // counted again once they are done.
        assert!(next_steps(&map, 3).is_empty());
    }
}
