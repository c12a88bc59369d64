//! fsync helpers, and the one small file beside the segments: the test-only
//! `durable.manifest` of the power-loss simulation.
//!
//! Owns: timing every fsync into the store's stats, the manifest's framing
//! (`[u32 LE body_len][u32 LE crc of body_len and body][body]`) and encoding, and the
//! atomic replace (temp file, fsync, rename, fsync of the directory).
//! Must not: decide when a file is written (the writer thread does, in order with the
//! appends) or accept a file whose CRC fails: that is [`LogStoreError::CorruptMeta`].
//! (Votes, purge points and the committed hint are records of the shared log itself.)

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use super::error::LogStoreError;
use super::Stats;

/// Test-only: the fsync'ed length of every segment (power-loss simulation).
pub(super) const MANIFEST: &str = "durable.manifest";
/// Suffix of the temp file an atomic replace writes first.
pub(super) const TMP_SUFFIX: &str = ".tmp";

const FRAME_HEADER: usize = 8;

/// Frames `body` with its length and CRC.
pub(super) fn frame(body: &[u8]) -> Vec<u8> {
    let len = body.len() as u32;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(body);
    let mut out = Vec::with_capacity(FRAME_HEADER + body.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// The body of a framed file, if its length and CRC hold. Bytes after the frame are
/// ignored (an in-place overwrite may leave some).
pub(super) fn unframe(bytes: &[u8]) -> Result<&[u8], String> {
    if bytes.len() < FRAME_HEADER {
        return Err(format!(
            "{} bytes, shorter than its 8-byte header",
            bytes.len()
        ));
    }
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[0..4]);
    let len = u32::from_le_bytes(word);
    word.copy_from_slice(&bytes[4..8]);
    let stored = u32::from_le_bytes(word);
    let body = bytes
        .get(FRAME_HEADER..FRAME_HEADER + len as usize)
        .ok_or_else(|| format!("length field {len} runs past the end of the file"))?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(body);
    let computed = hasher.finalize();
    if computed != stored {
        return Err(format!(
            "CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    Ok(body)
}

/// fsyncs `file`, counting it in `stats`.
pub(super) fn fsync(
    file: &File,
    path: &Path,
    data_only: bool,
    stats: &Stats,
) -> Result<(), LogStoreError> {
    let started = Instant::now();
    let res = if data_only {
        file.sync_data()
    } else {
        file.sync_all()
    };
    stats.record_fsync(started.elapsed());
    res.map_err(|e| LogStoreError::io("fsync", path, e))
}

/// fsyncs the directory `dir`, so created, renamed and deleted names are durable.
pub(super) fn sync_dir(dir: &Path, stats: &Stats) -> Result<(), LogStoreError> {
    let file = File::open(dir).map_err(|e| LogStoreError::io("open directory", dir, e))?;
    fsync(&file, dir, false, stats)
}

/// Replaces `dir/name` with the framed `body`: writes `name.tmp`, fsyncs it, renames it
/// over `name`, fsyncs the directory. After a crash, `name` holds the old or the new body,
/// never a mix.
pub(super) fn write_atomic(
    dir: &Path,
    name: &str,
    body: &[u8],
    stats: &Stats,
) -> Result<(), LogStoreError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| LogStoreError::io("create", &tmp, e))?;
    file.write_all(&frame(body))
        .map_err(|e| LogStoreError::io("write", &tmp, e))?;
    fsync(&file, &tmp, false, stats)?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(|e| LogStoreError::io("rename into place", &path, e))?;
    sync_dir(dir, stats)
}

/// The body of `dir/name`, `None` when the file does not exist.
pub(super) fn read(dir: &Path, name: &str) -> Result<Option<Vec<u8>>, LogStoreError> {
    let path = dir.join(name);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LogStoreError::io("read", &path, e)),
    };
    unframe(&bytes)
        .map(|body| Some(body.to_vec()))
        .map_err(|reason| LogStoreError::CorruptMeta { file: path, reason })
}

fn corrupt(dir: &Path, name: &str, reason: impl ToString) -> LogStoreError {
    LogStoreError::CorruptMeta {
        file: dir.join(name),
        reason: reason.to_string(),
    }
}

/// The body of the manifest: `[u64 LE segment number][u64 LE length]` per segment.
pub(super) fn encode_manifest(segments: &BTreeMap<u64, u64>) -> Vec<u8> {
    let mut body = Vec::with_capacity(segments.len() * 16);
    for (first, len) in segments {
        body.extend_from_slice(&first.to_le_bytes());
        body.extend_from_slice(&len.to_le_bytes());
    }
    body
}

/// Reads the manifest: durable length by segment number.
pub(super) fn read_manifest(dir: &Path) -> Result<Option<BTreeMap<u64, u64>>, LogStoreError> {
    let Some(body) = read(dir, MANIFEST)? else {
        return Ok(None);
    };
    if body.len() % 16 != 0 {
        return Err(corrupt(
            dir,
            MANIFEST,
            format!("{} bytes is not a list of pairs", body.len()),
        ));
    }
    let mut segments = BTreeMap::new();
    for pair in body.chunks_exact(16) {
        let mut word = [0u8; 8];
        word.copy_from_slice(&pair[..8]);
        let first = u64::from_le_bytes(word);
        word.copy_from_slice(&pair[8..]);
        segments.insert(first, u64::from_le_bytes(word));
    }
    Ok(Some(segments))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_reject_damage() {
        let framed = frame(b"hello");
        assert_eq!(unframe(&framed).unwrap(), b"hello");
        let mut longer = framed.clone();
        longer.extend_from_slice(b"trailing");
        assert_eq!(unframe(&longer).unwrap(), b"hello");
        for at in 0..framed.len() {
            let mut damaged = framed.clone();
            damaged[at] ^= 1;
            assert!(unframe(&damaged).is_err(), "flip at {at} went unnoticed");
        }
        assert!(unframe(&framed[..framed.len() - 1]).is_err());
    }

    #[test]
    fn the_manifest_survives_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Stats::default();
        let lengths = BTreeMap::from([(3, 4096), (4, 17)]);
        write_atomic(dir.path(), MANIFEST, &encode_manifest(&lengths), &stats).unwrap();
        assert_eq!(read_manifest(dir.path()).unwrap(), Some(lengths));
        assert!(!dir.path().join(format!("{MANIFEST}{TMP_SUFFIX}")).exists());

        let path = dir.path().join(MANIFEST);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x10;
        std::fs::write(&path, bytes).unwrap();
        let err = read_manifest(dir.path()).unwrap_err();
        assert!(matches!(err, LogStoreError::CorruptMeta { .. }), "{err}");
    }
}
