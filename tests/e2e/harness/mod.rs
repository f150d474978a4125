//! Harness for the end-to-end suite: the real `flotilla` binary
//! ([`process`]) and a fault-injecting TCP proxy ([`tcp_proxy`]), on top of
//! the workspace's test kit (`testkit/`: throwaway PostgreSQL and etcd
//! clusters, child processes, polling helpers), re-exported here so tests can
//! `use crate::harness::{...}`.
//!
//! Rules for tests built on it: never sleep a fixed time, wait for a condition
//! with [`wait_until`]; get every listening port from [`free_port`]. The
//! environment knobs (`FLOTILLA_KEEP_TEST_DIRS`, `FLOTILLA_TEST_TMPDIR`,
//! `FLOTILLA_PG_BINDIR`, `FLOTILLA_ETCD_BIN`) are described in testkit's docs.

// Not every test module uses every helper.
#![allow(dead_code)]

pub mod certs;
pub mod least_privilege;
pub mod process;
pub mod prometheus;
pub mod tcp_proxy;

pub use flotilla_testkit::*;

// The common entry points, so tests can `use crate::harness::{...}`.
#[allow(unused_imports)]
pub use self::{
    process::{CommandOutput, FlotillaProcess, run_flotilla},
    tcp_proxy::TcpProxy,
};
