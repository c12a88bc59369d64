//! Segment files of the shared log: their names, listing them, and positioned,
//! CRC-checked reads.
//!
//! Owns: the [`Segment`] handle shared by the writer thread (which creates the file and
//! writes it) and readers (which `pread` it), the file-name schemes
//! `<segment number, 20 digits>.wal` and, for retired files kept to be recycled,
//! `<former segment number, 20 digits>.spare`, and turning record bytes read back into
//! entries.
//! Must not: write, truncate or delete files (only [`super::writer`] and
//! [`super::recovery`] do), or return an entry whose record failed its CRC or belongs
//! to another group or index than asked.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::error::LogStoreError;
use super::format::LogKey;
use super::record::{self, Fault, Kind};
use crate::raft::{Entry, GroupId};

/// File-name suffix of a segment.
const SUFFIX: &str = ".wal";

/// File-name suffix of a retired segment file kept for recycling.
const SPARE_SUFFIX: &str = ".spare";

/// Digits of the segment number in a file name (zero-padded, so names sort in order).
const NAME_DIGITS: usize = 20;

/// Where one record lives: its segment, byte offset and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loc {
    /// The segment's number.
    pub seg: u64,
    /// Byte offset of the record in the segment.
    pub offset: u64,
    /// Record length (header + body).
    pub len: u32,
}

impl Loc {
    /// One past the record's last byte.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// One segment file. The file is opened (or created) once and kept open: readers and the
/// writer share the descriptor; positioned I/O needs no seek, so no lock.
#[derive(Debug)]
pub(super) struct Segment {
    /// The segment's number (its file name): segments are numbered 1, 2, 3, … in the
    /// order they were started.
    pub seq: u64,
    /// Its path.
    pub path: PathBuf,
    /// The log's key (records check against it).
    pub key: LogKey,
    file: OnceLock<File>,
}

impl Segment {
    /// A segment that does not exist yet (the writer creates it on its first write).
    pub fn new(dir: &Path, seq: u64, key: LogKey) -> Self {
        Segment {
            seq,
            path: dir.join(file_name(seq)),
            key,
            file: OnceLock::new(),
        }
    }

    /// A segment found on disk at open, with its file already open.
    pub fn opened(path: PathBuf, seq: u64, file: File, key: LogKey) -> Self {
        let cell = OnceLock::new();
        let _ = cell.set(file);
        Segment {
            seq,
            path,
            key,
            file: cell,
        }
    }

    /// The open file, if it exists yet.
    pub fn file(&self) -> Option<&File> {
        self.file.get()
    }

