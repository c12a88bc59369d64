//! The writer thread ("herald-log-writer"): the only code that writes, truncates or deletes
//! segment files, and writes the vote, purged, committed and manifest files.
//!
//! Owns: group commit. It takes every operation queued (up to [`MAX_BATCH_OPS`]), executes
//! them in queue order, calls one `fdatasync` per dirty segment for the whole batch (plus a
//! directory fsync when names changed), and only then completes each operation in order:
//! `LogFlushed::log_io_completed(Ok(()))` for appends, the reply for truncate/purge/vote.
//! On an I/O error every operation of the batch, and every later one, fails: the store
//! can no longer say what is durable, so the node must stop.
//! Must not: complete an append before its bytes are fsync'ed; reorder operations (openraft
//! requires all log and vote I/O to be serialized); decide offsets (the appenders did).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::storage::LogFlushed;
use tokio::sync::{mpsc, oneshot};

use super::error::LogStoreError;
use super::meta;
use super::segment::Segment;
use super::state::{Chunk, TruncatePlan};
use super::Shared;
use crate::raft::{LogId, TypeConfig, Vote};

/// Bound: how many queued operations one batch takes at most; the rest wait for the next
/// batch (bounds the latency of the first operation in a long queue).
pub(super) const MAX_BATCH_OPS: usize = 4096;

/// The reply to an operation that waits for completion.
pub(super) type Reply = oneshot::Sender<Result<(), LogStoreError>>;

/// One queued operation.
pub(super) enum Op {
    /// Write placed records; call `callback` once they are durable.
    Append {
        /// The bytes and where they go.
        chunks: Vec<Chunk>,
        /// Segments to delete first (they hold only purged entries).
        drop: Vec<Arc<Segment>>,
        /// The append's sequence number (see [`super::state::State::mark_written`]).
        seq: u64,
        /// How many entries it carries.
        entries: u64,
        /// Told once the entries are durable (openraft's callback, or a reply).
        done: Completion,
    },
    /// Cut the log (see [`super::state::State::truncate`]).
    Truncate {
        /// What to cut.
        plan: TruncatePlan,
        /// Completion.
        reply: Reply,
    },
    /// Persist the last purged log id, then delete wholly purged segments.
    Purge {
        /// The last purged log id.
        purged: LogId,
        /// Segments to delete.
        remove: Vec<Arc<Segment>>,
        /// Completion.
        reply: Reply,
    },
    /// Persist the vote (after everything queued before it is durable).
    Vote {
        /// The vote.
        vote: Vote,
        /// Completion.
        reply: Reply,
    },
    /// Remember the committed log id (written after the batch, without fsync).
    Committed(LogId),
}

/// How an operation's completion is told.
pub(super) enum Completion {
    /// openraft's append callback.
    Flushed(LogFlushed<TypeConfig>),
    /// A reply channel.
    Reply(Reply),
    /// Nobody waits.
    Nothing,
}

impl Completion {
    fn complete(self, result: &Result<(), LogStoreError>) {
        match self {
            Completion::Flushed(callback) => callback.log_io_completed(match result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::other(e.to_string())),
            }),
            Completion::Reply(reply) => {
                // The caller may have gone away (its task was cancelled); nothing to tell.
                let _ = reply.send(match result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(e.to_writer_failed()),
                });
            }
            Completion::Nothing => {}
        }
    }
}

/// The writer thread's state.
pub(super) struct Writer {
    dir: PathBuf,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Op>,
    /// Every segment file and the length written to it.
    segments: BTreeMap<u64, (Arc<Segment>, u64)>,
    /// Segments written since their last fsync.
    dirty: BTreeMap<u64, Arc<Segment>>,
    /// Names created, renamed or deleted since the last directory fsync.
    dir_dirty: bool,
    power_loss: bool,
    /// Segment lengths changed since the manifest was last written (power-loss mode).
    manifest_dirty: bool,
    committed_file: Option<File>,
}

