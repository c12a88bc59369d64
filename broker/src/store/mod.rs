//! The conversation state machine: conversations, members, seq assignment,
//! idempotent publish, history retention and who may do what.
//!
//! Owns: [`ConversationStore`] and the [`Command`]s that change it. The engine calls
//! [`ConversationStore::authorize`] and [`ConversationStore::read`] directly and
//! [`ConversationStore::apply`] for changes; the replication issue will feed the very
//! same [`Command`]s from the Raft log, so every replica that applies the same log
//! holds the same state.
//!
//! Must not: read a clock, draw random numbers, do I/O, log-and-continue on a broken
//! invariant, or depend on iteration order of a hash map for any outcome. Time comes
//! in the commands ([`Command::Publish::timestamp_ms`], [`ConversationStore::trim_expired`]'s
//! `now_ms`). A command that returns an error has changed nothing.
//!
//! # Rules (BRIEF §3)
//!
//! * Conversation ids are chosen by the backend. Create is idempotent: the same kind
//!   and the same member set (compared with the *current* members, duplicates in the
//!   request ignored) → `Created { created: false }`; another kind or another member
//!   set → [`StoreError::Conflict`] (use add/remove members to change members).
//! * `direct`: exactly 2 distinct members, fixed (add/remove → [`StoreError::Invalid`]).
//!   `group`: at most `group_members_max` members. `channel`: its members are its
//!   owners (same bound); any user may subscribe to and read a channel (follow it),
//!   only owners and services publish.
//! * Services may do everything. Users never [`Action::Manage`] ([`StoreError::RoleNotAllowed`]);
//!   in direct and group conversations they publish, subscribe and read only as
//!   members ([`StoreError::NotMember`]). A publish is authorised again when it is
//!   applied, so a user removed while their publish was in flight is refused.
//! * `seq` is gapless from 1 per conversation.
//! * Message timestamps never decrease within a conversation: a message is stamped
//!   `max(command timestamp, previous stamp)`.
//!
//! # Bounds and what happens at each
//!
//! | bound | at the bound |
//! |---|---|
//! | `conversations_max` | creating one more is refused, `LimitReached` (re-creating an existing one still succeeds) |
//! | `group_members_max` | a create or add-members that would exceed it is refused, `LimitReached`, nothing added |
//! | `history_messages_max` | appending evicts the oldest message of that conversation |
//! | `history_retention_ms` | messages stamped before `now - retention` are evicted, on publish (now = its stamp) and in `trim_expired` |
//! | `dedup_window_ms` | a key older than the window is forgotten; a retry with it **appends a new message** with a new seq |
//! | `dedup_keys_max` | remembering one more key forgets the conversation's oldest key; a late retry with that key appends a new message |
//! | `frame_bytes_max` | a message whose `Deliver` frame would exceed it is refused, `PayloadTooLarge` |
//! | [`CALLER_KEY_BYTES_MAX`] | a longer caller key is refused, `Invalid` |
//! | seq space (`u64`) | once `next_seq` would pass `u64::MAX`, publish is refused, `LimitReached` |
//!
//! A read beyond retention starts at `first_seq`; the caller sees `first_seq > from`
//! and tells the session it was truncated (never silently skipped).

mod conversation;
mod dedup;
mod error;
mod history;
mod image;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use herald_client::wire::{ConvKind, IdempotencyKey, Message, Principal, DEFAULT_FRAME_BYTES_MAX};

use crate::routing::Delivery;
pub use dedup::CALLER_KEY_BYTES_MAX;
pub use error::StoreError;
pub use history::{HistoryRefs, Location, MessageRef};
pub use image::{ConversationImage, DedupRunImage, StoreImage};

use conversation::{member_set, Conversation, PublishOutcome};

