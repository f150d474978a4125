//! Admission: a plan is validated before any shard is touched, and nothing is stored
//! half (DESIGN invariant 7). The wire spec is converted (`TryFrom`, the graph and SQL
//! framing checked there), every shard the plan could touch is asked for its tenants,
//! journal rows and what the plan needs checked (the preflight), and the plan is refused
//! with an error naming the file, migration, target or setting, or stored and started.
mod approval;
mod checks;
mod data;
pub(crate) mod preflight;
mod promotion;
mod waves;

pub(crate) use preflight::{Seen, unknown_reason};
pub use promotion::Promotion;

use std::sync::Arc;

use flotilla_core::state::{PlanState, WaveState};
use flotilla_core::{PlanSpec, pb};
use prost::Message;
use tracing::{info, instrument};

use crate::actor::Actor;
use crate::error::{CoordinatorError, Refusal};
use crate::plan::{PlanRun, StepStatus};
use crate::planner::{self, Expansion};
use crate::service::Coordinator;
use crate::store::{PlanRow, StepRow, StoreOp, WaveRow, now_ms};

impl Coordinator {
    /// Validates a plan against the fleet, stores it and starts it (the promotion gate
    /// applying).
    pub async fn submit(
        &self,
        raw: pb::PlanSpec,
    ) -> Result<pb::SubmitPlanResponse, CoordinatorError> {
        self.submit_as(raw, Promotion::Check).await
    }

    /// `submit`, saying how the promotion gate treats the plan.
    pub async fn submit_as(
        &self,
        raw: pb::PlanSpec,
        promotion: Promotion,
    ) -> Result<pb::SubmitPlanResponse, CoordinatorError> {
        self.submit_inner(raw, promotion, None).await
    }

    /// A submit its client may send more than once (its answer lost with a cut
    /// connection, or sent on to a new leader): with a request id, the plan a submission
    /// with that id stored is the answer, and nothing new is submitted. The same id for
    /// another plan (by name, migrations and their checksums) is refused; one in progress
    /// here is answered "in progress, send it again".
    pub async fn submit_once(
        &self,
        raw: pb::PlanSpec,
        promotion: Promotion,
        request_id: &str,
    ) -> Result<pb::SubmitPlanResponse, CoordinatorError> {
        if request_id.is_empty() {
            return self.submit_as(raw, promotion).await;
        }
        self.leader_epoch()?;
        let Some(_claim) = SubmissionClaim::take(&self.inner.submitting, request_id) else {
            return Err(CoordinatorError::SubmitInProgress(request_id.to_string()));
        };
        if let Some(plan_id) = self.inner.store.plan_of_request(request_id).await? {
            let row = self.stored_plan(&plan_id).await?;
            let stored = hex::decode(&row.spec_hex)
                .ok()
                .and_then(|b| pb::PlanSpec::decode(b.as_slice()).ok())
                .unwrap_or_default();
            let same = |spec: &pb::PlanSpec| -> Vec<(String, String)> {
                spec.migrations
                    .iter()
                    .map(|m| (m.id.clone(), flotilla_core::checksum(&m.up_sql)))
                    .collect()
            };
            if row.name != raw.name || same(&stored) != same(&raw) {
                return Err(CoordinatorError::InvalidRequest(format!(
                    "request id {request_id} was used for plan {plan_id} ({}), {}: another \
                     plan needs another request id",
                    row.name,
                    files_changed(&row.name, &stored, &raw, &same)
                )));
            }
            // The same files with other settings (`--selector`, `--policy`, `--atomic`, ...)
            // are another plan too: answered with the stored one, a pipeline took its
            // changed plan for run (exit 0, "every step applied") when nothing of it was.
            let changed = settings_changed(&stored, &raw);
            if !changed.is_empty() {
                return Err(CoordinatorError::InvalidRequest(format!(
                    "request id {request_id} was used for plan {plan_id} ({}) with other \
                     settings ({}): another plan needs another request id",
                    row.name,
                    changed.join(", ")
                )));
            }
            info!(plan = %plan_id, %request_id, "a submit sent again: answered with the plan it stored");
            return Ok(pb::SubmitPlanResponse {
                status: self.status(&plan_id).await.ok(),
                warnings: vec![format!(
                    "this submit (request id {request_id}) was received before: plan {plan_id} \
                     is the one it stored, and nothing new was submitted"
                )],
                plan_id,
                findings: Vec::new(),
            });
        }
        self.submit_inner(raw, promotion, Some(request_id)).await
    }

