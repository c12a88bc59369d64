//! A delivery checker for fault tests: a steady publisher, subscribers on chosen nodes,
//! and [`Checker::check`], which verifies what users rely on against every node.
//!
//! Owns: publishing `p-<n>` (n = 1, 2, …) one at a time to one conversation and recording
//! every *acked* `(seq, payload)` with when it was sent and acked; recording every
//! delivery of each subscriber; and the verdict. Must not: count anything as acked that
//! the broker did not acknowledge, or tolerate a gap, a duplicate or a reordering.
//!
//! The rules [`Checker::check`] applies:
//! * per node, read from that node only: the history is gapless `1..=last`, in order,
//!   holds every acked message exactly once at its acked seq, and no payload twice;
//! * every node holds the same message at each seq;
//! * acked seqs grow with n (the publisher waits for each ack before the next publish);
//! * every subscriber's stream is gapless from seq 1, in order, duplicate-free, agrees
//!   with the history, and reaches at least the last acked seq.
//!
//! A message whose publish was never acked may be stored (at most once) or not.
//!
//! It runs against any cluster that implements [`Nodes`]: local processes
//! ([`Cluster`](crate::cluster::Cluster)) or containers
//! ([`Compose`](crate::compose::Compose)).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use herald_client::{ConvKind, IdempotencyKey, Message, Publisher, Session, SessionEvent};
use tokio::task::JoinHandle;

use crate::target::Nodes;
use crate::DEADLINE;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How the steady publisher keys its publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    /// Caller key `p-<n>`; a failed publish is retried with the same key until acked,
    /// so every n is acked exactly once (possibly as `duplicate`).
    Caller,
    /// The client's automatic producer key; the client retries across reconnects, and
    /// a publish that still fails is given up (it may or may not be stored).
    Producer,
}

/// One acknowledged publish.
#[derive(Debug, Clone)]
pub struct Acked {
    /// The publisher's counter: the payload is `p-<n>`.
    pub n: u64,
    /// The acked seq.
    pub seq: u64,
    /// The payload.
    pub payload: String,
    /// When the first attempt was sent.
    pub started: Instant,
    /// When the ack arrived.
    pub at: Instant,
    /// The broker said it had seen the key before (a retry of a stored message).
    pub duplicate: bool,
}

/// Publishes `p-1`, `p-2`, … to one conversation, one at a time, until stopped.
pub struct SteadyPublisher {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    errors: Arc<Mutex<Vec<String>>>,
    task: Option<JoinHandle<()>>,
    publisher: Publisher,
}

/// Errors kept for the report (the first ones and the last ones).
const ERRORS_KEPT: usize = 50;

impl SteadyPublisher {
    /// Starts publishing to `conv` through `publisher`.
    pub fn start(publisher: Publisher, conv: u64, keys: Keys) -> SteadyPublisher {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(publish_loop(
            publisher.clone(),
            conv,
            keys,
            stop.clone(),
            acked.clone(),
            errors.clone(),
        ));
        SteadyPublisher {
            stop,
            acked,
            errors,
            task: Some(task),
            publisher,
        }
    }

    /// The publisher's connection, as its Debug output shows it (session id, address).
    pub fn connection(&self) -> String {
        format!("{:?}", self.publisher)
    }

    /// Acks so far.
    pub fn acked_count(&self) -> usize {
        lock(&self.acked).len()
    }

    /// Every ack so far, in publish order.
    pub fn acked(&self) -> Vec<Acked> {
        lock(&self.acked).clone()
    }

    /// Publish errors so far (the client already retried each).
    pub fn errors(&self) -> Vec<String> {
        lock(&self.errors).clone()
    }

