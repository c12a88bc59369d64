//! The Raft log store: segmented, append-only, CRC-checked files with group-committed
//! fsync. It implements openraft's `RaftLogStorage` and `RaftLogReader` (in `raft_impl`).
//!
//! Owns: everything under the log directory (`DATA/raft/log`): segment files, `vote`,
//! `purged`, `committed`, and the test-only `durable.manifest`.
//! Must not: know what an entry means (bodies are [`crate::raft::codec`]'s rkyv form), apply
//! entries, or report an append done before it is fsync'ed.
//!
//! # On disk
//!
//! ```text
//! DIR/
//! ├── 00000000000000000001.log    segment: records for index 1, 2, 3, … (append-only)
//! ├── 00000000000000052311.log    the next segment, first index 52311 (rolled past
//! │                               segment_bytes_max)
//! ├── vote                        frame(rkyv WireVote)     atomic replace + fsync
//! ├── purged                      frame(rkyv WireLogId)    atomic replace + fsync
//! ├── committed                   frame(rkyv WireLogId)    overwritten in place, no fsync
//! └── durable.manifest            frame((u64 first, u64 len)*)   test-only power-loss mode
//!
//! One record (integers little-endian):
//!
//!  0          4          8                 16                24           24+body_len
//!  +----------+----------+-----------------+-----------------+----------------+
//!  | body_len |   crc    |      index      |      term       |      body      |
//!  |   u32    |   u32    |       u64       |       u64       | rkyv WireEntry |
//!  +----------+----------+-----------------+-----------------+----------------+
//!  crc = CRC-32 (crc32fast) over body_len ‖ index ‖ term ‖ body, i.e. every byte of the
//!  record except the crc field itself. body_len ≤ 32 MiB.
//!
//! A frame (the small files):  [u32 body_len][u32 crc of body_len ‖ body][body]
//! ```
//!
//! Records in a segment hold consecutive indexes starting at the file's name; segments
//! are consecutive too. An atomic replace writes `NAME.tmp`, fsyncs it, renames it over
//! `NAME` and fsyncs the directory.
//!
//! # Writing
//!
//! `append` encodes the entries, lays them out (offsets, segment rolls) and makes them
//! readable at once from the cache (openraft may read entries it appended before they are
//! flushed), then queues them for the writer thread (`writer`), which group-commits:
//! one `fdatasync` per batch, callbacks only after it. The queue is bounded
//! ([`WRITE_QUEUE_OPS`]); when it is full, `append` waits. `truncate`, `purge` and
//! `save_vote` go through the same queue, so every write is serialized as openraft
//! requires, and wait until they are durable. An append must continue the log (no holes);
//! on an empty log, entries at or below the last purged index are acknowledged and
//! dropped, since a snapshot covers them.
//!
//! `save_committed` is implemented: the committed log id is written in place after the
//! batch's fsync, without its own fsync. After a crash it may be stale (openraft re-applies
//! from an older point: harmless) or torn (the CRC fails: ignored); if it is past the
//! recovered log it is clamped to the last entry. It lets a restarted node re-apply
//! committed entries before it hears from a leader.
//!
//! # Reading and memory
//!
//! The index (log index → segment offset and length) costs 16 bytes per live entry. The
//! cache of decoded entries is bounded by `cache_bytes_max` (oldest evicted first; entries
//! the writer has not written yet stay until it has). Other reads are positioned reads
//! (`read_exact_at`) of the segment, one read per run of consecutive records, done in
//! the calling task (mostly page-cache hits); every record read is CRC-checked: a damaged
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
//! costs three extra fsyncs per batch and is not for production.

mod error;
mod meta;
mod raft_impl;
mod record;
mod recovery;
mod segment;
mod state;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use openraft::storage::LogFlushed;
use tokio::sync::{mpsc, oneshot};

pub use error::LogStoreError;
use state::{Piece, State};
use writer::{Completion, Op, Writer};

