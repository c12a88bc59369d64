//! The writer thread ("herald-log-writer"): the only code that writes or deletes segment
//! files and the test-only manifest.
//!
//! Owns: group commit for every Raft group of the node. It takes every operation queued
//! (up to [`MAX_BATCH_OPS`], from any group), writes their bytes in queue order, calls one
//! `fdatasync` per dirty segment for the whole batch (normally one: the active segment),
//! plus a directory fsync when a segment file was created, and only then completes each
//! operation in order: `LogFlushed::log_io_completed(Ok(()))` for appends, the reply for
//! truncate, purge, vote and drop. Segments the operations retired are deleted after the
//! fsync, never before the records that retire them are durable.
//!
//! Recycling: up to [`SPARE_SEGMENTS_MAX`] retired files are renamed to `*.spare`
//! instead of deleted, and the next new segment is a spare renamed into place. Appends
//! then overwrite blocks the file system has allocated already, so an `fdatasync` writes
//! the data alone; into a growing file it also writes the inode, a second I/O in series
//! (this disk's ext4 has no journal). The old contents read as the end of the log (their
//! records name another segment, see [`super::record`]). A segment that is no longer the
//! newest is cut to its written length (and fsync'ed) before the next one gets its first
//! byte, so only the newest segment can hold old bytes after its records.
//! A batch of hints only (committed hints: nobody waits, nothing to delete) is written
//! but not fsync'ed: the next batch's fsync covers its bytes. Without this every commit
//! cost each replica a second fsync, and an append queued behind that fsync waited for it.
//! On an I/O error every operation of the batch, and every later one, fails: the store
//! can no longer say what is durable, so the node must stop.
//! Must not: complete an operation someone waits for before its bytes are fsync'ed (a
//! hint's "completion" tells nobody); reorder operations
//! (openraft requires a group's log and vote I/O to be serialized, and the shared log's
//! offsets were assigned in queue order); decide offsets (the placement did).

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::storage::LogFlushed;
use tokio::sync::{mpsc, oneshot};

use super::error::LogStoreError;
use super::segment::{self, Segment};
use super::{meta, GroupLog, Shared};
use crate::raft::TypeConfig;

/// Bound: how many queued operations one batch takes at most; the rest wait for the next
/// batch (bounds the latency of the first operation in a long queue).
pub(super) const MAX_BATCH_OPS: usize = 4096;

/// Bound: retired segment files kept for recycling; further ones are deleted. Why two:
/// a roll needs one, and retirement frees them one or two at a time; more would only
/// hold disk space.
pub(super) const SPARE_SEGMENTS_MAX: usize = 2;

/// The reply to an operation that waits for completion.
pub(super) type Reply = oneshot::Sender<Result<(), LogStoreError>>;

/// Bytes to write at an offset of a segment.
#[derive(Debug)]
pub(super) struct Chunk {
    /// The segment (created by the writer on its first write).
    pub seg: Arc<Segment>,
    /// Where in the segment.
    pub offset: u64,
    /// The records.
    pub bytes: Vec<u8>,
}

/// One queued operation: records to write, segments to delete once they are durable,
/// and who to tell.
pub(super) struct Op {
    /// The bytes, in log order.
    pub chunks: Vec<Chunk>,
    /// Segments to delete after this batch's fsync (they hold nothing live).
    pub remove: Vec<Arc<Segment>>,
    /// An append: the group whose cache may let the entries go once written, and the
    /// append's sequence number.
    pub written: Option<(Arc<GroupLog>, u64)>,
    /// Entries the op carries (for the stats).
    pub entries: u64,
    /// Told once the op is durable.
    pub done: Completion,
}

impl Op {
    /// Nobody waits for it and it retires nothing: a committed hint.
    fn is_hint(&self) -> bool {
        matches!(self.done, Completion::Nothing) && self.remove.is_empty() && self.written.is_none()
    }
}

/// How an operation's completion is told.
pub(super) enum Completion {
    /// openraft's append callback.
    Flushed(LogFlushed<TypeConfig>),
    /// A reply channel.
    Reply(Reply),
    /// Nobody waits (the committed hint).
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
    lengths: BTreeMap<u64, u64>,
    /// Segments written since their last fsync.
    dirty: BTreeMap<u64, Arc<Segment>>,
    /// The segment written last.
    newest: Option<Arc<Segment>>,
    /// Retired files waiting to become new segments, by former number (at most
    /// [`SPARE_SEGMENTS_MAX`]).
    spares: Vec<PathBuf>,
    /// A segment file was created since the last directory fsync.
    dir_dirty: bool,
    power_loss: bool,
    /// Segment lengths changed since the manifest was last written (power-loss mode).
    manifest_dirty: bool,
}

impl Writer {
    pub fn new(
        dir: PathBuf,
        shared: Arc<Shared>,
        rx: mpsc::Receiver<Op>,
        lengths: BTreeMap<u64, u64>,
        spares: Vec<PathBuf>,
        power_loss: bool,
    ) -> Self {
        Writer {
            dir,
            shared,
            rx,
            lengths,
            dirty: BTreeMap::new(),
            newest: None,
            spares,
            dir_dirty: false,
            power_loss,
            manifest_dirty: false,
        }
    }

