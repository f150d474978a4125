//! Batched data changes (`[data]` of a migration): keyset pagination over the key (one
//! column or a composite key, compared as a row),
//! one short fenced transaction per batch that also advances the checkpoint in
//! `flotilla.checkpoints`, so that each batch is done exactly once and a restarted agent goes
//! on after the last committed batch. A token bucket keeps the rows per second under the
//! migration's limit, also across a restart (it refills from the checkpoint's time).
//!
//! Bounds: batch *n* covers the keys in `(lower, upper]`, where `upper` is the last key of
//! the page of at most `batch_size` keys after `lower` (with the filter, if any), and `lower`
//! is the previous batch's `upper`. The first batch's `lower` is the key type's floor: a
//! value no key lies below (`-32768` for smallint, `-infinity` for timestamps, `''` for text,
//! ...; a row of floors for a composite key); a key at or below that floor, or a NULL in
//! the key, would never be covered, so the change refuses to start when the table holds
//! one. Key types without a floor are refused at the start, before any batch.
use std::time::{Duration, Instant};

use flotilla_proto::pb;
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgConnection;
use tracing::{debug, info};

use crate::error::{Failure, classify};
use crate::sqlgen::{self, PreparedMigration, StepContext, quote_literal};

/// A token bucket of rows: `rate` rows per second, holding at most `capacity` rows (one
/// batch, so that a batch always fits). Time is passed in, so it is testable.
#[derive(Debug)]
pub(crate) struct TokenBucket {
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
    pub fn take(&mut self, rows: u64, now: Instant) -> Duration {
        if now > self.at {
            let dt = now.duration_since(self.at).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.capacity);
            self.at = now;
        }
        self.tokens -= rows as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            // in debt: wait until the debt is paid back; the bucket is empty then
            let wait = Duration::from_secs_f64(-self.tokens / self.rate);
            self.tokens = 0.0;
            self.at = now + wait;
            wait
        }
    }
}

/// Where a change stands on a target, as its checkpoint says.
struct Checkpoint {
    last_key: String,
    rows: i64,
    batches: i64,
    /// Seconds since it was written, by the shard's clock.
    age_secs: f64,
}

fn agent_failure(m: &PreparedMigration, message: String) -> Failure {
    Failure::agent("batch", format!("data migration `{}`: {message}", m.id()))
}

