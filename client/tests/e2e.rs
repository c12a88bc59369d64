//! End-to-end tests of `herald-client` against the real `herald` binary over real
//! QUIC: delivery order, refusals and their reasons, the client-side checks, and
//! reconnect/resync across a broker restart.
//!
//! The binary is `$HERALD_BIN`, or built with cargo into this workspace's target
//! directory. Every wait has a deadline; nothing sleeps to synchronise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use herald_client::io::TransportLimits;
use herald_client::{
    ClientConfig, ConvKind, Error, IdempotencyKey, Principal, Publisher, RefusalCode, Session,
    SessionEvent,
};

const DEADLINE: Duration = Duration::from_secs(30);

fn herald_binary() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("HERALD_BIN") {
        return Ok(PathBuf::from(bin));
    }
    // target/<profile>/deps/<this test> → target/<profile>/herald
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot locate the target directory")?
        .to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--workspace", "--bin", "herald"]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    if !cmd.status().context("cannot run cargo")?.success() {
        bail!("building the herald binary failed");
    }
    let bin = profile_dir.join("herald");
    if !bin.is_file() {
        bail!("{} does not exist after the build", bin.display());
    }
    Ok(bin)
}

/// A `herald dev` process with a private data directory; killed on drop.
struct Node {
    child: Option<Child>,
    dir: PathBuf,
    quic: SocketAddr,
    admin: SocketAddr,
    env: Vec<(String, String)>,
}

impl Node {
    fn start() -> anyhow::Result<Node> {
        Self::start_with_env(&[])
    }

