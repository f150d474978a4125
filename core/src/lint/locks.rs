//! Each statement's kind and the table-level locks PostgreSQL documents for it.
//!
//! Sources: the "Explicit Locking" chapter (which command takes which mode) and the
//! command pages, ALTER TABLE's above all ("an ACCESS EXCLUSIVE lock is acquired unless
//! explicitly noted"). A statement naming a relation several times (an ALTER TABLE with
//! several actions, a self-join) is reported with its strongest lock on it.

use pg_query::NodeEnum;
use pg_query::protobuf::{
    AlterTableCmd, AlterTableStmt, AlterTableType as At, ConstrType, Constraint, CreateStmt,
    DropStmt, Node, ObjectType, RangeVar, ReindexObjectType, RenameStmt, TransactionStmtKind,
};

use super::{LockMode, RelationLock};

#[derive(Default)]
struct Locks(Vec<RelationLock>);

impl Locks {
    /// Adds a lock, or strengthens the one already held on the relation.
    fn add(&mut self, relation: String, mode: LockMode) {
        if relation.is_empty() {
            return;
        }
        match self.0.iter_mut().find(|l| l.relation == relation) {
            Some(held) => held.mode = held.mode.max(mode),
            None => self.0.push(RelationLock { relation, mode }),
        }
    }

    fn add_var(&mut self, var: Option<&RangeVar>, mode: LockMode) {
        if let Some(var) = var {
            self.add(relation_name(var), mode);
        }
    }
}

/// A relation as written: `schema.name` when qualified.
pub(crate) fn relation_name(var: &RangeVar) -> String {
    if var.schemaname.is_empty() {
        var.relname.clone()
    } else {
        format!("{}.{}", var.schemaname, var.relname)
    }
}

/// The items of a DropStmt/CommentStmt object (a List of name parts, or a lone String).
pub(crate) fn object_parts(node: &Node) -> Vec<String> {
    match &node.node {
        Some(NodeEnum::List(list)) => strings(&list.items),
        Some(NodeEnum::String(s)) => vec![s.sval.clone()],
        // DROP FUNCTION f(int), DROP TYPE t
        Some(NodeEnum::ObjectWithArgs(o)) => strings(&o.objname),
        Some(NodeEnum::TypeName(t)) => strings(&t.names),
        _ => Vec::new(),
    }
}

