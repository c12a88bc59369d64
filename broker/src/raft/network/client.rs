//! The dialer side: openraft's [`RaftNetworkFactory`] / [`RaftNetwork`] over QUIC, and
//! forwarding a client's write (or an ordered batch of them) to the leader.
//!
//! Owns: the per-peer connection cache (dialed lazily, one connection per peer,
//! redialed when dead), the hello on each new connection, one bidirectional stream per
//! RPC, and mapping transport failures to openraft's error kinds (`Unreachable` for
//! anything that means "cannot talk to that node now", so openraft backs off). Must
//! not: retry an RPC itself (openraft decides), or look inside commands.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{
    AnyError, BasicNode, ErrorSubject, ErrorVerb, RPCTypes, RaftNetwork, RaftNetworkFactory,
    StorageError, StorageIOError,
};
use tracing::debug;

use super::append_size::AppendSizer;
use super::frame::{
    self, connection_exporter, encode_frame, hello_proof, read_frame, write_frame,
    write_frame_open, FrameError, GroupRequest, MoveRequest, PeerHello, PeerReply, PeerRequest,
    ReadRequest, WireFatal, CLOSE_DONE, FORWARD_BATCH_COMMANDS_MAX, HELLO_FRAME_BYTES_MAX,
    PEER_BATCH_REPLY_BYTES_MAX, PEER_FRAME_BYTES_MAX, PEER_REPLY_BYTES_MAX, STREAM_CANCELLED,
};
use crate::raft::{GroupId, NodeId, Response, TypeConfig};
use crate::store::Command;

/// At most this many peers have a cached connection; when full, entries whose
/// connection is dead go first, then the least recently used (its connection closes
/// once the RPCs still using it finish).
pub const PEER_CONNECTIONS_MAX: usize = 256;
/// First wait after openraft sees `Unreachable`; doubles per failure.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between attempts to reach an unreachable peer. Below a follower's
/// shortest election wait (lease + `election_timeout_min`, 350 ms by default), so a
/// restarted node hears its leader before it starts an election it cannot win (and
/// which would delay its next one: openraft holds back a node that lost to a longer log).
pub const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// How [`PeerNetwork`] dials and authenticates.
pub struct PeerNetworkConfig {
    /// This node's id (sent in the hello).
    pub node_id: NodeId,
    /// The cluster secret (the hello proves knowledge of it).
    pub secret: Vec<u8>,
    /// The node's QUIC endpoint (the same UDP socket that accepts connections).
    pub endpoint: quinn::Endpoint,
    /// Client config offering ALPN `herald-peer/1` and trusting the cluster CA.
    pub client_config: quinn::ClientConfig,
    /// Dialing (QUIC handshake + hello) must finish within this.
    pub connect_timeout: Duration,
    /// Time budget of a forwarded write (openraft's RPCs use their own `hard_ttl`).
    pub rpc_timeout: Duration,
}

