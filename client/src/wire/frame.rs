//! The frame types: every message a client and a broker exchange.
//!
//! These are plain Rust values; [`super::encode_frame`] turns one into bytes and
//! [`super::FrameDecoder`] turns validated bytes back into one. Nothing here does
//! I/O or knows about QUIC.

use rkyv::{Archive, Deserialize, Serialize};

/// One unit on the wire. Client → broker: [`Frame::Hello`], [`Frame::Request`].
/// Broker → client: everything else.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// First frame a client sends: who it is.
    Hello(Hello),
    /// The broker accepted the [`Hello`].
    Welcome(Welcome),
    /// A client request; the broker answers it with a [`Frame::Reply`] carrying the same `id`.
    Request {
        /// Chosen by the client, unique among its requests in flight.
        id: u64,
        /// What is asked.
        body: Request,
    },
    /// The answer to the [`Frame::Request`] with the same `id`.
    Reply {
        /// The request's id.
        id: u64,
        /// The outcome.
        body: Reply,
    },
    /// One message of a subscribed conversation (replayed or live).
    /// Per conversation, deliveries arrive in `seq` order with no gap and no duplicate.
    Deliver(Message),
    /// Something happened to the session that it did not ask about.
    Event(Event),
    /// The broker is closing the connection and says why.
    Goodbye(Refusal),
    /// The node is draining (shutting down on purpose): the session should reconnect
    /// to another node, with its cursors, at a random moment within
    /// [`MoveNotice::within_ms`]. Until then the node keeps serving it.
    Move(MoveNotice),
}

impl Frame {
    /// The variant's name, for logs and errors.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Welcome(_) => "Welcome",
            Frame::Request { .. } => "Request",
            Frame::Reply { .. } => "Reply",
            Frame::Deliver(_) => "Deliver",
            Frame::Event(_) => "Event",
            Frame::Goodbye(_) => "Goodbye",
            Frame::Move(_) => "Move",
        }
    }
}

/// The handshake a client opens its stream with (after the preamble).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// A JWT (see the auth module of the broker): `sub`, `role`, `exp`.
    pub token: String,
    /// Free text for logs, e.g. `herald-cli/0.1`.
    pub client_name: String,
}

/// The broker's answer to a good [`Hello`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The broker's id for this session (appears in its logs and metrics).
    pub session_id: u64,
    /// Who the token says the client is.
    pub principal: Principal,
    /// The limits this session runs under.
    pub limits: SessionLimits,
}

/// Limits the broker enforces on a session, announced in [`Welcome`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Largest frame body either side may send.
    pub frame_bytes_max: u32,
    /// Largest message payload.
    pub payload_bytes_max: u32,
    /// Most conversations one session may subscribe to at once.
    pub subscriptions_max: u32,
}

/// An authenticated party.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A user account (a device session).
    User(u64),
    /// A backend service, by name.
    Service(String),
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::User(id) => write!(f, "user:{id}"),
            Principal::Service(name) => write!(f, "service:{name}"),
        }
    }
}

/// The kind of a conversation, which decides who may publish and subscribe.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConvKind {
    /// Exactly two members.
    Direct,
    /// Up to the configured member limit; members publish and subscribe.
    Group,
    /// Broadcast: members are the owners (they and services publish); any user may subscribe.
    Channel,
}

impl std::str::FromStr for ConvKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "direct" => Ok(ConvKind::Direct),
            "group" => Ok(ConvKind::Group),
            "channel" => Ok(ConvKind::Channel),
            other => Err(format!(
                "unknown conversation kind `{other}`: expected direct, group or channel"
            )),
        }
    }
}

impl std::fmt::Display for ConvKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConvKind::Direct => "direct",
            ConvKind::Group => "group",
            ConvKind::Channel => "channel",
        })
    }
}

/// What makes a publish idempotent: a retry with the same key inside the dedup
/// window returns the original `seq` and appends nothing.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdempotencyKey {
    /// A producer's own counter: `(producer_id, producer_seq)`.
    Producer {
        /// Random per producer instance.
        producer_id: u64,
        /// Increases by one per publish of that producer.
        producer_seq: u64,
    },
    /// A key the caller chose (e.g. a payment id).
    Caller(String),
}

