//! The order in which plans take their shard locks, and the releases under way.
//!
//! A plan takes all its shard locks or none. Plans waiting for them used to retry each
//! second, whichever came first after a release taking them: a plan submitted later could
//! run before one submitted earlier on the same shards (a second plan on a column the first
//! adds failed, the first then finding it there), and a plan needing many shards could wait
//! for good behind plans needing one each. Waiting plans queue in submit order: a plan
//! takes its locks only once no plan queued before it needs one of its shards (plans on
//! other shards go on). A release wakes the queue at once.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug, Default, Clone)]
pub struct LockQueue(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    /// Plans whose shard locks are being released (a task that tries until the backend
    /// takes it), with how many releases. Locks are keyed by plan id: a release landing
    /// late, after a new start of the same plan (a retry, a rollback of it) took its locks,
    /// deleted the new run's, and it ran with none. A start takes its locks only once no
    /// release of its plan is under way.
    releasing: Mutex<HashMap<String, usize>>,
    /// Plans waiting for their locks, by (order, arrival).
    waiting: Mutex<BTreeMap<(i64, u64), Waiting>>,
    arrivals: AtomicU64,
    /// Told when a lock may have come free, or a plan left the queue.
    moved: Notify,
}

#[derive(Debug)]
struct Waiting {
    plan_id: String,
    epoch: u64,
    shards: BTreeSet<String>,
    /// Whether it stands in the way of plans queued after it: not while its own attempts
    /// fail for another reason than a lock held (an error it may never get past: plans
    /// behind it waited for good).
    in_the_way: bool,
}

impl LockQueue {
    pub fn begin(&self, plan_id: &str) {
        *self
            .0
            .releasing
            .lock()
            .expect("lock releases")
            .entry(plan_id.to_string())
            .or_default() += 1;
    }

    /// A release is over (done, given up, or its task gone): plans waiting look again.
    pub fn end(&self, plan_id: &str) {
        {
            let mut releases = self.0.releasing.lock().expect("lock releases");
            if let Some(n) = releases.get_mut(plan_id) {
                *n -= 1;
                if *n == 0 {
                    releases.remove(plan_id);
                }
            }
        }
        self.freed();
    }

    pub fn pending(&self, plan_id: &str) -> bool {
        self.0
            .releasing
            .lock()
            .expect("lock releases")
            .contains_key(plan_id)
    }

    /// A lock may have come free (broken by an operator, released): plans waiting look again.
    pub fn freed(&self) {
        self.0.moved.notify_waiters();
    }

    /// Queues a plan waiting for its shard locks under `order` (its submit time, in ms; the
    /// time an operator asked for it again for a plan revived): it leaves the queue when the
    /// returned guard goes.
    pub fn enter(
        &self,
        plan_id: &str,
        epoch: u64,
        order: i64,
        shards: impl IntoIterator<Item = String>,
    ) -> QueuedPlan {
        let key = (order, self.0.arrivals.fetch_add(1, Ordering::Relaxed));
        {
            let mut waiting = self.0.waiting.lock().expect("lock queue");
            // A plan queued again (a halt and a retry within the second the first task
            // sleeps): its place is the new one, and the task that queued it before leaves
            // (`QueuedPlan::replaced`), or it kept the first submit's place.
            waiting.retain(|_, w| w.plan_id != plan_id);
            waiting.insert(
                key,
                Waiting {
                    plan_id: plan_id.to_string(),
                    epoch,
                    shards: shards.into_iter().collect(),
                    in_the_way: true,
                },
            );
        }
        self.freed();
        QueuedPlan {
            queue: self.clone(),
            key,
        }
    }
}

/// A plan's place in the [`LockQueue`].
#[derive(Debug)]
pub struct QueuedPlan {
    queue: LockQueue,
    key: (i64, u64),
}

impl QueuedPlan {
    /// The first plan queued before this one (in the same term) that needs one of its
    /// shards, and that shard; None: nothing queued before it stands in its way.
    pub fn behind(&self) -> Option<(String, String)> {
        let waiting = self.queue.0.waiting.lock().expect("lock queue");
        let me = waiting.get(&self.key)?;
        waiting
            .range(..self.key)
            .filter(|(_, w)| w.epoch == me.epoch && w.plan_id != me.plan_id && w.in_the_way)
            .find_map(|(_, w)| {
                me.shards
                    .intersection(&w.shards)
                    .next()
                    .map(|shard| (w.plan_id.clone(), shard.clone()))
            })
    }

