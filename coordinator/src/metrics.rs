//! Every metric the coordinator exports, in one place: `flotilla_` prefix, unit
//! suffixes, a description each, label values from closed sets or bounded ones (shard
//! names, plan environments). Never a tenant or a plan id: a generated id as a label
//! value makes a new series per plan, forever.
//!
//! Two kinds of metrics: events counted where they happen (steps, plans, decisions),
//! and gauges of what the leader's engine holds, recomputed from its state on every
//! tick ([`publish`]), so they can never drift from it.
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Once, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header};
pub use metrics_exporter_prometheus::BuildError;
use metrics_exporter_prometheus::PrometheusHandle;

use flotilla_core::protocol::Decision;
use flotilla_core::state::{PlanState, StepState};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

static DESCRIBE: Once = Once::new();

/// Histogram buckets (seconds) for every duration: a DDL step takes milliseconds, a
/// data change or a blocked lock minutes. Without buckets the exporter renders
/// summaries, whose quantiles cannot be aggregated across shards or coordinators.
const DURATION_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Buckets (seconds) of the scheduling latency: the engine's turn-around on an agent's
/// results is tens of microseconds to milliseconds when it keeps up, so the duration
/// buckets (from 5 ms) would put every observation in the first one.
const SCHEDULING_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

/// The scheduling latency histogram (see [`scheduling_latency`]).
const SCHEDULING_LATENCY: &str = "flotilla_scheduling_latency_seconds";

/// The time the leader's engine spends on one event, by event (see [`engine_event`]).
const ENGINE_EVENT: &str = "flotilla_engine_event_seconds";

/// The time from a plan status request to its answer (see [`plan_status_answered`]).
const PLAN_STATUS: &str = "flotilla_plan_status_seconds";

/// Step outcomes as labelled (the `outcome` label of `flotilla_steps_finished_total`).
const STEP_OUTCOMES: [&str; 7] = [
    "applied",
    "already_applied",
    "failed",
    "rolled_back",
    "retried",
    "prepared",
    "not_run",
];

/// Where a plan in motion is, as an operator says it (the `state` label of
/// `flotilla_plans`): a running plan paused as a whole is `paused`, one waiting at a
/// manual gate is `waiting`.
pub const ACTIVE_STATES: [&str; 7] = [
    "running",
    "paused",
    "waiting",
    "stopping",
    "committing",
    "aborting",
    "rolling_back",
];

/// The `environment` label of plans whose file names none.
pub const NO_ENVIRONMENT: &str = "none";

/// Why data changes wait at a batch boundary (the `why` label).
const DATA_WAITS: [&str; 2] = ["throttled", "paused"];

/// Why the metrics endpoint could not be served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("{0}")]
    Build(#[from] BuildError),
    #[error("{addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Serves `/metrics` on `addr` (Prometheus text format), with `/healthz` and `/readyz`
/// beside it (see [`set_readiness`]), and describes every metric.
pub fn install(addr: Option<SocketAddr>) -> Result<(), MetricsError> {
    install_labelled(addr, None)
}

/// [`install`] for an agent's process: every series it serves carries `shard="NAME"`,
/// so dashboards and alerts name the shard whatever the scrape configuration says.
pub fn install_agent(addr: Option<SocketAddr>, shard: &str) -> Result<(), MetricsError> {
    install_labelled(addr, Some(shard))
}

/// The exporter with every histogram's buckets.
fn bucketed() -> Result<metrics_exporter_prometheus::PrometheusBuilder, BuildError> {
    // the coordinator's own turn-arounds: microseconds to a second
    [SCHEDULING_LATENCY, ENGINE_EVENT, PLAN_STATUS]
        .into_iter()
        .try_fold(
            metrics_exporter_prometheus::PrometheusBuilder::new().set_buckets(&DURATION_BUCKETS)?,
            |builder, name| {
                builder.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(name.into()),
                    &SCHEDULING_BUCKETS,
                )
            },
        )
}

