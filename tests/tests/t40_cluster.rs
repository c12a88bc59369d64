//! t40: a 3-node cluster as operators and clients see it — formation and the cluster
//! view (admin `/cluster` and `herald status`), writes through any node, reads from any
//! node, live delivery across nodes, restart from disk, and a peer port that serves
//! nothing to a stranger while the client port survives garbage.

use std::time::Duration;

use anyhow::Context;
use herald_broker::raft::codec::WireVote;
use herald_broker::raft::network::frame::{
    connection_exporter, encode_frame, hello_proof, read_frame, write_frame, CLOSE_AUTH_FAILED,
    CLOSE_PROTOCOL,
};
use herald_broker::raft::network::{
    GroupRequest, PeerHello, PeerReply, PeerRequest, PEER_FRAME_BYTES_MAX, PEER_REPLY_BYTES_MAX,
};
use herald_client::io::TransportLimits;
use herald_client::wire::{self, Frame, Principal, RefusalCode};
use herald_client::{ConvKind, IdempotencyKey, Publisher, Session, SessionEvent};
use herald_tests::checker::read_history;
use herald_tests::cluster::Cluster;
use herald_tests::{RawClient, DEADLINE};

/// The payloads of `conv`'s history on node `k` (read from it alone), once it holds at
/// least `at_least` messages.
async fn payloads(
    cluster: &Cluster,
    k: u16,
    conv: u64,
    at_least: u64,
) -> anyhow::Result<Vec<String>> {
    Ok(read_history(cluster, k, conv, at_least, DEADLINE)
        .await?
        .into_iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect())
}

