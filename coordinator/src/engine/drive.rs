//! Driving a plan: hand out the runs that may go, ask for rollbacks not asked yet, and
//! end the plan when it settles (final state stored before it leaves memory, shard
//! locks released).
use std::time::Duration;

use flotilla_core::pb;
use flotilla_core::pb::coordinator_message::Body;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::Engine;
use crate::coordination::CoordinationError;
use crate::metrics;
use crate::plan::{PlanState, RollbackState};
use crate::store::StoreOp;

/// How long a plan's end waits for its final state to be stored (usually the writer's
/// window, 200 ms, and a commit).
const FINAL_FLUSH_WAIT: Duration = Duration::from_secs(5);

impl Engine {
    /// Hands out work, asks for rollbacks not asked yet, and ends the plan when done.
    pub(super) async fn drive(&mut self, plan_id: &str) {
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        // Nothing goes to agents before the plan holds its shard locks.
        if !self.leading || !run.locked {
            // Stopped (a cancel, a rollback) while it waited for them: nothing of it went
            // to a shard, so nothing is to be undone or decided, and it ends now rather
            // than when the plan holding the locks lets go (a cancel waited 13 s for it).
            if self.leading && run.stopped_before_its_locks() {
                run.end_before_its_locks();
                if self.settle(plan_id).await {
                    return;
                }
            }
            self.changed(plan_id);
            return;
        }
        self.two_phase(plan_id).await;
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        if let Some(message) = run.advance_unit() {
            info!(plan = %plan_id, "{message}");
            self.write_state(plan_id);
        }
        self.verify_unit(plan_id).await;
        self.advance_waves(plan_id);
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        match run.state {
            PlanState::Running => self.hand_out(plan_id),
            PlanState::RollingBack => {
                let shards: Vec<String> = run
                    .shards
                    .iter()
                    .filter(|(_, sr)| sr.rollback == RollbackState::NotAsked)
                    .map(|(s, _)| s.clone())
                    .collect();
                for shard in shards {
                    // (one holding transactions of the unit in doubt is told the decision
                    // first, and asked for its undo once it answered: `on_resolve_reply`)
                    if self.resolve_before_undo(plan_id, &shard).await {
                        self.ask_rollback(plan_id, &shard);
                    }
                }
            }
            _ => {}
        }
        if !self.settle(plan_id).await {
            self.changed(plan_id);
        }
    }

    /// Sends every attached shard of a running plan its next runs, within its lanes.
    fn hand_out(&mut self, plan_id: &str) {
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        let agents = &mut self.agents;
        run.rebalance_lanes(&|shard: &str| agents.get(shard).map(|a| a.max_lanes).unwrap_or(1));
        // Only the shards with something to send: targets ready within their lanes, or the
        // plan's definition not yet on their agent's stream. A hand-out follows every
        // agent's results, and at 64 shards going over all of them was most of its time.
        let shards: Vec<String> = run
            .shards
            .iter()
            .filter(|(shard, sr)| {
                sr.has_ready()
                    || agents
                        .get(shard.as_str())
                        .is_some_and(|a| sr.defined_on != Some(a.conn_id))
            })
            .map(|(shard, _)| shard.clone())
            .collect();
        for shard in shards {
            let Some(agent) = agents.get_mut(&shard) else {
                continue;
            };
            let paused = run.is_paused(&shard);
            let sr = run.shards.get_mut(&shard).expect("shard");
            agent.send_definition(sr, &run.definition, paused);
            let lanes = sr.lanes;
            let runs = run.next_runs(&shard, &mut self.next_run_id);
            if !runs.is_empty() {
                // queued behind the definition; if the stream ends first, the runs are
                // resent from `outstanding` when the agent comes back
                agent.send(Body::Assign(pb::Assign {
                    plan_id: plan_id.to_string(),
                    epoch: self.epoch,
                    lanes,
                    runs,
                }));
            }
        }
    }

