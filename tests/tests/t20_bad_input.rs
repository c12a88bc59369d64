//! t20: bad input gets a clear refusal with its reason, never a crash, and loses nothing.
//!
//! Every test runs the real `herald dev` binary and speaks raw protocol over real QUIC,
//! so it can send what a correct client never would.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use herald_client::wire::{
    self, ConvKind, Frame, IdempotencyKey, Refusal, RefusalCode, Reply, Request,
};
use herald_tests::{DevNode, RawClient};

fn refusal_code(reply: &Reply) -> Option<RefusalCode> {
    match reply {
        Reply::Refused(Refusal { code, .. }) => Some(*code),
        _ => None,
    }
}

/// The Goodbye a misbehaving connection gets before it closes.
async fn goodbye(client: &mut RawClient) -> anyhow::Result<Refusal> {
    match client
        .read_until(|f| matches!(f, Frame::Goodbye(_)))
        .await?
    {
        Frame::Goodbye(r) => Ok(r),
        other => anyhow::bail!("unexpected {other:?}"),
    }
}

/// A service session with group conversation 1 = {1, 2}, and an ack for one message.
async fn setup(node: &DevNode) -> anyhow::Result<RawClient> {
    let mut service = RawClient::welcomed(node, &node.service_token("tests")?).await?;
    anyhow::ensure!(
        service.create_group(1, vec![1, 2]).await?,
        "conversation 1 already existed"
    );
    Ok(service)
}

async fn publish(client: &mut RawClient, id: u64, text: &str) -> anyhow::Result<u64> {
    match client
        .call(
            id,
            Request::Publish {
                conv: 1,
                key: IdempotencyKey::Caller(format!("key-{id}")),
                payload: text.as_bytes().to_vec(),
            },
        )
        .await?
    {
        Reply::Published { seq, .. } => Ok(seq),
        other => anyhow::bail!("publish refused: {other:?}"),
    }
}

/// Everything acked is still in history, in order, and the node still serves.
async fn assert_still_serving(node: &DevNode, acked: &[u64]) -> anyhow::Result<()> {
    let mut service = RawClient::welcomed(node, &node.service_token("check")?).await?;
    let next = publish(&mut service, 900, "still alive").await?;
    let reply = service
        .call(
            901,
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
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    for seq in acked {
        anyhow::ensure!(seqs.contains(seq), "acked seq {seq} missing from {seqs:?}");
    }
    anyhow::ensure!(seqs == (1..=next).collect::<Vec<_>>(), "gap in {seqs:?}");
    Ok(())
}

#[tokio::test]
async fn garbage_bytes_close_only_that_connection() -> anyhow::Result<()> {
    let node = DevNode::start()?;
    let mut service = setup(&node).await?;
    let acked = publish(&mut service, 2, "before").await?;

    let mut bad = RawClient::welcomed(&node, &node.service_token("bad")?).await?;
    // A length prefix that fits, then bytes that are no rkyv archive of a Frame.
    let mut garbage = 64u32.to_le_bytes().to_vec();
    garbage.extend((0..64u8).map(|i| i.wrapping_mul(37) ^ 0xa5));
    bad.send.write_all(&garbage).await?;
    let refusal = goodbye(&mut bad).await?;
    assert_eq!(refusal.code, RefusalCode::ProtocolError, "{refusal}");
    assert!(refusal.detail.contains("failed validation"), "{refusal}");

    // The other session on the node did not notice.
    let seq = publish(&mut service, 3, "after").await?;
    assert_eq!(seq, acked + 1);
    assert_still_serving(&node, &[acked, seq]).await
}

#[tokio::test]
async fn oversized_length_prefix_is_refused_before_the_body() -> anyhow::Result<()> {
    let node = DevNode::start()?;
    let mut service = setup(&node).await?;
    let acked = publish(&mut service, 2, "before").await?;
    let mut bad = RawClient::welcomed(&node, &node.service_token("bad")?).await?;
    bad.send.write_all(&u32::MAX.to_le_bytes()).await?;
    let refusal = goodbye(&mut bad).await?;
    assert_eq!(refusal.code, RefusalCode::ProtocolError);
    assert!(refusal.detail.contains("above the maximum"), "{refusal}");
    assert_still_serving(&node, &[acked]).await
}

#[tokio::test]
async fn garbage_instead_of_a_preamble_is_refused() -> anyhow::Result<()> {
    let node = DevNode::start()?;
    let mut bad = RawClient::connect(&node).await?;
    bad.send.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
    let mut preamble = [0u8; wire::PREAMBLE_LEN];
    bad.recv.read_exact(&mut preamble).await?;
    let refusal = goodbye(&mut bad).await?;
    assert_eq!(refusal.code, RefusalCode::ProtocolError);
    assert!(refusal.detail.contains("HRLD"), "{refusal}");
    setup(&node).await?;
    assert_still_serving(&node, &[]).await
}

#[tokio::test]
async fn another_protocol_version_is_told_so() -> anyhow::Result<()> {
    let node = DevNode::start()?;
    let mut bad = RawClient::connect(&node).await?;
    let mut preamble = wire::preamble();
    preamble[4] = 99;
    bad.send.write_all(&preamble).await?;
    let mut theirs = [0u8; wire::PREAMBLE_LEN];
    bad.recv.read_exact(&mut theirs).await?;
    let refusal = goodbye(&mut bad).await?;
    assert_eq!(refusal.code, RefusalCode::UnsupportedVersion);
    assert!(refusal.detail.contains("99"), "{refusal}");
    Ok(())
}

#[tokio::test]
async fn a_request_before_hello_is_refused() -> anyhow::Result<()> {
    let node = DevNode::start()?;
    let mut bad = RawClient::connect(&node).await?;
    bad.send.write_all(&wire::preamble()).await?;
    bad.request(1, Request::Unsubscribe { conv: 1 }).await?;
    let mut theirs = [0u8; wire::PREAMBLE_LEN];
    bad.recv.read_exact(&mut theirs).await?;
    let refusal = goodbye(&mut bad).await?;
    assert_eq!(refusal.code, RefusalCode::NotAuthenticated);
    Ok(())
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    role: &'a str,
    exp: u64,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sign(alg: jsonwebtoken::Algorithm, secret: &[u8], exp: u64) -> anyhow::Result<String> {
    let claims = Claims {
        sub: "1",
        role: "user",
        exp,
    };
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )?)
}

