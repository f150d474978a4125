//! A migration's statements as the dry run shows them: each statement's line, text, kind
//! and the locks it takes on which relation, and the relations whose sizes matter.
use flotilla_core::{Migration, pb};

/// One migration's statements, parsed.
#[derive(Debug, Default)]
pub(super) struct Parsed {
    pub statements: Vec<pb::ExplainStatement>,
    /// The relations the statements lock (and a data change's table), in order, once each.
    pub relations: Vec<String>,
    /// Why the statements could not be parsed ("" = they were).
    pub error: String,
}

impl Parsed {
    fn add_sql(&mut self, sql: &str, source: &str) {
        if sql.trim().is_empty() {
            return;
        }
        match flotilla_core::lint::analyze(sql) {
            Ok(stmts) => {
                for s in stmts {
                    for l in &s.locks {
                        self.add_relation(&l.relation);
                    }
                    self.statements.push(pb::ExplainStatement {
                        line: s.line,
                        // (shown to people: a password in a role's SQL is not)
                        text: flotilla_core::secrets::sql_passwords_hidden(&s.text),
                        kind: s.kind,
                        locks: s
                            .locks
                            .into_iter()
                            .map(|l| pb::StatementLock {
                                relation: l.relation,
                                mode: l.mode.to_string(),
                            })
                            .collect(),
                    });
                }
            }
            Err(e) => self.error = format!("{source}: {e}"),
        }
    }

    fn add_relation(&mut self, relation: &str) {
        if !relation.is_empty() && !self.relations.iter().any(|r| r == relation) {
            self.relations.push(relation.to_string());
        }
    }

    /// Every statement's kind, in order (a migration's shape, for finding similar ones).
    pub fn shape(&self) -> String {
        self.statements
            .iter()
            .map(|s| s.kind.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

pub(super) fn parse(m: &Migration) -> Parsed {
    let mut parsed = Parsed::default();
    parsed.add_sql(&m.up_sql, &m.source);
    if let Some(d) = &m.data {
        // A data change's statements are its batch's (run once per batch of rows).
        parsed.add_sql(&d.batch_sql, &format!("{} [data] batch", m.source));
        parsed.add_relation(&d.table_text());
    }
    parsed
}