/// Errors talking to a peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The peer's address is not `host:port`.
    #[error("node {target}: address {addr:?} is not host:port")]
    BadAddress {
        /// The peer.
        target: NodeId,
        /// The address given.
        addr: String,
    },
    /// The address did not resolve.
    #[error("node {target}: cannot resolve {addr}: {source}")]
    Resolve {
        /// The peer.
        target: NodeId,
        /// The address.
        addr: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// quinn would not start the connection (endpoint closed, bad server name, …).
    #[error("node {target}: cannot connect to {addr}: {source}")]
    Connect {
        /// The peer.
        target: NodeId,
        /// The address.
        addr: String,
        /// quinn's error.
        source: quinn::ConnectError,
    },
    /// The QUIC/TLS handshake failed (certificate not signed by the cluster CA, …).
    #[error("node {target}: handshake with {addr} failed: {source}")]
    Handshake {
        /// The peer.
        target: NodeId,
        /// The address.
        addr: String,
        /// quinn's error.
        source: quinn::ConnectionError,
    },
    /// Handshake and hello did not finish within `connect_timeout`.
    #[error("node {target}: no connection to {addr} within {after:?}")]
    ConnectTimeout {
        /// The peer.
        target: NodeId,
        /// The address.
        addr: String,
        /// The timeout.
        after: Duration,
    },
    /// No connection was ready within the share of the RPC's time budget allowed for
    /// connecting; the dial goes on in the background for the next RPC.
    #[error("node {target}: still connecting to {addr} after {waited:?}")]
    StillConnecting {
        /// The peer.
        target: NodeId,
        /// The address.
        addr: String,
        /// How long this RPC waited.
        waited: Duration,
    },
    /// The dial task ended without an answer (the runtime is shutting down).
    #[error("node {target}: dialing was aborted: {reason}")]
    DialAborted {
        /// The peer.
        target: NodeId,
        /// Why.
        reason: String,
    },
    /// The TLS session exports no keying material, so no hello proof can be made.
    #[error("node {target}: the TLS session cannot export keys for the hello")]
    NoExporter {
        /// The peer.
        target: NodeId,
    },
    /// Opening a stream failed: the connection is gone.
    #[error("node {target}: connection lost: {source}")]
    Connection {
        /// The peer.
        target: NodeId,
        /// quinn's error.
        source: quinn::ConnectionError,
    },
    /// Moving a frame failed (see [`FrameError`] for the stream and offsets).
    #[error("node {target}: {source}")]
    Frame {
        /// The peer.
        target: NodeId,
        /// What went wrong.
        source: FrameError,
    },
    /// The peer refused: wrong cluster secret or a protocol error.
    #[error("node {target} refused: {reason}")]
    Refused {
        /// The peer.
        target: NodeId,
        /// Its explanation.
        reason: String,
    },
    /// No reply within the time budget.
    #[error("node {target}: no {rpc} reply within {after:?}")]
    Timeout {
        /// The peer.
        target: NodeId,
        /// The request kind.
        rpc: &'static str,
        /// The budget.
        after: Duration,
    },
    /// The reply does not answer the request.
    #[error("node {target}: a {request} request was answered with {reply}")]
    UnexpectedReply {
        /// The peer.
        target: NodeId,
        /// The request kind.
        request: &'static str,
        /// The reply kind.
        reply: &'static str,
    },
    /// The peer's Raft failed handling the request.
    #[error("node {target}: raft failed: {message}")]
    Remote {
        /// The peer.
        target: NodeId,
        /// Its message.
        message: String,
    },
    /// A forwarded batch has more than [`FORWARD_BATCH_COMMANDS_MAX`] commands, or
    /// encodes to more than [`PEER_FRAME_BYTES_MAX`] bytes. Nothing was sent (no
    /// command of it was proposed): split the batch and send the halves.
    #[error(
        "node {target}: a batch of {commands} commands{} is over the limit of \
         {FORWARD_BATCH_COMMANDS_MAX} commands and {PEER_FRAME_BYTES_MAX} bytes; \
         nothing was sent, split it",
        encoded_size(.bytes)
    )]
    BatchTooLarge {
        /// The peer.
        target: NodeId,
        /// Commands in the batch.
        commands: usize,
        /// Its encoded size, when it was encoded (not when there were too many).
        bytes: Option<u64>,
    },
    /// The node hosts no replica of the group.
    #[error("node {target} hosts no replica of group {group}")]
    NoGroup {
        /// The node.
        target: NodeId,
        /// The group.
        group: GroupId,
    },
    /// The reply to a batch does not have one result per command.
    #[error("node {target}: a batch of {sent} commands was answered with {got} results")]
    BatchLengthMismatch {
        /// The peer.
        target: NodeId,
        /// Commands sent.
        sent: usize,
        /// Results received.
        got: usize,
    },
}

impl PeerError {
    /// True when the error means the peer cannot be talked to right now (openraft
    /// should back off), rather than that one exchange went wrong.
    pub fn is_unreachable(&self) -> bool {
        match self {
            PeerError::BadAddress { .. }
            | PeerError::Resolve { .. }
            | PeerError::Connect { .. }
            | PeerError::Handshake { .. }
            | PeerError::ConnectTimeout { .. }
            | PeerError::StillConnecting { .. }
            | PeerError::DialAborted { .. }
            | PeerError::NoExporter { .. }
            | PeerError::Connection { .. }
            | PeerError::Refused { .. }
            | PeerError::NoGroup { .. } => true,
            PeerError::Frame { source, .. } => matches!(
                source,
                FrameError::Read {
                    source: quinn::ReadError::ConnectionLost(_),
                    ..
                } | FrameError::Write {
                    source: quinn::WriteError::ConnectionLost(_),
                    ..
                }
            ),
            PeerError::Timeout { .. }
            | PeerError::UnexpectedReply { .. }
            | PeerError::Remote { .. }
            | PeerError::BatchTooLarge { .. }
            | PeerError::BatchLengthMismatch { .. } => false,
        }
    }
}

/// What the leader said about a forwarded write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardReply {
    /// Committed and applied: the state machine's response.
    Done(Response),
    /// The target is not the leader; the leader it knows of (id, address), if any.
    NotLeader(Option<(NodeId, String)>),
}

