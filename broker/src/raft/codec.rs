//! The rkyv form of openraft's types, shared by the log store (on disk) and the peer
//! transport (on the wire), so a log entry has one encoding everywhere.
//!
//! Owns: the `Wire*` mirror types, conversions to and from openraft's types, and
//! [`encode`]/[`decode`] with validation. openraft's own types carry no rkyv derives, so
//! each is mirrored field by field; a conversion never panics.
//! Must not: do I/O, or trust bytes: [`decode`] validates every archive (bytecheck)
//! before reading it, and a bad one is a [`CodecError`], never a panic.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{BasicNode, CommittedLeaderId, EntryPayload, Membership, StoredMembership};
use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use super::{Entry, LogId, NodeId, Vote};

/// Encoding or decoding failed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// rkyv could not serialize the value (a bug, or an allocation failure).
    #[error("cannot encode {what}: {detail}")]
    Encode {
        /// The type being encoded.
        what: &'static str,
        /// rkyv's message.
        detail: String,
    },
    /// The bytes are not a valid archive of the expected type.
    #[error("invalid {what} ({len} bytes): {detail}")]
    Invalid {
        /// The type expected.
        what: &'static str,
        /// How many bytes were offered.
        len: usize,
        /// bytecheck's message.
        detail: String,
    },
    /// A snapshot's header names another kind of snapshot or another format version
    /// (see [`encode_snapshot`]).
    #[error(
        "not a {what} snapshot of format {expected}: {found} (a snapshot is read only by a \
         Herald build of the same snapshot format)"
    )]
    SnapshotFormat {
        /// The kind of snapshot expected.
        what: &'static str,
        /// The format version this build reads.
        expected: u32,
        /// What the header held instead.
        found: String,
    },
}

/// Bytes before a snapshot's rkyv body: 8 bytes of magic naming the kind of snapshot,
/// its format version (u32 LE) and 4 zero bytes (a multiple of 16, so the body keeps
/// rkyv's alignment in an aligned buffer).
///
/// ```text
/// 0        8         12    16
/// +--------+---------+-----+------------------+
/// | magic  | version | 0u32| rkyv body …      |
/// +--------+---------+-----+------------------+
/// ```
pub const SNAPSHOT_HEADER_LEN: usize = 16;

/// `value` as snapshot data: the header (`magic`, `version`) then its rkyv body. The
/// header travels with the data, on disk and in InstallSnapshot, so a snapshot of
/// another format is refused by name instead of failing bytecheck.
pub fn encode_snapshot<T>(magic: &[u8; 8], version: u32, value: &T) -> Result<Vec<u8>, CodecError>
where
    T: Encodable,
{
    let body = encode(value)?;
    let mut data = Vec::with_capacity(SNAPSHOT_HEADER_LEN + body.len());
    data.extend_from_slice(magic);
    data.extend_from_slice(&version.to_le_bytes());
    data.extend_from_slice(&[0; 4]);
    data.extend_from_slice(&body);
    Ok(data)
}

/// The value of snapshot data written by [`encode_snapshot`] with the same `magic` and
/// `version`; another header is [`CodecError::SnapshotFormat`].
pub fn decode_snapshot<T>(
    what: &'static str,
    magic: &[u8; 8],
    version: u32,
    data: &[u8],
) -> Result<T, CodecError>
where
    T: Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    let refused = |found: String| CodecError::SnapshotFormat {
        what,
        expected: version,
        found,
    };
    let Some((header, body)) = data.split_first_chunk::<SNAPSHOT_HEADER_LEN>() else {
        return Err(refused(format!("only {} bytes", data.len())));
    };
    if &header[..8] != magic {
        return Err(refused(format!(
            "its first bytes are {:?} (no header: another kind of snapshot, or one written \
             before snapshot formats were versioned)",
            String::from_utf8_lossy(&header[..8])
        )));
    }
    let mut found = [0u8; 4];
    found.copy_from_slice(&header[8..12]);
    let found = u32::from_le_bytes(found);
    if found != version {
        return Err(refused(format!("it is format {found}")));
    }
    decode(body)
}

/// What [`encode`] takes: a type rkyv's high-level serializer can write. One name for
/// the bound every encoder of the crate (frames, entries, snapshots) would repeat.
pub trait Encodable:
    for<'a> Serialize<
    rkyv::api::high::HighSerializer<
        AlignedVec,
        rkyv::ser::allocator::ArenaHandle<'a>,
        rancor::Error,
    >,
>
{
}

impl<T> Encodable for T where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >
{
}

