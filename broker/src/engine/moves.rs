//! A replica move as the group's leader carries it out (or calls it off).
//!
//! Owns: the Raft side of a move — add the new replica as a learner, wait until it
//! really caught up, change the voters in one joint-consensus change — and the check
//! that a request still matches the group: a move asks for voters *from* the set the
//! map recorded before it (or is already done), so a stale or repeated request never
//! takes a replica out that the map still lists.
//! Must not: touch the map (the metadata leader records the outcome), or make a replica
//! a voter before it holds the leader's log.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers};

use super::groups::Group;
use crate::raft::network::{MoveRequest, PeerReply};
use crate::raft::{NodeId, Raft};

/// How long a leader waits for a new replica to catch up before it gives up on a move
/// (the mover retries).
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(300);
/// A new replica counts as caught up once it stores the leader's log up to this many
/// entries behind its end (and at least up to where the wait began). Entries are
/// batches of up to 4096 writes, so openraft's default of 5000 entries would let a
/// replica missing a whole history become a voter.
pub const CATCH_UP_LAG_ENTRIES_MAX: u64 = 8;
/// One membership change (both joint-consensus steps) may take this long; past it the
/// mover retries (a change needs a quorum of the old and of the new voters).
pub const MEMBERSHIP_CHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The group's membership as this leader sees it.
struct Membership {
    voters: BTreeSet<NodeId>,
    /// Voters and learners.
    nodes: BTreeSet<NodeId>,
    /// Between the two steps of a change.
    joint: bool,
    /// Applied, so committed.
    committed: bool,
}

fn membership(raft: &Raft) -> Membership {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let stored = &m.membership_config;
    let config = stored.membership();
    Membership {
        voters: config.voter_ids().collect(),
        nodes: config.nodes().map(|(id, _)| *id).collect(),
        joint: config.get_joint_config().len() > 1,
        committed: stored.log_id().as_ref().map(|l| l.index) <= m.last_applied.map(|l| l.index),
    }
}

/// Carries out (or calls off) one move of `group`, which this node leads. Answers
/// `Done` once the voters the request asks for are committed; an error to retry
/// otherwise.
pub async fn reconfigure(group: &Group, request: MoveRequest) -> PeerReply {
    if let Some(not_leader) = group.not_leader() {
        return not_leader;
    }
    let MoveRequest {
        add,
        addr,
        remove,
        voters,
        abort,
    } = request;
    let before: BTreeSet<NodeId> = voters.into_iter().collect();
    let mut after = before.clone();
    after.remove(&remove);
    after.insert(add);
    let raft = &group.raft;
    let now = membership(raft);
    let (target, done) = if abort {
        (&before, now.voters == before && !now.nodes.contains(&add))
    } else {
        (&after, now.voters == after)
    };
    if done && !now.joint {
        if now.committed {
            return PeerReply::Done;
        }
        return PeerReply::error("the group's new voters are not committed yet");
    }
    if let Some(stale) = stale(&now, &before, &after) {
        return PeerReply::error(stale);
    }
    if abort {
        return call_off(raft, &now, &before, add).await;
    }
    if !now.nodes.contains(&add) {
        if let Err(e) = raft.add_learner(add, BasicNode { addr }, false).await {
            return PeerReply::error(format!("cannot add node {add} as a learner: {e}"));
        }
    }
    // Also when an earlier attempt added the learner: it may still be behind.
    if let Err(problem) = caught_up(raft, add, CATCH_UP_TIMEOUT).await {
        return PeerReply::error(problem);
    }
    // The wait was long: the group may have changed meanwhile (an abort, another move).
    if let Some(stale) = stale(&membership(raft), &before, &after) {
        return PeerReply::error(stale);
    }
    change(raft, ChangeMembers::ReplaceAllVoters(target.clone())).await
}

