//! The dry run on this shard (`plan explain`): for each asked target, the relations a plan's
//! statements name, resolved in the target's search_path as a step resolves them (the
//! tenant's schema, or the shard's own search_path), read in a READ ONLY transaction with
//! short timeouts: whether each exists, its total size and the planner's row estimate.
//! Nothing is written; a lock the size read needs is given up after `LOCK_TIMEOUT` rather
//! than queued behind a running migration's DDL.
use std::time::Duration;

use flotilla_core::pb;
use tracing::{info, instrument};

use crate::Agent;
use crate::shard::{begin_read_only, read_error};
use crate::step::quote_ident;

/// How long one target's reads may take when the coordinator does not say.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// pg_total_relation_size takes ACCESS SHARE on the relation: a dry run must not wait in a
/// lock queue (where it would hold up the traffic queued behind it) for long.
const LOCK_TIMEOUT: Duration = Duration::from_secs(1);

/// Existence, size and row estimate of every asked relation, in one statement.
/// `to_regclass` resolves a name as the session's search_path does and never errors on a
/// missing relation; reltuples is -1 for a table never analyzed (PostgreSQL 14+).
const PROBE: &str = "SELECT r.name, c.oid IS NOT NULL, \
       COALESCE(pg_total_relation_size(c.oid), 0)::bigint, \
       COALESCE(c.reltuples, -1)::bigint \
     FROM unnest($1::text[]) WITH ORDINALITY AS r(name, ord) \
     LEFT JOIN pg_class c ON c.oid = to_regclass(r.name) \
     ORDER BY r.ord";

impl Agent {
    #[instrument(skip_all, fields(shard = %self.config.shard, request = req.request_id))]
    pub(crate) async fn explain(&self, req: pb::ExplainRequest) -> pb::ExplainReply {
        let timeout = if req.timeout_ms == 0 {
            DEFAULT_TIMEOUT
        } else {
            Duration::from_millis(req.timeout_ms)
        };
        let mut relations = Vec::with_capacity(req.tenants.len() * req.relations.len());
        for tenant in &req.tenants {
            match self.probe_target(&req.relations, tenant, timeout).await {
                Ok(found) => relations.extend(found),
                Err(error) => relations.extend(req.relations.iter().map(|r| pb::RelationProbe {
                    tenant: tenant.clone(),
                    relation: r.clone(),
                    error: error.clone(),
                    ..Default::default()
                })),
            }
        }
        info!(
            targets = req.tenants.len(),
            relations = req.relations.len(),
            "dry run read"
        );
        pb::ExplainReply {
            request_id: req.request_id,
            relations,
            error: String::new(),
        }
    }

    /// The relations on one target, or why they could not be read there.
    async fn probe_target(
        &self,
        relations: &[String],
        tenant: &str,
        timeout: Duration,
    ) -> Result<Vec<pb::RelationProbe>, String> {
        if relations.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = begin_read_only(&self.pool, tenant, timeout, Some(LOCK_TIMEOUT)).await?;
        let rows: Vec<(String, bool, i64, i64)> = sqlx::query_as(PROBE)
            .bind(
                relations
                    .iter()
                    .map(|r| regclass_name(r))
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| read_error(&e))?;
        // read-only: nothing to keep
        let _ = tx.rollback().await;
        Ok(rows
            .into_iter()
            .zip(relations)
            .map(|((_, exists, bytes, rows), relation)| pb::RelationProbe {
                tenant: tenant.to_string(),
                relation: relation.clone(),
                exists,
                bytes,
                rows,
                error: String::new(),
            })
            .collect())
    }
}

/// A relation as the parser names it (`t`, `schema.t`, each part already folded as
/// PostgreSQL folds it), quoted part by part so that `to_regclass` folds nothing again.
fn regclass_name(relation: &str) -> String {
    relation
        .split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::regclass_name;

    #[test]
    fn names_are_quoted_part_by_part() {
        assert_eq!(regclass_name("work_orders"), "\"work_orders\"");
        assert_eq!(regclass_name("app.Orders"), "\"app\".\"Orders\"");
    }
}
