//! Where a group's leader is, as far as this node can tell, and reads from it.
//!
//! Owns: the best guess of each group's leader — what this node's own replica knows,
//! else the last hint a node gave (`NotLeader { leader }`), else the group's replicas
//! from the cluster map in turn — and reads (authorization, history) sent to that
//! leader, following hints until one answers.
//! Must not: cache anything but hints (a wrong hint costs one redirect, never a wrong
//! answer: only the leader answers reads).
//!
//! | bound | value | at the bound |
//! |---|---|---|
//! | [`READ_ATTEMPTS_MAX`] | nodes asked per read | the read is refused `Unavailable` |

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use herald_client::wire::{Refusal, RefusalCode};

use super::GroupSet;
use crate::cluster_map::SharedMap;
use crate::raft::network::{PeerError, PeerNetwork, PeerReply, ReadRequest};
use crate::raft::{GroupId, NodeId};

/// Nodes one read asks, at most, following hints and trying replicas in turn.
pub const READ_ATTEMPTS_MAX: usize = 6;

/// A node that could not be reached is tried after every other candidate for this
/// long (a dead node would otherwise cost a whole connect timeout per attempt).
pub const SUSPECT_FOR: Duration = Duration::from_secs(3);

/// Nodes remembered as unreachable, at most (the oldest is forgotten first).
const SUSPECTS_MAX: usize = 1024;

/// Leader guesses for every group (see the module documentation).
pub struct Leaders {
    node_id: NodeId,
    map: SharedMap,
    groups: GroupSet,
    peers: PeerNetwork,
    hints: Mutex<HashMap<GroupId, NodeId>>,
    /// Rotates through a group's replicas when nothing better is known.
    turn: AtomicUsize,
    /// Nodes that could not be reached recently, and when.
    suspects: Mutex<HashMap<NodeId, Instant>>,
}

impl Leaders {
    /// Leader guesses over `map`, using this node's own replicas (`groups`) first.
    pub fn new(node_id: NodeId, map: SharedMap, groups: GroupSet, peers: PeerNetwork) -> Self {
        Leaders {
            node_id,
            map,
            groups,
            peers,
            hints: Mutex::new(HashMap::new()),
            turn: AtomicUsize::new(0),
            suspects: Mutex::new(HashMap::new()),
        }
    }

    /// The node most likely to lead `group` (never this node unless its own replica
    /// leads), or `None` when the group has no replica elsewhere.
    pub fn best(&self, group: GroupId) -> Option<NodeId> {
        self.candidates(group).into_iter().next()
    }

