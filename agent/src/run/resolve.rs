//! Applying plans' decisions to this shard's prepared transactions (invariant 4):
//! - [`Agent::resolve`]: the coordinator's `Resolve`: COMMIT PREPARED or ROLLBACK PREPARED
//!   each gid (one that is gone counts as resolved: a repeat). With etcd configured, a commit
//!   is refused unless the plan's decision key in etcd says `commit`.
//! - [`Agent::resolve_in_doubt`]: at start and before every (re)connect, Flotilla's prepared
//!   transactions in this database are resolved from their plan's decision in etcd (so that
//!   happens even while no coordinator is up); those without a decision, or every one when
//!   there is no etcd, are listed in `Hello.in_doubt` for the leader to decide.
//! - [`Agent::sweep_in_doubt`]: the same every few seconds for those prepared long ago, so
//!   that one the coordinator missed does not wait for the next connect.
//!
//! A prepared transaction keeps its `FOR SHARE` lock on `flotilla.fence` until it is resolved,
//! so no newer epoch can be written meanwhile: resolving never advances the fence (it only
//! reads it), or it would wait behind the very transaction it resolves.
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use flotilla_core::pb;
use tracing::{debug, info, instrument, warn};

use super::two_phase::{
    Decision, Finished, decision_key, finish, is_probe, list_prepared, list_prepared_before,
    plan_of_gid, validate_gid,
};
use crate::step::quote_literal;
use crate::{Agent, metrics, shard};

/// What the last in-doubt scan reported, so that repeating it (at every connection attempt)
/// logs only what changed.
#[derive(Default)]
pub(crate) struct ScanLog {
    left: Vec<String>,
    etcd_error: bool,
}

/// How many gids committed from etcd an agent keeps to tell its coordinator.
const COMMITTED_KEPT: usize = 10_000;

impl Agent {
    /// The coordinator's decision for some of a plan's prepared transactions here.
    #[instrument(skip_all, fields(shard = %self.config.shard, plan = %req.plan_id, commit = req.commit, epoch = req.epoch))]
    pub(crate) async fn resolve(self: Arc<Self>, req: pb::Resolve) -> pb::ResolveReply {
        let received = std::time::Instant::now();
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
            resolved_at_us: Vec::new(),
            received_at_us: super::two_phase::now_us(),
        };
        let fail_all = |reply: &mut pb::ResolveReply, message: &str| {
            warn!(gids = req.gids.len(), %message, "resolving nothing");
            reply.failed = req.gids.iter().map(|g| format!("{g}: {message}")).collect();
        };
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
        // A deposed coordinator decides nothing here (the fence, read, never advanced:
        // advancing waits for the prepared transactions' share lock on the fence row),
        // and a commit needs its decision in etcd. Both read at once: every millisecond
        // here is one more that every target holds its locks.
        let decision_read = async {
            match (&self.decisions, decision) {
                (Some(decisions), Decision::Commit) => Some(decisions.read(&unit).await),
                _ => None,
            }
        };
        let (fence, decided) = tokio::join!(shard::read_fence(&self.pool), decision_read);
        match fence {
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
        if let Some(decided) = decided {
            let why = match decided {
                Ok(Some(Decision::Commit)) => None,
                Ok(Some(Decision::Abort)) => Some(
                    "no commit decision in etcd (the decision is abort); not committing"
                        .to_string(),
                ),
                Ok(None) => Some(format!(
                    "{} {}); not committing",
                    flotilla_core::protocol::NO_DECISION_KEY,
                    decision_key(&self.config.etcd_prefix, &unit)
                )),
                // (it said "no commit decision", and the operator looked for a lost decision)
                Err(reason) => Some(format!(
                    "this agent cannot read the commit decision: {reason}; not committing until \
                     it can (its etcd endpoints: `--etcd`; the prepared transactions hold their \
                     locks meanwhile)"
                )),
            };
            if let Some(why) = why {
                fail_all(&mut reply, &why);
                return reply;
            }
        }
        let plan_id = req.plan_id.clone();
        let mut done = 0i64;
        if decision == Decision::Abort {
            // The gids named are rolled back at once: their runs are over (the coordinator
            // names what was reported prepared, or found in doubt), and each holds its
            // target's locks until then. The runs of the plan still in flight are halted
            // (a halted run does not prepare, and its statement is cancelled: `abort`), and
            // what they or a copy of a named run prepared meanwhile follows once they end:
            // a transaction prepared after its ROLLBACK PREPARED (a no-op then) would stay
            // prepared. Only for an abort that stands (one unit, a coordinator the fence has
            // not seen deposed): a stale or malformed one dropped every queued run of the
            // plan and waited for those in flight.
            let plan = self.plan(&plan_id);
            self.halt(&plan);
            done += self
                .finish_into(&plan_id, req.gids.clone(), decision, received, &mut reply)
                .await;
            plan.wait_idle().await;
            // Those runs, and runs the agent went on with while cut off from its
            // coordinator, may have prepared transactions of the unit the coordinator has
            // not heard of: the abort is the unit's, so they are rolled back with it. Left,
            // they held their tables' locks after the plan ended rolled back, until the
            // next in-doubt sweep.
            match list_prepared(&self.pool).await {
                Ok(here) => {
                    let left: Vec<String> = here
                        .into_iter()
                        // (the named too: a copy of a named run may have prepared its gid
                        // again after its ROLLBACK PREPARED; a repeat costs nothing)
                        .filter(|g| plan_of_gid(g) == Some(unit.as_str()))
                        .collect();
                    if !left.is_empty() {
                        info!(gids = ?left, "rolling back the unit's prepared transactions left once its runs ended (not named: prepared while the decision was on its way; or prepared again by a copy of a named run)");
                        done += self
                            .finish_into(&plan_id, left, decision, received, &mut reply)
                            .await;
                    }
                }
                Err(e) => {
                    warn!(
                        "listing the shard's prepared transactions failed; resolving those named: {e}"
                    )
                }
            }
        } else {
            done += self
                .finish_into(&plan_id, req.gids, decision, received, &mut reply)
                .await;
        }
        metrics::prepared_held_add(-(done as f64));
        reply
    }

