//! Graceful drain: how a node leaves on purpose (SIGTERM, `herald drain`, a
//! Kubernetes `preStop` hook) without costing its clients more than a reconnect.
//!
//! Owns: the one drain a node does in its life, in this order:
//! 1. **Stop taking sessions**: new handshakes are refused with `Unavailable`
//!    ("draining; connect to another node"), `/readyz` answers 503, and the node's
//!    groups refuse peers' `Elect` (the node must not win leaderships back).
//! 2. **Hand leaderships away**: every group this node leads (the metadata group too)
//!    is handed to a caught-up replica with the leader balancer's handover (hold the
//!    group's writes, wait until the replica has every entry, ask it to stand), all
//!    groups at once, in rounds until none is led here or [`HANDOVER_PHASE_MAX`] ends.
//! 3. **Move sessions**: every open session gets a [`MoveNotice`] with the
//!    configured spread (`drain.sessions_spread`); each client reconnects elsewhere at
//!    a random moment inside it and resubscribes from its cursors. The node keeps
//!    serving a session until it goes.
//! 4. **Wait** until no session is left or `drain.timeout` ends; the caller then stops
//!    the node, closing whatever is left (those clients reconnect on their own).
//!
//! Must not: lose or reorder anything: writes held during a handover go to the new
//! leader when released (the pipeline forwards them); a moving session resumes from
//! its cursors, so it sees neither a gap nor a duplicate. A drain is one-way: the node
//! stays draining until it stops.
//!
//! A node alone in its cluster (`herald dev`) skips phases 2 and 3: there is nowhere
//! to hand over or move to.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_client::wire::MoveNotice;
use serde::Serialize;

use super::NodeContext;
use crate::engine::Pipeline;
use crate::raft::{GroupId, NodeId, Raft, META_GROUP};

/// Phase 2 (handing leaderships away) takes at most this long, whatever the drain
/// timeout: a group whose replicas cannot take over by then elects a leader after
/// the node stops (one election timeout).
pub const HANDOVER_PHASE_MAX: Duration = Duration::from_secs(10);
/// How often phase 4 looks whether the sessions have gone.
const SESSIONS_POLL: Duration = Duration::from_millis(50);
/// Time kept at the end of `drain.timeout` for the caller to stop the node.
const STOP_MARGIN: Duration = Duration::from_millis(500);

/// What a drain did (`POST /drain` answers it as JSON; the node logs it).
#[derive(Debug, Clone, Serialize)]
pub struct DrainReport {
    /// This node.
    pub node_id: NodeId,
    /// Groups whose leadership this node handed to another replica.
    pub handed_over: Vec<GroupId>,
    /// Groups this node still led when the handover phase ended (they elect a leader
    /// once the node stops).
    pub still_leading: Vec<GroupId>,
    /// Sessions asked to move.
    pub sessions_asked: usize,
    /// Sessions still open when the drain ended (closed when the node stops).
    pub sessions_left: usize,
    /// How long the drain took, milliseconds.
    pub took_ms: u64,
}

/// Drains the node (see the module documentation), or waits for the drain already
/// under way; every caller gets the same report.
pub async fn drain(ctx: &Arc<NodeContext>) -> DrainReport {
    ctx.drain.get_or_init(|| run(ctx.clone())).await.clone()
}

/// The notice sent to sessions: move within the configured spread.
pub(crate) fn notice(ctx: &NodeContext) -> MoveNotice {
    MoveNotice {
        within_ms: u32::try_from(ctx.config.drain.sessions_spread.as_millis()).unwrap_or(u32::MAX),
        detail: format!(
            "node {} is draining (shutting down); reconnect to another node",
            ctx.config.cluster.node_id
        ),
    }
}