/// Why a request does not match the group: its voters are neither the set before the
/// move nor the set after it (nor between the two).
fn stale(now: &Membership, before: &BTreeSet<NodeId>, after: &BTreeSet<NodeId>) -> Option<String> {
    (!now.joint && now.voters != *before && now.voters != *after).then(|| {
        format!(
            "the group's voters are {:?}, neither {before:?} (before the move) nor {after:?} (after it): a stale move request",
            now.voters
        )
    })
}

/// Restores the voters `before` and takes `add` out of the group.
async fn call_off(
    raft: &Raft,
    now: &Membership,
    before: &BTreeSet<NodeId>,
    add: NodeId,
) -> PeerReply {
    if now.voters != *before || now.joint {
        // `retain: false` in `change`: `add`, a voter now, leaves entirely.
        if let reply @ PeerReply::Error(_) =
            change(raft, ChangeMembers::ReplaceAllVoters(before.clone())).await
        {
            return reply;
        }
    }
    if membership(raft).nodes.contains(&add) {
        return change(raft, ChangeMembers::RemoveNodes(BTreeSet::from([add]))).await;
    }
    PeerReply::Done
}

/// One membership change, bounded by [`MEMBERSHIP_CHANGE_TIMEOUT`]; removed voters do
/// not stay as learners.
async fn change(raft: &Raft, members: ChangeMembers<NodeId, BasicNode>) -> PeerReply {
    match tokio::time::timeout(
        MEMBERSHIP_CHANGE_TIMEOUT,
        raft.change_membership(members, false),
    )
    .await
    {
        Ok(Ok(_)) => PeerReply::Done,
        Ok(Err(e)) => PeerReply::error(format!("cannot change the voters: {e}")),
        Err(_) => PeerReply::error(format!(
            "the membership change did not commit within {MEMBERSHIP_CHANGE_TIMEOUT:?}"
        )),
    }
}

/// Whether learner `node` stores this leader's log to within
/// [`CATCH_UP_LAG_ENTRIES_MAX`] entries of its end (and at least to `from`).
fn is_caught_up(raft: &Raft, node: NodeId, from: u64) -> Result<bool, String> {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let Some(replication) = &m.replication else {
        return Err("this node stopped leading the group".to_owned());
    };
    if m.membership_config.membership().get_node(&node).is_none() {
        return Err(format!("node {node} is no longer a member of the group"));
    }
    let matched = replication
        .get(&node)
        .and_then(|l| l.as_ref().map(|l| l.index))
        .unwrap_or(0);
    let end = m.last_log_index.unwrap_or(0);
    Ok(matched >= from && matched + CATCH_UP_LAG_ENTRIES_MAX >= end)
}

/// True when learner `node` is caught up now (see [`is_caught_up`]); false also when
/// this node does not lead.
pub fn caught_up_now(raft: &Raft, node: NodeId) -> bool {
    let end = raft.metrics().borrow().last_log_index.unwrap_or(0);
    is_caught_up(raft, node, end.saturating_sub(CATCH_UP_LAG_ENTRIES_MAX)).unwrap_or(false)
}

/// Waits (at most `timeout`) until learner `node` stores this leader's log up to where
/// it ended when the wait began, and to within [`CATCH_UP_LAG_ENTRIES_MAX`] of its end
/// now.
pub async fn caught_up(raft: &Raft, node: NodeId, timeout: Duration) -> Result<(), String> {
    let mut metrics = raft.metrics();
    let from = metrics.borrow().last_log_index.unwrap_or(0);
    let started = tokio::time::Instant::now();
    let wait = async {
        loop {
            metrics.borrow_and_update();
            if is_caught_up(raft, node, from)? {
                return Ok(());
            }
            if metrics.changed().await.is_err() {
                return Err("the group's raft stopped".to_owned());
            }
        }
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(Ok(())) => {
            tracing::info!(
                node,
                entries = from,
                took_ms = started.elapsed().as_millis() as u64,
                "the new replica caught up"
            );
            Ok(())
        }
        Ok(Err(problem)) => Err(problem),
        Err(_) => Err(format!("node {node} did not catch up within {timeout:?}")),
    }
}
