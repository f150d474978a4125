//! The health service and server reflection, through the clients a load
//! balancer and grpcurl stand for.
use anyhow::{Context, bail};
use flotilla_core::pb;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
};
use tonic_reflection::pb::v1alpha;

use super::lone_coordinator;
use crate::fleet::WAIT;
use crate::ha::HaFleet;
use crate::harness::{TestDir, wait_for, wait_until};

const OPERATOR: &str = "flotilla.v1.OperatorService";
const AGENT: &str = "flotilla.v1.AgentService";

async fn channel(addr: &str) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(addr.to_string())?.connect().await?)
}

/// The health service's answer for `service` (`""` is the whole server).
async fn check(addr: &str, service: &str) -> anyhow::Result<ServingStatus> {
    let mut client = HealthClient::new(channel(addr).await?);
    let reply = client
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await?
        .into_inner();
    Ok(reply.status())
}

/// One request on the v1 reflection stream, and its one answer.
async fn reflect(addr: &str, request: MessageRequest) -> anyhow::Result<MessageResponse> {
    let mut client = ServerReflectionClient::new(channel(addr).await?);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = client
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner();
    answers
        .message()
        .await?
        .and_then(|a| a.message_response)
        .context("the reflection stream ended without an answer")
}

/// Bytes in, bytes out: what a client that knows a method only by reflection
/// (grpcurl) sends and gets, with no generated type for it.
#[derive(Default)]
struct RawBytes;

impl Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }

    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

impl Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_reflection_answer_a_client_without_the_proto_file() -> anyhow::Result<()> {
    let dir = TestDir::new("operability")?;
    let (mut coordinator, addr) = lone_coordinator(&dir, &[]).await?;

    // Health: the process, and the services the one (embedded) leader carries out.
    assert_eq!(check(&addr, "").await?, ServingStatus::Serving);
    assert_eq!(check(&addr, OPERATOR).await?, ServingStatus::Serving);
    assert_eq!(check(&addr, AGENT).await?, ServingStatus::Serving);
    let unknown = check(&addr, "flotilla.v1.NoSuchService").await.unwrap_err();
    let status = unknown
        .downcast_ref::<tonic::Status>()
        .context("a gRPC status")?;
    assert_eq!(status.code(), tonic::Code::NotFound, "{status}");
    let mut watch = HealthClient::new(channel(&addr).await?)
        .watch(HealthCheckRequest {
            service: OPERATOR.into(),
        })
        .await?
        .into_inner();
    let first: HealthCheckResponse = watch.message().await?.context("a first status")?;
    assert_eq!(first.status(), ServingStatus::Serving);

    // Reflection v1 lists every service...
    let MessageResponse::ListServicesResponse(list) =
        reflect(&addr, MessageRequest::ListServices(String::new())).await?
    else {
        bail!("not a service list");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        OPERATOR,
        AGENT,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.contains(&expected), "{expected} not in {names:?}");
    }

    // ...and hands out the file that defines the operator service, its methods and
    // their message types.
    let MessageResponse::FileDescriptorResponse(files) =
        reflect(&addr, MessageRequest::FileContainingSymbol(OPERATOR.into())).await?
    else {
        bail!("not a file descriptor");
    };
    let file = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .find(|f| f.package() == "flotilla.v1")
        .context("no flotilla.v1 file")?;
    let operator = file
        .service
        .iter()
        .find(|s| s.name() == "OperatorService")
        .context("no OperatorService in the file")?;
    let list_fleet = operator
        .method
        .iter()
        .find(|m| m.name() == "ListFleet")
        .context("no ListFleet method")?;
    assert_eq!(list_fleet.input_type(), ".flotilla.v1.ListFleetRequest");
    assert!(
        file.message_type
            .iter()
            .any(|m| m.name() == "ListFleetRequest"),
        "the request type is described too"
    );

    // A call made from the reflected path alone, as grpcurl makes it: an empty
    // request message (every field at its default) to /flotilla.v1.OperatorService/ListFleet.
    let path = format!("/{OPERATOR}/{}", list_fleet.name());
    let mut grpc = tonic::client::Grpc::new(channel(&addr).await?);
    grpc.ready().await?;
    let reply = grpc
        .unary(
            tonic::Request::new(Vec::new()),
            tonic::codegen::http::uri::PathAndQuery::try_from(path)?,
            RawBytes,
        )
        .await?
        .into_inner();
    let fleet = pb::ListFleetResponse::decode(reply.as_slice())?;
    assert!(fleet.agents.is_empty(), "no agent ever attached: {fleet:?}");

    // v1alpha answers too, for clients that only speak it.
    let mut alpha =
        v1alpha::server_reflection_client::ServerReflectionClient::new(channel(&addr).await?);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let answer = alpha
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner()
        .message()
        .await?
        .and_then(|a| a.message_response);
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer
    else {
        bail!("v1alpha: not a service list: {answer:?}");
    };
    assert!(list.service.iter().any(|s| s.name == OPERATOR), "{list:?}");

    // Shutting down, the coordinator tells its watchers and ends their streams: an
    // open Watch (a load balancer's) does not hold up its graceful stop.
    coordinator.terminate().await?;
    let mut last = None;
    while let Ok(Some(reply)) = watch.message().await {
        last = Some(reply.status());
    }
    assert_eq!(last, Some(ServingStatus::NotServing));
    Ok(())
}

