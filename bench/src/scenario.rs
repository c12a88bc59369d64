//! The scenarios: their flags, setup (connections, the conversation), the run and the
//! report.
//!
//! Timing: connection setup and subscribing are done before the clock of the run
//! starts; the run starts when the publishers start, and ends at the last delivery
//! (`fanout`) or the last ack (`publish`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::stream::{self, StreamExt};
use hdrhistogram::Histogram;
use herald_client::{ConvKind, Error as ClientError, Principal, Publisher, RefusalCode, Session};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::{Clock, STAMP_BYTES};
use crate::cpu;
use crate::progress::{Counters, Progress};
use crate::publish::{self, PublishPlan, PublishResult};
use crate::stats::{self, latency_histogram, per_sec, round3, ShardedHistogram};
use crate::subscribe::{self, SubscribePlan, SubscribeResult};
use crate::target::{self, Target, TargetArgs};

/// Members per create/add-members request: 8 bytes each, well inside the default
/// 68 KiB frame limit.
const MEMBERS_PER_REQUEST: u64 = 4096;
/// How often the run checks for completion and redraws progress.
const TICK: Duration = Duration::from_millis(100);
/// Shards of the delivery-latency histogram (see [`ShardedHistogram`]).
const LATENCY_SHARDS: usize = 64;
/// Bound on closing every connection after the report.
pub const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(15);
/// Error texts collected into the report, at most.
const SAMPLES_MAX: usize = 5;

/// Flags shared by the scenarios that publish.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Publisher connections (each a `Publisher` with a service token).
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Payload size in bytes; the first 8 carry the send timestamp.
    #[arg(long, default_value_t = 128)]
    pub payload_bytes: usize,
    /// Messages published in all, split evenly among the publishers.
    #[arg(long, default_value_t = 2000)]
    pub messages: u64,
    /// Messages per second over all publishers; without it, as fast as acks allow.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Publishes in flight at once per publisher.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Conversation id (default: a fresh one per run).
    #[arg(long)]
    pub conv: Option<u64>,
    /// Give up after this many seconds of run time (setup excluded) and report what
    /// arrived.
    #[arg(long, default_value_t = 120.0, value_name = "SECONDS")]
    pub timeout: f64,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 64)]
    pub connect_parallelism: usize,
    /// No progress display on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `fanout`: N subscribers in one group, P publishers.
#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    /// Subscriber sessions, each on its own QUIC connection, as users 1..=N.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: u64,
    /// Seeds of the subscribers, HOST:PORT[,…] (default: --addr): e.g. keep them off
    /// the node that leads the conversation, to measure node-to-node fan-out.
    #[arg(long, value_delimiter = ',')]
    pub subscriber_addr: Vec<String>,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// `publish`: P publishers, no subscribers.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Conversations published to: publisher i publishes to conversation
    /// `conv + i mod C`, so with many, the load spreads over many groups.
    #[arg(long, default_value_t = 1)]
    pub conversations: u64,
}

impl LoadArgs {
    fn check(&self) -> anyhow::Result<()> {
        if self.publishers == 0 {
            bail!("--publishers must be at least 1");
        }
        if self.payload_bytes < STAMP_BYTES {
            bail!("--payload-bytes must be at least {STAMP_BYTES} (the payload carries the send timestamp)");
        }
        if self.messages == 0 {
            bail!("--messages must be at least 1");
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                bail!("--rate must be a positive number of messages per second");
            }
        }
        if self.window == 0 {
            bail!("--window must be at least 1");
        }
        if !(self.timeout.is_finite() && self.timeout > 0.0) {
            bail!("--timeout must be a positive number of seconds");
        }
        if self.connect_parallelism == 0 {
            bail!("--connect-parallelism must be at least 1");
        }
        Ok(())
    }

    fn conv(&self) -> u64 {
        self.conv.unwrap_or_else(fresh_conv_id)
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout)
    }
}

/// A conversation id unlikely to exist on a long-running broker: time-based.
fn fresh_conv_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // Keep it readable and clear of small hand-picked ids.
    1_000_000_000 + (nanos ^ u64::from(std::process::id())) % 1_000_000_000_000
}

/// What a scenario leaves behind to close after the report is printed.
pub struct Teardown {
    sessions: Vec<Session>,
    publishers: Vec<Publisher>,
    target: Target,
}

