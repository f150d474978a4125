//! The operator API: convert the request, call the domain, map the error. Every call
//! has passed [`super::auth`] already; a handler only reads who acts from it.
use flotilla_core::pb;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{BoxStream, Peer, PlanNamed};
use crate::actor::Actor;
use crate::admission::Promotion;
use crate::auth::Caller;
use crate::engine::CommandKind;
use crate::service::Coordinator;

/// Who sent a request: the authenticated caller (None while authentication is off), where
/// from, and the plan a plan command names (for the audit rows of its refusals).
struct Origin {
    caller: Option<Caller>,
    peer: String,
    plan_id: String,
    /// A verified client certificate's name (see `CertName`).
    cert_name: Option<String>,
}

impl Origin {
    /// Who the request says acts: its own `actor`, or with none given (a CLI with a client
    /// certificate leaves its default out), the certificate's name when authentication is
    /// off (on, the credential names who acts anyway).
    fn said<'a>(&'a self, actor: &'a str) -> &'a str {
        match (&self.caller, &self.cert_name) {
            (None, Some(name)) if actor.trim().is_empty() => name,
            _ => actor,
        }
    }
}

fn origin<T>(req: &Request<T>) -> Origin {
    Origin {
        caller: req.extensions().get::<Caller>().cloned(),
        peer: req
            .extensions()
            .get::<Peer>()
            .map_or_else(|| "unknown".into(), |p| p.0.clone()),
        cert_name: req
            .extensions()
            .get::<super::auth::CertName>()
            .map(|n| n.0.clone()),
        plan_id: req
            .extensions()
            .get::<PlanNamed>()
            .map(|p| p.0.clone())
            .unwrap_or_default(),
    }
}

/// Whether the request's caller is an authenticated viewer.
fn is_viewer<T>(req: &Request<T>) -> bool {
    req.extensions()
        .get::<Caller>()
        .is_some_and(|c| c.role == crate::auth::Role::Viewer)
}

/// What PostgreSQL's DETAIL of a failure said is withheld from a viewer: it may hold row
/// values (`Failing row contains (...)`, a duplicate key's value), read-only roles' to see
/// no more than the plan's shape and errors.
pub(crate) const DETAIL_WITHHELD: &str = "(withheld from viewers: PostgreSQL's detail may hold row values; an operator's plan status shows it)";

/// A plan's status as the caller may read it: a viewer's without the failures' DETAIL,
/// nor the values PostgreSQL quotes in its messages ([`values_withheld`]).
fn for_the_caller(mut status: pb::PlanStatus, viewer: bool) -> pb::PlanStatus {
    if viewer {
        for error in status.failures.iter_mut().filter_map(|f| f.error.as_mut()) {
            if !error.detail.is_empty() {
                error.detail = DETAIL_WITHHELD.into();
            }
            error.message = values_withheld(&error.message);
        }
        status.message = values_withheld(&status.message);
        // a failed batch's reason is its PostgreSQL message (a cast of a row's value)
        for d in &mut status.data {
            d.reason = values_withheld(&d.reason);
        }
    }
    status
}

/// What a viewer reads of a message that may quote a row's value: PostgreSQL puts the
/// value after a colon (`invalid input syntax for type integer: "urgent"`, `invalid input
/// value for enum mood: "x"`, `malformed array literal: "..."`) or names it
/// (`value "123456789012" is out of range for type integer`); identifiers it quotes
/// without a colon (`relation "t" does not exist`) stay. A viewer read a row's value in
/// the message while its DETAIL was withheld.
pub(crate) fn values_withheld(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    loop {
        let colon = rest.find(": \"").map(|i| i + 3);
        let named = rest.find("value \"").map(|i| i + 7);
        let Some(start) = [colon, named].into_iter().flatten().min() else {
            out.push_str(rest);
            return out;
        };
        // PostgreSQL prints the value as it is, quotes in it too: it ends at the last
        // quote of the clause (up to the next "; " of Flotilla's own wording), and with
        // none, the message is withheld to its end (a value is not shown half)
        let clause_end = rest[start..].find("; ").map_or(rest.len(), |i| start + i);
        out.push_str(&rest[..start]);
        out.push_str("(withheld from viewers)");
        match rest[start..clause_end].rfind('"') {
            Some(i) => rest = &rest[start + i..],
            None => {
                out.push('"');
                return out;
            }
        }
    }
}

