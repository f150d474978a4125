//! The control store's tables (created at start; `schema_version` in `flotilla_meta`).
pub(super) const SCHEMA_VERSION: i64 = 7;

/// The decision row ([`UPGRADES`] to 6) of a plan a coordinator from before version 6 left
/// committing: that coordinator had decided commit (see [`crate::store::Store::committed_before_decisions`]).
pub(super) const COMMITTING_BEFORE_DECISIONS: &str = "committing-before-decisions:";

/// What each version adds to the one before, in order: a store of an older version is
/// brought up to date at start (the tables of version 1 are `SCHEMA`).
pub(super) const UPGRADES: &[(i64, &[&str])] = &[
    (
        2,
        &[
            // progressive rollouts: each step's wave, and each wave's state
            "ALTER TABLE steps ADD COLUMN wave BIGINT NOT NULL DEFAULT 0",
            // where a stopping plan ends (failed, cancelled, halted): a new leader that finds
            // it stopping finishes the stop, it does not undo the plan
            "ALTER TABLE plans ADD COLUMN ends TEXT NOT NULL DEFAULT 'failed'",
            "CREATE TABLE IF NOT EXISTS waves (
            plan_id TEXT NOT NULL, idx BIGINT NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
            bake_until_ms BIGINT, gate TEXT NOT NULL DEFAULT '', PRIMARY KEY (plan_id, idx))",
        ],
    ),
    (
        3,
        &[
            // a client's id for a submission, and the plan it stored (a submit sent again
            // answers with that plan)
            "CREATE TABLE IF NOT EXISTS submissions (
            request_id TEXT PRIMARY KEY, plan_id TEXT NOT NULL, at_ms BIGINT NOT NULL)",
        ],
    ),
    (
        4,
        &[
            // where an operator paused the plan (`Paused::stored`): a new leader, or a retry,
            // keeps it paused there (the agents still are) until it is resumed
            "ALTER TABLE plans ADD COLUMN paused TEXT NOT NULL DEFAULT ''",
        ],
    ),
    (
        5,
        &[
            // an operator's name given again after its revocation: client certificates of
            // that name valid from before then were its former holder's (see `OperatorRow`)
            "ALTER TABLE operators ADD COLUMN certificates_from_ms BIGINT NOT NULL DEFAULT 0",
        ],
    ),
    (
        6,
        &[
            // the commit decisions of a coordinator without etcd (etcd holds them
            // otherwise): a decision must outlive the coordinator that made it
            "CREATE TABLE IF NOT EXISTS decisions (
            unit TEXT PRIMARY KEY, decision TEXT NOT NULL, epoch BIGINT NOT NULL,
            at_ms BIGINT NOT NULL)",
            // An atomic plan a coordinator of an older version (decisions in its memory)
            // left committing: it stored `committing` only after deciding commit, which
            // a new leader reads back from this row (`COMMITTING_BEFORE_DECISIONS`); with
            // no row at all it would presume abort, and undo by down SQL what shards
            // committed.
            "INSERT INTO decisions (unit, decision, epoch, at_ms)
             SELECT 'committing-before-decisions:' || id, 'commit', 0, 0 FROM plans
             WHERE state = 'committing' ON CONFLICT (unit) DO NOTHING",
        ],
    ),
    (
        7,
        &[
            // tenants that appeared while a plan asking for catch-up ran, kept to be caught
            // up when a plan completes: kept in the leader's memory only, a change of leader
            // meanwhile left them behind (`tenant_hex`: the agent's `pb::Tenant`, labels and all)
            "CREATE TABLE IF NOT EXISTS catch_up_kept (
            shard TEXT NOT NULL, tenant TEXT NOT NULL, tenant_hex TEXT NOT NULL,
            at_ms BIGINT NOT NULL, PRIMARY KEY (shard, tenant))",
            // when a plan was last asked to run after its submit (a retry, an approval, a
            // rollback of it ended), by which a new leader queues it for its shard locks
            // (a table of its own: an upgrade run again adds no column twice)
            "CREATE TABLE IF NOT EXISTS plan_queue (
            plan_id TEXT PRIMARY KEY, queued_at_ms BIGINT NOT NULL)",
        ],
    ),
];

pub(super) const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS flotilla_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS plans (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, environment TEXT NOT NULL, state TEXT NOT NULL,
        policy TEXT NOT NULL, spec_hex TEXT NOT NULL, epoch BIGINT NOT NULL, message TEXT NOT NULL,
        submitted_by TEXT NOT NULL, created_at_ms BIGINT NOT NULL, updated_at_ms BIGINT NOT NULL,
        targets BIGINT NOT NULL, steps BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS steps (
        plan_id TEXT NOT NULL, migration_id TEXT NOT NULL, shard TEXT NOT NULL, tenant TEXT NOT NULL,
        state TEXT NOT NULL, attempts BIGINT NOT NULL, sqlstate TEXT NOT NULL, message TEXT NOT NULL,
        duration_ms BIGINT NOT NULL, updated_at_ms BIGINT NOT NULL,
        phase TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (plan_id, migration_id, shard, tenant))",
    "CREATE TABLE IF NOT EXISTS attempts (
        plan_id TEXT NOT NULL, migration_id TEXT NOT NULL, shard TEXT NOT NULL, tenant TEXT NOT NULL,
        run_id BIGINT NOT NULL, outcome TEXT NOT NULL, sqlstate TEXT NOT NULL, message TEXT NOT NULL,
        duration_ms BIGINT NOT NULL, at_ms BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS attempts_by_step ON attempts (plan_id, migration_id, shard, tenant)",
    "CREATE TABLE IF NOT EXISTS audit (
        id TEXT PRIMARY KEY, at_ms BIGINT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
        plan_id TEXT NOT NULL, detail TEXT NOT NULL)",
    // a plan's own entries (its trail; its shard cancels, read by a new leader for each
    // running plan it takes over): the table grows with every command and refusal
    "CREATE INDEX IF NOT EXISTS audit_by_plan ON audit (plan_id, at_ms)",
    // the last progress of each data change of a finished plan (pb::DataProgress, hex)
    "CREATE TABLE IF NOT EXISTS data_progress (
        plan_id TEXT NOT NULL, migration_id TEXT NOT NULL, shard TEXT NOT NULL, tenant TEXT NOT NULL,
        progress_hex TEXT NOT NULL, PRIMARY KEY (plan_id, migration_id, shard, tenant))",
    "CREATE TABLE IF NOT EXISTS agents (
        shard TEXT PRIMARY KEY, labels TEXT NOT NULL, tenants TEXT NOT NULL, version TEXT NOT NULL,
        last_seen_ms BIGINT NOT NULL)",
    // Operator identities (`flotilla operator add`): only a SHA-256 of each bearer token.
    // A revoked operator keeps its row: its name stays in the audit trail's history, and a
    // store that ever held an operator keeps authentication on. Created with IF NOT EXISTS
    // at every start, as the tables of version 1 are (no upgrade step needed).
    "CREATE TABLE IF NOT EXISTS operators (
        name TEXT PRIMARY KEY, role TEXT NOT NULL, approval_roles TEXT NOT NULL,
        token_sha256 TEXT NOT NULL UNIQUE, created_at_ms BIGINT NOT NULL, created_by TEXT NOT NULL,
        revoked_at_ms BIGINT NOT NULL DEFAULT 0)",
];