impl Teardown {
    /// Closes every connection (all at once), then the in-process broker; each of the
    /// two steps is bounded by [`TEARDOWN_TIMEOUT`] (what is left is dropped).
    pub async fn run(self) {
        let Teardown {
            sessions,
            publishers,
            target,
        } = self;
        let close_all = futures_util::future::join(
            futures_util::future::join_all(sessions.into_iter().map(Session::close)),
            futures_util::future::join_all(publishers.into_iter().map(Publisher::close)),
        );
        if tokio::time::timeout(TEARDOWN_TIMEOUT, close_all)
            .await
            .is_err()
        {
            eprintln!(
                "note: some connections did not close within {TEARDOWN_TIMEOUT:?}; dropping them"
            );
        }
        let _ = tokio::time::timeout(TEARDOWN_TIMEOUT, target.shutdown()).await;
    }
}

/// Connects `load.publishers` publishers with a service token,
/// `load.connect_parallelism` at a time, each with room for `load.window` publishes in
/// flight.
async fn connect_publishers(target: &Target, load: &LoadArgs) -> anyhow::Result<Vec<Publisher>> {
    let (n, parallelism, window) = (load.publishers, load.connect_parallelism, load.window);
    let service = target::service();
    let results: Vec<anyhow::Result<Publisher>> = stream::iter(0..n)
        .map(|i| {
            let service = service.clone();
            async move {
                let config = target.publisher_config(&service, "herald-bench-publisher", window)?;
                Publisher::connect(config)
                    .await
                    .with_context(|| format!("publisher {i} cannot connect"))
            }
        })
        .buffer_unordered(parallelism)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Creates group `conv` with members `1..=members`, in requests of
/// [`MEMBERS_PER_REQUEST`]. With an id the user chose, an existing conversation is
/// reused: the members are added (present ones are ignored).
async fn create_group(
    publisher: &Publisher,
    conv: u64,
    members: u64,
    reuse: bool,
) -> anyhow::Result<()> {
    let all: Vec<u64> = (1..=members.max(1)).collect();
    let mut chunks = all.chunks(MEMBERS_PER_REQUEST as usize);
    let first = chunks.next().unwrap_or(&[]);
    match publisher
        .create_conversation(conv, ConvKind::Group, first)
        .await
    {
        Ok(_) => {}
        Err(ClientError::Refused(r)) if reuse && r.code == RefusalCode::ConversationConflict => {
            // It exists with other members: make sure ours are in.
            publisher
                .add_members(conv, first)
                .await
                .with_context(|| format!("conversation {conv} exists and members cannot be added to it ({r}); pick another --conv"))?;
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot create group conversation {conv}"))
        }
    }
    for chunk in chunks {
        publisher
            .add_members(conv, chunk)
            .await
            .with_context(|| format!("cannot add members to conversation {conv}"))?;
    }
    Ok(())
}

/// Merged publisher results.
struct PublishTotals {
    acked: u64,
    duplicates: u64,
    errors: u64,
    unfinished: u64,
    error_samples: Vec<String>,
    ack_latency: Histogram<u64>,
    last_ack_ns: u64,
}

fn merge_publishes(results: &[PublishResult]) -> PublishTotals {
    let mut t = PublishTotals {
        acked: 0,
        duplicates: 0,
        errors: 0,
        unfinished: 0,
        error_samples: Vec::new(),
        ack_latency: latency_histogram(),
        last_ack_ns: 0,
    };
    for r in results {
        t.acked += r.acked;
        t.duplicates += r.duplicates;
        t.errors += r.errors;
        t.unfinished += r.unfinished;
        t.last_ack_ns = t.last_ack_ns.max(r.last_ack_ns);
        stats::merge(&mut t.ack_latency, &r.ack_latency);
        for e in &r.error_samples {
            if t.error_samples.len() < SAMPLES_MAX {
                t.error_samples.push(e.clone());
            }
        }
    }
    t
}

/// Waits for every task; a task that panicked becomes an error text.
async fn join_all<T>(handles: Vec<JoinHandle<T>>) -> (Vec<T>, Vec<String>) {
    let mut done = Vec::with_capacity(handles.len());
    let mut failed = Vec::new();
    for h in handles {
        match h.await {
            Ok(v) => done.push(v),
            Err(e) => failed.push(format!("a bench task failed: {e}")),
        }
    }
    (done, failed)
}

/// Starts the publishers on their plans; the run's clock starts now.
#[allow(clippy::too_many_arguments)]
fn start_publishers(
    publishers: Vec<Publisher>,
    load: &LoadArgs,
    convs: &[u64],
    clock: Clock,
    progress: &Arc<Counters>,
    stop: &watch::Receiver<bool>,
) -> (Instant, u64, Vec<JoinHandle<(Publisher, PublishResult)>>) {
    let shares = publish::split(load.messages, publishers.len());
    let start = Instant::now();
    let start_ns = clock.now_ns();
    let handles = publishers
        .into_iter()
        .zip(shares)
        .enumerate()
        .map(|(i, (publisher, messages))| {
            let plan = PublishPlan {
                conv: convs[i % convs.len().max(1)],
                messages,
                rate: load
                    .rate
                    .map(|r| r * messages as f64 / load.messages as f64),
                window: load.window,
                payload_bytes: load.payload_bytes,
            };
            tokio::spawn(publish::run(
                publisher,
                plan,
                clock,
                start,
                i,
                progress.clone(),
                stop.clone(),
            ))
        })
        .collect();
    (start, start_ns, handles)
}

fn machine() -> Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    json!({"cores": cores, "worker_threads": workers})
}

