//! One clock for the whole run, and the send timestamp carried in each payload.
//!
//! Publishers and subscribers live in this one process, so a monotonic [`Instant`]
//! taken at start-up is a clock both ends share: the publisher writes "nanoseconds
//! since start" into the first 8 bytes of the payload just before it hands the
//! publish to the client, and the subscriber subtracts it from its own reading when
//! the message comes out of `Session::next`. That is publish → delivery latency as an
//! application sees it (client encode, QUIC both ways, broker, client decode, the
//! client's event queue), with no clock skew to correct.

use std::time::Instant;

/// Bytes of the payload that carry the send timestamp.
pub const STAMP_BYTES: usize = 8;

/// The run's shared clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    /// A clock whose zero is now.
    pub fn start() -> Clock {
        Clock {
            start: Instant::now(),
        }
    }

    /// Nanoseconds since the clock started.
    pub fn now_ns(&self) -> u64 {
        // Cannot overflow for 584 years of run time.
        self.start.elapsed().as_nanos() as u64
    }
}

/// A payload of `len` bytes (at least [`STAMP_BYTES`]) stamped with `sent_ns`.
pub fn stamped_payload(len: usize, sent_ns: u64) -> Vec<u8> {
    let mut payload = vec![b'x'; len.max(STAMP_BYTES)];
    payload[..STAMP_BYTES].copy_from_slice(&sent_ns.to_le_bytes());
    payload
}

/// The send timestamp of a payload made by [`stamped_payload`]; `None` if it is too
/// short to carry one (not ours).
pub fn read_stamp(payload: &[u8]) -> Option<u64> {
    payload
        .first_chunk::<STAMP_BYTES>()
        .map(|b| u64::from_le_bytes(*b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips() {
        let p = stamped_payload(128, 123_456_789);
        assert_eq!(p.len(), 128);
        assert_eq!(read_stamp(&p), Some(123_456_789));
        assert_eq!(read_stamp(&p[..7]), None);
        assert_eq!(stamped_payload(3, 1).len(), STAMP_BYTES);
    }
}
