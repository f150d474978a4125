//! The operator API: convert the request, call the domain, map the error.
use flotilla_core::pb;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::BoxStream;
use crate::actor::Actor;
use crate::engine::CommandKind;
use crate::service::Coordinator;

/// A command for a whole plan: its plan and who asked why; `no_shard` says why a shard
/// given with it is refused.
fn whole_plan(c: pb::PlanCommand, no_shard: &str) -> Result<(String, Actor), Status> {
    match command(c) {
        (_, Some(_), _) => Err(Status::invalid_argument(no_shard.to_string())),
        (plan_id, None, actor) => Ok((plan_id, actor)),
    }
}

/// A plan command's plan, shard (if one was named) and who asked why.
fn command(c: pb::PlanCommand) -> (String, Option<String>, Actor) {
    let shard = Some(c.shard.trim().to_string()).filter(|s| !s.is_empty());
    (c.plan_id, shard, Actor::new(&c.actor, &c.reason))
}

#[tonic::async_trait]
impl pb::operator_service_server::OperatorService for Coordinator {
    async fn submit_plan(
        &self,
        req: Request<pb::SubmitPlanRequest>,
    ) -> Result<Response<pb::SubmitPlanResponse>, Status> {
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("submit without a plan spec"))?;
        Ok(Response::new(self.submit(spec).await?))
    }

    async fn get_plan(
        &self,
        req: Request<pb::GetPlanRequest>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        Ok(Response::new(self.status(&req.into_inner().plan_id).await?))
    }

    async fn list_plans(
        &self,
        req: Request<pb::ListPlansRequest>,
    ) -> Result<Response<pb::ListPlansResponse>, Status> {
        Ok(Response::new(self.list(req.into_inner().limit).await?))
    }

    type WatchPlanStream = BoxStream<pb::PlanStatus>;

    async fn watch_plan(
        &self,
        req: Request<pb::GetPlanRequest>,
    ) -> Result<Response<Self::WatchPlanStream>, Status> {
        let id = req.into_inner().plan_id;
        // Fail fast on an unknown plan instead of an empty stream.
        self.status(&id).await?;
        let rx = self.watch(id.clone());
        let stream = ReceiverStream::new(rx).map(|r| r.map_err(Status::from));
        let stream = self
            .inner
            .shutdown
            .track(format!("the watch of plan {id}"), stream);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_plan(
        &self,
        req: Request<pb::PlanCommand>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let (plan_id, shard, actor) = command(req.into_inner());
        let status = match shard {
            Some(shard) => self.cancel_shard(plan_id, shard, actor).await?,
            None => self.command(&plan_id, CommandKind::Cancel, actor).await?,
        };
        Ok(Response::new(status))
    }

    async fn rollback_plan(
        &self,
        req: Request<pb::PlanCommand>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let (plan_id, actor) = whole_plan(
            req.into_inner(),
            "a rollback undoes the whole plan; --shard is for pause, resume and cancel",
        )?;
        Ok(Response::new(
            self.command(&plan_id, CommandKind::Rollback, actor).await?,
        ))
    }

    async fn pause_plan(
        &self,
        req: Request<pb::PlanCommand>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let (plan_id, shard, actor) = command(req.into_inner());
        Ok(Response::new(
            self.pause(plan_id, shard, true, actor).await?,
        ))
    }

    async fn resume_plan(
        &self,
        req: Request<pb::PlanCommand>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let (plan_id, shard, actor) = command(req.into_inner());
        Ok(Response::new(
            self.pause(plan_id, shard, false, actor).await?,
        ))
    }

    async fn promote_plan(
        &self,
        req: Request<pb::PlanCommand>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let (plan_id, actor) = whole_plan(
            req.into_inner(),
            "a wave is promoted for the whole plan; --shard is for pause, resume and cancel",
        )?;
        Ok(Response::new(self.promote(plan_id, actor).await?))
    }

    async fn halt_plan(
        &self,
        req: Request<pb::PlanCommand>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let (plan_id, actor) = whole_plan(
            req.into_inner(),
            "a halt stops the whole plan; to stop one shard, use `plan cancel --shard`",
        )?;
        Ok(Response::new(self.halt(plan_id, actor).await?))
    }

    async fn retry_plan(
        &self,
        req: Request<pb::RetryRequest>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let r = req.into_inner();
        let actor = Actor::new(&r.actor, &r.reason);
        Ok(Response::new(
            self.retry(&r.plan_id, &r.targets, actor).await?,
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
        let r = req.into_inner();
        let broken = self.break_lock(&r.shard, &r.actor, &r.reason).await?;
        Ok(Response::new(pb::BreakLockResponse { broken }))
    }

    async fn approve_plan(
        &self,
        req: Request<pb::ApprovalRequest>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let r = req.into_inner();
        let actor = Actor::new(&r.actor, &r.reason);
        Ok(Response::new(
            self.approve(&r.plan_id, actor, &r.role).await?,
        ))
    }

    async fn reject_plan(
        &self,
        req: Request<pb::ApprovalRequest>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let r = req.into_inner();
        let actor = Actor::new(&r.actor, &r.reason);
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

    async fn fleet_status(
        &self,
        req: Request<pb::FleetStatusRequest>,
    ) -> Result<Response<pb::FleetStatusResponse>, Status> {
        let req = req.into_inner();
        let files = req.checksums.into_iter().collect();
        Ok(Response::new(
            self.fleet_status(&req.selector, &files).await?,
        ))
    }

    async fn fleet_show(
        &self,
        req: Request<pb::FleetShowRequest>,
    ) -> Result<Response<pb::FleetTarget>, Status> {
        Ok(Response::new(
            self.fleet_show(&req.into_inner().target).await?,
        ))
    }

    async fn fleet_drift(
        &self,
        req: Request<pb::FleetDriftRequest>,
    ) -> Result<Response<pb::FleetDriftResponse>, Status> {
        Ok(Response::new(
            self.fleet_drift(&req.into_inner().selector).await?,
        ))
    }

    async fn list_fleet(
        &self,
        _req: Request<pb::ListFleetRequest>,
    ) -> Result<Response<pb::ListFleetResponse>, Status> {
        Ok(Response::new(self.fleet().await?))
    }
}
