//! Plan status for operators, from a plan in memory or from the store.
use std::collections::BTreeMap;

use flotilla_core::pb;

use flotilla_core::state::{PAUSED, PlanState, StepState, WAITING, WaveState};

use super::PlanRun;
use crate::store::{PlanRow, StepSummary, WaveRow, WaveTarget, now_ms};

/// Failures by target (shard, tenant), then migration id: the same list whether the status
/// comes from memory (where they are kept as they happened) or from the store, whatever its
/// collation.
fn in_target_order(mut failures: Vec<pb::StepFailure>) -> Vec<pb::StepFailure> {
    fn key(f: &pb::StepFailure) -> (&str, &str, &str) {
        let t = f.target.as_ref();
        (
            t.map_or("", |t| t.shard.as_str()),
            t.map_or("", |t| t.tenant.as_str()),
            f.migration_id.as_str(),
        )
    }
    failures.sort_by(|a, b| key(a).cmp(&key(b)));
    failures
}

/// Counts `n` steps in `state`.
fn count(p: &mut pb::MigrationProgress, state: StepState, n: u32) {
    p.total += n;
    match state {
        StepState::Pending => p.pending += n,
        StepState::Running => p.running += n,
        StepState::Applied => p.applied += n,
        StepState::AlreadyApplied => p.already_applied += n,
        StepState::Failed => p.failed += n,
        StepState::RolledBack => p.rolled_back += n,
        StepState::Prepared => p.prepared += n,
        StepState::NotRun => p.not_run += n,
    }
}

fn progress_in_order(
    order: &[String],
    mut by_migration: BTreeMap<String, pb::MigrationProgress>,
) -> Vec<pb::MigrationProgress> {
    let mut out = Vec::new();
    for id in order {
        if let Some(p) = by_migration.remove(id) {
            out.push(p);
        }
    }
    out.extend(by_migration.into_values());
    out
}

pub fn from_run(run: &PlanRun, waiting_for: Vec<String>) -> pb::PlanStatus {
    // Counted by the migration's index: a watch asks up to ten times a second, and at
    // 10,000 tenants (30,000 steps) a map keyed by a cloned id per step was a tenth of the
    // coordinator's CPU during the rollout.
    let mut counted: Vec<Option<pb::MigrationProgress>> = vec![None; run.spec.migrations.len()];
    for s in &run.steps {
        let p = counted[s.migration].get_or_insert_with(|| pb::MigrationProgress {
            migration_id: run.spec.migrations[s.migration].id.to_string(),
            ..Default::default()
        });
        count(p, s.status.state(), 1);
    }
    pb::PlanStatus {
        summary: Some(pb::PlanSummary {
            plan_id: run.id.clone(),
            name: run.spec.name.clone(),
            // "paused" is how operators see a running plan that they paused as a whole
            // waiting at a gate first: that is what someone has to act on (and what makes
            // `--wait` come back)
            state: if run.state == PlanState::Running
                && run
                    .current_wave()
                    .is_some_and(|w| w.state == WaveState::Waiting)
            {
                WAITING.into()
            } else if run.state == PlanState::Running
                && (run.paused.plan || run.waits_on_paused_shards())
            {
                PAUSED.into()
            } else {
                run.state.as_str().into()
            },
            environment: run.spec.environment.clone(),
            created_at_ms: run.created_at_ms as u64,
            updated_at_ms: now_ms() as u64,
            targets: run.targets.len() as u32,
            steps: run.steps.len() as u32,
        }),
        // in the plan's order
        migrations: counted.into_iter().flatten().collect(),
        failures: in_target_order(run.failures.clone()),
        message: match &run.lock_wait {
            Some(w) => format!("waiting for shard locks: {w}"),
            None => run.message.clone(),
        },
        waiting_for,
        data: run.progress.values().cloned().collect(),
        // a plan that ended (cancelled while paused) is paused nowhere, as the store says
        paused: if run.state.is_terminal() {
            Vec::new()
        } else {
            run.paused.listed()
        },
        waves: run.wave_status(now_ms()),
    }
}

