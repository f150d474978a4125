//! Where each data change stands: a change publishes its progress on its target
//! ([`Progress`]) to the agent's board ([`ProgressBoard`]), which the session sends to the
//! coordinator with every heartbeat.
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flotilla_core::pb;

/// (plan, migration, target)
type ProgressKey = (String, String, String);
/// The states of a change that ended: its entry goes once sent.
const ENDED: [&str; 3] = ["done", "stopped", "failed"];
/// The latest progress of each data change of the agent, keyed by (plan, migration, target).
/// The session sends what changed with each heartbeat; finished entries go once sent.
#[derive(Default)]
pub(crate) struct ProgressBoard {
    entries: Mutex<BTreeMap<ProgressKey, (pb::DataProgress, bool)>>,
}

impl ProgressBoard {
    pub fn update(&self, p: pb::DataProgress) {
        let key = (p.plan_id.clone(), p.migration_id.clone(), p.tenant.clone());
        self.entries
            .lock()
            .expect("progress lock")
            .insert(key, (p, true));
    }

    /// The change's step ended (`state`: "failed" or "stopped") somewhere its batches did not
    /// say so (before them, or between attempts): its entry, if it has one that has not
    /// ended, ends with it, so it is not shown as still running or throttled.
    pub fn end(&self, plan_id: &str, migration_id: &str, tenant: &str, state: &str, reason: &str) {
        let key = (
            plan_id.to_string(),
            migration_id.to_string(),
            tenant.to_string(),
        );
        if let Some((p, changed)) = self.entries.lock().expect("progress lock").get_mut(&key)
            && !ENDED.contains(&p.state.as_str())
        {
            p.state = state.to_string();
            p.reason = reason.to_string();
            p.rows_per_second = 0.0;
            p.eta_ms = 0;
            *changed = true;
        }
    }

    /// Entries changed since the last call; entries of changes that ended are dropped once
    /// they have been handed out.
    pub fn take_changed(&self) -> Vec<pb::DataProgress> {
        let mut entries = self.entries.lock().expect("progress lock");
        let mut out = Vec::new();
        entries.retain(|_, (p, changed)| {
            let finished = ENDED.contains(&p.state.as_str());
            if *changed {
                out.push(p.clone());
                *changed = false;
            }
            // a change that ended is forgotten once its last state went out
            !finished
        });
        out
    }

    /// After a new stream: everything still running is sent again.
    /// Entries that [`Self::take_changed`] handed out but could not be sent: changed again,
    /// unless a newer state of theirs came in meanwhile.
    pub fn put_back(&self, unsent: Vec<pb::DataProgress>) {
        let mut entries = self.entries.lock().expect("progress lock");
        for p in unsent {
            let key = (p.plan_id.clone(), p.migration_id.clone(), p.tenant.clone());
            entries.entry(key).or_insert((p, true));
        }
    }

    /// Drops a change's entry unsent: an undo's, once done (the coordinator drops it with
    /// the step's undo; sent after the rollback's reply, it would come back as a change
    /// still shown).
    pub fn forget(&self, plan_id: &str, migration_id: &str, tenant: &str) {
        let key = (
            plan_id.to_string(),
            migration_id.to_string(),
            tenant.to_string(),
        );
        self.entries.lock().expect("progress lock").remove(&key);
    }

    pub fn mark_all_changed(&self) {
        for (_, changed) in self.entries.lock().expect("progress lock").values_mut() {
            *changed = true;
        }
    }
}

/// Where a change publishes its progress: the agent's board, under its plan and shard.
#[derive(Clone, Copy)]
pub(crate) struct Publish<'a> {
    pub plan_id: &'a str,
    pub shard: &'a str,
    pub board: &'a ProgressBoard,
}

impl Publish<'_> {
    /// A schema step (or its undo) of `tenant` waiting to try its lock again: on the board
    /// as a change in state `lock_wait`, with why (the caller takes it off when it is over).
    pub(crate) fn lock_wait(&self, tenant: &str, migration: &str, reason: String) {
        self.board.update(pb::DataProgress {
            plan_id: self.plan_id.to_string(),
            migration_id: migration.to_string(),
            shard: self.shard.to_string(),
            tenant: tenant.to_string(),
            state: flotilla_core::protocol::LOCK_WAIT.into(),
            reason,
            ..Default::default()
        });
    }
}

