//! Batched data changes (`[data]` of a migration): keyset pagination over the key, one
//! short fenced transaction per batch that also advances the checkpoint, a rate limit that
//! holds across restarts, pause/halt/health waits at batch boundaries, and the progress the
//! coordinator sees. `batches` drives a change; the other modules are what it uses.
mod batches;
pub(crate) mod keys;
pub(crate) mod prior_image;
mod progress;
mod rate;
mod sql;
mod throttle;

pub(crate) use batches::{Attempt, DataHooks, refuse_uncovered_keys, run_batches};
pub(crate) use progress::{ProgressBoard, Publish, UndoShared};
pub(crate) use rate::ServerBuckets;
pub(crate) use throttle::{PlanControl, STOPPED};