fn follower_of(cluster: &Cluster, leader: u16) -> Vec<u16> {
    cluster.ids().into_iter().filter(|k| *k != leader).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_one_cluster_that_status_shows() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, &[]).await?;
    let result = async {
        // The three nodes share this machine's cores: dev-cluster gives each its share
        // of runtime threads (one per core each would steal and park against the others).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let share = format!("worker_threads = {}", (cores / 3).max(1));
        for k in cluster.ids() {
            let text = std::fs::read_to_string(cluster.config_path(k))?;
            anyhow::ensure!(
                text.contains(&share),
                "node {k}'s config lacks `{share}`:\n{text}"
            );
        }
        let leader = cluster.wait_leader().await?;
        let mut terms = Vec::new();
        let mut leaders_seen = Vec::new();
        for k in cluster.ids() {
            let status = cluster.status(k).await?;
            anyhow::ensure!(status["node_id"] == k, "node {k}: {status}");
            anyhow::ensure!(status["ready"] == true, "node {k} not ready: {status}");
            let nodes = status["nodes"].as_array().context("no nodes")?;
            let ids: Vec<u64> = nodes.iter().filter_map(|n| n["id"].as_u64()).collect();
            anyhow::ensure!(ids == [1, 2, 3], "node {k} lists nodes {ids:?}");
            for n in nodes {
                let id = n["id"].as_u64().unwrap_or(0) as u16;
                anyhow::ensure!(n["groups"] == 1, "node {k}: {n}");
                anyhow::ensure!(
                    n["addr"] == cluster.addr(id).to_string(),
                    "node {k} lists {n}, expected addr {}",
                    cluster.addr(id)
                );
            }
            let group = &status["groups"][0];
            anyhow::ensure!(
                group["replicas"] == serde_json::json!([1, 2, 3]),
                "node {k}: {group}"
            );
            anyhow::ensure!(
                group["leader"] == leader,
                "node {k} says the leader is {}, not {leader}",
                group["leader"]
            );
            terms.push(group["term"].as_u64().context("no term")?);
            if group["state"] == "Leader" {
                leaders_seen.push(k);
                let lag = group["lag"].as_object().context("no lag on the leader")?;
                let mut keys: Vec<&String> = lag.keys().collect();
                keys.sort();
                let expected: Vec<String> = follower_of(&cluster, k)
                    .iter()
                    .map(|f| f.to_string())
                    .collect();
                anyhow::ensure!(
                    keys == expected.iter().collect::<Vec<_>>(),
                    "the leader's lag names {keys:?}, expected {expected:?}"
                );
                anyhow::ensure!(lag.values().all(|v| v.is_u64()), "lag values: {lag:?}");
            } else {
                anyhow::ensure!(
                    group["lag"].as_object().is_none_or(|l| l.is_empty()),
                    "a follower reports lag: {group}"
                );
            }
            anyhow::ensure!(group["commit_index"].as_u64().is_some(), "{group}");
        }
        anyhow::ensure!(
            leaders_seen == [leader],
            "nodes in state Leader: {leaders_seen:?}"
        );
        anyhow::ensure!(
            terms.windows(2).all(|w| w[0] == w[1]),
            "terms differ: {terms:?}"
        );

        // `herald status` on a follower prints the same picture.
        let follower = follower_of(&cluster, leader)[0];
        let token = cluster.service_token("ops")?;
        let out = cluster.cli(follower, &token)?.arg("status").output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success(),
            "herald status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for k in cluster.ids() {
            anyhow::ensure!(
                text.contains(&cluster.addr(k).to_string()),
                "no node {k} in:\n{text}"
            );
        }
        let group_line = text
            .lines()
            .skip_while(|l| !l.starts_with("GROUP"))
            .nth(1)
            .context("no group line")?;
        let fields: Vec<&str> = group_line.split_whitespace().collect();
        anyhow::ensure!(
            fields.get(1) == Some(&"0..4096")
                && fields.get(2) == Some(&leader.to_string().as_str())
                && fields.get(3) == Some(&terms[0].to_string().as_str()),
            "group line {group_line:?} should show leader {leader} and term {}:\n{text}",
            terms[0]
        );
        let out = cluster
            .cli(follower, &token)?
            .args(["status", "--json"])
            .output()?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
        anyhow::ensure!(json["groups"][0]["leader"] == leader, "{json}");

        // `/metrics` carries the same Raft picture for Prometheus.
        for k in cluster.ids() {
            let (code, text) = cluster.admin_get(k, "/metrics").await?;
            anyhow::ensure!(code == 200, "node {k} /metrics: {code}");
            // Raft series carry the group (the only one here is group 1).
            let value = |name: &str| {
                text.lines()
                    .find_map(|l| {
                        let rest = l.strip_prefix(name)?;
                        let rest = rest.strip_prefix("{group=\"1\"}").unwrap_or(rest);
                        rest.strip_prefix(' ')
                    })
                    .and_then(|v| v.trim().parse::<f64>().ok())
            };
            let is_leader = if k == leader { 1.0 } else { 0.0 };
            anyhow::ensure!(
                value("herald_raft_leader") == Some(is_leader)
                    && value("herald_raft_term") == Some(terms[0] as f64)
                    && value("herald_raft_fsyncs_total").is_some_and(|n| n > 0.0)
                    && value("herald_raft_log_bytes").is_some_and(|n| n > 0.0)
                    && value("herald_raft_applied_index").is_some_and(|n| n > 0.0),
                "node {k} (leader {leader}, term {}) exports:\n{}",
                terms[0],
                text.lines()
                    .filter(|l| l.starts_with("herald_raft"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        Ok(())
    }
    .await;
    cluster.finish(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_through_a_follower_is_acked_and_readable_on_every_node() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, &[]).await?;
    let result = async {
        let leader = cluster.wait_leader().await?;
        let followers = follower_of(&cluster, leader);
        let token = cluster.service_token("svc")?;
        let via_follower =
            Publisher::connect(cluster.client_config(&token, &followers[..1])?).await?;
        anyhow::ensure!(
            via_follower
                .create_conversation(1, ConvKind::Group, &[1, 2])
                .await?,
            "conversation 1 existed already"
        );
        let key = || IdempotencyKey::Caller("order-1".into());
        let ack = via_follower
            .publish_with_key(1, key(), "via a follower")
            .await?;
        anyhow::ensure!(ack.seq == 1 && !ack.duplicate, "{ack:?}");
        // The same key through the other follower: the original seq, nothing appended.
        let other = Publisher::connect(cluster.client_config(&token, &followers[1..])?).await?;
        let retry = other.publish_with_key(1, key(), "via a follower").await?;
        anyhow::ensure!(retry.seq == 1 && retry.duplicate, "retry: {retry:?}");
        let ack = other.publish(1, "second").await?;
        anyhow::ensure!(ack.seq == 2 && !ack.duplicate, "{ack:?}");
        for k in cluster.ids() {
            let history = payloads(&cluster, k, 1, 2).await?;
            anyhow::ensure!(
                history == ["via a follower", "second"],
                "node {k} history: {history:?}"
            );
        }
        via_follower.close().await;
        other.close().await;
        Ok(())
    }
    .await;
    cluster.finish(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_on_node_3_receives_what_node_1_published() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, &[]).await?;
    let result = async {
        let publisher =
            Publisher::connect(cluster.client_config(&cluster.service_token("svc")?, &[1])?)
                .await?;
        publisher
            .create_conversation(5, ConvKind::Group, &[7])
            .await?;
        let mut session =
            Session::connect(cluster.client_config(&cluster.user_token(7)?, &[3])?).await?;
        // Node 3 may not have applied the creation yet: subscribe once it has.
        let until = std::time::Instant::now() + DEADLINE;
        let next = loop {
            match session.subscribe(5, None).await {
                Ok(next) => break next,
                Err(e) if std::time::Instant::now() < until => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e).context("subscribing on node 3"),
            }
        };
        anyhow::ensure!(next == 1, "next_seq {next}");
        let ack = publisher.publish(5, "hello from node 1").await?;
        anyhow::ensure!(ack.seq == 1, "{ack:?}");
        let event = tokio::time::timeout(DEADLINE, async {
            loop {
                match session.next().await {
                    Some(Ok(SessionEvent::Message(m))) => return Ok(m),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(anyhow::Error::from(e)),
                    None => anyhow::bail!("the session ended"),
                }
            }
        })
        .await
        .context("node 3's session received nothing")??;
        anyhow::ensure!(
            event.conv == 5 && event.seq == 1 && event.payload == b"hello from node 1",
            "{event:?}"
        );
        anyhow::ensure!(
            event.sender == Principal::Service("svc".into()),
            "{event:?}"
        );
        session.close().await;
        publisher.close().await;
        Ok(())
    }
    .await;
    cluster.finish(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_restarted_from_disk_keep_their_history_and_own_their_data_dir() -> anyhow::Result<()>
{
    let cluster = Cluster::start(3, &[]).await?;
    let result = async {
        let token = cluster.service_token("svc")?;
        let publisher = Publisher::connect(cluster.client_config(&token, &cluster.ids())?).await?;
        publisher
            .create_conversation(1, ConvKind::Group, &[1])
            .await?;
        for i in 1..=100u64 {
            let ack = publisher.publish(1, format!("m{i}")).await?;
            anyhow::ensure!(ack.seq == i, "m{i} acked as seq {}", ack.seq);
        }
        publisher.close().await;
        let expected: Vec<String> = (1..=100).map(|i| format!("m{i}")).collect();

        // A second process on a running node's data directory is refused before it
        // touches the log (two writers would interleave appends), naming the holder.
        let second = std::process::Command::new(herald_tests::herald_binary()?)
            .arg("serve")
            .arg("--config")
            .arg(cluster.config_path(1))
            .env("RUST_LOG", "warn")
            .output()?;
        let stderr = String::from_utf8_lossy(&second.stderr);
        let holder = cluster.pid(1).context("node 1 has no pid")?;
        anyhow::ensure!(
            !second.status.success()
                && stderr.contains("in use by another herald process")
                && stderr.contains(&format!("pid {holder}")),
            "a second node 1 was not refused ({}): {stderr}",
            second.status
        );

        // One follower, killed and restarted.
        let leader = cluster.wait_leader().await?;
        let k = follower_of(&cluster, leader)[1];
        anyhow::ensure!(
            payloads(&cluster, k, 1, 100).await? == expected,
            "node {k} before"
        );
        cluster.kill9(k);
        cluster.restart(k).await?;
        let after = payloads(&cluster, k, 1, 100).await?;
        anyhow::ensure!(after == expected, "node {k} after its restart: {after:?}");

        // The whole cluster, killed at once and restarted.
        for k in cluster.ids() {
            cluster.kill9(k);
        }
        cluster.restart_all(&cluster.ids()).await?;
        for k in cluster.ids() {
            let after = payloads(&cluster, k, 1, 100).await?;
            anyhow::ensure!(
                after == expected,
                "node {k} after the cluster restart: {after:?}"
            );
        }
        let publisher = Publisher::connect(cluster.client_config(&token, &cluster.ids())?).await?;
        let ack = publisher.publish(1, "m101").await?;
        anyhow::ensure!(ack.seq == 101, "the next message got seq {}", ack.seq);
        publisher.close().await;
        Ok(())
    }
    .await;
    cluster.finish(result)
}

/// The Goodbye a misbehaving client connection gets before it closes.
async fn goodbye(client: &mut RawClient) -> anyhow::Result<wire::Refusal> {
    match client
        .read_until(|f| matches!(f, Frame::Goodbye(_)))
        .await?
    {
        Frame::Goodbye(r) => Ok(r),
        other => anyhow::bail!("unexpected {other:?}"),
    }
}

/// A QUIC connection to node `k` offering ALPN `herald-peer/1`, verified like a node's.
async fn peer_connect(
    cluster: &Cluster,
    k: u16,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let ca = std::fs::read(cluster.ca_path())?;
    let config =
        herald_client::io::client_config(&ca, wire::ALPN_PEER, &TransportLimits::default())?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(config);
    let conn = endpoint.connect(cluster.addr(k), "127.0.0.1")?.await?;
    Ok((endpoint, conn))
}

/// One peer RPC on its own stream: the reply, or why none came.
async fn peer_call(conn: &quinn::Connection, request: &PeerRequest) -> anyhow::Result<PeerReply> {
    tokio::time::timeout(DEADLINE, async {
        let (mut send, mut recv) = conn.open_bi().await?;
        let bytes = encode_frame(request, "request", PEER_FRAME_BYTES_MAX)?;
        write_frame(&mut send, &bytes, "request").await?;
        Ok(read_frame::<PeerReply>(&mut recv, "reply", PEER_REPLY_BYTES_MAX).await?)
    })
    .await
    .context("no peer reply in time")?
}

/// Waits until the acceptor closes `conn`; its application close code.
async fn closed_with(conn: &quinn::Connection) -> anyhow::Result<u64> {
    match tokio::time::timeout(DEADLINE, conn.closed()).await? {
        quinn::ConnectionError::ApplicationClosed(c) => Ok(c.error_code.into_inner()),
        other => anyhow::bail!("closed with {other}, expected an application close"),
    }
}

/// After a refusal, the connection serves nothing: a further RPC gets no reply.
async fn serves_nothing(conn: &quinn::Connection) -> anyhow::Result<()> {
    let heartbeat = GroupRequest::Vote {
        vote: WireVote {
            term: 1_000_000,
            node_id: 2,
            committed: false,
        },
        last_log_id: None,
    }
    .to(1);
    match peer_call(conn, &heartbeat).await {
        Ok(reply) => anyhow::bail!("a refused connection answered an RPC with {reply:?}"),
        Err(_) => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_port_refuses_a_connection_without_a_valid_hello() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, &[]).await?;
    let result = async {
        let leader = cluster.wait_leader().await?;
        let term_before = cluster.group(leader).await?["term"]
            .as_u64()
            .context("term")?;
        let token = cluster.service_token("svc")?;
        let publisher = Publisher::connect(cluster.client_config(&token, &cluster.ids())?).await?;
        publisher
            .create_conversation(1, ConvKind::Group, &[1])
            .await?;
        publisher.publish(1, "real").await?;
        let secret = herald_broker::certs::read_secret(&cluster.cluster_secret_path())?;

        // Control: a hello with the right secret, bound to this connection, is accepted
        // (so the refusals below are about the hello, not the harness).
        let (_e0, good) = peer_connect(&cluster, leader).await?;
        let exporter = connection_exporter(&good).context("no TLS exporter")?;
        let reply = peer_call(
            &good,
            &PeerRequest::Hello(PeerHello {
                node_id: 3,
                proof: hello_proof(&secret, 3, &exporter),
            }),
        )
        .await?;
        anyhow::ensure!(reply == PeerReply::HelloOk, "a valid hello got {reply:?}");

        // Four strangers at once (each refusal lingers up to 2 s for the dialer).
        // 1. No hello: a vote with a huge term first. Refused, closed, not counted.
        let case1 = async {
            let (_e1, conn) = peer_connect(&cluster, leader).await?;
            let vote = GroupRequest::Vote {
                vote: WireVote {
                    term: 1_000_000,
                    node_id: 2,
                    committed: false,
                },
                last_log_id: None,
            }
            .to(1);
            match peer_call(&conn, &vote).await? {
                PeerReply::Refused(text) => {
                    anyhow::ensure!(text.contains("hello"), "refusal: {text}")
                }
                other => anyhow::bail!("a vote before the hello got {other:?}"),
            }
            anyhow::ensure!(closed_with(&conn).await? == u64::from(CLOSE_PROTOCOL));
            serves_nothing(&conn).await?;
            anyhow::Ok(())
        };

        // 2. No hello: a forwarded write first. Refused; nothing is appended.
        let case2 = async {
            let (_e2, conn) = peer_connect(&cluster, leader).await?;
            let forged = GroupRequest::Forward(herald_broker::store::Command::Publish {
                conv: 1,
                sender: Principal::Service("intruder".into()),
                key: IdempotencyKey::Caller("intruder".into()),
                payload: b"forged".to_vec(),
                timestamp_ms: 0,
            })
            .to(1);
            let reply = peer_call(&conn, &forged).await?;
            anyhow::ensure!(
                matches!(reply, PeerReply::Refused(_)),
                "forward before hello: {reply:?}"
            );
            anyhow::ensure!(closed_with(&conn).await? == u64::from(CLOSE_PROTOCOL));
            anyhow::Ok(())
        };

        // 3. A fake hello (a proof made up without the secret).
        let case3 = async {
            let (_e3, conn) = peer_connect(&cluster, leader).await?;
            let reply = peer_call(
                &conn,
                &PeerRequest::Hello(PeerHello {
                    node_id: 2,
                    proof: vec![0x5a; 32],
                }),
            )
            .await?;
            match reply {
                PeerReply::Refused(text) => {
                    anyhow::ensure!(text.contains("wrong cluster secret"), "refusal: {text}")
                }
                other => anyhow::bail!("a fake hello got {other:?}"),
            }
            anyhow::ensure!(closed_with(&conn).await? == u64::from(CLOSE_AUTH_FAILED));
            serves_nothing(&conn).await?;
            anyhow::Ok(())
        };

        // 4. A real proof replayed on another connection (it is bound to its TLS session).
        let case4 = async {
            let (_e4, conn) = peer_connect(&cluster, leader).await?;
            let (_e5, other) = peer_connect(&cluster, leader).await?;
            let other_exporter = connection_exporter(&other).context("no TLS exporter")?;
            let reply = peer_call(
                &conn,
                &PeerRequest::Hello(PeerHello {
                    node_id: 2,
                    proof: hello_proof(&secret, 2, &other_exporter),
                }),
            )
            .await?;
            anyhow::ensure!(
                matches!(reply, PeerReply::Refused(_)),
                "replayed proof: {reply:?}"
            );
            anyhow::ensure!(closed_with(&conn).await? == u64::from(CLOSE_AUTH_FAILED));
            serves_nothing(&conn).await?;
            anyhow::Ok(())
        };

        tokio::try_join!(case1, case2, case3, case4)?;

        // Nothing of that reached Raft or the store.
        for k in cluster.ids() {
            let history = payloads(&cluster, k, 1, 1).await?;
            anyhow::ensure!(history == ["real"], "node {k} history: {history:?}");
            let term = cluster.group(k).await?["term"].as_u64().context("term")?;
            anyhow::ensure!(
                term < 1_000_000 && term >= term_before,
                "node {k} term {term} (before: {term_before})"
            );
        }
        anyhow::ensure!(publisher.publish(1, "after").await?.seq == 2);
        publisher.close().await;
        Ok(())
    }
    .await;
    cluster.finish(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_peer_frames_on_the_client_port_get_a_protocol_error() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, &[]).await?;
    let result = async {
        let k = 2;
        let ca = cluster.ca_path();
        let token = cluster.service_token("svc")?;
        let publisher = Publisher::connect(cluster.client_config(&token, &[k])?).await?;
        publisher
            .create_conversation(1, ConvKind::Group, &[1])
            .await?;
        anyhow::ensure!(publisher.publish(1, "before").await?.seq == 1);

        // A peer hello frame where the client preamble belongs.
        let mut bad = RawClient::connect_to(cluster.addr(k), &ca).await?;
        let hello = PeerRequest::Hello(PeerHello {
            node_id: 1,
            proof: vec![1; 32],
        });
        bad.send
            .write_all(&encode_frame(&hello, "hello", PEER_FRAME_BYTES_MAX)?)
            .await?;
        let mut preamble = [0u8; wire::PREAMBLE_LEN];
        bad.recv.read_exact(&mut preamble).await?;
        let refusal = goodbye(&mut bad).await?;
        anyhow::ensure!(refusal.code == RefusalCode::ProtocolError, "{refusal}");

        // A peer request frame after a good hello.
        let mut bad = RawClient::welcomed_to(cluster.addr(k), &ca, &token).await?;
        let vote = GroupRequest::Vote {
            vote: WireVote {
                term: 1_000_000,
                node_id: 1,
                committed: false,
            },
            last_log_id: None,
        }
        .to(1);
        bad.send
            .write_all(&encode_frame(&vote, "request", PEER_FRAME_BYTES_MAX)?)
            .await?;
        let refusal = goodbye(&mut bad).await?;
        anyhow::ensure!(refusal.code == RefusalCode::ProtocolError, "{refusal}");

        // Garbage bytes after a good hello.
        let mut bad = RawClient::welcomed_to(cluster.addr(k), &ca, &token).await?;
        let mut garbage = 64u32.to_le_bytes().to_vec();
        garbage.extend((0..64u8).map(|i| i.wrapping_mul(37) ^ 0xa5));
        bad.send.write_all(&garbage).await?;
        let refusal = goodbye(&mut bad).await?;
        anyhow::ensure!(refusal.code == RefusalCode::ProtocolError, "{refusal}");

        // The node, its other session and the cluster did not notice.
        anyhow::ensure!(publisher.publish(1, "after").await?.seq == 2);
        anyhow::ensure!(cluster.is_ready(k).await, "node {k} is not ready any more");
        for n in cluster.ids() {
            anyhow::ensure!(payloads(&cluster, n, 1, 2).await? == ["before", "after"]);
            let term = cluster.group(n).await?["term"].as_u64().context("term")?;
            anyhow::ensure!(term < 1_000_000, "node {n} term {term}");
        }
        publisher.close().await;
        Ok(())
    }
    .await;
    cluster.finish(result)
}
