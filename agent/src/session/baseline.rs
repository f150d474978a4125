//! `fleet baseline` on this shard: for each asked target, which of its migrations another
//! tool's history says it applied (or, with `up_to`, all of those asked), recorded in the
//! journal as applied, each target in one transaction behind the fence. No migration SQL
//! runs and the other tool's table is only read. With `dry_run` nothing is written.
//!
//! And the preflight's question: which targets' journals lack migrations another tool
//! applied there (a plan would run them again).
use std::collections::{BTreeMap, BTreeSet};

use flotilla_core::foreign::{History, Tool};
use flotilla_core::pb;
use sqlx::postgres::PgConnection;
use tracing::{info, instrument, warn};

use crate::Agent;
use crate::shard::foreign::{find_histories, read_history};

/// Where a target's history is looked for: its tenant schema, or for the shard itself the
/// schema its connections resolve first (`public`, usually), as the tools keep it.
async fn schema_of(conn: &mut PgConnection, tenant: &str) -> Result<String, sqlx::Error> {
    if !tenant.is_empty() {
        return Ok(tenant.to_string());
    }
    let s: Option<String> = sqlx::query_scalar("SELECT current_schema()::text")
        .fetch_one(&mut *conn)
        .await?;
    Ok(s.unwrap_or_else(|| "public".into()))
}

/// The tool whose history to read in a schema holding `found`, or why none can be chosen.
fn choose(from: Option<Tool>, found: Option<&BTreeSet<Tool>>) -> Result<Option<Tool>, String> {
    let found = found.cloned().unwrap_or_default();
    match from {
        Some(t) => Ok(found.contains(&t).then_some(t)),
        None if found.len() > 1 => Err(format!(
            "holds the histories of {}: say which with --from",
            found
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(" and ")
        )),
        None => Ok(found.into_iter().next()),
    }
}

impl Agent {
    #[instrument(skip_all, fields(shard = %self.config.shard, request = req.request_id, dry_run = req.dry_run))]
    pub(crate) async fn baseline(&self, req: pb::BaselineRequest) -> pb::BaselineReply {
        let reply = |targets, error: String| pb::BaselineReply {
            request_id: req.request_id,
            targets,
            error,
        };
        let from = match req.from.as_str() {
            "" | "auto" => None,
            other => match Tool::parse(other) {
                Some(t) => Some(t),
                None => return reply(Vec::new(), format!("unknown tool `{other}`")),
            },
        };
        let mut conn = match self.pool.acquire().await {
            Ok(c) => c,
            Err(e) => {
                return reply(
                    Vec::new(),
                    format!("shard {}: {}", self.config.shard, crate::error::Shown(&e)),
                );
            }
        };
        let mut targets = Vec::with_capacity(req.targets.len());
        for t in &req.targets {
            let done = self.baseline_target(&mut conn, &req, from, t).await;
            let done = done.unwrap_or_else(|e| pb::BaselineTarget {
                shard: self.config.shard.clone(),
                tenant: t.tenant.clone(),
                error: format!(
                    "reading or writing the journal: {}",
                    crate::error::Shown(&e)
                ),
                ..Default::default()
            });
            if !done.error.is_empty() {
                warn!(tenant = %t.tenant, error = %done.error, "baseline refused on a target");
            }
            targets.push(done);
        }
        let recorded: usize = targets.iter().map(|t| t.recorded.len()).sum();
        info!(
            targets = targets.len(),
            recorded,
            "baseline {}",
            if req.dry_run { "read" } else { "recorded" }
        );
        reply(targets, String::new())
    }

