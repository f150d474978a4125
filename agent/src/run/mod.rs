//! Executing steps on this shard: plans and their queues of runs (`plans`), a run's steps
//! on one connection (`executor`), their SQL (`sqlgen`), a non-transactional step's
//! statements with its checkpoint (`statements`), two-phase commit (`two_phase`, `resolve`)
//! and undo (`rollback`).
//!
//! Dependencies point down this list: `plans` -> `executor` -> (`job`, `sqlgen`,
//! `statements`, `lock_wait`, `invalid_index`, `abort`, `conn`, `two_phase`); `resolve` and
//! `rollback` use the plans' halt; `job` holds the types they all share.
use flotilla_core::pb;
use tracing::warn;

use crate::Agent;

mod abort;
mod conn;
mod executor;
mod gate;
mod invalid_index;
mod job;
mod lock_wait;
mod plans;
pub mod rehearsal;
mod resolve;
mod rollback;
mod sqlgen;
mod statements;
pub(crate) mod two_phase;

pub(crate) use job::RunClaims;
pub(crate) use plans::Plan;
pub(crate) use resolve::ScanLog;

/// What the agent's tasks hand to the session for sending, kept across reconnects.
#[derive(Debug)]
pub(crate) enum Outgoing {
    Run {
        plan_id: String,
        result: pb::RunResult,
        /// No other run of the plan is queued or running on this shard: the result goes at
        /// once (see `Agent::report`).
        last: bool,
    },
    Rollback(pb::RollbackReply),
    Resolve(pb::ResolveReply),
}

impl Agent {
    /// Hands a result or reply to the session, which sends it now or after the next Hello.
    /// The session's outbox outlives every stream and goes only when the agent stops: what
    /// comes later is lost with this process, so it is logged here. The shard's journal and
    /// prepared transactions still hold what was applied, for the next coordinator to read.
    pub(crate) fn send_out(&self, item: Outgoing) {
        let Err(refused) = self.outbox.send(item) else {
            return;
        };
        match refused.0 {
            Outgoing::Run {
                plan_id, result, ..
            } => {
                warn!(plan = %plan_id, run = result.run_id, tenant = %result.tenant,
                      steps = result.steps.len(), "run result not sent: the agent is stopping")
            }
            Outgoing::Rollback(reply) => {
                warn!(plan = %reply.plan_id, steps = reply.steps.len(), complete = reply.complete,
                      "rollback reply not sent: the agent is stopping")
            }
            Outgoing::Resolve(reply) => {
                warn!(plan = %reply.plan_id, resolved = reply.resolved.len(),
                      failed = reply.failed.len(), "resolve reply not sent: the agent is stopping")
            }
        }
    }
}
