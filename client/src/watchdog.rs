//! The task that watches one connection for a dead node: while replies are owed
//! (sessions) or always (publishers).
//!
//! Owns: the I/O side of [`Liveness`](crate::liveness::Liveness): reading the
//! connection's counters, sending the probes, and closing the connection when the node
//! is silent too long (which also ends a write stuck on a dead node's flow control,
//! so the driver always gets to reconnect). Must not: decide the policy (that is
//! `liveness`), or touch the request table except to ask whether a reply is owed.
//!
//! A session's watchdog sleeps while nothing is owed and wakes when the driver sends a
//! request, so an idle device costs no timer wake-ups. A publisher's watchdog also
//! watches while nothing is owed ([`Watch::Always`]): a publisher's writes go to
//! whichever of its connections the cluster map names, often one that was idle, and
//! on an idle connection to a node that died meanwhile a write would otherwise wait a
//! whole liveness timeout from the moment it is sent, not from the moment of the
//! death (measured: those were the ~2 s leader-kill failovers). The cost is one 1-byte
//! datagram per [`LIVENESS_TICK`] in which the node sent nothing, and its ACK, per
//! publisher connection: backend services hold a few, devices none.
//!
//! A node found dead is dead for every connection of this process: the verdict is
//! broadcast ([`Death`]), and each other watchdog whose connection goes to the same
//! address and was opened before the silence began closes its connection too. Why: a
//! publisher holds several connections (its seed connection and one per group
//! leader), often two to the same node. Without the notice, the idle one learns of the
//! death only when the next write, routed to it, has waited out a liveness timeout of
//! its own — a second timeout in a row (measured: leader kill -9 → first ack went from
//! ~1.2 s to ~2.0 s in those rounds). Before closing, the other watchdog sends a
//! probe of its own and waits a tick plus three round trips: only the node, not one
//! connection's path, is judged dead for all. A connection opened after the silence
//! began heard from the node since (its handshake), so it may be talking to a
//! restarted process on the same address, and it is left alone. Each notice wakes
//! every watchdog of the process once (idle sessions included): a cost paid per node
//! death, not per message. Must not: re-broadcast a notice it received, or close a
//! connection on a notice without its own unanswered probe.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{broadcast, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::connection::{lock, State};
use crate::liveness::{Liveness, Verdict, LIVENESS_TICK, PROBE};

