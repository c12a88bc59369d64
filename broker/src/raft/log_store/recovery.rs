//! Recovery at open: rebuilds every group's in-memory index from the segment files.
//!
//! Owns: scanning every segment in order, checking each record's CRC and that segment
//! numbers are consecutive; replaying the records onto each group's state (entries must
//! continue their group's log, truncate cuts, purge drops a prefix, the last vote and
//! committed hint win, drop forgets the group); cutting a torn tail off the last segment
//! (with a warning), or a recycled file's old contents (which read as the end: their
//! records name another segment); refusing to open on damage anywhere else; deleting the
//! oldest segments that hold nothing live and the spares beyond the writer's bound;
//! checking the directory's format (and creating the format file of a new log); and, in
//! the test-only power-loss mode, first throwing away everything written after the last
//! fsync (per `durable.manifest`).
//! Must not: run while a writer thread owns the directory, or "repair" damage that is
//! not a torn tail: a bad record followed by a valid one, or a bad record in an older
//! segment, is [`LogStoreError::Corrupt`].
//!
//! Limit of the rule: on a real power cut the disk may persist a later page of the last,
//! never-acknowledged batch without an earlier one. That looks like damage followed by an
//! intact record and refuses the open (the operator moves the directory away and the node
//! rejoins): a false alarm, never a silent loss. The writer narrows it: it fsyncs before
//! it starts a new segment.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::LogStoreError;
use super::format::{self, LogKey};
use super::group::Recovered;
use super::record::{self, Fault, Header, Kind, HEADER_LEN};
use super::segment::{self, Loc, Segment};
use super::writer::SPARE_SEGMENTS_MAX;
use super::{meta, LogStoreConfig, Stats};
use crate::raft::{GroupId, LogId};

/// What the open found.
pub(super) struct Loaded {
    /// Every segment kept, in order, with its valid length.
    pub segments: Vec<(Arc<Segment>, u64)>,
    /// Every group with any state on disk.
    pub groups: BTreeMap<GroupId, Recovered>,
    /// Retired files kept for recycling (at most [`SPARE_SEGMENTS_MAX`]).
    pub spares: Vec<PathBuf>,
    /// The directory's log key.
    pub key: LogKey,
}

/// A group while its records are replayed.
#[derive(Default)]
struct Replay {
    first_index: u64,
    locs: VecDeque<Loc>,
    /// Term of the last live entry (0 after a truncate: unknown until the next entry).
    last_term: u64,
    last_purged: Option<LogId>,
    vote: Option<crate::raft::Vote>,
    committed: Option<LogId>,
}

pub(super) fn recover(config: &LogStoreConfig, stats: &Stats) -> Result<Loaded, LogStoreError> {
    let dir = config.dir.as_path();
    let existed = dir.exists();
    std::fs::create_dir_all(dir).map_err(|e| LogStoreError::io("create directory", dir, e))?;
    if !existed {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            meta::sync_dir(parent, stats)?;
        }
    }
    remove_temp_files(dir)?;
    let key = format::open_or_create(dir, !segment::list(dir)?.is_empty(), stats)?;
    if config.simulate_power_loss {
        apply_manifest(dir, stats)?;
    }
    let mut spares = Vec::new();
    for (_, path) in segment::list_spares(dir)? {
        if spares.len() < SPARE_SEGMENTS_MAX {
            spares.push(path);
        } else {
            remove(&path)?;
        }
    }

    let files = segment::list(dir)?;
    let mut groups: BTreeMap<GroupId, Replay> = BTreeMap::new();
    let mut segments: Vec<(Arc<Segment>, u64)> = Vec::new();
    let count = files.len();
    let mut expected_seq = None;
    for (i, (seq, path)) in files.into_iter().enumerate() {
        let is_last = i + 1 == count;
        if let Some(expected) = expected_seq {
            if seq != expected {
                return Err(LogStoreError::Corrupt {
                    file: path,
                    offset: 0,
                    group: 0,
                    index: 0,
                    reason: format!(
                        "segment {seq} follows segment {}: segment {expected} is missing",
                        expected - 1
                    ),
                });
            }
        }
        expected_seq = Some(seq + 1);
        let (file, bytes) = read_segment(&path)?;
        let seg = Arc::new(Segment::opened(path.clone(), seq, file, key));
        let valid_len = replay_segment(&seg, &bytes, is_last, &mut groups)?;
        if valid_len < bytes.len() as u64 {
            let tail = bytes.get(valid_len as usize..).unwrap_or_default();
            if record::header(tail).is_some_and(|h| h.segment != seq) {
                tracing::debug!(
                    file = %path.display(),
                    offset = valid_len,
                    "cutting a recycled segment's old contents after its last record"
                );
            } else {
                tracing::warn!(
                    file = %path.display(),
                    offset = valid_len,
                    dropped_bytes = bytes.len() as u64 - valid_len,
                    "cutting a torn tail off the Raft log (a write interrupted by a crash; it was never acknowledged)"
                );
            }
            let file = seg.file().ok_or_else(|| {
                LogStoreError::io("truncate", &path, std::io::ErrorKind::NotFound.into())
            })?;
            file.set_len(valid_len)
                .map_err(|e| LogStoreError::io("truncate torn tail of", &path, e))?;
            meta::fsync(file, &path, true, stats)?;
        }
        if valid_len == 0 {
            if !is_last {
                return Err(LogStoreError::Corrupt {
                    file: path,
                    offset: 0,
                    group: 0,
                    index: 0,
                    reason: "this segment holds no record but later segments exist".into(),
                });
            }
            remove(&path)?;
            continue;
        }
        segments.push((seg, valid_len));
    }

    // Delete the oldest segments that hold nothing live (a crash came between a purge
    // and their deletion); every later segment starts with every group's state.
    let mut live: BTreeMap<u64, u64> = BTreeMap::new();
    for replay in groups.values() {
        for loc in &replay.locs {
            *live.entry(loc.seg).or_default() += 1;
        }
    }
    while segments.len() >= 2 && !live.contains_key(&segments[0].0.seq) {
        let (seg, _) = segments.remove(0);
        tracing::info!(file = %seg.path.display(), "deleting a retired Raft log segment");
        remove(&seg.path)?;
    }

    let by_seq: BTreeMap<u64, Arc<Segment>> =
        segments.iter().map(|(s, _)| (s.seq, s.clone())).collect();
    let mut recovered = BTreeMap::new();
    for (group, replay) in groups {
        recovered.insert(group, finish(group, replay, &by_seq)?);
    }
    if config.simulate_power_loss {
        let lengths = segments.iter().map(|(s, len)| (s.seq, *len)).collect();
        meta::write_atomic(dir, meta::MANIFEST, &meta::encode_manifest(&lengths), stats)?;
    }
    Ok(Loaded {
        segments,
        groups: recovered,
        spares,
        key,
    })
}

