//! Latency histograms (microseconds) and their JSON summaries.

use std::sync::{Mutex, PoisonError};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Highest latency tracked exactly, in microseconds (1 hour); larger values are
/// recorded as this (saturating), which only a broken run would reach.
const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Significant decimal digits kept (0.1 % relative error).
const SIGNIFICANT_DIGITS: u8 = 3;

/// An empty latency histogram in microseconds.
pub fn latency_histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, LATENCY_US_MAX, SIGNIFICANT_DIGITS) {
        Ok(h) => h,
        // The bounds are constants that hdrhistogram accepts; this is unreachable.
        Err(e) => unreachable!("hdrhistogram refused constant bounds: {e}"),
    }
}

/// `{p50, p99, p999, max, mean, count}` in microseconds; zeros when empty.
pub fn summary(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"p50": 0, "p99": 0, "p999": 0, "max": 0, "mean": 0.0, "count": 0});
    }
    json!({
        "p50": h.value_at_quantile(0.50),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
        "mean": (h.mean() * 10.0).round() / 10.0,
        "count": h.len(),
    })
}

/// Merges `from` into `into` (same bounds, so it cannot fail; a failure would only
/// lose that histogram's samples, and is reported).
pub fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    if let Err(e) = into.add(from) {
        eprintln!("warning: dropping latency samples that do not fit the histogram: {e}");
    }
}

/// Latency histograms shared by many recorders: a fixed number of shards, each behind
/// a mutex, so a thousand subscribers need neither a thousand histograms (about 190 KB
/// each) nor one contended lock. Recorders batch samples and take the lock once per
/// batch.
pub struct ShardedHistogram {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl ShardedHistogram {
    /// `n` shards (at least one).
    pub fn new(n: usize) -> Self {
        ShardedHistogram {
            shards: (0..n.max(1))
                .map(|_| Mutex::new(latency_histogram()))
                .collect(),
        }
    }

    /// Records `samples` (microseconds) into the shard of recorder `index`.
    pub fn record(&self, index: usize, samples: &[u64]) {
        if samples.is_empty() {
            return;
        }
        let mut shard = self.shards[index % self.shards.len()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for &us in samples {
            shard.saturating_record(us);
        }
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = latency_histogram();
        for shard in &self.shards {
            merge(
                &mut all,
                &shard.lock().unwrap_or_else(PoisonError::into_inner),
            );
        }
        all
    }
}

/// Rounds to 3 decimals for the report.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `count / seconds`, 0 when no time passed.
pub fn per_sec(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        (count as f64 / seconds).round()
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_merge() {
        let h = ShardedHistogram::new(4);
        h.record(0, &[10, 20]);
        h.record(5, &[30]);
        let m = h.merged();
        assert_eq!(m.len(), 3);
        assert_eq!(m.max(), 30);
        let s = summary(&m);
        assert_eq!(s["count"], 3);
        assert_eq!(summary(&latency_histogram())["p99"], 0);
    }
}
