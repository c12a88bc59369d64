//! The Raft log store: one shared, segmented, append-only, CRC-checked log per node that
//! holds the logs of every Raft group the node hosts, with group-committed fsync: one
//! `fdatasync` covers the appends of many groups. Each group sees its own log through a
//! [`LogStore`], which implements openraft's `RaftLogStorage` and `RaftLogReader` (in
//! `raft_impl`).
//!
//! Owns: everything under the log directory (`DATA/raft/wal`): segment files and the
//! test-only `durable.manifest`; where each record goes (the placement); which segments
//! are retired.
//! Must not: know what an entry means (bodies are [`crate::raft::codec`]'s rkyv form),
//! apply entries, or report an operation done before it is fsync'ed.
//!
//! # On disk
//!
//! ```text
//! DIR/
//! ├── format                      frame(b"HRLDLOG\0", u32 format version = 2, u64 log key)
//! ├── 00000000000000000001.wal    segment 1: records of any group, in log order
//! ├── 00000000000000000002.wal    segment 2, started once segment 1 passed
//! │                               segment_bytes_max; begins with every group's state
//! ├── 00000000000000000000.spare  a retired segment kept to become a later one (≤ 2)
//! └── durable.manifest            frame((u64 segment, u64 len)*)   test-only power-loss mode
//!
//! One record (integers little-endian):
//!
//!  0      4      8      12     16        24        32        40   40+body_len
//!  +------+------+------+------+---------+---------+---------+------+
//!  |body_ | crc  |group | kind |  index  |  term   | segment | body |
//!  | len  | u32  | u32  | u32  |   u64   |   u64   |   u64   |      |
//!  | u32  |      |      |      |         |         |         |      |
//!  +------+------+------+------+---------+---------+---------+------+
//!  crc = CRC-32 (crc32fast) over the body, then every header byte but the crc field,
//!  then the directory's log key (from `format`). segment = the number of the segment
//!  file the record was written to. body_len ≤ 32 MiB.
//!
//!  kind 1 entry      index, term of the entry; body = rkyv WireEntry
//!  kind 2 truncate   index = first index removed; no body
//!  kind 3 purge      body = purged log id (term u64, node u64, index u64)
//!  kind 4 vote       body = vote (term u64, node u64, committed u8)
//!  kind 5 committed  body = committed log id (a hint)
//!  kind 6 drop       the group left this node; no body
//! ```
//!
//! A recycled segment file holds its previous life's records after its own: they name
//! another segment, so they read as the end of the log (and the key keeps a client's
//! payload bytes from ever checking as a record). Only the newest segment can have such
//! bytes: the writer cuts a segment to its written length before the next one starts.
//!
//! A group's entries appear in index order (after a truncate record, the log continues
//! at the cut). The latest vote, purge and committed records of a group win.
//!
//! # Writing
//!
//! Every write — an append, truncate, purge, vote, committed hint or drop of any group —
//! is laid out under one placement lock (offsets in the active segment, segment rolls)
//! and queued, in that order, for the writer thread (`writer`), which group-commits: one
//! `fdatasync` per batch, completions only after it. An append makes its entries
//! readable at once from the group's cache (openraft may read entries it appended before
//! they are flushed). The queue is bounded ([`WRITE_QUEUE_OPS`]); when it is full,
//! writers wait. `truncate`, `purge`, `save_vote` and `drop_group` wait until durable;
//! `save_committed` does not (it is a hint, made durable by the next fsync). An append
//! must continue its group's log (no holes); on an empty log, entries at or below the
//! last purged index are acknowledged and dropped, since a snapshot covers them.
//!
//! A roll writes every group's vote, purge point and committed hint at the start of the
//! new segment. So the oldest segment can be deleted as soon as no group has a live entry
//! in it: everything it said that still matters is restated later. Segments are retired
//! oldest first only; the log therefore holds everything from the oldest live entry of
//! any group on (see ARCHITECTURE.md → Replication: the retention window bounds it).
//!
//! # Reading and memory
//!
//! Each group's index costs 24 bytes per live entry. Each group caches its recent
//! decoded entries, within its share of `cache_bytes_max` (the budget divided among the
//! open groups, at least [`GROUP_CACHE_BYTES_MIN`]); entries the writer has not written
//! yet stay until it has. Other reads are positioned reads (`read_exact_at`), one per
//! run of a group's records in one segment, done in the calling task (mostly page-cache
//! hits); every record read is CRC-checked and must be the entry asked for: a damaged
//! record is an error, never an entry. `limited_get_log_entries` returns at most about
//! [`READ_BATCH_BYTES`] per call.
//!
//! # Recovery
//!
//! See `recovery`: a bad record at the very end of the last segment is a torn tail and is
//! cut off with a warning; anything else is [`LogStoreError::Corrupt`]. Two stores must
//! not open the same directory at once (the node owns its data directory).
//!
//! # Power-loss simulation (test-only)
//!
//! With `simulate_power_loss`, the writer records the fsync'ed length of every segment in
//! `durable.manifest` after each fsync, before any callback fires; `open` first cuts every
//! segment to that length and deletes unlisted ones, throwing away whatever was written
//! but not fsync'ed, as a power cut would. Enable it from a directory's first open; it
//! costs extra fsyncs per batch and is not for production.