/// When a watchdog watches its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Watch {
    /// Only while a reply is owed (sessions: idle devices cost nothing).
    WhileOwed,
    /// All the time (publishers: see the module documentation).
    Always,
}

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
        when: Watch,
    ) -> Self {
        let sent = Arc::new(Notify::new());
        let verdict = Arc::new(Mutex::new(None));
        let task = tokio::spawn(watch(
            conn,
            state,
            generation,
            timeout,
            when,
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

/// Death notices not yet read by a watchdog, at most. At the bound a slow watchdog
/// misses the oldest ones (its `recv` reports the lag, and it reads on): it then
/// finds out for itself, at its own liveness timeout, as it would without notices.
const DEATHS_QUEUED_MAX: usize = 64;

/// One watchdog's verdict, for the others of this process.
#[derive(Debug, Clone, Copy)]
struct Death {
    /// The node's address.
    addr: SocketAddr,
    /// Since when it has been silent.
    silent_since: Instant,
}

/// The process's channel of death notices.
fn deaths() -> &'static broadcast::Sender<Death> {
    static DEATHS: OnceLock<broadcast::Sender<Death>> = OnceLock::new();
    DEATHS.get_or_init(|| broadcast::channel(DEATHS_QUEUED_MAX).0)
}

/// Whether `notice` is about the node behind a connection to `addr` opened at
/// `opened_at`: same address, and opened before the node fell silent.
fn concerns(notice: &Death, addr: SocketAddr, opened_at: Instant) -> bool {
    notice.addr == addr && opened_at < notice.silent_since
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
    when: Watch,
    sent: Arc<Notify>,
    verdict: Arc<Mutex<Option<String>>>,
) {
    let watched = || when == Watch::Always || state.reply_owed(generation);
    let opened_at = Instant::now();
    let addr = conn.remote_address();
    // Subscribed before looking at anything, so no notice sent from now on is missed.
    let mut notices = deaths().subscribe();
    let mut liveness = Liveness::new(timeout, opened_at, frames_rx(&conn));
    // One steady tick, not a sleep per pass: a notice about another node must not
    // push this connection's next check back.
    let mut tick = tokio::time::interval(LIVENESS_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let owed = watched();
        if !owed {
            liveness.observe(Instant::now(), frames_rx(&conn), false, conn.rtt());
        }
        let notice = tokio::select! {
            _ = sent.notified(), if !owed => continue,
            _ = tick.tick(), if owed => None,
            notice = notices.recv() => match notice {
                Ok(notice) => Some(notice),
                // Missed some: the ones that mattered are found out the slow way.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if let Some(notice) = notice {
            if concerns(&notice, addr, opened_at) && !answers_a_probe(&conn).await {
                let reason = format!(
                    "another connection to {addr} found the node silent for {} ms, and \
                     this one's probe went unanswered; counting it as dead",
                    notice.silent_since.elapsed().as_millis()
                );
                *lock(&verdict) = Some(reason);
                conn.close(quinn::VarInt::from_u32(0), b"node silent");
                return;
            }
            continue;
        }
        let owed = watched();
        match liveness.observe(Instant::now(), frames_rx(&conn), owed, conn.rtt()) {
            Verdict::Alive => {}
            Verdict::Probe => {
                if !send_probe(&conn) {
                    return;
                }
            }
            Verdict::Dead(silent) => {
                let reason = format!(
                    "the node sent nothing for {} ms while watched (not even \
                     acknowledgements of probes); counting it as dead",
                    silent.as_millis()
                );
                *lock(&verdict) = Some(reason);
                conn.close(quinn::VarInt::from_u32(0), b"node silent");
                let now = Instant::now();
                // Nobody listening is fine: there is no other connection to tell.
                let _ = deaths().send(Death {
                    addr,
                    silent_since: now.checked_sub(silent).unwrap_or(now),
                });
                return;
            }
        }
    }
}

/// Sends one probe; false when this connection cannot be probed (then silence proves
/// nothing, and the watchdog stops, leaving it to the QUIC idle timeout) or is gone
/// already (the driver hears that from the connection itself).
fn send_probe(conn: &quinn::Connection) -> bool {
    match conn.send_datagram(bytes::Bytes::from_static(PROBE)) {
        Ok(()) => true,
        Err(quinn::SendDatagramError::UnsupportedByPeer)
        | Err(quinn::SendDatagramError::Disabled) => {
            tracing::debug!("the node takes no datagrams; liveness probing is off");
            false
        }
        Err(_) => false,
    }
}

/// Whether the node behind `conn` still answers: a probe, then up to a tick plus three
/// round trips for anything from it (a live node's QUIC stack acknowledges within its
/// ACK delay, 25 ms). Asked before acting on another connection's verdict, because
/// that connection's own path may be what failed (each connection has its own UDP
/// socket). A connection that cannot be probed counts as answering: no verdict is
/// taken on it without evidence of its own.
async fn answers_a_probe(conn: &quinn::Connection) -> bool {
    let before = frames_rx(conn);
    if !send_probe(conn) {
        return true;
    }
    tokio::time::sleep(LIVENESS_TICK + 3 * conn.rtt()).await;
    frames_rx(conn) != before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_notice_concerns_older_connections_to_the_same_node_only() {
        let t0 = Instant::now();
        let notice = Death {
            addr: addr(7000),
            silent_since: t0 + Duration::from_millis(500),
        };
        // Opened before the silence, same node: dead too.
        assert!(concerns(&notice, addr(7000), t0));
        // Another node.
        assert!(!concerns(&notice, addr(7001), t0));
        // Opened after the silence began: may be a restarted node on the same port.
        assert!(!concerns(
            &notice,
            addr(7000),
            t0 + Duration::from_millis(600)
        ));
    }
}
