//! The Raft groups this node hosts.
//!
//! Owns: the set of running groups (each an openraft instance with its state machine,
//! its view of the node's shared log and its write pipeline), looking one up by id
//! without a lock (readers load a snapshot of the set; adding or removing a group swaps
//! it), and serving peers' RPCs to the right group.
//! Must not: decide which groups should run here (the cluster map does) or touch
//! sessions.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;

use super::handler::{GroupHandler, Hosted};
use super::pipeline::Pipeline;
use crate::meta::state_machine::MetaStateMachine;
use crate::raft::log_store::LogStore;
use crate::raft::network::{GroupResolver, PeerReply};
use crate::raft::state_machine::StateMachine;
use crate::raft::{GroupId, NodeId, Raft, META_GROUP};

/// One Raft group on this node.
pub struct Group {
    /// The group's id.
    pub id: GroupId,
    /// Its openraft instance.
    pub raft: Raft,
    /// This replica's state machine.
    pub sm: StateMachine,
    /// Its log in the node's shared log.
    pub log: LogStore,
    /// Its write pipeline.
    pub pipeline: Pipeline,
    /// What this replica last heard from the group's leader (readiness).
    pub contact: LeaderContact,
}

/// What a replica last heard from its group's leader, recorded on every AppendEntries
/// the replica accepts: the leader's commit index and when. Readiness uses it, because
/// a restarted replica knows a leader from its saved vote and its own log's end before
/// it has heard from anyone — neither says it has caught up.
#[derive(Debug, Default)]
pub struct LeaderContact {
    /// The leader's commit index in its latest accepted AppendEntries.
    commit_index: AtomicU64,
    /// When that arrived: milliseconds since [`contact_epoch`], plus one (0: never).
    heard_at_ms: AtomicU64,
}

/// The process-wide start of [`LeaderContact`] times.
fn contact_epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl LeaderContact {
    /// Records an AppendEntries from the leader, which had committed `commit_index`.
    pub fn heard(&self, commit_index: u64) {
        self.commit_index.fetch_max(commit_index, Ordering::Relaxed);
        let ms = u64::try_from(contact_epoch().elapsed().as_millis()).unwrap_or(u64::MAX);
        self.heard_at_ms
            .store(ms.saturating_add(1), Ordering::Release);
    }

    /// The leader's commit index, if it was heard from within `within_ms`.
    pub fn commit_if_heard_within(&self, within_ms: u64) -> Option<u64> {
        let heard = self.heard_at_ms.load(Ordering::Acquire);
        if heard == 0 {
            return None;
        }
        let now = u64::try_from(contact_epoch().elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        (now.saturating_sub(heard) <= within_ms).then(|| self.commit_index.load(Ordering::Relaxed))
    }
}

impl Group {
    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// True while this replica leads the group (openraft's `current_leader` alone
    /// still names a leader that was removed from the group or stepped down).
    pub fn is_leader(&self, me: NodeId) -> bool {
        leads(&self.raft, me)
    }

    /// True while this replica leads the group and has applied an entry of its own
    /// term: everything committed before it (every message ever acknowledged in the
    /// group) is then applied here too. A leader just elected is not there yet: it
    /// applies its predecessors' last entries only once its own first entry commits.
    pub fn leads_caught_up(&self, me: NodeId) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        names_itself_leader(&m, me)
            && m.last_applied
                .is_some_and(|applied| applied.leader_id.term == m.current_term)
    }

    /// The leader this replica knows of, with its address (for `NotLeader` hints).
    pub fn leader_addr(&self) -> Option<(NodeId, String)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let leader = m.current_leader?;
        let node = m.membership_config.membership().get_node(&leader)?;
        Some((leader, node.addr.clone()))
    }

    /// The seq the next message of `conv` gets on this replica (1 when it does not
    /// exist here yet).
    pub fn next_seq(&self, conv: u64) -> u64 {
        self.sm
            .with_store(|s| s.next_seq(conv).unwrap_or(1))
            .unwrap_or(1)
    }

    pub(super) fn not_leader(&self) -> Option<PeerReply> {
        (!self.sm.is_leader()).then(|| PeerReply::NotLeader {
            leader: self.leader_addr(),
        })
    }
}