    #[instrument(skip_all, fields(plan = %raw.name))]
    async fn submit_inner(
        &self,
        raw: pb::PlanSpec,
        promotion: Promotion,
        request_id: Option<&str>,
    ) -> Result<pb::SubmitPlanResponse, CoordinatorError> {
        let epoch = self.leader_epoch()?;
        let started = std::time::Instant::now();
        // (a new plan's gates read: not checked of stored plans, which are read again)
        for w in &raw.waves {
            flotilla_core::waves::gates_read(w)?;
        }
        // (a catch-up is made of migrations that passed already, some maybe before the
        // limit: held to none of it, or a tenant could never be brought up to date)
        if promotion != Promotion::CatchUp {
            flotilla_core::size_read(&raw)?;
            flotilla_core::batch_floor_read(&raw)?;
        }
        let spec = PlanSpec::try_from(raw)?;
        // Counted before the preflight reads the journals: a rollback reply after it may
        // mean a step read applied is undone by the time the plan runs.
        let undo_replies = self.inner.fleet.undo_replies();
        let Resolution {
            seen,
            expansion,
            wave_of,
            drift_warning,
            baseline_warning,
            data_warning,
            awaiting,
            findings,
            skipped_gate,
        } = self.resolve(&spec, Mode::Submit, &promotion).await?;
        let resolve_ms = started.elapsed().as_millis() as u64;

        let plan_id = new_plan_id();
        let statuses: Vec<StepStatus> = expansion
            .steps
            .iter()
            .map(|s| {
                let t = &expansion.targets[s.target];
                let key = (
                    spec.migrations[s.migration].id.to_string(),
                    t.shard.clone(),
                    t.tenant.clone(),
                );
                if seen.applied.contains_key(&key) {
                    StepStatus::AlreadyApplied
                } else {
                    StepStatus::Pending
                }
            })
            .collect();
        // A catch-up whose every step its tenants' journals hold (a tenant renamed back, one
        // that kept its history): no plan, where one said "nothing to do" in the plan list
        // (and, under an approval rule, waited for an approver).
        // Not while another plan is open on its shard: a rollback there may undo what was
        // read applied, and a stored plan reads its journals again once it has the locks.
        if matches!(promotion, Promotion::CatchUp)
            && statuses.iter().all(|s| *s == StepStatus::AlreadyApplied)
        {
            let mut shards: Vec<&str> =
                expansion.targets.iter().map(|t| t.shard.as_str()).collect();
            shards.dedup();
            let mut busy = false;
            for shard in shards {
                busy |= !self.inner.store.open_plans_on(shard).await?.is_empty();
            }
            if !busy {
                return Err(Refusal::NothingToCatchUp.into());
            }
        }
        let created = now_ms();
        self.store_plan(&NewPlan {
            id: &plan_id,
            spec: &spec,
            expansion: &expansion,
            statuses: &statuses,
            wave_of: &wave_of,
            epoch,
            created,
            awaiting: awaiting.as_deref(),
            request_id,
        })
        .await;
        if let Some(audit) = skipped_gate {
            self.write_under(epoch, audit(&plan_id));
            self.flush().await;
        }
        // the plan is stored only if this term still leads
        self.term_ends_here_for_a_fault_test().await;
        if let Err(ended) = self.still_leading_in(epoch) {
            // Stored before the next term fenced the store, the plan is that term's now.
            self.landed_as_the_term_ended(&plan_id, ended, |_| true)
                .await?;
            return Ok(pb::SubmitPlanResponse {
                status: self.status(&plan_id).await.ok(),
                plan_id,
                warnings: drift_warning
                    .into_iter()
                    .chain(baseline_warning)
                    .chain(data_warning)
                    .collect(),
                findings,
            });
        }
        // Where the time from submit to the first step goes (issue 15: under 1 s at 10,000
        // tenants): the preflight and the checks, then the plan stored before anything runs.
        // The writer tries a write a few times and then gives it up (logged): a plan the
        // store did not take is not run (its steps' writes would fail the same way, and
        // its status would be "not found" once it ended).
        if self.inner.store.plan(&plan_id).await?.is_none() {
            return Err(crate::store::StoreError::NotStored(plan_id).into());
        }
        let store_ms = started.elapsed().as_millis() as u64 - resolve_ms;
        info!(plan = %plan_id, targets = expansion.targets.len(), steps = expansion.steps.len(), resolve_ms, store_ms, "plan submitted");
        if let Some(needs) = awaiting {
            // Stored, and nothing else: no lock, no step, until its approvals are in.
            info!(plan = %plan_id, "plan awaits {needs}");
            crate::metrics::plan_approval("awaiting");
            self.count_awaiting().await;
            return Ok(pb::SubmitPlanResponse {
                status: Some(self.status(&plan_id).await?),
                plan_id,
                warnings: drift_warning
                    .into_iter()
                    .chain(baseline_warning.clone())
                    .chain(data_warning.clone())
                    .collect(),
                findings,
            });
        }

        let warning = prometheus_warning(&spec).await;
        let spec = Arc::new(spec);
        let mut run = PlanRun::new(
            plan_id.clone(),
            spec.clone(),
            self.definition(&plan_id, &spec),
            expansion.targets,
            expansion.steps,
            statuses,
            created,
            epoch,
        );
        run.set_waves(wave_of, &[]);
        run.applied_read = crate::plan::AppliedRead::AtSubmit { undo_replies };
        if let Some(w) = warning {
            // Said now, not refused: the server may be back by the time the gate runs,
            // and a gate that cannot reach it fails then.
            tracing::warn!(plan = %plan_id, "{w}");
            run.message = w;
        }
        let status = match self.start_run(run).await? {
            Some(status) => status,
            // stored under a term that ended since: the next one runs it
            None => self.status(&plan_id).await?,
        };
        tracing::debug!(plan = %plan_id, ms = started.elapsed().as_millis() as u64, "plan started");
        Ok(pb::SubmitPlanResponse {
            plan_id,
            status: Some(status),
            warnings: drift_warning
                .into_iter()
                .chain(baseline_warning)
                .chain(data_warning)
                .chain(unbudgeted_waves_warning(&spec))
                .collect(),
            findings,
        })
    }