fn install_labelled(addr: Option<SocketAddr>, shard: Option<&str>) -> Result<(), MetricsError> {
    if let Some(addr) = addr {
        // Bound here, before anything else starts: a port taken is an error at start,
        // not a log line later.
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| MetricsError::Bind { addr, source })?;
        let mut builder = bucketed()?;
        if let Some(shard) = shard {
            builder = builder.add_global_label("shard", shard);
        }
        let handle = builder.install_recorder()?;
        // Histograms are drained into their buckets by the upkeep (the exporter's own
        // listener ran it every 5 s too).
        let upkeep = handle.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                upkeep.run_upkeep();
            }
        });
        tokio::spawn(serve_http(listener, handle));
    }
    DESCRIBE.call_once(describe);
    Ok(())
}

/// What `/readyz` asks: `Ok` while the process can do its work, why not otherwise.
type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

static READINESS: RwLock<Option<Readiness>> = RwLock::new(None);

/// What the metrics port's `/readyz` answers from now on: 200 while `ready` says `Ok`,
/// 503 with its reason otherwise (before it is set: 503 "starting").
pub fn set_readiness(ready: impl Fn() -> Result<(), String> + Send + Sync + 'static) {
    *READINESS.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(ready));
}

fn readiness() -> Result<(), String> {
    let ready = READINESS.read().unwrap_or_else(|e| e.into_inner()).clone();
    match ready {
        Some(ready) => ready(),
        None => Err("starting".into()),
    }
}

/// The metrics port: HTTP/1.1, one task per connection (a scrape or a probe each).
async fn serve_http(listener: tokio::net::TcpListener, handle: PrometheusHandle) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics port: accepting a connection failed");
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let handle = handle.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&handle, &req)) }
            });
            // a scraper that hangs up mid-answer is no news
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `/metrics` (and `/`, which served them before there was anything else), `/healthz`
/// (the process answers: liveness), `/readyz` ([`set_readiness`]); 404 elsewhere, so a
/// probe of a path that is not there fails instead of passing on the metrics page.
fn answer<B>(handle: &PrometheusHandle, req: &Request<B>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} is not served here: GET only\n", req.method()),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match req.uri().path() {
        "/metrics" | "/" => {
            let mut response = text(StatusCode::OK, handle.render());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" | "/livez" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        other => text(
            StatusCode::NOT_FOUND,
            format!("{other} is not served here: /metrics, /healthz and /readyz are\n"),
        ),
    }
}

