//! The peer transport end to end on loopback: real QUIC endpoints with a generated PKI,
//! a fake [`PeerHandler`] in place of Raft.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_client::io::TransportLimits;
use herald_client::wire::{IdempotencyKey, Principal, ALPN_PEER};
use openraft::error::{
    ClientWriteError, Fatal, ForwardToLeader, InstallSnapshotError, RPCError, RaftError,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{
    BasicNode, CommittedLeaderId, EntryPayload, Membership, RaftNetwork, RaftNetworkFactory,
    SnapshotMeta, StoredMembership,
};
use tokio::sync::mpsc;

use super::frame::{
    self, connection_exporter, encode_frame, hello_proof, read_frame, write_frame, FrameError,
    PeerHello, PeerReply, PeerRequest, CLOSE_AUTH_FAILED, CLOSE_PROTOCOL, STREAM_MALFORMED,
};
use super::*;
use crate::raft::{Entry, LogId, NodeId, Outcome, Response, TypeConfig, Vote};
use crate::store::Command;

const SECRET: &[u8] = b"the cluster secret";

/// Files of a generated CA and node certificate.
struct Pki {
    _dir: tempfile::TempDir,
    ca_pem: Vec<u8>,
    server_config: quinn::ServerConfig,
}

fn pki() -> Pki {
    let generated = crate::certs::generate_pki(&["127.0.0.1", "localhost"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("node.pem");
    let key = dir.path().join("node.key");
    std::fs::write(&cert, &generated.node_cert_pem).unwrap();
    std::fs::write(&key, &generated.node_key_pem).unwrap();
    let server_config =
        crate::certs::server_config(&cert, &key, &TransportLimits::default()).unwrap();
    Pki {
        _dir: dir,
        ca_pem: generated.ca_pem.into_bytes(),
        server_config,
    }
}

fn peer_client_config(pki: &Pki) -> quinn::ClientConfig {
    herald_client::io::client_config(&pki.ca_pem, ALPN_PEER, &TransportLimits::default()).unwrap()
}

/// Stands in for Raft: records what arrives, answers canned responses.
#[derive(Default)]
struct Fake {
    calls: AtomicUsize,
    entries: Mutex<Vec<Entry>>,
    /// Commands of forwarded batches, in the order they arrived.
    batched: Mutex<Vec<Command>>,
    follower: bool,
    stopped: bool,
}

/// The fake's answer to a batched `Trim { now_ms }`: `None` (not committed) for every
/// `now_ms` that is 3 mod 7, otherwise `Published { seq: now_ms }`.
fn fake_batch_result(command: &Command) -> Option<Response> {
    match command {
        Command::Trim { now_ms } if now_ms % 7 == 3 => None,
        Command::Trim { now_ms } => Some(Ok(Outcome::Published {
            seq: *now_ms,
            duplicate: false,
        })),
        _ => Some(Ok(Outcome::Changed)),
    }
}

fn fake_not_leader() -> RaftError<NodeId, ClientWriteError<NodeId, BasicNode>> {
    RaftError::APIError(ClientWriteError::ForwardToLeader(ForwardToLeader {
        leader_id: Some(2),
        leader_node: Some(BasicNode::new("10.0.0.2:7440")),
    }))
}

impl PeerHandler for Fake {
    async fn append_entries(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.entries.lock().unwrap().extend(rpc.entries);
        Ok(AppendEntriesResponse::Success)
    }

    async fn vote(
        &self,
        rpc: VoteRequest<NodeId>,
    ) -> Result<VoteResponse<NodeId>, RaftError<NodeId>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.stopped {
            return Err(RaftError::Fatal(Fatal::Stopped));
        }
        Ok(VoteResponse::new(rpc.vote, rpc.last_log_id, true))
    }

    async fn install_snapshot(
        &self,
        rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if rpc.offset != 0 {
            return Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(
                frame::snapshot_mismatch(
                    rpc.meta.snapshot_id.clone(),
                    0,
                    rpc.meta.snapshot_id,
                    rpc.offset,
                ),
            )));
        }
        Ok(InstallSnapshotResponse { vote: rpc.vote })
    }

    async fn client_write(
        &self,
        _command: Command,
    ) -> Result<Response, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.follower {
            return Err(fake_not_leader());
        }
        Ok(Ok(Outcome::Published {
            seq: 7,
            duplicate: false,
        }))
    }

    async fn client_write_batch(
        &self,
        commands: crate::raft::Batch,
    ) -> Result<Vec<Option<Response>>, ClientWriteRaftError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.follower {
            return Err(fake_not_leader());
        }
        let results = commands.iter().map(fake_batch_result).collect();
        self.batched
            .lock()
            .unwrap()
            .extend(commands.iter().cloned());
        Ok(results)
    }
}

