//! The peer transport: openraft RPCs over QUIC (being written).