/// Serializes `value` with rkyv.
pub fn encode<T>(value: &T) -> Result<AlignedVec, CodecError>
where
    T: Encodable,
{
    rkyv::to_bytes::<rancor::Error>(value).map_err(|e| CodecError::Encode {
        what: std::any::type_name::<T>(),
        detail: e.to_string(),
    })
}

/// Validates `bytes` as an archived `T` and deserializes it. `bytes` may be unaligned
/// (it is copied into an aligned buffer when needed).
pub fn decode<T>(bytes: &[u8]) -> Result<T, CodecError>
where
    T: Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    let invalid = |e: rancor::Error| CodecError::Invalid {
        what: std::any::type_name::<T>(),
        len: bytes.len(),
        detail: e.to_string(),
    };
    if (bytes.as_ptr() as usize).is_multiple_of(16) {
        rkyv::from_bytes::<T, rancor::Error>(bytes).map_err(invalid)
    } else {
        let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::from_bytes::<T, rancor::Error>(&aligned).map_err(invalid)
    }
}

/// [`openraft::LogId`]: the leader that proposed it and its index.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireLogId {
    /// The proposing leader's term.
    pub term: u64,
    /// The proposing leader's node id.
    pub node_id: NodeId,
    /// The entry's position in the log.
    pub index: u64,
}

/// [`openraft::Vote`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireVote {
    /// The term.
    pub term: u64,
    /// The candidate or leader voted for.
    pub node_id: NodeId,
    /// True once a quorum granted it.
    pub committed: bool,
}

/// One node of a membership: id and QUIC address.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WireNode {
    /// The node id.
    pub id: NodeId,
    /// Its QUIC address, `host:port`.
    pub addr: String,
}

/// [`openraft::Membership`]: voter configs (two during a joint change) and every node.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WireMembership {
    /// The voter sets.
    pub configs: Vec<Vec<NodeId>>,
    /// Voters and learners with their addresses.
    pub nodes: Vec<WireNode>,
}

/// [`openraft::StoredMembership`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WireStoredMembership {
    /// The entry that carried it.
    pub log_id: Option<WireLogId>,
    /// The membership.
    pub membership: WireMembership,
}

/// [`openraft::EntryPayload`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum WirePayload {
    /// A new leader's first entry.
    Blank,
    /// Conversation commands, applied in order (shared with the entry it encodes:
    /// encoding copies nothing first; archived as rkyv's shared pointer to a vec).
    Normal(super::Batch),
    /// A membership change.
    Membership(WireMembership),
}

/// [`openraft::Entry`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WireEntry {
    /// Its id.
    pub log_id: WireLogId,
    /// What it carries.
    pub payload: WirePayload,
}

impl From<&LogId> for WireLogId {
    fn from(id: &LogId) -> Self {
        WireLogId {
            term: id.leader_id.term,
            node_id: id.leader_id.node_id,
            index: id.index,
        }
    }
}

impl From<WireLogId> for LogId {
    fn from(id: WireLogId) -> Self {
        LogId::new(CommittedLeaderId::new(id.term, id.node_id), id.index)
    }
}

impl From<&Vote> for WireVote {
    fn from(vote: &Vote) -> Self {
        WireVote {
            term: vote.leader_id.term,
            node_id: vote.leader_id.node_id,
            committed: vote.committed,
        }
    }
}

impl From<WireVote> for Vote {
    fn from(vote: WireVote) -> Self {
        if vote.committed {
            Vote::new_committed(vote.term, vote.node_id)
        } else {
            Vote::new(vote.term, vote.node_id)
        }
    }
}

impl From<&Membership<NodeId, BasicNode>> for WireMembership {
    fn from(m: &Membership<NodeId, BasicNode>) -> Self {
        WireMembership {
            configs: m
                .get_joint_config()
                .iter()
                .map(|set| set.iter().copied().collect())
                .collect(),
            nodes: m
                .nodes()
                .map(|(id, node)| WireNode {
                    id: *id,
                    addr: node.addr.clone(),
                })
                .collect(),
        }
    }
}

impl From<WireMembership> for Membership<NodeId, BasicNode> {
    fn from(m: WireMembership) -> Self {
        let configs: Vec<BTreeSet<NodeId>> = m
            .configs
            .into_iter()
            .map(|c| c.into_iter().collect())
            .collect();
        let nodes: BTreeMap<NodeId, BasicNode> = m
            .nodes
            .into_iter()
            .map(|n| (n.id, BasicNode { addr: n.addr }))
            .collect();
        Membership::new(configs, nodes)
    }
}

