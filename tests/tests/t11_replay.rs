//! t11: subscribing with a cursor replays history, then switches to live with no gap and
//! no duplicate; a cursor older than retention is told `Truncated` explicitly.

use herald_client::wire::{Event, Frame, IdempotencyKey, Reply, Request};
use herald_tests::{DevNode, RawClient};

/// Reads deliveries of `conv` until `last` arrives; fails on any gap or duplicate.
async fn read_deliveries(
    client: &mut RawClient,
    conv: u64,
    first: u64,
    last: u64,
) -> anyhow::Result<()> {
    let mut expected = first;
    while expected <= last {
        let frame = client
            .read_until(|f| matches!(f, Frame::Deliver(_)))
            .await?;
        let Frame::Deliver(m) = frame else {
            unreachable!()
        };
        assert_eq!(m.conv, conv);
        assert_eq!(
            m.seq, expected,
            "gap or duplicate: expected seq {expected}, got {}",
            m.seq
        );
        expected += 1;
    }
    Ok(())
}

#[tokio::test]
async fn replay_then_live_has_no_gap_and_no_duplicate_under_concurrent_publishing(
) -> anyhow::Result<()> {
    let node = DevNode::start()?;
    let mut service = RawClient::welcomed(&node, &node.service_token("svc")?).await?;
    service.create_group(1, vec![1]).await?;
    service.publish_many(1, 1, 300, 0).await?;

    // A second publisher keeps publishing while the subscriber replays.
    let mut publisher = RawClient::welcomed(&node, &node.service_token("svc2")?).await?;
    let background = tokio::spawn(async move { publisher.publish_many(1, 10_000, 700, 0).await });

    let mut user = RawClient::welcomed(&node, &node.user_token(1)?).await?;
    let reply = user.subscribe(1, 1, Some(1)).await?;
    assert!(
        matches!(reply, Reply::Subscribed { conv: 1, .. }),
        "{reply:?}"
    );
    let acked = background.await??;
    assert_eq!(acked.len(), 700);
    read_deliveries(&mut user, 1, 1, 1000).await
}

#[tokio::test]
async fn subscribe_without_cursor_gets_only_new_messages() -> anyhow::Result<()> {
    let node = DevNode::start()?;
    let mut service = RawClient::welcomed(&node, &node.service_token("svc")?).await?;
    service.create_group(1, vec![1]).await?;
    service.publish_many(1, 1, 5, 0).await?;
    let mut user = RawClient::welcomed(&node, &node.user_token(1)?).await?;
    let reply = user.subscribe(1, 1, None).await?;
    assert_eq!(
        reply,
        Reply::Subscribed {
            conv: 1,
            next_seq: 6
        }
    );
    service.publish_many(1, 100, 3, 0).await?;
    read_deliveries(&mut user, 1, 6, 8).await
}

#[tokio::test]
async fn cursor_older_than_retention_is_told_truncated() -> anyhow::Result<()> {
    let node = DevNode::start_with_env(&[("HERALD_LIMITS_HISTORY_MESSAGES_MAX", "10")])?;
    let mut service = RawClient::welcomed(&node, &node.service_token("svc")?).await?;
    service.create_group(1, vec![1]).await?;
    service.publish_many(1, 1, 25, 0).await?;
    let mut user = RawClient::welcomed(&node, &node.user_token(1)?).await?;
    let reply = user.subscribe(1, 1, Some(3)).await?;
    assert!(matches!(reply, Reply::Subscribed { .. }), "{reply:?}");
    let frame = user
        .read_until(|f| matches!(f, Frame::Event(_) | Frame::Deliver(_)))
        .await?;
    assert_eq!(
        frame,
        Frame::Event(Event::Truncated {
            conv: 1,
            requested_from: 3,
            first_available_seq: 16
        }),
        "the first thing after subscribing must be the truncation notice"
    );
    read_deliveries(&mut user, 1, 16, 25).await?;
    service.publish_many(1, 100, 2, 0).await?;
    read_deliveries(&mut user, 1, 26, 27).await
}

#[tokio::test]
async fn idempotent_retry_returns_the_original_seq_and_appends_nothing() -> anyhow::Result<()> {
    let node = DevNode::start()?;
    let mut service = RawClient::welcomed(&node, &node.service_token("svc")?).await?;
    service.create_group(1, vec![1]).await?;
    let publish = |key: &str| Request::Publish {
        conv: 1,
        key: IdempotencyKey::Caller(key.to_owned()),
        payload: b"red packet".to_vec(),
    };
    let first = service.call(1, publish("pay-1")).await?;
    assert_eq!(
        first,
        Reply::Published {
            seq: 1,
            duplicate: false,
            // One node leads every group: no hint.
            leader: None,
        }
    );
    // A retry on another connection (as after a reconnect) is still deduplicated.
    let mut again = RawClient::welcomed(&node, &node.service_token("svc")?).await?;
    let retry = again.call(1, publish("pay-1")).await?;
    assert_eq!(
        retry,
        Reply::Published {
            seq: 1,
            duplicate: true,
            // One node leads every group: no hint.
            leader: None,
        }
    );
    let other = again.call(2, publish("pay-2")).await?;
    assert_eq!(
        other,
        Reply::Published {
            seq: 2,
            duplicate: false,
            // One node leads every group: no hint.
            leader: None,
        }
    );
    let Reply::History(page) = again
        .call(
            3,
            Request::History {
                conv: 1,
                from: 1,
                limit: 10,
            },
        )
        .await?
    else {
        anyhow::bail!("history refused");
    };
    assert_eq!(page.messages.len(), 2);
    Ok(())
}
