//! The in-memory view of the log: where every live entry sits on disk, the bounded cache of
//! recent decoded entries, and the log ids openraft asks about.
//!
//! Owns: [`State`] — the index (`log index -> (segment, offset, length)`), segment lengths
//! as the appenders have laid them out, the entry cache and its byte bound, the last log
//! id, the last purged log id, the vote and the committed log id as last saved. It decides
//! *where* each record goes (offsets and segment rolls), so the writer thread only executes.
//! Must not: do file I/O other than reading back one entry during `truncate`; block; or
//! evict an entry from the cache before the writer has written it (readers would find
//! nothing on disk).
//!
//! Memory: each live entry costs one [`Loc`] in a `VecDeque`, 16 bytes (8-byte offset,
//! 4-byte length, padding): a million entries take ~16 MB. The segment map costs ~100
//! bytes per segment file. The cache holds at most `cache_bytes_max` bytes of entries
//! (counted as record length plus the size of an `Entry`), plus entries the writer has not
//! written yet (at most what fits in the bounded write queue).

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::Arc;

use super::error::LogStoreError;
use super::segment::{Loc, Segment};
use crate::raft::{Entry, LogId, Vote};

/// One segment as the log lays it out: its handle and its length once every queued write
/// is done.
#[derive(Debug)]
pub(super) struct SegState {
    /// The file handle (shared with the writer and readers).
    pub seg: Arc<Segment>,
    /// Its length in bytes, counting queued writes.
    pub len: u64,
}

/// A decoded entry kept for readers.
#[derive(Debug)]
struct Cached {
    index: u64,
    /// The write-queue sequence number of the append that carried it.
    seq: u64,
    /// What it counts against the cache bound.
    bytes: usize,
    entry: Entry,
}

/// Consecutive bytes of one segment to write, as placed by an append.
#[derive(Debug)]
pub(super) struct Chunk {
    /// The segment.
    pub seg: Arc<Segment>,
    /// Where the bytes go.
    pub offset: u64,
    /// One or more whole records.
    pub bytes: Vec<u8>,
}

/// What an append asks of the writer.
#[derive(Debug)]
pub(super) struct Placed {
    /// The records, by segment, in log order.
    pub chunks: Vec<Chunk>,
    /// Segments holding only purged entries, to delete before writing (the log restarts
    /// at a new index after being emptied).
    pub drop: Vec<Arc<Segment>>,
    /// This append's write-queue sequence number.
    pub seq: u64,
    /// How many entries it carries.
    pub entries: u64,
}

/// What a truncate asks of the writer.
#[derive(Debug)]
pub(super) struct TruncatePlan {
    /// The segment cut short, and its new length.
    pub keep: Option<(Arc<Segment>, u64)>,
    /// Segments wholly removed.
    pub remove: Vec<Arc<Segment>>,
}

/// Where readers find a range of entries.
pub(super) enum Piece {
    /// Decoded entries from the cache.
    Cached(Vec<Entry>),
    /// Consecutive records of one segment.
    Disk {
        /// The segment.
        seg: Arc<Segment>,
        /// The index of the first record.
        first_index: u64,
        /// The records.
        locs: Vec<Loc>,
    },
}

/// The log as seen in memory. See the module documentation.
#[derive(Debug)]
pub(super) struct State {
    dir: PathBuf,
    segment_bytes_max: u64,
    cache_bytes_max: usize,
    /// Segments by first index; their records are consecutive across the map.
    segments: BTreeMap<u64, SegState>,
    /// The index of `locs[0]` (when `locs` is empty: the index the log expects next).
    first_index: u64,
    locs: VecDeque<Loc>,
    /// A consecutive suffix of the live entries.
    cache: VecDeque<Cached>,
    cache_bytes: usize,
    next_seq: u64,
    written_seq: u64,
    /// The last entry's log id, or the last purged one when no entry is left.
    pub last_log_id: Option<LogId>,
    /// The last purged log id.
    pub last_purged: Option<LogId>,
    /// The last saved vote.
    pub vote: Option<Vote>,
    /// The last saved committed log id.
    pub committed: Option<LogId>,
}

/// The parts recovery found on disk.
pub(super) struct Loaded {
    /// Live segments (first index order) and their lengths.
    pub segments: Vec<(Arc<Segment>, u64)>,
    /// The index of `locs[0]`, or the index expected next when there is no entry.
    pub first_index: u64,
    /// Where each live entry is.
    pub locs: VecDeque<Loc>,
    /// The last entry's log id (or the last purged one).
    pub last_log_id: Option<LogId>,
    /// The last purged log id.
    pub last_purged: Option<LogId>,
    /// The saved vote.
    pub vote: Option<Vote>,
    /// The saved committed log id (never beyond `last_log_id`).
    pub committed: Option<LogId>,
}

/// What an entry counts against the cache bound besides its record bytes.
const ENTRY_OVERHEAD: usize = std::mem::size_of::<Entry>() + std::mem::size_of::<Cached>();