    /// What a plan resolves to over the fleet as it is now: its targets and steps, what is
    /// applied already, each target's wave, and the approvals it needs; or the refusal that
    /// names what is wrong. Submit and the dry run (`plan explain`) both come here, so a dry
    /// run shows exactly what a submit would choose or refuse. Nothing is written here; a
    /// submit's preflight records the tenants its agents found, a dry run's does not.
    pub(crate) async fn resolve(
        &self,
        spec: &PlanSpec,
        mode: Mode,
        promotion: &Promotion,
    ) -> Result<Resolution, CoordinatorError> {
        // Before any shard is asked anything: the SQL alone decides. A dry run lints after
        // it read the tables' sizes, and shows errors instead of refusing.
        let findings = match mode {
            Mode::Submit => checks::lint(spec)?,
            Mode::DryRun => Vec::new(),
        };
        self.check_environment(spec, promotion)?;
        // From the store only: a plan that is not promoted is refused before any shard is
        // asked (a dry run too: it says what a submit would).
        let skipped_gate = self
            .promotion_gate(spec, promotion, mode)
            .await?
            .map(|audit| Box::new(audit) as SkippedGate);
        if mode == Mode::Submit {
            self.refuse_unattached(spec).await?;
        }
        let asked = std::time::Instant::now();
        let seen = self.preflight(spec, mode).await?;
        tracing::debug!(
            ms = asked.elapsed().as_millis() as u64,
            "the preflight's answers are in"
        );
        checks::edited_after_applied(spec, &seen.applied)?;
        let expansion = planner::expand(spec, &seen.fleet)?;
        if mode == Mode::Submit {
            checks::tenant_escape(spec, expansion.default_scope)?;
        }
        checks::schemas_known(&expansion, &seen.schema_changed)?;
        self.environment_labels_agree(spec, &expansion, promotion)?;
        let data_warning = data::check_data_problems(spec, &expansion, &seen.data_problems)?;
        checks::atomic(
            spec,
            &expansion,
            &seen.two_phase_errors,
            &seen.prepare_capacity,
            &seen.lock_tables,
        )?;
        let wave_of = waves::assign(spec, &expansion)?;
        let drift_warning = self.drift_check(spec, &expansion).await?;
        let baseline_warning = baseline_check(spec, &expansion, &seen.unbaselined)?;
        // Asked last: a plan that cannot run is refused before anyone is asked to approve it.
        let awaiting = self.approval_needed(spec)?;
        Ok(Resolution {
            seen,
            expansion,
            wave_of,
            drift_warning,
            baseline_warning,
            data_warning,
            awaiting,
            findings,
            skipped_gate,
        })
    }

