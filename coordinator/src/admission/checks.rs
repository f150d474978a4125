//! Checks of a plan against what the preflight found: edited migrations, and what atomic
//! units need (shards able to prepare, no dependency across targets inside a unit).
use std::collections::BTreeMap;

use flotilla_core::{PlanSpec, Target, TxMode};

use super::preflight::StepKey;
use crate::error::{Refusal, some_of};
use crate::planner::Expansion;

/// An applied migration whose content changed since: named, with where.
pub(super) fn edited_after_applied(
    spec: &PlanSpec,
    applied: &BTreeMap<StepKey, String>,
) -> Result<(), Refusal> {
    for m in &spec.migrations {
        let differs: Vec<String> = applied
            .iter()
            .filter(|((id, _, _), sum)| id == m.id.as_str() && **sum != m.checksum)
            .map(|((_, shard, tenant), _)| {
                Target {
                    shard: shard.clone(),
                    tenant: tenant.clone(),
                }
                .to_string()
            })
            .collect();
        if !differs.is_empty() {
            return Err(Refusal::EditedAfterApplied {
                migration: m.id.to_string(),
                source_path: m.source.clone(),
                checksum: m.checksum[..12].to_string(),
                targets: some_of(&differs, 5),
            });
        }
    }
    Ok(())
}

/// Atomic units: every shard a unit prepares on must be able to prepare (refused before
/// any change, naming the shard and the setting), and a prepared change is invisible to
/// other transactions until the decision, so a step cannot wait on another target's step
/// of the same unit (units before it have committed by the time it runs).
pub(super) fn atomic(
    spec: &PlanSpec,
    expansion: &Expansion,
    two_phase_errors: &BTreeMap<String, String>,
) -> Result<(), Refusal> {
    for s in &expansion.steps {
        let m = &spec.migrations[s.migration];
        let shard = &expansion.targets[s.target].shard;
        if m.tx_mode == TxMode::Transactional
            && spec.atomic_unit(&m.id).is_some()
            && let Some(e) = two_phase_errors.get(shard)
        {
            return Err(Refusal::CannotPrepare(e.clone()));
        }
    }
    if !spec.two_phase() {
        return Ok(());
    }
    for s in &expansion.steps {
        let unit = spec.atomic_unit(&spec.migrations[s.migration].id);
        if unit.is_none() {
            continue;
        }
        if let Some(&d) = s.deps.iter().find(|&&d| {
            expansion.steps[d].target != s.target
                && spec.atomic_unit(&spec.migrations[expansion.steps[d].migration].id) == unit
        }) {
            return Err(Refusal::CrossTargetDependency {
                migration: spec.migrations[s.migration].id.to_string(),
                target: expansion.targets[s.target].to_string(),
                dependency: spec.migrations[expansion.steps[d].migration].id.to_string(),
                dependency_target: expansion.targets[expansion.steps[d].target].to_string(),
            });
        }
    }
    Ok(())
}
