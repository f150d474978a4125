//! Issue 11, "gRPC and logs": the standard health and reflection services as a
//! load balancer or grpcurl sees them, JSON log lines with their fields, and the
//! shell completions and manual page.
use anyhow::{Context, bail};
use flotilla_core::pb;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use serde_json::Value;
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

use crate::fleet::{WAIT, coord_dbmate_dir, tenant_name, tenant_sql};
use crate::ha::HaFleet;
use crate::harness::{
    FlotillaProcess, PgCluster, TestDir, free_port, run_flotilla, wait_for, wait_until,
};

const OPERATOR: &str = "flotilla.v1.OperatorService";
const AGENT: &str = "flotilla.v1.AgentService";

/// A coordinator on its own (embedded backend, SQLite store): it leads at once.
async fn lone_coordinator(
    dir: &TestDir,
    extra: &[&str],
) -> anyhow::Result<(FlotillaProcess, String)> {
    let listen = format!("127.0.0.1:{}", free_port());
    let store = dir.join("flotilla.db").to_string_lossy().into_owned();
    let mut args = vec!["coordinator", "--listen", &listen, "--store", &store];
    args.extend_from_slice(extra);
    let c = FlotillaProcess::spawn(&args, &[])?;
    c.wait_for_log("coordinator listening", WAIT).await?;
    Ok((c, format!("http://{listen}")))
}

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

