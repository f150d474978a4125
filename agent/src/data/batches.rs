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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flotilla_core::protocol::sqlstate;
use futures::TryStreamExt;
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{AssertSqlSafe, FromRow};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::progress::{Progress, Publish};
use super::rate::{RowLimits, ServerBuckets};
use super::throttle::{PlanControl, STOPPED, agent_failure, health_queries, wait_at_boundary};
use super::{ProgressBoard, check, keys, sql};
use crate::error::{Failure, classify};
use crate::step::checkpoint::{self, Checkpoint};
use crate::step::{BuildError, PreparedMigration, StepContext, quote_literal};

/// What a data change needs from the agent besides its connection.
pub(crate) struct DataHooks {
    pub plan_id: String,
    pub shard: String,
    pub control: watch::Receiver<PlanControl>,
    pub board: Arc<ProgressBoard>,
    pub buckets: Arc<ServerBuckets>,
}

/// What one attempt of a data change takes from its step's run, which may try it again
/// after a lock timeout (see `run::lock_wait`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempt {
    /// The plan's halts when the run was queued: a halt since, even one that came while an
    /// earlier attempt waited, stops the change at its next batch boundary.
    pub halts_at_start: Option<u64>,
    /// A lock timeout ends this attempt, not the step: the change is tried again.
    pub retried_on_lock_timeout: bool,
}

/// The step's data change (every caller here runs one).
fn data_of(m: &PreparedMigration) -> Result<&flotilla_core::DataChange, Failure> {
    m.migration
        .data
        .as_ref()
        .ok_or_else(|| agent_failure(m, "not a data change"))
}

/// A page of keys: how many rows (at most `limit`) and the last key's text (`None`: empty).
struct Page {
    limit: u32,
    rows: i64,
    last: Option<String>,
}

impl Page {
    /// The full page a batch's transaction found for the next batch (its last row: the
    /// page's last key, NULL when fewer than `limit` keys are left); `None`: no full page,
    /// the next (short or empty) page is asked for on its own.
    fn full_from_row(limit: u32, row: Option<PgRow>) -> Result<Option<Page>, String> {
        let row = row.ok_or("the batch returned no page for the next batch")?;
        let (last,) = <(Option<String>,)>::from_row(&row)
            .map_err(|e| format!("the next page's row does not read: {e}"))?;
        Ok(last.map(|last| Page {
            limit,
            rows: i64::from(limit),
            last: Some(last),
        }))
    }
}

/// The full-page query ([`sql::data_full_page`]) prepared on the session for this run, at
/// one batch size: each batch then runs it with `EXECUTE` instead of sending its text to be
/// parsed and analysed again. It is still planned for each bound: the server's plan cache
/// kept choosing a custom plan over the generic one (`pg_prepared_statements` on the bench
/// table, 20 executions: 20 custom plans). A name of its own per run, so that a statement a
/// run could not let go (its session's server gone) clashes with no later one.
struct PreparedPage {
    name: String,
    limit: u32,
}

/// Names the prepared full-page queries of this process apart.
static PREPARED_PAGES: AtomicU64 = AtomicU64::new(0);

impl PreparedPage {
    /// Prepares the full-page query for `limit` keys, its lower bound the parameters (one per
    /// key column, of the column's type); `None` when the server would not prepare it (the
    /// batches then send the query's text).
    async fn prepare(
        conn: &mut PgConnection,
        m: &PreparedMigration,
        shape: &keys::KeyShape,
        limit: u32,
    ) -> Option<PreparedPage> {
        let params: Vec<String> = (1..=shape.types.len()).map(|i| format!("${i}")).collect();
        let lower = match params.as_slice() {
            [one] => one.clone(),
            many => format!("ROW({})", many.join(", ")),
        };
        let query = sql::data_full_page(m, &lower, limit)?;
        let name = format!(
            "flotilla_page_{}",
            PREPARED_PAGES.fetch_add(1, Ordering::Relaxed)
        );
        let prepare = format!("PREPARE {name}({}) AS {query}", shape.types.join(", "));
        match sqlx::raw_sql(AssertSqlSafe(prepare))
            .execute(&mut *conn)
            .await
        {
            Ok(_) => Some(PreparedPage { name, limit }),
            Err(error) => {
                debug!(step = m.id(), %error, "the full-page query did not prepare; its text goes with each batch");
                None
            }
        }
    }