    /// The plan's targets whose schema drifted from their cohort's (`fleet drift`, from the
    /// leader's copy of the agents' fingerprints): a refusal with `require_no_drift`, else a
    /// warning for the submitter.
    async fn drift_check(
        &self,
        spec: &PlanSpec,
        expansion: &Expansion,
    ) -> Result<Option<String>, CoordinatorError> {
        let drifted = self.drifted_targets().await?;
        let hit: Vec<String> = expansion
            .targets
            .iter()
            .map(|t| crate::versions::target_name(&t.shard, &t.tenant))
            .filter(|name| drifted.contains(name))
            .collect();
        if hit.is_empty() {
            return Ok(None);
        }
        let targets = crate::error::some_of(&hit, 5);
        if spec.require_no_drift {
            return Err(Refusal::Drifted { targets }.into());
        }
        let warning = format!(
            "warning: the schema of {targets} differs from their cohort's, or their cohort is split with no majority shape (see `flotilla fleet drift`); set require_no_drift = true to refuse such plans"
        );
        tracing::warn!(plan = %spec.name, "{warning}");
        Ok(Some(warning))
    }

    /// The plan, its steps and the audit row, flushed to the store before anything runs.
    async fn store_plan(&self, new: &NewPlan<'_>) {
        let NewPlan {
            id: plan_id,
            spec,
            expansion,
            statuses,
            wave_of,
            epoch,
            created,
            awaiting,
            request_id,
        } = *new;
        let mut stored = pb::PlanSpec::from(spec);
        // Freeze the scope the plan resolved to, so a rebuild sees the same steps.
        stored.default_scope = match expansion.default_scope {
            flotilla_core::Scope::Shard => pb::Scope::Shard as i32,
            flotilla_core::Scope::Tenant => pb::Scope::Tenant as i32,
        };
        let row = PlanRow {
            id: plan_id.to_string(),
            name: spec.name.clone(),
            environment: spec.environment.clone(),
            state: if awaiting.is_some() {
                PlanState::AwaitingApproval
            } else {
                PlanState::Running
            },
            ends: PlanState::RolledBack,
            policy: spec.policy.as_str().into(),
            spec_hex: hex::encode(stored.encode_to_vec()),
            epoch: epoch as i64,
            message: awaiting
                .map(|a| format!("awaiting {a}"))
                .unwrap_or_default(),
            submitted_by: spec.submitted_by.clone(),
            created_at_ms: created,
            updated_at_ms: created,
            targets: expansion.targets.len() as i64,
            steps: expansion.steps.len() as i64,
            paused: String::new(),
        };
        let steps = expansion
            .steps
            .iter()
            .zip(statuses)
            .map(|(s, st)| {
                let t = &expansion.targets[s.target];
                StepRow {
                    migration_id: spec.migrations[s.migration].id.to_string(),
                    shard: t.shard.clone(),
                    tenant: t.tenant.clone(),
                    state: st.state(),
                    sqlstate: String::new(),
                    message: String::new(),
                    phase: String::new(),
                    detail: String::new(),
                    wave: wave_of[s.target] as i64,
                }
            })
            .collect();
        // One transaction: a plan stored without its waves or its submit's audit entry
        // would be one no reader expects.
        let mut together = vec![StoreOp::InsertPlan { plan: row, steps }];
        if let Some(request_id) = request_id {
            together.push(StoreOp::Submission {
                request_id: request_id.to_string(),
                plan_id: plan_id.to_string(),
            });
        }
        if !spec.rollout.waves.is_empty() {
            let mut names: Vec<&str> = spec.rollout.waves.iter().map(|w| w.name.as_str()).collect();
            if !spec.rollout.watch.is_zero() {
                names.push(flotilla_core::waves::WATCH);
            }
            let waves = names
                .into_iter()
                .enumerate()
                .map(|(i, name)| WaveRow {
                    idx: i as i64,
                    name: name.to_string(),
                    state: if i == 0 {
                        WaveState::Running
                    } else {
                        WaveState::Pending
                    },
                    bake_until_ms: None,
                    gate: String::new(),
                })
                .collect();
            together.push(StoreOp::Waves {
                plan_id: plan_id.to_string(),
                waves,
            });
        }
        let submitter = Actor::new(&spec.submitted_by, "");
        together.push(submitter.audit(
            "submit",
            plan_id,
            &format!(
                "{} migrations, {} targets, from {}",
                spec.migrations.len(),
                expansion.targets.len(),
                spec.source
            ),
        ));
        self.write_under(new.epoch, StoreOp::Together(together));
        self.flush().await;
    }