/// Every bound of the store. Defaults follow the BRIEF (and `config::Limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Members of a group, and owners of a channel. Default 10,000.
    pub group_members_max: usize,
    /// Messages retained per conversation; the oldest is evicted on append. Default 100,000.
    pub history_messages_max: usize,
    /// Age after which a message is evicted, in ms. Default 7 days.
    pub history_retention_ms: u64,
    /// How long an idempotency key is remembered, in ms of command timestamps. Default 24 h.
    pub dedup_window_ms: u64,
    /// Idempotency keys remembered per conversation; the oldest is forgotten first. Default 100,000.
    pub dedup_keys_max: usize,
    /// Conversations in this store; more creates are refused. Default 10,000,000.
    pub conversations_max: usize,
    /// Largest frame body; a message whose `Deliver` frame is larger is refused.
    pub frame_bytes_max: u32,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            group_members_max: 10_000,
            history_messages_max: 100_000,
            history_retention_ms: 7 * 24 * 3600 * 1000,
            dedup_window_ms: 24 * 3600 * 1000,
            dedup_keys_max: 100_000,
            conversations_max: 10_000_000,
            frame_bytes_max: DEFAULT_FRAME_BYTES_MAX,
        }
    }
}

/// A change to the store. Deterministic: the same commands in the same order give
/// the same state on every replica. This is the payload of a Raft log entry, so it is
/// rkyv-encoded on disk and between nodes.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Create a conversation (idempotent when kind and members match).
    CreateConversation {
        /// Chosen by the backend.
        conv: u64,
        /// Its kind.
        kind: ConvKind,
        /// Initial members (owners, for a channel); duplicates are ignored.
        members: Vec<u64>,
    },
    /// Add members (owners, for a channel); present ones are ignored.
    AddMembers {
        /// The conversation.
        conv: u64,
        /// Users to add.
        members: Vec<u64>,
    },
    /// Remove members; absent ones are ignored.
    RemoveMembers {
        /// The conversation.
        conv: u64,
        /// Users to remove.
        members: Vec<u64>,
    },
    /// Append a message, unless `key` was seen within the dedup window.
    Publish {
        /// The conversation.
        conv: u64,
        /// Who publishes (authorised again on apply).
        sender: Principal,
        /// Makes retries safe.
        key: IdempotencyKey,
        /// Opaque bytes.
        payload: Vec<u8>,
        /// The proposing leader's clock, ms since the Unix epoch.
        timestamp_ms: u64,
    },
    /// Evict history and dedup keys older than their windows, as of `now_ms` (the
    /// proposing leader's clock), so that every replica evicts the same messages.
    Trim {
        /// The proposing leader's clock, ms since the Unix epoch.
        now_ms: u64,
    },
    /// A change to the cluster map: only the metadata group applies it; a data group
    /// refuses it.
    Meta(crate::cluster_map::MetaCommand),
}

/// What an applied [`Command`] did.
#[derive(Debug, Clone)]
pub enum Applied {
    /// `CreateConversation`: `created` is false when it already existed identically.
    Created {
        /// True when this command made it.
        created: bool,
    },
    /// `AddMembers` / `RemoveMembers` succeeded.
    MembersChanged,
    /// `Trim` evicted what had expired.
    Trimmed,
    /// `Publish`: the message's seq.
    Published {
        /// The seq (the original one for a duplicate).
        seq: u64,
        /// True when the key was seen within the window and nothing was appended.
        duplicate: bool,
        /// The new message and its encoded frame, to fan out; `None` for a duplicate
        /// or when not asked for (`deliver` false).
        stored: Option<Arc<StoredMessage>>,
    },
}

/// A stored message with its `Deliver` frame, encoded once and shared by every
/// session it goes to.
#[derive(Clone)]
pub struct StoredMessage {
    /// The message.
    pub message: Message,
    /// `Frame::Deliver(message)`, header and body.
    pub delivery: Arc<Delivery>,
}

impl fmt::Debug for StoredMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredMessage")
            .field("message", &self.message)
            .field("frame_bytes", &self.delivery.frame.len())
            .finish()
    }
}

