//! Readiness (`/readyz`), leadership, and the per-group Raft gauges.
//!
//! Owns: one watcher task per hosted group that wakes on every change of the group's
//! openraft metrics, exports them (term, leader, last log and applied index, leader
//! changes), tells the group's state machine whether this replica leads (only the
//! leader fans out), and decides whether the group is ready here; the node is ready
//! exactly while every group it hosts is.
//! Must not: change Raft state; it only observes.
//!
//! A group is ready on this node when the node knows its leader, has applied its log to
//! within [`READY_APPLY_LAG_MAX`] entries of its last entry, and — if this node is the
//! leader — has heard from a quorum within [`READY_QUORUM_ACK_MS_MAX`] (a lone node
//! restored as leader from its saved vote is not ready).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use super::NodeContext;
use crate::engine::Group;
use crate::metrics::{GroupLabel, Metrics};
use crate::raft::GroupId;

/// How long ago a leader may have last heard from a quorum and still call itself ready.
pub const READY_QUORUM_ACK_MS_MAX: u64 = 2_000;

/// How far behind its last log entry a group may apply and still count as caught up.
pub const READY_APPLY_LAG_MAX: u64 = 1000;

/// Starts a watcher per hosted group and keeps `ctx.ready` up to date; returns when
/// every watcher has ended (Raft stopped).
pub async fn watch(ctx: Arc<NodeContext>) {
    let groups = ctx.engine.groups().all();
    let states: Arc<Mutex<BTreeMap<GroupId, bool>>> =
        Arc::new(Mutex::new(groups.keys().map(|id| (*id, false)).collect()));
    let mut tasks = Vec::new();
    for group in groups.values() {
        let (ctx, group, states) = (ctx.clone(), group.clone(), states.clone());
        tasks.push(tokio::spawn(async move {
            watch_group(&ctx, &group, &states).await;
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

async fn watch_group(ctx: &NodeContext, group: &Group, states: &Mutex<BTreeMap<GroupId, bool>>) {
    let mut metrics = group.raft.metrics();
    let mut leader_seen = None;
    loop {
        let (ready, leads) = {
            let m = metrics.borrow_and_update();
            export(&ctx.metrics, group.id, &m, &mut leader_seen);
            let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
            let last = m.last_log_index.unwrap_or(0);
            let voters = m.membership_config.membership().voter_ids().count();
            let leader_confirmed = m.state != openraft::ServerState::Leader
                || voters <= 1
                || m.millis_since_quorum_ack
                    .is_some_and(|ms| ms <= READY_QUORUM_ACK_MS_MAX);
            let ready = m.current_leader.is_some()
                && leader_confirmed
                && last.saturating_sub(applied) <= READY_APPLY_LAG_MAX;
            (ready, m.state == openraft::ServerState::Leader)
        };
        // Only the leader fans out; its state machine learns it here (and marks its
        // sessions' conversations when it takes over).
        group.sm.set_leader(leads);
        let node_ready = {
            let mut states = states.lock().unwrap_or_else(PoisonError::into_inner);
            states.insert(group.id, ready);
            states.values().all(|r| *r)
        };
        if ctx.ready.swap(node_ready, Ordering::AcqRel) != node_ready {
            tracing::info!(ready = node_ready, group = group.id, "readiness changed");
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Exports one group's Raft gauges.
fn export(
    exported: &Metrics,
    group: GroupId,
    m: &openraft::RaftMetrics<crate::raft::NodeId, openraft::BasicNode>,
    leader_seen: &mut Option<Option<crate::raft::NodeId>>,
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
    exported
        .raft_applied_index
        .get_or_create(&label)
        .set(gauge(m.last_applied.map(|l| l.index)));
}
