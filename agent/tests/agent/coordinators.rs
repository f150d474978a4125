//! Several coordinators: followers refuse the agent and name the leader; the agent dials the
//! list in turn and follows the named leader, even one that is not in its list.
//! Runs when `FLOTILLA_TEST_PG_URL` is set; otherwise it prints a note and passes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::common::*;
use flotilla_core::pb;
use flotilla_core::pb::agent_service_server::{AgentService, AgentServiceServer};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// A follower: refuses every Attach, naming `leader` when it is set.
struct Follower {
    leader: Arc<OnceLock<String>>,
    refusals: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl AgentService for Follower {
    type AttachStream = UnboundedReceiverStream<Result<pb::CoordinatorMessage, Status>>;
    async fn attach(
        &self,
        _request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        self.refusals.fetch_add(1, Ordering::SeqCst);
        // as a follower coordinator refuses: the protocol's refusal metadata, and the
        // leader's address when it knows it
        let mut status = Status::unavailable("not the leader");
        status.metadata_mut().insert(
            flotilla_core::protocol::REFUSAL_METADATA,
            flotilla_core::protocol::REFUSAL_NOT_LEADER.parse().unwrap(),
        );
        if let Some(leader) = self.leader.get() {
            status.metadata_mut().insert(
                flotilla_core::protocol::LEADER_METADATA,
                leader.parse().unwrap(),
            );
        }
        Err(status)
    }
}

/// Serves a follower on a free port; its address and how many times it refused.
async fn follower(leader: Arc<OnceLock<String>>) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let refusals = Arc::new(AtomicUsize::new(0));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(Follower {
                leader,
                refusals: refusals.clone(),
            }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), refusals)
}

#[tokio::test]
async fn follows_the_leader_a_follower_names() {
    let Some(f) = fleet("coordinators", 1).await else {
        return;
    };
    // one follower that does not know the leader, one that names it (as host:port, and not
    // in the agent's list); a dead address first
    let (blind, blind_refusals) = follower(Arc::new(OnceLock::new())).await;
    let named = Arc::new(OnceLock::new());
    let (knowing, knowing_refusals) = follower(named.clone()).await;
    let started = tokio::time::Instant::now();
    let mut h = Harness::start(
        |c| {
            let leader = c.coordinator.trim_start_matches("http://").to_string();
            named.set(leader).unwrap();
            c.coordinator = format!("http://127.0.0.1:1, {blind},{knowing}");
            // a backoff would show: the round must not pause before the named leader
            c.reconnect_min = std::time::Duration::from_secs(3);
            c.reconnect_max = std::time::Duration::from_secs(3);
        },
        &f.dsn,
    )
    .await;
    let (_s, hello) = h.attach(1).await;
    assert_eq!(hello.shard, "shard-test");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(blind_refusals.load(Ordering::SeqCst), 1);
    assert_eq!(knowing_refusals.load(Ordering::SeqCst), 1);
    h.stop().await;
    f.drop().await;
}
