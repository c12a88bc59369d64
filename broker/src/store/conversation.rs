//! One conversation: its kind, members, history window and dedup table, and the
//! rules that apply to it alone.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use herald_client::wire::{encode_frame, ConvKind, Frame, IdempotencyKey, Message, Principal};

use super::dedup::{self, DedupTable};
use super::history::{HistoryLog, Location, MessageRef};
use super::image::ConversationImage;
use super::{Action, Delivery, StoreError, StoreLimits, StoredMessage};

/// What a publish did to one conversation.
pub(super) enum PublishOutcome {
    /// The key was seen within the window: the original seq, nothing appended.
    Duplicate { seq: u64 },
    /// Appended as `seq`; `evicted` older messages left the history (count and age
    /// bounds). `stored` only when the caller asked for the delivery.
    Appended {
        seq: u64,
        stored: Option<Arc<StoredMessage>>,
        evicted: usize,
    },
}

/// One conversation's state.
#[derive(Debug, Clone)]
pub(super) struct Conversation {
    id: u64,
    kind: ConvKind,
    /// Members (owners, for a channel). Ordered, so snapshots are byte-identical.
    members: BTreeSet<u64>,
    history: HistoryLog,
    dedup: DedupTable,
    /// Latest message timestamp; later messages are stamped no earlier (see `publish`).
    last_timestamp_ms: u64,
}

/// The distinct members of a create, checked against the kind's rules.
pub(super) fn member_set(
    kind: ConvKind,
    members: &[u64],
    limits: &StoreLimits,
) -> Result<BTreeSet<u64>, StoreError> {
    let set: BTreeSet<u64> = members.iter().copied().collect();
    match kind {
        ConvKind::Direct if set.len() != 2 => Err(StoreError::invalid(format!(
            "a direct conversation has exactly 2 distinct members, got {}; use a group for more",
            set.len()
        ))),
        ConvKind::Group | ConvKind::Channel if set.len() > limits.group_members_max => {
            Err(StoreError::LimitReached {
                what: "members per group or owners per channel",
                limit: limits.group_members_max,
            })
        }
        _ => Ok(set),
    }
}

impl Conversation {
    /// A new, empty conversation; `members` already passed [`member_set`].
    pub(super) fn new(id: u64, kind: ConvKind, members: BTreeSet<u64>) -> Self {
        Conversation {
            id,
            kind,
            members,
            history: HistoryLog::new(),
            dedup: DedupTable::default(),
            last_timestamp_ms: 0,
        }
    }

    pub(super) fn kind(&self) -> ConvKind {
        self.kind
    }

    pub(super) fn history(&self) -> &HistoryLog {
        &self.history
    }

    pub(super) fn is_member(&self, user: u64) -> bool {
        self.members.contains(&user)
    }

    /// Why a re-create with `kind` and `members` is not the same conversation, if it is not.
    pub(super) fn conflict_with(&self, kind: ConvKind, members: &BTreeSet<u64>) -> Option<String> {
        if kind != self.kind {
            return Some(format!("it is a {}, not a {kind}", self.kind));
        }
        if members != &self.members {
            return Some(format!(
                "its {} current members differ from the {} requested",
                self.members.len(),
                members.len()
            ));
        }
        None
    }

    /// May `principal` do `action` here? (Manage is decided by role alone, upstream.)
    pub(super) fn authorize(
        &self,
        principal: &Principal,
        action: Action,
    ) -> Result<(), StoreError> {
        let user = match principal {
            Principal::Service(_) => return Ok(()),
            Principal::User(user) => *user,
        };
        match (self.kind, action) {
            (_, Action::Manage) => Err(StoreError::RoleNotAllowed {
                principal: principal.clone(),
                action,
                conv: self.id,
                reason: "only services create conversations and change members",
            }),
            (ConvKind::Channel, Action::Subscribe | Action::ReadHistory) => Ok(()),
            (ConvKind::Channel, Action::Publish) if self.is_member(user) => Ok(()),
            (ConvKind::Channel, Action::Publish) => Err(StoreError::RoleNotAllowed {
                principal: principal.clone(),
                action,
                conv: self.id,
                reason:
                    "only the channel's owners and services publish in a channel; followers read",
            }),
            (ConvKind::Direct | ConvKind::Group, _) if self.is_member(user) => Ok(()),
            (ConvKind::Direct | ConvKind::Group, _) => Err(StoreError::NotMember {
                user,
                conv: self.id,
            }),
        }
    }