/// Every line of a process's log (stdout and stderr) as a JSON object.
fn json_lines(who: &str, log: &str) -> anyhow::Result<Vec<serde_json::Map<String, Value>>> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match serde_json::from_str(l) {
            Ok(Value::Object(o)) => Ok(o),
            _ => bail!("{who}: not a JSON object: {l}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn json_log_lines_carry_plan_step_shard_and_epoch_as_fields() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    let dir = TestDir::new("operability-logs")?;
    pg.create_database("shard_0").await?;
    let sql: String = (0..2)
        .map(|t| tenant_sql(&tenant_name(0, t, 2), 5))
        .collect();
    pg.psql("shard_0", &sql).await?;

    // The flag for one, the environment for the other.
    let (mut coordinator, addr) = lone_coordinator(
        &dir,
        &[
            "--log-format",
            "json",
            "--log",
            "info,flotilla_coordinator=debug",
        ],
    )
    .await?;
    let dsn = pg.url("shard_0");
    let mut agent = FlotillaProcess::spawn(
        &[
            "--coordinator",
            &addr,
            "--log",
            "info,flotilla_agent=debug",
            "agent",
            "--shard",
            "shard_0",
            "--dsn",
            &dsn,
            "--tenant-pattern",
            "tenant_%",
        ],
        &[("FLOTILLA_LOG_FORMAT", "json")],
    )?;
    wait_until("the agent attached", WAIT, async || {
        let out = run_flotilla(
            &["--coordinator", &addr, "fleet", "list", "--output", "json"],
            &[],
        )
        .await?;
        Ok(out.stdout.contains("\"connected\":true"))
    })
    .await?;
    let plan_dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = run_flotilla(
        &[
            "--coordinator",
            &addr,
            "plan",
            "submit",
            &plan_dir,
            "--wait",
            "--output",
            "json",
        ],
        &[],
    )
    .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let status = out.last_json()?;
    assert_eq!(status["state"], "completed", "{status}");
    let plan = status["plan_id"].as_str().context("plan_id")?.to_string();
    let steps = status["steps"].as_u64().context("steps")?;
    // Stopped first, so their logs are complete.
    agent.terminate().await?;
    coordinator.terminate().await?;

    let coordinator_lines = json_lines("coordinator", &coordinator.log())?;
    let agent_lines = json_lines("agent", &agent.log())?;
    for line in coordinator_lines.iter().chain(&agent_lines) {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(line.contains_key(key), "no {key} in {line:?}");
        }
    }

    // The coordinator's epoch (embedded backend: from its store), and the plan's
    // lines: the engine's carry the epoch of the term that ran them.
    let epoch = coordinator_lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("coordination backend"))
        })
        .and_then(|l| l.get("epoch").cloned())
        .context("no epoch in the coordinator's start line")?;
    let ended = coordinator_lines
        .iter()
        .find(|l| {
            l.get("plan") == Some(&Value::from(plan.as_str()))
                && l.get("state") == Some(&Value::from("completed"))
        })
        .context("no line for the plan's end")?;
    assert_eq!(ended.get("epoch"), Some(&epoch), "{ended:?}");

    // The leader's line about each step's result: the step, where, and its epoch.
    let results: Vec<_> = coordinator_lines
        .iter()
        .filter(|l| l["message"] == "step result")
        .collect();
    assert_eq!(
        results.len() as u64,
        steps,
        "one `step result` line per step"
    );
    for line in results {
        assert_eq!(
            line.get("plan"),
            Some(&Value::from(plan.as_str())),
            "{line:?}"
        );
        assert_eq!(line.get("shard"), Some(&Value::from("shard_0")), "{line:?}");
        assert_eq!(line.get("state"), Some(&Value::from("applied")), "{line:?}");
        assert!(
            line.get("step")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty()),
            "{line:?}"
        );
        assert_eq!(line.get("epoch"), Some(&epoch), "{line:?}");
    }

    // Every step the agent applied has a line with the step, its plan, shard,
    // tenant and the epoch it ran under, as fields.
    let done: Vec<_> = agent_lines
        .iter()
        .filter(|l| l["message"] == "step done")
        .collect();
    assert_eq!(done.len() as u64, steps, "one `step done` line per step");
    for line in done {
        assert_eq!(
            line.get("plan"),
            Some(&Value::from(plan.as_str())),
            "{line:?}"
        );
        assert_eq!(line.get("shard"), Some(&Value::from("shard_0")), "{line:?}");
        assert!(
            line.get("step")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty()),
            "{line:?}"
        );
        assert!(
            line.get("tenant")
                .and_then(Value::as_str)
                .is_some_and(|t| t.starts_with("tenant_")),
            "{line:?}"
        );
        assert_eq!(line.get("epoch"), Some(&epoch), "{line:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn completions_and_the_manual_page_are_generated_from_the_flags() -> anyhow::Result<()> {
    let dir = TestDir::new("operability-manual")?;
    let bash = run_flotilla(&["completions", "bash"], &[])
        .await?
        .expect_success()?;
    for word in [
        "coordinator",
        "agent",
        "submit",
        "quickstart",
        "--log-format",
    ] {
        assert!(bash.stdout.contains(word), "bash completions lack {word}");
    }
    let script = dir.join("flotilla.bash");
    std::fs::write(&script, &bash.stdout)?;
    let syntax = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()?;
    assert!(
        syntax.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    for shell in ["zsh", "fish"] {
        let out = run_flotilla(&["completions", shell], &[])
            .await?
            .expect_success()?;
        assert!(out.stdout.contains("submit"), "{shell}: {}", out.stdout);
    }
    let bad = run_flotilla(&["completions", "tcsh"], &[]).await?;
    assert_eq!(bad.code(), Some(2), "{bad}");

    let man = run_flotilla(&["man"], &[]).await?.expect_success()?;
    for section in [
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH OPTIONS",
        ".SH SUBCOMMANDS",
        ".SH \"EXIT STATUS\"",
        ".SH ENVIRONMENT",
    ] {
        assert!(man.stdout.contains(section), "no {section} in the page");
    }
    let page = dir.join("flotilla.1");
    std::fs::write(&page, &man.stdout)?;
    // Rendered as `man` would (without bold or underline), where groff is installed,
    // with every warning on.
    if let Some(groff) = crate::harness::find_in_path("groff") {
        let rendered = std::process::Command::new(groff)
            .args(["-man", "-Tutf8", "-ww", "-P-cbou"])
            .arg(&page)
            .output()?;
        let stderr = String::from_utf8_lossy(&rendered.stderr);
        assert!(
            rendered.status.success() && stderr.trim().is_empty(),
            "groff: {stderr}"
        );
        let text = String::from_utf8_lossy(&rendered.stdout);
        assert!(
            text.contains("EXIT STATUS") && text.contains("FLOTILLA_LOG_FORMAT"),
            "{text}"
        );
    }
    // One page per command for a man directory.
    let pages = dir.join("man1");
    let pages_arg = pages.to_string_lossy().into_owned();
    run_flotilla(&["man", "--out-dir", &pages_arg], &[])
        .await?
        .expect_success()?;
    let submit = std::fs::read_to_string(pages.join("flotilla-plan-submit.1"))?;
    assert!(submit.contains("\\-\\-atomic"), "{submit}");
    Ok(())
}
