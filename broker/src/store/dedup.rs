//! One conversation's idempotency keys: which key got which seq, for how long.
//!
//! A key is remembered from the publish that used it until it is older than the
//! dedup window (age measured with command timestamps) or until it is the oldest of
//! `dedup_keys_max` keys and a new one arrives. A retry after that is not recognised:
//! it appends a new message with a new seq.
//!
//! Layout, for speed: most keys are a producer's counter (`Producer { producer_id,
//! producer_seq }`), and a producer's counter only goes up (by one per publish of
//! that producer, to whichever conversation, so with gaps in any one of them). Those
//! are kept as a *run* per producer, a queue ordered by `producer_seq`: a new key is
//! above the run's last one (not remembered, no search), is pushed at the back and
//! is forgotten from the front, so the common publish touches one small per-producer
//! record instead of a random slot of a table of up to `dedup_keys_max` keys (that
//! slot was a cache miss per publish: 29% of applying a publish, `cargo bench -p
//! herald-bench --bench store`); a retry is found by binary search. Any other key (a
//! caller's string, a producer key not above its run's last) goes to a map.
//! Which structure holds a key changes nothing a caller can see: the same keys are
//! remembered and forgotten in the same order, and a snapshot stores the same list.

use std::collections::{HashMap, VecDeque};

use herald_client::wire::IdempotencyKey;

use super::image::DedupRunImage;

/// The maps' hasher: foldhash, seeded at random per process (keys are chosen by
/// authenticated services, so a flood of colliding keys needs that seed; no replica
/// depends on the maps' order, `order` is what is stored and evicted). A key in the
/// map is hashed three times per publish (lookup, insert, the eviction of the
/// oldest); with the std SipHash that was 8% of applying a publish (`--bench store`).
type KeyHasher = foldhash::fast::RandomState;

/// Longest caller-chosen key, in bytes; a longer one is refused (`Invalid`).
pub const CALLER_KEY_BYTES_MAX: usize = 256;

/// When a key was first published and the seq it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    seq: u64,
    timestamp_ms: u64,
}

/// Keys of one producer, oldest first, `producer_seq` strictly increasing.
#[derive(Debug, Clone)]
struct Run {
    /// `(producer_seq, entry)`.
    entries: VecDeque<(u64, Entry)>,
}

impl Run {
    /// Where `producer_seq` is in the run, if it is.
    fn position(&self, producer_seq: u64) -> Option<usize> {
        match self.entries.back() {
            // The common case, a new key: above the last one.
            Some((last, _)) if producer_seq > *last => None,
            _ => self
                .entries
                .binary_search_by_key(&producer_seq, |(s, _)| *s)
                .ok(),
        }
    }

    fn entry(&self, producer_seq: u64) -> Option<&Entry> {
        self.position(producer_seq).map(|i| &self.entries[i].1)
    }

    /// Gives back most of the queue's room once it is under a quarter full, so a run
    /// that once held `dedup_keys_max` keys and now holds a few does not keep room
    /// for all of them (producers taking turns would otherwise each keep a full
    /// table's worth). Amortised O(1): halving needs as many pops as it frees.
    fn release_spare(&mut self) {
        const ROOM_MIN: usize = 64;
        let (len, room) = (self.entries.len(), self.entries.capacity());
        if room > ROOM_MIN && len * 4 < room {
            self.entries.shrink_to((len * 2).max(ROOM_MIN));
        }
    }

    /// Whether `producer_seq` can go at the back.
    fn extends(&self, producer_seq: u64) -> bool {
        self.entries
            .back()
            .is_none_or(|(last, _)| producer_seq > *last)
    }
}

/// Keys of one conversation, oldest first.
///
/// Invariants (checked by [`DedupTable::validate`]): `order` holds exactly the keys of
/// `entries` and `runs`, in insertion order, which is also seq order and (timestamps
/// being clamped non-decreasing) time order; so expiry and the count bound both evict
/// from the front. A key is in `entries` or in a run, never both; a run is never
/// empty; `run_keys` counts the keys in runs.
#[derive(Debug, Clone, Default)]
pub(super) struct DedupTable {
    /// Keys not in a run.
    entries: HashMap<IdempotencyKey, Entry, KeyHasher>,
    /// Producer id → its run of consecutive keys.
    runs: HashMap<u64, Run, KeyHasher>,
    /// Keys in `runs`.
    run_keys: usize,
    /// Each key with the stamp it was first published at, so expiry compares stamps
    /// at the front without looking a key up per publish.
    order: VecDeque<(u64, IdempotencyKey)>,
}