fn describe() {
    describe_gauge!(
        "flotilla_control_store_up",
        "1 while the control store answers a read (probed every 5 s), 0 while it does not: the coordinator's log names the store and why. Its operator gRPC services are NOT_SERVING meanwhile."
    );
    describe_counter!(
        "flotilla_store_write_failures_total",
        "Control store transactions of the store writer that failed, by outcome: retried (the store out of reach: tried again while this coordinator leads under the writes' term), given_up (one write the store refused for good, or a batch of a term that no longer leads), refused (a later leader has fenced the store: a deposed leader's writes, none written). Each is logged with its plans."
    );
    describe_counter!(
        "flotilla_connections_refused_total",
        "Clients refused for their certificate, by reason: no_certificate, bad_certificate (another CA, expired, ...) in the TLS handshake; wrong_shard for an agent whose certificate names another shard. Each is also in the audit trail."
    );
    describe_counter!(
        "flotilla_plans_started_total",
        "Plans the coordinator started (or resumed)."
    );
    describe_counter!(
        "flotilla_plans_finished_total",
        "Plans that reached a final state, by state, and by whom: operator (an operator's rollback, cancel or halt, an approver's rejection) or plan (its own end: completed, a failure, a gate or an error budget). A plan that ended and is rolled back later counts again, rolled_back by operator."
    );
    describe_gauge!(
        "flotilla_plans_awaiting_approval",
        "Plans stored in awaiting_approval, touching nothing until approved (counted by the leader)."
    );
    describe_counter!(
        "flotilla_plan_approvals_total",
        "Decisions on plans awaiting approval, by decision (approve, reject), and plans submitted into awaiting_approval (awaiting)."
    );
    describe_counter!(
        "flotilla_promotion_checks_total",
        "Promotion gate decisions at submit (coordinator --environments), by the plan's environment and outcome: passed, refused, skipped (an audited --skip-promotion-check)."
    );
    describe_counter!(
        "flotilla_operator_requests_refused_total",
        "Operator requests refused by authentication, by reason: unauthenticated (no, malformed, unknown or revoked credential) or denied (a role that does not allow the method, or --as naming someone else)."
    );
    describe_gauge!(
        "flotilla_plans",
        "Plans in motion on this coordinator (the leader), by state and environment (none: the plan names none)."
    );
    describe_gauge!(
        "flotilla_plans_waiting_for_locks",
        "Running plans waiting for shard locks another plan holds."
    );
    describe_gauge!(
        "flotilla_plan_duration_ratio",
        "The largest age / expected duration among running plans not waiting for an operator \
         (expected: bakes + steps over the parallelism x the mean step time + data changes' ETA); 0 with none."
    );
    describe_counter!(
        "flotilla_steps_finished_total",
        "Step outcomes reported by agents, by shard and outcome."
    );
    describe_histogram!(
        "flotilla_step_duration_seconds",
        "Time a step took on its shard."
    );
    describe_histogram!(
        SCHEDULING_LATENCY,
        "From an agent's run results arriving on its stream to the leader's engine having folded them into the plan and handed out the runs they freed (its wait in the engine's queue included): what the coordinator adds between one step and the next on a shard."
    );
    describe_histogram!(
        ENGINE_EVENT,
        "Time the leader's engine spent on one event, by event (results, status, start, tick, ...): every event queued behind it waits that long, a plan status answer or the runs an agent's results free."
    );
    describe_histogram!(
        PLAN_STATUS,
        "From a plan's status asked of the coordinator (plan status, each update of a plan watch, a command's answer) to the status built: the engine's queue and the status of a plan in memory, or the store read of one that is not."
    );
    describe_gauge!(
        "flotilla_agents_connected",
        "Agents attached to this coordinator."
    );
    describe_gauge!(
        "flotilla_shard_agent_connected",
        "1 while the shard's agent is attached to this coordinator, else 0, by shard (0 on followers)."
    );
    describe_gauge!(
        "flotilla_shard_agent_disconnected_seconds",
        "How long the shard's agent has been detached from this leader (0 while attached, and on followers), by shard."
    );
    describe_gauge!(
        "flotilla_shard_agent_grace_seconds",
        "--agent-grace: how long an agent may be gone before its runs in flight fail."
    );
    describe_gauge!(
        "flotilla_leader",
        "1 while this coordinator leads, 0 while it follows."
    );
    describe_gauge!(
        "flotilla_leader_epoch",
        "The epoch (fencing token) this coordinator leads under; 0 while it follows."
    );
    describe_gauge!(
        "flotilla_shard_locks_held",
        "Shards locked by plans this leader runs."
    );
    describe_histogram!(
        "flotilla_two_phase_window_seconds",
        "Atomic plans: from the first PREPARE TRANSACTION to the last COMMIT PREPARED (locks held on every shard)."
    );
    describe_histogram!(
        "flotilla_two_phase_decision_seconds",
        "Atomic units: from the last PREPARE to the decision durable in etcd (leg=prepare_to_decision), from it to the last COMMIT PREPARED (leg=decision_to_commit), and from it to the last agent receiving the Resolve (leg=decision_to_agents)."
    );
    describe_histogram!(
        "flotilla_two_phase_hold_max_seconds",
        "Atomic units: the longest PREPARE-to-COMMIT PREPARED of one target (its locks held beyond a plain commit)."
    );
    describe_histogram!(
        "flotilla_two_phase_hold_median_seconds",
        "Atomic units: the median PREPARE-to-COMMIT PREPARED over the unit's targets."
    );
    describe_histogram!(
        "flotilla_two_phase_slowest_run_seconds",
        "Atomic units: the slowest target's steps before its PREPARE (when every target starts at once, about what the first to prepare waits for the last)."
    );
    describe_histogram!(
        "flotilla_two_phase_locked_max_seconds",
        "Atomic units: the longest of one target's steps' start to its COMMIT PREPARED (what an application waits at most on that target's locks)."
    );
    describe_gauge!(
        "flotilla_two_phase_prepared_targets",
        "Atomic plans: targets whose transaction is prepared and waits for the decision."
    );
    describe_counter!(
        "flotilla_decisions_total",
        "Two-phase commit decisions written, by decision."
    );
    describe_gauge!(
        "flotilla_data_rows_done",
        "Data migrations of running plans: rows done, by shard."
    );
    describe_gauge!(
        "flotilla_data_rows_estimated",
        "Data migrations of running plans: rows estimated in all (done + the planner's estimate of the rest), by shard."
    );
    describe_gauge!(
        "flotilla_data_rows_per_second",
        "Data migrations of running plans: the current rate, by shard."
    );
    describe_gauge!(
        "flotilla_data_eta_seconds",
        "Data migrations of running plans: the longest time left of a change still running, by shard (0 unknown or none)."
    );
    describe_gauge!(
        "flotilla_steps_waiting_for_table_locks",
        "Schema steps of running plans waiting to try their table lock again after a lock timeout (another session holds the table), by shard: `plan status` names the session."
    );
    describe_gauge!(
        "flotilla_tls_certificate_expiry_timestamp_seconds",
        "The notAfter (Unix seconds) of the certificate the coordinator serves TLS with (--tls-cert), as of its last (re)load; absent without TLS."
    );
    describe_gauge!(
        "flotilla_data_targets_waiting",
        "Data migrations of running plans: targets waiting at a batch boundary, by shard and why (throttled, paused)."
    );
}