fn seconds_between(from_ns: u64, to_ns: u64) -> f64 {
    to_ns.saturating_sub(from_ns) as f64 / 1e9
}

/// The `fanout` scenario. Returns the report and what to close afterwards.
pub async fn fanout(args: FanoutArgs) -> anyhow::Result<(Value, Teardown)> {
    let load = &args.load;
    load.check()?;
    let n = args.subscribers;
    if n == 0 {
        bail!("--subscribers must be at least 1");
    }
    let clock = Clock::start();
    let target = Target::prepare(&load.target, n).await?;
    let conv = load.conv();
    let setup_started = Instant::now();

    let publishers = connect_publishers(&target, load).await?;
    create_group(&publishers[0], conv, n, load.conv.is_some()).await?;

    // Sessions: connect and subscribe, a bounded number at a time.
    let mut setup = Progress::new("connect", "sessions", n, load.quiet);
    let mut ready: Vec<(u64, Session, u64)> = Vec::with_capacity(n as usize);
    {
        let target = &target;
        let subscriber_addr = &args.subscriber_addr;
        let mut connecting = stream::iter(1..=n)
            .map(|user| async move {
                let principal = Principal::User(user);
                let config = if subscriber_addr.is_empty() {
                    target.client_config(&principal, "herald-bench-subscriber")?
                } else {
                    target.client_config_at(
                        subscriber_addr,
                        &principal,
                        "herald-bench-subscriber",
                    )?
                };
                let session = Session::connect(config)
                    .await
                    .with_context(|| format!("the session of user {user} cannot connect"))?;
                let next_seq = session.subscribe(conv, None).await.with_context(|| {
                    format!("user {user} cannot subscribe to conversation {conv}")
                })?;
                anyhow::Ok((user, session, next_seq))
            })
            .buffer_unordered(load.connect_parallelism);
        while let Some(result) = connecting.next().await {
            ready.push(result?);
            setup.update(ready.len() as u64, "");
        }
    }
    setup.finish(ready.len() as u64);
    ready.sort_by_key(|(user, _, _)| *user);
    let setup_sec = setup_started.elapsed().as_secs_f64();

    let (stop_tx, stop_rx) = watch::channel(false);
    let deliveries = Arc::new(Counters::new(n as usize));
    let acks = Arc::new(Counters::new(load.publishers));
    let latency = Arc::new(ShardedHistogram::new(LATENCY_SHARDS));
    let subscribers: Vec<JoinHandle<(Session, SubscribeResult)>> = ready
        .into_iter()
        .enumerate()
        .map(|(i, (_, session, next_seq))| {
            let plan = SubscribePlan {
                conv,
                first_seq: next_seq,
                messages: load.messages,
            };
            tokio::spawn(subscribe::run(
                session,
                plan,
                clock,
                i,
                deliveries.clone(),
                latency.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();

    let expected = load.messages * n;
    let mut progress = Progress::new("fanout", "deliveries", expected, load.quiet);
    let cpu_start = cpu::snapshot();
    let (start, start_ns, publisher_tasks) =
        start_publishers(publishers, load, &[conv], clock, &acks, &stop_rx);
    let deadline = start + load.timeout();
    let mut publisher_tasks = Some(publisher_tasks);
    let mut publish_results: Vec<(Publisher, PublishResult)> = Vec::new();
    let mut task_failures = Vec::new();
    let mut acked_final: Option<u64> = None;
    let mut timed_out = false;
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        let delivered = deliveries.total();
        progress.update(delivered, &format!("(published {})", acks.total()));
        if publisher_tasks
            .as_ref()
            .is_some_and(|tasks| tasks.iter().all(JoinHandle::is_finished))
        {
            if let Some(tasks) = publisher_tasks.take() {
                let (results, failures) = join_all(tasks).await;
                task_failures.extend(failures);
                acked_final = Some(results.iter().map(|(_, r)| r.acked).sum());
                publish_results = results;
            }
        }
        // Done once the publishers have their acks and every delivery arrived — or
        // every delivery of an acked message, when some publishes failed.
        if acked_final.is_some_and(|acked| delivered >= expected.min(acked * n)) {
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
    }
    let stopped_ns = clock.now_ns();
    let cpu_end = cpu::snapshot();
    let _ = stop_tx.send(true);
    let (sub_results, failures) = join_all(subscribers).await;
    task_failures.extend(failures);
    if let Some(tasks) = publisher_tasks.take() {
        let (results, failures) = join_all(tasks).await;
        task_failures.extend(failures);
        publish_results = results;
    }
    progress.finish(deliveries.total());

    let (publishers, pub_results): (Vec<Publisher>, Vec<PublishResult>) =
        publish_results.into_iter().unzip();
    let pubs = merge_publishes(&pub_results);
    let (sessions, subs): (Vec<Session>, Vec<SubscribeResult>) = sub_results.into_iter().unzip();

    let delivered: u64 = subs.iter().map(|s| s.received).sum();
    let last_delivery_ns = subs.iter().map(|s| s.last_delivery_ns).max().unwrap_or(0);
    let delivery_sec = seconds_between(start_ns, last_delivery_ns);
    let publish_sec = seconds_between(start_ns, pubs.last_ack_ns);
    let elapsed_sec = if timed_out {
        seconds_between(start_ns, stopped_ns)
    } else {
        seconds_between(start_ns, last_delivery_ns.max(pubs.last_ack_ns))
    };
    let order_violations: u64 = subs.iter().map(|s| s.order_violations).sum();
    let mut violation_samples = Vec::new();
    let mut subscriber_errors = 0;
    let mut error_samples: Vec<String> = task_failures;
    for s in &subs {
        for v in &s.violation_samples {
            if violation_samples.len() < SAMPLES_MAX {
                violation_samples.push(v.clone());
            }
        }
        if let Some(e) = &s.error {
            subscriber_errors += 1;
            if error_samples.len() < SAMPLES_MAX {
                error_samples.push(e.clone());
            }
        }
    }
    let incomplete_subscribers = subs.iter().filter(|s| s.received < load.messages).count();
    let latency = latency.merged();

    let report = json!({
        "scenario": "fanout",
        "broker": target.describe(),
        "machine": machine(),
        "cpu": cpu::between(&cpu_start, &cpu_end),
        "subscribers": n,
        "publishers": load.publishers,
        "payload_bytes": load.payload_bytes,
        "messages": load.messages,
        "rate": load.rate,
        "window": load.window,
        "conv": conv,
        "published": pubs.acked,
        "publish_errors": pubs.errors,
        "publish_duplicates": pubs.duplicates,
        "publish_unfinished": pubs.unfinished,
        "publish_error_samples": pubs.error_samples,
        "delivered": delivered,
        "expected": expected,
        "delivered_per_sec": per_sec(delivered, delivery_sec),
        "published_per_sec": per_sec(pubs.acked, publish_sec),
        "latency_us": stats::summary(&latency),
        "publish_ack_latency_us": stats::summary(&pubs.ack_latency),
        "order_violations": order_violations,
        "order_violation_samples": violation_samples,
        "lagged_events": subs.iter().map(|s| s.lagged).sum::<u64>(),
        "reconnects": subs.iter().map(|s| s.reconnects).sum::<u64>(),
        "truncated_events": subs.iter().map(|s| s.truncated).sum::<u64>(),
        "foreign_messages": subs.iter().map(|s| s.foreign).sum::<u64>(),
        "incomplete_subscribers": incomplete_subscribers,
        "subscriber_errors": subscriber_errors,
        "error_samples": error_samples,
        "timed_out": timed_out,
        "setup_sec": round3(setup_sec),
        "delivery_sec": round3(delivery_sec),
        "publish_sec": round3(publish_sec),
        "elapsed_sec": round3(elapsed_sec),
    });
    Ok((
        report,
        Teardown {
            sessions,
            publishers,
            target,
        },
    ))
}

/// The `publish` scenario: acked publishes per second and ack latency, no subscribers.
pub async fn publish(args: PublishArgs) -> anyhow::Result<(Value, Teardown)> {
    let load = &args.load;
    load.check()?;
    let clock = Clock::start();
    let target = Target::prepare(&load.target, 1).await?;
    let conv = load.conv();
    if args.conversations == 0 {
        bail!("--conversations must be at least 1");
    }
    let convs: Vec<u64> = (0..args.conversations).map(|i| conv + i).collect();
    let setup_started = Instant::now();
    let publishers = connect_publishers(&target, load).await?;
    for conv in &convs {
        create_group(&publishers[0], *conv, 1, load.conv.is_some()).await?;
    }
    let setup_sec = setup_started.elapsed().as_secs_f64();

    let (stop_tx, stop_rx) = watch::channel(false);
    let acks = Arc::new(Counters::new(load.publishers));
    let mut progress = Progress::new("publish", "acks", load.messages, load.quiet);
    let cpu_start = cpu::snapshot();
    let (start, start_ns, tasks) =
        start_publishers(publishers, load, &convs, clock, &acks, &stop_rx);
    let deadline = start + load.timeout();
    let mut timed_out = false;
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        progress.update(acks.total(), "");
        if tasks.iter().all(JoinHandle::is_finished) {
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
    }
    let stopped_ns = clock.now_ns();
    let cpu_end = cpu::snapshot();
    let _ = stop_tx.send(true);
    let (results, failures) = join_all(tasks).await;
    progress.finish(acks.total());
    let (publishers, pub_results): (Vec<Publisher>, Vec<PublishResult>) =
        results.into_iter().unzip();
    let pubs = merge_publishes(&pub_results);
    let publish_sec = seconds_between(start_ns, pubs.last_ack_ns);
    let elapsed_sec = if timed_out {
        seconds_between(start_ns, stopped_ns)
    } else {
        publish_sec
    };
    let mut error_samples = failures;
    error_samples.extend(pubs.error_samples.iter().cloned());
    error_samples.truncate(SAMPLES_MAX);
    let report = json!({
        "scenario": "publish",
        "broker": target.describe(),
        "machine": machine(),
        "cpu": cpu::between(&cpu_start, &cpu_end),
        "publishers": load.publishers,
        "payload_bytes": load.payload_bytes,
        "messages": load.messages,
        "rate": load.rate,
        "window": load.window,
        "conv": conv,
        "conversations": args.conversations,
        "published": pubs.acked,
        "publish_errors": pubs.errors,
        "publish_duplicates": pubs.duplicates,
        "publish_unfinished": pubs.unfinished,
        "error_samples": error_samples,
        "published_per_sec": per_sec(pubs.acked, publish_sec),
        "publish_ack_latency_us": stats::summary(&pubs.ack_latency),
        "timed_out": timed_out,
        "setup_sec": round3(setup_sec),
        "elapsed_sec": round3(elapsed_sec),
    });
    Ok((
        report,
        Teardown {
            sessions: Vec::new(),
            publishers,
            target,
        },
    ))
}

/// Whether a report describes a complete, clean run (for the exit code), and if not why.
pub fn verdict(report: &Value) -> Result<(), String> {
    let mut problems = Vec::new();
    if report["timed_out"].as_bool() == Some(true) {
        problems.push("the run timed out".to_string());
    }
    if report["order_violations"].as_u64().unwrap_or(0) > 0 {
        problems.push(format!("{} order violations", report["order_violations"]));
    }
    if let (Some(d), Some(e)) = (report["delivered"].as_u64(), report["expected"].as_u64()) {
        if d < e {
            problems.push(format!("{d} of {e} deliveries arrived"));
        }
    }
    if report["publish_errors"].as_u64().unwrap_or(0) > 0 {
        problems.push(format!("{} publishes failed", report["publish_errors"]));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join(", "))
    }
}