impl StoredMessage {
    /// Rebuilds message `seq`, stamped `timestamp_ms`, from the `Publish` command that
    /// appended it (history read back from the Raft log). `None` if `command` is not a
    /// publish, i.e. a reference points at the wrong entry.
    pub fn from_publish(
        command: Command,
        seq: u64,
        timestamp_ms: u64,
        frame_bytes_max: u32,
    ) -> Option<Self> {
        let Command::Publish {
            conv,
            sender,
            payload,
            ..
        } = command
        else {
            return None;
        };
        let message = Message {
            conv,
            seq,
            sender,
            timestamp_ms,
            payload,
        };
        // It was encodable when it was appended under the same bound.
        StoredMessage::new(message, frame_bytes_max).ok()
    }
}

/// What a principal wants to do in a conversation.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum Action {
    /// Create the conversation or change its members.
    Manage,
    /// Append a message.
    Publish,
    /// Receive its messages live.
    Subscribe,
    /// Read its stored messages.
    ReadHistory,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Manage => "manage members",
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
            Action::ReadHistory => "read history",
        })
    }
}

/// A page of a conversation's history.
#[derive(Debug, Clone)]
pub struct History {
    /// Messages in seq order, gapless.
    pub messages: Vec<Arc<StoredMessage>>,
    /// The oldest retained seq (== `next_seq` when none is retained). If it is above
    /// the `from` asked for, the messages in between are gone for good.
    pub first_seq: u64,
    /// The seq the next message will get.
    pub next_seq: u64,
}

impl History {
    /// The messages from the first, as many as fit in `bytes_max` of encoded frames
    /// (a reply must fit one frame; the reader asks again from the last seq it got).
    pub fn messages_within(&self, bytes_max: usize) -> Vec<herald_client::wire::Message> {
        let mut used = 0;
        self.messages
            .iter()
            .take_while(|m| {
                used += m.delivery.frame.len();
                used <= bytes_max
            })
            .map(|m| m.message.clone())
            .collect()
    }
}

/// All conversations of one store (later: one Raft group's state machine).
#[derive(Debug, Clone)]
pub struct ConversationStore {
    limits: StoreLimits,
    conversations: HashMap<u64, Conversation>,
    /// Sum of retained messages over all conversations.
    message_count: usize,
}

impl ConversationStore {
    /// An empty store with these bounds.
    pub fn new(limits: StoreLimits) -> Self {
        ConversationStore {
            limits,
            conversations: HashMap::new(),
            message_count: 0,
        }
    }

    /// The bounds this store enforces.
    pub fn limits(&self) -> &StoreLimits {
        &self.limits
    }

    /// Applies one command, carried at `slot` of the batch in the Raft log entry at
    /// `log_index` (where a published message's bytes stay: history refers to it). On
    /// error nothing changed. With `deliver`, a new message comes back with its
    /// encoded `Deliver` frame, to fan out; without, nothing of it is copied (a replica
    /// that does not fan out).
    pub fn apply(
        &mut self,
        command: &Command,
        log_index: u64,
        slot: u32,
        deliver: bool,
    ) -> Result<Applied, StoreError> {
        match command {
            Command::CreateConversation {
                conv,
                kind,
                members,
            } => self.create(*conv, *kind, members),
            Command::AddMembers { conv, members } => {
                let limits = self.limits;
                self.conversation_mut(*conv)?
                    .add_members(members, &limits)?;
                Ok(Applied::MembersChanged)
            }
            Command::RemoveMembers { conv, members } => {
                self.conversation_mut(*conv)?.remove_members(members)?;
                Ok(Applied::MembersChanged)
            }
            Command::Trim { now_ms } => {
                self.trim_expired(*now_ms);
                Ok(Applied::Trimmed)
            }
            Command::Meta(_) => Err(StoreError::invalid(
                "a cluster-map change reached a data group; this is a bug",
            )),
            Command::Publish {
                conv,
                sender,
                key,
                payload,
                timestamp_ms,
            } => {
                let limits = self.limits;
                let outcome = self.conversation_mut(*conv)?.publish(
                    sender,
                    key,
                    payload,
                    *timestamp_ms,
                    Location::Log {
                        index: log_index,
                        slot,
                    },
                    &limits,
                    deliver,
                )?;
                Ok(match outcome {
                    PublishOutcome::Duplicate { seq } => Applied::Published {
                        seq,
                        duplicate: true,
                        stored: None,
                    },
                    PublishOutcome::Appended {
                        seq,
                        stored,
                        evicted,
                    } => {
                        // The new message is retained unless `history_messages_max` is 0.
                        let added = usize::from(limits.history_messages_max > 0);
                        self.message_count = (self.message_count + added).saturating_sub(evicted);
                        Applied::Published {
                            seq,
                            duplicate: false,
                            stored,
                        }
                    }
                })
            }
        }
    }

