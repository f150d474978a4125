//! Operator commands: talk to the coordinator's OperatorService.
use std::time::Instant;

use flotilla_core::pb;
use flotilla_core::pb::operator_service_client::OperatorServiceClient;
use tonic::codegen::InterceptedService;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Channel;

use super::render;
use super::{
    CommandArgs, EXIT_BAD_INPUT, EXIT_LINT_ERRORS, EXIT_OK, EXIT_PLAN_FAILED, EXIT_UNAVAILABLE,
    Output, PlanCommand, RuleSet, SubmitArgs,
};
use crate::loader::{self, Overrides};
use flotilla_core::lint::{LintOptions, Severity, lint_plan};

/// What went wrong talking to the coordinator, as an exit code and a message.
fn status_exit(e: &tonic::Status) -> u8 {
    use tonic::Code::*;
    match e.code() {
        InvalidArgument | FailedPrecondition | NotFound | AlreadyExists | OutOfRange
        | PermissionDenied | Unauthenticated => EXIT_BAD_INPUT,
        _ => EXIT_UNAVAILABLE,
    }
}

pub(super) fn fail(e: tonic::Status) -> u8 {
    // A connection cut under the call (e.g. a TLS alert) says why only at the end of
    // its source chain: "transport error" alone does not help.
    let mut cause = None;
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        cause = Some(s.to_string());
        source = s.source();
    }
    match cause.filter(|c| c != e.message()) {
        Some(cause) => eprintln!("error: {}: {cause}", e.message()),
        None => eprintln!("error: {}", e.message()),
    }
    // a status with a source was made here, from the connection, not sent by a coordinator
    let local = std::error::Error::source(&e).is_some()
        || matches!(e.code(), tonic::Code::Unknown | tonic::Code::Cancelled);
    if local && !super::transport::files().is_empty() {
        eprintln!(
            "hint: over TLS, the coordinator may have refused this client's certificate: check --tls-cert, --tls-key and that --tls-ca is the coordinator's CA"
        );
    }
    status_exit(&e)
}

/// The operator's bearer token, read once from `--token-file` (or FLOTILLA_TOKEN_FILE);
/// unset: requests carry no credential (a coordinator with authentication off).
static CREDENTIAL: std::sync::OnceLock<AsciiMetadataValue> = std::sync::OnceLock::new();

/// Reads the token file (its content is never printed, and never taken from argv).
pub(super) fn set_credential(path: Option<&std::path::Path>) -> Result<(), String> {
    let Some(path) = path else {
        return Ok(());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--token-file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "--token-file {}: the file is empty",
            path.display()
        ));
    }
    let mut value: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| {
            format!(
                "--token-file {}: not a token (not plain text)",
                path.display()
            )
        })?;
    // Never indexed by HTTP/2 header compression, where a later request could probe it.
    value.set_sensitive(true);
    let _ = CREDENTIAL.set(value);
    Ok(())
}

/// Puts the credential (if any) on every request.
#[derive(Clone)]
pub(super) struct Bearer;

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = CREDENTIAL.get() {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub(super) type Client = OperatorServiceClient<InterceptedService<Channel, Bearer>>;

/// Who acts, as the request says it: with a credential, the coordinator takes the name
/// from it, so the default `--as` ($USER) is not sent (it would mismatch and be refused);
/// an `--as` given explicitly that differs from the default still is, and is refused
/// unless it names the credential's operator.
pub(super) fn acting(said: String) -> String {
    let default = std::env::var("USER").unwrap_or_else(|_| "operator".into());
    if CREDENTIAL.get().is_some() && said == default {
        String::new()
    } else {
        said
    }
}

/// Connects to the first reachable coordinator of a comma-separated list.
pub(super) async fn client(addrs: &str) -> Result<Client, u8> {
    let mut last = String::new();
    for addr in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let endpoint = match super::transport::endpoint(addr) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("error: {e}");
                return Err(EXIT_BAD_INPUT);
            }
        };
        match endpoint.connect().await {
            Ok(ch) => {
                return Ok(OperatorServiceClient::with_interceptor(ch, Bearer)
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20));
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    eprintln!("error: cannot reach a coordinator ({last})");
    Err(EXIT_UNAVAILABLE)
}

