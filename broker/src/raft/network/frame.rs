//! Peer frames: the single source of truth for what goes on a node-to-node stream.
//!
//! Owns: the peer frame layout, the request and reply types ([`PeerRequest`],
//! [`PeerReply`]), their conversions to and from openraft's messages, reading and
//! writing one frame on a quinn stream, and the hello proof. Must not: interpret a
//! request (that is [`server`](super::server)'s job) or retry anything.
//!
//! # Layout of a peer stream
//!
//! Every RPC is one bidirectional QUIC stream on a connection with ALPN
//! [`ALPN_PEER`](herald_client::wire::ALPN_PEER) (`herald-peer/1`; the ALPN is the
//! protocol version, so there is no preamble). The dialer writes exactly one request
//! frame and finishes its send side; the acceptor writes exactly one reply frame and
//! finishes its side.
//!
//! ```text
//!  dialer -> acceptor (then FIN)
//!  +-------------------+-----------------------------------------------+
//!  | body_len (u32 LE) | body: rkyv archive of `PeerRequest`, body_len B |
//!  +-------------------+-----------------------------------------------+
//!   0                 4                                       4+body_len
//!
//!  acceptor -> dialer (then FIN)
//!  +-------------------+-----------------------------------------------+
//!  | body_len (u32 LE) | body: rkyv archive of `PeerReply`, body_len B   |
//!  +-------------------+-----------------------------------------------+
//! ```
//!
//! * `body_len` is checked against the frame's maximum *before* any body byte is read
//!   or any buffer is allocated ([`FrameError::Oversized`]): [`HELLO_FRAME_BYTES_MAX`]
//!   for the first stream of a connection (nothing is authenticated yet),
//!   [`PEER_FRAME_BYTES_MAX`] for requests after the hello, [`PEER_REPLY_BYTES_MAX`]
//!   for replies.
//! * Every body is validated with rkyv's checked access (bytecheck, via
//!   [`codec::decode`]) before any field is used ([`FrameError::Invalid`]).
//! * Errors carry the QUIC stream id and, for short reads, how many bytes arrived.
//!
//! Replies are bounded by [`PEER_REPLY_BYTES_MAX`], except the answer to a batch
//! ([`PeerReply::ForwardedBatch`]), bounded by [`PEER_BATCH_REPLY_BYTES_MAX`].
//!
//! # Groups
//!
//! After the hello, every request is [`PeerRequest::Group`]: a group id and a
//! [`GroupRequest`] for that Raft group. All groups two nodes share use the same
//! connection (one stream per RPC, so one group's snapshot never holds up another's
//! heartbeat). An acceptor that hosts no replica of the group answers
//! [`PeerReply::NoGroup`] (the dialer treats the group as unreachable there).
//!
//! # Forwarding writes
//!
//! A node hands client writes to a group's leader in one of two ways:
//!
//! * [`GroupRequest::Forward`]`(command)`: one command; answered with
//!   [`PeerReply::Forwarded`]`(response)` once committed and applied.
//! * [`GroupRequest::ForwardBatch`]`(commands)`: up to [`FORWARD_BATCH_COMMANDS_MAX`]
//!   commands, proposed by the leader one after the other in the order given, so their
//!   log entries are in that order. Answered with
//!   [`PeerReply::ForwardedBatch`]`(results)`: exactly one element per command, in the
//!   same order; element `i` is `Some(response)` when command `i` was committed and
//!   applied, `None` when it was not (leadership moved, or Raft stopped, while the batch
//!   was in flight); the sender retries the `None`s elsewhere (commands are idempotent).
//!   Refusal texts in the results are cut to [`ERROR_TEXT_BYTES_MAX`] bytes.
//!
//! Both are answered with [`PeerReply::NotLeader`] when the acceptor is not the leader
//! (nothing was proposed), and for a batch also when no command of it was committed
//! because leadership moved. A batch of more than [`FORWARD_BATCH_COMMANDS_MAX`]
//! commands is answered with [`PeerReply::Error`] and nothing is proposed.
//!
//! The first stream of every connection carries [`PeerRequest::Hello`]: the dialer's
//! node id and an HMAC-SHA256 proof that it knows the cluster secret ([`hello_proof`]).
//! The acceptor answers [`PeerReply::HelloOk`], or [`PeerReply::Refused`] and closes
//! the connection with [`CLOSE_AUTH_FAILED`] / [`CLOSE_PROTOCOL`].

use openraft::error::{InstallSnapshotError, SnapshotMismatch};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{EntryPayload, SnapshotMeta, SnapshotSegmentId};
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use crate::raft::codec::{
    self, CodecError, WireEntry, WireLogId, WirePayload, WireStoredMembership, WireVote,
};
use crate::raft::{Entry, GroupId, LogId, NodeId, Response, TypeConfig, Vote};
use crate::store::{Action, Command};
use herald_client::wire::{Message, Principal, Refusal};

/// Length of a frame header (the body length, u32 little-endian).
pub const FRAME_HEADER_LEN: usize = 4;

/// Largest request body after the hello: 64 MiB.
///
/// Why this size: openraft sends up to `max_payload_entries` (default 300) entries per
/// AppendEntries; a client message is at most ~1.06 MiB
/// ([`FRAME_BYTES_CEILING`](herald_client::wire::FRAME_BYTES_CEILING)), so 64 MiB holds
/// 60 maximum-size messages or 300 of ~200 KiB, and openraft's snapshot chunks (3 MiB
/// by default) many times over. A batch that would encode larger is never sent: the
/// dialer answers openraft with `PayloadTooLarge` and openraft retries with fewer
/// entries. The acceptor buffers at most one such body per open stream, so an
/// *authenticated* peer can make a node hold at most `streams_max` × 64 MiB.
pub const PEER_FRAME_BYTES_MAX: u32 = 64 * 1024 * 1024;

/// Largest body of the first frame on a connection (the hello), read before the peer
/// is authenticated: an unauthenticated dialer can make the acceptor buffer no more.
pub const HELLO_FRAME_BYTES_MAX: u32 = 1024;

