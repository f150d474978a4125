//! Two-phase commit on this shard (invariant 4).
//!
//! A run with a `prepare_gid` ends in `PREPARE TRANSACTION '<gid>'` instead of COMMIT (see
//! `executor`); its change and journal rows then wait, invisible, for the plan's decision.
//! This module owns what happens to them afterwards:
//! - [`Agent::resolve`]: the coordinator's `Resolve`: COMMIT PREPARED or ROLLBACK PREPARED
//!   each gid (one that is gone counts as resolved: a repeat). With etcd configured, a commit
//!   is refused unless the plan's decision key in etcd says `commit`.
//! - [`Agent::resolve_in_doubt`]: at start and before every (re)connect, Flotilla's prepared
//!   transactions in this database are resolved from their plan's decision in etcd (so that
//!   happens even while no coordinator is up); those without a decision, or every one when
//!   there is no etcd, are listed in `Hello.in_doubt` for the leader to decide.
//! - [`Agent::check_two_phase`]: the preflight of an atomic plan.
//!
//! Only gids starting with `flotilla:` are ever touched: other applications' prepared
//! transactions are theirs. Gids read `flotilla:<plan>:<run>:<epoch>:<target>`; the plan
//! field names the decision key (`<prefix>/decisions/<plan>`, as the coordinator's
//! `coordination::keys::decision` builds it).
//!
//! A prepared transaction keeps its `FOR SHARE` lock on `flotilla.fence` until it is resolved,
//! so no newer epoch can be written meanwhile: resolving never advances the fence (it only
//! reads it), or it would wait behind the very transaction it resolves.
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use flotilla_proto::pb;
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPool;
use tracing::{debug, info, instrument, warn};

use crate::config::{AgentConfig, redact_dsn};
use crate::error::classify;
use crate::executor::recover;
use crate::liveness::call;
use crate::sqlgen::quote_literal;
use crate::{Agent, metrics, shard};

/// Every gid Flotilla prepares starts with it.
pub(crate) const GID_PREFIX: &str = "flotilla:";
/// PostgreSQL's GIDSIZE is 200 bytes with the terminating NUL.
pub(crate) const GID_MAX_BYTES: usize = 199;
/// `undefined_object`: COMMIT/ROLLBACK PREPARED of a gid that is not (or no longer) prepared.
const SQLSTATE_UNDEFINED_OBJECT: &str = "42704";
/// The plan field of the preflight's probe gids (`flotilla:preflight:<hex>`).
const PREFLIGHT_PLAN: &str = "preflight";
/// How long one etcd call (connecting, reading a decision) may take.
const ETCD_CALL_LIMIT: Duration = Duration::from_secs(3);

/// Flotilla's prepared transactions in the current database, oldest first.
const LIST_PREPARED: &str = "SELECT gid FROM pg_catalog.pg_prepared_xacts \
     WHERE gid LIKE 'flotilla:%' AND database = pg_catalog.current_database() ORDER BY prepared";

/// A plan's decision, as its key in etcd holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Commit,
    Abort,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Commit => "commit",
            Decision::Abort => "abort",
        }
    }

    fn sql(self) -> &'static str {
        match self {
            Decision::Commit => "COMMIT PREPARED",
            Decision::Abort => "ROLLBACK PREPARED",
        }
    }
}

/// Checks a run's prepare gid and returns it quoted: `flotilla:`, shorter than 200 bytes, and
/// its plan field is the run's plan (in-doubt resolution reads that plan's decision).
pub(crate) fn validate_gid(gid: &str, plan_id: &str) -> Result<String, String> {
    if !gid.starts_with(GID_PREFIX) {
        return Err(format!(
            "prepare gid {:?} does not start with `{GID_PREFIX}`",
            gid.escape_debug().to_string()
        ));
    }
    if gid.len() > GID_MAX_BYTES {
        return Err(format!(
            "prepare gid is {} bytes long; PostgreSQL takes fewer than 200",
            gid.len()
        ));
    }
    // The unit deciding it: the plan, or one atomic parallel group (`<plan>.g<N>`).
    let belongs = plan_of_gid(gid).is_some_and(|unit| {
        unit == plan_id
            || unit
                .strip_prefix(plan_id)
                .and_then(|rest| rest.strip_prefix(".g"))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    });
    if !belongs {
        return Err(format!(
            "prepare gid {gid:?} does not belong to plan {plan_id} \
             (expected flotilla:<plan>[.g<group>]:<run>:<epoch>:<target>)"
        ));
    }
    quote_literal(gid)
}

