//! Watch streams: how a group's leader pushes committed messages to the nodes whose
//! sessions subscribe to its conversations (the node level of two-level fan-out).
//!
//! Owns: the frames of a watch stream after its opening request
//! ([`GroupRequest::Watch`](super::GroupRequest::Watch)) and reply
//! ([`PeerReply::Watching`](super::PeerReply::Watching)), and their bounds.
//! Must not: decide who watches what (`fanout::interest` does, on the watching node) or
//! what is pushed (`fanout::watchers` does, on the leader).
//!
//! # Layout
//!
//! One bidirectional QUIC stream per (watching node, group), framed like every peer
//! stream (`u32 LE body_len` + rkyv body, length checked before the body is read):
//!
//! ```text
//!  watcher -> leader   GroupRequest::Watch { convs }                (opening request)
//!  leader  -> watcher  PeerReply::Watching { heads: [(conv, next_seq)] }
//!                      or NotLeader / NoGroup, and the stream ends
//!  watcher -> leader   WatchControl::Add(conv) | WatchControl::Remove(conv)   (any time)
//!  leader  -> watcher  WatchEvent::Messages([PushedMessage])   one batch per log entry
//!                      WatchEvent::Head { conv, next_seq }      the answer to an Add
//!                      WatchEvent::Removed { conv, users }      members were removed
//!                      WatchEvent::Closing(reason)              the leader ends the watch
//!                      WatchEvent::Heartbeat                    nothing sent for 250 ms
//! ```
//!
//! Every message of a watched conversation committed after its head was registered is
//! pushed once, in seq order per conversation. A watcher that loses its stream (the
//! leader died, stepped down, or ended a watch it could not keep up with) reopens it at
//! the group's current leader and catches its sessions up from history at the new
//! heads: a push is a fast path, history is the source of truth. A watcher that hears
//! nothing, not even a heartbeat, for [`WATCH_SILENCE_MAX`] counts the leader as gone.

use std::time::Duration;

use rkyv::{Archive, Deserialize, Serialize};

/// Largest body of a [`WatchEvent`] frame. A batch is cut before it would pass
/// [`WATCH_BATCH_BYTES_MAX`]; a single message is at most ~1 MiB.
pub const WATCH_EVENT_BYTES_MAX: u32 = 8 * 1024 * 1024;

/// A batch of pushed messages is cut into frames of about this many frame bytes.
pub const WATCH_BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Largest body of a [`WatchControl`] frame (a tag and a conversation id).
pub const WATCH_CONTROL_BYTES_MAX: u32 = 64;

/// The leader sends [`WatchEvent::Heartbeat`] when it has sent nothing for this long.
pub const WATCH_HEARTBEAT: Duration = Duration::from_millis(250);

/// A watcher that hears nothing for this long counts the leader as gone and reopens
/// the watch elsewhere (QUIC alone would notice a killed leader only at the peer
/// connection's idle timeout, 3 s).
pub const WATCH_SILENCE_MAX: Duration = Duration::from_millis(1000);

/// The watcher changes what it watches.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum WatchControl {
    /// Start pushing this conversation; answered with [`WatchEvent::Head`].
    Add(u64),
    /// Stop pushing this conversation.
    Remove(u64),
}

/// One committed message, as the leader encoded it for sessions.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PushedMessage {
    /// Its conversation.
    pub conv: u64,
    /// Its seq.
    pub seq: u64,
    /// The client `Frame::Deliver` of the message, header and body, exactly as sessions
    /// receive it (the watching node forwards these bytes unchanged).
    pub frame: Vec<u8>,
    /// When the leader stored it (ms since the epoch; the fan-out latency metric).
    pub stored_ms: u64,
}

/// What the leader tells a watcher.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// New messages of watched conversations, in commit order.
    Messages(Vec<PushedMessage>),
    /// A conversation added with [`WatchControl::Add`] is watched from `next_seq` on.
    Head {
        /// The conversation.
        conv: u64,
        /// Its next seq when it was registered.
        next_seq: u64,
    },
    /// Members were removed from a watched conversation: their sessions must stop
    /// receiving it.
    Removed {
        /// The conversation.
        conv: u64,
        /// The users removed.
        users: Vec<u64>,
    },
    /// The leader ends the watch (it stepped down, or the watcher fell too far behind);
    /// reopen it at the current leader.
    Closing(String),
    /// Nothing else to say for [`WATCH_HEARTBEAT`]: the leader is alive.
    Heartbeat,
}

impl WatchEvent {
    /// A short name of the variant, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            WatchEvent::Messages(_) => "Messages",
            WatchEvent::Head { .. } => "Head",
            WatchEvent::Removed { .. } => "Removed",
            WatchEvent::Closing(_) => "Closing",
            WatchEvent::Heartbeat => "Heartbeat",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::network::frame::{check_header, decode_body, encode_frame};

    fn round_trip<T>(value: &T, max: u32) -> T
    where
        T: Archive + crate::raft::codec::Encodable,
        T::Archived: for<'a> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>,
            > + Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        let frame = encode_frame(value, "watch", max).unwrap();
        let stream = quinn::StreamId::new(quinn::Side::Client, quinn::Dir::Bi, 0);
        let header: [u8; 4] = frame[..4].try_into().unwrap();
        assert_eq!(
            check_header(header, "watch", stream, max).unwrap(),
            frame.len() - 4
        );
        decode_body(&frame[4..], "watch", stream).unwrap()
    }

    #[test]
    fn watch_frames_round_trip() {
        for control in [WatchControl::Add(u64::MAX), WatchControl::Remove(7)] {
            assert_eq!(round_trip(&control, WATCH_CONTROL_BYTES_MAX), control);
        }
        let events = [
            WatchEvent::Messages(vec![
                PushedMessage {
                    conv: 1,
                    seq: 2,
                    frame: vec![9; 300],
                    stored_ms: 1_700_000_000_000,
                },
                PushedMessage {
                    conv: 1,
                    seq: 3,
                    frame: Vec::new(),
                    stored_ms: 0,
                },
            ]),
            WatchEvent::Head {
                conv: 4,
                next_seq: 17,
            },
            WatchEvent::Removed {
                conv: 4,
                users: vec![1, 2],
            },
            WatchEvent::Closing("stepped down".into()),
            WatchEvent::Heartbeat,
        ];
        for event in events {
            assert_eq!(round_trip(&event, WATCH_EVENT_BYTES_MAX), event);
        }
    }
}
