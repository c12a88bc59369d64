//! Herald client: the wire protocol and the async client.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod io;
pub mod wire;
