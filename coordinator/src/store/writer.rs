//! The store writer: one task applies the engine's writes in order, many to a
//! transaction, off the engine's path.
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tracing::error;

use super::{Audit, StepUpdate, Store, StoreError, StoreOp, now_ms};
use crate::metrics;

/// How long the ops that arrive by the hundred a second during a rollout wait for company.
/// A commit each would make the store the busiest thing on the machine; at 50 ms a
/// transaction held about 50 step updates spread over as many pages of the steps table and
/// of the attempts' index, and SQLite wrote each of those pages to its WAL at every commit.
/// At 200 ms the same rows share pages: the coordinator's CPU per step went down by 9-22%
/// at 8 shards and 2-27% (median 10%) at 64 (scripts/bench-shards.sh, six runs of each
/// build taking turns, 2026-12-05). What the store holds of a running plan's steps lags by
/// that much at most: the leader answers its status from the engine (a follower from the
/// store, that much behind), a leader taking over flushes what its own engine handed over
/// before it reads them, and the shards' journals hold the truth.
const WINDOW: Duration = Duration::from_millis(200);

/// At most this many ops to a transaction.
const MAX_BATCH: usize = 1024;

/// The pause after a batch that failed, doubling up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Attempts of one op alone, once its batch failed on something other than the store being
/// out of reach: an op the store refuses for good must not hold back the ops after it.
const OP_ATTEMPTS: u32 = 3;

/// What the writer is handed: an op, and the leader's epoch it was decided under (None: not
/// a leader's, such as a follower's audit entry of a refused request).
pub type Termed = (Option<u64>, StoreOp);

/// Writes store ops in order, many to a transaction, off the engine's path. A batch that
/// fails is not dropped (it can hold a plan's end, which a cancel or the next leader reads):
/// while the store is out of reach (its server restarting, a failover, a busy or full
/// file) the batch is tried again until it commits, the ops after it waiting in order;
/// after any other failure its ops are tried one by one, so that only one the store
/// refuses is given up, named. Flushes are answered once the ops before them are written
/// or given up. A batch holds the ops of one term (an epoch of `space`): the store refuses
/// them once a later leader has fenced it ([`Store::fence`]), and they are tried again only
/// while this coordinator leads, in that term or a later one of its own (its writes of an
/// earlier term land if nobody else fenced the store meanwhile; `leadership` None: always).
pub async fn run_writer(
    store: Store,
    mut rx: mpsc::UnboundedReceiver<Termed>,
    leadership: Option<tokio::sync::watch::Receiver<crate::coordination::Leadership>>,
    space: String,
) {
    let leading = |term: Option<u64>| {
        leadership.as_ref().is_none_or(|l| {
            let now = l.borrow().epoch();
            now.is_some_and(|now| term.is_none_or(|t| t <= now))
        })
    };
    let mut next = None;
    loop {
        let first = match next.take() {
            Some(first) => first,
            None => match rx.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let (term, batch) = gather(&mut rx, first, &mut next).await;
        let (ops, flushes) = take_flushes(batch);
        let fence = term.map(|t| (space.as_str(), t));
        write_with_retries(&store, fence, ops, &leading).await;
        for done in flushes {
            let _ = done.send(());
        }
    }
}

/// A batch's ops and its flushes (at its top level: ops that go together hold none).
fn take_flushes(batch: Vec<StoreOp>) -> (Vec<StoreOp>, Vec<tokio::sync::oneshot::Sender<()>>) {
    let mut ops = Vec::with_capacity(batch.len());
    let mut flushes = Vec::new();
    for op in batch {
        match op {
            StoreOp::Flush(done) => flushes.push(done),
            other => ops.push(other),
        }
    }
    (ops, flushes)
}

async fn write_with_retries(
    store: &Store,
    fence: Option<(&str, u64)>,
    ops: Vec<StoreOp>,
    leading: &impl Fn(Option<u64>) -> bool,
) {
    let term = fence.map(|(_, t)| t);
    if ops.is_empty() {
        return;
    }
    // Fault tests: `return(MS)` holds each batch back MS milliseconds, as a slow store does,
    // so that a leader can die with writes it has decided not yet stored. The wait is the
    // runtime's, not the failpoint's own `sleep` (a thread's): a blocked worker starved the
    // lease's keep-alive on a 2-core machine and the leader lost its term over and over.
    if ops.iter().any(|op| !matches!(op, StoreOp::Flush(_)))
        && let Some(ms) = slow_store()
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let mut pause = RETRY_FIRST;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let e = match store.apply_under(fence, copies(&ops)).await {
            Ok(()) => return,
            Err(e) => e,
        };
        if matches!(e, StoreError::Fenced { .. }) {
            metrics::store_write_failed("refused");
            error!(plans = %plans_of(&ops), "control store write refused: {e}");
            return;
        }
        if !leading(term) {
            metrics::store_write_failed("given_up");
            error!(plans = %plans_of(&ops), "control store write failed: {e}; not tried again: this coordinator no longer leads");
            return;
        }
        if !store.out_of_reach(&e) {
            metrics::store_write_failed("retried");
            error!(plans = %plans_of(&ops), "control store write failed: {e}; writing its ops one by one");
            break;
        }
        metrics::store_write_failed("retried");
        error!(attempt, plans = %plans_of(&ops), ?pause, "control store out of reach: {e}; trying again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_MAX);
    }
    for op in ops {
        let mut pause = RETRY_FIRST;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let e = match store
                .apply_under(fence, copies(std::slice::from_ref(&op)))
                .await
            {
                Ok(()) => break,
                Err(e) => e,
            };
            if matches!(e, StoreError::Fenced { .. }) {
                metrics::store_write_failed("refused");
                error!(op = %describe(&op), "control store write refused: {e}");
                break;
            }
            if !leading(term) || (!store.out_of_reach(&e) && attempt >= OP_ATTEMPTS) {
                metrics::store_write_failed("given_up");
                error!(op = %describe(&op), "control store write given up after {attempt} attempts: {e}");
                break;
            }
            metrics::store_write_failed("retried");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_MAX);
        }
    }
}

