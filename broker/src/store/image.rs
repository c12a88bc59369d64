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
    /// Remembered idempotency keys, oldest first, as runs.
    pub dedup: Vec<DedupRunImage>,
    /// Stamp of the latest message.
    pub last_timestamp_ms: u64,
}

/// Remembered idempotency keys in a row of the table's order (oldest first): a
/// producer's keys whose `producer_seq` and seq each go up by one, all first published
/// at the same stamp. A caller key, or any key that breaks the row, starts a run of its
/// own. Why runs: most keys are producer counters published in bursts, so 100,000 keys
/// took 4.4 MB as one record each and a run stands for many (measured in the note of
/// the commit that made this change).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DedupRunImage {
    /// The run's first key.
    pub first: IdempotencyKey,
    /// The seq it got; key `i` of the run got `first_seq + i`.
    pub first_seq: u64,
    /// When every key of the run was first published.
    pub timestamp_ms: u64,
    /// Keys after the first (key `i` is producer_seq `first`'s + `i`); 0 for a caller
    /// key.
    pub more: u32,
}

impl DedupRunImage {
    /// Key `i` of the run and the seq it got, or `None` past the run (or when it does
    /// not fit a u64: a snapshot is data from disk or a peer).
    pub fn key(&self, i: u32) -> Option<(IdempotencyKey, u64)> {
        if i > self.more {
            return None;
        }
        let seq = self.first_seq.checked_add(u64::from(i))?;
        match (&self.first, i) {
            (key, 0) => Some((key.clone(), seq)),
            (
                IdempotencyKey::Producer {
                    producer_id,
                    producer_seq,
                },
                _,
            ) => Some((
                IdempotencyKey::Producer {
                    producer_id: *producer_id,
                    producer_seq: producer_seq.checked_add(u64::from(i))?,
                },
                seq,
            )),
            (IdempotencyKey::Caller(_), _) => None,
        }
    }

    /// Keys in the run (never 0: the first is always there).
    pub fn keys(&self) -> u64 {
        u64::from(self.more) + 1
    }

    /// Takes `key` (got `seq` at `timestamp_ms`) as the run's next key, if it is one.
    pub fn extend(&mut self, key: &IdempotencyKey, seq: u64, timestamp_ms: u64) -> bool {
        let (
            IdempotencyKey::Producer {
                producer_id: first_id,
                producer_seq: first_producer_seq,
            },
            IdempotencyKey::Producer {
                producer_id,
                producer_seq,
            },
        ) = (&self.first, key)
        else {
            return false;
        };
        let Some(next) = self.more.checked_add(1) else {
            return false;
        };
        let follows = first_id == producer_id
            && first_producer_seq.checked_add(u64::from(next)) == Some(*producer_seq)
            && self.first_seq.checked_add(u64::from(next)) == Some(seq)
            && timestamp_ms == self.timestamp_ms;
        if follows {
            self.more = next;
        }
        follows
    }
}