/// Runs a data change on the session's target (its search_path and timeouts are set, and
/// its fence checked, by the caller's prologue): the up SQL (when fresh), then every batch.
/// Returns the rows done by this run.
pub(crate) async fn run_batches(
    conn: &mut PgConnection,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    hooks: Option<&crate::control::DataHooks>,
) -> Result<u64, Failure> {
    let d = m
        .migration
        .data
        .as_ref()
        .ok_or_else(|| agent_failure(m, "not a data change".into()))?;
    let table = d.table_sql();
    let db = |e: sqlx::Error| classify(&e, "batch");

    // Where it stands.
    let cp: Option<(String, String, i64, i64, f64)> = sqlx::query_as(
        "SELECT checksum, last_key, rows, batches, \
         extract(epoch FROM pg_catalog.clock_timestamp() - updated_at)::float8 \
         FROM flotilla.checkpoints WHERE target = $1 AND migration_id = $2",
    )
    .bind(cx.tenant)
    .bind(m.id())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    let checkpoint = match cp {
        Some((checksum, _, _, _, _)) if checksum != m.migration.checksum => {
            return Err(agent_failure(
                m,
                format!(
                    "its checkpoint on this target was written by another version of it \
                     (checksum {checksum}); undo the partial change, delete the row from \
                     flotilla.checkpoints, then run it again"
                ),
            ));
        }
        Some((_, last_key, rows, batches, age_secs)) => Some(Checkpoint {
            last_key,
            rows,
            batches,
            age_secs,
        }),
        None => None,
    };

    // The key: columns of the table, unique, of types with a floor.
    let shape = match crate::keys::inspect(conn, d, None).await.map_err(db)? {
        Ok(shape) => shape,
        Err(problem) => {
            return Err(agent_failure(
                m,
                format!("{} (in the target's search_path)", problem.message()),
            ));
        }
    };
    let floor_lit = shape
        .literal(&shape.floor())
        .map_err(|e| agent_failure(m, e))?;
    let decode =
        |text: &str| crate::keys::decode_bound(text, d.key.len()).map_err(|e| agent_failure(m, e));

    let (mut prev, mut rows_total, mut batches) = match &checkpoint {
        Some(c) => (Some(c.last_key.clone()), c.rows, c.batches),
        None => {
            // A key at the floor, or with a NULL, would never be in a batch: refuse rather
            // than skip it.
            let key = d.key_sql();
            let nulls: Vec<String> = d
                .key
                .iter()
                .map(|c| format!(" OR {} IS NULL", flotilla_proto::sql::quote_ident(c)))
                .collect();
            let at_floor: bool = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT EXISTS (SELECT 1 FROM {table} WHERE {key} <= {floor_lit}{})",
                nulls.concat()
            )))
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
            if at_floor {
                return Err(agent_failure(
                    m,
                    format!(
                        "{table} holds a key {} <= {floor_lit}, the lowest bound of its type, or \
                         NULL in it; such a row cannot be in a batch",
                        d.key_text()
                    ),
                ));
            }
            // The up SQL (if any) runs once, before the first batch.
            for statement in &m.up {
                sqlx::raw_sql(AssertSqlSafe(statement.clone()))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| classify(&e, "up"))?;
            }
            (None, 0, 0)
        }
    };
    if let Some(c) = &checkpoint {
        info!(migration = m.id(), tenant = cx.tenant, last_key = %c.last_key, rows = c.rows,
              batches = c.batches, "resuming a data change from its checkpoint");
    }

    let mut bucket = (d.rows_per_second > 0).then(|| {
        let idle = match &checkpoint {
            Some(c) => Duration::from_secs_f64(c.age_secs.max(0.0)),
            None => Duration::from_secs(3600),
        };
        // holds one batch: a bigger (adapted) batch waits for its debt
        TokenBucket::new(
            d.rows_per_second,
            u64::from(d.batch_size),
            idle,
            Instant::now(),
        )
    });
    // The server's budget, shared by every target of the step on this shard.
    let server_bucket = hooks.filter(|_| d.server_rows_per_second > 0).map(|h| {
        h.buckets.bucket(
            &h.plan_id,
            m.id(),
            d.server_rows_per_second,
            u64::from(d.batch_size),
        )
    });
    // the exclusive lower bound after `prev`: the last key done, or the type's floor
    // `prev` is the checkpoint's text of the last key done, exactly as stored (the batch's
    // advance compares it)
    let lower_of = |prev: &Option<String>| match prev {
        Some(k) => shape.literal(&decode(k)?).map_err(|e| agent_failure(m, e)),
        None => Ok(floor_lit.clone()),
    };
    let left = estimate_left(conn, m, &lower_of(&prev)?).await;
    let health = health_queries(m)?;
    let mut progress = Progress::new(hooks, cx.tenant, m.id(), rows_total as u64, batches as u64);
    progress.total = rows_total as u64 + left.unwrap_or(0);
    let mut control = hooks.map(|h| h.control.clone());
    let halts_at_start = control.as_ref().map(|c| c.borrow().halts);
    let mut size = d.batch_size;
    let mut done = 0u64;
    loop {
        // A batch boundary: halted, paused or throttled, the step waits (or stops) here.
        wait_at_boundary(
            conn,
            m,
            &health,
            control.as_mut(),
            halts_at_start,
            &mut progress,
        )
        .await?;
        let lower_lit = lower_of(&prev)?;
        let page = sqlgen::data_page(m, &lower_lit, size).expect("a data change");
        let (n, upper): (i64, Option<String>) = sqlx::query_as(AssertSqlSafe(page))
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| stopped_if_server_gone(m, db(e), &mut progress, size))?;
        let Some(upper) = upper.filter(|_| n > 0) else {
            break;
        };
        let mut wait = Duration::ZERO;
        if let Some(b) = bucket.as_mut() {
            wait = wait.max(b.take(n as u64, Instant::now()));
        }
        if let Some(b) = &server_bucket {
            wait = wait.max(
                b.lock()
                    .expect("bucket lock")
                    .take(n as u64, Instant::now()),
            );
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let upper_lit = shape
            .literal(&decode(&upper)?)
            .map_err(|e| agent_failure(m, e))?;
        // the checkpoint holds bounds as the page's text (a JSON array for a composite key)
        let prev_lit = match &prev {
            Some(p) => quote_literal(p).map_err(|e| agent_failure(m, e))?,
            None => "NULL".to_string(),
        };
        let upper_text_lit = quote_literal(&upper).map_err(|e| agent_failure(m, e))?;
        let bounds = sqlgen::BatchBounds {
            prev_lit: &prev_lit,
            last_lit: &upper_text_lit,
            lower_lit: &lower_lit,
            upper_lit: &upper_lit,
            rows: n,
            number: batches + 1,
        };
        let sql = sqlgen::data_batch(cx, m, &bounds).map_err(|e| Failure::agent("batch", e))?;
        let began = Instant::now();
        let mut retries = 0;
        while let Err(e) = sqlx::raw_sql(AssertSqlSafe(sql.clone()))
            .execute(&mut *conn)
            .await
        {
            let failure = classify(&e, "batch");
            // the batch's transaction may be open (aborted): end it
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
            // A serialization failure or a deadlock with the application's sessions undid
            // the whole batch (its checkpoint too): do it again, after a short backoff.
            let transient = matches!(failure.error.sqlstate.as_str(), "40001" | "40P01");
            if transient && retries < BATCH_RETRIES {
                retries += 1;
                debug!(migration = m.id(), tenant = cx.tenant, sqlstate = %failure.error.sqlstate,
                       retries, "batch undone by a conflict; again");
                tokio::time::sleep(Duration::from_millis(20 << retries)).await;
                continue;
            }
            return Err(stopped_if_server_gone(m, failure, &mut progress, size));
        }
        let took = began.elapsed();
        rows_total += n;
        batches += 1;
        done += n as u64;
        crate::metrics::data_batch(n as u64, size);
        debug!(migration = m.id(), tenant = cx.tenant, last_key = %upper, rows = rows_total, batches, size, "batch done");
        let short = n < i64::from(size);
        if let Some(target) = d.target_batch {
            size = adapt_batch_size(size, took, target, d.min_batch_size, d.max_batch_size);
        }
        progress.batch(n as u64, size);
        after_batch_failpoint();
        prev = Some(upper);
        if short {
            break; // a short page is the last one
        }
    }
    progress.total = progress.done;
    progress.set("done", "", size);
    info!(
        migration = m.id(),
        tenant = cx.tenant,
        rows = rows_total,
        batches,
        "data change done"
    );
    Ok(done)
}