/// The failpoint `coordinator::store_write=return(MS)`: how long each batch is held back.
fn slow_store() -> Option<u64> {
    // A misspelt delay fails loudly: taken for none, a fault test would pass with no slow
    // store at all, proving nothing.
    fail::fail_point!("coordinator::store_write", |ms: Option<String>| {
        let ms = ms.unwrap_or_default();
        Some(ms.trim().parse().unwrap_or_else(|_| {
            panic!("failpoint coordinator::store_write=return(MS): `{ms}` is not a number of milliseconds")
        }))
    });
    None
}

/// Copies of ops (none is a flush) for one attempt: [`Store::apply`] consumes them.
fn copies(ops: &[StoreOp]) -> Vec<StoreOp> {
    ops.iter().map(StoreOp::duplicate).collect()
}

/// The plans a batch's ops write, for its failure's log line.
fn plans_of(ops: &[StoreOp]) -> String {
    let mut plans = std::collections::BTreeSet::new();
    fn walk<'a>(ops: &'a [StoreOp], plans: &mut std::collections::BTreeSet<&'a str>) {
        for op in ops {
            match op {
                StoreOp::InsertPlan { plan, .. } => {
                    plans.insert(plan.id.as_str());
                }
                StoreOp::PlanState { plan_id, .. }
                | StoreOp::Queued { plan_id, .. }
                | StoreOp::PlanSpec { plan_id, .. }
                | StoreOp::Paused { plan_id, .. }
                | StoreOp::Submission { plan_id, .. }
                | StoreOp::Steps { plan_id, .. }
                | StoreOp::Waves { plan_id, .. }
                | StoreOp::DataProgress { plan_id, .. } => {
                    plans.insert(plan_id.as_str());
                }
                StoreOp::Audit(a) => {
                    plans.insert(a.plan_id.as_str());
                }
                StoreOp::Together(inner) => walk(inner, plans),
                StoreOp::Agent { .. }
                | StoreOp::RetireAgent { .. }
                | StoreOp::CatchUpKept { .. }
                | StoreOp::CatchUpTaken { .. }
                | StoreOp::Flush(_) => {}
            }
        }
    }
    walk(ops, &mut plans);
    plans.into_iter().collect::<Vec<_>>().join(", ")
}