/// Series that exist before their first event: dashboards and alerts see 0, not nothing.
/// Called once the coordinator starts (not in [`install`], which an agent's process calls).
pub fn initialise(agent_grace: Duration) {
    gauge!("flotilla_control_store_up").set(1.0);
    for outcome in STORE_WRITE_FAILURES {
        counter!("flotilla_store_write_failures_total", "outcome" => outcome).absolute(0);
    }
    for reason in REFUSALS {
        counter!("flotilla_connections_refused_total", "reason" => reason).absolute(0);
    }
    counter!("flotilla_plans_started_total").absolute(0);
    for state in PlanState::ALL.iter().filter(|s| s.is_terminal()) {
        for by in [false, true] {
            counter!("flotilla_plans_finished_total", "state" => state.as_str(), "by" => ended_by(by))
                .absolute(0);
        }
    }
    for d in [Decision::Commit, Decision::Abort] {
        counter!("flotilla_decisions_total", "decision" => d.as_str()).absolute(0);
    }
    gauge!("flotilla_plans_awaiting_approval").set(0.0);
    for d in APPROVAL_DECISIONS {
        counter!("flotilla_plan_approvals_total", "decision" => d).absolute(0);
    }
    for r in AUTH_REFUSALS {
        counter!("flotilla_operator_requests_refused_total", "reason" => r).absolute(0);
    }
    gauge!("flotilla_shard_agent_grace_seconds").set(agent_grace.as_secs_f64());
    gauge!("flotilla_agents_connected").set(0.0);
    gauge!("flotilla_leader").set(0.0);
    // Plans without an environment have a series per state before the first plan.
    let mut seeded = Published::default();
    seeded.environments.insert(NO_ENVIRONMENT.into());
    publish(&Snapshot::default(), &mut seeded);
}

pub fn plan_started() {
    counter!("flotilla_plans_started_total").increment(1);
}

/// A plan's end; `by_operator` when an operator's command ended it (rollback, cancel,
/// halt, rejection), not its own failure.
pub fn plan_finished(state: PlanState, by_operator: bool) {
    counter!("flotilla_plans_finished_total", "state" => state.as_str(), "by" => ended_by(by_operator))
        .increment(1);
}

fn ended_by(by_operator: bool) -> &'static str {
    if by_operator { "operator" } else { "plan" }
}

/// A step's result from its run, timed on the shard.
pub fn step_finished(shard: &str, state: StepState, duration_ms: i64) {
    step_outcome(shard, state);
    if state == StepState::Applied {
        histogram!("flotilla_step_duration_seconds").record(duration_ms as f64 / 1000.0);
    }
}

/// The engine's turn-around on one agent's results (see `SCHEDULING_LATENCY`'s description).
pub fn scheduling_latency(since_received: Duration) {
    histogram!(SCHEDULING_LATENCY).record(since_received.as_secs_f64());
}