mod error;
mod format;
mod group;
mod meta;
mod raft_impl;
mod record;
mod recovery;
mod segment;
mod spans;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use openraft::storage::LogFlushed;
use tokio::sync::{mpsc, oneshot};

pub use error::LogStoreError;
use format::LogKey;
use group::{GroupState, Removed};
use record::Unplaced;
use segment::{Loc, Segment};
pub use spans::LogSpans;
use writer::{Chunk, Completion, Op, Writer};

use crate::raft::{Entry, GroupId, LogId, TypeConfig, Vote};

/// Bound: operations (appends, truncates, purges, votes, …) of all groups queued for the
/// writer thread. When the queue is full, writers wait until it takes a batch.
pub const WRITE_QUEUE_OPS: usize = 1024;

/// Bound: bytes `limited_get_log_entries` returns per call (at least one entry), so one
/// replication request stays small. Why this size: openraft 0.9 gives every
/// AppendEntries `heartbeat_interval` (50 ms) to complete, and the catch-up of a
/// restarted follower retries the same range after each timeout. With 4 MiB a debug
/// build on a slow host often did not fit (t60's handover test: the restarted node
/// stayed behind, a candidate at term 59); a steady-state entry is one batch of
/// 50–150 KB, so this bound only splits catch-up.
pub const READ_BATCH_BYTES: u64 = 512 << 10;

/// The least cache a group gets, however many groups share the budget.
pub const GROUP_CACHE_BYTES_MIN: usize = 1 << 20;

/// How many recent fsync durations `fsync_us_max_recent` looks at.
const RECENT_FSYNCS: usize = 256;

/// Where and how the log is stored.
#[derive(Debug, Clone)]
pub struct LogStoreConfig {
    /// The log directory (e.g. `DATA/raft/wal`); created if missing.
    pub dir: PathBuf,
    /// A new segment file starts once the current one would pass this size.
    pub segment_bytes_max: u64,
    /// Bound on recent decoded entries kept in memory, for all groups together.
    pub cache_bytes_max: usize,
    /// Test-only power-loss simulation (see the module documentation).
    pub simulate_power_loss: bool,
    /// Told the duration of every fsync (the node feeds its latency histogram).
    pub fsync_observer: FsyncObserver,
}

/// A callback told how long each fsync took; it runs on the writer thread, so it must
/// be quick (a histogram observation). The default does nothing.
#[derive(Clone, Default)]
pub struct FsyncObserver(Option<Arc<dyn Fn(Duration) + Send + Sync>>);

impl FsyncObserver {
    /// An observer calling `f` with each fsync's duration.
    pub fn new(f: impl Fn(Duration) + Send + Sync + 'static) -> Self {
        FsyncObserver(Some(Arc::new(f)))
    }

    fn observe(&self, took: Duration) {
        if let Some(f) = &self.0 {
            f(took);
        }
    }
}

