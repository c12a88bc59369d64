//! State machine tests: apply → history from the log, snapshot build → install on a
//! fresh replica → the same history, snapshot file reload, and a damaged file refused.

use std::collections::HashMap;
use std::sync::Mutex as StdMutex;

use herald_client::wire::{ConvKind, IdempotencyKey, Principal};
use openraft::{CommittedLeaderId, RaftSnapshotBuilder};

use crate::store::Command;

use super::*;

/// An in-memory log: what the entries applied were; when armed, a gate the next read
/// stops at (it says it is there, then waits to be let through); and, when armed, who
/// to tell when a read finds nothing.
#[derive(Default)]
struct MemLog(
    StdMutex<HashMap<u64, Entry>>,
    StdMutex<Option<Gate>>,
    StdMutex<Option<tokio::sync::oneshot::Sender<()>>>,
);

/// `(tell the test a read arrived, wait for the test's go)`.
type Gate = (
    tokio::sync::oneshot::Sender<()>,
    tokio::sync::oneshot::Receiver<()>,
);

impl EntrySource for MemLog {
    fn entry(&self, index: u64) -> Result<Option<Entry>, String> {
        let gate = self.1.lock().unwrap().take();
        if let Some((arrived, go)) = gate {
            arrived.send(()).unwrap();
            // Reads run on blocking threads (snapshot builds in spawn_blocking).
            go.blocking_recv().unwrap();
        }
        let entry = self.0.lock().unwrap().get(&index).cloned();
        if entry.is_none() {
            if let Some(missed) = self.2.lock().unwrap().take() {
                missed.send(()).unwrap();
            }
        }
        Ok(entry)
    }
}

fn entry(index: u64, command: Command) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(crate::raft::Batch::new(vec![command])),
    }
}

fn open(dir: &std::path::Path, log: Arc<MemLog>) -> StateMachine {
    StateMachine::open(
        StateMachineConfig {
            group: 1,
            dir: dir.to_owned(),
            limits: StoreLimits::default(),
        },
        crate::fanout::Hub::new(Arc::new(crate::routing::Router::new())),
        Arc::new(Metrics::new()),
        log,
    )
    .unwrap()
}

async fn apply_all(sm: &mut StateMachine, log: &MemLog, commands: Vec<Command>) -> Vec<Response> {
    let start = sm.applied_index() + 1;
    let entries: Vec<Entry> = commands
        .into_iter()
        .enumerate()
        .map(|(i, c)| entry(start + i as u64, c))
        .collect();
    for e in &entries {
        log.0.lock().unwrap().insert(e.log_id.index, e.clone());
    }
    sm.apply(entries)
        .await
        .unwrap()
        .into_iter()
        .flatten()
        .collect()
}

/// A replica in `dir` that applied conversation 1's creation (entry 1) and messages
/// m1..=m`messages` (entries 2..).
async fn replica_with_messages(
    dir: &std::path::Path,
    messages: u64,
) -> (StateMachine, Arc<MemLog>) {
    let log = Arc::new(MemLog::default());
    let mut sm = open(dir, log.clone());
    let mut commands = vec![Command::CreateConversation {
        conv: 1,
        kind: ConvKind::Group,
        members: vec![1],
    }];
    commands.extend((1..=messages).map(publish));
    apply_all(&mut sm, &log, commands).await;
    (sm, log)
}

/// Starts a snapshot build of `sm` and returns once it stops at its first read of
/// `log`: the build, and the sender that lets it go on.
async fn build_stopped_at_first_read(
    sm: &StateMachine,
    log: &MemLog,
) -> (
    tokio::task::JoinHandle<Result<Snapshot<TypeConfig>, StorageError>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (arrived_tx, arrived) = tokio::sync::oneshot::channel();
    let (go, go_rx) = tokio::sync::oneshot::channel();
    *log.1.lock().unwrap() = Some((arrived_tx, go_rx));
    let mut builder = sm.clone();
    let build = tokio::spawn(async move { builder.build_snapshot().await });
    arrived.await.unwrap();
    (build, go)
}