/// Turns a replayed group into its recovered state: the last log id is read back from
/// the last live entry (CRC-checked), and the committed hint is clamped to the log.
fn finish(
    group: GroupId,
    replay: Replay,
    segments: &BTreeMap<u64, Arc<Segment>>,
) -> Result<Recovered, LogStoreError> {
    let last_log_id = match replay.locs.back() {
        Some(loc) => {
            let index = replay.first_index + replay.locs.len() as u64 - 1;
            let seg = segments.get(&loc.seg).ok_or(LogStoreError::Corrupt {
                file: PathBuf::from(segment::file_name(loc.seg)),
                offset: loc.offset,
                group,
                index,
                reason: "the segment holding the group's last entry is gone".into(),
            })?;
            let entries = seg.read_entries(group, index, &[*loc])?;
            entries.first().map(|e| e.log_id)
        }
        None => replay.last_purged,
    };
    // A committed id beyond the recovered log (it is a hint, written without waiting
    // for its fsync) is clamped.
    let committed = match (replay.committed, last_log_id) {
        (Some(c), Some(last)) if c.index > last.index => Some(last),
        (Some(_), None) => None,
        (c, _) => c,
    };
    let live_bytes = replay.locs.iter().map(|l| u64::from(l.len)).sum();
    Ok(Recovered {
        first_index: replay.first_index,
        locs: replay.locs,
        live_bytes,
        last_log_id,
        last_purged: replay.last_purged,
        vote: replay.vote,
        committed,
    })
}

/// Replays one segment's records onto `groups`; returns the length of its valid part
/// (shorter than the file only for a torn tail of the last segment).
fn replay_segment(
    seg: &Segment,
    bytes: &[u8],
    is_last: bool,
    groups: &mut BTreeMap<GroupId, Replay>,
) -> Result<u64, LogStoreError> {
    let mut offset = 0usize;
    while offset < bytes.len() {
        let (header, body) = match record::check(&bytes[offset..], seg.seq, seg.key) {
            Ok(checked) => checked,
            Err(fault) => {
                let torn = is_last
                    && !matches!(fault, Fault::UnknownKind { .. })
                    && !valid_record_follows(bytes, offset, seg);
                if torn {
                    return Ok(offset as u64);
                }
                let header = record::header(&bytes[offset..]);
                return Err(LogStoreError::Corrupt {
                    file: seg.path.clone(),
                    offset: offset as u64,
                    group: header.map_or(0, |h| h.group),
                    index: header.map_or(0, |h| h.index),
                    reason: if is_last {
                        format!("{fault}, and an intact record follows")
                    } else {
                        format!("{fault}, in a segment that is not the last")
                    },
                });
            }
        };
        let loc = Loc {
            seg: seg.seq,
            offset: offset as u64,
            len: header.record_len() as u32,
        };
        apply(&header, body, loc, groups)
            .map_err(|fault| seg.corrupt(offset as u64, header.group, header.index, &fault))?;
        offset += header.record_len();
    }
    Ok(offset as u64)
}