/// A node accepting peer connections with [`serve_peer`].
struct Acceptor {
    _endpoint: quinn::Endpoint,
    addr: SocketAddr,
    fake: Arc<PeerServerContext<Arc<Fake>>>,
    accepted: Arc<AtomicUsize>,
    conns: mpsc::UnboundedReceiver<quinn::Connection>,
}

impl Acceptor {
    fn calls(&self) -> usize {
        self.fake.groups.calls.load(Ordering::SeqCst)
    }
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn acceptor(pki: &Pki, fake: Fake) -> Acceptor {
    let endpoint =
        quinn::Endpoint::server(pki.server_config.clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let ctx = Arc::new(PeerServerContext {
        groups: Arc::new(fake),
        secret: SECRET.to_vec(),
        streams_max: 8,
    });
    let accepted = Arc::new(AtomicUsize::new(0));
    let (tx, conns) = mpsc::unbounded_channel();
    {
        let endpoint = endpoint.clone();
        let ctx = ctx.clone();
        let accepted = accepted.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let Ok(conn) = incoming.await else { continue };
                accepted.fetch_add(1, Ordering::SeqCst);
                let _ = tx.send(conn.clone());
                tokio::spawn(serve_peer(conn, ctx.clone()));
            }
        });
    }
    Acceptor {
        _endpoint: endpoint,
        addr,
        fake: ctx,
        accepted,
        conns,
    }
}

fn network(pki: &Pki, secret: &[u8], connect_timeout: Duration) -> PeerNetwork {
    PeerNetwork::new(PeerNetworkConfig {
        node_id: 1,
        secret: secret.to_vec(),
        endpoint: quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap(),
        client_config: peer_client_config(pki),
        connect_timeout,
        rpc_timeout: Duration::from_secs(5),
    })
}

async fn client_to(network: &PeerNetwork, target: NodeId, addr: SocketAddr) -> PeerClient {
    let mut factory = network.for_group(1);
    factory
        .new_client(target, &BasicNode::new(addr.to_string()))
        .await
}

fn option() -> RPCOption {
    RPCOption::new(Duration::from_secs(5))
}

fn publish_entry(index: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(2, 1), index),
        payload: EntryPayload::Normal(crate::raft::Batch::new(vec![Command::Publish {
            conv: 42,
            sender: Principal::Service("backend".into()),
            key: IdempotencyKey::Caller(format!("key-{index}")),
            payload: vec![index as u8; 300],
            timestamp_ms: 1_700_000_000_000 + index,
        }])),
    }
}

fn snapshot_meta() -> SnapshotMeta<NodeId, BasicNode> {
    SnapshotMeta {
        last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), 10)),
        last_membership: StoredMembership::new(
            None,
            Membership::new(
                vec![std::collections::BTreeSet::from([1, 2])],
                std::collections::BTreeMap::from([
                    (1, BasicNode::new("127.0.0.1:1")),
                    (2, BasicNode::new("127.0.0.1:2")),
                ]),
            ),
        ),
        snapshot_id: "snap-10".into(),
    }
}