/// The answer to [`PeerNetwork::open_watch`].
pub enum WatchOpen {
    /// The watch is open on this stream; `heads` are the conversations' next seqs.
    Opened {
        /// `(conv, next_seq)` per watched conversation.
        heads: Vec<(u64, u64)>,
        /// Where [`super::watch::WatchControl`]s go.
        send: quinn::SendStream,
        /// Where [`super::watch::WatchEvent`]s arrive.
        recv: quinn::RecvStream,
    },
    /// The node does not lead the group; the leader it knows of.
    NotLeader(Option<(NodeId, String)>),
}

/// What the leader said about a forwarded batch ([`PeerNetwork::forward_batch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardBatchReply {
    /// One result per command, in the order sent: `Some(response)` when command `i`
    /// was committed and applied, `None` when it was not (leadership moved or Raft
    /// stopped meanwhile); retry the `None`s elsewhere (commands are idempotent).
    Done(Vec<Option<Response>>),
    /// The target is not the leader (or lost leadership before committing any of the
    /// batch); the leader it knows of (id, address), if any. Nothing was committed.
    NotLeader(Option<(NodeId, String)>),
}

/// Openraft's network over QUIC: dials peers lazily and caches one connection each.
/// Cheap to clone (all clones share the cache).
#[derive(Clone)]
pub struct PeerNetwork {
    inner: Arc<Inner>,
}

struct Inner {
    config: PeerNetworkConfig,
    slots: Mutex<HashMap<NodeId, Arc<Slot>>>,
    epoch: Instant,
}

/// One peer's cache entry. The async mutex serialises dialing, so there is at most one
/// connection per peer; the dial runs in its own task holding the lock, so an RPC that
/// gives up waiting does not cancel it.
struct Slot {
    conn: Arc<tokio::sync::Mutex<Option<Cached>>>,
    last_used_ms: AtomicU64,
}

struct Cached {
    addr: String,
    conn: quinn::Connection,
}

impl Slot {
    /// True while dialing, in use, or holding an open connection.
    fn is_live(&self) -> bool {
        match self.conn.try_lock() {
            Ok(cached) => cached
                .as_ref()
                .is_some_and(|c| c.conn.close_reason().is_none()),
            Err(_) => true,
        }
    }
}

impl PeerNetwork {
    /// A network that dials with `config`; nothing is dialed until the first RPC.
    pub fn new(config: PeerNetworkConfig) -> Self {
        PeerNetwork {
            inner: Arc::new(Inner {
                config,
                slots: Mutex::new(HashMap::new()),
                epoch: Instant::now(),
            }),
        }
    }

    /// Sends a client's write to `target` (the leader, as far as this node knows) at
    /// `addr`, within `rpc_timeout`. `NotLeader` carries the leader the target knows.
    pub async fn forward(
        &self,
        group: GroupId,
        target: NodeId,
        addr: &str,
        command: Command,
    ) -> Result<ForwardReply, PeerError> {
        let request = GroupRequest::Forward(command).to(group);
        let bytes = encode_frame(&request, "request", PEER_FRAME_BYTES_MAX)
            .map_err(|source| PeerError::Frame { target, source })?;
        let ttl = self.inner.config.rpc_timeout;
        match self
            .call(target, addr, "Forward", &bytes, ttl, PEER_REPLY_BYTES_MAX)
            .await?
        {
            PeerReply::Forwarded(response) => Ok(ForwardReply::Done(response)),
            PeerReply::NotLeader { leader } => Ok(ForwardReply::NotLeader(leader)),
            PeerReply::NoGroup { .. } => Ok(ForwardReply::NotLeader(None)),
            other => Err(refused(target, "Forward", other)),
        }
    }

    /// Sends client writes to `target` (the leader, as far as this node knows) at `addr`
    /// in one RPC, within `rpc_timeout` for the whole batch. The leader proposes them in
    /// this order, so their log entries are in this order.
    ///
    /// `Done` has exactly one result per command (element `i` answers `commands[i]`);
    /// a reply of another length is [`PeerError::BatchLengthMismatch`]. A batch of more
    /// than [`FORWARD_BATCH_COMMANDS_MAX`] commands or more than
    /// [`PEER_FRAME_BYTES_MAX`] encoded bytes is not sent:
    /// [`PeerError::BatchTooLarge`]. On any error (including a timeout) some commands
    /// may have been committed; commands are idempotent, so resending is safe.
    pub async fn forward_batch(
        &self,
        group: GroupId,
        target: NodeId,
        addr: &str,
        commands: impl Into<crate::raft::Batch>,
    ) -> Result<ForwardBatchReply, PeerError> {
        let commands = commands.into();
        let sent = commands.len();
        if sent > FORWARD_BATCH_COMMANDS_MAX {
            return Err(PeerError::BatchTooLarge {
                target,
                commands: sent,
                bytes: None,
            });
        }
        let request = GroupRequest::ForwardBatch(commands).to(group);
        let bytes = match encode_frame(&request, "request", PEER_FRAME_BYTES_MAX) {
            Ok(bytes) => bytes,
            Err(FrameError::TooLarge { len, .. }) => {
                return Err(PeerError::BatchTooLarge {
                    target,
                    commands: sent,
                    bytes: Some(len),
                })
            }
            Err(source) => return Err(PeerError::Frame { target, source }),
        };
        drop(request);
        let ttl = self.inner.config.rpc_timeout;
        let reply = self
            .call(
                target,
                addr,
                "ForwardBatch",
                &bytes,
                ttl,
                PEER_BATCH_REPLY_BYTES_MAX,
            )
            .await?;
        match reply {
            PeerReply::ForwardedBatch(results) if results.len() == sent => {
                Ok(ForwardBatchReply::Done(results))
            }
            PeerReply::ForwardedBatch(results) => Err(PeerError::BatchLengthMismatch {
                target,
                sent,
                got: results.len(),
            }),
            PeerReply::NotLeader { leader } => Ok(ForwardBatchReply::NotLeader(leader)),
            PeerReply::NoGroup { .. } => Ok(ForwardBatchReply::NotLeader(None)),
            other => Err(refused(target, "ForwardBatch", other)),
        }
    }