/// Largest reply body: replies are votes, log ids, a command's outcome or a short
/// error text, all far below 1 MiB.
pub const PEER_REPLY_BYTES_MAX: u32 = 1024 * 1024;

/// Most commands in one [`GroupRequest::ForwardBatch`]; a larger batch is not sent by
/// the dialer and is refused by the acceptor.
pub const FORWARD_BATCH_COMMANDS_MAX: usize = 4096;

/// Largest body of a [`PeerReply::ForwardedBatch`]: 32 MiB. Every element is at most
/// a refusal whose text is cut to [`ERROR_TEXT_BYTES_MAX`] (about 4.1 KiB archived), so
/// [`FORWARD_BATCH_COMMANDS_MAX`] of them stay under ~17 MiB.
pub const PEER_BATCH_REPLY_BYTES_MAX: u32 = 32 * 1024 * 1024;

/// Error texts sent to a peer are cut to this many bytes.
pub const ERROR_TEXT_BYTES_MAX: usize = 4 * 1024;

/// Application close code: the hello's proof did not verify (wrong cluster secret).
pub const CLOSE_AUTH_FAILED: u32 = 1;
/// Application close code: the peer broke the protocol (no hello first, bad frame).
pub const CLOSE_PROTOCOL: u32 = 2;
/// Application close code: this node is done with the connection (eviction, shutdown).
pub const CLOSE_DONE: u32 = 0;
/// Stream stop/reset code for a malformed or unreadable frame.
pub const STREAM_MALFORMED: u32 = 1;
/// Stream reset code: the dialer gave up on the RPC before its request was written.
pub const STREAM_CANCELLED: u32 = 2;

/// Domain-separation label of the hello proof.
pub const HELLO_PROOF_LABEL: &[u8] = b"herald-peer-auth/1";
/// TLS exporter label used to bind the hello proof to one TLS session.
pub const HELLO_EXPORTER_LABEL: &[u8] = b"EXPORTER-herald-peer-auth/1";
/// Length of the TLS exporter value mixed into the proof.
pub const HELLO_EXPORTER_BYTES: usize = 32;

/// Errors moving one peer frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// A frame's length prefix is above the maximum for its position; nothing of the
    /// body was read or allocated.
    #[error("{what} frame on stream {stream} announces {len} bytes, above the maximum of {max}")]
    Oversized {
        /// Which frame (`hello`, `request`, `reply`).
        what: &'static str,
        /// The stream.
        stream: quinn::StreamId,
        /// The announced body length.
        len: u64,
        /// The maximum for this frame.
        max: u32,
    },
    /// An outgoing frame would be larger than the receiver accepts.
    #[error("{what} frame of {len} bytes is above the maximum of {max}; not sent")]
    TooLarge {
        /// Which frame.
        what: &'static str,
        /// Its encoded body length.
        len: u64,
        /// The receiver's maximum.
        max: u32,
    },
    /// The stream ended inside the frame.
    #[error("stream {stream} ended inside the {what} frame: {got} of {needed} bytes arrived")]
    Truncated {
        /// Which frame.
        what: &'static str,
        /// The stream.
        stream: quinn::StreamId,
        /// Bytes that part of the frame needed (header, or header + body).
        needed: u64,
        /// Bytes that arrived.
        got: u64,
    },
    /// Reading from the stream failed (reset, connection lost).
    #[error("reading the {what} frame from stream {stream}: {source}")]
    Read {
        /// Which frame.
        what: &'static str,
        /// The stream.
        stream: quinn::StreamId,
        /// quinn's error.
        source: quinn::ReadError,
    },
    /// Writing to the stream failed (stopped, connection lost).
    #[error("writing the {what} frame to stream {stream}: {source}")]
    Write {
        /// Which frame.
        what: &'static str,
        /// The stream.
        stream: quinn::StreamId,
        /// quinn's error.
        source: quinn::WriteError,
    },
    /// The body is not a valid archive of the expected type.
    #[error("{what} frame on stream {stream} failed validation: {source}")]
    Invalid {
        /// Which frame.
        what: &'static str,
        /// The stream.
        stream: quinn::StreamId,
        /// The codec's error (carries the body length).
        source: CodecError,
    },
    /// The value could not be encoded.
    #[error("cannot encode the {what} frame: {source}")]
    Encode {
        /// Which frame.
        what: &'static str,
        /// The codec's error.
        source: CodecError,
    },
}

/// The dialer's first message on a connection.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PeerHello {
    /// The dialing node's id.
    pub node_id: NodeId,
    /// [`hello_proof`] for `node_id` on this TLS session.
    pub proof: Vec<u8>,
}

/// [`openraft::SnapshotMeta`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WireSnapshotMeta {
    /// The last entry the snapshot covers.
    pub last_log_id: Option<WireLogId>,
    /// The membership as of that entry.
    pub last_membership: WireStoredMembership,
    /// The snapshot's unique id.
    pub snapshot_id: String,
}

/// A request from the dialer, one per stream.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum PeerRequest {
    /// First stream of a connection: who is dialing, and the proof.
    Hello(PeerHello),
    /// A request for one Raft group: every group of both nodes shares the connection.
    /// Answered with [`PeerReply::NoGroup`] when the acceptor hosts no replica of it.
    Group {
        /// The group.
        group: GroupId,
        /// What is asked of it.
        request: GroupRequest,
    },
}

