//! What tests read from, and do to, the shard databases behind Flotilla's back: fence
//! epochs, Flotilla's prepared transactions, and advisory locks that hold a migration
//! mid-way. Every fleet keeps its shards `shard_0`, `shard_1`, ... in one PostgreSQL cluster.
use sqlx::Postgres;
use sqlx::pool::PoolConnection;

use crate::fleet::MigrationDir;
use crate::harness::PgCluster;

/// The database of shard `s`.
pub fn shard(s: usize) -> String {
    format!("shard_{s}")
}

/// Flotilla's prepared transactions of the shard's own database (every shard lives in one
/// PostgreSQL cluster, and pg_prepared_xacts lists the whole cluster's).
const FLOTILLA_PREPARED: &str = "SELECT gid FROM pg_prepared_xacts \
     WHERE gid LIKE 'flotilla:%' AND database = current_database() ORDER BY 1";

pub async fn prepared_gids(pg: &PgCluster, s: usize) -> anyhow::Result<Vec<String>> {
    Ok(pg
        .query_rows(&shard(s), FLOTILLA_PREPARED)
        .await?
        .into_iter()
        .map(|mut r| r.remove(0))
        .collect())
}

/// How many prepared transactions of Flotilla's shard `s` holds.
pub async fn prepared(pg: &PgCluster, s: usize) -> anyhow::Result<usize> {
    Ok(prepared_gids(pg, s).await?.len())
}

/// Each shard's fence epoch: read before a fault and after it, it never goes back.
pub async fn fences(pg: &PgCluster, shards: usize) -> anyhow::Result<Vec<i64>> {
    let mut out = Vec::new();
    for s in 0..shards {
        out.push(
            pg.query_scalar(&shard(s), "SELECT epoch FROM flotilla.fence")
                .await?,
        );
    }
    Ok(out)
}

/// No shard's fence epoch went back from `before` (read with [`fences`]).
pub async fn assert_fences_not_back(pg: &PgCluster, before: &[i64]) -> anyhow::Result<()> {
    let after = fences(pg, before.len()).await?;
    for (s, (b, a)) in before.iter().zip(&after).enumerate() {
        assert!(a >= b, "shard_{s}: the fence went back from {b} to {a}");
    }
    Ok(())
}

/// Holds advisory lock `key` on a session of the shard's database: a migration calling
/// `pg_advisory_xact_lock(key)` there (see [`blocking_sql`]) blocks until [`release`].
pub async fn hold(pg: &PgCluster, s: usize, key: i64) -> anyhow::Result<PoolConnection<Postgres>> {
    let pool = pg.pool(&shard(s)).await?;
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(key)
        .execute(&mut *conn)
        .await?;
    Ok(conn)
}

pub async fn release(mut conn: PoolConnection<Postgres>, key: i64) -> anyhow::Result<()> {
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Sessions of the shard's database waiting for an advisory lock.
pub async fn blocked(pg: &PgCluster, s: usize) -> anyhow::Result<i64> {
    pg.query_scalar(
        &shard(s),
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .await
}

/// A migration that blocks on advisory lock `key` in `tenant` only.
pub fn blocking_sql(up: &str, tenant: &str, key: i64) -> String {
    format!(
        "{up};
         SELECT CASE WHEN current_schema() = '{tenant}' THEN pg_advisory_xact_lock({key}) END"
    )
}

/// Writes migration `001_log` into `d`: every tenant logs that it ran in `applied_log`, in
/// the migration's own transaction (a step applied twice leaves two rows), and `tenant`
/// first waits on advisory lock `key` (see [`hold`]).
pub fn logged_blocking_migration(d: &MigrationDir, tenant: &str, key: i64) -> anyhow::Result<()> {
    d.migration(
        "001_log",
        "",
        &format!(
            "{};
         INSERT INTO applied_log VALUES ('001')",
            blocking_sql("CREATE TABLE applied_log (step text)", tenant, key)
        ),
        "DROP TABLE applied_log",
    )
}

/// Each of `steps` ran exactly once in `tenant` of shard database `db`, by the log that
/// [`logged_blocking_migration`] (and the migrations after it) keep in `applied_log`.
pub async fn assert_logged_once(
    pg: &PgCluster,
    db: &str,
    tenant: &str,
    steps: &[&str],
) -> anyhow::Result<()> {
    let rows = pg
        .query_rows(
            db,
            &format!("SELECT step, count(*) FROM {tenant}.applied_log GROUP BY step ORDER BY step"),
        )
        .await?;
    let once: Vec<Vec<String>> = steps
        .iter()
        .map(|step| vec![step.to_string(), "1".into()])
        .collect();
    assert_eq!(rows, once, "{db}/{tenant}");
    Ok(())
}

/// Database `db` of `pg` refuses every connection (`ALLOW_CONNECTIONS false`), its sessions
/// ended: a database out of reach of whoever uses it, the server up; `false` lets them in.
pub async fn cut_off(pg: &PgCluster, db: &str, cut: bool) -> anyhow::Result<()> {
    let sql = if cut {
        format!(
            "ALTER DATABASE {db} ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"
        )
    } else {
        format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true")
    };
    pg.psql("postgres", &sql).await?;
    Ok(())
}
