//! One conversation's retained messages: a window `first_seq .. next_seq` over its
//! gapless sequence, evicted from the front by count and by age.
//!
//! The window holds [`MessageRef`]s, not messages: where each message's bytes live
//! (a Raft log entry, or the snapshot this replica was built from) and its stamp.
//! The message itself is written once, in the Raft log; the state machine resolves a
//! reference when history is read.

use std::collections::VecDeque;

use rkyv::{Archive, Deserialize, Serialize};

/// Where a retained message's bytes are.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Location {
    /// Command `slot` of the batch in the Raft log entry at `index` (a `Publish`).
    Log {
        /// The log entry.
        index: u64,
        /// The command's position in the entry's batch.
        slot: u32,
    },
    /// Position in the message list of the snapshot this replica installed or loaded.
    Snapshot(u64),
}

/// One retained message: its stamp (for the age bound) and where it is.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRef {
    /// The message's server timestamp, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Where its bytes are.
    pub location: Location,
}

/// A page of references, as [`HistoryLog::read`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRefs {
    /// `(seq, reference)` in seq order, gapless.
    pub refs: Vec<(u64, MessageRef)>,
    /// The oldest retained seq (== `next_seq` when none is retained).
    pub first_seq: u64,
    /// The seq the next message will get.
    pub next_seq: u64,
}

/// The retained messages of one conversation, oldest first.
///
/// Invariant: `messages[i]` is seq `first_seq() + i` and `first_seq() + len == next_seq`,
/// so a seq maps to its index by subtraction and [`HistoryLog::read`] is O(limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HistoryLog {
    messages: VecDeque<MessageRef>,
    next_seq: u64,
}

impl HistoryLog {
    /// An empty log whose first message will get seq 1.
    pub(super) fn new() -> Self {
        HistoryLog {
            messages: VecDeque::new(),
            next_seq: 1,
        }
    }

    /// A log restored from a snapshot image; `validate` checks it.
    pub(super) fn from_parts(messages: Vec<MessageRef>, next_seq: u64) -> Self {
        HistoryLog {
            messages: messages.into(),
            next_seq,
        }
    }

    /// The retained references, oldest first.
    pub(super) fn refs(&self) -> impl Iterator<Item = &MessageRef> {
        self.messages.iter()
    }

    /// The retained references, for relocation (a snapshot took them over).
    pub(super) fn refs_mut(&mut self) -> impl Iterator<Item = &mut MessageRef> {
        self.messages.iter_mut()
    }

    /// The seq the next appended message gets.
    pub(super) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The oldest retained seq; equals `next_seq` when nothing is retained.
    pub(super) fn first_seq(&self) -> u64 {
        // `len <= next_seq - 1` always holds (one entry per assigned seq at most).
        self.next_seq - self.messages.len() as u64
    }

    /// Messages retained.
    pub(super) fn len(&self) -> usize {
        self.messages.len()
    }

    /// Appends the message carrying seq `next_seq` and advances `next_seq`. At the
    /// count bound the oldest messages are evicted first (with `messages_max == 0`
    /// nothing is retained; the seq is still consumed). Returns how many were evicted.
    pub(super) fn push(&mut self, message: MessageRef, messages_max: usize) -> usize {
        self.next_seq += 1;
        if messages_max == 0 {
            return 0;
        }
        let mut evicted = 0;
        while self.messages.len() >= messages_max {
            self.messages.pop_front();
            evicted += 1;
        }
        self.messages.push_back(message);
        evicted
    }

    /// Evicts messages stamped before `cutoff_ms` (timestamps never decrease along the
    /// log, so they are all at the front). Returns how many were evicted.
    pub(super) fn evict_before(&mut self, cutoff_ms: u64) -> usize {
        let mut evicted = 0;
        while self
            .messages
            .front()
            .is_some_and(|m| m.timestamp_ms < cutoff_ms)
        {
            self.messages.pop_front();
            evicted += 1;
        }
        evicted
    }

    /// Up to `limit` references with seq >= `from`, in order. A `from` below the
    /// retained window starts at `first_seq` (the caller sees `first_seq > from`).
    pub(super) fn read(&self, from: u64, limit: usize) -> HistoryRefs {
        let first_seq = self.first_seq();
        let start = from.max(first_seq);
        let refs = match usize::try_from(start - first_seq) {
            Ok(skip) if skip < self.messages.len() => self
                .messages
                .range(skip..)
                .take(limit)
                .enumerate()
                .map(|(i, r)| (start + i as u64, *r))
                .collect(),
            _ => Vec::new(),
        };
        HistoryRefs {
            refs,
            first_seq,
            next_seq: self.next_seq,
        }
    }

    /// Checks the window invariants; `conv` and the bound are for the message.
    pub(super) fn validate(&self, conv: u64, messages_max: usize) -> Result<(), String> {
        if self.next_seq == 0 {
            return Err(format!("conv {conv}: next_seq is 0, seqs start at 1"));
        }
        if self.messages.len() as u64 >= self.next_seq {
            return Err(format!(
                "conv {conv}: {} messages retained but next_seq is {}",
                self.messages.len(),
                self.next_seq
            ));
        }
        if self.messages.len() > messages_max {
            return Err(format!(
                "conv {conv}: {} messages retained, above the bound {messages_max}",
                self.messages.len()
            ));
        }
        let first_seq = self.first_seq();
        let mut last_ts = 0;
        let mut last_log_pos = (0, 0);
        for (i, r) in self.messages.iter().enumerate() {
            let seq = first_seq + i as u64;
            if r.timestamp_ms < last_ts {
                return Err(format!(
                    "conv {conv} seq {seq}: timestamp {} is before the previous {last_ts}",
                    r.timestamp_ms
                ));
            }
            last_ts = r.timestamp_ms;
            if let Location::Log { index, slot } = r.location {
                // Later seqs come from later commands of the log.
                if (index, slot) <= last_log_pos {
                    return Err(format!(
                        "conv {conv} seq {seq}: log position {index}/{slot} is not after the previous {last_log_pos:?}"
                    ));
                }
                last_log_pos = (index, slot);
            }
        }
        Ok(())
    }
}
