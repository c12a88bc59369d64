//! One log record on disk: a fixed header, the entry's rkyv body, and the CRC over both.
//!
//! Owns: the byte layout of a record (see the diagram in [`super`]), building a record from
//! an [`Entry`], checking a record's bounds and CRC, and decoding a checked body.
//! Must not: do I/O or decide what a bad record means (torn tail or corruption): it only
//! reports *what* is wrong, as a [`Fault`]; [`super::recovery`] and [`super::segment`]
//! decide.

use std::fmt;

use super::error::LogStoreError;
use crate::raft::{codec, Entry};

/// Bytes of the record header: body length, CRC, index, term.
pub(super) const HEADER_LEN: usize = 24;

/// The largest record body accepted (32 MiB). Payloads are capped at 1 MiB by the broker,
/// so a larger length field is damage, not data; the bound also keeps a damaged length
/// from making a reader allocate gigabytes.
pub(super) const MAX_BODY_BYTES: u32 = 32 << 20;

/// A record's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    /// Length of the body in bytes.
    pub body_len: u32,
    /// The CRC-32 (IEEE polynomial, as computed by crc32fast) stored in the record.
    pub crc: u32,
    /// The entry's log index.
    pub index: u64,
    /// The entry's term.
    pub term: u64,
}

impl Header {
    /// The record's total length, header included.
    pub fn record_len(&self) -> usize {
        HEADER_LEN + self.body_len as usize
    }
}

/// What is wrong with the bytes at a record position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Fault {
    /// Fewer bytes remain than the header, or than the header's body length, asks for.
    Incomplete {
        /// Bytes present from the record's start.
        have: usize,
        /// Bytes the record needs.
        need: usize,
    },
    /// The length field is above [`MAX_BODY_BYTES`].
    TooLarge {
        /// The length field.
        body_len: u32,
    },
    /// The stored CRC does not match the bytes.
    BadCrc {
        /// CRC in the record.
        stored: u32,
        /// CRC of the bytes read.
        computed: u32,
    },
    /// The record is intact but holds another index than expected.
    WrongIndex {
        /// The index expected here.
        expected: u64,
        /// The index in the record.
        found: u64,
    },
    /// The record is intact but its term is below the previous record's (a Raft log's
    /// terms never decrease).
    TermDecreases {
        /// The previous record's term.
        previous: u64,
        /// This record's term.
        found: u64,
    },
    /// The CRC matches but the body is not a valid entry, or its log id disagrees with the
    /// header.
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
            Fault::BadCrc { stored, computed } => write!(
                f,
                "CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            Fault::WrongIndex { expected, found } => {
                write!(
                    f,
                    "record holds log index {found} where {expected} was expected"
                )
            }
            Fault::TermDecreases { previous, found } => {
                write!(
                    f,
                    "record has term {found}, below the previous record's term {previous}"
                )
            }
            Fault::BadBody(detail) => write!(f, "record body does not decode: {detail}"),
        }
    }
}

/// The CRC of a record: header fields (without the CRC itself) followed by the body.
pub(super) fn crc(body_len: u32, index: u64, term: u64, body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&body_len.to_le_bytes());
    hasher.update(&index.to_le_bytes());
    hasher.update(&term.to_le_bytes());
    hasher.update(body);
    hasher.finalize()
}

/// Builds the record (header and body) for `entry`.
pub(super) fn encode(entry: &Entry) -> Result<Vec<u8>, LogStoreError> {
    let index = entry.log_id.index;
    let term = entry.log_id.leader_id.term;
    let body = codec::encode_entry(entry).map_err(|source| LogStoreError::Encode {
        what: format!("log entry {index}"),
        source,
    })?;
    let body_len = u32::try_from(body.len())
        .ok()
        .filter(|len| *len <= MAX_BODY_BYTES)
        .ok_or(LogStoreError::EntryTooLarge {
            index,
            bytes: body.len(),
            max: MAX_BODY_BYTES,
        })?;
    let mut record = Vec::with_capacity(HEADER_LEN + body.len());
    record.extend_from_slice(&body_len.to_le_bytes());
    record.extend_from_slice(&crc(body_len, index, term, &body).to_le_bytes());
    record.extend_from_slice(&index.to_le_bytes());
    record.extend_from_slice(&term.to_le_bytes());
    record.extend_from_slice(&body);
    Ok(record)
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

/// Reads the header at the start of `bytes`, if there are enough bytes for one.
pub(super) fn header(bytes: &[u8]) -> Option<Header> {
    (bytes.len() >= HEADER_LEN).then(|| Header {
        body_len: le_u32(bytes, 0),
        crc: le_u32(bytes, 4),
        index: le_u64(bytes, 8),
        term: le_u64(bytes, 16),
    })
}

/// Checks the record at the start of `bytes`: complete, within the size limit, CRC intact.
/// Returns its header and body.
pub(super) fn check(bytes: &[u8]) -> Result<(Header, &[u8]), Fault> {
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
    let body = &bytes[HEADER_LEN..len];
    let computed = crc(header.body_len, header.index, header.term, body);
    if computed != header.crc {
        return Err(Fault::BadCrc {
            stored: header.crc,
            computed,
        });
    }
    Ok((header, body))
}

/// Checks the record at the start of `bytes` and that it holds `expected_index`.
pub(super) fn check_at(bytes: &[u8], expected_index: u64) -> Result<(Header, &[u8]), Fault> {
    let (header, body) = check(bytes)?;
    if header.index != expected_index {
        return Err(Fault::WrongIndex {
            expected: expected_index,
            found: header.index,
        });
    }
    Ok((header, body))
}

/// Decodes a checked body and confirms its log id agrees with the header.
pub(super) fn decode(header: &Header, body: &[u8]) -> Result<Entry, Fault> {
    let entry = codec::decode_entry(body).map_err(|e| Fault::BadBody(e.to_string()))?;
    if entry.log_id.index != header.index || entry.log_id.leader_id.term != header.term {
        return Err(Fault::BadBody(format!(
            "body holds log id {} but the header says index {} term {}",
            entry.log_id, header.index, header.term
        )));
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    fn blank(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    #[test]
    fn a_record_round_trips() {
        let entry = blank(3, 7);
        let bytes = encode(&entry).unwrap();
        let (header, body) = check_at(&bytes, 7).unwrap();
        assert_eq!(header.index, 7);
        assert_eq!(header.term, 3);
        assert_eq!(header.record_len(), bytes.len());
        assert_eq!(decode(&header, body).unwrap(), entry);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = encode(&blank(3, 7)).unwrap();
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x40;
            assert!(
                check_at(&damaged, 7).is_err(),
                "flip at byte {at} went unnoticed"
            );
        }
    }

    #[test]
    fn short_and_oversized_records_are_faults() {
        let bytes = encode(&blank(1, 1)).unwrap();
        assert!(matches!(check(&bytes[..10]), Err(Fault::Incomplete { .. })));
        assert!(matches!(
            check(&bytes[..bytes.len() - 1]),
            Err(Fault::Incomplete { .. })
        ));
        let mut huge = bytes.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(check(&huge), Err(Fault::TooLarge { .. })));
        assert!(matches!(check_at(&bytes, 2), Err(Fault::WrongIndex { .. })));
    }
}
