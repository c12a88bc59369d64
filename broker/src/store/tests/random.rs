//! A long random run of commands against a small model: `validate()` after every
//! apply, gapless seqs, duplicates that return the key's seq, refusals that change
//! nothing, and every outcome reached.

use std::collections::HashMap;

use super::*;

/// xorshift64*: a small deterministic PRNG so the run is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A name per kind of outcome, to check the random run reaches every path.
fn outcome_name(result: &Result<Applied, StoreError>) -> &'static str {
    match result {
        Ok(Applied::Created { created: true }) => "created",
        Ok(Applied::Created { created: false }) => "recreated",
        Ok(Applied::MembersChanged) => "members changed",
        Ok(Applied::Trimmed) => "trimmed",
        Ok(Applied::Published {
            duplicate: false, ..
        }) => "published",
        Ok(Applied::Published {
            duplicate: true, ..
        }) => "duplicate",
        Err(StoreError::NoSuchConversation { .. }) => "no such conversation",
        Err(StoreError::Conflict { .. }) => "conflict",
        Err(StoreError::NotMember { .. }) => "not member",
        Err(StoreError::RoleNotAllowed { .. }) => "role not allowed",
        Err(StoreError::LimitReached { .. }) => "limit reached",
        Err(StoreError::Invalid { .. }) => "invalid",
        Err(StoreError::PayloadTooLarge { .. }) => "payload too large",
    }
}

#[test]
fn randomized_commands_keep_every_invariant() {
    let mut seen: HashMap<&'static str, usize> = HashMap::new();
    for seed in 1..=8u64 {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
        let mut s = store();
        let mut now = 0u64;
        // Model: next seq per conversation and the seqs each key has been given.
        let mut next: HashMap<u64, u64> = HashMap::new();
        let mut given: HashMap<(u64, IdempotencyKey), Vec<u64>> = HashMap::new();
        for _ in 0..3_000 {
            // Time mostly moves forward, sometimes back (another leader's clock).
            now = match rng.below(10) {
                0 => now.saturating_sub(rng.below(2_000)),
                _ => now + rng.below(400),
            };
            let conv = rng.below(6);
            let members: Vec<u64> = (0..rng.below(6)).map(|_| rng.below(8)).collect();
            let command = match rng.below(10) {
                0 => {
                    let kind = [ConvKind::Direct, ConvKind::Group, ConvKind::Channel]
                        [rng.below(3) as usize];
                    Command::CreateConversation {
                        conv,
                        kind,
                        members,
                    }
                }
                1 => Command::AddMembers { conv, members },
                2 => Command::RemoveMembers { conv, members },
                3 => {
                    s.trim_expired(now);
                    s.validate().unwrap();
                    continue;
                }
                _ => Command::Publish {
                    conv,
                    sender: if rng.below(3) == 0 {
                        user(rng.below(8))
                    } else {
                        svc()
                    },
                    key: key(rng.below(12)),
                    payload: vec![0; rng.below(6000) as usize],
                    timestamp_ms: now,
                },
            };
            let before = (
                s.conversation_count(),
                s.message_count(),
                s.next_seq(conv).ok(),
            );
            let publish_key = match &command {
                Command::Publish { key, .. } => Some(key.clone()),
                _ => None,
            };
            let result = apply(&mut s, command);
            *seen.entry(outcome_name(&result)).or_default() += 1;
            match result {
                Err(_) if publish_key.is_some() => {
                    let after = (
                        s.conversation_count(),
                        s.message_count(),
                        s.next_seq(conv).ok(),
                    );
                    assert_eq!(before, after, "a refused publish changes nothing");
                }
                Err(_) => assert_eq!(before.0, s.conversation_count()),
                Ok(Applied::Created { created: true }) => {
                    assert_eq!(next.insert(conv, 1), None);
                }
                Ok(Applied::Published {
                    seq,
                    duplicate,
                    stored,
                }) => {
                    let given = given.entry((conv, publish_key.unwrap())).or_default();
                    let expected = next.get_mut(&conv).unwrap();
                    if duplicate {
                        assert!(stored.is_none());
                        assert_eq!(
                            given.last(),
                            Some(&seq),
                            "a duplicate returns the key's latest seq"
                        );
                    } else {
                        assert_eq!(seq, *expected, "seqs are gapless");
                        *expected += 1;
                        given.push(seq);
                    }
                }
                Ok(_) => {}
            }
            // Any read is gapless, in order, and inside [first_seq, next_seq).
            if let Ok(h) = read(&s, conv, rng.below(40), rng.below(8) as usize) {
                for (i, m) in h.messages.iter().enumerate() {
                    assert_eq!(m.message.seq, h.messages[0].message.seq + i as u64);
                    assert!(m.message.seq >= h.first_seq && m.message.seq < h.next_seq);
                }
            }
        }
        assert!(
            s.message_count() > 0,
            "seed {seed}: the run should publish something"
        );
    }
}
