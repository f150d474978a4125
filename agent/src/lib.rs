//! Flotilla's per-shard agent.
//!
//! One agent serves one shard database. It dials out to the coordinator (one bidirectional
//! `AgentService.Attach` stream), applies the steps it is assigned with their journal rows in
//! the same shard transaction, checks the shard-side fence in every change, and reports back.
//! `main` parses flags and calls [`start`]; tests and the embedded quickstart do the same.
//!
//! # Failpoints (feature `testing`)
//! Configured from the `FAILPOINTS` environment variable (`name=actions;name2=actions`, the
//! `fail` crate's syntax), read once when the first agent of the process starts:
//! - `agent::before_step_commit`: `return[(msg)]` fails the step before its COMMIT (the
//!   transaction rolls back); `sleep(ms)`/`pause`/`panic` as usual.
//! - `agent::after_step_commit_before_report`: `return` exits the process (code 86) right
//!   after a commit and before its result is reported, as a crash there would.
//! - `agent::after_prepare_before_report`: `return` exits the process (code 86) right after a
//!   run's PREPARE TRANSACTION and before its PREPARED result is reported: the prepared
//!   transaction is left in doubt for the restarted agent (`agent::before_step_commit` also
//!   fails a run before its PREPARE).
//! - `agent::before_rollback_step`: `return[(msg)]` fails the undo of a step.
//! - `agent::before_send_results`: `return` drops the coordinator stream before sending
//!   buffered results; they are sent after the next Hello.
//! - `agent::panic_at_start`: any action panics in `start` with the configuration (and the
//!   exposed password) in the message, for the test that no secret leaves through a panic.
// The agent's future (`start` holds the session, the runs and the sweeps, each an
// async state machine inside the next) is deeper than the compiler's default query depth
// when built without incremental caches (CI's clean build).
#![recursion_limit = "256"]
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_core::pb;
use sqlx::postgres::PgPool;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, instrument, warn};

mod config;
mod data;
mod error;
mod etcd;
pub mod metrics;
mod run;
mod session;
mod shard;
mod step;

pub use config::{AgentConfig, DEFAULT_DISCOVER_INTERVAL, redact_dsn};
pub use error::AgentError;
pub use run::rehearsal;

use crate::data::{ProgressBoard, ServerBuckets};
use crate::etcd::liveness;
use crate::run::two_phase::Decisions;
use crate::run::{Outgoing, Plan, RunClaims, ScanLog};
use crate::session::Rotation;
use crate::shard::TenantSource;
use crate::shard::lock as shard_lock;

/// How long in-flight runs get to finish once shutdown is asked for; after that they are
/// abandoned (their open transactions roll back on the shard).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the agent's tasks share.
pub(crate) struct Agent {
    pub config: AgentConfig,
    pub pool: PgPool,
    tenant_source: TenantSource,
    tenants: Mutex<Vec<pb::Tenant>>,
    pub plans: Mutex<HashMap<String, Arc<Plan>>>,
    /// One permit per shard connection that runs and undos may hold.
    pub slots: Arc<Semaphore>,
    /// The epoch of the coordinator that welcomed us last (the steps carry their own).
    pub welcome_epoch: AtomicU64,
    /// The newest epoch this agent has already written into the shard's fence.
    pub fence_advanced: AtomicU64,
    pub outbox: mpsc::UnboundedSender<Outgoing>,
    pub tasks: TaskTracker,
    /// Shutdown asked: take no new work.
    pub cancel: CancellationToken,
    /// Grace is over: abandon work in flight.
    pub abort: CancellationToken,
    /// True while the agent holds its shard's agent lock: only then may it apply or undo
    /// (see `shard_lock`).
    pub shard_lock: watch::Receiver<bool>,
    /// Reads plans' commit decisions from etcd (None without etcd).
    decisions: Option<Decisions>,
    /// The runs queued or running (see `run::job::RunClaims`).
    runs_in_flight: RunClaims,
    scan_log: Mutex<ScanLog>,
    /// Data changes' progress, sent with every heartbeat.
    pub progress: Arc<ProgressBoard>,
    /// Row budgets shared by the targets of a data step on this server.
    pub buckets: Arc<ServerBuckets>,
    /// Journal rows the coordinator's fleet view has not heard yet.
    pub journal_dirty: session::JournalDirty,
    /// Which database this is (`shard::database_identity`), said in every Hello.
    pub database: String,
    /// Prepared transactions committed from their decisions in etcd since the start, the
    /// latest first out (`pb::Hello::committed`).
    pub committed_from_etcd: Mutex<std::collections::VecDeque<String>>,
    /// Whether a coordinator has welcomed this agent before: the next welcome is a
    /// reconnection (`flotilla_agent_reconnects_total`).
    pub welcomed_before: std::sync::atomic::AtomicBool,
    /// The TLS its next connection to a coordinator is made with (read again at SIGHUP).
    pub client_tls: session::ClientTls,
}

