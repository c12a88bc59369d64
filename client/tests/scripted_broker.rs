//! The client's reconnect and retry rules against a *scripted* broker: a real QUIC
//! server (quinn, TLS with the test CA in `tests/data`) whose every connection follows
//! a script, so a test can drop a connection at an exact point — with a publish in
//! flight, between a reply and a replay — which the real broker does not do on demand.
//!
//! This is a seam, not a stand-in: `tests/e2e.rs` runs the same client against the
//! real `herald` binary (delivery, refusals, a slow-consumer disconnect and resync).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use herald_client::io::{FrameReader, FrameWriter};
use herald_client::wire::{
    self, Event, Frame, Message, Principal, Refusal, RefusalCode, Reply, Request, SessionLimits,
    Welcome, FRAME_BYTES_CEILING,
};
use herald_client::{ClientConfig, Error, IdempotencyKey, Publisher, Session, SessionEvent};
use rustls_pki_types::pem::PemObject;
use tokio::sync::{mpsc, Notify};

const CA: &str = include_str!("data/ca.pem");
const CERT: &str = include_str!("data/server.pem");
const KEY: &str = include_str!("data/server.key");
const DEADLINE: Duration = Duration::from_secs(10);

/// One accepted connection of the scripted broker.
struct Peer {
    conn: quinn::Connection,
    reader: FrameReader,
    writer: FrameWriter,
}

impl Peer {
    /// Reads preamble and Hello; answers with preamble and Welcome.
    async fn welcome(&mut self, session_id: u64) {
        self.hello().await;
        self.writer.queue_encoded(&wire::preamble());
        self.send(Frame::Welcome(Welcome {
            session_id,
            principal: Principal::User(1),
            limits: SessionLimits {
                frame_bytes_max: wire::DEFAULT_FRAME_BYTES_MAX,
                payload_bytes_max: 64 * 1024,
                subscriptions_max: 100,
            },
        }))
        .await;
    }

    async fn hello(&mut self) {
        self.reader.read_preamble().await.unwrap();
        match self.reader.next().await.unwrap() {
            Some(Frame::Hello(_)) => {}
            other => panic!("expected Hello, got {other:?}"),
        }
    }

    /// The next request, answering any cluster-map request on the way as a broker
    /// without sharding would (refused: the publisher then stays unrouted).
    async fn request(&mut self) -> (u64, Request) {
        loop {
            match tokio::time::timeout(DEADLINE, self.reader.next()).await {
                Ok(Ok(Some(Frame::Request {
                    id,
                    body: Request::ClusterMap,
                }))) => {
                    let refusal = Refusal::new(RefusalCode::InvalidRequest, "no cluster map here");
                    self.reply(id, Reply::Refused(refusal)).await;
                }
                Ok(Ok(Some(Frame::Request { id, body }))) => return (id, body),
                other => panic!("expected a request, got {other:?}"),
            }
        }
    }

    async fn send(&mut self, frame: Frame) {
        self.writer.send(&frame).await.unwrap();
    }

    async fn reply(&mut self, id: u64, body: Reply) {
        self.send(Frame::Reply { id, body }).await;
    }

    async fn deliver(&mut self, conv: u64, seq: u64) {
        self.send(Frame::Deliver(message(conv, seq))).await;
    }

    /// Like the real broker: on the client's end of stream, ends its side too.
    async fn until_client_closes(&mut self) {
        while let Ok(Some(_)) = self.reader.next().await {}
        let _ = self.writer.finish().await;
        let _ = tokio::time::timeout(DEADLINE, self.conn.closed()).await;
    }

    /// Drops the connection abruptly (no Goodbye).
    fn kill(&self) {
        self.conn
            .close(quinn::VarInt::from_u32(1), b"scripted drop");
    }

