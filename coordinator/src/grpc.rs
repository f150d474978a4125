//! The gRPC layer: convert, call the domain, map the error. Nothing else.
use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use flotilla_proto::pb;
use flotilla_proto::pb::agent_message::Body;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::engine::{CommandKind, Event, msg};
use crate::fleet::AttachedAgent;
use crate::service::Coordinator;
use crate::store::{StoreOp, now_ms};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

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
        let rx = self.watch(id);
        let stream = ReceiverStream::new(rx).map(|r| r.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_plan(
        &self,
        req: Request<pb::PlanCommand>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let c = req.into_inner();
        if !c.shard.trim().is_empty() {
            return Ok(Response::new(self.cancel_shard(c).await?));
        }
        Ok(Response::new(
            self.command(&c.plan_id, CommandKind::Cancel, &c.actor, &c.reason)
                .await?,
        ))
    }

    async fn rollback_plan(
        &self,
        req: Request<pb::PlanCommand>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let c = req.into_inner();
        if !c.shard.trim().is_empty() {
            return Err(Status::invalid_argument(
                "a rollback undoes the whole plan; --shard is for pause, resume and cancel",
            ));
        }
        Ok(Response::new(
            self.command(&c.plan_id, CommandKind::Rollback, &c.actor, &c.reason)
                .await?,
        ))
    }

    async fn pause_plan(
        &self,
        req: Request<pb::PlanCommand>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let c = req.into_inner();
        Ok(Response::new(self.pause(c, true).await?))
    }

    async fn resume_plan(
        &self,
        req: Request<pb::PlanCommand>,
    ) -> Result<Response<pb::PlanStatus>, Status> {
        let c = req.into_inner();
        Ok(Response::new(self.pause(c, false).await?))
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

    async fn list_fleet(
        &self,
        _req: Request<pb::ListFleetRequest>,
    ) -> Result<Response<pb::ListFleetResponse>, Status> {
        Ok(Response::new(self.fleet().await?))
    }
}

fn validate_hello(h: &pb::Hello) -> Result<(), Status> {
    flotilla_proto::validate_shard_name(&h.shard).map_err(Status::invalid_argument)?;
    for t in &h.tenants {
        flotilla_proto::validate_tenant_name(&t.name)
            .map_err(|e| Status::invalid_argument(format!("shard {}: {e}", h.shard)))?;
    }
    Ok(())
}

fn tenants_json(tenants: &[pb::Tenant]) -> String {
    let v: Vec<(String, BTreeMap<String, String>)> = tenants
        .iter()
        .map(|t| (t.name.clone(), t.labels.clone().into_iter().collect()))
        .collect();
    serde_json::to_string(&v).unwrap_or_else(|_| "[]".into())
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for Coordinator {
    type AttachStream = BoxStream<pb::CoordinatorMessage>;

    async fn attach(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = req.into_inner();
        let hello = match inbound.next().await {
            Some(Ok(pb::AgentMessage {
                body: Some(Body::Hello(h)),
            })) => h,
            Some(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "the first message on the agent stream must be Hello",
                ));
            }
            Some(Err(e)) => return Err(e),
            None => return Err(Status::invalid_argument("agent stream closed before Hello")),
        };
        validate_hello(&hello)?;
        // Only the leader assigns work: a follower sends the agent on, naming the leader.
        let epoch = self.leader_epoch()?;
        let shard = hello.shard.clone();
        let inner = &self.inner;
        let conn_id = inner.fleet.next_conn_id();
        // Sized for bursts of assignments; a stuck agent fills it and is resent to later.
        let (tx, rx) = mpsc::channel::<pb::CoordinatorMessage>(4096);
        let labels: BTreeMap<String, String> = hello.labels.clone().into_iter().collect();
        inner.fleet.attach(
            &shard,
            AttachedAgent {
                conn_id,
                tx: tx.clone(),
                labels: labels.clone(),
                tenants: hello.tenants.clone(),
                version: hello.version.clone(),
                last_seen_ms: now_ms(),
            },
        );
        let _ = inner.writes.send(StoreOp::Agent {
            shard: shard.clone(),
            labels: serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into()),
            tenants: tenants_json(&hello.tenants),
            version: hello.version.clone(),
        });
        let heartbeat = Duration::from_secs(1);
        let _ = tx
            .send(msg(pb::coordinator_message::Body::Welcome(pb::Welcome {
                epoch,
                heartbeat_interval_ms: heartbeat.as_millis() as u64,
            })))
            .await;
        info!(shard = %shard, tenants = hello.tenants.len(), "agent attached");
        if let Some(e) = &inner.embedded {
            e.set_live(&shard, true);
        }
        // The coordinator's side of the heartbeat. It holds the stream weakly:
        // when the fleet and the engine let the agent go, the stream ends.
        let beat = tx.downgrade();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(heartbeat);
            loop {
                every.tick().await;
                let m = msg(pb::coordinator_message::Body::Heartbeat(pb::Heartbeat {
                    data: Vec::new(),
                    sent_at_ms: now_ms() as u64,
                }));
                let Some(beat) = beat.upgrade() else { return };
                if beat.send(m).await.is_err() {
                    return;
                }
            }
        });
        let _ = inner
            .events
            .send(Event::Attached {
                shard: shard.clone(),
                conn_id,
                tx,
                max_lanes: hello.max_lanes,
                in_doubt: hello.in_doubt.clone(),
            })
            .await;

        let me = self.clone();
        tokio::spawn(async move {
            let inner = &me.inner;
            loop {
                // Three missed heartbeats and the agent counts as gone.
                let next = tokio::time::timeout(heartbeat * 3, inbound.next()).await;
                let m = match next {
                    Ok(Some(Ok(m))) => m,
                    Ok(Some(Err(e))) => {
                        warn!(shard = %shard, "agent stream error: {}", e.message());
                        break;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        warn!(shard = %shard, "agent missed its heartbeats");
                        break;
                    }
                };
                inner.fleet.touch(&shard, conn_id, now_ms());
                match m.body {
                    Some(Body::Heartbeat(hb)) => {
                        if !hb.data.is_empty() {
                            let _ = inner
                                .events
                                .send(Event::Progress {
                                    shard: shard.clone(),
                                    data: hb.data,
                                })
                                .await;
                        }
                    }
                    Some(Body::Hello(_)) | None => {}
                    Some(Body::Results(results)) => {
                        let _ = inner
                            .events
                            .send(Event::Results {
                                shard: shard.clone(),
                                results,
                            })
                            .await;
                    }
                    Some(Body::Preflight(reply)) => inner.fleet.complete_preflight(reply),
                    Some(Body::Resolve(reply)) => {
                        let _ = inner
                            .events
                            .send(Event::ResolveReply {
                                shard: shard.clone(),
                                reply,
                            })
                            .await;
                    }
                    Some(Body::Rollback(reply)) => {
                        let _ = inner
                            .events
                            .send(Event::RollbackReply {
                                shard: shard.clone(),
                                reply,
                            })
                            .await;
                    }
                }
            }
            if inner.fleet.detach(&shard, conn_id) {
                info!(shard = %shard, "agent detached");
                if let Some(e) = &inner.embedded {
                    e.set_live(&shard, false);
                }
            }
            let _ = inner
                .events
                .send(Event::Detached {
                    shard: shard.clone(),
                    conn_id,
                })
                .await;
        });
        let out = ReceiverStream::new(rx).map(Ok);
        Ok(Response::new(Box::pin(out)))
    }
}