/// Runs an agent until `shutdown` resolves: connects to the shard (waiting for it to come
/// up), takes the shard's agent lock (failing with [`AgentError::ShardTaken`] when another
/// agent serves the shard), installs the flotilla schema, publishes its liveness key in etcd
/// (when configured), then keeps a stream to the leading coordinator.
#[instrument(skip_all, fields(shard = %config.shard))]
pub async fn start(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    config.validate()?;
    metrics::describe();
    metrics::initialise();
    setup_failpoints();
    // A panic whose message holds the configuration: the canary test proves that neither
    // the configuration's Debug nor the binary's panic hook lets a password through.
    #[cfg(feature = "testing")]
    fail::fail_point!("agent::panic_at_start", |_| panic!(
        "failpoint agent::panic_at_start with {config:?} (password {:?})",
        config.password.as_ref().map(|p| p.expose())
    ));
    let addresses = config.coordinators();
    for address in &addresses {
        session::endpoint(&config.shard, address, config.tls.as_ref())?;
        if config.tls.is_some() && !flotilla_core::tls::is_https(address) {
            warn!(coordinator = %config::redact_dsn(address), "TLS files are given but this coordinator address is not https://: the connection is plaintext");
        } else if config.tls.is_none() && flotilla_core::tls::plaintext_off_host(address) {
            warn!(coordinator = %config::redact_dsn(address), "connecting to a coordinator off this machine in plaintext: give it TLS and use https://");
        }
    }
    if config.etcd_user.is_some()
        && let Some(warning) =
            flotilla_core::tls::etcd_password_in_plaintext(&config.etcd, config.etcd_tls.is_some())
    {
        warn!("{warning}");
    }
    let rotation = Rotation::new(addresses, config.tls.is_some());
    let cancel = CancellationToken::new();
    let watcher = cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown => watcher.cancel(),
            () = watcher.cancelled() => {}
        }
    });
    let result = run(config, rotation, cancel.clone()).await;
    cancel.cancel();
    result
}

async fn run(
    config: AgentConfig,
    rotation: Rotation,
    cancel: CancellationToken,
) -> Result<(), AgentError> {
    let Some(pool) = shard::connect(&config, &cancel).await? else {
        return Ok(());
    };
    // a DSN copied from another shard's agent is refused before it can take that shard's lock
    if let Err(e) = shard::check_claim(&pool, &config.shard).await {
        pool.close().await;
        return Err(e);
    }
    // before any work: one agent per shard (see `shard_lock` for why)
    let lock = match shard_lock::acquire(&config).await {
        Ok(conn) => conn,
        Err(e) => {
            pool.close().await;
            return Err(e);
        }
    };
    let stop_lock = CancellationToken::new();
    let (held, guard) = shard_lock::guard(&config, lock, stop_lock.clone())?;
    let result = serve(config, pool, held, rotation, cancel).await;
    // released last, once nothing of this agent runs on the shard any more
    stop_lock.cancel();
    // Err only if the guard task panicked: the lock's session is gone with it either way
    let _ = guard.await;
    result
}

