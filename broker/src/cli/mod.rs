//! The `herald` command line: node commands ([`node`]) and client commands ([`client`]).

pub mod client;
pub mod node;
