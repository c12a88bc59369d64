//! The client's one error type.
//!
//! Owns: [`Error`], what each variant means to a caller, and which broker refusals
//! are worth a reconnect. Must not: hide the broker's reason — a refusal always
//! carries the broker's [`RefusalCode`] and its detail text.

use std::time::Duration;

use crate::io::{IoError, TlsError};
use crate::wire::{Refusal, RefusalCode, WireError};

/// Everything that can go wrong in the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker refused: its code and its explanation.
    #[error("refused by the broker: {0}")]
    Refused(Refusal),
    /// No connection could be made to `addr` (resolution, QUIC or TLS handshake,
    /// certificate verification, Hello/Welcome).
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The seed address tried.
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// The TLS configuration could not be built (bad CA file).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A frame could not be encoded or the broker sent an invalid one.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Moving frames over the QUIC stream failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// Something did not finish in time. For a publish this means *not
    /// acknowledged*: it may or may not be stored; publishing again with the same
    /// idempotency key tells which without appending twice.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What was being done.
        what: String,
        /// The bound that was hit.
        after: Duration,
    },
    /// The client was closed (by `close` or by dropping every handle).
    #[error("the client is closed")]
    Closed,
    /// The configuration is invalid; `reason` says which value and why.
    #[error("invalid client configuration: {reason}")]
    Config {
        /// Which value and why.
        reason: String,
    },
    /// A payload above the session's limit (announced by the broker in Welcome);
    /// checked before sending, nothing was sent.
    #[error("payload of {len} bytes is above the broker's maximum of {max} bytes")]
    PayloadTooLarge {
        /// The payload's length.
        len: usize,
        /// The broker's maximum.
        max: u32,
    },
    /// The broker sent something the protocol does not allow here.
    #[error("the broker broke the protocol: {reason}")]
    Protocol {
        /// What was wrong.
        reason: String,
    },
    /// The connection dropped and every reconnect attempt failed.
    #[error("gave up reconnecting after {attempts} attempt(s); last error: {last}")]
    ReconnectExhausted {
        /// Passes over the seed list made.
        attempts: u32,
        /// The last attempt's error.
        last: String,
    },
    /// The connection ended for good (the reason names the first error); the client
    /// no longer serves requests.
    #[error("the connection to the broker ended: {reason}")]
    Disconnected {
        /// Why.
        reason: String,
    },
}

impl Error {
    /// The broker's refusal code, when this is a refusal (including the client-side
    /// payload check, which mirrors the broker's `PayloadTooLarge`).
    pub fn refusal_code(&self) -> Option<RefusalCode> {
        match self {
            Error::Refused(r) => Some(r.code),
            Error::PayloadTooLarge { .. } => Some(RefusalCode::PayloadTooLarge),
            _ => None,
        }
    }

    /// True when this error ended a connection attempt for a reason that trying
    /// again (later, or on another node) cannot fix: the broker refused our
    /// credentials or our protocol, or the configuration is wrong.
    pub(crate) fn is_fatal_for_connect(&self) -> bool {
        match self {
            Error::Refused(r) => !refusal_is_transient(r.code),
            Error::Config { .. } | Error::Tls(_) | Error::Closed => true,
            _ => false,
        }
    }
}

/// Refusals of the handshake that another attempt may not get: the node is busy,
/// shutting down, full, or failed internally. Everything else (expired or bad token,
/// wrong protocol, …) is the caller's to fix.
pub(crate) fn refusal_is_transient(code: RefusalCode) -> bool {
    matches!(
        code,
        RefusalCode::Unavailable
            | RefusalCode::SlowConsumer
            | RefusalCode::LimitReached
            | RefusalCode::Internal
    )
}

/// A `Goodbye` on an established connection that means "come back": the session
/// was too slow, or the node is going away. Any other goodbye is surfaced.
pub(crate) fn goodbye_means_reconnect(code: RefusalCode) -> bool {
    matches!(code, RefusalCode::SlowConsumer | RefusalCode::Unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_display_names_code_and_detail() {
        let e = Error::Refused(Refusal::new(
            RefusalCode::NotMember,
            "user 9 is not in conversation 7",
        ));
        assert_eq!(
            e.to_string(),
            "refused by the broker: not a member: user 9 is not in conversation 7"
        );
        assert_eq!(e.refusal_code(), Some(RefusalCode::NotMember));
        assert_eq!(Error::Closed.refusal_code(), None);
        assert_eq!(
            Error::PayloadTooLarge { len: 10, max: 5 }.refusal_code(),
            Some(RefusalCode::PayloadTooLarge)
        );
    }

    #[test]
    fn auth_refusals_are_fatal_transient_ones_are_not() {
        for code in [
            RefusalCode::TokenExpired,
            RefusalCode::BadSignature,
            RefusalCode::WrongAlgorithm,
            RefusalCode::MalformedToken,
            RefusalCode::UnsupportedVersion,
            RefusalCode::RoleNotAllowed,
        ] {
            assert!(Error::Refused(Refusal::new(code, "")).is_fatal_for_connect());
        }
        for code in [RefusalCode::Unavailable, RefusalCode::LimitReached] {
            assert!(!Error::Refused(Refusal::new(code, "")).is_fatal_for_connect());
        }
        let connect = Error::Connect {
            addr: "a:1".into(),
            reason: "timed out".into(),
        };
        assert!(!connect.is_fatal_for_connect());
        assert!(goodbye_means_reconnect(RefusalCode::SlowConsumer));
        assert!(goodbye_means_reconnect(RefusalCode::Unavailable));
        assert!(!goodbye_means_reconnect(RefusalCode::ProtocolError));
        assert!(!goodbye_means_reconnect(RefusalCode::TokenExpired));
    }
}
