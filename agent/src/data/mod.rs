//! Batched data changes (`[data]` of a migration): keyset pagination over the key, one
//! short fenced transaction per batch that also advances the checkpoint, a rate limit that
//! holds across restarts, pause/halt/health waits at batch boundaries, and the progress the
//! coordinator sees. `batches` drives a change; the other modules are what it uses.
mod batches;
pub(crate) mod check;
pub(crate) mod keys;
pub(crate) mod prior_image;
mod progress;
mod rate;
mod sql;
mod throttle;

pub(crate) use batches::{Attempt, DataHooks, refuse_uncovered_keys, run_batches};

/// Set on the session after the up SQL's own settings, before the batches and before a
/// restore of their prior images: keys become text (checkpoints, bounds) and images become
/// jsonb through each type's output, and a float's is exact only with `extra_float_digits`
/// of 1 or more. An up SQL's `SET extra_float_digits = 0` rounded each page's last key, so
/// the next page began past rows between the rounded and the real key (skipped, the change
/// said completed), and the saved keys found no row to restore (kept, the rollback said
/// done). The driver's own 2 is the session's default again once the step resets it.
pub(crate) const EXACT_FLOATS: &str = "SET extra_float_digits = 3";
pub(crate) use progress::{ProgressBoard, Publish, UndoShared};
pub(crate) use rate::ServerBuckets;
pub(crate) use throttle::{PlanControl, STOPPED};