async fn run(ctx: Arc<NodeContext>) -> DrainReport {
    let started = Instant::now();
    let me = ctx.config.cluster.node_id;
    let deadline = started + ctx.config.drain.timeout.saturating_sub(STOP_MARGIN);
    ctx.engine.groups().start_draining();
    ctx.metrics.draining.set(1);
    super::readiness::recompute(&ctx);
    let others = ctx.engine.map().active_nodes().into_iter().any(|n| n != me);
    tracing::info!(
        node_id = me,
        sessions = ctx.sessions.len(),
        timeout = ?ctx.config.drain.timeout,
        "draining: refusing new sessions, handing leaderships away, moving sessions"
    );

    let (handed_over, still_leading) = if others {
        let phase_end = deadline.min(started + HANDOVER_PHASE_MAX);
        hand_over_all(&ctx, phase_end).await
    } else {
        (Vec::new(), Vec::new())
    };

    let sessions_asked = if others {
        ctx.sessions.move_all(&notice(&ctx))
    } else {
        0
    };
    while others && !ctx.sessions.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(SESSIONS_POLL.min(deadline.saturating_duration_since(Instant::now())))
            .await;
    }
    let report = DrainReport {
        node_id: me,
        handed_over,
        still_leading,
        sessions_asked,
        sessions_left: ctx.sessions.len(),
        took_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    tracing::info!(
        handed_over = report.handed_over.len(),
        still_leading = ?report.still_leading,
        sessions_asked = report.sessions_asked,
        sessions_left = report.sessions_left,
        took_ms = report.took_ms,
        "drained"
    );
    report
}

/// One group this node may lead, as the handover needs it.
struct Led<'a> {
    id: GroupId,
    raft: &'a Raft,
    pipeline: &'a Pipeline,
    /// The replica to try first (the map's preferred leader, when it is not us).
    preferred: Option<NodeId>,
}

/// Phase 2: hands every group led here to a caught-up replica, all at once, in rounds
/// until none is led here or `phase_end`. Returns (handed over, still led here).
async fn hand_over_all(ctx: &NodeContext, phase_end: Instant) -> (Vec<GroupId>, Vec<GroupId>) {
    let me = ctx.config.cluster.node_id;
    let groups = ctx.engine.groups().all();
    let meta = ctx.engine.groups().meta();
    let map = ctx.engine.map();
    let mut all: Vec<Led<'_>> = groups
        .values()
        .map(|g| Led {
            id: g.id,
            raft: &g.raft,
            pipeline: &g.pipeline,
            preferred: map
                .group(g.id)
                .and_then(|e| e.replicas.first().copied())
                .filter(|p| *p != me),
        })
        .collect();
    if let Some(meta) = meta.as_deref() {
        all.push(Led {
            id: META_GROUP,
            raft: &meta.raft,
            pipeline: &meta.pipeline,
            preferred: None,
        });
    }
    let mut handed_over = Vec::new();
    loop {
        let led: Vec<&Led<'_>> = all
            .iter()
            .filter(|g| crate::engine::leads(g.raft, me))
            .collect();
        if led.is_empty() || Instant::now() >= phase_end {
            let still = led.iter().map(|g| g.id).collect();
            return (handed_over, still);
        }
        let rounds = led.iter().map(|g| async move {
            let Some(to) = target(g, me) else {
                // No replica is caught up yet: wait for the next round.
                tokio::time::sleep(SESSIONS_POLL).await;
                return None;
            };
            match super::balance::hand_over(ctx, g.id, g.raft, g.pipeline, to).await {
                Ok(()) => Some(g.id),
                Err(problem) => {
                    tracing::debug!(group = g.id, to, %problem, "drain handover failed; retrying");
                    None
                }
            }
        });
        handed_over.extend(
            futures_util::future::join_all(rounds)
                .await
                .into_iter()
                .flatten(),
        );
    }
}

/// The replica to hand `g` to: its preferred leader when caught up, else any
/// caught-up voter but us.
fn target(g: &Led<'_>, me: NodeId) -> Option<NodeId> {
    if let Some(p) = g
        .preferred
        .filter(|p| super::balance::caught_up(g.raft, *p))
    {
        return Some(p);
    }
    let voters: Vec<NodeId> = g
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .filter(|v| *v != me)
        .collect();
    voters
        .into_iter()
        .find(|v| super::balance::caught_up(g.raft, *v))
}
