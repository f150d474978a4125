//! The etcd coordination backend against a real etcd (one per test, on a free
//! loopback port). Skipped, with a note, when no etcd binary is found
//! (`FLOTILLA_ETCD_BIN`, `$PATH`, `/usr/bin`, `/usr/local/bin`).

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use flotilla_coordinator::coordination::{
    Coordination, CoordinationError, Decision, EtcdCoordination, Leadership, LockOutcome, keys,
};
use flotilla_testkit::{Etcd, free_port, wait_for};
use tokio::time::{Instant, sleep, timeout};

/// The lease TTL the coordinators run with here (etcd's minimum with its
/// default timing is about 1.5s).
const TTL: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------
// Helpers.

async fn coordinator(etcd: &Etcd, advertise: &str) -> EtcdCoordination {
    EtcdCoordination::connect(
        vec![etcd.endpoint()],
        advertise.to_string(),
        TTL,
        keys::DEFAULT_PREFIX.to_string(),
    )
    .await
    .expect("connect to etcd")
}

/// A fresh etcd and one coordinator on it, once it leads, with its epoch; `None` (after a
/// note) without an etcd binary.
async fn sole_leader(test: &str) -> Option<(Etcd, EtcdCoordination, u64)> {
    let etcd = Etcd::start_or_skip(test).await?;
    let c = coordinator(&etcd, "10.0.0.1:7070").await;
    let epoch = wait_leadership(&c, "leadership", TTL * 3, Leadership::is_leader)
        .await
        .epoch()
        .unwrap();
    Some((etcd, c, epoch))
}

async fn raw_client(etcd: &Etcd) -> Client {
    Client::connect([etcd.endpoint()], None)
        .await
        .expect("etcd client")
}

/// Polls `check` until it returns `Some`, or panics after `limit`.
async fn eventually<T>(
    what: &str,
    limit: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    wait_for(what, limit, async || Ok(check().await))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

async fn wait_leadership(
    c: &EtcdCoordination,
    what: &str,
    limit: Duration,
    pred: impl FnMut(&Leadership) -> bool,
) -> Leadership {
    let mut rx = c.leadership();
    match timeout(limit, rx.wait_for(pred)).await {
        Ok(Ok(l)) => l.clone(),
        Ok(Err(_)) => panic!("leadership channel closed waiting for {what}"),
        Err(_) => panic!(
            "timed out after {limit:?} waiting for {what}; leadership is {:?}",
            *c.leadership().borrow()
        ),
    }
}

/// Waits until one of `a`, `b` leads; returns (leader, follower, epoch).
async fn elect<'c>(
    a: &'c EtcdCoordination,
    b: &'c EtcdCoordination,
) -> (&'c EtcdCoordination, &'c EtcdCoordination, u64) {
    let (leader, follower, epoch) =
        eventually("a leader", Duration::from_secs(10), async || {
            match (
                a.leadership().borrow().epoch(),
                b.leadership().borrow().epoch(),
            ) {
                (Some(_), Some(_)) => panic!("two leaders at once"),
                (Some(e), None) => Some((a, b, e)),
                (None, Some(e)) => Some((b, a, e)),
                (None, None) => None,
            }
        })
        .await;
    assert_eq!(leader.election_key().map(|k| k.epoch), Some(epoch));
    (leader, follower, epoch)
}

