//! The metadata group: group 0, a Raft group of its own (up to [`META_VOTERS_MAX`]
//! voters; every other node follows it as a learner) whose state is the cluster map.
//!
//! Owns: the map's state machine ([`state_machine`]), the plan of what to move next
//! ([`placement`]), and the work only the metadata leader does ([`driver`]): bootstrap
//! the map of a new cluster, make every node of the map a member of the metadata group,
//! and carry out the plan (moves of data-group replicas, preferred-leader reorderings).
//! Must not: serve conversations; let two leaders both drive (only the current
//! metadata leader acts, and every step is idempotent, so a new leader resumes).

pub mod driver;
pub mod placement;
pub mod state_machine;

/// Voters of the metadata group, at most; every other node is a learner.
pub const META_VOTERS_MAX: usize = 5;

/// How many voters the metadata group has with `active` nodes (not leaving): an odd
/// number, so no vote splits evenly — 5 from five nodes on, 3 from three, else all
/// (one or two). Every node computes the same from the same map.
pub fn voters_wanted(active: usize) -> usize {
    match active {
        5.. => META_VOTERS_MAX,
        3..=4 => 3,
        n => n.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voters_are_odd_and_at_most_five() {
        let wanted: Vec<usize> = (0..=9).map(voters_wanted).collect();
        assert_eq!(wanted, [1, 1, 2, 3, 3, 5, 5, 5, 5, 5]);
    }
}