/// The metadata group on this node (every node runs it: a voter or a learner).
pub struct MetaGroup {
    /// Its openraft instance.
    pub raft: Raft,
    /// The cluster map.
    pub sm: MetaStateMachine,
    /// Its log in the node's shared log.
    pub log: LogStore,
    /// Its write pipeline (map changes go to the metadata leader through it).
    pub pipeline: Pipeline,
    /// What this node last heard from the metadata leader (readiness).
    pub contact: LeaderContact,
}

impl MetaGroup {
    /// True while this node leads the metadata group.
    pub fn is_leader(&self, me: NodeId) -> bool {
        leads(&self.raft, me)
    }
}

/// True while `me` is `raft`'s leader: it names itself and is in the leader state.
pub fn leads(raft: &crate::raft::Raft, me: NodeId) -> bool {
    names_itself_leader(&raft.metrics().borrow(), me)
}

/// The test of [`leads`], on metrics already borrowed.
fn names_itself_leader(m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>, me: NodeId) -> bool {
    m.current_leader == Some(me) && m.state == openraft::ServerState::Leader
}

/// The groups this node hosts. Cheap to clone; clones share the set.
#[derive(Clone, Default)]
pub struct GroupSet {
    groups: Arc<ArcSwap<BTreeMap<GroupId, Arc<Group>>>>,
    meta: Arc<std::sync::OnceLock<Arc<MetaGroup>>>,
    /// Set once the node starts draining (peers' `Elect` is then refused).
    draining: Arc<std::sync::atomic::AtomicBool>,
}

impl GroupSet {
    /// A set of these groups.
    pub fn new(groups: impl IntoIterator<Item = Group>) -> Self {
        let map = groups.into_iter().map(|g| (g.id, Arc::new(g))).collect();
        GroupSet {
            groups: Arc::new(ArcSwap::from_pointee(map)),
            meta: Arc::default(),
            draining: Arc::default(),
        }
    }

    /// Marks the node as draining, for good: its groups refuse to start elections.
    pub fn start_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// True once [`GroupSet::start_draining`] was called.
    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Sets the metadata group (once, when the node starts).
    pub fn set_meta(&self, meta: MetaGroup) {
        let _ = self.meta.set(Arc::new(meta));
    }

    /// The metadata group, once started.
    pub fn meta(&self) -> Option<Arc<MetaGroup>> {
        self.meta.get().cloned()
    }

    /// The group `id`, if this node hosts it.
    pub fn get(&self, id: GroupId) -> Option<Arc<Group>> {
        self.groups.load().get(&id).cloned()
    }

    /// Every hosted group, by id.
    pub fn all(&self) -> Arc<BTreeMap<GroupId, Arc<Group>>> {
        self.groups.load_full()
    }

    /// Adds (or replaces) a group.
    pub fn insert(&self, group: Group) {
        let group = Arc::new(group);
        self.groups.rcu(|current| {
            let mut next = BTreeMap::clone(current);
            next.insert(group.id, group.clone());
            next
        });
    }

    /// Removes a group; returns it.
    pub fn remove(&self, id: GroupId) -> Option<Arc<Group>> {
        let mut removed = None;
        self.groups.rcu(|current| {
            let mut next = BTreeMap::clone(current);
            removed = next.remove(&id);
            next
        });
        removed
    }
}

/// Peers' RPCs go to the hosted group (or the metadata group); a group not hosted here
/// is `NoGroup`.
impl GroupResolver for GroupSet {
    type Handler = GroupHandler;

    fn group(&self, group: GroupId) -> Option<GroupHandler> {
        let hosted = if group == META_GROUP {
            Hosted::Meta(self.meta()?)
        } else {
            Hosted::Data(self.get(group)?)
        };
        Some(GroupHandler {
            hosted,
            draining: self.draining(),
        })
    }
}