impl State {
    /// The state recovery found.
    pub fn new(
        dir: PathBuf,
        segment_bytes_max: u64,
        cache_bytes_max: usize,
        loaded: Loaded,
    ) -> Self {
        State {
            dir,
            segment_bytes_max,
            cache_bytes_max,
            segments: loaded
                .segments
                .into_iter()
                .map(|(seg, len)| (seg.first, SegState { seg, len }))
                .collect(),
            first_index: loaded.first_index,
            locs: loaded.locs,
            cache: VecDeque::new(),
            cache_bytes: 0,
            next_seq: 1,
            written_seq: 0,
            last_log_id: loaded.last_log_id,
            last_purged: loaded.last_purged,
            vote: loaded.vote,
            committed: loaded.committed,
        }
    }

    /// The index the next appended entry must have (when the log holds entries).
    pub fn next_index(&self) -> u64 {
        self.first_index + self.locs.len() as u64
    }

    /// The first live index, when there is an entry.
    pub fn first_live(&self) -> Option<u64> {
        (!self.locs.is_empty()).then_some(self.first_index)
    }

    /// The last live index, when there is an entry.
    pub fn last_live(&self) -> Option<u64> {
        (!self.locs.is_empty()).then(|| self.next_index() - 1)
    }

    /// Total bytes of all segments, counting queued writes.
    pub fn bytes_on_disk(&self) -> u64 {
        self.segments.values().map(|s| s.len).sum()
    }

    /// How many segment files there are.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Lays out `records` (entries and their encoded records) after the last entry: adds
    /// them to the index and the cache, and returns what the writer must do.
    ///
    /// When the log holds no entry, entries at or below the last purged index are dropped:
    /// they are purged by definition (a snapshot covers them). openraft's storage suite
    /// appends such entries after `get_initial_state` purged past an empty log.
    pub fn place(&mut self, mut records: Vec<(Entry, Vec<u8>)>) -> Result<Placed, LogStoreError> {
        if let (true, Some(purged)) = (self.locs.is_empty(), self.last_purged) {
            records.retain(|(entry, _)| entry.log_id.index > purged.index);
        }
        let seq = self.next_seq;
        let mut placed = Placed {
            chunks: Vec::new(),
            drop: Vec::new(),
            seq,
            entries: records.len() as u64,
        };
        let Some((first, _)) = records.first() else {
            self.next_seq += 1;
            return Ok(placed);
        };
        let start = first.log_id.index;
        if !self.locs.is_empty() && start != self.next_index() {
            return Err(LogStoreError::NotContiguous {
                expected: self.next_index(),
                got: start,
            });
        }
        for (offset, (entry, _)) in records.iter().enumerate() {
            let expected = start + offset as u64;
            if entry.log_id.index != expected {
                return Err(LogStoreError::NotContiguous {
                    expected,
                    got: entry.log_id.index,
                });
            }
        }
        if self.locs.is_empty() && start != self.first_index {
            // The log restarts at another index (after a purge past its end, or on a
            // fresh store): whatever segments remain hold only purged entries.
            placed.drop = std::mem::take(&mut self.segments)
                .into_values()
                .map(|s| s.seg)
                .collect();
            self.first_index = start;
        }
        self.next_seq += 1;
        for (entry, bytes) in records {
            let index = entry.log_id.index;
            let len = bytes.len() as u64;
            let roll = match self.segments.last_key_value() {
                None => true,
                Some((_, tail)) => tail.len > 0 && tail.len + len > self.segment_bytes_max,
            };
            if roll {
                let seg = Arc::new(Segment::new(&self.dir, index));
                self.segments.insert(index, SegState { seg, len: 0 });
            }
            let Some(mut tail) = self.segments.last_entry() else {
                continue; // unreachable: a segment was just ensured
            };
            let tail = tail.get_mut();
            let offset = tail.len;
            tail.len += len;
            let record_len = bytes.len();
            self.locs.push_back(Loc {
                offset,
                len: record_len as u32,
            });
            match placed.chunks.last_mut() {
                Some(chunk) if Arc::ptr_eq(&chunk.seg, &tail.seg) => {
                    chunk.bytes.extend_from_slice(&bytes)
                }
                _ => placed.chunks.push(Chunk {
                    seg: tail.seg.clone(),
                    offset,
                    bytes,
                }),
            }
            self.last_log_id = Some(entry.log_id);
            let bytes = record_len + ENTRY_OVERHEAD;
            self.cache_bytes += bytes;
            self.cache.push_back(Cached {
                index,
                seq,
                bytes,
                entry,
            });
        }
        self.evict();
        Ok(placed)
    }

    /// Notes that the writer has written every append up to `seq` (readers can `pread`
    /// them), and evicts what the cache bound asks for.
    pub fn mark_written(&mut self, seq: u64) {
        self.written_seq = self.written_seq.max(seq);
        self.evict();
    }

    /// Bound: evicts the oldest entries while the cache holds more than `cache_bytes_max`,
    /// except entries not yet written (they stay until the writer catches up).
    fn evict(&mut self) {
        while self.cache_bytes > self.cache_bytes_max {
            match self.cache.front() {
                Some(front) if front.seq <= self.written_seq => {
                    self.cache_bytes -= front.bytes;
                    self.cache.pop_front();
                }
                _ => break,
            }
        }
    }

