//! The acceptor side: serves openraft's RPCs (and forwarded writes) arriving on one
//! peer connection.
//!
//! Owns: the hello check of an accepted peer connection, one task per RPC stream, and
//! the mapping from a request to a [`PeerHandler`] call and from its result to a
//! [`PeerReply`]. Must not: read or change the state machine or sessions itself; it
//! hands each message to Raft and sends back what Raft answered.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, ForwardToLeader, InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use tracing::{debug, info, warn};

use super::frame::{
    self, connection_exporter, encode_frame, read_frame, verify_hello_proof, write_frame,
    FrameError, GroupRequest, MoveRequest, PeerReply, PeerRequest, ReadRequest, WireFatal,
    CLOSE_AUTH_FAILED, CLOSE_PROTOCOL, FORWARD_BATCH_COMMANDS_MAX, HELLO_FRAME_BYTES_MAX,
    PEER_FRAME_BYTES_MAX, STREAM_MALFORMED, WATCH_CONVS_MAX,
};
use crate::raft::{Batch, GroupId, NodeId, Raft, Response, TypeConfig};
use crate::store::Command;

/// The first stream of a connection (the hello) must arrive and be read within this.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A request frame must be read completely within this once its stream is accepted
/// (a 64 MiB body at 5 MB/s takes ~13 s); the stream is reset after it.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// After refusing a connection, wait at most this long for the dialer to read the
/// refusal and close, then close it ourselves.
pub const REFUSE_LINGER: Duration = Duration::from_secs(2);

/// Why a client write (or a batch of them) was not taken: openraft's
/// `ForwardToLeader` when this node is not the leader, or a fatal error.
pub type ClientWriteRaftError = RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>;

/// What the acceptor does with each request: [`Raft`] in production, a fake in tests.
///
/// Every method is one openraft entry point (or, for a batch, a sequence of them); the
/// transport never looks inside.
pub trait PeerHandler: Send + Sync + 'static {
    /// [`Raft::append_entries`].
    fn append_entries(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> impl Future<Output = Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>> + Send;

    /// [`Raft::vote`].
    fn vote(
        &self,
        rpc: VoteRequest<NodeId>,
    ) -> impl Future<Output = Result<VoteResponse<NodeId>, RaftError<NodeId>>> + Send;

    /// [`Raft::install_snapshot`].
    fn install_snapshot(
        &self,
        rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> impl Future<
        Output = Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    > + Send;

    /// [`Raft::client_write`], returning the state machine's response.
    fn client_write(
        &self,
        command: Command,
    ) -> impl Future<Output = Result<Response, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>>
           + Send;

    /// Proposes `commands` in the given order ([`Raft::client_write_ff`] one after the
    /// other, so their log entries keep that order) and waits for all of them.
    ///
    /// `Ok` holds one element per command, in order: `Some(response)` when committed
    /// and applied, `None` when not (leadership moved, or Raft stopped, after the
    /// batch was accepted). `Err(ForwardToLeader)` when this node is not the leader
    /// (nothing was proposed), or when no command was committed because leadership
    /// moved; `Err(Fatal)` when Raft has stopped before the first proposal.
    fn client_write_batch(
        &self,
        commands: crate::raft::Batch,
    ) -> impl Future<Output = Result<Vec<Option<Response>>, ClientWriteRaftError>> + Send;

    /// Moves one replica of the group this node leads (see
    /// [`GroupRequest::Reconfigure`]). The default refuses.
    fn reconfigure(&self, request: MoveRequest) -> impl Future<Output = PeerReply> + Send {
        let _ = request;
        async { PeerReply::error("this node moves no replicas") }
    }

    /// Starts an election on this replica (the leader hands leadership over). The
    /// default refuses.
    fn elect(&self) -> impl Future<Output = PeerReply> + Send {
        async { PeerReply::error("this node does not take over leadership") }
    }

    /// Answers a read (authorization, history) of the group's state; only the leader
    /// serves reads. The default refuses: a handler without conversation state.
    fn read(&self, request: ReadRequest) -> impl Future<Output = PeerReply> + Send {
        let _ = request;
        async { PeerReply::error("this node serves no reads") }
    }

    /// Serves a watch stream opened with `convs` until it ends (see [`super::watch`]).
    /// The default answers that there is nothing to watch here.
    fn watch(
        &self,
        convs: Vec<u64>,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> impl Future<Output = ()> + Send {
        let _ = (convs, recv);
        async move {
            let mut send = send;
            send_reply(&mut send, &PeerReply::error("this node serves no watches")).await;
        }
    }
}

impl PeerHandler for Raft {
    async fn append_entries(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        Raft::append_entries(self, rpc).await
    }

    async fn vote(
        &self,
        rpc: VoteRequest<NodeId>,
    ) -> Result<VoteResponse<NodeId>, RaftError<NodeId>> {
        Raft::vote(self, rpc).await
    }

    async fn install_snapshot(
        &self,
        rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        Raft::install_snapshot(self, rpc).await
    }

    async fn client_write(
        &self,
        command: Command,
    ) -> Result<Response, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>> {
        let mut responses = Raft::client_write(self, Batch::new(vec![command]))
            .await?
            .data;
        Ok(responses.pop().unwrap_or_else(|| {
            Err(herald_client::wire::Refusal::new(
                herald_client::wire::RefusalCode::Internal,
                "the state machine answered an entry of one command with no response; this is a bug",
            ))
        }))
    }

    async fn client_write_batch(
        &self,
        commands: crate::raft::Batch,
    ) -> Result<Vec<Option<Response>>, ClientWriteRaftError> {
        if let Some(not_leader) = not_leader(self) {
            return Err(RaftError::APIError(ClientWriteError::ForwardToLeader(
                not_leader,
            )));
        }
        // The whole batch is one log entry: one append, applied in order.
        let count = commands.len();
        let rx = Raft::client_write_ff(self, commands)
            .await
            .map_err(RaftError::Fatal)?;
        match rx.await {
            Ok(Ok(written)) if written.data.len() == count => {
                Ok(written.data.into_iter().map(Some).collect())
            }
            Ok(Err(ClientWriteError::ForwardToLeader(f))) => {
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))
            }
            // A wrong count is a bug; a membership error cannot answer a normal write; a
            // dropped sender means Raft stopped. Either way: not known to be committed.
            Ok(_) | Err(_) => Ok(vec![None; count]),
        }
    }
}