    /// Adds members; present ones are ignored. All or nothing.
    pub(super) fn add_members(
        &mut self,
        members: &[u64],
        limits: &StoreLimits,
    ) -> Result<(), StoreError> {
        if self.kind == ConvKind::Direct {
            return Err(StoreError::invalid(format!(
                "conversation {} is direct and always has its 2 members; create a group for more people",
                self.id
            )));
        }
        let new: BTreeSet<u64> = members
            .iter()
            .copied()
            .filter(|m| !self.members.contains(m))
            .collect();
        if self.members.len() + new.len() > limits.group_members_max {
            return Err(StoreError::LimitReached {
                what: "members per group or owners per channel",
                limit: limits.group_members_max,
            });
        }
        self.members.extend(new);
        Ok(())
    }

    /// Removes members; absent ones are ignored.
    pub(super) fn remove_members(&mut self, members: &[u64]) -> Result<(), StoreError> {
        if self.kind == ConvKind::Direct {
            return Err(StoreError::invalid(format!(
                "conversation {} is direct and always has its 2 members; members cannot be removed",
                self.id
            )));
        }
        for m in members {
            self.members.remove(m);
        }
        Ok(())
    }

    /// Appends a message, or recognises a retry. All checks come before any change, so
    /// an error leaves the conversation untouched.
    ///
    /// Timestamps: the message is stamped `max(timestamp_ms, last message's stamp)`,
    /// so stamps never decrease along a conversation even if a new leader's clock is
    /// behind; that stamp is "now" for the dedup window and the age bound.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn publish(
        &mut self,
        sender: &Principal,
        key: &IdempotencyKey,
        payload: &[u8],
        timestamp_ms: u64,
        location: Location,
        limits: &StoreLimits,
        deliver: bool,
    ) -> Result<PublishOutcome, StoreError> {
        self.authorize(sender, Action::Publish)?;
        dedup::check_key(key).map_err(StoreError::invalid)?;
        let now_ms = timestamp_ms.max(self.last_timestamp_ms);
        if let Some(seq) = self.dedup.lookup(key, now_ms, limits.dedup_window_ms) {
            return Ok(PublishOutcome::Duplicate { seq });
        }
        let seq = self.history.next_seq();
        if seq == u64::MAX {
            return Err(StoreError::LimitReached {
                what: "messages per conversation (the seq space is used up)",
                limit: usize::MAX,
            });
        }
        // Every replica decides alike whether the frame fits; only the one that fans
        // out (the leader) builds it, or a replica whose bound check is inconclusive.
        let fits_surely =
            deliver_frame_bytes_max(sender, payload.len()) <= u64::from(limits.frame_bytes_max);
        let stored = if deliver || !fits_surely {
            let message = Message {
                conv: self.id,
                seq,
                sender: sender.clone(),
                timestamp_ms: now_ms,
                payload: payload.to_vec(),
            };
            let stored = StoredMessage::new(message, limits.frame_bytes_max).map_err(|_| {
                StoreError::PayloadTooLarge {
                    conv: self.id,
                    payload_bytes: payload.len(),
                    frame_bytes_max: limits.frame_bytes_max,
                }
            })?;
            deliver.then(|| Arc::new(stored))
        } else {
            None
        };

        // From here on nothing can fail.
        self.last_timestamp_ms = now_ms;
        self.dedup.expire(now_ms, limits.dedup_window_ms);
        let mut evicted = self
            .history
            .evict_before(now_ms.saturating_sub(limits.history_retention_ms));
        evicted += self.history.push(
            MessageRef {
                timestamp_ms: now_ms,
                location,
            },
            limits.history_messages_max,
        );
        self.dedup
            .insert(key.clone(), seq, now_ms, limits.dedup_keys_max);
        Ok(PublishOutcome::Appended {
            seq,
            stored,
            evicted,
        })
    }

    /// Drops messages and dedup keys older than their bounds at `now_ms`. Returns how
    /// many messages left the history.
    pub(super) fn trim_expired(&mut self, now_ms: u64, limits: &StoreLimits) -> usize {
        self.dedup.expire(now_ms, limits.dedup_window_ms);
        self.history
            .evict_before(now_ms.saturating_sub(limits.history_retention_ms))
    }

    /// The conversation as a snapshot stores it.
    pub(super) fn image(&self) -> ConversationImage {
        ConversationImage {
            id: self.id,
            kind: self.kind,
            members: self.members.iter().copied().collect(),
            next_seq: self.history.next_seq(),
            history: self.history.refs().copied().collect(),
            dedup: self.dedup.image(),
            last_timestamp_ms: self.last_timestamp_ms,
        }
    }

    /// The conversation a snapshot stored, its dedup table bounded by `dedup_keys_max`
    /// (the caller validates the rest).
    pub(super) fn from_image(
        image: ConversationImage,
        dedup_keys_max: usize,
    ) -> Result<Self, String> {
        let dedup = DedupTable::from_image(image.dedup, dedup_keys_max)
            .map_err(|e| format!("conv {}: {e}", image.id))?;
        Ok(Conversation {
            id: image.id,
            kind: image.kind,
            members: image.members.into_iter().collect(),
            history: HistoryLog::from_parts(image.history, image.next_seq),
            dedup,
            last_timestamp_ms: image.last_timestamp_ms,
        })
    }

    /// The retained references, for relocation after a snapshot.
    pub(super) fn history_mut(&mut self) -> &mut HistoryLog {
        &mut self.history
    }

    /// Checks this conversation's invariants.
    pub(super) fn validate(&self, id: u64, limits: &StoreLimits) -> Result<(), String> {
        if id != self.id {
            return Err(format!("conversation {} is filed under id {id}", self.id));
        }
        match self.kind {
            ConvKind::Direct if self.members.len() != 2 => {
                return Err(format!(
                    "direct conv {id} has {} members, not 2",
                    self.members.len()
                ))
            }
            ConvKind::Group | ConvKind::Channel
                if self.members.len() > limits.group_members_max =>
            {
                return Err(format!(
                    "conv {id} has {} members, above the bound {}",
                    self.members.len(),
                    limits.group_members_max
                ))
            }
            _ => {}
        }
        self.history.validate(id, limits.history_messages_max)?;
        self.dedup
            .validate(id, self.history.next_seq(), limits.dedup_keys_max)?;
        if self.dedup.len() > 0 && self.history.next_seq() == 1 {
            return Err(format!(
                "conv {id} has dedup keys but no message was ever published"
            ));
        }
        Ok(())
    }
}

