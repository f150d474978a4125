//! The etcd backend: leader election under a session lease (see
//! `leadership.rs`), plan locks under plan leases, decisions fenced by the
//! leader's election key, agent liveness from lease-backed keys.
//!
//! Every write that decides something (locks taken or released, a 2PC
//! decision) is one etcd transaction that also compares the create revision of
//! this coordinator's election key with the caller's epoch (invariant 3): a
//! deposed leader's write fails in etcd even when it does not know yet that it
//! was deposed.
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::error::{ErrorContext, is_connectivity, is_electing};
pub use super::shared::ElectionKey;
use super::shared::{Session, Shared};
use super::{
    Coordination, CoordinationError, Decision, Leadership, LockOutcome, ShardLock, check_name,
    keys, leadership, members, watchers,
};

/// etcd's default `--max-txn-ops`: a transaction has at most this many
/// compares, and this many operations per branch.
pub const MAX_TXN_OPS: usize = 128;

/// Coordination through etcd (3.4+). Dropping it stops its tasks; prefer
/// [`EtcdCoordination::shutdown`], which also hands leadership over at once.
pub struct EtcdCoordination {
    pub(super) shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl EtcdCoordination {
    /// Connects to etcd (failing with `Unavailable` if it does not answer),
    /// then campaigns for leadership in the background with `advertise` (this
    /// coordinator's gRPC address) as its value, under a lease of `ttl`.
    pub async fn connect(
        endpoints: Vec<String>,
        advertise: String,
        ttl: Duration,
        prefix: String,
    ) -> Result<EtcdCoordination, CoordinationError> {
        Self::connect_secured(endpoints, advertise, ttl, prefix, None, None, None).await
    }

    /// [`EtcdCoordination::connect`] over TLS (`https://` endpoints; with a client
    /// certificate when `tls` holds one) and/or as an etcd user.
    pub async fn connect_secured(
        endpoints: Vec<String>,
        advertise: String,
        ttl: Duration,
        prefix: String,
        tls: Option<etcd_client::TlsOptions>,
        user: Option<flotilla_core::tls::Credentials>,
        store: Option<&str>,
    ) -> Result<EtcdCoordination, CoordinationError> {
        if endpoints.is_empty() {
            return Err(CoordinationError::InvalidArgument(
                "no etcd endpoint given".into(),
            ));
        }
        if ttl < Duration::from_secs(1) {
            return Err(CoordinationError::InvalidArgument(format!(
                "lease TTL {ttl:?} is below etcd's granularity of one second"
            )));
        }
        let errors = ErrorContext {
            // named in errors operators read: never a password written into an endpoint
            endpoints: endpoints
                .iter()
                .map(|e| flotilla_core::secrets::redact_url(e))
                .collect::<Vec<_>>()
                .join(","),
        };
        let rpc_timeout = ttl.clamp(Duration::from_secs(1), Duration::from_secs(5));
        // HTTP/2 pings find a dead connection under the long-lived streams
        // (observe, watch) that no request timeout covers.
        let options = ConnectOptions::new()
            .with_connect_timeout(rpc_timeout)
            .with_keep_alive(Duration::from_secs(2).min(ttl / 2), rpc_timeout)
            .with_keep_alive_while_idle(true);
        let over_tls = tls.is_some();
        let options = match tls {
            Some(tls) => options.with_tls(tls),
            None => options,
        };
        let options = match user {
            // etcd's tokens expire (--auth-token-ttl, 5 minutes idle by default) and die
            // with an `auth disable`: the client authenticates again and retries once
            // when its token is refused, or every etcd call after would fail.
            Some(c) => options
                .with_user(c.user, c.password)
                .with_auto_token_refresh(true),
            None => options,
        };
        let mut client = match Client::connect(&endpoints, Some(options.clone())).await {
            Ok(client) => client,
            Err(e) if is_connectivity(&e) => return Err(errors.read(e)),
            Err(e) => {
                return Err(CoordinationError::InvalidArgument(format!(
                    "etcd endpoints {}: {e}",
                    errors.endpoints
                )));
            }
        };
        // Connecting is lazy: ask something to know etcd is there. A cluster electing a
        // leader (just started, or a member restarted) answers "leader changed" or "no
        // leader" for a moment: asked again for a while rather than the coordinator exiting
        // at start (seen in the e2e suite with a 3-member cluster on a loaded machine).
        let prefix = keys::normalize_prefix(&prefix);
        let election = keys::election(&prefix);
        let electing_until = tokio::time::Instant::now() + 3 * rpc_timeout;
        let cluster_id;
        loop {
            match tokio::time::timeout(
                rpc_timeout,
                client.get(
                    election.clone(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                ),
            )
            .await
            {
                Ok(Ok(answer)) => {
                    cluster_id = answer.header().map_or(0, |h| h.cluster_id());
                    break;
                }
                Ok(Err(e)) if is_electing(&e) && tokio::time::Instant::now() < electing_until => {
                    warn!(error = %e, "etcd is electing a leader; asking again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // One member down (its connection refused): the request went to it; asked
                // again, the client's other members answer. The coordinator exited 3 at
                // start about two times in five with one member of three stopped.
                Ok(Err(e))
                    if is_connectivity(&e)
                        && endpoints.len() > 1
                        && tokio::time::Instant::now() < electing_until =>
                {
                    warn!(error = %e, "an etcd member does not answer; asking the others");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(Err(e)) => return Err(errors.read(e)),
                Err(_) => return Err(errors.read_timeout(rpc_timeout)),
            }
        }

        // Before campaigning: the group's coordinators share one control store (a leader
        // with another, an empty SQLite file given by mistake, led with no plans, no
        // operators, and authentication off).
        if let Some(store) = store {
            // (asked again past a member that does not answer, as above: the claim puts the
            // key only where there is none, and otherwise reads it, so a claim that landed
            // unseen reads our own store the second time)
            loop {
                match claim_store(&mut client, &errors, &prefix, store, rpc_timeout).await {
                    Err(
                        CoordinationError::Unavailable { .. }
                        | CoordinationError::Indeterminate { .. },
                    ) if endpoints.len() > 1 && tokio::time::Instant::now() < electing_until => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    done => break done?,
                }
            }
        }

        let (leadership, _) = watch::channel(Leadership::Follower { leader: None });
        let (live, _) = watch::channel(BTreeSet::new());
        // The election's epochs are this cluster's revisions under this prefix: another
        // cluster (etcd rebuilt, revisions from 1 again) or prefix counts its own.
        let epoch_space = format!("etcd {cluster_id:016x} {prefix}");
        let shared = Arc::new(Shared {
            client,
            errors,
            epoch_space,
            prefix,
            election,
            advertise,
            ttl,
            rpc_timeout,
            leadership,
            live,
            session: Mutex::new(Session::default()),
            plan_leases: Mutex::new(HashMap::new()),
            refused_epoch: AtomicU64::new(0),
            refused: Notify::new(),
        });
        info!(
            endpoints = %shared.errors.endpoints,
            prefix = %shared.prefix,
            ttl = ?ttl,
            "coordination backend: etcd"
        );
        let (stop, _) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(leadership::run(shared.clone(), stop.subscribe())),
            tokio::spawn(watchers::keep_plan_leases(shared.clone(), stop.subscribe())),
            tokio::spawn(watchers::follow_agents(shared.clone(), stop.subscribe())),
            tokio::spawn(members::watch(
                shared.clone(),
                endpoints,
                options,
                over_tls,
                stop.subscribe(),
            )),
        ];
        Ok(EtcdCoordination {
            shared,
            stop,
            tasks: Mutex::new(tasks),
        })
    }

    /// Stops campaigning and keeping leases alive, and revokes the session
    /// lease so another coordinator can lead at once. Plan leases are left to
    /// the next leader (or to expire).
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
    }

    /// The election key this coordinator holds while it leads.
    pub fn election_key(&self) -> Option<ElectionKey> {
        self.shared.session().leader.clone()
    }

    /// The session lease it campaigns under, if it has one right now.
    pub fn session_lease(&self) -> Option<i64> {
        self.shared.session().lease
    }

    /// The key prefix, without a trailing slash.
    pub fn prefix(&self) -> &str {
        &self.shared.prefix
    }

    pub(super) async fn read<T>(
        &self,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, CoordinationError> {
        let limit = self.shared.rpc_timeout;
        match tokio::time::timeout(limit, call).await {
            Ok(result) => result.map_err(|e| self.shared.errors.read(e)),
            Err(_) => Err(self.shared.errors.read_timeout(limit)),
        }
    }

    pub(super) async fn write<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, CoordinationError> {
        let limit = self.shared.rpc_timeout;
        match tokio::time::timeout(limit, call).await {
            Ok(result) => result.map_err(|e| self.shared.errors.write(what, e)),
            Err(_) => Err(self.shared.errors.write_timeout(what, limit)),
        }
    }

    /// A failed fenced transaction reads the election key first: `NotLeader`
    /// unless it still has the caller's epoch as its create revision.
    pub(super) fn check_fence(
        &self,
        found: &[Option<Kv>],
        epoch: u64,
    ) -> Result<(), CoordinationError> {
        let current = found
            .first()
            .and_then(Option::as_ref)
            .map(|kv| kv.create_revision);
        if current == Some(epoch as i64) {
            return Ok(());
        }
        self.shared.fence_refused(epoch);
        Err(CoordinationError::NotLeader)
    }
}

impl Drop for EtcdCoordination {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// What this module needs of a key-value read.
#[derive(Debug, Clone)]
pub(super) struct Kv {
    pub value: String,
    pub create_revision: i64,
    pub mod_revision: i64,
}

/// The first key-value of each read in a transaction's answer, in order.
/// Claims the group's control store for `store` (its identity), or finds it is another's.
async fn claim_store(
    client: &mut Client,
    errors: &ErrorContext,
    prefix: &str,
    store: &str,
    limit: Duration,
) -> Result<(), CoordinationError> {
    let key = keys::store(prefix);
    let txn = Txn::new()
        .when(vec![Compare::create_revision(
            key.clone(),
            CompareOp::Equal,
            0,
        )])
        .and_then(vec![TxnOp::put(key.clone(), store, None)])
        .or_else(vec![TxnOp::get(key.clone(), None)]);
    let resp = match tokio::time::timeout(limit, client.txn(txn)).await {
        Ok(r) => r.map_err(|e| errors.write("claiming the control store", e))?,
        Err(_) => return Err(errors.write_timeout("claiming the control store", limit)),
    };
    if resp.succeeded() {
        info!(store, key = %key, "this etcd group's control store is this coordinator's");
        return Ok(());
    }
    let group = first_kvs(&resp)
        .into_iter()
        .flatten()
        .next()
        .map(|kv| kv.value)
        .unwrap_or_default();
    if group == store {
        return Ok(());
    }
    Err(CoordinationError::StoreNotShared {
        endpoints: errors.endpoints.clone(),
        key,
        group,
        store: store.to_string(),
    })
}

pub(super) fn first_kvs(resp: &TxnResponse) -> Vec<Option<Kv>> {
    resp.op_responses()
        .into_iter()
        .map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().map(|kv| Kv {
                value: String::from_utf8_lossy(kv.value()).into_owned(),
                create_revision: kv.create_revision(),
                mod_revision: kv.mod_revision(),
            }),
            _ => None,
        })
        .collect()
}

#[tonic::async_trait]
impl Coordination for EtcdCoordination {
    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.shared.leadership.subscribe()
    }

    fn epoch_space(&self) -> String {
        self.shared.epoch_space.clone()
    }

    async fn lock_shards(
        &self,
        plan_id: &str,
        shards: &[String],
        epoch: u64,
    ) -> Result<LockOutcome, CoordinationError> {
        self.lock_plan(plan_id, shards, epoch).await
    }

    async fn release_shards(&self, plan_id: &str, epoch: u64) -> Result<(), CoordinationError> {
        self.release_plan(plan_id, epoch).await
    }

    async fn release_shard(
        &self,
        plan_id: &str,
        shard: &str,
        epoch: u64,
    ) -> Result<(), CoordinationError> {
        self.release_plan_shard(plan_id, shard, epoch).await
    }

    async fn locks(&self) -> Result<Vec<ShardLock>, CoordinationError> {
        let mut client = self.shared.client.clone();
        let prefix = keys::locks_prefix(&self.shared.prefix);
        let resp = self
            .read(client.get(prefix.clone(), Some(GetOptions::new().with_prefix())))
            .await?;
        let mut locks: Vec<ShardLock> = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = kv.key_str().ok()?;
                Some(ShardLock {
                    shard: keys::strip(key, &prefix)?.to_string(),
                    plan_id: String::from_utf8_lossy(kv.value()).into_owned(),
                    lease: kv.lease(),
                })
            })
            .collect();
        locks.sort();
        Ok(locks)
    }

