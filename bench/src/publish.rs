//! Publishing load: P publisher connections share M messages, each keeping a window of
//! publishes in flight (pipelined on its one connection), optionally paced to a rate.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::FutureExt;
use hdrhistogram::Histogram;
use herald_client::{PublishAck, PublishInFlight, Publisher};
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

/// The wait for one started publish's ack. One at a time is polled: a publisher's
/// acks arrive in the order its publishes were started (one connection).
type AckWait = Pin<Box<dyn Future<Output = Outcome> + Send>>;

fn ack_wait(sent: u64, publish: PublishInFlight, clock: Clock) -> AckWait {
    Box::pin(async move {
        let result = publish.ack().await;
        (sent, clock.now_ns(), result)
    })
}

/// The front publish's ack; pending forever when nothing is in flight. Cancel-safe:
/// the wait itself stays in `front`.
async fn front_ack(front: &mut Option<AckWait>) -> Outcome {
    match front {
        Some(wait) => wait.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Runs one publisher's plan from `start` until done or `stop` turns true.
/// `progress` slot `index` follows the acked count.
///
/// Publishes are started with [`Publisher::start_publish`] (the payload is stamped
/// then) and their acks taken in order, so a window of W costs no future per
/// publish (`FuturesUnordered` of whole publish calls took ~20% of this process's
/// CPU). The publisher's `requests_in_flight_max` must be at least the window: a
/// start waits for a free slot, which only a taken ack frees.
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
    // Started, ack not yet waited for (in start order), and the one being waited for.
    let mut queued: VecDeque<(u64, PublishInFlight)> = VecDeque::with_capacity(window);
    let mut front: Option<AckWait> = None;
    let mut launched = 0u64;
    let due = |k: u64| -> Option<Instant> {
        plan.rate
            .map(|r| start + Duration::from_secs_f64(k as f64 / r))
    };
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
    // Takes every ack that is already there, in order; leaves the first one still
    // awaited in `front`.
    let take_ready = |front: &mut Option<AckWait>,
                      queued: &mut VecDeque<(u64, PublishInFlight)>,
                      result: &mut PublishResult| {
        while front.is_none() {
            let Some((sent, publish)) = queued.pop_front() else {
                break;
            };
            let mut wait = ack_wait(sent, publish, clock);
            match wait.as_mut().now_or_never() {
                Some(done) => on_done(done, result),
                None => *front = Some(wait),
            }
        }
    };
    loop {
        // Acks first, so their slots are refilled below.
        take_ready(&mut front, &mut queued, &mut result);
        // Start every publish that is due, up to the window.
        let now = Instant::now();
        while launched < plan.messages && queued.len() + usize::from(front.is_some()) < window {
            if due(launched).is_some_and(|t| t > now) {
                break;
            }
            let sent = clock.now_ns();
            let payload = stamped_payload(plan.payload_bytes, sent);
            match publisher.start_publish(plan.conv, payload).await {
                Ok(publish) => queued.push_back((sent, publish)),
                Err(e) => on_done((sent, clock.now_ns(), Err(e)), &mut result),
            }
            launched += 1;
        }
        take_ready(&mut front, &mut queued, &mut result);
        progress.set(index, result.acked);
        if launched == plan.messages && front.is_none() {
            break;
        }
        let in_flight = queued.len() + usize::from(front.is_some());
        let next_due = if launched < plan.messages && in_flight < window {
            due(launched)
        } else {
            None
        };
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            done = front_ack(&mut front), if front.is_some() => {
                front = None;
                on_done(done, &mut result);
            }
            _ = sleep_until_opt(next_due), if next_due.is_some() => {}
        }
    }
    let in_flight = queued.len() + usize::from(front.is_some());
    result.unfinished = plan.messages - launched + in_flight as u64;
    progress.set(index, result.acked);
    drop(front);
    drop(queued);
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