    /// Starts the thread; it ends once every sender is dropped and the queue is drained.
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
        // Hints written since the last fsync: durable on a clean stop too.
        if self.shared.failure().is_none() {
            if let Err(e) = self.sync() {
                tracing::warn!(error = %e, "cannot fsync the log's last committed hint at stop");
            }
        }
        tracing::debug!(dir = %self.dir.display(), "log writer stopped");
    }

    fn process(&mut self, batch: Vec<Op>) {
        let mut result = match self.shared.failure() {
            Some(reason) => Err(LogStoreError::WriterFailed { reason }),
            None => Ok(()),
        };
        let mut completions = Vec::with_capacity(batch.len());
        let mut remove = Vec::new();
        let mut written = Vec::new();
        let mut entries = 0;
        let hints_only = batch.iter().all(Op::is_hint);
        for op in batch {
            if result.is_ok() {
                result = self.write(op.chunks);
            }
            if result.is_ok() {
                entries += op.entries;
                remove.extend(op.remove);
                written.extend(op.written);
            }
            completions.push(op.done);
        }
        if result.is_ok() {
            // Written (not yet durable) is enough for readers: the cache may let go.
            let budget = self.shared.cache_budget();
            for (group, seq) in written {
                group.write_state().mark_written(seq, budget);
            }
            if hints_only {
                // Durable with the next fsync (a hint may be lost in a crash; recovery then
                // finds the previous one), and the manifest of power-loss mode stays at the
                // last fsync: a simulated crash loses these bytes too.
                for completion in completions {
                    completion.complete(&result);
                }
                return;
            }
            result = self.sync();
        }
        if result.is_ok() {
            for seg in &remove {
                self.remove_segment(seg);
            }
            if self.power_loss && self.manifest_dirty {
                result = self.write_manifest();
            }
        }
        if result.is_ok() {
            self.shared.stats.add_appended(entries);
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

    fn write(&mut self, chunks: Vec<Chunk>) -> Result<(), LogStoreError> {
        for chunk in chunks {
            let mut spare = None;
            if chunk.seg.file().is_none() {
                // A new segment: the previous one ends at its records, and the older
                // ones are durable first, so that a crash never leaves an older segment
                // torn (or with old bytes after its records) behind a newer one with data.
                if let Some(previous) = self.newest.take() {
                    self.cut_to_written(&previous)?;
                }
                self.sync()?;
                self.dir_dirty = true;
                spare = self.spares.pop();
            }
            let file = chunk.seg.create(spare.as_deref())?;
            file.write_all_at(&chunk.bytes, chunk.offset)
                .map_err(|e| LogStoreError::io("write segment", &chunk.seg.path, e))?;
            let end = chunk.offset + chunk.bytes.len() as u64;
            let len = self.lengths.entry(chunk.seg.seq).or_insert(0);
            *len = (*len).max(end);
            self.dirty.insert(chunk.seg.seq, chunk.seg.clone());
            self.newest = Some(chunk.seg);
            self.manifest_dirty = true;
        }
        Ok(())
    }

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

    /// Cuts a recycled segment that is no longer the newest to the length written to it,
    /// durably (its size changes, so a full fsync).
    fn cut_to_written(&mut self, seg: &Segment) -> Result<(), LogStoreError> {
        let (Some(file), Some(&written)) = (seg.file(), self.lengths.get(&seg.seq)) else {
            return Ok(());
        };
        let len = file
            .metadata()
            .map_err(|e| LogStoreError::io("stat segment", &seg.path, e))?
            .len();
        if len > written {
            file.set_len(written)
                .map_err(|e| LogStoreError::io("cut the old tail of", &seg.path, e))?;
            meta::fsync(file, &seg.path, false, &self.shared.stats)?;
        }
        Ok(())
    }

    /// Keeps a retired segment as a spare (renamed) or deletes it. A failure only leaves
    /// a dead file behind, which the next open deletes: it is logged, not fatal. Neither
    /// needs a directory fsync: if the rename or deletion is lost in a crash, the file is
    /// back as the oldest segment, holding nothing live, and the next open deletes it.
    fn remove_segment(&mut self, seg: &Segment) {
        let spare = self.dir.join(segment::spare_name(seg.seq));
        let kept = self.spares.len() < SPARE_SEGMENTS_MAX
            && match std::fs::rename(&seg.path, &spare) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(file = %seg.path.display(), error = %e, "cannot keep a retired log segment for recycling");
                    false
                }
            };
        if kept {
            self.spares.push(spare);
        } else {
            match std::fs::remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %seg.path.display(), error = %e, "cannot delete a retired log segment");
                }
            }
        }
        self.lengths.remove(&seg.seq);
        self.dirty.remove(&seg.seq);
        self.manifest_dirty = true;
    }

    fn write_manifest(&mut self) -> Result<(), LogStoreError> {
        meta::write_atomic(
            &self.dir,
            meta::MANIFEST,
            &meta::encode_manifest(&self.lengths),
            &self.shared.stats,
        )?;
        self.manifest_dirty = false;
        Ok(())
    }
}