    fn create(
        &mut self,
        conv: u64,
        kind: ConvKind,
        members: &[u64],
    ) -> Result<Applied, StoreError> {
        let members = member_set(kind, members, &self.limits)?;
        if let Some(existing) = self.conversations.get(&conv) {
            return match existing.conflict_with(kind, &members) {
                Some(reason) => Err(StoreError::Conflict { conv, reason }),
                None => Ok(Applied::Created { created: false }),
            };
        }
        if self.conversations.len() >= self.limits.conversations_max {
            return Err(StoreError::LimitReached {
                what: "conversations",
                limit: self.limits.conversations_max,
            });
        }
        self.conversations
            .insert(conv, Conversation::new(conv, kind, members));
        Ok(Applied::Created { created: true })
    }

    fn conversation(&self, conv: u64) -> Result<&Conversation, StoreError> {
        self.conversations
            .get(&conv)
            .ok_or(StoreError::NoSuchConversation { conv })
    }

    fn conversation_mut(&mut self, conv: u64) -> Result<&mut Conversation, StoreError> {
        self.conversations
            .get_mut(&conv)
            .ok_or(StoreError::NoSuchConversation { conv })
    }

    /// May `principal` do `action` in `conv`?
    ///
    /// [`Action::Manage`] is decided by role alone (the conversation may not exist yet):
    /// services yes, users [`StoreError::RoleNotAllowed`]. Every other action first
    /// needs the conversation ([`StoreError::NoSuchConversation`]); then services may,
    /// users per the kind's rules (see the module docs).
    pub fn authorize(
        &self,
        principal: &Principal,
        action: Action,
        conv: u64,
    ) -> Result<(), StoreError> {
        if action == Action::Manage {
            return Self::authorize_role(principal, conv);
        }
        self.conversation(conv)?.authorize(principal, action)
    }

    /// The role check of [`Action::Manage`]: only services create conversations and
    /// change members. Needs no state, so any node can answer it for any conversation.
    pub fn authorize_role(principal: &Principal, conv: u64) -> Result<(), StoreError> {
        match principal {
            Principal::Service(_) => Ok(()),
            Principal::User(_) => Err(StoreError::RoleNotAllowed {
                principal: principal.clone(),
                action: Action::Manage,
                conv,
                reason: "only services create conversations and change members",
            }),
        }
    }

    /// Messages with seq >= `from`, at most `limit`, in order; O(limit).
    /// `first_seq` is the oldest retained (== `next_seq` if none): when it is above
    /// `from`, the range was partly evicted and the caller reports the truncation.
    pub fn read(&self, conv: u64, from: u64, limit: usize) -> Result<HistoryRefs, StoreError> {
        Ok(self.conversation(conv)?.history().read(from, limit))
    }

    /// The seq the next message of `conv` will get.
    pub fn next_seq(&self, conv: u64) -> Result<u64, StoreError> {
        Ok(self.conversation(conv)?.history().next_seq())
    }

