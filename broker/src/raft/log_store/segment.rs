//! Segment files: their names, listing them, and positioned, CRC-checked reads.
//!
//! Owns: the [`Segment`] handle shared by the writer thread (which creates the file and
//! writes it) and readers (which `pread` it), the file-name scheme
//! `<first index, 20 digits>.log`, and turning record bytes read back into entries.
//! Must not: write, truncate or delete files (only [`super::writer`] and
//! [`super::recovery`] do), or return an entry whose record failed its CRC.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::error::LogStoreError;
use super::record::{self, Fault};
use crate::raft::Entry;

/// The file-name suffix of a segment.
const SUFFIX: &str = ".log";

/// Digits in a segment's file name (the first index, zero padded).
const NAME_DIGITS: usize = 20;

/// Where one record sits in its segment. 16 bytes in memory (with padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loc {
    /// Byte offset of the record's header.
    pub offset: u64,
    /// The record's total length, header included (at most 24 B + 32 MiB).
    pub len: u32,
}

impl Loc {
    /// The offset just past the record.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// One segment file: `first` is the index of the first record it was created for.
#[derive(Debug)]
pub(super) struct Segment {
    /// Index of its first record (also its name).
    pub first: u64,
    /// Its path.
    pub path: PathBuf,
    /// The open file (read-write), shared by the writer and readers. Empty until the
    /// writer creates the file; a reader only looks up records the writer has written.
    file: OnceLock<File>,
}

impl Segment {
    /// A segment not yet on disk.
    pub fn new(dir: &Path, first: u64) -> Self {
        Segment {
            first,
            path: dir.join(file_name(first)),
            file: OnceLock::new(),
        }
    }

    /// A segment whose file exists and is open.
    pub fn opened(path: PathBuf, first: u64, file: File) -> Self {
        let cell = OnceLock::new();
        let _ = cell.set(file);
        Segment {
            first,
            path,
            file: cell,
        }
    }

    /// The open file, when it exists.
    pub fn file(&self) -> Option<&File> {
        self.file.get()
    }

    /// The open file, created (empty) first when it does not exist yet. Only the writer
    /// thread calls this. Returns whether it created the file.
    pub fn create(&self) -> Result<(&File, bool), LogStoreError> {
        if let Some(file) = self.file.get() {
            return Ok((file, false));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.path)
            .map_err(|e| LogStoreError::io("create segment", &self.path, e))?;
        let _ = self.file.set(file);
        self.file.get().map(|file| (file, true)).ok_or_else(|| {
            LogStoreError::io(
                "open segment",
                &self.path,
                std::io::ErrorKind::NotFound.into(),
            )
        })
    }

    /// The corruption error for the record at `offset`, expected to hold `index`.
    pub fn corrupt(&self, offset: u64, index: u64, fault: &Fault) -> LogStoreError {
        LogStoreError::Corrupt {
            file: self.path.clone(),
            offset,
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

    /// Reads the record `loc`, which holds `index`, checking its CRC.
    pub fn read_entry(&self, index: u64, loc: Loc) -> Result<Entry, LogStoreError> {
        let entries = self.read_entries(index, &[loc])?;
        <[Entry; 1]>::try_from(entries)
            .map(|[entry]| entry)
            .map_err(|_| {
                self.corrupt(
                    loc.offset,
                    index,
                    &Fault::BadBody("record not found".into()),
                )
            })
    }

    /// Reads the consecutive records `locs`, holding indexes `first_index..`, with one
    /// positioned read, checking each record's CRC and index.
    pub fn read_entries(
        &self,
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
            let entry = record::check_at(bytes, index)
                .and_then(|(header, body)| {
                    if header.record_len() != loc.len as usize {
                        return Err(Fault::Incomplete {
                            have: header.record_len(),
                            need: loc.len as usize,
                        });
                    }
                    record::decode(&header, body)
                })
                .map_err(|fault| self.corrupt(loc.offset, index, &fault))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

/// The file name of the segment starting at `first`.
pub(super) fn file_name(first: u64) -> String {
    format!("{first:0width$}{SUFFIX}", width = NAME_DIGITS)
}

/// The first index encoded in a segment's file name; `None` for other files.
pub(super) fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segment files in `dir`, ordered by first index.
pub(super) fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogStoreError> {
    let entries = std::fs::read_dir(dir).map_err(|e| LogStoreError::io("list", dir, e))?;
    let mut segments = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LogStoreError::io("list", dir, e))?;
        let name = entry.file_name();
        if let Some(first) = name.to_str().and_then(parse_name) {
            segments.push((first, entry.path()));
        }
    }
    segments.sort_by_key(|(first, _)| *first);
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(file_name(42), "00000000000000000042.log");
        assert_eq!(parse_name(&file_name(42)), Some(42));
        assert_eq!(parse_name(&file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_name("42.log"), None);
        assert_eq!(parse_name("0000000000000000004x.log"), None);
        assert_eq!(parse_name("00000000000000000042.log.tmp"), None);
    }
}
