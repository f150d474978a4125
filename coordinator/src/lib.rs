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
//! - [`shutdown`]: stopping within a bound, leadership and agents handed over.
pub mod actor;
mod admission;
mod api;
pub mod approvals;
pub mod coordination;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod plan;
pub mod planner;
mod recovery;
mod retry;
pub mod service;
pub mod sessions;
pub mod shutdown;
pub mod store;
pub mod versions;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::pb;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{error, info, warn};

use coordination::{Coordination, EmbeddedCoordination, EtcdCoordination, Leadership};
pub use error::CoordinatorError;
pub use service::Coordinator;

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Where the gRPC API (operators and agents) listens.
    pub listen: SocketAddr,
    /// The control store: a SQLite file path, or a postgres:// URL.
    pub store: String,
    /// Where `/metrics` is served, if anywhere.
    pub metrics: Option<SocketAddr>,
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
}

impl CoordinatorConfig {
    pub fn new(listen: SocketAddr, store: impl Into<String>) -> CoordinatorConfig {
        CoordinatorConfig {
            listen,
            store: store.into(),
            metrics: None,
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
        }
    }
}

/// Acts on leadership changes: a leader rebuilds every unfinished plan from the
/// store and continues it; a follower stops at once and lets its agents go.
async fn follow_leadership(coordinator: Coordinator) {
    let mut rx = coordinator.inner.coordination.leadership();
    loop {
        let now = rx.borrow_and_update().clone();
        match now {
            Leadership::Leader { epoch } => {
                metrics::leader(true);
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
    metrics::install(config.metrics).map_err(|e| CoordinatorError::Listen {
        addr: config.metrics.map(|a| a.to_string()).unwrap_or_default(),
        reason: format!("cannot serve metrics: {e}"),
    })?;
    metrics::initialise(config.agent_grace);
    let store = store::Store::open(&config.store).await?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{}", config.listen));
    let (coordination, embedded): (Arc<dyn Coordination>, Option<Arc<EmbeddedCoordination>>) =
        if config.etcd.is_empty() {
            let epoch = store.next_epoch().await?;
            info!(
                epoch,
                store = %flotilla_core::secrets::redact_url(&config.store),
                "coordination backend: embedded (in-process, single coordinator; no etcd)"
            );
            let e = Arc::new(EmbeddedCoordination::new(epoch));
            (e.clone(), Some(e))
        } else {
            let e = EtcdCoordination::connect(
                config.etcd.clone(),
                advertise.clone(),
                config.lease_ttl,
                config.etcd_prefix.clone(),
            )
            .await?;
            info!(endpoints = %config.etcd.join(","), advertise = %advertise, "coordination backend: etcd");
            (Arc::new(e), None)
        };
    let (writes, writes_rx) = mpsc::unbounded_channel();
    tokio::spawn(store::run_writer(store.clone(), writes_rx));
    let (changes, _) = broadcast::channel(1024);
    let (events, events_rx) = mpsc::channel(4096);
    let fleet = Arc::new(sessions::registry::Fleet::default());
    let engine = engine::Engine::new(
        coordination.clone(),
        config.agent_grace,
        writes.clone(),
        changes.clone(),
        fleet.clone(),
        events.clone(),
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
            approving: tokio::sync::Mutex::new(()),
        }),
    };
    tokio::spawn(follow_leadership(coordinator.clone()));
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
    let (health, shutdown) = api::health_service(coordination.leadership(), shutdown).await;
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
    info!(%addr, "coordinator listening");
    if let Some(ready) = ready {
        // the caller may have stopped waiting; the coordinator serves regardless
        let _ = ready.send(addr);
    }
    let listen_error = |e: tonic::transport::Error| CoordinatorError::Listen {
        addr: addr.to_string(),
        reason: e.to_string(),
    };
    let (stop_serving, serving_stopped) = oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(pb::operator_service_server::OperatorServiceServer::new(
            coordinator.clone(),
        ))
        .add_service(pb::agent_service_server::AgentServiceServer::new(
            coordinator.clone(),
        ))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = serving_stopped.await;
            },
        );
    let mut server = std::pin::pin!(server);
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
    Ok(())
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
