//! End-to-end tests: the real `flotilla` binary against real PostgreSQL and
//! etcd processes. The harness lives in `harness/`; see its module docs.

mod atomic;
mod behaviour;
mod data;
mod faults;
mod fleet;
mod governance;
mod ha;
mod harness;
mod observability;
mod operability;
mod partition;
mod quickstart;
mod reversible;
mod rollout;
mod shards;
mod smoke;
mod versions;
mod waves;
