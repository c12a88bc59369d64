//! The `herald` command line: node commands ([`node`]), client commands ([`client`]),
//! cluster changes ([`cluster`]) and the admin HTTP client they share ([`http`]).

pub mod client;
pub mod cluster;
pub mod http;
pub mod node;