/// Where a follower says the leader is, when it refused a write.
fn leader_of(e: &tonic::Status) -> Option<String> {
    if e.code() != tonic::Code::Unavailable {
        return None;
    }
    let v = e.metadata().get(flotilla_core::protocol::LEADER_METADATA)?;
    v.to_str().ok().map(str::to_string)
}

/// Runs a write on the leader: a follower's refusal names it, and the call
/// goes there (a few hops at most, leadership may be moving).
pub(super) async fn on_leader<T, F, Fut>(c: &mut Client, mut call: F) -> Result<T, u8>
where
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut hops = 0;
    loop {
        match call(c.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(e) => match leader_of(&e) {
                Some(leader) if hops < 3 => {
                    hops += 1;
                    *c = client(&leader).await?;
                }
                _ => return Err(fail(e)),
            },
        }
    }
}

/// Whether a plan in this state waits for a person: at a wave's manual gate, or for its
/// approvals. A script's `--wait` comes back then (exit 4) rather than hang.
fn waits_for_a_person(state: &str) -> bool {
    state == flotilla_core::state::WAITING
        || state == flotilla_core::state::PlanState::AwaitingApproval.as_str()
}

/// What a plan followed to its end should reach for the command to have done what it
/// was asked: run the plan (`completed`), or undo it (`plan rollback --wait`:
/// `rolled_back`; `plan cancel --wait`: `cancelled`, or `rolled_back` when the cancel had
/// to undo applied steps; `plan halt --wait`: `halted`).
const RUN: &[&str] = &["completed"];

/// The exit code a plan's final state means, when `wanted` are the states the command
/// asked for.
fn state_exit(status: &pb::PlanStatus, wanted: &[&str]) -> u8 {
    match status.summary.as_ref().map(|s| s.state.as_str()) {
        Some(s) if wanted.contains(&s) => EXIT_OK,
        Some(s) if waits_for_a_person(s) => super::EXIT_WAITING,
        _ => EXIT_PLAN_FAILED,
    }
}

pub async fn run(addr: &str, cmd: PlanCommand) -> u8 {
    match cmd {
        PlanCommand::Test(args) => super::plan_test::run(args).await,
        PlanCommand::Lint {
            path,
            output,
            rules,
        } => lint(&path, output, &rules),
        PlanCommand::Submit(args) if args.dry_run => super::explain::run(addr, &args).await,
        PlanCommand::Submit(args) => submit(addr, args).await,
        PlanCommand::Explain(args) => super::explain::run(addr, &args).await,
        PlanCommand::Status { id, output } => {
            let mut c = match client(addr).await {
                Ok(c) => c,
                Err(code) => return code,
            };
            match c.get_plan(pb::GetPlanRequest { plan_id: id }).await {
                Ok(r) => {
                    let s = r.into_inner();
                    render::status(&s, output);
                    EXIT_OK
                }
                Err(e) => fail(e),
            }
        }
        PlanCommand::Watch { id, output } => match client(addr).await {
            Ok(mut c) => watch(&mut c, id, output, RUN).await,
            Err(code) => code,
        },
        PlanCommand::List { limit, output } => {
            let mut c = match client(addr).await {
                Ok(c) => c,
                Err(code) => return code,
            };
            match c.list_plans(pb::ListPlansRequest { limit }).await {
                Ok(r) => {
                    render::plan_list(&r.into_inner(), output);
                    EXIT_OK
                }
                Err(e) => fail(e),
            }
        }
        PlanCommand::Cancel(args) => command(addr, args, false).await,
        PlanCommand::Rollback(args) => command(addr, args, true).await,
        PlanCommand::Pause(args) => pause(addr, args, true).await,
        PlanCommand::Resume(args) => pause(addr, args, false).await,
        PlanCommand::Promote(args) => decide(addr, args, Verb::Promote).await,
        PlanCommand::Halt(args) => decide(addr, args, Verb::Halt).await,
        PlanCommand::Retry(args) => retry(addr, args).await,
        PlanCommand::Approve(args) => approval(addr, args, true).await,
        PlanCommand::Reject(args) => approval(addr, args, false).await,
    }
}

