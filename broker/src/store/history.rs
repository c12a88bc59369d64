//! One conversation's retained messages: a window `first_seq .. next_seq` over its
//! gapless sequence, evicted from the front by count and by age.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{History, StoredMessage};

/// The retained messages of one conversation, oldest first.
///
/// Invariant: `messages[i].seq == first_seq() + i` and `first_seq() + len == next_seq`,
/// so a seq maps to its index by subtraction and [`HistoryLog::read`] is O(limit).
#[derive(Debug, Clone)]
pub(super) struct HistoryLog {
    messages: VecDeque<Arc<StoredMessage>>,
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
    pub(super) fn push(&mut self, message: Arc<StoredMessage>, messages_max: usize) -> usize {
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
            .is_some_and(|m| m.message.timestamp_ms < cutoff_ms)
        {
            self.messages.pop_front();
            evicted += 1;
        }
        evicted
    }

    /// Up to `limit` messages with seq >= `from`, in order. A `from` below the
    /// retained window starts at `first_seq` (the caller sees `first_seq > from`).
    pub(super) fn read(&self, from: u64, limit: usize) -> History {
        let first_seq = self.first_seq();
        let start = from.max(first_seq);
        let messages = match usize::try_from(start - first_seq) {
            Ok(skip) if skip < self.messages.len() => {
                self.messages.range(skip..).take(limit).cloned().collect()
            }
            _ => Vec::new(),
        };
        History {
            messages,
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
        for (i, stored) in self.messages.iter().enumerate() {
            let m = &stored.message;
            let expected = first_seq + i as u64;
            if m.seq != expected || m.conv != conv {
                return Err(format!(
                    "conv {conv}: position {i} holds conv {} seq {}, expected seq {expected}",
                    m.conv, m.seq
                ));
            }
            if stored.delivery.conv != conv || stored.delivery.seq != m.seq {
                return Err(format!(
                    "conv {conv} seq {}: delivery frame is labelled conv {} seq {}",
                    m.seq, stored.delivery.conv, stored.delivery.seq
                ));
            }
            if m.timestamp_ms < last_ts {
                return Err(format!(
                    "conv {conv} seq {}: timestamp {} is before the previous {last_ts}",
                    m.seq, m.timestamp_ms
                ));
            }
            last_ts = m.timestamp_ms;
        }
        Ok(())
    }
}