impl std::fmt::Debug for FsyncObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "FsyncObserver(set)"
        } else {
            "FsyncObserver(none)"
        })
    }
}

impl Default for LogStoreConfig {
    fn default() -> Self {
        LogStoreConfig {
            dir: PathBuf::from("herald-data/raft/wal"),
            segment_bytes_max: 64 << 20,
            cache_bytes_max: 64 << 20,
            simulate_power_loss: false,
            fsync_observer: FsyncObserver::default(),
        }
    }
}

/// Counters and gauges of the node's shared log, for metrics.
#[derive(Debug, Clone, Default)]
pub struct LogStats {
    /// Bytes in segment files (including writes still queued).
    pub bytes_on_disk: u64,
    /// Segment files.
    pub segments: usize,
    /// Groups with a log here.
    pub groups: usize,
    /// fsync/fdatasync calls by the store (segments, directory, manifest).
    pub fsyncs_total: u64,
    /// Time spent in them.
    pub fsync_seconds_total: f64,
    /// The slowest of the last 256 fsyncs, in microseconds.
    pub fsync_us_max_recent: u64,
    /// Entries made durable.
    pub appended_entries_total: u64,
}

/// One group's log, for metrics and status.
#[derive(Debug, Clone, Default)]
pub struct GroupLogStats {
    /// The first live (unpurged) index, if any entry is present.
    pub first_index: Option<u64>,
    /// The last index, if any entry is present.
    pub last_index: Option<u64>,
    /// Live entries.
    pub entries: u64,
    /// Record bytes of the live entries.
    pub bytes: u64,
}

/// Counters shared with the writer thread.
#[derive(Debug, Default)]
struct Stats {
    fsyncs: AtomicU64,
    fsync_nanos: AtomicU64,
    appended: AtomicU64,
    /// Bound: the last [`RECENT_FSYNCS`] durations in µs (oldest dropped).
    recent: Mutex<VecDeque<u64>>,
    observer: FsyncObserver,
}

impl Stats {
    /// Counts one fsync that took `took`.
    fn record_fsync(&self, took: Duration) {
        self.observer.observe(took);
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.fsync_nanos.fetch_add(nanos, Ordering::Relaxed);
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() == RECENT_FSYNCS {
            recent.pop_front();
        }
        recent.push_back(nanos / 1_000);
    }

    /// Counts entries made durable.
    fn add_appended(&self, entries: u64) {
        self.appended.fetch_add(entries, Ordering::Relaxed);
    }
}

/// One group's log state, shared by its handles and the writer thread.
#[derive(Debug)]
struct GroupLog {
    state: RwLock<GroupState>,
}

impl GroupLog {
    /// Read access (never held across an `.await`).
    fn read_state(&self) -> RwLockReadGuard<'_, GroupState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Write access (never held across an `.await`).
    fn write_state(&self) -> RwLockWriteGuard<'_, GroupState> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A segment file and how many live entries (of any group) it holds.
#[derive(Debug)]
struct SegMeta {
    seg: Arc<Segment>,
    /// Bytes laid out in it so far.
    len: u64,
    /// Live entries in it; 0 makes it retirable once it is the oldest and not active.
    live: u64,
}

/// What the store, its handles and its writer thread share.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    /// The directory's log key (every record's CRC covers it).
    key: LogKey,
    /// Every group with a log here. Lock order: the placement lock, then one group's
    /// state, then this, then other groups' states — only a segment roll takes more
    /// than one of them (it holds the placement lock, so rolls never meet). Anyone else
    /// holds at most one: takes this, copies the handles out and lets go before locking
    /// a group's state (a queued writer blocks new readers of this lock, so a reader
    /// waiting on a group's state under it could wait on a roll that waits on it).
    groups: RwLock<BTreeMap<GroupId, Arc<GroupLog>>>,
    /// Every segment file, oldest first.
    segments: Mutex<BTreeMap<u64, SegMeta>>,
    cache_bytes_max: usize,
    /// Each group's share of `cache_bytes_max`.
    group_cache_bytes: AtomicUsize,
    stats: Stats,
    /// The first write failure; once set, every write fails.
    failure: Mutex<Option<String>>,
}

