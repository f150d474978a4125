//! Batched data changes (`[data]` of a migration): keyset pagination over one key column,
//! one short fenced transaction per batch that also advances the checkpoint in
//! `flotilla.checkpoints`, so that each batch is done exactly once and a restarted agent goes
//! on after the last committed batch. A token bucket keeps the rows per second under the
//! migration's limit, also across a restart (it refills from the checkpoint's time).
//!
//! Bounds: batch *n* covers the keys in `(lower, upper]`, where `upper` is the last key of
//! the page of at most `batch_size` keys after `lower` (with the filter, if any), and `lower`
//! is the previous batch's `upper`. The first batch's `lower` is the key type's floor: a
//! value no key lies below (`-32768` for smallint, `-infinity` for timestamps, `''` for text,
//! ...); a key equal to that floor would never be covered, so the change refuses to start
//! when the table holds one. Key types without a floor are refused at the start, before any
//! batch.
use std::time::{Duration, Instant};

use sqlx::AssertSqlSafe;
use sqlx::postgres::PgConnection;
use tracing::{debug, info};

use crate::error::{Failure, classify};
use crate::sqlgen::{self, PreparedMigration, StepContext, quote_literal};

/// The value below every key of a type (exclusive lower bound of the first batch), as SQL
/// text to quote, by `pg_type.typname`.
pub(crate) fn key_floor(typname: &str) -> Option<&'static str> {
    Some(match typname {
        "int2" => "-32768",
        "int4" => "-2147483648",
        "int8" => "-9223372036854775808",
        "numeric" | "float4" | "float8" => "-Infinity",
        "date" | "timestamp" | "timestamptz" => "-infinity",
        "text" | "varchar" | "bpchar" | "name" | "citext" => "",
        "uuid" => "00000000-0000-0000-0000-000000000000",
        _ => return None,
    })
}

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

    // The key: a column of the table, unique, of a type with a floor.
    let table_lit = quote_literal(&table).map_err(|e| agent_failure(m, e))?;
    let key_lit = quote_literal(&d.key).map_err(|e| agent_failure(m, e))?;
    let info: Option<(Option<String>, Option<bool>)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT t.typname::text, EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = a.attrelid \
           AND i.indisunique AND i.indnkeyatts = 1 AND i.indkey[0] = a.attnum AND i.indpred IS NULL) \
         FROM (SELECT pg_catalog.to_regclass({table_lit}) AS rel) r \
         LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = r.rel AND a.attname = {key_lit} AND NOT a.attisdropped \
         LEFT JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
         WHERE r.rel IS NOT NULL"
    )))
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    let typname = match info {
        None => {
            return Err(agent_failure(
                m,
                format!("table {table} does not exist (in the target's search_path)"),
            ));
        }
        Some((None, _)) => {
            return Err(agent_failure(
                m,
                format!("table {table} has no column {}", d.key),
            ));
        }
        Some((Some(_), Some(false) | None)) => {
            return Err(agent_failure(
                m,
                format!(
                    "key {} of {table} is not unique (no unique index on it alone): batches \
                     need a key that orders the rows uniquely",
                    d.key
                ),
            ));
        }
        Some((Some(t), Some(true))) => t,
    };
    let floor = key_floor(&typname).ok_or_else(|| {
        agent_failure(
            m,
            format!(
                "key {} has type {typname}, which is not supported yet",
                d.key
            ),
        )
    })?;
    let floor_lit = quote_literal(floor).map_err(|e| agent_failure(m, e))?;

    let (mut prev, mut rows_total, mut batches) = match &checkpoint {
        Some(c) => (Some(c.last_key.clone()), c.rows, c.batches),
        None => {
            // A key at the floor would never be in a batch: refuse rather than skip it.
            let key = d.key_sql();
            let at_floor: bool = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT EXISTS (SELECT 1 FROM {table} WHERE {key} <= {floor_lit})"
            )))
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
            if at_floor {
                return Err(agent_failure(
                    m,
                    format!(
                        "{table} holds a key {} <= {floor_lit}, the lowest bound of its type; \
                         such a row cannot be in a batch",
                        d.key
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
        TokenBucket::new(
            d.rows_per_second,
            u64::from(d.batch_size),
            idle,
            Instant::now(),
        )
    });
    let mut done = 0u64;
    loop {
        let lower_lit = match &prev {
            Some(k) => quote_literal(k).map_err(|e| agent_failure(m, e))?,
            None => floor_lit.clone(),
        };
        let page = sqlgen::data_page(m, &lower_lit).expect("a data change");
        let (n, upper): (i64, Option<String>) = sqlx::query_as(AssertSqlSafe(page))
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
        let Some(upper) = upper.filter(|_| n > 0) else {
            break;
        };
        if let Some(b) = bucket.as_mut() {
            let wait = b.take(n as u64, Instant::now());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        let upper_lit = quote_literal(&upper).map_err(|e| agent_failure(m, e))?;
        let prev_lit = match &prev {
            Some(_) => lower_lit.clone(),
            None => "NULL".to_string(),
        };
        let sql = sqlgen::data_batch(cx, m, &prev_lit, &lower_lit, &upper_lit, n)
            .map_err(|e| Failure::agent("batch", e))?;
        if let Err(e) = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *conn).await {
            let failure = classify(&e, "batch");
            // the batch's transaction may be open (aborted): end it
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
            return Err(failure);
        }
        rows_total += n;
        batches += 1;
        done += n as u64;
        debug!(migration = m.id(), tenant = cx.tenant, last_key = %upper, rows = rows_total, batches, "batch done");
        after_batch_failpoint();
        prev = Some(upper);
        if n < i64::from(d.batch_size) {
            break; // a short page is the last one
        }
    }
    info!(
        migration = m.id(),
        tenant = cx.tenant,
        rows = rows_total,
        batches,
        "data change done"
    );
    Ok(done)
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
    fn floors() {
        assert_eq!(key_floor("int8"), Some("-9223372036854775808"));
        assert_eq!(key_floor("text"), Some(""));
        assert_eq!(key_floor("timestamptz"), Some("-infinity"));
        assert_eq!(key_floor("jsonb"), None);
    }

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