fn publish(n: u64) -> Command {
    Command::Publish {
        conv: 1,
        sender: Principal::Service("svc".into()),
        key: IdempotencyKey::Caller(format!("k{n}")),
        payload: format!("m{n}").into_bytes(),
        timestamp_ms: 1000 + n,
    }
}

fn payloads(history: &History) -> Vec<String> {
    history
        .messages
        .iter()
        .map(|m| String::from_utf8(m.message.payload.clone()).unwrap())
        .collect()
}

#[tokio::test]
async fn history_comes_back_from_the_log_and_through_a_snapshot() {
    let dir_a = tempfile::tempdir().unwrap();
    let log_a = Arc::new(MemLog::default());
    let mut a = open(dir_a.path(), log_a.clone());
    let mut commands = vec![Command::CreateConversation {
        conv: 1,
        kind: ConvKind::Group,
        members: vec![1, 2],
    }];
    commands.extend((1..=5).map(publish));
    commands.push(publish(3)); // a retry: deduplicated
    let responses = apply_all(&mut a, &log_a, commands).await;
    assert_eq!(responses[0], Ok(Outcome::Created { created: true }));
    assert_eq!(
        responses[6],
        Ok(Outcome::Published {
            seq: 3,
            duplicate: true
        })
    );
    let history = a.read(1, 2, 10).unwrap();
    assert_eq!(payloads(&history), ["m2", "m3", "m4", "m5"]);
    assert_eq!(history.messages[0].message.seq, 2);
    assert_eq!(history.messages[0].message.timestamp_ms, 1002);

    // Snapshot on A, install on B (which has no log at all).
    let snapshot = a.build_snapshot().await.unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let mut b = open(dir_b.path(), Arc::new(MemLog::default()));
    b.install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    assert_eq!(
        payloads(&b.read(1, 1, 10).unwrap()),
        ["m1", "m2", "m3", "m4", "m5"]
    );
    assert_eq!(
        b.applied_state().await.unwrap().0,
        Some(entry(7, publish(0)).log_id)
    );
    // The dedup table came along: a retry on B is still a duplicate.
    let log_b = MemLog::default();
    let responses = apply_all(&mut b, &log_b, vec![publish(4), publish(6)]).await;
    assert_eq!(
        responses,
        vec![
            Ok(Outcome::Published {
                seq: 4,
                duplicate: true
            }),
            Ok(Outcome::Published {
                seq: 6,
                duplicate: false
            })
        ]
    );

    // B restarts from its snapshot file: the snapshot's history is there.
    let b2 = open(dir_b.path(), Arc::new(MemLog::default()));
    assert_eq!(
        payloads(&b2.read(1, 1, 10).unwrap()),
        ["m1", "m2", "m3", "m4", "m5"]
    );
}

#[tokio::test]
async fn a_damaged_snapshot_file_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(MemLog::default());
    let mut sm = open(dir.path(), log.clone());
    apply_all(
        &mut sm,
        &log,
        vec![
            Command::CreateConversation {
                conv: 1,
                kind: ConvKind::Group,
                members: vec![1],
            },
            publish(1),
        ],
    )
    .await;
    sm.build_snapshot().await.unwrap();
    let path = dir.path().join("current.snap");
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let err = StateMachine::open(
        StateMachineConfig {
            group: 1,
            dir: dir.path().to_owned(),
            limits: StoreLimits::default(),
        },
        crate::fanout::Hub::new(Arc::new(crate::routing::Router::new())),
        Arc::new(Metrics::new()),
        log,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("damaged"), "{err}");
}

#[tokio::test]
async fn purge_stops_below_the_oldest_message_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(MemLog::default());
    let mut sm = open(dir.path(), log.clone());
    assert_eq!(sm.purgeable_upto(), None, "no snapshot yet");
    let mut commands = vec![Command::CreateConversation {
        conv: 1,
        kind: ConvKind::Group,
        members: vec![1],
    }];
    commands.extend((1..=3).map(publish));
    apply_all(&mut sm, &log, commands).await;
    sm.build_snapshot().await.unwrap();
    // Message 1 lives in entry 2: entries up to 1 may go.
    assert_eq!(sm.purgeable_upto(), Some(1));
}