    /// Reads from `group` at `target` (its leader, as far as the caller knows): the
    /// reply is [`PeerReply::Authorized`], [`PeerReply::History`], or
    /// [`PeerReply::NotLeader`] / [`PeerReply::NoGroup`] when `target` cannot serve it.
    pub async fn read(
        &self,
        group: GroupId,
        target: NodeId,
        addr: &str,
        request: ReadRequest,
    ) -> Result<PeerReply, PeerError> {
        let bytes = encode_frame(
            &GroupRequest::Read(request).to(group),
            "request",
            PEER_FRAME_BYTES_MAX,
        )
        .map_err(|source| PeerError::Frame { target, source })?;
        let ttl = self.inner.config.rpc_timeout;
        self.call(
            target,
            addr,
            "Read",
            &bytes,
            ttl,
            PEER_BATCH_REPLY_BYTES_MAX,
        )
        .await
    }

    /// Asks `target`, the leader of `group`, to move one replica from `remove` to `add`
    /// (at `add_addr`); waits up to `ttl` (the new replica catches up first). Answers
    /// `Done`, `NotLeader`, `NoGroup` or an error.
    pub async fn reconfigure(
        &self,
        group: GroupId,
        target: NodeId,
        addr: &str,
        request: MoveRequest,
        ttl: Duration,
    ) -> Result<PeerReply, PeerError> {
        let request = GroupRequest::Reconfigure(request).to(group);
        let bytes = encode_frame(&request, "request", PEER_FRAME_BYTES_MAX)
            .map_err(|source| PeerError::Frame { target, source })?;
        self.call(
            target,
            addr,
            "Reconfigure",
            &bytes,
            ttl,
            PEER_REPLY_BYTES_MAX,
        )
        .await
    }

    /// Asks `target`'s replica of `group` to start an election (leader balance).
    pub async fn elect(&self, group: GroupId, target: NodeId, addr: &str) -> Result<(), PeerError> {
        let bytes = encode_frame(
            &GroupRequest::Elect.to(group),
            "request",
            PEER_FRAME_BYTES_MAX,
        )
        .map_err(|source| PeerError::Frame { target, source })?;
        let ttl = self.inner.config.rpc_timeout;
        match self
            .call(target, addr, "Elect", &bytes, ttl, PEER_REPLY_BYTES_MAX)
            .await?
        {
            PeerReply::Done => Ok(()),
            PeerReply::NoGroup { group } => Err(PeerError::NoGroup { target, group }),
            other => Err(refused(target, "Elect", other)),
        }
    }

