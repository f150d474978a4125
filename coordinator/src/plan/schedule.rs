//! Which steps may go, and the runs each shard gets next: dependencies (a prepared step
//! releases only its own unit's steps), lanes split over busy shards, and fusing a
//! target's ready transactional steps into one shard transaction.
use flotilla_core::pb;
use flotilla_core::protocol::gid;

use super::{PlanRun, PlanState, StepStatus};

impl PlanRun {
    /// Whether the finished dependency `d` lets `s` go: a prepared step lets
    /// only steps of its own unit go (they ride in the same prepared transaction);
    /// others wait for the commit.
    pub(super) fn releases(&self, d: usize, s: usize) -> bool {
        match self.steps[d].status {
            StepStatus::Applied | StepStatus::AlreadyApplied => true,
            StepStatus::Prepared => self.unit_of[d].is_some() && self.unit_of[d] == self.unit_of[s],
            _ => false,
        }
    }

    pub(super) fn recount_remaining(&mut self) {
        self.remaining = (0..self.steps.len())
            .map(|s| {
                self.steps[s]
                    .deps
                    .iter()
                    .filter(|&&d| !self.releases(d, s))
                    .count()
            })
            .collect();
    }

    pub(super) fn enqueue_if_ready(&mut self, t: usize) {
        let ready = self.per_target[t].iter().any(|&s| {
            self.steps[s].status == StepStatus::Pending
                && self.remaining[s] == 0
                && !self.waits_for_unit(s)
        }) && self.wave_open(t);
        let shard = &self.targets[t].shard;
        if let Some(sr) = self.shards.get_mut(shard)
            && ready
            && sr.queued.insert(t)
        {
            sr.ready.push_back(t);
        }
    }

    /// Shards that still have steps to finish, each with the lanes it may use:
    /// `max_parallel` split over them, at least one each while there is room.
    pub fn rebalance_lanes(&mut self, agent_lanes: &dyn Fn(&str) -> u32) {
        // Which shards are busy, in the map's order: this runs at every hand-out, over every
        // shard of the plan, so no shard's name is copied (at 64 shards the copies were a
        // third of this). A shard with no step to run is passed over by its count; one with
        // some is looked at from its last target back, for one in the wave now open: targets
        // go in their order, so during a rollout the last ones are still to run and the look
        // ends at once, where from the front it passed every finished target first
        // (quadratic over a shard of 2,500 tenants: a tenth of the coordinator's CPU at
        // 10,000).
        // A step that waits for an atomic unit to commit (of a later unit, or outside any
        // and after a step of the unit prepared) does not make its shard busy: with
        // `max_parallel` below the shards, the shards whose targets had all prepared kept
        // the lanes for such steps, the shards still to prepare got none, and the unit never
        // committed (its prepared targets holding their locks for good).
        let unit = self.current_unit().is_some();
        let runnable = |s: usize| {
            let step = &self.steps[s];
            step.status.to_run()
                && !(unit
                    && (self.waits_for_unit(s)
                        || (step.status == StepStatus::Pending
                            && self.remaining[s] > 0
                            && step.deps.iter().any(|&d| {
                                self.in_unit(d) && self.steps[d].status == StepStatus::Prepared
                            }))))
        };
        let busy: Vec<bool> = self
            .shards
            .values()
            .map(|sr| {
                debug_assert_eq!(
                    sr.to_run,
                    super::count_to_run(&self.steps, &self.per_target, &sr.targets),
                    "a step's status changed without PlanRun::set_status"
                );
                sr.to_run > 0
                    && sr.targets.iter().rev().any(|&t| {
                        self.wave_open(t) && self.per_target[t].iter().any(|&s| runnable(s))
                    })
            })
            .collect();
        // The wave's parallelism (the plan's when it says none), and its cap per shard.
        let (max, per_shard) = self.wave_lanes();
        let max = max.max(1) as usize;
        // An atomic unit too is spread over `max_parallel` (a plan that wants every target
        // at once says so with a `max_parallel` as large as the unit). Starting every
        // target at once regardless was measured again on the reference machine (2 cores,
        // 16 shard databases x 10 tenants on one server, scripts/bench-two-phase.sh, with
        // the agents' lanes starting together): the hold from PREPARE shrank (median 195
        // against 223 ms) but each DDL ran stretched by the others on the same cores, so
        // what an application waits on a target, its steps' start to its COMMIT
        // PREPARED, grew: median 605 against 265 ms, max 760 against 464 ms.
        let k = busy.iter().filter(|&&b| b).count();
        let mut i = 0;
        for ((shard, sr), busy) in self.shards.iter_mut().zip(busy) {
            sr.lanes = 0;
            if !busy {
                continue;
            }
            let share = if max >= k {
                max / k + usize::from(i < max % k)
            } else {
                usize::from(i < max)
            };
            i += 1;
            let cap = (agent_lanes(shard).max(1) as usize)
                .min(per_shard.map_or(usize::MAX, |p| p.max(1) as usize));
            sr.lanes = share.min(cap) as u32;
        }
    }

