//! End-to-end tests: the real `flotilla` binary against real PostgreSQL and
//! etcd processes. The harness lives in `harness/`; see its module docs.

mod adopt;
mod atomic;
mod auth;
mod behaviour;
mod data;
mod explain;
mod faults;
mod fleet;
mod governance;
mod ha;
mod harness;
mod lint;
mod lock_table;
mod observability;
mod operability;
mod partition;
mod promotion;
mod quickstart;
mod reversible;
mod rollout;
mod secrets;
mod shards;
mod smoke;
mod tls;
mod versions;
mod waves;
