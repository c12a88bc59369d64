//! The peer transport: openraft's RPCs between Herald nodes over QUIC.
//!
//! Owns: the peer frames ([`frame`]), the dialer ([`PeerNetwork`], openraft's
//! `RaftNetworkFactory`, plus [`PeerNetwork::forward`] and the ordered
//! [`PeerNetwork::forward_batch`] for a follower's client writes)
//! and the acceptor ([`serve_peer`]). It never touches the state machine or sessions;
//! it only moves openraft's messages (and forwarded commands) between nodes and hands
//! them to [`Raft`](crate::raft::Raft).
//!
//! # Connections and streams
//!
//! Peers share the node's single UDP port with clients; ALPN `herald-peer/1` tells them
//! apart. The dialer verifies the acceptor's certificate against the cluster CA (TLS);
//! the acceptor authenticates the dialer by the hello on the connection's first stream:
//! an HMAC-SHA256 of the dialer's node id under the cluster secret, bound to the TLS
//! session (see [`frame::hello_proof`]). Until the hello verifies, no other stream is
//! served. Each RPC is then its own bidirectional stream, so a heartbeat never waits
//! behind a snapshot chunk on the same connection. Connections are dialed lazily on
//! the first RPC to a peer and cached, one per peer.
//!
//! # Limits
//!
//! | Limit | Value | At the bound |
//! |---|---|---|
//! | Request frame body | [`PEER_FRAME_BYTES_MAX`] (64 MiB) | Acceptor: the stream is reset before any body byte is read. Dialer: an AppendEntries that would exceed it is not sent; openraft gets `PayloadTooLarge` and sends half the entries. |
//! | Hello frame body | [`HELLO_FRAME_BYTES_MAX`] (1 KiB) | The connection is refused and closed (an unauthenticated peer can make us buffer no more). |
//! | Reply frame body | [`PEER_REPLY_BYTES_MAX`] (1 MiB); [`PEER_BATCH_REPLY_BYTES_MAX`] (32 MiB) for a batch's results | The RPC fails (`Network` error to openraft). |
//! | Commands in a forwarded batch | [`FORWARD_BATCH_COMMANDS_MAX`] (4096), and the request frame body | Dialer: not sent, `PeerError::BatchTooLarge` (split it). Acceptor: answered with an error, nothing proposed. |
//! | RPC streams per peer connection | `PeerServerContext::streams_max` | QUIC flow control: the peer cannot open more until one finishes. This also bounds in-flight request tasks per connection (one task per stream), and acceptor memory to `streams_max` × 64 MiB per authenticated peer. |
//! | Cached peer connections | [`PEER_CONNECTIONS_MAX`] (256) | Dead entries are dropped, then the least recently used; its connection closes when its in-flight RPCs finish. |
//! | Dial (handshake + hello) | `PeerNetworkConfig::connect_timeout` | `Unreachable`; the next RPC dials again. |
//! | Waiting for a connection within one RPC | 3/4 of the RPC's budget | `Unreachable` ("still connecting"): openraft backs off while the dial continues in the background. |
//! | Raft RPC | openraft's `RPCOption::hard_ttl` | `RPCError::Timeout`; the stream is dropped. |
//! | Entries in an AppendEntries after the previous one timed out | half of it, at least one (`append_size.rs`) | openraft gets `PayloadTooLarge` with that hint and sends fewer for its next 10 RPCs (a request that cannot arrive within `heartbeat_interval` would otherwise be resent forever). |
//! | Forwarded write, or a whole forwarded batch | `PeerNetworkConfig::rpc_timeout` | `PeerError::Timeout` (some of a batch may have committed; resending is safe, commands are idempotent). |
//! | Backoff after `Unreachable` | [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`] (100 ms → 1 s) | openraft sends nothing to that peer meanwhile. |
//! | Hello arrival (acceptor) | [`HELLO_TIMEOUT`] (10 s) | The connection is closed. |
//! | Reading one request (acceptor) | [`REQUEST_READ_TIMEOUT`] (60 s) | The stream is reset. |
//! | Error texts sent to a peer | [`frame::ERROR_TEXT_BYTES_MAX`] (4 KiB) | Cut. |
//!
//! Failure mapping for openraft: anything that means "cannot talk to that node now"
//! (resolve, dial, handshake, refused hello, lost connection) is
//! `RPCError::Unreachable`, so openraft backs off instead of flooding; a timeout is
//! `RPCError::Timeout`; a broken exchange or a remote non-fatal error is
//! `RPCError::Network`; a remote fatal error or a snapshot mismatch is
//! `RPCError::RemoteError` with openraft's own error inside.

mod append_size;
pub mod client;
pub mod frame;
pub mod server;
pub mod watch;

#[cfg(test)]
mod test_cluster;
#[cfg(test)]
mod tests;

pub use client::{
    ForwardBatchReply, ForwardReply, GroupNetwork, PeerClient, PeerError, PeerNetwork,
    PeerNetworkConfig, WatchOpen, BACKOFF_MAX, BACKOFF_MIN, PEER_CONNECTIONS_MAX,
};
pub use frame::{
    FrameError, GroupRequest, MoveRequest, PeerHello, PeerReply, PeerRequest, ReadRequest,
    WireHistory, FORWARD_BATCH_COMMANDS_MAX, HELLO_FRAME_BYTES_MAX, PEER_BATCH_REPLY_BYTES_MAX,
    PEER_FRAME_BYTES_MAX, PEER_REPLY_BYTES_MAX,
};
pub use server::{
    serve_peer, ClientWriteRaftError, GroupResolver, PeerHandler, PeerServerContext, HELLO_TIMEOUT,
    REQUEST_READ_TIMEOUT,
};
