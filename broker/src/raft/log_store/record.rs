//! One record of the shared log on disk: a fixed header, a body, and the CRC over both
//! and the directory's log key.
//!
//! Owns: the byte layout of a record (see the diagram in [`super`]), building the records
//! of every kind (an entry of a group, and the small state records: truncate, purge,
//! vote, committed, drop), sealing a built record for the segment it goes to, checking a
//! record's bounds, segment and CRC, and decoding a checked body.
//!
//! Why the segment number and the key: segment files are recycled (a retired file
//! becomes a later segment, so appends overwrite blocks already allocated instead of
//! growing the file, see [`super::writer`]). The bytes after the last record of a
//! recycled file are records of its previous life; their segment field names the old
//! number, so they read as the end of the log. The key is random per log directory and
//! never leaves it, so bytes a client chose (a payload, which may land anywhere in an old
//! file) cannot pose as a record: nobody outside the node can compute a matching CRC. Must not: do I/O or decide what a bad record means (torn tail or corruption): it
//! only reports *what* is wrong, as a [`Fault`]; [`super::recovery`] and
//! [`super::segment`] decide.

use std::fmt;

use openraft::CommittedLeaderId;

use super::error::LogStoreError;
use super::format::LogKey;
use crate::raft::{codec, Entry, GroupId, LogId, Vote};

/// Bytes of a record header: body_len, crc, group, kind (u32 each), index, term, segment
/// (u64 each).
pub(super) const HEADER_LEN: usize = 40;

/// Where the segment number sits in the header.
const SEGMENT_AT: usize = 32;

/// Bound: the largest record body. An entry is one batch of client writes (at most
/// 16 MiB of payload in the write pipeline, plus its envelope), so 32 MiB holds any.
pub(super) const MAX_BODY_BYTES: u32 = 32 << 20;

/// What a record says. The numbers are the on-disk `kind` field; never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A log entry of the group at `index` (body: rkyv `WireEntry`).
    Entry = 1,
    /// The group's entries from `index` on are gone (no body).
    Truncate = 2,
    /// The group's entries up to the log id in the body are purged (body: log id).
    Purge = 3,
    /// The group's vote (body: vote).
    Vote = 4,
    /// The group's committed log id, a hint (body: log id).
    Committed = 5,
    /// The group no longer lives on this node: forget all of it (no body).
    Drop = 6,
}

impl Kind {
    fn from_u32(kind: u32) -> Option<Kind> {
        Some(match kind {
            1 => Kind::Entry,
            2 => Kind::Truncate,
            3 => Kind::Purge,
            4 => Kind::Vote,
            5 => Kind::Committed,
            6 => Kind::Drop,
            _ => return None,
        })
    }
}

/// A record header as read from disk (after its bounds were checked, before its CRC was).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    /// Body length in bytes.
    pub body_len: u32,
    /// The stored CRC.
    pub crc: u32,
    /// The Raft group the record belongs to.
    pub group: GroupId,
    /// The raw kind field ([`Header::kind`] parses it).
    pub kind: u32,
    /// Entry: its log index; truncate: the first index removed; others: 0.
    pub index: u64,
    /// Entry: its term; others: 0.
    pub term: u64,
    /// The number of the segment the record was written to.
    pub segment: u64,
}

impl Header {
    /// Header plus body.
    pub fn record_len(&self) -> usize {
        HEADER_LEN + self.body_len as usize
    }

    /// The record's kind, if it is one this build knows.
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_u32(self.kind)
    }
}

/// What is wrong with bytes that should hold a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Fault {
    /// Fewer bytes than the header or the announced body needs.
    Incomplete {
        /// Bytes present.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The length field is above [`MAX_BODY_BYTES`].
    TooLarge {
        /// The announced body length.
        body_len: u32,
    },
    /// The record was written to another segment: in a recycled file, a record of the
    /// file's previous life (the end of this segment's records).
    OtherSegment {
        /// The segment field.
        found: u64,
        /// The segment being read.
        expected: u64,
    },
    /// The CRC does not match.
    BadCrc {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// The kind field names no known record (only reachable when the CRC matched: a
    /// record from a newer build).
    UnknownKind {
        /// The kind field.
        kind: u32,
    },
    /// The body is not what its kind needs.
    BadBody(String),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Incomplete { have, need } => {
                write!(f, "record cut short: {have} of {need} bytes present")
            }
            Fault::TooLarge { body_len } => write!(
                f,
                "record length field {body_len} exceeds the limit of {MAX_BODY_BYTES} bytes"
            ),
            Fault::OtherSegment { found, expected } => write!(
                f,
                "record of segment {found} where segment {expected} was expected (a recycled file's old contents)"
            ),
            Fault::BadCrc { stored, computed } => write!(
                f,
                "CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            Fault::UnknownKind { kind } => write!(
                f,
                "record kind {kind} is unknown to this build (written by a newer herald?)"
            ),
            Fault::BadBody(detail) => write!(f, "record body does not decode: {detail}"),
        }
    }
}

