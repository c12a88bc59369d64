//! Measurements, not tests: ignored, run by hand, print numbers.
//!
//! ```text
//! HERALD_BENCH_DIR=/path/on/the/disk cargo test -p herald-broker --lib \
//!     raft::log_store::tests::measure -- --ignored --nocapture --test-threads=1
//! ```
//! `HERALD_BENCH_DIR` picks the disk (default: the system temp directory).

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::{LogStoreConfig, Wal};
use super::entry;

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("HERALD_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_micros();
    format!(
        "p50 {} µs, p99 {} µs, max {} µs (n = {})",
        at(0.5),
        at(0.99),
        at(1.0),
        samples.len()
    )
}

#[tokio::test]
#[ignore = "measurement; run by hand"]
async fn fsync_latency_of_4k_appends() {
    let dir = bench_dir();
    // The raw disk: 4 KiB pwrite + fdatasync.
    let file = std::fs::File::create(dir.path().join("raw")).unwrap();
    let block = vec![7u8; 4096];
    let mut raw = Vec::new();
    for i in 0..1000u64 {
        file.write_all_at(&block, i * 4096).unwrap();
        let started = Instant::now();
        file.sync_data().unwrap();
        raw.push(started.elapsed());
    }
    println!("raw fdatasync after a 4 KiB write: {}", percentiles(raw));

    // The store: one ~4 KiB entry at a time, waiting until durable.
    let wal = Wal::open(LogStoreConfig {
        dir: dir.path().join("wal"),
        ..LogStoreConfig::default()
    })
    .await
    .unwrap();
    let store = wal.group(1);
    let mut acked = Vec::new();
    for index in 1..=1000 {
        let started = Instant::now();
        super::append(&store, vec![entry(1, index, 4000)]).await;
        acked.push(started.elapsed());
    }
    let stats = wal.stats();
    println!(
        "store append of one 4 KiB entry until durable: {}; {} fsyncs",
        percentiles(acked),
        stats.fsyncs_total
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement; run by hand"]
async fn appends_per_second_with_64_appenders_in_16_groups() {
    let dir = bench_dir();
    let wal = Wal::open(LogStoreConfig {
        dir: dir.path().join("wal"),
        ..LogStoreConfig::default()
    })
    .await
    .unwrap();
    let groups = 16u32;
    let nexts: Vec<_> = (0..groups)
        .map(|_| Arc::new(tokio::sync::Mutex::new(1u64)))
        .collect();
    let (appenders, per_appender) = (64u64, 500u64);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..appenders {
        let group = (i % u64::from(groups)) as u32;
        let store = wal.group(group + 1);
        let next = nexts[group as usize].clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for _ in 0..per_appender {
                let begun = Instant::now();
                let durable = {
                    let mut next = next.lock().await;
                    let rx = store
                        .append_notify(vec![entry(1, *next, 200)])
                        .await
                        .unwrap();
                    *next += 1;
                    rx
                };
                durable.await.unwrap().unwrap();
                latencies.push(begun.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    let total = appenders * per_appender;
    let stats = wal.stats();
    println!(
        "{total} appends of 200-byte entries by {appenders} appenders of {groups} groups in {:.2} s: {:.0} appends/s; \
         {} fsyncs ({:.1} appends per fsync); append-to-durable {}",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        stats.fsyncs_total,
        total as f64 / stats.fsyncs_total.max(1) as f64,
        percentiles(latencies),
    );
}
