//! Batched data changes (`[data]` of a migration): keyset pagination over the key, one
//! short fenced transaction per batch that also advances the checkpoint, a rate limit that
//! holds across restarts, pause/halt/health waits at batch boundaries, and the progress the
//! coordinator sees. `batches` drives a change; the other modules are what it uses.
use std::sync::Arc;

use tokio::sync::watch;

mod batches;
pub(crate) mod keys;
pub(crate) mod prior_image;
mod progress;
mod rate;
mod sql;
mod throttle;

pub(crate) use batches::{STOPPED, run_batches};
pub(crate) use progress::ProgressBoard;
pub(crate) use rate::ServerBuckets;
pub(crate) use throttle::PlanControl;

/// What a data change needs from the agent besides its connection.
pub(crate) struct DataHooks {
    pub plan_id: String,
    pub shard: String,
    pub control: watch::Receiver<PlanControl>,
    pub board: Arc<ProgressBoard>,
    pub buckets: Arc<ServerBuckets>,
}
