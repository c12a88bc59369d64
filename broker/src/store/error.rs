//! Why a store command or check was refused, and the refusal the client sees.

use herald_client::wire::{Principal, Refusal, RefusalCode};

use super::Action;

/// Why the store refused a command or an action. A refused command changed nothing.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// No conversation has this id.
    #[error("conversation {conv} does not exist; a service must create it first (herald conv create --id {conv} …)")]
    NoSuchConversation {
        /// The id asked for.
        conv: u64,
    },
    /// The conversation exists with another kind or other members than the create asked for.
    #[error("conversation {conv} already exists with other settings: {reason}; pick another id, or change members with add-members/remove-members")]
    Conflict {
        /// The conversation.
        conv: u64,
        /// What differs.
        reason: String,
    },
    /// The user is not a member of the direct or group conversation.
    #[error("user {user} is not a member of conversation {conv}; a service must add them first")]
    NotMember {
        /// The user.
        user: u64,
        /// The conversation.
        conv: u64,
    },
    /// The principal's role does not allow the action here.
    #[error("{principal} may not {action} in conversation {conv}: {reason}")]
    RoleNotAllowed {
        /// Who asked.
        principal: Principal,
        /// What they asked to do.
        action: Action,
        /// Where.
        conv: u64,
        /// Who may do it instead.
        reason: &'static str,
    },
    /// A configured bound was reached; nothing was changed.
    #[error(
        "limit reached: at most {limit} {what}; remove some first or raise the limit in the config"
    )]
    LimitReached {
        /// Which bound, as a plural noun phrase (e.g. "members per group").
        what: &'static str,
        /// Its configured value.
        limit: usize,
    },
    /// The request is well-formed but makes no sense (e.g. a direct conversation with 3 members).
    #[error("invalid request: {reason}")]
    Invalid {
        /// What is wrong and what would be right.
        reason: String,
    },
    /// The message, encoded as a delivery frame, is larger than the frame maximum.
    #[error("conversation {conv}: a message with {payload_bytes} payload bytes does not fit in a frame of at most {frame_bytes_max} bytes; send a smaller payload")]
    PayloadTooLarge {
        /// The conversation.
        conv: u64,
        /// The payload's size.
        payload_bytes: usize,
        /// The configured frame maximum.
        frame_bytes_max: u32,
    },
}

impl StoreError {
    /// The refusal sent to the client; the detail is this error's message.
    pub fn refusal(&self) -> Refusal {
        let code = match self {
            StoreError::NoSuchConversation { .. } => RefusalCode::NoSuchConversation,
            StoreError::Conflict { .. } => RefusalCode::ConversationConflict,
            StoreError::NotMember { .. } => RefusalCode::NotMember,
            StoreError::RoleNotAllowed { .. } => RefusalCode::RoleNotAllowed,
            StoreError::LimitReached { .. } => RefusalCode::LimitReached,
            StoreError::Invalid { .. } => RefusalCode::InvalidRequest,
            StoreError::PayloadTooLarge { .. } => RefusalCode::PayloadTooLarge,
        };
        Refusal::new(code, self.to_string())
    }

    pub(super) fn invalid(reason: impl Into<String>) -> Self {
        StoreError::Invalid {
            reason: reason.into(),
        }
    }
}
