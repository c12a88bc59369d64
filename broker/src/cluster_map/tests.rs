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
    // 32 groups on 5 nodes: 6 or 7 preferred leaderships each; 96 replicas, 19 or 20
    // each.
    assert!(leads.values().all(|n| (6..=7).contains(n)), "{leads:?}");
    assert!(hosts.values().all(|n| (19..=20).contains(n)), "{hosts:?}");
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
    let initial = ClusterMap::initial(&members(3), 2, 3).unwrap();
    let mut groups = initial.groups().clone();
    groups.get_mut(&2).unwrap().slots = 0..10;
    let broken = ClusterMap::from_parts(initial.nodes().clone(), groups);
    assert!(broken.validate().unwrap_err().contains("owned by groups"));
}

#[test]
fn bootstrap_applies_once_and_images_round_trip() {
    let initial = ClusterMap::initial(&members(3), 6, 3).unwrap();
    let mut map = ClusterMap::default();
    assert!(map.is_empty());
    map.apply(MetaCommand::Bootstrap(initial.image())).unwrap();
    assert_eq!(map.groups(), initial.groups());
    assert_eq!(map.version(), 1);
    // A second bootstrap changes nothing.
    let other = ClusterMap::initial(&members(2), 2, 1).unwrap();
    map.apply(MetaCommand::Bootstrap(other.image())).unwrap();
    assert_eq!(map.groups(), initial.groups());
    let back = ClusterMap::from_image(map.image()).unwrap();
    assert_eq!(back, map);
}

#[test]
fn a_move_joins_then_replaces_one_replica_in_place() {
    let mut map = ClusterMap::initial(&members(3), 3, 3).unwrap();
    map.apply(MetaCommand::AddNode {
        id: 4,
        addr: "127.0.0.1:7440".into(),
    })
    .unwrap();
    // Re-adding the same node is harmless; another address is refused.
    map.apply(MetaCommand::AddNode {
        id: 4,
        addr: "127.0.0.1:7440".into(),
    })
    .unwrap();
    assert!(map
        .apply(MetaCommand::AddNode {
            id: 4,
            addr: "elsewhere:1".into()
        })
        .is_err());
    let before = map.group(1).unwrap().replicas.clone();
    assert_eq!(before, vec![1, 2, 3]);
    map.apply(MetaCommand::MoveStart {
        group: 1,
        add: 4,
        remove: 1,
    })
    .unwrap();
    assert_eq!(map.group(1).unwrap().joining, Some(4));
    assert!(
        map.hosted_by(4).contains(&1),
        "a joining node runs the group"
    );
    map.validate().unwrap();
    // One move per group at a time.
    assert!(map
        .apply(MetaCommand::MoveStart {
            group: 1,
            add: 4,
            remove: 2
        })
        .is_err());
    // Ending another move than the one in flight is refused.
    assert!(map
        .apply(MetaCommand::MoveDone {
            group: 1,
            add: 4,
            remove: 2
        })
        .is_err());
    map.apply(MetaCommand::MoveDone {
        group: 1,
        add: 4,
        remove: 1,
    })
    .unwrap();
    // A late repeat is refused too: it must not end a later move.
    assert!(map
        .apply(MetaCommand::MoveDone {
            group: 1,
            add: 4,
            remove: 1
        })
        .is_err());
    let group = map.group(1).unwrap();
    assert_eq!(
        (group.replicas.clone(), group.joining, group.generation),
        (vec![4, 2, 3], None, 1)
    );
    assert!(!map.hosted_by(1).contains(&1));
    map.validate().unwrap();
}

#[test]
fn a_node_leaves_only_when_drained_and_never_below_the_replication_factor() {
    let mut map = ClusterMap::initial(&members(3), 3, 3).unwrap();
    assert!(
        map.apply(MetaCommand::Leave { id: 3 }).is_err(),
        "3 nodes, RF 3"
    );
    map.apply(MetaCommand::AddNode {
        id: 4,
        addr: "127.0.0.1:7440".into(),
    })
    .unwrap();
    map.apply(MetaCommand::Leave { id: 3 }).unwrap();
    assert!(map.nodes()[&3].leaving);
    assert!(
        map.apply(MetaCommand::RemoveNode { id: 3 }).is_err(),
        "still holds replicas"
    );
    assert!(
        map.apply(MetaCommand::MoveStart {
            group: 1,
            add: 3,
            remove: 1
        })
        .is_err(),
        "a leaving node gets no replica"
    );
    for group in map.hosted_by(3) {
        map.apply(MetaCommand::MoveStart {
            group,
            add: 4,
            remove: 3,
        })
        .unwrap();
        map.apply(MetaCommand::MoveDone {
            group,
            add: 4,
            remove: 3,
        })
        .unwrap();
    }
    map.apply(MetaCommand::RemoveNode { id: 3 }).unwrap();
    assert!(!map.nodes().contains_key(&3));
    map.validate().unwrap();
}

#[test]
fn preferred_leaders_are_reordered_not_changed() {
    let mut map = ClusterMap::initial(&members(3), 3, 3).unwrap();
    map.apply(MetaCommand::SetPreferred {
        group: 1,
        replicas: vec![3, 1, 2],
    })
    .unwrap();
    assert_eq!(map.group(1).unwrap().replicas, vec![3, 1, 2]);
    assert!(map
        .apply(MetaCommand::SetPreferred {
            group: 1,
            replicas: vec![4, 1, 2]
        })
        .is_err());
}

#[test]
fn an_aborted_move_keeps_the_old_replicas_and_frees_the_group() {
    let mut map = ClusterMap::initial(&members(3), 3, 3).unwrap();
    map.apply(MetaCommand::AddNode {
        id: 4,
        addr: "127.0.0.1:7440".into(),
    })
    .unwrap();
    let start = MetaCommand::MoveStart {
        group: 2,
        add: 4,
        remove: 3,
    };
    map.apply(start.clone()).unwrap();
    let abort = MetaCommand::MoveAbort {
        group: 2,
        add: 4,
        remove: 3,
    };
    map.apply(abort.clone()).unwrap();
    let group = map.group(2).unwrap();
    assert_eq!((group.joining, group.removing), (None, None));
    assert!(group.replicas.contains(&3) && !group.replicas.contains(&4));
    assert!(
        !map.hosted_by(4).contains(&2),
        "the aborted node runs nothing"
    );
    // A repeated abort, or a late MoveDone of the aborted move, is refused.
    assert!(map.apply(abort).is_err());
    assert!(map
        .apply(MetaCommand::MoveDone {
            group: 2,
            add: 4,
            remove: 3
        })
        .is_err());
    // The group may move again.
    map.apply(start).unwrap();
    map.validate().unwrap();
}
