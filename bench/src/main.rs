//! `herald-bench`: the Herald load generator.
//!
//! ```text
//! herald-bench fanout  [--addr HOST:PORT] [--ca FILE] [--secret-file FILE]
//!                      --subscribers N --publishers P --payload-bytes B --messages M
//!                      [--rate R] [--window W] [--conv ID] [--timeout SECONDS]
//! herald-bench publish [--addr …] --publishers P --payload-bytes B --messages M [--rate R]
//! ```
//!
//! Without `--addr` it starts a broker in this process (temporary data directory,
//! ephemeral ports on 127.0.0.1) that shares the machine — and the tokio runtime —
//! with the clients; the report says so.
//!
//! * `fanout`: N sessions, each on its own QUIC connection as user 1..=N, subscribe to
//!   one group conversation (created with a service token); P publisher connections
//!   publish M messages in all, each keeping `--window` publishes in flight, at
//!   `--rate` messages/s overall or as fast as acks allow. Each payload carries its
//!   send time; every subscriber records publish → delivery latency and checks that
//!   seqs arrive exactly +1 at a time. The run ends when every subscriber has all M
//!   messages, or after `--timeout` with whatever arrived.
//! * `publish`: P publishers, M messages, no subscribers: acked publishes/s and ack
//!   latency.
//!
//! Progress goes to stderr; the last line on stdout is one JSON object (the report).
//! Exit status: 0 for a complete, clean run; 3 when the report shows a timeout,
//! missing deliveries, failed publishes or order violations; 1 when the run could not
//! be set up.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod clock;
mod cpu;
mod progress;
mod publish;
mod scenario;
mod stats;
mod subscribe;
mod target;

/// The same allocator as the `herald` binary, so in-process runs measure what ships.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "herald-bench",
    version,
    about = "Herald load generator: prints progress on stderr and one JSON report as the last line on stdout"
)]
struct Cli {
    /// Worker threads of the clients' tokio runtime (default: one per core). The
    /// in-process broker has a runtime of its own (see `--broker-threads`).
    #[arg(long, global = true)]
    worker_threads: Option<usize>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// N subscriber sessions in one group, P publishers: deliveries/s, delivery latency, order.
    Fanout(scenario::FanoutArgs),
    /// P publishers, no subscribers: acked publishes/s and ack latency.
    Publish(scenario::PublishArgs),
}

fn main() -> ExitCode {
    // As the `herald` binary does: the load generator shares the machine's cores. A
    // kernel without the setting only leaves the default, which the report need not say.
    let _ = herald_broker::memory::disable_transparent_huge_pages();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("herald-bench: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = cli.worker_threads {
        if n == 0 {
            anyhow::bail!("--worker-threads must be at least 1");
        }
        builder.worker_threads(n);
    }
    let runtime = builder.build().context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        let (report, teardown) = match cli.scenario {
            Scenario::Fanout(args) => scenario::fanout(args).await?,
            Scenario::Publish(args) => scenario::publish(args).await?,
        };
        let verdict = scenario::verdict(&report);
        if let Err(problems) = &verdict {
            eprintln!("herald-bench: incomplete run: {problems}");
        }
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{report}").context("cannot write the report to stdout")?;
            out.flush().context("cannot write the report to stdout")?;
        }
        teardown.run().await;
        Ok(if verdict.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(3)
        })
    })
}