/// The engine's time on one event (see `ENGINE_EVENT`'s description).
pub fn engine_event(event: &'static str, took: Duration) {
    histogram!(ENGINE_EVENT, "event" => event).record(took.as_secs_f64());
}

/// One plan status answered (see `PLAN_STATUS`'s description).
pub fn plan_status_answered(took: Duration) {
    histogram!(PLAN_STATUS).record(took.as_secs_f64());
}

/// A step's new state from a rollback or a resolution of prepared transactions (its
/// time on the shard was counted with its run).
pub fn step_outcome(shard: &str, state: StepState) {
    let outcome: &'static str = match state {
        StepState::Applied => "applied",
        StepState::AlreadyApplied => "already_applied",
        StepState::Failed => "failed",
        StepState::RolledBack => "rolled_back",
        // a run handed back (a halted batch, a resent run) goes again
        StepState::Pending => "retried",
        StepState::Prepared => "prepared",
        StepState::Running | StepState::NotRun => "not_run",
    };
    counter!("flotilla_steps_finished_total", "shard" => shard.to_string(), "outcome" => outcome)
        .increment(1);
}

/// A shard's step counters at 0 (when its agent first attaches), so `rate()` and
/// `increase()` see the first failure as one.
pub fn shard_known(shard: &str) {
    for outcome in STEP_OUTCOMES {
        counter!("flotilla_steps_finished_total", "shard" => shard.to_string(), "outcome" => outcome)
            .increment(0);
    }
}

pub fn agents_connected(n: usize) {
    gauge!("flotilla_agents_connected").set(n as f64);
}

pub fn leader(leading: bool) {
    gauge!("flotilla_leader").set(if leading { 1.0 } else { 0.0 });
}

pub fn two_phase_window(window: Duration) {
    histogram!("flotilla_two_phase_window_seconds").record(window.as_secs_f64());
}

/// An atomic unit's commit, from the agents' timestamps: the window, the decision's two
/// legs, and each target's lock hold (PREPARE to COMMIT PREPARED).
pub fn two_phase_timings(t: &crate::plan::timings::Timings) {
    let s = |us: i64| us.max(0) as f64 / 1e6;
    histogram!("flotilla_two_phase_window_seconds").record(s(t.window_us));
    if let (Some(a), Some(b)) = (t.prepare_to_decision_us, t.decision_to_commit_us) {
        histogram!("flotilla_two_phase_decision_seconds", "leg" => "prepare_to_decision")
            .record(s(a));
        histogram!("flotilla_two_phase_decision_seconds", "leg" => "decision_to_commit")
            .record(s(b));
    }
    if let Some(h) = t.decision_to_heard_us {
        histogram!("flotilla_two_phase_decision_seconds", "leg" => "decision_to_agents")
            .record(s(h));
    }
    histogram!("flotilla_two_phase_hold_max_seconds").record(s(t.hold_max_us));
    histogram!("flotilla_two_phase_hold_median_seconds").record(s(t.hold_median_us));
    histogram!("flotilla_two_phase_slowest_run_seconds").record(s(t.slowest_run_us));
    histogram!("flotilla_two_phase_locked_max_seconds").record(s(t.locked_max_us));
}

/// Plans stored awaiting approval (the leader's count, from the control store).
pub fn plans_awaiting_approval(n: i64) {
    gauge!("flotilla_plans_awaiting_approval").set(n.max(0) as f64);
}

/// The `outcome` label of `flotilla_promotion_checks_total`.
pub const PROMOTION_OUTCOMES: [&str; 3] = ["passed", "refused", "skipped"];

/// Every configured environment's promotion counters at 0 (the label values are the
/// coordinator's environment list: a closed set).
pub fn initialise_environments(environments: &[String]) {
    for e in environments {
        for o in PROMOTION_OUTCOMES {
            counter!("flotilla_promotion_checks_total", "environment" => e.clone(), "outcome" => o)
                .absolute(0);
        }
    }
}

/// One promotion gate decision for a plan of `environment`.
pub fn promotion_check(environment: &str, outcome: &'static str) {
    debug_assert!(PROMOTION_OUTCOMES.contains(&outcome));
    counter!("flotilla_promotion_checks_total", "environment" => environment.to_string(), "outcome" => outcome)
        .increment(1);
}

