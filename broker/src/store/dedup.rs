//! One conversation's idempotency keys: which key got which seq, for how long.
//!
//! A key is remembered from the publish that used it until it is older than the
//! dedup window (age measured with command timestamps) or until it is the oldest of
//! `dedup_keys_max` keys and a new one arrives. A retry after that is not recognised:
//! it appends a new message with a new seq.

use std::collections::{HashMap, VecDeque};

use herald_client::wire::IdempotencyKey;

/// The key map's hasher: foldhash, seeded at random per process (keys are chosen by
/// authenticated services, so a flood of colliding keys needs that seed). Every
/// publish hashes a key three times (lookup, insert, the eviction of the oldest), and
/// with the std SipHash that was 8% of applying a publish (`--bench store`).
type KeyHasher = foldhash::fast::RandomState;

/// Longest caller-chosen key, in bytes; a longer one is refused (`Invalid`).
pub const CALLER_KEY_BYTES_MAX: usize = 256;

/// When a key was first published and the seq it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    seq: u64,
    timestamp_ms: u64,
}

/// Keys of one conversation, oldest first.
///
/// Invariant: `order` holds exactly the keys of `entries`, in insertion order, which
/// is also seq order and (timestamps being clamped non-decreasing) time order; so
/// expiry and the count bound both evict from the front.
#[derive(Debug, Clone, Default)]
pub(super) struct DedupTable {
    entries: HashMap<IdempotencyKey, Entry, KeyHasher>,
    /// Each key with the stamp it was first published at, so expiry compares stamps
    /// at the front without hashing a key per publish.
    order: VecDeque<(u64, IdempotencyKey)>,
}

/// Whether a key first seen at `key_ms` is still remembered at `now_ms`.
fn within_window(key_ms: u64, now_ms: u64, window_ms: u64) -> bool {
    now_ms.saturating_sub(key_ms) <= window_ms
}

impl DedupTable {
    /// Keys remembered.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The seq `key` got, if it is still remembered at `now_ms`. Does not mutate, so a
    /// publish can decide before it changes anything.
    pub(super) fn lookup(&self, key: &IdempotencyKey, now_ms: u64, window_ms: u64) -> Option<u64> {
        self.entries
            .get(key)
            .filter(|e| within_window(e.timestamp_ms, now_ms, window_ms))
            .map(|e| e.seq)
    }

    /// Forgets keys older than the window at `now_ms`. Returns how many.
    pub(super) fn expire(&mut self, now_ms: u64, window_ms: u64) -> usize {
        let mut expired = 0;
        while let Some((key_ms, _)) = self.order.front() {
            if within_window(*key_ms, now_ms, window_ms) {
                break;
            }
            self.pop_oldest();
            expired += 1;
        }
        expired
    }

    /// Remembers `key` → `seq`. At `keys_max` the oldest key is forgotten first (with
    /// `keys_max == 0` nothing is remembered). The caller has expired old keys and
    /// checked with [`DedupTable::lookup`] that `key` is not remembered.
    pub(super) fn insert(
        &mut self,
        key: IdempotencyKey,
        seq: u64,
        timestamp_ms: u64,
        keys_max: usize,
    ) {
        if keys_max == 0 {
            return;
        }
        while self.entries.len() >= keys_max {
            self.pop_oldest();
        }
        // An expired entry of the same key may linger behind newer ones only if the
        // caller skipped `expire`; replacing it keeps `order` and `entries` in step.
        if self
            .entries
            .insert(key.clone(), Entry { seq, timestamp_ms })
            .is_some()
        {
            self.order.retain(|(_, k)| k != &key);
        }
        self.order.push_back((timestamp_ms, key));
    }

    /// The keys oldest first, as a snapshot stores them.
    pub(super) fn image(&self) -> Vec<super::image::DedupImage> {
        self.order
            .iter()
            .filter_map(|(_, key)| {
                self.entries.get(key).map(|e| super::image::DedupImage {
                    key: key.clone(),
                    seq: e.seq,
                    timestamp_ms: e.timestamp_ms,
                })
            })
            .collect()
    }

    /// The table a snapshot stored, oldest first (the caller validates it).
    pub(super) fn from_image(keys: Vec<super::image::DedupImage>) -> Self {
        let mut table = DedupTable::default();
        for k in keys {
            table.entries.insert(
                k.key.clone(),
                Entry {
                    seq: k.seq,
                    timestamp_ms: k.timestamp_ms,
                },
            );
            table.order.push_back((k.timestamp_ms, k.key));
        }
        table
    }

    fn pop_oldest(&mut self) {
        if let Some((_, key)) = self.order.pop_front() {
            self.entries.remove(&key);
        }
    }

    /// Checks the table against its conversation's `next_seq` and the bound.
    pub(super) fn validate(&self, conv: u64, next_seq: u64, keys_max: usize) -> Result<(), String> {
        if self.entries.len() != self.order.len() {
            return Err(format!(
                "conv {conv}: dedup map holds {} keys but its order queue {}",
                self.entries.len(),
                self.order.len()
            ));
        }
        if self.entries.len() > keys_max {
            return Err(format!(
                "conv {conv}: {} dedup keys, above the bound {keys_max}",
                self.entries.len()
            ));
        }
        let mut previous: Option<Entry> = None;
        for (key_ms, key) in &self.order {
            let Some(entry) = self.entries.get(key) else {
                return Err(format!(
                    "conv {conv}: dedup key {key:?} queued but not mapped"
                ));
            };
            if entry.timestamp_ms != *key_ms {
                return Err(format!(
                    "conv {conv}: dedup key {key:?} is queued at {key_ms} ms but stamped {} ms",
                    entry.timestamp_ms
                ));
            }
            if entry.seq == 0 || entry.seq >= next_seq {
                return Err(format!(
                    "conv {conv}: dedup key {key:?} points at seq {}, outside 1..{next_seq}",
                    entry.seq
                ));
            }
            if let Some(p) = previous {
                if entry.seq <= p.seq || entry.timestamp_ms < p.timestamp_ms {
                    return Err(format!(
                        "conv {conv}: dedup key {key:?} (seq {}, {} ms) is out of order after seq {} ({} ms)",
                        entry.seq, entry.timestamp_ms, p.seq, p.timestamp_ms
                    ));
                }
            }
            previous = Some(*entry);
        }
        Ok(())
    }
}

/// Refuses keys the table will not hold: an empty or overlong caller key.
pub(super) fn check_key(key: &IdempotencyKey) -> Result<(), String> {
    match key {
        IdempotencyKey::Producer { .. } => Ok(()),
        IdempotencyKey::Caller(s) if s.is_empty() => {
            Err("the idempotency key is empty; use a non-empty key such as a payment id".into())
        }
        IdempotencyKey::Caller(s) if s.len() > CALLER_KEY_BYTES_MAX => Err(format!(
            "the idempotency key is {} bytes long, above the maximum of {CALLER_KEY_BYTES_MAX}",
            s.len()
        )),
        IdempotencyKey::Caller(_) => Ok(()),
    }
}
