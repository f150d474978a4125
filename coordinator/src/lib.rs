//! Flotilla's coordinator: holds coordinated-migration plans, expands them over
//! the fleet into steps (migration x target), hands steps to agents in batches,
//! and decides what happens on failure (all-or-nothing by default).
//!
//! `start(config, shutdown)` runs it; `main` and the embedded quickstart call the
//! same function.
//!
//! - [`api`]: the gRPC layer (convert, call, map the error);
//! - [`admission`]: validation and preflight of a submitted plan; [`recovery`]: rebuilding
//!   and continuing unfinished plans; [`service`]: the rest of the domain API;
//!   [`sessions`]: agents' streams;
//! - [`engine`]: the one task that owns plans in motion; [`plan`]: their pure state;
//! - [`store`]: the control store; [`coordination`]: etcd (or the embedded backend).
//! - [`approvals`]: the approval matrix a plan waits on before it starts.
//! - [`environments`]: the environments plans are promoted through, and their shards.
//! - [`auth`]: operator identities, roles and the role each operator RPC needs.
//! - [`shutdown`]: stopping within a bound, leadership and agents handed over.
pub mod actor;
mod admission;
mod api;
pub mod approvals;
pub mod auth;
pub mod coordination;
pub mod engine;
mod env_status;
pub mod environments;
pub mod error;
mod explain;
pub mod identity;
pub mod metrics;
pub mod plan;
pub mod planner;
mod recovery;
mod retry;
pub mod service;
pub mod sessions;
pub mod shutdown;
pub mod store;
pub mod tls;
pub mod versions;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::pb;
use flotilla_core::secrets::SecretUrl;
use flotilla_core::tls::{Credentials, TlsFiles};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{error, info, warn};

use coordination::{Coordination, EmbeddedCoordination, EtcdCoordination, Leadership};
pub use error::CoordinatorError;
pub use service::Coordinator;

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Where the gRPC API (operators and agents) listens.
    pub listen: SocketAddr,
    /// The control store: a SQLite file path or `sqlite://` URL, or a postgres:// URL (its
    /// password, if any, shows redacted).
    pub store: SecretUrl,
    /// Where `/metrics` is served, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Where the health service alone is served in plaintext, if anywhere: probes that
    /// present no client certificate reach it while `listen` requires one.
    pub health_listen: Option<SocketAddr>,
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    pub preflight_timeout: Duration,
    /// etcd endpoints; empty = the embedded coordination backend (one coordinator).
    pub etcd: Vec<String>,
    /// The address operators and agents reach this coordinator at (told to them by
    /// followers); default http://<listen>.
    pub advertise: Option<String>,
    /// TTL of the leadership lease and of plan leases.
    pub lease_ttl: Duration,
    /// How long an agent may be gone (no stream, no liveness key) before its
    /// runs in flight fail under the plan's policy.
    pub agent_grace: Duration,
    /// Key prefix in etcd.
    pub etcd_prefix: String,
    /// Environments whose completed plans catch new tenants up ("*" = every one).
    pub catch_up_environments: Vec<String>,
    /// Once asked to stop, how long the coordinator may take to hand leadership
    /// over and let its streams end before it stops anyway.
    pub shutdown_grace: Duration,
    /// Per environment and risk, the approvals a plan needs before it starts.
    pub approvals: approvals::Matrix,
    /// The environments plans are promoted through, and the shard label naming each
    /// shard's (empty: none; a plan's environment is a name only).
    pub environments: environments::Environments,
    /// When operators must authenticate: once the store holds an operator (`Auto`), or
    /// always (`Required`).
    pub auth: auth::AuthMode,
    /// TLS on the listener (`--tls-cert`, `--tls-key`); with `--tls-ca`, client
    /// certificates signed by it are required (mTLS) and agents' must name their shard.
    pub tls: TlsFiles,
    /// Certificate common name to shard, for agent certificates without a
    /// `flotilla-agent:<shard>` URI SAN (`--agent-identities`).
    pub agent_identities: std::collections::BTreeMap<String, String>,
    /// Serve plaintext on a non-loopback address (refused without it).
    pub insecure: bool,
    /// etcd over TLS (`--etcd-ca`, `--etcd-cert`, `--etcd-key`).
    pub etcd_tls: TlsFiles,
    /// etcd user and password (`--etcd-user`, `--etcd-password-file`).
    pub etcd_user: Option<Credentials>,
    /// When to read the TLS files again (`flotilla coordinator`: at each SIGHUP).
    pub reload: flotilla_core::reload::ReloadRequests,
}