/// Whether a key first seen at `key_ms` is still remembered at `now_ms`.
fn within_window(key_ms: u64, now_ms: u64, window_ms: u64) -> bool {
    now_ms.saturating_sub(key_ms) <= window_ms
}

impl DedupTable {
    /// Keys remembered.
    pub(super) fn len(&self) -> usize {
        self.entries.len() + self.run_keys
    }

    /// The seq `key` got, if it is still remembered at `now_ms`. Does not mutate, so a
    /// publish can decide before it changes anything.
    pub(super) fn lookup(&self, key: &IdempotencyKey, now_ms: u64, window_ms: u64) -> Option<u64> {
        self.find(key)
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
        while self.len() >= keys_max {
            self.pop_oldest();
        }
        // An expired entry of the same key may linger behind newer ones only if the
        // caller skipped `expire`; forgetting it first keeps `order` in step.
        if self.find(&key).is_some() {
            self.forget(&key);
        }
        self.remember(key, Entry { seq, timestamp_ms });
    }

    /// The keys oldest first, as a snapshot stores them (in runs).
    pub(super) fn image(&self) -> Vec<DedupRunImage> {
        let mut runs: Vec<DedupRunImage> = Vec::new();
        for (_, key) in &self.order {
            let Some(e) = self.find(key) else {
                continue;
            };
            if runs
                .last_mut()
                .is_some_and(|run| run.extend(key, e.seq, e.timestamp_ms))
            {
                continue;
            }
            runs.push(DedupRunImage {
                first: key.clone(),
                first_seq: e.seq,
                timestamp_ms: e.timestamp_ms,
                more: 0,
            });
        }
        runs
    }

    /// The table a snapshot stored, oldest first. Refuses more than `keys_max` keys
    /// before expanding any run (a run's length is data from disk or a peer) and a run
    /// past the end of the u64 counters; the caller validates the rest.
    pub(super) fn from_image(runs: Vec<DedupRunImage>, keys_max: usize) -> Result<Self, String> {
        let keys: u64 = runs.iter().map(DedupRunImage::keys).sum();
        if keys > keys_max as u64 {
            return Err(format!(
                "the snapshot remembers {keys} idempotency keys, above this node's \
                 dedup_keys_max of {keys_max}"
            ));
        }
        let mut table = DedupTable::default();
        for run in runs {
            for i in 0..=run.more {
                let Some((key, seq)) = run.key(i) else {
                    return Err(format!(
                        "a dedup run from {:?} has {} keys, past what its key allows",
                        run.first,
                        run.keys()
                    ));
                };
                if table.find(&key).is_some() {
                    // A snapshot lists a key once. A repeat is queued again but not
                    // stored, so `validate` refuses the image (more queued than
                    // remembered), in linear time: forgetting the first copy would scan
                    // the queue per repeat.
                    table.order.push_back((run.timestamp_ms, key));
                    continue;
                }
                let entry = Entry {
                    seq,
                    timestamp_ms: run.timestamp_ms,
                };
                table.remember(key, entry);
            }
        }
        Ok(table)
    }

    fn find(&self, key: &IdempotencyKey) -> Option<&Entry> {
        if let IdempotencyKey::Producer {
            producer_id,
            producer_seq,
        } = key
        {
            if let Some(entry) = self
                .runs
                .get(producer_id)
                .and_then(|r| r.entry(*producer_seq))
            {
                return Some(entry);
            }
        }
        self.entries.get(key)
    }

    /// Adds a key that is not remembered, as the newest.
    fn remember(&mut self, key: IdempotencyKey, entry: Entry) {
        let in_run = match &key {
            IdempotencyKey::Producer {
                producer_id,
                producer_seq,
            } => match self.runs.get_mut(producer_id) {
                Some(run) if run.extends(*producer_seq) => {
                    run.entries.push_back((*producer_seq, entry));
                    true
                }
                Some(_) => false,
                None => {
                    self.runs.insert(
                        *producer_id,
                        Run {
                            entries: VecDeque::from([(*producer_seq, entry)]),
                        },
                    );
                    true
                }
            },
            IdempotencyKey::Caller(_) => false,
        };
        if in_run {
            self.run_keys += 1;
        } else {
            self.entries.insert(key.clone(), entry);
        }
        self.order.push_back((entry.timestamp_ms, key));
    }

    /// Forgets a remembered key wherever it is in the order (the slow path of a
    /// repeated key); the rest of its run stays increasing.
    fn forget(&mut self, key: &IdempotencyKey) {
        self.order.retain(|(_, k)| k != key);
        if self.entries.remove(key).is_some() {
            return;
        }
        let IdempotencyKey::Producer {
            producer_id,
            producer_seq,
        } = key
        else {
            return;
        };
        let Some(run) = self.runs.get_mut(producer_id) else {
            return;
        };
        if let Some(i) = run.position(*producer_seq) {
            run.entries.remove(i);
            self.run_keys -= 1;
            if run.entries.is_empty() {
                self.runs.remove(producer_id);
            } else {
                run.release_spare();
            }
        }
    }