    /// Starts a node with extra `HERALD_*` variables (e.g. smaller limits).
    fn start_with_env(env: &[(&str, &str)]) -> anyhow::Result<Node> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "herald-client-e2e-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let quic = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
            s.local_addr()?
        };
        let admin = {
            let s = std::net::TcpListener::bind("127.0.0.1:0")?;
            s.local_addr()?
        };
        let mut node = Node {
            child: None,
            dir,
            quic,
            admin,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        node.spawn()?;
        Ok(node)
    }

    /// (Re)starts the process on the same ports and data directory.
    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut child = Command::new(herald_binary()?)
            .arg("dev")
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--listen")
            .arg(self.quic.to_string())
            .arg("--admin")
            .arg(self.admin.to_string())
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start herald dev")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("listening ") {
                    let _ = tx.send(());
                }
            }
        });
        self.child = Some(child);
        rx.recv_timeout(DEADLINE)
            .context("herald dev did not print its `listening` line in time")?;
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn token(&self, who: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(herald_binary()?)
            .arg("token")
            .arg("--secret-file")
            .arg(self.dir.join("dev/secret"))
            .args(who)
            .output()?;
        if !out.status.success() {
            bail!("herald token: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// The admin `/metrics` text.
    fn metrics(&self) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.admin)?;
        stream.set_read_timeout(Some(DEADLINE))?;
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.admin
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    }

    fn config(&self, token: &str) -> ClientConfig {
        self.builder(token).build().unwrap()
    }

    fn builder(&self, token: &str) -> herald_client::ClientConfigBuilder {
        ClientConfig::builder()
            .addrs([self.quic.to_string()])
            .ca_file(self.dir.join("dev/ca.pem"))
            .token(token)
            .client_name("herald-client-e2e")
            .request_timeout(Duration::from_secs(20))
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
            // A killed broker sends no close: the client notices by the idle timeout.
            .transport_limits(TransportLimits {
                idle_timeout: Duration::from_secs(3),
                keep_alive_interval: Duration::from_secs(1),
                ..TransportLimits::default()
            })
    }

    async fn service(&self) -> anyhow::Result<Publisher> {
        Ok(Publisher::connect(self.config(&self.token(&["--service", "e2e"])?)).await?)
    }

    async fn user(&self, id: u64) -> anyhow::Result<Session> {
        let token = self.token(&["--user", &id.to_string()])?;
        Ok(Session::connect(self.config(&token)).await?)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The next message, skipping other events; fails after the deadline.
async fn next_message(s: &mut Session) -> anyhow::Result<herald_client::Message> {
    loop {
        let event = tokio::time::timeout(DEADLINE, s.next())
            .await
            .context("no event in time")?
            .context("the session ended")??;
        match event {
            SessionEvent::Message(m) => return Ok(m),
            other => eprintln!("event: {other:?}"),
        }
    }
}

#[tokio::test]
async fn publish_subscribe_in_order_with_replay_and_dedup() -> anyhow::Result<()> {
    let node = Node::start()?;
    let publisher = node.service().await?;
    assert_eq!(publisher.principal(), Principal::Service("e2e".into()));
    assert!(
        publisher
            .create_conversation(1, ConvKind::Group, &[1, 2])
            .await?
    );
    assert!(
        !publisher
            .create_conversation(1, ConvKind::Group, &[1, 2])
            .await?
    );

    // Five messages before anyone subscribes, then a subscriber from seq 1.
    for i in 1..=5u64 {
        let ack = publisher.publish(1, format!("m{i}")).await?;
        assert_eq!((ack.seq, ack.duplicate), (i, false));
    }
    let mut s = node.user(1).await?;
    assert_eq!(s.principal(), Principal::User(1));
    assert_eq!(s.subscribe(1, Some(1)).await?, 6);
    // Concurrent publishes are pipelined on one connection.
    let sends: Vec<_> = (6..=40u64)
        .map(|i| {
            let p = publisher.clone();
            tokio::spawn(async move { p.publish(1, format!("m{i}")).await })
        })
        .collect();
    for send in sends {
        send.await??;
    }
    for seq in 1..=40u64 {
        let m = next_message(&mut s).await?;
        assert_eq!((m.conv, m.seq), (1, seq));
    }

    // A caller key is remembered: the retry returns the original seq.
    let key = IdempotencyKey::Caller("pay-1".into());
    let first = publisher.publish_with_key(1, key.clone(), "paid").await?;
    let again = publisher.publish_with_key(1, key, "paid").await?;
    assert_eq!(again.seq, first.seq);
    assert!(!first.duplicate && again.duplicate);
    assert_eq!(next_message(&mut s).await?.seq, first.seq);

    let page = publisher.history(1, 3, 4).await?;
    let seqs: Vec<_> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [3, 4, 5, 6]);
    assert_eq!(page.messages[0].payload, b"m3");

    // A user session sends too.
    let ack = s.send(1, "from user 1").await?;
    let m = next_message(&mut s).await?;
    assert_eq!((m.seq, m.sender.clone()), (ack.seq, Principal::User(1)));

    s.close().await;
    publisher.close().await;
    Ok(())
}

#[tokio::test]
async fn refusals_carry_their_reason() -> anyhow::Result<()> {
    let node = Node::start()?;
    let publisher = node.service().await?;
    publisher
        .create_conversation(2, ConvKind::Group, &[1])
        .await?;

    // A token signed with another secret is refused in the handshake, not retried.
    let forged = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxIiwicm9sZSI6InVzZXIiLCJleHAiOjQxMDI0NDQ4MDB9.c2lnbmF0dXJlLW5vdC12YWxpZC1hdC1hbGwtLS0tLS0tLS0tLS0";
    let err = Session::connect(node.config(forged)).await.unwrap_err();
    assert!(
        matches!(
            err.refusal_code(),
            Some(RefusalCode::BadSignature | RefusalCode::MalformedToken)
        ),
        "{err}"
    );
    let err = Session::connect(node.config("not-a-jwt"))
        .await
        .unwrap_err();
    assert_eq!(
        err.refusal_code(),
        Some(RefusalCode::MalformedToken),
        "{err}"
    );

    // Not a member: refused with the reason; the session stays usable.
    let s = node.user(9).await?;
    let err = s.subscribe(2, Some(1)).await.unwrap_err();
    assert_eq!(err.refusal_code(), Some(RefusalCode::NotMember), "{err}");
    assert!(err.to_string().contains("not a member"), "{err}");
    let err = s.send(2, "hi").await.unwrap_err();
    assert_eq!(err.refusal_code(), Some(RefusalCode::NotMember), "{err}");
    // A user may not create conversations.
    let err = publisher_like_user(&node).await?;
    assert_eq!(err, Some(RefusalCode::RoleNotAllowed));

    // The payload limit is checked before sending; nothing is sent.
    let max = publisher.limits().payload_bytes_max as usize;
    let err = publisher.publish(2, vec![0u8; max + 1]).await.unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
    assert_eq!(publisher.publish(2, vec![0u8; max]).await?.seq, 1);

    s.close().await;
    publisher.close().await;
    Ok(())
}

async fn publisher_like_user(node: &Node) -> anyhow::Result<Option<RefusalCode>> {
    let p = Publisher::connect(node.config(&node.token(&["--user", "1"])?)).await?;
    let r = p.create_conversation(3, ConvKind::Group, &[1]).await;
    p.close().await;
    Ok(r.err().and_then(|e| e.refusal_code()))
}

#[tokio::test]
async fn wrong_ca_and_no_broker_are_connect_errors() -> anyhow::Result<()> {
    let node = Node::start()?;
    let token = node.token(&["--user", "1"])?;
    let wrong_ca = ClientConfig::builder()
        .addrs([node.quic.to_string()])
        .ca_pem(include_str!("data/ca.pem"))
        .token(token.clone())
        .build()?;
    let err = Session::connect(wrong_ca).await.unwrap_err();
    assert!(
        matches!(&err, Error::Connect { reason, .. } if reason.contains("certificate")),
        "{err}"
    );

    let free = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let nobody = ClientConfig::builder()
        .addrs([free.to_string()])
        .ca_file(node.dir.join("dev/ca.pem"))
        .token(token)
        .connect_timeout(Duration::from_millis(500))
        .build()?;
    let err = Session::connect(nobody).await.unwrap_err();
    assert!(
        matches!(&err, Error::Connect { addr, .. } if *addr == free.to_string()),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn slow_reader_is_disconnected_then_resyncs_without_gap_or_duplicate() -> anyhow::Result<()> {
    let node = Node::start_with_env(&[
        ("HERALD_LIMITS_SLOW_CONSUMER_TIMEOUT", "1s"),
        ("HERALD_LIMITS_SESSION_QUEUE_LEN_MAX", "16"),
    ])?;
    let publisher = node.service().await?;
    publisher
        .create_conversation(6, ConvKind::Group, &[1])
        .await?;
    let token = node.token(&["--user", "1"])?;
    let config = node.builder(&token).outbound_queue_len_max(4).build()?;
    let mut s = Session::connect(config).await?;
    s.subscribe(6, Some(1)).await?;

    // Far more than the client queue, the QUIC windows and the broker's queue hold,
    // while the application reads nothing.
    let total = 400u64;
    let payload = vec![b'x'; 8 * 1024];
    for i in 1..=total {
        assert_eq!(publisher.publish(6, payload.clone()).await?.seq, i);
    }
    // Wait until the broker gave up on the session.
    let until = std::time::Instant::now() + DEADLINE;
    loop {
        let metrics = node.metrics()?;
        if metrics.lines().any(|l| {
            l.starts_with("herald_sessions_disconnected_total")
                && (l.contains("slow_consumer") || l.contains("SlowConsumer"))
                && !l.ends_with(" 0")
        }) {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "the broker never disconnected the slow session:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Reading again: every message once, in order, across the reconnect.
    let mut seqs = Vec::new();
    let mut reconnected = false;
    while seqs.len() < total as usize {
        let event = tokio::time::timeout(DEADLINE, s.next())
            .await
            .context("no event in time")?
            .context("the session ended")??;
        match event {
            SessionEvent::Message(m) => {
                assert_eq!(m.payload.len(), payload.len());
                seqs.push(m.seq);
            }
            SessionEvent::Reconnected { .. } => reconnected = true,
            SessionEvent::Lagged { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
    assert!(reconnected, "the slow session was never reconnected");
    // Live again after the resync.
    let ack = s.send(6, "live").await?;
    assert_eq!(next_message(&mut s).await?.seq, ack.seq);
    s.close().await;
    publisher.close().await;
    Ok(())
}

#[tokio::test]
async fn broker_restart_reconnects_and_resyncs_without_gap_or_duplicate() -> anyhow::Result<()> {
    let mut node = Node::start()?;
    let publisher = node.service().await?;
    publisher
        .create_conversation(5, ConvKind::Group, &[1])
        .await?;
    let mut s = node.user(1).await?;
    s.subscribe(5, None).await?;
    for i in 1..=10u64 {
        publisher.publish(5, format!("before {i}")).await?;
    }
    for seq in 1..=10u64 {
        assert_eq!(next_message(&mut s).await?.seq, seq);
    }

    node.kill();
    node.spawn()?;

    // The publisher reconnects by itself; publishes made meanwhile are acked once
    // the broker is back (within the request timeout).
    for i in 11..=20u64 {
        let ack = publisher.publish(5, format!("after {i}")).await?;
        assert_eq!(ack.seq, i);
    }
    // The session tells about the reconnect, then continues at 11 exactly.
    let mut reconnected = false;
    let mut seqs = Vec::new();
    while seqs.len() < 10 {
        let event = tokio::time::timeout(DEADLINE, s.next())
            .await
            .context("no event in time")?
            .context("the session ended")??;
        match event {
            SessionEvent::Message(m) => seqs.push(m.seq),
            SessionEvent::Reconnected { .. } => reconnected = true,
            other => eprintln!("event: {other:?}"),
        }
    }
    assert!(reconnected);
    assert_eq!(seqs, (11..=20).collect::<Vec<_>>());

    s.close().await;
    publisher.close().await;
    Ok(())
}

#[tokio::test]
async fn started_publishes_are_acked_in_order_and_once_across_a_broker_restart(
) -> anyhow::Result<()> {
    let mut node = Node::start()?;
    let publisher = node.service().await?;
    publisher
        .create_conversation(7, ConvKind::Group, &[1])
        .await?;

    // Many in flight from one task, no future per publish: acked in start order.
    let mut started = Vec::new();
    for i in 1..=20u64 {
        started.push(publisher.start_publish(7, format!("m{i}")).await?);
    }
    for (i, publish) in (1..=20u64).zip(started) {
        let ack = publish.ack().await?;
        assert_eq!((ack.seq, ack.duplicate), (i, false));
    }

    // Started, then the broker dies before their acks are taken: each is resent with
    // its key after the reconnect and stored exactly once, in start order.
    let mut started = Vec::new();
    for i in 21..=30u64 {
        started.push(publisher.start_publish(7, format!("m{i}")).await?);
    }
    node.kill();
    node.spawn()?;
    let mut seqs = Vec::new();
    for publish in started {
        seqs.push(publish.ack().await?.seq);
    }
    assert_eq!(seqs, (21..=30).collect::<Vec<_>>());
    let page = publisher.history(7, 1, 100).await?;
    let stored: Vec<_> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(stored, (1..=30).collect::<Vec<_>>());
    assert_eq!(page.messages[29].payload, b"m30");

    publisher.close().await;
    Ok(())
}
