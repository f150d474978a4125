//! One agent per shard: the shard itself fences agents.
//!
//! Epochs (`flotilla.fence`) fence *coordinators*: a deposed leader's steps are refused by the
//! shard. They say nothing about how many *agents* serve a shard. A second agent started by
//! mistake, or an old one that lost its connections and came back after a new one took its
//! place, would still carry a valid epoch from the current leader and could run steps beside
//! the current agent: two appliers racing on the same journal, the same checkpoints, the same
//! tenant locks. So before doing any work an agent takes a session-level advisory lock,
//! `pg_try_advisory_lock(hashtext('flotilla.agent'))`, on a connection of its own (outside the
//! pool) that it keeps for its whole life: a second agent fails to start with
//! [`AgentError::ShardTaken`]. If that connection dies later the shard has released the lock
//! (and another agent may hold it by now), so the agent takes no new runs and undoes nothing
//! until it holds the lock again; what is in flight finishes, and the fence in each step's own
//! transaction remains the last word. Taking it back, it checks the shard's flotilla schema
//! version first: an agent of a newer release may have served the shard meanwhile and
//! upgraded it, and this one would not heed what it records. And that the database is the
//! one it started on (by OID): one dropped and made again under it (a restore from a dump)
//! gets no runs until the agent is restarted.
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::journal::{SCHEMA_VERSION, newer_schema};
use crate::config::{AgentConfig, backoff_delay};
use crate::error::AgentError;
use crate::metrics;

const TRY_LOCK: &str = "SELECT pg_try_advisory_lock(hashtext('flotilla.agent'))";
const UNLOCK: &str = "SELECT pg_advisory_unlock(hashtext('flotilla.agent'))";
/// The session holding the lock, as far as this role may see it (pg_stat_activity hides
/// other roles' client addresses from non-superusers: those columns come back NULL).
const HOLDER: &str = "SELECT l.pid, a.application_name, host(a.client_addr), a.client_port \
     FROM pg_catalog.pg_locks l LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid \
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
       AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()) \
       AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtext('flotilla.agent')::bigint \
     LIMIT 1";
/// How often the lock's connection is checked while held.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// A check (or a connection attempt) that takes longer counts as a dead connection.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The OID of the session's database (None when it cannot be read).
async fn database_oid(conn: &mut PgConnection) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT oid::bigint FROM pg_catalog.pg_database WHERE datname = current_database()",
    )
    .fetch_one(conn)
    .await
    .ok()
}

/// pid, application_name, client address, client port.
type Holder = (i32, Option<String>, Option<String>, Option<i32>);

enum Attempt {
    Held(PgConnection),
    /// Held, on a database that is not the one the agent started on (see `guard`).
    Replaced(PgConnection),
    /// Another session holds it: ` (session pid …, …)`, or empty when it cannot be read.
    Taken(String),
}

/// Opens a dedicated session and tries the lock once; `started_on`: the database the agent
/// started on (by OID), which the one held must be.
async fn try_lock(
    options: &PgConnectOptions,
    started_on: Option<i64>,
) -> Result<Attempt, sqlx::Error> {
    let mut conn = super::connect::open(options).await?;
    let held: bool = sqlx::query_scalar(TRY_LOCK).fetch_one(&mut conn).await?;
    if held {
        // (an OID that cannot be read is no sign of another database)
        if let (Some(started), Some(now)) = (started_on, database_oid(&mut conn).await)
            && now != started
        {
            return Ok(Attempt::Replaced(conn));
        }
        return Ok(Attempt::Held(conn));
    }
    let holder = describe_holder(&mut conn).await;
    // it holds nothing: dropping it unclosed would only leave the server to notice
    let _ = conn.close().await;
    Ok(Attempt::Taken(holder))
}

async fn describe_holder(conn: &mut PgConnection) -> String {
    let row: Option<Holder> = match sqlx::query_as(HOLDER).fetch_optional(conn).await {
        Ok(row) => row,
        Err(error) => {
            warn!(%error, "cannot read who holds the shard's agent lock");
            None
        }
    };
    let Some((pid, application, host, port)) = row else {
        return String::new();
    };
    let mut parts = vec![format!("session pid {pid}")];
    if let Some(application) = application.filter(|a| !a.is_empty()) {
        parts.push(format!("application_name {application}"));
    }
    match (host, port) {
        (Some(host), Some(port)) if port > 0 => parts.push(format!("client {host}:{port}")),
        (Some(host), _) => parts.push(format!("client {host}")),
        // a NULL address with port -1: a Unix socket
        (None, Some(-1)) => parts.push("client on the local socket".into()),
        _ => {}
    }
    format!(" ({})", parts.join(", "))
}

/// Takes the shard's agent lock at start. Err(ShardTaken) when another agent holds it.
pub(crate) async fn acquire(config: &AgentConfig) -> Result<PgConnection, AgentError> {
    let options = super::connect_options(config)?;
    match try_lock(&options, None).await {
        // (no database to compare with: this is the one it starts on)
        Ok(Attempt::Held(conn) | Attempt::Replaced(conn)) => {
            metrics::shard_lock_held(true);
            info!("holding the shard's agent lock");
            Ok(conn)
        }
        Ok(Attempt::Taken(holder)) => Err(AgentError::ShardTaken {
            shard: config.shard.clone(),
            holder,
        }),
        Err(error) => Err(AgentError::Shard {
            shard: config.shard.clone(),
            what: "taking the shard's agent lock",
            error,
        }),
    }
}