    /// Opens a watch of `convs` in `group` at `target`. On success the stream stays
    /// open: the caller reads [`super::watch::WatchEvent`]s from it and writes
    /// [`super::watch::WatchControl`]s to it.
    pub async fn open_watch(
        &self,
        group: GroupId,
        target: NodeId,
        addr: &str,
        convs: Vec<u64>,
    ) -> Result<WatchOpen, PeerError> {
        let request = GroupRequest::Watch { convs }.to(group);
        let bytes = encode_frame(&request, "request", PEER_FRAME_BYTES_MAX)
            .map_err(|source| PeerError::Frame { target, source })?;
        let ttl = self.inner.config.rpc_timeout;
        let start = Instant::now();
        let conn = tokio::time::timeout(ttl, self.connection(target, addr))
            .await
            .map_err(|_| PeerError::StillConnecting {
                target,
                addr: addr.to_owned(),
                waited: ttl,
            })??;
        let remaining = ttl.saturating_sub(start.elapsed());
        let opened = tokio::time::timeout(remaining, async {
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|source| PeerError::Connection { target, source })?;
            write_frame_open(&mut send, &bytes, "request")
                .await
                .map_err(|source| PeerError::Frame { target, source })?;
            let reply = read_frame::<PeerReply>(&mut recv, "reply", PEER_BATCH_REPLY_BYTES_MAX)
                .await
                .map_err(|source| PeerError::Frame { target, source })?;
            Ok::<_, PeerError>((send, recv, reply))
        })
        .await
        .map_err(|_| PeerError::Timeout {
            target,
            rpc: "Watch",
            after: ttl,
        })??;
        let (send, recv, reply) = opened;
        match reply {
            PeerReply::Watching { heads } => Ok(WatchOpen::Opened { heads, send, recv }),
            PeerReply::NotLeader { leader } => Ok(WatchOpen::NotLeader(leader)),
            PeerReply::NoGroup { .. } => Ok(WatchOpen::NotLeader(None)),
            other => Err(refused(target, "Watch", other)),
        }
    }

    /// Closes and forgets the cached connection to `target` (e.g. after it left the
    /// cluster). In-flight RPCs on it fail.
    pub fn disconnect(&self, target: NodeId) {
        let slot = self.slots().remove(&target);
        if let Some(slot) = slot {
            if let Ok(cached) = slot.conn.try_lock() {
                if let Some(c) = cached.as_ref() {
                    c.conn.close(CLOSE_DONE.into(), b"disconnected");
                }
            }
        }
    }

    /// Peers with a cache entry (for metrics and tests).
    pub fn cached_peers(&self) -> usize {
        self.slots().len()
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Arc<Slot>>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.inner
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The cache entry for `target`, making room when the cache is full.
    fn slot(&self, target: NodeId) -> Arc<Slot> {
        let now = self.now_ms();
        let mut slots = self.slots();
        if let Some(slot) = slots.get(&target) {
            slot.last_used_ms.store(now, Ordering::Relaxed);
            return slot.clone();
        }
        if slots.len() >= PEER_CONNECTIONS_MAX {
            slots.retain(|_, s| s.is_live());
        }
        if slots.len() >= PEER_CONNECTIONS_MAX {
            let oldest = slots
                .iter()
                .min_by_key(|(_, s)| s.last_used_ms.load(Ordering::Relaxed))
                .map(|(id, _)| *id);
            if let Some(id) = oldest {
                debug!(evicted = id, "peer connection cache full; evicting");
                slots.remove(&id);
            }
        }
        let slot = Arc::new(Slot {
            conn: Arc::new(tokio::sync::Mutex::new(None)),
            last_used_ms: AtomicU64::new(now),
        });
        slots.insert(target, slot.clone());
        slot
    }

    /// The open connection to `target`, dialing it when there is none (or it died, or
    /// its address changed).
    async fn connection(&self, target: NodeId, addr: &str) -> Result<quinn::Connection, PeerError> {
        let slot = self.slot(target);
        let mut cached = slot.conn.clone().lock_owned().await;
        if let Some(c) = cached.as_ref() {
            if c.addr == addr && c.conn.close_reason().is_none() {
                return Ok(c.conn.clone());
            }
            if c.addr != addr {
                c.conn.close(CLOSE_DONE.into(), b"peer address changed");
            }
        }
        *cached = None;
        let this = self.clone();
        let addr = addr.to_owned();
        let dial = tokio::spawn(async move {
            let after = this.inner.config.connect_timeout;
            let result = match tokio::time::timeout(after, this.dial(target, &addr)).await {
                Ok(result) => result,
                Err(_) => Err(PeerError::ConnectTimeout {
                    target,
                    addr: addr.clone(),
                    after,
                }),
            };
            match &result {
                Ok(conn) => {
                    debug!(target, %addr, "peer connection established");
                    *cached = Some(Cached {
                        addr,
                        conn: conn.clone(),
                    });
                }
                Err(e) => debug!(target, %addr, error = %e, "cannot reach peer"),
            }
            result
        });
        dial.await.map_err(|e| PeerError::DialAborted {
            target,
            reason: e.to_string(),
        })?
    }

    /// Handshake and hello with `addr`.
    async fn dial(&self, target: NodeId, addr: &str) -> Result<quinn::Connection, PeerError> {
        let config = &self.inner.config;
        let host = server_name(addr).ok_or_else(|| PeerError::BadAddress {
            target,
            addr: addr.to_owned(),
        })?;
        let resolve = |source| PeerError::Resolve {
            target,
            addr: addr.to_owned(),
            source,
        };
        let socket = tokio::net::lookup_host(addr)
            .await
            .map_err(resolve)?
            .next()
            .ok_or_else(|| {
                resolve(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no address found",
                ))
            })?;
        let conn = config
            .endpoint
            .connect_with(config.client_config.clone(), socket, host)
            .map_err(|source| PeerError::Connect {
                target,
                addr: addr.to_owned(),
                source,
            })?
            .await
            .map_err(|source| PeerError::Handshake {
                target,
                addr: addr.to_owned(),
                source,
            })?;
        let Some(exporter) = connection_exporter(&conn) else {
            conn.close(CLOSE_DONE.into(), b"no TLS exporter");
            return Err(PeerError::NoExporter { target });
        };
        let hello = PeerRequest::Hello(PeerHello {
            node_id: config.node_id,
            proof: hello_proof(&config.secret, config.node_id, &exporter),
        });
        let result = match encode_frame(&hello, "hello", HELLO_FRAME_BYTES_MAX) {
            Ok(bytes) => exchange(&conn, target, &bytes, PEER_REPLY_BYTES_MAX).await,
            Err(source) => Err(PeerError::Frame { target, source }),
        };
        match result {
            Ok(PeerReply::HelloOk) => Ok(conn),
            Ok(reply) => {
                conn.close(CLOSE_DONE.into(), b"hello refused");
                Err(match reply {
                    PeerReply::Refused(reason) => PeerError::Refused { target, reason },
                    other => unexpected(target, "Hello", &other),
                })
            }
            Err(e) => {
                conn.close(CLOSE_DONE.into(), b"hello failed");
                Err(e)
            }
        }
    }

    /// One RPC: a connection (waiting at most 3/4 of `ttl` for it), a stream, the
    /// request, the reply (at most `reply_max` bytes), all within `ttl`.
    async fn call(
        &self,
        target: NodeId,
        addr: &str,
        rpc: &'static str,
        request: &[u8],
        ttl: Duration,
        reply_max: u32,
    ) -> Result<PeerReply, PeerError> {
        let start = Instant::now();
        let connect_wait = ttl * 3 / 4;
        let conn = match tokio::time::timeout(connect_wait, self.connection(target, addr)).await {
            Ok(conn) => conn?,
            Err(_) => {
                return Err(PeerError::StillConnecting {
                    target,
                    addr: addr.to_owned(),
                    waited: connect_wait,
                })
            }
        };
        let remaining = ttl.saturating_sub(start.elapsed());
        match tokio::time::timeout(remaining, exchange(&conn, target, request, reply_max)).await {
            Ok(Ok(PeerReply::Refused(reason))) => {
                // The acceptor closes the connection; don't wait for it.
                conn.close(CLOSE_DONE.into(), b"refused");
                Err(PeerError::Refused { target, reason })
            }
            Ok(result) => result,
            Err(_) => Err(PeerError::Timeout {
                target,
                rpc,
                after: ttl,
            }),
        }
    }
}