    /// The kind of `conv`.
    pub fn kind(&self, conv: u64) -> Result<ConvKind, StoreError> {
        Ok(self.conversation(conv)?.kind())
    }

    /// Whether `user` is a member (an owner, for a channel) of `conv`.
    pub fn is_member(&self, conv: u64, user: u64) -> Result<bool, StoreError> {
        Ok(self.conversation(conv)?.is_member(user))
    }

    /// Drops messages stamped before `now_ms - history_retention_ms` and dedup keys
    /// older than `dedup_window_ms`, in every conversation. O(conversations + evicted).
    pub fn trim_expired(&mut self, now_ms: u64) {
        let limits = self.limits;
        let evicted: usize = self
            .conversations
            .values_mut()
            .map(|c| c.trim_expired(now_ms, &limits))
            .sum();
        self.message_count = self.message_count.saturating_sub(evicted);
    }

    /// Checks every invariant: per conversation, seqs gapless and increasing from
    /// `first_seq` with `next_seq == last + 1`, stamps non-decreasing, frames labelled
    /// right, dedup keys pointing below `next_seq`, member counts (direct exactly 2)
    /// and every bound; and the store's totals. O(everything): for tests and debugging.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_shape()
    }

    fn validate_shape(&self) -> Result<(), String> {
        if self.conversations.len() > self.limits.conversations_max {
            return Err(format!(
                "{} conversations, above the bound {}",
                self.conversations.len(),
                self.limits.conversations_max
            ));
        }
        let mut messages = 0;
        for (id, conv) in &self.conversations {
            conv.validate(*id, &self.limits)?;
            messages += conv.history().len();
        }
        if messages != self.message_count {
            return Err(format!(
                "message_count says {} but conversations hold {messages}",
                self.message_count
            ));
        }
        Ok(())
    }

    /// The whole store as a snapshot carries it, conversations ordered by id.
    pub fn image(&self) -> StoreImage {
        let mut conversations: Vec<ConversationImage> =
            self.conversations.values().map(|c| c.image()).collect();
        conversations.sort_unstable_by_key(|c| c.id);
        StoreImage { conversations }
    }

    /// The store a snapshot carried, with this node's `limits`; every invariant is
    /// checked (a snapshot is data from disk or a peer).
    pub fn from_image(limits: StoreLimits, image: StoreImage) -> Result<Self, String> {
        let mut store = ConversationStore::new(limits);
        for c in image.conversations {
            store.message_count += c.history.len();
            let id = c.id;
            if store
                .conversations
                .insert(id, Conversation::from_image(c, limits.dedup_keys_max)?)
                .is_some()
            {
                return Err(format!("conversation {id} appears twice in the snapshot"));
            }
        }
        store.validate_shape()?;
        Ok(store)
    }

    /// Visits every retained reference of every conversation, conversations in id
    /// order and each oldest first (the order of [`ConversationStore::image`]), so a
    /// snapshot can take the messages over.
    pub fn relocate(&mut self, mut f: impl FnMut(u64, &mut MessageRef)) {
        let mut ids: Vec<u64> = self.conversations.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            if let Some(conv) = self.conversations.get_mut(&id) {
                for r in conv.history_mut().refs_mut() {
                    f(id, r);
                }
            }
        }
    }

    /// The lowest Raft log index any retained message still lives in: the log may be
    /// purged below it without losing history. `None` when no message is in the log.
    /// O(conversations).
    pub fn min_log_index(&self) -> Option<u64> {
        self.conversations
            .values()
            .filter_map(|c| {
                c.history().refs().find_map(|r| match r.location {
                    Location::Log { index, .. } => Some(index),
                    Location::Snapshot(_) => None,
                })
            })
            .min()
    }

    /// Conversations in the store.
    pub fn conversation_count(&self) -> usize {
        self.conversations.len()
    }

    /// Messages retained, over all conversations.
    pub fn message_count(&self) -> usize {
        self.message_count
    }
}

#[cfg(test)]
mod tests;
