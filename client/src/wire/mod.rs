//! The Herald wire protocol: the single source of truth for what goes on a stream.
//!
//! Owns: the preamble, the frame layout, the frame types ([`Frame`] and friends),
//! encoding, and validated decoding. Must not: do I/O, touch tokio or quinn, read a
//! clock, or trust a byte it has not validated. Both the client and the broker use
//! exactly this module, so the two can never disagree about a frame.
//!
//! # Layout of a client stream
//!
//! A client opens one bidirectional QUIC stream (ALPN [`ALPN_CLIENT`]) and writes the
//! 8-byte preamble, then frames. The broker answers with its own preamble, then frames.
//!
//! ```text
//!  preamble (8 bytes, once per direction)
//!  +----+----+----+----+---------+---------+
//!  | 'H'| 'R'| 'L'| 'D'| version (u16 LE)  |  reserved (u16, zero)
//!  +----+----+----+----+---------+---------+
//!
//!  frame (repeated)
//!  +-------------------+-------------------------------------------+
//!  | body_len (u32 LE) | body: rkyv archive of `Frame`, body_len B |
//!  +-------------------+-------------------------------------------+
//!   0                 4                                 4+body_len
//! ```
//!
//! * `body_len` is checked against the configured maximum *before* the body is
//!   read, so a peer cannot make us buffer more than that ([`WireError::Oversized`]).
//! * Every body is validated with rkyv's checked access (bytecheck) before any field
//!   is used ([`WireError::Invalid`]); a body that fails closes the connection.
//! * The version lives in the preamble, outside rkyv, so a peer with another layout is
//!   told [`WireError::UnsupportedVersion`] instead of failing validation.
//! * Errors carry the byte offset in the stream where the bad frame starts.
//!
//! The first frame from a client must be [`Frame::Hello`]; the broker answers with
//! [`Frame::Welcome`] or [`Frame::Goodbye`]. After that, the client sends
//! [`Frame::Request`]s and the broker sends [`Frame::Reply`], [`Frame::Deliver`] and
//! [`Frame::Event`] frames, and a draining broker [`Frame::Move`]. A broker pre-encodes each message's `Deliver` frame once
//! and writes the same bytes to every subscribed session.

mod frame;
mod slot;

pub use frame::*;
pub use slot::{slot_of, SLOT_COUNT};

use rkyv::rancor;
use rkyv::util::AlignedVec;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// ALPN for client (session and publisher) connections.
pub const ALPN_CLIENT: &[u8] = b"herald/1";
/// ALPN reserved for node-to-node connections (the replication issue uses it).
pub const ALPN_PEER: &[u8] = b"herald-peer/1";
/// The four bytes every stream starts with.
pub const MAGIC: [u8; 4] = *b"HRLD";
/// Length of the preamble.
pub const PREAMBLE_LEN: usize = 8;
/// Length of a frame header (the body length).
pub const FRAME_HEADER_LEN: usize = 4;
/// Default largest frame body: the 64 KiB default payload plus room for the envelope.
pub const DEFAULT_FRAME_BYTES_MAX: u32 = 64 * 1024 + 4 * 1024;
/// Hard ceiling for any configured frame maximum: 1 MiB payload plus the envelope.
pub const FRAME_BYTES_CEILING: u32 = 1024 * 1024 + 64 * 1024;

/// Everything that can be wrong with bytes on the wire.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// The stream did not start with `HRLD`.
    #[error("bad preamble: expected magic \"HRLD\", got {found:?}; is this a Herald endpoint?")]
    BadMagic {
        /// The four bytes found instead.
        found: [u8; 4],
    },
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {found}; this build speaks version {expected}")]
    UnsupportedVersion {
        /// The version the peer announced.
        found: u16,
        /// The version we speak.
        expected: u16,
    },
    /// A frame's length prefix is above the configured maximum.
    #[error("frame at stream offset {offset} announces {len} bytes, above the maximum of {max}")]
    Oversized {
        /// Stream offset of the frame header.
        offset: u64,
        /// The announced body length.
        len: u64,
        /// The configured maximum.
        max: u32,
    },
    /// A frame body failed validation.
    #[error("frame at stream offset {offset} ({len} bytes) failed validation: {reason}")]
    Invalid {
        /// Stream offset of the frame header.
        offset: u64,
        /// The body length.
        len: u32,
        /// What rkyv's checker said.
        reason: String,
    },
    /// The stream ended inside a frame.
    #[error(
        "stream ended inside a frame at offset {offset}: {available} of {needed} bytes present"
    )]
    Truncated {
        /// Stream offset of the incomplete frame.
        offset: u64,
        /// Bytes that frame needs.
        needed: u64,
        /// Bytes that arrived.
        available: u64,
    },
    /// A frame could not be encoded (e.g. larger than the maximum).
    #[error("cannot encode frame: {reason}")]
    Encode {
        /// Why.
        reason: String,
    },
}