impl From<&StoredMembership<NodeId, BasicNode>> for WireStoredMembership {
    fn from(m: &StoredMembership<NodeId, BasicNode>) -> Self {
        WireStoredMembership {
            log_id: m.log_id().as_ref().map(WireLogId::from),
            membership: WireMembership::from(m.membership()),
        }
    }
}

impl From<WireStoredMembership> for StoredMembership<NodeId, BasicNode> {
    fn from(m: WireStoredMembership) -> Self {
        StoredMembership::new(m.log_id.map(LogId::from), m.membership.into())
    }
}

impl From<&Entry> for WireEntry {
    fn from(entry: &Entry) -> Self {
        WireEntry {
            log_id: WireLogId::from(&entry.log_id),
            payload: match &entry.payload {
                EntryPayload::Blank => WirePayload::Blank,
                EntryPayload::Normal(commands) => WirePayload::Normal(commands.clone()),
                EntryPayload::Membership(m) => WirePayload::Membership(m.into()),
            },
        }
    }
}

impl From<WireEntry> for Entry {
    fn from(entry: WireEntry) -> Self {
        Entry {
            log_id: entry.log_id.into(),
            payload: match entry.payload {
                WirePayload::Blank => EntryPayload::Blank,
                WirePayload::Normal(commands) => EntryPayload::Normal(commands),
                WirePayload::Membership(m) => EntryPayload::Membership(m.into()),
            },
        }
    }
}

/// Encodes one log entry (the log store's record body and the wire form).
pub fn encode_entry(entry: &Entry) -> Result<AlignedVec, CodecError> {
    encode(&WireEntry::from(entry))
}

/// Decodes one log entry.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, CodecError> {
    decode::<WireEntry>(bytes).map(Entry::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Command;
    use herald_client::wire::{IdempotencyKey, Principal};

    #[test]
    fn a_snapshot_of_another_kind_or_format_is_refused_by_name() {
        let value = WireLogId {
            term: 3,
            node_id: 2,
            index: 9,
        };
        let data = encode_snapshot(b"HRLDTEST", 2, &value).unwrap();
        assert_eq!(
            decode_snapshot::<WireLogId>("test", b"HRLDTEST", 2, &data).unwrap(),
            value
        );
        // The body alone (no header), another magic, another version, too short.
        let body = encode(&value).unwrap();
        let refusals = [
            decode_snapshot::<WireLogId>("test", b"HRLDTEST", 2, &body),
            decode_snapshot::<WireLogId>("test", b"HRLDMETA", 2, &data),
            decode_snapshot::<WireLogId>("test", b"HRLDTEST", 3, &data),
            decode_snapshot::<WireLogId>("test", b"HRLDTEST", 2, &data[..10]),
        ];
        let expected = ["no header", "HRLDTEST", "it is format 2", "only 10 bytes"];
        for (refusal, expected) in refusals.into_iter().zip(expected) {
            let e = refusal.unwrap_err();
            assert!(matches!(e, CodecError::SnapshotFormat { .. }), "{e}");
            assert!(e.to_string().contains(expected), "{e}");
        }
    }

    #[test]
    fn entries_round_trip() {
        let membership = Membership::new(
            vec![BTreeSet::from([1, 2, 3])],
            BTreeMap::from([(
                4,
                BasicNode {
                    addr: "127.0.0.1:7440".into(),
                },
            )]),
        );
        let entries = [
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(2, 3), 2),
                payload: EntryPayload::Membership(membership),
            },
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(2, 3), 3),
                payload: EntryPayload::Normal(crate::raft::Batch::new(vec![Command::Publish {
                    conv: 7,
                    sender: Principal::Service("svc".into()),
                    key: IdempotencyKey::Caller("k".into()),
                    payload: b"hello".to_vec(),
                    timestamp_ms: 42,
                }])),
            },
        ];
        for entry in entries {
            let bytes = encode_entry(&entry).unwrap();
            assert_eq!(decode_entry(&bytes).unwrap(), entry);
            // Unaligned input decodes too.
            let mut shifted = vec![0u8];
            shifted.extend_from_slice(&bytes);
            assert_eq!(decode_entry(&shifted[1..]).unwrap(), entry);
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode_entry(&[0xff; 3]).is_err());
        assert!(decode::<WireVote>(&[]).is_err());
    }

    #[test]
    fn votes_round_trip() {
        for vote in [Vote::new(3, 2), Vote::new_committed(5, 1)] {
            let bytes = encode(&WireVote::from(&vote)).unwrap();
            assert_eq!(Vote::from(decode::<WireVote>(&bytes).unwrap()), vote);
        }
    }
}
