//! The conversation store as an openraft state machine (being written).
