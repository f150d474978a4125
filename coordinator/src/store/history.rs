//! What the control store remembers of past runs, for the dry run's estimate: applied steps'
//! durations and finished data changes' rates.
use flotilla_core::pb;
use prost::Message;
use sqlx::Row;

use super::{Store, StoreError};

/// One applied step's recorded duration.
#[derive(Debug, Clone)]
pub struct StepDuration {
    pub plan_id: String,
    pub migration_id: String,
    pub duration_ms: i64,
}

impl Store {
    /// The most recent applied steps' durations, newest first.
    pub async fn step_durations(&self, limit: i64) -> Result<Vec<StepDuration>, StoreError> {
        let rows = sqlx::query(
            "SELECT plan_id, migration_id, duration_ms FROM steps WHERE state = 'applied'
             ORDER BY updated_at_ms DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| StepDuration {
                plan_id: r.get(0),
                migration_id: r.get(1),
                duration_ms: r.get(2),
            })
            .collect())
    }

    /// Finished data changes' last progress (their rate over the last batches), any plan.
    pub async fn data_rates(&self, limit: i64) -> Result<Vec<pb::DataProgress>, StoreError> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT progress_hex FROM data_progress LIMIT $1")
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(h,)| hex::decode(h).ok())
            .filter_map(|b| pb::DataProgress::decode(b.as_slice()).ok())
            .collect())
    }
}
