//! `fleet baseline`: adopting a fleet another tool (dbmate, golang-migrate, Flyway)
//! migrated. The migrations a target's own history says ran there (or, with `up_to`, every
//! migration up to one) are recorded in its journal as applied, so a plan runs only what
//! is pending. The agents read the histories and write the journal rows, each target in
//! one transaction behind the fence; no migration SQL runs.
//!
//! All or nothing across the fleet, as far as a fleet allows: every target is read first
//! (a dry run everywhere); a dirty golang-migrate state, a failed Flyway run or a schema
//! holding two tools' tables anywhere refuses the whole baseline before any row is written.
//! Targets are the plan's (its selector, each migration's scope and selector), resolved as
//! a plan's are, and a migration is recorded only where it applies.
/// The journal's plan id of a `fleet baseline`'s rows (`baseline-<random>`): no plan's.
pub const BASELINE_PREFIX: &str = "baseline-";

use std::collections::BTreeMap;

use flotilla_core::foreign::Tool;
use flotilla_core::{PlanSpec, pb};
use tracing::{info, instrument};

use crate::actor::Actor;
use crate::error::{CoordinatorError, Refusal};
use crate::planner;
use crate::service::Coordinator;

impl Coordinator {
    #[instrument(skip_all, fields(dry_run = req.dry_run))]
    /// Records a baseline as `actor` (the caller, as the operator API resolved it).
    pub async fn baseline(
        &self,
        req: pb::FleetBaselineRequest,
        actor: Actor,
    ) -> Result<pb::FleetBaselineResponse, CoordinatorError> {
        let epoch = self.leader_epoch()?;
        let raw = req.spec.ok_or_else(|| {
            CoordinatorError::InvalidRequest("a baseline needs its migrations".into())
        })?;
        let up_to = req.up_to.trim().to_string();
        let from = match req.from.trim() {
            _ if !up_to.is_empty() => String::new(),
            "" | "auto" => "auto".to_string(),
            other => match Tool::parse(other) {
                Some(t) => t.as_str().to_string(),
                None => {
                    return Err(CoordinatorError::InvalidRequest(format!(
                        "unknown tool `{other}` for --from: expected dbmate, golang-migrate, flyway or auto"
                    )));
                }
            },
        };
        // Validated as a plan is: ids, graph, checksums recomputed from the SQL.
        let spec = PlanSpec::try_from(raw)?;
        let last = if up_to.is_empty() {
            None
        } else {
            Some(
                spec.migrations
                    .iter()
                    .position(|m| m.id.as_str() == up_to)
                    .ok_or_else(|| {
                        CoordinatorError::InvalidRequest(format!(
                            "--up-to `{up_to}` is not a migration of {} (its migrations: {})",
                            spec.source,
                            crate::error::some_of(
                                &spec
                                    .migrations
                                    .iter()
                                    .map(|m| m.id.to_string())
                                    .collect::<Vec<_>>(),
                                5
                            )
                            .replace(" more targets", " more")
                        ))
                    })?,
            )
        };
        self.refuse_unattached(&spec).await?;
        let seen = self
            .preflight(&spec, crate::admission::Mode::Submit)
            .await?;
        let expansion = planner::expand(&spec, &seen.fleet)?;

        // What each shard is asked: its targets, each with the migrations that apply to it
        // (up to `last`), in the plan's order.
        let mut per_target: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for s in &expansion.steps {
            if last.is_none_or(|l| s.migration <= l) {
                per_target.entry(s.target).or_default().push(s.migration);
            }
        }
        let mut per_shard: BTreeMap<String, Vec<pb::BaselineTargetRequest>> = BTreeMap::new();
        for (target, mut migrations) in per_target {
            migrations.sort_unstable();
            let t = &expansion.targets[target];
            per_shard
                .entry(t.shard.clone())
                .or_default()
                .push(pb::BaselineTargetRequest {
                    tenant: t.tenant.clone(),
                    migrations: migrations
                        .into_iter()
                        .map(|m| pb::BaselineMigration {
                            id: spec.migrations[m].id.to_string(),
                            checksum: spec.migrations[m].checksum.clone(),
                        })
                        .collect(),
                });
        }
        let baseline_id = format!(
            "{BASELINE_PREFIX}{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let request = |dry_run: bool| pb::BaselineRequest {
            request_id: 0,
            targets: Vec::new(),
            from: from.clone(),
            dry_run,
            epoch,
            baseline_id: baseline_id.clone(),
            up_to: last.is_some(),
        };

        let read = self.ask_baseline(&per_shard, request(true)).await?;
        let problems: Vec<String> = read
            .iter()
            .filter(|t| !t.error.is_empty())
            .map(|t| {
                format!(
                    "{}: {}",
                    crate::versions::target_name(&t.shard, &t.tenant),
                    t.error
                )
            })
            .collect();
        if !problems.is_empty() {
            return Err(Refusal::BaselineRefused {
                problems: crate::error::some_of(&problems, 5),
            }
            .into());
        }
        if req.dry_run {
            return Ok(pb::FleetBaselineResponse {
                baseline_id: String::new(),
                targets: read,
                dry_run: true,
            });
        }
        let recorded = self.ask_baseline(&per_shard, request(false)).await?;
        let rows: usize = recorded.iter().map(|t| t.recorded.len()).sum();
        let refused: Vec<&pb::BaselineTarget> =
            recorded.iter().filter(|t| !t.error.is_empty()).collect();
        // what the shards recorded stands whoever leads now: its audit entry is unfenced
        self.write_unfenced(actor.audit(
            "baseline",
            &baseline_id,
            &format!(
                "{} journal rows on {} targets ({}), from {}{}",
                rows,
                recorded.len(),
                if last.is_some() {
                    format!("up to {up_to}")
                } else {
                    format!("{from} history")
                },
                spec.source,
                if refused.is_empty() {
                    String::new()
                } else {
                    format!("; {} targets refused since the dry run", refused.len())
                }
            ),
        ));
        self.flush().await;
        info!(baseline = %baseline_id, rows, targets = recorded.len(), "baseline recorded");
        // Tenants whose catch-up was refused for want of this baseline (require_baseline)
        // are caught up now (they stayed behind, still said refused, after it).
        let mut recorded_on: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for t in recorded.iter().filter(|t| t.error.is_empty()) {
            recorded_on
                .entry(t.shard.as_str())
                .or_default()
                .push(t.tenant.clone());
        }
        for (shard, names) in recorded_on {
            // (with its agent away, the refusal stays said: nothing is caught up there now)
            let Some(agent) = self.inner.fleet.agent(shard) else {
                continue;
            };
            let again = self.inner.versions.take_catch_up_refused(shard, &names);
            if again.is_empty() {
                continue;
            }
            let tenants: Vec<pb::Tenant> = agent
                .tenants
                .into_iter()
                .filter(|t| again.contains(&t.name))
                .collect();
            info!(%shard, tenants = tenants.len(), "catching up the tenants the baseline was for");
            let (me, shard) = (self.clone(), shard.to_string());
            tokio::spawn(async move { me.catch_up(&shard, &tenants, false).await });
        }
        Ok(pb::FleetBaselineResponse {
            baseline_id,
            targets: recorded,
            dry_run: false,
        })
    }

    /// Asks every shard, in parallel, for its part of a baseline; the targets' answers
    /// in shard order. A shard that cannot answer fails the whole (its agent is away).
    async fn ask_baseline(
        &self,
        per_shard: &BTreeMap<String, Vec<pb::BaselineTargetRequest>>,
        request: pb::BaselineRequest,
    ) -> Result<Vec<pb::BaselineTarget>, CoordinatorError> {
        let asks = per_shard.iter().map(|(shard, targets)| {
            let request = pb::BaselineRequest {
                targets: targets.clone(),
                ..request.clone()
            };
            async move {
                self.inner
                    .fleet
                    .baseline(shard, request, self.inner.defaults.preflight_timeout)
                    .await
            }
        });
        let mut out = Vec::new();
        for reply in futures::future::join_all(asks).await {
            out.extend(reply?.targets);
        }
        Ok(out)
    }
}