/// A record built but not yet placed: its segment field and CRC are filled in by
/// [`Unplaced::seal`] once the placement knows the segment. The body's CRC is computed
/// here, outside the placement lock; sealing adds only the header and the key.
#[derive(Debug, Clone)]
pub(super) struct Unplaced {
    bytes: Vec<u8>,
    body_crc: crc32fast::Hasher,
}

impl Unplaced {
    /// Header plus body.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The record as written to segment `segment` of the log keyed `key`.
    pub fn seal(mut self, segment: u64, key: LogKey) -> Vec<u8> {
        self.bytes[SEGMENT_AT..HEADER_LEN].copy_from_slice(&segment.to_le_bytes());
        let crc = crc(self.body_crc, &self.bytes[..HEADER_LEN], key);
        self.bytes[4..8].copy_from_slice(&crc.to_le_bytes());
        self.bytes
    }
}

/// CRC-32 over the body (already in `body_crc`), then every header byte but the CRC
/// field's, then the key.
fn crc(mut body_crc: crc32fast::Hasher, header: &[u8], key: LogKey) -> u32 {
    body_crc.update(&header[0..4]);
    body_crc.update(&header[8..HEADER_LEN]);
    body_crc.update(&key.to_le_bytes());
    body_crc.finalize()
}

fn body_crc(body: &[u8]) -> crc32fast::Hasher {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(body);
    hasher
}

/// Builds a record from its fields and body (segment and CRC left for [`Unplaced::seal`]).
fn build(
    group: GroupId,
    kind: Kind,
    index: u64,
    term: u64,
    body: &[u8],
) -> Result<Unplaced, LogStoreError> {
    let body_len = u32::try_from(body.len())
        .ok()
        .filter(|len| *len <= MAX_BODY_BYTES)
        .ok_or(LogStoreError::EntryTooLarge {
            group,
            index,
            bytes: body.len(),
            max: MAX_BODY_BYTES,
        })?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
    bytes.extend_from_slice(&body_len.to_le_bytes());
    bytes.extend_from_slice(&[0; 4]); // the CRC, filled in by seal
    bytes.extend_from_slice(&group.to_le_bytes());
    bytes.extend_from_slice(&(kind as u32).to_le_bytes());
    bytes.extend_from_slice(&index.to_le_bytes());
    bytes.extend_from_slice(&term.to_le_bytes());
    bytes.extend_from_slice(&[0; 8]); // the segment, filled in by seal
    bytes.extend_from_slice(body);
    Ok(Unplaced {
        bytes,
        body_crc: body_crc(body),
    })
}

/// The record of a log entry of `group`.
pub(super) fn encode_entry(group: GroupId, entry: &Entry) -> Result<Unplaced, LogStoreError> {
    let index = entry.log_id.index;
    let term = entry.log_id.leader_id.term;
    let body = codec::encode_entry(entry).map_err(|source| LogStoreError::Encode {
        what: format!("log entry {index} of group {group}"),
        source,
    })?;
    build(group, Kind::Entry, index, term, &body)
}

/// A truncate record: `group`'s entries from `index` on are gone.
pub(super) fn encode_truncate(group: GroupId, index: u64) -> Result<Unplaced, LogStoreError> {
    build(group, Kind::Truncate, index, 0, &[])
}

/// A purge record: `group`'s entries up to `log_id` are purged.
pub(super) fn encode_purge(group: GroupId, log_id: &LogId) -> Result<Unplaced, LogStoreError> {
    build(group, Kind::Purge, 0, 0, &log_id_body(log_id))
}

/// A committed record (a hint: see the module documentation of [`super`]).
pub(super) fn encode_committed(group: GroupId, log_id: &LogId) -> Result<Unplaced, LogStoreError> {
    build(group, Kind::Committed, 0, 0, &log_id_body(log_id))
}

