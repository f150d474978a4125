//! Schema fingerprints: each target's shape (tables, columns, indexes, constraints, views,
//! functions, triggers, sequences) read from the catalog, as sorted one-line items and a
//! digest of them, for the coordinator's drift view (`fleet drift`).
//!
//! One query reads every target of the shard at once (2,500 tenant schemas in well under a
//! second; see `scripts/bench-fingerprint.sh`). Catalog text, not `pg_dump`: the `pg_get_*`
//! functions print definitions the same way on every shard of one PostgreSQL version.
//! Inside a tenant the schema's own name is stripped (`ON tenant_0042.work_orders` reads
//! `ON work_orders`), so two tenants of one shape share a fingerprint; the shard's own
//! target ("" = every schema that is neither a tenant, the catalog nor flotilla) keeps the
//! schema names, since its schemas are told apart by them. Objects of extensions are left
//! out: they come with the extension, not with migrations.
use std::collections::BTreeMap;

use sqlx::postgres::PgConnection;

/// One row per target: its digest and its items, sorted byte-wise (`COLLATE "C"`), so the
/// digest does not depend on a shard's collation. `$1`: the tenants to read, `$2`: whether
/// to read the shard's own schemas, `$3`: every tenant (kept out of the shard's own). The
/// names are joined as sets (hashed), not tested with `= ANY($1)`: that compared every schema
/// with every name, 2,500 x 2,500 comparisons three times over on a shard of 2,500 tenants.
///
/// A tenant's own schema name is stripped from the definitions only (an item's head, the
/// object's kind and name, is built without it), and only as a qualifier: where it starts
/// a name (`tenant_0042.work_orders`, `'tenant_0042.work_orders_id_seq'`), also in the form
/// a string literal holds it (`'"tenant_b''q".seq'`). A plain replace took `orders.` out of
/// `work_orders.id` in a tenant named `orders`, and missed a quoted name inside a literal:
/// both showed as drift.
static FINGERPRINT_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    FINGERPRINT_TEMPLATE
        .replace("STRIP(viewdef)", &strip("pg_catalog.pg_get_viewdef(oid)"))
        .replace("STRIP(prosrc)", &strip("COALESCE(p.prosrc, '')"))
        .replace("STRIP(def)", &strip("def"))
});

/// `expr` without the tenant's own schema qualifier (`own`, `own_quoted`: the patterns `ns`
/// makes for a tenant; NULL for the shard's own schemas, which keep their names). A text
/// without a dot holds no qualifier: no pattern is run on it (each tenant's patterns are
/// its own, and PostgreSQL keeps only a few compiled).
fn strip(expr: &str) -> String {
    format!(
        r"CASE WHEN own IS NULL OR strpos({expr}, '.') = 0 THEN {expr} ELSE CASE WHEN own_quoted IS NULL THEN regexp_replace({expr}, own, '\1', 'g') ELSE regexp_replace(regexp_replace({expr}, own, '\1', 'g'), own_quoted, '\1', 'g') END END"
    )
}

