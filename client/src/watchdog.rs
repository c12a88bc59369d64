//! The task that watches one connection for a dead node while replies are owed.
//!
//! Owns: the I/O side of [`Liveness`](crate::liveness::Liveness): reading the
//! connection's counters, sending the probes, and closing the connection when the node
//! is silent too long (which also ends a write stuck on a dead node's flow control,
//! so the driver always gets to reconnect). Must not: decide the policy (that is
//! `liveness`), or touch the request table except to ask whether a reply is owed.
//!
//! It sleeps while nothing is owed and wakes when the driver sends a request, so an
//! idle connection costs no timer wake-ups.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::connection::{lock, State};
use crate::liveness::{Liveness, Verdict, LIVENESS_TICK, PROBE};

/// Watches one connection; stops (the task is aborted) when dropped.
pub(crate) struct Watchdog {
    task: JoinHandle<()>,
    sent: Arc<Notify>,
    verdict: Arc<Mutex<Option<String>>>,
}

impl Watchdog {
    /// Starts watching `conn`, generation `generation` of the client's connections.
    pub(crate) fn start(
        conn: quinn::Connection,
        state: Arc<State>,
        generation: u64,
        timeout: Duration,
    ) -> Self {
        let sent = Arc::new(Notify::new());
        let verdict = Arc::new(Mutex::new(None));
        let task = tokio::spawn(watch(
            conn,
            state,
            generation,
            timeout,
            Arc::clone(&sent),
            Arc::clone(&verdict),
        ));
        Watchdog {
            task,
            sent,
            verdict,
        }
    }

    /// The driver sent a request: a reply is owed, watch.
    pub(crate) fn request_sent(&self) {
        self.sent.notify_one();
    }

    /// Why the watchdog closed the connection, if it did.
    pub(crate) fn verdict(&self) -> Option<String> {
        lock(&self.verdict).clone()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Authenticated frames received: what a probe's acknowledgement increments. (The
/// UDP datagram count would also count spoofed packets, which are dropped later.)
fn frames_rx(conn: &quinn::Connection) -> u64 {
    let frames = conn.stats().frame_rx;
    frames.acks.saturating_add(frames.stream)
}

async fn watch(
    conn: quinn::Connection,
    state: Arc<State>,
    generation: u64,
    timeout: Duration,
    sent: Arc<Notify>,
    verdict: Arc<Mutex<Option<String>>>,
) {
    let mut liveness = Liveness::new(timeout, Instant::now(), frames_rx(&conn));
    loop {
        if !state.reply_owed(generation) {
            liveness.observe(Instant::now(), frames_rx(&conn), false, conn.rtt());
            sent.notified().await;
            continue;
        }
        tokio::time::sleep(LIVENESS_TICK).await;
        let owed = state.reply_owed(generation);
        match liveness.observe(Instant::now(), frames_rx(&conn), owed, conn.rtt()) {
            Verdict::Alive => {}
            Verdict::Probe => {
                match conn.send_datagram(bytes::Bytes::from_static(PROBE)) {
                    Ok(()) => {}
                    // A node that takes no datagrams cannot be probed: without probes,
                    // silence proves nothing, so leave it to the QUIC idle timeout.
                    Err(quinn::SendDatagramError::UnsupportedByPeer)
                    | Err(quinn::SendDatagramError::Disabled) => {
                        tracing::debug!("the node takes no datagrams; liveness probing is off");
                        return;
                    }
                    // Gone already: the driver hears it from the connection itself.
                    Err(_) => return,
                }
            }
            Verdict::Dead(silent) => {
                let reason = format!(
                    "the node sent nothing for {} ms while replies were owed (not even \
                     acknowledgements of probes); counting it as dead",
                    silent.as_millis()
                );
                *lock(&verdict) = Some(reason);
                conn.close(quinn::VarInt::from_u32(0), b"node silent");
                return;
            }
        }
    }
}