    /// What agents are sent of a plan: its migrations and the coordinator's defaults.
    pub(crate) fn definition(&self, plan_id: &str, spec: &PlanSpec) -> pb::PlanDefinition {
        pb::PlanDefinition {
            plan_id: plan_id.to_string(),
            migrations: spec.migrations.iter().map(pb::Migration::from).collect(),
            default_lock_timeout_ms: self.inner.defaults.lock_timeout.as_millis() as u64,
            default_statement_timeout_ms: self.inner.defaults.statement_timeout.as_millis() as u64,
            stop_on_failure: spec.policy != flotilla_core::FailurePolicy::Continue,
            generation: now_ms().max(0) as u64,
        }
    }
}

/// The plan's targets whose journal lacks migrations of the plan that another tool's
/// history (dbmate, golang-migrate, Flyway) says already ran there: the plan would run
/// them again. A refusal with `require_baseline`, else a warning naming the fix.
fn baseline_check(
    spec: &PlanSpec,
    expansion: &Expansion,
    unbaselined: &[pb::BaselineTarget],
) -> Result<Option<String>, CoordinatorError> {
    let planned: std::collections::BTreeSet<(&str, &str)> = expansion
        .targets
        .iter()
        .map(|t| (t.shard.as_str(), t.tenant.as_str()))
        .collect();
    let hit: Vec<&pb::BaselineTarget> = unbaselined
        .iter()
        .filter(|u| planned.contains(&(u.shard.as_str(), u.tenant.as_str())))
        .collect();
    if hit.is_empty() {
        return Ok(None);
    }
    let mut tools: Vec<&str> = hit.iter().map(|u| u.tool.as_str()).collect();
    tools.sort_unstable();
    tools.dedup();
    // Each target with what its own history says, targets alike together: one list of every
    // target and one of every migration said that migrations some of them never ran had
    // run on all of them.
    let mut alike: std::collections::BTreeMap<Vec<String>, Vec<String>> = Default::default();
    for u in &hit {
        let mut recorded = u.recorded.clone();
        recorded.sort();
        alike
            .entry(recorded)
            .or_default()
            .push(crate::versions::target_name(&u.shard, &u.tenant));
    }
    // the most targets first
    let mut alike: Vec<(Vec<String>, Vec<String>)> = alike.into_iter().collect();
    alike.sort_by_key(|(_, names)| std::cmp::Reverse(names.len()));
    const GROUPS: usize = 3;
    let mut history: Vec<String> = alike
        .iter()
        .take(GROUPS)
        .map(|(recorded, names)| {
            format!(
                "on {} says {}",
                crate::error::some_of(names, 5),
                crate::error::some_of(recorded, 3).replace(" more targets", " more")
            )
        })
        .collect();
    if alike.len() > GROUPS {
        let more: usize = alike.iter().skip(GROUPS).map(|(_, n)| n.len()).sum();
        history.push(format!("and {more} more targets"));
    }
    let history = history.join("; ");
    if spec.require_baseline {
        return Err(Refusal::NotBaselined {
            tool: tools.join("/"),
            history,
        }
        .into());
    }
    let warning = format!(
        "warning: {}'s history {history}: already ran there, but Flotilla's journal lacks it: this plan runs it again; record it first with `flotilla fleet baseline PATH` (require_baseline = true refuses such plans)",
        tools.join("/")
    );
    tracing::warn!(plan = %spec.name, "{warning}");
    Ok(Some(warning))
}