const FINGERPRINT_TEMPLATE: &str = r#"
WITH wanted AS (
  SELECT DISTINCT name FROM unnest($1::text[]) AS w(name)
),
ns AS (
  SELECT n.oid, n.nspname,
         CASE WHEN w.name IS NOT NULL THEN n.nspname::text ELSE '' END AS target,
         CASE WHEN w.name IS NOT NULL THEN '' ELSE quote_ident(n.nspname) || '.' END AS prefix,
         CASE WHEN w.name IS NOT NULL THEN
           '(^|[^[:alnum:]_$."])' || regexp_replace(quote_ident(n.nspname), '([^[:alnum:]_])', '\\\1', 'g') || '\.'
         END AS own,
         CASE WHEN w.name IS NOT NULL AND strpos(n.nspname, '''') > 0 THEN
           '(^|[^[:alnum:]_$."])'
           || regexp_replace(replace(quote_ident(n.nspname), '''', ''''''), '([^[:alnum:]_])', '\\\1', 'g') || '\.'
         END AS own_quoted
    FROM pg_catalog.pg_namespace n
    LEFT JOIN wanted w ON w.name = n.nspname::text
   WHERE w.name IS NOT NULL
      OR ($2 AND n.nspname::text NOT IN (SELECT t FROM unnest($3::text[]) AS e(t))
          AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'flotilla')
          AND n.nspname NOT LIKE 'pg\_%')
),
rel AS (
  SELECT c.oid, c.relname, c.relkind, ns.target, ns.prefix, ns.own, ns.own_quoted
    FROM pg_catalog.pg_class c JOIN ns ON ns.oid = c.relnamespace
   WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
     -- another migration tool's history (dbmate, golang-migrate, Flyway): bookkeeping, not
     -- the application's shape; a fleet adopted from one holds it where the tool ran and
     -- not in tenants Flotilla made since, which read as drifted for good
     AND c.relname NOT IN ('schema_migrations', 'flyway_schema_history')
     AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                      WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
),
items AS (
  SELECT target, own, own_quoted,
         CASE relkind WHEN 'r' THEN 'table ' WHEN 'p' THEN 'partitioned table ' WHEN 'v' THEN 'view '
                      WHEN 'm' THEN 'materialized view ' WHEN 'S' THEN 'sequence ' ELSE 'foreign table ' END
         || prefix || quote_ident(relname)
         || CASE WHEN relkind IN ('v', 'm') THEN ' [definition '
                 || left(md5(STRIP(viewdef)), 8) || ']'
                 ELSE '' END AS head,
         '' AS def
    FROM rel
  UNION ALL
  SELECT r.target, r.own, r.own_quoted,
         'column ' || r.prefix || quote_ident(r.relname) || '.' || quote_ident(a.attname) || ' ',
         pg_catalog.format_type(a.atttypid, a.atttypmod)
         || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
         || CASE a.attidentity WHEN 'a' THEN ' generated always as identity'
                               WHEN 'd' THEN ' generated by default as identity' ELSE '' END
         || COALESCE(CASE WHEN a.attgenerated = 's' THEN ' generated always as ' ELSE ' default ' END
                     || pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), '')
    FROM rel r
    JOIN pg_catalog.pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
   WHERE r.relkind IN ('r', 'p', 'f')
  UNION ALL
  SELECT r.target, r.own, r.own_quoted,
         CASE WHEN i.indisunique THEN 'unique index ' ELSE 'index ' END || r.prefix,
         regexp_replace(pg_catalog.pg_get_indexdef(i.indexrelid), '^CREATE (UNIQUE )?INDEX ', '')
    FROM pg_catalog.pg_index i JOIN rel r ON r.oid = i.indrelid
  UNION ALL
  SELECT ns.target, ns.own, ns.own_quoted,
         'constraint ' || ns.prefix || COALESCE(quote_ident(c.relname) || '.', '') || quote_ident(con.conname)
         || ' ',
         pg_catalog.pg_get_constraintdef(con.oid)
    FROM pg_catalog.pg_constraint con JOIN ns ON ns.oid = con.connamespace
    LEFT JOIN pg_catalog.pg_class c ON c.oid = con.conrelid
   WHERE c.relname IS NULL OR c.relname NOT IN ('schema_migrations', 'flyway_schema_history')
  UNION ALL
  SELECT ns.target, ns.own, ns.own_quoted,
         CASE p.prokind WHEN 'p' THEN 'procedure ' WHEN 'a' THEN 'aggregate ' WHEN 'w' THEN 'window function '
                        ELSE 'function ' END
         || ns.prefix || quote_ident(p.proname) || '(',
         pg_catalog.pg_get_function_identity_arguments(p.oid) || ')'
         || COALESCE(' returns ' || pg_catalog.pg_get_function_result(p.oid), '')
         || ' [' || l.lanname || ' ' || p.provolatile::text || ' body '
         || left(md5(STRIP(prosrc)), 8) || ']'
    FROM pg_catalog.pg_proc p JOIN ns ON ns.oid = p.pronamespace
    JOIN pg_catalog.pg_language l ON l.oid = p.prolang
   WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                      WHERE d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
  UNION ALL
  SELECT r.target, r.own, r.own_quoted,
         'trigger ' || r.prefix || quote_ident(r.relname) || '.',
         regexp_replace(pg_catalog.pg_get_triggerdef(t.oid), '^CREATE (CONSTRAINT )?TRIGGER ', '')
    FROM pg_catalog.pg_trigger t JOIN rel r ON r.oid = t.tgrelid
   WHERE NOT t.tgisinternal
),
stripped AS (
  -- (in tenant order: each tenant's pattern is compiled once, not once an item)
  SELECT target, head || STRIP(def) AS item
    FROM (SELECT * FROM items ORDER BY target) i
)
SELECT t.target,
       left(md5(COALESCE(string_agg(s.item, E'\n' ORDER BY s.item COLLATE "C"), '')), 16),
       COALESCE(array_agg(s.item ORDER BY s.item COLLATE "C") FILTER (WHERE s.item IS NOT NULL), '{}')
  FROM (SELECT DISTINCT target FROM ns) t LEFT JOIN stripped s ON s.target = t.target
 GROUP BY t.target
"#;

/// Each target's fingerprint and items: those of `tenants` that exist as schemas, and the
/// shard's own schemas when `shard_itself` (if it has any).
pub(crate) async fn read_fingerprints(
    conn: &mut PgConnection,
    tenants: &[String],
    shard_itself: bool,
    every_tenant: &[String],
) -> Result<BTreeMap<String, (String, Vec<String>)>, sqlx::Error> {
    let rows: Vec<(String, String, Vec<String>)> =
        sqlx::query_as(sqlx::AssertSqlSafe(FINGERPRINT_SQL.as_str()))
            .bind(tenants)
            .bind(shard_itself)
            .bind(every_tenant)
            .fetch_all(conn)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(target, digest, items)| (target, (digest, items)))
        .collect())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use flotilla_testkit::PgCluster;
    use sqlx::postgres::PgPool;

    use super::*;

    async fn read(
        pool: &PgPool,
        tenants: &[String],
        shard_itself: bool,
        every_tenant: &[String],
    ) -> BTreeMap<String, (String, Vec<String>)> {
        let mut conn = pool.acquire().await.expect("connection");
        read_fingerprints(&mut conn, tenants, shard_itself, every_tenant)
            .await
            .expect("fingerprints")
    }

    /// A tenant with one of everything the fingerprint reads.
    fn tenant(name: &str) -> String {
        format!(
            "CREATE SCHEMA {name};
             CREATE TABLE {name}.customers (id bigserial PRIMARY KEY, email text NOT NULL UNIQUE);
             CREATE TABLE {name}.work_orders (id bigserial PRIMARY KEY,
               customer_id bigint NOT NULL REFERENCES {name}.customers (id),
               total numeric(12,2) NOT NULL DEFAULT 0 CHECK (total >= 0),
               created_at timestamptz NOT NULL DEFAULT now());
             CREATE INDEX idx_work_orders_customer ON {name}.work_orders (customer_id);
             CREATE VIEW {name}.big_orders AS SELECT * FROM {name}.work_orders WHERE total > 100;
             CREATE FUNCTION {name}.touch() RETURNS trigger LANGUAGE plpgsql AS
               'BEGIN NEW.created_at := now(); RETURN NEW; END';
             CREATE TRIGGER work_orders_touch BEFORE UPDATE ON {name}.work_orders
               FOR EACH ROW EXECUTE FUNCTION {name}.touch();"
        )
    }

    async fn shard(tenants: &[&str]) -> (PgCluster, PgPool) {
        let pg = PgCluster::start().await.expect("postgres");
        pg.create_database("shard").await.expect("database");
        let sql: String = tenants.iter().map(|t| tenant(t)).collect();
        pg.psql("shard", &sql).await.expect("tenants");
        let pool = pg.pool("shard").await.expect("pool");
        (pg, pool)
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Tenants whose names are in their objects' names (`orders`: `work_orders`,
    /// `big_orders`) or need quoting (a quote, a space, capitals) share their shape's
    /// fingerprint: a plain replace of `orders.` made `work_id` of `work_orders.id`, and the
    /// quoted name inside a default's literal (`'"tenant_b''q".work_orders_id_seq'`) was
    /// left in. Both showed as drift.
    #[tokio::test]
    async fn tenants_named_like_their_objects_or_quoted_share_their_shapes_fingerprint() {
        let (_pg, pool) = shard(&["tenant_a", "orders", r#""tenant_b'q""#, r#""Tenant X""#]).await;
        let all = ["tenant_a", "orders", "tenant_b'q", "Tenant X"];
        let found = read(&pool, &names(&all), false, &names(&all)).await;
        let a = &found["tenant_a"];
        for t in &all[1..] {
            assert_eq!(&found[*t], a, "{t} has tenant_a's shape");
        }
        assert!(
            a.1.iter().any(|i| i.starts_with(
                "column work_orders.id bigint not null default nextval('work_orders_id_seq'"
            )),
            "{:#?}",
            a.1
        );
    }

    #[tokio::test]
    async fn tenants_of_one_shape_share_a_fingerprint_and_a_change_shows_in_the_items() {
        let all = ["tenant_a", "tenant_b", "tenant_c"];
        let (pg, pool) = shard(&all).await;
        pg.psql(
            "shard",
            "ALTER TABLE tenant_c.work_orders ADD COLUMN loyalty_tier text;
             DROP INDEX tenant_c.idx_work_orders_customer;
             CREATE TABLE public.shard_settings (key text PRIMARY KEY, value text);
             CREATE EXTENSION IF NOT EXISTS pgcrypto;",
        )
        .await
        .unwrap();
        let found = read(&pool, &names(&all), true, &names(&all)).await;
        let (a, b, c) = (&found["tenant_a"], &found["tenant_b"], &found["tenant_c"]);
        assert_eq!(a, b, "two tenants of one shape");
        assert_ne!(a.0, c.0);
        assert!(
            a.1.iter().all(|i| !i.contains("tenant_a")),
            "the schema's own name is stripped: {:#?}",
            a.1
        );
        for kind in [
            "table work_orders",
            "column work_orders.total numeric(12,2) not null default 0",
            "index idx_work_orders_customer ON work_orders USING btree (customer_id)",
            "unique index work_orders_pkey ON work_orders USING btree (id)",
            "constraint work_orders.work_orders_customer_id_fkey FOREIGN KEY (customer_id) REFERENCES customers(id)",
            "view big_orders [definition ",
            "function touch() returns trigger [plpgsql v body ",
            "trigger work_orders.work_orders_touch BEFORE UPDATE ON work_orders",
            "sequence work_orders_id_seq",
        ] {
            assert!(
                a.1.iter().any(|i| i.starts_with(kind)),
                "no `{kind}` in {:#?}",
                a.1
            );
        }
        assert!(
            c.1.contains(&"column work_orders.loyalty_tier text".to_string()),
            "{:#?}",
            c.1
        );
        assert!(!c.1.iter().any(|i| i.contains("idx_work_orders_customer")));
        // The shard's own schemas keep their names; extensions' objects are not counted.
        let own = &found[""].1;
        assert!(
            own.contains(&"table public.shard_settings".to_string()),
            "{own:#?}"
        );
        assert!(
            own.iter()
                .all(|i| !i.contains("tenant_") && !i.contains("digest(")),
            "{own:#?}"
        );
        // Some targets only.
        let some = read(&pool, &names(&["tenant_c"]), false, &names(&all)).await;
        assert_eq!(some.keys().collect::<Vec<_>>(), ["tenant_c"]);
        assert_eq!(&some["tenant_c"], c);
    }

    /// Another migration tool's history table (dbmate's or golang-migrate's
    /// `schema_migrations`, Flyway's `flyway_schema_history`) is not part of a tenant's
    /// shape: in a fleet adopted from one, the tenants the tool made hold it and those made
    /// since do not, and every new tenant showed as drifted for good.
    #[tokio::test]
    async fn another_tools_history_table_is_not_part_of_the_shape() {
        let all = ["tenant_a", "tenant_b", "tenant_c"];
        let (pg, pool) = shard(&all).await;
        pg.psql(
            "shard",
            "CREATE TABLE tenant_a.schema_migrations (version varchar(128) PRIMARY KEY);
             CREATE TABLE tenant_b.flyway_schema_history (installed_rank integer NOT NULL PRIMARY KEY,
               version varchar(50), success boolean NOT NULL);",
        )
        .await
        .unwrap();
        let found = read(&pool, &names(&all), false, &names(&all)).await;
        assert_eq!(found["tenant_a"], found["tenant_c"]);
        assert_eq!(found["tenant_b"], found["tenant_c"]);
    }

    /// The fingerprint query over 2,500 tenant schemas on one shard (the reference fleet's
    /// size per shard): `cargo test -p flotilla-agent --release fingerprint_bench -- --ignored --nocapture`.
    #[tokio::test]
    #[ignore]
    async fn fingerprint_bench() {
        let names: Vec<String> = (0..2500).map(|i| format!("tenant_{i:04}")).collect();
        let pg = PgCluster::start().await.expect("postgres");
        pg.create_database("shard").await.expect("database");
        for chunk in names.chunks(250) {
            let sql: String = chunk.iter().map(|t| tenant(t)).collect();
            pg.psql("shard", &sql).await.expect("tenants");
        }
        let pool = pg.pool("shard").await.expect("pool");
        for round in 0..3 {
            let started = Instant::now();
            let found = read(&pool, &names, true, &names).await;
            let took = started.elapsed();
            let shapes: std::collections::BTreeSet<&String> =
                found.values().map(|(f, _)| f).collect();
            let items: usize = found.values().map(|(_, i)| i.len()).sum();
            println!(
                "round {round}: {} targets, {} shape(s), {items} items in {took:?}",
                found.len(),
                shapes.len()
            );
            assert_eq!(shapes.len(), 2, "the tenants' shape and the shard's own");
        }
    }
}