impl CoordinatorConfig {
    pub fn new(listen: SocketAddr, store: impl Into<SecretUrl>) -> CoordinatorConfig {
        CoordinatorConfig {
            listen,
            store: store.into(),
            metrics: None,
            health_listen: None,
            lock_timeout: Duration::from_secs(10),
            statement_timeout: Duration::ZERO,
            preflight_timeout: Duration::from_secs(30),
            etcd: Vec::new(),
            advertise: None,
            lease_ttl: Duration::from_secs(10),
            agent_grace: Duration::from_secs(30),
            etcd_prefix: coordination::keys::DEFAULT_PREFIX.to_string(),
            catch_up_environments: Vec::new(),
            shutdown_grace: Duration::from_secs(10),
            approvals: approvals::Matrix::default(),
            environments: environments::Environments::default(),
            auth: auth::AuthMode::Auto,
            tls: TlsFiles::new("tls", None, None, None),
            agent_identities: Default::default(),
            insecure: false,
            etcd_tls: TlsFiles::new("etcd", None, None, None),
            etcd_user: None,
            reload: flotilla_core::reload::ReloadRequests::never(),
        }
    }
}

/// Acts on leadership changes: a leader rebuilds every unfinished plan from the
/// store and continues it; a follower stops at once and lets its agents go.
async fn follow_leadership(coordinator: Coordinator) {
    let mut rx = coordinator.inner.coordination.leadership();
    // The term this process leads, as last seen here.
    let mut leading: Option<u64> = None;
    loop {
        let now = rx.borrow_and_update().clone();
        match now {
            Leadership::Leader { epoch } => {
                if leading.is_some_and(|e| e != epoch) {
                    // Lost and won again while this loop was busy (the watch keeps only
                    // the latest): the last term ends as a loss does, so the agents attach
                    // again with a Hello of now (their in-doubt transactions) and hear the
                    // new term's plans from the start.
                    info!(
                        from = leading,
                        to = epoch,
                        "a new term without a follower's between"
                    );
                    coordinator.event(engine::Event::Follow).await;
                    coordinator.inner.fleet.detach_all();
                }
                leading = Some(epoch);
                metrics::leader(true);
                // A store last led from another epoch space (the backend changed) would
                // refuse this term's writes until `resume_unfinished` fences it: taken over
                // first. A failure here is not fatal: that fence is retried below.
                let space = coordinator.inner.coordination.epoch_space();
                if let Err(e) = coordinator
                    .inner
                    .store
                    .fence_another_space(&space, epoch)
                    .await
                {
                    warn!("cannot check the control store's fence yet: {e}");
                }
                coordinator.event(engine::Event::Lead { epoch }).await;
                // A plan left unfinished must not stay orphaned because etcd or the
                // store failed once (e.g. an etcd member died as we took over): retried
                // while this term lasts. Plans already continued are skipped.
                let mut attempt = 0u32;
                let mut changed_meanwhile = false;
                loop {
                    match coordinator.resume_unfinished().await {
                        Ok(0) => break,
                        Ok(n) => {
                            info!(plans = n, epoch, "continuing plans left unfinished");
                            break;
                        }
                        Err(e) => {
                            let pause = Duration::from_millis(250 << attempt.min(4));
                            attempt += 1;
                            error!(
                                "cannot continue unfinished plans yet (retrying in {pause:?}): {e}"
                            );
                            tokio::select! {
                                () = tokio::time::sleep(pause) => {}
                                changed = rx.changed() => {
                                    if changed.is_err() {
                                        return;
                                    }
                                    changed_meanwhile = true;
                                    break;
                                }
                            }
                        }
                    }
                }
                if changed_meanwhile {
                    continue;
                }
            }
            Leadership::Follower { leader } => {
                leading = None;
                metrics::leader(false);
                coordinator.event(engine::Event::Follow).await;
                coordinator.inner.fleet.detach_all();
                info!(leader = leader.as_deref().unwrap_or("unknown"), "following");
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn forward_liveness(
    mut rx: tokio::sync::watch::Receiver<std::collections::BTreeSet<String>>,
    events: mpsc::Sender<engine::Event>,
) {
    loop {
        let live = rx.borrow_and_update().clone();
        if events.send(engine::Event::LiveAgents(live)).await.is_err() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Runs the coordinator until `shutdown` resolves, then stops within
/// `config.shutdown_grace`: leadership released at once (a follower leads without
/// waiting out the lease), agents let go (they find the new leader), watches
/// ended, the server drained; whatever is still open then is logged and dropped.
/// `ready` (if given) receives the address it listens on once it accepts connections.
pub async fn start(
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: Option<oneshot::Sender<SocketAddr>>,
) -> Result<(), CoordinatorError> {
    setup_failpoints();
    // Transport security first: a wrong file or an exposed plaintext listener stops the
    // start before anything is opened.
    let server_tls = tls::ServerTls::load(&config.tls)?;
    if server_tls.is_none() {
        if !config.listen.ip().is_loopback() && !config.insecure {
            return Err(CoordinatorError::Tls(format!(
                "listening on {} in plaintext: give --tls-cert and --tls-key (and --tls-ca for client certificates), or say --insecure",
                config.listen
            )));
        }
        warn!(listen = %config.listen, "serving gRPC in plaintext, without TLS: for development on this machine only");
    }
    // TLS without client certificates encrypts, and authenticates nobody: an agent is then
    // whichever shard it says it is (operators still need their tokens, once any exist).
    if server_tls.as_ref().is_some_and(|t| !t.client_auth) && !config.listen.ip().is_loopback() {
        warn!(listen = %config.listen, "serving TLS without --tls-ca: clients present no certificate, so any agent that reaches this port can attach as any shard (and, with no operator in the store, anyone can act); give --tls-ca for mTLS");
    }
    let etcd_tls = config
        .etcd_tls
        .client_config()
        .map_err(|e| CoordinatorError::Tls(e.to_string()))?;
    if config.etcd_user.is_some()
        && let Some(warning) =
            flotilla_core::tls::etcd_password_in_plaintext(&config.etcd, etcd_tls.is_some())
    {
        warn!("{warning}");
    }
    metrics::install(config.metrics).map_err(|e| CoordinatorError::Listen {
        addr: config.metrics.map(|a| a.to_string()).unwrap_or_default(),
        reason: format!("cannot serve metrics: {e}"),
    })?;
    metrics::initialise(config.agent_grace);
    metrics::initialise_environments(&config.environments.order);
    if let Some(server_tls) = &server_tls {
        let certificate = server_tls.certificate();
        metrics::tls_certificate_expiry(certificate.not_after);
        info!(subject = %certificate.subject, not_after = %certificate.not_after_shown(), file = %certificate.file, "serving TLS with the certificate {} (valid until {}); SIGHUP reads the TLS files again", certificate.subject, certificate.not_after_shown());
        tls::follow(server_tls.clone(), config.reload.clone());
    } else {
        // (said, so that a SIGHUP is seen to have been taken, and to have ended nothing)
        let mut reloads = config.reload.clone();
        tokio::spawn(async move {
            loop {
                reloads.next().await;
                info!("reload requested: no TLS files to read again (plaintext)");
            }
        });
    }
    // (its tables upgraded once it is ours: see `Store::connect`)
    let store = store::Store::connect(&config.store).await?;
    let advertise = config.advertise.clone().unwrap_or_else(|| {
        let scheme = if server_tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", config.listen)
    });
    // (a bare HOST:PORT is read as https:// by clients with TLS files)
    if server_tls.is_some()
        && advertise.contains("://")
        && !flotilla_core::tls::is_https(&advertise)
    {
        warn!(%advertise, "serving TLS but advertising a non-https:// address: agents and operators with TLS files refuse a follower's redirect to it (they would go in plaintext), so they reach this coordinator, while it leads, only by its address in their own --coordinator list; advertise its https:// address");
    }
    let mut sole_claim = None;
    let (coordination, embedded): (Arc<dyn Coordination>, Option<Arc<EmbeddedCoordination>>) =
        if config.etcd.is_empty() {
            // held for the process's life (a second coordinator without etcd is refused)
            sole_claim = Some(store.claim_sole().await?);
            store.migrate().await?;
            let epoch = store.next_epoch().await?;
            info!(
                epoch,
                store = %config.store,
                "coordination backend: embedded (in-process, single coordinator; no etcd)"
            );
            let e = Arc::new(EmbeddedCoordination::new(epoch).with_store(store.clone()));
            (e.clone(), Some(e))
        } else {
            store.migrate().await?;
            let store_id = store.identity().await?;
            let e = EtcdCoordination::connect_secured(
                config.etcd.clone(),
                advertise.clone(),
                config.lease_ttl,
                config.etcd_prefix.clone(),
                etcd_tls,
                config.etcd_user.clone(),
                Some(&store_id),
            )
            .await?;
            let shown: Vec<String> = config
                .etcd
                .iter()
                .map(|e| flotilla_core::secrets::redact_url(e))
                .collect();
            info!(endpoints = %shown.join(","), advertise = %advertise, "coordination backend: etcd");
            (Arc::new(e), None)
        };
    let (writes, writes_rx) = mpsc::unbounded_channel();
    tokio::spawn(store::run_writer(
        store.clone(),
        writes_rx,
        Some(coordination.leadership()),
        coordination.epoch_space(),
    ));
    let (changes, _) = broadcast::channel(1024);
    let (events, events_rx) = mpsc::channel(4096);
    let fleet = Arc::new(sessions::registry::Fleet::default());
    let lock_queue = coordination::LockQueue::default();
    let engine = engine::Engine::new(
        coordination.clone(),
        config.agent_grace,
        writes.clone(),
        changes.clone(),
        fleet.clone(),
        events.clone(),
        lock_queue.clone(),
    );
    tokio::spawn(engine.run(events_rx));
    let coordinator = Coordinator {
        inner: Arc::new(service::Inner {
            store,
            fleet,
            versions: Default::default(),
            events: events.clone(),
            writes,
            changes,
            coordination: coordination.clone(),
            embedded,
            defaults: service::Defaults {
                lock_timeout: config.lock_timeout,
                statement_timeout: config.statement_timeout,
                preflight_timeout: config.preflight_timeout,
                catch_up_environments: config.catch_up_environments.clone(),
            },
            shutdown: Arc::default(),
            approvals: config.approvals.clone(),
            environments: config.environments.clone(),
            approving: tokio::sync::Mutex::new(()),
            submitting: Default::default(),
            auth: config.auth,
            auth_seen: Default::default(),
            auth_off_seen: Default::default(),
            refusals_seen: Default::default(),
            catch_up_deferred: Default::default(),
            spec_cache: Default::default(),
            lock_queue,
            reviving: Default::default(),
            agent_identities: identity::AgentIdentities {
                required: server_tls.as_ref().is_some_and(|t| t.client_auth),
                by_common_name: config.agent_identities.clone(),
            },
        }),
    };
    // `fleet status`'s "failed last" outlives a restart (the agents report journals, not
    // failures)
    match coordinator.inner.store.last_failures().await {
        Ok(found) => coordinator.inner.versions.restore_failures(found),
        Err(e) => warn!("reading the targets' last failures from the control store: {e}"),
    }
    match coordinator.auth_on().await {
        Ok(true) => {
            info!("operators authenticate (bearer tokens of the control store's operators)")
        }
        // Under mTLS "anyone" is narrower, and still wide: every certificate the CA signed
        // (an agent's excepted, refused on the operator API), not only the operators'.
        Ok(false) if server_tls.as_ref().is_some_and(|t| t.client_auth) => warn!(
            "operator authentication is off: any holder of a client certificate from the --tls-ca CA (agents' excepted) can submit, cancel and break locks; add the first admin with `flotilla operator add NAME --role admin --store ...` (or start with --auth required)"
        ),
        Ok(false) => warn!(
            "operator authentication is off: anyone who reaches this port can submit, cancel and break locks; add the first admin with `flotilla operator add NAME --role admin --store ...` (or start with --auth required)"
        ),
        Err(e) => return Err(e),
    }
    tokio::spawn(follow_leadership(coordinator.clone()));
    tokio::spawn(coordinator.clone().catch_up_at_each_completion());
    tokio::spawn(forward_liveness(coordination.live_agents(), events.clone()));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if events.send(engine::Event::Tick).await.is_err() {
                return;
            }
        }
    });

    // Health turns NOT_SERVING first (load balancers stop sending), then the hand-over
    // below ends the streams.
    let store_up = watch_store(coordinator.inner.store.clone());
    let (health, shutdown) = api::health_service(
        coordination.leadership(),
        store_up,
        server_tls.clone(),
        shutdown,
    )
    .await;
    let (reflection_v1, reflection_v1alpha) =
        api::reflection_services().map_err(|e| CoordinatorError::Listen {
            addr: config.listen.to_string(),
            reason: format!("cannot build the reflection service: {e}"),
        })?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| CoordinatorError::Listen {
            addr: config.listen.to_string(),
            reason: e.to_string(),
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| CoordinatorError::Listen {
            addr: config.listen.to_string(),
            reason: e.to_string(),
        })?;
    info!(%addr, tls = server_tls.is_some(), mtls = server_tls.as_ref().is_some_and(|t| t.client_auth), "coordinator listening");
    // The health service alone, in plaintext, for probes without a certificate: it
    // says SERVING or NOT_SERVING and nothing else, so it needs no TLS; it stops with
    // the process (its statuses turn NOT_SERVING first, with the main listener's).
    let _health_only = match config.health_listen {
        Some(at) => Some(serve_health_only(at, health.clone()).await?),
        None => None,
    };
    if let Some(ready) = ready {
        // the caller may have stopped waiting; the coordinator serves regardless
        let _ = ready.send(addr);
    }
    let listen_error = |e: tonic::transport::Error| CoordinatorError::Listen {
        addr: addr.to_string(),
        reason: e.to_string(),
    };
    let (stop_serving, serving_stopped) = oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .add_service(api::Authenticated::new(
            pb::operator_service_server::OperatorServiceServer::new(coordinator.clone())
                .max_decoding_message_size(flotilla_core::protocol::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(flotilla_core::protocol::MAX_MESSAGE_BYTES),
            coordinator.clone(),
        ))
        .add_service(
            pb::agent_service_server::AgentServiceServer::new(coordinator.clone())
                .max_decoding_message_size(flotilla_core::protocol::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(flotilla_core::protocol::MAX_MESSAGE_BYTES),
        )
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let stopped = async {
        let _ = serving_stopped.await;
    };
    type Serving =
        std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;
    let mut server: Serving = match server_tls {
        Some(server_tls) => {
            let auditor = coordinator.clone();
            let incoming = tls::incoming(listener, server_tls, move |peer, reason| {
                auditor.audit_tls_refusal(peer, reason);
            });
            Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
        }
        // TCP_NODELAY, as the TLS path sets it and gRPC's own implementations do (tonic's
        // setting applies only to listeners it binds itself): with Nagle's algorithm a
        // small message written while the peer has not acknowledged the previous one
        // waits for that ACK, which a delayed ACK may hold back for up to 40 ms.
        None => Box::pin(router.serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            stopped,
        )),
    };
    tokio::select! {
        served = &mut server => return served.map_err(listen_error),
        () = shutdown => {}
    }

    // tonic's graceful shutdown waits for every stream: agents' and watches' are
    // ended first (see `shutdown`), and the whole is bounded.
    let grace = config.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    info!(
        ?grace,
        "stopping: handing leadership over and ending streams"
    );
    if tokio::time::timeout_at(deadline, coordinator.hand_over(grace / 2))
        .await
        .is_err()
    {
        warn!(
            ?grace,
            "leadership not handed over in time; stopping anyway (another coordinator leads once the lease expires)"
        );
    }
    let _ = stop_serving.send(());
    match tokio::time::timeout_at(deadline, &mut server).await {
        Ok(served) => {
            served.map_err(listen_error)?;
            info!("coordinator stopped");
        }
        Err(_) => {
            let open = coordinator.inner.shutdown.still_open();
            warn!(
                ?grace,
                still_open = ?open,
                "graceful shutdown did not finish in time; stopping anyway"
            );
        }
    }
    // the store's claim goes last: the next coordinator on it may start now
    drop(sole_claim);
    Ok(())
}

/// Stops the task serving a listener when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `health` alone on `at`, in plaintext, until the returned guard is dropped.
async fn serve_health_only<T: tonic_health::pb::health_server::Health>(
    at: SocketAddr,
    health: tonic_health::pb::health_server::HealthServer<T>,
) -> Result<AbortOnDrop, CoordinatorError> {
    let listen_error = |e: String| CoordinatorError::Listen {
        addr: format!("--health-listen {at}"),
        reason: e,
    };
    let listener = tokio::net::TcpListener::bind(at)
        .await
        .map_err(|e| listen_error(e.to_string()))?;
    let bound = listener
        .local_addr()
        .map_err(|e| listen_error(e.to_string()))?;
    info!(addr = %bound, "health service listening (plaintext, health only)");
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    Ok(AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = server.await {
            warn!(error = %e, "the health-only listener stopped");
        }
    })))
}

/// Arms the failpoints named in `FAILPOINTS` (`name=action;...`), once per
/// process, in builds with the `testing` feature; the agent reads the same
/// variable, so one process running both (quickstart) arms each once.
fn setup_failpoints() {
    #[cfg(feature = "testing")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let Ok(spec) = std::env::var("FAILPOINTS") else {
                return;
            };
            for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                if let Some((name, actions)) = item.split_once('=')
                    && let Err(e) = fail::cfg(name.trim(), actions.trim())
                {
                    tracing::warn!(failpoint = %name.trim(), "ignoring an invalid failpoint: {e}");
                }
            }
        });
    }
}