/// What one Raft group is asked.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum GroupRequest {
    /// [`AppendEntriesRequest`].
    AppendEntries {
        /// The leader's vote.
        vote: WireVote,
        /// The entry just before `entries`.
        prev_log_id: Option<WireLogId>,
        /// Entries to append (empty for a heartbeat).
        entries: Vec<WireEntry>,
        /// The leader's commit index.
        leader_commit: Option<WireLogId>,
    },
    /// [`VoteRequest`].
    Vote {
        /// The candidate's vote.
        vote: WireVote,
        /// The candidate's last log id.
        last_log_id: Option<WireLogId>,
    },
    /// [`InstallSnapshotRequest`]: one chunk.
    InstallSnapshot {
        /// The leader's vote.
        vote: WireVote,
        /// Which snapshot.
        meta: WireSnapshotMeta,
        /// Byte offset of `data` in the snapshot.
        offset: u64,
        /// The chunk.
        data: Vec<u8>,
        /// True for the last chunk.
        done: bool,
    },
    /// A node forwards a client's write to the group's leader.
    Forward(Command),
    /// A node forwards several client writes to the group's leader, to be proposed in
    /// this order (at most [`FORWARD_BATCH_COMMANDS_MAX`]).
    ForwardBatch(crate::raft::Batch),
    /// A node with no replica of the group (or whose replica may lag) reads from the
    /// group's leader. Answered with [`PeerReply::Authorized`] or [`PeerReply::History`].
    Read(ReadRequest),
    /// The group's leader is asked to carry out (or call off) one replica move.
    /// Answered with [`PeerReply::Done`] once the voters it asks for are committed.
    Reconfigure(MoveRequest),
    /// The group's leader asks this replica to take over: it starts an election at once
    /// (leader balance). Answered with [`PeerReply::Done`]; whether it wins shows in the
    /// group's metrics.
    Elect,
    /// Opens a watch: the leader pushes new messages of `convs` (and later additions)
    /// on this stream until either side ends it. Answered with [`PeerReply::Watching`],
    /// then the stream carries [`super::watch`] frames both ways.
    Watch {
        /// The conversations to watch (at most [`WATCH_CONVS_MAX`]).
        convs: Vec<u64>,
    },
}

/// Most conversations one watch may name at once (in the opening request or in all).
pub const WATCH_CONVS_MAX: usize = 1 << 20;

/// One replica move of a group, as the metadata leader asks the group's leader for it.
///
/// Carrying out: `add` joins as a learner, catches up, and becomes a voter in
/// `remove`'s place. Calling off (`abort`): the voters become `voters` again and `add`
/// leaves the group. Either way only from `voters` (what the map says the group had
/// before the move) or from the move's own result: a stale request for voters the group
/// no longer has is refused, never applied.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MoveRequest {
    /// The node that gets (or was to get) a replica.
    pub add: NodeId,
    /// Its QUIC address.
    pub addr: String,
    /// The replica taken out (or kept, on abort).
    pub remove: NodeId,
    /// The group's voters before the move, as the map records them.
    pub voters: Vec<NodeId>,
    /// Call the move off instead of carrying it out.
    pub abort: bool,
}

/// A read of a conversation's state at the group's leader.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ReadRequest {
    /// May `principal` do `action` in `conv`?
    Authorize {
        /// Who asks.
        principal: Principal,
        /// What for.
        action: Action,
        /// Where.
        conv: u64,
    },
    /// Up to `limit` messages of `conv` from seq `from` (the page is also cut to
    /// [`HISTORY_REPLY_BYTES_MAX`]).
    History {
        /// The conversation.
        conv: u64,
        /// The first seq wanted.
        from: u64,
        /// Most messages wanted (0: only `first_seq` and `next_seq`).
        limit: u32,
    },
}

/// A page of history read at the leader.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WireHistory {
    /// Messages in seq order, gapless.
    pub messages: Vec<Message>,
    /// The oldest retained seq.
    pub first_seq: u64,
    /// The seq the next message will get.
    pub next_seq: u64,
}

/// Bound on the messages of one [`PeerReply::History`]: a page is cut before it
/// passes this many payload bytes (the reader asks again from where it stopped).
pub const HISTORY_REPLY_BYTES_MAX: usize = 8 * 1024 * 1024;

/// [`AppendEntriesResponse`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum WireAppendEntriesResponse {
    /// All entries accepted.
    Success,
    /// Accepted up to the given log id.
    PartialSuccess(Option<WireLogId>),
    /// `prev_log_id` did not match.
    Conflict,
    /// The follower has seen a higher vote.
    HigherVote(WireVote),
}

/// A fatal error of the acceptor's Raft ([`openraft::error::Fatal`]).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum WireFatal {
    /// Raft on the acceptor has stopped.
    Stopped,
    /// Raft on the acceptor panicked.
    Panicked,
    /// The acceptor's storage failed (its message).
    Storage(String),
}

/// A reply from the acceptor, one per stream.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum PeerReply {
    /// The hello verified; RPCs may follow on other streams.
    HelloOk,
    /// [`AppendEntriesResponse`].
    AppendEntries(WireAppendEntriesResponse),
    /// [`VoteResponse`].
    Vote {
        /// The acceptor's vote after handling the request.
        vote: WireVote,
        /// True when granted.
        vote_granted: bool,
        /// The acceptor's last log id.
        last_log_id: Option<WireLogId>,
    },
    /// [`InstallSnapshotResponse`].
    InstallSnapshot {
        /// The acceptor's vote.
        vote: WireVote,
    },
    /// The chunk's offset does not continue the snapshot being received
    /// ([`SnapshotMismatch`]); the leader restarts from offset 0.
    SnapshotMismatch {
        /// Snapshot id expected.
        expect_id: String,
        /// Offset expected.
        expect_offset: u64,
        /// Snapshot id received.
        got_id: String,
        /// Offset received.
        got_offset: u64,
    },
    /// The forwarded command was committed and applied; the state machine's answer.
    Forwarded(Response),
    /// The answer to [`GroupRequest::ForwardBatch`]: one element per command, in order;
    /// `Some` with the state machine's answer when committed and applied, `None` when
    /// not (retry it elsewhere).
    ForwardedBatch(Vec<Option<Response>>),
    /// The acceptor hosts no replica of the group asked for (it moved away, or was
    /// never here): ask another replica.
    NoGroup {
        /// The group.
        group: GroupId,
    },
    /// The acceptor is not the leader; the leader it knows of (id and address).
    NotLeader {
        /// The current leader, when known.
        leader: Option<(NodeId, String)>,
    },
    /// The request was refused (authentication or protocol); the connection closes.
    Refused(String),
    /// The acceptor's Raft failed fatally.
    Fatal(WireFatal),
    /// Raft returned another error (its text).
    Error(String),
    /// The answer to [`ReadRequest::Authorize`].
    Authorized(Result<(), Refusal>),
    /// The answer to [`ReadRequest::History`].
    History(Result<WireHistory, Refusal>),
    /// The request was carried out.
    Done,
    /// The watch is open: the next seq of each watched conversation when it was
    /// registered (every later message of it is pushed).
    Watching {
        /// `(conv, next_seq)` per watched conversation.
        heads: Vec<(u64, u64)>,
    },
}

