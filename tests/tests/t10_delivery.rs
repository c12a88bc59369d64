//! t10: delivery as users rely on it — every member gets every message, in order, with
//! no gap and no duplicate; a restarted subscriber gets exactly what it missed; a
//! subscriber that never reads does not stop anyone else.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};

use anyhow::Context;
use herald_client::wire::{ConvKind, Frame, Reply, Request};
use herald_client::{Publisher, Session, SessionEvent};
use herald_tests::{wait_until, DevNode, RawClient, DEADLINE};

/// Receives `count` messages of `conv` and checks they are exactly `first..first+count`.
async fn expect_in_order(
    session: &mut Session,
    conv: u64,
    first: u64,
    count: u64,
) -> anyhow::Result<()> {
    let mut expected = first;
    let end = first + count;
    tokio::time::timeout(DEADLINE, async {
        while expected < end {
            if let SessionEvent::Message(m) = session.next().await.context("stream ended")?? {
                anyhow::ensure!(m.conv == conv, "message of conversation {}", m.conv);
                anyhow::ensure!(
                    m.seq == expected,
                    "gap or duplicate: expected seq {expected}, got {}",
                    m.seq
                );
                anyhow::ensure!(
                    m.payload == format!("msg {}", m.seq).into_bytes(),
                    "payload of seq {} is {:?}",
                    m.seq,
                    String::from_utf8_lossy(&m.payload)
                );
                expected += 1;
            }
        }
        Ok(())
    })
    .await
    .with_context(|| format!("timed out at seq {expected} of {}", end - 1))?
}

#[tokio::test]
async fn three_members_each_receive_1000_messages_in_order() -> anyhow::Result<()> {
    let node = DevNode::start()?;
    let publisher = Publisher::connect(node.client_config(&node.service_token("svc")?)?).await?;
    assert!(
        publisher
            .create_conversation(1, ConvKind::Group, &[1, 2, 3])
            .await?
    );
    let mut sessions = Vec::new();
    for user in 1..=3 {
        let s = Session::connect(node.client_config(&node.user_token(user)?)?).await?;
        s.subscribe(1, Some(1)).await?;
        sessions.push(s);
    }
    for i in 1..=1000u64 {
        let ack = publisher.publish(1, format!("msg {i}")).await?;
        assert_eq!(ack.seq, i, "acked seqs are gapless from 1");
        assert!(!ack.duplicate);
    }
    let receivers = sessions.into_iter().map(|mut s| {
        tokio::spawn(async move {
            expect_in_order(&mut s, 1, 1, 1000).await?;
            s.close().await;
            anyhow::Ok(())
        })
    });
    for r in receivers {
        r.await??;
    }
    publisher.close().await;
    Ok(())
}