/// How often the control store is probed, and how long a probe may take.
const STORE_PROBE_EVERY: Duration = Duration::from_secs(5);
const STORE_PROBE_WITHIN: Duration = Duration::from_secs(3);

/// Probes the control store every few seconds: whether it answers, for health (leader-only
/// services NOT_SERVING while it does not), `flotilla_control_store_up`, and one log line
/// naming the store and why at each change. Before, a store out of reach showed nowhere
/// (health SERVING, no metric moving on an idle leader) and each request waited 30 s for
/// "pool timed out".
fn watch_store(store: store::Store) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(true);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(STORE_PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Down after two probes in a row fail (one slow answer is not an outage), up at the
        // first that answers.
        let mut failed_before = false;
        loop {
            tick.tick().await;
            let probed = store.probe(STORE_PROBE_WITHIN).await;
            let up = probed.is_ok() || !std::mem::replace(&mut failed_before, probed.is_err());
            if up != *tx.borrow() {
                match &probed {
                    Err(cause) => {
                        tracing::error!(store = %store.location(), %cause, "the control store does not answer: this coordinator cannot store plans, steps or audit entries until it does")
                    }
                    Ok(()) => info!(store = %store.location(), "the control store answers again"),
                }
            }
            metrics::control_store_up(up);
            if tx.is_closed() {
                return;
            }
            tx.send_if_modified(|was| std::mem::replace(was, up) != up);
        }
    });
    rx
}