    /// Sends a Goodbye, ends the stream, waits for the client to close.
    async fn goodbye(&mut self, code: RefusalCode) {
        self.send(Frame::Goodbye(Refusal::new(code, "scripted")))
            .await;
        let _ = self.writer.finish().await;
        let _ = tokio::time::timeout(DEADLINE, self.conn.closed()).await;
    }
}

fn message(conv: u64, seq: u64) -> Message {
    Message {
        conv,
        seq,
        sender: Principal::Service("script".into()),
        timestamp_ms: 0,
        payload: format!("m{seq}").into_bytes(),
    }
}

type Script = Box<dyn FnOnce(Peer) -> BoxFuture<'static, ()> + Send>;

fn script<F, Fut>(f: F) -> Script
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    Box::new(move |peer| Box::pin(f(peer)))
}

/// A QUIC server that runs `scripts[i]` on its i-th connection and refuses the rest.
struct Broker {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    endpoint: quinn::Endpoint,
}

impl Broker {
    fn start(scripts: Vec<Script>) -> Broker {
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(CERT.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(KEY.as_bytes()).unwrap();
        let mut tls =
            rustls::ServerConfig::builder_with_provider(herald_client::io::crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap();
        tls.alpn_protocols = vec![wire::ALPN_CLIENT.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let accept = endpoint.clone();
        let count = Arc::clone(&connections);
        tokio::spawn(async move {
            let mut scripts = scripts.into_iter();
            while let Some(incoming) = accept.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let Some(script) = scripts.next() else {
                    incoming.refuse();
                    continue;
                };
                let Ok(conn) = incoming.await else { continue };
                tokio::spawn(async move {
                    let Ok((send, recv)) = conn.accept_bi().await else {
                        return;
                    };
                    let peer = Peer {
                        conn,
                        reader: FrameReader::new(recv, FRAME_BYTES_CEILING),
                        writer: FrameWriter::new(send, FRAME_BYTES_CEILING),
                    };
                    script(peer).await;
                });
            }
        });
        Broker {
            addr,
            connections,
            endpoint,
        }
    }

    fn config(&self) -> herald_client::ClientConfigBuilder {
        ClientConfig::builder()
            .addrs([self.addr.to_string()])
            .ca_pem(CA)
            .token("scripted.token.value")
            .connect_timeout(Duration::from_millis(500))
            .request_timeout(Duration::from_secs(5))
            .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn next_event(s: &mut Session) -> Result<SessionEvent, Error> {
    tokio::time::timeout(DEADLINE, s.next())
        .await
        .expect("no event in time")
        .expect("the session ended")
}

#[tokio::test]
async fn a_publish_in_flight_is_retried_with_the_same_key_after_a_drop() {
    let (keys_tx, mut keys) = mpsc::unbounded_channel();
    let keys_tx2 = keys_tx.clone();
    let broker = Broker::start(vec![
        script(move |mut p| async move {
            p.welcome(1).await;
            let (_, body) = p.request().await;
            keys_tx.send(body).unwrap();
            // Stored, but the ack never leaves: the connection dies.
            p.kill();
        }),
        script(move |mut p| async move {
            p.welcome(2).await;
            let (id, body) = p.request().await;
            keys_tx2.send(body).unwrap();
            p.reply(
                id,
                Reply::Published {
                    seq: 1,
                    duplicate: true,
                    leader: None,
                },
            )
            .await;
            p.until_client_closes().await;
        }),
    ]);
    let publisher = Publisher::connect(broker.config().build().unwrap())
        .await
        .unwrap();
    assert_eq!(publisher.session_id(), 1);
    let ack = publisher.publish(7, "pay").await.unwrap();
    assert_eq!((ack.seq, ack.duplicate), (1, true));
    assert_eq!(publisher.session_id(), 2);
    let first = keys.recv().await.unwrap();
    let retry = keys.recv().await.unwrap();
    assert_eq!(
        first, retry,
        "the retry must carry the same idempotency key"
    );
    let Request::Publish {
        key: IdempotencyKey::Producer { producer_seq, .. },
        ..
    } = first
    else {
        panic!("expected an automatic producer key, got {first:?}");
    };
    assert_eq!(producer_seq, 1);
    publisher.close().await;
}

#[tokio::test]
async fn resubscribes_from_the_cursor_and_drops_the_overlap() {
    let (froms_tx, mut froms) = mpsc::unbounded_channel();
    let froms_tx2 = froms_tx.clone();
    let broker = Broker::start(vec![
        script(move |mut p| async move {
            p.welcome(1).await;
            let (id, body) = p.request().await;
            froms_tx.send(body).unwrap();
            p.reply(
                id,
                Reply::Subscribed {
                    conv: 7,
                    next_seq: 4,
                },
            )
            .await;
            for seq in 1..=3 {
                p.deliver(7, seq).await;
            }
            p.goodbye(RefusalCode::SlowConsumer).await;
        }),
        script(move |mut p| async move {
            p.welcome(2).await;
            let (id, body) = p.request().await;
            froms_tx2.send(body).unwrap();
            p.reply(
                id,
                Reply::Subscribed {
                    conv: 7,
                    next_seq: 6,
                },
            )
            .await;
            // A replay that overlaps what was already handed over.
            for seq in [2, 3, 4, 5] {
                p.deliver(7, seq).await;
            }
            // Deliveries of a conversation nobody subscribed are dropped.
            p.deliver(8, 1).await;
            p.deliver(7, 6).await;
            p.until_client_closes().await;
        }),
    ]);
    let mut s = Session::connect(broker.config().build().unwrap())
        .await
        .unwrap();
    assert_eq!(s.subscribe(7, Some(1)).await.unwrap(), 4);
    let mut seen = Vec::new();
    let mut reconnected = None;
    while seen.len() < 6 {
        match next_event(&mut s).await.unwrap() {
            SessionEvent::Message(m) => {
                assert_eq!(m.conv, 7);
                seen.push(m.seq);
            }
            SessionEvent::Reconnected { addr } => {
                assert_eq!(
                    seen,
                    [1, 2, 3],
                    "Reconnected comes between the two connections"
                );
                reconnected = Some(addr);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, [1, 2, 3, 4, 5, 6]);
    assert_eq!(reconnected, Some(broker.addr.to_string()));
    assert_eq!(
        froms.recv().await.unwrap(),
        Request::Subscribe {
            conv: 7,
            from: Some(1)
        }
    );
    assert_eq!(
        froms.recv().await.unwrap(),
        Request::Subscribe {
            conv: 7,
            from: Some(4)
        },
        "resubscribe from the seq after the last one handed over"
    );
    s.close().await;
}

#[tokio::test]
async fn new_only_subscription_resumes_from_the_replied_next_seq() {
    let (froms_tx, mut froms) = mpsc::unbounded_channel();
    let drop_now = Arc::new(Notify::new());
    let drop_signal = Arc::clone(&drop_now);
    let broker = Broker::start(vec![
        script(move |mut p| async move {
            p.welcome(1).await;
            let (id, _) = p.request().await;
            p.reply(
                id,
                Reply::Subscribed {
                    conv: 3,
                    next_seq: 10,
                },
            )
            .await;
            // The application is told what retention lost on another conversation
            // it does not follow: ignored.
            p.send(Frame::Event(Event::Truncated {
                conv: 99,
                requested_from: 1,
                first_available_seq: 5,
            }))
            .await;
            // A close discards frames the client has not read yet: drop only once
            // the reply arrived.
            drop_signal.notified().await;
            p.kill();
        }),
        script(move |mut p| async move {
            p.welcome(2).await;
            let (id, body) = p.request().await;
            froms_tx.send(body).unwrap();
            p.reply(
                id,
                Reply::Subscribed {
                    conv: 3,
                    next_seq: 12,
                },
            )
            .await;
            p.deliver(3, 10).await;
            p.until_client_closes().await;
        }),
    ]);
    let mut s = Session::connect(broker.config().build().unwrap())
        .await
        .unwrap();
    assert_eq!(s.subscribe(3, None).await.unwrap(), 10);
    drop_now.notify_one();
    assert!(matches!(
        next_event(&mut s).await.unwrap(),
        SessionEvent::Reconnected { .. }
    ));
    assert_eq!(
        froms.recv().await.unwrap(),
        Request::Subscribe {
            conv: 3,
            from: Some(10)
        }
    );
    match next_event(&mut s).await.unwrap() {
        SessionEvent::Message(m) => assert_eq!((m.conv, m.seq), (3, 10)),
        other => panic!("unexpected {other:?}"),
    }
    s.close().await;
}

#[tokio::test]
async fn an_auth_refusal_on_reconnect_ends_the_session_without_retrying() {
    let drop_now = Arc::new(Notify::new());
    let drop_signal = Arc::clone(&drop_now);
    let broker = Broker::start(vec![
        script(move |mut p| async move {
            p.welcome(1).await;
            drop_signal.notified().await;
            p.kill();
        }),
        script(|mut p| async move {
            p.hello().await;
            p.writer.queue_encoded(&wire::preamble());
            p.goodbye(RefusalCode::TokenExpired).await;
        }),
    ]);
    let mut s = Session::connect(broker.config().build().unwrap())
        .await
        .unwrap();
    let handle = s.handle();
    drop_now.notify_one();
    let err = next_event(&mut s).await.unwrap_err();
    assert_eq!(err.refusal_code(), Some(RefusalCode::TokenExpired), "{err}");
    assert!(err.to_string().contains("token expired"), "{err}");
    assert!(tokio::time::timeout(DEADLINE, s.next())
        .await
        .unwrap()
        .is_none());
    assert_eq!(broker.connections(), 2, "no attempt after the refusal");
    let err = handle.send(1, "x").await.unwrap_err();
    assert_eq!(err.refusal_code(), Some(RefusalCode::TokenExpired), "{err}");
}

#[tokio::test]
async fn a_goodbye_other_than_slow_or_unavailable_is_surfaced() {
    let broker = Broker::start(vec![script(|mut p| async move {
        p.welcome(1).await;
        p.goodbye(RefusalCode::ProtocolError).await;
    })]);
    let mut s = Session::connect(broker.config().build().unwrap())
        .await
        .unwrap();
    let err = next_event(&mut s).await.unwrap_err();
    assert_eq!(
        err.refusal_code(),
        Some(RefusalCode::ProtocolError),
        "{err}"
    );
    assert!(tokio::time::timeout(DEADLINE, s.next())
        .await
        .unwrap()
        .is_none());
    assert_eq!(broker.connections(), 1);
}

#[tokio::test]
async fn reconnect_gives_up_after_the_configured_attempts() {
    let drop_now = Arc::new(Notify::new());
    let drop_signal = Arc::clone(&drop_now);
    let broker = Broker::start(vec![script(move |mut p| async move {
        p.welcome(1).await;
        drop_signal.notified().await;
        p.kill();
    })]);
    let config = broker
        .config()
        .reconnect_attempts_max(Some(3))
        .build()
        .unwrap();
    let mut s = Session::connect(config).await.unwrap();
    drop_now.notify_one();
    let err = next_event(&mut s).await.unwrap_err();
    match &err {
        Error::ReconnectExhausted { attempts, .. } => assert_eq!(*attempts, 3),
        other => panic!("expected ReconnectExhausted, got {other}"),
    }
    // One connection served, then three refused attempts.
    assert_eq!(broker.connections(), 4);
    let err = s.subscribe(1, None).await.unwrap_err();
    assert!(matches!(err, Error::Disconnected { .. }), "{err}");
}

#[tokio::test]
async fn a_request_never_answered_times_out_and_close_still_returns() {
    let broker = Broker::start(vec![script(|mut p| async move {
        p.welcome(1).await;
        let _ = p.request().await;
        // Never answers; ends its side when the client does.
        p.until_client_closes().await;
    })]);
    let config = broker
        .config()
        .request_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let publisher = Publisher::connect(config).await.unwrap();
    let err = publisher.publish(1, "x").await.unwrap_err();
    assert!(
        matches!(&err, Error::Timeout { what, .. } if what.contains("publish to conversation 1")),
        "{err}"
    );
    tokio::time::timeout(DEADLINE, publisher.clone().close())
        .await
        .unwrap();
    assert!(matches!(
        publisher.publish(1, "y").await.unwrap_err(),
        Error::Closed
    ));
    broker.endpoint.close(quinn::VarInt::from_u32(0), b"done");
}

/// A UDP relay in front of a broker that can turn into a black hole: the client's
/// view of a node killed without a word (no close, no reset, no ICMP).
struct Relay {
    /// Where clients send.
    addr: SocketAddr,
    /// Where the broker sees the relay's packets come from.
    back_addr: SocketAddr,
    silent: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    async fn start(broker: SocketAddr) -> Relay {
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(broker).await.unwrap();
        let addr = front.local_addr().unwrap();
        let back_addr = back.local_addr().unwrap();
        let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
        let (f, b, s, c) = (front.clone(), back.clone(), silent.clone(), client.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = f.recv_from(&mut buf).await {
                *c.lock().unwrap() = Some(from);
                if !s.load(Ordering::SeqCst) {
                    let _ = b.send(&buf[..n]).await;
                }
            }
        });
        let s = silent.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = back.recv(&mut buf).await {
                let to = *client.lock().unwrap();
                if let (Some(to), false) = (to, s.load(Ordering::SeqCst)) {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        });
        Relay {
            addr,
            back_addr,
            silent,
        }
    }

    fn go_silent(&self) {
        self.silent.store(true, Ordering::SeqCst);
    }
}

/// Two seeds, each a relay to the same broker: the client connects through either, and
/// the test silences whichever one carried a given connection (the broker sees the
/// relay's back address as the connection's remote address).
struct Relays([Relay; 2]);

impl Relays {
    async fn start(broker: SocketAddr) -> Relays {
        Relays([Relay::start(broker).await, Relay::start(broker).await])
    }

    fn seeds(&self) -> Vec<String> {
        self.0.iter().map(|r| r.addr.to_string()).collect()
    }

    /// Silences the relay whose connection the broker sees coming from `from`.
    fn silence(&self, from: SocketAddr) {
        self.0
            .iter()
            .find(|r| r.back_addr == from)
            .expect("a connection through neither relay")
            .go_silent();
    }
}

#[tokio::test]
async fn a_node_that_goes_silent_with_a_publish_in_flight_is_left_within_the_liveness_timeout() {
    let (silence_tx, silence_rx) = tokio::sync::oneshot::channel::<SocketAddr>();
    let broker = Broker::start(vec![
        script(move |mut p| async move {
            p.welcome(1).await;
            let _ = p.request().await;
            // The node dies: from now on not a packet reaches the client.
            silence_tx.send(p.conn.remote_address()).unwrap();
            let _ = tokio::time::timeout(DEADLINE, p.conn.closed()).await;
        }),
        script(|mut p| async move {
            p.welcome(2).await;
            let (id, _) = p.request().await;
            p.reply(
                id,
                Reply::Published {
                    seq: 1,
                    duplicate: false,
                    leader: None,
                },
            )
            .await;
            p.until_client_closes().await;
        }),
    ]);
    // The first connection (through whichever relay the client picks) dies. The QUIC idle timeout stays at its 30 s default:
    // only the liveness probe can notice in time.
    let relays = Relays::start(broker.addr).await;
    let liveness = Duration::from_millis(500);
    let config = broker
        .config()
        .addrs(relays.seeds())
        .liveness_timeout(liveness)
        .build()
        .unwrap();
    let publisher = Publisher::connect(config).await.unwrap();
    let silenced = tokio::spawn(async move {
        relays.silence(silence_rx.await.unwrap());
        tokio::time::Instant::now()
    });
    let ack = publisher.publish(1, "x").await.unwrap();
    let acked_at = tokio::time::Instant::now();
    let silent_at = silenced.await.unwrap();
    assert_eq!((ack.seq, publisher.session_id()), (1, 2));
    let took = acked_at - silent_at;
    assert!(
        took >= liveness && took < liveness + Duration::from_millis(700),
        "acked {took:?} after the node went silent; expected just over the {liveness:?} liveness timeout"
    );
    publisher.close().await;
}

#[tokio::test]
async fn a_node_slow_to_reply_but_alive_is_not_left() {
    let broker = Broker::start(vec![script(|mut p| async move {
        p.welcome(1).await;
        let (id, _) = p.request().await;
        // Four liveness timeouts without a reply (an election, say); QUIC still
        // acknowledges the probes, so the client must wait rather than reconnect.
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        p.reply(
            id,
            Reply::Published {
                seq: 1,
                duplicate: false,
                leader: None,
            },
        )
        .await;
        p.until_client_closes().await;
    })]);
    let config = broker
        .config()
        .liveness_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let publisher = Publisher::connect(config).await.unwrap();
    let ack = publisher.publish(1, "x").await.unwrap();
    assert_eq!((ack.seq, publisher.session_id()), (1, 1));
    assert_eq!(broker.connections(), 1, "a live node must not be left");
    publisher.close().await;
}

#[tokio::test]
async fn a_node_that_goes_silent_while_writes_are_stuck_on_flow_control_is_left() {
    // The node stops answering right after the handshake, and the client has more to
    // send than QUIC will buffer for it: the driver sits in a write that can never
    // finish. The liveness watchdog must still end the connection so the writes go
    // to another node.
    const PUBLISHES: usize = 40;
    const PAYLOAD_BYTES: usize = 60 * 1024; // 2.4 MB in all, beyond every window
    let (silence_tx, silence_rx) = tokio::sync::oneshot::channel::<SocketAddr>();
    let broker = Broker::start(vec![
        script(move |mut p| async move {
            p.welcome(1).await;
            silence_tx.send(p.conn.remote_address()).unwrap();
            let _ = tokio::time::timeout(DEADLINE, p.conn.closed()).await;
        }),
        script(|mut p| async move {
            p.welcome(2).await;
            for seq in 1..=PUBLISHES as u64 {
                let (id, _) = p.request().await;
                p.reply(
                    id,
                    Reply::Published {
                        seq,
                        duplicate: false,
                        leader: None,
                    },
                )
                .await;
            }
            p.until_client_closes().await;
        }),
    ]);
    let relays = Relays::start(broker.addr).await;
    let config = broker
        .config()
        .addrs(relays.seeds())
        .liveness_timeout(Duration::from_millis(500))
        .request_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let publisher = Publisher::connect(config).await.unwrap();
    relays.silence(silence_rx.await.unwrap());
    let started = tokio::time::Instant::now();
    let sends: Vec<_> = (0..PUBLISHES)
        .map(|_| {
            let p = publisher.clone();
            tokio::spawn(async move { p.publish(1, vec![7u8; PAYLOAD_BYTES]).await })
        })
        .collect();
    for send in sends {
        send.await.unwrap().unwrap();
    }
    let took = started.elapsed();
    assert_eq!(publisher.session_id(), 2);
    assert!(
        took < Duration::from_secs(5),
        "{PUBLISHES} publishes took {took:?}: the stuck write was not ended by the watchdog"
    );
    publisher.close().await;
}