/// Bytes of frame headers and rkyv layout a `Deliver` frame adds to its sender's name
/// and payload, at most (fixed fields, lengths, relative pointers, alignment padding;
/// ~70 in practice: `tests::deliver_frame_bound_holds`).
const DELIVER_FRAME_OVERHEAD_MAX: u64 = 256;

/// An upper bound of the encoded size of the `Deliver` frame of a message from
/// `sender` with `payload_bytes`: below the frame limit, the frame surely fits and need
/// not be built to know it.
pub(super) fn deliver_frame_bytes_max(sender: &Principal, payload_bytes: usize) -> u64 {
    let sender_bytes = match sender {
        Principal::User(_) => 0,
        Principal::Service(name) => name.len(),
    };
    DELIVER_FRAME_OVERHEAD_MAX + sender_bytes as u64 + payload_bytes as u64
}

impl StoredMessage {
    /// Pairs `message` with its `Deliver` frame, encoded once (header and body).
    ///
    /// Fails when the frame would exceed `frame_bytes_max`: no session could receive it.
    pub fn new(
        message: Message,
        frame_bytes_max: u32,
    ) -> Result<Self, herald_client::wire::WireError> {
        let frame = Frame::Deliver(message);
        let bytes = encode_frame(&frame, frame_bytes_max)?;
        let Frame::Deliver(message) = frame else {
            // The frame was built as a Deliver two lines up.
            return Err(herald_client::wire::WireError::Encode {
                reason: "a Deliver frame changed kind while encoding".into(),
            });
        };
        let delivery = Delivery {
            conv: message.conv,
            seq: message.seq,
            frame: Bytes::from(bytes),
            stored_ms: message.timestamp_ms,
        };
        Ok(StoredMessage {
            message,
            delivery: Arc::new(delivery),
        })
    }
}
