//! Where a conversation lives: its slot.
//!
//! Owns: the stable hash from a conversation id to one of [`SLOT_COUNT`] slots. The
//! cluster map assigns slots to Raft groups; a client that knows the map sends a
//! conversation's writes straight to the leader of its group. The function is part of
//! the protocol: every client and every broker of every version must compute the same
//! slot, so it never changes.
//!
//! ```text
//! slot(conv) = splitmix64(conv) mod 4096
//! splitmix64(x): z = x + 0x9E3779B97F4A7C15
//!                z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
//!                z = (z ^ (z >> 27)) * 0x94D049BB133111EB
//!                z ^ (z >> 31)                    (wrapping u64 arithmetic)
//! ```
//!
//! Why a mix rather than `conv mod 4096`: backends often choose ids with structure
//! (sequences, shard prefixes, timestamps); the mix spreads any such set evenly.

/// Slots in every cluster: fixed, so a conversation's slot never changes.
pub const SLOT_COUNT: u32 = 4096;

/// The slot of conversation `conv` (see the module documentation).
pub fn slot_of(conv: u64) -> u32 {
    let mut z = conv.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // Cannot truncate: the remainder is below SLOT_COUNT.
    (z % u64::from(SLOT_COUNT)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_stable() {
        // Pinned values, computed by an independent implementation (Python, from the
        // formula in the module doc): changing the function would move every
        // conversation of every cluster.
        assert_eq!([0, 1, 42].map(slot_of), [3503, 3265, 3733]);
    }

    #[test]
    fn sequential_ids_spread_evenly() {
        let mut counts = vec![0u32; SLOT_COUNT as usize];
        for conv in 0..(SLOT_COUNT as u64 * 64) {
            counts[slot_of(conv) as usize] += 1;
        }
        let (min, max) = (
            counts.iter().copied().min().unwrap_or(0),
            counts.iter().copied().max().unwrap_or(0),
        );
        assert!(
            min >= 30 && max <= 110,
            "min {min}, max {max} per slot (mean 64)"
        );
    }
}
