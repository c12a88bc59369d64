//! Applying publishes to one conversation at steady state: what every replica pays per
//! message on the apply path (authorise, dedup lookup and insert, seq, history index,
//! the `Deliver` frame), with the dedup table and history full, so each publish also
//! forgets the oldest key and evicts the oldest message.
//!
//! ```text
//! cargo bench -p herald-bench --bench store
//! ```
//!
//! Criterion's `elements/s` is publishes applied per second. Cases: `producer_keys` (a
//! publisher's counter, every publish to this conversation), `producer_keys_12_
//! conversations` (the same publisher writing to 12 conversations in turn, so its
//! counter has gaps here), `caller_keys` (`payment-…` strings): as the leader applies
//! them, building each message's `Deliver` frame to fan out; and
//! `producer_keys_no_delivery`: as a follower does (no frame, nothing copied).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use herald_broker::store::{Command, ConversationStore, StoreLimits};
use herald_client::wire::{ConvKind, IdempotencyKey, Principal};

const CONV: u64 = 7;
const BATCH: u64 = 1000;
/// Dedup keys and history messages kept: both full before timing starts.
const KEPT: usize = 100_000;

fn publish(producer_seq: u64, key: &dyn Fn(u64) -> IdempotencyKey) -> Command {
    Command::Publish {
        conv: CONV,
        sender: Principal::Service("bench".into()),
        key: key(producer_seq),
        payload: vec![b'x'; 128],
        timestamp_ms: 1_000_000 + producer_seq,
    }
}

fn bench_keys(c: &mut Criterion, name: &str, key: &dyn Fn(u64) -> IdempotencyKey, deliver: bool) {
    let limits = StoreLimits {
        dedup_keys_max: KEPT,
        history_messages_max: KEPT,
        ..StoreLimits::default()
    };
    let mut store = ConversationStore::new(limits);
    store
        .apply(
            &Command::CreateConversation {
                conv: CONV,
                kind: ConvKind::Group,
                members: vec![1, 2],
            },
            1,
            0,
            deliver,
        )
        .unwrap();
    let mut next = 1u64;
    while next <= KEPT as u64 + 1 {
        store
            .apply(&publish(next, key), next + 1, 0, deliver)
            .unwrap();
        next += 1;
    }
    let mut group = c.benchmark_group("store_apply");
    group.throughput(Throughput::Elements(BATCH));
    group.bench_function(name, |b| {
        b.iter_batched(
            || {
                let first = next;
                next += BATCH;
                (first..first + BATCH)
                    .map(|s| publish(s, key))
                    .collect::<Vec<_>>()
            },
            |commands| {
                for (i, command) in commands.iter().enumerate() {
                    black_box(store.apply(command, 10_000_000, i as u32, deliver).unwrap());
                }
            },
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

fn store_apply(c: &mut Criterion) {
    let producer = |seq| IdempotencyKey::Producer {
        producer_id: 0x5eed,
        producer_seq: seq,
    };
    bench_keys(c, "producer_keys", &producer, true);
    bench_keys(c, "producer_keys_no_delivery", &producer, false);
    // One publisher writing to 12 conversations in turn: its counter has gaps here.
    bench_keys(
        c,
        "producer_keys_12_conversations",
        &|seq| IdempotencyKey::Producer {
            producer_id: 0x5eed,
            producer_seq: seq * 12,
        },
        true,
    );
    bench_keys(
        c,
        "caller_keys",
        &|seq| IdempotencyKey::Caller(format!("payment-{seq:012}")),
        true,
    );
}

criterion_group!(benches, store_apply);
criterion_main!(benches);