    /// The full page of `limit` keys after `after` (a bound's text per column), as a
    /// statement of the batch: `EXECUTE` when prepared at this size.
    fn execute(&self, after: &[String], limit: u32) -> Option<Result<String, BuildError>> {
        if limit != self.limit {
            return None;
        }
        let args: Result<Vec<String>, BuildError> =
            after.iter().map(|v| quote_literal(v)).collect();
        Some(args.map(|a| format!("EXECUTE {}({})", self.name, a.join(", "))))
    }
}

/// Runs a data change's batches on the session's target (its search_path and timeouts are
/// set, its fence checked, its up SQL run and [`refuse_uncovered_keys`] asked, by the
/// caller), after those its checkpoint (read before the up SQL ran) says are done. `key`:
/// the key the caller's [`refuse_uncovered_keys`] found (None: it is looked up here).
/// Returns the rows done by this run.
pub(crate) async fn run_batches(
    conn: &mut PgConnection,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    hooks: Option<&DataHooks>,
    attempt: Attempt,
    checkpoint: Option<Checkpoint>,
    key: Option<Key>,
) -> Result<u64, Failure> {
    let mut prepared = None;
    let result = batches(conn, cx, m, hooks, attempt, checkpoint, key, &mut prepared).await;
    // the session goes back to the pool without it (not tried on a session whose server went
    // away: it went with the session)
    let gone = matches!(&result, Err(f) if f.server_gone());
    if let Some(p) = prepared.filter(|_| !gone) {
        let deallocate = format!("DEALLOCATE {}", p.name);
        if let Err(error) = sqlx::raw_sql(AssertSqlSafe(deallocate))
            .execute(&mut *conn)
            .await
        {
            debug!(step = m.id(), %error, "the full-page query was not deallocated");
        }
    }
    result
}

