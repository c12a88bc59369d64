//! Herald client: the wire protocol and the async client.
//!
//! * [`Publisher`] — the service API: create conversations, manage members,
//!   publish (acknowledged only once durable on a quorum), read history. To keep many
//!   publishes in flight from one task, [`Publisher::start_publish`] sends one and
//!   returns a [`PublishInFlight`] whose `ack()` waits for it (acks on one connection
//!   come in start order); no future or task per publish is needed.
//! * [`Session`] — the device API: subscribe with cursors, receive a gapless,
//!   duplicate-free stream of messages per conversation (across reconnects), send.
//! * [`wire`] — the frames (pure, no I/O; the broker uses the same module);
//!   [`io`] — frames over QUIC streams and the TLS/QUIC settings.
//!
//! ```no_run
//! use herald_client::{ClientConfig, ConvKind, Publisher, Session, SessionEvent};
//!
//! # async fn demo() -> Result<(), herald_client::Error> {
//! let ca = std::fs::read("herald-data/dev/ca.pem").map_err(|e| herald_client::Error::Config {
//!     reason: e.to_string(),
//! })?;
//! let service = ClientConfig::builder()
//!     .addrs(["127.0.0.1:7400"])
//!     .ca_pem(ca.clone())
//!     .token("SERVICE-JWT") // herald token --secret-file herald-data/dev/secret --service billing
//!     .build()?;
//! let publisher = Publisher::connect(service).await?;
//! publisher.create_conversation(7, ConvKind::Group, &[1, 2]).await?;
//! let ack = publisher.publish(7, "hello").await?; // Ok = durable on a quorum
//! println!("stored as seq {}", ack.seq);
//!
//! let device = ClientConfig::builder()
//!     .addrs(["127.0.0.1:7400"])
//!     .ca_pem(ca)
//!     .token("USER-1-JWT") // herald token --secret-file herald-data/dev/secret --user 1
//!     .build()?;
//! let mut session = Session::connect(device).await?;
//! session.subscribe(7, Some(1)).await?; // all retained history, then live
//! while let Some(event) = session.next().await {
//!     match event? {
//!         SessionEvent::Message(m) => println!("{} #{}: {:?}", m.conv, m.seq, m.payload),
//!         SessionEvent::Truncated { conv, first_available_seq, .. } => {
//!             eprintln!("conversation {conv}: history before {first_available_seq} is gone")
//!         }
//!         other => eprintln!("{other:?}"),
//!     }
//! #   break;
//! }
//! session.close().await;
//! publisher.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Connections, reconnects and limits
//!
//! Each `Publisher`/`Session` owns one QUIC connection (ALPN `herald/1`, the broker's
//! certificate always verified against the configured CA) with one stream, on which
//! requests are pipelined. `connect` makes one pass over the seed list. When an
//! established connection drops (any transport or protocol error, or a broker
//! `Goodbye` saying slow consumer or unavailable), the client reconnects on its own:
//! passes over the seed list with exponential backoff and full jitter
//! (`reconnect_backoff`), up to `reconnect_attempts_max` passes. It then resubscribes
//! every conversation from the seq after the last one it handed to the application,
//! drops any delivery at or below that, and re-sends every request still waiting —
//! publishes with the same idempotency key, so they are appended at most once.
//! A request waits at most `request_timeout` in all; a publish is `Ok` only when
//! acknowledged. A refusal of the token (expired, bad signature, …) is not
//! retried: it ends the client with [`Error::Refused`].
//!
//! Every queue is bounded: `requests_in_flight_max` requests wait for replies (more
//! callers wait for a slot), and a session buffers `outbound_queue_len_max` events;
//! beyond that it stops reading and the broker treats it as a slow consumer.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod io;
pub mod wire;

mod backoff;
mod config;
mod connection;
mod cursor;
mod error;
mod liveness;
mod publisher;
mod routing;
mod session;
mod watchdog;

pub use config::{
    ClientConfig, ClientConfigBuilder, DEFAULT_CONNECT_TIMEOUT, DEFAULT_OUTBOUND_QUEUE_LEN_MAX,
    DEFAULT_RECONNECT_BACKOFF_MAX, DEFAULT_RECONNECT_BACKOFF_MIN, DEFAULT_REQUESTS_IN_FLIGHT_MAX,
    DEFAULT_REQUEST_TIMEOUT,
};
pub use error::Error;
pub use liveness::{DEFAULT_LIVENESS_TIMEOUT, LIVENESS_TIMEOUT_MIN};
pub use publisher::{PublishAck, PublishInFlight, Publisher};
pub use session::{Session, SessionEvent, SessionHandle};
pub use wire::{
    ConvKind, HistoryPage, IdempotencyKey, Message, Principal, Refusal, RefusalCode, SessionLimits,
};