/// `Some(the leader as far as this node knows)` when this node is not the leader.
fn not_leader(raft: &Raft) -> Option<ForwardToLeader<NodeId, BasicNode>> {
    let metrics = raft.metrics();
    let metrics = metrics.borrow();
    let leader = metrics.current_leader;
    (leader != Some(metrics.id)).then(|| ForwardToLeader {
        leader_id: leader,
        leader_node: leader.and_then(|id| {
            metrics
                .membership_config
                .membership()
                .get_node(&id)
                .cloned()
        }),
    })
}

/// Finds the handler of a group this node hosts.
pub trait GroupResolver: Send + Sync + 'static {
    /// What serves one group's RPCs.
    type Handler: PeerHandler;

    /// The handler of `group`, or `None` when this node hosts no replica of it.
    fn group(&self, group: GroupId) -> Option<Self::Handler>;
}

/// One shared handler for every group (tests, and handlers that dispatch by group
/// themselves).
impl<H: PeerHandler> GroupResolver for Arc<H> {
    type Handler = Arc<H>;

    fn group(&self, _group: GroupId) -> Option<Arc<H>> {
        Some(self.clone())
    }
}

impl<H: PeerHandler> PeerHandler for Arc<H> {
    fn append_entries(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> impl Future<Output = Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>> + Send {
        H::append_entries(self, rpc)
    }

    fn vote(
        &self,
        rpc: VoteRequest<NodeId>,
    ) -> impl Future<Output = Result<VoteResponse<NodeId>, RaftError<NodeId>>> + Send {
        H::vote(self, rpc)
    }

    fn install_snapshot(
        &self,
        rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> impl Future<
        Output = Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    > + Send {
        H::install_snapshot(self, rpc)
    }

    fn client_write(
        &self,
        command: Command,
    ) -> impl Future<Output = Result<Response, ClientWriteRaftError>> + Send {
        H::client_write(self, command)
    }

    fn client_write_batch(
        &self,
        commands: crate::raft::Batch,
    ) -> impl Future<Output = Result<Vec<Option<Response>>, ClientWriteRaftError>> + Send {
        H::client_write_batch(self, commands)
    }

    fn read(&self, request: ReadRequest) -> impl Future<Output = PeerReply> + Send {
        H::read(self, request)
    }

    fn elect(&self) -> impl Future<Output = PeerReply> + Send {
        H::elect(self)
    }

    fn reconfigure(&self, request: MoveRequest) -> impl Future<Output = PeerReply> + Send {
        H::reconfigure(self, request)
    }

    fn watch(
        &self,
        convs: Vec<u64>,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> impl Future<Output = ()> + Send {
        H::watch(self, convs, send, recv)
    }
}

/// What [`serve_peer`] needs.
pub struct PeerServerContext<R> {
    /// The groups this node hosts (each request goes to its group's Raft).
    pub groups: R,
    /// The cluster secret the dialer's hello must prove.
    pub secret: Vec<u8>,
    /// Concurrent RPC streams one peer connection may have open; also the bound on
    /// in-flight request tasks per connection (a stream is served by one task, and
    /// QUIC does not let the peer open more streams than this).
    pub streams_max: u32,
}

/// Serves one accepted peer connection (ALPN `herald-peer/1`) until it closes.
///
/// Sets the connection's stream limit to `streams_max` (the endpoint's default is sized
/// for client sessions), checks the hello on the first stream, then serves each further
/// stream in its own task. A wrong secret or a request before the hello is answered
/// with [`PeerReply::Refused`] and the connection is closed; a malformed frame resets
/// only its stream.
pub async fn serve_peer<R: GroupResolver>(conn: quinn::Connection, ctx: Arc<PeerServerContext<R>>) {
    conn.set_max_concurrent_bi_streams(ctx.streams_max.max(1).into());
    let remote = conn.remote_address();
    let Some(peer) = accept_hello(&conn, &ctx).await else {
        return;
    };
    info!(%remote, peer, "peer connection authenticated");
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                debug!(%remote, peer, error = %e, "peer connection ended");
                return;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            serve_stream(peer, send, recv, &ctx).await;
        });
    }
}