/// Keeps the lock on `conn` until `stop`, taking it again whenever its connection dies;
/// `held` says whether the agent may apply. Releases the lock when stopped.
pub(crate) fn guard(
    config: &AgentConfig,
    conn: PgConnection,
    stop: CancellationToken,
) -> Result<(watch::Receiver<bool>, JoinHandle<()>), AgentError> {
    let options = super::connect_options(config)?;
    let (held, rx) = watch::channel(true);
    let (min, max) = (config.reconnect_min, config.reconnect_max);
    let span = tracing::info_span!("shard_lock", shard = %config.shard);
    let task = async move {
        let mut conn = conn;
        // The database this agent started on, by OID: one dropped and made again (a restore
        // from a dump) has another. Taking its lock back over such a one, the agent ran
        // steps on a database still being restored under it (tables not there yet, the
        // checkpoints' key not built: an all-or-nothing rollback failed on it).
        let started_on = database_oid(&mut conn).await;
        let mut conn = Some(conn);
        let mut attempt = 0u32;
        let mut last_holder = None;
        let mut told_newer = false;
        let mut told_replaced = false;
        loop {
            let Some(c) = conn.as_mut() else {
                match tokio::time::timeout(CHECK_TIMEOUT, try_lock(&options, started_on)).await {
                    Ok(Ok(Attempt::Replaced(c))) => {
                        if !told_replaced {
                            error!(
                                "the shard's database is not the one this agent started on (dropped and made again, or restored from a dump, while its lock was lost): this agent takes no runs on it; restart the agent once the database is whole again"
                            );
                            told_replaced = true;
                        }
                        let _ = tokio::time::timeout(CHECK_TIMEOUT, c.close()).await;
                    }
                    Ok(Ok(Attempt::Held(mut c))) => match newer_schema(&mut c).await {
                        Ok(None) => {
                            conn = Some(c);
                            attempt = 0;
                            last_holder = None;
                            told_newer = false;
                            held.send_replace(true);
                            metrics::shard_lock_held(true);
                            info!("the shard's agent lock is held again; taking runs again");
                            continue;
                        }
                        // While the lock was lost, an agent of a newer release may have
                        // served the shard and upgraded its schema, which this agent would
                        // not heed: the lock goes back (the session's end releases it).
                        Ok(Some(found)) => {
                            if !told_newer {
                                error!(found = %found, supported = SCHEMA_VERSION,
                                       "the shard's flotilla schema is newer than this agent's (a newer agent upgraded it while this one had lost its lock); this agent takes no runs: upgrade it");
                                told_newer = true;
                            }
                            let _ = tokio::time::timeout(CHECK_TIMEOUT, c.close()).await;
                        }
                        Err(error) => {
                            warn!(%error, "reading the shard's flotilla schema version after taking the lock again failed");
                            let _ = tokio::time::timeout(CHECK_TIMEOUT, c.close()).await;
                        }
                    },
                    Ok(Ok(Attempt::Taken(holder))) => {
                        if last_holder.as_ref() != Some(&holder) {
                            warn!(holder = %holder.trim(), "another Flotilla agent holds the shard's agent lock now; this agent takes no runs until it is free");
                            last_holder = Some(holder);
                        }
                    }
                    Ok(Err(error)) => warn!(%error, "cannot take the shard's agent lock again yet"),
                    Err(_) => warn!("taking the shard's agent lock again timed out"),
                }
                let delay = backoff_delay(attempt, min, max, rand::random());
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    () = tokio::time::sleep(delay) => continue,
                    () = stop.cancelled() => break,
                }
            };
            tokio::select! {
                () = tokio::time::sleep(CHECK_EVERY) => {}
                () = stop.cancelled() => break,
            }
            let check = sqlx::query("SELECT 1").execute(&mut *c);
            if let Err(problem) = match tokio::time::timeout(CHECK_TIMEOUT, check).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no answer in time".to_string()),
            } {
                held.send_replace(false);
                metrics::shard_lock_held(false);
                warn!(%problem, "lost the connection holding the shard's agent lock; taking no new runs until it is held again");
                // dropped, not closed: it is broken or hung
                conn = None;
            }
        }
        held.send_replace(false);
        metrics::shard_lock_held(false);
        if let Some(mut c) = conn {
            // released explicitly so a successor can take it as soon as we return; if that
            // fails, the session's end releases it as well
            let _ = tokio::time::timeout(CHECK_TIMEOUT, sqlx::query(UNLOCK).execute(&mut c)).await;
            let _ = tokio::time::timeout(CHECK_TIMEOUT, c.close()).await;
            info!("released the shard's agent lock");
        }
    };
    Ok((
        rx,
        tokio::spawn(tracing::Instrument::instrument(task, span)),
    ))
}