#[tokio::test]
async fn bad_tokens_are_refused_with_their_reason() -> anyhow::Result<()> {
    let node = DevNode::start()?;
    let secret = std::fs::read_to_string(node.secret_path())?;
    let secret = secret.trim().as_bytes();
    let hs256 = jsonwebtoken::Algorithm::HS256;
    let cases = [
        (
            sign(hs256, secret, now_s() - 60)?,
            RefusalCode::TokenExpired,
        ),
        (
            sign(hs256, b"not the secret", now_s() + 600)?,
            RefusalCode::BadSignature,
        ),
        (
            sign(jsonwebtoken::Algorithm::HS384, secret, now_s() + 600)?,
            RefusalCode::WrongAlgorithm,
        ),
        ("not.a.jwt".to_owned(), RefusalCode::MalformedToken),
    ];
    for (token, expected) in cases {
        let (_client, answer) = RawClient::hello(&node, &token).await?;
        let Frame::Goodbye(refusal) = answer else {
            anyhow::bail!("token for {expected:?} was accepted: {answer:?}");
        };
        assert_eq!(refusal.code, expected, "{refusal}");
        assert!(!refusal.detail.is_empty());
    }
    // The node still serves a good token.
    setup(&node).await?;
    Ok(())
}

#[tokio::test]
async fn users_are_refused_outside_their_conversations() -> anyhow::Result<()> {
    let node = DevNode::start()?;
    let mut service = setup(&node).await?;
    let acked = publish(&mut service, 2, "members only").await?;

    let mut outsider = RawClient::welcomed(&node, &node.user_token(9)?).await?;
    let reply = outsider.subscribe(1, 1, Some(1)).await?;
    assert_eq!(
        refusal_code(&reply),
        Some(RefusalCode::NotMember),
        "{reply:?}"
    );
    let reply = outsider
        .call(
            2,
            Request::Publish {
                conv: 1,
                key: IdempotencyKey::Caller("x".into()),
                payload: b"let me in".to_vec(),
            },
        )
        .await?;
    assert_eq!(
        refusal_code(&reply),
        Some(RefusalCode::NotMember),
        "{reply:?}"
    );
    let reply = outsider
        .call(
            3,
            Request::History {
                conv: 1,
                from: 1,
                limit: 10,
            },
        )
        .await?;
    assert_eq!(
        refusal_code(&reply),
        Some(RefusalCode::NotMember),
        "{reply:?}"
    );
    let reply = outsider
        .call(
            4,
            Request::CreateConversation {
                conv: 2,
                kind: ConvKind::Group,
                members: vec![9],
            },
        )
        .await?;
    assert_eq!(
        refusal_code(&reply),
        Some(RefusalCode::RoleNotAllowed),
        "{reply:?}"
    );
    let reply = outsider.subscribe(5, 77, None).await?;
    assert_eq!(
        refusal_code(&reply),
        Some(RefusalCode::NoSuchConversation),
        "{reply:?}"
    );

    // A member may; the refusals changed nothing.
    let mut member = RawClient::welcomed(&node, &node.user_token(2)?).await?;
    let reply = member.subscribe(1, 1, Some(1)).await?;
    assert!(
        matches!(
            reply,
            Reply::Subscribed {
                conv: 1,
                next_seq: 2
            }
        ),
        "{reply:?}"
    );
    assert_still_serving(&node, &[acked]).await
}

