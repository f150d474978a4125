//! The agent API: one bidirectional stream per agent. The first message must be a valid
//! Hello; the session itself (registration, heartbeats, inbound messages) is the domain's.
use flotilla_core::pb;
use flotilla_core::pb::agent_message::Body;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::BoxStream;
use crate::service::Coordinator;

fn validate_hello(h: &pb::Hello) -> Result<(), Status> {
    flotilla_core::validate_shard_name(&h.shard).map_err(Status::invalid_argument)?;
    for t in &h.tenants {
        flotilla_core::validate_tenant_name(&t.name)
            .map_err(|e| Status::invalid_argument(format!("shard {}: {e}", h.shard)))?;
    }
    Ok(())
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for Coordinator {
    type AttachStream = BoxStream<pb::CoordinatorMessage>;

    async fn attach(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        // Read before the request is taken apart: who is on the other end.
        let cert = super::peer::peer_subject(&req);
        let from = super::peer::peer_address(&req);
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
        self.admit_agent(&hello.shard, cert.as_ref(), from)?;
        let inbound = inbound.map(|m| m.map_err(|status| status.message().to_string()));
        let outbound = self.open_session(hello, inbound).await?;
        Ok(Response::new(Box::pin(outbound.map(Ok))))
    }
}
