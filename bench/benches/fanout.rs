//! Local fan-out: one message to N sessions of this node subscribed to one conversation.
//!
//! Measures `Router::fan_out` only: every outbox is drained outside the timed region after
//! each fan-out, so queues never fill and every offer is `Queued`. Criterion's
//! `elements/s` is deliveries per second.
//!
//! ```text
//! cargo bench -p herald-bench --bench fanout
//! cargo bench -p herald-bench --bench fanout -- 'fanout/parallel/1000000'   # one case
//! ```
//!
//! Groups:
//! * `fanout/parallel/N` — the default `RouterConfig` (split across the machine's cores
//!   above 65,536 subscribers).
//! * `fanout/serial/N` — one thread, for the per-core cost.
//! * `fanout/scattered/1000000` — the subscriber order is shuffled against allocation
//!   order, like a long-running node where sessions come and go: no help from the
//!   hardware prefetcher.
//! * `fanout/churn/1000000` — another thread subscribes and unsubscribes 1,000 other
//!   sessions in a loop while fan-out runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use herald_broker::routing::{Delivery, Outbox, Router, RouterConfig};
use herald_client::wire::{encode_frame, Frame, Message, Principal, DEFAULT_FRAME_BYTES_MAX};

const CONV: u64 = 42;
/// Outbox capacity in the bench: outboxes are drained after every fan-out.
const OUTBOX_CAPACITY: usize = 16;

fn delivery() -> Arc<Delivery> {
    let frame = encode_frame(
        &Frame::Deliver(Message {
            conv: CONV,
            seq: 1,
            sender: Principal::Service("bench".into()),
            timestamp_ms: 1_700_000_000_000,
            payload: vec![b'x'; 100],
        }),
        DEFAULT_FRAME_BYTES_MAX,
    )
    .expect("encode");
    Arc::new(Delivery::new(CONV, 1, frame.into()))
}

fn sessions(n: u64) -> Vec<Arc<Outbox>> {
    (0..n)
        .map(|id| Arc::new(Outbox::new(id, OUTBOX_CAPACITY)))
        .collect()
}

/// A deterministic shuffle (xorshift), so runs are comparable.
fn shuffle<T>(items: &mut [T]) {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in (1..items.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        items.swap(i, (state % (i as u64 + 1)) as usize);
    }
}

/// Times `fan_out` alone; drains every outbox after each one, untimed.
fn measure(router: &Router, outboxes: &[Arc<Outbox>], iters: u64) -> Duration {
    let delivery = delivery();
    let mut drained = Vec::with_capacity(OUTBOX_CAPACITY);
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let start = Instant::now();
        let stats = router.fan_out(black_box(&delivery));
        total += start.elapsed();
        assert_eq!(stats.queued, outboxes.len() as u64);
        for outbox in outboxes {
            outbox.drain_into(&mut drained, OUTBOX_CAPACITY);
            drained.clear();
        }
    }
    total
}

fn group_for<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    group
}

fn fanout(c: &mut Criterion) {
    for (name, config) in [
        ("fanout/parallel", RouterConfig::default()),
        (
            "fanout/serial",
            RouterConfig {
                fanout_threads_max: 1,
                ..RouterConfig::default()
            },
        ),
    ] {
        let mut group = group_for(c, name);
        for n in [1_000u64, 100_000, 1_000_000] {
            let router = Router::with_config(config);
            let outboxes = sessions(n);
            router.subscribe_many(CONV, &outboxes);
            group.throughput(Throughput::Elements(n));
            group.bench_function(BenchmarkId::from_parameter(n), |b| {
                b.iter_custom(|iters| measure(&router, &outboxes, iters))
            });
        }
        group.finish();
    }
}

fn fanout_scattered(c: &mut Criterion) {
    let n = 1_000_000u64;
    let mut group = group_for(c, "fanout/scattered");
    let router = Router::new();
    let mut outboxes = sessions(n);
    shuffle(&mut outboxes);
    router.subscribe_many(CONV, &outboxes);
    group.throughput(Throughput::Elements(n));
    group.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter_custom(|iters| measure(&router, &outboxes, iters))
    });
    group.finish();
}

fn fanout_churn(c: &mut Criterion) {
    let n = 1_000_000u64;
    let mut group = group_for(c, "fanout/churn");
    let router = Router::new();
    let outboxes = sessions(n);
    router.subscribe_many(CONV, &outboxes);
    let churned: Vec<_> = (n..n + 1_000)
        .map(|id| Arc::new(Outbox::new(id, OUTBOX_CAPACITY)))
        .collect();
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let churner = scope.spawn(|| {
            let mut changes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for outbox in &churned {
                    router.subscribe(CONV, outbox);
                    changes += 1;
                }
                for outbox in &churned {
                    router.unsubscribe(CONV, outbox.session_id());
                    changes += 1;
                }
            }
            changes
        });
        let started = Instant::now();
        group.throughput(Throughput::Elements(n));
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                let delivery = delivery();
                let mut drained = Vec::with_capacity(OUTBOX_CAPACITY);
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let stats = router.fan_out(black_box(&delivery));
                    total += start.elapsed();
                    assert!(stats.queued >= n);
                    for outbox in outboxes.iter().chain(&churned) {
                        outbox.drain_into(&mut drained, OUTBOX_CAPACITY);
                        drained.clear();
                    }
                }
                total
            })
        });
        stop.store(true, Ordering::Relaxed);
        let changes = churner.join().expect("churner");
        println!(
            "churn: {changes} subscribe/unsubscribe calls on the 1M-subscriber conversation \
             ({:.0}/s) during the measurement",
            changes as f64 / started.elapsed().as_secs_f64()
        );
    });
    group.finish();
}

criterion_group!(benches, fanout, fanout_scattered, fanout_churn);
criterion_main!(benches);
