//! The dry run (`plan explain`, `plan submit --dry-run`): what a submit would do, touching
//! nothing. The plan is resolved by admission's own code (`Coordinator::resolve`, in its dry
//! run mode), so the targets, waves and refusals shown are the ones a submit would get; each
//! migration's statements are parsed for the locks they take; the agents read the sizes of
//! the relations named, in read-only transactions; and the control store's history of step
//! durations and data change rates gives an estimate. Nothing is written: no plan row, no
//! audit row, no journal row, no etcd key, no lock.
mod estimate;
mod sizes;
mod statements;

use std::collections::BTreeMap;

use flotilla_core::lint::{LintOptions, lint_plan};
use flotilla_core::{PlanSpec, TxMode, pb};
use tracing::{info, instrument};

use crate::admission::Mode;
use crate::error::CoordinatorError;
use crate::service::Coordinator;

impl Coordinator {
    #[instrument(skip_all, fields(plan = %raw.name))]
    pub async fn explain(
        &self,
        raw: pb::PlanSpec,
        promotion: &crate::admission::Promotion,
    ) -> Result<pb::ExplainResponse, CoordinatorError> {
        // Only the leader holds the agents' streams (a follower's refusal names it).
        self.leader_epoch()?;
        // (a new plan's gates read: not checked of stored plans, which are read again)
        for w in &raw.waves {
            flotilla_core::waves::gates_read(w)?;
        }
        if *promotion != crate::admission::Promotion::CatchUp {
            flotilla_core::size_read(&raw)?;
            flotilla_core::batch_floor_read(&raw)?;
        }
        let spec = PlanSpec::try_from(raw)?;
        let resolution = self.resolve(&spec, Mode::DryRun, promotion).await?;
        let expansion = &resolution.expansion;
        let scope_of = |m: usize| spec.migrations[m].scope.unwrap_or(expansion.default_scope);

        // Statements and the relations they lock, per migration.
        let parsed: Vec<statements::Parsed> =
            spec.migrations.iter().map(statements::parse).collect();

        // The targets of each migration, and whether the journal holds it already.
        let mut targets_of: Vec<Vec<usize>> = vec![Vec::new(); spec.migrations.len()];
        let mut applied_of: Vec<u32> = vec![0; spec.migrations.len()];
        for s in &expansion.steps {
            let t = &expansion.targets[s.target];
            targets_of[s.migration].push(s.target);
            let key = (
                spec.migrations[s.migration].id.to_string(),
                t.shard.clone(),
                t.tenant.clone(),
            );
            if resolution.seen.applied.contains_key(&key) {
                applied_of[s.migration] += 1;
            }
        }

        // One read per shard: every relation its targets' migrations name.
        let mut unknown = resolution.seen.unknown.clone();
        let asks = sizes::asks(expansion, &targets_of, &parsed, &unknown);
        let probes = self.read_sizes(asks, &mut unknown).await;

        let history = estimate::History::load(&self.inner.store).await?;
        let max_parallel = if spec.max_parallel == 0 {
            flotilla_core::model::DEFAULT_MAX_PARALLEL
        } else {
            spec.max_parallel
        };
        let mut migrations = Vec::with_capacity(spec.migrations.len());
        let mut totals = estimate::Totals::default();
        for (m, mig) in spec.migrations.iter().enumerate() {
            let p = &parsed[m];
            let relations: Vec<pb::RelationSizes> = p
                .relations
                .iter()
                .map(|r| sizes::aggregate(r, &targets_of[m], expansion, &probes, &unknown))
                .collect();
            let steps = targets_of[m].len() as u32;
            let to_run = steps - applied_of[m];
            let guess = history.estimate(mig, p, &relations);
            let estimate_ms = guess
                .step_ms
                .map(|ms| ms * u64::from(to_run.div_ceil(max_parallel)))
                .map(|ms| ms.max(guess.slowest_ms.filter(|_| to_run > 0).unwrap_or(0)))
                .unwrap_or(0);
            totals.add(guess.step_ms.is_some(), estimate_ms, to_run);
            migrations.push(pb::ExplainMigration {
                id: mig.id.to_string(),
                kind: mig.kind.clone(),
                scope: scope_of(m).as_str().to_string(),
                tx_mode: match mig.tx_mode {
                    TxMode::Transactional => "transactional",
                    TxMode::NonTransactional => "non-transactional",
                }
                .to_string(),
                risk: mig.risk.clone(),
                targets: steps,
                already_applied: applied_of[m],
                statements: p.statements.clone(),
                relations,
                step_estimate_ms: guess.step_ms.unwrap_or(0),
                estimate_ms,
                estimate_basis: guess.basis,
                findings: Vec::new(),
                statements_error: p.error.clone(),
            });
        }

        // The lint as a submit runs it, but knowing the tables' sizes (an index built without
        // CONCURRENTLY on a large table is an error then); errors shown, not refused.
        // linted in the scope the fleet gives `auto`, as a submit checks it
        let mut scoped = spec.clone();
        scoped.default_scope = scoped.default_scope.or(Some(expansion.default_scope));
        let findings = lint_with_sizes(&scoped, &migrations);
        for m in &mut migrations {
            m.findings = findings
                .iter()
                .filter(|f| f.migration == m.id)
                .cloned()
                .collect();
        }

        // Only the shards the plan would touch are worth naming.
        let involved: std::collections::BTreeSet<&str> =
            expansion.targets.iter().map(|t| t.shard.as_str()).collect();
        let unknown_shards = unknown
            .iter()
            .filter(|(s, _)| involved.contains(s.as_str()))
            .map(|(s, why)| format!("{s}: {why}"))
            .collect();
        let (estimate_ms, estimate_basis) = totals.finish(max_parallel);
        // what a submit would warn of
        let mut warnings: Vec<String> = resolution
            .drift_warning
            .into_iter()
            .chain(resolution.baseline_warning)
            .chain(resolution.data_warning)
            .collect();
        // What refuses a submit is its own lint, without the sizes; the errors the sizes
        // add (a blocking index build on a large table) are said, not taken for a refusal.
        let submit_lint_errors = lint_plan(&scoped, &LintOptions::default())
            .iter()
            .filter(|f| f.severity == flotilla_core::lint::Severity::Error)
            .count();
        let errors = findings.iter().filter(|f| f.severity == "error").count();
        if submit_lint_errors > 0 {
            warnings.push(format!(
                "a submit would refuse this plan: the lint found {submit_lint_errors} error(s) (see each migration's findings)"
            ));
        }
        if errors > submit_lint_errors {
            warnings.push(format!(
                "knowing the tables' sizes, the lint finds {} error(s) more than a submit checks (see each migration's findings): fix them before production",
                errors - submit_lint_errors
            ));
        }
        info!(
            targets = expansion.targets.len(),
            steps = expansion.steps.len(),
            "dry run explained"
        );
        Ok(pb::ExplainResponse {
            name: spec.name.clone(),
            targets: expansion.targets.len() as u32,
            steps: expansion.steps.len() as u32,
            already_applied: applied_of.iter().sum(),
            migrations,
            waves: waves(&spec, expansion, &resolution.wave_of),
            unknown_shards,
            warnings,
            approval: resolution.awaiting.unwrap_or_default(),
            estimate_ms,
            estimate_basis,
            max_parallel,
            submit_lint_errors: submit_lint_errors as u32,
        })
    }
}