/// How often a batch undone by a serialization failure or a deadlock is run again.
const BATCH_RETRIES: u32 = 5;

/// The next batch size toward `target` duration: shrink fast (halve) when a batch took
/// well over it, grow slowly (a quarter) when well under, within `[min, max]`.
pub(crate) fn adapt_batch_size(
    size: u32,
    took: Duration,
    target: Duration,
    min: u32,
    max: u32,
) -> u32 {
    let next = if took > target.mul_f64(1.25) {
        size / 2
    } else if took < target.mul_f64(0.8) {
        size.saturating_add((size / 4).max(1))
    } else {
        size
    };
    next.clamp(min.max(1), max.max(min).max(1))
}

/// The phase of a data change halted at a batch boundary: reported NOT_RUN, not failed.
pub(crate) const STOPPED: &str = "stopped";

/// A batch that failed because the shard's server went away (crash, restart, admin
/// shutdown) was undone with its checkpoint: the change stops as if halted at that
/// boundary (NOT_RUN, `connection_lost`), so that it runs again from its checkpoint once the
/// server is back, rather than failing the plan. Any other failure is the change's.
fn stopped_if_server_gone(
    m: &PreparedMigration,
    failure: Failure,
    progress: &mut Progress<'_>,
    size: u32,
) -> Failure {
    let gone = failure.connection_lost
        || matches!(failure.error.sqlstate.as_str(), "57P01" | "57P02" | "57P03");
    if !gone {
        progress.set("failed", &failure.error.message, size);
        return failure;
    }
    progress.set("stopped", "the shard's server went away", size);
    Failure {
        error: flotilla_proto::pb::StepError {
            phase: STOPPED.into(),
            message: format!(
                "data migration `{}` stopped after {} batches ({} rows): the shard's server went \
                 away ({}); the batch in flight was undone with its checkpoint, which resumes it",
                m.id(),
                progress.batches,
                progress.done,
                failure.error.message
            ),
            ..failure.error
        },
        concurrent_apply: false,
        connection_lost: true,
    }
}