#[tokio::test]
async fn applies_go_on_while_a_snapshot_is_built_and_its_messages_stay_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(MemLog::default());
    let mut sm = StateMachine::open(
        StateMachineConfig {
            group: 1,
            dir: dir.path().to_owned(),
            limits: StoreLimits {
                history_messages_max: 3,
                ..StoreLimits::default()
            },
        },
        crate::fanout::Hub::new(Arc::new(crate::routing::Router::new())),
        Arc::new(Metrics::new()),
        log.clone(),
    )
    .unwrap();
    let mut commands = vec![Command::CreateConversation {
        conv: 1,
        kind: ConvKind::Group,
        members: vec![1],
    }];
    commands.extend((1..=5).map(publish));
    apply_all(&mut sm, &log, commands).await;
    sm.build_snapshot().await.unwrap();
    // m3..m5 are retained; m3 lives in entry 4.
    assert_eq!(sm.purgeable_upto(), Some(3));

    let (build, go) = build_stopped_at_first_read(&sm, &log).await;
    // The build reads m3's entry now. Applies do not wait for it: m6 and m7 push m3
    // and m4 out of history...
    apply_all(&mut sm, &log, (6..=7).map(publish).collect()).await;
    assert_eq!(
        sm.history_floor(),
        Ok(Some(4)),
        "the build still reads entry 4"
    );
    // ...but the entries the build reads stay: without it, 5 could go.
    assert_eq!(sm.purgeable_upto(), Some(3));
    go.send(()).unwrap();
    let snapshot = build.await.unwrap().unwrap();
    assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(6));
    // The snapshot holds m3..m5; the log must keep m5 (entry 6) onwards.
    assert_eq!(sm.history_floor(), Ok(Some(6)));
    assert_eq!(sm.purgeable_upto(), Some(5));
}

#[tokio::test]
async fn a_snapshot_installed_during_a_build_is_the_one_kept() {
    // The leader's replica, further on: its snapshot covers entries 1..=8.
    let leader_dir = tempfile::tempdir().unwrap();
    let (mut leader, _) = replica_with_messages(leader_dir.path(), 7).await;
    let installed = leader.build_snapshot().await.unwrap();

    // A follower at entry 4 starts a build that stops at its first read.
    let dir = tempfile::tempdir().unwrap();
    let (mut follower, log) = replica_with_messages(dir.path(), 3).await;
    let (build, go) = build_stopped_at_first_read(&follower, &log).await;
    follower
        .install_snapshot(&installed.meta, installed.snapshot)
        .await
        .unwrap();
    go.send(()).unwrap();

    // The build hands back the installed snapshot, and that is what stays, on disk too.
    let built = build.await.unwrap().unwrap();
    assert_eq!(built.meta, installed.meta);
    let current = follower.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, installed.meta);
    drop(follower);
    let reopened = open(dir.path(), log);
    assert_eq!(reopened.applied_index(), 8);
    assert_eq!(
        payloads(&reopened.read(1, 1, 100).unwrap()),
        (1..=7).map(|n| format!("m{n}")).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_build_whose_entries_an_install_purged_first_returns_the_installed_snapshot() {
    // The leader's replica, further on: its snapshot covers entries 1..=8.
    let leader_dir = tempfile::tempdir().unwrap();
    let (mut leader, _) = replica_with_messages(leader_dir.path(), 7).await;
    let installed = leader.build_snapshot().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (mut follower, log) = replica_with_messages(dir.path(), 3).await;
    let (build, go) = build_stopped_at_first_read(&follower, &log).await;
    // openraft purges behind an install as soon as it queues it: the build's reads
    // fail before the state machine has the snapshot.
    let (missed_tx, missed) = tokio::sync::oneshot::channel();
    *log.2.lock().unwrap() = Some(missed_tx);
    log.0.lock().unwrap().clear();
    go.send(()).unwrap();
    missed.await.unwrap();
    follower
        .install_snapshot(&installed.meta, installed.snapshot)
        .await
        .unwrap();

    let built = build.await.unwrap().unwrap();
    assert_eq!(built.meta, installed.meta);
    let current = follower.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, installed.meta);
}
