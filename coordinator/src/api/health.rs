//! The standard gRPC health service and server reflection: what load balancers,
//! Kubernetes probes and `grpcurl` speak, without Flotilla's .proto file.
use std::future::Future;

use flotilla_core::pb;
use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;
use tonic_reflection::server::{v1, v1alpha};

use crate::coordination::Leadership;

/// Services only the leader carries out. A follower answers them too (it refuses
/// writes with the leader's address, and tells agents where to go), but a load
/// balancer should send traffic to the leader: these are SERVING there only. The
/// overall service "" stays SERVING while the process is up.
pub(crate) const LEADER_ONLY: [&str; 2] = [
    pb::operator_service_server::SERVICE_NAME,
    pb::agent_service_server::SERVICE_NAME,
];

/// The health service, its leader-only services set from `leadership` before it
/// is returned (a probe never sees them unknown) and kept in step with it after;
/// and `shutdown` wrapped so that, once it resolves, every status turns
/// NOT_SERVING and open Watch streams end: a server shutting down gracefully waits
/// for its streams, and a load balancer's watch would otherwise hold it up.
pub(crate) async fn health_service(
    leadership: watch::Receiver<Leadership>,
    store_up: watch::Receiver<bool>,
    tls: Option<crate::tls::ServerTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (
    HealthServer<impl Health>,
    impl Future<Output = ()> + Send + 'static,
) {
    let (reporter, server) = tonic_health::server::health_reporter();
    let serving = leadership.borrow().is_leader() && *store_up.borrow();
    publish(&reporter, serving).await;
    // The metrics port's `/readyz` says the same as the leader-only services, for probes
    // that speak HTTP (and why not, which gRPC health cannot).
    let (leading, store) = (leadership.clone(), store_up.clone());
    crate::metrics::set_readiness(move || {
        // First: an expired certificate is this coordinator's to mend, whoever leads.
        if let Some(why) = tls
            .as_ref()
            .and_then(|tls| tls.certificate().expired(crate::tls::unix_now()))
        {
            return Err(why);
        }
        match &*leading.borrow() {
            Leadership::Leader { .. } => {}
            Leadership::Follower { leader: Some(at) } => {
                return Err(format!("a follower: the leader is {at}"));
            }
            Leadership::Follower { leader: None } => {
                return Err("a follower: no coordinator leads".into());
            }
        }
        match *store.borrow() {
            true => Ok(()),
            false => Err("the control store does not answer".into()),
        }
    });
    let follow = tokio::spawn(follow_leadership(leadership, store_up, reporter.clone()));
    let shutdown = async move {
        shutdown.await;
        follow.abort();
        crate::metrics::set_readiness(|| Err("stopping".into()));
        let mut reporter = reporter;
        for service in std::iter::once("").chain(LEADER_ONLY) {
            reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
            // Dropping a status's sender ends the Watch streams on it.
            reporter.clear_service_status(service).await;
        }
    };
    (server, shutdown)
}

/// Leader-only services are SERVING while this coordinator leads and its control store
/// answers: a leader whose store is out of reach takes requests it cannot store (each
/// waits out the pool's timeout), and a load balancer should know.
async fn follow_leadership(
    mut leadership: watch::Receiver<Leadership>,
    mut store_up: watch::Receiver<bool>,
    reporter: HealthReporter,
) {
    loop {
        tokio::select! {
            changed = leadership.changed() => if changed.is_err() { break },
            changed = store_up.changed() => if changed.is_err() { break },
        }
        let serving = leadership.borrow_and_update().is_leader() && *store_up.borrow_and_update();
        publish(&reporter, serving).await;
    }
    // The coordination backend is gone: nobody here leads any more.
    publish(&reporter, false).await;
}

async fn publish(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for service in LEADER_ONLY {
        reporter.set_service_status(service, status).await;
    }
}

/// Server reflection over flotilla.v1 and the health service, in both protocol
/// versions: v1, and v1alpha for clients that only know it (older grpcurl).
pub(crate) fn reflection_services() -> Result<
    (
        v1::ServerReflectionServer<impl v1::ServerReflection>,
        v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}
