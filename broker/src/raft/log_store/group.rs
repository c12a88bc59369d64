//! The in-memory view of one group's log: where each of its live entries sits in the
//! shared log, the bounded cache of its recent decoded entries, and the log ids openraft
//! asks about.
//!
//! Owns: [`GroupState`] — the index (`log index -> Loc` in some segment), the entry cache
//! and its byte bound, the last log id, the last purged log id, the vote and the
//! committed log id as last saved — and the rules of a Raft log: appends continue it (no
//! holes), truncate cuts a suffix, purge a prefix. It decides *what* changes; the
//! placement in [`super`] decides where the bytes go.
//! Must not: do file I/O other than reading back one entry during `truncate`; block; or
//! evict an entry from the cache before the writer has written it (readers would find
//! nothing on disk).
//!
//! Memory: each live entry costs one [`Loc`] in a `VecDeque` (24 bytes). The cache
//! holds at most the group's share of the node's cache budget (counted as record length
//! plus the size of an `Entry`), plus entries the writer has not written yet (at most
//! what fits in the bounded write queue).

use std::collections::VecDeque;

use super::error::LogStoreError;
use super::segment::{Loc, Segment};
use crate::raft::{Entry, GroupId, LogId, Vote};

/// A decoded entry kept for fast reads.
#[derive(Debug)]
struct Cached {
    index: u64,
    /// The append that wrote it (see [`GroupState::mark_written`]).
    seq: u64,
    /// What it counts against the cache bound.
    bytes: usize,
    entry: Entry,
}

/// A run of reads planned under the state lock and done outside it.
pub(super) enum Piece {
    /// Entries served from the cache.
    Cached(Vec<Entry>),
    /// Consecutive entries in one segment, read with one positioned read.
    Disk {
        /// The segment number.
        seg: u64,
        /// The first entry's index.
        first_index: u64,
        /// Where each entry is.
        locs: Vec<Loc>,
    },
}

/// Bound: a planned disk read spans at most this many bytes of *other* groups' records
/// between two records of this group; past it the run is split into two reads.
const READ_GAP_BYTES_MAX: u64 = 256 * 1024;

/// Bytes one cached entry costs beyond its record.
const ENTRY_OVERHEAD: usize = std::mem::size_of::<Entry>() + std::mem::size_of::<Cached>();

/// The state of one group's log.
#[derive(Debug)]
pub(super) struct GroupState {
    /// The group.
    pub group: GroupId,
    /// Index of `locs[0]` (or of the next entry, when `locs` is empty).
    first_index: u64,
    /// Where each live entry is, from `first_index` on.
    locs: VecDeque<Loc>,
    /// Recent decoded entries, oldest first; always a suffix of the live entries.
    cache: VecDeque<Cached>,
    cache_bytes: usize,
    /// Sequence number of the next append.
    next_seq: u64,
    /// Every append up to this one is written (its entries may leave the cache).
    written_seq: u64,
    /// Record bytes of the live entries.
    live_bytes: u64,
    /// The last entry's log id (or the last purged one, when the log is empty).
    pub last_log_id: Option<LogId>,
    /// The last purged log id.
    pub last_purged: Option<LogId>,
    /// The last saved vote.
    pub vote: Option<Vote>,
    /// The last saved committed log id.
    pub committed: Option<LogId>,
}

/// What recovery found of a group.
#[derive(Debug, Default)]
pub(super) struct Recovered {
    pub first_index: u64,
    pub locs: VecDeque<Loc>,
    pub live_bytes: u64,
    pub last_log_id: Option<LogId>,
    pub last_purged: Option<LogId>,
    pub vote: Option<Vote>,
    pub committed: Option<LogId>,
}

/// What a truncate or purge took out of the index: the locations no longer live.
pub(super) type Removed = Vec<Loc>;

impl GroupState {
    /// A group's state from what recovery found (or empty, for a new group).
    pub fn new(group: GroupId, recovered: Recovered) -> Self {
        GroupState {
            group,
            first_index: recovered.first_index,
            locs: recovered.locs,
            cache: VecDeque::new(),
            cache_bytes: 0,
            next_seq: 1,
            written_seq: 0,
            live_bytes: recovered.live_bytes,
            last_log_id: recovered.last_log_id,
            last_purged: recovered.last_purged,
            vote: recovered.vote,
            committed: recovered.committed,
        }
    }

    /// The index the next entry must have (when the log is not empty).
    pub fn next_index(&self) -> u64 {
        self.first_index + self.locs.len() as u64
    }