/// Applies one checked record to its group.
fn apply(
    header: &Header,
    body: &[u8],
    loc: Loc,
    groups: &mut BTreeMap<GroupId, Replay>,
) -> Result<(), Fault> {
    let Some(kind) = header.kind() else {
        return Err(Fault::UnknownKind { kind: header.kind });
    };
    if kind == Kind::Drop {
        groups.remove(&header.group);
        return Ok(());
    }
    let g = groups.entry(header.group).or_default();
    match kind {
        Kind::Entry => {
            let index = header.index;
            if g.locs.is_empty() {
                if g.last_purged.is_some_and(|p| index <= p.index) {
                    return Err(Fault::BadBody(format!(
                        "entry {index} is at or below the group's purge point {}",
                        g.last_purged.map_or(0, |p| p.index)
                    )));
                }
                g.first_index = index;
            } else {
                let expected = g.first_index + g.locs.len() as u64;
                if index != expected {
                    return Err(Fault::BadBody(format!(
                        "entry {index} where the group's log continues at {expected}"
                    )));
                }
                if header.term < g.last_term {
                    return Err(Fault::BadBody(format!(
                        "entry {index} has term {}, below the previous entry's term {}",
                        header.term, g.last_term
                    )));
                }
            }
            g.last_term = header.term;
            g.locs.push_back(loc);
        }
        Kind::Truncate => {
            let from = header.index.max(g.first_index);
            let keep = usize::try_from(from - g.first_index).unwrap_or(usize::MAX);
            if keep < g.locs.len() {
                g.locs.truncate(keep);
                g.last_term = 0;
            }
        }
        Kind::Purge => {
            let purged = record::decode_log_id(body)?;
            if g.last_purged.is_none_or(|p| purged.index > p.index) {
                g.last_purged = Some(purged);
                let upto = purged.index;
                let last = g.first_index + g.locs.len() as u64;
                if g.locs.is_empty() || upto + 1 >= last {
                    g.locs.clear();
                    g.first_index = upto.saturating_add(1);
                } else if upto >= g.first_index {
                    let n = usize::try_from(upto - g.first_index + 1).unwrap_or(usize::MAX);
                    g.locs.drain(..n);
                    g.first_index = upto + 1;
                }
            }
        }
        Kind::Vote => g.vote = Some(record::decode_vote(body)?),
        Kind::Committed => g.committed = Some(record::decode_log_id(body)?),
        Kind::Drop => {}
    }
    Ok(())
}

/// Whether an intact record of `seg` starts anywhere after `offset` (then the damage at
/// `offset` is not a torn tail). Only offsets whose segment field names `seg` are
/// CRC-checked, so a recycled file's old contents (tens of MiB) are scanned quickly.
fn valid_record_follows(bytes: &[u8], offset: usize, seg: &Segment) -> bool {
    (offset + 1..=bytes.len().saturating_sub(HEADER_LEN)).any(|at| {
        let rest = &bytes[at..];
        record::header(rest).is_some_and(|h| {
            h.segment == seg.seq
                && h.body_len <= record::MAX_BODY_BYTES
                && h.record_len() <= rest.len()
                && record::check(rest, seg.seq, seg.key).is_ok()
        })
    })
}

fn read_segment(path: &Path) -> Result<(File, Vec<u8>), LogStoreError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| LogStoreError::io("open segment", path, e))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| LogStoreError::io("read segment", path, e))?;
    Ok((file, bytes))
}

fn remove(path: &Path) -> Result<(), LogStoreError> {
    std::fs::remove_file(path).map_err(|e| LogStoreError::io("delete", path, e))
}

fn remove_temp_files(dir: &Path) -> Result<(), LogStoreError> {
    let entries = std::fs::read_dir(dir).map_err(|e| LogStoreError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| LogStoreError::io("list", dir, e))?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(meta::TMP_SUFFIX))
        {
            remove(&entry.path())?;
        }
    }
    Ok(())
}

fn apply_manifest(dir: &Path, stats: &Stats) -> Result<(), LogStoreError> {
    let manifest = meta::read_manifest(dir)?.unwrap_or_default();
    for (seq, path) in segment::list(dir)? {
        match manifest.get(&seq) {
            Some(&durable) => {
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| LogStoreError::io("open segment", &path, e))?;
                let len = file
                    .metadata()
                    .map_err(|e| LogStoreError::io("stat segment", &path, e))?
                    .len();
                if len > durable {
                    tracing::warn!(file = %path.display(), len, durable, "power-loss simulation: dropping bytes written after the last fsync");
                    file.set_len(durable)
                        .map_err(|e| LogStoreError::io("truncate segment", &path, e))?;
                    meta::fsync(&file, &path, true, stats)?;
                }
            }
            None => {
                tracing::warn!(file = %path.display(), "power-loss simulation: deleting a segment never fsync'ed");
                remove(&path)?;
            }
        }
    }
    meta::sync_dir(dir, stats)
}
