//! The rows-per-second limits of data changes: a token bucket per change (its
//! `rows_per_second`), and one per step shared by all its targets on this shard
//! (`server_rows_per_second`: per shard database and step, kept here, so shard databases on
//! one PostgreSQL server and concurrent plans each have their own). Both the batches and the agent's shared state use it, so it
//! sits below both.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_core::DataChange;

/// A token bucket of rows: `rate` rows per second, holding at most `capacity` rows (one
/// batch, so that a batch always fits). Time is passed in, so it is testable.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// `idle`: how long the bucket has been refilling (a fresh change: full; a resumed one:
    /// the time since its checkpoint, so a restart does not burst beyond the rate).
    pub fn new(rate: u64, capacity: u64, idle: Duration, now: Instant) -> TokenBucket {
        let rate = rate as f64;
        let capacity = capacity.max(1) as f64;
        TokenBucket {
            rate,
            capacity,
            tokens: (rate * idle.as_secs_f64()).min(capacity),
            at: now,
        }
    }

    /// Takes `rows` tokens; returns how long to wait first (zero when they are there).
    /// A bucket shared by callers may be spoken for until a time still to come (`at`, when
    /// the debt of a caller before is paid back): the rows taken now come after that.
    pub fn take(&mut self, rows: u64, now: Instant) -> Duration {
        if now > self.at {
            let dt = now.duration_since(self.at).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.capacity);
            self.at = now;
        }
        self.tokens -= rows as f64;
        if self.tokens < 0.0 {
            // in debt: wait until the debt is paid back; the bucket is empty then
            self.at += Duration::from_secs_f64(-self.tokens / self.rate);
            self.tokens = 0.0;
        }
        self.at.saturating_duration_since(now)
    }

    /// Gives back `rows` taken at `now` and not used (the wait for them was cut short):
    /// the debt they made is taken off, or the tokens they took put back.
    pub fn give_back(&mut self, rows: u64, now: Instant) {
        let owed = Duration::from_secs_f64(rows as f64 / self.rate);
        if self.at > now {
            self.at = self.at.checked_sub(owed).map_or(now, |at| at.max(now));
        } else {
            self.tokens = (self.tokens + rows as f64).min(self.capacity);
        }
    }
}

/// One server's row budget for a step, shared by its targets' runs.
type SharedBucket = Arc<Mutex<TokenBucket>>;

/// One token bucket per data step for all its targets on this shard: the
/// `server_rows_per_second` budget. A fresh bucket starts empty, so a restarted agent does
/// not burst past the budget.
#[derive(Default)]
pub(crate) struct ServerBuckets {
    buckets: Mutex<HashMap<(String, String), SharedBucket>>,
}

impl ServerBuckets {
    fn bucket(&self, plan: &str, migration: &str, rate: u64, capacity: u64) -> SharedBucket {
        self.buckets
            .lock()
            .expect("buckets lock")
            .entry((plan.to_string(), migration.to_string()))
            .or_insert_with(|| {
                Arc::new(Mutex::new(TokenBucket::new(
                    rate,
                    capacity,
                    Duration::ZERO,
                    Instant::now(),
                )))
            })
            .clone()
    }
}

/// The limits one run of a change waits for before each batch: its own rate, and the budget
/// of its shard's server that it shares with the step's other targets.
pub(crate) struct RowLimits {
    own: Option<TokenBucket>,
    server: Option<SharedBucket>,
}

impl RowLimits {
    /// `checkpoint_age`: seconds since a resumed change's checkpoint was written (None for a
    /// fresh change, whose bucket starts full). `server`: the agent's buckets, the plan and
    /// the migration (None outside a plan: no server budget).
    pub fn new(
        d: &DataChange,
        checkpoint_age: Option<f64>,
        server: Option<(&ServerBuckets, &str, &str)>,
    ) -> RowLimits {
        let own = (d.rows_per_second > 0).then(|| {
            let idle = match checkpoint_age {
                Some(age) => Duration::from_secs_f64(age.max(0.0)),
                None => Duration::from_secs(3600),
            };
            // holds one batch: a bigger (adapted) batch waits for its debt
            TokenBucket::new(
                d.rows_per_second,
                u64::from(d.first_batch_size()),
                idle,
                Instant::now(),
            )
        });
        let server =
            server
                .filter(|_| d.server_rows_per_second > 0)
                .map(|(buckets, plan, migration)| {
                    buckets.bucket(
                        plan,
                        migration,
                        d.server_rows_per_second,
                        u64::from(d.first_batch_size()),
                    )
                });
        RowLimits { own, server }
    }