/// A raw peer-ALPN connection, for speaking the protocol by hand.
async fn raw_connection(pki: &Pki, addr: SocketAddr) -> quinn::Connection {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint
        .connect_with(peer_client_config(pki), addr, "127.0.0.1")
        .unwrap()
        .await
        .unwrap()
}

/// Sends raw bytes on a new stream, finishes it and reads the reply.
async fn raw_call(conn: &quinn::Connection, bytes: &[u8]) -> Result<PeerReply, FrameError> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, bytes, "request").await?;
    read_frame::<PeerReply>(&mut recv, "reply", PEER_REPLY_BYTES_MAX).await
}

fn hello_bytes(conn: &quinn::Connection, secret: &[u8], node_id: NodeId) -> Vec<u8> {
    let exporter = connection_exporter(conn).unwrap();
    encode_frame(
        &PeerRequest::Hello(PeerHello {
            node_id,
            proof: hello_proof(secret, node_id, &exporter),
        }),
        "hello",
        HELLO_FRAME_BYTES_MAX,
    )
    .unwrap()
}

fn vote_bytes() -> Vec<u8> {
    encode_frame(
        &GroupRequest::from(VoteRequest::new(Vote::new(3, 1), None)).to(1),
        "request",
        PEER_FRAME_BYTES_MAX,
    )
    .unwrap()
}

async fn closed_with(conn: &quinn::Connection) -> quinn::ConnectionError {
    tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .unwrap()
}

fn application_code(e: &quinn::ConnectionError) -> Option<u64> {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
        _ => None,
    }
}

#[tokio::test]
async fn rpcs_reach_the_handler_and_answers_come_back() {
    let pki = pki();
    let node = acceptor(&pki, Fake::default());
    let net = network(&pki, SECRET, Duration::from_secs(5));
    let mut client = client_to(&net, 2, node.addr).await;
    assert_eq!(node.accepted(), 0, "dialing is lazy");

    let entries = vec![publish_entry(5), publish_entry(6)];
    let resp = client
        .append_entries(
            AppendEntriesRequest {
                vote: Vote::new_committed(2, 1),
                prev_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), 4)),
                entries: entries.clone(),
                leader_commit: None,
            },
            option(),
        )
        .await
        .unwrap();
    assert_eq!(resp, AppendEntriesResponse::Success);
    assert_eq!(*node.fake.groups.entries.lock().unwrap(), entries);

    let resp = client
        .vote(
            VoteRequest::new(
                Vote::new(3, 1),
                Some(LogId::new(CommittedLeaderId::new(2, 1), 6)),
            ),
            option(),
        )
        .await
        .unwrap();
    assert!(resp.vote_granted);
    assert_eq!(resp.vote, Vote::new(3, 1));

    let chunk = |offset| InstallSnapshotRequest::<TypeConfig> {
        vote: Vote::new_committed(3, 1),
        meta: snapshot_meta(),
        offset,
        data: vec![1; 4096],
        done: false,
    };
    let resp = client.install_snapshot(chunk(0), option()).await.unwrap();
    assert_eq!(resp.vote, Vote::new_committed(3, 1));
    let err = client
        .install_snapshot(chunk(99), option())
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            RPCError::RemoteError(r) if matches!(
                &r.source,
                RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m)) if m.got.offset == 99
            )
        ),
        "{err:?}"
    );

    let reply = net
        .forward(1, 2, &node.addr.to_string(), Command::Trim { now_ms: 1 })
        .await
        .unwrap();
    assert_eq!(
        reply,
        ForwardReply::Done(Ok(Outcome::Published {
            seq: 7,
            duplicate: false
        }))
    );

    // Concurrent RPCs share the one connection.
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut client = client_to(&net, 2, node.addr).await;
        tasks.push(tokio::spawn(async move {
            client
                .vote(VoteRequest::new(Vote::new(4, 1), None), option())
                .await
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap().unwrap().vote_granted);
    }
    assert_eq!(node.accepted(), 1, "one connection per peer");
    assert_eq!(net.cached_peers(), 1);
    assert_eq!(node.calls(), 5 + 16);
}

