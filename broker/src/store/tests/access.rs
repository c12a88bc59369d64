//! Who may do what: unknown conversations, services, users, channel followers and
//! owners, and membership changes racing a publish.

use herald_client::wire::RefusalCode;

use super::*;

#[test]
fn unknown_conversation_is_refused_everywhere() {
    let mut s = store();
    let none = StoreError::NoSuchConversation { conv: 9 };
    assert_eq!(
        apply(
            &mut s,
            Command::AddMembers {
                conv: 9,
                members: vec![1]
            }
        )
        .unwrap_err(),
        none
    );
    assert_eq!(
        apply(
            &mut s,
            Command::RemoveMembers {
                conv: 9,
                members: vec![1]
            }
        )
        .unwrap_err(),
        none
    );
    assert_eq!(publish_as(&mut s, 9, svc(), key(1), 0).unwrap_err(), none);
    assert_eq!(read(&s, 9, 1, 10).unwrap_err(), none);
    assert_eq!(s.next_seq(9).unwrap_err(), none);
    assert_eq!(s.is_member(9, 1).unwrap_err(), none);
    assert_eq!(s.kind(9).unwrap_err(), none);
    for action in [Action::Publish, Action::Subscribe, Action::ReadHistory] {
        assert_eq!(s.authorize(&svc(), action, 9).unwrap_err(), none);
        assert_eq!(s.authorize(&user(1), action, 9).unwrap_err(), none);
    }
    assert_eq!(none.refusal().code, RefusalCode::NoSuchConversation);
}

#[test]
fn services_may_do_everything() {
    let mut s = store();
    // Manage is decided by role: a service may create conversations that do not exist yet.
    assert_eq!(s.authorize(&svc(), Action::Manage, 1), Ok(()));
    create(&mut s, 1, ConvKind::Direct, &[1, 2]).unwrap();
    create(&mut s, 2, ConvKind::Group, &[]).unwrap();
    create(&mut s, 3, ConvKind::Channel, &[]).unwrap();
    for conv in 1..=3 {
        for action in [
            Action::Manage,
            Action::Publish,
            Action::Subscribe,
            Action::ReadHistory,
        ] {
            assert_eq!(
                s.authorize(&svc(), action, conv),
                Ok(()),
                "{action} in {conv}"
            );
        }
        assert_eq!(publish(&mut s, conv, key(1), 0), (1, false));
    }
}

#[test]
fn users_may_not_manage() {
    let mut s = store();
    create(&mut s, 1, ConvKind::Group, &[5]).unwrap();
    for conv in [1, 2] {
        let err = s.authorize(&user(5), Action::Manage, conv).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::RoleNotAllowed {
                    action: Action::Manage,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.refusal().code, RefusalCode::RoleNotAllowed);
    }
}

#[test]
fn users_need_membership_in_direct_and_group() {
    let mut s = store();
    create(&mut s, 1, ConvKind::Direct, &[1, 2]).unwrap();
    create(&mut s, 2, ConvKind::Group, &[1, 3]).unwrap();
    for action in [Action::Publish, Action::Subscribe, Action::ReadHistory] {
        assert_eq!(s.authorize(&user(1), action, 1), Ok(()));
        assert_eq!(s.authorize(&user(1), action, 2), Ok(()));
        assert_eq!(
            s.authorize(&user(3), action, 1),
            Err(StoreError::NotMember { user: 3, conv: 1 })
        );
        assert_eq!(
            s.authorize(&user(2), action, 2),
            Err(StoreError::NotMember { user: 2, conv: 2 })
        );
    }
    assert!(matches!(
        publish_as(&mut s, 1, user(2), key(1), 0),
        Ok(Applied::Published { seq: 1, .. })
    ));
    let err = publish_as(&mut s, 2, user(2), key(1), 0).unwrap_err();
    assert_eq!(err, StoreError::NotMember { user: 2, conv: 2 });
    assert_eq!(err.refusal().code, RefusalCode::NotMember);
    assert_eq!(s.next_seq(2), Ok(1));
}

#[test]
fn channel_followers_read_and_subscribe_but_only_owners_and_services_publish() {
    let mut s = store();
    create(&mut s, 1, ConvKind::Channel, &[10]).unwrap();
    for follower in [11, 12, u64::MAX] {
        assert_eq!(s.authorize(&user(follower), Action::Subscribe, 1), Ok(()));
        assert_eq!(s.authorize(&user(follower), Action::ReadHistory, 1), Ok(()));
        let err = s
            .authorize(&user(follower), Action::Publish, 1)
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::RoleNotAllowed {
                    action: Action::Publish,
                    conv: 1,
                    ..
                }
            ),
            "{err}"
        );
    }
    assert_eq!(s.authorize(&user(10), Action::Publish, 1), Ok(()));
    assert_eq!(publish(&mut s, 1, key(1), 0), (1, false));
    assert!(matches!(
        publish_as(&mut s, 1, user(10), key(2), 0),
        Ok(Applied::Published { seq: 2, .. })
    ));
    assert!(publish_as(&mut s, 1, user(11), key(3), 0).is_err());
    assert_eq!(s.next_seq(1), Ok(3));
}

#[test]
fn removed_member_loses_access_and_their_in_flight_publish_is_refused() {
    let mut s = store();
    create(&mut s, 1, ConvKind::Group, &[1, 2]).unwrap();
    assert_eq!(s.authorize(&user(2), Action::Publish, 1), Ok(()));
    // The engine authorised user 2, then a removal got into the log first.
    apply(
        &mut s,
        Command::RemoveMembers {
            conv: 1,
            members: vec![2],
        },
    )
    .unwrap();
    assert!(matches!(
        publish_as(&mut s, 1, user(2), key(1), 0),
        Err(StoreError::NotMember { user: 2, conv: 1 })
    ));
    assert_eq!(
        s.authorize(&user(2), Action::Subscribe, 1),
        Err(StoreError::NotMember { user: 2, conv: 1 })
    );
    assert_eq!(s.next_seq(1), Ok(1));
}