use crate::raft::{Entry, LogId, TypeConfig, Vote};

/// Bound: operations (appends, truncates, purges, votes) queued for the writer thread.
/// When the queue is full, `append` waits until the writer takes a batch.
pub const WRITE_QUEUE_OPS: usize = 1024;

/// Bound: bytes `limited_get_log_entries` returns per call (at least one entry), so one
/// replication request stays small.
pub const READ_BATCH_BYTES: u64 = 4 << 20;

/// How many recent fsync durations `fsync_us_max_recent` looks at.
const RECENT_FSYNCS: usize = 256;

/// Where and how the log is stored.
#[derive(Debug, Clone)]
pub struct LogStoreConfig {
    /// The log directory (e.g. `DATA/raft/log`); created if missing.
    pub dir: PathBuf,
    /// A new segment file starts once the current one would pass this size.
    pub segment_bytes_max: u64,
    /// Bound on recent decoded entries kept in memory (oldest evicted first).
    pub cache_bytes_max: usize,
    /// Test-only power-loss simulation (see the module documentation).
    pub simulate_power_loss: bool,
}

impl Default for LogStoreConfig {
    fn default() -> Self {
        LogStoreConfig {
            dir: PathBuf::from("herald-data/raft/log"),
            segment_bytes_max: 64 << 20,
            cache_bytes_max: 64 << 20,
            simulate_power_loss: false,
        }
    }
}

/// Counters and gauges of the log, for metrics.
#[derive(Debug, Clone, Default)]
pub struct LogStats {
    /// The first live (unpurged) index, if any entry is present.
    pub first_index: Option<u64>,
    /// The last index, if any entry is present.
    pub last_index: Option<u64>,
    /// Bytes in segment files (including writes still queued).
    pub bytes_on_disk: u64,
    /// Segment files.
    pub segments: usize,
    /// fsync/fdatasync calls by the store (segments, directory, small files).
    pub fsyncs_total: u64,
    /// Time spent in them.
    pub fsync_seconds_total: f64,
    /// The slowest of the last 256 fsyncs, in microseconds.
    pub fsync_us_max_recent: u64,
    /// Entries made durable.
    pub appended_entries_total: u64,
}

/// Counters shared with the writer thread.
#[derive(Debug, Default)]
struct Stats {
    fsyncs: AtomicU64,
    fsync_nanos: AtomicU64,
    appended: AtomicU64,
    /// Bound: the last [`RECENT_FSYNCS`] durations in µs (oldest dropped).
    recent: Mutex<VecDeque<u64>>,
}