    /// Whether the plan was queued again since (by a later start of it): this place is
    /// gone, and the task holding it is to leave.
    pub fn replaced(&self) -> bool {
        !self
            .queue
            .0
            .waiting
            .lock()
            .expect("lock queue")
            .contains_key(&self.key)
    }

    /// After an attempt at its locks: whether it stands in the way of the plans queued
    /// after it (a lock held by another plan, or a plan ahead of it: yes; an error it may
    /// never get past: no, see `Waiting`).
    pub fn stands_in_the_way(&self, yes: bool) {
        let changed = {
            let mut waiting = self.queue.0.waiting.lock().expect("lock queue");
            match waiting.get_mut(&self.key) {
                Some(w) if w.in_the_way != yes => {
                    w.in_the_way = yes;
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.queue.freed();
        }
    }

    /// Resolves when a lock may have come free or the queue moved. Made (and enabled)
    /// before looking, so that nothing between the look and the wait is missed.
    pub fn moved(&self) -> std::pin::Pin<Box<tokio::sync::futures::Notified<'_>>> {
        let mut moved = Box::pin(self.queue.0.moved.notified());
        moved.as_mut().enable();
        moved
    }
}

impl Drop for QueuedPlan {
    fn drop(&mut self) {
        self.queue
            .0
            .waiting
            .lock()
            .expect("lock queue")
            .remove(&self.key);
        self.queue.freed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_plan_waits_behind_earlier_plans_on_its_shards_only() {
        let queue = LockQueue::default();
        let later = queue.enter("p3", 1, 300, shards(&["s1", "s2"]));
        let first = queue.enter("p1", 1, 100, shards(&["s2"]));
        let other = queue.enter("p2", 1, 200, shards(&["s9"]));
        // submit order, not arrival order: p1 was submitted before p3
        assert_eq!(later.behind(), Some(("p1".into(), "s2".into())));
        assert_eq!(first.behind(), None);
        assert_eq!(other.behind(), None, "no shard in common");
        drop(first);
        assert_eq!(later.behind(), None, "p1 left the queue");
        // a plan of another term (a task of a term that ended) stands in no one's way
        let stale = queue.enter("p0", 0, 50, shards(&["s1"]));
        assert_eq!(later.behind(), None);
        drop(stale);
        // a plan whose own attempts fail (not a lock held) stands in no one's way
        let failing = queue.enter("p1b", 1, 150, shards(&["s1"]));
        assert_eq!(later.behind(), Some(("p1b".into(), "s1".into())));
        failing.stands_in_the_way(false);
        assert_eq!(later.behind(), None);
        failing.stands_in_the_way(true);
        assert_eq!(later.behind(), Some(("p1b".into(), "s1".into())));
        drop(failing);
        // a plan queued again takes its new place; the first place is gone
        let again = queue.enter("p3", 1, 400, shards(&["s1", "s2"]));
        assert!(later.replaced() && !again.replaced());
        let p4 = queue.enter("p4", 1, 350, shards(&["s2"]));
        assert_eq!(again.behind(), Some(("p4".into(), "s2".into())));
        drop(later);
        assert!(
            !again.replaced(),
            "the old place's guard leaves the new one"
        );
        drop(p4);
        drop(again);
        drop(other);
        assert!(queue.0.waiting.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_release_wakes_the_plans_waiting() {
        let queue = LockQueue::default();
        let waiting = queue.enter("p1", 1, 100, shards(&["s1"]));
        let moved = waiting.moved();
        // told between the look and the wait: not missed
        queue.begin("p0");
        queue.end("p0");
        tokio::time::timeout(std::time::Duration::from_secs(5), moved)
            .await
            .expect("woken by the release");
        assert!(!queue.pending("p0"));
        let moved = waiting.moved();
        let left = queue.enter("p2", 1, 50, shards(&["s1"]));
        drop(left);
        tokio::time::timeout(std::time::Duration::from_secs(5), moved)
            .await
            .expect("woken by a plan leaving the queue");
    }
}