/// The preamble this build sends.
pub fn preamble() -> [u8; PREAMBLE_LEN] {
    let v = PROTOCOL_VERSION.to_le_bytes();
    [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], v[0], v[1], 0, 0]
}

/// Checks a peer's preamble; returns its version when it is ours.
pub fn parse_preamble(bytes: [u8; PREAMBLE_LEN]) -> Result<u16, WireError> {
    let found = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if found != MAGIC {
        return Err(WireError::BadMagic { found });
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion {
            found: version,
            expected: PROTOCOL_VERSION,
        });
    }
    Ok(version)
}

/// Appends `frame` (header and body) to `out`.
///
/// Fails only if the body would exceed `frame_bytes_max` (the receiver would refuse it)
/// or rkyv fails to serialize.
pub fn encode_frame_into(
    frame: &Frame,
    frame_bytes_max: u32,
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    let body = rkyv::to_bytes::<rancor::Error>(frame).map_err(|e| WireError::Encode {
        reason: e.to_string(),
    })?;
    if body.len() > frame_bytes_max as usize {
        return Err(WireError::Encode {
            reason: format!(
                "body of {} bytes is above the frame maximum of {frame_bytes_max}",
                body.len()
            ),
        });
    }
    // Cannot truncate: frame_bytes_max is a u32 and body.len() <= it.
    let len = body.len() as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// Encodes `frame` (header and body) into a new buffer.
pub fn encode_frame(frame: &Frame, frame_bytes_max: u32) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    encode_frame_into(frame, frame_bytes_max, &mut out)?;
    Ok(out)
}

/// Parses a frame header: the body length, checked against the maximum.
pub fn parse_frame_header(
    header: [u8; FRAME_HEADER_LEN],
    frame_bytes_max: u32,
    offset: u64,
) -> Result<u32, WireError> {
    let len = u32::from_le_bytes(header);
    if len > frame_bytes_max {
        return Err(WireError::Oversized {
            offset,
            len: u64::from(len),
            max: frame_bytes_max,
        });
    }
    Ok(len)
}

/// Validates an aligned frame body and gives zero-copy access to it.
pub fn access_body(body: &AlignedVec, offset: u64) -> Result<&ArchivedFrame, WireError> {
    rkyv::access::<ArchivedFrame, rancor::Error>(body).map_err(|e| WireError::Invalid {
        offset,
        len: body.len() as u32,
        reason: e.to_string(),
    })
}

/// Validates a frame body and turns it into an owned [`Frame`].
///
/// `body` need not be aligned; it is copied into an aligned buffer first.
pub fn decode_body(body: &[u8], offset: u64) -> Result<Frame, WireError> {
    let mut aligned = AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    let archived = access_body(&aligned, offset)?;
    rkyv::deserialize::<Frame, rancor::Error>(archived).map_err(|e| WireError::Invalid {
        offset,
        len: body.len() as u32,
        reason: e.to_string(),
    })
}

/// Turns a byte stream into frames, holding at most one frame's worth of bytes
/// beyond what it has returned (plus one read chunk).
///
/// Feed it with [`FrameDecoder::extend`] and take frames with
/// [`FrameDecoder::next_frame`] until it returns `Ok(None)`. Any error is fatal for the
/// stream: the caller closes the connection.
#[derive(Debug)]
pub struct FrameDecoder {
    frame_bytes_max: u32,
    buffer: Vec<u8>,
    /// Start of unconsumed bytes in `buffer`.
    start: usize,
    /// Stream offset of `buffer[start]`.
    offset: u64,
}

