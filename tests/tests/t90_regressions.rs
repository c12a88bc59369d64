//! t90: regressions — each test names the bug it keeps fixed.

use herald_client::wire::{Frame, IdempotencyKey, RefusalCode, Reply, Request};
use herald_tests::{DevNode, RawClient};

/// A history page larger than one frame used to fail encoding in the session writer,
/// which then stopped delivering while the connection stayed open.
#[tokio::test]
async fn a_history_page_larger_than_a_frame_is_cut_and_the_session_lives_on() -> anyhow::Result<()>
{
    let node = DevNode::start()?;
    let mut service = RawClient::welcomed(&node, &node.service_token("svc")?).await?;
    service.create_group(1, vec![1]).await?;
    // 1,000 messages of ~200 bytes: ~250 KB encoded, far above the 68 KiB frame maximum.
    let acked = service.publish_many(1, 10, 1000, 200).await?;
    assert_eq!(acked, (1..=1000).collect::<Vec<_>>());
    let mut user = RawClient::welcomed(&node, &node.user_token(1)?).await?;
    let reply = user
        .call(
            1,
            Request::History {
                conv: 1,
                from: 1,
                limit: 1000,
            },
        )
        .await?;
    let Reply::History(page) = reply else {
        anyhow::bail!("history refused: {reply:?}");
    };
    assert!(
        !page.messages.is_empty() && page.messages.len() < 1000,
        "{} messages",
        page.messages.len()
    );
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(page.next_seq, 1001);

    // The session still works: subscribe and receive a new message live.
    let reply = user.subscribe(2, 1, None).await?;
    assert_eq!(
        reply,
        Reply::Subscribed {
            conv: 1,
            next_seq: 1001
        }
    );
    let reply = service
        .call(
            2000,
            Request::Publish {
                conv: 1,
                key: IdempotencyKey::Caller("live".into()),
                payload: b"live".to_vec(),
            },
        )
        .await?;
    assert!(
        matches!(reply, Reply::Published { seq: 1001, .. }),
        "{reply:?}"
    );
    let frame = user.read_until(|f| matches!(f, Frame::Deliver(_))).await?;
    let Frame::Deliver(m) = frame else {
        unreachable!()
    };
    assert_eq!((m.seq, m.payload.as_slice()), (1001, b"live".as_slice()));
    Ok(())
}

/// A cursor beyond the conversation's head used to be accepted, and every seq below it
/// was then silently skipped as "already sent".
#[tokio::test]
async fn a_cursor_beyond_the_head_is_refused_not_silently_skipped() -> anyhow::Result<()> {
    let node = DevNode::start()?;
    let mut service = RawClient::welcomed(&node, &node.service_token("svc")?).await?;
    service.create_group(1, vec![1]).await?;
    let mut user = RawClient::welcomed(&node, &node.user_token(1)?).await?;
    let reply = user.subscribe(1, 1, Some(5000)).await?;
    let Reply::Refused(refusal) = reply else {
        anyhow::bail!("a cursor beyond the head was accepted: {reply:?}");
    };
    assert_eq!(refusal.code, RefusalCode::InvalidRequest);
    assert!(
        refusal.detail.contains("5000") && refusal.detail.contains("next seq is 1"),
        "{refusal}"
    );
    // The head itself is a valid cursor (a caught-up client reconnecting).
    let reply = user.subscribe(2, 1, Some(1)).await?;
    assert_eq!(
        reply,
        Reply::Subscribed {
            conv: 1,
            next_seq: 1
        }
    );
    Ok(())
}

/// A restarted node used to drop, without a word, the packets of connections to its
/// previous process: its QUIC connection-id key was new on every start, so it did not
/// recognize those ids and sent no stateless reset. Peers and clients kept such a dead
/// connection until their idle timeout (a leader could not reach a restarted follower
/// for 3 s, which then ran elections it could not win).
#[tokio::test]
async fn a_restarted_node_resets_connections_to_its_previous_process() -> anyhow::Result<()> {
    use std::time::{Duration, Instant};

    let cluster = herald_tests::cluster::Cluster::start(1, &[]).await?;
    let result = async {
        // Default transport (30 s idle timeout) and a liveness timeout far above what the
        // reset takes: only the reset can make the next publish quick.
        let config = herald_client::ClientConfig::builder()
            .addrs(cluster.addrs())
            .ca_file(cluster.ca_path())
            .token(cluster.service_token("svc")?)
            .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
            .liveness_timeout(Duration::from_secs(10))
            .request_timeout(Duration::from_secs(20))
            .build()?;
        let publisher = herald_client::Publisher::connect(config).await?;
        publisher
            .create_conversation(1, herald_client::ConvKind::Group, &[1])
            .await?;
        assert_eq!(publisher.publish(1, "before").await?.seq, 1);
        cluster.kill9(1);
        cluster.restart(1).await?;
        let sent_at = Instant::now();
        let ack = publisher.publish(1, "after").await?;
        let took = sent_at.elapsed();
        assert_eq!(ack.seq, 2);
        assert!(
            took < Duration::from_secs(2),
            "the publish after the restart took {took:?}: the old connection was not reset"
        );
        publisher.close().await;
        Ok(())
    }
    .await;
    cluster.finish(result)
}