/// The waves a submit would choose, with their targets (one wave `all` without waves).
fn waves(
    spec: &PlanSpec,
    expansion: &crate::planner::Expansion,
    wave_of: &[usize],
) -> Vec<pb::ExplainWave> {
    let names: Vec<String> = if spec.rollout.waves.is_empty() {
        vec!["all".to_string()]
    } else {
        spec.rollout.waves.iter().map(|w| w.name.clone()).collect()
    };
    let mut targets: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (t, &w) in wave_of.iter().enumerate() {
        targets
            .entry(w)
            .or_default()
            .push(expansion.targets[t].to_string());
    }
    names
        .into_iter()
        .enumerate()
        .map(|(i, name)| pb::ExplainWave {
            name,
            targets: targets.remove(&i).unwrap_or_default(),
            max_parallel: spec
                .rollout
                .waves
                .get(i)
                .and_then(|w| w.max_parallel)
                .unwrap_or(0),
        })
        .collect()
}

/// The lint's findings with the largest size each relation has on the plan's targets.
fn lint_with_sizes(spec: &PlanSpec, migrations: &[pb::ExplainMigration]) -> Vec<pb::LintFinding> {
    let mut table_bytes: BTreeMap<String, u64> = BTreeMap::new();
    for r in migrations.iter().flat_map(|m| &m.relations) {
        if r.present > 0 {
            let e = table_bytes.entry(r.relation.clone()).or_default();
            *e = (*e).max(r.max_bytes.max(0) as u64);
        }
    }
    let options = LintOptions {
        table_bytes: Some(table_bytes),
        ..LintOptions::default()
    };
    lint_plan(spec, &options)
        .iter()
        .map(pb::LintFinding::from)
        .collect()
}