/// `plan approve` (`approve`) or `plan reject`.
async fn approval(addr: &str, args: super::ApprovalArgs, approve: bool) -> u8 {
    let mut c = match client(addr).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let req = pb::ApprovalRequest {
        plan_id: args.id.clone(),
        actor: acting(args.actor),
        role: args.role,
        reason: args.reason,
    };
    let r = on_leader(&mut c, |mut c| {
        let req = req.clone();
        async move {
            if approve {
                c.approve_plan(req).await
            } else {
                c.reject_plan(req).await
            }
        }
    })
    .await;
    match r {
        Ok(_) if args.wait => watch(&mut c, args.id, args.output, RUN).await,
        Ok(s) => {
            render::status(&s, args.output);
            EXIT_OK
        }
        Err(code) => code,
    }
}

/// `audit list`: the audit trail, of one plan or all, since a time.
pub async fn audit(
    addr: &str,
    plan: Option<String>,
    since: Option<String>,
    limit: u32,
    output: Output,
) -> u8 {
    let since_ms = match since.as_deref().map(since_ms).transpose() {
        Ok(s) => s.unwrap_or(0),
        Err(e) => {
            eprintln!("error: --since: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    let mut c = match client(addr).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let req = pb::ListAuditRequest {
        plan_id: plan.unwrap_or_default(),
        since_ms,
        limit,
    };
    match c.list_audit(req).await {
        Ok(r) => {
            render::audit(&r.into_inner(), output);
            EXIT_OK
        }
        Err(e) => fail(e),
    }
}

/// `--since`: a duration back from now, or an RFC 3339 time; as ms since the epoch.
fn since_ms(s: &str) -> Result<u64, String> {
    let at = match humantime::parse_duration(s.trim()) {
        Ok(back) => std::time::SystemTime::now()
            .checked_sub(back)
            .unwrap_or(std::time::UNIX_EPOCH),
        Err(_) => humantime::parse_rfc3339_weak(s.trim()).map_err(|_| {
            format!("`{s}` is neither a duration (e.g. 2h, 1day) nor an RFC 3339 time (e.g. 2026-12-01T09:00:00Z)")
        })?,
    };
    Ok(at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0))
}

async fn retry(addr: &str, args: super::RetryArgs) -> u8 {
    let mut c = match client(addr).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let req = pb::RetryRequest {
        plan_id: args.id.clone(),
        actor: acting(args.actor),
        reason: args.reason,
        targets: args.targets,
    };
    let r = on_leader(&mut c, |mut c| {
        let req = req.clone();
        async move { c.retry_plan(req).await }
    })
    .await;
    match r {
        Ok(_) if args.wait => watch(&mut c, args.id, args.output, RUN).await,
        Ok(s) => {
            render::status(&s, args.output);
            EXIT_OK
        }
        Err(code) => code,
    }
}

async fn decide(addr: &str, args: super::DecideArgs, verb: Verb) -> u8 {
    let req = pb::PlanCommand {
        plan_id: args.id,
        actor: acting(args.actor),
        reason: args.reason,
        shard: String::new(),
    };
    send_command(addr, verb, req, args.wait, args.output).await
}

async fn pause(addr: &str, args: super::PauseArgs, paused: bool) -> u8 {
    let req = pb::PlanCommand {
        plan_id: args.id,
        actor: acting(args.actor),
        reason: args.reason,
        shard: args.shard.unwrap_or_default(),
    };
    let verb = if paused { Verb::Pause } else { Verb::Resume };
    send_command(addr, verb, req, false, args.output).await
}

fn lint(path: &std::path::Path, output: Output, rules: &[RuleSet]) -> u8 {
    let raw = match loader::load(path, &Overrides::default()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    let spec = match flotilla_core::PlanSpec::try_from(raw) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            return EXIT_BAD_INPUT;
        }
    };
    let options = LintOptions {
        naming: rules.contains(&RuleSet::Naming),
        ..LintOptions::default()
    };
    let findings: Vec<pb::LintFinding> = lint_plan(&spec, &options)
        .iter()
        .map(pb::LintFinding::from)
        .collect();
    render::lint(&spec, &findings, output);
    if findings
        .iter()
        .any(|f| f.severity == Severity::Error.as_str())
    {
        EXIT_LINT_ERRORS
    } else {
        EXIT_OK
    }
}