/// The `decision` label of `flotilla_plan_approvals_total`.
const APPROVAL_DECISIONS: [&str; 3] = ["awaiting", "approve", "reject"];

/// Why a client was refused for its certificate (the `reason` label).
pub const REFUSALS: [&str; 3] = ["no_certificate", "bad_certificate", "wrong_shard"];

/// The `outcome` label of `flotilla_store_write_failures_total`.
const STORE_WRITE_FAILURES: [&str; 3] = ["retried", "given_up", "refused"];

/// A store writer's transaction that failed: `retried` (tried again, or its ops one by
/// one), `given_up` or `refused`.
pub fn store_write_failed(outcome: &'static str) {
    debug_assert!(STORE_WRITE_FAILURES.contains(&outcome));
    counter!("flotilla_store_write_failures_total", "outcome" => outcome).increment(1);
}

/// A client refused for its certificate; `reason` is one of [`REFUSALS`].
pub fn connection_refused(reason: &'static str) {
    debug_assert!(REFUSALS.contains(&reason));
    counter!("flotilla_connections_refused_total", "reason" => reason).increment(1);
}

/// A plan submitted into awaiting_approval (`awaiting`), an approval (`approve`) or a
/// rejection (`reject`).
pub fn plan_approval(decision: &'static str) {
    debug_assert!(APPROVAL_DECISIONS.contains(&decision));
    counter!("flotilla_plan_approvals_total", "decision" => decision).increment(1);
}

/// The `reason` label of `flotilla_operator_requests_refused_total`.
const AUTH_REFUSALS: [&str; 2] = ["unauthenticated", "denied"];

/// An operator request refused by authentication (`unauthenticated`) or by role (`denied`).
pub fn auth_refusal(reason: &'static str) {
    debug_assert!(AUTH_REFUSALS.contains(&reason));
    counter!("flotilla_operator_requests_refused_total", "reason" => reason).increment(1);
}

pub fn decision(decision: Decision) {
    counter!("flotilla_decisions_total", "decision" => decision.as_str()).increment(1);
}

/// One shard's data changes of running plans, summed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ShardData {
    pub rows_done: u64,
    pub rows_estimated: u64,
    pub rows_per_second: f64,
    pub eta: Duration,
    pub throttled: u32,
    pub paused: u32,
    /// Schema steps waiting to try their lock again after a lock timeout.
    pub lock_waiting: u32,
}

/// What the engine holds now, for the gauges.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub epoch: Option<u64>,
    /// Plans in motion by (state as in [`ACTIVE_STATES`], environment).
    pub plans: BTreeMap<(&'static str, String), usize>,
    pub waiting_for_locks: usize,
    pub shards_locked: usize,
    pub prepared_targets: usize,
    pub duration_ratio: f64,
    /// Every shard this leader knows an agent of: None while attached, else for how long not.
    pub agents: BTreeMap<String, Option<Duration>>,
    pub data: BTreeMap<String, ShardData>,
}

/// Label values published before, set back to 0 when they leave the snapshot (a gauge
/// series cannot be removed through the `metrics` facade; its value can say "none").
#[derive(Debug, Default)]
pub struct Published {
    environments: BTreeSet<String>,
    agents: BTreeSet<String>,
    data: BTreeSet<String>,
}