impl FrameDecoder {
    /// A decoder that refuses frames whose body exceeds `frame_bytes_max`.
    pub fn new(frame_bytes_max: u32) -> Self {
        FrameDecoder {
            frame_bytes_max: frame_bytes_max.min(FRAME_BYTES_CEILING),
            buffer: Vec::new(),
            start: 0,
            offset: 0,
        }
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        // Compact before growing, so the buffer stays near one frame in size.
        if self.start > 0 && self.start >= self.buffer.len() / 2 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet returned as a frame.
    pub fn buffered_len(&self) -> usize {
        self.buffer.len() - self.start
    }

    /// Stream offset of the next frame.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        let pending = &self.buffer[self.start..];
        let Some(header) = pending.first_chunk::<FRAME_HEADER_LEN>() else {
            return Ok(None);
        };
        let len = parse_frame_header(*header, self.frame_bytes_max, self.offset)? as usize;
        let Some(body) = pending.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
            return Ok(None);
        };
        let frame = decode_body(body, self.offset)?;
        self.start += FRAME_HEADER_LEN + len;
        self.offset += (FRAME_HEADER_LEN + len) as u64;
        Ok(Some(frame))
    }

    /// Call at end of stream: an error if a partial frame is left over.
    pub fn finish(&self) -> Result<(), WireError> {
        let pending = &self.buffer[self.start..];
        if pending.is_empty() {
            return Ok(());
        }
        let needed = match pending.first_chunk::<FRAME_HEADER_LEN>() {
            Some(h) => FRAME_HEADER_LEN as u64 + u64::from(u32::from_le_bytes(*h)),
            None => FRAME_HEADER_LEN as u64,
        };
        Err(WireError::Truncated {
            offset: self.offset,
            needed,
            available: pending.len() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64) -> Message {
        Message {
            conv: 7,
            seq,
            sender: Principal::Service("billing".into()),
            timestamp_ms: 1_700_000_000_000,
            payload: b"hello".to_vec(),
        }
    }

    fn every_frame_kind() -> Vec<Frame> {
        let refusal = Refusal::new(RefusalCode::NotMember, "user 9 is not in conversation 7");
        let requests = vec![
            Request::CreateConversation {
                conv: 7,
                kind: ConvKind::Group,
                members: vec![1, 2, 3],
            },
            Request::AddMembers {
                conv: 7,
                members: vec![4],
            },
            Request::RemoveMembers {
                conv: 7,
                members: vec![4],
            },
            Request::Publish {
                conv: 7,
                key: IdempotencyKey::Producer {
                    producer_id: 1,
                    producer_seq: 2,
                },
                payload: vec![0; 100],
            },
            Request::Publish {
                conv: 7,
                key: IdempotencyKey::Caller("pay-123".into()),
                payload: vec![],
            },
            Request::Subscribe {
                conv: 7,
                from: Some(1),
            },
            Request::Subscribe {
                conv: 7,
                from: None,
            },
            Request::Unsubscribe { conv: 7 },
            Request::History {
                conv: 7,
                from: 1,
                limit: 10,
            },
            Request::ClusterMap,
        ];
        let replies = vec![
            Reply::Done,
            Reply::Created { created: true },
            Reply::Published {
                seq: 3,
                duplicate: false,
                leader: Some(2),
            },
            Reply::ClusterMap(ClusterMapView {
                nodes: vec![NodeView {
                    id: 2,
                    addr: "10.0.0.2:7400".into(),
                }],
                groups: vec![GroupView {
                    id: 1,
                    slot_start: 0,
                    slot_end: 4096,
                    leader: None,
                }],
            }),
            Reply::Subscribed {
                conv: 7,
                next_seq: 4,
            },
            Reply::History(HistoryPage {
                messages: vec![message(1), message(2)],
                first_seq: 1,
                next_seq: 3,
            }),
            Reply::Refused(refusal.clone()),
        ];
        let mut frames = vec![
            Frame::Hello(Hello {
                token: "a.b.c".into(),
                client_name: "test".into(),
            }),
            Frame::Welcome(Welcome {
                session_id: 5,
                principal: Principal::User(42),
                limits: SessionLimits {
                    frame_bytes_max: 1000,
                    payload_bytes_max: 900,
                    subscriptions_max: 10,
                },
            }),
            Frame::Deliver(message(9)),
            Frame::Event(Event::Truncated {
                conv: 7,
                requested_from: 1,
                first_available_seq: 50,
            }),
            Frame::Event(Event::Lagged { dropped: 12 }),
            Frame::Event(Event::Unsubscribed {
                conv: 7,
                reason: refusal.clone(),
            }),
            Frame::Goodbye(refusal),
            Frame::Move(MoveNotice {
                within_ms: 10_000,
                detail: "node 2 is draining".into(),
            }),
        ];
        frames.extend(
            requests
                .into_iter()
                .enumerate()
                .map(|(i, body)| Frame::Request { id: i as u64, body }),
        );
        frames.extend(
            replies
                .into_iter()
                .enumerate()
                .map(|(i, body)| Frame::Reply { id: i as u64, body }),
        );
        frames
    }

    #[test]
    fn every_frame_kind_round_trips() {
        for frame in every_frame_kind() {
            let bytes = encode_frame(&frame, DEFAULT_FRAME_BYTES_MAX).unwrap();
            let mut decoder = FrameDecoder::new(DEFAULT_FRAME_BYTES_MAX);
            decoder.extend(&bytes);
            assert_eq!(decoder.next_frame().unwrap(), Some(frame));
            assert_eq!(decoder.next_frame().unwrap(), None);
            decoder.finish().unwrap();
        }
    }

    #[test]
    fn frames_split_at_every_byte_boundary_reassemble() {
        let frames = every_frame_kind();
        let mut stream = Vec::new();
        for f in &frames {
            encode_frame_into(f, DEFAULT_FRAME_BYTES_MAX, &mut stream).unwrap();
        }
        let mut decoder = FrameDecoder::new(DEFAULT_FRAME_BYTES_MAX);
        let mut out = Vec::new();
        for byte in &stream {
            decoder.extend(std::slice::from_ref(byte));
            while let Some(f) = decoder.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, frames);
        assert_eq!(decoder.offset(), stream.len() as u64);
    }

    #[test]
    fn truncated_stream_is_reported_with_offset() {
        let first = encode_frame(&Frame::Deliver(message(1)), DEFAULT_FRAME_BYTES_MAX).unwrap();
        let second = encode_frame(&Frame::Deliver(message(2)), DEFAULT_FRAME_BYTES_MAX).unwrap();
        let mut decoder = FrameDecoder::new(DEFAULT_FRAME_BYTES_MAX);
        decoder.extend(&first);
        decoder.extend(&second[..second.len() - 3]);
        assert!(decoder.next_frame().unwrap().is_some());
        assert_eq!(decoder.next_frame().unwrap(), None);
        let err = decoder.finish().unwrap_err();
        assert_eq!(
            err,
            WireError::Truncated {
                offset: first.len() as u64,
                needed: second.len() as u64,
                available: second.len() as u64 - 3,
            }
        );
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        let mut decoder = FrameDecoder::new(1024);
        decoder.extend(&u32::MAX.to_le_bytes());
        let err = decoder.next_frame().unwrap_err();
        assert_eq!(
            err,
            WireError::Oversized {
                offset: 0,
                len: u64::from(u32::MAX),
                max: 1024
            }
        );
    }

    #[test]
    fn encoder_refuses_a_frame_the_peer_would_refuse() {
        let big = Frame::Deliver(Message {
            payload: vec![0; 2000],
            ..message(1)
        });
        assert!(matches!(
            encode_frame(&big, 1024),
            Err(WireError::Encode { .. })
        ));
    }

    #[test]
    fn garbage_body_fails_validation_and_never_panics() {
        // A deterministic pseudo-random generator keeps the test reproducible.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for round in 0..2000 {
            let len = (round % 200) as usize;
            let body: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let mut bytes = (len as u32).to_le_bytes().to_vec();
            bytes.extend_from_slice(&body);
            let mut decoder = FrameDecoder::new(DEFAULT_FRAME_BYTES_MAX);
            decoder.extend(&bytes);
            // Either an error or (rarely) a valid frame; never a panic.
            if let Err(e) = decoder.next_frame() {
                assert!(matches!(e, WireError::Invalid { offset: 0, .. }), "{e}");
            }
        }
    }

    #[test]
    fn flipped_bytes_in_a_valid_frame_never_panic() {
        let bytes = encode_frame(
            &Frame::Reply {
                id: 1,
                body: Reply::History(HistoryPage {
                    messages: vec![message(1), message(2)],
                    first_seq: 1,
                    next_seq: 3,
                }),
            },
            DEFAULT_FRAME_BYTES_MAX,
        )
        .unwrap();
        for i in FRAME_HEADER_LEN..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut corrupt = bytes.clone();
                corrupt[i] ^= flip;
                let _ = decode_body(&corrupt[FRAME_HEADER_LEN..], 0);
            }
        }
    }

    #[test]
    fn preamble_round_trips_and_rejects_other_versions_and_magic() {
        assert_eq!(parse_preamble(preamble()), Ok(PROTOCOL_VERSION));
        let mut other = preamble();
        other[4] = 99;
        assert_eq!(
            parse_preamble(other),
            Err(WireError::UnsupportedVersion {
                found: 99,
                expected: PROTOCOL_VERSION
            })
        );
        assert!(matches!(
            parse_preamble(*b"GET / HT"),
            Err(WireError::BadMagic { .. })
        ));
    }
}