/// A vote record.
pub(super) fn encode_vote(group: GroupId, vote: &Vote) -> Result<Unplaced, LogStoreError> {
    let mut body = Vec::with_capacity(VOTE_BODY_LEN);
    body.extend_from_slice(&vote.leader_id.term.to_le_bytes());
    body.extend_from_slice(&vote.leader_id.node_id.to_le_bytes());
    body.push(u8::from(vote.committed));
    build(group, Kind::Vote, 0, 0, &body)
}

/// A drop record: the group is gone from this node.
pub(super) fn encode_drop(group: GroupId) -> Result<Unplaced, LogStoreError> {
    build(group, Kind::Drop, 0, 0, &[])
}

/// Body of a log id: term, leader node id, index (u64 LE each).
const LOG_ID_BODY_LEN: usize = 24;
/// Body of a vote: term, node id (u64 LE each), committed (u8).
const VOTE_BODY_LEN: usize = 17;

fn log_id_body(log_id: &LogId) -> Vec<u8> {
    let mut body = Vec::with_capacity(LOG_ID_BODY_LEN);
    body.extend_from_slice(&log_id.leader_id.term.to_le_bytes());
    body.extend_from_slice(&log_id.leader_id.node_id.to_le_bytes());
    body.extend_from_slice(&log_id.index.to_le_bytes());
    body
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// The header at the start of `bytes`, if there are enough bytes for one.
pub(super) fn header(bytes: &[u8]) -> Option<Header> {
    (bytes.len() >= HEADER_LEN).then(|| Header {
        body_len: le_u32(bytes, 0),
        crc: le_u32(bytes, 4),
        group: le_u32(bytes, 8),
        kind: le_u32(bytes, 12),
        index: le_u64(bytes, 16),
        term: le_u64(bytes, 24),
        segment: le_u64(bytes, SEGMENT_AT),
    })
}

/// Checks the record at the start of `bytes`, read from segment `segment` of the log
/// keyed `key` (bounds, then the segment, then the CRC, then a known kind), and returns
/// its header and body.
pub(super) fn check(bytes: &[u8], segment: u64, key: LogKey) -> Result<(Header, &[u8]), Fault> {
    let header = header(bytes).ok_or(Fault::Incomplete {
        have: bytes.len(),
        need: HEADER_LEN,
    })?;
    if header.body_len > MAX_BODY_BYTES {
        return Err(Fault::TooLarge {
            body_len: header.body_len,
        });
    }
    let len = header.record_len();
    if bytes.len() < len {
        return Err(Fault::Incomplete {
            have: bytes.len(),
            need: len,
        });
    }
    if header.segment != segment {
        return Err(Fault::OtherSegment {
            found: header.segment,
            expected: segment,
        });
    }
    let body = &bytes[HEADER_LEN..len];
    let computed = crc(body_crc(body), &bytes[..HEADER_LEN], key);
    if computed != header.crc {
        return Err(Fault::BadCrc {
            stored: header.crc,
            computed,
        });
    }
    if header.kind().is_none() {
        return Err(Fault::UnknownKind { kind: header.kind });
    }
    Ok((header, body))
}

/// Decodes a checked entry body and checks it against its header.
pub(super) fn decode_entry(header: &Header, body: &[u8]) -> Result<Entry, Fault> {
    let entry = codec::decode_entry(body).map_err(|e| Fault::BadBody(e.to_string()))?;
    if entry.log_id.index != header.index || entry.log_id.leader_id.term != header.term {
        return Err(Fault::BadBody(format!(
            "body holds log id {} but the header says index {} term {}",
            entry.log_id, header.index, header.term
        )));
    }
    Ok(entry)
}

/// Decodes the body of a purge or committed record.
pub(super) fn decode_log_id(body: &[u8]) -> Result<LogId, Fault> {
    if body.len() != LOG_ID_BODY_LEN {
        return Err(Fault::BadBody(format!(
            "a log id takes {LOG_ID_BODY_LEN} bytes, the record has {}",
            body.len()
        )));
    }
    Ok(LogId::new(
        CommittedLeaderId::new(le_u64(body, 0), le_u64(body, 8)),
        le_u64(body, 16),
    ))
}

/// Decodes the body of a vote record.
pub(super) fn decode_vote(body: &[u8]) -> Result<Vote, Fault> {
    if body.len() != VOTE_BODY_LEN {
        return Err(Fault::BadBody(format!(
            "a vote takes {VOTE_BODY_LEN} bytes, the record has {}",
            body.len()
        )));
    }
    let (term, node) = (le_u64(body, 0), le_u64(body, 8));
    Ok(match body[16] {
        0 => Vote::new(term, node),
        1 => Vote::new_committed(term, node),
        other => {
            return Err(Fault::BadBody(format!(
                "a vote's committed flag is 0 or 1, found {other}"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{EntryPayload, LogId};

    const KEY: LogKey = LogKey::new(0x5eed_0f4e_7a1d);
    const SEGMENT: u64 = 7;

    fn sealed(record: Result<Unplaced, LogStoreError>) -> Vec<u8> {
        record.unwrap().seal(SEGMENT, KEY)
    }

    fn checked(bytes: &[u8]) -> Result<(Header, &[u8]), Fault> {
        check(bytes, SEGMENT, KEY)
    }

    fn blank(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    #[test]
    fn an_entry_record_round_trips() {
        let entry = blank(3, 7);
        let bytes = sealed(encode_entry(9, &entry));
        let (header, body) = checked(&bytes).unwrap();
        assert_eq!(
            (header.group, header.kind(), header.index, header.term),
            (9, Some(Kind::Entry), 7, 3)
        );
        assert_eq!(header.record_len(), bytes.len());
        assert_eq!(decode_entry(&header, body).unwrap(), entry);
    }

    #[test]
    fn state_records_round_trip() {
        let log_id = LogId::new(CommittedLeaderId::new(4, 2), 99);
        let bytes = sealed(encode_purge(5, &log_id));
        let (h, body) = checked(&bytes).unwrap();
        assert_eq!((h.group, h.kind()), (5, Some(Kind::Purge)));
        assert_eq!(decode_log_id(body).unwrap(), log_id);
        let vote = Vote::new_committed(8, 3);
        let bytes = sealed(encode_vote(5, &vote));
        let (h, body) = checked(&bytes).unwrap();
        assert_eq!(h.kind(), Some(Kind::Vote));
        assert_eq!(decode_vote(body).unwrap(), vote);
        let bytes = sealed(encode_truncate(5, 12));
        let (h, body) = checked(&bytes).unwrap();
        assert_eq!(
            (h.kind(), h.index, body.len()),
            (Some(Kind::Truncate), 12, 0)
        );
        let bytes = sealed(encode_drop(5));
        assert_eq!(checked(&bytes).unwrap().0.kind(), Some(Kind::Drop));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        for bytes in [
            sealed(encode_entry(2, &blank(3, 7))),
            sealed(encode_vote(2, &Vote::new(1, 1))),
        ] {
            for at in 0..bytes.len() {
                let mut damaged = bytes.clone();
                damaged[at] ^= 0x40;
                assert!(
                    checked(&damaged).is_err(),
                    "flip at byte {at} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn a_record_checks_only_in_its_own_segment_of_its_own_log() {
        let bytes = sealed(encode_entry(2, &blank(3, 7)));
        assert_eq!(
            check(&bytes, SEGMENT + 1, KEY).unwrap_err(),
            Fault::OtherSegment {
                found: SEGMENT,
                expected: SEGMENT + 1
            }
        );
        // Another directory's key (or a forger who does not know it): the CRC fails.
        assert!(matches!(
            check(&bytes, SEGMENT, LogKey::new(1)),
            Err(Fault::BadCrc { .. })
        ));
    }

    #[test]
    fn short_and_oversized_records_are_faults() {
        let bytes = sealed(encode_entry(1, &blank(1, 1)));
        assert!(matches!(
            checked(&bytes[..10]),
            Err(Fault::Incomplete { .. })
        ));
        assert!(matches!(
            checked(&bytes[..bytes.len() - 1]),
            Err(Fault::Incomplete { .. })
        ));
        let mut huge = bytes.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(checked(&huge), Err(Fault::TooLarge { .. })));
    }

    #[test]
    fn bad_state_bodies_are_faults() {
        assert!(decode_log_id(&[0; 23]).is_err());
        assert!(decode_vote(&[0; 16]).is_err());
        let mut vote = vec![0; 17];
        vote[16] = 2;
        assert!(decode_vote(&vote).is_err());
    }
}