/// Sets every engine gauge from `now`.
pub fn publish(now: &Snapshot, published: &mut Published) {
    gauge!("flotilla_leader_epoch").set(now.epoch.unwrap_or(0) as f64);
    published
        .environments
        .extend(now.plans.keys().map(|(_, env)| env.clone()));
    // Every environment seen keeps a series per state: a plan that ends must show as 0.
    for env in &published.environments {
        for state in ACTIVE_STATES {
            let n = now.plans.get(&(state, env.clone())).copied().unwrap_or(0);
            gauge!("flotilla_plans", "state" => state, "environment" => env.clone()).set(n as f64);
        }
    }
    gauge!("flotilla_plans_waiting_for_locks").set(now.waiting_for_locks as f64);
    gauge!("flotilla_shard_locks_held").set(now.shards_locked as f64);
    gauge!("flotilla_two_phase_prepared_targets").set(now.prepared_targets as f64);
    gauge!("flotilla_plan_duration_ratio").set(now.duration_ratio);

    published.agents.extend(now.agents.keys().cloned());
    for shard in &published.agents {
        let away = now.agents.get(shard).copied();
        let connected = matches!(away, Some(None));
        let seconds = away.flatten().map(|d| d.as_secs_f64()).unwrap_or(0.0);
        gauge!("flotilla_shard_agent_connected", "shard" => shard.clone()).set(if connected {
            1.0
        } else {
            0.0
        });
        gauge!("flotilla_shard_agent_disconnected_seconds", "shard" => shard.clone()).set(seconds);
    }

    published.data.extend(now.data.keys().cloned());
    for shard in &published.data {
        let d = now.data.get(shard).cloned().unwrap_or_default();
        let label = || shard.clone();
        gauge!("flotilla_data_rows_done", "shard" => label()).set(d.rows_done as f64);
        gauge!("flotilla_data_rows_estimated", "shard" => label()).set(d.rows_estimated as f64);
        gauge!("flotilla_data_rows_per_second", "shard" => label()).set(d.rows_per_second);
        gauge!("flotilla_data_eta_seconds", "shard" => label()).set(d.eta.as_secs_f64());
        for why in DATA_WAITS {
            let n = if why == "throttled" {
                d.throttled
            } else {
                d.paused
            };
            gauge!("flotilla_data_targets_waiting", "shard" => label(), "why" => why)
                .set(f64::from(n));
        }
        gauge!("flotilla_steps_waiting_for_table_locks", "shard" => label())
            .set(f64::from(d.lock_waiting));
    }
}

/// Targets whose schema is not their cohort's majority shape (`fleet drift`), by cohort (its
/// head migration; see `versions::cohort_labels`). A cohort no longer seen is set to 0: the
/// labels stay bounded by the cohorts the fleet has had.
pub fn drifted_targets(by_cohort: &[(String, u64)]) {
    static SEEN: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    static DESCRIBED: Once = Once::new();
    DESCRIBED.call_once(|| {
        describe_gauge!(
            "flotilla_drifted_targets",
            "Targets whose schema fingerprint differs from their cohort's majority, by cohort (head migration)."
        );
    });
    let mut seen = SEEN.lock().expect("drift metric lock");
    for gone in seen.iter() {
        if !by_cohort.iter().any(|(c, _)| c == gone) {
            gauge!("flotilla_drifted_targets", "cohort" => gone.clone()).set(0.0);
        }
    }
    for (cohort, drifted) in by_cohort {
        gauge!("flotilla_drifted_targets", "cohort" => cohort.clone()).set(*drifted as f64);
        seen.insert(cohort.clone());
    }
}

/// The notAfter (Unix seconds) of the certificate TLS is served with, at each (re)load.
pub fn tls_certificate_expiry(not_after: i64) {
    gauge!("flotilla_tls_certificate_expiry_timestamp_seconds").set(not_after as f64);
}