impl Shared {
    fn groups(&self) -> RwLockReadGuard<'_, BTreeMap<GroupId, Arc<GroupLog>>> {
        self.groups.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn segments(&self) -> MutexGuard<'_, BTreeMap<u64, SegMeta>> {
        self.segments.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn segment(&self, seq: u64) -> Option<Arc<Segment>> {
        self.segments().get(&seq).map(|m| m.seg.clone())
    }

    /// A group's share of the cache budget.
    fn cache_budget(&self) -> usize {
        self.group_cache_bytes.load(Ordering::Relaxed)
    }

    fn update_cache_budget(&self, groups: usize) {
        let share = (self.cache_bytes_max / groups.max(1)).max(GROUP_CACHE_BYTES_MIN);
        // A configured budget of 0 (tests: every read from disk) stays 0.
        let share = if self.cache_bytes_max == 0 { 0 } else { share };
        self.group_cache_bytes.store(share, Ordering::Relaxed);
    }

    /// The first write failure, if any.
    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records the first write failure.
    fn set_failure(&self, reason: String) {
        let mut failure = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        failure.get_or_insert(reason);
    }

    fn check_writable(&self) -> Result<(), LogStoreError> {
        match self.failure() {
            Some(reason) => Err(LogStoreError::WriterFailed { reason }),
            None => Ok(()),
        }
    }

    /// Counts `locs` as no longer live.
    fn release(&self, locs: &Removed) {
        let mut segments = self.segments();
        for loc in locs {
            if let Some(meta) = segments.get_mut(&loc.seg) {
                meta.live = meta.live.saturating_sub(1);
            }
        }
    }

    /// Takes the oldest segments that hold nothing live, except the active one, out of
    /// the table: the writer deletes them once the records queued before are durable.
    fn retire_dead_prefix(&self, active: Option<u64>) -> Vec<Arc<Segment>> {
        let mut segments = self.segments();
        let mut retired = Vec::new();
        while let Some(entry) = segments.first_entry() {
            if entry.get().live > 0 || Some(*entry.key()) == active {
                break;
            }
            retired.push(entry.remove().seg);
        }
        retired
    }
}

/// Where the next record goes: the active segment and how much is laid out in it.
/// Guarded by the placement lock, which is held until the op is queued, so queue order
/// is log order.
#[derive(Debug)]
struct Placement {
    /// The segment records go to, and its laid-out length.
    active: Option<(Arc<Segment>, u64)>,
    /// Number of the next segment.
    next_seq: u64,
    segment_bytes_max: u64,
}

/// Records being laid out for one queued op.
struct Layout<'p> {
    placement: &'p mut Placement,
    chunks: Vec<Chunk>,
}

impl Layout<'_> {
    /// Appends `bytes` to the active segment (rolling first if it would pass the bound),
    /// counts it live if it is an entry, and returns where it went.
    fn place(
        &mut self,
        shared: &Shared,
        own: Option<&GroupState>,
        record: Unplaced,
        live: bool,
    ) -> Result<Loc, LogStoreError> {
        let len = record.len() as u64;
        let roll = match &self.placement.active {
            None => true,
            Some((_, used)) => *used > 0 && used + len > self.placement.segment_bytes_max,
        };
        if roll {
            self.roll(shared, own)?;
        }
        let Some((seg, used)) = self.placement.active.as_mut() else {
            return Err(LogStoreError::WriterFailed {
                reason: "no active segment after a roll (an internal inconsistency)".into(),
            });
        };
        let bytes = record.seal(seg.seq, shared.key);
        let loc = Loc {
            seg: seg.seq,
            offset: *used,
            len: bytes.len() as u32,
        };
        *used += len;
        {
            let mut segments = shared.segments();
            if let Some(meta) = segments.get_mut(&seg.seq) {
                meta.len = *used;
                meta.live += u64::from(live);
            }
        }
        match self.chunks.last_mut() {
            Some(chunk) if Arc::ptr_eq(&chunk.seg, seg) => chunk.bytes.extend_from_slice(&bytes),
            _ => self.chunks.push(Chunk {
                seg: seg.clone(),
                offset: loc.offset,
                bytes,
            }),
        }
        Ok(loc)
    }

    /// Starts a new segment and writes every group's state at its start. `own` is the
    /// state of the group whose write lock the caller holds (it is not locked again).
    fn roll(&mut self, shared: &Shared, own: Option<&GroupState>) -> Result<(), LogStoreError> {
        let seq = self.placement.next_seq;
        self.placement.next_seq += 1;
        let seg = Arc::new(Segment::new(&shared.dir, seq, shared.key));
        let mut checkpoint = Vec::new();
        {
            let groups = shared.groups();
            for (id, log) in groups.iter() {
                for record in match own {
                    Some(state) if state.group == *id => checkpoint_records(state)?,
                    _ => checkpoint_records(&log.read_state())?,
                } {
                    checkpoint.extend_from_slice(&record.seal(seq, shared.key));
                }
            }
        }
        let used = checkpoint.len() as u64;
        shared.segments().insert(
            seq,
            SegMeta {
                seg: seg.clone(),
                len: used,
                live: 0,
            },
        );
        if !checkpoint.is_empty() {
            self.chunks.push(Chunk {
                seg: seg.clone(),
                offset: 0,
                bytes: checkpoint,
            });
        }
        self.placement.active = Some((seg, used));
        Ok(())
    }
}