/// The body of [`run_batches`]; `prepared` gets the full-page query it prepared, which the
/// caller lets go whichever way this ends.
#[allow(clippy::too_many_arguments)] // run_batches' own, and the out parameter
async fn batches(
    conn: &mut PgConnection,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    hooks: Option<&DataHooks>,
    attempt: Attempt,
    checkpoint: Option<Checkpoint>,
    key: Option<Key>,
    prepared: &mut Option<PreparedPage>,
) -> Result<u64, Failure> {
    let d = data_of(m)?;
    let db = |e: sqlx::Error| classify(&e, "batch");
    // The up SQL's own setting, for the batch statements it was written for (their float
    // text as it asked); Flotilla's reads of keys and images around them are exact.
    let up_float_digits: String =
        sqlx::query_scalar("SELECT current_setting('extra_float_digits')")
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
    let up_float_digits = up_float_digits
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|&d| d < 1)
        .map(|d| d.to_string());
    sqlx::raw_sql(super::EXACT_FLOATS)
        .execute(&mut *conn)
        .await
        .map_err(db)?;

    // a checkpoint of the up SQL alone: no batch is done yet
    let checkpoint = checkpoint.filter(|c| c.last_key.is_some());

    let Key { shape, floor_lit } = match key {
        Some(key) => key,
        None => key_shape(conn, m, d).await?,
    };
    let decode =
        |text: &str| keys::decode_bound(text, d.key.len()).map_err(|e| agent_failure(m, e));

    let (mut prev, mut rows_total, mut batches) = match &checkpoint {
        Some(c) => (c.last_key.clone(), c.rows, c.batches),
        None => (None, 0, 0),
    };
    if let Some(c) = &checkpoint {
        info!(
            step = m.id(),
            tenant = cx.tenant,
            last_key = prev.as_deref().unwrap_or_default(),
            rows = c.rows,
            batches = c.batches,
            "resuming a data change from its checkpoint"
        );
    }

    let mut limits = RowLimits::new(
        d,
        checkpoint.as_ref().map(|c| c.age_secs),
        hooks.map(|h| (h.buckets.as_ref(), h.plan_id.as_str(), m.id())),
    );
    // the exclusive lower bound after `prev`: the last key done, or the type's floor
    // `prev` is the checkpoint's text of the last key done, exactly as stored (the batch's
    // advance compares it)
    let lower_of = |prev: &Option<String>| match prev {
        Some(k) => shape.literal(&decode(k)?).map_err(|e| agent_failure(m, e)),
        None => Ok(floor_lit.clone()),
    };
    let left = estimate_left(conn, m, &lower_of(&prev)?, rows_total as u64).await;
    let health = health_queries(m)?;
    let publish = hooks.map(|h| Publish {
        plan_id: &h.plan_id,
        shard: &h.shard,
        board: &h.board,
    });
    let mut progress = Progress::new(
        publish,
        cx.tenant,
        m.id(),
        rows_total as u64,
        batches as u64,
    );
    progress.total = rows_total as u64 + left.unwrap_or(0);
    let mut control = hooks.map(|h| h.control.clone());
    let halts_at_start = attempt.halts_at_start.filter(|_| control.is_some());
    // (no batch past one second of its rate limits: `DataChange::batch_cap`)
    let mut size = d.first_batch_size();
    *prepared = PreparedPage::prepare(conn, m, &shape, size).await;
    let mut done = 0u64;
    // the next batch's page, found by the previous batch's transaction (one round trip per
    // batch) when it is a full one; `None` when it must be asked for on its own (the first
    // batch, after a wait, and the last, short page)
    let mut found: Option<Page> = None;
    // times the checkpoint moved under this run (see below)
    let mut overtaken = 0u32;
    loop {
        // A batch boundary: halted, paused or throttled, the step waits (or stops) here.
        let held = wait_at_boundary(
            conn,
            m,
            &health,
            control.as_mut(),
            halts_at_start,
            &mut progress,
        )
        .await?;
        let lower_lit = lower_of(&prev)?;
        // a page found before a wait may be stale, and one of another size is not this batch
        let page = match found.take().filter(|p| !held && p.limit == size) {
            Some(page) => page,
            None => {
                let sql = sql::data_page(m, &lower_lit, size).expect("a data change");
                let found = sqlx::query_as(AssertSqlSafe(sql))
                    .fetch_one(&mut *conn)
                    .await;
                let (rows, last) = match found {
                    Ok(page) => page,
                    Err(e) => {
                        // (a failed page is the filter's, or the key's without one, unless
                        // PostgreSQL refuses another part on its own)
                        let fallback = if d.filter.is_some() {
                            check::Part::Filter
                        } else {
                            check::Part::Key
                        };
                        let bounds = (lower_lit.as_str(), lower_lit.as_str());
                        let failure = check::name_the_part(conn, m, db(e), bounds, fallback).await;
                        return Err(stopped_if_server_gone(
                            m,
                            failure,
                            &mut progress,
                            size,
                            attempt,
                        ));
                    }
                };
                Page {
                    limit: size,
                    rows,
                    last,
                }
            }
        };
        let n = page.rows;
        let Some(upper) = page.last.filter(|_| n > 0) else {
            break;
        };
        if prev.as_deref() == Some(upper.as_str()) {
            // A page after a key ends at that key again only when its query lets rows below
            // its bound in (nothing the change's file can say should): the loop would run
            // the same batch forever.
            return Err(agent_failure(
                m,
                format!(
                    "the page after key {upper} ended at the same key: the table's rows did not advance past it (its `filter`?)"
                ),
            ));
        }
        // a pause or halt cuts the rate's wait short: the boundary above takes it
        let waited = match control.as_mut() {
            Some(c) => {
                // a pause or a halt, not any message on the channel (a resume of a plan
                // not paused): those would restart the wait, and a low rate never end it
                let (paused, halts) = {
                    let now = c.borrow_and_update();
                    (now.paused.is_some(), now.halts)
                };
                let changed = async {
                    loop {
                        if c.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                        let now = c.borrow_and_update();
                        if now.paused.is_some() != paused || now.halts != halts {
                            break;
                        }
                    }
                };
                limits.wait_unless(n as u64, changed).await
            }
            None => {
                limits.wait(n as u64).await;
                true
            }
        };
        if !waited {
            continue;
        }
        let upper_bound = decode(&upper)?;
        let upper_lit = shape
            .literal(&upper_bound)
            .map_err(|e| agent_failure(m, e))?;
        // the checkpoint holds bounds as the page's text (a JSON array for a composite key)
        let prev_lit = match &prev {
            Some(p) => quote_literal(p).map_err(|e| agent_failure(m, e))?,
            None => "NULL".to_string(),
        };
        let upper_text_lit = quote_literal(&upper).map_err(|e| agent_failure(m, e))?;
        let short = n < i64::from(size);
        // a short page is the last one: nothing to look for after it
        let next_page = match prepared
            .as_ref()
            .and_then(|p| p.execute(&upper_bound, size))
        {
            _ if short => None,
            Some(execute) => Some(execute.map_err(|e| agent_failure(m, e))?),
            None => sql::data_full_page(m, &upper_lit, size),
        };
        let bounds = sql::BatchBounds {
            prev_lit: &prev_lit,
            last_lit: &upper_text_lit,
            lower_lit: &lower_lit,
            upper_lit: &upper_lit,
            rows: n,
            number: batches + 1,
            next_page: next_page.as_deref(),
            key_types: &shape.types,
            up_float_digits: up_float_digits.as_deref(),
        };
        let sql =
            sql::data_batch(cx, m, &bounds).map_err(|e| Failure::agent("batch", e.to_string()))?;
        let began = Instant::now();
        let committed = commit_batch(conn, cx, m, &sql).await;
        // The checkpoint moved under this batch: a session of an earlier run of the step,
        // still open on the server when this run began (its agent killed mid-batch, its
        // batch and COMMIT sent in one round trip), committed its batch after this run read
        // the checkpoint. That batch is done, once (this one undone, the advance refused
        // it): the change goes on from the checkpoint as it is now. Before, the step
        // failed, and an all-or-nothing plan rolled every target back for a killed agent.
        // Not for ever: such a session ends with its one batch, and a run that keeps being
        // overtaken has another run beside it, which is a failure to report.
        if let Err(failure) = &committed
            && failure.error.sqlstate == sqlstate::CHECKPOINT_MOVED
            && overtaken < OVERTAKEN_LIMIT
            && let Some(now) = checkpoint::read(conn, cx, m, "batch").await?
            && now.last_key.is_some()
            && now.last_key != prev
        {
            overtaken += 1;
            warn!(
                step = m.id(),
                tenant = cx.tenant,
                was = prev.as_deref().unwrap_or_default(),
                now = now.last_key.as_deref().unwrap_or_default(),
                batches = now.batches,
                "the checkpoint moved under this run (a session of an earlier run committed its batch): going on from it"
            );
            prev = now.last_key;
            rows_total = now.rows;
            batches = now.batches;
            progress.overtaken(
                u64::try_from(now.rows).unwrap_or(0),
                u64::try_from(now.batches).unwrap_or(0),
            );
            found = None;
            continue;
        }
        let last_row = match committed {
            Ok(row) => row,
            Err(failure) => {
                // which part of the change failed (its batch SQL, or with a filter either,
                // the next page's query running in the same transaction, unless PostgreSQL
                // refuses one part on its own), and where in the table: the batch and its
                // keys, to look at those rows
                let ran = if d.filter.is_some() {
                    check::Part::BatchOrFilter
                } else {
                    check::Part::Batch
                };
                let mut failure = check::name_the_part(
                    conn,
                    m,
                    failure,
                    (lower_lit.as_str(), upper_lit.as_str()),
                    ran,
                )
                .await;
                let short = |k: &str| match k.char_indices().nth(80) {
                    Some((at, _)) => format!("{}...", &k[..at]),
                    None => k.to_string(),
                };
                failure.error.message = format!(
                    "{} (batch {}: keys after {} up to {})",
                    failure.error.message,
                    batches + 1,
                    prev.as_deref().map_or("the start".to_string(), short),
                    short(&upper)
                );
                return Err(stopped_if_server_gone(
                    m,
                    failure,
                    &mut progress,
                    size,
                    attempt,
                ));
            }
        };
        let took = began.elapsed();
        if next_page.is_some() {
            found = Page::full_from_row(size, last_row).map_err(|e| agent_failure(m, e))?;
        }
        rows_total += n;
        batches += 1;
        done += n as u64;
        crate::metrics::data_batch(n as u64, size);
        debug!(step = m.id(), tenant = cx.tenant, last_key = %upper, rows = rows_total, batches, size, "batch done");
        if let Some(target) = d.target_batch {
            let (min, max) = d.batch_bounds();
            size = adapt_batch_size(size, took, target, min, max);
        }
        progress.batch(n as u64, size);
        after_batch_failpoint();
        prev = Some(upper);
        if short {
            break;
        }
    }
    progress.total = progress.done;
    progress.set("done", "", size);
    info!(
        step = m.id(),
        tenant = cx.tenant,
        rows = rows_total,
        batches,
        "data change done"
    );
    Ok(done)
}