impl Writer {
    /// A writer over the recovered `segments`.
    pub fn new(
        dir: PathBuf,
        shared: Arc<Shared>,
        rx: mpsc::Receiver<Op>,
        segments: Vec<(Arc<Segment>, u64)>,
        power_loss: bool,
    ) -> Self {
        Writer {
            dir,
            shared,
            rx,
            segments: segments
                .into_iter()
                .map(|(s, len)| (s.first, (s, len)))
                .collect(),
            dirty: BTreeMap::new(),
            dir_dirty: false,
            power_loss,
            manifest_dirty: false,
            committed_file: None,
        }
    }

    /// Starts the thread. It ends when every sender is dropped and the queue is drained.
    pub fn spawn(self) -> Result<(), LogStoreError> {
        let dir = self.dir.clone();
        std::thread::Builder::new()
            .name("herald-log-writer".into())
            .spawn(move || self.run())
            .map(|_| ())
            .map_err(|e| LogStoreError::io("start the writer thread for", dir, e))
    }

    fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_OPS {
                match self.rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.process(batch);
        }
        tracing::debug!(dir = %self.dir.display(), "log writer stopped");
    }

    fn process(&mut self, batch: Vec<Op>) {
        let mut result = match self.shared.failure() {
            Some(reason) => Err(LogStoreError::WriterFailed { reason }),
            None => Ok(()),
        };
        let mut completions = Vec::with_capacity(batch.len());
        let mut committed = None;
        let mut written_seq = None;
        let mut entries = 0;
        for op in batch {
            let completion = match op {
                Op::Append {
                    chunks,
                    drop,
                    seq,
                    entries: n,
                    done,
                } => {
                    if result.is_ok() {
                        result = self.append(drop, chunks);
                        written_seq = Some(seq);
                        entries += n;
                    }
                    done
                }
                Op::Truncate { plan, reply } => {
                    if result.is_ok() {
                        result = self.truncate(plan);
                    }
                    Completion::Reply(reply)
                }
                Op::Purge {
                    purged,
                    remove,
                    reply,
                } => {
                    if result.is_ok() {
                        result = self.purge(&purged, remove);
                    }
                    Completion::Reply(reply)
                }
                Op::Vote { vote, reply } => {
                    if result.is_ok() {
                        result = self.vote(&vote);
                    }
                    Completion::Reply(reply)
                }
                Op::Committed(log_id) => {
                    committed = Some(log_id);
                    Completion::Nothing
                }
            };
            completions.push(completion);
        }
        if result.is_ok() {
            if let Some(seq) = written_seq {
                self.shared.write_state().mark_written(seq);
            }
            result = self.sync();
        }
        if result.is_ok() && self.power_loss && self.manifest_dirty {
            result = self.write_manifest();
        }
        if result.is_ok() {
            self.shared.stats.add_appended(entries);
            if let Some(log_id) = committed {
                result = self.write_committed(&log_id);
            }
        }
        if let Err(e) = &result {
            if self.shared.failure().is_none() {
                tracing::error!(error = %e, "Raft log write failed; the log accepts no more writes");
                self.shared.set_failure(e.to_string());
            }
        }
        for completion in completions {
            completion.complete(&result);
        }
    }

    /// fsyncs every dirty segment, then the directory if names changed.
    fn sync(&mut self) -> Result<(), LogStoreError> {
        for seg in std::mem::take(&mut self.dirty).into_values() {
            if let Some(file) = seg.file() {
                meta::fsync(file, &seg.path, true, &self.shared.stats)?;
            }
        }
        if self.dir_dirty {
            meta::sync_dir(&self.dir, &self.shared.stats)?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    fn remove_segment(&mut self, seg: &Segment) -> Result<(), LogStoreError> {
        match std::fs::remove_file(&seg.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(LogStoreError::io("delete segment", &seg.path, e)),
        }
        self.segments.remove(&seg.first);
        self.dirty.remove(&seg.first);
        self.dir_dirty = true;
        self.manifest_dirty = true;
        Ok(())
    }

    fn append(&mut self, drop: Vec<Arc<Segment>>, chunks: Vec<Chunk>) -> Result<(), LogStoreError> {
        for seg in &drop {
            self.remove_segment(seg)?;
        }
        for chunk in chunks {
            if chunk.seg.file().is_none() {
                // A new segment: make the older ones durable first, so that a crash never
                // leaves an older segment torn behind a newer one with data.
                self.sync()?;
                self.dir_dirty = true;
            }
            let (file, _) = chunk.seg.create()?;
            file.write_all_at(&chunk.bytes, chunk.offset)
                .map_err(|e| LogStoreError::io("write segment", &chunk.seg.path, e))?;
            let end = chunk.offset + chunk.bytes.len() as u64;
            let first = chunk.seg.first;
            match self.segments.get_mut(&first) {
                Some((seg, len)) if Arc::ptr_eq(seg, &chunk.seg) => *len = (*len).max(end),
                _ => {
                    self.segments.insert(first, (chunk.seg.clone(), end));
                }
            }
            self.dirty.insert(first, chunk.seg);
            self.manifest_dirty = true;
        }
        Ok(())
    }

    fn truncate(&mut self, plan: TruncatePlan) -> Result<(), LogStoreError> {
        for seg in &plan.remove {
            self.remove_segment(seg)?;
        }
        if let Some((seg, len)) = plan.keep {
            let file = seg.file().ok_or_else(|| {
                LogStoreError::io(
                    "truncate segment",
                    &seg.path,
                    io::ErrorKind::NotFound.into(),
                )
            })?;
            file.set_len(len)
                .map_err(|e| LogStoreError::io("truncate segment", &seg.path, e))?;
            if let Some((_, written)) = self.segments.get_mut(&seg.first) {
                *written = len;
            }
            self.dirty.insert(seg.first, seg);
        }
        self.manifest_dirty = true;
        // Durable before later writes reuse the offsets: a crash must not leave new
        // records followed by stale ones the truncate removed.
        self.sync()
    }

    fn purge(&mut self, purged: &LogId, remove: Vec<Arc<Segment>>) -> Result<(), LogStoreError> {
        // The purged log id is durable before any segment goes: recovery must never see a
        // log that starts later than the purged id says.
        meta::write_atomic(
            &self.dir,
            meta::PURGED,
            &meta::encode_log_id(purged)?,
            &self.shared.stats,
        )?;
        for seg in &remove {
            self.remove_segment(seg)?;
        }
        Ok(())
    }

    fn vote(&mut self, vote: &Vote) -> Result<(), LogStoreError> {
        // Serialized with the log: what was queued before the vote is durable before it.
        self.sync()?;
        meta::write_atomic(
            &self.dir,
            meta::VOTE,
            &meta::encode_vote(vote)?,
            &self.shared.stats,
        )
    }

    fn write_committed(&mut self, log_id: &LogId) -> Result<(), LogStoreError> {
        let path = self.dir.join(meta::COMMITTED);
        if self.committed_file.is_none() {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| LogStoreError::io("open", &path, e))?;
            self.committed_file = Some(file);
        }
        let framed = meta::frame(&meta::encode_log_id(log_id)?);
        match &self.committed_file {
            Some(file) => file
                .write_all_at(&framed, 0)
                .map_err(|e| LogStoreError::io("write", &path, e)),
            None => Ok(()),
        }
    }

    /// Test-only power-loss simulation: records the durable length of every segment.
    fn write_manifest(&mut self) -> Result<(), LogStoreError> {
        let lengths: BTreeMap<u64, u64> = self
            .segments
            .iter()
            .map(|(first, (_, len))| (*first, *len))
            .collect();
        meta::write_atomic(
            &self.dir,
            meta::MANIFEST,
            &meta::encode_manifest(&lengths),
            &self.shared.stats,
        )?;
        self.manifest_dirty = false;
        Ok(())
    }
}
