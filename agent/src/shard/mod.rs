//! The shard database, as the agent sees it: its connection pool (`connect`), the flotilla
//! schema with the journal, fence and checkpoints (`journal`, `schema.sql`), its tenants
//! (`tenants`), and the agent lock that keeps one agent per shard (`lock`).
mod connect;
mod fingerprint;
pub(crate) mod foreign;
mod journal;
pub(crate) mod keepalive;
pub(crate) mod lock;
mod read_only;
pub(crate) mod server_start;
mod tenants;

pub(crate) use connect::{connect, connect_options, open};
pub(crate) use fingerprint::read_fingerprints;
pub(crate) use journal::{
    GONE, JournalRow, advance_fence, changed_schema, changed_schemas, check_claim, count_plan_rows,
    database_identity, gone_in_rollback, gone_or_renamed, gone_tenant, install_schema,
    is_superuser, journal_empty, read_applied, read_cut_short, read_entries, read_fence,
    read_for_preflight, read_plan_rows, renamed_in_rollback, renamed_tenant, renamed_tenants,
};
pub(crate) use read_only::{begin_read_only, read_error};
pub(crate) use tenants::{TenantSource, discover_tenants};