/// The records that restate a group's state at the start of a segment.
fn checkpoint_records(state: &GroupState) -> Result<Vec<Unplaced>, LogStoreError> {
    let group = state.group;
    let mut records = Vec::with_capacity(3);
    if let Some(vote) = &state.vote {
        records.push(record::encode_vote(group, vote)?);
    }
    if let Some(purged) = &state.last_purged {
        records.push(record::encode_purge(group, purged)?);
    }
    if let Some(committed) = &state.committed {
        records.push(record::encode_committed(group, committed)?);
    }
    Ok(records)
}

/// The node's shared log. Cheap to clone; clones share it. The writer thread stops once
/// every clone and every [`LogStore`] is dropped and the queue is drained.
#[derive(Debug, Clone)]
pub struct Wal {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Op>,
    placement: Arc<tokio::sync::Mutex<Placement>>,
}

/// One group's log in the shared log: what openraft's storage traits run on. Cheap to
/// clone; clones share it.
#[derive(Debug, Clone)]
pub struct LogStore {
    wal: Wal,
    group: GroupId,
    log: Arc<GroupLog>,
}

/// Reads one group's log; cheap to clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
    group: GroupId,
    log: Arc<GroupLog>,
}

impl Wal {
    /// Opens (or creates) the log in `config.dir`, recovering it (see the module
    /// documentation).
    pub async fn open(config: LogStoreConfig) -> Result<Wal, LogStoreError> {
        if config.segment_bytes_max == 0 {
            return Err(LogStoreError::InvalidConfig {
                reason: "segment_bytes_max must be above 0".into(),
            });
        }
        let cfg = config.clone();
        let recovered = tokio::task::spawn_blocking(move || {
            let stats = Stats {
                observer: cfg.fsync_observer.clone(),
                ..Stats::default()
            };
            recovery::recover(&cfg, &stats).map(|loaded| (loaded, stats))
        })
        .await
        .map_err(|e| {
            LogStoreError::io("recover", &config.dir, std::io::Error::other(e.to_string()))
        })?;
        let (loaded, stats) = recovered?;

        let mut segments = BTreeMap::new();
        for (seg, len) in &loaded.segments {
            segments.insert(
                seg.seq,
                SegMeta {
                    seg: seg.clone(),
                    len: *len,
                    live: 0,
                },
            );
        }
        let groups: BTreeMap<GroupId, Arc<GroupLog>> = loaded
            .groups
            .into_iter()
            .map(|(id, recovered)| {
                for loc in &recovered.locs {
                    if let Some(meta) = segments.get_mut(&loc.seg) {
                        meta.live += 1;
                    }
                }
                let log = GroupLog {
                    state: RwLock::new(GroupState::new(id, recovered)),
                };
                (id, Arc::new(log))
            })
            .collect();
        let lengths = segments.iter().map(|(seq, m)| (*seq, m.len)).collect();
        let placement = Placement {
            active: loaded.segments.last().map(|(seg, len)| (seg.clone(), *len)),
            next_seq: loaded.segments.last().map_or(1, |(seg, _)| seg.seq + 1),
            segment_bytes_max: config.segment_bytes_max,
        };
        let group_count = groups.len();
        let shared = Arc::new(Shared {
            dir: config.dir.clone(),
            key: loaded.key,
            groups: RwLock::new(groups),
            segments: Mutex::new(segments),
            cache_bytes_max: config.cache_bytes_max,
            group_cache_bytes: AtomicUsize::new(0),
            stats,
            failure: Mutex::new(None),
        });
        shared.update_cache_budget(group_count);
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_OPS);
        Writer::new(
            config.dir.clone(),
            shared.clone(),
            rx,
            lengths,
            loaded.spares,
            config.simulate_power_loss,
        )
        .spawn()?;
        Ok(Wal {
            shared,
            tx,
            placement: Arc::new(tokio::sync::Mutex::new(placement)),
        })
    }

    /// The groups that have a log here (found at open or opened since).
    pub fn groups(&self) -> Vec<GroupId> {
        self.shared.groups().keys().copied().collect()
    }

    /// The log of `group`, created empty if the node has none for it yet.
    pub fn group(&self, group: GroupId) -> LogStore {
        let existing = self.shared.groups().get(&group).cloned();
        let log = match existing {
            Some(log) => log,
            None => {
                let mut groups = self
                    .shared
                    .groups
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                let log = groups
                    .entry(group)
                    .or_insert_with(|| {
                        Arc::new(GroupLog {
                            state: RwLock::new(GroupState::new(group, Default::default())),
                        })
                    })
                    .clone();
                let count = groups.len();
                drop(groups);
                self.shared.update_cache_budget(count);
                log
            }
        };
        LogStore {
            wal: self.clone(),
            group,
            log,
        }
    }

    /// Forgets `group`'s log on this node, durably (the replica moved away). Its
    /// handles must not be used again.
    pub async fn drop_group(&self, group: GroupId) -> Result<(), LogStoreError> {
        self.shared.check_writable()?;
        let mut placement = self.placement.lock().await;
        let removed = {
            let mut groups = self
                .shared
                .groups
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let Some(log) = groups.remove(&group) else {
                return Ok(());
            };
            let count = groups.len();
            drop(groups);
            self.shared.update_cache_budget(count);
            let mut state = log.write_state();
            state.take_all()
        };
        self.shared.release(&removed);
        let mut layout = Layout {
            placement: &mut placement,
            chunks: Vec::new(),
        };
        layout.place(&self.shared, None, record::encode_drop(group)?, false)?;
        let chunks = layout.chunks;
        let active = placement.active.as_ref().map(|(s, _)| s.seq);
        let remove = self.shared.retire_dead_prefix(active);
        let (reply, rx) = oneshot::channel();
        self.send(Op {
            chunks,
            remove,
            written: None,
            entries: 0,
            done: Completion::Reply(reply),
        })
        .await?;
        drop(placement);
        Self::wait(rx).await
    }

    /// Current counters of the shared log.
    pub fn stats(&self) -> LogStats {
        let stats = &self.shared.stats;
        let fsync_us_max_recent = stats
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .max()
            .unwrap_or(0);
        let (segments, bytes_on_disk) = {
            let segments = self.shared.segments();
            (segments.len(), segments.values().map(|m| m.len).sum())
        };
        LogStats {
            bytes_on_disk,
            segments,
            groups: self.shared.groups().len(),
            fsyncs_total: stats.fsyncs.load(Ordering::Relaxed),
            fsync_seconds_total: stats.fsync_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            fsync_us_max_recent,
            appended_entries_total: stats.appended.load(Ordering::Relaxed),
        }
    }

    async fn send(&self, op: Op) -> Result<(), LogStoreError> {
        self.tx
            .send(op)
            .await
            .map_err(|_| LogStoreError::WriterGone)
    }

    async fn wait(
        reply: oneshot::Receiver<Result<(), LogStoreError>>,
    ) -> Result<(), LogStoreError> {
        reply.await.map_err(|_| LogStoreError::WriterGone)?
    }
}