/// A plan's status from the store (it is not in memory: finished, or this coordinator did
/// not run it); `data`: its data changes' last progress, kept when it finished.
pub fn from_store(
    plan: &PlanRow,
    order: &[String],
    spec: Option<&flotilla_core::PlanSpec>,
    steps: &StepSummary,
    waves: &[WaveRow],
    data: Vec<pb::DataProgress>,
) -> pb::PlanStatus {
    let mut by: BTreeMap<String, pb::MigrationProgress> = BTreeMap::new();
    for (migration, state, n) in &steps.counts {
        let p = by
            .entry(migration.clone())
            .or_insert_with(|| pb::MigrationProgress {
                migration_id: migration.clone(),
                ..Default::default()
            });
        count(p, *state, *n as u32);
    }
    let failures = in_target_order(
        steps
            .failures
            .iter()
            .map(crate::store::StepRow::failure)
            .collect(),
    );
    let paused = super::Paused::from_stored(&plan.paused);
    pb::PlanStatus {
        summary: Some({
            let mut s = summary(plan);
            // A follower (or any reader of the store) shows a plan waiting at a gate as its
            // leader does.
            if plan.state == PlanState::Running
                && waves.iter().any(|w| w.state == WaveState::Waiting)
            {
                s.state = WAITING.into();
            } else if plan.state == PlanState::Running && paused.plan {
                s.state = PAUSED.into();
            }
            s
        }),
        migrations: progress_in_order(order, by),
        failures,
        message: plan.message.clone(),
        // As a manual gate's: `kind: what`, here what its approval rule still needs.
        waiting_for: if plan.state == PlanState::AwaitingApproval {
            let needs = plan
                .message
                .strip_prefix("awaiting ")
                .unwrap_or(&plan.message);
            vec![format!("approval: {needs}")]
        } else {
            Vec::new()
        },
        data,
        paused: if plan.state.is_terminal() {
            Vec::new()
        } else {
            paused.listed()
        },
        waves: {
            let mut waves = waves_from_store(spec, &steps.wave_targets, waves);
            // Nothing of a plan waiting for approval runs: its first wave, stored running
            // at the submit, read as under way ("running 3 targets ... 3 to go"); nor did
            // anything of one that ended before it started (rejected, cancelled while it
            // waited). One that ended otherwise has no wave under way any more.
            let started = steps
                .counts
                .iter()
                .any(|(_, st, n)| *n > 0 && !matches!(st, StepState::Pending | StepState::NotRun));
            let unstarted =
                plan.state == PlanState::AwaitingApproval || (plan.state.is_terminal() && !started);
            let under_way = [
                WaveState::Running,
                WaveState::Baking,
                WaveState::Checking,
                WaveState::Waiting,
            ];
            for w in &mut waves {
                if unstarted {
                    w.state = WaveState::Pending.as_str().into();
                } else if plan.state.is_terminal()
                    && under_way.iter().any(|u| u.as_str() == w.state)
                {
                    w.state = WaveState::Halted.as_str().into();
                }
            }
            waves
        },
    }
}

/// The waves of a plan not in memory, from its wave rows and its steps' waves.
fn waves_from_store(
    spec: Option<&flotilla_core::PlanSpec>,
    wave_targets: &[WaveTarget],
    waves: &[WaveRow],
) -> Vec<pb::WaveStatus> {
    waves
        .iter()
        .map(|w| {
            let targets: BTreeMap<(String, String), (bool, bool)> = wave_targets
                .iter()
                .filter(|t| t.wave == w.idx)
                .map(|t| ((t.shard.clone(), t.tenant.clone()), (t.applied, t.failed)))
                .collect();
            let applied = targets.values().filter(|(a, _)| *a).count();
            let failed = targets.values().filter(|(_, f)| *f).count();
            let wave = spec.and_then(|s| s.rollout.waves.get(w.idx as usize));
            let budget = spec.and_then(|s| {
                if s.policy != flotilla_core::FailurePolicy::Continue {
                    return None;
                }
                wave.and_then(|x| x.budget).or(s.rollout.budget)
            });
            pb::WaveStatus {
                max_failures: budget.map_or(0, |b| b.allowed(targets.len())) as u32,
                budgeted: budget.is_some(),
                manual_gate: wave.is_some_and(|x| x.manual_gate),
                gate: w.gate.clone(),
                name: w.name.clone(),
                state: w.state.as_str().into(),
                applied: applied as u32,
                failed: failed as u32,
                pending: (targets.len() - applied - failed) as u32,
                targets: targets
                    .into_keys()
                    .map(|(shard, tenant)| flotilla_core::Target { shard, tenant }.to_string())
                    .collect(),
                ..Default::default()
            }
        })
        .collect()
}

pub fn summary(plan: &PlanRow) -> pb::PlanSummary {
    pb::PlanSummary {
        plan_id: plan.id.clone(),
        name: plan.name.clone(),
        state: plan.state.as_str().into(),
        environment: plan.environment.clone(),
        created_at_ms: plan.created_at_ms as u64,
        updated_at_ms: plan.updated_at_ms as u64,
        targets: plan.targets as u32,
        steps: plan.steps as u32,
    }
}