/// Reads and checks the hello; the peer's node id when it verifies.
async fn accept_hello<R: GroupResolver>(
    conn: &quinn::Connection,
    ctx: &PeerServerContext<R>,
) -> Option<NodeId> {
    let remote = conn.remote_address();
    let first = tokio::time::timeout(HELLO_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await?;
        let request = read_frame::<PeerRequest>(&mut recv, "hello", HELLO_FRAME_BYTES_MAX).await;
        Ok::<_, quinn::ConnectionError>((send, recv, request))
    })
    .await;
    let (mut send, mut recv, request) = match first {
        Err(_) => {
            warn!(%remote, "peer sent no hello within {HELLO_TIMEOUT:?}; closing");
            conn.close(CLOSE_PROTOCOL.into(), b"no hello in time");
            return None;
        }
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "peer connection ended before its hello");
            return None;
        }
        Ok(Ok(first)) => first,
    };
    let (outcome, reply) = match request {
        Ok(PeerRequest::Hello(hello)) => match connection_exporter(conn) {
            Some(exporter)
                if verify_hello_proof(&ctx.secret, hello.node_id, &exporter, &hello.proof) =>
            {
                (Ok(hello.node_id), PeerReply::HelloOk)
            }
            Some(_) => (
                Err((CLOSE_AUTH_FAILED, "wrong cluster secret")),
                PeerReply::refused(format!(
                    "wrong cluster secret: the hello of node {} does not verify; every node \
                     must be started with the same cluster secret",
                    hello.node_id
                )),
            ),
            None => (
                Err((CLOSE_AUTH_FAILED, "no TLS exporter")),
                PeerReply::refused("cannot verify the hello: the TLS session exports no keys"),
            ),
        },
        Ok(other) => (
            Err((CLOSE_PROTOCOL, "expected a hello")),
            PeerReply::refused(format!(
                "the first stream of a peer connection must carry a hello, not {}",
                other.kind()
            )),
        ),
        Err(e) => {
            warn!(%remote, error = %e, "unreadable peer hello; closing");
            recv.stop(STREAM_MALFORMED.into()).ok();
            (
                Err((CLOSE_PROTOCOL, "unreadable hello")),
                PeerReply::refused(format!("unreadable hello: {e}")),
            )
        }
    };
    send_reply(&mut send, &reply).await;
    match outcome {
        Ok(peer) => Some(peer),
        Err((code, reason)) => {
            warn!(%remote, reason, "refused a peer connection");
            // Give the dialer a moment to read the refusal; it closes first.
            let _ = tokio::time::timeout(REFUSE_LINGER, conn.closed()).await;
            conn.close(code.into(), reason.as_bytes());
            None
        }
    }
}

/// Reads one request from the stream, hands it to Raft and writes the reply.
async fn serve_stream<R: GroupResolver>(
    peer: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    ctx: &PeerServerContext<R>,
) {
    let stream = recv.id();
    let request = match tokio::time::timeout(
        REQUEST_READ_TIMEOUT,
        read_frame::<PeerRequest>(&mut recv, "request", PEER_FRAME_BYTES_MAX),
    )
    .await
    {
        Ok(Ok(request)) => request,
        Ok(Err(e)) => {
            match &e {
                FrameError::Read { .. } => debug!(peer, %stream, error = %e, "peer stream failed"),
                _ => {
                    warn!(peer, %stream, error = %e, "malformed peer request; resetting the stream")
                }
            }
            recv.stop(STREAM_MALFORMED.into()).ok();
            send.reset(STREAM_MALFORMED.into()).ok();
            return;
        }
        Err(_) => {
            warn!(peer, %stream, "peer request not read within {REQUEST_READ_TIMEOUT:?}; resetting the stream");
            recv.stop(STREAM_MALFORMED.into()).ok();
            send.reset(STREAM_MALFORMED.into()).ok();
            return;
        }
    };
    let kind = request.kind();
    let reply = match request {
        PeerRequest::Hello(_) => PeerReply::refused("this connection has already said hello"),
        PeerRequest::Group { group, request } => match ctx.groups.group(group) {
            Some(handler) => match request {
                // A watch keeps the stream: the handler answers on it and pushes until
                // either side ends it.
                GroupRequest::Watch { convs } if convs.len() <= WATCH_CONVS_MAX => {
                    debug!(peer, %stream, group, convs = convs.len(), "watch opened");
                    handler.watch(convs, send, recv).await;
                    return;
                }
                GroupRequest::Watch { convs } => PeerReply::error(format!(
                    "a watch of {} conversations is over the maximum of {WATCH_CONVS_MAX}",
                    convs.len()
                )),
                request => dispatch(&handler, request).await,
            },
            None => PeerReply::NoGroup { group },
        },
    };
    debug!(peer, %stream, request = kind, reply = reply.kind(), "served peer RPC");
    send_reply(&mut send, &reply).await;
}