impl LogStore {
    /// The group this log belongs to.
    pub fn group_id(&self) -> GroupId {
        self.group
    }

    /// A reader of this group's log.
    pub fn reader(&self) -> LogReader {
        LogReader {
            shared: self.wal.shared.clone(),
            group: self.group,
            log: self.log.clone(),
        }
    }

    /// The shared log this group's log lives in.
    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    /// This group's counters.
    pub fn stats(&self) -> GroupLogStats {
        let state = self.log.read_state();
        GroupLogStats {
            first_index: state.first_live(),
            last_index: state.last_live(),
            entries: state.live_entries(),
            bytes: state.live_bytes(),
        }
    }

    /// Appends `entries`; `callback` fires once they are durable.
    async fn append_entries(
        &self,
        entries: Vec<Entry>,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), LogStoreError> {
        self.append_with(entries, Completion::Flushed(callback))
            .await
    }

    /// Appends `entries` and returns once they are queued; the receiver tells when they are
    /// durable. The same path as openraft's `append`, for tests and benchmarks that have
    /// no openraft callback.
    #[cfg(test)]
    async fn append_notify(
        &self,
        entries: Vec<Entry>,
    ) -> Result<oneshot::Receiver<Result<(), LogStoreError>>, LogStoreError> {
        let (reply, rx) = oneshot::channel();
        self.append_with(entries, Completion::Reply(reply)).await?;
        Ok(rx)
    }

