//! The rules read from up.sql, statement by statement: what locks or rewrites an existing
//! table for long, what drops data, what running code will miss.
//!
//! A table created earlier in the plan (this migration or one before it) is new: it is
//! empty and nothing uses it yet, so what would be dangerous on a live table is not.

use std::collections::{BTreeMap, BTreeSet};

use pg_query::NodeEnum;
use pg_query::protobuf::{
    AlterTableCmd, AlterTableType as At, ColumnDef, ConstrType, Constraint, NullTestType,
    ObjectType,
};

use super::locks::{as_constraint, is_foreign_key, object_parts, relation_name, strings};
use super::{
    CLUSTER_WIDE, CONCURRENTLY_IN_TRANSACTION, CONSTRAINT_NOT_VALID, DESTRUCTIVE_DROP, DYNAMIC_SQL,
    Finding, INDEX_NOT_CONCURRENT, LintOptions, PARSE_ERROR, ParseError, Parsed, RENAME,
    SESSION_STATE, SET_NOT_NULL, Severity, TABLE_REWRITE, TENANT_ESCAPE, UNBATCHED_DATA_CHANGE,
    rule,
};
use crate::{Migration, TxMode};

/// What earlier statements of the plan did, for the statements after them.
#[derive(Debug, Default)]
pub(super) struct Seen {
    /// Tables (by name without schema) created in this plan.
    new_tables: BTreeSet<String>,
    /// (table, column) with a validated CHECK (column IS NOT NULL).
    not_null_checked: BTreeSet<(String, String)>,
    /// (table, constraint) added NOT VALID as CHECK (column IS NOT NULL): the column.
    pending_checks: BTreeMap<(String, String), String>,
}

impl Seen {
    fn is_new(&self, table: &str) -> bool {
        self.new_tables.contains(unqualified(table))
    }
}