/// A warning when, under `policy = "continue"`, a wave before the last has no error budget
/// (its own `max_failures` nor the plan's) and no manual gate: its targets' failures stop
/// nothing, and the next wave starts whatever failed (a canary of three with one failed
/// went on to the other 47, nothing said).
fn unbudgeted_waves_warning(spec: &PlanSpec) -> Option<String> {
    if spec.policy != flotilla_core::FailurePolicy::Continue {
        return None;
    }
    let rollout = &spec.rollout;
    let (_, before_last) = rollout.waves.split_last()?;
    let open: Vec<String> = before_last
        .iter()
        .filter(|w| w.budget.or(rollout.budget).is_none() && !w.manual_gate)
        .map(|w| format!("`{}`", w.name))
        .collect();
    (!open.is_empty()).then(|| {
        format!(
            "warning: under policy = \"continue\" with no max_failures, failures in wave {} stop nothing: the next wave starts whatever failed there (set max_failures, \"0\" to stop at the first failure, or a manual gate)",
            open.join(", ")
        )
    })
}

/// How long a submit asks a wave's Prometheus whether it answers.
const SUBMIT_PROBE: std::time::Duration = std::time::Duration::from_secs(2);

/// A warning when a wave's Prometheus cannot be queried now (at submit).
async fn prometheus_warning(spec: &PlanSpec) -> Option<String> {
    let mut seen = std::collections::BTreeSet::new();
    for w in &spec.rollout.waves {
        let Some(p) = &w.prometheus else { continue };
        if !seen.insert(p.url.clone()) {
            continue;
        }
        // Only a warning: it holds the submit (and the plan's first step) back at most
        // SUBMIT_PROBE, not the gate's own timeout (a Prometheus that does not answer held
        // every submit back 10 s).
        let probe = crate::engine::prometheus_query(&p.url, &p.query);
        let error = match tokio::time::timeout(SUBMIT_PROBE, probe).await {
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("it did not answer within {}s", SUBMIT_PROBE.as_secs()),
        };
        return Some(format!(
            "warning: wave `{}`'s gate cannot be evaluated now ({error}); it fails at gate time if it still cannot",
            w.name
        ));
    }
    None
}

/// Whether a plan is resolved to be submitted, or only shown (the dry run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Submit,
    /// Shards that cannot be asked do not refuse the plan: they are named in `Seen::unknown`
    /// and their targets counted from what the coordinator last knew of them.
    DryRun,
}