async fn submit(addr: &str, args: SubmitArgs) -> u8 {
    submit_plan(addr, args).await.0
}

/// What `plan submit` and the dry run take from their flags over the plan file.
pub(super) fn overrides(args: &SubmitArgs) -> Overrides {
    Overrides {
        max_parallel: args.max_parallel,
        selector: args.selector.clone(),
        policy: args.policy.clone(),
        scope: args.scope.clone(),
        no_fuse: args.no_fuse,
        atomic: args.atomic,
    }
}

/// Submits (and with `--wait` follows) a plan: the exit code, and the plan's id once
/// the coordinator took it.
pub(super) async fn submit_plan(addr: &str, args: SubmitArgs) -> (u8, Option<String>) {
    let overrides = overrides(&args);
    let mut raw = match loader::load(&args.path, &overrides) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return (EXIT_BAD_INPUT, None);
        }
    };
    // Check locally first: a bad plan never needs a coordinator to be refused.
    if let Err(e) = flotilla_core::PlanSpec::try_from(raw.clone()) {
        eprintln!("error: {}: {e}", args.path.display());
        return (EXIT_BAD_INPUT, None);
    }
    raw.submitted_by = acting(args.actor.clone());
    if let Some(env) = &args.promotion.environment {
        raw.environment = env.trim().to_string();
    }
    let mut c = match client(addr).await {
        Ok(c) => c,
        Err(code) => return (code, None),
    };
    let req = pb::SubmitPlanRequest {
        spec: Some(raw),
        skip_promotion_check: args.promotion.skip_promotion_check,
        override_reason: args.promotion.reason.clone().unwrap_or_default(),
    };
    let resp = match on_leader(&mut c, |mut c| {
        let req = req.clone();
        async move { c.submit_plan(req).await }
    })
    .await
    {
        Ok(r) => r,
        Err(code) => return (code, None),
    };
    for warning in &resp.warnings {
        eprintln!("{warning}");
    }
    // The lint's warnings (its errors refused the plan): said, and the plan goes on.
    let migrations = req
        .spec
        .as_ref()
        .map(|s| s.migrations.as_slice())
        .unwrap_or_default();
    for f in &resp.findings {
        let at = migrations.iter().find(|m| m.id == f.migration).map(|m| {
            let sql = render::part_sql(&f.file, &m.up_sql, &m.down_sql, &m.verify_sql);
            render::finding_at(&m.source, sql, f)
        });
        eprintln!(
            "{}",
            render::finding_text(at.as_deref().unwrap_or(&f.migration), f)
        );
    }
    if !args.wait {
        render::submitted(&resp, args.output);
        return (EXIT_OK, Some(resp.plan_id));
    }
    if args.output == Output::Text {
        println!("plan {} submitted", resp.plan_id);
    }
    let code = watch(&mut c, resp.plan_id.clone(), args.output, RUN).await;
    (code, Some(resp.plan_id))
}

async fn command(addr: &str, args: CommandArgs, rollback: bool) -> u8 {
    let req = pb::PlanCommand {
        plan_id: args.id,
        actor: acting(args.actor),
        reason: args.reason,
        shard: args.shard.unwrap_or_default(),
    };
    let verb = if rollback {
        Verb::Rollback
    } else {
        Verb::Cancel
    };
    send_command(addr, verb, req, args.wait, args.output).await
}

/// What an operator's command asks of a plan.
#[derive(Clone, Copy)]
enum Verb {
    Cancel,
    Rollback,
    Pause,
    Resume,
    Promote,
    Halt,
}

impl Verb {
    /// The plan states in which `--wait` says the command did what it asked.
    fn wanted(self) -> &'static [&'static str] {
        match self {
            Verb::Rollback => &["rolled_back"],
            Verb::Cancel => &["cancelled", "rolled_back"],
            Verb::Halt => &["halted"],
            Verb::Pause | Verb::Resume | Verb::Promote => RUN,
        }
    }
}

