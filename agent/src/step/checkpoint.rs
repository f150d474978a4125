//! A step's checkpoint on a target (`flotilla.checkpoints`): how far a step that commits part
//! by part got before it stopped, failed or its agent died. A data change's batches move it
//! (see `data`); a non-transactional step's up statements do too, one by one (see
//! `run::statements`), so that running the step again goes on after the last statement done
//! instead of running it twice, and a rollback finds and undoes a step left part-way.
use sqlx::postgres::PgConnection;

use super::{PreparedMigration, StepContext};
use crate::error::{Failure, classify};

/// Where a step stands on a target, as its checkpoint says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Checkpoint {
    /// How many of the step's up statements are done.
    pub statements: usize,
    /// The last key of the last batch done; None before the first batch.
    pub last_key: Option<String>,
    pub rows: i64,
    pub batches: i64,
    /// Seconds since it was written, by the shard's clock.
    pub age_secs: f64,
}

impl Checkpoint {
    /// How many of the step's up statements are done: all of them once a batch is.
    pub fn statements_done(&self, m: &PreparedMigration) -> usize {
        if self.last_key.is_some() {
            m.up.len()
        } else {
            self.statements.min(m.up.len())
        }
    }
}

/// The step's checkpoint on the target, if it ran there part-way before; refused when
/// another version of the migration wrote it (its statements and batches are not this
/// version's). `phase`: the step error's phase ("up", or "batch" for a data change).
pub(crate) async fn read(
    conn: &mut PgConnection,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    phase: &str,
) -> Result<Option<Checkpoint>, Failure> {
    type Row = (String, Option<String>, i64, i64, i32, bool, f64, String);
    let row: Option<Row> = sqlx::query_as(
        "SELECT checksum, last_key, rows, batches, statements, undoing, \
         extract(epoch FROM pg_catalog.clock_timestamp() - updated_at)::float8, plan_id \
         FROM flotilla.checkpoints WHERE target = $1 AND migration_id = $2",
    )
    .bind(cx.tenant)
    .bind(m.id())
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| classify(&e, phase))?;
    match row {
        // first: a rollback cut short, whatever version wrote the checkpoint (a plan with an
        // edited migration is no reason to clear the mark, and clearing it would pass the
        // journal row off as applied again)
        Some((.., true, _, plan_id)) => Err(Failure::agent(
            phase,
            format!(
                "migration `{}`: a rollback of it on this target was cut short (its checkpoint \
                 is marked undoing), so what is done is unknown; roll back plan {plan_id} again \
                 to finish undoing it, then run it again",
                m.id()
            ),
        )),
        Some((checksum, ..)) if checksum != m.migration.checksum => Err(Failure::agent(
            phase,
            format!(
                "migration `{}`: its checkpoint on this target was written by another version \
                 of it (checksum {checksum}); undo the partial change, delete the row from \
                 flotilla.checkpoints (and that change's rows from flotilla.prior_images, if \
                 it saved any), then run it again",
                m.id()
            ),
        )),
        Some((_, last_key, rows, batches, statements, false, age_secs, _)) => {
            Ok(Some(Checkpoint {
                statements: usize::try_from(statements).unwrap_or(0),
                last_key,
                rows,
                batches,
                age_secs,
            }))
        }
        None => Ok(None),
    }
}

/// How many of the step's down statements a rollback cut short did before (0 when none),
/// read after the undo's prologue marked the checkpoint undoing. Refused when they were
/// another version's down statements: which of this version's are done is unknown.
pub(crate) async fn undone(
    conn: &mut PgConnection,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
) -> Result<usize, Failure> {
    let row: Option<(String, i32, String)> = sqlx::query_as(
        "SELECT checksum, undone, plan_id FROM flotilla.checkpoints \
         WHERE target = $1 AND migration_id = $2",
    )
    .bind(cx.tenant)
    .bind(m.id())
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| classify(&e, "down"))?;
    match row {
        None | Some((_, 0, _)) => Ok(0),
        Some((checksum, undone, plan_id)) if checksum != m.migration.checksum => {
            Err(Failure::agent(
                "down",
                format!(
                    "migration `{}`: a rollback of another version of it (checksum {checksum}, \
                     plan {plan_id}) was cut short on this target after {undone} of its down \
                     statements, so which of this version's are done is unknown; roll back \
                     with a plan that has that version (it goes on from there), or bring the \
                     target by hand to where this version's first K down statements leave it, \
                     set the row's checksum to {} and undone to K in flotilla.checkpoints, and \
                     roll back again (deleting the row would pass the step off as applied)",
                    m.id(),
                    m.migration.checksum
                ),
            ))
        }
        Some((_, undone, _)) => Ok(usize::try_from(undone).unwrap_or(0).min(m.down.len())),
    }
}