    fn pop_oldest(&mut self) {
        let Some((_, key)) = self.order.pop_front() else {
            return;
        };
        if let IdempotencyKey::Producer {
            producer_id,
            producer_seq,
        } = &key
        {
            if let Some(run) = self.runs.get_mut(producer_id) {
                // The oldest key of all is the oldest of its run, if it is in one.
                if run.entries.front().is_some_and(|(s, _)| s == producer_seq) {
                    run.entries.pop_front();
                    self.run_keys -= 1;
                    if run.entries.is_empty() {
                        self.runs.remove(producer_id);
                    } else {
                        run.release_spare();
                    }
                    return;
                }
            }
        }
        self.entries.remove(&key);
    }

    /// Checks the table against its conversation's `next_seq` and the bound.
    pub(super) fn validate(&self, conv: u64, next_seq: u64, keys_max: usize) -> Result<(), String> {
        let counted: usize = self.runs.values().map(|r| r.entries.len()).sum();
        if counted != self.run_keys {
            return Err(format!(
                "conv {conv}: dedup runs hold {counted} keys but count {}",
                self.run_keys
            ));
        }
        for (id, run) in &self.runs {
            if run.entries.is_empty() {
                return Err(format!("conv {conv}: dedup run of producer {id} is empty"));
            }
            if run
                .entries
                .iter()
                .zip(run.entries.iter().skip(1))
                .any(|(a, b)| a.0 >= b.0)
            {
                return Err(format!(
                    "conv {conv}: dedup run of producer {id} is not increasing"
                ));
            }
        }
        if self.len() != self.order.len() {
            return Err(format!(
                "conv {conv}: dedup table holds {} keys but its order queue {}",
                self.len(),
                self.order.len()
            ));
        }
        if self.len() > keys_max {
            return Err(format!(
                "conv {conv}: {} dedup keys, above the bound {keys_max}",
                self.len()
            ));
        }
        let mut previous: Option<Entry> = None;
        for (key_ms, key) in &self.order {
            let Some(entry) = self.find(key) else {
                return Err(format!(
                    "conv {conv}: dedup key {key:?} queued but not mapped"
                ));
            };
            if self.entries.contains_key(key)
                && matches!(key, IdempotencyKey::Producer { producer_id, producer_seq }
                    if self.runs.get(producer_id).and_then(|r| r.entry(*producer_seq)).is_some())
            {
                return Err(format!(
                    "conv {conv}: dedup key {key:?} is both in its producer's run and in the map"
                ));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The table as it was before runs: one map and the order queue. The real table
    /// must answer every lookup like it and hold the same keys in the same order.
    #[derive(Default)]
    struct Model {
        entries: std::collections::HashMap<IdempotencyKey, Entry>,
        order: VecDeque<(u64, IdempotencyKey)>,
    }

    impl Model {
        fn lookup(&self, key: &IdempotencyKey, now_ms: u64, window_ms: u64) -> Option<u64> {
            self.entries
                .get(key)
                .filter(|e| within_window(e.timestamp_ms, now_ms, window_ms))
                .map(|e| e.seq)
        }

        fn pop_oldest(&mut self) {
            if let Some((_, key)) = self.order.pop_front() {
                self.entries.remove(&key);
            }
        }

        fn expire(&mut self, now_ms: u64, window_ms: u64) -> usize {
            let mut n = 0;
            while self
                .order
                .front()
                .is_some_and(|(ms, _)| !within_window(*ms, now_ms, window_ms))
            {
                self.pop_oldest();
                n += 1;
            }
            n
        }

        fn insert(&mut self, key: IdempotencyKey, seq: u64, timestamp_ms: u64, keys_max: usize) {
            if keys_max == 0 {
                return;
            }
            while self.entries.len() >= keys_max {
                self.pop_oldest();
            }
            if self
                .entries
                .insert(key.clone(), Entry { seq, timestamp_ms })
                .is_some()
            {
                self.order.retain(|(_, k)| k != &key);
            }
            self.order.push_back((timestamp_ms, key));
        }

        fn keys(&self) -> Vec<(IdempotencyKey, u64, u64)> {
            self.order
                .iter()
                .map(|(_, k)| (k.clone(), self.entries[k].seq, self.entries[k].timestamp_ms))
                .collect()
        }
    }

    fn keys(table: &DedupTable) -> Vec<(IdempotencyKey, u64, u64)> {
        table
            .image()
            .iter()
            .flat_map(|run| {
                (0..=run.more).map(move |i| {
                    let (key, seq) = run.key(i).unwrap();
                    (key, seq, run.timestamp_ms)
                })
            })
            .collect()
    }

    /// xorshift64*, so a failure reproduces.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    #[test]
    fn runs_answer_like_one_map_under_random_producers_retries_gaps_and_callers() {
        const WINDOW_MS: u64 = 50;
        for seed in 1..=16u64 {
            let mut rng = 0x9e37_79b9_7f4a_7c15 ^ seed;
            let keys_max = [1, 2, 7, 64][(seed % 4) as usize];
            // A producer whose counter is at the top: its later keys all go to the map.
            let top = seed.is_multiple_of(8);
            let mut table = DedupTable::default();
            let mut model = Model::default();
            let mut producer_seq = [0u64, 0, if top { u64::MAX - 500 } else { 0 }];
            let mut seq = 1u64;
            let mut now_ms = 0u64;
            for step in 0..4_000 {
                // ~1 key per 0.25 ms: a 50 ms window holds ~200, above every keys_max.
                now_ms += u64::from(next(&mut rng).is_multiple_of(4));
                let r = next(&mut rng) % 100;
                let producer = (next(&mut rng) % 3) as usize;
                let key = match r {
                    // Mostly a producer's next key.
                    0..=69 => {
                        producer_seq[producer] = producer_seq[producer].saturating_add(1);
                        IdempotencyKey::Producer {
                            producer_id: producer as u64,
                            producer_seq: producer_seq[producer],
                        }
                    }
                    // A retry of a recent key.
                    70..=84 => IdempotencyKey::Producer {
                        producer_id: producer as u64,
                        producer_seq: producer_seq[producer].saturating_sub(next(&mut rng) % 5),
                    },
                    // A gap (a producer's lost publishes) or a jump back.
                    85..=92 => {
                        producer_seq[producer] = producer_seq[producer]
                            .saturating_add(next(&mut rng) % 4)
                            .saturating_sub(next(&mut rng) % 3);
                        IdempotencyKey::Producer {
                            producer_id: producer as u64,
                            producer_seq: producer_seq[producer],
                        }
                    }
                    _ => IdempotencyKey::Caller(format!("k{}", next(&mut rng) % 8)),
                };
                // In the order publish calls them: lookup (which may see an expired key
                // still held), then expire, then insert.
                let got = table.lookup(&key, now_ms, WINDOW_MS);
                assert_eq!(
                    got,
                    model.lookup(&key, now_ms, WINDOW_MS),
                    "seed {seed} step {step}: lookup of {key:?}"
                );
                assert_eq!(
                    table.expire(now_ms, WINDOW_MS),
                    model.expire(now_ms, WINDOW_MS),
                    "seed {seed} step {step}: expiry"
                );
                if got.is_none() {
                    table.insert(key.clone(), seq, now_ms, keys_max);
                    model.insert(key, seq, now_ms, keys_max);
                    seq += 1;
                }
                table.validate(1, seq, keys_max).unwrap();
                assert_eq!(keys(&table), model.keys(), "seed {seed} step {step}");
                // A replica restored from a snapshot may lay keys out differently (a
                // key in a run rather than the map); it must go on answering the same.
                if step % 500 == 499 {
                    table = DedupTable::from_image(table.image(), keys_max).unwrap();
                }
            }
            let restored = DedupTable::from_image(table.image(), keys_max).unwrap();
            restored.validate(1, seq, keys_max).unwrap();
            assert_eq!(keys(&restored), model.keys(), "seed {seed}: snapshot");
        }
    }

    #[test]
    fn a_lingering_key_inside_a_run_is_replaced() {
        let key = |producer_seq| IdempotencyKey::Producer {
            producer_id: 9,
            producer_seq,
        };
        let mut table = DedupTable::default();
        for s in 1..=5 {
            table.insert(key(s), s, s, 100);
        }
        // The caller skipped `expire`: key 3, long expired, comes again.
        table.insert(key(3), 6, 1_000, 100);
        table.validate(1, 7, 100).unwrap();
        let order: Vec<u64> = keys(&table).iter().map(|(_, seq, _)| *seq).collect();
        assert_eq!(order, [1, 2, 4, 5, 6]);
        assert_eq!(table.lookup(&key(3), 1_000, 10), Some(6));
        assert_eq!(table.lookup(&key(4), 1_000, 10_000), Some(4));
        assert_eq!(table.len(), 5);
    }

    #[test]
    fn lingering_keys_anywhere_are_replaced_like_in_one_map() {
        let key = |producer_seq| IdempotencyKey::Producer {
            producer_id: 4,
            producer_seq,
        };
        // Keys of runs (1..=3, the last alone after a jump back puts 2 in the map),
        // then each one again without `expire`: last of a run, a map key, first of a
        // run, with the bound forgetting the oldest during the same insert.
        for keys_max in [2, 3, 100] {
            let mut table = DedupTable::default();
            let mut model = Model::default();
            let mut seq = 1;
            for (s, ms) in [(1, 1), (3, 2), (2, 3), (3, 1_000), (2, 1_001), (1, 1_002)] {
                if table.lookup(&key(s), ms, 10).is_none() {
                    table.insert(key(s), seq, ms, keys_max);
                    model.insert(key(s), seq, ms, keys_max);
                    seq += 1;
                }
                table.validate(1, seq, keys_max).unwrap();
                assert_eq!(keys(&table), model.keys(), "keys_max {keys_max}, key {s}");
            }
        }
        // A run that held many keys and now holds a few gives back its room.
        let mut table = DedupTable::default();
        for s in 1..=10_000 {
            table.insert(key(s), s, 1, 10_000);
        }
        table.expire(1, 10);
        for s in 10_001..=10_010 {
            table.insert(key(s), s, 100, 10);
        }
        assert!(table.runs[&4].entries.capacity() < 1_000);
        table.validate(1, 10_011, 10).unwrap();

        // With nothing allowed, nothing is remembered.
        let mut table = DedupTable::default();
        table.insert(key(1), 1, 1, 0);
        assert_eq!(table.len(), 0);
        table.validate(1, 2, 0).unwrap();
    }

    #[test]
    fn a_snapshot_stores_a_producers_burst_as_one_run() {
        let key = |producer_id, producer_seq| IdempotencyKey::Producer {
            producer_id,
            producer_seq,
        };
        let mut table = DedupTable::default();
        let mut seq = 1;
        // Producer 1's keys 1–100 at stamp 5, then 101–150 at stamp 6, then one of
        // producer 2, then a caller key, then producer 1 again (its key 151).
        for (producer_seq, ms) in (1..=100).map(|s| (s, 5)).chain((101..=150).map(|s| (s, 6))) {
            table.insert(key(1, producer_seq), seq, ms, 1_000);
            seq += 1;
        }
        table.insert(key(2, 1), seq, 6, 1_000);
        table.insert(IdempotencyKey::Caller("pay-1".into()), seq + 1, 6, 1_000);
        table.insert(key(1, 151), seq + 2, 6, 1_000);
        let image = table.image();
        let lengths: Vec<u64> = image.iter().map(DedupRunImage::keys).collect();
        assert_eq!(lengths, [100, 50, 1, 1, 1]);
        let restored = DedupTable::from_image(image, 1_000).unwrap();
        restored.validate(1, seq + 3, 1_000).unwrap();
        assert_eq!(keys(&restored), keys(&table));
    }

    #[test]
    fn a_snapshot_with_more_keys_than_allowed_or_a_run_past_its_counter_is_refused() {
        let run = |first, more| DedupRunImage {
            first,
            first_seq: 1,
            timestamp_ms: 1,
            more,
        };
        let producer = |producer_seq| IdempotencyKey::Producer {
            producer_id: 1,
            producer_seq,
        };
        // Refused before anything is expanded: u32::MAX keys would take ~200 GB.
        let err = DedupTable::from_image(vec![run(producer(1), u32::MAX)], 100_000).unwrap_err();
        assert!(err.contains("above this node's dedup_keys_max"), "{err}");
        let err = DedupTable::from_image(vec![run(producer(u64::MAX - 1), 2)], 10).unwrap_err();
        assert!(err.contains("past what its key allows"), "{err}");
        let err = DedupTable::from_image(vec![run(IdempotencyKey::Caller("k".into()), 1)], 10)
            .unwrap_err();
        assert!(err.contains("past what its key allows"), "{err}");
    }

    #[test]
    fn a_snapshot_listing_a_key_twice_is_refused() {
        let image = |producer_seq, seq| DedupRunImage {
            first: IdempotencyKey::Producer {
                producer_id: 1,
                producer_seq,
            },
            first_seq: seq,
            timestamp_ms: seq,
            more: 0,
        };
        let table =
            DedupTable::from_image(vec![image(1, 1), image(2, 2), image(1, 3)], 100).unwrap();
        let err = table.validate(1, 4, 100).unwrap_err();
        assert!(err.contains("order queue"), "{err}");
    }
}