/// What an op writes, for the log line of one given up.
fn describe(op: &StoreOp) -> String {
    match op {
        StoreOp::InsertPlan { plan, steps } => {
            format!("plan {}'s row and its {} steps", plan.id, steps.len())
        }
        StoreOp::PlanState { plan_id, state, .. } => format!("plan {plan_id}'s state {state}"),
        StoreOp::PlanSpec { plan_id, .. } => format!("plan {plan_id}'s spec"),
        StoreOp::Queued { plan_id, .. } => format!("when plan {plan_id} was asked to run"),
        StoreOp::Paused { plan_id, .. } => format!("where plan {plan_id} is paused"),
        StoreOp::RetireAgent { shard } => format!("retirement of shard {shard}"),
        StoreOp::CatchUpKept { shard, tenants } => {
            format!(
                "{} new tenants of shard {shard} kept for a catch-up",
                tenants.len()
            )
        }
        StoreOp::CatchUpTaken { tenants } => {
            format!("{} kept tenants taken for a catch-up", tenants.len())
        }
        StoreOp::Submission { plan_id, .. } => format!("plan {plan_id}'s request id"),
        StoreOp::Steps { plan_id, updates } => {
            format!("{} step updates of plan {plan_id}", updates.len())
        }
        StoreOp::Audit(a) => format!("audit entry {} of plan {}", a.action, a.plan_id),
        StoreOp::Agent { shard, .. } => format!("agent row of shard {shard}"),
        StoreOp::Waves { plan_id, .. } => format!("waves of plan {plan_id}"),
        StoreOp::DataProgress { plan_id, .. } => format!("data progress of plan {plan_id}"),
        StoreOp::Together(inner) => format!(
            "ops that go together ({})",
            inner.iter().map(describe).collect::<Vec<_>>().join("; ")
        ),
        StoreOp::Flush(_) => "a flush".into(),
    }
}

/// Whether an op may wait up to [`WINDOW`] for others to share its transaction: step
/// updates (an agent's results, by the hundred a second; a command's, a plan's end) and
/// data changes' progress. Anything else is what an operator's next command may read (a
/// plan submitted or its state changed, its waves, an audit entry, an agent's row) or
/// someone waits on (a flush).
fn waits_for_company(op: &StoreOp) -> bool {
    matches!(op, StoreOp::Steps { .. } | StoreOp::DataProgress { .. })
}

/// The ops of one transaction: `first`, then what arrives within [`WINDOW`] of it while
/// every op so far may wait. An op that may not closes the window: what is queued by then
/// goes with it (ops handed over one after the other mostly belong together), up to a
/// flush, which ends the batch. At most [`MAX_BATCH`] ops, all of `first`'s term: an op of
/// another term is left in `next` for the batch after.
async fn gather(
    rx: &mut mpsc::UnboundedReceiver<Termed>,
    (term, first): Termed,
    next: &mut Option<Termed>,
) -> (Option<u64>, Vec<StoreOp>) {
    // room for a busy window's ops (one per agent's results message) without regrowing
    let mut batch = Vec::with_capacity(256);
    let mut patient = waits_for_company(&first);
    batch.push(first);
    let deadline = tokio::time::Instant::now() + WINDOW;
    while batch.len() < MAX_BATCH && !matches!(batch.last(), Some(StoreOp::Flush(_))) {
        let (op_term, op) = if patient {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(op)) => op,
                Ok(None) | Err(_) => break,
            }
        } else {
            match rx.try_recv() {
                Ok(op) => op,
                Err(_) => break,
            }
        };
        if op_term != term {
            *next = Some((op_term, op));
            break;
        }
        patient &= waits_for_company(&op);
        batch.push(op);
    }
    (term, batch)
}

/// A batch with each [`StoreOp::Together`] opened in place (the batch is one transaction).
fn flatten(ops: Vec<StoreOp>) -> Vec<StoreOp> {
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            StoreOp::Together(inner) => out.extend(flatten(inner)),
            other => out.push(other),
        }
    }
    out
}