    /// The leader of `group` as far as this node actually knows (its own replica's
    /// view, else the last hint); no guessing.
    pub fn known(&self, group: GroupId) -> Option<NodeId> {
        if let Some(leader) = self.groups.get(group).and_then(|g| g.leader()) {
            return Some(leader);
        }
        self.hints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&group)
            .copied()
    }

    /// Nodes to ask for `group`'s leader, best first.
    pub fn candidates(&self, group: GroupId) -> Vec<NodeId> {
        let mut out = Vec::new();
        if let Some(local) = self.groups.get(group) {
            if let Some(leader) = local.leader() {
                out.push(leader);
            }
        }
        let hint = self
            .hints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&group)
            .copied();
        out.extend(hint);
        if let Some(entry) = self.map.load().group(group) {
            let n = entry.replicas.len().max(1);
            let start = self.turn.load(Ordering::Relaxed) % n;
            for k in 0..entry.replicas.len() {
                out.push(entry.replicas[(start + k) % n]);
            }
        }
        let mut seen = Vec::with_capacity(out.len());
        for node in out {
            if !seen.contains(&node) {
                seen.push(node);
            }
        }
        // This node answers only what its own replica leads (read locally instead).
        let leads_here = self.groups.get(group).is_some_and(|g| g.sm.is_leader());
        if !leads_here {
            seen.retain(|n| *n != self.node_id);
        }
        // Nodes that were just unreachable go last.
        let suspects = self.suspects.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let suspect = |n: &NodeId| {
            suspects
                .get(n)
                .is_some_and(|t| now.duration_since(*t) < SUSPECT_FOR)
        };
        let (later, mut first): (Vec<NodeId>, Vec<NodeId>) = seen.into_iter().partition(suspect);
        first.extend(later);
        first
    }

    /// `node` could not be reached: try it after every other candidate for a while.
    pub fn unreachable(&self, node: NodeId) {
        let mut suspects = self.suspects.lock().unwrap_or_else(PoisonError::into_inner);
        if suspects.len() >= SUSPECTS_MAX {
            let now = Instant::now();
            suspects.retain(|_, t| now.duration_since(*t) < SUSPECT_FOR);
            if suspects.len() >= SUSPECTS_MAX {
                suspects.clear();
            }
        }
        suspects.insert(node, Instant::now());
    }

    /// A node said who leads `group` (or that it did not know).
    pub fn note(&self, group: GroupId, leader: Option<NodeId>) {
        let mut hints = self.hints.lock().unwrap_or_else(PoisonError::into_inner);
        match leader {
            Some(node) => {
                hints.insert(group, node);
            }
            None => {
                hints.remove(&group);
            }
        }
    }

    /// `node` could not serve `group` (unreachable, or not its leader with no hint):
    /// forget it as a hint and try the next replica next time.
    pub fn failed(&self, group: GroupId, node: NodeId) {
        let mut hints = self.hints.lock().unwrap_or_else(PoisonError::into_inner);
        if hints.get(&group) == Some(&node) {
            hints.remove(&group);
        }
        self.turn.fetch_add(1, Ordering::Relaxed);
    }

    /// A node's QUIC address from the map.
    pub fn addr(&self, node: NodeId) -> Option<String> {
        self.map.load().addr(node).map(str::to_owned)
    }

    /// Sends `request` to `group`'s leader, following `NotLeader` hints and trying the
    /// replicas in turn; returns the leader's answer (`Authorized` or `History`).
    pub async fn read(&self, group: GroupId, request: ReadRequest) -> Result<PeerReply, Refusal> {
        let peers = self.peers.clone();
        self.call(group, move |target, addr| {
            let (peers, request) = (peers.clone(), request.clone());
            async move { peers.read(group, target, &addr, request).await }
        })
        .await
    }

    /// Calls `group`'s leader with `rpc(target, addr)`, following `NotLeader` hints and
    /// trying the replicas in turn, at most [`READ_ATTEMPTS_MAX`] nodes; returns the
    /// first answer that is neither `NotLeader` nor `NoGroup`.
    pub async fn call<F, Fut>(&self, group: GroupId, rpc: F) -> Result<PeerReply, Refusal>
    where
        F: Fn(NodeId, String) -> Fut,
        Fut: std::future::Future<Output = Result<PeerReply, PeerError>>,
    {
        let mut tried: Vec<NodeId> = Vec::new();
        let mut next: Option<NodeId> = None;
        let mut last_problem = String::from("no replica of the group is known");
        for _ in 0..READ_ATTEMPTS_MAX {
            let target = match next.take() {
                Some(node) => node,
                None => {
                    let candidates = self.candidates(group);
                    match candidates
                        .iter()
                        .find(|n| !tried.contains(n))
                        .or(candidates.first())
                    {
                        Some(node) => *node,
                        None => break,
                    }
                }
            };
            tried.push(target);
            let Some(addr) = self.addr(target) else {
                self.failed(group, target);
                continue;
            };
            match rpc(target, addr).await {
                Ok(PeerReply::NotLeader { leader }) => {
                    let hinted = leader.map(|(id, _)| id).filter(|id| *id != target);
                    self.note(group, hinted);
                    if hinted.is_none() {
                        self.failed(group, target);
                    }
                    next = hinted;
                    last_problem = format!("node {target} does not lead group {group}");
                }
                Ok(PeerReply::NoGroup { .. }) => {
                    self.failed(group, target);
                    last_problem = format!("node {target} hosts no replica of group {group}");
                }
                Ok(reply) => {
                    self.note(group, Some(target));
                    return Ok(reply);
                }
                Err(e) => {
                    if matches!(e, PeerError::Timeout { .. }) {
                        self.peers.disconnect(target);
                    }
                    if e.is_unreachable() || matches!(e, PeerError::Timeout { .. }) {
                        self.unreachable(target);
                    }
                    self.failed(group, target);
                    last_problem = e.to_string();
                }
            }
        }
        Err(Refusal::new(
            RefusalCode::Unavailable,
            format!("group {group} has no reachable leader right now ({last_problem}); retry"),
        ))
    }
}
