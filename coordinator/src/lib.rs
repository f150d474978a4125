//! Flotilla's coordinator: holds coordinated-migration plans, expands them over
//! the fleet into steps (migration x target), hands steps to agents in batches,
//! and decides what happens on failure (all-or-nothing by default).
//!
//! `start(config, shutdown)` runs it; `main` and the embedded quickstart call the
//! same function.
pub mod coordination;
pub mod engine;
pub mod error;
pub mod fleet;
pub mod grpc;
pub mod metrics;
pub mod planner;
pub mod service;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::pb;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{error, info};

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
        }
    }
}

/// Writes store ops in order, many to a transaction, off the engine's path.
/// Step updates wait up to 50 ms for company: during a rollout they arrive in
/// hundreds of small batches a second, and one commit each would make the store
/// the busiest thing on the machine. A flush (someone waits on it) goes at once.
async fn store_writer(store: store::Store, mut rx: mpsc::UnboundedReceiver<store::StoreOp>) {
    const WINDOW: Duration = Duration::from_millis(50);
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + WINDOW;
        while batch.len() < 1024 && !matches!(batch.last(), Some(store::StoreOp::Flush(_))) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(op)) => batch.push(op),
                Ok(None) | Err(_) => break,
            }
        }
        if let Err(e) = store.apply(batch).await {
            // The shard journals hold the truth; a lost status write is repaired
            // when the plan is rebuilt from them.
            error!("control store write failed: {e}");
        }
    }
}

/// Runs the coordinator until `shutdown` resolves. `ready` (if given) receives
/// the address it listens on once it accepts connections.
pub async fn start(
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: Option<oneshot::Sender<SocketAddr>>,
) -> Result<(), CoordinatorError> {
    metrics::install(config.metrics).map_err(|reason| CoordinatorError::Listen {
        addr: config.metrics.map(|a| a.to_string()).unwrap_or_default(),
        reason,
    })?;
    let store = store::Store::open(&config.store).await?;
    let epoch = store.next_epoch().await?;
    info!(
        epoch,
        store = %store::redact(&config.store),
        "coordination backend: embedded (in-process, single coordinator; no etcd)"
    );
    let (writes, writes_rx) = mpsc::unbounded_channel();
    tokio::spawn(store_writer(store.clone(), writes_rx));
    let (changes, _) = broadcast::channel(1024);
    let (events, events_rx) = mpsc::channel(4096);
    let engine = engine::Engine::new(epoch, writes.clone(), changes.clone());
    tokio::spawn(engine.run(events_rx));
    let coordinator = Coordinator {
        inner: Arc::new(service::Inner {
            store,
            fleet: fleet::Fleet::default(),
            events,
            writes,
            changes,
            epoch,
            defaults: service::Defaults {
                lock_timeout: config.lock_timeout,
                statement_timeout: config.statement_timeout,
                preflight_timeout: config.preflight_timeout,
            },
        }),
    };
    let resumed = coordinator.resume_unfinished().await?;
    if resumed > 0 {
        info!(plans = resumed, "resumed plans left unfinished");
    }

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
        let _ = ready.send(addr);
    }
    tonic::transport::Server::builder()
        .add_service(pb::operator_service_server::OperatorServiceServer::new(
            coordinator.clone(),
        ))
        .add_service(pb::agent_service_server::AgentServiceServer::new(
            coordinator,
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(|e| CoordinatorError::Listen {
            addr: addr.to_string(),
            reason: e.to_string(),
        })
}