impl PeerReply {
    /// A short name of the variant, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerReply::HelloOk => "HelloOk",
            PeerReply::AppendEntries(_) => "AppendEntries",
            PeerReply::Vote { .. } => "Vote",
            PeerReply::InstallSnapshot { .. } => "InstallSnapshot",
            PeerReply::SnapshotMismatch { .. } => "SnapshotMismatch",
            PeerReply::Forwarded(_) => "Forwarded",
            PeerReply::ForwardedBatch(_) => "ForwardedBatch",
            PeerReply::NoGroup { .. } => "NoGroup",
            PeerReply::NotLeader { .. } => "NotLeader",
            PeerReply::Refused(_) => "Refused",
            PeerReply::Fatal(_) => "Fatal",
            PeerReply::Error(_) => "Error",
            PeerReply::Authorized(_) => "Authorized",
            PeerReply::History(_) => "History",
            PeerReply::Watching { .. } => "Watching",
            PeerReply::Done => "Done",
        }
    }

    /// [`PeerReply::Error`] with `text` cut to [`ERROR_TEXT_BYTES_MAX`].
    pub fn error(text: impl std::fmt::Display) -> Self {
        PeerReply::Error(bounded_text(text))
    }

    /// [`PeerReply::Refused`] with `text` cut to [`ERROR_TEXT_BYTES_MAX`].
    pub fn refused(text: impl std::fmt::Display) -> Self {
        PeerReply::Refused(bounded_text(text))
    }

    /// [`PeerReply::ForwardedBatch`] with every refusal's text cut to
    /// [`ERROR_TEXT_BYTES_MAX`], so the reply fits [`PEER_BATCH_REPLY_BYTES_MAX`].
    pub fn forwarded_batch(results: Vec<Option<Response>>) -> Self {
        PeerReply::ForwardedBatch(
            results
                .into_iter()
                .map(|result| {
                    result.map(|response| {
                        response.map_err(|mut refusal| {
                            if refusal.detail.len() > ERROR_TEXT_BYTES_MAX {
                                refusal.detail = bounded_text(&refusal.detail);
                            }
                            refusal
                        })
                    })
                })
                .collect(),
        )
    }

    /// The largest body this reply may have on the wire.
    pub fn bytes_max(&self) -> u32 {
        match self {
            PeerReply::ForwardedBatch(_) | PeerReply::History(_) | PeerReply::Watching { .. } => {
                PEER_BATCH_REPLY_BYTES_MAX
            }
            _ => PEER_REPLY_BYTES_MAX,
        }
    }
}

impl PeerRequest {
    /// A short name of the variant, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerRequest::Hello(_) => "Hello",
            PeerRequest::Group { request, .. } => request.kind(),
        }
    }
}

impl GroupRequest {
    /// A short name of the variant, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            GroupRequest::AppendEntries { .. } => "AppendEntries",
            GroupRequest::Vote { .. } => "Vote",
            GroupRequest::InstallSnapshot { .. } => "InstallSnapshot",
            GroupRequest::Forward(_) => "Forward",
            GroupRequest::ForwardBatch(_) => "ForwardBatch",
            GroupRequest::Read(ReadRequest::Authorize { .. }) => "Authorize",
            GroupRequest::Read(ReadRequest::History { .. }) => "History",
            GroupRequest::Watch { .. } => "Watch",
            GroupRequest::Elect => "Elect",
            GroupRequest::Reconfigure(_) => "Reconfigure",
        }
    }

    /// This request, addressed to `group`.
    pub fn to(self, group: GroupId) -> PeerRequest {
        PeerRequest::Group {
            group,
            request: self,
        }
    }
}