/// The decision unit of a Flotilla gid (the plan, or `<plan>.g<N>` for an atomic
/// parallel group; its decision is under that name): its second `:`-separated field.
pub(crate) fn plan_of_gid(gid: &str) -> Option<&str> {
    let plan = gid.strip_prefix(GID_PREFIX)?.split(':').next()?;
    (!plan.is_empty()).then_some(plan)
}

/// The preflight's probe gid: `flotilla:preflight:<hex>` (three fields, never a run's).
fn probe_gid() -> String {
    format!(
        "{GID_PREFIX}{PREFLIGHT_PLAN}:{:016x}",
        rand::random::<u64>()
    )
}

fn is_probe(gid: &str) -> bool {
    gid.strip_prefix(GID_PREFIX)
        .and_then(|rest| rest.strip_prefix(PREFLIGHT_PLAN))
        .and_then(|rest| rest.strip_prefix(':'))
        .is_some_and(|rest| !rest.is_empty() && !rest.contains(':'))
}

/// `<prefix>/decisions/<plan>`, as `keys::decision` in the coordinator builds it.
pub(crate) fn decision_key(prefix: &str, plan_id: &str) -> String {
    format!("{}/decisions/{plan_id}", prefix.trim_end_matches('/'))
}

/// Which of `gids` are prepared in the current database.
pub(crate) async fn prepared_among(
    pool: &PgPool,
    gids: &[String],
) -> Result<HashSet<String>, sqlx::Error> {
    let found: Vec<String> = sqlx::query_scalar(
        "SELECT gid FROM pg_catalog.pg_prepared_xacts \
         WHERE gid = ANY($1) AND database = pg_catalog.current_database()",
    )
    .bind(gids)
    .fetch_all(pool)
    .await?;
    Ok(found.into_iter().collect())
}

/// What COMMIT/ROLLBACK PREPARED did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finished {
    /// Resolved now.
    Now,
    /// Not prepared (any more): resolved before, by us or by someone else.
    Before,
}

/// COMMIT PREPARED or ROLLBACK PREPARED one gid (quoted), outside any transaction, on a pool
/// connection. Err: the message, with its SQLSTATE.
async fn finish(pool: &PgPool, gid_lit: &str, decision: Decision) -> Result<Finished, String> {
    let sql = format!("{} {gid_lit}", decision.sql());
    match sqlx::raw_sql(AssertSqlSafe(sql)).execute(pool).await {
        Ok(_) => Ok(Finished::Now),
        Err(e) => {
            let f = classify(&e, "resolve");
            if f.error.sqlstate == SQLSTATE_UNDEFINED_OBJECT {
                Ok(Finished::Before)
            } else if f.error.sqlstate.is_empty() {
                Err(f.error.message)
            } else {
                Err(format!(
                    "{} (SQLSTATE {})",
                    f.error.message, f.error.sqlstate
                ))
            }
        }
    }
}