async fn serve(
    config: AgentConfig,
    pool: PgPool,
    shard_lock: watch::Receiver<bool>,
    rotation: Rotation,
    cancel: CancellationToken,
) -> Result<(), AgentError> {
    // The tenants first: a tenant query that fails (a typo, a missing table) stops the agent
    // before it writes anything to the shard (its schema, and which shard the database is).
    let tenant_source = TenantSource::from_config(&config);
    let mut tenants = match shard::discover_tenants(&pool, &config.shard, &tenant_source).await {
        Ok(tenants) => tenants,
        Err(error) => {
            pool.close().await;
            // The operator's query refused by the server for what it says (a syntax error, a
            // table or column that is not there, class 42; a value that does not convert,
            // class 22): bad input, which restarting will not mend (exit 2, not 3).
            let class = error
                .as_database_error()
                .and_then(|e| e.code())
                .map(|c| c.chars().take(2).collect::<String>());
            if matches!(tenant_source, TenantSource::Query(_))
                && matches!(class.as_deref(), Some("42" | "22"))
            {
                return Err(AgentError::Config {
                    shard: config.shard.clone(),
                    reason: format!("--tenant-query: {}", error::sql_error_text(&error, None)),
                });
            }
            return Err(AgentError::Shard {
                shard: config.shard.clone(),
                what: "discovering tenants",
                error,
            });
        }
    };
    if let Err(e) = shard::install_schema(&pool, &config.shard).await {
        pool.close().await;
        return Err(e);
    }
    record_tenant_schemas(&pool, &config.shard, &mut tenants).await;
    warn_left_out(&pool, &tenants).await;
    match shard::is_superuser(&pool).await {
        Ok((role, true)) => warn!(
            %role,
            "the agent connects to its shard as a superuser: it needs far less (ownership of \
             the tenant schemas and of schema flotilla); see deploy/sql/agent-role.sql"
        ),
        Ok((_, false)) => {}
        Err(error) => {
            warn!(error = %crate::error::Shown(&error), "cannot read whether the agent's role is a superuser")
        }
    }
    let database = shard::database_identity(&pool).await;
    info!(tenants = tenants.len(), dsn = %config.redacted_dsn(), %database, "agent ready");
    let stop_liveness = CancellationToken::new();
    let liveness = liveness::spawn(&config, stop_liveness.clone());
    let stop_census = CancellationToken::new();
    let census = tokio::spawn(run::two_phase::census(pool.clone(), stop_census.clone()));
    let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
    let decisions = Decisions::from_config(&config);
    let client_tls =
        session::ClientTls::new(&config.shard, config.tls_files.clone(), config.tls.clone());
    let stop_reloads = CancellationToken::new();
    tokio::spawn(
        client_tls
            .clone()
            .follow(config.reload.clone(), stop_reloads.clone()),
    );
    let agent = Arc::new(Agent {
        slots: Arc::new(Semaphore::new(config.max_connections as usize)),
        config,
        pool: pool.clone(),
        tenant_source,
        tenants: Mutex::new(tenants),
        plans: Mutex::new(HashMap::new()),
        welcome_epoch: AtomicU64::new(0),
        fence_advanced: AtomicU64::new(0),
        outbox: outbox_tx,
        tasks: TaskTracker::new(),
        cancel: cancel.clone(),
        abort: CancellationToken::new(),
        shard_lock,
        decisions,
        runs_in_flight: RunClaims::default(),
        scan_log: Mutex::new(ScanLog::default()),
        progress: Arc::default(),
        buckets: Arc::default(),
        journal_dirty: session::JournalDirty::default(),
        database,
        committed_from_etcd: Mutex::default(),
        welcomed_before: std::sync::atomic::AtomicBool::new(false),
        client_tls,
    });
    let sweep = tokio::spawn(agent.clone().sweep_in_doubt());
    session::run(agent.clone(), session::Outbox::new(outbox_rx), rotation).await;
    info!("agent stopping");
    metrics::coordinator_connected(false);
    agent.tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, agent.tasks.wait())
        .await
        .is_err()
    {
        warn!("work still running after the grace period; abandoning it");
        agent.abort.cancel();
        // whatever still runs now ends with the pool (its open transactions roll back)
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, agent.tasks.wait()).await;
    }
    stop_census.cancel();
    stop_reloads.cancel();
    // Err only if the task panicked: nothing of it needs cleaning up (the sweep ends with
    // the agent's cancel, which ended the session)
    let _ = census.await;
    let _ = sweep.await;
    pool.close().await;
    stop_liveness.cancel();
    if let Some(liveness) = liveness {
        // Err only if the task panicked: its lease then expires with its TTL
        let _ = liveness.await;
    }
    Ok(())
}

/// Says, at the agent's start, which tenants with Flotilla history are on the shard but not
/// taken by its `--tenant-pattern` (or `--tenant-query`): an agent restarted with a
/// narrower pattern left them out of every plan, and the fleet's status called them gone,
/// with no word in its log.
async fn warn_left_out(pool: &PgPool, tenants: &[pb::Tenant]) {
    let names: Vec<String> = tenants.iter().map(|t| t.name.clone()).collect();
    let found: Result<Vec<String>, sqlx::Error> = sqlx::query_scalar(
        "SELECT DISTINCT j.target FROM flotilla.journal j \
           JOIN pg_catalog.pg_namespace n ON n.nspname = j.target \
          WHERE j.target <> '' AND NOT (j.target = ANY ($1)) ORDER BY 1",
    )
    .bind(&names)
    .fetch_all(pool)
    .await;
    match found {
        Ok(left) if !left.is_empty() => warn!(
            "{} tenant(s) with Flotilla history are on this shard but not taken by its \
             --tenant-pattern (or --tenant-query), their schemas here: plans leave them out \
             and the fleet's status calls them gone (was the pattern narrowed?): {}",
            left.len(),
            {
                // quoted: a schema name may hold anything
                let shown: Vec<String> = left.iter().take(5).map(|t| format!("{t:?}")).collect();
                let more = left.len().saturating_sub(5);
                if more > 0 {
                    format!("{} and {more} more", shown.join(", "))
                } else {
                    shown.join(", ")
                }
            }
        ),
        Ok(_) => {}
        Err(error) => {
            warn!(error = %crate::error::Shown(&error), "reading the tenants left out of the pattern failed")
        }
    }
}

