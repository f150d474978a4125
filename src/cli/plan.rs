//! Operator commands: talk to the coordinator's OperatorService.
use std::time::Instant;

use flotilla_core::pb;

use super::call::{
    Client, acting, ask_leader, call_any, call_leader, client, fail, leader_named_in, read_plan,
    status_exit,
};
use super::render;
use super::{
    CommandArgs, EXIT_BAD_INPUT, EXIT_LINT_ERRORS, EXIT_OK, EXIT_PLAN_FAILED, EXIT_UNAVAILABLE,
    Output, PlanCommand, RuleSet, SubmitArgs,
};
use crate::loader::{self, Overrides};
use flotilla_core::lint::{LintOptions, Severity, lint_plan};

/// Whether a plan in this state waits for a person: at a wave's manual gate, for its
/// approvals, or paused (for `plan resume`). A script's `--wait` comes back then (exit 4)
/// rather than hang.
fn waits_for_a_person(state: &str) -> bool {
    state == flotilla_core::state::WAITING
        || state == flotilla_core::state::PAUSED
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
            atomic,
            rules,
            scope,
        } => lint(&path, output, atomic, scope, &rules),
        PlanCommand::Submit(args) if args.dry_run => super::explain::run(addr, &args).await,
        PlanCommand::Submit(args) => submit(addr, args).await,
        PlanCommand::Explain(args) => super::explain::run(addr, &args).await,
        PlanCommand::Status { id, output } => {
            read_plan(
                addr,
                pb::GetPlanRequest { plan_id: id },
                |mut c, req| async move { c.get_plan(req).await },
                |s| {
                    render::status(&s, output);
                    EXIT_OK
                },
            )
            .await
        }
        PlanCommand::Watch { id, output } => match client(addr).await {
            Ok(mut c) => watch(&mut c, addr, id, output, RUN, true).await,
            Err(code) => code,
        },
        PlanCommand::List { limit, output } => {
            read_plan(
                addr,
                pb::ListPlansRequest { limit },
                |mut c, req| async move { c.list_plans(req).await },
                |r| {
                    render::plan_list(&r, output);
                    EXIT_OK
                },
            )
            .await
        }
        PlanCommand::Cancel(args) => command(addr, args.into(), false).await,
        PlanCommand::Rollback(args) => command(addr, args.into(), true).await,
        PlanCommand::Pause(args) => pause(addr, args, true).await,
        PlanCommand::Resume(args) => pause(addr, args, false).await,
        PlanCommand::Promote(args) => {
            // (an unset variable in a pipeline, `--wave "$WAVE"`, would promote whichever
            // wave waits)
            if args.wave.as_ref().is_some_and(|w| w.trim().is_empty()) {
                eprintln!("error: --wave is empty: name the wave whose gate to release");
                return EXIT_BAD_INPUT;
            }
            let wave = args.wave.unwrap_or_default();
            decide_with(addr, args.decide, Verb::Promote, wave).await
        }
        PlanCommand::Halt(args) => decide(addr, args, Verb::Halt).await,
        PlanCommand::ForgetShard(args) => {
            let req = pb::PlanCommand {
                plan_id: args.id,
                actor: acting(args.actor),
                reason: args.reason,
                shard: args.shard,
                ..Default::default()
            };
            send_command(addr, Verb::ForgetShard, req, args.wait, args.output).await
        }
        PlanCommand::Retry(args) => retry(addr, args).await,
        PlanCommand::Approve(args) => approve(addr, args).await,
        PlanCommand::Reject(args) => reject(addr, args).await,
    }
}

/// `plan approve` (`approve`) or `plan reject`.
async fn approve(addr: &str, args: super::ApprovalArgs) -> u8 {
    let req = pb::ApprovalRequest {
        plan_id: args.id.clone(),
        actor: acting(args.actor),
        role: args.role,
        reason: args.reason,
    };
    let r = ask_leader(
        addr,
        req,
        |mut c, req| async move { c.approve_plan(req).await },
    )
    .await;
    answered(addr, r, args.id, args.wait, args.output, RUN).await
}

async fn reject(addr: &str, args: super::RejectArgs) -> u8 {
    let req = pb::ApprovalRequest {
        plan_id: args.id.clone(),
        actor: acting(args.actor),
        role: String::new(),
        reason: args.reason,
    };
    let r = ask_leader(
        addr,
        req,
        |mut c, req| async move { c.reject_plan(req).await },
    )
    .await;
    answered(addr, r, args.id, false, args.output, RUN).await
}

