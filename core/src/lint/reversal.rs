//! Does down.sql undo up.sql? Every object up.sql creates (table, column, index, named
//! constraint, view, sequence, type, schema, trigger, function) must be dropped by down.sql,
//! directly or with what holds it (a column goes with its table, an index or constraint with
//! a column it is on, a table with its schema).
//!
//! Objects created with OR REPLACE are left out: their down restores the old definition
//! rather than dropping it. A data migration's down is its own (restore or reverse update).

use pg_query::NodeEnum;
use pg_query::protobuf::{AlterTableType as At, ObjectType};

use super::locks::{object_parts, relation_name, strings};
use super::rules::{Out, unqualified};
use super::{DELETE_NOT_UNDONE, DOWN_DROPS_EXISTING, DOWN_INCOMPLETE, MISSING_DOWN, Parsed};
use crate::Migration;

/// An object, by namespace: relations (tables, views, sequences, indexes) share one in
/// PostgreSQL, so a DROP of any of them matches by name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Object {
    Relation {
        name: String,
        what: &'static str,
    },
    Column {
        table: String,
        column: String,
    },
    /// `columns`: those it is on, which a DROP COLUMN of one of takes it with it.
    Constraint {
        table: String,
        name: String,
        columns: Vec<String>,
    },
    Trigger {
        table: String,
        name: String,
    },
    Index {
        name: String,
        table: String,
        columns: Vec<String>,
    },
    Schema(String),
    Type(String),
    Function(String),
}

impl Object {
    fn describe(&self) -> String {
        match self {
            Object::Relation { name, what } => format!("{what} {name}"),
            Object::Column { table, column } => format!("column {table}.{column}"),
            Object::Constraint { table, name, .. } => format!("constraint {name} on {table}"),
            Object::Trigger { table, name } => format!("trigger {name} on {table}"),
            Object::Index { name, .. } => format!("index {name}"),
            Object::Schema(s) => format!("schema {s}"),
            Object::Type(t) => format!("type {t}"),
            Object::Function(f) => format!("function {f}"),
        }
    }

    /// The schema the object's name is qualified with, if it is.
    fn schema(&self) -> Option<&str> {
        let name = match self {
            Object::Relation { name, .. } | Object::Index { name, .. } => name,
            Object::Column { table, .. }
            | Object::Constraint { table, .. }
            | Object::Trigger { table, .. } => table,
            Object::Type(n) | Object::Function(n) => n,
            Object::Schema(_) => return None,
        };
        name.rsplit_once('.').map(|(schema, _)| schema)
    }

    /// The table the object lives on (dropped with it).
    fn table(&self) -> Option<&str> {
        match self {
            Object::Column { table, .. }
            | Object::Constraint { table, .. }
            | Object::Trigger { table, .. }
            | Object::Index { table, .. } => Some(table),
            _ => None,
        }
    }
}

/// Two names of one object: equal unqualified names, and equal schemas when both say one.
fn same(a: &str, b: &str) -> bool {
    if unqualified(a) != unqualified(b) {
        return false;
    }
    match (a.rsplit_once('.'), b.rsplit_once('.')) {
        (Some((sa, _)), Some((sb, _))) => sa == sb,
        _ => true,
    }
}

/// What up.sql creates and leaves, with the line of the statement that creates it (a
/// table created and dropped again within up.sql is not left).
fn created(up: &[Parsed]) -> Vec<(Object, u32)> {
    let mut out: Vec<(Object, u32)> = Vec::new();
    for p in up {
        let drops = dropped(std::slice::from_ref(p));
        out.retain(|(o, _)| !drops.iter().any(|d| covers(d, o)));
        let line = p.info.line;
        created_by(p, &mut |o| out.push((o, line)));
    }
    out
}

