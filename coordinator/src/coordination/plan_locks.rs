//! Plan locks on shards, on the etcd backend: all of a plan's locks are
//! taken in one transaction under the plan's lease, fenced by the leader's
//! election key; the lease id is stored beside them so that a new leader can
//! adopt it (and keep the locks alive) when it takes over a running plan.
use std::collections::BTreeSet;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use tracing::debug;

use super::etcd::{EtcdCoordination, MAX_TXN_OPS, first_kvs};
use super::{
    Coordination, CoordinationError, LockOutcome, check_name, distinct_shards, keys, leadership,
};

/// Attempts at a lock transaction when the keys change between read and write.
const LOCK_ATTEMPTS: usize = 3;

impl EtcdCoordination {
    /// Takes every lock of `plan_id`, or none; see [`Coordination::lock_shards`].
    pub(super) async fn lock_plan(
        &self,
        plan_id: &str,
        shards: &[String],
        epoch: u64,
    ) -> Result<LockOutcome, CoordinationError> {
        check_name("plan", plan_id)?;
        let shards = distinct_shards(shards)?;
        if shards.len() + 1 > MAX_TXN_OPS {
            return Err(CoordinationError::InvalidArgument(format!(
                "plan {plan_id} touches {} shards; one etcd transaction locks at most {} \
                 (etcd --max-txn-ops {MAX_TXN_OPS})",
                shards.len(),
                MAX_TXN_OPS - 1
            )));
        }
        let election_key = self.shared.leader_key(epoch)?;
        if shards.is_empty() {
            return Ok(LockOutcome::Taken);
        }
        let (mut lease, mut fresh) = self.lease_for(plan_id).await?;
        let mut outcome = self
            .take_locks(plan_id, &shards, epoch, &election_key, lease)
            .await;
        if !fresh
            && matches!(&outcome, Err(CoordinationError::Etcd(m)) if m.contains("lease not found"))
        {
            // The plan's lease expired before its keeper noticed: start over
            // with the lease etcd knows (or a new one).
            self.shared.forget_plan_lease(plan_id, lease);
            (lease, fresh) = self.lease_for(plan_id).await?;
            outcome = self
                .take_locks(plan_id, &shards, epoch, &election_key, lease)
                .await;
        }
        match &outcome {
            Ok(LockOutcome::Taken) => {
                self.shared.plan_leases().insert(plan_id.to_string(), lease);
            }
            // Whatever happened, a lease nobody keeps alive frees what it
            // holds; revoking it now frees it sooner.
            _ if fresh => self.revoke_quietly(lease).await,
            _ => {}
        }
        outcome
    }