/// A change's key on a target (columns of the table, unique, of types with a floor) and
/// its floor as a literal: the first batch's exclusive lower bound.
pub(crate) struct Key {
    shape: keys::KeyShape,
    floor_lit: String,
}

async fn key_shape(
    conn: &mut PgConnection,
    m: &PreparedMigration,
    d: &flotilla_core::DataChange,
) -> Result<Key, Failure> {
    let shape = match keys::inspect(conn, d, None)
        .await
        .map_err(|e| classify(&e, "batch"))?
    {
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
    Ok(Key { shape, floor_lit })
}

/// Before the first batch of a change on a target, and before its up SQL: a key at the
/// floor of its type, or with a NULL, would never be in a batch, so the change is refused
/// rather than skip the row. The session holds the target's search_path. Returns the key,
/// for the batches.
pub(crate) async fn refuse_uncovered_keys(
    conn: &mut PgConnection,
    m: &PreparedMigration,
) -> Result<Key, Failure> {
    let d = data_of(m)?;
    let key = key_shape(conn, m, d).await?;
    let floor_lit = &key.floor_lit;
    let at_floor: bool = sqlx::query_scalar(AssertSqlSafe(sql::keys_at_floor(d, floor_lit)))
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| classify(&e, "batch"))?;
    if at_floor {
        return Err(agent_failure(
            m,
            format!(
                "{} holds a key {} <= {floor_lit}, the lowest bound of its type, or \
                 NULL in it; such a row cannot be in a batch",
                d.table_sql(),
                d.key_text()
            ),
        ));
    }
    Ok(key)
}

