//! The store as a snapshot carries it: plain vectors, rkyv-encoded, so a replica that
//! installs the snapshot holds exactly the state of the one that built it.

use herald_client::wire::{ConvKind, IdempotencyKey};
use rkyv::{Archive, Deserialize, Serialize};

use super::history::MessageRef;

/// Every conversation of a store, ordered by id.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreImage {
    /// The conversations.
    pub conversations: Vec<ConversationImage>,
}

/// One conversation.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ConversationImage {
    /// Its id.
    pub id: u64,
    /// Its kind.
    pub kind: ConvKind,
    /// Members (owners, for a channel), ascending.
    pub members: Vec<u64>,
    /// The seq the next message gets.
    pub next_seq: u64,
    /// Retained messages, oldest first; the last is seq `next_seq - 1`.
    pub history: Vec<MessageRef>,
    /// Remembered idempotency keys, oldest first.
    pub dedup: Vec<DedupImage>,
    /// Stamp of the latest message.
    pub last_timestamp_ms: u64,
}

/// One remembered idempotency key.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DedupImage {
    /// The key.
    pub key: IdempotencyKey,
    /// The seq it got.
    pub seq: u64,
    /// When it was first published.
    pub timestamp_ms: u64,
}