    /// Removes entries from `index` on. Returns what the writer must do, or `None` when
    /// no entry is at or after `index`. Entries at or before the last purged one are gone
    /// already and are not touched.
    pub fn truncate(&mut self, index: u64) -> Result<Option<TruncatePlan>, LogStoreError> {
        let index = index.max(self.first_index);
        if index >= self.next_index() {
            return Ok(None);
        }
        let new_last = if index > self.first_index {
            Some(self.entry_at(index - 1)?.log_id)
        } else {
            self.last_purged
        };
        let at = usize::try_from(index - self.first_index).unwrap_or(usize::MAX);
        let Some(cut) = self.locs.get(at).copied() else {
            return Ok(None);
        };
        let remove: Vec<Arc<Segment>> = self
            .segments
            .split_off(&index)
            .into_values()
            .map(|s| s.seg)
            .collect();
        let keep = self.segments.last_entry().map(|mut tail| {
            let tail = tail.get_mut();
            tail.len = cut.offset;
            (tail.seg.clone(), cut.offset)
        });
        self.locs.truncate(at);
        while self.cache.back().is_some_and(|c| c.index >= index) {
            if let Some(c) = self.cache.pop_back() {
                self.cache_bytes -= c.bytes;
            }
        }
        self.last_log_id = new_last;
        Ok(Some(TruncatePlan { keep, remove }))
    }

    /// Forgets entries up to and including `log_id`. Returns the segments wholly purged,
    /// or `None` when `log_id` is not past the last purged one.
    pub fn purge(&mut self, log_id: LogId) -> Option<Vec<Arc<Segment>>> {
        if self.last_purged.is_some_and(|p| p.index >= log_id.index) {
            return None;
        }
        self.last_purged = Some(log_id);
        let upto = log_id.index;
        if self.last_live().is_none_or(|last| upto >= last) {
            self.locs.clear();
            self.cache.clear();
            self.cache_bytes = 0;
            self.first_index = upto.saturating_add(1);
            self.last_log_id = Some(log_id);
            return Some(
                std::mem::take(&mut self.segments)
                    .into_values()
                    .map(|s| s.seg)
                    .collect(),
            );
        }
        if upto >= self.first_index {
            let n = (upto - self.first_index + 1) as usize;
            self.locs.drain(..n);
            self.first_index = upto.saturating_add(1);
            while self.cache.front().is_some_and(|c| c.index <= upto) {
                if let Some(c) = self.cache.pop_front() {
                    self.cache_bytes -= c.bytes;
                }
            }
        }
        // A segment is wholly purged when the next one starts at or before `upto + 1`.
        let firsts: Vec<u64> = self.segments.keys().copied().collect();
        let mut removed = Vec::new();
        for pair in firsts.windows(2) {
            if pair[1] <= upto.saturating_add(1) {
                if let Some(s) = self.segments.remove(&pair[0]) {
                    removed.push(s.seg);
                }
            }
        }
        Some(removed)
    }

    fn cached(&self, index: u64) -> Option<Entry> {
        let front = self.cache.front()?.index;
        let at = usize::try_from(index.checked_sub(front)?).ok()?;
        self.cache.get(at).map(|c| c.entry.clone())
    }

    /// The live entry at `index`, from the cache or the disk.
    fn entry_at(&self, index: u64) -> Result<Entry, LogStoreError> {
        if let Some(entry) = self.cached(index) {
            return Ok(entry);
        }
        match self.disk_loc(index) {
            Some((seg, loc)) => seg.read_entry(index, loc),
            None => Err(LogStoreError::Corrupt {
                file: self.dir.clone(),
                offset: 0,
                index,
                reason: "no segment holds this live entry (an internal inconsistency)".into(),
            }),
        }
    }

    fn disk_loc(&self, index: u64) -> Option<(Arc<Segment>, Loc)> {
        let at = usize::try_from(index.checked_sub(self.first_index)?).ok()?;
        let loc = *self.locs.get(at)?;
        let (_, seg) = self.segments.range(..=index).next_back()?;
        Some((seg.seg.clone(), loc))
    }

    /// Where to find the live entries of `start..end`, up to about `budget` bytes (at
    /// least one entry when the range holds one).
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
            let Some((seg_first, seg)) = self.segments.range(..=index).next_back() else {
                break;
            };
            let seg_end = self
                .segments
                .range((Bound::Excluded(*seg_first), Bound::Unbounded))
                .next()
                .map_or(u64::MAX, |(first, _)| *first);
            let stop = end.min(seg_end).min(cache_front);
            let mut locs = Vec::new();
            let mut i = index;
            while i < stop && (spent < budget || (pieces.is_empty() && locs.is_empty())) {
                let Some(loc) = self.locs.get((i - self.first_index) as usize) else {
                    break;
                };
                spent += u64::from(loc.len);
                locs.push(*loc);
                i += 1;
            }
            if locs.is_empty() {
                break;
            }
            pieces.push(Piece::Disk {
                seg: seg.seg.clone(),
                first_index: index,
                locs,
            });
            index = i;
        }
        pieces
    }
}