/// Records the schemas of the tenants found, and marks (for the leader's `fleet status`)
/// and says in the log which changed since their journal rows were written (see
/// `shard::changed_schema`). A failure is logged: runs and preflights look again.
async fn record_tenant_schemas(pool: &PgPool, shard_name: &str, tenants: &mut [pb::Tenant]) {
    let names: Vec<String> = tenants.iter().map(|t| t.name.clone()).collect();
    match shard::changed_schemas(pool, &names).await {
        Ok(changed) => {
            // a tenant renamed from another is set apart the same way (what is applied
            // there is in the other name's rows)
            let renamed = shard::renamed_tenants(pool, &names)
                .await
                .unwrap_or_else(|error| {
                    warn!(error = %crate::error::Shown(&error), "reading which tenants were renamed failed");
                    Vec::new()
                });
            for tenant in tenants.iter_mut() {
                let from = renamed.iter().find(|(t, _)| *t == tenant.name);
                tenant.schema_changed = changed.contains(&tenant.name) || from.is_some();
                tenant.renamed_from = from.map(|(_, f)| f.clone()).unwrap_or_default();
            }
            // (a tenant holding another's schema is said as that, not as a changed one)
            for tenant in changed
                .iter()
                .filter(|c| !renamed.iter().any(|(t, _)| t == *c))
            {
                warn!("{}", shard::changed_schema(shard_name, tenant));
            }
            for (tenant, before) in renamed {
                warn!("{}", shard::renamed_tenant(shard_name, &tenant, &before));
            }
        }
        Err(error) => {
            warn!(error = %crate::error::Shown(&error), "recording the tenants' schemas failed")
        }
    }
}

impl Agent {
    /// Rediscovers the shard's tenants, keeping the last list if the shard cannot be read.
    pub(crate) async fn refresh_tenants(&self) -> Result<Vec<pb::Tenant>, sqlx::Error> {
        match shard::discover_tenants(&self.pool, &self.config.shard, &self.tenant_source).await {
            Ok(mut tenants) => {
                record_tenant_schemas(&self.pool, &self.config.shard, &mut tenants).await;
                *self.tenants.lock().expect("tenants lock") = tenants.clone();
                Ok(tenants)
            }
            Err(error) => {
                warn!(shard = %self.config.shard, error = %crate::error::Shown(&error), "tenant discovery failed; keeping the last list");
                Err(error)
            }
        }
    }

    pub(crate) fn known_tenants(&self) -> Vec<pb::Tenant> {
        self.tenants.lock().expect("tenants lock").clone()
    }

    /// Waits until the agent holds its shard's lock (at once, almost always). False when the
    /// agent stops first.
    pub(crate) async fn may_apply(&self) -> bool {
        let mut held = self.shard_lock.clone();
        if *held.borrow_and_update() {
            return true;
        }
        info!("waiting for the shard's agent lock before applying");
        tokio::select! {
            r = held.wait_for(|h| *h) => r.is_ok(),
            () = self.cancel.cancelled() => false,
        }
    }
}

/// Reads `FAILPOINTS` once per process (feature `testing` only).
fn setup_failpoints() {
    #[cfg(feature = "testing")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let Ok(spec) = std::env::var("FAILPOINTS") else { return };
            for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                let Some((name, actions)) = item.split_once('=') else {
                    warn!(failpoint = %item, "ignoring a failpoint without `=actions`");
                    continue;
                };
                match fail::cfg(name.trim(), actions.trim()) {
                    Ok(()) => info!(failpoint = %name.trim(), actions = %actions.trim(), "failpoint armed"),
                    Err(error) => warn!(failpoint = %name.trim(), %error, "ignoring an invalid failpoint"),
                }
            }
        });
    }
}