    /// Creates the file (writer thread only), from the retired file `spare` when one is
    /// given: renamed into place and kept as it is, so appends overwrite its old records
    /// (which no longer check: their segment field is another) instead of growing a new
    /// file. The caller fsyncs the directory before the segment's records count.
    pub fn create(&self, spare: Option<&Path>) -> Result<&File, LogStoreError> {
        if let Some(file) = self.file.get() {
            return Ok(file);
        }
        let recycled = spare.is_some_and(|spare| match std::fs::rename(spare, &self.path) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(file = %spare.display(), error = %e, "cannot recycle a retired log segment; creating a new file");
                false
            }
        });
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(!recycled)
            .open(&self.path)
            .map_err(|e| LogStoreError::io("create segment", &self.path, e))?;
        let _ = self.file.set(file);
        self.file.get().ok_or_else(|| {
            LogStoreError::io(
                "open segment",
                &self.path,
                std::io::ErrorKind::NotFound.into(),
            )
        })
    }

    /// A corruption error at `offset` of this segment.
    pub fn corrupt(&self, offset: u64, group: GroupId, index: u64, fault: &Fault) -> LogStoreError {
        LogStoreError::Corrupt {
            file: self.path.clone(),
            offset,
            group,
            index,
            reason: fault.to_string(),
        }
    }

    fn read_span(&self, offset: u64, len: u64) -> Result<Vec<u8>, LogStoreError> {
        let file = self.file().ok_or_else(|| {
            LogStoreError::io(
                "read segment",
                &self.path,
                std::io::ErrorKind::NotFound.into(),
            )
        })?;
        let len = usize::try_from(len).map_err(|_| {
            LogStoreError::io(
                "read segment",
                &self.path,
                std::io::ErrorKind::InvalidInput.into(),
            )
        })?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| LogStoreError::io("read segment", &self.path, e))?;
        Ok(buf)
    }

    /// Reads the entries of `group` at `first_index`, `first_index + 1`, … from `locs`
    /// (all in this segment, in offset order) with one read of the span they cover,
    /// checking each record's CRC, group, kind and index.
    pub fn read_entries(
        &self,
        group: GroupId,
        first_index: u64,
        locs: &[Loc],
    ) -> Result<Vec<Entry>, LogStoreError> {
        let (Some(first), Some(last)) = (locs.first(), locs.last()) else {
            return Ok(Vec::new());
        };
        let buf = self.read_span(first.offset, last.end().saturating_sub(first.offset))?;
        let mut entries = Vec::with_capacity(locs.len());
        for (index, loc) in (first_index..).zip(locs) {
            let start =
                usize::try_from(loc.offset.saturating_sub(first.offset)).unwrap_or(usize::MAX);
            let bytes = buf.get(start..).unwrap_or_default();
            let entry = record::check(bytes, self.seq, self.key)
                .and_then(|(header, body)| {
                    if header.record_len() != loc.len as usize {
                        return Err(Fault::Incomplete {
                            have: header.record_len(),
                            need: loc.len as usize,
                        });
                    }
                    if header.kind() != Some(Kind::Entry)
                        || header.group != group
                        || header.index != index
                    {
                        return Err(Fault::BadBody(format!(
                            "expected entry {index} of group {group}, found a record of kind {} for group {} index {}",
                            header.kind, header.group, header.index
                        )));
                    }
                    record::decode_entry(&header, body)
                })
                .map_err(|fault| self.corrupt(loc.offset, group, index, &fault))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

/// The file name of segment `seq`.
pub(super) fn file_name(seq: u64) -> String {
    format!("{seq:0width$}{SUFFIX}", width = NAME_DIGITS)
}

/// The segment number of a segment file name, or `None` for any other name.
#[cfg(test)]
fn parse_name(name: &str) -> Option<u64> {
    parse_with(name, SUFFIX)
}

fn parse_with(name: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_suffix(suffix)?;
    if digits.len() != NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The name a retired segment `seq` has while it waits to be recycled.
pub(super) fn spare_name(seq: u64) -> String {
    format!("{seq:0width$}{SPARE_SUFFIX}", width = NAME_DIGITS)
}

/// The segment files in `dir`, by number.
pub(super) fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogStoreError> {
    list_by(dir, SUFFIX)
}

/// The spare files in `dir`, by former segment number.
pub(super) fn list_spares(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogStoreError> {
    list_by(dir, SPARE_SUFFIX)
}

fn list_by(dir: &Path, suffix: &str) -> Result<Vec<(u64, PathBuf)>, LogStoreError> {
    let entries = std::fs::read_dir(dir).map_err(|e| LogStoreError::io("list", dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LogStoreError::io("list", dir, e))?;
        let name = entry.file_name();
        if let Some(seq) = name.to_str().and_then(|name| parse_with(name, suffix)) {
            files.push((seq, entry.path()));
        }
    }
    files.sort_by_key(|(seq, _)| *seq);
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(file_name(42), "00000000000000000042.wal");
        assert_eq!(parse_name(&file_name(42)), Some(42));
        assert_eq!(parse_name(&file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_name("42.wal"), None);
        assert_eq!(parse_name("0000000000000000004x.wal"), None);
        assert_eq!(parse_name("00000000000000000042.wal.tmp"), None);
        assert_eq!(parse_name("00000000000000000042.log"), None);
        assert_eq!(parse_name(&spare_name(42)), None);
        assert_eq!(parse_with(&spare_name(42), SPARE_SUFFIX), Some(42));
    }
}