/// Opens a stream on `conn`, writes `request` (one encoded frame), reads the reply
/// (refused above `reply_max` bytes).
async fn exchange(
    conn: &quinn::Connection,
    target: NodeId,
    request: &[u8],
    reply_max: u32,
) -> Result<PeerReply, PeerError> {
    let (send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|source| PeerError::Connection { target, source })?;
    let frame_error = |source| PeerError::Frame { target, source };
    let mut send = ResetUnlessSent(Some(send));
    if let Some(stream) = send.0.as_mut() {
        write_frame(stream, request, "request")
            .await
            .map_err(frame_error)?;
    }
    send.sent();
    read_frame::<PeerReply>(&mut recv, "reply", reply_max)
        .await
        .map_err(frame_error)
}

/// Resets the send side when an RPC is dropped (openraft's timeout) or fails before
/// its request is completely written. quinn would otherwise finish the stream on drop,
/// and the acceptor would see a truncated frame instead of a cancelled request.
struct ResetUnlessSent(Option<quinn::SendStream>);

impl ResetUnlessSent {
    /// The request is written and the stream finished: nothing to reset.
    fn sent(&mut self) {
        self.0 = None;
    }
}

impl Drop for ResetUnlessSent {
    fn drop(&mut self) {
        if let Some(mut stream) = self.0.take() {
            let _ = stream.reset(STREAM_CANCELLED.into());
        }
    }
}

/// The TLS server name of `addr` (`host:port` or `[v6]:port`): its host part.
fn server_name(addr: &str) -> Option<&str> {
    let (host, port) = addr.rsplit_once(':')?;
    if port.is_empty() || port.parse::<u16>().is_err() {
        return None;
    }
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']')?,
        None => host,
    };
    (!host.is_empty()).then_some(host)
}