/// Maps one request to its openraft call and the result to a reply.
pub(crate) async fn dispatch<H: PeerHandler>(raft: &H, request: GroupRequest) -> PeerReply {
    match request {
        GroupRequest::AppendEntries {
            vote,
            prev_log_id,
            entries,
            leader_commit,
        } => {
            let rpc = frame::append_entries_request(vote, prev_log_id, entries, leader_commit);
            match raft.append_entries(rpc).await {
                Ok(resp) => PeerReply::AppendEntries(resp.into()),
                Err(e) => raft_error(e),
            }
        }
        GroupRequest::Vote { vote, last_log_id } => {
            match raft.vote(frame::vote_request(vote, last_log_id)).await {
                Ok(resp) => resp.into(),
                Err(e) => raft_error(e),
            }
        }
        GroupRequest::InstallSnapshot {
            vote,
            meta,
            offset,
            data,
            done,
        } => {
            let rpc = frame::install_snapshot_request(vote, meta, offset, data, done);
            match raft.install_snapshot(rpc).await {
                Ok(resp) => resp.into(),
                Err(RaftError::APIError(e)) => PeerReply::from(&e),
                Err(RaftError::Fatal(f)) => PeerReply::Fatal(WireFatal::from(&f)),
            }
        }
        GroupRequest::Forward(command) => match raft.client_write(command).await {
            Ok(response) => PeerReply::Forwarded(response),
            Err(e) => client_write_error(e),
        },
        GroupRequest::ForwardBatch(commands) if commands.len() > FORWARD_BATCH_COMMANDS_MAX => {
            PeerReply::error(format!(
                "a forwarded batch of {} commands is over the maximum of \
                 {FORWARD_BATCH_COMMANDS_MAX}; nothing was proposed",
                commands.len()
            ))
        }
        GroupRequest::Read(request) => raft.read(request).await,
        GroupRequest::Elect => raft.elect().await,
        GroupRequest::Reconfigure(request) => raft.reconfigure(request).await,
        GroupRequest::Watch { .. } => PeerReply::error("a watch cannot be answered with one reply"),
        GroupRequest::ForwardBatch(commands) => {
            let count = commands.len();
            match raft.client_write_batch(commands).await {
                Ok(results) if results.len() == count => PeerReply::forwarded_batch(results),
                Ok(results) => PeerReply::error(format!(
                    "internal error: {} results for a batch of {count} commands",
                    results.len()
                )),
                Err(e) => client_write_error(e),
            }
        }
    }
}

/// The reply to a forwarded write (or batch) that was not committed.
fn client_write_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> PeerReply {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => PeerReply::NotLeader {
            leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
        },
        RaftError::APIError(e) => PeerReply::error(e),
        RaftError::Fatal(f) => PeerReply::Fatal(WireFatal::from(&f)),
    }
}

fn raft_error(e: RaftError<NodeId>) -> PeerReply {
    match e {
        RaftError::Fatal(f) => PeerReply::Fatal(WireFatal::from(&f)),
        // `APIError` is `Infallible` for AppendEntries and Vote.
        RaftError::APIError(never) => match never {},
    }
}

/// Writes `reply` and finishes the stream; failures only end this stream.
pub(crate) async fn send_reply(send: &mut quinn::SendStream, reply: &PeerReply) {
    let stream = send.id();
    let bytes = match encode_frame(reply, "reply", reply.bytes_max()) {
        Ok(bytes) => bytes,
        Err(e) => {
            warn!(%stream, error = %e, "cannot encode a peer reply; resetting the stream");
            send.reset(STREAM_MALFORMED.into()).ok();
            return;
        }
    };
    if let Err(e) = write_frame(send, &bytes, "reply").await {
        debug!(%stream, error = %e, "cannot send a peer reply");
    }
}