/// What admission resolved a plan to over the fleet (see `Coordinator::resolve`).
pub(crate) struct Resolution {
    pub seen: Seen,
    pub expansion: Expansion,
    /// Each target's wave (index into the plan's waves; 0 without waves).
    pub wave_of: Vec<usize>,
    pub drift_warning: Option<String>,
    /// Targets whose journal lacks migrations another tool applied there (`fleet baseline`).
    pub baseline_warning: Option<String>,
    /// Data changes whose filter or batch SQL the preflight did not hold against them, as
    /// an earlier migration may make it right (`data::check_data_problems`).
    pub data_warning: Option<String>,
    /// The approvals it would wait for.
    pub awaiting: Option<String>,
    /// The lint's findings (at submit, warnings only: an error refuses; none in a dry run).
    pub findings: Vec<pb::LintFinding>,
    /// The audit row of a skipped promotion gate, written once the plan has its id.
    pub skipped_gate: Option<SkippedGate>,
}

/// Writes the audit row of a skipped promotion gate for the plan id it is given.
pub(crate) type SkippedGate = Box<dyn FnOnce(&str) -> StoreOp + Send>;

/// A plan admitted, as the store receives it.
#[derive(Clone, Copy)]
struct NewPlan<'a> {
    id: &'a str,
    spec: &'a PlanSpec,
    expansion: &'a Expansion,
    statuses: &'a [StepStatus],
    /// Each target's wave.
    wave_of: &'a [usize],
    epoch: u64,
    created: i64,
    /// What approvals it waits for, when it does.
    awaiting: Option<&'a str>,
    /// The client's id for the submission (`pb::SubmitPlanRequest::request_id`).
    request_id: Option<&'a str>,
}

/// A request id being submitted here, released when the submit is answered.
struct SubmissionClaim<'a> {
    set: &'a std::sync::Mutex<std::collections::HashSet<String>>,
    id: String,
}

impl<'a> SubmissionClaim<'a> {
    fn take(
        set: &'a std::sync::Mutex<std::collections::HashSet<String>>,
        id: &str,
    ) -> Option<SubmissionClaim<'a>> {
        let mut held = set.lock().unwrap_or_else(|p| p.into_inner());
        held.insert(id.to_string()).then(|| SubmissionClaim {
            set,
            id: id.to_string(),
        })
    }
}

impl Drop for SubmissionClaim<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

fn new_plan_id() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("p{}", &u[..10])
}

/// What differs between the plan stored under a request id and a submission sent again
/// under it, in its name or its migrations' up SQL (it said only "another plan", and an
/// edited file was hard to tell from a wrong id).
fn files_changed(
    stored_name: &str,
    stored: &pb::PlanSpec,
    raw: &pb::PlanSpec,
    same: &impl Fn(&pb::PlanSpec) -> Vec<(String, String)>,
) -> String {
    let (old, new) = (same(stored), same(raw));
    let mut what = Vec::new();
    if stored_name != raw.name {
        what.push(format!(
            "its name (`{stored_name}` there, `{}` now)",
            raw.name
        ));
    }
    let ids = |v: &[(String, String)]| v.iter().map(|(i, _)| i.clone()).collect::<Vec<_>>();
    let (old_ids, new_ids) = (ids(&old), ids(&new));
    let added: Vec<String> = new_ids
        .iter()
        .filter(|i| !old_ids.contains(i))
        .cloned()
        .collect();
    let gone: Vec<String> = old_ids
        .iter()
        .filter(|i| !new_ids.contains(i))
        .cloned()
        .collect();
    if !added.is_empty() {
        what.push(format!(
            "migrations added: {}",
            crate::error::some_of(&added, 5)
        ));
    }
    if !gone.is_empty() {
        what.push(format!(
            "migrations left out: {}",
            crate::error::some_of(&gone, 5)
        ));
    }
    let edited: Vec<String> = new
        .iter()
        .filter(|n| old.iter().any(|o| o.0 == n.0 && o.1 != n.1))
        .map(|(i, _)| i.clone())
        .collect();
    if !edited.is_empty() {
        what.push(format!(
            "up SQL edited since: {}",
            crate::error::some_of(&edited, 5)
        ));
    }
    if what.is_empty() {
        // the same migrations in another order
        what.push("its migrations in another order".into());
    }
    format!("other files ({})", what.join("; "))
}