/// The error for a reply that is not one of `request`'s answers: the peer's own error
/// or fatal report, else an unexpected reply.
fn refused(target: NodeId, request: &'static str, reply: PeerReply) -> PeerError {
    match reply {
        PeerReply::Fatal(f) => PeerError::Remote {
            target,
            message: fatal_text(&f),
        },
        PeerReply::Error(message) => PeerError::Remote { target, message },
        other => unexpected(target, request, &other),
    }
}

fn unexpected(target: NodeId, request: &'static str, reply: &PeerReply) -> PeerError {
    PeerError::UnexpectedReply {
        target,
        request,
        reply: reply.kind(),
    }
}

/// ` (N bytes encoded)`, or nothing when the batch was not encoded.
fn encoded_size(bytes: &Option<u64>) -> String {
    bytes.map_or_else(String::new, |b| format!(" ({b} bytes encoded)"))
}

fn fatal_text(f: &WireFatal) -> String {
    match f {
        WireFatal::Stopped => "raft stopped".into(),
        WireFatal::Panicked => "raft panicked".into(),
        WireFatal::Storage(message) => format!("storage failed: {message}"),
    }
}

/// The remote's fatal error as openraft's.
fn fatal(f: WireFatal) -> Fatal<NodeId> {
    match f {
        WireFatal::Stopped => Fatal::Stopped,
        WireFatal::Panicked => Fatal::Panicked,
        WireFatal::Storage(message) => Fatal::StorageError(StorageError::IO {
            source: StorageIOError::new(
                ErrorSubject::Store,
                ErrorVerb::Write,
                AnyError::error(message),
            ),
        }),
    }
}

/// openraft's network factory for one group: its RPCs go over the node's shared peer
/// connections, addressed to that group.
#[derive(Clone)]
pub struct GroupNetwork {
    network: PeerNetwork,
    group: GroupId,
    outvoted: crate::raft::reelect::Outvoted,
}

impl PeerNetwork {
    /// The network factory of `group`'s Raft instance.
    pub fn for_group(&self, group: GroupId) -> GroupNetwork {
        GroupNetwork {
            network: self.clone(),
            group,
            outvoted: crate::raft::reelect::Outvoted::new(),
        }
    }
}

impl GroupNetwork {
    /// Takes the signal raised when this node's candidacy was refused by a peer that
    /// voted for another candidate in the same term and whose log is shorter than
    /// ours (see [`crate::raft::reelect`], which stands again at once). `None` after
    /// the first call.
    pub fn outvoted(&self) -> Option<crate::raft::reelect::OutvotedRx> {
        self.outvoted.take_receiver()
    }
}

impl RaftNetworkFactory<TypeConfig> for GroupNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            network: self.network.clone(),
            group: self.group,
            target,
            node: node.clone(),
            outvoted: self.outvoted.clone(),
            append_size: AppendSizer::default(),
        }
    }
}

/// Openraft's handle for sending one group's RPCs to one peer; shares [`PeerNetwork`]'s
/// connection cache with every other group.
pub struct PeerClient {
    network: PeerNetwork,
    group: GroupId,
    target: NodeId,
    node: BasicNode,
    outvoted: crate::raft::reelect::Outvoted,
    /// Shrinks the next AppendEntries when this one timed out.
    append_size: AppendSizer,
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl PeerClient {
    /// Encodes and sends one AppendEntries.
    async fn send_append_entries(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let entries = rpc.entries.len() as u64;
        let request = GroupRequest::from(rpc).to(self.group);
        let bytes = match encode_frame(&request, "request", PEER_FRAME_BYTES_MAX) {
            Ok(bytes) => bytes,
            // Too many entries for one frame: openraft retries with fewer.
            Err(FrameError::TooLarge { .. }) if entries > 1 => {
                return Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(entries / 2),
                ))
            }
            Err(source) => {
                let e = PeerError::Frame {
                    target: self.target,
                    source,
                };
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
        };
        match self
            .send(RPCTypes::AppendEntries, &bytes, option.hard_ttl())
            .await?
        {
            PeerReply::AppendEntries(resp) => Ok(resp.into()),
            other => Err(self.other_reply("AppendEntries", other)),
        }
    }

