//! The `flotilla` binary's library half: reading migrations and plans from disk,
//! and the operator commands.
pub mod cli;
pub mod loader;
