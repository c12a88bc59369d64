//! Recovery at open: rebuilds the in-memory index from the segment files.
//!
//! Owns: scanning every segment in order, checking each record's CRC and the index
//! sequence within and across segments; cutting a torn tail off the last segment (with a
//! warning); refusing to open on corruption anywhere else; deleting segments that hold only
//! purged entries; and, in the test-only power-loss mode, first throwing away everything
//! written after the last fsync (per `durable.manifest`).
//! Must not: run while a writer thread owns the directory, or "repair" corruption that is
//! not a torn tail: a bad record followed by a valid one, or a bad record in an older
//! segment, is [`LogStoreError::Corrupt`].
//!
//! Limit of the rule: on a real power cut the disk may persist a later page of the last,
//! never-acknowledged batch without an earlier one. That looks like damage followed by an
//! intact record and refuses the open (the operator moves the directory away and the node
//! rejoins): a false alarm, never a silent loss. The writer narrows it: it fsyncs before
//! it starts a new segment and right after a truncate.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use super::error::LogStoreError;
use super::record::{self, Fault, Header, HEADER_LEN};
use super::segment::{self, Loc, Segment};
use super::state::Loaded;
use super::{meta, LogStoreConfig, Stats};

/// Recovers the log in `config.dir` (creating the directory when missing).
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
    if config.simulate_power_loss {
        apply_manifest(dir, stats)?;
    }
    let last_purged = meta::read_log_id(dir, meta::PURGED)?;
    let vote = meta::read_vote(dir)?;
    let committed = match meta::read_log_id(dir, meta::COMMITTED) {
        Ok(committed) => committed,
        // Written in place without fsync: a torn write only loses a hint.
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the committed log id");
            None
        }
    };
    let purged_index = last_purged.map(|p| p.index);

    let mut files = segment::list(dir)?;
    // Segments whose entries are all purged (a crash came between persisting the purged
    // id and deleting them): the next segment starts at or before `purged + 1`.
    while files.len() >= 2 && purged_index.is_some_and(|p| files[1].0 <= p.saturating_add(1)) {
        let (_, path) = files.remove(0);
        tracing::info!(file = %path.display(), "deleting a wholly purged Raft log segment");
        remove(&path)?;
    }

    let mut segments = Vec::new();
    let mut locs = VecDeque::new();
    let mut first_live = None;
    let mut last_live: Option<(Header, Vec<u8>)> = None;
    let mut expected = files.first().map_or(0, |(first, _)| *first);
    let mut last_term = 0;
    let count = files.len();
    for (i, (first, path)) in files.into_iter().enumerate() {
        let is_last = i + 1 == count;
        if first != expected {
            return Err(LogStoreError::Corrupt {
                file: path,
                offset: 0,
                index: expected,
                reason: format!(
                    "this segment starts at log index {first} but the previous one ends at {}: a segment file is missing or misnamed",
                    expected.saturating_sub(1)
                ),
            });
        }
        let (file, bytes) = read_segment(&path)?;
        let scan = scan(&path, &bytes, first, purged_index, is_last, last_term)?;
        last_term = scan.last_term;
        if let Some((offset, fault)) = &scan.torn {
            tracing::warn!(
                file = %path.display(),
                offset,
                index = scan.next_index,
                %fault,
                dropped_bytes = bytes.len() as u64 - offset,
                "cutting a torn tail off the Raft log (a write interrupted by a crash; it was never acknowledged)"
            );
            file.set_len(*offset)
                .map_err(|e| LogStoreError::io("truncate torn tail of", &path, e))?;
            meta::fsync(&file, &path, true, stats)?;
        }
        if scan.valid_len == 0 {
            if !is_last {
                return Err(LogStoreError::Corrupt {
                    file: path,
                    offset: 0,
                    index: first,
                    reason: "this segment holds no record but later segments exist".into(),
                });
            }
            remove(&path)?;
            continue;
        }
        if scan.live.is_empty() && is_last {
            // Only purged entries: the log restarts after the purged id.
            remove(&path)?;
            continue;
        }
        if first_live.is_none() {
            first_live = scan.live.first().map(|(index, _)| *index);
        }
        locs.extend(scan.live.iter().map(|(_, loc)| *loc));
        if let Some((header, offset)) = scan.last_live {
            let start = offset as usize;
            let body = bytes
                .get(start + HEADER_LEN..start + header.record_len())
                .unwrap_or_default()
                .to_vec();
            last_live = Some((header, body));
        }
        expected = scan.next_index;
        segments.push((Arc::new(Segment::opened(path, first, file)), scan.valid_len));
    }

    let last_log_id = match (&last_live, &segments.last()) {
        (Some((header, body)), Some((seg, _))) => Some(
            record::decode(header, body)
                .map_err(|fault| {
                    let offset = locs.back().map_or(0, |l: &Loc| l.offset);
                    seg.corrupt(offset, header.index, &fault)
                })?
                .log_id,
        ),
        _ => last_purged,
    };
    let first_index = first_live.unwrap_or_else(|| purged_index.map_or(0, |p| p.saturating_add(1)));
    // A committed id beyond the recovered log (it is written without fsync) is clamped.
    let committed = match (committed, last_log_id) {
        (Some(c), Some(last)) if c.index > last.index => Some(last),
        (Some(_), None) => None,
        (c, _) => c,
    };
    if config.simulate_power_loss {
        let lengths = segments.iter().map(|(s, len)| (s.first, *len)).collect();
        meta::write_atomic(dir, meta::MANIFEST, &meta::encode_manifest(&lengths), stats)?;
    }
    Ok(Loaded {
        segments,
        first_index,
        locs,
        last_log_id,
        last_purged,
        vote,
        committed,
    })
}