#[tokio::test]
async fn a_follower_answers_not_leader_and_fatal_errors_are_remote() {
    let pki = pki();
    let node = acceptor(
        &pki,
        Fake {
            follower: true,
            stopped: true,
            ..Fake::default()
        },
    );
    let net = network(&pki, SECRET, Duration::from_secs(5));
    let reply = net
        .forward(1, 2, &node.addr.to_string(), Command::Trim { now_ms: 1 })
        .await
        .unwrap();
    assert_eq!(
        reply,
        ForwardReply::NotLeader(Some((2, "10.0.0.2:7440".into())))
    );
    let mut client = client_to(&net, 2, node.addr).await;
    let err = client
        .vote(VoteRequest::new(Vote::new(3, 1), None), option())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RPCError::RemoteError(r) if matches!(r.source, RaftError::Fatal(Fatal::Stopped))),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_wrong_secret_is_refused_and_nothing_is_served() {
    let pki = pki();
    let node = acceptor(&pki, Fake::default());
    let net = network(&pki, b"another cluster", Duration::from_secs(5));
    let mut client = client_to(&net, 2, node.addr).await;
    let err = client
        .vote(VoteRequest::new(Vote::new(3, 1), None), option())
        .await
        .unwrap_err();
    let RPCError::Unreachable(e) = &err else {
        panic!("expected Unreachable, got {err:?}");
    };
    assert!(e.to_string().contains("wrong cluster secret"), "{e}");
    // And by hand: the refusal, then the close with the auth code.
    let conn = raw_connection(&pki, node.addr).await;
    let reply = raw_call(&conn, &hello_bytes(&conn, b"nope", 1))
        .await
        .unwrap();
    assert!(
        matches!(&reply, PeerReply::Refused(r) if r.contains("wrong cluster secret")),
        "{reply:?}"
    );
    let closed = closed_with(&conn).await;
    assert_eq!(
        application_code(&closed),
        Some(u64::from(CLOSE_AUTH_FAILED))
    );
    assert_eq!(node.calls(), 0);
}

#[tokio::test]
async fn an_rpc_before_the_hello_is_refused() {
    let pki = pki();
    let node = acceptor(&pki, Fake::default());
    let conn = raw_connection(&pki, node.addr).await;
    let reply = raw_call(&conn, &vote_bytes()).await.unwrap();
    assert!(
        matches!(&reply, PeerReply::Refused(r) if r.contains("hello")),
        "{reply:?}"
    );
    let closed = closed_with(&conn).await;
    assert_eq!(application_code(&closed), Some(u64::from(CLOSE_PROTOCOL)));
    assert_eq!(node.calls(), 0);
}

#[tokio::test]
async fn an_oversized_hello_prefix_is_refused_before_reading_the_body() {
    let pki = pki();
    let node = acceptor(&pki, Fake::default());
    let conn = raw_connection(&pki, node.addr).await;
    // Only the header: had the acceptor tried to read (or allocate) the body it would
    // have reported a truncated frame, not an oversized one.
    let reply = raw_call(&conn, &(HELLO_FRAME_BYTES_MAX + 1).to_le_bytes())
        .await
        .unwrap();
    assert!(
        matches!(&reply, PeerReply::Refused(r) if r.contains("announces")),
        "{reply:?}"
    );
    let closed = closed_with(&conn).await;
    assert_eq!(application_code(&closed), Some(u64::from(CLOSE_PROTOCOL)));
}

