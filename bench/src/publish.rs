//! Publishing load: P publisher connections share M messages, each keeping a window of
//! publishes in flight (pipelined on its one connection), optionally paced to a rate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use herald_client::{PublishAck, Publisher};
use tokio::sync::watch;

use crate::clock::{stamped_payload, Clock};
use crate::progress::Counters;
use crate::stats::latency_histogram;

/// Publish errors kept verbatim per publisher (the rest are only counted).
const ERRORS_KEPT: usize = 3;

/// What one publisher does.
#[derive(Debug, Clone, Copy)]
pub struct PublishPlan {
    /// The conversation.
    pub conv: u64,
    /// Messages this publisher sends.
    pub messages: u64,
    /// Its share of `--rate`, messages/s; `None` = as fast as acks allow.
    pub rate: Option<f64>,
    /// Publishes in flight at once.
    pub window: usize,
    /// Payload size.
    pub payload_bytes: usize,
}

/// What one publisher did.
pub struct PublishResult {
    /// Publishes acknowledged (new messages).
    pub acked: u64,
    /// Acknowledged as duplicates (nothing appended; not expected in a bench).
    pub duplicates: u64,
    /// Publishes that failed.
    pub errors: u64,
    /// The first few errors.
    pub error_samples: Vec<String>,
    /// Call → ack latency, microseconds.
    pub ack_latency: Histogram<u64>,
    /// Clock reading of the last ack (0 if none).
    pub last_ack_ns: u64,
    /// Publishes not started or not answered when the run was stopped (timeout).
    pub unfinished: u64,
}

/// Splits `total` among `parts` as evenly as possible.
pub fn split(total: u64, parts: usize) -> Vec<u64> {
    let parts = parts.max(1) as u64;
    (0..parts)
        .map(|i| total / parts + u64::from(i < total % parts))
        .collect()
}

/// A finished publish: (start, end, result).
type Outcome = (u64, u64, Result<PublishAck, herald_client::Error>);

/// One publish: stamps the payload when first polled (so the stamp is the moment the
/// client gets it), returns (start, end, result).
async fn one_publish(
    publisher: &Publisher,
    conv: u64,
    payload_bytes: usize,
    clock: Clock,
) -> Outcome {
    let sent = clock.now_ns();
    let result = publisher
        .publish(conv, stamped_payload(payload_bytes, sent))
        .await;
    (sent, clock.now_ns(), result)
}

/// Runs one publisher's plan from `start` until done or `stop` turns true.
/// `progress` slot `index` follows the acked count.
pub async fn run(
    publisher: Publisher,
    plan: PublishPlan,
    clock: Clock,
    start: Instant,
    index: usize,
    progress: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> (Publisher, PublishResult) {
    let mut result = PublishResult {
        acked: 0,
        duplicates: 0,
        errors: 0,
        error_samples: Vec::new(),
        ack_latency: latency_histogram(),
        last_ack_ns: 0,
        unfinished: 0,
    };
    let window = plan.window.max(1);
    let mut in_flight = FuturesUnordered::new();
    let mut launched = 0u64;
    let due = |k: u64| -> Option<Instant> {
        plan.rate
            .map(|r| start + Duration::from_secs_f64(k as f64 / r))
    };
    {
        let publisher = &publisher;
        let on_done = |(sent, done, outcome): Outcome, result: &mut PublishResult| match outcome {
            Ok(ack) => {
                if ack.duplicate {
                    result.duplicates += 1;
                } else {
                    result.acked += 1;
                }
                result
                    .ack_latency
                    .saturating_record(done.saturating_sub(sent) / 1000);
                result.last_ack_ns = result.last_ack_ns.max(done);
            }
            Err(e) => {
                result.errors += 1;
                if result.error_samples.len() < ERRORS_KEPT {
                    result.error_samples.push(e.to_string());
                }
            }
        };
        loop {
            // Start every publish that is due, up to the window.
            let now = Instant::now();
            while launched < plan.messages && in_flight.len() < window {
                if due(launched).is_some_and(|t| t > now) {
                    break;
                }
                in_flight.push(one_publish(publisher, plan.conv, plan.payload_bytes, clock));
                launched += 1;
            }
            if launched == plan.messages && in_flight.is_empty() {
                break;
            }
            let next_due = if launched < plan.messages && in_flight.len() < window {
                due(launched)
            } else {
                None
            };
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    on_done(done, &mut result);
                    // Take every other ack that is already there before launching more.
                    while let Some(Some(done)) = in_flight.next().now_or_never() {
                        on_done(done, &mut result);
                    }
                    progress.set(index, result.acked);
                }
                _ = sleep_until_opt(next_due), if next_due.is_some() => {}
            }
        }
    }
    result.unfinished = plan.messages - launched + in_flight.len() as u64;
    progress.set(index, result.acked);
    drop(in_flight);
    (publisher, result)
}

async fn sleep_until_opt(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn split_is_even_and_complete() {
        assert_eq!(split(10, 4), vec![3, 3, 2, 2]);
        assert_eq!(split(3, 4), vec![1, 1, 1, 0]);
        assert_eq!(split(8, 1), vec![8]);
        assert_eq!(split(7, 0), vec![7]);
    }
}