    /// Ends the plan if it reached its end: stores the final state (and its data
    /// changes' last progress), then lets it leave memory. Whether it ended.
    async fn settle(&mut self, plan_id: &str) -> bool {
        let run = self.plans.get_mut(plan_id).expect("present");
        let Some(updates) = run.settle() else {
            return false;
        };
        let (state, message) = (run.state, run.message.clone());
        let progress: Vec<pb::DataProgress> = run.progress.values().cloned().collect();
        let had_data = !progress.is_empty() || run.spec.migrations.iter().any(|m| m.data.is_some());
        info!(plan = %plan_id, state = state.as_str(), "{message}");
        metrics::plan_finished(state, run.by_operator);
        self.write(StoreOp::Steps {
            plan_id: plan_id.to_string(),
            updates,
        });
        // The status of a finished plan comes from the store: keep its figures, and only
        // those (a backfill rolled back after it completed kept its "done" rows there, the
        // rows it spoke of put back since).
        if had_data {
            self.write(StoreOp::DataProgress {
                plan_id: plan_id.to_string(),
                entries: progress,
            });
        }
        self.write_state(plan_id);
        // Readers switch to the store once the plan leaves memory: make sure
        // the final state is there first. Not for longer than FINAL_FLUSH_WAIT: while the
        // store is out of reach the writer tries again until it is back, and the engine
        // (every other plan's results and decisions) must not wait for it.
        let (tx, rx) = oneshot::channel();
        if self.store.send((self.term(), StoreOp::Flush(tx))).is_ok() {
            match tokio::time::timeout(FINAL_FLUSH_WAIT, rx).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    warn!(plan = %plan_id, "the store writer stopped before the final state was flushed")
                }
                Err(_) => warn!(plan = %plan_id, wait = ?FINAL_FLUSH_WAIT,
                    "the control store has not taken the plan's final state yet; it goes on \
                     trying, and the plan's status read from the store lags until it does"),
            }
        }
        // what a watcher of its end is told, built before the plan leaves memory
        let last = self.status_of(plan_id);
        self.plans.remove(plan_id);
        // its gauges go back at once (a plan that ended is no longer running)
        self.publish_metrics();
        self.release_locks(plan_id);
        match last {
            Some(last) => self.ended(plan_id, last),
            None => self.changed(plan_id),
        }
        true
    }

    /// Releases a plan's lock on one shard it is done with, in the background: tried a few
    /// times (the plan's end releases it anyway). Counted as a release of the plan's locks
    /// under way: a new run of the plan (a rollback again, a retry) takes its locks once it
    /// is over, so a late attempt cannot delete a lock taken again.
    pub(super) fn release_shard_lock(&self, plan_id: &str, shard: &str) {
        let (coordination, id, shard, epoch) = (
            self.coordination.clone(),
            plan_id.to_string(),
            shard.to_string(),
            self.epoch,
        );
        let releases = self.lock_queue.clone();
        releases.begin(&id);
        tokio::spawn(async move {
            let _done = ReleaseDone(releases, id.clone());
            for attempt in 0..3u32 {
                match coordination.release_shard(&id, &shard, epoch).await {
                    Ok(()) => {
                        info!(plan = %id, shard = %shard, "shard done with the plan's rollback: its lock released");
                        return;
                    }
                    Err(CoordinationError::NotLeader) => return,
                    Err(e) => {
                        warn!(plan = %id, shard = %shard, "releasing the shard's lock failed (the plan's end releases it): {e}");
                        tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                    }
                }
            }
        });
    }

    /// Releases a finished plan's shard locks in the background.
    pub(super) fn release_locks(&self, plan_id: &str) {
        let (coordination, id, epoch) =
            (self.coordination.clone(), plan_id.to_string(), self.epoch);
        let releases = self.lock_queue.clone();
        releases.begin(&id);
        tokio::spawn(async move {
            let _done = ReleaseDone(releases, id.clone());
            // While this coordinator leads it keeps the plan's lease alive: a release
            // that failed once (an etcd member gone, say) is retried, or the locks
            // would outlive the plan. A deposed leader lets the lease expire.
            let mut attempt = 0u32;
            loop {
                match coordination.release_shards(&id, epoch).await {
                    Ok(()) => return,
                    Err(CoordinationError::NotLeader) => {
                        warn!(plan = %id, epoch, "not the leader any more: the shard locks expire with the plan's lease");
                        return;
                    }
                    Err(e) => {
                        let pause = Duration::from_millis(250 << attempt.min(4));
                        attempt += 1;
                        warn!(plan = %id, epoch, "releasing shard locks failed, retrying in {pause:?}: {e}");
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        });
    }
}

/// Says a release of a plan's locks is over however its task ends (returned, or cancelled
/// with the runtime).
struct ReleaseDone(crate::coordination::LockQueue, String);

impl Drop for ReleaseDone {
    fn drop(&mut self) {
        self.0.end(&self.1);
    }
}