/// Runs one batch's transaction and returns the last row it returned (the next batch's
/// page, when the batch looks for it). A serialization failure or a deadlock with the
/// application's sessions undid the whole batch (its checkpoint too): it is done again,
/// after a short backoff, up to [`BATCH_RETRIES`] times.
async fn commit_batch(
    conn: &mut PgConnection,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    sql: &str,
) -> Result<Option<PgRow>, Failure> {
    let mut retries = 0;
    loop {
        let e = match last_row(conn, sql).await {
            Ok(row) => return Ok(row),
            Err(e) => e,
        };
        let failure = classify(&e, "batch");
        // the batch's transaction may be open (aborted): end it. If that fails too the
        // connection is gone, which the caller's cleanup finds and reports.
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
        if !failure.is_conflict() || retries >= BATCH_RETRIES {
            return Err(failure);
        }
        retries += 1;
        debug!(step = m.id(), tenant = cx.tenant, sqlstate = %failure.error.sqlstate,
               retries, "batch undone by a conflict; again");
        tokio::time::sleep(Duration::from_millis(20 << retries)).await;
    }
}

/// Runs a simple query of many statements and keeps only its last row: rows that the batch's
/// own statements return (`RETURNING`, a `SELECT`) are read and dropped, never collected.
async fn last_row(conn: &mut PgConnection, sql: &str) -> Result<Option<PgRow>, sqlx::Error> {
    let mut rows = sqlx::raw_sql(AssertSqlSafe(sql.to_string())).fetch(&mut *conn);
    let mut last = None;
    while let Some(row) = rows.try_next().await? {
        last = Some(row);
    }
    Ok(last)
}

/// A table never analyzed has its rows counted for the progress total up to this many (a
/// moment's work); one with more is left to the planner's guess.
const UNANALYZED_COUNT_CAP: u64 = 100_000;