/// Whether the control store answered its last probe.
pub fn control_store_up(up: bool) {
    gauge!("flotilla_control_store_up").set(if up { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_metrics_port_answers_its_paths_and_refuses_the_rest() {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let get = |method: hyper::Method, path: &str| {
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .unwrap();
            super::answer(&handle, &req)
        };
        for path in ["/metrics", "/", "/healthz", "/livez"] {
            assert_eq!(get(hyper::Method::GET, path).status(), 200, "{path}");
        }
        assert_eq!(get(hyper::Method::HEAD, "/metrics").status(), 200);
        assert_eq!(get(hyper::Method::GET, "/metrics/").status(), 404);
        assert_eq!(get(hyper::Method::GET, "/health").status(), 404);
        let post = get(hyper::Method::POST, "/metrics");
        assert_eq!(post.status(), 405);
        assert_eq!(post.headers()[hyper::header::ALLOW], "GET, HEAD");
    }
    use super::*;

    /// Runs `f` against a recorder of its own (the served buckets) and returns what it
    /// would serve.
    fn rendered(f: impl FnOnce()) -> String {
        let recorder = bucketed().expect("buckets").build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, f);
        handle.render()
    }

    #[test]
    fn what_leaves_the_engine_goes_back_to_zero_and_no_plan_id_is_a_label() {
        let mut busy = Snapshot {
            epoch: Some(7),
            ..Snapshot::default()
        };
        busy.plans.insert(("running", "production".into()), 2);
        busy.agents.insert("shard_0".into(), None);
        busy.agents
            .insert("shard_1".into(), Some(Duration::from_secs(42)));
        busy.data.insert(
            "shard_0".into(),
            ShardData {
                rows_done: 10,
                rows_estimated: 40,
                rows_per_second: 5.0,
                eta: Duration::from_secs(6),
                throttled: 1,
                paused: 0,
                lock_waiting: 2,
            },
        );
        let mut published = Published::default();
        let during = rendered(|| publish(&busy, &mut published));
        for line in [
            "flotilla_leader_epoch 7",
            "flotilla_plans{state=\"running\",environment=\"production\"} 2",
            "flotilla_plans{state=\"paused\",environment=\"production\"} 0",
            "flotilla_shard_agent_connected{shard=\"shard_0\"} 1",
            "flotilla_shard_agent_connected{shard=\"shard_1\"} 0",
            "flotilla_shard_agent_disconnected_seconds{shard=\"shard_1\"} 42",
            "flotilla_data_rows_done{shard=\"shard_0\"} 10",
            "flotilla_data_eta_seconds{shard=\"shard_0\"} 6",
            "flotilla_data_targets_waiting{shard=\"shard_0\",why=\"throttled\"} 1",
            "flotilla_steps_waiting_for_table_locks{shard=\"shard_0\"} 2",
        ] {
            assert!(
                during.lines().any(|l| l == line),
                "{line} not in:\n{during}"
            );
        }

        // A follower holds nothing: every series it had says so.
        let after = rendered(|| {
            publish(&busy, &mut published);
            publish(&Snapshot::default(), &mut published);
        });
        for line in [
            "flotilla_leader_epoch 0",
            "flotilla_plans{state=\"running\",environment=\"production\"} 0",
            "flotilla_shard_agent_connected{shard=\"shard_0\"} 0",
            "flotilla_shard_agent_disconnected_seconds{shard=\"shard_1\"} 0",
            "flotilla_data_rows_done{shard=\"shard_0\"} 0",
            "flotilla_data_targets_waiting{shard=\"shard_0\",why=\"throttled\"} 0",
            "flotilla_steps_waiting_for_table_locks{shard=\"shard_0\"} 0",
        ] {
            assert!(after.lines().any(|l| l == line), "{line} not in:\n{after}");
        }
        assert!(!after.contains("plan=\""), "{after}");
    }

    #[test]
    fn the_scheduling_latency_has_buckets_below_a_millisecond() {
        let text = rendered(|| {
            scheduling_latency(Duration::from_micros(300));
            scheduling_latency(Duration::from_millis(20));
        });
        for line in [
            "flotilla_scheduling_latency_seconds_bucket{le=\"0.00025\"} 0",
            "flotilla_scheduling_latency_seconds_bucket{le=\"0.0005\"} 1",
            "flotilla_scheduling_latency_seconds_bucket{le=\"0.025\"} 2",
            "flotilla_scheduling_latency_seconds_count 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
    }

    #[test]
    fn step_outcomes_are_counted_by_shard_and_only_applied_steps_are_timed() {
        let text = rendered(|| {
            shard_known("shard_0");
            step_finished("shard_0", StepState::Applied, 1500);
            step_finished("shard_0", StepState::Failed, 10);
            step_outcome("shard_0", StepState::RolledBack);
        });
        for line in [
            "flotilla_steps_finished_total{shard=\"shard_0\",outcome=\"applied\"} 1",
            "flotilla_steps_finished_total{shard=\"shard_0\",outcome=\"failed\"} 1",
            "flotilla_steps_finished_total{shard=\"shard_0\",outcome=\"rolled_back\"} 1",
            "flotilla_steps_finished_total{shard=\"shard_0\",outcome=\"retried\"} 0",
            "flotilla_step_duration_seconds_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
    }
}