/// Sends an operator's command to the leader; shows the status it answers with, or watches
/// the plan to its end (`wait`).
async fn send_command(
    addr: &str,
    verb: Verb,
    req: pb::PlanCommand,
    wait: bool,
    output: Output,
) -> u8 {
    let mut c = match client(addr).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let id = req.plan_id.clone();
    let r = on_leader(&mut c, |mut c| {
        let req = req.clone();
        async move {
            match verb {
                Verb::Cancel => c.cancel_plan(req).await,
                Verb::Rollback => c.rollback_plan(req).await,
                Verb::Pause => c.pause_plan(req).await,
                Verb::Resume => c.resume_plan(req).await,
                Verb::Promote => c.promote_plan(req).await,
                Verb::Halt => c.halt_plan(req).await,
            }
        }
    })
    .await;
    match r {
        Ok(_) if wait => watch(&mut c, id, output, verb.wanted()).await,
        Ok(s) => {
            render::status(&s, output);
            EXIT_OK
        }
        Err(code) => code,
    }
}

pub async fn locks(addr: &str, cmd: super::LocksCommand) -> u8 {
    let mut c = match client(addr).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match cmd {
        super::LocksCommand::List { output } => match c.list_locks(pb::ListLocksRequest {}).await {
            Ok(r) => {
                render::locks(&r.into_inner(), output);
                EXIT_OK
            }
            Err(e) => fail(e),
        },
        super::LocksCommand::Break {
            shard,
            reason,
            actor,
        } => {
            let req = pb::BreakLockRequest {
                shard: shard.clone(),
                actor: acting(actor),
                reason,
            };
            match on_leader(&mut c, |mut c| {
                let req = req.clone();
                async move { c.break_lock(req).await }
            })
            .await
            {
                Ok(r) if r.broken => {
                    println!("lock on shard {shard} broken (recorded in the audit trail)");
                    EXIT_OK
                }
                Ok(_) => {
                    eprintln!("error: shard {shard} holds no lock");
                    EXIT_BAD_INPUT
                }
                Err(code) => code,
            }
        }
    }
}

/// Follows a plan to its end; the exit code says how it ended.
async fn watch(c: &mut Client, id: String, output: Output, wanted: &[&str]) -> u8 {
    let started = Instant::now();
    let mut stream = match c
        .watch_plan(pb::GetPlanRequest {
            plan_id: id.clone(),
        })
        .await
    {
        Ok(s) => s.into_inner(),
        Err(e) => return fail(e),
    };
    let mut progress = render::Progress::new(output);
    let mut last: Option<pb::PlanStatus> = None;
    loop {
        match stream.message().await {
            Ok(Some(s)) => {
                progress.update(&s, started.elapsed());
                // A manual gate waits for a person: a script's `--wait` comes back here
                // (exit 4) rather than hang until someone promotes.
                let waiting = s
                    .summary
                    .as_ref()
                    .is_some_and(|x| waits_for_a_person(&x.state));
                last = Some(s);
                if waiting {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                eprintln!("error: watching plan {id}: {}", e.message());
                return status_exit(&e);
            }
        }
    }
    match last {
        Some(s) => {
            progress.finish(&s, started.elapsed());
            state_exit(&s, wanted)
        }
        None => {
            eprintln!("error: the coordinator ended the watch of plan {id} without a status");
            EXIT_UNAVAILABLE
        }
    }
}

pub async fn fleet_list(addr: &str, output: Output) -> u8 {
    let mut c = match client(addr).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match on_leader(&mut c, |mut c| async move {
        c.list_fleet(pb::ListFleetRequest {}).await
    })
    .await
    {
        Ok(r) => {
            render::fleet(&r, output);
            EXIT_OK
        }
        Err(code) => code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_duration_back_or_an_rfc3339_time() {
        assert_eq!(since_ms("2026-12-01T09:00:00Z"), Ok(1_796_115_600_000));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let back = since_ms("2h").unwrap();
        assert!(now - back >= 7_200_000 && now - back < 7_260_000, "{back}");
        assert!(since_ms("yesterday").unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn a_plan_awaiting_approval_waits_for_a_person() {
        assert!(waits_for_a_person("awaiting_approval"));
        assert!(waits_for_a_person("waiting"));
        assert!(!waits_for_a_person("running") && !waits_for_a_person("rejected"));
    }
}