    /// Forms the next runs for a shard, up to its prefetch window.
    pub fn next_runs(&mut self, shard: &str, next_run_id: &mut u64) -> Vec<pb::Run> {
        if self.state != PlanState::Running || self.is_paused(shard) || self.unit_unverified {
            return Vec::new();
        }
        let Some(sr) = self.shards.get(shard) else {
            return Vec::new();
        };
        if sr.lanes == 0 {
            return Vec::new();
        }
        let window = (sr.lanes as usize * 8).max(32);
        let mut out = Vec::new();
        loop {
            let sr = self.shards.get_mut(shard).expect("shard exists");
            if sr.outstanding.len() >= window {
                break;
            }
            let Some(t) = sr.ready.pop_front() else { break };
            sr.queued.remove(&t);
            for steps in self.form_runs(t) {
                let run_id = *next_run_id;
                *next_run_id += 1;
                let fused = steps.len() > 1;
                for &s in &steps {
                    self.set_status(s, StepStatus::Running(run_id));
                }
                let prepare_gid = if steps
                    .iter()
                    .all(|&s| self.in_unit(s) && self.steps[s].transactional)
                {
                    gid::gid(&self.unit_key(), run_id, self.epoch, &self.targets[t])
                } else {
                    String::new()
                };
                if !prepare_gid.is_empty() {
                    self.shards
                        .get_mut(shard)
                        .expect("shard")
                        .gids
                        .insert(run_id, prepare_gid.clone());
                }
                out.push(pb::Run {
                    prepare_gid,
                    run_id,
                    tenant: self.targets[t].tenant.clone(),
                    migrations: steps
                        .iter()
                        .map(|&s| self.spec.migrations[self.steps[s].migration].id.to_string())
                        .collect(),
                    fused,
                });
                self.shards
                    .get_mut(shard)
                    .expect("shard exists")
                    .outstanding
                    .insert(run_id, steps);
            }
        }
        out
    }

    /// The runs a target can start now: its ready transactional steps fused into
    /// one shard transaction (dependency order), others one run each. Steps are fused only
    /// with steps of the same atomic unit (or, outside any, with steps outside any): a
    /// run of a unit's step and another is not prepared, and would commit the unit's step
    /// at once, before the unit's decision (or the other before its unit committed).
    pub(super) fn form_runs(&self, t: usize) -> Vec<Vec<usize>> {
        let mut fused: Vec<usize> = Vec::new();
        let mut closed = false;
        let mut singles: Vec<Vec<usize>> = Vec::new();
        for &s in &self.per_target[t] {
            let step = &self.steps[s];
            if step.status != StepStatus::Pending {
                continue;
            }
            // A step of a later atomic unit waits for the units before it to commit.
            if self.waits_for_unit(s) {
                continue;
            }
            let fuses = fused
                .first()
                .is_none_or(|&f| self.unit_of[f] == self.unit_of[s]);
            let deps_ok = step
                .deps
                .iter()
                .all(|&d| self.releases(d, s) || (fuses && fused.contains(&d)));
            if !deps_ok {
                continue;
            }
            if self.spec.fuse && step.transactional && fuses {
                if closed {
                    // waits for the fused run to commit, then goes in the next one
                    continue;
                }
                fused.push(s);
                // A step that adds an enum value ends its transaction: the value cannot be
                // used before that commits ("unsafe use of new value", 55P04), so nothing
                // after it rides along (an atomic unit's steps share their target's one
                // prepared transaction whatever they do).
                closed = self.adds_enum_value[step.migration] && self.unit_of[s].is_none();
            } else if self.remaining[s] == 0 {
                singles.push(vec![s]);
            }
        }
        if !fused.is_empty() {
            singles.insert(0, fused);
        }
        singles
    }
}
