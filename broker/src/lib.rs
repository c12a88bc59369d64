//! Herald broker node: QUIC sessions, the routing core, conversation state and admin HTTP.
//!
//! See ARCHITECTURE.md for the bird's-eye view and the invariants of each module.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod auth;
pub mod certs;
pub mod cluster_map;
pub mod config;
pub mod engine;
pub mod fanout;
pub mod memory;
pub mod meta;
pub mod metrics;
pub mod raft;
pub mod routing;
pub mod server;
pub mod store;