/// What a command on one plan answered: its status shown, or with `wait` the plan followed
/// to its end (on the leader that answered) and its exit code for the `wanted` states.
async fn answered(
    addr: &str,
    r: Result<(Client, pb::PlanStatus), u8>,
    id: String,
    wait: bool,
    output: Output,
    wanted: &[&str],
) -> u8 {
    match r {
        Ok((mut c, _)) if wait => watch(&mut c, addr, id, output, wanted, false).await,
        Ok((_, s)) => {
            render::status(&s, output);
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
    let req = pb::ListAuditRequest {
        plan_id: plan.unwrap_or_default(),
        since_ms,
        limit,
    };
    call_any(
        addr,
        req,
        |mut c, req| async move { c.list_audit(req).await },
        |r| {
            render::audit(&r, output);
            EXIT_OK
        },
    )
    .await
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
    let req = pb::RetryRequest {
        plan_id: args.id.clone(),
        actor: acting(args.actor),
        reason: args.reason,
        targets: args.targets,
        ignore_later_plans: args.ignore_later_plans,
    };
    let r = ask_leader(
        addr,
        req,
        |mut c, req| async move { c.retry_plan(req).await },
    )
    .await;
    answered(addr, r, args.id, args.wait, args.output, RUN).await
}

async fn decide(addr: &str, args: super::DecideArgs, verb: Verb) -> u8 {
    decide_with(addr, args, verb, String::new()).await
}

/// [`decide`], for one wave (`plan promote --wave`).
async fn decide_with(addr: &str, args: super::DecideArgs, verb: Verb, wave: String) -> u8 {
    let req = pb::PlanCommand {
        plan_id: args.id,
        actor: acting(args.actor),
        reason: args.reason,
        shard: String::new(),
        wave,
        ..Default::default()
    };
    send_command(addr, verb, req, args.wait, args.output).await
}

async fn pause(addr: &str, args: super::PauseArgs, paused: bool) -> u8 {
    let req = pb::PlanCommand {
        plan_id: args.id,
        actor: acting(args.actor),
        reason: args.reason,
        shard: args.shard.unwrap_or_default(),
        ..Default::default()
    };
    let verb = if paused { Verb::Pause } else { Verb::Resume };
    send_command(addr, verb, req, false, args.output).await
}

fn lint(
    path: &std::path::Path,
    output: Output,
    atomic: bool,
    scope: Option<String>,
    rules: &[RuleSet],
) -> u8 {
    let overrides = Overrides {
        atomic,
        scope,
        ..Overrides::default()
    };
    let raw = match loader::load(path, &overrides) {
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
    // A migration's `[test]` (migration.toml) is read as `plan test` reads it: its SQL
    // parsed, its expectation well formed. A file that does not read is bad input.
    for m in &spec.migrations {
        if let Err(e) = super::plan_test::migration_test(std::path::Path::new(&m.source)) {
            eprintln!("error: {e}");
            return EXIT_BAD_INPUT;
        }
    }
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
    // The same id on every attempt of this command (a follower's refusal followed to the
    // leader): a submit whose plan was stored before its answer was lost is not submitted twice.
    let request_id = args
        .request_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let req = pb::SubmitPlanRequest {
        spec: Some(raw),
        skip_promotion_check: args.promotion.skip_promotion_check,
        override_reason: args.promotion.reason.clone().unwrap_or_default(),
        request_id,
    };
    let (mut c, resp) = match ask_leader(addr, req.clone(), |mut c, req| async move {
        c.submit_plan(req).await
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
    let code = watch(&mut c, addr, resp.plan_id.clone(), args.output, RUN, false).await;
    (code, Some(resp.plan_id))
}

async fn command(addr: &str, args: CommandArgs, rollback: bool) -> u8 {
    let down_from = match (&args.down_from, rollback) {
        (None, _) => Vec::new(),
        (Some(_), false) => {
            eprintln!("error: --down-from is for `plan rollback`");
            return EXIT_BAD_INPUT;
        }
        (Some(dir), true) => match loader::load(dir, &Overrides::default()) {
            Ok(raw) => raw.migrations,
            Err(e) => {
                eprintln!("error: --down-from: {e}");
                return EXIT_BAD_INPUT;
            }
        },
    };
    let req = pb::PlanCommand {
        plan_id: args.id,
        actor: acting(args.actor),
        reason: args.reason,
        shard: args.shard.unwrap_or_default(),
        down_from,
        ignore_later_plans: args.ignore_later_plans,
        ..Default::default()
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
    ForgetShard,
}

impl Verb {
    /// The plan states in which `--wait` says the command did what it asked.
    fn wanted(self) -> &'static [&'static str] {
        match self {
            Verb::Rollback => &["rolled_back"],
            Verb::Cancel => &["cancelled", "rolled_back"],
            Verb::Halt => &["halted"],
            // the plan ends without the forgotten shard's commit confirmed
            Verb::ForgetShard => &["failed"],
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
    let id = req.plan_id.clone();
    let r = ask_leader(addr, req, |mut c, req| async move {
        match verb {
            Verb::Cancel => c.cancel_plan(req).await,
            Verb::Rollback => c.rollback_plan(req).await,
            Verb::Pause => c.pause_plan(req).await,
            Verb::Resume => c.resume_plan(req).await,
            Verb::Promote => c.promote_plan(req).await,
            Verb::Halt => c.halt_plan(req).await,
            Verb::ForgetShard => c.forget_shard(req).await,
        }
    })
    .await;
    answered(addr, r, id, wait, output, verb.wanted()).await
}

pub async fn locks(addr: &str, cmd: super::LocksCommand) -> u8 {
    match cmd {
        super::LocksCommand::List { output } => {
            call_any(
                addr,
                pb::ListLocksRequest {},
                |mut c, req| async move { c.list_locks(req).await },
                |r| {
                    render::locks(&r, output);
                    EXIT_OK
                },
            )
            .await
        }
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
            call_leader(
                addr,
                req,
                |mut c, req| async move { c.break_lock(req).await },
                |r| {
                    if r.broken {
                        println!("lock on shard {shard} broken (recorded in the audit trail)");
                        EXIT_OK
                    } else {
                        eprintln!("error: shard {shard} holds no lock");
                        EXIT_BAD_INPUT
                    }
                },
            )
            .await
        }
    }
}

/// Follows a plan to its end; the exit code says how it ended. A follower's watch follows
/// the control store: the leader's is taken when it answers. When the coordinator watched
/// goes away before the plan ends (killed, stopped, its term lost), the watch is taken up
/// again through `addr` (every coordinator given), as often as a command waits for a
/// leader: the plan goes on under the next leader, and so does the watch.
async fn watch(
    c: &mut Client,
    addr: &str,
    id: String,
    output: Output,
    wanted: &[&str],
    every_update: bool,
) -> u8 {
    let started = Instant::now();
    let req = pb::GetPlanRequest {
        plan_id: id.clone(),
    };
    let mut stream = match open_watch(c, &req).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let mut progress = render::Progress::new(output, every_update);
    let mut last: Option<pb::PlanStatus> = None;
    let mut lost = 0;
    // the last attempt to reach a coordinator again found none (the old stream's end, read
    // again, would be taken for the coordinator ending the watch)
    let mut unreachable = false;
    loop {
        let gone = match stream.message().await {
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
                continue;
            }
            Ok(None) if last.as_ref().is_some_and(ended) => break,
            Ok(None) if unreachable => format!("no coordinator answers at {addr}"),
            Ok(None) => "the coordinator ended the watch before the plan ended".to_string(),
            Err(e) if coordinator_gone(&e) => e.message().to_string(),
            Err(e) => {
                if let Some(s) = &last {
                    progress.gave_up(s);
                }
                eprintln!("error: watching plan {id}: {}", e.message());
                return status_exit(&e);
            }
        };
        if lost >= super::call::LEADER_WAITS {
            if let Some(s) = &last {
                progress.gave_up(s);
            }
            eprintln!(
                "error: watching plan {id}: {gone}; no coordinator took the watch up (the plan \
                 goes on without the watch: `flotilla plan watch {id}` follows it again)"
            );
            return EXIT_UNAVAILABLE;
        }
        if lost == 0 {
            eprintln!("note: watching plan {id}: {gone}; following it at the next coordinator");
        }
        lost += 1;
        tokio::time::sleep(super::call::LEADER_WAIT).await;
        unreachable = true;
        if let Some(next) = super::call::quietly(addr).await {
            *c = next;
            if let Ok(s) = open_watch(c, &req).await {
                stream = s;
                unreachable = false;
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

/// Opens the plan's watch on `c`, or on the leader a follower names (see
/// [`leader_named_in`]), `c` then the leader's.
async fn open_watch(
    c: &mut Client,
    req: &pb::GetPlanRequest,
) -> Result<tonic::Streaming<pb::PlanStatus>, tonic::Status> {
    let named = match c.watch_plan(req.clone()).await {
        Ok(s) => match leader_named_in(s.metadata()).await {
            Some(leader) => Ok((leader, s)),
            None => return Ok(s.into_inner()),
        },
        Err(e) => match leader_named_in(e.metadata()).await {
            Some(leader) => Err((leader, e)),
            None => return Err(e),
        },
    };
    match named {
        Ok((mut leader, theirs)) => match leader.watch_plan(req.clone()).await {
            Ok(s) => {
                *c = leader;
                Ok(s.into_inner())
            }
            Err(e) => {
                eprintln!(
                    "note: the leader answered: {}; following the control store instead",
                    e.message()
                );
                Ok(theirs.into_inner())
            }
        },
        Err((mut leader, refused)) => match leader.watch_plan(req.clone()).await {
            Ok(s) => {
                *c = leader;
                Ok(s.into_inner())
            }
            Err(_) => Err(refused),
        },
    }
}

/// Whether the plan's state is one it ends in.
fn ended(s: &pb::PlanStatus) -> bool {
    s.summary
        .as_ref()
        .is_some_and(|x| flotilla_core::state::PlanState::is_terminal_str(&x.state))
}

/// A watch's stream cut by the coordinator going away (killed, stopped, its term lost),
/// not refused by it.
fn coordinator_gone(e: &tonic::Status) -> bool {
    matches!(
        e.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

pub async fn fleet_list(addr: &str, output: Output) -> u8 {
    call_leader(
        addr,
        pb::ListFleetRequest {},
        |mut c, req| async move { c.list_fleet(req).await },
        |r| {
            render::fleet(&r, output);
            EXIT_OK
        },
    )
    .await
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
        assert!(
            waits_for_a_person("paused"),
            "a paused plan waits for `plan resume`"
        );
        assert!(!waits_for_a_person("running") && !waits_for_a_person("rejected"));
    }
}
