//! The in-process backend for a single coordinator without etcd: always the
//! leader under the epoch the control store gave it at start, locks and
//! decisions in memory.
//!
//! In-memory locks vanish with the process, which is what etcd's plan leases
//! do when the whole coordinator tier is gone (invariant 6). Decisions do not:
//! they are recorded in the control store before any agent is told one (a
//! restarted coordinator that presumed abort where shards had committed would
//! undo them with down SQL), and a restarted coordinator with none presumes
//! abort (invariant 3).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use tokio::sync::watch;

use super::{
    Coordination, CoordinationError, Decision, Leadership, LockOutcome, ShardLock, check_name,
    distinct_shards,
};

pub struct EmbeddedCoordination {
    epoch: u64,
    /// Where decisions are recorded (None in tests of this module: in memory only).
    store: Option<crate::store::Store>,
    leadership: watch::Sender<Leadership>,
    live: watch::Sender<BTreeSet<String>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// shard -> plan holding it
    locks: BTreeMap<String, String>,
    /// plan -> its (synthetic) lease id, while it holds locks
    plan_leases: HashMap<String, i64>,
    next_lease: i64,
    decisions: HashMap<String, Decision>,
}

impl EmbeddedCoordination {
    /// Leads under `epoch` (bumped by the control store at each start) for as
    /// long as it lives.
    pub fn new(epoch: u64) -> EmbeddedCoordination {
        let (leadership, _) = watch::channel(Leadership::Leader { epoch });
        let (live, _) = watch::channel(BTreeSet::new());
        EmbeddedCoordination {
            epoch,
            store: None,
            leadership,
            live,
            state: Mutex::new(State::default()),
        }
    }