    /// COMMIT or ROLLBACK PREPARED `gids` (of `plan_id`'s unit), adding what each came to to
    /// `reply` (a gid named there already, resolved again, is not named twice); returns how
    /// many this call resolved.
    async fn finish_into(
        &self,
        plan_id: &str,
        gids: Vec<String>,
        decision: Decision,
        received: std::time::Instant,
        reply: &mut pb::ResolveReply,
    ) -> i64 {
        let mut valid = Vec::with_capacity(gids.len());
        for gid in gids {
            match validate_gid(&gid, plan_id) {
                Ok(lit) => valid.push((gid, lit)),
                Err(reason) => {
                    warn!(gid = %gid.escape_debug(), %reason, "not resolving a gid of the wrong shape");
                    reply.failed.push(format!("{gid}: {reason}"));
                }
            }
        }
        let (open_at_start, idle_at_start) = (self.pool.size(), self.pool.num_idle());
        // Each prepared transaction holds its target's locks until it is resolved: all of
        // them at once on the connections open now, but never on new ones: opening a
        // connection (a backend's fork and start) costs more than a COMMIT PREPARED, and
        // a plan run with one lane per shard leaves one or two open. (Measured in the
        // two-phase bench: 8 at once per agent, mostly on new connections, took 10x what
        // one session per shard database committing in turn takes.)
        let parallel = self.pool.num_idle();
        let checked = received.elapsed();
        let finishing = std::time::Instant::now();
        let finished = finish_on_connections(
            &self.pool,
            parallel,
            self.config.max_connections,
            valid
                .into_iter()
                .map(|(gid, lit)| (gid, lit, decision))
                .collect(),
        )
        .await;
        // where a decision's time goes on this shard (the debug log): the
        // fence and decision reads, then the COMMIT/ROLLBACK PREPAREDs on the sessions idle
        // after those reads (`finish_on_connections` takes at least one, at most one a gid),
        // and how many had to be opened
        debug!(
            gids = finished.len(),
            checks_ms = checked.as_secs_f64() * 1e3,
            finish_ms = finishing.elapsed().as_secs_f64() * 1e3,
            open_at_start,
            idle_at_start,
            idle_after_checks = parallel,
            opened = self.pool.size().saturating_sub(open_at_start),
            "decision carried out"
        );
        let mut done = 0i64;
        for (gid, _, r, at) in finished {
            // (rolled back a second time, prepared again between the two: named once)
            let again = reply.resolved.contains(&gid);
            match r {
                Ok(Finished::Now) => {
                    info!(%gid, decision = decision.as_str(), "prepared transaction resolved");
                    metrics::prepared_resolved(decision.as_str());
                    done += 1;
                    if !again {
                        reply.resolved.push(gid);
                        reply.resolved_at_us.push(at);
                    }
                }
                Ok(Finished::Before) if again => {}
                Ok(Finished::Before) => {
                    debug!(%gid, decision = decision.as_str(), "prepared transaction already resolved");
                    reply.resolved.push(gid);
                    reply.resolved_at_us.push(0);
                }
                Err(message) => {
                    warn!(%gid, decision = decision.as_str(), %message, "resolving a prepared transaction failed");
                    reply.failed.push(format!("{gid}: {message}"));
                }
            }
        }
        done
    }

