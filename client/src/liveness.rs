//! Telling a dead node from a slow one while replies are owed.
//!
//! Owns: the decision, from what the connection received and whether a reply is owed,
//! to do nothing, to send a probe, or to declare the node dead. Must not: do I/O or
//! read a clock (the watchdog in `watchdog.rs` passes `now`, the count of frames
//! received and the round-trip time in, and sends the probe), so the policy is tested
//! without sockets or sleeps.
//!
//! Why: a node killed without a word (`kill -9`, power cut) sends nothing more, and
//! QUIC notices only at the idle timeout (30 s by default, so that idle devices stay
//! cheap). A publisher waiting on an ack cannot wait that long. But "no reply yet" is
//! not "dead": a live node may hold a publish for a second while its cluster elects a
//! leader. So the probe asks the node's QUIC stack, not the application: an
//! unreliable datagram is ack-eliciting, and a live node's stack acknowledges it within
//! its ACK delay (25 ms) however busy the broker is with the request itself. Silence
//! for [`DEFAULT_LIVENESS_TIMEOUT`] while a reply is owed and probes are going out
//! means the node (or the path to it) is gone: the driver drops the connection and
//! reconnects to the next seed, re-sending what is owed (publishes keep their keys).
//!
//! Cost: for a session, nothing while no reply is owed (the watchdog sleeps until a
//! request goes out, so idle sessions neither wake nor send), and while one is owed, a
//! check per [`LIVENESS_TICK`] and one 1-byte datagram per tick only when the node has
//! been silent for that long. A publisher's connections are watched as if a reply
//! were always owed (see `watchdog.rs` for why), at that per-tick cost.
//!
//! Two guards against calling a live node dead: the timeout is at least three round
//! trips (a slow path is not a dead node), and after a gap between checks (this
//! process stalled, or nothing was owed) the silence is counted afresh, since
//! what the node sent meanwhile may not have been processed yet.

use std::time::Duration;

use tokio::time::Instant;

/// How often the driver consults [`Liveness`] while a connection is up.
pub const LIVENESS_TICK: Duration = Duration::from_millis(100);
/// Default silence, while a reply is owed, after which the node counts as dead.
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_millis(750);
/// The smallest liveness timeout accepted: a few probe round trips.
pub const LIVENESS_TIMEOUT_MIN: Duration = Duration::from_millis(300);
/// The probe's bytes (the broker discards them).
pub const PROBE: &[u8] = &[0];

/// What the driver should do after a [`Liveness::observe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The node was heard from recently, or nothing is owed.
    Alive,
    /// A reply is owed and the node has been quiet for a tick: send a probe.
    Probe,
    /// A reply is owed and the node has been silent this long despite probes.
    Dead(Duration),
}

/// Silence tracking for one connection.
#[derive(Debug)]
pub struct Liveness {
    timeout: Duration,
    /// Frames received (authenticated), as last observed.
    frames_rx: u64,
    /// When `frames_rx` last grew (or the tracking started).
    heard_at: Instant,
    /// When `observe` last ran.
    observed_at: Instant,
    /// Since when a reply has been owed without a break; `None` while none is owed.
    owed_since: Option<Instant>,
}

impl Liveness {
    /// Starts tracking at `now`, with `frames_rx` received so far.
    pub fn new(timeout: Duration, now: Instant, frames_rx: u64) -> Self {
        Liveness {
            timeout,
            frames_rx,
            heard_at: now,
            observed_at: now,
            owed_since: None,
        }
    }