/// `text` rendered and cut to at most [`ERROR_TEXT_BYTES_MAX`] bytes on a char boundary.
pub fn bounded_text(text: impl std::fmt::Display) -> String {
    let mut s = text.to_string();
    if s.len() > ERROR_TEXT_BYTES_MAX {
        let mut end = ERROR_TEXT_BYTES_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

// ---------------------------------------------------------------------------------
// Conversions to and from openraft's messages.

/// Moves an entry into its wire form (no copy of a command's payload).
pub fn wire_entry(entry: Entry) -> WireEntry {
    WireEntry {
        log_id: WireLogId::from(&entry.log_id),
        payload: match entry.payload {
            EntryPayload::Blank => WirePayload::Blank,
            EntryPayload::Normal(command) => WirePayload::Normal(command),
            EntryPayload::Membership(m) => WirePayload::Membership((&m).into()),
        },
    }
}

fn wire_log_id(id: Option<LogId>) -> Option<WireLogId> {
    id.as_ref().map(WireLogId::from)
}

fn log_id(id: Option<WireLogId>) -> Option<LogId> {
    id.map(LogId::from)
}

impl From<AppendEntriesRequest<TypeConfig>> for GroupRequest {
    fn from(rpc: AppendEntriesRequest<TypeConfig>) -> Self {
        GroupRequest::AppendEntries {
            vote: WireVote::from(&rpc.vote),
            prev_log_id: wire_log_id(rpc.prev_log_id),
            entries: rpc.entries.into_iter().map(wire_entry).collect(),
            leader_commit: wire_log_id(rpc.leader_commit),
        }
    }
}

impl From<VoteRequest<NodeId>> for GroupRequest {
    fn from(rpc: VoteRequest<NodeId>) -> Self {
        GroupRequest::Vote {
            vote: WireVote::from(&rpc.vote),
            last_log_id: wire_log_id(rpc.last_log_id),
        }
    }
}

impl From<&SnapshotMeta<NodeId, openraft::BasicNode>> for WireSnapshotMeta {
    fn from(meta: &SnapshotMeta<NodeId, openraft::BasicNode>) -> Self {
        WireSnapshotMeta {
            last_log_id: wire_log_id(meta.last_log_id),
            last_membership: WireStoredMembership::from(&meta.last_membership),
            snapshot_id: meta.snapshot_id.clone(),
        }
    }
}

impl From<WireSnapshotMeta> for SnapshotMeta<NodeId, openraft::BasicNode> {
    fn from(meta: WireSnapshotMeta) -> Self {
        SnapshotMeta {
            last_log_id: log_id(meta.last_log_id),
            last_membership: meta.last_membership.into(),
            snapshot_id: meta.snapshot_id,
        }
    }
}

impl From<InstallSnapshotRequest<TypeConfig>> for GroupRequest {
    fn from(rpc: InstallSnapshotRequest<TypeConfig>) -> Self {
        GroupRequest::InstallSnapshot {
            vote: WireVote::from(&rpc.vote),
            meta: WireSnapshotMeta::from(&rpc.meta),
            offset: rpc.offset,
            data: rpc.data,
            done: rpc.done,
        }
    }
}

/// Builds openraft's AppendEntries request from the fields of
/// [`GroupRequest::AppendEntries`].
pub fn append_entries_request(
    vote: WireVote,
    prev_log_id: Option<WireLogId>,
    entries: Vec<WireEntry>,
    leader_commit: Option<WireLogId>,
) -> AppendEntriesRequest<TypeConfig> {
    AppendEntriesRequest {
        vote: vote.into(),
        prev_log_id: log_id(prev_log_id),
        entries: entries.into_iter().map(Entry::from).collect(),
        leader_commit: log_id(leader_commit),
    }
}

/// Builds openraft's Vote request from the fields of [`GroupRequest::Vote`].
pub fn vote_request(vote: WireVote, last_log_id: Option<WireLogId>) -> VoteRequest<NodeId> {
    VoteRequest {
        vote: vote.into(),
        last_log_id: log_id(last_log_id),
    }
}

/// Builds openraft's InstallSnapshot request from the fields of
/// [`GroupRequest::InstallSnapshot`].
pub fn install_snapshot_request(
    vote: WireVote,
    meta: WireSnapshotMeta,
    offset: u64,
    data: Vec<u8>,
    done: bool,
) -> InstallSnapshotRequest<TypeConfig> {
    InstallSnapshotRequest {
        vote: vote.into(),
        meta: meta.into(),
        offset,
        data,
        done,
    }
}

impl From<AppendEntriesResponse<NodeId>> for WireAppendEntriesResponse {
    fn from(resp: AppendEntriesResponse<NodeId>) -> Self {
        match resp {
            AppendEntriesResponse::Success => WireAppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(id) => {
                WireAppendEntriesResponse::PartialSuccess(wire_log_id(id))
            }
            AppendEntriesResponse::Conflict => WireAppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(vote) => {
                WireAppendEntriesResponse::HigherVote(WireVote::from(&vote))
            }
        }
    }
}

impl From<WireAppendEntriesResponse> for AppendEntriesResponse<NodeId> {
    fn from(resp: WireAppendEntriesResponse) -> Self {
        match resp {
            WireAppendEntriesResponse::Success => AppendEntriesResponse::Success,
            WireAppendEntriesResponse::PartialSuccess(id) => {
                AppendEntriesResponse::PartialSuccess(log_id(id))
            }
            WireAppendEntriesResponse::Conflict => AppendEntriesResponse::Conflict,
            WireAppendEntriesResponse::HigherVote(vote) => {
                AppendEntriesResponse::HigherVote(vote.into())
            }
        }
    }
}

impl From<VoteResponse<NodeId>> for PeerReply {
    fn from(resp: VoteResponse<NodeId>) -> Self {
        PeerReply::Vote {
            vote: WireVote::from(&resp.vote),
            vote_granted: resp.vote_granted,
            last_log_id: wire_log_id(resp.last_log_id),
        }
    }
}

/// Builds openraft's Vote response from the fields of [`PeerReply::Vote`].
pub fn vote_response(
    vote: WireVote,
    vote_granted: bool,
    last_log_id: Option<WireLogId>,
) -> VoteResponse<NodeId> {
    VoteResponse {
        vote: vote.into(),
        vote_granted,
        last_log_id: log_id(last_log_id),
    }
}

impl From<InstallSnapshotResponse<NodeId>> for PeerReply {
    fn from(resp: InstallSnapshotResponse<NodeId>) -> Self {
        PeerReply::InstallSnapshot {
            vote: WireVote::from(&resp.vote),
        }
    }
}

/// Builds openraft's InstallSnapshot response from [`PeerReply::InstallSnapshot`].
pub fn install_snapshot_response(vote: WireVote) -> InstallSnapshotResponse<NodeId> {
    InstallSnapshotResponse {
        vote: Vote::from(vote),
    }
}

impl From<&InstallSnapshotError> for PeerReply {
    fn from(e: &InstallSnapshotError) -> Self {
        match e {
            InstallSnapshotError::SnapshotMismatch(m) => PeerReply::SnapshotMismatch {
                expect_id: m.expect.id.clone(),
                expect_offset: m.expect.offset,
                got_id: m.got.id.clone(),
                got_offset: m.got.offset,
            },
        }
    }
}

/// Builds openraft's [`SnapshotMismatch`] from [`PeerReply::SnapshotMismatch`].
pub fn snapshot_mismatch(
    expect_id: String,
    expect_offset: u64,
    got_id: String,
    got_offset: u64,
) -> SnapshotMismatch {
    SnapshotMismatch {
        expect: SnapshotSegmentId {
            id: expect_id,
            offset: expect_offset,
        },
        got: SnapshotSegmentId {
            id: got_id,
            offset: got_offset,
        },
    }
}

impl From<&openraft::error::Fatal<NodeId>> for WireFatal {
    fn from(e: &openraft::error::Fatal<NodeId>) -> Self {
        match e {
            openraft::error::Fatal::Stopped => WireFatal::Stopped,
            openraft::error::Fatal::Panicked => WireFatal::Panicked,
            openraft::error::Fatal::StorageError(s) => WireFatal::Storage(bounded_text(s)),
        }
    }
}

// ---------------------------------------------------------------------------------
// The hello proof.

/// The hello proof: HMAC-SHA256 keyed with the cluster secret over
/// `HELLO_PROOF_LABEL || node_id (u64 LE) || exporter`, where `exporter` is
/// [`HELLO_EXPORTER_BYTES`] of TLS keying material exported from this connection's
/// session (RFC 5705/8446 exporter, label [`HELLO_EXPORTER_LABEL`]). Binding the proof
/// to the session means a proof seen once cannot be replayed on another connection.
pub fn hello_proof(secret: &[u8], node_id: NodeId, exporter: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::sign(&key, &proof_message(node_id, exporter))
        .as_ref()
        .to_vec()
}

/// Checks `proof` in constant time (ring::hmac::verify).
pub fn verify_hello_proof(secret: &[u8], node_id: NodeId, exporter: &[u8], proof: &[u8]) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, &proof_message(node_id, exporter), proof).is_ok()
}

