//! Standing again at once after losing an election to a same-term self-vote of a
//! node whose log is shorter than ours ("duelling terms").
//!
//! Owns: the rule that tells such a refusal from any other
//! ([`outvoted_by_a_shorter_log`], pure), and the per-group task that then asks openraft
//! for a new election ([`spawn`]). Must not: trigger an election anywhere else (a
//! healthy leader or a running election of its own is left alone), or more often than
//! once per [`REELECT_PAUSE`].
//!
//! Why: after a leader dies, the survivor with the shorter log often stands first, in
//! term T, and is refused by the one with the longer log. openraft 0.9 does not move
//! the refusing node to term T (standard Raft would), so that node's own candidacy,
//! when its timer fires, asks for term T too: the shorter-log node already voted for
//! itself in T and refuses. The longer log then won only after two or three rounds of
//! a few hundred ms (1.3–1.5 s failovers, t50). Now the refused node stands again at
//! once, in T+1: the other, which has seen the longer log, grants it.
//!
//! No two nodes can keep triggering each other: the rule needs our log to be strictly
//! longer than the refuser's, which cannot hold both ways.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use openraft::raft::{VoteRequest, VoteResponse};
use openraft::ServerState;
use tokio::sync::mpsc;

use crate::raft::{GroupId, NodeId, Raft};

/// The sending side, held by a group's network factory and its peer clients: at most
/// one signal is pending (more while one waits are the same news, and are dropped).
/// When openraft drops them all (the group shut down), the task's receiver ends.
#[derive(Clone)]
pub struct Outvoted {
    tx: mpsc::Sender<()>,
    rx: Arc<Mutex<Option<OutvotedRx>>>,
}

/// The receiving side, for [`spawn`].
pub struct OutvotedRx(mpsc::Receiver<()>);

impl Outvoted {
    /// A new signal.
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel(1);
        Outvoted {
            tx,
            rx: Arc::new(Mutex::new(Some(OutvotedRx(rx)))),
        }
    }

    /// Raises the signal (a no-op while one is already pending).
    pub fn raise(&self) {
        let _ = self.tx.try_send(());
    }

    /// The receiver, once.
    pub fn take_receiver(&self) -> Option<OutvotedRx> {
        self.rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl Default for Outvoted {
    fn default() -> Self {
        Self::new()
    }
}

/// Pause between a refusal and the new candidacy: lets openraft take in the refusal
/// (and adopt the refuser's term) first, and bounds how often this task elects.
pub const REELECT_PAUSE: Duration = Duration::from_millis(20);

/// True when `response` refused `asked` because the peer voted for another candidate
/// in the very same term (a candidate's vote, not a leader's), while our log is
/// strictly longer than the peer's: the peer's candidate cannot win without us, and we
/// would win the next term.
pub fn outvoted_by_a_shorter_log(
    asked: &VoteRequest<NodeId>,
    response: &VoteResponse<NodeId>,
) -> bool {
    let ours = asked.vote.leader_id();
    let theirs = response.vote.leader_id();
    !response.vote_granted
        && !response.vote.is_committed()
        && theirs.term == ours.term
        && theirs.voted_for() != ours.voted_for()
        && response.last_log_id < asked.last_log_id
}

/// Watches `outvoted` for `raft` (group `group`) and stands again when it is raised,
/// if no leader is known meanwhile. Ends when the group's Raft instance drops its
/// network (it shut down), or when openraft refuses the election (it is stopping).
pub fn spawn(raft: Raft, outvoted: Option<OutvotedRx>, group: GroupId) {
    let Some(OutvotedRx(mut rx)) = outvoted else {
        return;
    };
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            tokio::time::sleep(REELECT_PAUSE).await;
            let electing = {
                let metrics = raft.metrics();
                let m = metrics.borrow();
                m.current_leader.is_none() && m.state != ServerState::Leader
            };
            if !electing {
                continue;
            }
            tracing::info!(
                group,
                "outvoted by a node with a shorter log: standing again"
            );
            if let Err(e) = raft.trigger().elect().await {
                tracing::debug!(group, "cannot stand again: {e}");
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId, Vote};

    fn log(term: u64, index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(CommittedLeaderId::new(term, 0), index))
    }

    fn asked(term: u64, me: NodeId, last: u64) -> VoteRequest<NodeId> {
        VoteRequest::new(Vote::new(term, me), log(4, last))
    }

    fn refused(vote: Vote<NodeId>, last: u64) -> VoteResponse<NodeId> {
        VoteResponse::new(vote, log(4, last), false)
    }

    #[test]
    fn only_a_same_term_self_vote_of_a_shorter_log_counts() {
        // Node 1 (log 1609) asked for term 20; node 3 (log 1608) voted for itself in 20.
        assert!(outvoted_by_a_shorter_log(
            &asked(20, 1, 1609),
            &refused(Vote::new(20, 3), 1608)
        ));
        // The refuser's log is as long: it may win; leave the timers to it.
        assert!(!outvoted_by_a_shorter_log(
            &asked(20, 1, 1609),
            &refused(Vote::new(20, 3), 1609)
        ));
        // A later term, or a leader's (committed) vote: not this case.
        assert!(!outvoted_by_a_shorter_log(
            &asked(20, 1, 1609),
            &refused(Vote::new(21, 3), 1608)
        ));
        assert!(!outvoted_by_a_shorter_log(
            &asked(20, 1, 1609),
            &refused(Vote::new_committed(20, 3), 1608)
        ));
        // Granted: nothing to do.
        let granted = VoteResponse::new(Vote::new(20, 1), log(4, 1608), true);
        assert!(!outvoted_by_a_shorter_log(&asked(20, 1, 1609), &granted));
    }

    #[test]
    fn two_nodes_cannot_both_qualify() {
        // Whatever the logs, at most one of two candidates of the same term sees the
        // other's log as strictly shorter.
        for (a, b) in [(10, 10), (10, 11), (11, 10)] {
            let one = outvoted_by_a_shorter_log(&asked(7, 1, a), &refused(Vote::new(7, 2), b));
            let two = outvoted_by_a_shorter_log(&asked(7, 2, b), &refused(Vote::new(7, 1), a));
            assert!(!(one && two), "logs {a} and {b}");
        }
    }
}