impl Coordinator {
    /// Who acts and why: the authenticated operator (a different `actor` is refused),
    /// or, with authentication off, the request's own `actor`.
    async fn actor(
        &self,
        from: &Origin,
        said: &str,
        reason: &str,
        method: &str,
    ) -> Result<Actor, Status> {
        let name = self
            .acting(
                from.caller.as_ref(),
                from.said(said),
                method,
                &from.peer,
                &from.plan_id,
            )
            .await?;
        Ok(Actor::new(&name, reason))
    }

    /// A plan command's plan, shard (if one was named) and who asked why.
    async fn command_of(
        &self,
        req: Request<pb::PlanCommand>,
        method: &str,
    ) -> Result<(String, Option<String>, Actor), Status> {
        let from = origin(&req);
        let c = req.into_inner();
        let shard = Some(c.shard.trim().to_string()).filter(|s| !s.is_empty());
        let actor = self.actor(&from, &c.actor, &c.reason, method).await?;
        Ok((c.plan_id, shard, actor))
    }

    /// A command for a whole plan: its plan and who asked why; `no_shard` says why a shard
    /// given with it is refused.
    async fn whole_plan(
        &self,
        req: Request<pb::PlanCommand>,
        method: &str,
        no_shard: &str,
    ) -> Result<(String, Actor), Status> {
        match self.command_of(req, method).await? {
            (_, Some(_), _) => Err(Status::invalid_argument(no_shard.to_string())),
            (plan_id, None, actor) => Ok((plan_id, actor)),
        }
    }

    /// Whether a submit (or its dry run) checks the promotion gate or skips it: a skip needs
    /// its reason (audited with it) and a role that may skip.
    async fn promotion_of(
        &self,
        req: &pb::SubmitPlanRequest,
        from: &Origin,
    ) -> Result<Promotion, Status> {
        let reason = req.override_reason.trim();
        let promotion = match (req.skip_promotion_check, reason.is_empty()) {
            (false, true) => Promotion::Check,
            (true, false) => Promotion::Skip {
                reason: reason.to_string(),
            },
            (true, true) => {
                return Err(Status::invalid_argument(
                    "--skip-promotion-check needs --reason TEXT: the override is audited with it",
                ));
            }
            (false, false) => {
                return Err(Status::invalid_argument(
                    "an override reason without --skip-promotion-check: nothing to override",
                ));
            }
        };
        if matches!(promotion, Promotion::Skip { .. }) {
            self.skip_promotion_allowed(from.caller.as_ref(), &from.peer)
                .await?;
        }
        Ok(promotion)
    }
}

#[tonic::async_trait]
impl pb::operator_service_server::OperatorService for Coordinator {
    async fn submit_plan(
        &self,
        req: Request<pb::SubmitPlanRequest>,
    ) -> Result<Response<pb::SubmitPlanResponse>, Status> {
        let from = origin(&req);
        let mut req = req.into_inner();
        let mut spec = req
            .spec
            .take()
            .ok_or_else(|| Status::invalid_argument("submit without a plan spec"))?;
        spec.submitted_by = self
            .acting(
                from.caller.as_ref(),
                from.said(&spec.submitted_by),
                "SubmitPlan",
                &from.peer,
                "",
            )
            .await?;
        let promotion = self.promotion_of(&req, &from).await?;
        let request_id = req.request_id.trim();
        if request_id.len() > 128 || !request_id.chars().all(|c| c.is_ascii_graphic()) {
            return Err(Status::invalid_argument(
                "--request-id: at most 128 printable ASCII characters, no spaces",
            ));
        }
        Ok(Response::new(
            self.submit_once(spec, promotion, request_id).await?,
        ))
    }

