//! The agent's integration tests, in one binary (one link of the dependency set, not one
//! per file). Most need a real PostgreSQL named by `FLOTILLA_TEST_PG_URL` (and
//! `FLOTILLA_TEST_PG_URL_NO_2PC` for a cluster without two-phase commit), some an etcd
//! binary; without them a test prints a note and passes, except under `FLOTILLA_TEST_NO_SKIP`
//! (see `flotilla_testkit::skip`), where it fails. `scripts/test.sh` provides both, and sets
//! that when it runs the whole suite, as CI does.
//!
//! The tests share one process: each uses its own database (`agent_<name>`), its own etcd
//! and its own prepared-transaction gids, and a test that arms failpoints runs in a child
//! process of its own ([`common::alone_in_child_process`]).

// Not every module uses every helper.
#![allow(dead_code)]

mod common;
mod coordinators;
mod data;
// These two use the agent's failpoints (feature `testing`), as does one test of `two_phase`.
#[cfg(feature = "testing")]
mod crash_after_prepare;
mod etcd;
#[cfg(feature = "testing")]
mod failpoints;
mod killed;
mod lifecycle;
mod pg;
mod shard_lock;
mod two_phase;