fn shards(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn held(plan: &str, lease: i64, names: &[&str]) -> Vec<(String, String, i64)> {
    names
        .iter()
        .map(|s| (s.to_string(), plan.to_string(), lease))
        .collect()
}

async fn lock_table(c: &impl Coordination) -> Vec<(String, String, i64)> {
    c.locks()
        .await
        .expect("locks")
        .into_iter()
        .map(|l| (l.shard, l.plan_id, l.lease))
        .collect()
}

// ---------------------------------------------------------------------------
// Scenarios.

/// Named so that `cargo test -p flotilla-coordinator coordination` picks them up.
mod etcd_coordination {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deposed_leader_cannot_decide_and_the_next_one_leads_with_a_higher_epoch() {
        let Some(etcd) = Etcd::start_or_skip("takeover").await else {
            return;
        };
        let a = coordinator(&etcd, "10.0.0.1:7070").await;
        let b = coordinator(&etcd, "10.0.0.2:7070").await;
        assert_eq!(a.kind(), "etcd");
        let (old, new, epoch1) = elect(&a, &b).await;
        let old_addr = if std::ptr::eq(old, &a) {
            "10.0.0.1:7070"
        } else {
            "10.0.0.2:7070"
        };
        let new_addr = if std::ptr::eq(new, &a) {
            "10.0.0.1:7070"
        } else {
            "10.0.0.2:7070"
        };
        // The follower learns who leads.
        wait_leadership(new, "the follower to know the leader", TTL * 3, |l| {
            *l == Leadership::Follower {
                leader: Some(old_addr.to_string()),
            }
        })
        .await;

        assert_eq!(
            old.decide("g1", Decision::Commit, epoch1).await,
            Ok(Decision::Commit)
        );
        assert_eq!(
            new.decide("g1", Decision::Abort, epoch1).await,
            Err(CoordinationError::NotLeader),
            "a follower decides nothing"
        );

        // Kill the leader's session lease behind its back: its election key goes
        // with it, and etcd refuses its decisions before it even notices.
        let lease = old.session_lease().expect("the leader has a session lease");
        raw_client(&etcd)
            .await
            .lease_revoke(lease)
            .await
            .expect("revoke");
        assert_eq!(
            old.decide("g2", Decision::Commit, epoch1).await,
            Err(CoordinationError::NotLeader)
        );
        let revoked = Instant::now();
        wait_leadership(old, "the deposed leader to step down", TTL, |l| {
            !l.is_leader()
        })
        .await;
        eprintln!("deposed leader stepped down after {:?}", revoked.elapsed());

        let epoch2 = wait_leadership(
            new,
            "the other coordinator to lead",
            TTL * 3,
            Leadership::is_leader,
        )
        .await
        .epoch()
        .unwrap();
        assert!(epoch2 > epoch1, "epoch {epoch2} after {epoch1}");

        assert_eq!(
            new.decide("g2", Decision::Abort, epoch2).await,
            Ok(Decision::Abort)
        );
        assert_eq!(
            new.decide("g2", Decision::Commit, epoch2).await,
            Ok(Decision::Abort),
            "the first decision stands"
        );
        assert_eq!(
            old.decide("g2", Decision::Commit, epoch1).await,
            Err(CoordinationError::NotLeader)
        );
        assert_eq!(old.decision("g2").await, Ok(Some(Decision::Abort)));
        assert_eq!(new.decision("g1").await, Ok(Some(Decision::Commit)));
        assert_eq!(new.decision("g3").await, Ok(None));

        // The old leader campaigns again, behind the new one.
        wait_leadership(old, "the old leader to follow the new one", TTL * 3, |l| {
            *l == Leadership::Follower {
                leader: Some(new_addr.to_string()),
            }
        })
        .await;
        assert_eq!(new.leadership().borrow().epoch(), Some(epoch2));
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_leader_keeps_a_running_plans_locks_alive() {
        let Some(etcd) = Etcd::start_or_skip("handover").await else {
            return;
        };
        let a = coordinator(&etcd, "10.0.0.1:7070").await;
        let b = coordinator(&etcd, "10.0.0.2:7070").await;
        let (old, new, epoch1) = elect(&a, &b).await;
        assert_eq!(
            old.lock_shards("p1", &shards(&["s1", "s2"]), epoch1).await,
            Ok(LockOutcome::Taken)
        );
        let lease = old
            .plan_lease("p1")
            .await
            .unwrap()
            .expect("p1's lease is stored");
        assert_eq!(lock_table(old).await, held("p1", lease, &["s1", "s2"]));

        // A graceful stop hands leadership over without waiting out the TTL.
        let stopped = Instant::now();
        old.shutdown().await;
        assert_eq!(
            *old.leadership().borrow(),
            Leadership::Follower { leader: None }
        );
        let epoch2 = wait_leadership(
            new,
            "the other coordinator to lead",
            TTL,
            Leadership::is_leader,
        )
        .await
        .epoch()
        .unwrap();
        eprintln!("handover took {:?}", stopped.elapsed());
        assert!(epoch2 > epoch1);
        assert_eq!(
            old.lock_shards("p1", &shards(&["s1"]), epoch1).await,
            Err(CoordinationError::NotLeader)
        );

        // The new leader re-takes the plan's locks under the plan's stored lease.
        assert_eq!(new.plan_lease("p1").await, Ok(Some(lease)));
        assert_eq!(
            new.lock_shards("p1", &shards(&["s2", "s1"]), epoch2).await,
            Ok(LockOutcome::Taken)
        );
        // ... and keeps it alive well past its TTL.
        sleep(TTL * 3).await;
        assert_eq!(lock_table(new).await, held("p1", lease, &["s1", "s2"]));

        new.release_shards("p1", epoch2).await.expect("release");
        assert!(lock_table(new).await.is_empty());
        assert_eq!(new.plan_lease("p1").await, Ok(None));
        new.release_shards("p1", epoch2)
            .await
            .expect("releasing nothing is fine");
        new.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shard_locks_are_all_or_nothing() {
        let Some((etcd, c, epoch)) = sole_leader("locks").await else {
            return;
        };

        assert_eq!(
            c.lock_shards("p1", &shards(&["s1", "s2"]), epoch).await,
            Ok(LockOutcome::Taken)
        );
        let p1 = c.plan_lease("p1").await.unwrap().expect("p1 lease");
        // Overlapping in one shard: nothing is taken, and the holder is named.
        assert_eq!(
            c.lock_shards("p2", &shards(&["s3", "s2"]), epoch).await,
            Ok(LockOutcome::Held {
                shard: "s2".into(),
                plan_id: "p1".into()
            })
        );
        assert_eq!(lock_table(&c).await, held("p1", p1, &["s1", "s2"]));
        assert_eq!(c.plan_lease("p2").await, Ok(None));
        // The holder may ask again.
        assert_eq!(
            c.lock_shards("p1", &shards(&["s1", "s2", "s1"]), epoch)
                .await,
            Ok(LockOutcome::Taken)
        );
        assert_eq!(
            c.lock_shards("p3", &shards(&["s9"]), epoch + 1).await,
            Err(CoordinationError::NotLeader)
        );
        assert!(matches!(
            c.lock_shards("", &shards(&["s9"]), epoch).await,
            Err(CoordinationError::InvalidArgument(_))
        ));

        // Breaking a lock frees that shard only.
        assert_eq!(c.break_lock("s2").await, Ok(true));
        assert_eq!(c.break_lock("s2").await, Ok(false));
        assert_eq!(
            c.lock_shards("p2", &shards(&["s3", "s2"]), epoch).await,
            Ok(LockOutcome::Taken)
        );
        let p2 = c.plan_lease("p2").await.unwrap().expect("p2 lease");
        assert_ne!(p1, p2);
        let mut expected = held("p1", p1, &["s1"]);
        expected.extend(held("p2", p2, &["s2", "s3"]));
        assert_eq!(lock_table(&c).await, expected);

        // Locks live under their plan's lease: gone with it.
        raw_client(&etcd)
            .await
            .lease_revoke(p1)
            .await
            .expect("revoke");
        assert_eq!(lock_table(&c).await, held("p2", p2, &["s2", "s3"]));
        assert_eq!(c.plan_lease("p1").await, Ok(None));
        // Locking again right away (before the lease keeper noticed) takes a new lease.
        assert_eq!(
            c.lock_shards("p1", &shards(&["s1"]), epoch).await,
            Ok(LockOutcome::Taken)
        );
        let p1_again = c.plan_lease("p1").await.unwrap().expect("p1's new lease");
        assert_ne!(p1_again, p1);
        let mut expected = held("p1", p1_again, &["s1"]);
        expected.extend(held("p2", p2, &["s2", "s3"]));
        assert_eq!(lock_table(&c).await, expected);
        c.release_shards("p1", epoch).await.expect("release p1");

        c.release_shards("p2", epoch).await.expect("release");
        assert!(lock_table(&c).await.is_empty());
        c.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn live_agents_follow_the_agents_leases() {
        let Some(etcd) = Etcd::start_or_skip("agents").await else {
            return;
        };
        let mut raw = raw_client(&etcd).await;
        let prefix = keys::DEFAULT_PREFIX;
        let early = raw.lease_grant(30, None).await.unwrap().id();
        raw.put(
            keys::agent(prefix, "shard_0"),
            "agent-0",
            Some(PutOptions::new().with_lease(early)),
        )
        .await
        .unwrap();

        let c = coordinator(&etcd, "10.0.0.1:7070").await;
        let mut live = c.live_agents();
        let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let expect = async |live: &mut tokio::sync::watch::Receiver<BTreeSet<String>>,
                            want: BTreeSet<String>| {
            timeout(Duration::from_secs(10), live.wait_for(|s| *s == want))
                .await
                .unwrap_or_else(|_| panic!("live agents never became {want:?}"))
                .expect("live agents channel");
        };
        expect(&mut live, set(&["shard_0"])).await;

        let late = raw.lease_grant(30, None).await.unwrap().id();
        raw.put(
            keys::agent(prefix, "shard_1"),
            "agent-1",
            Some(PutOptions::new().with_lease(late)),
        )
        .await
        .unwrap();
        expect(&mut live, set(&["shard_0", "shard_1"])).await;

        raw.lease_revoke(late).await.unwrap();
        expect(&mut live, set(&["shard_0"])).await;
        raw.lease_revoke(early).await.unwrap();
        expect(&mut live, set(&[])).await;
        c.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_etcd_deposes_the_leader_within_the_ttl() {
        let Some((etcd, c, epoch1)) = sole_leader("paused").await else {
            return;
        };

        etcd.pause().expect("SIGSTOP etcd");
        let paused = Instant::now();
        wait_leadership(
            &c,
            "the leader to step down",
            TTL + Duration::from_secs(1),
            |l| !l.is_leader(),
        )
        .await;
        let took = paused.elapsed();
        eprintln!("stepped down {took:?} after etcd froze");
        assert!(took <= TTL, "stepped down after {took:?}, TTL {TTL:?}");
        assert_eq!(
            c.decide("g", Decision::Commit, epoch1).await,
            Err(CoordinationError::NotLeader)
        );

        etcd.resume().expect("SIGCONT etcd");
        let epoch2 = wait_leadership(
            &c,
            "leadership again",
            Duration::from_secs(20),
            Leadership::is_leader,
        )
        .await
        .epoch()
        .unwrap();
        assert!(epoch2 > epoch1, "epoch {epoch2} after {epoch1}");
        assert_eq!(
            c.decide("g", Decision::Commit, epoch2).await,
            Ok(Decision::Commit)
        );
        c.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_fences_a_leader_that_does_not_know_it_was_deposed() {
        let Some((etcd, c, epoch1)) = sole_leader("fenced").await else {
            return;
        };
        assert_eq!(
            c.lock_shards("p1", &shards(&["s1"]), epoch1).await,
            Ok(LockOutcome::Taken)
        );

        // Its election key vanishes while its lease lives on and no other
        // candidate shows up: nothing tells this coordinator, but etcd refuses
        // every write fenced with the old key.
        let key = c.election_key().expect("leader's key").key;
        let deleted = raw_client(&etcd).await.delete(key, None).await.unwrap();
        assert_eq!(deleted.deleted(), 1);
        assert!(c.leadership().borrow().is_leader(), "nothing noticed yet");
        assert_eq!(
            c.decide("g", Decision::Commit, epoch1).await,
            Err(CoordinationError::NotLeader)
        );
        assert_eq!(
            c.decision("g").await,
            Ok(None),
            "the refused decision was not written"
        );

        // The refusal ends the session: it steps down and campaigns anew.
        let epoch2 = wait_leadership(&c, "leadership under a new key", TTL * 3, |l| {
            l.epoch().is_some_and(|e| e != epoch1)
        })
        .await
        .epoch()
        .unwrap();
        assert!(epoch2 > epoch1);
        assert_eq!(
            c.lock_shards("p2", &shards(&["s2"]), epoch1).await,
            Err(CoordinationError::NotLeader)
        );
        assert_eq!(
            c.release_shards("p1", epoch1).await,
            Err(CoordinationError::NotLeader)
        );
        assert_eq!(
            c.decide("g", Decision::Abort, epoch2).await,
            Ok(Decision::Abort)
        );

        // A revoked session lease: the next keep-alive answers TTL 0.
        let lease = c.session_lease().expect("session lease");
        raw_client(&etcd).await.lease_revoke(lease).await.unwrap();
        let revoked = Instant::now();
        wait_leadership(&c, "the leader to step down", TTL, |l| !l.is_leader()).await;
        eprintln!(
            "stepped down {:?} after its lease was revoked",
            revoked.elapsed()
        );
        let epoch3 = wait_leadership(&c, "leadership again", TTL * 3, Leadership::is_leader)
            .await
            .epoch()
            .unwrap();
        assert!(epoch3 > epoch2);
        c.shutdown().await;
    }

    #[tokio::test]
    async fn an_unreachable_etcd_is_named_in_the_error() {
        let endpoint = format!("http://127.0.0.1:{}", free_port());
        let started = Instant::now();
        let err = match EtcdCoordination::connect(
            vec![endpoint.clone()],
            "10.0.0.1:7070".into(),
            TTL,
            keys::DEFAULT_PREFIX.into(),
        )
        .await
        {
            Ok(_) => panic!("connected to nothing at {endpoint}"),
            Err(e) => e,
        };
        assert!(
            matches!(err, CoordinationError::Unavailable { ref endpoints, .. } if endpoints == &endpoint),
            "{err:?}"
        );
        eprintln!("{err}");
        assert!(err.to_string().contains(&endpoint), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
