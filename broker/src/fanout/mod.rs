//! Two-level fan-out: committed messages reach every interested node once, and each node
//! reaches its own sessions.
//!
//! Owns: the node's [`Hub`] (where every message for this node's sessions arrives: from
//! the local state machine of a group this node leads, or pushed by another node's
//! leader), the leader side of watch streams ([`watchers`]: which nodes watch which
//! conversations of a group, and what is pushed to them), and the watching side
//! ([`interest`]: which conversations this node's sessions need, one watch stream per
//! group to its leader).
//! Must not: touch the store's rules or sessions' cursors: the hub only hands deliveries
//! to the router; the session writer decides what to send (by seq) and fills gaps from
//! history.
//!
//! # Who fans out
//!
//! Only a group's leader fans a message out, when it applies it: to its own sessions
//! through its router, and to every other node that watches the conversation through
//! that node's watch stream (one copy per node, batched per log entry). Followers apply
//! the log but push nothing. So a session sees each message as soon as the leader has
//! it, on any node, with or without a replica of the group there.
//!
//! When the leader changes, nothing is lost: a new leader marks every conversation its
//! own sessions subscribe to with its head ([`Hub::mark`]); a watcher that reopens its
//! stream at the new leader marks every watched conversation with the new heads. A mark
//! makes each session writer catch up from history to that seq.

pub mod interest;
pub mod watchers;

use std::sync::{Arc, OnceLock};

use crate::routing::{Delivery, Router};

/// What the hub calls when members are removed from a conversation: end those users'
/// subscriptions to it on this node (the session registry).
pub type Revoker = Box<dyn Fn(u64, &[u64]) + Send + Sync>;

/// Where this node's deliveries arrive (see the module documentation).
pub struct Hub {
    router: Arc<Router>,
    revoker: OnceLock<Revoker>,
}

impl Hub {
    /// A hub in front of the node's router.
    pub fn new(router: Arc<Router>) -> Arc<Hub> {
        Arc::new(Hub {
            router,
            revoker: OnceLock::new(),
        })
    }

    /// The node's router.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Sets who ends subscriptions of removed members (once, when the node starts).
    pub fn set_revoker(&self, revoker: Revoker) {
        let _ = self.revoker.set(revoker);
    }

    /// One message for this node's sessions.
    pub fn deliver(&self, delivery: &Arc<Delivery>) -> crate::routing::FanoutStats {
        self.router.fan_out(delivery)
    }

    /// Tells this node's sessions of `conv` that everything up to `upto` exists: each
    /// catches up from history to it (after a leader change or a reopened watch).
    pub fn mark(&self, conv: u64, upto: u64) {
        if upto == 0 || self.router.subscriber_count(conv) == 0 {
            return;
        }
        self.router.fan_out(&Arc::new(Delivery::marker(conv, upto)));
    }

    /// `users` were removed from `conv`: their sessions here stop receiving it.
    pub fn revoke(&self, conv: u64, users: &[u64]) {
        if let Some(revoker) = self.revoker.get() {
            revoker(conv, users);
        }
    }
}