    /// Decisions recorded in `store` (the coordinator's control store).
    pub fn with_store(mut self, store: crate::store::Store) -> EmbeddedCoordination {
        self.store = Some(store);
        self
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Marks a shard's agent attached (`true`) or detached (`false`); the
    /// coordinator calls it as agents' streams come and go.
    pub fn set_live(&self, shard: &str, live: bool) {
        self.live.send_if_modified(|set| {
            if live {
                set.insert(shard.to_string())
            } else {
                set.remove(shard)
            }
        });
    }

    fn check_epoch(&self, epoch: u64) -> Result<(), CoordinationError> {
        if epoch == self.epoch {
            Ok(())
        } else {
            Err(CoordinationError::NotLeader)
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain maps behind: still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[tonic::async_trait]
impl Coordination for EmbeddedCoordination {
    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.subscribe()
    }

    fn epoch_space(&self) -> String {
        "embedded".into()
    }

    async fn lock_shards(
        &self,
        plan_id: &str,
        shards: &[String],
        epoch: u64,
    ) -> Result<LockOutcome, CoordinationError> {
        check_name("plan", plan_id)?;
        let shards = distinct_shards(shards)?;
        self.check_epoch(epoch)?;
        let mut state = self.state();
        for shard in &shards {
            if let Some(holder) = state.locks.get(*shard).filter(|h| *h != plan_id) {
                return Ok(LockOutcome::Held {
                    shard: shard.to_string(),
                    plan_id: holder.clone(),
                });
            }
        }
        if shards.is_empty() {
            return Ok(LockOutcome::Taken);
        }
        if !state.plan_leases.contains_key(plan_id) {
            state.next_lease += 1;
            let lease = state.next_lease;
            state.plan_leases.insert(plan_id.to_string(), lease);
        }
        for shard in shards {
            state.locks.insert(shard.to_string(), plan_id.to_string());
        }
        Ok(LockOutcome::Taken)
    }

    async fn release_shards(&self, plan_id: &str, epoch: u64) -> Result<(), CoordinationError> {
        check_name("plan", plan_id)?;
        self.check_epoch(epoch)?;
        let mut state = self.state();
        state.locks.retain(|_, holder| holder != plan_id);
        state.plan_leases.remove(plan_id);
        Ok(())
    }

    async fn release_shard(
        &self,
        plan_id: &str,
        shard: &str,
        epoch: u64,
    ) -> Result<(), CoordinationError> {
        check_name("plan", plan_id)?;
        check_name("shard", shard)?;
        self.check_epoch(epoch)?;
        let mut state = self.state();
        if state
            .locks
            .get(shard)
            .is_some_and(|holder| holder == plan_id)
        {
            state.locks.remove(shard);
        }
        Ok(())
    }

    async fn locks(&self) -> Result<Vec<ShardLock>, CoordinationError> {
        let state = self.state();
        Ok(state
            .locks
            .iter()
            .map(|(shard, plan_id)| ShardLock {
                shard: shard.clone(),
                plan_id: plan_id.clone(),
                lease: state.plan_leases.get(plan_id).copied().unwrap_or_default(),
            })
            .collect())
    }

    async fn break_lock(&self, shard: &str) -> Result<bool, CoordinationError> {
        check_name("shard", shard)?;
        Ok(self.state().locks.remove(shard).is_some())
    }

    async fn plan_lease(&self, plan_id: &str) -> Result<Option<i64>, CoordinationError> {
        Ok(self.state().plan_leases.get(plan_id).copied())
    }

    async fn adopt_plan_lease(
        &self,
        plan_id: &str,
        lease_id: i64,
    ) -> Result<bool, CoordinationError> {
        // Nothing outlives this process, so the only lease to adopt is the
        // one the plan already has.
        Ok(self.state().plan_leases.get(plan_id) == Some(&lease_id))
    }

    async fn decide(
        &self,
        group: &str,
        decision: Decision,
        epoch: u64,
    ) -> Result<Decision, CoordinationError> {
        check_name("group", group)?;
        self.check_epoch(epoch)?;
        if let Some(d) = self.state().decisions.get(group) {
            return Ok(*d);
        }
        let stands = match &self.store {
            Some(store) => {
                let recorded = store
                    .decide(group, decision.as_str(), epoch)
                    .await
                    .map_err(|e| store_error(group, e.to_string()))?;
                recorded
                    .parse::<Decision>()
                    .map_err(|e| store_error(group, e.to_string()))?
            }
            None => decision,
        };
        Ok(*self
            .state()
            .decisions
            .entry(group.to_string())
            .or_insert(stands))
    }

    async fn decision(&self, group: &str) -> Result<Option<Decision>, CoordinationError> {
        if let Some(d) = self.state().decisions.get(group) {
            return Ok(Some(*d));
        }
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let Some(recorded) = store
            .decision(group)
            .await
            .map_err(|e| store_error(group, e.to_string()))?
        else {
            return Ok(None);
        };
        let d = recorded
            .parse::<Decision>()
            .map_err(|e| store_error(group, e.to_string()))?;
        Ok(Some(
            *self.state().decisions.entry(group.to_string()).or_insert(d),
        ))
    }

    fn live_agents(&self) -> watch::Receiver<BTreeSet<String>> {
        self.live.subscribe()
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

fn store_error(group: &str, reason: String) -> CoordinationError {
    CoordinationError::Store {
        what: format!("the decision of {group}"),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn always_leads_under_its_epoch() {
        let c = EmbeddedCoordination::new(7);
        assert_eq!(*c.leadership().borrow(), Leadership::Leader { epoch: 7 });
        assert_eq!(c.kind(), "embedded");
        assert_eq!(
            c.decide("g", Decision::Commit, 6).await,
            Err(CoordinationError::NotLeader)
        );
        assert_eq!(
            c.lock_shards("p", &shards(&["a"]), 8).await,
            Err(CoordinationError::NotLeader)
        );
        assert!(c.locks().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn locks_are_all_or_nothing() {
        let c = EmbeddedCoordination::new(1);
        assert_eq!(
            c.lock_shards("p1", &shards(&["a", "b"]), 1).await.unwrap(),
            LockOutcome::Taken
        );
        assert_eq!(
            c.lock_shards("p2", &shards(&["c", "b"]), 1).await.unwrap(),
            LockOutcome::Held {
                shard: "b".into(),
                plan_id: "p1".into()
            }
        );
        let lease = c.plan_lease("p1").await.unwrap().expect("p1 has a lease");
        let held: Vec<_> = c.locks().await.unwrap();
        assert_eq!(
            held,
            vec![
                ShardLock {
                    shard: "a".into(),
                    plan_id: "p1".into(),
                    lease
                },
                ShardLock {
                    shard: "b".into(),
                    plan_id: "p1".into(),
                    lease
                },
            ]
        );
        assert_eq!(c.plan_lease("p2").await.unwrap(), None);
        // The holder may take its own locks again, and more with them.
        assert_eq!(
            c.lock_shards("p1", &shards(&["b", "a", "d"]), 1)
                .await
                .unwrap(),
            LockOutcome::Taken
        );
        assert!(c.adopt_plan_lease("p1", lease).await.unwrap());
        assert!(!c.adopt_plan_lease("p1", lease + 1).await.unwrap());

        assert!(c.break_lock("b").await.unwrap());
        assert!(!c.break_lock("b").await.unwrap());
        assert_eq!(
            c.lock_shards("p2", &shards(&["c", "b"]), 1).await.unwrap(),
            LockOutcome::Taken
        );
        c.release_shards("p1", 1).await.unwrap();
        let held: Vec<_> = c
            .locks()
            .await
            .unwrap()
            .into_iter()
            .map(|l| (l.shard, l.plan_id))
            .collect();
        assert_eq!(
            held,
            vec![("b".into(), "p2".into()), ("c".into(), "p2".into())]
        );
        assert_eq!(c.plan_lease("p1").await.unwrap(), None);
    }

    /// One shard's lock let go of by its plan alone: the others stay, and another plan's
    /// lock is not touched.
    #[tokio::test]
    async fn a_plan_lets_go_of_one_shard() {
        let c = EmbeddedCoordination::new(1);
        c.lock_shards("p1", &shards(&["a", "b"]), 1).await.unwrap();
        c.lock_shards("p2", &shards(&["c"]), 1).await.unwrap();
        c.release_shard("p1", "a", 1).await.unwrap();
        c.release_shard("p1", "c", 1).await.unwrap();
        let held: Vec<_> = c
            .locks()
            .await
            .unwrap()
            .into_iter()
            .map(|l| (l.shard, l.plan_id))
            .collect();
        assert_eq!(
            held,
            vec![("b".into(), "p1".into()), ("c".into(), "p2".into())]
        );
        assert_eq!(
            c.lock_shards("p3", &shards(&["a"]), 1).await.unwrap(),
            LockOutcome::Taken
        );
        assert!(
            c.release_shard("p1", "b", 2).await.is_err(),
            "another term's"
        );
    }

    #[tokio::test]
    async fn the_first_decision_stands() {
        let c = EmbeddedCoordination::new(3);
        assert_eq!(c.decision("g").await.unwrap(), None);
        assert_eq!(
            c.decide("g", Decision::Abort, 3).await.unwrap(),
            Decision::Abort
        );
        assert_eq!(
            c.decide("g", Decision::Commit, 3).await.unwrap(),
            Decision::Abort
        );
        assert_eq!(c.decision("g").await.unwrap(), Some(Decision::Abort));
    }

    #[tokio::test]
    async fn serves_behind_the_trait_object() {
        let c: std::sync::Arc<dyn Coordination> = std::sync::Arc::new(EmbeddedCoordination::new(5));
        let epoch = c.leadership().borrow().epoch().expect("leads");
        assert_eq!(
            c.lock_shards("p", &shards(&["a"]), epoch).await,
            Ok(LockOutcome::Taken)
        );
        assert_eq!(
            c.decide("g", Decision::Commit, epoch).await,
            Ok(Decision::Commit)
        );
    }

    #[tokio::test]
    async fn live_agents_follow_attach_and_detach() {
        let c = EmbeddedCoordination::new(1);
        let mut live = c.live_agents();
        c.set_live("shard_0", true);
        live.changed().await.unwrap();
        assert_eq!(
            *live.borrow_and_update(),
            BTreeSet::from(["shard_0".to_string()])
        );
        // No change, no wake-up.
        c.set_live("shard_0", true);
        assert!(!live.has_changed().unwrap());
        c.set_live("shard_0", false);
        live.changed().await.unwrap();
        assert!(live.borrow_and_update().is_empty());
    }
}
