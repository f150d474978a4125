//! A wave's SQL gate on this shard: the coordinator's query, run on each of the asked
//! targets in its own read-only transaction with the tenant's search_path, the value read
//! back as text. Nothing it runs can change the shard.
use std::time::Duration;

use flotilla_core::pb;
use sqlx::AssertSqlSafe;
use tracing::{info, instrument};

use crate::Agent;
use crate::shard::{begin_read_only, read_error};

/// How long one target's check may take when the coordinator does not say.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl Agent {
    #[instrument(skip_all, fields(shard = %self.config.shard, plan = %req.plan_id, request = req.request_id))]
    pub(crate) async fn check(&self, req: pb::CheckRequest) -> pb::CheckReply {
        let timeout = if req.timeout_ms == 0 {
            DEFAULT_TIMEOUT
        } else {
            Duration::from_millis(req.timeout_ms)
        };
        let mut results = Vec::with_capacity(req.tenants.len());
        for tenant in &req.tenants {
            let (value, error) = match self.check_one(&req.sql, tenant, timeout).await {
                Ok(v) => (v.unwrap_or_default(), String::new()),
                Err(e) => (String::new(), e),
            };
            results.push(pb::CheckResult {
                tenant: tenant.clone(),
                value,
                error,
            });
        }
        info!(targets = results.len(), "gate checked");
        pb::CheckReply {
            request_id: req.request_id,
            results,
            error: String::new(),
        }
    }

    /// The query's one value on one target, as text (None: NULL), or why it failed.
    async fn check_one(
        &self,
        sql: &str,
        tenant: &str,
        timeout: Duration,
    ) -> Result<Option<String>, String> {
        let mut tx = begin_read_only(&self.pool, tenant, timeout, None).await?;
        // The plan's own query (an operator's, like a migration's), as a scalar subquery so
        // that any value type reads back as text.
        let wrapped = format!("SELECT (\n{sql}\n)::text");
        let value: Option<String> = sqlx::query_scalar(AssertSqlSafe(wrapped))
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| read_error(&e))?;
        // read-only: nothing to keep
        let _ = tx.rollback().await;
        Ok(value)
    }
}