impl Store {
    /// Whether a write failed because the store was out of reach for a while, not because
    /// of what it wrote: trying it again later can succeed. PostgreSQL: the connection
    /// (class 08), resources such as a full disk (53), an operator's or a crash's shutdown or
    /// a server starting (57P01-57P03), a serialization failure or deadlock (40001, 40P01),
    /// a standby that is not promoted yet (25006); SQLite: a busy or locked file, an I/O
    /// error, a full disk. Not a statement timeout (57014): that one fails the same again.
    fn out_of_reach(&self, e: &StoreError) -> bool {
        let StoreError::Sql(e) = e else {
            return false;
        };
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => {
                let Some(code) = db.code() else {
                    return false;
                };
                if self.is_pg {
                    ["08", "53"].iter().any(|c| code.starts_with(c))
                        || ["57P01", "57P02", "57P03", "40001", "40P01", "25006"]
                            .contains(&code.as_ref())
                } else {
                    // the primary result code: the low byte of an extended one
                    code.parse::<u32>()
                        .is_ok_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 13 | 14))
                }
            }
            _ => false,
        }
    }

    /// Applies ops in one transaction (answers flushes after it commits), whatever the
    /// fence: for writes that are not a leader's (an operator added from the command line).
    pub async fn apply(&self, ops: Vec<StoreOp>) -> Result<(), StoreError> {
        self.apply_under(None, ops).await
    }

    /// Applies ops in one transaction (answers flushes after it commits); `term`: the
    /// leader's epoch they were decided under and the space it counts in, refused
    /// ([`StoreError::Fenced`], nothing written) when a later leader has taken the store
    /// over ([`Store::fence`]). The fence is read last, after the writes: on SQLite the
    /// transaction holds the file's write lock by then (a read first would make it fail on
    /// a write by another process between).
    pub async fn apply_under(
        &self,
        term: Option<(&str, u64)>,
        ops: Vec<StoreOp>,
    ) -> Result<(), StoreError> {
        let mut flushes = Vec::new();
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        for op in coalesce_steps(flatten(ops)) {
            match op {
                StoreOp::Flush(done) => flushes.push(done),
                StoreOp::Together(_) => unreachable!("opened by flatten"),
                StoreOp::InsertPlan { plan, steps } => {
                    sqlx::query(
                        "INSERT INTO plans (id, name, environment, state, policy, spec_hex, epoch, message,
                            submitted_by, created_at_ms, updated_at_ms, targets, steps)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                    )
                    .bind(&plan.id)
                    .bind(&plan.name)
                    .bind(&plan.environment)
                    .bind(plan.state.as_str())
                    .bind(&plan.policy)
                    .bind(&plan.spec_hex)
                    .bind(plan.epoch)
                    .bind(&plan.message)
                    .bind(&plan.submitted_by)
                    .bind(plan.created_at_ms)
                    .bind(plan.updated_at_ms)
                    .bind(plan.targets)
                    .bind(plan.steps)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                    let now = now_ms();
                    for chunk in steps.chunks(100) {
                        let mut p = Placeholders::new(self.is_pg);
                        let mut sql = String::from(
                            "INSERT INTO steps (plan_id, migration_id, shard, tenant, state, attempts, sqlstate,
                                message, wave, duration_ms, updated_at_ms) VALUES ",
                        );
                        for i in 0..chunk.len() {
                            if i > 0 {
                                sql.push(',');
                            }
                            sql.push_str(&format!(
                                "({}, {}, {}, {}, {}, 0, {}, {}, {}, 0, {})",
                                p.next(),
                                p.next(),
                                p.next(),
                                p.next(),
                                p.next(),
                                p.next(),
                                p.next(),
                                p.next(),
                                p.next(),
                            ));
                        }
                        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                        for s in chunk {
                            q = q
                                .bind(plan.id.clone())
                                .bind(s.migration_id.clone())
                                .bind(s.shard.clone())
                                .bind(s.tenant.clone())
                                .bind(s.state.as_str())
                                .bind(s.sqlstate.clone())
                                .bind(s.message.clone())
                                .bind(s.wave)
                                .bind(now);
                        }
                        q.execute(&mut *tx).await.map_err(StoreError::from)?;
                    }
                }
                StoreOp::Waves { plan_id, waves } => {
                    for w in waves {
                        sqlx::query(
                            "INSERT INTO waves (plan_id, idx, name, state, bake_until_ms, gate)
                             VALUES ($1, $2, $3, $4, $5, $6)
                             ON CONFLICT (plan_id, idx) DO UPDATE SET state = excluded.state,
                                bake_until_ms = excluded.bake_until_ms, gate = excluded.gate",
                        )
                        .bind(&plan_id)
                        .bind(w.idx)
                        .bind(&w.name)
                        .bind(w.state.as_str())
                        .bind(w.bake_until_ms)
                        .bind(&w.gate)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                StoreOp::PlanState {
                    plan_id,
                    state,
                    message,
                    ends,
                } => {
                    sqlx::query(
                        "UPDATE plans SET state = $1, message = $2, updated_at_ms = $3, ends = $4
                         WHERE id = $5",
                    )
                    .bind(state.as_str())
                    .bind(message)
                    .bind(now_ms())
                    .bind(ends.as_str())
                    .bind(plan_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                }
                StoreOp::Steps { plan_id, updates } => {
                    write_steps(&mut tx, self.is_pg, &plan_id, updates).await?;
                }
                StoreOp::Submission {
                    request_id,
                    plan_id,
                } => {
                    sqlx::query(
                        "INSERT INTO submissions (request_id, plan_id, at_ms) VALUES ($1, $2, $3)",
                    )
                    .bind(request_id)
                    .bind(plan_id)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                }
                StoreOp::RetireAgent { shard } => {
                    sqlx::query("DELETE FROM agents WHERE shard = $1")
                        .bind(shard)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from)?;
                }
                StoreOp::CatchUpKept { shard, tenants } => {
                    for t in tenants {
                        sqlx::query(
                            "INSERT INTO catch_up_kept (shard, tenant, tenant_hex, at_ms)
                             VALUES ($1, $2, $3, $4) ON CONFLICT (shard, tenant)
                             DO UPDATE SET tenant_hex = excluded.tenant_hex, at_ms = excluded.at_ms",
                        )
                        .bind(&shard)
                        .bind(&t.name)
                        .bind(hex::encode(prost::Message::encode_to_vec(&t)))
                        .bind(now_ms())
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from)?;
                    }
                }
                StoreOp::CatchUpTaken { tenants } => {
                    for (shard, tenant) in tenants {
                        sqlx::query("DELETE FROM catch_up_kept WHERE shard = $1 AND tenant = $2")
                            .bind(shard)
                            .bind(tenant)
                            .execute(&mut *tx)
                            .await
                            .map_err(StoreError::from)?;
                    }
                }
                StoreOp::Queued { plan_id, at_ms } => {
                    sqlx::query(
                        "INSERT INTO plan_queue (plan_id, queued_at_ms) VALUES ($1, $2)
                         ON CONFLICT (plan_id) DO UPDATE SET queued_at_ms = excluded.queued_at_ms",
                    )
                    .bind(plan_id)
                    .bind(at_ms)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                }
                StoreOp::Paused { plan_id, paused } => {
                    sqlx::query("UPDATE plans SET paused = $1 WHERE id = $2")
                        .bind(paused)
                        .bind(plan_id)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from)?;
                }
                StoreOp::PlanSpec { plan_id, spec_hex } => {
                    sqlx::query("UPDATE plans SET spec_hex = $1, updated_at_ms = $2 WHERE id = $3")
                        .bind(spec_hex)
                        .bind(now_ms())
                        .bind(plan_id)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from)?;
                }
                StoreOp::Audit(Audit {
                    actor,
                    action,
                    plan_id,
                    detail,
                }) => {
                    sqlx::query(
                        "INSERT INTO audit (id, at_ms, actor, action, plan_id, detail)
                         VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(uuid::Uuid::now_v7().to_string())
                    .bind(now_ms())
                    .bind(actor)
                    .bind(action)
                    .bind(plan_id)
                    .bind(detail)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                }
                StoreOp::DataProgress { plan_id, entries } => {
                    // the plan's progress as it ended: what it no longer has goes
                    sqlx::query("DELETE FROM data_progress WHERE plan_id = $1")
                        .bind(&plan_id)
                        .execute(&mut *tx)
                        .await?;
                    for p in entries {
                        sqlx::query(
                            "INSERT INTO data_progress (plan_id, migration_id, shard, tenant, progress_hex)
                             VALUES ($1, $2, $3, $4, $5)
                             ON CONFLICT (plan_id, migration_id, shard, tenant)
                             DO UPDATE SET progress_hex = excluded.progress_hex",
                        )
                        .bind(&plan_id)
                        .bind(&p.migration_id)
                        .bind(&p.shard)
                        .bind(&p.tenant)
                        .bind(hex::encode(p.encode_to_vec()))
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from)?;
                    }
                }
                StoreOp::Agent {
                    shard,
                    labels,
                    tenants,
                    version,
                    seen_ms,
                } => {
                    sqlx::query(
                        "INSERT INTO agents (shard, labels, tenants, version, last_seen_ms)
                         VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (shard) DO UPDATE SET labels = excluded.labels,
                            tenants = excluded.tenants, version = excluded.version,
                            last_seen_ms = excluded.last_seen_ms",
                    )
                    .bind(shard)
                    .bind(labels)
                    .bind(tenants)
                    .bind(version)
                    .bind(if seen_ms > 0 { seen_ms } else { now_ms() })
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                }
            }
        }
        if let Some((space, term)) = term {
            let lock = if self.is_pg { " FOR SHARE" } else { "" };
            let fenced = super::read_fence(&mut tx, lock).await?;
            if !fenced.admits(space, term) {
                return Err(StoreError::Fenced { fenced, term });
            }
        }
        tx.commit().await.map_err(StoreError::from)?;
        for done in flushes {
            let _ = done.send(());
        }
        Ok(())
    }
}