#[tokio::test]
async fn a_malformed_request_resets_only_its_stream() {
    let pki = pki();
    let node = acceptor(&pki, Fake::default());
    let conn = raw_connection(&pki, node.addr).await;
    let reply = raw_call(&conn, &hello_bytes(&conn, SECRET, 1))
        .await
        .unwrap();
    assert_eq!(reply, PeerReply::HelloOk);

    // A length prefix of 4 GiB: refused at the header.
    let err = raw_call(&conn, &u32::MAX.to_le_bytes()).await.unwrap_err();
    assert!(
        matches!(&err, FrameError::Read { source: quinn::ReadError::Reset(code), .. }
            if code.into_inner() == u64::from(STREAM_MALFORMED)),
        "{err:?}"
    );
    // A body that is not a valid archive.
    let mut garbage = 16u32.to_le_bytes().to_vec();
    garbage.extend_from_slice(&[0xAB; 16]);
    let err = raw_call(&conn, &garbage).await.unwrap_err();
    assert!(matches!(&err, FrameError::Read { .. }), "{err:?}");

    // The connection still serves well-formed requests.
    let reply = raw_call(&conn, &vote_bytes()).await.unwrap();
    assert!(
        matches!(
            reply,
            PeerReply::Vote {
                vote_granted: true,
                ..
            }
        ),
        "{reply:?}"
    );
    assert!(conn.close_reason().is_none());
    assert_eq!(node.calls(), 1);
}