/// A client request.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Create a conversation; idempotent when kind and members match.
    CreateConversation {
        /// Chosen by the backend.
        conv: u64,
        /// Its kind.
        kind: ConvKind,
        /// Initial members (owners, for a channel).
        members: Vec<u64>,
    },
    /// Add members (owners, for a channel).
    AddMembers {
        /// The conversation.
        conv: u64,
        /// Users to add; already-present ones are ignored.
        members: Vec<u64>,
    },
    /// Remove members.
    RemoveMembers {
        /// The conversation.
        conv: u64,
        /// Users to remove; absent ones are ignored.
        members: Vec<u64>,
    },
    /// Append a message.
    Publish {
        /// The conversation.
        conv: u64,
        /// Makes retries safe.
        key: IdempotencyKey,
        /// Opaque bytes, at most `payload_bytes_max`.
        payload: Vec<u8>,
    },
    /// Start receiving a conversation's messages.
    Subscribe {
        /// The conversation.
        conv: u64,
        /// First seq to deliver (1 = all retained history); `None` = only new messages.
        from: Option<u64>,
    },
    /// Stop receiving a conversation's messages.
    Unsubscribe {
        /// The conversation.
        conv: u64,
    },
    /// Read stored messages.
    History {
        /// The conversation.
        conv: u64,
        /// First seq wanted (1 = oldest retained).
        from: u64,
        /// Most messages wanted; the broker may return fewer.
        limit: u32,
    },
    /// Where conversations live: the cluster's nodes, each group's slots and leader
    /// (answered with [`Reply::ClusterMap`]). A client that knows it sends a
    /// conversation's writes straight to its group's leader.
    ClusterMap,
}

/// The broker's answer to a [`Request`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The request succeeded and has nothing more to say.
    Done,
    /// `CreateConversation` succeeded; `created` is false if it already existed.
    Created {
        /// True when this request made it.
        created: bool,
    },
    /// The message is stored; `duplicate` when the key was seen before (nothing appended).
    Published {
        /// The message's seq.
        seq: u64,
        /// True when this was a retry of an earlier publish.
        duplicate: bool,
        /// The node leading the conversation's group, when it is not the node that
        /// answered (the write was forwarded): send the next ones there.
        leader: Option<u64>,
    },
    /// The subscription is active; deliveries follow as [`Frame::Deliver`].
    Subscribed {
        /// The conversation.
        conv: u64,
        /// The seq the next new message will get.
        next_seq: u64,
    },
    /// A page of history.
    History(HistoryPage),
    /// The answer to [`Request::ClusterMap`].
    ClusterMap(ClusterMapView),
    /// The request was refused; nothing changed.
    Refused(Refusal),
}

/// The cluster map as a client sees it: enough to find a conversation's leader.
/// A conversation's group is the one whose slot range holds
/// [`slot_of`](super::slot_of)`(conv)`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ClusterMapView {
    /// Every node: id and the QUIC address it serves clients on.
    pub nodes: Vec<NodeView>,
    /// Every data group.
    pub groups: Vec<GroupView>,
}

/// A node of [`ClusterMapView`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Its id.
    pub id: u64,
    /// `HOST:PORT` of its QUIC endpoint.
    pub addr: String,
}

/// A data group of [`ClusterMapView`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    /// Its id.
    pub id: u32,
    /// First slot it owns.
    pub slot_start: u32,
    /// One past its last slot.
    pub slot_end: u32,
    /// Its leader, as far as the answering node knows.
    pub leader: Option<u64>,
}

/// A page of stored messages.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// The messages, in seq order.
    pub messages: Vec<Message>,
    /// The oldest seq still retained (equals `next_seq` when none is).
    pub first_seq: u64,
    /// The seq the next new message will get.
    pub next_seq: u64,
}

/// A stored message.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Its conversation.
    pub conv: u64,
    /// Gapless, from 1, per conversation.
    pub seq: u64,
    /// Who published it.
    pub sender: Principal,
    /// Broker clock when it was stored, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Opaque bytes.
    pub payload: Vec<u8>,
}