/// Waits at a batch boundary while the plan is paused or a health signal is above its
/// limit; fails with [`STOPPED`] when the plan was halted since the change started. Without
/// a plan's control (no hooks) only the health signals hold it.
async fn wait_at_boundary(
    conn: &mut PgConnection,
    m: &PreparedMigration,
    health: &[HealthQuery<'_>],
    mut control: Option<&mut tokio::sync::watch::Receiver<crate::control::PlanControl>>,
    halts_at_start: Option<u64>,
    progress: &mut Progress<'_>,
) -> Result<(), Failure> {
    let mut backoff = Duration::from_millis(100);
    let mut waiting: Option<&'static str> = None;
    let result = loop {
        let now = control
            .as_mut()
            .map(|c| c.borrow_and_update().clone())
            .unwrap_or_default();
        if control.is_some() && Some(now.halts) != halts_at_start {
            progress.set("stopped", "halted", progress.size);
            break Err(Failure::agent(
                STOPPED,
                format!(
                    "data migration `{}` stopped at a batch boundary after {} batches ({} rows); \
                     every batch is done and recorded or not done, and its checkpoint resumes it",
                    m.id(),
                    progress.batches,
                    progress.done
                ),
            ));
        }
        if let (Some(reason), Some(c)) = (now.paused, control.as_mut()) {
            set_waiting(&mut waiting, Some("paused"));
            progress.set("paused", &reason, progress.size);
            // woken by resume or halt; never polls
            if c.changed().await.is_err() {
                break Ok(());
            }
            continue;
        }
        match health_reason(conn, m, health).await {
            Err(e) => break Err(e),
            Ok(Some(reason)) => {
                set_waiting(&mut waiting, Some("throttled"));
                progress.set("throttled", &reason, progress.size);
                // re-checked after the backoff, or at once on pause, resume or halt
                match control.as_mut() {
                    Some(c) => tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = c.changed() => {}
                    },
                    None => tokio::time::sleep(backoff).await,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Ok(None) => break Ok(()),
        }
    };
    set_waiting(&mut waiting, None);
    if result.is_ok() && progress.state != "running" {
        progress.set("running", "", progress.size);
    }
    result
}

fn set_waiting(current: &mut Option<&'static str>, next: Option<&'static str>) {
    if *current == next {
        return;
    }
    if let Some(why) = current.take() {
        crate::metrics::data_waiting(why, -1.0);
    }
    if let Some(why) = next {
        crate::metrics::data_waiting(why, 1.0);
    }
    *current = next;
}

/// A health check with the query that reads its signal.
type HealthQuery<'a> = (&'a flotilla_proto::HealthCheck, String);

/// The queries of the change's health checks, built once per run (not per batch).
fn health_queries(m: &PreparedMigration) -> Result<Vec<HealthQuery<'_>>, Failure> {
    use flotilla_proto::HealthSignal;
    let Some(d) = m.migration.data.as_ref() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(d.health.len());
    for h in &d.health {
        let sql = match &h.signal {
            HealthSignal::ReplicationLagMs => "SELECT (pg_catalog.max(extract(epoch FROM \
                 coalesce(replay_lag, flush_lag, write_lag, interval '0'))) * 1000)::float8 \
                 FROM pg_catalog.pg_stat_replication"
                .to_string(),
            HealthSignal::LockWaits => {
                let table_lit = quote_literal(&d.table_sql()).map_err(|e| agent_failure(m, e))?;
                format!(
                    "SELECT pg_catalog.count(*)::float8 FROM pg_catalog.pg_locks \
                     WHERE NOT granted AND relation = pg_catalog.to_regclass({table_lit})"
                )
            }
            HealthSignal::ActiveSessions => "SELECT pg_catalog.count(*)::float8 FROM pg_catalog.pg_stat_activity \
                 WHERE state = 'active' AND backend_type = 'client backend' AND pid <> pg_catalog.pg_backend_pid()"
                .to_string(),
            HealthSignal::Sql(q) => format!("SELECT (SELECT * FROM ({q}\n) AS signal LIMIT 1)::float8"),
        };
        out.push((h, sql));
    }
    Ok(out)
}