#[tokio::test]
async fn an_unreachable_peer_is_reported_quickly() {
    let pki = pki();
    // A UDP socket that never answers: the handshake can only time out.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let net = network(&pki, SECRET, Duration::from_millis(300));
    let mut client = client_to(&net, 2, addr).await;

    let start = Instant::now();
    let err = client
        .vote(
            VoteRequest::new(Vote::new(3, 1), None),
            RPCOption::new(Duration::from_secs(10)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );

    // A heartbeat-sized budget is not spent waiting for a dial either.
    let net = network(&pki, SECRET, Duration::from_secs(30));
    let mut client = client_to(&net, 2, addr).await;
    let start = Instant::now();
    let err = client
        .append_entries(
            AppendEntriesRequest {
                vote: Vote::new_committed(2, 1),
                prev_log_id: None,
                entries: vec![],
                leader_commit: None,
            },
            RPCOption::new(Duration::from_millis(100)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );

    // An address that is not host:port fails at once.
    let mut bad = net
        .for_group(1)
        .new_client(3, &BasicNode::new("nowhere"))
        .await;
    let err = bad
        .vote(VoteRequest::new(Vote::new(3, 1), None), option())
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");
    drop(silent);
}

#[tokio::test]
async fn a_dead_connection_is_redialed() {
    let pki = pki();
    let mut node = acceptor(&pki, Fake::default());
    let net = network(&pki, SECRET, Duration::from_secs(5));
    let mut client = client_to(&net, 2, node.addr).await;
    let vote = || VoteRequest::new(Vote::new(3, 1), None);
    client.vote(vote(), option()).await.unwrap();
    let first = node.conns.recv().await.unwrap();
    first.close(0u32.into(), b"bye");
    // Wait until the dialer has seen the close.
    tokio::time::sleep(Duration::from_millis(200)).await;
    client.vote(vote(), option()).await.unwrap();
    assert_eq!(node.accepted(), 2);
    assert_eq!(net.cached_peers(), 1);
}

#[tokio::test]
async fn an_oversized_batch_asks_openraft_for_fewer_entries() {
    let pki = pki();
    let node = acceptor(&pki, Fake::default());
    let net = network(&pki, SECRET, Duration::from_secs(5));
    let mut client = client_to(&net, 2, node.addr).await;
    let big = |index| Entry {
        log_id: LogId::new(CommittedLeaderId::new(2, 1), index),
        payload: EntryPayload::Normal(crate::raft::Batch::new(vec![Command::Publish {
            conv: 1,
            sender: Principal::Service("s".into()),
            key: IdempotencyKey::Caller(String::new()),
            payload: vec![0; (PEER_FRAME_BYTES_MAX / 3) as usize + 1024],
            timestamp_ms: 0,
        }])),
    };
    let err = client
        .append_entries(
            AppendEntriesRequest {
                vote: Vote::new_committed(2, 1),
                prev_log_id: None,
                entries: vec![big(1), big(2), big(3)],
                leader_commit: None,
            },
            option(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::PayloadTooLarge(_)), "{err:?}");
    assert_eq!(node.accepted(), 0, "nothing was sent");
}

fn trims(range: std::ops::Range<u64>) -> Vec<Command> {
    range.map(|now_ms| Command::Trim { now_ms }).collect()
}

#[tokio::test]
async fn a_batch_is_answered_in_order() {
    let pki = pki();
    let node = acceptor(&pki, Fake::default());
    let net = network(&pki, SECRET, Duration::from_secs(5));
    let addr = node.addr.to_string();

    // Reverse order, so an answer sorted by anything but position would show.
    let commands: Vec<Command> = trims(0..100).into_iter().rev().collect();
    let reply = net
        .forward_batch(1, 2, &addr, commands.clone())
        .await
        .unwrap();
    let ForwardBatchReply::Done(results) = reply else {
        panic!("expected Done, got {reply:?}");
    };
    assert_eq!(results.len(), 100);
    for (command, result) in commands.iter().zip(&results) {
        assert_eq!(*result, fake_batch_result(command), "{command:?}");
    }
    assert!(results.iter().any(Option::is_none));
    assert_eq!(*node.fake.groups.batched.lock().unwrap(), commands);

    // An empty batch is a valid, empty answer.
    let reply = net.forward_batch(1, 2, &addr, Vec::new()).await.unwrap();
    assert_eq!(reply, ForwardBatchReply::Done(Vec::new()));
    assert_eq!(node.calls(), 2);
    assert_eq!(node.accepted(), 1);
}

#[tokio::test]
async fn a_follower_answers_a_batch_with_not_leader() {
    let pki = pki();
    let node = acceptor(
        &pki,
        Fake {
            follower: true,
            ..Fake::default()
        },
    );
    let net = network(&pki, SECRET, Duration::from_secs(5));
    let reply = net
        .forward_batch(1, 2, &node.addr.to_string(), trims(0..10))
        .await
        .unwrap();
    assert_eq!(
        reply,
        ForwardBatchReply::NotLeader(Some((2, "10.0.0.2:7440".into())))
    );
    assert!(node.fake.groups.batched.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_oversized_batch_is_not_sent_and_not_served() {
    let pki = pki();
    let node = acceptor(&pki, Fake::default());
    let net = network(&pki, SECRET, Duration::from_secs(5));
    let addr = node.addr.to_string();

    // Too many commands: refused before encoding.
    let count = FORWARD_BATCH_COMMANDS_MAX + 1;
    let err = net
        .forward_batch(1, 2, &addr, trims(0..count as u64))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PeerError::BatchTooLarge { commands, bytes: None, .. } if commands == count),
        "{err:?}"
    );
    assert!(!err.is_unreachable());
    // Too many bytes: refused after encoding.
    let big = |n| Command::Publish {
        conv: 1,
        sender: Principal::Service("s".into()),
        key: IdempotencyKey::Caller(format!("big-{n}")),
        payload: vec![0; (PEER_FRAME_BYTES_MAX / 3) as usize + 1024],
        timestamp_ms: 0,
    };
    let err = net
        .forward_batch(1, 2, &addr, vec![big(1), big(2), big(3)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, PeerError::BatchTooLarge { commands: 3, bytes: Some(b), .. }
            if b > u64::from(PEER_FRAME_BYTES_MAX)),
        "{err:?}"
    );
    assert!(err.to_string().contains("split"), "{err}");
    assert_eq!(node.accepted(), 0, "nothing was sent");

    // And an acceptor does not serve one that was sent anyway.
    let conn = raw_connection(&pki, node.addr).await;
    let reply = raw_call(&conn, &hello_bytes(&conn, SECRET, 1))
        .await
        .unwrap();
    assert_eq!(reply, PeerReply::HelloOk);
    let bytes = encode_frame(
        &GroupRequest::ForwardBatch(trims(0..count as u64).into()).to(1),
        "request",
        PEER_FRAME_BYTES_MAX,
    )
    .unwrap();
    let reply = raw_call(&conn, &bytes).await.unwrap();
    assert!(
        matches!(&reply, PeerReply::Error(e) if e.contains("over the maximum")),
        "{reply:?}"
    );
    assert_eq!(node.calls(), 0);
}

/// An acceptor that says hello and answers every later request with `reply`.
async fn canned_acceptor(pki: &Pki, reply: PeerReply) -> (quinn::Endpoint, SocketAddr) {
    let endpoint =
        quinn::Endpoint::server(pki.server_config.clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let server = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut first = true;
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let _ =
                        read_frame::<PeerRequest>(&mut recv, "request", PEER_FRAME_BYTES_MAX).await;
                    let answer = if first {
                        PeerReply::HelloOk
                    } else {
                        reply.clone()
                    };
                    first = false;
                    let bytes = encode_frame(&answer, "reply", answer.bytes_max()).unwrap();
                    let _ = write_frame(&mut send, &bytes, "reply").await;
                }
            });
        }
    });
    (endpoint, addr)
}