    /// One target, in one transaction: fence, history, journal, and the rows written.
    async fn baseline_target(
        &self,
        conn: &mut PgConnection,
        req: &pb::BaselineRequest,
        from: Option<Tool>,
        t: &pb::BaselineTargetRequest,
    ) -> Result<pb::BaselineTarget, sqlx::Error> {
        let mut out = pb::BaselineTarget {
            shard: self.config.shard.clone(),
            tenant: t.tenant.clone(),
            ..Default::default()
        };
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        if !req.dry_run {
            // A coordinator deposed since it asked writes nothing (DESIGN: fencing in the shard).
            sqlx::query("SELECT flotilla.check_fence($1)")
                .bind(i64::try_from(req.epoch).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
        }
        let history = if req.up_to {
            None
        } else {
            let schema = schema_of(&mut tx, &t.tenant).await?;
            out.schema = schema.clone();
            let found = find_histories(&mut tx, std::slice::from_ref(&schema)).await?;
            match choose(from, found.get(&schema)) {
                Err(why) => {
                    out.error = format!("schema {schema} {why}");
                    return Ok(out);
                }
                Ok(None) => None,
                Ok(Some(tool)) => {
                    out.tool = tool.as_str().to_string();
                    Some(read_history(&mut tx, &schema, tool).await?)
                }
            }
        };
        if let Some(why) = history.as_ref().and_then(History::refusal) {
            out.error = why;
            return Ok(out);
        }
        let journaled: BTreeSet<String> =
            sqlx::query_scalar("SELECT migration_id FROM flotilla.journal WHERE target = $1")
                .bind(&t.tenant)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
        let mut rows = Vec::new();
        for m in &t.migrations {
            if journaled.contains(&m.id) {
                out.already.push(m.id.clone());
            } else if req.up_to || history.as_ref().is_some_and(|h| h.applied(&m.id)) {
                out.recorded.push(m.id.clone());
                rows.push(m);
            } else {
                out.pending.push(m.id.clone());
            }
        }
        if let Some(h) = &history {
            out.unknown = h.unknown(t.migrations.iter().map(|m| m.id.as_str()));
        }
        if req.dry_run || rows.is_empty() {
            return Ok(out);
        }
        let ids: Vec<&str> = rows.iter().map(|m| m.id.as_str()).collect();
        let checksums: Vec<&str> = rows.iter().map(|m| m.checksum.as_str()).collect();
        // In the order given (the plan's), so `seq` keeps the order they applied in.
        sqlx::query(
            "INSERT INTO flotilla.journal
                 (target, migration_id, checksum, plan_id, epoch, started_at, finished_at)
             SELECT $1, m.id, m.checksum, $2, $3, now(), now()
               FROM unnest($4::text[], $5::text[]) WITH ORDINALITY AS m(id, checksum, n)
              ORDER BY m.n
             ON CONFLICT (target, migration_id) DO NOTHING",
        )
        .bind(&t.tenant)
        .bind(&req.baseline_id)
        .bind(i64::try_from(req.epoch).unwrap_or(i64::MAX))
        .bind(&ids)
        .bind(&checksums)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Targets whose journal lacks some of `migration_ids` that another tool's history
    /// says were applied there (`recorded` names them): a plan would run them again.
    /// Targets whose history cannot be chosen or trusted are not reported here (`fleet
    /// baseline` says why); a shard without such tables costs one catalog read.
    pub(crate) async fn unbaselined(
        &self,
        migration_ids: &[String],
        tenants: &[pb::Tenant],
        applied: &[pb::AppliedStep],
        undoing: &[pb::AppliedStep],
    ) -> Result<Vec<pb::BaselineTarget>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let shard_schema = schema_of(&mut conn, "").await?;
        let mut schemas: Vec<String> = tenants.iter().map(|t| t.name.clone()).collect();
        schemas.push(shard_schema.clone());
        let found = find_histories(&mut conn, &schemas).await?;
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let mut journaled: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        // a row a rollback cut short is Flotilla's own, not a baseline missing
        for a in applied.iter().chain(undoing) {
            journaled
                .entry(a.tenant.as_str())
                .or_default()
                .insert(a.migration_id.as_str());
        }
        let targets = std::iter::once(("", shard_schema.as_str()))
            .chain(tenants.iter().map(|t| (t.name.as_str(), t.name.as_str())));
        let mut out = Vec::new();
        for (tenant, schema) in targets {
            let Ok(Some(tool)) = choose(None, found.get(schema)) else {
                continue;
            };
            let history = read_history(&mut conn, schema, tool).await?;
            if history.refusal().is_some() {
                continue;
            }
            let have = journaled.get(tenant);
            let missing: Vec<String> = migration_ids
                .iter()
                .filter(|id| history.applied(id) && !have.is_some_and(|h| h.contains(id.as_str())))
                .cloned()
                .collect();
            if !missing.is_empty() {
                out.push(pb::BaselineTarget {
                    shard: self.config.shard.clone(),
                    tenant: tenant.to_string(),
                    tool: tool.as_str().to_string(),
                    recorded: missing,
                    schema: schema.to_string(),
                    ..Default::default()
                });
            }
        }
        Ok(out)
    }
}
