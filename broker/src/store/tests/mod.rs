//! Tests of the conversation state machine. Every `apply` goes through [`apply`], which
//! runs `validate()` afterwards.

use herald_client::wire::{decode_body, Frame, RefusalCode, FRAME_HEADER_LEN};

use super::*;

const SERVICE: &str = "billing";

fn svc() -> Principal {
    Principal::Service(SERVICE.into())
}

fn user(id: u64) -> Principal {
    Principal::User(id)
}

fn key(n: u64) -> IdempotencyKey {
    IdempotencyKey::Producer {
        producer_id: 1,
        producer_seq: n,
    }
}

/// Small bounds, so every bound is reachable in a test.
fn small_limits() -> StoreLimits {
    StoreLimits {
        group_members_max: 4,
        history_messages_max: 5,
        history_retention_ms: 10_000,
        dedup_window_ms: 1_000,
        dedup_keys_max: 3,
        conversations_max: 4,
        frame_bytes_max: 4096,
    }
}

fn store() -> ConversationStore {
    ConversationStore::new(small_limits())
}

thread_local! {
    /// The "Raft log" of this test thread: every command applied, by index.
    static LOG: std::cell::RefCell<Vec<Command>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Applies as the next log entry (recorded for [`read`]) and checks every invariant.
fn apply(s: &mut ConversationStore, command: Command) -> Result<Applied, StoreError> {
    let index = LOG.with(|log| {
        let mut log = log.borrow_mut();
        log.push(command.clone());
        log.len() as u64
    });
    let result = s.apply(&command, index, 0, true);
    if let Err(broken) = s.validate() {
        panic!("invariant broken after apply: {broken}");
    }
    result
}

fn create(
    s: &mut ConversationStore,
    conv: u64,
    kind: ConvKind,
    members: &[u64],
) -> Result<Applied, StoreError> {
    apply(
        s,
        Command::CreateConversation {
            conv,
            kind,
            members: members.to_vec(),
        },
    )
}

fn publish_as(
    s: &mut ConversationStore,
    conv: u64,
    sender: Principal,
    key: IdempotencyKey,
    timestamp_ms: u64,
) -> Result<Applied, StoreError> {
    apply(
        s,
        Command::Publish {
            conv,
            sender,
            key,
            payload: format!("m{timestamp_ms}").into_bytes(),
            timestamp_ms,
        },
    )
}

/// Publishes as the service; returns (seq, duplicate).
fn publish(
    s: &mut ConversationStore,
    conv: u64,
    key: IdempotencyKey,
    timestamp_ms: u64,
) -> (u64, bool) {
    match publish_as(s, conv, svc(), key, timestamp_ms).unwrap() {
        Applied::Published {
            seq,
            duplicate,
            stored,
        } => {
            assert_eq!(stored.is_none(), duplicate);
            if let Some(stored) = stored {
                assert_eq!(stored.message.seq, seq);
            }
            (seq, duplicate)
        }
        other => panic!("expected Published, got {other:?}"),
    }
}

/// Reads history and resolves each reference against this thread's log, as the state
/// machine does against the Raft log.
fn read(s: &ConversationStore, conv: u64, from: u64, limit: usize) -> Result<History, StoreError> {
    let refs = s.read(conv, from, limit)?;
    let messages = refs
        .refs
        .iter()
        .map(|(seq, r)| {
            let Location::Log { index, .. } = r.location else {
                panic!("store tests only use log locations");
            };
            let command = LOG.with(|log| log.borrow()[index as usize - 1].clone());
            Arc::new(
                StoredMessage::from_publish(
                    command,
                    *seq,
                    r.timestamp_ms,
                    s.limits().frame_bytes_max,
                )
                .expect("a reference points at a publish"),
            )
        })
        .collect();
    Ok(History {
        messages,
        first_seq: refs.first_seq,
        next_seq: refs.next_seq,
    })
}

fn seqs(history: &History) -> Vec<u64> {
    history.messages.iter().map(|m| m.message.seq).collect()
}

#[test]
fn create_is_idempotent_for_same_kind_and_members() {
    let mut s = store();
    assert!(matches!(
        create(&mut s, 7, ConvKind::Group, &[1, 2, 3]),
        Ok(Applied::Created { created: true })
    ));
    // Same members in another order and with duplicates: the same conversation.
    assert!(matches!(
        create(&mut s, 7, ConvKind::Group, &[3, 2, 1, 2]),
        Ok(Applied::Created { created: false })
    ));
    assert!(matches!(
        create(&mut s, 8, ConvKind::Direct, &[1, 2]),
        Ok(Applied::Created { created: true })
    ));
    assert!(matches!(
        create(&mut s, 8, ConvKind::Direct, &[2, 1]),
        Ok(Applied::Created { created: false })
    ));
    assert_eq!(s.conversation_count(), 2);
    assert_eq!(s.next_seq(7), Ok(1));
}

#[test]
fn recreate_with_other_kind_or_members_conflicts() {
    let mut s = store();
    create(&mut s, 7, ConvKind::Group, &[1, 2]).unwrap();
    let err = create(&mut s, 7, ConvKind::Channel, &[1, 2]).unwrap_err();
    assert!(matches!(err, StoreError::Conflict { conv: 7, .. }), "{err}");
    assert_eq!(err.refusal().code, RefusalCode::ConversationConflict);
    let err = create(&mut s, 7, ConvKind::Group, &[1, 2, 3]).unwrap_err();
    assert!(matches!(err, StoreError::Conflict { conv: 7, .. }), "{err}");
    // Compared with the current members: after an add, the new set is "the same".
    apply(
        &mut s,
        Command::AddMembers {
            conv: 7,
            members: vec![3],
        },
    )
    .unwrap();
    assert!(matches!(
        create(&mut s, 7, ConvKind::Group, &[1, 2, 3]),
        Ok(Applied::Created { created: false })
    ));
    assert!(create(&mut s, 7, ConvKind::Group, &[1, 2]).is_err());
}

#[test]
fn direct_needs_exactly_two_distinct_members() {
    let mut s = store();
    for members in [&[][..], &[1], &[1, 1], &[1, 2, 3]] {
        let err = create(&mut s, 1, ConvKind::Direct, members).unwrap_err();
        assert!(
            matches!(err, StoreError::Invalid { .. }),
            "{members:?}: {err}"
        );
        assert_eq!(err.refusal().code, RefusalCode::InvalidRequest);
    }
    assert_eq!(s.conversation_count(), 0);
    create(&mut s, 1, ConvKind::Direct, &[1, 2, 2]).unwrap();
    assert_eq!(s.is_member(1, 1), Ok(true));
    assert_eq!(s.is_member(1, 2), Ok(true));
}

#[test]
fn direct_members_cannot_change() {
    let mut s = store();
    create(&mut s, 1, ConvKind::Direct, &[1, 2]).unwrap();
    let add = apply(
        &mut s,
        Command::AddMembers {
            conv: 1,
            members: vec![3],
        },
    );
    assert!(matches!(add, Err(StoreError::Invalid { .. })), "{add:?}");
    let remove = apply(
        &mut s,
        Command::RemoveMembers {
            conv: 1,
            members: vec![2],
        },
    );
    assert!(
        matches!(remove, Err(StoreError::Invalid { .. })),
        "{remove:?}"
    );
    assert_eq!(s.is_member(1, 2), Ok(true));
    assert_eq!(s.is_member(1, 3), Ok(false));
}

#[test]
fn member_bound_applies_to_create_and_add_all_or_nothing() {
    let mut s = store();
    for kind in [ConvKind::Group, ConvKind::Channel] {
        let err = create(&mut s, 1, kind, &[1, 2, 3, 4, 5]).unwrap_err();
        assert_eq!(
            err,
            StoreError::LimitReached {
                what: "members per group or owners per channel",
                limit: 4
            }
        );
        assert_eq!(err.refusal().code, RefusalCode::LimitReached);
    }
    create(&mut s, 1, ConvKind::Group, &[1, 2, 3]).unwrap();
    // Present members do not count twice; 4 is the bound.
    apply(
        &mut s,
        Command::AddMembers {
            conv: 1,
            members: vec![3, 4, 4],
        },
    )
    .unwrap();
    let err = apply(
        &mut s,
        Command::AddMembers {
            conv: 1,
            members: vec![5, 6],
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, StoreError::LimitReached { limit: 4, .. }),
        "{err}"
    );
    assert_eq!(s.is_member(1, 5), Ok(false), "a refused add adds nobody");
    apply(
        &mut s,
        Command::RemoveMembers {
            conv: 1,
            members: vec![1, 99],
        },
    )
    .unwrap();
    apply(
        &mut s,
        Command::AddMembers {
            conv: 1,
            members: vec![5],
        },
    )
    .unwrap();
    assert_eq!(s.is_member(1, 1), Ok(false));
    assert_eq!(s.is_member(1, 5), Ok(true));
}

#[test]
fn conversation_bound_refuses_new_ones_but_not_recreates() {
    let mut s = store();
    for conv in 1..=4 {
        create(&mut s, conv, ConvKind::Group, &[]).unwrap();
    }
    let err = create(&mut s, 5, ConvKind::Group, &[]).unwrap_err();
    assert_eq!(
        err,
        StoreError::LimitReached {
            what: "conversations",
            limit: 4
        }
    );
    assert!(matches!(
        create(&mut s, 4, ConvKind::Group, &[]),
        Ok(Applied::Created { created: false })
    ));
    assert_eq!(s.conversation_count(), 4);
}

#[test]
fn seqs_are_gapless_from_one_per_conversation() {
    let mut s = ConversationStore::new(StoreLimits {
        history_messages_max: 100,
        dedup_keys_max: 100,
        ..small_limits()
    });
    create(&mut s, 1, ConvKind::Group, &[]).unwrap();
    create(&mut s, 2, ConvKind::Group, &[]).unwrap();
    for n in 1..=50 {
        assert_eq!(publish(&mut s, 1, key(n), n), (n, false));
        if n % 2 == 0 {
            assert_eq!(publish(&mut s, 2, key(n), n), (n / 2, false));
        }
    }
    let h = read(&s, 1, 1, 100).unwrap();
    assert_eq!(seqs(&h), (1..=50).collect::<Vec<_>>());
    assert_eq!((h.first_seq, h.next_seq), (1, 51));
    assert_eq!(s.next_seq(2), Ok(26));
    assert_eq!(s.message_count(), 75);
}

#[test]
fn duplicate_within_window_returns_original_seq_and_appends_nothing() {
    let mut s = store();
    create(&mut s, 1, ConvKind::Group, &[]).unwrap();
    let pay = IdempotencyKey::Caller("payment-123".into());
    assert_eq!(publish(&mut s, 1, pay.clone(), 100), (1, false));
    assert_eq!(publish(&mut s, 1, key(1), 200), (2, false));
    // Retries, even with another payload, get the original seq.
    assert_eq!(publish(&mut s, 1, pay.clone(), 300), (1, true));
    let retry = Command::Publish {
        conv: 1,
        sender: svc(),
        key: key(1),
        payload: b"other".to_vec(),
        timestamp_ms: 1_100,
    };
    assert!(matches!(
        apply(&mut s, retry),
        Ok(Applied::Published {
            seq: 2,
            duplicate: true,
            stored: None
        })
    ));
    assert_eq!(s.next_seq(1), Ok(3));
    assert_eq!(s.message_count(), 2);
    assert_eq!(
        read(&s, 1, 1, 10).unwrap().messages[1].message.payload,
        b"m200".to_vec()
    );
}

#[test]
fn retry_after_the_window_appends_a_new_message() {
    let mut s = store(); // window 1_000 ms
    create(&mut s, 1, ConvKind::Group, &[]).unwrap();
    assert_eq!(publish(&mut s, 1, key(1), 5_000), (1, false));
    // At exactly the window's end the key is still remembered …
    assert_eq!(publish(&mut s, 1, key(1), 6_000), (1, true));
    // … one ms later it is forgotten: the late retry is a new message.
    assert_eq!(publish(&mut s, 1, key(1), 6_001), (2, false));
    // And that new message's key is remembered from its own time.
    assert_eq!(publish(&mut s, 1, key(1), 7_001), (2, true));
}

#[test]
fn key_bound_forgets_the_oldest_key_of_the_conversation() {
    let mut s = store(); // 3 keys per conversation
    create(&mut s, 1, ConvKind::Group, &[]).unwrap();
    create(&mut s, 2, ConvKind::Group, &[]).unwrap();
    for n in 1..=3 {
        assert_eq!(publish(&mut s, 1, key(n), 0), (n, false));
    }
    // Keys live per conversation: filling conversation 2 does not touch 1.
    for n in 1..=3 {
        assert_eq!(publish(&mut s, 2, key(n), 0), (n, false));
    }
    assert_eq!(publish(&mut s, 1, key(1), 0), (1, true));
    assert_eq!(publish(&mut s, 1, key(4), 0), (4, false)); // forgets key 1
    assert_eq!(publish(&mut s, 1, key(2), 0), (2, true));
    assert_eq!(
        publish(&mut s, 1, key(1), 0),
        (5, false),
        "a forgotten key appends anew"
    );
    assert_eq!(publish(&mut s, 2, key(1), 0), (1, true));
}

#[test]
fn producer_and_caller_keys_are_distinct_and_caller_keys_are_bounded() {
    let mut s = store();
    create(&mut s, 1, ConvKind::Group, &[]).unwrap();
    let a = IdempotencyKey::Producer {
        producer_id: 1,
        producer_seq: 2,
    };
    let b = IdempotencyKey::Producer {
        producer_id: 2,
        producer_seq: 1,
    };
    assert_eq!(publish(&mut s, 1, a, 0), (1, false));
    assert_eq!(publish(&mut s, 1, b, 0), (2, false));
    assert_eq!(
        publish(&mut s, 1, IdempotencyKey::Caller("1".into()), 0),
        (3, false)
    );
    for bad in [String::new(), "k".repeat(CALLER_KEY_BYTES_MAX + 1)] {
        let err = publish_as(&mut s, 1, svc(), IdempotencyKey::Caller(bad), 0).unwrap_err();
        assert!(matches!(err, StoreError::Invalid { .. }), "{err}");
    }
    let longest = IdempotencyKey::Caller("k".repeat(CALLER_KEY_BYTES_MAX));
    assert_eq!(publish(&mut s, 1, longest, 0), (4, false));
}

#[test]
fn history_is_bounded_by_count() {
    let mut s = store(); // 5 messages per conversation
    create(&mut s, 1, ConvKind::Group, &[]).unwrap();
    for n in 1..=12 {
        publish(&mut s, 1, key(n), n);
    }
    let h = read(&s, 1, 1, 100).unwrap();
    assert_eq!(seqs(&h), vec![8, 9, 10, 11, 12]);
    assert_eq!((h.first_seq, h.next_seq), (8, 13));
    assert_eq!(s.message_count(), 5);
}

#[test]
fn history_is_bounded_by_age_on_publish() {
    let mut s = store(); // 10 s retention
    create(&mut s, 1, ConvKind::Group, &[]).unwrap();
    create(&mut s, 2, ConvKind::Group, &[]).unwrap();
    publish(&mut s, 1, key(1), 1_000);
    publish(&mut s, 1, key(2), 2_000);
    publish(&mut s, 2, key(1), 1_000);
    // Exactly `retention` old is kept; older is evicted, in the published conversation only.
    publish(&mut s, 1, key(3), 11_000);
    assert_eq!(seqs(&read(&s, 1, 1, 10).unwrap()), vec![1, 2, 3]);
    publish(&mut s, 1, key(4), 12_001);
    assert_eq!(seqs(&read(&s, 1, 1, 10).unwrap()), vec![3, 4]);
    assert_eq!(seqs(&read(&s, 2, 1, 10).unwrap()), vec![1]);
    assert_eq!(s.message_count(), 3);
}

#[test]
fn trim_expired_drops_old_messages_and_keys() {
    let mut s = store();
    create(&mut s, 1, ConvKind::Group, &[]).unwrap();
    create(&mut s, 2, ConvKind::Group, &[]).unwrap();
    publish(&mut s, 1, key(1), 1_000);
    publish(&mut s, 2, key(1), 5_000);
    s.trim_expired(1_500);
    s.validate().unwrap();
    assert_eq!(s.message_count(), 2);
    s.trim_expired(11_001); // conv 1's message is 10_001 ms old, conv 2's 6_001
    s.validate().unwrap();
    assert_eq!(s.message_count(), 1);
    let h = read(&s, 1, 1, 10).unwrap();
    assert!(h.messages.is_empty());
    assert_eq!((h.first_seq, h.next_seq), (2, 2));
    // The key expired too (window 1 s): a retry now appends.
    assert_eq!(publish(&mut s, 2, key(1), 11_001), (2, false));
    s.trim_expired(100_000);
    s.validate().unwrap();
    assert_eq!(s.message_count(), 0);
    assert_eq!(s.next_seq(2), Ok(3), "trimming never rewinds seqs");
}

#[test]
fn read_of_an_evicted_range_reports_truncation_via_first_seq() {
    let mut s = store();
    create(&mut s, 1, ConvKind::Group, &[]).unwrap();
    for n in 1..=9 {
        publish(&mut s, 1, key(n), n);
    }
    let h = read(&s, 1, 2, 3).unwrap();
    assert!(h.first_seq > 2, "the caller detects truncation");
    assert_eq!(h.first_seq, 5);
    assert_eq!(seqs(&h), vec![5, 6, 7]);
    let h = read(&s, 1, 0, 100).unwrap();
    assert_eq!(seqs(&h), vec![5, 6, 7, 8, 9]);
}

#[test]
fn read_pages_in_order_and_handles_edges() {
    let mut s = store();
    create(&mut s, 1, ConvKind::Group, &[]).unwrap();
    let empty = read(&s, 1, 1, 10).unwrap();
    assert!(empty.messages.is_empty());
    assert_eq!((empty.first_seq, empty.next_seq), (1, 1));
    for n in 1..=5 {
        publish(&mut s, 1, key(n), n);
    }
    assert_eq!(seqs(&read(&s, 1, 2, 2).unwrap()), vec![2, 3]);
    assert_eq!(seqs(&read(&s, 1, 4, 2).unwrap()), vec![4, 5]);
    assert_eq!(seqs(&read(&s, 1, 5, 100).unwrap()), vec![5]);
    assert!(read(&s, 1, 6, 10).unwrap().messages.is_empty());
    assert!(read(&s, 1, u64::MAX, 10).unwrap().messages.is_empty());
    assert!(read(&s, 1, 1, 0).unwrap().messages.is_empty());
    let all = read(&s, 1, 1, usize::MAX).unwrap();
    assert_eq!(seqs(&all), vec![1, 2, 3, 4, 5]);
    assert_eq!(all.next_seq, 6);
}

#[test]
fn timestamps_never_decrease_within_a_conversation() {
    let mut s = store();
    create(&mut s, 1, ConvKind::Group, &[]).unwrap();
    publish(&mut s, 1, key(1), 5_000);
    publish(&mut s, 1, key(2), 3_000); // a leader whose clock is behind
    let h = read(&s, 1, 1, 10).unwrap();
    let stamps: Vec<u64> = h.messages.iter().map(|m| m.message.timestamp_ms).collect();
    assert_eq!(stamps, vec![5_000, 5_000]);
    // The dedup window runs on the clamped clock: key 1 is still fresh.
    assert_eq!(publish(&mut s, 1, key(1), 0), (1, true));
}

#[test]
fn stored_frame_is_the_encoded_deliver_of_the_message() {
    let mut s = store();
    create(&mut s, 3, ConvKind::Group, &[]).unwrap();
    let Applied::Published {
        stored: Some(stored),
        ..
    } = publish_as(&mut s, 3, svc(), key(1), 42).unwrap()
    else {
        panic!("expected a stored message");
    };
    assert_eq!((stored.delivery.conv, stored.delivery.seq), (3, 1));
    let frame = &stored.delivery.frame;
    let len = u32::from_le_bytes(frame[..FRAME_HEADER_LEN].try_into().unwrap()) as usize;
    assert_eq!(len, frame.len() - FRAME_HEADER_LEN);
    let decoded = decode_body(&frame[FRAME_HEADER_LEN..], 0).unwrap();
    assert_eq!(decoded, Frame::Deliver(stored.message.clone()));
    assert_eq!(stored.message.sender, svc());
    assert_eq!(stored.message.timestamp_ms, 42);
    // History read back from the log gives the same message and frame bytes.
    let h = read(&s, 3, 1, 1).unwrap();
    assert_eq!(h.messages[0].message, stored.message);
    assert_eq!(h.messages[0].delivery.frame, stored.delivery.frame);
}

#[test]
fn payload_too_large_is_refused_and_changes_nothing() {
    let mut s = store(); // 4096-byte frames
    create(&mut s, 1, ConvKind::Group, &[]).unwrap();
    let big = Command::Publish {
        conv: 1,
        sender: svc(),
        key: key(1),
        payload: vec![0; 5000],
        timestamp_ms: 1,
    };
    let err = apply(&mut s, big).unwrap_err();
    assert_eq!(
        err,
        StoreError::PayloadTooLarge {
            conv: 1,
            payload_bytes: 5000,
            frame_bytes_max: 4096
        }
    );
    assert_eq!(err.refusal().code, RefusalCode::PayloadTooLarge);
    assert_eq!(s.next_seq(1), Ok(1));
    // The key was not consumed: the same key with a fitting payload is a new message.
    assert_eq!(publish(&mut s, 1, key(1), 2), (1, false));
}

#[test]
fn a_replica_that_does_not_deliver_decides_every_publish_alike() {
    // Payloads around the frame limit (4096 here), from a user and from services with
    // short and long names: the replica that builds the frame and the one that only
    // bounds its size must accept and refuse the same publishes, and end up equal.
    let senders = [
        Principal::User(7),
        svc(),
        Principal::Service("s".repeat(300)),
    ];
    let mut delivering = store();
    let mut silent = store();
    for s in [&mut delivering, &mut silent] {
        s.apply(
            &Command::CreateConversation {
                conv: 1,
                kind: ConvKind::Group,
                members: vec![7],
            },
            1,
            0,
            true,
        )
        .unwrap();
    }
    let mut index = 1;
    for (k, sender) in senders.iter().enumerate() {
        for payload_bytes in (3600..4100).step_by(7) {
            index += 1;
            let command = Command::Publish {
                conv: 1,
                sender: sender.clone(),
                key: key(index),
                payload: vec![1; payload_bytes],
                timestamp_ms: index,
            };
            let with = delivering.apply(&command, index, 0, true);
            let without = silent.apply(&command, index, 0, false);
            match (&with, &without) {
                (
                    Ok(Applied::Published {
                        seq: a,
                        stored: Some(stored),
                        ..
                    }),
                    Ok(Applied::Published {
                        seq: b,
                        stored: None,
                        ..
                    }),
                ) => {
                    assert_eq!(a, b, "sender {k}, {payload_bytes} bytes");
                    assert!(stored.delivery.frame.len() - FRAME_HEADER_LEN <= 4096);
                }
                (Err(a), Err(b)) => assert_eq!(a, b, "sender {k}, {payload_bytes} bytes"),
                other => panic!("sender {k}, {payload_bytes} bytes: {other:?}"),
            }
        }
    }
    assert_eq!(delivering.next_seq(1), silent.next_seq(1));
    assert!(delivering.next_seq(1).unwrap() > 100, "most publishes fit");
}

#[test]
fn deliver_frame_bound_holds() {
    // The size bound that lets a replica skip building a frame is never below the
    // frame's real size.
    for sender in [
        Principal::User(u64::MAX),
        Principal::Service(String::new()),
        Principal::Service("billing".into()),
        Principal::Service("x".repeat(1000)),
    ] {
        for payload_bytes in [0, 1, 7, 8, 9, 15, 16, 17, 100, 1000, 4095, 65_536] {
            let bound = super::conversation::deliver_frame_bytes_max(&sender, payload_bytes);
            let message = Message {
                conv: u64::MAX,
                seq: u64::MAX,
                sender: sender.clone(),
                timestamp_ms: u64::MAX,
                payload: vec![0xff; payload_bytes],
            };
            let stored = StoredMessage::new(message, u32::MAX).unwrap();
            let real = stored.delivery.frame.len() as u64;
            assert!(
                real <= bound,
                "{sender:?}, {payload_bytes} bytes: {real} > {bound}"
            );
            assert!(
                bound - real <= 256,
                "the bound stays close: {real} vs {bound}"
            );
        }
    }
}

#[test]
fn zero_bounds_retain_nothing_but_still_assign_seqs() {
    let limits = StoreLimits {
        history_messages_max: 0,
        dedup_keys_max: 0,
        ..small_limits()
    };
    let mut s = ConversationStore::new(limits);
    create(&mut s, 1, ConvKind::Group, &[]).unwrap();
    assert_eq!(publish(&mut s, 1, key(1), 0), (1, false));
    assert_eq!(
        publish(&mut s, 1, key(1), 0),
        (2, false),
        "no keys remembered"
    );
    let h = read(&s, 1, 1, 10).unwrap();
    assert!(h.messages.is_empty());
    assert_eq!((h.first_seq, h.next_seq), (3, 3));
    assert_eq!(s.message_count(), 0);
    let mut none = ConversationStore::new(StoreLimits {
        conversations_max: 0,
        ..small_limits()
    });
    assert!(matches!(
        create(&mut none, 1, ConvKind::Group, &[]),
        Err(StoreError::LimitReached { .. })
    ));
}

#[test]
fn default_limits_follow_the_brief() {
    let l = StoreLimits::default();
    assert_eq!(l.group_members_max, 10_000);
    assert_eq!(l.history_messages_max, 100_000);
    assert_eq!(l.history_retention_ms, 7 * 24 * 60 * 60 * 1000);
    assert_eq!(l.dedup_window_ms, 24 * 60 * 60 * 1000);
    assert_eq!(l.dedup_keys_max, 100_000);
    assert_eq!(
        l.frame_bytes_max,
        herald_client::wire::DEFAULT_FRAME_BYTES_MAX
    );
    // A 64 KiB payload, the default maximum, fits in a default frame.
    let mut s = ConversationStore::new(l);
    create(&mut s, 1, ConvKind::Group, &[]).unwrap();
    let max = Command::Publish {
        conv: 1,
        sender: svc(),
        key: key(1),
        payload: vec![7; 64 * 1024],
        timestamp_ms: 0,
    };
    assert!(matches!(
        apply(&mut s, max),
        Ok(Applied::Published { seq: 1, .. })
    ));
}

#[test]
fn every_error_names_its_refusal_code_and_reason() {
    let who = user(5);
    let cases = [
        (
            StoreError::NoSuchConversation { conv: 1 },
            RefusalCode::NoSuchConversation,
        ),
        (
            StoreError::Conflict {
                conv: 1,
                reason: "it is a group, not a channel".into(),
            },
            RefusalCode::ConversationConflict,
        ),
        (
            StoreError::NotMember { user: 5, conv: 1 },
            RefusalCode::NotMember,
        ),
        (
            StoreError::RoleNotAllowed {
                principal: who,
                action: Action::Manage,
                conv: 1,
                reason: "only services create conversations and change members",
            },
            RefusalCode::RoleNotAllowed,
        ),
        (
            StoreError::LimitReached {
                what: "conversations",
                limit: 1,
            },
            RefusalCode::LimitReached,
        ),
        (
            StoreError::Invalid {
                reason: "a direct conversation has exactly 2 distinct members".into(),
            },
            RefusalCode::InvalidRequest,
        ),
        (
            StoreError::PayloadTooLarge {
                conv: 1,
                payload_bytes: 2,
                frame_bytes_max: 1,
            },
            RefusalCode::PayloadTooLarge,
        ),
    ];
    for (err, code) in cases {
        let refusal = err.refusal();
        assert_eq!(refusal.code, code);
        assert_eq!(refusal.detail, err.to_string());
        assert!(
            refusal.detail.len() > 20,
            "a sentence, not a code: {}",
            refusal.detail
        );
    }
}

mod access;
mod random;