/// What an undo of a data change on one target shares with the rest of the plan on this
/// shard: where its progress shows, and the server's row budget (`server_rows_per_second`,
/// one bucket per step, as its forward batches share it).
#[derive(Clone, Copy)]
pub(crate) struct UndoShared<'a> {
    pub publish: Publish<'a>,
    pub buckets: &'a super::ServerBuckets,
    /// The shard's pool, to watch an undo's lock wait from another session.
    pub pool: &'a sqlx::PgPool,
    /// The rows a prior image's restore left with their newer values (changed or deleted
    /// since their batch), added up for the undo's reply: the plan says so at its end (only
    /// the agent's log did, under a rollback that read as a plain success).
    pub rows_kept: &'a std::sync::atomic::AtomicU64,
}

/// A data change's progress on its target, published to the agent's board (and from there
/// to the coordinator with each heartbeat).
pub(super) struct Progress<'a> {
    hooks: Option<Publish<'a>>,
    tenant: String,
    migration: String,
    pub(super) done: u64,
    pub(super) total: u64,
    pub(super) batches: u64,
    pub(super) size: u32,
    pub(super) state: String,
    /// (when, rows done then) over the last seconds: the rate is taken over them.
    recent: VecDeque<(Instant, u64)>,
    /// Batches done since this progress began (this attempt of the step).
    batches_here: u64,
    /// The state while batches go: `running`, or `undoing` for a prior image's restore.
    moving: &'static str,
    /// The planner's estimate of the rows was passed: the total is only a batch ahead of
    /// what is done, and an ETA from it would say one batch's time for as long as it lasts
    /// ("ETA 1s" for six seconds, after a rollback left the table's statistics stale).
    beyond_estimate: bool,
}