    /// Waits until at least `count` publishes are acked.
    pub async fn wait_acked(&self, count: usize, deadline: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + deadline;
        while self.acked_count() < count {
            if Instant::now() > until {
                bail!(
                    "only {} of {count} publishes acked after {deadline:?}; errors: {:?}",
                    self.acked_count(),
                    self.errors()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// The first ack of a publish sent at or after `t`: (that ack, time from `t`).
    pub fn first_ack_sent_after(&self, t: Instant) -> Option<(Acked, Duration)> {
        lock(&self.acked)
            .iter()
            .find(|a| a.started >= t)
            .map(|a| (a.clone(), a.at.duration_since(t)))
    }

    /// Waits for [`SteadyPublisher::first_ack_sent_after`].
    pub async fn wait_ack_sent_after(
        &self,
        t: Instant,
        deadline: Duration,
    ) -> anyhow::Result<(Acked, Duration)> {
        let until = Instant::now() + deadline;
        loop {
            if let Some(found) = self.first_ack_sent_after(t) {
                return Ok(found);
            }
            if Instant::now() > until {
                bail!(
                    "no publish sent after the fault was acked within {deadline:?} ({} acked in all; last errors: {:?})",
                    self.acked_count(),
                    self.errors().iter().rev().take(5).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops after the publish in flight (which, with caller keys, is retried until
    /// acked or [`DEADLINE`] passes) and closes the connection.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Release);
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE + Duration::from_secs(25), task)
                .await
                .context("the publisher did not stop in time")?
                .context("the publisher task panicked")?;
            self.publisher.clone().close().await;
        }
        Ok(())
    }
}

async fn publish_loop(
    publisher: Publisher,
    conv: u64,
    keys: Keys,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    errors: Arc<Mutex<Vec<String>>>,
) {
    let record_error = |n: u64, e: &dyn std::fmt::Display| {
        let mut errors = lock(&errors);
        if errors.len() >= ERRORS_KEPT {
            errors.remove(ERRORS_KEPT / 2);
        }
        errors.push(format!("p-{n}: {e}"));
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        n += 1;
        let payload = format!("p-{n}");
        let started = Instant::now();
        let result = match keys {
            Keys::Caller => {
                // Retry the same key until acked; give up only when stopping and the
                // deadline has passed.
                loop {
                    let key = IdempotencyKey::Caller(payload.clone());
                    match publisher.publish_with_key(conv, key, payload.clone()).await {
                        Ok(ack) => break Some(ack),
                        Err(e) => {
                            record_error(n, &e);
                            if stop.load(Ordering::Acquire) && started.elapsed() > DEADLINE {
                                break None;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
            Keys::Producer => match publisher.publish(conv, payload.clone()).await {
                Ok(ack) => Some(ack),
                Err(e) => {
                    record_error(n, &e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    None
                }
            },
        };
        if let Some(ack) = result {
            lock(&acked).push(Acked {
                n,
                seq: ack.seq,
                payload,
                started,
                at: Instant::now(),
                duplicate: ack.duplicate,
            });
        }
    }
}

/// What one subscriber saw.
#[derive(Debug, Default)]
struct Seen {
    messages: Vec<Message>,
    notes: Vec<String>,
    failure: Option<String>,
    ended: bool,
}

/// A session subscribed to one conversation from seq 1, recording every delivery.
pub struct Subscriber {
    /// For messages: "user 2 on node 3".
    pub name: String,
    seen: Arc<Mutex<Seen>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Subscriber {
    /// Connects a session with `config` (whose seeds are every node, `pin_addr`'s
    /// first), insisting that the first connection lands on `pin_addr` (the client
    /// starts at a random seed, so it reconnects until it does), subscribes to `conv`
    /// from seq 1 and records deliveries until stopped. After a failure of its node it
    /// reconnects to another seed and resumes from its cursor.
    pub async fn start(
        name: String,
        config: herald_client::ClientConfig,
        conv: u64,
        pin_addr: Option<String>,
    ) -> anyhow::Result<Subscriber> {
        let mut attempts = 0;
        let session = loop {
            attempts += 1;
            let session = Session::connect(config.clone())
                .await
                .with_context(|| format!("{name}: cannot connect (attempt {attempts})"))?;
            match &pin_addr {
                // The session's Debug output names the address it is connected to.
                Some(addr) if !format!("{session:?}").contains(&format!("{addr:?}")) => {
                    session.close().await;
                    anyhow::ensure!(attempts < 100, "{name}: never landed on {addr}");
                }
                _ => break session,
            }
        };
        session
            .subscribe(conv, Some(1))
            .await
            .with_context(|| format!("{name}: cannot subscribe"))?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(receive(session, seen.clone(), stop_rx));
        Ok(Subscriber {
            name,
            seen,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// The highest seq received so far (0 for none).
    pub fn last_seq(&self) -> u64 {
        lock(&self.seen).messages.last().map_or(0, |m| m.seq)
    }

    /// Reconnects and other notices so far.
    pub fn notes(&self) -> Vec<String> {
        lock(&self.seen).notes.clone()
    }

    /// Waits until the subscriber has received seq `seq` (or ended).
    pub async fn wait_seq(&self, seq: u64, deadline: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + deadline;
        loop {
            {
                let seen = lock(&self.seen);
                if seen.messages.last().is_some_and(|m| m.seq >= seq) {
                    return Ok(());
                }
                if let Some(f) = &seen.failure {
                    bail!("{}: the session failed: {f}", self.name);
                }
                if seen.ended {
                    bail!("{}: the session ended before seq {seq}", self.name);
                }
            }
            if Instant::now() > until {
                bail!(
                    "{}: received up to seq {} only, after {deadline:?} waiting for {seq}; notes: {:?}",
                    self.name,
                    self.last_seq(),
                    self.notes()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops receiving and closes the session.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(DEADLINE, task).await;
        }
    }

    /// Checks the stream against the reference history (`history[i]` holds seq i+1):
    /// gapless from 1, in order, no duplicate, same payloads, and at least up to
    /// `last_acked`.
    fn verify(&self, history: &[Message], last_acked: u64) -> anyhow::Result<usize> {
        let seen = lock(&self.seen);
        if let Some(f) = &seen.failure {
            bail!("{}: the session failed: {f}", self.name);
        }
        let notes: Vec<&String> = seen
            .notes
            .iter()
            .filter(|n| n.starts_with("truncated"))
            .collect();
        anyhow::ensure!(
            notes.is_empty(),
            "{}: unexpected truncation: {notes:?}",
            self.name
        );
        for (i, m) in seen.messages.iter().enumerate() {
            let expected = i as u64 + 1;
            if m.seq != expected {
                let what = if m.seq < expected {
                    "duplicate or reordered"
                } else {
                    "gap"
                };
                bail!(
                    "{}: {what}: delivery #{} has seq {} (expected {expected}); around it: {:?}; notes: {:?}",
                    self.name,
                    i + 1,
                    m.seq,
                    seen.messages[i.saturating_sub(3)..(i + 3).min(seen.messages.len())]
                        .iter()
                        .map(|m| (m.seq, String::from_utf8_lossy(&m.payload).into_owned()))
                        .collect::<Vec<_>>(),
                    seen.notes
                );
            }
            let Some(h) = history.get(i) else {
                bail!(
                    "{}: received seq {} with payload {:?}, beyond the nodes' history (last {})",
                    self.name,
                    m.seq,
                    String::from_utf8_lossy(&m.payload),
                    history.len()
                );
            };
            anyhow::ensure!(
                h.payload == m.payload,
                "{}: seq {} delivered {:?} but history holds {:?}",
                self.name,
                m.seq,
                String::from_utf8_lossy(&m.payload),
                String::from_utf8_lossy(&h.payload)
            );
        }
        let last = seen.messages.last().map_or(0, |m| m.seq);
        anyhow::ensure!(
            last >= last_acked,
            "{}: received up to seq {last}, but seq {last_acked} was acked",
            self.name
        );
        Ok(seen.messages.len())
    }
}

async fn receive(
    mut session: Session,
    seen: Arc<Mutex<Seen>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let event = tokio::select! {
            _ = &mut stop => break,
            event = session.next() => event,
        };
        let mut seen = lock(&seen);
        match event {
            Some(Ok(SessionEvent::Message(m))) => seen.messages.push(m),
            Some(Ok(SessionEvent::Truncated {
                conv,
                requested_from,
                first_available_seq,
            })) => seen.notes.push(format!(
                "truncated conv {conv}: asked from {requested_from}, first available {first_available_seq}"
            )),
            Some(Ok(other)) => seen.notes.push(format!("{other:?}")),
            Some(Err(e)) => {
                seen.failure = Some(e.to_string());
                seen.ended = true;
                return;
            }
            None => {
                seen.ended = true;
                return;
            }
        }
    }
    session.close().await;
}

/// Reads the whole history of `conv` from node `k` alone, paging from seq 1, and waits
/// (within `deadline`) until it reaches at least `at_least`.
pub async fn read_history<N: Nodes + ?Sized>(
    cluster: &N,
    k: u16,
    conv: u64,
    at_least: u64,
    deadline: Duration,
) -> anyhow::Result<Vec<Message>> {
    let token = cluster.service_token("checker")?;
    let reader = Publisher::connect(cluster.client_config(&token, &[k])?)
        .await
        .with_context(|| format!("cannot connect to node {k} to read its history"))?;
    let until = Instant::now() + deadline;
    let result = loop {
        let history = read_all(&reader, k, conv).await;
        match history {
            Ok(h) if h.len() as u64 >= at_least => break Ok(h),
            Ok(h) if Instant::now() > until => {
                break Err(anyhow::anyhow!(
                    "node {k}: history of conversation {conv} ends at seq {} after {deadline:?}, but seq {at_least} was acked",
                    h.len()
                ))
            }
            Err(e) if Instant::now() > until => break Err(e),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    reader.close().await;
    result
}

async fn read_all(reader: &Publisher, k: u16, conv: u64) -> anyhow::Result<Vec<Message>> {
    let mut messages: Vec<Message> = Vec::new();
    let mut from = 1;
    loop {
        let page = reader
            .history(conv, from, 1000)
            .await
            .with_context(|| format!("node {k}: reading history from seq {from}"))?;
        anyhow::ensure!(
            page.first_seq <= 1,
            "node {k}: history starts at seq {} (truncated), expected 1",
            page.first_seq
        );
        for m in page.messages {
            let expected = messages.len() as u64 + 1;
            anyhow::ensure!(
                m.seq == expected,
                "node {k}: history has seq {} where seq {expected} belongs ({} after {:?})",
                m.seq,
                if m.seq < expected {
                    "duplicate or reordered"
                } else {
                    "gap"
                },
                messages.last().map(|m| m.seq)
            );
            messages.push(m);
        }
        let next = messages.len() as u64 + 1;
        if next >= page.next_seq {
            return Ok(messages);
        }
        anyhow::ensure!(
            next > from,
            "node {k}: history page from seq {from} is empty but next_seq is {}",
            page.next_seq
        );
        from = next;
    }
}

/// A steady publisher and subscribers on one conversation, and the verdict.
pub struct Checker {
    /// The conversation.
    pub conv: u64,
    /// The publisher.
    pub publisher: SteadyPublisher,
    /// The subscribers.
    pub subscribers: Vec<Subscriber>,
}

/// What [`Checker::check`] verified.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Publishes acked.
    pub acked: usize,
    /// Acks that were retries of a stored message.
    pub duplicate_acks: usize,
    /// Messages in the history (acked or not).
    pub stored: usize,
    /// Deliveries per subscriber.
    pub delivered: Vec<usize>,
    /// Publish errors the client gave up on (each retried).
    pub publish_errors: usize,
}

impl Checker {
    /// Creates group `conv` with members 1..=len(subscriber_nodes), starts the steady
    /// publisher (seeds: every node) and one subscriber per entry of `subscriber_nodes`
    /// (user i on that node, reconnecting to any node).
    pub async fn start<N: Nodes + ?Sized>(
        cluster: &N,
        conv: u64,
        subscriber_nodes: &[u16],
        keys: Keys,
    ) -> anyhow::Result<Checker> {
        Self::start_with(cluster, conv, subscriber_nodes, keys, &cluster.ids()).await
    }

    /// Like [`Checker::start`], with the publisher's seeds limited to `publisher_seeds`
    /// (e.g. to keep it off a node that will be paused).
    pub async fn start_with<N: Nodes + ?Sized>(
        cluster: &N,
        conv: u64,
        subscriber_nodes: &[u16],
        keys: Keys,
        publisher_seeds: &[u16],
    ) -> anyhow::Result<Checker> {
        let ids = cluster.ids();
        let service = cluster.service_token("steady")?;
        let publisher =
            Publisher::connect(cluster.client_config(&service, publisher_seeds)?).await?;
        let members: Vec<u64> = (1..=subscriber_nodes.len() as u64).collect();
        publisher
            .create_conversation(conv, ConvKind::Group, &members)
            .await
            .context("cannot create the checked conversation")?;
        let mut subscribers = Vec::new();
        for (i, node) in subscriber_nodes.iter().enumerate() {
            let user = i as u64 + 1;
            let mut seeds = vec![*node];
            seeds.extend(ids.iter().filter(|k| *k != node));
            let config = cluster.client_config(&cluster.user_token(user)?, &seeds)?;
            subscribers.push(
                Subscriber::start(
                    format!("subscriber user {user} (started on node {node})"),
                    config,
                    conv,
                    Some(cluster.addr(*node).to_string()),
                )
                .await?,
            );
        }
        Ok(Checker {
            conv,
            publisher: SteadyPublisher::start(publisher, conv, keys),
            subscribers,
        })
    }

    /// Waits until at least `more` further publishes are acked.
    pub async fn wait_more_acks(&self, more: usize) -> anyhow::Result<()> {
        let target = self.publisher.acked_count() + more;
        self.publisher.wait_acked(target, DEADLINE).await
    }

    /// Stops publishing, then verifies every rule (see the module docs) on `nodes`
    /// (each read alone) and on every subscriber; stops the subscribers.
    pub async fn check<N: Nodes + ?Sized>(
        &mut self,
        cluster: &N,
        nodes: &[u16],
    ) -> anyhow::Result<Summary> {
        self.publisher.stop().await?;
        let acked = self.publisher.acked();
        anyhow::ensure!(!acked.is_empty(), "nothing was acked");

        // Acked seqs grow with n; a duplicate ack only for a retried key.
        for pair in acked.windows(2) {
            anyhow::ensure!(
                pair[1].seq > pair[0].seq,
                "{} was acked as seq {} after {} was acked as seq {}: acks must follow publish order",
                pair[1].payload,
                pair[1].seq,
                pair[0].payload,
                pair[0].seq
            );
        }
        let last_acked = acked.iter().map(|a| a.seq).max().unwrap_or(0);

        let mut reference: Option<(u16, Vec<Message>)> = None;
        for &k in nodes {
            let history = read_history(cluster, k, self.conv, last_acked, DEADLINE).await?;
            verify_history(k, &history, &acked)?;
            match &reference {
                None => reference = Some((k, history)),
                Some((r, ref_history)) => {
                    let common = ref_history.len().min(history.len());
                    for i in 0..common {
                        anyhow::ensure!(
                            ref_history[i].payload == history[i].payload,
                            "seq {}: node {r} holds {:?}, node {k} holds {:?}",
                            i + 1,
                            String::from_utf8_lossy(&ref_history[i].payload),
                            String::from_utf8_lossy(&history[i].payload)
                        );
                    }
                    // Let the longer history be the reference for subscribers.
                    if history.len() > ref_history.len() {
                        reference = Some((k, history));
                    }
                }
            }
        }
        let (_, history) = reference.context("no node to check")?;

        let mut delivered = Vec::new();
        for s in &self.subscribers {
            s.wait_seq(last_acked, DEADLINE).await?;
        }
        for s in &mut self.subscribers {
            s.stop().await;
            delivered.push(s.verify(&history, last_acked)?);
        }
        Ok(Summary {
            acked: acked.len(),
            duplicate_acks: acked.iter().filter(|a| a.duplicate).count(),
            stored: history.len(),
            delivered,
            publish_errors: self.publisher.errors().len(),
        })
    }
}

/// Every acked message is in `history` (gapless from seq 1 already) exactly once, at its
/// acked seq; no payload appears twice.
fn verify_history(k: u16, history: &[Message], acked: &[Acked]) -> anyhow::Result<()> {
    let mut by_payload: HashMap<&[u8], u64> = HashMap::new();
    for m in history {
        if let Some(first) = by_payload.insert(&m.payload, m.seq) {
            bail!(
                "node {k}: payload {:?} is stored twice, at seq {first} and seq {} (exactly-once append broken)",
                String::from_utf8_lossy(&m.payload),
                m.seq
            );
        }
    }
    for a in acked {
        match history.get((a.seq as usize).wrapping_sub(1)) {
            Some(m) if m.payload == a.payload.as_bytes() => {}
            Some(m) => bail!(
                "node {k}: {} was acked as seq {} but seq {} holds {:?} ({} is at seq {:?})",
                a.payload,
                a.seq,
                a.seq,
                String::from_utf8_lossy(&m.payload),
                a.payload,
                by_payload.get(a.payload.as_bytes())
            ),
            None => bail!(
                "node {k}: {} was acked as seq {} but the history ends at seq {}",
                a.payload,
                a.seq,
                history.len()
            ),
        }
    }
    Ok(())
}