/// "Please move to another node": sent by a draining node to each of its sessions.
///
/// The client picks a uniformly random delay in `0..within_ms` (so that many sessions
/// do not all reconnect in the same instant), keeps using this connection until then,
/// then reconnects to another seed and resubscribes from its cursors (no gap, no
/// duplicate). A node stops serving the session once its drain timeout ends, whether
/// the client moved or not.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MoveNotice {
    /// Reconnect within this many milliseconds.
    pub within_ms: u32,
    /// Why (for logs), e.g. "node 2 is draining".
    pub detail: String,
}

/// Something the broker tells a session unasked.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The cursor was older than retention: messages `requested_from .. first_available_seq`
    /// are gone for good; delivery goes on from `first_available_seq`.
    Truncated {
        /// The conversation.
        conv: u64,
        /// The seq the session asked for.
        requested_from: u64,
        /// The oldest seq still retained; delivery resumes here.
        first_available_seq: u64,
    },
    /// The session's outbound queue overflowed; the broker dropped `dropped` queued
    /// deliveries and is re-sending them from history. Nothing is lost.
    Lagged {
        /// Deliveries dropped from the queue (re-sent from history).
        dropped: u64,
    },
    /// The subscription ended without the session asking (e.g. removed from the group).
    Unsubscribed {
        /// The conversation.
        conv: u64,
        /// Why.
        reason: Refusal,
    },
}

/// Why something was refused: a machine-readable code and a sentence for a person.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What kind of refusal.
    pub code: RefusalCode,
    /// What happened and what to do about it.
    pub detail: String,
}

impl Refusal {
    /// A refusal with its code and explanation.
    pub fn new(code: RefusalCode, detail: impl Into<String>) -> Self {
        Refusal {
            code,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

/// Reason codes for every refusal. Stable: clients match on them.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalCode {
    /// The token's `exp` has passed.
    TokenExpired,
    /// The token's signature does not verify with the broker's key.
    BadSignature,
    /// The token is signed with an algorithm the broker does not accept.
    WrongAlgorithm,
    /// The token is not a well-formed JWT or lacks a required claim.
    MalformedToken,
    /// The user is not a member (or follower) of the conversation.
    NotMember,
    /// The principal's role may not do this (e.g. a user creating a conversation).
    RoleNotAllowed,
    /// A configured limit was reached (subscriptions, connections, members, …).
    LimitReached,
    /// The payload is larger than the configured maximum.
    PayloadTooLarge,
    /// No conversation has this id.
    NoSuchConversation,
    /// The conversation exists with another kind or different members.
    ConversationConflict,
    /// The request is well-formed but makes no sense (e.g. a direct conversation with 3 members).
    InvalidRequest,
    /// The client speaks another protocol version.
    UnsupportedVersion,
    /// The client broke the protocol (bad frame, wrong order); the connection closes.
    ProtocolError,
    /// The session sent a request before a successful Hello.
    NotAuthenticated,
    /// The session could not keep up and was disconnected; resubscribe from your cursor.
    SlowConsumer,
    /// The broker is shutting down or cannot serve right now; retry elsewhere or later.
    Unavailable,
    /// A bug or an I/O failure in the broker; the detail says which.
    Internal,
}

impl std::fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RefusalCode::TokenExpired => "token expired",
            RefusalCode::BadSignature => "bad token signature",
            RefusalCode::WrongAlgorithm => "wrong token algorithm",
            RefusalCode::MalformedToken => "malformed token",
            RefusalCode::NotMember => "not a member",
            RefusalCode::RoleNotAllowed => "not allowed for this role",
            RefusalCode::LimitReached => "limit reached",
            RefusalCode::PayloadTooLarge => "payload too large",
            RefusalCode::NoSuchConversation => "no such conversation",
            RefusalCode::ConversationConflict => "conversation conflict",
            RefusalCode::InvalidRequest => "invalid request",
            RefusalCode::UnsupportedVersion => "unsupported protocol version",
            RefusalCode::ProtocolError => "protocol error",
            RefusalCode::NotAuthenticated => "not authenticated",
            RefusalCode::SlowConsumer => "slow consumer",
            RefusalCode::Unavailable => "unavailable",
            RefusalCode::Internal => "internal error",
        })
    }
}
