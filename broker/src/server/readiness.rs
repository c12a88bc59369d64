//! Readiness (`/readyz`), leadership, and the per-group Raft gauges.
//!
//! Owns: one watcher task per running group (the metadata group and every data group)
//! that wakes on every change of the group's openraft metrics, exports them (term,
//! leader, last log and applied index, leader changes), tells a data group's state
//! machine whether this replica leads (only the leader fans out), and decides whether
//! the group is ready here. The node is ready exactly while the metadata group is, the
//! map is bootstrapped, and every data group it holds a replica of runs and is ready.
//! Must not: change Raft state; it only observes.
//!
//! A group is ready on this node when the node knows its leader, has applied its log to
//! within [`READY_APPLY_LAG_MAX`] entries of its last entry, and
//! * if this node is the leader: has heard from a quorum within
//!   [`READY_QUORUM_ACK_MS_MAX`] (a lone node restored as leader from its saved vote is
//!   not ready);
//! * if it is a follower or learner: has accepted an AppendEntries from the leader within
//!   [`READY_QUORUM_ACK_MS_MAX`] and applied to within [`READY_APPLY_LAG_MAX`] of the
//!   leader's commit index it carried. A restarted replica knows a leader from its saved
//!   vote and the end of its own log at once; only the leader's word says it caught up.
//!
//! The rule is checked on every change of the group's metrics and at least every
//! [`RECHECK_INTERVAL`] (contact ages without any metrics change). A replica still
//! joining (a move in progress) does not count.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use super::NodeContext;
use crate::engine::Group;
use crate::metrics::{GroupLabel, Metrics};
use crate::raft::{GroupId, NodeId, Raft, META_GROUP};

/// How long ago a leader may have last heard from a quorum and still call itself ready.
pub const READY_QUORUM_ACK_MS_MAX: u64 = 2_000;

/// How far behind its last log entry (and a follower behind its leader's commit index)
/// a group may apply and still count as caught up.
pub const READY_APPLY_LAG_MAX: u64 = 1000;

/// The readiness of a group is checked at least this often.
pub const RECHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// Which running groups are ready (the metadata group as group 0).
#[derive(Default)]
pub struct Readiness {
    groups: Mutex<BTreeMap<GroupId, bool>>,
}

impl Readiness {
    fn set(&self, group: GroupId, ready: bool) {
        self.groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(group, ready);
    }

    fn forget(&self, group: GroupId) {
        self.groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&group);
    }

    fn is_ready(&self, group: GroupId) -> bool {
        self.groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&group)
            .copied()
            .unwrap_or(false)
    }
}

/// Recomputes the node's readiness from its groups' and the map.
pub fn recompute(ctx: &NodeContext) {
    let me = ctx.config.cluster.node_id;
    let map = ctx.engine.map();
    let replicas_ready = map
        .groups()
        .iter()
        .filter(|(_, g)| g.replicas.contains(&me))
        .all(|(id, _)| ctx.readiness.is_ready(*id));
    let ready = !map.is_empty()
        && ctx.readiness.is_ready(META_GROUP)
        && replicas_ready
        && !ctx.engine.groups().draining();
    if ctx.ready.swap(ready, Ordering::AcqRel) != ready {
        tracing::info!(ready, "readiness changed");
    }
}

/// Watches the metadata group (for the node's lifetime).
pub fn track_meta(ctx: Arc<NodeContext>) {
    let Some(meta) = ctx.engine.groups().meta() else {
        return;
    };
    tokio::spawn(async move {
        watch(&ctx, META_GROUP, &meta.raft, &meta.contact, None).await;
    });
}

/// Watches a data group until it stops running.
pub fn track(ctx: Arc<NodeContext>, group: Arc<Group>) {
    tokio::spawn(async move {
        watch(&ctx, group.id, &group.raft, &group.contact, Some(&group)).await;
        ctx.readiness.forget(group.id);
        recompute(&ctx);
    });
}

async fn watch(
    ctx: &NodeContext,
    id: GroupId,
    raft: &Raft,
    contact: &crate::engine::LeaderContact,
    data: Option<&Group>,
) {
    let mut metrics = raft.metrics();
    let mut leader_seen = None;
    loop {
        let (ready, leads) = {
            let m = metrics.borrow_and_update();
            export(&ctx.metrics, id, &m, &mut leader_seen);
            let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
            let last = m.last_log_index.unwrap_or(0);
            let voters = m.membership_config.membership().voter_ids().count();
            let leads = m.state == openraft::ServerState::Leader;
            let leader_confirmed = if leads {
                voters <= 1
                    || m.millis_since_quorum_ack
                        .is_some_and(|ms| ms <= READY_QUORUM_ACK_MS_MAX)
            } else {
                contact
                    .commit_if_heard_within(READY_QUORUM_ACK_MS_MAX)
                    .is_some_and(|commit| commit.saturating_sub(applied) <= READY_APPLY_LAG_MAX)
            };
            let ready = m.current_leader.is_some()
                && leader_confirmed
                && last.saturating_sub(applied) <= READY_APPLY_LAG_MAX;
            (ready, m.state == openraft::ServerState::Leader)
        };
        if let Some(group) = data {
            // Only the leader fans out; its state machine learns it here (and marks its
            // sessions' conversations when it takes over).
            group.sm.set_leader(leads);
        }
        ctx.readiness.set(id, ready);
        recompute(ctx);
        // A change, or the recheck (a follower's contact with its leader ages silently).
        let changed = tokio::time::timeout(RECHECK_INTERVAL, metrics.changed()).await;
        if matches!(changed, Ok(Err(_))) {
            if let Some(group) = data {
                group.sm.set_leader(false);
            }
            return;
        }
    }
}

/// Exports one group's Raft gauges.
fn export(
    exported: &Metrics,
    group: GroupId,
    m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>,
    leader_seen: &mut Option<Option<NodeId>>,
) {
    let label = GroupLabel::of(group);
    let gauge = |i: Option<u64>| i64::try_from(i.unwrap_or(0)).unwrap_or(i64::MAX);
    exported
        .raft_term
        .get_or_create(&label)
        .set(gauge(Some(m.current_term)));
    exported
        .raft_leader
        .get_or_create(&label)
        .set(i64::from(m.state == openraft::ServerState::Leader));
    if *leader_seen != Some(m.current_leader) {
        if leader_seen.is_some() {
            exported.raft_leader_changes.get_or_create(&label).inc();
        }
        *leader_seen = Some(m.current_leader);
    }
    exported
        .raft_last_log_index
        .get_or_create(&label)
        .set(gauge(m.last_log_index));
    // Indexes from the first not purged through the last.
    let first = m.purged.map_or(0, |p| p.index + 1);
    let entries = m
        .last_log_index
        .map_or(0, |l| (l + 1).saturating_sub(first));
    exported
        .raft_log_entries
        .get_or_create(&label)
        .set(gauge(Some(entries)));
    exported
        .raft_applied_index
        .get_or_create(&label)
        .set(gauge(m.last_applied.map(|l| l.index)));
}