/// The statuses of the operator service on each coordinator, `None` where it
/// does not answer.
async fn operator_statuses(fleet: &HaFleet) -> Vec<Option<ServingStatus>> {
    let mut out = Vec::new();
    for addr in &fleet.addrs {
        out.push(check(addr, OPERATOR).await.ok());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_leader_serves_the_operator_service_and_a_follower_takes_over()
-> anyhow::Result<()> {
    let mut fleet = HaFleet::start(2, 0, 0).await?;
    let leader = wait_for(
        "one coordinator SERVING, the other NOT_SERVING",
        WAIT,
        async || {
            let s = operator_statuses(&fleet).await;
            Ok(match s.as_slice() {
                [
                    Some(ServingStatus::Serving),
                    Some(ServingStatus::NotServing),
                ] => Some(0),
                [
                    Some(ServingStatus::NotServing),
                    Some(ServingStatus::Serving),
                ] => Some(1),
                _ => None,
            })
        },
    )
    .await?;
    let follower = 1 - leader;
    wait_until("the logs agree on the leader", WAIT, async || {
        Ok(fleet.leader() == Some(leader))
    })
    .await?;
    // The process itself is up on both; the agent service follows leadership too.
    for addr in &fleet.addrs {
        assert_eq!(check(addr, "").await?, ServingStatus::Serving);
    }
    assert_eq!(
        check(&fleet.addrs[follower], AGENT).await?,
        ServingStatus::NotServing
    );

    // A load balancer's watch on the follower sees it turn SERVING once the
    // leader is gone and its lease has expired.
    let mut watch = HealthClient::new(channel(&fleet.addrs[follower]).await?)
        .watch(HealthCheckRequest {
            service: OPERATOR.into(),
        })
        .await?
        .into_inner();
    let first = watch.message().await?.context("a first status")?;
    assert_eq!(first.status(), ServingStatus::NotServing);
    let mut old = fleet.coordinators[leader]
        .take()
        .context("the leader runs")?;
    old.kill()?;
    fleet.retired.push(old);
    let turned = tokio::time::timeout(WAIT, async {
        loop {
            match watch.message().await? {
                Some(r) if r.status() == ServingStatus::Serving => return Ok(()),
                Some(_) => continue,
                None => bail!("the watch ended"),
            }
        }
    })
    .await
    .context("the follower did not turn SERVING")?;
    turned?;
    assert_eq!(
        check(&fleet.addrs[follower], OPERATOR).await?,
        ServingStatus::Serving
    );
    wait_until("the follower's log says it leads", WAIT, async || {
        Ok(fleet.leader() == Some(follower))
    })
    .await?;
    Ok(())
}

/// A control store that does not answer shows: the leader's operator and agent services
/// turn NOT_SERVING (the process itself stays SERVING), `flotilla_control_store_up` is 0,
/// and the log names the store and why; all back once it answers. Before, health said
/// SERVING throughout, no metric moved on an idle leader, and the log said nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_control_store_out_of_reach_shows_in_health_metrics_and_the_log() -> anyhow::Result<()> {
    let metrics: std::net::SocketAddr =
        format!("127.0.0.1:{}", crate::harness::free_port()).parse()?;
    let fleet = crate::fleet::TestFleet::builder(1, 1)
        .postgres_store("store_probe")
        .metrics(metrics)
        .start()
        .await?;
    let addr = fleet.addr.clone();
    assert_eq!(check(&addr, OPERATOR).await?, ServingStatus::Serving);
    let up = async |value: &str| -> anyhow::Result<bool> {
        let body = crate::harness::http::get(metrics, "/metrics").await?.body;
        Ok(body
            .lines()
            .any(|l| l == format!("flotilla_control_store_up {value}")))
    };
    assert!(up("1").await?);
    // A plan under way, held on a tenant: the leader's to tell while the store is away.
    use crate::fleet::Cli;
    let d = crate::fleet::MigrationDir::new()?;
    crate::shards::logged_blocking_migration(&d, "tenant_0000", 95)?;
    let lock = crate::shards::hold(&fleet.pg, 0, 95).await?;
    let id = fleet.submit(d.path(), &[]).await?;
    wait_until("the plan's step blocked", WAIT, async || {
        Ok(crate::shards::blocked(&fleet.pg, 0).await? == 1)
    })
    .await?;
    crate::shards::cut_off(&fleet.pg, "store_probe", true).await?;
    wait_until(
        "health and the metric say the store is out of reach",
        WAIT,
        async || Ok(check(&addr, OPERATOR).await? == ServingStatus::NotServing && up("0").await?),
    )
    .await?;
    assert_eq!(
        check(&addr, "").await?,
        ServingStatus::Serving,
        "the process is up"
    );
    assert_eq!(check(&addr, AGENT).await?, ServingStatus::NotServing);
    // Its status is the leader's, answered at once (it waited out the store's 30s pool
    // timeout to ask whether operators exist, then failed); `fleet list` lists the agents
    // attached, saying what it lacks.
    let started = std::time::Instant::now();
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "running", "{st}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "answered in {:?}",
        started.elapsed()
    );
    let list = fleet.cli(&["fleet", "list", "--output", "json"]).await?;
    assert!(list.success(), "{list}");
    assert!(
        list.stderr.contains("the control store does not answer")
            && list.stdout.contains("shard_0"),
        "{list}"
    );
    let log = fleet.coordinator.as_ref().context("the coordinator")?.log();
    assert!(
        log.contains("the control store does not answer")
            && log.contains("store_probe")
            && log.contains("not currently accepting connections"),
        "{log}"
    );
    crate::shards::cut_off(&fleet.pg, "store_probe", false).await?;
    wait_until(
        "health and the metric say the store answers",
        WAIT,
        async || Ok(check(&addr, OPERATOR).await? == ServingStatus::Serving && up("1").await?),
    )
    .await?;
    crate::shards::release(lock, 95).await?;
    let (out, _) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    Ok(())
}