/// A `herald sub --json` process; its stdout lines arrive on a channel.
struct CliSubscriber {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl CliSubscriber {
    fn start(node: &DevNode, token: &str, args: &[&str]) -> anyhow::Result<Self> {
        let mut child = node
            .cli(token)?
            .args(["sub", "--conv", "1", "--json"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(CliSubscriber { child, lines })
    }

    /// The seqs of the next `count` deliveries.
    fn seqs(&self, count: usize) -> anyhow::Result<Vec<u64>> {
        (0..count)
            .map(|_| {
                let line = self
                    .lines
                    .recv_timeout(DEADLINE)
                    .context("herald sub printed nothing in time")?;
                let v: serde_json::Value = serde_json::from_str(&line)?;
                anyhow::ensure!(v["conv"] == 1, "{line}");
                anyhow::ensure!(v["payload"] == format!("msg {}", v["seq"]), "{line}");
                v["seq"].as_u64().context("no seq")
            })
            .collect()
    }
}

impl Drop for CliSubscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn publish_range(publisher: &Publisher, from: u64, to: u64) -> anyhow::Result<()> {
    for i in from..=to {
        let ack = publisher.publish(1, format!("msg {i}")).await?;
        anyhow::ensure!(ack.seq == i, "acked seq {} for message {i}", ack.seq);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_subscriber_restarted_with_its_cursor_gets_exactly_what_it_missed(
) -> anyhow::Result<()> {
    let node = DevNode::start()?;
    let service = node.service_token("svc")?;
    let publisher = Publisher::connect(node.client_config(&service)?).await?;
    publisher
        .create_conversation(1, ConvKind::Group, &[7])
        .await?;
    let user = node.user_token(7)?;

    let first = CliSubscriber::start(&node, &user, &["--from", "1"])?;
    publish_range(&publisher, 1, 300).await?;
    let seen = tokio::task::block_in_place(|| first.seqs(300))?;
    assert_eq!(seen, (1..=300).collect::<Vec<_>>());
    drop(first); // kill -9: the process gets no chance to say goodbye

    publish_range(&publisher, 301, 500).await?;
    let cursor = seen.last().copied().unwrap_or(0);
    let from = (cursor + 1).to_string();
    let second = CliSubscriber::start(&node, &user, &["--from", &from, "--count", "200"])?;
    let resumed = tokio::task::block_in_place(|| second.seqs(200))?;
    assert_eq!(
        resumed,
        (301..=500).collect::<Vec<_>>(),
        "exactly the missed messages"
    );
    // `--count 200` exits 0 after 200 deliveries, and printed nothing more.
    let mut second = second;
    let status = tokio::task::block_in_place(|| second.child.wait())?;
    assert!(status.success());
    assert!(second.lines.try_recv().is_err(), "no extra deliveries");
    publisher.close().await;
    Ok(())
}

#[tokio::test]
async fn a_subscriber_that_never_reads_does_not_stop_the_others() -> anyhow::Result<()> {
    // The session lags when its queue overflows while its writer is blocked, and is
    // disconnected when the writer made no progress for the slow-consumer timeout. The
    // test sees both only if the queue overflows first: 16 messages must be published
    // within the 10 s timeout. With 64 and 2 s a loaded CI machine (~14 publishes/s)
    // disconnected the session before it ever overflowed.
    let node = DevNode::start_with_env(&[
        ("HERALD_LIMITS_SESSION_QUEUE_LEN_MAX", "16"),
        ("HERALD_LIMITS_SLOW_CONSUMER_TIMEOUT", "10s"),
    ])?;
    let publisher = Publisher::connect(node.client_config(&node.service_token("svc")?)?).await?;
    publisher
        .create_conversation(1, ConvKind::Group, &[1, 2, 3])
        .await?;

    // User 1 subscribes at the protocol level and then never reads again.
    let (mut stalled, welcome) = RawClient::hello(&node, &node.user_token(1)?).await?;
    anyhow::ensure!(matches!(welcome, Frame::Welcome(_)));
    stalled
        .request(
            1,
            Request::Subscribe {
                conv: 1,
                from: Some(1),
            },
        )
        .await?;
    let reply = stalled
        .read_until(|f| matches!(f, Frame::Reply { .. }))
        .await?;
    anyhow::ensure!(
        matches!(
            reply,
            Frame::Reply {
                body: Reply::Subscribed { .. },
                ..
            }
        ),
        "{reply:?}"
    );

    let mut others = Vec::new();
    for user in [2, 3] {
        let s = Session::connect(node.client_config(&node.user_token(user)?)?).await?;
        s.subscribe(1, Some(1)).await?;
        others.push(s);
    }
    // 1,000 messages of ~1 KiB: far more than the stalled session's queue and windows.
    let padding = "x".repeat(1000);
    let publish = async {
        for i in 1..=1000u64 {
            let ack = publisher.publish(1, format!("msg {i}{padding}")).await?;
            anyhow::ensure!(ack.seq == i);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(DEADLINE, publish)
        .await
        .context("the publisher was slowed down by the stalled subscriber")??;
    for mut s in others {
        let mut expected = 1;
        tokio::time::timeout(DEADLINE, async {
            while expected <= 1000 {
                if let SessionEvent::Message(m) = s.next().await.context("stream ended")?? {
                    anyhow::ensure!(m.seq == expected, "expected {expected}, got {}", m.seq);
                    expected += 1;
                }
            }
            anyhow::Ok(())
        })
        .await
        .with_context(|| format!("a healthy subscriber stalled at seq {expected}"))??;
    }
    // The broker noticed: the stalled session lagged and was eventually disconnected.
    wait_until(
        "the stalled session to be reported lagged and disconnected",
        DEADLINE,
        || {
            let Ok((_, metrics)) = node.admin_get("/metrics") else {
                return false;
            };
            let disconnected =
                metrics.contains("herald_sessions_disconnected_total{reason=\"SlowConsumer\"} 1");
            let lagged = metrics
                .lines()
                .find(|l| l.starts_with("herald_sessions_lagged_total"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            disconnected && lagged >= 1
        },
    )
    .await?;
    drop(stalled);
    publisher.close().await;
    Ok(())
}