#[tokio::test]
async fn payload_over_the_limit_is_refused() -> anyhow::Result<()> {
    let node = DevNode::start_with_env(&[
        ("HERALD_LIMITS_PAYLOAD_BYTES_MAX", "1000"),
        ("HERALD_LIMITS_FRAME_BYTES_MAX", "4096"),
    ])?;
    let mut service = setup(&node).await?;
    let acked = publish(&mut service, 2, "small").await?;
    let reply = service
        .call(
            3,
            Request::Publish {
                conv: 1,
                key: IdempotencyKey::Caller("big".into()),
                payload: vec![b'x'; 1001],
            },
        )
        .await?;
    assert_eq!(
        refusal_code(&reply),
        Some(RefusalCode::PayloadTooLarge),
        "{reply:?}"
    );
    if let Reply::Refused(r) = &reply {
        assert!(
            r.detail.contains("1001") && r.detail.contains("1000"),
            "{r}"
        );
    }
    // Exactly at the limit is fine.
    let reply = service
        .call(
            4,
            Request::Publish {
                conv: 1,
                key: IdempotencyKey::Caller("edge".into()),
                payload: vec![b'x'; 1000],
            },
        )
        .await?;
    assert!(
        matches!(reply, Reply::Published { seq: 2, .. }),
        "{reply:?}"
    );
    assert_still_serving(&node, &[acked, 2]).await
}

#[tokio::test]
async fn subscriptions_over_the_limit_are_refused() -> anyhow::Result<()> {
    let node = DevNode::start_with_env(&[("HERALD_LIMITS_SUBSCRIPTIONS_PER_SESSION_MAX", "2")])?;
    let mut service = setup(&node).await?;
    for conv in [2, 3] {
        let reply = service
            .call(
                conv,
                Request::CreateConversation {
                    conv,
                    kind: ConvKind::Group,
                    members: vec![1],
                },
            )
            .await?;
        anyhow::ensure!(matches!(reply, Reply::Created { .. }), "{reply:?}");
    }
    let mut user = RawClient::welcomed(&node, &node.user_token(1)?).await?;
    for conv in [1, 2] {
        let reply = user.subscribe(conv, conv, None).await?;
        assert!(matches!(reply, Reply::Subscribed { .. }), "{reply:?}");
    }
    let reply = user.subscribe(3, 3, None).await?;
    assert_eq!(
        refusal_code(&reply),
        Some(RefusalCode::LimitReached),
        "{reply:?}"
    );
    // Unsubscribing frees a place.
    let reply = user.call(4, Request::Unsubscribe { conv: 1 }).await?;
    assert_eq!(reply, Reply::Done);
    let reply = user.subscribe(5, 3, None).await?;
    assert!(
        matches!(reply, Reply::Subscribed { conv: 3, .. }),
        "{reply:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_removed_member_stops_receiving() -> anyhow::Result<()> {
    let node = DevNode::start()?;
    let mut service = setup(&node).await?;
    let mut user = RawClient::welcomed(&node, &node.user_token(2)?).await?;
    let reply = user.subscribe(1, 1, None).await?;
    assert!(matches!(reply, Reply::Subscribed { .. }), "{reply:?}");
    let reply = service
        .call(
            2,
            Request::RemoveMembers {
                conv: 1,
                members: vec![2],
            },
        )
        .await?;
    assert_eq!(reply, Reply::Done);
    let event = user
        .read_until(|f| matches!(f, Frame::Event(wire::Event::Unsubscribed { .. })))
        .await
        .context("the removed member was not told")?;
    let Frame::Event(wire::Event::Unsubscribed { conv, reason }) = event else {
        unreachable!()
    };
    assert_eq!(conv, 1);
    assert_eq!(reason.code, RefusalCode::NotMember);
    Ok(())
}
