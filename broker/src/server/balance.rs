//! Leader balance: each group is led by its preferred leader — its first replica in the
//! cluster map, which spreads leaderships evenly over the nodes — whenever that node is
//! up and caught up. After a node fails, other replicas take over its groups; when it
//! returns and catches up, the leaders hand those groups back.
//!
//! Owns: one task per node that, every [`BALANCE_INTERVAL`], looks at the groups this
//! node leads but does not prefer to, and hands at most [`TRANSFERS_PER_ROUND_MAX`] of
//! them over. openraft 0.9 has no leader transfer; a handover here is: hold the group's
//! pipeline (no new local or forwarded proposals), wait until every batch already
//! proposed is in the log ([`Pipeline::settle`]) and the preferred replica has every entry,
//! ask it to start an election (`GroupRequest::Elect`), and release the hold once
//! leadership moved (or after [`HANDOVER_TIMEOUT`]). The old leader grants the vote (its
//! own lease ran out long ago, and the candidate's log is as long as its own), so the
//! candidate wins with two of three votes even while the other follower still hears
//! heartbeats.
//! Must not: start a handover to a replica more than [`HANDOVER_LAG_MAX`] entries
//! behind (catching it up could outlast the hold), ask for the election before the
//! replica has every entry (it would lose the election and bump the term for nothing),
//! or hand over more than one group per node and round
//! (balance is never worth a burst of elections).
//!
//! Writes to a group wait during its handover: ~tens of ms (the replica is caught up
//! before the election starts), at most [`HANDOVER_TIMEOUT`]. When the candidate loses
//! and this node is elected again (its term rose), the hold ends at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::NodeContext;
use crate::engine::Pipeline;
use crate::raft::{GroupId, NodeId, Raft};

/// How often a node looks for groups to hand over.
pub const BALANCE_INTERVAL: Duration = Duration::from_secs(2);
/// A node leads a group at least this long before handing it over (its own lease has
/// run out, and flapping leaderships are left to settle).
pub const LEADING_FOR_MIN: Duration = Duration::from_secs(2);
/// Handovers a node starts per round, at most.
pub const TRANSFERS_PER_ROUND_MAX: usize = 1;
/// Longest wait for a handover (catch-up plus election); then the hold ends anyway.
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(2);
/// A handover starts only when the preferred replica lags by at most this many
/// entries (batches of writes). Not zero: while writes keep coming a follower is always
/// a batch or two behind, so "fully caught up" is never seen between rounds (seen in
/// t60: under steady load a returned node never got its group back). The hold stops the
/// log, and the replica catches up exactly before the election starts. A replica that
/// lags at all must also have made progress since the previous round: a node that just
/// died keeps the progress it last had, and holding writes for it would stall the group
/// for the whole handover timeout every round (seen in t61 with the lag rule alone).
pub const HANDOVER_LAG_MAX: u64 = 64;

/// Runs the balancer of this node until the node stops.
pub async fn run(ctx: Arc<NodeContext>) {
    let me = ctx.config.cluster.node_id;
    let mut leading_since: HashMap<GroupId, Instant> = HashMap::new();
    // What each preferred replica had matched at the previous round (bounded by the
    // groups this node leads).
    let mut matched_before: HashMap<GroupId, u64> = HashMap::new();
    let mut tick = tokio::time::interval(BALANCE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if ctx.engine.groups().draining() {
            // The drain hands every leadership away; balance would fight it.
            return;
        }
        let groups = ctx.engine.groups().all();
        leading_since.retain(|id, _| groups.get(id).is_some_and(|g| g.sm.is_leader()));
        matched_before.retain(|id, _| leading_since.contains_key(id));
        let mut transfers = 0;
        for group in groups.values() {
            if !group.sm.is_leader() {
                continue;
            }
            let since = *leading_since.entry(group.id).or_insert_with(Instant::now);
            let Some(preferred) = ctx
                .engine
                .map()
                .group(group.id)
                .and_then(|g| g.replicas.first().copied())
            else {
                continue;
            };
            if preferred == me {
                continue;
            }
            let progress = Progress::of(&group.raft, preferred);
            let before = match progress {
                Some(p) => matched_before.insert(group.id, p.matched),
                None => matched_before.remove(&group.id),
            };
            let ready = progress.is_some_and(|p| {
                p.lag == 0 || (p.lag <= HANDOVER_LAG_MAX && before.is_some_and(|b| p.matched > b))
            });
            if since.elapsed() < LEADING_FOR_MIN || !ready {
                continue;
            }
            if transfers >= TRANSFERS_PER_ROUND_MAX {
                break;
            }
            transfers += 1;
            let started = Instant::now();
            match hand_over(&ctx, group.id, &group.raft, &group.pipeline, preferred).await {
                Ok(()) => tracing::info!(
                    group = group.id,
                    to = preferred,
                    took_ms = started.elapsed().as_millis() as u64,
                    "handed leadership back to the preferred leader"
                ),
                Err(problem) => tracing::info!(
                    group = group.id,
                    to = preferred,
                    %problem,
                    "leadership handover did not happen; retrying later"
                ),
            }
        }
    }
}