/// What scanning one segment found.
struct Scan {
    /// Live (unpurged) records: index and place.
    live: Vec<(u64, Loc)>,
    /// The last live record's header and offset.
    last_live: Option<(Header, u64)>,
    /// The index after the last valid record.
    next_index: u64,
    /// Bytes of valid records.
    valid_len: u64,
    /// Where a torn tail starts, and what is wrong there.
    torn: Option<(u64, Fault)>,
    /// The term of the last valid record (or the one passed in).
    last_term: u64,
}

/// Scans one segment. `last_term` is the term of the previous segment's last record.
fn scan(
    path: &Path,
    bytes: &[u8],
    first: u64,
    purged: Option<u64>,
    is_last: bool,
    mut last_term: u64,
) -> Result<Scan, LogStoreError> {
    let mut scan = Scan {
        live: Vec::new(),
        last_live: None,
        next_index: first,
        valid_len: 0,
        torn: None,
        last_term,
    };
    let mut offset = 0usize;
    while offset < bytes.len() {
        let index = scan.next_index;
        let checked = record::check_at(&bytes[offset..], index).and_then(|(header, body)| {
            if header.term < last_term {
                return Err(Fault::TermDecreases {
                    previous: last_term,
                    found: header.term,
                });
            }
            Ok((header, body))
        });
        match checked {
            Ok((header, _)) => {
                last_term = header.term;
                scan.last_term = header.term;
                let len = header.record_len();
                if purged.is_none_or(|p| index > p) {
                    scan.live.push((
                        index,
                        Loc {
                            offset: offset as u64,
                            len: len as u32,
                        },
                    ));
                    scan.last_live = Some((header, offset as u64));
                }
                offset += len;
                scan.next_index += 1;
                scan.valid_len = offset as u64;
            }
            Err(fault) => {
                let intact = matches!(
                    fault,
                    Fault::WrongIndex { .. } | Fault::TermDecreases { .. }
                );
                let torn = is_last && !intact && !valid_record_follows(bytes, offset, index);
                if torn {
                    scan.torn = Some((offset as u64, fault));
                    break;
                }
                return Err(LogStoreError::Corrupt {
                    file: path.to_path_buf(),
                    offset: offset as u64,
                    index,
                    reason: if is_last {
                        format!("{fault}, and an intact record follows")
                    } else {
                        format!("{fault}, in a segment that is not the last")
                    },
                });
            }
        }
    }
    Ok(scan)
}

/// Whether an intact record for a plausible later index starts anywhere after `offset`:
/// then the bad record at `offset` is damage, not an interrupted write.
fn valid_record_follows(bytes: &[u8], offset: usize, index: u64) -> bool {
    let max_records = (bytes.len() - offset) as u64 / HEADER_LEN as u64 + 1;
    (offset + 1..=bytes.len().saturating_sub(HEADER_LEN)).any(|at| {
        let rest = &bytes[at..];
        record::header(rest).is_some_and(|h| {
            h.index >= index
                && h.index - index <= max_records
                && h.body_len <= record::MAX_BODY_BYTES
                && h.record_len() <= rest.len()
                && record::check(rest).is_ok()
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

/// Deletes temp files of interrupted atomic replaces (the real file is intact).
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

/// Test-only power-loss simulation: cuts every segment to its length in the manifest and
/// deletes segments it does not list (with no manifest, nothing was ever fsync'ed).
fn apply_manifest(dir: &Path, stats: &Stats) -> Result<(), LogStoreError> {
    let manifest = meta::read_manifest(dir)?.unwrap_or_default();
    for (first, path) in segment::list(dir)? {
        match manifest.get(&first) {
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
