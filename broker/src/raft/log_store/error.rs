//! The log store's error type.
//!
//! Owns: [`LogStoreError`] and its mapping onto openraft's [`StorageError`].
//! Must not: hide an I/O error or a damaged record behind a generic message: every
//! variant names the file, and a damaged record also names the byte offset and log index.

use std::io;
use std::path::PathBuf;

use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageIOError};

use crate::raft::codec::CodecError;
use crate::raft::{GroupId, StorageError};

/// Why the log store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    /// A file-system call failed (disk full, permissions, a removed directory, …).
    #[error("cannot {action} {}: {source}; check the disk and the permissions of the data directory", path.display())]
    Io {
        /// What the store was doing ("write segment", "fsync directory", …).
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A record of the log is damaged: its CRC does not match, it is cut short before a
    /// valid record, it does not continue its group's log, or a segment file is missing.
    #[error(
        "the log of this node is damaged at {} byte offset {offset} (group {group}, log index {index}): {reason}; \
         move the data directory away and restart the node so it rejoins from a snapshot",
        file.display()
    )]
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// The byte offset of the damaged record in that file.
        offset: u64,
        /// The Raft group the record belongs to (as far as its header can be read).
        group: GroupId,
        /// The log index of the record (as far as its header can be read).
        index: u64,
        /// What exactly is wrong.
        reason: String,
    },
    /// The test-only `durable.manifest` fails its CRC or does not decode.
    #[error(
        "the file {} of the Raft log is damaged: {reason}; move the data directory away and \
         restart the node so it rejoins from a snapshot",
        file.display()
    )]
    CorruptMeta {
        /// The file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An entry, the vote or a log id could not be serialized (a bug, or out of memory).
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// What was being encoded ("log entry 17", "the vote").
        what: String,
        /// The codec's error.
        source: CodecError,
    },
    /// The log directory is in an on-disk format this build does not read (written by an
    /// older or newer herald).
    #[error(
        "the Raft log in {} is in format {found}, and this build reads format {}; move the data \
         directory away and restart the node so it rejoins from the others (or run the herald \
         version that wrote it)",
        dir.display(), super::format::FORMAT_VERSION
    )]
    UnsupportedFormat {
        /// The log directory.
        dir: PathBuf,
        /// The format found there.
        found: String,
    },
    /// An encoded entry is larger than one record may be.
    #[error("log entry {index} of group {group} is {bytes} bytes encoded, above the record limit of {max} bytes; lower the payload limit")]
    EntryTooLarge {
        /// The group.
        group: GroupId,
        /// The entry's log index.
        index: u64,
        /// Its encoded size.
        bytes: usize,
        /// The limit ([`super::record::MAX_BODY_BYTES`]).
        max: u32,
    },
    /// An append would leave a hole in (or rewrite) the log; openraft never asks for that,
    /// so this is a bug in the caller.
    #[error("append of log index {got} to group {group} refused: its log expects index {expected} next (no holes, no overwrites without truncate)")]
    NotContiguous {
        /// The group.
        group: GroupId,
        /// The index the log expects next.
        expected: u64,
        /// The index offered.
        got: u64,
    },
    /// An earlier write or fsync failed; the store refuses everything after it, because it
    /// can no longer tell what is durable. Restart the node.
    #[error(
        "the log writer failed earlier and accepts no more writes ({reason}); restart the node"
    )]
    WriterFailed {
        /// The first failure.
        reason: String,
    },
    /// The writer thread is gone (it could not start, or it panicked).
    #[error("the log writer thread is not running; restart the node")]
    WriterGone,
    /// The configuration cannot work.
    #[error("invalid log store configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
}

impl LogStoreError {
    /// Builds an [`LogStoreError::Io`].
    pub(super) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        LogStoreError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// The same failure, as told to a caller that did not trigger it (errors are not `Clone`).
    pub(super) fn to_writer_failed(&self) -> LogStoreError {
        match self {
            LogStoreError::WriterFailed { reason } => LogStoreError::WriterFailed {
                reason: reason.clone(),
            },
            other => LogStoreError::WriterFailed {
                reason: other.to_string(),
            },
        }
    }

    /// As openraft's error, for the given kind of operation.
    pub(super) fn into_storage(self, subject: ErrorSubject<u64>, verb: ErrorVerb) -> StorageError {
        StorageIOError::new(subject, verb, AnyError::new(&self)).into()
    }

    /// As openraft's error for a failed log write.
    pub(super) fn write_logs(self) -> StorageError {
        self.into_storage(ErrorSubject::Logs, ErrorVerb::Write)
    }

    /// As openraft's error for a failed log read.
    pub(super) fn read_logs(self) -> StorageError {
        self.into_storage(ErrorSubject::Logs, ErrorVerb::Read)
    }

    /// As openraft's error for a failed vote write.
    pub(super) fn write_vote(self) -> StorageError {
        self.into_storage(ErrorSubject::Vote, ErrorVerb::Write)
    }
}