/// True when `node` (a voter of the group `raft` leads here) has every entry this
/// leader has.
pub(super) fn caught_up(raft: &Raft, node: NodeId) -> bool {
    Progress::of(raft, node).is_some_and(|p| p.lag == 0)
}

/// Where voter `node` stands in the log of the group `raft` leads here.
#[derive(Debug, Clone, Copy)]
struct Progress {
    /// The last index it has.
    matched: u64,
    /// How many entries of this leader's log it lacks.
    lag: u64,
}

impl Progress {
    /// `None` when `node` is no voter or its progress is unknown (this node does not
    /// lead, or nothing matched yet).
    fn of(raft: &Raft, node: NodeId) -> Option<Progress> {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        let voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == node);
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&node).copied().flatten())?
            .index;
        let last = m.last_log_index?;
        voter.then(|| Progress {
            matched,
            lag: last.saturating_sub(matched),
        })
    }
}

/// Hands the group `id` (its `raft` and write `pipeline` on this node, which leads it)
/// over to `to` (see the module documentation).
pub(super) async fn hand_over(
    ctx: &NodeContext,
    id: GroupId,
    raft: &Raft,
    pipeline: &Pipeline,
    to: NodeId,
) -> Result<(), String> {
    let me = ctx.config.cluster.node_id;
    let deadline = Instant::now() + HANDOVER_TIMEOUT;
    let term_at_start = raft.metrics().borrow().current_term;
    pipeline.hold(deadline);
    let result = async {
        // Batches already on their way into the log get there (a batch appended after
        // the candidate's vote request makes this log longer than the candidate's, and
        // the vote is refused); none are added meanwhile.
        if !pipeline.settle(deadline).await {
            return Err(format!(
                "writes proposed before the hold did not finish in {HANDOVER_TIMEOUT:?}"
            ));
        }
        // They finish replicating.
        let mut metrics = raft.metrics();
        while !caught_up(raft, to) {
            if Instant::now() >= deadline {
                return Err(format!(
                    "node {to} did not catch up in {HANDOVER_TIMEOUT:?}"
                ));
            }
            let _ = tokio::time::timeout_at(deadline.into(), metrics.changed()).await;
        }
        let addr = ctx
            .engine
            .map()
            .addr(to)
            .ok_or_else(|| format!("node {to} has no address"))?
            .to_owned();
        ctx.engine
            .peers()
            .elect(id, to, &addr)
            .await
            .map_err(|e| e.to_string())?;
        loop {
            let (leader, term) = {
                let m = metrics.borrow_and_update();
                (m.current_leader, m.current_term)
            };
            if leader.is_some_and(|l| l != me) {
                return Ok(());
            }
            // The candidate lost and this node won a later election (seen in t70: the
            // candidate's term made this leader step down, and it was elected again
            // ~200 ms later): the handover is over, so stop holding writes now instead
            // of at the deadline.
            if leader == Some(me) && term > term_at_start {
                return Err(format!(
                    "node {to} was not elected; this node leads again (term {term})"
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!("no new leader within {HANDOVER_TIMEOUT:?}"));
            }
            let _ = tokio::time::timeout_at(deadline.into(), metrics.changed()).await;
        }
    }
    .await;
    pipeline.release();
    result
}
