//! The segmented, CRC-checked, group-committed Raft log store (being written).