/// The step updates of a batch, one op per plan: during a rollout a batch holds one op per
/// agent's results message (a few runs each), and each op cost its own statements, every one a
/// round trip to the SQLite connection's thread. In order: a plan's updates are written
/// where its first op was, each op's updates after the previous op's (the last update of a
/// step wins, its attempts add up). Only an `InsertPlan` writes the same rows, so one ends
/// the gathering: what came before it is written before it. Everything else touches other
/// tables, and the batch commits as one transaction.
fn coalesce_steps(ops: Vec<StoreOp>) -> Vec<StoreOp> {
    let mut out: Vec<StoreOp> = Vec::with_capacity(ops.len());
    // the plans whose updates are being gathered, and where in `out` their op is
    let mut open: std::collections::HashMap<String, usize> = Default::default();
    for op in ops {
        match op {
            StoreOp::Steps { plan_id, updates } => match open.get(&plan_id) {
                Some(&at) => {
                    if let StoreOp::Steps { updates: into, .. } = &mut out[at] {
                        into.extend(updates);
                    }
                }
                None => {
                    open.insert(plan_id.clone(), out.len());
                    out.push(StoreOp::Steps { plan_id, updates });
                }
            },
            StoreOp::InsertPlan { .. } => {
                open.clear();
                out.push(op);
            }
            other => out.push(other),
        }
    }
    out
}