    async fn break_lock(&self, shard: &str) -> Result<bool, CoordinationError> {
        check_name("shard", shard)?;
        let mut client = self.shared.client.clone();
        let key = keys::lock(&self.shared.prefix, shard);
        let resp = self
            .write(
                &format!("breaking the lock on {shard}"),
                client.delete(key, None),
            )
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn plan_lease(&self, plan_id: &str) -> Result<Option<i64>, CoordinationError> {
        check_name("plan", plan_id)?;
        self.stored_plan_lease(plan_id).await
    }

    async fn adopt_plan_lease(
        &self,
        plan_id: &str,
        lease_id: i64,
    ) -> Result<bool, CoordinationError> {
        check_name("plan", plan_id)?;
        if !self.lease_alive(lease_id).await? {
            return Ok(false);
        }
        self.shared
            .plan_leases()
            .insert(plan_id.to_string(), lease_id);
        Ok(true)
    }

    async fn decide(
        &self,
        group: &str,
        decision: Decision,
        epoch: u64,
    ) -> Result<Decision, CoordinationError> {
        check_name("group", group)?;
        let election_key = self.shared.leader_key(epoch)?;
        let key = keys::decision(&self.shared.prefix, group);
        let txn = Txn::new()
            .when(vec![
                Compare::create_revision(election_key.clone(), CompareOp::Equal, epoch as i64),
                Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            ])
            .and_then(vec![TxnOp::put(key.clone(), decision.as_str(), None)])
            .or_else(vec![
                TxnOp::get(election_key, None),
                TxnOp::get(key.clone(), None),
            ]);
        let mut client = self.shared.client.clone();
        let resp = self
            .write(
                &format!("deciding {decision} for group {group}"),
                client.txn(txn),
            )
            .await?;
        if resp.succeeded() {
            return Ok(decision);
        }
        let found = first_kvs(&resp);
        self.check_fence(&found, epoch)?;
        match found.get(1).and_then(Option::as_ref) {
            Some(kv) => Ok(kv.value.parse()?),
            None => Err(CoordinationError::Etcd(format!(
                "{key}: neither written nor found"
            ))),
        }
    }

    async fn decision(&self, group: &str) -> Result<Option<Decision>, CoordinationError> {
        check_name("group", group)?;
        let mut client = self.shared.client.clone();
        let key = keys::decision(&self.shared.prefix, group);
        let resp = self.read(client.get(key, None)).await?;
        resp.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).parse())
            .transpose()
            .map_err(CoordinationError::from)
    }

    fn live_agents(&self) -> watch::Receiver<BTreeSet<String>> {
        self.shared.live.subscribe()
    }

    async fn resign(&self) {
        self.shutdown().await;
    }

    fn kind(&self) -> &'static str {
        "etcd"
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::EtcdCoordination;

    /// An etcd that cannot be reached is named in the error, without a password written
    /// into its endpoint.
    #[tokio::test]
    async fn an_unreachable_etcd_is_named_without_its_password() {
        let err = match EtcdCoordination::connect(
            vec!["http://flotilla:hunter2@127.0.0.1:1".into()],
            "http://127.0.0.1:7070".into(),
            Duration::from_secs(1),
            "/flotilla".into(),
        )
        .await
        {
            Ok(_) => panic!("nothing listens on port 1"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("127.0.0.1:1"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
