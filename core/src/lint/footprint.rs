//! How much of PostgreSQL's shared lock table one target of an atomic unit holds while it
//! is prepared (issue 15): the preflight's estimate, refused before anything runs when the
//! server's lock table cannot hold every prepared target of a shard at once.
//!
//! A prepared transaction keeps every lock it took until COMMIT/ROLLBACK PREPARED, each
//! object it locked one entry of the shared table (fast-path locks move there at PREPARE).
//! The estimate has two parts:
//! - the relations the statements name, as the parser sees them ([`super::analyze`]): the
//!   agent resolves them in each target's search_path and counts each with its indexes, its
//!   TOAST table and index and the sequences it owns, from the catalog, since a DROP or a
//!   rewriting ALTER TABLE locks all of those;
//! - per statement, an allowance for the relations it creates, which no catalog holds yet:
//!   [`created_allowance`].
//!
//! The agent adds its own bookkeeping (the fence and the journal). The sum is an upper bound
//! for plain DDL (COORD-2025-001 at 2,500 targets: 22 pg_locks rows per target, 16 objects;
//! estimated 26) and blind to what SQL reaches indirectly (a function, a trigger, a DO
//! block): that is what the runtime check is for (an "out of shared memory" before PREPARE
//! fails the step and aborts the unit).
use std::collections::BTreeSet;

use super::parse_statements;

/// Lock table entries every prepared target holds whatever its statements: its own
/// transaction id, and the schema its statements create objects in.
pub const TARGET_LOCKS: u32 = 2;

/// What one unit's SQL locks on each of its targets, before the catalog is read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockFootprint {
    /// The relations its statements name, as written (`orders`, `app.orders`); the ones
    /// they create are among them but found in no catalog yet.
    pub relations: BTreeSet<String>,
    /// Entries for the relations the statements create, per target.
    pub created: u32,
}

impl LockFootprint {
    /// Adds one migration's up SQL. SQL that does not parse adds nothing: the lint refuses
    /// the plan for it before the preflight asks.
    pub fn add(&mut self, sql: &str) {
        let Ok(statements) = parse_statements(sql) else {
            return;
        };
        for s in statements {
            self.created += created_allowance(&s.info.kind);
            self.relations
                .extend(s.info.locks.into_iter().map(|l| l.relation));
        }
    }

    /// Entries one target holds, given what the catalog counted for the named relations
    /// there (with their indexes, TOAST and sequences).
    pub fn per_target(&self, named: u32) -> u32 {
        named
            .saturating_add(self.created)
            .saturating_add(TARGET_LOCKS)
    }
}

/// Entries a statement of this kind takes on relations it creates: a table its TOAST
/// table and index, an index for its key and a sequence for a serial column (5); a view
/// its rule, stored in pg_rewrite, whose TOAST table and index are locked too (3); ALTER
/// TABLE a TOAST table and index when it adds the table's first long column (2); anything
/// else one (an index, a sequence, a type, a constraint's trigger).
pub fn created_allowance(kind: &str) -> u32 {
    match kind {
        "CREATE TABLE" | "CREATE TABLE AS" | "SELECT INTO" | "CREATE MATERIALIZED VIEW" => 5,
        "CREATE VIEW" => 3,
        k if k.starts_with("ALTER ") => 2,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_relation_once_and_allows_for_what_is_created() {
        let mut f = LockFootprint::default();
        f.add(
            "ALTER TABLE work_orders ADD COLUMN r int;\n\
             CREATE INDEX idx_r ON work_orders (r);\n\
             CREATE VIEW v AS SELECT 1;",
        );
        f.add("CREATE TABLE app.notes (id bigserial PRIMARY KEY, body text);");
        assert_eq!(
            f.relations.iter().map(String::as_str).collect::<Vec<_>>(),
            ["app.notes", "v", "work_orders"]
        );
        assert_eq!(f.created, 2 + 1 + 3 + 5);
        assert_eq!(f.per_target(4), 4 + 11 + TARGET_LOCKS);
    }

    #[test]
    fn sql_that_does_not_parse_adds_nothing() {
        let mut f = LockFootprint::default();
        f.add("ALTER TABEL x");
        assert_eq!(f, LockFootprint::default());
    }
}