/// About how many pages of a table never analyzed and over [`UNANALYZED_COUNT_CAP`] rows are
/// read to size it (a few MB).
const SAMPLED_PAGES: f64 = 400.0;

/// How often a run goes on after its checkpoint moved under it (a session of an earlier run
/// committed a batch): one such session does one batch.
const OVERTAKEN_LIMIT: u32 = 3;

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

/// A batch that failed because the shard's server went away (crash, restart, admin
/// shutdown) was undone with its checkpoint: the change stops as if halted at that
/// boundary (NOT_RUN, `connection_lost`), so that it runs again from its checkpoint once the
/// server is back, rather than failing the plan. Any other failure is the change's (a lock
/// timeout the step tries again after a pause shows as throttled meanwhile, with why, not
/// as failed).
fn stopped_if_server_gone(
    m: &PreparedMigration,
    failure: Failure,
    progress: &mut Progress<'_>,
    size: u32,
    attempt: Attempt,
) -> Failure {
    if failure.is_lock_timeout() && attempt.retried_on_lock_timeout {
        let reason = format!("{}; trying again after a pause", failure.error.message);
        progress.set("throttled", &reason, size);
        return failure;
    }
    // Fenced: a newer coordinator term took the shard (a restart, a failover) and runs the
    // change on from its checkpoint; its status showed this run "failed" until then, which
    // anything watching `data[].state` took for a failure.
    // (by its SQLSTATE: a lock timeout in the fence check, an older term's transaction
    // holding the row, is "fence" too, and this term's own failure)
    if failure.error.sqlstate == flotilla_core::protocol::sqlstate::FENCED {
        progress.set(
            "stopped",
            "a newer coordinator term took the shard: it goes on from the checkpoint",
            size,
        );
        return failure;
    }
    if !failure.server_gone() {
        progress.set("failed", &failure.error.message, size);
        return failure;
    }
    progress.set("stopped", "the shard's server went away", size);
    Failure {
        error: flotilla_core::pb::StepError {
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
        part_way: false,
    }
}

/// The planner's estimate of the rows still to do after `lower_lit` (with the filter);
/// `done`: the rows the checkpoint says are done.
async fn estimate_left(
    conn: &mut PgConnection,
    m: &PreparedMigration,
    lower_lit: &str,
    done: u64,
) -> Option<u64> {
    // a table never analyzed: counted (up to a cap), not guessed
    if let Some(sql) = sql::data_count_unanalyzed(m, lower_lit, UNANALYZED_COUNT_CAP)
        && let Ok(Some(n)) = sqlx::query_scalar::<_, Option<i64>>(AssertSqlSafe(sql))
            .fetch_one(&mut *conn)
            .await
    {
        let counted = n as u64;
        if counted < UNANALYZED_COUNT_CAP {
            return Some(counted);
        }
        // More than the cap, never analyzed: the table's rows from a sample of its pages
        // (a few hundred of them), less what is done (the filter's share is not known: at
        // most that many), at least the count.
        let pages: Option<i64> = sqlx::query_scalar(AssertSqlSafe(sql::data_pages(m)?))
            .fetch_one(&mut *conn)
            .await
            .ok();
        // No pages of its own (a partitioned table, an inheritance parent): not sampled
        // (that read every partition whole, at each start of the step); the planner's
        // estimate, from its partitions' statistics, at least the count.
        let Some(pages) = pages.filter(|&p| p > 0) else {
            let planned = explained_rows(conn, sql::data_estimate(m, lower_lit)?).await;
            return Some(planned.unwrap_or(0).max(counted));
        };
        let percent = (100.0 * SAMPLED_PAGES / pages as f64).min(100.0);
        let whole: Option<i64> =
            sqlx::query_scalar(AssertSqlSafe(sql::data_sampled_rows(m, percent)?))
                .fetch_one(&mut *conn)
                .await
                .ok();
        return Some(whole.map_or(counted, |w| {
            (w.max(0) as u64).saturating_sub(done).max(counted)
        }));
    }
    explained_rows(conn, sql::data_estimate(m, lower_lit)?).await
}

/// The `rows=N` of an EXPLAIN's first line.
async fn explained_rows(conn: &mut PgConnection, sql: String) -> Option<u64> {
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
}