    /// Takes `rows` from both budgets, then waits out the longer of their debts.
    pub async fn wait(&mut self, rows: u64) {
        self.wait_unless(rows, std::future::pending()).await;
    }

    /// [`RowLimits::wait`], unless `interrupt` comes first (the plan paused or halted: a
    /// wait for a low rate can last minutes): then the rows are given back, and false.
    pub async fn wait_unless(&mut self, rows: u64, interrupt: impl Future<Output = ()>) -> bool {
        let mut wait = Duration::ZERO;
        if let Some(b) = self.own.as_mut() {
            wait = wait.max(b.take(rows, Instant::now()));
        }
        if let Some(b) = &self.server {
            wait = wait.max(b.lock().expect("bucket lock").take(rows, Instant::now()));
        }
        if wait.is_zero() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => true,
            () = interrupt => {
                let now = Instant::now();
                if let Some(b) = self.own.as_mut() {
                    b.give_back(rows, now);
                }
                if let Some(b) = &self.server {
                    b.lock().expect("bucket lock").give_back(rows, now);
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_limits_the_rate() {
        let t0 = Instant::now();
        // 100 rows/s, batches of 50, fresh: one batch at once, then one every 0.5s
        let mut b = TokenBucket::new(100, 50, Duration::from_secs(3600), t0);
        assert_eq!(b.take(50, t0), Duration::ZERO);
        assert_eq!(b.take(50, t0), Duration::from_millis(500));
        // the caller slept 0.5s: the next batch waits another 0.5s
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take(50, t1), Duration::from_millis(500));
        // over 10 simulated seconds, 100 rows/s (+ the first batch)
        let mut now = t1 + Duration::from_millis(500);
        let mut rows = 0;
        let end = now + Duration::from_secs(10);
        while now < end {
            now += b.take(50, now);
            rows += 50;
        }
        assert!((1000..=1050).contains(&rows), "{rows}");
    }

    /// The server budget's bucket is shared by the step's targets running at once: the
    /// second taker waits behind the first one's debt, not beside it (each waited 10 s and
    /// both batches ran then: twice the budget with two targets, N times with N).
    #[test]
    fn a_shared_bucket_queues_its_takers() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 1000, Duration::ZERO, t0);
        assert_eq!(b.take(1000, t0), Duration::from_secs(10));
        assert_eq!(b.take(1000, t0), Duration::from_secs(20));
        let t5 = t0 + Duration::from_secs(5);
        assert_eq!(b.take(500, t5), Duration::from_secs(20));
        // once the debts are paid back and the bucket refilled, no wait
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.take(1000, later), Duration::ZERO);
        // over 20 simulated seconds, 4 takers at each instant: 100 rows/s in all
        let mut now = later;
        let mut rows = 0;
        let end = now + Duration::from_secs(20);
        while now < end {
            let waits: Vec<Duration> = (0..4).map(|_| b.take(50, now)).collect();
            rows += 200;
            now += *waits.iter().max().unwrap();
        }
        assert!((2000..=2200).contains(&rows), "{rows}");
    }

    /// Rows taken for a wait cut short (a pause, a halt) are given back: the next taker
    /// waits for its own debt only.
    #[test]
    fn rows_given_back_are_not_owed() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 1000, Duration::ZERO, t0);
        assert_eq!(b.take(1000, t0), Duration::from_secs(10));
        let t2 = t0 + Duration::from_secs(2);
        b.give_back(1000, t2);
        // 300 taken now wait for themselves (3 s), not behind the 1000 (11 s); the 2 s
        // that paid part of the debt given back are not credited (the budget errs low)
        assert_eq!(b.take(300, t2), Duration::from_secs(3));
        // from a full bucket, the tokens go back
        let mut b = TokenBucket::new(100, 1000, Duration::from_secs(60), t0);
        assert_eq!(b.take(600, t0), Duration::ZERO);
        b.give_back(600, t0);
        assert_eq!(b.take(1000, t0), Duration::ZERO);
    }

    #[test]
    fn bucket_does_not_burst_after_a_restart() {
        let t0 = Instant::now();
        // checkpoint written 0.1s ago: 10 rows of credit at 100 rows/s, not a full batch
        let mut b = TokenBucket::new(100, 50, Duration::from_millis(100), t0);
        assert_eq!(b.take(50, t0).as_millis(), 400);
        // a long pause refills at most one batch
        let mut b = TokenBucket::new(100, 50, Duration::from_secs(600), t0);
        assert_eq!(b.take(50, t0), Duration::ZERO);
        assert!(b.take(50, t0) > Duration::ZERO);
    }
}