    /// The first live index, if any entry is present.
    pub fn first_live(&self) -> Option<u64> {
        (!self.locs.is_empty()).then_some(self.first_index)
    }

    /// The last live index, if any entry is present.
    pub fn last_live(&self) -> Option<u64> {
        (!self.locs.is_empty()).then(|| self.next_index() - 1)
    }

    /// The segment holding live entry `index`, if that entry is live.
    pub fn segment_of(&self, index: u64) -> Option<u64> {
        self.loc(index).map(|loc| loc.seg)
    }

    /// Live entries.
    pub fn live_entries(&self) -> u64 {
        self.locs.len() as u64
    }

    /// Record bytes of the live entries.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Checks that `records` may be appended and drops those a snapshot already covers.
    ///
    /// On an empty log, entries at or below the last purged index are dropped (openraft
    /// may re-send them after a snapshot install). Otherwise the first must be the next
    /// index; on an empty log any later start is accepted (the log restarts there).
    pub fn admit<R>(&self, mut records: Vec<(Entry, R)>) -> Result<Vec<(Entry, R)>, LogStoreError> {
        if let (true, Some(purged)) = (self.locs.is_empty(), self.last_purged) {
            records.retain(|(entry, _)| entry.log_id.index > purged.index);
        }
        let Some((first, _)) = records.first() else {
            return Ok(records);
        };
        let start = first.log_id.index;
        if !self.locs.is_empty() && start != self.next_index() {
            return Err(LogStoreError::NotContiguous {
                group: self.group,
                expected: self.next_index(),
                got: start,
            });
        }
        for (offset, (entry, _)) in records.iter().enumerate() {
            let expected = start + offset as u64;
            if entry.log_id.index != expected {
                return Err(LogStoreError::NotContiguous {
                    group: self.group,
                    expected,
                    got: entry.log_id.index,
                });
            }
        }
        Ok(records)
    }