fn proof_message(node_id: NodeId, exporter: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(HELLO_PROOF_LABEL.len() + 8 + exporter.len());
    msg.extend_from_slice(HELLO_PROOF_LABEL);
    msg.extend_from_slice(&node_id.to_le_bytes());
    msg.extend_from_slice(exporter);
    msg
}

/// The connection's TLS exporter value for the hello proof; `None` when the TLS
/// session cannot export (never for TLS 1.3).
pub fn connection_exporter(conn: &quinn::Connection) -> Option<[u8; HELLO_EXPORTER_BYTES]> {
    let mut out = [0u8; HELLO_EXPORTER_BYTES];
    conn.export_keying_material(&mut out, HELLO_EXPORTER_LABEL, b"")
        .ok()
        .map(|()| out)
}

// ---------------------------------------------------------------------------------
// Encoding and moving frames.

/// Encodes `value` as one frame (header + body); refuses a body above `max`.
pub fn encode_frame<T>(value: &T, what: &'static str, max: u32) -> Result<Vec<u8>, FrameError>
where
    T: codec::Encodable,
{
    let body = codec::encode(value).map_err(|source| FrameError::Encode { what, source })?;
    let len = body.len() as u64;
    if len > u64::from(max) {
        return Err(FrameError::TooLarge { what, len, max });
    }
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    // Cannot truncate: len <= max <= u32::MAX.
    frame.extend_from_slice(&(len as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Checks a frame header against `max`; the body length when acceptable.
pub fn check_header(
    header: [u8; FRAME_HEADER_LEN],
    what: &'static str,
    stream: quinn::StreamId,
    max: u32,
) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header);
    if len > max {
        return Err(FrameError::Oversized {
            what,
            stream,
            len: u64::from(len),
            max,
        });
    }
    Ok(len as usize)
}

/// Validates `body` as an archived `T` and deserializes it.
pub fn decode_body<T>(
    body: &[u8],
    what: &'static str,
    stream: quinn::StreamId,
) -> Result<T, FrameError>
where
    T: Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    codec::decode::<T>(body).map_err(|source| FrameError::Invalid {
        what,
        stream,
        source,
    })
}

/// Reads one frame from `recv`: header, check against `max`, then exactly the body
/// (into an aligned buffer, so validation needs no copy), then validation.
pub async fn read_frame<T>(
    recv: &mut quinn::RecvStream,
    what: &'static str,
    max: u32,
) -> Result<T, FrameError>
where
    T: Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    let stream = recv.id();
    let mut header = [0u8; FRAME_HEADER_LEN];
    read_exact(recv, &mut header, what, 0).await?;
    let len = check_header(header, what, stream, max)?;
    let mut body = RecvBuffer::take(len);
    read_exact(recv, &mut body.0, what, FRAME_HEADER_LEN as u64).await?;
    decode_body(&body.0, what, stream)
}

/// Receive buffers kept for reuse across RPCs, at most this many.
pub const RECV_BUFFERS_KEPT_MAX: usize = 8;
/// A receive buffer larger than this is freed rather than kept (a snapshot chunk or a
/// catch-up batch should not pin its memory).
pub const RECV_BUFFER_KEPT_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Buffers returned by finished reads. A fresh buffer per AppendEntries cost the
/// follower page faults and zeroing of new memory: `clear_page_erms` was 20% of its
/// CPU in `perf` (ARCHITECTURE.md, Performance).
static RECV_BUFFERS: std::sync::Mutex<Vec<AlignedVec<16>>> = std::sync::Mutex::new(Vec::new());

/// A frame body buffer of exactly the requested length, taken from [`RECV_BUFFERS`]
/// when one is there and returned to it on drop.
struct RecvBuffer(AlignedVec<16>);

impl RecvBuffer {
    fn take(len: usize) -> Self {
        let kept = RECV_BUFFERS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let mut buffer = kept.unwrap_or_default();
        buffer.clear();
        buffer.resize(len, 0);
        RecvBuffer(buffer)
    }
}

impl Drop for RecvBuffer {
    fn drop(&mut self) {
        if self.0.capacity() > RECV_BUFFER_KEPT_BYTES_MAX {
            return;
        }
        let mut kept = RECV_BUFFERS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.len() < RECV_BUFFERS_KEPT_MAX {
            kept.push(std::mem::take(&mut self.0));
        }
    }
}

async fn read_exact(
    recv: &mut quinn::RecvStream,
    buf: &mut [u8],
    what: &'static str,
    before: u64,
) -> Result<(), FrameError> {
    let stream = recv.id();
    recv.read_exact(buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(n) => FrameError::Truncated {
            what,
            stream,
            needed: before + buf.len() as u64,
            got: before + n as u64,
        },
        quinn::ReadExactError::ReadError(source) => FrameError::Read {
            what,
            stream,
            source,
        },
    })
}

/// Writes one frame and keeps the stream open (watch streams carry many).
pub async fn write_frame_open(
    send: &mut quinn::SendStream,
    frame: &[u8],
    what: &'static str,
) -> Result<(), FrameError> {
    let stream = send.id();
    send.write_all(frame)
        .await
        .map_err(|source| FrameError::Write {
            what,
            stream,
            source,
        })
}