    /// Resolves Flotilla's prepared transactions in this database from their plans'
    /// decisions in etcd, and returns those left in doubt (every one without etcd). Probes
    /// left by an interrupted preflight are rolled back. Harmless to repeat.
    #[instrument(skip_all, fields(shard = %self.config.shard))]
    pub(crate) async fn resolve_in_doubt(&self) -> Result<Vec<String>, sqlx::Error> {
        let gids: Vec<String> = list_prepared(&self.pool).await?;
        self.resolve_from_etcd(gids, None).await
    }

    /// A transaction prepared for an earlier leader after a newer one welcomed the agent:
    /// resolved from its plan's decision in etcd as soon as there is one (the new leader
    /// writes the presumed abort moments after it takes over), tried for one sweep period;
    /// after that the sweep has it. Without etcd, nothing to read: the sweep does not run
    /// either, and the next connect's scan lists it.
    pub(crate) async fn resolve_stale(self: Arc<Self>, gid: String) {
        if self.decisions.is_none() {
            return;
        }
        let until = std::time::Instant::now() + self.config.in_doubt_sweep;
        let mut every = tokio::time::interval(std::time::Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = self.cancel.cancelled() => return,
            }
            match self.resolve_from_etcd(vec![gid.clone()], None).await {
                Ok(left) if left.is_empty() => {
                    info!(%gid, "a transaction prepared for an earlier leader resolved from its decision");
                    return;
                }
                Ok(_) | Err(_) if std::time::Instant::now() >= until => return,
                Ok(_) | Err(_) => {}
            }
        }
    }

    /// Every `in_doubt_sweep` (with etcd), until the agent stops: the prepared
    /// transactions older than that whose decision in etcd this pass and the one before
    /// both found are resolved from it, as at a connect. A coordinator resolves its units'
    /// transactions moments after it decides; one still prepared a whole period after its
    /// decision was seen was missed (a run in flight when the leader changed that
    /// PREPAREd after the new leader presumed abort, a Resolve lost with its stream) and
    /// would hold its target's locks until the agent's next connect, which a healthy
    /// stream never makes. Waiting a period after the decision keeps the sweep out of the
    /// coordinator's own Resolve of a unit that took long to prepare (both committing one
    /// gid: one of them fails on the other's, and the unit's timings lose it). Those
    /// without a decision wait for the leader, as before.
    pub(crate) async fn sweep_in_doubt(self: Arc<Self>) {
        if self.decisions.is_none() {
            return;
        }
        let period = self
            .config
            .in_doubt_sweep
            .max(std::time::Duration::from_millis(100));
        let mut every = tokio::time::interval(period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        // gid -> the decision the last pass found for it
        let mut seen: HashMap<String, Decision> = HashMap::new();
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = self.cancel.cancelled() => return,
            }
            let pass = async {
                match list_prepared_before(&self.pool, period).await {
                    Ok(gids) if gids.is_empty() => seen.clear(),
                    Ok(gids) => {
                        if let Err(error) = self.resolve_from_etcd(gids, Some(&mut seen)).await {
                            debug!(%error, "the in-doubt sweep could not resolve");
                        }
                    }
                    // the shard may be away for a moment; the next round tells
                    Err(error) => {
                        debug!(%error, "the in-doubt sweep could not list prepared transactions")
                    }
                }
            };
            // a pass cut short by the agent's stop leaves nothing half done: each COMMIT or
            // ROLLBACK PREPARED is whole, and what it did not reach stays prepared
            tokio::select! {
                () = pass => {}
                () = self.cancel.cancelled() => return,
            }
        }
    }

    /// Resolves `gids` from their decisions in etcd; returns those left. `seen`: a pass of
    /// the periodic sweep, which resolves only gids the last pass found decided alike (the
    /// others it records for the next), logs its failures quietly (they repeat every
    /// period; a connect's scan reports them), and leaves the connect scan's log and the
    /// gauge of prepared transactions held (the census corrects it) alone.
    async fn resolve_from_etcd(
        &self,
        gids: Vec<String>,
        seen: Option<&mut HashMap<String, Decision>>,
    ) -> Result<Vec<String>, sqlx::Error> {
        let sweep = seen.is_some();
        let mut left = Vec::new();
        let mut decided: HashMap<String, Option<Decision>> = HashMap::new();
        let mut etcd_down = false;
        let etcd_was_down = sweep || self.scan_log.lock().expect("scan log").etcd_error;
        let mut to_finish = Vec::new();
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
            to_finish.push((gid, lit, decision));
        }
        if let Some(seen) = seen {
            let before = std::mem::take(seen);
            to_finish.retain(|(gid, _, decision)| {
                let again = before.get(gid) == Some(decision);
                if !again {
                    seen.insert(gid.clone(), *decision);
                }
                again
            });
        }
        // Every one of them holds its target's locks until it is resolved: after a
        // coordinator died past its decision, a large unit's thousands of prepared
        // transactions, one COMMIT PREPARED (a WAL flush) each, go over every connection
        // the agent may open, not one after the other.
        let finished = finish_on_connections(
            &self.pool,
            self.config.max_connections as usize,
            self.config.max_connections,
            to_finish,
        )
        .await;
        for (gid, decision, r, _) in finished {
            if matches!(r, Ok(Finished::Now)) && decision == Decision::Commit && !is_probe(&gid) {
                let mut committed = self.committed_from_etcd.lock().expect("committed lock");
                if committed.len() >= COMMITTED_KEPT {
                    committed.pop_front();
                }
                committed.push_back(gid.clone());
            }
            match r {
                Ok(Finished::Now) if is_probe(&gid) => {
                    info!(%gid, "rolled back a preflight probe left prepared");
                }
                Ok(Finished::Now) if sweep => {
                    warn!(%gid, decision = decision.as_str(), "resolved a prepared transaction left behind from its decision in etcd");
                    metrics::prepared_resolved(decision.as_str());
                    metrics::prepared_held_add(-1.0);
                }
                Ok(Finished::Now) => {
                    info!(%gid, decision = decision.as_str(), "resolved an in-doubt prepared transaction from its decision in etcd");
                    metrics::prepared_resolved(decision.as_str());
                }
                Ok(Finished::Before) => {}
                Err(message) if sweep => {
                    debug!(%gid, decision = decision.as_str(), %message, "the in-doubt sweep could not resolve a prepared transaction");
                    left.push(gid);
                }
                Err(message) => {
                    warn!(%gid, decision = decision.as_str(), %message, "resolving an in-doubt prepared transaction failed");
                    left.push(gid);
                }
            }
        }
        if sweep {
            return Ok(left);
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
}