/// Reads plans' decisions from etcd, on one client kept between reads.
pub(crate) struct Decisions {
    endpoints: Vec<String>,
    /// The endpoints as logs may show them.
    shown: String,
    prefix: String,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl Decisions {
    /// None when no etcd is configured.
    pub fn from_config(config: &AgentConfig) -> Option<Decisions> {
        if config.etcd.is_empty() {
            return None;
        }
        Some(Decisions {
            endpoints: config.etcd.iter().map(|e| e.trim().to_string()).collect(),
            shown: config
                .etcd
                .iter()
                .map(|e| redact_dsn(e))
                .collect::<Vec<_>>()
                .join(","),
            prefix: config.etcd_prefix.clone(),
            client: tokio::sync::Mutex::new(None),
        })
    }

    /// The plan's decision; None when there is none yet (or its value is neither `commit`
    /// nor `abort`). Err when etcd cannot be read.
    pub async fn read(&self, plan_id: &str) -> Result<Option<Decision>, String> {
        // One try per member, each first in turn: a dead member must not stand
        // between a prepared transaction and its decision.
        let mut last = String::new();
        for first in 0..self.endpoints.len().max(1) {
            match self.read_via(plan_id, first).await {
                Ok(d) => return Ok(d),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn read_via(&self, plan_id: &str, first: usize) -> Result<Option<Decision>, String> {
        let key = decision_key(&self.prefix, plan_id);
        let mut client = self.client.lock().await;
        let c = match client.as_mut() {
            Some(c) => c,
            None => {
                let options = ConnectOptions::new()
                    .with_connect_timeout(ETCD_CALL_LIMIT)
                    .with_timeout(ETCD_CALL_LIMIT);
                let mut endpoints = self.endpoints.clone();
                if !endpoints.is_empty() {
                    let n = endpoints.len();
                    endpoints.rotate_left(first % n);
                }
                let connect = Client::connect(&endpoints, Some(options));
                match call(ETCD_CALL_LIMIT, connect).await {
                    Ok(c) => client.insert(c),
                    Err(reason) => {
                        return Err(format!("etcd at {} unreachable: {reason}", self.shown));
                    }
                }
            }
        };
        let found = match call(ETCD_CALL_LIMIT, c.get(key.as_str(), None)).await {
            Ok(found) => found,
            Err(reason) => {
                // a fresh client next time
                *client = None;
                return Err(format!(
                    "reading {key} from etcd at {}: {reason}",
                    self.shown
                ));
            }
        };
        let Some(kv) = found.kvs().first() else {
            return Ok(None);
        };
        match kv.value() {
            b"commit" => Ok(Some(Decision::Commit)),
            b"abort" => Ok(Some(Decision::Abort)),
            other => {
                warn!(%key, value = %String::from_utf8_lossy(other).escape_debug(), "a decision key holds neither commit nor abort; taking it as no decision");
                Ok(None)
            }
        }
    }
}

/// What the last in-doubt scan reported, so that repeating it (at every connection attempt)
/// logs only what changed.
#[derive(Default)]
pub(crate) struct ScanLog {
    left: Vec<String>,
    etcd_error: bool,
}

/// A prepare gid queued or running on this agent; released (dropped) with its run.
pub(crate) struct GidClaim {
    set: Arc<Mutex<HashSet<String>>>,
    gid: String,
}

impl Drop for GidClaim {
    fn drop(&mut self) {
        self.set.lock().expect("gids lock").remove(&self.gid);
    }
}

impl Agent {
    /// Claims a prepare gid for a run about to be queued. None when a run with the same gid
    /// is already queued or running here: that one's result answers both (a second
    /// transaction would only wait for the first one's locks).
    pub(crate) fn claim_gid(&self, gid: &str) -> Option<GidClaim> {
        let mut set = self.gids_in_flight.lock().expect("gids lock");
        set.insert(gid.to_string()).then(|| GidClaim {
            set: self.gids_in_flight.clone(),
            gid: gid.to_string(),
        })
    }

    /// The coordinator's decision for some of a plan's prepared transactions here.
    #[instrument(skip_all, fields(shard = %self.config.shard, plan = %req.plan_id, commit = req.commit, epoch = req.epoch))]
    pub(crate) async fn resolve(self: Arc<Self>, req: pb::Resolve) -> pb::ResolveReply {
        let decision = if req.commit {
            Decision::Commit
        } else {
            Decision::Abort
        };
        let mut reply = pb::ResolveReply {
            plan_id: req.plan_id.clone(),
            commit: req.commit,
            resolved: Vec::new(),
            failed: Vec::new(),
        };
        let fail_all = |reply: &mut pb::ResolveReply, message: &str| {
            warn!(gids = req.gids.len(), %message, "resolving nothing");
            reply.failed = req.gids.iter().map(|g| format!("{g}: {message}")).collect();
        };
        if decision == Decision::Abort {
            // A run of the plan still in flight may be about to PREPARE: were it to do so
            // after its ROLLBACK PREPARED (a no-op then), it would stay prepared. Queued runs
            // are dropped, and those running finish first.
            let plan = self.plan(&req.plan_id);
            self.halt(&plan);
            plan.wait_idle().await;
        }
        // A deposed coordinator decides nothing here. Read, never advanced: advancing waits
        // for the prepared transactions' share lock on the fence row.
        match shard::read_fence(&self.pool).await {
            Ok(fence) if fence > req.epoch => {
                let message = format!(
                    "fenced: epoch {} is older than the shard's epoch {fence}",
                    req.epoch
                );
                fail_all(&mut reply, &message);
                return reply;
            }
            Ok(_) => {}
            Err(e) => {
                fail_all(&mut reply, &format!("reading the shard's fence: {e}"));
                return reply;
            }
        }
        // The unit deciding these gids: the plan, or one atomic parallel group of it.
        // One Resolve covers one unit.
        let units: BTreeSet<&str> = req.gids.iter().filter_map(|g| plan_of_gid(g)).collect();
        if units.len() > 1 {
            fail_all(
                &mut reply,
                &format!("one resolve names gids of several decisions: {units:?}"),
            );
            return reply;
        }
        let unit = units
            .first()
            .map(|u| u.to_string())
            .unwrap_or_else(|| req.plan_id.clone());
        if decision == Decision::Commit
            && let Some(decisions) = &self.decisions
        {
            let why = match decisions.read(&unit).await {
                Ok(Some(Decision::Commit)) => None,
                Ok(Some(Decision::Abort)) => Some("the decision is abort".to_string()),
                Ok(None) => Some(format!(
                    "no key {}",
                    decision_key(&self.config.etcd_prefix, &unit)
                )),
                Err(reason) => Some(reason),
            };
            if let Some(why) = why {
                fail_all(
                    &mut reply,
                    &format!("no commit decision in etcd ({why}); not committing"),
                );
                return reply;
            }
        }
        let mut done = 0i64;
        for gid in req.gids {
            let lit = match validate_gid(&gid, &req.plan_id) {
                Ok(lit) => lit,
                Err(reason) => {
                    warn!(gid = %gid.escape_debug(), %reason, "not resolving a gid of the wrong shape");
                    reply.failed.push(format!("{gid}: {reason}"));
                    continue;
                }
            };
            match finish(&self.pool, &lit, decision).await {
                Ok(Finished::Now) => {
                    info!(%gid, decision = decision.as_str(), "prepared transaction resolved");
                    metrics::prepared_resolved(decision.as_str());
                    done += 1;
                    reply.resolved.push(gid);
                }
                Ok(Finished::Before) => {
                    debug!(%gid, decision = decision.as_str(), "prepared transaction already resolved");
                    reply.resolved.push(gid);
                }
                Err(message) => {
                    warn!(%gid, decision = decision.as_str(), %message, "resolving a prepared transaction failed");
                    reply.failed.push(format!("{gid}: {message}"));
                }
            }
        }
        metrics::prepared_held_add(-(done as f64));
        reply
    }

    /// Resolves Flotilla's prepared transactions in this database from their plans'
    /// decisions in etcd, and returns those left in doubt (every one without etcd). Probes
    /// left by an interrupted preflight are rolled back. Harmless to repeat.
    #[instrument(skip_all, fields(shard = %self.config.shard))]
    pub(crate) async fn resolve_in_doubt(&self) -> Result<Vec<String>, sqlx::Error> {
        let gids: Vec<String> = sqlx::query_scalar(LIST_PREPARED)
            .fetch_all(&self.pool)
            .await?;
        let mut left = Vec::new();
        let mut decided: HashMap<String, Option<Decision>> = HashMap::new();
        let mut etcd_down = false;
        let etcd_was_down = self.scan_log.lock().expect("scan log").etcd_error;
        for gid in gids {
            let decision = if is_probe(&gid) {
                Some(Decision::Abort)
            } else {
                match (plan_of_gid(&gid), &self.decisions) {
                    (Some(plan), Some(decisions)) if !etcd_down => match decided.get(plan) {
                        Some(d) => *d,
                        None => match decisions.read(plan).await {
                            Ok(d) => {
                                decided.insert(plan.to_string(), d);
                                d
                            }
                            Err(reason) => {
                                // the rest waits for the next scan (or the leader)
                                if etcd_was_down {
                                    debug!(%reason, "etcd still cannot be read");
                                } else {
                                    warn!(%reason, "cannot read decisions from etcd; leaving prepared transactions in doubt");
                                }
                                etcd_down = true;
                                None
                            }
                        },
                    },
                    _ => None,
                }
            };
            let Some(decision) = decision else {
                left.push(gid);
                continue;
            };
            let lit = match quote_literal(&gid) {
                Ok(lit) => lit,
                Err(reason) => {
                    warn!(%reason, "cannot quote a prepared transaction's gid");
                    left.push(gid);
                    continue;
                }
            };
            match finish(&self.pool, &lit, decision).await {
                Ok(Finished::Now) if is_probe(&gid) => {
                    info!(%gid, "rolled back a preflight probe left prepared");
                }
                Ok(Finished::Now) => {
                    info!(%gid, decision = decision.as_str(), "resolved an in-doubt prepared transaction from its decision in etcd");
                    metrics::prepared_resolved(decision.as_str());
                }
                Ok(Finished::Before) => {}
                Err(message) => {
                    warn!(%gid, decision = decision.as_str(), %message, "resolving an in-doubt prepared transaction failed");
                    left.push(gid);
                }
            }
        }
        metrics::prepared_held_set(left.len() as f64);
        let mut log = self.scan_log.lock().expect("scan log");
        if log.left != left && !left.is_empty() {
            info!(in_doubt = left.len(), gids = ?left, "prepared transactions in doubt: waiting for their plans' decisions");
        }
        if log.etcd_error && !etcd_down && !decided.is_empty() {
            info!("etcd can be read again");
        }
        log.left.clone_from(&left);
        // unknown when nothing needed a read
        log.etcd_error = etcd_down || (log.etcd_error && decided.is_empty());
        Ok(left)
    }

    /// Whether this shard can take part in two-phase commit: `max_prepared_transactions`
    /// above 0, and the role can prepare (a probe transaction, prepared and rolled back).
    /// Err: why not, naming the shard and the setting or the SQLSTATE.
    #[instrument(skip_all, fields(shard = %self.config.shard))]
    pub(crate) async fn check_two_phase(&self) -> Result<(), String> {
        let shard = &self.config.shard;
        let show = |name: &'static str| async move {
            sqlx::raw_sql(AssertSqlSafe(format!("SHOW {name}")))
                .fetch_one(&self.pool)
                .await
                .and_then(|row| sqlx::Row::try_get::<String, _>(&row, 0))
                .map_err(|e| format!("shard {shard}: reading {name}: {e}"))
        };
        let max = show("max_prepared_transactions").await?;
        if max.trim().parse::<u64>().unwrap_or(0) == 0 {
            return Err(format!(
                "shard {shard}: max_prepared_transactions = {}; two-phase commit needs it above 0 (postgresql.conf, restart)",
                max.trim()
            ));
        }
        match show("max_locks_per_transaction").await {
            Ok(locks) => {
                info!(max_prepared_transactions = %max, max_locks_per_transaction = %locks, "two-phase commit settings")
            }
            Err(e) => warn!(error = %e, "max_locks_per_transaction cannot be read"),
        }
        let gid = probe_gid();
        let lit = quote_literal(&gid)?;
        let mut conn =
            self.pool.acquire().await.map_err(|e| {
                format!("shard {shard}: no connection for the two-phase probe: {e}")
            })?;
        let prepared = sqlx::raw_sql(AssertSqlSafe(format!("BEGIN; PREPARE TRANSACTION {lit}")))
            .execute(&mut *conn)
            .await;
        if let Err(e) = prepared {
            if recover(&mut conn, true, false).await {
                conn.close_on_drop();
            }
            let f = classify(&e, "prepare");
            return Err(format!(
                "shard {shard}: cannot prepare a transaction: {} (SQLSTATE {})",
                f.error.message, f.error.sqlstate
            ));
        }
        drop(conn);
        match finish(&self.pool, &lit, Decision::Abort).await {
            Ok(_) => Ok(()),
            Err(message) => Err(format!(
                "shard {shard}: cannot roll back the prepared probe {gid}: {message}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids() {
        assert_eq!(
            validate_gid("flotilla:p1:7:3:tenant_1", "p1").unwrap(),
            "'flotilla:p1:7:3:tenant_1'"
        );
        // the shard itself: an empty target
        assert!(validate_gid("flotilla:p1:7:3:", "p1").is_ok());
        assert!(
            validate_gid("other:p1:7:3:t", "p1")
                .unwrap_err()
                .contains("does not start with `flotilla:`")
        );
        assert!(
            validate_gid("flotilla:p2:7:3:t", "p1")
                .unwrap_err()
                .contains("does not belong to plan p1")
        );
        let long = format!("flotilla:p1:7:3:{}", "x".repeat(183));
        assert_eq!(long.len(), 199);
        assert!(validate_gid(&long, "p1").is_ok());
        let too_long = format!("{long}x");
        assert!(validate_gid(&too_long, "p1").unwrap_err().contains("200"));
        assert!(validate_gid("flotilla:p1:1:1:a\0b", "p1").is_err());
        assert_eq!(
            validate_gid("flotilla:p1:1:1:it's", "p1").unwrap(),
            "'flotilla:p1:1:1:it''s'"
        );

        // An atomic parallel group's unit.
        assert!(validate_gid("flotilla:p1.g2:7:3:t", "p1").is_ok());
        assert!(validate_gid("flotilla:p1.g:7:3:t", "p1").is_err());
        assert!(validate_gid("flotilla:p1.gx:7:3:t", "p1").is_err());
        assert!(validate_gid("flotilla:p12:7:3:t", "p1").is_err());
        assert_eq!(plan_of_gid("flotilla:p1.g2:7:3:t"), Some("p1.g2"));
        assert_eq!(plan_of_gid("flotilla:p1:7:3:t"), Some("p1"));
        assert_eq!(plan_of_gid("flotilla:p1"), Some("p1"));
        assert_eq!(plan_of_gid("flotilla::7"), None);
        assert_eq!(plan_of_gid("other-app-1"), None);
    }

    #[test]
    fn probes_are_told_apart_from_runs() {
        let gid = probe_gid();
        assert!(
            gid.starts_with("flotilla:preflight:") && is_probe(&gid),
            "{gid}"
        );
        assert!(!is_probe("flotilla:preflight:1:1:t"));
        assert!(!is_probe("flotilla:preflight:"));
        assert!(!is_probe("flotilla:p1:1:1:t"));
    }

    #[test]
    fn decision_keys_follow_the_coordinators_layout() {
        assert_eq!(decision_key("/flotilla", "p1"), "/flotilla/decisions/p1");
        assert_eq!(decision_key("/f/", "p1"), "/f/decisions/p1");
        assert_eq!(Decision::Commit.sql(), "COMMIT PREPARED");
        assert_eq!(Decision::Abort.as_str(), "abort");
    }
}