    async fn explain_plan(
        &self,
        req: Request<pb::SubmitPlanRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let from = origin(&req);
        let req = req.into_inner();
        // The dry run says what the submit would: with its override of the promotion gate
        // too (it was dropped, and the refusal told to use the flag given).
        let promotion = self.promotion_of(&req, &from).await?;
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("dry run without a plan spec"))?;
        Ok(Response::new(self.explain(spec, &promotion).await?))
    }

    async fn get_plan(
        &self,
        req: Request<pb::GetPlanRequest>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let viewer = is_viewer(&req);
        match self.status(&req.into_inner().plan_id).await {
            Ok(status) => Ok(self.naming_the_leader(Response::new(for_the_caller(status, viewer)))),
            Err(e) => Err(self.naming_the_leader_in(e.into())),
        }
    }

    async fn list_plans(
        &self,
        req: Request<pb::ListPlansRequest>,
    ) -> Result<Response<pb::ListPlansResponse>, Status> {
        let plans = self.list(req.into_inner().limit).await?;
        Ok(self.naming_the_leader(Response::new(plans)))
    }

    type WatchPlanStream = BoxStream<pb::PlanStatus>;

    async fn watch_plan(
        &self,
        req: Request<pb::GetPlanRequest>,
    ) -> Result<Response<Self::WatchPlanStream>, Status> {
        let viewer = is_viewer(&req);
        let id = req.into_inner().plan_id;
        // Fail fast on an unknown plan instead of an empty stream.
        if let Err(e) = self.status(&id).await {
            return Err(self.naming_the_leader_in(e.into()));
        }
        let rx = self.watch(id.clone());
        let stream = ReceiverStream::new(rx).map(move |r| {
            r.map(|status| for_the_caller(status, viewer))
                .map_err(Status::from)
        });
        let stream = self
            .inner
            .shutdown
            .track(format!("the watch of plan {id}"), stream);
        Ok(self.naming_the_leader(Response::new(Box::pin(stream))))
    }

    async fn cancel_plan(
        &self,
        req: Request<pb::PlanCommand>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let (plan_id, shard, actor) = self.command_of(req, "CancelPlan").await?;
        let status = match shard {
            Some(shard) => self.cancel_shard(plan_id, shard, actor).await?,
            None => self.command(&plan_id, CommandKind::Cancel, actor).await?,
        };
        Ok(Response::new(status))
    }

    async fn rollback_plan(
        &self,
        mut req: Request<pb::PlanCommand>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let down_from = std::mem::take(&mut req.get_mut().down_from);
        let ignore_later = req.get_ref().ignore_later_plans;
        if !down_from.is_empty() {
            let from = origin(&req);
            self.replace_down_allowed(from.caller.as_ref(), &from.peer, &from.plan_id)
                .await?;
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in &down_from {
            if m.id.trim().is_empty() || !seen.insert(m.id.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "--down-from: migration id `{}` is empty or given twice",
                    m.id
                )));
            }
        }
        let (plan_id, actor) = self
            .whole_plan(
                req,
                "RollbackPlan",
                "a rollback undoes the whole plan; --shard is for pause, resume and cancel",
            )
            .await?;
        let status = if down_from.is_empty() {
            self.rollback(&plan_id, actor, ignore_later).await?
        } else {
            self.rollback_with_down(&plan_id, down_from, actor, ignore_later)
                .await?
        };
        Ok(Response::new(status))
    }

    async fn pause_plan(
        &self,
        req: Request<pb::PlanCommand>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let (plan_id, shard, actor) = self.command_of(req, "PausePlan").await?;
        Ok(Response::new(
            self.pause(plan_id, shard, true, actor).await?,
        ))
    }

    async fn resume_plan(
        &self,
        req: Request<pb::PlanCommand>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let (plan_id, shard, actor) = self.command_of(req, "ResumePlan").await?;
        Ok(Response::new(
            self.pause(plan_id, shard, false, actor).await?,
        ))
    }

    async fn promote_plan(
        &self,
        req: Request<pb::PlanCommand>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let wave = Some(req.get_ref().wave.trim().to_string()).filter(|w| !w.is_empty());
        let (plan_id, actor) = self
            .whole_plan(
                req,
                "PromotePlan",
                "a wave is promoted for the whole plan; --shard is for pause, resume and cancel",
            )
            .await?;
        Ok(Response::new(self.promote(plan_id, wave, actor).await?))
    }

    async fn halt_plan(
        &self,
        req: Request<pb::PlanCommand>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let (plan_id, actor) = self
            .whole_plan(
                req,
                "HaltPlan",
                "a halt stops the whole plan; to stop one shard, use `plan cancel --shard`",
            )
            .await?;
        Ok(Response::new(self.halt(plan_id, actor).await?))
    }

    async fn forget_shard(
        &self,
        req: Request<pb::PlanCommand>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        if req.get_ref().reason.trim().is_empty() {
            return Err(Status::invalid_argument(
                "forgetting a shard needs --reason TEXT: the override is audited with it",
            ));
        }
        let (plan_id, shard, actor) = self.command_of(req, "ForgetShard").await?;
        let shard = shard.ok_or_else(|| {
            Status::invalid_argument("forgetting a shard needs --shard SHARD: the shard to forget")
        })?;
        Ok(Response::new(
            self.forget_shard(plan_id, shard, actor).await?,
        ))
    }

    async fn retry_plan(
        &self,
        req: Request<pb::RetryRequest>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let from = origin(&req);
        let r = req.into_inner();
        let actor = self.actor(&from, &r.actor, &r.reason, "RetryPlan").await?;
        Ok(Response::new(
            self.retry(&r.plan_id, &r.targets, r.ignore_later_plans, actor)
                .await?,
        ))
    }

    async fn list_locks(
        &self,
        _req: Request<pb::ListLocksRequest>,
    ) -> Result<Response<pb::ListLocksResponse>, Status> {
        Ok(Response::new(self.locks().await?))
    }

    async fn break_lock(
        &self,
        req: Request<pb::BreakLockRequest>,
    ) -> Result<Response<pb::BreakLockResponse>, Status> {
        let from = origin(&req);
        let r = req.into_inner();
        flotilla_core::validate_shard_name(&r.shard).map_err(Status::invalid_argument)?;
        if r.reason.trim().is_empty() {
            return Err(Status::invalid_argument(
                "breaking a lock needs --reason TEXT: the override is audited with it",
            ));
        }
        let actor = self.actor(&from, &r.actor, &r.reason, "BreakLock").await?;
        let broken = self.break_lock(&r.shard, &actor.name, &r.reason).await?;
        Ok(Response::new(pb::BreakLockResponse { broken }))
    }

    async fn retire_shard(
        &self,
        req: Request<pb::RetireShardRequest>,
    ) -> Result<Response<pb::RetireShardResponse>, Status> {
        let from = origin(&req);
        let r = req.into_inner();
        flotilla_core::validate_shard_name(&r.shard).map_err(Status::invalid_argument)?;
        if r.reason.trim().is_empty() {
            return Err(Status::invalid_argument(
                "retiring a shard needs --reason TEXT: it is audited with it",
            ));
        }
        let actor = self
            .actor(&from, &r.actor, &r.reason, "RetireShard")
            .await?;
        self.retire_shard(&r.shard, &actor).await?;
        Ok(Response::new(pb::RetireShardResponse {}))
    }

    async fn approve_plan(
        &self,
        req: Request<pb::ApprovalRequest>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let from = origin(&req);
        let r = req.into_inner();
        let actor = self
            .actor(&from, &r.actor, &r.reason, "ApprovePlan")
            .await?;
        let roles = self
            .approving_roles(from.caller.as_ref(), &r.role, &from.peer, &from.plan_id)
            .await?;
        Ok(Response::new(
            self.approve(&r.plan_id, actor, &roles).await?,
        ))
    }

    async fn reject_plan(
        &self,
        req: Request<pb::ApprovalRequest>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let from = origin(&req);
        let r = req.into_inner();
        let actor = self.actor(&from, &r.actor, &r.reason, "RejectPlan").await?;
        Ok(Response::new(self.reject(&r.plan_id, actor).await?))
    }

    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.audit_trail(&r.plan_id, r.since_ms, r.limit).await?,
        ))
    }

    async fn env_status(
        &self,
        req: Request<pb::EnvStatusRequest>,
    ) -> Result<Response<pb::EnvStatusResponse>, Status> {
        Ok(Response::new(
            self.env_status(req.into_inner().plans).await?,
        ))
    }

    async fn fleet_status(
        &self,
        req: Request<pb::FleetStatusRequest>,
    ) -> Result<Response<pb::FleetStatusResponse>, Status> {
        let viewer = is_viewer(&req);
        let req = req.into_inner();
        let files = req.checksums.into_iter().collect();
        let mut status = self.fleet_status(&req.selector, &files).await?;
        if viewer {
            for f in &mut status.failures {
                f.message = values_withheld(&f.message);
            }
        }
        Ok(Response::new(status))
    }

    async fn fleet_show(
        &self,
        req: Request<pb::FleetShowRequest>,
    ) -> Result<Response<pb::FleetTarget>, Status> {
        let viewer = is_viewer(&req);
        let mut target = self.fleet_show(&req.into_inner().target).await?;
        if viewer && let Some(f) = target.last_failure.as_mut() {
            f.message = values_withheld(&f.message);
        }
        Ok(Response::new(target))
    }

    async fn fleet_drift(
        &self,
        req: Request<pb::FleetDriftRequest>,
    ) -> Result<Response<pb::FleetDriftResponse>, Status> {
        Ok(Response::new(
            self.fleet_drift(&req.into_inner().selector).await?,
        ))
    }

    async fn fleet_baseline(
        &self,
        req: Request<pb::FleetBaselineRequest>,
    ) -> Result<Response<pb::FleetBaselineResponse>, Status> {
        // Who records the rows is the caller, as for every other write: with authentication
        // on, `--as` naming someone else is refused (it was taken as said).
        let from = origin(&req);
        let r = req.into_inner();
        let actor = self
            .actor(&from, &r.actor, &r.reason, "FleetBaseline")
            .await?;
        Ok(Response::new(self.baseline(r, actor).await?))
    }

    async fn list_fleet(
        &self,
        _req: Request<pb::ListFleetRequest>,
    ) -> Result<Response<pb::ListFleetResponse>, Status> {
        Ok(Response::new(self.fleet().await?))
    }

    async fn add_operator(
        &self,
        req: Request<pb::AddOperatorRequest>,
    ) -> Result<Response<pb::AddOperatorResponse>, Status> {
        let from = origin(&req);
        let by = self.actor(&from, "", "", "AddOperator").await?;
        Ok(Response::new(
            self.add_operator(&by.name, req.into_inner()).await?,
        ))
    }

    async fn list_operators(
        &self,
        _req: Request<pb::ListOperatorsRequest>,
    ) -> Result<Response<pb::ListOperatorsResponse>, Status> {
        Ok(Response::new(self.list_operators().await?))
    }

    async fn revoke_operator(
        &self,
        req: Request<pb::RevokeOperatorRequest>,
    ) -> Result<Response<pb::OperatorInfo>, Status> {
        let from = origin(&req);
        let by = self.actor(&from, "", "", "RevokeOperator").await?;
        Ok(Response::new(
            self.revoke_operator(&by.name, &req.into_inner().name)
                .await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::values_withheld;

    /// The values PostgreSQL quotes in a message are withheld from viewers; identifiers
    /// and the rest of the message stay.
    #[test]
    fn a_viewer_reads_no_quoted_value() {
        for (said, read) in [
            (
                "step m failed on s/t (SQLSTATE 22P02): invalid input syntax for type integer: \"urgent\"; every applied step is being undone",
                "step m failed on s/t (SQLSTATE 22P02): invalid input syntax for type integer: \"(withheld from viewers)\"; every applied step is being undone",
            ),
            (
                "value \"123456789012\" is out of range for type integer",
                "value \"(withheld from viewers)\" is out of range for type integer",
            ),
            (
                "malformed array literal: \"{\"alice@x.com\",\"bob\"}\"; every applied step is being undone",
                "malformed array literal: \"(withheld from viewers)\"; every applied step is being undone",
            ),
            (
                "relation \"orders\" does not exist",
                "relation \"orders\" does not exist",
            ),
            // with no closing quote, withheld to its end (it was shown whole)
            (
                "no quote: \"unterminated value",
                "no quote: \"(withheld from viewers)\"",
            ),
        ] {
            assert_eq!(values_withheld(said), read);
        }
    }
}