    /// Starts an append: the sequence number its entries are cached under.
    pub fn begin_append(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Records an admitted entry at `loc`, caches it under append `seq`.
    pub fn push(&mut self, entry: Entry, loc: Loc, seq: u64, cache_budget: usize) {
        if self.locs.is_empty() {
            self.first_index = entry.log_id.index;
        }
        self.locs.push_back(loc);
        self.live_bytes += u64::from(loc.len);
        self.last_log_id = Some(entry.log_id);
        let bytes = loc.len as usize + ENTRY_OVERHEAD;
        self.cache_bytes += bytes;
        self.cache.push_back(Cached {
            index: entry.log_id.index,
            seq,
            bytes,
            entry,
        });
        self.evict(cache_budget);
    }

    /// The writer wrote every append up to `seq`: their entries may leave the cache.
    pub fn mark_written(&mut self, seq: u64, cache_budget: usize) {
        self.written_seq = self.written_seq.max(seq);
        self.evict(cache_budget);
    }

    fn evict(&mut self, budget: usize) {
        while self.cache_bytes > budget {
            match self.cache.front() {
                Some(front) if front.seq <= self.written_seq => {
                    self.cache_bytes -= front.bytes;
                    self.cache.pop_front();
                }
                _ => break,
            }
        }
    }

    /// Forgets entries from `index` on. `read` reads an entry that is not cached (for
    /// the new last log id). `None` when there is nothing to cut.
    pub fn truncate(
        &mut self,
        index: u64,
        read: impl FnOnce(u64, Loc) -> Result<Entry, LogStoreError>,
    ) -> Result<Option<Removed>, LogStoreError> {
        let index = index.max(self.first_index);
        if index >= self.next_index() {
            return Ok(None);
        }
        let new_last = if index > self.first_index {
            let before = index - 1;
            match self.cached(before) {
                Some(entry) => Some(entry.log_id),
                None => {
                    let loc = self.loc(before).ok_or(LogStoreError::Corrupt {
                        file: std::path::PathBuf::new(),
                        offset: 0,
                        group: self.group,
                        index: before,
                        reason: "no location for a live entry (an internal inconsistency)".into(),
                    })?;
                    Some(read(before, loc)?.log_id)
                }
            }
        } else {
            self.last_purged
        };
        let at = usize::try_from(index - self.first_index).unwrap_or(usize::MAX);
        let removed: Removed = self.locs.drain(at..).collect();
        self.live_bytes -= removed.iter().map(|l| u64::from(l.len)).sum::<u64>();
        while self.cache.back().is_some_and(|c| c.index >= index) {
            if let Some(c) = self.cache.pop_back() {
                self.cache_bytes -= c.bytes;
            }
        }
        self.last_log_id = new_last;
        Ok(Some(removed))
    }

    /// Forgets entries up to `log_id`. `None` when that was purged already.
    pub fn purge(&mut self, log_id: LogId) -> Option<Removed> {
        if self.last_purged.is_some_and(|p| p.index >= log_id.index) {
            return None;
        }
        self.last_purged = Some(log_id);
        let upto = log_id.index;
        if self.last_live().is_none_or(|last| upto >= last) {
            // Purged past the end: the log restarts after `log_id`.
            let removed: Removed = self.locs.drain(..).collect();
            self.live_bytes = 0;
            self.cache.clear();
            self.cache_bytes = 0;
            self.first_index = upto.saturating_add(1);
            self.last_log_id = Some(log_id);
            return Some(removed);
        }
        let mut removed = Vec::new();
        if upto >= self.first_index {
            let n = (upto - self.first_index + 1) as usize;
            removed = self.locs.drain(..n).collect();
            self.live_bytes -= removed.iter().map(|l| u64::from(l.len)).sum::<u64>();
            self.first_index = upto.saturating_add(1);
            while self.cache.front().is_some_and(|c| c.index <= upto) {
                if let Some(c) = self.cache.pop_front() {
                    self.cache_bytes -= c.bytes;
                }
            }
        }
        Some(removed)
    }

    /// Every live location (when the group is dropped).
    pub fn take_all(&mut self) -> Removed {
        self.cache.clear();
        self.cache_bytes = 0;
        self.live_bytes = 0;
        self.locs.drain(..).collect()
    }

    fn cached(&self, index: u64) -> Option<Entry> {
        let front = self.cache.front()?.index;
        let at = usize::try_from(index.checked_sub(front)?).ok()?;
        self.cache.get(at).map(|c| c.entry.clone())
    }

    fn loc(&self, index: u64) -> Option<Loc> {
        let at = usize::try_from(index.checked_sub(self.first_index)?).ok()?;
        self.locs.get(at).copied()
    }

    /// Plans reading the live entries of `start..end`, up to about `budget` bytes (at
    /// least one entry when any is in range): cached runs, and disk runs of consecutive
    /// entries in one segment.
    pub fn plan(&self, start: u64, end: u64, budget: u64) -> Vec<Piece> {
        let start = start.max(self.first_index);
        let end = end.min(self.next_index());
        let cache_front = self.cache.front().map_or(u64::MAX, |c| c.index);
        let mut pieces = Vec::new();
        let mut index = start;
        let mut spent = 0u64;
        while index < end && (spent < budget || pieces.is_empty()) {
            if index >= cache_front {
                let from = usize::try_from(index - cache_front).unwrap_or(usize::MAX);
                let mut entries = Vec::new();
                for cached in self.cache.iter().skip(from).take_while(|c| c.index < end) {
                    if spent >= budget && !(pieces.is_empty() && entries.is_empty()) {
                        break;
                    }
                    spent += cached.bytes as u64;
                    entries.push(cached.entry.clone());
                }
                pieces.push(Piece::Cached(entries));
                break;
            }
            let stop = end.min(cache_front);
            let mut locs: Vec<Loc> = Vec::new();
            let mut i = index;
            while i < stop && (spent < budget || (pieces.is_empty() && locs.is_empty())) {
                let Some(loc) = self.loc(i) else {
                    break;
                };
                if let Some(prev) = locs.last() {
                    if prev.seg != loc.seg
                        || loc.offset.saturating_sub(prev.end()) > READ_GAP_BYTES_MAX
                    {
                        break;
                    }
                }
                spent += u64::from(loc.len);
                locs.push(loc);
                i += 1;
            }
            let Some(first) = locs.first() else {
                break;
            };
            pieces.push(Piece::Disk {
                seg: first.seg,
                first_index: index,
                locs,
            });
            index = i;
        }
        pieces
    }

    /// Reads planned pieces (outside the state lock). `segment` finds a segment by number.
    pub fn read_pieces(
        group: GroupId,
        pieces: Vec<Piece>,
        segment: impl Fn(u64) -> Option<std::sync::Arc<Segment>>,
    ) -> Result<Vec<Entry>, LogStoreError> {
        let mut entries = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Cached(cached) => entries.extend(cached),
                Piece::Disk {
                    seg,
                    first_index,
                    locs,
                } => {
                    // A segment is deleted only once no live entry is in it, so a missing
                    // one means the entries were purged meanwhile: stop, as at the end.
                    let Some(segment) = segment(seg) else {
                        break;
                    };
                    entries.extend(segment.read_entries(group, first_index, &locs)?);
                }
            }
        }
        Ok(entries)
    }
}