impl<'a> Progress<'a> {
    pub(super) fn new(
        hooks: Option<Publish<'a>>,
        tenant: &str,
        migration: &str,
        done: u64,
        batches: u64,
    ) -> Progress<'a> {
        let mut recent = VecDeque::new();
        recent.push_back((Instant::now(), done));
        Progress {
            hooks,
            tenant: tenant.to_string(),
            migration: migration.to_string(),
            done,
            total: done,
            batches,
            size: 0,
            state: "running".into(),
            recent,
            batches_here: 0,
            beyond_estimate: false,
            moving: "running",
        }
    }

    /// A prior image's restore (`rows` saved by the batches it puts back, at most): its
    /// progress as a change's is, its state `undoing` (a rollback of a large backfill showed
    /// nothing for a minute and more, and read as hung).
    /// The undo is done: its entry goes from the board unsent (see [`ProgressBoard::forget`]).
    pub(super) fn forget(&self) {
        if let Some(h) = self.hooks {
            h.board.forget(h.plan_id, &self.migration, &self.tenant);
        }
    }

    pub(super) fn undoing(
        hooks: Option<Publish<'a>>,
        tenant: &str,
        migration: &str,
        rows: u64,
    ) -> Progress<'a> {
        let mut p = Progress::new(hooks, tenant, migration, 0, 0);
        p.total = rows;
        p.moving = "undoing";
        p
    }

    /// The checkpoint says more is done than this run did: another run's session committed
    /// a batch meanwhile (see `batches`), counted as done.
    pub(super) fn overtaken(&mut self, rows: u64, batches: u64) {
        self.done = self.done.max(rows);
        self.batches = self.batches.max(batches);
        self.total = self.total.max(self.done);
    }

    pub(super) fn batch(&mut self, rows: u64, size: u32) {
        self.done += rows;
        self.batches += 1;
        // A full batch says more may follow: a total the estimate put at what is done or
        // below (a table never analyzed, where the planner guesses a third of its rows) is
        // not "all done, ETA 0" while rows are left; the last, short batch ends it.
        self.total = if rows >= u64::from(size) && self.total <= self.done {
            self.beyond_estimate = true;
            self.done + rows
        } else {
            self.total.max(self.done)
        };
        let now = Instant::now();
        if self.batches_here == 0 {
            // The rate is taken from the first batch's end: that batch went at once (the
            // rate limit's bucket starts full), and over its query time alone it read as 15
            // times the limit (31,142 rows/s under 2,000).
            self.recent.clear();
        }
        self.batches_here += 1;
        self.recent.push_back((now, self.done));
        while self.recent.len() > 2
            && now.duration_since(self.recent[0].0) > Duration::from_secs(10)
        {
            self.recent.pop_front();
        }
        self.set(self.moving, "", size);
    }

    fn rate(&self) -> f64 {
        let (Some(first), Some(last)) = (self.recent.front(), self.recent.back()) else {
            return 0.0;
        };
        let dt = last.0.duration_since(first.0).as_secs_f64();
        if dt <= 0.0 {
            0.0
        } else {
            (last.1 - first.1) as f64 / dt
        }
    }

    pub(super) fn set(&mut self, state: &str, reason: &str, size: u32) {
        self.state = state.to_string();
        self.size = size;
        // Paused or throttled, nothing moves: no rate and no ETA (a paused change showed its
        // last rate and "ETA 2s" for as long as it stayed paused), and the rate after it goes
        // on is taken from then, not over the wait.
        let moving = state == self.moving;
        if !moving {
            self.recent.clear();
            self.recent.push_back((Instant::now(), self.done));
        }
        let Some(h) = self.hooks else { return };
        let rate = if moving { self.rate() } else { 0.0 };
        let left = self.total.saturating_sub(self.done);
        let eta_ms = if rate > 0.0 && left > 0 && !self.beyond_estimate && moving {
            (left as f64 / rate * 1000.0) as u64
        } else {
            0
        };
        h.board.update(pb::DataProgress {
            plan_id: h.plan_id.to_string(),
            migration_id: self.migration.clone(),
            shard: h.shard.to_string(),
            tenant: self.tenant.clone(),
            rows_done: self.done,
            rows_total: self.total,
            rows_per_second: rate,
            batch_size: size,
            eta_ms,
            state: state.to_string(),
            reason: reason.to_string(),
            batches: self.batches,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(migration: &str, state: &str, rows: u64) -> pb::DataProgress {
        pb::DataProgress {
            plan_id: "p".into(),
            migration_id: migration.into(),
            tenant: "t".into(),
            rows_done: rows,
            state: state.into(),
            ..Default::default()
        }
    }

    /// Where a test's change publishes: plan `p`, shard `s`, on `board`.
    fn publish(board: &ProgressBoard) -> Publish<'_> {
        Publish {
            plan_id: "p",
            shard: "s",
            board,
        }
    }

    /// An estimate below the truth (25 rows guessed as 8) never shows as finished while
    /// full batches come: the total stays a batch ahead of what is done.
    #[test]
    fn a_low_estimate_stays_ahead_of_the_rows_done_while_full_batches_come() {
        let board = ProgressBoard::default();
        let mut p = Progress::new(Some(publish(&board)), "t", "m", 0, 0);
        p.total = 8;
        for done in [5, 10, 15, 20] {
            p.batch(5, 5);
            assert_eq!(p.done, done);
            assert!(p.total > p.done, "{} of {}", p.done, p.total);
            // a rate, but no ETA: past the estimate, one batch's time is not one
            p.recent[0].0 -= Duration::from_secs(1);
        }
        let last = board.take_changed().pop().expect("published");
        assert!(last.rows_per_second > 0.0, "{last:?}");
        assert_eq!(last.eta_ms, 0, "{last:?}");
    }

    /// Paused (or throttled), a change shows no rate and no ETA, and its rate when it goes
    /// on is not taken over the wait.
    #[test]
    fn a_change_that_waits_shows_no_rate_and_no_eta() {
        let board = ProgressBoard::default();
        let mut p = Progress::new(Some(publish(&board)), "t", "m", 0, 0);
        p.total = 100;
        // the first batch gives no rate (it went at once: the rate limit's bucket starts
        // full); the second gives the rate since the first ended
        p.batch(10, 10);
        let first = board.take_changed().remove(0);
        assert_eq!(first.rows_per_second, 0.0, "{first:?}");
        // a rate needs time between samples
        p.recent[0].0 -= Duration::from_secs(1);
        p.batch(10, 10);
        let running = board.take_changed().remove(0);
        assert!(
            running.rows_per_second > 0.0 && running.rows_per_second <= 10.5 && running.eta_ms > 0,
            "10 rows in about a second: {running:?}"
        );
        for state in ["paused", "throttled"] {
            p.set(state, "by an operator", 10);
            let waiting = board.take_changed().remove(0);
            assert_eq!(waiting.state, state);
            assert_eq!(waiting.rows_per_second, 0.0, "{waiting:?}");
            assert_eq!(waiting.eta_ms, 0, "{waiting:?}");
            assert_eq!(p.recent.len(), 1, "the rate starts again from here");
        }
    }

    #[test]
    fn the_board_sends_changes_once_and_forgets_finished_changes() {
        let board = ProgressBoard::default();
        board.update(progress("a", "running", 10));
        board.update(progress("b", "running", 5));
        assert_eq!(board.take_changed().len(), 2);
        assert!(board.take_changed().is_empty(), "nothing changed");
        board.update(progress("a", "done", 20));
        let sent = board.take_changed();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].rows_done, 20);
        // `a` is gone after it was sent as done; `b` still runs and is resent after a reconnect
        board.mark_all_changed();
        let again = board.take_changed();
        assert_eq!(again.len(), 1, "{again:?}");
        assert_eq!(again[0].migration_id, "b");
    }
}