/// `orders` of `app.orders`.
pub(super) fn unqualified(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// The findings of one migration, as they are made.
pub(super) struct Out {
    migration: String,
    pub findings: Vec<Finding>,
}

impl Out {
    pub fn new(m: &Migration) -> Out {
        Out {
            migration: m.id.to_string(),
            findings: Vec::new(),
        }
    }

    /// A finding of `rule` at its own severity.
    pub fn push(&mut self, rule_id: &str, file: &str, line: u32, message: String, hint: &str) {
        let severity = rule(rule_id).map_or(Severity::Error, |r| r.severity);
        self.push_as(rule_id, severity, file, line, message, hint);
    }

    pub fn push_as(
        &mut self,
        rule: &str,
        severity: Severity,
        file: &str,
        line: u32,
        message: String,
        hint: &str,
    ) {
        self.findings.push(Finding {
            rule: rule.to_string(),
            severity,
            migration: self.migration.clone(),
            file: file.to_string(),
            line,
            message,
            hint: hint.to_string(),
        });
    }

    pub fn parse_error(&mut self, file: &str, e: ParseError) {
        self.push(
            PARSE_ERROR,
            file,
            e.line,
            e.message,
            "fix the SQL: PostgreSQL would refuse it the same way",
        );
    }
}

const DROP_HINT: &str = "if the data is meant to go, say `destructive = true` (or risk = \"high\") in migration.toml; otherwise stop using it in code first and drop it in a later release";
const REWRITE_HINT: &str = "add a new column, backfill it with a [data] migration, then switch to it; if PostgreSQL does not rewrite in this case (e.g. varchar(n) to text), ignore the rule with that reason";
const NOT_NULL_HINT: &str = "first ADD CONSTRAINT ... CHECK (col IS NOT NULL) NOT VALID and VALIDATE CONSTRAINT it (SHARE UPDATE EXCLUSIVE only); SET NOT NULL then uses it without a scan (PostgreSQL 12+)";
const NOT_VALID_HINT: &str = "ADD the constraint NOT VALID (checked for new rows only, brief lock), then VALIDATE CONSTRAINT it in a later statement or migration (SHARE UPDATE EXCLUSIVE: reads and writes go on)";
const INDEX_HINT: &str = "CREATE INDEX CONCURRENTLY in a migration of its own (writes go on during the build); for a constraint, build its unique index CONCURRENTLY first, then ADD CONSTRAINT ... USING INDEX";
const RENAME_HINT: &str = "running code still uses the old name: add the new one beside it (or a view with the old name), move the code, then drop the old one in a later release";
const UNBATCHED_HINT: &str = "make it a data migration: [data] in migration.toml with table, key and a batch statement bounded by $1/$2, so each batch commits on its own";

/// The checks on each statement of up.sql, in order.
pub(super) fn check_up(
    m: &Migration,
    up: &[Parsed],
    atomic: bool,
    options: &LintOptions,
    seen: &mut Seen,
    out: &mut Out,
) {
    let may_drop = m.destructive || matches!(m.risk.as_str(), "high" | "critical");
    let outside_tx: Vec<bool> = up
        .iter()
        .map(|p| crate::sql::first_non_transactional(std::slice::from_ref(&p.info.text)).is_some())
        .collect();
    let mixed = outside_tx.iter().any(|o| *o) && outside_tx.iter().any(|o| !*o);
    let mut said_mixed = false;
    for (p, outside) in up.iter().zip(&outside_tx) {
        let line = p.info.line;
        if *outside {
            if atomic {
                out.push(
                    CONCURRENTLY_IN_TRANSACTION,
                    "up.sql",
                    line,
                    format!(
                        "{} cannot run in a transaction, but the migration is in an atomic unit: it is applied outside the two-phase commit, and only undone by down.sql if the unit aborts",
                        p.info.kind
                    ),
                    "give it a migration outside the atomic unit (its own parallel group, not atomic)",
                );
            } else if mixed && !said_mixed {
                said_mixed = true;
                out.push(
                    CONCURRENTLY_IN_TRANSACTION,
                    "up.sql",
                    line,
                    format!(
                        "{} cannot run in a transaction, so this migration's statements commit one by one: a failure part-way leaves the ones before it applied (recorded: run again, it goes on after them; a rollback runs down.sql)",
                        p.info.kind
                    ),
                    "put the statements that cannot run in a transaction in a migration of their own",
                );
            }
        }
        statement(m, p, may_drop, options, seen, out);
    }
    if m.tx_mode == TxMode::NonTransactional {
        // what the last statement leaves in its session no later statement needs
        for p in up.iter().take(up.len().saturating_sub(1)) {
            if let Some(what) = session_state(&p.node) {
                out.push(
                    SESSION_STATE,
                    "up.sql",
                    p.info.line,
                    format!(
                        "{what} lives in its session, and this migration's statements commit one by one: run again after a failure, it goes on after the statements done, in another session, where {what} is gone"
                    ),
                    "use a regular table (dropped by a later statement and by down.sql), or let the migration run in one transaction",
                );
            }
        }
    }
}

/// The end of a [`TENANT_ESCAPE`] message about a write to a shared table: said as a
/// warning whatever the scope (see `check_tenant_escape`).
const WRITE_ONLY: &str = " (a warning: a row of the tenant's own in a shared table is fine)";
const WRITES_HINT: &str = "write shared rows once, in a migration of their own with scope = \"shard\"; a row of the tenant's own (keyed by current_schema()) is fine: ignore the rule with that reason";
const SHARED_HINT: &str = "give it a migration of its own with scope = \"shard\" (run once per shard database, before the tenants' steps that need it); in a tenant's migration leave the schema out, so the object is made in each tenant's schema";
const EXTENSION_HINT: &str = "create it once per shard database in a scope = \"shard\" migration, `CREATE EXTENSION IF NOT EXISTS ... WITH SCHEMA public` (or another shared schema), and refer to its types and functions qualified (`public.citext`): a tenant's steps run with its own schema alone on the search_path";
const SEARCH_PATH_HINT: &str = "leave search_path alone: each tenant's step runs with its own schema on the search_path, which is where unqualified objects go; refer to shared objects qualified (`public.lookup`)";

/// Why a statement of a tenant's migration acts outside its tenant's schema, and how to
/// fix it: on an object of another (qualified) schema, on a schema or an extension (one per
/// database), or by changing the search_path the step set (`SET search_path`, pg_dump's
/// `set_config('search_path', ...)`). Every tenant of a shard runs the statement: on one
/// shared object the second tenant fails on what the first made (or changes it again, or
/// races it: "duplicate key value violates unique constraint pg_type_typname_nsp_index"),
/// and one tenant's rollback undoes it for all; after a changed search_path, what the
/// migration creates lands in that schema, and its down.sql (run in the tenant's) does not
/// find it.
fn outside_tenant(p: &Parsed) -> Option<(String, &'static str)> {
    let schema_of = |parts: &[String]| -> Option<String> {
        (parts.len() > 1)
            .then(|| parts[parts.len() - 2].clone())
            .filter(|s| s != "pg_temp")
    };
    let of_var = |r: &Option<pg_query::protobuf::RangeVar>| -> Option<String> {
        r.as_ref()
            .filter(|r| {
                !r.schemaname.is_empty() && r.schemaname != "pg_temp" && r.relpersistence != "t"
            })
            .map(relation_name)
    };
    let of_names = |names: &[pg_query::protobuf::Node]| -> Option<String> {
        let parts = strings(names);
        schema_of(&parts).map(|_| parts.join("."))
    };
    let kind = &p.info.kind;
    let shared = |name: String| {
        Some((
            format!(
                "{kind} on {name}, outside the tenant's schema: every tenant of the shard runs it on that one object (the second fails on what the first made, or changes it again; one tenant's rollback undoes it for all)"
            ),
            SHARED_HINT,
        ))
    };
    // (a warning, not an error: a tenant's own row in a shared table, `INSERT INTO
    // public.registry VALUES (current_schema())`, is a pattern of its own)
    let writes = |name: String| {
        Some((
            format!(
                "{kind} writes {name}, a table outside the tenant's schema that every tenant of the shard shares: every tenant's step writes it (the same row: the second fails on the first's, or changes it again), and one tenant's down.sql changes it for all{WRITE_ONLY}"
            ),
            WRITES_HINT,
        ))
    };
    match &p.node {
        NodeEnum::VariableSetStmt(s) if s.name.eq_ignore_ascii_case("search_path") => Some((
            format!(
                "{kind} changes the search_path a tenant's step runs with (its own schema): what the migration creates after it lands in the schema it names, once per tenant (the second tenant fails on what the first made), and its down.sql, run in the tenant's schema, does not find it"
            ),
            SEARCH_PATH_HINT,
        )),
        NodeEnum::CreateExtensionStmt(s) => Some((
            format!(
                "CREATE EXTENSION {}: an extension is one per database, made by the first tenant in its own schema (the search_path's first), where every other tenant's use of its types and functions then depends on that tenant (or fails: type does not exist)",
                s.extname
            ),
            EXTENSION_HINT,
        )),
        NodeEnum::AlterExtensionStmt(s) => shared(format!("extension {}", s.extname)),
        NodeEnum::CreateSchemaStmt(s) => shared(format!("schema {}", s.schemaname)),
        NodeEnum::DropStmt(s) => {
            let kind = ObjectType::try_from(s.remove_type);
            let whole = matches!(
                kind,
                Ok(ObjectType::ObjectSchema | ObjectType::ObjectExtension)
            );
            // DROP TRIGGER/RULE/POLICY name ON table: the parts are the table's, then the
            // object's name (the table is what may be another schema's)
            let on_table = matches!(
                kind,
                Ok(ObjectType::ObjectTrigger | ObjectType::ObjectRule | ObjectType::ObjectPolicy)
            );
            // DROP OPERATOR CLASS/FAMILY name USING method: the method is no schema
            let using_method = matches!(
                kind,
                Ok(ObjectType::ObjectOpclass | ObjectType::ObjectOpfamily)
            );
            s.objects.iter().find_map(|o| {
                let mut parts = object_parts(o);
                if whole {
                    return shared(parts.join("."));
                }
                if using_method && !parts.is_empty() {
                    parts.remove(0);
                }
                // (the table's parts, then a name: `schema_of` reads the table's schema)
                let qualified = if on_table {
                    schema_of(
                        parts
                            .get(..parts.len().saturating_sub(1))
                            .unwrap_or_default(),
                    )
                } else {
                    schema_of(&parts)
                };
                qualified.and_then(|_| shared(parts.join(".")))
            })
        }
        // ALTER ... SET SCHEMA other: the tenant's object moved into a shared schema
        NodeEnum::AlterObjectSchemaStmt(s) => {
            let name = s
                .relation
                .as_ref()
                .map(relation_name)
                .or_else(|| s.object.as_deref().map(|o| object_parts(o).join(".")))
                .unwrap_or_default();
            shared(format!("{name} (SET SCHEMA {})", s.newschema))
        }
        NodeEnum::CreateStmt(s) => of_var(&s.relation).and_then(shared),
        NodeEnum::CreateTableAsStmt(s) => {
            of_var(&s.into.as_ref().and_then(|i| i.rel.clone())).and_then(shared)
        }
        NodeEnum::ViewStmt(s) => of_var(&s.view).and_then(shared),
        NodeEnum::CreateSeqStmt(s) => of_var(&s.sequence).and_then(shared),
        NodeEnum::AlterSeqStmt(s) => of_var(&s.sequence).and_then(shared),
        NodeEnum::IndexStmt(s) => of_var(&s.relation).and_then(shared),
        NodeEnum::AlterTableStmt(s) => of_var(&s.relation).and_then(shared),
        NodeEnum::CreateTrigStmt(s) => of_var(&s.relation).and_then(shared),
        NodeEnum::RenameStmt(s) => of_var(&s.relation)
            .or_else(|| {
                s.object.as_deref().and_then(|o| {
                    let parts = object_parts(o);
                    schema_of(&parts).map(|_| parts.join("."))
                })
            })
            .and_then(shared),
        NodeEnum::CompositeTypeStmt(s) => of_var(&s.typevar).and_then(shared),
        NodeEnum::CreateFunctionStmt(s) => of_names(&s.funcname).and_then(shared),
        NodeEnum::CreateEnumStmt(s) => of_names(&s.type_name).and_then(shared),
        NodeEnum::AlterEnumStmt(s) => of_names(&s.type_name).and_then(shared),
        NodeEnum::CreateRangeStmt(s) => of_names(&s.type_name).and_then(shared),
        NodeEnum::CreateDomainStmt(s) => of_names(&s.domainname).and_then(shared),
        NodeEnum::DefineStmt(s) => of_names(&s.defnames).and_then(shared),
        // writes to a table every tenant shares: the second tenant fails on the first's
        // rows (or changes them again), and one tenant's down changes them for all
        NodeEnum::InsertStmt(s) => of_var(&s.relation).and_then(writes),
        NodeEnum::UpdateStmt(s) => of_var(&s.relation).and_then(writes),
        NodeEnum::DeleteStmt(s) => of_var(&s.relation).and_then(writes),
        NodeEnum::MergeStmt(s) => of_var(&s.relation).and_then(writes),
        NodeEnum::CopyStmt(s) if s.is_from => of_var(&s.relation).and_then(writes),
        NodeEnum::TruncateStmt(s) => s
            .relations
            .iter()
            .find_map(|r| match &r.node {
                Some(NodeEnum::RangeVar(r)) => of_var(&Some(r.clone())),
                _ => None,
            })
            .and_then(writes),
        NodeEnum::CreatePolicyStmt(s) => of_var(&s.table).and_then(shared),
        NodeEnum::AlterPolicyStmt(s) => of_var(&s.table).and_then(shared),
        NodeEnum::AlterOwnerStmt(s) => {
            if s.object_type == ObjectType::ObjectSchema as i32 {
                return shared(format!(
                    "schema {}",
                    s.object
                        .as_deref()
                        .map(|o| object_parts(o).join("."))
                        .unwrap_or_default()
                ));
            }
            of_var(&s.relation)
                .or_else(|| {
                    s.object.as_deref().and_then(|o| {
                        let parts = object_parts(o);
                        schema_of(&parts).map(|_| parts.join("."))
                    })
                })
                .and_then(shared)
        }
        // privileges on a schema (`GRANT USAGE ON SCHEMA public`, `ON ALL TABLES IN SCHEMA
        // public`), on another schema's objects, or on the database
        NodeEnum::GrantStmt(s) => {
            let names = || {
                s.objects
                    .iter()
                    .map(|o| match &o.node {
                        Some(NodeEnum::RangeVar(r)) => relation_name(r),
                        _ => object_parts(o).join("."),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let whole = s.targtype
                == pg_query::protobuf::GrantTargetType::AclTargetAllInSchema as i32
                || matches!(
                    ObjectType::try_from(s.objtype),
                    Ok(ObjectType::ObjectSchema | ObjectType::ObjectDatabase)
                );
            if whole {
                return shared(names());
            }
            s.objects
                .iter()
                .find_map(|o| match &o.node {
                    Some(NodeEnum::RangeVar(r)) => of_var(&Some(r.clone())),
                    _ => {
                        let parts = object_parts(o);
                        schema_of(&parts).map(|_| parts.join("."))
                    }
                })
                .and_then(shared)
        }
        NodeEnum::CommentStmt(s) => {
            let parts = s.object.as_deref().map(object_parts).unwrap_or_default();
            match ObjectType::try_from(s.objtype) {
                Ok(
                    ObjectType::ObjectSchema
                    | ObjectType::ObjectExtension
                    | ObjectType::ObjectDatabase,
                ) => shared(parts.join(".")),
                // the last part names the column, trigger, rule, policy or constraint
                Ok(
                    ObjectType::ObjectColumn
                    | ObjectType::ObjectTrigger
                    | ObjectType::ObjectRule
                    | ObjectType::ObjectPolicy
                    | ObjectType::ObjectTabconstraint,
                ) => schema_of(
                    parts
                        .get(..parts.len().saturating_sub(1))
                        .unwrap_or_default(),
                )
                .and_then(|_| shared(parts.join("."))),
                _ => schema_of(&parts).and_then(|_| shared(parts.join("."))),
            }
        }
        // the whole database's: made or changed once per tenant
        NodeEnum::CreatePublicationStmt(_)
        | NodeEnum::AlterPublicationStmt(_)
        | NodeEnum::CreateEventTrigStmt(_)
        | NodeEnum::AlterEventTrigStmt(_)
        | NodeEnum::DropOwnedStmt(_)
        | NodeEnum::ReassignOwnedStmt(_)
        | NodeEnum::AlterDefaultPrivilegesStmt(_) => Some((
            format!(
                "{kind} acts on the whole database, not on the tenant: every tenant of the shard runs it (the second fails on what the first made, or does it again: DROP OWNED takes the role's objects in every tenant's schema), and one tenant's rollback undoes it for all"
            ),
            SHARED_HINT,
        )),
        // pg_dump's `SELECT pg_catalog.set_config('search_path', '', false);` (a query
        // calling it, not a string or comment that mentions it), and `SELECT ... INTO
        // public.x`. A path that keeps the tenant's schema first
        // (`current_schema() || ', public'`) is fine.
        NodeEnum::SelectStmt(sel) => {
            if let Some(name) = sel.into_clause.as_ref().and_then(|i| of_var(&i.rel)) {
                return shared(name);
            }
            None
        }
        _ => None,
    }
}

/// A call of `set_config` in a tenant's statement that sets search_path, anywhere in it (a
/// subquery, `VALUES`, a CTE, `PREPARE`, a function's `BEGIN ATOMIC` body), read from the
/// scanner's tokens: the setting's name a constant however it is quoted (`'search_path'`,
/// `$$search_path$$`, `E'...'`), or one computed that may be it (`'search_' || 'path'`;
/// `'app.' || x` is not); `UPDATE pg_settings` of it (`set_config` by another name); and
/// `RESET ALL` / `DISCARD ALL`, which reset the search_path the step set. Before, the text
/// was searched for `'search_path'`, and a dollar-quoted name went through: the plan ran,
/// its table landed in `public` once for the whole shard. A path with the tenant's schema
/// first (`current_schema() || ', public'`) is fine; a string or a comment that mentions
/// `set_config` is not a call. A `DO` block's body is a string (the `dynamic-sql` rule's).
fn sets_search_path(p: &Parsed) -> Option<(String, &'static str)> {
    let kind = &p.info.kind;
    let found = |what: &str| {
        Some((
            format!(
                "{kind} {what}: what the migration creates after it lands outside the tenant's schema, once per tenant, and its down.sql, run in the tenant's schema, does not find it"
            ),
            SEARCH_PATH_HINT,
        ))
    };
    match &p.node {
        NodeEnum::VariableSetStmt(s)
            if s.kind == pg_query::protobuf::VariableSetKind::VarResetAll as i32 =>
        {
            return found("resets every setting, the search_path the step set among them");
        }
        NodeEnum::DiscardStmt(d)
            if d.target == pg_query::protobuf::DiscardMode::DiscardAll as i32 =>
        {
            return found("resets the session, the search_path the step set among them");
        }
        _ => {}
    }
    let text = p.info.text.as_str();
    let Ok(scanned) = pg_query::scan(text) else {
        return None;
    };
    use pg_query::protobuf::Token;
    // (comments are tokens too: `set_config /* x */ (...)` is a call all the same)
    let toks: Vec<&pg_query::protobuf::ScanToken> = scanned
        .tokens
        .iter()
        .filter(|t| t.token != Token::SqlComment as i32 && t.token != Token::CComment as i32)
        .collect();
    let raw = |i: usize| {
        toks.get(i)
            .and_then(|t| text.get(t.start as usize..t.end as usize))
            .unwrap_or("")
    };
    // an identifier as PostgreSQL reads it (`"set_config"` is set_config)
    let word = |i: usize| {
        let w = raw(i);
        w.strip_prefix('"')
            .and_then(|w| w.strip_suffix('"'))
            .unwrap_or(w)
            .to_string()
    };
    let is = |i: usize, t: Token| toks.get(i).is_some_and(|x| x.token == t as i32);
    let string = |i: usize| is(i, Token::Sconst) || is(i, Token::Usconst);
    for i in 0..toks.len() {
        let w = word(i);
        // `UPDATE [ONLY] [pg_catalog.]pg_settings`: set_config by another name, whatever
        // row it names (its WHERE can name search_path in as many ways as set_config can)
        if w.eq_ignore_ascii_case("pg_settings")
            && (i.saturating_sub(4)..i).any(|j| word(j).eq_ignore_ascii_case("update"))
        {
            return found("updates pg_settings, which sets settings (search_path among them)");
        }
        if !w.eq_ignore_ascii_case("set_config") || !is(i + 1, Token::Ascii40) {
            continue;
        }
        // another schema's function of that name is not PostgreSQL's
        if i >= 2 && raw(i - 1) == "." && !word(i - 2).eq_ignore_ascii_case("pg_catalog") {
            continue;
        }
        let first = string(i + 2).then(|| string_constant(raw(i + 2))).flatten();
        if let Some(name) = first.as_deref()
            && is(i + 3, Token::Ascii44)
        {
            if !name.trim().eq_ignore_ascii_case("search_path") {
                continue;
            }
            if tenant_first(&toks, i + 4, &word, &string) {
                continue;
            }
            return found("sets search_path (set_config)");
        }
        // a computed name: not search_path when its first part cannot begin it
        if let Some(lead) = first
            && !"search_path".starts_with(lead.trim().to_ascii_lowercase().as_str())
        {
            continue;
        }
        return found(
            "calls set_config with a setting name that is not a constant (it may set search_path)",
        );
    }
    None
}

/// Whether set_config's value argument, starting at token `at`, keeps the tenant's schema
/// first: it does not start with a string (`'public, ' || current_schema()` puts `public`
/// ahead) and it names `current_schema` before the argument ends (`current_schema() || ',
/// public'`, `quote_ident(current_schema()) || ...`, `format('%I, public',
/// current_schema())`, `pg_catalog.current_schema()`).
fn tenant_first(
    toks: &[&pg_query::protobuf::ScanToken],
    at: usize,
    word: &impl Fn(usize) -> String,
    string: &impl Fn(usize) -> bool,
) -> bool {
    use pg_query::protobuf::Token;
    if string(at) {
        return false;
    }
    let mut depth = 0i32;
    for (i, t) in toks.iter().enumerate().skip(at) {
        match t.token {
            t if t == Token::Ascii40 as i32 => depth += 1,
            t if t == Token::Ascii41 as i32 => {
                if depth == 0 {
                    return false;
                }
                depth -= 1;
            }
            t if t == Token::Ascii44 as i32 && depth == 0 => return false,
            _ if word(i).eq_ignore_ascii_case("current_schema") => return true,
            _ => {}
        }
    }
    false
}

/// The value of a string constant as the scanner gives its text (`'it''s'`, a constant
/// continued on the next line, `E'search\_path'` and its escapes, `U&'...'`,
/// `$tag$...$tag$`), read by PostgreSQL's own parser; None when it reads no string.
fn string_constant(token: &str) -> Option<String> {
    let parsed =
        pg_query::parse(&format!("SELECT {token}"), pg_query::ParserOptions::DEFAULT).ok()?;
    let stmt = parsed
        .protobuf
        .stmts
        .first()?
        .stmt
        .as_ref()?
        .node
        .as_ref()?;
    let NodeEnum::SelectStmt(select) = stmt else {
        return None;
    };
    let Some(NodeEnum::ResTarget(target)) = select.target_list.first()?.node.as_ref() else {
        return None;
    };
    match target.val.as_ref()?.node.as_ref()? {
        NodeEnum::AConst(c) => match &c.val {
            Some(pg_query::protobuf::a_const::Val::Sval(s)) => Some(s.sval.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// [`TENANT_ESCAPE`] for each statement of a tenant's migration: an error where the
/// migration runs on tenants for sure, a warning where that depends on the fleet (scope
/// `auto`: the submit, which knows, checks again as an error).
pub(super) fn check_tenant_escape(
    file: &str,
    statements: &[Parsed],
    tenant: Option<bool>,
    out: &mut Out,
) {
    let severity = match tenant {
        Some(true) => Severity::Error,
        None => Severity::Warning,
        Some(false) => return,
    };
    for p in statements {
        if let Some((message, hint)) = sets_search_path(p).or_else(|| outside_tenant(p)) {
            let severity = if message.ends_with(WRITE_ONLY) {
                Severity::Warning
            } else {
                severity
            };
            let message = if tenant.is_none() {
                format!(
                    "{message} (when the plan runs on tenants: scope auto on a fleet with tenants)"
                )
            } else {
                message
            };
            out.push_as(TENANT_ESCAPE, severity, file, p.info.line, message, hint);
        }
    }
}

/// What a statement leaves in its session for the statements after it: a temporary table
/// or a prepared statement.
fn session_state(node: &NodeEnum) -> Option<String> {
    let temporary = |r: &pg_query::protobuf::RangeVar| r.relpersistence == "t";
    match node {
        NodeEnum::CreateStmt(s) => s
            .relation
            .as_ref()
            .filter(|r| temporary(r))
            .map(|r| format!("temporary table {}", relation_name(r))),
        NodeEnum::CreateTableAsStmt(s) => s
            .into
            .as_ref()
            .and_then(|i| i.rel.as_ref())
            .filter(|r| temporary(r))
            .map(|r| format!("temporary table {}", relation_name(r))),
        NodeEnum::PrepareStmt(s) => Some(format!("prepared statement {}", s.name)),
        _ => None,
    }
}

fn statement(
    m: &Migration,
    p: &Parsed,
    may_drop: bool,
    options: &LintOptions,
    seen: &mut Seen,
    out: &mut Out,
) {
    let line = p.info.line;
    match &p.node {
        NodeEnum::CreateStmt(s) => {
            if let Some(r) = &s.relation {
                seen.new_tables.insert(r.relname.clone());
            }
        }
        NodeEnum::CreateTableAsStmt(s) => {
            if let Some(r) = s.into.as_ref().and_then(|i| i.rel.as_ref()) {
                seen.new_tables.insert(r.relname.clone());
            }
        }
        NodeEnum::AlterTableStmt(s) => {
            let Some(table) = s.relation.as_ref().map(relation_name) else {
                return;
            };
            for cmd in &s.cmds {
                if let Some(NodeEnum::AlterTableCmd(cmd)) = &cmd.node {
                    alter(&table, cmd, line, may_drop, options, seen, out);
                }
            }
        }
        NodeEnum::DropStmt(s) => {
            let cascade = s.behavior == pg_query::protobuf::DropBehavior::DropCascade as i32;
            let what = match ObjectType::try_from(s.remove_type) {
                Ok(ObjectType::ObjectTable) => "table",
                Ok(ObjectType::ObjectSchema) => "schema",
                Ok(ObjectType::ObjectIndex) => "index",
                // A type, a domain or an extension dropped with CASCADE takes the columns of
                // its types with it, their data (it went through at risk low, no approval).
                // (A view's or a function's CASCADE, the usual way to change one, drops no
                // data.)
                Ok(
                    ObjectType::ObjectType | ObjectType::ObjectDomain | ObjectType::ObjectExtension,
                ) if cascade && !may_drop => {
                    for o in &s.objects {
                        out.push(
                            DESTRUCTIVE_DROP,
                            "up.sql",
                            line,
                            format!(
                                "{} drops {} with CASCADE: the columns of its types go with it, their data too",
                                p.info.kind,
                                object_parts(o).join(".")
                            ),
                            DROP_HINT,
                        );
                    }
                    return;
                }
                _ => return,
            };
            for o in &s.objects {
                let name = object_parts(o).join(".");
                if may_drop || (what == "table" && seen.is_new(&name)) {
                    continue;
                }
                let loses = if what == "index" {
                    "queries that use it slow down, and rebuilding it takes long"
                } else {
                    "its data is gone, and running code that reads it fails"
                };
                out.push(
                    DESTRUCTIVE_DROP,
                    "up.sql",
                    line,
                    format!("{} drops {what} {name}: {loses}", p.info.kind),
                    DROP_HINT,
                );
            }
        }
        NodeEnum::TruncateStmt(s) => {
            for r in &s.relations {
                if let Some(NodeEnum::RangeVar(v)) = &r.node
                    && !may_drop
                    && !seen.is_new(&v.relname)
                {
                    out.push(
                        DESTRUCTIVE_DROP,
                        "up.sql",
                        line,
                        format!("TRUNCATE empties table {}", relation_name(v)),
                        DROP_HINT,
                    );
                }
            }
        }
        NodeEnum::RenameStmt(s) => {
            let Some(table) = s.relation.as_ref().map(relation_name) else {
                return;
            };
            let what = match ObjectType::try_from(s.rename_type) {
                Ok(ObjectType::ObjectTable) => format!("table {table}"),
                Ok(ObjectType::ObjectColumn) => format!("column {table}.{}", s.subname),
                _ => return,
            };
            if !seen.is_new(&table) {
                out.push(
                    RENAME,
                    "up.sql",
                    line,
                    format!(
                        "renames {what} to {}: code that uses the old name breaks",
                        s.newname
                    ),
                    RENAME_HINT,
                );
            }
        }
        NodeEnum::IndexStmt(s) => {
            if let Some(r) = &s.relation
                && !s.concurrent
            {
                let table = relation_name(r);
                index_on(&table, "CREATE INDEX", line, options, seen, out);
            }
        }
        NodeEnum::UpdateStmt(_) | NodeEnum::DeleteStmt(_) if m.data.is_none() => {
            let table = p
                .info
                .locks
                .first()
                .map(|l| l.relation.clone())
                .unwrap_or_default();
            if !seen.is_new(&table) {
                out.push(
                    UNBATCHED_DATA_CHANGE,
                    "up.sql",
                    line,
                    format!(
                        "{} of {table} in one statement: every row it touches stays locked until the migration commits",
                        p.info.kind
                    ),
                    UNBATCHED_HINT,
                );
            }
        }
        NodeEnum::CreateRoleStmt(_)
        | NodeEnum::AlterRoleStmt(_)
        | NodeEnum::AlterRoleSetStmt(_)
        | NodeEnum::DropRoleStmt(_)
        | NodeEnum::GrantRoleStmt(_)
        | NodeEnum::CreatedbStmt(_)
        | NodeEnum::AlterDatabaseStmt(_)
        | NodeEnum::AlterDatabaseSetStmt(_)
        | NodeEnum::DropdbStmt(_)
        | NodeEnum::CreateTableSpaceStmt(_)
        | NodeEnum::DropTableSpaceStmt(_)
        | NodeEnum::AlterSystemStmt(_) => {
            out.push(
                CLUSTER_WIDE,
                "up.sql",
                line,
                format!(
                    "{} acts on the whole PostgreSQL server, not on the tenant or shard database a step runs in: it runs once per target, so the next target of the server fails on what the first made (or changes it again), and one target's rollback undoes it for all",
                    p.info.kind
                ),
                "do it once, outside the plan (the roles and settings a fleet needs belong to its provisioning, as deploy/sql/agent-role.sql does the agent's)",
            );
        }
        NodeEnum::DoStmt(_) => {
            out.push(
                DYNAMIC_SQL,
                "up.sql",
                line,
                "a DO block: the statements it runs are not read by the lint (a DROP in it is not seen), nor their locks by the dry run".to_string(),
                "write the statements out where you can; where the block is needed (conditional DDL), ignore the rule with what it does as the reason",
            );
        }
        NodeEnum::VacuumStmt(_) | NodeEnum::ClusterStmt(_)
            if p.info.kind != "VACUUM" && p.info.kind != "ANALYZE" =>
        {
            for l in &p.info.locks {
                if !seen.is_new(&l.relation) {
                    rewrite(&l.relation, &p.info.kind, line, out);
                }
            }
        }
        _ => {}
    }
}

fn rewrite(table: &str, what: &str, line: u32, out: &mut Out) {
    out.push(
        TABLE_REWRITE,
        "up.sql",
        line,
        format!(
            "{what} rewrites table {table} under ACCESS EXCLUSIVE: no reads or writes until it ends"
        ),
        REWRITE_HINT,
    );
}

fn index_on(table: &str, what: &str, line: u32, options: &LintOptions, seen: &Seen, out: &mut Out) {
    if seen.is_new(table) {
        return;
    }
    let size = options.table_bytes.as_ref().map(|sizes| {
        sizes
            .get(table)
            .or_else(|| sizes.get(unqualified(table)))
            .copied()
    });
    let (severity, how_big) = match size {
        // Measured, and small: the lock is short.
        Some(Some(bytes)) if bytes < options.large_table_bytes => return,
        Some(Some(bytes)) => (Severity::Error, format!(" ({} MiB)", bytes >> 20)),
        _ => (Severity::Warning, String::new()),
    };
    out.push_as(
        INDEX_NOT_CONCURRENT,
        severity,
        "up.sql",
        line,
        format!("{what} on {table}{how_big} without CONCURRENTLY blocks its writes (SHARE lock) for the whole build"),
        INDEX_HINT,
    );
}

fn alter(
    table: &str,
    cmd: &AlterTableCmd,
    line: u32,
    may_drop: bool,
    options: &LintOptions,
    seen: &mut Seen,
    out: &mut Out,
) {
    let new = seen.is_new(table);
    let def = cmd.def.as_deref().and_then(|d| d.node.as_ref());
    match At::try_from(cmd.subtype) {
        Ok(At::AtDropColumn) if !may_drop && !new => out.push(
            DESTRUCTIVE_DROP,
            "up.sql",
            line,
            format!(
                "DROP COLUMN {table}.{}: its data is gone, and running code that reads it fails",
                cmd.name
            ),
            DROP_HINT,
        ),
        Ok(At::AtAlterColumnType) if !new => {
            rewrite(table, &format!("ALTER COLUMN {} TYPE", cmd.name), line, out);
            // `USING` a constant replaces every value (`USING NULL` emptied the column: a
            // rewrite warning alone). Only a constant (cast or not): an expression is
            // taken to read the column.
            let constant = |e: &NodeEnum| match e {
                NodeEnum::AConst(_) => true,
                NodeEnum::TypeCast(c) => c
                    .arg
                    .as_ref()
                    .and_then(|a| a.node.as_ref())
                    .is_some_and(|a| matches!(a, NodeEnum::AConst(_))),
                _ => false,
            };
            if let Some(NodeEnum::ColumnDef(col)) = def
                && let Some(using) = col.raw_default.as_ref().and_then(|e| e.node.as_ref())
                && !may_drop
                && constant(using)
            {
                out.push(
                    DESTRUCTIVE_DROP,
                    "up.sql",
                    line,
                    format!(
                        "ALTER COLUMN {table}.{} TYPE ... USING a constant: every value of the column is replaced",
                        cmd.name
                    ),
                    DROP_HINT,
                );
            }
        }
        Ok(At::AtAddColumn) if !new => {
            if let Some(NodeEnum::ColumnDef(col)) = def
                && let Some(why) = rewriting_column(col)
            {
                rewrite(
                    table,
                    &format!("ADD COLUMN {} {why}", col.colname),
                    line,
                    out,
                );
            }
        }
        Ok(At::AtSetLogged | At::AtSetUnLogged | At::AtSetAccessMethod | At::AtSetTableSpace)
            if !new =>
        {
            let what = At::try_from(cmd.subtype)
                .map(|t| t.as_str_name().trim_start_matches("AT_").to_string())
                .unwrap_or_default();
            rewrite(table, &what, line, out);
        }
        Ok(At::AtSetNotNull) if !new => {
            let key = (unqualified(table).to_string(), cmd.name.clone());
            if !seen.not_null_checked.contains(&key) {
                out.push(
                    SET_NOT_NULL,
                    "up.sql",
                    line,
                    format!(
                        "SET NOT NULL on {table}.{} scans the whole table under ACCESS EXCLUSIVE",
                        cmd.name
                    ),
                    NOT_NULL_HINT,
                );
            }
        }
        Ok(At::AtAddConstraint) => {
            if let Some(NodeEnum::Constraint(c)) = def {
                add_constraint(table, c, line, new, options, seen, out);
            }
        }
        Ok(At::AtValidateConstraint) => {
            let key = (unqualified(table).to_string(), cmd.name.clone());
            if let Some(column) = seen.pending_checks.remove(&key) {
                seen.not_null_checked.insert((key.0, column));
            }
        }
        _ => {}
    }
}

fn add_constraint(
    table: &str,
    c: &Constraint,
    line: u32,
    new: bool,
    options: &LintOptions,
    seen: &mut Seen,
    out: &mut Out,
) {
    let check = c.contype == ConstrType::ConstrCheck as i32;
    if let Some(column) = check.then(|| not_null_column(c)).flatten() {
        let t = unqualified(table).to_string();
        if c.skip_validation {
            seen.pending_checks.insert((t, c.conname.clone()), column);
        } else {
            seen.not_null_checked.insert((t, column));
        }
    }
    if new {
        return;
    }
    if (check || is_foreign_key(c)) && !c.skip_validation {
        let what = if check { "CHECK" } else { "FOREIGN KEY" };
        let name = if c.conname.is_empty() {
            String::new()
        } else {
            format!(" {}", c.conname)
        };
        out.push(
            CONSTRAINT_NOT_VALID,
            "up.sql",
            line,
            format!("ADD CONSTRAINT{name} {what} on {table} without NOT VALID checks every existing row while holding its lock"),
            NOT_VALID_HINT,
        );
    }
    let builds_index = c.contype == ConstrType::ConstrUnique as i32
        || c.contype == ConstrType::ConstrPrimary as i32;
    if builds_index && c.indexname.is_empty() {
        let what = if c.contype == ConstrType::ConstrPrimary as i32 {
            "ADD PRIMARY KEY"
        } else {
            "ADD UNIQUE"
        };
        index_on(table, what, line, options, seen, out);
    }
}

/// The column of a `CHECK (column IS NOT NULL)`.
fn not_null_column(c: &Constraint) -> Option<String> {
    match c.raw_expr.as_deref().and_then(|e| e.node.as_ref()) {
        Some(NodeEnum::NullTest(t)) if t.nulltesttype == NullTestType::IsNotNull as i32 => {
            match t.arg.as_deref().and_then(|a| a.node.as_ref()) {
                Some(NodeEnum::ColumnRef(r)) => strings(&r.fields).pop(),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Functions whose value differs per row: a column added with one as default is written
/// into every row (a constant or stable default is stored once, PostgreSQL 11+).
const VOLATILE: &[&str] = &[
    "random",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "uuidv4",
    "uuidv7",
    "clock_timestamp",
    "timeofday",
    "nextval",
    "txid_current",
];

/// Why adding this column rewrites the table, if it does.
fn rewriting_column(col: &ColumnDef) -> Option<String> {
    let type_name = col
        .type_name
        .as_ref()
        .and_then(|t| strings(&t.names).pop())
        .unwrap_or_default();
    if matches!(
        type_name.as_str(),
        "serial" | "bigserial" | "smallserial" | "serial2" | "serial4" | "serial8"
    ) {
        return Some(format!("{type_name} (every row gets a sequence value)"));
    }
    let mut defaults: Vec<&pg_query::protobuf::Node> =
        col.raw_default.as_deref().into_iter().collect();
    for c in col.constraints.iter().filter_map(as_constraint) {
        if c.contype == ConstrType::ConstrIdentity as i32 {
            return Some("GENERATED AS IDENTITY (every row gets a value)".to_string());
        }
        if c.contype == ConstrType::ConstrGenerated as i32 {
            return Some("GENERATED ... STORED (computed into every row)".to_string());
        }
        if c.contype == ConstrType::ConstrDefault as i32
            && let Some(e) = c.raw_expr.as_deref()
        {
            defaults.push(e);
        }
    }
    for d in defaults {
        let Some(node) = &d.node else { continue };
        for (n, ..) in node.nodes() {
            if let pg_query::NodeRef::FuncCall(f) = n
                && let Some(name) = strings(&f.funcname).pop()
                && VOLATILE.contains(&name.as_str())
            {
                return Some(format!(
                    "DEFAULT {name}() (volatile: computed into every row)"
                ));
            }
        }
    }
    None
}