/// Writes one encoded frame and finishes the stream.
pub async fn write_frame(
    send: &mut quinn::SendStream,
    frame: &[u8],
    what: &'static str,
) -> Result<(), FrameError> {
    let stream = send.id();
    send.write_all(frame)
        .await
        .map_err(|source| FrameError::Write {
            what,
            stream,
            source,
        })?;
    // Only fails when the stream was already finished or reset; the write above
    // would have failed first.
    let _ = send.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_client::wire::{IdempotencyKey, RefusalCode};
    use openraft::{BasicNode, CommittedLeaderId, Membership, StoredMembership};
    use std::collections::{BTreeMap, BTreeSet};

    fn round_trip<T>(value: &T, what: &'static str) -> T
    where
        T: Archive + codec::Encodable,
        T::Archived: for<'a> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>,
            > + Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        let frame = encode_frame(value, what, PEER_FRAME_BYTES_MAX).unwrap();
        let header: [u8; 4] = frame[..4].try_into().unwrap();
        let stream = quinn::StreamId::new(quinn::Side::Client, quinn::Dir::Bi, 0);
        let len = check_header(header, what, stream, PEER_FRAME_BYTES_MAX).unwrap();
        assert_eq!(len, frame.len() - 4);
        // The body after a 4-byte header is unaligned; decoding copies it.
        decode_body(&frame[4..], what, stream).unwrap()
    }

    /// Round-trips `request` addressed to group 7 and checks the address survives.
    fn group_round_trip(request: GroupRequest) -> GroupRequest {
        match round_trip(&request.to(7), "request") {
            PeerRequest::Group { group: 7, request } => request,
            other => panic!("wrong variant or group: {other:?}"),
        }
    }

    fn publish_entry(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(3, 1), index),
            payload: EntryPayload::Normal(crate::raft::Batch::new(vec![Command::Publish {
                conv: 9,
                sender: Principal::Service("backend".into()),
                key: IdempotencyKey::Caller("k-1".into()),
                payload: b"hello over raft".to_vec(),
                timestamp_ms: 1_700_000_000_000,
            }])),
        }
    }

    fn membership() -> StoredMembership<NodeId, BasicNode> {
        StoredMembership::new(
            Some(LogId::new(CommittedLeaderId::new(1, 1), 1)),
            Membership::new(
                vec![BTreeSet::from([1, 2, 3])],
                BTreeMap::from([
                    (1, BasicNode::new("127.0.0.1:7441")),
                    (2, BasicNode::new("127.0.0.1:7442")),
                    (3, BasicNode::new("127.0.0.1:7443")),
                ]),
            ),
        )
    }

    #[test]
    fn append_entries_with_a_publish_survives_encoding() {
        let rpc = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), 4)),
            entries: vec![
                Entry {
                    log_id: LogId::new(CommittedLeaderId::new(3, 1), 5),
                    payload: EntryPayload::Blank,
                },
                publish_entry(6),
                Entry {
                    log_id: LogId::new(CommittedLeaderId::new(3, 1), 7),
                    payload: EntryPayload::Membership(membership().membership().clone()),
                },
            ],
            leader_commit: Some(LogId::new(CommittedLeaderId::new(3, 1), 5)),
        };
        let expected = rpc.clone();
        let back = group_round_trip(GroupRequest::from(rpc));
        let GroupRequest::AppendEntries {
            vote,
            prev_log_id,
            entries,
            leader_commit,
        } = back
        else {
            panic!("wrong variant: {back:?}");
        };
        let got = append_entries_request(vote, prev_log_id, entries, leader_commit);
        assert_eq!(got.vote, expected.vote);
        assert_eq!(got.prev_log_id, expected.prev_log_id);
        assert_eq!(got.leader_commit, expected.leader_commit);
        assert_eq!(got.entries, expected.entries);
    }

    #[test]
    fn every_request_and_reply_round_trips() {
        let vote = VoteRequest::new(
            Vote::new(4, 2),
            Some(LogId::new(CommittedLeaderId::new(3, 1), 9)),
        );
        let back = group_round_trip(GroupRequest::from(vote.clone()));
        let GroupRequest::Vote {
            vote: v,
            last_log_id,
        } = back
        else {
            panic!("wrong variant");
        };
        assert_eq!(vote_request(v, last_log_id), vote);

        let snap = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(4, 2),
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 9)),
                last_membership: membership(),
                snapshot_id: "snap-9".into(),
            },
            offset: 4096,
            data: vec![7; 1000],
            done: true,
        };
        let back = group_round_trip(GroupRequest::from(snap.clone()));
        let GroupRequest::InstallSnapshot {
            vote,
            meta,
            offset,
            data,
            done,
        } = back
        else {
            panic!("wrong variant");
        };
        assert_eq!(
            install_snapshot_request(vote, meta, offset, data, done),
            snap
        );

        let hello = PeerRequest::Hello(PeerHello {
            node_id: 3,
            proof: hello_proof(b"s", 3, &[1; 32]),
        });
        assert_eq!(round_trip(&hello, "hello"), hello);
        let forward = GroupRequest::Forward(Command::Trim { now_ms: 5 });
        assert_eq!(group_round_trip(forward.clone()), forward);

        let cases: [fn() -> AppendEntriesResponse<NodeId>; 5] = [
            || AppendEntriesResponse::Success,
            || AppendEntriesResponse::PartialSuccess(None),
            || {
                AppendEntriesResponse::PartialSuccess(Some(LogId::new(
                    CommittedLeaderId::new(1, 2),
                    3,
                )))
            },
            || AppendEntriesResponse::Conflict,
            || AppendEntriesResponse::HigherVote(Vote::new(9, 3)),
        ];
        for resp in cases {
            let reply = PeerReply::AppendEntries(resp().into());
            let PeerReply::AppendEntries(back) = round_trip(&reply, "reply") else {
                panic!("wrong variant");
            };
            assert_eq!(AppendEntriesResponse::from(back), resp());
        }
        let vr = VoteResponse::new(Vote::new(5, 1), None, true);
        let PeerReply::Vote {
            vote,
            vote_granted,
            last_log_id,
        } = round_trip(&PeerReply::from(vr.clone()), "reply")
        else {
            panic!("wrong variant");
        };
        assert_eq!(vote_response(vote, vote_granted, last_log_id), vr);

        let replies = [
            PeerReply::HelloOk,
            PeerReply::InstallSnapshot {
                vote: WireVote::from(&Vote::new(1, 1)),
            },
            PeerReply::from(&InstallSnapshotError::SnapshotMismatch(snapshot_mismatch(
                "a".into(),
                0,
                "b".into(),
                7,
            ))),
            PeerReply::Forwarded(Ok(crate::raft::Outcome::Published {
                seq: 4,
                duplicate: false,
            })),
            PeerReply::Forwarded(Err(Refusal::new(RefusalCode::NotMember, "no"))),
            PeerReply::NotLeader {
                leader: Some((2, "10.0.0.2:7440".into())),
            },
            PeerReply::NotLeader { leader: None },
            PeerReply::NoGroup { group: 12 },
            PeerReply::Refused("wrong cluster secret".into()),
            PeerReply::Fatal(WireFatal::Storage("disk".into())),
            PeerReply::Error("x".into()),
        ];
        for reply in replies {
            assert_eq!(round_trip(&reply, "reply"), reply);
        }
    }

    #[test]
    fn batch_frames_round_trip_in_order() {
        let commands: Vec<Command> = (0..50)
            .map(|n| match n % 2 {
                0 => Command::Trim { now_ms: n },
                _ => match publish_entry(n).payload {
                    EntryPayload::Normal(commands) => commands[0].clone(),
                    _ => unreachable!(),
                },
            })
            .collect();
        let request = GroupRequest::ForwardBatch(commands.clone().into());
        assert_eq!(request.kind(), "ForwardBatch");
        assert_eq!(request.clone().to(7).kind(), "ForwardBatch");
        assert_eq!(group_round_trip(request.clone()), request);
        assert_eq!(
            group_round_trip(GroupRequest::ForwardBatch(Default::default())),
            GroupRequest::ForwardBatch(Default::default())
        );

        let results = vec![
            Some(Ok(crate::raft::Outcome::Published {
                seq: 1,
                duplicate: false,
            })),
            None,
            Some(Err(Refusal::new(RefusalCode::NotMember, "no"))),
            Some(Ok(crate::raft::Outcome::Changed)),
        ];
        let reply = PeerReply::forwarded_batch(results.clone());
        assert_eq!(reply, PeerReply::ForwardedBatch(results));
        assert_eq!(reply.kind(), "ForwardedBatch");
        assert_eq!(reply.bytes_max(), PEER_BATCH_REPLY_BYTES_MAX);
        let frame = encode_frame(&reply, "reply", reply.bytes_max()).unwrap();
        let stream = quinn::StreamId::new(quinn::Side::Server, quinn::Dir::Bi, 0);
        assert_eq!(
            decode_body::<PeerReply>(&frame[4..], "reply", stream).unwrap(),
            reply
        );
    }

    #[test]
    fn the_largest_batch_reply_fits_its_frame() {
        // Every element a refusal with an over-long text: cut, and still under the max.
        let long = "x".repeat(3 * ERROR_TEXT_BYTES_MAX);
        let results = vec![
            Some(Err(Refusal::new(
                RefusalCode::InvalidRequest,
                long.as_str()
            )));
            FORWARD_BATCH_COMMANDS_MAX
        ];
        let reply = PeerReply::forwarded_batch(results);
        let PeerReply::ForwardedBatch(cut) = &reply else {
            panic!("wrong variant");
        };
        assert!(cut
            .iter()
            .all(|r| matches!(r, Some(Err(f)) if f.detail.len() == ERROR_TEXT_BYTES_MAX)));
        let frame = encode_frame(&reply, "reply", reply.bytes_max()).unwrap();
        assert!(frame.len() < 18 * 1024 * 1024, "{}", frame.len());
        assert_eq!(
            PeerReply::Forwarded(Ok(crate::raft::Outcome::Changed)).bytes_max(),
            PEER_REPLY_BYTES_MAX
        );
    }

    #[test]
    fn oversized_headers_and_bodies_are_refused() {
        let stream = quinn::StreamId::new(quinn::Side::Client, quinn::Dir::Bi, 0);
        let err = check_header(
            u32::MAX.to_le_bytes(),
            "request",
            stream,
            PEER_FRAME_BYTES_MAX,
        )
        .unwrap_err();
        assert!(matches!(err, FrameError::Oversized { len, .. } if len == u64::from(u32::MAX)));
        let big = GroupRequest::InstallSnapshot {
            vote: WireVote::from(&Vote::new(1, 1)),
            meta: WireSnapshotMeta::from(&SnapshotMeta {
                last_log_id: None,
                last_membership: membership(),
                snapshot_id: "s".into(),
            }),
            offset: 0,
            data: vec![0; 2048],
            done: false,
        }
        .to(1);
        assert!(matches!(
            encode_frame(&big, "hello", HELLO_FRAME_BYTES_MAX),
            Err(FrameError::TooLarge { .. })
        ));
        let err = decode_body::<PeerRequest>(&[0xff; 7], "request", stream).unwrap_err();
        assert!(matches!(err, FrameError::Invalid { .. }), "{err}");
    }

    #[test]
    fn proofs_verify_only_with_the_same_secret_node_and_session() {
        let exporter = [5u8; HELLO_EXPORTER_BYTES];
        let proof = hello_proof(b"secret", 2, &exporter);
        assert!(verify_hello_proof(b"secret", 2, &exporter, &proof));
        assert!(!verify_hello_proof(b"other", 2, &exporter, &proof));
        assert!(!verify_hello_proof(b"secret", 3, &exporter, &proof));
        assert!(!verify_hello_proof(
            b"secret",
            2,
            &[6; HELLO_EXPORTER_BYTES],
            &proof
        ));
        assert!(!verify_hello_proof(b"secret", 2, &exporter, &proof[..31]));
    }

    #[test]
    fn error_texts_are_bounded() {
        let long = "é".repeat(ERROR_TEXT_BYTES_MAX);
        let PeerReply::Error(text) = PeerReply::error(&long) else {
            panic!("wrong variant");
        };
        assert!(text.len() <= ERROR_TEXT_BYTES_MAX);
        assert!(long.starts_with(&text));
    }
}