#[tokio::test]
async fn a_batch_reply_of_the_wrong_length_is_an_error() {
    let pki = pki();
    let (_endpoint, addr) = canned_acceptor(
        &pki,
        PeerReply::ForwardedBatch(vec![Some(Ok(Outcome::Changed)); 3]),
    )
    .await;
    let net = network(&pki, SECRET, Duration::from_secs(5));
    let err = net
        .forward_batch(1, 2, &addr.to_string(), trims(0..4))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PeerError::BatchLengthMismatch {
                sent: 4,
                got: 3,
                ..
            }
        ),
        "{err:?}"
    );
    // The single forward is not answered by a batch reply either.
    let err = net
        .forward(1, 2, &addr.to_string(), Command::Trim { now_ms: 1 })
        .await
        .unwrap_err();
    assert!(matches!(err, PeerError::UnexpectedReply { .. }), "{err:?}");
}

#[tokio::test]
async fn a_slow_batch_times_out_within_the_rpc_budget() {
    let pki = pki();
    // Says hello, then never answers: the whole batch must fit in `rpc_timeout`.
    let endpoint =
        quinn::Endpoint::server(pki.server_config.clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let server = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let Ok(conn) = incoming.await else { continue };
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let _ =
                        read_frame::<PeerRequest>(&mut recv, "request", PEER_FRAME_BYTES_MAX).await;
                    if held.is_empty() {
                        let bytes =
                            encode_frame(&PeerReply::HelloOk, "reply", PEER_REPLY_BYTES_MAX)
                                .unwrap();
                        let _ = write_frame(&mut send, &bytes, "reply").await;
                    }
                    held.push((send, recv));
                }
            });
        }
    });
    let net = PeerNetwork::new(PeerNetworkConfig {
        node_id: 1,
        secret: SECRET.to_vec(),
        endpoint: quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap(),
        client_config: peer_client_config(&pki),
        connect_timeout: Duration::from_secs(5),
        rpc_timeout: Duration::from_millis(500),
    });
    let start = Instant::now();
    let err = net
        .forward_batch(1, 2, &addr.to_string(), trims(0..10))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PeerError::Timeout { rpc: "ForwardBatch", after, .. }
            if after == Duration::from_millis(500)),
        "{err:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    drop(endpoint);
}
