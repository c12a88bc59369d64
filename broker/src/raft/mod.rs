//! Replication: the conversation store as an openraft state machine, our own durable
//! log store, and the peer transport over QUIC.
//!
//! Owns: the openraft [`TypeConfig`], the mapping between openraft's types and their
//! rkyv wire/disk form ([`codec`]), the segmented log store ([`log_store`]), the state
//! machine ([`state_machine`]) and the node-to-node network ([`network`]).
//! Must not: know about client sessions beyond handing each applied message to the
//! [`Router`](crate::routing::Router); decide authorization (the store does, on apply).
//!
//! One node runs one Raft group today (the sharding issue runs many); `herald dev` is a
//! one-node group on the same code path.

pub mod codec;
pub mod log_store;
pub mod network;
pub mod reelect;
pub mod state_machine;

use std::io::Cursor;

use herald_client::wire::Refusal;
use rkyv::{Archive, Deserialize, Serialize};

use crate::store::Command;

/// A node's id in the cluster (1-based in configs; openraft's `NodeId`).
pub type NodeId = u64;

/// A Raft group's id. Every group is its own openraft instance; the groups of a node
/// share its QUIC endpoint and its log store.
pub type GroupId = u32;

/// The metadata group (the cluster map) is group 0; data groups are numbered from 1.
pub const META_GROUP: GroupId = 0;
/// The first data group.
pub const FIRST_DATA_GROUP: GroupId = 1;

/// What a committed command did, returned to the proposer (and across a forward).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `CreateConversation`: false when it already existed identically.
    Created {
        /// True when this command made it.
        created: bool,
    },
    /// `AddMembers` / `RemoveMembers` / `Trim` succeeded.
    Changed,
    /// `Publish`: the message's seq.
    Published {
        /// The seq (the original one for a duplicate).
        seq: u64,
        /// True when the key was seen within the dedup window and nothing was appended.
        duplicate: bool,
    },
}

/// The state machine's answer to one command: refused commands changed nothing.
pub type Response = Result<Outcome, Refusal>;

/// What one log entry carries: commands applied in order, one after another. The
/// write pipeline packs every write waiting at a moment into one entry, so one log
/// append (and one fsync, on each replica) covers them all: openraft 0.9 waits for
/// each append to be durable before it takes the next, so batching happens here.
///
/// Shared (`Arc`), because openraft clones an entry every time it reads one: for each
/// follower's AppendEntries, for the state machine, and the log store's cache keeps
/// one. A deep copy of a batch (up to `BATCH_LEN_MAX` (4096, `engine/pipeline.rs`)
/// commands, each with its payload) per read cost ~6% of every node's CPU in a
/// publish run; a shared one costs a reference count. The rkyv form is the same as
/// a `Vec<Command>`'s plus rkyv's shared-pointer header (see `codec`).
pub type Batch = std::sync::Arc<Vec<Command>>;

openraft::declare_raft_types!(
    /// Herald's openraft type configuration.
    pub TypeConfig:
        D = Batch,
        R = Vec<Response>,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A running Raft node of Herald.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// A vote.
pub type Vote = openraft::Vote<NodeId>;
/// Openraft's storage error for this config.
pub type StorageError = openraft::StorageError<NodeId>;