/// COMMIT or ROLLBACK PREPARED each (gid, quoted gid, decision) on up to `parallel` pool
/// connections at once (at least one, at most `max_connections`), each connection taken once
/// and finishing its share in turn: a query on the pool would take one per statement, and
/// the pool checks a connection (a round trip) each time it hands one out. Returns each gid
/// with its decision, what happened, and when (microseconds since the epoch).
async fn finish_on_connections(
    pool: &sqlx::PgPool,
    parallel: usize,
    max_connections: u32,
    items: Vec<(String, String, Decision)>,
) -> Vec<(String, Decision, Result<Finished, String>, i64)> {
    if items.is_empty() {
        return Vec::new();
    }
    let parallel = parallel
        .clamp(1, (max_connections as usize).max(1))
        .min(items.len());
    let mut shares: Vec<Vec<(String, String, Decision)>> = vec![Vec::new(); parallel];
    for (i, item) in items.into_iter().enumerate() {
        shares[i % parallel].push(item);
    }
    futures::future::join_all(shares.into_iter().map(|share| async move {
        let mut out = Vec::with_capacity(share.len());
        let mut conn = match pool.acquire().await {
            Ok(c) => c,
            Err(e) => {
                let message = format!("no shard connection: {e}");
                return share
                    .into_iter()
                    .map(|(gid, _, d)| (gid, d, Err(message.clone()), 0))
                    .collect();
            }
        };
        for (gid, lit, decision) in share {
            let r = finish(&mut *conn, &lit, decision)
                .await
                .map_err(|e| e.to_string());
            out.push((gid, decision, r, super::two_phase::now_us()));
        }
        out
    }))
    .await
    .into_iter()
    .flatten()
    .collect()
}