    /// Takes in the connection's count of received frames, whether any reply is owed
    /// (or, for a connection watched all the time, true), and the current round-trip
    /// estimate.
    pub fn observe(
        &mut self,
        now: Instant,
        frames_rx: u64,
        reply_owed: bool,
        rtt: Duration,
    ) -> Verdict {
        let gap = now.saturating_duration_since(self.observed_at);
        self.observed_at = now;
        if frames_rx != self.frames_rx {
            self.frames_rx = frames_rx;
            self.heard_at = now;
        }
        if !reply_owed {
            self.owed_since = None;
            return Verdict::Alive;
        }
        if gap > 2 * LIVENESS_TICK {
            // Not looked at for a while: count the silence from now.
            self.owed_since = Some(now);
        }
        let owed_since = *self.owed_since.get_or_insert(now);
        // Silence only counts from when a reply became owed: before that, nothing asked
        // the node to say anything.
        let silent = now.saturating_duration_since(self.heard_at.max(owed_since));
        if silent >= self.timeout.max(3 * rtt) {
            Verdict::Dead(silent)
        } else if now.saturating_duration_since(self.heard_at) >= LIVENESS_TICK {
            Verdict::Probe
        } else {
            Verdict::Alive
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(750);
    /// A loopback round trip.
    const RTT: Duration = Duration::from_micros(200);

    /// Observes every tick from `from_ms` to `to_ms` (inclusive) with nothing heard;
    /// the last verdict.
    fn silent_ticks(l: &mut Liveness, t0: Instant, from_ms: u64, to_ms: u64) -> Verdict {
        let mut verdict = Verdict::Alive;
        for at in (from_ms..=to_ms).step_by(100) {
            verdict = l.observe(t0 + ms(at), 5, true, RTT);
        }
        verdict
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nothing_owed_is_never_dead_however_long_the_silence() {
        let t0 = Instant::now();
        let mut l = Liveness::new(TIMEOUT, t0, 5);
        assert_eq!(l.observe(t0 + ms(60_000), 5, false, RTT), Verdict::Alive);
    }

    #[test]
    fn a_silent_node_is_probed_then_declared_dead_after_the_timeout() {
        let t0 = Instant::now();
        let mut l = Liveness::new(TIMEOUT, t0, 5);
        assert_eq!(l.observe(t0 + ms(50), 5, true, RTT), Verdict::Alive);
        assert_eq!(silent_ticks(&mut l, t0, 150, 750), Verdict::Probe);
        assert_eq!(
            l.observe(t0 + ms(810), 5, true, RTT),
            Verdict::Dead(ms(760))
        );
    }

    #[test]
    fn acks_of_the_probes_keep_a_slow_node_alive() {
        // The node holds the reply for seconds (an election) but its QUIC stack answers.
        let t0 = Instant::now();
        let mut l = Liveness::new(TIMEOUT, t0, 0);
        for tick in 1..=50u64 {
            let verdict = l.observe(t0 + ms(100 * tick), tick, true, RTT);
            assert_eq!(verdict, Verdict::Alive, "tick {tick}");
        }
    }

    #[test]
    fn silence_counts_from_when_a_reply_became_owed() {
        // Quiet for a minute with nothing owed, then a request: the node gets the
        // whole timeout to answer it.
        let t0 = Instant::now();
        let mut l = Liveness::new(TIMEOUT, t0, 5);
        assert_eq!(l.observe(t0 + ms(60_000), 5, false, RTT), Verdict::Alive);
        assert_eq!(silent_ticks(&mut l, t0, 60_100, 60_800), Verdict::Probe);
        assert_eq!(
            l.observe(t0 + ms(60_850), 5, true, RTT),
            Verdict::Dead(ms(750))
        );
    }

    #[test]
    fn a_break_in_what_is_owed_restarts_the_count() {
        let t0 = Instant::now();
        let mut l = Liveness::new(TIMEOUT, t0, 5);
        assert_eq!(silent_ticks(&mut l, t0, 100, 600), Verdict::Probe);
        assert_eq!(l.observe(t0 + ms(700), 5, false, RTT), Verdict::Alive);
        assert_eq!(silent_ticks(&mut l, t0, 800, 1_500), Verdict::Probe);
        assert_eq!(
            l.observe(t0 + ms(1_550), 5, true, RTT),
            Verdict::Dead(ms(750))
        );
    }

    #[test]
    fn a_stall_of_this_process_restarts_the_count() {
        // The checks stop for two seconds (a blocked runtime): the node's answers to the
        // probes may be waiting unprocessed, so the next check must not call it dead.
        let t0 = Instant::now();
        let mut l = Liveness::new(TIMEOUT, t0, 5);
        assert_eq!(silent_ticks(&mut l, t0, 100, 500), Verdict::Probe);
        assert_eq!(l.observe(t0 + ms(2_500), 5, true, RTT), Verdict::Probe);
        assert_eq!(silent_ticks(&mut l, t0, 2_600, 3_200), Verdict::Probe);
        assert_eq!(
            l.observe(t0 + ms(3_250), 5, true, RTT),
            Verdict::Dead(ms(750))
        );
    }

    #[test]
    fn a_long_round_trip_stretches_the_timeout() {
        let t0 = Instant::now();
        let mut l = Liveness::new(TIMEOUT, t0, 5);
        let rtt = ms(400);
        let mut verdict = Verdict::Alive;
        for at in (100..=1_200).step_by(100) {
            verdict = l.observe(t0 + ms(at), 5, true, rtt);
        }
        assert_eq!(
            verdict,
            Verdict::Probe,
            "1.1 s is below three 400 ms round trips"
        );
        assert_eq!(
            l.observe(t0 + ms(1_300), 5, true, rtt),
            Verdict::Dead(ms(1_200))
        );
    }
}
