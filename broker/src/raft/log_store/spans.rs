//! Which groups keep the oldest segments alive: segments retire oldest first, so one
//! group with a live entry in the oldest segment keeps every later segment on disk too.
//!
//! Owns: [`LogSpans`], read off the shared segment table and the groups' indexes.
//! Must not: change anything; decide what to do about a pin (the engine's housekeeping
//! snapshots and purges the groups it can, see `Engine::unpin_log`).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{GroupLog, LogStore, Wal};
use crate::raft::GroupId;

/// How the groups' live entries spread over the segment files, at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogSpans {
    /// The segment files' numbers, oldest first (the active one last).
    pub numbers: Vec<u64>,
    /// Their lengths (records laid out so far), in the same order.
    pub lengths_bytes: Vec<u64>,
    /// For each group with live entries: how many segments there are from the one
    /// holding its first live entry to the newest. A group whose span is every segment
    /// pins the oldest.
    pub spanned_segments: BTreeMap<GroupId, usize>,
}

impl LogSpans {
    /// Segment files, the active one included.
    pub fn segments(&self) -> usize {
        self.numbers.len()
    }

    /// The oldest segment's number, if there is a segment.
    pub fn oldest(&self) -> Option<u64> {
        self.numbers.first().copied()
    }

    /// Segments from segment `seg` (included) to the newest.
    pub fn segments_from(&self, seg: u64) -> usize {
        self.numbers.len() - self.numbers.partition_point(|n| *n < seg)
    }

    /// Bytes of the segments before segment `seg`: what the log would shrink by if
    /// nothing before `seg` were live.
    pub fn bytes_before(&self, seg: u64) -> u64 {
        let n = self.numbers.partition_point(|n| *n < seg);
        self.lengths_bytes.iter().take(n).sum()
    }

    /// The groups with a live entry in the oldest segment: until each of them purges
    /// past it, no segment can retire.
    pub fn pinning_oldest(&self) -> Vec<GroupId> {
        self.spanned_segments
            .iter()
            .filter(|(_, spanned)| **spanned == self.segments())
            .map(|(group, _)| *group)
            .collect()
    }
}

impl Wal {
    /// Where each group's live entries begin, in segments (for housekeeping and
    /// metrics). O(groups × log(segments)).
    pub fn spans(&self) -> LogSpans {
        // The group handles are copied out first: see `Shared::groups` on lock order.
        let logs: Vec<(GroupId, Arc<GroupLog>)> = self
            .shared
            .groups()
            .iter()
            .map(|(id, log)| (*id, Arc::clone(log)))
            .collect();
        // One group's state at a time, then the segment table alone.
        let first_segments: Vec<(GroupId, u64)> = logs
            .iter()
            .filter_map(|(id, log)| {
                let state = log.read_state();
                let first = state.first_live()?;
                Some((*id, state.segment_of(first)?))
            })
            .collect();
        let (numbers, lengths_bytes) = self
            .shared
            .segments()
            .iter()
            .map(|(number, meta)| (*number, meta.len))
            .unzip();
        let mut spans = LogSpans {
            numbers,
            lengths_bytes,
            spanned_segments: BTreeMap::new(),
        };
        for (group, seg) in first_segments {
            let spanned = spans.segments_from(seg);
            spans.spanned_segments.insert(group, spanned);
        }
        spans
    }
}

impl LogStore {
    /// The segment holding this group's live entry `index`; `None` when that entry is
    /// purged or not written yet.
    pub fn segment_of(&self, index: u64) -> Option<u64> {
        self.log.read_state().segment_of(index)
    }
}
