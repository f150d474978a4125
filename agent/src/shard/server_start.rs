//! Which start of the shard's server this agent has talked to: a step whose session went
//! with the server is not run (it runs again) when the server that answers now is one the
//! agent first saw after the step began (a restart, a crash and recovery, a failover to
//! another server), and failed when the same server ended it (`pg_terminate_backend`).
use std::sync::Mutex;
use std::time::Instant;

use sqlx::postgres::PgConnection;
use sqlx::{Executor, PgPool};
use tracing::warn;

/// The server's start (`pg_postmaster_start_time()` and its shared statistics' reset time,
/// as text), and when this agent first saw it.
static SEEN: Mutex<Vec<(String, Instant)>> = Mutex::new(Vec::new());

/// Starts remembered: a server restarted this often under one agent is not remembered whole.
const KEPT: usize = 64;

/// Which start of the server answers, and how long its postmaster has been up. A crash of
/// one of its processes resets every session and starts its processes again but not the
/// postmaster, whose start time stays; the reset discards the cumulative statistics, and
/// the shared ones' reset time (the bgwriter's, readable by every role) tells those starts
/// apart. (The checkpointer's pid would too, but a role without pg_read_all_stats, as
/// deploy/sql/agent-role.sql makes, does not see which process is the checkpointer.) An
/// operator's `pg_stat_reset_shared('bgwriter')` changes it as well: taken for a restart
/// only by a step whose session ended at that moment. Before, a step cut short by a reset
/// was taken as ended by the server itself (and failed) unless the server had been up for
/// less time than the step ran.
const START_SQL: &str = "SELECT pg_catalog.pg_postmaster_start_time()::text || ' stats ' \
       || coalesce(pg_catalog.pg_stat_get_bgwriter_stat_reset_time()::text, '-'), \
     extract(epoch FROM pg_catalog.clock_timestamp() - pg_catalog.pg_postmaster_start_time())::float8";

/// When this agent first saw the server start `start` (now, if it had not).
fn first_seen(start: &str) -> Instant {
    let mut seen = SEEN.lock().expect("server starts lock");
    if let Some((_, at)) = seen.iter().find(|(s, _)| s == start) {
        return *at;
    }
    if seen.len() >= KEPT {
        seen.remove(0);
    }
    let now = Instant::now();
    seen.push((start.to_string(), now));
    now
}

/// Notes the start of the server `conn` talks to (at the agent's first connection).
pub(crate) async fn note(conn: &mut PgConnection) {
    match conn.fetch_one(START_SQL).await {
        Ok(row) => {
            let start: String = sqlx::Row::get(&row, 0);
            first_seen(&start);
        }
        Err(error) => warn!(%error, "reading the shard server's start time failed"),
    }
}

/// [`now`], once the server answers again: a step's connection that went with the server
/// is asked about right away, while the server may still be in its crash recovery (it
/// refuses or drops new connections for a moment, longer on a loaded machine). Asked
/// then, it could not say, the failure was taken as a step's own, and the runs again
/// right after burned the step's tries on the same recovery. Bounded: a server that stays
/// away is not waited for longer than `within`.
pub(crate) async fn once_back(
    pool: &PgPool,
    within: std::time::Duration,
) -> Option<(Instant, f64)> {
    let until = Instant::now() + within;
    let mut delay = std::time::Duration::from_millis(100);
    loop {
        if let Some(found) = now(pool).await {
            return Some(found);
        }
        if Instant::now() + delay >= until {
            return None;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_secs(2));
    }
}

/// The server that answers on `pool` now: when this agent first saw it start, and how long
/// it has been up. None when it cannot say.
pub(crate) async fn now(pool: &PgPool) -> Option<(Instant, f64)> {
    match pool.fetch_one(START_SQL).await {
        Ok(row) => {
            let start: String = sqlx::Row::get(&row, 0);
            let uptime: f64 = sqlx::Row::get(&row, 1);
            Some((first_seen(&start), uptime))
        }
        Err(error) => {
            warn!(%error, "reading the shard server's start time failed");
            None
        }
    }
}

/// Why the shard's server is another start of it than the one running when `began` (it
/// restarted, another took its place, or it reset every session after a crash elsewhere),
/// `failure` being what the caller's session saw: None when it is the same (the session
/// ended on its own) or does not answer within `within`. Once it says so, no session of the
/// caller's from before is left on the server.
pub(crate) async fn restarted_since(
    pool: &PgPool,
    failure: &crate::error::Failure,
    began: Instant,
    within: std::time::Duration,
) -> Option<String> {
    if !failure.server_gone() {
        return None;
    }
    if failure.error.sqlstate == flotilla_core::protocol::sqlstate::CRASH_SHUTDOWN {
        return Some(
            "the shard's server reset every session after another of its processes crashed"
                .to_string(),
        );
    }
    let (seen, uptime) = once_back(pool, within).await?;
    let elapsed = began.elapsed();
    if seen > began {
        Some(
            "the shard's server started again (a restart, a reset of every session after one \
             of its processes crashed, or another server in its place) while the step ran"
                .to_string(),
        )
    } else if uptime < (elapsed + std::time::Duration::from_secs(1)).as_secs_f64() {
        Some(format!(
            "the shard's server restarted while the step ran (up {uptime:.1} s, the step began {:.1} s ago)",
            elapsed.as_secs_f64()
        ))
    } else {
        None
    }
}