    async fn append_with(
        &self,
        entries: Vec<Entry>,
        done: Completion,
    ) -> Result<(), LogStoreError> {
        let shared = &self.wal.shared;
        shared.check_writable()?;
        let records = entries
            .into_iter()
            .map(|entry| record::encode_entry(self.group, &entry).map(|bytes| (entry, bytes)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut placement = self.wal.placement.lock().await;
        let op = {
            let mut state = self.log.write_state();
            let records = state.admit(records)?;
            let seq = state.begin_append();
            let count = records.len() as u64;
            let mut layout = Layout {
                placement: &mut placement,
                chunks: Vec::new(),
            };
            let budget = shared.cache_budget();
            for (entry, bytes) in records {
                let loc = layout.place(shared, Some(&state), bytes, true)?;
                state.push(entry, loc, seq, budget);
            }
            Op {
                chunks: layout.chunks,
                remove: Vec::new(),
                written: Some((self.log.clone(), seq)),
                entries: count,
                done,
            }
        };
        self.wal.send(op).await
    }

    /// Lays out one state record of this group (with `change` applied to the group's
    /// state under its lock first), queues it, and returns where its completion arrives.
    /// `retire` also retires the dead prefix of segments once the record is durable.
    async fn write_state_record(
        &self,
        change: impl FnOnce(&mut GroupState) -> Result<Option<(Unplaced, Removed)>, LogStoreError>,
        retire: bool,
        wait: bool,
    ) -> Result<Option<oneshot::Receiver<Result<(), LogStoreError>>>, LogStoreError> {
        let shared = &self.wal.shared;
        shared.check_writable()?;
        let mut placement = self.wal.placement.lock().await;
        let chunks = {
            let mut state = self.log.write_state();
            let Some((bytes, removed)) = change(&mut state)? else {
                return Ok(None);
            };
            shared.release(&removed);
            let mut layout = Layout {
                placement: &mut placement,
                chunks: Vec::new(),
            };
            layout.place(shared, Some(&state), bytes, false)?;
            layout.chunks
        };
        let remove = if retire {
            let active = placement.active.as_ref().map(|(s, _)| s.seq);
            shared.retire_dead_prefix(active)
        } else {
            Vec::new()
        };
        let (done, rx) = if wait {
            let (reply, rx) = oneshot::channel();
            (Completion::Reply(reply), Some(rx))
        } else {
            (Completion::Nothing, None)
        };
        self.wal
            .send(Op {
                chunks,
                remove,
                written: None,
                entries: 0,
                done,
            })
            .await?;
        Ok(rx)
    }

    /// Deletes entries from `index` on, durably.
    async fn truncate_from(&self, index: u64) -> Result<(), LogStoreError> {
        let group = self.group;
        let shared = self.wal.shared.clone();
        let rx = self
            .write_state_record(
                |state| {
                    let read = |i, loc: Loc| {
                        let seg = shared.segment(loc.seg).ok_or(LogStoreError::Corrupt {
                            file: PathBuf::from(segment::file_name(loc.seg)),
                            offset: loc.offset,
                            group,
                            index: i,
                            reason: "the segment of a live entry is gone".into(),
                        })?;
                        seg.read_entries(group, i, &[loc])?
                            .pop()
                            .ok_or(LogStoreError::Corrupt {
                                file: seg.path.clone(),
                                offset: loc.offset,
                                group,
                                index: i,
                                reason: "record not found".into(),
                            })
                    };
                    let Some(removed) = state.truncate(index, read)? else {
                        return Ok(None);
                    };
                    Ok(Some((record::encode_truncate(group, index)?, removed)))
                },
                true,
                true,
            )
            .await?;
        match rx {
            Some(rx) => Wal::wait(rx).await,
            None => Ok(()),
        }
    }

    /// Forgets entries up to `log_id`, durably.
    async fn purge_upto(&self, log_id: LogId) -> Result<(), LogStoreError> {
        let group = self.group;
        let rx = self
            .write_state_record(
                |state| {
                    let Some(removed) = state.purge(log_id) else {
                        return Ok(None);
                    };
                    Ok(Some((record::encode_purge(group, &log_id)?, removed)))
                },
                true,
                true,
            )
            .await?;
        match rx {
            Some(rx) => Wal::wait(rx).await,
            None => Ok(()),
        }
    }

    /// Saves the vote; durable when this returns.
    async fn save_vote_durably(&self, vote: Vote) -> Result<(), LogStoreError> {
        let group = self.group;
        let rx = self
            .write_state_record(
                |state| {
                    // Set under the placement lock, so a roll's checkpoint after this
                    // record restates this vote, not the previous one.
                    state.vote = Some(vote);
                    Ok(Some((record::encode_vote(group, &vote)?, Vec::new())))
                },
                false,
                true,
            )
            .await?;
        match rx {
            Some(rx) => Wal::wait(rx).await,
            None => Ok(()),
        }
    }

    /// Remembers the committed log id (a hint: made durable by the next fsync).
    async fn set_committed(&self, committed: Option<LogId>) -> Result<(), LogStoreError> {
        let group = self.group;
        self.write_state_record(
            |state| {
                state.committed = committed;
                match committed {
                    Some(log_id) => Ok(Some((
                        record::encode_committed(group, &log_id)?,
                        Vec::new(),
                    ))),
                    None => Ok(None),
                }
            },
            false,
            false,
        )
        .await?;
        Ok(())
    }
}

/// How the state machine reads history back from the log.
impl crate::raft::state_machine::EntrySource for LogReader {
    fn entry(&self, index: u64) -> Result<Option<Entry>, String> {
        LogReader::entry(self, index).map_err(|e| e.to_string())
    }
}

impl LogReader {
    /// Synchronous read of one entry by index (from the cache, else `pread` from its
    /// segment, CRC-checked). `Ok(None)` when the index is purged or beyond the last entry.
    /// Used by the state machine to serve history.
    pub fn entry(&self, index: u64) -> Result<Option<Entry>, LogStoreError> {
        let Some(end) = index.checked_add(1) else {
            return Ok(None);
        };
        Ok(self.entries(index, end, u64::MAX)?.into_iter().next())
    }

    /// The live entries of `start..end`, up to about `budget` bytes (at least one).
    fn entries(&self, start: u64, end: u64, budget: u64) -> Result<Vec<Entry>, LogStoreError> {
        let pieces = self.log.read_state().plan(start, end, budget);
        GroupState::read_pieces(self.group, pieces, |seq| self.shared.segment(seq))
    }
}