/// The parameters of a many-row statement, in the order they are bound: numbered on
/// PostgreSQL (`$1`, `$2`, ...), anonymous on SQLite (`?`). sqlx binds a numbered SQLite
/// parameter by looking its name up, and SQLite's lookup walks the statement's list of
/// names, so binding a statement of n numbered parameters took time in n²: with 800 a
/// statement, that lookup was a quarter of the coordinator's CPU while it stored a
/// 30,000-step plan (perf, 10,000 tenants), and it ran again for every batch of step updates.
struct Placeholders {
    numbered: bool,
    bound: usize,
}

impl Placeholders {
    fn new(numbered: bool) -> Self {
        Placeholders { numbered, bound: 0 }
    }

    fn next(&mut self) -> String {
        self.bound += 1;
        if self.numbered {
            format!("${}", self.bound)
        } else {
            "?".to_string()
        }
    }
}

/// `(p, ..., p), (...)` for `rows` rows of `cols` parameters.
fn values_list(rows: usize, cols: usize, numbered: bool) -> String {
    let mut p = Placeholders::new(numbered);
    let mut sql = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..cols {
            if c > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&p.next());
        }
        sql.push(')');
    }
    sql
}

/// Splits rows into statements of 64 rows, then of powers of two: each row count is its
/// own statement text, and a connection keeps 100 prepared statements, so a chunk of any
/// length (1 to 64 rows, steps and attempts) took two texts of a hundred-odd and SQLite
/// prepared them again and again (3% of the coordinator's CPU at 64 shards); these are
/// seven of each.
fn cached_chunks<T>(rows: &[T]) -> impl Iterator<Item = &[T]> {
    const MAX: usize = 64;
    let mut rest = rows;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = if rest.len() >= MAX {
            MAX
        } else {
            1 << rest.len().ilog2()
        };
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

/// Step updates and their attempts, many rows per statement: a rollout of
/// 1,000 tenants reports thousands of steps, and a statement per row would make
/// the store, not the shards, the slow part.
async fn write_steps(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    numbered: bool,
    plan_id: &str,
    updates: Vec<StepUpdate>,
) -> Result<(), StoreError> {
    let now = now_ms();
    // One row per step in a statement (an upsert may not touch a row twice):
    // the last update wins, attempts add up.
    let mut merged: Vec<(StepUpdate, i64)> = Vec::with_capacity(updates.len());
    let mut at: std::collections::HashMap<(String, String, String), usize> = Default::default();
    for u in &updates {
        let tries = i64::from(u.run_id.is_some());
        let key = (u.migration_id.clone(), u.shard.clone(), u.tenant.clone());
        match at.get(&key) {
            Some(&i) => {
                let n = merged[i].1 + tries;
                merged[i] = (u.clone(), n);
            }
            None => {
                at.insert(key, merged.len());
                merged.push((u.clone(), tries));
            }
        }
    }
    for chunk in cached_chunks(&merged) {
        let sql = format!(
            "INSERT INTO steps (plan_id, migration_id, shard, tenant, state, attempts, sqlstate, message,
                duration_ms, updated_at_ms, phase, detail) VALUES {}
             ON CONFLICT (plan_id, migration_id, shard, tenant) DO UPDATE SET
                state = excluded.state, attempts = steps.attempts + excluded.attempts,
                sqlstate = excluded.sqlstate, message = excluded.message,
                duration_ms = excluded.duration_ms, updated_at_ms = excluded.updated_at_ms,
                phase = excluded.phase, detail = excluded.detail",
            values_list(chunk.len(), 12, numbered)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (u, tries) in chunk {
            q = q
                .bind(plan_id.to_string())
                .bind(u.migration_id.clone())
                .bind(u.shard.clone())
                .bind(u.tenant.clone())
                .bind(u.state.as_str())
                .bind(*tries)
                .bind(u.sqlstate.clone())
                .bind(u.message.clone())
                .bind(u.duration_ms)
                .bind(now)
                .bind(u.phase.clone())
                .bind(u.detail.clone());
        }
        q.execute(&mut **tx).await.map_err(StoreError::from)?;
    }
    let attempts: Vec<&StepUpdate> = updates.iter().filter(|u| u.run_id.is_some()).collect();
    for chunk in cached_chunks(&attempts) {
        let sql = format!(
            "INSERT INTO attempts (plan_id, migration_id, shard, tenant, run_id, outcome, sqlstate,
                message, duration_ms, at_ms) VALUES {}",
            values_list(chunk.len(), 10, numbered)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for u in chunk {
            q = q
                .bind(plan_id.to_string())
                .bind(u.migration_id.clone())
                .bind(u.shard.clone())
                .bind(u.tenant.clone())
                .bind(u.run_id.unwrap_or_default())
                .bind(u.state.as_str())
                .bind(u.sqlstate.clone())
                .bind(u.message.clone())
                .bind(u.duration_ms)
                .bind(now);
        }
        q.execute(&mut **tx).await.map_err(StoreError::from)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StepUpdate;
    use crate::store::tests::plan_row;
    use flotilla_core::state::{PlanState, StepState};

    fn update(tenant: &str) -> StepUpdate {
        StepUpdate {
            migration_id: "m".into(),
            shard: "s0".into(),
            tenant: tenant.into(),
            state: StepState::Applied,
            sqlstate: String::new(),
            message: String::new(),
            phase: String::new(),
            detail: String::new(),
            duration_ms: 1,
            run_id: Some(1),
        }
    }

    fn steps(plan: &str, tenants: &[&str]) -> StoreOp {
        StoreOp::Steps {
            plan_id: plan.into(),
            updates: tenants.iter().map(|t| update(t)).collect(),
        }
    }

    /// What each op of a coalesced batch is: a plan's step updates in order, other ops as
    /// they were.
    fn shape(ops: &[StoreOp]) -> Vec<String> {
        ops.iter()
            .map(|op| match op {
                StoreOp::Steps { plan_id, updates } => format!(
                    "steps {plan_id}: {}",
                    updates
                        .iter()
                        .map(|u| u.tenant.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                StoreOp::InsertPlan { plan, .. } => format!("insert {}", plan.id),
                StoreOp::PlanState { plan_id, .. } => format!("state {plan_id}"),
                _ => "other".into(),
            })
            .collect()
    }

    #[test]
    fn rows_go_in_chunks_of_a_few_sizes() {
        let sizes = |n: usize| {
            cached_chunks(&vec![0u8; n])
                .map(<[u8]>::len)
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(0), Vec::<usize>::new());
        assert_eq!(sizes(1), [1]);
        assert_eq!(sizes(7), [4, 2, 1]);
        assert_eq!(sizes(64), [64]);
        assert_eq!(sizes(200), [64, 64, 64, 8]);
        let mut seen = std::collections::BTreeSet::new();
        for n in 0..=300 {
            let got = sizes(n);
            assert_eq!(got.iter().sum::<usize>(), n);
            seen.extend(got);
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            [1, 2, 4, 8, 16, 32, 64]
        );
    }

    fn audit() -> StoreOp {
        StoreOp::Audit(Audit {
            actor: "op".into(),
            action: "pause",
            plan_id: "p1".into(),
            detail: String::new(),
        })
    }

    /// On the paused clock: step updates wait up to the window for company; an op an
    /// operator may read next closes it, taking what is queued by then; a flush ends the
    /// batch.
    #[tokio::test(start_paused = true)]
    async fn step_updates_wait_for_company_and_an_audit_entry_does_not() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let start = tokio::time::Instant::now();
        let next = async |rx: &mut mpsc::UnboundedReceiver<Termed>| {
            let first = rx.recv().await.unwrap();
            let (_, batch) = gather(rx, first, &mut None).await;
            shape(&batch)
        };
        let send = |op: StoreOp| tx.send((None, op)).unwrap();

        // alone, with the sender still there: the window runs out
        send(steps("p1", &["t1"]));
        assert_eq!(next(&mut rx).await, ["steps p1: t1"]);
        assert_eq!(start.elapsed(), WINDOW);

        // an audit entry closes the window: what is queued goes with it, nothing waits
        for op in [steps("p1", &["t2"]), audit(), steps("p1", &["t3"])] {
            send(op);
        }
        assert_eq!(
            next(&mut rx).await,
            ["steps p1: t2", "other", "steps p1: t3"]
        );
        assert_eq!(start.elapsed(), WINDOW, "the audit entry waited");

        // a flush ends the batch
        let (done, _) = tokio::sync::oneshot::channel();
        for op in [audit(), StoreOp::Flush(done), steps("p1", &["t4"])] {
            send(op);
        }
        assert_eq!(next(&mut rx).await, ["other", "other"]);
        assert_eq!(start.elapsed(), WINDOW);
        assert_eq!(next(&mut rx).await, ["steps p1: t4"]);
        assert_eq!(start.elapsed(), WINDOW * 2);

        // an agent's row and ops that go together go at once
        let agent = StoreOp::Agent {
            shard: "s0".into(),
            labels: "{}".into(),
            tenants: "[]".into(),
            version: "v".into(),
            seen_ms: 0,
        };
        send(agent);
        assert_eq!(next(&mut rx).await, ["other"]);
        send(StoreOp::Together(vec![steps("p2", &["t1"]), audit()]));
        assert_eq!(next(&mut rx).await, ["other"]);
        assert_eq!(start.elapsed(), WINDOW * 2);

        // the sender gone: what was sent goes at once
        send(steps("p1", &["t5"]));
        drop(tx);
        assert_eq!(next(&mut rx).await, ["steps p1: t5"]);
        assert_eq!(start.elapsed(), WINDOW * 2);
    }

    /// A batch holds one term's ops: an op of another term ends it, at once, and begins the
    /// next (the store checks each batch against the fence under its term).
    #[tokio::test(start_paused = true)]
    async fn an_op_of_another_term_begins_the_next_batch() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let start = tokio::time::Instant::now();
        tx.send((Some(3), steps("p1", &["t1"]))).unwrap();
        tx.send((Some(3), steps("p1", &["t2"]))).unwrap();
        tx.send((Some(5), steps("p1", &["t3"]))).unwrap();
        tx.send((None, audit())).unwrap();
        let mut next = None;
        let first = rx.recv().await.unwrap();
        let (term, batch) = gather(&mut rx, first, &mut next).await;
        assert_eq!(
            (term, shape(&batch)),
            (
                Some(3),
                vec!["steps p1: t1".to_string(), "steps p1: t2".to_string()]
            )
        );
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "the other term's op waited"
        );
        let first = next
            .take()
            .expect("the other term's op is kept for the next batch");
        let (term, batch) = gather(&mut rx, first, &mut next).await;
        assert_eq!(
            (term, shape(&batch)),
            (Some(5), vec!["steps p1: t3".to_string()])
        );
        let first = next
            .take()
            .expect("the unfenced op is kept for the next batch");
        let (term, batch) = gather(&mut rx, first, &mut next).await;
        assert_eq!((term, shape(&batch)), (None, vec!["other".to_string()]));
        assert!(next.is_none());
    }

    #[test]
    fn ops_that_go_together_are_opened_in_place() {
        let batch = vec![
            steps("p1", &["t1"]),
            StoreOp::Together(vec![
                steps("p1", &["t2"]),
                StoreOp::Together(vec![steps("p2", &["t3"])]),
                audit(),
            ]),
            steps("p1", &["t4"]),
        ];
        assert_eq!(
            shape(&coalesce_steps(flatten(batch))),
            ["steps p1: t1,t2,t4", "steps p2: t3", "other"]
        );
    }

    #[test]
    fn a_batch_writes_each_plans_step_updates_as_one_op_in_order() {
        let insert = StoreOp::InsertPlan {
            plan: plan_row("p3", 0, 0),
            steps: Vec::new(),
        };
        let state = StoreOp::PlanState {
            plan_id: "p1".into(),
            state: PlanState::Running,
            message: String::new(),
            ends: PlanState::Running,
        };
        let batch = vec![
            steps("p1", &["t1", "t2"]),
            state,
            steps("p2", &["t9"]),
            steps("p1", &["t1", "t3"]),
            insert,
            steps("p1", &["t4"]),
            steps("p3", &["t5"]),
            steps("p1", &["t6"]),
        ];
        assert_eq!(
            shape(&coalesce_steps(batch)),
            [
                "steps p1: t1,t2,t1,t3",
                "state p1",
                "steps p2: t9",
                "insert p3",
                "steps p1: t4,t6",
                "steps p3: t5",
            ]
        );
    }
}