impl Stats {
    /// Counts one fsync that took `took`.
    fn record_fsync(&self, took: Duration) {
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

/// What the store, its readers and its writer thread share.
#[derive(Debug)]
struct Shared {
    state: RwLock<State>,
    stats: Stats,
    /// The first write failure; once set, every write fails.
    failure: Mutex<Option<String>>,
}

impl Shared {
    /// Read access to the state (never held across an `.await`).
    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Write access to the state (never held across an `.await`).
    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
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
}

/// The durable Raft log of one group. Cheap to clone; clones share the store. The writer
/// thread stops once every clone is dropped and the queue is drained.
#[derive(Debug, Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Op>,
    /// Serializes laying out a write and queueing it, so queue order is log order.
    order: Arc<tokio::sync::Mutex<()>>,
}

/// Reads the log; cheap to clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

impl LogStore {
    /// Opens (or creates) the log in `config.dir`, recovering it (see the module documentation).
    pub async fn open(config: LogStoreConfig) -> Result<LogStore, LogStoreError> {
        if config.segment_bytes_max == 0 {
            return Err(LogStoreError::InvalidConfig {
                reason: "segment_bytes_max must be above 0".into(),
            });
        }
        let cfg = config.clone();
        let recovered = tokio::task::spawn_blocking(move || {
            let stats = Stats::default();
            recovery::recover(&cfg, &stats).map(|loaded| (loaded, stats))
        })
        .await
        .map_err(|e| {
            LogStoreError::io("recover", &config.dir, std::io::Error::other(e.to_string()))
        })?;
        let (loaded, stats) = recovered?;
        let segments = loaded.segments.clone();
        let state = State::new(
            config.dir.clone(),
            config.segment_bytes_max,
            config.cache_bytes_max,
            loaded,
        );
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            stats,
            failure: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_OPS);
        Writer::new(
            config.dir.clone(),
            shared.clone(),
            rx,
            segments,
            config.simulate_power_loss,
        )
        .spawn()?;
        Ok(LogStore {
            shared,
            tx,
            order: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// A reader of this log.
    pub fn reader(&self) -> LogReader {
        LogReader {
            shared: self.shared.clone(),
        }
    }

    /// Current counters.
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
        let state = self.shared.read_state();
        LogStats {
            first_index: state.first_live(),
            last_index: state.last_live(),
            bytes_on_disk: state.bytes_on_disk(),
            segments: state.segment_count(),
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
        self.shared.check_writable()?;
        let records = entries
            .into_iter()
            .map(|entry| record::encode(&entry).map(|bytes| (entry, bytes)))
            .collect::<Result<Vec<_>, _>>()?;
        let _order = self.order.lock().await;
        let placed = self.shared.write_state().place(records)?;
        self.send(Op::Append {
            chunks: placed.chunks,
            drop: placed.drop,
            seq: placed.seq,
            entries: placed.entries,
            done,
        })
        .await
    }

    /// Deletes entries from `index` on, durably.
    async fn truncate_from(&self, index: u64) -> Result<(), LogStoreError> {
        self.shared.check_writable()?;
        let reply = {
            let _order = self.order.lock().await;
            let plan = self.shared.write_state().truncate(index)?;
            let Some(plan) = plan else {
                return Ok(());
            };
            let (reply, rx) = oneshot::channel();
            self.send(Op::Truncate { plan, reply }).await?;
            rx
        };
        Self::wait(reply).await
    }

    /// Forgets entries up to `log_id`, durably.
    async fn purge_upto(&self, log_id: LogId) -> Result<(), LogStoreError> {
        self.shared.check_writable()?;
        let reply = {
            let _order = self.order.lock().await;
            let remove = self.shared.write_state().purge(log_id);
            let Some(remove) = remove else {
                return Ok(());
            };
            let (reply, rx) = oneshot::channel();
            self.send(Op::Purge {
                purged: log_id,
                remove,
                reply,
            })
            .await?;
            rx
        };
        Self::wait(reply).await
    }

    /// Saves the vote; durable when this returns.
    async fn save_vote_durably(&self, vote: Vote) -> Result<(), LogStoreError> {
        self.shared.check_writable()?;
        let reply = {
            let _order = self.order.lock().await;
            let (reply, rx) = oneshot::channel();
            self.send(Op::Vote { vote, reply }).await?;
            rx
        };
        Self::wait(reply).await?;
        self.shared.write_state().vote = Some(vote);
        Ok(())
    }

    /// Remembers the committed log id (see the module documentation).
    async fn set_committed(&self, committed: Option<LogId>) -> Result<(), LogStoreError> {
        self.shared.check_writable()?;
        let _order = self.order.lock().await;
        self.shared.write_state().committed = committed;
        match committed {
            Some(log_id) => self.send(Op::Committed(log_id)).await,
            None => Ok(()),
        }
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
        let pieces = self.shared.read_state().plan(start, end, budget);
        let mut entries = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Cached(cached) => entries.extend(cached),
                Piece::Disk {
                    seg,
                    first_index,
                    locs,
                } => entries.extend(seg.read_entries(first_index, &locs)?),
            }
        }
        Ok(entries)
    }
}
