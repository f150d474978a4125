//! What holds a data change at a batch boundary: its plan's pause and halt signals, and
//! the health checks (replication lag, lock waits, active sessions, a query of the
//! operator's) that throttle it while a signal is above its limit.
use std::time::Duration;

use sqlx::AssertSqlSafe;
use sqlx::postgres::PgConnection;
use tokio::sync::watch;

use super::progress::Progress;
use crate::error::{Failure, classify};
use crate::step::{PreparedMigration, quote_literal};

/// The phase of a data change halted at a batch boundary: reported NOT_RUN, not failed.
pub(crate) const STOPPED: &str = "stopped";

/// A failure of a data change that the agent found (not the shard).
pub(super) fn agent_failure(m: &PreparedMigration, message: impl std::fmt::Display) -> Failure {
    Failure::agent("batch", format!("data migration `{}`: {message}", m.id()))
}

/// A plan's control state on this shard, published to its running data changes.
#[derive(Debug, Clone, Default)]
pub(crate) struct PlanControl {
    /// Why the plan (or this shard of it) is paused, if it is.
    pub paused: Option<String>,
    /// Bumped by every halt (cancel, a failure elsewhere, an abort): a running data change
    /// stops at its next batch boundary.
    pub halts: u64,
}

/// Waits at a batch boundary while the plan is paused or a health signal is above its
/// limit; fails with [`STOPPED`] when the plan was halted since the change started. Without
/// a plan's control (no hooks) only the health signals hold it. Returns whether it held the
/// change (paused or throttled), after which a page found before the wait is stale.
pub(super) async fn wait_at_boundary(
    conn: &mut PgConnection,
    m: &PreparedMigration,
    health: &[HealthQuery<'_>],
    mut control: Option<&mut watch::Receiver<PlanControl>>,
    halts_at_start: Option<u64>,
    progress: &mut Progress<'_>,
) -> Result<bool, Failure> {
    let mut backoff = Duration::from_millis(100);
    let mut waiting: Option<&'static str> = None;
    let mut held = false;
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
            held = true;
            set_waiting(&mut waiting, Some("paused"));
            progress.set("paused", &reason, progress.size);
            // woken by resume or halt; never polls
            if c.changed().await.is_err() {
                break Ok(held);
            }
            continue;
        }
        match health_reason(conn, m, health).await {
            Err(e) => break Err(e),
            Ok(Some(reason)) => {
                held = true;
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
            Ok(None) => break Ok(held),
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
pub(super) type HealthQuery<'a> = (&'a flotilla_core::HealthCheck, String);

/// The queries of the change's health checks, built once per run (not per batch).
pub(super) fn health_queries(m: &PreparedMigration) -> Result<Vec<HealthQuery<'_>>, Failure> {
    use flotilla_core::HealthSignal;
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