/// Why the change must wait now (the first health signal above its limit), if it must.
async fn health_reason(
    conn: &mut PgConnection,
    m: &PreparedMigration,
    health: &[HealthQuery<'_>],
) -> Result<Option<String>, Failure> {
    for (h, sql) in health {
        let value: Option<f64> = sqlx::query_scalar(AssertSqlSafe(sql.clone()))
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| {
                let mut f = classify(&e, "health");
                f.error.message = format!(
                    "data migration `{}`: health check `{}` ({}): {}",
                    m.id(),
                    h.name,
                    h.signal.as_str(),
                    f.error.message
                );
                f
            })?;
        if let Some(v) = value
            && v > h.max
        {
            return Ok(Some(format!(
                "{} is {} (limit {})",
                h.name,
                trim_number(v),
                trim_number(h.max)
            )));
        }
    }
    Ok(None)
}

fn trim_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.2}")
    }
}

/// The planner's estimate of the rows still to do after `lower_lit` (with the filter).
async fn estimate_left(
    conn: &mut PgConnection,
    m: &PreparedMigration,
    lower_lit: &str,
) -> Option<u64> {
    let sql = sqlgen::data_estimate(m, lower_lit)?;
    let lines: Vec<String> = sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await
        .ok()?;
    let first = lines.first()?;
    let at = first.find("rows=")? + 5;
    first[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A data change's progress on its target, published to the agent's board (and from there
/// to the coordinator with each heartbeat).
struct Progress<'a> {
    hooks: Option<&'a crate::control::DataHooks>,
    tenant: String,
    migration: String,
    done: u64,
    total: u64,
    batches: u64,
    size: u32,
    state: String,
    /// (when, rows done then) over the last seconds: the rate is taken over them.
    recent: std::collections::VecDeque<(Instant, u64)>,
}

impl<'a> Progress<'a> {
    fn new(
        hooks: Option<&'a crate::control::DataHooks>,
        tenant: &str,
        migration: &str,
        done: u64,
        batches: u64,
    ) -> Progress<'a> {
        let mut recent = std::collections::VecDeque::new();
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
        }
    }

    fn batch(&mut self, rows: u64, size: u32) {
        self.done += rows;
        self.batches += 1;
        self.total = self.total.max(self.done);
        let now = Instant::now();
        self.recent.push_back((now, self.done));
        while self.recent.len() > 2
            && now.duration_since(self.recent[0].0) > Duration::from_secs(10)
        {
            self.recent.pop_front();
        }
        self.set("running", "", size);
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

    fn set(&mut self, state: &str, reason: &str, size: u32) {
        self.state = state.to_string();
        self.size = size;
        let Some(h) = self.hooks else { return };
        let rate = self.rate();
        let left = self.total.saturating_sub(self.done);
        let eta_ms = if rate > 0.0 && left > 0 {
            (left as f64 / rate * 1000.0) as u64
        } else {
            0
        };
        h.board.update(pb::DataProgress {
            plan_id: h.plan_id.clone(),
            migration_id: self.migration.clone(),
            shard: h.shard.clone(),
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

/// With `return`, the agent exits right after a batch committed (with its checkpoint): the
/// crash that the checkpoint must make harmless. Counts (`3*off->return`) are per process.
fn after_batch_failpoint() {
    fail::fail_point!("agent::after_data_batch", |_| {
        tracing::error!("failpoint agent::after_data_batch: exiting");
        std::process::exit(86)
    });
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

    #[test]
    fn batch_size_grows_slowly_and_shrinks_fast_within_bounds() {
        let target = Duration::from_millis(200);
        // well under the target: +25%
        assert_eq!(
            adapt_batch_size(1000, Duration::from_millis(50), target, 10, 5000),
            1250
        );
        // near the target: unchanged
        assert_eq!(
            adapt_batch_size(1000, Duration::from_millis(210), target, 10, 5000),
            1000
        );
        // well over: halved
        assert_eq!(
            adapt_batch_size(1000, Duration::from_millis(400), target, 10, 5000),
            500
        );
        // bounds hold
        assert_eq!(
            adapt_batch_size(4800, Duration::from_millis(1), target, 10, 5000),
            5000
        );
        assert_eq!(
            adapt_batch_size(15, Duration::from_secs(5), target, 10, 5000),
            10
        );
        assert_eq!(
            adapt_batch_size(1, Duration::from_millis(1), target, 1, 5000),
            2
        );
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