/// The String nodes of a name list (`app.f` as ["app", "f"]).
pub(crate) fn strings(items: &[Node]) -> Vec<String> {
    items
        .iter()
        .filter_map(|n| match &n.node {
            Some(NodeEnum::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .collect()
}

/// "TABLE", "INDEX", "MATERIALIZED VIEW", ... as SQL spells the object type.
pub(crate) fn object_word(objtype: i32) -> String {
    match ObjectType::try_from(objtype) {
        Ok(ObjectType::ObjectMatview) => "MATERIALIZED VIEW".to_string(),
        Ok(ObjectType::ObjectTabconstraint) => "CONSTRAINT".to_string(),
        Ok(ObjectType::ObjectFdw) => "FOREIGN DATA WRAPPER".to_string(),
        Ok(ObjectType::ObjectForeignServer) => "SERVER".to_string(),
        Ok(ObjectType::ObjectStatisticExt) => "STATISTICS".to_string(),
        Ok(t) => t
            .as_str_name()
            .trim_start_matches("OBJECT_")
            .replace('_', " "),
        Err(_) => "OBJECT".to_string(),
    }
}

pub(super) fn describe(node: &NodeEnum) -> (String, Vec<RelationLock>) {
    use LockMode::*;
    let mut locks = Locks::default();
    let kind = match node {
        NodeEnum::AlterTableStmt(s) => {
            alter_table(s, &mut locks);
            format!("ALTER {}", object_word(s.objtype))
        }
        NodeEnum::IndexStmt(s) => {
            // CONCURRENTLY lets writes go on while the index builds.
            let mode = if s.concurrent {
                ShareUpdateExclusive
            } else {
                Share
            };
            locks.add_var(s.relation.as_ref(), mode);
            if s.concurrent {
                "CREATE INDEX CONCURRENTLY"
            } else {
                "CREATE INDEX"
            }
            .to_string()
        }
        NodeEnum::CreateStmt(s) => {
            create_table(s, &mut locks);
            "CREATE TABLE".to_string()
        }
        NodeEnum::CreateTableAsStmt(s) => {
            locks.add_var(
                s.into.as_ref().and_then(|i| i.rel.as_ref()),
                AccessExclusive,
            );
            match ObjectType::try_from(s.objtype) {
                Ok(ObjectType::ObjectMatview) => "CREATE MATERIALIZED VIEW",
                _ if s.is_select_into => "SELECT INTO",
                _ => "CREATE TABLE AS",
            }
            .to_string()
        }
        NodeEnum::ViewStmt(s) => {
            // OR REPLACE swaps the view's rule: ACCESS EXCLUSIVE on the view.
            locks.add_var(s.view.as_ref(), AccessExclusive);
            "CREATE VIEW".to_string()
        }
        NodeEnum::DropStmt(s) => {
            drop(s, &mut locks);
            let mut kind = format!("DROP {}", object_word(s.remove_type));
            if s.concurrent {
                kind.push_str(" CONCURRENTLY");
            }
            kind
        }
        NodeEnum::RenameStmt(s) => rename(s, &mut locks),
        NodeEnum::InsertStmt(s) => {
            locks.add_var(s.relation.as_ref(), RowExclusive);
            "INSERT".to_string()
        }
        NodeEnum::UpdateStmt(s) => {
            locks.add_var(s.relation.as_ref(), RowExclusive);
            "UPDATE".to_string()
        }
        NodeEnum::DeleteStmt(s) => {
            locks.add_var(s.relation.as_ref(), RowExclusive);
            "DELETE".to_string()
        }
        NodeEnum::MergeStmt(s) => {
            locks.add_var(s.relation.as_ref(), RowExclusive);
            "MERGE".to_string()
        }
        NodeEnum::SelectStmt(s) => {
            if let Some(into) = &s.into_clause {
                locks.add_var(into.rel.as_ref(), AccessExclusive);
                "SELECT INTO".to_string()
            } else {
                "SELECT".to_string()
            }
        }
        NodeEnum::TruncateStmt(s) => {
            for r in &s.relations {
                if let Some(NodeEnum::RangeVar(v)) = &r.node {
                    locks.add(relation_name(v), AccessExclusive);
                }
            }
            "TRUNCATE".to_string()
        }
        NodeEnum::LockStmt(s) => {
            // The mode numbers are PostgreSQL's (lockdefs.h); 0 means the default.
            let mode = match s.mode {
                1 => AccessShare,
                2 => RowShare,
                3 => RowExclusive,
                4 => ShareUpdateExclusive,
                5 => Share,
                6 => ShareRowExclusive,
                7 => Exclusive,
                _ => AccessExclusive,
            };
            for r in &s.relations {
                if let Some(NodeEnum::RangeVar(v)) = &r.node {
                    locks.add(relation_name(v), mode);
                }
            }
            "LOCK TABLE".to_string()
        }
        NodeEnum::VacuumStmt(s) => {
            let full = s.is_vacuumcmd && has_option(&s.options, "full");
            let mode = if full {
                AccessExclusive
            } else {
                ShareUpdateExclusive
            };
            for r in &s.rels {
                if let Some(NodeEnum::VacuumRelation(v)) = &r.node {
                    locks.add_var(v.relation.as_ref(), mode);
                }
            }
            match (s.is_vacuumcmd, full) {
                (true, true) => "VACUUM FULL",
                (true, false) => "VACUUM",
                _ => "ANALYZE",
            }
            .to_string()
        }
        NodeEnum::ClusterStmt(s) => {
            locks.add_var(s.relation.as_ref(), AccessExclusive);
            "CLUSTER".to_string()
        }
        NodeEnum::ReindexStmt(s) => {
            let concurrent = has_option(&s.params, "concurrently");
            // REINDEX INDEX locks the index itself exclusively; REINDEX TABLE blocks
            // the table's writes (SHARE); CONCURRENTLY blocks neither.
            let mode = match (concurrent, ReindexObjectType::try_from(s.kind)) {
                (true, _) => ShareUpdateExclusive,
                (false, Ok(ReindexObjectType::ReindexObjectIndex)) => AccessExclusive,
                _ => Share,
            };
            locks.add_var(s.relation.as_ref(), mode);
            if concurrent {
                "REINDEX CONCURRENTLY"
            } else {
                "REINDEX"
            }
            .to_string()
        }
        NodeEnum::RefreshMatViewStmt(s) => {
            let mode = if s.concurrent {
                Exclusive
            } else {
                AccessExclusive
            };
            locks.add_var(s.relation.as_ref(), mode);
            if s.concurrent {
                "REFRESH MATERIALIZED VIEW CONCURRENTLY"
            } else {
                "REFRESH MATERIALIZED VIEW"
            }
            .to_string()
        }
        NodeEnum::CreateTrigStmt(s) => {
            locks.add_var(s.relation.as_ref(), ShareRowExclusive);
            "CREATE TRIGGER".to_string()
        }
        NodeEnum::RuleStmt(s) => {
            locks.add_var(s.relation.as_ref(), AccessExclusive);
            "CREATE RULE".to_string()
        }
        NodeEnum::CreatePolicyStmt(s) => {
            locks.add_var(s.table.as_ref(), AccessExclusive);
            "CREATE POLICY".to_string()
        }
        NodeEnum::AlterPolicyStmt(s) => {
            locks.add_var(s.table.as_ref(), AccessExclusive);
            "ALTER POLICY".to_string()
        }
        NodeEnum::CommentStmt(s) => {
            let parts = s.object.as_deref().map(object_parts).unwrap_or_default();
            let relation = match ObjectType::try_from(s.objtype) {
                Ok(ObjectType::ObjectColumn) if parts.len() > 1 => {
                    Some(parts[..parts.len() - 1].join("."))
                }
                Ok(
                    ObjectType::ObjectTable
                    | ObjectType::ObjectView
                    | ObjectType::ObjectMatview
                    | ObjectType::ObjectIndex,
                ) => Some(parts.join(".")),
                _ => None,
            };
            if let Some(relation) = relation {
                locks.add(relation, ShareUpdateExclusive);
            }
            "COMMENT".to_string()
        }
        NodeEnum::CopyStmt(s) => {
            let mode = if s.is_from { RowExclusive } else { AccessShare };
            locks.add_var(s.relation.as_ref(), mode);
            if s.is_from { "COPY FROM" } else { "COPY TO" }.to_string()
        }
        NodeEnum::TransactionStmt(s) => match TransactionStmtKind::try_from(s.kind) {
            Ok(TransactionStmtKind::TransStmtBegin) => "BEGIN",
            Ok(TransactionStmtKind::TransStmtStart) => "START TRANSACTION",
            Ok(TransactionStmtKind::TransStmtCommit) => "COMMIT",
            Ok(TransactionStmtKind::TransStmtRollback) => "ROLLBACK",
            Ok(TransactionStmtKind::TransStmtSavepoint) => "SAVEPOINT",
            Ok(TransactionStmtKind::TransStmtRelease) => "RELEASE",
            Ok(TransactionStmtKind::TransStmtRollbackTo) => "ROLLBACK TO",
            Ok(TransactionStmtKind::TransStmtPrepare) => "PREPARE TRANSACTION",
            Ok(TransactionStmtKind::TransStmtCommitPrepared) => "COMMIT PREPARED",
            Ok(TransactionStmtKind::TransStmtRollbackPrepared) => "ROLLBACK PREPARED",
            _ => "TRANSACTION",
        }
        .to_string(),
        NodeEnum::GrantStmt(s) => if s.is_grant { "GRANT" } else { "REVOKE" }.to_string(),
        NodeEnum::DefineStmt(s) => format!("CREATE {}", object_word(s.kind)),
        NodeEnum::VariableSetStmt(_) => "SET".to_string(),
        NodeEnum::CreateEnumStmt(_) | NodeEnum::CompositeTypeStmt(_) => "CREATE TYPE".to_string(),
        NodeEnum::AlterEnumStmt(_) => "ALTER TYPE".to_string(),
        NodeEnum::AlterSeqStmt(_) => "ALTER SEQUENCE".to_string(),
        NodeEnum::CreateSeqStmt(_) => "CREATE SEQUENCE".to_string(),
        other => generic_kind(other),
    };
    read_locks(node, &mut locks);
    (kind, locks.0)
}

/// Every relation a statement reads (FROM, JOIN, subqueries, USING) takes ACCESS SHARE
/// (SELECT ... FOR UPDATE/SHARE: ROW SHARE); CTE names are not relations.
fn read_locks(node: &NodeEnum, locks: &mut Locks) {
    let locking = matches!(node, NodeEnum::SelectStmt(s) if !s.locking_clause.is_empty());
    let mode = if locking {
        LockMode::RowShare
    } else {
        LockMode::AccessShare
    };
    let nodes = node.nodes();
    let ctes: Vec<&str> = nodes
        .iter()
        .filter_map(|(n, ..)| match n {
            pg_query::NodeRef::CommonTableExpr(c) => Some(c.ctename.as_str()),
            _ => None,
        })
        .collect();
    for (n, _, context, _) in &nodes {
        if let (pg_query::NodeRef::RangeVar(v), pg_query::Context::Select) = (n, context) {
            let name = relation_name(v);
            if !ctes.contains(&name.as_str()) {
                locks.add(name, mode);
            }
        }
    }
}

/// "CREATE EXTENSION" from `CreateExtensionStmt`, for the statements without a case above.
fn generic_kind(node: &NodeEnum) -> String {
    let debug = format!("{node:?}");
    let variant = debug.split('(').next().unwrap_or_default();
    let name = variant.strip_suffix("Stmt").unwrap_or(variant);
    let mut words = String::new();
    for (i, c) in name.char_indices() {
        if i > 0 && c.is_ascii_uppercase() {
            words.push(' ');
        }
        words.push(c.to_ascii_uppercase());
    }
    words
}

fn has_option(options: &[Node], name: &str) -> bool {
    options.iter().any(|o| match &o.node {
        Some(NodeEnum::DefElem(d)) if d.defname == name => !matches!(
            d.arg.as_deref().and_then(|a| a.node.as_ref()),
            Some(NodeEnum::Boolean(b)) if !b.boolval
        ),
        _ => false,
    })
}

/// A constraint node, if `node` is one.
pub(crate) fn as_constraint(node: &Node) -> Option<&Constraint> {
    match &node.node {
        Some(NodeEnum::Constraint(c)) => Some(c),
        _ => None,
    }
}

pub(crate) fn is_foreign_key(c: &Constraint) -> bool {
    c.contype == ConstrType::ConstrForeign as i32
}

fn alter_table(s: &AlterTableStmt, locks: &mut Locks) {
    let table = s.relation.as_ref().map(relation_name).unwrap_or_default();
    for cmd in &s.cmds {
        let Some(NodeEnum::AlterTableCmd(cmd)) = &cmd.node else {
            continue;
        };
        locks.add(table.clone(), alter_cmd_lock(cmd));
        // Other relations an action touches.
        match (
            At::try_from(cmd.subtype),
            cmd.def.as_deref().and_then(|d| d.node.as_ref()),
        ) {
            // A foreign key takes SHARE ROW EXCLUSIVE on both tables.
            (Ok(At::AtAddConstraint), Some(NodeEnum::Constraint(c))) if is_foreign_key(c) => {
                locks.add_var(c.pktable.as_ref(), LockMode::ShareRowExclusive);
            }
            (Ok(At::AtAddColumn), Some(NodeEnum::ColumnDef(col))) => {
                for c in col.constraints.iter().filter_map(as_constraint) {
                    if is_foreign_key(c) {
                        locks.add_var(c.pktable.as_ref(), LockMode::ShareRowExclusive);
                    }
                }
            }
            (
                Ok(At::AtAttachPartition | At::AtDetachPartition),
                Some(NodeEnum::PartitionCmd(p)),
            ) => {
                let mode = if p.concurrent {
                    LockMode::ShareUpdateExclusive
                } else {
                    LockMode::AccessExclusive
                };
                locks.add_var(p.name.as_ref(), mode);
            }
            _ => {}
        }
    }
}

/// ALTER TABLE's documented lock per action: ACCESS EXCLUSIVE unless noted otherwise.
fn alter_cmd_lock(cmd: &AlterTableCmd) -> LockMode {
    use LockMode::*;
    let def = cmd.def.as_deref().and_then(|d| d.node.as_ref());
    match At::try_from(cmd.subtype) {
        Ok(
            At::AtSetStatistics
            | At::AtSetOptions
            | At::AtResetOptions
            | At::AtValidateConstraint
            | At::AtClusterOn
            | At::AtDropCluster
            | At::AtSetRelOptions
            | At::AtResetRelOptions
            | At::AtReplaceRelOptions
            | At::AtAttachPartition
            | At::AtDetachPartitionFinalize,
        ) => ShareUpdateExclusive,
        Ok(At::AtDetachPartition) => match def {
            Some(NodeEnum::PartitionCmd(p)) if p.concurrent => ShareUpdateExclusive,
            _ => AccessExclusive,
        },
        Ok(
            At::AtEnableTrig
            | At::AtEnableAlwaysTrig
            | At::AtEnableReplicaTrig
            | At::AtDisableTrig
            | At::AtEnableTrigAll
            | At::AtDisableTrigAll
            | At::AtEnableTrigUser
            | At::AtDisableTrigUser
            | At::AtAlterConstraint,
        ) => ShareRowExclusive,
        Ok(At::AtAddConstraint) => match def {
            Some(NodeEnum::Constraint(c)) if is_foreign_key(c) => ShareRowExclusive,
            _ => AccessExclusive,
        },
        _ => AccessExclusive,
    }
}

fn create_table(s: &CreateStmt, locks: &mut Locks) {
    use LockMode::*;
    locks.add_var(s.relation.as_ref(), AccessExclusive);
    // PARTITION OF locks its parent exclusively; INHERITS only against concurrent DDL.
    let parent_mode = if s.partbound.is_some() {
        AccessExclusive
    } else {
        ShareUpdateExclusive
    };
    for parent in &s.inh_relations {
        if let Some(NodeEnum::RangeVar(v)) = &parent.node {
            locks.add(relation_name(v), parent_mode);
        }
    }
    let column_constraints = s.table_elts.iter().flat_map(|e| match &e.node {
        Some(NodeEnum::ColumnDef(col)) => col.constraints.iter().collect::<Vec<_>>(),
        _ => Vec::new(),
    });
    for c in s
        .table_elts
        .iter()
        .chain(s.constraints.iter())
        .chain(column_constraints)
        .filter_map(as_constraint)
    {
        if is_foreign_key(c) {
            locks.add_var(c.pktable.as_ref(), ShareRowExclusive);
        }
    }
}

fn drop(s: &DropStmt, locks: &mut Locks) {
    use LockMode::*;
    let mode = if s.concurrent {
        ShareUpdateExclusive
    } else {
        AccessExclusive
    };
    match ObjectType::try_from(s.remove_type) {
        Ok(
            ObjectType::ObjectTable
            | ObjectType::ObjectIndex
            | ObjectType::ObjectView
            | ObjectType::ObjectMatview
            | ObjectType::ObjectSequence
            | ObjectType::ObjectForeignTable,
        ) => {
            for o in &s.objects {
                locks.add(object_parts(o).join("."), mode);
            }
        }
        // DROP TRIGGER/RULE/POLICY name ON table: the last part is the object's name.
        Ok(ObjectType::ObjectTrigger | ObjectType::ObjectRule | ObjectType::ObjectPolicy) => {
            for o in &s.objects {
                let parts = object_parts(o);
                if parts.len() > 1 {
                    locks.add(parts[..parts.len() - 1].join("."), AccessExclusive);
                }
            }
        }
        _ => {}
    }
}

fn rename(s: &RenameStmt, locks: &mut Locks) -> String {
    let renamed = ObjectType::try_from(s.rename_type);
    // Renaming an index only needs SHARE UPDATE EXCLUSIVE (PostgreSQL 12 and later).
    let mode = if renamed == Ok(ObjectType::ObjectIndex) {
        LockMode::ShareUpdateExclusive
    } else {
        LockMode::AccessExclusive
    };
    locks.add_var(s.relation.as_ref(), mode);
    match renamed {
        Ok(
            ObjectType::ObjectColumn
            | ObjectType::ObjectTabconstraint
            | ObjectType::ObjectAttribute,
        ) => {
            format!("ALTER {}", object_word(s.relation_type))
        }
        _ => format!("ALTER {}", object_word(s.rename_type)),
    }
}
