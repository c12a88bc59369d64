//! The routing core: local fan-out of committed messages to the sessions of this node.
//!
//! Owns: the map *conversation → outboxes of the local sessions subscribed to it*
//! ([`Router`]) and each session's bounded outbound queue ([`Outbox`]). A message
//! arrives here once per node (BRIEF §4, two-level fan-out), already encoded as one wire
//! frame ([`Delivery`]); [`Router::fan_out`] hands the *same* bytes to every subscribed
//! outbox, and each session's writer task drains its outbox and writes to QUIC.
//!
//! Must not: touch sockets, clocks or the store, block, or slow one session because of
//! another. Routing never decides what a lagging session is told or re-sent: it drops
//! at the bound, counts, and wakes the writer; the session layer tells the session it
//! lagged and re-sends from history (BRIEF §3, "slow consumers never slow anyone else").
//!
//! # Concurrency
//!
//! * Fan-out (the read path) takes no lock: it clones the conversation's entry out of a
//!   [`dashmap::DashMap`] (a shard *read* guard held only for that `Arc` clone, never
//!   while offering) and then loads an immutable snapshot of the subscriber list from an
//!   [`arc_swap::ArcSwap`]. Subscribe/unsubscribe build a new snapshot and swap it in;
//!   they serialise on a per-conversation writer mutex that fan-out never takes.
//! * [`Outbox::offer`] is one push into a lock-free bounded queue plus one atomic add;
//!   the writer's waker is touched only when the writer is parked.
//!
//! # Bounds (what happens at each)
//!
//! * Outbox: at most its capacity (clamped to [`OUTBOX_CAPACITY_MAX`]) queued
//!   deliveries; at the bound the new delivery is dropped, counted (saturating at
//!   [`OUTBOX_DROPPED_MAX`]) and the writer is woken. The publisher and the other
//!   sessions are not slowed.
//! * Subscriber list: one entry per (conversation, local session); its length is bounded
//!   by the sessions the session layer admits. Lists are stored in chunks of
//!   [`SUBSCRIBER_CHUNK_LEN`] so a change copies O(chunk + list/chunk) pointers, not
//!   the whole list.
//! * Conversation map: an entry exists only while it has a local subscriber (it is
//!   removed with its last one), so it is bounded by the number of subscriptions.
//!
//! # Order
//!
//! Per outbox, deliveries come out in the order they were offered (FIFO). If
//! `fan_out(a)` returns before `fan_out(b)` starts, every outbox subscribed during both
//! receives `a` before `b`; the caller fans out a conversation's messages in `seq` order.

mod outbox;
mod table;

pub use outbox::{Offer, Outbox, OUTBOX_CAPACITY_MAX, OUTBOX_DROPPED_MAX};
pub use table::{FanoutStats, Router, RouterConfig, SUBSCRIBER_CHUNK_LEN};

/// A message pre-encoded ONCE as a complete wire frame (4-byte length header + rkyv body of
/// `herald_client::wire::Frame::Deliver`). The same bytes are written to every subscribed
/// session.
///
/// A delivery with an empty frame is a *mark* ([`Delivery::marker`]): no message, only
/// "everything of `conv` up to `seq` exists"; a session writer behind it catches up from
/// history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The conversation it belongs to (the routing key).
    pub conv: u64,
    /// Its `seq` in that conversation.
    pub seq: u64,
    /// The complete frame: header and body, ready to write.
    pub frame: bytes::Bytes,
    /// When the group's leader stored the message (its `timestamp_ms`), for the
    /// fan-out latency metric; 0 when unknown.
    pub stored_ms: u64,
}

impl Delivery {
    /// A delivery of `frame` (already encoded) for message `seq` of `conv`.
    pub fn new(conv: u64, seq: u64, frame: bytes::Bytes) -> Self {
        Self {
            conv,
            seq,
            frame,
            stored_ms: 0,
        }
    }

    /// The same, stored by the leader at `stored_ms` (milliseconds since the epoch).
    pub fn with_stored_ms(self, stored_ms: u64) -> Self {
        Self { stored_ms, ..self }
    }

    /// A mark: every message of `conv` up to `upto` exists.
    pub fn marker(conv: u64, upto: u64) -> Self {
        Self {
            conv,
            seq: upto,
            frame: bytes::Bytes::new(),
            stored_ms: 0,
        }
    }

    /// True for a mark (no message bytes).
    pub fn is_marker(&self) -> bool {
        self.frame.is_empty()
    }
}
