//! The log directory's format file: which on-disk format the segments are in, and the
//! directory's log key.
//!
//! Owns: `DIR/format` (framed like the manifest: magic, format version, key), creating
//! it for a new log and refusing a log in any other format with an error that says what
//! to do. Must not: be rewritten once created (the key seals every record; a new key
//! would make every record fail its CRC).
//!
//! The key is a random `u64` drawn when the directory is created. Every record's CRC
//! covers it ([`super::record`]), so bytes that never came from this node's writer (a
//! client's payload in a recycled file, a record copied from another node's log) never
//! check as a record. It is not a secret against someone who can read the data
//! directory; it keeps the network's bytes from posing as the log's.

use std::path::Path;

use super::error::LogStoreError;
use super::{meta, Stats};

/// The format file's name.
pub(super) const FORMAT_FILE: &str = "format";

/// The format this build writes and reads. 1 was the format before the format file
/// (32-byte record headers, no segment field, CRC without a key); 2 added the segment
/// field, the key and recycled segment files. Bump it with every change a previous
/// build would misread, and say here what changed.
pub(super) const FORMAT_VERSION: u32 = 2;

/// The first bytes of the format file's body.
const MAGIC: &[u8; 8] = b"HRLDLOG\0";

/// Body: magic, version u32 LE, key u64 LE.
const BODY_LEN: usize = 20;

/// The directory's log key (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LogKey(u64);

impl LogKey {
    /// A key with this value (tests).
    #[cfg(test)]
    pub const fn new(value: u64) -> LogKey {
        LogKey(value)
    }

    /// Its bytes, as the CRC covers them.
    pub fn to_le_bytes(self) -> [u8; 8] {
        self.0.to_le_bytes()
    }
}

/// The key of the log in `dir`. A directory without a format file gets one with a fresh
/// key, unless it already holds segments (a log of format 1): that is refused.
pub(super) fn open_or_create(
    dir: &Path,
    has_segments: bool,
    stats: &Stats,
) -> Result<LogKey, LogStoreError> {
    match meta::read(dir, FORMAT_FILE)? {
        Some(body) => parse(&body).map_err(|found| LogStoreError::UnsupportedFormat {
            dir: dir.to_path_buf(),
            found,
        }),
        None if has_segments => Err(LogStoreError::UnsupportedFormat {
            dir: dir.to_path_buf(),
            found: "1 (segments without a format file, written by a build before format 2)".into(),
        }),
        None => {
            let key = LogKey(rand::random());
            meta::write_atomic(dir, FORMAT_FILE, &encode(key), stats)?;
            Ok(key)
        }
    }
}

fn encode(key: LogKey) -> Vec<u8> {
    let mut body = Vec::with_capacity(BODY_LEN);
    body.extend_from_slice(MAGIC);
    body.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    body.extend_from_slice(&key.to_le_bytes());
    body
}

/// The key, if `body` is a format file of [`FORMAT_VERSION`]; else what was found.
fn parse(body: &[u8]) -> Result<LogKey, String> {
    if body.len() != BODY_LEN || !body.starts_with(MAGIC) {
        return Err(format!(
            "unknown (the format file holds {} bytes that are not a Herald log format)",
            body.len()
        ));
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&body[8..12]);
    let version = u32::from_le_bytes(version);
    if version != FORMAT_VERSION {
        return Err(version.to_string());
    }
    let mut key = [0u8; 8];
    key.copy_from_slice(&body[12..BODY_LEN]);
    Ok(LogKey(u64::from_le_bytes(key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_gets_a_key_that_stays() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Stats::default();
        let key = open_or_create(dir.path(), false, &stats).unwrap();
        assert_eq!(open_or_create(dir.path(), true, &stats).unwrap(), key);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(open_or_create(other.path(), false, &stats).unwrap(), key);
    }

    #[test]
    fn segments_without_a_format_file_are_format_1_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_or_create(dir.path(), true, &Stats::default()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("format 1"), "{text}");
        assert!(text.contains("move the data directory away"), "{text}");
    }

    #[test]
    fn another_version_is_refused_with_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let mut body = encode(LogKey(3));
        body[8..12].copy_from_slice(&7u32.to_le_bytes());
        meta::write_atomic(dir.path(), FORMAT_FILE, &body, &Stats::default()).unwrap();
        let err = open_or_create(dir.path(), true, &Stats::default()).unwrap_err();
        assert!(err.to_string().contains("format 7"), "{err}");
    }
}