    /// Deletes every lock of `plan_id` (fenced), then revokes its lease.
    pub(super) async fn release_plan(
        &self,
        plan_id: &str,
        epoch: u64,
    ) -> Result<(), CoordinationError> {
        check_name("plan", plan_id)?;
        let election_key = self.shared.leader_key(epoch)?;
        let prefix = &self.shared.prefix;
        let lease_key = keys::plan_lease(prefix, plan_id);
        let what = format!("releasing the shard locks of plan {plan_id}");
        for _ in 0..LOCK_ATTEMPTS {
            let mut client = self.shared.client.clone();
            let held = self
                .read(client.get(
                    keys::locks_prefix(prefix),
                    Some(GetOptions::new().with_prefix()),
                ))
                .await?;
            let side = self.read(client.get(lease_key.clone(), None)).await?;
            let mut compares = vec![Compare::create_revision(
                election_key.clone(),
                CompareOp::Equal,
                epoch as i64,
            )];
            let mut deletes = Vec::new();
            for kv in held.kvs().iter().chain(side.kvs()) {
                if kv.key() != lease_key.as_bytes() && kv.value() != plan_id.as_bytes() {
                    continue;
                }
                compares.push(Compare::mod_revision(
                    kv.key(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                ));
                deletes.push(TxnOp::delete(kv.key(), None));
            }
            let stored = side
                .kvs()
                .first()
                .and_then(|kv| kv.value_str().ok()?.parse::<i64>().ok());
            let local = self.shared.plan_leases().get(plan_id).copied();
            if !deletes.is_empty() {
                if deletes.len() + 1 > MAX_TXN_OPS {
                    return Err(CoordinationError::InvalidArgument(format!(
                        "plan {plan_id} holds {} keys; more than one etcd transaction takes",
                        deletes.len()
                    )));
                }
                let txn = Txn::new()
                    .when(compares)
                    .and_then(deletes)
                    .or_else(vec![TxnOp::get(election_key.clone(), None)]);
                let resp = self.write(&what, client.txn(txn)).await?;
                if !resp.succeeded() {
                    self.check_fence(&first_kvs(&resp), epoch)?;
                    continue;
                }
            }
            self.shared.plan_leases().remove(plan_id);
            let leases: BTreeSet<i64> = stored.into_iter().chain(local).collect();
            for lease in leases {
                self.revoke_quietly(lease).await;
            }
            return Ok(());
        }
        Err(CoordinationError::Etcd(format!(
            "the shard locks of plan {plan_id} kept changing; try again"
        )))
    }

    /// Deletes `plan_id`'s lock on `shard` (fenced; held by another plan or by none:
    /// nothing done). The plan's lease and its other locks stay.
    pub(super) async fn release_plan_shard(
        &self,
        plan_id: &str,
        shard: &str,
        epoch: u64,
    ) -> Result<(), CoordinationError> {
        check_name("plan", plan_id)?;
        check_name("shard", shard)?;
        let election_key = self.shared.leader_key(epoch)?;
        let key = keys::lock(&self.shared.prefix, shard);
        let what = format!("releasing the lock of plan {plan_id} on {shard}");
        for _ in 0..LOCK_ATTEMPTS {
            let mut client = self.shared.client.clone();
            let held = self.read(client.get(key.clone(), None)).await?;
            let Some(kv) = held.kvs().first() else {
                return Ok(());
            };
            if kv.value() != plan_id.as_bytes() {
                return Ok(());
            }
            let txn = Txn::new()
                .when(vec![
                    Compare::create_revision(election_key.clone(), CompareOp::Equal, epoch as i64),
                    Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
                ])
                .and_then(vec![TxnOp::delete(key.clone(), None)])
                .or_else(vec![TxnOp::get(election_key.clone(), None)]);
            let resp = self.write(&what, client.txn(txn)).await?;
            if resp.succeeded() {
                return Ok(());
            }
            self.check_fence(&first_kvs(&resp), epoch)?;
        }
        Err(CoordinationError::Etcd(format!(
            "the lock of plan {plan_id} on {shard} kept changing; try again"
        )))
    }

    /// The lease stored for `plan_id` by whoever locked for it, if alive.
    pub(super) async fn stored_plan_lease(
        &self,
        plan_id: &str,
    ) -> Result<Option<i64>, CoordinationError> {
        let mut client = self.shared.client.clone();
        let key = keys::plan_lease(&self.shared.prefix, plan_id);
        let resp = self.read(client.get(key.clone(), None)).await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        let value = kv.value_str().unwrap_or_default();
        value
            .parse::<i64>()
            .map(Some)
            .map_err(|_| CoordinationError::Etcd(format!("{key} holds {value:?}, not a lease id")))
    }

    pub(super) async fn lease_alive(&self, lease: i64) -> Result<bool, CoordinationError> {
        let mut client = self.shared.client.clone();
        let resp = self.read(client.lease_time_to_live(lease, None)).await?;
        Ok(resp.ttl() > 0)
    }

    /// The plan's lease: the one this coordinator keeps alive, else the one a
    /// previous leader stored (adopted), else a new one (`true`).
    async fn lease_for(&self, plan_id: &str) -> Result<(i64, bool), CoordinationError> {
        if let Some(lease) = self.shared.plan_leases().get(plan_id).copied() {
            return Ok((lease, false));
        }
        if let Some(lease) = self.stored_plan_lease(plan_id).await?
            && self.adopt_plan_lease(plan_id, lease).await?
        {
            return Ok((lease, false));
        }
        let mut client = self.shared.client.clone();
        let ttl = leadership::ttl_seconds(self.shared.ttl);
        let grant = self
            .write(
                &format!("lease grant for plan {plan_id}"),
                client.lease_grant(ttl, None),
            )
            .await?;
        Ok((grant.id(), true))
    }

    async fn revoke_quietly(&self, lease: i64) {
        let mut client = self.shared.client.clone();
        if let Err(e) = self.write("lease revoke", client.lease_revoke(lease)).await {
            debug!(lease, error = %e, "could not revoke an unused plan lease; it will expire");
        }
    }

    async fn take_locks(
        &self,
        plan_id: &str,
        shards: &[&str],
        epoch: u64,
        election_key: &str,
        lease: i64,
    ) -> Result<LockOutcome, CoordinationError> {
        let prefix = &self.shared.prefix;
        let what = format!("locking {} shard(s) for plan {plan_id}", shards.len());
        let fence = Compare::create_revision(election_key, CompareOp::Equal, epoch as i64);
        let with_lease = || Some(PutOptions::new().with_lease(lease));
        let mut puts: Vec<TxnOp> = shards
            .iter()
            .map(|s| TxnOp::put(keys::lock(prefix, s), plan_id, with_lease()))
            .collect();
        puts.push(TxnOp::put(
            keys::plan_lease(prefix, plan_id),
            lease.to_string(),
            with_lease(),
        ));
        let mut reads = vec![TxnOp::get(election_key, None)];
        reads.extend(
            shards
                .iter()
                .map(|s| TxnOp::get(keys::lock(prefix, s), None)),
        );

        // All free -> all taken, and on failure the holders as of that revision.
        let mut compares = vec![fence.clone()];
        compares.extend(
            shards
                .iter()
                .map(|s| Compare::create_revision(keys::lock(prefix, s), CompareOp::Equal, 0)),
        );
        for _ in 0..LOCK_ATTEMPTS {
            let mut client = self.shared.client.clone();
            let txn = Txn::new()
                .when(compares.clone())
                .and_then(puts.clone())
                .or_else(reads.clone());
            let resp = self.write(&what, client.txn(txn)).await?;
            if resp.succeeded() {
                return Ok(LockOutcome::Taken);
            }
            let found = first_kvs(&resp);
            self.check_fence(&found, epoch)?;
            let holders = found.get(1..).unwrap_or_default();
            for (shard, kv) in shards.iter().zip(holders) {
                if let Some(kv) = kv.as_ref().filter(|kv| kv.value != plan_id) {
                    return Ok(LockOutcome::Held {
                        shard: shard.to_string(),
                        plan_id: kv.value.clone(),
                    });
                }
            }
            // Every taken lock is this plan's own (a new leader re-taking a
            // running plan's locks): take them all again under `lease`, as long
            // as nothing changed since that read.
            compares = vec![fence.clone()];
            compares.extend(shards.iter().zip(holders).map(|(s, kv)| match kv {
                Some(kv) => {
                    Compare::mod_revision(keys::lock(prefix, s), CompareOp::Equal, kv.mod_revision)
                }
                None => Compare::create_revision(keys::lock(prefix, s), CompareOp::Equal, 0),
            }));
        }
        Err(CoordinationError::Etcd(format!(
            "the shard locks wanted by plan {plan_id} kept changing; try again"
        )))
    }
}
