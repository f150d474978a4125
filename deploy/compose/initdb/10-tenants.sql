-- Demo fleet for the compose setup: run once by the postgres image's entrypoint
-- when a shard's data volume is new. Every shard gets tenant schemas
-- tenant_01 .. tenant_08 with the two order tables of the example plan
-- (examples/coord-2025-001: work_orders for home services, repair_orders for
-- automotive) and a few rows in each.
DO $$
DECLARE
    tenant text;
BEGIN
    FOR i IN 1..8 LOOP
        tenant := format('tenant_%s', lpad(i::text, 2, '0'));
        EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I', tenant);
        EXECUTE format($ddl$
            CREATE TABLE IF NOT EXISTS %1$I.work_orders (
                id           bigserial PRIMARY KEY,
                business_id  bigint NOT NULL,
                customer_id  bigint NOT NULL,
                total_amount numeric(12, 2) NOT NULL DEFAULT 0,
                created_at   timestamptz NOT NULL DEFAULT now()
            );
            CREATE TABLE IF NOT EXISTS %1$I.repair_orders (
                id           bigserial PRIMARY KEY,
                business_id  bigint NOT NULL,
                customer_id  bigint NOT NULL,
                total_amount numeric(12, 2) NOT NULL DEFAULT 0,
                created_at   timestamptz NOT NULL DEFAULT now()
            );
            INSERT INTO %1$I.work_orders (business_id, customer_id, total_amount)
                SELECT %2$s, g, (g * 17) %% 500 FROM generate_series(1, 50) AS g;
            INSERT INTO %1$I.repair_orders (business_id, customer_id, total_amount)
                SELECT %2$s, g, (g * 23) %% 900 FROM generate_series(1, 50) AS g;
        $ddl$, tenant, i);
    END LOOP;
END
$$;
