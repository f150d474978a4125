//! Flotilla per-shard agent.