/// The settings of a submission sent again under a request id that differ from those of
/// the plan stored under it (empty: the same plan). Both go through the plan's own
/// conversion, so a resend of the same request compares equal; what the coordinator fills
/// in (who submitted it, from where, the scope it resolved to) is left out.
fn settings_changed(stored: &pb::PlanSpec, raw: &pb::PlanSpec) -> Vec<&'static str> {
    let Ok(spec) = PlanSpec::try_from(raw.clone()) else {
        // not a plan at all: the submit refuses it for what it is
        return Vec::new();
    };
    let comparable = |s: &pb::PlanSpec| {
        let mut s = s.clone();
        s.default_scope = 0;
        s.submitted_by.clear();
        s.source.clear();
        s
    };
    let (old, new) = (comparable(stored), comparable(&pb::PlanSpec::from(&spec)));
    let mut changed = Vec::new();
    let mut differs = |name: &'static str, same: bool| {
        if !same {
            changed.push(name);
        }
    };
    differs("selector", old.selector == new.selector);
    differs("environment", old.environment == new.environment);
    differs("policy", old.policy == new.policy);
    differs("max_parallel", old.max_parallel == new.max_parallel);
    differs("atomic", old.atomic == new.atomic);
    differs("waves", old.waves == new.waves);
    differs(
        "error budget",
        old.max_failures == new.max_failures && old.on_budget_exhausted == new.on_budget_exhausted,
    );
    differs("migrations", old.migrations == new.migrations);
    if changed.is_empty() && old != new {
        changed.push("the plan's settings");
    }
    changed
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use flotilla_core::{PlanSpec, pb};

    use crate::plan::tests::plan_of;

    fn spec(policy: pb::FailurePolicy, canary: pb::Wave, max_failures: &str) -> Arc<PlanSpec> {
        let run = plan_of(&["a"], Vec::new(), &[("s0", "t1")], policy);
        let mut raw = pb::PlanSpec::from(&*run.spec);
        raw.waves = vec![
            pb::Wave {
                name: "canary".into(),
                selector: "tenant=t1".into(),
                ..canary
            },
            pb::Wave {
                name: "rest".into(),
                rest: true,
                ..Default::default()
            },
        ];
        raw.max_failures = max_failures.into();
        Arc::new(PlanSpec::try_from(raw).expect("valid plan"))
    }

    /// Under `continue`, a wave before the last with no error budget and no manual gate
    /// stops nothing: said at submit (a failing canary went on to the rest, nothing said).
    #[test]
    fn a_wave_whose_failures_stop_nothing_is_warned_of() {
        let w = super::unbudgeted_waves_warning(&spec(
            pb::FailurePolicy::Continue,
            Default::default(),
            "",
        ))
        .expect("warned");
        assert!(
            w.starts_with("warning: under policy = \"continue\" with no max_failures, failures in wave `canary` stop nothing"),
            "{w}"
        );
        // a budget (the wave's or the plan's), a manual gate, or another policy: nothing
        let budgeted = pb::Wave {
            max_failures: "0".into(),
            ..Default::default()
        };
        let gated = pb::Wave {
            manual_gate: true,
            ..Default::default()
        };
        for s in [
            spec(pb::FailurePolicy::Continue, budgeted, ""),
            spec(pb::FailurePolicy::Continue, Default::default(), "1"),
            spec(pb::FailurePolicy::Continue, gated, ""),
            spec(pb::FailurePolicy::Stop, Default::default(), ""),
        ] {
            assert_eq!(super::unbudgeted_waves_warning(&s), None);
        }
    }
}