fn created_by(p: &Parsed, add: &mut dyn FnMut(Object)) {
    // `pg_temp.x` is a temporary object as `CREATE TEMP ...` is: gone with its session
    let mut add = |o: Object| {
        if o.schema() != Some("pg_temp") {
            add(o)
        }
    };
    match &p.node {
        // a temporary table goes with its session: down.sql has none to drop
        NodeEnum::CreateStmt(s) => {
            if let Some(r) = s.relation.as_ref().filter(|r| r.relpersistence != "t") {
                add(Object::Relation {
                    name: relation_name(r),
                    what: "table",
                });
            }
        }
        NodeEnum::CreateTableAsStmt(s) => {
            if let Some(r) = s
                .into
                .as_ref()
                .and_then(|i| i.rel.as_ref())
                .filter(|r| r.relpersistence != "t")
            {
                let what = if s.objtype == ObjectType::ObjectMatview as i32 {
                    "materialized view"
                } else {
                    "table"
                };
                add(Object::Relation {
                    name: relation_name(r),
                    what,
                });
            }
        }
        NodeEnum::ViewStmt(s) if !s.replace => {
            // (a temporary view goes with its session)
            if let Some(r) = s.view.as_ref().filter(|r| r.relpersistence != "t") {
                add(Object::Relation {
                    name: relation_name(r),
                    what: "view",
                });
            }
        }
        NodeEnum::CreateSeqStmt(s) => {
            if let Some(r) = &s.sequence {
                add(Object::Relation {
                    name: relation_name(r),
                    what: "sequence",
                });
            }
        }
        NodeEnum::IndexStmt(s) if !s.idxname.is_empty() => {
            let table = s.relation.as_ref().map(relation_name).unwrap_or_default();
            // An index lives in its table's schema.
            let name = match table.rsplit_once('.') {
                Some((schema, _)) => format!("{schema}.{}", s.idxname),
                None => s.idxname.clone(),
            };
            let mut columns = Vec::new();
            for param in &s.index_params {
                match &param.node {
                    Some(NodeEnum::IndexElem(e)) if !e.name.is_empty() => {
                        columns.push(e.name.clone())
                    }
                    Some(NodeEnum::IndexElem(e)) => columns.extend(column_refs(e.expr.as_deref())),
                    _ => {}
                }
            }
            columns.extend(column_refs(s.where_clause.as_deref()));
            add(Object::Index {
                name,
                table,
                columns,
            });
        }
        NodeEnum::CreateForeignTableStmt(s) => {
            if let Some(r) = s.base_stmt.as_ref().and_then(|b| b.relation.as_ref()) {
                add(Object::Relation {
                    name: relation_name(r),
                    what: "foreign table",
                });
            }
        }
        NodeEnum::CreateSchemaStmt(s) => add(Object::Schema(s.schemaname.clone())),
        NodeEnum::CreateEnumStmt(s) => add(Object::Type(strings(&s.type_name).join("."))),
        NodeEnum::CreateRangeStmt(s) => add(Object::Type(strings(&s.type_name).join("."))),
        // a base type (and its shell, `CREATE TYPE t;`)
        NodeEnum::DefineStmt(s) if s.kind == ObjectType::ObjectType as i32 => {
            add(Object::Type(strings(&s.defnames).join(".")))
        }
        NodeEnum::CompositeTypeStmt(s) => {
            if let Some(r) = &s.typevar {
                add(Object::Type(relation_name(r)));
            }
        }
        NodeEnum::CreateDomainStmt(s) => add(Object::Type(strings(&s.domainname).join("."))),
        NodeEnum::CreateFunctionStmt(s) if !s.replace => {
            add(Object::Function(strings(&s.funcname).join(".")));
        }
        NodeEnum::CreateTrigStmt(s) if !s.replace => {
            let table = s.relation.as_ref().map(relation_name).unwrap_or_default();
            add(Object::Trigger {
                table,
                name: s.trigname.clone(),
            });
        }
        NodeEnum::AlterTableStmt(s) => {
            let table = s.relation.as_ref().map(relation_name).unwrap_or_default();
            for cmd in &s.cmds {
                let Some(NodeEnum::AlterTableCmd(cmd)) = &cmd.node else {
                    continue;
                };
                match (
                    At::try_from(cmd.subtype),
                    cmd.def.as_deref().and_then(|d| d.node.as_ref()),
                ) {
                    (Ok(At::AtAddColumn), Some(NodeEnum::ColumnDef(c))) => add(Object::Column {
                        table: table.clone(),
                        column: c.colname.clone(),
                    }),
                    (Ok(At::AtAddConstraint), Some(NodeEnum::Constraint(c)))
                        if !c.conname.is_empty() =>
                    {
                        let mut columns = strings(&c.keys);
                        columns.extend(strings(&c.fk_attrs));
                        columns.extend(column_refs(c.raw_expr.as_deref()));
                        add(Object::Constraint {
                            table: table.clone(),
                            name: c.conname.clone(),
                            columns,
                        })
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// What down.sql drops.
fn dropped(down: &[Parsed]) -> Vec<Object> {
    let mut out = Vec::new();
    for p in down {
        match &p.node {
            NodeEnum::DropStmt(s) => {
                for o in &s.objects {
                    let parts = object_parts(o);
                    let name = parts.join(".");
                    let last_on = |parts: &[String]| {
                        (parts.len() > 1).then(|| {
                            (
                                parts[..parts.len() - 1].join("."),
                                parts[parts.len() - 1].clone(),
                            )
                        })
                    };
                    let relation = |what| Object::Relation {
                        name: name.clone(),
                        what,
                    };
                    match ObjectType::try_from(s.remove_type) {
                        Ok(ObjectType::ObjectTable) => out.push(relation("table")),
                        Ok(ObjectType::ObjectView) => out.push(relation("view")),
                        Ok(ObjectType::ObjectMatview) => out.push(relation("materialized view")),
                        Ok(ObjectType::ObjectSequence) => out.push(relation("sequence")),
                        Ok(ObjectType::ObjectForeignTable) => out.push(relation("foreign table")),
                        Ok(ObjectType::ObjectIndex) => out.push(relation("index")),
                        Ok(ObjectType::ObjectSchema) => out.push(Object::Schema(name)),
                        Ok(ObjectType::ObjectType | ObjectType::ObjectDomain) => {
                            out.push(Object::Type(name))
                        }
                        Ok(
                            ObjectType::ObjectFunction
                            | ObjectType::ObjectProcedure
                            | ObjectType::ObjectRoutine,
                        ) => out.push(Object::Function(name)),
                        Ok(ObjectType::ObjectTrigger) => {
                            if let Some((table, name)) = last_on(&parts) {
                                out.push(Object::Trigger { table, name });
                            }
                        }
                        _ => {}
                    }
                }
            }
            NodeEnum::AlterTableStmt(s) => {
                let table = s.relation.as_ref().map(relation_name).unwrap_or_default();
                for cmd in &s.cmds {
                    let Some(NodeEnum::AlterTableCmd(cmd)) = &cmd.node else {
                        continue;
                    };
                    match At::try_from(cmd.subtype) {
                        Ok(At::AtDropColumn) => out.push(Object::Column {
                            table: table.clone(),
                            column: cmd.name.clone(),
                        }),
                        Ok(At::AtDropConstraint) => out.push(Object::Constraint {
                            table: table.clone(),
                            name: cmd.name.clone(),
                            columns: Vec::new(),
                        }),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Whether dropping `d` drops `o` (itself, or what holds it).
fn covers(d: &Object, o: &Object) -> bool {
    if let Object::Schema(s) = d {
        return matches!(o, Object::Schema(x) if x == s) || o.schema() == Some(s.as_str());
    }
    if let Object::Relation { name, .. } = d
        && o.table().is_some_and(|t| same(name, t))
    {
        return true;
    }
    match (d, o) {
        (Object::Relation { name: a, .. }, Object::Relation { name: b, .. })
        | (Object::Relation { name: a, .. }, Object::Index { name: b, .. })
        | (Object::Type(a), Object::Type(b))
        | (Object::Function(a), Object::Function(b)) => same(a, b),
        (
            Object::Column {
                table: ta,
                column: a,
            },
            Object::Column {
                table: tb,
                column: b,
            },
        )
        | (
            Object::Constraint {
                table: ta, name: a, ..
            },
            Object::Constraint {
                table: tb, name: b, ..
            },
        )
        | (Object::Trigger { table: ta, name: a }, Object::Trigger { table: tb, name: b }) => {
            a == b && same(ta, tb)
        }
        // PostgreSQL drops an index or constraint with a column it is on.
        (
            Object::Column { table: ta, column },
            Object::Constraint {
                table: tb, columns, ..
            }
            | Object::Index {
                table: tb, columns, ..
            },
        ) => columns.contains(column) && same(ta, tb),
        _ => false,
    }
}

/// Whether `d` (dropped) and `o` (created) are one object, not `o` taken with `d`.
fn same_object(d: &Object, o: &Object) -> bool {
    match (d, o) {
        (Object::Relation { .. }, Object::Relation { .. } | Object::Index { .. })
        | (Object::Column { .. }, Object::Column { .. })
        | (Object::Constraint { .. }, Object::Constraint { .. })
        | (Object::Trigger { .. }, Object::Trigger { .. })
        | (Object::Schema(_), Object::Schema(_))
        | (Object::Type(_), Object::Type(_))
        | (Object::Function(_), Object::Function(_)) => covers(d, o),
        _ => false,
    }
}

/// What up.sql may create beyond [`created`]: `OR REPLACE` objects (new, or replaced).
fn replaced(up: &[Parsed]) -> Vec<Object> {
    let mut out = Vec::new();
    for p in up {
        match &p.node {
            NodeEnum::ViewStmt(s) if s.replace => {
                if let Some(r) = &s.view {
                    out.push(Object::Relation {
                        name: relation_name(r),
                        what: "view",
                    });
                }
            }
            NodeEnum::CreateFunctionStmt(s) if s.replace => {
                out.push(Object::Function(strings(&s.funcname).join(".")));
            }
            NodeEnum::CreateTrigStmt(s) if s.replace => out.push(Object::Trigger {
                table: s.relation.as_ref().map(relation_name).unwrap_or_default(),
                name: s.trigname.clone(),
            }),
            _ => {}
        }
    }
    out
}

/// The new names up.sql gives what it created (`RENAME TO`): a table built under another
/// name and swapped in (`ALTER TABLE t_new RENAME TO t`) is dropped under its new one by
/// down.sql.
fn renamed(up: &[Parsed], known: &mut Vec<Object>) {
    for p in up {
        // only what up.sql made goes on being its own under the new name: a table it only
        // renamed (`orders` to `orders_old` in a swap) is what existed before
        if let Some((from, to)) = rename_of(p)
            && known.iter().any(|o| same_object(&from, o))
        {
            known.push(to);
        }
    }
}

/// What a `RENAME TO` statement renames: (the name before, the name after).
fn rename_of(p: &Parsed) -> Option<(Object, Object)> {
    let NodeEnum::RenameStmt(s) = &p.node else {
        return None;
    };
    let table = s.relation.as_ref().map(relation_name).unwrap_or_default();
    let in_schema = |name: &str| match table.rsplit_once('.') {
        Some((schema, _)) => format!("{schema}.{name}"),
        None => name.to_string(),
    };
    Some(match ObjectType::try_from(s.rename_type) {
        Ok(
            ObjectType::ObjectTable
            | ObjectType::ObjectView
            | ObjectType::ObjectMatview
            | ObjectType::ObjectSequence
            | ObjectType::ObjectForeignTable
            | ObjectType::ObjectIndex,
        ) => {
            let relation = |name: String| Object::Relation {
                name,
                what: "relation",
            };
            (relation(table.clone()), relation(in_schema(&s.newname)))
        }
        Ok(ObjectType::ObjectColumn) => {
            let column = |column: &str| Object::Column {
                table: table.clone(),
                column: column.to_string(),
            };
            (column(&s.subname), column(&s.newname))
        }
        Ok(ObjectType::ObjectTabconstraint) => {
            let constraint = |name: &str| Object::Constraint {
                table: table.clone(),
                name: name.to_string(),
                columns: Vec::new(),
            };
            (constraint(&s.subname), constraint(&s.newname))
        }
        Ok(ObjectType::ObjectTrigger) => {
            let trigger = |name: &str| Object::Trigger {
                table: table.clone(),
                name: name.to_string(),
            };
            (trigger(&s.subname), trigger(&s.newname))
        }
        // ALTER TYPE t RENAME TO t_old (the enum recipe)
        Ok(ObjectType::ObjectType | ObjectType::ObjectDomain) => {
            let parts = s.object.as_deref().map(object_parts).unwrap_or_default();
            let to = match parts.split_last() {
                Some((_, schema)) if !schema.is_empty() => {
                    format!("{}.{}", schema.join("."), s.newname)
                }
                _ => s.newname.clone(),
            };
            (Object::Type(parts.join(".")), Object::Type(to))
        }
        _ => return None,
    })
}

/// Whether up.sql creates what its statements do not name: a DO block, a procedure, a
/// prepared statement, `SELECT ... INTO` or `IMPORT FOREIGN SCHEMA` (its objects are not
/// known), and whether it adds
/// constraints or indexes PostgreSQL names itself (`ADD PRIMARY KEY`, `CREATE INDEX ON`).
fn unseen(up: &[Parsed]) -> (bool, bool) {
    let mut opaque = false;
    let mut unnamed = false;
    for p in up {
        match &p.node {
            // IMPORT FOREIGN SCHEMA creates foreign tables named by the remote server
            NodeEnum::DoStmt(_)
            | NodeEnum::CallStmt(_)
            | NodeEnum::ExecuteStmt(_)
            | NodeEnum::ImportForeignSchemaStmt(_) => opaque = true,
            NodeEnum::SelectStmt(s) if s.into_clause.is_some() => opaque = true,
            // a function may create what it does not name (AddGeometryColumn, partman)
            NodeEnum::SelectStmt(_)
                if p.node
                    .nodes()
                    .iter()
                    .any(|(n, ..)| matches!(n, pg_query::NodeRef::FuncCall(_))) =>
            {
                opaque = true
            }
            NodeEnum::IndexStmt(s) if s.idxname.is_empty() => unnamed = true,
            // a serial or identity column's sequence, an inline constraint's index
            NodeEnum::CreateStmt(s) => {
                unnamed |= s.table_elts.iter().any(|e| match &e.node {
                    Some(NodeEnum::ColumnDef(c)) => names_its_own(c),
                    Some(NodeEnum::Constraint(c)) => c.conname.is_empty(),
                    _ => false,
                })
            }
            NodeEnum::AlterTableStmt(s) => {
                for cmd in &s.cmds {
                    if let Some(NodeEnum::AlterTableCmd(cmd)) = &cmd.node {
                        match cmd.def.as_deref().and_then(|d| d.node.as_ref()) {
                            Some(NodeEnum::Constraint(c)) if c.conname.is_empty() => unnamed = true,
                            // a column's inline constraints (`ADD COLUMN c int UNIQUE`), or
                            // its sequence
                            Some(NodeEnum::ColumnDef(c)) if names_its_own(c) => unnamed = true,
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    (opaque, unnamed)
}

/// A column that makes PostgreSQL name something for it: an inline constraint (its index),
/// a serial type or an identity (its sequence).
fn names_its_own(c: &pg_query::protobuf::ColumnDef) -> bool {
    let serial = c.type_name.as_ref().is_some_and(|t| {
        strings(&t.names).last().is_some_and(|n| {
            n.ends_with("serial") || matches!(n.as_str(), "serial2" | "serial4" | "serial8")
        })
    });
    use pg_query::protobuf::ConstrType as Ct;
    let named = c.constraints.iter().any(|k| {
        matches!(&k.node, Some(NodeEnum::Constraint(k)) if k.conname.is_empty() && matches!(
            Ct::try_from(k.contype),
            Ok(Ct::ConstrPrimary
                | Ct::ConstrUnique
                | Ct::ConstrExclusion
                | Ct::ConstrForeign
                | Ct::ConstrCheck
                | Ct::ConstrIdentity)
        ))
    });
    serial || named || !c.identity.is_empty()
}

/// down.sql drops something up.sql does not create (a table up.sql only altered, an index
/// or column that was there before): a rollback would destroy what the fleet had before the
/// migration, its rows with it. Not checked when up.sql creates what cannot be read from it
/// (a DO block, ...); a constraint or index is not checked when up.sql adds ones PostgreSQL
/// names. `destructive = true` (or risk high) says the loss is meant.
fn check_drops(m: &Migration, up: &[Parsed], down: &[Parsed], out: &mut Out) {
    if m.destructive || matches!(m.risk.as_str(), "high" | "critical") {
        return;
    }
    let (opaque, unnamed) = unseen(up);
    if opaque {
        return;
    }
    // A step of the shard itself runs in the server's default search_path; one of a
    // tenant (the plan's default scope, unless the migration says) in the tenant's schema.
    let tenant_scoped = m.scope != Some(crate::Scope::Shard);
    let mut known: Vec<Object> = created(up).into_iter().map(|(o, _)| o).collect();
    known.extend(replaced(up));
    renamed(up, &mut known);
    // Extensions only here: down-incomplete does not ask down.sql to drop one up.sql made
    // (often shared, made IF NOT EXISTS), but dropping one up.sql did not make takes every
    // column of its types with it (CASCADE).
    let extensions: Vec<&str> = up
        .iter()
        .filter_map(|p| match &p.node {
            NodeEnum::CreateExtensionStmt(s) => Some(s.extname.as_str()),
            _ => None,
        })
        .collect();
    for p in down {
        if let NodeEnum::DropStmt(s) = &p.node
            && s.remove_type == ObjectType::ObjectExtension as i32
        {
            for o in &s.objects {
                let name = object_parts(o).join(".");
                if !extensions.contains(&name.as_str()) {
                    out.push(
                        DOWN_DROPS_EXISTING,
                        "down.sql",
                        p.info.line,
                        format!(
                            "drops extension {name}, which up.sql does not create: a rollback would drop something that existed before the migration"
                        ),
                        "make down.sql undo only what up.sql did; an extension other migrations use stays",
                    );
                }
            }
        }
        let drops_server_nameable = matches!(&p.node, NodeEnum::DropStmt(s)
            if s.remove_type == ObjectType::ObjectIndex as i32
                || s.remove_type == ObjectType::ObjectSequence as i32);
        // TRUNCATE empties a table the same way
        let truncated: Vec<Object> = match &p.node {
            NodeEnum::TruncateStmt(t) => t
                .relations
                .iter()
                .filter_map(|r| match &r.node {
                    Some(NodeEnum::RangeVar(r)) => Some(Object::Relation {
                        name: relation_name(r),
                        what: "table",
                    }),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let verb = if truncated.is_empty() {
            "drops"
        } else {
            "truncates"
        };
        for d in dropped(std::slice::from_ref(p))
            .into_iter()
            .chain(truncated)
        {
            // PostgreSQL named it: up.sql may have added it
            let server_named =
                unnamed && (drops_server_nameable || matches!(d, Object::Constraint { .. }));
            // up.sql created it, or what holds it (a column of a new table)
            let makers: Vec<&Object> = known
                .iter()
                .filter(|o| same_object(&d, o) || covers(o, &d))
                .collect();
            // Named without its schema, where up.sql names one: in a tenant's search_path
            // (the tenant's schema alone) the drop is of the tenant's own object of that
            // name, and the one up.sql made in its schema stays.
            if tenant_scoped
                && !server_named
                && !matches!(d, Object::Schema(_))
                && d.schema().is_none()
                && !makers.is_empty()
                && makers.iter().all(|o| o.schema().is_some())
            {
                out.push(
                    DOWN_DROPS_EXISTING,
                    "down.sql",
                    p.info.line,
                    format!(
                        "{verb} {} without its schema, but up.sql creates {}: run in a tenant's search_path, a rollback would {} the tenant's own and leave that one",
                        d.describe(),
                        makers[0].describe(),
                        if verb == "drops" { "drop" } else { "empty" },
                    ),
                    "name it in down.sql as up.sql does, with its schema",
                );
                known.push(d);
                continue;
            }
            if server_named || !makers.is_empty() {
                continue;
            }
            out.push(
                DOWN_DROPS_EXISTING,
                "down.sql",
                p.info.line,
                format!(
                    "{verb} {}, which up.sql does not create: a rollback would {} something that existed before the migration",
                    d.describe(),
                    if verb == "drops" { "drop" } else { "empty" },
                ),
                "make down.sql undo only what up.sql did (drop what it created, restore what it changed); if it is meant, turn the rule off for this migration with its reason (`[lint] ignore` in migration.toml, or `-- flotilla:lint-ignore down-drops-existing REASON`) or say `destructive = true`",
            );
            // said once
            known.push(d);
        }
        // what down.sql creates itself (to drop again later) is its own, and so is what it
        // renames (the enum recipe: the type renamed away, a new one made, the old dropped)
        created_by(p, &mut |o| known.push(o));
        if let Some((_, to)) = rename_of(p) {
            known.push(to);
        }
    }
}

/// The columns an expression refers to (the last part of each column reference).
fn column_refs(expr: Option<&pg_query::protobuf::Node>) -> Vec<String> {
    let Some(node) = expr.and_then(|e| e.node.as_ref()) else {
        return Vec::new();
    };
    node.nodes()
        .into_iter()
        .filter_map(|(n, ..)| match n {
            pg_query::NodeRef::ColumnRef(r) => strings(&r.fields).pop(),
            _ => None,
        })
        .collect()
}

/// Rows up.sql deletes that down.sql cannot put back: it has no INSERT
/// or COPY. The drop rules speak of objects; a `DELETE ... WHERE` with `SELECT 1` as its
/// undo lost rows for good at a rollback and nothing said so. `destructive = true` (or a
/// high risk) says the data is meant to go; tables up.sql creates hold nothing before it.
fn check_deletes(m: &Migration, up: &[Parsed], down: &[Parsed], out: &mut Out) {
    if m.destructive || matches!(m.risk.as_str(), "high" | "critical") {
        return;
    }
    let puts_back = down
        .iter()
        .any(|p| matches!(p.node, NodeEnum::InsertStmt(_) | NodeEnum::CopyStmt(_)));
    if puts_back {
        return;
    }
    let new: Vec<String> = up
        .iter()
        .filter_map(|p| match &p.node {
            NodeEnum::CreateStmt(s) => s.relation.as_ref().map(|r| r.relname.clone()),
            _ => None,
        })
        .collect();
    for p in up {
        // (a TRUNCATE is destructive-drop's, an error already)
        let tables: Vec<String> = match &p.node {
            NodeEnum::DeleteStmt(s) => s.relation.iter().map(relation_name).collect(),
            _ => continue,
        };
        for table in tables {
            if new.iter().any(|n| n == unqualified(&table)) {
                continue;
            }
            out.push(
                DELETE_NOT_UNDONE,
                "up.sql",
                p.info.line,
                format!(
                    "{} removes rows of {table} that down.sql does not put back (it has no INSERT or COPY): a rollback leaves them gone",
                    p.info.kind
                ),
                "copy the rows aside first (CREATE TABLE ... AS SELECT in up.sql, INSERT ... SELECT back in down.sql); if they are meant to go, say `destructive = true` in migration.toml",
            );
        }
    }
}

/// (sequence, table) for each sequence up.sql makes `OWNED BY` a table's column (in its
/// CREATE SEQUENCE or an ALTER SEQUENCE after it).
fn owned_sequences(up: &[Parsed]) -> Vec<(String, String)> {
    let owner = |options: &[pg_query::protobuf::Node]| {
        options.iter().find_map(|o| match &o.node {
            Some(NodeEnum::DefElem(d)) if d.defname == "owned_by" => {
                let parts = d
                    .arg
                    .as_deref()
                    .map(|a| match &a.node {
                        Some(NodeEnum::List(l)) => strings(&l.items),
                        _ => Vec::new(),
                    })
                    .unwrap_or_default();
                // table.column, or schema.table.column; `OWNED BY NONE` is one part
                (parts.len() >= 2).then(|| parts[..parts.len() - 1].join("."))
            }
            _ => None,
        })
    };
    up.iter()
        .filter_map(|p| match &p.node {
            NodeEnum::CreateSeqStmt(s) => Some((s.sequence.as_ref()?, owner(&s.options)?)),
            NodeEnum::AlterSeqStmt(s) => Some((s.sequence.as_ref()?, owner(&s.options)?)),
            _ => None,
        })
        .map(|(seq, table)| (relation_name(seq), table))
        .collect()
}

/// (partition, its partitioned table) for each table up.sql makes a partition: created
/// `PARTITION OF` it, or attached (`ALTER TABLE parent ATTACH PARTITION child`).
fn partitions(up: &[Parsed]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in up {
        match &p.node {
            NodeEnum::CreateStmt(s) if s.partbound.is_some() => {
                if let Some(child) = &s.relation {
                    for parent in &s.inh_relations {
                        if let Some(NodeEnum::RangeVar(r)) = &parent.node {
                            out.push((relation_name(child), relation_name(r)));
                        }
                    }
                }
            }
            NodeEnum::AlterTableStmt(s) => {
                let Some(parent) = s.relation.as_ref().map(relation_name) else {
                    continue;
                };
                for cmd in &s.cmds {
                    if let Some(NodeEnum::AlterTableCmd(c)) = &cmd.node
                        && c.subtype == At::AtAttachPartition as i32
                        && let Some(NodeEnum::PartitionCmd(pc)) =
                            c.def.as_ref().and_then(|d| d.node.as_ref())
                        && let Some(child) = &pc.name
                    {
                        out.push((relation_name(child), parent.clone()));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

pub(super) fn check(m: &Migration, up: &[Parsed], down: &[Parsed], out: &mut Out) {
    let restores = m.data.as_ref().is_some_and(|d| !d.prior_image.is_empty());
    if down.is_empty() {
        if !restores {
            out.push(
                MISSING_DOWN,
                "down.sql",
                0,
                "no down SQL: the migration cannot be undone when the plan fails or is rolled back".to_string(),
                "write down.sql (a dbmate down section, a Flyway U file, a golang-migrate .down.sql); if the change truly cannot be undone, say `irreversible = true` in migration.toml, or in a dbmate, Flyway or golang-migrate file `-- flotilla:lint-ignore missing-down REASON`",
            );
        }
        return;
    }
    if m.data.is_some() {
        return;
    }
    check_drops(m, up, down, out);
    check_deletes(m, up, down, out);
    let mut drops = dropped(down);
    // A partition goes with its partitioned table (`DROP TABLE events` drops the tables
    // made `PARTITION OF events` or attached to it, and their constraints): a down.sql
    // that drops the parent undoes them too.
    let partitions = partitions(up);
    let mut i = 0;
    while i < drops.len() {
        if let Object::Relation { name, .. } = &drops[i] {
            let children: Vec<Object> = partitions
                .iter()
                .filter(|(_, parent)| same(parent, name))
                .map(|(child, _)| Object::Relation {
                    name: child.clone(),
                    what: "table",
                })
                .filter(|c| !drops.iter().any(|d| same_object(d, c)))
                .collect();
            drops.extend(children);
        }
        i += 1;
    }
    // Made again (`DROP ... IF EXISTS x; CREATE x`): what was there before is not known,
    // so down.sql is not asked to drop it (as an `OR REPLACE` object is not): the usual
    // idempotent re-create of a trigger or function was refused.
    let remade: Vec<Object> = up
        .iter()
        .filter(|p| matches!(&p.node, NodeEnum::DropStmt(d) if d.missing_ok))
        .flat_map(|p| dropped(std::slice::from_ref(p)))
        .collect();
    // A trigger goes with its function dropped CASCADE (`DROP FUNCTION f() CASCADE`).
    let cascaded: Vec<String> = down
        .iter()
        .filter_map(|p| match &p.node {
            NodeEnum::DropStmt(d)
                if d.remove_type == ObjectType::ObjectFunction as i32
                    && d.behavior == pg_query::protobuf::DropBehavior::DropCascade as i32 =>
            {
                Some(d.objects.iter().map(|o| object_parts(o).join(".")))
            }
            _ => None,
        })
        .flatten()
        .collect();
    let trigger_function = |table: &str, name: &str| {
        up.iter().find_map(|p| match &p.node {
            NodeEnum::CreateTrigStmt(t)
                if t.trigname == name
                    && t.relation
                        .as_ref()
                        .is_some_and(|r| same(&relation_name(r), table)) =>
            {
                Some(strings(&t.funcname).join("."))
            }
            _ => None,
        })
    };
    let with_its_function = |o: &Object| match o {
        Object::Trigger { table, name } => {
            trigger_function(table, name).is_some_and(|f| cascaded.iter().any(|c| same(c, &f)))
        }
        _ => false,
    };
    // A sequence `OWNED BY` a table's column goes with the table.
    let owned = owned_sequences(up);
    let goes_with_table = |o: &Object| match o {
        Object::Relation {
            name,
            what: "sequence",
        } => owned
            .iter()
            .filter(|(seq, _)| same(seq, name))
            .any(|(_, table)| {
                drops.iter().any(|d| {
                    covers(
                        d,
                        &Object::Relation {
                            name: table.clone(),
                            what: "table",
                        },
                    )
                })
            }),
        _ => false,
    };
    for (object, line) in created(up) {
        if remade.iter().any(|r| same_object(r, &object))
            || goes_with_table(&object)
            || with_its_function(&object)
        {
            continue;
        }
        if !drops.iter().any(|d| covers(d, &object)) {
            out.push(
                DOWN_INCOMPLETE,
                "up.sql",
                line,
                format!("creates {}, which down.sql does not drop", object.describe()),
                "make down.sql drop everything up.sql creates (in reverse order), so that a rollback leaves the schema as it was",
            );
        }
    }
}