    /// Sends one encoded request and maps transport failures to openraft's kinds.
    async fn send<E: std::error::Error>(
        &self,
        rpc: RPCTypes,
        request: &[u8],
        ttl: Duration,
    ) -> RpcResult<PeerReply, E> {
        let name = rpc_name(rpc);
        match self
            .network
            .call(
                self.target,
                &self.node.addr,
                name,
                request,
                ttl,
                PEER_REPLY_BYTES_MAX,
            )
            .await
        {
            Ok(reply) => Ok(reply),
            Err(PeerError::Timeout { after, .. }) => Err(RPCError::Timeout(Timeout {
                action: rpc,
                id: self.network.inner.config.node_id,
                target: self.target,
                timeout: after,
            })),
            Err(e) if e.is_unreachable() => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    fn remote<E: std::error::Error>(
        &self,
        source: RaftError<NodeId, E>,
    ) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        RPCError::RemoteError(RemoteError {
            target: self.target,
            target_node: Some(self.node.clone()),
            source,
        })
    }

    /// Maps the replies every RPC may get instead of its own.
    fn other_reply<E: std::error::Error>(
        &self,
        request: &'static str,
        reply: PeerReply,
    ) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        match reply {
            PeerReply::Fatal(f) => self.remote(RaftError::Fatal(fatal(f))),
            // Not (yet, or any more) a replica there: openraft backs off, as from a node
            // it cannot reach.
            PeerReply::NoGroup { group } => {
                RPCError::Unreachable(Unreachable::new(&PeerError::NoGroup {
                    target: self.target,
                    group,
                }))
            }
            PeerReply::Error(message) => RPCError::Network(NetworkError::new(&PeerError::Remote {
                target: self.target,
                message,
            })),
            other => {
                RPCError::Network(NetworkError::new(&unexpected(self.target, request, &other)))
            }
        }
    }
}

/// [`BACKOFF_MIN`] doubling up to [`BACKOFF_MAX`], forever.
fn peer_backoff() -> impl Iterator<Item = Duration> + Send + 'static {
    std::iter::successors(Some(BACKOFF_MIN), |d| Some((*d * 2).min(BACKOFF_MAX)))
}

fn rpc_name(rpc: RPCTypes) -> &'static str {
    match rpc {
        RPCTypes::Vote => "Vote",
        RPCTypes::AppendEntries => "AppendEntries",
        RPCTypes::InstallSnapshot => "InstallSnapshot",
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let entries = rpc.entries.len() as u64;
        if let Some(hint) = self.append_size.start(entries) {
            // The previous request timed out (openraft dropped it): a smaller one may
            // fit in the time openraft gives each (see `append_size`).
            debug!(
                target = self.target,
                group = self.group,
                entries,
                hint,
                "the last AppendEntries timed out; asking openraft for fewer entries"
            );
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(hint),
            ));
        }
        let result = self.send_append_entries(rpc, option).await;
        self.append_size.finish();
        result
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let bytes = encode_frame(
            &GroupRequest::from(rpc).to(self.group),
            "request",
            PEER_FRAME_BYTES_MAX,
        )
        .map_err(|source| {
            let e = PeerError::Frame {
                target: self.target,
                source,
            };
            RPCError::Network(NetworkError::new(&e))
        })?;
        match self
            .send(RPCTypes::InstallSnapshot, &bytes, option.hard_ttl())
            .await?
        {
            PeerReply::InstallSnapshot { vote } => Ok(frame::install_snapshot_response(vote)),
            PeerReply::SnapshotMismatch {
                expect_id,
                expect_offset,
                got_id,
                got_offset,
            } => Err(
                self.remote(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(
                    frame::snapshot_mismatch(expect_id, expect_offset, got_id, got_offset),
                ))),
            ),
            other => Err(self.other_reply("InstallSnapshot", other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let asked = rpc.clone();
        let bytes = encode_frame(
            &GroupRequest::from(rpc).to(self.group),
            "request",
            PEER_FRAME_BYTES_MAX,
        )
        .map_err(|source| {
            let e = PeerError::Frame {
                target: self.target,
                source,
            };
            RPCError::Network(NetworkError::new(&e))
        })?;
        match self.send(RPCTypes::Vote, &bytes, option.hard_ttl()).await? {
            PeerReply::Vote {
                vote,
                vote_granted,
                last_log_id,
            } => {
                let response = frame::vote_response(vote, vote_granted, last_log_id);
                if crate::raft::reelect::outvoted_by_a_shorter_log(&asked, &response) {
                    self.outvoted.raise();
                }
                Ok(response)
            }
            other => Err(self.other_reply("Vote", other)),
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(peer_backoff())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_are_the_host_part() {
        assert_eq!(server_name("127.0.0.1:7440"), Some("127.0.0.1"));
        assert_eq!(server_name("node-2.herald:7440"), Some("node-2.herald"));
        assert_eq!(server_name("[::1]:7440"), Some("::1"));
        assert_eq!(server_name("no-port"), None);
        assert_eq!(server_name(":7440"), None);
        assert_eq!(server_name("host:port"), None);
        assert_eq!(server_name("[::1:7440"), None);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let waits: Vec<_> = peer_backoff().take(6).collect();
        assert_eq!(
            waits,
            [100, 200, 250, 250, 250, 250].map(Duration::from_millis)
        );
    }
}
